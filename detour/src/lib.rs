//! Detour routing over Multipath TCP (seeds 003 and 004: Brennan, *Exploring Alternative Routes Using
//! Multipath TCP*), built in user space on today's kernel: the userspace MPTCP path manager replaces
//! the thesis's kernel patch.
//!
//! - [`wire`]: the NAT detour request of the thesis's Fig. 4.3 (version 1) and its authenticated
//!   version 2.
//! - [`key`]: pre-shared keys, HMAC-SHA256 signing and checking.
//! - [`host`]: `mptcp-detourd`, the NAT detour host.
//! - [`client`]: `mptcp-detour`, the client daemon and its userspace path manager.
//! - [`config`], [`admin`], [`cli`]: what both daemons share (configuration helpers, the metrics listener,
//!   the binaries' main).

pub mod admin;
pub mod cli;
pub mod client;
pub mod config;
pub mod host;
pub mod key;
pub mod wire;
