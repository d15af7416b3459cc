//! Every file in `tests/fixtures/valid` parses and every file in
//! `tests/fixtures/invalid` is refused with an error naming it; the commented
//! examples in `deploy/examples` parse too.

use std::path::{Path, PathBuf};

use mpip_proxy::config::{ClientConfig, ProxyEndConfig};

fn files(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

/// Parses a fixture as the binary its name starts with.
fn load(path: &Path) -> Result<(), String> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    if name.starts_with("mpipd") {
        ClientConfig::from_file(path)
            .map(|_| ())
            .map_err(|e| e.to_string())
    } else {
        ProxyEndConfig::from_file(path)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

#[test]
fn valid_fixtures_parse() {
    let files = files("valid");
    assert_eq!(files.len(), 4, "the test read the fixture folder");
    for file in files {
        load(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}

#[test]
fn invalid_fixtures_are_refused_with_their_name() {
    let files = files("invalid");
    assert_eq!(files.len(), 12, "the test read the fixture folder");
    for file in files {
        let error = load(&file).expect_err(&file.display().to_string());
        assert!(error.contains(&file.display().to_string()), "{error}");
    }
}

#[test]
fn the_examples_parse_and_match_the_testbed() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let client = ClientConfig::from_file(&examples.join("mpipd.toml")).unwrap();
    assert_eq!(client.common.paths.interfaces, ["c1", "c2"]);
    assert_eq!(client.proxy.endpoints.len(), 2);
    assert_eq!(client.common.routing.rules.len(), 1);
    let proxy = ProxyEndConfig::from_file(&examples.join("mpip-proxy.toml")).unwrap();
    assert_eq!(proxy.common.paths.interfaces, ["p1", "p2"]);
    assert_eq!(proxy.port(), 4789);
    assert_eq!(proxy.tunnel.pool.to_string(), "10.200.0.0/24");
    assert!(!proxy.gateway.enabled);
    assert_eq!(proxy.http.port, 3128);
}

#[test]
fn defaults_are_the_documented_ones() {
    let proxy = ProxyEndConfig::from_toml("[paths]\ninterfaces = [\"p1\"]\n", "inline").unwrap();
    assert_eq!(proxy.port(), 4789);
    assert_eq!(proxy.tunnel.pool.to_string(), "10.200.0.0/16");
    assert_eq!(proxy.common.node_id, None, "auto");
    assert_eq!(proxy.common.paths.mtu, 1500);
    assert_eq!(proxy.common.scheduler.step, 10);
    assert_eq!(
        proxy.common.metrics.address,
        Some("127.0.0.1:9465".parse().unwrap())
    );
    let node = proxy.node_config(mpip_proxy::wire::NodeId([2, 0, 0, 0, 0, 1]));
    let defaults = mpip_proxy::path_manager::PathConfig::default();
    assert_eq!(
        node.paths,
        mpip_proxy::path_manager::PathConfig {
            sends_keepalives: false,
            ..defaults
        },
        "the proxy end answers keepalives"
    );
    let client = ClientConfig::from_toml(
        "[paths]\ninterfaces = [\"c1\"]\n[proxy]\nendpoints = [\"192.0.2.1:4789\"]\n",
        "inline",
    )
    .unwrap();
    let node = client.node_config(mpip_proxy::wire::NodeId([2, 0, 0, 0, 0, 2]));
    assert_eq!(node.paths, defaults, "the client sends them");
    assert_eq!(
        defaults.keepalive_interval,
        std::time::Duration::from_secs(15)
    );
}

#[test]
fn routing_profiles_and_shards() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid/mpip-proxy-profiles.toml");
    let config = ProxyEndConfig::from_file(&path).unwrap();
    assert_eq!(
        config.common.routing.names(),
        ["default", "coordinated", "protected"]
    );
    assert_eq!(config.common.routing.active_name(), "coordinated");
    let node = config.node_config(mpip_proxy::wire::NodeId([2, 0, 0, 0, 0, 1]));
    assert_eq!(
        node.routing.rules.len(),
        2,
        "the active profile is in force"
    );
    assert_eq!(config.runtime.shards(), 3);
    let error = load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/invalid/mpipd-profile-pins-unknown-interface.toml"),
    )
    .unwrap_err();
    assert!(
        error.contains("routing.profile.coordinated.rule.path"),
        "{error}"
    );
}
