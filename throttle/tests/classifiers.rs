//! The upload classifier in the kernel: the cls_bpf program sends listed subflows (IPv4 and IPv6) to
//! their class and leaves others unclassified; and, as an ignored measurement, what classifying costs
//! per packet with 10,000 steered subflows: no classifier, the cls_bpf hash map, u32 with one filter per
//! subflow (the throttle's classifier before issue 15), u32 hashed into 256 buckets.
//! Needs root; skipped without it unless CI is set.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{require_root, Netns};
use mptcp_throttle::kernel::KernelBackend;
use mptcp_throttle::upload::UploadClassifier;
use mptcp_throttle::{
    ConnectionToken, FourTuple, SubflowEvent, SubflowInfo, ThrottleConfig, ThrottleState,
};

/// Proxy namespace `a0` (10.92.0.1, fd92::1) and client namespace `b0` (.2, ::2).
fn pair(tag: &str) -> (Netns, Netns) {
    let proxy = Netns::new(&format!("{tag}p"));
    let client = Netns::new(&format!("{tag}c"));
    proxy.ip(&["link", "add", "a0", "type", "veth", "peer", "name", "b0"]);
    proxy.ip(&["link", "set", "b0", "netns", &client.name]);
    proxy.ip(&["addr", "add", "10.92.0.1/24", "dev", "a0"]);
    proxy.ip(&["addr", "add", "fd92::1/64", "dev", "a0", "nodad"]);
    client.ip(&["addr", "add", "10.92.0.2/24", "dev", "b0"]);
    client.ip(&["addr", "add", "fd92::2/64", "dev", "b0", "nodad"]);
    proxy.ip(&["link", "set", "a0", "up"]);
    client.ip(&["link", "set", "b0", "up"]);
    (proxy, client)
}

/// Connects from `client` to `to`, waits for `go`, sends 8 MiB and closes.
fn upload_after(
    client: &Netns,
    to: SocketAddr,
    go: std::sync::mpsc::Receiver<()>,
) -> std::thread::JoinHandle<u64> {
    let name = client.name.clone();
    std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
        // SAFETY: valid netns descriptor; affects this thread only.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) },
            0
        );
        let mut stream = loop {
            match TcpStream::connect(to) {
                Ok(stream) => break stream,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        go.recv().unwrap();
        let chunk = vec![0x5au8; 1 << 16];
        for _ in 0..128 {
            stream.write_all(&chunk).unwrap();
        }
        128 << 16
    })
}

fn drain(listener: &TcpListener) -> (SocketAddr, SocketAddr, u64) {
    let (mut stream, peer) = listener.accept().unwrap();
    let local = stream.local_addr().unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return (local, peer, total),
            Ok(n) => total += n as u64,
        }
    }
}

#[test]
fn bpf_classifier_sends_listed_subflows_to_their_class() {
    if !require_root("bpf_classifier_sends_listed_subflows_to_their_class") {
        return;
    }
    let (proxy, client) = pair("cls");
    let config = ThrottleConfig::from_toml_str(
        r#"
        [[classes]]
        name = "up"
        interface = "a0"
        rate = "1gbit"
        direction = "upload"
        [[rules]]
        class = "up"
        min_subflows = 1
        match = { local_port = 7200 }
        "#,
    )
    .unwrap();
    let mut backend = proxy.enter(move || {
        let mut backend = KernelBackend::open(&config).unwrap();
        backend.start().unwrap();
        let mut state = ThrottleState::new(config);
        for (addr, name) in backend.interfaces().unwrap().addresses {
            state.set_interface_address(addr, &name);
        }
        assert!(backend.apply(&state.poll_changes()).is_empty());
        (backend, state)
    });
    let ifb = format!("mpifb{}", proxy.ifindex("a0"));
    let class_bytes = || {
        proxy
            .classes(&ifb)
            .into_iter()
            .find(|c| c.id == "4d50:10")
            .unwrap()
            .sent_bytes
    };
    // Flows to port 7200 (IPv4 and IPv6) are steered; the flow to 7201 is not. One at a time, each
    // steered before it sends.
    for (token, (address, steered)) in [
        ("10.92.0.1:7200", true),
        ("[fd92::1]:7200", true),
        ("10.92.0.1:7201", false),
    ]
    .into_iter()
    .enumerate()
    {
        let address: SocketAddr = address.parse().unwrap();
        let listener = proxy.enter(move || TcpListener::bind(address).unwrap());
        let (go_tx, go_rx) = std::sync::mpsc::channel();
        let sender = upload_after(&client, address, go_rx);
        let before = class_bytes();
        let (moved, received) = proxy.enter(move || {
            let (mut backend, mut state) = backend;
            let (mut stream, peer) = listener.accept().unwrap();
            state.handle_event(
                Instant::now(),
                SubflowEvent::ConnectionCreated {
                    token: ConnectionToken(token as u32),
                    subflow: SubflowInfo::new(stream.local_addr().unwrap(), peer),
                },
            );
            assert!(backend.apply(&state.poll_changes()).is_empty());
            go_tx.send(()).unwrap();
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0u64;
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n as u64,
                }
            }
            ((backend, state), total)
        });
        backend = moved;
        assert_eq!(sender.join().unwrap(), received);
        let delta = class_bytes() - before;
        eprintln!("{address} steered {steered}: received {received} bytes, class sent {delta}");
        if steered {
            assert!(
                delta >= received,
                "{address}: class sent {delta} of {received} bytes"
            );
        } else {
            assert!(
                delta < received / 10,
                "{address}: unsteered, yet the class sent {delta} bytes"
            );
        }
    }
    proxy.enter(move || {
        let (mut backend, _) = backend;
        backend.shutdown().unwrap();
    });
}

/// How many subflows every variant holds besides the measured flow (`MEASURE_SUBFLOWS`, default
/// 10,000).
fn dummy_count() -> u32 {
    std::env::var("MEASURE_SUBFLOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// The steered subflows besides the measured one: clients 10.93-10.94.x.y, ephemeral-like ports.
fn dummy_tuples(proxy: SocketAddr) -> impl Iterator<Item = FourTuple> {
    (0..dummy_count()).map(move |i| FourTuple {
        local: proxy,
        remote: SocketAddr::new(
            std::net::Ipv4Addr::new(10, 93 + (i >> 16) as u8, (i >> 8) as u8, i as u8).into(),
            32_768 + (i.wrapping_mul(7919) % 28_000) as u16,
        ),
    })
}

fn tc_batch(ns: &Netns, commands: &str) {
    let path = std::env::temp_dir().join(format!("tc-{}-{}.batch", ns.name, std::process::id()));
    std::fs::write(&path, commands).unwrap();
    ns.exec("tc", &["-batch", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(path);
}

/// One upload of 3 s without segmentation offload (one packet per skb, as a loaded NIC with small
/// packets sees them), through the IFB with the given classifier; returns Mbit/s at the receiver.
fn measure_once(variant: &str) -> f64 {
    let (proxy, client) = pair("meas");
    client.ip(&["link", "set", "dev", "b0", "gso_max_segs", "1"]);
    proxy.ip(&["link", "add", "ifbm", "type", "ifb"]);
    proxy.ip(&["link", "set", "ifbm", "up"]);
    proxy.exec(
        "tc",
        &[
            "qdisc", "add", "dev", "ifbm", "root", "handle", "4d50:", "htb",
        ],
    );
    proxy.exec(
        "tc",
        &[
            "class", "add", "dev", "ifbm", "parent", "4d50:", "classid", "4d50:10", "htb", "rate",
            "40gbit",
        ],
    );
    proxy.exec("tc", &["qdisc", "add", "dev", "a0", "ingress"]);
    proxy.exec(
        "tc",
        &[
            "filter", "add", "dev", "a0", "parent", "ffff:", "protocol", "all", "u32", "match",
            "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", "ifbm",
        ],
    );
    let server: SocketAddr = "10.92.0.1:7300".parse().unwrap();
    let listener = proxy.enter(move || TcpListener::bind(server).unwrap());
    // The measured flow's port is fixed so that every variant can list it before traffic starts.
    let client_port = 45_678u16;
    let measured = FourTuple {
        local: server,
        remote: SocketAddr::new("10.92.0.2".parse().unwrap(), client_port),
    };
    let ifb = proxy.ifindex("ifbm");
    let installing = Instant::now();
    let keep_alive = match variant {
        "none" => None,
        "bpf" => Some(proxy.enter(move || {
            let classifier = UploadClassifier::new(1 << 16).unwrap();
            for tuple in dummy_tuples(server).chain([measured]) {
                let key = mptcp_throttle::upload::key(&tuple).unwrap();
                classifier.set(&key, 0x4d50_0010).unwrap();
            }
            let mut route = mptcp_netlink::NetlinkSocket::open(libc::NETLINK_ROUTE).unwrap();
            route
                .request(
                    mptcp_throttle::tc::bpf_filter(
                        ifb,
                        0x4d50_0000,
                        1,
                        classifier.program_fd(),
                        "m",
                    ),
                    "attach",
                )
                .unwrap();
            classifier
        })),
        "u32-linear" => {
            // One u32 filter list, walked in order: the throttle's classifier before issue 15 gave each
            // subflow its own priority instead, which also walks them in order, and stops at 2,047 (a
            // qdisc's u32 filters share 2,048 root hash table ids).
            let mut batch = String::new();
            for tuple in dummy_tuples(server).chain([measured]) {
                batch.push_str(&format!(
                    "filter add dev ifbm parent 4d50: prio 1 protocol ip u32 \
                     match ip protocol 6 0xff match ip src {}/32 match ip dst {}/32 \
                     match ip sport {} 0xffff match ip dport {} 0xffff flowid 4d50:10\n",
                    tuple.remote.ip(),
                    tuple.local.ip(),
                    tuple.remote.port(),
                    tuple.local.port()
                ));
            }
            tc_batch(&proxy, &batch);
            None
        }
        "u32-hash" => {
            // tc's hashing filter: a 256-bucket table keyed on the low byte of the client port.
            let mut batch = String::from(
                "filter add dev ifbm parent 4d50: prio 1 handle 2: protocol ip u32 divisor 256\n\
                 filter add dev ifbm parent 4d50: prio 1 protocol ip u32 ht 800:: match ip protocol 6 0xff \
                 hashkey mask 0x00ff0000 at 20 link 2:\n",
            );
            for tuple in dummy_tuples(server).chain([measured]) {
                let bucket = tuple.remote.port() & 0xff;
                batch.push_str(&format!(
                    "filter add dev ifbm parent 4d50: prio 1 protocol ip u32 ht 2:{bucket:x}: \
                     match ip src {}/32 match ip dst {}/32 match ip sport {} 0xffff match ip dport {} 0xffff \
                     flowid 4d50:10\n",
                    tuple.remote.ip(),
                    tuple.local.ip(),
                    tuple.remote.port(),
                    tuple.local.port()
                ));
            }
            tc_batch(&proxy, &batch);
            None
        }
        other => panic!("unknown variant {other}"),
    };
    if variant != "none" {
        eprintln!(
            "  {variant}: {} entries installed in {:?}",
            dummy_count() + 1,
            installing.elapsed()
        );
    }
    let name = client.name.clone();
    let sender = std::thread::spawn(move || {
        let file = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
        // SAFETY: valid netns descriptor; affects this thread only.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) },
            0
        );
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::new("10.92.0.2".parse().unwrap(), client_port).into())
            .unwrap();
        socket.connect(&server.into()).unwrap();
        let mut stream: TcpStream = socket.into();
        let chunk = vec![0x5au8; 1 << 16];
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(3) {
            stream.write_all(&chunk).unwrap();
        }
    });
    let started = Instant::now();
    let (_, _, bytes) = drain(&listener);
    let seconds = started.elapsed().as_secs_f64();
    sender.join().unwrap();
    let classified = proxy
        .classes("ifbm")
        .into_iter()
        .find(|c| c.id == "4d50:10")
        .map_or(0, |c| c.sent_bytes);
    if variant != "none" {
        assert!(
            classified >= bytes,
            "{variant}: the measured flow was not classified"
        );
    }
    drop(keep_alive);
    bytes as f64 * 8.0 / seconds / 1e6
}

/// `cargo test --release -p mptcp-throttle --test classifiers -- --ignored --nocapture`
/// (`MEASURE_SUBFLOWS=N`, `MEASURE_VARIANTS=none,bpf,...` to change what is measured).
#[test]
#[ignore = "measurement: prints per-variant throughput, takes about a minute"]
fn measure_upload_classifiers() {
    if !require_root("measure_upload_classifiers") {
        return;
    }
    let variants: Vec<String> = std::env::var("MEASURE_VARIANTS")
        .unwrap_or_else(|_| "none,bpf,u32-hash,u32-linear".into())
        .split(',')
        .map(str::to_owned)
        .collect();
    let variants: Vec<&str> = variants.iter().map(String::as_str).collect();
    eprintln!(
        "{} steered subflows besides the measured one",
        dummy_count()
    );
    let mut results: Vec<(&str, Vec<f64>)> = variants.iter().map(|v| (*v, Vec::new())).collect();
    for round in 0..3 {
        for (variant, values) in results.iter_mut() {
            let mbit = measure_once(variant);
            eprintln!("round {round} {variant}: {mbit:.0} Mbit/s");
            values.push(mbit);
        }
    }
    for (variant, mut values) in results {
        values.sort_by(f64::total_cmp);
        eprintln!(
            "{variant:>10}: median {:.0} Mbit/s (runs {:?})",
            values[1],
            values.iter().map(|v| v.round()).collect::<Vec<_>>()
        );
    }
}
