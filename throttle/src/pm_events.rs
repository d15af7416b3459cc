//! The kernel's MPTCP path-manager events (generic netlink family `mptcp_pm`,
//! multicast group `mptcp_pm_events`) and the `MPTCP_PM_CMD_SET_FLAGS` command.
//!
//! Numbers are from `linux/mptcp_pm.h` (uapi, generated from
//! `Documentation/netlink/specs/mptcp_pm.yaml`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::event::{ConnectionToken, InterfaceRef, SubflowEvent, SubflowInfo};
use crate::netlink::{
    attr_string, attr_u16, attr_u32, parse_attrs, MessageBuilder, NetlinkError, NetlinkSocket,
};

/// Family name.
pub const MPTCP_PM_NAME: &str = "mptcp_pm";
/// Event multicast group name.
pub const MPTCP_PM_EV_GRP_NAME: &str = "mptcp_pm_events";
/// Family version.
pub const MPTCP_PM_VER: u8 = 1;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;

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
    /// `MPTCP_ATTR_IF_IDX` (s32).
    pub const IF_IDX: u16 = 15;
}

const MPTCP_PM_CMD_SET_FLAGS: u8 = 7;
const MPTCP_PM_ATTR_ADDR: u16 = 1;
const MPTCP_PM_ATTR_TOKEN: u16 = 4;
const MPTCP_PM_ATTR_ADDR_REMOTE: u16 = 6;
const MPTCP_PM_ADDR_ATTR_FAMILY: u16 = 1;
const MPTCP_PM_ADDR_ATTR_ID: u16 = 2;
const MPTCP_PM_ADDR_ATTR_ADDR4: u16 = 3;
const MPTCP_PM_ADDR_ATTR_ADDR6: u16 = 4;
const MPTCP_PM_ADDR_ATTR_PORT: u16 = 5;
const MPTCP_PM_ADDR_ATTR_FLAGS: u16 = 6;
const MPTCP_PM_ADDR_FLAG_BACKUP: u32 = 1 << 2;

/// Why the event source could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EventSourceError {
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

/// A resolved generic netlink family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenlFamily {
    /// Family id (message type).
    pub id: u16,
    /// Multicast groups by name.
    pub groups: Vec<(String, u32)>,
}

fn genl_header(cmd: u8, version: u8) -> [u8; 4] {
    [cmd, version, 0, 0]
}

/// Looks up a generic netlink family by name.
pub fn resolve_family(socket: &mut NetlinkSocket, name: &str) -> Result<GenlFamily, NetlinkError> {
    let request = MessageBuilder::new(GENL_ID_CTRL, 0)
        .header(&genl_header(CTRL_CMD_GETFAMILY, 2))
        .attr_str(CTRL_ATTR_FAMILY_NAME, name);
    let replies = socket.request(request, &format!("resolve genl family {name}"))?;
    for reply in replies {
        let Some(attrs) = reply.payload.get(4..) else {
            continue;
        };
        let mut id = None;
        let mut groups = Vec::new();
        for (kind, value) in parse_attrs(attrs) {
            match kind {
                CTRL_ATTR_FAMILY_ID => id = attr_u16(value),
                CTRL_ATTR_MCAST_GROUPS => {
                    for (_, group) in parse_attrs(value) {
                        let mut group_name = None;
                        let mut group_id = None;
                        for (k, v) in parse_attrs(group) {
                            match k {
                                CTRL_ATTR_MCAST_GRP_NAME => group_name = Some(attr_string(v)),
                                CTRL_ATTR_MCAST_GRP_ID => group_id = attr_u32(v),
                                _ => {}
                            }
                        }
                        if let (Some(n), Some(i)) = (group_name, group_id) {
                            groups.push((n, i));
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some(id) = id {
            return Ok(GenlFamily { id, groups });
        }
    }
    Err(NetlinkError::Kernel {
        operation: format!("resolve genl family {name}"),
        source: std::io::Error::from_raw_os_error(libc::ENOENT),
        message: None,
    })
}

/// Opens a socket subscribed to `mptcp_pm_events`; returns it with the family id.
pub fn open_event_socket() -> Result<(NetlinkSocket, u16), EventSourceError> {
    let mut socket =
        NetlinkSocket::open(libc::NETLINK_GENERIC).map_err(EventSourceError::Socket)?;
    let family = resolve_family(&mut socket, MPTCP_PM_NAME).map_err(EventSourceError::Resolve)?;
    let group = family
        .groups
        .iter()
        .find(|(name, _)| name == MPTCP_PM_EV_GRP_NAME)
        .map(|(_, id)| *id)
        .ok_or(EventSourceError::NoEventGroup)?;
    socket
        .add_membership(group)
        .map_err(EventSourceError::Join)?;
    Ok((socket, family.id))
}

/// Decodes one `mptcp_pm` event message (generic header + attributes).
/// Returns `None` for events the throttle does not use (listener events).
pub fn decode_event(payload: &[u8]) -> Option<SubflowEvent> {
    let cmd = *payload.first()?;
    let attrs = parse_attrs(payload.get(4..)?);
    let get = |kind: u16| attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
    let token = ConnectionToken(attr_u32(get(attr::TOKEN)?)?);
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
    let subflow = || -> Option<SubflowInfo> {
        let local = SocketAddr::new(ip(attr::SADDR4, attr::SADDR6)?, be16(attr::SPORT)?);
        let remote = SocketAddr::new(ip(attr::DADDR4, attr::DADDR6)?, be16(attr::DPORT)?);
        let mut info = SubflowInfo::new(local, remote);
        info.local_id = u8_attr(attr::LOC_ID);
        info.remote_id = u8_attr(attr::REM_ID);
        info.backup = u8_attr(attr::BACKUP).unwrap_or(0) != 0;
        let if_idx = get(attr::IF_IDX).and_then(attr_u32).filter(|i| *i != 0);
        info.interface = InterfaceRef {
            index: if_idx,
            name: None,
        };
        Some(info)
    };
    Some(match cmd {
        event_type::CREATED => SubflowEvent::ConnectionCreated {
            token,
            subflow: subflow()?,
        },
        event_type::ESTABLISHED => SubflowEvent::ConnectionEstablished {
            token,
            subflow: subflow()?,
        },
        event_type::CLOSED => SubflowEvent::ConnectionClosed { token },
        event_type::ANNOUNCED => SubflowEvent::AddressAnnounced {
            token,
            remote_id: u8_attr(attr::REM_ID)?,
            addr: ip(attr::DADDR4, attr::DADDR6)?,
            port: be16(attr::DPORT).filter(|p| *p != 0),
        },
        event_type::REMOVED => SubflowEvent::AddressRemoved {
            token,
            remote_id: u8_attr(attr::REM_ID)?,
        },
        event_type::SUB_ESTABLISHED => SubflowEvent::SubflowEstablished {
            token,
            subflow: subflow()?,
        },
        event_type::SUB_CLOSED => SubflowEvent::SubflowClosed {
            token,
            subflow: subflow()?,
        },
        event_type::SUB_PRIORITY => SubflowEvent::PriorityChanged {
            token,
            subflow: subflow()?,
        },
        _ => return None,
    })
}

fn address_nest(
    builder: MessageBuilder,
    kind: u16,
    addr: SocketAddr,
    id: Option<u8>,
    flags: Option<u32>,
) -> MessageBuilder {
    let mut b = builder.begin_nest(kind);
    match addr.ip() {
        IpAddr::V4(v4) => {
            b = b
                .attr_u16(MPTCP_PM_ADDR_ATTR_FAMILY, libc::AF_INET as u16)
                .attr(MPTCP_PM_ADDR_ATTR_ADDR4, &v4.octets());
        }
        IpAddr::V6(v6) => {
            b = b
                .attr_u16(MPTCP_PM_ADDR_ATTR_FAMILY, libc::AF_INET6 as u16)
                .attr(MPTCP_PM_ADDR_ATTR_ADDR6, &v6.octets());
        }
    }
    if let Some(id) = id {
        b = b.attr_u8(MPTCP_PM_ADDR_ATTR_ID, id);
    }
    b = b.attr_u16(MPTCP_PM_ADDR_ATTR_PORT, addr.port());
    if let Some(flags) = flags {
        b = b.attr_u32(MPTCP_PM_ADDR_ATTR_FLAGS, flags);
    }
    b.end_nest()
}

/// `MPTCP_PM_CMD_SET_FLAGS` for one subflow of connection `token`: sets or
/// clears the backup flag (the kernel then sends MP_PRIO). The kernel accepts
/// a per-connection request only where the connection's path manager allows
/// it (userspace PM, Linux 5.19+); otherwise it answers with an error.
pub fn set_backup_request(
    family_id: u16,
    token: ConnectionToken,
    local: SocketAddr,
    local_id: Option<u8>,
    remote: SocketAddr,
    backup: bool,
) -> MessageBuilder {
    let flags = if backup { MPTCP_PM_ADDR_FLAG_BACKUP } else { 0 };
    let builder = MessageBuilder::new(family_id, 0)
        .header(&genl_header(MPTCP_PM_CMD_SET_FLAGS, MPTCP_PM_VER))
        .attr_u32(MPTCP_PM_ATTR_TOKEN, token.0);
    let builder = address_nest(builder, MPTCP_PM_ATTR_ADDR, local, local_id, Some(flags));
    address_nest(builder, MPTCP_PM_ATTR_ADDR_REMOTE, remote, None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(cmd: u8, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut builder = MessageBuilder::new(0x20, 0).header(&[cmd, 1, 0, 0]);
        for (kind, value) in attrs {
            builder = builder.attr(*kind, value);
        }
        builder.finish(1)[16..].to_vec()
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
        let Some(SubflowEvent::SubflowEstablished { token, subflow }) = decode_event(&payload)
        else {
            panic!("not decoded as SubflowEstablished");
        };
        assert_eq!(token, ConnectionToken(0xdead_beef));
        assert_eq!(subflow.tuple.local, "10.0.0.1:443".parse().unwrap());
        assert_eq!(subflow.tuple.remote, "192.0.2.7:50000".parse().unwrap());
        assert_eq!(subflow.local_id, Some(3));
        assert_eq!(subflow.remote_id, Some(5));
        assert!(subflow.backup);
        assert_eq!(subflow.interface.index, Some(4));
    }

    #[test]
    fn decodes_closed_and_ignores_listener_events() {
        let closed = event(
            event_type::CLOSED,
            &[(attr::TOKEN, 7u32.to_ne_bytes().to_vec())],
        );
        assert_eq!(
            decode_event(&closed),
            Some(SubflowEvent::ConnectionClosed {
                token: ConnectionToken(7)
            })
        );
        let listener = event(15, &[(attr::TOKEN, 7u32.to_ne_bytes().to_vec())]);
        assert_eq!(decode_event(&listener), None);
    }
}
