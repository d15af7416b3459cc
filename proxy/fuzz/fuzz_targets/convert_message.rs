//! Fuzzes RFC 8803 Convert messages: the wire parser and the converter's decisions on untrusted bytes
//! must never panic, and whatever parses must re-emit to a message that parses the same.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mptcp_proxy::fuzz::convert_message(data));
