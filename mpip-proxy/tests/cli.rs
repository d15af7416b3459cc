//! The two binaries' command lines: help, `--check-config` on the examples,
//! and a clear error (exit 1, the file named) for a bad configuration.

use std::path::Path;
use std::process::Command;

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

#[test]
fn help_names_the_config_option() {
    for binary in [
        env!("CARGO_BIN_EXE_mpipd"),
        env!("CARGO_BIN_EXE_mpip-proxy"),
    ] {
        let out = Command::new(binary).arg("--help").output().unwrap();
        assert!(out.status.success(), "{binary} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("--config <FILE>"), "{help}");
        assert!(help.contains("Multipath IP"), "{help}");
    }
}

#[test]
fn check_config_accepts_the_examples() {
    for (binary, example) in [
        (env!("CARGO_BIN_EXE_mpipd"), "mpipd.toml"),
        (env!("CARGO_BIN_EXE_mpip-proxy"), "mpip-proxy.toml"),
    ] {
        let path = examples().join(example);
        let out = Command::new(binary)
            .arg("--check-config")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
    }
}

#[test]
fn a_bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[paths]\ninterfaces = []\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mpip-proxy"))
        .arg("--check-config")
        .arg("--config")
        .arg(&path)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.toml"), "{stderr}");
    assert!(stderr.contains("paths.interfaces"), "{stderr}");
    let missing = Command::new(env!("CARGO_BIN_EXE_mpipd"))
        .args(["--config", "/nonexistent/mpipd.toml"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/mpipd.toml"));
}
