//! `mpipd`: the MPIP client daemon. Parses arguments and the configuration,
//! then runs until SIGTERM or SIGINT.

use std::path::PathBuf;

use clap::Parser;
use mpip_proxy::config::ClientConfig;

/// Multipath IP client: sends this host's traffic through a TUN device over
/// every path to an mpip-proxy.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (example: deploy/examples/mpipd.toml).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    mpip_proxy::cli::init_logging();
    let config = ClientConfig::from_file(&args.config)?;
    if args.check_config {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(mpip_proxy::shell::run_client(
        config,
        mpip_proxy::cli::termination(),
    ))?;
    Ok(())
}
