//! Every file in `fixtures/config/valid` loads; every file in `invalid` fails with the message its first
//! line names (`# expect: ...`), which also names the key.

use std::path::Path;

use mptcp_proxy::Config;

fn toml_files(dir: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(dir);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixture folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn valid_configs_load() {
    let files = toml_files("valid");
    assert_eq!(files.len(), 4, "the test must really read the fixtures");
    for file in files {
        if let Err(error) = Config::from_file(&file) {
            panic!("{}: {error}", file.display());
        }
    }
}

#[test]
fn invalid_configs_fail_naming_key_and_reason() {
    let files = toml_files("invalid");
    assert_eq!(files.len(), 16, "the test must really read the fixtures");
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let expected = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an '# expect:' line", file.display()));
        match Config::from_file(&file) {
            Ok(_) => panic!("{} loaded but must fail", file.display()),
            Err(error) => {
                let message = error.to_string();
                assert!(
                    message.contains(expected),
                    "{}: expected {expected:?} in {message:?}",
                    file.display()
                );
                assert!(message.contains(&file.display().to_string()), "{message}");
            }
        }
    }
}

#[test]
fn the_full_example_sets_every_section() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/valid/full.toml");
    let config = Config::from_file(&path).expect("full.toml");
    assert_eq!(config.listeners.len(), 3);
    assert!(config.upstream.mptcp);
    let ports: Vec<String> = config
        .acl
        .connect_ports
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(ports, ["443", "8000-8999"]);
    assert_eq!(config.acl.safe_ports.len(), 3);
    assert_eq!(config.limits.client_ipv6_prefix, 56);
    assert_eq!(config.limits.max_refusals, 64);
    assert_eq!(
        config.upstream.attempt_delay,
        std::time::Duration::from_millis(100)
    );
    assert_eq!(
        config.upstream.response_timeout,
        std::time::Duration::from_secs(30)
    );
    assert_eq!(config.access_log.queue_lines, 1024);
    assert_eq!(config.relay.mode, mptcp_proxy::config::RelayMode::Splice);
    assert_eq!(config.auth.expect("auth").realm, "campus");
}

#[test]
fn the_cluster_example_adds_a_listener_on_the_announced_address() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/valid/cluster.toml");
    let mut config = Config::from_file(&path).expect("cluster.toml");
    let cluster = config.cluster.clone().expect("[cluster]");
    assert_eq!(cluster.announce_device.as_deref(), Some("mptcp-anycast"));
    config.add_cluster_listeners();
    config.add_cluster_listeners();
    let addresses: Vec<String> = config
        .listeners
        .iter()
        .map(|l| l.address.to_string())
        .collect();
    assert_eq!(addresses, ["198.51.100.1:3128", "192.0.2.11:3128"]);
    assert_eq!(
        config.service_addresses(),
        vec!["198.51.100.1".parse::<std::net::IpAddr>().unwrap()]
    );
    config.validate("test").expect("still valid");
}
