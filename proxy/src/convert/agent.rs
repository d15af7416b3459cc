//! The client agent `mptcp-convert`: lets applications that know nothing of Convert reach any server
//! through a converter. Applications connect to it over plain TCP on the local host, as a SOCKS5 proxy
//! (RFC 1928, CONNECT, no authentication) or redirected by nftables (transparent mode); for each
//! connection the agent opens an MPTCP connection to the converter with TCP Fast Open, so its SYN
//! carries the Convert message (fixed header, Connect TLV and the cached Cookie TLV if the converter
//! asked for one) and, in transparent mode, whatever the application already sent.
//!
//! By default the SOCKS5 reply is immediate and the application's first bytes (an HTTP request, a TLS
//! ClientHello) ride in the SYN with the Convert message ("optimistic data"): an MPTCP converter
//! cannot answer before the client's third ACK (Linux 6.18), so waiting for its answer before letting
//! the application speak would cost the round trip Convert saves. A converter's Error TLV then resets
//! the application's connection (and is logged); with `strict` the SOCKS5 reply waits for the answer
//! and carries the error as its reply code. Transparent mode always sends early data and resets on
//! errors. A Missing Cookie answer is retried once with the cookie it carried.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use socket2::{Domain, SockRef};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::wire::{tlv_type, ErrorCode, MessageRepr, Parsed, TlvRepr, MAX_MESSAGE_LEN};
use crate::config::RelayMode;
use crate::relay::{relay, write_all, RelaySettings};
use crate::sockets::{original_destination, stream_socket};

/// What the agent serves.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The converter.
    pub converter: SocketAddr,
    /// Where to serve SOCKS5, if anywhere.
    pub socks: Option<SocketAddr>,
    /// Where nftables REDIRECT delivers connections, if anywhere.
    pub transparent: Option<SocketAddr>,
    /// How long to wait for the converter's answer (connection, upstream connection, answer).
    pub connect_timeout: Duration,
    /// Close a relay with no bytes either way for this long.
    pub idle_timeout: Duration,
    /// SOCKS5: answer success at once and send the application's first bytes in the SYN to the
    /// converter (optimistic data); a converter error then resets the application's connection. When
    /// false, the SOCKS5 reply waits for the converter's answer and carries its error.
    pub optimistic: bool,
    /// How long to wait for the application's first bytes before sending the SYN without them
    /// (optimistic SOCKS5 and transparent mode; protocols where the server speaks first pay this once).
    pub early_data_wait: Duration,
}

/// Why a connection through the converter failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The converter answered with an Error TLV.
    #[error("the converter refused: {0}")]
    Refused(ErrorCode),
    /// The converter's answer is not a Convert message.
    #[error("the converter's answer is not a valid Convert message: {0}")]
    BadAnswer(String),
    /// No answer in time.
    #[error("no answer from the converter within {0:?}")]
    Timeout(Duration),
    /// Socket errors.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// `TCP_FASTOPEN_CONNECT` (linux/tcp.h): `connect` returns at once and the SYN leaves with the first
/// write, carrying its data when a TFO cookie for the converter is cached.
const TCP_FASTOPEN_CONNECT: libc::c_int = 30;

/// The receive buffer of connections to the converter (see [`Client::open`]).
const RECEIVE_BUFFER: usize = 8 << 20;

/// The agent's connection maker: the converter, its cookie (if it asked for one), the timeout.
#[derive(Debug)]
pub struct Client {
    converter: SocketAddr,
    cookie: Mutex<Option<Vec<u8>>>,
    timeout: Duration,
}

/// A connection to the server through the converter, after the converter's answer.
#[derive(Debug)]
pub struct Converted {
    /// The MPTCP connection to the converter, positioned after its Convert message.
    pub stream: TcpStream,
    /// Server bytes that arrived with the answer: they go to the application first.
    pub early: Vec<u8>,
    /// The converter's answer.
    pub answer: MessageRepr,
}

impl Client {
    /// A client of `converter`.
    pub fn new(converter: SocketAddr, timeout: Duration) -> Self {
        Self {
            converter,
            cookie: Mutex::new(None),
            timeout,
        }
    }

    /// The cookie the converter gave, if any.
    pub fn cookie(&self) -> Option<Vec<u8>> {
        self.cookie
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The Convert message asking for `destination`.
    pub fn request(&self, destination: SocketAddr) -> MessageRepr {
        let mut tlvs = Vec::new();
        if let Some(cookie) = self.cookie() {
            tlvs.push(TlvRepr::cookie(&cookie));
        }
        tlvs.push(TlvRepr::connect(destination, &[]));
        MessageRepr::new(tlvs)
    }

    /// Opens a connection to `destination` through the converter, sending `early` (application bytes
    /// already at hand) in the same SYN. Retries once when the converter asks for a cookie.
    pub async fn connect(
        &self,
        destination: SocketAddr,
        early: &[u8],
    ) -> Result<Converted, AgentError> {
        for attempt in 0..2 {
            let converted = self.attempt(destination, early).await?;
            match converted.answer.error() {
                None => return Ok(converted),
                Some((ErrorCode::MissingCookie, _)) if attempt == 0 => {
                    let Some(TlvRepr::Cookie { opaque }) = converted.answer.find(tlv_type::COOKIE)
                    else {
                        return Err(AgentError::Refused(ErrorCode::MissingCookie));
                    };
                    *self.cookie.lock().unwrap_or_else(|p| p.into_inner()) = Some(opaque.clone());
                }
                Some((code, _)) => return Err(AgentError::Refused(code)),
            }
        }
        Err(AgentError::Refused(ErrorCode::MissingCookie))
    }

    async fn attempt(
        &self,
        destination: SocketAddr,
        early: &[u8],
    ) -> Result<Converted, AgentError> {
        let mut first = self
            .request(destination)
            .to_bytes()
            .map_err(|e| AgentError::BadAnswer(e.to_string()))?;
        first.extend_from_slice(early);
        let stream = self.open()?;
        tokio::time::timeout(self.timeout, async {
            write_all(&stream, &first).await?;
            read_answer(stream).await
        })
        .await
        .map_err(|_| AgentError::Timeout(self.timeout))?
    }

    /// An MPTCP (else TCP) socket to the converter with `TCP_FASTOPEN_CONNECT`, connecting.
    fn open(&self) -> io::Result<TcpStream> {
        let (socket, _) = stream_socket(Domain::for_address(self.converter), true)?;
        let one: libc::c_int = 1;
        // SAFETY: one is a valid c_int for the duration of the call. Failure (no TFO) only costs the
        // round trip TFO saves.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_TCP,
                TCP_FASTOPEN_CONNECT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        // A fixed receive buffer: with data in its SYN (TFO), an MPTCP socket's receive-buffer
        // autotuning leaves its MPTCP-level window behind its subflows' (Linux 6.18: downloads stall
        // in 200 ms retransmission steps, MPTcpExtNoDSSInWindow counting the drops); without
        // autotuning the window is right from the start. The kernel caps it at net.core.rmem_max.
        socket.set_recv_buffer_size(RECEIVE_BUFFER)?;
        match socket.connect(&self.converter.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        TcpStream::from_std(socket.into())
    }
}

/// Reads the converter's Convert message; bytes after it are the server's.
async fn read_answer(mut stream: TcpStream) -> Result<Converted, AgentError> {
    let mut buffer = Vec::with_capacity(MAX_MESSAGE_LEN + 4096);
    let mut chunk = vec![0u8; 4096];
    loop {
        match MessageRepr::parse(&buffer) {
            Ok(Parsed::Complete { message, len }) => {
                return Ok(Converted {
                    stream,
                    early: buffer[len..].to_vec(),
                    answer: message,
                })
            }
            Ok(Parsed::Incomplete { .. }) => {}
            Err(e) => return Err(AgentError::BadAnswer(e.to_string())),
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(AgentError::BadAnswer(format!(
                "connection closed after {} bytes",
                buffer.len()
            )));
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// The SOCKS5 reply code for a failure (RFC 1928 §6).
fn socks_reply_code(error: &AgentError) -> u8 {
    match error {
        AgentError::Refused(ErrorCode::NotAuthorized) => 0x02,
        AgentError::Refused(ErrorCode::NetworkFailure) => 0x03,
        AgentError::Refused(ErrorCode::DestinationUnreachable) => 0x04,
        AgentError::Refused(ErrorCode::ConnectionReset) => 0x05,
        AgentError::Timeout(_) => 0x06,
        _ => 0x01,
    }
}

/// Reads a SOCKS5 greeting and CONNECT request (RFC 1928 §3-§5); answers unsupported ones itself.
/// Returns the destination, resolving a domain name locally.
async fn socks_handshake(stream: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Ok(None);
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        stream.write_all(&[5, 0xff]).await?;
        return Ok(None);
    }
    stream.write_all(&[5, 0]).await?;
    let mut request = [0u8; 4];
    stream.read_exact(&mut request).await?;
    let reply = |code: u8| [5, code, 0, 1, 0, 0, 0, 0, 0, 0];
    let host: IpAddr = match request[3] {
        1 => {
            let mut a = [0u8; 4];
            stream.read_exact(&mut a).await?;
            IpAddr::from(a)
        }
        4 => {
            let mut a = [0u8; 16];
            stream.read_exact(&mut a).await?;
            IpAddr::from(a)
        }
        3 => {
            let len = stream.read_u8().await?;
            let mut name = vec![0u8; usize::from(len)];
            stream.read_exact(&mut name).await?;
            let mut port = [0u8; 2];
            stream.read_exact(&mut port).await?;
            let name = String::from_utf8_lossy(&name).into_owned();
            let port = u16::from_be_bytes(port);
            if request[1] != 1 {
                stream.write_all(&reply(0x07)).await?;
                return Ok(None);
            }
            return match tokio::net::lookup_host((name.as_str(), port)).await {
                Ok(mut addresses) => match addresses.next() {
                    Some(address) => Ok(Some(address)),
                    None => {
                        stream.write_all(&reply(0x04)).await?;
                        Ok(None)
                    }
                },
                Err(_) => {
                    stream.write_all(&reply(0x04)).await?;
                    Ok(None)
                }
            };
        }
        _ => {
            stream.write_all(&reply(0x08)).await?;
            return Ok(None);
        }
    };
    let port = stream.read_u16().await?;
    if request[1] != 1 {
        stream.write_all(&reply(0x07)).await?;
        return Ok(None);
    }
    Ok(Some(SocketAddr::new(host, port)))
}

fn relay_settings(idle_timeout: Duration) -> RelaySettings {
    RelaySettings {
        mode: RelayMode::Copy,
        buffer_bytes: 256 * 1024,
        idle_timeout,
        upload: Counter::default(),
        download: Counter::default(),
        limits: None,
    }
}

/// Delivers the converter's early server bytes, then relays until both sides finish.
async fn splice_through(
    app: TcpStream,
    converted: Converted,
    idle_timeout: Duration,
) -> io::Result<()> {
    write_all(&app, &converted.early).await?;
    let (app, converter) = (Arc::new(app), Arc::new(converted.stream));
    relay(&app, &converter, b"", relay_settings(idle_timeout)).await?;
    Ok(())
}

/// The application's first bytes, if it sends any within `wait` (they ride in the SYN).
async fn early_data(app: &mut TcpStream, wait: Duration) -> io::Result<Vec<u8>> {
    let mut early = vec![0u8; 4096];
    let n = match tokio::time::timeout(wait, app.read(&mut early)).await {
        Ok(read) => read?,
        Err(_) => 0,
    };
    early.truncate(n);
    Ok(early)
}

/// Resets the application's connection: it sees a refused connection, as if the server had refused.
fn reset(app: &TcpStream) {
    let _ = SockRef::from(app).set_linger(Some(Duration::ZERO));
}

/// Connects through the converter with the application's first bytes in the SYN, then relays; a
/// refusal resets the application's connection.
async fn convert_with_early_data(
    client: &Client,
    mut app: TcpStream,
    destination: SocketAddr,
    settings: AppSettings,
) {
    let Ok(early) = early_data(&mut app, settings.early_data_wait).await else {
        return;
    };
    match client.connect(destination, &early).await {
        Ok(converted) => {
            if let Err(error) = splice_through(app, converted, settings.idle_timeout).await {
                tracing::debug!(%destination, %error, "relay ended with an error");
            }
        }
        Err(error) => {
            tracing::info!(%destination, %error, "conversion refused; resetting the connection");
            reset(&app);
        }
    }
}

async fn serve_socks(client: Arc<Client>, mut app: TcpStream, settings: AppSettings) {
    let destination = match socks_handshake(&mut app).await {
        Ok(Some(destination)) => destination,
        Ok(None) | Err(_) => return,
    };
    if settings.optimistic {
        // SOCKS5 success now, so the application's request can ride in the SYN (saves a round trip:
        // an MPTCP converter cannot answer before the client's third ACK).
        if app
            .write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0])
            .await
            .is_err()
        {
            return;
        }
        return convert_with_early_data(&client, app, destination, settings).await;
    }
    match client.connect(destination, b"").await {
        Ok(converted) => {
            let ok = [5, 0, 0, 1, 0, 0, 0, 0, 0, 0];
            if app.write_all(&ok).await.is_err() {
                return;
            }
            if let Err(error) = splice_through(app, converted, settings.idle_timeout).await {
                tracing::debug!(%destination, %error, "relay ended with an error");
            }
        }
        Err(error) => {
            tracing::info!(%destination, %error, "SOCKS connection refused");
            let _ = app
                .write_all(&[5, socks_reply_code(&error), 0, 1, 0, 0, 0, 0, 0, 0])
                .await;
        }
    }
}

async fn serve_transparent(client: Arc<Client>, app: TcpStream, settings: AppSettings) {
    let destination = match original_destination(&app) {
        Ok(Some(destination)) => destination,
        Ok(None) => {
            tracing::info!("transparent: not a redirected connection; closing");
            return;
        }
        Err(error) => {
            tracing::warn!(%error, "transparent: cannot find the original destination");
            return;
        }
    };
    convert_with_early_data(&client, app, destination, settings).await;
}

/// What each application connection needs of the configuration.
#[derive(Debug, Clone, Copy)]
struct AppSettings {
    idle_timeout: Duration,
    optimistic: bool,
    early_data_wait: Duration,
}

/// Serves until `shutdown` resolves.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> io::Result<()> {
    let client = Arc::new(Client::new(config.converter, config.connect_timeout));
    let mut tasks = tokio::task::JoinSet::new();
    for (address, transparent) in [(config.socks, false), (config.transparent, true)] {
        let Some(address) = address else { continue };
        let listener = TcpListener::bind(address).await?;
        tracing::info!(
            address = %listener.local_addr()?,
            mode = if transparent { "transparent" } else { "socks5" },
            converter = %config.converter,
            "listening"
        );
        let client = client.clone();
        let settings = AppSettings {
            idle_timeout: config.idle_timeout,
            optimistic: config.optimistic,
            early_data_wait: config.early_data_wait,
        };
        tasks.spawn(async move {
            loop {
                let (app, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = app.set_nodelay(true);
                tracing::debug!(%peer, "accepted");
                let client = client.clone();
                if transparent {
                    tokio::spawn(serve_transparent(client, app, settings));
                } else {
                    tokio::spawn(serve_socks(client, app, settings));
                }
            }
        });
    }
    if tasks.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "nothing to serve: give --socks and/or --transparent",
        ));
    }
    shutdown.await;
    tasks.abort_all();
    Ok(())
}

/// The default SOCKS5 address: loopback, the customary port.
pub const DEFAULT_SOCKS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1080);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_the_cached_cookie_before_the_connect_tlv() {
        let client = Client::new(
            "10.0.1.1:5124".parse().expect("literal"),
            Duration::from_secs(1),
        );
        let server: SocketAddr = "10.0.3.2:80".parse().expect("literal");
        assert_eq!(
            client.request(server).tlvs,
            vec![TlvRepr::connect(server, &[])]
        );
        *client.cookie.lock().expect("lock") = Some(vec![1, 2, 3, 4]);
        assert_eq!(
            client.request(server).tlvs,
            vec![
                TlvRepr::cookie(&[1, 2, 3, 4]),
                TlvRepr::connect(server, &[])
            ]
        );
    }

    #[test]
    fn socks_codes_follow_the_convert_error() {
        assert_eq!(
            socks_reply_code(&AgentError::Refused(ErrorCode::NotAuthorized)),
            2
        );
        assert_eq!(
            socks_reply_code(&AgentError::Refused(ErrorCode::ConnectionReset)),
            5
        );
        assert_eq!(
            socks_reply_code(&AgentError::Refused(ErrorCode::DestinationUnreachable)),
            4
        );
        assert_eq!(socks_reply_code(&AgentError::Timeout(Duration::ZERO)), 6);
    }

    /// A fake converter on loopback: the agent's request arrives intact (with early data), and the
    /// answer's trailing server bytes are handed back as early data.
    #[tokio::test]
    async fn a_connection_through_a_fake_converter() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let converter = listener.local_addr().expect("addr");
        let fake = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = vec![0u8; 24 + 5];
            s.read_exact(&mut got).await.expect("request");
            s.write_all(&[1, 1, 0x22, 0x63]).await.expect("answer");
            s.write_all(b"hello").await.expect("server bytes");
            got
        });
        let client = Client::new(converter, Duration::from_secs(5));
        let server: SocketAddr = "10.0.3.2:80".parse().expect("literal");
        let converted = client.connect(server, b"early").await.expect("converted");
        let got = fake.await.expect("fake");
        assert_eq!(
            &got[..24],
            &MessageRepr::new(vec![TlvRepr::connect(server, &[])])
                .to_bytes()
                .expect("emit")[..]
        );
        assert_eq!(&got[24..], b"early");
        assert!(converted.answer.tlvs.is_empty());
        let mut early = converted.early.clone();
        if early.len() < 5 {
            let mut rest = vec![0u8; 5 - early.len()];
            let mut stream = converted.stream;
            stream.read_exact(&mut rest).await.expect("rest");
            early.extend_from_slice(&rest);
        }
        assert_eq!(early, b"hello");
    }

    #[tokio::test]
    async fn an_error_answer_is_a_refusal_and_a_missing_cookie_is_retried_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let converter = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            // First: Missing Cookie with a cookie; second: Not Authorized.
            for answer in [
                MessageRepr::new(vec![
                    TlvRepr::error(ErrorCode::MissingCookie, &[]),
                    TlvRepr::cookie(&[9; 16]),
                ]),
                MessageRepr::new(vec![TlvRepr::error(ErrorCode::NotAuthorized, &[])]),
            ] {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut head = [0u8; 4];
                s.read_exact(&mut head).await.expect("head");
                let mut rest = vec![0u8; usize::from(head[1]) * 4 - 4];
                s.read_exact(&mut rest).await.expect("rest");
                s.write_all(&answer.to_bytes().expect("emit"))
                    .await
                    .expect("answer");
            }
        });
        let client = Client::new(converter, Duration::from_secs(5));
        let error = client
            .connect("10.0.3.2:80".parse().expect("literal"), b"")
            .await
            .expect_err("refused");
        assert!(
            matches!(error, AgentError::Refused(ErrorCode::NotAuthorized)),
            "{error}"
        );
        assert_eq!(client.cookie(), Some(vec![9; 16]));
    }
}
