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
    pub endpoints: Vec<SocketAddr>,
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
    /// Table IV and coordinated-routing pins.
    #[serde(default)]
    pub routing: RoutingTable,
    /// `/metrics`.
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Impairments for experiments; never set them in production.
    #[serde(default)]
    pub testing: TestingConfig,
}

fn auto() -> Option<NodeId> {
    None
}

fn node_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<NodeId>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text == "auto" {
        return Ok(None);
    }
    let bytes: Vec<u8> = text
        .split(':')
        .map(|part| u8::from_str_radix(part, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            serde::de::Error::custom(format!(
                "node_id {text:?}: expected \"auto\" or six hex bytes like 02:00:00:00:00:01"
            ))
        })?;
    let id: [u8; 6] = bytes
        .try_into()
        .map_err(|_| serde::de::Error::custom(format!("node_id {text:?}: expected six bytes")))?;
    Ok(Some(NodeId(id)))
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
    /// A held segment is released after this long; default 50 ms.
    #[serde(default = "ResequencerSection::default_timeout_ms")]
    pub timeout_ms: u64,
}

impl ResequencerSection {
    fn default_capacity() -> usize {
        100
    }
    fn default_timeout_ms() -> u64 {
        50
    }
}

impl Default for ResequencerSection {
    fn default() -> Self {
        ResequencerSection {
            capacity: Self::default_capacity(),
            timeout_ms: Self::default_timeout_ms(),
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

/// Test-only impairments (this kernel has no netem).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestingConfig {
    /// Per-interface delay and loss applied by the sender.
    #[serde(default)]
    pub impairment: Vec<Impairment>,
}

/// Delay and loss on datagrams sent from one interface.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Impairment {
    /// The interface.
    pub interface: String,
    /// Added one-way delay in milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
    /// Datagrams dropped, in percent.
    #[serde(default)]
    pub loss_percent: u8,
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

    /// Reads, parses and validates a file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml(&read(path)?, &path.display().to_string())
    }

    /// The UDP port paths bind: configured, else any.
    pub fn port(&self) -> u16 {
        self.common.paths.port.unwrap_or(0)
    }

    /// The sans-IO node's configuration for `node_id`.
    pub fn node_config(&self, node_id: NodeId) -> NodeConfig {
        self.common.node_config(
            node_id,
            Role::Client {
                proxy_endpoints: self.proxy.endpoints.clone(),
            },
        )
    }
}

impl ProxyEndConfig {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: ProxyEndConfig = parse(text, origin)?;
        config.common.validate(origin)?;
        if config.tunnel.pool.prefix_len() > 30 {
            return Err(invalid(
                origin,
                "tunnel.pool",
                "needs at least two host addresses (a /30 or larger)",
            ));
        }
        Ok(config)
    }

    /// Reads, parses and validates a file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::from_toml(&read(path)?, &path.display().to_string())
    }

    /// The UDP port paths bind: configured, else 4789.
    pub fn port(&self) -> u16 {
        self.common.paths.port.unwrap_or(4789)
    }

    /// The sans-IO node's configuration for `node_id`.
    pub fn node_config(&self, node_id: NodeId) -> NodeConfig {
        self.common.node_config(
            node_id,
            Role::Proxy {
                pool: self.tunnel.pool.trunc(),
            },
        )
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
        self.routing
            .validate()
            .map_err(|e| invalid(origin, "routing", &e.to_string()))?;
        for rule in &self.routing.rules {
            for (key, path) in rule
                .path
                .iter()
                .map(|p| ("routing.rule.path", p))
                .chain(rule.paths.iter().map(|p| ("routing.rule.paths", p)))
            {
                if !self.paths.interfaces.contains(path) {
                    return Err(invalid(
                        origin,
                        key,
                        &format!("{path:?} is not in paths.interfaces"),
                    ));
                }
            }
            if rule.path.is_some() && !rule.paths.is_empty() {
                return Err(invalid(
                    origin,
                    "routing.rule",
                    "give either path (a pin) or paths (selected-paths), not both",
                ));
            }
        }
        for impairment in &self.testing.impairment {
            if impairment.loss_percent > 100 {
                return Err(invalid(
                    origin,
                    "testing.impairment.loss_percent",
                    "above 100",
                ));
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
            ..PathConfig::default()
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
        };
        config.session_idle = Duration::from_secs(self.sessions.idle_s);
        config.routing = self.routing.clone();
        config.path_mtu = self.paths.mtu;
        config
    }
}
