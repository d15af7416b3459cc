//! MPIP metrics: sessions, peers, and per path its state, delay, weight and
//! traffic. Registered under the `mpip_` prefix in the same registry as the
//! HTTP proxy's (`mptcp_proxy::metrics::Metrics::with_extension`).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::node::{NodeCounters, PathSnapshot};
use crate::path_manager::PathState;

/// Labels of one path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PathLabels {
    /// Peer node ID.
    pub peer: String,
    /// This node's path ID.
    pub path: String,
    /// Local interface.
    pub interface: String,
    /// Remote UDP endpoint.
    pub remote: String,
}

/// Labels of per-path traffic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PathTrafficLabels {
    /// Peer node ID.
    pub peer: String,
    /// This node's path ID.
    pub path: String,
    /// Local interface.
    pub interface: String,
    /// Remote UDP endpoint.
    pub remote: String,
    /// `tx` (sent) or `rx` (received).
    pub direction: &'static str,
}

/// Why a packet was dropped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The reason.
    pub reason: &'static str,
}

/// Every MPIP metric.
#[derive(Debug, Default)]
pub struct MpipMetrics {
    sessions: Gauge,
    peers: Gauge,
    path_active: Family<PathLabels, Gauge>,
    path_delay: Family<PathLabels, Gauge<f64, AtomicU64>>,
    path_queueing_delay: Family<PathLabels, Gauge<f64, AtomicU64>>,
    path_weight: Family<PathLabels, Gauge<f64, AtomicU64>>,
    path_bytes: Family<PathTrafficLabels, Counter>,
    path_packets: Family<PathTrafficLabels, Counter>,
    dropped: Family<ReasonLabel, Counter>,
    protected_copies: Counter,
    mss_clamped: Counter,
    compressed: Counter,
    handovers: Counter,
    /// Last values seen per shard, to turn each node's totals into counter
    /// increments and sum the gauges.
    seen: std::sync::Mutex<Vec<Seen>>,
}

#[derive(Debug, Default)]
struct Seen {
    traffic: HashMap<PathTrafficLabels, (u64, u64)>,
    counters: NodeCounters,
    paths: Vec<PathLabels>,
    sessions: usize,
    peers: usize,
}

impl MpipMetrics {
    /// Registers every metric under `mpip_` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("mpip");
        r.register(
            "sessions",
            "MPIP sessions (Table II entries)",
            self.sessions.clone(),
        );
        r.register("peers", "Peer nodes with paths", self.peers.clone());
        r.register(
            "path_active",
            "1 while the path carries traffic, 0 while it is discovered or dead",
            self.path_active.clone(),
        );
        r.register_with_unit(
            "path_delay",
            "Real-time one-way path delay D, including the unknown clock offset between the nodes",
            Unit::Seconds,
            self.path_delay.clone(),
        );
        r.register_with_unit(
            "path_queueing_delay",
            "Queueing delay Q = D - Dmin of the path",
            Unit::Seconds,
            self.path_queueing_delay.clone(),
        );
        r.register(
            "path_weight",
            "Algorithm 1 weight of the path (1..1000), mean over its sessions",
            self.path_weight.clone(),
        );
        r.register_with_unit(
            "path",
            "UDP payload bytes (CM block included) per path and direction",
            Unit::Bytes,
            self.path_bytes.clone(),
        );
        r.register(
            "path_datagrams",
            "Datagrams per path and direction",
            self.path_packets.clone(),
        );
        r.register(
            "dropped_packets",
            "Packets dropped, by reason",
            self.dropped.clone(),
        );
        r.register(
            "protected_packets",
            "Packets sent as protected-path copies",
            self.protected_copies.clone(),
        );
        r.register(
            "compressed_packets",
            "Data packets sent with the inner IPv4 header left out",
            self.compressed.clone(),
        );
        r.register(
            "shard_handovers",
            "Packets a shard received for another and handed over (0 while the steering programs work)",
            self.handovers.clone(),
        );
        r.register(
            "mss_clamped",
            "TCP SYNs whose MSS was lowered to fit the encapsulation",
            self.mss_clamped.clone(),
        );
    }

    /// Counts a packet one shard handed to another.
    pub fn note_handover(&self) {
        self.handovers.inc();
    }

    /// Refreshes everything from the state of the node of shard `shard`
    /// (0 when not sharded; the shards' nodes serve disjoint peers, and the
    /// gauges are their sums).
    pub fn update(
        &self,
        shard: usize,
        sessions: usize,
        peers: usize,
        paths: &[PathSnapshot],
        counters: NodeCounters,
    ) {
        let mut all = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if all.len() <= shard {
            all.resize_with(shard + 1, Seen::default);
        }
        all[shard].sessions = sessions;
        all[shard].peers = peers;
        let total = |f: fn(&Seen) -> usize| all.iter().map(f).sum::<usize>();
        self.sessions
            .set(i64::try_from(total(|s| s.sessions)).unwrap_or(i64::MAX));
        self.peers
            .set(i64::try_from(total(|s| s.peers)).unwrap_or(i64::MAX));
        let seen = &mut all[shard];
        let mut current = Vec::with_capacity(paths.len());
        for path in paths {
            let labels = PathLabels {
                peer: path.node.to_string(),
                path: path.path.0.to_string(),
                interface: path.interface.clone(),
                remote: path.remote.to_string(),
            };
            self.path_active
                .get_or_create(&labels)
                .set(i64::from(path.state == PathState::Active));
            if let Some(delay) = path.delay.realtime {
                self.path_delay
                    .get_or_create(&labels)
                    .set(delay as f64 / 1e6);
                self.path_queueing_delay
                    .get_or_create(&labels)
                    .set(path.delay.queueing as f64 / 1e6);
            }
            if let Some(weight) = path.weight {
                self.path_weight.get_or_create(&labels).set(weight);
            }
            for (direction, bytes, packets) in [
                ("tx", path.counters.tx_bytes, path.counters.tx_packets),
                ("rx", path.counters.rx_bytes, path.counters.rx_packets),
            ] {
                let traffic = PathTrafficLabels {
                    peer: labels.peer.clone(),
                    path: labels.path.clone(),
                    interface: labels.interface.clone(),
                    remote: labels.remote.clone(),
                    direction,
                };
                let (last_bytes, last_packets) =
                    seen.traffic.get(&traffic).copied().unwrap_or_default();
                // A path ID reused after removal starts again from zero.
                let delta = |now: u64, last: u64| if now >= last { now - last } else { now };
                self.path_bytes
                    .get_or_create(&traffic)
                    .inc_by(delta(bytes, last_bytes));
                self.path_packets
                    .get_or_create(&traffic)
                    .inc_by(delta(packets, last_packets));
                seen.traffic.insert(traffic, (bytes, packets));
            }
            current.push(labels);
        }
        for gone in seen.paths.iter().filter(|l| !current.contains(l)) {
            self.path_active.remove(gone);
            self.path_delay.remove(gone);
            self.path_queueing_delay.remove(gone);
            self.path_weight.remove(gone);
        }
        seen.paths = current;

        let last = seen.counters;
        let drops = [
            (
                "malformed_datagram",
                counters.malformed_datagrams,
                last.malformed_datagrams,
            ),
            (
                "malformed_packet",
                counters.malformed_packets,
                last.malformed_packets,
            ),
            ("no_route", counters.no_route, last.no_route),
            ("no_path", counters.no_path, last.no_path),
            ("duplicate", counters.duplicates, last.duplicates),
            ("spoofed", counters.spoofed, last.spoofed),
            ("send_failed", counters.send_failed, last.send_failed),
            (
                "unknown_session",
                counters.unknown_session,
                last.unknown_session,
            ),
            (
                "endpoint_conflict",
                counters.endpoint_conflict,
                last.endpoint_conflict,
            ),
            (
                "unauthenticated",
                counters.unauthenticated,
                last.unauthenticated,
            ),
            ("bad_mac", counters.bad_mac, last.bad_mac),
            ("unknown_key", counters.unknown_key, last.unknown_key),
            ("replayed", counters.replayed, last.replayed),
            ("unverified", counters.unverified, last.unverified),
            ("rate_limited", counters.rate_limited, last.rate_limited),
            ("unsolicited", counters.unsolicited, last.unsolicited),
        ];
        for (reason, now, before) in drops {
            self.dropped
                .get_or_create(&ReasonLabel { reason })
                .inc_by(now.saturating_sub(before));
        }
        self.protected_copies.inc_by(
            counters
                .protected_copies
                .saturating_sub(last.protected_copies),
        );
        self.mss_clamped
            .inc_by(counters.mss_clamped.saturating_sub(last.mss_clamped));
        self.compressed
            .inc_by(counters.compressed.saturating_sub(last.compressed));
        seen.counters = counters;
    }
}
