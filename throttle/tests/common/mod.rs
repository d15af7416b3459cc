//! Test helpers: privileged-test gate and throwaway network namespaces.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use std::sync::atomic::{AtomicU32, Ordering};

/// Whether privileged tests can run. Without root: skip with a message,
/// unless CI is set, where a skipped privileged test is a failure.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0") {
        panic!("{test}: needs root (CAP_NET_ADMIN) and CI is set");
    }
    // Written to the real stderr, past the test harness's output capture,
    // so the skip is visible in a normal run.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: needs root (set CI=true to make this a failure)"
    );
    false
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace deleted on drop.
pub struct Netns {
    pub name: String,
}

pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "mpthr-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a program inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Like [`Netns::exec`] but returns None on failure.
    pub fn try_exec(&self, program: &str, args: &[&str]) -> Option<String> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        let output = Command::new("ip").args(&all).output().ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs `f` on a thread that has entered the namespace.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: file is an open netns descriptor; setns affects this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread panicked")
    }

    /// `nft -j list ruleset`, parsed.
    pub fn nft_ruleset(&self) -> serde_json::Value {
        serde_json::from_str(&self.exec("nft", &["-j", "list", "ruleset"])).unwrap()
    }

    /// Rules of `chain` in table `inet <table>`.
    pub fn nft_rules(&self, table: &str, chain: &str) -> Vec<serde_json::Value> {
        self.nft_ruleset()["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|item| item.get("rule"))
            .filter(|rule| rule["table"] == table && rule["chain"] == chain)
            .cloned()
            .collect()
    }

    /// Elements of map `<map>` in table `inet <table>`, as nft's JSON gives them
    /// (`[{"concat": [...]}, value]`).
    pub fn nft_map(&self, table: &str, map: &str) -> Vec<serde_json::Value> {
        let listed: serde_json::Value =
            serde_json::from_str(&self.exec("nft", &["-j", "list", "map", "inet", table, map]))
                .unwrap();
        listed["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|item| item.get("map"))
            .and_then(|m| m.get("elem"))
            .and_then(|e| e.as_array().cloned())
            .unwrap_or_default()
    }

    /// Whether table `inet <table>` exists.
    pub fn has_table(&self, table: &str) -> bool {
        self.nft_ruleset()["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .any(|item| item.get("table").is_some_and(|t| t["name"] == table))
    }

    /// `tc -j qdisc show dev <dev>`, parsed.
    pub fn qdiscs(&self, dev: &str) -> Vec<serde_json::Value> {
        serde_json::from_str::<serde_json::Value>(
            &self.exec("tc", &["-j", "qdisc", "show", "dev", dev]),
        )
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
    }

    /// HTB classes of `dev` as (classid, text fields) from `tc class show`
    /// (iproute2 6.1 prints HTB classes as text even with -j).
    pub fn classes(&self, dev: &str) -> Vec<HtbClass> {
        self.exec("tc", &["-s", "class", "show", "dev", dev])
            .split("class htb ")
            .skip(1)
            .map(HtbClass::parse)
            .collect()
    }

    /// Names of the links in the namespace.
    pub fn links(&self) -> Vec<String> {
        let value: serde_json::Value =
            serde_json::from_str(&self.ip(&["-j", "link", "show"])).unwrap();
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Interface index of `dev`.
    pub fn ifindex(&self, dev: &str) -> u32 {
        let value: serde_json::Value =
            serde_json::from_str(&self.ip(&["-j", "link", "show", "dev", dev])).unwrap();
        value[0]["ifindex"].as_u64().unwrap() as u32
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// One HTB class as `tc` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct HtbClass {
    pub id: String,
    pub prio: Option<u32>,
    pub rate: String,
    pub ceil: String,
    pub burst: String,
    pub sent_bytes: u64,
}

impl HtbClass {
    fn parse(text: &str) -> Self {
        let words: Vec<&str> = text.split_whitespace().collect();
        let after = |key: &str| {
            words
                .iter()
                .position(|w| *w == key)
                .and_then(|i| words.get(i + 1))
                .map(|s| s.to_string())
                .unwrap_or_default()
        };
        Self {
            id: words[0].to_owned(),
            prio: after("prio").parse().ok(),
            rate: after("rate"),
            ceil: after("ceil"),
            burst: after("burst"),
            sent_bytes: after("Sent").parse().unwrap_or(0),
        }
    }
}

/// Proxy namespace (a0 10.80.0.1, a1 10.81.0.1) and client namespace
/// (b0 10.80.0.2, b1 10.81.0.2). The proxy announces 10.81.0.1 (ADD_ADDR),
/// so an MPTCP client joins a second subflow over a1/b1.
pub fn two_paths() -> (Netns, Netns) {
    let proxy = Netns::new("proxy");
    let client = Netns::new("client");
    for (a, b, net) in [("a0", "b0", "10.80.0"), ("a1", "b1", "10.81.0")] {
        proxy.ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
        proxy.ip(&["link", "set", b, "netns", &client.name]);
        proxy.ip(&["addr", "add", &format!("{net}.1/24"), "dev", a]);
        client.ip(&["addr", "add", &format!("{net}.2/24"), "dev", b]);
        proxy.ip(&["link", "set", a, "up"]);
        client.ip(&["link", "set", b, "up"]);
    }
    for ns in [&proxy, &client] {
        ns.exec("sysctl", &["-q", "-w", "net.mptcp.enabled=1"]);
        ns.ip(&[
            "mptcp",
            "limits",
            "set",
            "subflows",
            "2",
            "add_addr_accepted",
            "2",
        ]);
    }
    proxy.ip(&[
        "mptcp",
        "endpoint",
        "add",
        "10.81.0.1",
        "dev",
        "a1",
        "signal",
    ]);
    (proxy, client)
}

pub fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn listener(addr: &str, mptcp: bool) -> TcpListener {
    let protocol = if mptcp {
        Protocol::MPTCP
    } else {
        Protocol::TCP
    };
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(protocol)).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&addr.parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(8).unwrap();
    socket.into()
}

pub fn connect(addr: &str, mptcp: bool) -> TcpStream {
    let protocol = if mptcp {
        Protocol::MPTCP
    } else {
        Protocol::TCP
    };
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(protocol)).unwrap();
    socket
        .connect(&addr.parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.into()
}

pub fn enter_netns(name: &str) {
    let file = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
    // SAFETY: valid netns descriptor; affects this thread only.
    assert_eq!(
        unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) },
        0
    );
}
