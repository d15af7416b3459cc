//! Path management over a simulated network with a simulated clock: a client
//! with two interfaces, each behind its own NAT, and a proxy with one public
//! interface. Every datagram goes through the real CM codec. Unless a test
//! says otherwise, both ends have data flowing (the peers are busy), so
//! heartbeats run and dead paths are found within a second.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use mpip_proxy::path_manager::{
    InterfaceId, PathConfig, PathEvent, PathManager, PathState, Transmit,
};
use mpip_proxy::table::availability::{AvailabilityTable, HandshakeConfig};
use mpip_proxy::table::path::PathTable;
use mpip_proxy::time::Timestamp;
use mpip_proxy::wire::{CmPacket, CmRepr, NodeId, PathId, SessionId};

const CLIENT: NodeId = NodeId([0x02, 0, 0, 0, 0, 0x01]);
const PROXY: NodeId = NodeId([0x02, 0, 0, 0, 0, 0x02]);
const WIFI: InterfaceId = InterfaceId(1);
const LTE: InterfaceId = InterfaceId(2);
const PUBLIC: InterfaceId = InterfaceId(10);
const TICK: Duration = Duration::from_millis(1);

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct Datagram {
    deliver_at: Timestamp,
    to_client: bool,
    interface: InterfaceId,
    source: SocketAddr,
    bytes: Vec<u8>,
}

/// One client interface: private address, its NAT's public mapping, one-way latency.
struct Access {
    interface: InterfaceId,
    private: SocketAddr,
    public: SocketAddr,
    latency: Duration,
    link_up: bool,
}

struct Sim {
    now: Timestamp,
    client: PathManager,
    availability: AvailabilityTable,
    proxy: PathManager,
    proxy_addr: SocketAddr,
    access: Vec<Access>,
    in_flight: Vec<Datagram>,
    client_events: Vec<(Timestamp, PathEvent)>,
    proxy_events: Vec<(Timestamp, PathEvent)>,
    /// Whether sessions carry data (each end notes a data packet every ms).
    traffic: bool,
    /// Datagrams the client and the proxy sent.
    sent: [u64; 2],
}

impl Sim {
    fn new(wifi_latency: Duration, lte_latency: Duration) -> Sim {
        let now = Timestamp::from_secs(1);
        let proxy_addr = addr("198.51.100.1:4789");
        let access = vec![
            Access {
                interface: WIFI,
                private: addr("10.0.1.2:4789"),
                public: addr("203.0.113.1:61001"),
                latency: wifi_latency,
                link_up: true,
            },
            Access {
                interface: LTE,
                private: addr("10.0.2.2:4789"),
                public: addr("203.0.113.2:61002"),
                latency: lte_latency,
                link_up: true,
            },
        ];
        let mut client = PathManager::new(PathConfig::default(), CLIENT);
        for a in &access {
            client.handle_interface_up(now, a.interface, a.private);
        }
        let mut proxy = PathManager::new(
            PathConfig {
                sends_keepalives: false,
                ..PathConfig::default()
            },
            PROXY,
        );
        proxy.handle_interface_up(now, PUBLIC, proxy_addr);
        let mut availability = AvailabilityTable::new(HandshakeConfig::default());
        availability.start(now, proxy_addr);
        Sim {
            now,
            client,
            availability,
            proxy,
            proxy_addr,
            access,
            in_flight: Vec::new(),
            client_events: Vec::new(),
            proxy_events: Vec::new(),
            traffic: true,
            sent: [0, 0],
        }
    }

    fn access_mut(&mut self, interface: InterfaceId) -> &mut Access {
        self.access
            .iter_mut()
            .find(|a| a.interface == interface)
            .unwrap()
    }

    fn send_from_client(&mut self, transmit: Transmit) {
        self.sent[0] += 1;
        let bytes = transmit.repr.encapsulate(&[]).unwrap();
        let Some(access) = self.access.iter().find(|a| a.private == transmit.local) else {
            return;
        };
        if !access.link_up || transmit.remote != self.proxy_addr {
            return;
        }
        self.in_flight.push(Datagram {
            deliver_at: self.now + access.latency,
            to_client: false,
            interface: PUBLIC,
            source: access.public,
            bytes,
        });
    }

    fn send_from_proxy(&mut self, transmit: Transmit) {
        self.sent[1] += 1;
        let bytes = transmit.repr.encapsulate(&[]).unwrap();
        // Only NAT mappings are reachable; announced private addresses are not.
        let Some(access) = self.access.iter().find(|a| a.public == transmit.remote) else {
            return;
        };
        if !access.link_up {
            return;
        }
        self.in_flight.push(Datagram {
            deliver_at: self.now + access.latency,
            to_client: true,
            interface: access.interface,
            source: self.proxy_addr,
            bytes,
        });
    }

    fn step(&mut self) {
        self.now += TICK;
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|d| d.deliver_at <= now);
        self.in_flight = later;
        if self.traffic {
            self.client.note_data(now, PROXY);
            self.proxy.note_data(now, CLIENT);
        }
        for datagram in due {
            let packet = CmPacket::new_checked(&datagram.bytes[..]).unwrap();
            let repr = CmRepr::parse(&packet).unwrap();
            if datagram.to_client {
                self.availability
                    .handle_received(now, datagram.source, &repr);
                self.client
                    .handle_received(now, datagram.interface, datagram.source, &repr);
            } else {
                self.proxy
                    .handle_received(now, datagram.interface, datagram.source, &repr);
            }
        }
        if let Some(remote) = self.availability.poll_probe(now) {
            let enable = self.client.enable_packet(now, WIFI, remote).unwrap();
            self.send_from_client(enable);
        }
        while let Some(t) = self.client.poll_transmit(now) {
            self.send_from_client(t);
        }
        while let Some(t) = self.proxy.poll_transmit(now) {
            self.send_from_proxy(t);
        }
        while let Some(e) = self.client.poll_event() {
            self.client_events.push((now, e));
        }
        while let Some(e) = self.proxy.poll_event() {
            self.proxy_events.push((now, e));
        }
    }

    fn run_for(&mut self, duration: Duration) {
        let end = self.now + duration;
        while self.now < end {
            self.step();
        }
    }

    /// Runs until `done` holds or `limit` passes; returns the time it took.
    fn run_until(&mut self, limit: Duration, done: impl Fn(&Sim) -> bool) -> Option<Duration> {
        let start = self.now;
        let end = start + limit;
        while self.now < end {
            if done(self) {
                return Some(self.now.saturating_since(start));
            }
            self.step();
        }
        done(self).then(|| self.now.saturating_since(start))
    }

    fn client_path(&self, interface: InterfaceId) -> Option<PathState> {
        self.client
            .path_between(interface, self.proxy_addr)
            .map(|p| p.state)
    }

    fn proxy_path_to(&self, public: SocketAddr) -> Option<PathState> {
        self.proxy.path_between(PUBLIC, public).map(|p| p.state)
    }

    fn both_ends_active(&self, interface: InterfaceId) -> bool {
        let public = self
            .access
            .iter()
            .find(|a| a.interface == interface)
            .unwrap()
            .public;
        self.client_path(interface) == Some(PathState::Active)
            && self.proxy_path_to(public) == Some(PathState::Active)
    }
}

fn established() -> Sim {
    let mut sim = Sim::new(Duration::from_millis(10), Duration::from_millis(30));
    let took = sim.run_until(Duration::from_secs(2), |s| {
        s.both_ends_active(WIFI) && s.both_ends_active(LTE)
    });
    assert!(took.is_some(), "discovery did not finish");
    sim
}

#[test]
fn handshake_then_discovery_finds_every_interface_pair_through_nat() {
    let mut sim = Sim::new(Duration::from_millis(10), Duration::from_millis(30));
    let took = sim.run_until(Duration::from_secs(2), |s| {
        s.both_ends_active(WIFI) && s.both_ends_active(LTE)
    });
    assert!(took.is_some(), "both paths active on both ends");
    assert_eq!(sim.availability.enabled_node(sim.proxy_addr), Some(PROXY));
    // The proxy reaches the client only through the NAT mappings it observed.
    let proxy_node = sim.proxy.nodes().get(CLIENT).unwrap();
    assert!(proxy_node.observed.contains_key(&addr("203.0.113.1:61001")));
    assert!(proxy_node.observed.contains_key(&addr("203.0.113.2:61002")));
    assert!(proxy_node.announced.contains(&addr("10.0.1.2:4789")));
    // Paths toward the announced private addresses give up after the probes.
    sim.run_for(Duration::from_secs(2));
    assert_eq!(
        sim.proxy
            .path_between(PUBLIC, addr("10.0.1.2:4789"))
            .map(|p| p.state),
        Some(PathState::Unreachable)
    );
    assert_eq!(
        sim.proxy.paths_to(CLIENT).filter(|p| p.is_active()).count(),
        2
    );
    assert_eq!(
        sim.client.paths_to(PROXY).filter(|p| p.is_active()).count(),
        2
    );
}

#[test]
fn silent_link_failure_is_detected_and_path_returns_within_one_second() {
    let mut sim = established();
    sim.run_for(Duration::from_secs(1));
    let cut_at = sim.now;
    sim.access_mut(LTE).link_up = false;
    let detect = sim
        .run_until(Duration::from_secs(2), |s| {
            s.client_path(LTE) == Some(PathState::Dead)
                && s.proxy_path_to(addr("203.0.113.2:61002")) == Some(PathState::Dead)
        })
        .expect("dead path detected on both ends");
    let config = PathConfig::default();
    assert!(
        detect <= config.dead_after + config.heartbeat_interval + Duration::from_millis(30),
        "detected after {detect:?}"
    );
    assert!(sim.both_ends_active(WIFI), "the other path is unaffected");
    let lte_path = sim.client.path_between(LTE, sim.proxy_addr).unwrap().id;
    assert!(sim.client_events.iter().any(|(t, e)| *t > cut_at
        && *e
            == PathEvent::Down {
                node: PROXY,
                path: lte_path
            }));

    sim.run_for(Duration::from_secs(3));
    sim.access_mut(LTE).link_up = true;
    let recovered = sim
        .run_until(Duration::from_secs(3), |s| s.both_ends_active(LTE))
        .expect("path re-activated");
    eprintln!("link failure detected after {detect:?}, path re-activated {recovered:?} after the link returned");
    assert!(
        recovered < Duration::from_secs(1),
        "re-activation took {recovered:?}"
    );
}

#[test]
fn interface_down_kills_paths_at_once_and_up_revives_them() {
    let mut sim = established();
    let now = sim.now;
    sim.client.handle_interface_down(now, LTE);
    assert_eq!(sim.client_path(LTE), Some(PathState::Dead));
    assert_eq!(sim.client_path(WIFI), Some(PathState::Active));
    // While down, nothing is sent from that interface.
    sim.run_for(Duration::from_secs(1));
    assert!(sim
        .client
        .paths_to(PROXY)
        .filter(|p| p.interface == LTE)
        .all(|p| p.last_sent.is_none_or(|t| t <= now)));
    let now = sim.now;
    sim.client
        .handle_interface_up(now, LTE, addr("10.0.2.2:4789"));
    let recovered = sim
        .run_until(Duration::from_secs(2), |s| s.both_ends_active(LTE))
        .expect("path back after interface up");
    assert!(recovered < Duration::from_secs(1), "took {recovered:?}");
}

#[test]
fn address_change_resets_paths_and_rediscovers() {
    let mut sim = established();
    let old_public = addr("203.0.113.2:61002");
    // LTE gets a new address and a new NAT mapping.
    {
        let lte = sim.access_mut(LTE);
        lte.private = addr("10.0.3.2:4789");
        lte.public = addr("203.0.113.3:61003");
    }
    let now = sim.now;
    sim.client
        .handle_address_change(now, LTE, addr("10.0.3.2:4789"));
    assert!(
        sim.client_path(LTE).is_none_or(|s| s != PathState::Active),
        "old LTE path is gone on the client"
    );
    let took = sim.run_until(Duration::from_secs(2), |s| {
        s.both_ends_active(LTE) && s.both_ends_active(WIFI)
    });
    assert!(took.is_some(), "rediscovered after the address change");
    // The proxy dropped the path to the old mapping (IP_CHANGE handling).
    assert_eq!(sim.proxy_path_to(old_public), None);
    assert!(sim
        .proxy_events
        .iter()
        .any(|(t, e)| *t >= now && matches!(e, PathEvent::Removed { node: CLIENT, .. })));
    let client_node = sim.proxy.nodes().get(CLIENT).unwrap();
    assert!(client_node.announced.contains(&addr("10.0.3.2:4789")));
    assert!(!client_node.announced.contains(&addr("10.0.2.2:4789")));
}

#[test]
fn delay_feedback_ranks_paths_by_one_way_delay() {
    let mut sim = Sim::new(Duration::from_millis(10), Duration::from_millis(30));
    // The session's Path Information Table follows the client's events from the start.
    let mut table = PathTable::new();
    let mut seen = 0;
    let start = sim.now;
    while sim.now < start + Duration::from_secs(3) {
        sim.step();
        for (_, event) in &sim.client_events[seen..] {
            sim.client
                .apply_event(PROXY, SessionId::CONTROL, event, &mut table);
        }
        seen = sim.client_events.len();
    }
    let ids: HashMap<InterfaceId, PathId> = sim
        .client
        .paths_to(PROXY)
        .map(|p| (p.interface, p.id))
        .collect();
    assert_eq!(table.live().count(), 2);
    let wifi = table.get(ids[&WIFI]).unwrap();
    let lte = table.get(ids[&LTE]).unwrap();
    // Link latencies are 10 ms and 30 ms; the simulated clocks are shared, so
    // the samples are the one-way delays themselves.
    assert_eq!(wifi.delay.realtime, Some(10_000));
    assert_eq!(lte.delay.realtime, Some(30_000));
    assert_eq!(wifi.delay.min, Some(10_000));
    // A fresh table built from the manager agrees on which paths are live.
    let fresh = sim.client.path_table_for(PROXY);
    assert_eq!(fresh.live().count(), 2);

    // The LTE link dies: the event stream marks it dead in the session table.
    sim.access_mut(LTE).link_up = false;
    sim.run_for(Duration::from_secs(1));
    for (_, event) in &sim.client_events[seen..] {
        sim.client
            .apply_event(PROXY, SessionId::CONTROL, event, &mut table);
    }
    assert!(!table.get(ids[&LTE]).unwrap().live);
    assert!(table.get(ids[&WIFI]).unwrap().live);
}

/// Quiet idle (`PROTOCOL.md` §6.2): once the sessions stop, the client sends
/// one keepalive per path per 15 s, which the proxy end answers, and both
/// paths stay up through the NATs; a link that dies while idle is found
/// within two keepalive intervals, and traffic brings heartbeats back.
#[test]
fn idle_paths_cost_one_keepalive_per_path_per_interval() {
    let mut sim = established();
    sim.traffic = false;
    let config = PathConfig::default();
    sim.run_for(config.linger + Duration::from_secs(1));
    let before = sim.sent;
    let idle = Duration::from_secs(300);
    sim.run_for(idle);
    let minutes = idle.as_secs_f64() / 60.0;
    let client_per_minute = (sim.sent[0] - before[0]) as f64 / minutes;
    let proxy_per_minute = (sim.sent[1] - before[1]) as f64 / minutes;
    eprintln!(
        "idle: the client sent {client_per_minute:.1} and the proxy end {proxy_per_minute:.1} datagrams per minute over two paths"
    );
    assert!(client_per_minute <= 8.0 + 0.01, "{client_per_minute}");
    assert!(
        client_per_minute >= 7.0,
        "keepalives flow: {client_per_minute}"
    );
    assert!(proxy_per_minute <= client_per_minute, "{proxy_per_minute}");
    assert!(sim.both_ends_active(WIFI) && sim.both_ends_active(LTE));

    // A link dying while idle is noticed within two keepalive intervals.
    sim.access_mut(LTE).link_up = false;
    let detect = sim
        .run_until(config.idle_dead_after() + Duration::from_secs(16), |s| {
            s.client_path(LTE) == Some(PathState::Dead)
        })
        .expect("the idle client notices the dead path");
    assert!(detect <= config.idle_dead_after() + config.keepalive_interval);
    // While idle, a dead path is probed no more often than a live one gets
    // keepalives: every 15 s on each path, five each in a closed minute.
    let before = sim.sent[0];
    sim.run_for(Duration::from_secs(60));
    let probes = sim.sent[0] - before;
    assert!(
        probes <= 10,
        "{probes} datagrams in a minute with one path dead"
    );

    // Traffic again: heartbeats, and the link's return is seen within a second.
    sim.traffic = true;
    sim.access_mut(LTE).link_up = true;
    let back = sim
        .run_until(Duration::from_secs(3), |s| s.both_ends_active(LTE))
        .expect("path back once busy");
    assert!(back < Duration::from_secs(1), "{back:?}");
}
