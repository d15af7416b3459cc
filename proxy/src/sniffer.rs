//! The embedded sniffer (seed 002 §2): live capture on the configured interfaces through the
//! `mptcp-sniffer` tracker. It exports packets, options and anomalies as metrics and, with
//! `throttle.event_source = "sniffer"`, drives the throttle for traffic the proxy only routes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mptcp_sniffer::capture::live::{LiveCapture, LiveCaptureError, LiveOptions};
use mptcp_sniffer::tracker::{AnomalyKind, Side, SubflowInfo};
use mptcp_sniffer::wire::{MptcpPacket, Segment, TcpOptionIter};
use mptcp_sniffer::{Event, Tracker, TrackerConfig};
use mptcp_throttle::{ConnectionToken, EventSender, SubflowEvent};
use serde::Deserialize;

use crate::metrics::{AnomalyLabel, Metrics, SubtypeLabel};

/// TCP option kind 30.
const MPTCP_OPTION: u8 = 30;

/// `[sniffer]`: where to capture.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnifferConfig {
    /// Interfaces to capture on; default none (the sniffer is off).
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// The "connection has ≥ N active subflows" trigger; default 2, as in seed 002.
    #[serde(default = "SnifferConfig::default_threshold")]
    pub multipath_threshold: usize,
}

impl SnifferConfig {
    fn default_threshold() -> usize {
        2
    }
}

impl Default for SnifferConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            multipath_threshold: Self::default_threshold(),
        }
    }
}

/// A running sniffer; [`SnifferHandle::stop`] ends it.
#[derive(Debug)]
pub struct SnifferHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SnifferHandle {
    /// Stops the capture thread and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SnifferHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Opens the capture (errors surface here) and starts the tracker thread.
pub fn start(
    config: &SnifferConfig,
    metrics: Arc<Metrics>,
    throttle: Option<EventSender>,
) -> Result<SnifferHandle, LiveCaptureError> {
    let capture = LiveCapture::start(&LiveOptions {
        interfaces: config.interfaces.clone(),
        ..LiveOptions::default()
    })?;
    let tracker = Tracker::new(TrackerConfig {
        multipath_threshold: config.multipath_threshold,
        ..TrackerConfig::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("sniffer".into())
            .spawn(move || track(capture, tracker, &metrics, throttle.as_ref(), &stop))
            .map_err(|source| LiveCaptureError::Os {
                call: "spawning the sniffer thread",
                interface: config.interfaces.join(","),
                source,
            })?
    };
    tracing::info!(interfaces = ?config.interfaces, "sniffer capturing");
    Ok(SnifferHandle {
        stop,
        thread: Some(thread),
    })
}

fn track(
    capture: LiveCapture,
    mut tracker: Tracker,
    metrics: &Metrics,
    throttle: Option<&EventSender>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        if let Some(frame) = capture.next_frame(Duration::from_millis(100)) {
            metrics.sniffer_packets.inc();
            if let Ok(Some(segment)) = Segment::parse_ip(&frame.data) {
                for option in TcpOptionIter::new(segment.options).flatten() {
                    if option.kind != MPTCP_OPTION {
                        continue;
                    }
                    if let Ok(subtype) =
                        MptcpPacket::new_checked(option.bytes).and_then(|p| p.subtype())
                    {
                        metrics
                            .sniffer_options
                            .get_or_create(&SubtypeLabel {
                                subtype: subtype.name(),
                            })
                            .inc();
                    }
                }
                tracker.handle_segment(frame.timestamp, &segment);
            }
        }
        tracker.handle_timeout(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        while let Some(event) = tracker.poll_event() {
            if let Event::Anomaly { kind, .. } = &event {
                metrics
                    .sniffer_anomalies
                    .get_or_create(&AnomalyLabel {
                        kind: anomaly_name(kind),
                    })
                    .inc();
            }
            if let (Some(sender), Some(event)) = (throttle, to_throttle_event(&event)) {
                if sender.blocking_send(event).is_err() {
                    return;
                }
            }
        }
    }
}

/// The `kind` label of an anomaly.
pub fn anomaly_name(kind: &AnomalyKind) -> &'static str {
    match kind {
        AnomalyKind::UnknownToken { .. } => "unknown_token",
        AnomalyKind::KeyChange { .. } => "key_change",
        AnomalyKind::DuplicateAddressId { .. } => "duplicate_address_id",
        AnomalyKind::HmacMismatch { .. } => "hmac_mismatch",
        AnomalyKind::MalformedOption => "malformed_option",
    }
}

/// The throttle's view of a tracked subflow: `local` is the side that did not open the connection
/// (the proxy or the server), `remote` the client.
fn subflow_info(subflow: &SubflowInfo) -> mptcp_throttle::SubflowInfo {
    let tuple = subflow.tuple;
    let (local, remote, local_id, remote_id) = match subflow.initiator_side {
        Side::Client => (
            tuple.responder,
            tuple.initiator,
            subflow.responder_address_id,
            subflow.initiator_address_id,
        ),
        Side::Server => (
            tuple.initiator,
            tuple.responder,
            subflow.initiator_address_id,
            subflow.responder_address_id,
        ),
    };
    let mut info = mptcp_throttle::SubflowInfo::new(local, remote);
    info.local_id = local_id;
    info.remote_id = remote_id;
    info.backup = subflow.backup;
    info
}

/// Translates a tracker event into the throttle's event, where the throttle cares.
pub fn to_throttle_event(event: &Event) -> Option<SubflowEvent> {
    Some(match event {
        Event::ConnectionEstablished { token, subflow, .. } => {
            SubflowEvent::ConnectionEstablished {
                token: ConnectionToken(*token),
                subflow: subflow_info(subflow),
            }
        }
        Event::SubflowAdded { token, subflow, .. } => SubflowEvent::SubflowEstablished {
            token: ConnectionToken(*token),
            subflow: subflow_info(subflow),
        },
        Event::SubflowClosed { token, subflow, .. } => SubflowEvent::SubflowClosed {
            token: ConnectionToken(*token),
            subflow: subflow_info(subflow),
        },
        Event::PriorityChanged { token, subflow, .. } => SubflowEvent::PriorityChanged {
            token: ConnectionToken(*token),
            subflow: subflow_info(subflow),
        },
        Event::ConnectionClosed { token, .. } => SubflowEvent::ConnectionClosed {
            token: ConnectionToken(*token),
        },
        Event::AddressAnnounced {
            token,
            side: Side::Client,
            address_id,
            address,
            port,
            ..
        } => SubflowEvent::AddressAnnounced {
            token: ConnectionToken(*token),
            remote_id: *address_id,
            addr: *address,
            port: *port,
        },
        Event::AddressRemoved {
            token,
            side: Side::Client,
            address_id,
            ..
        } => SubflowEvent::AddressRemoved {
            token: ConnectionToken(*token),
            remote_id: *address_id,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mptcp_sniffer::tracker::FourTuple as TrackedTuple;
    use mptcp_throttle::FourTuple;

    #[test]
    fn subflows_are_seen_from_the_proxy() {
        let subflow = SubflowInfo {
            tuple: TrackedTuple {
                initiator: "10.0.2.2:40000".parse().expect("literal"),
                responder: "10.0.1.1:3128".parse().expect("literal"),
            },
            initiator_side: Side::Client,
            initiator_address_id: Some(2),
            responder_address_id: Some(0),
            backup: true,
        };
        let event = to_throttle_event(&Event::SubflowAdded {
            token: 7,
            subflow,
            active_subflows: 2,
        })
        .expect("translated");
        let SubflowEvent::SubflowEstablished { token, subflow } = event else {
            panic!("wrong event {event:?}");
        };
        assert_eq!(token, ConnectionToken(7));
        assert_eq!(
            subflow.tuple,
            FourTuple {
                local: "10.0.1.1:3128".parse().expect("literal"),
                remote: "10.0.2.2:40000".parse().expect("literal"),
            }
        );
        assert_eq!(
            (subflow.local_id, subflow.remote_id, subflow.backup),
            (Some(0), Some(2), true)
        );
        assert!(to_throttle_event(&Event::AddressRemoved {
            token: 7,
            side: Side::Server,
            address_id: 1,
            address: None,
        })
        .is_none());
    }
}
