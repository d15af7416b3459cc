//! Configuration fixtures (`tests/fixtures/{detourd,client}/{valid,invalid}`), the example files in
//! `deploy/examples`, and the command lines.

use std::path::{Path, PathBuf};
use std::process::Command;

use mptcp_detour::client::ClientConfig;
use mptcp_detour::config::Validated;
use mptcp_detour::host::HostConfig;

fn fixtures(kind: &str, validity: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind)
        .join(validity);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

fn detourd(path: &Path) -> Result<HostConfig, String> {
    HostConfig::from_toml(
        &std::fs::read_to_string(path).unwrap(),
        &path.display().to_string(),
    )
    .map_err(|e| e.to_string())
}

fn client(path: &Path) -> Result<ClientConfig, String> {
    ClientConfig::from_toml(
        &std::fs::read_to_string(path).unwrap(),
        &path.display().to_string(),
    )
    .map_err(|e| e.to_string())
}

#[test]
fn valid_fixtures_and_examples_load() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    for path in fixtures("detourd", "valid")
        .into_iter()
        .chain([examples.join("mptcp-detourd.toml")])
    {
        detourd(&path).unwrap_or_else(|e| panic!("{e}"));
    }
    for path in fixtures("client", "valid")
        .into_iter()
        .chain([examples.join("mptcp-detour.toml")])
    {
        client(&path).unwrap_or_else(|e| panic!("{e}"));
    }
    let full = detourd(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/detourd/valid/full.toml"),
    )
    .unwrap();
    assert_eq!(full.keys.len(), 2);
    assert_eq!(
        full.limits.idle_timeout,
        std::time::Duration::from_secs(600)
    );
}

/// Each invalid fixture fails, and the message names the file and what is wrong.
#[test]
fn invalid_fixtures_are_refused_with_the_key() {
    let detourd_expected = [
        ("bad_cidr", "deny_destinations"),
        ("bad_duration", "idle_timeout"),
        ("bad_port_range", "limits.port_range"),
        ("empty_key_clients", "key[0].clients"),
        ("ipv6_listen", "listen"),
        ("no_keys", "no key"),
        ("unknown_key", "mapings_per_client"),
        ("zero_quota", "mappings_per_client"),
        ("zero_rate", "requests_per_second"),
    ];
    let files = fixtures("detourd", "invalid");
    assert_eq!(files.len(), detourd_expected.len());
    for (path, (name, needle)) in files.iter().zip(detourd_expected) {
        assert!(path.ends_with(format!("{name}.toml")), "{}", path.display());
        let error = detourd(path).expect_err(name);
        assert!(
            error.contains(needle) && error.contains(name),
            "{name}: {error}"
        );
    }
    let client_expected = [
        ("bad_address", "detour.example"),
        ("bad_duration", "request_timeout"),
        ("bad_interface", "tunnel_detour[0].interface"),
        ("bad_mss", "tunnel_detour[0].mss"),
        ("bad_version", "nat_detour[0].version"),
        ("duplicate_tunnel", "listed twice"),
        ("ipv6_detour", "IPv4"),
        ("no_detours", "no NAT or tunnel detour"),
        ("unknown_key", "max_detour"),
        ("v2_without_key", "psk_file"),
        ("zero_max_detours", "max_detours"),
    ];
    let files = fixtures("client", "invalid");
    assert_eq!(files.len(), client_expected.len());
    for (path, (name, needle)) in files.iter().zip(client_expected) {
        assert!(path.ends_with(format!("{name}.toml")), "{}", path.display());
        let error = client(path).expect_err(name);
        assert!(
            error.contains(needle) && error.contains(name),
            "{name}: {error}"
        );
    }
}

fn run(binary: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(binary).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn command_lines() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("good.key");
    std::fs::write(&key, "00112233445566778899aabbccddeeff\n").unwrap();
    let short = dir.path().join("short.key");
    std::fs::write(&short, "0011223344\n").unwrap();
    let key = key.to_str().unwrap();
    let short = short.to_str().unwrap();
    let detourd = env!("CARGO_BIN_EXE_mptcp-detourd");
    let client = env!("CARGO_BIN_EXE_mptcp-detour");

    let (ok, text) = run(
        detourd,
        &["--listen", "10.1.6.2", "--psk-file", key, "--check-config"],
    );
    assert!(ok, "{text}");
    let (ok, text) = run(detourd, &["--psk-file", short, "--check-config"]);
    assert!(
        !ok && text.contains("short.key") && text.contains("hex digits"),
        "{text}"
    );
    let (ok, text) = run(
        detourd,
        &["--psk-file", "/nonexistent/key", "--check-config"],
    );
    assert!(!ok && text.contains("/nonexistent/key"), "{text}");
    let (ok, text) = run(detourd, &["--check-config"]);
    assert!(!ok && text.contains("--psk-file"), "{text}");
    let (ok, text) = run(detourd, &["--listen", "nowhere", "--psk-file", key]);
    assert!(!ok && text.contains("--listen"), "{text}");

    let (ok, text) = run(
        client,
        &[
            "--nat-detour",
            "10.1.6.2",
            "--nat-detour",
            "10.1.9.2:4000",
            "--tunnel-detour",
            "tun0",
            "--psk-file",
            key,
            "--max-detours",
            "3",
            "--check-config",
        ],
    );
    assert!(ok, "{text}");
    let (ok, text) = run(client, &["--check-config"]);
    assert!(!ok && text.contains("no NAT or tunnel detour"), "{text}");
    let (ok, text) = run(client, &["--nat-detour", "10.1.6.2", "--check-config"]);
    assert!(!ok && text.contains("psk_file"), "{text}");
    let (ok, text) = run(
        client,
        &[
            "--nat-detour",
            "10.1.6.2",
            "--psk-file",
            short,
            "--check-config",
        ],
    );
    assert!(!ok && text.contains("hex digits"), "{text}");
    let (ok, text) = run(client, &["--help"]);
    assert!(ok);
    for flag in [
        "--nat-detour",
        "--tunnel-detour",
        "--psk-file",
        "--max-detours",
        "--config",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
}
