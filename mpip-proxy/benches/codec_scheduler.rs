//! Benchmarks of the CM codec and the scheduler. Run with
//! `cargo bench -p mpip-proxy --bench codec_scheduler`.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_main, Criterion, Throughput};
use mpip_proxy::routing::RoutingTable;
use mpip_proxy::scheduler::{DedupWindow, Mode, Scheduler, SchedulerConfig, SplitMix64};
use mpip_proxy::table::path::PathTable;
use mpip_proxy::wire::{CmFlags, CmPacket, CmRepr, Feedback, NodeId, PathId, SessionId};

fn data_repr() -> CmRepr {
    CmRepr {
        flags: CmFlags::NONE,
        node_id: NodeId([2, 0, 0, 0, 0, 1]),
        session_id: SessionId(42),
        path_id: PathId(3),
        feedback: Some(Feedback {
            path_id: PathId(1),
            delay_us: 12_345,
        }),
        timestamp: 0x1234_5678,
        sequence: 99,
        addresses: Vec::new(),
        auth: None,
    }
}

fn codec(c: &mut Criterion) {
    let repr = data_repr();
    let mut datagram = vec![0u8; repr.buffer_len() + 1400];
    repr.emit(&mut datagram).unwrap();
    let mut group = c.benchmark_group("cm_codec");
    group.throughput(Throughput::Elements(1));
    group.bench_function("emit_data_cm", |b| {
        let mut buf = [0u8; 64];
        b.iter(|| black_box(&repr).emit(black_box(&mut buf)).unwrap())
    });
    group.bench_function("check_and_parse_data_cm", |b| {
        b.iter(|| {
            let packet = CmPacket::new_checked(black_box(&datagram[..])).unwrap();
            CmRepr::parse(&packet).unwrap()
        })
    });
    group.bench_function("check_and_read_fields_zero_copy", |b| {
        b.iter(|| {
            let packet = CmPacket::new_checked(black_box(&datagram[..])).unwrap();
            (
                packet.node_id(),
                packet.session_id(),
                packet.path_id(),
                packet.timestamp(),
                packet.payload().len(),
            )
        })
    });
    let control = CmRepr {
        flags: CmFlags::HEARTBEAT,
        addresses: vec![
            "192.0.2.1:4789".parse::<SocketAddr>().unwrap(),
            "[2001:db8::1]:4789".parse().unwrap(),
        ],
        ..data_repr()
    };
    let control_bytes = control.encapsulate(&[]).unwrap();
    group.bench_function("check_and_parse_control_cm_2_addresses", |b| {
        b.iter(|| {
            let packet = CmPacket::new_checked(black_box(&control_bytes[..])).unwrap();
            CmRepr::parse(&packet).unwrap()
        })
    });
    group.finish();
}

fn paths(n: u8) -> PathTable {
    let mut table = PathTable::new();
    for id in 1..=n {
        let local = SocketAddr::new([10, 0, id, 2].into(), 4789);
        table.insert(PathId(id), local, "198.51.100.1:4789".parse().unwrap());
        table.record_delay(PathId(id), i32::from(id) * 5_000);
    }
    table
}

fn scheduler(c: &mut Criterion) {
    let mut group = c.benchmark_group("scheduler");
    group.throughput(Throughput::Elements(1));
    let node = NodeId([2, 0, 0, 0, 0, 2]);
    for n in [2u8, 4, 16] {
        let table = paths(n);
        let mut s = Scheduler::new(
            SchedulerConfig::default(),
            RoutingTable::default(),
            SplitMix64::new(1),
        );
        group.bench_function(format!("all_paths_select_{n}_paths"), |b| {
            b.iter(|| s.select(node, SessionId(1), black_box(&table), &Mode::AllPaths))
        });
        group.bench_function(format!("single_path_select_{n}_paths"), |b| {
            b.iter(|| s.select(node, SessionId(1), black_box(&table), &Mode::SinglePath))
        });
        let mut adjusted = table.clone();
        group.bench_function(format!("algorithm_1_{n}_paths"), |b| {
            b.iter(|| black_box(&mut adjusted).adjust_weights(10))
        });
    }
    let mut window = DedupWindow::new();
    let mut sequence = 0u32;
    group.bench_function("dedup_window_accept_in_order", |b| {
        b.iter(|| {
            sequence = sequence.wrapping_add(1);
            window.accept(black_box(sequence))
        })
    });
    group.finish();
}

/// The inner packet on the data path: header parsing (every packet, both
/// ends) and the TCP checksum (MSS clamp, TUN offloads).
fn inner(c: &mut Criterion) {
    use mpip_proxy::packet::{build, checksum, InnerPacket, TCP_ACK};
    let source = std::net::Ipv4Addr::new(10, 200, 0, 2);
    let destination = std::net::Ipv4Addr::new(10, 0, 3, 2);
    let timestamps = [1u8, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
    let segment = build::ipv4_tcp(
        source,
        destination,
        40000,
        80,
        7,
        TCP_ACK,
        &timestamps,
        &[0x5a; 1400],
    );
    let ack = build::ipv4_tcp(source, destination, 40000, 80, 7, TCP_ACK, &timestamps, &[]);
    let mut group = c.benchmark_group("inner_packet");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_1400_byte_segment", |b| {
        b.iter(|| InnerPacket::parse(black_box(&segment)).unwrap())
    });
    group.bench_function("parse_ack", |b| {
        b.iter(|| InnerPacket::parse(black_box(&ack)).unwrap())
    });
    group.bench_function("tcp_checksum_1400_byte_segment", |b| {
        b.iter(|| checksum::tcp_checksum_ok(black_box(&segment)).unwrap())
    });
    group.finish();
}

/// What `[auth] data = true` adds per data datagram (1400-byte inner packet):
/// the sender's HMAC-SHA-256 tag, the receiver's check, beside the codec's
/// check and parse of the same datagram.
fn auth(c: &mut Criterion) {
    use mpip_proxy::auth::Key;
    use mpip_proxy::wire::AuthExt;
    let mut repr = data_repr();
    repr.auth = Some(AuthExt {
        key_id: 1,
        counter: 7,
        tag: [0; mpip_proxy::wire::AUTH_TAG_LEN],
    });
    let mut datagram = vec![0x5a; repr.buffer_len() + 1400];
    repr.emit(&mut datagram).unwrap();
    let auth_at = CmPacket::new_checked(&datagram[..]).unwrap().auth_offset();
    let key = Key::new(1, &[7; 32], None).unwrap();
    key.sign(&mut datagram, auth_at);
    let mut group = c.benchmark_group("data_auth_1400_bytes");
    group.throughput(Throughput::Elements(1));
    group.bench_function("check_and_parse_untagged_peer", |b| {
        b.iter(|| {
            let packet = CmPacket::new_checked(black_box(&datagram[..])).unwrap();
            CmRepr::parse(&packet).unwrap()
        })
    });
    group.bench_function("sign", |b| {
        let mut copy = datagram.clone();
        b.iter(|| key.sign(black_box(&mut copy), auth_at))
    });
    group.bench_function("verify", |b| {
        b.iter(|| assert!(key.verify(black_box(&datagram), auth_at)))
    });
    group.finish();
}

mod groups {
    // criterion_group! generates an undocumented public function.
    #![allow(missing_docs)]
    use super::{auth, codec, inner, scheduler};
    criterion::criterion_group!(benches, codec, scheduler, inner, auth);
}

criterion_main!(groups::benches);
