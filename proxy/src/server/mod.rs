//! Listeners, connection limits, live reload and graceful shutdown.
//!
//! A configuration reload ([`ReloadHandle::reload`], or SIGHUP with [`Server::reload_on_sighup`]) builds
//! a new [`Shared`] (ACLs, credentials, limits, relay and upstream settings) and swaps it in: every new
//! connection and every new request on a kept-alive connection sees it, running transfers keep going.
//! It also moves the access log, hands a changed throttle policy to the running owner task, restarts
//! the sniffer on new interfaces, and binds or closes listeners. Whatever can fail (binding a new
//! listener, reading credentials, opening the log, starting the sniffer or the throttle) happens before
//! anything is swapped, so a refused configuration leaves the running one untouched.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::{Arc, RwLock};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::access_log::AccessLog;
use crate::acl::{local_addresses, Acl};
use crate::admin::DrainSignal;
use crate::auth::{AuthError, Credentials};
use crate::config::{Config, ConfigError, ConvertConfig, ListenerConfig, ListenerMode};
use crate::http::Shared;
use crate::metrics::{InterfaceMap, Metrics};
use crate::registry::{ConnectionRegistry, SubflowClasses};
use crate::sockets::bind_listener;
use crate::throttle::ThrottleHandle;

mod accept;
mod running;

use running::{log_refused, Running};

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
