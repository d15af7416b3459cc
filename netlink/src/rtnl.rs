//! rtnetlink requests for links and addresses: bring a link up (`RTM_NEWLINK` with `IFF_UP`), add and
//! delete an interface address (`RTM_NEWADDR` / `RTM_DELADDR`), as `ip link set up` and `ip addr`
//! do. Routes are built by their users (see `mpip-proxy`'s `sys::route`).
//!
//! Every call opens a short-lived `NETLINK_ROUTE` socket in the calling thread's network namespace and
//! blocks until the kernel's ack (no I/O is involved, so it returns in microseconds).

use std::net::IpAddr;
use std::time::Duration;

use crate::socket::{MessageBuilder, NetlinkError, NetlinkSocket, NLM_F_CREATE, NLM_F_EXCL};

/// `RTM_NEWLINK`.
pub const RTM_NEWLINK: u16 = 16;
/// `RTM_NEWADDR`.
pub const RTM_NEWADDR: u16 = 20;
/// `RTM_DELADDR`.
pub const RTM_DELADDR: u16 = 21;
/// `IFA_ADDRESS`.
pub const IFA_ADDRESS: u16 = 1;
/// `IFA_LOCAL`.
pub const IFA_LOCAL: u16 = 2;
/// `IFA_F_NODAD`: no duplicate address detection (an IPv6 address is usable at once).
pub const IFA_F_NODAD: u8 = 0x02;

/// `RTM_NEWLINK` that sets `IFF_UP` on link `ifindex` and leaves its other flags alone.
pub fn link_up_request(ifindex: u32) -> MessageBuilder {
    // struct ifinfomsg: family, pad, type (u16), index (i32), flags (u32), change (u32).
    let mut ifinfo = [0u8; 16];
    ifinfo[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    let up = libc::IFF_UP as u32;
    ifinfo[8..12].copy_from_slice(&up.to_ne_bytes());
    ifinfo[12..16].copy_from_slice(&up.to_ne_bytes());
    MessageBuilder::new(RTM_NEWLINK, 0).header(&ifinfo)
}

/// `RTM_NEWADDR` (add, failing with `EEXIST` if present) or `RTM_DELADDR` of `addr/prefix_len` on link
/// `ifindex`, with universe scope (the kernel's default, as `ip addr add`).
pub fn address_request(
    msg_type: u16,
    ifindex: u32,
    addr: IpAddr,
    prefix_len: u8,
) -> MessageBuilder {
    let (family, bytes, flags) = match addr {
        IpAddr::V4(v4) => (libc::AF_INET as u8, v4.octets().to_vec(), 0),
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets().to_vec(), IFA_F_NODAD),
    };
    // struct ifaddrmsg: family, prefixlen, flags, scope, index (u32).
    let mut ifaddr = [0u8; 8];
    ifaddr[0] = family;
    ifaddr[1] = prefix_len;
    ifaddr[2] = flags;
    ifaddr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    let nl_flags = if msg_type == RTM_NEWADDR {
        NLM_F_CREATE | NLM_F_EXCL
    } else {
        0
    };
    MessageBuilder::new(msg_type, nl_flags)
        .header(&ifaddr)
        .attr(IFA_LOCAL, &bytes)
        .attr(IFA_ADDRESS, &bytes)
}

fn request(builder: MessageBuilder, operation: &str) -> Result<(), NetlinkError> {
    let socket_error = |source| NetlinkError::Socket {
        operation: operation.to_owned(),
        source,
    };
    let mut socket = NetlinkSocket::open(libc::NETLINK_ROUTE).map_err(socket_error)?;
    // A lost ack must not hang the caller.
    socket
        .set_recv_timeout(Duration::from_secs(5))
        .map_err(socket_error)?;
    socket.request(builder, operation).map(|_| ())
}

/// Sets link `ifindex` up (`ip link set dev X up`).
pub fn set_link_up(ifindex: u32) -> Result<(), NetlinkError> {
    request(link_up_request(ifindex), &format!("set link #{ifindex} up"))
}

/// Adds `addr/prefix_len` to link `ifindex`; `EEXIST` if it is there already.
pub fn add_address(ifindex: u32, addr: IpAddr, prefix_len: u8) -> Result<(), NetlinkError> {
    request(
        address_request(RTM_NEWADDR, ifindex, addr, prefix_len),
        &format!("add address {addr}/{prefix_len} to link #{ifindex}"),
    )
}

/// Deletes `addr/prefix_len` from link `ifindex`; `EADDRNOTAVAIL` if it is not there.
pub fn delete_address(ifindex: u32, addr: IpAddr, prefix_len: u8) -> Result<(), NetlinkError> {
    request(
        address_request(RTM_DELADDR, ifindex, addr, prefix_len),
        &format!("delete address {addr}/{prefix_len} from link #{ifindex}"),
    )
}

/// The index of the interface named `name` in the calling thread's namespace.
pub fn link_index(name: &str) -> std::io::Result<u32> {
    let c_name = std::ffi::CString::new(name)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: c_name is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::{parse_attrs, NLMSG_HDRLEN};

    #[test]
    fn link_up_sets_only_iff_up() {
        let msg = link_up_request(7).finish(1);
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), RTM_NEWLINK);
        let body = &msg[NLMSG_HDRLEN..];
        assert_eq!(u32::from_ne_bytes(body[4..8].try_into().unwrap()), 7);
        let up = libc::IFF_UP as u32;
        assert_eq!(u32::from_ne_bytes(body[8..12].try_into().unwrap()), up);
        assert_eq!(u32::from_ne_bytes(body[12..16].try_into().unwrap()), up);
    }

    #[test]
    fn address_requests_carry_local_and_address() {
        let msg = address_request(RTM_NEWADDR, 1, "10.99.0.1".parse().unwrap(), 32).finish(1);
        let flags = u16::from_ne_bytes([msg[6], msg[7]]);
        assert_eq!(
            flags & (NLM_F_CREATE | NLM_F_EXCL),
            NLM_F_CREATE | NLM_F_EXCL
        );
        let body = &msg[NLMSG_HDRLEN..];
        assert_eq!((body[0], body[1]), (libc::AF_INET as u8, 32));
        let attrs = parse_attrs(&body[8..]);
        assert_eq!(
            attrs,
            vec![
                (IFA_LOCAL, &[10, 99, 0, 1][..]),
                (IFA_ADDRESS, &[10, 99, 0, 1][..])
            ]
        );
        let msg = address_request(RTM_DELADDR, 1, "fd99::1".parse().unwrap(), 128).finish(1);
        let body = &msg[NLMSG_HDRLEN..];
        assert_eq!(
            (body[0], body[1], body[2]),
            (libc::AF_INET6 as u8, 128, IFA_F_NODAD)
        );
        assert_eq!(parse_attrs(&body[8..])[0].1.len(), 16);
    }
}
