//! The admin listener: `/metrics` (OpenMetrics text), `/healthz`, `/readyz`, `/connections` (JSON: the
//! open client connections and their subflows now, see [`crate::registry`]), and `POST /drain` (the same
//! drain as SIGTERM; accepted only from the proxy's own host).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::{InterfaceMap, Metrics};
use crate::registry::{ConnectionRegistry, SubflowClasses};

/// The OpenMetrics content type Prometheus negotiates.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, for everything else (curl, promtool).
pub const CLASSIC_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn wants_openmetrics(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// Endpoints an embedding program adds to the admin listener (mpip-proxy's
/// routing profiles). Asked first, for every request.
pub trait AdminExtension: Send + Sync + std::fmt::Debug {
    /// The answer to `method path` if it is one of this extension's
    /// endpoints: status, content type and body.
    fn answer(&self, method: &Method, path: &str) -> Option<(StatusCode, &'static str, String)>;
}

/// What the admin endpoints report.
#[derive(Debug)]
pub struct AdminState {
    /// The metrics to render.
    pub metrics: Arc<Metrics>,
    /// True while the proxy accepts connections; false before and while draining.
    pub ready: AtomicBool,
    connections: Option<ConnectionsView>,
    extension: Option<Arc<dyn AdminExtension>>,
    /// What `POST /drain` triggers; without it the endpoint answers 404.
    drain: Option<DrainSignal>,
}

/// What `/connections` is made from.
#[derive(Debug)]
struct ConnectionsView {
    registry: Arc<ConnectionRegistry>,
    interfaces: Arc<InterfaceMap>,
    classes: Arc<SubflowClasses>,
}

impl AdminState {
    /// Metrics and health only, ready.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            ready: AtomicBool::new(true),
            connections: None,
            extension: None,
            drain: None,
        }
    }

    /// Also serves the endpoints of `extension`.
    pub fn with_extension(mut self, extension: Option<Arc<dyn AdminExtension>>) -> Self {
        self.extension = extension;
        self
    }

    /// Also takes `POST /drain` (from this host), which requests `drain`.
    pub fn with_drain(mut self, drain: DrainSignal) -> Self {
        self.drain = Some(drain);
        self
    }

    /// Also serves `/connections` from a server's table of open connections.
    pub fn with_connections(
        mut self,
        registry: Arc<ConnectionRegistry>,
        interfaces: Arc<InterfaceMap>,
        classes: Arc<SubflowClasses>,
    ) -> Self {
        self.connections = Some(ConnectionsView {
            registry,
            interfaces,
            classes,
        });
        self
    }
}

/// Asks a running server to drain, as SIGTERM does; cheap to clone.
#[derive(Debug, Clone)]
pub struct DrainSignal(Arc<watch::Sender<bool>>);

impl Default for DrainSignal {
    fn default() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }
}

impl DrainSignal {
    /// Requests the drain (idempotent).
    pub fn request(&self) {
        self.0.send_replace(true);
    }

    /// Whether a drain was requested.
    pub fn is_requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once a drain is requested.
    pub async fn requested(&self) {
        let mut requests = self.0.subscribe();
        // The sender lives in `self`, so this only ends with a request.
        let _ = requests.wait_for(|requested| *requested).await;
    }
}

/// Where an admin request came from and arrived: `POST /drain` is taken only from the same host.
#[derive(Debug, Clone, Copy)]
struct Peer {
    remote: Option<SocketAddr>,
    local: Option<SocketAddr>,
}

impl Peer {
    fn is_same_host(&self) -> bool {
        match (self.remote, self.local) {
            (Some(remote), Some(local)) => {
                remote.ip().to_canonical().is_loopback() || remote.ip() == local.ip()
            }
            _ => false,
        }
    }
}

fn answer(request: &Request<Incoming>, state: &AdminState, peer: Peer) -> Response<Full<Bytes>> {
    // An extension's changes (anything but GET), like a drain, only from this host: it is not even
    // asked otherwise, since answering is what changes things.
    let extended = state
        .extension
        .as_ref()
        .filter(|_| request.method() == Method::GET || peer.is_same_host())
        .and_then(|e| e.answer(request.method(), request.uri().path()));
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        _ if extended.is_some() => {
            extended.unwrap_or((StatusCode::NOT_FOUND, "text/plain", String::new()))
        }
        (&Method::POST, "/drain") => match &state.drain {
            Some(_) if !peer.is_same_host() => (
                StatusCode::FORBIDDEN,
                "text/plain",
                "drain only from this host\n".to_owned(),
            ),
            Some(drain) => {
                if !drain.is_requested() {
                    tracing::info!(peer = ?peer.remote, "POST /drain");
                }
                drain.request();
                (StatusCode::ACCEPTED, "text/plain", "draining\n".to_owned())
            }
            None => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found\n".to_owned(),
            ),
        },
        (&Method::GET, "/metrics") if wants_openmetrics(request) => {
            (StatusCode::OK, OPENMETRICS, state.metrics.render())
        }
        (&Method::GET, "/metrics") => {
            (StatusCode::OK, CLASSIC_TEXT, state.metrics.render_classic())
        }
        (&Method::GET, "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        (&Method::GET, "/connections") if state.connections.is_some() => {
            let view = state
                .connections
                .as_ref()
                .map(|v| v.registry.view(&v.interfaces, &v.classes));
            let mut body = view.unwrap_or_default().to_string();
            body.push('\n');
            (StatusCode::OK, "application/json", body)
        }
        (&Method::GET, "/readyz") if state.ready.load(Ordering::Relaxed) => {
            (StatusCode::OK, "text/plain", "ready\n".to_owned())
        }
        (&Method::GET, "/readyz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".to_owned(),
        ),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET, and POST /drain\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

/// Serves the admin endpoints until `stop` turns true.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let state = state.clone();
        let peer = Peer {
            remote: Some(remote),
            local: stream.local_addr().ok(),
        };
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = answer(&request, &state, peer);
                async move { Ok::<_, Infallible>(response) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            let served = builder.serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(60), served).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(remote: &str, local: &str) -> Peer {
        Peer {
            remote: Some(remote.parse().expect("literal")),
            local: Some(local.parse().expect("literal")),
        }
    }

    #[test]
    fn drain_is_taken_only_from_the_same_host() {
        assert!(peer("127.0.0.1:5000", "127.0.0.1:9464").is_same_host());
        assert!(peer("[::1]:5000", "[::1]:9464").is_same_host());
        assert!(peer("[::ffff:127.0.0.1]:5000", "[::ffff:127.0.0.1]:9464").is_same_host());
        assert!(peer("10.2.1.2:5000", "10.2.1.2:9464").is_same_host());
        assert!(!peer("10.2.1.1:5000", "10.2.1.2:9464").is_same_host());
        assert!(!Peer {
            remote: None,
            local: None
        }
        .is_same_host());
    }

    #[tokio::test]
    async fn a_drain_request_wakes_every_waiter_once_and_for_all() {
        let signal = DrainSignal::default();
        assert!(!signal.is_requested());
        let waiter = tokio::spawn({
            let signal = signal.clone();
            async move { signal.requested().await }
        });
        signal.request();
        signal.request();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
        assert!(signal.is_requested());
        // A late waiter returns at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), signal.requested())
            .await
            .expect("already requested");
    }
}
