//! The admin listener: `/metrics` (OpenMetrics text), `/healthz`, `/readyz` and `/connections` (JSON: the
//! open client connections and their subflows now, see [`crate::registry`]).

use std::convert::Infallible;
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

/// What the admin endpoints report.
#[derive(Debug)]
pub struct AdminState {
    /// The metrics to render.
    pub metrics: Arc<Metrics>,
    /// True while the proxy accepts connections; false before and while draining.
    pub ready: AtomicBool,
    connections: Option<ConnectionsView>,
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
        }
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

fn answer(request: &Request<Incoming>, state: &AdminState) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
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
            "only GET\n".to_owned(),
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
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = answer(&request, &state);
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
