//! Walker over the options area of a TCP header: the workspace's one
//! ([`mptcp_wire::tcp_options`]), which MPIP's MSS clamp uses too.

pub use mptcp_wire::tcp_options::{TcpOption, TcpOptionIter, TcpOptionsError, KIND_END, KIND_NOP};
