//! Two [`Node`]s, a client with two interfaces and the proxy end with two, on
//! a simulated network with a simulated clock: handshake and address
//! assignment, data both ways, failover and re-activation, coordinated
//! routing pins, protected-path under loss, the address pool, and several
//! clients served at once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

mod sim;

use mpip_proxy::node::{Node, NodeConfig, NodeEvent, Role, HEADROOM};
use mpip_proxy::packet::build;
use mpip_proxy::path_manager::{InterfaceId, PathState};
use mpip_proxy::routing::{Priority, RoutingRule, RoutingTable};
use mpip_proxy::scheduler::SplitMix64;
use mpip_proxy::time::Timestamp;
use mpip_proxy::wire::NodeId;
use sim::*;

#[test]
fn handshake_assigns_an_address_and_finds_both_paths() {
    let mut lab = Lab::new(
        RoutingTable::default(),
        RoutingTable::default(),
        "10.200.0.0/24",
    );
    assert_eq!(lab.client.assignment(), None);
    lab.run(Duration::from_millis(600));
    let assignment = lab.client.assignment().expect("assigned within 600 ms");
    assert_eq!(assignment.client, CLIENT_TUN);
    assert_eq!(assignment.proxy, PROXY_TUN);
    assert_eq!(assignment.prefix_len, 24);
    let events: Vec<NodeEvent> = std::iter::from_fn(|| lab.client.poll_event()).collect();
    assert!(events.contains(&NodeEvent::Assigned(assignment)));
    assert_eq!(lab.proxy.clients(), vec![(CLIENT_ID, CLIENT_TUN)]);
    for (node, names) in [(&lab.client, ["c1", "c2"]), (&lab.proxy, ["p1", "p2"])] {
        for name in names {
            assert_eq!(
                Lab::path_state(node, name),
                Some(PathState::Active),
                "{name}"
            );
        }
    }
}

#[test]
fn data_flows_both_ways_and_spoofed_sources_are_dropped() {
    let mut lab = connected_lab(RoutingTable::default(), RoutingTable::default());
    let request = udp(CLIENT_TUN, PROXY_TUN, 53, b"query");
    lab.send_from_client(&request);
    // The proxy end answers after the request arrived (sessions opened by both
    // ends at once are covered by the session table's own tests).
    lab.run(Duration::from_millis(30));
    let reply = build::ipv4_udp(PROXY_TUN, CLIENT_TUN, 53, 40000, b"answer");
    lab.send_from_proxy(&reply);
    lab.run(Duration::from_millis(50));
    assert_eq!(lab.proxy_tun, vec![request]);
    assert_eq!(lab.client_tun, vec![reply]);
    assert_eq!(lab.client.session_count(), 1);
    assert_eq!(lab.proxy.session_count(), 1);

    let spoofed = udp(Ipv4Addr::new(10, 200, 0, 9), PROXY_TUN, 53, b"x");
    lab.send_from_client(&spoofed);
    let unknown_client = udp(PROXY_TUN, Ipv4Addr::new(10, 200, 0, 77), 53, b"x");
    lab.send_from_proxy(&unknown_client);
    lab.run(Duration::from_millis(50));
    assert_eq!(
        lab.proxy_tun.len(),
        1,
        "the spoofed packet never reached the proxy's TUN"
    );
    assert_eq!(
        lab.client.counters().no_route,
        1,
        "the client only sends its own address"
    );
    assert_eq!(
        lab.proxy.counters().no_route,
        1,
        "no client owns 10.200.0.77"
    );
}

#[test]
fn a_failed_link_is_dropped_and_back_in_use_within_a_second() {
    let mut lab = connected_lab(RoutingTable::default(), RoutingTable::default());
    // A steady stream from the proxy end to the client, one packet per ms.
    let stream = |lab: &mut Lab, ms: u64| {
        for _ in 0..ms {
            let packet = udp(PROXY_TUN, CLIENT_TUN, 40000, &[0u8; 1000]);
            lab.send_from_proxy(&packet);
            lab.run(Duration::from_millis(1));
        }
    };
    stream(&mut lab, 200);
    lab.link_up[1] = false;
    // Declared dead after 400 ms of silence (plus a heartbeat interval).
    stream(&mut lab, 600);
    assert_eq!(Lab::path_state(&lab.proxy, "p2"), Some(PathState::Dead));
    assert_eq!(Lab::path_state(&lab.client, "c2"), Some(PathState::Dead));
    lab.run(Duration::from_millis(30));
    let delivered = lab.client_tun.len();
    stream(&mut lab, 400);
    lab.run(Duration::from_millis(30));
    assert_eq!(
        lab.client_tun.len(),
        delivered + 400,
        "once path 2 is dead, everything goes over path 1"
    );

    lab.link_up[1] = true;
    let carried_at_up = lab.carried[1][0];
    let mut back_after = None;
    for ms in 0..1000u64 {
        stream(&mut lab, 1);
        if Lab::path_state(&lab.proxy, "p2") == Some(PathState::Active)
            && lab.carried[1][0] > carried_at_up + 20
        {
            back_after = Some(ms);
            break;
        }
    }
    let back_after = back_after.expect("path 2 carries data again within 1 s of link up");
    assert!(back_after < 1000, "{back_after} ms");
}

#[test]
fn routing_rules_pin_sessions_to_paths() {
    let pin = |port: u16, path: &str| RoutingRule {
        port: Some(port),
        path: Some(path.to_owned()),
        ..RoutingRule::default()
    };
    let client_rules = RoutingTable {
        default: Priority::ThroughputFirst,
        rules: vec![pin(80, "c1"), pin(8080, "c2")],
    };
    let proxy_rules = RoutingTable {
        default: Priority::ThroughputFirst,
        rules: vec![pin(80, "p1"), pin(8080, "p2")],
    };
    let mut lab = connected_lab(client_rules, proxy_rules);
    let carried_before = lab.carried;
    for i in 0..200u16 {
        let port = if i % 4 == 0 { 8080 } else { 80 };
        lab.send_from_proxy(&build::ipv4_udp(
            PROXY_TUN, CLIENT_TUN, port, 40000, &[1; 500],
        ));
        lab.run(Duration::from_millis(1));
    }
    lab.run(Duration::from_millis(50));
    assert_eq!(lab.client_tun.len(), 200);
    let data = |link: usize| lab.carried[link][0] - carried_before[link][0];
    // Heartbeats are skipped on a path that carries data, so a path carries
    // its sessions' packets plus at most a few control packets.
    assert!((150..160).contains(&data(0)), "p1 carried {}", data(0));
    assert!((50..60).contains(&data(1)), "p2 carried {}", data(1));
}

#[test]
fn the_inner_header_is_left_out_once_the_peer_knows_the_session() {
    let mut lab = connected_lab(RoutingTable::default(), RoutingTable::default());
    let request = with_df(udp(CLIENT_TUN, PROXY_TUN, 53, b"query"));
    lab.send_from_client(&request);
    lab.run(Duration::from_millis(30));
    assert_eq!(
        lab.client.counters().compressed,
        0,
        "the proxy end does not know the session yet"
    );
    // A reply the proxy end forwarded (gateway mode): its TTL is one down.
    let mut reply = build::ipv4_udp(PROXY_TUN, CLIENT_TUN, 53, 40000, b"answer");
    reply[8] = 63;
    let reply = with_df(reply);
    lab.proxy
        .handle_tun_packet(lab.now, [vec![0u8; HEADROOM], reply.clone()].concat());
    let datagram = lab.proxy.poll_transmit(lab.now).expect("the reply");
    assert_eq!(lab.proxy.counters().compressed, 1);
    assert_eq!(
        datagram.bytes.len(),
        25 + reply.len() - 19,
        "CM block in, IPv4 header out but its TTL"
    );
    let link = u8::try_from(datagram.interface.0).unwrap();
    lab.client.handle_datagram(
        lab.now,
        datagram.interface,
        proxy_addr(link),
        datagram.bytes.clone(),
    );
    let restored = lab.client.poll_tun().expect("delivered");
    assert_eq!(
        restored.packet(),
        &reply[..],
        "rebuilt byte for byte, TTL 63"
    );

    // A node that does not know the session (a proxy end that restarted)
    // drops it and says why.
    let mut stranger = Node::new(
        NodeConfig::new(
            NodeId([2, 0, 0, 0, 0, 0xc3]),
            Role::Proxy {
                pool: "10.200.0.0/24".parse().unwrap(),
            },
        ),
        SplitMix64::new(4),
    );
    stranger.handle_interface_up(lab.now, InterfaceId(1), "p1", proxy_addr(1));
    stranger.handle_datagram(lab.now, InterfaceId(1), client_addr(1), datagram.bytes);
    assert_eq!(stranger.poll_tun(), None);
    assert_eq!(stranger.counters().unknown_session, 1);

    // Without DF the header stays.
    let no_df = build::ipv4_udp(PROXY_TUN, CLIENT_TUN, 53, 40000, b"fragmentable");
    lab.proxy
        .handle_tun_packet(lab.now, [vec![0u8; HEADROOM], no_df.clone()].concat());
    let datagram = lab.proxy.poll_transmit(lab.now).expect("sent");
    assert_eq!(datagram.bytes.len(), 25 + no_df.len());
}

#[test]
fn tcp_segments_are_resequenced_and_a_gap_times_out() {
    let mut lab = connected_lab(RoutingTable::default(), RoutingTable::default());
    let segment = |sequence: u32| {
        build::ipv4_tcp(
            PROXY_TUN,
            CLIENT_TUN,
            3128,
            40000,
            sequence,
            mpip_proxy::packet::TCP_ACK,
            &[],
            &[7u8; 100],
        )
    };
    lab.send_from_proxy(&segment(1000));
    lab.run(Duration::from_millis(30));
    assert_eq!(
        lab.client_tun.len(),
        1,
        "the first segment sets the expected sequence"
    );
    // 1100 is missing: 1200 waits in the re-sequencer.
    lab.send_from_proxy(&segment(1200));
    lab.run(Duration::from_millis(40));
    assert_eq!(lab.client_tun.len(), 1, "held while the gap may still fill");
    lab.run(Duration::from_millis(40));
    assert_eq!(lab.client_tun.len(), 2, "released by the 50 ms timeout");
    // The late segment is old now and passes at once.
    lab.send_from_proxy(&segment(1100));
    lab.run(Duration::from_millis(30));
    assert_eq!(lab.client_tun.len(), 3);
    assert_eq!(lab.client_tun[1], segment(1200));
    assert_eq!(lab.client_tun[2], segment(1100));
}

#[test]
fn selected_paths_restrict_the_spread() {
    let proxy_rules = RoutingTable {
        default: Priority::ThroughputFirst,
        rules: vec![RoutingRule {
            port: Some(8080),
            paths: vec!["p2".to_owned()],
            ..RoutingRule::default()
        }],
    };
    let mut lab = connected_lab(RoutingTable::default(), proxy_rules);
    let carried_before = lab.carried;
    for i in 0..200u16 {
        let port = if i % 2 == 0 { 8080 } else { 80 };
        lab.send_from_proxy(&build::ipv4_udp(
            PROXY_TUN, CLIENT_TUN, port, 40000, &[1; 500],
        ));
        lab.run(Duration::from_millis(1));
    }
    lab.run(Duration::from_millis(50));
    assert_eq!(lab.client_tun.len(), 200);
    let data = |link: usize| lab.carried[link][0] - carried_before[link][0];
    // Port 8080 only on p2; port 80 spread over both by weight.
    assert!(
        data(1) > 100 + 20,
        "p2 carried all of port 8080 and part of port 80: {}",
        data(1)
    );
    assert!(
        (20..100).contains(&data(0)),
        "p1 carried only port-80 packets: {}",
        data(0)
    );
}

#[test]
fn protected_path_delivers_every_packet_once_under_loss() {
    let protected = RoutingTable {
        default: Priority::Protected,
        rules: Vec::new(),
    };
    let mut lab = connected_lab(protected.clone(), protected);
    lab.loss_percent = [0, 20];
    for i in 0..500u32 {
        let payload = i.to_be_bytes();
        lab.send_from_proxy(&udp(PROXY_TUN, CLIENT_TUN, 40000, &payload));
        lab.run(Duration::from_millis(1));
    }
    lab.run(Duration::from_millis(100));
    let received: Vec<u32> = lab
        .client_tun
        .iter()
        .map(|p| u32::from_be_bytes(p[p.len() - 4..].try_into().unwrap()))
        .collect();
    assert_eq!(received, (0..500).collect::<Vec<_>>());
    assert!(
        lab.client.counters().duplicates > 300,
        "{:?}",
        lab.client.counters()
    );
}

#[test]
fn an_exhausted_pool_refuses_the_handshake() {
    // A /30 has two hosts: the proxy end's address and one client.
    let mut lab = Lab::new(
        RoutingTable::default(),
        RoutingTable::default(),
        "10.200.0.0/30",
    );
    lab.run(Duration::from_millis(600));
    assert_eq!(lab.client.assignment().unwrap().client, CLIENT_TUN);

    let mut second = Node::new(
        NodeConfig::new(
            NodeId([2, 0, 0, 0, 0, 0xc2]),
            Role::Client {
                proxy_endpoints: vec![proxy_addr(1)],
            },
        ),
        SplitMix64::new(3),
    );
    let now = lab.now;
    second.handle_interface_up(
        now,
        InterfaceId(1),
        "c1",
        SocketAddr::new([10, 0, 1, 3].into(), 5000),
    );
    second.handle_timeout(now);
    let query = second.poll_transmit(now).expect("handshake query");
    lab.proxy.handle_datagram(
        now,
        InterfaceId(1),
        SocketAddr::new([10, 0, 1, 3].into(), 5000),
        query.bytes,
    );
    let events: Vec<NodeEvent> = std::iter::from_fn(|| lab.proxy.poll_event()).collect();
    assert!(events.contains(&NodeEvent::PoolExhausted {
        node: NodeId([2, 0, 0, 0, 0, 0xc2])
    }));
    let confirmations = std::iter::from_fn(|| lab.proxy.poll_transmit(now))
        .filter(|d| d.remote.ip() == IpAddr::V4(Ipv4Addr::new(10, 0, 1, 3)))
        .count();
    assert_eq!(confirmations, 0, "no CONFIRM without an address");
}

/// Delivers every datagram the proxy end and the clients have to send, at
/// once, over one link (`p1`/`c1`), until none is left.
fn exchange_on_one_link(
    now: Timestamp,
    proxy: &mut Node<SplitMix64>,
    clients: &mut [(SocketAddr, Node<SplitMix64>)],
) {
    loop {
        let mut moved = false;
        for (address, client) in clients.iter_mut() {
            while let Some(datagram) = client.poll_transmit(now) {
                if datagram.remote == proxy_addr(1) {
                    proxy.handle_datagram(now, InterfaceId(1), *address, datagram.bytes);
                    moved = true;
                }
            }
        }
        while let Some(datagram) = proxy.poll_transmit(now) {
            if let Some((_, client)) = clients.iter_mut().find(|(a, _)| *a == datagram.remote) {
                client.handle_datagram(now, InterfaceId(1), proxy_addr(1), datagram.bytes);
                moved = true;
            }
        }
        if !moved {
            return;
        }
    }
}

#[test]
fn several_clients_are_served_at_once_each_on_its_own_address() {
    let mut now = Timestamp::from_secs(100);
    let mut proxy = Node::new(
        NodeConfig::new(
            PROXY_ID,
            Role::Proxy {
                pool: "10.200.0.0/24".parse().unwrap(),
            },
        ),
        SplitMix64::new(2),
    );
    proxy.handle_interface_up(now, InterfaceId(1), "p1", proxy_addr(1));
    let mut clients: Vec<(SocketAddr, Node<SplitMix64>)> = (0..3u8)
        .map(|i| {
            let address = SocketAddr::new([10, 0, 1, 10 + i].into(), 5000);
            let mut node = Node::new(
                NodeConfig::new(
                    NodeId([2, 0, 0, 0, 1, i]),
                    Role::Client {
                        proxy_endpoints: vec![proxy_addr(1)],
                    },
                ),
                SplitMix64::new(10 + u64::from(i)),
            );
            node.handle_interface_up(now, InterfaceId(1), "c1", address);
            (address, node)
        })
        .collect();
    for _ in 0..600 {
        now += Duration::from_millis(1);
        for node in std::iter::once(&mut proxy).chain(clients.iter_mut().map(|(_, n)| n)) {
            if node.poll_timeout().is_some_and(|t| t <= now) {
                node.handle_timeout(now);
            }
        }
        exchange_on_one_link(now, &mut proxy, &mut clients);
    }

    let tunnel: Vec<Ipv4Addr> = clients
        .iter()
        .map(|(_, c)| c.assignment().expect("every client got an address").client)
        .collect();
    let mut distinct = tunnel.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "one address each: {tunnel:?}");
    assert!(!tunnel.contains(&PROXY_TUN), "the proxy end keeps its own");
    assert_eq!(
        proxy
            .clients()
            .into_iter()
            .map(|(_, a)| a)
            .collect::<Vec<_>>(),
        distinct
    );

    // Each client sends from its address and gets its own answer back, and
    // only its own.
    for (i, (_, client)) in clients.iter_mut().enumerate() {
        let request = udp(tunnel[i], PROXY_TUN, 53, &[i as u8]);
        client.handle_tun_packet(now, [vec![0u8; HEADROOM], request].concat());
    }
    exchange_on_one_link(now, &mut proxy, &mut clients);
    let received: Vec<Ipv4Addr> = std::iter::from_fn(|| proxy.poll_tun())
        .map(|p| Ipv4Addr::from(<[u8; 4]>::try_from(&p.packet()[12..16]).unwrap()))
        .collect();
    assert_eq!(received, tunnel, "the requests arrive with their sources");
    for (i, address) in tunnel.iter().enumerate().rev() {
        let reply = build::ipv4_udp(PROXY_TUN, *address, 53, 40000, &[i as u8]);
        proxy.handle_tun_packet(now, [vec![0u8; HEADROOM], reply].concat());
    }
    exchange_on_one_link(now, &mut proxy, &mut clients);
    for (i, (_, client)) in clients.iter_mut().enumerate() {
        let delivered: Vec<Vec<u8>> =
            std::iter::from_fn(|| client.poll_tun().map(|p| p.packet().to_vec())).collect();
        assert_eq!(delivered.len(), 1, "client {i} got exactly its reply");
        assert_eq!(&delivered[0][16..20], &tunnel[i].octets());
        assert_eq!(delivered[0].last(), Some(&(i as u8)));
        assert_eq!(client.session_count(), 1);
    }
    assert_eq!(proxy.session_count(), 3);
}

/// A data datagram `node` sends for `packet`, taken off its output.
fn datagram_for(node: &mut Node<SplitMix64>, now: Timestamp, packet: &[u8]) -> Vec<u8> {
    node.handle_tun_packet(now, [vec![0u8; HEADROOM], packet.to_vec()].concat());
    node.poll_transmit(now).expect("sent").bytes
}

/// How a datagram is damaged: its CM flags replaced, bytes flipped, then cut
/// to a length and grown by extra bytes.
#[derive(Debug, Clone)]
struct Damage {
    flags: u8,
    flips: Vec<(usize, u8)>,
    cut: usize,
    extra: Vec<u8>,
}

impl Damage {
    fn apply(&self, mut datagram: Vec<u8>) -> Vec<u8> {
        datagram[mpip_proxy::wire::field::FLAGS] = self.flags;
        for (at, value) in &self.flips {
            if let Some(byte) = datagram.get_mut(*at) {
                *byte ^= value;
            }
        }
        datagram.truncate(self.cut.max(1));
        datagram.extend_from_slice(&self.extra);
        datagram
    }
}

fn damage() -> impl proptest::strategy::Strategy<Value = Damage> {
    use proptest::prelude::*;
    (
        any::<u8>(),
        proptest::collection::vec((0usize..120, any::<u8>()), 0..6),
        0usize..160,
        proptest::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(flags, flips, cut, extra)| Damage {
            flags,
            flips,
            cut,
            extra,
        })
}

/// A connected lab; with `compressed`, a session both ends know, so data
/// packets of it travel compressed.
fn lab_with_session(compressed: bool, request: &[u8]) -> Lab {
    let mut lab = connected_lab(RoutingTable::default(), RoutingTable::default());
    if compressed {
        lab.send_from_client(request);
        lab.run(Duration::from_millis(30));
        lab.send_from_proxy(&with_df(build::ipv4_udp(
            PROXY_TUN, CLIENT_TUN, 53, 40000, b"a",
        )));
        lab.run(Duration::from_millis(30));
        lab.proxy_tun.clear();
        lab.client_tun.clear();
    }
    lab
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

    /// Whatever arrives from a known peer's address, flipped, cut short or
    /// grown (a CM block with any flags or node ID, a compressed packet
    /// without its header, a bogus address list), the proxy end neither
    /// panics nor hands its TUN anything but a well-formed IP packet from an
    /// address its sender holds, and it still serves the client afterwards.
    /// (A node ID the proxy end does not know may adopt a free pool address,
    /// as a client does after the proxy end restarted: `PROTOCOL.md` §4.2.)
    #[test]
    fn damaged_datagrams_to_the_proxy_end_are_dropped_not_fatal(
        damage in damage(),
        compressed in proptest::prelude::any::<bool>(),
    ) {
        let request = with_df(udp(CLIENT_TUN, PROXY_TUN, 53, b"query"));
        let mut lab = lab_with_session(compressed, &request);
        let datagram = damage.apply(datagram_for(&mut lab.client, lab.now, &request));
        lab.proxy.handle_datagram(lab.now, InterfaceId(1), client_addr(1), datagram);
        lab.run(Duration::from_millis(60));
        for packet in &lab.proxy_tun {
            let inner = mpip_proxy::packet::InnerPacket::parse(packet);
            proptest::prop_assert!(inner.is_ok(), "delivered {packet:02x?}");
            let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            let holders = lab.proxy.clients();
            proptest::prop_assert!(
                holders.iter().any(|(_, address)| *address == source),
                "{source} is held by none of {holders:?}"
            );
        }
        lab.proxy_tun.clear();
        let later = with_df(udp(CLIENT_TUN, PROXY_TUN, 53, b"still here"));
        lab.send_from_client(&later);
        lab.run(Duration::from_millis(60));
        proptest::prop_assert_eq!(lab.proxy_tun, vec![later]);
    }

    /// The same for the client: damaged datagrams from the proxy end's
    /// address never panic it, what reaches its TUN is well-formed and for
    /// its own address, and the tunnel still works afterwards.
    #[test]
    fn damaged_datagrams_to_the_client_are_dropped_not_fatal(
        damage in damage(),
        compressed in proptest::prelude::any::<bool>(),
    ) {
        let request = with_df(udp(CLIENT_TUN, PROXY_TUN, 53, b"query"));
        let mut lab = lab_with_session(compressed, &request);
        let reply = with_df(build::ipv4_udp(PROXY_TUN, CLIENT_TUN, 53, 40000, b"reply"));
        let datagram = damage.apply(datagram_for(&mut lab.proxy, lab.now, &reply));
        // Damage that makes a well-formed address assignment changes
        // nothing either: it answers no ENABLE of the client's (its Packet
        // Sequence is no handshake nonce).
        lab.client.handle_datagram(lab.now, InterfaceId(1), proxy_addr(1), datagram);
        lab.run(Duration::from_millis(60));
        for packet in &lab.client_tun {
            let inner = mpip_proxy::packet::InnerPacket::parse(packet);
            proptest::prop_assert!(inner.is_ok(), "delivered {packet:02x?}");
            proptest::prop_assert_eq!(&packet[16..20], &CLIENT_TUN.octets());
        }
        proptest::prop_assert_eq!(lab.client.assignment().map(|a| a.client), Some(CLIENT_TUN));
        lab.client_tun.clear();
        let later = with_df(build::ipv4_udp(PROXY_TUN, CLIENT_TUN, 53, 40000, b"still here"));
        lab.send_from_proxy(&later);
        lab.run(Duration::from_millis(60));
        proptest::prop_assert_eq!(lab.client_tun, vec![later]);
    }
}

/// Capacity (issue 16): one proxy end serves 5,000 client nodes at once,
/// each with two interfaces of its own on two links. Every client gets its
/// own pool address, both its paths come up (path IDs are per peer: every
/// client's paths are numbered from 1), and a request from each and a reply
/// to each reach exactly the right node: no cross-talk.
#[test]
fn five_thousand_clients_are_served_at_once_without_cross_talk() {
    const CLIENTS: u16 = 5000;
    let started = std::time::Instant::now();
    let mut now = Timestamp::from_secs(100);
    let mut proxy = Node::new(
        NodeConfig::new(
            PROXY_ID,
            Role::Proxy {
                pool: "10.200.0.0/16".parse().unwrap(),
            },
        ),
        SplitMix64::new(2),
    );
    for link in 1..=2u8 {
        proxy.handle_interface_up(
            now,
            InterfaceId(link.into()),
            &format!("p{link}"),
            proxy_addr(link),
        );
    }
    // Client i is on link k at 10.k.(i >> 8).(i & 0xff), port 5000.
    let address = |i: u16, link: u8| {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, link, (i >> 8) as u8, i as u8)),
            5000,
        )
    };
    let mut clients: Vec<Node<SplitMix64>> = (0..CLIENTS)
        .map(|i| {
            let mut node = Node::new(
                NodeConfig::new(
                    NodeId([2, 1, 0, 0, (i >> 8) as u8, i as u8]),
                    Role::Client {
                        proxy_endpoints: vec![proxy_addr(1)],
                    },
                ),
                SplitMix64::new(100 + u64::from(i)),
            );
            for link in 1..=2u8 {
                node.handle_interface_up(
                    now,
                    InterfaceId(link.into()),
                    &format!("c{link}"),
                    address(i, link),
                );
            }
            node
        })
        .collect();
    // The client owning a link address, if any.
    let owner = |remote: SocketAddr| -> Option<(usize, u8)> {
        let IpAddr::V4(v4) = remote.ip() else {
            return None;
        };
        let [ten, link, hi, lo] = v4.octets();
        let i = (u16::from(hi) << 8) | u16::from(lo);
        (ten == 10 && (1..=2).contains(&link) && i < CLIENTS && remote.port() == 5000)
            .then_some((usize::from(i), link))
    };
    // Zero-delay links: a datagram reaches the other end of its link at once;
    // one addressed to a host on another link is lost.
    let exchange = |now: Timestamp,
                    proxy: &mut Node<SplitMix64>,
                    clients: &mut [Node<SplitMix64>]| loop {
        let mut moved = false;
        for (i, client) in clients.iter_mut().enumerate() {
            while let Some(d) = client.poll_transmit(now) {
                let link = u8::try_from(d.interface.0).unwrap();
                if d.remote == proxy_addr(link) {
                    let from = address(u16::try_from(i).unwrap(), link);
                    proxy.handle_datagram(now, d.interface, from, d.bytes);
                    moved = true;
                }
            }
        }
        while let Some(d) = proxy.poll_transmit(now) {
            let link = u8::try_from(d.interface.0).unwrap();
            if let Some((i, on)) = owner(d.remote).filter(|(_, on)| *on == link) {
                clients[i].handle_datagram(now, InterfaceId(on.into()), proxy_addr(link), d.bytes);
                moved = true;
            }
        }
        if !moved {
            return;
        }
    };
    for _ in 0..200 {
        now += Duration::from_millis(5);
        for node in std::iter::once(&mut proxy).chain(clients.iter_mut()) {
            if node.poll_timeout().is_some_and(|t| t <= now) {
                node.handle_timeout(now);
            }
        }
        exchange(now, &mut proxy, &mut clients);
    }

    let tunnel: Vec<Ipv4Addr> = clients
        .iter()
        .map(|c| c.assignment().expect("every client got an address").client)
        .collect();
    let mut distinct = tunnel.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), usize::from(CLIENTS), "one address each");
    assert!(!tunnel.contains(&PROXY_TUN));
    assert_eq!(proxy.clients().len(), usize::from(CLIENTS));
    assert_eq!(proxy.peer_count(), usize::from(CLIENTS));
    let active: Vec<_> = proxy
        .path_snapshots()
        .into_iter()
        .filter(|p| p.state == PathState::Active)
        .collect();
    assert_eq!(
        active.len(),
        2 * usize::from(CLIENTS),
        "two active paths per client"
    );
    assert!(
        active.iter().all(|p| p.path.0 <= 4),
        "path IDs are per peer (at most four pairs per client)"
    );
    for client in &clients {
        let up = client
            .path_snapshots()
            .iter()
            .filter(|p| p.state == PathState::Active)
            .count();
        assert_eq!(up, 2, "both of a client's paths are active");
    }

    // A request from every client, then a reply to every client.
    for (i, client) in clients.iter_mut().enumerate() {
        let request = udp(tunnel[i], PROXY_TUN, 53, &(i as u32).to_be_bytes());
        client.handle_tun_packet(now, [vec![0u8; HEADROOM], request].concat());
    }
    exchange(now, &mut proxy, &mut clients);
    let mut requests = 0;
    while let Some(packet) = proxy.poll_tun() {
        let p = packet.packet();
        let source = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
        let i = u32::from_be_bytes(p[p.len() - 4..].try_into().unwrap()) as usize;
        assert_eq!(
            source, tunnel[i],
            "request {i} arrives from its own address"
        );
        requests += 1;
    }
    assert_eq!(requests, usize::from(CLIENTS));
    for (i, address) in tunnel.iter().enumerate() {
        let reply = build::ipv4_udp(PROXY_TUN, *address, 53, 40000, &(i as u32).to_be_bytes());
        proxy.handle_tun_packet(now, [vec![0u8; HEADROOM], reply].concat());
    }
    exchange(now, &mut proxy, &mut clients);
    for (i, client) in clients.iter_mut().enumerate() {
        let delivered: Vec<Vec<u8>> =
            std::iter::from_fn(|| client.poll_tun().map(|p| p.packet().to_vec())).collect();
        assert_eq!(delivered.len(), 1, "client {i} got exactly one packet");
        let p = &delivered[0];
        assert_eq!(&p[16..20], &tunnel[i].octets(), "addressed to client {i}");
        assert_eq!(
            u32::from_be_bytes(p[p.len() - 4..].try_into().unwrap()) as usize,
            i,
            "client {i} got its own reply"
        );
    }
    assert_eq!(proxy.session_count(), usize::from(CLIENTS));
    assert_eq!(proxy.counters().no_route + proxy.counters().no_path, 0);
    eprintln!(
        "5000 clients: handshake, discovery, a request and a reply each in {:?} of CPU",
        started.elapsed()
    );
}

/// Live coordinated routing (Fig. 9 switched at run time): two sessions
/// spread over both paths, then the proxy end switches to a table pinning
/// one to each path, mid-stream. Every packet arrives, and after the switch
/// each session's packets use only its path.
#[test]
fn switching_the_routing_table_mid_stream_loses_nothing() {
    let mut lab = connected_lab(RoutingTable::default(), RoutingTable::default());
    let pin = |port: u16, path: &str| RoutingRule {
        port: Some(port),
        path: Some(path.to_owned()),
        ..RoutingRule::default()
    };
    let coordinated = RoutingTable {
        default: Priority::ThroughputFirst,
        rules: vec![pin(80, "p1"), pin(8080, "p2")],
    };
    let send = |lab: &mut Lab, from: u32, to: u32| {
        for i in from..to {
            let port = if i % 2 == 0 { 80 } else { 8080 };
            let mut payload = vec![0u8; 400];
            payload[..4].copy_from_slice(&i.to_be_bytes());
            lab.send_from_proxy(&build::ipv4_udp(
                PROXY_TUN, CLIENT_TUN, port, 40000, &payload,
            ));
            lab.run(Duration::from_millis(1));
        }
    };
    send(&mut lab, 0, 300);
    let before = lab.carried;
    assert!(
        before[0][0] > 100 && before[1][0] > 100,
        "all-paths spread both sessions: {before:?}"
    );
    lab.proxy.set_routing(coordinated.clone());
    assert_eq!(lab.proxy.routing(), &coordinated);
    send(&mut lab, 300, 600);
    lab.run(Duration::from_millis(100));
    let received: Vec<u32> = lab
        .client_tun
        .iter()
        .map(|p| u32::from_be_bytes(p[28..32].try_into().unwrap()))
        .collect();
    let mut sorted = received.clone();
    sorted.sort();
    assert_eq!(sorted, (0..600).collect::<Vec<_>>(), "every packet, once");
    let after = [
        lab.carried[0][0] - before[0][0],
        lab.carried[1][0] - before[1][0],
    ];
    // 150 packets per session after the switch, plus a few control packets.
    assert!(
        (150..160).contains(&after[0]),
        "p1 after the switch: {after:?}"
    );
    assert!(
        (150..160).contains(&after[1]),
        "p2 after the switch: {after:?}"
    );
    assert_eq!(lab.proxy.counters().no_path, 0);
}

/// The re-sequencing timeout follows the paths' delay spread: with one path
/// 200 ms slower, segments sent over both arrive at the TUN device in order
/// (a fixed 50 ms would release the fast path's segments long before the
/// slow path's predecessors arrive, and TCP would see reordering).
#[test]
fn resequencing_waits_for_the_slower_path() {
    let mut lab = Lab::new(
        RoutingTable::default(),
        RoutingTable::default(),
        "10.200.0.0/24",
    );
    lab.delay = [Duration::from_millis(10), Duration::from_millis(210)];
    lab.run(Duration::from_millis(1500));
    let segment = |sequence: u32| {
        build::ipv4_tcp(
            PROXY_TUN,
            CLIENT_TUN,
            3128,
            40000,
            sequence,
            mpip_proxy::packet::TCP_ACK,
            &[],
            &[7u8; 100],
        )
    };
    // One segment per 4 ms: the 200 ms spread holds at most about 50, within
    // the buffer's 100.
    for i in 0..300u32 {
        lab.send_from_proxy(&segment(1000 + 100 * i));
        lab.run(Duration::from_millis(4));
    }
    lab.run(Duration::from_millis(1500));
    let sequences: Vec<u32> = lab
        .client_tun
        .iter()
        .map(|p| u32::from_be_bytes(p[24..28].try_into().unwrap()))
        .collect();
    assert_eq!(sequences.len(), 300);
    let late = lab.carried[1][0];
    assert!(late > 20, "some segments took the slow path: {late}");
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "delivered in order: {:?}",
        sequences.windows(2).find(|w| w[0] >= w[1])
    );
}
