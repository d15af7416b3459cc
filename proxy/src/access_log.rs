//! One line per request, in Squid's native format (so Squid log tooling works) or JSON.
//!
//! Squid's native format is `%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`:
//! time, elapsed ms, client, result code/status, bytes to the client, method, URL, user,
//! hierarchy/peer, content type.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    File(File),
}

/// Where the log goes now and in which format; replaced whole on reconfiguration.
struct State {
    format: AccessLogFormat,
    path: Option<PathBuf>,
    sink: Sink,
}

/// The access log: formats entries and writes them to stdout or a reopenable file.
///
/// A cheap handle: clones share one sink, so a configuration reload can move every holder (running
/// tunnels included) to a new path or format with [`AccessLog::reconfigure`], and logrotate's SIGHUP
/// reopens the file with [`AccessLog::reopen`].
#[derive(Clone)]
pub struct AccessLog {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("AccessLog")
            .field("format", &state.format)
            .field("path", &state.path)
            .finish()
    }
}

fn open(path: &PathBuf) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn state_for(config: &AccessLogConfig) -> io::Result<State> {
    let (path, sink) = match config.path.as_str() {
        "off" => (None, Sink::Off),
        "-" => (None, Sink::Stdout),
        path => {
            let path = PathBuf::from(path);
            let file = open(&path)?;
            (Some(path), Sink::File(file))
        }
    };
    Ok(State {
        format: config.format,
        path,
        sink,
    })
}

impl AccessLog {
    /// Opens the log as configured (`-` is stdout, `off` disables it).
    pub fn open(config: &AccessLogConfig) -> io::Result<Self> {
        Ok(Self {
            state: Arc::new(Mutex::new(state_for(config)?)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reopens the file (after logrotate moved it; SIGHUP).
    pub fn reopen(&self) -> io::Result<()> {
        let mut state = self.lock();
        if let Some(path) = &state.path {
            let file = open(path)?;
            state.sink = Sink::File(file);
        }
        Ok(())
    }

    /// Moves the log to `config`'s path and format (a reload). The new file is opened first: if that
    /// fails, the log stays where it was and the error is returned.
    pub fn reconfigure(&self, config: &AccessLogConfig) -> io::Result<()> {
        let new = state_for(config)?;
        *self.lock() = new;
        Ok(())
    }

    /// Writes one entry; a write error is reported once per failure, never fatal.
    pub fn write(&self, entry: &Entry) {
        let format = {
            let state = self.lock();
            if matches!(state.sink, Sink::Off) {
                return;
            }
            state.format
        };
        let mut line = match format {
            AccessLogFormat::Squid => entry.squid_line(),
            AccessLogFormat::Json => entry.json_line(),
        };
        line.push('\n');
        let mut state = self.lock();
        let result = match &mut state.sink {
            Sink::Off => Ok(()),
            Sink::Stdout => io::stdout().lock().write_all(line.as_bytes()),
            Sink::File(file) => file.write_all(line.as_bytes()),
        };
        if let Err(error) = result {
            tracing::warn!(%error, "writing the access log failed");
        }
    }
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
        })
        .expect("open");
        let held_by_a_tunnel = log.clone();
        log.write(&entry());
        log.reconfigure(&AccessLogConfig {
            path: second.display().to_string(),
            format: AccessLogFormat::Json,
        })
        .expect("reconfigure");
        held_by_a_tunnel.write(&entry());
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
        };
        assert!(log.reconfigure(&unwritable).is_err());
        log.write(&entry());
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
        })
        .expect("open");
        log.write(&entry());
        std::fs::rename(&path, dir.path().join("access.log.1")).expect("rotate");
        log.reopen().expect("reopen");
        log.write(&entry());
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
}
