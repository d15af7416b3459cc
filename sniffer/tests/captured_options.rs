//! Round trips of option bytes taken from the real captures, and the kernel BPF program run
//! (in a user-space interpreter) over every fixture packet.

mod common;

use std::collections::BTreeMap;

use mptcp_sniffer::capture::{self, bpf, link, CaptureFile};
use mptcp_sniffer::wire::mptcp::{
    AddAddrForm, AddAddrRepr, DssMapping, DssRepr, MpCapableRepr, MpJoinRepr, MpTcpRstRepr,
    MptcpRepr, SeqNumber,
};

fn unhex(text: &str) -> Vec<u8> {
    let text: String = text.split_whitespace().collect();
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn all_capture_files() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = common::captures_with_tshark_dumps()
        .into_iter()
        .map(|(capture, _)| capture)
        .collect();
    files.sort();
    files
}

/// Every MPTCP option in every fixture capture: bytes → repr → bytes is the identity, except
/// for options with reserved bits set (then the re-emitted bytes parse to the same repr).
#[test]
fn every_captured_option_round_trips() {
    let mut per_subtype: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut exact = 0;
    let mut normalised = 0;
    let mut malformed = 0;
    for path in all_capture_files() {
        let data = std::fs::read(&path).unwrap();
        let mut file = CaptureFile::parse(&data).unwrap();
        while let Some(frame) = file.next_frame().unwrap() {
            let Ok(Some(segment)) = capture::decode_frame(frame.link, frame.data) else {
                continue;
            };
            for option in segment.tcp_options().flatten().filter(|o| o.kind == 30) {
                let Ok(repr) = MptcpRepr::from_bytes(option.bytes) else {
                    malformed += 1;
                    continue;
                };
                *per_subtype.entry(repr.subtype().name()).or_default() += 1;
                let emitted = repr.to_bytes();
                if emitted == option.bytes {
                    exact += 1;
                } else {
                    normalised += 1;
                    assert_eq!(
                        emitted.len(),
                        option.bytes.len(),
                        "{}: {:02x?}",
                        path.display(),
                        option.bytes
                    );
                    assert_eq!(MptcpRepr::from_bytes(&emitted), Ok(repr));
                }
            }
        }
    }
    for subtype in [
        "mp_capable",
        "mp_join",
        "dss",
        "add_addr",
        "remove_addr",
        "mp_prio",
        "mp_fail",
        "mp_fastclose",
        "mp_tcprst",
    ] {
        assert!(
            per_subtype.get(subtype).copied().unwrap_or(0) > 0,
            "no {subtype} in the fixtures: {per_subtype:?}"
        );
    }
    assert!(exact > 300_000 / 100, "{exact} exact round trips");
    assert!(
        normalised * 100 <= exact,
        "{normalised} options needed normalising"
    );
    assert_eq!(
        malformed, 13,
        "the oobr regression and the 12 malformed options of crafted.pcap"
    );
}

/// Byte vectors copied from the captures, with the values tcpdump/tshark give for them.
#[test]
fn byte_vectors_from_captures() {
    // tcpdump/mptcp-v1.pcap frame 4: MP_CAPABLE v1 with data-level length.
    let bytes = unhex("1e16 0101 1fdb5df328bc3def 29a6c86981ad933c 2000");
    let expected = MptcpRepr::MpCapable(MpCapableRepr {
        version: 1,
        flags: 0x01,
        sender_key: Some(0x1fdb5df328bc3def),
        receiver_key: Some(0x29a6c86981ad933c),
        data_len: Some(8192),
        checksum: None,
    });
    assert_eq!(MptcpRepr::from_bytes(&bytes), Ok(expected));
    assert_eq!(expected.to_bytes(), bytes);

    // tcpdump/mptcp-v0.pcap frame 8: MP_JOIN SYN.
    let bytes = unhex("1e0c 1000 e47f0142 1b665a18");
    let expected = MptcpRepr::MpJoin(MpJoinRepr::Syn {
        backup: false,
        address_id: 0,
        token: 0xe47f0142,
        nonce: 0x1b665a18,
    });
    assert_eq!(MptcpRepr::from_bytes(&bytes), Ok(expected));
    assert_eq!(expected.to_bytes(), bytes);

    // tcpdump/mptcp-aa-v1.pcap frame 13: ADD_ADDR v1 with HMAC.
    let bytes = unhex("1e10 3001 c0a888e1 669928744366716c");
    let expected = MptcpRepr::AddAddr(AddAddrRepr {
        address_id: 1,
        address: "192.168.136.225".parse().unwrap(),
        port: None,
        form: AddAddrForm::V1 {
            echo: false,
            hmac: Some(0x669928744366716c),
        },
    });
    assert_eq!(MptcpRepr::from_bytes(&bytes), Ok(expected));
    assert_eq!(expected.to_bytes(), bytes);

    // ptcpdump/mptcp.pcap frame 10: DSS with DATA_FIN, 64-bit ack and DSN.
    let bytes = unhex("1e1a 201f 3602a57d9b3646a5 e9e37e0bab765998 00000000 0001");
    let Ok(MptcpRepr::Dss(dss)) = MptcpRepr::from_bytes(&bytes) else {
        panic!()
    };
    assert_eq!(
        dss,
        DssRepr {
            data_fin: true,
            data_ack: Some(SeqNumber::Bits64(3891854986895050405)),
            mapping: Some(DssMapping {
                dsn: SeqNumber::Bits64(16853452819136928152),
                subflow_seq: 0,
                data_len: 1,
                checksum: None
            }),
        }
    );
    assert_eq!(MptcpRepr::Dss(dss).to_bytes(), bytes);

    // tcpdump/mptcp-tcprst.pcap frame 2: MP_TCPRST, transient, MPTCP-specific error.
    let bytes = unhex("1e04 8101");
    assert_eq!(
        MptcpRepr::from_bytes(&bytes),
        Ok(MptcpRepr::MpTcpRst(MpTcpRstRepr {
            flags: 1,
            reason: 1
        }))
    );
}

/// The vectors above really are in the captures.
#[test]
fn byte_vectors_are_in_the_captures() {
    for (capture, frame_number, hex) in [
        (
            "tcpdump/mptcp-v1.pcap",
            4,
            "1e16 0101 1fdb5df328bc3def 29a6c86981ad933c 2000",
        ),
        ("tcpdump/mptcp-v0.pcap", 8, "1e0c 1000 e47f0142 1b665a18"),
        (
            "tcpdump/mptcp-aa-v1.pcap",
            13,
            "1e10 3001 c0a888e1 669928744366716c",
        ),
        (
            "ptcpdump/mptcp.pcap",
            10,
            "1e1a 201f 3602a57d9b3646a5 e9e37e0bab765998 00000000 0001",
        ),
        ("tcpdump/mptcp-tcprst.pcap", 2, "1e04 8101"),
    ] {
        let data = std::fs::read(common::fixture(capture)).unwrap();
        let mut file = CaptureFile::parse(&data).unwrap();
        let frame = std::iter::from_fn(|| file.next_frame().unwrap())
            .find(|f| f.number == frame_number)
            .unwrap();
        let segment = capture::decode_frame(frame.link, frame.data)
            .unwrap()
            .unwrap();
        let bytes = unhex(hex);
        assert!(
            segment.tcp_options().flatten().any(|o| o.bytes == bytes),
            "{capture} frame {frame_number} lacks {hex}"
        );
    }
}

/// The kernel filter (run by the user-space interpreter) over every fixture packet agrees with
/// a direct reading of the segment: control segments and segments with an MPTCP option among
/// the first walked options pass, other TCP segments are dropped.
#[test]
fn bpf_filter_over_fixture_packets() {
    let program = bpf::mptcp_filter(256);
    let (mut passed, mut dropped) = (0, 0);
    for path in all_capture_files() {
        let data = std::fs::read(&path).unwrap();
        let mut file = CaptureFile::parse(&data).unwrap();
        while let Some(frame) = file.next_frame().unwrap() {
            let Ok(Some(ip)) = link::ip_payload(frame.link, frame.data) else {
                continue;
            };
            let protocol = match ip.first().map(|b| b >> 4) {
                Some(4) => link::ETHERTYPE_IPV4,
                Some(6) => link::ETHERTYPE_IPV6,
                _ => continue,
            };
            let verdict = bpf::run(&program, ip, protocol);
            let Ok(Some(segment)) = capture::decode_frame(frame.link, frame.data) else {
                continue;
            };
            if protocol == link::ETHERTYPE_IPV6 && ip[6] != 6 {
                assert_eq!(verdict, 0, "IPv6 extension headers are dropped");
                continue;
            }
            let control = segment.flags.syn() || segment.flags.fin() || segment.flags.rst();
            // Reference walk: NOPs count as options, like in the filter.
            let mut entries = 0;
            let mut offset = 0;
            let mut found = false;
            let options = segment.options;
            while offset < options.len() && entries < bpf::MAX_WALKED_OPTIONS {
                entries += 1;
                match options[offset] {
                    30 => {
                        found = true;
                        break;
                    }
                    0 => break,
                    1 => offset += 1,
                    _ => match options.get(offset + 1) {
                        Some(&length) if length >= 2 => offset += usize::from(length),
                        _ => break,
                    },
                }
            }
            let undecided = entries == bpf::MAX_WALKED_OPTIONS && offset < options.len() && !found;
            let expected = control || found || undecided;
            assert_eq!(
                verdict != 0,
                expected,
                "{} frame {}",
                path.display(),
                frame.number
            );
            if expected {
                passed += 1;
            } else {
                dropped += 1;
            }
        }
    }
    assert!(passed > 5_000, "{passed}");
    assert!(dropped > 0, "no fixture packet exercised the drop path");
}

/// A reader returning at most `chunk` bytes per call, to exercise the "need more bytes" path.
struct Trickle<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let n = self.chunk.min(buffer.len()).min(self.data.len());
        buffer[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// The streaming reader, fed a few bytes at a time, yields exactly the frames of the
/// in-memory reader, and reports a cut record the same way.
#[test]
fn streaming_reader_matches_in_memory_reader() {
    use mptcp_sniffer::capture::CaptureReader;
    let mut compared = 0;
    for path in all_capture_files() {
        let mut data = std::fs::read(&path).unwrap();
        for cut in [0, 7] {
            data.truncate(data.len() - cut);
            let mut file = CaptureFile::parse(&data).unwrap();
            // Byte-by-byte only on small files, to keep the test fast.
            let chunks: &[usize] = if data.len() < 64 * 1024 {
                &[1, 13, 4096]
            } else {
                &[13, 4096]
            };
            for &chunk in chunks {
                let mut file_frames = CaptureFile::parse(&data).unwrap();
                let mut reader = CaptureReader::with_chunk_size(
                    Trickle {
                        data: &data,
                        chunk: 5,
                    },
                    chunk,
                )
                .unwrap();
                loop {
                    let expected = file_frames.next_frame().unwrap();
                    let streamed = reader.next_frame().unwrap();
                    assert_eq!(streamed, expected, "{} chunk {chunk}", path.display());
                    if expected.is_none() {
                        break;
                    }
                    compared += 1;
                }
                assert_eq!(
                    reader.incomplete(),
                    file_frames.incomplete(),
                    "{}",
                    path.display()
                );
                assert_eq!(reader.incomplete().is_some(), cut > 0, "{}", path.display());
            }
            while file.next_frame().unwrap().is_some() {}
        }
    }
    assert!(compared > 10_000, "{compared}");
}
