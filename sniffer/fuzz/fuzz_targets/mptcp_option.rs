//! Fuzz the MPTCP option decoder: no panic, and whatever parses re-emits to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mptcp_sniffer::wire::mptcp::MptcpRepr;

fuzz_target!(|data: &[u8]| {
    if let Ok(repr) = MptcpRepr::from_bytes(data) {
        let bytes = repr.to_bytes();
        assert_eq!(MptcpRepr::from_bytes(&bytes), Ok(repr));
    }
});
