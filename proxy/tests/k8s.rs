//! The Kubernetes manifests in `deploy/k8s/` (issue 14): they parse as YAML (python3-yaml), the proxy
//! configuration in the ConfigMap loads with only real keys (serde's `deny_unknown_fields`), bird parses
//! its configuration, the DaemonSet passes only options `mptcp-proxy --help` lists and wires volumes,
//! probes and the grace period to what the configuration says, and every field carries a comment.

use std::path::{Path, PathBuf};
use std::process::Command;

use mptcp_proxy::Config;

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

/// Every YAML document of a file, as JSON (through python3-yaml, as `kubectl` would read it).
fn documents(name: &str) -> Vec<serde_json::Value> {
    let path = k8s_dir().join(name);
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(&path)
        .output()
        .expect("python3 (deploy/prerequisites.sh installs it with python3-yaml)");
    assert!(
        out.status.success(),
        "{} does not parse: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn one(name: &str, kind: &str) -> serde_json::Value {
    let docs = documents(name);
    assert_eq!(docs.len(), 1, "{name}");
    assert_eq!(docs[0]["kind"], kind, "{name}");
    docs[0].clone()
}

fn text<'a>(value: &'a serde_json::Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"))
}

#[test]
fn manifests_parse_and_name_only_real_keys_and_options() {
    let config_map = one("configmap.yaml", "ConfigMap");
    let daemon_set = one("daemonset.yaml", "DaemonSet");

    // The proxy's file: real keys only; with the node's --announce it is a valid cluster instance.
    let toml = text(&config_map["data"]["mptcp-proxy.toml"], "mptcp-proxy.toml");
    let mut config = Config::from_toml(toml, "ConfigMap mptcp-proxy.toml").expect("valid config");
    let cluster = config.cluster.clone().expect("[cluster]");
    assert!(
        cluster.announce.is_none(),
        "each node gives its own --announce"
    );
    config.cluster.as_mut().expect("cluster").announce = Some("192.0.2.11".parse().unwrap());
    config.add_cluster_listeners();
    config
        .validate("ConfigMap with --announce")
        .expect("valid instance");
    assert_eq!(config.listeners.len(), 2);

    // bird's file parses once the init container has filled in the node's address, and its static
    // route watches the device the proxy creates.
    let bird = text(&config_map["data"]["bird.conf"], "bird.conf").replace("NODE_IP", "192.0.2.11");
    let device = cluster.announce_device.clone().expect("a device");
    assert!(bird.contains(&format!("via \"{device}\"")), "{bird}");
    let dir = tempfile::tempdir().expect("tempdir");
    let bird_path = dir.path().join("bird.conf");
    std::fs::write(&bird_path, &bird).expect("write");
    let parsed = Command::new("bird")
        .arg("-p")
        .arg("-c")
        .arg(&bird_path)
        .output()
        .expect("bird (bird2, deploy/prerequisites.sh)");
    assert!(
        parsed.status.success(),
        "bird: {}",
        String::from_utf8_lossy(&parsed.stderr)
    );

    // The DaemonSet.
    let pod = &daemon_set["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(
        daemon_set["spec"]["selector"]["matchLabels"],
        daemon_set["spec"]["template"]["metadata"]["labels"]
    );
    let containers = pod["containers"].as_array().expect("containers");
    let names: Vec<&str> = containers
        .iter()
        .map(|c| text(&c["name"], "name"))
        .collect();
    assert_eq!(names, ["proxy", "bird"]);
    let proxy = &containers[0];
    let args: Vec<&str> = proxy["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| text(a, "arg"))
        .collect();
    let help = Command::new(env!("CARGO_BIN_EXE_mptcp-proxy"))
        .arg("--help")
        .output()
        .expect("--help");
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(&format!("{flag} ")),
            "{flag} is not an option of mptcp-proxy"
        );
    }
    let value_of = |flag: &str| {
        let at = args.iter().position(|a| *a == flag).expect(flag);
        args[at + 1]
    };
    assert_eq!(value_of("--announce"), "$(NODE_IP)");
    let metrics_port: u16 = value_of("--metrics")
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("--metrics ADDR:PORT");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(proxy[probe]["httpGet"]["port"], metrics_port, "{probe}");
    }
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/readyz");
    let env_node_ip = proxy["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "NODE_IP")
        .expect("NODE_IP");
    assert_eq!(
        env_node_ip["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    // Volumes: the config file is where --config points, the state survives on the node.
    let volumes = pod["volumes"].as_array().expect("volumes");
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("volume {name}"))
    };
    let mount = |container: &serde_json::Value, name: &str| -> String {
        container["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["name"] == name)
            .map(|m| text(&m["mountPath"], "mountPath").to_owned())
            .unwrap_or_else(|| panic!("mount {name}"))
    };
    assert_eq!(
        volume("config")["configMap"]["name"],
        config_map["metadata"]["name"]
    );
    assert_eq!(
        format!("{}/mptcp-proxy.toml", mount(proxy, "config")),
        value_of("--config")
    );
    assert_eq!(
        Path::new(&mount(proxy, "state")),
        cluster.state_dir.as_path()
    );
    assert!(volume("state")["hostPath"]["path"].is_string());
    // The grace period covers the whole drain: withdrawal, transfers, last bytes.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let drain = cluster.join_grace + cluster.withdraw_delay + 2 * config.limits.drain_timeout;
    assert!(
        grace as f64 > drain.as_secs_f64(),
        "grace period {grace}s <= drain {drain:?}"
    );
    assert_eq!(
        daemon_set["metadata"]["namespace"],
        config_map["metadata"]["namespace"]
    );
}

/// Every key line outside block scalars has a comment on it or on the line above.
#[test]
fn every_manifest_field_is_explained() {
    let mut checked = 0;
    for name in ["configmap.yaml", "daemonset.yaml"] {
        let text = std::fs::read_to_string(k8s_dir().join(name)).expect("read");
        let mut block_indent: Option<usize> = None;
        let mut previous = "";
        for (number, line) in text.lines().enumerate() {
            let indent = line.len() - line.trim_start().len();
            let trimmed = line.trim_start();
            if let Some(block) = block_indent {
                if trimmed.is_empty() || indent > block {
                    continue;
                }
                block_indent = None;
            }
            let item = trimmed.strip_prefix("- ").unwrap_or(trimmed);
            let is_key = !trimmed.starts_with('#')
                && item.split_once(':').is_some_and(|(key, _)| {
                    !key.is_empty() && !key.contains(' ') && !key.contains('"')
                });
            if is_key {
                let explained = line.contains(" # ") || previous.trim_start().starts_with('#');
                assert!(explained, "{name}:{}: no comment: {line}", number + 1);
                checked += 1;
                if item.trim_end().ends_with('|') {
                    block_indent = Some(indent);
                }
            }
            if !trimmed.is_empty() {
                previous = line;
            }
        }
    }
    assert!(checked >= 80, "only {checked} fields checked");
}

/// The systemd drop-in for cluster mode (`deploy/debian/mptcp-proxy-cluster.conf`) loads over the
/// packaged unit without a complaint about its own lines.
#[test]
fn the_cluster_drop_in_verifies_with_the_unit() {
    let debian = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/debian");
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join("mptcp-proxy.service");
    std::fs::copy(debian.join("mptcp-proxy.service"), &unit).expect("unit");
    let drop_in = dir.path().join("mptcp-proxy.service.d");
    std::fs::create_dir(&drop_in).expect("drop-in dir");
    let text = std::fs::read_to_string(debian.join("mptcp-proxy-cluster.conf")).expect("drop-in");
    assert!(text.contains("--cluster-cleanup") && text.contains("/dev/net/tun"));
    std::fs::write(drop_in.join("cluster.conf"), &text).expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (systemd, deploy/prerequisites.sh)");
    let report = String::from_utf8_lossy(&out.stderr);
    // Offline, the only complaint allowed is that the packaged binary is not installed here.
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.contains("is not executable") && !l.trim().is_empty())
        .collect();
    assert!(problems.is_empty(), "systemd-analyze: {report}");
}
