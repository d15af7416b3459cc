//! `mpip-proxy`: the MPIP proxy end. Parses arguments and the configuration,
//! then runs until SIGTERM or SIGINT.

use std::path::PathBuf;

use clap::Parser;
use mpip_proxy::config::ProxyEndConfig;

/// Multipath IP proxy end: terminates MPIP sessions on a TUN address and
/// serves them with the mptcp-proxy HTTP proxy core.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (example: deploy/examples/mpip-proxy.toml).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    mpip_proxy::cli::init_logging();
    let config = ProxyEndConfig::from_file(&args.config)?;
    if args.check_config {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(mpip_proxy::shell::run_proxy_end(
        config,
        mpip_proxy::cli::termination(),
    ))?;
    Ok(())
}
