//! The tokio shell of `mptcp-detourd`: UDP sockets, the nftables table, timers, metrics and shutdown
//! around the sans-IO [`Core`].

use std::collections::HashSet;
use std::future::Future;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use super::config::{parse_port_range, HostConfig};
use super::core::{Core, CoreConfig, Host, KeyBinding, Mapping};
use super::metrics::HostMetrics;
use super::nat::NatTable;
use crate::key::Psk;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Why the detour host stopped.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A key file.
    #[error(transparent)]
    Key(#[from] crate::key::KeyError),
    /// The nftables table could not be installed or removed.
    #[error("nftables: {0}")]
    Nft(#[from] mptcp_netlink::NetlinkError),
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
    /// Reading the host's networks or `ip_forward`.
    #[error("{what}: {source}")]
    System {
        /// What.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// The live system: the table and `/proc/net/tcp*`.
#[derive(Debug)]
pub struct SystemHost {
    table: NatTable,
}

impl Host for SystemHost {
    fn install(&mut self, mapping: &Mapping) -> Result<(), String> {
        self.table.add(&[*mapping]).map_err(|e| e.to_string())
    }

    fn remove(&mut self, mapping: &Mapping) -> Result<(), String> {
        self.table.delete(&[*mapping]).map_err(|e| e.to_string())
    }

    fn listening_ports(&mut self) -> HashSet<u16> {
        listening_tcp_ports()
    }
}

/// TCP ports in LISTEN state in this network namespace (MPTCP listeners included): from sock_diag, or
/// where that is missing (no `tcp_diag`), from `/proc/net/tcp` and `tcp6` (about 15 ms per read).
pub fn listening_tcp_ports() -> HashSet<u16> {
    match mptcp_netlink::sock_diag::listening_tcp_ports() {
        Ok(ports) => return ports.into_iter().collect(),
        Err(error) => tracing::debug!(%error, "sock_diag; reading /proc/net/tcp instead"),
    }
    let mut ports = HashSet::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        ports.extend(parse_proc_net_tcp_listeners(&text));
    }
    ports
}

/// The LISTEN (`0A`) ports of a `/proc/net/tcp` table.
pub fn parse_proc_net_tcp_listeners(text: &str) -> impl Iterator<Item = u16> + '_ {
    text.lines().skip(1).filter_map(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1)?;
        let state = fields.nth(1)?;
        if state != "0A" {
            return None;
        }
        let port = local.rsplit(':').next()?;
        u16::from_str_radix(port, 16).ok()
    })
}

/// Compiles the configuration: loads keys and adds this host's networks to the ACL.
pub fn core_config(config: &HostConfig) -> Result<CoreConfig, HostError> {
    let mut keys = Vec::new();
    for key in &config.keys {
        keys.push(KeyBinding {
            name: key
                .name
                .clone()
                .unwrap_or_else(|| key.file.display().to_string()),
            psk: Psk::load(&key.file)?,
            clients: key.clients.clone(),
        });
    }
    let mut deny = config.acl.deny_destinations.clone();
    if config.acl.deny_own_networks {
        let networks =
            mptcp_proxy::sockets::interface_networks().map_err(|source| HostError::System {
                what: "listing interface addresses",
                source,
            })?;
        for (_, net) in networks {
            if let IpNet::V4(net) = net {
                deny.push(net.trunc());
            }
        }
    }
    Ok(CoreConfig {
        keys,
        v1_clients: config.v1.clients.clone(),
        max_clock_skew: config.max_clock_skew,
        mappings_per_client: config.limits.mappings_per_client,
        max_mappings: config.limits.max_mappings,
        request_rate: config.limits.requests_per_second,
        request_burst: config.limits.request_burst,
        idle_timeout: config.limits.idle_timeout,
        port_range: parse_port_range(&config.limits.port_range).unwrap_or(20000..=59999),
        deny_destinations: deny,
    })
}

/// `net.ipv4.ip_forward` switched on while the daemon runs.
struct IpForward {
    previous: Option<String>,
}

impl IpForward {
    fn enable() -> Result<Self, HostError> {
        let system = |source| HostError::System {
            what: IP_FORWARD,
            source,
        };
        let previous = std::fs::read_to_string(IP_FORWARD)
            .map_err(system)?
            .trim()
            .to_owned();
        if previous != "1" {
            std::fs::write(IP_FORWARD, "1").map_err(system)?;
            tracing::info!("net.ipv4.ip_forward = 1 (was {previous})");
            return Ok(Self {
                previous: Some(previous),
            });
        }
        Ok(Self { previous: None })
    }

    fn restore(&mut self) {
        if let Some(previous) = self.previous.take() {
            match std::fs::write(IP_FORWARD, &previous) {
                Ok(()) => tracing::info!("net.ipv4.ip_forward = {previous} (restored)"),
                Err(error) => tracing::warn!(%error, "restoring net.ipv4.ip_forward failed"),
            }
        }
    }
}

impl Drop for IpForward {
    fn drop(&mut self) {
        self.restore();
    }
}

/// The installed table; dropping it deletes the table.
struct TableGuard(NatTable);

impl Drop for TableGuard {
    fn drop(&mut self) {
        match self.0.remove() {
            Ok(()) => tracing::info!(table = self.0.name(), "nftables table removed"),
            Err(error) => tracing::error!(%error, "removing the nftables table failed"),
        }
    }
}

/// Runs the detour host until `shutdown` completes; everything installed is removed on the way out.
pub async fn run(
    config: HostConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), HostError> {
    // Signal handlers before anything else (and before READY=1): `termination()` installs its handlers
    // when first polled, and a SIGTERM that finds none ends the process with nothing cleaned up.
    tokio::pin!(shutdown);
    let stopped_early = tokio::select! {
        biased;
        () = &mut shutdown => true,
        () = std::future::ready(()) => false,
    };
    let core_config = core_config(&config)?;
    let mut sockets = Vec::new();
    for address in &config.listen {
        let socket = UdpSocket::bind(address)
            .await
            .map_err(|source| HostError::Socket {
                what: "binding UDP",
                address: *address,
                source,
            })?;
        tracing::info!(address = %socket.local_addr().unwrap_or(*address), "listening for NAT detour requests");
        sockets.push(Arc::new(socket));
    }
    let table = NatTable::new(&config.table);
    table.install()?;
    let table = TableGuard(table);
    tracing::info!(
        table = table.0.name(),
        "nftables table installed (replacing any a crashed run left)"
    );
    let _forward = if config.manage_ip_forward {
        Some(IpForward::enable()?)
    } else {
        None
    };

    let metrics = Arc::new(HostMetrics::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin = match config.metrics.address {
        Some(address) => {
            let metrics = metrics.clone();
            Some(
                crate::admin::serve_metrics(address, move |r| metrics.register(r), stop_rx.clone())
                    .await
                    .map_err(|source| HostError::Socket {
                        what: "binding the metrics listener",
                        address,
                        source,
                    })?,
            )
        }
        None => None,
    };

    let (tx, mut rx) = mpsc::channel::<(usize, SocketAddr, Vec<u8>)>(1024);
    let mut readers = Vec::new();
    for (index, socket) in sockets.iter().enumerate() {
        let socket = socket.clone();
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                match socket.recv_from(&mut buf).await {
                    Ok((len, from)) => {
                        if tx.send((index, from, buf[..len].to_vec())).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        // ICMP errors from earlier replies surface here; keep serving.
                        tracing::debug!(%error, "recv_from");
                    }
                }
            }
        }));
    }
    drop(tx);

    let mut core = Core::new(core_config);
    let mut host = SystemHost {
        table: table.0.clone(),
    };
    mptcp_ops::notify::ready("answering NAT detour requests");
    let mut sweep = tokio::time::interval(config.metrics.counter_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if stopped_early {
            break;
        }
        tokio::select! {
            _ = &mut shutdown => break,
            received = rx.recv() => {
                let Some((index, from, bytes)) = received else { break };
                let SocketAddr::V4(from) = from else { continue };
                handle(&mut core, &mut host, &metrics, &sockets[index], from, &bytes).await;
            }
            _ = sweep.tick() => sweep_once(&mut core, &mut host, &metrics),
        }
    }
    mptcp_ops::notify::stopping();
    let _ = stop_tx.send(true);
    for reader in readers {
        reader.abort();
    }
    if let Some(admin) = admin {
        let _ = tokio::time::timeout(Duration::from_secs(1), admin).await;
    }
    tracing::info!(
        mappings = core.mapping_count(),
        "shutting down: removing every mapping with the table"
    );
    drop(table);
    Ok(())
}

async fn handle(
    core: &mut Core,
    host: &mut SystemHost,
    metrics: &HostMetrics,
    socket: &UdpSocket,
    from: SocketAddrV4,
    bytes: &[u8],
) {
    let handled = core.handle_datagram(Instant::now(), crate::config::unix_ms(), from, bytes, host);
    metrics.count(handled.outcome);
    metrics.refresh(core);
    tracing::debug!(%from, outcome = handled.outcome.name(), "request");
    if let Some(reply) = handled.reply {
        if let Err(error) = socket.send_to(&reply, SocketAddr::V4(from)).await {
            tracing::debug!(%from, %error, "sending the answer failed");
        }
    }
}

fn sweep_once(core: &mut Core, host: &mut SystemHost, metrics: &HostMetrics) {
    let now = Instant::now();
    match host.table.counters() {
        Ok(counters) => core.handle_counters(
            now,
            counters
                .into_iter()
                .map(|(m, packets, bytes)| (m.client, m.dpt, packets, bytes)),
        ),
        Err(error) => tracing::warn!(%error, "reading the mapping counters failed"),
    }
    let expired = core.expire(now, crate::config::unix_ms(), host);
    if expired > 0 {
        tracing::info!(expired, "idle mappings removed");
    }
    metrics.refresh(core);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_listeners() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:D2C4 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n\
   2: 0100007F:24FA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0\n";
        let ports: Vec<u16> = parse_proc_net_tcp_listeners(text).collect();
        assert_eq!(ports, vec![80, 9466]);
    }
}
