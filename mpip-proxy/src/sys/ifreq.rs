//! `struct ifreq` ioctls on a throw-away `AF_INET` datagram socket, shared by
//! the TUN and interface modules.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Checks an interface name: non-empty, shorter than `IFNAMSIZ`, no NUL, and
/// none of the characters the kernel refuses (`/`, `:`, whitespace).
pub(crate) fn validate_name(name: &str, allow_format: bool) -> io::Result<()> {
    let invalid = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}: {why}"),
        )
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() >= libc::IFNAMSIZ {
        return Err(invalid("longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(invalid("reserved"));
    }
    if name
        .bytes()
        .any(|b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        return Err(invalid("contains NUL, '/', ':' or whitespace"));
    }
    if !allow_format && name.contains('%') {
        return Err(invalid("contains '%'"));
    }
    Ok(())
}

/// A zeroed `ifreq` carrying `name` (which must pass [`validate_name`]).
pub(crate) fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    validate_name(name, true)?;
    // SAFETY: ifreq is plain old data (arrays, integers and a union of them);
    // all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

/// The name stored in an `ifreq` (up to the first NUL).
pub(crate) fn ifreq_name(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// An `AF_INET` datagram socket for interface ioctls. Its network namespace
/// (that of the calling thread) decides which interfaces the ioctls see.
pub(crate) fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Runs `ioctl(fd, request, req)`.
pub(crate) fn ioctl(
    fd: &impl AsRawFd,
    request: libc::c_ulong,
    req: &mut libc::ifreq,
) -> io::Result<()> {
    // SAFETY: every request used with this helper takes a `struct ifreq *`,
    // and req is a valid, exclusively borrowed ifreq for the call.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            request as _,
            req as *mut libc::ifreq as *mut libc::c_void,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `sockaddr` holding an IPv4 address, as the address ioctls expect.
pub(crate) fn sockaddr_v4(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and
    // sockaddr is plain old data; this is the documented way to pass an
    // AF_INET address through `ifr_addr`.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(validate_name("eth0", false).is_ok());
        assert!(validate_name("mpip%d", true).is_ok());
        assert!(validate_name("mpip%d", false).is_err());
        assert!(validate_name("", true).is_err());
        assert!(validate_name("0123456789abcdef", true).is_err());
        assert!(validate_name("0123456789abcde", true).is_ok());
        assert!(validate_name("a/b", true).is_err());
        assert!(validate_name("a:b", true).is_err());
        assert!(validate_name("a b", true).is_err());
        assert!(validate_name("a\0b", true).is_err());
        assert!(validate_name("..", true).is_err());
    }

    #[test]
    fn ifreq_round_trips_the_name() {
        let req = ifreq("mpxtest0").unwrap();
        assert_eq!(ifreq_name(&req), "mpxtest0");
        let req = ifreq("0123456789abcde").unwrap();
        assert_eq!(ifreq_name(&req), "0123456789abcde");
    }

    #[test]
    fn sockaddr_v4_layout() {
        let sa = sockaddr_v4(std::net::Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        // sin_port (2 bytes) then sin_addr.
        let data: Vec<u8> = sa.sa_data.iter().map(|c| *c as u8).collect();
        assert_eq!(&data[2..6], &[10, 1, 2, 3]);
    }
}
