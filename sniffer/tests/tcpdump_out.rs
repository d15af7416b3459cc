//! Cross-check with the tcpdump expected outputs (`*.out`): for every packet, the MPTCP options
//! tcpdump prints (length, subtype, and every value it shows) must match our decoding.

mod common;

use std::path::Path;

use mptcp_sniffer::capture::{self, CaptureFile};
use mptcp_sniffer::output::OptionRecord;
use mptcp_sniffer::wire::mptcp::OPTION_KIND;

struct Decoded {
    length: usize,
    record: serde_json::Value,
    text: String,
}

/// Our decoding of every frame: the MPTCP options in order.
fn decode(capture: &Path) -> Vec<Vec<Decoded>> {
    let data = std::fs::read(capture).unwrap();
    let mut file = CaptureFile::parse(&data).unwrap();
    let mut frames = Vec::new();
    while let Some(frame) = file.next_frame().unwrap() {
        let mut options = Vec::new();
        if let Ok(Some(segment)) = capture::decode_frame(frame.link, frame.data) {
            for option in segment.tcp_options() {
                let Ok(option) = option else { break };
                if option.kind == OPTION_KIND {
                    let record =
                        OptionRecord::new(frame.number, frame.timestamp, &segment, option.bytes);
                    options.push(Decoded {
                        length: option.bytes.len(),
                        record: serde_json::to_value(&record).unwrap(),
                        text: record.to_text(),
                    });
                }
            }
        }
        frames.push(options);
    }
    frames
}

/// The `mptcp LEN NAME ...` descriptions of one tcpdump line.
fn tcpdump_options(line: &str) -> Vec<(usize, String, Vec<String>)> {
    let mut options = Vec::new();
    let mut rest = line;
    while let Some(start) = rest.find("mptcp ") {
        let after = &rest[start + 6..];
        let end = [",mptcp ", ",nop", "], length", "]]"]
            .iter()
            .filter_map(|stop| after.find(stop))
            .min()
            .unwrap_or(after.len());
        let description = &after[..end];
        let mut words = description.split_whitespace();
        let length: usize = words.next().unwrap().parse().unwrap();
        let name = words.next().unwrap_or_default().to_string();
        options.push((length, name, words.map(str::to_string).collect()));
        rest = &after[end..];
    }
    options
}

fn number(text: &str) -> u64 {
    let text = text.trim_matches(|c| c == '{' || c == '}' || c == ',');
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
        None => text.parse().unwrap(),
    }
}

fn field(record: &serde_json::Value, name: &str) -> Option<u64> {
    record.get(name).and_then(|value| value.as_u64())
}

fn check_option(context: &str, ours: &Decoded, length: usize, name: &str, words: &[String]) {
    let record = &ours.record;
    assert_eq!(ours.length, length, "{context}: option length");
    let subtype = record["subtype"].as_str().unwrap();
    let value_after = |key: &str| {
        words
            .iter()
            .position(|w| w == key)
            .map(|i| words[i + 1].clone())
    };
    match name {
        "capable" => {
            assert_eq!(subtype, "mp_capable", "{context}");
            assert_eq!(format!("v{}", record["version"]), words[0], "{context}");
            let joined = words.join(" ");
            if let Some(keys) = joined.split('{').nth(1) {
                let keys: Vec<&str> = keys.trim_end_matches('}').split(',').collect();
                assert_eq!(
                    field(record, "sender_key"),
                    Some(number(keys[0])),
                    "{context}"
                );
                if let Some(key) = keys.get(1).filter(|k| k.starts_with("0x")) {
                    assert_eq!(
                        field(record, "receiver_key"),
                        Some(number(key)),
                        "{context}"
                    );
                }
                if let Some(len) = keys.iter().find_map(|k| k.strip_prefix("data_len=")) {
                    assert_eq!(field(record, "data_len"), Some(number(len)), "{context}");
                }
            } else {
                assert!(record.get("sender_key").is_none(), "{context}");
            }
        }
        "join" => {
            assert_eq!(subtype, "mp_join", "{context}");
            if let Some(id) = value_after("id") {
                assert_eq!(field(record, "address_id"), Some(number(&id)), "{context}");
            }
            if let Some(token) = value_after("token") {
                assert_eq!(field(record, "token"), Some(number(&token)), "{context}");
            }
            if let Some(nonce) = value_after("nonce") {
                assert_eq!(field(record, "nonce"), Some(number(&nonce)), "{context}");
            }
            if let Some(hmac) = value_after("hmac") {
                let hex = hmac.trim_start_matches("0x");
                if hex.len() == 40 {
                    assert_eq!(record["hmac"].as_str(), Some(hex), "{context}");
                } else {
                    assert_eq!(field(record, "hmac"), Some(number(&hmac)), "{context}");
                }
            }
        }
        "dss" => {
            assert_eq!(subtype, "dss", "{context}");
            assert_eq!(
                field(record, "data_fin"),
                Some(u64::from(words.iter().any(|w| w == "fin"))),
                "{context}"
            );
            for (word, ours_name) in [
                ("ack", "data_ack"),
                ("seq", "dsn"),
                ("subseq", "subflow_seq"),
                ("len", "data_len"),
            ] {
                assert_eq!(
                    field(record, ours_name),
                    value_after(word).map(|v| number(&v)),
                    "{context}: {word}"
                );
            }
            if let Some(checksum) = value_after("csum") {
                assert!(
                    ours.text
                        .contains(&format!("checksum=0x{:04x}", number(&checksum))),
                    "{context}: {}",
                    ours.text
                );
            }
        }
        "dss[bad" => {
            assert_eq!(subtype, "dss", "{context}");
            assert!(record.get("error").is_some(), "{context}");
        }
        "add-addr" => {
            assert_eq!(subtype, "add_addr", "{context}");
            let id_at = words.iter().position(|w| w == "id").unwrap();
            assert_eq!(
                field(record, "address_id"),
                Some(number(&words[id_at + 1])),
                "{context}"
            );
            let address = &words[id_at + 2];
            let (address, port) = match address.rsplit_once(':') {
                Some((a, p)) if !address.contains("::") && a.contains('.') => {
                    (a.to_string(), Some(number(p)))
                }
                _ => (address.clone(), None),
            };
            assert_eq!(
                record["address"].as_str(),
                Some(address.as_str()),
                "{context}"
            );
            assert_eq!(field(record, "port"), port, "{context}");
            match words[0].as_str() {
                "v1" => assert_eq!(field(record, "echo"), Some(0), "{context}"),
                "v1-echo" => assert_eq!(field(record, "echo"), Some(1), "{context}"),
                _ => assert!(
                    record.get("echo").is_none(),
                    "{context}: v0 has no echo flag"
                ),
            }
            assert_eq!(
                field(record, "hmac"),
                value_after("hmac").map(|v| number(&v)),
                "{context}"
            );
        }
        "rem-addr" => {
            assert_eq!(subtype, "remove_addr", "{context}");
            let ids: Vec<u64> = words
                .iter()
                .skip_while(|w| *w != "id")
                .skip(1)
                .map(|w| number(w))
                .collect();
            let ours: Vec<u64> = record["address_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(ours, ids, "{context}");
        }
        "fast-close" => {
            assert_eq!(subtype, "mp_fastclose", "{context}");
            assert_eq!(
                field(record, "receiver_key"),
                value_after("key").map(|v| number(&v)),
                "{context}"
            );
        }
        "tcprst" => {
            assert_eq!(subtype, "mp_tcprst", "{context}");
            let transient = words.join(" ").contains("flags [T]");
            assert_eq!(
                field(record, "transient"),
                Some(u64::from(transient)),
                "{context}"
            );
            let reason_text = words
                .iter()
                .skip_while(|w| *w != "reason")
                .skip(1)
                .cloned()
                .collect::<Vec<_>>()
                .join(" ");
            let reasons = [
                "Unspecified error",
                "MPTCP-specific error",
                "Lack of resources",
                "Administratively prohibited",
            ];
            let reason = reasons
                .iter()
                .position(|r| *r == reason_text)
                .expect("known reason") as u64;
            assert_eq!(field(record, "reason"), Some(reason), "{context}");
        }
        other => panic!("{context}: unhandled tcpdump option {other}"),
    }
}

fn check_capture(capture: &str, expected: &str, numbered: bool) -> usize {
    let ours = decode(&common::fixture(capture));
    let text = std::fs::read_to_string(common::fixture(expected)).unwrap();
    let mut checked = 0;
    let mut last_number = 0;
    let mut index = 0;
    for line in text.lines() {
        // With -v, tcpdump continues a packet on an indented line without a number.
        if let Some(number) = line
            .split_whitespace()
            .next()
            .and_then(|w| w.parse::<usize>().ok())
        {
            last_number = number;
        }
        if !(line.contains(" > ") && line.contains("Flags [")) {
            continue;
        }
        index += 1;
        let frame = if numbered { last_number } else { index };
        let expected_options = tcpdump_options(line);
        let decoded = &ours[frame - 1];
        assert_eq!(
            decoded.len(),
            expected_options.len(),
            "{capture} frame {frame}: option count\n{line}"
        );
        for (ours, (length, name, words)) in decoded.iter().zip(&expected_options) {
            check_option(
                &format!("{capture} frame {frame}"),
                ours,
                *length,
                name,
                words,
            );
            checked += 1;
        }
    }
    checked
}

#[test]
fn tcpdump_expected_outputs() {
    let mut checked = 0;
    for name in [
        "mptcp-v0",
        "mptcp-v1",
        "mptcp-fclose",
        "mptcp-aa-v1",
        "mptcp-aa-echo",
        "mptcp-tcprst",
        "mptcp-dss-oobr",
    ] {
        checked += check_capture(
            &format!("tcpdump/{name}.pcap"),
            &format!("tcpdump/{name}.out"),
            true,
        );
    }
    checked += check_capture("ptcpdump/mptcp.pcap", "ptcpdump/mptcp.pcap.out.txt", false);
    checked += check_capture(
        "ptcpdump/mptcp.pcap",
        "ptcpdump/mptcp.pcap.-S.out.txt",
        false,
    );
    assert!(checked > 300, "only {checked} options checked");
}
