//! nftables: the proxy's table, its chains and one rule per subflow, sent as
//! netlink batches built with libnftnl.
//!
//! Layout (family `inet`, table name from the policy, `mptcp_proxy` by default):
//! - chain `postrouting` (filter, hook postrouting, priority 0): per subflow
//!   `... meta priority set <major:minor>`, which HTB reads as the class id.
//! - chain `output` (route, hook output, priority -150): per subflow
//!   `... meta mark set <fwmark> ct mark set <ct_mark>`, so that `ip rule
//!   fwmark` routing sees the mark (a route chain re-routes on mark change).

use std::ffi::CString;
use std::net::IpAddr;

use mptcp_netlink::nft::{cstring, PayloadLoad, RegisterExpr};
use nftnl::expr::{Cmp, CmpOp, Counter, Immediate, Register};
use nftnl::{Batch, Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table};

use crate::core::SubflowRule;
use crate::event::FourTuple;

pub use mptcp_netlink::nft::{finalize, parse_rule_echo, NFT_NEWRULE_MSG_TYPE};

/// Name of the chain that sets `skb->priority`.
pub const CHAIN_POSTROUTING: &str = "postrouting";
/// Name of the chain that sets marks.
pub const CHAIN_OUTPUT: &str = "output";

/// The table object.
pub fn table(name: &str) -> Table {
    Table::new(cstring(name), ProtoFamily::Inet)
}

fn postrouting_chain(table: &Table) -> Chain<'_> {
    let mut chain = Chain::new(c"postrouting", table);
    chain.set_hook(Hook::PostRouting, 0);
    chain.set_type(ChainType::Filter);
    chain.set_policy(Policy::Accept);
    chain
}

fn output_chain(table: &Table) -> Chain<'_> {
    let mut chain = Chain::new(c"output", table);
    chain.set_hook(Hook::Out, -150);
    chain.set_type(ChainType::Route);
    chain.set_policy(Policy::Accept);
    chain
}

/// A batch that (re)creates the table empty with both chains: adding then
/// deleting the table first makes it work whether or not a stale table from
/// an earlier run exists.
pub fn reset_table_batch(name: &str) -> Batch {
    let table = table(name);
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    batch.add(&postrouting_chain(&table), MsgType::Add);
    batch.add(&output_chain(&table), MsgType::Add);
    batch
}

/// A batch that deletes the table (and everything in it) if it exists.
pub fn delete_table_batch(name: &str) -> Batch {
    mptcp_netlink::nft::delete_table_batch(name, ProtoFamily::Inet)
}

fn add_tuple_match(rule: &mut Rule, tuple: &FourTuple) {
    // Packets to the client: source is the proxy, destination the client.
    let (nfproto, saddr_offset, daddr_offset, addr_len) = match tuple.local.ip() {
        IpAddr::V4(_) => (libc::NFPROTO_IPV4 as u8, 12, 16, 4),
        IpAddr::V6(_) => (libc::NFPROTO_IPV6 as u8, 8, 24, 16),
    };
    rule.add_expr(&RegisterExpr::meta_load(libc::NFT_META_NFPROTO as u32));
    rule.add_expr(&Cmp::new(CmpOp::Eq, nfproto));
    rule.add_expr(&RegisterExpr::meta_load(libc::NFT_META_L4PROTO as u32));
    rule.add_expr(&Cmp::new(CmpOp::Eq, libc::IPPROTO_TCP as u8));
    let addr_bytes = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    for (offset, ip) in [
        (saddr_offset, tuple.local.ip()),
        (daddr_offset, tuple.remote.ip()),
    ] {
        rule.add_expr(&PayloadLoad::network(offset, addr_len));
        let bytes = addr_bytes(ip);
        rule.add_expr(&Cmp::new(CmpOp::Eq, &bytes[..]));
    }
    for (offset, port) in [(0, tuple.local.port()), (2, tuple.remote.port())] {
        rule.add_expr(&PayloadLoad::transport(offset, 2));
        let bytes = port.to_be_bytes();
        rule.add_expr(&Cmp::new(CmpOp::Eq, &bytes[..]));
    }
}

fn comment(subflow: &SubflowRule) -> CString {
    let name = subflow.rule_name.as_deref().unwrap_or("");
    cstring(&format!(
        "mptcp-throttle token={} rule={}{}{}",
        subflow.token,
        subflow.rule_index,
        if name.is_empty() { "" } else { " " },
        name
    ))
}

/// Which chain a rule went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleChain {
    /// `postrouting` (priority).
    Postrouting,
    /// `output` (marks).
    Output,
}

impl RuleChain {
    /// The chain's name.
    pub fn name(self) -> &'static str {
        match self {
            RuleChain::Postrouting => CHAIN_POSTROUTING,
            RuleChain::Output => CHAIN_OUTPUT,
        }
    }
}

/// Adds the nft rules of a subflow to `batch`; returns the chains used, in
/// the order of the messages added.
pub fn add_subflow_rules(
    batch: &mut Batch,
    table_name: &str,
    subflow: &SubflowRule,
) -> Vec<RuleChain> {
    let table = table(table_name);
    let mut used = Vec::new();
    if let Some(class) = &subflow.download {
        let chain = postrouting_chain(&table);
        let mut rule = Rule::new(&chain);
        add_tuple_match(&mut rule, &subflow.tuple);
        rule.add_expr(&Counter);
        rule.add_expr(&Immediate::new(class.id.handle(), Register::Reg1));
        rule.add_expr(&RegisterExpr::meta_set(libc::NFT_META_PRIORITY as u32));
        let _ = rule.set_comment(comment(subflow));
        batch.add(&rule, MsgType::Add);
        used.push(RuleChain::Postrouting);
    }
    if subflow.fwmark.is_some() || subflow.ct_mark.is_some() {
        let chain = output_chain(&table);
        let mut rule = Rule::new(&chain);
        add_tuple_match(&mut rule, &subflow.tuple);
        rule.add_expr(&Counter);
        if let Some(mark) = subflow.fwmark {
            rule.add_expr(&Immediate::new(mark, Register::Reg1));
            rule.add_expr(&RegisterExpr::meta_set(libc::NFT_META_MARK as u32));
        }
        if let Some(mark) = subflow.ct_mark {
            rule.add_expr(&Immediate::new(mark, Register::Reg1));
            rule.add_expr(&RegisterExpr::ct_set(libc::NFT_CT_MARK as u32));
        }
        let _ = rule.set_comment(comment(subflow));
        batch.add(&rule, MsgType::Add);
        used.push(RuleChain::Output);
    }
    used
}

/// Adds the deletion of rule `handle` in `chain` to `batch`.
pub fn delete_rule(batch: &mut Batch, table_name: &str, chain: RuleChain, handle: u64) {
    let table = table(table_name);
    let chain = match chain {
        RuleChain::Postrouting => postrouting_chain(&table),
        RuleChain::Output => output_chain(&table),
    };
    let mut rule = Rule::new(&chain);
    rule.set_handle(handle);
    batch.add(&rule, MsgType::Del);
}
