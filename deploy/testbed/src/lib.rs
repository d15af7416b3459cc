//! The seeds' lab on one machine, for tests and benchmarks.
//!
//! [`Testbed::new`] runs `testbed.sh up` (the single description of the topology, also usable by hand) and
//! [`Drop`] runs `testbed.sh down`, so the namespaces go away even when a test fails. Every testbed gets a
//! unique prefix, so tests running in parallel never share a namespace. Veths are created directly inside
//! their namespaces, so interface names and addresses are the same in every testbed:
//!
//! ```text
//! client ns                 proxy ns                       server ns
//! c1 10.0.1.2 <- path 1 ->  p1 10.0.1.1
//! c2 10.0.2.2 <- path 2 ->  p2 10.0.2.1
//!                           p3 10.0.3.1  <------------->   s1 10.0.3.2
//! ```
//!
//! With [`Options::second_client`], a second client namespace joins the proxy over two more paths:
//! `d1 10.0.4.2 <-> p4 10.0.4.1` and `d2 10.0.5.2 <-> p5 10.0.5.1` (IPv4 only, no shaping).
//!
//! [`detour::DetourLab`] builds the detour lab of seed 003's Fig. 5.1 (`detour.sh`) the same way.

pub mod cluster;
pub mod delay;
pub mod detour;

pub use delay::{DelayConfig, DelayLine, Direction};

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The client's address on path 1 (interface `c1`).
pub const CLIENT_PATH1: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// The client's address on path 2 (interface `c2`).
pub const CLIENT_PATH2: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The proxy's address on path 1 (interface `p1`).
pub const PROXY_PATH1: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// The proxy's address on path 2 (interface `p2`).
pub const PROXY_PATH2: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// The proxy's address towards the server (interface `p3`).
pub const PROXY_UPSTREAM: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 1);
/// The legacy server's address (interface `s1`).
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 2);
/// The proxy's IPv6 address on path 1.
pub const PROXY_PATH1_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
/// The legacy server's IPv6 address.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 3, 0, 0, 0, 0, 0, 2);

/// Errors while building or using a testbed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// A command could not be started.
    #[error("running {command}: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why it could not start.
        source: io::Error,
    },
    /// A command ran and failed.
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// Entering a namespace failed.
    #[error("entering namespace {namespace}: {source}")]
    Setns {
        /// The namespace.
        namespace: String,
        /// The OS error.
        source: io::Error,
    },
    /// Something did not come up in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// Other I/O.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Result alias for this crate.
pub type Result<T, E = TestbedError> = std::result::Result<T, E>;

/// Whether a test that needs root (network namespaces) should skip.
///
/// Returns `true` (and prints why) when not root and `CI` is unset. Under `CI=true` a skip is a failure,
/// so this panics instead.
pub fn skip_unless_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return false;
    }
    assert!(
        std::env::var("CI").map(|v| v != "true").unwrap_or(true),
        "CI=true but not root: the netns end-to-end tests must run in CI"
    );
    eprintln!("skipping: network-namespace tests need root");
    true
}

/// Testbed parameters: per-path shaping and loss.
#[derive(Debug, Clone)]
pub struct Options {
    /// HTB rate of each path in Mbit/s, both directions; `None` leaves the path unshaped.
    pub path_rate_mbit: [Option<u32>; 2],
    /// Random loss of each path in percent (nftables `numgen random`), both directions.
    pub path_loss_percent: [Option<u8>; 2],
    /// Whether the client gets the MPTCP `subflow` endpoint on path 2 (a second subflow).
    pub subflow_endpoint: bool,
    /// Whether a second client host ([`Host::SecondClient`]) is built.
    pub second_client: bool,
    /// More two-path clients on two bridged access networks
    /// ([`Testbed::extra_client_ns`]): client K (1..=N) has `a1` 10.1.K.2/16
    /// and `a2` 10.2.K.2/16; the proxy has `br1` 10.1.0.1/16 and `br2`
    /// 10.2.0.1/16.
    pub extra_clients: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            path_rate_mbit: [None, None],
            path_loss_percent: [None, None],
            subflow_endpoint: true,
            second_client: false,
            extra_clients: 0,
        }
    }
}

/// One of the three hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// The MPTCP client, two paths.
    Client,
    /// The proxy.
    Proxy,
    /// The legacy TCP server.
    Server,
    /// A second client with two paths of its own, if [`Options::second_client`] asked for it.
    SecondClient,
}

/// A running testbed. Dropping it tears everything down.
#[derive(Debug)]
pub struct Testbed {
    prefix: String,
    namespaces: [String; 4],
}

/// The topology script.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed.sh")
}

fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion; a non-zero exit is an error carrying stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let line = command_line(cmd);
    let out = cmd.output().map_err(|source| TestbedError::Spawn {
        command: line.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(TestbedError::Failed {
            command: line,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// A namespace prefix no other lab of this process uses (`mpx<pid>n<k>`, which `deploy/test.sh`
/// recognises as a leftover when the process is gone).
pub fn unique_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "mpx{}n{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A command that runs `program` inside network namespace `ns`.
pub fn command_in(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// Starts nginx in namespace `ns`, serving `root` on each of `listen`, with its files under
/// `work_dir`, and waits until the first address accepts connections.
pub fn start_nginx_in(
    ns: &str,
    listen: &[SocketAddr],
    root: &Path,
    work_dir: &Path,
) -> Result<Background> {
    let conf = work_dir.join("nginx.conf");
    let mut f = std::fs::File::create(&conf)?;
    let first = listen.first().copied();
    let listen: String = listen.iter().map(|a| format!("listen {a}; ")).collect();
    write!(
        f,
        "daemon off;\nuser root;\nworker_processes 1;\npid {work}/nginx.pid;\nerror_log {work}/error.log;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log {work}/access.log;\n  client_body_temp_path {work}/body;\n  \
         proxy_temp_path {work}/proxy;\n  fastcgi_temp_path {work}/fastcgi;\n  uwsgi_temp_path {work}/uwsgi;\n  \
         scgi_temp_path {work}/scgi;\n  sendfile on;\n  keepalive_requests 100000;\n  \
         server {{ {listen}root {root}; }}\n}}\n",
        work = work_dir.display(),
        root = root.display(),
    )?;
    let conf = conf.to_string_lossy().into_owned();
    let mut cmd = command_in(ns, "nginx");
    cmd.args(["-c", &conf]).stdin(Stdio::null());
    let nginx = Background::start(cmd)?;
    if let Some(first) = first {
        wait_for_tcp_in(ns, first, Duration::from_secs(10))?;
    }
    Ok(nginx)
}

/// Waits until `addr` accepts TCP connections from inside `ns`.
pub fn wait_for_tcp_in(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    in_namespace(ns, || loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(TestbedError::Timeout(format!("{addr} in {ns}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    })?
}

impl Testbed {
    /// Builds a new testbed with a unique prefix.
    pub fn new(options: Options) -> Result<Self> {
        let prefix = unique_prefix();
        let namespaces = ["cli", "prx", "srv", "cl2"].map(|h| format!("{prefix}-{h}"));
        // Constructed before `up`, so a half-built testbed is still torn down.
        let testbed = Self { prefix, namespaces };
        let mut cmd = Command::new(script());
        cmd.arg("up").arg(&testbed.prefix);
        for (i, rate) in options.path_rate_mbit.iter().enumerate() {
            if let Some(rate) = rate {
                cmd.arg(format!("--rate{}", i + 1)).arg(rate.to_string());
            }
        }
        for (i, loss) in options.path_loss_percent.iter().enumerate() {
            if let Some(loss) = loss {
                cmd.arg(format!("--loss{}", i + 1)).arg(loss.to_string());
            }
        }
        if !options.subflow_endpoint {
            cmd.arg("--no-endpoint");
        }
        if options.second_client {
            cmd.arg("--second-client");
        }
        if options.extra_clients > 0 {
            cmd.arg("--clients").arg(options.extra_clients.to_string());
        }
        run(&mut cmd)?;
        Ok(testbed)
    }

    /// The namespace name of a host.
    pub fn ns(&self, host: Host) -> &str {
        match host {
            Host::Client => &self.namespaces[0],
            Host::Proxy => &self.namespaces[1],
            Host::Server => &self.namespaces[2],
            Host::SecondClient => &self.namespaces[3],
        }
    }

    /// The namespace of extra client `k` (1-based, [`Options::extra_clients`]).
    pub fn extra_client_ns(&self, k: usize) -> String {
        format!("{}-c{k}", self.prefix)
    }

    /// The client namespace.
    pub fn client_ns(&self) -> &str {
        self.ns(Host::Client)
    }

    /// The proxy namespace.
    pub fn proxy_ns(&self) -> &str {
        self.ns(Host::Proxy)
    }

    /// The server namespace.
    pub fn server_ns(&self) -> &str {
        self.ns(Host::Server)
    }

    /// A command that runs `program` inside namespace `ns`.
    pub fn command(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(ns, program)
    }

    /// Runs a command inside `ns` to completion and returns its stdout.
    pub fn exec(&self, ns: &str, argv: &[&str]) -> Result<String> {
        let (program, args) = argv.split_first().expect("exec needs a program");
        let out = run(self.command(ns, program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a long-running command inside `ns`; it is killed when the returned guard drops.
    pub fn spawn(&self, ns: &str, argv: &[&str]) -> Result<Background> {
        let (program, args) = argv.split_first().expect("spawn needs a program");
        let mut cmd = self.command(ns, program);
        cmd.args(args).stdin(Stdio::null());
        Background::start(cmd)
    }

    /// Runs `f` on a thread that has entered namespace `ns`. Sockets it creates stay in that namespace.
    pub fn in_ns<T: Send>(&self, ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_namespace(ns, f)
    }

    /// Waits until `addr` accepts TCP connections from inside `ns`.
    pub fn wait_for_tcp(&self, ns: &str, addr: SocketAddr, timeout: Duration) -> Result<()> {
        wait_for_tcp_in(ns, addr, timeout)
    }

    /// Starts a [`DelayLine`] on `dev`'s `direction` in `host`'s namespace; it stops when dropped.
    pub fn delay(
        &self,
        host: Host,
        dev: &str,
        direction: Direction,
        config: DelayConfig,
    ) -> Result<DelayLine, delay::DelayError> {
        DelayLine::start(Some(self.ns(host)), dev, direction, config)
    }

    /// Starts nginx in `host`'s namespace, serving `root` on each of `listen`, and waits for the first.
    /// Its pid file, logs and temporary files go to `work_dir`, which must differ per instance.
    pub fn start_nginx_in(
        &self,
        host: Host,
        root: &Path,
        work_dir: &Path,
        listen: &[SocketAddr],
    ) -> Result<Background> {
        let conf = work_dir.join("nginx.conf");
        let listens: String = listen.iter().map(|a| format!("listen {a}; ")).collect();
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nuser root;\nworker_processes 1;\npid {work}/nginx.pid;\nerror_log {work}/error.log;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  access_log {work}/access.log;\n  client_body_temp_path {work}/body;\n  \
                 proxy_temp_path {work}/proxy;\n  fastcgi_temp_path {work}/fastcgi;\n  uwsgi_temp_path {work}/uwsgi;\n  \
                 scgi_temp_path {work}/scgi;\n  sendfile on;\n  types {{ text/html html; video/mp4 mp4; }}\n  \
                 server {{ {listens}root {root}; }}\n}}\n",
                work = work_dir.display(),
                root = root.display(),
            ),
        )?;
        let conf = conf.to_string_lossy().into_owned();
        let nginx = self.spawn(self.ns(host), &["nginx", "-c", &conf])?;
        if let Some(first) = listen.first() {
            self.wait_for_tcp(self.ns(host), *first, Duration::from_secs(10))?;
        }
        Ok(nginx)
    }

    /// Reads an interface's byte counters `(rx_bytes, tx_bytes)` inside `ns`.
    pub fn interface_bytes(&self, ns: &str, interface: &str) -> Result<(u64, u64)> {
        let read = |dir: &str| -> Result<u64> {
            let text = self.exec(
                ns,
                &[
                    "cat",
                    &format!("/sys/class/net/{interface}/statistics/{dir}_bytes"),
                ],
            )?;
            text.trim()
                .parse()
                .map_err(|e| TestbedError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))
        };
        Ok((read("rx")?, read("tx")?))
    }

    /// Reads a kernel SNMP/netstat counter (e.g. `MPTcpExtMPJoinSynRx`) inside `ns`.
    pub fn nstat(&self, ns: &str, counter: &str) -> Result<u64> {
        let text = self.exec(ns, &["nstat", "-a", "-z", "-j"])?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| TestbedError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        Ok(json["kernel"][counter].as_u64().unwrap_or(0))
    }

    /// Starts nginx in the server namespace, serving `root` on port 80 (IPv4 and IPv6) and 8081 (IPv4;
    /// a second service for per-port routing tests), and waits for it.
    pub fn start_nginx(&self, root: &Path, work_dir: &Path) -> Result<Background> {
        start_nginx_in(
            self.server_ns(),
            &[
                SocketAddr::new(IpAddr::V4(SERVER), 80),
                SocketAddr::new(IpAddr::V6(SERVER_V6), 80),
                SocketAddr::new(IpAddr::V4(SERVER), 8081),
            ],
            root,
            work_dir,
        )
    }
}

impl Testbed {
    /// Gives namespace `ns` its own `/etc/NAME` (e.g. `hosts`, `resolv.conf`): `ip netns exec`
    /// bind-mounts `/etc/netns/NS/NAME` over it for the programs it starts. Removed on drop.
    pub fn set_etc_file(&self, ns: &str, name: &str, contents: &str) -> Result<()> {
        let dir = PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), contents)?;
        Ok(())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
        }
        tear_down(&script(), &self.prefix);
    }
}

/// Runs `SCRIPT down PREFIX`, reporting (not panicking: it runs in `Drop`) when it fails.
pub(crate) fn tear_down(script: &Path, prefix: &str) {
    let result = Command::new(script)
        .arg("down")
        .arg(prefix)
        .stdout(Stdio::null())
        .status();
    if !matches!(result, Ok(s) if s.success()) {
        eprintln!(
            "{} down {prefix}: teardown failed: {result:?}",
            script.display()
        );
    }
}

/// Sets a socket's receive buffer past `net.core.rmem_max` (SO_RCVBUFFORCE, needs CAP_NET_ADMIN): a test
/// that counts datagrams must not mistake a full socket buffer (a reader not scheduled in time on a
/// loaded machine) for loss on the path.
pub fn force_receive_buffer(socket: &impl AsRawFd, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: a valid socket descriptor and a pointer to a c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Counts the datagrams `receiver` gets until it has been quiet for 500 ms, on a thread of its own;
/// join the handle for the count. The socket's buffer is forced to 8 MiB first (see
/// [`force_receive_buffer`]), so only the path can lose datagrams.
pub fn count_datagrams(receiver: std::net::UdpSocket) -> io::Result<std::thread::JoinHandle<u32>> {
    receiver.set_read_timeout(Some(std::time::Duration::from_millis(500)))?;
    force_receive_buffer(&receiver, 8 << 20)?;
    Ok(std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut received = 0u32;
        while receiver.recv(&mut buf).is_ok() {
            received += 1;
        }
        received
    }))
}

/// Sends `count` numbered datagrams to `to` from a new socket in the calling thread's namespace,
/// pausing 2 ms after every 50 so a receiver on a loaded machine keeps up.
pub fn send_numbered(to: std::net::SocketAddr, count: u32) -> io::Result<()> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    for seq in 0..count {
        socket.send_to(&seq.to_be_bytes(), to)?;
        if seq % 50 == 49 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    Ok(())
}

/// Runs `f` on a new thread inside the named network namespace (`/var/run/netns/NAME`).
pub fn in_namespace<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_namespace(ns)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Moves the calling thread into the named network namespace (`/var/run/netns/NAME`) for good: for
/// threads made for the purpose.
pub fn enter_namespace(ns: &str) -> Result<()> {
    let setns_error = |source| TestbedError::Setns {
        namespace: ns.to_owned(),
        source,
    };
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).map_err(setns_error)?;
    // SAFETY: setns on a valid namespace fd affects only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(setns_error(io::Error::last_os_error()));
    }
    Ok(())
}

/// A background process, killed when dropped.
#[derive(Debug)]
pub struct Background {
    child: Child,
    command: String,
}

impl Background {
    /// Starts `cmd` in the background.
    pub fn start(mut cmd: Command) -> Result<Self> {
        let command = command_line(&cmd);
        let child = cmd.spawn().map_err(|source| TestbedError::Spawn {
            command: command.clone(),
            source,
        })?;
        Ok(Self { child, command })
    }

    /// The process id (of `ip netns exec`, which execs the program, so it is the program's pid).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(())
    }

    /// Waits for the process to exit, up to `timeout`; on timeout it is killed and an error returned.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(TestbedError::Timeout(format!("exit of {}", self.command)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Mutable access to the child (for its pipes).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift), so corruption cannot hide in
/// repeating patterns; any prefix can be regenerated from `seed`.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The body of one cargo-fuzz target: what its `fuzz_target!` calls.
pub type FuzzFn = fn(&[u8]);

/// Replays every checked-in fuzz corpus file (`CRATE/fuzz/corpus/TARGET/*`) through the function its
/// cargo-fuzz target calls; `crate_dir` is the crate's `CARGO_MANIFEST_DIR`. Panics naming the file
/// that panics, a target of `fuzz/Cargo.toml` without a row in `targets`, or an empty corpus.
pub fn replay_fuzz_corpus(crate_dir: &str, targets: &[(&str, FuzzFn)]) {
    let fuzz = Path::new(crate_dir).join("fuzz");
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if let Some(name) = line
            .strip_prefix("name = \"")
            .and_then(|l| l.strip_suffix('"'))
        {
            assert!(
                !in_bin || targets.iter().any(|(t, _)| *t == name),
                "fuzz target {name} has no replay row"
            );
        }
    }
    for (name, target) in targets {
        let dir = fuzz.join("corpus").join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} is empty", dir.display());
        for file in files {
            let data = std::fs::read(&file).expect("read corpus file");
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: {} panics", file.display());
        }
    }
}
