//! Fuzz the configuration parser and its validation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mptcp_proxy::fuzz::config(data));
