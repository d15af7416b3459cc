//! End-to-end: live capture (AF_PACKET + kernel BPF + pnet) in the proxy namespace of the
//! testbed while a real Linux MPTCP connection with two subflows runs, with ADD_ADDR, MP_PRIO
//! and REMOVE_ADDR caused by `ip mptcp endpoint` commands mid-transfer.
//!
//! Needs root (network namespaces); skipped otherwise unless `CI=true`.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use mptcp_sniffer::capture::{self, LinkType, LiveCapture, LiveOptions};
use mptcp_sniffer::tracker::{Event, Side, SubflowCloseReason, Tracker, TrackerConfig};
use mptcp_sniffer::wire::mptcp::{MptcpRepr, OPTION_KIND};
use socket2::{Domain, Protocol, Socket, Type};

#[test]
fn live_capture_tracks_a_two_subflow_connection() {
    if testbed::skip_unless_root() {
        return;
    }
    let tb = testbed::Testbed::new(testbed::Options::default()).expect("testbed");
    let proxy_ns = tb.proxy_ns().to_string();
    let client_ns = tb.client_ns().to_string();
    let server_address: SocketAddr = "10.0.1.1:5000".parse().unwrap();

    let live = tb
        .in_ns(&proxy_ns, || {
            LiveCapture::start(&LiveOptions {
                interfaces: vec!["p1".into(), "p2".into()],
                ..LiveOptions::default()
            })
        })
        .expect("enter proxy ns")
        .expect("start live capture");

    let listener = tb
        .in_ns(&proxy_ns, || -> std::io::Result<Socket> {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::MPTCP))?;
            socket.set_reuse_address(true)?;
            socket.bind(&server_address.into())?;
            socket.listen(8)?;
            Ok(socket)
        })
        .unwrap()
        .expect("MPTCP listener");
    let server = std::thread::spawn(move || {
        let (socket, _) = listener.accept().expect("accept");
        let mut stream: TcpStream = socket.into();
        let mut received = 0usize;
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
        received
    });

    let stream: TcpStream = tb
        .in_ns(&client_ns, || -> std::io::Result<TcpStream> {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::MPTCP))?;
            socket.connect_timeout(&server_address.into(), Duration::from_secs(5))?;
            Ok(socket.into())
        })
        .unwrap()
        .expect("MPTCP connect");
    let client = std::thread::spawn(move || {
        let mut stream = stream;
        let chunk = [0x5au8; 1024];
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(4_000) {
            if stream.write_all(&chunk).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
        // Wait for the server's FIN.
        let mut sink = [0u8; 64];
        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    });

    // A plain TCP connection alongside: the kernel filter must only let its SYN/FIN/RST through.
    let plain_address: SocketAddr = "10.0.1.1:5001".parse().unwrap();
    let plain_listener = tb
        .in_ns(&proxy_ns, || std::net::TcpListener::bind(plain_address))
        .unwrap()
        .expect("plain listener");
    let plain_server = std::thread::spawn(move || {
        let (mut stream, _) = plain_listener.accept().expect("plain accept");
        let mut buffer = [0u8; 4096];
        while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {}
    });
    let plain_stream = tb
        .in_ns(&client_ns, || TcpStream::connect(plain_address))
        .unwrap()
        .expect("plain connect");
    let plain_client = std::thread::spawn(move || {
        let mut stream = plain_stream;
        for _ in 0..50 {
            stream.write_all(&[0xa5; 512]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    });

    // Path-manager commands mid-transfer.
    let commands: Vec<(u64, String, Vec<&str>)> = vec![
        (
            1_000,
            proxy_ns.clone(),
            vec![
                "ip", "mptcp", "endpoint", "add", "10.0.2.1", "dev", "p2", "id", "5", "signal",
            ],
        ),
        (
            2_000,
            client_ns.clone(),
            vec!["ip", "mptcp", "endpoint", "change", "id", "2", "backup"],
        ),
        (
            3_000,
            proxy_ns.clone(),
            vec!["ip", "mptcp", "endpoint", "delete", "id", "5"],
        ),
    ];

    let mut tracker = Tracker::new(TrackerConfig::default());
    let mut events = Vec::new();
    let mut subtypes = BTreeSet::new();
    let started = Instant::now();
    let mut next_command = 0;
    let mut plain_control_segments = 0;
    let deadline = Duration::from_secs(15);
    while started.elapsed() < deadline {
        if let Some((at, ns, argv)) = commands.get(next_command) {
            if started.elapsed() >= Duration::from_millis(*at) {
                tb.exec(ns, argv)
                    .unwrap_or_else(|error| panic!("{argv:?}: {error}"));
                next_command += 1;
            }
        }
        let Some(frame) = live.next_frame(Duration::from_millis(50)) else {
            if events
                .iter()
                .any(|e| matches!(e, Event::ConnectionClosed { .. }))
            {
                break;
            }
            continue;
        };
        let Ok(Some(segment)) = capture::decode_frame(LinkType::RawIp, &frame.data) else {
            continue;
        };
        if segment.src_port == 5001 || segment.dst_port == 5001 {
            let flags = segment.flags;
            assert!(
                flags.syn() || flags.fin() || flags.rst(),
                "plain TCP data passed the filter: {segment:?}"
            );
            plain_control_segments += 1;
        }
        for option in segment.tcp_options().flatten() {
            if option.kind == OPTION_KIND {
                if let Ok(repr) = MptcpRepr::from_bytes(option.bytes) {
                    subtypes.insert(repr.subtype().name());
                }
            }
        }
        tracker.handle_segment(frame.timestamp, &segment);
        while let Some(event) = tracker.poll_event() {
            events.push(event);
        }
    }
    client.join().unwrap();
    plain_client.join().unwrap();
    plain_server.join().unwrap();
    assert!(
        plain_control_segments >= 2,
        "the plain connection's SYN and SYN-ACK were not captured"
    );
    let received = server.join().unwrap();
    assert!(received > 0);

    let summary = format!("subtypes {subtypes:?}\nevents {events:#?}");
    let established: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::ConnectionEstablished { token, .. } => Some(*token),
            _ => None,
        })
        .collect();
    assert_eq!(established.len(), 1, "{summary}");
    // The kernel's v1 MP_JOIN and ADD_ADDR HMACs validate against the observed keys.
    assert!(
        !events.iter().any(|e| matches!(e, Event::Anomaly { .. })),
        "{summary}"
    );
    let token = established[0];
    let added: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::SubflowAdded {
                token: t, subflow, ..
            } if *t == token => Some(*subflow),
            _ => None,
        })
        .collect();
    assert!(added.len() >= 2, "{summary}");
    assert_eq!(
        added[0].tuple.initiator.ip().to_string(),
        "10.0.1.2",
        "{summary}"
    );
    assert!(
        added
            .iter()
            .any(|s| s.tuple.initiator.ip().to_string() == "10.0.2.2"),
        "{summary}"
    );
    assert!(
        events.iter().any(|e| matches!(e, Event::MultipathThresholdReached { token: t, active_subflows: 2, .. } if *t == token)),
        "{summary}"
    );
    assert!(
        events.iter().any(|e| matches!(e,
            Event::AddressAnnounced { side: Side::Server, address_id: 5, address, .. } if address.to_string() == "10.0.2.1")),
        "{summary}"
    );
    assert!(
        events.iter().any(|e| matches!(e, Event::PriorityChanged { side: Side::Client, subflow, .. } if subflow.backup)),
        "{summary}"
    );
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::AddressRemoved {
                side: Side::Server,
                address_id: 5,
                ..
            }
        )),
        "{summary}"
    );
    let closed: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::SubflowClosed {
                token: t, reason, ..
            } if *t == token => Some(*reason),
            _ => None,
        })
        .collect();
    assert!(closed.len() >= 2, "{summary}");
    assert!(
        closed.iter().all(|r| matches!(
            r,
            SubflowCloseReason::Fin | SubflowCloseReason::Reset | SubflowCloseReason::TcpRst { .. }
        )),
        "{summary}"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::ConnectionClosed { token: t, .. } if *t == token)),
        "{summary}"
    );
    for subtype in [
        "mp_capable",
        "mp_join",
        "dss",
        "add_addr",
        "mp_prio",
        "remove_addr",
    ] {
        assert!(
            subtypes.contains(subtype),
            "{subtype} not captured: {summary}"
        );
    }
    eprintln!("{summary}");
}
