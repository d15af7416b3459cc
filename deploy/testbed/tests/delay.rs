//! The delay line in a testbed: round trips grow by the configured delay, loss is about right, and the
//! rules and queues are gone once the lines are dropped.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use testbed::{DelayConfig, DelayLine, Direction, Host, Options, Testbed, SERVER};

/// A UDP echo server in the server namespace; returns its address. It stops when its socket has been
/// idle for 30 s (the test is long over by then).
fn echo_server(tb: &Testbed) -> SocketAddr {
    let socket = tb
        .in_ns(tb.server_ns(), || UdpSocket::bind((SERVER, 0)))
        .unwrap()
        .unwrap();
    let addr = socket.local_addr().unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], peer);
        }
    });
    addr
}

/// Median round trip of `count` sequential UDP pings from the client namespace.
fn median_rtt(tb: &Testbed, server: SocketAddr, count: u32) -> Duration {
    let mut rtts = tb
        .in_ns(tb.client_ns(), || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.connect(server).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut rtts = Vec::new();
            let mut buf = [0u8; 8];
            for seq in 0..count {
                let start = Instant::now();
                socket.send(&seq.to_be_bytes()).unwrap();
                // Skip late answers to earlier pings.
                loop {
                    let n = socket.recv(&mut buf).expect("echo answer");
                    if buf[..n] == seq.to_be_bytes() {
                        break;
                    }
                }
                rtts.push(start.elapsed());
            }
            rtts
        })
        .unwrap();
    rtts.sort();
    rtts[rtts.len() / 2]
}

/// Tables in `ns` and the nfqueues bound there.
fn kernel_state(tb: &Testbed, ns: &str) -> (String, String) {
    let tables = tb.exec(ns, &["nft", "list", "tables"]).unwrap();
    let queues = tb
        .exec(ns, &["cat", "/proc/net/netfilter/nfnetlink_queue"])
        .unwrap();
    (tables, queues)
}

fn assert_added(with: Duration, base: Duration, added: Duration) {
    let extra = with.saturating_sub(base);
    // Never less than configured (allowing for noise in the baseline); a little more on a busy machine.
    assert!(
        extra + Duration::from_millis(1) >= added && extra <= added + Duration::from_millis(8),
        "median rtt {with:?} against {base:?}: added {extra:?}, configured {added:?}"
    );
}

#[test]
fn round_trips_grow_by_the_delay_and_dropping_removes_rules_and_queues() {
    if testbed::skip_unless_root() {
        return;
    }
    let tb = Testbed::new(Options::default()).unwrap();
    let server = echo_server(&tb);
    let base = median_rtt(&tb, server, 21);
    let prx = tb.proxy_ns().to_owned();

    let egress = DelayLine::start(
        Some(&prx),
        "p1",
        Direction::Egress,
        DelayConfig {
            delay: Duration::from_millis(20),
            ..Default::default()
        },
    )
    .unwrap();
    assert_added(median_rtt(&tb, server, 21), base, Duration::from_millis(20));

    // A second line in the same namespace takes another queue; the delays add up.
    let ingress = DelayLine::start(
        Some(&prx),
        "p1",
        Direction::Ingress,
        DelayConfig {
            delay: Duration::from_millis(10),
            jitter: Duration::from_millis(2),
            ..Default::default()
        },
    )
    .unwrap();
    assert_ne!(egress.queue(), ingress.queue());
    assert_added(median_rtt(&tb, server, 21), base, Duration::from_millis(30));
    let (tables, queues) = kernel_state(&tb, &prx);
    assert!(tables.contains(egress.table()), "{tables}");
    assert!(tables.contains(ingress.table()), "{tables}");
    assert_eq!(queues.lines().count(), 2, "{queues}");

    let stats = ingress.stats();
    assert!(stats.queued >= 21 && stats.lost == 0, "{stats:?}");
    let names = [egress.table().to_owned(), ingress.table().to_owned()];
    let egress_stats = egress.stop().unwrap();
    assert_eq!(
        egress_stats.queued, egress_stats.released,
        "{egress_stats:?}"
    );
    drop(ingress);
    let (tables, queues) = kernel_state(&tb, &prx);
    for name in &names {
        assert!(!tables.contains(name.as_str()), "{tables}");
    }
    assert!(queues.trim().is_empty(), "queues still bound: {queues}");
    let after = median_rtt(&tb, server, 11);
    assert!(
        after < base + Duration::from_millis(5),
        "{after:?} vs {base:?}"
    );
}

#[test]
fn loss_drops_about_the_configured_fraction_on_ingress() {
    if testbed::skip_unless_root() {
        return;
    }
    let tb = Testbed::new(Options::default()).unwrap();
    let receiver = tb
        .in_ns(tb.server_ns(), || UdpSocket::bind((SERVER, 0)))
        .unwrap()
        .unwrap();
    let server = receiver.local_addr().unwrap();
    // The line releases each 1 ms batch at once: with the default receive buffer a counter thread that is
    // not scheduled in time (loaded CI machine) lost 164 of 1600 released datagrams in the socket, which
    // looked like line loss. count_datagrams forces 8 MiB, which holds all 2000.
    let counter = testbed::count_datagrams(receiver).expect("receiver");
    let line = tb
        .delay(
            Host::Server,
            "s1",
            Direction::Ingress,
            DelayConfig {
                delay: Duration::from_millis(1),
                loss: 0.2,
                seed: 7,
                ..Default::default()
            },
        )
        .unwrap();
    const SENT: u32 = 2000;
    tb.in_ns(tb.client_ns(), || testbed::send_numbered(server, SENT))
        .unwrap()
        .expect("send");
    let received = counter.join().unwrap();
    let stats = line.stop().unwrap();
    // 20% of 2000 is 400, sigma 17.9: four sigma either way.
    let missing = u64::from(SENT - received);
    assert!(
        (328..=472).contains(&missing),
        "{received} received, {stats:?}"
    );
    // The line also sees the interface's own traffic (IPv6 neighbour discovery): a few more lost is fine.
    assert!(
        (missing..=missing + 3).contains(&stats.lost),
        "{received} received, {stats:?}"
    );
    assert_eq!(stats.queued, stats.released + stats.lost, "{stats:?}");
}

/// A testbed built by calling `testbed.sh` directly (to test its delay options); `down` on drop.
struct ScriptBed(String);

impl Drop for ScriptBed {
    fn drop(&mut self) {
        let _ = std::process::Command::new(testbed::script())
            .args(["down", &self.0])
            .status();
    }
}

/// Median time of a refused TCP connection (SYN, RST: one round trip) from `source` to `dest`.
fn connect_rtt(ns: &str, source: std::net::Ipv4Addr, dest: std::net::Ipv4Addr) -> Duration {
    let mut rtts = testbed::in_namespace(ns, || {
        (0..7)
            .map(|_| {
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .unwrap();
                socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
                let start = Instant::now();
                let refused = socket.connect(&SocketAddr::from((dest, 9)).into());
                assert!(refused.is_err(), "nothing listens on port 9");
                start.elapsed()
            })
            .collect::<Vec<_>>()
    })
    .unwrap();
    rtts.sort();
    rtts[3]
}

#[test]
fn testbed_script_delay_options_run_lines_until_down() {
    if testbed::skip_unless_root() {
        return;
    }
    let prefix = format!("mpx{}dl", std::process::id());
    let bed = ScriptBed(prefix.clone());
    let script = |args: &[&str]| {
        testbed::run(
            std::process::Command::new(testbed::script())
                .args(args)
                .env("TESTBED_DELAY", env!("CARGO_BIN_EXE_testbed-delay")),
        )
        .unwrap()
    };
    script(&["up", &prefix, "--delay1", "20"]);
    let log = script(&["delay", &prefix, "cli", "c2", "egress", "6ms"]);
    let log = String::from_utf8(log.stdout).unwrap();
    assert!(std::path::Path::new(log.trim()).exists(), "{log}");
    let cli = format!("{prefix}-cli");
    let path1 = connect_rtt(&cli, [10, 0, 1, 2].into(), [10, 0, 1, 1].into());
    let path2 = connect_rtt(&cli, [10, 0, 2, 2].into(), [10, 0, 2, 1].into());
    assert!(
        path1 >= Duration::from_millis(19) && path1 <= Duration::from_millis(28),
        "path 1: {path1:?}"
    );
    assert!(
        path2 >= Duration::from_millis(5) && path2 <= Duration::from_millis(14),
        "path 2: {path2:?}"
    );
    drop(bed);
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&prefix));
    assert!(!std::path::Path::new(log.trim()).exists(), "{log}");
}
