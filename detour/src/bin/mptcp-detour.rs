//! `mptcp-detour`: the client daemon. Runs the userspace MPTCP path manager of its network namespace and
//! adds subflows through NAT and tunnel detours to the MPTCP connections its policy selects.

use std::path::PathBuf;

use clap::Parser;
use mptcp_detour::client::config::{ClientConfig, NatDetourConfig, TunnelDetourConfig};
use mptcp_detour::config::{parse_endpoint, Validated};

/// Client daemon for MPTCP detour routing (mptcp-detourd on the detours).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// A NAT detour running mptcp-detourd, ADDR[:PORT] (port 45672 by default); repeatable, oldest
    /// first. Added to the config file's.
    #[arg(long, value_name = "ADDR[:PORT]")]
    nat_detour: Vec<String>,
    /// A tunnel interface to the detour (OpenVPN's tun0, ...); repeatable, oldest first. Added to the
    /// config file's.
    #[arg(long, value_name = "IFACE")]
    tunnel_detour: Vec<String>,
    /// Pre-shared key file (one line of at least 32 hex digits) for NAT detours without their own.
    #[arg(long, value_name = "FILE")]
    psk_file: Option<PathBuf>,
    /// Detour subflows per connection (default 2, as in the thesis).
    #[arg(long, value_name = "N")]
    max_detours: Option<usize>,
    /// TOML configuration (example: deploy/examples/mptcp-detour.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the configuration and key files, then exit.
    #[arg(long)]
    check_config: bool,
    /// `--log-format`.
    #[command(flatten)]
    log: mptcp_ops::LogArgs,
}

fn load(args: &Args) -> anyhow::Result<ClientConfig> {
    let mut config = match &args.config {
        Some(path) => mptcp_detour::config::read_toml(path)?,
        None => ClientConfig::default(),
    };
    for text in &args.nat_detour {
        config.nat_detours.push(NatDetourConfig {
            address: parse_endpoint(text, mptcp_detour::wire::DEFAULT_PORT)
                .map_err(|e| anyhow::anyhow!("--nat-detour: {e}"))?,
            psk_file: None,
            version: 2,
        });
    }
    for interface in &args.tunnel_detour {
        config.tunnel_detours.push(TunnelDetourConfig {
            interface: interface.clone(),
            mss: None,
        });
    }
    if let Some(file) = &args.psk_file {
        config.psk_file = Some(file.clone());
    }
    if let Some(n) = args.max_detours {
        config.max_detours = n;
    }
    let origin = args
        .config
        .as_ref()
        .map_or("command line".to_owned(), |p| p.display().to_string());
    config.validate(&origin)?;
    for i in 0..config.nat_detours.len() {
        if config.nat_detours[i].version == 2 {
            if let Some(file) = config.key_file(i) {
                mptcp_detour::key::Psk::load(file)?;
            }
        }
    }
    Ok(config)
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    mptcp_detour::cli::main(
        "mptcp-detour",
        args.log.log_format,
        args.check_config,
        || load(&args),
        mptcp_detour::client::run,
    )
}
