//! Subflow throttling through the proxy, end to end in the testbed (issue 4): the per-path rates during a
//! download and an upload, and a host left clean after SIGTERM and reconciled after SIGKILL.

mod common;

use std::net::SocketAddr;
use std::sync::Mutex;
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

/// SIGTERM: the proxy exits 0 and leaves none of its qdiscs, IFB devices or nft table behind.
fn stop_and_assert_clean(lab: &Lab, proxy: &mut Background, when: &str) {
    proxy.signal(libc::SIGTERM).expect("SIGTERM");
    let status = proxy.wait_timeout(Duration::from_secs(40)).expect("exit");
    assert!(status.success(), "proxy exited with {status} ({when})");
    assert_eq!(installed_state(lab), Vec::<String>::new(), "{when}");
}

/// Whether the throttle classifies some subflow: an element of its download map (the rules that look
/// the map up are there from the start).
fn subflow_rule_installed(lab: &Lab) -> bool {
    lab.tb
        .exec(
            lab.tb.proxy_ns(),
            &["nft", "list", "map", "inet", "mptcp_proxy", "download4"],
        )
        .is_ok_and(|map| map.contains(": 4d50:"))
}

/// What the proxy's two paths carried during a transfer, from the first classified subflow to the end.
struct PathSplit {
    seconds: f64,
    path1_bytes: f64,
    path2_bytes: f64,
    /// What curl printed.
    output: String,
}

/// Held while a transfer's path split is measured. The tests of this binary run in parallel, and on a
/// small machine two bulk transfers through MPTCP, the proxy and IFB starve each other's CPU: path 2 then
/// measures what the CPU left, not what its class allows (CI once saw 54 Mbit/s in a 100 Mbit/s class).
static PATH_MEASUREMENT: Mutex<()> = Mutex::new(());

/// Runs `mptcpize run curl -sS --fail -x PROXY ARGS...` and measures the bytes the proxy's path 1 and
/// path 2 carried towards the client (`upload` false: interface tx) or from it (`upload` true: rx),
/// from the moment a subflow is classified: before that rule exists path 1 is unthrottled by design.
fn transfer_after_classification(lab: &Lab, args: &[&str], upload: bool) -> PathSplit {
    let counters = |interface| {
        let (rx, tx) = lab
            .tb
            .interface_bytes(lab.tb.proxy_ns(), interface)
            .expect("counters");
        if upload {
            rx
        } else {
            tx
        }
    };
    let _measuring = PATH_MEASUREMENT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let printed = lab.path("curl.out");
    let mut curl = lab.tb.command(lab.tb.client_ns(), "mptcpize");
    curl.args(["run", "curl", "-sS", "--fail", "-x", "http://10.0.1.1:3128"])
        .args(args)
        .stdout(std::fs::File::create(&printed).expect("curl output file"));
    let mut transfer = Background::start(curl).expect("start curl");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !subflow_rule_installed(lab) {
        assert!(Instant::now() < deadline, "no subflow was classified");
        std::thread::sleep(Duration::from_millis(10));
    }
    let before = (counters("p1"), counters("p2"));
    let started = Instant::now();
    let status = transfer
        .wait_timeout(Duration::from_secs(120))
        .expect("curl finishes");
    let seconds = started.elapsed().as_secs_f64();
    assert!(status.success(), "curl failed: {status}");
    PathSplit {
        seconds,
        path1_bytes: (counters("p1") - before.0) as f64,
        path2_bytes: (counters("p2") - before.1) as f64,
        output: std::fs::read_to_string(&printed).expect("curl output"),
    }
}

/// Path 1 at most its 20 Mbit/s class + 10%, and MPTCP moving the bulk to path 2 (at least 2x path 1).
/// A subflow placed in the wrong class, or path 2 shaped like path 1, splits about evenly and fails.
/// How far above 2x a correct split lands is the kernel scheduler's business, not the throttle's:
/// 24 serialized transfers measured 3.1-5.0x, and one that shared the CPU with two others 2.95x.
fn assert_path1_held(split: &PathSplit, what: &str) {
    let mbit = |bytes: f64| bytes * 8.0 / split.seconds / 1e6;
    let (p1, p2) = (split.path1_bytes, split.path2_bytes);
    eprintln!(
        "{what}: {:.2}s, p1 {:.1} Mbit/s, p2 {:.1} Mbit/s",
        split.seconds,
        mbit(p1),
        mbit(p2)
    );
    assert!(
        mbit(p1) <= 22.0,
        "{what}: path 1 carried {:.1} Mbit/s, more than 20 Mbit/s + 10%",
        mbit(p1)
    );
    assert!(
        p2 >= 2.0 * p1,
        "{what}: MPTCP did not move the bulk to path 2: p1 {p1} bytes, p2 {p2} bytes"
    );
}

/// Downloads the big file through the throttled proxy: intact, and path 1 held to its class.
fn assert_path1_throttled_download(lab: &Lab, what: &str) {
    let output = lab.path("big.out");
    let output = output.display().to_string();
    let split =
        transfer_after_classification(lab, &["-o", &output, "http://10.0.3.2/big.bin"], false);
    assert_eq!(file_sha(output.as_ref()), lab.big_sha, "download corrupted");
    assert_path1_held(&split, what);
}

/// The root qdisc of `dev` in the proxy namespace: kind, handle and options as `tc -j` shows them.
fn root_qdisc(lab: &Lab, dev: &str) -> String {
    let shown = lab
        .tb
        .exec(
            lab.tb.proxy_ns(),
            &["tc", "-j", "qdisc", "show", "dev", dev],
        )
        .expect("tc");
    let qdiscs: serde_json::Value = serde_json::from_str(&shown).expect("tc json");
    qdiscs
        .as_array()
        .into_iter()
        .flatten()
        .find(|q| q["root"] == true)
        .map(|q| format!("{} {} {}", q["kind"], q["handle"], q["options"]))
        .unwrap_or_default()
}

#[test]
fn throttled_path_carries_at_most_its_rate_and_the_host_is_left_clean() {
    let Some(lab) = Lab::new() else { return };
    // The operator's own root qdisc on path 1 (a tuned tbf); path 2 has the kernel's default.
    lab.tb
        .exec(
            lab.tb.proxy_ns(),
            &[
                "tc", "qdisc", "add", "dev", "p1", "root", "handle", "7:", "tbf", "rate", "10gbit",
                "burst", "1mb", "latency", "50ms",
            ],
        )
        .expect("operator qdisc");
    let original = (root_qdisc(&lab, "p1"), root_qdisc(&lab, "p2"));
    assert!(original.0.contains("tbf"), "{original:?}");
    let mut proxy = start_throttled(&lab);
    wait_for_installed(&lab);

    // Download: path 1 is held to 20 Mbit/s once the second subflow joins; MPTCP moves the rest to path 2.
    assert_path1_throttled_download(&lab, "download");

    // SIGTERM: everything the proxy installed is gone, and the root qdiscs it replaced are back.
    stop_and_assert_clean(&lab, &mut proxy, "left behind after SIGTERM");
    assert_eq!(
        (root_qdisc(&lab, "p1"), root_qdisc(&lab, "p2")),
        original,
        "root qdiscs after SIGTERM"
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
    stop_and_assert_clean(&lab, &mut restarted, "left behind after restart + SIGTERM");
    assert_eq!(
        (root_qdisc(&lab, "p1"), root_qdisc(&lab, "p2")),
        original,
        "root qdiscs after a crash, a restart and SIGTERM"
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
    let data = format!("@{}", upload_path.display());
    let url = format!("http://{sink}/upload");
    let split = transfer_after_classification(&lab, &["--data-binary", &data, &url], true);
    assert_eq!(split.output, sha256_hex(&upload), "upload corrupted");
    assert_path1_held(&split, "upload");
    stop_and_assert_clean(&lab, &mut proxy, "left behind after SIGTERM");
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
    stop_and_assert_clean(&lab, &mut proxy, "left behind after SIGTERM");
}

#[test]
fn userspace_client_rate_limits_both_forms_without_tc() {
    let Some(lab) = Lab::new() else { return };
    let config = lab.config(
        "limit.toml",
        // The tunnel goes to port 80, outside the default CONNECT ports (443).
        "[metrics]\naddress = \"off\"\n[limits]\nclient_rate = \"20mbit\"\n[acl]\nconnect_ports = [80, 443]\n",
    );
    let _proxy = lab.start_proxy(
        &["--config", &config.display().to_string(), "--listen", PROXY],
        proxy_addr(),
    );
    let range = 8usize << 20;
    let expected = sha256_hex(&pseudo_random(range, BIG_SEED));
    for tunnel in [false, true] {
        let output = lab.path("range.out");
        let output_str = output.display().to_string();
        let last = format!("0-{}", range - 1);
        let mut args = vec!["-r", &last, "-o", &output_str];
        if tunnel {
            args.push("-p");
        }
        args.push("http://10.0.3.2/big.bin");
        let started = Instant::now();
        lab.curl_via_proxy(true, &args);
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
