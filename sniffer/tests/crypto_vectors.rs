//! Every vector of `tests/fixtures/CRYPTO_VECTORS.md`.

mod common;

use mptcp_sniffer::crypto::{self, AddAddrHmacMatch, MptcpVersion};
use mptcp_sniffer::tracker::{AnomalyKind, Event, TrackerConfig};
use mptcp_sniffer::wire::mptcp::MptcpRepr;

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn vectors_file_is_the_one_tested() {
    let text = std::fs::read_to_string(common::fixture("CRYPTO_VECTORS.md")).unwrap();
    for needle in [
        "8385e24fb4235ac37556b6b886db106284a1da671699f46db1f235ec622dcafa",
        "0x1fdb5df328bc3def",
        "669928744366716c",
        "825aadbb1222dd68b5352bf31ff13fe7f3d1e499",
        "e2503523b79f4c0ee342b93c61b29904c426337a",
        "0x0b98f027",
    ] {
        assert!(text.contains(needle), "{needle} not in CRYPTO_VECTORS.md");
    }
}

/// A. Linux KUnit vectors: the key and message are the ASCII characters of the hex strings.
#[test]
fn a_linux_kunit_hmac_sha256() {
    let vectors = [
        (
            "0b0b0b0b0b0b0b0b",
            "48692054",
            "8385e24fb4235ac37556b6b886db106284a1da671699f46db1f235ec622dcafa",
        ),
        (
            "aaaaaaaaaaaaaaaa",
            "dddddddd",
            "2c5e219164ff1dca1c4a92318d847bb6b9d44492984e1eb71aff9022f71046e9",
        ),
        (
            "0102030405060708",
            "cdcdcdcd",
            "e73b9ba9969969cefb04aa0d6df18ec2fcc075b6f23b4d8c4da736a5dbbc6e7d",
        ),
    ];
    for (key, message, expected) in vectors {
        let raw = crypto::hmac_raw(MptcpVersion::V1, key.as_bytes(), message.as_bytes());
        assert_eq!(hex(raw.as_bytes()), expected);
        // The same through the (key1 || key2) entry point the kernel test exercises.
        let key1 = u64::from_be_bytes(key.as_bytes()[..8].try_into().unwrap());
        let key2 = u64::from_be_bytes(key.as_bytes()[8..].try_into().unwrap());
        let keyed = crypto::hmac_keys(MptcpVersion::V1, key1, key2, message.as_bytes());
        assert_eq!(hex(keyed.as_bytes()), expected);
        // The trap: hex-decoded inputs do not give the vector.
        let decoded = crypto::hmac_raw(MptcpVersion::V1, &unhex(key), &unhex(message));
        assert_ne!(hex(decoded.as_bytes()), expected);
    }
}

/// B. Token and IDSN of v1 keys.
#[test]
fn b_token_and_idsn() {
    let vectors: [(u64, u32, u64); 6] = [
        (0x1fdb5df328bc3def, 0x239fbdb0, 14413541604287230029),
        (0x29a6c86981ad933c, 0xa35d6d82, 11713449205243392241),
        (0x8f0c7c64a6a32ac1, 0x2e1abded, 17186763219675866564),
        (0x73bb150358a0aecb, 0x5f3f5591, 12148165319181844525),
        (0xfe7b93dc894dcb73, 0xc43eb50e, 3891854986895050394),
        (0xe356a8f252e41976, 0x64a48c01, 16853452819136928151),
    ];
    for (key, token, idsn) in vectors {
        assert_eq!(
            crypto::token(MptcpVersion::V1, key),
            token,
            "token of {key:#x}"
        );
        assert_eq!(
            crypto::idsn(MptcpVersion::V1, key),
            idsn,
            "idsn of {key:#x}"
        );
    }
    // Wireshark's expected_token/expected_idsn for mptcp-aa-v1.
    assert_eq!(
        crypto::token(MptcpVersion::V1, 0x73bb150358a0aecb),
        1597986193
    );
    assert_eq!(
        crypto::token(MptcpVersion::V1, 0x8f0c7c64a6a32ac1),
        773504493
    );
    // ptcpdump: the 32-bit data ACK is the low 32 bits of IDSN + 1.
    assert_eq!(
        crypto::idsn(MptcpVersion::V1, 0xe356a8f252e41976).wrapping_add(1) as u32,
        2876660120
    );
    assert_eq!(
        crypto::idsn(MptcpVersion::V1, 0xfe7b93dc894dcb73) + 6,
        3891854986895050400
    );
}

/// B, cross-checked on the capture: the server's first DSN is its IDSN + 1.
#[test]
fn b_first_dsn_in_capture_is_idsn_plus_one() {
    let frames = common::json_records(&common::fixture("tcpdump/mptcp-v1.pcap"));
    let server_key = frames
        .values()
        .flatten()
        .find_map(|r| {
            (r["subtype"] == "mp_capable" && r.get("receiver_key").is_none())
                .then(|| r["sender_key"].as_u64())
                .flatten()
        })
        .expect("SYN-ACK key");
    assert_eq!(server_key, 0x29a6c86981ad933c);
    let first_dsn = frames
        .values()
        .flatten()
        .find_map(|r| {
            (r["subtype"] == "dss" && r["sport"] == 10004)
                .then(|| r["dsn"].as_u64())
                .flatten()
        })
        .expect("server DSS with a mapping");
    assert_eq!(first_dsn, crypto::idsn(MptcpVersion::V1, server_key) + 1);
}

/// C. ADD_ADDR HMAC of mptcp-aa-v1 frame 13 (leftmost 64 bits: pre-5.7 Linux).
#[test]
fn c_add_addr_hmac() {
    let server = 0x73bb150358a0aecb;
    let client = 0x8f0c7c64a6a32ac1;
    let full = crypto::hmac_keys(
        MptcpVersion::V1,
        server,
        client,
        &[0x01, 0xc0, 0xa8, 0x88, 0xe1, 0x00, 0x00],
    );
    assert_eq!(full.leftmost_u64(), 0x669928744366716c);
    assert_eq!(full.rightmost_u64(), 0xe0e054c3444e4c25);
    let address = "192.168.136.225".parse().unwrap();
    assert_eq!(
        crypto::check_add_addr_hmac(server, client, 1, address, None, 0x669928744366716c),
        Some(AddAddrHmacMatch::LegacyLeftmost)
    );
    assert_eq!(
        crypto::check_add_addr_hmac(server, client, 1, address, None, 0xe0e054c3444e4c25),
        Some(AddAddrHmacMatch::Rfc)
    );
    assert_eq!(
        crypto::check_add_addr_hmac(client, server, 1, address, None, 0x669928744366716c),
        None
    );

    // The option in the capture carries that HMAC, and the tracker accepts it.
    let frames = common::json_records(&common::fixture("tcpdump/mptcp-aa-v1.pcap"));
    let add = frames[&13]
        .iter()
        .find(|r| r["subtype"] == "add_addr")
        .expect("frame 13 ADD_ADDR");
    assert_eq!(add["hmac"].as_u64(), Some(0x669928744366716c));
    let (_, events) = common::track(
        &common::fixture("tcpdump/mptcp-aa-v1.pcap"),
        TrackerConfig::default(),
    );
    assert!(events.iter().any(
        |(frame, e)| *frame == 13 && matches!(e, Event::AddressAnnounced { address_id: 1, .. })
    ));
    assert!(
        !events
            .iter()
            .any(|(_, e)| matches!(e, Event::Anomaly { .. })),
        "{events:#?}"
    );
}

/// D. v0 MP_JOIN HMACs (HMAC-SHA1), verified against the captures.
#[test]
fn d_mp_join_v0() {
    // pymptcpanalyzer/iperf-mptcp-0-0.pcap
    let key_a = 15630232866698755056;
    let key_b = 15504481981035106882;
    assert_eq!(crypto::token(MptcpVersion::V0, key_b), 809210772);
    let (nonce_a, nonce_b) = (2910429252, 2696637541);
    assert_eq!(
        crypto::join_synack_hmac(MptcpVersion::V0, key_b, key_a, nonce_b, nonce_a),
        7061322843868767095
    );
    assert_eq!(
        hex(&crypto::join_ack_hmac(
            MptcpVersion::V0,
            key_a,
            key_b,
            nonce_a,
            nonce_b
        )),
        "825aadbb1222dd68b5352bf31ff13fe7f3d1e499"
    );
    // dpi-mptcp/mp_capable.pcapng
    let key_a = 7198354193151140632;
    let key_b = 7718901892681671590;
    assert_eq!(crypto::token(MptcpVersion::V0, key_b), 3605989911);
    let (nonce_a, nonce_b) = (3895537419, 1193180053);
    assert_eq!(
        crypto::join_synack_hmac(MptcpVersion::V0, key_b, key_a, nonce_b, nonce_a),
        9844737537082080321
    );
    assert_eq!(
        hex(&crypto::join_ack_hmac(
            MptcpVersion::V0,
            key_a,
            key_b,
            nonce_a,
            nonce_b
        )),
        "e2503523b79f4c0ee342b93c61b29904c426337a"
    );
    // dpi-mptcp/mod_tok.pcap: the join's token matches neither key.
    assert_eq!(crypto::token(MptcpVersion::V0, key_b), 0xd6ef0a17);
    assert_eq!(crypto::token(MptcpVersion::V0, key_a), 0x304c27fa);
    let join = common::json_records(&common::fixture("dpi-mptcp/mod_tok.pcap"));
    assert_eq!(join[&4][0]["token"].as_u64(), Some(0x0b98f027));
}

/// D, through the tracker: joins in both captures validate (no HMAC anomaly) and attach.
#[test]
fn d_tracker_validates_join_hmacs_in_captures() {
    for capture in [
        "pymptcpanalyzer/iperf-mptcp-0-0.pcap",
        "dpi-mptcp/mp_capable.pcapng",
    ] {
        let (_, events) = common::track(&common::fixture(capture), TrackerConfig::default());
        let joins = events
            .iter()
            .filter(|(_, e)| matches!(e, Event::SubflowAdded { subflow, .. } if subflow.initiator_address_id != Some(0)))
            .count();
        assert!(
            joins >= 1,
            "{capture}: no MP_JOIN subflow attached: {events:#?}"
        );
        let hmac_anomalies: Vec<_> = events
            .iter()
            .filter(|(_, e)| {
                matches!(
                    e,
                    Event::Anomaly {
                        kind: AnomalyKind::HmacMismatch { .. },
                        ..
                    }
                )
            })
            .collect();
        assert!(hmac_anomalies.is_empty(), "{capture}: {hmac_anomalies:#?}");
    }
}

/// A tampered HMAC is reported.
#[test]
fn tampered_join_hmac_is_an_anomaly() {
    use mptcp_sniffer::capture::{self, CaptureFile};
    let data = std::fs::read(common::fixture("pymptcpanalyzer/iperf-mptcp-0-0.pcap")).unwrap();
    let mut file = CaptureFile::parse(&data).unwrap();
    let mut tracker = mptcp_sniffer::Tracker::default();
    let mut anomalies = 0;
    while let Some(frame) = file.next_frame().unwrap() {
        let mut bytes = frame.data.to_vec();
        if let Ok(Some(segment)) = capture::decode_frame(frame.link, frame.data) {
            let is_synack_join = segment.flags.syn()
                && segment.flags.ack()
                && segment
                    .tcp_options()
                    .flatten()
                    .any(|o| matches!(MptcpRepr::from_bytes(o.bytes), Ok(MptcpRepr::MpJoin(_))));
            if is_synack_join {
                // Flip the last byte of the frame's TCP options... find the HMAC: corrupt every
                // MP_JOIN option's 5th byte (first HMAC byte).
                let options_start = frame.data.len() - segment.payload_len - segment.options.len();
                for option in segment.tcp_options().flatten() {
                    if option.kind == 30 {
                        bytes[options_start + option.offset + 4] ^= 0xff;
                    }
                }
            }
        }
        if let Ok(Some(segment)) = capture::decode_frame(frame.link, &bytes) {
            tracker.handle_segment(frame.timestamp, &segment);
        }
        while let Some(event) = tracker.poll_event() {
            if matches!(
                event,
                Event::Anomaly {
                    kind: AnomalyKind::HmacMismatch {
                        option: "mp_join_syn_ack"
                    },
                    ..
                }
            ) {
                anomalies += 1;
            }
        }
    }
    assert!(anomalies >= 1);
}
