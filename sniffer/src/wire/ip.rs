//! Minimal IPv4, IPv6 and TCP header views: enough to find a TCP segment's 4-tuple, flags
//! and options area in a captured packet.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

/// IP protocol number of TCP.
pub const PROTOCOL_TCP: u8 = 6;

/// Why a captured IP packet could not be decoded down to its TCP header.
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
    /// IPv4: flags and fragment offset.
    pub const IPV4_FRAGMENT: usize = 6;
    /// IPv4: protocol.
    pub const IPV4_PROTOCOL: usize = 9;
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
    /// TCP: fixed header length.
    pub const TCP_MIN_LEN: usize = 20;
}

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
    /// Decodes an IPv4 or IPv6 packet (version from the first nibble). `Ok(None)` when the
    /// packet is not TCP or is a non-first fragment.
    pub fn parse_ip(bytes: &'a [u8]) -> Result<Option<Segment<'a>>, IpError> {
        need("IP", bytes, 1)?;
        match bytes[0] >> 4 {
            4 => Self::parse_ipv4(bytes),
            6 => Self::parse_ipv6(bytes),
            version => Err(IpError::BadVersion(version)),
        }
    }

    /// Decodes an IPv4 packet.
    pub fn parse_ipv4(bytes: &'a [u8]) -> Result<Option<Segment<'a>>, IpError> {
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
        if bytes[field::IPV4_PROTOCOL] != PROTOCOL_TCP || fragment & 0x1fff != 0 {
            return Ok(None);
        }
        let total_len = usize::from(u16::from_be_bytes([
            bytes[field::IPV4_TOTAL_LEN],
            bytes[field::IPV4_TOTAL_LEN + 1],
        ]));
        // Segmentation offload can leave the total length at 0; use what was captured.
        let total_len = if total_len == 0 {
            bytes.len()
        } else {
            total_len
        };
        let mut src = [0; 4];
        src.copy_from_slice(&bytes[field::IPV4_SRC..field::IPV4_SRC + 4]);
        let mut dst = [0; 4];
        dst.copy_from_slice(&bytes[field::IPV4_DST..field::IPV4_DST + 4]);
        Self::parse_tcp(
            IpAddr::V4(Ipv4Addr::from(src)),
            IpAddr::V4(Ipv4Addr::from(dst)),
            &bytes[header_len..],
            total_len.saturating_sub(header_len),
        )
        .map(Some)
    }

    /// Decodes an IPv6 packet, skipping hop-by-hop, routing, destination-options,
    /// authentication and first-fragment extension headers.
    pub fn parse_ipv6(bytes: &'a [u8]) -> Result<Option<Segment<'a>>, IpError> {
        need("IPv6", bytes, field::IPV6_LEN)?;
        let payload_len = usize::from(u16::from_be_bytes([
            bytes[field::IPV6_PAYLOAD_LEN],
            bytes[field::IPV6_PAYLOAD_LEN + 1],
        ]));
        let payload_len = if payload_len == 0 {
            bytes.len() - field::IPV6_LEN
        } else {
            payload_len
        };
        let mut src = [0; 16];
        src.copy_from_slice(&bytes[field::IPV6_SRC..field::IPV6_SRC + 16]);
        let mut dst = [0; 16];
        dst.copy_from_slice(&bytes[field::IPV6_DST..field::IPV6_DST + 16]);
        let mut next_header = bytes[field::IPV6_NEXT_HEADER];
        let mut offset = field::IPV6_LEN;
        // Bounded walk over extension headers.
        for _ in 0..8 {
            match next_header {
                PROTOCOL_TCP => {
                    need("IPv6 extension", bytes, offset)?;
                    return Self::parse_tcp(
                        IpAddr::V6(Ipv6Addr::from(src)),
                        IpAddr::V6(Ipv6Addr::from(dst)),
                        &bytes[offset..],
                        (payload_len + field::IPV6_LEN).saturating_sub(offset),
                    )
                    .map(Some);
                }
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
                    if fragment_offset != 0 {
                        return Ok(None);
                    }
                    next_header = bytes[offset];
                    offset += 8;
                }
                _ => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Decodes a TCP header whose segment is `segment_len` bytes long according to IP.
    pub fn parse_tcp(
        src: IpAddr,
        dst: IpAddr,
        bytes: &'a [u8],
        segment_len: usize,
    ) -> Result<Segment<'a>, IpError> {
        need("TCP", bytes, field::TCP_MIN_LEN)?;
        let header_len = usize::from(bytes[field::TCP_DATA_OFFSET] >> 4) * 4;
        if header_len < field::TCP_MIN_LEN {
            return Err(IpError::BadHeaderLength {
                header: "TCP",
                length: header_len,
            });
        }
        // A snap length may cut the options area: keep what was captured (the options walker
        // reports the cut option), as Wireshark decodes the options before the cut.
        let options_end = header_len.min(bytes.len());
        let word = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        Ok(Segment {
            src,
            dst,
            src_port: u16::from_be_bytes([
                bytes[field::TCP_SRC_PORT],
                bytes[field::TCP_SRC_PORT + 1],
            ]),
            dst_port: u16::from_be_bytes([
                bytes[field::TCP_DST_PORT],
                bytes[field::TCP_DST_PORT + 1],
            ]),
            seq: word(field::TCP_SEQ),
            ack: word(field::TCP_ACK),
            flags: TcpFlags(bytes[field::TCP_FLAGS]),
            options: &bytes[field::TCP_MIN_LEN..options_end],
            payload_len: segment_len.saturating_sub(header_len),
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
