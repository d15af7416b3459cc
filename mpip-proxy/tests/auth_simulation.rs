//! Authentication (`PROTOCOL.md` §11) on the simulated lab: the hijack of
//! issue 16 first (a forged `CONFIRM|ASSIGN` re-addressed a client), then
//! keys, tags, the replay window, proofs of freshness across restarts, key
//! rotation, keys bound to nodes, handshake rate limits and tagged data.

mod sim;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use mpip_proxy::auth::{Key, KeyRing, RateLimit};
use mpip_proxy::node::{AuthConfig, Node};
use mpip_proxy::path_manager::InterfaceId;
use mpip_proxy::scheduler::SplitMix64;
use mpip_proxy::time::Timestamp;
use mpip_proxy::wire::{AssignmentRepr, CmFlags, CmRepr, NodeId, PathId, SessionId};
use sim::*;

const SECRET: [u8; 32] = [0x5a; 32];
const OTHER_SECRET: [u8; 32] = [0xa5; 32];

fn ring(keys: &[(u8, &[u8], Option<NodeId>)]) -> KeyRing {
    KeyRing::new(
        keys.iter()
            .map(|(id, secret, node)| Key::new(*id, secret, *node).unwrap())
            .collect(),
    )
    .unwrap()
}

fn auth(keys: KeyRing, data: bool, entropy: u64) -> AuthConfig {
    AuthConfig {
        keys: Some(keys),
        data,
        counter_base: 1_700_000_000_000_000,
        entropy,
    }
}

/// A lab whose two ends have `client_keys` and `proxy_keys`.
fn keyed_lab(client_keys: KeyRing, proxy_keys: KeyRing, data: bool) -> Lab {
    let (mut client, mut proxy) = Lab::configs("10.200.0.0/24");
    client.auth = auth(client_keys, data, 11);
    proxy.auth = auth(proxy_keys, data, 22);
    let mut lab = Lab::with_configs(client, proxy);
    lab.run(Duration::from_millis(600));
    lab
}

fn deployment_lab(data: bool) -> Lab {
    keyed_lab(
        ring(&[(1, &SECRET, None)]),
        ring(&[(1, &SECRET, None)]),
        data,
    )
}

/// A forged `CONFIRM|ASSIGN` for `client`, as the attacker sent it:
/// a well-formed assignment of 10.201.0.2 from `node`.
fn forged_assignment(node: NodeId, sequence: u32, auth: Option<(&Key, u64)>) -> Vec<u8> {
    let repr = CmRepr {
        flags: CmFlags::CONFIRM
            .union(CmFlags::HEARTBEAT)
            .union(CmFlags::ASSIGN),
        node_id: node,
        session_id: SessionId::CONTROL,
        path_id: PathId(1),
        feedback: None,
        timestamp: 0,
        sequence,
        addresses: vec![],
        auth: auth.map(|(key, counter)| mpip_proxy::wire::AuthExt {
            key_id: key.id,
            counter,
            tag: [0; 16],
        }),
    };
    let assignment = AssignmentRepr {
        client: Ipv4Addr::new(10, 201, 0, 2),
        proxy: Ipv4Addr::new(10, 201, 0, 1),
        prefix_len: 24,
    };
    let mut bytes = repr.encapsulate(&assignment.to_bytes()).unwrap();
    if let Some((key, _)) = auth {
        key.sign(&mut bytes, repr.buffer_len() - mpip_proxy::wire::AUTH_LEN);
    }
    bytes
}

/// The client still has its address and reaches the proxy end.
fn assert_tunnel_works(lab: &mut Lab) {
    assert_eq!(lab.client.assignment().map(|a| a.client), Some(CLIENT_TUN));
    lab.proxy_tun.clear();
    let request = udp(CLIENT_TUN, PROXY_TUN, 53, b"still mine");
    lab.send_from_client(&request);
    lab.run(Duration::from_millis(60));
    assert_eq!(lab.proxy_tun, vec![request]);
    lab.client_tun.clear();
    let reply = mpip_proxy::packet::build::ipv4_udp(PROXY_TUN, CLIENT_TUN, 53, 40000, b"yes");
    lab.send_from_proxy(&reply);
    lab.run(Duration::from_millis(60));
    assert_eq!(lab.client_tun, vec![reply]);
}

/// Issue 16's hijack, reproduced against the old rule (any well-formed
/// `CONFIRM|ASSIGN` assigned) and shown harmless now, without keys: a
/// random node ID is not the client's proxy end, and the proxy end's own
/// node ID does not help without the nonce of one of the client's ENABLEs.
#[test]
fn forged_assignments_do_not_readdress_a_client_even_without_keys() {
    let mut lab = connected_lab(Default::default(), Default::default());
    for (node, sequence) in [
        (NodeId([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]), 0),
        (PROXY_ID, 0),
        (PROXY_ID, 12345),
    ] {
        for link in 1..=2 {
            lab.client.handle_datagram(
                lab.now,
                InterfaceId(link.into()),
                proxy_addr(link),
                forged_assignment(node, sequence, None),
            );
        }
    }
    lab.run(Duration::from_millis(50));
    let counters = lab.client.counters();
    assert_eq!(
        counters.endpoint_conflict + counters.unsolicited,
        2,
        "the foreign node's: {counters:?}"
    );
    assert_tunnel_works(&mut lab);
}

#[test]
fn keyed_ends_handshake_and_carry_data() {
    let mut lab = deployment_lab(false);
    assert_eq!(lab.client.assignment().map(|a| a.client), Some(CLIENT_TUN));
    assert_tunnel_works(&mut lab);
    let counters = lab.proxy.counters();
    assert_eq!(
        (
            counters.bad_mac,
            counters.replayed,
            counters.unauthenticated
        ),
        (0, 0, 0),
        "{counters:?}"
    );
}

#[test]
fn forged_unauthenticated_and_wrongly_keyed_control_is_dropped_and_counted() {
    let mut lab = deployment_lab(false);
    let attacker_key = Key::new(1, &OTHER_SECRET, None).unwrap();
    let cases: [(Option<(&Key, u64)>, &str); 2] = [
        (None, "unauthenticated"),
        (Some((&attacker_key, u64::MAX / 2)), "bad_mac"),
    ];
    for (key, _) in cases {
        lab.client.handle_datagram(
            lab.now,
            InterfaceId(1),
            proxy_addr(1),
            forged_assignment(PROXY_ID, 0, key),
        );
    }
    let counters = lab.client.counters();
    assert_eq!(counters.unauthenticated, 1, "{counters:?}");
    assert_eq!(counters.bad_mac, 1, "{counters:?}");
    // An ENABLE flood to the proxy end from random node IDs, untagged and
    // badly tagged: nothing is assigned.
    for i in 0..200u32 {
        let node = NodeId([0x42, 0, 0, 0, (i >> 8) as u8, i as u8]);
        let mut enable = CmRepr {
            flags: CmFlags::ENABLE,
            node_id: node,
            session_id: SessionId::CONTROL,
            path_id: PathId(0),
            feedback: None,
            timestamp: 0,
            sequence: i,
            addresses: vec![],
            auth: None,
        };
        let source = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 99)), 7000 + i as u16);
        let plain = enable.encapsulate(&[]).unwrap();
        lab.proxy
            .handle_datagram(lab.now, InterfaceId(1), source, plain);
        enable.auth = Some(mpip_proxy::wire::AuthExt {
            key_id: 1,
            counter: u64::from(i),
            tag: [7; 16],
        });
        let tagged = enable.encapsulate(&[]).unwrap();
        lab.proxy
            .handle_datagram(lab.now, InterfaceId(1), source, tagged);
    }
    lab.run(Duration::from_millis(50));
    assert_eq!(lab.proxy.clients().len(), 1, "no address went to the flood");
    let counters = lab.proxy.counters();
    assert_eq!(counters.unauthenticated, 200, "{counters:?}");
    assert_eq!(
        counters.bad_mac + counters.rate_limited,
        200,
        "{counters:?}"
    );
    assert!(
        counters.bad_mac <= 10,
        "only the burst was checked: {counters:?}"
    );
    assert_tunnel_works(&mut lab);
}

/// Every datagram of a busy minute replayed from the wire (what an
/// attacker on a path records) to both ends: every one is dropped as
/// replayed, and the tunnel is unharmed.
#[test]
fn replayed_datagrams_are_dropped() {
    for data in [false, true] {
        let mut lab = deployment_lab(data);
        lab.record = true;
        for i in 0..50u32 {
            lab.send_from_client(&udp(CLIENT_TUN, PROXY_TUN, 53, &i.to_be_bytes()));
            lab.send_from_proxy(&mpip_proxy::packet::build::ipv4_udp(
                PROXY_TUN,
                CLIENT_TUN,
                53,
                40000,
                &i.to_be_bytes(),
            ));
            lab.run(Duration::from_millis(5));
        }
        lab.run(Duration::from_millis(100));
        lab.record = false;
        let recorded = std::mem::take(&mut lab.recorded);
        assert!(recorded.len() > 100);
        let delivered = (lab.client_tun.len(), lab.proxy_tun.len());
        let before = (lab.client.counters(), lab.proxy.counters());
        for (to_proxy, link, from, bytes) in &recorded {
            let node = if *to_proxy {
                &mut lab.proxy
            } else {
                &mut lab.client
            };
            node.handle_datagram(lab.now, InterfaceId((*link).into()), *from, bytes.clone());
        }
        lab.run(Duration::from_millis(50));
        let replayed = lab.client.counters().replayed - before.0.replayed
            + lab.proxy.counters().replayed
            - before.1.replayed;
        let tagged = recorded.iter().filter(|(_, _, _, b)| b[0] == 2).count() as u64;
        assert_eq!(
            replayed, tagged,
            "every tagged datagram (data tags: {data})"
        );
        if data {
            assert_eq!(tagged, recorded.len() as u64, "everything is tagged");
            assert!(
                (delivered.0, delivered.1) == (lab.client_tun.len(), lab.proxy_tun.len()),
                "nothing replayed reached a TUN device"
            );
        } else {
            // Without data tags, data is authenticated by its path alone:
            // replayed data over the path it used gets through (the
            // transport above drops duplicates), as `PROTOCOL.md` §11 says.
            assert!(tagged > 0 && tagged < recorded.len() as u64);
        }
        assert_tunnel_works(&mut lab);
    }
}

#[test]
fn a_key_bound_to_a_client_authenticates_that_client_only() {
    // The proxy end knows the client's own key, bound to its node ID.
    let proxy_keys = ring(&[(7, &SECRET, Some(CLIENT_ID))]);
    let mut lab = keyed_lab(ring(&[(7, &SECRET, None)]), proxy_keys.clone(), false);
    assert_tunnel_works(&mut lab);
    // Another node with the same secret is refused.
    let (mut config, _) = Lab::configs("10.200.0.0/24");
    config.node_id = NodeId([2, 0, 0, 0, 0, 0xee]);
    config.auth = auth(ring(&[(7, &SECRET, None)]), false, 33);
    let mut impostor = Node::new(config, SplitMix64::new(9));
    let address = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 77)), 5000);
    impostor.handle_interface_up(lab.now, InterfaceId(1), "c1", address);
    impostor.handle_timeout(lab.now);
    while let Some(d) = impostor.poll_transmit(lab.now) {
        if d.remote == proxy_addr(1) {
            lab.proxy
                .handle_datagram(lab.now, InterfaceId(1), address, d.bytes);
        }
    }
    assert_eq!(lab.proxy.counters().unknown_key, 1);
    assert_eq!(lab.proxy.clients().len(), 1);
}

/// Rotation: the proxy end accepts keys 1 and 2 at once; one client still
/// on key 1, another on key 2, both served, each answered with its own key.
#[test]
fn two_keys_are_accepted_during_a_rotation() {
    let both = ring(&[(2, &OTHER_SECRET, None), (1, &SECRET, None)]);
    let mut old = keyed_lab(ring(&[(1, &SECRET, None)]), both.clone(), false);
    assert_tunnel_works(&mut old);
    let mut new = keyed_lab(ring(&[(2, &OTHER_SECRET, None)]), both, false);
    assert_tunnel_works(&mut new);
    // A client that only has key 2 cannot read answers made with key 1:
    // the proxy end answered the new client with key 2.
    assert_eq!(new.client.counters().unknown_key, 0);
    assert_eq!(old.client.counters().unknown_key, 0);
}

/// The proxy end restarts and forgets everything; the client keeps its
/// address. Its untagged data proves nothing and is refused; its tagged
/// datagrams are authentic but no proof of life (they could be replays from
/// before the restart). The client hears nothing back, its paths die
/// (400 ms), their probes reach the proxy end, which challenges them; the
/// client answers at once and data flows again within a second.
#[test]
fn a_restarted_proxy_end_challenges_then_serves_the_client() {
    let mut lab = deployment_lab(false);
    assert_tunnel_works(&mut lab);
    let (_, mut config) = Lab::configs("10.200.0.0/24");
    config.auth = auth(ring(&[(1, &SECRET, None)]), false, 44);
    config.auth.counter_base += 3_000_000;
    let mut restarted = Node::new(config, SplitMix64::new(5));
    for link in 1..=2u8 {
        restarted.handle_interface_up(
            lab.now,
            InterfaceId(link.into()),
            &format!("p{link}"),
            proxy_addr(link),
        );
    }
    lab.proxy = restarted;
    lab.wire.clear();
    lab.proxy_tun.clear();
    let mut first = None;
    for i in 0..400u32 {
        lab.send_from_client(&udp(CLIENT_TUN, PROXY_TUN, 53, &i.to_be_bytes()));
        lab.run(Duration::from_millis(5));
        if first.is_none() && !lab.proxy_tun.is_empty() {
            first = Some((i, lab.proxy.counters()));
        }
    }
    let counters = lab.proxy.counters();
    let (first, then) = first.expect("served again");
    eprintln!(
        "restarted proxy end: served again after {} ms; {counters:?}",
        first * 5
    );
    assert!(first * 5 < 1000, "within a second: {} ms", first * 5);
    assert!(
        counters.unauthenticated > 0,
        "untagged data before: {counters:?}"
    );
    assert_eq!(counters, then, "nothing dropped after");
    assert_eq!(
        lab.proxy.clients(),
        vec![(CLIENT_ID, CLIENT_TUN)],
        "address adopted"
    );
}

/// A restarted client handshakes again with fresh counters, and an old
/// assignment replayed to it (recorded before the restart) is ignored: it
/// answers none of the new client's ENABLEs.
#[test]
fn a_restarted_client_ignores_replayed_assignments() {
    let (mut client_config, mut proxy_config) = Lab::configs("10.200.0.0/24");
    client_config.auth = auth(ring(&[(1, &SECRET, None)]), false, 11);
    proxy_config.auth = auth(ring(&[(1, &SECRET, None)]), false, 22);
    let mut lab = Lab::with_configs(client_config.clone(), proxy_config);
    lab.record = true;
    lab.run(Duration::from_millis(600));
    lab.record = false;
    let old_assignments: Vec<Vec<u8>> = lab
        .recorded
        .iter()
        .filter(|(to_proxy, _, _, b)| !to_proxy && b[1] & 0x40 != 0)
        .map(|(_, _, _, b)| b.clone())
        .collect();
    assert!(!old_assignments.is_empty());
    // The restart: a new process, a later clock.
    client_config.auth.counter_base += 10_000_000;
    client_config.auth.entropy = 99;
    let mut restarted = Node::new(client_config, SplitMix64::new(6));
    let now = lab.now;
    for link in 1..=2u8 {
        restarted.handle_interface_up(
            now,
            InterfaceId(link.into()),
            &format!("c{link}"),
            client_addr(link),
        );
    }
    for bytes in &old_assignments {
        restarted.handle_datagram(now, InterfaceId(1), proxy_addr(1), bytes.clone());
    }
    assert_eq!(
        restarted.assignment(),
        None,
        "a replayed assignment assigns nothing"
    );
    assert_eq!(
        restarted.counters().unsolicited,
        old_assignments.len() as u64
    );
    lab.client = restarted;
    lab.wire.clear();
    lab.run(Duration::from_millis(600));
    assert_tunnel_works(&mut lab);
}

/// With data tags, untagged data and data with a flipped byte are dropped.
#[test]
fn tagged_data_is_checked() {
    let mut lab = deployment_lab(true);
    assert_tunnel_works(&mut lab);
    lab.record = true;
    lab.send_from_client(&udp(CLIENT_TUN, PROXY_TUN, 53, b"tagged"));
    lab.record = false;
    let (_, link, from, mut bytes) = lab.recorded.pop().expect("one datagram");
    assert_eq!(bytes[0], 2, "version 2: tagged");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    lab.proxy
        .handle_datagram(lab.now, InterfaceId(link.into()), from, bytes.clone());
    assert_eq!(lab.proxy.counters().bad_mac, 1);
    // The same packet untagged.
    let untagged = mpip_proxy::wire::CmPacket::new_checked(&bytes[..]).unwrap();
    let mut repr = CmRepr::parse(&untagged).unwrap();
    let inner = untagged.payload().to_vec();
    repr.auth = None;
    lab.proxy.handle_datagram(
        lab.now,
        InterfaceId(link.into()),
        from,
        repr.encapsulate(&inner).unwrap(),
    );
    assert_eq!(lab.proxy.counters().unauthenticated, 1);
    // Tags cost 25 bytes of MTU: the TUN MTU shrinks to match.
    let (mut config, _) = Lab::configs("10.200.0.0/24");
    let plain = config.tun_mtu();
    config.auth = auth(ring(&[(1, &SECRET, None)]), true, 1);
    assert_eq!(config.tun_mtu(), plain - 25);
}

/// The handshake rate limit: one source gets its burst, then waits.
#[test]
fn handshakes_are_rate_limited_per_source() {
    let (client_config, mut proxy_config) = Lab::configs("10.200.0.0/24");
    proxy_config.handshake_limit = RateLimit {
        per_source: 1.0,
        burst: 3.0,
        total: 1000.0,
    };
    let mut proxy = Node::new(proxy_config, SplitMix64::new(3));
    let now = Timestamp::from_secs(50);
    proxy.handle_interface_up(now, InterfaceId(1), "p1", proxy_addr(1));
    let mut client = Node::new(client_config, SplitMix64::new(4));
    client.handle_interface_up(now, InterfaceId(1), "c1", client_addr(1));
    client.handle_timeout(now);
    let enable = client.poll_transmit(now).unwrap().bytes;
    let source = client_addr(1);
    for _ in 0..10 {
        proxy.handle_datagram(now, InterfaceId(1), source, enable.clone());
    }
    assert_eq!(proxy.counters().rate_limited, 7);
    proxy.handle_datagram(now + Duration::from_secs(1), InterfaceId(1), source, enable);
    assert_eq!(
        proxy.counters().rate_limited,
        7,
        "a token back after a second"
    );
}

/// An attacker on a path records a tagged datagram the proxy end never got
/// (the link lost it) and delivers it from its own address: it is authentic
/// and fresh, but it proves nothing about the attacker's address, so no
/// path there becomes active and the proxy end sends the client's traffic
/// only over the client's own paths.
#[test]
fn a_datagram_delivered_from_another_address_makes_no_active_path() {
    let mut lab = deployment_lab(false);
    lab.link_up = [false, false];
    lab.record = true;
    lab.run(Duration::from_secs(16));
    lab.record = false;
    lab.link_up = [true, true];
    let (_, link, _, bytes) = lab
        .recorded
        .iter()
        .find(|(to_proxy, _, _, b)| *to_proxy && b[0] == 2)
        .cloned()
        .expect("a tagged keepalive the proxy end never got");
    let attacker = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 66)), 9999);
    lab.proxy
        .handle_datagram(lab.now, InterfaceId(link.into()), attacker, bytes);
    assert_eq!(lab.proxy.counters().replayed, 0, "fresh and authentic");
    let toward_attacker = |node: &Node<_>| {
        node.path_snapshots()
            .into_iter()
            .find(|p| p.remote == attacker)
            .map(|p| p.state)
    };
    assert!(
        toward_attacker(&lab.proxy)
            .is_some_and(|s| s != mpip_proxy::path_manager::PathState::Active),
        "a path was noted, not made active: {:?}",
        toward_attacker(&lab.proxy)
    );
    // Traffic to the client goes over its own paths only.
    let mut to_attacker = 0;
    for i in 0..200u32 {
        lab.proxy.handle_tun_packet(
            lab.now,
            [
                vec![0u8; lab.proxy.headroom()],
                mpip_proxy::packet::build::ipv4_udp(
                    PROXY_TUN,
                    CLIENT_TUN,
                    53,
                    40000,
                    &i.to_be_bytes(),
                ),
            ]
            .concat(),
        );
        while let Some(d) = lab.proxy.poll_transmit(lab.now) {
            if d.remote == attacker {
                to_attacker += 1;
                assert!(d.bytes.len() < 120, "only control packets to the attacker");
            }
        }
        lab.now += Duration::from_millis(5);
        lab.proxy.handle_timeout(lab.now);
    }
    // The answer, a round of discovery probes, and one more round when the
    // proxy end turned busy: a bounded echo, no data.
    assert!(to_attacker <= 11, "{to_attacker} control packets");
    assert_ne!(
        toward_attacker(&lab.proxy),
        Some(mpip_proxy::path_manager::PathState::Active)
    );
}
