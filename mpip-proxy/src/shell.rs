//! The tokio shell: drives a sans-IO [`Node`] with a TUN device, one UDP
//! socket per path interface, an interface scanner and the node's timers.
//!
//! One task owns the node. Reader tasks (the TUN device, each path socket)
//! hand it packets over one channel; after each batch of inputs the task
//! drains the node's outputs: datagrams to the path sockets, packets to the
//! TUN device, events. [`run_client`] and [`run_proxy_end`] are the two
//! binaries' `run`.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{ClientConfig, CommonConfig, Impairment, ProxyEndConfig};
use crate::metrics::MpipMetrics;
use crate::node::{Datagram, Node, NodeConfig, NodeEvent, HEADROOM};
use crate::offload;
use crate::path_manager::{InterfaceId, PathState};
use crate::scheduler::DispatchSource;
use crate::sys::nat::{Masquerade, NatError};
use crate::sys::netif;
use crate::sys::route::{RouteError, RouteGuard};
use crate::sys::socket::{
    bind_path_socket, gso_unsupported, recv_segments, split_segments, try_enable_gro,
    try_send_segments, MAX_GSO_SEGMENTS,
};
use crate::sys::tun::TunDevice;
use crate::time::Timestamp;
use crate::wire::NodeId;

/// Queue between the reader tasks and the node's task.
const INBOUND_QUEUE: usize = 4096;

/// Inputs handled per wake-up before outputs are flushed.
const BATCH: usize = 256;

/// How often metrics are refreshed from the node.
const METRICS_INTERVAL: Duration = Duration::from_millis(500);

/// Why an MPIP end could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// No node ID configured and no NIC with a MAC address to take one from.
    #[error("node_id = \"auto\" found no network interface with a MAC address; set node_id")]
    NoNodeId,
    /// The TUN device could not be created or configured.
    #[error("TUN device {name}: {source}")]
    Tun {
        /// The device name.
        name: String,
        /// Why.
        source: io::Error,
    },
    /// A route through the TUN device could not be added.
    #[error("route {route} via the tunnel: {source}")]
    Route {
        /// The prefix.
        route: String,
        /// Why.
        source: RouteError,
    },
    /// The gateway's masquerade could not be installed.
    #[error("gateway masquerade: {0}")]
    Nat(#[from] NatError),
    /// The HTTP proxy on the tunnel address failed.
    #[error("HTTP proxy: {0}")]
    Http(#[from] mptcp_proxy::ServerError),
    /// The HTTP proxy's configuration file is unusable.
    #[error("HTTP proxy configuration: {0}")]
    HttpConfig(#[from] mptcp_proxy::config::ConfigError),
    /// The node thread or its runtime could not be started.
    #[error("starting the node thread: {0}")]
    Runtime(io::Error),
    /// The metrics listener could not be bound.
    #[error("metrics listener {address}: {source}")]
    Metrics {
        /// The address.
        address: SocketAddr,
        /// Why.
        source: io::Error,
    },
}

enum Inbound {
    Tun(Vec<u8>),
    Datagram(InterfaceId, SocketAddr, Vec<u8>),
}

/// A configured interface and its path socket.
struct Endpoint {
    id: InterfaceId,
    name: String,
    socket: Option<Arc<UdpSocket>>,
    address: Option<SocketAddr>,
    up: bool,
    reader: Option<JoinHandle<()>>,
    impairment: Option<Impairment>,
    delayed: VecDeque<(Instant, SocketAddr, Vec<u8>)>,
    bind_error_logged: bool,
    /// Whether UDP GSO works on this socket (cleared after the first refusal).
    gso: bool,
}

/// Role-specific reactions to node events.
enum Role {
    Client {
        routes: Vec<ipnet::IpNet>,
        installed: RouteGuard,
    },
    ProxyEnd,
}

struct Driver {
    node: Node<DispatchSource>,
    start: Instant,
    tun: Arc<TunDevice>,
    endpoints: Vec<Endpoint>,
    port: u16,
    inbound: mpsc::Sender<Inbound>,
    metrics: Arc<MpipMetrics>,
    role: Role,
    loss_state: u64,
    last_timer_check: Instant,
    /// Scratch buffer for coalesced TUN writes.
    coalesced: Vec<u8>,
}

fn node_id(common: &CommonConfig) -> Result<NodeId, ShellError> {
    common
        .node_id
        .or_else(|| netif::first_mac_address().map(NodeId))
        .ok_or(ShellError::NoNodeId)
}

fn create_tun(common: &CommonConfig, mtu: u16) -> Result<Arc<TunDevice>, ShellError> {
    let name = common.tun.name.clone();
    let error = |source| ShellError::Tun {
        name: name.clone(),
        source,
    };
    // Offloads (checksum, TSO) when the kernel has them; plain otherwise.
    let tun = match TunDevice::create_with_offload(&name) {
        Ok(tun) => tun,
        Err(error) => {
            tracing::info!(%error, "TUN offloads unavailable; one packet per read");
            TunDevice::create(&name).map_err(|e| ShellError::Tun {
                name: name.clone(),
                source: e,
            })?
        }
    };
    tun.set_mtu(mtu).map_err(error)?;
    tun.set_txqueuelen(1000).map_err(error)?;
    // The tunnel is IPv4 only; without this the kernel sends router
    // solicitations and MLD reports into it as soon as it is up.
    let disable_ipv6 = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tun.name());
    if let Err(error) = std::fs::write(&disable_ipv6, "1") {
        tracing::debug!(%error, "cannot disable IPv6 on the TUN device");
    }
    tun.set_up().map_err(error)?;
    Ok(Arc::new(tun))
}

async fn read_tun(tun: Arc<TunDevice>, mtu: u16, inbound: mpsc::Sender<Inbound>) {
    if tun.vnet_hdr() {
        return read_tun_offload(tun, mtu, inbound).await;
    }
    loop {
        let mut buffer = vec![0u8; HEADROOM + usize::from(mtu) + 64];
        match tun.recv(&mut buffer[HEADROOM..]).await {
            Ok(0) => continue,
            Ok(len) => {
                buffer.truncate(HEADROOM + len);
                if inbound.send(Inbound::Tun(buffer)).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "reading the TUN device failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// The reader of a TUN device with offloads: each read (up to 64 KiB with
/// TSO) is split into MTU-sized packets, each in its own buffer.
async fn read_tun_offload(tun: Arc<TunDevice>, mtu: u16, inbound: mpsc::Sender<Inbound>) {
    let mut read = vec![0u8; offload::MAX_READ];
    let mut packets = Vec::new();
    let mut dropped = 0u64;
    loop {
        match tun.recv(&mut read).await {
            Ok(len) => {
                if let Err(error) =
                    offload::split(&read[..len], usize::from(mtu), HEADROOM, &mut packets)
                {
                    dropped += 1;
                    if dropped == 1 {
                        tracing::warn!(%error, "TUN read dropped (further drops logged at debug)");
                    } else {
                        tracing::debug!(%error, dropped, "TUN read dropped");
                    }
                    continue;
                }
                for packet in packets.drain(..) {
                    if inbound.send(Inbound::Tun(packet)).await.is_err() {
                        return;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "reading the TUN device failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn read_socket(id: InterfaceId, socket: Arc<UdpSocket>, inbound: mpsc::Sender<Inbound>) {
    // With UDP GRO one read may return a batch of datagrams of one size.
    let mut buffer = vec![0u8; 65536];
    loop {
        match recv_segments(&socket, &mut buffer).await {
            Ok(received) => {
                let batch = &buffer[..received.len];
                for datagram in split_segments(batch, received.segment_size) {
                    let datagram = Inbound::Datagram(id, received.source, datagram.to_vec());
                    if inbound.send(datagram).await.is_err() {
                        return;
                    }
                }
            }
            // ICMP errors of earlier sends (port unreachable, network down)
            // surface here; the path manager notices dead paths by silence.
            Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

impl Driver {
    fn new(
        config: NodeConfig,
        common: &CommonConfig,
        port: u16,
        tun: Arc<TunDevice>,
        metrics: Arc<MpipMetrics>,
        role: Role,
        inbound: mpsc::Sender<Inbound>,
    ) -> Self {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = clock ^ u64::from(std::process::id());
        let endpoints = common
            .paths
            .interfaces
            .iter()
            .enumerate()
            .map(|(index, name)| Endpoint {
                id: InterfaceId(index as u32 + 1),
                name: name.clone(),
                socket: None,
                address: None,
                up: false,
                reader: None,
                impairment: common
                    .testing
                    .impairment
                    .iter()
                    .find(|i| i.interface == *name)
                    .cloned(),
                delayed: VecDeque::new(),
                bind_error_logged: false,
                gso: true,
            })
            .collect();
        Driver {
            node: Node::new(config, DispatchSource::new(common.scheduler.dispatch, seed)),
            start: Instant::now(),
            tun,
            endpoints,
            port,
            inbound,
            metrics,
            role,
            loss_state: seed | 1,
            last_timer_check: Instant::now(),
            coalesced: Vec::new(),
        }
    }

    fn now(&self) -> Timestamp {
        Timestamp::from_micros(self.start.elapsed().as_micros() as u64)
    }

    fn instant(&self, at: Timestamp) -> Instant {
        self.start + Duration::from_micros(at.as_micros())
    }

    /// Reads interface state and tells the node what changed.
    fn scan_interfaces(&mut self) {
        let statuses = match netif::scan() {
            Ok(statuses) => statuses,
            Err(error) => {
                tracing::warn!(%error, "listing interfaces failed");
                return;
            }
        };
        let now = self.now();
        for endpoint in &mut self.endpoints {
            let status = statuses.iter().find(|s| s.name == endpoint.name);
            let wanted = status
                .filter(|s| s.up)
                .and_then(|s| s.ipv4.first().copied())
                .map(IpAddr::V4);
            match wanted {
                Some(ip) if endpoint.address.is_some_and(|a| a.ip() == ip) => {
                    if !endpoint.up {
                        endpoint.up = true;
                        tracing::info!(interface = %endpoint.name, "interface up");
                        if let Some(address) = endpoint.address {
                            self.node.handle_interface_up(
                                now,
                                endpoint.id,
                                &endpoint.name,
                                address,
                            );
                        }
                    }
                }
                Some(ip) => {
                    match bind_path_socket(&endpoint.name, SocketAddr::new(ip, self.port)) {
                        Ok(socket) => {
                            if let Err(error) = try_enable_gro(&socket) {
                                tracing::debug!(%error, "UDP GRO unavailable");
                            }
                            let socket = Arc::new(socket);
                            let Ok(local) = socket.local_addr() else {
                                continue;
                            };
                            if let Some(reader) = endpoint.reader.take() {
                                reader.abort();
                            }
                            endpoint.reader = Some(tokio::spawn(read_socket(
                                endpoint.id,
                                socket.clone(),
                                self.inbound.clone(),
                            )));
                            tracing::info!(interface = %endpoint.name, %local, "path socket bound");
                            endpoint.socket = Some(socket);
                            endpoint.address = Some(local);
                            endpoint.up = true;
                            endpoint.bind_error_logged = false;
                            self.node
                                .handle_interface_up(now, endpoint.id, &endpoint.name, local);
                        }
                        Err(error) => {
                            if !std::mem::replace(&mut endpoint.bind_error_logged, true) {
                                tracing::warn!(interface = %endpoint.name, %error, "cannot bind a path socket; retrying");
                            }
                        }
                    }
                }
                None => {
                    if endpoint.up {
                        endpoint.up = false;
                        tracing::info!(interface = %endpoint.name, "interface down");
                        self.node.handle_interface_down(now, endpoint.id);
                    }
                }
            }
        }
    }

    fn handle(&mut self, inbound: Inbound) {
        let now = self.now();
        match inbound {
            Inbound::Tun(buffer) => self.node.handle_tun_packet(now, buffer),
            Inbound::Datagram(id, from, bytes) => self.node.handle_datagram(now, id, from, bytes),
        }
    }

    /// Runs due timers, then drains every output of the node.
    fn flush(&mut self) {
        let instant = Instant::now();
        if instant.duration_since(self.last_timer_check) >= Duration::from_millis(1) {
            self.last_timer_check = instant;
            let now = self.now();
            if self.node.poll_timeout().is_some_and(|due| due <= now) {
                self.node.handle_timeout(now);
            }
        }
        let now = self.now();
        let mut batch = Vec::new();
        while let Some(datagram) = self.node.poll_transmit(now) {
            batch.push(datagram);
        }
        self.send_batch(batch);
        self.write_tun_batch();
        while let Some(event) = self.node.poll_event() {
            self.on_event(event);
        }
        self.send_delayed(Instant::now());
    }

    /// Writes the node's packets to the TUN device. With offloads, runs of
    /// in-order segments of one TCP flow go out as one TSO write, and other
    /// packets behind a zeroed virtio header written in place in front of
    /// them (in the CM block's room, no copy).
    fn write_tun_batch(&mut self) {
        if !self.tun.vnet_hdr() {
            while let Some(packet) = self.node.poll_tun() {
                if self.tun.try_send(packet.packet()).is_err() {
                    self.node.note_send_failed();
                }
            }
            return;
        }
        let mut packets = Vec::new();
        while let Some(mut packet) = self.node.poll_tun() {
            let from = offload::plain_header_before(&mut packet.bytes, packet.start);
            packets.push((packet, from));
        }
        let views: Vec<&[u8]> = packets.iter().map(|(p, _)| p.packet()).collect();
        let mut failed = 0;
        let mut at = 0;
        while at < views.len() {
            let run = offload::coalesce(&views[at..], &mut self.coalesced).max(1);
            let sent = if run > 1 {
                self.tun.try_send(&self.coalesced)
            } else {
                match &packets[at] {
                    (packet, Some(from)) => self.tun.try_send(&packet.bytes[*from..]),
                    (packet, None) => {
                        let mut bytes = vec![0u8; offload::VNET_HDR_LEN];
                        bytes.extend_from_slice(packet.packet());
                        self.tun.try_send(&bytes)
                    }
                }
            };
            if sent.is_err() {
                failed += run;
            }
            at += run;
        }
        for _ in 0..failed {
            self.node.note_send_failed();
        }
    }

    /// Sends the datagrams of one flush: per path, consecutive datagrams of one
    /// size go out in one UDP GSO send (the kernel splits them), the rest one
    /// by one. Order within a path is kept.
    fn send_batch(&mut self, batch: Vec<Datagram>) {
        let mut by_path: Vec<((InterfaceId, SocketAddr), Vec<Datagram>)> = Vec::new();
        for datagram in batch {
            let key = (datagram.interface, datagram.remote);
            match by_path.iter_mut().find(|(k, _)| *k == key) {
                Some((_, list)) => list.push(datagram),
                None => by_path.push((key, vec![datagram])),
            }
        }
        for ((interface, remote), datagrams) in by_path {
            let gso = self
                .endpoints
                .iter()
                .find(|e| e.id == interface)
                .is_some_and(|e| e.gso && e.impairment.is_none() && e.socket.is_some());
            if !gso || datagrams.len() < 2 {
                datagrams.into_iter().for_each(|d| self.send(d));
                continue;
            }
            let mut rest = datagrams.into_iter().peekable();
            while let Some(first) = rest.next() {
                let size = first.bytes.len();
                let mut payload = first.bytes;
                let mut segments = 1;
                // Equal sizes; a shorter one may end the run.
                while segments < MAX_GSO_SEGMENTS
                    && payload.len() + size <= 65_000
                    && rest.peek().is_some_and(|d| d.bytes.len() <= size)
                {
                    let Some(next) = rest.next() else { break };
                    let last = next.bytes.len() < size;
                    payload.extend_from_slice(&next.bytes);
                    segments += 1;
                    if last {
                        break;
                    }
                }
                self.send_segments(interface, remote, payload, size, segments);
            }
        }
    }

    fn send_segments(
        &mut self,
        interface: InterfaceId,
        remote: SocketAddr,
        payload: Vec<u8>,
        size: usize,
        segments: usize,
    ) {
        let Some(endpoint) = self.endpoints.iter_mut().find(|e| e.id == interface) else {
            return;
        };
        let Some(socket) = &endpoint.socket else {
            return;
        };
        let result = if segments == 1 {
            socket.try_send_to(&payload, remote)
        } else {
            let segment = u16::try_from(size).unwrap_or(u16::MAX);
            try_send_segments(socket, remote, &payload, segment)
        };
        match result {
            Ok(_) => {}
            Err(error) if segments > 1 && gso_unsupported(&error) => {
                tracing::info!(interface = %endpoint.name, %error, "UDP GSO refused; sending datagrams one by one");
                endpoint.gso = false;
                for chunk in payload.chunks(size) {
                    if socket.try_send_to(chunk, remote).is_err() {
                        self.node.note_send_failed();
                    }
                }
            }
            Err(_) => {
                for _ in 0..segments {
                    self.node.note_send_failed();
                }
            }
        }
    }

    fn send(&mut self, datagram: Datagram) {
        let Some(endpoint) = self
            .endpoints
            .iter_mut()
            .find(|e| e.id == datagram.interface)
        else {
            return;
        };
        if let Some(impairment) = &endpoint.impairment {
            if impairment.loss_percent > 0 {
                self.loss_state ^= self.loss_state << 13;
                self.loss_state ^= self.loss_state >> 7;
                self.loss_state ^= self.loss_state << 17;
                if self.loss_state % 100 < u64::from(impairment.loss_percent) {
                    return;
                }
            }
            if impairment.delay_ms > 0 {
                let due = Instant::now() + Duration::from_millis(impairment.delay_ms);
                endpoint
                    .delayed
                    .push_back((due, datagram.remote, datagram.bytes));
                return;
            }
        }
        let sent = endpoint
            .socket
            .as_ref()
            .map(|socket| socket.try_send_to(&datagram.bytes, datagram.remote));
        if !matches!(sent, Some(Ok(_))) {
            self.node.note_send_failed();
        }
    }

    fn send_delayed(&mut self, now: Instant) {
        for endpoint in &mut self.endpoints {
            while endpoint
                .delayed
                .front()
                .is_some_and(|(due, _, _)| *due <= now)
            {
                let Some((_, remote, bytes)) = endpoint.delayed.pop_front() else {
                    break;
                };
                if let Some(socket) = &endpoint.socket {
                    let _ = socket.try_send_to(&bytes, remote);
                }
            }
        }
    }

    fn next_wakeup(&self) -> Instant {
        let timer = self
            .node
            .poll_timeout()
            .map_or(Instant::now() + Duration::from_secs(1), |t| self.instant(t));
        self.endpoints
            .iter()
            .filter_map(|e| e.delayed.front().map(|(due, _, _)| *due))
            .fold(timer, Instant::min)
    }

    fn on_event(&mut self, event: NodeEvent) {
        match event {
            NodeEvent::Assigned(assignment) => {
                tracing::info!(
                    address = %assignment.client,
                    prefix_len = assignment.prefix_len,
                    proxy = %assignment.proxy,
                    "tunnel address assigned"
                );
                if let Err(error) = self.tun.set_ipv4(assignment.client, assignment.prefix_len) {
                    tracing::error!(%error, "configuring the tunnel address failed");
                    return;
                }
                if let Role::Client { routes, installed } = &mut self.role {
                    let _ = installed.remove_all();
                    for route in routes.iter() {
                        if let Err(error) = installed.add(*route, self.tun.ifindex()) {
                            tracing::error!(%route, %error, "adding a route via the tunnel failed");
                        }
                    }
                }
            }
            NodeEvent::ClientAssigned { node, address } => {
                tracing::info!(%node, %address, "client node assigned a tunnel address");
            }
            NodeEvent::PoolExhausted { node } => {
                tracing::warn!(%node, "tunnel address pool exhausted; handshake refused");
            }
            NodeEvent::Path { path, node, state } => {
                let state = match state {
                    Some(PathState::Active) => "active",
                    Some(PathState::Dead) => "dead",
                    Some(_) => "probing",
                    None => "removed",
                };
                tracing::info!(path = path.0, %node, state, "path");
            }
        }
    }

    fn update_metrics(&self) {
        self.metrics.update(
            self.node.session_count(),
            self.node.peer_count(),
            &self.node.path_snapshots(),
            self.node.counters(),
        );
    }

    async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        scan_interval: Duration,
        stop: impl Future<Output = ()>,
    ) {
        let mut stop = pin!(stop);
        let mut scan = tokio::time::interval(scan_interval);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut metrics = tokio::time::interval(METRICS_INTERVAL);
        metrics.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let wakeup = tokio::time::Instant::from_std(self.next_wakeup());
            // Not `biased`: under load the channel is never empty, and a fixed
            // order would starve either the packets or the timers, scans and
            // metrics behind them. tokio picks among the ready branches at random.
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep_until(wakeup) => {
                    let now = self.now();
                    self.node.handle_timeout(now);
                }
                _ = scan.tick() => self.scan_interfaces(),
                _ = metrics.tick() => self.update_metrics(),
                received = inbound.recv() => {
                    let Some(received) = received else { break };
                    self.handle(received);
                    for _ in 1..BATCH {
                        match inbound.try_recv() {
                            Ok(received) => self.handle(received),
                            Err(_) => break,
                        }
                    }
                }
            }
            self.flush();
        }
        for endpoint in &mut self.endpoints {
            if let Some(reader) = endpoint.reader.take() {
                reader.abort();
            }
        }
        if let Role::Client { installed, .. } = &mut self.role {
            if let Err(error) = installed.remove_all() {
                tracing::warn!(%error, "removing tunnel routes failed");
            }
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` with `metrics` until `stop`.
async fn serve_metrics(
    address: SocketAddr,
    metrics: Arc<mptcp_proxy::metrics::Metrics>,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, ShellError> {
    let error = |source| ShellError::Metrics { address, source };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(error)?;
    tracing::info!(address = %listener.local_addr().map_err(error)?, "metrics listener (/metrics, /healthz, /readyz)");
    let state = Arc::new(mptcp_proxy::admin::AdminState::new(metrics));
    Ok(tokio::spawn(mptcp_proxy::admin::serve(
        listener, state, stop,
    )))
}

fn registry_with(mpip: &Arc<MpipMetrics>) -> Arc<mptcp_proxy::metrics::Metrics> {
    Arc::new(mptcp_proxy::metrics::Metrics::with_extension(|registry| {
        mpip.register(registry)
    }))
}

/// What the node thread needs.
struct NodeSetup {
    node_config: NodeConfig,
    common: CommonConfig,
    port: u16,
    role: Role,
    metrics: Arc<MpipMetrics>,
    /// Proxy end: the TUN address and prefix length, set before anything else.
    tunnel_address: Option<(std::net::Ipv4Addr, u8)>,
}

/// The node, its TUN device, its path sockets and their reader tasks, all on
/// one thread with a single-threaded runtime: a packet never changes thread
/// between the reader that received it and the socket or TUN write that
/// forwards it.
struct NodeThread {
    tun_name: String,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl NodeThread {
    /// Starts the thread; returns once the TUN device exists (with its
    /// address, on the proxy end), or with the error that prevented it.
    async fn start(setup: NodeSetup) -> Result<NodeThread, ShellError> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<String, ShellError>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("mpip-node".into())
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
                runtime.block_on(run_node(setup, ready_tx, stop_rx));
            })
            .map_err(ShellError::Runtime)?;
        match ready_rx.await {
            Ok(Ok(tun_name)) => Ok(NodeThread {
                tun_name,
                stop: stop_tx,
                thread: spawned,
            }),
            Ok(Err(error)) => {
                let _ = spawned.join();
                Err(error)
            }
            Err(_) => {
                let _ = spawned.join();
                Err(ShellError::Runtime(io::Error::other(
                    "the node thread ended at start",
                )))
            }
        }
    }

    /// Stops the node and waits until its TUN device and routes are gone.
    async fn stop(self) {
        let _ = self.stop.send(());
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

async fn run_node(
    setup: NodeSetup,
    ready: tokio::sync::oneshot::Sender<Result<String, ShellError>>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mtu = setup.node_config.tun_mtu();
    let tun = match create_tun(&setup.common, mtu) {
        Ok(tun) => tun,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    if let Some((address, prefix_len)) = setup.tunnel_address {
        if let Err(source) = tun.set_ipv4(address, prefix_len) {
            let _ = ready.send(Err(ShellError::Tun {
                name: tun.name().to_owned(),
                source,
            }));
            return;
        }
    }
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
    let tun_reader = tokio::spawn(read_tun(tun.clone(), mtu, inbound_tx.clone()));
    let mut driver = Driver::new(
        setup.node_config,
        &setup.common,
        setup.port,
        tun.clone(),
        setup.metrics,
        setup.role,
        inbound_tx,
    );
    driver.scan_interfaces();
    if ready.send(Ok(tun.name().to_owned())).is_err() {
        return;
    }
    driver
        .run(
            inbound_rx,
            Duration::from_millis(setup.common.paths.scan_interval_ms),
            async move {
                let _ = stop.await;
            },
        )
        .await;
    tun_reader.abort();
    let _ = tun_reader.await;
}

/// Runs `mpipd`, the client end, until `shutdown` resolves; then removes the
/// routes it added and the TUN device.
pub async fn run_client(
    config: ClientConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ShellError> {
    let node_config = config.node_config(node_id(&config.common)?);
    tracing::info!(node = %node_config.node_id, "mpipd starting");
    let mpip_metrics = Arc::new(MpipMetrics::default());
    let node = NodeThread::start(NodeSetup {
        node_config,
        common: config.common.clone(),
        port: config.port(),
        role: Role::Client {
            routes: config.routes.clone(),
            installed: RouteGuard::new(),
        },
        metrics: mpip_metrics.clone(),
        tunnel_address: None,
    })
    .await?;
    tracing::info!(
        tun = node.tun_name,
        "tunnel device up; waiting for the handshake"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin = match config.common.metrics.address {
        Some(address) => Some(serve_metrics(address, registry_with(&mpip_metrics), stop_rx).await),
        None => None,
    };
    let admin = match admin.transpose() {
        Ok(admin) => admin,
        Err(error) => {
            node.stop().await;
            return Err(error);
        }
    };
    mptcp_ops::notify::ready("tunnel device up");
    shutdown.await;
    mptcp_ops::notify::stopping();
    node.stop().await;
    let _ = stop_tx.send(true);
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    tracing::info!("mpipd stopped; TUN device and routes removed");
    Ok(())
}

/// Runs `mpip-proxy`, the proxy end, until `shutdown` resolves: the tunnel,
/// the HTTP proxy on the tunnel address and, if enabled, the gateway. On
/// shutdown the HTTP proxy drains first (over the still-running tunnel), then
/// the masquerade table and the TUN device are removed.
pub async fn run_proxy_end(
    config: ProxyEndConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ShellError> {
    let node_config = config.node_config(node_id(&config.common)?);
    tracing::info!(node = %node_config.node_id, pool = %config.tunnel.pool, "mpip-proxy starting");
    let Some((tunnel_address, prefix_len)) = node_config.proxy_tunnel() else {
        unreachable!("a proxy-end node has a tunnel address");
    };
    let mpip_metrics = Arc::new(MpipMetrics::default());
    let node = NodeThread::start(NodeSetup {
        node_config,
        common: config.common.clone(),
        port: config.port(),
        role: Role::ProxyEnd,
        metrics: mpip_metrics.clone(),
        tunnel_address: Some((tunnel_address, prefix_len)),
    })
    .await?;
    tracing::info!(tun = node.tun_name, address = %tunnel_address, prefix_len, "tunnel up");
    let served = serve_proxy_end(
        &config,
        &node.tun_name,
        tunnel_address,
        mpip_metrics,
        shutdown,
    )
    .await;
    node.stop().await;
    tracing::info!("mpip-proxy stopped; TUN device and nftables table removed");
    served
}

/// The proxy end's services on the tunnel: gateway and HTTP proxy (or the
/// metrics listener alone), until `shutdown`.
async fn serve_proxy_end(
    config: &ProxyEndConfig,
    tun_name: &str,
    tunnel_address: std::net::Ipv4Addr,
    mpip_metrics: Arc<MpipMetrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ShellError> {
    let table = format!("mpip_proxy_{tun_name}");
    let masquerade = if config.gateway.enabled {
        let installed = Masquerade::install(&table, config.tunnel.pool, tun_name)?;
        tracing::info!(table, "gateway on: clients' other traffic is masqueraded");
        Some(installed)
    } else {
        None
    };
    let registry = registry_with(&mpip_metrics);
    let (http_stop_tx, http_stop_rx) = watch::channel(false);
    let service = if config.http.port != 0 {
        let mut http_config = match &config.http.config {
            Some(path) => mptcp_proxy::Config::from_file(path)?,
            None => mptcp_proxy::Config::embedded()?,
        };
        let mut listener = mptcp_proxy::config::ListenerConfig::forward(SocketAddr::new(
            IpAddr::V4(tunnel_address),
            config.http.port,
        ));
        // MPIP clients reach it with plain TCP inside the tunnel.
        listener.mptcp = false;
        http_config.listeners = vec![listener];
        http_config.metrics.address = config.common.metrics.address;
        let server = mptcp_proxy::Server::bind_with_metrics(http_config, registry)?;
        let mut stop = http_stop_rx;
        Some(tokio::spawn(server.serve(async move {
            let _ = stop.changed().await;
        })))
    } else {
        match config.common.metrics.address {
            Some(address) => {
                let admin = serve_metrics(address, registry, http_stop_rx).await?;
                // Without the HTTP core (which tells systemd itself), ready once the tunnel serves.
                mptcp_ops::notify::ready("tunnel up");
                Some(tokio::spawn(async move {
                    let _ = admin.await;
                    Ok(())
                }))
            }
            None => None,
        }
    };
    let mut result = Ok(());
    match service {
        Some(mut service) => {
            tokio::select! {
                () = shutdown => {
                    let _ = http_stop_tx.send(true);
                    result = flatten(service.await);
                }
                finished = &mut service => result = flatten(finished),
            }
        }
        None => shutdown.await,
    }
    if let Some(masquerade) = masquerade {
        masquerade.remove()?;
    }
    result.map_err(ShellError::from)
}

fn flatten(
    joined: Result<Result<(), mptcp_proxy::ServerError>, tokio::task::JoinError>,
) -> Result<(), mptcp_proxy::ServerError> {
    match joined {
        Ok(result) => result,
        Err(error) => {
            tracing::error!(%error, "the HTTP proxy task failed");
            Ok(())
        }
    }
}
