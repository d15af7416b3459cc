//! Property tests: arbitrary representations round-trip through emit and parse; arbitrary
//! bytes never make any decoder panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use mptcp_sniffer::capture::{self, CaptureFile, LinkType};
use mptcp_sniffer::output::OptionRecord;
use mptcp_sniffer::wire::mptcp::{
    AddAddrForm, AddAddrRepr, DssMapping, DssRepr, MpCapableRepr, MpFailRepr, MpFastcloseRepr,
    MpJoinRepr, MpPrioRepr, MpTcpRstRepr, MptcpRepr, Packet, RemoveAddrRepr, SeqNumber,
    MAX_REMOVED_IDS,
};
use mptcp_sniffer::wire::{Segment, TcpOptionIter};
use mptcp_sniffer::Tracker;
use proptest::prelude::*;

fn seq_number() -> impl Strategy<Value = SeqNumber> {
    prop_oneof![
        any::<u32>().prop_map(SeqNumber::Bits32),
        any::<u64>().prop_map(SeqNumber::Bits64)
    ]
}

fn mp_capable() -> impl Strategy<Value = MptcpRepr> {
    (
        0u8..16,
        any::<u8>(),
        0usize..5,
        any::<u64>(),
        any::<u64>(),
        any::<u16>(),
        any::<u16>(),
    )
        .prop_map(
            |(version, flags, depth, sender, receiver, data_len, checksum)| {
                MptcpRepr::MpCapable(MpCapableRepr {
                    version,
                    flags,
                    sender_key: (depth >= 1).then_some(sender),
                    receiver_key: (depth >= 2).then_some(receiver),
                    data_len: (depth >= 3).then_some(data_len),
                    checksum: (depth >= 4).then_some(checksum),
                })
            },
        )
}

fn mp_join() -> impl Strategy<Value = MptcpRepr> {
    prop_oneof![
        (any::<bool>(), any::<u8>(), any::<u32>(), any::<u32>()).prop_map(
            |(backup, address_id, token, nonce)| {
                MpJoinRepr::Syn {
                    backup,
                    address_id,
                    token,
                    nonce,
                }
            }
        ),
        (any::<bool>(), any::<u8>(), any::<u64>(), any::<u32>()).prop_map(
            |(backup, address_id, hmac, nonce)| {
                MpJoinRepr::SynAck {
                    backup,
                    address_id,
                    hmac,
                    nonce,
                }
            }
        ),
        any::<[u8; 20]>().prop_map(|hmac| MpJoinRepr::Ack { hmac }),
    ]
    .prop_map(MptcpRepr::MpJoin)
}

fn dss() -> impl Strategy<Value = MptcpRepr> {
    let mapping = (
        seq_number(),
        any::<u32>(),
        any::<u16>(),
        proptest::option::of(any::<u16>()),
    )
        .prop_map(|(dsn, subflow_seq, data_len, checksum)| DssMapping {
            dsn,
            subflow_seq,
            data_len,
            checksum,
        });
    (
        any::<bool>(),
        proptest::option::of(seq_number()),
        proptest::option::of(mapping),
    )
        .prop_map(|(data_fin, data_ack, mapping)| {
            MptcpRepr::Dss(DssRepr {
                data_fin,
                data_ack,
                mapping,
            })
        })
}

fn address() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    ]
}

fn add_addr() -> impl Strategy<Value = MptcpRepr> {
    let form = prop_oneof![
        Just(AddAddrForm::V0),
        any::<bool>().prop_map(|echo| AddAddrForm::V1 { echo, hmac: None }),
        any::<u64>().prop_map(|hmac| AddAddrForm::V1 {
            echo: false,
            hmac: Some(hmac)
        }),
    ];
    (
        any::<u8>(),
        address(),
        proptest::option::of(any::<u16>()),
        form,
    )
        .prop_map(|(address_id, address, port, form)| {
            MptcpRepr::AddAddr(AddAddrRepr {
                address_id,
                address,
                port,
                form,
            })
        })
}

fn repr() -> impl Strategy<Value = MptcpRepr> {
    prop_oneof![
        mp_capable(),
        mp_join(),
        dss(),
        add_addr(),
        proptest::collection::vec(any::<u8>(), 1..=MAX_REMOVED_IDS)
            .prop_map(|ids| MptcpRepr::RemoveAddr(RemoveAddrRepr::new(&ids).unwrap())),
        (any::<bool>(), proptest::option::of(any::<u8>()))
            .prop_map(|(backup, address_id)| MptcpRepr::MpPrio(MpPrioRepr { backup, address_id })),
        any::<u64>().prop_map(|dsn| MptcpRepr::MpFail(MpFailRepr { dsn })),
        any::<u64>()
            .prop_map(|receiver_key| MptcpRepr::MpFastclose(MpFastcloseRepr { receiver_key })),
        (0u8..16, any::<u8>())
            .prop_map(|(flags, reason)| MptcpRepr::MpTcpRst(MpTcpRstRepr { flags, reason })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn emit_then_parse_is_identity(repr in repr()) {
        let mut buffer = vec![0u8; repr.buffer_len()];
        repr.emit(&mut Packet::new_unchecked(&mut buffer[..]));
        prop_assert_eq!(usize::from(buffer[1]), repr.buffer_len());
        let parsed = MptcpRepr::parse(&Packet::new_checked(&buffer[..]).unwrap()).unwrap();
        prop_assert_eq!(parsed, repr);
        // Bytes after the option do not change the result.
        buffer.extend_from_slice(&[0xaa; 8]);
        prop_assert_eq!(MptcpRepr::from_bytes(&buffer).unwrap(), repr);
        // Every truncation is an error, never a panic.
        for cut in 0..repr.buffer_len() {
            prop_assert!(MptcpRepr::from_bytes(&buffer[..cut]).is_err());
        }
    }

    #[test]
    fn arbitrary_option_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..48), kind_30 in any::<bool>()) {
        if kind_30 && !bytes.is_empty() {
            bytes[0] = 30;
        }
        if let Ok(repr) = MptcpRepr::from_bytes(&bytes) {
            // Whatever parses re-emits to an option that parses to the same representation.
            prop_assert_eq!(MptcpRepr::from_bytes(&repr.to_bytes()).unwrap(), repr);
        }
        let _ = TcpOptionIter::new(&bytes).count();
        let segment = Segment {
            src: IpAddr::V4(Ipv4Addr::LOCALHOST),
            dst: IpAddr::V4(Ipv4Addr::LOCALHOST),
            src_port: 1,
            dst_port: 2,
            seq: 0,
            ack: 0,
            flags: Default::default(),
            options: &bytes,
            payload_len: 0,
        };
        let _ = OptionRecord::new(1, Duration::ZERO, &segment, &bytes).to_json();
    }

    #[test]
    fn arbitrary_packets_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), flags in any::<u8>()) {
        let mut tracker = Tracker::default();
        for link in [LinkType::Ethernet, LinkType::RawIp, LinkType::LinuxSll, LinkType::LinuxSll2, LinkType::Ppp, LinkType::Null] {
            if let Ok(Some(segment)) = capture::decode_frame(link, &bytes) {
                tracker.handle_segment(Duration::from_secs(1), &segment);
                let mut with_flags = segment;
                with_flags.flags.0 = flags;
                tracker.handle_segment(Duration::from_secs(2), &with_flags);
            }
        }
        // An IPv4/TCP header in front of arbitrary options and flags.
        let mut packet = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        packet.extend_from_slice(&[0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0xf0, flags, 0, 0, 0, 0, 0, 0]);
        packet.extend_from_slice(&bytes[..bytes.len().min(40)]);
        packet.resize(60, 0);
        if let Ok(Some(segment)) = Segment::parse_ip(&packet) {
            tracker.handle_segment(Duration::from_secs(3), &segment);
        }
        while tracker.poll_event().is_some() {}
        if let Ok(mut file) = CaptureFile::parse(&bytes) {
            while let Ok(Some(_)) = file.next_frame() {}
        }
    }
}
