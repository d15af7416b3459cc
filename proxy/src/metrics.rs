//! Prometheus metrics (OpenMetrics text through `prometheus-client`) and the per-path byte accounting.
//!
//! Cardinality is bounded: labels are transports, outcomes, directions, status codes, error kinds and
//! interface names, never a connection or a client address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::sockets::SubflowSample;

/// Labels: transport and outcome of a client connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// `mptcp`, `fallback_tcp` or `tcp`.
    pub transport: &'static str,
    /// `accepted`, `denied` (client ACL) or `over_limit`.
    pub outcome: &'static str,
}

/// Label: a transport.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// `mptcp`, `fallback_tcp` or `tcp`.
    pub transport: &'static str,
}

/// Label: a client-facing interface (a path).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InterfaceLabel {
    /// The interface name, or `unknown`.
    pub interface: String,
}

/// Labels: a path and a direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    /// The interface name, or `unknown`.
    pub interface: String,
    /// `download` (proxy → client) or `upload`.
    pub direction: &'static str,
}

/// Label: a direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `download` (towards the client) or `upload`.
    pub direction: &'static str,
}

/// Label: an HTTP status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The three-digit code.
    pub code: u16,
}

/// Labels: a throttle class on an interface, in one direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// The policy's class name.
    pub class: String,
    /// The client-facing interface the class shapes.
    pub interface: String,
    /// `download` (the interface's egress) or `upload` (its ingress, through an IFB device).
    pub direction: &'static str,
}

/// Label: a throttle class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    /// The policy's class name.
    pub class: String,
}

/// Label: an MPTCP option subtype.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubtypeLabel {
    /// `mp_capable`, `mp_join`, `dss`, ...
    pub subtype: &'static str,
}

/// Label: a sniffer anomaly kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnomalyLabel {
    /// `unknown_token`, `key_change`, `duplicate_address_id`, `hmac_mismatch`, `malformed_option`.
    pub kind: &'static str,
}

/// Label: where a joined subflow arrived (cluster mode).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ArrivalLabel {
    /// `announced` (the instance's own address), `service` (the shared address) or `other`.
    pub address: &'static str,
}

/// The sniffer's anomaly kinds.
pub const ANOMALY_KINDS: [&str; 5] = [
    "unknown_token",
    "key_change",
    "duplicate_address_id",
    "hmac_mismatch",
    "malformed_option",
];

/// Label: an upstream error kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `resolve`, `refused`, `unreachable`, `timeout`, `denied` or `protocol`.
    pub kind: &'static str,
}

/// The `kind` values of `mptcp_proxy_upstream_errors_total`.
pub const UPSTREAM_ERROR_KINDS: [&str; 6] = [
    "resolve",
    "refused",
    "unreachable",
    "timeout",
    "denied",
    "protocol",
];

/// Latency buckets from 100 µs to about 52 s.
fn latency_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 20,
    ))
}

/// A function that refreshes statistics read from the kernel at scrape time.
pub struct StatsSource(Box<dyn FnMut(&Metrics) + Send>);

impl std::fmt::Debug for StatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatsSource")
    }
}

/// Every metric the proxy exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Client connections by transport and outcome.
    pub connections: Family<ConnectionLabels, Counter>,
    /// Client connections open now, by transport.
    pub connections_active: Family<TransportLabel, Gauge>,
    /// The most subflows each MPTCP connection had at once (observed at close).
    pub connection_subflows: Histogram,
    /// Subflows that joined an MPTCP connection (MP_JOIN), by client-facing interface.
    pub subflows_joined: Family<InterfaceLabel, Counter>,
    /// Joined subflows that closed, by client-facing interface.
    pub subflows_closed: Family<InterfaceLabel, Counter>,
    /// Subflows open now (initial ones included), by client-facing interface.
    pub subflows_active: Family<InterfaceLabel, Gauge>,
    /// Bytes carried on client paths per subflow (`tcp_info`), by interface and direction.
    pub path_bytes: Family<PathLabels, Counter>,
    /// Bytes the proxy relayed to and from clients, by direction.
    pub relayed_bytes: Family<DirectionLabel, Counter>,
    /// `relayed_bytes{direction="upload"}`, held to avoid a map lookup per read.
    pub relayed_upload: Counter,
    /// `relayed_bytes{direction="download"}`, held to avoid a map lookup per write.
    pub relayed_download: Counter,
    /// Request latency: request head received → response body finished.
    pub request_duration: Histogram,
    /// Conversion latency: client connection accepted → upstream connection established.
    pub conversion_duration: Histogram,
    /// Time to first byte: request head received → upstream response head received.
    pub first_byte_duration: Histogram,
    /// Upstream failures by kind.
    pub upstream_errors: Family<KindLabel, Counter>,
    /// Refused connections closed at once because `limits.max_refusals` answers were in flight.
    pub refusals_dropped: Counter,
    /// Access-log lines dropped because the writer thread fell behind (`access_log.queue_lines`).
    pub access_log_dropped: Counter,
    /// Responses sent to clients by status code.
    pub responses: Family<CodeLabel, Counter>,
    /// Each throttle class's configured rate, bytes per second.
    pub class_rate: Family<ClassLabels, Gauge>,
    /// Each throttle class's configured ceil, bytes per second.
    pub class_ceil: Family<ClassLabels, Gauge>,
    /// Bytes sent through each throttle class (tc statistics).
    pub class_bytes: Family<ClassLabels, Counter>,
    /// Packets dropped in each throttle class (tc statistics).
    pub class_drops: Family<ClassLabels, Counter>,
    /// Overlimit events of each throttle class (tc statistics).
    pub class_overlimits: Family<ClassLabels, Counter>,
    /// Subflows placed in each throttle class now.
    pub class_subflows: Family<ClassLabel, Gauge>,
    /// From the kernel's subflow event to the classifying rule acknowledged.
    pub rule_install_duration: Histogram,
    /// Throttle changes the kernel refused (retried at the next event).
    pub throttle_change_failures: Counter,
    /// Refreshes tc statistics at scrape time, when the throttle runs.
    class_stats_source: Mutex<Option<StatsSource>>,
    /// The throttle at scale: steered subflows, per-client classes, limits, resyncs (issue 15).
    pub throttle_scale: crate::throttle::ScaleMetrics,
    /// Packets the sniffer's kernel filter passed.
    pub sniffer_packets: Counter,
    /// MPTCP options the sniffer decoded, by subtype.
    pub sniffer_options: Family<SubtypeLabel, Counter>,
    /// Anomalies the sniffer's tracker reported, by kind.
    pub sniffer_anomalies: Family<AnomalyLabel, Counter>,
    /// Joined subflows by arrival address (cluster mode counts them from `mptcp_pm` events).
    pub cluster_joins: Family<ArrivalLabel, Counter>,
    /// 1 while this instance announces the service address (its announcement device exists).
    pub cluster_announced: Gauge,
    /// MP_JOINs whose token no connection here has (the kernel's MPJoinNoTokenFound, read at scrape).
    cluster_joins_unknown_token: Counter,
    unknown_token_seen: Mutex<u64>,
    process_open_fds: Gauge,
    process_resident_memory: Gauge,
    process_cpu_seconds: Counter<f64, AtomicU64>,
    cpu_seen: Mutex<f64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        Self::with_extension(|_| {})
    }

    /// Creates and registers every metric, then lets `extend` register more
    /// in the same registry (the MPIP proxy end adds its own).
    pub fn with_extension(extend: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::default();
        extend(&mut registry);
        let connections = Family::<ConnectionLabels, Counter>::default();
        let connections_active = Family::<TransportLabel, Gauge>::default();
        let connection_subflows = Histogram::new([1.0, 2.0, 3.0, 4.0, 6.0, 8.0]);
        let subflows_joined = Family::<InterfaceLabel, Counter>::default();
        let subflows_closed = Family::<InterfaceLabel, Counter>::default();
        let subflows_active = Family::<InterfaceLabel, Gauge>::default();
        let path_bytes = Family::<PathLabels, Counter>::default();
        let relayed_bytes = Family::<DirectionLabel, Counter>::default();
        let request_duration = latency_buckets();
        let conversion_duration = latency_buckets();
        let first_byte_duration = latency_buckets();
        let upstream_errors = Family::<KindLabel, Counter>::default();
        let refusals_dropped = Counter::default();
        let access_log_dropped = Counter::default();
        let responses = Family::<CodeLabel, Counter>::default();
        let class_rate = Family::<ClassLabels, Gauge>::default();
        let class_ceil = Family::<ClassLabels, Gauge>::default();
        let class_bytes = Family::<ClassLabels, Counter>::default();
        let class_drops = Family::<ClassLabels, Counter>::default();
        let class_overlimits = Family::<ClassLabels, Counter>::default();
        let class_subflows = Family::<ClassLabel, Gauge>::default();
        let rule_install_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.00005, 2.0, 16),
        );
        let throttle_change_failures = Counter::default();
        let sniffer_packets = Counter::default();
        let sniffer_options = Family::<SubtypeLabel, Counter>::default();
        let sniffer_anomalies = Family::<AnomalyLabel, Counter>::default();
        for subtype in mptcp_sniffer::wire::Subtype::ALL {
            let _ = sniffer_options.get_or_create(&SubtypeLabel {
                subtype: subtype.name(),
            });
        }
        for kind in ANOMALY_KINDS {
            let _ = sniffer_anomalies.get_or_create(&AnomalyLabel { kind });
        }
        let cluster_joins = Family::<ArrivalLabel, Counter>::default();
        for address in ["announced", "service", "other"] {
            let _ = cluster_joins.get_or_create(&ArrivalLabel { address });
        }
        let cluster_announced = Gauge::default();
        let cluster_joins_unknown_token = Counter::default();
        let process_open_fds = Gauge::default();
        let process_resident_memory = Gauge::default();
        let process_cpu_seconds = Counter::<f64, AtomicU64>::default();
        let process_start_time = Gauge::<f64, AtomicU64>::default();

        let proxy = registry.sub_registry_with_prefix("mptcp_proxy");
        proxy.register(
            "client_connections",
            "Client connections by transport (mptcp, fallback_tcp, tcp) and outcome",
            connections.clone(),
        );
        proxy.register(
            "client_connections_active",
            "Client connections open now, by transport",
            connections_active.clone(),
        );
        proxy.register(
            "connection_subflows",
            "Most subflows an MPTCP client connection had at once, observed when it closes",
            connection_subflows.clone(),
        );
        proxy.register(
            "subflows_joined",
            "Subflows that joined MPTCP client connections, by client-facing interface",
            subflows_joined.clone(),
        );
        proxy.register(
            "subflows_closed",
            "Joined subflows that closed, by client-facing interface",
            subflows_closed.clone(),
        );
        proxy.register(
            "subflows_active",
            "Client subflows open now (initial ones included), by client-facing interface",
            subflows_active.clone(),
        );
        proxy.register_with_unit(
            "path",
            "Bytes carried on client paths, per subflow from tcp_info, by interface and direction",
            Unit::Bytes,
            path_bytes.clone(),
        );
        proxy.register_with_unit(
            "relayed",
            "Bytes relayed to (download) and from (upload) clients",
            Unit::Bytes,
            relayed_bytes.clone(),
        );
        proxy.register_with_unit(
            "request_duration",
            "Request head received to response finished",
            Unit::Seconds,
            request_duration.clone(),
        );
        proxy.register_with_unit(
            "conversion_duration",
            "Client connection accepted to upstream TCP connection established",
            Unit::Seconds,
            conversion_duration.clone(),
        );
        proxy.register_with_unit(
            "first_byte_duration",
            "Request head received to upstream response head received",
            Unit::Seconds,
            first_byte_duration.clone(),
        );
        proxy.register(
            "upstream_errors",
            "Upstream failures by kind",
            upstream_errors.clone(),
        );
        proxy.register(
            "refusals_dropped",
            "Refused connections closed without an answer: limits.max_refusals answers were in flight",
            refusals_dropped.clone(),
        );
        proxy.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer fell behind (access_log.queue_lines)",
            access_log_dropped.clone(),
        );
        proxy.register(
            "http_responses",
            "Responses sent to clients by status code",
            responses.clone(),
        );
        let throttle = proxy.sub_registry_with_prefix("throttle");
        throttle.register_with_unit(
            "class_rate",
            "Configured rate of each throttle class, bytes per second",
            Unit::Other("bytes_per_second".into()),
            class_rate.clone(),
        );
        throttle.register_with_unit(
            "class_ceil",
            "Configured ceil of each throttle class, bytes per second",
            Unit::Other("bytes_per_second".into()),
            class_ceil.clone(),
        );
        throttle.register_with_unit(
            "class",
            "Bytes sent through each throttle class, from tc statistics",
            Unit::Bytes,
            class_bytes.clone(),
        );
        throttle.register(
            "class_drops",
            "Packets dropped by each throttle class, from tc statistics",
            class_drops.clone(),
        );
        throttle.register(
            "class_overlimits",
            "Overlimit events of each throttle class, from tc statistics",
            class_overlimits.clone(),
        );
        throttle.register(
            "class_subflows",
            "Subflows placed in each throttle class now",
            class_subflows.clone(),
        );
        throttle.register_with_unit(
            "rule_install_duration",
            "Kernel subflow event to classifying rule acknowledged",
            Unit::Seconds,
            rule_install_duration.clone(),
        );
        throttle.register(
            "change_failures",
            "Throttle changes the kernel refused",
            throttle_change_failures.clone(),
        );
        let throttle_scale = crate::throttle::ScaleMetrics::register(throttle);
        let sniffer = proxy.sub_registry_with_prefix("sniffer");
        sniffer.register(
            "packets",
            "Packets the sniffer's kernel filter passed",
            sniffer_packets.clone(),
        );
        sniffer.register(
            "options",
            "MPTCP options the sniffer decoded, by subtype",
            sniffer_options.clone(),
        );
        sniffer.register(
            "anomalies",
            "Anomalies the sniffer's tracker reported, by kind",
            sniffer_anomalies.clone(),
        );
        let cluster = proxy.sub_registry_with_prefix("cluster");
        cluster.register(
            "joins",
            "Joined subflows by the local address they arrived at: announced (this instance's own), service (the shared address) or other",
            cluster_joins.clone(),
        );
        cluster.register(
            "announced",
            "1 while this instance announces the service address (its announcement device exists)",
            cluster_announced.clone(),
        );
        cluster.register(
            "joins_unknown_token",
            "MP_JOINs for a connection this instance does not have (kernel MPJoinNoTokenFound): in a cluster, joins that reached the wrong instance",
            cluster_joins_unknown_token.clone(),
        );
        let process = registry.sub_registry_with_prefix("process");
        process.register(
            "open_fds",
            "Open file descriptors",
            process_open_fds.clone(),
        );
        process.register_with_unit(
            "resident_memory",
            "Resident set size",
            Unit::Bytes,
            process_resident_memory.clone(),
        );
        process.register_with_unit(
            "cpu",
            "User and system CPU time",
            Unit::Seconds,
            process_cpu_seconds.clone(),
        );
        process.register_with_unit(
            "start_time",
            "Start time since the Unix epoch",
            Unit::Seconds,
            process_start_time.clone(),
        );
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        process_start_time.set(start.as_secs_f64());

        // Closed label sets start at zero, so rate() works from the first scrape.
        for transport in ["mptcp", "fallback_tcp", "tcp"] {
            let _ = connections_active.get_or_create(&TransportLabel { transport });
            for outcome in ["accepted", "denied", "over_limit"] {
                let _ = connections.get_or_create(&ConnectionLabels { transport, outcome });
            }
        }
        for kind in UPSTREAM_ERROR_KINDS {
            let _ = upstream_errors.get_or_create(&KindLabel { kind });
        }
        let relayed_upload = relayed_bytes
            .get_or_create(&DirectionLabel {
                direction: "upload",
            })
            .clone();
        let relayed_download = relayed_bytes
            .get_or_create(&DirectionLabel {
                direction: "download",
            })
            .clone();
        Self {
            registry,
            sniffer_packets,
            sniffer_options,
            sniffer_anomalies,
            cluster_joins,
            cluster_announced,
            cluster_joins_unknown_token,
            unknown_token_seen: Mutex::new(0),
            class_rate,
            class_ceil,
            class_bytes,
            class_drops,
            class_overlimits,
            class_subflows,
            rule_install_duration,
            throttle_change_failures,
            class_stats_source: Mutex::new(None),
            throttle_scale,
            relayed_upload,
            relayed_download,
            connections,
            connections_active,
            connection_subflows,
            subflows_joined,
            subflows_closed,
            subflows_active,
            path_bytes,
            relayed_bytes,
            request_duration,
            conversion_duration,
            first_byte_duration,
            upstream_errors,
            refusals_dropped,
            access_log_dropped,
            responses,
            process_open_fds,
            process_resident_memory,
            process_cpu_seconds,
            cpu_seen: Mutex::new(0.0),
        }
    }

    /// Counts a client connection.
    pub fn connection(&self, transport: &'static str, outcome: &'static str) {
        self.connections
            .get_or_create(&ConnectionLabels { transport, outcome })
            .inc();
    }

    /// Counts a joined subflow that arrived at `address` (`announced`, `service` or `other`).
    pub fn cluster_join(&self, address: &'static str) {
        self.cluster_joins
            .get_or_create(&ArrivalLabel { address })
            .inc();
    }

    /// Installs the function that refreshes tc class statistics at each scrape.
    pub fn set_class_stats_source(&self, source: Box<dyn FnMut(&Metrics) + Send>) {
        *self
            .class_stats_source
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(StatsSource(source));
    }

    /// Renders the OpenMetrics text, refreshing the process and throttle statistics first.
    pub fn render(&self) -> String {
        self.refresh_process();
        self.refresh_mptcp_mib();
        if let Some(source) = self
            .class_stats_source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            (source.0)(self);
        }
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(%error, "encoding metrics failed");
        }
        text
    }

    /// Renders the classic Prometheus text format (0.0.4), for clients that do not ask for
    /// OpenMetrics: counter families are named with their `_total` suffix, `# UNIT` and `# EOF` go.
    pub fn render_classic(&self) -> String {
        to_classic_text(&self.render())
    }

    fn refresh_mptcp_mib(&self) {
        let Ok(text) = std::fs::read_to_string("/proc/net/netstat") else {
            return;
        };
        let Some(now) = netstat_counter(&text, "MPTcpExt", "MPJoinNoTokenFound") else {
            return;
        };
        let mut seen = self
            .unknown_token_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if now > *seen {
            self.cluster_joins_unknown_token.inc_by(now - *seen);
            *seen = now;
        }
    }

    fn refresh_process(&self) {
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.process_open_fds.set(fds.count() as i64);
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1);
        // SAFETY: as above.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            if let Some(pages) = statm
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i64>().ok())
            {
                self.process_resident_memory.set(pages * page);
            }
        }
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the parenthesised command name: utime and stime are fields 14 and 15.
            let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<&str> = after.split_whitespace().collect();
            let jiffies = |i: usize| {
                fields
                    .get(i)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            let cpu = (jiffies(11) + jiffies(12)) / ticks;
            let mut seen = self.cpu_seen.lock().unwrap_or_else(|p| p.into_inner());
            if cpu > *seen {
                self.process_cpu_seconds.inc_by(cpu - *seen);
                *seen = cpu;
            }
        }
    }
}

/// One counter from `/proc/net/netstat` (or `/proc/net/snmp`): lines come in pairs, `Group: names...`
/// then `Group: values...`.
pub fn netstat_counter(text: &str, group: &str, name: &str) -> Option<u64> {
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let position = names.split_whitespace().position(|n| n == name);
        if let Some(position) = position {
            return values.split_whitespace().nth(position)?.parse().ok();
        }
    }
    None
}

/// Converts OpenMetrics text from `prometheus-client` to the classic text format.
pub fn to_classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Finds the path (client-facing interface) of a subflow: the interface the kernel routes the client's
/// address through from the subflow's local address. The local address alone is not enough: a joined
/// subflow usually targets the address the client first connected to, whatever path it takes.
/// Lookups are cached for [`ROUTE_CACHE_TTL`], and the cache is bounded.
#[derive(Debug, Default)]
pub struct InterfaceMap {
    routes: RwLock<HashMap<(IpAddr, IpAddr), (String, Instant)>>,
}

/// How long a route lookup is trusted.
pub const ROUTE_CACHE_TTL: Duration = Duration::from_secs(30);
const ROUTE_CACHE_ENTRIES: usize = 4096;

impl InterfaceMap {
    /// The path of a subflow from `local` to `remote`, or `unknown`.
    pub fn name_of(&self, local: IpAddr, remote: IpAddr) -> String {
        let key = (local.to_canonical(), remote.to_canonical());
        if let Some((name, at)) = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            if at.elapsed() < ROUTE_CACHE_TTL {
                return name.clone();
            }
        }
        let name = mptcp_throttle::kernel::route_interface_name(key.0, key.1)
            .unwrap_or_else(|| "unknown".to_owned());
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        if routes.len() >= ROUTE_CACHE_ENTRIES {
            routes.clear();
        }
        routes.insert(key, (name.clone(), Instant::now()));
        name
    }
}

/// What one connection last saw of each of its subflows, to turn kernel totals into counter deltas.
#[derive(Debug, Default)]
pub struct PathAccounting {
    subflows: HashMap<u32, SeenSubflow>,
}

#[derive(Debug)]
struct SeenSubflow {
    interface: String,
    bytes_acked: u64,
    bytes_received: u64,
}

impl PathAccounting {
    /// Folds a fresh sample of the connection's subflows into the metrics: new subflows joined, missing
    /// ones closed, byte deltas per path.
    pub fn update(
        &mut self,
        samples: &[SubflowSample],
        interfaces: &InterfaceMap,
        metrics: &Metrics,
    ) {
        for sample in samples {
            let seen = self.subflows.entry(sample.id).or_insert_with(|| {
                let interface = interfaces.name_of(sample.local.ip(), sample.remote.ip());
                let label = InterfaceLabel {
                    interface: interface.clone(),
                };
                if sample.id > 1 {
                    metrics.subflows_joined.get_or_create(&label).inc();
                }
                metrics.subflows_active.get_or_create(&label).inc();
                SeenSubflow {
                    interface,
                    bytes_acked: 0,
                    bytes_received: 0,
                }
            });
            for (direction, now, before) in [
                ("download", sample.bytes_acked, &mut seen.bytes_acked),
                ("upload", sample.bytes_received, &mut seen.bytes_received),
            ] {
                if now > *before {
                    metrics
                        .path_bytes
                        .get_or_create(&PathLabels {
                            interface: seen.interface.clone(),
                            direction,
                        })
                        .inc_by(now - *before);
                    *before = now;
                }
            }
        }
        let gone: Vec<u32> = self
            .subflows
            .keys()
            .filter(|id| !samples.iter().any(|s| s.id == **id))
            .copied()
            .collect();
        for id in gone {
            self.close(id, metrics);
        }
    }

    /// The connection closed: every remaining subflow closes with it.
    pub fn close_all(&mut self, metrics: &Metrics) {
        let ids: Vec<u32> = self.subflows.keys().copied().collect();
        for id in ids {
            self.close(id, metrics);
        }
    }

    fn close(&mut self, id: u32, metrics: &Metrics) {
        if let Some(seen) = self.subflows.remove(&id) {
            let label = InterfaceLabel {
                interface: seen.interface,
            };
            if id > 1 {
                metrics.subflows_closed.get_or_create(&label).inc();
            }
            metrics.subflows_active.get_or_create(&label).dec();
        }
    }
}

/// Shared handle.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: u32, remote: &str, acked: u64, received: u64) -> SubflowSample {
        SubflowSample {
            id,
            local: "127.0.0.1:3128".parse().expect("literal"),
            remote: remote.parse().expect("literal"),
            bytes_acked: acked,
            bytes_received: received,
            rtt_us: 0,
        }
    }

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{series} missing in\n{text}"))
    }

    #[test]
    fn path_accounting_turns_totals_into_deltas_and_tracks_subflows() {
        let metrics = Metrics::new();
        let interfaces = InterfaceMap::default();
        let mut paths = PathAccounting::default();
        // 127.0.0.1 belongs to `lo` on every host; 192.0.2.1 to none.
        paths.update(
            &[sample(1, "127.0.0.1:3128", 100, 10)],
            &interfaces,
            &metrics,
        );
        paths.update(
            &[
                sample(1, "127.0.0.1:3128", 250, 10),
                sample(2, "192.0.2.1:3128", 40, 5),
            ],
            &interfaces,
            &metrics,
        );
        paths.update(
            &[sample(1, "127.0.0.1:3128", 300, 12)],
            &interfaces,
            &metrics,
        );
        let text = metrics.render();
        assert_eq!(
            value(
                &text,
                "mptcp_proxy_path_bytes_total{interface=\"lo\",direction=\"download\"}"
            ),
            300.0
        );
        assert_eq!(
            value(
                &text,
                "mptcp_proxy_path_bytes_total{interface=\"lo\",direction=\"upload\"}"
            ),
            12.0
        );
        assert_eq!(
            value(
                &text,
                "mptcp_proxy_path_bytes_total{interface=\"unknown\",direction=\"download\"}"
            ),
            40.0
        );
        assert_eq!(
            value(
                &text,
                "mptcp_proxy_subflows_joined_total{interface=\"unknown\"}"
            ),
            1.0
        );
        assert_eq!(
            value(
                &text,
                "mptcp_proxy_subflows_closed_total{interface=\"unknown\"}"
            ),
            1.0
        );
        assert_eq!(
            value(&text, "mptcp_proxy_subflows_active{interface=\"lo\"}"),
            1.0
        );
        paths.close_all(&metrics);
        let text = metrics.render();
        assert_eq!(
            value(&text, "mptcp_proxy_subflows_active{interface=\"lo\"}"),
            0.0
        );
        // The initial subflow is not a joined one.
        assert!(!text.contains("mptcp_proxy_subflows_closed_total{interface=\"lo\"}"));
    }

    #[test]
    fn netstat_counters_are_found_by_group_and_name() {
        let text = "TcpExt: SyncookiesSent SyncookiesRecv\nTcpExt: 1 2\n\
                    MPTcpExt: MPCapableSYNRX MPJoinNoTokenFound\nMPTcpExt: 5 3\n";
        assert_eq!(
            netstat_counter(text, "MPTcpExt", "MPJoinNoTokenFound"),
            Some(3)
        );
        assert_eq!(netstat_counter(text, "TcpExt", "SyncookiesRecv"), Some(2));
        assert_eq!(netstat_counter(text, "MPTcpExt", "Missing"), None);
        assert_eq!(netstat_counter("", "MPTcpExt", "MPJoinNoTokenFound"), None);
    }

    #[test]
    fn loopback_routes_through_lo() {
        let lo: IpAddr = "127.0.0.1".parse().expect("literal");
        assert_eq!(InterfaceMap::default().name_of(lo, lo), "lo");
    }

    #[test]
    fn render_is_openmetrics_with_process_metrics() {
        let metrics = Metrics::new();
        metrics.connection("mptcp", "accepted");
        let text = metrics.render();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(
            value(
                &text,
                "mptcp_proxy_client_connections_total{transport=\"mptcp\",outcome=\"accepted\"}"
            ),
            1.0
        );
        assert!(value(&text, "process_open_fds") > 0.0);
        assert!(value(&text, "process_resident_memory_bytes") > 0.0);
        let classic = metrics.render_classic();
        assert!(classic.contains("# TYPE mptcp_proxy_client_connections_total counter\n"));
        assert!(classic.contains("# HELP mptcp_proxy_client_connections_total Client connections"));
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"));
    }
}
