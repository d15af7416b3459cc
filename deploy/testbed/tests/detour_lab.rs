//! The detour lab (`detour.sh`, the thesis's Fig. 5.1) does what its options say: `--delay2` adds its
//! delay each way on link 2 only (the detour path does not cross it), `--loss2` drops about its share on
//! link 2, and teardown removes the namespaces.

use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use testbed::detour::{DetourHost, DetourLab, DetourOptions, DETOUR, SERVER};

/// Median time of a refused TCP connection (SYN, RST: one round trip) from the client to `dest`.
fn connect_rtt(lab: &DetourLab, dest: Ipv4Addr) -> Duration {
    let target = SocketAddr::from((dest, 9));
    let mut rtts: Vec<Duration> = lab
        .in_ns(DetourHost::Client, || {
            (0..5)
                .map(|_| {
                    let start = Instant::now();
                    let refused = TcpStream::connect_timeout(&target, Duration::from_secs(2));
                    assert!(refused.is_err(), "nothing listens on port 9");
                    start.elapsed()
                })
                .collect()
        })
        .unwrap();
    rtts.sort();
    rtts[2]
}

fn netns_list() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn delay2_slows_link_2_only_and_teardown_removes_the_lab() {
    if testbed::skip_unless_root() {
        return;
    }
    let lab = DetourLab::new(DetourOptions {
        delay2_ms: Some(100),
        ..Default::default()
    })
    .unwrap();
    let prefix = lab.prefix().to_owned();
    let direct = connect_rtt(&lab, SERVER);
    let detour = connect_rtt(&lab, DETOUR);
    eprintln!("round trips: server {direct:?}, detour {detour:?}");
    assert!(
        direct >= Duration::from_millis(199) && direct <= Duration::from_millis(240),
        "client-server round trip over link 2: {direct:?}"
    );
    assert!(
        detour <= Duration::from_millis(30),
        "client-detour round trip (links 1, 4, 6): {detour:?}"
    );
    drop(lab);
    assert!(!netns_list().contains(&prefix), "{}", netns_list());
}

#[test]
fn loss2_drops_about_its_share_on_link_2() {
    if testbed::skip_unless_root() {
        return;
    }
    let lab = DetourLab::new(DetourOptions {
        loss2_percent: Some(5.0),
        ..Default::default()
    })
    .unwrap();
    let receiver = lab
        .in_ns(DetourHost::Server, || UdpSocket::bind((SERVER, 0)))
        .unwrap()
        .unwrap();
    let server = receiver.local_addr().unwrap();
    // A full socket buffer must not look like loss on link 2: count_datagrams forces a large one.
    let counter = testbed::count_datagrams(receiver).expect("receiver");
    const SENT: u32 = 4000;
    lab.in_ns(DetourHost::Client, || testbed::send_numbered(server, SENT))
        .unwrap()
        .expect("send");
    let missing = SENT - counter.join().unwrap();
    // The drop rule for packets leaving r1 over link 2 counted them.
    let rules = lab
        .exec(
            DetourHost::R1,
            &["nft", "list", "table", "inet", "testbed_loss"],
        )
        .unwrap();
    let dropped: u32 = rules
        .lines()
        .find(|l| l.contains("oifname \"l2\""))
        .and_then(|l| {
            l.split("packets ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{rules}"));
    eprintln!("{missing} of {SENT} lost, {dropped} dropped by the rule");
    // 5% of 4000 is 200, sigma 13.8: four sigma either way.
    assert!((145..=255).contains(&missing), "{missing} of {SENT} lost");
    assert_eq!(missing, dropped, "{rules}");
}
