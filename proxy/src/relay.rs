//! Moving bytes both ways between two sockets (CONNECT and transparent tunnels).
//!
//! Each direction runs until its source reaches EOF, then half-closes its destination (`shutdown(SHUT_WR)`),
//! so a client that finished uploading still receives the rest of the download. Two strategies:
//! `copy` (read/write through a user-space buffer) and `splice` (socket → pipe → socket in the kernel).
//! Both work on MPTCP sockets; `bench/` compares them.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use prometheus_client::metrics::counter::Counter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::config::RelayMode;

/// Bytes moved by a finished relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Client → server.
    pub upload_bytes: u64,
    /// Server → client.
    pub download_bytes: u64,
    /// Whether the relay stopped because both sides were idle too long.
    pub idle_timeout: bool,
}

/// When either direction last moved bytes, in milliseconds since `start`.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    /// Starts the clock now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Records activity now.
    pub fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the last activity.
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Resolves once nothing moved for `limit`.
    pub async fn idle(&self, limit: Duration) {
        loop {
            let idle = self.idle_for();
            if idle >= limit {
                return;
            }
            tokio::time::sleep(limit - idle).await;
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// How a relay runs, and where it counts bytes live.
#[derive(Debug, Clone, Copy)]
pub struct RelaySettings<'a> {
    /// copy or splice.
    pub mode: RelayMode,
    /// Buffer or pipe size per direction.
    pub buffer_bytes: usize,
    /// Stop when nothing moved either way for this long.
    pub idle_timeout: Duration,
    /// Counts client → server bytes as they move.
    pub upload: &'a Counter,
    /// Counts server → client bytes as they move.
    pub download: &'a Counter,
    /// User-space rate limits (upload, download) for this client, if configured.
    pub limits: Option<ClientLimits<'a>>,
}

/// A client's user-space rate limits, one limiter per direction.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits<'a> {
    /// The client.
    pub client: std::net::IpAddr,
    /// Client → server.
    pub upload: &'a mptcp_throttle::ClientRateLimiter,
    /// Server → client.
    pub download: &'a mptcp_throttle::ClientRateLimiter,
}

/// Relays until both directions finish or nothing moves for `settings.idle_timeout`.
///
/// `client_prefix` is data the client already sent that must reach the server first (bytes hyper read
/// past a CONNECT head).
pub async fn relay(
    client: &TcpStream,
    server: &TcpStream,
    client_prefix: &[u8],
    settings: RelaySettings<'_>,
) -> io::Result<RelayStats> {
    let activity = Activity::new();
    let RelaySettings {
        mode,
        buffer_bytes,
        idle_timeout,
        upload,
        download,
        limits,
    } = settings;
    write_all(server, client_prefix).await?;
    upload.inc_by(client_prefix.len() as u64);
    let limit_up = limits.map(|l| (l.upload, l.client));
    let limit_down = limits.map(|l| (l.download, l.client));
    let upload = pump(
        client,
        server,
        mode,
        buffer_bytes,
        &activity,
        upload,
        limit_up,
    );
    let download = pump(
        server,
        client,
        mode,
        buffer_bytes,
        &activity,
        download,
        limit_down,
    );
    tokio::select! {
        result = async { tokio::try_join!(upload, download) } => {
            let (up, down) = result?;
            Ok(RelayStats {
                upload_bytes: up + client_prefix.len() as u64,
                download_bytes: down,
                idle_timeout: false,
            })
        }
        () = activity.idle(idle_timeout) => Ok(RelayStats { idle_timeout: true, ..RelayStats::default() }),
    }
}

/// A direction's limiter and the client it limits.
type Limit<'a> = Option<(&'a mptcp_throttle::ClientRateLimiter, std::net::IpAddr)>;

async fn wait_for_budget(limit: Limit<'_>, bytes: usize) {
    if let Some((limiter, client)) = limit {
        limiter
            .until_ready(client, u32::try_from(bytes).unwrap_or(u32::MAX))
            .await;
    }
}

async fn pump(
    source: &TcpStream,
    sink: &TcpStream,
    mode: RelayMode,
    buffer_bytes: usize,
    activity: &Activity,
    counter: &Counter,
    limit: Limit<'_>,
) -> io::Result<u64> {
    let result = match mode {
        RelayMode::Copy => pump_copy(source, sink, buffer_bytes, activity, counter, limit).await,
        RelayMode::Splice => {
            pump_splice(source, sink, buffer_bytes, activity, counter, limit).await
        }
    };
    // EOF or error: tell the other side no more data comes this way.
    let _ = SockRef::from(sink).shutdown(std::net::Shutdown::Write);
    result
}

async fn pump_copy(
    source: &TcpStream,
    sink: &TcpStream,
    buffer_bytes: usize,
    activity: &Activity,
    counter: &Counter,
    limit: Limit<'_>,
) -> io::Result<u64> {
    // Allocated on the first readable event: an idle tunnel holds no buffer.
    let mut buffer = Vec::new();
    let mut total = 0u64;
    loop {
        source.readable().await?;
        if buffer.is_empty() {
            buffer = vec![0u8; buffer_bytes];
        }
        let n = match source.try_read(&mut buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        activity.touch();
        wait_for_budget(limit, n).await;
        write_all(sink, &buffer[..n]).await?;
        total += n as u64;
        counter.inc_by(n as u64);
        activity.touch();
    }
}

/// Writes all of `data`, waiting for writability as needed.
pub async fn write_all(sink: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        sink.writable().await?;
        match sink.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A pipe for splice(2), closed on drop.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new(size: usize) -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds is a two-element array as pipe2 requires.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 returned two fresh fds that we now own.
        let pipe = unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        };
        // A larger pipe moves more per syscall; failure (over pipe-max-size) keeps the default 64 KiB.
        let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: F_SETPIPE_SZ on our own pipe fd.
        unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
        Ok(pipe)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between valid fds with null offsets (sockets and pipes have no offsets).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

async fn pump_splice(
    source: &TcpStream,
    sink: &TcpStream,
    pipe_bytes: usize,
    activity: &Activity,
    counter: &Counter,
    limit: Limit<'_>,
) -> io::Result<u64> {
    // Created on the first readable event: an idle tunnel holds no pipe.
    let mut pipe: Option<Pipe> = None;
    let mut total = 0u64;
    loop {
        source.readable().await?;
        let pipe = match &mut pipe {
            Some(pipe) => pipe,
            None => pipe.insert(Pipe::new(pipe_bytes)?),
        };
        let n = match source.try_io(Interest::READABLE, || {
            splice(source.as_raw_fd(), pipe.write.as_raw_fd(), pipe_bytes)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(total);
        }
        activity.touch();
        wait_for_budget(limit, n).await;
        let mut pending = n;
        while pending > 0 {
            let moved = sink
                .async_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), sink.as_raw_fd(), pending)
                })
                .await?;
            pending -= moved;
        }
        total += n as u64;
        counter.inc_by(n as u64);
        activity.touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().expect("addr");
        let (a, b) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (a.expect("connect"), b.expect("accept").0)
    }

    async fn half_close_case(mode: RelayMode) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (mut client, proxy_client_side) = pair(&listener).await;
        let (proxy_server_side, mut server) = pair(&listener).await;
        let (up, down) = (Counter::default(), Counter::default());
        let (up_seen, down_seen) = (up.clone(), down.clone());
        let relay = tokio::spawn(async move {
            let settings = RelaySettings {
                mode,
                buffer_bytes: 4096,
                idle_timeout: Duration::from_secs(10),
                upload: &up,
                download: &down,
                limits: None,
            };
            relay(&proxy_client_side, &proxy_server_side, b"pre", settings).await
        });
        // Client uploads and half-closes; the server still answers with a large download afterwards.
        client.write_all(b"fix").await.expect("write");
        client.shutdown().await.expect("shutdown");
        let mut upload = Vec::new();
        server.read_to_end(&mut upload).await.expect("server read");
        assert_eq!(upload, b"prefix");
        let download: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        server.write_all(&download).await.expect("server write");
        server.shutdown().await.expect("server shutdown");
        let mut received = Vec::new();
        client
            .read_to_end(&mut received)
            .await
            .expect("client read");
        assert!(
            received == download,
            "download corrupted ({} bytes)",
            received.len()
        );
        let stats = relay.await.expect("join").expect("relay");
        assert_eq!(stats.upload_bytes, 6);
        assert_eq!(stats.download_bytes, 1_000_000);
        assert_eq!((up_seen.get(), down_seen.get()), (6, 1_000_000));
    }

    #[tokio::test]
    async fn copy_relay_handles_half_close() {
        half_close_case(RelayMode::Copy).await;
    }

    #[tokio::test]
    async fn splice_relay_handles_half_close() {
        half_close_case(RelayMode::Splice).await;
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tunnel_is_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (_client, a) = pair(&listener).await;
        let (b, _server) = pair(&listener).await;
        let counter = Counter::default();
        let settings = RelaySettings {
            mode: RelayMode::Copy,
            buffer_bytes: 4096,
            idle_timeout: Duration::from_secs(60),
            upload: &counter,
            download: &counter,
            limits: None,
        };
        let stats = relay(&a, &b, b"", settings).await.expect("relay");
        assert!(stats.idle_timeout);
    }
}
