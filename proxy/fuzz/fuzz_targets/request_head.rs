//! Fuzz the request-head scanner and the target, port, framing and header parsers behind it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mptcp_proxy::fuzz::request_head(data));
