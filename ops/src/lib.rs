//! What every binary of the workspace shares to run as a service (`mptcp-proxy`, `mptcp-sniffer`, `mpipd`,
//! `mpip-proxy`):
//!
//! - [`logging`]: diagnostics on stderr, colour only on a terminal, `--log-format json` for log shippers;
//! - [`report`]: an error printed once, on one line, its causes not repeated;
//! - [`notify`]: systemd's `sd_notify` protocol (`READY=1`, `RELOADING=1`, `STOPPING=1`) without libsystemd;
//! - [`fd_limit`]: raising `RLIMIT_NOFILE` to the hard limit at start.

pub mod fd_limit;
pub mod logging;
pub mod notify;
pub mod report;

pub use logging::{LogArgs, LogFormat};
