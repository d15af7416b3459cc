//! Listeners, connection limits and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::access_log::{AccessLog, Entry};
use crate::acl::{local_addresses, Acl};
use crate::admin::AdminState;
use crate::auth::{AuthError, Credentials};
use crate::config::{Config, ListenerConfig, ListenerMode};
use crate::connection::{
    ClientConnection, ClientIo, ConnectionContext, PerClientCounter, SAMPLE_INTERVAL,
};
use crate::convert::wire::ErrorCode as ConvertError;
use crate::http::{connect_upstream, handle, HttpConnection, Shared};
use crate::metrics::{InterfaceMap, Metrics};
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
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
    admin: Option<TcpListener>,
    throttle: Option<ThrottleHandle>,
}

impl Server {
    /// Binds every listener and loads ACLs, credentials and the access log. Must run inside tokio.
    pub fn bind(config: Config) -> Result<Self, ServerError> {
        Self::bind_with_metrics(config, Arc::new(Metrics::new()))
    }

    /// [`Server::bind`] exporting into `metrics`, which may carry metrics of an
    /// embedding application ([`Metrics::with_extension`]).
    pub fn bind_with_metrics(config: Config, metrics: Arc<Metrics>) -> Result<Self, ServerError> {
        let own = local_addresses().unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot list local addresses; deny_own_addresses covers only listeners");
            Vec::new()
        });
        let mut own = own;
        own.extend(config.listeners.iter().map(|l| l.address.ip()));
        let acl = Acl::new(&config.acl, own);
        let credentials = config
            .auth
            .as_ref()
            .map(|auth| Credentials::load(&auth.credentials_file, &auth.realm))
            .transpose()?;
        let access_log =
            AccessLog::open(&config.access_log).map_err(|source| ServerError::AccessLog {
                path: config.access_log.path.clone(),
                source,
            })?;
        let mut listeners = Vec::new();
        for listener in &config.listeners {
            let bind_error = |source| ServerError::Bind {
                address: listener.address,
                source,
            };
            let bound = bind_listener(listener.address, listener.mptcp, listener.tproxy)
                .map_err(bind_error)?;
            let convert = match listener.mode {
                ListenerMode::Convert => {
                    crate::convert::enable_fastopen(&bound.listener, config.convert.fastopen_queue)
                        .map_err(bind_error)?;
                    Some(Arc::new(
                        crate::convert::Converter::new(&config.convert).map_err(bind_error)?,
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
            listeners.push(Listener {
                socket,
                mptcp: bound.mptcp,
                config: listener.clone(),
                convert,
            });
        }
        let admin = match config.metrics.address {
            None => None,
            Some(address) => {
                let bind_error = |source| ServerError::Bind { address, source };
                let std_listener = std::net::TcpListener::bind(address).map_err(bind_error)?;
                std_listener.set_nonblocking(true).map_err(bind_error)?;
                let listener = TcpListener::from_std(std_listener).map_err(bind_error)?;
                tracing::info!(address = %listener.local_addr().map_err(bind_error)?, "admin listener (/metrics, /healthz, /readyz)");
                Some(listener)
            }
        };
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
        let throttle = config
            .throttle
            .clone()
            .filter(|t| t.enabled)
            .map(ThrottleHandle::new);
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                acl,
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
        })
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

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests and tunnels
    /// finish for at most `limits.drain_timeout`, removes what the throttle installed, and returns.
    /// A throttle that fails stops the proxy with its error.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let sniffer = if self.shared.config.sniffer.interfaces.is_empty() {
            None
        } else {
            let feeds_throttle = self.shared.config.throttle.as_ref().is_some_and(|t| {
                t.enabled && t.event_source == mptcp_throttle::EventSource::Sniffer
            });
            let events = self
                .shared
                .throttle_events
                .clone()
                .filter(|_| feeds_throttle);
            Some(
                crate::sniffer::start(
                    &self.shared.config.sniffer,
                    self.shared.metrics.clone(),
                    events,
                )
                .map_err(|e| ServerError::Sniffer(e.to_string()))?,
            )
        };
        let (throttle_stop_tx, throttle_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let mut throttle_task = match self.throttle {
            Some(handle) => Some(
                handle
                    .start(self.shared.metrics.clone(), async move {
                        let _ = throttle_stop_rx.await;
                    })
                    .map_err(|e| ServerError::Throttle(e.to_string()))?,
            ),
            None => None,
        };
        let limits = &self.shared.config.limits;
        let max = limits.max_connections;
        let permits = Arc::new(Semaphore::new(max));
        let per_client = PerClientCounter::default();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut accept_tasks = Vec::new();
        for listener in self.listeners {
            accept_tasks.push(tokio::spawn(accept_loop(
                listener,
                self.shared.clone(),
                permits.clone(),
                per_client.clone(),
                stop_rx.clone(),
            )));
        }
        let reopen = tokio::spawn(reopen_on_sighup(self.shared.clone()));
        let admin_state = Arc::new(AdminState {
            metrics: self.shared.metrics.clone(),
            ready: true.into(),
        });
        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        let admin = self.admin.map(|listener| {
            tokio::spawn(crate::admin::serve(
                listener,
                admin_state.clone(),
                admin_stop_rx,
            ))
        });
        let mut throttle_failure = None;
        match &mut throttle_task {
            Some(task) => tokio::select! {
                () = shutdown => {}
                result = task => {
                    let error = match result {
                        Ok(Ok(_)) => "the throttle stopped unexpectedly".to_owned(),
                        Ok(Err(error)) => error.to_string(),
                        Err(error) => error.to_string(),
                    };
                    tracing::error!(%error, "throttle failed; shutting down");
                    throttle_failure = Some(error);
                    throttle_task = None;
                }
            },
            None => shutdown.await,
        }
        tracing::info!("shutting down: no new connections; draining");
        admin_state
            .ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let _ = stop_tx.send(true);
        for task in accept_tasks {
            let _ = task.await;
        }
        reopen.abort();
        let drained = tokio::time::timeout(
            self.shared.config.limits.drain_timeout,
            permits.acquire_many(u32::try_from(max).unwrap_or(u32::MAX)),
        )
        .await;
        match drained {
            Ok(_) => tracing::info!("all connections finished"),
            Err(_) => tracing::warn!(
                open = max - permits.available_permits(),
                "drain timeout reached; closing the remaining connections"
            ),
        }
        let _ = admin_stop_tx.send(true);
        if let Some(admin) = admin {
            let _ = admin.await;
        }
        if let Some(sniffer) = sniffer {
            sniffer.stop();
        }
        let _ = throttle_stop_tx.send(());
        if let Some(task) = throttle_task {
            match task.await {
                Ok(Ok(summary)) => {
                    tracing::info!(?summary, "throttle removed its qdiscs, classes and rules")
                }
                Ok(Err(error)) => throttle_failure = Some(error.to_string()),
                Err(error) => throttle_failure = Some(error.to_string()),
            }
        }
        match throttle_failure {
            Some(error) => Err(ServerError::Throttle(error)),
            None => Ok(()),
        }
    }
}

/// Binds and serves until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    Server::bind(config)?.serve(shutdown).await
}

async fn reopen_on_sighup(shared: Arc<Shared>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        return;
    };
    while hangups.recv().await.is_some() {
        match shared.access_log.reopen() {
            Ok(()) => tracing::info!("access log reopened"),
            Err(error) => tracing::warn!(%error, "reopening the access log failed"),
        }
    }
}

async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    per_client: PerClientCounter,
    mut stop: watch::Receiver<bool>,
) {
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
        };
        let forward = listener.config.mode == ListenerMode::Forward;
        let transport = transport_of(stream.as_fd(), listener.mptcp);
        let count = |outcome| shared.metrics.connection(transport.as_str(), outcome);
        if let Err(denied) = shared.acl.check_client(client.ip()) {
            count("denied");
            tracing::info!(%client, "refused: {denied}");
            log_refusal(&shared, transport, client, 403, "TCP_DENIED");
            if forward {
                tokio::spawn(refuse(stream, "403 Forbidden", denied.to_string()));
            } else if listener.convert.is_some() {
                tokio::spawn(crate::convert::refuse(stream, ConvertError::NotAuthorized));
            }
            continue;
        }
        let limits = &shared.config.limits;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            count("over_limit");
            tracing::warn!(%client, "refused: max_connections reached");
            log_refusal(&shared, transport, client, 503, "NONE_NONE");
            if forward {
                tokio::spawn(refuse(
                    stream,
                    "503 Service Unavailable",
                    "too many connections".into(),
                ));
            } else if listener.convert.is_some() {
                tokio::spawn(crate::convert::refuse(
                    stream,
                    ConvertError::ResourceExceeded,
                ));
            }
            continue;
        };
        let Some(slot) = per_client.acquire(client.ip(), limits.max_connections_per_client) else {
            count("over_limit");
            tracing::warn!(%client, "refused: max_connections_per_client reached");
            log_refusal(&shared, transport, client, 503, "NONE_NONE");
            if forward {
                tokio::spawn(refuse(
                    stream,
                    "503 Service Unavailable",
                    "too many connections from this client".into(),
                ));
            } else if listener.convert.is_some() {
                tokio::spawn(crate::convert::refuse(
                    stream,
                    ConvertError::ResourceExceeded,
                ));
            }
            continue;
        };
        count("accepted");
        let _ = stream.set_nodelay(true);
        let connection = Arc::new(ClientConnection::new(
            &stream,
            ConnectionContext {
                client,
                transport,
                permit,
                slot,
                metrics: shared.metrics.clone(),
                interfaces: shared.interfaces.clone(),
            },
        ));
        tracing::debug!(%client, transport = transport.as_str(), "accepted");
        if let Some(converter) = &listener.convert {
            tokio::spawn(crate::convert::serve(
                shared.clone(),
                converter.clone(),
                stream,
                connection,
            ));
        } else if forward {
            tokio::spawn(serve_http(shared.clone(), stream, connection, stop.clone()));
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
    shared.access_log.write(&Entry {
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

/// Answers a connection the proxy will not serve, without reading its request.
async fn refuse(mut stream: TcpStream, status_line: &'static str, reason: String) {
    let body = format!("{status_line}: {reason}\n");
    let response = format!(
        "HTTP/1.1 {status_line}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\nVia: 1.1 {}\r\n\r\n{body}",
        body.len(),
        crate::http::VIA_PSEUDONYM
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent, so closing does not reset the answer away.
        let mut sink = tokio::io::sink();
        tokio::io::copy(&mut stream, &mut sink).await
    })
    .await;
}

async fn serve_http(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: Arc<ClientConnection>,
    mut stop: watch::Receiver<bool>,
) {
    let limits = &shared.config.limits;
    let http_connection = Arc::new(HttpConnection::new(client.clone()));
    let io = TokioIo::new(ClientIo::new(
        stream,
        client.clone(),
        limits.max_header_bytes,
    ));
    let service = {
        let shared = shared.clone();
        service_fn(move |request| handle(shared.clone(), http_connection.clone(), request))
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    let connection = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(connection);
    let idle = client.activity.idle(limits.idle_timeout);
    tokio::pin!(idle);
    let mut sample = tokio::time::interval_at(
        tokio::time::Instant::now() + SAMPLE_INTERVAL,
        SAMPLE_INTERVAL,
    );
    let mut draining = *stop.borrow();
    if draining {
        connection.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(client = %client.client, %error, "client connection error");
                }
                return;
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
            () = &mut idle => {
                tracing::debug!(client = %client.client, "idle timeout");
                return;
            }
            _ = sample.tick() => {
                client.subflows();
            }
        }
    }
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
    shared.access_log.write(&entry);
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
