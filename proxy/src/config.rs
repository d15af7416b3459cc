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
    /// RFC 8803 converters (listeners with `mode = "convert"`).
    #[serde(default)]
    pub convert: ConvertConfig,
    /// Cluster mode (several instances behind ECMP, issue 14); off unless the table or `--announce`
    /// is given.
    #[serde(default)]
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// Settings of the RFC 8803 converter listeners.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvertConfig {
    /// Require the Cookie TLV (RFC 8803 §4.7): a client first gets Missing Cookie with its cookie, then
    /// retries with it, proving it receives at its address; default false (the client ACL already
    /// bounds who may convert).
    #[serde(default)]
    pub require_cookie: bool,
    /// A file of at least 16 random bytes keying the cookies, so converters sharing it accept each
    /// other's cookies and restarts keep them valid; default none: a random key per process.
    #[serde(default)]
    pub cookie_secret_file: Option<PathBuf>,
    /// Pending TCP Fast Open connections per listener (`TCP_FASTOPEN` queue length); default 4096, the
    /// accept backlog's order of magnitude.
    #[serde(default = "ConvertConfig::default_fastopen_queue")]
    pub fastopen_queue: u32,
}

impl ConvertConfig {
    fn default_fastopen_queue() -> u32 {
        4096
    }
}

impl Default for ConvertConfig {
    fn default() -> Self {
        Self {
            require_cookie: false,
            cookie_secret_file: None,
            fastopen_queue: Self::default_fastopen_queue(),
        }
    }
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
            convert: ConvertConfig::default(),
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
    /// An RFC 8803 Transport Converter: the client names the server in a Convert message in its SYN
    /// (TCP Fast Open); relayed like a CONNECT tunnel. Port 5124 is the IANA-assigned one.
    Convert,
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

    /// A converter listener with the defaults, as `--convert` creates.
    pub fn convert(address: SocketAddr) -> Self {
        Self {
            address,
            mode: ListenerMode::Convert,
            mptcp: true,
            tproxy: false,
        }
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
    /// Happy Eyeballs (RFC 8305): start connecting to the next address when the last attempt has not
    /// connected after this long; default 250 ms, the RFC's recommended Connection Attempt Delay.
    #[serde(
        default = "UpstreamConfig::default_attempt_delay",
        deserialize_with = "duration"
    )]
    pub attempt_delay: Duration,
    /// Give up one address after this long (the others keep trying within `connect_timeout`);
    /// default 5 s: a black-holed address (often IPv6) must not use up the whole connect timeout.
    #[serde(
        default = "UpstreamConfig::default_attempt_timeout",
        deserialize_with = "duration"
    )]
    pub attempt_timeout: Duration,
    /// Answer 504 when the server sent no response head this long after the request (and its body)
    /// went out; default 2 min: longer than common long-poll intervals (30-90 s), shorter than the idle
    /// timeout.
    #[serde(
        default = "UpstreamConfig::default_response_timeout",
        deserialize_with = "duration"
    )]
    pub response_timeout: Duration,
    /// `Expect: 100-continue`: the client's body is held back until the server answers 100 Continue,
    /// or sends a final answer (then the body is never asked for), or this long passed (a server that
    /// ignores the expectation); default 1 s, curl's own wait.
    #[serde(
        default = "UpstreamConfig::default_expect_continue_timeout",
        deserialize_with = "duration"
    )]
    pub expect_continue_timeout: Duration,
    /// Host names cached by the resolver (hickory, honouring each record's TTL); default 4096.
    #[serde(default = "UpstreamConfig::default_dns_cache_entries")]
    pub dns_cache_entries: usize,
}

impl UpstreamConfig {
    fn default_connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
    fn default_attempt_delay() -> Duration {
        Duration::from_millis(250)
    }
    fn default_attempt_timeout() -> Duration {
        Duration::from_secs(5)
    }
    fn default_response_timeout() -> Duration {
        Duration::from_secs(120)
    }
    fn default_expect_continue_timeout() -> Duration {
        Duration::from_secs(1)
    }
    fn default_dns_cache_entries() -> usize {
        4096
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            mptcp: false,
            connect_timeout: Self::default_connect_timeout(),
            attempt_delay: Self::default_attempt_delay(),
            attempt_timeout: Self::default_attempt_timeout(),
            response_timeout: Self::default_response_timeout(),
            expect_continue_timeout: Self::default_expect_continue_timeout(),
            dns_cache_entries: Self::default_dns_cache_entries(),
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
    /// IPv6 clients are counted per prefix of this length for `max_connections_per_client`; default
    /// 64, since one subscriber holds a /64 (RFC 6177) and may use any address in it.
    #[serde(default = "Limits::default_client_ipv6_prefix")]
    pub client_ipv6_prefix: u8,
    /// Refused connections (403 outside the client ACL, 503 over a limit) answered at once; each is
    /// held up to 2 s to deliver its answer. Beyond this many, refused connections are closed at once
    /// and counted (`mptcp_proxy_refusals_dropped_total`), so a flood cannot grow tasks and fds;
    /// default 256.
    #[serde(default = "Limits::default_max_refusals")]
    pub max_refusals: usize,
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
    fn default_client_ipv6_prefix() -> u8 {
        64
    }
    fn default_max_refusals() -> usize {
        256
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
            client_ipv6_prefix: Self::default_client_ipv6_prefix(),
            max_refusals: Self::default_max_refusals(),
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
    /// Ports CONNECT may reach, numbers or `"first-last"` ranges; default 443 only, as Squid's
    /// `SSL_ports` (RFC 9110 §9.3.6: a proxy should restrict CONNECT ports; an ISP's proxy must not
    /// relay SMTP). An empty list refuses every CONNECT.
    #[serde(default = "AclConfig::default_connect_ports")]
    pub connect_ports: Vec<PortRange>,
    /// Ports absolute-form requests may reach; default Squid's `Safe_ports` (80, 21, 443, 70, 210,
    /// 1025-65535, 280, 488, 591, 777), which keeps plain-text protocols on low ports out of reach.
    #[serde(default = "AclConfig::default_safe_ports")]
    pub safe_ports: Vec<PortRange>,
    /// Ports an RFC 8803 converter may connect to; default every port but 25. A converter carries
    /// all of a subscriber's TCP (as in 5G ATSSS), so it cannot keep to web ports, but an ISP's
    /// appliance must not relay SMTP from its own address. An empty list refuses every Connect TLV.
    #[serde(default = "AclConfig::default_convert_ports")]
    pub convert_ports: Vec<PortRange>,
}

/// A port or an inclusive range of ports: `443` or `"1025-65535"` in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// The first port.
    pub first: u16,
    /// The last port (equal to `first` for one port).
    pub last: u16,
}

impl PortRange {
    /// One port.
    pub const fn one(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("{text:?}: ports are 1-65535"))
        };
        let range = match text.split_once('-') {
            Some((first, last)) => Self {
                first: port(first)?,
                last: port(last)?,
            },
            None => Self::one(port(text)?),
        };
        if range.first > range.last {
            return Err(format!("{text:?}: the range ends before it starts"));
        }
        Ok(range)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => u16::try_from(n)
                .ok()
                .filter(|p| *p != 0)
                .map(PortRange::one)
                .ok_or_else(|| serde::de::Error::custom(format!("{n}: ports are 1-65535"))),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
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
    fn default_connect_ports() -> Vec<PortRange> {
        vec![PortRange::one(443)]
    }
    fn default_safe_ports() -> Vec<PortRange> {
        [80, 21, 443, 70, 210, 1025, 280, 488, 591, 777]
            .into_iter()
            .map(|p| match p {
                1025 => PortRange {
                    first: 1025,
                    last: 65535,
                },
                p => PortRange::one(p),
            })
            .collect()
    }
    fn default_convert_ports() -> Vec<PortRange> {
        vec![
            PortRange { first: 1, last: 24 },
            PortRange {
                first: 26,
                last: 65535,
            },
        ]
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
            connect_ports: Self::default_connect_ports(),
            safe_ports: Self::default_safe_ports(),
            convert_ports: Self::default_convert_ports(),
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
    /// Lines waiting for the writer thread; when it falls behind (a slow disk, a blocked stdout) more
    /// lines are dropped and counted (`mptcp_proxy_access_log_dropped_total`), never blocking a
    /// request; default 8192 (about 2 MB).
    #[serde(default = "AccessLogConfig::default_queue_lines")]
    pub queue_lines: usize,
}

impl AccessLogConfig {
    fn default_path() -> String {
        "-".to_owned()
    }
    fn default_format() -> AccessLogFormat {
        AccessLogFormat::Squid
    }
    fn default_queue_lines() -> usize {
        8192
    }
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            path: Self::default_path(),
            format: Self::default_format(),
            queue_lines: Self::default_queue_lines(),
        }
    }
}

/// How a tunnel, or a `Content-Length` response body over 128 KiB, moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// read(2)/write(2) through a user-space buffer.
    Copy,
    /// splice(2) socket → pipe → socket, no copy through user space.
    Splice,
    /// splice(2) for each direction whose pipe the kernel grants at the full `buffer_bytes`, copy for the
    /// others: pipes count against `fs.pipe-user-pages-soft` (64 MiB per user by default), and past it an
    /// unprivileged service gets pipes of a page or two, too small to splice well.
    Auto,
}

/// Relay settings: tunnels, and the large bodies of forwarded responses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// copy, splice or auto; default auto. Splice is faster per tunnel (bench/README.md (a): CONNECT 1.27x
    /// the rate at 0.55x the CPU per GB), but every spliced direction holds a pipe, and pipes count against
    /// `fs.pipe-user-pages-soft` (16384 pages, 64 MiB per user): past that, an unprivileged service (the
    /// packaged unit) gets pipes of a page or two (pipe(7)), about 128 busy tunnels at 256 KiB each. Auto
    /// splices while full-size pipes are granted and copies after.
    #[serde(default = "RelayConfig::default_mode")]
    pub mode: RelayMode,
    /// Buffer (copy) or pipe (splice) size per direction; default 256 KiB, enough for a 2 Gbit/s × 1 ms BDP.
    #[serde(default = "RelayConfig::default_buffer_bytes")]
    pub buffer_bytes: usize,
}

impl RelayConfig {
    fn default_mode() -> RelayMode {
        RelayMode::Auto
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
            ("upstream.attempt_delay", self.upstream.attempt_delay),
            ("upstream.attempt_timeout", self.upstream.attempt_timeout),
            ("upstream.response_timeout", self.upstream.response_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than 0"));
            }
        }
        if !(1..=128).contains(&l.client_ipv6_prefix) {
            return Err(invalid(
                "limits.client_ipv6_prefix",
                "must be between 1 and 128",
            ));
        }
        if self.access_log.queue_lines == 0 {
            return Err(invalid("access_log.queue_lines", "must be at least 1"));
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
        if self.convert.fastopen_queue == 0 {
            return Err(invalid("convert.fastopen_queue", "must be at least 1"));
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

    #[test]
    fn convert_listeners_and_section() {
        let config = Config::from_toml(
            "[[listener]]\naddress = \"0.0.0.0:5124\"\nmode = \"convert\"\n\
             [convert]\nrequire_cookie = true\nfastopen_queue = 64\n",
            "test",
        )
        .expect("valid");
        assert_eq!(config.listeners[0].mode, ListenerMode::Convert);
        assert!(config.convert.require_cookie);
        assert_eq!(config.convert.fastopen_queue, 64);
        let error =
            Config::from_toml("[convert]\nfastopen_queue = 0\n", "test").expect_err("zero queue");
        assert!(
            error.to_string().contains("convert.fastopen_queue"),
            "{error}"
        );
        let error =
            Config::from_toml("[convert]\ncookies = true\n", "test").expect_err("unknown key");
        assert!(error.to_string().contains("cookies"), "{error}");
    }
}
