//! Fuzz the whole pipeline: capture file reader, link and IP decoding, tracker.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mptcp_sniffer::capture::{self, CaptureFile, LinkType};
use mptcp_sniffer::Tracker;

fuzz_target!(|data: &[u8]| {
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
});
