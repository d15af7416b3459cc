//! Multipath IP (MPIP) in user space: the `mpipd` client end and the `mpip-proxy` proxy end.
//!
//! MPIP (Sun et al., "Multipath IP Routing on End Devices") spreads the packets
//! of every TCP/UDP session over all pairs of interfaces between two nodes. The
//! paper's implementation is a Linux 3.10 kernel patch; this crate is
//! a user-space implementation in which both ends are ours (the `mpipd` client
//! daemon and the proxy end), every path is a UDP 5-tuple, and each datagram is
//! a Control Message (CM) block followed by the inner IP packet. The wire format
//! and the protocol are specified in `PROTOCOL.md` next to this crate's
//! `Cargo.toml`.
//!
//! # Layout
//!
//! The protocol state is sans-IO: no sockets, no clocks, no threads. Inputs are
//! `handle_*` calls that take the current [`time::Timestamp`]; outputs are
//! `poll_*` calls. Randomness is injected ([`scheduler::RandomSource`]).
//!
//! | Module | Contents |
//! | --- | --- |
//! | [`wire`] | CM block: [`wire::CmPacket`] zero-copy view (`new_checked` for untrusted bytes), [`wire::CmRepr`] parse/emit, [`wire::frame`] ("need more bytes" state), the Address Assignment payload |
//! | [`time`] | [`time::Timestamp`] and the one-way delay sample |
//! | [`table`] | availability (handshake), node ↔ endpoints, Session Information Table (Table II), Path Information Table (Table III) |
//! | [`path_manager`] | discovery, heartbeats, dead-path detection and re-activation, interface events, address change |
//! | [`scheduler`], [`routing`] | equation 1, Algorithm 1, single/selected/protected modes, Table IV with path pins |
//! | [`resequencer`], [`mss`] | TCP re-sequencing and MSS clamping |
//! | [`packet`] | bounds-checked inner IPv4/IPv6 TCP/UDP headers, checksums, test packet builders |
//! | [`auth`] | shared keys, the HMAC tag of version-2 CM blocks, the replay window, handshake rate limits |
//! | [`node`] | one node: all of the above composed into the data path |
//! | [`offload`] | TUN offloads: the virtio header, checksum completion, TCP segmentation |
//!
//! The I/O side: [`shell`] drives a [`node::Node`] with a TUN device and path
//! sockets through [`sys`]; [`config`] is both binaries' configuration,
//! [`metrics`] their `mpip_*` metrics and [`cli`] what the binaries share.

pub mod auth;
pub mod cli;
pub mod config;
pub mod fuzz;
pub mod metrics;
pub mod mss;
pub mod node;
pub mod offload;
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
