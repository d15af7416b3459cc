//! `mpip-proxy`: the MPIP proxy end. Parses arguments and the configuration,
//! then runs until SIGTERM or SIGINT.

use clap::Parser;
use mpip_proxy::config::ProxyEndConfig;

/// Multipath IP proxy end: terminates MPIP sessions on a TUN address and
/// serves them with the mptcp-proxy HTTP proxy core.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    common: mpip_proxy::cli::Args,
}

fn main() -> std::process::ExitCode {
    mpip_proxy::cli::main(
        "mpip-proxy",
        Cli::parse().common,
        ProxyEndConfig::from_file,
        mpip_proxy::shell::run_proxy_end,
    )
}
