//! Sans-IO MPTCP connection and subflow tracker.
//!
//! Feed every decoded TCP segment with [`Tracker::handle_segment`] (the caller provides the
//! timestamp; the tracker never reads a clock), call [`Tracker::handle_timeout`] now and then
//! to expire idle subflows, and drain [`Event`]s with [`Tracker::poll_event`].
//!
//! Connections are keyed by token; MP_JOIN subflows attach through the token their SYN carries.
//! Every table is bounded by [`TrackerConfig`]; under a flood of MP_JOIN SYNs with unknown
//! tokens only a bounded, FIFO-evicted set of them is remembered (to report each once).

mod event;

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub use event::{
    AnomalyKind, ConnectionCloseReason, Event, FourTuple, Side, SubflowCloseReason, SubflowInfo,
};

use crate::crypto::{self, MptcpVersion};
use crate::wire::mptcp::{AddAddrForm, MpJoinRepr, MptcpRepr, OPTION_KIND};
use crate::wire::Segment;

/// Limits and thresholds of a [`Tracker`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerConfig {
    /// Report [`Event::MultipathThresholdReached`] when a connection has this many active
    /// subflows.
    pub multipath_threshold: usize,
    /// Most connections tracked at once.
    pub max_connections: usize,
    /// Most subflows (established or in handshake) tracked at once.
    pub max_subflows: usize,
    /// Most unknown MP_JOIN tokens remembered (to report each once).
    pub max_unknown_joins: usize,
    /// Most events queued before the oldest are dropped.
    pub max_queued_events: usize,
    /// An established subflow with no segment for this long is closed.
    pub idle_timeout: Duration,
    /// A handshake not completed within this time is forgotten.
    pub handshake_timeout: Duration,
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            multipath_threshold: 2,
            max_connections: 65_536,
            max_subflows: 262_144,
            max_unknown_joins: 4_096,
            max_queued_events: 65_536,
            idle_timeout: Duration::from_secs(600),
            handshake_timeout: Duration::from_secs(60),
        }
    }
}

/// Counters about what the tracker saw and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrackerStats {
    /// Segments handled.
    pub segments: u64,
    /// MPTCP options parsed.
    pub options: u64,
    /// Handshakes evicted to respect `max_subflows`.
    pub evicted_handshakes: u64,
    /// Unknown MP_JOIN tokens forgotten to respect `max_unknown_joins`.
    pub evicted_unknown_joins: u64,
    /// New subflows or connections refused because the tables were full of established state.
    pub refused: u64,
    /// Events dropped because the queue was full.
    pub dropped_events: u64,
}

/// FNV-1a: the tables are keyed by attacker-chosen tuples, but bounded in size, and this is
/// much cheaper than SipHash on the per-packet path.
#[derive(Default)]
struct FnvHasher(u64);

impl Hasher for FnvHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FnvHasher>>;

/// Direction-independent key of a TCP 4-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowKey(SocketAddr, SocketAddr);

impl FlowKey {
    fn new(a: SocketAddr, b: SocketAddr) -> FlowKey {
        if a <= b {
            FlowKey(a, b)
        } else {
            FlowKey(b, a)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handshake {
    /// MP_CAPABLE SYN seen; waiting for the SYN-ACK.
    CapableSyn {
        version: u8,
        client_key: Option<u64>,
    },
    /// MP_CAPABLE SYN-ACK seen; waiting for the third ACK.
    CapableSynAck {
        version: u8,
        client_key: Option<u64>,
        server_key: u64,
    },
    /// MP_JOIN SYN seen.
    JoinSyn { token: u32, nonce: u32 },
    /// MP_JOIN SYN-ACK seen.
    JoinSynAck {
        token: u32,
        nonce: u32,
        responder_nonce: u32,
    },
    /// Handshake complete.
    Established,
}

#[derive(Debug, Clone)]
struct Subflow {
    tuple: FourTuple,
    handshake: Handshake,
    connection: Option<u64>,
    initiator_side: Side,
    initiator_address_id: Option<u8>,
    responder_address_id: Option<u8>,
    backup: bool,
    fin_from_initiator: bool,
    fin_from_responder: bool,
    started: Duration,
    last_seen: Duration,
}

impl Subflow {
    fn info(&self) -> SubflowInfo {
        SubflowInfo {
            tuple: self.tuple,
            initiator_side: self.initiator_side,
            initiator_address_id: self.initiator_address_id,
            responder_address_id: self.responder_address_id,
            backup: self.backup,
        }
    }

    fn is_established(&self) -> bool {
        self.handshake == Handshake::Established
    }

    /// A join kept while its connection is unknown (see `Tracker::orphan_joins`).
    fn is_orphan(&self) -> bool {
        self.connection.is_none()
            && matches!(
                self.handshake,
                Handshake::JoinSyn { .. } | Handshake::JoinSynAck { .. } | Handshake::Established
            )
    }

    /// Which host of the connection sent a segment from `source`.
    fn sender_side(&self, source: SocketAddr) -> Side {
        if source == self.tuple.initiator {
            self.initiator_side
        } else {
            self.initiator_side.peer()
        }
    }
}

#[derive(Debug, Clone)]
struct Connection {
    version: MptcpVersion,
    keys: [u64; 2],
    tokens: [u32; 2],
    subflows: Vec<FlowKey>,
    announced: [FastMap<u8, (IpAddr, Option<u16>)>; 2],
    threshold_reported: bool,
}

impl Connection {
    fn token(&self) -> u32 {
        self.tokens[Side::Server.index()]
    }

    fn key(&self, side: Side) -> u64 {
        self.keys[side.index()]
    }
}

/// At most this many MPTCP options are considered per segment.
const MAX_OPTIONS_PER_SEGMENT: usize = 12;

/// The MPTCP connection and subflow tracker.
#[derive(Debug)]
pub struct Tracker {
    config: TrackerConfig,
    subflows: FastMap<FlowKey, Subflow>,
    /// Subflows in handshake, oldest first (may hold stale keys; checked on eviction).
    handshakes: VecDeque<FlowKey>,
    connections: FastMap<u64, Connection>,
    tokens: FastMap<u32, u64>,
    next_connection: u64,
    /// Server-key tokens of MP_CAPABLE handshakes past their SYN-ACK, to their subflow. A client's
    /// MP_JOIN carries this token, and when subflows are captured on several interfaces, the join SYN
    /// can be seen before the third ACK that establishes the connection.
    handshake_tokens: FastMap<u32, FlowKey>,
    /// MP_JOIN subflows whose token was unknown when seen (bounded with `unknown_joins`), by token:
    /// adopted if a connection with that token is established later, since joins captured on one
    /// interface can reach the tracker before the handshake captured on another.
    /// They are kept in `subflows` (so their SYN-ACK and ACK still advance them) but not in
    /// `handshakes`: a flood of unknown joins must not evict real handshakes.
    orphan_joins: FastMap<u32, Vec<FlowKey>>,
    unknown_joins: HashSet<(FlowKey, u32), BuildHasherDefault<FnvHasher>>,
    unknown_join_order: VecDeque<(FlowKey, u32)>,
    events: VecDeque<Event>,
    stats: TrackerStats,
    last_sweep: Option<Duration>,
    /// Tokens of recently closed subflows, so that their last segments (final ACKs,
    /// retransmissions) can still be attributed to their connection. Bounded, FIFO.
    recently_closed: FastMap<FlowKey, u32>,
    recently_closed_order: VecDeque<FlowKey>,
}

/// How many closed subflows keep their connection token for attribution.
const RECENTLY_CLOSED_CAPACITY: usize = 4_096;

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new(TrackerConfig::default())
    }
}

impl Tracker {
    /// A tracker with the given limits.
    pub fn new(config: TrackerConfig) -> Tracker {
        Tracker {
            config,
            subflows: FastMap::default(),
            handshakes: VecDeque::new(),
            connections: FastMap::default(),
            tokens: FastMap::default(),
            next_connection: 0,
            handshake_tokens: FastMap::default(),
            orphan_joins: FastMap::default(),
            unknown_joins: HashSet::default(),
            unknown_join_order: VecDeque::new(),
            events: VecDeque::new(),
            stats: TrackerStats::default(),
            last_sweep: None,
            recently_closed: FastMap::default(),
            recently_closed_order: VecDeque::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &TrackerConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> TrackerStats {
        self.stats
    }

    /// Connections currently tracked.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Subflows currently tracked (in handshake or established).
    pub fn subflow_count(&self) -> usize {
        self.subflows.values().filter(|s| !s.is_orphan()).count()
    }

    /// Unknown MP_JOIN tokens currently remembered.
    pub fn unknown_join_count(&self) -> usize {
        self.unknown_joins.len()
    }

    /// Active (established) subflows of the connection with this token.
    pub fn active_subflows(&self, token: u32) -> Option<usize> {
        let id = self.tokens.get(&token)?;
        Some(self.active_count(*id))
    }

    /// The established subflows of the connection with this token (for building per-subflow
    /// classification rules).
    pub fn subflows(&self, token: u32) -> Vec<SubflowInfo> {
        let Some(connection) = self
            .tokens
            .get(&token)
            .and_then(|id| self.connections.get(id))
        else {
            return Vec::new();
        };
        connection
            .subflows
            .iter()
            .filter_map(|key| self.subflows.get(key))
            .filter(|subflow| subflow.is_established())
            .map(Subflow::info)
            .collect()
    }

    /// The token (server's token) of the connection a segment between these endpoints
    /// belongs to, once known.
    /// Recently closed subflows keep their token for a while.
    pub fn connection_token(&self, a: SocketAddr, b: SocketAddr) -> Option<u32> {
        let key = FlowKey::new(a, b);
        let Some(subflow) = self.subflows.get(&key) else {
            return self.recently_closed.get(&key).copied();
        };
        let connection = self.connections.get(&subflow.connection?)?;
        Some(connection.token())
    }

    fn remember_closed(&mut self, key: FlowKey, token: u32) {
        if self.recently_closed.insert(key, token).is_none() {
            self.recently_closed_order.push_back(key);
        }
        while self.recently_closed.len() > RECENTLY_CLOSED_CAPACITY {
            match self.recently_closed_order.pop_front() {
                Some(oldest) => {
                    self.recently_closed.remove(&oldest);
                }
                None => break,
            }
        }
    }

    /// The next queued event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn push(&mut self, event: Event) {
        if self.events.len() >= self.config.max_queued_events {
            self.events.pop_front();
            self.stats.dropped_events += 1;
        }
        self.events.push_back(event);
    }

    fn anomaly(&mut self, kind: AnomalyKind, segment: &Segment<'_>, token: Option<u32>) {
        self.push(Event::Anomaly {
            kind,
            source: SocketAddr::new(segment.src, segment.src_port),
            destination: SocketAddr::new(segment.dst, segment.dst_port),
            token,
        });
    }

    fn active_count(&self, connection: u64) -> usize {
        self.connections.get(&connection).map_or(0, |connection| {
            connection
                .subflows
                .iter()
                .filter(|key| self.subflows.get(key).is_some_and(Subflow::is_established))
                .count()
        })
    }

    /// Expires idle subflows and stale handshakes.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.last_sweep = Some(now);
        let idle = self.config.idle_timeout;
        let handshake = self.config.handshake_timeout;
        let expired: Vec<(FlowKey, bool)> = self
            .subflows
            .iter()
            .filter_map(|(key, subflow)| {
                if subflow.is_established() && subflow.connection.is_some() {
                    (now.saturating_sub(subflow.last_seen) >= idle).then_some((*key, true))
                } else {
                    (now.saturating_sub(subflow.started) >= handshake).then_some((*key, false))
                }
            })
            .collect();
        for (key, established) in expired {
            if established {
                self.close_subflow(key, SubflowCloseReason::IdleTimeout);
            } else {
                self.forget_subflow(key);
            }
        }
        self.handshakes
            .retain(|key| self.subflows.get(key).is_some_and(|s| !s.is_established()));
    }

    /// Processes one TCP segment seen at `now`.
    pub fn handle_segment(&mut self, now: Duration, segment: &Segment<'_>) {
        self.stats.segments += 1;
        if self
            .last_sweep
            .is_none_or(|last| now.saturating_sub(last) >= Duration::from_secs(1))
        {
            if self.last_sweep.is_some() {
                self.handle_timeout(now);
            } else {
                self.last_sweep = Some(now);
            }
        }

        let mut options = [None; MAX_OPTIONS_PER_SEGMENT];
        let mut option_count = 0;
        let mut malformed = false;
        for option in segment.tcp_options() {
            match option {
                Ok(option) if option.kind == OPTION_KIND => {
                    match MptcpRepr::from_bytes(option.bytes) {
                        Ok(repr) if option_count < MAX_OPTIONS_PER_SEGMENT => {
                            options[option_count] = Some(repr);
                            option_count += 1;
                        }
                        Ok(_) => {}
                        Err(_) => malformed = true,
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        self.stats.options += option_count as u64;
        let options = &options[..option_count];

        let source = SocketAddr::new(segment.src, segment.src_port);
        let destination = SocketAddr::new(segment.dst, segment.dst_port);
        let key = FlowKey::new(source, destination);
        if malformed {
            let token = self.connection_token(source, destination);
            self.anomaly(AnomalyKind::MalformedOption, segment, token);
        }

        let flags = segment.flags;
        if flags.syn() && !flags.ack() {
            self.handle_syn(now, segment, key, source, destination, options);
        } else if flags.syn() {
            self.handle_syn_ack(now, segment, key, source, options);
        } else {
            self.handle_non_syn(now, segment, key, source, options);
        }
    }

    fn insert_handshake(&mut self, now: Duration, key: FlowKey, subflow: Subflow) -> bool {
        self.recently_closed.remove(&key);
        if let Some(old) = self.subflows.get(&key) {
            // Port reuse: a new SYN on a tuple we still track.
            if old.is_established() {
                self.close_subflow(key, SubflowCloseReason::Reset);
            } else {
                self.forget_subflow(key);
            }
        }
        if self.subflows.len() >= self.config.max_subflows {
            self.handle_timeout(now);
        }
        while self.subflows.len() >= self.config.max_subflows {
            let Some(oldest) = self.handshakes.pop_front() else {
                self.stats.refused += 1;
                return false;
            };
            if self
                .subflows
                .get(&oldest)
                .is_some_and(|s| !s.is_established())
            {
                self.forget_subflow(oldest);
                self.stats.evicted_handshakes += 1;
            }
        }
        self.subflows.insert(key, subflow);
        self.handshakes.push_back(key);
        // Keep the FIFO from growing with stale entries.
        if self.handshakes.len() > 2 * self.config.max_subflows.max(16) {
            let subflows = &self.subflows;
            self.handshakes
                .retain(|key| subflows.get(key).is_some_and(|s| !s.is_established()));
        }
        true
    }

    /// Removes a subflow that never completed its handshake, without events.
    fn forget_subflow(&mut self, key: FlowKey) {
        if let Some(subflow) = self.subflows.remove(&key) {
            if let Handshake::CapableSynAck {
                version,
                server_key,
                ..
            } = subflow.handshake
            {
                let token = crypto::token(crypto::MptcpVersion::from_wire(version), server_key);
                if self.handshake_tokens.get(&token) == Some(&key) {
                    self.handshake_tokens.remove(&token);
                }
            }
            if let Some(id) = subflow.connection {
                if let Some(connection) = self.connections.get_mut(&id) {
                    connection.subflows.retain(|k| *k != key);
                }
            }
        }
    }

    fn handle_syn(
        &mut self,
        now: Duration,
        segment: &Segment<'_>,
        key: FlowKey,
        source: SocketAddr,
        destination: SocketAddr,
        options: &[Option<MptcpRepr>],
    ) {
        let tuple = FourTuple {
            initiator: source,
            responder: destination,
        };
        let new_subflow = |handshake, connection, initiator_side, address_id, backup| Subflow {
            tuple,
            handshake,
            connection,
            initiator_side,
            initiator_address_id: address_id,
            responder_address_id: None,
            backup,
            fin_from_initiator: false,
            fin_from_responder: false,
            started: now,
            last_seen: now,
        };
        for option in options.iter().flatten() {
            match option {
                MptcpRepr::MpCapable(capable) => {
                    if self
                        .subflows
                        .get(&key)
                        .is_some_and(|s| s.tuple == tuple && !s.is_established())
                    {
                        // Retransmitted SYN.
                        return;
                    }
                    let handshake = Handshake::CapableSyn {
                        version: capable.version,
                        client_key: capable.sender_key,
                    };
                    self.insert_handshake(
                        now,
                        key,
                        new_subflow(handshake, None, Side::Client, Some(0), false),
                    );
                    return;
                }
                MptcpRepr::MpJoin(MpJoinRepr::Syn {
                    backup,
                    address_id,
                    token,
                    nonce,
                }) => {
                    let Some(&id) = self.tokens.get(token) else {
                        let handshake = Handshake::JoinSyn {
                            token: *token,
                            nonce: *nonce,
                        };
                        let orphan =
                            new_subflow(handshake, None, Side::Client, Some(*address_id), *backup);
                        self.unknown_join(segment, key, *token, orphan);
                        return;
                    };
                    if self
                        .subflows
                        .get(&key)
                        .is_some_and(|s| s.tuple == tuple && !s.is_established())
                    {
                        return;
                    }
                    let connection = &self.connections[&id];
                    // The SYN carries the token of the receiving host.
                    let initiator_side = if connection.tokens[Side::Server.index()] == *token {
                        Side::Client
                    } else {
                        Side::Server
                    };
                    let handshake = Handshake::JoinSyn {
                        token: *token,
                        nonce: *nonce,
                    };
                    let subflow = new_subflow(
                        handshake,
                        Some(id),
                        initiator_side,
                        Some(*address_id),
                        *backup,
                    );
                    if self.insert_handshake(now, key, subflow) {
                        if let Some(connection) = self.connections.get_mut(&id) {
                            connection.subflows.push(key);
                        }
                    }
                    return;
                }
                _ => {}
            }
        }
        // A plain SYN on a tracked tuple: the old subflow is gone.
        if self.subflows.contains_key(&key) {
            self.forget_or_close(key);
        }
    }

    fn forget_or_close(&mut self, key: FlowKey) {
        if self.subflows.get(&key).is_some_and(Subflow::is_established) {
            self.close_subflow(key, SubflowCloseReason::Reset);
        } else {
            self.forget_subflow(key);
        }
    }

    /// Remembers a join whose token is not (yet) a connection's. It is reported as an anomaly unless the
    /// token belongs to a handshake in progress, and adopted if that connection is established.
    fn unknown_join(&mut self, segment: &Segment<'_>, key: FlowKey, token: u32, orphan: Subflow) {
        if self.unknown_joins.contains(&(key, token)) {
            return;
        }
        let expected = self.handshake_tokens.contains_key(&token);
        if self.config.max_unknown_joins > 0 && !self.subflows.contains_key(&key) {
            while self.unknown_joins.len() >= self.config.max_unknown_joins {
                let Some((oldest, oldest_token)) = self.unknown_join_order.pop_front() else {
                    break;
                };
                if !self.unknown_joins.remove(&(oldest, oldest_token)) {
                    continue; // adopted meanwhile
                }
                if self
                    .subflows
                    .get(&oldest)
                    .is_some_and(|s| s.connection.is_none())
                {
                    self.subflows.remove(&oldest);
                }
                if let Some(orphans) = self.orphan_joins.get_mut(&oldest_token) {
                    orphans.retain(|k| *k != oldest);
                    if orphans.is_empty() {
                        self.orphan_joins.remove(&oldest_token);
                    }
                }
                self.stats.evicted_unknown_joins += 1;
            }
            self.unknown_joins.insert((key, token));
            self.unknown_join_order.push_back((key, token));
            self.subflows.insert(key, orphan);
            self.orphan_joins.entry(token).or_default().push(key);
        }
        if !expected {
            self.anomaly(AnomalyKind::UnknownToken { token }, segment, None);
        }
    }

    /// Attaches the joins that named one of a new connection's tokens before it was established.
    fn adopt_orphan_joins(&mut self, id: u64, tokens: [u32; 2]) {
        // A join carries the token of the host it is sent to; the other host initiated it.
        for (side, token) in [(Side::Server, tokens[0]), (Side::Client, tokens[1])] {
            for join in self.orphan_joins.remove(&token).unwrap_or_default() {
                self.unknown_joins.remove(&(join, token));
                let Some(subflow) = self.subflows.get_mut(&join) else {
                    continue;
                };
                if subflow.connection.is_some() {
                    continue;
                }
                subflow.connection = Some(id);
                subflow.initiator_side = side;
                let established = subflow.is_established();
                if let Some(connection) = self.connections.get_mut(&id) {
                    connection.subflows.push(join);
                }
                if established {
                    self.subflow_added(join, id);
                } else {
                    self.handshakes.push_back(join);
                }
            }
        }
    }

    fn handle_syn_ack(
        &mut self,
        now: Duration,
        segment: &Segment<'_>,
        key: FlowKey,
        source: SocketAddr,
        options: &[Option<MptcpRepr>],
    ) {
        let Some(subflow) = self.subflows.get_mut(&key) else {
            return;
        };
        if subflow.tuple.responder != source {
            return;
        }
        subflow.last_seen = now;
        match subflow.handshake {
            Handshake::CapableSyn {
                version,
                client_key,
            }
            | Handshake::CapableSynAck {
                version,
                client_key,
                ..
            } => {
                let capable = options.iter().flatten().find_map(|option| match option {
                    MptcpRepr::MpCapable(capable) => Some(*capable),
                    _ => None,
                });
                match capable {
                    Some(capable) => {
                        let server_key = capable.sender_key.unwrap_or(0);
                        subflow.handshake = Handshake::CapableSynAck {
                            version,
                            client_key,
                            server_key,
                        };
                        let token =
                            crypto::token(crypto::MptcpVersion::from_wire(version), server_key);
                        self.handshake_tokens.insert(token, key);
                    }
                    None => {
                        let tuple = subflow.tuple;
                        self.forget_subflow(key);
                        self.push(Event::Fallback { tuple });
                    }
                }
            }
            Handshake::JoinSyn { token, nonce } | Handshake::JoinSynAck { token, nonce, .. } => {
                let join = options.iter().flatten().find_map(|option| match option {
                    MptcpRepr::MpJoin(MpJoinRepr::SynAck {
                        backup: _,
                        address_id,
                        hmac,
                        nonce,
                    }) => Some((*address_id, *hmac, *nonce)),
                    _ => None,
                });
                let Some((address_id, hmac, responder_nonce)) = join else {
                    // The join was refused with a plain SYN-ACK (or the option stripped).
                    self.forget_subflow(key);
                    return;
                };
                subflow.responder_address_id = Some(address_id);
                subflow.handshake = Handshake::JoinSynAck {
                    token,
                    nonce,
                    responder_nonce,
                };
                let initiator_side = subflow.initiator_side;
                let Some(connection) = subflow.connection.and_then(|id| self.connections.get(&id))
                else {
                    return;
                };
                // Host B (responder) owns the token; A is the initiator.
                let key_b = connection.key(initiator_side.peer());
                let key_a = connection.key(initiator_side);
                let expected = crypto::join_synack_hmac(
                    connection.version,
                    key_b,
                    key_a,
                    responder_nonce,
                    nonce,
                );
                if expected != hmac {
                    let token = connection.token();
                    self.anomaly(
                        AnomalyKind::HmacMismatch {
                            option: "mp_join_syn_ack",
                        },
                        segment,
                        Some(token),
                    );
                }
            }
            Handshake::Established => {}
        }
    }

    fn handle_non_syn(
        &mut self,
        now: Duration,
        segment: &Segment<'_>,
        key: FlowKey,
        source: SocketAddr,
        options: &[Option<MptcpRepr>],
    ) {
        if !self.subflows.contains_key(&key) {
            // Mid-stream pickup: an MP_CAPABLE carrying both keys is enough to start tracking.
            let keys = options.iter().flatten().find_map(|option| match option {
                MptcpRepr::MpCapable(capable) => {
                    Some((capable.version, capable.sender_key?, capable.receiver_key?))
                }
                _ => None,
            });
            let Some((version, sender_key, receiver_key)) = keys else {
                return;
            };
            let destination = SocketAddr::new(segment.dst, segment.dst_port);
            let subflow = Subflow {
                tuple: FourTuple {
                    initiator: source,
                    responder: destination,
                },
                handshake: Handshake::CapableSynAck {
                    version,
                    client_key: Some(sender_key),
                    server_key: receiver_key,
                },
                connection: None,
                initiator_side: Side::Client,
                initiator_address_id: Some(0),
                responder_address_id: None,
                backup: false,
                fin_from_initiator: false,
                fin_from_responder: false,
                started: now,
                last_seen: now,
            };
            if !self.insert_handshake(now, key, subflow) {
                return;
            }
        }
        let Some(subflow) = self.subflows.get_mut(&key) else {
            return;
        };
        subflow.last_seen = now;
        let was_established = subflow.is_established();
        if let Handshake::CapableSyn {
            version,
            client_key,
        } = subflow.handshake
        {
            // The SYN-ACK was not seen: the third ACK's receiver key is the server's key.
            let server_key = options.iter().flatten().find_map(|option| match option {
                MptcpRepr::MpCapable(capable) if source == subflow.tuple.initiator => {
                    capable.receiver_key
                }
                _ => None,
            });
            if let Some(server_key) = server_key {
                subflow.handshake = Handshake::CapableSynAck {
                    version,
                    client_key,
                    server_key,
                };
            }
        }
        match subflow.handshake {
            Handshake::CapableSyn { .. } => {}
            Handshake::CapableSynAck {
                version,
                client_key,
                server_key,
            } => {
                let capable = options.iter().flatten().find_map(|option| match option {
                    MptcpRepr::MpCapable(capable) => Some(*capable),
                    _ => None,
                });
                if source != subflow.tuple.initiator {
                    // The server talks before the third ACK was seen: only v0 has both keys.
                    if let (0, Some(client_key)) = (version, client_key) {
                        self.establish_connection(key, version, client_key, server_key);
                    }
                } else if let Some(capable) = capable {
                    let (Some(sender_key), Some(receiver_key)) =
                        (capable.sender_key, capable.receiver_key)
                    else {
                        return;
                    };
                    for (expected, seen) in
                        [(client_key, sender_key), (Some(server_key), receiver_key)]
                    {
                        if let Some(expected) = expected.filter(|expected| *expected != seen) {
                            self.anomaly(AnomalyKind::KeyChange { expected, seen }, segment, None);
                        }
                    }
                    // The handshake's keys win over the changed ones.
                    let client_key = client_key.unwrap_or(sender_key);
                    self.establish_connection(key, version, client_key, server_key);
                } else if let (0, Some(client_key)) = (version, client_key) {
                    self.establish_connection(key, version, client_key, server_key);
                }
            }
            Handshake::JoinSyn { .. } => {}
            Handshake::JoinSynAck {
                token: _,
                nonce,
                responder_nonce,
            } => {
                if source != subflow.tuple.initiator {
                    return;
                }
                let ack_hmac = options.iter().flatten().find_map(|option| match option {
                    MptcpRepr::MpJoin(MpJoinRepr::Ack { hmac }) => Some(*hmac),
                    _ => None,
                });
                subflow.handshake = Handshake::Established;
                let initiator_side = subflow.initiator_side;
                let Some(id) = subflow.connection else {
                    return;
                };
                if let (Some(hmac), Some(connection)) = (ack_hmac, self.connections.get(&id)) {
                    let key_a = connection.key(initiator_side);
                    let key_b = connection.key(initiator_side.peer());
                    let expected = crypto::join_ack_hmac(
                        connection.version,
                        key_a,
                        key_b,
                        nonce,
                        responder_nonce,
                    );
                    if expected != hmac {
                        let token = connection.token();
                        self.anomaly(
                            AnomalyKind::HmacMismatch {
                                option: "mp_join_ack",
                            },
                            segment,
                            Some(token),
                        );
                    }
                }
                self.subflow_added(key, id);
            }
            Handshake::Established => {}
        }
        // MP_CAPABLE keys of a handshake that completed just now were checked above.
        self.handle_established(segment, key, source, options, was_established);
    }

    fn establish_connection(
        &mut self,
        key: FlowKey,
        version: u8,
        client_key: u64,
        server_key: u64,
    ) {
        let version = crypto::MptcpVersion::from_wire(version);
        if self.connections.len() >= self.config.max_connections {
            self.stats.refused += 1;
            self.forget_subflow(key);
            return;
        }
        let tokens = [
            crypto::token(version, client_key),
            crypto::token(version, server_key),
        ];
        for token in tokens {
            if let Some(old) = self.tokens.get(&token).copied() {
                // A token collision or a reused key: the old connection is superseded.
                self.close_connection(old, ConnectionCloseReason::LastSubflowClosed);
            }
        }
        let id = self.next_connection;
        self.next_connection += 1;
        let connection = Connection {
            version,
            keys: [client_key, server_key],
            tokens,
            subflows: vec![key],
            announced: [FastMap::default(), FastMap::default()],
            threshold_reported: false,
        };
        let token = connection.token();
        self.connections.insert(id, connection);
        for token in tokens {
            self.tokens.insert(token, id);
        }
        self.handshake_tokens.remove(&tokens[1]);
        let Some(subflow) = self.subflows.get_mut(&key) else {
            return;
        };
        subflow.connection = Some(id);
        subflow.handshake = Handshake::Established;
        let info = subflow.info();
        self.push(Event::ConnectionEstablished {
            token,
            client_token: tokens[0],
            version,
            subflow: info,
        });
        self.subflow_added(key, id);
        self.adopt_orphan_joins(id, tokens);
    }

    fn subflow_added(&mut self, key: FlowKey, id: u64) {
        let active = self.active_count(id);
        let Some(info) = self.subflows.get(&key).map(Subflow::info) else {
            return;
        };
        let Some(connection) = self.connections.get(&id) else {
            return;
        };
        let token = connection.token();
        let report = !connection.threshold_reported && active >= self.config.multipath_threshold;
        let subflows: Vec<SubflowInfo> = if report {
            connection
                .subflows
                .iter()
                .filter_map(|key| self.subflows.get(key))
                .filter(|subflow| subflow.is_established())
                .map(Subflow::info)
                .collect()
        } else {
            Vec::new()
        };
        self.push(Event::SubflowAdded {
            token,
            subflow: info,
            active_subflows: active,
        });
        if report {
            if let Some(connection) = self.connections.get_mut(&id) {
                connection.threshold_reported = true;
            }
            self.push(Event::MultipathThresholdReached {
                token,
                active_subflows: active,
                threshold: self.config.multipath_threshold,
                subflows,
            });
        }
    }

    fn handle_established(
        &mut self,
        segment: &Segment<'_>,
        key: FlowKey,
        source: SocketAddr,
        options: &[Option<MptcpRepr>],
        check_capable_keys: bool,
    ) {
        let Some(subflow) = self.subflows.get(&key) else {
            return;
        };
        let Some(id) = subflow.connection else {
            return;
        };
        if !subflow.is_established() {
            return;
        }
        let side = subflow.sender_side(source);
        let mut tcprst = None;
        for option in options.iter().flatten() {
            let Some(connection) = self.connections.get_mut(&id) else {
                return;
            };
            let token = connection.token();
            match option {
                MptcpRepr::MpCapable(_) if !check_capable_keys => {}
                MptcpRepr::MpCapable(capable) => {
                    let sender = connection.key(side);
                    let receiver = connection.key(side.peer());
                    let pairs = [
                        (sender, capable.sender_key),
                        (receiver, capable.receiver_key),
                    ];
                    for (expected, seen) in pairs {
                        if let Some(seen) = seen.filter(|seen| *seen != expected) {
                            self.anomaly(
                                AnomalyKind::KeyChange { expected, seen },
                                segment,
                                Some(token),
                            );
                        }
                    }
                }
                MptcpRepr::AddAddr(add) => {
                    if add.echo() {
                        continue;
                    }
                    let previous = connection.announced[side.index()]
                        .insert(add.address_id, (add.address, add.port));
                    let hmac_failed = match add.form {
                        AddAddrForm::V1 {
                            hmac: Some(hmac), ..
                        } => crypto::check_add_addr_hmac(
                            connection.key(side),
                            connection.key(side.peer()),
                            add.address_id,
                            add.address,
                            add.port,
                            hmac,
                        )
                        .is_none(),
                        _ => false,
                    };
                    if hmac_failed {
                        self.anomaly(
                            AnomalyKind::HmacMismatch { option: "add_addr" },
                            segment,
                            Some(token),
                        );
                    }
                    match previous {
                        Some((address, port)) if address == add.address && port == add.port => {}
                        Some((previous, _)) if previous != add.address => {
                            self.anomaly(
                                AnomalyKind::DuplicateAddressId {
                                    address_id: add.address_id,
                                    previous,
                                    address: add.address,
                                },
                                segment,
                                Some(token),
                            );
                        }
                        _ => {
                            let via = self.subflows.get(&key).map(|s| s.tuple);
                            self.push(Event::AddressAnnounced {
                                token,
                                side,
                                address_id: add.address_id,
                                address: add.address,
                                port: add.port,
                                via: via.unwrap_or(FourTuple {
                                    initiator: source,
                                    responder: source,
                                }),
                            });
                        }
                    }
                }
                MptcpRepr::RemoveAddr(remove) => {
                    let subflow_keys = connection.subflows.clone();
                    let mut removed = Vec::new();
                    for &address_id in remove.address_ids() {
                        let announced = connection.announced[side.index()]
                            .remove(&address_id)
                            .map(|(address, _)| address);
                        removed.push((address_id, announced));
                    }
                    for (address_id, announced) in removed {
                        let address = announced.or_else(|| {
                            subflow_keys
                                .iter()
                                .filter_map(|k| self.subflows.get(k))
                                .find_map(|s| {
                                    if s.initiator_side == side
                                        && s.initiator_address_id == Some(address_id)
                                    {
                                        Some(s.tuple.initiator.ip())
                                    } else if s.initiator_side != side
                                        && s.responder_address_id == Some(address_id)
                                    {
                                        Some(s.tuple.responder.ip())
                                    } else {
                                        None
                                    }
                                })
                        });
                        self.push(Event::AddressRemoved {
                            token,
                            side,
                            address_id,
                            address,
                        });
                    }
                }
                MptcpRepr::MpPrio(prio) => {
                    let targets: Vec<FlowKey> = match prio.address_id {
                        // v0: every subflow using that address id of the receiver... of the sender.
                        Some(address_id) => connection
                            .subflows
                            .iter()
                            .copied()
                            .filter(|k| {
                                self.subflows.get(k).is_some_and(|s| {
                                    (s.initiator_side == side
                                        && s.initiator_address_id == Some(address_id))
                                        || (s.initiator_side != side
                                            && s.responder_address_id == Some(address_id))
                                })
                            })
                            .collect(),
                        None => vec![key],
                    };
                    for target in targets {
                        if let Some(subflow) = self.subflows.get_mut(&target) {
                            subflow.backup = prio.backup;
                            let info = subflow.info();
                            self.push(Event::PriorityChanged {
                                token,
                                subflow: info,
                                side,
                                address_id: prio.address_id,
                            });
                        }
                    }
                }
                MptcpRepr::MpFastclose(_) => {
                    self.close_connection(id, ConnectionCloseReason::FastClose);
                    return;
                }
                MptcpRepr::MpTcpRst(rst) => tcprst = Some(*rst),
                MptcpRepr::MpJoin(_) | MptcpRepr::Dss(_) | MptcpRepr::MpFail(_) => {}
            }
        }
        let flags = segment.flags;
        if flags.rst() {
            let reason = match tcprst {
                Some(rst) => SubflowCloseReason::TcpRst {
                    reason: rst.reason,
                    transient: rst.transient(),
                },
                None => SubflowCloseReason::Reset,
            };
            self.close_subflow(key, reason);
        } else if flags.fin() {
            let Some(subflow) = self.subflows.get_mut(&key) else {
                return;
            };
            if source == subflow.tuple.initiator {
                subflow.fin_from_initiator = true;
            } else {
                subflow.fin_from_responder = true;
            }
            if subflow.fin_from_initiator && subflow.fin_from_responder {
                self.close_subflow(key, SubflowCloseReason::Fin);
            }
        }
    }

    fn close_subflow(&mut self, key: FlowKey, reason: SubflowCloseReason) {
        let Some(subflow) = self.subflows.remove(&key) else {
            return;
        };
        let Some(id) = subflow.connection else {
            return;
        };
        let Some(connection) = self.connections.get_mut(&id) else {
            return;
        };
        connection.subflows.retain(|k| *k != key);
        let token = connection.token();
        self.remember_closed(key, token);
        let active = self.active_count(id);
        if subflow.is_established() {
            self.push(Event::SubflowClosed {
                token,
                subflow: subflow.info(),
                reason,
                active_subflows: active,
            });
        }
        if let Some(connection) = self.connections.get_mut(&id) {
            if active < self.config.multipath_threshold {
                connection.threshold_reported = false;
            }
        }
        // Without an established subflow the connection is gone (pending joins die with it).
        if active == 0 {
            self.close_connection(id, ConnectionCloseReason::LastSubflowClosed);
        }
    }

    fn close_connection(&mut self, id: u64, reason: ConnectionCloseReason) {
        let Some(connection) = self.connections.get(&id) else {
            return;
        };
        let subflow_reason = match reason {
            ConnectionCloseReason::FastClose => SubflowCloseReason::FastClose,
            ConnectionCloseReason::LastSubflowClosed => SubflowCloseReason::Evicted,
        };
        let token = connection.token();
        let keys = connection.subflows.clone();
        for key in keys {
            if let Some(connection) = self.connections.get_mut(&id) {
                connection.subflows.retain(|k| *k != key);
            }
            if let Some(subflow) = self.subflows.remove(&key) {
                self.remember_closed(key, token);
                if subflow.is_established() {
                    let active = self.active_count(id);
                    self.push(Event::SubflowClosed {
                        token,
                        subflow: subflow.info(),
                        reason: subflow_reason,
                        active_subflows: active,
                    });
                }
            }
        }
        if let Some(connection) = self.connections.remove(&id) {
            for token in connection.tokens {
                if self.tokens.get(&token) == Some(&id) {
                    self.tokens.remove(&token);
                }
            }
        }
        self.push(Event::ConnectionClosed { token, reason });
    }
}
