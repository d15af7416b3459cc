//! MSS clamping (§III-B, `PROTOCOL.md` §9): keep every encapsulated TCP segment
//! within the path MTU by lowering the MSS option of inner SYNs.

use crate::packet::{checksum, InnerPacket, PacketError, TCP_SYN};
use crate::wire::FIXED_LEN;

/// UDP header length.
pub const UDP_HEADER_LEN: usize = 8;

/// TCP header length without options.
pub const TCP_HEADER_LEN: usize = 20;

/// An IP version, for header sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpVersion {
    /// IPv4: 20-byte header (no options).
    V4,
    /// IPv6: 40-byte header (no extension headers).
    V6,
}

impl IpVersion {
    /// Header length without options or extension headers.
    pub const fn header_len(self) -> usize {
        match self {
            IpVersion::V4 => 20,
            IpVersion::V6 => 40,
        }
    }
}

/// Errors of MSS clamping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MssError {
    /// The path MTU leaves no room for a TCP payload.
    #[error("path MTU {mtu} leaves no room for TCP after {overhead} bytes of headers")]
    MtuTooSmall {
        /// The path MTU.
        mtu: u16,
        /// Outer IP + UDP + CM + inner IP + TCP headers.
        overhead: usize,
    },
    /// The inner packet could not be read.
    #[error("inner packet: {0}")]
    Packet(#[from] PacketError),
    /// The TCP options are malformed.
    #[error("malformed TCP options")]
    MalformedOptions,
}

/// Bytes the encapsulation adds in front of an inner packet of a data datagram:
/// outer IP header, UDP header and the 25-byte CM block (data packets carry no
/// address list).
pub const fn encapsulation_overhead(outer: IpVersion) -> usize {
    outer.header_len() + UDP_HEADER_LEN + FIXED_LEN
}

/// The largest MSS such that outer IP + UDP + CM + inner IP + TCP + payload
/// fits `path_mtu`.
pub fn clamp_for_path(path_mtu: u16, outer: IpVersion, inner: IpVersion) -> Result<u16, MssError> {
    let overhead = encapsulation_overhead(outer) + inner.header_len() + TCP_HEADER_LEN;
    usize::from(path_mtu)
        .checked_sub(overhead)
        .filter(|mss| *mss > 0)
        // Smaller than the u16 MTU.
        .map(|mss| mss as u16)
        .ok_or(MssError::MtuTooSmall {
            mtu: path_mtu,
            overhead,
        })
}

/// What [`clamp_syn`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MssRewrite {
    /// The MSS option was lowered and the checksum updated.
    Clamped {
        /// The MSS the sender announced.
        from: u16,
        /// The MSS now in the packet.
        to: u16,
    },
    /// The announced MSS was already small enough.
    Unchanged(u16),
    /// Not a TCP SYN (or not TCP, or a non-first fragment): nothing to do.
    NotSyn,
    /// A SYN without an MSS option: left alone (the default MSS, 536 for IPv4
    /// and 1220 for IPv6, is below any usable clamp).
    NoMssOption,
}

/// Lowers the MSS option of the TCP SYN in the IPv4/IPv6 packet `packet` to at
/// most `max_mss`, recomputing the TCP checksum.
pub fn clamp_syn(packet: &mut [u8], max_mss: u16) -> Result<MssRewrite, MssError> {
    let info = InnerPacket::parse(packet)?;
    let Some(tcp) = info.tcp else {
        return Ok(MssRewrite::NotSyn);
    };
    if tcp.flags & TCP_SYN == 0 {
        return Ok(MssRewrite::NotSyn);
    }
    let options = tcp.offset + TCP_HEADER_LEN..tcp.offset + tcp.header_len;
    // The workspace's one option walker (the sniffer's too).
    let found = mptcp_wire::TcpOptionIter::new(&packet[options.clone()])
        .find_map(|option| match option {
            Err(_) => Some(Err(MssError::MalformedOptions)),
            Ok(o) if o.kind == 2 && o.bytes.len() != 4 => Some(Err(MssError::MalformedOptions)),
            Ok(o) if o.kind == 2 => Some(Ok(options.start + o.offset)),
            Ok(_) => None,
        })
        .transpose()?;
    if let Some(at) = found {
        let from = u16::from_be_bytes([packet[at + 2], packet[at + 3]]);
        if from <= max_mss {
            return Ok(MssRewrite::Unchanged(from));
        }
        packet[at + 2..at + 4].copy_from_slice(&max_mss.to_be_bytes());
        checksum::update_tcp_checksum(packet)?;
        return Ok(MssRewrite::Clamped { from, to: max_mss });
    }
    Ok(MssRewrite::NoMssOption)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{build, TCP_ACK};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn mss_option(mss: u16) -> [u8; 4] {
        let [hi, lo] = mss.to_be_bytes();
        [2, 4, hi, lo]
    }

    fn v4_syn(options: &[u8]) -> Vec<u8> {
        build::ipv4_tcp(
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(192, 0, 2, 80),
            40000,
            80,
            12345,
            TCP_SYN,
            options,
            &[],
        )
    }

    fn read_mss(packet: &[u8]) -> Option<u16> {
        let info = InnerPacket::parse(packet).unwrap();
        let tcp = info.tcp.unwrap();
        let opts = &packet[tcp.offset + 20..tcp.offset + tcp.header_len];
        let mut i = 0;
        while i < opts.len() {
            match opts[i] {
                0 => return None,
                1 => i += 1,
                2 => return Some(u16::from_be_bytes([opts[i + 2], opts[i + 3]])),
                _ => i += usize::from(opts[i + 1]),
            }
        }
        None
    }

    #[test]
    fn clamp_accounts_for_every_header() {
        let v4 = clamp_for_path(1500, IpVersion::V4, IpVersion::V4).unwrap();
        assert_eq!(usize::from(v4) + 20 + 8 + FIXED_LEN + 20 + 20, 1500);
        let v6 = clamp_for_path(1500, IpVersion::V6, IpVersion::V6).unwrap();
        assert_eq!(usize::from(v6) + 40 + 8 + FIXED_LEN + 40 + 20, 1500);
        assert!(v6 < v4);
        assert_eq!(
            clamp_for_path(93, IpVersion::V4, IpVersion::V4),
            Err(MssError::MtuTooSmall {
                mtu: 93,
                overhead: 93
            })
        );
    }

    #[test]
    fn ipv4_syn_mss_is_lowered_with_valid_checksum() {
        let mut syn = v4_syn(&mss_option(1460));
        assert!(checksum::tcp_checksum_ok(&syn).unwrap());
        let max = clamp_for_path(1500, IpVersion::V4, IpVersion::V4).unwrap();
        assert_eq!(
            clamp_syn(&mut syn, max),
            Ok(MssRewrite::Clamped {
                from: 1460,
                to: max
            })
        );
        assert_eq!(read_mss(&syn), Some(max));
        assert!(checksum::tcp_checksum_ok(&syn).unwrap());
        assert_eq!(clamp_syn(&mut syn, max), Ok(MssRewrite::Unchanged(max)));
    }

    #[test]
    fn odd_aligned_option_and_ipv6_are_handled() {
        // NOP first puts the MSS value at an odd offset.
        let mut options = vec![1];
        options.extend_from_slice(&mss_option(1440));
        options.extend_from_slice(&[1, 1, 1]);
        let mut syn = v4_syn(&options);
        assert!(matches!(
            clamp_syn(&mut syn, 1000),
            Ok(MssRewrite::Clamped { .. })
        ));
        assert_eq!(read_mss(&syn), Some(1000));
        assert!(checksum::tcp_checksum_ok(&syn).unwrap());

        let mut v6 = build::ipv6_tcp(
            "2001:db8::2".parse().unwrap(),
            "2001:db8::80".parse().unwrap(),
            1,
            443,
            9,
            TCP_SYN | TCP_ACK,
            &mss_option(1440),
            &[],
        );
        assert!(checksum::tcp_checksum_ok(&v6).unwrap());
        let max = clamp_for_path(1500, IpVersion::V6, IpVersion::V6).unwrap();
        assert_eq!(
            clamp_syn(&mut v6, max),
            Ok(MssRewrite::Clamped {
                from: 1440,
                to: max
            })
        );
        assert!(checksum::tcp_checksum_ok(&v6).unwrap());
    }

    #[test]
    fn non_syn_and_optionless_syn_are_left_alone() {
        let mut ack = build::ipv4_tcp(
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::LOCALHOST,
            1,
            2,
            3,
            TCP_ACK,
            &mss_option(1460),
            &[],
        );
        let before = ack.clone();
        assert_eq!(clamp_syn(&mut ack, 1000), Ok(MssRewrite::NotSyn));
        assert_eq!(ack, before);
        let mut bare = v4_syn(&[]);
        assert_eq!(clamp_syn(&mut bare, 1000), Ok(MssRewrite::NoMssOption));
        let mut udp = build::ipv4_udp(Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 1, 2, b"x");
        assert_eq!(clamp_syn(&mut udp, 1000), Ok(MssRewrite::NotSyn));
    }

    #[test]
    fn malformed_options_are_reported() {
        // Option kind 8 claims 12 bytes but only 4 remain.
        let mut syn = v4_syn(&[8, 12, 0, 0]);
        assert_eq!(clamp_syn(&mut syn, 1000), Err(MssError::MalformedOptions));
        let mut zero_len = v4_syn(&[8, 0, 0, 0]);
        assert_eq!(
            clamp_syn(&mut zero_len, 1000),
            Err(MssError::MalformedOptions)
        );
    }

    proptest! {
        #[test]
        fn prop_clamp_keeps_checksum_valid_and_mss_bounded(
            announced in 1u16..=u16::MAX,
            max in 1u16..=u16::MAX,
            nops in 0usize..4,
            payload in proptest::collection::vec(any::<u8>(), 0..32),
        ) {
            let mut options = vec![1u8; nops];
            options.extend_from_slice(&mss_option(announced));
            while options.len() % 4 != 0 {
                options.push(0);
            }
            let mut syn = build::ipv4_tcp(
                Ipv4Addr::new(10, 1, 2, 3),
                Ipv4Addr::new(192, 0, 2, 9),
                5555,
                80,
                1,
                TCP_SYN,
                &options,
                &payload,
            );
            clamp_syn(&mut syn, max).unwrap();
            prop_assert!(checksum::tcp_checksum_ok(&syn).unwrap());
            prop_assert_eq!(read_mss(&syn), Some(announced.min(max)));
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut bytes = bytes;
            let _ = clamp_syn(&mut bytes, 1000);
        }
    }
}
