//! One line per request, in Squid's native format (so Squid log tooling works) or JSON.
//!
//! Squid's native format is `%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`:
//! time, elapsed ms, client, result code/status, bytes to the client, method, URL, user,
//! hierarchy/peer, content type.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;

use crate::config::{AccessLogConfig, AccessLogFormat};
use crate::sockets::Transport;

/// One finished request.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// When the request started.
    pub started: SystemTime,
    /// How long it took.
    pub elapsed: Duration,
    /// The client's address.
    pub client: IpAddr,
    /// Squid's result code: `TCP_MISS`, `TCP_TUNNEL`, `TCP_DENIED`, `NONE_NONE`.
    pub result: &'static str,
    /// HTTP status sent to the client (200 for an established tunnel).
    pub status: u16,
    /// Bytes sent to the client, headers included.
    pub bytes: u64,
    /// The request method.
    pub method: String,
    /// The URL (`host:port` for CONNECT).
    pub url: String,
    /// The authenticated user, if any.
    pub user: Option<String>,
    /// The server the request went to, if any.
    pub peer: Option<IpAddr>,
    /// The response's content type, if any.
    pub content_type: Option<String>,
    /// How the client connection is carried.
    pub transport: Transport,
    /// Subflows of the client connection when the request ended.
    pub subflows: u8,
}

/// Keeps a log field a single token: Squid's format is space-separated.
fn token(text: &str) -> String {
    if text.is_empty() {
        return "-".to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

impl Entry {
    /// The Squid native line (without newline).
    pub fn squid_line(&self) -> String {
        let since = self.started.duration_since(UNIX_EPOCH).unwrap_or_default();
        let (hierarchy, peer) = match self.peer {
            Some(ip) => ("HIER_DIRECT", ip.to_string()),
            None => ("HIER_NONE", "-".to_owned()),
        };
        format!(
            "{}.{:03} {:>6} {} {}/{:03} {} {} {} {} {}/{} {}",
            since.as_secs(),
            since.subsec_millis(),
            self.elapsed.as_millis(),
            self.client,
            self.result,
            self.status,
            self.bytes,
            token(&self.method),
            token(&self.url),
            self.user.as_deref().map_or_else(|| "-".to_owned(), token),
            hierarchy,
            peer,
            self.content_type
                .as_deref()
                .map_or_else(|| "-".to_owned(), token),
        )
    }

    /// The JSON line: the Squid fields plus the transport and subflow count.
    pub fn json_line(&self) -> String {
        let since = self.started.duration_since(UNIX_EPOCH).unwrap_or_default();
        serde_json::json!({
            "time": since.as_secs_f64(),
            "elapsed_ms": self.elapsed.as_millis() as u64,
            "client": self.client.to_string(),
            "result": self.result,
            "status": self.status,
            "bytes": self.bytes,
            "method": self.method,
            "url": self.url,
            "user": self.user,
            "peer": self.peer.map(|p| p.to_string()),
            "content_type": self.content_type,
            "transport": self.transport.as_str(),
            "subflows": self.subflows,
        })
        .to_string()
    }
}

enum Sink {
    Off,
    Stdout,
    File(io::BufWriter<File>),
}

impl Sink {
    fn open(config: &AccessLogConfig) -> io::Result<(Option<PathBuf>, Sink)> {
        Ok(match config.path.as_str() {
            "off" => (None, Sink::Off),
            "-" => (None, Sink::Stdout),
            path => {
                let path = PathBuf::from(path);
                let file = open(&path)?;
                (Some(path), Sink::File(io::BufWriter::new(file)))
            }
        })
    }

    fn write(&mut self, line: &[u8]) -> io::Result<()> {
        match self {
            Sink::Off => Ok(()),
            Sink::Stdout => io::stdout().lock().write_all(line),
            Sink::File(file) => file.write_all(line),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Off => Ok(()),
            Sink::Stdout => io::stdout().lock().flush(),
            Sink::File(file) => file.flush(),
        }
    }
}

/// What the writer thread is sent.
enum Message {
    Line(Box<Entry>),
    /// Look at the pending sink swap (a reopen).
    Wake,
    /// Write out everything queued before, then answer.
    Flush(mpsc::SyncSender<()>),
}

/// A sink and format waiting to replace the writer's (set by [`AccessLog::reopen`]).
type Swap = Arc<Mutex<Option<(Sink, Option<AccessLogFormat>)>>>;

/// The access log: a handle that queues entries for a writer thread of its own, which formats them
/// and writes to stdout or a reopenable file.
///
/// [`AccessLog::log`] never blocks a request: it puts the entry in a bounded channel
/// (`access_log.queue_lines`), and when the writer has fallen behind (a slow disk, a stdout nobody
/// reads) the entry is dropped and counted in `mptcp_proxy_access_log_dropped_total`.
///
/// A cheap handle: clones share one queue and writer, so a configuration reload can move every holder
/// (running tunnels included) to a new path or format with [`AccessLog::reconfigure`], and
/// logrotate's SIGHUP reopens the file with [`AccessLog::reopen`].
#[derive(Clone)]
pub struct AccessLog {
    inner: Arc<Inner>,
}

struct Inner {
    queue: mpsc::SyncSender<Message>,
    enabled: AtomicBool,
    path: Mutex<Option<PathBuf>>,
    swap: Swap,
    dropped: Counter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("path", &self.inner.path)
            .field("dropped", &self.inner.dropped.get())
            .finish()
    }
}

fn open(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl AccessLog {
    /// Opens the log as configured (`-` is stdout, `off` disables it) and starts its writer thread.
    pub fn open(config: &AccessLogConfig) -> io::Result<Self> {
        Self::open_with(config, Counter::default())
    }

    /// [`AccessLog::open`], counting dropped lines in `dropped` (the metric).
    pub fn open_with(config: &AccessLogConfig, dropped: Counter) -> io::Result<Self> {
        let (path, sink) = Sink::open(config)?;
        let enabled = !matches!(sink, Sink::Off);
        let (queue, lines) = mpsc::sync_channel(config.queue_lines.max(1));
        let swap = Swap::default();
        let writer_swap = swap.clone();
        let format = config.format;
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(lines, sink, format, &writer_swap))?;
        Ok(Self {
            inner: Arc::new(Inner {
                queue,
                enabled: AtomicBool::new(enabled),
                path: Mutex::new(path),
                swap,
                dropped,
            }),
        })
    }

    /// Whether lines are written at all (`path = "off"` writes none): callers skip building entries.
    pub fn is_enabled(&self) -> bool {
        self.inner.enabled.load(Ordering::Relaxed)
    }

    /// Queues one entry for the writer; drops it (and counts it) when the queue is full. Never blocks.
    pub fn log(&self, entry: Entry) {
        if !self.inner.enabled.load(Ordering::Relaxed) {
            return;
        }
        if let Err(mpsc::TrySendError::Full(_)) =
            self.inner.queue.try_send(Message::Line(Box::new(entry)))
        {
            self.inner.dropped.inc();
        }
    }

    /// [`AccessLog::log`] for a borrowed entry (clones it).
    pub fn write(&self, entry: &Entry) {
        if self.inner.enabled.load(Ordering::Relaxed) {
            self.log(entry.clone());
        }
    }

    /// Lines dropped so far because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.get()
    }

    /// Reopens the file at the same path (after logrotate moved it; SIGHUP).
    pub fn reopen(&self) -> io::Result<()> {
        let path = self
            .inner
            .path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(path) = path else { return Ok(()) };
        let sink = Sink::File(io::BufWriter::new(open(&path)?));
        self.hand_over(sink, None);
        Ok(())
    }

    /// Moves the log to `config`'s path and format (a reload). The new file is opened here first: if
    /// that fails, the log stays where it was and the error is returned.
    pub fn reconfigure(&self, config: &AccessLogConfig) -> io::Result<()> {
        let (path, sink) = Sink::open(config)?;
        self.inner
            .enabled
            .store(!matches!(sink, Sink::Off), Ordering::Relaxed);
        *self.inner.path.lock().unwrap_or_else(|p| p.into_inner()) = path;
        self.hand_over(sink, Some(config.format));
        Ok(())
    }

    fn hand_over(&self, sink: Sink, format: Option<AccessLogFormat>) {
        {
            let mut swap = self.inner.swap.lock().unwrap_or_else(|p| p.into_inner());
            // A reopen right after a reload keeps the reload's format.
            let format = format.or_else(|| swap.as_ref().and_then(|(_, f)| *f));
            *swap = Some((sink, format));
        }
        // A full queue wakes the writer anyway.
        let _ = self.inner.queue.try_send(Message::Wake);
    }

    /// Waits until everything queued so far is written and flushed, at most `timeout`. Blocks: call
    /// it from a blocking context (shutdown, tests).
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let (ack, acked) = mpsc::sync_channel(1);
        let mut message = Message::Flush(ack);
        loop {
            match self.inner.queue.try_send(message) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        acked
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .is_ok()
    }
}

fn writer(
    lines: mpsc::Receiver<Message>,
    mut sink: Sink,
    mut format: AccessLogFormat,
    swap: &Mutex<Option<(Sink, Option<AccessLogFormat>)>>,
) {
    let mut failing = false;
    let mut line = Vec::with_capacity(512);
    let mut handle = |message: Message, sink: &mut Sink, format: AccessLogFormat| match message {
        Message::Line(entry) => {
            line.clear();
            let text = match format {
                AccessLogFormat::Squid => entry.squid_line(),
                AccessLogFormat::Json => entry.json_line(),
            };
            line.extend_from_slice(text.as_bytes());
            line.push(b'\n');
            match sink.write(&line) {
                Ok(()) => failing = false,
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, "writing the access log failed");
                }
                Err(_) => {}
            }
        }
        Message::Wake => {}
        Message::Flush(ack) => {
            let _ = sink.flush();
            let _ = ack.try_send(());
        }
    };
    while let Ok(first) = lines.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            if let Some((new_sink, new_format)) =
                swap.lock().unwrap_or_else(|p| p.into_inner()).take()
            {
                let _ = sink.flush();
                sink = new_sink;
                if let Some(new_format) = new_format {
                    format = new_format;
                }
            }
            handle(message, &mut sink, format);
            next = lines.try_recv().ok();
        }
        // Nothing more queued: write out what is buffered.
        let _ = sink.flush();
    }
    let _ = sink.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            started: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            elapsed: Duration::from_millis(45),
            client: "10.0.1.2".parse().expect("literal"),
            result: "TCP_MISS",
            status: 200,
            bytes: 1234,
            method: "GET".into(),
            url: "http://10.0.3.2/a b".into(),
            user: None,
            peer: Some("10.0.3.2".parse().expect("literal")),
            content_type: Some("text/html".into()),
            transport: Transport::Mptcp,
            subflows: 2,
        }
    }

    #[test]
    fn squid_native_line() {
        assert_eq!(
            entry().squid_line(),
            "1700000000.123     45 10.0.1.2 TCP_MISS/200 1234 GET http://10.0.3.2/a_b - HIER_DIRECT/10.0.3.2 text/html"
        );
        let denied = Entry {
            result: "TCP_DENIED",
            status: 403,
            peer: None,
            content_type: None,
            user: Some("alice".into()),
            ..entry()
        };
        assert!(denied
            .squid_line()
            .ends_with("TCP_DENIED/403 1234 GET http://10.0.3.2/a_b alice HIER_NONE/- -"));
    }

    #[test]
    fn json_line_adds_transport_and_subflows() {
        let value: serde_json::Value = serde_json::from_str(&entry().json_line()).expect("json");
        assert_eq!(value["transport"], "mptcp");
        assert_eq!(value["subflows"], 2);
        assert_eq!(value["status"], 200);
        assert_eq!(value["url"], "http://10.0.3.2/a b");
    }

    #[test]
    fn reconfigure_moves_every_clone_to_the_new_path_and_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = dir.path().join("first.log");
        let second = dir.path().join("second.log");
        let log = AccessLog::open(&AccessLogConfig {
            path: first.display().to_string(),
            format: AccessLogFormat::Squid,
            ..AccessLogConfig::default()
        })
        .expect("open");
        let held_by_a_tunnel = log.clone();
        log.write(&entry());
        assert!(log.flush(Duration::from_secs(5)));
        log.reconfigure(&AccessLogConfig {
            path: second.display().to_string(),
            format: AccessLogFormat::Json,
            ..AccessLogConfig::default()
        })
        .expect("reconfigure");
        held_by_a_tunnel.write(&entry());
        assert!(log.flush(Duration::from_secs(5)));
        assert_eq!(
            std::fs::read_to_string(&first)
                .expect("read")
                .lines()
                .count(),
            1
        );
        let moved = std::fs::read_to_string(&second).expect("read");
        let value: serde_json::Value = serde_json::from_str(moved.trim()).expect("json line");
        assert_eq!(value["status"], 200);
        let unwritable = AccessLogConfig {
            path: dir.path().join("no/such/dir.log").display().to_string(),
            format: AccessLogFormat::Squid,
            ..AccessLogConfig::default()
        };
        assert!(log.reconfigure(&unwritable).is_err());
        log.write(&entry());
        assert!(log.flush(Duration::from_secs(5)));
        assert_eq!(
            std::fs::read_to_string(&second)
                .expect("read")
                .lines()
                .count(),
            2
        );
    }

    #[test]
    fn file_log_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let log = AccessLog::open(&AccessLogConfig {
            path: path.display().to_string(),
            format: AccessLogFormat::Squid,
            ..AccessLogConfig::default()
        })
        .expect("open");
        log.write(&entry());
        assert!(log.flush(Duration::from_secs(5)));
        std::fs::rename(&path, dir.path().join("access.log.1")).expect("rotate");
        log.reopen().expect("reopen");
        log.write(&entry());
        assert!(log.flush(Duration::from_secs(5)));
        assert_eq!(
            std::fs::read_to_string(&path)
                .expect("read")
                .lines()
                .count(),
            1
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("access.log.1"))
                .expect("read")
                .lines()
                .count(),
            1
        );
    }

    #[test]
    fn a_stuck_sink_never_blocks_logging() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("access.fifo");
        let path = std::ffi::CString::new(fifo.display().to_string()).expect("path");
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        // A reader that never reads: the pipe fills after 64 KiB and writes block, like a stuck disk
        // or a stdout nobody drains.
        let _reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .expect("open fifo for reading");
        let log = AccessLog::open(&AccessLogConfig {
            path: fifo.display().to_string(),
            queue_lines: 64,
            ..AccessLogConfig::default()
        })
        .expect("open");
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for _ in 0..5_000 {
                log.write(&entry());
            }
            let _ = done.send(log);
        });
        let log = finished
            .recv_timeout(Duration::from_secs(10))
            .expect("5000 log calls must return although the sink is stuck");
        assert!(log.dropped() > 0, "dropped lines are counted");
    }
}
