//! Shared end-to-end fixtures: a testbed with nginx serving a 64 MiB file, and the proxy binary.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

pub mod dns;

use sha2::{Digest, Sha256};
use testbed::{Background, Options, Testbed};

/// Size of the big download (issue 2, test a).
pub const BIG: usize = 64 << 20;
/// The seed of the big download's bytes; any prefix can be regenerated with [`pseudo_random`].
pub const BIG_SEED: u64 = 0x006d_7074_6370;

/// A testbed with nginx in the server namespace and a scratch directory.
pub struct Lab {
    // Field order is drop order: processes stop before the namespaces go.
    pub nginx: Background,
    pub tb: Testbed,
    pub dir: tempfile::TempDir,
    pub big_sha: String,
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub use testbed::pseudo_random;

pub fn file_sha(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).expect("read file"))
}

impl Lab {
    /// Builds the lab, or returns None when the test must skip (not root, CI unset).
    pub fn new() -> Option<Self> {
        Self::with_options(Options::default())
    }

    pub fn with_options(options: Options) -> Option<Self> {
        if testbed::skip_unless_root() {
            return None;
        }
        let tb = Testbed::new(options).expect("testbed");
        let dir = tempfile::tempdir().expect("tempdir");
        let www = dir.path().join("www");
        std::fs::create_dir(&www).expect("www");
        let big = pseudo_random(BIG, BIG_SEED);
        std::fs::write(www.join("big.bin"), &big).expect("write big");
        std::fs::write(www.join("small.txt"), b"hello through mptcp-proxy\n").expect("write small");
        let big_sha = sha256_hex(&big);
        let nginx = tb.start_nginx(&www, dir.path()).expect("nginx");
        Some(Self {
            nginx,
            tb,
            dir,
            big_sha,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes a proxy config file and returns its path.
    pub fn config(&self, name: &str, toml: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, toml).expect("write config");
        path
    }

    /// Starts the proxy in the proxy namespace and waits for `wait_for`.
    pub fn start_proxy(&self, args: &[&str], wait_for: SocketAddr) -> Background {
        let mut argv = vec![env!("CARGO_BIN_EXE_mptcp-proxy")];
        argv.extend_from_slice(args);
        let mut cmd = self.tb.command(self.tb.proxy_ns(), argv[0]);
        cmd.args(&argv[1..]).env("RUST_LOG", "info");
        let proxy = Background::start(cmd).expect("start proxy");
        self.tb
            .wait_for_tcp(self.tb.proxy_ns(), wait_for, Duration::from_secs(20))
            .expect("proxy listening");
        proxy
    }

    /// Runs a command in the client namespace.
    pub fn client(&self, argv: &[&str]) -> Output {
        self.tb
            .command(self.tb.client_ns(), argv[0])
            .args(&argv[1..])
            .output()
            .expect("client command")
    }

    /// `[mptcpize run] curl -sS --fail ARGS...` in the client namespace through the proxy at
    /// 10.0.1.1:3128; panics unless curl succeeds. Returns what curl printed.
    pub fn curl_via_proxy(&self, mptcp: bool, args: &[&str]) -> String {
        let mut argv = if mptcp {
            vec!["mptcpize", "run"]
        } else {
            Vec::new()
        };
        argv.extend(["curl", "-sS", "--fail", "-x", "http://10.0.1.1:3128"]);
        argv.extend_from_slice(args);
        let out = self.client(&argv);
        curl_ok(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn proxy_tx(&self, interface: &str) -> u64 {
        self.tb
            .interface_bytes(self.tb.proxy_ns(), interface)
            .expect("counters")
            .1
    }

    /// The JSON access log's lines. The proxy writes them on a thread of its own, a moment after the
    /// response ends: this waits until the file has stopped growing for 200 ms (at most 3 s).
    pub fn access_log_lines(&self, name: &str) -> Vec<serde_json::Value> {
        let read = || std::fs::read_to_string(self.path(name)).unwrap_or_default();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let mut text = read();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = read();
            if (now == text && !now.is_empty()) || std::time::Instant::now() > deadline {
                text = now;
                break;
            }
            text = now;
        }
        text.lines()
            .map(|l| serde_json::from_str(l).expect("access log line is JSON"))
            .collect()
    }
}

/// Reads a chunked body (RFC 9112 §7.1), trailers ignored.
fn read_chunked(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
        if size == 0 {
            loop {
                let mut trailer = String::new();
                reader.read_line(&mut trailer).ok()?;
                if trailer.trim().is_empty() {
                    return Some(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).ok()?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf).ok()?;
    }
}

/// A tiny HTTP/1.1 upload sink in the server namespace: answers each request with the SHA-256 of its
/// body (Content-Length or chunked). Returns its address.
pub fn start_upload_sink(tb: &Testbed, addr: SocketAddr) -> SocketAddr {
    let listener = tb
        .in_ns(tb.server_ns(), || TcpListener::bind(addr))
        .expect("ns")
        .expect("bind sink");
    let local = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut length = 0usize;
                let mut chunked = false;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                        if name.eq_ignore_ascii_case("transfer-encoding") {
                            chunked = value.to_ascii_lowercase().contains("chunked");
                        }
                    }
                }
                let body = if chunked {
                    match read_chunked(&mut reader) {
                        Some(body) => body,
                        None => return,
                    }
                } else {
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    body
                };
                let digest = sha256_hex(&body);
                let mut stream = stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{digest}",
                    digest.len()
                );
            });
        }
    });
    local
}

/// Opens an MPTCP (or TCP) connection from the client namespace, bound to `source` if given.
pub fn client_connect(tb: &Testbed, proxy: SocketAddr, mptcp: bool) -> std::net::TcpStream {
    tb.in_ns(tb.client_ns(), || {
        let protocol = if mptcp {
            socket2::Protocol::MPTCP
        } else {
            socket2::Protocol::TCP
        };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(proxy),
            socket2::Type::STREAM,
            Some(protocol),
        )
        .expect("socket");
        socket.connect(&proxy.into()).expect("connect to proxy");
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        std::net::TcpStream::from(socket)
    })
    .expect("namespace")
}

/// Sends a raw request and reads the whole response (until the server closes).
pub fn raw_exchange(stream: &mut std::net::TcpStream, request: &[u8]) -> String {
    stream.write_all(request).expect("send");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

/// The status code of a raw HTTP response.
pub fn status_of(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

pub fn curl_ok(out: &Output) {
    assert!(
        out.status.success(),
        "curl failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads an HTTP head (request or response) line by line, until the blank line or the end; returns
/// its lines without line ends.
pub fn read_head(reader: &mut impl BufRead) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return lines;
        }
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            return lines;
        }
        lines.push(line);
    }
}
