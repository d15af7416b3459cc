//! Traffic-control messages: HTB qdiscs and classes, the ingress redirect to
//! an IFB device, and per-subflow u32 filters on the IFB's HTB.
//!
//! netlink-packet-route does not model HTB, so messages are encoded here
//! directly (struct layouts from `linux/pkt_sched.h` and `linux/pkt_cls.h`).
//! Class rates are given as `tc_ratespec` with `linklayer = ethernet` and no
//! rate tables: since Linux 3.8 HTB computes transmit times itself
//! (`psched_ratecfg_precompute`) and only reads `TCA_HTB_RTAB` for
//! `linklayer = unaware` requests from old iproute2. Rates of 2^32 bytes/s and
//! more go into `TCA_HTB_RATE64` / `TCA_HTB_CEIL64`.

use std::net::IpAddr;

use crate::core::{ClassId, ClassSpec};
use crate::event::FourTuple;
use mptcp_netlink::{MessageBuilder, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};

/// `RTM_NEWLINK`.
pub const RTM_NEWLINK: u16 = 16;
/// `RTM_DELLINK`.
pub const RTM_DELLINK: u16 = 17;
/// `RTM_GETLINK`.
pub const RTM_GETLINK: u16 = 18;
/// `RTM_GETADDR`.
pub const RTM_GETADDR: u16 = 22;
/// `RTM_NEWQDISC`.
pub const RTM_NEWQDISC: u16 = 36;
/// `RTM_DELQDISC`.
pub const RTM_DELQDISC: u16 = 37;
/// `RTM_GETQDISC`.
pub const RTM_GETQDISC: u16 = 38;
/// `RTM_NEWTCLASS`.
pub const RTM_NEWTCLASS: u16 = 40;
/// `RTM_DELTCLASS`.
pub const RTM_DELTCLASS: u16 = 41;
/// `RTM_NEWTFILTER`.
pub const RTM_NEWTFILTER: u16 = 44;
/// `RTM_DELTFILTER`.
pub const RTM_DELTFILTER: u16 = 45;
/// `RTM_GETTFILTER`.
pub const RTM_GETTFILTER: u16 = 46;

/// `TC_H_ROOT`.
pub const TC_H_ROOT: u32 = 0xffff_ffff;
/// `TC_H_INGRESS`.
pub const TC_H_INGRESS: u32 = 0xffff_fff1;
/// Handle of the ingress qdisc (`ffff:`).
pub const INGRESS_HANDLE: u32 = 0xffff_0000;

const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_HTB_PARMS: u16 = 1;
const TCA_HTB_INIT: u16 = 2;
const TCA_HTB_RATE64: u16 = 6;
const TCA_HTB_CEIL64: u16 = 7;
const TC_HTB_PROTOVER: u32 = 3;
const TC_LINKLAYER_ETHERNET: u8 = 1;
const TCA_U32_CLASSID: u16 = 1;
const TCA_U32_SEL: u16 = 5;
const TCA_U32_ACT: u16 = 7;
const TC_U32_TERMINAL: u8 = 1;
const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;
const TCA_MIRRED_PARMS: u16 = 2;
const TC_ACT_STOLEN: i32 = 4;
const TCA_EGRESS_REDIR: i32 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;

/// `ETH_P_ALL`.
pub const ETH_P_ALL: u16 = 0x0003;
/// `ETH_P_IP`.
pub const ETH_P_IP: u16 = 0x0800;
/// `ETH_P_IPV6`.
pub const ETH_P_IPV6: u16 = 0x86dd;

/// `struct tcmsg`.
pub fn tcmsg(ifindex: u32, handle: u32, parent: u32, info: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0] = libc::AF_UNSPEC as u8;
    out[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    out[8..12].copy_from_slice(&handle.to_ne_bytes());
    out[12..16].copy_from_slice(&parent.to_ne_bytes());
    out[16..20].copy_from_slice(&info.to_ne_bytes());
    out
}

/// `struct ifinfomsg`.
pub fn ifinfomsg(ifindex: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0] = libc::AF_UNSPEC as u8;
    out[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    out[8..12].copy_from_slice(&flags.to_ne_bytes());
    out[12..16].copy_from_slice(&change.to_ne_bytes());
    out
}

/// The filter `info` field: priority and protocol (network order).
pub fn filter_info(prio: u16, protocol: u16) -> u32 {
    (u32::from(prio) << 16) | u32::from(protocol.to_be())
}

/// Creates (or replaces) the HTB root qdisc `major:` on `ifindex`.
/// Unclassified traffic is not shaped (`default 0` sends it direct).
pub fn htb_root(ifindex: u32, major: u16) -> MessageBuilder {
    let mut glob = Vec::with_capacity(20);
    for value in [TC_HTB_PROTOVER, 10, 0, 0, 0] {
        // version, rate2quantum (tc default 10), defcls 0, debug, direct_pkts
        glob.extend_from_slice(&value.to_ne_bytes());
    }
    MessageBuilder::new(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_REPLACE)
        .header(&tcmsg(ifindex, u32::from(major) << 16, TC_H_ROOT, 0))
        .attr_str(TCA_KIND, "htb")
        .begin_nest(TCA_OPTIONS)
        .attr(TCA_HTB_INIT, &glob)
        .end_nest()
}

/// Deletes the root qdisc of `ifindex`.
pub fn delete_root(ifindex: u32) -> MessageBuilder {
    MessageBuilder::new(RTM_DELQDISC, 0).header(&tcmsg(ifindex, 0, TC_H_ROOT, 0))
}

/// Creates the ingress qdisc of `ifindex` (fails with `EEXIST` if present).
pub fn ingress_qdisc(ifindex: u32) -> MessageBuilder {
    MessageBuilder::new(RTM_NEWQDISC, NLM_F_CREATE | NLM_F_EXCL)
        .header(&tcmsg(ifindex, INGRESS_HANDLE, TC_H_INGRESS, 0))
        .attr_str(TCA_KIND, "ingress")
}

/// Deletes the ingress qdisc of `ifindex`.
pub fn delete_ingress(ifindex: u32) -> MessageBuilder {
    MessageBuilder::new(RTM_DELQDISC, 0).header(&tcmsg(ifindex, INGRESS_HANDLE, TC_H_INGRESS, 0))
}

/// Kernel clock facts from `/proc/net/psched`, as iproute2 reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PschedClock {
    /// Scheduler ticks per microsecond (15.625 on current kernels).
    pub ticks_per_usec: f64,
}

impl PschedClock {
    /// Reads `/proc/net/psched`; falls back to the value of every kernel since
    /// 2.6.32 with high-resolution timers (64 ns ticks).
    pub fn read() -> Self {
        let text = std::fs::read_to_string("/proc/net/psched").unwrap_or_default();
        Self::parse(&text).unwrap_or(Self {
            ticks_per_usec: 1000.0 / 64.0,
        })
    }

    /// Parses the file's text (iproute2 `tc_core_init`).
    pub fn parse(text: &str) -> Option<Self> {
        let fields: Vec<u64> = text
            .split_whitespace()
            .filter_map(|f| u64::from_str_radix(f, 16).ok())
            .collect();
        let (t2us, us2t, clock_res) = (*fields.first()?, *fields.get(1)?, *fields.get(2)?);
        if us2t == 0 {
            return None;
        }
        let t2us = if clock_res == 1_000_000_000 {
            us2t
        } else {
            t2us
        };
        let clock_factor = clock_res as f64 / 1_000_000.0;
        Some(Self {
            ticks_per_usec: t2us as f64 / us2t as f64 * clock_factor,
        })
    }

    /// Ticks needed to send `bytes` at `bytes_per_second` (`tc_calc_xmittime`).
    pub fn xmit_ticks(self, bytes_per_second: u64, bytes: u64) -> u32 {
        let usec = 1_000_000.0 * bytes as f64 / bytes_per_second.max(1) as f64;
        (usec * self.ticks_per_usec).min(u32::MAX as f64) as u32
    }
}

/// Default burst as `tc` computes it: `rate / HZ + mtu` with a high-resolution
/// timer (HZ = 10^9) is the MTU iproute2 assumes, 1600 bytes.
pub const DEFAULT_BURST_BYTES: u64 = 1600;

fn ratespec(bytes_per_second: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[1] = TC_LINKLAYER_ETHERNET;
    let rate32 = u32::try_from(bytes_per_second).unwrap_or(u32::MAX);
    out[8..12].copy_from_slice(&rate32.to_ne_bytes());
    out
}

/// `struct tc_htb_opt` for a class.
pub fn htb_opt(spec: &ClassSpec, clock: PschedClock) -> Vec<u8> {
    let rate = spec.rate.bytes_per_second().max(1);
    let ceil = spec.ceil.bytes_per_second().max(rate);
    let burst = spec.burst.map_or(DEFAULT_BURST_BYTES, |b| b.bytes());
    let cburst = spec.burst.map_or(DEFAULT_BURST_BYTES, |b| b.bytes());
    // Quantum as the kernel would derive it (rate / r2q), kept within the
    // bounds it warns about, so no "quantum is big" messages.
    let quantum = (rate / 10).clamp(1000, 200_000) as u32;
    let mut out = Vec::with_capacity(44);
    out.extend_from_slice(&ratespec(rate));
    out.extend_from_slice(&ratespec(ceil));
    out.extend_from_slice(&clock.xmit_ticks(rate, burst).to_ne_bytes());
    out.extend_from_slice(&clock.xmit_ticks(ceil, cburst).to_ne_bytes());
    out.extend_from_slice(&quantum.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // level
    out.extend_from_slice(&u32::from(spec.priority).to_ne_bytes());
    out
}

/// Creates or changes an HTB class on `ifindex`.
pub fn htb_class(ifindex: u32, spec: &ClassSpec, clock: PschedClock) -> MessageBuilder {
    let parent = spec
        .parent
        .map_or(u32::from(spec.id.major) << 16, |p| p.handle());
    let mut message = MessageBuilder::new(RTM_NEWTCLASS, NLM_F_CREATE)
        .header(&tcmsg(ifindex, spec.id.handle(), parent, 0))
        .attr_str(TCA_KIND, "htb")
        .begin_nest(TCA_OPTIONS)
        .attr(TCA_HTB_PARMS, &htb_opt(spec, clock));
    let rate = spec.rate.bytes_per_second();
    let ceil = spec.ceil.bytes_per_second().max(rate);
    if rate >= u64::from(u32::MAX) {
        message = message.attr_u64(TCA_HTB_RATE64, rate);
    }
    if ceil >= u64::from(u32::MAX) {
        message = message.attr_u64(TCA_HTB_CEIL64, ceil);
    }
    message.end_nest()
}

/// Deletes class `id` on `ifindex`.
pub fn delete_class(ifindex: u32, id: ClassId) -> MessageBuilder {
    MessageBuilder::new(RTM_DELTCLASS, 0).header(&tcmsg(
        ifindex,
        id.handle(),
        u32::from(id.major) << 16,
        0,
    ))
}

/// One u32 key: 32 bits at `offset` (from the network header) under `mask`,
/// both given in network byte order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct U32Key {
    /// Mask, network byte order.
    pub mask: [u8; 4],
    /// Value, network byte order.
    pub value: [u8; 4],
    /// Byte offset from the network header.
    pub offset: i32,
}

fn u32_selector(keys: &[U32Key]) -> Vec<u8> {
    let mut out = vec![0u8; 16];
    out[0] = TC_U32_TERMINAL;
    out[2] = keys.len() as u8;
    for key in keys {
        out.extend_from_slice(&key.mask);
        out.extend_from_slice(&key.value);
        out.extend_from_slice(&key.offset.to_ne_bytes());
        out.extend_from_slice(&0i32.to_ne_bytes());
    }
    out
}

/// Ingress filter on `ifindex` sending every packet to `ifb_index`
/// (`u32 match u32 0 0 action mirred egress redirect`).
pub fn redirect_to_ifb(ifindex: u32, prio: u16, ifb_index: u32) -> MessageBuilder {
    let mut mirred = Vec::with_capacity(28);
    mirred.extend_from_slice(&0u32.to_ne_bytes()); // index
    mirred.extend_from_slice(&0u32.to_ne_bytes()); // capab
    mirred.extend_from_slice(&TC_ACT_STOLEN.to_ne_bytes());
    mirred.extend_from_slice(&0i32.to_ne_bytes()); // refcnt
    mirred.extend_from_slice(&0i32.to_ne_bytes()); // bindcnt
    mirred.extend_from_slice(&TCA_EGRESS_REDIR.to_ne_bytes());
    mirred.extend_from_slice(&ifb_index.to_ne_bytes());
    let match_all = U32Key {
        mask: [0; 4],
        value: [0; 4],
        offset: 0,
    };
    MessageBuilder::new(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL)
        .header(&tcmsg(
            ifindex,
            0,
            INGRESS_HANDLE,
            filter_info(prio, ETH_P_ALL),
        ))
        .attr_str(TCA_KIND, "u32")
        .begin_nest(TCA_OPTIONS)
        .attr(TCA_U32_SEL, &u32_selector(&[match_all]))
        .begin_nest(TCA_U32_ACT)
        .begin_nest(1)
        .attr_str(TCA_ACT_KIND, "mirred")
        .begin_nest(TCA_ACT_OPTIONS)
        .attr(TCA_MIRRED_PARMS, &mirred)
        .end_nest()
        .end_nest()
        .end_nest()
        .end_nest()
}

/// Deletes every filter of priority `prio` and `protocol` under `parent`.
pub fn delete_filters(ifindex: u32, parent: u32, prio: u16, protocol: u16) -> MessageBuilder {
    MessageBuilder::new(RTM_DELTFILTER, 0).header(&tcmsg(
        ifindex,
        0,
        parent,
        filter_info(prio, protocol),
    ))
}

/// The u32 keys matching packets *from the client* of a subflow: source is
/// the client, destination the proxy, protocol TCP. Ports assume no IP
/// options or IPv6 extension headers (MPTCP subflows carry none in practice).
pub fn upload_keys(tuple: &FourTuple) -> Option<(u16, Vec<U32Key>)> {
    let ports =
        ((u32::from(tuple.remote.port()) << 16) | u32::from(tuple.local.port())).to_be_bytes();
    let full = [0xff; 4];
    match (tuple.remote.ip(), tuple.local.ip()) {
        (IpAddr::V4(client), IpAddr::V4(proxy)) => Some((
            ETH_P_IP,
            vec![
                U32Key {
                    mask: [0, 0xff, 0, 0],
                    value: [0, libc::IPPROTO_TCP as u8, 0, 0],
                    offset: 8,
                },
                U32Key {
                    mask: full,
                    value: client.octets(),
                    offset: 12,
                },
                U32Key {
                    mask: full,
                    value: proxy.octets(),
                    offset: 16,
                },
                U32Key {
                    mask: full,
                    value: ports,
                    offset: 20,
                },
            ],
        )),
        (IpAddr::V6(client), IpAddr::V6(proxy)) => {
            let mut keys = vec![U32Key {
                mask: [0, 0, 0xff, 0],
                value: [0, 0, libc::IPPROTO_TCP as u8, 0],
                offset: 4,
            }];
            for (base, addr) in [(8, client.octets()), (24, proxy.octets())] {
                for word in 0..4 {
                    keys.push(U32Key {
                        mask: full,
                        value: addr[word * 4..word * 4 + 4].try_into().expect("4 bytes"),
                        offset: base + 4 * word as i32,
                    });
                }
            }
            keys.push(U32Key {
                mask: full,
                value: ports,
                offset: 40,
            });
            Some((ETH_P_IPV6, keys))
        }
        _ => None,
    }
}

/// A u32 filter on the IFB's HTB putting a subflow's upload into `class`.
pub fn upload_filter(
    ifb_index: u32,
    prio: u16,
    protocol: u16,
    keys: &[U32Key],
    class: ClassId,
) -> MessageBuilder {
    MessageBuilder::new(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL)
        .header(&tcmsg(
            ifb_index,
            0,
            u32::from(class.major) << 16,
            filter_info(prio, protocol),
        ))
        .attr_str(TCA_KIND, "u32")
        .begin_nest(TCA_OPTIONS)
        .attr_u32(TCA_U32_CLASSID, class.handle())
        .attr(TCA_U32_SEL, &u32_selector(keys))
        .end_nest()
}

/// `TCA_BPF_CLASSID`, `TCA_BPF_FD`, `TCA_BPF_NAME`, `TCA_BPF_FLAGS` and `TCA_BPF_FLAG_ACT_DIRECT`
/// (linux/pkt_cls.h).
const TCA_BPF_CLASSID: u16 = 3;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;

/// A cls_bpf filter in direct-action mode under `parent` on `ifindex`, running program `program_fd` on
/// every packet (`tc filter add ... bpf da fd N classid MAJOR:`): the program sets the class and returns
/// the action. `skb->tc_classid` holds only a minor (16 bits); the major comes from the filter's
/// `classid`, here the parent qdisc's.
pub fn bpf_filter(
    ifindex: u32,
    parent: u32,
    prio: u16,
    program_fd: i32,
    name: &str,
) -> MessageBuilder {
    MessageBuilder::new(RTM_NEWTFILTER, NLM_F_CREATE | NLM_F_EXCL)
        .header(&tcmsg(ifindex, 0, parent, filter_info(prio, ETH_P_ALL)))
        .attr_str(TCA_KIND, "bpf")
        .begin_nest(TCA_OPTIONS)
        .attr_u32(TCA_BPF_CLASSID, parent & 0xffff_0000)
        .attr_u32(TCA_BPF_FD, program_fd as u32)
        .attr_str(TCA_BPF_NAME, name)
        .attr_u32(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT)
        .end_nest()
}

/// Creates an IFB device called `name`.
pub fn create_ifb(name: &str) -> MessageBuilder {
    MessageBuilder::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
        .header(&ifinfomsg(0, 0, 0))
        .attr_str(IFLA_IFNAME, name)
        .begin_nest(IFLA_LINKINFO)
        .attr_str(IFLA_INFO_KIND, "ifb")
        .end_nest()
}

/// Sets a link up.
pub fn link_up(ifindex: u32) -> MessageBuilder {
    let up = libc::IFF_UP as u32;
    MessageBuilder::new(RTM_NEWLINK, 0).header(&ifinfomsg(ifindex, up, up))
}

/// Deletes a link.
pub fn delete_link(ifindex: u32) -> MessageBuilder {
    MessageBuilder::new(RTM_DELLINK, 0).header(&ifinfomsg(ifindex, 0, 0))
}

/// Dump request for all links.
pub fn dump_links() -> MessageBuilder {
    MessageBuilder::new(RTM_GETLINK, 0).header(&ifinfomsg(0, 0, 0))
}

/// Dump request for all qdiscs.
pub fn dump_qdiscs() -> MessageBuilder {
    MessageBuilder::new(RTM_GETQDISC, 0).header(&tcmsg(0, 0, 0, 0))
}

/// Dump request for the filters under `parent` on `ifindex`.
pub fn dump_filters(ifindex: u32, parent: u32) -> MessageBuilder {
    MessageBuilder::new(RTM_GETTFILTER, 0).header(&tcmsg(ifindex, 0, parent, 0))
}

/// Dump request for all addresses.
pub fn dump_addresses() -> MessageBuilder {
    MessageBuilder::new(RTM_GETADDR, 0).header(&[0u8; 8])
}

/// The fields of a `struct tcmsg` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcObject {
    /// Interface index.
    pub ifindex: u32,
    /// Handle.
    pub handle: u32,
    /// Parent.
    pub parent: u32,
    /// Info (filters: prio and protocol).
    pub info: u32,
    /// `TCA_KIND`.
    pub kind: String,
}

/// Reads a qdisc/class/filter reply.
pub fn parse_tc_object(payload: &[u8]) -> Option<TcObject> {
    let header = payload.get(..20)?;
    let ifindex = i32::from_ne_bytes(header[4..8].try_into().ok()?) as u32;
    let handle = u32::from_ne_bytes(header[8..12].try_into().ok()?);
    let parent = u32::from_ne_bytes(header[12..16].try_into().ok()?);
    let info = u32::from_ne_bytes(header[16..20].try_into().ok()?);
    let kind = mptcp_netlink::parse_attrs(&payload[20..])
        .into_iter()
        .find(|(k, _)| *k == TCA_KIND)
        .map(|(_, v)| mptcp_netlink::attr_string(v))
        .unwrap_or_default();
    Some(TcObject {
        ifindex,
        handle,
        parent,
        info,
        kind,
    })
}

/// Reads a link reply: index and name.
pub fn parse_link(payload: &[u8]) -> Option<(u32, String)> {
    let index = i32::from_ne_bytes(payload.get(4..8)?.try_into().ok()?) as u32;
    let name = mptcp_netlink::parse_attrs(payload.get(16..)?)
        .into_iter()
        .find(|(k, _)| *k == IFLA_IFNAME)
        .map(|(_, v)| mptcp_netlink::attr_string(v))?;
    Some((index, name))
}

/// Reads an address reply: interface index and address.
pub fn parse_address(payload: &[u8]) -> Option<(u32, IpAddr)> {
    // struct ifaddrmsg: family u8, prefixlen u8, flags u8, scope u8, index u32.
    let family = *payload.first()?;
    let index = u32::from_ne_bytes(payload.get(4..8)?.try_into().ok()?);
    const IFA_ADDRESS: u16 = 1;
    const IFA_LOCAL: u16 = 2;
    let attrs = mptcp_netlink::parse_attrs(payload.get(8..)?);
    let pick = attrs
        .iter()
        .find(|(k, _)| *k == IFA_LOCAL)
        .or_else(|| attrs.iter().find(|(k, _)| *k == IFA_ADDRESS))?;
    let addr = match (family as i32, pick.1.len()) {
        (libc::AF_INET, 4) => IpAddr::from(<[u8; 4]>::try_from(pick.1).ok()?),
        (libc::AF_INET6, 16) => IpAddr::from(<[u8; 16]>::try_from(pick.1).ok()?),
        _ => return None,
    };
    Some((index, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psched_clock_matches_iproute2() {
        let clock = PschedClock::parse("000003e8 00000040 000f4240 3b9aca00\n").unwrap();
        assert!((clock.ticks_per_usec - 15.625).abs() < 1e-9);
        // 1600 bytes at 20 Mbit/s (2.5 MB/s) take 640 us = 10000 ticks.
        assert_eq!(clock.xmit_ticks(2_500_000, 1600), 10_000);
    }

    #[test]
    fn filter_info_puts_protocol_in_network_order() {
        assert_eq!(filter_info(1, ETH_P_IP), 0x0001_0008);
    }

    #[test]
    fn upload_keys_cover_the_tuple() {
        let tuple = FourTuple {
            local: "10.0.0.1:443".parse().unwrap(),
            remote: "192.0.2.7:50000".parse().unwrap(),
        };
        let (proto, keys) = upload_keys(&tuple).unwrap();
        assert_eq!(proto, ETH_P_IP);
        assert_eq!(keys[1].value, [192, 0, 2, 7]);
        assert_eq!(keys[2].value, [10, 0, 0, 1]);
        assert_eq!(keys[3].value, [0xc3, 0x50, 0x01, 0xbb]);
    }
}
