//! Forwarding one request on the client connection's kept upstream connection (opened on first use,
//! kept while both sides keep it and the target stays the same), inside the client connection's task.
//!
//! The head goes out with as much of a `Content-Length` body as has arrived, in one write; the response
//! head comes back with the start of its body, and goes to the client in one write too. Bodies are
//! relayed with their framing checked: a `Content-Length` body byte for byte, a chunked one decoded and
//! re-chunked, a close-delimited one chunked for an HTTP/1.1 client. While a request body is being sent,
//! an early answer from the server stops it.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::buffer::Buffer;
use super::chunked::{self, ChunkedDecoder, Step};
use super::conn::Conn;
use super::error::ProxyError;
use super::headers::Fields;
use super::wire::{self, ClientBody, RequestBody, ResponseBody, ResponseRewrite};
use super::{date, Forward, Pending, Refused, Shared, Target};
use crate::config::RelayConfig;
use crate::connection::ClientConnection;
use crate::relay;
use crate::upstream::connect_upstream;

/// The first allocation of an upstream connection's read buffer.
const UPSTREAM_BUFFER: usize = 16 * 1024;
/// The longest response head accepted from a server.
const RESPONSE_HEAD_LIMIT: usize = 64 * 1024;
/// A `Content-Length` body with at least this much left after the first write is spliced (when the
/// relay mode gives a pipe): below it, a copy or two costs less than setting up a pipe.
const SPLICE_AT: u64 = 128 * 1024;
/// Output gathered before it is written to the client while relaying a re-framed body.
const FLUSH_AT: usize = 64 * 1024;

/// An upstream connection: kept between requests of one client connection.
#[derive(Debug)]
pub(super) struct Upstream {
    stream: TcpStream,
    rbuf: Buffer,
    host: String,
    port: u16,
    peer: SocketAddr,
}

impl Upstream {
    /// Whether a kept connection can carry another request: nothing arrived on it since (no close, no
    /// bytes the server sent unasked).
    fn is_reusable(&self) -> bool {
        if !self.rbuf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Opens an upstream connection to `target` (resolve, ACL, Happy Eyeballs: [`connect_upstream`]).
async fn open(
    shared: &Shared,
    client: &ClientConnection,
    target: &Target,
    buffer_limit: usize,
) -> Result<Upstream, ProxyError> {
    let (stream, peer) = connect_upstream(shared, &target.host, target.port).await?;
    client.upstream_connected();
    shared.attach_destination(client, &target.host, peer);
    Ok(Upstream {
        stream,
        rbuf: Buffer::new(UPSTREAM_BUFFER, buffer_limit.max(UPSTREAM_BUFFER)),
        host: target.host.clone(),
        port: target.port,
        peer,
    })
}

/// A 502 for a server that broke the protocol or the connection, counted.
fn upstream_failed(shared: &Shared, target: &Target, kind: &'static str, what: &str) -> ProxyError {
    shared.upstream_error(kind);
    tracing::info!(host = %target.host, port = target.port, "upstream failed: {what}");
    ProxyError::BadGateway(format!("{}:{}: {what}", target.host, target.port))
}

/// What happened to a request body on its way upstream.
enum BodySent {
    /// All of it went.
    Complete,
    /// The server answered (or closed) before it all went: the rest stays unread.
    Answered,
}

/// Why a request body did not go upstream.
enum BodyFailed {
    /// The client's body is malformed, cut short or stalled (400).
    Client,
    /// The upstream connection failed.
    Upstream(io::Error),
}

/// A response head from the server, rewritten for the client into the connection's output.
struct Response {
    status: u16,
    body: ResponseBody,
    client_body: ClientBody,
    /// The server keeps the connection.
    keep_alive: bool,
    /// The proxy closes the client connection after this response.
    close: bool,
}

/// Forwards a checked request and relays the response. `Ok` says whether the client connection goes
/// on; `Err` is a refusal to answer (nothing was sent to the client yet).
pub(super) async fn forward(
    conn: &mut Conn,
    shared: &Arc<Shared>,
    plan: Forward,
    mut pending: Pending,
    http11: bool,
    close: bool,
) -> Result<bool, Refused> {
    let config = &shared.config;
    let target = &plan.target;
    let refuse = |error: ProxyError, pending: Pending| Err(Refused { error, pending });
    let mut retried = false;
    let (mut up, early) = 'attempt: loop {
        // 1. A connection, and the head with what of a Content-Length body has arrived.
        let kept = conn
            .upstream
            .take()
            .filter(|u| u.host == target.host && u.port == target.port && u.is_reusable());
        let reused = kept.is_some();
        let mut up = match kept {
            Some(up) => up,
            None => match open(shared, &conn.client, target, config.relay.buffer_bytes).await {
                Ok(up) => up,
                Err(error) => return refuse(error, pending),
            },
        };
        pending.peer = Some(up.peer.ip());
        let prefix = match plan.body {
            RequestBody::Length(n) if !plan.expect => usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(conn.rbuf.len()),
            _ => 0,
        };
        conn.timer
            .as_mut()
            .reset(Instant::now() + config.limits.idle_timeout);
        let sent = deadline(
            &mut conn.timer,
            write_two_to(&up.stream, &conn.out, &conn.rbuf.bytes()[..prefix]),
        )
        .await;
        if let Err(error) = sent {
            if reused && !retried {
                // The kept connection closed under the request: nothing reached a server.
                retried = true;
                continue;
            }
            let what = format!("sending the request: {}", describe(&error));
            return refuse(upstream_failed(shared, target, "protocol", &what), pending);
        }
        conn.rbuf.consume(prefix);
        let mut left = match plan.body {
            RequestBody::Length(n) => n - prefix as u64,
            _ => 0,
        };

        // 2. Expect: 100-continue holds the body until the server asks for it, or a while.
        let mut early = false;
        if plan.expect {
            conn.timer
                .as_mut()
                .reset(Instant::now() + config.upstream.expect_continue_timeout);
            match read_interim(&mut up, &mut conn.timer).await {
                Ok(Interim::Continue) | Ok(Interim::Waited) => {
                    if http11 {
                        conn.out.clear();
                        conn.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                        conn.timer
                            .as_mut()
                            .reset(Instant::now() + config.limits.idle_timeout);
                        if !conn.write_out().await {
                            return Ok(false);
                        }
                    }
                }
                // The final answer came first: the body is never asked for.
                Ok(Interim::Final) => early = true,
                Err(error) => {
                    let what = format!("waiting for 100 Continue: {}", describe(&error));
                    return refuse(upstream_failed(shared, target, "protocol", &what), pending);
                }
            }
        }

        // 3. The rest of the body.
        if !early && plan.body != RequestBody::None {
            let idle = config.limits.idle_timeout;
            match send_body(conn, &mut up, plan.body, &mut left, idle).await {
                Ok(BodySent::Complete) => {}
                Ok(BodySent::Answered) => early = true,
                Err(BodyFailed::Client) => {
                    return refuse(
                        ProxyError::BadRequest("malformed or incomplete request body".into()),
                        pending,
                    )
                }
                Err(BodyFailed::Upstream(error)) => {
                    let what = format!("sending the request body: {}", describe(&error));
                    return refuse(upstream_failed(shared, target, "protocol", &what), pending);
                }
            }
        }

        // 4. The response head (1xx skipped), within upstream.response_timeout.
        conn.timer
            .as_mut()
            .reset(Instant::now() + config.upstream.response_timeout);
        match wait_response(&mut up, &mut conn.timer).await {
            Ok(true) => break 'attempt (up, early),
            Ok(false)
                if reused && !retried && plan.idempotent && plan.body == RequestBody::None =>
            {
                // A kept connection the server closed as the request went: try a new one, once.
                retried = true;
                continue;
            }
            Ok(false) => {
                let what = "the server closed the connection without a response";
                return refuse(upstream_failed(shared, target, "protocol", what), pending);
            }
            Err(error) if error.kind() == io::ErrorKind::TimedOut => {
                shared.upstream_error("timeout");
                tracing::info!(peer = %up.peer, "no response head within upstream.response_timeout");
                let error = ProxyError::GatewayTimeout(format!(
                    "{}:{} sent no response within {:?}",
                    target.host, target.port, config.upstream.response_timeout
                ));
                return refuse(error, pending);
            }
            Err(error) => {
                let what = describe(&error);
                return refuse(upstream_failed(shared, target, "protocol", &what), pending);
            }
        }
    };

    // 5. The head, rewritten for the client.
    let response = {
        let mut storage = wire::field_storage();
        let head = match wire::parse_response(up.rbuf.bytes(), &mut storage, RESPONSE_HEAD_LIMIT) {
            Ok(Some(head)) => head,
            Ok(None) => unreachable!("wait_response saw a complete head"),
            Err(error) => {
                let what = error.to_string();
                return refuse(upstream_failed(shared, target, "protocol", &what), pending);
            }
        };
        let framing = match wire::response_framing(&head, plan.head_method) {
            Ok(framing) => framing,
            Err(what) => return refuse(upstream_failed(shared, target, "protocol", what), pending),
        };
        if framing.ambiguous {
            tracing::info!(peer = %up.peer, "response with both Transfer-Encoding and Content-Length; Content-Length removed");
        }
        let client_body = wire::client_body(framing.body, http11);
        let close = close || early || client_body == ClientBody::Close;
        let fields = Fields(head.fields);
        pending.content_type(fields.get("content-type"));
        let length = match client_body {
            ClientBody::Length(n) => Some(n),
            ClientBody::None => framing.length,
            _ => None,
        };
        conn.out.clear();
        let write = |out: &mut Vec<u8>, date: Option<&[u8]>| {
            let rewrite = ResponseRewrite {
                body: client_body,
                length,
                close,
                keep_alive_http10: !http11 && !close,
                date,
            };
            wire::write_response_head(out, &head, &rewrite);
        };
        if fields.get("date").is_some() {
            write(&mut conn.out, None);
        } else {
            date::with_date(|now| write(&mut conn.out, Some(now)));
        }
        let len = head.len;
        let response = Response {
            status: head.status,
            body: framing.body,
            client_body,
            keep_alive: framing.keep_alive,
            close,
        };
        up.rbuf.consume(len);
        response
    };
    pending.respond(shared, response.status);
    shared
        .metrics
        .first_byte_duration
        .observe(pending.started.elapsed().as_secs_f64());

    // 6. The body.
    let head_bytes = conn.out.len() as u64;
    let limit = shared
        .client_limiters
        .as_ref()
        .map(|(_, download)| (download.clone(), conn.client.client.ip()));
    let relayed = relay_response(
        conn,
        &mut up,
        &response,
        plan.trailers,
        config.limits.idle_timeout,
        limit.as_ref(),
        &config.relay,
    )
    .await;
    let (complete, body_bytes) = match relayed {
        Ok(bytes) => (true, bytes),
        Err(bytes) => (false, bytes),
    };
    pending.finish(shared, &conn.client, head_bytes + body_bytes);
    if complete && response.keep_alive && !early && up.rbuf.is_empty() {
        up.rbuf.shrink();
        conn.upstream = Some(up);
    }
    // A body cut short must not look complete: the client connection ends with it.
    Ok(complete && !response.close)
}

/// An OS error as a client may read it (no addresses, no errno).
fn describe(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::ConnectionReset => "connection reset".into(),
        io::ErrorKind::BrokenPipe => "connection closed".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        io::ErrorKind::UnexpectedEof => "connection closed".into(),
        io::ErrorKind::InvalidData => "invalid response".into(),
        kind => kind.to_string(),
    }
}

/// Runs `work` until the connection's timer fires (then: `TimedOut`).
async fn deadline<T>(
    timer: &mut Pin<Box<Sleep>>,
    work: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::select! {
        biased;
        result = work => result,
        () = timer.as_mut() => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// Writes `a` then `b` to a socket shared with readiness waits, vectored.
async fn write_two_to(stream: &TcpStream, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        stream.writable().await?;
        match stream.try_write_vectored(&[IoSlice::new(a), IoSlice::new(b)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) if n < a.len() => a = &a[n..],
            Ok(n) => {
                b = &b[n - a.len()..];
                a = &[];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until the server sends something (or closes): it answered early. Reads into `rbuf`.
async fn answered(stream: &TcpStream, rbuf: &mut Buffer) -> io::Result<()> {
    loop {
        stream.readable().await?;
        match rbuf.try_fill(stream) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Sends the rest of a request body: `left` bytes of a `Content-Length` body, or a chunked body
/// re-chunked. Stops when the server answers first.
async fn send_body(
    conn: &mut Conn,
    up: &mut Upstream,
    body: RequestBody,
    left: &mut u64,
    idle: Duration,
) -> Result<BodySent, BodyFailed> {
    let mut decoder = (body == RequestBody::Chunked).then(ChunkedDecoder::new);
    loop {
        // What has arrived from the client, framed for the server, into `out`.
        conn.out.clear();
        let mut done = false;
        match &mut decoder {
            None => {
                let take = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(conn.rbuf.len());
                conn.out.extend_from_slice(&conn.rbuf.bytes()[..take]);
                conn.rbuf.consume(take);
                *left -= take as u64;
                done = *left == 0;
            }
            Some(decoder) => {
                while !conn.rbuf.is_empty() && conn.out.len() < FLUSH_AT {
                    let (used, step) = decoder
                        .decode(conn.rbuf.bytes())
                        .map_err(|_| BodyFailed::Client)?;
                    match step {
                        Some(Step::Data(range)) => {
                            chunked::put_chunk_start(&mut conn.out, range.len());
                            conn.out.extend_from_slice(&conn.rbuf.bytes()[range]);
                            chunked::put_chunk_end(&mut conn.out);
                        }
                        Some(Step::Done) => {
                            chunked::put_last_chunk(&mut conn.out, decoder.trailers());
                            done = true;
                        }
                        None => {}
                    }
                    conn.rbuf.consume(used);
                    if done {
                        break;
                    }
                }
            }
        }
        if !conn.out.is_empty() {
            conn.timer.as_mut().reset(Instant::now() + idle);
            tokio::select! {
                biased;
                written = write_two_to(&up.stream, &conn.out, &[]) => written.map_err(BodyFailed::Upstream)?,
                answer = answered(&up.stream, &mut up.rbuf) => {
                    return answer.map(|()| BodySent::Answered).map_err(BodyFailed::Upstream);
                }
                () = conn.timer.as_mut() => return Err(BodyFailed::Upstream(io::ErrorKind::TimedOut.into())),
            }
        }
        if done {
            return Ok(BodySent::Complete);
        }
        // The decoder stopped at FLUSH_AT with bytes left: frame those before reading more (the client
        // may have sent its last chunk already and be waiting for the answer).
        if !conn.rbuf.is_empty() {
            continue;
        }
        // More from the client (or the server's early answer).
        conn.timer.as_mut().reset(Instant::now() + idle);
        tokio::select! {
            biased;
            answer = answered(&up.stream, &mut up.rbuf) => {
                return answer.map(|()| BodySent::Answered).map_err(BodyFailed::Upstream);
            }
            read = conn.rbuf.fill(&mut conn.io) => match read {
                Ok(0) | Err(_) => return Err(BodyFailed::Client),
                Ok(_) => {}
            },
            () = conn.timer.as_mut() => return Err(BodyFailed::Client),
        }
    }
}

/// What came before the final response under `Expect: 100-continue`.
enum Interim {
    /// 100 Continue: send the body.
    Continue,
    /// Nothing within `expect_continue_timeout`: send the body anyway (RFC 9110 §10.1.1).
    Waited,
    /// A final response: the body is not wanted.
    Final,
}

/// Reads until 100 Continue (consumed), a final response head (left in the buffer), or the timer.
async fn read_interim(up: &mut Upstream, timer: &mut Pin<Box<Sleep>>) -> io::Result<Interim> {
    loop {
        if let Some((status, len)) = peek_status(&up.rbuf)? {
            if status == 100 {
                up.rbuf.consume(len);
                return Ok(Interim::Continue);
            }
            if (101..200).contains(&status) {
                up.rbuf.consume(len);
                continue;
            }
            return Ok(Interim::Final);
        }
        tokio::select! {
            biased;
            read = up.rbuf.fill(&mut up.stream) => {
                if read? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            () = timer.as_mut() => return Ok(Interim::Waited),
        }
    }
}

/// The status and head length of a complete response head at the start of `rbuf`.
fn peek_status(rbuf: &Buffer) -> io::Result<Option<(u16, usize)>> {
    let mut storage = wire::field_storage();
    match wire::parse_response(rbuf.bytes(), &mut storage, RESPONSE_HEAD_LIMIT) {
        Ok(Some(head)) => Ok(Some((head.status, head.len))),
        Ok(None) => Ok(None),
        Err(error) => Err(io::Error::new(io::ErrorKind::InvalidData, error)),
    }
}

/// Reads until a final response head is complete at the start of the buffer (informational responses
/// skipped; a 101 the proxy never asked for is an error). `Ok(false)`: the server closed before sending
/// anything.
async fn wait_response(up: &mut Upstream, timer: &mut Pin<Box<Sleep>>) -> io::Result<bool> {
    let mut received = !up.rbuf.is_empty();
    loop {
        if let Some((status, len)) = peek_status(&up.rbuf)? {
            match status {
                101 => return Err(io::Error::new(io::ErrorKind::InvalidData, "unasked 101")),
                100..=199 => {
                    up.rbuf.consume(len);
                    continue;
                }
                _ => return Ok(true),
            }
        }
        let read = deadline(timer, up.rbuf.fill(&mut up.stream)).await?;
        if read == 0 {
            return if received {
                Err(io::ErrorKind::UnexpectedEof.into())
            } else {
                Ok(false)
            };
        }
        received = true;
    }
}

/// Relays a response body to the client after the head in `conn.out`. Returns the body bytes written
/// (framing excluded); `Err` when the body could not be relayed whole (the client connection must
/// then end).
async fn relay_response(
    conn: &mut Conn,
    up: &mut Upstream,
    response: &Response,
    trailers: bool,
    idle: Duration,
    limit: Option<&(Arc<mptcp_throttle::ClientRateLimiter>, std::net::IpAddr)>,
    relay_config: &RelayConfig,
) -> Result<u64, u64> {
    let mut sent = 0u64;
    match (response.body, response.client_body) {
        (ResponseBody::None, _) => {
            conn.timer.as_mut().reset(Instant::now() + idle);
            return if conn.write_out().await {
                Ok(0)
            } else {
                Err(0)
            };
        }
        (ResponseBody::Length(length), _) => {
            // Byte for byte: straight from the upstream buffer, the head with the first part.
            let mut left = length;
            let mut first = true;
            let mut spliceable = true;
            while left > 0 || first {
                if !first && spliceable && up.rbuf.is_empty() && left >= SPLICE_AT {
                    spliceable = false;
                    if let Some(spliced) =
                        splice_body(conn, up, left, idle, limit, relay_config).await
                    {
                        return spliced.map(|n| sent + n).map_err(|n| sent + n);
                    }
                }
                if up.rbuf.is_empty() && left > 0 {
                    conn.timer.as_mut().reset(Instant::now() + idle);
                    match deadline(&mut conn.timer, up.rbuf.fill(&mut up.stream)).await {
                        Ok(0) | Err(_) => {
                            if first {
                                // At least the head, so the client sees the cut (a short body).
                                let _ = conn.write_head_and(&[]).await;
                            }
                            return Err(sent);
                        }
                        Ok(_) => {}
                    }
                }
                let take = usize::try_from(left)
                    .unwrap_or(usize::MAX)
                    .min(up.rbuf.len());
                if let Some((limiter, client)) = limit {
                    limiter
                        .until_ready(*client, u32::try_from(take).unwrap_or(u32::MAX))
                        .await;
                }
                conn.timer.as_mut().reset(Instant::now() + idle);
                let written = if first {
                    deadline(
                        &mut conn.timer,
                        write_head_then(&mut conn.io, &conn.out, &up.rbuf.bytes()[..take]),
                    )
                    .await
                } else {
                    deadline(
                        &mut conn.timer,
                        write_all(&mut conn.io, &up.rbuf.bytes()[..take]),
                    )
                    .await
                };
                if written.is_err() {
                    return Err(sent);
                }
                first = false;
                up.rbuf.consume(take);
                left -= take as u64;
                sent += take as u64;
            }
            Ok(sent)
        }
        (ResponseBody::Chunked, client_body) => {
            let rechunk = client_body == ClientBody::Chunked;
            let mut decoder = ChunkedDecoder::new();
            loop {
                let mut done = false;
                while !up.rbuf.is_empty() && conn.out.len() < FLUSH_AT {
                    let Ok((used, step)) = decoder.decode(up.rbuf.bytes()) else {
                        tracing::info!(peer = %up.peer, "malformed chunked response body");
                        let _ = flush(conn, idle, limit).await;
                        return Err(sent);
                    };
                    match step {
                        Some(Step::Data(range)) => {
                            if rechunk {
                                chunked::put_chunk_start(&mut conn.out, range.len());
                            }
                            conn.out.extend_from_slice(&up.rbuf.bytes()[range.clone()]);
                            if rechunk {
                                chunked::put_chunk_end(&mut conn.out);
                            }
                            sent += range.len() as u64;
                        }
                        Some(Step::Done) => {
                            if rechunk {
                                let fields: &[u8] = if trailers { decoder.trailers() } else { b"" };
                                chunked::put_last_chunk(&mut conn.out, fields);
                            }
                            done = true;
                        }
                        None => {}
                    }
                    up.rbuf.consume(used);
                    if done {
                        break;
                    }
                }
                if flush(conn, idle, limit).await.is_err() {
                    return Err(sent);
                }
                if done {
                    return Ok(sent);
                }
                if up.rbuf.is_empty() {
                    conn.timer.as_mut().reset(Instant::now() + idle);
                    match deadline(&mut conn.timer, up.rbuf.fill(&mut up.stream)).await {
                        Ok(0) | Err(_) => return Err(sent),
                        Ok(_) => {}
                    }
                }
            }
        }
        (ResponseBody::Close, client_body) => {
            // Until the server closes; chunked for an HTTP/1.1 client, so its connection stays.
            let rechunk = client_body == ClientBody::Chunked;
            loop {
                if !up.rbuf.is_empty() {
                    let data = up.rbuf.bytes();
                    if rechunk {
                        chunked::put_chunk_start(&mut conn.out, data.len());
                    }
                    conn.out.extend_from_slice(data);
                    if rechunk {
                        chunked::put_chunk_end(&mut conn.out);
                    }
                    sent += data.len() as u64;
                    let len = data.len();
                    up.rbuf.consume(len);
                }
                if flush(conn, idle, limit).await.is_err() {
                    return Err(sent);
                }
                conn.timer.as_mut().reset(Instant::now() + idle);
                match deadline(&mut conn.timer, up.rbuf.fill(&mut up.stream)).await {
                    Ok(0) => {
                        // The clean end of a close-delimited body (a reset is an error, below).
                        if rechunk {
                            chunked::put_last_chunk(&mut conn.out, b"");
                        }
                        return match flush(conn, idle, limit).await {
                            Ok(()) => Ok(sent),
                            Err(()) => Err(sent),
                        };
                    }
                    Ok(_) => {}
                    Err(_) => return Err(sent),
                }
            }
        }
    }
}

/// Splices the last `left` bytes of a `Content-Length` body from the server to the client, with no copy
/// through user space and no read past the body (the upstream connection may be kept). `None` when the
/// relay mode gives no pipe (copy, or auto past the user's pipe budget): the caller copies instead.
/// Otherwise as [`relay_response`]: the bytes written, `Err` when the body was cut.
async fn splice_body(
    conn: &mut Conn,
    up: &Upstream,
    mut left: u64,
    idle: Duration,
    limit: Option<&(Arc<mptcp_throttle::ClientRateLimiter>, std::net::IpAddr)>,
    relay_config: &RelayConfig,
) -> Option<Result<u64, u64>> {
    let pipe = match relay::pipe_for(relay_config.mode, relay_config.buffer_bytes) {
        Ok(Some(pipe)) => pipe,
        Ok(None) => return None,
        Err(error) => {
            tracing::debug!(%error, "no pipe for a response body: copying it");
            return None;
        }
    };
    let mut sent = 0u64;
    while left > 0 {
        let max = usize::try_from(left)
            .unwrap_or(usize::MAX)
            .min(relay_config.buffer_bytes);
        conn.timer.as_mut().reset(Instant::now() + idle);
        let n = match deadline(&mut conn.timer, relay::splice_in(&up.stream, &pipe, max)).await {
            Ok(0) | Err(_) => return Some(Err(sent)),
            Ok(n) => n,
        };
        if let Some((limiter, client)) = limit {
            limiter
                .until_ready(*client, u32::try_from(n).unwrap_or(u32::MAX))
                .await;
        }
        conn.timer.as_mut().reset(Instant::now() + idle);
        let Ok(sink) = conn.io.socket() else {
            return Some(Err(sent));
        };
        if deadline(&mut conn.timer, relay::splice_out(&pipe, sink, n))
            .await
            .is_err()
        {
            return Some(Err(sent));
        }
        conn.io.wrote(n);
        left -= n as u64;
        sent += n as u64;
    }
    Some(Ok(sent))
}

/// Writes `conn.out` to the client (after the rate limit, if any) and clears it.
async fn flush(
    conn: &mut Conn,
    idle: Duration,
    limit: Option<&(Arc<mptcp_throttle::ClientRateLimiter>, std::net::IpAddr)>,
) -> Result<(), ()> {
    if conn.out.is_empty() {
        return Ok(());
    }
    if let Some((limiter, client)) = limit {
        limiter
            .until_ready(*client, u32::try_from(conn.out.len()).unwrap_or(u32::MAX))
            .await;
    }
    conn.timer.as_mut().reset(Instant::now() + idle);
    let written = conn.write_out().await;
    conn.out.clear();
    if written {
        Ok(())
    } else {
        Err(())
    }
}

/// Writes `head` then `body` to the client.
async fn write_head_then(
    io: &mut crate::connection::ClientIo,
    head: &[u8],
    body: &[u8],
) -> io::Result<()> {
    super::conn::write_two(io, head, body).await
}

/// Writes all of `data` to the client.
async fn write_all(io: &mut crate::connection::ClientIo, data: &[u8]) -> io::Result<()> {
    tokio::io::AsyncWriteExt::write_all(io, data).await
}
