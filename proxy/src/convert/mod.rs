//! RFC 8803 0-RTT TCP Convert: the converter (a `convert` listener of `mptcp-proxy`) and the client
//! agent (`mptcp-convert`), sharing one wire format.
//!
//! A client opens an MPTCP connection to the converter and puts a Convert message in its SYN (TCP Fast
//! Open): a fixed header and a Connect TLV naming the server. With TFO the kernel hands the converter
//! the connection as soon as that SYN arrives, so [`serve`] reads the message and sends its own SYN to
//! the server before the client's handshake has even completed. Once the server answers, the converter
//! sends its Convert message (a bare header, or Error TLVs) and relays both ways exactly like a CONNECT
//! tunnel: the same relay, limits, throttle hooks, metrics and access log (method `CONVERT`).
//!
//! - [`wire`]: the fixed header and every TLV as `Packet`/`Repr` (§4).
//! - [`converter`]: the sans-IO decisions: what a request asks, which error answers it, cookies.
//! - [`agent`]: the client side, for applications that do not speak Convert (SOCKS5 and transparent).

pub mod agent;
pub mod converter;
pub mod wire;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use socket2::SockRef;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::access_log::Entry;
use crate::config::ConvertConfig;
use crate::connection::ClientConnection;
use crate::http::Shared;
use crate::metrics::KindLabel;
use crate::relay::{relay, write_all};
use crate::sockets::stream_socket;
use socket2::Domain;

use converter::{answer_for, connect_error, decide, ConnectRequest, Decision};
pub use converter::{CookieJar, Policy};
use wire::{ErrorCode, MessageRepr, TlvRepr};

/// One converter's settings, shared by its connections.
#[derive(Debug)]
pub struct Converter {
    policy: Policy,
}

impl Converter {
    /// Builds the converter from `[convert]`: with `require_cookie`, a cookie secret from
    /// `cookie_secret_file` or, without one, random for this process.
    pub fn new(config: &ConvertConfig) -> io::Result<Self> {
        let cookies = if config.require_cookie {
            let secret = match &config.cookie_secret_file {
                Some(path) => secret_from_file(path)?,
                None => random_secret()?,
            };
            Some(CookieJar::new(secret))
        } else {
            None
        };
        Ok(Self {
            policy: Policy { cookies },
        })
    }
}

/// A 32-byte secret from the first 32 bytes of a file (at least 16 bytes; shorter files are padded
/// with a hash of their content, so any length of real randomness works).
fn secret_from_file(path: &std::path::Path) -> io::Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path)?;
    if bytes.len() < 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: a cookie secret needs at least 16 bytes",
                path.display()
            ),
        ));
    }
    Ok(Sha256::digest(&bytes).into())
}

fn random_secret() -> io::Result<[u8; 32]> {
    let mut secret = [0u8; 32];
    // SAFETY: getrandom writes at most secret.len() bytes into the buffer.
    let n = unsafe { libc::getrandom(secret.as_mut_ptr().cast(), secret.len(), 0) };
    if n != secret.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(secret)
}

/// Enables TCP Fast Open on a listening socket with room for `queue` pending TFO requests, and warns
/// when `net.ipv4.tcp_fastopen` lacks the server bit (then the Convert message arrives one round trip
/// later, after the handshake; everything still works).
pub fn enable_fastopen(listener: &std::net::TcpListener, queue: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(queue).unwrap_or(libc::c_int::MAX);
    // SAFETY: value is a valid c_int for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    match std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fastopen")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
    {
        Some(flags) if flags & 0x2 != 0 => {}
        flags => tracing::warn!(
            ?flags,
            "net.ipv4.tcp_fastopen lacks the server bit (2): Convert requests wait for the handshake \
             (one more round trip); set net.ipv4.tcp_fastopen=3"
        ),
    }
    Ok(())
}

/// The access-log status and Squid result code of an answered error.
fn log_status(code: ErrorCode) -> (u16, &'static str) {
    match code {
        ErrorCode::NotAuthorized | ErrorCode::MissingCookie => (403, "TCP_DENIED"),
        ErrorCode::ResourceExceeded => (503, "NONE_NONE"),
        ErrorCode::ConnectionReset
        | ErrorCode::DestinationUnreachable
        | ErrorCode::NetworkFailure => (502, "TCP_MISS"),
        _ => (400, "NONE_NONE"),
    }
}

/// Sends `message`, half-closes, and reads what the client still sends (so closing does not reset
/// the answer away), for at most 5 s.
async fn answer_and_close(stream: &TcpStream, message: &MessageRepr) {
    let Ok(bytes) = message.to_bytes() else {
        return;
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        write_all(stream, &bytes).await?;
        SockRef::from(stream).shutdown(std::net::Shutdown::Write)?;
        let mut sink = [0u8; 4096];
        loop {
            stream.readable().await?;
            match stream.try_read(&mut sink) {
                Ok(0) => return Ok::<(), io::Error>(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
}

/// Refuses a connection at accept (client ACL, limits) with an Error TLV, without reading its request.
pub async fn refuse(mut stream: TcpStream, code: ErrorCode) {
    answer_and_close(&stream, &MessageRepr::new(vec![TlvRepr::error(code, &[])])).await;
    let _ = stream.shutdown().await;
}

/// Why reading a request stopped.
enum ReadEnd {
    Decided(Decision, Vec<u8>),
    /// EOF or an error; `partial` when part of a message had arrived.
    Closed {
        partial: bool,
    },
    TimedOut,
}

/// Reads until [`decide`] can decide, within `limit`. The TFO SYN's data is usually all there already.
async fn read_request(
    stream: &TcpStream,
    received: &[u8],
    client: IpAddr,
    policy: &Policy,
    limit: std::time::Duration,
) -> ReadEnd {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buffer = vec![0u8; REQUEST_BUFFER.max(received.len())];
    buffer[..received.len()].copy_from_slice(received);
    let mut filled = received.len();
    loop {
        match decide(&buffer[..filled], client, policy) {
            Decision::NeedMore { .. } if filled == buffer.len() => {
                // Cannot happen: a message is at most 1020 bytes.
                return ReadEnd::Closed { partial: true };
            }
            Decision::NeedMore { .. } => {}
            decision => {
                buffer.truncate(filled);
                return ReadEnd::Decided(decision, buffer);
            }
        }
        let read = tokio::time::timeout_at(deadline, async {
            loop {
                match stream.try_read(&mut buffer[filled..]) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.readable().await?,
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        match read {
            Err(_) => return ReadEnd::TimedOut,
            Ok(Ok(0)) | Ok(Err(_)) => {
                return ReadEnd::Closed {
                    partial: filled > 0,
                }
            }
            Ok(Ok(n)) => filled += n,
        }
    }
}

/// Bytes read for a request: a whole message (at most 1020 bytes) plus early data that came with it.
const REQUEST_BUFFER: usize = 4096;

fn count_upstream_error(shared: &Shared, kind: &'static str) {
    shared
        .metrics
        .upstream_errors
        .get_or_create(&KindLabel { kind })
        .inc();
}

/// Starts connecting to the Connect TLV's destination, without waiting: destination ACL, the client's
/// TCP options on the socket (MSS, MPTCP), then a non-blocking `connect`, which sends the SYN now.
/// Convert names an address, never a host name, so there is nothing to resolve; the options must be
/// set before `connect`, and the RFC's error codes need the OS error, so this does not go through the
/// HTTP proxy's `connect_upstream`. [`finish_connect`] waits for the handshake.
fn start_connect(shared: &Shared, request: &ConnectRequest) -> Result<TcpStream, ErrorCode> {
    let destination = request.destination;
    let allowed = shared
        .acl
        .check_convert_port(destination.port())
        .and_then(|()| shared.acl.check_destination(destination.ip()));
    if let Err(denied) = allowed {
        count_upstream_error(shared, "denied");
        tracing::info!(%destination, "convert refused: {denied}");
        return Err(ErrorCode::NotAuthorized);
    }
    let mptcp = shared.config.upstream.mptcp || request.mptcp;
    let (socket, _) =
        stream_socket(Domain::for_address(destination), mptcp).map_err(|e| connect_error(&e))?;
    let setup = socket
        .set_nonblocking(true)
        .and_then(|()| socket.set_tcp_nodelay(true));
    setup.map_err(|e| connect_error(&e))?;
    if let Some(mss) = request.mss {
        // Best effort: the kernel clamps it to what the route allows.
        let _ = socket.set_tcp_mss(u32::from(mss));
    }
    match socket.connect(&destination.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(error) => return Err(upstream_failed(shared, destination, &error)),
    }
    TcpStream::from_std(socket.into()).map_err(|e| connect_error(&e))
}

fn upstream_failed(shared: &Shared, destination: SocketAddr, error: &io::Error) -> ErrorCode {
    let code = connect_error(error);
    count_upstream_error(
        shared,
        if code == ErrorCode::ConnectionReset {
            "refused"
        } else {
            "unreachable"
        },
    );
    tracing::info!(%destination, %error, "convert: upstream connection failed");
    code
}

/// Waits until a started connection is established (or fails), within `upstream.connect_timeout`.
async fn finish_connect(
    shared: &Shared,
    destination: SocketAddr,
    stream: TcpStream,
) -> Result<TcpStream, ErrorCode> {
    let established = tokio::time::timeout(shared.config.upstream.connect_timeout, async {
        stream.writable().await?;
        match stream.take_error()? {
            Some(error) => Err(error),
            // Writable without an error: connected (peer_addr fails otherwise).
            None => stream.peer_addr().map(|_| ()),
        }
    })
    .await;
    match established {
        Ok(Ok(())) => Ok(stream),
        Ok(Err(error)) => Err(upstream_failed(shared, destination, &error)),
        Err(_) => {
            count_upstream_error(shared, "timeout");
            Err(ErrorCode::DestinationUnreachable)
        }
    }
}

/// A request already read, and its upstream connection already started, by [`prefetch`].
#[derive(Debug)]
pub struct Prefetched {
    received: Vec<u8>,
    started: Option<(ConnectRequest, Result<TcpStream, ErrorCode>)>,
}

/// The first step for a just-accepted connection of a `convert` listener, once the client ACL and the
/// limits let it in: with TFO the Convert message came in the SYN and is readable already, so it is
/// read and decided, and the upstream SYN sent, right here in the accept loop, before any bookkeeping
/// or hand-over to another task. [`spawn`] does the rest (and reads the message when it was not
/// there yet).
pub fn prefetch(
    shared: &Shared,
    converter: &Converter,
    stream: &TcpStream,
    client: IpAddr,
) -> Prefetched {
    let mut buffer = vec![0u8; REQUEST_BUFFER];
    let n = stream.try_read(&mut buffer).unwrap_or(0);
    buffer.truncate(n);
    let started = match decide(&buffer, client, &converter.policy) {
        Decision::Connect(request) => {
            let connecting = start_connect(shared, &request);
            Some((request, connecting))
        }
        _ => None,
    };
    Prefetched {
        received: buffer,
        started,
    }
}

/// Serves the connection [`prefetch`] started, in its own task.
pub fn spawn(
    shared: Arc<Shared>,
    converter: Arc<Converter>,
    stream: TcpStream,
    client: Arc<ClientConnection>,
    prefetched: Prefetched,
) {
    tokio::spawn(serve(shared, converter, stream, client, prefetched));
}

/// `struct tcp_info` offsets (linux/tcp.h): options bits, window scales, the send MSS.
const TCPI_OPTIONS: usize = 5;
const TCPI_WSCALE: usize = 6;
const TCPI_SND_MSS: usize = 16;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;

/// The TCP options the server's SYN+ACK carried, as far as a socket can tell (§4.6): a socket cannot
/// read the SYN+ACK, so they are rebuilt from `TCP_INFO`: the server's MSS (the send MSS plus the
/// timestamp option's 12 bytes when in use), SACK-permitted, timestamps (values zero: not visible) and
/// the server's window scale.
fn server_options(stream: &TcpStream) -> Vec<u8> {
    let mut info = [0u8; 32];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: info is writable for len bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || (len as usize) < TCPI_SND_MSS + 4 {
        return Vec::new();
    }
    let flags = info[TCPI_OPTIONS];
    let snd_mss = u32::from_ne_bytes(
        info[TCPI_SND_MSS..TCPI_SND_MSS + 4]
            .try_into()
            .expect("4 bytes"),
    );
    let timestamps = flags & TCPI_OPT_TIMESTAMPS != 0;
    let mss = snd_mss + if timestamps { 12 } else { 0 };
    let mut options = vec![2, 4];
    options.extend_from_slice(&u16::try_from(mss).unwrap_or(u16::MAX).to_be_bytes());
    if flags & TCPI_OPT_SACK != 0 {
        options.extend_from_slice(&[4, 2]);
    }
    if timestamps {
        options.extend_from_slice(&[8, 10, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
    if flags & TCPI_OPT_WSCALE != 0 {
        options.extend_from_slice(&[1, 3, 3, info[TCPI_WSCALE] & 0x0f]);
    }
    options
}

/// Serves one client connection of a `convert` listener: reads its Convert message (unless
/// [`prefetch`] did), connects upstream, answers, relays, and logs one access-log line.
async fn serve(
    shared: Arc<Shared>,
    converter: Arc<Converter>,
    stream: TcpStream,
    client: Arc<ClientConnection>,
    prefetched: Prefetched,
) {
    let started = Instant::now();
    let mut entry = Entry {
        started: SystemTime::now(),
        elapsed: Default::default(),
        client: client.client.ip(),
        result: "TCP_TUNNEL",
        status: 200,
        bytes: 0,
        method: "CONVERT".into(),
        url: "-".into(),
        user: None,
        peer: None,
        content_type: None,
        transport: client.transport,
        subflows: 1,
    };
    let (request, received, connecting) = match prefetched.started {
        Some((request, connecting)) => (request, prefetched.received, Some(connecting)),
        None => {
            let limit = shared.config.limits.header_read_timeout;
            let ip = client.client.ip();
            match read_request(&stream, &prefetched.received, ip, &converter.policy, limit).await {
                ReadEnd::Decided(Decision::Connect(request), received) => (request, received, None),
                ReadEnd::Decided(Decision::Answer(message), _) => {
                    if let Some((code, _)) = message.error() {
                        (entry.status, entry.result) = log_status(code);
                        tracing::info!(client = %client.client, error = %code, "convert request refused");
                    } else {
                        entry.result = "NONE_NONE";
                    }
                    entry.bytes = message.buffer_len() as u64;
                    answer_and_close(&stream, &message).await;
                    return finish(&shared, &client, &stream, entry, started);
                }
                ReadEnd::Decided(Decision::NeedMore { .. }, _)
                | ReadEnd::Closed { partial: false } => {
                    entry.status = 400;
                    entry.result = "NONE_NONE";
                    return finish(&shared, &client, &stream, entry, started);
                }
                ReadEnd::Closed { partial: true } | ReadEnd::TimedOut => {
                    // Cut short (the client half-closed and can still read why) or too slow.
                    let message =
                        MessageRepr::new(vec![TlvRepr::error(ErrorCode::MalformedMessage, &[])]);
                    (entry.status, entry.result) = (400, "NONE_NONE");
                    answer_and_close(&stream, &message).await;
                    return finish(&shared, &client, &stream, entry, started);
                }
            }
        }
    };
    entry.url = request.destination.to_string();
    let connecting = connecting.unwrap_or_else(|| start_connect(&shared, &request));
    let connected = match connecting {
        Ok(stream) => finish_connect(&shared, request.destination, stream).await,
        Err(code) => Err(code),
    };
    let upstream = match connected {
        Ok(upstream) => upstream,
        Err(code) => {
            (entry.status, entry.result) = log_status(code);
            let message = MessageRepr::new(vec![TlvRepr::error(code, &[])]);
            entry.bytes = message.buffer_len() as u64;
            answer_and_close(&stream, &message).await;
            return finish(&shared, &client, &stream, entry, started);
        }
    };
    client.upstream_connected();
    entry.peer = Some(request.destination.ip());
    if let Some(events) = &shared.throttle_events {
        crate::throttle::attach_destination(
            events,
            client.local,
            client.client,
            &request.destination.ip().to_string(),
            request.destination,
        );
    }
    let options = if request.wants_extended_header {
        server_options(&upstream)
    } else {
        Vec::new()
    };
    let answer = answer_for(&request, &options)
        .to_bytes()
        .expect("an answer is a few words");
    let stream = Arc::new(stream);
    if let Err(error) = write_all(&stream, &answer).await {
        tracing::debug!(client = %client.client, %error, "convert answer not delivered");
        entry.status = 499;
    } else {
        let upstream = Arc::new(upstream);
        let early = &received[request.message_len..];
        let settings = shared.relay_settings(&client);
        let stats = client
            .sampling_subflows(relay(&stream, &upstream, early, settings))
            .await
            .unwrap_or_else(|error| {
                tracing::debug!(%error, "convert tunnel ended with an error");
                Default::default()
            });
        entry.bytes = answer.len() as u64 + stats.download_bytes;
    }
    finish(&shared, &client, &stream, entry, started);
}

fn finish(
    shared: &Shared,
    client: &ClientConnection,
    stream: &TcpStream,
    mut entry: Entry,
    started: Instant,
) {
    entry.elapsed = started.elapsed();
    entry.subflows = client.max_subflows();
    shared.access_log.write(&entry);
    client.closed(stream);
}

/// Parses `--convert ADDR[:PORT]`: the port defaults to 5124 (§8.1).
pub fn parse_listen_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, wire::DEFAULT_PORT))
        .map_err(|_| format!("{text:?}: expected ADDR or ADDR:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn convert_addresses_default_to_port_5124() {
        assert_eq!(
            parse_listen_address("10.0.1.1"),
            Ok("10.0.1.1:5124".parse().expect("literal"))
        );
        assert_eq!(
            parse_listen_address("[fd00:1::1]"),
            Ok("[fd00:1::1]:5124".parse().expect("literal"))
        );
        assert_eq!(
            parse_listen_address("0.0.0.0:6000"),
            Ok("0.0.0.0:6000".parse().expect("literal"))
        );
        assert!(parse_listen_address("nowhere").is_err());
    }
}
