//! Diagnostics on stderr, fit for a terminal, journald, a file or a log shipper.
//!
//! Colour escapes are written only when stderr is a terminal (and `NO_COLOR` is unset): under systemd or
//! redirected to a file, lines stay plain text. `--log-format json` prints one JSON object a line.
//! `RUST_LOG` filters as usual (default `info`). Access logs are not diagnostics and have their own sink.

use std::io::IsTerminal;
use std::sync::OnceLock;

/// How diagnostics are printed on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

/// The logging flag every binary flattens into its command line.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LogArgs {
    /// Diagnostic log format on stderr.
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub log_format: LogFormat,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Whether colour escapes fit `stderr`: a terminal, and `NO_COLOR` unset (no-color.org).
pub fn ansi_on_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Installs the global subscriber; later calls keep the first one.
pub fn init(format: LogFormat) {
    if FORMAT.set(format).is_err() {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi_on_stderr());
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The format [`init`] installed, if it ran.
pub fn format() -> Option<LogFormat> {
    FORMAT.get().copied()
}
