//! The NAT detour message: round trips of every representable message, signing, and arbitrary bytes.

use std::net::Ipv4Addr;

use mptcp_detour::key::Psk;
use mptcp_detour::wire::{Op, Packet, Repr, Status, V1Repr, V2Repr};
use proptest::prelude::*;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Request),
        Just(Op::Response),
        Just(Op::Release),
        Just(Op::Released)
    ]
}

fn status() -> impl Strategy<Value = Status> {
    proptest::sample::select(Status::ALL.to_vec())
}

fn v2() -> impl Strategy<Value = V2Repr> {
    (
        op(),
        status(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<[u8; 4]>(),
        any::<u16>(),
        any::<u16>(),
        any::<u32>(),
    )
        .prop_map(
            |(op, status, key_id, nonce, timestamp_ms, rip, rpt, dpt, lifetime_s)| V2Repr {
                op,
                status,
                key_id,
                nonce,
                timestamp_ms,
                rip: Ipv4Addr::from(rip),
                rpt,
                dpt,
                lifetime_s,
            },
        )
}

proptest! {
    #[test]
    fn v1_round_trips(request in any::<bool>(), rip in any::<[u8; 4]>(), rpt in any::<u16>(), dpt in any::<u16>()) {
        let repr = Repr::V1(V1Repr {
            op: if request { Op::Request } else { Op::Response },
            rip: Ipv4Addr::from(rip),
            rpt,
            dpt,
        });
        let bytes = repr.to_bytes();
        prop_assert_eq!(bytes.len(), 12);
        prop_assert_eq!(Repr::parse(&Packet::new_checked(&bytes[..]).unwrap()).unwrap(), repr);
    }

    #[test]
    fn v2_round_trips_signed(repr in v2(), key in proptest::collection::vec(any::<u8>(), 16..64)) {
        let psk = Psk::from_bytes(&key).unwrap();
        let bytes = psk.sign(&repr);
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        prop_assert!(psk.verify(&packet));
        let parsed = Repr::parse(&packet).unwrap();
        prop_assert_eq!(parsed, Repr::V2(V2Repr { key_id: psk.id(), ..repr }));
        prop_assert_eq!(Repr::V2(V2Repr { key_id: psk.id(), ..repr }).to_bytes()[..36].to_vec(), bytes[..36].to_vec());
    }

    /// Arbitrary bytes never panic; whatever parses re-emits to bytes that parse the same.
    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..80), version in 0u8..4) {
        let mut bytes = bytes;
        if let Some(first) = bytes.first_mut() {
            *first = version;
        }
        if let Ok(packet) = Packet::new_checked(&bytes[..]) {
            if let Ok(repr) = Repr::parse(&packet) {
                let again = repr.to_bytes();
                prop_assert_eq!(Repr::parse(&Packet::new_checked(&again[..]).unwrap()).unwrap(), repr);
            }
        }
    }
}
