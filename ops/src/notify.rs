//! systemd's readiness protocol (`sd_notify(3)`) without libsystemd: one datagram of `KEY=VALUE` lines
//! to the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
//! Without the variable (not started by systemd with `Type=notify`) every call does nothing.
//!
//! The binaries send [`ready`] once their listeners are bound, [`reloading`] then [`ready`] around a
//! configuration reload, and [`stopping`] when they start draining.

use std::io;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (newline-separated `KEY=VALUE` assignments) to the service manager. Returns whether a
/// manager was there to tell (`$NOTIFY_SOCKET` set).
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let path = path.to_string_lossy().into_owned();
    let socket = UnixDatagram::unbound()?;
    match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(state.as_bytes(), &address)?;
        }
        None if path.starts_with('/') => {
            socket.send_to(state.as_bytes(), &path)?;
        }
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("NOTIFY_SOCKET={path:?} is neither a path nor @abstract"),
            ))
        }
    }
    Ok(true)
}

/// Logs a failed notification; a service manager that cannot be told is not a reason to stop.
fn send(state: &str) {
    if let Err(error) = notify(state) {
        tracing::warn!(%error, "sd_notify failed");
    }
}

/// `READY=1` with a status line: startup (or a reload) is complete.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={status}"));
}

/// `RELOADING=1`: a configuration reload started; [`ready`] ends it. Carries `MONOTONIC_USEC`, which
/// `Type=notify-reload` requires.
pub fn reloading() {
    send(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the configuration",
        monotonic_usec()
    ));
}

/// `STOPPING=1`: the service is draining and will exit.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=draining");
}

/// A free-form status line (`systemctl status` shows it).
pub fn status(text: &str) {
    send(&format!("STATUS={text}"));
}

fn monotonic_usec() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000 + (now.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test changes NOTIFY_SOCKET, so the cases run in sequence.
    #[test]
    fn datagrams_reach_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let manager = UnixDatagram::bind(&path).expect("bind");
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(notify("READY=1").expect("sent"));
        let mut buf = [0u8; 256];
        let n = manager.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
        reloading();
        let n = manager.recv(&mut buf).expect("recv");
        let text = std::str::from_utf8(&buf[..n]).expect("utf8");
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("mptcp-ops-test-{}", std::process::id());
        let address =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
        let abstract_manager = UnixDatagram::bind_addr(&address).expect("bind abstract");
        std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
        stopping();
        let n = abstract_manager.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1\nSTATUS=draining");

        std::env::set_var("NOTIFY_SOCKET", "relative");
        assert!(notify("READY=1").is_err());
        std::env::remove_var("NOTIFY_SOCKET");
        assert!(!notify("READY=1").expect("no manager"));
    }
}
