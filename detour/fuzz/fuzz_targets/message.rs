//! Fuzzes the NAT detour message: untrusted bytes never panic; whatever parses re-emits to bytes that
//! parse to the same representation; a version 2 message never verifies under a key that did not sign
//! it (here: a fixed key, over bytes the fuzzer chose).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mptcp_detour::key::Psk;
use mptcp_detour::wire::{Packet, Repr};

fuzz_target!(|data: &[u8]| {
    let Ok(packet) = Packet::new_checked(data) else {
        return;
    };
    let Ok(repr) = Repr::parse(&packet) else {
        return;
    };
    let bytes = repr.to_bytes();
    let again = Packet::new_checked(&bytes[..]).expect("emitted bytes check");
    assert_eq!(Repr::parse(&again).expect("re-parse"), repr);
    let psk = Psk::from_bytes(&[0x42; 32]).expect("key");
    if let Repr::V2(v2) = repr {
        // A fuzzer-made MAC that verifies would be a forgery of HMAC-SHA256.
        if psk.verify(&packet) {
            assert_eq!(&psk.sign(&v2)[..], data, "only the real signature verifies");
        }
    }
});
