//! The detour's nftables table: DNAT and SNAT for every mapping through one map, so the packet path is
//! three fixed rules whatever the number of mappings (a hash lookup each), and conntrack carries the
//! replies.
//!
//! ```text
//! table ip NAME {
//!     map mappings {
//!         type ipv4_addr . inet_service : ipv4_addr . inet_service    # (client, dpt) : (rip, rpt)
//!         counter                                                      # bytes per mapping
//!     }
//!     chain prerouting {
//!         type nat hook prerouting priority dstnat; policy accept;
//!         fib daddr type local meta l4proto tcp dnat ip to ip saddr . tcp dport map @mappings
//!     }
//!     chain postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ct status dnat ct original ip saddr . ct original proto-dst @mappings masquerade
//!     }
//!     chain forward {
//!         type filter hook forward priority filter; policy accept;
//!         ct status dnat ct original ip saddr . ct original proto-dst @mappings
//!     }
//! }
//! ```
//!
//! NAT chains only see a connection's first packet, so the forward chain's lookup is what counts
//! traffic: it finds the mapping of both directions (the `ct original` tuple is the client's) and bumps
//! the element's counter. (`nft` 1.0.6 cannot parse `ct original proto-dst` inside a concatenation, so
//! it lists those two rules but cannot load them from text; the kernel takes them from netlink.)

use std::net::Ipv4Addr;

use mptcp_netlink::nft::{cstring, PayloadLoad};
use mptcp_netlink::nft_expr::{
    CtLoad, FibDaddrType, NatFromRegisters, PayloadToRegister, SetLookup, CT_DIR_ORIGINAL,
    REG32_00, REG32_01, REG_1, RTN_LOCAL,
};
use mptcp_netlink::nft_set::{self, Field, SetSpec};
use mptcp_netlink::NetlinkError;
use nftnl::expr::{Bitwise, Cmp, CmpOp, Masquerade, Meta};
use nftnl::{Batch, Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table};

use super::core::Mapping;

/// The map's name.
pub const MAP: &str = "mappings";
/// The chains, in the order they are created.
pub const CHAINS: [&str; 3] = ["prerouting", "postrouting", "forward"];
/// How many rules the table has (whatever the number of mappings).
pub const RULES: usize = 3;

/// `IPS_DST_NAT` in `ct status`.
const IPS_DST_NAT: u32 = 1 << 5;

/// The table of one detour host.
#[derive(Debug, Clone)]
pub struct NatTable {
    name: String,
}

fn key(client: Ipv4Addr, port: u16) -> [u8; 8] {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&client.octets());
    bytes[4..6].copy_from_slice(&port.to_be_bytes());
    bytes
}

fn map_spec(table: &str) -> SetSpec {
    let pair = vec![Field::Ipv4Addr, Field::InetService];
    let mut spec = SetSpec::map(table, ProtoFamily::Ipv4, MAP, pair.clone(), pair);
    spec.counter = true;
    spec
}

/// `ct status dnat`: the connection's destination was translated.
fn add_ct_status_dnat(rule: &mut Rule) {
    rule.add_expr(&CtLoad {
        key: libc::NFT_CT_STATUS as u32,
        direction: None,
        dreg: REG_1,
    });
    rule.add_expr(&Bitwise::new(
        &IPS_DST_NAT.to_ne_bytes()[..],
        &0u32.to_ne_bytes()[..],
    ));
    rule.add_expr(&Cmp::new(CmpOp::Neq, &0u32.to_ne_bytes()[..]));
}

/// `ct original ip saddr . ct original proto-dst` into registers 1 (the mapping's key of both
/// directions of a detoured connection).
fn add_original_key(rule: &mut Rule) {
    rule.add_expr(&CtLoad {
        key: libc::NFT_CT_SRC_IP as u32,
        direction: Some(CT_DIR_ORIGINAL),
        dreg: REG32_00,
    });
    rule.add_expr(&CtLoad {
        key: libc::NFT_CT_PROTO_DST as u32,
        direction: Some(CT_DIR_ORIGINAL),
        dreg: REG32_01,
    });
}

impl NatTable {
    /// The table `ip NAME` (not yet installed).
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// One transaction: delete a table of that name left by an earlier run, then create the map and the
    /// three chains with their rules.
    pub fn install(&self) -> Result<(), NetlinkError> {
        let table = Table::new(cstring(&self.name), ProtoFamily::Ipv4);
        let mut batch = Batch::new();
        batch.add(&table, MsgType::Add);
        batch.add(&table, MsgType::Del);
        batch.add(&table, MsgType::Add);
        batch.add(&map_spec(&self.name), MsgType::Add);

        let mut prerouting = Chain::new(c"prerouting", &table);
        prerouting.set_hook(Hook::PreRouting, -100);
        prerouting.set_type(ChainType::Nat);
        prerouting.set_policy(Policy::Accept);
        batch.add(&prerouting, MsgType::Add);
        let mut postrouting = Chain::new(c"postrouting", &table);
        postrouting.set_hook(Hook::PostRouting, 100);
        postrouting.set_type(ChainType::Nat);
        postrouting.set_policy(Policy::Accept);
        batch.add(&postrouting, MsgType::Add);
        let mut forward = Chain::new(c"forward", &table);
        forward.set_hook(Hook::Forward, 0);
        forward.set_type(ChainType::Filter);
        forward.set_policy(Policy::Accept);
        batch.add(&forward, MsgType::Add);

        // fib daddr type local meta l4proto tcp dnat ip to ip saddr . tcp dport map @mappings
        let mut rule = Rule::new(&prerouting);
        rule.add_expr(&FibDaddrType);
        rule.add_expr(&Cmp::new(CmpOp::Eq, &RTN_LOCAL.to_ne_bytes()[..]));
        rule.add_expr(&Meta::L4Proto);
        rule.add_expr(&Cmp::new(CmpOp::Eq, &[libc::IPPROTO_TCP as u8][..]));
        rule.add_expr(&PayloadToRegister {
            load: PayloadLoad::network(12, 4),
            dreg: REG32_00,
        });
        rule.add_expr(&PayloadToRegister {
            load: PayloadLoad::transport(2, 2),
            dreg: REG32_01,
        });
        rule.add_expr(&SetLookup::map(MAP));
        rule.add_expr(&NatFromRegisters {
            nat_type: libc::NFT_NAT_DNAT,
            family: libc::NFPROTO_IPV4 as u32,
            addr_reg: REG32_00,
            port_reg: Some(REG32_01),
        });
        batch.add(&rule, MsgType::Add);

        // ct status dnat ct original ip saddr . ct original proto-dst @mappings masquerade
        let mut rule = Rule::new(&postrouting);
        add_ct_status_dnat(&mut rule);
        add_original_key(&mut rule);
        rule.add_expr(&SetLookup::new(MAP));
        rule.add_expr(&Masquerade);
        batch.add(&rule, MsgType::Add);

        // ct status dnat ct original ip saddr . ct original proto-dst @mappings (counts per mapping)
        let mut rule = Rule::new(&forward);
        add_ct_status_dnat(&mut rule);
        add_original_key(&mut rule);
        rule.add_expr(&SetLookup::new(MAP));
        batch.add(&rule, MsgType::Add);

        mptcp_netlink::nft::send_batch(batch, &format!("install table ip {}", self.name))?;
        Ok(())
    }

    /// Deletes the table (and with it every mapping) if it exists.
    pub fn remove(&self) -> Result<(), NetlinkError> {
        mptcp_netlink::nft::send_batch(
            mptcp_netlink::nft::delete_table_batch(&self.name, ProtoFamily::Ipv4),
            &format!("delete table ip {}", self.name),
        )?;
        Ok(())
    }

    /// Adds mappings in one transaction; a mapping whose key is already installed fails it.
    pub fn add(&self, mappings: &[Mapping]) -> Result<(), NetlinkError> {
        let elements: Vec<_> = mappings
            .iter()
            .map(|m| (key(m.client, m.dpt), key(m.rip, m.rpt)))
            .collect();
        let mut batch = Batch::new();
        map_spec(&self.name).add_new_elements(
            &mut batch,
            elements.iter().map(|(k, data)| (&k[..], Some(&data[..]))),
        );
        mptcp_netlink::nft::send_batch(batch, "add mapping")?;
        Ok(())
    }

    /// Deletes mappings in one transaction.
    pub fn delete(&self, mappings: &[Mapping]) -> Result<(), NetlinkError> {
        let keys: Vec<_> = mappings.iter().map(|m| key(m.client, m.dpt)).collect();
        let mut batch = Batch::new();
        map_spec(&self.name).delete_elements(&mut batch, keys.iter().map(|k| &k[..]));
        mptcp_netlink::nft::send_batch(batch, "delete mapping")?;
        Ok(())
    }

    /// Every mapping in the kernel with its counter: `(client, dpt, rip, rpt, packets, bytes)`.
    pub fn counters(&self) -> Result<Vec<(Mapping, u64, u64)>, NetlinkError> {
        let elements = nft_set::dump_elements(&self.name, ProtoFamily::Ipv4, MAP)?;
        Ok(elements
            .into_iter()
            .filter_map(|e| {
                let (client, dpt) = split_key(&e.key)?;
                let (rip, rpt) = split_key(e.data.as_deref()?)?;
                let (packets, bytes) = e.counter.unwrap_or((0, 0));
                Some((
                    Mapping {
                        client,
                        dpt,
                        rip,
                        rpt,
                    },
                    packets,
                    bytes,
                ))
            })
            .collect())
    }
}

fn split_key(bytes: &[u8]) -> Option<(Ipv4Addr, u16)> {
    let addr: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    let port = bytes.get(4..6)?;
    Some((Ipv4Addr::from(addr), u16::from_be_bytes([port[0], port[1]])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_address_then_port_padded() {
        let k = key(Ipv4Addr::new(10, 0, 0, 1), 80);
        assert_eq!(k, [10, 0, 0, 1, 0, 80, 0, 0]);
        assert_eq!(split_key(&k), Some((Ipv4Addr::new(10, 0, 0, 1), 80)));
        assert_eq!(split_key(&k[..5]), None);
    }
}
