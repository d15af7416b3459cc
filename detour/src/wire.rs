//! The NAT detour request (thesis Fig. 4.3) and its authenticated version 2.
//!
//! Version 1 is the thesis's 12-byte message, all fields in network byte order:
//!
//! ```text
//!  0       7 8      15 16             31
//! +---------+---------+----------------+
//! |   ver   |   op    |    reserved    |
//! +---------+---------+----------------+
//! |                rip                 |
//! +------------------+-----------------+
//! |       rpt        |       dpt       |
//! +------------------+-----------------+
//! ```
//!
//! `op` is 0 (request) or 1 (response); `rip`/`rpt` are the remote (server) address and port, `dpt` the
//! detour port: proposed in a request, the one to use in a response.
//!
//! Version 2 (this project; the thesis's §4.4 and §6.5 name the holes it closes) keeps those fields and
//! adds an operation status, a key id, a nonce, a timestamp, the mapping's lifetime and an HMAC-SHA256
//! over everything before it, keyed with a pre-shared key (one per client, or one for a collective):
//!
//! ```text
//!  0: ver = 2   1: op   2: status   3: flags (0)
//!  4..8    key id       which pre-shared key signed it (see `key::Psk::id`)
//!  8..16   nonce        random per request; a response carries the request's
//!  16..24  timestamp    sender's Unix time in milliseconds
//!  24..28  rip   28..30 rpt   30..32 dpt
//!  32..36  lifetime     response: seconds an unused mapping lives; request: 0
//!  36..68  mac          HMAC-SHA256(key, bytes 0..36)
//! ```
//!
//! Operations in version 2: request (0), response (1), release (2, the client gives a mapping back) and
//! released (3). A forged request fails the MAC; a replayed one repeats a nonce the detour has seen within
//! the timestamp window; a forged or replayed response fails the MAC or names no nonce the client waits for.

use std::net::Ipv4Addr;

/// The UDP port of the thesis.
pub const DEFAULT_PORT: u16 = 45672;

/// Field ranges of both versions.
pub mod field {
    use std::ops::Range;

    /// Protocol version.
    pub const VERSION: usize = 0;
    /// Operation.
    pub const OP: usize = 1;

    /// Version 1: unused padding.
    pub const V1_RESERVED: Range<usize> = 2..4;
    /// Version 1: remote address.
    pub const V1_RIP: Range<usize> = 4..8;
    /// Version 1: remote port.
    pub const V1_RPT: Range<usize> = 8..10;
    /// Version 1: detour port.
    pub const V1_DPT: Range<usize> = 10..12;
    /// Version 1 length.
    pub const V1_LEN: usize = 12;

    /// Version 2: status of a response.
    pub const V2_STATUS: usize = 2;
    /// Version 2: flags (none defined; 0).
    pub const V2_FLAGS: usize = 3;
    /// Version 2: key id.
    pub const V2_KEY_ID: Range<usize> = 4..8;
    /// Version 2: nonce.
    pub const V2_NONCE: Range<usize> = 8..16;
    /// Version 2: timestamp (Unix milliseconds).
    pub const V2_TIMESTAMP: Range<usize> = 16..24;
    /// Version 2: remote address.
    pub const V2_RIP: Range<usize> = 24..28;
    /// Version 2: remote port.
    pub const V2_RPT: Range<usize> = 28..30;
    /// Version 2: detour port.
    pub const V2_DPT: Range<usize> = 30..32;
    /// Version 2: mapping lifetime in seconds.
    pub const V2_LIFETIME: Range<usize> = 32..36;
    /// Version 2: the bytes the MAC covers.
    pub const V2_SIGNED: Range<usize> = 0..36;
    /// Version 2: HMAC-SHA256.
    pub const V2_MAC: Range<usize> = 36..68;
    /// Version 2 length.
    pub const V2_LEN: usize = 68;
}

/// Why bytes are not a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Empty datagram.
    #[error("empty datagram")]
    Empty,
    /// A version other than 1 or 2.
    #[error("unknown version {0}")]
    Version(u8),
    /// The length does not match the version.
    #[error("version {version} message of {len} bytes (expected {expected})")]
    Length {
        /// The version byte.
        version: u8,
        /// Bytes received.
        len: usize,
        /// Bytes that version has.
        expected: usize,
    },
    /// An operation the version does not define.
    #[error("unknown operation {0}")]
    Op(u8),
    /// A response status this implementation does not know.
    #[error("unknown status {0}")]
    Status(u8),
}

/// A view of a message in a buffer. Accessors on a buffer that [`Packet::new_checked`] accepted never
/// panic; on an unchecked one they may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it.
    pub fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps untrusted bytes: the version must be 1 or 2 and the length exactly that version's.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks the version and length.
    pub fn check_len(&self) -> Result<(), WireError> {
        let data = self.buffer.as_ref();
        let version = *data.first().ok_or(WireError::Empty)?;
        let expected = match version {
            1 => field::V1_LEN,
            2 => field::V2_LEN,
            other => return Err(WireError::Version(other)),
        };
        if data.len() != expected {
            return Err(WireError::Length {
                version,
                len: data.len(),
                expected,
            });
        }
        Ok(())
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn data(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// Protocol version.
    pub fn version(&self) -> u8 {
        self.data()[field::VERSION]
    }

    /// Operation byte.
    pub fn op(&self) -> u8 {
        self.data()[field::OP]
    }

    fn v2(&self) -> bool {
        self.version() == 2
    }

    /// Remote (server) address.
    pub fn rip(&self) -> Ipv4Addr {
        let range = if self.v2() {
            field::V2_RIP
        } else {
            field::V1_RIP
        };
        Ipv4Addr::from(be32(&self.data()[range]))
    }

    /// Remote port.
    pub fn rpt(&self) -> u16 {
        let range = if self.v2() {
            field::V2_RPT
        } else {
            field::V1_RPT
        };
        be16(&self.data()[range])
    }

    /// Detour port.
    pub fn dpt(&self) -> u16 {
        let range = if self.v2() {
            field::V2_DPT
        } else {
            field::V1_DPT
        };
        be16(&self.data()[range])
    }

    /// Version 2: status byte.
    pub fn status(&self) -> u8 {
        self.data()[field::V2_STATUS]
    }

    /// Version 2: key id.
    pub fn key_id(&self) -> u32 {
        be32(&self.data()[field::V2_KEY_ID])
    }

    /// Version 2: nonce.
    pub fn nonce(&self) -> u64 {
        be64(&self.data()[field::V2_NONCE])
    }

    /// Version 2: timestamp in Unix milliseconds.
    pub fn timestamp_ms(&self) -> u64 {
        be64(&self.data()[field::V2_TIMESTAMP])
    }

    /// Version 2: lifetime in seconds.
    pub fn lifetime_s(&self) -> u32 {
        be32(&self.data()[field::V2_LIFETIME])
    }

    /// Version 2: the bytes the MAC covers.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.data()[field::V2_SIGNED]
    }

    /// Version 2: the MAC.
    pub fn mac(&self) -> &[u8] {
        &self.data()[field::V2_MAC]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn data_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// Version 2: the MAC field, to fill after the other fields.
    pub fn mac_mut(&mut self) -> &mut [u8] {
        &mut self.data_mut()[field::V2_MAC]
    }
}

/// Operation of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Client → detour: map (client, dpt) to (rip, rpt).
    Request,
    /// Detour → client: the answer.
    Response,
    /// Client → detour (version 2): the client no longer needs the mapping.
    Release,
    /// Detour → client (version 2): the answer to a release.
    Released,
}

impl Op {
    /// The wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            Op::Request => 0,
            Op::Response => 1,
            Op::Release => 2,
            Op::Released => 3,
        }
    }

    fn parse(value: u8, version: u8) -> Result<Self, WireError> {
        match (value, version) {
            (0, _) => Ok(Op::Request),
            (1, _) => Ok(Op::Response),
            (2, 2) => Ok(Op::Release),
            (3, 2) => Ok(Op::Released),
            (other, _) => Err(WireError::Op(other)),
        }
    }

    /// Whether the detour sends it.
    pub fn is_answer(self) -> bool {
        matches!(self, Op::Response | Op::Released)
    }
}

/// The outcome a version 2 answer reports (requests carry [`Status::Ok`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Done: the mapping exists (response) or is gone (released).
    Ok,
    /// The destination or the client is not allowed.
    Denied,
    /// The client holds as many mappings as it may.
    QuotaExceeded,
    /// No detour port is free for this client.
    NoPort,
    /// The detour cannot take more mappings, or failed to install one.
    Unavailable,
    /// Release of a mapping the client does not hold.
    NotFound,
}

impl Status {
    /// Every status, in wire order.
    pub const ALL: [Status; 6] = [
        Status::Ok,
        Status::Denied,
        Status::QuotaExceeded,
        Status::NoPort,
        Status::Unavailable,
        Status::NotFound,
    ];

    /// The wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Denied => 1,
            Status::QuotaExceeded => 2,
            Status::NoPort => 3,
            Status::Unavailable => 4,
            Status::NotFound => 5,
        }
    }

    /// From the wire value.
    pub fn from_u8(value: u8) -> Result<Self, WireError> {
        Self::ALL
            .get(usize::from(value))
            .copied()
            .ok_or(WireError::Status(value))
    }

    /// A short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Denied => "denied",
            Status::QuotaExceeded => "quota_exceeded",
            Status::NoPort => "no_port",
            Status::Unavailable => "unavailable",
            Status::NotFound => "not_found",
        }
    }
}

/// A version 1 message (the thesis's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct V1Repr {
    /// Request or response.
    pub op: Op,
    /// Remote address.
    pub rip: Ipv4Addr,
    /// Remote port.
    pub rpt: u16,
    /// Detour port.
    pub dpt: u16,
}

/// A version 2 message without its MAC (see [`crate::key::Psk`] for signing and checking).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct V2Repr {
    /// Operation.
    pub op: Op,
    /// Status (answers; [`Status::Ok`] in requests).
    pub status: Status,
    /// Which key signed it.
    pub key_id: u32,
    /// The request's nonce.
    pub nonce: u64,
    /// Sender's Unix time in milliseconds.
    pub timestamp_ms: u64,
    /// Remote address.
    pub rip: Ipv4Addr,
    /// Remote port.
    pub rpt: u16,
    /// Detour port.
    pub dpt: u16,
    /// Seconds an unused mapping lives (answers).
    pub lifetime_s: u32,
}

/// A parsed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Repr {
    /// Version 1.
    V1(V1Repr),
    /// Version 2 (its MAC is checked separately).
    V2(V2Repr),
}

impl Repr {
    /// Parses a checked packet.
    pub fn parse<T: AsRef<[u8]>>(packet: &Packet<T>) -> Result<Self, WireError> {
        packet.check_len()?;
        let version = packet.version();
        let op = Op::parse(packet.op(), version)?;
        if version == 1 {
            return Ok(Repr::V1(V1Repr {
                op,
                rip: packet.rip(),
                rpt: packet.rpt(),
                dpt: packet.dpt(),
            }));
        }
        Ok(Repr::V2(V2Repr {
            op,
            status: Status::from_u8(packet.status())?,
            key_id: packet.key_id(),
            nonce: packet.nonce(),
            timestamp_ms: packet.timestamp_ms(),
            rip: packet.rip(),
            rpt: packet.rpt(),
            dpt: packet.dpt(),
            lifetime_s: packet.lifetime_s(),
        }))
    }

    /// The number of bytes [`Repr::emit`] writes.
    pub fn buffer_len(&self) -> usize {
        match self {
            Repr::V1(_) => field::V1_LEN,
            Repr::V2(_) => field::V2_LEN,
        }
    }

    /// Writes the message (a version 2 MAC field is zeroed; sign it afterwards). `buffer` must be
    /// [`Repr::buffer_len`] long.
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        let data = packet.data_mut();
        match self {
            Repr::V1(repr) => {
                data[field::VERSION] = 1;
                data[field::OP] = repr.op.to_u8();
                data[field::V1_RESERVED].fill(0);
                data[field::V1_RIP].copy_from_slice(&repr.rip.octets());
                data[field::V1_RPT].copy_from_slice(&repr.rpt.to_be_bytes());
                data[field::V1_DPT].copy_from_slice(&repr.dpt.to_be_bytes());
            }
            Repr::V2(repr) => {
                data[field::VERSION] = 2;
                data[field::OP] = repr.op.to_u8();
                data[field::V2_STATUS] = repr.status.to_u8();
                data[field::V2_FLAGS] = 0;
                data[field::V2_KEY_ID].copy_from_slice(&repr.key_id.to_be_bytes());
                data[field::V2_NONCE].copy_from_slice(&repr.nonce.to_be_bytes());
                data[field::V2_TIMESTAMP].copy_from_slice(&repr.timestamp_ms.to_be_bytes());
                data[field::V2_RIP].copy_from_slice(&repr.rip.octets());
                data[field::V2_RPT].copy_from_slice(&repr.rpt.to_be_bytes());
                data[field::V2_DPT].copy_from_slice(&repr.dpt.to_be_bytes());
                data[field::V2_LIFETIME].copy_from_slice(&repr.lifetime_s.to_be_bytes());
                data[field::V2_MAC].fill(0);
            }
        }
    }

    /// The message as a new buffer (version 2 unsigned).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.buffer_len()];
        self.emit(&mut Packet::new_unchecked(&mut bytes[..]));
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the thesis's Python client sends for a tunnel to 10.0.3.2:80 proposing dpt 80:
    /// `struct.pack("!BBH4sHH", 1, 0, 0, inet_aton("10.0.3.2"), 80, 80)`.
    const THESIS_REQUEST: [u8; 12] = [1, 0, 0, 0, 10, 0, 3, 2, 0, 80, 0, 80];

    #[test]
    fn thesis_request_round_trips() {
        let packet = Packet::new_checked(&THESIS_REQUEST[..]).unwrap();
        let repr = Repr::parse(&packet).unwrap();
        assert_eq!(
            repr,
            Repr::V1(V1Repr {
                op: Op::Request,
                rip: Ipv4Addr::new(10, 0, 3, 2),
                rpt: 80,
                dpt: 80,
            })
        );
        assert_eq!(repr.to_bytes(), THESIS_REQUEST);
    }

    #[test]
    fn v1_reserved_bytes_are_ignored() {
        let mut bytes = THESIS_REQUEST;
        bytes[2] = 0xff;
        let repr = Repr::parse(&Packet::new_checked(&bytes[..]).unwrap()).unwrap();
        assert_eq!(repr.to_bytes(), THESIS_REQUEST);
    }

    #[test]
    fn v2_fields_land_where_documented() {
        let repr = Repr::V2(V2Repr {
            op: Op::Response,
            status: Status::QuotaExceeded,
            key_id: 0x0102_0304,
            nonce: 0x1112_1314_1516_1718,
            timestamp_ms: 0x2122_2324_2526_2728,
            rip: Ipv4Addr::new(192, 0, 2, 1),
            rpt: 443,
            dpt: 20443,
            lifetime_s: 600,
        });
        let bytes = repr.to_bytes();
        assert_eq!(bytes.len(), 68);
        assert_eq!(&bytes[..4], &[2, 1, 2, 0]);
        assert_eq!(&bytes[4..8], &[1, 2, 3, 4]);
        assert_eq!(
            &bytes[8..16],
            &[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]
        );
        assert_eq!(
            &bytes[16..24],
            &[0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28]
        );
        assert_eq!(&bytes[24..28], &[192, 0, 2, 1]);
        assert_eq!(&bytes[28..32], &[1, 187, 0x4f, 0xdb]);
        assert_eq!(&bytes[32..36], &[0, 0, 2, 88]);
        assert!(bytes[36..].iter().all(|b| *b == 0));
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(Repr::parse(&packet).unwrap(), repr);
    }

    #[test]
    fn bad_bytes_are_errors() {
        assert_eq!(Packet::new_checked(&[][..]), Err(WireError::Empty));
        assert_eq!(
            Packet::new_checked(&[3u8; 12][..]),
            Err(WireError::Version(3))
        );
        assert_eq!(
            Packet::new_checked(&THESIS_REQUEST[..11]),
            Err(WireError::Length {
                version: 1,
                len: 11,
                expected: 12
            })
        );
        let mut long = THESIS_REQUEST.to_vec();
        long.push(0);
        assert!(Packet::new_checked(&long[..]).is_err());
        let mut release_v1 = THESIS_REQUEST;
        release_v1[1] = 2;
        assert_eq!(
            Repr::parse(&Packet::new_checked(&release_v1[..]).unwrap()),
            Err(WireError::Op(2))
        );
        let mut v2 = [0u8; 68];
        v2[0] = 2;
        v2[2] = 99;
        assert_eq!(
            Repr::parse(&Packet::new_checked(&v2[..]).unwrap()),
            Err(WireError::Status(99))
        );
    }
}
