//! The HTTP proxy: absolute-form forwarding and CONNECT tunnels, on hyper 1.x.
//!
//! One [`handle`] call serves one request. Forwarded requests reuse one upstream connection per client
//! connection while the target stays the same (keep-alive on both sides). Every request leaves one
//! access-log line, written when its response body ends.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::access_log::{AccessLog, Entry};
use crate::acl::{Acl, Denied};
use crate::auth::Credentials;
use crate::config::Config;
use crate::connection::{ClientConnection, ClientIo, HeadProblem};
use crate::metrics::{CodeLabel, InterfaceMap, KindLabel, Metrics};
use crate::relay::{relay, ClientLimits, RelaySettings};
use crate::sockets::upstream_socket;
use mptcp_throttle::ClientRateLimiter;

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
    fn attach_destination(&self, client: &ClientConnection, host: &str, server: SocketAddr) {
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

    fn upstream_error(&self, kind: &'static str) {
        self.metrics
            .upstream_errors
            .get_or_create(&KindLabel { kind })
            .inc();
    }
}

/// Why a request is answered by the proxy itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request is malformed or not a proxy request (400).
    #[error("{0}")]
    BadRequest(String),
    /// An ACL denies it (403).
    #[error("{0}")]
    Denied(#[from] Denied),
    /// The request head exceeds `limits.max_header_bytes` (431).
    #[error("request head too large")]
    HeadTooLarge,
    /// Credentials are missing or wrong (407).
    #[error("proxy authentication required")]
    AuthRequired,
    /// The server refused, is unreachable or failed (502).
    #[error("{0}")]
    BadGateway(String),
    /// Connecting to the server timed out (504).
    #[error("{0}")]
    GatewayTimeout(String),
}

impl ProxyError {
    /// The status code sent to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::Denied(_) => StatusCode::FORBIDDEN,
            ProxyError::AuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ProxyError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Squid's result code for the access log.
    fn result_code(&self) -> &'static str {
        match self {
            ProxyError::Denied(_) | ProxyError::AuthRequired => "TCP_DENIED",
            ProxyError::BadGateway(_) | ProxyError::GatewayTimeout(_) => "TCP_MISS",
            ProxyError::BadRequest(_) | ProxyError::HeadTooLarge => "NONE_NONE",
        }
    }
}

/// A plain-text response with a one-line reason, closing the connection.
pub fn text_response(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let body = format!(
        "{} {}\n",
        status.as_u16(),
        reason.replace(['\r', '\n'], " ")
    );
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    add_via(headers, Version::HTTP_11);
    response
}

fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the de-facto `Proxy-Connection` and `Keep-Alive`.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .chain(headers.get_all("proxy-connection").iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Appends this proxy to `Via`, with the protocol version the message arrived with.
pub fn add_via(headers: &mut HeaderMap, version: Version) {
    let protocol = match version {
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        _ => "1.1",
    };
    let value = format!("{protocol} {VIA_PSEUDONYM}");
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.append(header::VIA, value);
    }
}

/// Rejects ambiguous message framing (request smuggling, RFC 9112 §6.3): both `Content-Length` and
/// `Transfer-Encoding`, conflicting lengths, or a transfer coding that does not end in `chunked`.
pub fn check_framing(headers: &HeaderMap) -> Result<(), ProxyError> {
    let lengths: Vec<&HeaderValue> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    let codings: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if !lengths.is_empty() && !codings.is_empty() {
        return Err(ProxyError::BadRequest(
            "both Content-Length and Transfer-Encoding (ambiguous framing)".into(),
        ));
    }
    let mut values = lengths
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("invalid").split(','))
        .map(str::trim);
    if let Some(first) = values.next() {
        if first.parse::<u64>().is_err() || values.any(|v| v != first) {
            return Err(ProxyError::BadRequest(
                "invalid or conflicting Content-Length".into(),
            ));
        }
    }
    if let Some(last) = codings.last() {
        let last_coding = last
            .to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .map(|c| c.trim().to_ascii_lowercase());
        if last_coding.as_deref() != Some("chunked") {
            return Err(ProxyError::BadRequest(
                "Transfer-Encoding must end in chunked".into(),
            ));
        }
    }
    Ok(())
}

/// Where an absolute-form request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host, without IPv6 brackets.
    pub host: String,
    /// The port (80 when absent).
    pub port: u16,
    /// The `Host` header value: the authority without user info, port omitted when 80.
    pub host_header: String,
    /// The origin-form request target (`/path?query`).
    pub origin_form: Uri,
}

/// Parses an absolute-form request target (`http://host[:port]/path`).
pub fn parse_target(uri: &Uri) -> Result<Target, ProxyError> {
    match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") => {}
        Some(s) if s.eq_ignore_ascii_case("https") => {
            return Err(ProxyError::BadRequest(
                "https:// URLs go through CONNECT".into(),
            ))
        }
        Some(other) => {
            return Err(ProxyError::BadRequest(format!(
                "unsupported URL scheme {other:?}"
            )))
        }
        None => {
            return Err(ProxyError::BadRequest(
                "expected an absolute-form URL (http://host/path): this is a proxy".into(),
            ))
        }
    }
    let authority = uri
        .authority()
        .ok_or_else(|| ProxyError::BadRequest("URL has no host".into()))?;
    let bracketed = authority.host();
    let host = bracketed.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(ProxyError::BadRequest("URL has an empty host".into()));
    }
    let port = authority.port_u16().unwrap_or(80);
    let host_header = if port == 80 {
        bracketed.to_owned()
    } else {
        format!("{bracketed}:{port}")
    };
    let origin_form = uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .filter(|pq| pq.starts_with('/'))
        .unwrap_or("/")
        .parse()
        .map_err(|_| ProxyError::BadRequest("invalid path".into()))?;
    Ok(Target {
        host: host.to_owned(),
        port,
        host_header,
        origin_form,
    })
}

/// Resolves `host`, checks every address against the destination ACL, and connects to the first
/// allowed address that answers, within `upstream.connect_timeout`.
pub async fn connect_upstream(
    shared: &Shared,
    host: &str,
    port: u16,
) -> Result<(TcpStream, SocketAddr), ProxyError> {
    let timeout = shared.config.upstream.connect_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let addresses: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            match tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port))).await {
                Err(_) => {
                    return Err(ProxyError::GatewayTimeout(format!(
                        "resolving {host} timed out"
                    )))
                }
                Ok(Err(e)) => {
                    return Err(ProxyError::BadGateway(format!(
                        "cannot resolve {host}: {e}"
                    )))
                }
                Ok(Ok(addresses)) => addresses.collect(),
            }
        }
    };
    let mut denied = None;
    let allowed: Vec<SocketAddr> = addresses
        .into_iter()
        .filter(|a| match shared.acl.check_destination(a.ip()) {
            Ok(()) => true,
            Err(d) => {
                denied.get_or_insert(d);
                false
            }
        })
        .collect();
    if allowed.is_empty() {
        shared.upstream_error(if denied.is_some() {
            "denied"
        } else {
            "resolve"
        });
        return Err(match denied {
            Some(d) => ProxyError::Denied(d),
            None => ProxyError::BadGateway(format!("{host} has no address")),
        });
    }
    let mut last_error = None;
    for address in allowed {
        let socket = upstream_socket(address, shared.config.upstream.mptcp)
            .map_err(|e| ProxyError::BadGateway(format!("socket for {address}: {e}")))?;
        match tokio::time::timeout_at(deadline, socket.connect(address)).await {
            Err(_) => {
                shared.upstream_error("timeout");
                return Err(ProxyError::GatewayTimeout(format!(
                    "connecting to {address} timed out after {timeout:?}"
                )));
            }
            Ok(Ok(stream)) => return Ok((stream, address)),
            Ok(Err(e)) => last_error = Some((address, e)),
        }
    }
    let Some((address, error)) = last_error else {
        return Err(ProxyError::BadGateway(format!("{host} has no address")));
    };
    shared.upstream_error(if error.kind() == std::io::ErrorKind::ConnectionRefused {
        "refused"
    } else {
        "unreachable"
    });
    Err(ProxyError::BadGateway(format!(
        "connecting to {address}: {error}"
    )))
}

/// An idle upstream connection kept for the next request of the same client connection.
#[derive(Debug)]
struct Upstream {
    host: String,
    port: u16,
    peer: SocketAddr,
    sender: SendRequest<Incoming>,
}

/// Per-connection HTTP state: the client connection and its kept upstream connection.
#[derive(Debug)]
pub struct HttpConnection {
    /// The client connection.
    pub client: Arc<ClientConnection>,
    upstream: Mutex<Option<Upstream>>,
}

impl HttpConnection {
    /// Wraps a client connection.
    pub fn new(client: Arc<ClientConnection>) -> Self {
        Self {
            client,
            upstream: Mutex::new(None),
        }
    }

    fn take_upstream(&self, host: &str, port: u16) -> Option<Upstream> {
        let mut slot = self.upstream.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(u) if u.host == host && u.port == port && !u.sender.is_closed() => Some(u),
            _ => None,
        }
    }

    fn keep_upstream(&self, upstream: Upstream) {
        *self.upstream.lock().unwrap_or_else(|p| p.into_inner()) = Some(upstream);
    }
}

/// The access-log entry of a request being served.
struct Pending {
    entry: Entry,
    started: Instant,
}

/// Serves one request. Never fails: errors become responses.
pub async fn handle(
    shared: Arc<Shared>,
    connection: Arc<HttpConnection>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let client = &connection.client;
    let url = if request.method() == Method::CONNECT {
        request
            .uri()
            .authority()
            .map_or_else(|| request.uri().to_string(), |a| a.to_string())
    } else {
        request.uri().to_string()
    };
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
            let mut response = text_response(error.status(), &error.to_string());
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

enum Served {
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
    if let Some(credentials) = &shared.credentials {
        let header = request
            .headers()
            .get(header::PROXY_AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        pending.entry.user = Some(credentials.verify(header).ok_or(ProxyError::AuthRequired)?);
    }
    match connection.client.take_head_problem() {
        HeadProblem::None => {}
        HeadProblem::AmbiguousFraming => {
            return Err(ProxyError::BadRequest(
                "both Content-Length and Transfer-Encoding (ambiguous framing)".into(),
            ))
        }
        HeadProblem::TooLarge => return Err(ProxyError::HeadTooLarge),
    }
    check_framing(request.headers())?;
    if request.method() == Method::CONNECT {
        return connect(shared, connection, request, pending).await;
    }
    let target = parse_target(request.uri())?;
    let mut upstream = match connection.take_upstream(&target.host, target.port) {
        Some(upstream) => upstream,
        None => open_upstream(shared, &connection.client, &target).await?,
    };
    pending.entry.peer = Some(upstream.peer.ip());

    let version = request.version();
    *request.uri_mut() = target.origin_form.clone();
    *request.version_mut() = Version::HTTP_11;
    let headers = request.headers_mut();
    remove_hop_by_hop(headers);
    let host = HeaderValue::from_str(&target.host_header)
        .map_err(|_| ProxyError::BadRequest("invalid host".into()))?;
    headers.insert(header::HOST, host);
    add_via(headers, version);

    if upstream.sender.ready().await.is_err() {
        // The kept connection closed since the last request; the body is untouched, so retry once.
        upstream = open_upstream(shared, &connection.client, &target).await?;
        upstream
            .sender
            .ready()
            .await
            .map_err(|e| ProxyError::BadGateway(format!("upstream {}: {e}", upstream.peer)))?;
    }
    let peer = upstream.peer;
    let mut response = match upstream.sender.send_request(request).await {
        Ok(response) => response,
        Err(e) => {
            shared.upstream_error("protocol");
            return Err(ProxyError::BadGateway(format!("upstream {peer}: {e}")));
        }
    };
    shared
        .metrics
        .first_byte_duration
        .observe(pending.started.elapsed().as_secs_f64());
    connection.keep_upstream(upstream);
    let version = response.version();
    *response.version_mut() = Version::HTTP_11;
    remove_hop_by_hop(response.headers_mut());
    add_via(response.headers_mut(), version);
    Ok(Served::Response(response.map(|body| body.boxed())))
}

async fn open_upstream(
    shared: &Shared,
    client: &ClientConnection,
    target: &Target,
) -> Result<Upstream, ProxyError> {
    let (stream, peer) = connect_upstream(shared, &target.host, target.port).await?;
    client.upstream_connected();
    shared.attach_destination(client, &target.host, peer);
    let (sender, driver) = match hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
    {
        Ok(handshake) => handshake,
        Err(e) => {
            shared.upstream_error("protocol");
            return Err(ProxyError::BadGateway(format!("upstream {peer}: {e}")));
        }
    };
    tokio::spawn(async move {
        if let Err(error) = driver.await {
            tracing::debug!(%peer, %error, "upstream connection ended with an error");
        }
    });
    Ok(Upstream {
        host: target.host.clone(),
        port: target.port,
        peer,
        sender,
    })
}

async fn connect(
    shared: &Arc<Shared>,
    connection: &Arc<HttpConnection>,
    mut request: Request<Incoming>,
    pending: &mut Pending,
) -> Result<Served, ProxyError> {
    let authority = request
        .uri()
        .authority()
        .cloned()
        .ok_or_else(|| ProxyError::BadRequest("CONNECT needs host:port".into()))?;
    let port = authority
        .port_u16()
        .ok_or_else(|| ProxyError::BadRequest("CONNECT needs a port".into()))?;
    shared.acl.check_connect_port(port)?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let (upstream, peer) = connect_upstream(shared, host, port).await?;
    connection.client.upstream_connected();
    shared.attach_destination(&connection.client, host, peer);
    pending.entry.peer = Some(peer.ip());
    pending.entry.result = "TCP_TUNNEL";
    pending.entry.status = 200;
    let on_upgrade = hyper::upgrade::on(&mut request);
    let shared = shared.clone();
    let client = connection.client.clone();
    let mut entry = pending.entry.clone();
    let started = pending.started;
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, "CONNECT upgrade failed");
                return;
            }
        };
        let Ok(parts) = upgraded.downcast::<TokioIo<ClientIo>>() else {
            tracing::error!("CONNECT upgrade returned an unexpected stream type");
            return;
        };
        // Keep only the bytes the client sent past the CONNECT head: `read_buf` can hold on to hyper's
        // whole read buffer, which would stay allocated for the tunnel's lifetime.
        let hyper::upgrade::Parts { io, read_buf, .. } = parts;
        let prefix = read_buf.to_vec();
        drop(read_buf);
        let Some(stream) = io.into_inner().into_stream() else {
            return;
        };
        let (stream, upstream) = (Arc::new(stream), Arc::new(upstream));
        let settings = shared.relay_settings(&client);
        let result = client
            .sampling_subflows(relay(&stream, &upstream, &prefix, settings))
            .await;
        let stats = result.unwrap_or_else(|error| {
            tracing::debug!(%error, "tunnel ended with an error");
            Default::default()
        });
        entry.bytes = CONNECT_ESTABLISHED.len() as u64 + stats.download_bytes;
        entry.elapsed = started.elapsed();
        entry.subflows = client.max_subflows();
        shared.access_log.write(&entry);
        client.closed(&stream);
    });
    Ok(Served::Tunnel(Response::new(empty())))
}

/// What hyper writes for an established tunnel, counted in the access log's byte total.
const CONNECT_ESTABLISHED: &str = "HTTP/1.1 200 OK\r\n\r\n";

/// The serialized size of a response head, for the access log's byte count.
fn head_len(response: &Response<ProxyBody>) -> u64 {
    let status_line =
        "HTTP/1.1 200 \r\n".len() + response.status().canonical_reason().map_or(0, str::len);
    let fields: usize = response
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    (status_line + fields + 2) as u64
}

/// A data frame waiting for the client's rate-limit budget.
type HeldFrame = (
    Frame<Bytes>,
    std::sync::Mutex<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
);

/// A response body that counts what it passes, keeps the client's user-space rate limit, and writes
/// the access-log line when it ends.
struct LoggedBody {
    inner: ProxyBody,
    limit: Option<(Arc<ClientRateLimiter>, IpAddr)>,
    held: Option<HeldFrame>,
    body_bytes: u64,
    head_bytes: u64,
    pending: Option<Pending>,
    shared: Arc<Shared>,
    connection: Arc<ClientConnection>,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some((_, wait)) = &mut self.held {
            let wait = wait.get_mut().unwrap_or_else(|p| p.into_inner());
            if wait.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if let Some((frame, _)) = self.held.take() {
                return Poll::Ready(Some(Ok(frame)));
            }
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let len = data.len();
                self.body_bytes += len as u64;
                if let Some((limiter, client)) = self.limit.clone() {
                    let Poll::Ready(Some(Ok(frame))) = polled else {
                        unreachable!("matched above")
                    };
                    let bytes = u32::try_from(len).unwrap_or(u32::MAX);
                    let wait: Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
                        Box::pin(async move { limiter.until_ready(client, bytes).await });
                    self.held = Some((frame, std::sync::Mutex::new(wait)));
                    return self.poll_frame(cx);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.connection.expect_next_head();
        if let Some(mut pending) = self.pending.take() {
            pending.entry.elapsed = pending.started.elapsed();
            self.shared
                .metrics
                .request_duration
                .observe(pending.entry.elapsed.as_secs_f64());
            pending.entry.bytes = self.head_bytes + self.body_bytes;
            self.connection.subflows();
            pending.entry.subflows = self.connection.max_subflows();
            self.shared.access_log.write(&pending.entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut map = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("proxy-connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic eA=="),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("accept", "*/*"),
            ("content-length", "3"),
        ]);
        remove_hop_by_hop(&mut map);
        let mut left: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["accept", "content-length"]);
    }

    #[test]
    fn via_is_appended() {
        let mut map = headers(&[("via", "1.1 other")]);
        add_via(&mut map, Version::HTTP_10);
        let via: Vec<&str> = map
            .get_all("via")
            .iter()
            .map(|v| v.to_str().expect("ascii"))
            .collect();
        assert_eq!(via, vec!["1.1 other", "1.0 mptcp-proxy"]);
    }

    #[test]
    fn framing_checks() {
        assert!(check_framing(&headers(&[("content-length", "5")])).is_ok());
        assert!(check_framing(&headers(&[("transfer-encoding", "gzip, chunked")])).is_ok());
        for bad in [
            &[("content-length", "5"), ("transfer-encoding", "chunked")][..],
            &[("content-length", "5"), ("content-length", "6")][..],
            &[("content-length", "5, 6")][..],
            &[("content-length", "-1")][..],
            &[("transfer-encoding", "chunked, gzip")][..],
        ] {
            let err = check_framing(&headers(bad)).expect_err("must be rejected");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        }
        assert!(check_framing(&headers(&[
            ("content-length", "5"),
            ("content-length", "5")
        ]))
        .is_ok());
    }

    #[test]
    fn absolute_form_targets() {
        let t = parse_target(&"http://example.com/a?b=1".parse().expect("uri")).expect("target");
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.host_header.as_str(),
                t.origin_form.to_string().as_str()
            ),
            ("example.com", 80, "example.com", "/a?b=1")
        );
        let t =
            parse_target(&"http://user:pw@[fd00:3::2]:8080".parse().expect("uri")).expect("target");
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.host_header.as_str(),
                t.origin_form.to_string().as_str()
            ),
            ("fd00:3::2", 8080, "[fd00:3::2]:8080", "/")
        );
        for bad in ["/relative", "https://example.com/", "ftp://example.com/"] {
            let err = parse_target(&bad.parse().expect("uri")).expect_err(bad);
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn error_statuses() {
        assert_eq!(ProxyError::AuthRequired.status().as_u16(), 407);
        assert_eq!(ProxyError::BadGateway("x".into()).status().as_u16(), 502);
        assert_eq!(
            ProxyError::GatewayTimeout("x".into()).status().as_u16(),
            504
        );
        assert_eq!(
            ProxyError::Denied(Denied::ConnectPort(1)).status().as_u16(),
            403
        );
        let response = text_response(StatusCode::BAD_GATEWAY, "refused\r\nInjected: yes");
        assert_eq!(response.headers()["connection"], "close");
    }
}
