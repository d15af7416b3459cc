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
    #[arg(long, value_name = "FILE", required_unless_present = "generate_key")]
    pub config: Option<std::path::PathBuf>,
    /// Check the configuration (and its key file) and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Print a key file entry with a fresh random 32-byte secret and this
    /// key ID, and exit (`[auth] key_file`; give both ends the same).
    #[arg(long, value_name = "ID", conflicts_with_all = ["config", "check_config"])]
    pub generate_key: Option<u8>,
    /// `--log-format`.
    #[command(flatten)]
    pub log: mptcp_ops::LogArgs,
}

/// A binary's `main`: parses `args`, sets up logging, loads the configuration
/// with `load`, and unless only checking, runs `run` until SIGTERM or SIGINT
/// (SIGHUP reloads with `load` again). An error is printed once, on one line
/// ([`mptcp_ops::report`]).
pub fn main<C, F>(
    program: &str,
    args: Args,
    load: fn(&std::path::Path) -> Result<C, crate::config::ConfigError>,
    run: impl FnOnce(
        C,
        crate::shell::Reload<C>,
        std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    ) -> F,
) -> std::process::ExitCode
where
    C: 'static,
    F: std::future::Future<Output = Result<(), crate::shell::ShellError>>,
{
    init_logging(args.log.log_format);
    mptcp_ops::report::exit(program, run_main(args, load, run))
}

fn run_main<C, F>(
    args: Args,
    load: fn(&std::path::Path) -> Result<C, crate::config::ConfigError>,
    run: impl FnOnce(
        C,
        crate::shell::Reload<C>,
        std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    ) -> F,
) -> anyhow::Result<()>
where
    C: 'static,
    F: std::future::Future<Output = Result<(), crate::shell::ShellError>>,
{
    if let Some(id) = args.generate_key {
        print!("{}", crate::auth::generate_key_stanza(id)?);
        return Ok(());
    }
    let Some(path) = args.config else {
        anyhow::bail!("--config FILE is required");
    };
    let config = load(&path)?;
    if args.check_config {
        println!("{}: ok", path.display());
        return Ok(());
    }
    let reload: crate::shell::Reload<C> = std::sync::Arc::new(move || load(&path));
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(config, reload, Box::pin(mptcp_proxy::termination())))?;
    Ok(())
}
