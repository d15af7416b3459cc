//! Every PromQL expression in `grafana/dashboards/mpip-proxy.json` names only
//! metrics `mpip_proxy::metrics::MpipMetrics` exports, and the dashboard is
//! shaped like the mptcp-proxy one (data source variable, paths first).

use std::collections::BTreeSet;
use std::path::Path;

use mpip_proxy::metrics::MpipMetrics;
use mpip_proxy::node::{NodeCounters, PathCounters, PathSnapshot};
use mpip_proxy::path_manager::PathState;
use mpip_proxy::table::path::DelayMetrics;
use mpip_proxy::wire::{NodeId, PathId};
use prometheus_client::registry::Registry;

fn dashboard() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana/dashboards/mpip-proxy.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON")
}

fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr" | "query" | "definition", serde_json::Value::String(expr)) => {
                        out.push(expr.clone())
                    }
                    _ => exprs(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// Series names in the text exposition after one update with one path.
fn exported() -> BTreeSet<String> {
    let metrics = MpipMetrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let mut delay = DelayMetrics::default();
    delay.record(1500);
    let path = PathSnapshot {
        path: PathId(1),
        node: NodeId([2, 0, 0, 0, 0, 1]),
        interface: "p1".into(),
        local: "10.0.1.1:4789".parse().unwrap(),
        remote: "10.0.1.2:5000".parse().unwrap(),
        state: PathState::Active,
        counters: PathCounters {
            tx_packets: 1,
            tx_bytes: 100,
            rx_packets: 1,
            rx_bytes: 100,
        },
        delay,
        weight: Some(500.0),
    };
    metrics.update(0, 1, 1, &[path], NodeCounters::default());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_dashboard_references_only_exported_metrics() {
    let exported = exported();
    assert!(exported.contains("mpip_path_bytes_total"), "{exported:?}");
    let mut found = Vec::new();
    exprs(&dashboard(), &mut found);
    assert!(
        found.len() >= 10,
        "the test read the expressions: {found:?}"
    );
    let mut checked = 0;
    for expr in &found {
        let names = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("mpip_"));
        for name in names {
            assert!(exported.contains(name), "{name} is not exported ({expr})");
            checked += 1;
        }
    }
    assert!(checked >= 10, "{checked} metric references checked");
}

#[test]
fn the_dashboard_has_a_datasource_variable_and_paths_first() {
    let dashboard = dashboard();
    assert_eq!(dashboard["templating"]["list"][0]["type"], "datasource");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert_eq!(panels[0]["type"], "row");
    assert_eq!(panels[0]["title"], "Paths");
    assert!(panels[1]["targets"][0]["expr"]
        .as_str()
        .unwrap()
        .contains("mpip_path_bytes_total"));
}
