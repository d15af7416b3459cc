//! Sans-IO wire formats: the MPTCP option (TCP option kind 30), and the TCP segments of captured
//! packets, read with the workspace's one IP/TCP parser and option walker ([`mptcp_wire`]).
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
