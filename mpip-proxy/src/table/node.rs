//! Node ID ↔ UDP endpoint mapping (§III-C, `PROTOCOL.md` §5).
//!
//! Every received CM block writes (Source Node ID, outer source address, outer
//! source port) here. Behind a NAT the observed endpoint is the NAT's mapping,
//! which is the address the reply must go to; the announced endpoints come from
//! the peer's Local IP Address List.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use crate::time::Timestamp;
use crate::wire::NodeId;

/// What is known about one peer node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeEntry {
    /// Outer source endpoints seen in received datagrams, with the time last seen.
    pub observed: BTreeMap<SocketAddr, Timestamp>,
    /// Endpoints from the peer's latest Local IP Address List.
    pub announced: BTreeSet<SocketAddr>,
    /// Last time any datagram from the node was received.
    pub last_seen: Timestamp,
}

impl NodeEntry {
    /// Every endpoint worth trying for the node: observed ones first, then announced.
    pub fn endpoints(&self) -> BTreeSet<SocketAddr> {
        self.observed
            .keys()
            .chain(self.announced.iter())
            .copied()
            .collect()
    }
}

/// Node ID ↔ endpoints table.
#[derive(Debug, Clone, Default)]
pub struct NodeTable {
    nodes: BTreeMap<NodeId, NodeEntry>,
}

impl NodeTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a datagram from `node` with outer source `source`.
    /// Returns `true` if the endpoint was not known for that node.
    pub fn observe(&mut self, now: Timestamp, node: NodeId, source: SocketAddr) -> bool {
        let entry = self.nodes.entry(node).or_default();
        entry.last_seen = entry.last_seen.max(now);
        entry.observed.insert(source, now).is_none()
    }

    /// Replaces the announced endpoints of `node`. Returns `true` if they changed.
    pub fn announce(&mut self, node: NodeId, addresses: &[SocketAddr]) -> bool {
        let entry = self.nodes.entry(node).or_default();
        let announced: BTreeSet<SocketAddr> = addresses.iter().copied().collect();
        if entry.announced == announced {
            false
        } else {
            entry.announced = announced;
            true
        }
    }

    /// Applies a peer's IP change: keeps only the endpoint the notification came
    /// from and the newly announced list (`PROTOCOL.md` §6.3).
    pub fn reset_after_ip_change(
        &mut self,
        now: Timestamp,
        node: NodeId,
        via: SocketAddr,
        announced: &[SocketAddr],
    ) {
        let entry = self.nodes.entry(node).or_default();
        entry.observed.clear();
        entry.observed.insert(via, now);
        entry.announced = announced.iter().copied().collect();
        entry.last_seen = entry.last_seen.max(now);
    }

    /// The entry of `node`.
    pub fn get(&self, node: NodeId) -> Option<&NodeEntry> {
        self.nodes.get(&node)
    }

    /// The node that last used the outer source `source`, if any.
    pub fn node_for(&self, source: SocketAddr) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|(id, entry)| entry.observed.get(&source).map(|seen| (*seen, *id)))
            .max()
            .map(|(_, id)| id)
    }

    /// Known node IDs.
    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.keys().copied()
    }

    /// Forgets observed endpoints idle for `idle` and nodes silent for `idle`.
    /// Returns the nodes removed.
    pub fn expire(&mut self, now: Timestamp, idle: Duration) -> Vec<NodeId> {
        let mut removed = Vec::new();
        self.nodes.retain(|id, entry| {
            entry
                .observed
                .retain(|_, seen| now.saturating_since(*seen) < idle);
            let keep = now.saturating_since(entry.last_seen) < idle;
            if !keep {
                removed.push(*id);
            }
            keep
        });
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId([2, 0, 0, 0, 0, 0xa]);
    const B: NodeId = NodeId([2, 0, 0, 0, 0, 0xb]);

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn nat_mapped_source_is_recorded_per_node() {
        let mut table = NodeTable::new();
        let t = Timestamp::from_millis(10);
        assert!(table.observe(t, A, addr("203.0.113.5:61000")));
        assert!(!table.observe(t, A, addr("203.0.113.5:61000")));
        assert!(table.observe(t, A, addr("198.18.0.7:52000")));
        assert_eq!(table.node_for(addr("198.18.0.7:52000")), Some(A));
        assert_eq!(table.node_for(addr("192.0.2.1:1")), None);
        assert_eq!(table.get(A).unwrap().observed.len(), 2);
        assert!(table.get(B).is_none());
    }

    #[test]
    fn endpoints_merge_observed_and_announced() {
        let mut table = NodeTable::new();
        table.observe(Timestamp::ZERO, A, addr("203.0.113.5:61000"));
        assert!(table.announce(A, &[addr("10.0.0.2:4789"), addr("203.0.113.5:61000")]));
        assert!(!table.announce(A, &[addr("203.0.113.5:61000"), addr("10.0.0.2:4789")]));
        assert_eq!(table.get(A).unwrap().endpoints().len(), 2);
    }

    #[test]
    fn ip_change_keeps_only_the_notifying_endpoint() {
        let mut table = NodeTable::new();
        table.observe(Timestamp::ZERO, A, addr("203.0.113.5:61000"));
        table.observe(Timestamp::ZERO, A, addr("198.18.0.7:52000"));
        table.reset_after_ip_change(
            Timestamp::from_millis(5),
            A,
            addr("198.18.0.9:52001"),
            &[addr("10.0.1.2:4789")],
        );
        let entry = table.get(A).unwrap();
        assert_eq!(
            entry.observed.keys().copied().collect::<Vec<_>>(),
            vec![addr("198.18.0.9:52001")]
        );
        assert!(entry.announced.contains(&addr("10.0.1.2:4789")));
    }

    #[test]
    fn expiry_drops_idle_endpoints_and_nodes() {
        let mut table = NodeTable::new();
        table.observe(Timestamp::ZERO, A, addr("203.0.113.5:61000"));
        table.observe(Timestamp::from_secs(50), A, addr("198.18.0.7:52000"));
        table.observe(Timestamp::ZERO, B, addr("203.0.113.6:61000"));
        let removed = table.expire(Timestamp::from_secs(60), Duration::from_secs(30));
        assert_eq!(removed, vec![B]);
        let entry = table.get(A).unwrap();
        assert_eq!(entry.observed.len(), 1);
        assert!(entry.observed.contains_key(&addr("198.18.0.7:52000")));
    }
}
