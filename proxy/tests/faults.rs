//! Faults in the netns testbed (issue 12): no byte lost or silently truncated, and the proxy stays
//! bounded and serving. Each test builds its own lab; they run in parallel.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use testbed::Options;

const PROXY: &str = "10.0.1.1:3128";

fn proxy_addr() -> SocketAddr {
    PROXY.parse().expect("literal")
}

/// Closes with RST instead of FIN.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// An origin in the server namespace that runs `serve` on a thread per connection.
fn origin(lab: &Lab, addr: &str, serve: fn(TcpStream)) {
    let listener = lab
        .tb
        .in_ns(lab.tb.server_ns(), || TcpListener::bind(addr))
        .expect("ns")
        .expect("bind origin");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve(stream));
        }
    });
}

fn proc_field(pid: u32, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Raises this process's open-file limit to the hard limit (the proxy inherits it).
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[test]
fn an_upstream_reset_mid_body_is_never_a_clean_short_answer() {
    let Some(lab) = Lab::new() else { return };
    origin(&lab, "10.0.3.2:8082", |stream| {
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let head = read_head(&mut reader);
        let mut stream = stream;
        let part = vec![b'x'; 100_000];
        let framing = if head[0].contains("/length") {
            "HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n".to_owned()
        } else if head[0].contains("/chunked") {
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
                part.len()
            )
        } else {
            // Delimited by the close: only a FIN would end it cleanly.
            "HTTP/1.0 200 OK\r\n\r\n".to_owned()
        };
        let _ = stream.write_all(framing.as_bytes());
        let _ = stream.write_all(&part);
        std::thread::sleep(Duration::from_millis(200));
        reset(stream);
    });
    let config = lab.config("proxy.toml", "[acl]\nconnect_ports = [443]\n");
    let _proxy = lab.start_proxy(
        &["--config", &config.display().to_string(), "--listen", PROXY],
        proxy_addr(),
    );
    for path in ["length", "chunked", "close"] {
        let out = lab.client(&[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            "-x",
            "http://10.0.1.1:3128",
            &format!("http://10.0.3.2:8082/{path}"),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success(),
            "/{path}: curl saw a clean end ({stdout}) although the server reset mid-body"
        );
        eprintln!(
            "/{path}: curl {:?}, {stdout}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

#[test]
fn a_client_reset_mid_upload_reaches_the_upstream() {
    let Some(lab) = Lab::new() else { return };
    let (tx, rx) = std::sync::mpsc::channel::<(usize, bool, Duration)>();
    let listener = lab
        .tb
        .in_ns(lab.tb.server_ns(), || TcpListener::bind("10.0.3.2:8083"))
        .expect("ns")
        .expect("bind");
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut reader = BufReader::new(stream);
        read_head(&mut reader);
        let mut received = 0usize;
        let mut buffer = vec![0u8; 65536];
        let mut last = Instant::now();
        // Reads until the connection ends: EOF or an error both tell the server the upload is over.
        let complete = loop {
            match reader.read(&mut buffer) {
                Ok(0) | Err(_) => break false,
                Ok(n) => {
                    received += n;
                    last = Instant::now();
                    if received >= 10_000_000 {
                        break true;
                    }
                }
            }
        };
        let _ = tx.send((received, complete, last.elapsed()));
    });
    let config = lab.config("proxy.toml", "[access_log]\npath = \"off\"\n");
    let _proxy = lab.start_proxy(
        &["--config", &config.display().to_string(), "--listen", PROXY],
        proxy_addr(),
    );
    let mut client = client_connect(&lab.tb, proxy_addr(), true);
    client
        .write_all(
            b"POST http://10.0.3.2:8083/upload HTTP/1.1\r\nHost: 10.0.3.2:8083\r\nContent-Length: 10000000\r\n\r\n",
        )
        .expect("head");
    client.write_all(&vec![7u8; 1_000_000]).expect("first MB");
    std::thread::sleep(Duration::from_millis(300));
    reset(client);
    let (received, complete, after) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the upstream must see the upload end within 10 s, not wait for a timeout");
    assert!(!complete, "the upstream got the whole body");
    assert!(received <= 1_000_000, "{received} bytes");
    assert!(
        after < Duration::from_secs(5),
        "the end came {after:?} after the last bytes"
    );
}

#[test]
fn a_path_going_down_mid_transfer_leaves_the_download_intact() {
    let Some(lab) = Lab::with_options(Options {
        path_rate_mbit: [Some(100), Some(100)],
        ..Options::default()
    }) else {
        return;
    };
    let config = lab.config("proxy.toml", "[access_log]\npath = \"off\"\n");
    let _proxy = lab.start_proxy(
        &["--config", &config.display().to_string(), "--listen", PROXY],
        proxy_addr(),
    );
    let output = lab.path("big.out");
    let mut curl = lab
        .tb
        .command(lab.tb.client_ns(), "mptcpize")
        .args(["run", "curl", "-sS", "--fail", "--max-time", "90", "-x"])
        .arg("http://10.0.1.1:3128")
        .arg("-o")
        .arg(&output)
        .arg("http://10.0.3.2/big.bin")
        .stderr(Stdio::piped())
        .spawn()
        .expect("curl");
    // Once data flows on both paths, path 1 (the initial subflow's) goes black: every packet dropped.
    std::thread::sleep(Duration::from_millis(1500));
    lab.tb
        .exec(
            lab.tb.client_ns(),
            &[
                "nft",
                "add table inet pathdown; add chain inet pathdown in { type filter hook input priority 0; }; \
                 add chain inet pathdown out { type filter hook output priority 0; }; \
                 add rule inet pathdown in iifname \"c1\" drop; add rule inet pathdown out oifname \"c1\" drop",
            ],
        )
        .expect("nft");
    let status = curl.wait().expect("curl");
    let mut stderr = String::new();
    let _ = curl
        .stderr
        .take()
        .map(|mut e| e.read_to_string(&mut stderr));
    assert!(status.success(), "curl failed: {status} {stderr}");
    assert_eq!(file_sha(&output), lab.big_sha, "download corrupted");
}

#[test]
fn sigterm_during_ten_transfers_lets_all_of_them_finish() {
    let Some(lab) = Lab::with_options(Options {
        path_rate_mbit: [Some(200), Some(200)],
        ..Options::default()
    }) else {
        return;
    };
    let config = lab.config(
        "proxy.toml",
        "[access_log]\npath = \"off\"\n[acl]\nconnect_ports = [80, 443]\n[limits]\ndrain_timeout = \"30s\"\n",
    );
    let mut proxy = lab.start_proxy(
        &["--config", &config.display().to_string(), "--listen", PROXY],
        proxy_addr(),
    );
    let range = 8usize << 20;
    let expected = sha256_hex(&pseudo_random(range, BIG_SEED));
    let last = format!("0-{}", range - 1);
    let transfers: Vec<_> = (0..10)
        .map(|i| {
            let output = lab.path(&format!("part{i}.out"));
            let mut cmd = lab.tb.command(lab.tb.client_ns(), "mptcpize");
            cmd.args([
                "run",
                "curl",
                "-sS",
                "--fail",
                "--max-time",
                "60",
                "-r",
                &last,
            ])
            .args(["-x", "http://10.0.1.1:3128", "-o"])
            .arg(&output);
            if i % 2 == 1 {
                cmd.arg("-p");
            }
            cmd.arg("http://10.0.3.2/big.bin").stderr(Stdio::piped());
            (output, cmd.spawn().expect("curl"))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let signalled = Instant::now();
    proxy.signal(libc::SIGTERM).expect("SIGTERM");
    for (i, (output, mut curl)) in transfers.into_iter().enumerate() {
        let status = curl.wait().expect("curl");
        let mut stderr = String::new();
        let _ = curl
            .stderr
            .take()
            .map(|mut e| e.read_to_string(&mut stderr));
        assert!(status.success(), "transfer {i}: {status} {stderr}");
        assert_eq!(file_sha(&output), expected, "transfer {i} corrupted");
    }
    let exit = proxy
        .wait_timeout(Duration::from_secs(35))
        .expect("the proxy exits within drain_timeout");
    assert!(exit.success(), "{exit}");
    assert!(signalled.elapsed() < Duration::from_secs(32));
}

#[test]
fn five_thousand_slowloris_connections_do_not_stop_normal_clients() {
    let Some(lab) = Lab::new() else { return };
    raise_nofile();
    // Twenty client addresses, 250 connections each: under the per-client limit (256), as many
    // subscribers would be.
    for i in 10..30 {
        lab.tb
            .exec(
                lab.tb.client_ns(),
                &["ip", "addr", "add", &format!("10.0.1.{i}/24"), "dev", "c1"],
            )
            .expect("address");
    }
    let config = lab.config("proxy.toml", "[access_log]\npath = \"off\"\n");
    let proxy = lab.start_proxy(
        &["--config", &config.display().to_string(), "--listen", PROXY],
        proxy_addr(),
    );
    let held: Vec<TcpStream> = lab
        .tb
        .in_ns(lab.tb.client_ns(), || {
            (0..5000)
                .map(|n| {
                    let socket =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                            .expect("socket");
                    let source: SocketAddr =
                        format!("10.0.1.{}:0", 10 + n % 20).parse().expect("source");
                    socket.bind(&source.into()).expect("bind");
                    socket.connect(&proxy_addr().into()).expect("connect");
                    let mut stream = TcpStream::from(socket);
                    let _ = stream.write_all(b"GET http://10.0.3.2/small.txt HTTP/1.1\r\nX-Slow: ");
                    stream
                })
                .collect()
        })
        .expect("ns");
    std::thread::sleep(Duration::from_millis(500));
    let fds = open_fds(proxy.pid());
    assert!(
        fds >= 5000,
        "the proxy holds the slow connections ({fds} fds)"
    );
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let out = lab.client(&[
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "5",
            "--interface",
            "10.0.2.2",
            "-x",
            "http://10.0.1.1:3128",
            "http://10.0.3.2/small.txt",
        ]);
        curl_ok(&out);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello through mptcp-proxy\n"
        );
        slowest = slowest.max(started.elapsed());
    }
    eprintln!("slowest of 20 requests beside 5000 slowloris connections: {slowest:?}");
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
    drop(held);
}

#[test]
fn a_connect_flood_from_outside_the_acl_keeps_fds_and_memory_bounded() {
    let Some(lab) = Lab::new() else { return };
    raise_nofile();
    // Path 1's address (10.0.1.2) is outside the client ACL; path 2's is inside.
    let config = lab.config(
        "proxy.toml",
        "[access_log]\npath = \"off\"\n[acl]\nallow_clients = [\"10.0.2.0/24\"]\n[limits]\nmax_refusals = 256\n",
    );
    let proxy = lab.start_proxy(
        &[
            "--config",
            &config.display().to_string(),
            "--listen",
            PROXY,
            "--listen",
            "10.0.2.1:3128",
        ],
        proxy_addr(),
    );
    let pid = proxy.pid();
    let base_fds = open_fds(pid);
    let base_rss = proc_field(pid, "status", "VmRSS:");
    let mut peak_fds = 0;
    let mut peak_rss = 0;
    let mut held = Vec::new();
    let started = Instant::now();
    // 5000 connections that never read their answer, in bursts, sampling the proxy as they come.
    for _ in 0..10 {
        let burst: Vec<TcpStream> = lab
            .tb
            .in_ns(lab.tb.client_ns(), || {
                (0..500)
                    .filter_map(|_| TcpStream::connect(proxy_addr()).ok())
                    .collect()
            })
            .expect("ns");
        held.extend(burst);
        peak_fds = peak_fds.max(open_fds(pid));
        peak_rss = peak_rss.max(proc_field(pid, "status", "VmRSS:"));
    }
    std::thread::sleep(Duration::from_millis(300));
    peak_fds = peak_fds.max(open_fds(pid));
    peak_rss = peak_rss.max(proc_field(pid, "status", "VmRSS:"));
    eprintln!(
        "{} connections in {:?}: proxy fds {base_fds} -> peak {peak_fds}, RSS {base_rss} -> peak {peak_rss} kB",
        held.len(),
        started.elapsed()
    );
    assert!(
        held.len() >= 4000,
        "only {} connections were made",
        held.len()
    );
    assert!(
        peak_fds <= base_fds + 256 + 64,
        "fds grew from {base_fds} to {peak_fds} under a flood of refused connections"
    );
    assert!(
        peak_rss <= base_rss + 64 * 1024,
        "RSS grew from {base_rss} to {peak_rss} kB"
    );
    // An allowed client is still served during the flood.
    let out = lab.client(&[
        "curl",
        "-sS",
        "--fail",
        "--max-time",
        "5",
        "--interface",
        "10.0.2.2",
        "-x",
        "http://10.0.2.1:3128",
        "http://10.0.3.2/small.txt",
    ]);
    curl_ok(&out);
    drop(held);
    let metrics = lab
        .tb
        .exec(
            lab.tb.proxy_ns(),
            &["curl", "-s", "http://127.0.0.1:9464/metrics"],
        )
        .expect("metrics");
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("mptcp_proxy_refusals_dropped_total ")?
                .parse()
                .ok()
        })
        .unwrap_or(0.0);
    assert!(dropped > 1000.0, "refusals dropped: {dropped}");
}
