//! Reading back the installed HTB classes' statistics (bytes, packets, drops, overlimits), for metrics.

use crate::kernel::KernelError;
use crate::tc::{self, parse_link, parse_tc_object};
use mptcp_netlink::{parse_attrs, MessageBuilder, NetlinkSocket};

/// `RTM_GETTCLASS`.
const RTM_GETTCLASS: u16 = 42;
/// `TCA_STATS2`: nested `gnet_stats`.
const TCA_STATS2: u16 = 7;
/// `TCA_STATS_BASIC`: `struct gnet_stats_basic { u64 bytes; u32 packets; }`.
const TCA_STATS_BASIC: u16 = 1;
/// `TCA_STATS_QUEUE`: `struct gnet_stats_queue { u32 qlen, backlog, drops, requeues, overlimits; }`.
const TCA_STATS_QUEUE: u16 = 3;

/// One installed class's counters, as the kernel reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassStats {
    /// The interface (for uploads, the IFB device) the class lives on.
    pub interface: String,
    /// The class handle (`major << 16 | minor`).
    pub handle: u32,
    /// Bytes sent through the class.
    pub bytes: u64,
    /// Packets sent through the class.
    pub packets: u64,
    /// Packets dropped.
    pub drops: u64,
    /// Times the class was over its rate and had to wait or borrow.
    pub overlimits: u64,
}

fn u32_at(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| u64::from(u32::from_ne_bytes(b)))
}

/// Parses one `RTM_NEWTCLASS` payload's statistics.
pub fn parse_class_stats(payload: &[u8]) -> Option<(u32, u32, u64, u64, u64, u64)> {
    let object = parse_tc_object(payload)?;
    let (mut bytes, mut packets, mut drops, mut overlimits) = (0, 0, 0, 0);
    for (kind, value) in parse_attrs(payload.get(20..)?) {
        if kind != TCA_STATS2 {
            continue;
        }
        for (kind, value) in parse_attrs(value) {
            match kind {
                TCA_STATS_BASIC => {
                    bytes = value
                        .get(0..8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_ne_bytes);
                    packets = u32_at(value, 8);
                }
                TCA_STATS_QUEUE => {
                    drops = u32_at(value, 8);
                    overlimits = u32_at(value, 16);
                }
                _ => {}
            }
        }
    }
    Some((
        object.ifindex,
        object.handle,
        bytes,
        packets,
        drops,
        overlimits,
    ))
}

/// The statistics of every class under an HTB qdisc with major number `qdisc_major`, in the current
/// network namespace.
pub fn class_stats(qdisc_major: u16) -> Result<Vec<ClassStats>, KernelError> {
    let mut route = NetlinkSocket::open(libc::NETLINK_ROUTE).map_err(KernelError::Socket)?;
    let links: Vec<(u32, String)> = route
        .dump(tc::dump_links(), "dump links")?
        .iter()
        .filter_map(|m| parse_link(&m.payload))
        .collect();
    let mut stats = Vec::new();
    for (index, name) in links {
        let request = MessageBuilder::new(RTM_GETTCLASS, 0).header(&tc::tcmsg(index, 0, 0, 0));
        for message in route.dump(request, "dump classes")? {
            let Some((ifindex, handle, bytes, packets, drops, overlimits)) =
                parse_class_stats(&message.payload)
            else {
                continue;
            };
            if ifindex == index && handle >> 16 == u32::from(qdisc_major) && handle & 0xffff != 0 {
                stats.push(ClassStats {
                    interface: name.clone(),
                    handle,
                    bytes,
                    packets,
                    drops,
                    overlimits,
                });
            }
        }
    }
    Ok(stats)
}
