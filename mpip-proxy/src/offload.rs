//! TUN offloads (`IFF_VNET_HDR`), sans-IO: the `virtio_net_hdr` in front of
//! every packet, checksum completion and TCP segmentation (TSO done by us).
//!
//! With `TUN_F_CSUM | TUN_F_TSO4` the kernel may hand the reader a packet
//! whose transport checksum is left to us (`VIRTIO_NET_HDR_F_NEEDS_CSUM`) or
//! an IPv4 TCP packet of up to 64 KiB to be cut into `gso_size`-byte segments
//! (`VIRTIO_NET_HDR_GSO_TCPV4`). [`split`] turns one such read into ordinary
//! packets of at most the MTU, each in its own buffer with room in front for
//! the CM block, exactly what [`crate::node::Node::handle_tun_packet`] takes.

use crate::packet::checksum::{finish, sum};

/// Length of `struct virtio_net_hdr` (set with `TUNSETVNETHDRSZ`).
pub const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at `csum_start + csum_offset`
/// holds the pseudo-header sum; the rest is for the reader to complete.
pub const F_NEEDS_CSUM: u8 = 1;

/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;

/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;

/// `VIRTIO_NET_HDR_GSO_ECN`: a bit on top of the GSO type (the segments
/// carry ECN; CWR belongs on the first only, which [`split`] always does).
pub const GSO_ECN: u8 = 0x80;

/// Largest read the device returns with TSO on: the header and a 64 KiB
/// IPv4 packet.
pub const MAX_READ: usize = VNET_HDR_LEN + 65_535;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why a read from the device was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// Shorter than the virtio header, or no packet after it.
    #[error("read of {0} bytes is too short for a virtio_net_hdr and a packet")]
    Short(usize),
    /// A GSO type that was not offered (only TCPv4 is).
    #[error("unsupported GSO type {0:#x}")]
    UnsupportedGso(u8),
    /// `csum_start`/`csum_offset` point outside the packet or, for TSO, away
    /// from the TCP checksum.
    #[error("checksum offsets {start}+{offset} do not fit the {len}-byte packet")]
    BadChecksumOffsets {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// Packet length.
        len: usize,
    },
    /// A TSO packet that is not a well-formed, unfragmented IPv4 TCP packet.
    #[error("TSO packet is not a well-formed IPv4 TCP packet")]
    NotIpv4Tcp,
    /// `gso_size` 0, or segments that would not fit the MTU.
    #[error("gso_size {gso_size} with {headers} header bytes does not fit the MTU {mtu}")]
    BadGsoSize {
        /// `gso_size`.
        gso_size: u16,
        /// IPv4 + TCP header bytes.
        headers: usize,
        /// The MTU.
        mtu: usize,
    },
    /// A packet without GSO larger than the MTU.
    #[error("packet of {len} bytes exceeds the MTU {mtu}")]
    TooLarge {
        /// Packet length.
        len: usize,
        /// The MTU.
        mtu: usize,
    },
}

/// `struct virtio_net_hdr` (little-endian fields, as on x86 in the legacy
/// layout the TUN device uses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHeader {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Header bytes (a hint from the kernel; not trusted here).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHeader {
    /// Parses the first [`VNET_HDR_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Option<VnetHeader> {
        let b = bytes.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// Writes the header into the first [`VNET_HDR_LEN`] bytes of `out`
    /// (which must be at least that long).
    pub fn emit(&self, out: &mut [u8]) {
        let Some(out) = out.get_mut(..VNET_HDR_LEN) else {
            return;
        };
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// Writes a zeroed virtio header (no offload) just before `start` in
/// `bytes` and returns where the write to the device starts, or `None` if
/// there are fewer than [`VNET_HDR_LEN`] bytes before `start`.
pub fn plain_header_before(bytes: &mut [u8], start: usize) -> Option<usize> {
    let from = start.checked_sub(VNET_HDR_LEN)?;
    bytes.get_mut(from..start)?.fill(0);
    Some(from)
}

/// The checksum of `data` with `initial` (a pseudo-header sum) added,
/// inverted: the workspace's one implementation ([`mptcp_wire::checksum`]).
fn checksum(initial: u64, data: &[u8]) -> u16 {
    finish(sum(initial, data))
}

/// Splits one read from an `IFF_VNET_HDR` TUN device (virtio header, then
/// the packet) into packets of at most `mtu` bytes, appended to `out`, each
/// behind `headroom` zero bytes. On error nothing is appended.
///
/// - No offload: the packet as it is.
/// - `F_NEEDS_CSUM` alone: the checksum at `csum_start + csum_offset` is
///   completed (whatever the transport).
/// - `GSO_TCPV4`: `gso_size`-byte TCP segments, each with the IPv4 and TCP
///   headers copied, IPv4 total length, ID (+1 per segment) and header
///   checksum set, sequence number advanced, FIN and PSH on the last segment
///   only, CWR on the first only, and a full TCP checksum.
pub fn split(
    read: &[u8],
    mtu: usize,
    headroom: usize,
    out: &mut Vec<Vec<u8>>,
) -> Result<(), OffloadError> {
    let (Some(header), Some(packet)) = (VnetHeader::parse(read), read.get(VNET_HDR_LEN..)) else {
        return Err(OffloadError::Short(read.len()));
    };
    if packet.is_empty() {
        return Err(OffloadError::Short(read.len()));
    }
    match header.gso_type & !GSO_ECN {
        GSO_NONE if header.gso_type == GSO_NONE => {
            if packet.len() > mtu {
                return Err(OffloadError::TooLarge {
                    len: packet.len(),
                    mtu,
                });
            }
            let at = if header.flags & F_NEEDS_CSUM != 0 {
                Some(checksum_field(&header, packet.len())?)
            } else {
                None
            };
            let mut buffer = vec![0u8; headroom + packet.len()];
            buffer[headroom..].copy_from_slice(packet);
            if let Some((start, at)) = at {
                // The field holds the pseudo-header sum: sum over it too.
                let ip = &mut buffer[headroom..];
                let value = checksum(0, &ip[start..]);
                // 0 is "no checksum" for UDP; 0xffff is the same for TCP.
                let value = if value == 0 { 0xffff } else { value };
                ip[at..at + 2].copy_from_slice(&value.to_be_bytes());
            }
            out.push(buffer);
            Ok(())
        }
        GSO_TCPV4 => segment_tcpv4(&header, packet, mtu, headroom, out),
        _ => Err(OffloadError::UnsupportedGso(header.gso_type)),
    }
}

/// Checks `csum_start`/`csum_offset` against a packet of `len` bytes and
/// returns (start, checksum position).
fn checksum_field(header: &VnetHeader, len: usize) -> Result<(usize, usize), OffloadError> {
    let start = usize::from(header.csum_start);
    let at = start + usize::from(header.csum_offset);
    if start >= len || at + 2 > len {
        return Err(OffloadError::BadChecksumOffsets {
            start: header.csum_start,
            offset: header.csum_offset,
            len,
        });
    }
    Ok((start, at))
}

fn segment_tcpv4(
    header: &VnetHeader,
    packet: &[u8],
    mtu: usize,
    headroom: usize,
    out: &mut Vec<Vec<u8>>,
) -> Result<(), OffloadError> {
    // Headers from the packet itself (the kernel's hdr_len is only a hint).
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 6 {
        return Err(OffloadError::NotIpv4Tcp);
    }
    let ip_len = usize::from(packet[0] & 0x0f) * 4;
    // More fragments or a fragment offset: not a whole TCP packet.
    let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
    if ip_len < 20 || fragment || packet.len() < ip_len + 20 {
        return Err(OffloadError::NotIpv4Tcp);
    }
    let tcp_len = usize::from(packet[ip_len + 12] >> 4) * 4;
    let headers = ip_len + tcp_len;
    if tcp_len < 20 || packet.len() < headers {
        return Err(OffloadError::NotIpv4Tcp);
    }
    if header.flags & F_NEEDS_CSUM != 0
        && (usize::from(header.csum_start) != ip_len || header.csum_offset != 16)
    {
        return Err(OffloadError::BadChecksumOffsets {
            start: header.csum_start,
            offset: header.csum_offset,
            len: packet.len(),
        });
    }
    let gso_size = usize::from(header.gso_size);
    if gso_size == 0 || headers + gso_size > mtu {
        return Err(OffloadError::BadGsoSize {
            gso_size: header.gso_size,
            headers,
            mtu,
        });
    }
    let payload = &packet[headers..];
    let first_id = u16::from_be_bytes([packet[4], packet[5]]);
    let first_seq = u32::from_be_bytes([
        packet[ip_len + 4],
        packet[ip_len + 5],
        packet[ip_len + 6],
        packet[ip_len + 7],
    ]);
    let flags = packet[ip_len + 13];
    // Pseudo-header without the length, which varies per segment.
    let pseudo = sum(0, &packet[12..20]) + 6;
    let count = payload.len().div_ceil(gso_size).max(1);
    out.reserve(count);
    for i in 0..count {
        let chunk = payload
            .get(i * gso_size..)
            .map_or(&[][..], |rest| &rest[..rest.len().min(gso_size)]);
        let total = headers + chunk.len();
        let mut buffer = vec![0u8; headroom + total];
        let seg = &mut buffer[headroom..];
        seg[..headers].copy_from_slice(&packet[..headers]);
        seg[headers..].copy_from_slice(chunk);
        // IPv4: total length, ID, header checksum. total <= 65535: the
        // segment is no longer than the packet, itself from a u16-sized read.
        seg[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        seg[4..6].copy_from_slice(&first_id.wrapping_add(i as u16).to_be_bytes());
        seg[10..12].fill(0);
        let ip_checksum = checksum(0, &seg[..ip_len]);
        seg[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
        // TCP: sequence, flags, checksum.
        let tcp = &mut seg[ip_len..];
        let seq = first_seq.wrapping_add((i * gso_size) as u32);
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        let mut seg_flags = flags;
        if i + 1 < count {
            seg_flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            seg_flags &= !TCP_CWR;
        }
        tcp[13] = seg_flags;
        tcp[16..18].fill(0);
        let tcp_checksum = checksum(pseudo + tcp.len() as u64, tcp);
        tcp[16..18].copy_from_slice(&tcp_checksum.to_be_bytes());
        out.push(buffer);
    }
    Ok(())
}

/// Largest payload of one coalesced write: its IPv4 packet must fit 64 KiB.
const MAX_COALESCED: usize = 65_535 - 60 - 60;

/// The IPv4 TCP fields coalescing looks at; `None` for anything else
/// (IP options, fragments, a length that is not the buffer's, no payload,
/// flags other than ACK and PSH, a bad IPv4 or TCP checksum).
struct TcpSegment<'a> {
    packet: &'a [u8],
    headers: usize,
    seq: u32,
    psh: bool,
}

impl<'a> TcpSegment<'a> {
    fn parse(packet: &'a [u8]) -> Option<TcpSegment<'a>> {
        if packet.len() < 40 || packet[0] != 0x45 || packet[9] != 6 {
            return None;
        }
        let fragment = u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0;
        if fragment || usize::from(u16::from_be_bytes([packet[2], packet[3]])) != packet.len() {
            return None;
        }
        let tcp_len = usize::from(packet[32] >> 4) * 4;
        let headers = 20 + tcp_len;
        let flags = packet[33];
        // ACK, maybe PSH; nothing else.
        if tcp_len < 20 || packet.len() <= headers || flags & !TCP_PSH != 0x10 {
            return None;
        }
        if checksum(0, &packet[..20]) != 0 {
            return None;
        }
        let pseudo = sum(0, &packet[12..20]) + 6 + (packet.len() - 20) as u64;
        if checksum(pseudo, &packet[20..]) != 0 {
            return None;
        }
        Some(TcpSegment {
            packet,
            headers,
            seq: u32::from_be_bytes([packet[24], packet[25], packet[26], packet[27]]),
            psh: flags & TCP_PSH != 0,
        })
    }

    fn payload_len(&self) -> usize {
        self.packet.len() - self.headers
    }

    /// Whether `next` continues this segment's flow: the same IPv4 header
    /// but for length, ID and checksum; the same TCP header but for sequence
    /// number, checksum and PSH; and the next sequence number.
    fn followed_by(&self, next: &TcpSegment<'_>) -> bool {
        let (a, b) = (self.packet, next.packet);
        self.headers == next.headers
            && a[..2] == b[..2]
            && a[6..10] == b[6..10]
            && a[12..24] == b[12..24]
            && a[28..33] == b[28..33]
            && a[34..36] == b[34..36]
            && a[38..self.headers] == b[38..next.headers]
            && next.seq == self.seq.wrapping_add(self.payload_len() as u32)
    }
}

/// How many of `packets`, from the first, can go to the device as one TSO
/// write ([`coalesce`]): consecutive in-order IPv4 TCP segments of one flow
/// with equal headers (but for the fields that differ per segment), all
/// with valid checksums, all of the first one's payload length but the last,
/// which may be shorter or carry PSH. 1 for a packet that cannot be merged,
/// 0 for no packets.
pub fn coalescible(packets: &[&[u8]]) -> usize {
    let Some(first) = packets.first().and_then(|p| TcpSegment::parse(p)) else {
        return packets.len().min(1);
    };
    let size = first.payload_len();
    let mut total = size;
    let mut last = first;
    let mut count = 1;
    for packet in &packets[1..] {
        if last.psh || last.payload_len() != size {
            break;
        }
        let Some(next) = TcpSegment::parse(packet) else {
            break;
        };
        if next.payload_len() > size
            || total + next.payload_len() > MAX_COALESCED
            || !last.followed_by(&next)
        {
            break;
        }
        total += next.payload_len();
        count += 1;
        last = next;
    }
    count
}

/// Merges the run of [`coalescible`] packets at the front of `packets` and
/// returns its length. For a run of 2 or more, `out` then holds one TSO
/// write for the device: a virtio header (`GSO_TCPV4`, `NEEDS_CSUM`,
/// `gso_size` the first segment's payload) and an IPv4 TCP packet with the
/// first segment's headers, every segment's payload, PSH if the last has it,
/// and the pseudo-header sum in the TCP checksum (the kernel completes it).
/// Otherwise `out` is left empty and the first packet (if any) goes as it is.
pub fn coalesce(packets: &[&[u8]], out: &mut Vec<u8>) -> usize {
    out.clear();
    let run = coalescible(packets);
    if run < 2 {
        return run;
    }
    let packets = &packets[..run];
    let first = packets[0];
    let headers = 20 + usize::from(first[32] >> 4) * 4;
    let payload: usize = packets.iter().map(|p| p.len() - headers).sum();
    let total = headers + payload;
    let header = VnetHeader {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: headers as u16,
        gso_size: (first.len() - headers) as u16,
        csum_start: 20,
        csum_offset: 16,
    };
    out.resize(VNET_HDR_LEN, 0);
    header.emit(out);
    out.extend_from_slice(&first[..headers]);
    for packet in packets {
        out.extend_from_slice(&packet[headers..]);
    }
    let ip = &mut out[VNET_HDR_LEN..];
    // total <= 65535: checked by coalescible.
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[10..12].fill(0);
    let ip_checksum = checksum(0, &ip[..20]);
    ip[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
    if packets[packets.len() - 1][33] & TCP_PSH != 0 {
        ip[33] |= TCP_PSH;
    }
    // The pseudo-header sum, folded, not inverted.
    let pseudo = !checksum(sum(0, &ip[12..20]) + 6 + (total - 20) as u64, &[]);
    ip[36..38].copy_from_slice(&pseudo.to_be_bytes());
    run
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build;
    use crate::packet::checksum::{sum, tcp_checksum_ok};
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 2);

    fn ip_checksum_ok(p: &[u8]) -> bool {
        let len = usize::from(p[0] & 0x0f) * 4;
        finish(sum(0, &p[..len])) == 0
    }

    /// A TSO read as the kernel makes it: pseudo-header sum in the TCP
    /// checksum field, the IPv4 header checksum valid for the whole packet.
    fn tso_read(packet: &[u8], gso_size: u16, gso_type: u8) -> Vec<u8> {
        let mut packet = packet.to_vec();
        let ip_len = usize::from(packet[0] & 0x0f) * 4;
        let tcp_len = packet.len() - ip_len;
        let pseudo = sum(sum(0, &packet[12..20]), &[0, 6]) + tcp_len as u64;
        let mut folded = pseudo;
        while folded > 0xffff {
            folded = (folded & 0xffff) + (folded >> 16);
        }
        packet[ip_len + 16..ip_len + 18].copy_from_slice(&(folded as u16).to_be_bytes());
        let header = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: (ip_len + usize::from(packet[ip_len + 12] >> 4) * 4) as u16,
            gso_size,
            csum_start: ip_len as u16,
            csum_offset: 16,
        };
        let mut read = vec![0u8; VNET_HDR_LEN];
        header.emit(&mut read);
        read.extend_from_slice(&packet);
        read
    }

    fn plain_read(packet: &[u8]) -> Vec<u8> {
        let mut read = vec![0u8; VNET_HDR_LEN];
        read.extend_from_slice(packet);
        read
    }

    #[test]
    fn header_round_trip() {
        let header = VnetHeader {
            flags: 1,
            gso_type: 1,
            hdr_len: 52,
            gso_size: 1395,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut bytes = [0u8; VNET_HDR_LEN];
        header.emit(&mut bytes);
        assert_eq!(bytes, [1, 1, 52, 0, 0x73, 0x05, 20, 0, 16, 0]);
        assert_eq!(VnetHeader::parse(&bytes), Some(header));
        assert_eq!(VnetHeader::parse(&bytes[..9]), None);
    }

    #[test]
    fn plain_header_in_place() {
        let mut bytes = vec![0xaau8; 30];
        assert_eq!(plain_header_before(&mut bytes, 25), Some(15));
        assert!(bytes[15..25].iter().all(|b| *b == 0));
        assert_eq!(bytes[14], 0xaa);
        assert_eq!(bytes[25], 0xaa);
        assert_eq!(plain_header_before(&mut bytes, 9), None);
        assert_eq!(plain_header_before(&mut bytes, 31), None);
    }

    #[test]
    fn plain_packet_passes_unchanged() {
        let p = build::ipv4_udp(SRC, DST, 1, 2, b"hello");
        let mut out = Vec::new();
        split(&plain_read(&p), 1447, 25, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0][..25], &[0u8; 25]);
        assert_eq!(&out[0][25..], &p[..]);
    }

    #[test]
    fn udp_checksum_is_completed() {
        let mut p = build::ipv4_udp(SRC, DST, 1000, 2000, b"some payload!");
        // The kernel leaves the pseudo-header sum in the field.
        let udp_len = p.len() - 20;
        let partial = sum(sum(0, &p[12..20]), &[0, 17]) + udp_len as u64;
        let partial = !finish(partial);
        p[26..28].copy_from_slice(&partial.to_be_bytes());
        let header = VnetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 6,
            ..VnetHeader::default()
        };
        let mut read = vec![0u8; VNET_HDR_LEN];
        header.emit(&mut read);
        read.extend_from_slice(&p);
        let mut out = Vec::new();
        split(&read, 1447, 0, &mut out).unwrap();
        let q = &out[0];
        let mut acc = sum(sum(0, &q[12..20]), &[0, 17]) + udp_len as u64;
        acc = sum(acc, &q[20..]);
        assert_eq!(finish(acc), 0);
        assert_ne!(&q[26..28], &[0, 0]);
    }

    #[test]
    fn tcp_checksum_is_completed_without_gso() {
        let p = build::ipv4_tcp(SRC, DST, 1, 2, 7, 0x18, &[], b"abc");
        let read = tso_read(&p, 0, GSO_NONE);
        assert!(!tcp_checksum_ok(&read[VNET_HDR_LEN..]).unwrap());
        let mut out = Vec::new();
        split(&read, 1447, 0, &mut out).unwrap();
        assert_eq!(out, vec![p]);
    }

    #[test]
    fn tso_splits_into_segments() {
        let payload: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
        // PSH|ACK|FIN|CWR, timestamps option.
        let options = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        let mut p = build::ipv4_tcp(SRC, DST, 5000, 80, u32::MAX - 100, 0x99, &options, &payload);
        p[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
        let read = tso_read(&p, 1395, GSO_TCPV4 | GSO_ECN);
        let mut out = Vec::new();
        split(&read, 1447, 25, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let mut data = Vec::new();
        for (i, buffer) in out.iter().enumerate() {
            let s = &buffer[25..];
            assert!(s.len() <= 1447);
            assert!(ip_checksum_ok(s));
            assert!(tcp_checksum_ok(s).unwrap());
            assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
            let id = u16::from_be_bytes([s[4], s[5]]);
            assert_eq!(id, 0xfffeu16.wrapping_add(i as u16));
            let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
            assert_eq!(seq, (u32::MAX - 100).wrapping_add(1395 * i as u32));
            let flags = s[33];
            assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR on segment {i}");
            assert_eq!(flags & (TCP_FIN | TCP_PSH) != 0, i == 2, "FIN/PSH on {i}");
            assert_eq!(flags & 0x10, 0x10, "ACK everywhere");
            assert_eq!(&s[40..52], &options);
            data.extend_from_slice(&s[52..]);
        }
        assert_eq!(data, payload);
        assert_eq!(out[2].len() - 25, 52 + 4000 - 2 * 1395);
    }

    #[test]
    fn bad_headers_are_refused() {
        let p = build::ipv4_tcp(SRC, DST, 1, 2, 7, 0x10, &[], &[9u8; 3000]);
        let mut out = Vec::new();
        let mut check = |read: &[u8], mtu: usize| {
            let result = split(read, mtu, 25, &mut out);
            assert!(out.is_empty());
            result.unwrap_err()
        };
        assert_eq!(check(&[], 1447), OffloadError::Short(0));
        assert_eq!(check(&[0u8; 10], 1447), OffloadError::Short(10));
        // Too large without GSO.
        assert!(matches!(
            check(&plain_read(&p), 1447),
            OffloadError::TooLarge { .. }
        ));
        // GSO types not offered.
        for gso_type in [3, 4, 5, 0x80, 0x84] {
            let read = tso_read(&p, 1000, gso_type);
            assert_eq!(check(&read, 1447), OffloadError::UnsupportedGso(gso_type));
        }
        // gso_size 0, or too big for the MTU.
        for size in [0, 1408] {
            let read = tso_read(&p, size, GSO_TCPV4);
            assert!(matches!(
                check(&read, 1447),
                OffloadError::BadGsoSize { .. }
            ));
        }
        // Checksum offsets away from the TCP checksum, or outside.
        let mut read = tso_read(&p, 1000, GSO_TCPV4);
        read[8] = 6;
        assert!(matches!(
            check(&read, 1447),
            OffloadError::BadChecksumOffsets { .. }
        ));
        let small = build::ipv4_udp(SRC, DST, 1, 2, b"x");
        let mut read = tso_read(&build::ipv4_tcp(SRC, DST, 1, 2, 7, 0, &[], b""), 0, 0);
        read.truncate(VNET_HDR_LEN);
        read.extend_from_slice(&small);
        read[6] = 28; // csum_start at the end
        assert!(matches!(
            check(&read, 1447),
            OffloadError::BadChecksumOffsets { .. }
        ));
        // Not TCP / not IPv4 / fragment / truncated TCP header.
        let read = {
            let mut r = tso_read(&p, 1000, GSO_TCPV4);
            r[VNET_HDR_LEN + 9] = 17;
            r
        };
        assert_eq!(check(&read, 1447), OffloadError::NotIpv4Tcp);
        let read = {
            let mut r = tso_read(&p, 1000, GSO_TCPV4);
            r[VNET_HDR_LEN] = 0x65;
            r
        };
        assert_eq!(check(&read, 1447), OffloadError::NotIpv4Tcp);
        let read = {
            let mut r = tso_read(&p, 1000, GSO_TCPV4);
            r[VNET_HDR_LEN + 6] = 0x20;
            r
        };
        assert_eq!(check(&read, 1447), OffloadError::NotIpv4Tcp);
        let read = tso_read(&p, 1000, GSO_TCPV4);
        assert_eq!(
            check(&read[..VNET_HDR_LEN + 30], 1447),
            OffloadError::NotIpv4Tcp
        );
    }

    /// Segments of one stream as the node hands them to the shell.
    fn stream(payload: &[u8], size: usize, options: &[u8], psh_last: bool) -> Vec<Vec<u8>> {
        let chunks: Vec<&[u8]> = payload.chunks(size).collect();
        chunks
            .iter()
            .enumerate()
            .map(|(i, chunk)| {
                let last = i + 1 == chunks.len();
                let flags = if last && psh_last { 0x18 } else { 0x10 };
                let seq = 1000u32.wrapping_add((i * size) as u32);
                let mut p = build::ipv4_tcp(DST, SRC, 80, 5000, seq, flags, options, chunk);
                p[4..6].copy_from_slice(&(7u16 + i as u16).to_be_bytes());
                p[10..12].fill(0);
                let c = finish(sum(0, &p[..20]));
                p[10..12].copy_from_slice(&c.to_be_bytes());
                p
            })
            .collect()
    }

    #[test]
    fn coalescing_runs() {
        let payload = vec![3u8; 5000];
        let packets = stream(&payload, 1300, &[], true);
        let views: Vec<&[u8]> = packets.iter().map(|p| &p[..]).collect();
        assert_eq!(coalescible(&views), 4);
        assert_eq!(coalescible(&views[..1]), 1);
        assert_eq!(coalescible(&[]), 0);
        // A gap, another ack, a bad checksum, PSH in the middle, a shorter
        // segment in the middle: the run ends before or at it.
        let mut gap = packets.clone();
        gap.remove(1);
        let v: Vec<&[u8]> = gap.iter().map(|p| &p[..]).collect();
        assert_eq!(coalescible(&v), 1);
        let mut ack = packets.clone();
        ack[2][31] ^= 1;
        let v: Vec<&[u8]> = ack.iter().map(|p| &p[..]).collect();
        assert_eq!(coalescible(&v), 2);
        let mut bad = packets.clone();
        bad[1][100] ^= 0xff;
        let v: Vec<&[u8]> = bad.iter().map(|p| &p[..]).collect();
        assert_eq!(coalescible(&v), 1);
        let psh = stream(&payload, 1300, &[], true);
        let v: Vec<&[u8]> = [&psh[3][..], &packets[0][..]].to_vec();
        assert_eq!(coalescible(&v), 1);
        let short = stream(&[1u8; 2000], 1000, &[], false);
        let mut mixed = short.clone();
        mixed[1] = stream(&[1u8; 1500], 1000, &[], false)[1].clone();
        let v: Vec<&[u8]> = mixed.iter().map(|p| &p[..]).collect();
        assert_eq!(coalescible(&v), 2);
        // Not TCP.
        let udp = build::ipv4_udp(SRC, DST, 1, 2, b"x");
        assert_eq!(coalescible(&[&udp[..], &packets[0][..]]), 1);
        let mut out = vec![1u8; 3];
        assert_eq!(coalesce(&[&udp[..], &packets[0][..]], &mut out), 1);
        assert!(out.is_empty());
        assert_eq!(coalesce(&views[..1], &mut out), 1);
        assert!(out.is_empty());
        assert_eq!(coalesce(&[], &mut out), 0);
        // A run followed by another flow: only the run is merged.
        let mut two = packets.clone();
        two.insert(2, udp.clone());
        let v: Vec<&[u8]> = two.iter().map(|p| &p[..]).collect();
        assert_eq!(coalesce(&v, &mut out), 2);
        assert_eq!(out.len(), VNET_HDR_LEN + 40 + 2600);
    }

    proptest! {
        #[test]
        fn coalesced_writes_split_back_into_the_segments(
            payload in proptest::collection::vec(any::<u8>(), 1..30_000),
            size in 1usize..=1400,
            timestamps in any::<bool>(),
            psh in any::<bool>(),
        ) {
            let options: &[u8] = if timestamps { &[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 8] } else { &[] };
            let packets = stream(&payload, size, options, psh);
            let views: Vec<&[u8]> = packets.iter().map(|p| &p[..]).collect();
            let n = coalescible(&views);
            prop_assert!(n >= 1);
            let payload_per_write = (MAX_COALESCED / size) * size;
            if payload.len() <= payload_per_write {
                prop_assert_eq!(n, packets.len());
            }
            let mut out = Vec::new();
            prop_assert_eq!(coalesce(&views, &mut out), n);
            if n >= 2 {
                prop_assert!(out.len() - VNET_HDR_LEN <= 65_535);
                let mut back = Vec::new();
                split(&out, 1500, 0, &mut back).unwrap();
                prop_assert_eq!(&back[..], &packets[..n]);
            }
        }
    }

    proptest! {
        #[test]
        fn tso_segments_reassemble_and_verify(
            payload in proptest::collection::vec(any::<u8>(), 0..20_000),
            options_words in 0usize..=10,
            mtu in 576usize..=1500,
            gso_frac in 0.0f64..=1.0,
            seq in any::<u32>(),
            id in any::<u16>(),
            flags in any::<u8>(),
            ecn in any::<bool>(),
        ) {
            let options = vec![1u8; options_words * 4]; // NOPs
            let headers = 20 + 20 + options.len();
            let max = mtu - headers;
            let gso_size = 1 + ((max - 1) as f64 * gso_frac) as usize;
            let mut p = build::ipv4_tcp(SRC, DST, 40000, 443, seq, flags, &options, &payload);
            p[4..6].copy_from_slice(&id.to_be_bytes());
            let read = tso_read(&p, gso_size as u16, if ecn { GSO_TCPV4 | GSO_ECN } else { GSO_TCPV4 });
            let mut out = Vec::new();
            split(&read, mtu, 25, &mut out).unwrap();
            prop_assert_eq!(out.len(), payload.len().div_ceil(gso_size).max(1));
            let mut data = Vec::new();
            let last = out.len() - 1;
            for (i, buffer) in out.iter().enumerate() {
                let s = &buffer[25..];
                prop_assert!(s.len() <= mtu);
                prop_assert!(ip_checksum_ok(s));
                prop_assert!(tcp_checksum_ok(s).unwrap());
                prop_assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
                prop_assert_eq!(u16::from_be_bytes([s[4], s[5]]), id.wrapping_add(i as u16));
                prop_assert_eq!(s[0], p[0]);
                prop_assert_eq!(&s[6..10], &p[6..10]);
                prop_assert_eq!(&s[12..24], &p[12..24]);
                let got_seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
                prop_assert_eq!(got_seq, seq.wrapping_add(data.len() as u32));
                let f = s[33];
                let keep = !(TCP_FIN | TCP_PSH | TCP_CWR);
                prop_assert_eq!(f & keep, flags & keep);
                prop_assert_eq!(f & (TCP_FIN | TCP_PSH), if i == last { flags & (TCP_FIN | TCP_PSH) } else { 0 });
                prop_assert_eq!(f & TCP_CWR, if i == 0 { flags & TCP_CWR } else { 0 });
                prop_assert_eq!(&s[40..headers], &options[..]);
                data.extend_from_slice(&s[headers..]);
            }
            prop_assert_eq!(data, payload);
        }

        #[test]
        fn arbitrary_packets_never_panic_coalescing(
            packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 0..6),
            tcp in any::<bool>(),
        ) {
            // Half the cases start from valid-looking IPv4 TCP headers.
            let packets: Vec<Vec<u8>> = packets
                .into_iter()
                .map(|mut p| {
                    if tcp && p.len() >= 40 {
                        let len = p.len() as u16;
                        p[0] = 0x45;
                        p[2..4].copy_from_slice(&len.to_be_bytes());
                        p[6..8].fill(0);
                        p[9] = 6;
                        p[32] = 0x50;
                        p[33] = 0x10;
                    }
                    p
                })
                .collect();
            let views: Vec<&[u8]> = packets.iter().map(|p| &p[..]).collect();
            let mut out = Vec::new();
            let n = coalesce(&views, &mut out);
            prop_assert!(n <= views.len());
            prop_assert_eq!(out.is_empty(), n < 2);
        }

        #[test]
        fn arbitrary_reads_never_panic(
            read in proptest::collection::vec(any::<u8>(), 0..3000),
            mtu in 0usize..2000,
            flags in any::<u8>(),
            gso_type in prop_oneof![Just(0u8), Just(1u8), Just(0x81u8), any::<u8>()],
            gso_size in any::<u16>(),
            csum_start in any::<u16>(),
            csum_offset in any::<u16>(),
        ) {
            let mut read = read;
            if read.len() >= VNET_HDR_LEN {
                VnetHeader { flags, gso_type, hdr_len: 0, gso_size, csum_start, csum_offset }.emit(&mut read);
            }
            let mut out = Vec::new();
            if split(&read, mtu, 25, &mut out).is_ok() {
                prop_assert!(!out.is_empty());
                for buffer in &out {
                    prop_assert!(buffer.len() - 25 <= mtu);
                }
            }
        }
    }
}
