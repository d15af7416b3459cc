//! Path manager: discovery, liveness, heartbeats and address changes
//! (§III-D, `PROTOCOL.md` §5–7). Sans-IO: feed it received CM blocks and
//! interface events, poll it for control packets to send and for [`PathEvent`]s.
//!
//! Paths are kept per peer node (one NAT mapping per UDP path is shared by all
//! sessions); the per-session Path Information Tables ([`crate::table::path`])
//! follow the [`PathEvent`]s.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use crate::table::node::NodeTable;
use crate::table::path::{FeedbackQueue, PathTable};
use crate::time::{one_way_delay_sample, Timestamp};
use crate::wire::{CmFlags, CmRepr, NodeId, PathId, SessionId, MAX_ADDRESSES};

/// Identifier of a local network interface, chosen by the caller (e.g. its ifindex).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceId(pub u32);

/// Path manager timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathConfig {
    /// Interval between probes on a path being discovered or a dead path.
    pub probe_interval: Duration,
    /// A heartbeat is sent on an active path idle (nothing sent) for this long.
    pub heartbeat_interval: Duration,
    /// An active path with nothing heard for this long is dead.
    pub dead_after: Duration,
    /// Probes sent on a never-confirmed path before it is marked unreachable.
    pub discovery_probes: u32,
    /// A dead path silent this long is removed, and observed endpoints and
    /// nodes silent this long are forgotten (stale NAT mappings). Discovery
    /// re-creates paths to endpoints still announced.
    pub forget_after: Duration,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            probe_interval: Duration::from_millis(200),
            heartbeat_interval: Duration::from_millis(100),
            dead_after: Duration::from_millis(400),
            discovery_probes: 5,
            forget_after: Duration::from_secs(60),
        }
    }
}

/// Liveness of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// Being discovered: probes are sent, nothing heard yet.
    Probing {
        /// Probes sent so far.
        probes_sent: u32,
    },
    /// Carrying traffic.
    Active,
    /// Was active, then went silent or its interface went down; probed to come back.
    Dead,
    /// Never answered discovery; not probed until an interface or address changes.
    Unreachable,
}

/// One path toward a peer node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// This node's ID of the path.
    pub id: PathId,
    /// The peer node.
    pub node: NodeId,
    /// The local interface.
    pub interface: InterfaceId,
    /// Local UDP endpoint.
    pub local: SocketAddr,
    /// Remote UDP endpoint (NAT-mapped if the peer is behind a NAT).
    pub remote: SocketAddr,
    /// Liveness.
    pub state: PathState,
    /// Last time anything was heard over the path (a datagram or feedback for it).
    pub last_heard: Option<Timestamp>,
    /// Last time anything was sent on the path.
    pub last_sent: Option<Timestamp>,
    next_probe: Timestamp,
}

impl Path {
    /// Whether the scheduler may use the path.
    pub fn is_active(&self) -> bool {
        self.state == PathState::Active
    }
}

/// Something the owner of the per-session tables must know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathEvent {
    /// A path was created (not yet usable unless followed by `Up`).
    Added {
        /// Peer node.
        node: NodeId,
        /// Path.
        path: PathId,
    },
    /// A path became active.
    Up {
        /// Peer node.
        node: NodeId,
        /// Path.
        path: PathId,
    },
    /// An active path went dead.
    Down {
        /// Peer node.
        node: NodeId,
        /// Path.
        path: PathId,
    },
    /// A path was deleted (address change or IP-change notification).
    Removed {
        /// Peer node.
        node: NodeId,
        /// Path.
        path: PathId,
    },
    /// The peer returned a delay sample for one of our paths. Session 0 samples
    /// come from control packets and apply to every session with that node.
    DelayFeedback {
        /// Peer node.
        node: NodeId,
        /// Session whose CM block carried the sample.
        session: SessionId,
        /// Our path the sample measured.
        path: PathId,
        /// The sample in microseconds.
        delay_us: i32,
    },
}

/// A control packet (CM block only) to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Path to send on; `PathId(0)` for a handshake query sent before any path exists.
    pub path: PathId,
    /// Local interface to send from.
    pub interface: InterfaceId,
    /// Source UDP endpoint.
    pub local: SocketAddr,
    /// Destination UDP endpoint.
    pub remote: SocketAddr,
    /// The CM block; the datagram carries nothing else.
    pub repr: CmRepr,
}

/// Errors of the path manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// All 255 path IDs are in use.
    #[error("no free path ID")]
    Exhausted,
    /// The interface is not known.
    #[error("unknown interface {0:?}")]
    UnknownInterface(InterfaceId),
    /// The path is not known.
    #[error("unknown path {0:?}")]
    UnknownPath(PathId),
}

#[derive(Debug, Clone, Copy)]
struct Interface {
    address: SocketAddr,
    up: bool,
}

/// The path manager of one node.
#[derive(Debug, Clone)]
pub struct PathManager {
    config: PathConfig,
    local_node: NodeId,
    interfaces: BTreeMap<InterfaceId, Interface>,
    nodes: NodeTable,
    paths: BTreeMap<PathId, Path>,
    events: VecDeque<PathEvent>,
    replies: VecDeque<(PathId, CmFlags)>,
    ip_change_pending: BTreeSet<NodeId>,
    feedback: FeedbackQueue,
    /// Nodes that lost a path since their last discovery run.
    rediscover: BTreeSet<NodeId>,
}

impl PathManager {
    /// A path manager for the node `local_node`, with no interface yet.
    pub fn new(config: PathConfig, local_node: NodeId) -> Self {
        PathManager {
            config,
            local_node,
            interfaces: BTreeMap::new(),
            nodes: NodeTable::new(),
            paths: BTreeMap::new(),
            events: VecDeque::new(),
            replies: VecDeque::new(),
            ip_change_pending: BTreeSet::new(),
            rediscover: BTreeSet::new(),
            feedback: FeedbackQueue::new(),
        }
    }

    /// This node's ID.
    pub fn local_node(&self) -> NodeId {
        self.local_node
    }

    /// The node ID ↔ endpoint table.
    pub fn nodes(&self) -> &NodeTable {
        &self.nodes
    }

    /// Every path.
    pub fn paths(&self) -> impl Iterator<Item = &Path> + '_ {
        self.paths.values()
    }

    /// The paths toward `node`.
    pub fn paths_to(&self, node: NodeId) -> impl Iterator<Item = &Path> + '_ {
        self.paths.values().filter(move |p| p.node == node)
    }

    /// The path `id`.
    pub fn path(&self, id: PathId) -> Option<&Path> {
        self.paths.get(&id)
    }

    /// The path on `interface` toward `remote`, if any.
    pub fn path_between(&self, interface: InterfaceId, remote: SocketAddr) -> Option<&Path> {
        self.paths
            .values()
            .find(|p| p.interface == interface && p.remote == remote)
    }

    /// The Local IP Address List this node announces: its up interfaces.
    pub fn local_addresses(&self) -> Vec<SocketAddr> {
        self.interfaces
            .values()
            .filter(|i| i.up)
            .map(|i| i.address)
            .take(MAX_ADDRESSES)
            .collect()
    }

    /// An interface came up with `address` (the UDP endpoint bound on it), or
    /// was added. If its address differs from the known one, this is an address
    /// change ([`PathManager::handle_address_change`]).
    pub fn handle_interface_up(
        &mut self,
        now: Timestamp,
        interface: InterfaceId,
        address: SocketAddr,
    ) {
        match self.interfaces.get(&interface).copied() {
            Some(known) if known.address != address => {
                self.handle_address_change(now, interface, address);
            }
            Some(_) => {
                if let Some(entry) = self.interfaces.get_mut(&interface) {
                    entry.up = true;
                }
                for path in self.paths.values_mut() {
                    if path.interface == interface && path.state != PathState::Active {
                        if path.state == PathState::Unreachable {
                            path.state = PathState::Probing { probes_sent: 0 };
                        }
                        path.next_probe = now;
                    }
                }
                self.discover_all(now);
            }
            None => {
                self.interfaces
                    .insert(interface, Interface { address, up: true });
                self.retry_unreachable(now);
                self.discover_all(now);
            }
        }
    }

    /// An interface went down: its paths are dead at once and not probed until it
    /// comes back.
    pub fn handle_interface_down(&mut self, _now: Timestamp, interface: InterfaceId) {
        if let Some(entry) = self.interfaces.get_mut(&interface) {
            entry.up = false;
        }
        for path in self.paths.values_mut() {
            if path.interface == interface && path.state == PathState::Active {
                path.state = PathState::Dead;
                self.events.push_back(PathEvent::Down {
                    node: path.node,
                    path: path.id,
                });
            }
        }
    }

    /// The address of `interface` changed: its paths are removed, new ones
    /// discovered, and every peer is told with `IP_CHANGE`.
    pub fn handle_address_change(
        &mut self,
        now: Timestamp,
        interface: InterfaceId,
        address: SocketAddr,
    ) {
        self.interfaces
            .insert(interface, Interface { address, up: true });
        let stale: Vec<PathId> = self
            .paths
            .values()
            .filter(|p| p.interface == interface)
            .map(|p| p.id)
            .collect();
        for id in stale {
            self.remove_path(id);
        }
        self.ip_change_pending.extend(self.nodes.nodes());
        self.retry_unreachable(now);
        self.discover_all(now);
    }

    /// Handles a valid CM block received on `interface` from outer source `remote`.
    pub fn handle_received(
        &mut self,
        now: Timestamp,
        interface: InterfaceId,
        remote: SocketAddr,
        repr: &CmRepr,
    ) {
        let node = repr.node_id;
        if node == self.local_node {
            return;
        }
        // Discovery only has new pairs to find when the node's endpoints
        // changed or one of its paths went away; not on every datagram.
        let mut endpoints_changed = true;
        if repr.flags.contains(CmFlags::IP_CHANGE) {
            self.nodes
                .reset_after_ip_change(now, node, remote, &repr.addresses);
            let stale: Vec<PathId> = self
                .paths
                .values()
                .filter(|p| p.node == node && !(p.interface == interface && p.remote == remote))
                .map(|p| p.id)
                .collect();
            for id in stale {
                self.remove_path(id);
            }
        } else {
            endpoints_changed = self.nodes.observe(now, node, remote);
            if !repr.addresses.is_empty() {
                endpoints_changed |= self.nodes.announce(node, &repr.addresses);
            }
        }

        // The datagram proves the path (interface, remote) works inbound.
        let was_active = match self.path_between(interface, remote).map(|p| p.id) {
            Some(id) => self.mark_heard(now, id),
            None => {
                if let Ok(id) = self.create_path(now, node, interface, remote) {
                    self.mark_heard(now, id);
                }
                false
            }
        };
        if let Some(path) = self.path_between(interface, remote).map(|p| p.id) {
            if repr.flags.contains(CmFlags::ENABLE) {
                // Handshake query: confirm on the path it came over.
                self.replies.push_back((path, CmFlags::CONFIRM));
            } else if !was_active {
                // Answer at once so the peer's side of the path comes up too.
                self.replies.push_back((path, CmFlags::NONE));
            }
        }

        self.feedback.record(
            node,
            repr.session_id,
            repr.path_id,
            one_way_delay_sample(repr.timestamp, now),
        );

        if let Some(feedback) = repr.feedback {
            let ours = self
                .paths
                .get(&feedback.path_id)
                .is_some_and(|p| p.node == node);
            if ours {
                self.mark_heard(now, feedback.path_id);
                self.events.push_back(PathEvent::DelayFeedback {
                    node,
                    session: repr.session_id,
                    path: feedback.path_id,
                    delay_us: feedback.delay_us,
                });
            }
        }
        if self.rediscover.remove(&node) || endpoints_changed {
            self.discover(now, node);
        }
    }

    /// Records that a datagram was sent on `path` at `now` (data packets sent by
    /// the caller), so no heartbeat is needed there yet.
    pub fn note_sent(&mut self, now: Timestamp, path: PathId) -> Result<(), PathError> {
        let entry = self
            .paths
            .get_mut(&path)
            .ok_or(PathError::UnknownPath(path))?;
        entry.last_sent = Some(now);
        Ok(())
    }

    /// Builds the CM block of a data packet of `session` sent on `path` with
    /// Packet Sequence `sequence`: timestamp and the delay feedback owed for that
    /// session. Data CM blocks never carry an address list or `IP_CHANGE` (those
    /// go on control packets), so they are always [`crate::wire::FIXED_LEN`]
    /// bytes. Records the send like [`PathManager::note_sent`].
    pub fn data_cm(
        &mut self,
        now: Timestamp,
        session: SessionId,
        path: PathId,
        sequence: u32,
    ) -> Result<CmRepr, PathError> {
        let entry = self
            .paths
            .get_mut(&path)
            .ok_or(PathError::UnknownPath(path))?;
        entry.last_sent = Some(now);
        let node = entry.node;
        Ok(CmRepr {
            flags: CmFlags::NONE,
            node_id: self.local_node,
            session_id: session,
            path_id: path,
            feedback: self.feedback.take(node, session),
            timestamp: now.to_wire(),
            sequence,
            addresses: Vec::new(),
        })
    }

    /// A new Path Information Table for a session with `node`: every path to the
    /// node, live if active.
    pub fn path_table_for(&self, node: NodeId) -> PathTable {
        let mut table = PathTable::new();
        for path in self.paths_to(node) {
            table.insert(path.id, path.local, path.remote);
            table.set_live(path.id, path.is_active());
        }
        table
    }

    /// Applies `event` to the Path Information Table of (`node`, `session`):
    /// paths that come up are inserted or revived, dead ones marked, removed ones
    /// deleted, and delay feedback of that session (or of the control session)
    /// recorded. Events of other nodes are ignored.
    pub fn apply_event(
        &self,
        node: NodeId,
        session: SessionId,
        event: &PathEvent,
        table: &mut PathTable,
    ) {
        match *event {
            PathEvent::Added { .. } => {}
            PathEvent::Up { node: n, path } if n == node => {
                if let Some(p) = self.paths.get(&path) {
                    table.insert(path, p.local, p.remote);
                }
            }
            PathEvent::Down { node: n, path } if n == node => {
                table.set_live(path, false);
            }
            PathEvent::Removed { node: n, path } if n == node => {
                table.remove(path);
            }
            PathEvent::DelayFeedback {
                node: n,
                session: s,
                path,
                delay_us,
            } if n == node && (s == session || s == SessionId::CONTROL) => {
                table.record_delay(path, delay_us);
            }
            _ => {}
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<PathEvent> {
        self.events.pop_front()
    }

    /// The next control packet to send at `now`, if any: immediate replies first,
    /// then probes on discovering and dead paths, then heartbeats on idle active
    /// paths. Also detects dead paths. Call until it returns `None`.
    pub fn poll_transmit(&mut self, now: Timestamp) -> Option<Transmit> {
        self.check_liveness(now);
        while let Some((id, flags)) = self.replies.pop_front() {
            if let Some(transmit) = self.control_packet(now, id, flags) {
                return Some(transmit);
            }
        }
        let config = self.config;
        let due = self.paths.values_mut().find_map(|path| {
            let up = self.interfaces.get(&path.interface).is_some_and(|i| i.up);
            if !up {
                return None;
            }
            match path.state {
                PathState::Probing { probes_sent } if path.next_probe <= now => {
                    if probes_sent >= config.discovery_probes {
                        path.state = PathState::Unreachable;
                        return None;
                    }
                    path.state = PathState::Probing {
                        probes_sent: probes_sent + 1,
                    };
                    path.next_probe = now + config.probe_interval;
                    Some(path.id)
                }
                PathState::Dead if path.next_probe <= now => {
                    path.next_probe = now + config.probe_interval;
                    Some(path.id)
                }
                PathState::Active
                    if path.last_sent.is_none_or(|sent| {
                        now.saturating_since(sent) >= config.heartbeat_interval
                    }) =>
                {
                    Some(path.id)
                }
                _ => None,
            }
        });
        // A path that used up its discovery probes became unreachable inside
        // find_map, which then went on to the next path.
        due.and_then(|id| self.control_packet(now, id, CmFlags::NONE))
    }

    /// When [`PathManager::poll_transmit`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        if !self.replies.is_empty() {
            return Some(Timestamp::ZERO);
        }
        self.paths
            .values()
            .filter(|p| self.interfaces.get(&p.interface).is_some_and(|i| i.up))
            .filter_map(|p| match p.state {
                PathState::Probing { .. } | PathState::Dead => Some(p.next_probe),
                PathState::Active => {
                    let heartbeat = p
                        .last_sent
                        .map_or(Timestamp::ZERO, |t| t + self.config.heartbeat_interval);
                    let dead = p
                        .last_heard
                        .map_or(heartbeat, |t| t + self.config.dead_after);
                    Some(heartbeat.min(dead))
                }
                PathState::Unreachable => None,
            })
            .min()
    }

    fn check_liveness(&mut self, now: Timestamp) {
        let dead_after = self.config.dead_after;
        let forget_after = self.config.forget_after;
        let mut forgotten = Vec::new();
        for path in self.paths.values_mut() {
            let silent = path.last_heard.map(|heard| now.saturating_since(heard));
            if path.state == PathState::Active && silent.is_some_and(|s| s >= dead_after) {
                path.state = PathState::Dead;
                path.next_probe = now;
                self.events.push_back(PathEvent::Down {
                    node: path.node,
                    path: path.id,
                });
            }
            if path.state == PathState::Dead && silent.is_some_and(|s| s >= forget_after) {
                forgotten.push(path.id);
            }
        }
        for id in forgotten {
            self.remove_path(id);
        }
        for node in self.nodes.expire(now, forget_after) {
            self.feedback.forget_node(node);
            self.ip_change_pending.remove(&node);
            let orphaned: Vec<PathId> = self.paths_to(node).map(|p| p.id).collect();
            for id in orphaned {
                self.remove_path(id);
            }
        }
    }

    /// The handshake query ([`CmFlags::ENABLE`], Path ID 0, the local address list)
    /// to send from `interface` to a configured peer endpoint `remote` whose node
    /// ID is not known yet. The peer's `CONFIRM` creates the first path.
    pub fn enable_packet(
        &self,
        now: Timestamp,
        interface: InterfaceId,
        remote: SocketAddr,
    ) -> Result<Transmit, PathError> {
        let local = self
            .interfaces
            .get(&interface)
            .filter(|i| i.up)
            .ok_or(PathError::UnknownInterface(interface))?
            .address;
        Ok(Transmit {
            path: PathId(0),
            interface,
            local,
            remote,
            repr: CmRepr {
                flags: CmFlags::ENABLE,
                node_id: self.local_node,
                session_id: SessionId::CONTROL,
                path_id: PathId(0),
                feedback: None,
                timestamp: now.to_wire(),
                sequence: 0,
                addresses: self.local_addresses(),
            },
        })
    }

    fn control_packet(&mut self, now: Timestamp, id: PathId, extra: CmFlags) -> Option<Transmit> {
        let addresses = self.local_addresses();
        let path = self.paths.get_mut(&id)?;
        let interface = self.interfaces.get(&path.interface)?;
        if !interface.up {
            return None;
        }
        path.last_sent = Some(now);
        let node = path.node;
        let (local, remote, iface) = (path.local, path.remote, path.interface);
        let mut flags = CmFlags::HEARTBEAT.union(extra);
        if self.ip_change_pending.remove(&node) {
            flags.insert(CmFlags::IP_CHANGE);
        }
        // Carry a pending sample of any session, sessions in turn, and name that
        // session so the sample reaches the right table.
        let (session, feedback) = match self.feedback.take_any(node) {
            Some((session, feedback)) => (session, Some(feedback)),
            None => (SessionId::CONTROL, None),
        };
        Some(Transmit {
            path: id,
            interface: iface,
            local,
            remote,
            repr: CmRepr {
                flags,
                node_id: self.local_node,
                session_id: session,
                path_id: id,
                feedback,
                timestamp: now.to_wire(),
                sequence: 0,
                addresses,
            },
        })
    }

    /// Marks `id` heard at `now`; returns whether it was already active.
    fn mark_heard(&mut self, now: Timestamp, id: PathId) -> bool {
        let Some(path) = self.paths.get_mut(&id) else {
            return false;
        };
        path.last_heard = Some(now);
        if path.state == PathState::Active {
            return true;
        }
        let up = self.interfaces.get(&path.interface).is_some_and(|i| i.up);
        if up {
            path.state = PathState::Active;
            self.events.push_back(PathEvent::Up {
                node: path.node,
                path: id,
            });
        }
        false
    }

    fn discover_all(&mut self, now: Timestamp) {
        let nodes: Vec<NodeId> = self.nodes.nodes().collect();
        for node in nodes {
            self.discover(now, node);
        }
    }

    /// Creates a probing path for every (up interface × known endpoint of `node`)
    /// pair of the same address family that has none.
    fn discover(&mut self, now: Timestamp, node: NodeId) {
        let Some(entry) = self.nodes.get(node) else {
            return;
        };
        let endpoints = entry.endpoints();
        let interfaces: Vec<(InterfaceId, Interface)> = self
            .interfaces
            .iter()
            .filter(|(_, i)| i.up)
            .map(|(id, i)| (*id, *i))
            .collect();
        for (iface, info) in interfaces {
            for remote in &endpoints {
                if remote.is_ipv4() != info.address.is_ipv4() {
                    continue;
                }
                let exists = self
                    .paths
                    .values()
                    .any(|p| p.interface == iface && p.remote == *remote);
                if !exists && self.create_path(now, node, iface, *remote).is_err() {
                    return;
                }
            }
        }
    }

    fn retry_unreachable(&mut self, now: Timestamp) {
        for path in self.paths.values_mut() {
            if path.state == PathState::Unreachable {
                path.state = PathState::Probing { probes_sent: 0 };
                path.next_probe = now;
            }
        }
    }

    fn create_path(
        &mut self,
        now: Timestamp,
        node: NodeId,
        interface: InterfaceId,
        remote: SocketAddr,
    ) -> Result<PathId, PathError> {
        let local = self
            .interfaces
            .get(&interface)
            .ok_or(PathError::UnknownInterface(interface))?
            .address;
        let id = (1..=u8::MAX)
            .map(PathId)
            .find(|id| !self.paths.contains_key(id))
            .ok_or(PathError::Exhausted)?;
        self.paths.insert(
            id,
            Path {
                id,
                node,
                interface,
                local,
                remote,
                state: PathState::Probing { probes_sent: 0 },
                last_heard: None,
                last_sent: None,
                next_probe: now,
            },
        );
        self.events.push_back(PathEvent::Added { node, path: id });
        Ok(id)
    }

    fn remove_path(&mut self, id: PathId) {
        if let Some(path) = self.paths.remove(&id) {
            self.rediscover.insert(path.node);
            self.replies.retain(|(r, _)| *r != id);
            self.events.push_back(PathEvent::Removed {
                node: path.node,
                path: id,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: NodeId = NodeId([2, 0, 0, 0, 0, 2]);
    const PEER: NodeId = NodeId([2, 0, 0, 0, 0, 1]);
    const IFACE: InterfaceId = InterfaceId(1);

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn manager(now: Timestamp) -> PathManager {
        let mut pm = PathManager::new(PathConfig::default(), ME);
        pm.handle_interface_up(now, IFACE, addr("198.51.100.1:4789"));
        pm
    }

    fn from_peer(flags: CmFlags, session: u16, path: u8, now: Timestamp) -> CmRepr {
        CmRepr {
            flags,
            node_id: PEER,
            session_id: SessionId(session),
            path_id: PathId(path),
            feedback: None,
            timestamp: now.to_wire(),
            sequence: 0,
            addresses: vec![],
        }
    }

    fn drain(pm: &mut PathManager, now: Timestamp) -> Vec<Transmit> {
        std::iter::from_fn(|| pm.poll_transmit(now)).collect()
    }

    #[test]
    fn enable_is_confirmed_on_the_path_it_came_over() {
        let now = Timestamp::from_secs(1);
        let mut pm = manager(now);
        let client = addr("203.0.113.1:61001");
        pm.handle_received(now, IFACE, client, &from_peer(CmFlags::ENABLE, 0, 0, now));
        let sent = drain(&mut pm, now);
        let confirm = sent
            .iter()
            .find(|t| t.repr.flags.contains(CmFlags::CONFIRM))
            .expect("a CONFIRM is sent");
        assert_eq!(confirm.remote, client);
        assert!(confirm.repr.addresses.contains(&addr("198.51.100.1:4789")));
        assert!(pm.path_between(IFACE, client).unwrap().is_active());
        assert_eq!(
            pm.poll_event(),
            Some(PathEvent::Added {
                node: PEER,
                path: confirm.path
            })
        );
    }

    #[test]
    fn heartbeats_return_feedback_for_one_way_sessions() {
        let mut now = Timestamp::from_secs(1);
        let mut pm = manager(now);
        let client = addr("203.0.113.1:61001");
        let mut data_feedback = 0;
        for ms in 0..1000u64 {
            now = Timestamp::from_secs(1) + Duration::from_millis(ms);
            // The peer streams data of session 7 every 10 ms and heartbeats every 100 ms.
            if ms % 10 == 0 {
                pm.handle_received(now, IFACE, client, &from_peer(CmFlags::NONE, 7, 3, now));
            }
            if ms % 100 == 0 {
                pm.handle_received(
                    now,
                    IFACE,
                    client,
                    &from_peer(CmFlags::HEARTBEAT, 0, 3, now),
                );
            }
            for t in drain(&mut pm, now) {
                assert!(t.repr.flags.contains(CmFlags::HEARTBEAT));
                if t.repr.session_id == SessionId(7) {
                    assert_eq!(t.repr.feedback.map(|f| f.path_id), Some(PathId(3)));
                    data_feedback += 1;
                }
            }
        }
        // One heartbeat per 100 ms, taking the two sessions in turn.
        assert!(data_feedback >= 4, "only {data_feedback} samples returned");
    }

    #[test]
    fn ip_change_from_the_peer_keeps_only_the_notifying_path() {
        let now = Timestamp::from_secs(1);
        let mut pm = manager(now);
        let old = addr("203.0.113.2:61002");
        let via = addr("203.0.113.1:61001");
        pm.handle_received(now, IFACE, old, &from_peer(CmFlags::HEARTBEAT, 0, 2, now));
        pm.handle_received(now, IFACE, via, &from_peer(CmFlags::HEARTBEAT, 0, 1, now));
        assert_eq!(pm.paths_to(PEER).count(), 2);
        let old_id = pm.path_between(IFACE, old).unwrap().id;
        while pm.poll_event().is_some() {}
        let mut change = from_peer(CmFlags::IP_CHANGE.union(CmFlags::HEARTBEAT), 0, 1, now);
        change.addresses = vec![addr("10.0.3.2:4789")];
        pm.handle_received(now, IFACE, via, &change);
        assert!(pm.path_between(IFACE, old).is_none());
        assert!(pm.path_between(IFACE, via).unwrap().is_active());
        assert_eq!(
            pm.poll_event(),
            Some(PathEvent::Removed {
                node: PEER,
                path: old_id
            })
        );
        // Discovery toward the newly announced address starts at once.
        assert!(pm.path_between(IFACE, addr("10.0.3.2:4789")).is_some());
    }

    #[test]
    fn feedback_for_our_path_confirms_it_and_is_reported() {
        let now = Timestamp::from_secs(1);
        let mut pm = manager(now);
        let client = addr("203.0.113.1:61001");
        pm.handle_received(
            now,
            IFACE,
            client,
            &from_peer(CmFlags::HEARTBEAT, 0, 1, now),
        );
        let ours = pm.path_between(IFACE, client).unwrap().id;
        while pm.poll_event().is_some() {}
        let mut repr = from_peer(CmFlags::NONE, 9, 1, now);
        repr.feedback = Some(crate::wire::Feedback {
            path_id: ours,
            delay_us: 4242,
        });
        pm.handle_received(now, IFACE, client, &repr);
        assert_eq!(
            pm.poll_event(),
            Some(PathEvent::DelayFeedback {
                node: PEER,
                session: SessionId(9),
                path: ours,
                delay_us: 4242
            })
        );
        // Data CM blocks carry the sample owed for their session, and no address list.
        let cm = pm.data_cm(now, SessionId(9), ours, 5).unwrap();
        assert_eq!(cm.feedback.map(|f| f.path_id), Some(PathId(1)));
        assert!(cm.addresses.is_empty());
        assert_eq!(cm.buffer_len(), crate::wire::FIXED_LEN);
    }

    #[test]
    fn own_packets_unknown_ids_and_exhaustion() {
        let now = Timestamp::from_secs(1);
        let mut pm = manager(now);
        let mut own = from_peer(CmFlags::HEARTBEAT, 0, 1, now);
        own.node_id = ME;
        pm.handle_received(now, IFACE, addr("203.0.113.9:1"), &own);
        assert_eq!(
            pm.paths().count(),
            0,
            "a looped-back packet creates nothing"
        );
        assert_eq!(
            pm.enable_packet(now, InterfaceId(99), addr("192.0.2.1:1")),
            Err(PathError::UnknownInterface(InterfaceId(99)))
        );
        assert_eq!(
            pm.note_sent(now, PathId(7)),
            Err(PathError::UnknownPath(PathId(7)))
        );
        for port in 0..300u16 {
            let source = SocketAddr::new([203, 0, 113, 1].into(), 10_000 + port);
            pm.handle_received(
                now,
                IFACE,
                source,
                &from_peer(CmFlags::HEARTBEAT, 0, 1, now),
            );
        }
        assert_eq!(pm.paths().count(), usize::from(u8::MAX));
    }

    #[test]
    fn long_dead_paths_and_silent_nodes_are_forgotten() {
        let now = Timestamp::from_secs(1);
        let mut pm = manager(now);
        let client = addr("203.0.113.1:61001");
        pm.handle_received(
            now,
            IFACE,
            client,
            &from_peer(CmFlags::HEARTBEAT, 0, 1, now),
        );
        let id = pm.path_between(IFACE, client).unwrap().id;
        let config = PathConfig::default();
        drain(&mut pm, now + config.dead_after);
        assert_eq!(pm.path(id).unwrap().state, PathState::Dead);
        drain(&mut pm, now + config.forget_after);
        assert!(pm.path(id).is_none());
        assert!(pm.nodes().get(PEER).is_none());
        let mut removed = false;
        while let Some(event) = pm.poll_event() {
            removed |= event
                == (PathEvent::Removed {
                    node: PEER,
                    path: id,
                });
        }
        assert!(removed);
    }

    #[test]
    fn poll_timeout_tracks_heartbeats_and_death() {
        let now = Timestamp::from_secs(1);
        let mut pm = manager(now);
        assert_eq!(pm.poll_timeout(), None, "no peer, nothing to do");
        let client = addr("203.0.113.1:61001");
        pm.handle_received(
            now,
            IFACE,
            client,
            &from_peer(CmFlags::HEARTBEAT, 0, 1, now),
        );
        drain(&mut pm, now);
        let config = PathConfig::default();
        assert_eq!(pm.poll_timeout(), Some(now + config.heartbeat_interval));
        let later = now + config.dead_after;
        drain(&mut pm, later);
        assert_eq!(
            pm.path_between(IFACE, client).unwrap().state,
            PathState::Dead
        );
    }
}
