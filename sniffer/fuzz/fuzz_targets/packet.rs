//! Fuzz the whole pipeline: capture file reader, link and IP decoding, tracker.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mptcp_sniffer::fuzz::packet(data));
