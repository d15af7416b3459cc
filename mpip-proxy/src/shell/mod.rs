//! The tokio shell: drives sans-IO [`crate::node::Node`]s with a TUN device,
//! UDP path sockets, an interface scanner and the nodes' timers.
//!
//! - [`shard`]: one thread, one node, one TUN queue, one socket per path
//!   interface. `mpipd` runs one shard; the proxy end runs one per CPU
//!   (`[runtime] shards`), each serving the clients whose node ID it owns.
//! - [`supervisor`]: starts the shards, scans interfaces, binds the socket
//!   groups and passes reloads and routing switches on.
//! - [`control`]: the admin endpoints that switch routing profiles.
//!
//! [`run_client`] and [`run_proxy_end`] are the two binaries' `run`. SIGHUP
//! re-reads the configuration file: routing profiles, path timers and
//! interfaces, Algorithm 1, re-sequencing, session expiry and keys apply at
//! once to running sessions; the proxy end's embedded HTTP proxy reloads its
//! own configuration through `mptcp_proxy::ReloadHandle`. What needs a
//! restart (node ID, TUN, pool, ports, MTU, data tags, shards, gateway,
//! metrics address) is named in the log and left as it is.

pub mod control;
pub mod shard;
pub mod supervisor;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::pin;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{ClientConfig, CommonConfig, ConfigError, ProxyEndConfig};
use crate::metrics::MpipMetrics;
use crate::sys::nat::{Masquerade, NatError};
use crate::sys::netif;
use crate::sys::route::RouteError;
use crate::wire::NodeId;
use control::RoutingControl;
use supervisor::{Setup, Supervisor};

/// Re-reads a binary's configuration (SIGHUP).
pub type Reload<C> = Arc<dyn Fn() -> Result<C, ConfigError> + Send + Sync>;

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
    /// A shard thread or its runtime could not be started.
    #[error("starting the node threads: {0}")]
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

/// Eight bytes from the kernel's random source.
fn random_u64() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(u64::from_ne_bytes(bytes))
}

/// Says at start what MPIP authenticates here.
fn log_auth(common: &CommonConfig) {
    match &common.auth.keys {
        Some(keys) => tracing::info!(
            keys = keys.keys().len(),
            send_key = keys.send_key().id,
            data = common.auth.data,
            "authentication on: control datagrams carry HMAC tags{}",
            if common.auth.data {
                ", data too"
            } else {
                "; data is authenticated by its path"
            }
        ),
        None => tracing::warn!(
            "authentication off ([auth] key_file unset): anyone who can send UDP from a path's \
             address can inject into or take over MPIP sessions (PROTOCOL.md §11)"
        ),
    }
}

fn node_id(common: &CommonConfig) -> Result<NodeId, ShellError> {
    common
        .node_id
        .or_else(|| netif::first_mac_address().map(NodeId))
        .ok_or(ShellError::NoNodeId)
}

/// Serves `/metrics`, `/healthz`, `/readyz` and the routing endpoints with
/// `metrics` until `stop`.
async fn serve_admin(
    address: SocketAddr,
    metrics: Arc<mptcp_proxy::metrics::Metrics>,
    routing: Arc<RoutingControl>,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, ShellError> {
    let error = |source| ShellError::Metrics { address, source };
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(error)?;
    tracing::info!(address = %listener.local_addr().map_err(error)?, "admin listener (/metrics, /healthz, /readyz, /mpip/routing)");
    let state =
        Arc::new(mptcp_proxy::admin::AdminState::new(metrics).with_extension(Some(routing)));
    Ok(tokio::spawn(mptcp_proxy::admin::serve(
        listener, state, stop,
    )))
}

fn registry_with(mpip: &Arc<MpipMetrics>) -> Arc<mptcp_proxy::metrics::Metrics> {
    Arc::new(mptcp_proxy::metrics::Metrics::with_extension(|registry| {
        mpip.register(registry)
    }))
}

/// The settings of `new` that only a restart applies, by key.
fn needs_restart(old: &CommonConfig, new: &CommonConfig) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |key, differs: bool| {
        if differs {
            keys.push(key);
        }
    };
    check("node_id", old.node_id != new.node_id);
    check("tun", old.tun != new.tun);
    check("paths.port", old.paths.port != new.paths.port);
    check("paths.mtu", old.paths.mtu != new.paths.mtu);
    check(
        "paths.scan_interval_ms",
        old.paths.scan_interval_ms != new.paths.scan_interval_ms,
    );
    check(
        "scheduler.dispatch",
        old.scheduler.dispatch != new.scheduler.dispatch,
    );
    check("auth.data", old.auth.data != new.auth.data);
    check(
        "auth.key_file (on/off)",
        old.auth.keys.is_some() != new.auth.keys.is_some(),
    );
    check("metrics", old.metrics != new.metrics);
    keys
}

/// Copies into `running` what a reload changed live (the rest stays as it
/// runs, so the next reload compares against what is in force).
fn merge_live(running: &mut CommonConfig, new: &CommonConfig) {
    running.routing = new.routing.clone();
    running.paths.interfaces = new.paths.interfaces.clone();
    running.paths.probe_interval_ms = new.paths.probe_interval_ms;
    running.paths.heartbeat_interval_ms = new.paths.heartbeat_interval_ms;
    running.paths.dead_after_ms = new.paths.dead_after_ms;
    running.paths.keepalive_interval_s = new.paths.keepalive_interval_s;
    running.scheduler.period_ms = new.scheduler.period_ms;
    running.scheduler.step = new.scheduler.step;
    running.resequencer = new.resequencer.clone();
    running.sessions = new.sessions.clone();
    if running.auth.keys.is_some() == new.auth.keys.is_some() {
        running.auth.key_file = new.auth.key_file.clone();
        running.auth.keys = new.auth.keys.clone();
    }
}

/// Applies what a reload can change to the running shards; logs the rest.
async fn apply_reload(
    supervisor: &mut Supervisor,
    routing: &RoutingControl,
    running: &mut CommonConfig,
    new: &CommonConfig,
    node_config: crate::node::NodeConfig,
    extra_restart: Vec<&'static str>,
) {
    let mut restart = needs_restart(running, new);
    restart.extend(extra_restart);
    if !restart.is_empty() {
        tracing::warn!(keys = ?restart, "reload: these settings wait for a restart");
    }
    match supervisor.reconfigure(&node_config).await {
        Ok(()) => {
            supervisor.set_interfaces(&new.paths.interfaces);
            supervisor.scan();
            routing.reloaded(new.routing.clone());
            tracing::info!(
                profile = new.routing.active_name(),
                interfaces = ?new.paths.interfaces,
                keys = new.auth.keys.as_ref().map_or(0, |k| k.keys().len()),
                "configuration reloaded"
            );
            merge_live(running, new);
        }
        Err(reason) => {
            tracing::error!(%reason, "reload refused; the running configuration stays");
        }
    }
}

/// SIGHUP as a stream; `None` if the signal cannot be caught.
fn hangups() -> Option<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}

async fn next_hangup(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal.as_mut() {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Polls `shutdown` once, so that it installs its signal handlers
/// (`mptcp_proxy::termination` does on its first poll); true if it has
/// already resolved.
async fn signal_handlers_installed(shutdown: std::pin::Pin<&mut impl Future<Output = ()>>) -> bool {
    tokio::select! {
        biased;
        () = shutdown => true,
        () = std::future::ready(()) => false,
    }
}

/// Runs `mpipd`, the client end, until `shutdown` resolves; then removes the
/// routes it added and the TUN device. SIGHUP re-reads the configuration
/// with `reload`.
pub async fn run_client(
    config: ClientConfig,
    reload: Reload<ClientConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ShellError> {
    let node_id = node_id(&config.common)?;
    let node_config = config.node_config(node_id);
    tracing::info!(node = %node_config.node_id, "mpipd starting");
    log_auth(&config.common);
    let mpip_metrics = Arc::new(MpipMetrics::default());
    let mut supervisor = Supervisor::start(Setup {
        node_config,
        common: config.common.clone(),
        port: config.port(),
        shards: 1,
        client_routes: Some(config.routes.clone()),
        tunnel_address: None,
        metrics: mpip_metrics.clone(),
    })
    .await?;
    tracing::info!(
        tun = supervisor.tun_name(),
        "tunnel device up; waiting for the handshake"
    );
    let routing = RoutingControl::new(config.common.routing.clone(), supervisor.routing_sender());
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin = match config.common.metrics.address {
        Some(address) => Some(
            serve_admin(
                address,
                registry_with(&mpip_metrics),
                routing.clone(),
                stop_rx,
            )
            .await,
        ),
        None => None,
    };
    let admin = match admin.transpose() {
        Ok(admin) => admin,
        Err(error) => {
            supervisor.stop().await;
            return Err(error);
        }
    };
    // Signal handlers before READY=1: a manager may send SIGHUP (ExecReload) or SIGTERM as soon as
    // it reads it, and their default action ends the process.
    let mut hangup = hangups();
    let mut shutdown = pin!(shutdown);
    let stopped_early = signal_handlers_installed(shutdown.as_mut()).await;
    mptcp_ops::notify::ready("tunnel device up");
    let mut running = config;
    let mut scan = tokio::time::interval(std::time::Duration::from_millis(
        running.common.paths.scan_interval_ms,
    ));
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        if stopped_early {
            break;
        }
        tokio::select! {
            () = &mut shutdown => break,
            _ = scan.tick() => supervisor.scan(),
            () = next_hangup(&mut hangup) => {
                mptcp_ops::notify::reloading();
                match reload() {
                    Ok(new) => {
                        let mut extra = Vec::new();
                        if new.routes != running.routes {
                            extra.push("routes");
                        }
                        if new.proxy.endpoints != running.proxy.endpoints {
                            extra.push("proxy.endpoints");
                        }
                        let mut node_config = new.node_config(node_id);
                        // The proxy endpoints stay what the node runs with.
                        node_config.role = running.node_config(node_id).role;
                        apply_reload(&mut supervisor, &routing, &mut running.common, &new.common, node_config, extra).await;
                    }
                    Err(error) => tracing::error!(error = %mptcp_ops::report::one_line(&error), "reload refused; the running configuration stays"),
                }
                mptcp_ops::notify::ready("reloaded");
            }
        }
    }
    mptcp_ops::notify::stopping();
    supervisor.stop().await;
    let _ = stop_tx.send(true);
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    tracing::info!("mpipd stopped; TUN device and routes removed");
    Ok(())
}

/// The `mptcp-proxy` configuration of the proxy end's HTTP core: its own
/// file (or the embedded default) with the listener on the tunnel address
/// and the admin listener of `config`.
fn http_config(
    config: &ProxyEndConfig,
    tunnel_address: std::net::Ipv4Addr,
) -> Result<mptcp_proxy::Config, mptcp_proxy::config::ConfigError> {
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
    Ok(http_config)
}

/// Runs `mpip-proxy`, the proxy end, until `shutdown` resolves: the shards
/// and the tunnel, the HTTP proxy on the tunnel address and, if enabled, the
/// gateway. On shutdown the HTTP proxy drains first (over the still-running
/// tunnel), then the masquerade table and the TUN device are removed.
/// SIGHUP re-reads the configuration with `reload` (the HTTP core reloads
/// its own part).
pub async fn run_proxy_end(
    config: ProxyEndConfig,
    reload: Reload<ProxyEndConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ShellError> {
    let node_id = node_id(&config.common)?;
    let node_config = config.node_config(node_id);
    let shards = config.runtime.shards();
    tracing::info!(node = %node_config.node_id, pool = %config.tunnel.pool, shards, "mpip-proxy starting");
    log_auth(&config.common);
    let Some((tunnel_address, prefix_len)) = node_config.proxy_tunnel() else {
        unreachable!("a proxy-end node has a tunnel address");
    };
    let mpip_metrics = Arc::new(MpipMetrics::default());
    let mut supervisor = Supervisor::start(Setup {
        node_config,
        common: config.common.clone(),
        port: config.port(),
        shards,
        client_routes: None,
        tunnel_address: Some((tunnel_address, prefix_len)),
        metrics: mpip_metrics.clone(),
    })
    .await?;
    tracing::info!(tun = supervisor.tun_name(), address = %tunnel_address, prefix_len, shards, "tunnel up");
    let routing = RoutingControl::new(config.common.routing.clone(), supervisor.routing_sender());
    let served = serve_proxy_end(
        &config,
        &mut supervisor,
        routing,
        tunnel_address,
        mpip_metrics,
        reload,
        shutdown,
    )
    .await;
    supervisor.stop().await;
    tracing::info!("mpip-proxy stopped; TUN device and nftables table removed");
    served
}

/// The proxy end's services on the tunnel, gateway and HTTP proxy (or the
/// admin listener alone), and its reloads, until `shutdown`.
async fn serve_proxy_end(
    config: &ProxyEndConfig,
    supervisor: &mut Supervisor,
    routing: Arc<RoutingControl>,
    tunnel_address: std::net::Ipv4Addr,
    mpip_metrics: Arc<MpipMetrics>,
    reload: Reload<ProxyEndConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ShellError> {
    let table = format!("mpip_proxy_{}", supervisor.tun_name());
    let masquerade = if config.gateway.enabled {
        let installed = Masquerade::install(&table, config.tunnel.pool, supervisor.tun_name())?;
        tracing::info!(table, "gateway on: clients' other traffic is masqueraded");
        Some(installed)
    } else {
        None
    };
    // Signal handlers before the HTTP core (or this function) says READY=1: a manager may send
    // SIGHUP (ExecReload) or SIGTERM at once, and their default action would end the process
    // without removing the masquerade table.
    let mut hangup = hangups();
    let mut shutdown = pin!(shutdown);
    let stopped_early = signal_handlers_installed(shutdown.as_mut()).await;
    let registry = registry_with(&mpip_metrics);
    let (http_stop_tx, http_stop_rx) = watch::channel(false);
    let mut service = if config.http.port != 0 {
        let server =
            mptcp_proxy::Server::bind_with_metrics(http_config(config, tunnel_address)?, registry)?
                .with_admin_extension(routing.clone());
        // The HTTP core reloads its part on the same SIGHUP, from the same file.
        let source = reload.clone();
        let origin = "mpip-proxy configuration ([http] config)";
        let server = server.reload_on_sighup(origin, move || {
            let config = source().map_err(|e| mptcp_proxy::config::ConfigError::Invalid {
                origin: origin.to_owned(),
                key: "mpip-proxy".to_owned(),
                reason: e.to_string(),
            })?;
            http_config(&config, tunnel_address)
        });
        let mut stop = http_stop_rx;
        Some(tokio::spawn(server.serve(async move {
            let _ = stop.changed().await;
        })))
    } else {
        match config.common.metrics.address {
            Some(address) => {
                let admin = serve_admin(address, registry, routing.clone(), http_stop_rx).await?;
                Some(tokio::spawn(async move {
                    let _ = admin.await;
                    Ok(())
                }))
            }
            None => None,
        }
    };
    if config.http.port == 0 {
        // Without the HTTP core (which tells systemd itself), ready once the tunnel serves.
        mptcp_ops::notify::ready("tunnel up");
    }
    let mut running = config.clone();
    let node_id = node_id(&running.common)?;
    let mut scan = tokio::time::interval(std::time::Duration::from_millis(
        running.common.paths.scan_interval_ms,
    ));
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut result = Ok(());
    loop {
        if stopped_early {
            break;
        }
        let finished = async {
            match service.as_mut() {
                Some(service) => service.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut shutdown => break,
            joined = finished => {
                service = None;
                result = flatten(joined);
                break;
            }
            _ = scan.tick() => supervisor.scan(),
            () = next_hangup(&mut hangup) => {
                // The HTTP core tells systemd about its own reload; without it, this does.
                let notify = config.http.port == 0;
                if notify {
                    mptcp_ops::notify::reloading();
                }
                match reload() {
                    Ok(new) => {
                        let mut extra = Vec::new();
                        let mut check = |key, differs: bool| if differs { extra.push(key) };
                        check("tunnel.pool", new.tunnel != running.tunnel);
                        check("http.port", new.http.port != running.http.port);
                        check("gateway", new.gateway != running.gateway);
                        check("runtime.shards", new.runtime != running.runtime);
                        let node_config = new.node_config(node_id);
                        apply_reload(supervisor, &routing, &mut running.common, &new.common, node_config, extra).await;
                    }
                    Err(error) => tracing::error!(error = %mptcp_ops::report::one_line(&error), "reload refused; the running configuration stays"),
                }
                if notify {
                    mptcp_ops::notify::ready("reloaded");
                }
            }
        }
    }
    if config.http.port == 0 {
        mptcp_ops::notify::stopping();
    }
    if let Some(service) = service {
        let _ = http_stop_tx.send(true);
        result = flatten(service.await);
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
