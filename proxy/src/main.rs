//! The `mptcp-proxy` binary: parses arguments and configuration, then runs the proxy until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use mptcp_proxy::config::{Config, ListenerConfig};

/// How diagnostics are printed on stderr.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// An HTTP proxy that terminates Multipath TCP and relays to legacy TCP servers.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; without it the embedded default is used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen on ADDR:PORT as a forward proxy (repeatable); replaces the configured listeners.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,
    /// Serve /metrics, /healthz and /readyz (and POST /drain from this host) on ADDR:PORT, or "off"
    /// [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<mptcp_proxy::config::OptionalAddress>,
    /// Throttle every subflow arriving on IFACE to RATE (ceil CEIL) once its connection has two or more
    /// subflows, e.g. `eth1=20mbit` (repeatable; adds to the [throttle] policy).
    #[arg(long, value_name = "IFACE=RATE[:CEIL]")]
    throttle: Vec<mptcp_throttle::QuickThrottle>,
    /// Diagnostic log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Cluster mode: announce this instance's own ADDR to clients (ADD_ADDR) and take their further
    /// subflows there, while the --listen addresses are shared with other instances behind ECMP
    /// (sets or adds to [cluster]; see deploy/SCALING.md).
    #[arg(long, value_name = "ADDR")]
    announce: Option<std::net::IpAddr>,
    /// Undo the kernel changes a crashed cluster-mode run left in this network namespace (C flag,
    /// endpoint, service addresses; see [cluster] state_dir) and exit.
    #[arg(long)]
    cluster_cleanup: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => subscriber.init(),
        LogFormat::Json => subscriber.json().init(),
    }

    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::embedded()?,
    };
    if !args.listen.is_empty() {
        config.listeners = args
            .listen
            .iter()
            .copied()
            .map(ListenerConfig::forward)
            .collect();
    }
    if let Some(metrics) = args.metrics {
        config.metrics.address = metrics.0;
    }
    if !args.throttle.is_empty() {
        config
            .throttle
            .get_or_insert_with(Default::default)
            .add_quick_throttles(&args.throttle)?;
    }
    if let Some(announce) = args.announce {
        config
            .cluster
            .get_or_insert_with(|| mptcp_proxy::cluster::ClusterConfig::new(announce))
            .announce = Some(announce);
    }
    if args.cluster_cleanup {
        // Only the state directory matters here ([cluster] state_dir, or the default).
        let state_dir = config.cluster.as_ref().map(|c| c.state_dir.clone());
        let mut cluster = mptcp_proxy::cluster::ClusterConfig::new([0, 0, 0, 0].into());
        if let Some(dir) = state_dir {
            cluster.state_dir = dir;
        }
        if mptcp_proxy::cluster::cleanup_stale(&cluster)? {
            println!("cluster state restored");
        } else {
            println!("no cluster state to restore");
        }
        return Ok(());
    }
    if let Some(cluster) = &config.cluster {
        cluster.announce()?;
    }
    config.add_cluster_listeners();
    config.validate("command line")?;
    if args.check_config {
        println!("configuration OK");
        return Ok(());
    }

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.runtime.worker_threads > 0 {
        builder.worker_threads(config.runtime.worker_threads);
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        mptcp_proxy::run(config, mptcp_proxy::termination()).await?;
        anyhow::Ok(())
    })?;
    // Tasks still running after the drain timeout are dropped with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(())
}
