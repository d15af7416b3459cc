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

/// `--generate-key` prints a key file both ends can use; `--check-config`
/// reads the key file too, and refuses one others may read.
#[test]
fn generated_keys_are_checked_with_the_configuration() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mpip-proxy"))
        .args(["--generate-key", "3"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stanza = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        stanza.contains("id = 3") && stanza.contains("secret = \""),
        "{stanza}"
    );
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, &stanza).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut config = std::fs::read_to_string(examples().join("mpipd.toml")).unwrap();
    config.push_str(&format!(
        "\n[auth]\nkey_file = {:?}\n",
        keys.display().to_string()
    ));
    let path = dir.path().join("mpipd.toml");
    std::fs::write(&path, config).unwrap();
    let check = |binary: &str| {
        Command::new(binary)
            .arg("--check-config")
            .arg("--config")
            .arg(&path)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    let ok = check(env!("CARGO_BIN_EXE_mpipd"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = check(env!("CARGO_BIN_EXE_mpipd"));
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("auth.key_file") && stderr.contains("chmod 600"),
        "{stderr}"
    );
}
