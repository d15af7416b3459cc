//! The simulated lab shared by the node-level simulations: a client node
//! and a proxy-end node joined by two links with a simulated clock.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use mpip_proxy::node::{Node, NodeConfig, Role};
use mpip_proxy::packet::build;
use mpip_proxy::path_manager::{InterfaceId, PathState};
use mpip_proxy::routing::RoutingTable;
use mpip_proxy::scheduler::SplitMix64;
use mpip_proxy::time::Timestamp;
use mpip_proxy::wire::NodeId;

pub const CLIENT_ID: NodeId = NodeId([2, 0, 0, 0, 0, 0xc1]);
pub const PROXY_ID: NodeId = NodeId([2, 0, 0, 0, 0, 0x01]);
pub const CLIENT_TUN: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
pub const PROXY_TUN: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);

pub fn client_addr(link: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, link, 2)), 5000)
}

pub fn proxy_addr(link: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, link, 1)), 4789)
}

pub struct InFlight {
    pub arrive: Timestamp,
    pub to_proxy: bool,
    pub link: u8,
    pub from: SocketAddr,
    pub bytes: Vec<u8>,
}

/// Two links; link `k` joins client interface `k` and proxy interface `k`.
/// Datagrams sent to an address not on the sending interface's link are lost,
/// as with `SO_BINDTODEVICE` sockets on separate veths.
pub struct Lab {
    pub now: Timestamp,
    pub client: Node<SplitMix64>,
    pub proxy: Node<SplitMix64>,
    pub delay: [Duration; 2],
    pub loss_percent: [u64; 2],
    pub link_up: [bool; 2],
    pub wire: Vec<InFlight>,
    pub loss_rng: u64,
    /// Inner packets the client's and the proxy's TUN received.
    pub client_tun: Vec<Vec<u8>>,
    pub proxy_tun: Vec<Vec<u8>>,
    /// Datagrams each link carried toward the client and toward the proxy.
    pub carried: [[u64; 2]; 2],
    /// With `record`, every datagram put on a link, lost or not: (toward the
    /// proxy, link, source, bytes), for replay tests.
    pub record: bool,
    pub recorded: Vec<(bool, u8, SocketAddr, Vec<u8>)>,
}

impl Lab {
    pub fn new(client_routing: RoutingTable, proxy_routing: RoutingTable, pool: &str) -> Lab {
        let (client, proxy) = Lab::configs(pool);
        let mut client = client;
        client.routing = client_routing;
        let mut proxy = proxy;
        proxy.routing = proxy_routing;
        Lab::with_configs(client, proxy)
    }

    /// The default client and proxy-end configurations of the lab.
    pub fn configs(pool: &str) -> (NodeConfig, NodeConfig) {
        let client = NodeConfig::new(
            CLIENT_ID,
            Role::Client {
                proxy_endpoints: vec![proxy_addr(1), proxy_addr(2)],
            },
        );
        let proxy = NodeConfig::new(
            PROXY_ID,
            Role::Proxy {
                pool: pool.parse().unwrap(),
            },
        );
        (client, proxy)
    }

    /// A lab of a client and a proxy end configured as given.
    pub fn with_configs(client_config: NodeConfig, proxy_config: NodeConfig) -> Lab {
        let mut lab = Lab {
            now: Timestamp::from_secs(100),
            client: Node::new(client_config, SplitMix64::new(1)),
            proxy: Node::new(proxy_config, SplitMix64::new(2)),
            delay: [Duration::from_millis(10), Duration::from_millis(20)],
            loss_percent: [0, 0],
            link_up: [true, true],
            wire: Vec::new(),
            loss_rng: 7,
            client_tun: Vec::new(),
            proxy_tun: Vec::new(),
            carried: [[0; 2]; 2],
            record: false,
            recorded: Vec::new(),
        };
        let now = lab.now;
        for link in 1..=2u8 {
            let name = format!("p{link}");
            lab.proxy
                .handle_interface_up(now, InterfaceId(link.into()), &name, proxy_addr(link));
            let name = format!("c{link}");
            lab.client
                .handle_interface_up(now, InterfaceId(link.into()), &name, client_addr(link));
        }
        lab
    }

    pub fn lost(&mut self, link: u8) -> bool {
        let index = usize::from(link - 1);
        if !self.link_up[index] {
            return true;
        }
        self.loss_rng = self
            .loss_rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.loss_rng >> 33) % 100 < self.loss_percent[index]
    }

    pub fn flush_outputs(&mut self) {
        let now = self.now;
        for to_proxy in [true, false] {
            loop {
                let node = if to_proxy {
                    &mut self.client
                } else {
                    &mut self.proxy
                };
                let Some(datagram) = node.poll_transmit(now) else {
                    break;
                };
                let link = u8::try_from(datagram.interface.0).unwrap();
                let (from, expected) = if to_proxy {
                    (client_addr(link), proxy_addr(link))
                } else {
                    (proxy_addr(link), client_addr(link))
                };
                if self.record && datagram.remote == expected {
                    self.recorded
                        .push((to_proxy, link, from, datagram.bytes.clone()));
                }
                if datagram.remote != expected || self.lost(link) {
                    continue;
                }
                self.carried[usize::from(link - 1)][usize::from(to_proxy)] += 1;
                self.wire.push(InFlight {
                    arrive: now + self.delay[usize::from(link - 1)],
                    to_proxy,
                    link,
                    from,
                    bytes: datagram.bytes,
                });
            }
        }
        while let Some(packet) = self.client.poll_tun() {
            self.client_tun.push(packet.packet().to_vec());
        }
        while let Some(packet) = self.proxy.poll_tun() {
            self.proxy_tun.push(packet.packet().to_vec());
        }
    }

    /// Advances the clock by `duration` in 1 ms steps.
    pub fn run(&mut self, duration: Duration) {
        let end = self.now + duration;
        while self.now < end {
            self.now += Duration::from_millis(1);
            self.step();
        }
    }

    pub fn step(&mut self) {
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.wire)
            .into_iter()
            .partition(|f| f.arrive <= now);
        self.wire = later;
        for datagram in due {
            let interface = InterfaceId(datagram.link.into());
            let node = if datagram.to_proxy {
                &mut self.proxy
            } else {
                &mut self.client
            };
            node.handle_datagram(now, interface, datagram.from, datagram.bytes);
        }
        for node in [&mut self.client, &mut self.proxy] {
            if node.poll_timeout().is_some_and(|t| t <= now) {
                node.handle_timeout(now);
            }
        }
        self.flush_outputs();
    }

    pub fn send_from_client(&mut self, packet: &[u8]) {
        let mut buffer = vec![0u8; self.client.headroom()];
        buffer.extend_from_slice(packet);
        self.client.handle_tun_packet(self.now, buffer);
        self.flush_outputs();
    }

    pub fn send_from_proxy(&mut self, packet: &[u8]) {
        let mut buffer = vec![0u8; self.proxy.headroom()];
        buffer.extend_from_slice(packet);
        self.proxy.handle_tun_packet(self.now, buffer);
        self.flush_outputs();
    }

    /// The state of the path over link `k` (interface `c<k>` or `p<k>`); the
    /// cross pairs (c1 to p2's address, ...) never work here.
    pub fn path_state(node: &Node<SplitMix64>, interface: &str) -> Option<PathState> {
        let link: u8 = interface[1..].parse().unwrap();
        let remote = if interface.starts_with('c') {
            proxy_addr(link)
        } else {
            client_addr(link)
        };
        node.path_snapshots()
            .into_iter()
            .find(|p| p.interface == interface && p.remote == remote)
            .map(|p| p.state)
    }
}

pub fn udp(source: Ipv4Addr, destination: Ipv4Addr, port: u16, payload: &[u8]) -> Vec<u8> {
    build::ipv4_udp(source, destination, 40000, port, payload)
}

pub fn connected_lab(client_routing: RoutingTable, proxy_routing: RoutingTable) -> Lab {
    let mut lab = Lab::new(client_routing, proxy_routing, "10.200.0.0/24");
    lab.run(Duration::from_millis(600));
    lab
}

/// Sets DF, as Linux does on TCP and on most UDP, and fixes the checksum.
pub fn with_df(mut packet: Vec<u8>) -> Vec<u8> {
    use mpip_proxy::packet::checksum::{finish, sum};
    packet[6] = 0x40;
    packet[10..12].fill(0);
    let checksum = finish(sum(0, &packet[..20]));
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet
}
