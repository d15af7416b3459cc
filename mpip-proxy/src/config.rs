//! Configuration files of `mpipd` (the client end) and `mpip-proxy` (the
//! proxy end). TOML, unknown keys rejected. Commented examples:
//! `deploy/examples/mpipd.toml` and `deploy/examples/mpip-proxy.toml`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Deserializer};

use crate::node::{NodeConfig, Role};
use crate::path_manager::PathConfig;
use crate::resequencer::ResequencerConfig;
use crate::routing::RoutingTable;
use crate::scheduler::SchedulerConfig;
use crate::table::availability::HandshakeConfig;
use crate::wire::NodeId;

/// A configuration that cannot be used: the same error as `mptcp-proxy`'s
/// configuration (read, parse, invalid value).
pub use mptcp_proxy::config::ConfigError;

/// `mpipd`'s configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// This node's identity and interfaces.
    #[serde(flatten)]
    pub common: CommonConfig,
    /// The proxy end to handshake with.
    pub proxy: ProxyEndpoints,
    /// Networks reached through the tunnel; default none. The proxy end's
    /// tunnel network is always reached through it (it is on-link). With the
    /// proxy end's gateway on, other prefixes (e.g. a server network, or
    /// `0.0.0.0/0`) make every application use MPIP.
    #[serde(default)]
    pub routes: Vec<IpNet>,
}

/// The proxy end's encapsulation endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyEndpoints {
    /// UDP endpoints the handshake is sent to; the other addresses of the
    /// proxy end are learned from its address list (`PROTOCOL.md` §4.1).
    /// Only these may assign the tunnel address.
    pub endpoints: Vec<SocketAddr>,
    /// The proxy end's node ID; default: whatever node first answers the
    /// handshake, kept from then on. Datagrams of other nodes are dropped.
    #[serde(default, deserialize_with = "optional_node_id")]
    pub node_id: Option<NodeId>,
}

fn optional_node_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NodeId>, D::Error> {
    let text = String::deserialize(d)?;
    parse_node_id(&text).map(Some).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "node_id {text:?}: expected six hex bytes like 02:00:00:00:00:01"
        ))
    })
}

/// `mpip-proxy`'s configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyEndConfig {
    /// This node's identity and interfaces.
    #[serde(flatten)]
    pub common: CommonConfig,
    /// The tunnel network clients are given addresses from.
    #[serde(default)]
    pub tunnel: TunnelConfig,
    /// The HTTP proxy served on the tunnel address.
    #[serde(default)]
    pub http: HttpConfig,
    /// Forward clients' other traffic with nftables masquerade.
    #[serde(default)]
    pub gateway: GatewayConfig,
    /// Handshake rate limits.
    #[serde(default)]
    pub handshake: HandshakeSection,
    /// Threads.
    #[serde(default)]
    pub runtime: RuntimeSection,
}

/// `[runtime]` of the proxy end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSection {
    /// Shards: threads that split the clients by node ID, each with its own
    /// socket per path interface (one `SO_REUSEPORT` group per interface,
    /// steered by node ID) and its own TUN queue (steered by tunnel
    /// address). Default: one per CPU, at most 8.
    #[serde(default)]
    pub shards: Option<usize>,
}

impl RuntimeSection {
    /// The shard count in force.
    pub fn shards(&self) -> usize {
        self.shards.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(8)
        })
    }
}

/// Settings both ends share.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommonConfig {
    /// Node ID: `"auto"` (default: the MAC address of the first non-loopback
    /// NIC, as the paper suggests) or `"02:00:00:00:00:01"`.
    #[serde(default = "auto", deserialize_with = "node_id")]
    pub node_id: Option<NodeId>,
    /// The TUN device.
    #[serde(default)]
    pub tun: TunConfig,
    /// The interfaces MPIP paths use, and the timers of the path manager.
    pub paths: PathsConfig,
    /// Algorithm 1.
    #[serde(default)]
    pub scheduler: SchedulerSection,
    /// TCP re-sequencing.
    #[serde(default)]
    pub resequencer: ResequencerSection,
    /// Session Information Table expiry.
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// Table IV and coordinated-routing pins, with named profiles.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// `/metrics`.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Authentication (`PROTOCOL.md` §11).
    #[serde(default)]
    pub auth: AuthSection,
}

/// `[auth]`: shared keys and what they cover.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// A key file (`[[key]]` entries: id, secret of 32 or more bytes in hex,
    /// optionally the one client node it is for; readable by its owner
    /// only). With keys, every control datagram carries an HMAC tag and a
    /// counter checked against a replay window, and untagged ones are
    /// dropped. Default: none, nothing is authenticated (the paper's MPIP:
    /// trust the path networks). SIGHUP re-reads it (key rotation).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Tag data packets too: every packet pays 25 bytes (the MSS shrinks
    /// accordingly) and an HMAC-SHA-256 over it; a receiver with this on
    /// drops untagged data. Default false: data is authenticated by the path
    /// it arrives on (an attacker who can spoof a path's source address can
    /// inject or replay data, never control it).
    #[serde(default)]
    pub data: bool,
    /// The keys read from `key_file` (by `from_file`).
    #[serde(skip)]
    pub keys: Option<crate::auth::KeyRing>,
}

/// `[handshake]` of the proxy end: how many handshakes (and datagrams of
/// unknown nodes) one source address, and all together, may send.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandshakeSection {
    /// Per source address, per second; default 5.
    #[serde(default = "HandshakeSection::default_rate")]
    pub rate_per_source: f64,
    /// Burst per source address; default 10.
    #[serde(default = "HandshakeSection::default_burst")]
    pub burst_per_source: f64,
    /// All sources together, per second; default 5000.
    #[serde(default = "HandshakeSection::default_total")]
    pub rate_total: f64,
}

impl HandshakeSection {
    fn default_rate() -> f64 {
        5.0
    }
    fn default_burst() -> f64 {
        10.0
    }
    fn default_total() -> f64 {
        5000.0
    }
}

impl Default for HandshakeSection {
    fn default() -> Self {
        HandshakeSection {
            rate_per_source: Self::default_rate(),
            burst_per_source: Self::default_burst(),
            rate_total: Self::default_total(),
        }
    }
}

fn auto() -> Option<NodeId> {
    None
}

fn node_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<NodeId>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text == "auto" {
        return Ok(None);
    }
    parse_node_id(&text).map(Some).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "node_id {text:?}: expected \"auto\" or six hex bytes like 02:00:00:00:00:01"
        ))
    })
}

/// A node ID written as six hex bytes, `02:00:00:00:00:01`.
pub fn parse_node_id(text: &str) -> Option<NodeId> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|part| {
            (part.len() == 2)
                .then(|| u8::from_str_radix(part, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    Some(NodeId(bytes.try_into().ok()?))
}

/// The TUN device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunConfig {
    /// Name; `%d` is replaced by the kernel; default `mpip%d`.
    #[serde(default = "TunConfig::default_name")]
    pub name: String,
}

impl TunConfig {
    fn default_name() -> String {
        "mpip%d".to_owned()
    }
}

impl Default for TunConfig {
    fn default() -> Self {
        TunConfig {
            name: Self::default_name(),
        }
    }
}

/// Interfaces and path-manager timers (defaults: `PROTOCOL.md` §6).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathsConfig {
    /// Interface names; each gets a UDP socket bound to it (`SO_BINDTODEVICE`)
    /// on each of its addresses.
    pub interfaces: Vec<String>,
    /// UDP port of the encapsulation; default 0 (any) for the client and 4789
    /// for the proxy end (the VXLAN port: UDP encapsulation, commonly allowed).
    #[serde(default)]
    pub port: Option<u16>,
    /// MTU of the paths; default 1500 (Ethernet). The TUN MTU and the TCP MSS
    /// clamp follow from it.
    #[serde(default = "PathsConfig::default_mtu")]
    pub mtu: u16,
    /// Probe interval on discovering and dead paths; default 200 ms.
    #[serde(default = "PathsConfig::default_probe_ms")]
    pub probe_interval_ms: u64,
    /// Heartbeat after this long without sending on a path; default 100 ms.
    #[serde(default = "PathsConfig::default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    /// A path silent this long is dead; default 400 ms.
    #[serde(default = "PathsConfig::default_dead_ms")]
    pub dead_after_ms: u64,
    /// Interface scan period (up/down, address changes); default 100 ms.
    #[serde(default = "PathsConfig::default_scan_ms")]
    pub scan_interval_ms: u64,
    /// While no data flows, the client sends one keepalive per path per this
    /// interval (the proxy end answers it), enough for NAT bindings; default
    /// 15 s. Heartbeats and the 400 ms death detection run only while data
    /// flows (`PROTOCOL.md` §6.2).
    #[serde(default = "PathsConfig::default_keepalive_s")]
    pub keepalive_interval_s: u64,
}

impl PathsConfig {
    fn default_mtu() -> u16 {
        1500
    }
    fn default_probe_ms() -> u64 {
        200
    }
    fn default_heartbeat_ms() -> u64 {
        100
    }
    fn default_dead_ms() -> u64 {
        400
    }
    fn default_scan_ms() -> u64 {
        100
    }
    fn default_keepalive_s() -> u64 {
        15
    }
}

/// Algorithm 1 (defaults: `PROTOCOL.md` §8.1).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerSection {
    /// Period T; default 100 ms.
    #[serde(default = "SchedulerSection::default_period_ms")]
    pub period_ms: u64,
    /// Step S; default 10.
    #[serde(default = "SchedulerSection::default_step")]
    pub step: u16,
    /// Equation 1's draws: `"low-discrepancy"` (default; a Weyl sequence, so
    /// every run of packets is split by weight, which measured 2 points more
    /// aggregate on the Fig. 4a testbed) or `"random"` (independent draws).
    #[serde(default)]
    pub dispatch: crate::scheduler::Dispatch,
}

impl SchedulerSection {
    fn default_period_ms() -> u64 {
        100
    }
    fn default_step() -> u16 {
        10
    }
}

impl Default for SchedulerSection {
    fn default() -> Self {
        SchedulerSection {
            period_ms: Self::default_period_ms(),
            step: Self::default_step(),
            dispatch: crate::scheduler::Dispatch::default(),
        }
    }
}

/// TCP re-sequencing (defaults: the paper's 100 packets, §IV-B; our 50 ms).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResequencerSection {
    /// Segments held at most; default 100.
    #[serde(default = "ResequencerSection::default_capacity")]
    pub capacity: usize,
    /// A held segment is released after this long when the paths' delays
    /// are alike; default 50 ms. The node adds the spread of the peer's
    /// paths' one-way delays (a segment from the fast path waits for the
    /// slow one's), up to `max_timeout_ms`.
    #[serde(default = "ResequencerSection::default_timeout_ms")]
    pub timeout_ms: u64,
    /// The longest a held segment waits, however different the paths;
    /// default 1000 ms.
    #[serde(default = "ResequencerSection::default_max_timeout_ms")]
    pub max_timeout_ms: u64,
}

impl ResequencerSection {
    fn default_capacity() -> usize {
        100
    }
    fn default_timeout_ms() -> u64 {
        50
    }
    fn default_max_timeout_ms() -> u64 {
        1000
    }
}

impl Default for ResequencerSection {
    fn default() -> Self {
        ResequencerSection {
            capacity: Self::default_capacity(),
            timeout_ms: Self::default_timeout_ms(),
            max_timeout_ms: Self::default_max_timeout_ms(),
        }
    }
}

/// Session expiry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsConfig {
    /// Idle sessions are forgotten after this long; default 120 s (the
    /// Linux conntrack UDP stream timeout).
    #[serde(default = "SessionsConfig::default_idle_s")]
    pub idle_s: u64,
}

impl SessionsConfig {
    fn default_idle_s() -> u64 {
        120
    }
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            idle_s: Self::default_idle_s(),
        }
    }
}

/// The metrics listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// `ADDR:PORT` or `"off"`; default 127.0.0.1:9465 (one above
    /// mptcp-proxy's 9464, so both run on one host), loopback only.
    #[serde(
        default = "MetricsSection::default_address",
        deserialize_with = "optional_address"
    )]
    pub address: Option<SocketAddr>,
}

impl MetricsSection {
    fn default_address() -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], 9465)))
    }
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            address: Self::default_address(),
        }
    }
}

fn optional_address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    mptcp_proxy::config::parse_optional_address(&text).map_err(serde::de::Error::custom)
}

/// `[routing]`: Table IV (`default` and `[[routing.rule]]`), which is the
/// profile `"default"`, and any number of named alternatives
/// (`[routing.profile.NAME]`, each with its own `default` and
/// `[[routing.profile.NAME.rule]]`). `active` names the profile in force at
/// start; the admin endpoint switches profiles while running, SIGHUP re-reads
/// them all (`PROTOCOL.md` §8.4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Priority of packets no rule matches.
    #[serde(default)]
    pub default: crate::routing::Priority,
    /// The rules of the profile `"default"`.
    #[serde(default, rename = "rule")]
    pub rules: Vec<crate::routing::RoutingRule>,
    /// Named profiles.
    #[serde(default, rename = "profile")]
    pub profiles: std::collections::BTreeMap<String, RoutingTable>,
    /// The profile in force at start; default `"default"`.
    #[serde(default)]
    pub active: Option<String>,
}

/// The name of the profile made of `[routing]`'s own `default` and rules.
pub const DEFAULT_PROFILE: &str = "default";

impl RoutingConfig {
    /// The table of profile `name`.
    pub fn profile(&self, name: &str) -> Option<RoutingTable> {
        if name == DEFAULT_PROFILE {
            return Some(RoutingTable {
                default: self.default,
                rules: self.rules.clone(),
            });
        }
        self.profiles.get(name).cloned()
    }

    /// The name of the profile in force at start.
    pub fn active_name(&self) -> &str {
        self.active.as_deref().unwrap_or(DEFAULT_PROFILE)
    }

    /// Every profile name, `"default"` first.
    pub fn names(&self) -> Vec<String> {
        std::iter::once(DEFAULT_PROFILE.to_owned())
            .chain(self.profiles.keys().cloned())
            .collect()
    }
}

/// The proxy end's tunnel network.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// Pool of tunnel addresses; the first host is the proxy end's. Default
    /// 10.200.0.0/16: private (RFC 1918), so the HTTP proxy's default ACL
    /// admits its clients, and room for 65,533 clients.
    #[serde(default = "TunnelConfig::default_pool")]
    pub pool: Ipv4Net,
}

impl TunnelConfig {
    fn default_pool() -> Ipv4Net {
        Ipv4Net::new(std::net::Ipv4Addr::new(10, 200, 0, 0), 16).expect("valid prefix")
    }
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            pool: Self::default_pool(),
        }
    }
}

/// The HTTP proxy on the tunnel address: the same core as `mptcp-proxy`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Port on the tunnel address; default 3128 (Squid's); 0 turns it off.
    #[serde(default = "HttpConfig::default_port")]
    pub port: u16,
    /// An `mptcp-proxy` configuration file for ACLs, limits, access log and
    /// upstream settings; its listeners and admin listener are replaced by
    /// the tunnel listener and this file's `[metrics]`. Default: mptcp-proxy's
    /// embedded default.
    #[serde(default)]
    pub config: Option<PathBuf>,
}

impl HttpConfig {
    fn default_port() -> u16 {
        3128
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            port: Self::default_port(),
            config: None,
        }
    }
}

/// Gateway mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Forward clients' traffic that is not for the HTTP proxy, masqueraded
    /// behind the proxy end's addresses; default off (never an open relay).
    #[serde(default)]
    pub enabled: bool,
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|error| ConfigError::parse(text, origin, &error))
}

impl ClientConfig {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: ClientConfig = parse(text, origin)?;
        config.common.validate(origin)?;
        if config.proxy.endpoints.is_empty() {
            return Err(invalid(
                origin,
                "proxy.endpoints",
                "name at least one endpoint",
            ));
        }
        if let Some(endpoint) = config.proxy.endpoints.iter().find(|e| e.port() == 0) {
            return Err(invalid(
                origin,
                "proxy.endpoints",
                &format!("{endpoint} has port 0"),
            ));
        }
        Ok(config)
    }

    /// Reads, parses and validates a file, and reads its key file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let mut config = Self::from_toml(&read(path)?, &path.display().to_string())?;
        config.common.load_keys(&path.display().to_string())?;
        Ok(config)
    }

    /// The UDP port paths bind: configured, else any.
    pub fn port(&self) -> u16 {
        self.common.paths.port.unwrap_or(0)
    }

    /// The sans-IO node's configuration for `node_id`.
    pub fn node_config(&self, node_id: NodeId) -> NodeConfig {
        let mut config = self.common.node_config(
            node_id,
            Role::Client {
                proxy_endpoints: self.proxy.endpoints.clone(),
            },
        );
        config.proxy_node = self.proxy.node_id;
        config
    }
}

impl ProxyEndConfig {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: ProxyEndConfig = parse(text, origin)?;
        config.common.validate(origin)?;
        if config
            .runtime
            .shards
            .is_some_and(|n| !(1..=64).contains(&n))
        {
            return Err(invalid(origin, "runtime.shards", "must be in 1..=64"));
        }
        let limits = [
            (
                "handshake.rate_per_source",
                config.handshake.rate_per_source,
            ),
            (
                "handshake.burst_per_source",
                config.handshake.burst_per_source,
            ),
            ("handshake.rate_total", config.handshake.rate_total),
        ];
        if let Some((key, _)) = limits.iter().find(|(_, v)| !(v.is_finite() && *v >= 1.0)) {
            return Err(invalid(origin, key, "must be a number of at least 1"));
        }
        if config.tunnel.pool.prefix_len() > 30 {
            return Err(invalid(
                origin,
                "tunnel.pool",
                "needs at least two host addresses (a /30 or larger)",
            ));
        }
        Ok(config)
    }

    /// Reads, parses and validates a file, and reads its key file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let mut config = Self::from_toml(&read(path)?, &path.display().to_string())?;
        config.common.load_keys(&path.display().to_string())?;
        Ok(config)
    }

    /// The UDP port paths bind: configured, else 4789.
    pub fn port(&self) -> u16 {
        self.common.paths.port.unwrap_or(4789)
    }

    /// The sans-IO node's configuration for `node_id`.
    pub fn node_config(&self, node_id: NodeId) -> NodeConfig {
        let mut config = self.common.node_config(
            node_id,
            Role::Proxy {
                pool: self.tunnel.pool.trunc(),
            },
        );
        config.handshake_limit = crate::auth::RateLimit {
            per_source: self.handshake.rate_per_source,
            burst: self.handshake.burst_per_source,
            total: self.handshake.rate_total,
        };
        config
    }
}

fn invalid(origin: &str, key: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        origin: origin.to_owned(),
        key: key.to_owned(),
        reason: reason.to_owned(),
    }
}

impl CommonConfig {
    /// Reads `[auth] key_file` into `auth.keys`; `origin` names the
    /// configuration in errors.
    pub fn load_keys(&mut self, origin: &str) -> Result<(), ConfigError> {
        self.auth.keys = match &self.auth.key_file {
            Some(path) => Some(
                crate::auth::KeyRing::from_file(path)
                    .map_err(|e| invalid(origin, "auth.key_file", &e.to_string()))?,
            ),
            None => None,
        };
        Ok(())
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        if self.paths.interfaces.is_empty() {
            return Err(invalid(
                origin,
                "paths.interfaces",
                "name at least one interface",
            ));
        }
        let mut names = self.paths.interfaces.clone();
        names.sort();
        names.dedup();
        if names.len() != self.paths.interfaces.len() {
            return Err(invalid(
                origin,
                "paths.interfaces",
                "an interface is listed twice",
            ));
        }
        if self.paths.mtu < 576 {
            return Err(invalid(
                origin,
                "paths.mtu",
                "below the IPv4 minimum of 576",
            ));
        }
        let timers = [
            ("paths.probe_interval_ms", self.paths.probe_interval_ms),
            (
                "paths.heartbeat_interval_ms",
                self.paths.heartbeat_interval_ms,
            ),
            ("paths.dead_after_ms", self.paths.dead_after_ms),
            ("paths.scan_interval_ms", self.paths.scan_interval_ms),
            (
                "paths.keepalive_interval_s",
                self.paths.keepalive_interval_s,
            ),
            ("scheduler.period_ms", self.scheduler.period_ms),
            ("resequencer.timeout_ms", self.resequencer.timeout_ms),
            ("sessions.idle_s", self.sessions.idle_s),
        ];
        if let Some((key, _)) = timers.iter().find(|(_, v)| *v == 0) {
            return Err(invalid(origin, key, "must be above 0"));
        }
        if self.paths.dead_after_ms <= self.paths.heartbeat_interval_ms {
            return Err(invalid(
                origin,
                "paths.dead_after_ms",
                "must exceed heartbeat_interval_ms, or idle paths die",
            ));
        }
        if !(1..=1000).contains(&self.scheduler.step) {
            return Err(invalid(origin, "scheduler.step", "must be in 1..=1000"));
        }
        if self.resequencer.capacity == 0 {
            return Err(invalid(origin, "resequencer.capacity", "must be above 0"));
        }
        if self.resequencer.max_timeout_ms < self.resequencer.timeout_ms {
            return Err(invalid(
                origin,
                "resequencer.max_timeout_ms",
                "must be at least timeout_ms",
            ));
        }
        if self.routing.profiles.contains_key(DEFAULT_PROFILE) {
            return Err(invalid(
                origin,
                "routing.profile.default",
                "\"default\" is [routing]'s own table; name the profile otherwise",
            ));
        }
        let active = self.routing.active_name();
        if self.routing.profile(active).is_none() {
            return Err(invalid(
                origin,
                "routing.active",
                &format!(
                    "no profile {active:?} (profiles: {})",
                    self.routing.names().join(", ")
                ),
            ));
        }
        for name in self.routing.names() {
            let table = self.routing.profile(&name).unwrap_or_default();
            let prefix = if name == DEFAULT_PROFILE {
                "routing".to_owned()
            } else {
                format!("routing.profile.{name}")
            };
            table
                .validate()
                .map_err(|e| invalid(origin, &prefix, &e.to_string()))?;
            for rule in &table.rules {
                for (key, path) in rule
                    .path
                    .iter()
                    .map(|p| ("rule.path", p))
                    .chain(rule.paths.iter().map(|p| ("rule.paths", p)))
                {
                    if !self.paths.interfaces.contains(path) {
                        return Err(invalid(
                            origin,
                            &format!("{prefix}.{key}"),
                            &format!("{path:?} is not in paths.interfaces"),
                        ));
                    }
                }
                if rule.path.is_some() && !rule.paths.is_empty() {
                    return Err(invalid(
                        origin,
                        &format!("{prefix}.rule"),
                        "give either path (a pin) or paths (selected-paths), not both",
                    ));
                }
            }
        }
        Ok(())
    }

    fn node_config(&self, node_id: NodeId, role: Role) -> NodeConfig {
        let ms = Duration::from_millis;
        let mut config = NodeConfig::new(node_id, role);
        config.paths = PathConfig {
            probe_interval: ms(self.paths.probe_interval_ms),
            heartbeat_interval: ms(self.paths.heartbeat_interval_ms),
            dead_after: ms(self.paths.dead_after_ms),
            keepalive_interval: Duration::from_secs(self.paths.keepalive_interval_s),
            ..config.paths
        };
        config.handshake = HandshakeConfig {
            probe_interval: ms(self.paths.probe_interval_ms),
            ..HandshakeConfig::default()
        };
        config.scheduler = SchedulerConfig {
            period: ms(self.scheduler.period_ms),
            step: self.scheduler.step,
        };
        config.resequencer = ResequencerConfig {
            capacity: self.resequencer.capacity,
            timeout: ms(self.resequencer.timeout_ms),
            max_timeout: ms(self.resequencer.max_timeout_ms),
        };
        config.session_idle = Duration::from_secs(self.sessions.idle_s);
        config.routing = self
            .routing
            .profile(self.routing.active_name())
            .unwrap_or_default();
        config.path_mtu = self.paths.mtu;
        config.auth.keys = self.auth.keys.clone();
        config.auth.data = self.auth.data;
        config
    }
}
