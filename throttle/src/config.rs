//! Operator policy: the `[throttle]` table of the proxy's TOML, its validation,
//! and the quick `--throttle IFACE=RATE[:CEIL]` command-line form.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use crate::rate::{Rate, Size};

/// Where subflow events come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    /// The kernel's `mptcp_pm` generic-netlink event group (see [`crate::pm_events`]).
    /// Default: the proxy terminates MPTCP in the kernel, which announces every
    /// subflow there.
    #[default]
    Kernel,
    /// Events are fed by the embedding program (for example adapted from the
    /// sniffer crate) through the event channel.
    Sniffer,
}

/// What to do when the process lacks `CAP_NET_ADMIN`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingPrivileges {
    /// Stop with [`crate::ThrottleError::MissingPrivileges`]. Default: an
    /// operator who configured throttling should learn that it is not applied.
    #[default]
    Fail,
    /// Log a warning and run the proxy without throttling.
    RunUnthrottled,
}

/// A traffic direction, seen from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    /// Proxy → client: egress of the client-facing interface.
    Download,
    /// Client → proxy: ingress of the interface, redirected to an IFB device.
    Upload,
}

/// Which directions a class shapes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassDirection {
    /// Proxy → client only. Default: the seed's mechanism shapes the outgoing
    /// queue of the interface (§2, §3.4).
    #[default]
    Download,
    /// Client → proxy only.
    Upload,
    /// Both directions, each with the same rate.
    Both,
}

impl ClassDirection {
    /// The directions this setting covers.
    pub fn directions(self) -> &'static [Direction] {
        match self {
            ClassDirection::Download => &[Direction::Download],
            ClassDirection::Upload => &[Direction::Upload],
            ClassDirection::Both => &[Direction::Download, Direction::Upload],
        }
    }
}

/// Who shares a class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassScope {
    /// One class for every subflow the rules put in it: all subscribers share its rate. Default: the
    /// seed's behaviour (§3.4 caps an interface).
    #[default]
    Shared,
    /// A template: each subscriber (client address, or client prefix) gets its own class with this
    /// rate, under a parent class named like the template. Created with the subscriber's first steered
    /// subflow, removed after its last.
    Client,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Download => "download",
            Direction::Upload => "upload",
        })
    }
}

/// Whether a subflow opened the MPTCP connection or joined it later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubflowRole {
    /// The subflow of the MP_CAPABLE handshake.
    Initial,
    /// A subflow added with MP_JOIN.
    Joined,
}

/// The `[throttle]` table of the proxy's configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleConfig {
    /// Master switch. Default `true`: a `[throttle]` table with classes and rules
    /// is meant to act; an empty policy installs nothing anyway.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Where subflow events come from. Default `kernel` (issue 4).
    #[serde(default)]
    pub event_source: EventSource,
    /// Behaviour without `CAP_NET_ADMIN`. Default `fail`.
    #[serde(default)]
    pub on_missing_privileges: MissingPrivileges,
    /// Name of the nftables table (family `inet`) owned by the proxy. Default
    /// `mptcp_proxy` (issue 4 names it).
    #[serde(default = "default_nft_table")]
    pub nft_table: String,
    /// Major number of every HTB qdisc handle installed (written as a number,
    /// shown by `tc` in hex). Default `0x4d50` ("MP"): unlikely to collide with
    /// hand-made qdiscs, and how a restart recognises stale qdiscs.
    #[serde(default = "default_qdisc_major")]
    pub qdisc_major: u16,
    /// Prefix of the IFB devices created for upload shaping; the device for
    /// interface index N is `<prefix>N`. Default `mpifb` (short enough for the
    /// 15-byte interface name limit).
    #[serde(default = "default_ifb_prefix")]
    pub ifb_prefix: String,
    /// Most subflows steered at once (nft map elements, BPF map entries). Beyond it a subflow is not
    /// steered, with a warning and a metric, until others close. Default 262144: 25 bytes of packet-path
    /// state each in the kernel at most (allocated as used), far above 10,000 connections' worth.
    #[serde(default = "default_max_steered_subflows")]
    pub max_steered_subflows: u32,
    /// How often the live subflows are read back from the kernel (sock_diag) and diffed, repairing what
    /// lost events left wrong (`event_source = "kernel"` only). Also done at start and when the event
    /// socket overflows. Default `60s`; `off` disables the periodic one.
    #[serde(default = "default_resync_interval", deserialize_with = "de_interval")]
    pub resync_interval: Option<Duration>,
    /// Where the root qdiscs found at start are saved (one file per network namespace and table), so
    /// that they are restored at exit, and by the next start after a crash. Default `/run/mptcp-proxy`
    /// (a tmpfs: after a reboot nothing is stale).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// `SCHED_RR` priority (1..=99) of the throttle's two control threads, the kernel event listener
    /// and the owner task (in the proxy); 0 = none, they run at nice -10 instead. Default 1, the lowest
    /// real-time priority: under a burst of connections on a loaded machine the nice threads waited up
    /// to 100 ms for a CPU (rule-install p99 17 to 100 ms at 10,000 subflows; 0.16 to 3.9 ms with
    /// `SCHED_RR` 1, bench (e')). Their work is bounded by the event rate (tens of microseconds per
    /// event), and the kernel's real-time throttling keeps 5% of each second for everything else.
    /// Needs `CAP_SYS_NICE`; without it the nice fallback is used (logged at debug level).
    #[serde(default = "default_realtime_priority")]
    pub realtime_priority: u8,
    /// Shaping classes.
    #[serde(default)]
    pub classes: Vec<ClassConfig>,
    /// Ordered rules; the first rule matching a subflow decides its actions.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

fn default_enabled() -> bool {
    true
}
fn default_nft_table() -> String {
    "mptcp_proxy".to_owned()
}
fn default_qdisc_major() -> u16 {
    0x4d50
}
fn default_ifb_prefix() -> String {
    "mpifb".to_owned()
}
fn default_min_subflows() -> u32 {
    2
}
fn default_max_steered_subflows() -> u32 {
    1 << 18
}
fn default_resync_interval() -> Option<Duration> {
    Some(Duration::from_secs(60))
}
fn default_realtime_priority() -> u8 {
    1
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/run/mptcp-proxy")
}
fn default_max_clients() -> u32 {
    4096
}
fn default_client_prefix4() -> u8 {
    32
}
fn default_client_prefix6() -> u8 {
    64
}

fn de_interval<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_interval(&text).map_err(serde::de::Error::custom)
}

/// Reads `500ms`, `30s`, `5m`, `1h`, or `off` / `0` (no periodic action).
pub fn parse_interval(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if text == "off" || text == "0" {
        return Ok(None);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 30s, 5m, off)"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(value),
        "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value.saturating_mul(60)),
        "h" => Duration::from_secs(value.saturating_mul(3600)),
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok((!duration.is_zero()).then_some(duration))
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            event_source: EventSource::default(),
            on_missing_privileges: MissingPrivileges::default(),
            nft_table: default_nft_table(),
            qdisc_major: default_qdisc_major(),
            ifb_prefix: default_ifb_prefix(),
            max_steered_subflows: default_max_steered_subflows(),
            resync_interval: default_resync_interval(),
            state_dir: default_state_dir(),
            realtime_priority: default_realtime_priority(),
            classes: Vec::new(),
            rules: Vec::new(),
        }
    }
}

/// One HTB class on one interface.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassConfig {
    /// Name rules refer to; unique in the policy.
    pub name: String,
    /// Client-facing interface the class shapes.
    pub interface: String,
    /// Guaranteed rate (`tc` units, e.g. `"20mbit"`).
    pub rate: Rate,
    /// Upper bound when borrowing. Default: equal to `rate`, a hard limit, as
    /// the seed's throttling caps the interface (§3.4).
    #[serde(default)]
    pub ceil: Option<Rate>,
    /// Bytes sent at line speed before the rate applies. Default: as `tc`
    /// computes it (`rate / HZ + mtu`, at least 1600 bytes).
    #[serde(default)]
    pub burst: Option<Size>,
    /// HTB priority, 0 (served first) to 7. Default 0, `tc`'s default.
    #[serde(default)]
    pub priority: u8,
    /// Which directions the class shapes. Default `download`.
    #[serde(default)]
    pub direction: ClassDirection,
    /// `shared` (default): one class for all; `client`: a class per subscriber with this rate.
    #[serde(default)]
    pub scope: ClassScope,
    /// With `scope = "client"`: most subscribers with a class at once (per direction). Beyond it a
    /// subscriber's subflows are not steered, with a warning and a metric, until a class frees. Default
    /// 4096 (about 4 KiB of kernel memory each).
    #[serde(default = "default_max_clients")]
    pub max_clients: u32,
    /// With `scope = "client"`: IPv4 clients in one prefix of this length are one subscriber. Default 32
    /// (an address).
    #[serde(default = "default_client_prefix4")]
    pub client_prefix4: u8,
    /// With `scope = "client"`: IPv6 clients in one prefix of this length are one subscriber. Default 64:
    /// a device's privacy addresses share its /64, so they share its class.
    #[serde(default = "default_client_prefix6")]
    pub client_prefix6: u8,
}

impl ClassConfig {
    /// A shared class with defaults for everything but name, interface and rate.
    pub fn new(name: &str, interface: &str, rate: Rate) -> Self {
        Self {
            name: name.to_owned(),
            interface: interface.to_owned(),
            rate,
            ceil: None,
            burst: None,
            priority: 0,
            direction: ClassDirection::default(),
            scope: ClassScope::default(),
            max_clients: default_max_clients(),
            client_prefix4: default_client_prefix4(),
            client_prefix6: default_client_prefix6(),
        }
    }
}

/// Matching criteria; every criterion given must hold (absent = any).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubflowMatch {
    /// Interface the subflow arrived on.
    #[serde(default)]
    pub interface: Option<String>,
    /// Client (remote) address range of the subflow; a bare address means /32
    /// or /128. Also accepted as `remote_addr`.
    #[serde(default, alias = "remote_addr", deserialize_with = "de_opt_net")]
    pub client: Option<IpNet>,
    /// Client (remote) port of the subflow.
    #[serde(default)]
    pub remote_port: Option<u16>,
    /// Proxy (local) address range of the subflow.
    #[serde(default, deserialize_with = "de_opt_net")]
    pub local_addr: Option<IpNet>,
    /// Proxy (local) port of the subflow.
    #[serde(default)]
    pub local_port: Option<u16>,
    /// Initial or joined subflow.
    #[serde(default)]
    pub role: Option<SubflowRole>,
    /// MPTCP address id of the proxy's address (`loc_id`).
    #[serde(default)]
    pub local_address_id: Option<u8>,
    /// MPTCP address id of the client's address (`rem_id`).
    #[serde(default)]
    pub remote_address_id: Option<u8>,
    /// Backup flag of the subflow.
    #[serde(default)]
    pub backup: Option<bool>,
    /// Host name of the proxied request (exact, case-insensitive; `*.example.com`
    /// matches subdomains).
    #[serde(default)]
    pub destination_host: Option<String>,
    /// Address range of the proxied request's server.
    #[serde(default, deserialize_with = "de_opt_net")]
    pub destination: Option<IpNet>,
    /// Port of the proxied request's server.
    #[serde(default)]
    pub destination_port: Option<u16>,
}

/// A policy rule: when it applies and what it does.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Optional name shown in logs and nftables rule comments.
    #[serde(default)]
    pub name: Option<String>,
    /// Which subflows the rule selects.
    #[serde(default, rename = "match")]
    pub matches: SubflowMatch,
    /// The rule applies once the connection has at least this many active
    /// subflows. Default 2: the seed throttles "as soon as an MPTCP connection
    /// is established consisting of at least two active TCP subflows" (§2).
    #[serde(default = "default_min_subflows")]
    pub min_subflows: u32,
    /// Class to put the subflow in.
    #[serde(default)]
    pub class: Option<String>,
    /// Firewall mark (`meta mark set`) for `ip rule fwmark` policy routing.
    #[serde(default)]
    pub fwmark: Option<u32>,
    /// Conntrack mark (`ct mark set`).
    #[serde(default)]
    pub ct_mark: Option<u32>,
    /// Ask the kernel path manager to mark the subflow backup (MP_PRIO).
    /// Default `false`: only on request, and only where the kernel supports it.
    #[serde(default)]
    pub set_backup: bool,
}

fn de_opt_net<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<IpNet>, D::Error> {
    let text: Option<String> = Option::deserialize(deserializer)?;
    text.map(|t| parse_net(&t).map_err(serde::de::Error::custom))
        .transpose()
}

/// Reads `10.0.0.0/8`, `2001:db8::/32` or a bare address (a host route).
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{text:?} is not an address or CIDR"))
}

/// Why a policy was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The TOML could not be read into [`ThrottleConfig`].
    #[error("throttle: {0}")]
    Syntax(String),
    /// An entry breaks a rule of the policy.
    #[error("{location}: {reason}")]
    Invalid {
        /// Path of the offending entry, e.g. `throttle.rules[2]`.
        location: String,
        /// What is wrong with it.
        reason: PolicyViolation,
    },
    /// A `--throttle` flag could not be read.
    #[error("--throttle {input:?}: {reason} (expected IFACE=RATE[:CEIL], e.g. eth1=20mbit)")]
    Flag {
        /// The flag's value.
        input: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// What is wrong with one policy entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyViolation {
    /// A rule names a class that is not defined.
    #[error("unknown class {0:?}")]
    UnknownClass(String),
    /// Two classes share a name.
    #[error("duplicate class name {0:?}")]
    DuplicateClass(String),
    /// A name is empty or has characters other than `[A-Za-z0-9_.-]`.
    #[error("invalid name {0:?} (use letters, digits, '_', '-', '.')")]
    InvalidName(String),
    /// An interface name is empty, too long or has `/`, `:` or spaces.
    #[error("invalid interface name {0:?}")]
    InvalidInterface(String),
    /// `ceil` is below `rate`.
    #[error("ceil {ceil} is below rate {rate}")]
    CeilBelowRate {
        /// The class rate.
        rate: Rate,
        /// The class ceil.
        ceil: Rate,
    },
    /// HTB priorities go from 0 to 7.
    #[error("priority {0} is out of range 0..=7")]
    PriorityOutOfRange(u8),
    /// A rule neither names a class, nor sets a mark, nor asks for backup.
    #[error("rule has no action (set class, fwmark, ct_mark or set_backup)")]
    NoAction,
    /// `min_subflows` must be at least 1.
    #[error("min_subflows must be at least 1")]
    MinSubflowsZero,
    /// A mark of 0 would not mark anything.
    #[error("{0} must not be 0")]
    ZeroMark(&'static str),
    /// More classes than distinct minor class ids.
    #[error("too many classes ({0}); at most {max}", max = MAX_CLASSES)]
    TooManyClasses(usize),
    /// Major 0 and 0xffff are reserved by the kernel (root/ingress).
    #[error("qdisc_major {0:#x} is reserved")]
    ReservedQdiscMajor(u16),
    /// `max_clients` is 0 or more than the class ids a qdisc has for subscribers.
    #[error("max_clients {0} is out of range 1..={max}", max = MAX_CLIENT_CLASSES)]
    MaxClientsOutOfRange(u32),
    /// A client prefix length is longer than the address.
    #[error("{key} {value} is longer than the address ({max} bits)")]
    ClientPrefixOutOfRange {
        /// `client_prefix4` or `client_prefix6`.
        key: &'static str,
        /// The value given.
        value: u8,
        /// The address length in bits.
        max: u8,
    },
    /// `max_steered_subflows` is 0.
    #[error("max_steered_subflows must be at least 1")]
    MaxSteeredSubflowsZero,
    /// `realtime_priority` is above the kernel's `SCHED_RR` range.
    #[error("realtime_priority {0} is out of range 0..=99 (0 = none)")]
    RealtimePriorityOutOfRange(u8),
    /// `state_dir` is not an absolute path.
    #[error("state_dir {0:?} must be an absolute path")]
    RelativeStateDir(PathBuf),
    /// The IFB prefix leaves no room for an interface index in 15 bytes.
    #[error("ifb_prefix {0:?} must be 1..=9 characters of [a-z0-9_-]")]
    InvalidIfbPrefix(String),
}

/// Classes get minor ids from [`FIRST_CLASS_MINOR`] up to below [`FIRST_CLIENT_MINOR`].
pub const MAX_CLASSES: usize = (FIRST_CLIENT_MINOR - FIRST_CLASS_MINOR) as usize;
/// Minor id of the first class (`<major>:10`, like `tc` examples).
pub const FIRST_CLASS_MINOR: u16 = 0x10;
/// Per-subscriber classes (`scope = "client"`) get minor ids from here to [`LAST_CLIENT_MINOR`], shared
/// by the templates on one interface and direction.
pub const FIRST_CLIENT_MINOR: u16 = 0x1000;
/// The last minor id for per-subscriber classes.
pub const LAST_CLIENT_MINOR: u16 = 0xfffe;
/// How many per-subscriber classes one qdisc can hold.
pub const MAX_CLIENT_CLASSES: u32 = (LAST_CLIENT_MINOR - FIRST_CLIENT_MINOR + 1) as u32;

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Linux interface names: 1..=15 bytes, no '/', ':' or whitespace.
pub fn valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
}

impl ThrottleConfig {
    /// Reads a `[throttle]` table given as TOML text (the table's contents, not
    /// the whole proxy file), then validates it.
    pub fn from_toml_str(text: &str) -> Result<Self, PolicyError> {
        let config: ThrottleConfig =
            toml::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every entry; the first problem found is returned with its path.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let invalid = |location: String, reason| Err(PolicyError::Invalid { location, reason });
        if self.qdisc_major == 0 || self.qdisc_major == 0xffff {
            return invalid(
                "throttle.qdisc_major".into(),
                PolicyViolation::ReservedQdiscMajor(self.qdisc_major),
            );
        }
        if !valid_name(&self.nft_table) {
            return invalid(
                "throttle.nft_table".into(),
                PolicyViolation::InvalidName(self.nft_table.clone()),
            );
        }
        if self.ifb_prefix.is_empty()
            || self.ifb_prefix.len() > 9
            || !self
                .ifb_prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        {
            return invalid(
                "throttle.ifb_prefix".into(),
                PolicyViolation::InvalidIfbPrefix(self.ifb_prefix.clone()),
            );
        }
        if self.max_steered_subflows == 0 {
            return invalid(
                "throttle.max_steered_subflows".into(),
                PolicyViolation::MaxSteeredSubflowsZero,
            );
        }
        if self.realtime_priority > 99 {
            return invalid(
                "throttle.realtime_priority".into(),
                PolicyViolation::RealtimePriorityOutOfRange(self.realtime_priority),
            );
        }
        if !self.state_dir.is_absolute() {
            return invalid(
                "throttle.state_dir".into(),
                PolicyViolation::RelativeStateDir(self.state_dir.clone()),
            );
        }
        if self.classes.len() > MAX_CLASSES {
            return invalid(
                "throttle.classes".into(),
                PolicyViolation::TooManyClasses(self.classes.len()),
            );
        }
        let mut names = BTreeSet::new();
        for (i, class) in self.classes.iter().enumerate() {
            let location = format!("throttle.classes[{i}]");
            if !valid_name(&class.name) {
                return invalid(location, PolicyViolation::InvalidName(class.name.clone()));
            }
            if !names.insert(class.name.as_str()) {
                return invalid(
                    location,
                    PolicyViolation::DuplicateClass(class.name.clone()),
                );
            }
            if !valid_interface_name(&class.interface) {
                return invalid(
                    location,
                    PolicyViolation::InvalidInterface(class.interface.clone()),
                );
            }
            if let Some(ceil) = class.ceil {
                if ceil < class.rate {
                    return invalid(
                        location,
                        PolicyViolation::CeilBelowRate {
                            rate: class.rate,
                            ceil,
                        },
                    );
                }
            }
            if class.priority > 7 {
                return invalid(
                    location,
                    PolicyViolation::PriorityOutOfRange(class.priority),
                );
            }
            if class.max_clients == 0 || class.max_clients > MAX_CLIENT_CLASSES {
                return invalid(
                    location,
                    PolicyViolation::MaxClientsOutOfRange(class.max_clients),
                );
            }
            for (key, value, max) in [
                ("client_prefix4", class.client_prefix4, 32),
                ("client_prefix6", class.client_prefix6, 128),
            ] {
                if value > max {
                    return invalid(
                        location,
                        PolicyViolation::ClientPrefixOutOfRange { key, value, max },
                    );
                }
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let location = format!("throttle.rules[{i}]");
            if let Some(name) = &rule.name {
                if !valid_name(name) {
                    return invalid(location, PolicyViolation::InvalidName(name.clone()));
                }
            }
            if let Some(class) = &rule.class {
                if !names.contains(class.as_str()) {
                    return invalid(location, PolicyViolation::UnknownClass(class.clone()));
                }
            }
            if let Some(iface) = &rule.matches.interface {
                if !valid_interface_name(iface) {
                    return invalid(
                        format!("{location}.match"),
                        PolicyViolation::InvalidInterface(iface.clone()),
                    );
                }
            }
            if rule.class.is_none()
                && rule.fwmark.is_none()
                && rule.ct_mark.is_none()
                && !rule.set_backup
            {
                return invalid(location, PolicyViolation::NoAction);
            }
            if rule.min_subflows == 0 {
                return invalid(location, PolicyViolation::MinSubflowsZero);
            }
            if rule.fwmark == Some(0) {
                return invalid(location, PolicyViolation::ZeroMark("fwmark"));
            }
            if rule.ct_mark == Some(0) {
                return invalid(location, PolicyViolation::ZeroMark("ct_mark"));
            }
        }
        Ok(())
    }

    /// Whether a running throttle can move from this policy to `new` by diffing classes and rules, or
    /// must be stopped (removing what it installed) and started again: `Some(key)` names the first key
    /// that needs the restart. Where state lives (table, qdisc major, IFB prefix), where events come
    /// from, and whether anything is active at all are fixed for a run.
    pub fn needs_restart(&self, new: &ThrottleConfig) -> Option<&'static str> {
        let active =
            |c: &ThrottleConfig| c.enabled && !(c.classes.is_empty() && c.rules.is_empty());
        if active(self) != active(new) {
            return Some("enabled");
        }
        if !active(self) {
            return None;
        }
        if self.nft_table != new.nft_table {
            Some("nft_table")
        } else if self.qdisc_major != new.qdisc_major {
            Some("qdisc_major")
        } else if self.ifb_prefix != new.ifb_prefix {
            Some("ifb_prefix")
        } else if self.event_source != new.event_source {
            Some("event_source")
        } else if self.on_missing_privileges != new.on_missing_privileges {
            Some("on_missing_privileges")
        } else if self.max_steered_subflows != new.max_steered_subflows {
            // Sizes the upload classifier's BPF map, made once.
            Some("max_steered_subflows")
        } else if self.resync_interval != new.resync_interval {
            Some("resync_interval")
        } else if self.state_dir != new.state_dir {
            Some("state_dir")
        } else if self.realtime_priority != new.realtime_priority {
            // The threads' scheduling is set when they start.
            Some("realtime_priority")
        } else {
            None
        }
    }

    /// Adds the classes and rules of quick `--throttle` flags, then validates.
    pub fn add_quick_throttles(&mut self, flags: &[QuickThrottle]) -> Result<(), PolicyError> {
        for flag in flags {
            let name = format!("cli-{}", flag.interface);
            self.classes.push(ClassConfig {
                ceil: flag.ceil,
                ..ClassConfig::new(&name, &flag.interface, flag.rate)
            });
            self.rules.push(RuleConfig {
                name: Some(name.clone()),
                matches: SubflowMatch {
                    interface: Some(flag.interface.clone()),
                    ..SubflowMatch::default()
                },
                min_subflows: default_min_subflows(),
                class: Some(name),
                fwmark: None,
                ct_mark: None,
                set_backup: false,
            });
        }
        self.validate()
    }
}

/// One `--throttle IFACE=RATE[:CEIL]` flag: every subflow arriving on
/// `interface` goes into a class of `rate` once its connection has ≥ 2
/// subflows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuickThrottle {
    /// Client-facing interface.
    pub interface: String,
    /// Class rate.
    pub rate: Rate,
    /// Class ceil; `None` means equal to the rate.
    pub ceil: Option<Rate>,
}

impl FromStr for QuickThrottle {
    type Err = PolicyError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| PolicyError::Flag {
            input: input.to_owned(),
            reason,
        };
        let (interface, rates) = input
            .split_once('=')
            .ok_or_else(|| fail("missing '='".into()))?;
        if !valid_interface_name(interface) {
            return Err(fail(format!("invalid interface name {interface:?}")));
        }
        let (rate, ceil) = match rates.split_once(':') {
            Some((rate, ceil)) => (rate, Some(ceil)),
            None => (rates, None),
        };
        let rate: Rate = rate.parse().map_err(|e| fail(format!("rate: {e}")))?;
        let ceil: Option<Rate> = ceil
            .map(|c| c.parse().map_err(|e| fail(format!("ceil: {e}"))))
            .transpose()?;
        if let Some(c) = ceil {
            if c < rate {
                return Err(fail(format!("ceil {c} is below rate {rate}")));
            }
        }
        Ok(Self {
            interface: interface.to_owned(),
            rate,
            ceil,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_flag_parses() {
        let q: QuickThrottle = "eth1=20mbit".parse().unwrap();
        assert_eq!(q.interface, "eth1");
        assert_eq!(q.rate.bits_per_second(), 20_000_000);
        assert_eq!(q.ceil, None);
        let q: QuickThrottle = "wlan0=1mbit:5mbit".parse().unwrap();
        assert_eq!(q.ceil.unwrap().bits_per_second(), 5_000_000);
    }

    #[test]
    fn quick_flag_rejects_garbage() {
        for bad in [
            "eth1",
            "=20mbit",
            "eth1=fast",
            "eth1=20mbit:1mbit",
            "a/b=1mbit",
        ] {
            let err = bad.parse::<QuickThrottle>().unwrap_err();
            assert!(matches!(err, PolicyError::Flag { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn quick_flags_become_class_and_rule() {
        let mut config = ThrottleConfig::default();
        let flags = [
            "eth1=20mbit".parse().unwrap(),
            "eth2=5mbit:10mbit".parse().unwrap(),
        ];
        config.add_quick_throttles(&flags).unwrap();
        assert_eq!(config.classes.len(), 2);
        assert_eq!(config.rules.len(), 2);
        assert_eq!(config.rules[1].class.as_deref(), Some("cli-eth2"));
        assert_eq!(config.rules[1].matches.interface.as_deref(), Some("eth2"));
        assert_eq!(config.rules[1].min_subflows, 2);
    }

    #[test]
    fn unknown_class_names_the_rule() {
        let text = r#"
            [[classes]]
            name = "wifi"
            interface = "eth1"
            rate = "20mbit"
            [[rules]]
            class = "wifi"
            [[rules]]
            class = "wifi"
            [[rules]]
            class = "lte"
        "#;
        let err = ThrottleConfig::from_toml_str(text).unwrap_err();
        assert_eq!(err.to_string(), r#"throttle.rules[2]: unknown class "lte""#);
    }

    #[test]
    fn bare_address_is_a_host_net() {
        assert_eq!(parse_net("10.1.2.3").unwrap().prefix_len(), 32);
        assert_eq!(parse_net("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert!(parse_net("nope").is_err());
    }
}
