//! `mptcp-sniffer`: print the MPTCP options (or tracker events) of a capture file or of live
//! traffic.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mptcp_sniffer::cli::{self, OutputMode, RunOptions};
use mptcp_sniffer::TrackerConfig;

/// Decode MPTCP options and track MPTCP connections and subflows.
#[derive(Debug, Parser)]
#[command(name = "mptcp-sniffer", version)]
struct Args {
    /// Read packets from a pcap or pcapng file.
    #[arg(long, short = 'r', value_name = "FILE", conflicts_with = "interface")]
    read: Option<PathBuf>,
    /// Capture live on this interface (repeatable; needs CAP_NET_RAW).
    #[arg(long, short = 'i', value_name = "IF")]
    interface: Vec<String>,
    /// Print JSON (one object per line) instead of text.
    #[arg(long)]
    json: bool,
    /// Print tracker events instead of options.
    #[arg(long)]
    events: bool,
    /// Number of active subflows that triggers the multipath event.
    #[arg(long, default_value_t = 2, value_name = "N")]
    subflow_threshold: usize,
    /// Live capture: stop after this many frames.
    #[arg(long, short = 'c', value_name = "N")]
    count: Option<u64>,
    /// Live capture: stop after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Live capture: put the interfaces in promiscuous mode.
    #[arg(long)]
    promiscuous: bool,
    #[command(flatten)]
    log: mptcp_ops::LogArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    mptcp_ops::logging::init(args.log.log_format);
    mptcp_ops::report::exit("mptcp-sniffer", real_main(args))
}

fn real_main(args: Args) -> anyhow::Result<()> {
    let mode = match (args.events, args.json) {
        (false, false) => OutputMode::Text,
        (false, true) => OutputMode::Json,
        (true, false) => OutputMode::Events,
        (true, true) => OutputMode::EventsJson,
    };
    let duration = match args.duration {
        Some(seconds) if seconds.is_finite() && seconds >= 0.0 => {
            Some(Duration::from_secs_f64(seconds))
        }
        Some(seconds) => anyhow::bail!("invalid --duration {seconds}"),
        None => None,
    };
    let options = RunOptions {
        read: args.read,
        interfaces: args.interface,
        mode,
        tracker: TrackerConfig {
            multipath_threshold: args.subflow_threshold,
            ..TrackerConfig::default()
        },
        frame_limit: args.count,
        duration,
        promiscuous: args.promiscuous,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let summary = cli::run(&options, &mut out).context("mptcp-sniffer failed")?;
    if let Some(truncated) = summary.truncated {
        eprintln!("mptcp-sniffer: warning: {truncated}");
    }
    Ok(())
}
