//! `mptcp-detour` metrics, under the `detour_client_` prefix (served like the host's).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A request's labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// The NAT detour's address.
    pub detour: String,
    /// `granted`, `refused` or `no_answer`.
    pub result: &'static str,
}

/// A dropped answer's reason.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `malformed`, `bad_mac`, `unknown_nonce`, `mismatch`, `not_an_answer`, `wrong_version`,
    /// `unknown_request`.
    pub reason: &'static str,
}

/// A subflow's labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SubflowLabels {
    /// `nat`, `tunnel`, `endpoint` or `announced`.
    pub kind: &'static str,
    /// `created` or `failed`.
    pub result: &'static str,
}

/// Every client metric.
#[derive(Debug, Default)]
pub struct ClientMetrics {
    detours: Vec<String>,
    requests: Family<RequestLabels, Counter>,
    dropped: Family<ReasonLabel, Counter>,
    subflows: Family<SubflowLabels, Counter>,
    connections: Gauge,
    detour_subflows: Gauge,
    mappings: Gauge,
}

impl ClientMetrics {
    /// Metrics for these NAT detours.
    pub fn new(detours: Vec<String>) -> Self {
        Self {
            detours,
            ..Self::default()
        }
    }

    /// Registers under `detour_client_`.
    pub fn register(&self, registry: &mut Registry) {
        for reason in [
            "malformed",
            "bad_mac",
            "unknown_nonce",
            "mismatch",
            "not_an_answer",
            "wrong_version",
            "unknown_request",
        ] {
            let _ = self.dropped.get_or_create(&ReasonLabel { reason });
        }
        let registry = registry.sub_registry_with_prefix("detour_client");
        registry.register(
            "requests",
            "Mapping requests by NAT detour and result",
            self.requests.clone(),
        );
        registry.register(
            "answers_dropped",
            "Datagrams from NAT detours dropped (forged, replayed, unexpected or malformed)",
            self.dropped.clone(),
        );
        registry.register(
            "subflows",
            "SUBFLOW_CREATE commands by kind and result",
            self.subflows.clone(),
        );
        registry.register(
            "connections",
            "MPTCP connections the path manager tracks",
            self.connections.clone(),
        );
        registry.register(
            "detour_subflows",
            "Detour subflows established now",
            self.detour_subflows.clone(),
        );
        registry.register("mappings", "NAT mappings held", self.mappings.clone());
    }

    /// Counts a request's result.
    pub fn request(&self, detour: usize, result: &'static str) {
        let detour = self.detours.get(detour).cloned().unwrap_or_default();
        self.requests
            .get_or_create(&RequestLabels { detour, result })
            .inc();
    }

    /// Counts a dropped answer.
    pub fn dropped(&self, reason: &'static str) {
        self.dropped.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts a SUBFLOW_CREATE.
    pub fn subflow(&self, kind: &'static str, created: bool) {
        self.subflows
            .get_or_create(&SubflowLabels {
                kind,
                result: if created { "created" } else { "failed" },
            })
            .inc();
    }

    /// Sets the gauges.
    pub fn gauges(&self, connections: usize, detour_subflows: usize, mappings: usize) {
        self.connections.set(connections as i64);
        self.detour_subflows.set(detour_subflows as i64);
        self.mappings.set(mappings as i64);
    }
}
