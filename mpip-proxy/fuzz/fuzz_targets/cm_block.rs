//! Fuzzes the CM block codec: untrusted bytes must never panic, and whatever
//! parses must re-emit to a block that parses to the same representation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mpip_proxy::fuzz::cm_block(data));
