//! Kernel mechanism in private network namespaces: install, read back with
//! `tc` and `nft`, shut down, and recover from a simulated crash.
//! Needs root; skipped without it unless CI is set.

mod common;

use std::time::Instant;

use common::{require_root, Netns};
use mptcp_throttle::kernel::KernelBackend;
use mptcp_throttle::{ConnectionToken, SubflowEvent, SubflowInfo, ThrottleConfig, ThrottleState};

const POLICY: &str = r#"
    [[classes]]
    name = "slow"
    interface = "c0"
    rate = "20mbit"
    ceil = "30mbit"
    burst = "15k"
    priority = 2
    direction = "both"
    [[classes]]
    name = "fast"
    interface = "c0"
    rate = "1gbit"
    [[classes]]
    name = "huge"
    interface = "c0"
    rate = "40gbit"
    [[rules]]
    name = "slow-c0"
    class = "slow"
    fwmark = 0x42
    ct_mark = 0x43
    match = { interface = "c0" }
"#;

fn namespace_with_veth() -> Netns {
    let ns = Netns::new("tc");
    ns.ip(&["link", "add", "c0", "type", "veth", "peer", "name", "c1"]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "c0"]);
    ns.ip(&["addr", "add", "fd77::1/64", "dev", "c0", "nodad"]);
    ns.ip(&["link", "set", "c0", "up"]);
    ns.ip(&["link", "set", "c1", "up"]);
    ns
}

fn events() -> Vec<SubflowEvent> {
    let token = ConnectionToken(0xabc);
    let info = |local: &str, remote: &str| {
        SubflowInfo::new(local.parse().unwrap(), remote.parse().unwrap())
    };
    vec![
        SubflowEvent::ConnectionCreated {
            token,
            subflow: info("10.77.0.1:443", "10.77.0.2:50000"),
        },
        SubflowEvent::SubflowEstablished {
            token,
            subflow: info("10.77.0.1:443", "10.77.0.3:50001"),
        },
        SubflowEvent::SubflowEstablished {
            token,
            subflow: info("[fd77::1]:443", "[fd77::2]:50002"),
        },
    ]
}

/// Installs policy and events in the namespace; returns the backend without
/// shutting it down.
fn install(
    ns: &Netns,
) -> (
    KernelBackend,
    ThrottleState,
    mptcp_throttle::kernel::StaleReport,
) {
    let config = ThrottleConfig::from_toml_str(POLICY).unwrap();
    ns.enter(move || {
        let mut backend = KernelBackend::open(&config).unwrap();
        let stale = backend.start().unwrap();
        let mut state = ThrottleState::new(config);
        let table = backend.interfaces().unwrap();
        for (addr, name) in table.addresses {
            state.set_interface_address(addr, &name);
        }
        let changes = state.poll_changes();
        let failures = backend.apply(&changes);
        assert!(failures.is_empty(), "{failures:?}");
        for event in events() {
            state.handle_event(Instant::now(), event);
        }
        let changes = state.poll_changes();
        assert_eq!(
            changes
                .iter()
                .filter(|c| matches!(c, mptcp_throttle::Change::AddRule { .. }))
                .count(),
            3
        );
        let failures = backend.apply(&changes);
        assert!(failures.is_empty(), "{failures:?}");
        (backend, state, stale)
    })
}

fn assert_clean(ns: &Netns) {
    assert!(!ns.has_table("mptcp_proxy"), "nft table left behind");
    let qdiscs = ns.qdiscs("c0");
    assert!(
        !qdiscs
            .iter()
            .any(|q| q["kind"] == "htb" || q["kind"] == "ingress"),
        "qdiscs left on c0: {qdiscs:?}"
    );
    assert!(
        !ns.links().iter().any(|l| l.starts_with("mpifb")),
        "ifb left behind: {:?}",
        ns.links()
    );
}

fn assert_installed(ns: &Netns) {
    let ifb = format!("mpifb{}", ns.ifindex("c0"));
    // Download: HTB root with our major on c0, three classes.
    let qdiscs = ns.qdiscs("c0");
    assert!(
        qdiscs
            .iter()
            .any(|q| q["kind"] == "htb" && q["handle"] == "4d50:" && q["root"] == true),
        "{qdiscs:?}"
    );
    assert!(qdiscs.iter().any(|q| q["kind"] == "ingress"), "{qdiscs:?}");
    let classes = ns.classes("c0");
    assert_eq!(classes.len(), 3, "{classes:?}");
    let slow = classes.iter().find(|c| c.id == "4d50:10").unwrap();
    assert_eq!(
        (slow.rate.as_str(), slow.ceil.as_str()),
        ("20Mbit", "30Mbit")
    );
    assert_eq!(slow.burst, "15Kb");
    assert_eq!(slow.prio, Some(2));
    let fast = classes.iter().find(|c| c.id == "4d50:11").unwrap();
    assert_eq!((fast.rate.as_str(), fast.ceil.as_str()), ("1Gbit", "1Gbit"));
    let huge = classes.iter().find(|c| c.id == "4d50:12").unwrap();
    assert_eq!(huge.rate, "40Gbit", "64-bit rate attribute");

    // Upload: IFB device with its own HTB and the upload class.
    assert!(ns.links().contains(&ifb), "{:?}", ns.links());
    let ifb_qdiscs = ns.qdiscs(&ifb);
    assert!(ifb_qdiscs
        .iter()
        .any(|q| q["kind"] == "htb" && q["handle"] == "4d50:"));
    let ifb_classes = ns.classes(&ifb);
    assert_eq!(ifb_classes.len(), 1, "{ifb_classes:?}");
    assert_eq!(ifb_classes[0].rate, "20Mbit");
    let ingress_filters = ns.exec("tc", &["filter", "show", "dev", "c0", "ingress"]);
    assert!(
        ingress_filters.contains(&format!("Redirect to device {ifb}")),
        "{ingress_filters}"
    );
    // One BPF classifier on the IFB, whatever the number of subflows.
    let ifb_filters = ns.exec("tc", &["filter", "show", "dev", &ifb]);
    assert_eq!(
        ifb_filters.matches("name mptcp_upload").count(),
        1,
        "{ifb_filters}"
    );
    assert!(
        ifb_filters.contains("bpf") && ifb_filters.contains("direct-action"),
        "{ifb_filters}"
    );

    if std::env::var("THROTTLE_TEST_DUMP").is_ok() {
        eprintln!("{}", ns.exec("nft", &["list", "ruleset"]));
        eprintln!("{}", ns.exec("tc", &["class", "show", "dev", "c0"]));
        eprintln!("{ifb_filters}");
    }
    // nftables: constant rules (download class per family, marks per family), subflows in maps.
    assert_eq!(ns.nft_rules("mptcp_proxy", "postrouting").len(), 2);
    assert_eq!(ns.nft_rules("mptcp_proxy", "output").len(), 4);
    let download4 = ns.nft_map("mptcp_proxy", "download4");
    assert_eq!(download4.len(), 2, "{download4:?}");
    let text = serde_json::to_string(&download4).unwrap();
    assert_eq!(text.matches("4d50:10").count(), 2, "{text}");
    assert!(text.contains("10.77.0.3"), "{text}");
    assert!(text.contains("50001"), "{text}");
    let download6 = serde_json::to_string(&ns.nft_map("mptcp_proxy", "download6")).unwrap();
    assert!(download6.contains("fd77::2"), "{download6}");
    for (map, value) in [("fwmark4", 66), ("ctmark4", 67)] {
        let text = serde_json::to_string(&ns.nft_map("mptcp_proxy", map)).unwrap();
        assert_eq!(
            text.matches(&format!(",{value}]")).count(),
            2,
            "{map}: {text}"
        );
    }
}

#[test]
fn install_read_back_and_shut_down() {
    if !require_root("install_read_back_and_shut_down") {
        return;
    }
    let ns = namespace_with_veth();
    let (backend, state, stale) = install(&ns);
    assert_eq!(
        stale,
        Default::default(),
        "fresh namespace has nothing stale"
    );
    assert_installed(&ns);

    // One subflow closes: its rules go, the others stay.
    let (mut backend, _state) = ns.enter(move || {
        let (mut backend, mut state) = (backend, state);
        state.handle_event(
            Instant::now(),
            SubflowEvent::SubflowClosed {
                token: ConnectionToken(0xabc),
                subflow: SubflowInfo::new(
                    "10.77.0.1:443".parse().unwrap(),
                    "10.77.0.3:50001".parse().unwrap(),
                ),
            },
        );
        let failures = backend.apply(&state.poll_changes());
        assert!(failures.is_empty(), "{failures:?}");
        (backend, state)
    });
    assert_eq!(ns.nft_map("mptcp_proxy", "download4").len(), 1);
    assert_eq!(ns.nft_map("mptcp_proxy", "download6").len(), 1);
    let ifb = format!("mpifb{}", ns.ifindex("c0"));

    let report = ns.enter(move || backend.shutdown().unwrap());
    assert_eq!(report.ifb_devices, vec![ifb]);
    assert_clean(&ns);
    // Shutting down twice is harmless.
    let config = ThrottleConfig::from_toml_str(POLICY).unwrap();
    ns.enter(move || KernelBackend::open(&config).unwrap().shutdown().unwrap());
    assert_clean(&ns);
}

#[test]
fn restart_after_crash_replaces_stale_state() {
    if !require_root("restart_after_crash_replaces_stale_state") {
        return;
    }
    let ns = namespace_with_veth();
    let (crashed, _, _) = install(&ns);
    // Simulated crash: the backend is dropped without cleanup.
    drop(crashed);
    assert_installed(&ns);

    // Next start finds and removes the stale state, then installs afresh.
    let (backend, _, stale) = install(&ns);
    let c0 = ns.ifindex("c0");
    assert!(stale.root_qdiscs.contains(&c0), "{stale:?}");
    assert_eq!(stale.ifb_devices.len(), 1, "{stale:?}");
    assert_eq!(stale.ingress_redirects, vec![c0]);
    assert_installed(&ns);

    ns.enter(move || {
        let mut backend = backend;
        backend.shutdown().unwrap()
    });
    assert_clean(&ns);
}

#[test]
fn missing_interface_is_a_typed_error() {
    if !require_root("missing_interface_is_a_typed_error") {
        return;
    }
    let ns = Netns::new("noif");
    let config = ThrottleConfig::from_toml_str(
        r#"
        [[classes]]
        name = "x"
        interface = "nosuch0"
        rate = "1mbit"
        "#,
    )
    .unwrap();
    let failures = ns.enter(move || {
        let mut backend = KernelBackend::open(&config).unwrap();
        backend.start().unwrap();
        let mut state = ThrottleState::new(config);
        let failures = backend.apply(&state.poll_changes());
        let messages: Vec<String> = failures.iter().map(|(_, e)| e.to_string()).collect();
        backend.shutdown().unwrap();
        messages
    });
    assert!(!failures.is_empty());
    assert!(
        failures[0].contains("interface \"nosuch0\" does not exist"),
        "{failures:?}"
    );
}

/// `tc -j qdisc show dev <dev>` reduced to what identifies the tree: kind, handle, parent and the
/// options tbf prints.
fn qdisc_tree(ns: &Netns, dev: &str) -> Vec<String> {
    let mut tree: Vec<String> = ns
        .qdiscs(dev)
        .iter()
        .filter(|q| q["kind"] != "ingress")
        .map(|q| {
            format!(
                "{} {} parent {} {}",
                q["kind"].as_str().unwrap_or(""),
                q["handle"].as_str().unwrap_or(""),
                q["parent"].as_str().unwrap_or("root"),
                serde_json::to_string(&q["options"]).unwrap()
            )
        })
        .collect();
    tree.sort();
    tree
}

#[test]
fn original_root_qdisc_comes_back_after_shutdown_and_after_a_crash() {
    if !require_root("original_root_qdisc_comes_back_after_shutdown_and_after_a_crash") {
        return;
    }
    // A multi-queue interface whose operator set up mq with a tuned child on queue 2.
    let ns = Netns::new("mq");
    ns.ip(&[
        "link",
        "add",
        "m0",
        "numtxqueues",
        "4",
        "numrxqueues",
        "4",
        "type",
        "veth",
        "peer",
        "name",
        "m1",
        "numtxqueues",
        "4",
        "numrxqueues",
        "4",
    ]);
    ns.ip(&["addr", "add", "10.78.0.1/24", "dev", "m0"]);
    ns.ip(&["link", "set", "m0", "up"]);
    ns.ip(&["link", "set", "m1", "up"]);
    ns.exec(
        "tc",
        &["qdisc", "add", "dev", "m0", "root", "handle", "7:", "mq"],
    );
    ns.exec(
        "tc",
        &[
            "qdisc", "replace", "dev", "m0", "parent", "7:2", "handle", "72:", "tbf", "rate",
            "300mbit", "burst", "64kb", "latency", "20ms",
        ],
    );
    let original = qdisc_tree(&ns, "m0");
    assert!(
        original.iter().any(|q| q.starts_with("mq 7:")),
        "{original:?}"
    );
    assert!(
        original.iter().any(|q| q.starts_with("tbf 72: parent 7:2")),
        "{original:?}"
    );

    let state_dir = std::env::temp_dir().join(format!("mpthr-state-{}", ns.name));
    let config = ThrottleConfig::from_toml_str(&format!(
        "state_dir = {:?}\n[[classes]]\nname = \"c\"\ninterface = \"m0\"\nrate = \"10mbit\"\n",
        state_dir.display().to_string()
    ))
    .unwrap();
    let install = |config: ThrottleConfig| {
        ns.enter(move || {
            let mut backend = KernelBackend::open(&config).unwrap();
            let stale = backend.start().unwrap();
            let mut state = ThrottleState::new(config);
            assert!(backend.apply(&state.poll_changes()).is_empty());
            (backend, stale)
        })
    };

    // Installed: our HTB is the root; SIGTERM-like shutdown puts mq and the tuned tbf back.
    let (backend, _) = install(config.clone());
    let running = qdisc_tree(&ns, "m0");
    assert!(
        running.iter().any(|q| q.starts_with("htb 4d50:")),
        "{running:?}"
    );
    let report = ns.enter(move || {
        let mut backend = backend;
        backend.shutdown().unwrap()
    });
    assert_eq!(
        report.restored_roots,
        vec!["m0 mq 7: (4 children)".to_owned()]
    );
    assert_eq!(qdisc_tree(&ns, "m0"), original);

    // A crash leaves our root and the state file; the next start restores the original from the file
    // before installing again, and its shutdown restores it again.
    let (crashed, _) = install(config.clone());
    drop(crashed);
    assert!(qdisc_tree(&ns, "m0")
        .iter()
        .any(|q| q.starts_with("htb 4d50:")));
    let (restarted, stale) = install(config);
    assert_eq!(
        stale.restored_roots,
        vec!["m0 mq 7: (4 children)".to_owned()]
    );
    ns.enter(move || {
        let mut backend = restarted;
        backend.shutdown().unwrap();
    });
    assert_eq!(qdisc_tree(&ns, "m0"), original);
    assert!(
        std::fs::read_dir(&state_dir).map_or(true, |d| d.count() == 0),
        "state file left behind"
    );
    let _ = std::fs::remove_dir_all(state_dir);
}

/// Rules the packets walk: every nft rule of the table, and every tc filter on the interface's ingress
/// and on its IFB.
fn packet_path_rules(ns: &Netns) -> usize {
    let nft = ns
        .nft_ruleset()
        .get("nftables")
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|item| {
            item.get("rule")
                .is_some_and(|r| r["table"] == "mptcp_proxy")
        })
        .count();
    let ifb = format!("mpifb{}", ns.ifindex("c0"));
    // One line per filter entry: u32 nodes (`fh 800::800`), bpf programs (`handle 0x1`).
    let filters = |args: &[&str]| {
        ns.exec("tc", args)
            .lines()
            .filter(|l| l.starts_with("filter") && (l.contains("::") || l.contains("handle")))
            .count()
    };
    nft + filters(&["filter", "show", "dev", "c0", "ingress"])
        + filters(&["filter", "show", "dev", &ifb])
}

#[test]
fn packet_path_rule_count_is_constant_from_2_to_200_connections() {
    if !require_root("packet_path_rule_count_is_constant_from_2_to_200_connections") {
        return;
    }
    let ns = namespace_with_veth();
    let config = ThrottleConfig::from_toml_str(POLICY).unwrap();
    let open = |state: &mut ThrottleState, range: std::ops::Range<u32>| {
        for i in range {
            let token = ConnectionToken(i);
            let client = |port: u32| {
                format!("10.77.{}.{}:{}", 1 + i / 200, 2 + i % 200, port)
                    .parse()
                    .unwrap()
            };
            state.handle_event(
                Instant::now(),
                SubflowEvent::ConnectionCreated {
                    token,
                    subflow: SubflowInfo::new("10.77.0.1:443".parse().unwrap(), client(40000)),
                },
            );
            state.handle_event(
                Instant::now(),
                SubflowEvent::SubflowEstablished {
                    token,
                    subflow: SubflowInfo::new("10.77.0.1:443".parse().unwrap(), client(40001)),
                },
            );
        }
    };
    let (backend, state) = ns.enter(move || {
        let mut backend = KernelBackend::open(&config).unwrap();
        backend.start().unwrap();
        let mut state = ThrottleState::new(config);
        for (addr, name) in backend.interfaces().unwrap().addresses {
            state.set_interface_address(addr, &name);
        }
        open(&mut state, 0..2);
        assert!(backend.apply(&state.poll_changes()).is_empty());
        (backend, state)
    });
    let with_two = packet_path_rules(&ns);
    assert_eq!(ns.nft_map("mptcp_proxy", "download4").len(), 4);
    let (backend, _state) = ns.enter(move || {
        let (mut backend, mut state) = (backend, state);
        open(&mut state, 2..200);
        assert!(backend.apply(&state.poll_changes()).is_empty());
        assert_eq!(backend.steered_subflows(), 400);
        (backend, state)
    });
    let with_two_hundred = packet_path_rules(&ns);
    eprintln!("packet path rules: {with_two} with 2 connections, {with_two_hundred} with 200");
    assert_eq!(ns.nft_map("mptcp_proxy", "download4").len(), 400);
    assert_eq!(ns.nft_map("mptcp_proxy", "fwmark4").len(), 400);
    // Six nft rules, the ingress redirect and the IFB's classifier.
    assert_eq!(with_two, 8);
    assert_eq!(with_two_hundred, with_two);
    ns.enter(move || {
        let mut backend = backend;
        backend.shutdown().unwrap();
    });
    assert_clean(&ns);
}
