//! File descriptors: a proxy holds two per tunnel, and the default soft limit (1024) is far below what
//! `max_connections` asks for. The hard limit is what the operator (or systemd's `LimitNOFILE`) allows.

use std::io;

/// `RLIMIT_NOFILE` before and after [`raise_to_hard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit at start.
    pub before: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise_to_hard() -> io::Result<NofileLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads one valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(NofileLimit {
        before,
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// File descriptors a proxy needs for `connections` tunnels: two each (client and server socket) plus
/// `headroom` for listeners, the admin listener, netlink sockets, logs and the runtime.
pub fn needed_for(connections: usize, headroom: u64) -> u64 {
    (connections as u64)
        .saturating_mul(2)
        .saturating_add(headroom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_the_soft_limit_to_the_hard_one() {
        let limit = raise_to_hard().expect("getrlimit");
        assert_eq!(limit.soft, limit.hard);
        assert!(limit.before <= limit.soft);
        assert_eq!(needed_for(10_000, 64), 20_064);
    }
}
