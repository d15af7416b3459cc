//! Moving bytes both ways between two sockets (CONNECT and transparent tunnels).
//!
//! Each direction runs until its source reaches EOF, then half-closes its destination (`shutdown(SHUT_WR)`),
//! so a client that finished uploading still receives the rest of the download. Two strategies:
//! `copy` (read/write through a user-space buffer) and `splice` (socket → pipe → socket in the kernel);
//! `auto` splices a direction when the kernel grants its pipe at full size and copies otherwise. All work
//! on MPTCP sockets; `bench/` compares them.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// copy or splice.
    pub mode: RelayMode,
    /// Buffer or pipe size per direction.
    pub buffer_bytes: usize,
    /// Stop when nothing moved either way for this long.
    pub idle_timeout: Duration,
    /// Counts client → server bytes as they move.
    pub upload: Counter,
    /// Counts server → client bytes as they move.
    pub download: Counter,
    /// User-space rate limits for this client, if configured.
    pub limits: Option<ClientLimits>,
}

/// A client's user-space rate limits, one limiter per direction.
#[derive(Debug, Clone)]
pub struct ClientLimits {
    /// The client.
    pub client: std::net::IpAddr,
    /// Client → server.
    pub upload: Arc<mptcp_throttle::ClientRateLimiter>,
    /// Server → client.
    pub download: Arc<mptcp_throttle::ClientRateLimiter>,
}

/// One direction of a relay: where bytes come from and go, how they are counted and limited.
#[derive(Clone)]
struct Direction {
    source: Arc<TcpStream>,
    sink: Arc<TcpStream>,
    counter: Counter,
    limit: Option<(Arc<mptcp_throttle::ClientRateLimiter>, std::net::IpAddr)>,
    activity: Arc<Activity>,
    buffer_bytes: usize,
}

/// Relays until both directions finish or nothing moves for `settings.idle_timeout`.
///
/// `client_prefix` is data the client already sent that must reach the server first (bytes hyper read
/// past a CONNECT head).
pub async fn relay(
    client: &Arc<TcpStream>,
    server: &Arc<TcpStream>,
    client_prefix: &[u8],
    settings: RelaySettings,
) -> io::Result<RelayStats> {
    let activity = Arc::new(Activity::new());
    write_all(server, client_prefix).await?;
    settings.upload.inc_by(client_prefix.len() as u64);
    let limits = settings.limits.clone();
    let direction = |source: &Arc<TcpStream>,
                     sink: &Arc<TcpStream>,
                     counter: &Counter,
                     upload: bool| Direction {
        source: source.clone(),
        sink: sink.clone(),
        counter: counter.clone(),
        limit: limits.as_ref().map(|l| {
            let limiter = if upload { &l.upload } else { &l.download };
            (limiter.clone(), l.client)
        }),
        activity: activity.clone(),
        buffer_bytes: settings.buffer_bytes,
    };
    let upload = pump(
        direction(client, server, &settings.upload, true),
        settings.mode,
    );
    let download = pump(
        direction(server, client, &settings.download, false),
        settings.mode,
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
        () = activity.idle(settings.idle_timeout) => Ok(RelayStats { idle_timeout: true, ..RelayStats::default() }),
    }
}

async fn wait_for_budget(
    limit: &Option<(Arc<mptcp_throttle::ClientRateLimiter>, std::net::IpAddr)>,
    bytes: usize,
) {
    if let Some((limiter, client)) = limit {
        limiter
            .until_ready(*client, u32::try_from(bytes).unwrap_or(u32::MAX))
            .await;
    }
}

async fn pump(direction: Direction, mode: RelayMode) -> io::Result<u64> {
    let sink = direction.sink.clone();
    let result = match mode {
        RelayMode::Copy => pump_copy(direction).await,
        RelayMode::Splice => pump_splice(&direction, None).await,
        RelayMode::Auto => pump_auto(direction).await,
    };
    // EOF or error: tell the other side no more data comes this way.
    let _ = SockRef::from(&*sink).shutdown(std::net::Shutdown::Write);
    result
}

/// Buffers in flight per direction: one being read into while another is written out.
const COPY_BUFFERS: usize = 2;

/// The buffer of a direction while it moves small amounts (requests, answers, keystrokes).
const INLINE_BUFFER: usize = 16 * 1024;

/// Copies in this task, read then write, while the sink takes each read whole and reads stay small; the
/// first time the sink cannot take a read at once or a read fills the small buffer (a bulk transfer), it
/// goes on with [`pump_overlapped`]. A small segment thus crosses no task: handing each one from a reader
/// task to a writer task cost ~0.3 ms of conversion delay per segment (`bench/README.md` (c)).
async fn pump_copy(direction: Direction) -> io::Result<u64> {
    // An idle tunnel waits here, holding no buffer and no task.
    direction.source.readable().await?;
    let mut buf = vec![0u8; INLINE_BUFFER.min(direction.buffer_bytes)];
    let mut total = 0u64;
    loop {
        direction.source.readable().await?;
        let n = match direction.source.try_read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        direction.activity.touch();
        wait_for_budget(&direction.limit, n).await;
        let written = match direction.sink.try_write(&buf[..n]) {
            Ok(written) => written,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        total += written as u64;
        direction.counter.inc_by(written as u64);
        if written < n {
            write_all(&direction.sink, &buf[written..n]).await?;
            total += (n - written) as u64;
            direction.counter.inc_by((n - written) as u64);
            direction.activity.touch();
            return pump_overlapped(direction, total).await;
        }
        if n == buf.len() && buf.len() < direction.buffer_bytes {
            return pump_overlapped(direction, total).await;
        }
    }
}

/// Copies with the read and the write of a direction in separate tasks, so they overlap (on different
/// cores) for bulk transfers. Buffers are recycled between the two tasks.
async fn pump_overlapped(direction: Direction, mut total: u64) -> io::Result<u64> {
    let (filled_tx, mut filled_rx) = tokio::sync::mpsc::channel::<(Vec<u8>, usize)>(COPY_BUFFERS);
    let (empty_tx, mut empty_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(COPY_BUFFERS);
    let reader = {
        let direction = direction.clone();
        tokio::spawn(async move {
            let mut allocated = 0;
            let mut buffer: Option<Vec<u8>> = None;
            loop {
                direction.source.readable().await?;
                let mut buf = match buffer.take() {
                    Some(buf) => buf,
                    None => match empty_rx.try_recv() {
                        Ok(buf) => buf,
                        Err(_) if allocated < COPY_BUFFERS => {
                            allocated += 1;
                            vec![0u8; direction.buffer_bytes]
                        }
                        Err(_) => match empty_rx.recv().await {
                            Some(buf) => buf,
                            None => return Ok::<(), io::Error>(()),
                        },
                    },
                };
                match direction.source.try_read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        direction.activity.touch();
                        wait_for_budget(&direction.limit, n).await;
                        if filled_tx.send((buf, n)).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => buffer = Some(buf),
                    Err(e) => return Err(e),
                }
            }
        })
    };
    // Aborts the reader if the writer stops first (error, idle timeout, relay dropped).
    struct AbortOnDrop(tokio::task::JoinHandle<io::Result<()>>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut reader = AbortOnDrop(reader);
    while let Some((buf, n)) = filled_rx.recv().await {
        write_all(&direction.sink, &buf[..n]).await?;
        total += n as u64;
        direction.counter.inc_by(n as u64);
        direction.activity.touch();
        let _ = empty_tx.send(buf).await;
    }
    match (&mut reader.0).await {
        Ok(result) => result.map(|()| total),
        Err(join) => Err(io::Error::other(join)),
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
pub(crate) struct Pipe {
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

    /// A pipe of at least `size` bytes, or None when the kernel grants less (over `pipe-max-size`, or
    /// the user's `pipe-user-pages-soft` spent: then new pipes get a page or two).
    fn with_size(size: usize) -> io::Result<Option<Self>> {
        let pipe = Self::new(size)?;
        // SAFETY: F_GETPIPE_SZ on our own pipe fd.
        let granted = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        Ok((usize::try_from(granted).unwrap_or(0) >= size).then_some(pipe))
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

/// Splices when the kernel grants a full-size pipe, copies otherwise (see [`RelayMode::Auto`]).
async fn pump_auto(direction: Direction) -> io::Result<u64> {
    // As in the other modes, an idle tunnel waits here holding no pipe and no buffer.
    direction.source.readable().await?;
    match Pipe::with_size(direction.buffer_bytes)? {
        Some(pipe) => pump_splice(&direction, Some(pipe)).await,
        None => pump_copy(direction).await,
    }
}

/// Splices `direction` through `pipe`, or through a pipe made on the first data.
async fn pump_splice(direction: &Direction, mut pipe: Option<Pipe>) -> io::Result<u64> {
    let (source, sink, pipe_bytes) = (&direction.source, &direction.sink, direction.buffer_bytes);
    let mut total = 0u64;
    loop {
        source.readable().await?;
        let pipe = match &mut pipe {
            Some(pipe) => pipe,
            None => pipe.insert(Pipe::new(pipe_bytes)?),
        };
        let n = splice_in(source, pipe, pipe_bytes).await?;
        if n == 0 {
            return Ok(total);
        }
        direction.activity.touch();
        wait_for_budget(&direction.limit, n).await;
        splice_out(pipe, sink, n).await?;
        total += n as u64;
        direction.counter.inc_by(n as u64);
        direction.activity.touch();
    }
}

/// A pipe to splice a body through in `mode`: none for copy, nor in auto mode when the kernel grants
/// less than `size` (see [`RelayMode::Auto`]).
pub(crate) fn pipe_for(mode: RelayMode, size: usize) -> io::Result<Option<Pipe>> {
    match mode {
        RelayMode::Copy => Ok(None),
        RelayMode::Splice => Pipe::new(size).map(Some),
        RelayMode::Auto => Pipe::with_size(size),
    }
}

/// Moves at most `max` bytes from `source` into the empty `pipe`, waiting for data; 0 at end of stream.
pub(crate) async fn splice_in(source: &TcpStream, pipe: &Pipe, max: usize) -> io::Result<usize> {
    loop {
        source.readable().await?;
        match source.try_io(Interest::READABLE, || {
            splice(source.as_raw_fd(), pipe.write.as_raw_fd(), max)
        }) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Moves the `n` bytes in `pipe` to `sink`, waiting for room.
pub(crate) async fn splice_out(pipe: &Pipe, sink: &TcpStream, mut n: usize) -> io::Result<()> {
    while n > 0 {
        n -= sink
            .async_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), sink.as_raw_fd(), n)
            })
            .await?;
    }
    Ok(())
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
        half_close_case_with(mode, 4096).await;
    }

    async fn half_close_case_with(mode: RelayMode, buffer_bytes: usize) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (mut client, proxy_client_side) = pair(&listener).await;
        let (proxy_server_side, mut server) = pair(&listener).await;
        let (up, down) = (Counter::default(), Counter::default());
        let (up_seen, down_seen) = (up.clone(), down.clone());
        let relay = tokio::spawn(async move {
            let settings = RelaySettings {
                mode,
                buffer_bytes,
                idle_timeout: Duration::from_secs(10),
                upload: up,
                download: down,
                limits: None,
            };
            let (client, server) = (Arc::new(proxy_client_side), Arc::new(proxy_server_side));
            relay(&client, &server, b"pre", settings).await
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

    /// With the default 256 KiB buffers a copy relay starts in its task with a small buffer and hands the
    /// bulk download over to the overlapped reader and writer: nothing may be lost or reordered there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copy_relay_goes_from_inline_to_overlapped_intact() {
        half_close_case_with(RelayMode::Copy, 256 * 1024).await;
    }

    #[tokio::test]
    async fn splice_relay_handles_half_close() {
        half_close_case(RelayMode::Splice).await;
    }

    #[tokio::test]
    async fn auto_relay_handles_half_close() {
        half_close_case(RelayMode::Auto).await;
    }

    /// As an unprivileged user, pipes past `fs.pipe-user-pages-soft` are a page or two: auto mode must
    /// see that and copy instead. (Measured here as nobody: the first 256 pipes of 256 KiB were granted,
    /// the next ones 8 KiB.)
    #[test]
    fn a_pipe_smaller_than_asked_is_refused_once_the_users_pipe_budget_is_spent() {
        let soft: usize = std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        if soft == 0 {
            return; // no per-user budget on this host: nothing to fall back from
        }
        const SIZE: usize = 256 * 1024;
        let pipes = soft * 4096 / SIZE + 16;
        let (granted, refused) = std::thread::spawn(move || {
            // SAFETY: the raw syscall changes this thread's credentials only (glibc's setresuid would
            // change every thread's); root would not be limited.
            if unsafe { libc::geteuid() } == 0 {
                let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
                assert_eq!(rc, 0, "setresuid: {}", io::Error::last_os_error());
            }
            let mut held = Vec::new();
            let mut refused = 0;
            for _ in 0..pipes {
                match Pipe::with_size(SIZE).expect("pipe") {
                    Some(pipe) => held.push(pipe),
                    None => refused += 1,
                }
            }
            (held.len(), refused)
        })
        .join()
        .expect("thread");
        assert!(granted > 0, "no full-size pipe at all ({refused} refused)");
        assert!(
            refused >= 16,
            "{granted} granted, {refused} refused of {pipes}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tunnel_is_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (_client, a) = pair(&listener).await;
        let (b, _server) = pair(&listener).await;
        let settings = RelaySettings {
            mode: RelayMode::Copy,
            buffer_bytes: 4096,
            idle_timeout: Duration::from_secs(60),
            upload: Counter::default(),
            download: Counter::default(),
            limits: None,
        };
        let stats = relay(&Arc::new(a), &Arc::new(b), b"", settings)
            .await
            .expect("relay");
        assert!(stats.idle_timeout);
    }
}
