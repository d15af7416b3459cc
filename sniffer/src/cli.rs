//! The `mptcp-sniffer` tool: read a capture file or capture live, print one line per MPTCP
//! option (text or JSON) or the tracker's events.

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::capture::{
    self, CaptureError, CaptureReader, LinkType, LiveCapture, LiveCaptureError, LiveOptions,
};
use crate::output::OptionRecord;
use crate::tracker::{Event, Tracker, TrackerConfig};
use crate::wire::mptcp::OPTION_KIND;

/// What to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputMode {
    /// One readable line per MPTCP option.
    #[default]
    Text,
    /// One JSON object per MPTCP option.
    Json,
    /// One readable line per tracker event.
    Events,
    /// One JSON object per tracker event.
    EventsJson,
}

/// Where packets come from and what to print.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunOptions {
    /// Capture file to read.
    pub read: Option<PathBuf>,
    /// Interfaces to capture on live.
    pub interfaces: Vec<String>,
    /// Output mode.
    pub mode: OutputMode,
    /// Tracker limits and the multipath threshold.
    pub tracker: TrackerConfig,
    /// Live capture: stop after this many frames.
    pub frame_limit: Option<u64>,
    /// Live capture: stop after this long.
    pub duration: Option<Duration>,
    /// Live capture: promiscuous mode.
    pub promiscuous: bool,
}

/// Why the tool failed.
#[derive(Debug, Error)]
pub enum RunError {
    /// Neither a file nor an interface was given, or both were.
    #[error("give either --read FILE or at least one --interface IF")]
    BadSource,
    /// The capture file is unreadable or unsupported.
    #[error("{path}: {source}")]
    Capture {
        /// The file.
        path: String,
        /// Why.
        source: CaptureError,
    },
    /// Live capture failed to start.
    #[error(transparent)]
    Live(#[from] LiveCaptureError),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
}

/// What a run saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Frames read.
    pub frames: u64,
    /// TCP segments decoded.
    pub segments: u64,
    /// MPTCP options printed (or tracked in events mode).
    pub options: u64,
    /// Frames whose headers could not be decoded.
    pub undecodable_frames: u64,
    /// Set when the file ended in the middle of a record (everything before was processed).
    pub truncated: Option<String>,
}

/// Decodes frames, feeds the tracker and prints.
struct Printer<'w> {
    tracker: Tracker,
    mode: OutputMode,
    out: &'w mut dyn Write,
    summary: RunSummary,
}

impl Printer<'_> {
    fn frame(
        &mut self,
        number: u64,
        timestamp: Duration,
        link: LinkType,
        data: &[u8],
    ) -> io::Result<()> {
        self.summary.frames += 1;
        let segment = match capture::decode_frame(link, data) {
            Ok(Some(segment)) => segment,
            Ok(None) => return Ok(()),
            Err(_) => {
                self.summary.undecodable_frames += 1;
                return Ok(());
            }
        };
        self.summary.segments += 1;
        let source = std::net::SocketAddr::new(segment.src, segment.src_port);
        let destination = std::net::SocketAddr::new(segment.dst, segment.dst_port);
        let before = match self.mode {
            OutputMode::Text | OutputMode::Json => {
                self.tracker.connection_token(source, destination)
            }
            _ => None,
        };
        self.tracker.handle_segment(timestamp, &segment);
        match self.mode {
            OutputMode::Text | OutputMode::Json => {
                let connection = self
                    .tracker
                    .connection_token(source, destination)
                    .or(before);
                for option in segment.tcp_options() {
                    let Ok(option) = option else {
                        break;
                    };
                    if option.kind != OPTION_KIND {
                        continue;
                    }
                    self.summary.options += 1;
                    let mut record = OptionRecord::new(number, timestamp, &segment, option.bytes);
                    record.connection = connection;
                    let line = if self.mode == OutputMode::Json {
                        record.to_json()
                    } else {
                        record.to_text()
                    };
                    writeln!(self.out, "{line}")?;
                }
                while self.tracker.poll_event().is_some() {}
            }
            OutputMode::Events | OutputMode::EventsJson => {
                while let Some(event) = self.tracker.poll_event() {
                    self.event(number, timestamp, &event)?;
                }
            }
        }
        Ok(())
    }

    fn event(&mut self, number: u64, timestamp: Duration, event: &Event) -> io::Result<()> {
        if self.mode == OutputMode::EventsJson {
            let mut value = serde_json::to_value(event).map_err(io::Error::other)?;
            if let serde_json::Value::Object(fields) = &mut value {
                fields.insert("frame".into(), number.into());
                fields.insert("ts".into(), timestamp.as_secs_f64().into());
            }
            writeln!(self.out, "{value}")
        } else {
            writeln!(
                self.out,
                "{number} {:.6} {event:?}",
                timestamp.as_secs_f64()
            )
        }
    }
}

/// Runs the tool with `options`, printing to `out`.
pub fn run(options: &RunOptions, out: &mut dyn Write) -> Result<RunSummary, RunError> {
    let mut printer = Printer {
        tracker: Tracker::new(options.tracker.clone()),
        mode: options.mode,
        out,
        summary: RunSummary::default(),
    };
    let result = match (&options.read, options.interfaces.is_empty()) {
        (Some(path), true) => run_file(path, &mut printer),
        (None, false) => run_live(options, &mut printer),
        _ => return Err(RunError::BadSource),
    };
    match result {
        Ok(()) => {}
        // A closed pipe (`| head`) ends the run quietly.
        Err(RunError::Output(error)) if error.kind() == io::ErrorKind::BrokenPipe => {}
        Err(error) => return Err(error),
    }
    printer.out.flush().or_else(|error| {
        if error.kind() == io::ErrorKind::BrokenPipe {
            Ok(())
        } else {
            Err(error)
        }
    })?;
    Ok(printer.summary)
}

fn run_file(path: &std::path::Path, printer: &mut Printer<'_>) -> Result<(), RunError> {
    let capture_error = |source| RunError::Capture {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(|source| {
        capture_error(CaptureError::Io {
            path: path.display().to_string(),
            source,
        })
    })?;
    let mut reader = CaptureReader::new(file).map_err(capture_error)?;
    loop {
        match reader.next_frame() {
            Ok(Some(frame)) => {
                printer.frame(frame.number, frame.timestamp, frame.link, frame.data)?
            }
            Ok(None) => {
                printer.summary.truncated = reader.incomplete().map(|record| record.to_string());
                return Ok(());
            }
            // Frames before the bad record were printed; the file as a whole is unreadable.
            Err(error) => return Err(capture_error(error)),
        }
    }
}

fn run_live(options: &RunOptions, printer: &mut Printer<'_>) -> Result<(), RunError> {
    let live = LiveCapture::start(&LiveOptions {
        interfaces: options.interfaces.clone(),
        promiscuous: options.promiscuous,
        ..LiveOptions::default()
    })?;
    let started = Instant::now();
    let mut number = 0;
    loop {
        if options
            .duration
            .is_some_and(|limit| started.elapsed() >= limit)
            || options.frame_limit.is_some_and(|limit| number >= limit)
        {
            return Ok(());
        }
        let Some(frame) = live.next_frame(Duration::from_millis(200)) else {
            continue;
        };
        number += 1;
        printer.frame(number, frame.timestamp, LinkType::RawIp, &frame.data)?;
        printer.out.flush()?;
    }
}
