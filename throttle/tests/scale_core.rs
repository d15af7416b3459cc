//! The sans-IO core at ISP scale: per-subscriber classes, limits with refusals that retry, resync from a
//! kernel snapshot, and attaching a destination by tuple without scanning connections.

use std::time::{Duration, Instant};

use mptcp_throttle::config::FIRST_CLIENT_MINOR;
use mptcp_throttle::{
    Change, ConnectionSelector, ConnectionToken, Destination, FourTuple, LiveSubflow, SubflowEvent,
    SubflowInfo, SubflowRole, ThrottleConfig, ThrottleState,
};

fn config(text: &str) -> ThrottleConfig {
    ThrottleConfig::from_toml_str(text).unwrap()
}

const PER_CLIENT: &str = r#"
    [[classes]]
    name = "path1"
    interface = "eth1"
    rate = "10mbit"
    scope = "client"
    max_clients = 2
    [[rules]]
    class = "path1"
    min_subflows = 1
"#;

fn subflow(local: &str, remote: &str) -> SubflowInfo {
    let mut info = SubflowInfo::new(local.parse().unwrap(), remote.parse().unwrap());
    info.interface.name = Some("eth1".into());
    info
}

fn open(state: &mut ThrottleState, token: u32, remote: &str) {
    state.handle_event(
        Instant::now(),
        SubflowEvent::ConnectionCreated {
            token: ConnectionToken(token),
            subflow: subflow("10.0.0.1:443", remote),
        },
    );
}

fn close(state: &mut ThrottleState, token: u32) {
    state.handle_event(
        Instant::now(),
        SubflowEvent::ConnectionClosed {
            token: ConnectionToken(token),
        },
    );
}

fn added_classes(changes: &[Change]) -> Vec<String> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::AddClass(spec) => Some(format!(
                "{} parent {} client {}",
                spec.id,
                spec.parent.map_or("root".into(), |p| p.to_string()),
                spec.client.map_or("-".into(), |c| c.to_string())
            )),
            _ => None,
        })
        .collect()
}

fn removed_classes(changes: &[Change]) -> Vec<String> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::RemoveClass(spec) => Some(spec.id.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn each_subscriber_gets_its_own_class_under_the_template() {
    let mut state = ThrottleState::new(config(PER_CLIENT));
    let first = state.poll_changes();
    // The template is the parent: its rate does not bound the subscribers' own rates.
    let Some(Change::AddClass(parent)) = first.iter().find(|c| matches!(c, Change::AddClass(_)))
    else {
        panic!("no parent class: {first:?}");
    };
    assert_eq!(parent.id.to_string(), "4d50:10");
    assert!(parent.rate.bits_per_second() >= 1_000_000_000_000);

    open(&mut state, 1, "192.0.2.1:1000");
    open(&mut state, 2, "192.0.2.1:1001"); // same subscriber
    open(&mut state, 3, "192.0.2.2:1002");
    let changes = state.poll_changes();
    assert_eq!(
        added_classes(&changes),
        [
            "4d50:1000 parent 4d50:10 client 192.0.2.1/32",
            "4d50:1001 parent 4d50:10 client 192.0.2.2/32"
        ]
    );
    // Classes come before the rules that use them.
    let last_class = changes
        .iter()
        .rposition(|c| matches!(c, Change::AddClass(_)));
    let first_rule = changes
        .iter()
        .position(|c| matches!(c, Change::AddRule { .. }));
    assert!(last_class < first_rule);
    let ids: Vec<String> = state
        .installed()
        .rules
        .values()
        .map(|r| r.download.as_ref().unwrap().id.to_string())
        .collect();
    assert_eq!(ids, ["4d50:1000", "4d50:1000", "4d50:1001"]);
    assert_eq!(state.client_class_counts()["path1"], 2);

    // The class stays while the subscriber has a steered subflow, and goes after the last.
    close(&mut state, 1);
    assert!(removed_classes(&state.poll_changes()).is_empty());
    close(&mut state, 2);
    assert_eq!(removed_classes(&state.poll_changes()), ["4d50:1000"]);
    // The freed minor is reused.
    open(&mut state, 4, "192.0.2.9:1003");
    assert_eq!(
        added_classes(&state.poll_changes()),
        ["4d50:1000 parent 4d50:10 client 192.0.2.9/32"]
    );
}

#[test]
fn ipv6_subscribers_are_grouped_by_prefix() {
    let mut state = ThrottleState::new(config(PER_CLIENT));
    state.poll_changes();
    open(&mut state, 1, "[2001:db8:1:2::1]:1000");
    open(&mut state, 2, "[2001:db8:1:2::ffff]:1001"); // a privacy address of the same /64
    open(&mut state, 3, "[2001:db8:1:3::1]:1002");
    let changes = state.poll_changes();
    assert_eq!(
        added_classes(&changes),
        [
            "4d50:1000 parent 4d50:10 client 2001:db8:1:2::/64",
            "4d50:1001 parent 4d50:10 client 2001:db8:1:3::/64"
        ]
    );
}

#[test]
fn class_limit_refuses_then_retries_when_a_class_frees() {
    let mut state = ThrottleState::new(config(PER_CLIENT));
    state.poll_changes();
    open(&mut state, 1, "192.0.2.1:1000");
    open(&mut state, 2, "192.0.2.2:1001");
    open(&mut state, 3, "192.0.2.3:1002");
    let changes = state.poll_changes();
    assert_eq!(added_classes(&changes).len(), 2, "max_clients = 2");
    assert_eq!(state.installed().rules.len(), 2);
    assert_eq!(state.stats().refused_class_limit, 1);
    assert_eq!(state.refusals_by_class()["path1"], 1);
    assert_eq!(state.waiting_connections(), 1);
    // An unrelated event refuses nothing new and retries nothing: there is no room.
    open(&mut state, 4, "192.0.2.1:1003");
    state.poll_changes();
    assert_eq!(state.stats().refused_class_limit, 1);
    // A subscriber leaves: the waiting one gets its class in the same poll.
    close(&mut state, 2);
    let changes = state.poll_changes();
    assert_eq!(removed_classes(&changes), ["4d50:1001"]);
    assert_eq!(
        added_classes(&changes),
        ["4d50:1001 parent 4d50:10 client 192.0.2.3/32"]
    );
    assert_eq!(state.waiting_connections(), 0);
    assert!(state.poll_changes().is_empty());
}

#[test]
fn steered_subflow_limit_holds_and_frees() {
    let mut state = ThrottleState::new(config(
        r#"
        max_steered_subflows = 3
        [[classes]]
        name = "all"
        interface = "eth1"
        rate = "10mbit"
        [[rules]]
        class = "all"
        min_subflows = 1
        "#,
    ));
    state.poll_changes();
    for token in 0..5 {
        open(&mut state, token, &format!("192.0.2.{}:1000", token + 1));
    }
    state.poll_changes();
    assert_eq!(state.installed().rules.len(), 3);
    assert_eq!(state.stats().refused_subflow_limit, 2);
    close(&mut state, 0);
    state.poll_changes();
    assert_eq!(
        state.installed().rules.len(),
        3,
        "a waiting subflow took the place"
    );
    assert_eq!(state.waiting_connections(), 1);
}

fn live(token: u32, local: &str, remote: &str, role: SubflowRole) -> LiveSubflow {
    LiveSubflow {
        token: ConnectionToken(token),
        subflow: subflow(local, remote),
        role,
    }
}

#[test]
fn resync_closes_vanished_connections_and_adds_unannounced_ones() {
    let mut state = ThrottleState::new(config(
        r#"
        [[classes]]
        name = "all"
        interface = "eth1"
        rate = "10mbit"
        [[rules]]
        class = "all"
        "#,
    ));
    state.poll_changes();
    let now = Instant::now();
    for token in [1, 2] {
        open(&mut state, token, &format!("192.0.2.{token}:1000"));
        state.handle_event(
            now,
            SubflowEvent::SubflowEstablished {
                token: ConnectionToken(token),
                subflow: subflow("10.0.0.1:443", &format!("192.0.2.{token}:2000")),
            },
        );
    }
    let destination = Destination {
        host: Some("video.example".into()),
        addr: None,
        port: Some(443),
    };
    state.handle_event(
        now,
        SubflowEvent::DestinationAttached {
            connection: ConnectionSelector::Tuple(FourTuple {
                local: "10.0.0.1:443".parse().unwrap(),
                remote: "192.0.2.2:2000".parse().unwrap(),
            }),
            destination,
        },
    );
    assert_eq!(state.stats().unknown_connection_events, 0, "found by tuple");
    assert_eq!(state.poll_changes().len(), 4);

    // Events were lost: connection 1 closed, connection 3 opened with two subflows, and connection 2
    // lost a subflow (its rule goes: one subflow left, below min_subflows).
    let snapshot = vec![
        live(2, "10.0.0.1:443", "192.0.2.2:1000", SubflowRole::Initial),
        live(3, "10.0.0.1:443", "192.0.2.3:1000", SubflowRole::Initial),
        live(3, "10.0.0.1:443", "192.0.2.3:2000", SubflowRole::Joined),
    ];
    let report = state.resync(now + Duration::from_secs(1), snapshot.clone());
    assert_eq!(report.connections_removed, 1);
    assert_eq!(report.connections_added, 1);
    assert_eq!(report.subflows_removed, 1);
    let changes = state.poll_changes();
    let removed: Vec<String> = changes
        .iter()
        .filter_map(|c| match c {
            Change::RemoveRule(r) => Some(r.tuple.remote.to_string()),
            _ => None,
        })
        .collect();
    let added: Vec<String> = changes
        .iter()
        .filter_map(|c| match c {
            Change::AddRule { rule, .. } => Some(rule.tuple.remote.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(
        removed,
        [
            "192.0.2.1:1000",
            "192.0.2.1:2000",
            "192.0.2.2:1000",
            "192.0.2.2:2000"
        ]
    );
    assert_eq!(added, ["192.0.2.3:1000", "192.0.2.3:2000"]);
    assert_eq!(state.connection_count(), 2);
    // The same snapshot again changes nothing.
    assert!(state.resync(now, snapshot).is_empty());
    assert!(state.poll_changes().is_empty());
    assert_eq!(state.stats().resyncs, 2);
}

#[test]
fn many_connections_poll_in_time_independent_of_their_number() {
    // Each event touches one connection: a poll after one event costs the same with 10 or 10,000 live
    // connections (no scan). Measured loosely: the 10,000th connection's poll is not 100x the 10th's.
    let mut state = ThrottleState::new(config(
        r#"
        [[classes]]
        name = "all"
        interface = "eth1"
        rate = "10mbit"
        scope = "client"
        max_clients = 60000
        [[rules]]
        class = "all"
        "#,
    ));
    state.poll_changes();
    let mut timings = Vec::new();
    for token in 0..10_000u32 {
        let remote = format!(
            "10.{}.{}.{}:1000",
            token >> 16,
            (token >> 8) & 0xff,
            token & 0xff
        );
        open(&mut state, token, &remote);
        state.handle_event(
            Instant::now(),
            SubflowEvent::SubflowEstablished {
                token: ConnectionToken(token),
                subflow: subflow("10.0.0.1:443", &remote.replace(":1000", ":2000")),
            },
        );
        let started = Instant::now();
        let changes = state.poll_changes();
        timings.push(started.elapsed());
        assert_eq!(changes.len(), 3, "one class and two rules");
    }
    let early: Duration = timings[10..110].iter().sum();
    let late: Duration = timings[9_900..10_000].iter().sum();
    eprintln!("100 polls at 10 connections: {early:?}, at 10,000: {late:?}");
    assert!(late < early * 100, "{early:?} vs {late:?}");
    assert_eq!(state.installed().rules.len(), 20_000);
    assert_eq!(
        state.installed().classes.len(),
        1 + 10_000,
        "the template and one class per subscriber"
    );
    assert!(state
        .installed()
        .classes
        .keys()
        .all(|(_, _, id)| id.minor == 0x10 || id.minor >= FIRST_CLIENT_MINOR));
}
