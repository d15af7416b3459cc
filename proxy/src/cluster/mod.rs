//! Cluster mode (issue 14): several instances share one service address behind routers' ECMP, and
//! every later subflow of a connection reaches the instance that owns it.
//!
//! Every instance listens on the shared service address (`--listen VIP:PORT`) and on its own address
//! (`--announce ADDR`, the same ports). At start it
//! - records what it will change ([`state`]), so a crashed run is undone by the next start;
//! - sets `net.mptcp.allow_join_initial_addr_port = 0` in its namespace: the MP_CAPABLE C flag tells
//!   clients not to join the shared address, which ECMP could send to another instance;
//! - adds a `signal` endpoint for its own address: the kernel announces it (ADD_ADDR) on every
//!   connection, and clients join there, straight to this instance;
//! - adds the service address to `lo` when it is not local yet;
//! - once the listeners are up, creates the announcement device, a TUN device that bird2 beside the
//!   proxy watches (`deploy/bird/instance.conf`): while it exists, bird announces the service address
//!   to the routers over BGP.
//!
//! On drain (SIGTERM, SIGINT or `POST /drain` on the admin listener) it first closes the SYN gate: new
//! connections to the service address are dropped silently, so their clients retransmit the SYN a
//! second later, when the routers already send it to another instance. After `join_grace` (the
//! connections accepted just before have joined by then, so they survive losing their initial
//! subflow to the re-hashing) it deletes the device, so the routers withdraw the route, waits
//! `withdraw_delay` while they converge, then stops accepting and lets running transfers finish; the listening sockets on its own address stay
//! open until then, so joins still arrive. Last it deletes the endpoint and the addresses it added and
//! restores the sysctl. If the process dies, the kernel deletes the device with its descriptor: the
//! route goes at once, and the next start (or `--cluster-cleanup`) undoes the rest.

pub mod joins;
pub mod kernel;
pub mod state;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::config::{Config, ListenerConfig};
use crate::metrics::Metrics;
use crate::server::{Server, ServerError};

/// The announcement device's default name; `deploy/bird/instance.conf` names it too.
pub const DEFAULT_ANNOUNCE_DEVICE: &str = "mptcp-anycast";

/// `[cluster]`: running as one of several instances behind ECMP.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This instance's own address, announced to clients (ADD_ADDR); clients send every further
    /// subflow there. It must be local and reach clients without ECMP (not the service address).
    /// Required, here or with `--announce` (which a fleet's shared file leaves to each host).
    #[serde(default)]
    pub announce: Option<IpAddr>,
    /// The TUN device whose presence makes bird announce the service address, or `off` when routing
    /// is steered otherwise; default `mptcp-anycast`, the name in `deploy/bird/instance.conf`.
    #[serde(
        default = "ClusterConfig::default_announce_device",
        deserialize_with = "device_or_off"
    )]
    pub announce_device: Option<String>,
    /// How long to keep accepting after withdrawing the route on drain, while routers converge;
    /// default 2 s (bird withdraws in milliseconds; BGP sends withdrawals without MRAI delay).
    #[serde(
        default = "ClusterConfig::default_withdraw_delay",
        deserialize_with = "crate::config::duration"
    )]
    pub withdraw_delay: Duration,
    /// How long the drain drops new connections (SYNs to the service address) before it withdraws the
    /// route; default 500 ms. A connection accepted just before the drain needs a round trip or two
    /// for its join to this instance's own address; once the route is withdrawn its initial subflow
    /// reaches another instance, which resets it, and only a joined subflow keeps it alive.
    #[serde(
        default = "ClusterConfig::default_join_grace",
        deserialize_with = "crate::config::duration"
    )]
    pub join_grace: Duration,
    /// Add the service addresses to `lo` when they are not local yet (and delete them at exit);
    /// default true, so `--listen VIP:PORT --announce ADDR` is all an instance needs.
    #[serde(default = "yes")]
    pub add_service_addresses: bool,
    /// Where the state file that undoes a crashed run's changes lives (one file per network
    /// namespace); default `/run/mptcp-proxy`.
    #[serde(default = "ClusterConfig::default_state_dir")]
    pub state_dir: PathBuf,
}

fn yes() -> bool {
    true
}

fn device_or_off<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let name = String::deserialize(deserializer)?;
    Ok((name != "off").then_some(name))
}

impl ClusterConfig {
    fn default_announce_device() -> Option<String> {
        Some(DEFAULT_ANNOUNCE_DEVICE.to_owned())
    }
    fn default_withdraw_delay() -> Duration {
        Duration::from_secs(2)
    }
    fn default_join_grace() -> Duration {
        Duration::from_millis(500)
    }
    fn default_state_dir() -> PathBuf {
        PathBuf::from("/run/mptcp-proxy")
    }

    /// Cluster mode with the defaults, announcing `announce` (what `--announce` makes).
    pub fn new(announce: IpAddr) -> Self {
        Self {
            announce: Some(announce),
            announce_device: Self::default_announce_device(),
            withdraw_delay: Self::default_withdraw_delay(),
            join_grace: Self::default_join_grace(),
            add_service_addresses: true,
            state_dir: Self::default_state_dir(),
        }
    }

    /// Checks the section against the listeners: `Err((key, reason))`.
    pub fn validate(&self, listeners: &[ListenerConfig]) -> Result<(), (String, String)> {
        let bad = |key: &str, reason: String| Err((format!("cluster.{key}"), reason));
        self.validate_device()?;
        // Without an address yet, the command line gives it ([`ClusterConfig::announce`]).
        let Some(announce) = self.announce else {
            return Ok(());
        };
        if announce.is_unspecified() || announce.is_loopback() || announce.is_multicast() {
            return bad(
                "announce",
                format!("{announce} cannot be announced to clients"),
            );
        }
        if !listeners
            .iter()
            .any(|l| l.address.ip() != announce && !l.address.ip().is_unspecified())
        {
            return bad(
                "announce",
                "needs a listener on the shared service address (--listen VIP:PORT) besides it"
                    .into(),
            );
        }
        Ok(())
    }

    /// The announced address, which the file or `--announce` must give.
    pub fn announce(&self) -> Result<IpAddr, ClusterError> {
        self.announce.ok_or_else(|| {
            ClusterError::Unsupported(
                "no address to announce: set [cluster] announce or pass --announce ADDR".into(),
            )
        })
    }

    fn validate_device(&self) -> Result<(), (String, String)> {
        if let Some(name) = &self.announce_device {
            if name.is_empty()
                || name.len() > 15
                || name
                    .bytes()
                    .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == b'%')
            {
                return Err((
                    "cluster.announce_device".into(),
                    format!("{name:?} is not an interface name (1 to 15 bytes, no '/', ':', '%' or spaces)"),
                ));
            }
        }
        Ok(())
    }
}

/// Cluster mode could not start or undo its changes.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// MPTCP is off, or the wrong path manager runs.
    #[error("{0}")]
    Unsupported(String),
    /// A sysctl could not be read or written.
    #[error("{path}: {source}")]
    Sysctl {
        /// The /proc/sys path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The path manager or rtnetlink refused a request.
    #[error("{0}")]
    PathManager(String),
    /// The local addresses could not be listed or changed.
    #[error("local addresses: {0}")]
    Addresses(std::io::Error),
    /// The state file could not be read or written.
    #[error("state file {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Another endpoint already uses the announced address without the `signal` flag.
    #[error("an MPTCP endpoint for {address} exists (id {id}, flags {flags:#x}) without `signal`; delete it or add `signal`")]
    EndpointConflict {
        /// The address.
        address: IpAddr,
        /// Its id.
        id: u8,
        /// Its flags.
        flags: u32,
    },
    /// A service address is not local and may not be added.
    #[error("the service address {0} is not local and cluster.add_service_addresses is false")]
    ServiceNotLocal(IpAddr),
    /// Another live instance owns this namespace's cluster state.
    #[error(
        "mptcp-proxy pid {pid} already runs in cluster mode in this network namespace ({path})"
    )]
    AlreadyRunning {
        /// Its pid.
        pid: u32,
        /// Its state file.
        path: PathBuf,
    },
    /// The announcement device could not be created.
    #[error("announcement device {name}: {source}")]
    Device {
        /// The device name.
        name: String,
        /// The error.
        source: std::io::Error,
    },
    /// The drain's SYN gate could not be closed or opened.
    #[error("drain SYN gate (nft table inet mptcp_proxy_drain): {0}")]
    SynGate(String),
    /// A listening socket could not be kept for joins.
    #[error("keeping the listener on {address} open for joins: {source}")]
    Listener {
        /// The address.
        address: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

impl Config {
    /// Adds, for every listener on a service address, a listener with the same settings on the
    /// announced address and port (unless one exists): joins arrive there. A no-op without `[cluster]`.
    pub fn add_cluster_listeners(&mut self) {
        let Some(announce) = self.cluster.as_ref().and_then(|c| c.announce) else {
            return;
        };
        let mut extra = Vec::new();
        for listener in &self.listeners {
            let ip = listener.address.ip();
            if ip == announce || ip.is_unspecified() || ip.is_ipv4() != announce.is_ipv4() {
                continue;
            }
            let address = SocketAddr::new(announce, listener.address.port());
            if self
                .listeners
                .iter()
                .chain(&extra)
                .all(|l| l.address != address)
            {
                extra.push(ListenerConfig {
                    address,
                    ..listener.clone()
                });
            }
        }
        self.listeners.extend(extra);
    }

    /// The shared service addresses: the listeners' addresses other than the announced one.
    pub fn service_addresses(&self) -> Vec<IpAddr> {
        let announce = self.cluster.as_ref().and_then(|c| c.announce);
        let mut services = Vec::new();
        for listener in &self.listeners {
            let ip = listener.address.ip();
            if Some(ip) != announce && !ip.is_unspecified() && !services.contains(&ip) {
                services.push(ip);
            }
        }
        services
    }
}

/// A running instance's cluster state: undone by [`Cluster::finish`], or on drop.
#[derive(Debug)]
pub struct Cluster {
    config: ClusterConfig,
    announce: IpAddr,
    state_path: PathBuf,
    state: state::SavedState,
    services: Vec<IpAddr>,
    ports: Vec<u16>,
    linger: Duration,
    join_listeners: Vec<OwnedFd>,
    joins: Option<joins::JoinCounter>,
    finished: bool,
}

impl Cluster {
    /// Records and applies the kernel changes (before the listeners are bound: the service address
    /// must be local by then).
    pub fn start(config: &Config) -> Result<Self, ClusterError> {
        let cluster = config
            .cluster
            .clone()
            .ok_or_else(|| ClusterError::Unsupported("no [cluster] section".into()))?;
        let announce = cluster.announce()?;
        kernel::check_mptcp()?;
        let state_path = kernel::state_path(&cluster.state_dir)?;
        let saved = kernel::read_state(&state_path)?;
        if let Some(saved) = &saved {
            if kernel::is_running_here(saved.pid) {
                return Err(ClusterError::AlreadyRunning {
                    pid: saved.pid,
                    path: state_path,
                });
            }
            tracing::warn!(
                pid = saved.pid,
                path = %state_path.display(),
                "cluster: a previous run did not exit cleanly; taking over its changes"
            );
        }
        let wanted = state::Wanted {
            announce,
            services: config.service_addresses(),
            add_services: cluster.add_service_addresses,
        };
        // A gate a crashed drain left would drop every new connection to this instance.
        kernel::open_syn_gate()?;
        let observed = kernel::observe()?;
        let plan = state::plan_start(&wanted, &observed, saved.as_ref(), std::process::id())?;
        kernel::write_state(&state_path, &plan.state)?;
        let started = Self {
            config: cluster,
            announce,
            state_path,
            state: plan.state.clone(),
            services: wanted.services.clone(),
            ports: config
                .listeners
                .iter()
                .filter(|l| l.address.ip() == wanted.announce)
                .map(|l| l.address.port())
                .collect(),
            linger: config.limits.drain_timeout,
            join_listeners: Vec::new(),
            joins: None,
            finished: false,
        };
        // On an error from here on, dropping `started` undoes what was applied.
        kernel::apply_start(&plan)?;
        if kernel::subflow_limit() == Some(0) {
            tracing::warn!("cluster: the MPTCP subflow limit is 0, so joins are refused; raise it with `ip mptcp limits set subflow 2`");
        }
        tracing::info!(
            announce = %started.announce,
            services = ?wanted.services,
            c_flag = true,
            endpoint_added = plan.add_endpoint,
            addresses_added = ?plan.add_addresses,
            state = %started.state_path.display(),
            "cluster: announcing this instance's address; joins to the service address are refused by clients"
        );
        Ok(started)
    }

    /// Attaches to a bound server: keeps its listeners on the announced address open until the drain
    /// ends, counts joins by arrival address, announces the route, and makes the drain withdraw it
    /// first.
    pub fn attach(
        &mut self,
        server: Server,
        metrics: Arc<Metrics>,
    ) -> Result<Server, ClusterError> {
        let announce = self.announce;
        for address in server.local_addrs() {
            if address.ip() == announce {
                let fd = server
                    .listener_fd(address)
                    .ok_or_else(|| ClusterError::Listener {
                        address,
                        source: std::io::ErrorKind::NotFound.into(),
                    })?
                    .map_err(|source| ClusterError::Listener { address, source })?;
                self.join_listeners.push(fd);
            }
        }
        match joins::JoinCounter::start(metrics.clone(), announce, self.services.clone()) {
            Ok(counter) => self.joins = Some(counter),
            Err(error) => {
                tracing::warn!(%error, "cluster: joins by arrival address are not counted")
            }
        }
        let device = match &self.config.announce_device {
            Some(name) => {
                let device = kernel::AnnounceDevice::create(name)?;
                metrics.cluster_announced.set(1);
                tracing::info!(device = name, "cluster: listeners up; route announced");
                Some(device)
            }
            None => None,
        };
        let gate: Vec<SocketAddr> = server
            .local_addrs()
            .into_iter()
            .filter(|a| self.services.contains(&a.ip()) && !a.ip().is_unspecified())
            .collect();
        let steps = DrainSteps {
            gate,
            join_grace: self.config.join_grace,
            withdraw_delay: self.config.withdraw_delay,
        };
        Ok(server.before_drain(withdraw(device, steps, metrics)))
    }

    /// Undoes the kernel changes once the drain is over. First it waits (up to
    /// `limits.drain_timeout`) until the kernel has delivered what closed connections still had to
    /// send: deleting the endpoint sends REMOVE_ADDR, which would close their joined subflows, the
    /// only ones left to a connection whose initial subflow ECMP moved to another instance. Then the
    /// join listeners close, the endpoint and added addresses go, the sysctl gets its original value
    /// back, and the state file is deleted.
    pub async fn finish(mut self) -> Result<(), ClusterError> {
        self.finished = true;
        // Only joins arrive at the announced address. Initial subflows (to the service address) of
        // a drained instance are not waited for: after the withdrawal their packets reach other
        // instances, so they retransmit into the void until the kernel gives up, whatever we wait.
        let addresses = [self.announce];
        let started = std::time::Instant::now();
        let mut busy = kernel::busy_subflows_now(&addresses, &self.ports);
        if busy > 0 {
            tracing::info!(
                subflows = busy,
                "cluster: waiting for closed connections to deliver their last bytes"
            );
        }
        while busy > 0 && started.elapsed() < self.linger {
            tokio::time::sleep(Duration::from_millis(50)).await;
            busy = kernel::busy_subflows_now(&addresses, &self.ports);
        }
        if busy > 0 {
            tracing::warn!(
                subflows = busy,
                "cluster: drain timeout reached with subflows still sending"
            );
        }
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), ClusterError> {
        self.join_listeners.clear();
        self.joins = None;
        kernel::open_syn_gate()?;
        let observed = kernel::observe()?;
        let teardown = state::plan_teardown(&self.state, &observed);
        kernel::apply_teardown(&teardown)?;
        kernel::remove_state(&self.state_path)?;
        tracing::info!(
            restored_c_flag = ?teardown.restore_c_flag,
            deleted_endpoints = teardown.delete_endpoints.len(),
            deleted_addresses = ?teardown.delete_addresses,
            "cluster: kernel state restored"
        );
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(error) = self.teardown() {
                tracing::error!(%error, "cluster: restoring the kernel state failed");
            }
        }
    }
}

/// What the drain does before the server stops accepting ([`withdraw`]).
struct DrainSteps {
    /// The service sockets whose new connections the SYN gate drops.
    gate: Vec<SocketAddr>,
    /// From closing the gate to withdrawing the route.
    join_grace: Duration,
    /// From withdrawing the route to closing the listeners.
    withdraw_delay: Duration,
}

/// The drain's first steps: close the SYN gate, give the connections accepted just before time to
/// join, delete the announcement device (the route is withdrawn), and wait while routers converge.
async fn withdraw(
    device: Option<kernel::AnnounceDevice>,
    steps: DrainSteps,
    metrics: Arc<Metrics>,
) {
    if !steps.gate.is_empty() {
        match kernel::close_syn_gate(&steps.gate) {
            Ok(()) => tracing::info!(
                services = ?steps.gate,
                grace = ?steps.join_grace,
                "cluster: new connections dropped (their clients retry the SYN); withdrawing after the grace"
            ),
            // Withdrawing anyway: a connection racing the withdrawal may then be reset.
            Err(error) => tracing::warn!(%error, "cluster: SYN gate not closed"),
        }
        tokio::time::sleep(steps.join_grace).await;
    }
    if let Some(device) = device {
        let name = device.name().to_owned();
        drop(device);
        metrics.cluster_announced.set(0);
        tracing::info!(
            device = name,
            delay = ?steps.withdraw_delay,
            "cluster: route withdrawn; waiting while routers converge"
        );
    }
    tokio::time::sleep(steps.withdraw_delay).await;
}

/// Undoes the kernel changes a dead run recorded (`mptcp-proxy --cluster-cleanup`); returns whether
/// there was anything to undo.
pub fn cleanup_stale(config: &ClusterConfig) -> Result<bool, ClusterError> {
    let path = kernel::state_path(&config.state_dir)?;
    let Some(saved) = kernel::read_state(&path)? else {
        return Ok(false);
    };
    if kernel::is_running_here(saved.pid) {
        return Err(ClusterError::AlreadyRunning {
            pid: saved.pid,
            path,
        });
    }
    let observed = kernel::observe()?;
    kernel::apply_teardown(&state::plan_teardown(&saved, &observed))?;
    kernel::remove_state(&path)?;
    Ok(true)
}

/// Runs the proxy in cluster mode until `shutdown` resolves or a drain is requested, then drains as
/// described in the module documentation; `customize` is applied to the bound server (SIGHUP reload).
pub async fn run(
    mut config: Config,
    shutdown: impl Future<Output = ()>,
    customize: impl FnOnce(Server) -> Server,
) -> Result<(), ServerError> {
    config.add_cluster_listeners();
    let mut cluster = Cluster::start(&config)?;
    let metrics = Arc::new(Metrics::new());
    let server = Server::bind_with_metrics(config, metrics.clone())?;
    let server = cluster.attach(customize(server), metrics)?;
    let served = server.serve(shutdown).await;
    let finished = cluster.finish().await;
    served?;
    finished?;
    Ok(())
}
