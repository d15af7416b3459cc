//! IPv4, IPv6, TCP and UDP headers, read in place.
//!
//! [`IpHeader::parse`] reads an IP header down to the transport header:
//! addresses, the upper-layer protocol (after IPv6 extension headers), where
//! the transport header starts, the length the header claims, and whether
//! this is a first fragment (the only one with ports). [`TcpHeader::parse`]
//! and [`UdpHeader::parse`] read the transport header that follows.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

/// IP protocol number of TCP.
pub const PROTOCOL_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTOCOL_UDP: u8 = 17;

/// Why an IP packet could not be read down to its transport header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IpError {
    /// The buffer ends inside a header.
    #[error("{header} header truncated: {available} bytes available, {needed} needed")]
    Truncated {
        /// Which header.
        header: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The IP version nibble is neither 4 nor 6.
    #[error("unknown IP version {0}")]
    BadVersion(u8),
    /// IPv4 IHL below 5 or TCP data offset below 5.
    #[error("{header} header length {length} is below the minimum")]
    BadHeaderLength {
        /// Which header.
        header: &'static str,
        /// The header length in bytes.
        length: usize,
    },
}

fn need(header: &'static str, bytes: &[u8], needed: usize) -> Result<(), IpError> {
    if bytes.len() < needed {
        Err(IpError::Truncated {
            header,
            needed,
            available: bytes.len(),
        })
    } else {
        Ok(())
    }
}

/// Field offsets of the headers.
pub mod field {
    /// IPv4: version and IHL.
    pub const IPV4_VERSION_IHL: usize = 0;
    /// IPv4: total length.
    pub const IPV4_TOTAL_LEN: usize = 2;
    /// IPv4: identification.
    pub const IPV4_ID: usize = 4;
    /// IPv4: flags and fragment offset.
    pub const IPV4_FRAGMENT: usize = 6;
    /// IPv4: time to live.
    pub const IPV4_TTL: usize = 8;
    /// IPv4: protocol.
    pub const IPV4_PROTOCOL: usize = 9;
    /// IPv4: header checksum.
    pub const IPV4_CHECKSUM: usize = 10;
    /// IPv4: source address.
    pub const IPV4_SRC: usize = 12;
    /// IPv4: destination address.
    pub const IPV4_DST: usize = 16;
    /// IPv4: fixed header length.
    pub const IPV4_MIN_LEN: usize = 20;
    /// IPv6: payload length.
    pub const IPV6_PAYLOAD_LEN: usize = 4;
    /// IPv6: next header.
    pub const IPV6_NEXT_HEADER: usize = 6;
    /// IPv6: source address.
    pub const IPV6_SRC: usize = 8;
    /// IPv6: destination address.
    pub const IPV6_DST: usize = 24;
    /// IPv6: fixed header length.
    pub const IPV6_LEN: usize = 40;
    /// TCP: source port.
    pub const TCP_SRC_PORT: usize = 0;
    /// TCP: destination port.
    pub const TCP_DST_PORT: usize = 2;
    /// TCP: sequence number.
    pub const TCP_SEQ: usize = 4;
    /// TCP: acknowledgment number.
    pub const TCP_ACK: usize = 8;
    /// TCP: data offset (high nibble).
    pub const TCP_DATA_OFFSET: usize = 12;
    /// TCP: flags.
    pub const TCP_FLAGS: usize = 13;
    /// TCP: checksum.
    pub const TCP_CHECKSUM: usize = 16;
    /// TCP: fixed header length.
    pub const TCP_MIN_LEN: usize = 20;
    /// UDP: length.
    pub const UDP_LEN: usize = 4;
    /// UDP: checksum.
    pub const UDP_CHECKSUM: usize = 6;
    /// UDP: header length.
    pub const UDP_HEADER_LEN: usize = 8;
}

/// An IP header, read down to the transport header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpHeader {
    /// 4 or 6.
    pub version: u8,
    /// Source address.
    pub source: IpAddr,
    /// Destination address.
    pub destination: IpAddr,
    /// The upper-layer protocol: IPv4's protocol, IPv6's last next header
    /// (after hop-by-hop, routing, destination options, authentication and
    /// fragment headers).
    pub protocol: u8,
    /// Where the transport header starts.
    pub transport_offset: usize,
    /// The packet length the header claims (IPv4 total length, IPv6 40 +
    /// payload length); `None` when the field is 0 (segmentation offload
    /// in captures, IPv6 jumbograms).
    pub total_len: Option<usize>,
    /// Whether this is a whole packet or the first fragment: only then does
    /// the transport header follow.
    pub first_fragment: bool,
}

impl IpHeader {
    /// Reads an IPv4 or IPv6 header (version from the first nibble). The
    /// fixed header, IPv4 options and IPv6 extension headers must be in
    /// `bytes`; the claimed total length is not checked against it.
    pub fn parse(bytes: &[u8]) -> Result<IpHeader, IpError> {
        need("IP", bytes, 1)?;
        match bytes[0] >> 4 {
            4 => Self::parse_ipv4(bytes),
            6 => Self::parse_ipv6(bytes),
            version => Err(IpError::BadVersion(version)),
        }
    }

    fn parse_ipv4(bytes: &[u8]) -> Result<IpHeader, IpError> {
        need("IPv4", bytes, field::IPV4_MIN_LEN)?;
        let header_len = usize::from(bytes[field::IPV4_VERSION_IHL] & 0x0f) * 4;
        if header_len < field::IPV4_MIN_LEN {
            return Err(IpError::BadHeaderLength {
                header: "IPv4",
                length: header_len,
            });
        }
        need("IPv4", bytes, header_len)?;
        let fragment =
            u16::from_be_bytes([bytes[field::IPV4_FRAGMENT], bytes[field::IPV4_FRAGMENT + 1]]);
        let total = usize::from(u16::from_be_bytes([
            bytes[field::IPV4_TOTAL_LEN],
            bytes[field::IPV4_TOTAL_LEN + 1],
        ]));
        let v4 = |at: usize| Ipv4Addr::new(bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]);
        Ok(IpHeader {
            version: 4,
            source: IpAddr::V4(v4(field::IPV4_SRC)),
            destination: IpAddr::V4(v4(field::IPV4_DST)),
            protocol: bytes[field::IPV4_PROTOCOL],
            transport_offset: header_len,
            total_len: (total != 0).then_some(total),
            first_fragment: fragment & 0x1fff == 0,
        })
    }

    fn parse_ipv6(bytes: &[u8]) -> Result<IpHeader, IpError> {
        need("IPv6", bytes, field::IPV6_LEN)?;
        let payload_len = usize::from(u16::from_be_bytes([
            bytes[field::IPV6_PAYLOAD_LEN],
            bytes[field::IPV6_PAYLOAD_LEN + 1],
        ]));
        let v6 = |at: usize| {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&bytes[at..at + 16]);
            Ipv6Addr::from(octets)
        };
        let mut next_header = bytes[field::IPV6_NEXT_HEADER];
        let mut offset = field::IPV6_LEN;
        let mut first_fragment = true;
        // A bounded walk over the extension headers.
        for _ in 0..8 {
            match next_header {
                0 | 43 | 60 => {
                    need("IPv6 extension", bytes, offset + 2)?;
                    next_header = bytes[offset];
                    offset += (usize::from(bytes[offset + 1]) + 1) * 8;
                }
                51 => {
                    // Authentication header: length in 4-octet units, minus 2.
                    need("IPv6 authentication header", bytes, offset + 2)?;
                    next_header = bytes[offset];
                    offset += (usize::from(bytes[offset + 1]) + 2) * 4;
                }
                44 => {
                    need("IPv6 fragment", bytes, offset + 8)?;
                    let fragment_offset =
                        u16::from_be_bytes([bytes[offset + 2], bytes[offset + 3]]) >> 3;
                    first_fragment = fragment_offset == 0;
                    next_header = bytes[offset];
                    offset += 8;
                }
                _ => break,
            }
        }
        need("IPv6 extension", bytes, offset)?;
        Ok(IpHeader {
            version: 6,
            source: IpAddr::V6(v6(field::IPV6_SRC)),
            destination: IpAddr::V6(v6(field::IPV6_DST)),
            protocol: next_header,
            transport_offset: offset,
            total_len: (payload_len != 0).then_some(field::IPV6_LEN + payload_len),
            first_fragment,
        })
    }
}

/// A TCP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpHeader<'a> {
    /// Source port.
    pub source_port: u16,
    /// Destination port.
    pub destination_port: u16,
    /// Sequence number.
    pub sequence: u32,
    /// Acknowledgment number.
    pub acknowledgment: u32,
    /// The flags byte (byte 13).
    pub flags: u8,
    /// Header length, options included (the data offset).
    pub header_len: usize,
    /// The options area, cut where `bytes` ends if it ends inside it (a
    /// capture's snap length); [`crate::TcpOptionIter`] walks it.
    pub options: &'a [u8],
}

impl<'a> TcpHeader<'a> {
    /// Reads the TCP header at the start of `bytes`: the fixed 20 bytes must
    /// be there and the data offset at least 5 words.
    pub fn parse(bytes: &'a [u8]) -> Result<TcpHeader<'a>, IpError> {
        need("TCP", bytes, field::TCP_MIN_LEN)?;
        let header_len = usize::from(bytes[field::TCP_DATA_OFFSET] >> 4) * 4;
        if header_len < field::TCP_MIN_LEN {
            return Err(IpError::BadHeaderLength {
                header: "TCP",
                length: header_len,
            });
        }
        let u16_at = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        Ok(TcpHeader {
            source_port: u16_at(field::TCP_SRC_PORT),
            destination_port: u16_at(field::TCP_DST_PORT),
            sequence: u32_at(field::TCP_SEQ),
            acknowledgment: u32_at(field::TCP_ACK),
            flags: bytes[field::TCP_FLAGS],
            header_len,
            options: &bytes[field::TCP_MIN_LEN..header_len.min(bytes.len())],
        })
    }

    /// Walks the options.
    pub fn options(&self) -> crate::TcpOptionIter<'a> {
        crate::TcpOptionIter::new(self.options)
    }
}

/// A UDP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpHeader {
    /// Source port.
    pub source_port: u16,
    /// Destination port.
    pub destination_port: u16,
    /// The length field (header and payload).
    pub length: u16,
}

impl UdpHeader {
    /// Reads the UDP header at the start of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<UdpHeader, IpError> {
        need("UDP", bytes, field::UDP_HEADER_LEN)?;
        let u16_at = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
        Ok(UdpHeader {
            source_port: u16_at(0),
            destination_port: u16_at(2),
            length: u16_at(field::UDP_LEN),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ipv4_tcp(options: &[u8], payload: &[u8]) -> Vec<u8> {
        let tcp_len = 20 + options.len();
        let total = 20 + tcp_len + payload.len();
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[6] = 0x40;
        p[8] = 64;
        p[9] = PROTOCOL_TCP;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&7u32.to_be_bytes());
        tcp[12] = ((tcp_len / 4) as u8) << 4;
        tcp[13] = 0x12;
        p.extend_from_slice(&tcp);
        p.extend_from_slice(options);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn ipv4_tcp_is_read() {
        let packet = ipv4_tcp(&[2, 4, 5, 0xb4], b"data");
        let ip = IpHeader::parse(&packet).unwrap();
        assert_eq!(ip.version, 4);
        assert_eq!(ip.protocol, PROTOCOL_TCP);
        assert_eq!(ip.transport_offset, 20);
        assert_eq!(ip.total_len, Some(packet.len()));
        assert!(ip.first_fragment);
        let tcp = TcpHeader::parse(&packet[20..]).unwrap();
        assert_eq!(
            (tcp.source_port, tcp.destination_port, tcp.sequence),
            (40000, 80, 7)
        );
        assert_eq!(tcp.flags, 0x12);
        assert_eq!(tcp.header_len, 24);
        let mss = tcp.options().next().unwrap().unwrap();
        assert_eq!((mss.kind, mss.bytes), (2, &[2, 4, 5, 0xb4][..]));
    }

    #[test]
    fn ipv6_extension_headers_are_walked() {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[6] = 0; // hop-by-hop
        p[8] = 0xfd;
        p[24] = 0xfd;
        // Hop-by-hop (8 bytes) then a first fragment header (8 bytes) then UDP.
        p.extend_from_slice(&[44, 0, 1, 4, 0, 0, 0, 0]);
        p.extend_from_slice(&[PROTOCOL_UDP, 0, 0, 1, 0, 0, 0, 9]);
        p.extend_from_slice(&[0x13, 0x88, 0, 53, 0, 8, 0, 0]);
        let len = (p.len() - 40) as u16;
        p[4..6].copy_from_slice(&len.to_be_bytes());
        let ip = IpHeader::parse(&p).unwrap();
        assert_eq!((ip.protocol, ip.transport_offset), (PROTOCOL_UDP, 56));
        assert!(ip.first_fragment);
        assert_eq!(ip.total_len, Some(p.len()));
        let udp = UdpHeader::parse(&p[56..]).unwrap();
        assert_eq!((udp.source_port, udp.destination_port), (5000, 53));
        // A later fragment: no transport header to read.
        p[50] = 0;
        p[51] = 0x09;
        assert!(!IpHeader::parse(&p).unwrap().first_fragment);
        // Cut inside the extension headers.
        assert!(matches!(
            IpHeader::parse(&p[..45]),
            Err(IpError::Truncated { .. })
        ));
    }

    #[test]
    fn malformed_headers_are_errors() {
        assert!(matches!(
            IpHeader::parse(&[]),
            Err(IpError::Truncated { .. })
        ));
        assert_eq!(IpHeader::parse(&[0x75; 30]), Err(IpError::BadVersion(7)));
        let mut short_ihl = ipv4_tcp(&[], b"");
        short_ihl[0] = 0x44;
        assert_eq!(
            IpHeader::parse(&short_ihl),
            Err(IpError::BadHeaderLength {
                header: "IPv4",
                length: 16
            })
        );
        let mut options = ipv4_tcp(&[], b"");
        options[0] = 0x4f; // 60-byte header, 40 bytes there
        assert!(matches!(
            IpHeader::parse(&options),
            Err(IpError::Truncated { .. })
        ));
        let mut bad_offset = ipv4_tcp(&[], b"");
        bad_offset[32] = 0x40;
        assert!(matches!(
            TcpHeader::parse(&bad_offset[20..]),
            Err(IpError::BadHeaderLength {
                header: "TCP",
                length: 16
            })
        ));
        // A total length of 0 (TSO in a capture) is reported as unknown.
        let mut tso = ipv4_tcp(&[], b"x");
        tso[2..4].fill(0);
        assert_eq!(IpHeader::parse(&tso).unwrap().total_len, None);
        // Options cut by a snap length: what is there is kept.
        let cut = ipv4_tcp(&[30, 4, 0, 0], b"");
        let tcp = TcpHeader::parse(&cut[20..42]).unwrap();
        assert_eq!(tcp.options, &[30, 4]);
    }

    proptest! {
        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            if let Ok(ip) = IpHeader::parse(&bytes) {
                prop_assert!(ip.transport_offset <= bytes.len());
                let rest = &bytes[ip.transport_offset..];
                let _ = TcpHeader::parse(rest).map(|t| t.options().count());
                let _ = UdpHeader::parse(rest);
            }
        }

        #[test]
        fn prop_etherparse_agrees(
            options in proptest::collection::vec(any::<u8>(), 0..10),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut options = options;
            options.resize(options.len().div_ceil(4) * 4, 1);
            let packet = ipv4_tcp(&options, &payload);
            let ip = IpHeader::parse(&packet).unwrap();
            let tcp = TcpHeader::parse(&packet[ip.transport_offset..]).unwrap();
            let theirs = etherparse::SlicedPacket::from_ip(&packet).unwrap();
            let Some(etherparse::TransportSlice::Tcp(t)) = theirs.transport else {
                return Err(TestCaseError::fail("etherparse saw no TCP"));
            };
            prop_assert_eq!(tcp.source_port, t.source_port());
            prop_assert_eq!(tcp.destination_port, t.destination_port());
            prop_assert_eq!(tcp.sequence, t.sequence_number());
            prop_assert_eq!(tcp.header_len, usize::from(t.data_offset()) * 4);
            prop_assert_eq!(tcp.options, t.options());
        }
    }
}
