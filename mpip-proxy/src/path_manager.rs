//! Path manager: discovery, liveness, heartbeats and address changes
//! (§III-D, `PROTOCOL.md` §5–7). Sans-IO: feed it received CM blocks and
//! interface events, poll it for control packets to send and for [`PathEvent`]s.
//!
//! Paths are kept per peer node (one NAT mapping per UDP path is shared by all
//! sessions), and path IDs are allocated per peer: the one-byte wire field
//! names one of up to 255 paths toward that peer, so a proxy end serves any
//! number of clients. The per-session Path Information Tables
//! ([`crate::table::path`]) follow the [`PathEvent`]s.
//!
//! Nothing here scans every path or every peer on the packet path: received
//! datagrams find their path through an index, and the timers of all paths
//! (probes, heartbeats, keepalives, death) sit in one priority queue.
//!
//! Heartbeats flow only while a peer is **busy**: a data packet went to it or
//! came from it within [`PathConfig::linger`]. An idle peer's paths are kept
//! alive by one keepalive per path per [`PathConfig::keepalive_interval`],
//! sent by the end that initiates the handshake (the client; the proxy end
//! answers them), so an idle phone's radio can sleep (`PROTOCOL.md` §6.2).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
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
    /// Interval between probes on a path being discovered, or on a dead path
    /// of a busy peer.
    pub probe_interval: Duration,
    /// While the peer is busy, a heartbeat is sent on an active path idle
    /// (nothing sent) for this long.
    pub heartbeat_interval: Duration,
    /// While the peer is busy, an active path with nothing heard for this long is dead.
    pub dead_after: Duration,
    /// Probes sent on a never-confirmed path before it is marked unreachable.
    pub discovery_probes: u32,
    /// A dead path silent this long is removed, and observed endpoints and
    /// nodes silent this long are forgotten (stale NAT mappings). Discovery
    /// re-creates paths to endpoints still announced.
    pub forget_after: Duration,
    /// A peer is busy while a data packet went to it or came from it this
    /// recently; only then do heartbeats flow.
    pub linger: Duration,
    /// An idle peer's active paths get one keepalive per this interval (NAT
    /// bindings), from the end with [`PathConfig::sends_keepalives`].
    pub keepalive_interval: Duration,
    /// Whether this end sends keepalives (and probes dead paths) while idle:
    /// the client does; the proxy end answers them instead.
    pub sends_keepalives: bool,
    /// Authentication on (`PROTOCOL.md` §11.3): a path becomes active only
    /// once a datagram over it proves the peer answers there (it echoes a
    /// counter sent over that path), so a recorded datagram delivered from
    /// another address makes no path toward that address. Control packets
    /// carry the echo of the path's latest counter in Packet Sequence.
    pub require_proof: bool,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            probe_interval: Duration::from_millis(200),
            heartbeat_interval: Duration::from_millis(100),
            dead_after: Duration::from_millis(400),
            discovery_probes: 5,
            forget_after: Duration::from_secs(60),
            linger: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(15),
            sends_keepalives: true,
            require_proof: false,
        }
    }
}

impl PathConfig {
    /// While idle, an active path with nothing heard for this long is dead:
    /// two keepalive intervals and the busy dead time, so one lost keepalive
    /// (or its answer) is not fatal.
    pub fn idle_dead_after(&self) -> Duration {
        self.keepalive_interval * 2 + self.dead_after
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

/// Packets and bytes one path carried (UDP payload bytes: CM block included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathCounters {
    /// Datagrams sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Datagrams received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
}

/// One path toward a peer node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    /// This node's ID of the path, unique among the paths toward [`Path::node`].
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
    /// Traffic.
    pub counters: PathCounters,
    /// Whether a datagram over the path proved the peer answers there (only
    /// tracked with [`PathConfig::require_proof`]).
    pub proven: bool,
    /// The latest authentication counter received over the path.
    rx_counter: Option<u64>,
    /// The first and latest authentication counters sent over the path.
    tx_counters: Option<(u64, u64)>,
    created: Timestamp,
    next_probe: Timestamp,
    /// The earliest time this path is in the timer queue for.
    scheduled: Option<Timestamp>,
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
    /// The peer node; `None` for a handshake query sent before its ID is known.
    pub node: Option<NodeId>,
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
    /// All 255 path IDs toward the peer are in use.
    #[error("no free path ID toward the peer")]
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

/// Everything the path manager keeps about one peer node.
#[derive(Debug, Clone, Default)]
struct Peer {
    paths: BTreeMap<PathId, Path>,
    /// Delay samples owed to the peer.
    feedback: FeedbackQueue,
    /// Last data packet sent to or received from the peer.
    last_data: Option<Timestamp>,
    /// When the peer last turned busy (the base of busy dead-path detection).
    busy_since: Option<Timestamp>,
    /// `IP_CHANGE` goes on the next control packet to the peer.
    ip_change_pending: bool,
    /// The peer lost a path since its last discovery run.
    rediscover: bool,
}

impl Peer {
    fn busy(&self, now: Timestamp, linger: Duration) -> bool {
        self.last_data
            .is_some_and(|t| now.saturating_since(t) < linger)
    }
}

/// How often observed endpoints and silent nodes are expired.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(5);

/// The path manager of one node.
#[derive(Debug, Clone)]
pub struct PathManager {
    config: PathConfig,
    local_node: NodeId,
    interfaces: BTreeMap<InterfaceId, Interface>,
    nodes: NodeTable,
    peers: HashMap<NodeId, Peer>,
    /// (local interface, remote endpoint) → the path using it.
    by_endpoint: HashMap<(InterfaceId, SocketAddr), (NodeId, PathId)>,
    /// Every path's next timer (probe, heartbeat, keepalive, death, removal).
    /// An entry may be early (the path's due time moved later) or stale (the
    /// path is gone); [`Path::scheduled`] tells the current one.
    timers: BinaryHeap<Reverse<(Timestamp, NodeId, PathId)>>,
    events: VecDeque<PathEvent>,
    replies: VecDeque<(NodeId, PathId, CmFlags)>,
    next_housekeeping: Option<Timestamp>,
}

impl PathManager {
    /// A path manager for the node `local_node`, with no interface yet.
    pub fn new(config: PathConfig, local_node: NodeId) -> Self {
        PathManager {
            config,
            local_node,
            interfaces: BTreeMap::new(),
            nodes: NodeTable::new(),
            peers: HashMap::new(),
            by_endpoint: HashMap::new(),
            timers: BinaryHeap::new(),
            events: VecDeque::new(),
            replies: VecDeque::new(),
            next_housekeeping: None,
        }
    }

    /// This node's ID.
    pub fn local_node(&self) -> NodeId {
        self.local_node
    }

    /// The timing in use.
    pub fn config(&self) -> PathConfig {
        self.config
    }

    /// Changes the timing (a configuration reload); every path's timer is
    /// re-evaluated at `now`.
    pub fn set_config(&mut self, now: Timestamp, config: PathConfig) {
        self.config = config;
        let keys: Vec<(NodeId, PathId)> = self
            .peers
            .iter()
            .flat_map(|(n, p)| p.paths.keys().map(move |id| (*n, *id)))
            .collect();
        for (node, id) in keys {
            self.schedule_at(now, node, id);
        }
    }

    /// The node ID ↔ endpoint table.
    pub fn nodes(&self) -> &NodeTable {
        &self.nodes
    }

    /// Every path.
    pub fn paths(&self) -> impl Iterator<Item = &Path> + '_ {
        self.peers.values().flat_map(|p| p.paths.values())
    }

    /// Number of paths.
    pub fn path_count(&self) -> usize {
        self.by_endpoint.len()
    }

    /// The paths toward `node`.
    pub fn paths_to(&self, node: NodeId) -> impl Iterator<Item = &Path> + '_ {
        self.peers
            .get(&node)
            .into_iter()
            .flat_map(|p| p.paths.values())
    }

    /// The path `id` toward `node`.
    pub fn path(&self, node: NodeId, id: PathId) -> Option<&Path> {
        self.peers.get(&node)?.paths.get(&id)
    }

    fn path_mut(&mut self, node: NodeId, id: PathId) -> Option<&mut Path> {
        self.peers.get_mut(&node)?.paths.get_mut(&id)
    }

    /// The path on `interface` toward `remote`, if any.
    pub fn path_between(&self, interface: InterfaceId, remote: SocketAddr) -> Option<&Path> {
        let (node, id) = self.by_endpoint.get(&(interface, remote))?;
        self.path(*node, *id)
    }

    /// Whether a data packet went to `node` or came from it within the linger time.
    pub fn is_busy(&self, now: Timestamp, node: NodeId) -> bool {
        self.peers
            .get(&node)
            .is_some_and(|p| p.busy(now, self.config.linger))
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
                let keys = self.paths_on(interface);
                for (node, id) in keys {
                    if let Some(path) = self.path_mut(node, id) {
                        if path.state != PathState::Active {
                            if path.state == PathState::Unreachable {
                                path.state = PathState::Probing { probes_sent: 0 };
                            }
                            path.next_probe = now;
                        }
                    }
                    self.schedule_at(now, node, id);
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

    /// An interface that is no longer configured: its paths are removed.
    pub fn remove_interface(&mut self, interface: InterfaceId) {
        self.interfaces.remove(&interface);
        for (node, id) in self.paths_on(interface) {
            self.remove_path(node, id);
        }
    }

    fn paths_on(&self, interface: InterfaceId) -> Vec<(NodeId, PathId)> {
        self.by_endpoint
            .iter()
            .filter(|((i, _), _)| *i == interface)
            .map(|(_, key)| *key)
            .collect()
    }

    /// An interface went down: its paths are dead at once and not probed until it
    /// comes back.
    pub fn handle_interface_down(&mut self, _now: Timestamp, interface: InterfaceId) {
        if let Some(entry) = self.interfaces.get_mut(&interface) {
            entry.up = false;
        }
        for (node, id) in self.paths_on(interface) {
            if let Some(path) = self.path_mut(node, id) {
                if path.state == PathState::Active {
                    path.state = PathState::Dead;
                    self.events.push_back(PathEvent::Down { node, path: id });
                }
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
        for (node, id) in self.paths_on(interface) {
            self.remove_path(node, id);
        }
        let known: Vec<NodeId> = self.nodes.nodes().collect();
        for node in known {
            self.peers.entry(node).or_default().ip_change_pending = true;
        }
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
        self.handle_received_proven(now, interface, remote, repr, true);
    }

    /// Like [`PathManager::handle_received`], for an authentic datagram that
    /// `proves` its path or not ([`PathConfig::require_proof`]); its counter,
    /// if tagged, becomes the path's echo.
    pub fn handle_received_proven(
        &mut self,
        now: Timestamp,
        interface: InterfaceId,
        remote: SocketAddr,
        repr: &CmRepr,
        proves: bool,
    ) {
        let node = repr.node_id;
        if node == self.local_node {
            return;
        }
        // Discovery only has new pairs to find when the node's endpoints
        // changed or one of its paths went away; not on every datagram.
        let mut endpoints_changed = true;
        // An address change lists the new addresses; one without is bogus.
        if repr.flags.contains(CmFlags::IP_CHANGE) && !repr.addresses.is_empty() {
            self.nodes
                .reset_after_ip_change(now, node, remote, &repr.addresses);
            let stale: Vec<PathId> = self
                .paths_to(node)
                .filter(|p| !(p.interface == interface && p.remote == remote))
                .map(|p| p.id)
                .collect();
            for id in stale {
                self.remove_path(node, id);
            }
        } else {
            endpoints_changed = self.nodes.observe(now, node, remote);
            if !repr.addresses.is_empty() {
                endpoints_changed |= self.nodes.announce(node, &repr.addresses);
            }
        }

        // The datagram proves the path (interface, remote) works inbound.
        let id = match self.by_endpoint.get(&(interface, remote)).copied() {
            Some((owner, id)) if owner == node => Some(id),
            Some((owner, id)) => {
                // Another node's endpoint: a reused NAT mapping takes over a
                // path that is no longer active; an active one stays its owner's.
                if self.path(owner, id).is_some_and(Path::is_active) {
                    None
                } else {
                    self.remove_path(owner, id);
                    self.create_path(now, node, interface, remote).ok()
                }
            }
            None => self.create_path(now, node, interface, remote).ok(),
        };
        if let Some(id) = id {
            if let (Some(auth), Some(path)) = (repr.auth, self.path_mut(node, id)) {
                path.rx_counter = Some(
                    path.rx_counter
                        .map_or(auth.counter, |c| c.max(auth.counter)),
                );
            }
            if proves {
                if let Some(path) = self.path_mut(node, id) {
                    path.proven = true;
                }
            }
            let was_active = self.mark_heard(now, node, id);
            let busy = self.is_busy(now, node);
            if repr.flags.contains(CmFlags::ENABLE) {
                // Handshake query: confirm on the path it came over.
                self.replies.push_back((node, id, CmFlags::CONFIRM));
            } else if !was_active {
                // Answer at once so the peer's side of the path comes up too.
                self.replies.push_back((node, id, CmFlags::NONE));
            } else if !busy
                && !self.config.sends_keepalives
                && repr.flags.contains(CmFlags::HEARTBEAT)
            {
                // An idle peer's keepalive: answer it (at most once per
                // heartbeat interval), so the peer hears the path.
                let recent = self
                    .path(node, id)
                    .and_then(|p| p.last_sent)
                    .is_some_and(|t| now.saturating_since(t) < self.config.heartbeat_interval);
                if !recent {
                    self.replies.push_back((node, id, CmFlags::NONE));
                }
            }
        }

        let sample = one_way_delay_sample(repr.timestamp, now);
        let peer = self.peers.entry(node).or_default();
        peer.feedback.record(repr.session_id, repr.path_id, sample);

        if let Some(feedback) = repr.feedback {
            let usable = self
                .path(node, feedback.path_id)
                .is_some_and(|p| p.proven || !self.config.require_proof);
            if usable {
                self.mark_heard(now, node, feedback.path_id);
                self.events.push_back(PathEvent::DelayFeedback {
                    node,
                    session: repr.session_id,
                    path: feedback.path_id,
                    delay_us: feedback.delay_us,
                });
            }
        }
        let rediscover = self
            .peers
            .get_mut(&node)
            .is_some_and(|p| std::mem::take(&mut p.rediscover));
        if rediscover || endpoints_changed {
            self.discover(now, node);
        }
    }

    /// Answers the datagram just received on `interface` from `remote` with a
    /// control packet on its path, unless one went out on that path within
    /// the heartbeat interval (authentication challenges and their answers).
    pub fn answer(&mut self, now: Timestamp, interface: InterfaceId, remote: SocketAddr) {
        let Some((node, id)) = self.by_endpoint.get(&(interface, remote)).copied() else {
            return;
        };
        let interval = self.config.heartbeat_interval;
        let recent = self
            .path(node, id)
            .and_then(|p| p.last_sent)
            .is_some_and(|t| now.saturating_since(t) < interval);
        let queued = self.replies.iter().any(|(n, p, _)| *n == node && *p == id);
        if !recent && !queued {
            self.replies.push_back((node, id, CmFlags::NONE));
        }
    }

    /// Whether `echo` (a control packet's Packet Sequence) is the low 32 bits
    /// of an authentication counter this node sent over the path on
    /// `interface` toward `remote`: proof that the peer hears that path.
    pub fn path_echoes(&self, interface: InterfaceId, remote: SocketAddr, echo: u32) -> bool {
        self.path_between(interface, remote)
            .and_then(|p| p.tx_counters)
            .is_some_and(|(first, last)| {
                let span = last - first;
                span < 1 << 31 && u64::from(echo.wrapping_sub(first as u32)) <= span
            })
    }

    /// Records the authentication counter of a datagram sent on `path`
    /// toward `node`.
    pub fn note_tx_counter(&mut self, node: NodeId, path: PathId, counter: u64) {
        if let Some(path) = self.path_mut(node, path) {
            path.tx_counters = Some(match path.tx_counters {
                Some((first, _)) => (first, counter),
                None => (counter, counter),
            });
        }
    }

    /// Records a data packet sent to or received from `node` at `now`: the
    /// peer is busy, and heartbeats flow on its paths until it has been quiet
    /// for the linger time.
    pub fn note_data(&mut self, now: Timestamp, node: NodeId) {
        let linger = self.config.linger;
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        let was_busy = peer.busy(now, linger);
        peer.last_data = Some(now);
        if !was_busy {
            peer.busy_since = Some(now);
            let ids: Vec<PathId> = peer.paths.keys().copied().collect();
            for id in ids {
                if let Some(path) = self.path_mut(node, id) {
                    match path.state {
                        PathState::Dead => path.next_probe = path.next_probe.min(now),
                        // Traffic is worth another round of discovery.
                        PathState::Unreachable => {
                            path.state = PathState::Probing { probes_sent: 0 };
                            path.next_probe = now;
                        }
                        _ => {}
                    }
                }
                self.schedule_at(now, node, id);
            }
        }
    }

    /// Counts a datagram of `bytes` sent on path `path` toward `node` (its
    /// send time was recorded when its CM block was built).
    pub fn count_sent(
        &mut self,
        node: NodeId,
        path: PathId,
        bytes: usize,
    ) -> Result<(), PathError> {
        let entry = self
            .path_mut(node, path)
            .ok_or(PathError::UnknownPath(path))?;
        entry.counters.tx_packets += 1;
        entry.counters.tx_bytes += bytes as u64;
        Ok(())
    }

    /// Counts a datagram of `bytes` received over the path on `interface` from `remote`.
    pub fn note_received(&mut self, interface: InterfaceId, remote: SocketAddr, bytes: usize) {
        if let Some((node, id)) = self.by_endpoint.get(&(interface, remote)).copied() {
            if let Some(path) = self.path_mut(node, id) {
                path.counters.rx_packets += 1;
                path.counters.rx_bytes += bytes as u64;
            }
        }
    }

    /// Builds the CM block of a data packet of `session` sent on path `path`
    /// toward `node` with Packet Sequence `sequence`: timestamp and the delay
    /// feedback owed for that session. Data CM blocks never carry an address
    /// list or `IP_CHANGE` (those go on control packets), so they are always
    /// [`crate::wire::FIXED_LEN`] bytes. Records the send time (the caller
    /// counts the bytes with [`PathManager::count_sent`]).
    pub fn data_cm(
        &mut self,
        now: Timestamp,
        node: NodeId,
        session: SessionId,
        path: PathId,
        sequence: u32,
    ) -> Result<CmRepr, PathError> {
        let peer = self
            .peers
            .get_mut(&node)
            .ok_or(PathError::UnknownPath(path))?;
        let entry = peer
            .paths
            .get_mut(&path)
            .ok_or(PathError::UnknownPath(path))?;
        entry.last_sent = Some(now);
        Ok(CmRepr {
            flags: CmFlags::NONE,
            node_id: self.local_node,
            session_id: session,
            path_id: path,
            feedback: peer.feedback.take(session),
            timestamp: now.to_wire(),
            sequence,
            addresses: Vec::new(),
            auth: None,
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
                if let Some(p) = self.path(node, path) {
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
    /// then whatever the due timers send (probes on discovering and dead paths,
    /// heartbeats on idle active paths of busy peers, keepalives). Also detects
    /// dead paths and expires silent nodes. Call until it returns `None`.
    pub fn poll_transmit(&mut self, now: Timestamp) -> Option<Transmit> {
        if self.next_housekeeping.is_none_or(|due| due <= now) {
            self.next_housekeeping = Some(now + HOUSEKEEPING_INTERVAL);
            self.housekeeping(now);
        }
        while let Some((node, id, flags)) = self.replies.pop_front() {
            if let Some(transmit) = self.control_packet(now, node, id, flags) {
                return Some(transmit);
            }
        }
        while let Some(&Reverse((at, node, id))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(path) = self.path_mut(node, id) else {
                continue;
            };
            if path.scheduled != Some(at) {
                continue;
            }
            path.scheduled = None;
            let send = self.run_timer(now, node, id);
            self.schedule_at(now, node, id);
            if send {
                if let Some(transmit) = self.control_packet(now, node, id, CmFlags::NONE) {
                    return Some(transmit);
                }
            }
        }
        None
    }

    /// When [`PathManager::poll_transmit`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        if !self.replies.is_empty() {
            return Some(Timestamp::ZERO);
        }
        let timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
        let housekeeping =
            (!self.peers.is_empty()).then_some(self.next_housekeeping.unwrap_or(Timestamp::ZERO));
        timer.into_iter().chain(housekeeping).min()
    }

    /// What a path's timer does at `now`; returns whether a control packet
    /// (probe, heartbeat or keepalive) goes out on it.
    fn run_timer(&mut self, now: Timestamp, node: NodeId, id: PathId) -> bool {
        let config = self.config;
        let up = self
            .path(node, id)
            .is_some_and(|p| self.interfaces.get(&p.interface).is_some_and(|i| i.up));
        let Some(peer) = self.peers.get_mut(&node) else {
            return false;
        };
        let busy = peer.busy(now, config.linger);
        let busy_since = peer.busy_since;
        let Some(path) = peer.paths.get_mut(&id) else {
            return false;
        };
        if path.state == PathState::Active {
            let silent_since = if busy {
                path.last_heard.max(busy_since).unwrap_or(path.created)
            } else {
                path.last_heard.unwrap_or(path.created)
            };
            let limit = if busy {
                config.dead_after
            } else {
                config.idle_dead_after()
            };
            if now.saturating_since(silent_since) >= limit {
                path.state = PathState::Dead;
                path.next_probe = now;
                self.events.push_back(PathEvent::Down { node, path: id });
            }
        }
        let path = match self.path_mut(node, id) {
            Some(path) => path,
            None => return false,
        };
        match path.state {
            PathState::Probing { probes_sent } if up && path.next_probe <= now => {
                if probes_sent >= config.discovery_probes {
                    path.state = PathState::Unreachable;
                    // The keepalive sender tries again now and then (a
                    // long outage is not forever).
                    path.next_probe = now + config.forget_after;
                    return false;
                }
                path.state = PathState::Probing {
                    probes_sent: probes_sent + 1,
                };
                path.next_probe = now + config.probe_interval;
                true
            }
            PathState::Dead => {
                let silent = path.last_heard.unwrap_or(path.created);
                if now.saturating_since(silent) >= config.forget_after {
                    self.remove_path(node, id);
                    return false;
                }
                if !up || path.next_probe > now {
                    return false;
                }
                if busy {
                    path.next_probe = now + config.probe_interval;
                    true
                } else if config.sends_keepalives {
                    // Idle: one probe per keepalive interval, like a live
                    // path's keepalive; traffic brings the fast probes back.
                    path.next_probe = now + config.keepalive_interval;
                    true
                } else {
                    // The idle proxy end waits for the client's probes.
                    path.next_probe = now + config.keepalive_interval;
                    false
                }
            }
            PathState::Unreachable if up && config.sends_keepalives && path.next_probe <= now => {
                // One probe per forget interval; an answer makes it active.
                path.next_probe = now + config.forget_after;
                true
            }
            PathState::Active if up => {
                let interval = if busy {
                    config.heartbeat_interval
                } else if config.sends_keepalives {
                    config.keepalive_interval
                } else {
                    return false;
                };
                path.last_sent
                    .is_none_or(|sent| now.saturating_since(sent) >= interval)
            }
            _ => false,
        }
    }

    /// When the timer of a path is next due, evaluated at `now`.
    fn due(&self, now: Timestamp, node: NodeId, id: PathId) -> Option<Timestamp> {
        let config = self.config;
        let peer = self.peers.get(&node)?;
        let path = peer.paths.get(&id)?;
        let up = self.interfaces.get(&path.interface).is_some_and(|i| i.up);
        let busy = peer.busy(now, config.linger);
        match path.state {
            PathState::Probing { .. } => up.then_some(path.next_probe),
            PathState::Unreachable => (up && config.sends_keepalives).then_some(path.next_probe),
            PathState::Dead => {
                let forget = path.last_heard.unwrap_or(path.created) + config.forget_after;
                Some(if up {
                    path.next_probe.min(forget)
                } else {
                    forget
                })
            }
            PathState::Active => {
                let (silent_since, limit) = if busy {
                    (
                        path.last_heard.max(peer.busy_since).unwrap_or(path.created),
                        config.dead_after,
                    )
                } else {
                    (
                        path.last_heard.unwrap_or(path.created),
                        config.idle_dead_after(),
                    )
                };
                let dead = silent_since + limit;
                let interval = if busy {
                    Some(config.heartbeat_interval)
                } else {
                    config.sends_keepalives.then_some(config.keepalive_interval)
                };
                let beat = interval
                    .filter(|_| up)
                    .map(|i| path.last_sent.map_or(now, |t| t + i));
                // Idle turns to busy only through `note_data`, which reschedules;
                // busy turns to idle by itself, so wake up then.
                let idle_at = busy.then(|| peer.last_data.unwrap_or(now) + config.linger);
                [Some(dead), beat, idle_at].into_iter().flatten().min()
            }
        }
    }

    /// Puts the path's next due time into the timer queue unless an entry
    /// at or before it is there already.
    fn schedule_at(&mut self, now: Timestamp, node: NodeId, id: PathId) {
        let Some(due) = self.due(now, node, id) else {
            return;
        };
        let due = due.max(now);
        let Some(path) = self.path_mut(node, id) else {
            return;
        };
        if path.scheduled.is_some_and(|s| s <= due) {
            return;
        }
        path.scheduled = Some(due);
        self.timers.push(Reverse((due, node, id)));
    }

    fn housekeeping(&mut self, now: Timestamp) {
        for node in self.nodes.expire(now, self.config.forget_after) {
            let orphaned: Vec<PathId> = self.paths_to(node).map(|p| p.id).collect();
            for id in orphaned {
                self.remove_path(node, id);
            }
            self.peers.remove(&node);
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
            node: None,
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
                auth: None,
            },
        })
    }

    fn control_packet(
        &mut self,
        now: Timestamp,
        node: NodeId,
        id: PathId,
        extra: CmFlags,
    ) -> Option<Transmit> {
        let addresses = self.local_addresses();
        let interfaces = &self.interfaces;
        let peer = self.peers.get_mut(&node)?;
        let path = peer.paths.get_mut(&id)?;
        if !interfaces.get(&path.interface)?.up {
            return None;
        }
        path.last_sent = Some(now);
        let (local, remote, iface) = (path.local, path.remote, path.interface);
        let echo = path.rx_counter.map_or(0, |c| c as u32);
        let mut flags = CmFlags::HEARTBEAT.union(extra);
        if std::mem::take(&mut peer.ip_change_pending) {
            flags.insert(CmFlags::IP_CHANGE);
        }
        // Carry a pending sample of any session, sessions in turn, and name that
        // session so the sample reaches the right table.
        let (session, feedback) = match peer.feedback.take_any() {
            Some((session, feedback)) => (session, Some(feedback)),
            None => (SessionId::CONTROL, None),
        };
        Some(Transmit {
            node: Some(node),
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
                sequence: if self.config.require_proof { echo } else { 0 },
                addresses,
                auth: None,
            },
        })
    }

    /// Marks the path heard at `now`; returns whether it was already active.
    fn mark_heard(&mut self, now: Timestamp, node: NodeId, id: PathId) -> bool {
        let up = self
            .path(node, id)
            .is_some_and(|p| self.interfaces.get(&p.interface).is_some_and(|i| i.up));
        let require_proof = self.config.require_proof;
        let Some(path) = self.path_mut(node, id) else {
            return false;
        };
        path.last_heard = Some(now);
        if path.state == PathState::Active {
            return true;
        }
        if up && (path.proven || !require_proof) {
            path.state = PathState::Active;
            self.events.push_back(PathEvent::Up { node, path: id });
            self.schedule_at(now, node, id);
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
                if !self.by_endpoint.contains_key(&(iface, *remote))
                    && self.create_path(now, node, iface, *remote).is_err()
                {
                    return;
                }
            }
        }
    }

    fn retry_unreachable(&mut self, now: Timestamp) {
        let keys: Vec<(NodeId, PathId)> = self
            .paths()
            .filter(|p| p.state == PathState::Unreachable)
            .map(|p| (p.node, p.id))
            .collect();
        for (node, id) in keys {
            if let Some(path) = self.path_mut(node, id) {
                path.state = PathState::Probing { probes_sent: 0 };
                path.next_probe = now;
            }
            self.schedule_at(now, node, id);
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
        let peer = self.peers.entry(node).or_default();
        let id = (1..=u8::MAX)
            .map(PathId)
            .find(|id| !peer.paths.contains_key(id))
            .ok_or(PathError::Exhausted)?;
        peer.paths.insert(
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
                counters: PathCounters::default(),
                proven: false,
                rx_counter: None,
                tx_counters: None,
                created: now,
                next_probe: now,
                scheduled: None,
            },
        );
        self.by_endpoint.insert((interface, remote), (node, id));
        self.events.push_back(PathEvent::Added { node, path: id });
        self.schedule_at(now, node, id);
        Ok(id)
    }

    fn remove_path(&mut self, node: NodeId, id: PathId) {
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        if let Some(path) = peer.paths.remove(&id) {
            peer.rediscover = true;
            if self.by_endpoint.get(&(path.interface, path.remote)) == Some(&(node, id)) {
                self.by_endpoint.remove(&(path.interface, path.remote));
            }
            self.replies.retain(|(n, r, _)| !(*n == node && *r == id));
            self.events.push_back(PathEvent::Removed { node, path: id });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: NodeId = NodeId([2, 0, 0, 0, 0, 2]);
    const PEER: NodeId = NodeId([2, 0, 0, 0, 0, 1]);
    const OTHER: NodeId = NodeId([2, 0, 0, 0, 0, 3]);
    const IFACE: InterfaceId = InterfaceId(1);

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn manager_with(config: PathConfig) -> PathManager {
        let mut pm = PathManager::new(config, ME);
        pm.handle_interface_up(Timestamp::from_secs(1), IFACE, addr("198.51.100.1:4789"));
        pm
    }

    fn manager(_now: Timestamp) -> PathManager {
        manager_with(PathConfig::default())
    }

    fn from(node: NodeId, flags: CmFlags, session: u16, path: u8, now: Timestamp) -> CmRepr {
        CmRepr {
            flags,
            node_id: node,
            session_id: SessionId(session),
            path_id: PathId(path),
            feedback: None,
            timestamp: now.to_wire(),
            sequence: 0,
            addresses: vec![],
            auth: None,
        }
    }

    fn from_peer(flags: CmFlags, session: u16, path: u8, now: Timestamp) -> CmRepr {
        from(PEER, flags, session, path, now)
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
        assert_eq!(confirm.node, Some(PEER));
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
                pm.note_data(now, PEER);
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
        let cm = pm.data_cm(now, PEER, SessionId(9), ours, 5).unwrap();
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
            pm.count_sent(PEER, PathId(7), 1),
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
    fn path_ids_are_per_peer() {
        let now = Timestamp::from_secs(1);
        let mut pm = manager(now);
        // 300 peers, one path each: every peer's first path is path 1.
        for i in 0..300u16 {
            let node = NodeId([6, 0, 0, 0, (i >> 8) as u8, i as u8]);
            let source = SocketAddr::new([203, 0, 113, 1].into(), 10_000 + i);
            pm.handle_received(
                now,
                IFACE,
                source,
                &from(node, CmFlags::HEARTBEAT, 0, 1, now),
            );
            assert_eq!(
                pm.path_between(IFACE, source).map(|p| p.id),
                Some(PathId(1))
            );
        }
        assert_eq!(pm.path_count(), 300);
        // Another node on an active path's endpoint takes nothing; once the
        // path died (a reused NAT mapping), the endpoint moves.
        let source = SocketAddr::new([203, 0, 113, 1].into(), 10_000);
        let first = NodeId([6, 0, 0, 0, 0, 0]);
        pm.handle_received(
            now,
            IFACE,
            source,
            &from(OTHER, CmFlags::HEARTBEAT, 0, 1, now),
        );
        assert_eq!(pm.path_between(IFACE, source).map(|p| p.node), Some(first));
        let later = now + PathConfig::default().idle_dead_after();
        drain(&mut pm, later);
        assert_eq!(
            pm.path_between(IFACE, source).map(|p| p.state),
            Some(PathState::Dead)
        );
        pm.handle_received(
            later,
            IFACE,
            source,
            &from(OTHER, CmFlags::HEARTBEAT, 0, 1, later),
        );
        assert_eq!(pm.path_between(IFACE, source).map(|p| p.node), Some(OTHER));
        assert_eq!(pm.path_count(), 300);
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
        drain(&mut pm, now + config.idle_dead_after());
        assert_eq!(pm.path(PEER, id).unwrap().state, PathState::Dead);
        drain(&mut pm, now + config.forget_after + Duration::from_secs(5));
        assert!(pm.path(PEER, id).is_none());
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
    fn busy_peers_get_heartbeats_and_fast_death() {
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
        pm.note_data(now, PEER);
        assert_eq!(pm.poll_timeout(), Some(now + config.heartbeat_interval));
        let beat = drain(&mut pm, now + config.heartbeat_interval);
        assert_eq!(beat.len(), 1, "a heartbeat after 100 ms without sending");
        pm.note_data(now + config.dead_after, PEER);
        drain(&mut pm, now + config.dead_after);
        assert_eq!(
            pm.path_between(IFACE, client).unwrap().state,
            PathState::Dead,
            "busy: silent for 400 ms is dead"
        );
    }

    /// Sends every datagram between two managers at once (no loss, no delay).
    fn exchange(now: Timestamp, a: &mut PathManager, b: &mut PathManager, sent: &mut [u64; 2]) {
        loop {
            let from_a = drain(a, now);
            let from_b = drain(b, now);
            if from_a.is_empty() && from_b.is_empty() {
                return;
            }
            sent[0] += from_a.len() as u64;
            sent[1] += from_b.len() as u64;
            for t in from_a {
                b.handle_received(now, IFACE, t.local, &t.repr);
            }
            for t in from_b {
                a.handle_received(now, IFACE, t.local, &t.repr);
            }
        }
    }

    #[test]
    fn idle_peers_exchange_one_keepalive_per_path_per_interval() {
        let start = Timestamp::from_secs(1);
        let config = PathConfig::default();
        let mut client = PathManager::new(config, PEER);
        client.handle_interface_up(start, IFACE, addr("203.0.113.1:61001"));
        let mut proxy = manager_with(PathConfig {
            sends_keepalives: false,
            ..config
        });
        let enable = client
            .enable_packet(start, IFACE, addr("198.51.100.1:4789"))
            .unwrap();
        proxy.handle_received(start, IFACE, enable.local, &enable.repr);
        let mut sent = [0u64; 2];
        exchange(start, &mut client, &mut proxy, &mut sent);
        // Some traffic, then ten idle minutes.
        client.note_data(start, ME);
        proxy.note_data(start, PEER);
        let mut now = start;
        let mut idle_sent = [0u64; 2];
        let idle_from = start + config.linger + Duration::from_secs(1);
        while now < start + Duration::from_secs(601) {
            now += Duration::from_millis(10);
            let mut counted = [0u64; 2];
            exchange(now, &mut client, &mut proxy, &mut counted);
            if now >= idle_from {
                idle_sent[0] += counted[0];
                idle_sent[1] += counted[1];
            }
        }
        let minutes = now.saturating_since(idle_from).as_secs_f64() / 60.0;
        let per_minute = idle_sent[0] as f64 / minutes;
        assert!(
            per_minute <= 4.01,
            "the idle client sent {per_minute:.2} packets per minute on its one path"
        );
        assert!(idle_sent[0] > 0, "keepalives keep the NAT binding");
        assert_eq!(
            idle_sent[0], idle_sent[1],
            "the proxy end answers each, no more"
        );
        for (pm, node) in [(&client, ME), (&proxy, PEER)] {
            assert!(
                pm.paths_to(node).all(|p| p.is_active()),
                "keepalives keep the paths alive"
            );
        }
    }
}
