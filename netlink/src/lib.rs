//! The workspace's one netlink layer, used by the throttle, MPIP, the proxy and the detour daemons:
//!
//! - [`socket`] (re-exported at the root): a blocking netlink socket of any protocol, a message builder
//!   and attribute walkers; rtnetlink, nfnetlink and generic netlink all share this framing.
//! - [`genl`]: generic netlink family resolution.
//! - [`bpf`]: `bpf(2)` maps and programs, and a small eBPF assembler (cls_bpf classifiers).
//! - [`mptcp_pm`]: the kernel's MPTCP path manager family: events, endpoints and userspace-PM commands.
//! - [`nft`]: nftables batches over libnftnl, with the expressions nftnl lacks.
//! - [`nft_set`]: named sets and maps (concatenated keys and data, per-element counters), their
//!   elements (added, deleted and flushed in batches of any size), and element dumps with counters.
//! - [`nft_expr`]: expressions with explicit registers: payload loads for concatenated keys, set and
//!   map lookups, NAT from a map, `ct` loads, `fib`, TCP MSS rewriting.
//! - [`sock_diag`]: `inet_diag` dumps of TCP sockets: the MPTCP subflows among them, listening ports.
//! - [`nfqueue`]: `nfnetlink_queue`, packets queued to user space and their verdicts.
//! - [`rtnl`]: rtnetlink link and address requests (link up, add and delete an address).
//!
//! Every call acts on the network namespace of the calling thread.

pub mod bpf;
pub mod genl;
pub mod mptcp_pm;
pub mod nfqueue;
pub mod nft;
pub mod nft_expr;
pub mod nft_set;
pub mod rtnl;
pub mod sock_diag;
pub mod socket;

pub use crate::socket::*;
