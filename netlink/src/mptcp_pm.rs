//! The kernel's MPTCP path manager over generic netlink (family `mptcp_pm`): its events (multicast group
//! `mptcp_pm_events`), decoded into [`PmEvent`], and its commands: endpoints (`ADD_ADDR`, `DEL_ADDR`,
//! `GET_ADDR`, limits) for the in-kernel path manager, and `ANNOUNCE`, `REMOVE`, `SUBFLOW_CREATE`,
//! `SUBFLOW_DESTROY` and `SET_FLAGS` for a userspace path manager (`net.mptcp.path_manager = userspace`).
//!
//! Numbers are from `linux/mptcp_pm.h` (uapi, generated from `Documentation/netlink/specs/mptcp_pm.yaml`;
//! older headers carry them in `linux/mptcp.h`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::genl::{self, GenlFamily, GENL_HDRLEN};
use crate::socket::{attr_u16, attr_u32, parse_attrs, MessageBuilder, NetlinkError, NetlinkSocket};

/// Family name.
pub const MPTCP_PM_NAME: &str = "mptcp_pm";
/// Event multicast group name.
pub const MPTCP_PM_EV_GRP_NAME: &str = "mptcp_pm_events";
/// Family version.
pub const MPTCP_PM_VER: u8 = 1;

/// `enum mptcp_event_type`.
pub mod event_type {
    /// `MPTCP_EVENT_CREATED`.
    pub const CREATED: u8 = 1;
    /// `MPTCP_EVENT_ESTABLISHED`.
    pub const ESTABLISHED: u8 = 2;
    /// `MPTCP_EVENT_CLOSED`.
    pub const CLOSED: u8 = 3;
    /// `MPTCP_EVENT_ANNOUNCED`.
    pub const ANNOUNCED: u8 = 6;
    /// `MPTCP_EVENT_REMOVED`.
    pub const REMOVED: u8 = 7;
    /// `MPTCP_EVENT_SUB_ESTABLISHED`.
    pub const SUB_ESTABLISHED: u8 = 10;
    /// `MPTCP_EVENT_SUB_CLOSED`.
    pub const SUB_CLOSED: u8 = 11;
    /// `MPTCP_EVENT_SUB_PRIORITY`.
    pub const SUB_PRIORITY: u8 = 13;
    /// `MPTCP_EVENT_LISTENER_CREATED`.
    pub const LISTENER_CREATED: u8 = 15;
    /// `MPTCP_EVENT_LISTENER_CLOSED`.
    pub const LISTENER_CLOSED: u8 = 16;
}

/// `enum mptcp_event_attr`.
pub mod attr {
    /// `MPTCP_ATTR_TOKEN` (u32).
    pub const TOKEN: u16 = 1;
    /// `MPTCP_ATTR_FAMILY` (u16).
    pub const FAMILY: u16 = 2;
    /// `MPTCP_ATTR_LOC_ID` (u8).
    pub const LOC_ID: u16 = 3;
    /// `MPTCP_ATTR_REM_ID` (u8).
    pub const REM_ID: u16 = 4;
    /// `MPTCP_ATTR_SADDR4` (be32).
    pub const SADDR4: u16 = 5;
    /// `MPTCP_ATTR_SADDR6`.
    pub const SADDR6: u16 = 6;
    /// `MPTCP_ATTR_DADDR4` (be32).
    pub const DADDR4: u16 = 7;
    /// `MPTCP_ATTR_DADDR6`.
    pub const DADDR6: u16 = 8;
    /// `MPTCP_ATTR_SPORT` (be16).
    pub const SPORT: u16 = 9;
    /// `MPTCP_ATTR_DPORT` (be16).
    pub const DPORT: u16 = 10;
    /// `MPTCP_ATTR_BACKUP` (u8).
    pub const BACKUP: u16 = 11;
    /// `MPTCP_ATTR_ERROR` (u8).
    pub const ERROR: u16 = 12;
    /// `MPTCP_ATTR_IF_IDX` (s32).
    pub const IF_IDX: u16 = 15;
    /// `MPTCP_ATTR_SERVER_SIDE` (u8).
    pub const SERVER_SIDE: u16 = 18;
}

/// `MPTCP_PM_CMD_*`.
pub mod cmd {
    /// `MPTCP_PM_CMD_ADD_ADDR`: add an endpoint (in-kernel PM).
    pub const ADD_ADDR: u8 = 1;
    /// `MPTCP_PM_CMD_DEL_ADDR`.
    pub const DEL_ADDR: u8 = 2;
    /// `MPTCP_PM_CMD_GET_ADDR` (dump: every endpoint).
    pub const GET_ADDR: u8 = 3;
    /// `MPTCP_PM_CMD_FLUSH_ADDRS`.
    pub const FLUSH_ADDRS: u8 = 4;
    /// `MPTCP_PM_CMD_SET_LIMITS`.
    pub const SET_LIMITS: u8 = 5;
    /// `MPTCP_PM_CMD_GET_LIMITS`.
    pub const GET_LIMITS: u8 = 6;
    /// `MPTCP_PM_CMD_SET_FLAGS`.
    pub const SET_FLAGS: u8 = 7;
    /// `MPTCP_PM_CMD_ANNOUNCE` (userspace PM: send ADD_ADDR on one connection).
    pub const ANNOUNCE: u8 = 8;
    /// `MPTCP_PM_CMD_REMOVE` (userspace PM: send REMOVE_ADDR on one connection).
    pub const REMOVE: u8 = 9;
    /// `MPTCP_PM_CMD_SUBFLOW_CREATE` (userspace PM).
    pub const SUBFLOW_CREATE: u8 = 10;
    /// `MPTCP_PM_CMD_SUBFLOW_DESTROY` (userspace PM).
    pub const SUBFLOW_DESTROY: u8 = 11;
}

/// `MPTCP_PM_ATTR_*` (command attributes).
pub mod pm_attr {
    /// `MPTCP_PM_ATTR_ADDR` (nested address).
    pub const ADDR: u16 = 1;
    /// `MPTCP_PM_ATTR_RCV_ADD_ADDRS` (u32).
    pub const RCV_ADD_ADDRS: u16 = 2;
    /// `MPTCP_PM_ATTR_SUBFLOWS` (u32).
    pub const SUBFLOWS: u16 = 3;
    /// `MPTCP_PM_ATTR_TOKEN` (u32).
    pub const TOKEN: u16 = 4;
    /// `MPTCP_PM_ATTR_LOC_ID` (u8).
    pub const LOC_ID: u16 = 5;
    /// `MPTCP_PM_ATTR_ADDR_REMOTE` (nested address).
    pub const ADDR_REMOTE: u16 = 6;
}

/// `MPTCP_PM_ADDR_ATTR_*` (inside a nested address).
pub mod addr_attr {
    /// `MPTCP_PM_ADDR_ATTR_FAMILY` (u16).
    pub const FAMILY: u16 = 1;
    /// `MPTCP_PM_ADDR_ATTR_ID` (u8).
    pub const ID: u16 = 2;
    /// `MPTCP_PM_ADDR_ATTR_ADDR4`.
    pub const ADDR4: u16 = 3;
    /// `MPTCP_PM_ADDR_ATTR_ADDR6`.
    pub const ADDR6: u16 = 4;
    /// `MPTCP_PM_ADDR_ATTR_PORT` (u16, host order).
    pub const PORT: u16 = 5;
    /// `MPTCP_PM_ADDR_ATTR_FLAGS` (u32).
    pub const FLAGS: u16 = 6;
    /// `MPTCP_PM_ADDR_ATTR_IF_IDX` (s32).
    pub const IF_IDX: u16 = 7;
}

/// `MPTCP_PM_ADDR_FLAG_*`: what an endpoint is for.
pub mod flags {
    /// Announce the address (ADD_ADDR) to peers.
    pub const SIGNAL: u32 = 1 << 0;
    /// Open subflows from the address.
    pub const SUBFLOW: u32 = 1 << 1;
    /// Subflows on it are backups (MP_PRIO).
    pub const BACKUP: u32 = 1 << 2;
    /// One subflow from it to every announced address.
    pub const FULLMESH: u32 = 1 << 3;
    /// Created by the kernel for an incoming join.
    pub const IMPLICIT: u32 = 1 << 4;
}

/// What a `mptcp_pm` event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmEventKind {
    /// A connection was created (first SYN handled).
    Created,
    /// A connection is fully established.
    Established,
    /// A connection closed.
    Closed,
    /// The peer announced an address (ADD_ADDR).
    Announced,
    /// The peer removed an address (REMOVE_ADDR).
    Removed,
    /// A subflow is established.
    SubflowEstablished,
    /// A subflow closed (or failed to establish: `error` is set).
    SubflowClosed,
    /// A subflow's backup flag changed (MP_PRIO).
    SubflowPriority,
    /// A listener was created.
    ListenerCreated,
    /// A listener was closed.
    ListenerClosed,
    /// An event this crate does not name.
    Other(u8),
}

impl PmEventKind {
    /// From the generic netlink command byte.
    pub fn from_cmd(cmd: u8) -> Self {
        match cmd {
            event_type::CREATED => Self::Created,
            event_type::ESTABLISHED => Self::Established,
            event_type::CLOSED => Self::Closed,
            event_type::ANNOUNCED => Self::Announced,
            event_type::REMOVED => Self::Removed,
            event_type::SUB_ESTABLISHED => Self::SubflowEstablished,
            event_type::SUB_CLOSED => Self::SubflowClosed,
            event_type::SUB_PRIORITY => Self::SubflowPriority,
            event_type::LISTENER_CREATED => Self::ListenerCreated,
            event_type::LISTENER_CLOSED => Self::ListenerClosed,
            other => Self::Other(other),
        }
    }
}

/// One decoded `mptcp_pm` event: every attribute the kernel may send, each optional because events carry
/// different subsets (see `linux/mptcp_pm.h`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PmEvent {
    /// The event.
    pub kind: PmEventKind,
    /// The connection's local token (absent on listener events).
    pub token: Option<u32>,
    /// Local address (`saddr4`/`saddr6`).
    pub local_addr: Option<IpAddr>,
    /// Local port.
    pub local_port: Option<u16>,
    /// Remote address (`daddr4`/`daddr6`).
    pub remote_addr: Option<IpAddr>,
    /// Remote port (absent or 0 when an announcement carries none).
    pub remote_port: Option<u16>,
    /// Local address id.
    pub local_id: Option<u8>,
    /// Remote address id.
    pub remote_id: Option<u8>,
    /// Backup flag.
    pub backup: bool,
    /// Interface index of the subflow (0 is mapped to `None`).
    pub if_index: Option<u32>,
    /// Error of a failed subflow.
    pub error: Option<u8>,
    /// Whether the connection was accepted (server side).
    pub server_side: Option<bool>,
}

impl PmEvent {
    /// Local address and port, when both are present.
    pub fn local(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.local_addr?, self.local_port?))
    }

    /// Remote address and port, when both are present.
    pub fn remote(&self) -> Option<SocketAddr> {
        Some(SocketAddr::new(self.remote_addr?, self.remote_port?))
    }
}

/// Decodes one `mptcp_pm` event message (generic header + attributes). `None` if it is too short to hold
/// the generic header.
pub fn decode_event(payload: &[u8]) -> Option<PmEvent> {
    let cmd = *payload.first()?;
    let attrs = parse_attrs(payload.get(GENL_HDRLEN..)?);
    let get = |kind: u16| attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
    let be16 = |kind: u16| {
        get(kind)
            .and_then(|v| v.get(..2))
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    let ip = |v4: u16, v6: u16| -> Option<IpAddr> {
        if let Some(b) = get(v4).and_then(|v| v.get(..4)) {
            return Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])));
        }
        let b: [u8; 16] = get(v6)?.get(..16)?.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(b)))
    };
    let u8_attr = |kind: u16| get(kind).and_then(|v| v.first().copied());
    Some(PmEvent {
        kind: PmEventKind::from_cmd(cmd),
        token: get(attr::TOKEN).and_then(attr_u32),
        local_addr: ip(attr::SADDR4, attr::SADDR6),
        local_port: be16(attr::SPORT),
        remote_addr: ip(attr::DADDR4, attr::DADDR6),
        remote_port: be16(attr::DPORT),
        local_id: u8_attr(attr::LOC_ID),
        remote_id: u8_attr(attr::REM_ID),
        backup: u8_attr(attr::BACKUP).unwrap_or(0) != 0,
        if_index: get(attr::IF_IDX).and_then(attr_u32).filter(|i| *i != 0),
        error: u8_attr(attr::ERROR),
        server_side: u8_attr(attr::SERVER_SIDE).map(|v| v != 0),
    })
}

/// An address as the path manager's commands carry it (`MPTCP_PM_ATTR_ADDR` and `_ADDR_REMOTE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmAddress {
    /// The address.
    pub addr: IpAddr,
    /// Port (0: none, or any).
    pub port: u16,
    /// Address id (endpoint id; required by ANNOUNCE, optional elsewhere).
    pub id: Option<u8>,
    /// `flags::*`.
    pub flags: u32,
    /// Interface index (0: none).
    pub if_index: u32,
}

impl PmAddress {
    /// An address with no id, flags or interface.
    pub fn new(addr: IpAddr, port: u16) -> Self {
        Self {
            addr,
            port,
            id: None,
            flags: 0,
            if_index: 0,
        }
    }

    /// From a socket address.
    pub fn from_socket(addr: SocketAddr) -> Self {
        Self::new(addr.ip(), addr.port())
    }

    fn nest(&self, builder: MessageBuilder, kind: u16, with_flags: bool) -> MessageBuilder {
        let mut b = builder.begin_nest(kind);
        match self.addr {
            IpAddr::V4(v4) => {
                b = b
                    .attr_u16(addr_attr::FAMILY, libc::AF_INET as u16)
                    .attr(addr_attr::ADDR4, &v4.octets());
            }
            IpAddr::V6(v6) => {
                b = b
                    .attr_u16(addr_attr::FAMILY, libc::AF_INET6 as u16)
                    .attr(addr_attr::ADDR6, &v6.octets());
            }
        }
        if let Some(id) = self.id {
            b = b.attr_u8(addr_attr::ID, id);
        }
        if self.port != 0 {
            b = b.attr_u16(addr_attr::PORT, self.port);
        }
        if with_flags {
            b = b.attr_u32(addr_attr::FLAGS, self.flags);
        }
        if self.if_index != 0 {
            b = b.attr_u32(addr_attr::IF_IDX, self.if_index);
        }
        b.end_nest()
    }

    /// Parses a nested address attribute's payload.
    pub fn parse(nested: &[u8]) -> Option<Self> {
        let attrs = parse_attrs(nested);
        let get = |kind: u16| attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
        let addr = if let Some(b) = get(addr_attr::ADDR4).and_then(|v| v.get(..4)) {
            IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
        } else {
            let b: [u8; 16] = get(addr_attr::ADDR6)?.get(..16)?.try_into().ok()?;
            IpAddr::V6(Ipv6Addr::from(b))
        };
        Some(Self {
            addr,
            port: get(addr_attr::PORT).and_then(attr_u16).unwrap_or(0),
            id: get(addr_attr::ID).and_then(|v| v.first().copied()),
            flags: get(addr_attr::FLAGS).and_then(attr_u32).unwrap_or(0),
            if_index: get(addr_attr::IF_IDX).and_then(attr_u32).unwrap_or(0),
        })
    }
}

fn command(family_id: u16, cmd: u8) -> MessageBuilder {
    genl::request(family_id, cmd, MPTCP_PM_VER)
}

/// `SET_FLAGS` for one subflow of connection `token`: sets or clears the backup flag (the kernel then sends
/// MP_PRIO). The kernel accepts a per-connection request only where the connection's path manager allows it
/// (userspace PM, Linux 5.19+); otherwise it answers with an error.
pub fn set_backup_request(
    family_id: u16,
    token: u32,
    local: SocketAddr,
    local_id: Option<u8>,
    remote: SocketAddr,
    backup: bool,
) -> MessageBuilder {
    let mut local = PmAddress::from_socket(local);
    local.id = local_id;
    local.flags = if backup { flags::BACKUP } else { 0 };
    let b = command(family_id, cmd::SET_FLAGS).attr_u32(pm_attr::TOKEN, token);
    let b = local.nest(b, pm_attr::ADDR, true);
    PmAddress::from_socket(remote).nest(b, pm_attr::ADDR_REMOTE, false)
}

/// `ADD_ADDR`: adds an endpoint of the in-kernel path manager (`ip mptcp endpoint add`).
pub fn add_endpoint_request(family_id: u16, endpoint: &PmAddress) -> MessageBuilder {
    endpoint.nest(command(family_id, cmd::ADD_ADDR), pm_attr::ADDR, true)
}

/// `DEL_ADDR`: deletes endpoint `id` (`ip mptcp endpoint delete id ID`).
pub fn del_endpoint_request(family_id: u16, id: u8, addr: IpAddr) -> MessageBuilder {
    let mut endpoint = PmAddress::new(addr, 0);
    endpoint.id = Some(id);
    endpoint.nest(command(family_id, cmd::DEL_ADDR), pm_attr::ADDR, false)
}

/// `GET_ADDR` as a dump: every endpoint.
pub fn dump_endpoints_request(family_id: u16) -> MessageBuilder {
    command(family_id, cmd::GET_ADDR)
}

/// `SET_LIMITS`: the in-kernel PM's limits (extra subflows, accepted ADD_ADDRs).
pub fn set_limits_request(family_id: u16, subflows: u32, add_addr_accepted: u32) -> MessageBuilder {
    command(family_id, cmd::SET_LIMITS)
        .attr_u32(pm_attr::SUBFLOWS, subflows)
        .attr_u32(pm_attr::RCV_ADD_ADDRS, add_addr_accepted)
}

/// `ANNOUNCE` (userspace PM): advertise `addr` (its `id` is required) on connection `token`.
pub fn announce_request(family_id: u16, token: u32, addr: &PmAddress) -> MessageBuilder {
    let b = command(family_id, cmd::ANNOUNCE).attr_u32(pm_attr::TOKEN, token);
    addr.nest(b, pm_attr::ADDR, true)
}

/// `REMOVE` (userspace PM): withdraw address `local_id` on connection `token`.
pub fn remove_request(family_id: u16, token: u32, local_id: u8) -> MessageBuilder {
    command(family_id, cmd::REMOVE)
        .attr_u32(pm_attr::TOKEN, token)
        .attr_u8(pm_attr::LOC_ID, local_id)
}

/// `SUBFLOW_CREATE` (userspace PM): open a subflow of connection `token` from `local` (its `id` is
/// required; port 0 lets the kernel choose; `if_index` binds the subflow to a device) to `remote`.
pub fn subflow_create_request(
    family_id: u16,
    token: u32,
    local: &PmAddress,
    remote: SocketAddr,
) -> MessageBuilder {
    let b = command(family_id, cmd::SUBFLOW_CREATE).attr_u32(pm_attr::TOKEN, token);
    let b = local.nest(b, pm_attr::ADDR, true);
    PmAddress::from_socket(remote).nest(b, pm_attr::ADDR_REMOTE, false)
}

/// `SUBFLOW_DESTROY` (userspace PM): close the subflow `local` → `remote` of connection `token`.
pub fn subflow_destroy_request(
    family_id: u16,
    token: u32,
    local: SocketAddr,
    remote: SocketAddr,
) -> MessageBuilder {
    let b = command(family_id, cmd::SUBFLOW_DESTROY).attr_u32(pm_attr::TOKEN, token);
    let b = PmAddress::from_socket(local).nest(b, pm_attr::ADDR, false);
    PmAddress::from_socket(remote).nest(b, pm_attr::ADDR_REMOTE, false)
}

/// Why the path manager could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum PmError {
    /// Opening the generic netlink socket failed.
    #[error("opening generic netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The family lookup failed (MPTCP not built in, or no permission).
    #[error("resolving generic netlink family {MPTCP_PM_NAME:?}: {0}")]
    Resolve(#[source] NetlinkError),
    /// The family exists but has no event group.
    #[error("family {MPTCP_PM_NAME:?} has no multicast group {MPTCP_PM_EV_GRP_NAME:?}")]
    NoEventGroup,
    /// Joining the group failed (needs CAP_NET_ADMIN).
    #[error("joining {MPTCP_PM_EV_GRP_NAME:?}: {0}")]
    Join(#[source] std::io::Error),
}

/// Opens a socket subscribed to `mptcp_pm_events` of the calling thread's network namespace; returns it
/// with the family.
pub fn open_event_socket() -> Result<(NetlinkSocket, GenlFamily), PmError> {
    let mut socket = NetlinkSocket::open(libc::NETLINK_GENERIC).map_err(PmError::Socket)?;
    let family = genl::resolve_family(&mut socket, MPTCP_PM_NAME).map_err(PmError::Resolve)?;
    let group = family
        .group(MPTCP_PM_EV_GRP_NAME)
        .ok_or(PmError::NoEventGroup)?;
    socket.add_membership(group).map_err(PmError::Join)?;
    Ok((socket, family))
}

/// What an [`EventListener`] hands its callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// One event.
    Event(PmEvent),
    /// The socket's buffer overflowed (`ENOBUFS`): some events were lost.
    Lost,
}

/// Reads `mptcp_pm` events of the network namespace it was started in, on a thread of its own, and
/// hands each to a callback until the callback returns `false`, the socket fails, or the listener is
/// stopped or dropped (within 250 ms: the socket has a receive timeout).
#[derive(Debug)]
pub struct EventListener {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), std::io::Error>>>,
}

impl EventListener {
    /// Subscribes (in the calling thread's namespace; needs `CAP_NET_ADMIN`) and starts the thread.
    pub fn spawn(
        mut on_event: impl FnMut(Delivery) -> bool + Send + 'static,
    ) -> Result<Self, PmError> {
        use std::sync::atomic::Ordering;
        let (socket, family) = open_event_socket()?;
        socket
            .set_recv_timeout(std::time::Duration::from_millis(250))
            .map_err(PmError::Socket)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("mptcp_pm events".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    match socket.recv() {
                        Ok(messages) => {
                            for message in messages.iter().filter(|m| m.msg_type == family.id) {
                                if let Some(event) = decode_event(&message.payload) {
                                    if !on_event(Delivery::Event(event)) {
                                        return Ok(());
                                    }
                                }
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                            if !on_event(Delivery::Lost) {
                                return Ok(());
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })
            .map_err(PmError::Socket)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it; returns the socket error that ended it early, if any.
    pub fn stop(&mut self) -> Result<(), std::io::Error> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => Ok(()),
        }
    }
}

impl Drop for EventListener {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A blocking command socket to the path manager of the calling thread's network namespace.
#[derive(Debug)]
pub struct PathManager {
    socket: NetlinkSocket,
    family: GenlFamily,
}

impl PathManager {
    /// Opens a socket and resolves the family.
    pub fn open() -> Result<Self, PmError> {
        let mut socket = NetlinkSocket::open(libc::NETLINK_GENERIC).map_err(PmError::Socket)?;
        let family = genl::resolve_family(&mut socket, MPTCP_PM_NAME).map_err(PmError::Resolve)?;
        Ok(Self { socket, family })
    }

    /// The resolved family.
    pub fn family(&self) -> &GenlFamily {
        &self.family
    }

    /// Sends a request built with one of this module's `*_request` functions and waits for the ack.
    pub fn request(
        &mut self,
        builder: MessageBuilder,
        operation: &str,
    ) -> Result<(), NetlinkError> {
        self.socket.request(builder, operation).map(|_| ())
    }

    /// Every endpoint of the in-kernel path manager.
    pub fn endpoints(&mut self) -> Result<Vec<PmAddress>, NetlinkError> {
        let replies = self.socket.dump(
            dump_endpoints_request(self.family.id),
            "dump mptcp endpoints",
        )?;
        Ok(replies
            .iter()
            .filter_map(|m| {
                parse_attrs(m.payload.get(GENL_HDRLEN..)?)
                    .into_iter()
                    .find(|(k, _)| *k == pm_attr::ADDR)
                    .and_then(|(_, v)| PmAddress::parse(v))
            })
            .collect())
    }

    /// Adds an endpoint.
    pub fn add_endpoint(&mut self, endpoint: &PmAddress) -> Result<(), NetlinkError> {
        let b = add_endpoint_request(self.family.id, endpoint);
        self.request(b, &format!("add mptcp endpoint {}", endpoint.addr))
    }

    /// Deletes endpoint `id` (its address is needed by older kernels).
    pub fn del_endpoint(&mut self, id: u8, addr: IpAddr) -> Result<(), NetlinkError> {
        let b = del_endpoint_request(self.family.id, id, addr);
        self.request(b, &format!("delete mptcp endpoint {id} ({addr})"))
    }

    /// The in-kernel path manager's limits: `(subflows, add_addr_accepted)` (`ip mptcp limits`).
    pub fn limits(&mut self) -> Result<(u32, u32), NetlinkError> {
        let replies = self
            .socket
            .request(command(self.family.id, cmd::GET_LIMITS), "get mptcp limits")?;
        let mut limits = (0, 0);
        for reply in &replies {
            for (kind, value) in parse_attrs(reply.payload.get(GENL_HDRLEN..).unwrap_or_default()) {
                match kind {
                    pm_attr::SUBFLOWS => limits.0 = attr_u32(value).unwrap_or(0),
                    pm_attr::RCV_ADD_ADDRS => limits.1 = attr_u32(value).unwrap_or(0),
                    _ => {}
                }
            }
        }
        Ok(limits)
    }

    /// Announces `addr` on connection `token` (userspace PM).
    pub fn announce(&mut self, token: u32, addr: &PmAddress) -> Result<(), NetlinkError> {
        let b = announce_request(self.family.id, token, addr);
        self.request(b, &format!("announce {} on token {token:#x}", addr.addr))
    }

    /// Withdraws address id `local_id` on connection `token` (userspace PM).
    pub fn remove(&mut self, token: u32, local_id: u8) -> Result<(), NetlinkError> {
        let b = remove_request(self.family.id, token, local_id);
        self.request(
            b,
            &format!("remove address id {local_id} on token {token:#x}"),
        )
    }

    /// Opens a subflow (userspace PM).
    pub fn subflow_create(
        &mut self,
        token: u32,
        local: &PmAddress,
        remote: SocketAddr,
    ) -> Result<(), NetlinkError> {
        let b = subflow_create_request(self.family.id, token, local, remote);
        self.request(
            b,
            &format!(
                "create subflow {} -> {remote} on token {token:#x}",
                local.addr
            ),
        )
    }

    /// Closes a subflow (userspace PM).
    pub fn subflow_destroy(
        &mut self,
        token: u32,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Result<(), NetlinkError> {
        let b = subflow_destroy_request(self.family.id, token, local, remote);
        self.request(
            b,
            &format!("destroy subflow {local} -> {remote} on token {token:#x}"),
        )
    }

    /// Sets or clears a subflow's backup flag.
    pub fn set_backup(
        &mut self,
        token: u32,
        local: SocketAddr,
        local_id: Option<u8>,
        remote: SocketAddr,
        backup: bool,
    ) -> Result<(), NetlinkError> {
        let b = set_backup_request(self.family.id, token, local, local_id, remote, backup);
        self.request(
            b,
            &format!("set backup={backup} on subflow {local} -> {remote}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::NLMSG_HDRLEN;

    fn event(cmd: u8, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut builder = MessageBuilder::new(0x20, 0).header(&[cmd, 1, 0, 0]);
        for (kind, value) in attrs {
            builder = builder.attr(*kind, value);
        }
        builder.finish(1)[NLMSG_HDRLEN..].to_vec()
    }

    #[test]
    fn decodes_sub_established() {
        let payload = event(
            event_type::SUB_ESTABLISHED,
            &[
                (attr::TOKEN, 0xdead_beefu32.to_ne_bytes().to_vec()),
                (attr::FAMILY, (libc::AF_INET as u16).to_ne_bytes().to_vec()),
                (attr::LOC_ID, vec![3]),
                (attr::REM_ID, vec![5]),
                (attr::SADDR4, vec![10, 0, 0, 1]),
                (attr::DADDR4, vec![192, 0, 2, 7]),
                (attr::SPORT, 443u16.to_be_bytes().to_vec()),
                (attr::DPORT, 50000u16.to_be_bytes().to_vec()),
                (attr::BACKUP, vec![1]),
                (attr::IF_IDX, 4i32.to_ne_bytes().to_vec()),
            ],
        );
        let ev = decode_event(&payload).expect("decoded");
        assert_eq!(ev.kind, PmEventKind::SubflowEstablished);
        assert_eq!(ev.token, Some(0xdead_beef));
        assert_eq!(ev.local(), Some("10.0.0.1:443".parse().unwrap()));
        assert_eq!(ev.remote(), Some("192.0.2.7:50000".parse().unwrap()));
        assert_eq!((ev.local_id, ev.remote_id), (Some(3), Some(5)));
        assert!(ev.backup);
        assert_eq!(ev.if_index, Some(4));
    }

    #[test]
    fn short_payload_is_none_and_unknown_events_are_kept() {
        assert_eq!(decode_event(&[]), None);
        let ev = decode_event(&event(99, &[])).expect("decoded");
        assert_eq!(ev.kind, PmEventKind::Other(99));
        assert_eq!(ev.token, None);
    }

    #[test]
    fn address_nest_round_trips() {
        let addr = PmAddress {
            addr: "fd00::7".parse().unwrap(),
            port: 8080,
            id: Some(9),
            flags: flags::SIGNAL | flags::BACKUP,
            if_index: 3,
        };
        let msg = add_endpoint_request(0x20, &addr).finish(1);
        let attrs = parse_attrs(&msg[NLMSG_HDRLEN + GENL_HDRLEN..]);
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs[0].0, pm_attr::ADDR);
        assert_eq!(PmAddress::parse(attrs[0].1), Some(addr));
    }
}
