//! Minimal, bounds-checked reading of the inner IP packet: addresses, protocol,
//! ports and the TCP fields the re-sequencer and the routing table need.
//!
//! IPv6 extension headers are not walked: a packet whose first Next Header is
//! not TCP or UDP is reported with that protocol and no ports.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

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
    /// Parses the headers of the IP packet in `buf`.
    pub fn parse(buf: &[u8]) -> Result<InnerPacket, PacketError> {
        let first = *buf.first().ok_or(PacketError::Truncated)?;
        let (source, destination, proto, ip_header_len, total_len, first_fragment) =
            match first >> 4 {
                4 => {
                    if buf.len() < 20 {
                        return Err(PacketError::Truncated);
                    }
                    let ihl = usize::from(first & 0x0f) * 4;
                    let total = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
                    if ihl < 20 || total < ihl || total > buf.len() {
                        return Err(PacketError::BadHeaderLength);
                    }
                    let fragment_offset = u16::from_be_bytes([buf[6], buf[7]]) & 0x1fff;
                    let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
                    let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
                    (
                        IpAddr::V4(src),
                        IpAddr::V4(dst),
                        buf[9],
                        ihl,
                        total,
                        fragment_offset == 0,
                    )
                }
                6 => {
                    if buf.len() < 40 {
                        return Err(PacketError::Truncated);
                    }
                    let payload = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
                    let total = 40 + payload;
                    if total > buf.len() {
                        return Err(PacketError::BadHeaderLength);
                    }
                    let mut src = [0u8; 16];
                    src.copy_from_slice(&buf[8..24]);
                    let mut dst = [0u8; 16];
                    dst.copy_from_slice(&buf[24..40]);
                    (
                        IpAddr::V6(Ipv6Addr::from(src)),
                        IpAddr::V6(Ipv6Addr::from(dst)),
                        buf[6],
                        40,
                        total,
                        true,
                    )
                }
                other => return Err(PacketError::UnsupportedVersion(other)),
            };
        let protocol = Protocol::from_number(proto);
        let transport = &buf[ip_header_len..total_len];
        let mut packet = InnerPacket {
            source,
            destination,
            protocol,
            ip_header_len,
            total_len,
            source_port: None,
            destination_port: None,
            tcp: None,
        };
        if !first_fragment {
            return Ok(packet);
        }
        match protocol {
            Protocol::Udp => {
                if transport.len() < 8 {
                    return Err(PacketError::Truncated);
                }
                packet.source_port = Some(u16::from_be_bytes([transport[0], transport[1]]));
                packet.destination_port = Some(u16::from_be_bytes([transport[2], transport[3]]));
            }
            Protocol::Tcp => {
                if transport.len() < 20 {
                    return Err(PacketError::Truncated);
                }
                let header_len = usize::from(transport[12] >> 4) * 4;
                if header_len < 20 || header_len > transport.len() {
                    return Err(PacketError::BadHeaderLength);
                }
                packet.source_port = Some(u16::from_be_bytes([transport[0], transport[1]]));
                packet.destination_port = Some(u16::from_be_bytes([transport[2], transport[3]]));
                packet.tcp = Some(TcpInfo {
                    sequence: u32::from_be_bytes([
                        transport[4],
                        transport[5],
                        transport[6],
                        transport[7],
                    ]),
                    flags: transport[13],
                    offset: ip_header_len,
                    header_len,
                    payload_len: transport.len() - header_len,
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

/// Internet checksum (RFC 1071) helpers.
pub mod checksum {
    use super::{InnerPacket, PacketError};
    use std::net::IpAddr;

    /// One's-complement sum of `data` folded into `acc` (not yet inverted).
    pub fn sum16(mut acc: u32, data: &[u8]) -> u32 {
        let mut chunks = data.chunks_exact(2);
        for pair in &mut chunks {
            acc += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        if let [last] = chunks.remainder() {
            acc += u32::from(u16::from_be_bytes([*last, 0]));
        }
        acc
    }

    /// Folds and inverts a one's-complement sum.
    pub fn finish(mut acc: u32) -> u16 {
        while acc > 0xffff {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    /// One's-complement sum of the TCP/UDP pseudo-header of `packet` (not inverted).
    pub fn pseudo_header_sum(packet: &InnerPacket, transport_len: usize) -> u32 {
        let mut acc = 0;
        match (packet.source, packet.destination) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                acc = sum16(acc, &s.octets());
                acc = sum16(acc, &d.octets());
                acc += u32::from(packet.protocol.number());
                // An IPv4 packet is at most 65535 bytes.
                acc += transport_len as u32;
            }
            (s, d) => {
                for ip in [s, d] {
                    acc = match ip {
                        IpAddr::V4(v4) => sum16(acc, &v4.to_ipv6_mapped().octets()),
                        IpAddr::V6(v6) => sum16(acc, &v6.octets()),
                    };
                }
                let len = transport_len as u32;
                acc += len >> 16;
                acc += len & 0xffff;
                acc += u32::from(packet.protocol.number());
            }
        }
        acc
    }

    /// Whether the TCP checksum of the IP packet in `buf` is correct.
    pub fn tcp_checksum_ok(buf: &[u8]) -> Result<bool, PacketError> {
        let packet = InnerPacket::parse(buf)?;
        let segment = &buf[packet.ip_header_len..packet.total_len];
        let acc = sum16(pseudo_header_sum(&packet, segment.len()), segment);
        Ok(finish(acc) == 0)
    }

    /// Recomputes the TCP checksum of the IP packet in `buf` in place.
    pub fn update_tcp_checksum(buf: &mut [u8]) -> Result<(), PacketError> {
        let packet = InnerPacket::parse(buf)?;
        let tcp = packet.tcp.ok_or(PacketError::NotTcp)?;
        let checksum_at = tcp.offset + 16;
        buf[checksum_at..checksum_at + 2].copy_from_slice(&[0, 0]);
        let segment = &buf[packet.ip_header_len..packet.total_len];
        let value = finish(sum16(pseudo_header_sum(&packet, segment.len()), segment));
        buf[checksum_at..checksum_at + 2].copy_from_slice(&value.to_be_bytes());
        Ok(())
    }
}

/// Test and benchmark helpers that build inner packets with valid checksums.
pub mod build {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::checksum::{finish, sum16};

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
        let checksum = finish(sum16(sum16(0, &pseudo), &tcp));
        tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
        let total = 20 + tcp.len();
        let mut ip = vec![0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&src.octets());
        ip[16..20].copy_from_slice(&dst.octets());
        let ip_checksum = finish(sum16(0, &ip));
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
        let checksum = finish(sum16(sum16(0, &pseudo), &tcp));
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
        let ip_checksum = finish(sum16(0, &ip[..20]));
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
