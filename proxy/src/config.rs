//! The proxy's TOML configuration.
//!
//! Every default below equals the embedded `default.toml` (a unit test checks they agree), and each says
//! where it comes from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// The embedded default configuration: what `mptcp-proxy` runs with no arguments.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Errors loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown key or a bad value; the message names the key and line.
    #[error("{origin}: {detail}")]
    Parse {
        /// The file, or "embedded default".
        origin: String,
        /// toml's error on one line: line, column, key and reason ([`ConfigError::parse`]).
        detail: String,
    },
    /// A value parsed but makes no sense.
    #[error("{origin}: {key}: {reason}")]
    Invalid {
        /// The file, or "embedded default", or "command line".
        origin: String,
        /// The dotted key, e.g. `limits.max_connections`.
        key: String,
        /// Why it is rejected.
        reason: String,
    },
}

impl ConfigError {
    /// A TOML error in `text` (from `origin`), on one line with its line, column and dotted key: log
    /// lines and `systemctl status` show it whole, and the cause is not repeated under it.
    pub fn parse(text: &str, origin: &str, error: &toml::de::Error) -> Self {
        ConfigError::Parse {
            origin: origin.to_owned(),
            detail: mptcp_ops::report::toml_error(text, error),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners; default: one forward listener on 0.0.0.0:3128 (Squid's customary port).
    #[serde(default = "default_listeners", rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// How the proxy reaches legacy servers.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// Resource bounds.
    #[serde(default)]
    pub limits: Limits,
    /// Access control.
    #[serde(default)]
    pub acl: AclConfig,
    /// Optional Basic proxy authentication; off by default, as in Squid.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// The per-request access log.
    #[serde(default)]
    pub access_log: AccessLogConfig,
    /// How CONNECT and transparent tunnels move bytes.
    #[serde(default)]
    pub relay: RelayConfig,
    /// The admin listener: `/metrics`, `/healthz`, `/readyz`.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Subflow throttling by policy (issue 4); off unless the table or `--throttle` is given.
    #[serde(default)]
    pub throttle: Option<mptcp_throttle::ThrottleConfig>,
    /// The embedded sniffer; off unless interfaces are named.
    #[serde(default)]
    pub sniffer: crate::sniffer::SnifferConfig,
    /// The async runtime.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Cluster mode (several instances behind ECMP, issue 14); off unless the table or `--announce`
    /// is given.
    #[serde(default)]
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// The async runtime's shape.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads; default 0, one per CPU (tokio's default). 1 avoids cross-thread wakeups between
    /// a request's client and upstream tasks, which bench/README.md shows dominates small requests.
    #[serde(default)]
    pub worker_threads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listeners: default_listeners(),
            upstream: UpstreamConfig::default(),
            limits: Limits::default(),
            acl: AclConfig::default(),
            auth: None,
            access_log: AccessLogConfig::default(),
            relay: RelayConfig::default(),
            metrics: MetricsConfig::default(),
            throttle: None,
            sniffer: crate::sniffer::SnifferConfig::default(),
            runtime: RuntimeConfig::default(),
            cluster: None,
        }
    }
}

fn default_listeners() -> Vec<ListenerConfig> {
    vec![ListenerConfig {
        address: SocketAddr::from(([0, 0, 0, 0], 3128)),
        mode: ListenerMode::Forward,
        mptcp: true,
        tproxy: false,
    }]
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// An HTTP proxy: absolute-form requests and CONNECT.
    Forward,
    /// Connections redirected by nftables REDIRECT or TPROXY, relayed to their original destination
    /// without parsing HTTP.
    Transparent,
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address and port, IPv4 or IPv6.
    pub address: SocketAddr,
    /// What the listener speaks; default forward.
    #[serde(default = "ListenerConfig::default_mode")]
    pub mode: ListenerMode,
    /// Listen with IPPROTO_MPTCP (plain TCP clients are served too); default true, the point of the proxy.
    #[serde(default = "yes")]
    pub mptcp: bool,
    /// Set IP_TRANSPARENT so TPROXY can deliver foreign destinations; default false (REDIRECT needs none).
    #[serde(default)]
    pub tproxy: bool,
}

impl ListenerConfig {
    fn default_mode() -> ListenerMode {
        ListenerMode::Forward
    }

    /// A forward listener with the defaults, as `--listen` creates.
    pub fn forward(address: SocketAddr) -> Self {
        Self {
            address,
            mode: ListenerMode::Forward,
            mptcp: true,
            tproxy: false,
        }
    }
}

fn yes() -> bool {
    true
}

/// How the proxy connects to servers.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Try MPTCP towards servers (falling back to TCP); default false: servers are legacy (seed 002).
    #[serde(default)]
    pub mptcp: bool,
    /// Give up connecting after this long and answer 504; default 10 s (Squid's 1 min is too long for
    /// interactive clients behind a phone's radio).
    #[serde(
        default = "UpstreamConfig::default_connect_timeout",
        deserialize_with = "duration"
    )]
    pub connect_timeout: Duration,
}

impl UpstreamConfig {
    fn default_connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            mptcp: false,
            connect_timeout: Self::default_connect_timeout(),
        }
    }
}

/// Resource bounds against overload and slowloris.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Client connections at once; more get 503. Default 10000 (seed 002's proxy served a campus).
    #[serde(default = "Limits::default_max_connections")]
    pub max_connections: usize,
    /// Client connections from one address at once; default 256 (a NATed household behind one address).
    #[serde(default = "Limits::default_max_connections_per_client")]
    pub max_connections_per_client: usize,
    /// The largest request head accepted (431 beyond); default 64 KiB, Squid's request_header_max_size.
    #[serde(default = "Limits::default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Total time to receive a request head (slowloris); default 30 s.
    #[serde(
        default = "Limits::default_header_read_timeout",
        deserialize_with = "duration"
    )]
    pub header_read_timeout: Duration,
    /// Close a connection with no bytes either way for this long; default 5 min (Squid's read_timeout
    /// is 15 min; mobile NATs drop idle state after about 5).
    #[serde(
        default = "Limits::default_idle_timeout",
        deserialize_with = "duration"
    )]
    pub idle_timeout: Duration,
    /// On SIGTERM, how long in-flight transfers may finish; default 30 s (systemd's stop timeout is 90 s).
    #[serde(
        default = "Limits::default_drain_timeout",
        deserialize_with = "duration"
    )]
    pub drain_timeout: Duration,
    /// Per-client byte rate in each direction, enforced in user space with governor (the fallback where
    /// tc cannot be used), e.g. "20mbit"; default none.
    #[serde(default)]
    pub client_rate: Option<mptcp_throttle::Rate>,
    /// Bytes a client may send or receive at once under `client_rate`; default a tenth of a second at
    /// the rate, at least 64 KiB.
    #[serde(default)]
    pub client_burst: Option<mptcp_throttle::Size>,
}

impl Limits {
    fn default_max_connections() -> usize {
        10_000
    }
    fn default_max_connections_per_client() -> usize {
        256
    }
    fn default_max_header_bytes() -> usize {
        65_536
    }
    fn default_header_read_timeout() -> Duration {
        Duration::from_secs(30)
    }
    fn default_idle_timeout() -> Duration {
        Duration::from_secs(300)
    }
    fn default_drain_timeout() -> Duration {
        Duration::from_secs(30)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: Self::default_max_connections(),
            max_connections_per_client: Self::default_max_connections_per_client(),
            max_header_bytes: Self::default_max_header_bytes(),
            header_read_timeout: Self::default_header_read_timeout(),
            idle_timeout: Self::default_idle_timeout(),
            drain_timeout: Self::default_drain_timeout(),
            client_rate: None,
            client_burst: None,
        }
    }
}

/// Who may use the proxy, and where it may go.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclConfig {
    /// Client networks allowed; default loopback and the private ranges (RFC 1918, RFC 4193), so the
    /// proxy is never an open relay.
    #[serde(default = "AclConfig::default_allow_clients")]
    pub allow_clients: Vec<IpNet>,
    /// Destination networks denied; default the unspecified, loopback and link-local ranges (cloud
    /// metadata lives at 169.254.169.254). Private destinations stay allowed: an ISP serves internal hosts.
    #[serde(default = "AclConfig::default_deny_destinations")]
    pub deny_destinations: Vec<IpNet>,
    /// Also deny the addresses of the proxy host's own interfaces; default true (no relay loops).
    #[serde(default = "yes")]
    pub deny_own_addresses: bool,
    /// Ports CONNECT may reach; default empty, meaning any (the client ACL already bounds who may tunnel).
    #[serde(default)]
    pub connect_ports: Vec<u16>,
}

impl AclConfig {
    fn default_allow_clients() -> Vec<IpNet> {
        parse_nets(&[
            "127.0.0.0/8",
            "::1/128",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "fc00::/7",
        ])
    }
    fn default_deny_destinations() -> Vec<IpNet> {
        parse_nets(&[
            "0.0.0.0/8",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "::/128",
            "::1/128",
            "fe80::/10",
        ])
    }
}

fn parse_nets(nets: &[&str]) -> Vec<IpNet> {
    nets.iter()
        .map(|n| n.parse().expect("built-in network literal"))
        .collect()
}

impl Default for AclConfig {
    fn default() -> Self {
        Self {
            allow_clients: Self::default_allow_clients(),
            deny_destinations: Self::default_deny_destinations(),
            deny_own_addresses: true,
            connect_ports: Vec::new(),
        }
    }
}

/// Basic proxy authentication.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// A file of `user:password` lines (`#` starts a comment).
    pub credentials_file: PathBuf,
    /// The realm shown to clients; default "mptcp-proxy".
    #[serde(default = "AuthConfig::default_realm")]
    pub realm: String,
}

impl AuthConfig {
    fn default_realm() -> String {
        "mptcp-proxy".to_owned()
    }
}

/// Access-log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// Squid's native format, so Squid log tooling works.
    Squid,
    /// One JSON object a line, with the transport and the subflow count.
    Json,
}

/// Where and how requests are logged.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// A file path, `-` for stdout, or `off`; default `-` (stdout, for journald and containers).
    #[serde(default = "AccessLogConfig::default_path")]
    pub path: String,
    /// The line format; default squid.
    #[serde(default = "AccessLogConfig::default_format")]
    pub format: AccessLogFormat,
}

impl AccessLogConfig {
    fn default_path() -> String {
        "-".to_owned()
    }
    fn default_format() -> AccessLogFormat {
        AccessLogFormat::Squid
    }
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            path: Self::default_path(),
            format: Self::default_format(),
        }
    }
}

/// How a tunnel moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// read(2)/write(2) through a user-space buffer.
    Copy,
    /// splice(2) socket → pipe → socket, no copy through user space.
    Splice,
}

/// Tunnel relay settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// copy or splice; default copy, which measured faster into MPTCP sockets (bench/README.md).
    #[serde(default = "RelayConfig::default_mode")]
    pub mode: RelayMode,
    /// Buffer (copy) or pipe (splice) size per direction; default 256 KiB, enough for a 2 Gbit/s × 1 ms BDP.
    #[serde(default = "RelayConfig::default_buffer_bytes")]
    pub buffer_bytes: usize,
}

impl RelayConfig {
    fn default_mode() -> RelayMode {
        RelayMode::Copy
    }
    fn default_buffer_bytes() -> usize {
        256 * 1024
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            mode: Self::default_mode(),
            buffer_bytes: Self::default_buffer_bytes(),
        }
    }
}

/// The admin listener.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `ADDR:PORT`, or `off`; default 127.0.0.1:9464 (the Prometheus exporter port registry's
    /// OpenTelemetry/Prometheus slot), loopback so metrics are not public.
    #[serde(
        default = "MetricsConfig::default_address",
        deserialize_with = "optional_address"
    )]
    pub address: Option<SocketAddr>,
}

impl MetricsConfig {
    fn default_address() -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            address: Self::default_address(),
        }
    }
}

/// `ADDR:PORT` or `off`, as `--metrics` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddress(pub Option<SocketAddr>);

impl std::str::FromStr for OptionalAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        parse_optional_address(text).map(OptionalAddress)
    }
}

/// Parses `ADDR:PORT` or `off`.
pub fn parse_optional_address(text: &str) -> Result<Option<SocketAddr>, String> {
    if text == "off" {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|e| format!("{text:?}: {e} (expected ADDR:PORT or \"off\")"))
}

fn optional_address<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_optional_address(&text).map_err(serde::de::Error::custom)
}

/// Parses a duration such as `250ms`, `10s`, `5m` or `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (ms, s, m or h)"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let millis = match unit {
        "ms" => Some(number),
        "s" => number.checked_mul(1_000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{text:?} is too long"))
}

pub(crate) fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

impl Config {
    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|error| ConfigError::parse(text, origin, &error))?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Reads, parses and validates a file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The embedded default.
    pub fn embedded() -> Result<Self, ConfigError> {
        Self::from_toml(DEFAULT_TOML, "embedded default")
    }

    /// Checks what serde cannot: non-zero limits, a listener, no duplicate addresses.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: &str| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        if self.listeners.is_empty() {
            return Err(invalid("listener", "at least one listener is needed"));
        }
        for (i, listener) in self.listeners.iter().enumerate() {
            if self.listeners[..i]
                .iter()
                .any(|l| l.address == listener.address)
            {
                return Err(invalid(
                    &format!("listener[{i}].address"),
                    &format!("{} is listed twice", listener.address),
                ));
            }
            if listener.tproxy && listener.mode != ListenerMode::Transparent {
                return Err(invalid(
                    &format!("listener[{i}].tproxy"),
                    "tproxy needs mode = \"transparent\"",
                ));
            }
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_connections", l.max_connections),
            (
                "limits.max_connections_per_client",
                l.max_connections_per_client,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if l.max_header_bytes < 8192 {
            return Err(invalid(
                "limits.max_header_bytes",
                "must be at least 8192 (hyper's smallest read buffer)",
            ));
        }
        for (key, value) in [
            ("limits.header_read_timeout", l.header_read_timeout),
            ("limits.idle_timeout", l.idle_timeout),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than 0"));
            }
        }
        if !(4096..=64 * 1024 * 1024).contains(&self.relay.buffer_bytes) {
            return Err(invalid(
                "relay.buffer_bytes",
                "must be between 4096 and 67108864",
            ));
        }
        if let Some(rate) = self.limits.client_rate {
            mptcp_throttle::ClientRateLimiter::new(rate, self.limits.client_burst)
                .map_err(|error| invalid("limits.client_rate", &error.to_string()))?;
        }
        if let Some(admin) = self.metrics.address {
            if self.listeners.iter().any(|l| l.address == admin) {
                return Err(invalid(
                    "metrics.address",
                    &format!("{admin} is also a proxy listener"),
                ));
            }
        }
        if let Some(throttle) = &self.throttle {
            throttle
                .validate()
                .map_err(|error| invalid("throttle", &error.to_string()))?;
            if throttle.event_source == mptcp_throttle::EventSource::Sniffer
                && self.sniffer.interfaces.is_empty()
            {
                return Err(invalid(
                    "throttle.event_source",
                    "\"sniffer\" needs [sniffer] interfaces to capture on",
                ));
            }
        }
        if self.sniffer.multipath_threshold == 0 {
            return Err(invalid("sniffer.multipath_threshold", "must be at least 1"));
        }
        if let Some(cluster) = &self.cluster {
            cluster
                .validate(&self.listeners)
                .map_err(|(key, reason)| invalid(&key, &reason))?;
        }
        if self.access_log.path.is_empty() {
            return Err(invalid(
                "access_log.path",
                "empty; use \"-\" for stdout or \"off\"",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_equals_serde_defaults() {
        let embedded = Config::embedded().expect("embedded default parses");
        assert_eq!(embedded, Config::default());
        assert_eq!(
            embedded.listeners[0].address,
            "0.0.0.0:3128".parse().expect("literal")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }
}
