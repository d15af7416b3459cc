//! `mptcp-convert`: the RFC 8803 client agent. Applications use it as a SOCKS5 proxy on loopback (or
//! reach it through nftables REDIRECT); it opens each connection to the converter as MPTCP with the
//! Convert message in the SYN (TCP Fast Open).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mptcp_proxy::convert::agent::{self, AgentConfig};

/// Reach any server through an RFC 8803 Transport Converter over Multipath TCP.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The converter, ADDR[:PORT] (port 5124 by default).
    #[arg(long, value_name = "ADDR[:PORT]", value_parser = mptcp_proxy::convert::parse_listen_address)]
    converter: SocketAddr,
    /// Serve SOCKS5 on ADDR:PORT [default: 127.0.0.1:1080 unless --transparent is given].
    #[arg(long, value_name = "ADDR:PORT")]
    socks: Option<SocketAddr>,
    /// Accept connections redirected here by nftables REDIRECT (their original destination is where
    /// they go).
    #[arg(long, value_name = "ADDR:PORT")]
    transparent: Option<SocketAddr>,
    /// Give up on the converter's answer after this long.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = mptcp_proxy::config::parse_duration)]
    connect_timeout: Duration,
    /// Close a connection with no bytes either way for this long.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = mptcp_proxy::config::parse_duration)]
    idle_timeout: Duration,
    /// SOCKS5: wait for the converter's answer before replying, so a refusal arrives as its SOCKS5
    /// error code (costs one round trip: by default the reply is immediate and the application's
    /// first bytes ride in the SYN; a refusal then resets the connection).
    #[arg(long)]
    strict: bool,
    /// How long to wait for the application's first bytes before sending the SYN without them.
    #[arg(long, value_name = "DURATION", default_value = "10ms", value_parser = mptcp_proxy::config::parse_duration)]
    early_data_wait: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let socks = match (args.socks, args.transparent) {
        (None, None) => Some(agent::DEFAULT_SOCKS),
        (socks, _) => socks,
    };
    let config = AgentConfig {
        converter: args.converter,
        socks,
        transparent: args.transparent,
        connect_timeout: args.connect_timeout,
        idle_timeout: args.idle_timeout,
        optimistic: !args.strict,
        early_data_wait: args.early_data_wait,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(agent::run(config, mptcp_proxy::termination()))?;
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}
