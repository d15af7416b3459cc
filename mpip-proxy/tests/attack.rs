//! Attacks on MPIP in network namespaces, from a third namespace (the
//! testbed's second client host, `cl2`, whose links d1/d2 reach the proxy
//! end's p4/p5 and, routed through the proxy host, the client's paths) while
//! the client downloads through the HTTP proxy:
//!
//! - issue 16's hijack: forged `CONFIRM|ASSIGN` datagrams to the client's
//!   path sockets (before the fix they re-addressed the client to
//!   10.201.0.2 and the download failed);
//! - with keys: forged assignments untagged and badly tagged, a flood of
//!   `ENABLE`s from random node IDs, and every datagram recorded on the
//!   client's paths replayed to both ends.
//!
//! The download must arrive intact, the client keep its address, the proxy
//! end hand no address to the attacker, and the drops be counted by reason.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use testbed::{pseudo_random, Background, Host, Options, Testbed};

const PROXY_NODE: [u8; 6] = [2, 0, 0, 0, 0, 1];

/// The CM block of a forged `CONFIRM|HEARTBEAT|ASSIGN` (version 1, no
/// tag) from `node`, assigning 10.201.0.2/24, byte by byte as
/// `PROTOCOL.md` §3 and §4.2 lay it out.
fn forged_assignment(node: [u8; 6], sequence: u32) -> Vec<u8> {
    let mut bytes = vec![1, 0x02 | 0x08 | 0x40];
    bytes.extend_from_slice(&node);
    bytes.extend_from_slice(&[0, 0, 1, 0]); // session 0, path 1, feedback path 0
    bytes.extend_from_slice(&[0; 8]); // timestamp, path delay
    bytes.extend_from_slice(&sequence.to_be_bytes());
    bytes.push(0); // no addresses
    bytes.extend_from_slice(&[4, 24, 10, 201, 0, 2, 10, 201, 0, 1]);
    bytes
}

/// The same as a version-2 block with a made-up key ID, counter and tag.
fn badly_tagged(mut untagged: Vec<u8>, counter: u64) -> Vec<u8> {
    untagged[0] = 2;
    let assignment = untagged.split_off(25);
    untagged.push(1);
    untagged.extend_from_slice(&counter.to_be_bytes());
    untagged.extend_from_slice(&[0x5a; 16]);
    untagged.extend_from_slice(&assignment);
    untagged
}

/// An `ENABLE` from `node` (version 1, or 2 with a made-up tag).
fn enable(node: [u8; 6], tagged: bool, counter: u64) -> Vec<u8> {
    let mut bytes = vec![if tagged { 2 } else { 1 }, 0x01];
    bytes.extend_from_slice(&node);
    bytes.extend_from_slice(&[0; 16]);
    bytes.push(0);
    if tagged {
        bytes.push(1);
        bytes.extend_from_slice(&counter.to_be_bytes());
        bytes.extend_from_slice(&[0xa5; 16]);
    }
    bytes
}

/// One UDP datagram of a capture.
struct Captured {
    source: SocketAddr,
    destination: SocketAddr,
    payload: Vec<u8>,
}

/// The IPv4 UDP datagrams of an Ethernet pcap file (tcpdump -w).
fn read_pcap(path: &Path) -> Vec<Captured> {
    let data = std::fs::read(path).expect("capture");
    assert!(data.len() >= 24, "pcap header");
    let little = data[..4] == [0xd4, 0xc3, 0xb2, 0xa1];
    let u32_at = |at: usize| {
        let b = [data[at], data[at + 1], data[at + 2], data[at + 3]];
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let caplen = u32_at(at + 8) as usize;
        let frame = &data[at + 16..(at + 16 + caplen).min(data.len())];
        at += 16 + caplen;
        // Ethernet, IPv4, UDP.
        if frame.len() < 14 + 28 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 17 {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
        let udp = &ip[ihl..total];
        if udp.len() < 8 {
            continue;
        }
        let v4 = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
        let port = |o: usize| u16::from_be_bytes([udp[o], udp[o + 1]]);
        out.push(Captured {
            source: SocketAddr::new(v4(12).into(), port(0)),
            destination: SocketAddr::new(v4(16).into(), port(2)),
            payload: udp[8..].to_vec(),
        });
    }
    out
}

/// tcpdumps of the client's two paths, started before mpipd, so the
/// handshake is recorded too.
fn start_captures(tb: &Testbed, dir: &Path) -> Vec<Background> {
    ["c1", "c2"]
        .iter()
        .map(|interface| {
            let file = dir.join(format!("{interface}.pcap"));
            let file = file.to_string_lossy().into_owned();
            let capture = tb
                .spawn(
                    tb.client_ns(),
                    &[
                        "tcpdump",
                        "-i",
                        interface,
                        "--immediate-mode",
                        "-U",
                        "-n",
                        "-w",
                        &file,
                        "udp",
                    ],
                )
                .expect("tcpdump");
            // tcpdump writes the header once it listens.
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) < 24 {
                assert!(Instant::now() < deadline, "tcpdump did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            capture
        })
        .collect()
}

struct Attack {
    lab: MpipLab,
    file: Vec<u8>,
    out: std::path::PathBuf,
    curl: Option<Background>,
    captures: Vec<Background>,
}

/// The lab with the second client host as the attacker's, the proxy end
/// also on p4/p5, and (with `download`) a download running; `keys` puts a
/// key file on both ends.
fn attack_lab(keys: bool, download: bool, seed: u64) -> Option<Attack> {
    let file = pseudo_random(16 << 20, seed);
    let dir = tempfile::tempdir().expect("keys dir");
    let key_file = write_key_file(dir.path(), "keys.toml", 1, seed);
    let mut captures = Vec::new();
    let lab = MpipLab::with_hook(
        Options {
            path_rate_mbit: [Some(20), Some(20)],
            subflow_endpoint: false,
            second_client: true,
            ..Options::default()
        },
        &[("file.bin", &file)],
        |proxy| {
            proxy.insert("node_id".into(), "02:00:00:00:00:01".into());
            let interfaces = ["p1", "p2", "p4", "p5"].map(toml::Value::from).to_vec();
            section(proxy, "paths").insert("interfaces".into(), interfaces.into());
            if keys {
                with_keys(proxy, &key_file, false);
            }
        },
        |client| {
            if keys {
                with_keys(client, &key_file, false);
            }
        },
        |tb, work| captures = start_captures(tb, work),
    )?;
    let out = lab.out_path("file.out");
    let mut attack = Attack {
        lab,
        file,
        out,
        curl: None,
        captures,
    };
    if download {
        attack.download();
        std::thread::sleep(Duration::from_millis(1500));
    } else {
        std::thread::sleep(Duration::from_millis(500));
    }
    Some(attack)
}

impl Attack {
    /// Starts the download through the HTTP proxy.
    fn download(&mut self) {
        let url = format!("http://{SERVER}/file.bin");
        let out = self.out.to_string_lossy().into_owned();
        self.curl = Some(
            self.lab
                .curl_background(Path::new(&out), &["-x", PROXY_HTTP, &url]),
        );
    }

    /// Stops the captures and returns what the client's paths carried.
    fn recorded(&mut self) -> Vec<Captured> {
        for capture in &mut self.captures {
            capture.signal(libc::SIGINT).expect("SIGINT tcpdump");
            capture
                .wait_timeout(Duration::from_secs(5))
                .expect("tcpdump exits");
        }
        ["c1", "c2"]
            .iter()
            .flat_map(|i| read_pcap(&self.lab.out_path(&format!("{i}.pcap"))))
            .filter(|c| c.source.port() == 4789 || c.destination.port() == 4789)
            .collect()
    }

    /// Runs `f` with a UDP socket of the attacker's host (10.0.4.2).
    fn as_attacker<T: Send>(&self, f: impl FnOnce(&UdpSocket) -> T + Send) -> T {
        let ns = self.lab.tb.ns(Host::SecondClient).to_owned();
        self.lab
            .tb
            .in_ns(&ns, || {
                let socket = UdpSocket::bind("10.0.4.2:0").expect("attacker socket");
                f(&socket)
            })
            .expect("attacker namespace")
    }

    /// Waits for the download; it must be intact and the client must still
    /// have `address`.
    fn finish(mut self, address: &str) -> MpipLab {
        let mut curl = self.curl.take().expect("a download");
        watch_download(&self.out, &mut curl, Duration::from_secs(60));
        let received = std::fs::read(&self.out).expect("downloaded");
        assert!(
            received.len() == self.file.len() && sha256(&received) == sha256(&self.file),
            "the download survived the attack intact ({} of {} bytes)\n{}",
            received.len(),
            self.file.len(),
            self.lab.logs()
        );
        let now = tunnel_address(&self.lab, self.lab.tb.client_ns());
        assert_eq!(now.as_deref(), Some(address), "the client kept its address");
        self.lab
    }
}

/// The client's path endpoints (its sockets bind port 0).
fn client_endpoints(recorded: &[Captured]) -> Vec<SocketAddr> {
    let mut endpoints: Vec<SocketAddr> = recorded
        .iter()
        .filter(|c| c.destination.port() == 4789)
        .map(|c| c.source)
        .collect();
    endpoints.sort();
    endpoints.dedup();
    endpoints
}

/// Issue 16's hijack: forged `CONFIRM|ASSIGN`s, from a random node ID and
/// from the proxy end's own, at the client's idle path sockets, without
/// keys (the example configurations); then a download. (Before the fix the
/// client took 10.201.0.2 and the download failed.)
#[test]
fn forged_assignments_do_not_hijack_a_client() {
    let Some(mut attack) = attack_lab(false, false, 0x41) else {
        return;
    };
    let address = tunnel_address(&attack.lab, attack.lab.tb.client_ns()).expect("address");
    let recorded = attack.recorded();
    let endpoints = client_endpoints(&recorded);
    assert_eq!(
        endpoints.len(),
        2,
        "both client paths seen: {endpoints:?} in {} datagrams",
        recorded.len()
    );
    attack.as_attacker(|socket| {
        for round in 0..5u32 {
            for endpoint in &endpoints {
                for node in [[0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc], PROXY_NODE] {
                    let forged = forged_assignment(node, round * 7919);
                    socket.send_to(&forged, endpoint).expect("send");
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    attack.download();
    let lab = attack.finish(&address);
    let drops = |reason: &str| {
        sum_metric(
            &lab.client_metrics(),
            "mpip_dropped_packets_total",
            &[("reason", reason)],
        )
    };
    std::thread::sleep(Duration::from_millis(700));
    let unsolicited = drops("unsolicited");
    eprintln!("hijack attempt: {unsolicited} forged datagrams dropped as unsolicited");
    assert_eq!(
        unsolicited, 20,
        "every forgery is counted: none came from the proxy end's endpoints"
    );
}

/// With keys on both ends: forged assignments (untagged and with made-up
/// tags), an ENABLE flood from random node IDs, and every recorded
/// datagram of the client's paths replayed to both ends, mid-download.
#[test]
fn attacks_on_keyed_ends_change_nothing() {
    let Some(mut attack) = attack_lab(true, true, 0x42) else {
        return;
    };
    let address = tunnel_address(&attack.lab, attack.lab.tb.client_ns()).expect("address");
    let recorded = attack.recorded();
    let endpoints = client_endpoints(&recorded);
    assert_eq!(endpoints.len(), 2, "both client paths seen: {endpoints:?}");
    assert!(
        recorded.iter().any(|c| c.payload[0] == 2),
        "the ends speak version 2 (tagged)"
    );
    let started = Instant::now();
    let sent = attack.as_attacker(|socket| {
        let mut sent = 0u64;
        for round in 0..5u64 {
            for endpoint in &endpoints {
                let forged = forged_assignment(PROXY_NODE, 0);
                socket.send_to(&forged, endpoint).expect("send");
                socket
                    .send_to(&badly_tagged(forged, u64::MAX - round), endpoint)
                    .expect("send");
                sent += 2;
            }
        }
        // ENABLE flood: random node IDs, untagged and badly tagged.
        for i in 0..2000u64 {
            let node = [0x42, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
            let target = if i % 2 == 0 {
                "10.0.4.1:4789"
            } else {
                "10.0.5.1:4789"
            };
            let _ = socket.send_to(&enable(node, i % 4 < 2, i), target);
            sent += 1;
            if i % 200 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Replays: what the client sent goes to the proxy end (its p4
        // socket: the attacker's link), what it received back to it.
        for (i, c) in recorded.iter().enumerate() {
            let target: SocketAddr = if c.destination.port() == 4789 {
                "10.0.4.1:4789".parse().unwrap()
            } else {
                c.destination
            };
            let _ = socket.send_to(&c.payload, target);
            sent += 1;
            if i % 100 == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        sent
    });
    eprintln!(
        "attack: {sent} datagrams ({} recorded ones replayed) in {:?}",
        recorded.len(),
        started.elapsed()
    );
    let lab = attack.finish(&address);
    std::thread::sleep(Duration::from_millis(700));
    let proxy = lab.metrics();
    let client = lab.client_metrics();
    let drops = |text: &str, reason: &str| {
        sum_metric(text, "mpip_dropped_packets_total", &[("reason", reason)])
    };
    let report: Vec<(String, u64, u64)> = [
        "unauthenticated",
        "bad_mac",
        "replayed",
        "rate_limited",
        "unsolicited",
        "unknown_key",
        "unverified",
    ]
    .iter()
    .map(|r| (r.to_string(), drops(&proxy, r), drops(&client, r)))
    .collect();
    eprintln!("drops (reason, proxy end, client): {report:?}");
    let get = |reason: &str| report.iter().find(|r| r.0 == reason).unwrap();
    assert!(get("unauthenticated").1 >= 900, "untagged ENABLEs");
    assert_eq!(get("bad_mac").2 + get("unauthenticated").2, 0, "{report:?}");
    assert!(
        get("bad_mac").1 + get("rate_limited").1 >= 900,
        "badly tagged ENABLEs"
    );
    assert!(get("replayed").1 > 0, "replays to the proxy end");
    // Replays to the client come from the attacker's address, which is
    // none of the proxy end's: dropped before the tag is even looked at.
    assert!(get("unsolicited").2 >= 10, "replays to the client");
    let peers = proxy
        .lines()
        .find_map(|line| line.strip_prefix("mpip_peers "))
        .and_then(|value| value.trim().parse::<f64>().ok());
    assert_eq!(peers, Some(1.0), "no peer but the client");
    let active = sum_metric(&proxy, "mpip_path_active", &[]);
    assert_eq!(
        active, 2,
        "the client's two paths are the only active ones (replays from the attacker's address proved nothing)"
    );
}
