//! IPv4/IPv6 routes to a prefix through a device, in the main table, over
//! rtnetlink (`RTM_NEWROUTE` / `RTM_DELROUTE`).
//!
//! Every call opens a short-lived `NETLINK_ROUTE` socket in the calling
//! thread's network namespace and blocks until the kernel's ack (a few
//! microseconds; no I/O is involved).

use std::io;
use std::time::Duration;

use ipnet::IpNet;
use mptcp_netlink::{
    MessageBuilder, NetlinkError, NetlinkSocket, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE,
};

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_NOWHERE: u8 = 255;

/// A route operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The rtnetlink socket could not be opened.
    #[error("open rtnetlink socket: {0}")]
    Open(#[source] io::Error),
    /// The kernel refused the request (or the socket failed).
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

impl RouteError {
    /// The errno, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RouteError::Open(e) => e.raw_os_error(),
            RouteError::Netlink(e) => e.errno(),
        }
    }

    /// Whether the route (or its device) did not exist: `ENOENT`, `ESRCH`
    /// or `ENODEV`.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::ENODEV)
        )
    }
}

/// Builds an `RTM_NEWROUTE`/`RTM_DELROUTE` request for `destination` (host
/// bits are cleared) through interface `ifindex` in the main table.
fn route_message(msg_type: u16, flags: u16, destination: IpNet, ifindex: u32) -> MessageBuilder {
    let destination = destination.trunc();
    let (family, dst) = match destination {
        IpNet::V4(net) => (libc::AF_INET as u8, net.network().octets().to_vec()),
        IpNet::V6(net) => (libc::AF_INET6 as u8, net.network().octets().to_vec()),
    };
    let scope = if msg_type == RTM_DELROUTE {
        // Any scope, as `ip route del` does.
        RT_SCOPE_NOWHERE
    } else if family == libc::AF_INET as u8 {
        // A device route without gateway: directly reachable.
        libc::RT_SCOPE_LINK
    } else {
        RT_SCOPE_UNIVERSE
    };
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope,
    // type, flags (u32).
    let mut rtmsg = [0u8; 12];
    rtmsg[0] = family;
    rtmsg[1] = destination.prefix_len();
    rtmsg[4] = libc::RT_TABLE_MAIN;
    rtmsg[5] = if msg_type == RTM_DELROUTE {
        0 // any protocol
    } else {
        libc::RTPROT_STATIC
    };
    rtmsg[6] = scope;
    rtmsg[7] = libc::RTN_UNICAST;
    let mut builder = MessageBuilder::new(msg_type, flags).header(&rtmsg);
    if destination.prefix_len() > 0 {
        builder = builder.attr(RTA_DST, &dst);
    }
    builder
        .attr_u32(RTA_OIF, ifindex)
        .attr_u32(RTA_TABLE, u32::from(libc::RT_TABLE_MAIN))
}

fn request(builder: MessageBuilder, operation: &str) -> Result<(), RouteError> {
    let mut socket = NetlinkSocket::open(libc::NETLINK_ROUTE).map_err(RouteError::Open)?;
    // A lost ack must not hang the caller forever.
    socket
        .set_recv_timeout(Duration::from_secs(5))
        .map_err(RouteError::Open)?;
    socket.request(builder, operation)?;
    Ok(())
}

/// Adds a route to `destination` through interface `ifindex`; fails with
/// `EEXIST` when the main table already has a route to that prefix (and
/// metric).
pub fn add_route(destination: IpNet, ifindex: u32) -> Result<(), RouteError> {
    request(
        route_message(
            RTM_NEWROUTE,
            NLM_F_CREATE | NLM_F_EXCL,
            destination,
            ifindex,
        ),
        &format!("add route {destination} dev #{ifindex}"),
    )
}

/// Adds a route to `destination` through interface `ifindex`, replacing an
/// existing route to the same prefix (and metric).
pub fn replace_route(destination: IpNet, ifindex: u32) -> Result<(), RouteError> {
    request(
        route_message(
            RTM_NEWROUTE,
            NLM_F_CREATE | NLM_F_REPLACE,
            destination,
            ifindex,
        ),
        &format!("replace route {destination} dev #{ifindex}"),
    )
}

/// Deletes the route to `destination` through interface `ifindex` (`ESRCH`
/// or `ENOENT` when there is none; see [`RouteError::is_not_found`]).
pub fn delete_route(destination: IpNet, ifindex: u32) -> Result<(), RouteError> {
    request(
        route_message(RTM_DELROUTE, 0, destination, ifindex),
        &format!("delete route {destination} dev #{ifindex}"),
    )
}

/// Routes added through it are deleted when it is dropped (or on
/// [`RouteGuard::remove_all`]); routes that are already gone, for example
/// because their device was deleted, are skipped silently.
#[derive(Debug, Default)]
pub struct RouteGuard {
    routes: Vec<(IpNet, u32)>,
}

impl RouteGuard {
    /// An empty guard.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route with [`add_route`] and remembers it. The prefix is
    /// stored with host bits cleared.
    pub fn add(&mut self, destination: IpNet, ifindex: u32) -> Result<(), RouteError> {
        add_route(destination, ifindex)?;
        self.routes.push((destination.trunc(), ifindex));
        Ok(())
    }

    /// The routes it will delete, as `(prefix, ifindex)`.
    pub fn routes(&self) -> &[(IpNet, u32)] {
        &self.routes
    }

    /// Deletes every remembered route (newest first) and forgets them all;
    /// returns the first error other than "not found".
    pub fn remove_all(&mut self) -> Result<(), RouteError> {
        let mut first_error = None;
        while let Some((destination, ifindex)) = self.routes.pop() {
            match delete_route(destination, ifindex) {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        if let Err(e) = self.remove_all() {
            tracing::warn!(error = %e, "could not delete a route");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::testns::{in_netns, run, runtime};
    use crate::sys::tun::TunDevice;
    use mptcp_netlink::{parse_attrs, NLMSG_HDRLEN};

    #[test]
    fn message_layout_v4() {
        let msg = route_message(
            RTM_NEWROUTE,
            NLM_F_CREATE | NLM_F_EXCL,
            "10.1.2.3/16".parse().unwrap(),
            7,
        )
        .finish(1);
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), RTM_NEWROUTE);
        let rtmsg = &msg[NLMSG_HDRLEN..NLMSG_HDRLEN + 12];
        assert_eq!(rtmsg[0], libc::AF_INET as u8);
        assert_eq!(rtmsg[1], 16);
        assert_eq!(rtmsg[4], libc::RT_TABLE_MAIN);
        assert_eq!(rtmsg[6], libc::RT_SCOPE_LINK);
        assert_eq!(rtmsg[7], libc::RTN_UNICAST);
        let attrs = parse_attrs(&msg[NLMSG_HDRLEN + 12..]);
        assert_eq!(attrs[0], (RTA_DST, &[10u8, 1, 0, 0][..]));
        assert_eq!(attrs[1], (RTA_OIF, &7u32.to_ne_bytes()[..]));
        assert_eq!(attrs[2].0, RTA_TABLE);
    }

    #[test]
    fn message_layout_v6_delete_and_default() {
        let msg = route_message(RTM_DELROUTE, 0, "2001:db8::1/64".parse().unwrap(), 3).finish(1);
        let rtmsg = &msg[NLMSG_HDRLEN..NLMSG_HDRLEN + 12];
        assert_eq!(rtmsg[0], libc::AF_INET6 as u8);
        assert_eq!(rtmsg[1], 64);
        assert_eq!(rtmsg[5], 0);
        assert_eq!(rtmsg[6], RT_SCOPE_NOWHERE);
        let attrs = parse_attrs(&msg[NLMSG_HDRLEN + 12..]);
        let dst: std::net::Ipv6Addr = "2001:db8::".parse().unwrap();
        assert_eq!(attrs[0], (RTA_DST, &dst.octets()[..]));

        let msg = route_message(RTM_NEWROUTE, 0, "0.0.0.0/0".parse().unwrap(), 3).finish(1);
        let attrs = parse_attrs(&msg[NLMSG_HDRLEN + 12..]);
        assert_eq!(attrs[0].0, RTA_OIF, "no RTA_DST for a default route");
    }

    #[test]
    fn routes_add_delete_and_guard() {
        in_netns("routes_add_delete_and_guard", |ns| {
            let rt = runtime();
            let _enter = rt.enter();
            let tun = TunDevice::create("mpxrt%d").unwrap();
            tun.set_mtu(1400).unwrap();
            tun.set_up().unwrap();
            let dev = tun.name().to_owned();
            let v4: IpNet = "10.99.0.0/16".parse().unwrap();
            let v6: IpNet = "2001:db8:99::/64".parse().unwrap();

            add_route(v4, tun.ifindex()).unwrap();
            add_route(v6, tun.ifindex()).unwrap();
            let shown = run("ip", &["-n", ns, "route", "show", "dev", &dev]);
            assert!(shown.contains("10.99.0.0/16"), "{shown}");
            let shown6 = run("ip", &["-n", ns, "-6", "route", "show", "dev", &dev]);
            assert!(shown6.contains("2001:db8:99::/64"), "{shown6}");
            // EXCL: a second add fails with EEXIST, replace succeeds.
            let err = add_route(v4, tun.ifindex()).unwrap_err();
            assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");
            replace_route(v4, tun.ifindex()).unwrap();

            delete_route(v4, tun.ifindex()).unwrap();
            delete_route(v6, tun.ifindex()).unwrap();
            let shown = run("ip", &["-n", ns, "route", "show", "dev", &dev]);
            assert!(!shown.contains("10.99.0.0"), "{shown}");
            let shown6 = run("ip", &["-n", ns, "-6", "route", "show", "dev", &dev]);
            assert!(!shown6.contains("2001:db8:99::"), "{shown6}");
            let err = delete_route(v4, tun.ifindex()).unwrap_err();
            assert!(err.is_not_found(), "{err}");

            // Host bits are cleared rather than refused.
            {
                let mut guard = RouteGuard::new();
                guard
                    .add("10.98.1.2/16".parse().unwrap(), tun.ifindex())
                    .unwrap();
                guard.add(v6, tun.ifindex()).unwrap();
                assert_eq!(
                    guard.routes()[0].0,
                    "10.98.0.0/16".parse::<IpNet>().unwrap()
                );
                let shown = run("ip", &["-n", ns, "route", "show", "dev", &dev]);
                assert!(shown.contains("10.98.0.0/16"), "{shown}");
            }
            let shown = run("ip", &["-n", ns, "route"]);
            assert!(!shown.contains("10.98.0.0"), "{shown}");
            let shown6 = run("ip", &["-n", ns, "-6", "route"]);
            assert!(!shown6.contains("2001:db8:99::"), "{shown6}");

            // A guard whose device is gone drops quietly.
            let mut guard = RouteGuard::new();
            guard.add(v4, tun.ifindex()).unwrap();
            drop(tun);
            assert!(guard.remove_all().is_ok());
            drop(guard);
        });
    }
}
