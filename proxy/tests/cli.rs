//! The binary refuses bad configuration with a clear message and a non-zero exit.

use std::process::Command;

fn proxy() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mptcp-proxy"))
}

#[test]
fn embedded_default_checks_ok() {
    let out = proxy().arg("--check-config").output().expect("run");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "configuration OK\n");
}

#[test]
fn invalid_config_names_the_key_and_exits_non_zero() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/config/invalid/zero_limit.toml"
    );
    let out = proxy().args(["--config", fixture]).output().expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("limits.max_connections: must be at least 1"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn missing_config_file_is_reported() {
    let out = proxy()
        .args(["--config", "/nonexistent/proxy.toml"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("reading /nonexistent/proxy.toml"),
        "{stderr}"
    );
}

#[test]
fn bad_listen_address_is_rejected() {
    let out = proxy()
        .args(["--listen", "nonsense", "--check-config"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}

#[test]
fn unbindable_address_fails_cleanly() {
    // 192.0.2.1 (TEST-NET-1) is not on this host: bind fails with EADDRNOTAVAIL; nothing is sent.
    let out = proxy()
        .args(["--listen", "192.0.2.1:3128"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listening on 192.0.2.1:3128"), "{stderr}");
}
