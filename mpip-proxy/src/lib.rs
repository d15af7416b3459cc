//! Multipath IP (MPIP) in user space: the sans-IO core.
//!
//! MPIP (Sun et al., "Multipath IP Routing on End Devices") spreads the packets
//! of every TCP/UDP session over all pairs of interfaces between two nodes. The
//! paper's implementation is a Linux 3.10 kernel patch; this crate is the core of
//! a user-space implementation in which both ends are ours (the `mpipd` client
//! daemon and the proxy end), every path is a UDP 5-tuple, and each datagram is
//! a Control Message (CM) block followed by the inner IP packet. The wire format
//! and the protocol are specified in `PROTOCOL.md` next to this crate's
//! `Cargo.toml`.
//!
//! # What exists
//!
//! Everything here is sans-IO: no sockets, no clocks, no threads. Inputs are
//! `handle_*` calls that take the current [`time::Timestamp`]; outputs are
//! `poll_*` calls. Randomness is injected ([`scheduler::RandomSource`]).
//!
//! | Module | Contents |
//! | --- | --- |
//! | [`wire`] | CM block: [`wire::CmPacket`] zero-copy view (`new_checked` for untrusted bytes), [`wire::CmRepr`] parse/emit, [`wire::frame`] ("need more bytes" state), [`wire::WireError`] |
//! | [`time`] | [`time::Timestamp`] and the one-way delay sample |
//! | [`table::availability`] | MPIP availability / handshake state per remote endpoint |
//! | [`table::node`] | node ID ↔ UDP endpoints, observed (NAT-mapped) and announced |
//! | [`table::session`] | Session Information Table (Table II) with expiry and split session-ID space |
//! | [`table::path`] | Path Information Table (Table III) per session, delay metrics, Algorithm 1, delay-feedback queue |
//! | [`path_manager`] | discovery over every local interface × remote endpoint, heartbeats, dead-path detection and re-activation, interface up/down, address change and `IP_CHANGE` |
//! | [`scheduler`] | equation 1 weighted dispatch, single-path, selected-paths, protected-path with [`scheduler::DedupWindow`], coordinated pins (Fig. 9), Algorithm 1 timer |
//! | [`routing`] | Table IV user-defined routing rules as serde config types |
//! | [`resequencer`] | per-TCP-session re-sequencing buffer (100 segments, flush when full, timeout) |
//! | [`mss`] | MSS clamp for the encapsulation overhead and SYN MSS rewriting (IPv4/IPv6, checksum update) |
//! | [`packet`] | bounds-checked reading of inner IPv4/IPv6 TCP/UDP headers, checksums, test packet builders |
//!
//! # What does not exist yet
//!
//! - The TUN/UDP I/O shell (tokio) that drives these cores; nothing here sends or
//!   receives a packet.
//! - The `mpip-proxy` and `mpipd` binaries, their configuration files and
//!   example configs.
//! - Proxy-end HTTP serving (relaying MPIP sessions to legacy TCP servers),
//!   gateway mode, metrics.
//! - End-to-end tests in network namespaces. Today's tests run the cores on
//!   simulated links with a simulated clock.

pub mod cli;
pub mod config;
pub mod metrics;
pub mod mss;
pub mod node;
pub mod packet;
pub mod path_manager;
pub mod resequencer;
pub mod routing;
pub mod scheduler;
pub mod shell;
pub mod sys;
pub mod table;
pub mod time;
pub mod wire;
