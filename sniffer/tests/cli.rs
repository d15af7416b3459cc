//! The `mptcp-sniffer` binary: output modes and error handling.

mod common;

use std::process::{Command, Output};

fn sniffer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mptcp-sniffer"))
        .args(args)
        .output()
        .expect("run mptcp-sniffer")
}

fn fixture(relative: &str) -> String {
    common::fixture(relative).display().to_string()
}

#[test]
fn json_lines_with_exact_64_bit_integers() {
    let output = sniffer(&["--read", &fixture("tcpdump/mptcp-v1.pcap"), "--json"]);
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    // Keys above 2^53 are written exactly, not as doubles.
    assert!(
        stdout.contains("\"sender_key\":2295531734017261039"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"data_ack\":14413541604287230030"),
        "{stdout}"
    );
    let records: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records[0]["frame"], 1);
    assert_eq!(records[0]["subtype"], "mp_capable");
    assert_eq!(records[0]["src"], "10.0.1.1");
    assert_eq!(records[0]["dport"], 10004);
    assert!(records[0]["ts"].as_f64().unwrap() > 1.5e9);
}

#[test]
fn tcprst_fields() {
    let output = sniffer(&["--read", &fixture("tcpdump/mptcp-tcprst.pcap"), "--json"]);
    let records: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2);
    assert_eq!(
        (
            records[0]["reason"].as_u64(),
            records[0]["transient"].as_u64()
        ),
        (Some(0), Some(0))
    );
    assert_eq!(
        (
            records[1]["reason"].as_u64(),
            records[1]["transient"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(records[1]["flags"].as_u64(), Some(0x81));
}

#[test]
fn text_lines() {
    let output = sniffer(&["--read", &fixture("tcpdump/mptcp-aa-echo.pcap")]);
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(
        lines[0].starts_with("1 ") && lines[0].contains("10.0.1.1:10000 > 10.0.3.2:54737 add_addr"),
        "{stdout}"
    );
    assert!(
        lines[0].contains("address=10.0.2.1") && lines[0].contains("echo=0"),
        "{stdout}"
    );
    assert!(lines[2].contains("echo=1"), "{stdout}");
}

#[test]
fn events_mode() {
    let output = sniffer(&[
        "--read",
        &fixture("dpi-mptcp/mp_rejected.pcap"),
        "--events",
        "--json",
    ]);
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 1, "{stdout}");
    assert_eq!(events[0]["event"], "fallback");
    assert_eq!(events[0]["frame"], 2);
    let output = sniffer(&["--read", &fixture("dpi-mptcp/mod_tok.pcap"), "--events"]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("UnknownToken"), "{stdout}");
}

#[test]
fn unreadable_and_unsupported_files_fail_clearly() {
    let directory = tempfile::tempdir().unwrap();
    let missing = directory.path().join("missing.pcap");
    let output = sniffer(&["--read", missing.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("missing.pcap"));

    let text = directory.path().join("notes.txt");
    std::fs::write(&text, "hello, not a capture").unwrap();
    let output = sniffer(&["--read", text.to_str().unwrap(), "--json"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a pcap or pcapng file"));

    let mut header = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
    header.extend_from_slice(&[0; 8]);
    header.extend_from_slice(&65535u32.to_le_bytes());
    header.extend_from_slice(&147u32.to_le_bytes());
    let unsupported = directory.path().join("user0.pcap");
    std::fs::write(&unsupported, header).unwrap();
    let output = sniffer(&["--read", unsupported.to_str().unwrap()]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unsupported link type 147"));

    let output = sniffer(&[
        "--read",
        &fixture("tcpdump/mptcp-v1.pcap"),
        "--interface",
        "lo",
    ]);
    assert!(!output.status.success());
    let output = sniffer(&[]);
    assert!(!output.status.success());
}

#[test]
fn truncated_capture_prints_what_it_can_and_warns() {
    let directory = tempfile::tempdir().unwrap();
    let mut data = std::fs::read(common::fixture("tcpdump/mptcp-tcprst.pcap")).unwrap();
    data.truncate(data.len() - 5);
    let cut = directory.path().join("cut.pcap");
    std::fs::write(&cut, data).unwrap();
    let output = sniffer(&["--read", cut.to_str().unwrap(), "--json"]);
    assert!(output.status.success());
    assert_eq!(String::from_utf8(output.stdout).unwrap().lines().count(), 1);
    assert!(String::from_utf8_lossy(&output.stderr).contains("cut short"));
}
