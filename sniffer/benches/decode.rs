//! Benchmarks: MPTCP option parsing, and decode + track over a real capture held in memory.
//!
//! `cargo bench -p mptcp-sniffer --bench decode` (target: ≥ 2 M packets/s on one core for
//! decode + track).

use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_main, Criterion, Throughput};
use mptcp_sniffer::capture::{self, CaptureFile};
use mptcp_sniffer::wire::mptcp::{MptcpRepr, OPTION_KIND};
use mptcp_sniffer::Tracker;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// Every MPTCP option of the captures, as bytes.
fn options() -> Vec<Vec<u8>> {
    let mut options = Vec::new();
    for name in [
        "pymptcpanalyzer/iperf-mptcp-0-0.pcap",
        "tcpdump/mptcp-v1.pcap",
        "crafted/crafted.pcap",
    ] {
        let data = fixture(name);
        let mut file = CaptureFile::parse(&data).unwrap();
        while let Some(frame) = file.next_frame().unwrap() {
            if let Ok(Some(segment)) = capture::decode_frame(frame.link, frame.data) {
                for option in segment.tcp_options().flatten() {
                    if option.kind == OPTION_KIND {
                        options.push(option.bytes.to_vec());
                    }
                }
            }
        }
    }
    options
}

fn parse_options(c: &mut Criterion) {
    let options = options();
    let mut group = c.benchmark_group("mptcp_option");
    group.throughput(Throughput::Elements(options.len() as u64));
    group.bench_function("parse", |b| {
        b.iter(|| {
            let mut parsed = 0usize;
            for option in &options {
                if MptcpRepr::from_bytes(black_box(option)).is_ok() {
                    parsed += 1;
                }
            }
            parsed
        })
    });
    group.finish();
}

fn decode_and_track(c: &mut Criterion) {
    let data = fixture("pymptcpanalyzer/iperf-mptcp-0-0.pcap");
    let frames = {
        let mut file = CaptureFile::parse(&data).unwrap();
        let mut count = 0u64;
        while file.next_frame().unwrap().is_some() {
            count += 1;
        }
        count
    };
    let mut group = c.benchmark_group("capture");
    group.throughput(Throughput::Elements(frames));
    group.bench_function("decode_and_track_iperf", |b| {
        b.iter(|| {
            let mut tracker = Tracker::default();
            let mut file = CaptureFile::parse(black_box(&data)).unwrap();
            let mut events = 0usize;
            while let Some(frame) = file.next_frame().unwrap() {
                if let Ok(Some(segment)) = capture::decode_frame(frame.link, frame.data) {
                    tracker.handle_segment(frame.timestamp, &segment);
                }
                while tracker.poll_event().is_some() {
                    events += 1;
                }
            }
            events
        })
    });
    group.finish();
}

mod groups {
    #![allow(missing_docs)]
    use super::{decode_and_track, parse_options};
    criterion::criterion_group!(benches, parse_options, decode_and_track);
}

criterion_main!(groups::benches);
