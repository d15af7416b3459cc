//! The client's path manager, sans I/O: the thesis's subflow worker (§4.2.1) and client daemon (§4.3)
//! as one state machine driven by the kernel's `mptcp_pm` events.
//!
//! On ESTABLISHED of a connection the policy selects, it asks every NAT detour for a mapping to the
//! server (all at once; the shell sends them in parallel) and runs the worker: up to `max_detours`
//! detour subflows, tunnel detours first (they need no signalling), then NAT detours whose mapping is
//! ready, oldest first. It runs again whenever a mapping arrives or a detour subflow fails. Because the
//! userspace path manager replaces the in-kernel one, it also opens subflows from the kernel's `subflow`
//! endpoints and to addresses the server announces, within the kernel's limits.
//!
//! Outputs are [`Action`]s (mapping requests and releases, SUBFLOW_CREATE and SUBFLOW_DESTROY); the
//! shell reports their results back with [`ClientCore::handle_mapping`] and
//! [`ClientCore::handle_subflow_result`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use mptcp_netlink::mptcp_pm::{PmEvent, PmEventKind};

use super::config::PolicyConfig;
use crate::wire::Status;

/// An in-kernel path manager endpoint the daemon serves (`ip mptcp endpoint ... subflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Its address.
    pub addr: IpAddr,
    /// Its id.
    pub id: u8,
    /// Its interface (0: none).
    pub if_index: u32,
}

/// How a subflow leaves this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    /// Through tunnel detour `n` (bound to its interface, from its address).
    Tunnel(usize),
    /// To NAT detour `n`'s mapped port, from the address the route to the detour uses.
    Nat(usize),
    /// From a `subflow` endpoint of this host.
    Endpoint(Endpoint),
    /// From the connection's own local address (to an address the server announced).
    Initial,
}

impl Via {
    fn is_detour(self) -> bool {
        matches!(self, Via::Tunnel(_) | Via::Nat(_))
    }

    /// A short label for logs and metrics.
    pub fn kind(self) -> &'static str {
        match self {
            Via::Tunnel(_) => "tunnel",
            Via::Nat(_) => "nat",
            Via::Endpoint(_) => "endpoint",
            Via::Initial => "announced",
        }
    }
}

/// Identifies a subflow the core asked for.
pub type SubflowId = u64;

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask NAT detour `detour` for a mapping to `remote`, proposing `remote`'s port; answer with
    /// [`ClientCore::handle_mapping`].
    RequestMapping {
        /// The NAT detour.
        detour: usize,
        /// The server.
        remote: SocketAddrV4,
    },
    /// Give a mapping back (no answer expected).
    ReleaseMapping {
        /// The NAT detour.
        detour: usize,
        /// The server.
        remote: SocketAddrV4,
        /// The detour port.
        dpt: u16,
    },
    /// SUBFLOW_CREATE on connection `token` towards `remote`; answer with
    /// [`ClientCore::handle_subflow_result`].
    CreateSubflow {
        /// The core's handle for it.
        id: SubflowId,
        /// The connection.
        token: u32,
        /// How it leaves.
        via: Via,
        /// The connection's local address (its id 0 address).
        initial_local: IpAddr,
        /// Where it goes.
        remote: SocketAddr,
    },
    /// SUBFLOW_DESTROY.
    DestroySubflow {
        /// The connection.
        token: u32,
        /// The subflow's local address and port.
        local: SocketAddr,
        /// Its remote address and port.
        remote: SocketAddr,
    },
}

/// A detour's answer to a mapping request, as the shell saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappingResult {
    /// Use `dpt`; an unused mapping lives `lifetime` at the detour.
    Granted {
        /// The detour port.
        dpt: u16,
        /// The detour's idle timeout (version 1 detours send none: [`Duration::MAX`]).
        lifetime: Duration,
    },
    /// The detour refused.
    Refused(Status),
    /// No valid answer after every attempt.
    NoAnswer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubState {
    /// SUBFLOW_CREATE sent.
    Requested,
    /// The kernel accepted it; waiting for SUB_ESTABLISHED.
    Connecting { local: IpAddr },
    /// Established.
    Established { local: SocketAddr },
    /// Failed or closed; never retried on this connection.
    Gone,
}

#[derive(Debug, Clone)]
struct Planned {
    id: SubflowId,
    via: Via,
    remote: SocketAddr,
    state: SubState,
}

#[derive(Debug)]
struct Connection {
    local: SocketAddr,
    remote: SocketAddr,
    selected: bool,
    subflows: Vec<Planned>,
    announced: u32,
}

impl Connection {
    fn active_detours(&self) -> usize {
        self.subflows
            .iter()
            .filter(|s| s.via.is_detour() && s.state != SubState::Gone)
            .count()
    }

    fn kernel_subflows(&self) -> u32 {
        self.subflows.iter().filter(|s| !s.via.is_detour()).count() as u32
    }

    fn remote_v4(&self) -> Option<SocketAddrV4> {
        match self.remote {
            SocketAddr::V4(v4) => Some(v4),
            SocketAddr::V6(v6) => v6
                .ip()
                .to_ipv4_mapped()
                .map(|ip| SocketAddrV4::new(ip, v6.port())),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum MappingState {
    Pending,
    Ready {
        dpt: u16,
        since: Instant,
        refreshed: Instant,
        lifetime: Duration,
        idle_since: Option<Instant>,
    },
    Refused {
        until: Instant,
    },
}

/// How long a refused or unanswered detour is left alone for a given server.
pub const REFUSAL_BACKOFF: Duration = Duration::from_secs(30);

/// The core's settings.
#[derive(Debug, Clone)]
pub struct CoreSettings {
    /// Which connections get detours.
    pub policy: PolicyConfig,
    /// Detour subflows per connection.
    pub max_detours: usize,
    /// The NAT detours' addresses, oldest first.
    pub nat_detours: Vec<SocketAddrV4>,
    /// How many tunnel detours, oldest first.
    pub tunnel_detours: usize,
    /// Release an unused mapping after this long.
    pub mapping_linger: Duration,
    /// Serve the kernel's endpoints and announced addresses.
    pub kernel_paths: bool,
    /// The `subflow` endpoints.
    pub endpoints: Vec<Endpoint>,
    /// `ip mptcp limits`: extra subflows per connection.
    pub subflow_limit: u32,
    /// `ip mptcp limits`: announced addresses accepted per connection.
    pub add_addr_accepted: u32,
}

/// The client's path manager state.
#[derive(Debug)]
pub struct ClientCore {
    settings: CoreSettings,
    connections: HashMap<u32, Connection>,
    mappings: HashMap<(usize, SocketAddrV4), MappingState>,
    actions: VecDeque<Action>,
    next_id: SubflowId,
    stopping: bool,
}

impl ClientCore {
    /// A core with no connections.
    pub fn new(settings: CoreSettings) -> Self {
        Self {
            settings,
            connections: HashMap::new(),
            mappings: HashMap::new(),
            actions: VecDeque::new(),
            next_id: 1,
            stopping: false,
        }
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// How many connections are tracked.
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Detour subflows established now.
    pub fn established_detours(&self) -> usize {
        self.connections
            .values()
            .flat_map(|c| &c.subflows)
            .filter(|s| s.via.is_detour() && matches!(s.state, SubState::Established { .. }))
            .count()
    }

    /// Mappings held (ready).
    pub fn mapping_count(&self) -> usize {
        self.mappings
            .values()
            .filter(|m| matches!(m, MappingState::Ready { .. }))
            .count()
    }

    /// Handles one path manager event.
    pub fn handle_pm_event(&mut self, now: Instant, event: &PmEvent) {
        if self.stopping {
            return;
        }
        let Some(token) = event.token else {
            return;
        };
        match event.kind {
            PmEventKind::Established => {
                if event.server_side == Some(true) {
                    return;
                }
                if let (Some(local), Some(remote)) = (event.local(), event.remote()) {
                    self.established(now, token, local, remote);
                }
            }
            PmEventKind::Closed => self.closed(now, token),
            PmEventKind::SubflowEstablished => {
                if let (Some(local), Some(remote)) = (event.local(), event.remote()) {
                    self.subflow_established(token, local, remote);
                }
            }
            PmEventKind::SubflowClosed => {
                if let (Some(local), Some(remote)) = (event.local_addr, event.remote()) {
                    self.subflow_closed(now, token, local, remote);
                }
            }
            PmEventKind::Announced => {
                if let Some(addr) = event.remote_addr {
                    self.announced(token, addr, event.remote_port.unwrap_or(0));
                }
            }
            _ => {}
        }
    }

    fn established(&mut self, now: Instant, token: u32, local: SocketAddr, remote: SocketAddr) {
        let selected = self.settings.policy.selects(remote);
        let mut connection = Connection {
            local,
            remote,
            selected,
            subflows: Vec::new(),
            announced: 0,
        };
        if self.settings.kernel_paths {
            for endpoint in self.settings.endpoints.clone() {
                if connection.kernel_subflows() >= self.settings.subflow_limit {
                    break;
                }
                if endpoint.addr.is_ipv4() != remote.ip().to_canonical().is_ipv4()
                    || endpoint.addr == local.ip()
                {
                    continue;
                }
                self.plan(token, &mut connection, Via::Endpoint(endpoint), remote);
            }
        }
        if selected {
            if let Some(remote_v4) = connection.remote_v4() {
                for detour in 0..self.settings.nat_detours.len() {
                    self.want_mapping(now, detour, remote_v4);
                }
            }
        }
        self.connections.insert(token, connection);
        self.work(token);
    }

    /// Makes sure a usable mapping exists or is being asked for.
    fn want_mapping(&mut self, now: Instant, detour: usize, remote: SocketAddrV4) {
        let key = (detour, remote);
        let ask = match self.mappings.get_mut(&key) {
            None => true,
            Some(MappingState::Pending) => false,
            Some(MappingState::Refused { until }) => now >= *until,
            Some(MappingState::Ready {
                refreshed,
                lifetime,
                idle_since,
                ..
            }) => {
                *idle_since = None;
                // The detour drops an unused mapping after its lifetime; past half of it, ask again (the
                // answer reuses the mapping and refreshes it) before opening subflows through it.
                now.saturating_duration_since(*refreshed) >= *lifetime / 2
            }
        };
        if ask {
            self.mappings.insert(key, MappingState::Pending);
            self.actions
                .push_back(Action::RequestMapping { detour, remote });
        }
    }

    fn plan(&mut self, token: u32, connection: &mut Connection, via: Via, remote: SocketAddr) {
        let id = self.next_id;
        self.next_id += 1;
        connection.subflows.push(Planned {
            id,
            via,
            remote,
            state: SubState::Requested,
        });
        self.actions.push_back(Action::CreateSubflow {
            id,
            token,
            via,
            initial_local: connection.local.ip(),
            remote,
        });
    }

    /// The subflow worker (thesis §4.2.1) for one connection.
    fn work(&mut self, token: u32) {
        let Some(mut connection) = self.connections.remove(&token) else {
            return;
        };
        if connection.selected && !self.stopping {
            if let Some(remote_v4) = connection.remote_v4() {
                let mut candidates: Vec<(Via, SocketAddr)> = (0..self.settings.tunnel_detours)
                    .map(|n| (Via::Tunnel(n), connection.remote))
                    .collect();
                let mut nat: Vec<(Instant, usize, u16)> = (0..self.settings.nat_detours.len())
                    .filter_map(|n| match self.mappings.get(&(n, remote_v4)) {
                        Some(MappingState::Ready { dpt, since, .. }) => Some((*since, n, *dpt)),
                        _ => None,
                    })
                    .collect();
                nat.sort();
                candidates.extend(nat.into_iter().map(|(_, n, dpt)| {
                    let detour = self.settings.nat_detours[n];
                    (
                        Via::Nat(n),
                        SocketAddr::V4(SocketAddrV4::new(*detour.ip(), dpt)),
                    )
                }));
                for (via, remote) in candidates {
                    if connection.active_detours() >= self.settings.max_detours {
                        break;
                    }
                    if connection.subflows.iter().any(|s| s.via == via) {
                        continue;
                    }
                    self.plan(token, &mut connection, via, remote);
                }
            }
        }
        self.connections.insert(token, connection);
    }

    fn closed(&mut self, now: Instant, token: u32) {
        let Some(connection) = self.connections.remove(&token) else {
            return;
        };
        let Some(remote) = connection.remote_v4() else {
            return;
        };
        let still_used = self
            .connections
            .values()
            .any(|c| c.selected && c.remote_v4() == Some(remote));
        if !still_used {
            for ((_, r), state) in self.mappings.iter_mut() {
                if *r == remote {
                    if let MappingState::Ready { idle_since, .. } = state {
                        *idle_since = Some(now);
                    }
                }
            }
        }
    }

    fn find(&mut self, token: u32, local: IpAddr, remote: SocketAddr) -> Option<&mut Planned> {
        self.connections
            .get_mut(&token)?
            .subflows
            .iter_mut()
            .find(|s| {
                s.remote == remote
                    && match s.state {
                        SubState::Connecting { local: l } => l == local,
                        SubState::Established { local: l } => l.ip() == local,
                        _ => false,
                    }
            })
    }

    fn subflow_established(&mut self, token: u32, local: SocketAddr, remote: SocketAddr) {
        if let Some(planned) = self.find(token, local.ip(), remote) {
            planned.state = SubState::Established { local };
        }
    }

    fn subflow_closed(&mut self, _now: Instant, token: u32, local: IpAddr, remote: SocketAddr) {
        let Some(planned) = self.find(token, local, remote) else {
            return;
        };
        let was_detour = planned.via.is_detour();
        planned.state = SubState::Gone;
        if was_detour {
            // Another detour may take its place.
            self.work(token);
        }
    }

    fn announced(&mut self, token: u32, addr: IpAddr, port: u16) {
        if !self.settings.kernel_paths {
            return;
        }
        let limit = self.settings.subflow_limit;
        let accepted = self.settings.add_addr_accepted;
        let Some(mut connection) = self.connections.remove(&token) else {
            return;
        };
        let port = if port == 0 {
            connection.remote.port()
        } else {
            port
        };
        let remote = SocketAddr::new(addr, port);
        if connection.announced < accepted
            && connection.kernel_subflows() < limit
            && addr.is_ipv4() == connection.local.ip().is_ipv4()
            && remote != connection.remote
        {
            connection.announced += 1;
            self.plan(token, &mut connection, Via::Initial, remote);
        }
        self.connections.insert(token, connection);
    }

    /// A detour's answer (or silence) for a mapping request.
    pub fn handle_mapping(
        &mut self,
        now: Instant,
        detour: usize,
        remote: SocketAddrV4,
        result: MappingResult,
    ) {
        if self.stopping {
            if let MappingResult::Granted { dpt, .. } = result {
                self.actions.push_back(Action::ReleaseMapping {
                    detour,
                    remote,
                    dpt,
                });
            }
            return;
        }
        let previous = self.mappings.get(&(detour, remote)).copied();
        let state = match result {
            MappingResult::Granted { dpt, lifetime } => {
                let since = match previous {
                    Some(MappingState::Ready { since, dpt: d, .. }) if d == dpt => since,
                    _ => now,
                };
                let used = self
                    .connections
                    .values()
                    .any(|c| c.selected && c.remote_v4() == Some(remote));
                MappingState::Ready {
                    dpt,
                    since,
                    refreshed: now,
                    lifetime,
                    idle_since: (!used).then_some(now),
                }
            }
            MappingResult::Refused(_) | MappingResult::NoAnswer => MappingState::Refused {
                until: now + REFUSAL_BACKOFF,
            },
        };
        self.mappings.insert((detour, remote), state);
        if matches!(state, MappingState::Ready { .. }) {
            let tokens: Vec<u32> = self
                .connections
                .iter()
                .filter(|(_, c)| c.selected && c.remote_v4() == Some(remote))
                .map(|(t, _)| *t)
                .collect();
            for token in tokens {
                self.work(token);
            }
        }
    }

    /// The result of a SUBFLOW_CREATE: the local address the subflow uses, or why it failed.
    pub fn handle_subflow_result(&mut self, id: SubflowId, result: Result<IpAddr, String>) {
        let Some((token, planned)) = self.connections.iter_mut().find_map(|(token, c)| {
            c.subflows
                .iter_mut()
                .find(|s| s.id == id)
                .map(|s| (*token, s))
        }) else {
            return;
        };
        let was_detour = planned.via.is_detour();
        match result {
            Ok(local) => {
                if planned.state == SubState::Requested {
                    planned.state = SubState::Connecting { local };
                }
            }
            Err(_) => {
                planned.state = SubState::Gone;
                if was_detour {
                    self.work(token);
                }
            }
        }
    }

    /// Releases mappings no connection used for `mapping_linger`.
    pub fn poll_timers(&mut self, now: Instant) {
        let linger = self.settings.mapping_linger;
        let expired: Vec<(usize, SocketAddrV4, u16)> = self
            .mappings
            .iter()
            .filter_map(|((detour, remote), state)| match state {
                MappingState::Ready {
                    dpt,
                    idle_since: Some(idle),
                    ..
                } if now.saturating_duration_since(*idle) >= linger => {
                    Some((*detour, *remote, *dpt))
                }
                MappingState::Refused { until } if now >= *until => Some((*detour, *remote, 0)),
                _ => None,
            })
            .collect();
        for (detour, remote, dpt) in expired {
            self.mappings.remove(&(detour, remote));
            if dpt != 0 {
                self.actions.push_back(Action::ReleaseMapping {
                    detour,
                    remote,
                    dpt,
                });
            }
        }
    }

    /// Stops: closes every detour subflow and releases every mapping (the actions come out of
    /// [`ClientCore::poll_action`]); later events are ignored.
    pub fn shutdown(&mut self) {
        self.stopping = true;
        for (token, connection) in &self.connections {
            for subflow in &connection.subflows {
                if let (true, SubState::Established { local }) =
                    (subflow.via.is_detour(), subflow.state)
                {
                    self.actions.push_back(Action::DestroySubflow {
                        token: *token,
                        local,
                        remote: subflow.remote,
                    });
                }
            }
        }
        for ((detour, remote), state) in self.mappings.drain() {
            if let MappingState::Ready { dpt, .. } = state {
                self.actions.push_back(Action::ReleaseMapping {
                    detour,
                    remote,
                    dpt,
                });
            }
        }
        self.connections.clear();
    }
}
