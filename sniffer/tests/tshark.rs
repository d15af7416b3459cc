//! Every MPTCP option of the fixture captures must decode to the values tshark gives: against
//! the checked-in `*.tshark-fields.tsv` dumps always, and against a live `tshark` run when it
//! is installed (required when `CI=true`).

mod common;

use std::process::Command;

#[test]
fn matches_checked_in_tshark_dumps() {
    let pairs = common::captures_with_tshark_dumps();
    assert!(pairs.len() >= 17, "fixtures missing: {pairs:?}");
    let mut total = 0;
    let mut failures = Vec::new();
    for (capture, dump) in &pairs {
        let dump = std::fs::read_to_string(dump).unwrap();
        let (compared, mismatches) = common::compare_with_tshark_dump(capture, &dump);
        assert!(compared > 0, "{} compared nothing", capture.display());
        total += compared;
        failures.extend(mismatches);
    }
    assert!(
        failures.is_empty(),
        "{} mismatches, first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );
    assert!(total > 90_000, "only {total} values compared");
}

fn tshark_available() -> bool {
    Command::new("tshark")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
}

#[test]
fn matches_live_tshark() {
    if !tshark_available() {
        if std::env::var("CI").is_ok_and(|value| value == "true") {
            panic!("CI=true but tshark is not on PATH: install it (apt-get install tshark)");
        }
        eprintln!("SKIPPED: tshark is not on PATH");
        return;
    }
    let mut failures = Vec::new();
    for (capture, _) in common::captures_with_tshark_dumps() {
        let mut command = Command::new("tshark");
        command
            .arg("-r")
            .arg(&capture)
            .args(["-Y", "mptcp", "-T", "fields", "-E", "header=y"]);
        for field in [
            "frame.number",
            "ip.src",
            "ipv6.src",
            "tcp.srcport",
            "ip.dst",
            "ipv6.dst",
            "tcp.dstport",
        ] {
            command.args(["-e", field]);
        }
        for field in common::TSHARK_FIELDS {
            command.args(["-e", &format!("tcp.options.mptcp.{field}")]);
        }
        let output = command.output().expect("running tshark");
        assert!(
            output.status.success(),
            "tshark failed on {}: {}",
            capture.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let dump = String::from_utf8(output.stdout).unwrap();
        let (compared, mismatches) = common::compare_with_tshark_dump(&capture, &dump);
        assert!(compared > 0, "{} compared nothing", capture.display());
        failures.extend(mismatches);
    }
    assert!(
        failures.is_empty(),
        "{} mismatches, first: {:#?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );
}
