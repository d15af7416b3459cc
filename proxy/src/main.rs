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
    /// Also run an RFC 8803 converter on ADDR[:PORT] (port 5124 by default; repeatable).
    #[arg(long, value_name = "ADDR[:PORT]", value_parser = mptcp_proxy::convert::parse_listen_address)]
    convert: Vec<SocketAddr>,
    /// Serve /metrics, /healthz and /readyz on ADDR:PORT, or "off" [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<mptcp_proxy::config::OptionalAddress>,
    /// Throttle every subflow arriving on IFACE to RATE (ceil CEIL) once its connection has two or more
    /// subflows, e.g. `eth1=20mbit` (repeatable; adds to the [throttle] policy).
    #[arg(long, value_name = "IFACE=RATE[:CEIL]")]
    throttle: Vec<mptcp_throttle::QuickThrottle>,
    /// Diagnostic log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
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
            .add_quick_throttles(&args.throttle)?;
    }
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
