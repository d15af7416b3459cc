//! RFC 8803 0-RTT Convert end to end (issue 18): the converter (`--convert`) in the proxy namespace and
//! the `mptcp-convert` agent in the client namespace, with nginx as the server and curl as the
//! unmodified application.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;
use mptcp_proxy::convert::converter::{decide, Decision, Policy};
use mptcp_proxy::convert::wire::{tlv_type, ErrorCode, MessageRepr, Parsed, TlvRepr};
use testbed::{Background, DelayConfig, Direction, Host, Options};

const CONVERTER: &str = "10.0.1.1:5124";
const SOCKS: &str = "127.0.0.1:1080";

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("literal")
}

/// Starts the proxy with a converter on 10.0.1.1:5124 (and a forward listener to wait on, so no test
/// connection shows in the converter's log), TFO server side on in the proxy namespace.
fn start_converter(lab: &Lab, extra_toml: &str) -> Background {
    lab.tb
        .exec(
            lab.tb.proxy_ns(),
            &["sysctl", "-qw", "net.ipv4.tcp_fastopen=3"],
        )
        .expect("sysctl in the proxy namespace");
    let config = lab.config(
        "convert.toml",
        &format!(
            "[access_log]\npath = \"{}\"\nformat = \"json\"\n{extra_toml}",
            lab.path("convert-access.log").display()
        ),
    );
    lab.start_proxy(
        &[
            "--config",
            &config.display().to_string(),
            "--listen",
            "10.0.1.1:3128",
            "--convert",
            "10.0.1.1",
            "--metrics",
            "off",
        ],
        addr("10.0.1.1:3128"),
    )
}

/// Starts the agent in the client namespace with extra arguments; waits for its SOCKS port.
fn start_agent(lab: &Lab, args: &[&str], wait_for: &str) -> Background {
    let mut cmd = lab
        .tb
        .command(lab.tb.client_ns(), env!("CARGO_BIN_EXE_mptcp-convert"));
    cmd.args(["--converter", "10.0.1.1"])
        .args(args)
        .env("RUST_LOG", "info");
    let agent = Background::start(cmd).expect("start agent");
    lab.tb
        .wait_for_tcp(lab.tb.client_ns(), addr(wait_for), Duration::from_secs(20))
        .expect("agent listening");
    agent
}

/// Sends raw bytes to the converter over plain TCP from the client namespace, half-closes, and
/// returns everything it answered.
fn exchange(lab: &Lab, request: &[u8]) -> Vec<u8> {
    lab.tb
        .in_ns(lab.tb.client_ns(), || {
            let mut stream = TcpStream::connect(addr(CONVERTER)).expect("connect converter");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            stream.write_all(request).expect("send");
            stream.shutdown(Shutdown::Write).expect("half-close");
            let mut answer = Vec::new();
            stream
                .read_to_end(&mut answer)
                .expect("the converter answers and closes");
            answer
        })
        .expect("client namespace")
}

fn parse_answer(answer: &[u8]) -> MessageRepr {
    match MessageRepr::parse(answer) {
        Ok(Parsed::Complete { message, len }) => {
            assert_eq!(len, answer.len(), "nothing may follow an error: {answer:?}");
            message
        }
        other => panic!("not a Convert message: {other:?} from {answer:?}"),
    }
}

/// The converter's access-log lines once one satisfies `done` (a tunnel's line is written when it
/// closes, just after the client saw its last byte); waits up to 10 s.
fn log_until(lab: &Lab, done: impl Fn(&serde_json::Value) -> bool) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = lab.access_log_lines("convert-access.log");
        if log.iter().any(&done) || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn connect_request(destination: &str) -> Vec<u8> {
    MessageRepr::new(vec![TlvRepr::connect(addr(destination), &[])])
        .to_bytes()
        .expect("emit")
}

#[test]
fn curl_through_the_agent_downloads_64_mib_intact_over_two_subflows() {
    let Some(lab) = Lab::with_options(Options {
        path_rate_mbit: [Some(200), Some(200)],
        ..Options::default()
    }) else {
        return;
    };
    let _proxy = start_converter(&lab, "");
    let _agent = start_agent(&lab, &[], SOCKS);
    let before = (lab.proxy_tx("p1"), lab.proxy_tx("p2"));
    let output = lab.path("big.out");
    curl_ok(&lab.client(&[
        "curl",
        "-sS",
        "--fail",
        "--socks5",
        SOCKS,
        "-o",
        &output.display().to_string(),
        "http://10.0.3.2/big.bin",
    ]));
    assert_eq!(file_sha(&output), lab.big_sha, "download corrupted");
    let joins = lab
        .tb
        .nstat(lab.tb.proxy_ns(), "MPTcpExtMPJoinSynRx")
        .expect("nstat");
    assert!(joins >= 1, "no MP_JOIN reached the converter");
    let (p1, p2) = (lab.proxy_tx("p1") - before.0, lab.proxy_tx("p2") - before.1);
    let minimum = (BIG / 20) as u64;
    assert!(
        p1 > minimum && p2 > minimum,
        "both paths must carry data: p1 {p1} bytes, p2 {p2} bytes"
    );
    let log = log_until(&lab, |l| l["result"] == "TCP_TUNNEL");
    let line = log.last().expect("an access log line");
    assert_eq!(line["method"], "CONVERT", "{line}");
    assert_eq!(line["url"], "10.0.3.2:80", "{line}");
    assert_eq!(line["result"], "TCP_TUNNEL", "{line}");
    assert_eq!(line["transport"], "mptcp", "{line}");
    assert!(line["subflows"].as_u64().unwrap_or(0) >= 2, "{line}");
    assert!(line["bytes"].as_u64().unwrap_or(0) >= BIG as u64, "{line}");
}

#[test]
fn denied_and_failed_destinations_get_their_error_tlvs() {
    let Some(lab) = Lab::new() else { return };
    let _proxy = start_converter(&lab, "");
    // Loopback is in the default deny_destinations: Not Authorized (32), value zero (§4.8).
    let answer = exchange(&lab, &connect_request("127.0.0.1:80"));
    assert_eq!(answer, [1, 2, 0x22, 0x63, 30, 1, 32, 0]);
    // So is the converter's own address.
    let answer = parse_answer(&exchange(&lab, &connect_request("10.0.3.1:80")));
    assert_eq!(answer.error().map(|e| e.0), Some(ErrorCode::NotAuthorized));
    // SMTP is outside the default acl.convert_ports: Not Authorized, and the server never sees a SYN
    // (nothing listens on 25 there, so an attempted connection would have been Connection Reset).
    let answer = parse_answer(&exchange(&lab, &connect_request("10.0.3.2:25")));
    assert_eq!(answer.error().map(|e| e.0), Some(ErrorCode::NotAuthorized));
    // Nothing listens on port 81: the server's RST is Connection Reset (96).
    let answer = parse_answer(&exchange(&lab, &connect_request("10.0.3.2:81")));
    assert_eq!(
        answer.error().map(|e| e.0),
        Some(ErrorCode::ConnectionReset)
    );
    // An unknown version: Unsupported Version listing version 1.
    let mut request = connect_request("10.0.3.2:80");
    request[0] = 9;
    let answer = parse_answer(&exchange(&lab, &request));
    assert_eq!(
        answer.error(),
        Some((ErrorCode::UnsupportedVersion, &[1u8][..]))
    );
    // Through a strict agent, curl sees the SOCKS5 failure of Not Authorized ("not allowed", 2).
    let strict = start_agent(
        &lab,
        &["--strict", "--socks", "127.0.0.1:1082"],
        "127.0.0.1:1082",
    );
    let out = lab.client(&[
        "curl",
        "-sS",
        "--socks5",
        "127.0.0.1:1082",
        "http://127.0.0.1:80/",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("(2)"), "{stderr}");
    drop(strict);
    // An optimistic agent (the default) has already said yes: the refusal resets the connection.
    let _agent = start_agent(&lab, &[], SOCKS);
    let out = lab.client(&["curl", "-sS", "--socks5", SOCKS, "http://127.0.0.1:80/"]);
    assert!(!out.status.success(), "a refused conversion must fail curl");
    let log = log_until(&lab, |l| l["url"] == "127.0.0.1:80");
    assert!(
        log.iter().any(|l| l["url"] == "127.0.0.1:80"
            && l["result"] == "TCP_DENIED"
            && l["method"] == "CONVERT"),
        "{log:?}"
    );
}

#[test]
fn clients_outside_the_acl_and_cookies_are_enforced() {
    let Some(lab) = Lab::new() else { return };
    let _proxy = start_converter(
        &lab,
        "[convert]\nrequire_cookie = true\n[acl]\nallow_clients = [\"10.0.2.0/24\", \"127.0.0.0/8\"]\n",
    );
    // Path 1's address is not allowed.
    let answer = exchange(&lab, &connect_request("10.0.3.2:80"));
    assert_eq!(answer, [1, 2, 0x22, 0x63, 30, 1, 32, 0]);
    // From path 2: Missing Cookie with a cookie, then the cookie opens the way.
    let from_path2 = |request: &[u8]| {
        let request = request.to_vec();
        lab.tb
            .in_ns(lab.tb.client_ns(), move || {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .expect("socket");
                socket
                    .bind(&addr("10.0.2.2:0").into())
                    .expect("bind to path 2");
                socket.connect(&addr(CONVERTER).into()).expect("connect");
                let mut stream: TcpStream = socket.into();
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                stream.write_all(&request).expect("send");
                let mut answer = vec![0u8; 4];
                stream.read_exact(&mut answer).expect("header");
                let mut rest = vec![0u8; usize::from(answer[1]) * 4 - 4];
                stream.read_exact(&mut rest).expect("TLVs");
                answer.extend_from_slice(&rest);
                answer
            })
            .expect("client namespace")
    };
    let answer = parse_answer(&from_path2(&connect_request("10.0.3.2:80")));
    assert_eq!(answer.error().map(|e| e.0), Some(ErrorCode::MissingCookie));
    let Some(TlvRepr::Cookie { opaque }) = answer.find(tlv_type::COOKIE) else {
        panic!("no cookie: {answer:?}")
    };
    let mut request = MessageRepr::new(vec![
        TlvRepr::cookie(opaque),
        TlvRepr::connect(addr("10.0.3.2:80"), &[]),
    ])
    .to_bytes()
    .expect("emit");
    request.extend_from_slice(b"GET /small.txt HTTP/1.0\r\n\r\n");
    let answer = parse_answer(&from_path2(&request));
    assert!(answer.tlvs.is_empty(), "{answer:?}");
    // A forged cookie is Not Authorized.
    let forged = MessageRepr::new(vec![
        TlvRepr::cookie(&[0; 16]),
        TlvRepr::connect(addr("10.0.3.2:80"), &[]),
    ])
    .to_bytes()
    .expect("emit");
    let answer = parse_answer(&from_path2(&forged));
    assert_eq!(answer.error().map(|e| e.0), Some(ErrorCode::NotAuthorized));
}

#[test]
fn refusals_beyond_the_budget_are_closed_at_once() {
    let Some(lab) = Lab::new() else { return };
    let _proxy = start_converter(
        &lab,
        "[limits]\nmax_refusals = 2\n[acl]\nallow_clients = [\"10.0.2.0/24\", \"127.0.0.0/8\"]\n",
    );
    // From path 1, which the client ACL refuses: clients that never close hold their answers'
    // budget, so beyond two the converter closes at once without an Error TLV.
    let answers = lab
        .tb
        .in_ns(lab.tb.client_ns(), || {
            let mut held: Vec<TcpStream> = (0..30)
                .map(|_| TcpStream::connect(addr(CONVERTER)).expect("connect"))
                .collect();
            // Every stream stays open until all are read: a stream closed after its answer would give
            // its budget back to connections the converter has not accepted yet (seen under load: 17
            // of 30 answered while the accept loop lagged behind this reader).
            held.iter_mut()
                .map(|stream| {
                    stream
                        .set_read_timeout(Some(Duration::from_secs(10)))
                        .expect("timeout");
                    let mut answer = Vec::new();
                    let _ = stream.read_to_end(&mut answer);
                    answer
                })
                .collect::<Vec<_>>()
        })
        .expect("client namespace");
    let answered = answers.iter().filter(|a| !a.is_empty()).count();
    assert!(
        (2..=8).contains(&answered),
        "{answered} of 30 refusals answered with a budget of 2"
    );
    for answer in answers.iter().filter(|a| !a.is_empty()) {
        assert_eq!(answer, &[1, 2, 0x22, 0x63, 30, 1, 32, 0]);
    }
}

#[test]
fn malformed_messages_from_the_fuzz_corpus_get_errors_and_never_crash_the_converter() {
    let Some(lab) = Lab::new() else { return };
    let mut proxy = start_converter(&lab, "");
    let corpus =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/convert_message");
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .expect("corpus")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let client = "10.0.1.2".parse().expect("literal");
    let mut answered = 0;
    for file in &files {
        let data = std::fs::read(file).expect("read");
        // Valid Connect requests would open connections to arbitrary addresses: not here.
        if matches!(
            decide(&data, client, &Policy { cookies: None }),
            Decision::Connect(_)
        ) {
            continue;
        }
        let answer = parse_answer(&exchange(&lab, &data));
        let informative =
            answer.error().is_some() || answer.find(tlv_type::SUPPORTED_TCP_EXTENSIONS).is_some();
        assert!(informative, "{}: answered {answer:?}", file.display());
        answered += 1;
    }
    assert!(
        answered >= 15,
        "only {answered} malformed inputs in the corpus"
    );
    assert!(
        proxy.child_mut().try_wait().expect("wait").is_none(),
        "the proxy exited"
    );
    // And it still converts.
    let mut request = connect_request("10.0.3.2:80");
    request.extend_from_slice(b"GET /small.txt HTTP/1.0\r\n\r\n");
    let answer = exchange(&lab, &request);
    assert_eq!(&answer[..4], [1, 1, 0x22, 0x63]);
    assert!(
        String::from_utf8_lossy(&answer).ends_with("hello through mptcp-proxy\n"),
        "{answer:?}"
    );
}

/// tshark's view of one TCP segment.
#[derive(Debug)]
struct Segment {
    time: f64,
    src: String,
    sport: u16,
    dport: u16,
    syn: bool,
    ack: bool,
    len: usize,
    payload: String,
}

fn segments(pcap: &std::path::Path) -> Vec<Segment> {
    let out = Command::new("tshark")
        .args([
            "-r",
            &pcap.display().to_string(),
            "-T",
            "fields",
            "-E",
            "separator=;",
        ])
        .args([
            "-e",
            "frame.time_epoch",
            "-e",
            "ip.src",
            "-e",
            "tcp.srcport",
        ])
        .args([
            "-e",
            "tcp.dstport",
            "-e",
            "tcp.flags.syn",
            "-e",
            "tcp.flags.ack",
        ])
        .args(["-e", "tcp.len", "-e", "tcp.payload"])
        .output()
        .expect("tshark");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flag = |f: &str| f == "1" || f == "True";
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(';').collect();
            Some(Segment {
                time: f.first()?.parse().ok()?,
                src: f.get(1)?.to_string(),
                sport: f.get(2)?.parse().ok()?,
                dport: f.get(3)?.parse().ok()?,
                syn: flag(f.get(4)?),
                ack: flag(f.get(5)?),
                len: f.get(6)?.parse().ok()?,
                payload: f.get(7).map(|p| p.replace(':', "")).unwrap_or_default(),
            })
        })
        .collect()
}

#[test]
fn with_a_cached_tfo_cookie_the_connect_tlv_rides_in_the_syn_and_the_upstream_syn_beats_the_ack() {
    let Some(lab) = Lab::new() else { return };
    let _proxy = start_converter(&lab, "");
    let _agent = start_agent(&lab, &[], SOCKS);
    // 20 ms on the converter's SYN+ACK towards the client: the client's third ACK arrives 20 ms
    // after its SYN, which makes "before the third ACK" observable.
    let _delay = lab
        .tb
        .delay(
            Host::Proxy,
            "p1",
            Direction::Egress,
            DelayConfig {
                delay: Duration::from_millis(20),
                ..Default::default()
            },
        )
        .expect("delay line");
    let pcap = lab.path("tfo.pcap");
    let mut capture = lab
        .tb
        .spawn(
            lab.tb.proxy_ns(),
            &[
                "tcpdump",
                "-i",
                "any",
                "-n",
                "-s",
                "256",
                "-U",
                "--immediate-mode",
                "--time-stamp-precision=nano",
                "-w",
                &pcap.display().to_string(),
                "tcp port 5124 or (host 10.0.3.2 and tcp port 80)",
            ],
        )
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(1000));
    // The first connection fetches the converter's TFO cookie; the second uses it.
    for _ in 0..2 {
        let out = lab.client(&[
            "curl",
            "-sS",
            "--fail",
            "--socks5",
            SOCKS,
            "http://10.0.3.2/small.txt",
        ]);
        curl_ok(&out);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello through mptcp-proxy\n"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    capture.signal(libc::SIGINT).expect("stop tcpdump");
    capture
        .wait_timeout(Duration::from_secs(10))
        .expect("tcpdump exits");
    let segments = segments(&pcap);
    let syns: Vec<&Segment> = segments
        .iter()
        .filter(|s| s.syn && !s.ack && s.dport == 5124 && s.src == "10.0.1.2")
        .collect();
    assert_eq!(syns.len(), 2, "two client SYNs: {segments:?}");
    assert_eq!(
        syns[0].len, 0,
        "no cookie yet: the first SYN only asks for one"
    );
    let syn = syns[1];
    assert!(syn.len >= 24, "the second SYN carries data: {syn:?}");
    // The SYN's data is the Convert message: header (Version 1, 6 words, Magic) and Connect TLV
    // (Type 10, 5 words, port 80, ::ffff:10.0.3.2).
    let expected = "01062263".to_owned() + "0a050050" + "00000000000000000000ffff0a000302";
    assert!(syn.payload.starts_with(&expected), "{}", syn.payload);
    // ... followed by curl's request: the agent's optimistic SOCKS5 reply let it ride in the SYN.
    let request: String = b"GET /small.txt"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(syn.payload[48..].starts_with(&request), "{}", syn.payload);
    // ... followed by curl's request: the agent's optimistic SOCKS5 reply let it ride in the SYN.
    let request: String = b"GET /small.txt"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(syn.payload[48..].starts_with(&request), "{}", syn.payload);
    let third_ack = segments
        .iter()
        .find(|s| s.sport == syn.sport && s.dport == 5124 && s.ack && !s.syn && s.time > syn.time)
        .expect("the client's third ACK");
    let upstream_syn = segments
        .iter()
        .find(|s| s.syn && !s.ack && s.dport == 80 && s.src == "10.0.3.1" && s.time > syn.time)
        .expect("the converter's SYN to the server");
    assert!(
        upstream_syn.time < third_ack.time,
        "upstream SYN {:.6} must leave before the client's third ACK {:.6} (client SYN {:.6})",
        upstream_syn.time,
        third_ack.time,
        syn.time
    );
}

#[test]
fn transparent_mode_behind_nftables_redirect() {
    let Some(lab) = Lab::new() else { return };
    let _proxy = start_converter(&lab, "");
    lab.tb
        .exec(
            lab.tb.client_ns(),
            &[
                "nft",
                "add table ip convert; \
                 add chain ip convert out { type nat hook output priority -100; }; \
                 add rule ip convert out ip daddr 10.0.3.2 tcp dport 80 redirect to :1081",
            ],
        )
        .expect("nft redirect");
    let _agent = start_agent(&lab, &["--transparent", "0.0.0.0:1081"], "127.0.0.1:1081");
    let out = lab.client(&["curl", "-sS", "--fail", "http://10.0.3.2/small.txt"]);
    curl_ok(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello through mptcp-proxy\n"
    );
    let log = log_until(&lab, |l| l["url"] == "10.0.3.2:80");
    let line = log.last().expect("an access log line");
    assert_eq!(line["method"], "CONVERT", "{line}");
    assert_eq!(line["url"], "10.0.3.2:80", "{line}");
    assert_eq!(line["transport"], "mptcp", "{line}");
}
