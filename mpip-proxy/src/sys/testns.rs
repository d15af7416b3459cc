//! Test support: run a closure inside a fresh, throw-away network namespace.
//!
//! Each call creates `mpxsys-<pid>-<n>` with `ip netns add`, starts a
//! dedicated thread that enters it with `setns(2)` and runs the closure there
//! (that thread ends afterwards, so no pooled thread is left in the
//! namespace), and deletes the namespace in a drop guard, panic or not.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Deletes the namespace when dropped.
pub(crate) struct NetnsGuard {
    /// The namespace name.
    pub(crate) name: String,
}

/// Creates an extra namespace (`mpxsys-<pid>-<n>`, loopback up), deleted
/// when the guard drops.
pub(crate) fn extra_netns() -> NetnsGuard {
    let name = format!(
        "mpxsys-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    run("ip", &["netns", "add", &name]);
    let guard = NetnsGuard { name };
    run("ip", &["-n", &guard.name, "link", "set", "lo", "up"]);
    guard
}

/// Runs `f` on a new thread inside namespace `name` and returns its result.
pub(crate) fn on_thread_in<T, F>(name: &str, f: F) -> std::thread::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
}

fn enter(path: &str) {
    let file = std::fs::File::open(path).expect("open the namespace file");
    // SAFETY: file is an open netns file; setns only changes this thread's
    // namespace, and the callers' threads end after their work.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Whether namespace tests can run; `false` (with a message) when not root,
/// a panic when not root and `CI=true`.
fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: network-namespace tests need root (CI=true)");
    }
    eprintln!("skipping {test}: needs root to create network namespaces");
    false
}

/// Runs a shell command, panicking with its output when it fails.
pub(crate) fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `test(netns_name)` in a new network namespace (loopback up) on a
/// dedicated thread; re-raises its panic. Skips when not root.
pub(crate) fn in_netns<F>(test_name: &str, test: F)
where
    F: FnOnce(&str) + Send + 'static,
{
    if !can_run(test_name) {
        return;
    }
    let guard = extra_netns();
    let name = guard.name.clone();
    let thread_name = name.clone();
    let result = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            enter(&format!("/run/netns/{thread_name}"));
            test(&thread_name);
        })
        .expect("spawn the namespace thread")
        .join();
    drop(guard);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// A current-thread tokio runtime (built inside the namespace thread).
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// IPv4 header + UDP, UDP checksum 0 (allowed over IPv4).
pub(crate) fn udp_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    data: &[u8],
) -> Vec<u8> {
    let total = 20 + 8 + data.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let mut sum = 0u32;
    for chunk in p[..20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    p[28..].copy_from_slice(data);
    p
}
