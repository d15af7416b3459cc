//! The `mptcp-proxy` binary: parses arguments and configuration, then runs the proxy until SIGTERM/SIGINT.
//! SIGHUP re-reads the configuration file (with the same command-line overrides) and applies it live.
//! `mptcp-proxy connections` prints a running proxy's open connections and their subflows.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mptcp_proxy::config::{Config, ConfigError, ListenerConfig};

/// An HTTP proxy that terminates Multipath TCP and relays to legacy TCP servers.
#[derive(Debug, Clone, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Args {
    /// TOML configuration file; without it the embedded default is used. SIGHUP re-reads it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen on ADDR:PORT as a forward proxy (repeatable); replaces the configured listeners.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,
    /// Also run an RFC 8803 converter on ADDR[:PORT] (port 5124 by default; repeatable).
    #[arg(long, value_name = "ADDR[:PORT]", value_parser = mptcp_proxy::convert::parse_listen_address)]
    convert: Vec<SocketAddr>,
    /// Serve /metrics, /healthz, /readyz and /connections (and POST /drain from this host) on
    /// ADDR:PORT, or "off" [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<mptcp_proxy::config::OptionalAddress>,
    /// Throttle every subflow arriving on IFACE to RATE (ceil CEIL) once its connection has two or more
    /// subflows, e.g. `eth1=20mbit` (repeatable; adds to the [throttle] policy).
    #[arg(long, value_name = "IFACE=RATE[:CEIL]")]
    throttle: Vec<mptcp_throttle::QuickThrottle>,
    #[command(flatten)]
    log: mptcp_ops::LogArgs,
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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Subcommand)]
enum Command {
    /// Print a running proxy's open client connections and their subflows now (from its admin
    /// listener's /connections), like `ss -M` joined with what only the proxy knows.
    Connections {
        /// The proxy's admin listener.
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9464")]
        admin: SocketAddr,
        /// Print the JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
}

/// GETs `/connections` from the admin listener (HTTP/1.0, so the body ends at close).
fn fetch_connections(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(10);
    let mut stream = std::net::TcpStream::connect_timeout(&admin, timeout)
        .with_context(|| format!("connecting to the admin listener {admin}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(b"GET /connections HTTP/1.0\r\nHost: mptcp-proxy\r\n\r\n")?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading /connections from {admin}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("{admin}: not an HTTP response"))?;
    let status = head.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "{admin}/connections answered {status:?} (is it an mptcp-proxy admin listener?)"
    );
    serde_json::from_str(body).with_context(|| format!("{admin}/connections: bad JSON"))
}

/// Reads the configuration file (or the embedded default) and applies the command-line overrides: at
/// start and again on every SIGHUP.
fn load(args: &Args) -> Result<Config, ConfigError> {
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
    config
        .listeners
        .extend(args.convert.iter().copied().map(ListenerConfig::convert));
    if let Some(metrics) = args.metrics {
        config.metrics.address = metrics.0;
    }
    if !args.throttle.is_empty() {
        config
            .throttle
            .get_or_insert_with(Default::default)
            .add_quick_throttles(&args.throttle)
            .map_err(|error| ConfigError::Invalid {
                origin: "command line".into(),
                key: "--throttle".into(),
                reason: error.to_string(),
            })?;
    }
    if let Some(announce) = args.announce {
        config
            .cluster
            .get_or_insert_with(|| mptcp_proxy::cluster::ClusterConfig::new(announce))
            .announce = Some(announce);
    }
    if let Some(cluster) = &config.cluster {
        cluster.announce().map_err(|error| ConfigError::Invalid {
            origin: "command line".into(),
            key: "cluster.announce".into(),
            reason: error.to_string(),
        })?;
    }
    config.add_cluster_listeners();
    config.validate("command line")?;
    Ok(config)
}

fn main() -> ExitCode {
    let args = Args::parse();
    mptcp_ops::logging::init(args.log.log_format);
    mptcp_ops::report::exit("mptcp-proxy", run(args))
}

fn run(args: Args) -> anyhow::Result<()> {
    if let Some(Command::Connections { admin, json }) = &args.command {
        let view = fetch_connections(*admin)?;
        if *json {
            println!("{view:#}");
        } else {
            print!("{}", mptcp_proxy::registry::render_table(&view));
        }
        return Ok(());
    }
    if args.cluster_cleanup {
        // Only the state directory matters here ([cluster] state_dir, or the default).
        let file = match &args.config {
            Some(path) => Config::from_file(path)?,
            None => Config::embedded()?,
        };
        let mut cluster = mptcp_proxy::cluster::ClusterConfig::new([0, 0, 0, 0].into());
        if let Some(dir) = file.cluster.map(|c| c.state_dir) {
            cluster.state_dir = dir;
        }
        if mptcp_proxy::cluster::cleanup_stale(&cluster)? {
            println!("cluster state restored");
        } else {
            println!("no cluster state to restore");
        }
        return Ok(());
    }
    let config = load(&args)?;
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
    let origin = args.config.as_ref().map_or_else(
        || "embedded default".to_owned(),
        |p| p.display().to_string(),
    );
    runtime.block_on(async move {
        // With [cluster], the instance runs in cluster mode around the same server.
        mptcp_proxy::server::run_with(config, mptcp_proxy::termination(), move |server| {
            server.reload_on_sighup(origin, move || load(&args))
        })
        .await?;
        anyhow::Ok(())
    })?;
    // Tasks still running after the drain timeout are dropped with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(())
}
