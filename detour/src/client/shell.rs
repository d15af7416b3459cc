//! The tokio shell of `mptcp-detour`: the path manager's event socket (a thread), its command socket,
//! the NAT detour requester, the userspace-PM sysctl and the MSS clamp, around the sans-IO
//! [`ClientCore`].

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mptcp_netlink::mptcp_pm::{self, flags, Delivery, EventListener, PathManager, PmAddress};
use tokio::sync::{mpsc, watch};

use super::config::ClientConfig;
use super::core::{Action, ClientCore, CoreSettings, Endpoint, MappingResult, Via};
use super::metrics::ClientMetrics;
use super::requester::{self, NatDetour, Requester};
use super::sys::{tunnel_address, MssClamp, UserspacePm};
use crate::key::Psk;

/// The MSS clamp table's name.
pub const CLAMP_TABLE: &str = "mptcp_detour_client";
/// How long shutdown waits for detours to confirm releases.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Why the client daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A key file.
    #[error(transparent)]
    Key(#[from] crate::key::KeyError),
    /// The path manager family.
    #[error("MPTCP path manager: {0}")]
    Pm(#[from] mptcp_pm::PmError),
    /// A path manager command.
    #[error("MPTCP path manager: {0}")]
    Netlink(#[from] mptcp_netlink::NetlinkError),
    /// The userspace path manager sysctl.
    #[error("switching to the userspace path manager (net.mptcp.path_manager): {0}")]
    Sysctl(#[source] std::io::Error),
    /// A socket.
    #[error("{what} {address}: {source}")]
    Socket {
        /// What for.
        what: &'static str,
        /// The address.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Address ids for local addresses that are not endpoints (tunnel addresses, a NAT detour's route
/// source other than the connection's): stable per address, from 100 up, so they never collide with
/// endpoint ids an administrator picks.
#[derive(Debug)]
struct AddressIds {
    ids: HashMap<IpAddr, u8>,
    next: u8,
}

impl AddressIds {
    fn get(&mut self, addr: IpAddr) -> Option<u8> {
        if let Some(id) = self.ids.get(&addr) {
            return Some(*id);
        }
        if self.next == u8::MAX {
            return None;
        }
        let id = self.next;
        self.next += 1;
        self.ids.insert(addr, id);
        Some(id)
    }
}

struct Shell {
    core: ClientCore,
    pm: PathManager,
    requester: Arc<Requester>,
    tunnels: Vec<String>,
    endpoints: Vec<Endpoint>,
    ids: AddressIds,
    metrics: Arc<ClientMetrics>,
    mapping_tx: mpsc::UnboundedSender<(usize, std::net::SocketAddrV4, MappingResult)>,
    releases: tokio::task::JoinSet<bool>,
}

impl Shell {
    /// The local address and id a subflow leaves from.
    fn local_for(&mut self, via: Via, initial: IpAddr) -> Result<PmAddress, String> {
        let mut local = match via {
            Via::Initial => PmAddress::new(initial, 0),
            Via::Endpoint(endpoint) => {
                let mut a = PmAddress::new(endpoint.addr, 0);
                a.id = Some(endpoint.id);
                a.if_index = endpoint.if_index;
                a
            }
            Via::Nat(n) => {
                let source = self
                    .requester
                    .local_address(n)
                    .ok_or("no route to the NAT detour")?;
                PmAddress::new(source, 0)
            }
            Via::Tunnel(n) => {
                let name = &self.tunnels[n];
                let (index, addr) =
                    tunnel_address(name).ok_or_else(|| format!("{name} has no IPv4 address"))?;
                let mut a = PmAddress::new(IpAddr::V4(addr), 0);
                a.if_index = index;
                a
            }
        };
        if local.id.is_none() && local.addr != initial {
            local.id = match self.endpoints.iter().find(|e| e.addr == local.addr) {
                Some(endpoint) => Some(endpoint.id),
                None => Some(self.ids.get(local.addr).ok_or("no address id left")?),
            };
        }
        local.flags = flags::SUBFLOW;
        Ok(local)
    }

    fn drain(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::RequestMapping { detour, remote } => {
                    let requester = self.requester.clone();
                    let tx = self.mapping_tx.clone();
                    tokio::spawn(async move {
                        let result = requester.request(detour, remote).await;
                        let _ = tx.send((detour, remote, result));
                    });
                }
                Action::ReleaseMapping {
                    detour,
                    remote,
                    dpt,
                } => {
                    let requester = self.requester.clone();
                    self.releases
                        .spawn(async move { requester.release(detour, remote, dpt).await });
                }
                Action::CreateSubflow {
                    id,
                    token,
                    via,
                    initial_local,
                    remote,
                } => {
                    let result = self.local_for(via, initial_local).and_then(|local| {
                        self.pm
                            .subflow_create(token, &local, remote)
                            .map(|()| local.addr)
                            .map_err(|e| e.to_string())
                    });
                    match &result {
                        Ok(local) => tracing::info!(
                            token = format_args!("{token:#x}"),
                            kind = via.kind(),
                            %local,
                            %remote,
                            "subflow requested"
                        ),
                        Err(error) => tracing::warn!(
                            token = format_args!("{token:#x}"),
                            kind = via.kind(),
                            %remote,
                            %error,
                            "subflow not created"
                        ),
                    }
                    self.metrics.subflow(via.kind(), result.is_ok());
                    self.core.handle_subflow_result(id, result);
                }
                Action::DestroySubflow {
                    token,
                    local,
                    remote,
                } => match self.pm.subflow_destroy(token, local, remote) {
                    Ok(()) => tracing::info!(%local, %remote, "detour subflow closed"),
                    Err(error) => tracing::debug!(%error, "closing a detour subflow"),
                },
            }
        }
        self.metrics.gauges(
            self.core.connection_count(),
            self.core.established_detours(),
            self.core.mapping_count(),
        );
    }
}

/// Runs the client daemon until `shutdown` completes; on the way out it closes its detour subflows,
/// releases its mappings, restores the path manager sysctl and removes the MSS clamp.
pub async fn run(
    config: ClientConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ClientError> {
    // Signal handlers before anything else (and before READY=1): `termination()` installs its handlers
    // when first polled, and a SIGTERM that finds none ends the process with nothing cleaned up.
    tokio::pin!(shutdown);
    let stopped_early = tokio::select! {
        biased;
        () = &mut shutdown => true,
        () = std::future::ready(()) => false,
    };
    let mut detours = Vec::new();
    for (i, nat) in config.nat_detours.iter().enumerate() {
        let psk = if nat.version == 2 {
            let file = config.key_file(i).expect("validated: version 2 has a key");
            Some(Psk::load(file)?)
        } else {
            None
        };
        let SocketAddr::V4(address) = nat.address else {
            unreachable!("validated: NAT detours are IPv4");
        };
        let socket = requester::connect(address)
            .await
            .map_err(|source| ClientError::Socket {
                what: "connecting a UDP socket to NAT detour",
                address: nat.address,
                source,
            })?;
        detours.push(NatDetour {
            address,
            psk,
            socket: Arc::new(socket),
        });
    }
    let metrics = Arc::new(ClientMetrics::new(
        detours.iter().map(|d| d.address.to_string()).collect(),
    ));
    let requester = Requester::new(
        detours,
        config.request_timeout,
        config.request_attempts,
        metrics.clone(),
    );

    let mut pm = PathManager::open()?;
    let endpoints: Vec<Endpoint> = pm
        .endpoints()?
        .into_iter()
        .filter(|e| e.flags & (flags::SUBFLOW | flags::FULLMESH) != 0)
        .filter_map(|e| {
            Some(Endpoint {
                addr: e.addr,
                id: e.id?,
                if_index: e.if_index,
            })
        })
        .collect();
    let (subflow_limit, add_addr_accepted) = pm.limits()?;
    if config.kernel_paths {
        tracing::info!(
            endpoints = endpoints.len(),
            subflow_limit,
            add_addr_accepted,
            "serving the in-kernel path manager's subflow endpoints and limits"
        );
    }

    let (event_tx, mut events) = mpsc::unbounded_channel();
    let mut listener = EventListener::spawn(move |delivery| match delivery {
        Delivery::Event(event) => event_tx.send(event).is_ok(),
        Delivery::Lost => {
            tracing::warn!("mptcp_pm events overran the socket buffer; some were lost");
            true
        }
    })?;
    let pm_guard = UserspacePm::enable().map_err(ClientError::Sysctl)?;
    let clamps: Vec<(String, u16)> = config
        .tunnel_detours
        .iter()
        .filter_map(|t| t.mss.map(|mss| (t.interface.clone(), mss)))
        .collect();
    let clamp = if clamps.is_empty() {
        None
    } else {
        Some(MssClamp::install(CLAMP_TABLE, &clamps)?)
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let admin = match config.metrics.address {
        Some(address) => {
            let metrics = metrics.clone();
            Some(
                crate::admin::serve_metrics(address, move |r| metrics.register(r), stop_rx)
                    .await
                    .map_err(|source| ClientError::Socket {
                        what: "binding the metrics listener",
                        address,
                        source,
                    })?,
            )
        }
        None => None,
    };

    let (mapping_tx, mut mappings) = mpsc::unbounded_channel();
    let settings = CoreSettings {
        policy: config.policy.clone(),
        max_detours: config.max_detours,
        nat_detours: requester.addresses(),
        tunnel_detours: config.tunnel_detours.len(),
        mapping_linger: config.mapping_linger,
        kernel_paths: config.kernel_paths,
        endpoints: endpoints.clone(),
        subflow_limit,
        add_addr_accepted,
    };
    let mut shell = Shell {
        core: ClientCore::new(settings),
        pm,
        requester: requester.clone(),
        tunnels: config
            .tunnel_detours
            .iter()
            .map(|t| t.interface.clone())
            .collect(),
        endpoints,
        ids: AddressIds {
            ids: HashMap::new(),
            next: 100,
        },
        metrics,
        mapping_tx,
        releases: tokio::task::JoinSet::new(),
    };
    tracing::info!(
        nat_detours = config.nat_detours.len(),
        tunnel_detours = config.tunnel_detours.len(),
        max_detours = config.max_detours,
        "running the userspace path manager"
    );
    mptcp_ops::notify::ready("userspace path manager running");
    let mut timers = tokio::time::interval(Duration::from_secs(1));
    timers.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if stopped_early {
            break;
        }
        tokio::select! {
            _ = &mut shutdown => break,
            event = events.recv() => {
                let Some(event) = event else { break };
                tracing::debug!(?event, "mptcp_pm event");
                shell.core.handle_pm_event(Instant::now(), &event);
            }
            Some((detour, remote, result)) = mappings.recv() => {
                tracing::info!(detour, %remote, ?result, "NAT detour answered");
                shell.core.handle_mapping(Instant::now(), detour, remote, result);
            }
            _ = timers.tick() => shell.core.poll_timers(Instant::now()),
            Some(_) = shell.releases.join_next(), if !shell.releases.is_empty() => {}
        }
        shell.drain();
    }

    mptcp_ops::notify::stopping();
    tracing::info!("shutting down: closing detour subflows and releasing mappings");
    shell.core.shutdown();
    shell.drain();
    let released = tokio::time::timeout(RELEASE_WAIT, async {
        let mut confirmed = 0;
        while let Some(done) = shell.releases.join_next().await {
            confirmed += usize::from(done.unwrap_or(false));
        }
        confirmed
    })
    .await;
    match released {
        Ok(confirmed) => tracing::info!(confirmed, "mappings released"),
        Err(_) => tracing::warn!("not every detour confirmed its release in time"),
    }
    drop(pm_guard);
    drop(clamp);
    let _ = stop_tx.send(true);
    if let Some(admin) = admin {
        let _ = tokio::time::timeout(Duration::from_secs(1), admin).await;
    }
    if let Err(error) = tokio::task::spawn_blocking(move || listener.stop())
        .await
        .unwrap_or(Ok(()))
    {
        tracing::warn!(%error, "the mptcp_pm event socket had failed");
    }
    Ok(())
}
