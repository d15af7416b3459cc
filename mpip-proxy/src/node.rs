//! One MPIP node, sans-IO: the cores of this crate composed into the data path
//! (`PROTOCOL.md` §4–9).
//!
//! The I/O shell ([`crate::shell`]) feeds it packets read from the TUN device
//! ([`Node::handle_tun_packet`]), datagrams received on path sockets
//! ([`Node::handle_datagram`]), interface changes and timer expiries, each with
//! the current [`Timestamp`]; it then drains [`Node::poll_transmit`] (datagrams
//! to send), [`Node::poll_tun`] (packets to write to the TUN device),
//! [`Node::poll_event`] and [`Node::poll_timeout`]. No sockets, no clocks.
//!
//! A node is either the client (`mpipd`), which handshakes with the proxy end
//! and is given a tunnel address, or the proxy end, which hands out addresses
//! from a pool and routes packets from its TUN device to the client node that
//! owns the destination address.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ipnet::Ipv4Net;

use crate::auth::{KeyRing, RateLimit, ReplayWindow, SourceLimiter};
use crate::mss::{clamp_for_path, clamp_syn, IpVersion};
use crate::packet::{InnerPacket, TCP_SYN};
pub use crate::path_manager::PathCounters;
use crate::path_manager::{InterfaceId, PathConfig, PathEvent, PathManager, PathState, Transmit};
use crate::resequencer::{Resequencer, ResequencerConfig};
use crate::routing::{PacketClass, RoutingTable};
use crate::scheduler::{DedupWindow, Mode, RandomSource, Scheduler, SchedulerConfig, Selection};
use crate::table::availability::{AvailabilityTable, HandshakeConfig};
use crate::table::path::{DelayMetrics, PathTable};
use crate::table::session::{Protocol, SessionTable, DEFAULT_SESSION_IDLE};
use crate::time::Timestamp;
use crate::wire::{
    AssignmentPacket, AssignmentRepr, AuthExt, CmFlags, CmPacket, CmRepr, NodeId, PathId,
    SessionId, AUTH_LEN, FIXED_LEN,
};

/// Bytes the shell reserves in front of a packet read from the TUN device, so
/// the data CM block is written in place ([`Node::handle_tun_packet`]).
pub const HEADROOM: usize = FIXED_LEN;

/// Length of a plain inner IPv4 header (no options).
const IPV4_HEADER_LEN: usize = 20;

/// What compression leaves out of that header: all of it but the TTL, which
/// is sent in the header's last byte, just before the transport header.
const COMPRESSED_AWAY: usize = IPV4_HEADER_LEN - 1;

/// Offset of the TTL in an IPv4 header.
const IPV4_TTL: usize = 8;

/// A session's packets are sent compressed while the peer has sent one of
/// its packets this recently: proof that the peer knows the session's tuple.
/// A peer that lost it (restart, expiry) drops compressed packets; its
/// silence then turns compression off within this time.
const COMPRESSION_PROOF: Duration = Duration::from_secs(2);

/// How often sessions and address assignments are expired.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// The shard (of `shards`) that serves `node` on a sharded proxy end:
/// bytes 2..6 of the node ID (a MAC's most varied ones) as a big-endian
/// number, modulo the shard count. The path sockets' reuseport program
/// computes the same from the CM block ([`crate::sys::bpf`]).
pub fn shard_of_node(node: NodeId, shards: u32) -> u32 {
    let id = node.0;
    u32::from_be_bytes([id[2], id[3], id[4], id[5]]) % shards.max(1)
}

/// The shard that owns tunnel address `address`: the address as a number,
/// modulo the shard count (the TUN steering program computes the same).
pub fn shard_of_address(address: Ipv4Addr, shards: u32) -> u32 {
    u32::from(address) % shards.max(1)
}

/// Which end of MPIP this node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The client daemon: handshakes with the proxy end at these UDP endpoints.
    Client {
        /// The proxy end's encapsulation endpoints to send the handshake to.
        proxy_endpoints: Vec<SocketAddr>,
    },
    /// The proxy end: its tunnel address is the pool's first host; clients get
    /// the others.
    Proxy {
        /// The tunnel network.
        pool: Ipv4Net,
    },
}

/// Everything a [`Node`] is configured with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's ID.
    pub node_id: NodeId,
    /// Client or proxy end.
    pub role: Role,
    /// Path manager timing.
    pub paths: PathConfig,
    /// Handshake timing (client).
    pub handshake: HandshakeConfig,
    /// Algorithm 1 period and step.
    pub scheduler: SchedulerConfig,
    /// TCP re-sequencing buffer.
    pub resequencer: ResequencerConfig,
    /// Sessions idle this long are forgotten.
    pub session_idle: Duration,
    /// Table IV and coordinated-routing pins.
    pub routing: RoutingTable,
    /// MTU of the paths; inner TCP MSS is clamped to fit it.
    pub path_mtu: u16,
    /// Authentication (`PROTOCOL.md` §11).
    pub auth: AuthConfig,
    /// Client: the proxy end's node ID, if configured. Otherwise the first
    /// confirmed handshake pins it.
    pub proxy_node: Option<NodeId>,
    /// Proxy end: handshake rate limits per source address and in total.
    pub handshake_limit: RateLimit,
    /// Proxy end: this node is shard `.0` of `.1` (threads that split the
    /// clients by node); it hands out only the pool addresses
    /// [`shard_of_address`] gives it. (0, 1) when not sharded.
    pub shard: (u32, u32),
}

/// How a node authenticates (`PROTOCOL.md` §11).
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The shared keys; `None`: nothing is authenticated (the paper's MPIP).
    pub keys: Option<KeyRing>,
    /// Whether data packets carry a tag too (control packets always do
    /// when there are keys). A receiver with `data` refuses untagged data.
    pub data: bool,
    /// Wall-clock microseconds (UNIX epoch) at [`Timestamp::ZERO`]: counters
    /// start from the wall clock, so they keep growing across restarts.
    pub counter_base: u64,
    /// Random bits (handshake nonces, the rate limiter's hash key).
    pub entropy: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            keys: None,
            data: false,
            counter_base: 0,
            entropy: 0x6d70_6970_6175_7468,
        }
    }
}

impl NodeConfig {
    /// Defaults of `PROTOCOL.md` for `node_id` in `role`.
    pub fn new(node_id: NodeId, role: Role) -> Self {
        NodeConfig {
            node_id,
            paths: PathConfig {
                // The client keeps idle paths alive; the proxy end answers.
                sends_keepalives: matches!(role, Role::Client { .. }),
                ..PathConfig::default()
            },
            role,
            handshake: HandshakeConfig::default(),
            scheduler: SchedulerConfig::default(),
            resequencer: ResequencerConfig::default(),
            session_idle: DEFAULT_SESSION_IDLE,
            routing: RoutingTable::default(),
            path_mtu: 1500,
            auth: AuthConfig::default(),
            proxy_node: None,
            handshake_limit: RateLimit::default(),
            shard: (0, 1),
        }
    }

    /// Bytes in front of a data packet's inner packet: the CM block, and the
    /// authentication extension when data packets are authenticated.
    pub fn headroom(&self) -> usize {
        if self.auth_data() {
            HEADROOM + AUTH_LEN
        } else {
            HEADROOM
        }
    }

    fn auth_data(&self) -> bool {
        self.auth.keys.is_some() && self.auth.data
    }

    /// The largest TUN MTU whose packets fit a path after encapsulation in
    /// IPv4 (the shell's path endpoints are IPv4).
    pub fn tun_mtu(&self) -> u16 {
        let overhead =
            crate::mss::encapsulation_overhead(IpVersion::V4) + self.headroom() - HEADROOM;
        self.path_mtu
            .saturating_sub(u16::try_from(overhead).unwrap_or(u16::MAX))
    }

    /// Proxy end: its tunnel address (the pool's first host) and prefix length.
    pub fn proxy_tunnel(&self) -> Option<(Ipv4Addr, u8)> {
        match &self.role {
            Role::Proxy { pool } => Some((first_host(pool), pool.prefix_len())),
            Role::Client { .. } => None,
        }
    }
}

fn first_host(network: &Ipv4Net) -> Ipv4Addr {
    network.hosts().next().unwrap_or(network.addr())
}

/// A UDP datagram to send on a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Local interface to send from.
    pub interface: InterfaceId,
    /// Destination UDP endpoint.
    pub remote: SocketAddr,
    /// The path (`PathId(0)` for a handshake query).
    pub path: PathId,
    /// CM block and payload.
    pub bytes: Vec<u8>,
}

/// A packet to write to the TUN device: `bytes[start..]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunPacket {
    /// The received datagram.
    pub bytes: Vec<u8>,
    /// Where the inner IP packet starts.
    pub start: usize,
}

impl TunPacket {
    /// The inner IP packet.
    pub fn packet(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

/// Something the shell acts on or logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// Client: the proxy end assigned the tunnel address; configure the TUN device.
    Assigned(AssignmentRepr),
    /// Proxy end: a client node was given a tunnel address.
    ClientAssigned {
        /// The client node.
        node: NodeId,
        /// Its tunnel address.
        address: Ipv4Addr,
    },
    /// Proxy end: the pool has no free address for a client's handshake.
    PoolExhausted {
        /// The client node refused.
        node: NodeId,
    },
    /// A path changed state.
    Path {
        /// The path.
        path: PathId,
        /// The peer node.
        node: NodeId,
        /// The new state (`None`: removed).
        state: Option<PathState>,
    },
}

/// Why packets were dropped, and other node-wide counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// Datagrams whose CM block failed the checks.
    pub malformed_datagrams: u64,
    /// Inner packets that are not IPv4/IPv6 TCP/UDP/other with valid headers.
    pub malformed_packets: u64,
    /// TUN packets with no peer to send to (no assignment or unknown destination).
    pub no_route: u64,
    /// Packets with a peer but no live path.
    pub no_path: u64,
    /// Protected-path copies dropped as duplicates.
    pub duplicates: u64,
    /// Inner packets whose addresses do not belong to the sending node.
    pub spoofed: u64,
    /// Datagrams sent with more than one copy (protected-path).
    pub protected_copies: u64,
    /// TCP SYNs whose MSS was lowered.
    pub mss_clamped: u64,
    /// Datagrams or TUN writes the shell could not complete ([`Node::note_send_failed`]).
    pub send_failed: u64,
    /// Data packets sent with the inner IPv4 header left out.
    pub compressed: u64,
    /// Compressed packets of a session this node does not know (dropped).
    pub unknown_session: u64,
    /// Datagrams naming another node than the one whose active path uses
    /// their source endpoint (dropped).
    pub endpoint_conflict: u64,
    /// Datagrams without a tag where one is required (dropped).
    pub unauthenticated: u64,
    /// Datagrams whose tag is wrong (dropped).
    pub bad_mac: u64,
    /// Datagrams tagged with a key this node does not have, or with a key
    /// bound to another node (dropped).
    pub unknown_key: u64,
    /// Authentic datagrams whose counter was seen before or is too old (dropped).
    pub replayed: u64,
    /// Proxy end: data from a node that has not proven it is live since
    /// this end started (dropped; the node is challenged).
    pub unverified: u64,
    /// Proxy end: handshakes over the per-source or total rate (dropped).
    pub rate_limited: u64,
    /// Client: datagrams from other nodes than its proxy end, or assignments
    /// that answer no handshake of ours (dropped).
    pub unsolicited: u64,
}

/// One path, for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct PathSnapshot {
    /// This node's ID of the path.
    pub path: PathId,
    /// The peer node.
    pub node: NodeId,
    /// The local interface's name.
    pub interface: String,
    /// Local UDP endpoint.
    pub local: SocketAddr,
    /// Remote UDP endpoint.
    pub remote: SocketAddr,
    /// Liveness.
    pub state: PathState,
    /// Traffic.
    pub counters: PathCounters,
    /// Delay metrics from every delay sample the peer returned for the path.
    pub delay: DelayMetrics,
    /// Mean Algorithm 1 weight over the sessions using the path, if any.
    pub weight: Option<f64>,
}

/// One session's sender and receiver state (Table II entry plus Table III).
#[derive(Debug)]
struct Session {
    paths: PathTable,
    /// Last time a packet of the session arrived from the peer.
    last_inbound: Option<Timestamp>,
    next_sequence: u32,
    dedup: DedupWindow,
    resequencer: Option<Resequencer<TunPacket>>,
}

/// What the node keeps per peer node: its sessions and the delay samples
/// of our paths toward it. Indexed by node, so nothing on the packet path
/// looks at another peer's sessions.
#[derive(Debug, Default)]
struct Peer {
    sessions: HashMap<SessionId, Session>,
    /// Every delay sample for our paths, whatever the session.
    delays: PathTable,
    /// Counters of the peer's authentic datagrams.
    window: ReplayWindow,
    /// The key the peer authenticates with (we answer with it).
    key_id: Option<u8>,
    /// Proxy end: the peer proved it is live since this end started (a
    /// datagram over one of its paths echoed a counter we sent over it).
    verified: bool,
    /// The nonce of the peer's latest `ENABLE` (echoed in the `CONFIRM`).
    enable_nonce: u32,
    /// Smoothed one-way delay (with the peer's clock offset, the same on
    /// every path) of what arrives over each of our paths from the peer:
    /// the spread over the active ones is how long a segment from the
    /// fastest path may wait for the slowest's.
    arrivals: BTreeMap<PathId, i64>,
}

impl Peer {
    fn note_arrival(&mut self, path: PathId, sample_us: i32) {
        let sample = i64::from(sample_us);
        let smoothed = self.arrivals.entry(path).or_insert(sample);
        // An EWMA of 1/8, as TCP's SRTT.
        *smoothed += (sample - *smoothed) / 8;
    }

    /// The spread of the one-way delays of the paths `active` says are up.
    fn delay_spread(&self, active: impl Fn(PathId) -> bool) -> Duration {
        let (min, max) = self
            .arrivals
            .iter()
            .filter(|(path, _)| active(**path))
            .fold((i64::MAX, i64::MIN), |(lo, hi), (_, d)| {
                (lo.min(*d), hi.max(*d))
            });
        Duration::from_micros(u64::try_from(max.saturating_sub(min)).unwrap_or(0))
    }
}

/// Proxy end: tunnel addresses handed to client nodes.
#[derive(Debug)]
struct AddressPool {
    network: Ipv4Net,
    proxy: Ipv4Addr,
    by_node: HashMap<NodeId, Ipv4Addr>,
    by_address: HashMap<Ipv4Addr, NodeId>,
    /// This shard's part of the pool: addresses `a` with
    /// `shard_of_address(a, shard.1) == shard.0`.
    shard: (u32, u32),
    /// Where the search for a free address starts (the lowest free one is
    /// at or after it).
    cursor: u32,
}

impl AddressPool {
    fn new(network: Ipv4Net, shard: (u32, u32)) -> Self {
        let proxy = first_host(&network);
        AddressPool {
            network,
            proxy,
            by_node: HashMap::new(),
            by_address: HashMap::new(),
            shard,
            cursor: u32::from(network.network()),
        }
    }

    fn mine(&self, address: Ipv4Addr) -> bool {
        shard_of_address(address, self.shard.1) == self.shard.0
    }

    fn assign(&mut self, node: NodeId) -> Option<Ipv4Addr> {
        if let Some(address) = self.by_node.get(&node) {
            return Some(*address);
        }
        let start = self.cursor.max(u32::from(self.network.network()));
        let free = (start..u32::from(self.network.broadcast()))
            .map(Ipv4Addr::from)
            .find(|a| {
                *a != self.proxy
                    && *a != self.network.network()
                    && self.mine(*a)
                    && !self.by_address.contains_key(a)
            })?;
        self.cursor = u32::from(free);
        self.bind(node, free);
        Some(free)
    }

    /// Re-adopts `address` for `node` (the proxy end restarted and lost its
    /// table, the client kept its address) if it is in the pool and free.
    fn adopt(&mut self, node: NodeId, address: Ipv4Addr) -> bool {
        let usable = self.network.contains(&address)
            && address != self.proxy
            && address != self.network.network()
            && address != self.network.broadcast()
            && self.mine(address)
            && !self.by_address.contains_key(&address)
            && !self.by_node.contains_key(&node);
        if usable {
            self.bind(node, address);
        }
        usable
    }

    fn bind(&mut self, node: NodeId, address: Ipv4Addr) {
        self.by_node.insert(node, address);
        self.by_address.insert(address, node);
    }

    fn release(&mut self, node: NodeId) {
        if let Some(address) = self.by_node.remove(&node) {
            self.by_address.remove(&address);
            self.cursor = self.cursor.min(u32::from(address));
        }
    }

    fn assignment(&self, node: NodeId) -> Option<AssignmentRepr> {
        self.by_node.get(&node).map(|client| AssignmentRepr {
            client: *client,
            proxy: self.proxy,
            prefix_len: self.network.prefix_len(),
        })
    }
}

#[derive(Debug, Clone)]
struct Interface {
    name: String,
    address: SocketAddr,
    up: bool,
}

/// One MPIP node. `R` is the scheduler's random source.
#[derive(Debug)]
pub struct Node<R: RandomSource> {
    config: NodeConfig,
    paths: PathManager,
    sessions: SessionTable,
    peers: HashMap<NodeId, Peer>,
    /// Sessions whose re-sequencer holds segments: the only ones with a
    /// re-sequencing timer, so timers cost nothing per idle session.
    holding: HashSet<(NodeId, SessionId)>,
    scheduler: Scheduler<R>,
    availability: AvailabilityTable,
    interfaces: BTreeMap<InterfaceId, Interface>,
    /// Client: the assignment and the proxy end's node ID.
    assignment: Option<(AssignmentRepr, NodeId)>,
    pool: Option<AddressPool>,
    counters: NodeCounters,
    transmits: VecDeque<Datagram>,
    tun: VecDeque<TunPacket>,
    events: VecDeque<NodeEvent>,
    next_housekeeping: Option<Timestamp>,
    /// The last counter this node used (authentication).
    counter: u64,
    /// Client: nonces of the `ENABLE`s of the running handshake.
    enable_nonces: VecDeque<u32>,
    /// Proxy end: handshake rate limits.
    limiter: SourceLimiter,
}

/// What [`Node::admit`] decided about a received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Dropped (and counted).
    Drop,
    /// Processed; whether it proves its path (`PROTOCOL.md` §11.3).
    Accept(bool),
    /// Authentic data from a node not proven live: the path manager sees it,
    /// the inner packet is dropped, the node is challenged.
    Challenge,
}

/// `ENABLE` nonces remembered (a handshake round sends five per interface).
const ENABLE_NONCES: usize = 32;

impl<R: RandomSource> Node<R> {
    /// A node with no interface yet; `rng` drives equation 1.
    pub fn new(config: NodeConfig, rng: R) -> Self {
        let pool = match &config.role {
            Role::Proxy { pool } => Some(AddressPool::new(*pool, config.shard)),
            Role::Client { .. } => None,
        };
        let path_config = PathConfig {
            require_proof: config.auth.keys.is_some(),
            ..config.paths
        };
        Node {
            paths: PathManager::new(path_config, config.node_id),
            sessions: SessionTable::new(config.node_id),
            peers: HashMap::new(),
            holding: HashSet::new(),
            scheduler: Scheduler::new(config.scheduler, config.routing.clone(), rng),
            availability: AvailabilityTable::new(config.handshake),
            interfaces: BTreeMap::new(),
            assignment: None,
            pool,
            counters: NodeCounters::default(),
            transmits: VecDeque::new(),
            tun: VecDeque::new(),
            events: VecDeque::new(),
            next_housekeeping: None,
            counter: 0,
            enable_nonces: VecDeque::new(),
            limiter: SourceLimiter::new(config.handshake_limit, config.auth.entropy),
            config,
        }
    }

    /// Bytes [`Node::handle_tun_packet`] needs in front of each packet.
    pub fn headroom(&self) -> usize {
        self.config.headroom()
    }

    /// The routing table in force.
    pub fn routing(&self) -> &RoutingTable {
        &self.config.routing
    }

    /// Replaces the Table IV rules and default (a reload or a profile
    /// switch). Rules are looked up per packet, so existing sessions follow
    /// the new table from their next packet; nothing queued is dropped.
    pub fn set_routing(&mut self, routing: RoutingTable) {
        self.scheduler.set_routing(routing.clone());
        self.config.routing = routing;
    }

    /// Applies what a configuration reload may change while running:
    /// routing, path timers, Algorithm 1, re-sequencing, session idle time
    /// and keys. Keys must keep data tags as they were (the tunnel MTU
    /// depends on them): a change that would turn data tags on or off is
    /// refused with the reason, and nothing changes.
    pub fn reconfigure(&mut self, now: Timestamp, new: &NodeConfig) -> Result<(), String> {
        if new.headroom() != self.headroom() {
            return Err(
                "[auth] data (or keys with it) changes the tunnel MTU; restart to apply".into(),
            );
        }
        if new.node_id != self.config.node_id || new.role != self.config.role {
            return Err(
                "node_id, the pool or the proxy endpoints changed; restart to apply".into(),
            );
        }
        if self.config.auth.keys.is_some() != new.auth.keys.is_some() {
            return Err("turning authentication on or off needs a restart".into());
        }
        self.set_routing(new.routing.clone());
        let paths = PathConfig {
            require_proof: new.auth.keys.is_some(),
            ..new.paths
        };
        self.paths.set_config(now, paths);
        if new.handshake_limit != self.config.handshake_limit {
            self.limiter = SourceLimiter::new(new.handshake_limit, self.config.auth.entropy);
            self.config.handshake_limit = new.handshake_limit;
        }
        self.scheduler.set_config(new.scheduler);
        self.config.paths = new.paths;
        self.config.scheduler = new.scheduler;
        self.config.resequencer = new.resequencer;
        self.config.session_idle = new.session_idle;
        self.config.handshake = new.handshake;
        self.config.proxy_node = new.proxy_node;
        self.config.auth.keys = new.auth.keys.clone();
        Ok(())
    }

    /// The next authentication counter: the wall clock in microseconds, at
    /// least one above the last.
    fn next_counter(&mut self, now: Timestamp) -> u64 {
        let clock = self
            .config
            .auth
            .counter_base
            .saturating_add(now.as_micros());
        self.counter = clock.max(self.counter + 1);
        self.counter
    }

    /// A handshake nonce: unpredictable without the node's entropy.
    fn nonce(&mut self, now: Timestamp) -> u32 {
        let mut x = self.config.auth.entropy ^ self.next_counter(now).rotate_left(29);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((x ^ (x >> 31)) as u32) | 1
    }

    /// The authentication extension for a datagram to `node` over `path`
    /// (zero tag; the caller signs after emitting), or `None` without keys.
    fn auth_ext(&mut self, now: Timestamp, node: Option<NodeId>, path: PathId) -> Option<AuthExt> {
        let send_key = self.config.auth.keys.as_ref()?.send_key().id;
        let counter = self.next_counter(now);
        let key_id = match node {
            Some(node) => {
                self.paths.note_tx_counter(node, path, counter);
                self.peers
                    .get(&node)
                    .and_then(|p| p.key_id)
                    .unwrap_or(send_key)
            }
            None => send_key,
        };
        Some(AuthExt {
            key_id,
            counter,
            tag: [0; crate::wire::AUTH_TAG_LEN],
        })
    }

    /// Signs an emitted datagram in place if its CM block has the extension.
    fn sign(&self, bytes: &mut [u8], ext: Option<AuthExt>, auth_at: usize) {
        let key = ext.and_then(|e| self.config.auth.keys.as_ref()?.get(e.key_id));
        if let Some(key) = key {
            key.sign(bytes, auth_at);
        }
    }

    /// This node's ID.
    pub fn node_id(&self) -> NodeId {
        self.config.node_id
    }

    /// Client: the tunnel address assignment, once the handshake is done.
    pub fn assignment(&self) -> Option<AssignmentRepr> {
        self.assignment.map(|(a, _)| a)
    }

    /// Proxy end: client nodes and their tunnel addresses.
    pub fn clients(&self) -> Vec<(NodeId, Ipv4Addr)> {
        let mut clients: Vec<_> = self
            .pool
            .iter()
            .flat_map(|p| p.by_node.iter().map(|(n, a)| (*n, *a)))
            .collect();
        clients.sort();
        clients
    }

    /// Drop and traffic counters.
    pub fn counters(&self) -> NodeCounters {
        self.counters
    }

    /// The shell could not send a datagram or write a TUN packet.
    pub fn note_send_failed(&mut self) {
        self.counters.send_failed += 1;
    }

    /// Number of sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Number of peer nodes known to the path manager.
    pub fn peer_count(&self) -> usize {
        self.paths.nodes().nodes().count()
    }

    /// Every path with its state, traffic, delay and weight.
    pub fn path_snapshots(&self) -> Vec<PathSnapshot> {
        self.paths
            .paths()
            .map(|path| {
                let peer = self.peers.get(&path.node);
                let weights: Vec<f64> = peer
                    .into_iter()
                    .flat_map(|p| p.sessions.values())
                    .filter_map(|s| s.paths.get(path.id))
                    .filter(|e| e.live)
                    .map(|e| f64::from(e.weight))
                    .collect();
                PathSnapshot {
                    path: path.id,
                    node: path.node,
                    interface: self
                        .interfaces
                        .get(&path.interface)
                        .map_or_else(String::new, |i| i.name.clone()),
                    local: path.local,
                    remote: path.remote,
                    state: path.state,
                    counters: path.counters,
                    delay: peer
                        .and_then(|p| p.delays.get(path.id))
                        .map(|e| e.delay.clone())
                        .unwrap_or_default(),
                    weight: (!weights.is_empty())
                        .then(|| weights.iter().sum::<f64>() / weights.len() as f64),
                }
            })
            .collect()
    }

    /// An interface came up, was added, or changed address. `address` is the
    /// UDP endpoint bound on it.
    pub fn handle_interface_up(
        &mut self,
        now: Timestamp,
        interface: InterfaceId,
        name: &str,
        address: SocketAddr,
    ) {
        self.interfaces.insert(
            interface,
            Interface {
                name: name.to_owned(),
                address,
                up: true,
            },
        );
        self.paths.handle_interface_up(now, interface, address);
        if let Role::Client { proxy_endpoints } = &self.config.role {
            if self.assignment.is_none() {
                for remote in proxy_endpoints.clone() {
                    self.availability.start(now, remote);
                }
            }
        }
        self.drain_path_events();
    }

    /// An interface went down (or lost its address).
    pub fn handle_interface_down(&mut self, now: Timestamp, interface: InterfaceId) {
        if let Some(entry) = self.interfaces.get_mut(&interface) {
            entry.up = false;
        }
        self.paths.handle_interface_down(now, interface);
        self.drain_path_events();
    }

    /// An interface is no longer configured: its paths go.
    pub fn remove_interface(&mut self, _now: Timestamp, interface: InterfaceId) {
        self.interfaces.remove(&interface);
        self.paths.remove_interface(interface);
        self.drain_path_events();
    }

    /// A packet the local stack wrote into the TUN device, at
    /// `buffer[headroom..]` ([`Node::headroom`]); the front is overwritten
    /// with the CM block.
    pub fn handle_tun_packet(&mut self, now: Timestamp, mut buffer: Vec<u8>) {
        let headroom = self.headroom();
        if buffer.len() <= headroom {
            self.counters.malformed_packets += 1;
            return;
        }
        let Ok(info) = InnerPacket::parse(&buffer[headroom..]) else {
            self.counters.malformed_packets += 1;
            return;
        };
        let Some(node) = self.peer_for(&info) else {
            self.counters.no_route += 1;
            return;
        };
        let Ok(session) = self.sessions.outbound(now, node, info.outbound_tuple()) else {
            self.counters.no_route += 1;
            return;
        };
        if info.tcp.is_some_and(|tcp| tcp.flags & TCP_SYN != 0) {
            self.clamp_mss(&mut buffer[headroom..], &info);
        }
        let class = PacketClass::from(&info);
        let rule = self.config.routing.rule_for(&class);
        let mut mode = Mode::from(rule.map_or(self.config.routing.default, |r| r.priority));
        let interface_address = |name: &str| {
            self.interfaces
                .values()
                .find(|i| i.name == name)
                .map(|i| i.address)
        };
        let pin_address = rule
            .and_then(|r| r.path.as_deref())
            .and_then(interface_address);
        let selected: Vec<SocketAddr> = rule
            .map(|r| {
                r.paths
                    .iter()
                    .filter_map(|n| interface_address(n))
                    .collect()
            })
            .unwrap_or_default();
        let paths = &self.paths;
        let resequencer = self.config.resequencer;
        let state = self
            .peers
            .entry(node)
            .or_default()
            .sessions
            .entry(session)
            .or_insert_with(|| Session::new(paths.path_table_for(node), &info, resequencer));
        let sequence = state.next_sequence;
        state.next_sequence = sequence.wrapping_add(1);
        if !selected.is_empty() && mode == Mode::AllPaths {
            mode = Mode::SelectedPaths(
                state
                    .paths
                    .live()
                    .filter(|e| selected.contains(&e.local))
                    .map(|e| e.path_id)
                    .collect(),
            );
        }
        let pinned = pin_address.and_then(|local| {
            state
                .paths
                .live()
                .find(|e| e.local == local)
                .map(|e| e.path_id)
        });
        let selection = match pinned {
            Some(path) if mode != Mode::ProtectedPath => Selection::One(path),
            _ => self.scheduler.select(node, session, &state.paths, &mode),
        };
        let peer_knows_session = state
            .last_inbound
            .is_some_and(|t| now.saturating_since(t) < COMPRESSION_PROOF);
        let mut flags = CmFlags::NONE;
        if peer_knows_session && compressible(&buffer[headroom..]) {
            buffer[headroom + COMPRESSED_AWAY] = buffer[headroom + IPV4_TTL];
            buffer.drain(headroom..headroom + COMPRESSED_AWAY);
            flags = CmFlags::COMPRESSED;
            self.counters.compressed += 1;
        }
        if selection != Selection::NoPath {
            self.paths.note_data(now, node);
        }
        match selection {
            Selection::NoPath => self.counters.no_path += 1,
            Selection::One(path) => {
                self.send_data(now, node, session, path, sequence, flags, buffer)
            }
            Selection::Copies(copies) => {
                self.counters.protected_copies += 1;
                let last = copies.len() - 1;
                for (i, path) in copies.iter().enumerate() {
                    let bytes = if i == last {
                        std::mem::take(&mut buffer)
                    } else {
                        buffer.clone()
                    };
                    let copy = flags.union(CmFlags::DUPLICATE);
                    self.send_data(now, node, session, *path, sequence, copy, bytes);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send_data(
        &mut self,
        now: Timestamp,
        node: NodeId,
        session: SessionId,
        path: PathId,
        sequence: u32,
        flags: CmFlags,
        mut bytes: Vec<u8>,
    ) {
        let Some(interface) = self.paths.path(node, path).map(|p| (p.interface, p.remote)) else {
            self.counters.no_path += 1;
            return;
        };
        let Ok(mut repr) = self.paths.data_cm(now, node, session, path, sequence) else {
            self.counters.no_path += 1;
            return;
        };
        repr.flags.insert(flags);
        if self.config.auth_data() {
            repr.auth = self.auth_ext(now, Some(node), path);
        }
        // A data CM block has no address list: exactly the headroom.
        let headroom = self.headroom();
        if repr.emit(&mut bytes[..headroom]).is_err() {
            self.counters.no_path += 1;
            return;
        }
        self.sign(&mut bytes, repr.auth, HEADROOM);
        let _ = self.paths.count_sent(node, path, bytes.len());
        self.transmits.push_back(Datagram {
            interface: interface.0,
            remote: interface.1,
            path,
            bytes,
        });
    }

    /// The peer a TUN packet goes to: the proxy end for a client; the client
    /// owning the destination address for the proxy end.
    fn peer_for(&self, info: &InnerPacket) -> Option<NodeId> {
        match (&self.pool, self.assignment) {
            (Some(pool), _) => match info.destination {
                IpAddr::V4(destination) => pool.by_address.get(&destination).copied(),
                IpAddr::V6(_) => None,
            },
            (None, Some((assignment, proxy))) => {
                (info.source == IpAddr::V4(assignment.client)).then_some(proxy)
            }
            (None, None) => None,
        }
    }

    fn outer_version(&self) -> IpVersion {
        if self.interfaces.values().any(|i| i.address.is_ipv6()) {
            IpVersion::V6
        } else {
            IpVersion::V4
        }
    }

    fn clamp_mss(&mut self, packet: &mut [u8], info: &InnerPacket) {
        let inner = if info.source.is_ipv6() {
            IpVersion::V6
        } else {
            IpVersion::V4
        };
        let extra = u16::try_from(self.headroom() - HEADROOM).unwrap_or(0);
        let mtu = self.config.path_mtu.saturating_sub(extra);
        let Ok(max) = clamp_for_path(mtu, self.outer_version(), inner) else {
            return;
        };
        if let Ok(crate::mss::MssRewrite::Clamped { .. }) = clamp_syn(packet, max) {
            self.counters.mss_clamped += 1;
        }
    }

    /// A datagram received on `interface` from outer source `remote`.
    pub fn handle_datagram(
        &mut self,
        now: Timestamp,
        interface: InterfaceId,
        remote: SocketAddr,
        bytes: Vec<u8>,
    ) {
        let (repr, cm_len, auth_at) = match CmPacket::new_checked(&bytes[..]) {
            Ok(packet) => match CmRepr::parse(&packet) {
                Ok(repr) => (repr, packet.cm_len(), packet.auth_offset()),
                Err(_) => {
                    self.counters.malformed_datagrams += 1;
                    return;
                }
            },
            Err(_) => {
                self.counters.malformed_datagrams += 1;
                return;
            }
        };
        let node = repr.node_id;
        if node == self.config.node_id {
            return;
        }
        // An endpoint an active path of another node uses speaks for that
        // node only (a forged node ID from a client's address takes nothing).
        if self
            .paths
            .path_between(interface, remote)
            .is_some_and(|p| p.node != node && p.is_active())
        {
            self.counters.endpoint_conflict += 1;
            return;
        }
        let control = CmFlags::ENABLE
            .union(CmFlags::CONFIRM)
            .union(CmFlags::HEARTBEAT)
            .union(CmFlags::ASSIGN)
            .union(CmFlags::IP_CHANGE);
        let is_control = bytes.len() == cm_len
            || repr.flags.bits() & control.bits() != 0
            || repr.session_id == SessionId::CONTROL;
        let admitted = self.admit(now, interface, remote, &repr, &bytes, auth_at, is_control);
        if admitted == Admission::Drop {
            return;
        }
        if !self.handle_handshake(now, remote, &repr, &bytes[cm_len..]) {
            return;
        }
        let proves = matches!(admitted, Admission::Accept(true));
        self.paths
            .handle_received_proven(now, interface, remote, &repr, proves);
        if let Some(path) = self.paths.path_between(interface, remote).map(|p| p.id) {
            self.peers
                .entry(node)
                .or_default()
                .note_arrival(path, crate::time::one_way_delay_sample(repr.timestamp, now));
        }
        self.drain_path_events();
        self.paths.note_received(interface, remote, bytes.len());
        if admitted == Admission::Challenge {
            // Authentic data from a node not proven live: its path is kept,
            // its packet dropped, and it is asked to echo our counter.
            self.counters.unverified += 1;
            self.paths.answer(now, interface, remote);
            return;
        }
        if is_control {
            return;
        }
        let mut bytes = bytes;
        let mut start = cm_len;
        if repr.flags.contains(CmFlags::COMPRESSED) {
            // The header goes back in place, over the tail of the parsed CM
            // block and the TTL byte.
            let Some(entry) = self.sessions.get(node, repr.session_id) else {
                self.counters.unknown_session += 1;
                return;
            };
            start = cm_len - COMPRESSED_AWAY;
            if !restore_ipv4_header(&mut bytes[start..], entry.tuple) {
                self.counters.malformed_packets += 1;
                return;
            }
        }
        let Ok(info) = InnerPacket::parse(&bytes[start..]) else {
            self.counters.malformed_packets += 1;
            return;
        };
        if !self.sender_owns(node, &info) {
            self.counters.spoofed += 1;
            return;
        }
        if self
            .sessions
            .inbound(now, node, repr.session_id, info.inbound_tuple())
            .is_err()
        {
            return;
        }
        self.paths.note_data(now, node);
        let paths = &self.paths;
        let resequencer = self.config.resequencer;
        let peer = self.peers.entry(node).or_default();
        let wait = resequencer.timeout
            + peer.delay_spread(|id| paths.path(node, id).is_some_and(|p| p.is_active()));
        let state = peer
            .sessions
            .entry(repr.session_id)
            .or_insert_with(|| Session::new(paths.path_table_for(node), &info, resequencer));
        if let Some(resequencer) = &mut state.resequencer {
            resequencer.set_timeout(wait);
        }
        if repr.flags.contains(CmFlags::DUPLICATE) && !state.dedup.accept(repr.sequence) {
            self.counters.duplicates += 1;
            return;
        }
        state.last_inbound = Some(now);
        let packet = TunPacket { bytes, start };
        match (&mut state.resequencer, info.tcp) {
            (Some(resequencer), Some(tcp)) => {
                resequencer.handle_segment(now, tcp.sequence, tcp.sequence_len(), packet);
                while let Some(ready) = resequencer.poll_deliver() {
                    self.tun.push_back(ready);
                }
                if resequencer.held() > 0 {
                    self.holding.insert((node, repr.session_id));
                } else {
                    self.holding.remove(&(node, repr.session_id));
                }
            }
            _ => self.tun.push_back(packet),
        }
    }

    /// Whether a received datagram may be processed: the client hears only
    /// its proxy end; the proxy end rate-limits handshakes and unknown nodes
    /// per source; with keys, the tag, the key, the replay window and (proxy
    /// end, data) the peer's proof of freshness are checked
    /// (`PROTOCOL.md` §11). Counts what it drops.
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &mut self,
        now: Timestamp,
        interface: InterfaceId,
        remote: SocketAddr,
        repr: &CmRepr,
        bytes: &[u8],
        auth_at: usize,
        is_control: bool,
    ) -> Admission {
        let node = repr.node_id;
        let enable = repr.flags.contains(CmFlags::ENABLE);
        let client = match &self.config.role {
            Role::Client { proxy_endpoints } => {
                let pinned = self.assignment.map(|(_, p)| p).or(self.config.proxy_node);
                let assignment = repr.flags.contains(CmFlags::CONFIRM.union(CmFlags::ASSIGN));
                let foreign = pinned.is_some_and(|p| p != node);
                // The proxy end speaks from the configured endpoints and the
                // ones it announced from those: a datagram from anywhere
                // else never makes a path (no path toward an attacker).
                let trusted = proxy_endpoints.contains(&remote)
                    || pinned
                        .and_then(|p| self.paths.nodes().get(p))
                        .is_some_and(|entry| {
                            entry.announced.contains(&remote)
                                || entry.observed.contains_key(&remote)
                        });
                let unsolicited = !trusted
                    || (self.assignment.is_none()
                        && !(assignment && proxy_endpoints.contains(&remote)));
                if foreign || unsolicited || enable {
                    self.counters.unsolicited += 1;
                    return Admission::Drop;
                }
                true
            }
            Role::Proxy { .. } => false,
        };
        let keys = self.config.auth.keys.is_some();
        // Handshakes and unknown nodes make the proxy end work (a tag to
        // check) or keep state; untagged datagrams where tags are required
        // are refused below without either.
        if !client && (repr.auth.is_some() || !keys) {
            let known = self.paths.nodes().get(node).is_some();
            if (enable || !known) && !self.limiter.allow(now, remote.ip()) {
                self.counters.rate_limited += 1;
                return Admission::Drop;
            }
        }
        let Some(keys) = self.config.auth.keys.as_ref().filter(|_| keys) else {
            return Admission::Accept(true);
        };
        let Some(ext) = repr.auth else {
            // Untagged: only data over a path the node already uses, from a
            // node proven live, and only where data tags are not required.
            let over_path = self
                .paths
                .path_between(interface, remote)
                .is_some_and(|p| p.node == node);
            let live = client || self.peers.get(&node).is_some_and(|p| p.verified);
            if is_control || self.config.auth.data || !over_path || !live {
                self.counters.unauthenticated += 1;
                return Admission::Drop;
            }
            return Admission::Accept(false);
        };
        let Some(key) = keys
            .get(ext.key_id)
            .filter(|k| k.node.is_none_or(|n| n == node))
        else {
            self.counters.unknown_key += 1;
            return Admission::Drop;
        };
        if !key.verify(bytes, auth_at) {
            self.counters.bad_mac += 1;
            return Admission::Drop;
        }
        // A control datagram echoing a counter we sent over its path proves
        // the peer is there and live; so does the answer to our handshake.
        let proves = is_control
            && !enable
            && (self.paths.path_echoes(interface, remote, repr.sequence)
                || (client
                    && repr.flags.contains(CmFlags::CONFIRM.union(CmFlags::ASSIGN))
                    && self.enable_nonces.contains(&repr.sequence)));
        let peer = self.peers.entry(node).or_default();
        if !peer.window.accept(ext.counter) {
            self.counters.replayed += 1;
            return Admission::Drop;
        }
        peer.key_id = Some(ext.key_id);
        if proves {
            peer.verified = true;
        }
        if !client && !is_control && !peer.verified {
            return Admission::Challenge;
        }
        Admission::Accept(proves)
    }

    /// Whether an inner packet from `node` carries that node's addresses: a
    /// client's packets come from its tunnel address; the proxy end's go to ours.
    fn sender_owns(&mut self, node: NodeId, info: &InnerPacket) -> bool {
        match (&mut self.pool, self.assignment) {
            (Some(pool), _) => {
                let IpAddr::V4(source) = info.source else {
                    return false;
                };
                match pool.by_node.get(&node) {
                    Some(address) => *address == source,
                    None => {
                        let adopted = pool.adopt(node, source);
                        if adopted {
                            self.events.push_back(NodeEvent::ClientAssigned {
                                node,
                                address: source,
                            });
                        }
                        adopted
                    }
                }
            }
            (None, Some((assignment, proxy))) => {
                node == proxy && info.destination == IpAddr::V4(assignment.client)
            }
            (None, None) => false,
        }
    }

    /// Handles the handshake part of a CM block; returns whether the datagram
    /// goes on to the path manager (the proxy end ignores a node it could not
    /// give an address).
    fn handle_handshake(
        &mut self,
        now: Timestamp,
        remote: SocketAddr,
        repr: &CmRepr,
        payload: &[u8],
    ) -> bool {
        let node = repr.node_id;
        if let Some(pool) = &mut self.pool {
            if repr.flags.contains(CmFlags::ENABLE) {
                self.peers.entry(node).or_default().enable_nonce = repr.sequence;
                let known = pool.by_node.contains_key(&node);
                match pool.assign(node) {
                    Some(address) if !known => self
                        .events
                        .push_back(NodeEvent::ClientAssigned { node, address }),
                    Some(_) => {}
                    None => {
                        self.events.push_back(NodeEvent::PoolExhausted { node });
                        return false;
                    }
                }
            }
            return true;
        }
        if !repr.flags.contains(CmFlags::CONFIRM.union(CmFlags::ASSIGN)) {
            return true;
        }
        // Only an answer to one of our ENABLEs (it echoes the nonce) assigns:
        // a replayed or forged assignment changes nothing.
        if !self.enable_nonces.contains(&repr.sequence) {
            if self.assignment.is_none() {
                self.counters.unsolicited += 1;
                return false;
            }
            return true;
        }
        let Ok(packet) = AssignmentPacket::new_checked(payload) else {
            self.counters.malformed_datagrams += 1;
            return false;
        };
        let assignment = AssignmentRepr::parse(&packet);
        self.availability.handle_received(now, remote, repr);
        if self.assignment != Some((assignment, node)) {
            self.assignment = Some((assignment, node));
            self.events.push_back(NodeEvent::Assigned(assignment));
        }
        true
    }

    fn drain_path_events(&mut self) {
        while let Some(event) = self.paths.poll_event() {
            let (node, path, state) = match event {
                PathEvent::Added { .. } => continue,
                PathEvent::Up { node, path } => (node, path, Some(PathState::Active)),
                PathEvent::Down { node, path } => (node, path, Some(PathState::Dead)),
                PathEvent::Removed { node, path } => (node, path, None),
                PathEvent::DelayFeedback {
                    node,
                    path,
                    delay_us,
                    ..
                } => {
                    let peer = self.peers.entry(node).or_default();
                    if peer.delays.get(path).is_none() {
                        if let Some(p) = self.paths.path(node, path) {
                            peer.delays.insert(path, p.local, p.remote);
                        }
                    }
                    peer.delays.record_delay(path, delay_us);
                    for (s, state) in &mut peer.sessions {
                        self.paths.apply_event(node, *s, &event, &mut state.paths);
                    }
                    continue;
                }
            };
            if let Some(peer) = self.peers.get_mut(&node) {
                if state.is_none() {
                    peer.arrivals.remove(&path);
                }
                for (s, state) in &mut peer.sessions {
                    self.paths.apply_event(node, *s, &event, &mut state.paths);
                }
                self.paths
                    .apply_event(node, SessionId::CONTROL, &event, &mut peer.delays);
            }
            self.events.push_back(NodeEvent::Path { path, node, state });
        }
    }

    /// Runs the timers due at `now`: handshake probes, Algorithm 1, re-sequencing
    /// timeouts, and session and assignment expiry.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if self.assignment.is_none() {
            while let Some(remote) = self.availability.poll_probe(now) {
                let up: Vec<InterfaceId> = self
                    .interfaces
                    .iter()
                    .filter(|(_, i)| i.up)
                    .map(|(id, _)| *id)
                    .collect();
                for interface in up {
                    if let Ok(transmit) = self.paths.enable_packet(now, interface, remote) {
                        self.push_control(now, transmit, None);
                    }
                }
            }
        }
        self.scheduler.handle_timeout(
            now,
            self.peers
                .values_mut()
                .flat_map(|p| p.sessions.values_mut().map(|s| &mut s.paths)),
        );
        let peers = &mut self.peers;
        let tun = &mut self.tun;
        self.holding.retain(|(node, session)| {
            let Some(resequencer) = peers
                .get_mut(node)
                .and_then(|p| p.sessions.get_mut(session))
                .and_then(|s| s.resequencer.as_mut())
            else {
                return false;
            };
            resequencer.handle_timeout(now);
            while let Some(ready) = resequencer.poll_deliver() {
                tun.push_back(ready);
            }
            resequencer.held() > 0
        });
        match self.next_housekeeping {
            Some(due) if due > now => {}
            _ => {
                self.next_housekeeping = Some(now + HOUSEKEEPING_INTERVAL);
                self.housekeeping(now);
            }
        }
    }

    fn housekeeping(&mut self, now: Timestamp) {
        for entry in self.sessions.expire(now, self.config.session_idle) {
            let removed = self
                .peers
                .get_mut(&entry.node)
                .and_then(|p| p.sessions.remove(&entry.session));
            if let Some(mut state) = removed {
                if let Some(resequencer) = &mut state.resequencer {
                    resequencer.handle_timeout(Timestamp::from_micros(u64::MAX));
                    while let Some(ready) = resequencer.poll_deliver() {
                        self.tun.push_back(ready);
                    }
                }
            }
        }
        let paths = &self.paths;
        // The client keeps its proxy end's replay window for good.
        let pinned = self.assignment.map(|(_, p)| p).or(self.config.proxy_node);
        self.peers.retain(|node, peer| {
            !peer.sessions.is_empty() || paths.nodes().get(*node).is_some() || pinned == Some(*node)
        });
        // The client: a proxy end silent long enough to be forgotten gets a
        // new handshake (it may have restarted under another node ID).
        if let (Role::Client { proxy_endpoints }, Some((_, proxy))) =
            (&self.config.role, self.assignment)
        {
            if paths.nodes().get(proxy).is_none() && paths.paths_to(proxy).next().is_none() {
                self.assignment = None;
                for remote in proxy_endpoints.clone() {
                    self.availability.restart(now, remote);
                }
            }
        }
        let paths = &self.paths;
        if let Some(pool) = &mut self.pool {
            let gone: Vec<NodeId> = pool
                .by_node
                .keys()
                .filter(|n| {
                    paths.nodes().get(**n).is_none()
                        && self.sessions.sessions_of(**n).next().is_none()
                })
                .copied()
                .collect();
            for node in gone {
                pool.release(node);
            }
        }
    }

    /// The next datagram to send, if any: data first, then control packets
    /// (handshake replies, probes, heartbeats) due at `now`. Call until `None`.
    pub fn poll_transmit(&mut self, now: Timestamp) -> Option<Datagram> {
        if let Some(datagram) = self.transmits.pop_front() {
            return Some(datagram);
        }
        while let Some(transmit) = self.paths.poll_transmit(now) {
            self.drain_path_events();
            let assignment = if transmit.repr.flags.contains(CmFlags::CONFIRM) {
                let node = transmit.node;
                match (&self.pool, node) {
                    (Some(pool), Some(node)) => match pool.assignment(node) {
                        Some(assignment) => Some(assignment),
                        // No address for this client: no confirmation either.
                        None => continue,
                    },
                    _ => None,
                }
            } else {
                None
            };
            self.push_control(now, transmit, assignment);
            return self.transmits.pop_front();
        }
        self.drain_path_events();
        None
    }

    fn push_control(
        &mut self,
        now: Timestamp,
        mut transmit: Transmit,
        assignment: Option<AssignmentRepr>,
    ) {
        // Packet Sequence on control packets: an ENABLE's nonce, the CONFIRM's
        // echo of it, or with keys the echo of the path's latest counter (set
        // by the path manager).
        if transmit.repr.flags.contains(CmFlags::ENABLE) {
            let nonce = self.nonce(now);
            if self.enable_nonces.len() == ENABLE_NONCES {
                self.enable_nonces.pop_front();
            }
            self.enable_nonces.push_back(nonce);
            transmit.repr.sequence = nonce;
        } else if transmit.repr.flags.contains(CmFlags::CONFIRM) {
            if let Some(peer) = transmit.node.and_then(|n| self.peers.get(&n)) {
                transmit.repr.sequence = peer.enable_nonce;
            }
        }
        transmit.repr.auth = self.auth_ext(now, transmit.node, transmit.path);
        let payload = assignment.map(|a| {
            transmit.repr.flags.insert(CmFlags::ASSIGN);
            a.to_bytes()
        });
        let cm_len = transmit.repr.buffer_len();
        let mut bytes = vec![0u8; cm_len + payload.map_or(0, |p| p.len())];
        if transmit.repr.emit(&mut bytes).is_err() {
            return;
        }
        if let Some(payload) = payload {
            bytes[cm_len..].copy_from_slice(&payload);
        }
        self.sign(
            &mut bytes,
            transmit.repr.auth,
            cm_len.saturating_sub(AUTH_LEN),
        );
        if let Some(node) = transmit.node {
            let _ = self.paths.count_sent(node, transmit.path, bytes.len());
        }
        self.transmits.push_back(Datagram {
            interface: transmit.interface,
            remote: transmit.remote,
            path: transmit.path,
            bytes,
        });
    }

    /// The next packet to write to the TUN device.
    pub fn poll_tun(&mut self) -> Option<TunPacket> {
        self.tun.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<NodeEvent> {
        self.events.pop_front()
    }

    /// When [`Node::handle_timeout`] (then [`Node::poll_transmit`]) next has work.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let resequencing = self
            .holding
            .iter()
            .filter_map(|(node, session)| self.peers.get(node)?.sessions.get(session))
            .filter_map(|s| s.resequencer.as_ref().and_then(Resequencer::poll_timeout))
            .min();
        let handshake = if self.assignment.is_none() {
            self.availability.poll_timeout()
        } else {
            None
        };
        [
            self.paths.poll_timeout(),
            self.scheduler.poll_timeout(),
            resequencing,
            handshake,
            Some(self.next_housekeeping.unwrap_or(Timestamp::ZERO)),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

impl Session {
    fn new(paths: PathTable, first: &InnerPacket, resequencer: ResequencerConfig) -> Self {
        Session {
            paths,
            last_inbound: None,
            next_sequence: 0,
            dedup: DedupWindow::new(),
            resequencer: (first.protocol == Protocol::Tcp).then(|| Resequencer::new(resequencer)),
        }
    }
}

/// Whether an inner packet's IPv4 header can be left out and rebuilt from the
/// session: IPv4 without options, not a fragment, `DF` set (so the ID means
/// nothing, RFC 6864), no DSCP/ECN, and the total length matches.
fn compressible(packet: &[u8]) -> bool {
    packet.len() > IPV4_HEADER_LEN
        && packet[0] == 0x45
        && packet[1] == 0
        && usize::from(u16::from_be_bytes([packet[2], packet[3]])) == packet.len()
        && packet[6..8] == [0x40, 0x00]
}

/// Writes the IPv4 header of a compressed packet into `packet[..20]`, whose
/// last byte holds the sent TTL (the transport header follows): addresses and
/// protocol from the session tuple as seen by this receiving node, `DF`,
/// ID 0, that TTL, checksum. Returns false if the session is not IPv4 or the
/// packet is too short or too long.
fn restore_ipv4_header(packet: &mut [u8], tuple: crate::table::session::FiveTuple) -> bool {
    let (IpAddr::V4(source), IpAddr::V4(destination)) = (tuple.remote.ip(), tuple.local.ip())
    else {
        return false;
    };
    let Ok(total) = u16::try_from(packet.len()) else {
        return false;
    };
    let Some(header) = packet.get_mut(..IPV4_HEADER_LEN) else {
        return false;
    };
    let ttl = header[COMPRESSED_AWAY];
    header.fill(0);
    header[0] = 0x45;
    header[2..4].copy_from_slice(&total.to_be_bytes());
    header[6] = 0x40;
    header[IPV4_TTL] = ttl;
    header[9] = tuple.protocol.number();
    header[12..16].copy_from_slice(&source.octets());
    header[16..20].copy_from_slice(&destination.octets());
    let checksum = crate::packet::checksum::checksum(header);
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build;
    use crate::table::session::FiveTuple;
    use proptest::prelude::*;

    fn with_df(mut packet: Vec<u8>) -> Vec<u8> {
        packet[6] = 0x40;
        packet[10..12].fill(0);
        let checksum = crate::packet::checksum::checksum(&packet[..IPV4_HEADER_LEN]);
        packet[10..12].copy_from_slice(&checksum.to_be_bytes());
        packet
    }

    proptest! {
        /// Leaving the header out but its TTL, and writing it back from the
        /// receiver's session tuple, gives the packet back byte for byte
        /// (with DF and ID 0), TCP or UDP, whatever its TTL.
        #[test]
        fn compression_round_trips(
            source in any::<[u8; 4]>(),
            destination in any::<[u8; 4]>(),
            ports in any::<(u16, u16)>(),
            tcp in any::<bool>(),
            ttl in any::<u8>(),
            payload in proptest::collection::vec(any::<u8>(), 0..1400),
        ) {
            let (source, destination) = (Ipv4Addr::from(source), Ipv4Addr::from(destination));
            let mut packet = if tcp {
                build::ipv4_tcp(source, destination, ports.0, ports.1, 7, crate::packet::TCP_ACK, &[], &payload)
            } else {
                build::ipv4_udp(source, destination, ports.0, ports.1, &payload)
            };
            packet[IPV4_TTL] = ttl;
            let packet = with_df(packet);
            prop_assert!(compressible(&packet));
            let info = InnerPacket::parse(&packet).unwrap();
            // The receiver's view: the packet's destination is local.
            let tuple = info.inbound_tuple();
            // What the sender puts after the CM block: the TTL, then the transport.
            let mut wire = vec![0u8; FIXED_LEN];
            wire.push(ttl);
            wire.extend_from_slice(&packet[IPV4_HEADER_LEN..]);
            let start = FIXED_LEN + 1 - IPV4_HEADER_LEN;
            prop_assert!(restore_ipv4_header(&mut wire[start..], tuple));
            prop_assert_eq!(&wire[start..], &packet[..]);
        }
    }

    #[test]
    fn only_plain_unfragmented_df_packets_are_compressible() {
        let base = with_df(build::ipv4_udp(
            Ipv4Addr::new(10, 200, 0, 2),
            Ipv4Addr::new(10, 0, 3, 2),
            40000,
            53,
            b"x",
        ));
        assert!(compressible(&base));
        let mut ecn = base.clone();
        ecn[1] = 0x02;
        assert!(!compressible(&ecn), "TOS/ECN is not carried");
        let mut fragment = base.clone();
        fragment[6] = 0x20;
        assert!(!compressible(&fragment), "more fragments");
        let mut options = base.clone();
        options[0] = 0x46;
        assert!(!compressible(&options), "IPv4 options");
        assert!(!compressible(&base[..IPV4_HEADER_LEN]), "header only");
        let v6 = FiveTuple::from_inbound(
            Protocol::Udp,
            "[fd00::1]:53".parse().unwrap(),
            "[fd00::2]:40000".parse().unwrap(),
        );
        let mut buffer = base.clone();
        assert!(
            !restore_ipv4_header(&mut buffer, v6),
            "IPv6 sessions are not compressed"
        );
    }
}
