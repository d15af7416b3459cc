//! The HTTP proxy: absolute-form forwarding and CONNECT tunnels, on hyper 1.x.
//!
//! One [`handle`] call serves one request. Forwarded requests reuse one upstream connection per client
//! connection while the target stays the same (keep-alive on both sides). Every request leaves one
//! access-log line, written when its response body ends.
//!
//! The concerns live in their own modules: [`error`] (answers the proxy gives itself), [`headers`]
//! (hop-by-hop fields, `Via`, framing), [`target`] (absolute-form targets), `forward` (absolute-form
//! requests), `tunnel` (CONNECT) and `body` (the logged response body). Connecting to servers is
//! [`crate::upstream`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::access_log::{AccessLog, Entry};
use crate::acl::Acl;
use crate::auth::Credentials;
use crate::config::Config;
use crate::connection::{ClientConnection, HeadProblem};
use crate::metrics::{CodeLabel, InterfaceMap, KindLabel, Metrics};
use crate::relay::{ClientLimits, RelaySettings};
use mptcp_throttle::ClientRateLimiter;

mod body;
pub mod error;
mod forward;
pub mod headers;
mod request_body;
pub mod target;
mod tunnel;

pub use crate::upstream::connect_upstream;
use body::{head_len, LoggedBody};
use error::empty;
pub use error::{text_response, ProxyError};
use forward::Upstream;
use headers::MaxForwards;
pub use headers::{add_via, check_framing, remove_hop_by_hop};
pub use target::{parse_target, Target};

/// The body type the proxy answers with.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// The `Via` pseudonym (RFC 9110 §7.6.3).
pub const VIA_PSEUDONYM: &str = "mptcp-proxy";

/// What every connection shares: configuration, ACLs, credentials, the access log.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub config: Config,
    /// Compiled ACLs.
    pub acl: Acl,
    /// Credentials when authentication is on.
    pub credentials: Option<Credentials>,
    /// The access log.
    pub access_log: AccessLog,
    /// Resolves and connects to servers.
    pub connector: crate::upstream::Connector,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Local address → interface names, for per-path metrics.
    pub interfaces: Arc<InterfaceMap>,
    /// The throttle's event channel, when throttling is on.
    pub throttle_events: Option<mptcp_throttle::EventSender>,
    /// User-space per-client rate limits (upload, download), when `limits.client_rate` is set.
    pub client_limiters: Option<(Arc<ClientRateLimiter>, Arc<ClientRateLimiter>)>,
}

impl Shared {
    /// Relay settings for a tunnel of `client`.
    pub fn relay_settings(&self, client: &ClientConnection) -> RelaySettings {
        let (upload, download) = client.relay_counters();
        RelaySettings {
            mode: self.config.relay.mode,
            buffer_bytes: self.config.relay.buffer_bytes,
            idle_timeout: self.config.limits.idle_timeout,
            upload: upload.clone(),
            download: download.clone(),
            limits: self
                .client_limiters
                .as_ref()
                .map(|(up, down)| ClientLimits {
                    client: client.client.ip(),
                    upload: up.clone(),
                    download: down.clone(),
                }),
        }
    }

    /// Tells the throttle where `client`'s request goes (for destination rules).
    pub(crate) fn attach_destination(
        &self,
        client: &ClientConnection,
        host: &str,
        server: SocketAddr,
    ) {
        let target = if host.contains(':') {
            format!("[{host}]:{}", server.port())
        } else {
            format!("{host}:{}", server.port())
        };
        client.set_upstream(target, server);
        if let Some(events) = &self.throttle_events {
            crate::throttle::attach_destination(events, client.local, client.client, host, server);
        }
    }

    pub(crate) fn upstream_error(&self, kind: &'static str) {
        self.metrics
            .upstream_errors
            .get_or_create(&KindLabel { kind })
            .inc();
    }
}

/// Per-connection HTTP state: the client connection and its kept upstream connection.
#[derive(Debug)]
pub struct HttpConnection {
    /// The client connection.
    pub client: Arc<ClientConnection>,
    upstream: Mutex<Option<Upstream>>,
    /// Whether the current request (and its body) has gone out: the response timeout runs from then.
    request_sent: AtomicBool,
    request_sent_notify: tokio::sync::Notify,
    /// Whether the client's request body failed (malformed chunks, cut short) while being forwarded.
    client_body_failed: AtomicBool,
}

impl HttpConnection {
    /// Wraps a client connection.
    pub fn new(client: Arc<ClientConnection>) -> Self {
        Self {
            client,
            upstream: Mutex::new(None),
            request_sent: AtomicBool::new(false),
            request_sent_notify: tokio::sync::Notify::new(),
            client_body_failed: AtomicBool::new(false),
        }
    }

    /// A request is about to be sent upstream.
    fn request_started(&self) {
        self.request_sent.store(false, Ordering::Release);
        self.client_body_failed.store(false, Ordering::Release);
    }

    /// The request, body included, has been sent (or given up).
    fn request_sent(&self) {
        self.request_sent.store(true, Ordering::Release);
        self.request_sent_notify.notify_waiters();
    }

    /// Resolves `timeout` after the current request has been sent: the server is that late.
    async fn response_deadline(&self, timeout: std::time::Duration) {
        loop {
            let notified = self.request_sent_notify.notified();
            if self.request_sent.load(Ordering::Acquire) {
                break;
            }
            notified.await;
        }
        tokio::time::sleep(timeout).await;
    }
}

/// The access-log entry of a request being served.
pub(crate) struct Pending {
    entry: Entry,
    started: Instant,
    /// Under `Expect: 100-continue`, the gate to give up once the response has been relayed.
    expect: Option<Arc<request_body::ExpectGate>>,
}

/// Serves one request. Never fails: errors become responses.
pub async fn handle(
    shared: Arc<Shared>,
    connection: Arc<HttpConnection>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let client = &connection.client;
    // Never the user info: it may hold a password.
    let url = target::loggable(request.uri());
    let mut pending = Pending {
        entry: Entry {
            started: SystemTime::now(),
            elapsed: Default::default(),
            client: client.client.ip(),
            result: "TCP_MISS",
            status: 0,
            bytes: 0,
            method: request.method().to_string(),
            url,
            user: None,
            peer: None,
            content_type: None,
            transport: client.transport,
            subflows: 1,
        },
        started: Instant::now(),
        expect: None,
    };
    let result = serve(&shared, &connection, request, &mut pending).await;
    let mut response = match result {
        Ok(Served::Response(response)) => response,
        Ok(Served::Tunnel(response)) => {
            shared
                .metrics
                .responses
                .get_or_create(&CodeLabel { code: 200 })
                .inc();
            return Ok(response);
        }
        Err(error) => {
            tracing::debug!(client = %client.client, %error, "request refused");
            pending.entry.result = error.result_code();
            let mut response = text_response(error.status(), &error.public_message());
            if let (ProxyError::AuthRequired, Some(credentials)) = (&error, &shared.credentials) {
                if let Ok(value) = HeaderValue::from_str(&credentials.challenge()) {
                    response
                        .headers_mut()
                        .insert(header::PROXY_AUTHENTICATE, value);
                }
            }
            response
        }
    };
    pending.entry.status = response.status().as_u16();
    shared
        .metrics
        .responses
        .get_or_create(&CodeLabel {
            code: pending.entry.status,
        })
        .inc();
    pending.entry.content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let head_bytes = head_len(&response);
    let body = std::mem::replace(response.body_mut(), empty());
    *response.body_mut() = LoggedBody {
        inner: body,
        limit: shared
            .client_limiters
            .as_ref()
            .map(|(_, download)| (download.clone(), client.client.ip())),
        held: None,
        body_bytes: 0,
        head_bytes,
        pending: Some(pending),
        shared: shared.clone(),
        connection: connection.client.clone(),
    }
    .boxed();
    Ok(response)
}

/// OPTIONS and TRACE with `Max-Forwards: 0`, and `OPTIONS *`, are for the proxy itself (RFC 9110
/// §7.6.2, §9.3.7): it answers as the final recipient. Other values of `Max-Forwards` are decremented.
fn answer_as_final_recipient(
    request: &mut Request<Incoming>,
) -> Result<Option<Response<ProxyBody>>, ProxyError> {
    let method = request.method();
    if method != Method::OPTIONS && method != Method::TRACE {
        return Ok(None);
    }
    let asterisk = method == Method::OPTIONS && request.uri() == "*";
    match headers::max_forwards(request.headers())? {
        MaxForwards::Zero => {}
        MaxForwards::Absent if asterisk => {}
        MaxForwards::Absent => return Ok(None),
        MaxForwards::Forward(left) => {
            request
                .headers_mut()
                .insert(header::MAX_FORWARDS, HeaderValue::from(left));
            return Ok(None);
        }
    }
    let mut response = if method == Method::OPTIONS {
        let mut response = Response::new(error::empty());
        response.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static(
                "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE, CONNECT",
            ),
        );
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        response
    } else {
        // The request as received, without fields that may hold secrets (RFC 9110 §9.3.8).
        let mut echo = format!(
            "{} {} {:?}\r\n",
            request.method(),
            request.uri(),
            request.version()
        );
        for (name, value) in request.headers() {
            if [
                header::AUTHORIZATION,
                header::PROXY_AUTHORIZATION,
                header::COOKIE,
            ]
            .contains(name)
            {
                continue;
            }
            echo.push_str(name.as_str());
            echo.push_str(": ");
            echo.push_str(&String::from_utf8_lossy(value.as_bytes()));
            echo.push_str("\r\n");
        }
        echo.push_str("\r\n");
        let mut response = Response::new(error::full(echo));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("message/http"),
        );
        response
    };
    add_via(response.headers_mut(), http::Version::HTTP_11);
    Ok(Some(response))
}

pub(crate) enum Served {
    Response(Response<ProxyBody>),
    /// A CONNECT response; the tunnel task writes its log line.
    Tunnel(Response<ProxyBody>),
}

async fn serve(
    shared: &Arc<Shared>,
    connection: &Arc<HttpConnection>,
    mut request: Request<Incoming>,
    pending: &mut Pending,
) -> Result<Served, ProxyError> {
    // First, so the scan result always pairs with its own request.
    let head_problem = connection.client.take_head_problem();
    if let Some(credentials) = &shared.credentials {
        let header = request
            .headers()
            .get(header::PROXY_AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        pending.entry.user = Some(credentials.verify(header).ok_or(ProxyError::AuthRequired)?);
    }
    match head_problem {
        HeadProblem::None => {}
        HeadProblem::AmbiguousFraming => {
            return Err(ProxyError::BadRequest(
                "both Content-Length and Transfer-Encoding (ambiguous framing)".into(),
            ))
        }
        HeadProblem::TooLarge => return Err(ProxyError::HeadTooLarge),
    }
    check_framing(request.headers())?;
    if request.method() != Method::CONNECT {
        headers::check_host(request.headers(), request.version())?;
    }
    if let Some(answer) = answer_as_final_recipient(&mut request)? {
        return Ok(Served::Response(answer));
    }
    if request.method() == Method::CONNECT {
        return tunnel::connect(shared, connection, request, pending).await;
    }
    forward::forward(shared, connection, request, pending).await
}
