//! Listeners, connection limits, live reload and graceful shutdown.
//!
//! A configuration reload ([`ReloadHandle::reload`], or SIGHUP with [`Server::reload_on_sighup`]) builds
//! a new [`Shared`] (ACLs, credentials, limits, relay and upstream settings) and swaps it in: every new
//! connection and every new request on a kept-alive connection sees it, running transfers keep going.
//! It also moves the access log, hands a changed throttle policy to the running owner task, restarts
//! the sniffer on new interfaces, and binds or closes listeners. Whatever can fail (binding a new
//! listener, reading credentials, opening the log, starting the sniffer or the throttle) happens before
//! anything is swapped, so a refused configuration leaves the running one untouched.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::access_log::{AccessLog, Entry};
use crate::acl::{local_addresses, Acl};
use crate::admin::{AdminState, DrainSignal};
use crate::auth::{AuthError, Credentials};
use crate::config::{Config, ConfigError, ConvertConfig, ListenerConfig, ListenerMode};
use crate::connection::{ClientConnection, ConnectionContext, PerClientCounter};
use crate::convert::wire::ErrorCode as ConvertError;
use crate::http::{connect_upstream, Shared};
use crate::metrics::{InterfaceMap, Metrics};
use crate::registry::{ConnectionRegistry, SubflowClasses};
use crate::relay::relay;
use crate::sockets::{bind_listener, original_destination, transport_of, Transport};
use crate::throttle::ThrottleHandle;

/// Errors starting the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("listening on {address}: {source}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The access log could not be opened.
    #[error("opening access log {path}: {source}")]
    AccessLog {
        /// The configured path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The credentials file is unusable.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The sniffer could not start capturing.
    #[error("sniffer: {0}")]
    Sniffer(String),
    /// Subflow throttling could not start or failed.
    #[error("throttle: {0}")]
    Throttle(String),
    /// Cluster mode could not start or restore the kernel state.
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
}

impl ServerError {
    /// The configuration key whose value caused the error.
    fn key(&self) -> &'static str {
        match self {
            ServerError::Bind { .. } => "listener.address",
            ServerError::AccessLog { .. } => "access_log.path",
            ServerError::Auth(_) => "auth.credentials_file",
            ServerError::Sniffer(_) => "sniffer.interfaces",
            ServerError::Throttle(_) => "throttle",
            ServerError::Cluster(_) => "cluster",
        }
    }
}

/// Why a reload was refused; the running configuration stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new configuration does not parse or validate.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The new configuration is valid but cannot be applied (a listener cannot be bound, the
    /// credentials file is unreadable, ...).
    #[error("{key}: {reason}")]
    Refused {
        /// The dotted key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The server has stopped.
    #[error("the server has stopped")]
    Stopped,
}

impl From<ServerError> for ReloadError {
    fn from(error: ServerError) -> Self {
        ReloadError::Refused {
            key: error.key().to_owned(),
            reason: error.to_string(),
        }
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// The top-level sections whose values changed (`acl`, `limits`, `throttle`, `listener`...).
    pub changed: Vec<String>,
    /// What could not be applied live and waits for a restart.
    pub needs_restart: Vec<String>,
}

type ReloadRequest = (Config, oneshot::Sender<Result<ReloadSummary, ReloadError>>);

/// Applies new configurations to a running [`Server`]; cheap to clone. mptcp-proxy calls it on SIGHUP
/// ([`Server::reload_on_sighup`]); an embedding program (mpip-proxy's HTTP core) calls it with the
/// configuration it derived from its own file.
#[derive(Debug, Clone)]
pub struct ReloadHandle {
    requests: mpsc::Sender<ReloadRequest>,
}

impl ReloadHandle {
    /// Validates `config` and applies what differs from the running configuration, without dropping
    /// running transfers. On an error nothing changes.
    pub async fn reload(&self, config: Config) -> Result<ReloadSummary, ReloadError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((config, reply))
            .await
            .map_err(|_| ReloadError::Stopped)?;
        answer.await.map_err(|_| ReloadError::Stopped)?
    }
}

/// Where SIGHUP reads the configuration again.
type ConfigSource = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// The [`Shared`] state in force; replaced whole by a reload.
#[derive(Debug)]
pub struct LiveShared {
    current: RwLock<Arc<Shared>>,
}

impl LiveShared {
    /// The state to serve the next connection or request with.
    pub fn current(&self) -> Arc<Shared> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn replace(&self, shared: Arc<Shared>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = shared;
    }
}

/// A bound listener and what it serves.
#[derive(Debug)]
struct Listener {
    socket: TcpListener,
    mptcp: bool,
    config: ListenerConfig,
    /// The RFC 8803 converter of a `convert` listener.
    convert: Option<Arc<crate::convert::Converter>>,
}

/// A proxy with its listeners bound, ready to serve.
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
    admin: Option<TcpListener>,
    throttle: Option<ThrottleHandle>,
    registry: Arc<ConnectionRegistry>,
    classes: Arc<SubflowClasses>,
    reload_tx: mpsc::Sender<ReloadRequest>,
    reload_rx: mpsc::Receiver<ReloadRequest>,
    sighup: Option<(String, ConfigSource)>,
    admin_extension: Option<Arc<dyn crate::admin::AdminExtension>>,
    drain: DrainSignal,
    before_drain: Option<BeforeDrain>,
}

/// What runs between the drain request and the end of accepting (see [`Server::before_drain`]).
struct BeforeDrain(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>);

impl std::fmt::Debug for BeforeDrain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BeforeDrain")
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listeners", &self.listeners)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

/// What a configuration compiles to, before it is swapped in: everything here could fail.
struct Prepared {
    acl: Acl,
    connector: crate::upstream::Connector,
    credentials: Option<Credentials>,
    client_limiters: Option<(
        Arc<mptcp_throttle::ClientRateLimiter>,
        Arc<mptcp_throttle::ClientRateLimiter>,
    )>,
}

fn prepare(config: &Config) -> Result<Prepared, ServerError> {
    let own = local_addresses().unwrap_or_else(|error| {
        tracing::warn!(%error, "cannot list local addresses; deny_own_addresses covers only listeners");
        Vec::new()
    });
    let listener_ips = config.listeners.iter().map(|l| l.address.ip()).collect();
    let acl = Acl::with_listeners(&config.acl, own, listener_ips);
    if config.acl.deny_own_addresses {
        // Addresses added while the proxy runs are protected too (the watcher ends with this Acl).
        if let Err(error) = crate::acl::watch_own_addresses(acl.own_addresses()) {
            tracing::warn!(%error, "cannot watch local addresses; the list read at start stays");
        }
    }
    let connector = crate::upstream::Connector::new(&config.upstream);
    let credentials = config
        .auth
        .as_ref()
        .map(|auth| Credentials::load(&auth.credentials_file, &auth.realm))
        .transpose()?;
    let client_limiters = match config.limits.client_rate {
        None => None,
        Some(rate) => {
            let limiter = || {
                mptcp_throttle::ClientRateLimiter::new(rate, config.limits.client_burst)
                    .map(Arc::new)
                    .map_err(|e| ServerError::Throttle(format!("limits.client_rate: {e}")))
            };
            Some((limiter()?, limiter()?))
        }
    };
    Ok(Prepared {
        acl,
        connector,
        credentials,
        client_limiters,
    })
}

fn bind_one(listener: &ListenerConfig, convert: &ConvertConfig) -> Result<Listener, ServerError> {
    let bind_error = |source| ServerError::Bind {
        address: listener.address,
        source,
    };
    let bound =
        bind_listener(listener.address, listener.mptcp, listener.tproxy).map_err(bind_error)?;
    let convert = match listener.mode {
        ListenerMode::Convert => {
            crate::convert::enable_fastopen(&bound.listener, convert.fastopen_queue)
                .map_err(bind_error)?;
            Some(Arc::new(
                crate::convert::Converter::new(convert).map_err(bind_error)?,
            ))
        }
        _ => None,
    };
    let socket = TcpListener::from_std(bound.listener).map_err(bind_error)?;
    let local = socket.local_addr().map_err(bind_error)?;
    tracing::info!(
        address = %local,
        mode = ?listener.mode,
        transport = if bound.mptcp { "mptcp" } else { "tcp" },
        "listening"
    );
    Ok(Listener {
        socket,
        mptcp: bound.mptcp,
        config: listener.clone(),
        convert,
    })
}

fn bind_admin(address: SocketAddr) -> Result<TcpListener, ServerError> {
    let bind_error = |source| ServerError::Bind { address, source };
    let std_listener = std::net::TcpListener::bind(address).map_err(bind_error)?;
    std_listener.set_nonblocking(true).map_err(bind_error)?;
    let listener = TcpListener::from_std(std_listener).map_err(bind_error)?;
    tracing::info!(address = %listener.local_addr().map_err(bind_error)?, "admin listener (/metrics, /healthz, /readyz, /connections)");
    Ok(listener)
}

/// File descriptors held besides two per connection: listeners, netlink and log files, the runtime.
const FD_HEADROOM: u64 = 256;

/// Raises `RLIMIT_NOFILE` to the hard limit and says, with the numbers, when `max_connections` still
/// does not fit (two descriptors per tunnel plus headroom).
fn check_fd_limit(max_connections: usize) {
    let needed = mptcp_ops::fd_limit::needed_for(max_connections, FD_HEADROOM);
    match mptcp_ops::fd_limit::raise_to_hard() {
        Ok(limit) if limit.soft < needed => tracing::warn!(
            soft = limit.soft,
            hard = limit.hard,
            needed,
            max_connections,
            servable = limit.soft.saturating_sub(FD_HEADROOM) / 2,
            "RLIMIT_NOFILE is below what limits.max_connections needs (two descriptors per tunnel plus \
             {FD_HEADROOM}); raise the hard limit (LimitNOFILE= in the systemd unit, ulimit -Hn) or lower \
             limits.max_connections"
        ),
        Ok(limit) => tracing::debug!(soft = limit.soft, needed, "RLIMIT_NOFILE fits max_connections"),
        Err(error) => tracing::warn!(%error, "cannot read or raise RLIMIT_NOFILE"),
    }
}

impl Server {
    /// Binds every listener and loads ACLs, credentials and the access log. Must run inside tokio.
    pub fn bind(config: Config) -> Result<Self, ServerError> {
        Self::bind_with_metrics(config, Arc::new(Metrics::new()))
    }

    /// [`Server::bind`] exporting into `metrics`, which may carry metrics of an
    /// embedding application ([`Metrics::with_extension`]).
    pub fn bind_with_metrics(config: Config, metrics: Arc<Metrics>) -> Result<Self, ServerError> {
        check_fd_limit(config.limits.max_connections);
        let Prepared {
            acl,
            connector,
            credentials,
            client_limiters,
        } = prepare(&config)?;
        let access_log =
            AccessLog::open_with(&config.access_log, metrics.access_log_dropped.clone()).map_err(
                |source| ServerError::AccessLog {
                    path: config.access_log.path.clone(),
                    source,
                },
            )?;
        let listeners = config
            .listeners
            .iter()
            .map(|listener| bind_one(listener, &config.convert))
            .collect::<Result<Vec<_>, _>>()?;
        let admin = config.metrics.address.map(bind_admin).transpose()?;
        let classes = Arc::new(SubflowClasses::default());
        let throttle = config
            .throttle
            .clone()
            .filter(|t| t.enabled)
            .map(|t| ThrottleHandle::with_classes(t, classes.clone()));
        let (reload_tx, reload_rx) = mpsc::channel(4);
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                acl,
                connector,
                credentials,
                access_log,
                metrics,
                interfaces: Arc::new(InterfaceMap::default()),
                throttle_events: throttle.as_ref().map(|t| t.events.clone()),
                client_limiters,
            }),
            listeners,
            admin,
            throttle,
            registry: Arc::default(),
            classes,
            reload_tx,
            reload_rx,
            sighup: None,
            admin_extension: None,
            drain: DrainSignal::default(),
            before_drain: None,
        })
    }

    /// A handle that drains this server as SIGTERM does (`POST /drain` on the admin listener uses it).
    pub fn drain_signal(&self) -> DrainSignal {
        self.drain.clone()
    }

    /// Runs `step` once a drain starts, before the listeners stop accepting (cluster mode withdraws
    /// its route there and waits for routers to converge). /readyz fails from the drain's start.
    pub fn before_drain(mut self, step: impl Future<Output = ()> + Send + 'static) -> Self {
        self.before_drain = Some(BeforeDrain(Box::pin(step)));
        self
    }

    /// A second descriptor of the listening socket bound to `address`: the kernel keeps the socket,
    /// and accepts MP_JOINs on it, while any descriptor is open, also after the server stops accepting.
    pub fn listener_fd(
        &self,
        address: SocketAddr,
    ) -> Option<std::io::Result<std::os::fd::OwnedFd>> {
        self.listeners
            .iter()
            .find(|l| l.socket.local_addr().ok() == Some(address))
            .map(|l| l.socket.as_fd().try_clone_to_owned())
    }

    /// Serves the endpoints of `extension` on the admin listener too.
    pub fn with_admin_extension(
        mut self,
        extension: Arc<dyn crate::admin::AdminExtension>,
    ) -> Self {
        self.admin_extension = Some(extension);
        self
    }

    /// The admin listener's address, if it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The bound addresses, in configuration order (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.socket.local_addr().ok())
            .collect()
    }

    /// A handle to reload the configuration of this server once it serves.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle {
            requests: self.reload_tx.clone(),
        }
    }

    /// Makes SIGHUP read the configuration again with `source` and apply it (refused with one log
    /// line naming `origin`, the key and the reason if it has an error). Without this, SIGHUP only
    /// reopens the access log; a reload reopens it too.
    pub fn reload_on_sighup(
        mut self,
        origin: impl Into<String>,
        source: impl Fn() -> Result<Config, ConfigError> + Send + Sync + 'static,
    ) -> Self {
        self.sighup = Some((origin.into(), Box::new(source)));
        self
    }

    /// Serves until `shutdown` resolves or a drain is requested ([`Server::drain_signal`]), runs the
    /// [`Server::before_drain`] step, then stops accepting, lets in-flight requests and tunnels
    /// finish for at most `limits.drain_timeout`, removes what the throttle installed, and returns.
    /// A throttle that fails stops the proxy with its error. Tells systemd (`$NOTIFY_SOCKET`) when it
    /// is ready, reloading and stopping.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Server {
            shared,
            listeners,
            admin,
            throttle,
            registry,
            classes,
            reload_tx,
            mut reload_rx,
            sighup,
            admin_extension,
            drain,
            before_drain,
        } = self;
        drop(reload_tx);
        let mut running = Running::start(
            shared,
            listeners,
            admin,
            throttle,
            (registry, classes),
            drain.clone(),
            admin_extension,
        )?;
        // Signal handlers before READY=1: a manager may send SIGHUP or SIGTERM as soon as it reads it,
        // and their default action ends the process. `termination()` installs its handlers when first
        // polled, so `shutdown` is polled once here.
        let mut hangups =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        tokio::pin!(shutdown);
        let stopped_early = tokio::select! {
            biased;
            () = &mut shutdown => true,
            () = std::future::ready(()) => false,
        };
        mptcp_ops::notify::ready(&format!("serving on {} listener(s)", running.accept.len()));
        let mut throttle_failure = None;
        loop {
            if stopped_early {
                break;
            }
            let hangup = async {
                match hangups.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = drain.requested() => {
                    tracing::info!("drain requested on the admin listener");
                    break;
                }
                error = running.throttle_failed() => {
                    tracing::error!(%error, "throttle failed; shutting down");
                    throttle_failure = Some(error);
                    break;
                }
                Some((config, reply)) = reload_rx.recv() => {
                    let result = running.reload(config).await;
                    let _ = reply.send(result);
                }
                Some(()) = hangup => match &sighup {
                    Some((origin, source)) => {
                        tracing::info!(origin, "SIGHUP: reloading the configuration");
                        match source() {
                            Ok(config) => {
                                if let Err(error) = running.reload(config).await {
                                    log_refused(origin, &error);
                                }
                            }
                            Err(error) => log_refused(origin, &ReloadError::Config(error)),
                        }
                        // logrotate's SIGHUP must move the log even when the new file is refused.
                        if let Err(error) = running.access_log.reopen() {
                            tracing::warn!(%error, "reopening the access log failed");
                        }
                    }
                    None => match running.access_log.reopen() {
                        Ok(()) => tracing::info!("access log reopened"),
                        Err(error) => tracing::warn!(%error, "reopening the access log failed"),
                    },
                },
            }
        }
        mptcp_ops::notify::stopping();
        running.stop(throttle_failure, before_drain).await
    }
}

fn log_refused(origin: &str, error: &ReloadError) {
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
struct AcceptTask {
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
struct Running {
    live: Arc<LiveShared>,
    metrics: Arc<Metrics>,
    interfaces: Arc<InterfaceMap>,
    access_log: AccessLog,
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
    accept: BTreeMap<SocketAddr, AcceptTask>,
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
    fn start(
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
    async fn throttle_failed(&mut self) -> String {
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
    async fn reload(&mut self, new: Config) -> Result<ReloadSummary, ReloadError> {
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
    async fn stop(
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

/// Binds and serves until `shutdown` resolves (or `POST /drain`); with `[cluster]`, in cluster mode.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    run_with(config, shutdown, |server| server).await
}

/// [`run`], with `customize` applied to the bound server before it serves (`mptcp-proxy` adds its
/// SIGHUP reload there).
pub async fn run_with(
    config: Config,
    shutdown: impl Future<Output = ()>,
    customize: impl FnOnce(Server) -> Server,
) -> Result<(), ServerError> {
    if config.cluster.is_some() {
        return crate::cluster::run(config, shutdown, customize).await;
    }
    customize(Server::bind(config)?).serve(shutdown).await
}

/// What every accept loop shares besides the [`Shared`] state.
struct AcceptContext {
    permits: Arc<Semaphore>,
    per_client: PerClientCounter,
    refusals: Arc<Semaphore>,
    registry: Arc<ConnectionRegistry>,
}

/// How a refused connection is answered.
enum Refusal {
    /// An HTTP status line and a one-line reason (forward listeners).
    Http(&'static str, &'static str),
    /// An RFC 8803 Error TLV (converters).
    Convert(ConvertError),
}

async fn accept_loop(
    listener: Listener,
    live: Arc<LiveShared>,
    context: AcceptContext,
    mut stop: watch::Receiver<bool>,
    mut closed: watch::Receiver<bool>,
) {
    let AcceptContext {
        permits,
        per_client,
        refusals,
        registry,
    } = context;
    let forward = listener.config.mode == ListenerMode::Forward;
    // How this listener answers a refusal: HTTP status, RFC 8803 Error TLV, or (transparent) nothing.
    let answer = |status_line: &'static str, reason: &'static str, code: ConvertError| {
        if forward {
            Some(Refusal::Http(status_line, reason))
        } else if listener.convert.is_some() {
            Some(Refusal::Convert(code))
        } else {
            None
        }
    };
    // Answers a refused connection from the bounded budget, or closes it at once and counts it.
    let refuse = |metrics: &Metrics, stream: TcpStream, answer: Option<Refusal>| {
        let Some(answer) = answer else {
            return;
        };
        match refusals.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    match answer {
                        Refusal::Http(status_line, reason) => {
                            refuse(stream, status_line, reason).await
                        }
                        Refusal::Convert(code) => crate::convert::refuse(stream, code).await,
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                metrics.refusals_dropped.inc();
                drop(stream);
            }
        }
    };
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.socket.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
            _ = closed.changed() => return,
        };
        // The configuration in force now: a reload applies from the next connection on.
        let shared = live.current();
        let transport = transport_of(stream.as_fd(), listener.mptcp);
        let count = |outcome| shared.metrics.connection(transport.as_str(), outcome);
        if let Err(denied) = shared.acl.check_client(client.ip()) {
            count("denied");
            tracing::info!(%client, "refused: {denied}");
            log_refusal(&shared, transport, client, 403, "TCP_DENIED");
            let reason = "this client is not allowed to use the proxy";
            let answer = answer("403 Forbidden", reason, ConvertError::NotAuthorized);
            refuse(&shared.metrics, stream, answer);
            continue;
        }
        let limits = &shared.config.limits;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            count("over_limit");
            tracing::warn!(%client, "refused: max_connections reached");
            log_refusal(&shared, transport, client, 503, "NONE_NONE");
            let reason = "too many connections";
            let answer = answer(
                "503 Service Unavailable",
                reason,
                ConvertError::ResourceExceeded,
            );
            refuse(&shared.metrics, stream, answer);
            continue;
        };
        let Some(slot) = per_client.acquire(client.ip(), limits.max_connections_per_client) else {
            count("over_limit");
            tracing::warn!(%client, "refused: max_connections_per_client reached");
            log_refusal(&shared, transport, client, 503, "NONE_NONE");
            let reason = "too many connections from this client";
            let answer = answer(
                "503 Service Unavailable",
                reason,
                ConvertError::ResourceExceeded,
            );
            refuse(&shared.metrics, stream, answer);
            continue;
        };
        // A converter sends the upstream SYN before any bookkeeping (RFC 8803: 0-RTT conversion).
        let prefetched = listener
            .convert
            .as_ref()
            .map(|converter| crate::convert::prefetch(&shared, converter, &stream, client.ip()));
        count("accepted");
        let _ = stream.set_nodelay(true);
        let connection = ClientConnection::accepted(
            &stream,
            ConnectionContext {
                client,
                transport,
                permit,
                slot,
                metrics: shared.metrics.clone(),
                interfaces: shared.interfaces.clone(),
                registry: Some(registry.clone()),
            },
        );
        tracing::debug!(%client, transport = transport.as_str(), "accepted");
        if let (Some(converter), Some(prefetched)) = (&listener.convert, prefetched) {
            crate::convert::spawn(
                shared.clone(),
                converter.clone(),
                stream,
                connection,
                prefetched,
            );
        } else if forward {
            tokio::spawn(serve_http(live.clone(), stream, connection, stop.clone()));
        } else {
            tokio::spawn(serve_transparent(
                shared.clone(),
                stream,
                connection,
                listener.config.tproxy,
            ));
        }
    }
}

fn log_refusal(
    shared: &Shared,
    transport: Transport,
    client: SocketAddr,
    status: u16,
    result: &'static str,
) {
    shared.access_log.log(Entry {
        started: SystemTime::now(),
        elapsed: Default::default(),
        client: client.ip(),
        result,
        status,
        bytes: 0,
        method: "-".into(),
        url: "-".into(),
        user: None,
        peer: None,
        content_type: None,
        transport,
        subflows: 1,
    });
}

/// How long a refused connection is held to deliver its answer.
const REFUSAL_HOLD: std::time::Duration = std::time::Duration::from_secs(2);

/// Answers a connection the proxy will not serve, without reading its request.
async fn refuse(mut stream: TcpStream, status_line: &'static str, reason: &'static str) {
    let body = format!("{status_line}: {reason}\n");
    let response = format!(
        "HTTP/1.1 {status_line}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\nVia: 1.1 {}\r\n\r\n{body}",
        body.len(),
        crate::http::VIA_PSEUDONYM
    );
    let _ = tokio::time::timeout(REFUSAL_HOLD, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent, so closing does not reset the answer away.
        let mut sink = tokio::io::sink();
        tokio::io::copy(&mut stream, &mut sink).await
    })
    .await;
}

async fn serve_http(
    live: Arc<LiveShared>,
    stream: TcpStream,
    client: Arc<ClientConnection>,
    stop: watch::Receiver<bool>,
) {
    // Each request takes the configuration in force when it arrives (ACLs, credentials, upstream).
    crate::http::serve_connection(move || live.current(), stream, client, stop).await;
}

async fn serve_transparent(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: Arc<ClientConnection>,
    tproxy: bool,
) {
    let started = Instant::now();
    let mut entry = Entry {
        started: SystemTime::now(),
        elapsed: Default::default(),
        client: client.client.ip(),
        result: "TCP_TUNNEL",
        status: 200,
        bytes: 0,
        method: "CONNECT".into(),
        url: "-".into(),
        user: None,
        peer: None,
        content_type: None,
        transport: client.transport,
        subflows: 1,
    };
    let destination = match original_destination(&stream) {
        Ok(Some(destination)) => destination,
        Ok(None) if tproxy => match stream.local_addr() {
            Ok(local) => local,
            Err(_) => return client.closed(&stream),
        },
        Ok(None) => {
            tracing::info!(client = %client.client, "refused: not a redirected connection");
            return client.closed(&stream);
        }
        Err(error) => {
            tracing::warn!(client = %client.client, %error, "cannot find the original destination");
            return client.closed(&stream);
        }
    };
    entry.url = destination.to_string();
    client.set_upstream(destination.to_string(), destination);
    let stream = Arc::new(stream);
    let host = destination.ip().to_string();
    match connect_upstream(&shared, &host, destination.port()).await {
        Ok((upstream, peer)) => {
            entry.peer = Some(peer.ip());
            let upstream = Arc::new(upstream);
            client.upstream_connected();
            let settings = shared.relay_settings(&client);
            let stats = client
                .sampling_subflows(relay(&stream, &upstream, b"", settings))
                .await
                .unwrap_or_default();
            entry.bytes = stats.download_bytes;
        }
        Err(error) => {
            tracing::info!(client = %client.client, %destination, %error, "transparent connection refused");
            entry.status = error.status().as_u16();
            entry.result = if entry.status == 403 {
                "TCP_DENIED"
            } else {
                "TCP_MISS"
            };
        }
    }
    entry.elapsed = started.elapsed();
    entry.subflows = client.max_subflows();
    shared.access_log.log(entry);
    client.closed(&stream);
}

/// Resolves on SIGTERM or SIGINT: the shutdown future the binaries pass to [`run`].
pub async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
