//! Fuzz the MPTCP option decoder: no panic, and whatever parses re-emits to the same value.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mptcp_sniffer::fuzz::mptcp_option(data));
