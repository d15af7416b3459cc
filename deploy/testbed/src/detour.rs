//! The detour lab of the thesis's Fig. 5.1 (seed 003), built by `detour.sh` (the single description of
//! that topology) and torn down on drop:
//!
//! ```text
//! client l1 10.1.1.2 -- link 1 -- r1 -- link 2 -- r2 -- link 3 -- server l3 10.1.3.2
//!                                  \                /
//!                                link 4           link 5
//!                                    \            /
//!                                     r3 -- link 6 -- detour l6 10.1.6.2
//! ```
//!
//! The client's default path crosses link 2; a detour path crosses links 4, 6 (twice) and 5.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use std::net::Ipv4Addr;

use crate::{in_namespace, run, Background, Result};

/// The client's address (link 1).
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 2);
/// The client's second address (link 7, with [`DetourOptions::second_address`]).
pub const CLIENT_SECOND: Ipv4Addr = Ipv4Addr::new(10, 1, 7, 2);
/// The server's address (link 3).
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 1, 3, 2);
/// The detour host's address (link 6).
pub const DETOUR: Ipv4Addr = Ipv4Addr::new(10, 1, 6, 2);
/// The client's end of the OpenVPN tunnel (`tun0`).
pub const TUNNEL_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 8, 0, 2);

/// Link shaping (thesis §5.1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No shaping.
    Unshaped,
    /// Access links 20 Mbit/s, core links 10 Mbit/s.
    CoreLimited,
    /// Every link 10 Mbit/s.
    Symmetric,
}

/// Lab parameters.
#[derive(Debug, Clone)]
pub struct DetourOptions {
    /// Shaping.
    pub mode: Mode,
    /// Random loss on link 2 in percent, both directions.
    pub loss2_percent: Option<f64>,
    /// Extra one-way delay on link 2 in milliseconds, each direction (needs `testbed-delay` built).
    pub delay2_ms: Option<u32>,
    /// A second client interface (`l7`, [`CLIENT_SECOND`]) with an MPTCP `subflow` endpoint.
    pub second_address: bool,
}

impl Default for DetourOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Unshaped,
            loss2_percent: None,
            delay2_ms: None,
            second_address: false,
        }
    }
}

/// One host of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetourHost {
    /// The single-homed MPTCP client.
    Client,
    /// Router 1 (links 1, 2, 4).
    R1,
    /// Router 2 (links 2, 3, 5).
    R2,
    /// Router 3 (links 4, 5, 6).
    R3,
    /// The detour host.
    Detour,
    /// The MPTCP server.
    Server,
}

impl DetourHost {
    fn suffix(self) -> &'static str {
        match self {
            DetourHost::Client => "cli",
            DetourHost::R1 => "r1",
            DetourHost::R2 => "r2",
            DetourHost::R3 => "r3",
            DetourHost::Detour => "dtr",
            DetourHost::Server => "srv",
        }
    }
}

/// The topology script.
pub fn detour_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("detour.sh")
}

/// A running detour lab; dropping it removes every namespace and what runs in them.
#[derive(Debug)]
pub struct DetourLab {
    prefix: String,
}

impl DetourLab {
    /// Builds a lab with a unique prefix (`mpx<pid>d<k>`).
    pub fn new(options: DetourOptions) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let lab = Self {
            prefix: format!(
                "mpx{}d{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ),
        };
        let mut cmd = Command::new(detour_script());
        cmd.arg("up").arg(&lab.prefix);
        cmd.arg("--mode").arg(match options.mode {
            Mode::Unshaped => "none",
            Mode::CoreLimited => "core-limited",
            Mode::Symmetric => "symmetric",
        });
        if let Some(loss) = options.loss2_percent {
            cmd.arg("--loss2").arg(loss.to_string());
        }
        if let Some(delay) = options.delay2_ms {
            cmd.arg("--delay2").arg(delay.to_string());
        }
        if options.second_address {
            cmd.arg("--second-address");
        }
        run(&mut cmd)?;
        Ok(lab)
    }

    /// The lab's namespace prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A host's namespace.
    pub fn ns(&self, host: DetourHost) -> String {
        format!("{}-{}", self.prefix, host.suffix())
    }

    /// A command that runs `program` in `host`'s namespace.
    pub fn command(&self, host: DetourHost, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)]).arg(program);
        cmd
    }

    /// Runs a command in `host`'s namespace to completion; returns its stdout.
    pub fn exec(&self, host: DetourHost, argv: &[&str]) -> Result<String> {
        let (program, args) = argv.split_first().expect("exec needs a program");
        let out = run(self.command(host, program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a long-running command in `host`'s namespace (killed when the guard drops).
    pub fn spawn(&self, host: DetourHost, argv: &[&str]) -> Result<Background> {
        let (program, args) = argv.split_first().expect("spawn needs a program");
        let mut cmd = self.command(host, program);
        cmd.args(args).stdin(Stdio::null());
        Background::start(cmd)
    }

    /// Runs `f` on a thread in `host`'s namespace.
    pub fn in_ns<T: Send>(&self, host: DetourHost, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_namespace(&self.ns(host), f)
    }

    /// Starts OpenVPN (server on the detour, client with `tun0` [`TUNNEL_CLIENT`]) and waits until both
    /// ends are up; certificates, configurations and logs go to `work_dir`. The detour masquerades the
    /// tunnel's traffic. OpenVPN stops with the lab.
    pub fn start_openvpn(&self, work_dir: &Path) -> Result<()> {
        run(Command::new(detour_script())
            .arg("vpn")
            .arg(&self.prefix)
            .arg(work_dir))?;
        Ok(())
    }
}

impl Drop for DetourLab {
    fn drop(&mut self) {
        let result = Command::new(detour_script())
            .arg("down")
            .arg(&self.prefix)
            .stdout(Stdio::null())
            .status();
        if !matches!(result, Ok(s) if s.success()) {
            eprintln!("detour lab {}: teardown failed: {result:?}", self.prefix);
        }
    }
}
