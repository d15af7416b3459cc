//! nftables: the proxy's table, its chains and one rule per subflow, sent as
//! netlink batches built with libnftnl.
//!
//! Layout (family `inet`, table name from the policy, `mptcp_proxy` by default):
//! - chain `postrouting` (filter, hook postrouting, priority 0): per subflow
//!   `... meta priority set <major:minor>`, which HTB reads as the class id.
//! - chain `output` (route, hook output, priority -150): per subflow
//!   `... meta mark set <fwmark> ct mark set <ct_mark>`, so that `ip rule
//!   fwmark` routing sees the mark (a route chain re-routes on mark change).

use std::ffi::{CStr, CString};
use std::net::IpAddr;
use std::ptr::NonNull;

use nftnl::expr::{Cmp, CmpOp, Counter, Expression, Immediate, Register};
use nftnl::nftnl_sys as sys;
use nftnl::{Batch, Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table};

use crate::core::SubflowRule;
use crate::event::FourTuple;

/// Name of the chain that sets `skb->priority`.
pub const CHAIN_POSTROUTING: &str = "postrouting";
/// Name of the chain that sets marks.
pub const CHAIN_OUTPUT: &str = "output";

/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE`.
pub const NFT_NEWRULE_MSG_TYPE: u16 = (10 << 8) | 6;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;

/// `payload load` into register 1.
struct PayloadLoad {
    base: u32,
    offset: u32,
    len: u32,
}

fn alloc_expr(name: &CStr) -> NonNull<sys::nftnl_expr> {
    // SAFETY: name is a valid C string; allocation failure is handled.
    let raw = unsafe { sys::nftnl_expr_alloc(name.as_ptr()) };
    NonNull::new(raw).expect("nftnl_expr_alloc: out of memory")
}

impl Expression for PayloadLoad {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"payload");
        // SAFETY: expr is a live payload expression; the attributes are u32.
        unsafe {
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_PAYLOAD_DREG as u16,
                libc::NFT_REG_1 as u32,
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_PAYLOAD_BASE as u16,
                self.base,
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_PAYLOAD_OFFSET as u16,
                self.offset,
            );
            sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_PAYLOAD_LEN as u16, self.len);
        }
        expr
    }
}

/// A `meta` or `ct` expression that moves one key between the packet and register 1: `meta <key>`
/// (a load), `meta <key> set` and `ct <key> set` (stores). nftnl only offers `meta mark set`; HTB
/// needs `meta priority set`.
pub struct RegisterExpr {
    name: &'static std::ffi::CStr,
    key_attr: u32,
    key: u32,
    register_attr: u32,
}

impl RegisterExpr {
    /// `meta <key>` into register 1.
    fn meta_load(key: u32) -> Self {
        Self {
            name: c"meta",
            key_attr: sys::NFTNL_EXPR_META_KEY,
            key,
            register_attr: sys::NFTNL_EXPR_META_DREG,
        }
    }

    /// `meta <key> set` from register 1 (`priority` selects the HTB class, `mark` the fwmark).
    pub fn meta_set(key: u32) -> Self {
        Self {
            name: c"meta",
            key_attr: sys::NFTNL_EXPR_META_KEY,
            key,
            register_attr: sys::NFTNL_EXPR_META_SREG,
        }
    }

    /// `ct <key> set` from register 1.
    pub fn ct_set(key: u32) -> Self {
        Self {
            name: c"ct",
            key_attr: sys::NFTNL_EXPR_CT_KEY,
            key,
            register_attr: sys::NFTNL_EXPR_CT_SREG,
        }
    }
}

impl Expression for RegisterExpr {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(self.name);
        // SAFETY: expr is a live expression of this kind; both attributes are u32.
        unsafe {
            sys::nftnl_expr_set_u32(expr.as_ptr(), self.key_attr as u16, self.key);
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                self.register_attr as u16,
                libc::NFT_REG_1 as u32,
            );
        }
        expr
    }
}

fn cstring(text: &str) -> CString {
    CString::new(text.replace('\0', "")).expect("NUL bytes removed")
}

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
    let table = table(name);
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch
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
        rule.add_expr(&PayloadLoad {
            base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
            offset,
            len: addr_len,
        });
        let bytes = addr_bytes(ip);
        rule.add_expr(&Cmp::new(CmpOp::Eq, &bytes[..]));
    }
    for (offset, port) in [(0, tuple.local.port()), (2, tuple.remote.port())] {
        rule.add_expr(&PayloadLoad {
            base: libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
            offset,
            len: 2,
        });
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

/// A finalized batch as one buffer, with `NLM_F_ECHO` set on rule additions
/// so the kernel reports their handles. Returns the bytes, the sequence
/// numbers of messages that request an ack, and those of rule additions.
pub fn finalize(batch: Batch) -> (Vec<u8>, Vec<u32>, Vec<u32>) {
    let finalized = batch.finalize();
    let mut bytes = Vec::new();
    for chunk in &finalized {
        bytes.extend_from_slice(chunk);
    }
    let mut acked = Vec::new();
    let mut rule_adds = Vec::new();
    let mut pos = 0;
    while pos + 16 <= bytes.len() {
        let len = u32::from_ne_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        if len < 16 {
            break;
        }
        let msg_type = u16::from_ne_bytes([bytes[pos + 4], bytes[pos + 5]]);
        let mut flags = u16::from_ne_bytes([bytes[pos + 6], bytes[pos + 7]]);
        let seq = u32::from_ne_bytes(bytes[pos + 8..pos + 12].try_into().expect("4 bytes"));
        if msg_type == NFT_NEWRULE_MSG_TYPE {
            flags |= crate::netlink::NLM_F_ECHO;
            bytes[pos + 6..pos + 8].copy_from_slice(&flags.to_ne_bytes());
            rule_adds.push(seq);
        }
        if flags & crate::netlink::NLM_F_ACK != 0 {
            acked.push(seq);
        }
        pos += (len + 3) & !3;
    }
    (bytes, acked, rule_adds)
}

/// Reads an echoed `NEWRULE`: chain name and handle.
pub fn parse_rule_echo(payload: &[u8]) -> Option<(String, u64)> {
    let attrs = crate::netlink::parse_attrs(payload.get(4..)?);
    let chain = attrs
        .iter()
        .find(|(k, _)| *k == NFTA_RULE_CHAIN)
        .map(|(_, v)| crate::netlink::attr_string(v))?;
    let handle = attrs
        .iter()
        .find(|(k, _)| *k == NFTA_RULE_HANDLE)
        .and_then(|(_, v)| v.get(..8))
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))?;
    Some((chain, handle))
}
