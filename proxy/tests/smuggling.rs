//! The request-smuggling and malformed-input corpus (issue 12), end to end in the netns testbed.
//!
//! Each case is raw bytes an MPTCP client sends to the proxy on a connection of its own, the statuses
//! it must get back, in order, and the requests the origin must see. The origin is a strict recording
//! HTTP/1.1 server in the server namespace: it records each complete request it parses (method, path,
//! body). Every path carries its case's number (`/cNN-x`), so at the end the origin must have seen
//! exactly the well-formed requests of each case, each once, and nothing of the others.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const PROXY: &str = "10.0.1.1:3128";
const ORIGIN: &str = "10.0.3.2:8080";
/// A request inside another's body: only ever body bytes.
const HIDDEN: &str = "GET /c45-x HTTP/1.1\r\nHost: 10.0.3.2:8080\r\n\r\n";

struct Case {
    name: &'static str,
    /// The bytes sent; `{O}` stands for the origin's `host:port`.
    raw: String,
    /// The statuses, comma-separated in order; `|` separates acceptable alternatives, and `-` means
    /// "the proxy closed without an answer".
    expect: &'static str,
    /// The origin must see exactly these (path, body) requests.
    origin: Vec<(&'static str, &'static str)>,
    /// Half-close after sending (for requests cut short).
    half_close: bool,
}

fn case(
    name: &'static str,
    raw: &str,
    expect: &'static str,
    origin: &[(&'static str, &'static str)],
) -> Case {
    Case {
        name,
        raw: raw.replace("{O}", ORIGIN),
        expect,
        origin: origin.to_vec(),
        half_close: false,
    }
}

/// A request head with `Host` and `Connection: close`, then `rest` (more fields, blank line, body).
fn req(line: &str, rest: &str) -> String {
    format!("{line}\r\nHost: {{O}}\r\nConnection: close\r\n{rest}")
}

fn corpus() -> Vec<Case> {
    let post = |path: &str| format!("POST http://{{O}}{path} HTTP/1.1");
    let get = |path: &str| format!("GET http://{{O}}{path} HTTP/1.1");
    let chunked = "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let mut cases = vec![
        case("c01 GET", &req(&get("/c01-a"), "\r\n"), "200", &[("/c01-a", "")]),
        case("c02 POST with Content-Length", &req(&post("/c02-a"), "Content-Length: 5\r\n\r\nhello"), "200", &[("/c02-a", "hello")]),
        case("c03 POST chunked", &req(&post("/c03-a"), chunked), "200", &[("/c03-a", "hello")]),
        case("c04 chunk extension", &req(&post("/c04-a"), "Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\n\r\n"), "200", &[("/c04-a", "hello")]),
        case("c05 Chunked in capitals", &req(&post("/c05-a"), "Transfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "200", &[("/c05-a", "hello")]),
        case("c06 duplicate equal Content-Length", &req(&post("/c06-a"), "Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello"), "200", &[("/c06-a", "hello")]),
        case("c07 CL then TE", &req(&post("/c07"), "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), "400", &[]),
        case("c08 TE then CL", &req(&post("/c08"), "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"), "400", &[]),
        case("c09 conflicting Content-Length fields", &req(&post("/c09"), "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"), "400", &[]),
        case("c10 Content-Length list 5, 6", &req(&post("/c10"), "Content-Length: 5, 6\r\n\r\nhello!"), "400", &[]),
        case("c11 negative Content-Length", &req(&post("/c11"), "Content-Length: -1\r\n\r\n"), "400", &[]),
        case("c12 Content-Length +5", &req(&post("/c12"), "Content-Length: +5\r\n\r\nhello"), "400", &[]),
        case("c13 Content-Length overflow", &req(&post("/c13"), "Content-Length: 99999999999999999999\r\n\r\nhello"), "400", &[]),
        case("c14 chunked, identity", &req(&post("/c14"), "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"), "400", &[]),
        case("c15 spaces before chunked", &req(&post("/c15-a"), "Transfer-Encoding:    chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "200", &[("/c15-a", "hello")]),
        case("c16 ' Transfer-Encoding' line (obs-fold)", &req(&post("/c16"), " Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"), "400", &[]),
        case("c17 xchunked", &req(&post("/c17"), "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"), "400", &[]),
        case("c18 gzip, chunked", &req(&post("/c18"), "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"), "501", &[]),
        case("c19 chunked, chunked", &req(&post("/c19"), "Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"), "400", &[]),
        case("c20 HTTP/1.0 with chunked", "POST http://{O}/c20 HTTP/1.0\r\nHost: {O}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "400", &[]),
        case("c21 obs-fold", &req(&get("/c21"), "X-A: a\r\n b\r\n\r\n"), "400", &[]),
        case("c22 bare CR in a value", &req(&get("/c22"), "X-A: a\rb\r\n\r\n"), "400", &[]),
        case("c23 NUL in a value", &req(&get("/c23"), "X-A: a\0b\r\n\r\n"), "400", &[]),
        case("c24 NUL in a name", &req(&get("/c24"), "X\0A: b\r\n\r\n"), "400", &[]),
        case("c25 control byte in a value", &req(&get("/c25"), "X-A: a\x01b\r\n\r\n"), "400", &[]),
        case("c26 DEL in a value", &req(&get("/c26"), "X-A: a\x7fb\r\n\r\n"), "400", &[]),
        case("c27 field without a colon", &req(&get("/c27"), "X-NoColon\r\n\r\n"), "400", &[]),
        case("c28 space before the colon", &req(&get("/c28"), "X-A : b\r\n\r\n"), "400", &[]),
        case("c29 invalid chunk size", &req(&post("/c29"), "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"), "400|-", &[]),
        case("c30 oversized chunk size", &req(&post("/c30"), "Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nhello\r\n0\r\n\r\n"), "400|-", &[]),
        case("c31 chunk longer than its size", &req(&post("/c31"), "Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n"), "400|-", &[]),
        Case { half_close: true, ..case("c32 missing final CRLF", &req(&post("/c32"), "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"), "400|-", &[]) },
        case("c33 space in the request target", &req("GET http://{O}/c33 x HTTP/1.1", "\r\n"), "400", &[]),
        case("c34 user info in the URL", &req("GET http://user:pw@{O}/c34-a HTTP/1.1", "\r\n"), "200", &[("/c34-a", "")]),
        case("c35 IPv6 literal", &req("GET http://[fd00:3::2]:8080/c35-a HTTP/1.1", "\r\n"), "200", &[("/c35-a", "")]),
        case("c36 IPv6 literal with a zone", &req("GET http://[fe80::1%25s1]:8080/c36 HTTP/1.1", "\r\n"), "400", &[]),
        case("c37 percent-encoded host", &req("GET http://%31%30.0.3.2:8080/c37 HTTP/1.1", "\r\n"), "400", &[]),
        case("c38 HTTP/0.9 request line", "GET /c38\r\n\r\n", "400|505", &[]),
        case("c39 HTTP/2.0 request line", &req("GET http://{O}/c39 HTTP/2.0", "\r\n"), "400|505", &[]),
        case("c40 HTTP/1.1 without Host", "GET http://{O}/c40 HTTP/1.1\r\nConnection: close\r\n\r\n", "400", &[]),
        case("c41 two Host fields", &req(&get("/c41"), "Host: other\r\n\r\n"), "400", &[]),
        case(
            "c42 two pipelined GETs",
            &format!("GET http://{{O}}/c42-a HTTP/1.1\r\nHost: {{O}}\r\n\r\n{}", req(&get("/c42-b"), "\r\n")),
            "200,200",
            &[("/c42-a", ""), ("/c42-b", "")],
        ),
        case(
            "c43 GET then a pipelined CL+TE POST",
            &format!(
                "GET http://{{O}}/c43-a HTTP/1.1\r\nHost: {{O}}\r\n\r\n{}",
                req(&post("/c43-b"), "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            ),
            // A pipelined head gets the same framing check as the first (CL+TE is answered 400 and the
            // connection closed, RFC 9112 §6.3): the origin never sees the second request, let alone
            // its five bytes as the start of another. (Under hyper a head in the same read as the
            // previous one escaped the check and was forwarded re-framed, Transfer-Encoding winning.)
            "200,400",
            &[("/c43-a", "")],
        ),
        case(
            "c44 POST then a pipelined request with NUL",
            &format!(
                "POST http://{{O}}/c44-a HTTP/1.1\r\nHost: {{O}}\r\nContent-Length: 2\r\n\r\nhi{}",
                req(&get("/c44-b"), "X-A: \0\r\n\r\n")
            ),
            "200,400",
            &[("/c44-a", "hi")],
        ),
        case(
            "c45 a request hidden in a body",
            &req(&post("/c45-a"), &format!("Content-Length: {}\r\n\r\n{HIDDEN}", HIDDEN.len())),
            "200",
            &[("/c45-a", HIDDEN)],
        ),
        case(
            "c46 chunked POST then a pipelined GET",
            &format!(
                "POST http://{{O}}/c46-a HTTP/1.1\r\nHost: {{O}}\r\n{chunked}{}",
                req(&get("/c46-b"), "\r\n")
            ),
            "200,200",
            &[("/c46-a", "hello"), ("/c46-b", "")],
        ),
        case("c47 bare CR in the request line", &req("GET http://{O}/c47\rHTTP/1.1", "\r\n"), "400", &[]),
        case("c48 invalid method", &req("G@T http://{O}/c48 HTTP/1.1", "\r\n"), "400", &[]),
        case("c49 https:// in absolute-form", &req("GET https://{O}/c49 HTTP/1.1", "\r\n"), "400", &[]),
        case("c50 OPTIONS with Max-Forwards: 0", &req("OPTIONS http://{O}/c50 HTTP/1.1", "Max-Forwards: 0\r\n\r\n"), "200", &[]),
        case("c51 CONNECT to port 25", "CONNECT 10.0.3.2:25 HTTP/1.1\r\nHost: 10.0.3.2:25\r\n\r\n", "403", &[]),
        case("c52 absolute-form to port 25", &req("GET http://10.0.3.2:25/c52 HTTP/1.1", "\r\n"), "403", &[]),
        case("c53 cloud metadata", &req("GET http://169.254.169.254/latest/meta-data/ HTTP/1.1", "\r\n"), "403", &[]),
        case("c54 port 99999", &req("GET http://10.0.3.2:99999/c54 HTTP/1.1", "\r\n"), "400", &[]),
        case("c55 head too large", &req(&get("/c55"), &format!("X-Big: {}\r\n\r\n", "a".repeat(70_000))), "431", &[]),
        case("c56 LF-only line ends", "GET http://10.0.3.2:8080/c56-a HTTP/1.1\nHost: x\nConnection: close\n\n", "200", &[("/c56-a", "")]),
        case("c57 chunked with trailer fields", &req(&post("/c57-a"), "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"), "200", &[("/c57-a", "hello")]),
        case("c58 POST with Content-Length: 0", &req(&post("/c58-a"), "Content-Length: 0\r\n\r\n"), "200", &[("/c58-a", "")]),
    ];
    for c in &mut cases {
        c.raw = c.raw.replace("{O}", ORIGIN);
    }
    cases
}

/// One request the origin parsed completely.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    body: Vec<u8>,
}

/// Reads one request strictly (httparse defaults, Content-Length or chunked); None when the
/// connection ends or the request is malformed or incomplete.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<(Seen, bool)> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line).ok()? == 0 {
            return None;
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" || line == b"\n" {
            break;
        }
    }
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut fields);
    if !matches!(request.parse(&head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let field = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let close = field("connection").is_some_and(|c| c.contains("close"));
    let body = if field("transfer-encoding").as_deref() == Some("chunked") {
        let mut body = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).ok()?;
            let size = usize::from_str_radix(line.trim_end().split(';').next()?, 16).ok()?;
            if size == 0 {
                loop {
                    let mut trailer = String::new();
                    if reader.read_line(&mut trailer).ok()? == 0 {
                        return None;
                    }
                    if trailer == "\r\n" {
                        break;
                    }
                }
                break body;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..]).ok()?;
            let mut crlf = [0u8; 2];
            reader.read_exact(&mut crlf).ok()?;
            if &crlf != b"\r\n" {
                return None;
            }
        }
    } else {
        let length: usize = field("content-length").map_or(Some(0), |v| v.parse().ok())?;
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).ok()?;
        body
    };
    Some((
        Seen {
            path: request.path?.to_owned(),
            body,
        },
        close,
    ))
}

/// The recording origin on `addr` in the server namespace.
fn start_origin(lab: &Lab, addr: SocketAddr, seen: Arc<Mutex<Vec<Seen>>>) {
    let listener = lab
        .tb
        .in_ns(lab.tb.server_ns(), || TcpListener::bind(addr))
        .expect("ns")
        .expect("bind origin");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut writer = stream.try_clone().expect("clone");
                let mut reader = BufReader::new(stream);
                while let Some((request, close)) = read_request(&mut reader) {
                    seen.lock().expect("lock").push(request);
                    if writer
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .is_err()
                        || close
                    {
                        return;
                    }
                }
            });
        }
    });
}

/// The final statuses in a raw response stream (informational ones skipped), or `-` for none.
fn statuses(response: &[u8]) -> String {
    let text = String::from_utf8_lossy(response);
    let found: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12))
        .filter(|code| code.bytes().all(|b| b.is_ascii_digit()) && !code.starts_with('1'))
        .collect();
    if found.is_empty() {
        "-".to_owned()
    } else {
        found.join(",")
    }
}

#[test]
fn smuggling_and_malformed_input_corpus() {
    let Some(lab) = Lab::new() else { return };
    let seen = Arc::new(Mutex::new(Vec::new()));
    start_origin(&lab, ORIGIN.parse().expect("literal"), seen.clone());
    start_origin(
        &lab,
        "[fd00:3::2]:8080".parse().expect("literal"),
        seen.clone(),
    );
    let config = lab.config(
        "proxy.toml",
        "[[listener]]\naddress = \"10.0.1.1:3128\"\n[access_log]\npath = \"off\"\n",
    );
    let _proxy = lab.start_proxy(
        &["--config", &config.display().to_string()],
        PROXY.parse().expect("literal"),
    );
    let cases = corpus();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let proxy: SocketAddr = PROXY.parse().expect("literal");
    // Eight connections at a time: every case has a connection of its own.
    let results: Vec<(usize, String)> = std::thread::scope(|scope| {
        let chunks: Vec<Vec<(usize, &Case)>> = cases
            .iter()
            .enumerate()
            .collect::<Vec<_>>()
            .chunks(cases.len().div_ceil(8))
            .map(<[_]>::to_vec)
            .collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let lab = &lab;
                scope.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|(i, case)| {
                            let mut stream = client_connect(&lab.tb, proxy, true);
                            stream
                                .set_read_timeout(Some(Duration::from_secs(4)))
                                .expect("timeout");
                            let _ = stream.write_all(case.raw.as_bytes());
                            if case.half_close {
                                let _ = stream.shutdown(std::net::Shutdown::Write);
                            }
                            let mut response = Vec::new();
                            let _ = stream.read_to_end(&mut response);
                            (i, statuses(&response))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .collect()
    });
    std::thread::sleep(Duration::from_millis(500));
    let seen = seen.lock().expect("lock").clone();
    let mut by_case: HashMap<String, Vec<Seen>> = HashMap::new();
    for request in &seen {
        let key = request.path.split('-').next().unwrap_or("").to_owned();
        by_case.entry(key).or_default().push(request.clone());
    }
    let mut failures = Vec::new();
    for (i, got) in results {
        let case = &cases[i];
        if !case.expect.split('|').any(|alternative| alternative == got) {
            failures.push(format!(
                "{}: statuses {got}, expected {}",
                case.name, case.expect
            ));
        }
        let key = format!("/{}", &case.name[..3]);
        let origin = by_case.remove(&key).unwrap_or_default();
        let mut expected: Vec<(String, Vec<u8>)> = case
            .origin
            .iter()
            .map(|(p, b)| ((*p).to_owned(), b.as_bytes().to_vec()))
            .collect();
        let mut actual: Vec<(String, Vec<u8>)> =
            origin.into_iter().map(|s| (s.path, s.body)).collect();
        expected.sort();
        actual.sort();
        if expected != actual {
            failures.push(format!(
                "{}: the origin saw {:?}, expected {:?}",
                case.name,
                actual
                    .iter()
                    .map(|(p, b)| (p.as_str(), String::from_utf8_lossy(b)))
                    .collect::<Vec<_>>(),
                case.origin
            ));
        }
    }
    assert!(
        by_case.is_empty(),
        "requests of no case reached the origin: {by_case:?}"
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
