//! Subflow throttling inside the proxy (seed 002 §2): the `mptcp-throttle` owner task fed by the kernel's
//! `mptcp_pm` events, told each connection's proxied destination, and exported as metrics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use mptcp_throttle::core::ThrottleState;
use mptcp_throttle::{
    Change, ClassDirection, ConnectionSelector, Destination, EventSender, FourTuple, KernelError,
    PolicyReceiver, PolicySender, SubflowEvent, ThrottleConfig, ThrottleHooks,
};
use tokio::sync::mpsc;

use crate::metrics::{ClassLabel, ClassLabels, Metrics};
use crate::registry::SubflowClasses;

/// The throttle's side of the proxy: the event channel and what the owner task needs to start.
#[derive(Debug)]
pub struct ThrottleHandle {
    /// Where subflow events and destinations go.
    pub events: EventSender,
    /// Where a reload sends a new policy (classes and rules) for the running owner task.
    pub policies: PolicySender,
    receiver: mpsc::Receiver<SubflowEvent>,
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
            placed: self.classes.clone(),
        };
        let config = self.config;
        Ok(tokio::spawn(async move {
            let result = mptcp_throttle::run_with_policy_updates(
                config,
                self.receiver,
                Some(self.policy_receiver),
                shutdown,
                hooks,
            )
            .await;
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
    placed: Arc<SubflowClasses>,
}

impl ThrottleHooks for ThrottleMetrics {
    fn rule_installed(&mut self, latency: Duration) {
        self.metrics
            .rule_install_duration
            .observe(latency.as_secs_f64());
    }

    fn change_failed(&mut self, _change: &Change, _error: &KernelError) {
        self.metrics.throttle_change_failures.inc();
    }

    fn policy_changed(&mut self, config: &ThrottleConfig) {
        export_classes(config, &self.metrics);
        self.classes = config.classes.iter().map(|c| c.name.clone()).collect();
    }

    fn state_applied(&mut self, state: &ThrottleState) {
        let mut subflows: BTreeMap<&str, BTreeSet<FourTuple>> = BTreeMap::new();
        let mut placed = HashMap::new();
        for (tuple, rule) in &state.installed().rules {
            for placement in [&rule.download, &rule.upload].into_iter().flatten() {
                subflows
                    .entry(placement.name.as_str())
                    .or_default()
                    .insert(*tuple);
            }
            let names: BTreeSet<&str> = [&rule.download, &rule.upload]
                .into_iter()
                .flatten()
                .map(|p| p.name.as_str())
                .collect();
            if !names.is_empty() {
                let names: Vec<&str> = names.into_iter().collect();
                let canonical = |a: std::net::SocketAddr| {
                    std::net::SocketAddr::new(a.ip().to_canonical(), a.port())
                };
                placed.insert(
                    (canonical(tuple.local), canonical(tuple.remote)),
                    names.join("+"),
                );
            }
        }
        self.placed.replace(placed);
        for class in &self.classes {
            let count = subflows.get(class.as_str()).map_or(0, BTreeSet::len);
            self.metrics
                .class_subflows
                .get_or_create(&ClassLabel {
                    class: class.clone(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }
}
