//! The bodies of the cargo-fuzz targets in `fuzz/`, as library functions so `cargo test` replays the
//! checked-in corpora through exactly the code the fuzzer runs (`tests/fuzz_corpus.rs`).
//!
//! Adding a target: write `pub fn NAME(data: &[u8])` here, a `fuzz/fuzz_targets/NAME.rs` that calls
//! it, a `[[bin]]` in `fuzz/Cargo.toml`, a seed in `fuzz/corpus/NAME/`, and a row in the replay test.

use std::time::Duration;

use crate::capture::{self, CaptureFile, LinkType};
use crate::wire::mptcp::MptcpRepr;
use crate::Tracker;

/// The MPTCP option decoder: no panic, and whatever parses re-emits to the same value.
pub fn mptcp_option(data: &[u8]) {
    if let Ok(repr) = MptcpRepr::from_bytes(data) {
        let bytes = repr.to_bytes();
        assert_eq!(MptcpRepr::from_bytes(&bytes), Ok(repr));
    }
}

/// The whole pipeline: capture file reader, link and IP decoding, tracker.
pub fn packet(data: &[u8]) {
    let mut tracker = Tracker::default();
    if let Ok(Some(segment)) = capture::decode_frame(LinkType::RawIp, data) {
        tracker.handle_segment(Duration::from_secs(1), &segment);
    }
    if let Ok(mut file) = CaptureFile::parse(data) {
        while let Ok(Some(frame)) = file.next_frame() {
            if let Ok(Some(segment)) = capture::decode_frame(frame.link, frame.data) {
                tracker.handle_segment(frame.timestamp, &segment);
            }
        }
    }
    while tracker.poll_event().is_some() {}
}
