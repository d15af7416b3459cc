//! The workspace's one netlink layer, used by the throttle, MPIP, the proxy and the detour daemons:
//!
//! - [`socket`] (re-exported at the root): a blocking netlink socket of any protocol, a message builder
//!   and attribute walkers; rtnetlink, nfnetlink and generic netlink all share this framing.
//! - [`genl`]: generic netlink family resolution.
//! - [`bpf`]: `bpf(2)` maps and programs, and a small eBPF assembler (cls_bpf classifiers).
//! - [`mptcp_pm`]: the kernel's MPTCP path manager family: events, endpoints and userspace-PM commands.
//! - [`nft`]: nftables batches over libnftnl, with the expressions nftnl lacks.
//! - [`nft_map`]: named sets and maps with concatenated keys, their elements, and `lookup`.
//! - [`sock_diag`]: `inet_diag` dumps of TCP sockets and the MPTCP subflows among them.
//! - [`nfqueue`]: `nfnetlink_queue`, packets queued to user space and their verdicts.
//! - [`rtnl`]: rtnetlink link and address requests (link up, add and delete an address).
//!
//! Every call acts on the network namespace of the calling thread.

pub mod bpf;
pub mod genl;
pub mod mptcp_pm;
pub mod nfqueue;
pub mod nft;
pub mod nft_map;
pub mod rtnl;
pub mod sock_diag;
pub mod socket;

pub use crate::socket::*;
