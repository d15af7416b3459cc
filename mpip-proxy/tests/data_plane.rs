//! The sans-IO pieces composed on a simulated two-path link, with a simulated
//! clock: Table IV classification → scheduler → CM codec → (delay) → CM codec →
//! session table → de-duplication / re-sequencing.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use mpip_proxy::mss::{clamp_for_path, clamp_syn, IpVersion, MssRewrite};
use mpip_proxy::packet::{build, InnerPacket, TCP_ACK, TCP_SYN};
use mpip_proxy::resequencer::{Resequencer, ResequencerConfig};
use mpip_proxy::routing::{PacketClass, RoutingTable};
use mpip_proxy::scheduler::{DedupWindow, Mode, Scheduler, SchedulerConfig, Selection, SplitMix64};
use mpip_proxy::table::path::PathTable;
use mpip_proxy::table::session::SessionTable;
use mpip_proxy::time::Timestamp;
use mpip_proxy::wire::{CmFlags, CmPacket, CmRepr, NodeId, PathId};

const CLIENT: NodeId = NodeId([2, 0, 0, 0, 0, 1]);
const PROXY: NodeId = NodeId([2, 0, 0, 0, 0, 2]);
const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 80);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// Two paths with one-way delays of 25 ms (path 1) and 5 ms (path 2), with
/// matching delay samples already fed back.
fn path_table() -> (PathTable, [(PathId, Duration); 2]) {
    let mut table = PathTable::new();
    let delays = [
        (PathId(1), Duration::from_millis(25)),
        (PathId(2), Duration::from_millis(5)),
    ];
    for (id, delay) in delays {
        let local = SocketAddr::new([10, 0, id.0, 2].into(), 4789);
        table.insert(id, local, "198.51.100.1:4789".parse().unwrap());
        table.record_delay(id, i32::try_from(delay.as_micros()).unwrap());
    }
    (table, delays)
}

struct InFlight {
    arrive: Timestamp,
    bytes: Vec<u8>,
}

/// Sends `count` TCP segments of one session from the proxy to the client in
/// `mode`, one per millisecond; returns the sequence numbers in the order the
/// client's transport layer receives them, how many copies were dropped as
/// duplicates, and how many datagrams each path carried.
fn run(mode: Mode, count: u32, resequence: bool) -> (Vec<u32>, usize, [usize; 2]) {
    let (table, delays) = path_table();
    let mut scheduler = Scheduler::new(
        SchedulerConfig::default(),
        RoutingTable::default(),
        SplitMix64::new(2026),
    );
    let mut proxy_sessions = SessionTable::new(PROXY);
    let mut client_sessions = SessionTable::new(CLIENT);
    let mut reseq = Resequencer::new(ResequencerConfig {
        capacity: 100,
        timeout: Duration::from_millis(50),
        max_timeout: Duration::from_millis(50),
    });
    // The stream starts at sequence 1, as the SYN (not simulated) would tell.
    reseq.expect(1);
    let mut dedup = DedupWindow::new();
    let mut wire: Vec<InFlight> = Vec::new();
    let mut delivered = Vec::new();
    let mut duplicates = 0;
    let mut per_path = [0usize; 2];
    let mut now = Timestamp::from_secs(10);
    let mss = 1000u32;
    let mut sent = 0u32;

    while (delivered.len() < count as usize || !wire.is_empty()) && now < Timestamp::from_secs(20) {
        now += Duration::from_millis(1);
        if sent < count {
            let inner = build::ipv4_tcp(
                SERVER,
                CLIENT_IP,
                443,
                50000,
                1 + sent * mss,
                TCP_ACK,
                &[],
                &vec![0u8; mss as usize],
            );
            let info = InnerPacket::parse(&inner).unwrap();
            let session = proxy_sessions
                .outbound(now, CLIENT, info.outbound_tuple())
                .unwrap();
            let selection = scheduler.select(CLIENT, session, &table, &mode);
            let (paths, flags) = match selection {
                Selection::One(p) => (vec![p], CmFlags::NONE),
                Selection::Copies(ps) => (ps, CmFlags::DUPLICATE),
                Selection::NoPath => panic!("no path"),
            };
            for path in paths {
                per_path[usize::from(path.0 - 1)] += 1;
                let repr = CmRepr {
                    flags,
                    node_id: PROXY,
                    session_id: session,
                    path_id: path,
                    feedback: None,
                    timestamp: now.to_wire(),
                    sequence: sent,
                    addresses: vec![],
                    auth: None,
                };
                let delay = delays.iter().find(|(p, _)| *p == path).unwrap().1;
                wire.push(InFlight {
                    arrive: now + delay,
                    bytes: repr.encapsulate(&inner).unwrap(),
                });
            }
            sent += 1;
        }

        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut wire)
            .into_iter()
            .partition(|f| f.arrive <= now);
        wire = later;
        for datagram in due {
            let packet = CmPacket::new_checked(&datagram.bytes[..]).unwrap();
            let repr = CmRepr::parse(&packet).unwrap();
            if repr.flags.contains(CmFlags::DUPLICATE) && !dedup.accept(repr.sequence) {
                duplicates += 1;
                continue;
            }
            let inner = packet.payload().to_vec();
            let info = InnerPacket::parse(&inner).unwrap();
            client_sessions
                .inbound(now, repr.node_id, repr.session_id, info.inbound_tuple())
                .unwrap();
            let tcp = info.tcp.unwrap();
            if resequence {
                reseq.handle_segment(now, tcp.sequence, tcp.sequence_len(), tcp.sequence);
            } else {
                delivered.push((tcp.sequence - 1) / mss);
            }
        }
        reseq.handle_timeout(now);
        while let Some(sequence) = reseq.poll_deliver() {
            delivered.push((sequence - 1) / mss);
        }
    }
    assert_eq!(client_sessions.len(), 1, "one session on the client");
    (delivered, duplicates, per_path)
}

fn inversions(order: &[u32]) -> usize {
    order.windows(2).filter(|w| w[1] < w[0]).count()
}

#[test]
fn all_paths_reorders_and_the_resequencer_restores_order() {
    let (raw, _, per_path) = run(Mode::AllPaths, 300, false);
    assert_eq!(raw.len(), 300);
    assert!(
        per_path.iter().all(|&n| n > 50),
        "both paths used: {per_path:?}"
    );
    assert!(
        inversions(&raw) > 0,
        "two paths with different delays reorder"
    );
    let (ordered, _, _) = run(Mode::AllPaths, 300, true);
    assert_eq!(ordered, (0..300).collect::<Vec<_>>());
}

#[test]
fn single_path_mode_never_reorders() {
    let (order, _, per_path) = run(Mode::SinglePath, 200, false);
    assert_eq!(order, (0..200).collect::<Vec<_>>());
    assert_eq!(per_path, [0, 200], "everything on the 5 ms path");
}

#[test]
fn protected_path_delivers_each_packet_once() {
    let (order, duplicates, per_path) = run(Mode::ProtectedPath, 200, false);
    assert_eq!(per_path, [200, 200]);
    assert_eq!(order, (0..200).collect::<Vec<_>>());
    assert_eq!(
        duplicates, 200,
        "the slow path's copy of every packet is dropped"
    );
}

#[test]
fn routing_table_and_mss_clamp_on_a_syn() {
    let table: RoutingTable = RoutingTable::default();
    let mut syn = build::ipv4_tcp(
        CLIENT_IP,
        SERVER,
        50000,
        443,
        0,
        TCP_SYN,
        &[2, 4, 0x05, 0xb4],
        &[],
    );
    let info = InnerPacket::parse(&syn).unwrap();
    assert_eq!(
        Mode::from(table.classify(&PacketClass::from(&info))),
        Mode::AllPaths
    );
    let max = clamp_for_path(1500, IpVersion::V4, IpVersion::V4).unwrap();
    assert_eq!(
        clamp_syn(&mut syn, max).unwrap(),
        MssRewrite::Clamped {
            from: 1460,
            to: max
        }
    );
    // A full-size segment at the clamped MSS, encapsulated, fits the path MTU.
    let full = build::ipv4_tcp(
        CLIENT_IP,
        SERVER,
        50000,
        443,
        1,
        TCP_ACK,
        &[],
        &vec![0; usize::from(max)],
    );
    let repr = CmRepr {
        flags: CmFlags::NONE,
        node_id: CLIENT,
        session_id: mpip_proxy::wire::SessionId(1),
        path_id: PathId(1),
        feedback: None,
        timestamp: 0,
        sequence: 0,
        addresses: vec![],
        auth: None,
    };
    let udp_payload = repr.encapsulate(&full).unwrap();
    assert_eq!(20 + 8 + udp_payload.len(), 1500);
}
