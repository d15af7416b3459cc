//! Subflow throttling inside the proxy (seed 002 §2): the `mptcp-throttle` owner task fed by the kernel's
//! `mptcp_pm` events, told each connection's proxied destination, and exported as metrics.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mptcp_throttle::core::ThrottleState;
use mptcp_throttle::{
    Change, ClassDirection, ConnectionSelector, Destination, EventSender, FourTuple, KernelError,
    PolicyReceiver, PolicySender, ResyncReason, ResyncReport, ThrottleConfig, ThrottleHooks,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::metrics::{ClassLabel, ClassLabels, Metrics};
use crate::registry::SubflowClasses;

/// Label: why the throttle resynced.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `start`, `events_lost` or `periodic`.
    pub reason: &'static str,
}

/// Label: what a resync repaired.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepairLabel {
    /// `connection_added`, `connection_removed`, `subflow_added`, `subflow_removed`.
    pub repair: &'static str,
}

/// Label: a percentile. Not `quantile`: that label belongs to the summary type, which
/// prometheus-client does not encode (promtool rejects it on a gauge).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PercentileLabel {
    /// `50`, `90`, `99`.
    pub percentile: &'static str,
}

/// How many recent rule-install latencies the exact quantiles cover.
const RECENT_INSTALLS: usize = 1 << 16;
/// The quantiles exported exactly.
const QUANTILES: [(&str, f64); 3] = [("50", 0.5), ("90", 0.9), ("99", 0.99)];

/// The throttle's metrics at ISP scale (issue 15), under `mptcp_proxy_throttle_`.
#[derive(Debug, Clone)]
pub struct ScaleMetrics {
    /// Subflows steered now (map elements in the packet path).
    pub steered_subflows: Gauge,
    /// Per-subscriber classes allocated now, per `scope = "client"` class.
    pub client_classes: Family<ClassLabel, Gauge>,
    /// Subflow placements refused because a `scope = "client"` class had `max_clients` subscribers.
    pub class_limit_refusals: Family<ClassLabel, Counter>,
    /// Subflows left unsteered because `max_steered_subflows` were steered.
    pub subflow_limit_refusals: Counter,
    /// Connections with a subflow a limit leaves unsteered now.
    pub waiting_connections: Gauge,
    /// Resyncs from the kernel, by reason.
    pub resyncs: Family<ReasonLabel, Counter>,
    /// How long a resync took (dump, diff and apply).
    pub resync_duration: Histogram,
    /// What resyncs repaired.
    pub resync_repairs: Family<RepairLabel, Counter>,
    /// Exact quantiles of the last 65,536 rule installs (event to batch ack), computed at scrape.
    pub rule_install_recent: Family<PercentileLabel, Gauge<f64, AtomicU64>>,
    recent_installs: Arc<Mutex<VecDeque<f64>>>,
}

impl ScaleMetrics {
    /// Creates the metrics and registers them in the throttle's sub-registry.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            steered_subflows: Gauge::default(),
            client_classes: Family::default(),
            class_limit_refusals: Family::default(),
            subflow_limit_refusals: Counter::default(),
            waiting_connections: Gauge::default(),
            resyncs: Family::default(),
            resync_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 16),
            ),
            resync_repairs: Family::default(),
            rule_install_recent: Family::default(),
            recent_installs: Arc::new(Mutex::new(VecDeque::with_capacity(RECENT_INSTALLS))),
        };
        registry.register(
            "steered_subflows",
            "Subflows steered now (map elements in the packet path)",
            metrics.steered_subflows.clone(),
        );
        registry.register(
            "client_classes",
            "Per-subscriber classes allocated now, per scope = client class",
            metrics.client_classes.clone(),
        );
        registry.register(
            "class_limit_refusals",
            "Subflow placements refused: a scope = client class had max_clients subscribers",
            metrics.class_limit_refusals.clone(),
        );
        registry.register(
            "subflow_limit_refusals",
            "Subflows left unsteered: max_steered_subflows were steered",
            metrics.subflow_limit_refusals.clone(),
        );
        registry.register(
            "waiting_connections",
            "Connections with a subflow a limit leaves unsteered now",
            metrics.waiting_connections.clone(),
        );
        registry.register(
            "resyncs",
            "Live subflows rebuilt from the kernel, by reason",
            metrics.resyncs.clone(),
        );
        registry.register_with_unit(
            "resync_duration",
            "Resync from the kernel: dump, diff and apply",
            Unit::Seconds,
            metrics.resync_duration.clone(),
        );
        registry.register(
            "resync_repairs",
            "Connections and subflows a resync found that the events had not told",
            metrics.resync_repairs.clone(),
        );
        registry.register_with_unit(
            "rule_install_recent",
            "Exact quantiles of the last 65536 rule installs (event to batch ack)",
            Unit::Seconds,
            metrics.rule_install_recent.clone(),
        );
        metrics
    }

    fn record_install(&self, latency: Duration) {
        let mut recent = self
            .recent_installs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_INSTALLS {
            recent.pop_front();
        }
        recent.push_back(latency.as_secs_f64());
    }

    /// Sets the exact quantile gauges from the recent installs (nearest rank).
    pub fn refresh_quantiles(&self) {
        let mut values: Vec<f64> = self
            .recent_installs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        if values.is_empty() {
            return;
        }
        values.sort_by(f64::total_cmp);
        for (label, q) in QUANTILES {
            let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
            self.rule_install_recent
                .get_or_create(&PercentileLabel { percentile: label })
                .set(values[rank - 1]);
        }
    }
}

/// The throttle's side of the proxy: the event channel and what the owner task needs to start.
#[derive(Debug)]
pub struct ThrottleHandle {
    /// Where subflow events and destinations go.
    pub events: EventSender,
    /// Where a reload sends a new policy (classes and rules) for the running owner task.
    pub policies: PolicySender,
    receiver: mptcp_throttle::EventReceiver,
    policy_receiver: PolicyReceiver,
    config: ThrottleConfig,
    classes: Arc<SubflowClasses>,
}

/// How many events may wait for the owner task.
const EVENT_QUEUE: usize = 4096;

impl ThrottleHandle {
    /// Prepares the channel for a validated policy.
    pub fn new(config: ThrottleConfig) -> Self {
        Self::with_classes(config, Arc::default())
    }

    /// [`ThrottleHandle::new`], publishing each subflow's class into `classes` (the `/connections` view).
    pub fn with_classes(config: ThrottleConfig, classes: Arc<SubflowClasses>) -> Self {
        let (events, receiver) = mptcp_throttle::event_channel(EVENT_QUEUE);
        let (policies, policy_receiver) = mptcp_throttle::policy_channel(&config);
        Self {
            events,
            policies,
            receiver,
            policy_receiver,
            config,
            classes,
        }
    }

    /// The policy the owner task starts with.
    pub fn config(&self) -> &ThrottleConfig {
        &self.config
    }

    /// Starts the event source and the owner task; the task removes everything it installed once
    /// `shutdown` resolves. Also exports the classes' configuration and statistics.
    pub fn start(
        self,
        metrics: Arc<Metrics>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<
        tokio::task::JoinHandle<Result<mptcp_throttle::RunSummary, mptcp_throttle::ThrottleError>>,
        mptcp_netlink::mptcp_pm::PmError,
    > {
        let listener = mptcp_throttle::start_event_source(&self.config, self.events.clone())?;
        export_classes(&self.config, &metrics);
        let hooks = ThrottleMetrics {
            metrics: metrics.clone(),
            classes: self.config.classes.iter().map(|c| c.name.clone()).collect(),
            refusals_seen: BTreeMap::new(),
            subflow_refusals_seen: 0,
            placed: self.classes.clone(),
            class_counts: BTreeMap::new(),
        };
        let config = self.config;
        // The owner task gets a thread of its own, scheduled ahead of connection handling
        // (`realtime_priority`): with thousands of connections being accepted, a shared worker (or a
        // fair share of a loaded CPU) delayed steering by tens of milliseconds (bench (e')).
        let realtime_priority = config.realtime_priority;
        Ok(tokio::task::spawn_blocking(move || {
            mptcp_throttle::driver::set_control_thread_scheduling(realtime_priority);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| {
                    mptcp_throttle::ThrottleError::Kernel(mptcp_throttle::KernelError::Socket(e))
                })?;
            let result = runtime.block_on(mptcp_throttle::run_with_policy_updates(
                config,
                self.receiver,
                Some(self.policy_receiver),
                shutdown,
                hooks,
            ));
            self.classes.replace(Default::default());
            // The kernel listener stops when dropped, after the owner task is done.
            drop(listener);
            result
        }))
    }
}

/// Tells the throttle which destination a client connection's request goes to, so rules that match
/// destinations apply. Never blocks the request: a full queue drops the hint.
pub fn attach_destination(
    events: &EventSender,
    local: std::net::SocketAddr,
    client: std::net::SocketAddr,
    host: &str,
    server: std::net::SocketAddr,
) {
    let events = events.clone();
    let selector = ConnectionSelector::Tuple(FourTuple {
        local,
        remote: client,
    });
    let destination = Destination {
        host: Some(host.to_owned()),
        addr: Some(server.ip()),
        port: Some(server.port()),
    };
    tokio::spawn(async move {
        let _ = events.attach_destination(selector, destination).await;
    });
}

/// Sets the class rate and ceil gauges, and installs the tc statistics reader for scrapes. Series of an
/// earlier policy go first (a reload): counters restart from the kernel's values.
fn export_classes(config: &ThrottleConfig, metrics: &Metrics) {
    metrics.class_rate.clear();
    metrics.class_ceil.clear();
    metrics.class_bytes.clear();
    metrics.class_drops.clear();
    metrics.class_overlimits.clear();
    metrics.class_subflows.clear();
    let state = ThrottleState::new(config.clone());
    let mut by_handle: HashMap<(u32, String, &'static str), String> = HashMap::new();
    for class in &config.classes {
        let Some(id) = state.class_id(&class.name) else {
            continue;
        };
        let directions: &[&'static str] = match class.direction {
            ClassDirection::Download => &["download"],
            ClassDirection::Upload => &["upload"],
            ClassDirection::Both => &["download", "upload"],
        };
        for direction in directions {
            let labels = ClassLabels {
                class: class.name.clone(),
                interface: class.interface.clone(),
                direction,
            };
            let rate = class.rate.bytes_per_second();
            let ceil = class.ceil.map_or(rate, |c| c.bytes_per_second());
            metrics
                .class_rate
                .get_or_create(&labels)
                .set(i64::try_from(rate).unwrap_or(i64::MAX));
            metrics
                .class_ceil
                .get_or_create(&labels)
                .set(i64::try_from(ceil).unwrap_or(i64::MAX));
            let _ = metrics.class_bytes.get_or_create(&labels);
            let _ = metrics.class_drops.get_or_create(&labels);
            let _ = metrics.class_overlimits.get_or_create(&labels);
            by_handle.insert(
                (id.handle(), class.interface.clone(), direction),
                class.name.clone(),
            );
        }
        let _ = metrics.class_subflows.get_or_create(&ClassLabel {
            class: class.name.clone(),
        });
    }
    let major = config.qdisc_major;
    let ifb_prefix = config.ifb_prefix.clone();
    let mut last: HashMap<ClassLabels, (u64, u64, u64)> = HashMap::new();
    metrics.set_class_stats_source(Box::new(move |metrics: &Metrics| {
        metrics.throttle_scale.refresh_quantiles();
        let Ok(stats) = mptcp_throttle::stats::class_stats(major) else {
            return;
        };
        for stat in stats {
            // Upload classes live on the IFB device `<prefix><ifindex of the shaped interface>`.
            let (interface, direction) = match stat
                .interface
                .strip_prefix(&ifb_prefix)
                .and_then(|index| index.parse::<u32>().ok())
            {
                Some(index) => (interface_name(index), "upload"),
                None => (stat.interface.clone(), "download"),
            };
            let Some(class) = by_handle.get(&(stat.handle, interface.clone(), direction)) else {
                continue;
            };
            let labels = ClassLabels {
                class: class.clone(),
                interface,
                direction,
            };
            let seen = last.entry(labels.clone()).or_default();
            // tc counters restart when a class is recreated: count from the new value then.
            let delta = |now: u64, before: u64| if now >= before { now - before } else { now };
            metrics
                .class_bytes
                .get_or_create(&labels)
                .inc_by(delta(stat.bytes, seen.0));
            metrics
                .class_drops
                .get_or_create(&labels)
                .inc_by(delta(stat.drops, seen.1));
            metrics
                .class_overlimits
                .get_or_create(&labels)
                .inc_by(delta(stat.overlimits, seen.2));
            *seen = (stat.bytes, stat.drops, stat.overlimits);
        }
    }));
}

fn interface_name(index: u32) -> String {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: name has IF_NAMESIZE bytes, as if_indextoname requires.
    let found = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if found.is_null() {
        return format!("ifindex{index}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Observes the owner task for metrics.
struct ThrottleMetrics {
    metrics: Arc<Metrics>,
    classes: BTreeSet<String>,
    /// Refusals already counted, per class (the state's totals grow; counters take the difference).
    refusals_seen: BTreeMap<String, u64>,
    subflow_refusals_seen: u64,
    placed: Arc<SubflowClasses>,
    /// Subflows placed in each class now, kept per applied change (not recounted per event).
    class_counts: BTreeMap<String, i64>,
}

impl ThrottleHooks for ThrottleMetrics {
    fn rule_installed(&mut self, latency: Duration) {
        self.metrics
            .rule_install_duration
            .observe(latency.as_secs_f64());
        self.metrics.throttle_scale.record_install(latency);
    }

    fn resynced(&mut self, reason: ResyncReason, report: &ResyncReport, took: Duration) {
        let scale = &self.metrics.throttle_scale;
        scale
            .resyncs
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
        scale.resync_duration.observe(took.as_secs_f64());
        for (repair, count) in [
            ("connection_added", report.connections_added),
            ("connection_removed", report.connections_removed),
            ("subflow_added", report.subflows_added),
            ("subflow_removed", report.subflows_removed),
        ] {
            scale
                .resync_repairs
                .get_or_create(&RepairLabel { repair })
                .inc_by(count as u64);
        }
    }

    fn change_failed(&mut self, _change: &Change, _error: &KernelError) {
        self.metrics.throttle_change_failures.inc();
    }

    fn policy_changed(&mut self, config: &ThrottleConfig) {
        export_classes(config, &self.metrics);
        self.classes = config.classes.iter().map(|c| c.name.clone()).collect();
    }

    fn changes_applied(&mut self, applied: &[&Change]) {
        for change in applied {
            let (rule, added) = match change {
                Change::AddRule { rule, .. } => (rule, true),
                Change::RemoveRule(rule) => (rule, false),
                _ => continue,
            };
            let names: BTreeSet<&str> = [&rule.download, &rule.upload]
                .into_iter()
                .flatten()
                .map(|p| p.name.as_str())
                .collect();
            for name in &names {
                let count = self.class_counts.entry((*name).to_owned()).or_default();
                *count = if added {
                    *count + 1
                } else {
                    (*count - 1).max(0)
                };
            }
            let class = (added && !names.is_empty())
                .then(|| names.into_iter().collect::<Vec<_>>().join("+"));
            self.placed.set(rule.tuple.local, rule.tuple.remote, class);
        }
    }

    fn state_applied(&mut self, state: &ThrottleState) {
        for class in &self.classes {
            let count = self.class_counts.get(class).copied().unwrap_or(0);
            self.metrics
                .class_subflows
                .get_or_create(&ClassLabel {
                    class: class.clone(),
                })
                .set(count);
        }
        let scale = &self.metrics.throttle_scale;
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        scale
            .steered_subflows
            .set(gauge(state.installed().rules.len()));
        scale
            .waiting_connections
            .set(gauge(state.waiting_connections()));
        let counts = state.client_class_counts();
        for class in &self.classes {
            let label = ClassLabel {
                class: class.clone(),
            };
            scale
                .client_classes
                .get_or_create(&label)
                .set(gauge(counts.get(class).copied().unwrap_or(0)));
            let refused = state.refusals_by_class().get(class).copied().unwrap_or(0);
            let seen = self.refusals_seen.entry(class.clone()).or_default();
            if refused > *seen {
                scale
                    .class_limit_refusals
                    .get_or_create(&label)
                    .inc_by(refused - *seen);
                *seen = refused;
            }
        }
        let refused = state.stats().refused_subflow_limit;
        if refused > self.subflow_refusals_seen {
            scale
                .subflow_limit_refusals
                .inc_by(refused - self.subflow_refusals_seen);
            self.subflow_refusals_seen = refused;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use mptcp_throttle::{ConnectionToken, SubflowEvent, SubflowInfo};

    use super::*;

    fn hooks(config: &ThrottleConfig, metrics: Arc<Metrics>) -> ThrottleMetrics {
        ThrottleMetrics {
            metrics,
            classes: config.classes.iter().map(|c| c.name.clone()).collect(),
            refusals_seen: BTreeMap::new(),
            subflow_refusals_seen: 0,
            placed: Arc::default(),
            class_counts: BTreeMap::new(),
        }
    }

    fn open(state: &mut ThrottleState, token: u32, client: &str) {
        let mut subflow =
            SubflowInfo::new("10.0.0.1:443".parse().unwrap(), client.parse().unwrap());
        subflow.interface.name = Some("eth1".into());
        state.handle_event(
            Instant::now(),
            SubflowEvent::ConnectionCreated {
                token: ConnectionToken(token),
                subflow,
            },
        );
    }

    /// An exhausted per-subscriber class limit shows in the metrics: the refusals counter of the
    /// template, the class count at its limit, the waiting connection; counted once per refusal.
    #[test]
    fn class_limit_refusals_are_counted_per_template() {
        let config = ThrottleConfig::from_toml_str(
            r#"
            [[classes]]
            name = "path1"
            interface = "eth1"
            rate = "10mbit"
            scope = "client"
            max_clients = 1
            [[rules]]
            class = "path1"
            min_subflows = 1
            "#,
        )
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let mut hooks = hooks(&config, metrics.clone());
        let mut state = ThrottleState::new(config);
        state.poll_changes();
        open(&mut state, 1, "192.0.2.1:1000");
        open(&mut state, 2, "192.0.2.2:1000");
        state.poll_changes();
        hooks.state_applied(&state);
        hooks.state_applied(&state);
        let scale = &metrics.throttle_scale;
        let label = ClassLabel {
            class: "path1".into(),
        };
        assert_eq!(scale.class_limit_refusals.get_or_create(&label).get(), 1);
        assert_eq!(scale.client_classes.get_or_create(&label).get(), 1);
        assert_eq!(scale.waiting_connections.get(), 1);
        assert_eq!(scale.steered_subflows.get(), 1);
    }

    /// The exact percentiles are nearest-rank over the recent installs.
    #[test]
    fn install_percentiles_are_exact() {
        let scale = ScaleMetrics::register(&mut Registry::default());
        for ms in 1..=100 {
            scale.record_install(Duration::from_millis(ms));
        }
        scale.refresh_quantiles();
        let at = |percentile| {
            scale
                .rule_install_recent
                .get_or_create(&PercentileLabel { percentile })
                .get()
        };
        assert_eq!((at("50"), at("90"), at("99")), (0.05, 0.09, 0.099));
    }
}
