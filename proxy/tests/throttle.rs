//! Subflow throttling through the proxy, end to end in the testbed (issue 4): the per-path rates during a
//! download and an upload, and a host left clean after SIGTERM and reconciled after SIGKILL.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use testbed::Background;

const PROXY: &str = "10.0.1.1:3128";
/// The throttle's defaults: qdisc major 0x4d50, table `mptcp_proxy`, IFB prefix `mpifb`.
const QDISC_HANDLE: &str = "4d50:";

fn proxy_addr() -> SocketAddr {
    PROXY.parse().expect("literal")
}

fn start_throttled(lab: &Lab) -> Background {
    lab.start_proxy(
        &[
            "--listen",
            PROXY,
            "--metrics",
            "off",
            "--throttle",
            "p1=20mbit",
            "--throttle",
            "p2=100mbit",
        ],
        proxy_addr(),
    )
}

/// What the proxy installed in its namespace: HTB roots with its handle, its nft table, IFB devices.
fn installed_state(lab: &Lab) -> Vec<String> {
    let ns = lab.tb.proxy_ns();
    let mut found = Vec::new();
    let qdiscs = lab.tb.exec(ns, &["tc", "-j", "qdisc", "show"]).expect("tc");
    let qdiscs: serde_json::Value = serde_json::from_str(&qdiscs).expect("tc json");
    for q in qdiscs.as_array().into_iter().flatten() {
        if q["handle"] == QDISC_HANDLE || q["kind"] == "ingress" {
            found.push(format!("qdisc {} on {}", q["kind"], q["dev"]));
        }
    }
    let tables = lab.tb.exec(ns, &["nft", "list", "tables"]).expect("nft");
    if tables.contains("mptcp_proxy") {
        found.push("nft table mptcp_proxy".into());
    }
    let links = lab
        .tb
        .exec(ns, &["ip", "-o", "link", "show"])
        .expect("ip link");
    found.extend(
        links
            .lines()
            .filter(|l| l.contains("mpifb"))
            .map(|l| l.to_owned()),
    );
    found
}

fn wait_for_installed(lab: &Lab) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while installed_state(lab).is_empty() {
        assert!(Instant::now() < deadline, "the throttle installed nothing");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Downloads the big file through the proxy and checks the per-path split: path 1 at most its 20 Mbit/s
/// class + 10%, and MPTCP moving the bulk to path 2. `what` names the case in the output.
fn assert_path1_throttled_download(lab: &Lab, what: &str) {
    let before = (lab.proxy_tx("p1"), lab.proxy_tx("p2"));
    let output = lab.path("big.out");
    let started = Instant::now();
    lab.curl_via_proxy(
        true,
        &[
            "-o",
            &output.display().to_string(),
            "http://10.0.3.2/big.bin",
        ],
    );
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(file_sha(&output), lab.big_sha, "download corrupted");
    let p1 = (lab.proxy_tx("p1") - before.0) as f64;
    let p2 = (lab.proxy_tx("p2") - before.1) as f64;
    let p1_mbit = p1 * 8.0 / seconds / 1e6;
    eprintln!(
        "{what}: {seconds:.2}s, p1 {p1_mbit:.1} Mbit/s, p2 {:.1} Mbit/s",
        p2 * 8.0 / seconds / 1e6
    );
    assert!(
        p1_mbit <= 22.0,
        "path 1 carried {p1_mbit:.1} Mbit/s, more than 20 Mbit/s + 10%"
    );
    assert!(
        p2 > 3.0 * p1,
        "MPTCP did not move the bulk to path 2: p1 {p1} bytes, p2 {p2} bytes"
    );
}

#[test]
fn throttled_path_carries_at_most_its_rate_and_the_host_is_left_clean() {
    let Some(lab) = Lab::new() else { return };
    let mut proxy = start_throttled(&lab);
    wait_for_installed(&lab);

    // Download: path 1 is held to 20 Mbit/s once the second subflow joins; MPTCP moves the rest to path 2.
    assert_path1_throttled_download(&lab, "download");

    // SIGTERM: everything the proxy installed is gone.
    proxy.signal(libc::SIGTERM).expect("SIGTERM");
    let status = proxy.wait_timeout(Duration::from_secs(40)).expect("exit");
    assert!(status.success(), "proxy exited with {status}");
    assert_eq!(
        installed_state(&lab),
        Vec::<String>::new(),
        "left behind after SIGTERM"
    );

    // SIGKILL leaves state behind; the next start reconciles it, and its SIGTERM cleans up.
    let mut killed = start_throttled(&lab);
    wait_for_installed(&lab);
    killed.signal(libc::SIGKILL).expect("SIGKILL");
    let _ = killed.wait_timeout(Duration::from_secs(10));
    assert!(
        !installed_state(&lab).is_empty(),
        "SIGKILL should leave state behind"
    );
    let mut restarted = start_throttled(&lab);
    wait_for_installed(&lab);
    lab.curl_via_proxy(true, &["http://10.0.3.2/small.txt"]);
    restarted.signal(libc::SIGTERM).expect("SIGTERM");
    let status = restarted
        .wait_timeout(Duration::from_secs(40))
        .expect("exit");
    assert!(status.success(), "restarted proxy exited with {status}");
    assert_eq!(
        installed_state(&lab),
        Vec::<String>::new(),
        "left behind after restart + SIGTERM"
    );
}

/// The quick form shapes downloads only (seed 002 throttles the download direction); a policy class
/// with `direction = "both"` also shapes uploads, through an IFB device.
const BOTH_DIRECTIONS: &str = r#"
[[listener]]
address = "10.0.1.1:3128"
[metrics]
address = "off"
[throttle]
[[throttle.classes]]
name = "path1"
interface = "p1"
rate = "20mbit"
direction = "both"
[[throttle.classes]]
name = "path2"
interface = "p2"
rate = "100mbit"
direction = "both"
[[throttle.rules]]
class = "path1"
match = { interface = "p1" }
[[throttle.rules]]
class = "path2"
match = { interface = "p2" }
"#;

#[test]
fn upload_is_shaped_through_ifb_by_policy() {
    let Some(lab) = Lab::new() else { return };
    let config = lab.config("both.toml", BOTH_DIRECTIONS);
    let mut proxy = lab.start_proxy(&["--config", &config.display().to_string()], proxy_addr());
    wait_for_installed(&lab);
    let sink = start_upload_sink(&lab.tb, "10.0.3.2:8080".parse().expect("literal"));
    let upload = pseudo_random(32 << 20, 7);
    let upload_path = lab.path("upload.bin");
    std::fs::write(&upload_path, &upload).expect("write upload");
    let before = (
        lab.tb
            .interface_bytes(lab.tb.proxy_ns(), "p1")
            .expect("counters")
            .0,
        lab.tb
            .interface_bytes(lab.tb.proxy_ns(), "p2")
            .expect("counters")
            .0,
    );
    let started = Instant::now();
    let out = lab.client(&[
        "mptcpize",
        "run",
        "curl",
        "-sS",
        "--fail",
        "-x",
        "http://10.0.1.1:3128",
        "--data-binary",
        &format!("@{}", upload_path.display()),
        &format!("http://{sink}/upload"),
    ]);
    let seconds = started.elapsed().as_secs_f64();
    curl_ok(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        sha256_hex(&upload),
        "upload corrupted"
    );
    let p1 = (lab
        .tb
        .interface_bytes(lab.tb.proxy_ns(), "p1")
        .expect("counters")
        .0
        - before.0) as f64;
    let p2 = (lab
        .tb
        .interface_bytes(lab.tb.proxy_ns(), "p2")
        .expect("counters")
        .0
        - before.1) as f64;
    let p1_mbit = p1 * 8.0 / seconds / 1e6;
    eprintln!(
        "upload: {seconds:.2}s, p1 {p1_mbit:.1} Mbit/s, p2 {:.1} Mbit/s",
        p2 * 8.0 / seconds / 1e6
    );
    assert!(
        p1_mbit <= 22.0,
        "path 1 received {p1_mbit:.1} Mbit/s of upload, more than 20 Mbit/s + 10%"
    );
    assert!(
        p2 > 3.0 * p1,
        "MPTCP did not move the upload to path 2: p1 {p1} bytes, p2 {p2} bytes"
    );
    proxy.signal(libc::SIGTERM).expect("SIGTERM");
    let status = proxy.wait_timeout(Duration::from_secs(40)).expect("exit");
    assert!(status.success(), "proxy exited with {status}");
    assert_eq!(
        installed_state(&lab),
        Vec::<String>::new(),
        "left behind after SIGTERM"
    );
}

#[test]
fn invalid_policy_refuses_to_start_naming_the_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[throttle]\n[[throttle.classes]]\nname = \"lte\"\ninterface = \"eth1\"\nrate = \"10mbit\"\n\
         [[throttle.rules]]\nclass = \"wifi\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mptcp-proxy"))
        .args(["--config", &config.display().to_string(), "--check-config"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("throttle.rules[0]") && stderr.contains("wifi"),
        "{stderr}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mptcp-proxy"))
        .args(["--throttle", "eth1=fast", "--check-config"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--throttle"));
}

#[test]
fn sniffer_events_drive_the_throttle() {
    let Some(lab) = Lab::new() else { return };
    let config = lab.config(
        "sniffer.toml",
        "[metrics]\naddress = \"off\"\n[sniffer]\ninterfaces = [\"p1\", \"p2\"]\n[throttle]\nevent_source = \"sniffer\"\n",
    );
    let mut proxy = lab.start_proxy(
        &[
            "--config",
            &config.display().to_string(),
            "--listen",
            PROXY,
            "--throttle",
            "p1=20mbit",
            "--throttle",
            "p2=100mbit",
        ],
        proxy_addr(),
    );
    wait_for_installed(&lab);
    assert_path1_throttled_download(&lab, "sniffer-driven download");
    proxy.signal(libc::SIGTERM).expect("SIGTERM");
    let status = proxy.wait_timeout(Duration::from_secs(40)).expect("exit");
    assert!(status.success(), "proxy exited with {status}");
    assert_eq!(
        installed_state(&lab),
        Vec::<String>::new(),
        "left behind after SIGTERM"
    );
}

#[test]
fn userspace_client_rate_limits_both_forms_without_tc() {
    let Some(lab) = Lab::new() else { return };
    let config = lab.config(
        "limit.toml",
        "[metrics]\naddress = \"off\"\n[limits]\nclient_rate = \"20mbit\"\n",
    );
    let _proxy = lab.start_proxy(
        &["--config", &config.display().to_string(), "--listen", PROXY],
        proxy_addr(),
    );
    let range = 8usize << 20;
    let expected = sha256_hex(&pseudo_random(range, BIG_SEED));
    for tunnel in [false, true] {
        let output = lab.path("range.out");
        let mut argv = vec![
            "mptcpize",
            "run",
            "curl",
            "-sS",
            "--fail",
            "-x",
            "http://10.0.1.1:3128",
            "-r",
        ];
        let last = format!("0-{}", range - 1);
        argv.push(&last);
        let output_str = output.display().to_string();
        argv.extend(["-o", &output_str]);
        if tunnel {
            argv.push("-p");
        }
        argv.push("http://10.0.3.2/big.bin");
        let started = Instant::now();
        curl_ok(&lab.client(&argv));
        let mbit = range as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e6;
        eprintln!("user-space limit, tunnel {tunnel}: {mbit:.1} Mbit/s");
        assert_eq!(file_sha(&output), expected, "limited download corrupted");
        assert!(
            (10.0..=22.0).contains(&mbit),
            "client rate {mbit:.1} Mbit/s, limit 20 Mbit/s"
        );
    }
    // No qdisc or nft table was needed.
    assert_eq!(installed_state(&lab), Vec::<String>::new());
}
