//! `mptcp-detourd` configuration (TOML). `deploy/examples/mptcp-detourd.toml` documents every key;
//! the defaults here are the ones it shows.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::config::{duration, endpoints, optional_address, ConfigError, Validated};

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// UDP addresses for requests (IPv4; the port defaults to 45672, the thesis's).
    #[serde(default = "default_listen", deserialize_with = "endpoints")]
    pub listen: Vec<SocketAddr>,
    /// The nftables table (family `ip`) this daemon owns; a table of that name left by a crashed run is
    /// replaced at start.
    #[serde(default = "default_table")]
    pub table: String,
    /// Turn `net.ipv4.ip_forward` on while running (a detour forwards) and restore it on exit.
    #[serde(default = "yes")]
    pub manage_ip_forward: bool,
    /// How far a version 2 timestamp may be from this host's clock; also how long nonces are remembered.
    #[serde(default = "default_skew", deserialize_with = "duration")]
    pub max_clock_skew: Duration,
    /// Pre-shared keys for version 2.
    #[serde(default, rename = "key")]
    pub keys: Vec<KeyConfig>,
    /// The thesis's unauthenticated version 1.
    #[serde(default)]
    pub v1: V1Config,
    /// Quotas, rate limits, idleness, ports.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Which destinations may be mapped.
    #[serde(default)]
    pub acl: AclConfig,
    /// Prometheus.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// One pre-shared key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// The key file: one line of at least 32 hex digits.
    pub file: PathBuf,
    /// Sources that may use it: one client's addresses, or everyone for a collective key.
    #[serde(default = "everyone")]
    pub clients: Vec<Ipv4Net>,
    /// A name for logs (default: the file name).
    #[serde(default)]
    pub name: Option<String>,
}

/// Version 1 (no authentication; the thesis's §4.4 names its holes).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct V1Config {
    /// Sources allowed to use version 1. Empty (the default): version 1 is refused.
    #[serde(default)]
    pub clients: Vec<Ipv4Net>,
}

/// Limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Mappings one client may hold (a client needs one per server address and port it detours to).
    #[serde(default = "default_per_client")]
    pub mappings_per_client: usize,
    /// Mappings in all; each is one element of a hash map, so the packet path does not grow with it.
    #[serde(default = "default_max_mappings")]
    pub max_mappings: usize,
    /// Requests per second one client may send, sustained.
    #[serde(default = "default_rate")]
    pub requests_per_second: f64,
    /// Requests one client may send at once.
    #[serde(default = "default_burst")]
    pub request_burst: u32,
    /// A mapping with no traffic and no request for this long is removed (established subflows keep
    /// working: conntrack holds their translation).
    #[serde(default = "default_idle", deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Where detour ports come from when the proposed one cannot be used (`LOW-HIGH`).
    #[serde(default = "default_port_range")]
    pub port_range: String,
}

/// Destination ACL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// Networks never mapped.
    #[serde(default = "default_deny")]
    pub deny_destinations: Vec<Ipv4Net>,
    /// Also refuse this host's own networks (its interfaces' prefixes), so a detour never opens its
    /// local services or neighbours to its clients.
    #[serde(default = "yes")]
    pub deny_own_networks: bool,
}

/// Metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `/metrics`, `/healthz`, `/readyz` listener, or `"off"`.
    #[serde(
        default = "default_metrics_address",
        deserialize_with = "optional_address"
    )]
    pub address: Option<SocketAddr>,
    /// How often the per-mapping counters are read (bytes metrics and idleness).
    #[serde(default = "default_counter_interval", deserialize_with = "duration")]
    pub counter_interval: Duration,
}

fn yes() -> bool {
    true
}
fn default_listen() -> Vec<SocketAddr> {
    vec![SocketAddr::from(([0, 0, 0, 0], crate::wire::DEFAULT_PORT))]
}
fn default_table() -> String {
    "mptcp_detour".into()
}
fn default_skew() -> Duration {
    Duration::from_secs(30)
}
fn everyone() -> Vec<Ipv4Net> {
    vec![Ipv4Net::default()]
}
fn default_per_client() -> usize {
    64
}
fn default_max_mappings() -> usize {
    65536
}
fn default_rate() -> f64 {
    20.0
}
fn default_burst() -> u32 {
    40
}
fn default_idle() -> Duration {
    Duration::from_secs(600)
}
fn default_port_range() -> String {
    "20000-59999".into()
}
fn default_deny() -> Vec<Ipv4Net> {
    [
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
    ]
    .iter()
    .map(|n| n.parse().expect("literal network"))
    .collect()
}
fn default_metrics_address() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9466)))
}
fn default_counter_interval() -> Duration {
    Duration::from_secs(10)
}

crate::defaults_from_serde!(LimitsConfig, AclConfig, MetricsConfig, HostConfig);

/// Parses `LOW-HIGH`.
pub fn parse_port_range(text: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (low, high) = text
        .split_once('-')
        .ok_or_else(|| format!("{text:?} is not LOW-HIGH"))?;
    let parse = |s: &str| {
        s.trim()
            .parse::<u16>()
            .map_err(|_| format!("{s:?} is not a port"))
    };
    let (low, high) = (parse(low)?, parse(high)?);
    if low == 0 || low > high {
        return Err(format!("{text:?}: need 1 <= LOW <= HIGH"));
    }
    Ok(low..=high)
}

impl Validated for HostConfig {
    /// Checks values that parse but cannot work.
    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::invalid(origin, key, reason);
        if self.listen.is_empty() {
            return Err(invalid("listen", "at least one address".into()));
        }
        if let Some(v6) = self.listen.iter().find(|a| !a.is_ipv4()) {
            return Err(invalid(
                "listen",
                format!("{v6}: mappings are IPv4 (the thesis's message carries an IPv4 rip)"),
            ));
        }
        if self.table.is_empty() || self.table.len() > 255 || self.table.contains('\0') {
            return Err(invalid(
                "table",
                format!("{:?} is not a table name", self.table),
            ));
        }
        if self.keys.is_empty() && self.v1.clients.is_empty() {
            return Err(invalid(
                "key",
                "no key and version 1 is off: no request could be accepted (give --psk-file or [[key]])"
                    .into(),
            ));
        }
        for (i, key) in self.keys.iter().enumerate() {
            if key.clients.is_empty() {
                return Err(invalid(
                    &format!("key[{i}].clients"),
                    "empty: nobody could use the key".into(),
                ));
            }
        }
        if self.max_clock_skew.is_zero() {
            return Err(invalid("max_clock_skew", "must be more than 0".into()));
        }
        let limits = &self.limits;
        if limits.mappings_per_client == 0 || limits.max_mappings == 0 {
            return Err(invalid(
                "limits.mappings_per_client",
                "limits must be at least 1".into(),
            ));
        }
        if !(limits.requests_per_second > 0.0 && limits.requests_per_second.is_finite()) {
            return Err(invalid(
                "limits.requests_per_second",
                "must be a positive number".into(),
            ));
        }
        if limits.request_burst == 0 {
            return Err(invalid("limits.request_burst", "must be at least 1".into()));
        }
        if limits.idle_timeout < Duration::from_secs(1) {
            return Err(invalid("limits.idle_timeout", "at least 1s".into()));
        }
        parse_port_range(&limits.port_range).map_err(|e| invalid("limits.port_range", e))?;
        if self.metrics.counter_interval < Duration::from_millis(100) {
            return Err(invalid("metrics.counter_interval", "at least 100ms".into()));
        }
        Ok(())
    }
}
