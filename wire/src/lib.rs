//! The workspace's one parser of IPv4, IPv6, TCP and UDP headers, its one
//! Internet checksum and its one TCP option walker: the MPTCP sniffer reads
//! captured packets with them, MPIP its inner packets (re-sequencing, MSS
//! clamping, header compression, TUN offloads).
//!
//! Sans-IO and allocation-free. [`ip::IpHeader::parse`] is strict about what
//! it reads (a header that does not fit is an error, "need more bytes" is
//! the caller's) and leaves policy to the caller: a capture may be cut by
//! its snap length or carry a 0 total length (segmentation offload), a
//! forwarded packet may not.

pub mod checksum;
pub mod ip;
pub mod tcp_options;

pub use ip::{IpError, IpHeader, TcpHeader, UdpHeader};
pub use tcp_options::{TcpOption, TcpOptionIter, TcpOptionsError};
