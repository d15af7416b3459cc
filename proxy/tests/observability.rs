//! Observability end to end (issue 5): a real Prometheus scrapes the proxy in the testbed during
//! transfers; every dashboard expression returns data; promtool finds nothing to lint; the access log
//! parses as Squid's native format.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const PROXY: &str = "10.0.1.1:3128";

/// A strict parser of Squid's native access-log line:
/// `time elapsed remotehost code/status bytes method URL rfc931 peerstatus/peerhost type`.
#[derive(Debug)]
struct SquidLine {
    status: u16,
    method: String,
    url: String,
    hierarchy: String,
}

fn parse_squid(line: &str) -> Result<SquidLine, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [time, elapsed, client, code_status, bytes, method, url, user, hier_peer, content_type] =
        fields[..]
    else {
        return Err(format!("{} fields, expected 10: {line}", fields.len()));
    };
    let (secs, millis) = time.split_once('.').ok_or("time has no '.'")?;
    if secs.parse::<u64>().is_err() || millis.len() != 3 || millis.parse::<u16>().is_err() {
        return Err(format!("bad time {time}"));
    }
    elapsed
        .parse::<u64>()
        .map_err(|_| format!("bad elapsed {elapsed}"))?;
    client
        .parse::<IpAddr>()
        .map_err(|_| format!("bad client {client}"))?;
    let (code, status) = code_status.split_once('/').ok_or("no code/status")?;
    if code.is_empty() || !code.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
        return Err(format!("bad result code {code}"));
    }
    if status.len() != 3 {
        return Err(format!("status {status} is not three digits"));
    }
    let status: u16 = status.parse().map_err(|_| format!("bad status {status}"))?;
    bytes
        .parse::<u64>()
        .map_err(|_| format!("bad bytes {bytes}"))?;
    if user.is_empty() || content_type.is_empty() || method.is_empty() || url.is_empty() {
        return Err("empty field".into());
    }
    let (hierarchy, peer) = hier_peer.split_once('/').ok_or("no hierarchy/peer")?;
    if !hierarchy.starts_with("HIER_") || (peer != "-" && peer.parse::<IpAddr>().is_err()) {
        return Err(format!("bad hierarchy/peer {hier_peer}"));
    }
    Ok(SquidLine {
        status,
        method: method.to_owned(),
        url: url.to_owned(),
        hierarchy: hierarchy.to_owned(),
    })
}

fn dashboard_exprs() -> Vec<String> {
    fn walk(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => map.iter().for_each(|(k, v)| match (k.as_str(), v) {
                ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                _ => walk(v, out),
            }),
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../grafana/dashboards/mptcp-proxy.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    let mut out = Vec::new();
    walk(&json, &mut out);
    out
}

fn prometheus_query(lab: &Lab, expr: &str) -> serde_json::Value {
    let out = lab
        .tb
        .command(lab.tb.proxy_ns(), "curl")
        .args(["-sS", "-G", "--data-urlencode"])
        .arg(format!("query={expr}"))
        .arg("http://127.0.0.1:9090/api/v1/query")
        .output()
        .expect("curl");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn values(result: &serde_json::Value) -> Vec<f64> {
    result["data"]["result"]
        .as_array()
        .map(|series| {
            series
                .iter()
                .filter_map(|s| s["value"][1].as_str().and_then(|v| v.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn prometheus_scrapes_the_proxy_and_every_dashboard_expression_has_data() {
    let Some(lab) = Lab::new() else { return };
    let log_path = lab.path("squid-access.log");
    let config = lab.config(
        "proxy.toml",
        &format!(
            "[access_log]\npath = \"{}\"\nformat = \"squid\"\n[acl]\nconnect_ports = [80, 443]\n",
            log_path.display()
        ),
    );
    let proxy_addr: SocketAddr = PROXY.parse().expect("literal");
    // Throttled far above what the transfers need, so the class and rule metrics have data.
    let _proxy = lab.start_proxy(
        &[
            "--config",
            &config.display().to_string(),
            "--listen",
            PROXY,
            "--throttle",
            "p1=2gbit",
            "--throttle",
            "p2=2gbit",
        ],
        proxy_addr,
    );
    let prometheus_config = lab.config(
        "prometheus.yml",
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: mptcp-proxy\n    static_configs:\n      - targets: ['127.0.0.1:9464']\n",
    );
    let _prometheus = lab
        .tb
        .spawn(
            lab.tb.proxy_ns(),
            &[
                "prometheus",
                &format!("--config.file={}", prometheus_config.display()),
                &format!("--storage.tsdb.path={}", lab.path("tsdb").display()),
                "--web.listen-address=127.0.0.1:9090",
                "--log.level=warn",
            ],
        )
        .expect("prometheus");
    lab.tb
        .wait_for_tcp(
            lab.tb.proxy_ns(),
            "127.0.0.1:9090".parse().expect("literal"),
            Duration::from_secs(30),
        )
        .expect("prometheus listening");

    // Counters must be scraped before the traffic, or the first sample already holds it and rate() is 0.
    let deadline = Instant::now() + Duration::from_secs(30);
    while values(&prometheus_query(&lab, "up{job=\"mptcp-proxy\"}")) != [1.0] {
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the proxy"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Traffic over a few scrape intervals: downloads (both forms), an upstream error and a denial.
    let started = Instant::now();
    let mut rounds = 0;
    while rounds < 2 || started.elapsed() < Duration::from_secs(6) {
        rounds += 1;
        for tunnel in [false, true] {
            let mut argv = vec![
                "mptcpize",
                "run",
                "curl",
                "-sS",
                "--fail",
                "-o",
                "/dev/null",
                "-x",
                "http://10.0.1.1:3128",
            ];
            if tunnel {
                argv.push("-p");
            }
            argv.push("http://10.0.3.2/big.bin");
            curl_ok(&lab.client(&argv));
        }
        lab.client(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-x",
            "http://10.0.1.1:3128",
            "http://10.0.3.2:1081/",
        ]);
        lab.client(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-x",
            "http://10.0.1.1:3128",
            "http://127.0.0.1/",
        ]);
    }

    // promtool finds nothing to report in the live output, and the subflow metrics are non-zero.
    let lint = Command::new("ip")
        .args(["netns", "exec", lab.tb.proxy_ns(), "sh", "-c"])
        .arg("curl -sf http://127.0.0.1:9464/metrics > metrics.txt && promtool check metrics < metrics.txt")
        .current_dir(lab.dir.path())
        .output()
        .expect("promtool");
    assert!(
        lint.status.success() && lint.stdout.is_empty() && lint.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    let text = std::fs::read_to_string(lab.path("metrics.txt")).expect("metrics");
    let joined: f64 = text
        .lines()
        .filter(|l| l.starts_with("mptcp_proxy_subflows_joined_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(joined >= 1.0, "no joined subflows in\n{text}");
    for path in ["/healthz", "/readyz"] {
        let out = lab
            .tb
            .exec(
                lab.tb.proxy_ns(),
                &["curl", "-sf", &format!("http://127.0.0.1:9464{path}")],
            )
            .expect(path);
        assert!(!out.is_empty());
    }

    // Every dashboard expression returns a finite value once Prometheus has scraped the traffic.
    let exprs = dashboard_exprs();
    assert!(exprs.len() >= 15);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut missing = exprs.clone();
    while !missing.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        missing.retain(|expr| {
            let query = expr
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            // NaN (e.g. a quantile of a histogram that saw nothing) is not data.
            !values(&prometheus_query(&lab, &query))
                .iter()
                .any(|v| v.is_finite())
        });
    }
    assert!(missing.is_empty(), "expressions without data: {missing:#?}");
    let throughput = prometheus_query(
        &lab,
        "sum by (interface) (rate(mptcp_proxy_path_bytes_total{direction=\"download\"}[1m]))",
    );
    let per_path = values(&throughput);
    assert!(
        per_path.len() >= 2 && per_path.iter().all(|v| *v > 0.0),
        "both paths must show download throughput: {throughput}"
    );

    // The access log is Squid's native format.
    let log = std::fs::read_to_string(&log_path).expect("access log");
    let lines: Vec<SquidLine> = log
        .lines()
        .map(|l| parse_squid(l).unwrap_or_else(|e| panic!("not Squid format: {e}")))
        .collect();
    assert!(lines
        .iter()
        .any(|l| l.status == 200 && l.method == "GET" && l.hierarchy == "HIER_DIRECT"));
    assert!(lines
        .iter()
        .any(|l| l.method == "CONNECT" && l.url == "10.0.3.2:80"));
    assert!(lines.iter().any(|l| l.status == 502));
    assert!(lines
        .iter()
        .any(|l| l.status == 403 && l.hierarchy == "HIER_NONE"));
}
