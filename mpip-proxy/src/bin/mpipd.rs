//! `mpipd`: the MPIP client daemon. Parses arguments and the configuration,
//! then runs until SIGTERM or SIGINT.

use clap::Parser;
use mpip_proxy::config::ClientConfig;

/// Multipath IP client: sends this host's traffic through a TUN device over
/// every path to an mpip-proxy.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    common: mpip_proxy::cli::Args,
}

fn main() -> std::process::ExitCode {
    mpip_proxy::cli::main(
        "mpipd",
        Cli::parse().common,
        ClientConfig::from_file,
        mpip_proxy::shell::run_client,
    )
}
