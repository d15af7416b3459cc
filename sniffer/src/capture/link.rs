//! Link-layer decapsulation: from a captured frame to its IP packet.

use thiserror::Error;

/// Link-layer header types (pcap `LINKTYPE_*` values) this crate decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkType {
    /// 0: BSD loopback, 4-byte address family in host byte order.
    Null,
    /// 1: Ethernet II, with any number of 802.1Q / 802.1ad tags.
    Ethernet,
    /// 9: PPP (optionally with HDLC address/control bytes).
    Ppp,
    /// 101 (and the historic 12 and 14, and 228/229 for IPv4/IPv6 only): raw IP.
    RawIp,
    /// 108: OpenBSD loopback, 4-byte address family in network byte order.
    Loop,
    /// 113: Linux cooked capture v1.
    LinuxSll,
    /// 276: Linux cooked capture v2.
    LinuxSll2,
}

impl LinkType {
    /// The link type of a pcap/pcapng `LINKTYPE_*` value, if supported.
    pub fn from_linktype(value: u32) -> Option<LinkType> {
        Some(match value {
            0 => LinkType::Null,
            1 => LinkType::Ethernet,
            9 => LinkType::Ppp,
            12 | 14 | 101 | 228 | 229 => LinkType::RawIp,
            108 => LinkType::Loop,
            113 => LinkType::LinuxSll,
            276 => LinkType::LinuxSll2,
            _ => return None,
        })
    }
}

/// Why a frame's link-layer header could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum LinkError {
    /// The frame ends inside the link-layer header.
    #[error("link-layer header truncated ({0} bytes)")]
    Truncated(usize),
}

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: [u16; 3] = [0x8100, 0x88a8, 0x9100];

fn be16(bytes: &[u8], at: usize) -> Result<u16, LinkError> {
    match bytes.get(at..at + 2) {
        Some(word) => Ok(u16::from_be_bytes([word[0], word[1]])),
        None => Err(LinkError::Truncated(bytes.len())),
    }
}

fn ip_by_ethertype(ethertype: u16, payload: &[u8]) -> Option<&[u8]> {
    matches!(ethertype, ETHERTYPE_IPV4 | ETHERTYPE_IPV6).then_some(payload)
}

fn rest(frame: &[u8], at: usize) -> Result<&[u8], LinkError> {
    frame.get(at..).ok_or(LinkError::Truncated(frame.len()))
}

/// Returns the IP packet inside `frame`, or `Ok(None)` when the frame carries something else.
pub fn ip_payload(link: LinkType, frame: &[u8]) -> Result<Option<&[u8]>, LinkError> {
    match link {
        LinkType::Ethernet => {
            let mut at = 12;
            let mut ethertype = be16(frame, at)?;
            // Bounded walk over stacked VLAN tags.
            for _ in 0..4 {
                if !ETHERTYPE_VLAN.contains(&ethertype) {
                    break;
                }
                at += 4;
                ethertype = be16(frame, at)?;
            }
            Ok(ip_by_ethertype(ethertype, rest(frame, at + 2)?))
        }
        LinkType::LinuxSll => Ok(ip_by_ethertype(be16(frame, 14)?, rest(frame, 16)?)),
        LinkType::LinuxSll2 => Ok(ip_by_ethertype(be16(frame, 0)?, rest(frame, 20)?)),
        LinkType::RawIp => Ok(Some(frame)),
        LinkType::Null | LinkType::Loop => {
            let header = frame.get(..4).ok_or(LinkError::Truncated(frame.len()))?;
            let family_be = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
            let family_le = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            // AF_INET is 2 everywhere; AF_INET6 is 10, 24, 28 or 30 depending on the OS.
            let is_ip = |family: u32| matches!(family, 2 | 10 | 24 | 28 | 30);
            Ok((is_ip(family_be) || is_ip(family_le)).then_some(&frame[4..]))
        }
        LinkType::Ppp => {
            let mut at = 0;
            if frame.get(..2) == Some(&[0xff, 0x03]) {
                at = 2;
            }
            let first = *frame.get(at).ok_or(LinkError::Truncated(frame.len()))?;
            // Protocol-field compression: an odd first byte is a 1-byte protocol.
            let (protocol, header_len) = if first & 1 == 1 {
                (u16::from(first), 1)
            } else {
                (be16(frame, at)?, 2)
            };
            let payload = rest(frame, at + header_len)?;
            Ok(matches!(protocol, 0x0021 | 0x0057).then_some(payload))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ethernet_with_two_vlan_tags() {
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x88, 0xa8, 0, 1, 0x81, 0x00, 0, 2, 0x86, 0xdd, 0x60]);
        assert_eq!(
            ip_payload(LinkType::Ethernet, &frame),
            Ok(Some(&[0x60][..]))
        );
        frame.truncate(16);
        assert!(ip_payload(LinkType::Ethernet, &frame).is_err());
    }

    #[test]
    fn ppp_forms() {
        assert_eq!(
            ip_payload(LinkType::Ppp, &[0xff, 0x03, 0x00, 0x21, 0x45]),
            Ok(Some(&[0x45][..]))
        );
        assert_eq!(
            ip_payload(LinkType::Ppp, &[0x00, 0x57, 0x60]),
            Ok(Some(&[0x60][..]))
        );
        assert_eq!(
            ip_payload(LinkType::Ppp, &[0x21, 0x45]),
            Ok(Some(&[0x45][..]))
        );
        assert_eq!(ip_payload(LinkType::Ppp, &[0xc0, 0x21, 0x01]), Ok(None));
    }

    #[test]
    fn cooked_captures() {
        let mut sll = vec![0u8; 14];
        sll.extend_from_slice(&[0x08, 0x00, 0x45]);
        assert_eq!(ip_payload(LinkType::LinuxSll, &sll), Ok(Some(&[0x45][..])));
        let mut sll2 = vec![0x86, 0xdd];
        sll2.extend_from_slice(&[0; 18]);
        sll2.push(0x60);
        assert_eq!(
            ip_payload(LinkType::LinuxSll2, &sll2),
            Ok(Some(&[0x60][..]))
        );
        assert_eq!(LinkType::from_linktype(147), None);
        for raw in [12, 14, 101, 228, 229] {
            assert_eq!(LinkType::from_linktype(raw), Some(LinkType::RawIp));
        }
        assert_eq!(LinkType::from_linktype(113), Some(LinkType::LinuxSll));
        assert_eq!(LinkType::from_linktype(276), Some(LinkType::LinuxSll2));
        assert_eq!(LinkType::from_linktype(9), Some(LinkType::Ppp));
    }
}
