//! `mptcp-detourd`, the NAT detour host (thesis §4.1.2): answers mapping requests on UDP 45672 and
//! installs each mapping as an element of one nftables map that DNATs and SNATs the client's subflow.
//!
//! - [`core`]: the sans-IO protocol state (authentication, replay window, rate limits, quotas, ACL,
//!   the thesis's rules for the detour port, idleness).
//! - [`nat`]: the nftables table.
//! - [`config`], [`metrics`], [`shell`]: configuration, Prometheus metrics, the tokio shell.

pub mod config;
pub mod core;
pub mod metrics;
pub mod nat;
pub mod shell;

pub use config::HostConfig;
pub use shell::run;
