//! What the cores need to know about the inner IP packet: addresses,
//! protocol, ports and the TCP fields the re-sequencer, the routing table and
//! the MSS clamp use, read with the workspace's one header parser
//! ([`mptcp_wire`]); and test packet builders.

use std::net::{IpAddr, SocketAddr};

use mptcp_wire::{IpHeader, TcpHeader, UdpHeader};

use crate::table::session::{FiveTuple, Protocol};

/// TCP SYN flag bit.
pub const TCP_SYN: u8 = 0x02;
/// TCP FIN flag bit.
pub const TCP_FIN: u8 = 0x01;
/// TCP RST flag bit.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK flag bit.
pub const TCP_ACK: u8 = 0x10;

/// Errors reading an inner IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The buffer ends inside a header.
    #[error("inner packet truncated")]
    Truncated,
    /// The IP version nibble is neither 4 nor 6.
    #[error("unsupported IP version {0}")]
    UnsupportedVersion(u8),
    /// A header length field is inconsistent with the buffer.
    #[error("bad header length")]
    BadHeaderLength,
    /// A TCP operation on a packet that is not a TCP first fragment.
    #[error("not a TCP segment")]
    NotTcp,
}

/// TCP fields of an inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfo {
    /// Sequence number.
    pub sequence: u32,
    /// Flags byte (byte 13 of the TCP header).
    pub flags: u8,
    /// Offset of the TCP header in the IP packet.
    pub offset: usize,
    /// TCP header length including options.
    pub header_len: usize,
    /// Payload length.
    pub payload_len: usize,
}

impl TcpInfo {
    /// Sequence space the segment occupies: payload plus one each for SYN and FIN.
    pub fn sequence_len(&self) -> u32 {
        let syn = u32::from(self.flags & TCP_SYN != 0);
        let fin = u32::from(self.flags & TCP_FIN != 0);
        // A TCP payload fits an IP packet, so it fits u32.
        self.payload_len as u32 + syn + fin
    }
}

/// What the cores need to know about an inner IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerPacket {
    /// Source address.
    pub source: IpAddr,
    /// Destination address.
    pub destination: IpAddr,
    /// Transport protocol (first Next Header for IPv6).
    pub protocol: Protocol,
    /// IP header length.
    pub ip_header_len: usize,
    /// Total packet length from the IP header.
    pub total_len: usize,
    /// Source port (TCP/UDP, first fragment only).
    pub source_port: Option<u16>,
    /// Destination port (TCP/UDP, first fragment only).
    pub destination_port: Option<u16>,
    /// TCP fields, for TCP first fragments.
    pub tcp: Option<TcpInfo>,
}

impl InnerPacket {
    /// Parses the headers of the IP packet in `buf` (with the workspace's
    /// one parser, [`mptcp_wire`]): the whole packet its header claims must
    /// be in `buf`, and a TCP header fit in it. IPv6 extension headers are
    /// walked to the upper-layer protocol.
    pub fn parse(buf: &[u8]) -> Result<InnerPacket, PacketError> {
        let ip = IpHeader::parse(buf).map_err(PacketError::from)?;
        // A 0 length field: an empty IPv6 payload, or a broken IPv4 header.
        let total_len = match ip.total_len {
            Some(total) => total,
            None if ip.version == 6 => 40,
            None => return Err(PacketError::BadHeaderLength),
        };
        if total_len < ip.transport_offset || total_len > buf.len() {
            return Err(PacketError::BadHeaderLength);
        }
        let protocol = Protocol::from_number(ip.protocol);
        let mut packet = InnerPacket {
            source: ip.source,
            destination: ip.destination,
            protocol,
            ip_header_len: ip.transport_offset,
            total_len,
            source_port: None,
            destination_port: None,
            tcp: None,
        };
        if !ip.first_fragment {
            return Ok(packet);
        }
        let transport = &buf[ip.transport_offset..total_len];
        match protocol {
            Protocol::Udp => {
                let udp = UdpHeader::parse(transport).map_err(PacketError::from)?;
                packet.source_port = Some(udp.source_port);
                packet.destination_port = Some(udp.destination_port);
            }
            Protocol::Tcp => {
                let tcp = TcpHeader::parse(transport).map_err(PacketError::from)?;
                if tcp.header_len > transport.len() {
                    return Err(PacketError::BadHeaderLength);
                }
                packet.source_port = Some(tcp.source_port);
                packet.destination_port = Some(tcp.destination_port);
                packet.tcp = Some(TcpInfo {
                    sequence: tcp.sequence,
                    flags: tcp.flags,
                    offset: ip.transport_offset,
                    header_len: tcp.header_len,
                    payload_len: transport.len() - tcp.header_len,
                });
            }
            Protocol::Other(_) => {}
        }
        Ok(packet)
    }

    /// The 5-tuple of a packet this node sends (its source is local).
    pub fn outbound_tuple(&self) -> FiveTuple {
        FiveTuple {
            protocol: self.protocol,
            local: SocketAddr::new(self.source, self.source_port.unwrap_or(0)),
            remote: SocketAddr::new(self.destination, self.destination_port.unwrap_or(0)),
        }
    }

    /// The 5-tuple of a packet this node receives, from this node's point of view.
    pub fn inbound_tuple(&self) -> FiveTuple {
        FiveTuple::from_inbound(
            self.protocol,
            SocketAddr::new(self.source, self.source_port.unwrap_or(0)),
            SocketAddr::new(self.destination, self.destination_port.unwrap_or(0)),
        )
    }
}

impl From<mptcp_wire::IpError> for PacketError {
    fn from(error: mptcp_wire::IpError) -> Self {
        match error {
            mptcp_wire::IpError::Truncated { .. } => PacketError::Truncated,
            mptcp_wire::IpError::BadVersion(v) => PacketError::UnsupportedVersion(v),
            mptcp_wire::IpError::BadHeaderLength { .. } => PacketError::BadHeaderLength,
        }
    }
}

/// The Internet checksum: the workspace's one implementation
/// ([`mptcp_wire::checksum`]), and the inner packets' TCP checksums.
pub mod checksum {
    use super::{InnerPacket, PacketError};
    pub use mptcp_wire::checksum::{checksum, finish, fold, sum};

    /// Sum of the TCP/UDP pseudo-header of `packet` for a transport segment of
    /// `transport_len` bytes (not folded, not inverted).
    pub fn pseudo_header_sum(packet: &InnerPacket, transport_len: usize) -> u64 {
        mptcp_wire::checksum::pseudo_header(
            packet.source,
            packet.destination,
            packet.protocol.number(),
            transport_len,
        )
    }

    /// Whether the TCP checksum of the IP packet in `buf` is correct.
    pub fn tcp_checksum_ok(buf: &[u8]) -> Result<bool, PacketError> {
        let packet = InnerPacket::parse(buf)?;
        let segment = &buf[packet.ip_header_len..packet.total_len];
        Ok(finish(sum(pseudo_header_sum(&packet, segment.len()), segment)) == 0)
    }

    /// Recomputes the TCP checksum of the IP packet in `buf` in place.
    pub fn update_tcp_checksum(buf: &mut [u8]) -> Result<(), PacketError> {
        let packet = InnerPacket::parse(buf)?;
        let tcp = packet.tcp.ok_or(PacketError::NotTcp)?;
        let checksum_at = tcp.offset + 16;
        buf[checksum_at..checksum_at + 2].copy_from_slice(&[0, 0]);
        let segment = &buf[packet.ip_header_len..packet.total_len];
        let value = finish(sum(pseudo_header_sum(&packet, segment.len()), segment));
        buf[checksum_at..checksum_at + 2].copy_from_slice(&value.to_be_bytes());
        Ok(())
    }
}

/// Test and benchmark helpers that build inner packets with valid checksums.
pub mod build {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::checksum::{finish, sum};

    fn tcp_segment(
        src_port: u16,
        dst_port: u16,
        sequence: u32,
        flags: u8,
        options: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        assert!(options.len() % 4 == 0 && options.len() <= 40);
        let header_len = 20 + options.len();
        let mut tcp = vec![0u8; header_len];
        tcp[0..2].copy_from_slice(&src_port.to_be_bytes());
        tcp[2..4].copy_from_slice(&dst_port.to_be_bytes());
        tcp[4..8].copy_from_slice(&sequence.to_be_bytes());
        tcp[12] = ((header_len / 4) as u8) << 4;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
        tcp[20..].copy_from_slice(options);
        tcp.extend_from_slice(payload);
        tcp
    }

    /// An IPv4 TCP packet with correct IP and TCP checksums.
    #[allow(clippy::too_many_arguments)]
    pub fn ipv4_tcp(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        src_port: u16,
        dst_port: u16,
        sequence: u32,
        flags: u8,
        options: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        let mut tcp = tcp_segment(src_port, dst_port, sequence, flags, options, payload);
        let mut pseudo = Vec::with_capacity(12);
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        let checksum = finish(sum(sum(0, &pseudo), &tcp));
        tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
        let total = 20 + tcp.len();
        let mut ip = vec![0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&src.octets());
        ip[16..20].copy_from_slice(&dst.octets());
        let ip_checksum = finish(sum(0, &ip));
        ip[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
        ip.extend_from_slice(&tcp);
        ip
    }

    /// An IPv6 TCP packet (no extension headers) with a correct TCP checksum.
    #[allow(clippy::too_many_arguments)]
    pub fn ipv6_tcp(
        src: Ipv6Addr,
        dst: Ipv6Addr,
        src_port: u16,
        dst_port: u16,
        sequence: u32,
        flags: u8,
        options: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        let mut tcp = tcp_segment(src_port, dst_port, sequence, flags, options, payload);
        let mut pseudo = Vec::with_capacity(40);
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&(tcp.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
        let checksum = finish(sum(sum(0, &pseudo), &tcp));
        tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
        let mut ip = vec![0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
        ip[6] = 6;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&src.octets());
        ip[24..40].copy_from_slice(&dst.octets());
        ip.extend_from_slice(&tcp);
        ip
    }

    /// An IPv4 UDP packet (UDP checksum left 0, which IPv4 allows).
    pub fn ipv4_udp(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        src_port: u16,
        dst_port: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let total = 28 + payload.len();
        let mut ip = vec![0u8; 28];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&src.octets());
        ip[16..20].copy_from_slice(&dst.octets());
        let ip_checksum = finish(sum(0, &ip[..20]));
        ip[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
        ip[20..22].copy_from_slice(&src_port.to_be_bytes());
        ip[22..24].copy_from_slice(&dst_port.to_be_bytes());
        ip[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        ip.extend_from_slice(payload);
        ip
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn parses_ipv4_tcp() {
        let pkt = build::ipv4_tcp(
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(192, 0, 2, 80),
            40000,
            80,
            1000,
            TCP_SYN,
            &[],
            b"hello",
        );
        let info = InnerPacket::parse(&pkt).unwrap();
        assert_eq!(info.protocol, Protocol::Tcp);
        assert_eq!(info.destination_port, Some(80));
        let tcp = info.tcp.unwrap();
        assert_eq!(tcp.sequence, 1000);
        assert_eq!(tcp.payload_len, 5);
        assert_eq!(tcp.sequence_len(), 6, "SYN takes one sequence number");
        assert_eq!(
            info.outbound_tuple().remote,
            "192.0.2.80:80".parse().unwrap()
        );
        assert_eq!(info.inbound_tuple().local, "192.0.2.80:80".parse().unwrap());
    }

    #[test]
    fn parses_ipv6_tcp_and_ipv4_udp() {
        let pkt = build::ipv6_tcp(
            "2001:db8::2".parse().unwrap(),
            "2001:db8::80".parse().unwrap(),
            1,
            443,
            7,
            TCP_ACK,
            &[],
            &[0; 10],
        );
        let info = InnerPacket::parse(&pkt).unwrap();
        assert_eq!(info.total_len, 40 + 20 + 10);
        assert_eq!(info.tcp.unwrap().payload_len, 10);
        let udp = build::ipv4_udp(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 5, 53, b"q");
        let info = InnerPacket::parse(&udp).unwrap();
        assert_eq!(info.protocol, Protocol::Udp);
        assert_eq!(
            (info.source_port, info.destination_port),
            (Some(5), Some(53))
        );
        assert!(info.tcp.is_none());
    }

    #[test]
    fn walks_ipv6_extension_headers_and_reads_an_empty_payload() {
        let pkt = build::ipv6_tcp(
            "2001:db8::2".parse().unwrap(),
            "2001:db8::80".parse().unwrap(),
            1,
            443,
            7,
            TCP_ACK,
            &[],
            &[0; 10],
        );
        // The same segment behind an 8-byte destination-options header.
        let mut with_ext = pkt[..40].to_vec();
        with_ext[6] = 60;
        with_ext[4..6].copy_from_slice(&(8u16 + 30).to_be_bytes());
        with_ext.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
        with_ext.extend_from_slice(&pkt[40..]);
        let info = InnerPacket::parse(&with_ext).unwrap();
        assert_eq!(info.protocol, Protocol::Tcp);
        assert_eq!(info.ip_header_len, 48);
        assert_eq!(info.destination_port, Some(443));
        assert_eq!(info.tcp.unwrap().payload_len, 10);
        // Payload length 0 with No Next Header: a valid, empty IPv6 packet.
        let mut empty = pkt[..40].to_vec();
        empty[4..6].fill(0);
        empty[6] = 59;
        let info = InnerPacket::parse(&empty).unwrap();
        assert_eq!((info.total_len, info.source_port), (40, None));
    }

    #[test]
    fn rejects_malformed_headers() {
        assert_eq!(InnerPacket::parse(&[]), Err(PacketError::Truncated));
        assert_eq!(
            InnerPacket::parse(&[0x50; 40]),
            Err(PacketError::UnsupportedVersion(5))
        );
        let mut pkt = build::ipv4_udp(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 5, 53, b"q");
        pkt[2] = 0xff;
        assert_eq!(InnerPacket::parse(&pkt), Err(PacketError::BadHeaderLength));
        assert_eq!(InnerPacket::parse(&pkt[..10]), Err(PacketError::Truncated));
    }

    proptest::proptest! {
        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            let _ = InnerPacket::parse(&bytes);
        }
    }
}
