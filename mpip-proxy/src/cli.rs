//! What both binaries share: arguments, logging, the shutdown signal, and
//! the sequence parse → check → run.

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), as every binary of the workspace does
/// ([`mptcp_ops::logging`]: no colour off a terminal, `--log-format json`).
pub fn init_logging(format: mptcp_ops::LogFormat) {
    mptcp_ops::logging::init(format);
}

/// Both binaries' command line.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// TOML configuration file (examples: deploy/examples/).
    #[arg(long, value_name = "FILE")]
    pub config: std::path::PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    pub check_config: bool,
    /// `--log-format`.
    #[command(flatten)]
    pub log: mptcp_ops::LogArgs,
}

/// A binary's `main`: parses `args`, sets up logging, loads the configuration
/// with `load`, and unless only checking, runs `run` until SIGTERM or SIGINT.
/// An error is printed once, on one line ([`mptcp_ops::report`]).
pub fn main<C, F>(
    program: &str,
    args: Args,
    load: impl FnOnce(&std::path::Path) -> Result<C, crate::config::ConfigError>,
    run: impl FnOnce(C, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> F,
) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<(), crate::shell::ShellError>>,
{
    init_logging(args.log.log_format);
    mptcp_ops::report::exit(program, run_main(args, load, run))
}

fn run_main<C, F>(
    args: Args,
    load: impl FnOnce(&std::path::Path) -> Result<C, crate::config::ConfigError>,
    run: impl FnOnce(C, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> F,
) -> anyhow::Result<()>
where
    F: std::future::Future<Output = Result<(), crate::shell::ShellError>>,
{
    let config = load(&args.config)?;
    if args.check_config {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(config, Box::pin(mptcp_proxy::termination())))?;
    Ok(())
}
