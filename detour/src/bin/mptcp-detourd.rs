//! `mptcp-detourd`: the NAT detour host. Answers NAT detour requests (UDP 45672) and forwards each
//! client's detoured subflows to their server with nftables DNAT and SNAT.

use std::path::PathBuf;

use clap::Parser;
use mptcp_detour::config::{parse_endpoint, Validated};
use mptcp_detour::host::config::{HostConfig, KeyConfig};

/// NAT detour host for MPTCP detour routing (mptcp-detour).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// UDP address for requests, ADDR[:PORT] (port 45672 by default); repeatable. Replaces the config
    /// file's `listen`.
    #[arg(long, value_name = "ADDR[:PORT]")]
    listen: Vec<String>,
    /// Pre-shared key file (one line of at least 32 hex digits) every client may use; added to the
    /// config file's keys.
    #[arg(long, value_name = "FILE")]
    psk_file: Vec<PathBuf>,
    /// TOML configuration (example: deploy/examples/mptcp-detourd.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the configuration and key files, then exit.
    #[arg(long)]
    check_config: bool,
    /// `--log-format`.
    #[command(flatten)]
    log: mptcp_ops::LogArgs,
}

fn load(args: &Args) -> anyhow::Result<HostConfig> {
    let mut config = match &args.config {
        Some(path) => mptcp_detour::config::read_toml(path)?,
        None => HostConfig::default(),
    };
    if !args.listen.is_empty() {
        config.listen = args
            .listen
            .iter()
            .map(|text| parse_endpoint(text, mptcp_detour::wire::DEFAULT_PORT))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("--listen: {e}"))?;
    }
    for file in &args.psk_file {
        config.keys.push(KeyConfig {
            file: file.clone(),
            clients: vec![Default::default()],
            name: None,
        });
    }
    let origin = args
        .config
        .as_ref()
        .map_or("command line".to_owned(), |p| p.display().to_string());
    config.validate(&origin)?;
    // Load every key now, so a bad file stops the daemon before it touches the kernel.
    for key in &config.keys {
        mptcp_detour::key::Psk::load(&key.file)?;
    }
    Ok(config)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    mptcp_detour::cli::main(
        "mptcp-detourd",
        args.log.log_format,
        args.check_config,
        || load(&args),
        mptcp_detour::host::run,
    )
}
