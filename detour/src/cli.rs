//! What both binaries share: logging, the sequence load → check → run until SIGTERM or SIGINT, and an
//! error printed once, on one line (`mptcp-ops`).

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;

/// A binary's `main` after argument parsing: `load` builds the configuration (and checks key files);
/// with `check_config` it stops there, else `run` runs until a termination signal.
pub fn main<C, F, E>(
    program: &str,
    log_format: mptcp_ops::LogFormat,
    check_config: bool,
    load: impl FnOnce() -> anyhow::Result<C>,
    run: impl FnOnce(C, Pin<Box<dyn Future<Output = ()> + Send>>) -> F,
) -> ExitCode
where
    F: Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    mptcp_ops::logging::init(log_format);
    mptcp_ops::report::exit(
        program,
        (|| {
            let config = load()?;
            if check_config {
                println!("configuration ok");
                return Ok(());
            }
            let runtime = tokio::runtime::Runtime::new()
                .map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))?;
            runtime.block_on(run(config, Box::pin(mptcp_proxy::termination())))?;
            Ok(())
        })(),
    )
}
