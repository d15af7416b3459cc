//! One shard: a thread with a single-threaded tokio runtime that owns one
//! sans-IO [`Node`], one TUN queue and one socket per path interface.
//!
//! Reader tasks (the TUN queue, each socket) hand it inputs over one
//! channel; after each batch of inputs it drains the node's outputs:
//! datagrams to the path sockets (UDP GSO where runs of equal size allow),
//! packets to the TUN queue (coalesced into TSO writes where the device has
//! offloads), events. A packet never changes thread between the reader that
//! received it and the write that forwards it, unless it arrived at the
//! wrong shard (a steering program could not be attached): then it is handed
//! to the shard that owns its node or address ([`shard_of_node`],
//! [`shard_of_address`]).

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::metrics::MpipMetrics;
use crate::node::{shard_of_address, shard_of_node, Datagram, Node, NodeConfig, NodeEvent};
use crate::offload;
use crate::path_manager::{InterfaceId, PathState};
use crate::routing::RoutingTable;
use crate::scheduler::DispatchSource;
use crate::sys::route::RouteGuard;
use crate::sys::socket::{
    gso_unsupported, recv_segments, split_segments, try_enable_gro, try_send_segments,
    MAX_GSO_SEGMENTS,
};
use crate::sys::tun::TunDevice;
use crate::time::Timestamp;
use crate::wire::NodeId;

/// Queue between the reader tasks and the shard's loop.
pub const INBOUND_QUEUE: usize = 4096;

/// Inputs handled per wake-up before outputs are flushed.
const BATCH: usize = 256;

/// How often metrics are refreshed from the node.
const METRICS_INTERVAL: Duration = Duration::from_millis(500);

/// An input of a shard.
#[derive(Debug)]
pub enum Inbound {
    /// A packet read from the TUN device, at `buffer[headroom..]`.
    Tun(Vec<u8>),
    /// A datagram received on the socket of an interface, from a source.
    Datagram(InterfaceId, SocketAddr, Vec<u8>),
}

/// What the supervisor tells a shard.
#[derive(Debug)]
pub enum Control {
    /// An interface is up with this address; `socket` is this shard's (a
    /// new one when the address changed).
    Up {
        /// The interface.
        id: InterfaceId,
        /// Its name.
        name: String,
        /// The bound UDP endpoint.
        address: SocketAddr,
        /// This shard's socket, or `None` when only the link came back.
        socket: Option<std::net::UdpSocket>,
    },
    /// The interface went down (or lost its address).
    Down(InterfaceId),
    /// The interface is no longer configured.
    Removed(InterfaceId),
    /// A configuration reload; the answer says whether the node took it.
    Reconfigure(Box<NodeConfig>, oneshot::Sender<Result<(), String>>),
    /// A routing profile switch.
    Routing(RoutingTable),
}

/// Role-specific reactions to node events.
pub enum ShardRole {
    /// `mpipd`: configures the assigned address and routes on the TUN device.
    Client {
        /// Prefixes routed through the tunnel.
        routes: Vec<ipnet::IpNet>,
        /// What was installed.
        installed: RouteGuard,
    },
    /// A shard of the proxy end.
    ProxyEnd,
}

struct Endpoint {
    name: String,
    socket: Arc<UdpSocket>,
    reader: JoinHandle<()>,
    /// Whether UDP GSO works on this socket (cleared after the first refusal).
    gso: bool,
}

/// A shard's loop and state.
pub struct Shard {
    index: u32,
    count: u32,
    node: Node<DispatchSource>,
    start: Instant,
    tun: Arc<TunDevice>,
    endpoints: std::collections::BTreeMap<InterfaceId, Endpoint>,
    /// Every shard's input channel, this one's included (hand-over).
    peers: Arc<Vec<mpsc::Sender<Inbound>>>,
    metrics: Arc<MpipMetrics>,
    role: ShardRole,
    last_timer_check: Instant,
    /// Scratch buffer for coalesced TUN writes.
    coalesced: Vec<u8>,
}

impl Shard {
    /// A shard `index` of `count` running `config` with `tun` (its queue).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: u32,
        count: u32,
        mut config: NodeConfig,
        dispatch: crate::scheduler::Dispatch,
        tun: Arc<TunDevice>,
        peers: Arc<Vec<mpsc::Sender<Inbound>>>,
        metrics: Arc<MpipMetrics>,
        role: ShardRole,
    ) -> Self {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = clock ^ u64::from(std::process::id()) ^ u64::from(index).rotate_left(40);
        // Authentication counters continue from the wall clock (µs), so they
        // keep growing across restarts; nonces need bits nobody can guess.
        config.auth.counter_base = clock / 1000;
        config.auth.entropy = super::random_u64().unwrap_or(seed);
        config.shard = (index, count);
        Shard {
            index,
            count,
            node: Node::new(config, DispatchSource::new(dispatch, seed)),
            start: Instant::now(),
            tun,
            endpoints: std::collections::BTreeMap::new(),
            peers,
            metrics,
            role,
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

    /// The shard an input belongs to, if not this one.
    fn owner(&self, inbound: &Inbound) -> Option<u32> {
        if self.count <= 1 {
            return None;
        }
        let owner = match inbound {
            Inbound::Datagram(_, _, bytes) => {
                let id = bytes.get(2..8)?;
                shard_of_node(NodeId(id.try_into().ok()?), self.count)
            }
            Inbound::Tun(buffer) => {
                let packet = buffer.get(self.node.headroom()..)?;
                if packet.first()? >> 4 != 4 || packet.len() < 20 {
                    return None;
                }
                let destination =
                    std::net::Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
                shard_of_address(destination, self.count)
            }
        };
        (owner != self.index).then_some(owner)
    }

    fn handle(&mut self, inbound: Inbound) {
        if let Some(owner) = self.owner(&inbound) {
            self.metrics.note_handover();
            let handed = self
                .peers
                .get(owner as usize)
                .is_some_and(|peer| peer.try_send(inbound).is_ok());
            if !handed {
                self.node.note_send_failed();
            }
            return;
        }
        let now = self.now();
        match inbound {
            Inbound::Tun(buffer) => self.node.handle_tun_packet(now, buffer),
            Inbound::Datagram(id, from, bytes) => self.node.handle_datagram(now, id, from, bytes),
        }
    }

    fn on_control(&mut self, control: Control) {
        let now = self.now();
        match control {
            Control::Up {
                id,
                name,
                address,
                socket,
            } => {
                if let Some(socket) = socket {
                    match UdpSocket::from_std(socket) {
                        Ok(socket) => {
                            if let Err(error) = try_enable_gro(&socket) {
                                tracing::debug!(%error, "UDP GRO unavailable");
                            }
                            let socket = Arc::new(socket);
                            let reader =
                                tokio::spawn(read_socket(id, socket.clone(), self.own_inbound()));
                            if let Some(old) = self.endpoints.insert(
                                id,
                                Endpoint {
                                    name: name.clone(),
                                    socket,
                                    reader,
                                    gso: true,
                                },
                            ) {
                                old.reader.abort();
                            }
                        }
                        Err(error) => {
                            tracing::warn!(interface = %name, %error, "path socket unusable");
                            return;
                        }
                    }
                }
                self.node.handle_interface_up(now, id, &name, address);
            }
            Control::Down(id) => self.node.handle_interface_down(now, id),
            Control::Removed(id) => {
                if let Some(endpoint) = self.endpoints.remove(&id) {
                    endpoint.reader.abort();
                }
                self.node.remove_interface(now, id);
            }
            Control::Reconfigure(config, answer) => {
                let _ = answer.send(self.node.reconfigure(now, &config));
            }
            Control::Routing(table) => self.node.set_routing(table),
        }
    }

    fn own_inbound(&self) -> mpsc::Sender<Inbound> {
        self.peers[self.index as usize].clone()
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
            let gso = self.endpoints.get(&interface).is_some_and(|e| e.gso);
            if !gso || datagrams.len() < 2 {
                for datagram in datagrams {
                    self.send_segments(interface, remote, datagram.bytes, 0, 1);
                }
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
        let Some(endpoint) = self.endpoints.get_mut(&interface) else {
            self.node.note_send_failed();
            return;
        };
        let socket = &endpoint.socket;
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
                let mut failed = 0;
                for chunk in payload.chunks(size) {
                    if socket.try_send_to(chunk, remote).is_err() {
                        failed += 1;
                    }
                }
                for _ in 0..failed {
                    self.node.note_send_failed();
                }
            }
            Err(_) => {
                for _ in 0..segments {
                    self.node.note_send_failed();
                }
            }
        }
    }

    fn next_wakeup(&self) -> Instant {
        self.node
            .poll_timeout()
            .map_or(Instant::now() + Duration::from_secs(1), |t| self.instant(t))
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
                if let ShardRole::Client { routes, installed } = &mut self.role {
                    let _ = installed.remove_all();
                    for route in routes.iter() {
                        if let Err(error) = installed.add(*route, self.tun.ifindex()) {
                            tracing::error!(%route, %error, "adding a route via the tunnel failed");
                        }
                    }
                }
            }
            NodeEvent::ClientAssigned { node, address } => {
                tracing::info!(%node, %address, shard = self.index, "client node assigned a tunnel address");
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
                tracing::debug!(path = path.0, %node, state, "path");
            }
        }
    }

    fn update_metrics(&self) {
        self.metrics.update(
            self.index as usize,
            self.node.session_count(),
            self.node.peer_count(),
            &self.node.path_snapshots(),
            self.node.counters(),
        );
    }

    /// Runs until `stop` or until every sender of `inbound` and `control` is
    /// gone; then stops the readers and, on the client, removes its routes.
    pub async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut control: mpsc::UnboundedReceiver<Control>,
        tun_reader: JoinHandle<()>,
        stop: oneshot::Receiver<()>,
    ) {
        let mut stop = pin!(stop);
        let mut metrics = tokio::time::interval(METRICS_INTERVAL);
        metrics.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            let wakeup = tokio::time::Instant::from_std(self.next_wakeup());
            // Not `biased`: under load the channel is never empty, and a fixed
            // order would starve either the packets or the timers, controls and
            // metrics behind them. tokio picks among the ready branches at random.
            tokio::select! {
                _ = &mut stop => break,
                () = tokio::time::sleep_until(wakeup) => {
                    let now = self.now();
                    self.node.handle_timeout(now);
                }
                _ = metrics.tick() => self.update_metrics(),
                message = control.recv() => match message {
                    Some(message) => self.on_control(message),
                    None => break,
                },
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
        self.update_metrics();
        tun_reader.abort();
        for endpoint in std::mem::take(&mut self.endpoints).into_values() {
            endpoint.reader.abort();
        }
        if let ShardRole::Client { installed, .. } = &mut self.role {
            if let Err(error) = installed.remove_all() {
                tracing::warn!(%error, "removing tunnel routes failed");
            }
        }
    }
}

/// Reads the TUN queue into the shard's channel.
pub async fn read_tun(
    tun: Arc<TunDevice>,
    mtu: u16,
    headroom: usize,
    inbound: mpsc::Sender<Inbound>,
) {
    if tun.vnet_hdr() {
        return read_tun_offload(tun, mtu, headroom, inbound).await;
    }
    loop {
        let mut buffer = vec![0u8; headroom + usize::from(mtu) + 64];
        match tun.recv(&mut buffer[headroom..]).await {
            Ok(0) => continue,
            Ok(len) => {
                buffer.truncate(headroom + len);
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
async fn read_tun_offload(
    tun: Arc<TunDevice>,
    mtu: u16,
    headroom: usize,
    inbound: mpsc::Sender<Inbound>,
) {
    let mut read = vec![0u8; offload::MAX_READ];
    let mut packets = Vec::new();
    let mut dropped = 0u64;
    loop {
        match tun.recv(&mut read).await {
            Ok(len) => {
                if let Err(error) =
                    offload::split(&read[..len], usize::from(mtu), headroom, &mut packets)
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
