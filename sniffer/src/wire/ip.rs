//! The TCP segments of captured IP packets: the 4-tuple, flags and the
//! options area, read with the workspace's one header parser
//! ([`mptcp_wire`]) and kept as captured (a snap length may cut them).

use std::net::IpAddr;

pub use mptcp_wire::ip::{field, IpError, PROTOCOL_TCP};
use mptcp_wire::{IpHeader, TcpHeader};

/// TCP header flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;

    /// Whether FIN is set.
    pub fn fin(self) -> bool {
        self.0 & Self::FIN != 0
    }
    /// Whether SYN is set.
    pub fn syn(self) -> bool {
        self.0 & Self::SYN != 0
    }
    /// Whether RST is set.
    pub fn rst(self) -> bool {
        self.0 & Self::RST != 0
    }
    /// Whether ACK is set.
    pub fn ack(self) -> bool {
        self.0 & Self::ACK != 0
    }
}

/// A decoded TCP segment: the fields the tracker and the printers need, borrowing the options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Flags.
    pub flags: TcpFlags,
    /// The options area (between the fixed header and the payload).
    pub options: &'a [u8],
    /// Payload length according to the IP header.
    pub payload_len: usize,
}

impl<'a> Segment<'a> {
    /// Decodes an IPv4 or IPv6 packet (version from the first nibble), walking IPv6 extension
    /// headers. `Ok(None)` when the packet is not TCP or is a non-first fragment. A total length of
    /// 0 (segmentation offload) counts as what was captured.
    pub fn parse_ip(bytes: &'a [u8]) -> Result<Option<Segment<'a>>, IpError> {
        let ip = IpHeader::parse(bytes)?;
        if ip.protocol != PROTOCOL_TCP || !ip.first_fragment {
            return Ok(None);
        }
        let total_len = ip.total_len.unwrap_or(bytes.len());
        Self::parse_tcp(
            ip.source,
            ip.destination,
            &bytes[ip.transport_offset..],
            total_len.saturating_sub(ip.transport_offset),
        )
        .map(Some)
    }

    /// Decodes an IPv4 packet.
    pub fn parse_ipv4(bytes: &'a [u8]) -> Result<Option<Segment<'a>>, IpError> {
        match bytes.first().map(|b| b >> 4) {
            Some(4) | None => Self::parse_ip(bytes),
            Some(version) => Err(IpError::BadVersion(version)),
        }
    }

    /// Decodes an IPv6 packet, skipping hop-by-hop, routing, destination-options,
    /// authentication and first-fragment extension headers.
    pub fn parse_ipv6(bytes: &'a [u8]) -> Result<Option<Segment<'a>>, IpError> {
        match bytes.first().map(|b| b >> 4) {
            Some(6) | None => Self::parse_ip(bytes),
            Some(version) => Err(IpError::BadVersion(version)),
        }
    }

    /// Decodes a TCP header whose segment is `segment_len` bytes long according to IP.
    pub fn parse_tcp(
        src: IpAddr,
        dst: IpAddr,
        bytes: &'a [u8],
        segment_len: usize,
    ) -> Result<Segment<'a>, IpError> {
        // A snap length may cut the options area: the parser keeps what was captured (the options
        // walker reports the cut option), as Wireshark decodes the options before the cut.
        let tcp = TcpHeader::parse(bytes)?;
        Ok(Segment {
            src,
            dst,
            src_port: tcp.source_port,
            dst_port: tcp.destination_port,
            seq: tcp.sequence,
            ack: tcp.acknowledgment,
            flags: TcpFlags(tcp.flags),
            options: tcp.options,
            payload_len: segment_len.saturating_sub(tcp.header_len),
        })
    }

    /// Iterates over the segment's TCP options.
    pub fn tcp_options(&self) -> super::TcpOptionIter<'a> {
        super::TcpOptionIter::new(self.options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_headers_are_errors() {
        assert!(matches!(
            Segment::parse_ip(&[]),
            Err(IpError::Truncated { .. })
        ));
        assert!(matches!(
            Segment::parse_ip(&[0x45; 10]),
            Err(IpError::Truncated { .. })
        ));
        assert!(matches!(
            Segment::parse_ip(&[0x75; 30]),
            Err(IpError::BadVersion(7))
        ));
        let mut v4 = [0u8; 40];
        v4[0] = 0x45;
        v4[9] = 6;
        v4[32] = 0x40; // data offset 4 words
        assert!(matches!(
            Segment::parse_ip(&v4),
            Err(IpError::BadHeaderLength {
                header: "TCP",
                length: 16
            })
        ));
        v4[32] = 0x50;
        v4[33] = TcpFlags::SYN;
        let segment = Segment::parse_ip(&v4).unwrap().unwrap();
        assert!(segment.flags.syn() && !segment.flags.ack());
        assert_eq!(segment.options.len(), 0);
        // Options cut by the snap length: what was captured is kept.
        let mut cut = v4.to_vec();
        cut.resize(44, 0);
        cut[32] = 0x60;
        cut[40] = 30;
        cut[41] = 4;
        let segment = Segment::parse_ip(&cut[..42]).unwrap().unwrap();
        assert_eq!(segment.options, &[30, 4]);
        assert!(segment.tcp_options().next().unwrap().is_err());
        v4[9] = 17;
        assert_eq!(Segment::parse_ip(&v4), Ok(None));
    }
}
