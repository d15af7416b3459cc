//! The Session Information Table (Table II, §III-C, `PROTOCOL.md` §4.2).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;
use crate::wire::{NodeId, SessionId};

/// Default idle time after which a session entry expires.
pub const DEFAULT_SESSION_IDLE: Duration = Duration::from_secs(120);

/// Transport protocol of a session, by IP protocol number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// Any other IP protocol, by number.
    Other(u8),
}

impl Protocol {
    /// The protocol with IP protocol number `number`.
    pub const fn from_number(number: u8) -> Protocol {
        match number {
            6 => Protocol::Tcp,
            17 => Protocol::Udp,
            other => Protocol::Other(other),
        }
    }

    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Other(n) => n,
        }
    }
}

/// A transport 5-tuple seen from this node: `local` is this node's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FiveTuple {
    /// Transport protocol.
    pub protocol: Protocol,
    /// This node's address and port.
    pub local: SocketAddr,
    /// The peer's address and port.
    pub remote: SocketAddr,
}

impl FiveTuple {
    /// The tuple of the inner packet of a received datagram, seen from this node:
    /// the packet's destination is local, its source remote.
    pub const fn from_inbound(
        protocol: Protocol,
        source: SocketAddr,
        destination: SocketAddr,
    ) -> Self {
        FiveTuple {
            protocol,
            local: destination,
            remote: source,
        }
    }
}

/// One row of Table II.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEntry {
    /// The peer node.
    pub node: NodeId,
    /// The session ID shared by both nodes.
    pub session: SessionId,
    /// The original transport 5-tuple, from this node's point of view.
    pub tuple: FiveTuple,
    /// TCP only: next in-order sequence number expected by the re-sequencer.
    pub next_sequence: Option<u32>,
    /// Last time a packet of the session was sent or received.
    pub updated: Timestamp,
}

/// Errors of the session table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Every session ID of this node's half of the ID space is in use for the peer.
    #[error("no free session ID toward node {0}")]
    Exhausted(NodeId),
    /// Session ID 0 is node-level control and never names a session.
    #[error("session ID 0 is reserved for control packets")]
    ControlSession,
}

/// The Session Information Table.
#[derive(Debug, Clone)]
pub struct SessionTable {
    local_node: NodeId,
    entries: BTreeMap<(NodeId, SessionId), SessionEntry>,
    by_tuple: HashMap<FiveTuple, (NodeId, SessionId)>,
    next_id: HashMap<NodeId, u16>,
}

impl SessionTable {
    /// An empty table for the node `local_node`.
    pub fn new(local_node: NodeId) -> Self {
        SessionTable {
            local_node,
            entries: BTreeMap::new(),
            by_tuple: HashMap::new(),
            next_id: HashMap::new(),
        }
    }

    /// The half of the session ID space this node allocates from toward `peer`:
    /// the lower node ID takes `0x0001..=0x7fff`, the higher `0x8000..=0xffff`.
    pub fn id_range(&self, peer: NodeId) -> (u16, u16) {
        if self.local_node < peer {
            (0x0001, 0x7fff)
        } else {
            (0x8000, 0xffff)
        }
    }

    /// The session of an outgoing packet with `tuple` toward `node`, allocating a
    /// new session ID on first use. Refreshes the update time.
    pub fn outbound(
        &mut self,
        now: Timestamp,
        node: NodeId,
        tuple: FiveTuple,
    ) -> Result<SessionId, SessionError> {
        if let Some(&(known_node, session)) = self.by_tuple.get(&tuple) {
            if known_node == node {
                if let Some(entry) = self.entries.get_mut(&(node, session)) {
                    entry.updated = now;
                    return Ok(session);
                }
            }
        }
        let session = self.allocate(node)?;
        self.insert(now, node, session, tuple);
        Ok(session)
    }

    /// Records an incoming packet of (`node`, `session`) whose inner 5-tuple, from
    /// this node's point of view, is `tuple`; creates the entry on first sight.
    pub fn inbound(
        &mut self,
        now: Timestamp,
        node: NodeId,
        session: SessionId,
        tuple: FiveTuple,
    ) -> Result<&SessionEntry, SessionError> {
        if session == SessionId::CONTROL {
            return Err(SessionError::ControlSession);
        }
        if !self.entries.contains_key(&(node, session)) {
            self.link_tuple(node, session, tuple);
        }
        let entry = self
            .entries
            .entry((node, session))
            .or_insert_with(|| SessionEntry {
                node,
                session,
                tuple,
                next_sequence: None,
                updated: now,
            });
        entry.updated = now;
        Ok(entry)
    }

    fn insert(&mut self, now: Timestamp, node: NodeId, session: SessionId, tuple: FiveTuple) {
        self.link_tuple(node, session, tuple);
        self.entries.insert(
            (node, session),
            SessionEntry {
                node,
                session,
                tuple,
                next_sequence: None,
                updated: now,
            },
        );
    }

    fn link_tuple(&mut self, node: NodeId, session: SessionId, tuple: FiveTuple) {
        // Both nodes may open the same UDP 5-tuple at once with different IDs;
        // both then map the tuple to the lower ID so they agree.
        match self.by_tuple.get(&tuple) {
            Some(&(known_node, known)) if known_node == node && known < session => {}
            _ => {
                self.by_tuple.insert(tuple, (node, session));
            }
        }
    }

    fn allocate(&mut self, node: NodeId) -> Result<SessionId, SessionError> {
        let (low, high) = self.id_range(node);
        let span = u32::from(high - low) + 1;
        let start = *self.next_id.get(&node).unwrap_or(&low);
        for step in 0..span {
            let offset = (u32::from(start - low) + step) % span;
            // offset < span <= 0x8000, so the sum stays within u16.
            let candidate = low + offset as u16;
            if !self.entries.contains_key(&(node, SessionId(candidate))) {
                let next = if candidate == high {
                    low
                } else {
                    candidate + 1
                };
                self.next_id.insert(node, next);
                return Ok(SessionId(candidate));
            }
        }
        Err(SessionError::Exhausted(node))
    }

    /// The entry of (`node`, `session`).
    pub fn get(&self, node: NodeId, session: SessionId) -> Option<&SessionEntry> {
        self.entries.get(&(node, session))
    }

    /// Mutable entry of (`node`, `session`).
    pub fn get_mut(&mut self, node: NodeId, session: SessionId) -> Option<&mut SessionEntry> {
        self.entries.get_mut(&(node, session))
    }

    /// The session carrying `tuple`, if any.
    pub fn lookup(&self, tuple: &FiveTuple) -> Option<(NodeId, SessionId)> {
        self.by_tuple.get(tuple).copied()
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The sessions with `node`.
    pub fn sessions_of(&self, node: NodeId) -> impl Iterator<Item = &SessionEntry> + '_ {
        self.entries
            .range((node, SessionId(0))..=(node, SessionId(u16::MAX)))
            .map(|(_, entry)| entry)
    }

    /// Removes sessions not updated for `idle`; returns them.
    pub fn expire(&mut self, now: Timestamp, idle: Duration) -> Vec<SessionEntry> {
        let expired: Vec<(NodeId, SessionId)> = self
            .entries
            .iter()
            .filter(|(_, entry)| now.saturating_since(entry.updated) >= idle)
            .map(|(key, _)| *key)
            .collect();
        let mut removed = Vec::with_capacity(expired.len());
        for key in expired {
            if let Some(entry) = self.entries.remove(&key) {
                if self.by_tuple.get(&entry.tuple) == Some(&key) {
                    self.by_tuple.remove(&entry.tuple);
                }
                removed.push(entry);
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOW: NodeId = NodeId([2, 0, 0, 0, 0, 1]);
    const HIGH: NodeId = NodeId([2, 0, 0, 0, 0, 9]);

    fn tuple(local: &str, remote: &str) -> FiveTuple {
        FiveTuple {
            protocol: Protocol::Tcp,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
        }
    }

    #[test]
    fn outbound_allocates_once_per_tuple_from_own_half() {
        let mut low = SessionTable::new(LOW);
        let mut high = SessionTable::new(HIGH);
        let t = tuple("10.0.0.2:40000", "192.0.2.80:80");
        let a = low.outbound(Timestamp::ZERO, HIGH, t).unwrap();
        assert_eq!(low.outbound(Timestamp::ZERO, HIGH, t).unwrap(), a);
        assert!((0x0001..=0x7fff).contains(&a.0));
        let b = high.outbound(Timestamp::ZERO, LOW, t).unwrap();
        assert!((0x8000..=0xffff).contains(&b.0));
        let other = low
            .outbound(
                Timestamp::ZERO,
                HIGH,
                tuple("10.0.0.2:40001", "192.0.2.80:80"),
            )
            .unwrap();
        assert_ne!(other, a);
        assert_eq!(low.len(), 2);
    }

    #[test]
    fn inbound_creates_entry_with_swapped_tuple() {
        let mut sender = SessionTable::new(LOW);
        let mut receiver = SessionTable::new(HIGH);
        let sent = tuple("10.0.0.2:40000", "192.0.2.80:80");
        let session = sender.outbound(Timestamp::ZERO, HIGH, sent).unwrap();
        // The receiver sees the inner packet 10.0.0.2:40000 -> 192.0.2.80:80.
        let seen = FiveTuple::from_inbound(Protocol::Tcp, sent.local, sent.remote);
        let entry = receiver
            .inbound(Timestamp::from_millis(3), LOW, session, seen)
            .unwrap();
        assert_eq!(entry.tuple.local, sent.remote);
        assert_eq!(entry.tuple.remote, sent.local);
        assert_eq!(receiver.lookup(&seen), Some((LOW, session)));
        // The reply direction uses the same session ID.
        assert_eq!(
            receiver
                .outbound(Timestamp::from_millis(4), LOW, seen)
                .unwrap(),
            session
        );
        assert_eq!(
            receiver.inbound(Timestamp::ZERO, LOW, SessionId::CONTROL, seen),
            Err(SessionError::ControlSession)
        );
    }

    #[test]
    fn simultaneous_open_converges_on_the_lower_id() {
        let mut table = SessionTable::new(LOW);
        let t = tuple("10.0.0.2:5000", "192.0.2.80:5000");
        let own = table.outbound(Timestamp::ZERO, HIGH, t).unwrap();
        table
            .inbound(Timestamp::ZERO, HIGH, SessionId(0x8001), t)
            .unwrap();
        assert_eq!(table.lookup(&t), Some((HIGH, own)));
        assert!(own.0 < 0x8001);
    }

    #[test]
    fn idle_sessions_expire_and_ids_are_reused() {
        let mut table = SessionTable::new(LOW);
        let t1 = tuple("10.0.0.2:1", "192.0.2.80:80");
        let t2 = tuple("10.0.0.2:2", "192.0.2.80:80");
        let s1 = table.outbound(Timestamp::ZERO, HIGH, t1).unwrap();
        table.outbound(Timestamp::from_secs(100), HIGH, t2).unwrap();
        let removed = table.expire(Timestamp::from_secs(130), Duration::from_secs(120));
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].session, s1);
        assert_eq!(table.lookup(&t1), None);
        assert!(table.lookup(&t2).is_some());
        assert_eq!(table.sessions_of(HIGH).count(), 1);
    }

    #[test]
    fn allocation_reports_exhaustion() {
        let mut table = SessionTable::new(HIGH);
        for port in 0..0x8000u32 {
            let t = FiveTuple {
                protocol: Protocol::Udp,
                local: SocketAddr::new([10, 0, (port >> 8) as u8, port as u8].into(), 1),
                remote: "192.0.2.80:53".parse().unwrap(),
            };
            table.outbound(Timestamp::ZERO, LOW, t).unwrap();
        }
        let t = tuple("10.9.9.9:9", "192.0.2.80:53");
        assert_eq!(
            table.outbound(Timestamp::ZERO, LOW, t),
            Err(SessionError::Exhausted(LOW))
        );
    }
}
