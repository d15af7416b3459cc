//! The Internet checksum (RFC 1071), summed 32 bits at a time.
//!
//! A one's-complement sum of 32-bit words folds to the same 16-bit value as
//! the sum of the 16-bit words (RFC 1071 §2(C)), with half the additions.
//! Sums of several pieces add up as long as every piece but the last has an
//! even length.

use std::net::IpAddr;

/// `acc` plus the one's-complement sum of `data` (not folded, not inverted).
/// An odd last byte counts as the high byte of a 16-bit word.
pub fn sum(acc: u64, data: &[u8]) -> u64 {
    let mut acc = acc;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut tail = [0u8; 4];
        tail[..rest.len()].copy_from_slice(rest);
        acc += u64::from(u32::from_be_bytes(tail));
    }
    acc
}

/// Folds a sum to 16 bits (not inverted): what goes in the checksum field
/// of a packet whose checksum the receiver or the NIC completes.
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Folds and inverts a sum: the checksum. Summing a packet whose checksum
/// field holds its checksum gives 0 here.
pub fn finish(acc: u64) -> u16 {
    !fold(acc)
}

/// The checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    finish(sum(0, data))
}

/// The sum of the TCP/UDP pseudo-header of a segment of `len` bytes of
/// `protocol` from `source` to `destination` (RFC 793, RFC 8200 §8.1); an
/// IPv4 address with an IPv6 one counts as IPv4-mapped.
pub fn pseudo_header(source: IpAddr, destination: IpAddr, protocol: u8, len: usize) -> u64 {
    match (source, destination) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            sum(sum(0, &s.octets()), &d.octets()) + u64::from(protocol) + len as u64
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            sum(sum(0, &v6(s)), &v6(d))
                + (len as u64 >> 32)
                + (len as u64 & 0xffff_ffff)
                + u64::from(protocol)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The reference: 16-bit words, as RFC 1071 writes it.
    fn reference(data: &[u8]) -> u16 {
        let mut acc: u32 = 0;
        for pair in data.chunks(2) {
            acc += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
            acc = (acc & 0xffff) + (acc >> 16);
        }
        !(acc as u16)
    }

    #[test]
    fn rfc_1071_example() {
        // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn an_ipv4_header_checks_out() {
        // A real header (Wikipedia's example) with its checksum b861.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&header), 0);
        let mut zeroed = header;
        zeroed[10..12].fill(0);
        assert_eq!(checksum(&zeroed), 0xb861);
    }

    proptest! {
        #[test]
        fn prop_matches_16_bit_words(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(checksum(&data), reference(&data));
        }

        #[test]
        fn prop_even_pieces_add_up(a in proptest::collection::vec(any::<u16>(), 0..100), b in proptest::collection::vec(any::<u8>(), 0..100)) {
            let a: Vec<u8> = a.iter().flat_map(|w| w.to_be_bytes()).collect();
            let whole: Vec<u8> = a.iter().chain(&b).copied().collect();
            prop_assert_eq!(finish(sum(sum(0, &a), &b)), checksum(&whole));
        }
    }
}
