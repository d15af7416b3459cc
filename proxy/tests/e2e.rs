//! End-to-end tests in the netns testbed (issue 2, §4 a–f, plus IPv6 and transparent mode).
//!
//! Real peers: nginx is the legacy server, `mptcpize run curl` the MPTCP client. Each test builds its own
//! testbed, so they run in parallel.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use testbed::Options;

const PROXY: &str = "10.0.1.1:3128";

fn proxy_addr() -> SocketAddr {
    PROXY.parse().expect("literal")
}

/// A config that writes the JSON access log into the lab directory.
fn json_log_config(lab: &Lab, extra: &str) -> String {
    let path = lab.config(
        "proxy.toml",
        &format!(
            "[access_log]\npath = \"{}\"\nformat = \"json\"\n{extra}",
            lab.path("proxy-access.log").display()
        ),
    );
    path.display().to_string()
}

/// Both paths shaped to 200 Mbit/s, so a download needs both paths rather than one idle veth.
fn shaped() -> Options {
    Options {
        path_rate_mbit: [Some(200), Some(200)],
        ..Options::default()
    }
}

fn assert_two_paths_carried(lab: &Lab, before: (u64, u64)) {
    let joins = lab
        .tb
        .nstat(lab.tb.proxy_ns(), "MPTcpExtMPJoinSynRx")
        .expect("nstat");
    assert!(joins >= 1, "no MP_JOIN reached the proxy");
    let p1 = lab.proxy_tx("p1") - before.0;
    let p2 = lab.proxy_tx("p2") - before.1;
    let minimum = (BIG / 20) as u64;
    assert!(
        p1 > minimum && p2 > minimum,
        "both paths must carry data: p1 {p1} bytes, p2 {p2} bytes"
    );
}

fn download_through_proxy(tunnel: bool) {
    let Some(lab) = Lab::with_options(shaped()) else {
        return;
    };
    // The tunnel goes to port 80, outside the default CONNECT ports (443).
    let config = json_log_config(&lab, "[acl]\nconnect_ports = [80, 443]\n");
    let _proxy = lab.start_proxy(&["--config", &config, "--listen", PROXY], proxy_addr());
    let before = (lab.proxy_tx("p1"), lab.proxy_tx("p2"));
    let output = lab.path("big.out");
    let output_str = output.display().to_string();
    let mut argv = vec![
        "mptcpize",
        "run",
        "curl",
        "-sS",
        "--fail",
        "-x",
        "http://10.0.1.1:3128",
        "-o",
        &output_str,
    ];
    if tunnel {
        argv.push("-p");
    }
    argv.push("http://10.0.3.2/big.bin");
    curl_ok(&lab.client(&argv));
    assert_eq!(file_sha(&output), lab.big_sha, "download corrupted");
    assert_two_paths_carried(&lab, before);
    let log = lab.access_log_lines("proxy-access.log");
    let line = log.last().expect("an access log line");
    assert_eq!(line["transport"], "mptcp");
    assert!(line["subflows"].as_u64().unwrap_or(0) >= 2, "{line}");
    assert!(line["bytes"].as_u64().unwrap_or(0) >= BIG as u64, "{line}");
    if tunnel {
        assert_eq!(line["method"], "CONNECT");
        assert_eq!(line["result"], "TCP_TUNNEL");
        assert_eq!(line["url"], "10.0.3.2:80");
    } else {
        assert_eq!(line["method"], "GET");
        assert_eq!(line["status"], 200);
        assert_eq!(line["peer"], "10.0.3.2");
    }
}

#[test]
fn a_mptcp_download_uses_both_paths_and_arrives_intact() {
    download_through_proxy(false);
}

#[test]
fn b_connect_tunnel_download_uses_both_paths_and_arrives_intact() {
    download_through_proxy(true);
}

#[test]
fn c_plain_tcp_client_falls_back_and_ipv6_works() {
    let Some(lab) = Lab::new() else { return };
    let config = json_log_config(&lab, "");
    let _proxy = lab.start_proxy(
        &[
            "--config",
            &config,
            "--listen",
            PROXY,
            "--listen",
            "[fd00:1::1]:3128",
        ],
        proxy_addr(),
    );
    let out = lab.curl_via_proxy(false, &["http://10.0.3.2/small.txt"]);
    assert_eq!(out, "hello through mptcp-proxy\n");
    let out = lab.client(&[
        "mptcpize",
        "run",
        "curl",
        "-sS",
        "--fail",
        "-x",
        "http://[fd00:1::1]:3128",
        "http://[fd00:3::2]/small.txt",
    ]);
    curl_ok(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello through mptcp-proxy\n"
    );
    let log = lab.access_log_lines("proxy-access.log");
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0]["transport"], "fallback_tcp");
    assert_eq!(log[0]["subflows"], 1);
    assert_eq!(log[1]["transport"], "mptcp");
    assert_eq!(log[1]["client"], "fd00:1::2");
    assert_eq!(log[1]["peer"], "fd00:3::2");
}

fn request(lab: &Lab, proxy: SocketAddr, raw: &str) -> String {
    let mut stream = client_connect(&lab.tb, proxy, true);
    raw_exchange(&mut stream, raw.as_bytes())
}

#[test]
fn d_errors_have_their_status_and_the_proxy_keeps_serving() {
    let Some(lab) = Lab::new() else { return };
    // Port 1082 on the server silently drops SYNs: the connect times out (504).
    lab.tb
        .exec(lab.tb.server_ns(), &["nft", "add table inet blackhole"])
        .expect("nft");
    lab.tb
        .exec(
            lab.tb.server_ns(),
            &[
                "nft",
                "add chain inet blackhole in { type filter hook input priority 0; }",
            ],
        )
        .expect("nft");
    lab.tb
        .exec(
            lab.tb.server_ns(),
            &["nft", "add rule inet blackhole in tcp dport 1082 drop"],
        )
        .expect("nft");
    let credentials = lab.path("users.txt");
    std::fs::write(&credentials, "alice:wonderland\n").expect("credentials");
    let config = json_log_config(
        &lab,
        "[upstream]\nconnect_timeout = \"1s\"\n\
         [limits]\nmax_connections = 3\nheader_read_timeout = \"2s\"\n\
         [[listener]]\naddress = \"10.0.1.1:3128\"\n",
    );
    let _proxy = lab.start_proxy(&["--config", &config], proxy_addr());
    let auth_config = lab.config(
        "auth.toml",
        &format!(
            "[[listener]]\naddress = \"10.0.1.1:3129\"\n[metrics]\naddress = \"off\"\n[auth]\ncredentials_file = \"{}\"\n[access_log]\npath = \"off\"\n",
            credentials.display()
        ),
    );
    let auth_addr: SocketAddr = "10.0.1.1:3129".parse().expect("literal");
    let _auth_proxy = lab.start_proxy(&["--config", &auth_config.display().to_string()], auth_addr);
    let proxy = proxy_addr();

    // 400: not HTTP, origin-form (not a proxy request), ambiguous framing.
    for raw in [
        "GARBAGE\r\n\r\n",
        "GET /relative HTTP/1.1\r\nHost: 10.0.3.2\r\n\r\n",
        "POST http://10.0.3.2/ HTTP/1.1\r\nHost: 10.0.3.2\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
    ] {
        let response = request(&lab, proxy, raw);
        assert_eq!(status_of(&response), 400, "{raw:?} -> {response}");
    }
    // 431: a head larger than limits.max_header_bytes.
    let huge = format!(
        "GET http://10.0.3.2/ HTTP/1.1\r\nHost: 10.0.3.2\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    assert_eq!(status_of(&request(&lab, proxy, &huge)), 431);
    // 403: loopback, cloud metadata, and the proxy itself.
    for target in [
        "http://127.0.0.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.1.1:3128/",
    ] {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let response = request(&lab, proxy, &raw);
        assert_eq!(status_of(&response), 403, "{target} -> {response}");
    }
    // 502 with a one-line reason: nothing listens on port 1081 (a Safe_port; 81 would be 403).
    let response = request(
        &lab,
        proxy,
        "GET http://10.0.3.2:1081/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&response), 502, "{response}");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    assert_eq!(body.lines().count(), 1, "{body:?}");
    assert!(body.contains("10.0.3.2:1081"), "{body:?}");
    // 504: the SYN is dropped.
    let started = Instant::now();
    let response = request(
        &lab,
        proxy,
        "GET http://10.0.3.2:1082/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&response), 504, "{response}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // 407 without credentials, 200 with them.
    let response = request(
        &lab,
        auth_addr,
        "GET http://10.0.3.2/small.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&response), 407, "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("proxy-authenticate: basic realm="),
        "{response}"
    );
    let out = lab.client(&[
        "curl",
        "-sS",
        "--fail",
        "-x",
        "http://10.0.1.1:3129",
        "-U",
        "alice:wonderland",
        "http://10.0.3.2/small.txt",
    ]);
    curl_ok(&out);
    // Slowloris: a head that never finishes is cut off after header_read_timeout.
    let mut slow = client_connect(&lab.tb, proxy, true);
    slow.write_all(b"GET http://10.0.3.2/ HTTP/1.1\r\nX-Slow: ")
        .expect("partial head");
    let started = Instant::now();
    let mut sink = Vec::new();
    let _ = slow.read_to_end(&mut sink);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a partial head held the connection for {:?}",
        started.elapsed()
    );
    // 503 over max_connections (3): hold three connections, the fourth is refused.
    let held: Vec<_> = (0..3)
        .map(|_| client_connect(&lab.tb, proxy, true))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let response = request(
        &lab,
        proxy,
        "GET http://10.0.3.2/small.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of(&response), 503, "{response}");
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    // And the proxy still serves.
    let out = lab.curl_via_proxy(true, &["http://10.0.3.2/small.txt"]);
    assert_eq!(out, "hello through mptcp-proxy\n");
}

#[test]
fn e_sigterm_lets_a_running_transfer_finish_intact() {
    let Some(lab) = Lab::new() else { return };
    let config = json_log_config(&lab, "");
    let mut proxy = lab.start_proxy(&["--config", &config, "--listen", PROXY], proxy_addr());
    let mut stream = client_connect(&lab.tb, proxy_addr(), true);
    stream
        .write_all(
            b"GET http://10.0.3.2/big.bin HTTP/1.1\r\nHost: 10.0.3.2\r\nConnection: close\r\n\r\n",
        )
        .expect("request");
    let mut received = vec![0u8; 1 << 20];
    stream.read_exact(&mut received).expect("first MiB");
    proxy.signal(libc::SIGTERM).expect("SIGTERM");
    // New connections are refused once the proxy stops accepting.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let refused = lab
            .tb
            .in_ns(lab.tb.client_ns(), || {
                std::net::TcpStream::connect(proxy_addr()).is_err()
            })
            .expect("ns");
        if refused {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy kept accepting after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    stream
        .read_to_end(&mut received)
        .expect("rest of the transfer");
    let split = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head");
    assert_eq!(
        sha256_hex(&received[split + 4..]),
        lab.big_sha,
        "transfer corrupted"
    );
    let status = proxy
        .wait_timeout(Duration::from_secs(15))
        .expect("proxy exits");
    assert!(status.success(), "proxy exited with {status}");
}

#[test]
fn f_upload_of_16_mib_arrives_intact() {
    let Some(lab) = Lab::new() else { return };
    let sink = start_upload_sink(&lab.tb, "10.0.3.2:8080".parse().expect("literal"));
    let config = json_log_config(&lab, "");
    let _proxy = lab.start_proxy(&["--config", &config, "--listen", PROXY], proxy_addr());
    let upload = pseudo_random(16 << 20, 42);
    let upload_path = lab.path("upload.bin");
    std::fs::write(&upload_path, &upload).expect("write upload");
    let data = format!("@{}", upload_path.display());
    let url = format!("http://{sink}/upload");
    let out = lab.curl_via_proxy(
        true,
        &[
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &data,
            &url,
        ],
    );
    assert_eq!(out, sha256_hex(&upload));
    let log = lab.access_log_lines("proxy-access.log");
    assert_eq!(log.last().expect("log line")["method"], "POST");
}

#[test]
fn transparent_redirect_of_an_mptcp_client_reaches_the_original_destination() {
    let Some(lab) = Lab::new() else { return };
    let config = lab.config(
        "transparent.toml",
        &format!(
            "[[listener]]\naddress = \"0.0.0.0:3129\"\nmode = \"transparent\"\n\
             [access_log]\npath = \"{}\"\nformat = \"json\"\n",
            lab.path("proxy-access.log").display()
        ),
    );
    lab.tb
        .exec(
            lab.tb.proxy_ns(),
            &[
                "nft",
                "add table ip intercept; \
                 add chain ip intercept pre { type nat hook prerouting priority dstnat; }; \
                 add rule ip intercept pre iifname { \"p1\", \"p2\" } tcp dport 80 redirect to :3129",
            ],
        )
        .expect("nft redirect");
    let _proxy = lab.start_proxy(
        &["--config", &config.display().to_string()],
        "10.0.1.1:3129".parse().expect("literal"),
    );
    let output = lab.path("big.out");
    let out = lab.client(&[
        "mptcpize",
        "run",
        "curl",
        "-sS",
        "--fail",
        "-o",
        &output.display().to_string(),
        "http://10.0.3.2/big.bin",
    ]);
    curl_ok(&out);
    assert_eq!(file_sha(&output), lab.big_sha);
    let log = lab.access_log_lines("proxy-access.log");
    let line = log.last().expect("log line");
    assert_eq!(line["url"], "10.0.3.2:80", "{line}");
    assert_eq!(line["transport"], "mptcp", "{line}");
    assert!(line["bytes"].as_u64().unwrap_or(0) >= BIG as u64, "{line}");
}

#[test]
fn no_arguments_serves_on_0_0_0_0_port_3128() {
    let Some(lab) = Lab::new() else { return };
    let _proxy = lab.start_proxy(&[], proxy_addr());
    let out = lab.curl_via_proxy(true, &["http://10.0.3.2/small.txt"]);
    assert_eq!(out, "hello through mptcp-proxy\n");
    // Also on path 2's address: the wildcard listener covers every interface.
    let out = lab.client(&[
        "curl",
        "-sS",
        "--fail",
        "-x",
        "http://10.0.2.1:3128",
        "http://10.0.3.2/small.txt",
    ]);
    curl_ok(&out);
}

#[test]
fn http_details_keep_alive_http10_chunked_via_and_upstream_mptcp() {
    let Some(lab) = Lab::new() else { return };
    let sink = start_upload_sink(&lab.tb, "10.0.3.2:8080".parse().expect("literal"));
    let config = json_log_config(&lab, "[upstream]\nmptcp = true\n");
    let _proxy = lab.start_proxy(&["--config", &config, "--listen", PROXY], proxy_addr());
    let proxy = "http://10.0.1.1:3128";
    // HTTP/1.0 client; Via added to the response.
    let out = lab.client(&[
        "curl",
        "-sS",
        "--fail",
        "-i",
        "--http1.0",
        "-x",
        proxy,
        "http://10.0.3.2/small.txt",
    ]);
    curl_ok(&out);
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.starts_with("http/1."), "{text}");
    assert!(text.contains("via: 1.1 mptcp-proxy"), "{text}");
    assert!(text.ends_with("hello through mptcp-proxy\n"), "{text}");
    // Two requests on one client connection (keep-alive).
    let out = lab.client(&[
        "mptcpize",
        "run",
        "curl",
        "-sS",
        "--fail",
        "-x",
        proxy,
        "http://10.0.3.2/small.txt",
        "http://10.0.3.2/small.txt",
    ]);
    curl_ok(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("hello")
            .count(),
        2
    );
    let metrics = lab
        .tb
        .exec(
            lab.tb.proxy_ns(),
            &["curl", "-s", "http://127.0.0.1:9464/metrics"],
        )
        .expect("metrics");
    let accepted = |transport: &str| -> f64 {
        let series = format!("mptcp_proxy_client_connections_total{{transport=\"{transport}\",outcome=\"accepted\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(
        accepted("mptcp"),
        1.0,
        "two requests must share one MPTCP client connection"
    );
    // A chunked upload arrives intact, re-framed by the proxy.
    let upload = pseudo_random(3 << 20, 99);
    let upload_path = lab.path("chunked.bin");
    std::fs::write(&upload_path, &upload).expect("write");
    let out = lab.client(&[
        "mptcpize",
        "run",
        "curl",
        "-sS",
        "--fail",
        "-x",
        proxy,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", upload_path.display()),
        &format!("http://{sink}/chunked"),
    ]);
    curl_ok(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout), sha256_hex(&upload));
    // upstream.mptcp = true: the proxy's connections to servers start as MPTCP (and fall back, nginx
    // speaks TCP).
    let syns = lab
        .tb
        .nstat(lab.tb.proxy_ns(), "MPTcpExtMPCapableSYNTX")
        .expect("nstat");
    assert!(
        syns >= 3,
        "upstream connections did not try MPTCP ({syns} MP_CAPABLE SYNs sent)"
    );
}

#[test]
fn without_kernel_mptcp_the_proxy_warns_once_and_serves_tcp() {
    let Some(lab) = Lab::new() else { return };
    lab.tb
        .exec(lab.tb.proxy_ns(), &["sysctl", "-qw", "net.mptcp.enabled=0"])
        .expect("sysctl");
    let stderr_path = lab.path("proxy.stderr");
    let config = json_log_config(&lab, "");
    let mut cmd = lab
        .tb
        .command(lab.tb.proxy_ns(), env!("CARGO_BIN_EXE_mptcp-proxy"));
    cmd.args([
        "--config",
        &config,
        "--listen",
        PROXY,
        "--listen",
        "10.0.2.1:3128",
    ])
    .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));
    let _proxy = testbed::Background::start(cmd).expect("start");
    lab.tb
        .wait_for_tcp(lab.tb.proxy_ns(), proxy_addr(), Duration::from_secs(20))
        .expect("listening");
    lab.curl_via_proxy(true, &["http://10.0.3.2/small.txt"]);
    let stderr = std::fs::read_to_string(&stderr_path).expect("stderr");
    assert_eq!(
        stderr.matches("the kernel has no MPTCP").count(),
        1,
        "{stderr}"
    );
    let log = lab.access_log_lines("proxy-access.log");
    assert_eq!(log.last().expect("log line")["transport"], "tcp");
}
