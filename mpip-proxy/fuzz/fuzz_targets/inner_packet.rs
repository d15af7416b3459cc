//! Fuzzes inner-packet parsing and SYN MSS clamping: never panic, and a clamped
//! SYN keeps a valid TCP checksum.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mpip_proxy::fuzz::inner_packet(data));
