//! Sans-IO wire formats: the MPTCP option (TCP option kind 30), a TCP options walker and minimal
//! IPv4/IPv6/TCP header views used to find MPTCP options in captured packets.
//!
//! Every view follows the smoltcp pattern: `Packet::new_unchecked` wraps a buffer,
//! `Packet::new_checked` is the only constructor for untrusted bytes, and `*Repr` structs
//! give a high-level, owned representation with `parse`, `emit` and `buffer_len`.

pub mod ip;
pub mod mptcp;
pub mod tcp_options;

pub use ip::{IpError, Segment, TcpFlags};
pub use mptcp::{MptcpError, MptcpRepr, Packet as MptcpPacket, Subtype};
pub use tcp_options::{TcpOption, TcpOptionIter, TcpOptionsError};
