//! What both binaries share: arguments, logging, the shutdown signal, and
//! the sequence parse → check → run.

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
}

/// A binary's `main`: parses `args`, sets up logging, loads the configuration
/// with `load`, and unless only checking, runs `run` until SIGTERM or SIGINT.
pub fn main<C, F>(
    args: Args,
    load: impl FnOnce(&std::path::Path) -> Result<C, crate::config::ConfigError>,
    run: impl FnOnce(C, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> F,
) -> anyhow::Result<()>
where
    F: std::future::Future<Output = Result<(), crate::shell::ShellError>>,
{
    if let Some(id) = args.generate_key {
        print!("{}", crate::auth::generate_key_stanza(id)?);
        return Ok(());
    }
    init_logging();
    let Some(path) = args.config else {
        anyhow::bail!("--config FILE is required");
    };
    let config = load(&path)?;
    if args.check_config {
        println!("{}: ok", path.display());
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(config, Box::pin(mptcp_proxy::termination())))?;
    Ok(())
}
