//! Operating the proxy (issue 11), end to end: live reload during a throttled download, the
//! `/connections` view of a two-subflow client, sd_notify, and logs fit for journald and files.

mod common;

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use testbed::{Background, Options};

const PROXY: &str = "10.0.1.1:3128";

/// Transfers in this binary are serialized: two bulk downloads through IFB and HTB on a loaded 2-core
/// machine would measure each other.
static TRANSFERS: Mutex<()> = Mutex::new(());

fn proxy_addr() -> SocketAddr {
    PROXY.parse().expect("literal")
}

/// A config with two download classes, one per path, and a forward listener; `deny` adds a denied
/// destination and `path1` sets path 1's class rate.
fn reload_config(log: &str, path1: &str, deny: Option<&str>) -> String {
    let deny = deny.map_or_else(String::new, |net| format!(", \"{net}\""));
    format!(
        r#"
[[listener]]
address = "{PROXY}"

[metrics]
address = "off"

[acl]
deny_destinations = ["0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16"{deny}]

[access_log]
path = "{log}"
format = "json"

[throttle]
[[throttle.classes]]
name = "path1"
interface = "p1"
rate = "{path1}"

[[throttle.classes]]
name = "path2"
interface = "p2"
rate = "40mbit"

[[throttle.rules]]
match = {{ interface = "p1" }}
class = "path1"

[[throttle.rules]]
match = {{ interface = "p2" }}
class = "path2"
"#
    )
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn log_text(lab: &Lab, name: &str) -> String {
    std::fs::read_to_string(lab.path(name)).unwrap_or_default()
}

/// The HTTP status curl saw for `url` through the proxy (no --fail).
fn status_via_proxy(lab: &Lab, url: &str) -> String {
    let out = lab.client(&[
        "mptcpize",
        "run",
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-x",
        "http://10.0.1.1:3128",
        url,
    ]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tc_classes(lab: &Lab, interface: &str) -> String {
    lab.tb
        .exec(
            lab.tb.proxy_ns(),
            &["tc", "class", "show", "dev", interface],
        )
        .expect("tc class show")
}

/// Issue 11's reload test: during a throttled 64 MiB download, the server's address is denied and
/// path 1's class rate changes; SIGHUP. The download finishes intact, a new request gets 403, and tc
/// shows the new rate. Then a configuration with an error is refused with one line naming the file,
/// the key and the reason, and the running configuration stays.
#[test]
fn sighup_applies_acl_and_class_rate_without_dropping_a_download() {
    let Some(lab) = Lab::with_options(Options {
        path_rate_mbit: [Some(100), Some(100)],
        ..Options::default()
    }) else {
        return;
    };
    let _serial = TRANSFERS.lock().unwrap_or_else(|p| p.into_inner());
    let access_log = lab.path("access.log").display().to_string();
    let config = lab.config("proxy.toml", &reload_config(&access_log, "40mbit", None));
    let stderr = std::fs::File::create(lab.path("proxy.err")).expect("stderr file");
    let mut cmd = lab
        .tb
        .command(lab.tb.proxy_ns(), env!("CARGO_BIN_EXE_mptcp-proxy"));
    cmd.args(["--config", &config.display().to_string()])
        .env("RUST_LOG", "info")
        .stderr(stderr);
    let mut proxy = Background::start(cmd).expect("start proxy");
    lab.tb
        .wait_for_tcp(lab.tb.proxy_ns(), proxy_addr(), Duration::from_secs(20))
        .expect("proxy listening");
    wait_for("the classes", Duration::from_secs(10), || {
        tc_classes(&lab, "p1").contains("rate 40Mbit")
    });

    let output = lab.path("big.out");
    let mut curl = lab.tb.command(lab.tb.client_ns(), "mptcpize");
    curl.args([
        "run",
        "curl",
        "-sS",
        "--fail",
        "-x",
        "http://10.0.1.1:3128",
        "-o",
    ])
    .arg(&output)
    .arg("http://10.0.3.2/big.bin");
    let mut download = Background::start(curl).expect("start curl");
    wait_for("a classified subflow", Duration::from_secs(15), || {
        lab.tb
            .exec(
                lab.tb.proxy_ns(),
                &["nft", "list", "map", "inet", "mptcp_proxy", "download4"],
            )
            .is_ok_and(|map| map.contains(": 4d50:"))
    });

    std::fs::write(
        &config,
        reload_config(&access_log, "10mbit", Some("10.0.3.2/32")),
    )
    .expect("rewrite config");
    proxy.signal(libc::SIGHUP).expect("SIGHUP");
    wait_for("the reload", Duration::from_secs(10), || {
        log_text(&lab, "proxy.err").contains("configuration reloaded")
    });
    assert!(
        download.child_mut().try_wait().expect("try_wait").is_none(),
        "the download ended before the reload: the test proves nothing"
    );
    let classes = tc_classes(&lab, "p1");
    assert!(
        classes.contains("rate 10Mbit"),
        "tc class show dev p1:\n{classes}"
    );
    assert_eq!(status_via_proxy(&lab, "http://10.0.3.2/small.txt"), "403");

    let status = download
        .wait_timeout(Duration::from_secs(120))
        .expect("the download finishes");
    assert!(status.success(), "curl failed: {status}");
    assert_eq!(
        file_sha(&output),
        lab.big_sha,
        "download corrupted by the reload"
    );

    // A configuration with an error: refused on one line with file, key and reason; nothing changes.
    std::fs::write(
        &config,
        reload_config(&access_log, "5mbit", Some("10.0.3.2/32"))
            .replace("[metrics]", "[metrics]\nadress = \"x\""),
    )
    .expect("rewrite config");
    proxy.signal(libc::SIGHUP).expect("SIGHUP");
    wait_for("the refusal", Duration::from_secs(10), || {
        log_text(&lab, "proxy.err").contains("configuration refused")
    });
    let log = log_text(&lab, "proxy.err");
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("refused")).collect();
    assert_eq!(refused.len(), 1, "{log}");
    let line = refused[0];
    for part in [
        config.display().to_string().as_str(),
        "metrics.adress",
        "unknown field",
    ] {
        assert!(
            line.contains(part),
            "the refusal does not name {part:?}: {line}"
        );
    }
    assert!(tc_classes(&lab, "p1").contains("rate 10Mbit"));
    assert_eq!(status_via_proxy(&lab, "http://10.0.3.2/small.txt"), "403");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log file:\n{log}"
    );

    proxy.signal(libc::SIGTERM).expect("SIGTERM");
    let status = proxy.wait_timeout(Duration::from_secs(40)).expect("exit");
    assert!(status.success(), "proxy exited with {status}");
}

/// `/connections` and `mptcp-proxy connections` during a download by a two-subflow client: transport,
/// target, upstream, bytes, and both subflows with their interface, backup flag, RTT and throttle class;
/// a plain TCP client is listed with its fallback reason.
#[test]
fn connections_view_lists_both_subflows_of_a_client() {
    let Some(lab) = Lab::new() else { return };
    let _serial = TRANSFERS.lock().unwrap_or_else(|p| p.into_inner());
    let mut proxy = lab.start_proxy(
        &[
            "--listen",
            PROXY,
            "--metrics",
            "127.0.0.1:9464",
            "--throttle",
            "p2=200mbit",
        ],
        proxy_addr(),
    );
    let mut curl = lab.tb.command(lab.tb.client_ns(), "mptcpize");
    curl.args([
        "run",
        "curl",
        "-sS",
        "--limit-rate",
        "2M",
        "-o",
        "/dev/null",
        "-x",
        "http://10.0.1.1:3128",
        "http://10.0.3.2/big.bin",
    ]);
    let _download = Background::start(curl).expect("start curl");
    let _tcp_client = client_connect(&lab.tb, proxy_addr(), false);

    let fetch = |json: bool| {
        let mut args = vec![
            env!("CARGO_BIN_EXE_mptcp-proxy"),
            "connections",
            "--admin",
            "127.0.0.1:9464",
        ];
        if json {
            args.push("--json");
        }
        let out = lab
            .tb
            .command(lab.tb.proxy_ns(), args[0])
            .args(&args[1..])
            .output()
            .expect("run connections");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut view = serde_json::Value::Null;
    // The download under way: both subflows, one classified, and the response flowing. (A view taken
    // as the request head arrives shows no target yet, rightly.)
    wait_for("two subflows with a class", Duration::from_secs(20), || {
        view = serde_json::from_str(&fetch(true)).expect("JSON");
        view["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| {
                c["subflows"]
                    .as_array()
                    .is_some_and(|s| s.len() == 2 && s.iter().any(|f| f["class"] == "cli-p2"))
                    && c["bytes_to_client"].as_u64().unwrap_or(0) > 0
            })
    });
    let connections = view["connections"].as_array().expect("connections");
    let mptcp = connections
        .iter()
        .find(|c| c["transport"] == "mptcp")
        .expect("the MPTCP client");
    assert_eq!(mptcp["target"], "10.0.3.2:80", "{mptcp:#}");
    assert_eq!(mptcp["upstream"], "10.0.3.2:80");
    assert!(mptcp["fallback_reason"].is_null());
    assert!(mptcp["bytes_to_client"].as_u64().unwrap_or(0) > 0);
    let subflows = mptcp["subflows"].as_array().expect("subflows");
    let mut interfaces: Vec<&str> = subflows
        .iter()
        .filter_map(|s| s["interface"].as_str())
        .collect();
    interfaces.sort_unstable();
    assert_eq!(interfaces, ["p1", "p2"], "{mptcp:#}");
    for subflow in subflows {
        assert!(
            subflow["backup"].is_boolean(),
            "backup flag unknown: {subflow}"
        );
        assert!(subflow["rtt_ms"].as_f64().unwrap_or(0.0) > 0.0, "{subflow}");
        let class = if subflow["interface"] == "p2" {
            "cli-p2".into()
        } else {
            serde_json::Value::Null
        };
        assert_eq!(subflow["class"], class, "{subflow}");
    }
    let tcp = connections
        .iter()
        .find(|c| c["transport"] == "fallback_tcp")
        .expect("the TCP client");
    assert!(tcp["fallback_reason"]
        .as_str()
        .is_some_and(|r| r.contains("MP_CAPABLE")));

    let table = fetch(false);
    assert!(table.starts_with("ID  TRANSPORT"), "{table}");
    assert_eq!(table.matches("    subflow ").count(), 3, "{table}");
    assert!(table.contains("class cli-p2"), "{table}");
    assert!(
        table.contains("not MPTCP: the client did not offer MPTCP"),
        "{table}"
    );

    proxy.signal(libc::SIGTERM).expect("SIGTERM");
    let _ = proxy.wait_timeout(Duration::from_secs(40));
}

/// A fake service manager: READY=1 once listening, RELOADING=1 then READY=1 around a SIGHUP reload,
/// STOPPING=1 on SIGTERM. Plain loopback, no namespace needed.
#[test]
fn sd_notify_ready_reloading_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify");
    let manager = UnixDatagram::bind(&socket_path).expect("bind");
    manager
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[metrics]\naddress = \"off\"\n",
    )
    .expect("config");
    let proxy = Command::new(env!("CARGO_BIN_EXE_mptcp-proxy"))
        .args(["--config", &config.display().to_string()])
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let mut buf = [0u8; 512];
    let mut next = || {
        let n = manager.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let ready = next();
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    let pid = libc::pid_t::try_from(proxy.id()).expect("pid");
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    assert!(next().starts_with("READY=1\n"));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert!(next().starts_with("STOPPING=1"));
    let out = proxy.wait_with_output().expect("exit");
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI escapes on a pipe:\n{stderr}"
    );
    assert!(stderr.contains("configuration reloaded"), "{stderr}");
}

/// `--log-format json`: every diagnostic line is a JSON object; a configuration error is printed once.
#[test]
fn json_logs_and_errors_printed_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[metrics]\naddress = \"off\"\n",
    )
    .expect("config");
    let proxy = Command::new(env!("CARGO_BIN_EXE_mptcp-proxy"))
        .args([
            "--config",
            &config.display().to_string(),
            "--log-format",
            "json",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    std::thread::sleep(Duration::from_millis(500));
    let pid = libc::pid_t::try_from(proxy.id()).expect("pid");
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let out = proxy.wait_with_output().expect("exit");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().count() >= 2, "{stderr}");
    for line in stderr.lines() {
        let value: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        assert!(value["level"].is_string(), "{line}");
    }

    std::fs::write(&config, "[limits]\nmax_connections = \"many\"\n").expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_mptcp-proxy"))
        .args(["--config", &config.display().to_string()])
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("limits.max_connections"), "{stderr}");
    assert_eq!(stderr.matches("invalid type").count(), 1, "{stderr}");
}
