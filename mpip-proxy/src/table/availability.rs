//! MPIP availability table and handshake state (§III-C, `PROTOCOL.md` §4.1).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use crate::time::Timestamp;
use crate::wire::{CmRepr, NodeId};

/// Handshake timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeConfig {
    /// Time between two `ENABLE` queries to the same endpoint.
    pub probe_interval: Duration,
    /// `ENABLE` queries sent before the endpoint is marked unavailable.
    pub max_probes: u32,
    /// Time an unavailable endpoint waits before the handshake is tried again.
    pub hold_down: Duration,
}

impl Default for HandshakeConfig {
    fn default() -> Self {
        HandshakeConfig {
            probe_interval: Duration::from_millis(200),
            max_probes: 5,
            hold_down: Duration::from_secs(5),
        }
    }
}

/// MPIP availability of one remote endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// Never contacted.
    Unknown,
    /// `ENABLE` queries are being sent.
    Probing {
        /// Queries sent so far.
        probes_sent: u32,
        /// When the next query is due.
        next_probe: Timestamp,
    },
    /// The endpoint answered with a CM block: it is MPIP node `node_id`.
    Enabled {
        /// The node behind the endpoint.
        node_id: NodeId,
        /// When the handshake completed.
        since: Timestamp,
    },
    /// No answer to `max_probes` queries.
    Unavailable {
        /// When the handshake is tried again.
        retry_at: Timestamp,
    },
}

/// Availability of remote endpoints, keyed by their UDP endpoint.
#[derive(Debug, Clone, Default)]
pub struct AvailabilityTable {
    config: HandshakeConfig,
    entries: BTreeMap<SocketAddr, Availability>,
}

impl AvailabilityTable {
    /// An empty table.
    pub fn new(config: HandshakeConfig) -> Self {
        AvailabilityTable {
            config,
            entries: BTreeMap::new(),
        }
    }

    /// Availability of `remote`.
    pub fn status(&self, remote: SocketAddr) -> Availability {
        self.entries
            .get(&remote)
            .copied()
            .unwrap_or(Availability::Unknown)
    }

    /// The node ID behind `remote`, once the handshake completed.
    pub fn enabled_node(&self, remote: SocketAddr) -> Option<NodeId> {
        match self.status(remote) {
            Availability::Enabled { node_id, .. } => Some(node_id),
            _ => None,
        }
    }

    /// Starts the handshake with `remote` unless it is already running or done.
    pub fn start(&mut self, now: Timestamp, remote: SocketAddr) {
        if matches!(self.status(remote), Availability::Unknown) {
            self.entries.insert(
                remote,
                Availability::Probing {
                    probes_sent: 0,
                    next_probe: now,
                },
            );
        }
    }

    /// Starts the handshake with `remote` again, whatever its state.
    pub fn restart(&mut self, now: Timestamp, remote: SocketAddr) {
        self.entries.insert(
            remote,
            Availability::Probing {
                probes_sent: 0,
                next_probe: now,
            },
        );
    }

    /// Handles a valid CM block received from `remote`; returns `true` if the
    /// endpoint just became [`Availability::Enabled`].
    ///
    /// Any CM block proves that the sender speaks MPIP. (Answering an `ENABLE`
    /// query with `CONFIRM` is done by
    /// [`crate::path_manager::PathManager::handle_received`].)
    pub fn handle_received(&mut self, now: Timestamp, remote: SocketAddr, repr: &CmRepr) -> bool {
        let already = matches!(
            self.status(remote),
            Availability::Enabled { node_id, .. } if node_id == repr.node_id
        );
        if !already {
            self.entries.insert(
                remote,
                Availability::Enabled {
                    node_id: repr.node_id,
                    since: now,
                },
            );
        }
        !already
    }

    /// The next endpoint that needs an `ENABLE` query at `now`, if any.
    ///
    /// Endpoints that used up their queries become [`Availability::Unavailable`];
    /// unavailable endpoints whose hold-down ended start a new round.
    pub fn poll_probe(&mut self, now: Timestamp) -> Option<SocketAddr> {
        let config = self.config;
        for (remote, state) in self.entries.iter_mut() {
            match *state {
                Availability::Probing {
                    probes_sent,
                    next_probe,
                } if next_probe <= now => {
                    if probes_sent >= config.max_probes {
                        *state = Availability::Unavailable {
                            retry_at: now + config.hold_down,
                        };
                        continue;
                    }
                    *state = Availability::Probing {
                        probes_sent: probes_sent + 1,
                        next_probe: now + config.probe_interval,
                    };
                    return Some(*remote);
                }
                Availability::Unavailable { retry_at } if retry_at <= now => {
                    *state = Availability::Probing {
                        probes_sent: 1,
                        next_probe: now + config.probe_interval,
                    };
                    return Some(*remote);
                }
                _ => {}
            }
        }
        None
    }

    /// When [`AvailabilityTable::poll_probe`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.entries
            .values()
            .filter_map(|state| match *state {
                Availability::Probing { next_probe, .. } => Some(next_probe),
                Availability::Unavailable { retry_at } => Some(retry_at),
                _ => None,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{CmFlags, PathId, SessionId};

    fn repr(flags: CmFlags) -> CmRepr {
        CmRepr {
            flags,
            node_id: NodeId([2, 0, 0, 0, 0, 2]),
            session_id: SessionId::CONTROL,
            path_id: PathId(1),
            feedback: None,
            timestamp: 0,
            sequence: 0,
            addresses: vec![],
            auth: None,
        }
    }

    const PROXY: &str = "198.51.100.1:4789";

    #[test]
    fn handshake_completes_on_confirm() {
        let proxy: SocketAddr = PROXY.parse().unwrap();
        let mut table = AvailabilityTable::new(HandshakeConfig::default());
        let t0 = Timestamp::from_millis(1);
        table.start(t0, proxy);
        assert_eq!(table.poll_probe(t0), Some(proxy));
        assert_eq!(table.poll_probe(t0), None, "second query waits an interval");
        assert!(table.handle_received(t0, proxy, &repr(CmFlags::CONFIRM)));
        assert!(!table.handle_received(t0, proxy, &repr(CmFlags::HEARTBEAT)));
        assert_eq!(table.enabled_node(proxy), Some(NodeId([2, 0, 0, 0, 0, 2])));
        assert_eq!(table.poll_timeout(), None);
    }

    #[test]
    fn enable_query_proves_the_sender_speaks_mpip() {
        let client: SocketAddr = "203.0.113.9:40000".parse().unwrap();
        let mut table = AvailabilityTable::new(HandshakeConfig::default());
        assert!(table.handle_received(Timestamp::ZERO, client, &repr(CmFlags::ENABLE)));
        assert!(table.enabled_node(client).is_some());
    }

    #[test]
    fn silent_endpoint_becomes_unavailable_then_retried() {
        let proxy: SocketAddr = PROXY.parse().unwrap();
        let config = HandshakeConfig::default();
        let mut table = AvailabilityTable::new(config);
        let mut now = Timestamp::ZERO;
        table.start(now, proxy);
        let mut sent = 0;
        while !matches!(table.status(proxy), Availability::Unavailable { .. }) {
            if table.poll_probe(now).is_some() {
                sent += 1;
            }
            now = table.poll_timeout().unwrap();
        }
        assert_eq!(sent, config.max_probes);
        let retry = table.poll_timeout().unwrap();
        assert_eq!(table.poll_probe(retry), Some(proxy));
        assert!(matches!(
            table.status(proxy),
            Availability::Probing { probes_sent: 1, .. }
        ));
    }
}
