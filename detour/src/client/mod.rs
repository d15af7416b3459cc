//! `mptcp-detour`, the client daemon (thesis §4.2 and §4.3): the userspace MPTCP path manager of its
//! network namespace, which adds detour subflows to the connections its policy selects.
//!
//! - [`core`]: the sans-IO path manager (subflow worker, mapping cache, kernel-path duties).
//! - [`requester`]: the NAT detour protocol's client side.
//! - [`sys`]: the path manager sysctl, the MSS clamp, tunnel interfaces.
//! - [`config`], [`metrics`], [`shell`]: configuration, Prometheus metrics, the tokio shell.

pub mod config;
pub mod core;
pub mod metrics;
pub mod requester;
pub mod shell;
pub mod sys;

pub use config::ClientConfig;
pub use shell::run;
