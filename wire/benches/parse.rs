//! This crate against etherparse (the well-kept crate made for the job), on
//! the same packets: the IP packets of the sniffer's real MPTCP captures
//! (headers, TCP, every option walked) and MPIP-like inner packets (full
//! segments and pure ACKs). `cargo bench -p mptcp-wire --bench parse`.

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_main, Criterion, Throughput};
use mptcp_wire::{IpHeader, TcpHeader, TcpOptionIter};

/// The IP packets of a classic pcap file (Ethernet, PPP, Linux cooked, raw).
fn pcap_packets(path: &Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).unwrap();
    let little = data[..4] == [0xd4, 0xc3, 0xb2, 0xa1];
    let u32_at = |at: usize| {
        let b = [data[at], data[at + 1], data[at + 2], data[at + 3]];
        if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        }
    };
    let link_header = match u32_at(20) {
        1 => 14,
        9 => 4,
        113 => 16,
        101 => 0,
        other => panic!("link type {other}"),
    };
    let mut packets = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let caplen = u32_at(at + 8) as usize;
        let frame = &data[at + 16..(at + 16 + caplen).min(data.len())];
        at += 16 + caplen;
        if let Some(ip) = frame.get(link_header..) {
            if matches!(ip.first().map(|b| b >> 4), Some(4 | 6)) {
                packets.push(ip.to_vec());
            }
        }
    }
    packets
}

fn capture_packets() -> Vec<Vec<u8>> {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sniffer/tests/fixtures");
    [
        "pymptcpanalyzer/iperf-mptcp-0-0.pcap",
        "tcpdump/mptcp-v1.pcap",
    ]
    .iter()
    .flat_map(|name| pcap_packets(&fixtures.join(name)))
    .collect()
}

/// MPIP's inner packets: a 1400-byte segment and a pure ACK with timestamps.
fn inner_packets() -> Vec<Vec<u8>> {
    let tcp = |payload: usize| {
        let options = [1u8, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let total = 20 + 20 + options.len() + payload;
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = 6;
        p[12..16].copy_from_slice(&[10, 200, 0, 2]);
        p[16..20].copy_from_slice(&[10, 0, 3, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        p[32] = 8 << 4;
        p[33] = 0x10;
        p[40..52].copy_from_slice(&options);
        p
    };
    vec![tcp(1400), tcp(0)]
}

/// Ours: IP header, TCP header, every option.
fn ours(packet: &[u8]) -> usize {
    let Ok(ip) = IpHeader::parse(packet) else {
        return 0;
    };
    if ip.protocol != 6 || !ip.first_fragment {
        return 1;
    }
    let Ok(tcp) = TcpHeader::parse(&packet[ip.transport_offset..]) else {
        return 1;
    };
    let options = TcpOptionIter::new(tcp.options).flatten().count();
    (tcp.source_port as usize) ^ (tcp.sequence as usize) ^ options
}

/// etherparse: the same work.
fn theirs(packet: &[u8]) -> usize {
    let Ok(sliced) = etherparse::SlicedPacket::from_ip(packet) else {
        return 0;
    };
    let Some(etherparse::TransportSlice::Tcp(tcp)) = sliced.transport else {
        return 1;
    };
    let options = tcp.options_iterator().flatten().count();
    (tcp.source_port() as usize) ^ (tcp.sequence_number() as usize) ^ options
}

fn compare(c: &mut Criterion) {
    for (name, packets) in [
        ("captures", capture_packets()),
        ("mpip_inner", inner_packets()),
    ] {
        let mut group = c.benchmark_group(format!("ip_tcp_parse_{name}"));
        group.throughput(Throughput::Elements(packets.len() as u64));
        group.bench_function("mptcp_wire", |b| {
            b.iter(|| packets.iter().map(|p| ours(black_box(p))).sum::<usize>())
        });
        group.bench_function("etherparse", |b| {
            b.iter(|| packets.iter().map(|p| theirs(black_box(p))).sum::<usize>())
        });
        group.finish();
    }
    let segment = &inner_packets()[0][20..];
    let mut group = c.benchmark_group("checksum_1432_bytes");
    group.throughput(Throughput::Bytes(segment.len() as u64));
    group.bench_function("mptcp_wire", |b| {
        b.iter(|| mptcp_wire::checksum::checksum(black_box(segment)))
    });
    group.bench_function("etherparse", |b| {
        b.iter(|| {
            etherparse::checksum::Sum16BitWords::new()
                .add_slice(black_box(segment))
                .ones_complement()
        })
    });
    group.finish();
}

fn benches() {
    let mut criterion = Criterion::default().configure_from_args();
    compare(&mut criterion);
}

criterion_main!(benches);
