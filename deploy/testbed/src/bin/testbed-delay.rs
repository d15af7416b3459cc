//! `testbed-delay`: runs a [`testbed::DelayLine`] until SIGINT or SIGTERM, for scripts and benchmarks.
//!
//! ```text
//! testbed-delay [--netns NS] --dev IF (--egress|--ingress) --delay 20ms [--jitter 2ms] [--loss 1%]
//!               [--limit 16384] [--fail-open] [--seed N]
//! ```
//!
//! Prints `ready queue=N table=T` on stdout once packets are being delayed; on a signal it removes its
//! rule, releases held packets, prints the counters and exits 0.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use testbed::{DelayConfig, DelayLine, Direction};

/// Delays (and optionally drops) the packets of one interface and direction through nfqueue.
#[derive(Debug, Parser)]
#[command(name = "testbed-delay")]
struct Args {
    /// Network namespace (`ip netns` name); the current one when absent.
    #[arg(long)]
    netns: Option<String>,
    /// Interface whose packets are delayed.
    #[arg(long)]
    dev: String,
    /// Delay packets leaving through the interface.
    #[arg(long, conflicts_with = "ingress", required_unless_present = "ingress")]
    egress: bool,
    /// Delay packets arriving on the interface.
    #[arg(long)]
    ingress: bool,
    /// One-way delay: a number with unit `us`, `ms` or `s` (e.g. `20ms`).
    #[arg(long, value_parser = parse_duration)]
    delay: Duration,
    /// Uniform jitter around the delay (`2ms`); order is kept.
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    jitter: Duration,
    /// Random loss: `1%` or a fraction such as `0.01`.
    #[arg(long, value_parser = parse_loss, default_value = "0")]
    loss: f64,
    /// Packets held at most; more are dropped (or accepted undelayed with --fail-open).
    #[arg(long, default_value_t = DelayConfig::default().limit)]
    limit: u32,
    /// Accept packets undelayed when the queue is full, instead of dropping them.
    #[arg(long)]
    fail_open: bool,
    /// Seed for loss and jitter (0: from the clock).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?}: give a unit (us, ms or s)"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: not a number"))?;
    let seconds = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        _ => return Err(format!("{text:?}: unit must be us, ms or s")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

fn parse_loss(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let value = match text.strip_suffix('%') {
        Some(percent) => percent
            .parse::<f64>()
            .map(|p| p / 100.0)
            .map_err(|_| format!("{text:?}: not a percentage"))?,
        None => text
            .parse::<f64>()
            .map_err(|_| format!("{text:?}: not a fraction"))?,
    };
    if !(0.0..=1.0).contains(&value) {
        return Err(format!("{text:?}: loss must be between 0 and 100%"));
    }
    Ok(value)
}

/// Blocks SIGINT and SIGTERM in every thread (call before starting any) and returns the set to wait on.
fn block_termination_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: the set is initialised by sigemptyset before use; pthread_sigmask gets valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let signals = block_termination_signals()?;
    let direction = if args.ingress {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    let config = DelayConfig {
        delay: args.delay,
        jitter: args.jitter,
        loss: args.loss,
        limit: args.limit,
        fail_open: args.fail_open,
        seed: args.seed,
    };
    let line = DelayLine::start(args.netns.as_deref(), &args.dev, direction, config)
        .with_context(|| format!("starting the delay line on {}", args.dev))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready queue={} table={}", line.queue(), line.table())?;
        out.flush()?;
    }
    let mut signal = 0;
    // SAFETY: signals is a valid set; sigwait writes the signal number.
    let rc = unsafe { libc::sigwait(&signals, &mut signal) };
    if rc != 0 {
        bail!("sigwait: {}", std::io::Error::from_raw_os_error(rc));
    }
    let stats = line.stop().context("stopping the delay line")?;
    println!(
        "stopped queued={} released={} lost={} max_held={} verdict_errors={}",
        stats.queued, stats.released, stats.lost, stats.max_held, stats.verdict_errors
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_losses_parse() {
        assert_eq!(parse_duration("20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert!(parse_duration("20").is_err());
        assert!(parse_duration("20m").is_err());
        assert_eq!(parse_loss("1%"), Ok(0.01));
        assert_eq!(parse_loss("0.25"), Ok(0.25));
        assert!(parse_loss("150%").is_err());
        assert!(parse_loss("x").is_err());
    }
}
