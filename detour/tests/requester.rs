//! The client's NAT requester against a scripted detour on loopback: a lost request is retried with a
//! fresh nonce, the requester gives up after `request_attempts`, forged, mismatched, malformed and
//! off-path answers are dropped (and counted) while the real one is taken, and releases are confirmed.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mptcp_detour::client::core::MappingResult;
use mptcp_detour::client::metrics::ClientMetrics;
use mptcp_detour::client::requester::{self, NatDetour, Requester};
use mptcp_detour::key::Psk;
use mptcp_detour::wire::{Op, Packet, Repr, Status, V1Repr, V2Repr};
use tokio::net::UdpSocket;

const KEY: &str = "00112233445566778899aabbccddeeff00112233";
const SERVER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 80), 443);
const TIMEOUT: Duration = Duration::from_millis(150);
/// What the scripted detour grants (`answer(.., 9000)`).
const GRANTED: MappingResult = MappingResult::Granted {
    dpt: 9000,
    lifetime: Duration::from_secs(60),
};

fn psk() -> Psk {
    Psk::parse(KEY).unwrap()
}

/// A detour socket on loopback and a requester (version 2 with `key`, or version 1) that asks it.
async fn pair(key: Option<Psk>) -> (UdpSocket, Arc<Requester>, Arc<ClientMetrics>) {
    let detour = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let SocketAddr::V4(address) = detour.local_addr().unwrap() else {
        unreachable!()
    };
    let socket = requester::connect(address).await.unwrap();
    let metrics = Arc::new(ClientMetrics::new(vec![address.to_string()]));
    let requester = Requester::new(
        vec![NatDetour {
            address,
            psk: key,
            socket: Arc::new(socket),
        }],
        TIMEOUT,
        3,
        metrics.clone(),
    );
    (detour, requester, metrics)
}

/// Asks the detour for a mapping to [`SERVER`] on a task.
fn ask(requester: &Arc<Requester>) -> tokio::task::JoinHandle<MappingResult> {
    let requester = requester.clone();
    tokio::spawn(async move { requester.request(0, SERVER).await })
}

/// Receives one request at the detour: its parsed version 2 form and where it came from.
async fn receive(detour: &UdpSocket) -> (V2Repr, SocketAddr) {
    let mut buf = [0u8; 256];
    let (len, from) = detour.recv_from(&mut buf).await.unwrap();
    let packet = Packet::new_checked(&buf[..len]).unwrap();
    assert!(psk().verify(&packet), "the request is signed");
    let Repr::V2(repr) = Repr::parse(&packet).unwrap() else {
        panic!("a version 2 request")
    };
    (repr, from)
}

/// The answer a detour gives to `request`.
fn answer(request: &V2Repr, op: Op, dpt: u16) -> V2Repr {
    V2Repr {
        op,
        status: Status::Ok,
        timestamp_ms: mptcp_detour::config::unix_ms(),
        dpt,
        lifetime_s: 60,
        ..*request
    }
}

/// The metrics in the text exposition format.
fn exposition(metrics: &ClientMetrics) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

/// The value of the one series that starts with `series`.
fn value(metrics: &ClientMetrics, series: &str) -> f64 {
    let text = exposition(metrics);
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(values.len(), 1, "{series} in\n{text}");
    values[0]
}

#[tokio::test]
async fn a_lost_request_is_retried_with_a_fresh_nonce() {
    let (detour, requester, metrics) = pair(Some(psk())).await;
    let asking = ask(&requester);
    let (first, _) = receive(&detour).await;
    assert_eq!(
        (first.op, first.rip, first.rpt),
        (Op::Request, *SERVER.ip(), 443)
    );
    // The first request is lost; the second, after the timeout, gets the answer.
    let started = Instant::now();
    let (second, from) = receive(&detour).await;
    assert!(started.elapsed() >= TIMEOUT / 2, "{:?}", started.elapsed());
    assert_ne!(first.nonce, second.nonce, "a retry has a fresh nonce");
    detour
        .send_to(&psk().sign(&answer(&second, Op::Response, 9000)), from)
        .await
        .unwrap();
    assert_eq!(asking.await.unwrap(), GRANTED);
    // A late answer to the first attempt is no longer awaited.
    detour
        .send_to(&psk().sign(&answer(&first, Op::Response, 9001)), from)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        value(
            &metrics,
            "detour_client_answers_dropped_total{reason=\"unknown_nonce\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&metrics, "detour_client_requests_total{detour=\"127.0.0.1:"),
        1.0
    );
    assert!(exposition(&metrics).contains("result=\"granted\"} 1"));
}

#[tokio::test]
async fn a_silent_detour_is_asked_request_attempts_times_then_given_up() {
    let (detour, requester, metrics) = pair(Some(psk())).await;
    let started = Instant::now();
    let asking = ask(&requester);
    let mut nonces = Vec::new();
    for _ in 0..3 {
        nonces.push(receive(&detour).await.0.nonce);
    }
    assert_eq!(asking.await.unwrap(), MappingResult::NoAnswer);
    assert!(started.elapsed() >= TIMEOUT * 3, "{:?}", started.elapsed());
    nonces.dedup();
    assert_eq!(nonces.len(), 3);
    let mut buf = [0u8; 256];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), detour.recv_from(&mut buf))
            .await
            .is_err(),
        "no fourth attempt"
    );
    assert!(exposition(&metrics).contains("result=\"no_answer\"} 1"));
}

#[tokio::test]
async fn forged_and_off_path_answers_are_dropped_and_the_real_one_taken() {
    let (detour, requester, metrics) = pair(Some(psk())).await;
    let asking = ask(&requester);
    let (request, from) = receive(&detour).await;
    // An off-path attacker who saw the request answers from another socket: the requester's socket
    // is connected to the detour, so the kernel never delivers it.
    let attacker = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    attacker
        .send_to(&psk().sign(&answer(&request, Op::Response, 6000)), from)
        .await
        .unwrap();
    // From the detour's address: signed with another key, answering another remote, and junk.
    let other = Psk::parse(&"77".repeat(16)).unwrap();
    detour
        .send_to(&other.sign(&answer(&request, Op::Response, 6001)), from)
        .await
        .unwrap();
    let mismatch = V2Repr {
        rpt: 444,
        ..answer(&request, Op::Response, 6002)
    };
    detour.send_to(&psk().sign(&mismatch), from).await.unwrap();
    detour.send_to(b"\x02junk", from).await.unwrap();
    detour
        .send_to(&psk().sign(&answer(&request, Op::Response, 9000)), from)
        .await
        .unwrap();
    assert_eq!(asking.await.unwrap(), GRANTED);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for (reason, count) in [("bad_mac", 1.0), ("mismatch", 1.0), ("malformed", 1.0)] {
        assert_eq!(
            value(
                &metrics,
                &format!("detour_client_answers_dropped_total{{reason=\"{reason}\"}}")
            ),
            count,
            "{reason}"
        );
    }
    assert_eq!(
        value(
            &metrics,
            "detour_client_answers_dropped_total{reason=\"unknown_nonce\"}"
        ),
        0.0,
        "the off-path answer never arrived"
    );
}

#[tokio::test]
async fn a_refusal_is_reported_and_a_release_confirmed() {
    let (detour, requester, _) = pair(Some(psk())).await;
    let asking = ask(&requester);
    let (request, from) = receive(&detour).await;
    let refusal = V2Repr {
        status: Status::QuotaExceeded,
        ..answer(&request, Op::Response, 0)
    };
    detour.send_to(&psk().sign(&refusal), from).await.unwrap();
    assert_eq!(
        asking.await.unwrap(),
        MappingResult::Refused(Status::QuotaExceeded)
    );

    let releasing = tokio::spawn({
        let requester = requester.clone();
        async move { requester.release(0, SERVER, 9000).await }
    });
    let (release, from) = receive(&detour).await;
    assert_eq!((release.op, release.dpt), (Op::Release, 9000));
    detour
        .send_to(&psk().sign(&answer(&release, Op::Released, 9000)), from)
        .await
        .unwrap();
    assert!(releasing.await.unwrap());
}

#[tokio::test]
async fn version_1_answers_and_no_release() {
    let (detour, requester, _) = pair(None).await;
    let asking = ask(&requester);
    let mut buf = [0u8; 256];
    let (len, from) = detour.recv_from(&mut buf).await.unwrap();
    let Repr::V1(request) = Repr::parse(&Packet::new_checked(&buf[..len]).unwrap()).unwrap() else {
        panic!("a version 1 request")
    };
    assert_eq!((request.rip, request.rpt), (*SERVER.ip(), 443));
    let response = Repr::V1(V1Repr {
        op: Op::Response,
        dpt: 9000,
        ..request
    });
    detour.send_to(&response.to_bytes(), from).await.unwrap();
    assert_eq!(
        asking.await.unwrap(),
        MappingResult::Granted {
            dpt: 9000,
            lifetime: Duration::MAX
        }
    );
    // Version 1 has no release: the mapping expires at the detour, and nothing is sent.
    assert!(!requester.release(0, SERVER, 9000).await);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), detour.recv_from(&mut buf))
            .await
            .is_err()
    );
}
