//! Capacity in network namespaces: 32 real `mpipd` clients, each in a host
//! of its own with two paths (two bridged access networks), download
//! through the proxy end's HTTP proxy at once. Every file arrives intact,
//! every client has its own tunnel address, and the sharded proxy end's
//! steering programs keep each client on one shard (no hand-over).
//!
//! In its own test binary: it loads the machine.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use testbed::{pseudo_random, Background, Options};

const CLIENTS: usize = 32;

#[test]
fn thirty_two_clients_download_at_once() {
    let file = pseudo_random(4 << 20, 0x3232);
    let Some(lab) = MpipLab::new(
        Options {
            subflow_endpoint: false,
            extra_clients: CLIENTS,
            ..Options::default()
        },
        &[("file.bin", &file)],
        |proxy| {
            let interfaces = ["p1", "p2", "br1", "br2"].map(toml::Value::from).to_vec();
            section(proxy, "paths").insert("interfaces".into(), interfaces.into());
        },
        |_| {},
    ) else {
        return;
    };
    // One mpipd per extra client host, from the example configuration.
    let mut daemons: Vec<(String, Background, PathBuf)> = Vec::new();
    for k in 1..=CLIENTS {
        let ns = lab.tb.extra_client_ns(k);
        let dir = lab.out_path(&format!("c{k}"));
        std::fs::create_dir(&dir).expect("dir");
        let config = config_from_example(&dir, "mpipd.toml", |client| {
            set_interfaces(client, &["a1", "a2"]);
            let endpoints = ["10.1.0.1:4789", "10.2.0.1:4789"]
                .map(toml::Value::from)
                .to_vec();
            section(client, "proxy").insert("endpoints".into(), endpoints.into());
            section(client, "metrics").insert("address".into(), "off".into());
        });
        let log = dir.join("mpipd.log");
        let mut command = lab.tb.command(&ns, env!("CARGO_BIN_EXE_mpipd"));
        command
            .arg("--config")
            .arg(&config)
            .stderr(std::fs::File::create(&log).expect("log"));
        daemons.push((ns, Background::start(command).expect("mpipd"), log));
    }
    let started = Instant::now();
    let mut addresses = Vec::new();
    for (ns, _, log) in &daemons {
        loop {
            let route = lab
                .tb
                .exec(ns, &["ip", "route", "get", "10.200.0.1"])
                .unwrap_or_default();
            if route.contains("dev mpip0") {
                if let Some(address) = tunnel_address(&lab, ns) {
                    addresses.push(address);
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{ns} has no tunnel: {route}\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!(
        "{CLIENTS} clients: all tunnels up {:?} after start",
        started.elapsed()
    );
    let mut distinct = addresses.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), CLIENTS, "one address each: {addresses:?}");

    let url = format!("http://{SERVER}/file.bin");
    let began = Instant::now();
    let mut downloads: Vec<(PathBuf, Background)> = daemons
        .iter()
        .enumerate()
        .map(|(i, (ns, _, _))| {
            let out = lab.out_path(&format!("c{}/file.out", i + 1));
            let mut curl = lab.tb.command(ns, "curl");
            curl.args(["-sS", "--fail", "--max-time", "120", "-x", PROXY_HTTP, "-o"])
                .arg(&out)
                .arg(&url);
            (out, Background::start(curl).expect("curl"))
        })
        .collect();
    for (out, curl) in &mut downloads {
        watch_download(out, curl, Duration::from_secs(120));
    }
    let took = began.elapsed();
    let total = (CLIENTS * file.len()) as f64;
    eprintln!(
        "{CLIENTS} clients: {:.0} MiB in {took:?}, {:.2} Gbit/s aggregate",
        total / (1 << 20) as f64,
        total * 8.0 / took.as_secs_f64() / 1e9
    );
    let expected = sha256(&file);
    for (out, _) in &downloads {
        let received = std::fs::read(out).expect("downloaded");
        assert!(
            received.len() == file.len() && sha256(&received) == expected,
            "{} intact ({} of {} bytes)",
            out.display(),
            received.len(),
            file.len()
        );
    }
    std::thread::sleep(Duration::from_millis(700));
    let metrics = lab.metrics();
    let peers = metrics
        .lines()
        .find_map(|line| line.strip_prefix("mpip_peers "))
        .and_then(|value| value.trim().parse::<f64>().ok());
    assert_eq!(
        peers,
        Some((CLIENTS + 1) as f64),
        "the proxy end serves every client (and the lab's own)"
    );
    assert!(
        metrics.contains("mpip_shard_handovers_total 0"),
        "each client's traffic stayed on its shard"
    );
    for (ns, mut daemon, log) in daemons {
        daemon.signal(libc::SIGTERM).expect("SIGTERM");
        let status = daemon
            .wait_timeout(Duration::from_secs(20))
            .expect("mpipd exits");
        assert!(
            status.success(),
            "{ns}: {status}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}
