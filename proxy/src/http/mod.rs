//! The HTTP proxy: absolute-form forwarding and CONNECT tunnels, over HTTP/1.x on both sides.
//!
//! One task serves one client connection (`conn`): it reads a request head, checks it, and forwards
//! it on the client connection's kept upstream connection (`forward`) or opens a tunnel (`tunnel`),
//! all within that task: no wakeup crosses tasks or threads between a request and its response.
//! Heads are parsed with httparse into views of the bytes received and written on rewritten straight
//! into the output (`wire`); no header map is built. Bodies are relayed with their framing checked and
//! re-made (`chunked`). Every request leaves one access-log line, written when its response ends.
//!
//! The concerns live in their own modules: [`error`] (answers the proxy gives itself), [`headers`]
//! (field policy: hop-by-hop fields, framing, `Host`, `Max-Forwards`), [`target`] (absolute-form
//! targets), [`wire`] (heads on the wire), [`chunked`] (the chunked coding), `buffer` (read buffers),
//! `date` (the `Date` value). Connecting to servers is [`crate::upstream`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{Method, StatusCode, Uri};

use crate::access_log::{AccessLog, Entry};
use crate::acl::Acl;
use crate::auth::Credentials;
use crate::config::Config;
use crate::connection::ClientConnection;
use crate::metrics::{CodeLabel, InterfaceMap, KindLabel, Metrics};
use crate::relay::{ClientLimits, RelaySettings};
use mptcp_throttle::ClientRateLimiter;

mod buffer;
pub mod chunked;
mod conn;
mod date;
pub mod error;
mod forward;
pub mod headers;
pub mod target;
mod tunnel;
pub mod wire;

pub use crate::upstream::connect_upstream;
pub use conn::serve_connection;
pub use error::{write_text_response, ProxyError};
use headers::{Fields, MaxForwards};
pub use target::{parse_target, Target};
use wire::{RequestBody, RequestHead, RequestRewrite};

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

/// The access-log line and metrics of a request being served.
pub(crate) struct Pending {
    /// The line, when the access log is on (nothing is formatted or copied for it otherwise).
    /// Boxed: a refusal carries the `Pending` in an `Err`, kept small.
    entry: Option<Box<Entry>>,
    started: Instant,
    status: u16,
    result: &'static str,
    peer: Option<IpAddr>,
}

impl Pending {
    /// A request whose head arrived now.
    fn new(shared: &Shared, client: &ClientConnection, method: &str, uri: Option<&Uri>) -> Self {
        let entry = shared.access_log.is_enabled().then(|| {
            Box::new(Entry {
                started: SystemTime::now(),
                elapsed: Default::default(),
                client: client.client.ip(),
                result: "TCP_MISS",
                status: 0,
                bytes: 0,
                method: method.to_owned(),
                // Never the user info: it may hold a password.
                url: uri.map_or_else(|| "-".to_owned(), target::loggable),
                user: None,
                peer: None,
                content_type: None,
                transport: client.transport,
                subflows: 1,
            })
        });
        Self {
            entry,
            started: Instant::now(),
            status: 0,
            result: "TCP_MISS",
            peer: None,
        }
    }

    /// Records the response's `Content-Type` for the log.
    fn content_type(&mut self, value: Option<&[u8]>) {
        if let (Some(entry), Some(value)) = (&mut self.entry, value) {
            entry.content_type = Some(String::from_utf8_lossy(value).into_owned());
        }
    }

    /// Counts the response status (at its head).
    fn respond(&mut self, shared: &Shared, status: u16) {
        self.status = status;
        shared
            .metrics
            .responses
            .get_or_create(&CodeLabel { code: status })
            .inc();
    }

    /// Writes the access-log line: `bytes` went to the client.
    fn finish(self, shared: &Shared, client: &ClientConnection, bytes: u64) {
        let elapsed = self.started.elapsed();
        // A tunnel's life is no request duration.
        if self.result != "TCP_TUNNEL" {
            shared
                .metrics
                .request_duration
                .observe(elapsed.as_secs_f64());
        }
        client.subflows();
        if let Some(mut entry) = self.entry {
            entry.elapsed = elapsed;
            entry.status = self.status;
            entry.result = self.result;
            entry.bytes = bytes;
            entry.peer = self.peer;
            entry.subflows = client.max_subflows();
            shared.access_log.log(*entry);
        }
    }
}

/// What a request asks the proxy to do, checked and ready.
pub(crate) enum Action {
    /// Forward it: the head to send upstream is in the connection's output buffer.
    Forward(Forward),
    /// Open a tunnel to `host:port`.
    Connect {
        /// The host, without IPv6 brackets.
        host: String,
        /// The port.
        port: u16,
    },
    /// The proxy is the final recipient: the answer is in the output buffer.
    Answer {
        /// Its status.
        status: u16,
    },
}

/// A request to forward.
pub(crate) struct Forward {
    /// Where it goes.
    pub target: Target,
    /// How its body is delimited.
    pub body: RequestBody,
    /// `Expect: 100-continue`.
    pub expect: bool,
    /// A HEAD request (the response has no body).
    pub head_method: bool,
    /// Safe to send again on a new connection when a kept one closed under it (RFC 9110 §9.2.2).
    pub idempotent: bool,
    /// The client accepts trailer fields.
    pub trailers: bool,
}

/// A request head, checked.
pub(crate) struct Prepared {
    pub pending: Pending,
    /// The client speaks HTTP/1.1.
    pub http11: bool,
    /// The client wants the connection closed after this request.
    pub close: bool,
    /// The request has a body.
    pub body: RequestBody,
    pub action: Action,
}

/// A request refused before anything was sent on: the error to answer and its log line.
pub(crate) struct Refused {
    pub error: ProxyError,
    pub pending: Pending,
}

/// Checks a request head (credentials, framing, `Host`, the target and the ACLs that need no lookup),
/// and for a request to forward writes the head to send upstream into `out`. Synchronous: the head
/// borrows the connection's read buffer.
pub(crate) fn prepare(
    shared: &Shared,
    client: &ClientConnection,
    head: &RequestHead<'_>,
    out: &mut Vec<u8>,
) -> Result<Prepared, Refused> {
    let method = head.method;
    let connect = method == "CONNECT";
    // hyper answered 400 for request targets that are not a URI; so does the proxy.
    let uri = head.target.parse::<Uri>();
    let mut pending = Pending::new(shared, client, method, uri.as_ref().ok());
    let fields = Fields(head.fields);
    let checked = (|| {
        if let Some(credentials) = &shared.credentials {
            let user = credentials
                .verify(fields.get("proxy-authorization"))
                .ok_or(ProxyError::AuthRequired)?;
            if let Some(entry) = &mut pending.entry {
                entry.user = Some(user);
            }
        }
        let body = headers::check_framing(fields, head.http11)?;
        if !connect {
            headers::check_host(fields, head.http11)?;
        }
        let uri = uri.map_err(|_| ProxyError::BadRequest("invalid request target".into()))?;
        let options = fields.connection_options();
        let close = if head.http11 {
            options.close
        } else {
            options.close || !options.keep_alive
        };
        let max_forwards = final_recipient(head, &uri, fields, out)?;
        let action = if let Some(status) = max_forwards.answer {
            Action::Answer { status }
        } else if connect {
            let authority = uri
                .authority()
                .ok_or_else(|| ProxyError::BadRequest("CONNECT needs host:port".into()))?;
            if authority.as_str().contains('@') {
                return Err(ProxyError::BadRequest(
                    "CONNECT takes host:port, without user info".into(),
                ));
            }
            let (host, port) = target::host_and_port(authority, None)?;
            shared.acl.check_connect_port(port)?;
            Action::Connect { host, port }
        } else {
            let target = parse_target(&uri)?;
            shared.acl.check_safe_port(target.port)?;
            out.clear();
            let origin_form = target
                .origin_form
                .path_and_query()
                .map_or("/", |p| p.as_str());
            wire::write_request_head(
                out,
                head,
                &RequestRewrite {
                    origin_form,
                    host: &target.host_header,
                    max_forwards: max_forwards.forward,
                    te_trailers: headers::accepts_trailers(fields),
                    body,
                },
            );
            Action::Forward(Forward {
                target,
                body,
                expect: body != RequestBody::None && headers::expects_continue(fields),
                head_method: method == "HEAD",
                idempotent: matches!(
                    method,
                    "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
                ),
                trailers: headers::accepts_trailers(fields),
            })
        };
        Ok((close, body, action))
    })();
    match checked {
        Ok((close, body, action)) => Ok(Prepared {
            pending,
            http11: head.http11,
            close,
            body,
            action,
        }),
        Err(error) => Err(Refused { error, pending }),
    }
}

/// What `Max-Forwards` made of an OPTIONS or TRACE request.
#[derive(Default)]
struct FinalRecipient {
    /// The proxy answered (the answer is in `out`) with this status.
    answer: Option<u16>,
    /// Forward with this `Max-Forwards`.
    forward: Option<u64>,
}

/// OPTIONS and TRACE with `Max-Forwards: 0`, and `OPTIONS *`, are for the proxy itself (RFC 9110
/// §7.6.2, §9.3.7): it answers as the final recipient, into `out`. Other values of `Max-Forwards`
/// are decremented.
fn final_recipient(
    head: &RequestHead<'_>,
    uri: &Uri,
    fields: Fields<'_, '_>,
    out: &mut Vec<u8>,
) -> Result<FinalRecipient, ProxyError> {
    let options = head.method == Method::OPTIONS.as_str();
    if !options && head.method != Method::TRACE.as_str() {
        return Ok(FinalRecipient::default());
    }
    let asterisk = options && uri == "*";
    match headers::max_forwards(fields)? {
        MaxForwards::Zero => {}
        MaxForwards::Absent if asterisk => {}
        MaxForwards::Absent => return Ok(FinalRecipient::default()),
        MaxForwards::Forward(left) => {
            return Ok(FinalRecipient {
                answer: None,
                forward: Some(left),
            })
        }
    }
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    let body = if options {
        wire::put_field(
            out,
            b"allow",
            b"GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE, CONNECT",
        );
        Vec::new()
    } else {
        // The request as received, without fields that may hold secrets (RFC 9110 §9.3.8).
        let version = if head.http11 { "HTTP/1.1" } else { "HTTP/1.0" };
        let mut echo = format!("{} {} {version}\r\n", head.method, uri).into_bytes();
        for field in head.fields {
            if ["authorization", "proxy-authorization", "cookie"]
                .iter()
                .any(|secret| field.name.eq_ignore_ascii_case(secret))
            {
                continue;
            }
            echo.extend_from_slice(field.name.to_ascii_lowercase().as_bytes());
            echo.extend_from_slice(b": ");
            echo.extend_from_slice(field.value);
            echo.extend_from_slice(b"\r\n");
        }
        echo.extend_from_slice(b"\r\n");
        wire::put_field(out, b"content-type", b"message/http");
        echo
    };
    out.extend_from_slice(b"content-length: ");
    wire::put_decimal(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    date::with_date(|date| wire::put_field(out, b"date", date));
    wire::put_field(out, b"via", wire::via_value(true));
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&body);
    Ok(FinalRecipient {
        answer: Some(StatusCode::OK.as_u16()),
        forward: None,
    })
}
