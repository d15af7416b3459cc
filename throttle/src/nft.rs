//! nftables: the proxy's table, its maps and the constant rules that look packets up in them, sent as
//! netlink batches built with libnftnl and [`mptcp_netlink::nft_set`].
//!
//! Layout (family `inet`, table name from the policy, `mptcp_proxy` by default):
//! - maps `download4` / `download6`: `proxy addr . client addr . proxy port . client port : classid`;
//! - maps `fwmark4` / `fwmark6` and `ctmark4` / `ctmark6`: the same key `: mark`;
//! - chain `postrouting` (filter, hook postrouting, priority 0): one rule per family,
//!   `meta priority set ip saddr . ip daddr . tcp sport . tcp dport map @download4`, which HTB reads as
//!   the class id;
//! - chain `output` (route, hook output, priority -150): per family `meta mark set ... map @fwmark4`
//!   and `ct mark set ... map @ctmark4`, so that `ip rule fwmark` routing sees the mark (a route chain
//!   re-routes on mark change).
//!
//! Six rules whatever the number of subflows: a packet costs two comparisons, four loads and one hash
//! lookup per rule. Subflows are map elements, added and removed in the same batches as before.

use std::net::IpAddr;

use mptcp_netlink::nft::{cstring, PayloadLoad, RegisterExpr};
use mptcp_netlink::nft_expr::{PayloadToRegister, SetLookup, REG32_00};
use mptcp_netlink::nft_set::{Field, SetSpec};
use nftnl::expr::{Cmp, CmpOp, Counter};
use nftnl::{Batch, Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table};

use crate::event::FourTuple;

pub use mptcp_netlink::nft::{finalize, parse_rule_echo, NFT_NEWRULE_MSG_TYPE};

/// Name of the chain that sets `skb->priority`.
pub const CHAIN_POSTROUTING: &str = "postrouting";
/// Name of the chain that sets marks.
pub const CHAIN_OUTPUT: &str = "output";

/// What a map sets on a subflow's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MapKind {
    /// `meta priority` (the HTB class of downloads).
    Download,
    /// `meta mark`.
    Fwmark,
    /// `ct mark`.
    CtMark,
}

impl MapKind {
    /// All kinds, in rule order.
    pub const ALL: [MapKind; 3] = [MapKind::Download, MapKind::Fwmark, MapKind::CtMark];

    fn base_name(self) -> &'static str {
        match self {
            MapKind::Download => "download",
            MapKind::Fwmark => "fwmark",
            MapKind::CtMark => "ctmark",
        }
    }
}

/// The IP version of a subflow (one map per version: keys have one length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Both.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of a subflow, `None` for mixed addresses.
    pub fn of(tuple: &FourTuple) -> Option<Self> {
        match (
            tuple.local.ip().to_canonical(),
            tuple.remote.ip().to_canonical(),
        ) {
            (IpAddr::V4(_), IpAddr::V4(_)) => Some(Family::V4),
            (IpAddr::V6(_), IpAddr::V6(_)) => Some(Family::V6),
            _ => None,
        }
    }
}

/// The map of `kind` for `family` in table `table`.
pub fn map(table: &str, kind: MapKind, family: Family) -> SetSpec {
    let addr = match family {
        Family::V4 => Field::Ipv4Addr,
        Family::V6 => Field::Ipv6Addr,
    };
    let index = MapKind::ALL
        .iter()
        .position(|k| *k == kind)
        .expect("listed")
        * 2
        + Family::ALL
            .iter()
            .position(|f| *f == family)
            .expect("listed");
    SetSpec {
        table: table.to_owned(),
        family: ProtoFamily::Inet,
        name: format!(
            "{}{}",
            kind.base_name(),
            if family == Family::V4 { 4 } else { 6 }
        ),
        key: vec![addr, addr, Field::InetService, Field::InetService],
        data: Some(vec![match kind {
            MapKind::Download => Field::ClassId,
            MapKind::Fwmark | MapKind::CtMark => Field::Mark,
        }]),
        counter: false,
        // The core keeps below max_steered_subflows; the kernel needs no limit of its own.
        size: None,
        id: 1 + index as u32,
    }
}

/// The key of a subflow's packets to the client: proxy address, client address, proxy port, client
/// port (as the packet has them: source first).
pub fn key(spec: &SetSpec, tuple: &FourTuple) -> Vec<u8> {
    let octets = |ip: IpAddr| match ip.to_canonical() {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    spec.key_bytes(&[
        &octets(tuple.local.ip()),
        &octets(tuple.remote.ip()),
        &tuple.local.port().to_be_bytes(),
        &tuple.remote.port().to_be_bytes(),
    ])
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

/// `meta nfproto <family> meta l4proto tcp`, then the four key fields into consecutive registers.
fn add_key_loads(rule: &mut Rule, family: Family) {
    let (nfproto, saddr, daddr, len) = match family {
        Family::V4 => (libc::NFPROTO_IPV4 as u8, 12, 16, 4),
        Family::V6 => (libc::NFPROTO_IPV6 as u8, 8, 24, 16),
    };
    rule.add_expr(&RegisterExpr::meta_load(libc::NFT_META_NFPROTO as u32));
    rule.add_expr(&Cmp::new(CmpOp::Eq, nfproto));
    rule.add_expr(&RegisterExpr::meta_load(libc::NFT_META_L4PROTO as u32));
    rule.add_expr(&Cmp::new(CmpOp::Eq, libc::IPPROTO_TCP as u8));
    let mut register = REG32_00;
    for load in [
        PayloadLoad::network(saddr, len),
        PayloadLoad::network(daddr, len),
        PayloadLoad::transport(0, 2),
        PayloadLoad::transport(2, 2),
    ] {
        rule.add_expr(&PayloadToRegister {
            load,
            dreg: register,
        });
        register += load.len.div_ceil(4);
    }
}

fn map_rule<'a>(chain: &'a Chain<'a>, table_name: &str, kind: MapKind, family: Family) -> Rule<'a> {
    let spec = map(table_name, kind, family);
    let mut rule = Rule::new(chain);
    add_key_loads(&mut rule, family);
    rule.add_expr(&SetLookup::of(&spec));
    rule.add_expr(&Counter);
    rule.add_expr(&match kind {
        MapKind::Download => RegisterExpr::meta_set(libc::NFT_META_PRIORITY as u32),
        MapKind::Fwmark => RegisterExpr::meta_set(libc::NFT_META_MARK as u32),
        MapKind::CtMark => RegisterExpr::ct_set(libc::NFT_CT_MARK as u32),
    });
    let _ = rule.set_comment(cstring(&format!(
        "mptcp-throttle: {} of steered subflows",
        match kind {
            MapKind::Download => "download class",
            MapKind::Fwmark => "fwmark",
            MapKind::CtMark => "ct mark",
        }
    )));
    rule
}

/// A batch that (re)creates the table with its maps, chains and rules, and no subflows: adding then
/// deleting the table first makes it work whether or not a stale table from an earlier run exists.
pub fn reset_table_batch(name: &str) -> Batch {
    let table = table(name);
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    for kind in MapKind::ALL {
        for family in Family::ALL {
            batch.add(&map(name, kind, family), MsgType::Add);
        }
    }
    let postrouting = postrouting_chain(&table);
    let output = output_chain(&table);
    batch.add(&postrouting, MsgType::Add);
    batch.add(&output, MsgType::Add);
    for family in Family::ALL {
        batch.add(
            &map_rule(&postrouting, name, MapKind::Download, family),
            MsgType::Add,
        );
        for kind in [MapKind::Fwmark, MapKind::CtMark] {
            batch.add(&map_rule(&output, name, kind, family), MsgType::Add);
        }
    }
    batch
}

/// A batch that deletes the table (and everything in it) if it exists.
pub fn delete_table_batch(name: &str) -> Batch {
    mptcp_netlink::nft::delete_table_batch(name, ProtoFamily::Inet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_key_is_the_packet_to_the_client() {
        let tuple = FourTuple {
            local: "10.0.0.1:443".parse().unwrap(),
            remote: "192.0.2.7:50000".parse().unwrap(),
        };
        let spec = map("t", MapKind::Download, Family::V4);
        assert_eq!(spec.name, "download4");
        assert_eq!(
            key(&spec, &tuple),
            [10, 0, 0, 1, 192, 0, 2, 7, 0x01, 0xbb, 0, 0, 0xc3, 0x50, 0, 0]
        );
        let ids: Vec<u32> = MapKind::ALL
            .iter()
            .flat_map(|k| Family::ALL.iter().map(|f| map("t", *k, *f).id))
            .collect();
        assert_eq!(ids, [1, 2, 3, 4, 5, 6], "distinct transaction ids");
    }
}
