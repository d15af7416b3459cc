//! The kernel's MPTCP state as the throttle sees it: [`decode_event`] turns a decoded `mptcp_pm` event
//! of the shared netlink layer ([`mptcp_netlink::mptcp_pm`]) into a [`SubflowEvent`], and
//! [`live_subflow`] a subflow listed by `sock_diag` ([`mptcp_netlink::sock_diag`]) into the core's
//! resync snapshot entry.

use std::net::SocketAddr;

use mptcp_netlink::mptcp_pm::{self, PmEventKind};
use mptcp_netlink::sock_diag::{subflow_flags, MptcpSubflowDiag};

use crate::config::SubflowRole;
use crate::core::LiveSubflow;
use crate::event::{ConnectionToken, InterfaceRef, SubflowEvent, SubflowInfo};

/// An address as events and snapshots both give it (IPv4-mapped IPv6 as IPv4), so tuples compare.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A subflow `sock_diag` listed, as the core's snapshot entry; `None` without a token (a socket that
/// fell back to TCP before its connection got one).
pub fn live_subflow(diag: &MptcpSubflowDiag) -> Option<LiveSubflow> {
    if diag.token_local == 0 {
        return None;
    }
    let mut info = SubflowInfo::new(canonical(diag.local), canonical(diag.remote));
    info.local_id = Some(diag.local_id);
    info.remote_id = Some(diag.remote_id);
    info.backup = diag.flags & (subflow_flags::BKUP_REM | subflow_flags::BKUP_LOC) != 0;
    if diag.bound_interface != 0 {
        info.interface.index = Some(diag.bound_interface);
    }
    let joined = diag.flags & (subflow_flags::JOIN_REM | subflow_flags::JOIN_LOC) != 0;
    Some(LiveSubflow {
        token: ConnectionToken(diag.token_local),
        subflow: info,
        role: if joined {
            SubflowRole::Joined
        } else {
            SubflowRole::Initial
        },
    })
}

/// Decodes one `mptcp_pm` event message (generic header + attributes).
/// Returns `None` for events the throttle does not use (listener events) and
/// for events that lack an attribute the throttle needs.
pub fn decode_event(payload: &[u8]) -> Option<SubflowEvent> {
    let event = mptcp_pm::decode_event(payload)?;
    let token = ConnectionToken(event.token?);
    let subflow = || -> Option<SubflowInfo> {
        let mut info = SubflowInfo::new(canonical(event.local()?), canonical(event.remote()?));
        info.local_id = event.local_id;
        info.remote_id = event.remote_id;
        info.backup = event.backup;
        info.interface = InterfaceRef {
            index: event.if_index,
            name: None,
        };
        Some(info)
    };
    Some(match event.kind {
        PmEventKind::Created => SubflowEvent::ConnectionCreated {
            token,
            subflow: subflow()?,
        },
        PmEventKind::Established => SubflowEvent::ConnectionEstablished {
            token,
            subflow: subflow()?,
        },
        PmEventKind::Closed => SubflowEvent::ConnectionClosed { token },
        PmEventKind::Announced => SubflowEvent::AddressAnnounced {
            token,
            remote_id: event.remote_id?,
            addr: event.remote_addr?,
            port: event.remote_port.filter(|p| *p != 0),
        },
        PmEventKind::Removed => SubflowEvent::AddressRemoved {
            token,
            remote_id: event.remote_id?,
        },
        PmEventKind::SubflowEstablished => SubflowEvent::SubflowEstablished {
            token,
            subflow: subflow()?,
        },
        PmEventKind::SubflowClosed => SubflowEvent::SubflowClosed {
            token,
            subflow: subflow()?,
        },
        PmEventKind::SubflowPriority => SubflowEvent::PriorityChanged {
            token,
            subflow: subflow()?,
        },
        PmEventKind::ListenerCreated | PmEventKind::ListenerClosed | PmEventKind::Other(_) => {
            return None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mptcp_netlink::mptcp_pm::{attr, event_type};
    use mptcp_netlink::MessageBuilder;

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
