//! Tracker behaviour on the fixture captures and on a scripted exchange with a simulated clock.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use mptcp_sniffer::crypto::{self, MptcpVersion};
use mptcp_sniffer::tracker::{
    AnomalyKind, ConnectionCloseReason, Event, Side, SubflowCloseReason, Tracker, TrackerConfig,
};
use mptcp_sniffer::wire::mptcp::{
    AddAddrForm, AddAddrRepr, DssRepr, MpCapableRepr, MpJoinRepr, MpPrioRepr, MpTcpRstRepr,
    MptcpRepr, RemoveAddrRepr, SeqNumber,
};
use mptcp_sniffer::wire::{Segment, TcpFlags};

fn events_of(capture: &str) -> Vec<(u64, Event)> {
    common::track(&common::fixture(capture), TrackerConfig::default()).1
}

#[test]
fn invalid_token_is_reported() {
    let events = events_of("dpi-mptcp/mod_tok.pcap");
    assert!(
        events.iter().any(|(frame, e)| *frame == 4
            && matches!(
                e,
                Event::Anomaly {
                    kind: AnomalyKind::UnknownToken { token: 0x0b98f027 },
                    ..
                }
            )),
        "{events:#?}"
    );
    assert!(events
        .iter()
        .any(|(_, e)| matches!(e, Event::ConnectionEstablished { .. })));
}

#[test]
fn key_change_is_reported() {
    let events = events_of("dpi-mptcp/mp_key_change.pcap");
    let changes: Vec<_> = events
        .iter()
        .filter_map(|(frame, e)| match e {
            Event::Anomaly {
                kind: AnomalyKind::KeyChange { expected, seen },
                ..
            } => Some((*frame, *expected, *seen)),
            _ => None,
        })
        .collect();
    assert_eq!(
        changes,
        vec![
            (3, 7198354193151140632, 7198354193151140652),
            (3, 7718901892681671590, 7718901892681671548)
        ]
    );
}

#[test]
fn duplicate_address_id_is_reported() {
    let events = events_of("dpi-mptcp/wrongAdd_Addr.pcap");
    let announced: Vec<_> = events
        .iter()
        .filter(|(_, e)| matches!(e, Event::AddressAnnounced { address_id: 2, .. }))
        .collect();
    assert_eq!(announced.len(), 1, "{events:#?}");
    let previous: IpAddr = "192.168.1.57".parse().unwrap();
    let address: IpAddr = "192.168.1.58".parse().unwrap();
    assert!(
        events.iter().any(|(frame, e)| *frame == 5
            && *e
                == Event::Anomaly {
                    kind: AnomalyKind::DuplicateAddressId {
                        address_id: 2,
                        previous,
                        address
                    },
                    source: match e {
                        Event::Anomaly { source, .. } => *source,
                        _ => unreachable!(),
                    },
                    destination: match e {
                        Event::Anomaly { destination, .. } => *destination,
                        _ => unreachable!(),
                    },
                    token: Some(crypto::token(MptcpVersion::V0, 7718901892681671590)),
                }),
        "{events:#?}"
    );
}

#[test]
fn rejected_mp_capable_is_a_fallback() {
    for capture in ["dpi-mptcp/mp_rejected.pcap", "dpi-mptcp/mp_rejected2.pcap"] {
        let events = events_of(capture);
        let fallbacks: Vec<_> = events
            .iter()
            .filter(|(_, e)| matches!(e, Event::Fallback { .. }))
            .collect();
        assert_eq!(fallbacks.len(), 1, "{capture}: {events:#?}");
        let Event::Fallback { tuple } = &fallbacks[0].1 else {
            unreachable!()
        };
        assert_eq!(tuple.responder.port(), 80);
        assert!(!events
            .iter()
            .any(|(_, e)| matches!(e, Event::ConnectionEstablished { .. })));
    }
}

#[test]
fn connection_life_cycle_with_data_fin_and_fin() {
    let events = events_of("ptcpdump/mptcp.pcap");
    let kinds: Vec<&Event> = events.iter().map(|(_, e)| e).collect();
    let token = crypto::token(MptcpVersion::V1, 0xe356a8f252e41976);
    assert!(
        matches!(kinds[0], Event::ConnectionEstablished { token: t, version: MptcpVersion::V1, .. } if *t == token)
    );
    assert!(matches!(
        kinds[1],
        Event::SubflowAdded {
            active_subflows: 1,
            ..
        }
    ));
    assert!(matches!(
        kinds[2],
        Event::SubflowClosed {
            reason: SubflowCloseReason::Fin,
            active_subflows: 0,
            ..
        }
    ));
    assert_eq!(
        *kinds[3],
        Event::ConnectionClosed {
            token,
            reason: ConnectionCloseReason::LastSubflowClosed
        }
    );
    assert_eq!(kinds.len(), 4, "{kinds:#?}");
    assert!(kinds.iter().all(|event| event.token() == Some(token)));
}

#[test]
fn fastclose_closes_the_connection() {
    let events = events_of("tcpdump/mptcp-fclose.pcap");
    assert!(
        events.iter().any(|(frame, e)| *frame == 10
            && matches!(
                e,
                Event::ConnectionClosed {
                    reason: ConnectionCloseReason::FastClose,
                    ..
                }
            )),
        "{events:#?}"
    );
    assert!(events.iter().any(|(_, e)| matches!(
        e,
        Event::SubflowClosed {
            reason: SubflowCloseReason::FastClose,
            ..
        }
    )));
}

#[test]
fn multipath_trigger_in_real_capture() {
    let events = events_of("pymptcpanalyzer/iperf-mptcp-0-0.pcap");
    let triggers: Vec<_> = events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::MultipathThresholdReached {
                active_subflows,
                subflows,
                threshold,
                ..
            } => Some((*active_subflows, subflows.len(), *threshold)),
            _ => None,
        })
        .collect();
    assert!(!triggers.is_empty(), "{events:#?}");
    assert_eq!(triggers[0], (2, 2, 2));
    // The join subflow uses different addresses from the initial one.
    let added: Vec<_> = events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::SubflowAdded { subflow, .. } => Some(*subflow),
            _ => None,
        })
        .collect();
    assert!(added.len() >= 2);
    assert_ne!(added[0].tuple, added[1].tuple);
    assert_eq!(added[1].initiator_side, Side::Client);
}

#[test]
fn threshold_is_configurable() {
    let config = TrackerConfig {
        multipath_threshold: 3,
        ..TrackerConfig::default()
    };
    let (_, events) = common::track(
        &common::fixture("pymptcpanalyzer/iperf-mptcp-0-0.pcap"),
        config,
    );
    let active_max = events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::SubflowAdded {
                active_subflows, ..
            } => Some(*active_subflows),
            _ => None,
        })
        .max()
        .unwrap();
    let triggered = events
        .iter()
        .any(|(_, e)| matches!(e, Event::MultipathThresholdReached { .. }));
    assert_eq!(triggered, active_max >= 3);
}

#[test]
fn unknown_token_flood_stays_bounded() {
    let config = TrackerConfig {
        max_unknown_joins: 100,
        max_queued_events: 50,
        ..TrackerConfig::default()
    };
    let (mut tracker, _) = common::track(
        &common::fixture("dpi-mptcp/flood_first1000.pcap"),
        TrackerConfig::default(),
    );
    assert_eq!(tracker.subflow_count(), 0);
    assert_eq!(tracker.connection_count(), 0);
    let default_remembered = tracker.unknown_join_count();
    assert!(default_remembered <= TrackerConfig::default().max_unknown_joins);
    while tracker.poll_event().is_some() {}

    // Feed the flood without draining events: every table and the queue stay bounded.
    let data = std::fs::read(common::fixture("dpi-mptcp/flood_first1000.pcap")).unwrap();
    let mut file = mptcp_sniffer::capture::CaptureFile::parse(&data).unwrap();
    let mut tracker = Tracker::new(config);
    let mut frames = 0;
    while let Some(frame) = file.next_frame().unwrap() {
        frames += 1;
        let segment = mptcp_sniffer::capture::decode_frame(frame.link, frame.data)
            .unwrap()
            .unwrap();
        tracker.handle_segment(frame.timestamp, &segment);
        assert!(tracker.unknown_join_count() <= 100);
    }
    assert_eq!(frames, 1000);
    let stats = tracker.stats();
    assert_eq!(tracker.unknown_join_count(), 100);
    // Evicted tokens that come back are remembered (and reported) again.
    assert!(stats.evicted_unknown_joins as usize >= default_remembered - 100);
    let reported = stats.evicted_unknown_joins as usize + 100;
    let mut queued = 0;
    while let Some(event) = tracker.poll_event() {
        assert!(matches!(
            event,
            Event::Anomaly {
                kind: AnomalyKind::UnknownToken { token: 3605989911 },
                ..
            }
        ));
        queued += 1;
    }
    assert_eq!(queued, 50);
    assert_eq!(stats.dropped_events as usize, reported - 50);
}

#[test]
fn known_token_flood_evicts_handshakes_not_established_subflows() {
    // mp_capable.pcapng establishes the connection whose token the flood's joins carry.
    let config = TrackerConfig {
        max_subflows: 64,
        ..TrackerConfig::default()
    };
    let mut tracker = Tracker::new(config);
    let mut active_before_flood = None;
    for capture in [
        "dpi-mptcp/mp_capable.pcapng",
        "dpi-mptcp/flood_first1000.pcap",
    ] {
        if active_before_flood.is_none() && capture.contains("flood") {
            active_before_flood = tracker.active_subflows(3605989911);
        }
        let data = std::fs::read(common::fixture(capture)).unwrap();
        let mut file = mptcp_sniffer::capture::CaptureFile::parse(&data).unwrap();
        while let Some(frame) = file.next_frame().unwrap() {
            if let Ok(Some(segment)) = mptcp_sniffer::capture::decode_frame(frame.link, frame.data)
            {
                tracker.handle_segment(frame.timestamp, &segment);
            }
            assert!(tracker.subflow_count() <= 64);
        }
    }
    assert!(
        tracker.stats().evicted_handshakes >= 900,
        "{:?}",
        tracker.stats()
    );
    assert!(active_before_flood.is_some_and(|active| active >= 1));
    assert_eq!(
        tracker.active_subflows(3605989911),
        active_before_flood,
        "established subflows were evicted"
    );
}

// ---- Scripted exchange with a simulated clock -------------------------------------------

struct Host {
    address: Ipv4Addr,
    port: u16,
}

fn segment_bytes(from: &Host, to: &Host, flags: u8, options: &[MptcpRepr]) -> Vec<u8> {
    let mut tcp_options = Vec::new();
    for option in options {
        tcp_options.extend_from_slice(&option.to_bytes());
    }
    while tcp_options.len() % 4 != 0 {
        tcp_options.push(1);
    }
    let tcp_len = 20 + tcp_options.len();
    let mut packet = vec![0u8; 20 + tcp_len];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    packet[9] = 6;
    packet[12..16].copy_from_slice(&from.address.octets());
    packet[16..20].copy_from_slice(&to.address.octets());
    packet[20..22].copy_from_slice(&from.port.to_be_bytes());
    packet[22..24].copy_from_slice(&to.port.to_be_bytes());
    packet[32] = ((tcp_len / 4) as u8) << 4;
    packet[33] = flags;
    packet[40..].copy_from_slice(&tcp_options);
    packet
}

struct Script {
    tracker: Tracker,
    now: Duration,
}

impl Script {
    fn send(&mut self, from: &Host, to: &Host, flags: u8, options: &[MptcpRepr]) -> Vec<Event> {
        self.now += Duration::from_millis(10);
        let bytes = segment_bytes(from, to, flags, options);
        let segment = Segment::parse_ip(&bytes).unwrap().unwrap();
        self.tracker.handle_segment(self.now, &segment);
        std::iter::from_fn(|| self.tracker.poll_event()).collect()
    }
}

const SYN: u8 = TcpFlags::SYN;
const ACK: u8 = TcpFlags::ACK;
const FIN: u8 = TcpFlags::FIN; // used by fin_from_both_sides_closes_a_subflow
const RST: u8 = TcpFlags::RST;

fn capable(sender_key: Option<u64>, receiver_key: Option<u64>) -> MptcpRepr {
    MptcpRepr::MpCapable(MpCapableRepr {
        version: 1,
        flags: 0x01,
        sender_key,
        receiver_key,
        data_len: None,
        checksum: None,
    })
}

fn dss() -> MptcpRepr {
    MptcpRepr::Dss(DssRepr {
        data_fin: false,
        data_ack: Some(SeqNumber::Bits32(1)),
        mapping: None,
    })
}

#[test]
fn scripted_two_path_connection_with_simulated_clock() {
    let client_key = 0x0102_0304_0506_0708;
    let server_key = 0x1112_1314_1516_1718;
    let client_token = crypto::token(MptcpVersion::V1, client_key);
    let token = crypto::token(MptcpVersion::V1, server_key);
    let client1 = Host {
        address: Ipv4Addr::new(10, 0, 1, 2),
        port: 40000,
    };
    let client2 = Host {
        address: Ipv4Addr::new(10, 0, 2, 2),
        port: 40001,
    };
    let server1 = Host {
        address: Ipv4Addr::new(10, 0, 1, 1),
        port: 80,
    };
    let server2 = Host {
        address: Ipv4Addr::new(10, 0, 2, 1),
        port: 80,
    };
    let config = TrackerConfig {
        idle_timeout: Duration::from_secs(30),
        ..TrackerConfig::default()
    };
    let mut script = Script {
        tracker: Tracker::new(config),
        now: Duration::from_secs(1_000),
    };

    assert!(script
        .send(&client1, &server1, SYN, &[capable(None, None)])
        .is_empty());
    assert!(script
        .send(
            &server1,
            &client1,
            SYN | ACK,
            &[capable(Some(server_key), None)]
        )
        .is_empty());
    let events = script.send(
        &client1,
        &server1,
        ACK,
        &[capable(Some(client_key), Some(server_key))],
    );
    assert_eq!(events.len(), 2, "{events:#?}");
    let Event::ConnectionEstablished {
        token: t,
        client_token: ct,
        subflow,
        ..
    } = &events[0]
    else {
        panic!("{events:#?}")
    };
    assert_eq!((*t, *ct), (token, client_token));
    assert_eq!(
        subflow.tuple.initiator,
        SocketAddr::new(client1.address.into(), 40000)
    );
    assert_eq!(subflow.initiator_side, Side::Client);
    assert_eq!(
        script
            .tracker
            .connection_token(subflow.tuple.initiator, subflow.tuple.responder),
        Some(token)
    );

    // The server announces its second address (v1 HMAC, RFC rightmost 64 bits).
    let address = IpAddr::V4(server2.address);
    let mut message = vec![1];
    message.extend_from_slice(&server2.address.octets());
    message.extend_from_slice(&[0, 0]);
    let hmac =
        crypto::hmac_keys(MptcpVersion::V1, server_key, client_key, &message).rightmost_u64();
    let add = |hmac| {
        MptcpRepr::AddAddr(AddAddrRepr {
            address_id: 1,
            address,
            port: None,
            form: AddAddrForm::V1 {
                echo: false,
                hmac: Some(hmac),
            },
        })
    };
    let events = script.send(&server1, &client1, ACK, &[add(hmac), dss()]);
    assert!(
        matches!(
            &events[..],
            [Event::AddressAnnounced {
                side: Side::Server,
                address_id: 1,
                ..
            }]
        ),
        "{events:#?}"
    );
    // A retransmission is not reported again; a bad HMAC is.
    assert!(script
        .send(&server1, &client1, ACK, &[add(hmac)])
        .is_empty());
    let events = script.send(&server1, &client1, ACK, &[add(hmac ^ 1)]);
    assert!(
        matches!(
            &events[..],
            [Event::Anomaly {
                kind: AnomalyKind::HmacMismatch { option: "add_addr" },
                ..
            }]
        ),
        "{events:#?}"
    );

    // The client joins from its second address to the announced one, as backup.
    let (nonce_a, nonce_b) = (0xaaaa_0001, 0xbbbb_0002);
    let join_syn = MptcpRepr::MpJoin(MpJoinRepr::Syn {
        backup: true,
        address_id: 2,
        token,
        nonce: nonce_a,
    });
    assert!(script.send(&client2, &server2, SYN, &[join_syn]).is_empty());
    let synack_hmac =
        crypto::join_synack_hmac(MptcpVersion::V1, server_key, client_key, nonce_b, nonce_a);
    let join_synack = MptcpRepr::MpJoin(MpJoinRepr::SynAck {
        backup: false,
        address_id: 1,
        hmac: synack_hmac,
        nonce: nonce_b,
    });
    assert!(script
        .send(&server2, &client2, SYN | ACK, &[join_synack])
        .is_empty());
    let ack_hmac =
        crypto::join_ack_hmac(MptcpVersion::V1, client_key, server_key, nonce_a, nonce_b);
    let events = script.send(
        &client2,
        &server2,
        ACK,
        &[MptcpRepr::MpJoin(MpJoinRepr::Ack { hmac: ack_hmac })],
    );
    assert_eq!(events.len(), 2, "{events:#?}");
    let Event::SubflowAdded {
        token: t,
        subflow,
        active_subflows: 2,
    } = &events[0]
    else {
        panic!("{events:#?}")
    };
    assert_eq!(*t, token);
    assert!(subflow.backup);
    assert_eq!(
        (subflow.initiator_address_id, subflow.responder_address_id),
        (Some(2), Some(1))
    );
    let Event::MultipathThresholdReached {
        active_subflows: 2,
        threshold: 2,
        subflows,
        ..
    } = &events[1]
    else {
        panic!("{events:#?}")
    };
    assert_eq!(subflows.len(), 2);
    assert_eq!(script.tracker.active_subflows(token), Some(2));
    assert_eq!(script.tracker.subflows(token).len(), 2);
    assert!(script.tracker.subflows(token ^ 0xffff).is_empty());

    // MP_PRIO on the second subflow clears the backup flag.
    let prio = MptcpRepr::MpPrio(MpPrioRepr {
        backup: false,
        address_id: None,
    });
    let events = script.send(&client2, &server2, ACK, &[prio]);
    let [Event::PriorityChanged {
        subflow,
        side: Side::Client,
        ..
    }] = &events[..]
    else {
        panic!("{events:#?}")
    };
    assert!(!subflow.backup);
    assert_eq!(subflow.tuple.initiator.port(), 40001);

    // The server withdraws address id 1, then resets the second subflow with MP_TCPRST.
    let remove = MptcpRepr::RemoveAddr(RemoveAddrRepr::new(&[1]).unwrap());
    let events = script.send(&server1, &client1, ACK, &[remove]);
    assert_eq!(
        events,
        vec![Event::AddressRemoved {
            token,
            side: Side::Server,
            address_id: 1,
            address: Some(address)
        }]
    );
    let rst = MptcpRepr::MpTcpRst(MpTcpRstRepr {
        flags: 1,
        reason: 2,
    });
    let events = script.send(&server2, &client2, RST | ACK, &[rst]);
    let [Event::SubflowClosed {
        reason,
        active_subflows: 1,
        ..
    }] = &events[..]
    else {
        panic!("{events:#?}")
    };
    assert_eq!(
        *reason,
        SubflowCloseReason::TcpRst {
            reason: 2,
            transient: true
        }
    );

    // An MP_JOIN with an unknown token, and a bad SYN-ACK HMAC on a new join.
    let events = script.send(
        &Host {
            address: Ipv4Addr::new(10, 9, 9, 9),
            port: 1,
        },
        &server1,
        SYN,
        &[MptcpRepr::MpJoin(MpJoinRepr::Syn {
            backup: false,
            address_id: 3,
            token: token ^ 1,
            nonce: 5,
        })],
    );
    assert!(matches!(
        &events[..],
        [Event::Anomaly {
            kind: AnomalyKind::UnknownToken { .. },
            token: None,
            ..
        }]
    ));
    let client3 = Host {
        address: Ipv4Addr::new(10, 0, 2, 2),
        port: 40002,
    };
    script.send(&client3, &server2, SYN, &[join_syn]);
    let bad = MptcpRepr::MpJoin(MpJoinRepr::SynAck {
        backup: false,
        address_id: 1,
        hmac: synack_hmac ^ 1,
        nonce: nonce_b,
    });
    let events = script.send(&server2, &client3, SYN | ACK, &[bad]);
    assert!(matches!(
        &events[..],
        [Event::Anomaly {
            kind: AnomalyKind::HmacMismatch {
                option: "mp_join_syn_ack"
            },
            ..
        }]
    ));

    // Silence: the simulated clock passes the idle timeout; the handshake expires silently and
    // the initial subflow times out, closing the connection.
    script.now += Duration::from_secs(31);
    script.tracker.handle_timeout(script.now);
    let events: Vec<Event> = std::iter::from_fn(|| script.tracker.poll_event()).collect();
    assert!(
        matches!(
            events[0],
            Event::SubflowClosed {
                reason: SubflowCloseReason::IdleTimeout,
                active_subflows: 0,
                ..
            }
        ),
        "{events:#?}"
    );
    assert_eq!(
        events[1],
        Event::ConnectionClosed {
            token,
            reason: ConnectionCloseReason::LastSubflowClosed
        }
    );
    assert_eq!(events.len(), 2);
    assert_eq!(script.tracker.subflow_count(), 0);
    assert_eq!(script.tracker.connection_count(), 0);
}

#[test]
fn fin_from_both_sides_closes_a_subflow() {
    let client = Host {
        address: Ipv4Addr::new(192, 0, 2, 1),
        port: 5000,
    };
    let server = Host {
        address: Ipv4Addr::new(192, 0, 2, 2),
        port: 443,
    };
    let mut script = Script {
        tracker: Tracker::default(),
        now: Duration::ZERO,
    };
    script.send(&client, &server, SYN, &[capable(None, None)]);
    script.send(&server, &client, SYN | ACK, &[capable(Some(7), None)]);
    assert_eq!(
        script
            .send(&client, &server, ACK, &[capable(Some(8), Some(7))])
            .len(),
        2
    );
    assert!(
        script
            .send(&client, &server, FIN | ACK, &[dss()])
            .is_empty(),
        "half-closed is still open"
    );
    let events = script.send(&server, &client, FIN | ACK, &[dss()]);
    assert!(matches!(
        events[0],
        Event::SubflowClosed {
            reason: SubflowCloseReason::Fin,
            ..
        }
    ));
    assert!(matches!(events[1], Event::ConnectionClosed { .. }));
}

/// A capture made by Linux 6.18 in the testbed (`tests/fixtures/testbed/kcap.sh`): IPv4 and
/// IPv6 connections with MP_JOIN subflows, ADD_ADDR / MP_PRIO / REMOVE_ADDR from `ip mptcp
/// endpoint` commands, FIN closes, then a connection closed by MP_FASTCLOSE + MP_TCPRST.
#[test]
fn kernel_made_capture() {
    let events = events_of("testbed/linux-6.18-sll2.pcap");
    let count =
        |predicate: &dyn Fn(&Event) -> bool| events.iter().filter(|(_, e)| predicate(e)).count();
    assert_eq!(
        count(&|e| matches!(e, Event::ConnectionEstablished { .. })),
        3,
        "{events:#?}"
    );
    assert_eq!(
        count(&|e| matches!(
            e,
            Event::MultipathThresholdReached {
                active_subflows: 2,
                ..
            }
        )),
        3
    );
    assert_eq!(
        count(&|e| matches!(
            e,
            Event::AddressAnnounced {
                side: Side::Server,
                address_id: 5,
                ..
            }
        )),
        2
    );
    assert_eq!(
        count(&|e| matches!(
            e,
            Event::AddressRemoved {
                side: Side::Server,
                address_id: 5,
                address: Some(_),
                ..
            }
        )),
        2
    );
    let priorities: Vec<bool> = events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::PriorityChanged {
                side: Side::Client,
                subflow,
                ..
            } => Some(subflow.backup),
            _ => None,
        })
        .collect();
    assert_eq!(priorities, vec![true, false]);
    assert_eq!(
        count(&|e| matches!(
            e,
            Event::SubflowClosed {
                reason: SubflowCloseReason::Fin,
                ..
            }
        )),
        4
    );
    assert_eq!(
        count(&|e| matches!(
            e,
            Event::ConnectionClosed {
                reason: ConnectionCloseReason::FastClose,
                ..
            }
        )),
        1
    );
    assert_eq!(count(&|e| matches!(e, Event::ConnectionClosed { .. })), 3);
    assert_eq!(
        count(&|e| matches!(e, Event::Anomaly { .. })),
        0,
        "{events:#?}"
    );
}

/// The JSON `connection` field carries the server's token once the handshake is seen.
#[test]
fn json_connection_field() {
    let frames = common::json_records(&common::fixture("tcpdump/mptcp-v0.pcap"));
    let token = u64::from(crypto::token(MptcpVersion::V0, 10843866842831127890));
    assert!(
        frames[&1][0].get("connection").is_none(),
        "unknown before the handshake completes"
    );
    assert_eq!(frames[&3][0]["connection"].as_u64(), Some(token));
    // The MP_JOIN SYN of frame 8 belongs to the same connection.
    assert_eq!(frames[&8][0]["subtype"], "mp_join");
    assert_eq!(frames[&8][0]["connection"].as_u64(), Some(token));
    // The last ACK after both FINs still belongs to its (closed) connection.
    let frames = common::json_records(&common::fixture("ptcpdump/mptcp.pcap"));
    let token = u64::from(crypto::token(MptcpVersion::V1, 0xe356a8f252e41976));
    assert_eq!(frames[&14][0]["connection"].as_u64(), Some(token));
}

#[test]
fn missing_syn_ack_still_establishes() {
    let client = Host {
        address: Ipv4Addr::new(192, 0, 2, 1),
        port: 5000,
    };
    let server = Host {
        address: Ipv4Addr::new(192, 0, 2, 2),
        port: 443,
    };
    let mut script = Script {
        tracker: Tracker::default(),
        now: Duration::ZERO,
    };
    script.send(&client, &server, SYN, &[capable(None, None)]);
    let events = script.send(&client, &server, ACK, &[capable(Some(8), Some(7))]);
    let token = crypto::token(MptcpVersion::V1, 7);
    assert!(
        matches!(events[0], Event::ConnectionEstablished { token: t, .. } if t == token),
        "{events:#?}"
    );
}

/// Live capture reads each interface in its own thread, so a join SYN captured on one interface can
/// reach the tracker before the handshake packets captured on another. Replays a real kernel capture
/// with the first MP_JOIN SYN moved before the MP_CAPABLE third ACK (the token is then known from
/// the SYN-ACK: no anomaly), and before the SYN-ACK (nothing names the token yet: an anomaly, but the
/// subflow still attaches once the connection is established).
#[test]
fn join_seen_before_the_handshake_still_attaches() {
    use mptcp_sniffer::capture::{self, CaptureFile};
    use mptcp_sniffer::wire::{MptcpPacket, Subtype, TcpOptionIter};

    let data = std::fs::read(common::fixture("testbed/linux-6.18-sll2.pcap")).unwrap();
    let mut file = CaptureFile::parse(&data).unwrap();
    let mut frames = Vec::new();
    while let Some(frame) = file.next_frame().unwrap() {
        frames.push((frame.link, frame.timestamp, frame.data.to_vec()));
    }
    // (SYN, ACK flags, MPTCP subtypes) of a frame.
    let describe = |link, bytes: &[u8]| -> (bool, bool, Vec<Subtype>) {
        let Ok(Some(segment)) = capture::decode_frame(link, bytes) else {
            return (false, false, Vec::new());
        };
        let subtypes = TcpOptionIter::new(segment.options)
            .flatten()
            .filter(|o| o.kind == 30)
            .filter_map(|o| MptcpPacket::new_checked(o.bytes).ok()?.subtype().ok())
            .collect();
        (segment.flags.syn(), segment.flags.ack(), subtypes)
    };
    let join = frames
        .iter()
        .position(|(link, _, d)| {
            let (syn, _, s) = describe(*link, d);
            syn && s.contains(&Subtype::MpJoin)
        })
        .expect("an MP_JOIN SYN");
    let syn_ack = frames[..join]
        .iter()
        .position(|(link, _, d)| {
            let (syn, ack, s) = describe(*link, d);
            syn && ack && s.contains(&Subtype::MpCapable)
        })
        .expect("an MP_CAPABLE SYN-ACK before the join");
    let third_ack = frames[..join]
        .iter()
        .position(|(link, _, d)| {
            let (syn, _, s) = describe(*link, d);
            !syn && s.contains(&Subtype::MpCapable)
        })
        .expect("an MP_CAPABLE third ACK before the join");

    for (before, anomaly_expected) in [(third_ack, false), (syn_ack, true)] {
        let mut reordered = frames.clone();
        let moved = reordered.remove(join);
        reordered.insert(before, moved);
        let mut tracker = Tracker::new(TrackerConfig::default());
        let mut events = Vec::new();
        for (link, timestamp, bytes) in &reordered {
            if let Ok(Some(segment)) = capture::decode_frame(*link, bytes) {
                tracker.handle_segment(*timestamp, &segment);
            }
            while let Some(event) = tracker.poll_event() {
                events.push(event);
            }
        }
        let anomaly = events.iter().any(|e| {
            matches!(
                e,
                Event::Anomaly {
                    kind: AnomalyKind::UnknownToken { .. },
                    ..
                }
            )
        });
        assert_eq!(
            anomaly, anomaly_expected,
            "join before frame {before}: {events:#?}"
        );
        assert!(
            events.iter().any(|e| matches!(
                e,
                Event::SubflowAdded {
                    active_subflows: 2,
                    ..
                }
            )),
            "join before frame {before}: {events:#?}"
        );
    }
}
