//! Measurement (ignored): the owner task with the kernel backend steering 10,000 subflows that arrive
//! as events (5,000 two-subflow connections, in bursts), without a proxy around it: exact rule-install
//! latency quantiles, how long the whole set takes, and closing it all. Needs root.
//!
//! `cargo test --release -p mptcp-throttle --test scale -- --ignored --nocapture`

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{require_root, Netns};
use mptcp_throttle::driver::{run_with_backend, ThrottleHooks};
use mptcp_throttle::kernel::KernelBackend;
use mptcp_throttle::{
    event_channel, ConnectionToken, SubflowEvent, SubflowInfo, ThrottleConfig, ThrottleState,
};

#[derive(Clone, Default)]
struct Latencies(Arc<Mutex<Vec<Duration>>>, Arc<Mutex<usize>>);

impl ThrottleHooks for Latencies {
    fn rule_installed(&mut self, latency: Duration) {
        self.0.lock().unwrap().push(latency);
    }
    fn state_applied(&mut self, state: &ThrottleState) {
        *self.1.lock().unwrap() = state.installed().rules.len();
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[test]
#[ignore = "measurement: 10,000 subflows through the owner task"]
fn measure_ten_thousand_subflows() {
    if !require_root("measure_ten_thousand_subflows") {
        return;
    }
    let ns = Netns::new("scale");
    ns.ip(&["link", "add", "c0", "type", "veth", "peer", "name", "c1"]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "c0"]);
    ns.ip(&["link", "set", "c0", "up"]);
    ns.ip(&["link", "set", "c1", "up"]);
    let connections: u32 = std::env::var("MEASURE_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    // MEASURE_SCOPE=shared: one class for all (no class per subscriber to create).
    let scope = std::env::var("MEASURE_SCOPE").unwrap_or_else(|_| "client".into());
    let config = ThrottleConfig::from_toml_str(&format!(
        r#"
        resync_interval = "off"
        [[classes]]
        name = "all"
        interface = "c0"
        rate = "10gbit"
        direction = "both"
        scope = "{scope}"
        max_clients = 60000
        [[rules]]
        class = "all"
        "#
    ))
    .unwrap();
    let hooks = Latencies::default();
    let (latencies, steered) = (hooks.0.clone(), hooks.1.clone());
    let report = ns.enter(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let backend = KernelBackend::open(&config).unwrap();
            let (events, receiver) = event_channel(65_536);
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let owner = tokio::spawn(run_with_backend(
                config,
                receiver,
                async move {
                    let _ = stop_rx.await;
                },
                backend,
                hooks,
            ));
            let started = Instant::now();
            // Bursts of 50 connections every 10 ms (5,000 per second), as a busy proxy's joins arrive.
            for burst in 0..connections.div_ceil(50) {
                for i in burst * 50..((burst + 1) * 50).min(connections) {
                    let token = ConnectionToken(i);
                    let client = |port: u16| {
                        format!(
                            "10.{}.{}.{}:{port}",
                            100 + (i >> 16),
                            (i >> 8) & 0xff,
                            i & 0xff
                        )
                        .parse()
                        .unwrap()
                    };
                    let mut initial =
                        SubflowInfo::new("10.77.0.1:443".parse().unwrap(), client(40000));
                    initial.interface.name = Some("c0".into());
                    let mut joined =
                        SubflowInfo::new("10.77.0.1:443".parse().unwrap(), client(40001));
                    joined.interface.name = Some("c0".into());
                    events
                        .send(SubflowEvent::ConnectionCreated {
                            token,
                            subflow: initial,
                        })
                        .await
                        .unwrap();
                    events
                        .send(SubflowEvent::SubflowEstablished {
                            token,
                            subflow: joined,
                        })
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let target = 2 * connections as usize;
            while *steered.lock().unwrap() < target {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let all_in = started.elapsed();
            let closing = Instant::now();
            for i in 0..connections {
                events
                    .send(SubflowEvent::ConnectionClosed {
                        token: ConnectionToken(i),
                    })
                    .await
                    .unwrap();
            }
            while *steered.lock().unwrap() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let all_out = closing.elapsed();
            let _ = stop_tx.send(());
            let summary = owner.await.unwrap().unwrap();
            (all_in, all_out, summary)
        })
    });
    let (all_in, all_out, summary) = report;
    let mut sorted = latencies.lock().unwrap().clone();
    sorted.sort();
    eprintln!(
        "{} subflows of {connections} connections steered {all_in:?} after the first event, all removed {all_out:?} after the closes",
        2 * connections
    );
    eprintln!(
        "rule install, {} installs: p50 {:?}, p90 {:?}, p99 {:?}, max {:?}; {} changes applied, {} failed",
        sorted.len(),
        quantile(&sorted, 0.5),
        quantile(&sorted, 0.9),
        quantile(&sorted, 0.99),
        sorted.last().copied().unwrap_or_default(),
        summary.changes_applied,
        summary.changes_failed
    );
    assert_eq!(summary.changes_failed, 0);
}
