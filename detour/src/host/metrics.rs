//! `mptcp-detourd` metrics, under the `detour_` prefix in the registry of `mptcp_proxy::metrics` (which
//! adds the process metrics and serves `/metrics` through `mptcp_proxy::admin`).

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::core::{Core, Outcome};

/// The `result` label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabel {
    /// [`Outcome::name`].
    pub result: &'static str,
}

/// Every detour host metric.
#[derive(Debug, Default)]
pub struct HostMetrics {
    requests: Family<ResultLabel, Counter>,
    mappings: Gauge,
    clients: Gauge,
    expired: Counter,
    bytes: Counter,
    packets: Counter,
    seen: Mutex<(u64, u64, u64)>,
}

impl HostMetrics {
    /// Registers every metric under `detour_` (each request result starts at 0).
    pub fn register(&self, registry: &mut Registry) {
        for outcome in Outcome::ALL {
            let _ = self.requests.get_or_create(&ResultLabel {
                result: outcome.name(),
            });
        }
        let registry = registry.sub_registry_with_prefix("detour");
        registry.register(
            "requests",
            "NAT detour datagrams by result (created, reused, released, and why others were refused or dropped)",
            self.requests.clone(),
        );
        registry.register("mappings", "Mappings installed", self.mappings.clone());
        registry.register(
            "clients",
            "Clients holding at least one mapping",
            self.clients.clone(),
        );
        registry.register(
            "mappings_expired",
            "Mappings removed after idle_timeout without traffic or requests",
            self.expired.clone(),
        );
        registry.register_with_unit(
            "traffic",
            "Bytes through the detour (both directions, from the per-mapping nft counters)",
            Unit::Bytes,
            self.bytes.clone(),
        );
        registry.register(
            "traffic_packets",
            "Packets through the detour (both directions, from the per-mapping nft counters)",
            self.packets.clone(),
        );
    }

    /// Counts one datagram.
    pub fn count(&self, outcome: Outcome) {
        self.requests
            .get_or_create(&ResultLabel {
                result: outcome.name(),
            })
            .inc();
    }

    /// Copies the core's gauges and totals.
    pub fn refresh(&self, core: &Core) {
        self.mappings.set(core.mapping_count() as i64);
        self.clients.set(core.client_count() as i64);
        let (packets, bytes) = core.traffic();
        let expired = core.expired_count();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        self.packets.inc_by(packets.saturating_sub(seen.0));
        self.bytes.inc_by(bytes.saturating_sub(seen.1));
        self.expired.inc_by(expired.saturating_sub(seen.2));
        *seen = (packets.max(seen.0), bytes.max(seen.1), expired.max(seen.2));
    }
}
