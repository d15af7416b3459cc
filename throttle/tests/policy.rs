//! Policy fixtures: every file in fixtures/valid must load, every file in
//! fixtures/invalid must fail with the error named on its first line.

use std::path::{Path, PathBuf};

use mptcp_throttle::{ClassDirection, PolicyError, ThrottleConfig};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxyFile {
    throttle: ThrottleConfig,
}

fn load(text: &str) -> Result<ThrottleConfig, PolicyError> {
    let file: ProxyFile = toml::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
    file.throttle.validate()?;
    Ok(file.throttle)
}

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn valid_fixtures_load() {
    let files = fixtures("valid");
    let mut read = 0;
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        load(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        read += 1;
    }
    assert_eq!(read, files.len());
    assert!(read >= 4, "expected at least 4 valid fixtures, read {read}");
}

#[test]
fn invalid_fixtures_fail_with_their_error() {
    let files = fixtures("invalid");
    let mut read = 0;
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# error: "))
            .unwrap_or_else(|| panic!("{}: first line must be '# error: ...'", path.display()));
        let err = load(&text).expect_err(&format!("{} loaded but should not", path.display()));
        assert!(
            err.to_string().contains(expected),
            "{}: error {:?} does not contain {:?}",
            path.display(),
            err.to_string(),
            expected
        );
        read += 1;
    }
    assert_eq!(read, files.len());
    assert!(
        read >= 10,
        "expected at least 10 invalid fixtures, read {read}"
    );
}

#[test]
fn full_fixture_values_and_defaults() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/full.toml"),
    )
    .unwrap();
    let config = load(&text).unwrap();
    let lte = &config.classes[0];
    assert_eq!(lte.rate.bits_per_second(), 5_000_000);
    assert_eq!(lte.ceil.unwrap().bits_per_second(), 10_000_000);
    assert_eq!(lte.burst.unwrap().bytes(), 15 * 1024);
    assert_eq!(lte.direction, ClassDirection::Both);
    let wired = &config.classes[1];
    assert_eq!(wired.ceil, None);
    assert_eq!(wired.priority, 0);
    let rule = &config.rules[0];
    assert_eq!(rule.matches.client.unwrap().to_string(), "100.64.0.0/10");
    assert_eq!(rule.matches.local_addr.unwrap().to_string(), "192.0.2.1/32");
    assert_eq!(rule.fwmark, Some(0x10));
    assert!(rule.set_backup);
    // The alias remote_addr lands in client; defaults apply to the rest.
    let second = &config.rules[1];
    assert_eq!(second.matches.client.unwrap().to_string(), "2001:db8::/32");
    assert_eq!(second.min_subflows, 2);
    assert!(!second.set_backup);
}

#[test]
fn empty_table_gets_documented_defaults() {
    let config = load("[throttle]\n").unwrap();
    assert_eq!(config, ThrottleConfig::default());
    assert!(config.enabled);
    assert_eq!(config.nft_table, "mptcp_proxy");
    assert_eq!(config.qdisc_major, 0x4d50);
    assert_eq!(config.ifb_prefix, "mpifb");
    assert_eq!(config.realtime_priority, 1);
}
