//! The supervisor: starts the shards (threads) with their TUN queues, scans
//! the configured interfaces, binds one socket per shard on each (an
//! `SO_REUSEPORT` group steered by node ID) and hands them out, and passes
//! reloads and routing switches to every shard.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::shard::{read_tun, Control, Inbound, Shard, ShardRole, INBOUND_QUEUE};
use super::ShellError;
use crate::config::CommonConfig;
use crate::metrics::MpipMetrics;
use crate::node::NodeConfig;
use crate::path_manager::InterfaceId;
use crate::routing::RoutingTable;
use crate::sys::netif;
use crate::sys::socket::bind_path_socket_group;
use crate::sys::tun::TunDevice;

/// What starting the shards needs.
pub struct Setup {
    /// The node configuration (the shard index is set per shard).
    pub node_config: NodeConfig,
    /// The common configuration (TUN name, interfaces, scheduler draws).
    pub common: CommonConfig,
    /// The UDP port of the path sockets (0: any).
    pub port: u16,
    /// Threads: 1 for the client.
    pub shards: usize,
    /// The client's routes through the tunnel; `None` on the proxy end.
    pub client_routes: Option<Vec<ipnet::IpNet>>,
    /// Proxy end: the TUN address and prefix length, set before anything else.
    pub tunnel_address: Option<(std::net::Ipv4Addr, u8)>,
    /// The metrics every shard updates.
    pub metrics: Arc<MpipMetrics>,
}

struct ShardHandle {
    control: mpsc::UnboundedSender<Control>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A configured interface as last scanned.
#[derive(Debug)]
struct Interface {
    id: InterfaceId,
    address: Option<SocketAddr>,
    up: bool,
    bind_error_logged: bool,
}

/// The running shards and the interfaces they use.
pub struct Supervisor {
    shards: Vec<ShardHandle>,
    tun_name: String,
    port: u16,
    /// Configured interfaces, in configuration order.
    interfaces: BTreeMap<String, Interface>,
    order: Vec<String>,
    next_id: u32,
}

impl Supervisor {
    /// Starts the shards one by one (the first creates and configures the
    /// TUN device, the others attach queues to it, the last sets the
    /// steering program) and returns once all run, or with the error that
    /// stopped one (the started ones are stopped again).
    pub async fn start(setup: Setup) -> Result<Supervisor, ShellError> {
        let count = setup.shards.max(1);
        let mut senders = Vec::with_capacity(count);
        let mut receivers = Vec::with_capacity(count);
        for _ in 0..count {
            let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
            senders.push(tx);
            receivers.push(rx);
        }
        let peers = Arc::new(senders);
        let mut supervisor = Supervisor {
            shards: Vec::with_capacity(count),
            tun_name: setup.common.tun.name.clone(),
            port: setup.port,
            interfaces: BTreeMap::new(),
            order: Vec::new(),
            next_id: 1,
        };
        supervisor.set_interfaces(&setup.common.paths.interfaces);
        let mut offload = None;
        for (index, inbound) in receivers.into_iter().enumerate() {
            let started = start_shard(
                &setup,
                index as u32,
                count as u32,
                supervisor.tun_name.clone(),
                offload,
                peers.clone(),
                inbound,
            )
            .await;
            match started {
                Ok((handle, name, vnet_hdr)) => {
                    supervisor.tun_name = name;
                    offload = Some(vnet_hdr);
                    supervisor.shards.push(handle);
                }
                Err(error) => {
                    supervisor.stop().await;
                    return Err(error);
                }
            }
        }
        supervisor.scan();
        Ok(supervisor)
    }

    /// The TUN device's name.
    pub fn tun_name(&self) -> &str {
        &self.tun_name
    }

    /// Makes `names` the configured interfaces: new ones get an ID (and a
    /// socket at the next scan), dropped ones are removed from every shard.
    pub fn set_interfaces(&mut self, names: &[String]) {
        let gone: Vec<String> = self
            .order
            .iter()
            .filter(|n| !names.contains(n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(interface) = self.interfaces.remove(&name) {
                tracing::info!(interface = %name, "interface no longer configured");
                self.broadcast(|| Control::Removed(interface.id));
            }
        }
        for name in names {
            if !self.interfaces.contains_key(name) {
                let id = InterfaceId(self.next_id);
                self.next_id += 1;
                self.interfaces.insert(
                    name.clone(),
                    Interface {
                        id,
                        address: None,
                        up: false,
                        bind_error_logged: false,
                    },
                );
            }
        }
        self.order = names.to_vec();
    }

    fn broadcast(&self, control: impl Fn() -> Control) {
        for shard in &self.shards {
            let _ = shard.control.send(control());
        }
    }

    /// A sender of controls to every shard (for the routing profile switch).
    pub fn routing_sender(&self) -> RoutingSender {
        RoutingSender {
            shards: self.shards.iter().map(|s| s.control.clone()).collect(),
        }
    }

    /// Reads interface state and tells the shards what changed: a new
    /// address gets a new socket group.
    pub fn scan(&mut self) {
        let statuses = match netif::scan() {
            Ok(statuses) => statuses,
            Err(error) => {
                tracing::warn!(%error, "listing interfaces failed");
                return;
            }
        };
        let count = self.shards.len();
        for name in self.order.clone() {
            let Some(interface) = self.interfaces.get_mut(&name) else {
                continue;
            };
            let status = statuses.iter().find(|s| s.name == name);
            let wanted = status
                .filter(|s| s.up)
                .and_then(|s| s.ipv4.first().copied())
                .map(IpAddr::V4);
            match wanted {
                Some(ip) if interface.address.is_some_and(|a| a.ip() == ip) => {
                    if !interface.up {
                        interface.up = true;
                        tracing::info!(interface = %name, "interface up");
                        let (id, address) = (interface.id, interface.address);
                        if let Some(address) = address {
                            self.broadcast(|| Control::Up {
                                id,
                                name: name.clone(),
                                address,
                                socket: None,
                            });
                        }
                    }
                }
                Some(ip) => {
                    match bind_path_socket_group(&name, SocketAddr::new(ip, self.port), count) {
                        Ok(sockets) => {
                            let Ok(local) = sockets[0].local_addr() else {
                                continue;
                            };
                            tracing::info!(interface = %name, %local, shards = count, "path sockets bound");
                            interface.address = Some(local);
                            interface.up = true;
                            interface.bind_error_logged = false;
                            let id = interface.id;
                            for (shard, socket) in self.shards.iter().zip(sockets) {
                                let _ = shard.control.send(Control::Up {
                                    id,
                                    name: name.clone(),
                                    address: local,
                                    socket: Some(socket),
                                });
                            }
                        }
                        Err(error) => {
                            if !std::mem::replace(&mut interface.bind_error_logged, true) {
                                tracing::warn!(interface = %name, %error, "cannot bind path sockets; retrying");
                            }
                        }
                    }
                }
                None => {
                    if interface.up {
                        interface.up = false;
                        tracing::info!(interface = %name, "interface down");
                        let id = interface.id;
                        self.broadcast(|| Control::Down(id));
                    }
                }
            }
        }
    }

    /// Hands each shard its node configuration of a reload; returns the
    /// first refusal (nothing is partially refused: every shard checks the
    /// same things first).
    pub async fn reconfigure(&self, config: &NodeConfig) -> Result<(), String> {
        let mut answers = Vec::new();
        for (index, shard) in self.shards.iter().enumerate() {
            let mut config = config.clone();
            config.shard = (index as u32, self.shards.len() as u32);
            let (tx, rx) = oneshot::channel();
            if shard
                .control
                .send(Control::Reconfigure(Box::new(config), tx))
                .is_ok()
            {
                answers.push(rx);
            }
        }
        let mut result = Ok(());
        for answer in answers {
            if let Ok(Err(error)) = answer.await {
                result = Err(error);
            }
        }
        result
    }

    /// Stops every shard and waits until their TUN queues (and with the
    /// last, the device and its routes) are gone.
    pub async fn stop(&mut self) {
        for shard in &mut self.shards {
            if let Some(stop) = shard.stop.take() {
                let _ = stop.send(());
            }
        }
        for shard in &mut self.shards {
            if let Some(thread) = shard.thread.take() {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
            }
        }
    }
}

/// Sends routing switches to every shard; cheap to clone.
#[derive(Debug, Clone)]
pub struct RoutingSender {
    shards: Vec<mpsc::UnboundedSender<Control>>,
}

impl RoutingSender {
    /// Makes `table` the routing table of every shard.
    pub fn switch(&self, table: &RoutingTable) {
        for shard in &self.shards {
            let _ = shard.send(Control::Routing(table.clone()));
        }
    }
}

/// Opens this shard's TUN queue: the first creates the device (with
/// offloads if the kernel has them) and configures it; the others attach
/// with the same flags.
fn open_queue(
    setup: &Setup,
    name: &str,
    index: u32,
    count: u32,
    offload: Option<bool>,
) -> Result<Arc<TunDevice>, ShellError> {
    let error = |source| ShellError::Tun {
        name: name.to_owned(),
        source,
    };
    let open = |offload: bool| {
        if count > 1 {
            TunDevice::create_queue(name, offload)
        } else if offload {
            TunDevice::create_with_offload(name)
        } else {
            TunDevice::create(name)
        }
    };
    let tun = match offload {
        Some(offload) => open(offload).map_err(error)?,
        None => match open(true) {
            Ok(tun) => tun,
            Err(e) => {
                tracing::info!(error = %e, "TUN offloads unavailable; one packet per read");
                open(false).map_err(error)?
            }
        },
    };
    if index == 0 {
        let error = |source| ShellError::Tun {
            name: tun.name().to_owned(),
            source,
        };
        tun.set_mtu(setup.node_config.tun_mtu()).map_err(error)?;
        tun.set_txqueuelen(1000).map_err(error)?;
        // The tunnel is IPv4 only; without this the kernel sends router
        // solicitations and MLD reports into it as soon as it is up.
        let disable_ipv6 = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tun.name());
        if let Err(error) = std::fs::write(&disable_ipv6, "1") {
            tracing::debug!(%error, "cannot disable IPv6 on the TUN device");
        }
        if let Some((address, prefix_len)) = setup.tunnel_address {
            tun.set_ipv4(address, prefix_len).map_err(error)?;
        }
        tun.set_up().map_err(error)?;
    }
    if count > 1 && index == count - 1 {
        // Every queue is attached: steer the device's packets by tunnel address.
        let steered = crate::sys::bpf::load_tun_steering(count)
            .and_then(|program| crate::sys::bpf::set_tun_steering(&tun, &program));
        match steered {
            Ok(()) => tracing::info!(shards = count, "TUN queues steered by tunnel address"),
            Err(error) => {
                tracing::warn!(%error, "TUN steering program refused; shards hand packets over")
            }
        }
    }
    Ok(Arc::new(tun))
}

/// Starts shard `index`: its thread, runtime, TUN queue and loop; returns
/// its handle, the TUN device's name and whether it has offloads.
async fn start_shard(
    setup: &Setup,
    index: u32,
    count: u32,
    tun_name: String,
    offload: Option<bool>,
    peers: Arc<Vec<mpsc::Sender<Inbound>>>,
    inbound: mpsc::Receiver<Inbound>,
) -> Result<(ShardHandle, String, bool), ShellError> {
    let (ready_tx, ready_rx) = oneshot::channel::<Result<(String, bool), ShellError>>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let node_config = setup.node_config.clone();
    let dispatch = setup.common.scheduler.dispatch;
    let metrics = setup.metrics.clone();
    let role = match &setup.client_routes {
        Some(routes) => ShardRole::Client {
            routes: routes.clone(),
            installed: crate::sys::route::RouteGuard::new(),
        },
        None => ShardRole::ProxyEnd,
    };
    let queue_setup = Setup {
        node_config: setup.node_config.clone(),
        common: setup.common.clone(),
        port: setup.port,
        shards: setup.shards,
        client_routes: None,
        tunnel_address: setup.tunnel_address,
        metrics: setup.metrics.clone(),
    };
    let thread = std::thread::Builder::new()
        .name(format!("mpip-shard-{index}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(source) => {
                    let _ = ready_tx.send(Err(ShellError::Runtime(source)));
                    return;
                }
            };
            runtime.block_on(async move {
                let tun = match open_queue(&queue_setup, &tun_name, index, count, offload) {
                    Ok(tun) => tun,
                    Err(error) => {
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                };
                let mtu = node_config.tun_mtu();
                let headroom = node_config.headroom();
                let own = peers[index as usize].clone();
                let tun_reader = tokio::spawn(read_tun(tun.clone(), mtu, headroom, own));
                let shard = Shard::new(
                    index,
                    count,
                    node_config,
                    dispatch,
                    tun.clone(),
                    peers,
                    metrics,
                    role,
                );
                if ready_tx
                    .send(Ok((tun.name().to_owned(), tun.vnet_hdr())))
                    .is_err()
                {
                    return;
                }
                shard.run(inbound, control_rx, tun_reader, stop_rx).await;
            });
        })
        .map_err(ShellError::Runtime)?;
    match ready_rx.await {
        Ok(Ok((name, vnet_hdr))) => Ok((
            ShardHandle {
                control: control_tx,
                stop: Some(stop_tx),
                thread: Some(thread),
            },
            name,
            vnet_hdr,
        )),
        Ok(Err(error)) => {
            let _ = thread.join();
            Err(error)
        }
        Err(_) => {
            let _ = thread.join();
            Err(ShellError::Runtime(std::io::Error::other(
                "a shard thread ended at start",
            )))
        }
    }
}
