//! Every PromQL expression in `grafana/**/*.json` names only metrics the proxy exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use mptcp_proxy::metrics::{
    ClassLabel, ClassLabels, CodeLabel, InterfaceMap, Metrics, PathAccounting,
};

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            json_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
}

fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => exprs(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// Series names the proxy exports: gauges and counters as written, histograms with their suffixes.
fn exported() -> BTreeSet<String> {
    let metrics = Metrics::new();
    // Families with open-ended labels appear once they have a series.
    let sample = |id, acked| mptcp_proxy::sockets::SubflowSample {
        id,
        local: "127.0.0.1:3128".parse().expect("literal"),
        remote: "127.0.0.2:5000".parse().expect("literal"),
        bytes_acked: acked,
        bytes_received: 1,
        rtt_us: 0,
    };
    let mut paths = PathAccounting::default();
    let interfaces = InterfaceMap::default();
    paths.update(&[sample(1, 10), sample(2, 10)], &interfaces, &metrics);
    paths.close_all(&metrics);
    metrics
        .responses
        .get_or_create(&CodeLabel { code: 200 })
        .inc();
    let class = ClassLabels {
        class: "lte".into(),
        interface: "wwan0".into(),
        direction: "download",
    };
    metrics.class_rate.get_or_create(&class).set(1);
    metrics.class_ceil.get_or_create(&class).set(1);
    metrics.class_bytes.get_or_create(&class).inc();
    metrics.class_drops.get_or_create(&class).inc();
    metrics.class_overlimits.get_or_create(&class).inc();
    metrics
        .class_subflows
        .get_or_create(&ClassLabel {
            class: "lte".into(),
        })
        .set(1);
    let text = metrics.render_classic();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("TYPE line");
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        } else {
            names.insert(name.to_owned());
        }
    }
    names
}

/// Identifiers in a PromQL expression that look like our metric names.
pub fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("mptcp_") || t.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn dashboards_reference_only_exported_metrics() {
    let grafana = Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana");
    let mut files = Vec::new();
    json_files(&grafana, &mut files);
    // The MPIP dashboard is checked against the MPIP metrics in mpip-proxy/tests/dashboard.rs.
    files.retain(|f| {
        !f.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("mpip"))
    });
    assert!(
        !files.is_empty(),
        "no dashboards under {}",
        grafana.display()
    );
    let exported = exported();
    assert!(
        exported.contains("mptcp_proxy_path_bytes_total"),
        "{exported:?}"
    );
    let mut checked = 0;
    for file in files {
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read"))
                .expect("valid JSON");
        let mut found = Vec::new();
        exprs(&dashboard, &mut found);
        for expr in found {
            let names = metric_names(&expr);
            assert!(
                !names.is_empty(),
                "{}: {expr} names no metric",
                file.display()
            );
            for name in names {
                assert!(
                    exported.contains(&name),
                    "{}: {name} is not exported ({expr})",
                    file.display()
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} expressions checked");
}

#[test]
fn first_row_is_per_path_throughput() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana/dashboards/mptcp-proxy.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert_eq!(panels[0]["type"], "row");
    assert_eq!(panels[0]["title"], "Paths");
    let first = panels[1]["targets"][0]["expr"].as_str().expect("expr");
    assert!(first.contains("mptcp_proxy_path_bytes_total"), "{first}");
    assert_eq!(dashboard["templating"]["list"][0]["type"], "datasource");
}
