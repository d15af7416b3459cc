//! `NETLINK_SOCK_DIAG`: dumping the namespace's TCP sockets with `inet_diag`, and the MPTCP subflows
//! among them. A subflow is a TCP socket whose upper-layer protocol (ULP) is `mptcp`; asked with
//! `INET_DIAG_INFO` by a process with `CAP_NET_ADMIN`, the kernel adds its MPTCP state
//! (`INET_DIAG_ULP_INFO` → `INET_ULP_INFO_MPTCP`: tokens, address ids, flags). That is the live subflow
//! set of every MPTCP connection in the namespace, whoever owns the sockets. Listings are filtered in
//! the kernel: far cheaper than reading `/proc/net/tcp`, which walks every socket of the namespace as
//! text (about 15 ms per read here); [`listening_tcp_ports`] lists the listening ports.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::socket::{
    attr_string, attr_u32, parse_attrs, MessageBuilder, NetlinkError, NetlinkSocket,
};

/// `SOCK_DIAG_BY_FAMILY`.
pub const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `INET_DIAG_INFO`: the extension bit that also brings the ULP info.
const INET_DIAG_INFO: u8 = 2;
const INET_DIAG_ULP_INFO: u16 = 19;
const INET_ULP_INFO_NAME: u16 = 1;
const INET_ULP_INFO_MPTCP: u16 = 3;
const MPTCP_SUBFLOW_ATTR_TOKEN_REM: u16 = 1;
const MPTCP_SUBFLOW_ATTR_TOKEN_LOC: u16 = 2;
const MPTCP_SUBFLOW_ATTR_FLAGS: u16 = 8;
const MPTCP_SUBFLOW_ATTR_ID_REM: u16 = 9;
const MPTCP_SUBFLOW_ATTR_ID_LOC: u16 = 10;

/// `MPTCP_SUBFLOW_FLAG_*`.
pub mod subflow_flags {
    /// The peer sent MP_CAPABLE: the connection's initial subflow.
    pub const MCAP_REM: u32 = 1 << 0;
    /// This end sent MP_CAPABLE.
    pub const MCAP_LOC: u32 = 1 << 1;
    /// The peer sent MP_JOIN: a joined subflow.
    pub const JOIN_REM: u32 = 1 << 2;
    /// This end sent MP_JOIN.
    pub const JOIN_LOC: u32 = 1 << 3;
    /// The peer marked the subflow backup.
    pub const BKUP_REM: u32 = 1 << 4;
    /// This end marked the subflow backup.
    pub const BKUP_LOC: u32 = 1 << 5;
    /// The MPTCP handshake completed.
    pub const FULLY_ESTABLISHED: u32 = 1 << 6;
    /// The subflow is connected.
    pub const CONNECTED: u32 = 1 << 7;
}

/// TCP states as `idiag_states` bits (`1 << TCP_*`).
pub mod tcp_states {
    /// `TCP_ESTABLISHED`.
    pub const ESTABLISHED: u32 = 1 << 1;
    /// `TCP_CLOSE_WAIT`: the peer closed its side; data still flows to it.
    pub const CLOSE_WAIT: u32 = 1 << 8;
    /// `TCP_LISTEN`.
    pub const LISTEN: u32 = 1 << 10;
}

/// One MPTCP subflow (a TCP socket with the `mptcp` ULP) as `inet_diag` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MptcpSubflowDiag {
    /// The socket's local address and port.
    pub local: SocketAddr,
    /// The peer's address and port.
    pub remote: SocketAddr,
    /// TCP state (`TCP_ESTABLISHED` = 1, ...).
    pub state: u8,
    /// Device the socket is bound to, 0 if none.
    pub bound_interface: u32,
    /// Token of the connection at this end (what `mptcp_pm` events call the token).
    pub token_local: u32,
    /// Token at the peer.
    pub token_remote: u32,
    /// MPTCP id of the local address.
    pub local_id: u8,
    /// MPTCP id of the peer's address.
    pub remote_id: u8,
    /// [`subflow_flags`].
    pub flags: u32,
}

/// A dump request for TCP sockets of `family` (`AF_INET` or `AF_INET6`) in `states`, with the
/// extension that carries the ULP info.
pub fn tcp_dump_request(family: u8, states: u32) -> MessageBuilder {
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, then a zero inet_diag_sockid.
    let mut header = [0u8; 56];
    header[0] = family;
    header[1] = libc::IPPROTO_TCP as u8;
    header[2] = 1 << (INET_DIAG_INFO - 1);
    header[4..8].copy_from_slice(&states.to_ne_bytes());
    MessageBuilder::new(SOCK_DIAG_BY_FAMILY, 0).header(&header)
}

fn address(family: u8, bytes: &[u8]) -> Option<IpAddr> {
    match i32::from(family) {
        libc::AF_INET => Some(IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(bytes.get(..4)?).ok()?,
        ))),
        libc::AF_INET6 => Some(IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(bytes.get(..16)?).ok()?,
        ))),
        _ => None,
    }
}

/// Reads one `inet_diag_msg` reply; `None` unless it is an MPTCP subflow (or is malformed).
pub fn parse_mptcp_subflow(payload: &[u8]) -> Option<MptcpSubflowDiag> {
    // struct inet_diag_msg: family, state, timer, retrans, inet_diag_sockid (sport, dport (be16),
    // src[16], dst[16], if (u32), cookie[2]), expires, rqueue, wqueue, uid, inode: 72 bytes.
    let header = payload.get(..72)?;
    let family = header[0];
    let state = header[1];
    let sport = u16::from_be_bytes([header[4], header[5]]);
    let dport = u16::from_be_bytes([header[6], header[7]]);
    let local = SocketAddr::new(address(family, &header[8..24])?, sport);
    let remote = SocketAddr::new(address(family, &header[24..40])?, dport);
    let bound_interface = u32::from_ne_bytes(header[40..44].try_into().ok()?);
    let ulp = parse_attrs(&payload[72..])
        .into_iter()
        .find(|(kind, _)| *kind == INET_DIAG_ULP_INFO)?
        .1;
    let ulp = parse_attrs(ulp);
    let name = ulp.iter().find(|(k, _)| *k == INET_ULP_INFO_NAME)?.1;
    if attr_string(name) != "mptcp" {
        return None;
    }
    let info = ulp.iter().find(|(k, _)| *k == INET_ULP_INFO_MPTCP)?.1;
    let mut subflow = MptcpSubflowDiag {
        local,
        remote,
        state,
        bound_interface,
        token_local: 0,
        token_remote: 0,
        local_id: 0,
        remote_id: 0,
        flags: 0,
    };
    for (kind, value) in parse_attrs(info) {
        match kind {
            MPTCP_SUBFLOW_ATTR_TOKEN_LOC => subflow.token_local = attr_u32(value)?,
            MPTCP_SUBFLOW_ATTR_TOKEN_REM => subflow.token_remote = attr_u32(value)?,
            MPTCP_SUBFLOW_ATTR_FLAGS => subflow.flags = attr_u32(value)?,
            MPTCP_SUBFLOW_ATTR_ID_LOC => subflow.local_id = *value.first()?,
            MPTCP_SUBFLOW_ATTR_ID_REM => subflow.remote_id = *value.first()?,
            _ => {}
        }
    }
    Some(subflow)
}

/// Every MPTCP subflow of the calling thread's network namespace in `states` ([`tcp_states`]), IPv4
/// and IPv6, over `socket` (a `NETLINK_SOCK_DIAG` socket). Needs `CAP_NET_ADMIN` for the MPTCP part.
pub fn dump_mptcp_subflows(
    socket: &mut NetlinkSocket,
    states: u32,
) -> Result<Vec<MptcpSubflowDiag>, NetlinkError> {
    let mut subflows = Vec::new();
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        for message in socket.dump(tcp_dump_request(family, states), "dump tcp sockets")? {
            if message.msg_type == SOCK_DIAG_BY_FAMILY {
                subflows.extend(parse_mptcp_subflow(&message.payload));
            }
        }
    }
    Ok(subflows)
}

/// The local ports of listening TCP sockets (IPv4 and IPv6, MPTCP listeners' subflow sockets included)
/// in the calling thread's network namespace.
pub fn listening_tcp_ports() -> Result<BTreeSet<u16>, NetlinkError> {
    let operation = "list listening TCP sockets";
    let mut socket =
        NetlinkSocket::open(libc::NETLINK_SOCK_DIAG).map_err(|source| NetlinkError::Socket {
            operation: operation.to_owned(),
            source,
        })?;
    let mut ports = BTreeSet::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let replies = socket.dump(
            tcp_dump_request(family as u8, tcp_states::LISTEN),
            operation,
        )?;
        // struct inet_diag_msg: family, state, timer, retrans, then the sockid (sport first, big endian).
        ports.extend(
            replies
                .iter()
                .filter_map(|m| m.payload.get(4..6))
                .map(|b| u16::from_be_bytes([b[0], b[1]])),
        );
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subflow_reply_is_read() {
        let mut header = vec![0u8; 72];
        header[0] = libc::AF_INET as u8;
        header[1] = 1;
        header[4..6].copy_from_slice(&443u16.to_be_bytes());
        header[6..8].copy_from_slice(&50000u16.to_be_bytes());
        header[8..12].copy_from_slice(&[10, 0, 0, 1]);
        header[24..28].copy_from_slice(&[192, 0, 2, 7]);
        let message = MessageBuilder::new(SOCK_DIAG_BY_FAMILY, 0)
            .header(&header)
            .begin_nest(INET_DIAG_ULP_INFO)
            .attr_str(INET_ULP_INFO_NAME, "mptcp")
            .begin_nest(INET_ULP_INFO_MPTCP)
            .attr_u32(MPTCP_SUBFLOW_ATTR_TOKEN_LOC, 0xdead_beef)
            .attr_u32(MPTCP_SUBFLOW_ATTR_FLAGS, subflow_flags::JOIN_REM)
            .attr_u8(MPTCP_SUBFLOW_ATTR_ID_REM, 2)
            .end_nest()
            .end_nest()
            .finish(1);
        let subflow = parse_mptcp_subflow(&message[16..]).unwrap();
        assert_eq!(subflow.local, "10.0.0.1:443".parse().unwrap());
        assert_eq!(subflow.remote, "192.0.2.7:50000".parse().unwrap());
        assert_eq!(subflow.token_local, 0xdead_beef);
        assert_eq!(subflow.flags, subflow_flags::JOIN_REM);
        assert_eq!(subflow.remote_id, 2);
        // A plain TCP socket (no ULP) is not a subflow; truncated replies are refused.
        assert_eq!(parse_mptcp_subflow(&header), None);
        assert_eq!(parse_mptcp_subflow(&message[16..60]), None);
    }
}
