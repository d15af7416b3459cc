//! mptcp-proxy: terminates Multipath TCP sessions and relays them to legacy TCP servers as an HTTP proxy
//! (absolute-form and CONNECT) or a transparent proxy. See `ARCHITECTURE.md` at the repository root.

pub mod access_log;
pub mod acl;
pub mod admin;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod convert;
pub mod fuzz;
pub mod http;
pub mod metrics;
pub mod registry;
pub mod relay;
pub mod server;
pub mod sniffer;
pub mod sockets;
pub mod throttle;
pub mod upstream;

pub use config::Config;
pub use server::{run, termination, Server, ServerError};
