//! The running proxy: its listeners, sniffer and throttle, and live reload (what changed, applied in an
//! order that leaves the running configuration untouched when anything fails).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

use super::accept::{accept_loop, AcceptContext};
use super::{
    bind_admin, bind_one, prepare, BeforeDrain, Listener, LiveShared, ReloadError, ReloadSummary,
    ServerError,
};
use crate::access_log::AccessLog;
use crate::admin::{AdminState, DrainSignal};
use crate::config::{Config, ListenerConfig};
use crate::connection::PerClientCounter;
use crate::http::Shared;
use crate::metrics::{InterfaceMap, Metrics};
use crate::registry::{ConnectionRegistry, SubflowClasses};
use crate::throttle::ThrottleHandle;

pub(super) fn log_refused(origin: &str, error: &ReloadError) {
    match error {
        // A configuration error already names its file.
        ReloadError::Config(error) => tracing::error!(
            "configuration refused, the running one stays: {}",
            mptcp_ops::report::one_line(error)
        ),
        error => tracing::error!("configuration refused, the running one stays: {origin}: {error}"),
    }
}

/// A running accept loop.
pub(super) struct AcceptTask {
    config: ListenerConfig,
    close: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// A running throttle owner task.
struct ThrottleRun {
    config: mptcp_throttle::ThrottleConfig,
    policies: mptcp_throttle::PolicySender,
    events: mptcp_throttle::EventSender,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<mptcp_throttle::RunSummary, mptcp_throttle::ThrottleError>>,
}

impl ThrottleRun {
    fn start(
        config: mptcp_throttle::ThrottleConfig,
        metrics: &Arc<Metrics>,
        classes: &Arc<SubflowClasses>,
        handle: Option<ThrottleHandle>,
    ) -> Result<Self, ServerError> {
        let handle =
            handle.unwrap_or_else(|| ThrottleHandle::with_classes(config.clone(), classes.clone()));
        let (policies, events) = (handle.policies.clone(), handle.events.clone());
        let (stop, stop_rx) = oneshot::channel::<()>();
        let task = handle
            .start(metrics.clone(), async move {
                let _ = stop_rx.await;
            })
            .map_err(|e| ServerError::Throttle(e.to_string()))?;
        Ok(Self {
            config,
            policies,
            events,
            stop,
            task,
        })
    }

    /// Stops the task, which removes everything it installed; returns its error, if any.
    async fn stop(self) -> Option<String> {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(summary)) => {
                tracing::info!(?summary, "throttle removed its qdiscs, classes and rules");
                None
            }
            Ok(Err(error)) => Some(error.to_string()),
            Err(error) => Some(error.to_string()),
        }
    }
}

/// Everything a serving proxy runs, owned by the `serve` task: reloads and shutdown go through it.
pub(super) struct Running {
    live: Arc<LiveShared>,
    metrics: Arc<Metrics>,
    interfaces: Arc<InterfaceMap>,
    pub(super) access_log: AccessLog,
    registry: Arc<ConnectionRegistry>,
    classes: Arc<SubflowClasses>,
    permits: Arc<Semaphore>,
    max_connections: usize,
    /// Tasks taking permits out of the semaphore after max_connections was lowered.
    shrinking: Vec<JoinHandle<()>>,
    per_client: PerClientCounter,
    /// Refusals (403/503) answered at once; beyond, refused connections close at once.
    refusals: Arc<Semaphore>,
    stop_tx: watch::Sender<bool>,
    pub(super) accept: BTreeMap<SocketAddr, AcceptTask>,
    admin_state: Arc<AdminState>,
    admin: Option<(SocketAddr, watch::Sender<bool>, JoinHandle<()>)>,
    sniffer: Option<crate::sniffer::SnifferHandle>,
    throttle: Option<ThrottleRun>,
}

fn feeds_throttle(config: &Config) -> bool {
    config
        .throttle
        .as_ref()
        .is_some_and(|t| t.enabled && t.event_source == mptcp_throttle::EventSource::Sniffer)
}

fn start_sniffer(
    config: &Config,
    metrics: &Arc<Metrics>,
    events: Option<mptcp_throttle::EventSender>,
) -> Result<Option<crate::sniffer::SnifferHandle>, ServerError> {
    if config.sniffer.interfaces.is_empty() {
        return Ok(None);
    }
    let events = events.filter(|_| feeds_throttle(config));
    crate::sniffer::start(&config.sniffer, metrics.clone(), events)
        .map(Some)
        .map_err(|e| ServerError::Sniffer(e.to_string()))
}

/// The top-level sections whose values differ.
fn changed_sections(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    let mut check = |name: &str, differs: bool| {
        if differs {
            changed.push(name.to_owned());
        }
    };
    check("listener", old.listeners != new.listeners);
    check("upstream", old.upstream != new.upstream);
    check("limits", old.limits != new.limits);
    check("acl", old.acl != new.acl);
    check("auth", old.auth != new.auth);
    check("access_log", old.access_log != new.access_log);
    check("relay", old.relay != new.relay);
    check("metrics", old.metrics != new.metrics);
    check("throttle", old.throttle != new.throttle);
    check("sniffer", old.sniffer != new.sniffer);
    check("runtime", old.runtime != new.runtime);
    check("cluster", old.cluster != new.cluster);
    changed
}

impl Running {
    pub(super) fn start(
        shared: Arc<Shared>,
        listeners: Vec<Listener>,
        admin: Option<TcpListener>,
        throttle: Option<ThrottleHandle>,
        (registry, classes): (Arc<ConnectionRegistry>, Arc<SubflowClasses>),
        drain: DrainSignal,
        admin_extension: Option<Arc<dyn crate::admin::AdminExtension>>,
    ) -> Result<Self, ServerError> {
        let metrics = shared.metrics.clone();
        let sniffer = start_sniffer(&shared.config, &metrics, shared.throttle_events.clone())?;
        let throttle = match throttle {
            Some(handle) => Some(ThrottleRun::start(
                handle.config().clone(),
                &metrics,
                &classes,
                Some(handle),
            )?),
            None => None,
        };
        let max_connections = shared.config.limits.max_connections;
        let (stop_tx, _) = watch::channel(false);
        let admin_state = Arc::new(
            AdminState::new(metrics.clone())
                .with_connections(registry.clone(), shared.interfaces.clone(), classes.clone())
                .with_drain(drain)
                .with_extension(admin_extension),
        );
        let mut running = Running {
            live: Arc::new(LiveShared {
                current: RwLock::new(shared.clone()),
            }),
            metrics,
            interfaces: shared.interfaces.clone(),
            access_log: shared.access_log.clone(),
            registry,
            classes,
            permits: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            shrinking: Vec::new(),
            per_client: PerClientCounter::with_ipv6_prefix(shared.config.limits.client_ipv6_prefix),
            refusals: Arc::new(Semaphore::new(shared.config.limits.max_refusals)),
            stop_tx,
            accept: BTreeMap::new(),
            admin_state,
            admin: None,
            sniffer,
            throttle,
        };
        for listener in listeners {
            running.spawn_accept(listener);
        }
        if let Some(listener) = admin {
            running.spawn_admin(listener);
        }
        Ok(running)
    }

    fn spawn_accept(&mut self, listener: Listener) {
        let (close, closed) = watch::channel(false);
        let config = listener.config.clone();
        let task = tokio::spawn(accept_loop(
            listener,
            self.live.clone(),
            AcceptContext {
                permits: self.permits.clone(),
                per_client: self.per_client.clone(),
                refusals: self.refusals.clone(),
                registry: self.registry.clone(),
            },
            self.stop_tx.subscribe(),
            closed,
        ));
        self.accept.insert(
            config.address,
            AcceptTask {
                config,
                close,
                task,
            },
        );
    }

    fn spawn_admin(&mut self, listener: TcpListener) {
        let address = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0; 4], 0)));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(crate::admin::serve(
            listener,
            self.admin_state.clone(),
            stop_rx,
        ));
        self.admin = Some((address, stop, task));
    }

    /// Resolves with the error when the throttle owner task stops on its own.
    pub(super) async fn throttle_failed(&mut self) -> String {
        let Some(throttle) = self.throttle.as_mut() else {
            return std::future::pending().await;
        };
        let error = match (&mut throttle.task).await {
            Ok(Ok(_)) => "the throttle stopped unexpectedly".to_owned(),
            Ok(Err(error)) => error.to_string(),
            Err(error) => error.to_string(),
        };
        self.throttle = None;
        error
    }

    /// Applies `new`; see the module documentation.
    pub(super) async fn reload(&mut self, new: Config) -> Result<ReloadSummary, ReloadError> {
        mptcp_ops::notify::reloading();
        let result = self.try_reload(new).await;
        mptcp_ops::notify::ready(match &result {
            Ok(_) => "serving; configuration reloaded",
            Err(_) => "serving; the last reload was refused",
        });
        result
    }

    async fn try_reload(&mut self, new: Config) -> Result<ReloadSummary, ReloadError> {
        new.validate("reload")?;
        let old = self.live.current();
        let mut summary = ReloadSummary {
            changed: changed_sections(&old.config, &new),
            needs_restart: Vec::new(),
        };
        if old.config.runtime != new.runtime {
            summary
                .needs_restart
                .push("runtime.worker_threads".to_owned());
        }
        // The per-client counter and the refusal budget are built once, at start.
        for (key, differs) in [
            (
                "limits.client_ipv6_prefix",
                old.config.limits.client_ipv6_prefix != new.limits.client_ipv6_prefix,
            ),
            (
                "limits.max_refusals",
                old.config.limits.max_refusals != new.limits.max_refusals,
            ),
        ] {
            if differs {
                summary.needs_restart.push(key.to_owned());
            }
        }
        if old.config.convert != new.convert {
            // Converters keep their cookie key for the listener's lifetime.
            summary.needs_restart.push("convert".to_owned());
        }
        // The endpoint, the C flag and the announcement belong to the running instance.
        if old.config.cluster != new.cluster {
            summary.needs_restart.push("cluster".to_owned());
        }

        // 1. Everything that can fail, nothing swapped yet.
        let prepared = prepare(&new)?;
        let added: Vec<&ListenerConfig> = new
            .listeners
            .iter()
            .filter(|l| !self.accept.contains_key(&l.address))
            .collect();
        let mut bound = Vec::new();
        for listener in added {
            bound.push(bind_one(listener, &new.convert)?);
        }
        let admin = match new.metrics.address {
            Some(address) if old.config.metrics.address != Some(address) => {
                let reuse = self
                    .admin
                    .as_ref()
                    .is_some_and(|(bound, ..)| *bound == address);
                if reuse {
                    None
                } else {
                    Some(bind_admin(address)?)
                }
            }
            _ => None,
        };
        let access_log_moves = old.config.access_log != new.access_log;
        if access_log_moves {
            // Open the new file now: a log that cannot be opened refuses the reload.
            AccessLog::open(&new.access_log).map_err(|source| ServerError::AccessLog {
                path: new.access_log.path.clone(),
                source,
            })?;
        }
        let old_throttle = old.config.throttle.clone().filter(|t| t.enabled);
        let new_throttle = new.throttle.clone().filter(|t| t.enabled);
        let throttle_restarts = match (&old_throttle, &new_throttle) {
            (None, None) => false,
            (Some(old), Some(new)) => old.needs_restart(new).is_some(),
            _ => true,
        };
        let sniffer_restarts = old.config.sniffer != new.sniffer
            || (throttle_restarts && (feeds_throttle(&old.config) || feeds_throttle(&new)));

        // 2. The throttle: a policy change goes to the running task; a restart stops it first (only
        // one owner may hold the nft table and qdiscs).
        let mut throttle_events = self.throttle.as_ref().map(|t| t.events.clone());
        if throttle_restarts {
            if let Some(running) = self.throttle.take() {
                if let Some(error) = running.stop().await {
                    tracing::warn!(%error, "the throttle stopped with an error");
                }
            }
            throttle_events = None;
            if let Some(config) = &new_throttle {
                match ThrottleRun::start(config.clone(), &self.metrics, &self.classes, None) {
                    Ok(run) => {
                        throttle_events = Some(run.events.clone());
                        self.throttle = Some(run);
                    }
                    Err(error) => {
                        tracing::error!(%error, "the new throttle policy could not start; running unthrottled");
                        summary.needs_restart.push(format!("throttle ({error})"));
                    }
                }
            }
        } else if let (Some(running), Some(config)) = (self.throttle.as_mut(), &new_throttle) {
            if running.config != *config {
                running
                    .policies
                    .send(config.clone())
                    .map_err(|_| ReloadError::Refused {
                        key: "throttle".into(),
                        reason: "the throttle task has stopped".into(),
                    })?;
                running.config = config.clone();
            }
        }
        let sniffer = if sniffer_restarts {
            match start_sniffer(&new, &self.metrics, throttle_events.clone()) {
                Ok(sniffer) => Some(sniffer),
                Err(error) => {
                    // Keep capturing as before rather than lose the sniffer.
                    tracing::error!(%error, "the sniffer could not restart; it keeps its old interfaces");
                    summary.needs_restart.push(format!("sniffer ({error})"));
                    None
                }
            }
        } else {
            None
        };

        // 3. Swap.
        if access_log_moves {
            if let Err(error) = self.access_log.reconfigure(&new.access_log) {
                tracing::error!(%error, "moving the access log failed; it stays where it was");
            }
        } else if let Err(error) = self.access_log.reopen() {
            tracing::warn!(%error, "reopening the access log failed");
        }
        self.resize(new.limits.max_connections);
        let changed_listeners: Vec<ListenerConfig> = new
            .listeners
            .iter()
            .filter(|l| self.accept.get(&l.address).is_some_and(|t| t.config != **l))
            .cloned()
            .collect();
        let gone: Vec<SocketAddr> = self
            .accept
            .keys()
            .filter(|address| !new.listeners.iter().any(|l| l.address == **address))
            .copied()
            .collect();
        self.live.replace(Arc::new(Shared {
            config: new.clone(),
            acl: prepared.acl,
            connector: prepared.connector,
            credentials: prepared.credentials,
            access_log: self.access_log.clone(),
            metrics: self.metrics.clone(),
            interfaces: self.interfaces.clone(),
            throttle_events,
            client_limiters: prepared.client_limiters,
        }));
        for address in gone {
            if let Some(task) = self.accept.remove(&address) {
                let _ = task.close.send(true);
                let _ = task.task.await;
                tracing::info!(%address, "listener closed; its connections go on");
            }
        }
        for listener in bound {
            self.spawn_accept(listener);
        }
        // Same address, other options: the old socket must go before the new one can bind.
        for listener in changed_listeners {
            let Some(old_task) = self.accept.remove(&listener.address) else {
                continue;
            };
            let _ = old_task.close.send(true);
            let _ = old_task.task.await;
            match bind_one(&listener, &new.convert).or_else(|error| {
                tracing::error!(%error, "rebinding the changed listener failed; restoring the old one");
                bind_one(&old_task.config, &new.convert)
            }) {
                Ok(bound) => self.spawn_accept(bound),
                Err(error) => tracing::error!(%error, "the listener could not be restored"),
            }
        }
        if old.config.metrics.address != new.metrics.address {
            let keep = self
                .admin
                .as_ref()
                .is_some_and(|(bound, ..)| Some(*bound) == new.metrics.address);
            if !keep {
                if let Some((_, stop, task)) = self.admin.take() {
                    let _ = stop.send(true);
                    let _ = task.await;
                }
                if let Some(listener) = admin {
                    self.spawn_admin(listener);
                }
            }
        }
        if let Some(sniffer) = sniffer {
            let old = std::mem::replace(&mut self.sniffer, sniffer);
            if let Some(old) = old {
                let _ = tokio::task::spawn_blocking(move || old.stop()).await;
            }
        }
        tracing::info!(
            changed = ?summary.changed,
            needs_restart = ?summary.needs_restart,
            "configuration reloaded"
        );
        Ok(summary)
    }

    /// Moves the connection limit to `max`: more permits at once; fewer as connections close (new
    /// ones are refused until the count is under the new limit).
    fn resize(&mut self, max: usize) {
        self.shrinking.retain(|task| !task.is_finished());
        if max > self.max_connections {
            self.permits.add_permits(max - self.max_connections);
        } else if max < self.max_connections {
            let excess = u32::try_from(self.max_connections - max).unwrap_or(u32::MAX);
            let permits = self.permits.clone();
            self.shrinking.push(tokio::spawn(async move {
                if let Ok(taken) = permits.acquire_many_owned(excess).await {
                    taken.forget();
                }
            }));
        }
        self.max_connections = max;
    }

    /// Runs the `before_drain` step, stops accepting, drains, stops the admin listener, the sniffer
    /// and the throttle.
    pub(super) async fn stop(
        mut self,
        mut throttle_failure: Option<String>,
        before_drain: Option<BeforeDrain>,
    ) -> Result<(), ServerError> {
        tracing::info!("shutting down: no new connections; draining");
        self.admin_state
            .ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        if let Some(step) = before_drain {
            step.0.await;
        }
        let _ = self.stop_tx.send(true);
        for (_, task) in std::mem::take(&mut self.accept) {
            let _ = task.task.await;
        }
        for task in self.shrinking.drain(..) {
            task.abort();
        }
        let drain_timeout = self.live.current().config.limits.drain_timeout;
        match tokio::time::timeout(drain_timeout, self.registry.wait_empty()).await {
            Ok(()) => tracing::info!("all connections finished"),
            Err(_) => tracing::warn!(
                open = self.registry.len(),
                "drain timeout reached; closing the remaining connections"
            ),
        }
        // The lines of the last requests reach the log before the process exits.
        let log = self.access_log.clone();
        let _ =
            tokio::task::spawn_blocking(move || log.flush(std::time::Duration::from_secs(2))).await;
        if let Some((_, stop, task)) = self.admin.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
        if let Some(sniffer) = self.sniffer.take() {
            sniffer.stop();
        }
        if let Some(throttle) = self.throttle.take() {
            if let Some(error) = throttle.stop().await {
                throttle_failure = Some(error);
            }
        }
        match throttle_failure {
            Some(error) => Err(ServerError::Throttle(error)),
            None => Ok(()),
        }
    }
}
