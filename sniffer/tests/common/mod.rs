//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mptcp_sniffer::capture::{self, CaptureFile};
use mptcp_sniffer::cli::{self, OutputMode, RunOptions};
use mptcp_sniffer::tracker::{Event, Tracker, TrackerConfig};

/// The fixtures directory.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A fixture by relative path.
pub fn fixture(relative: &str) -> PathBuf {
    fixtures().join(relative)
}

/// Every capture that has a checked-in tshark field dump, as (capture, dump).
pub fn captures_with_tshark_dumps() -> Vec<(PathBuf, PathBuf)> {
    let mut pairs = Vec::new();
    for directory in std::fs::read_dir(fixtures()).unwrap() {
        let directory = directory.unwrap().path();
        if !directory.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&directory).unwrap() {
            let file = file.unwrap().path();
            let name = file.file_name().unwrap().to_string_lossy().to_string();
            if let Some(capture) = name.strip_suffix(".tshark-fields.tsv") {
                pairs.push((directory.join(capture), file));
            }
        }
    }
    pairs.sort();
    pairs
}

/// The tshark fields compared, in dump order (without the `tcp.options.mptcp.` prefix).
pub const TSHARK_FIELDS: [&str; 23] = [
    "subtype",
    "version",
    "flags",
    "sendkey",
    "recvkey",
    "recvtok",
    "sendrand",
    "sendtrunchmac",
    "sendhmac",
    "addrid",
    "ipv4",
    "ipv6",
    "port",
    "addaddrtrunchmac",
    "echo",
    "rawdataack",
    "rawdataseqno",
    "subflowseqno",
    "datalvllen",
    "checksum",
    "datafin.flag",
    "rst_reason",
    "backup.flag",
];

/// The JSON records the tool prints for a capture, grouped by frame number.
pub fn json_records(capture: &Path) -> BTreeMap<u64, Vec<serde_json::Value>> {
    let options = RunOptions {
        read: Some(capture.to_path_buf()),
        mode: OutputMode::Json,
        ..RunOptions::default()
    };
    let mut out = Vec::new();
    cli::run(&options, &mut out).unwrap_or_else(|error| panic!("{}: {error}", capture.display()));
    let mut frames: BTreeMap<u64, Vec<serde_json::Value>> = BTreeMap::new();
    for line in String::from_utf8(out).unwrap().lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        frames
            .entry(record["frame"].as_u64().unwrap())
            .or_default()
            .push(record);
    }
    frames
}

const SUBTYPES: [&str; 9] = [
    "mp_capable",
    "mp_join",
    "dss",
    "add_addr",
    "remove_addr",
    "mp_prio",
    "mp_fail",
    "mp_fastclose",
    "mp_tcprst",
];

/// Our values for one tshark field of one option record, normalised like tshark prints them.
fn field_values(record: &serde_json::Value, tshark_field: &str) -> Vec<String> {
    let subtype = record["subtype"].as_str().unwrap_or_default();
    let number = |name: &str| record.get(name).and_then(|v| v.as_u64());
    let text = |name: &str| {
        record
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let decimal = |name: &str| {
        number(name)
            .map(|v| v.to_string())
            .into_iter()
            .collect::<Vec<_>>()
    };
    match tshark_field {
        "subtype" => vec![SUBTYPES
            .iter()
            .position(|name| *name == subtype)
            .map_or(subtype.to_string(), |index| index.to_string())],
        "flags" => number("flags")
            .map(|v| format!("0x{v:02x}"))
            .into_iter()
            .collect(),
        "sendkey" => decimal("sender_key"),
        "recvkey" => decimal("receiver_key"),
        "recvtok" => decimal("token"),
        "sendrand" => decimal("nonce"),
        "sendtrunchmac" if subtype == "mp_join" => decimal("hmac"),
        "sendhmac" => text("hmac").into_iter().collect(),
        "addaddrtrunchmac" if subtype == "add_addr" => decimal("hmac"),
        "addrid" => match record.get("address_ids").and_then(|v| v.as_array()) {
            Some(ids) => ids.iter().map(|id| id.to_string()).collect(),
            None => decimal("address_id"),
        },
        "ipv4" => text("address")
            .filter(|a| !a.contains(':'))
            .into_iter()
            .collect(),
        "ipv6" => text("address")
            .filter(|a| a.contains(':'))
            .into_iter()
            .collect(),
        "port" => decimal("port"),
        "echo" => decimal("echo"),
        "rawdataack" => decimal("data_ack"),
        "rawdataseqno" => decimal("dsn"),
        "subflowseqno" => decimal("subflow_seq"),
        "datalvllen" => decimal("data_len"),
        "checksum" => number("checksum")
            .map(|v| format!("0x{v:04x}"))
            .into_iter()
            .collect(),
        "datafin.flag" => decimal("data_fin"),
        "rst_reason" => number("reason")
            .map(|v| format!("0x{v:02x}"))
            .into_iter()
            .collect(),
        "backup.flag" => decimal("backup"),
        "version" => decimal("version"),
        _ => Vec::new(),
    }
}

/// Compares our JSON output for `capture` with a tshark field dump (header row included).
/// Returns (compared values, mismatch descriptions).
pub fn compare_with_tshark_dump(capture: &Path, dump: &str) -> (usize, Vec<String>) {
    let ours = json_records(capture);
    let name = capture.file_name().unwrap().to_string_lossy().to_string();
    let mut lines = dump.lines();
    let header: Vec<&str> = lines.next().expect("header row").split('\t').collect();
    let mut compared = 0;
    let mut mismatches = Vec::new();
    let mut tshark_frames = Vec::new();
    for line in lines {
        let row: BTreeMap<&str, &str> = header.iter().copied().zip(line.split('\t')).collect();
        let frame: u64 = row["frame.number"].parse().unwrap();
        tshark_frames.push(frame);
        let records = ours.get(&frame).cloned().unwrap_or_default();
        let first = records.first();
        for (tshark_field, ours_field) in [
            ("ip.src", "src"),
            ("ipv6.src", "src"),
            ("ip.dst", "dst"),
            ("ipv6.dst", "dst"),
        ] {
            let theirs = row.get(tshark_field).copied().unwrap_or_default();
            if !theirs.is_empty() && first.and_then(|r| r[ours_field].as_str()) != Some(theirs) {
                mismatches.push(format!(
                    "{name} frame {frame} {tshark_field}: tshark {theirs:?}"
                ));
            }
        }
        for (tshark_field, ours_field) in [("tcp.srcport", "sport"), ("tcp.dstport", "dport")] {
            let theirs = row.get(tshark_field).copied().unwrap_or_default();
            if first
                .and_then(|r| r[ours_field].as_u64())
                .map(|p| p.to_string())
                .as_deref()
                != Some(theirs)
            {
                mismatches.push(format!(
                    "{name} frame {frame} {tshark_field}: tshark {theirs:?}"
                ));
            }
        }
        for field in TSHARK_FIELDS {
            let theirs = row
                .get(format!("tcp.options.mptcp.{field}").as_str())
                .copied()
                .unwrap_or_default();
            let ours: Vec<String> = records
                .iter()
                .flat_map(|record| field_values(record, field))
                .collect();
            let ours = ours.join(",");
            compared += 1;
            if theirs != ours {
                mismatches.push(format!(
                    "{name} frame {frame} {field}: tshark {theirs:?}, ours {ours:?}"
                ));
            }
        }
    }
    for frame in ours.keys() {
        if !tshark_frames.contains(frame) {
            mismatches.push(format!(
                "{name} frame {frame}: we print MPTCP options tshark does not see"
            ));
        }
    }
    (compared, mismatches)
}

/// Runs every frame of a capture through a tracker and returns the events with their frame
/// numbers.
pub fn track(capture: &Path, config: TrackerConfig) -> (Tracker, Vec<(u64, Event)>) {
    let data = std::fs::read(capture).unwrap();
    let mut file = CaptureFile::parse(&data).unwrap();
    let mut tracker = Tracker::new(config);
    let mut events = Vec::new();
    while let Some(frame) = file.next_frame().unwrap() {
        if let Ok(Some(segment)) = capture::decode_frame(frame.link, frame.data) {
            tracker.handle_segment(frame.timestamp, &segment);
        }
        while let Some(event) = tracker.poll_event() {
            events.push((frame.number, event));
        }
    }
    (tracker, events)
}
