//! Sans-IO core: policy matching and desired-vs-installed diffing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mptcp_throttle::{
    Change, ConnectionSelector, ConnectionToken, Destination, QuickThrottle, SubflowEvent,
    SubflowInfo, ThrottleConfig, ThrottleState,
};

const TOKEN: ConnectionToken = ConnectionToken(0x1234);

fn subflow(local: &str, remote: &str, iface: Option<&str>) -> SubflowInfo {
    let mut info = SubflowInfo::new(local.parse().unwrap(), remote.parse().unwrap());
    info.interface.name = iface.map(str::to_owned);
    info
}

fn config(text: &str) -> ThrottleConfig {
    ThrottleConfig::from_toml_str(text).unwrap()
}

fn quick(flags: &[&str]) -> ThrottleConfig {
    let mut config = ThrottleConfig::default();
    let flags: Vec<QuickThrottle> = flags.iter().map(|f| f.parse().unwrap()).collect();
    config.add_quick_throttles(&flags).unwrap();
    config
}

fn rule_adds(changes: &[Change]) -> Vec<SocketAddr> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::AddRule { rule, .. } => Some(rule.tuple.remote),
            _ => None,
        })
        .collect()
}

fn rule_removes(changes: &[Change]) -> Vec<SocketAddr> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::RemoveRule(rule) => Some(rule.tuple.remote),
            _ => None,
        })
        .collect()
}

#[test]
fn first_poll_installs_interfaces_and_classes_only() {
    let mut state = ThrottleState::new(quick(&["eth1=20mbit", "eth2=5mbit:10mbit"]));
    let changes = state.poll_changes();
    let interfaces = changes
        .iter()
        .filter(|c| matches!(c, Change::AddInterface(_)))
        .count();
    let classes: Vec<_> = changes
        .iter()
        .filter_map(|c| match c {
            Change::AddClass(spec) => Some(spec),
            _ => None,
        })
        .collect();
    assert_eq!(interfaces, 2);
    assert_eq!(classes.len(), 2);
    assert_eq!(classes[1].interface, "eth2");
    assert_eq!(classes[1].ceil.bits_per_second(), 10_000_000);
    assert_eq!(classes[0].id.to_string(), "4d50:10");
    assert_eq!(classes[1].id.to_string(), "4d50:11");
    // Interfaces come before classes.
    let first_class = changes
        .iter()
        .position(|c| matches!(c, Change::AddClass(_)));
    let last_iface = changes
        .iter()
        .rposition(|c| matches!(c, Change::AddInterface(_)));
    assert!(last_iface < first_class);
    // Nothing changed: nothing to do.
    assert!(state.poll_changes().is_empty());
}

#[test]
fn subflow_is_throttled_from_the_second_subflow_and_released_after() {
    let mut state = ThrottleState::new(quick(&["eth1=20mbit"]));
    state.poll_changes();
    let t0 = Instant::now();
    let initial = subflow("10.0.0.1:443", "192.0.2.7:50000", Some("eth0"));
    let joined = subflow("10.1.0.1:443", "198.51.100.9:40000", Some("eth1"));
    state.handle_event(
        t0,
        SubflowEvent::ConnectionCreated {
            token: TOKEN,
            subflow: initial.clone(),
        },
    );
    assert!(state.poll_changes().is_empty(), "one subflow: no rule");
    let t1 = t0 + Duration::from_millis(5);
    state.handle_event(
        t1,
        SubflowEvent::SubflowEstablished {
            token: TOKEN,
            subflow: joined.clone(),
        },
    );
    let changes = state.poll_changes();
    assert_eq!(rule_adds(&changes), vec![joined.tuple.remote]);
    let Some(Change::AddRule { rule, triggered_at }) =
        changes.iter().find(|c| matches!(c, Change::AddRule { .. }))
    else {
        unreachable!()
    };
    assert_eq!(*triggered_at, Some(t1));
    assert_eq!(rule.download.as_ref().unwrap().interface, "eth1");
    assert_eq!(rule.upload, None);
    assert_eq!(state.installed().rules.len(), 1);

    // The initial subflow closes: one subflow left, rule removed.
    state.handle_event(
        t1,
        SubflowEvent::SubflowClosed {
            token: TOKEN,
            subflow: initial,
        },
    );
    let changes = state.poll_changes();
    assert_eq!(rule_removes(&changes), vec![joined.tuple.remote]);
    assert!(rule_adds(&changes).is_empty());
    assert!(state.installed().rules.is_empty());
}

#[test]
fn connection_close_removes_all_its_rules() {
    let mut state = ThrottleState::new(config(
        r#"
        [[classes]]
        name = "all"
        interface = "eth1"
        rate = "1mbit"
        [[rules]]
        class = "all"
        "#,
    ));
    state.poll_changes();
    let now = Instant::now();
    for (i, remote) in ["192.0.2.1:1000", "192.0.2.1:1001", "192.0.2.2:1002"]
        .iter()
        .enumerate()
    {
        let info = subflow("10.0.0.1:443", remote, None);
        let event = if i == 0 {
            SubflowEvent::ConnectionCreated {
                token: TOKEN,
                subflow: info,
            }
        } else {
            SubflowEvent::SubflowEstablished {
                token: TOKEN,
                subflow: info,
            }
        };
        state.handle_event(now, event);
    }
    assert_eq!(rule_adds(&state.poll_changes()).len(), 3);
    state.handle_event(now, SubflowEvent::ConnectionClosed { token: TOKEN });
    let changes = state.poll_changes();
    assert_eq!(rule_removes(&changes).len(), 3);
    assert_eq!(state.connection_count(), 0);
}

#[test]
fn criteria_are_all_required_and_first_rule_wins() {
    let text = r#"
        [[classes]]
        name = "slow"
        interface = "eth1"
        rate = "1mbit"
        [[classes]]
        name = "fast"
        interface = "eth1"
        rate = "100mbit"
        [[rules]]
        name = "joined-backup-from-cgnat"
        class = "slow"
        match = { role = "joined", client = "100.64.0.0/10", backup = true }
        [[rules]]
        name = "video"
        class = "fast"
        fwmark = 9
        match = { destination_host = "*.video.example", destination_port = 443 }
    "#;
    let mut state = ThrottleState::new(config(text));
    state.poll_changes();
    let now = Instant::now();
    let initial = subflow("10.0.0.1:443", "100.64.1.1:1000", None);
    let mut joined = subflow("10.0.0.1:443", "100.64.1.2:1001", None);
    joined.backup = true;
    let mut joined_other = subflow("10.0.0.1:443", "192.0.2.3:1002", None);
    joined_other.backup = true;
    state.handle_event(
        now,
        SubflowEvent::ConnectionCreated {
            token: TOKEN,
            subflow: initial.clone(),
        },
    );
    for info in [&joined, &joined_other] {
        state.handle_event(
            now,
            SubflowEvent::SubflowEstablished {
                token: TOKEN,
                subflow: info.clone(),
            },
        );
    }
    let desired = state.desired_state();
    // Only `joined` satisfies role + client + backup.
    assert_eq!(desired.rules.len(), 1);
    assert_eq!(
        desired.rules[&joined.tuple].rule_name.as_deref(),
        Some("joined-backup-from-cgnat")
    );
    state.poll_changes();

    // Attaching the destination makes the second rule match the others.
    state.handle_event(
        now,
        SubflowEvent::DestinationAttached {
            connection: ConnectionSelector::Tuple(initial.tuple),
            destination: Destination {
                host: Some("cdn.video.example".into()),
                addr: None,
                port: Some(443),
            },
        },
    );
    let desired = state.desired_state();
    assert_eq!(desired.rules.len(), 3);
    assert_eq!(
        desired.rules[&joined.tuple].rule_index, 0,
        "first rule still wins"
    );
    assert_eq!(desired.rules[&initial.tuple].fwmark, Some(9));
    let changes = state.poll_changes();
    assert_eq!(rule_adds(&changes).len(), 2);
    assert!(rule_removes(&changes).is_empty());

    // A host that does not match the wildcard.
    let mut other = ThrottleState::new(config(text));
    other.handle_event(
        now,
        SubflowEvent::ConnectionCreated {
            token: TOKEN,
            subflow: initial.clone(),
        },
    );
    other.handle_event(
        now,
        SubflowEvent::SubflowEstablished {
            token: TOKEN,
            subflow: subflow("10.0.0.1:443", "192.0.2.9:1", None),
        },
    );
    other.handle_event(
        now,
        SubflowEvent::DestinationAttached {
            connection: ConnectionSelector::Token(TOKEN),
            destination: Destination {
                host: Some("video.example".into()),
                addr: None,
                port: Some(443),
            },
        },
    );
    assert!(other.desired_state().rules.is_empty());
}

#[test]
fn interface_is_resolved_by_index_or_local_address() {
    let mut state = ThrottleState::new(quick(&["eth1=20mbit"]));
    state.set_interface_name(7, "eth1");
    state.set_interface_address("10.1.0.1".parse().unwrap(), "eth1");
    let now = Instant::now();
    let by_address = subflow("10.1.0.1:443", "192.0.2.1:1", None);
    let mut by_index = subflow("10.9.0.1:443", "192.0.2.1:2", None);
    by_index.interface.index = Some(7);
    let unknown = subflow("10.9.0.1:443", "192.0.2.1:3", None);
    assert!(state.resolves_interface(&by_address));
    assert!(!state.resolves_interface(&unknown));
    state.handle_event(
        now,
        SubflowEvent::ConnectionCreated {
            token: TOKEN,
            subflow: by_address.clone(),
        },
    );
    for info in [&by_index, &unknown] {
        state.handle_event(
            now,
            SubflowEvent::SubflowEstablished {
                token: TOKEN,
                subflow: info.clone(),
            },
        );
    }
    let desired = state.desired_state();
    assert!(desired.rules.contains_key(&by_address.tuple));
    assert!(desired.rules.contains_key(&by_index.tuple));
    assert!(!desired.rules.contains_key(&unknown.tuple));
}

#[test]
fn failed_change_is_retried_on_next_poll() {
    let mut state = ThrottleState::new(quick(&["eth1=20mbit"]));
    let changes = state.poll_changes();
    let add_class = changes
        .iter()
        .find(|c| matches!(c, Change::AddClass(_)))
        .unwrap()
        .clone();
    state.change_failed(&add_class);
    let retry = state.poll_changes();
    assert_eq!(retry, vec![add_class]);
    assert!(state.poll_changes().is_empty());
}

#[test]
fn policy_change_updates_classes_and_moves_rules() {
    let mut state = ThrottleState::new(quick(&["eth1=20mbit"]));
    state.poll_changes();
    let now = Instant::now();
    state.handle_event(
        now,
        SubflowEvent::ConnectionCreated {
            token: TOKEN,
            subflow: subflow("10.0.0.1:443", "192.0.2.1:1", Some("eth1")),
        },
    );
    state.handle_event(
        now,
        SubflowEvent::SubflowEstablished {
            token: TOKEN,
            subflow: subflow("10.0.0.1:443", "192.0.2.1:2", Some("eth1")),
        },
    );
    assert_eq!(rule_adds(&state.poll_changes()).len(), 2);

    // Same class, new rate: updated in place, rules untouched.
    state.set_config(quick(&["eth1=30mbit"]));
    let changes = state.poll_changes();
    assert!(
        matches!(changes.as_slice(), [Change::UpdateClass(spec)] if spec.rate.bits_per_second() == 30_000_000)
    );

    // Disabling removes rules, classes with their interface, then nothing.
    let mut disabled = quick(&["eth1=30mbit"]);
    disabled.enabled = false;
    state.set_config(disabled);
    let changes = state.poll_changes();
    assert_eq!(rule_removes(&changes).len(), 2);
    assert!(changes
        .iter()
        .any(|c| matches!(c, Change::RemoveInterface(_))));
    assert!(
        !changes.iter().any(|c| matches!(c, Change::RemoveClass(_))),
        "the qdisc removal takes its classes"
    );
    let first_interface_removal = changes
        .iter()
        .position(|c| matches!(c, Change::RemoveInterface(_)))
        .unwrap();
    let last_rule_removal = changes
        .iter()
        .rposition(|c| matches!(c, Change::RemoveRule(_)))
        .unwrap();
    assert!(last_rule_removal < first_interface_removal);
    assert_eq!(state.installed(), &Default::default());
}

#[test]
fn backup_action_and_upload_class() {
    let text = r#"
        [[classes]]
        name = "up"
        interface = "wwan0"
        rate = "2mbit"
        direction = "both"
        [[rules]]
        class = "up"
        set_backup = true
        match = { interface = "wwan0" }
    "#;
    let mut state = ThrottleState::new(config(text));
    let changes = state.poll_changes();
    assert_eq!(
        changes
            .iter()
            .filter(|c| matches!(c, Change::AddInterface(_)))
            .count(),
        2
    );
    assert_eq!(
        changes
            .iter()
            .filter(|c| matches!(c, Change::AddClass(_)))
            .count(),
        2
    );
    let now = Instant::now();
    let mut lte = subflow("10.2.0.1:443", "192.0.2.5:5", Some("wwan0"));
    lte.local_id = Some(2);
    state.handle_event(
        now,
        SubflowEvent::ConnectionCreated {
            token: TOKEN,
            subflow: subflow("10.0.0.1:443", "192.0.2.5:4", Some("eth0")),
        },
    );
    state.handle_event(
        now,
        SubflowEvent::SubflowEstablished {
            token: TOKEN,
            subflow: lte.clone(),
        },
    );
    let changes = state.poll_changes();
    let set_backup: Vec<_> = changes
        .iter()
        .filter_map(|c| match c {
            Change::SetBackup(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(set_backup.len(), 1);
    assert_eq!(set_backup[0].local_id, Some(2));
    let Some(Change::AddRule { rule, .. }) =
        changes.iter().find(|c| matches!(c, Change::AddRule { .. }))
    else {
        panic!("no rule added");
    };
    assert!(rule.download.is_some() && rule.upload.is_some());
    // The kernel confirms the flag: no flapping.
    lte.backup = true;
    state.handle_event(
        now,
        SubflowEvent::PriorityChanged {
            token: TOKEN,
            subflow: lte,
        },
    );
    assert!(state.poll_changes().is_empty());
}

#[test]
fn events_for_unknown_connections_are_counted_not_fatal() {
    let mut state = ThrottleState::new(ThrottleConfig::default());
    let now = Instant::now();
    state.handle_event(now, SubflowEvent::ConnectionClosed { token: TOKEN });
    state.handle_event(
        now,
        SubflowEvent::SubflowClosed {
            token: TOKEN,
            subflow: subflow("10.0.0.1:1", "10.0.0.2:2", None),
        },
    );
    assert_eq!(state.stats().events, 2);
    assert_eq!(state.stats().unknown_connection_events, 2);
    assert!(state.poll_changes().is_empty());
}
