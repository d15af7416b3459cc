//! The detour host's sans-IO core with a recording host and a simulated clock: the thesis's dpt rules,
//! authentication, replay and rate limits, quotas, the ACL, release and idle expiry.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use mptcp_detour::host::core::{Core, CoreConfig, Host, KeyBinding, Mapping, Outcome};
use mptcp_detour::key::Psk;
use mptcp_detour::wire::{Op, Packet, Repr, Status, V1Repr, V2Repr};
use proptest::prelude::*;

#[derive(Debug, Default)]
struct Recorder {
    installed: HashSet<Mapping>,
    listeners: HashSet<u16>,
    fail_install: bool,
    operations: usize,
}

impl Host for Recorder {
    fn install(&mut self, mapping: &Mapping) -> Result<(), String> {
        self.operations += 1;
        if self.fail_install {
            return Err("refused".into());
        }
        assert!(
            self.installed.insert(*mapping),
            "installed twice: {mapping:?}"
        );
        Ok(())
    }

    fn remove(&mut self, mapping: &Mapping) -> Result<(), String> {
        self.operations += 1;
        assert!(self.installed.remove(mapping), "removed twice: {mapping:?}");
        Ok(())
    }

    fn listening_ports(&mut self) -> HashSet<u16> {
        self.listeners.clone()
    }
}

const WALL: u64 = 1_800_000_000_000;
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 1, 3, 2);

fn psk() -> Psk {
    Psk::parse("00112233445566778899aabbccddeeff").unwrap()
}

fn config() -> CoreConfig {
    CoreConfig {
        keys: vec![KeyBinding {
            name: "collective".into(),
            psk: psk(),
            clients: vec!["0.0.0.0/0".parse().unwrap()],
        }],
        v1_clients: Vec::new(),
        max_clock_skew: Duration::from_secs(30),
        mappings_per_client: 4,
        max_mappings: 100,
        request_rate: 10.0,
        request_burst: 20,
        idle_timeout: Duration::from_secs(60),
        port_range: 30000..=30009,
        deny_destinations: vec![
            "127.0.0.0/8".parse().unwrap(),
            "169.254.0.0/16".parse().unwrap(),
            "10.1.6.0/24".parse().unwrap(),
        ],
    }
}

struct Lab {
    core: Core,
    host: Recorder,
    start: Instant,
    nonce: u64,
}

impl Lab {
    fn new(config: CoreConfig) -> Self {
        Self {
            core: Core::new(config),
            host: Recorder::default(),
            start: Instant::now(),
            nonce: 0,
        }
    }

    fn message(&mut self, op: Op, rip: Ipv4Addr, rpt: u16, dpt: u16) -> V2Repr {
        self.nonce += 1;
        V2Repr {
            op,
            status: Status::Ok,
            key_id: 0,
            nonce: self.nonce,
            timestamp_ms: WALL,
            rip,
            rpt,
            dpt,
            lifetime_s: 0,
        }
    }

    fn send(&mut self, from: Ipv4Addr, bytes: &[u8]) -> (Outcome, Option<Vec<u8>>) {
        self.send_at(Duration::ZERO, from, bytes)
    }

    fn send_at(
        &mut self,
        after: Duration,
        from: Ipv4Addr,
        bytes: &[u8],
    ) -> (Outcome, Option<Vec<u8>>) {
        let handled = self.core.handle_datagram(
            self.start + after,
            WALL + after.as_millis() as u64,
            SocketAddrV4::new(from, 40000),
            bytes,
            &mut self.host,
        );
        (handled.outcome, handled.reply)
    }

    /// A signed request; returns the outcome and the answer's status and dpt.
    fn request(&mut self, rip: Ipv4Addr, rpt: u16, dpt: u16) -> (Outcome, Status, u16) {
        let message = self.message(Op::Request, rip, rpt, dpt);
        let (outcome, reply) = self.send(CLIENT, &psk().sign(&message));
        let answer = answer(&reply.expect("signed requests are answered"), &message);
        assert_eq!(answer.op, Op::Response);
        (outcome, answer.status, answer.dpt)
    }
}

/// Checks the answer to `request`: signed by the same key, same nonce and remote; returns it.
fn answer(bytes: &[u8], request: &V2Repr) -> V2Repr {
    let packet = Packet::new_checked(bytes).unwrap();
    assert!(psk().verify(&packet), "the answer does not verify");
    let Repr::V2(answer) = Repr::parse(&packet).unwrap() else {
        panic!("a version 1 answer to version 2");
    };
    assert_eq!(answer.nonce, request.nonce);
    assert_eq!((answer.rip, answer.rpt), (request.rip, request.rpt));
    answer
}

#[test]
fn the_proposed_port_is_used_and_an_existing_mapping_reused() {
    let mut lab = Lab::new(config());
    assert_eq!(
        lab.request(SERVER, 80, 80),
        (Outcome::Created, Status::Ok, 80)
    );
    assert!(lab.host.installed.contains(&Mapping {
        client: CLIENT,
        dpt: 80,
        rip: SERVER,
        rpt: 80
    }));
    // Rule 1: the same remote again, whatever port is proposed, gets the existing mapping.
    assert_eq!(
        lab.request(SERVER, 80, 5555),
        (Outcome::Reused, Status::Ok, 80)
    );
    assert_eq!(lab.host.installed.len(), 1);
    assert_eq!(lab.core.mapping_count(), 1);
}

#[test]
fn a_port_mapped_elsewhere_or_with_a_listener_is_replaced() {
    let mut lab = Lab::new(config());
    lab.request(SERVER, 80, 80);
    // Rule 2: dpt 80 already maps to SERVER:80 for this client.
    let (outcome, status, dpt) = lab.request(Ipv4Addr::new(10, 9, 9, 9), 80, 80);
    assert_eq!((outcome, status), (Outcome::Created, Status::Ok));
    assert_eq!(dpt, 30000);
    // Rule 3: a local listener on the proposed port.
    lab.host.listeners.insert(443);
    lab.host.listeners.insert(30001);
    let (_, _, dpt) = lab.request(SERVER, 443, 443);
    assert_eq!(dpt, 30002, "443 and 30001 have listeners");
    // Another client may use dpt 80 for a different remote: mappings are per client.
    let other = Ipv4Addr::new(10, 1, 1, 3);
    let message = lab.message(Op::Request, Ipv4Addr::new(10, 9, 9, 9), 80, 80);
    let (outcome, reply) = lab.send(other, &psk().sign(&message));
    assert_eq!(outcome, Outcome::Created);
    assert_eq!(answer(&reply.unwrap(), &message).dpt, 80);
}

#[test]
fn forged_unknown_stale_and_replayed_requests_change_nothing() {
    let mut lab = Lab::new(config());
    let message = lab.message(Op::Request, SERVER, 80, 80);
    let signed = psk().sign(&message);

    let mut forged = signed.clone();
    forged[31] ^= 1; // dpt
    assert_eq!(lab.send(CLIENT, &forged), (Outcome::BadMac, None));

    let other_key = Psk::parse(&"5a".repeat(16)).unwrap();
    assert_eq!(
        lab.send(CLIENT, &other_key.sign(&message)),
        (Outcome::UnknownKey, None)
    );

    let mut stale = message;
    stale.timestamp_ms = WALL - 31_000;
    assert_eq!(
        lab.send(CLIENT, &psk().sign(&stale)),
        (Outcome::Stale, None)
    );
    stale.timestamp_ms = WALL + 31_000;
    assert_eq!(
        lab.send(CLIENT, &psk().sign(&stale)),
        (Outcome::Stale, None)
    );
    assert_eq!(lab.host.operations, 0);

    let (outcome, reply) = lab.send(CLIENT, &signed);
    assert_eq!(outcome, Outcome::Created);
    assert!(reply.is_some());
    let before = lab.host.operations;
    // The same bytes again (from the client or anyone else): dropped, no answer.
    assert_eq!(lab.send(CLIENT, &signed), (Outcome::Replayed, None));
    assert_eq!(
        lab.send(Ipv4Addr::new(192, 0, 2, 66), &signed),
        (Outcome::Replayed, None)
    );
    assert_eq!(lab.host.operations, before);

    // A version 1 request is refused unless configured; garbage is malformed.
    let v1 = Repr::V1(V1Repr {
        op: Op::Request,
        rip: SERVER,
        rpt: 22,
        dpt: 22,
    })
    .to_bytes();
    assert_eq!(lab.send(CLIENT, &v1), (Outcome::V1Refused, None));
    assert_eq!(
        lab.send(CLIENT, b"GET / HTTP/1.0"),
        (Outcome::Malformed, None)
    );
    // Answers sent to a detour are not requests.
    let response = lab.message(Op::Response, SERVER, 80, 80);
    assert_eq!(
        lab.send(CLIENT, &psk().sign(&response)),
        (Outcome::Unexpected, None)
    );
    assert_eq!(lab.host.operations, before);
    assert_eq!(lab.core.mapping_count(), 1);
}

#[test]
fn a_replayed_release_cannot_remove_a_new_mapping() {
    let mut lab = Lab::new(config());
    lab.request(SERVER, 80, 80);
    let release = lab.message(Op::Release, SERVER, 80, 80);
    let signed = psk().sign(&release);
    let (outcome, reply) = lab.send(CLIENT, &signed);
    assert_eq!(outcome, Outcome::Released);
    let answer = answer(&reply.unwrap(), &release);
    assert_eq!((answer.op, answer.status), (Op::Released, Status::Ok));
    assert!(lab.host.installed.is_empty());
    lab.request(SERVER, 80, 80);
    assert_eq!(lab.send(CLIENT, &signed), (Outcome::Replayed, None));
    assert_eq!(lab.host.installed.len(), 1);
    // Releasing what the client does not hold, or with the wrong remote: NotFound.
    let wrong = lab.message(Op::Release, SERVER, 8080, 80);
    let (outcome, reply) = lab.send(CLIENT, &psk().sign(&wrong));
    assert_eq!(outcome, Outcome::NotFound);
    assert_eq!(status_of(&reply.unwrap()), Status::NotFound);
    assert_eq!(lab.host.installed.len(), 1);
}

fn status_of(bytes: &[u8]) -> Status {
    Packet::new_checked(bytes)
        .map(|p| Status::from_u8(p.status()).unwrap())
        .unwrap()
}

#[test]
fn quotas_and_the_global_limit_answer_without_installing() {
    let mut config = config();
    config.mappings_per_client = 2;
    config.max_mappings = 3;
    let mut lab = Lab::new(config);
    lab.request(SERVER, 1, 1);
    lab.request(SERVER, 2, 2);
    assert_eq!(
        lab.request(SERVER, 3, 3),
        (Outcome::OverQuota, Status::QuotaExceeded, 3)
    );
    // The quota counts mappings, not requests: reuse still works.
    assert_eq!(lab.request(SERVER, 2, 2).0, Outcome::Reused);
    let other = Ipv4Addr::new(10, 1, 1, 3);
    for (n, expected) in [(1, Outcome::Created), (2, Outcome::Full)] {
        let message = lab.message(Op::Request, SERVER, n, n);
        let (outcome, reply) = lab.send(other, &psk().sign(&message));
        assert_eq!(outcome, expected);
        assert_eq!(
            answer(&reply.unwrap(), &message).status,
            if expected == Outcome::Full {
                Status::Unavailable
            } else {
                Status::Ok
            }
        );
    }
    assert_eq!(lab.host.installed.len(), 3);
}

#[test]
fn the_rate_limit_refills_with_time() {
    let mut config = config();
    config.request_rate = 2.0;
    config.request_burst = 3;
    let mut lab = Lab::new(config);
    for _ in 0..3 {
        let m = lab.message(Op::Request, SERVER, 80, 80);
        assert_ne!(lab.send(CLIENT, &psk().sign(&m)).0, Outcome::RateLimited);
    }
    let m = lab.message(Op::Request, SERVER, 80, 80);
    assert_eq!(
        lab.send(CLIENT, &psk().sign(&m)),
        (Outcome::RateLimited, None)
    );
    // A rate-limited request was not remembered, so the client can send it again later.
    let again = lab.send_at(Duration::from_millis(600), CLIENT, &psk().sign(&m));
    assert_eq!(again.0, Outcome::Reused);
    // Another client has its own budget.
    let m = lab.message(Op::Request, SERVER, 80, 80);
    assert_eq!(
        lab.send(Ipv4Addr::new(10, 1, 1, 9), &psk().sign(&m)).0,
        Outcome::Created
    );
}

#[test]
fn denied_destinations_and_clients() {
    let mut lab = Lab::new(config());
    for rip in [
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(10, 1, 6, 2),
    ] {
        assert_eq!(
            lab.request(rip, 22, 22),
            (Outcome::DeniedDestination, Status::Denied, 22)
        );
    }
    assert_eq!(lab.request(SERVER, 0, 80).1, Status::Denied);
    assert_eq!(
        lab.request(Ipv4Addr::new(224, 0, 0, 1), 80, 80).0,
        Outcome::Malformed
    );
    let mut config = config();
    config.keys[0].clients = vec!["10.1.1.0/24".parse().unwrap()];
    let mut lab = Lab::new(config);
    let m = lab.message(Op::Request, SERVER, 80, 80);
    let (outcome, reply) = lab.send(Ipv4Addr::new(10, 2, 0, 1), &psk().sign(&m));
    assert_eq!(outcome, Outcome::DeniedClient);
    assert_eq!(answer(&reply.unwrap(), &m).status, Status::Denied);
    assert!(lab.host.installed.is_empty());
}

#[test]
fn version_1_when_configured_answers_in_version_1() {
    let mut config = config();
    config.v1_clients = vec!["10.1.1.0/24".parse().unwrap()];
    let mut lab = Lab::new(config);
    let request = V1Repr {
        op: Op::Request,
        rip: SERVER,
        rpt: 80,
        dpt: 80,
    };
    let (outcome, reply) = lab.send(CLIENT, &Repr::V1(request).to_bytes());
    assert_eq!(outcome, Outcome::Created);
    assert_eq!(
        reply.unwrap(),
        Repr::V1(V1Repr {
            op: Op::Response,
            ..request
        })
        .to_bytes()
    );
    // Outside v1_clients: dropped silently.
    assert_eq!(
        lab.send(Ipv4Addr::new(10, 2, 0, 1), &Repr::V1(request).to_bytes()),
        (Outcome::DeniedClient, None)
    );
    // Refusals in version 1 have no answer (the thesis's message has no status).
    let denied = V1Repr {
        rip: Ipv4Addr::LOCALHOST,
        ..request
    };
    assert_eq!(
        lab.send(CLIENT, &Repr::V1(denied).to_bytes()),
        (Outcome::DeniedDestination, None)
    );
}

#[test]
fn an_install_failure_answers_unavailable_and_keeps_nothing() {
    let mut lab = Lab::new(config());
    lab.host.fail_install = true;
    assert_eq!(
        lab.request(SERVER, 80, 80),
        (Outcome::InstallFailed, Status::Unavailable, 80)
    );
    assert_eq!(lab.core.mapping_count(), 0);
    lab.host.fail_install = false;
    assert_eq!(lab.request(SERVER, 80, 80).0, Outcome::Created);
}

#[test]
fn no_free_port() {
    let mut config = config();
    config.port_range = 30000..=30001;
    let mut lab = Lab::new(config);
    lab.host.listeners.extend([30000, 80]);
    assert_eq!(lab.request(SERVER, 80, 80).2, 30001);
    assert_eq!(
        lab.request(SERVER, 81, 80),
        (Outcome::NoPort, Status::NoPort, 80)
    );
}

#[test]
fn idle_mappings_expire_unless_counters_or_requests_move() {
    let mut lab = Lab::new(config());
    lab.request(SERVER, 80, 80);
    lab.request(SERVER, 443, 443);
    let t = |s| lab.start + Duration::from_secs(s);
    // 50 s later the mapping to :80 carried traffic.
    let (t50, t70, t130) = (t(50), t(70), t(130));
    lab.core
        .handle_counters(t50, [(CLIENT, 80, 10, 15_000), (CLIENT, 443, 0, 0)]);
    assert_eq!(lab.core.expire(t50, WALL, &mut lab.host), 0);
    assert_eq!(lab.core.expire(t70, WALL, &mut lab.host), 1);
    assert_eq!(lab.host.installed.len(), 1);
    assert_eq!(lab.core.traffic(), (10, 15_000));
    lab.core.handle_counters(t130, [(CLIENT, 80, 10, 15_000)]);
    assert_eq!(lab.core.expire(t130, WALL, &mut lab.host), 1);
    assert!(lab.host.installed.is_empty());
    assert_eq!(lab.core.expired_count(), 2);
    // Removed mappings' bytes stay counted.
    assert_eq!(lab.core.traffic(), (10, 15_000));
}

proptest! {
    /// Arbitrary datagrams (and arbitrary signed-looking ones with a wrong key) never panic and never
    /// change the kernel state while version 1 is off.
    #[test]
    fn unauthenticated_bytes_install_nothing(
        bytes in proptest::collection::vec(any::<u8>(), 0..100),
        version in 1u8..=2,
        op in 0u8..4,
    ) {
        let mut lab = Lab::new(config());
        let mut bytes = bytes;
        if let Some(first) = bytes.first_mut() {
            *first = version;
        }
        if bytes.len() > 1 {
            bytes[1] = op;
        }
        let (outcome, reply) = lab.send(CLIENT, &bytes);
        prop_assert!(reply.is_none(), "{outcome:?} was answered");
        prop_assert_eq!(lab.host.operations, 0);
        let mut padded = bytes.clone();
        padded.resize(68, 0);
        padded[0] = 2;
        let _ = lab.send(CLIENT, &padded);
        prop_assert_eq!(lab.host.operations, 0);
    }
}
