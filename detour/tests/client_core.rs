//! The client's sans-IO path manager with a simulated clock: the thesis's subflow worker order (tunnels,
//! then NAT detours oldest first, up to max_detours), retries on failure, kernel-path duties, mapping
//! lifetimes and shutdown.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use mptcp_detour::client::config::PolicyConfig;
use mptcp_detour::client::core::{
    Action, ClientCore, CoreSettings, Endpoint, MappingResult, SubflowId, Via,
};
use mptcp_detour::wire::Status;
use mptcp_netlink::mptcp_pm::{PmEvent, PmEventKind};

const LOCAL: &str = "10.1.1.2:40000";
const SERVER: &str = "10.1.3.2:80";
const NAT0: &str = "10.1.6.2:45672";
const NAT1: &str = "10.1.9.2:45672";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn v4(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn settings() -> CoreSettings {
    CoreSettings {
        policy: PolicyConfig::default(),
        max_detours: 2,
        nat_detours: vec![v4(NAT0), v4(NAT1)],
        tunnel_detours: 0,
        mapping_linger: Duration::from_secs(60),
        kernel_paths: true,
        endpoints: Vec::new(),
        subflow_limit: 2,
        add_addr_accepted: 1,
    }
}

fn event(kind: PmEventKind, token: u32, local: SocketAddr, remote: SocketAddr) -> PmEvent {
    PmEvent {
        kind,
        token: Some(token),
        local_addr: Some(local.ip()),
        local_port: Some(local.port()),
        remote_addr: Some(remote.ip()),
        remote_port: Some(remote.port()),
        local_id: None,
        remote_id: None,
        backup: false,
        if_index: None,
        error: None,
        server_side: Some(false),
    }
}

struct Pm {
    core: ClientCore,
    t0: Instant,
}

impl Pm {
    fn new(settings: CoreSettings) -> Self {
        Self {
            core: ClientCore::new(settings),
            t0: Instant::now(),
        }
    }

    fn at(&self, secs: u64) -> Instant {
        self.t0 + Duration::from_secs(secs)
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.core.poll_action()).collect()
    }

    fn established(&mut self, secs: u64, token: u32, remote: &str) -> Vec<Action> {
        let e = event(PmEventKind::Established, token, addr(LOCAL), addr(remote));
        self.core.handle_pm_event(self.at(secs), &e);
        self.actions()
    }

    fn grant(&mut self, secs: u64, detour: usize, dpt: u16) -> Vec<Action> {
        self.core.handle_mapping(
            self.at(secs),
            detour,
            v4(SERVER),
            MappingResult::Granted {
                dpt,
                lifetime: Duration::from_secs(600),
            },
        );
        self.actions()
    }
}

/// The CreateSubflow actions: (id, via, remote).
fn creates(actions: &[Action]) -> Vec<(SubflowId, Via, SocketAddr)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::CreateSubflow {
                id, via, remote, ..
            } => Some((*id, *via, *remote)),
            _ => None,
        })
        .collect()
}

fn requests(actions: &[Action]) -> Vec<usize> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::RequestMapping { detour, remote } => {
                assert_eq!(*remote, v4(SERVER));
                Some(*detour)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn every_nat_detour_is_asked_and_subflows_follow_the_answers() {
    let mut pm = Pm::new(settings());
    let actions = pm.established(0, 1, SERVER);
    assert_eq!(requests(&actions), vec![0, 1], "all NAT detours at once");
    assert!(
        creates(&actions).is_empty(),
        "nothing to create before an answer"
    );
    let actions = pm.grant(0, 1, 8080);
    assert_eq!(
        creates(&actions)
            .iter()
            .map(|c| (c.1, c.2))
            .collect::<Vec<_>>(),
        vec![(Via::Nat(1), addr("10.1.9.2:8080"))],
        "to the detour's address and the granted port"
    );
    let actions = pm.grant(1, 0, 80);
    assert_eq!(creates(&actions)[0].1, Via::Nat(0));
    // A second connection to the same server reuses both mappings without asking again.
    let actions = pm.established(2, 2, SERVER);
    assert!(requests(&actions).is_empty());
    let vias: Vec<Via> = creates(&actions).iter().map(|c| c.1).collect();
    assert_eq!(vias, vec![Via::Nat(1), Via::Nat(0)], "oldest mapping first");
}

#[test]
fn tunnels_come_first_and_max_detours_caps_the_total() {
    let mut settings = settings();
    settings.tunnel_detours = 1;
    settings.max_detours = 2;
    let mut pm = Pm::new(settings);
    let actions = pm.established(0, 1, SERVER);
    let created = creates(&actions);
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].1, Via::Tunnel(0));
    assert_eq!(
        created[0].2,
        addr(SERVER),
        "a tunnel subflow goes to the server itself"
    );
    assert_eq!(creates(&pm.grant(0, 1, 80)).len(), 1);
    assert!(
        creates(&pm.grant(0, 0, 80)).is_empty(),
        "max_detours reached"
    );

    let mut settings = self::settings();
    settings.tunnel_detours = 3;
    let mut pm = Pm::new(settings);
    let vias: Vec<Via> = creates(&pm.established(0, 1, SERVER))
        .iter()
        .map(|c| c.1)
        .collect();
    assert_eq!(vias, vec![Via::Tunnel(0), Via::Tunnel(1)]);
}

#[test]
fn a_failed_detour_is_replaced_by_the_next_and_never_retried() {
    let mut settings = settings();
    settings.max_detours = 1;
    let mut pm = Pm::new(settings);
    pm.established(0, 1, SERVER);
    let first = creates(&pm.grant(0, 0, 80))[0];
    assert!(creates(&pm.grant(0, 1, 80)).is_empty());
    // The kernel accepted the command, then the subflow failed (SUB_CLOSED with an error).
    pm.core
        .handle_subflow_result(first.0, Ok(IpAddr::from([10, 1, 1, 2])));
    let mut closed = event(
        PmEventKind::SubflowClosed,
        1,
        addr("10.1.1.2:50000"),
        first.2,
    );
    closed.error = Some(111);
    pm.core.handle_pm_event(pm.at(1), &closed);
    let next = creates(&pm.actions());
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].1, Via::Nat(1));
    // SUBFLOW_CREATE itself failing also moves on; with nothing left, nothing is created.
    pm.core
        .handle_subflow_result(next[0].0, Err("no route".into()));
    assert!(creates(&pm.actions()).is_empty());
}

#[test]
fn the_policy_selects_connections_but_kernel_paths_are_served_for_all() {
    let mut settings = settings();
    settings.policy = mptcp_detour::config::parse_toml(
        "default_detour = false\n[[rule]]\nports = [80]\ndetour = true\n",
        "test",
    )
    .unwrap();
    settings.endpoints = vec![
        Endpoint {
            addr: "10.1.7.2".parse().unwrap(),
            id: 7,
            if_index: 9,
        },
        Endpoint {
            addr: "fd00::2".parse().unwrap(),
            id: 8,
            if_index: 9,
        },
    ];
    let mut pm = Pm::new(settings);
    let actions = pm.established(0, 1, "10.1.3.2:22");
    assert!(requests(&actions).is_empty(), "port 22 is not selected");
    let created = creates(&actions);
    assert_eq!(created.len(), 1, "the IPv4 endpoint only: {created:?}");
    assert!(matches!(created[0].1, Via::Endpoint(e) if e.id == 7));
    assert_eq!(requests(&pm.established(0, 2, SERVER)), vec![0, 1]);
}

#[test]
fn announced_addresses_within_the_kernel_limits() {
    let mut pm = Pm::new(settings());
    pm.established(0, 1, SERVER);
    for (addr_, expected) in [("10.1.10.2", 1), ("10.1.11.2", 0)] {
        let mut announce = event(PmEventKind::Announced, 1, addr(LOCAL), addr(SERVER));
        announce.remote_addr = Some(addr_.parse().unwrap());
        announce.remote_port = Some(0);
        pm.core.handle_pm_event(pm.at(0), &announce);
        let created = creates(&pm.actions());
        assert_eq!(created.len(), expected, "add_addr_accepted = 1");
        if expected == 1 {
            assert_eq!(created[0].1, Via::Initial);
            assert_eq!(created[0].2, addr("10.1.10.2:80"), "the connection's port");
        }
    }
}

#[test]
fn unused_mappings_are_released_after_the_linger_and_reuse_cancels_it() {
    let mut pm = Pm::new(settings());
    pm.established(0, 1, SERVER);
    pm.grant(0, 0, 80);
    pm.core.handle_mapping(
        pm.at(0),
        1,
        v4(SERVER),
        MappingResult::Refused(Status::QuotaExceeded),
    );
    pm.actions();
    let closed = event(PmEventKind::Closed, 1, addr(LOCAL), addr(SERVER));
    pm.core.handle_pm_event(pm.at(10), &closed);
    pm.core.poll_timers(pm.at(69));
    assert!(pm.actions().is_empty());
    // Used again before the linger ends: kept (and detour 1, refused 30 s ago, is asked again).
    let actions = pm.established(69, 2, SERVER);
    assert_eq!(requests(&actions), vec![1]);
    pm.core.handle_pm_event(
        pm.at(80),
        &event(PmEventKind::Closed, 2, addr(LOCAL), addr(SERVER)),
    );
    pm.core.poll_timers(pm.at(139));
    assert!(pm.actions().is_empty());
    pm.core.poll_timers(pm.at(140));
    assert_eq!(
        pm.actions(),
        vec![Action::ReleaseMapping {
            detour: 0,
            remote: v4(SERVER),
            dpt: 80
        }]
    );
}

#[test]
fn a_refused_detour_is_left_alone_for_a_while() {
    let mut pm = Pm::new(settings());
    pm.established(0, 1, SERVER);
    pm.core
        .handle_mapping(pm.at(0), 0, v4(SERVER), MappingResult::NoAnswer);
    pm.core.handle_mapping(
        pm.at(0),
        1,
        v4(SERVER),
        MappingResult::Refused(Status::Denied),
    );
    assert!(requests(&pm.established(5, 2, SERVER)).is_empty());
    assert_eq!(requests(&pm.established(31, 3, SERVER)), vec![0, 1]);
}

#[test]
fn an_old_mapping_is_refreshed_before_use() {
    let mut pm = Pm::new(settings());
    pm.established(0, 1, SERVER);
    pm.grant(0, 0, 80);
    pm.grant(0, 1, 80);
    // Lifetime 600 s: past 300 s the detour may drop it soon, so ask again first.
    let actions = pm.established(301, 2, SERVER);
    assert_eq!(requests(&actions), vec![0, 1]);
    assert!(creates(&actions).is_empty());
    assert_eq!(creates(&pm.grant(302, 0, 80)).len(), 1);
}

#[test]
fn shutdown_closes_established_detour_subflows_and_releases_mappings() {
    let mut pm = Pm::new(settings());
    pm.established(0, 1, SERVER);
    let created = creates(&pm.grant(0, 0, 80))[0];
    pm.core
        .handle_subflow_result(created.0, Ok(IpAddr::from([10, 1, 1, 2])));
    let sub = event(
        PmEventKind::SubflowEstablished,
        1,
        addr("10.1.1.2:50001"),
        created.2,
    );
    pm.core.handle_pm_event(pm.at(0), &sub);
    assert_eq!(pm.core.established_detours(), 1);
    pm.core.shutdown();
    let actions = pm.actions();
    assert!(actions.contains(&Action::DestroySubflow {
        token: 1,
        local: addr("10.1.1.2:50001"),
        remote: created.2,
    }));
    assert!(actions.contains(&Action::ReleaseMapping {
        detour: 0,
        remote: v4(SERVER),
        dpt: 80
    }));
    // A grant arriving after shutdown is given straight back.
    let late = pm.grant(1, 1, 81);
    assert_eq!(
        late,
        vec![Action::ReleaseMapping {
            detour: 1,
            remote: v4(SERVER),
            dpt: 81
        }]
    );
    assert!(pm.established(1, 9, SERVER).is_empty());
}

#[test]
fn server_side_connections_are_left_alone() {
    let mut pm = Pm::new(settings());
    let mut e = event(PmEventKind::Established, 1, addr(LOCAL), addr(SERVER));
    e.server_side = Some(true);
    pm.core.handle_pm_event(pm.at(0), &e);
    assert!(pm.actions().is_empty());
    assert_eq!(pm.core.connection_count(), 0);
}
