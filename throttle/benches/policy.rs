#![allow(missing_docs)] // criterion_group! generates undocumented items.
//! Policy matching and desired-state diffing in the sans-IO core: one connection's life (created,
//! second subflow established → rules added, closed → rules removed) per iteration.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mptcp_throttle::{
    ConnectionToken, QuickThrottle, SubflowEvent, SubflowInfo, ThrottleConfig, ThrottleState,
};

fn policy(rules: usize) -> ThrottleConfig {
    let mut text = String::new();
    for i in 0..rules {
        text.push_str(&format!(
            "[[classes]]\nname = \"c{i}\"\ninterface = \"eth{i}\"\nrate = \"{}mbit\"\n",
            10 + i
        ));
    }
    for i in 0..rules {
        text.push_str(&format!(
            "[[rules]]\nclass = \"c{i}\"\nmatch = {{ interface = \"eth{i}\", client = \"10.{i}.0.0/16\" }}\n"
        ));
    }
    let mut config = ThrottleConfig::from_toml_str(&text).expect("benchmark policy");
    let quick: QuickThrottle = "wlan0=20mbit".parse().expect("quick form");
    config.add_quick_throttles(&[quick]).expect("quick form");
    config
}

fn subflow(client: u32, port: u16, interface: &str) -> SubflowInfo {
    let local = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 3128));
    let remote = SocketAddr::from((Ipv4Addr::from(client), port));
    let mut info = SubflowInfo::new(local, remote);
    info.interface.name = Some(interface.to_owned());
    info
}

fn connection_life(state: &mut ThrottleState, token: u32, now: Instant) -> usize {
    let token_id = ConnectionToken(token);
    let client = u32::from(Ipv4Addr::new(10, 3, 0, 0)) + (token & 0xffff);
    let first = subflow(client, 40000, "eth3");
    let second = subflow(client, 40001, "wlan0");
    state.handle_event(
        now,
        SubflowEvent::ConnectionEstablished {
            token: token_id,
            subflow: first,
        },
    );
    state.handle_event(
        now,
        SubflowEvent::SubflowEstablished {
            token: token_id,
            subflow: second,
        },
    );
    let added = state.poll_changes().len();
    state.handle_event(now, SubflowEvent::ConnectionClosed { token: token_id });
    added + state.poll_changes().len()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("throttle_core");
    group.throughput(Throughput::Elements(1));
    for rules in [4, 64] {
        group.bench_function(format!("connection_life_{rules}_rules"), |b| {
            let mut state = ThrottleState::new(policy(rules));
            state.poll_changes();
            let now = Instant::now();
            let mut token = 0u32;
            b.iter(|| {
                token = token.wrapping_add(1);
                connection_life(&mut state, token, now)
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
