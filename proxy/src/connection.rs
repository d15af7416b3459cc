//! One client connection: its transport, subflows, byte counts and the resources it holds.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use prometheus_client::metrics::counter::Counter;

use crate::metrics::{InterfaceMap, Metrics, PathAccounting, TransportLabel};
use crate::registry::{ConnectionRegistry, Registration};
use crate::relay::Activity;
use crate::sockets::{mptcp_info, mptcp_subflows, tcp_path, SubflowSample, Transport};

/// Counts client connections per client: per IPv4 address, per IPv6 prefix (one subscriber holds a
/// whole /64). A slot is released when dropped.
#[derive(Debug, Clone)]
pub struct PerClientCounter {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ipv6_prefix: u8,
}

impl Default for PerClientCounter {
    fn default() -> Self {
        Self::with_ipv6_prefix(64)
    }
}

/// A held per-client slot.
#[derive(Debug)]
pub struct ClientSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PerClientCounter {
    /// A counter that groups IPv6 clients by their first `ipv6_prefix` bits (1-128).
    pub fn with_ipv6_prefix(ipv6_prefix: u8) -> Self {
        Self {
            counts: Arc::default(),
            ipv6_prefix: ipv6_prefix.clamp(1, 128),
        }
    }

    /// The key `ip` is counted under: the IPv4 address (IPv4-mapped ones too), or the IPv6 prefix.
    pub fn client_key(&self, ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let mask = u128::MAX << (128 - u32::from(self.ipv6_prefix));
                IpAddr::V6((u128::from(v6) & mask).into())
            }
            v4 => v4,
        }
    }

    /// Takes a slot for `ip`'s client unless it already holds `limit`.
    pub fn acquire(&self, ip: IpAddr, limit: usize) -> Option<ClientSlot> {
        let ip = self.client_key(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            counts: self.counts.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// State shared by everything serving one client connection (the HTTP task, tunnels, log entries).
/// It holds the connection's limit permits until the last user drops it.
#[derive(Debug)]
pub struct ClientConnection {
    /// The client's address.
    pub client: SocketAddr,
    /// The proxy's address of the connection (of its initial subflow).
    pub local: SocketAddr,
    /// How the connection is carried.
    pub transport: Transport,
    /// Bytes read from the client.
    pub bytes_in: AtomicU64,
    /// Bytes written to the client.
    pub bytes_out: AtomicU64,
    /// Most subflows seen at once.
    pub max_subflows: AtomicU8,
    /// When bytes last moved on the client socket.
    pub activity: Activity,
    /// When the connection was accepted.
    pub accepted: std::time::Instant,
    /// When the subflows were last sampled, in ms since `accepted` (bounds the sampling cost).
    sampled_ms: AtomicU64,
    /// Whether the conversion latency (accept → first upstream connection) was recorded.
    converted: AtomicBool,
    /// The socket while it is open, -1 after; used to read `MPTCP_FULL_INFO` while hyper owns it.
    fd: AtomicI32,
    paths: Mutex<PathAccounting>,
    metrics: Arc<Metrics>,
    interfaces: Arc<InterfaceMap>,
    /// The server the connection's latest request or tunnel went to, for the admin view.
    upstream: Mutex<Option<UpstreamInfo>>,
    /// The connection's entry in the server's table of open connections (`/connections`).
    _registration: Option<Registration>,
    /// The global permit and the per-client slot, held until dropped or released.
    limits: Mutex<Option<(OwnedSemaphorePermit, ClientSlot)>>,
}

/// Where a client connection's latest request or tunnel went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamInfo {
    /// The request's or tunnel's target, `host:port`.
    pub target: String,
    /// The server address the proxy connected to.
    pub address: SocketAddr,
}

/// Everything a new client connection needs besides its socket.
#[derive(Debug)]
pub struct ConnectionContext {
    /// The client's address.
    pub client: SocketAddr,
    /// How the connection is carried.
    pub transport: Transport,
    /// The global connection permit.
    pub permit: OwnedSemaphorePermit,
    /// The per-client slot.
    pub slot: ClientSlot,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Local address → interface names.
    pub interfaces: Arc<InterfaceMap>,
    /// The server's table of open connections, if it keeps one.
    pub registry: Option<Arc<ConnectionRegistry>>,
}

impl ClientConnection {
    /// Records a new connection holding its limit permits, in the context's registry if it has one.
    pub fn accepted(stream: &TcpStream, context: ConnectionContext) -> Arc<Self> {
        Arc::new_cyclic(|weak: &Weak<Self>| Self::new(stream, context, weak.clone()))
    }

    fn new(stream: &TcpStream, context: ConnectionContext, this: Weak<Self>) -> Self {
        let ConnectionContext {
            client,
            transport,
            permit,
            slot,
            metrics,
            interfaces,
            registry,
        } = context;
        metrics
            .connections_active
            .get_or_create(&TransportLabel {
                transport: transport.as_str(),
            })
            .inc();
        let connection = Self {
            client,
            local: stream
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            transport,
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            max_subflows: AtomicU8::new(1),
            activity: Activity::new(),
            accepted: std::time::Instant::now(),
            sampled_ms: AtomicU64::new(0),
            converted: AtomicBool::new(false),
            fd: AtomicI32::new(stream.as_raw_fd()),
            paths: Mutex::new(PathAccounting::default()),
            metrics,
            interfaces,
            upstream: Mutex::new(None),
            _registration: registry.map(|registry| registry.insert(this)),
            limits: Mutex::new(Some((permit, slot))),
        };
        connection.sample_fd(stream.as_raw_fd());
        connection
    }

    /// Samples unless the last sample is younger than [`MIN_SAMPLE_GAP`]; returns the subflows open.
    fn sample_fd_throttled(&self, fd: i32) -> u8 {
        let now = self.accepted.elapsed().as_millis() as u64;
        let last = self.sampled_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < MIN_SAMPLE_GAP.as_millis() as u64 && last != 0 {
            return self.max_subflows();
        }
        self.sampled_ms.store(now.max(1), Ordering::Relaxed);
        self.sample_fd(fd)
    }

    /// Samples the connection's subflows and their byte counters into the path metrics; returns how
    /// many subflows are open now.
    fn sample_fd(&self, fd: i32) -> u8 {
        if fd < 0 {
            return 1;
        }
        // SAFETY: fd is the client socket, open while `self.fd` holds it (cleared before close).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let samples = match self.transport {
            Transport::Mptcp => mptcp_subflows(fd).ok().flatten().unwrap_or_default(),
            _ => tcp_path(fd).map(|p| vec![p]).unwrap_or_default(),
        };
        self.paths.lock().unwrap_or_else(|p| p.into_inner()).update(
            &samples,
            &self.interfaces,
            &self.metrics,
        );
        let now = u8::try_from(samples.len()).unwrap_or(u8::MAX).max(1);
        self.max_subflows.fetch_max(now, Ordering::Relaxed);
        now
    }

    /// Records where the connection's current request or tunnel goes (shown by `/connections`).
    pub fn set_upstream(&self, target: String, address: SocketAddr) {
        *self.upstream.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(UpstreamInfo { target, address });
    }

    /// Where the connection's latest request or tunnel went, if anywhere yet.
    pub fn upstream(&self) -> Option<UpstreamInfo> {
        self.upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The subflows open now, read from the kernel (`MPTCP_FULL_INFO`; `TCP_INFO` for one TCP path),
    /// and the bytes (from the client, to the client) the kernel counted on the whole connection.
    /// Empty once the connection closed.
    pub fn subflows_now(&self) -> (Vec<SubflowSample>, Option<(u64, u64)>) {
        let fd = self.fd.load(Ordering::Relaxed);
        if fd < 0 {
            return (Vec::new(), None);
        }
        // SAFETY: fd is the client socket, open while `self.fd` holds it (cleared before close).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        match self.transport {
            Transport::Mptcp => {
                let subflows = mptcp_subflows(fd).ok().flatten().unwrap_or_default();
                let bytes = mptcp_info(fd)
                    .ok()
                    .flatten()
                    .map(|info| (info.bytes_received, info.bytes_acked));
                (subflows, bytes)
            }
            _ => match tcp_path(fd) {
                Ok(path) => {
                    let bytes = (path.bytes_received, path.bytes_acked);
                    (vec![path], Some(bytes))
                }
                Err(_) => (Vec::new(), None),
            },
        }
    }

    /// Why the connection is not MPTCP, if it is not (or no longer is).
    pub fn fallback_reason(&self) -> Option<&'static str> {
        match self.transport {
            Transport::Tcp => {
                Some("plain TCP listener (mptcp = false, or the kernel has no MPTCP)")
            }
            Transport::FallbackTcp => {
                Some("the client did not offer MPTCP (no MP_CAPABLE in its SYN)")
            }
            Transport::Mptcp => {
                let fd = self.fd.load(Ordering::Relaxed);
                if fd < 0 {
                    return None;
                }
                // SAFETY: as in `subflows_now`.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                mptcp_info(fd)
                    .ok()
                    .flatten()
                    .filter(|info| info.flags & crate::sockets::MPTCP_INFO_FLAG_FALLBACK != 0)
                    .map(|_| "fell back to TCP after the handshake (MPTCP_INFO_FLAG_FALLBACK)")
            }
        }
    }

    /// Records the conversion latency (accept → upstream connected) once per connection.
    pub fn upstream_connected(&self) {
        if !self.converted.swap(true, Ordering::Relaxed) {
            self.metrics
                .conversion_duration
                .observe(self.accepted.elapsed().as_secs_f64());
        }
    }

    /// The relayed-bytes counters (upload, download).
    pub fn relay_counters(&self) -> (&Counter, &Counter) {
        (&self.metrics.relayed_upload, &self.metrics.relayed_download)
    }

    /// Gives the connection's limit permits back before it ends: a refused connection that only reads
    /// what its client still sends, so its answer is not reset away, no longer counts (a new
    /// connection must not be refused because refused ones are closing).
    pub fn release_limits(&self) {
        self.limits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
    }

    /// Samples the subflows (at most every [`MIN_SAMPLE_GAP`]); returns how many are open (1 for TCP).
    pub fn subflows(&self) -> u8 {
        self.sample_fd_throttled(self.fd.load(Ordering::Relaxed))
    }

    /// Most subflows seen at once so far.
    pub fn max_subflows(&self) -> u8 {
        self.max_subflows.load(Ordering::Relaxed)
    }

    /// Runs `work` while sampling the subflows every [`SAMPLE_INTERVAL`] (subflows come and go during a
    /// tunnel; the path metrics follow them and the access log reports the most seen at once).
    pub async fn sampling_subflows<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let sample = async {
            // The first sample is one interval out: starting a tunnel is latency-critical.
            let mut interval = tokio::time::interval_at(
                tokio::time::Instant::now() + SAMPLE_INTERVAL,
                SAMPLE_INTERVAL,
            );
            loop {
                interval.tick().await;
                self.subflows();
            }
        };
        tokio::select! {
            output = work => output,
            never = sample => never,
        }
    }

    /// Logs the connection's close: transport, subflows, bytes each way. Call before the socket closes.
    pub fn closed(&self, stream: &TcpStream) {
        self.sample_fd(stream.as_raw_fd());
        self.fd.store(-1, Ordering::Relaxed);
        tracing::info!(
            client = %self.client,
            transport = self.transport.as_str(),
            max_subflows = self.max_subflows.load(Ordering::Relaxed),
            bytes_in = self.bytes_in.load(Ordering::Relaxed),
            bytes_out = self.bytes_out.load(Ordering::Relaxed),
            "client connection closed"
        );
    }
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        self.paths
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .close_all(&self.metrics);
        self.metrics
            .connections_active
            .get_or_create(&TransportLabel {
                transport: self.transport.as_str(),
            })
            .dec();
        if self.transport == Transport::Mptcp {
            self.metrics
                .connection_subflows
                .observe(f64::from(self.max_subflows.load(Ordering::Relaxed)));
        }
    }
}

/// The shortest gap between two subflow samples of one connection (requests on a keep-alive connection
/// would otherwise sample on every response).
pub const MIN_SAMPLE_GAP: std::time::Duration = std::time::Duration::from_millis(100);

/// How often live connections sample their subflows for the path metrics.
pub const SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The client socket of an HTTP connection: counts bytes and activity, and logs the close.
#[derive(Debug)]
pub struct ClientIo {
    stream: Option<TcpStream>,
    connection: Arc<ClientConnection>,
}

impl ClientIo {
    /// Wraps an accepted stream.
    pub fn new(stream: TcpStream, connection: Arc<ClientConnection>) -> Self {
        Self {
            stream: Some(stream),
            connection,
        }
    }

    /// Takes the stream back (for a CONNECT tunnel); the caller then owns the close.
    pub fn take_stream(&mut self) -> Option<TcpStream> {
        self.stream.take()
    }

    /// The socket, to splice into; count what goes in with [`ClientIo::wrote`].
    pub fn socket(&self) -> io::Result<&TcpStream> {
        self.stream
            .as_ref()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    /// Counts `n` bytes written to the client.
    pub fn wrote(&self, n: usize) {
        self.connection
            .bytes_out
            .fetch_add(n as u64, Ordering::Relaxed);
        self.connection.metrics.relayed_download.inc_by(n as u64);
        self.connection.activity.touch();
    }

    fn stream(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        self.stream
            .as_mut()
            .map(Pin::new)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        if let Some(stream) = &self.stream {
            self.connection.closed(stream);
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = match self.stream() {
            Ok(stream) => stream.poll_read(cx, buf),
            Err(e) => return Poll::Ready(Err(e)),
        };
        let n = buf.filled().len() - before;
        if n > 0 {
            self.connection
                .bytes_in
                .fetch_add(n as u64, Ordering::Relaxed);
            self.connection.metrics.relayed_upload.inc_by(n as u64);
            self.connection.activity.touch();
        }
        result
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = match self.stream() {
            Ok(stream) => stream.poll_write(cx, buf),
            Err(e) => return Poll::Ready(Err(e)),
        };
        if let Poll::Ready(Ok(n)) = result {
            self.wrote(n);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = match self.stream() {
            Ok(stream) => stream.poll_write_vectored(cx, bufs),
            Err(e) => return Poll::Ready(Err(e)),
        };
        if let Poll::Ready(Ok(n)) = result {
            self.wrote(n);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => stream.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => stream.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_client_counter_limits_and_releases() {
        let counter = PerClientCounter::default();
        let ip: IpAddr = "10.0.0.1".parse().expect("literal");
        let a = counter.acquire(ip, 2).expect("first");
        let _b = counter.acquire(ip, 2).expect("second");
        assert!(counter.acquire(ip, 2).is_none());
        assert!(counter
            .acquire("10.0.0.2".parse().expect("literal"), 2)
            .is_some());
        drop(a);
        assert!(counter.acquire(ip, 2).is_some());
    }

    #[test]
    fn ipv6_clients_count_per_64_by_default() {
        let counter = PerClientCounter::default();
        let ip = |s: &str| -> IpAddr { s.parse().expect("literal") };
        let _a = counter.acquire(ip("2001:db8:1:2::1"), 2).expect("first");
        let _b = counter
            .acquire(ip("2001:db8:1:2:ffff::9"), 2)
            .expect("second, same /64");
        assert!(
            counter.acquire(ip("2001:db8:1:2:aaaa::1"), 2).is_none(),
            "a third address of the same /64 is the same subscriber"
        );
        assert!(
            counter.acquire(ip("2001:db8:1:3::1"), 2).is_some(),
            "another /64"
        );
        let per_56 = PerClientCounter::with_ipv6_prefix(56);
        let _c = per_56.acquire(ip("2001:db8:1:200::1"), 1).expect("first");
        assert!(per_56.acquire(ip("2001:db8:1:2ff::1"), 1).is_none());
        // IPv4-mapped addresses count as the IPv4 address.
        let _d = counter.acquire(ip("::ffff:10.0.0.1"), 1).expect("first");
        assert!(counter.acquire(ip("10.0.0.1"), 1).is_none());
    }
}
