//! The tokio owner task: events in, kernel changes out, cleanup on shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::config::{EventSource, MissingPrivileges, PolicyError, ThrottleConfig};
use crate::core::{Change, LiveSubflow, ResyncReport, ThrottleState};
use crate::event::{ConnectionSelector, Destination, SubflowEvent};
use crate::kernel::{InterfaceTable, KernelBackend, KernelError, StaleReport};
use crate::pm_events;
use mptcp_netlink::mptcp_pm::{self, PmError};

/// Why the throttle stopped.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// The policy is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// A kernel operation failed at start or shutdown, including
    /// [`KernelError::MissingPrivileges`] when the policy says to fail.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The kernel event source could not be set up.
    #[error(transparent)]
    EventSource(#[from] PmError),
}

/// Sends events (and request destinations) to the owner task.
#[derive(Debug, Clone)]
pub struct EventSender {
    tx: mpsc::Sender<StampedEvent>,
}

/// An event with the instant it was handed to [`EventSender`]: a rule's install latency runs from
/// there (for kernel events, right after the listener decoded them), so time spent waiting in the
/// channel while the owner task was busy is counted.
#[derive(Debug, Clone, PartialEq)]
pub struct StampedEvent {
    /// When the event was sent.
    pub at: Instant,
    /// The event.
    pub event: SubflowEvent,
}

/// The owner task's end of [`event_channel`].
pub type EventReceiver = mpsc::Receiver<StampedEvent>;

/// The owner task is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("throttle task has stopped")]
pub struct ThrottleStopped;

impl EventSender {
    /// Sends one event; waits while the channel is full.
    pub async fn send(&self, event: SubflowEvent) -> Result<(), ThrottleStopped> {
        let at = Instant::now();
        self.tx
            .send(StampedEvent { at, event })
            .await
            .map_err(|_| ThrottleStopped)
    }

    /// Sends from a non-async thread.
    pub fn blocking_send(&self, event: SubflowEvent) -> Result<(), ThrottleStopped> {
        let at = Instant::now();
        self.tx
            .blocking_send(StampedEvent { at, event })
            .map_err(|_| ThrottleStopped)
    }

    /// Asks the owner task to rebuild the live subflows from the kernel now (as after lost events).
    pub async fn request_resync(&self) -> Result<(), ThrottleStopped> {
        self.send(SubflowEvent::EventsLost).await
    }

    /// Tells the throttle where a connection's request goes, so rules with
    /// `destination*` criteria can match. Select the connection by token or by
    /// the accepted socket's (local, peer) addresses.
    pub async fn attach_destination(
        &self,
        connection: ConnectionSelector,
        destination: Destination,
    ) -> Result<(), ThrottleStopped> {
        self.send(SubflowEvent::DestinationAttached {
            connection,
            destination,
        })
        .await
    }
}

/// A channel for [`run`]: give the receiver to `run`, clone the sender freely.
pub fn event_channel(capacity: usize) -> (EventSender, EventReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (EventSender { tx }, rx)
}

/// Sends a new policy to a running owner task (a configuration reload). The task diffs the classes and
/// rules of the new policy against what it installed and changes only the difference: running subflows
/// keep their rules unless the policy moves them, and HTB classes are changed in place.
#[derive(Debug, Clone)]
pub struct PolicySender {
    tx: tokio::sync::watch::Sender<ThrottleConfig>,
}

/// The owner task's end of a [`PolicySender`].
#[derive(Debug)]
pub struct PolicyReceiver {
    rx: tokio::sync::watch::Receiver<ThrottleConfig>,
}

impl PolicySender {
    /// Hands `config` to the owner task. It must be valid ([`ThrottleConfig::validate`]) and keep what
    /// only a restart can change ([`ThrottleConfig::needs_restart`]); the task refuses it otherwise and
    /// keeps the policy it has.
    pub fn send(&self, config: ThrottleConfig) -> Result<(), ThrottleStopped> {
        self.tx.send(config).map_err(|_| ThrottleStopped)
    }
}

/// A channel for [`run_with_policy_updates`], starting at the policy the task starts with.
pub fn policy_channel(initial: &ThrottleConfig) -> (PolicySender, PolicyReceiver) {
    let (tx, mut rx) = tokio::sync::watch::channel(initial.clone());
    rx.mark_unchanged();
    (PolicySender { tx }, PolicyReceiver { rx })
}

impl PolicyReceiver {
    /// The next policy sent; pending forever once every sender is gone.
    async fn changed(&mut self) -> ThrottleConfig {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.rx.borrow_and_update().clone()
    }
}

/// The thread reading `mptcp_pm` events; stops when dropped.
#[derive(Debug)]
pub struct KernelEventListener {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl KernelEventListener {
    /// Stops reading events until [`Self::resume`]: the kernel queues them in the socket, and drops
    /// what does not fit (the next read then fails with `ENOBUFS`, which asks for a resync). For tests
    /// and drills that lose events on purpose.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Reads events again after [`Self::pause`].
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Stops the thread and waits for it (at most ~250 ms).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for KernelEventListener {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Sets the calling thread's scheduling priority (`nice`, -20 highest to 19), best effort: without
/// `CAP_SYS_NICE` a raise is refused and the thread keeps its priority (logged at debug level). The
/// event listener runs at -10, so that a loaded machine does not let its socket overflow; embedding
/// programs may do the same for the owner task.
pub fn raise_thread_priority(nice: i32) {
    // SAFETY: gettid has no preconditions; setpriority on our own thread id only changes its nice.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            nice,
            "could not raise the thread's priority"
        );
    }
}

/// The control threads' nice value when they do not run as real-time threads.
const CONTROL_NICE: i32 = -10;

/// Schedules the calling thread as one of the throttle's control threads (the event listener, the
/// owner task): `SCHED_RR` at `realtime_priority` (1..=99), or with 0, or where the kernel refuses it
/// (no `CAP_SYS_NICE`), nice -10 (see [`raise_thread_priority`]). See
/// [`ThrottleConfig::realtime_priority`] for why.
pub fn set_control_thread_scheduling(realtime_priority: u8) {
    if realtime_priority > 0 {
        let param = libc::sched_param {
            sched_priority: i32::from(realtime_priority.min(99)),
        };
        // SAFETY: pid 0 is the calling thread; param is a valid sched_param for the call.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) } == 0 {
            return;
        }
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            realtime_priority,
            "could not make the throttle's thread SCHED_RR (needs CAP_SYS_NICE and a real-time budget; \
             throttle.realtime_priority = 0 turns it off); it runs at nice {CONTROL_NICE}, rule installs \
             may wait for a CPU"
        );
    }
    raise_thread_priority(CONTROL_NICE);
}

/// Subscribes to the kernel's `mptcp_pm_events` in the calling thread's
/// network namespace and forwards decoded events to `events` from a
/// dedicated thread. Needs `CAP_NET_ADMIN`.
pub fn spawn_kernel_events(events: EventSender) -> Result<KernelEventListener, PmError> {
    spawn_kernel_events_with_buffer(events, None)
}

/// [`spawn_kernel_events`] with the event socket's receive buffer set to `receive_buffer` bytes (the
/// kernel doubles it for bookkeeping); a small one makes losing events easy to provoke in tests.
pub fn spawn_kernel_events_with_buffer(
    events: EventSender,
    receive_buffer: Option<usize>,
) -> Result<KernelEventListener, PmError> {
    spawn_kernel_events_with_options(events, receive_buffer, default_realtime_priority())
}

/// The default of [`ThrottleConfig::realtime_priority`].
fn default_realtime_priority() -> u8 {
    ThrottleConfig::default().realtime_priority
}

/// [`spawn_kernel_events_with_buffer`] with the listener thread scheduled at `realtime_priority`
/// (see [`set_control_thread_scheduling`]).
pub fn spawn_kernel_events_with_options(
    events: EventSender,
    receive_buffer: Option<usize>,
    realtime_priority: u8,
) -> Result<KernelEventListener, PmError> {
    let (socket, family) = mptcp_pm::open_event_socket()?;
    let family_id = family.id;
    socket
        .set_recv_timeout(Duration::from_millis(250))
        .map_err(PmError::Socket)?;
    if let Some(bytes) = receive_buffer {
        socket
            .set_recv_buffer_force(bytes)
            .map_err(PmError::Socket)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flag = stop.clone();
    let paused = Arc::new(AtomicBool::new(false));
    let paused_flag = paused.clone();
    let thread = std::thread::Builder::new()
        .name("mptcp-pm-events".into())
        .spawn(move || {
            set_control_thread_scheduling(realtime_priority);
            while !stop_flag.load(Ordering::SeqCst) {
                if paused_flag.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                let forward = |messages: Vec<mptcp_netlink::Message>| {
                    for message in messages {
                        if message.msg_type != family_id {
                            continue;
                        }
                        if let Some(event) = pm_events::decode_event(&message.payload) {
                            if events.blocking_send(event).is_err() {
                                return false;
                            }
                        }
                    }
                    true
                };
                match socket.recv() {
                    Ok(messages) => {
                        if !forward(messages) {
                            return;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        tracing::warn!(
                            "mptcp_pm event socket overflowed; events were lost: resyncing from the kernel"
                        );
                        // The kernel reports one ENOBUFS per overflow and keeps dropping until the
                        // queue is empty: read what is queued first, so the resync comes after the
                        // last event lost.
                        loop {
                            match socket.recv_pending() {
                                Ok(messages) => {
                                    if !forward(messages) {
                                        return;
                                    }
                                    break;
                                }
                                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                                Err(e) => {
                                    tracing::error!(error = %e, "mptcp_pm event socket failed");
                                    return;
                                }
                            }
                        }
                        if events.blocking_send(SubflowEvent::EventsLost).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "mptcp_pm event socket failed");
                        return;
                    }
                }
            }
        })
        .map_err(PmError::Socket)?;
    Ok(KernelEventListener {
        stop,
        paused,
        thread: Some(thread),
    })
}

/// Starts the event source the policy names: the kernel listener for
/// `event_source = "kernel"`, nothing for `"sniffer"` (the embedding program
/// sends events itself). Nothing is started for a disabled or empty policy,
/// and without `CAP_NET_ADMIN` when `on_missing_privileges = "run_unthrottled"`.
pub fn start_event_source(
    config: &ThrottleConfig,
    events: EventSender,
) -> Result<Option<KernelEventListener>, PmError> {
    let active = config.enabled && !(config.classes.is_empty() && config.rules.is_empty());
    if !active || config.event_source != crate::config::EventSource::Kernel {
        return Ok(None);
    }
    if !crate::kernel::has_net_admin()
        && config.on_missing_privileges == MissingPrivileges::RunUnthrottled
    {
        tracing::warn!("no CAP_NET_ADMIN: not listening to mptcp_pm events");
        return Ok(None);
    }
    spawn_kernel_events_with_options(events, None, config.realtime_priority).map(Some)
}

/// Observers of the owner task (metrics).
pub trait ThrottleHooks: Send {
    /// A subflow rule was installed, `latency` after the event that made it
    /// match was handled (measured to the kernel's batch ack).
    fn rule_installed(&mut self, latency: Duration) {
        let _ = latency;
    }

    /// A change could not be applied; it is retried at the next event.
    fn change_failed(&mut self, change: &Change, error: &KernelError) {
        let _ = (change, error);
    }

    /// These changes were applied (the failed ones are reported to [`Self::change_failed`]): for
    /// observers that keep their own view up to date at a cost per change, not per subflow.
    fn changes_applied(&mut self, applied: &[&Change]) {
        let _ = applied;
    }

    /// Changes were applied; `state.installed()` is what the kernel now holds. Called after every
    /// batch: walking every installed rule here costs per event what the packet path saves.
    fn state_applied(&mut self, state: &ThrottleState) {
        let _ = state;
    }

    /// The live subflows were rebuilt from the kernel and the difference applied, in `took`.
    fn resynced(&mut self, reason: ResyncReason, report: &ResyncReport, took: Duration) {
        let _ = (reason, report, took);
    }

    /// A new policy was accepted; its changes are applied next.
    fn policy_changed(&mut self, config: &ThrottleConfig) {
        let _ = config;
    }
}

/// Why the live subflows were rebuilt from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResyncReason {
    /// At start: connections opened before the throttle (or its restart) get their rules.
    Start,
    /// The event source lost events (or a resync was requested).
    EventsLost,
    /// `resync_interval` passed.
    Periodic,
}

impl ResyncReason {
    /// A label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::Start => "start",
            ResyncReason::EventsLost => "events_lost",
            ResyncReason::Periodic => "periodic",
        }
    }
}

/// Hooks that do nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoHooks;

impl ThrottleHooks for NoHooks {}

/// What a kernel-facing backend must do; [`KernelBackend`] is the real one.
pub trait ThrottleBackend {
    /// Removes stale state and prepares (idempotent).
    fn start(&mut self) -> Result<StaleReport, KernelError>;
    /// Interface names by index and by local address.
    fn interfaces(&mut self) -> Result<InterfaceTable, KernelError>;
    /// Applies changes; returns those that failed.
    fn apply(&mut self, changes: &[Change]) -> Vec<(Change, KernelError)>;
    /// Removes everything installed.
    fn shutdown(&mut self) -> Result<StaleReport, KernelError>;
    /// The interface index the kernel routes `remote` through from `local`, where it can tell.
    fn route_interface(&mut self, local: IpAddr, remote: IpAddr) -> Option<u32> {
        let _ = (local, remote);
        None
    }
    /// Every live MPTCP subflow, for a resync; `Ok(None)` where the backend cannot list them.
    fn live_subflows(&mut self) -> Result<Option<Vec<LiveSubflow>>, KernelError> {
        Ok(None)
    }
}

impl ThrottleBackend for KernelBackend {
    fn start(&mut self) -> Result<StaleReport, KernelError> {
        KernelBackend::start(self)
    }
    fn interfaces(&mut self) -> Result<InterfaceTable, KernelError> {
        KernelBackend::interfaces(self)
    }
    fn apply(&mut self, changes: &[Change]) -> Vec<(Change, KernelError)> {
        KernelBackend::apply(self, changes)
    }
    fn shutdown(&mut self) -> Result<StaleReport, KernelError> {
        KernelBackend::shutdown(self)
    }
    fn route_interface(&mut self, local: IpAddr, remote: IpAddr) -> Option<u32> {
        KernelBackend::route_interface(self, local, remote)
            .ok()
            .flatten()
    }
    fn live_subflows(&mut self) -> Result<Option<Vec<LiveSubflow>>, KernelError> {
        KernelBackend::live_subflows(self).map(Some)
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Whether kernel throttling was active (false: disabled, empty policy,
    /// or no privileges with `run_unthrottled`).
    pub throttled: bool,
    /// Events handled.
    pub events: u64,
    /// Changes applied successfully.
    pub changes_applied: u64,
    /// Changes that failed.
    pub changes_failed: u64,
    /// Subflow rules installed.
    pub rules_installed: u64,
    /// Longest event-to-ack latency of a rule install.
    pub max_install_latency: Duration,
    /// Stale state removed at start.
    pub stale_at_start: StaleReport,
    /// Resyncs from the kernel (at start, after lost events, periodic).
    pub resyncs: u64,
    /// Subflow placements a per-client class limit (`max_clients`) refused.
    pub refused_class_limit: u64,
    /// Subflows `max_steered_subflows` left unsteered.
    pub refused_subflow_limit: u64,
}

/// When the last limit warning was logged (milliseconds since the Unix epoch): at most one every 10 s.
static LAST_LIMIT_WARNING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Logs that a limit left subflows unsteered (rate-limited), naming the limit and the classes.
fn warn_limits(state: &ThrottleState, summary: &mut RunSummary) {
    let stats = state.stats();
    let (class_new, subflow_new) = (
        stats.refused_class_limit - summary.refused_class_limit.min(stats.refused_class_limit),
        stats.refused_subflow_limit
            - summary
                .refused_subflow_limit
                .min(stats.refused_subflow_limit),
    );
    summary.refused_class_limit = stats.refused_class_limit;
    summary.refused_subflow_limit = stats.refused_subflow_limit;
    if class_new == 0 && subflow_new == 0 {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let last = LAST_LIMIT_WARNING.load(Ordering::Relaxed);
    if now.saturating_sub(last) < 10_000
        || LAST_LIMIT_WARNING
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    if class_new > 0 {
        let full: Vec<String> = state
            .config()
            .classes
            .iter()
            .filter(|c| c.scope == crate::config::ClassScope::Client)
            .map(|c| {
                let used = state
                    .client_class_counts()
                    .get(&c.name)
                    .copied()
                    .unwrap_or(0);
                format!("{} ({used} classes, max_clients {})", c.name, c.max_clients)
            })
            .collect();
        tracing::warn!(
            refused = class_new,
            classes = %full.join(", "),
            "per-client class limit reached: subflows of new subscribers are not steered until a subscriber's last subflow closes (raise max_clients)"
        );
    }
    if subflow_new > 0 {
        tracing::warn!(
            refused = subflow_new,
            max_steered_subflows = state.config().max_steered_subflows,
            "steered subflow limit reached: new subflows are not steered until others close (raise max_steered_subflows)"
        );
    }
}

async fn drain_until<F: Future<Output = ()>>(mut events: EventReceiver, shutdown: F) -> u64 {
    tokio::pin!(shutdown);
    let mut count = 0;
    loop {
        tokio::select! {
            _ = &mut shutdown => return count,
            event = events.recv() => match event {
                Some(_) => count += 1,
                None => {
                    shutdown.await;
                    return count;
                }
            }
        }
    }
}

/// Runs the throttle until `shutdown` completes, then removes everything it
/// installed. Events come from `events` (see [`event_channel`],
/// [`spawn_kernel_events`]). Netlink calls are blocking but short; spawn this
/// on a multi-threaded runtime.
pub async fn run<F: Future<Output = ()>>(
    config: ThrottleConfig,
    events: EventReceiver,
    shutdown: F,
) -> Result<RunSummary, ThrottleError> {
    run_with_hooks(config, events, shutdown, NoHooks).await
}

/// [`run`] with metrics hooks.
pub async fn run_with_hooks<F: Future<Output = ()>, H: ThrottleHooks>(
    config: ThrottleConfig,
    events: EventReceiver,
    shutdown: F,
    hooks: H,
) -> Result<RunSummary, ThrottleError> {
    run_with_policy_updates(config, events, None, shutdown, hooks).await
}

/// [`run_with_hooks`] that also takes new policies from `policies` while it runs (see
/// [`PolicySender`]). A policy that [`ThrottleConfig::needs_restart`] against the running one is
/// refused with a log line: stop this task and start another for it.
pub async fn run_with_policy_updates<F: Future<Output = ()>, H: ThrottleHooks>(
    config: ThrottleConfig,
    events: EventReceiver,
    policies: Option<PolicyReceiver>,
    shutdown: F,
    hooks: H,
) -> Result<RunSummary, ThrottleError> {
    config.validate()?;
    let active = config.enabled && !(config.classes.is_empty() && config.rules.is_empty());
    if !active {
        let events = drain_until(events, shutdown).await;
        return Ok(RunSummary {
            events,
            ..RunSummary::default()
        });
    }
    let backend = match KernelBackend::open(&config) {
        Ok(backend) => backend,
        Err(KernelError::MissingPrivileges)
            if config.on_missing_privileges == MissingPrivileges::RunUnthrottled =>
        {
            tracing::warn!("no CAP_NET_ADMIN: running without subflow throttling");
            let events = drain_until(events, shutdown).await;
            return Ok(RunSummary {
                events,
                ..RunSummary::default()
            });
        }
        Err(e) => return Err(e.into()),
    };
    run_owner(config, events, policies, shutdown, backend, hooks).await
}

/// Route lookups of the last second, by (local, remote) address: a burst of connections from the same
/// clients asks the kernel once.
#[derive(Debug, Default)]
struct RouteCache {
    routes: HashMap<(IpAddr, IpAddr), (Option<u32>, Instant)>,
}

impl RouteCache {
    const TTL: Duration = Duration::from_secs(1);
    const MAX: usize = 1 << 16;

    fn lookup<B: ThrottleBackend>(
        &mut self,
        backend: &mut B,
        local: IpAddr,
        remote: IpAddr,
    ) -> Option<u32> {
        let now = Instant::now();
        if let Some((index, at)) = self.routes.get(&(local, remote)) {
            if now.duration_since(*at) < Self::TTL {
                return *index;
            }
        }
        if self.routes.len() >= Self::MAX {
            self.routes
                .retain(|_, (_, at)| now.duration_since(*at) < Self::TTL);
        }
        let index = backend.route_interface(local, remote);
        self.routes.insert((local, remote), (index, now));
        index
    }
}

/// Fills in the interface of a subflow the event source could not name (the kernel's events carry
/// no `if_idx` for accepted subflows) from the route towards the client.
fn route_subflow<B: ThrottleBackend>(
    backend: &mut B,
    routes: &mut RouteCache,
    event: &mut SubflowEvent,
) {
    let subflow = match event {
        SubflowEvent::ConnectionCreated { subflow, .. }
        | SubflowEvent::ConnectionEstablished { subflow, .. }
        | SubflowEvent::SubflowEstablished { subflow, .. } => subflow,
        _ => return,
    };
    if subflow.interface.name.is_some() || subflow.interface.index.is_some_and(|i| i != 0) {
        return;
    }
    let tuple = subflow.tuple;
    if let Some(index) = routes.lookup(backend, tuple.local.ip(), tuple.remote.ip()) {
        subflow.interface.index = Some(index);
    }
}

fn refresh_interfaces<B: ThrottleBackend>(backend: &mut B, state: &mut ThrottleState) {
    match backend.interfaces() {
        Ok(table) => {
            for (index, name) in table.links {
                state.set_interface_name(index, &name);
            }
            for (addr, name) in table.addresses {
                state.set_interface_address(addr, &name);
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not list interfaces"),
    }
}

fn apply_pending<B: ThrottleBackend, H: ThrottleHooks>(
    state: &mut ThrottleState,
    backend: &mut B,
    hooks: &mut H,
    summary: &mut RunSummary,
) {
    let changes = state.poll_changes();
    warn_limits(state, summary);
    if changes.is_empty() {
        return;
    }
    let applying = Instant::now();
    let failures = backend.apply(&changes);
    let acked = Instant::now();
    tracing::trace!(changes = changes.len(), took = ?acked - applying, "applied");
    summary.changes_failed += failures.len() as u64;
    summary.changes_applied += (changes.len() - failures.len()) as u64;
    let applied: Vec<&Change> = changes
        .iter()
        .filter(|change| !failures.iter().any(|(failed, _)| failed == *change))
        .collect();
    for change in &applied {
        if let Change::AddRule { triggered_at, .. } = change {
            summary.rules_installed += 1;
            if let Some(at) = triggered_at {
                let latency = acked.saturating_duration_since(*at);
                summary.max_install_latency = summary.max_install_latency.max(latency);
                hooks.rule_installed(latency);
            }
        }
    }
    hooks.changes_applied(&applied);
    for (change, error) in failures {
        tracing::warn!(?change, error = %error, "throttle change failed");
        hooks.change_failed(&change, &error);
        state.change_failed(&change);
    }
    hooks.state_applied(state);
}

/// Rebuilds the live subflows from the kernel, looks up the route of subflows it added, and applies the
/// difference.
fn resync<B: ThrottleBackend, H: ThrottleHooks>(
    state: &mut ThrottleState,
    backend: &mut B,
    hooks: &mut H,
    summary: &mut RunSummary,
    reason: ResyncReason,
) {
    let started = Instant::now();
    let live = match backend.live_subflows() {
        Ok(Some(live)) => live,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(%error, reason = reason.as_str(), "could not list the kernel's subflows; resync skipped");
            return;
        }
    };
    let listed = live.len();
    let report = state.resync(started, live);
    let mut routes: HashMap<(IpAddr, IpAddr), Option<u32>> = HashMap::new();
    for tuple in state.subflows_without_interface() {
        let (local, remote) = (tuple.local.ip(), tuple.remote.ip());
        let index = *routes
            .entry((local, remote))
            .or_insert_with(|| backend.route_interface(local, remote));
        if let Some(index) = index {
            state.set_subflow_interface(&tuple, index);
        }
    }
    apply_pending(state, backend, hooks, summary);
    summary.resyncs += 1;
    let took = started.elapsed();
    if report.is_empty() {
        tracing::debug!(
            reason = reason.as_str(),
            subflows = listed,
            ?took,
            "resync: events and kernel agree"
        );
    } else {
        tracing::info!(
            reason = reason.as_str(),
            subflows = listed,
            ?report,
            ?took,
            "resync repaired the subflow table"
        );
    }
    hooks.resynced(reason, &report, took);
}

/// [`run`] with an explicit backend (tests use a recording one).
pub async fn run_with_backend<F, B, H>(
    config: ThrottleConfig,
    events: EventReceiver,
    shutdown: F,
    backend: B,
    hooks: H,
) -> Result<RunSummary, ThrottleError>
where
    F: Future<Output = ()>,
    B: ThrottleBackend,
    H: ThrottleHooks,
{
    run_owner(config, events, None, shutdown, backend, hooks).await
}

/// [`run_with_backend`] taking new policies from `policies`, as [`run_with_policy_updates`] does.
pub async fn run_with_backend_and_policies<F, B, H>(
    config: ThrottleConfig,
    events: EventReceiver,
    policies: PolicyReceiver,
    shutdown: F,
    backend: B,
    hooks: H,
) -> Result<RunSummary, ThrottleError>
where
    F: Future<Output = ()>,
    B: ThrottleBackend,
    H: ThrottleHooks,
{
    run_owner(config, events, Some(policies), shutdown, backend, hooks).await
}

/// Checks a policy sent to a running task; `None` to take it, else why not.
fn refuse_policy(running: &ThrottleConfig, new: &ThrottleConfig) -> Option<String> {
    if let Err(error) = new.validate() {
        return Some(error.to_string());
    }
    running
        .needs_restart(new)
        .map(|key| format!("throttle.{key} changed: only a restart of the throttle can apply it"))
}

async fn run_owner<F, B, H>(
    config: ThrottleConfig,
    mut events: EventReceiver,
    mut policies: Option<PolicyReceiver>,
    shutdown: F,
    mut backend: B,
    mut hooks: H,
) -> Result<RunSummary, ThrottleError>
where
    F: Future<Output = ()>,
    B: ThrottleBackend,
    H: ThrottleHooks,
{
    config.validate()?;
    let mut summary = RunSummary {
        throttled: true,
        stale_at_start: backend.start()?,
        ..RunSummary::default()
    };
    // Resync reads the kernel's own sockets: only events from the kernel describe those (the sniffer
    // may see traffic the proxy merely routes).
    let resyncs = config.event_source == EventSource::Kernel;
    let mut periodic = config.resync_interval.filter(|_| resyncs).map(|every| {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    let mut state = ThrottleState::new(config);
    refresh_interfaces(&mut backend, &mut state);
    apply_pending(&mut state, &mut backend, &mut hooks, &mut summary);
    if resyncs {
        resync(
            &mut state,
            &mut backend,
            &mut hooks,
            &mut summary,
            ResyncReason::Start,
        );
    }
    let mut routes = RouteCache::default();
    tokio::pin!(shutdown);
    let mut open = true;
    while open {
        let tick = async {
            match periodic.as_mut() {
                Some(interval) => {
                    interval.tick().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let policy = async {
            match policies.as_mut() {
                Some(policies) => policies.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            () = tick => {
                resync(&mut state, &mut backend, &mut hooks, &mut summary, ResyncReason::Periodic);
            }
            new = policy => {
                match refuse_policy(state.config(), &new) {
                    Some(reason) => tracing::error!(%reason, "new throttle policy refused; the running one stays"),
                    None => {
                        tracing::info!(classes = new.classes.len(), rules = new.rules.len(), "throttle policy changed");
                        hooks.policy_changed(&new);
                        state.set_config(new);
                        refresh_interfaces(&mut backend, &mut state);
                        apply_pending(&mut state, &mut backend, &mut hooks, &mut summary);
                    }
                }
            }
            event = events.recv() => {
                let Some(first) = event else {
                    open = false;
                    continue;
                };
                let mut batch = vec![first];
                while let Ok(more) = events.try_recv() {
                    batch.push(more);
                }
                for stamped in &mut batch {
                    route_subflow(&mut backend, &mut routes, &mut stamped.event);
                }
                tracing::trace!(events = batch.len(), "event batch");
                let unknown_interface = batch.iter().any(|stamped| match &stamped.event {
                    SubflowEvent::ConnectionCreated { subflow, .. }
                    | SubflowEvent::ConnectionEstablished { subflow, .. }
                    | SubflowEvent::SubflowEstablished { subflow, .. } => !state.resolves_interface(subflow),
                    _ => false,
                });
                if unknown_interface {
                    refresh_interfaces(&mut backend, &mut state);
                }
                let mut lost = false;
                for StampedEvent { at, event } in batch {
                    summary.events += 1;
                    lost |= event == SubflowEvent::EventsLost;
                    // The latency of what this event installs starts when it was sent.
                    state.handle_event(at, event);
                }
                if lost && resyncs {
                    resync(&mut state, &mut backend, &mut hooks, &mut summary, ResyncReason::EventsLost);
                } else {
                    if lost {
                        tracing::warn!("the event source lost events; only event_source = \"kernel\" can resync");
                    }
                    apply_pending(&mut state, &mut backend, &mut hooks, &mut summary);
                }
            }
        }
    }
    if !open {
        shutdown.await;
    }
    backend.shutdown()?;
    Ok(summary)
}
