//! The detour host's protocol state, sans I/O: it turns a datagram into an outcome, a reply and NAT
//! changes, which it asks of a [`Host`] (the nftables table in production, a recorder in tests).
//!
//! Order of checks for a datagram: parse; version 1 only if configured (and only from `v1_clients`); for
//! version 2 the key id, the MAC, the timestamp window and the nonce (replays are dropped without using
//! the client's request budget, so a replayed packet cannot exhaust it); then the client's rate limit,
//! the client binding of the key, the destination ACL, reuse of an existing mapping, the quotas, the
//! choice of detour port, and installation. Only authenticated version 2 requests get an error answer;
//! everything unauthenticated is dropped silently (and counted), so the detour never reflects traffic to
//! a forged source.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;

use crate::key::Psk;
use crate::wire::{Op, Packet, Repr, Status, V1Repr, V2Repr};

/// One NAT mapping: packets from `client` to this host's TCP port `dpt` go to `rip:rpt`, from this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// The client's address.
    pub client: Ipv4Addr,
    /// The detour port on this host.
    pub dpt: u16,
    /// Remote (server) address.
    pub rip: Ipv4Addr,
    /// Remote port.
    pub rpt: u16,
}

/// What the core needs from the system.
pub trait Host {
    /// Installs a mapping (an nft map element).
    fn install(&mut self, mapping: &Mapping) -> Result<(), String>;
    /// Removes a mapping.
    fn remove(&mut self, mapping: &Mapping) -> Result<(), String>;
    /// The TCP ports something listens on here.
    fn listening_ports(&mut self) -> HashSet<u16>;
}

/// A pre-shared key and the client addresses that may use it.
#[derive(Debug, Clone)]
pub struct KeyBinding {
    /// A name for logs (the key file, or the client's name).
    pub name: String,
    /// The key.
    pub psk: Psk,
    /// Sources allowed to use it (`0.0.0.0/0` for a collective key).
    pub clients: Vec<Ipv4Net>,
}

/// The policy the core applies.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Keys for version 2.
    pub keys: Vec<KeyBinding>,
    /// Sources allowed to use unauthenticated version 1 (empty: version 1 refused).
    pub v1_clients: Vec<Ipv4Net>,
    /// How far a version 2 timestamp may be from this host's clock.
    pub max_clock_skew: Duration,
    /// Mappings one client may hold.
    pub mappings_per_client: usize,
    /// Mappings in all.
    pub max_mappings: usize,
    /// Requests per second one client may send (sustained).
    pub request_rate: f64,
    /// Requests one client may send at once.
    pub request_burst: u32,
    /// A mapping without traffic or requests for this long is removed.
    pub idle_timeout: Duration,
    /// Where detour ports come from when the proposed one cannot be used.
    pub port_range: RangeInclusive<u16>,
    /// Destinations never mapped (loopback, link-local, this host's networks...).
    pub deny_destinations: Vec<Ipv4Net>,
}

/// What happened to a datagram (the `result` label of `detour_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A new mapping.
    Created,
    /// The client's existing mapping to that destination.
    Reused,
    /// A mapping given back.
    Released,
    /// Release of a mapping the client does not hold.
    NotFound,
    /// The destination is not allowed.
    DeniedDestination,
    /// The source may not use that key (or version 1).
    DeniedClient,
    /// The client holds `mappings_per_client` mappings.
    OverQuota,
    /// `max_mappings` reached.
    Full,
    /// No free detour port for this client.
    NoPort,
    /// Installing the mapping failed.
    InstallFailed,
    /// The client's rate limit.
    RateLimited,
    /// Not a message (length, version, op, status), or a request with no destination.
    Malformed,
    /// Version 1 while it is not enabled.
    V1Refused,
    /// A key id this host does not have.
    UnknownKey,
    /// The MAC does not verify.
    BadMac,
    /// The timestamp is outside the window.
    Stale,
    /// A nonce already seen.
    Replayed,
    /// An answer sent to the detour (detours only send those).
    Unexpected,
}

impl Outcome {
    /// Every outcome (for metrics that start at zero).
    pub const ALL: [Outcome; 18] = [
        Outcome::Created,
        Outcome::Reused,
        Outcome::Released,
        Outcome::NotFound,
        Outcome::DeniedDestination,
        Outcome::DeniedClient,
        Outcome::OverQuota,
        Outcome::Full,
        Outcome::NoPort,
        Outcome::InstallFailed,
        Outcome::RateLimited,
        Outcome::Malformed,
        Outcome::V1Refused,
        Outcome::UnknownKey,
        Outcome::BadMac,
        Outcome::Stale,
        Outcome::Replayed,
        Outcome::Unexpected,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Reused => "reused",
            Outcome::Released => "released",
            Outcome::NotFound => "not_found",
            Outcome::DeniedDestination => "denied_destination",
            Outcome::DeniedClient => "denied_client",
            Outcome::OverQuota => "over_quota",
            Outcome::Full => "full",
            Outcome::NoPort => "no_port",
            Outcome::InstallFailed => "install_failed",
            Outcome::RateLimited => "rate_limited",
            Outcome::Malformed => "malformed",
            Outcome::V1Refused => "v1_refused",
            Outcome::UnknownKey => "unknown_key",
            Outcome::BadMac => "bad_mac",
            Outcome::Stale => "stale",
            Outcome::Replayed => "replayed",
            Outcome::Unexpected => "unexpected",
        }
    }

    fn status(self) -> Status {
        match self {
            Outcome::Created | Outcome::Reused | Outcome::Released => Status::Ok,
            Outcome::NotFound => Status::NotFound,
            Outcome::OverQuota => Status::QuotaExceeded,
            Outcome::NoPort => Status::NoPort,
            Outcome::Full | Outcome::InstallFailed => Status::Unavailable,
            _ => Status::Denied,
        }
    }
}

/// The result of one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    /// What happened.
    pub outcome: Outcome,
    /// The answer to send back to the source, if any.
    pub reply: Option<Vec<u8>>,
}

impl Handled {
    fn drop(outcome: Outcome) -> Self {
        Self {
            outcome,
            reply: None,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    mapping: Mapping,
    last_active: Instant,
    bytes: u64,
    packets: u64,
}

#[derive(Debug, Default)]
struct Client {
    by_dpt: HashMap<u16, Entry>,
    by_remote: HashMap<(Ipv4Addr, u16), u16>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// The most nonces remembered; beyond it new requests are refused until old ones age out (the rate
/// limits keep honest clients far below it).
pub const REPLAY_CAPACITY: usize = 1 << 20;

/// The detour host's state.
#[derive(Debug)]
pub struct Core {
    config: CoreConfig,
    clients: HashMap<Ipv4Addr, Client>,
    total: usize,
    buckets: HashMap<Ipv4Addr, Bucket>,
    /// (key id, nonce) → Unix ms after which the timestamp check alone rejects it.
    seen: HashMap<(u32, u64), u64>,
    port_cursor: u32,
    retired_bytes: u64,
    retired_packets: u64,
    expired: u64,
}

impl Core {
    /// A core with no mappings.
    pub fn new(config: CoreConfig) -> Self {
        Self {
            config,
            clients: HashMap::new(),
            total: 0,
            buckets: HashMap::new(),
            seen: HashMap::new(),
            port_cursor: 0,
            retired_bytes: 0,
            retired_packets: 0,
            expired: 0,
        }
    }

    /// The policy.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// How many mappings exist.
    pub fn mapping_count(&self) -> usize {
        self.total
    }

    /// How many clients hold a mapping.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Mappings removed for idleness so far.
    pub fn expired_count(&self) -> u64 {
        self.expired
    }

    /// Every mapping.
    pub fn mappings(&self) -> impl Iterator<Item = &Mapping> {
        self.clients
            .values()
            .flat_map(|c| c.by_dpt.values().map(|e| &e.mapping))
    }

    /// `(packets, bytes)` through all mappings, current and removed (from the counters last reported).
    pub fn traffic(&self) -> (u64, u64) {
        self.clients
            .values()
            .flat_map(|c| c.by_dpt.values())
            .fold((self.retired_packets, self.retired_bytes), |(p, b), e| {
                (p + e.packets, b + e.bytes)
            })
    }

    /// Handles one datagram from `from`. `now` drives rate limits and idleness, `wall_ms` (Unix time in
    /// milliseconds) the version 2 timestamp window.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        wall_ms: u64,
        from: SocketAddrV4,
        bytes: &[u8],
        host: &mut dyn Host,
    ) -> Handled {
        let client = *from.ip();
        let Ok(packet) = Packet::new_checked(bytes) else {
            return Handled::drop(Outcome::Malformed);
        };
        let Ok(repr) = Repr::parse(&packet) else {
            return Handled::drop(Outcome::Malformed);
        };
        match repr {
            Repr::V1(request) => self.handle_v1(now, client, request, host),
            Repr::V2(message) => {
                let Some(binding) = self
                    .config
                    .keys
                    .iter()
                    .find(|k| k.psk.id() == message.key_id)
                    .cloned()
                else {
                    return Handled::drop(Outcome::UnknownKey);
                };
                if !binding.psk.verify(&packet) {
                    return Handled::drop(Outcome::BadMac);
                }
                let skew = self.config.max_clock_skew.as_millis() as u64;
                if wall_ms.abs_diff(message.timestamp_ms) > skew {
                    return Handled::drop(Outcome::Stale);
                }
                if self.seen.contains_key(&(message.key_id, message.nonce)) {
                    return Handled::drop(Outcome::Replayed);
                }
                if message.op.is_answer() {
                    return Handled::drop(Outcome::Unexpected);
                }
                if !self.take_token(now, client) {
                    return Handled::drop(Outcome::RateLimited);
                }
                if self.seen.len() >= REPLAY_CAPACITY {
                    self.forget_nonces(wall_ms);
                    if self.seen.len() >= REPLAY_CAPACITY {
                        return Handled::drop(Outcome::RateLimited);
                    }
                }
                self.seen.insert(
                    (message.key_id, message.nonce),
                    message.timestamp_ms.saturating_add(skew),
                );
                let (outcome, dpt) = if !binding.clients.iter().any(|n| n.contains(&client)) {
                    (Outcome::DeniedClient, message.dpt)
                } else if message.op == Op::Release {
                    (self.release(client, &message, host), message.dpt)
                } else {
                    self.request(now, client, message.rip, message.rpt, message.dpt, host)
                };
                let answer = V2Repr {
                    op: if message.op == Op::Release {
                        Op::Released
                    } else {
                        Op::Response
                    },
                    status: outcome.status(),
                    key_id: binding.psk.id(),
                    nonce: message.nonce,
                    timestamp_ms: wall_ms,
                    rip: message.rip,
                    rpt: message.rpt,
                    dpt,
                    lifetime_s: self.config.idle_timeout.as_secs().min(u32::MAX as u64) as u32,
                };
                Handled {
                    outcome,
                    reply: Some(binding.psk.sign(&answer)),
                }
            }
        }
    }

    fn handle_v1(
        &mut self,
        now: Instant,
        client: Ipv4Addr,
        request: V1Repr,
        host: &mut dyn Host,
    ) -> Handled {
        if self.config.v1_clients.is_empty() {
            return Handled::drop(Outcome::V1Refused);
        }
        if !self.config.v1_clients.iter().any(|n| n.contains(&client)) {
            return Handled::drop(Outcome::DeniedClient);
        }
        if request.op != Op::Request {
            return Handled::drop(Outcome::Unexpected);
        }
        if !self.take_token(now, client) {
            return Handled::drop(Outcome::RateLimited);
        }
        let (outcome, dpt) = self.request(now, client, request.rip, request.rpt, request.dpt, host);
        let reply = matches!(outcome, Outcome::Created | Outcome::Reused).then(|| {
            Repr::V1(V1Repr {
                op: Op::Response,
                dpt,
                ..request
            })
            .to_bytes()
        });
        Handled { outcome, reply }
    }

    fn take_token(&mut self, now: Instant, client: Ipv4Addr) -> bool {
        let burst = f64::from(self.config.request_burst.max(1));
        let rate = self.config.request_rate;
        let bucket = self.buckets.entry(client).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn destination_denied(&self, rip: Ipv4Addr, rpt: u16) -> Option<Outcome> {
        if rpt == 0 || rip.is_unspecified() || rip.is_broadcast() || rip.is_multicast() {
            return Some(Outcome::Malformed);
        }
        self.config
            .deny_destinations
            .iter()
            .any(|net| net.contains(&rip))
            .then_some(Outcome::DeniedDestination)
    }

    /// A request for (client, proposed dpt) → (rip, rpt): the outcome and the detour port.
    fn request(
        &mut self,
        now: Instant,
        client: Ipv4Addr,
        rip: Ipv4Addr,
        rpt: u16,
        proposed: u16,
        host: &mut dyn Host,
    ) -> (Outcome, u16) {
        if let Some(denied) = self.destination_denied(rip, rpt) {
            return (denied, proposed);
        }
        // Rule 1 (thesis §4.1.2): the client's existing mapping to the same remote is reused.
        if let Some(entry) = self.clients.get_mut(&client).and_then(|c| {
            let dpt = *c.by_remote.get(&(rip, rpt))?;
            c.by_dpt.get_mut(&dpt)
        }) {
            entry.last_active = now;
            return (Outcome::Reused, entry.mapping.dpt);
        }
        let held = self.clients.get(&client).map_or(0, |c| c.by_dpt.len());
        if held >= self.config.mappings_per_client {
            return (Outcome::OverQuota, proposed);
        }
        if self.total >= self.config.max_mappings {
            return (Outcome::Full, proposed);
        }
        let Some(dpt) = self.choose_port(client, proposed, host) else {
            return (Outcome::NoPort, proposed);
        };
        let mapping = Mapping {
            client,
            dpt,
            rip,
            rpt,
        };
        if let Err(error) = host.install(&mapping) {
            tracing::warn!(?mapping, %error, "installing a mapping failed");
            return (Outcome::InstallFailed, proposed);
        }
        let entry = self.clients.entry(client).or_default();
        entry.by_remote.insert((rip, rpt), dpt);
        entry.by_dpt.insert(
            dpt,
            Entry {
                mapping,
                last_active: now,
                bytes: 0,
                packets: 0,
            },
        );
        self.total += 1;
        (Outcome::Created, dpt)
    }

    /// Rules 2 and 3 (thesis §4.1.2): not a port this client already maps elsewhere, not a port with a
    /// local listener. The proposal if it qualifies, else the next free port of `port_range`.
    fn choose_port(&mut self, client: Ipv4Addr, proposed: u16, host: &mut dyn Host) -> Option<u16> {
        let listeners = host.listening_ports();
        let taken = self.clients.get(&client).map(|c| &c.by_dpt);
        let free = |port: u16| {
            port != 0 && !listeners.contains(&port) && taken.is_none_or(|t| !t.contains_key(&port))
        };
        if free(proposed) {
            return Some(proposed);
        }
        let start = u32::from(*self.config.port_range.start());
        let len = u32::from(*self.config.port_range.end()) - start + 1;
        for step in 0..len {
            let offset = (self.port_cursor + step) % len;
            let port = (start + offset) as u16;
            if free(port) {
                self.port_cursor = (offset + 1) % len;
                return Some(port);
            }
        }
        None
    }

    fn release(&mut self, client: Ipv4Addr, message: &V2Repr, host: &mut dyn Host) -> Outcome {
        let held = self
            .clients
            .get(&client)
            .and_then(|c| c.by_dpt.get(&message.dpt))
            .map(|e| e.mapping);
        match held {
            Some(mapping) if mapping.rip == message.rip && mapping.rpt == message.rpt => {
                if let Err(error) = host.remove(&mapping) {
                    tracing::warn!(?mapping, %error, "removing a released mapping failed");
                }
                self.forget(&mapping);
                Outcome::Released
            }
            _ => Outcome::NotFound,
        }
    }

    fn forget(&mut self, mapping: &Mapping) {
        let Some(client) = self.clients.get_mut(&mapping.client) else {
            return;
        };
        if let Some(entry) = client.by_dpt.remove(&mapping.dpt) {
            self.retired_bytes += entry.bytes;
            self.retired_packets += entry.packets;
            self.total -= 1;
        }
        client.by_remote.remove(&(mapping.rip, mapping.rpt));
        if client.by_dpt.is_empty() {
            self.clients.remove(&mapping.client);
        }
    }

    /// Reports the per-mapping counters (`(client, dpt, packets, bytes)`): a mapping whose counter moved
    /// since the last report has seen traffic now.
    pub fn handle_counters(
        &mut self,
        now: Instant,
        counters: impl IntoIterator<Item = (Ipv4Addr, u16, u64, u64)>,
    ) {
        for (client, dpt, packets, bytes) in counters {
            if let Some(entry) = self
                .clients
                .get_mut(&client)
                .and_then(|c| c.by_dpt.get_mut(&dpt))
            {
                if bytes != entry.bytes || packets != entry.packets {
                    entry.last_active = now;
                }
                entry.bytes = bytes;
                entry.packets = packets;
            }
        }
    }

    /// Removes mappings idle for `idle_timeout`; returns how many. Also forgets nonces older than the
    /// timestamp window and rate-limit state of quiet clients.
    pub fn expire(&mut self, now: Instant, wall_ms: u64, host: &mut dyn Host) -> usize {
        let idle = self.config.idle_timeout;
        let stale: Vec<Mapping> = self
            .clients
            .values()
            .flat_map(|c| c.by_dpt.values())
            .filter(|e| now.saturating_duration_since(e.last_active) >= idle)
            .map(|e| e.mapping)
            .collect();
        for mapping in &stale {
            if let Err(error) = host.remove(mapping) {
                tracing::warn!(?mapping, %error, "removing an idle mapping failed");
            }
            self.forget(mapping);
        }
        self.expired += stale.len() as u64;
        self.forget_nonces(wall_ms);
        let burst = f64::from(self.config.request_burst.max(1));
        let rate = self.config.request_rate.max(f64::MIN_POSITIVE);
        self.buckets.retain(|_, b| {
            let refill = now.saturating_duration_since(b.last).as_secs_f64() * rate;
            b.tokens + refill < burst
        });
        stale.len()
    }

    fn forget_nonces(&mut self, wall_ms: u64) {
        self.seen.retain(|_, until| *until >= wall_ms);
    }

    /// Removes every mapping (shutdown).
    pub fn clear(&mut self, host: &mut dyn Host) {
        let all: Vec<Mapping> = self.mappings().copied().collect();
        for mapping in &all {
            let _ = host.remove(mapping);
            self.forget(mapping);
        }
    }
}
