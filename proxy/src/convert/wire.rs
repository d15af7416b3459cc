//! The RFC 8803 wire format: the Convert fixed header and its TLVs, as `Packet` views over bytes and
//! owned `Repr`s, shared by the converter (`mptcp-proxy`) and the client agent (`mptcp-convert`).
//!
//! A Convert message is a 32-bit fixed header (§4.1) followed by TLVs (§4.2), and every length in it
//! counts 32-bit words, so a message is at most 255 × 4 = 1020 bytes. The client sends one at the start
//! of its connection (in the SYN with TCP Fast Open); the converter answers with one before any byte
//! from the server. Bytes after the message are application data.
//!
//! `Repr`s keep padded fields exactly as they travel (a Connect TLV's TCP options, a cookie, an error
//! value), so parsing then emitting reproduces the input but for Unassigned fields, which are sent as
//! zero and ignored on receipt (§4); the constructors pad.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The only protocol version (§4.1, IANA "Convert Versions").
pub const VERSION: u8 = 1;
/// The fixed header's Magic Number, 0x2263 (8803 in decimal) (§4.1).
pub const MAGIC: u16 = 0x2263;
/// The IANA-assigned converter port (§8.1).
pub const DEFAULT_PORT: u16 = 5124;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 4;
/// The longest message: a Total Length of 255 words.
pub const MAX_MESSAGE_LEN: usize = 255 * 4;

/// Byte ranges of the fixed header (§4.1, Figure 9):
/// `Version (8) | Total Length (8, words) | Magic Number (16)`.
mod field {
    pub const VERSION: usize = 0;
    pub const TOTAL_LENGTH: usize = 1;
    pub const MAGIC: std::ops::Range<usize> = 2..4;
    /// Generic TLV (§4.2.1): `Type (8) | Length (8, words) | Value`.
    pub const TLV_TYPE: usize = 0;
    pub const TLV_LENGTH: usize = 1;
    pub const TLV_VALUE: usize = 2;
}

/// TLV types (§4.2.2 Table 1, IANA "Convert TLVs").
pub mod tlv_type {
    /// Info TLV (§4.3).
    pub const INFO: u8 = 1;
    /// Connect TLV (§4.5).
    pub const CONNECT: u8 = 10;
    /// Extended TCP Header TLV (§4.6).
    pub const EXTENDED_TCP_HEADER: u8 = 20;
    /// Supported TCP Extensions TLV (§4.4).
    pub const SUPPORTED_TCP_EXTENSIONS: u8 = 21;
    /// Cookie TLV (§4.7).
    pub const COOKIE: u8 = 22;
    /// Error TLV (§4.8).
    pub const ERROR: u8 = 30;
}

/// Error codes of the Error TLV (§4.8, IANA "Convert Errors"). The ranges are message validation
/// (0-31), client-side (32-63), converter-side (64-95) and destination-server (96-127) errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 0: the fixed header's version is not supported; the value lists the supported versions.
    UnsupportedVersion,
    /// 1: the message could not be parsed or validated.
    MalformedMessage,
    /// 2: a TLV type is not supported; the value is that type.
    UnsupportedMessage,
    /// 3: the converter requires a Cookie TLV; a Cookie TLV with a fresh cookie accompanies it.
    MissingCookie,
    /// 32: the client or the destination is not authorized (or the cookie is invalid).
    NotAuthorized,
    /// 33: a TCP option of the Connect TLV is not supported; the value is its kind.
    UnsupportedTcpOption,
    /// 64: the converter is out of resources (connection limits, sockets).
    ResourceExceeded,
    /// 65: the converter cannot reach the network.
    NetworkFailure,
    /// 96: the server answered the converter's SYN with a RST.
    ConnectionReset,
    /// 97: the server is unreachable (ICMP unreachable or no answer in time).
    DestinationUnreachable,
    /// Any other code.
    Other(u8),
}

impl ErrorCode {
    /// The code on the wire.
    pub fn code(self) -> u8 {
        match self {
            ErrorCode::UnsupportedVersion => 0,
            ErrorCode::MalformedMessage => 1,
            ErrorCode::UnsupportedMessage => 2,
            ErrorCode::MissingCookie => 3,
            ErrorCode::NotAuthorized => 32,
            ErrorCode::UnsupportedTcpOption => 33,
            ErrorCode::ResourceExceeded => 64,
            ErrorCode::NetworkFailure => 65,
            ErrorCode::ConnectionReset => 96,
            ErrorCode::DestinationUnreachable => 97,
            ErrorCode::Other(code) => code,
        }
    }

    /// The code from the wire.
    pub fn from_code(code: u8) -> Self {
        match code {
            0 => ErrorCode::UnsupportedVersion,
            1 => ErrorCode::MalformedMessage,
            2 => ErrorCode::UnsupportedMessage,
            3 => ErrorCode::MissingCookie,
            32 => ErrorCode::NotAuthorized,
            33 => ErrorCode::UnsupportedTcpOption,
            64 => ErrorCode::ResourceExceeded,
            65 => ErrorCode::NetworkFailure,
            96 => ErrorCode::ConnectionReset,
            97 => ErrorCode::DestinationUnreachable,
            other => ErrorCode::Other(other),
        }
    }

    /// The IANA name.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::UnsupportedVersion => "Unsupported Version",
            ErrorCode::MalformedMessage => "Malformed Message",
            ErrorCode::UnsupportedMessage => "Unsupported Message",
            ErrorCode::MissingCookie => "Missing Cookie",
            ErrorCode::NotAuthorized => "Not Authorized",
            ErrorCode::UnsupportedTcpOption => "Unsupported TCP Option",
            ErrorCode::ResourceExceeded => "Resource Exceeded",
            ErrorCode::NetworkFailure => "Network Failure",
            ErrorCode::ConnectionReset => "Connection Reset",
            ErrorCode::DestinationUnreachable => "Destination Unreachable",
            ErrorCode::Other(_) => "Unassigned",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

/// Why bytes are not a valid Convert message. "Need more bytes" is not an error: see [`Parsed`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The fixed header names a version this implementation does not speak.
    #[error("unsupported Convert version {0}")]
    UnsupportedVersion(u8),
    /// The message is malformed: `offset` is where, in bytes from the message start.
    #[error("malformed Convert message at byte {offset}: {reason}")]
    Malformed {
        /// Byte offset of the problem.
        offset: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

impl WireError {
    /// The Error TLV that answers this problem (§4.8).
    pub fn error_tlv(&self) -> TlvRepr {
        match self {
            WireError::UnsupportedVersion(_) => {
                TlvRepr::error(ErrorCode::UnsupportedVersion, &[VERSION])
            }
            WireError::Malformed { .. } => TlvRepr::error(ErrorCode::MalformedMessage, &[0]),
        }
    }
}

fn malformed(offset: usize, reason: &'static str) -> WireError {
    WireError::Malformed { offset, reason }
}

/// A view of a Convert fixed header (§4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Header<T> {
    /// Wraps a buffer without checking it; accessors panic if it is shorter than [`HEADER_LEN`].
    pub fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer, checking that the header fits. The fields themselves are checked by
    /// [`MessageRepr::parse`].
    pub fn new_checked(buffer: T) -> Option<Self> {
        (buffer.as_ref().len() >= HEADER_LEN).then_some(Self { buffer })
    }

    /// The Version field.
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VERSION]
    }

    /// The Total Length field, in 32-bit words (header included).
    pub fn total_length_words(&self) -> u8 {
        self.buffer.as_ref()[field::TOTAL_LENGTH]
    }

    /// The message length in bytes.
    pub fn message_len(&self) -> usize {
        usize::from(self.total_length_words()) * 4
    }

    /// The Magic Number field.
    pub fn magic(&self) -> u16 {
        let b = &self.buffer.as_ref()[field::MAGIC];
        u16::from_be_bytes([b[0], b[1]])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Header<T> {
    /// Writes a header for a message of `words` 32-bit words.
    pub fn emit(&mut self, words: u8) {
        let b = self.buffer.as_mut();
        b[field::VERSION] = VERSION;
        b[field::TOTAL_LENGTH] = words;
        b[field::MAGIC].copy_from_slice(&MAGIC.to_be_bytes());
    }
}

/// A view of one TLV (§4.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Tlv<T> {
    /// Wraps a buffer that starts with a TLV, checking that its Length is non-zero and fits.
    pub fn new_checked(buffer: T) -> Option<Self> {
        let b = buffer.as_ref();
        if b.len() < 4 {
            return None;
        }
        let len = usize::from(b[field::TLV_LENGTH]) * 4;
        (len >= 4 && len <= b.len()).then_some(Self { buffer })
    }

    /// The Type field.
    pub fn kind(&self) -> u8 {
        self.buffer.as_ref()[field::TLV_TYPE]
    }

    /// The TLV's length in bytes (Length × 4).
    pub fn len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::TLV_LENGTH]) * 4
    }

    /// Whether the TLV is empty: never, a checked TLV has at least one word.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The Value: everything after Type and Length.
    pub fn value(&self) -> &[u8] {
        &self.buffer.as_ref()[field::TLV_VALUE..self.len()]
    }
}

/// One TLV, owned. Padded fields keep their padding (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlvRepr {
    /// Info TLV (§4.3): asks the converter which TCP extensions it supports.
    Info,
    /// Connect TLV (§4.5): the server to connect to, and TCP options for the converter's SYN.
    Connect {
        /// Remote Peer Port.
        port: u16,
        /// Remote Peer IP Address; IPv4 as an IPv4-mapped IPv6 address.
        address: Ipv6Addr,
        /// TCP options, padded to 32 bits (with EOL, zero).
        options: Vec<u8>,
    },
    /// Extended TCP Header TLV (§4.6): the TCP options the server's SYN+ACK carried, padded.
    ExtendedTcpHeader {
        /// The returned extended header (TCP options), padded to 32 bits.
        header: Vec<u8>,
    },
    /// Supported TCP Extensions TLV (§4.4): TCP option kinds the converter supports, zero-padded.
    SupportedTcpExtensions {
        /// Option kinds, one byte each, padded with zeros.
        kinds: Vec<u8>,
    },
    /// Cookie TLV (§4.7): an opaque anti-spoofing cookie, a whole number of words.
    Cookie {
        /// The opaque value.
        opaque: Vec<u8>,
    },
    /// Error TLV (§4.8).
    Error {
        /// The error code.
        code: ErrorCode,
        /// The value, padded so the TLV ends on a word (at least one byte).
        value: Vec<u8>,
    },
    /// A TLV of a type this implementation does not know (answered with Unsupported Message).
    Unknown {
        /// The Type.
        kind: u8,
        /// The Value as it came (Length × 4 - 2 bytes).
        value: Vec<u8>,
    },
}

/// Pads `bytes` with zeros to `len % 4 == target`.
fn padded(bytes: &[u8], target: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    while out.len() % 4 != target {
        out.push(0);
    }
    out
}

impl TlvRepr {
    /// A Connect TLV for `destination` with `options` (padded here).
    pub fn connect(destination: SocketAddr, options: &[u8]) -> Self {
        let address = match destination.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        TlvRepr::Connect {
            port: destination.port(),
            address,
            options: padded(options, 0),
        }
    }

    /// An Error TLV with `value` (padded here; an empty value becomes one zero byte).
    pub fn error(code: ErrorCode, value: &[u8]) -> Self {
        let value = if value.is_empty() { &[0][..] } else { value };
        TlvRepr::Error {
            code,
            value: padded(value, 1),
        }
    }

    /// A Supported TCP Extensions TLV listing `kinds` (padded here).
    pub fn supported(kinds: &[u8]) -> Self {
        TlvRepr::SupportedTcpExtensions {
            kinds: padded(kinds, 0),
        }
    }

    /// An Extended TCP Header TLV carrying `options` (padded here).
    pub fn extended_tcp_header(options: &[u8]) -> Self {
        TlvRepr::ExtendedTcpHeader {
            header: padded(options, 0),
        }
    }

    /// A Cookie TLV (padded here).
    pub fn cookie(opaque: &[u8]) -> Self {
        TlvRepr::Cookie {
            opaque: padded(opaque, 0),
        }
    }

    /// The Type.
    pub fn kind(&self) -> u8 {
        match self {
            TlvRepr::Info => tlv_type::INFO,
            TlvRepr::Connect { .. } => tlv_type::CONNECT,
            TlvRepr::ExtendedTcpHeader { .. } => tlv_type::EXTENDED_TCP_HEADER,
            TlvRepr::SupportedTcpExtensions { .. } => tlv_type::SUPPORTED_TCP_EXTENSIONS,
            TlvRepr::Cookie { .. } => tlv_type::COOKIE,
            TlvRepr::Error { .. } => tlv_type::ERROR,
            TlvRepr::Unknown { kind, .. } => *kind,
        }
    }

    /// For a Connect TLV, the destination (IPv4-mapped addresses as IPv4).
    pub fn destination(&self) -> Option<SocketAddr> {
        match self {
            TlvRepr::Connect { port, address, .. } => Some(SocketAddr::new(
                address
                    .to_ipv4_mapped()
                    .map_or(IpAddr::V6(*address), IpAddr::V4),
                *port,
            )),
            _ => None,
        }
    }

    /// Parses one TLV from `tlv` (a checked view) at `offset` in its message.
    fn parse(tlv: &Tlv<&[u8]>, offset: usize) -> Result<Self, WireError> {
        let value = tlv.value();
        Ok(match tlv.kind() {
            tlv_type::INFO => TlvRepr::Info,
            tlv_type::CONNECT => {
                // Port (2) and address (16) after Type and Length: at least 5 words (§4.5).
                if tlv.len() < 20 {
                    return Err(malformed(offset, "Connect TLV shorter than 5 words"));
                }
                let mut address = [0u8; 16];
                address.copy_from_slice(&value[2..18]);
                TlvRepr::Connect {
                    port: u16::from_be_bytes([value[0], value[1]]),
                    address: Ipv6Addr::from(address),
                    options: value[18..].to_vec(),
                }
            }
            tlv_type::EXTENDED_TCP_HEADER => TlvRepr::ExtendedTcpHeader {
                header: value[2..].to_vec(),
            },
            tlv_type::SUPPORTED_TCP_EXTENSIONS => TlvRepr::SupportedTcpExtensions {
                kinds: value[2..].to_vec(),
            },
            tlv_type::COOKIE => TlvRepr::Cookie {
                opaque: value[2..].to_vec(),
            },
            tlv_type::ERROR => TlvRepr::Error {
                code: ErrorCode::from_code(value[0]),
                value: value[1..].to_vec(),
            },
            kind => TlvRepr::Unknown {
                kind,
                value: value.to_vec(),
            },
        })
    }

    /// Bytes this TLV takes on the wire.
    pub fn buffer_len(&self) -> usize {
        let value = match self {
            TlvRepr::Info => 2,
            TlvRepr::Connect { options, .. } => 18 + options.len(),
            TlvRepr::ExtendedTcpHeader { header: bytes, .. }
            | TlvRepr::SupportedTcpExtensions { kinds: bytes }
            | TlvRepr::Cookie { opaque: bytes } => 2 + bytes.len(),
            TlvRepr::Error { value, .. } => 1 + value.len(),
            TlvRepr::Unknown { value, .. } => value.len(),
        };
        // Whole words; a non-canonical repr is padded with zeros.
        (2 + value).div_ceil(4) * 4
    }

    /// Writes the TLV into `buffer` (at least [`TlvRepr::buffer_len`] bytes, zeroed by the caller
    /// where padding matters).
    fn emit(&self, buffer: &mut [u8]) {
        let len = self.buffer_len();
        buffer[..len].fill(0);
        buffer[field::TLV_TYPE] = self.kind();
        buffer[field::TLV_LENGTH] = u8::try_from(len / 4).unwrap_or(u8::MAX);
        let value = &mut buffer[field::TLV_VALUE..len];
        match self {
            TlvRepr::Info => {}
            TlvRepr::Connect {
                port,
                address,
                options,
            } => {
                value[0..2].copy_from_slice(&port.to_be_bytes());
                value[2..18].copy_from_slice(&address.octets());
                value[18..18 + options.len()].copy_from_slice(options);
            }
            TlvRepr::ExtendedTcpHeader { header: bytes }
            | TlvRepr::SupportedTcpExtensions { kinds: bytes }
            | TlvRepr::Cookie { opaque: bytes } => value[2..2 + bytes.len()].copy_from_slice(bytes),
            TlvRepr::Error { code, value: v } => {
                value[0] = code.code();
                value[1..1 + v.len()].copy_from_slice(v);
            }
            TlvRepr::Unknown { value: v, .. } => value[..v.len()].copy_from_slice(v),
        }
    }
}

/// A whole Convert message, owned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageRepr {
    /// The TLVs in order (possibly none: a bare header is the converter's "all is well").
    pub tlvs: Vec<TlvRepr>,
}

/// What [`MessageRepr::parse`] found at the start of a byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole message yet: at least `needed` bytes in total are required.
    Incomplete {
        /// Bytes needed (from the start of the buffer).
        needed: usize,
    },
    /// A message of `len` bytes; what follows it is application data.
    Complete {
        /// The message.
        message: MessageRepr,
        /// Its length in bytes.
        len: usize,
    },
}

impl MessageRepr {
    /// A message of these TLVs.
    pub fn new(tlvs: Vec<TlvRepr>) -> Self {
        Self { tlvs }
    }

    /// Parses the message at the start of `bytes` (untrusted).
    pub fn parse(bytes: &[u8]) -> Result<Parsed, WireError> {
        let Some(header) = Header::new_checked(bytes) else {
            return Ok(Parsed::Incomplete { needed: HEADER_LEN });
        };
        if header.version() != VERSION {
            return Err(WireError::UnsupportedVersion(header.version()));
        }
        if header.magic() != MAGIC {
            return Err(malformed(field::MAGIC.start, "bad Magic Number"));
        }
        let len = header.message_len();
        if len < HEADER_LEN {
            return Err(malformed(field::TOTAL_LENGTH, "Total Length is zero"));
        }
        if bytes.len() < len {
            return Ok(Parsed::Incomplete { needed: len });
        }
        let mut tlvs = Vec::new();
        let mut offset = HEADER_LEN;
        while offset < len {
            let tlv = Tlv::new_checked(&bytes[offset..len])
                .ok_or_else(|| malformed(offset, "TLV length zero or past the message"))?;
            tlvs.push(TlvRepr::parse(&tlv, offset)?);
            offset += tlv.len();
        }
        Ok(Parsed::Complete {
            message: MessageRepr { tlvs },
            len,
        })
    }

    /// Bytes the message takes on the wire.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.tlvs.iter().map(TlvRepr::buffer_len).sum::<usize>()
    }

    /// Serializes the message. Fails when it exceeds [`MAX_MESSAGE_LEN`].
    pub fn to_bytes(&self) -> Result<Vec<u8>, WireError> {
        let len = self.buffer_len();
        if len > MAX_MESSAGE_LEN {
            return Err(malformed(0, "message longer than 255 words"));
        }
        let mut buffer = vec![0u8; len];
        Header::new_unchecked(&mut buffer[..]).emit((len / 4) as u8);
        let mut offset = HEADER_LEN;
        for tlv in &self.tlvs {
            tlv.emit(&mut buffer[offset..]);
            offset += tlv.buffer_len();
        }
        Ok(buffer)
    }

    /// The first TLV of `kind`.
    pub fn find(&self, kind: u8) -> Option<&TlvRepr> {
        self.tlvs.iter().find(|t| t.kind() == kind)
    }

    /// The first Error TLV's code and value, if any.
    pub fn error(&self) -> Option<(ErrorCode, &[u8])> {
        self.tlvs.iter().find_map(|t| match t {
            TlvRepr::Error { code, value } => Some((*code, value.as_slice())),
            _ => None,
        })
    }
}

/// One TCP option of a Connect TLV's option list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOption<'a> {
    /// The option kind.
    pub kind: u8,
    /// Its data (after kind and length).
    pub data: &'a [u8],
}

/// Splits a TCP option list (RFC 9293 §3.1: EOL ends it, NOP is one byte, others are kind, length,
/// data). `Err` gives the offset of an option whose length is invalid.
pub fn tcp_options(bytes: &[u8]) -> Result<Vec<TcpOption<'_>>, usize> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let len = usize::from(*bytes.get(i + 1).ok_or(i)?);
                if len < 2 || i + len > bytes.len() {
                    return Err(i);
                }
                out.push(TcpOption {
                    kind,
                    data: &bytes[i + 2..i + len],
                });
                i += len;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn complete(bytes: &[u8]) -> (MessageRepr, usize) {
        match MessageRepr::parse(bytes).expect("valid") {
            Parsed::Complete { message, len } => (message, len),
            other => panic!("incomplete: {other:?}"),
        }
    }

    /// §4.1 Figure 9 with §4.5 Figure 14: a client's SYN payload asking for 10.0.3.2:80, no options,
    /// followed by the first bytes of an HTTP request (24 bytes of Convert, then data).
    #[test]
    fn connect_message_from_the_rfc_figures() {
        let bytes: [u8; 28] = [
            // Fixed header: Version 1, Total Length 6 words, Magic Number 0x2263.
            0x01, 0x06, 0x22, 0x63, //
            // Connect TLV: Type 10, Length 5 words, Remote Peer Port 80.
            0x0a, 0x05, 0x00, 0x50, //
            // Remote Peer IP Address: ::ffff:10.0.3.2.
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 3, 2, //
            // Application data follows the message.
            b'G', b'E', b'T', b' ',
        ];
        let (message, len) = complete(&bytes);
        assert_eq!(len, 24);
        let connect = message.find(tlv_type::CONNECT).expect("connect");
        assert_eq!(
            connect.destination(),
            Some("10.0.3.2:80".parse().expect("literal"))
        );
        let built = MessageRepr::new(vec![TlvRepr::connect(
            "10.0.3.2:80".parse().expect("literal"),
            &[],
        )]);
        assert_eq!(built.to_bytes().expect("emit"), bytes[..24]);
    }

    /// §4.5: TCP options ride in the Connect TLV, padded to a word: MSS 1400 and SACK-permitted.
    #[test]
    fn connect_with_tcp_options_round_trips() {
        let bytes: [u8; 28] = [
            0x01, 0x07, 0x22, 0x63, //
            0x0a, 0x06, 0x01, 0xbb, // Connect, 6 words, port 443
            0xfd, 0x00, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, // fd00:3::2
            0x02, 0x04, 0x05, 0x78, // MSS 1400
        ];
        let (message, _) = complete(&bytes);
        let TlvRepr::Connect { options, .. } = &message.tlvs[0] else {
            panic!("{message:?}")
        };
        let parsed = tcp_options(options).expect("options");
        assert_eq!(
            parsed,
            vec![TcpOption {
                kind: 2,
                data: &[0x05, 0x78]
            }]
        );
        assert_eq!(message.to_bytes().expect("emit"), bytes);
        assert_eq!(
            message.tlvs[0].destination(),
            Some("[fd00:3::2]:443".parse().expect("literal"))
        );
    }

    /// §4.3 Info TLV (Figure 11) and §4.4 Supported TCP Extensions TLV (Figure 12): the question and an
    /// answer listing MSS, window scale, SACK-permitted, timestamps and MPTCP (30), zero-padded.
    #[test]
    fn info_and_supported_extensions() {
        let question = [0x01, 0x02, 0x22, 0x63, 0x01, 0x01, 0x00, 0x00];
        assert_eq!(complete(&question).0.tlvs, vec![TlvRepr::Info]);
        assert_eq!(
            MessageRepr::new(vec![TlvRepr::Info])
                .to_bytes()
                .expect("emit"),
            question
        );
        let answer = [
            0x01, 0x04, 0x22, 0x63, //
            0x15, 0x03, 0x00, 0x00, // Supported TCP Extensions, 3 words, Unassigned
            2, 3, 4, 8, 30, 0, 0, 0, // kinds, zero-padded
        ];
        let built = MessageRepr::new(vec![TlvRepr::supported(&[2, 3, 4, 8, 30])]);
        assert_eq!(built.to_bytes().expect("emit"), answer);
        assert_eq!(complete(&answer).0, built);
    }

    /// §4.8 Error TLV (Figure 21): Not Authorized with a zero value; Unsupported Version listing 1.
    #[test]
    fn error_tlvs() {
        let denied = [0x01, 0x02, 0x22, 0x63, 0x1e, 0x01, 32, 0x00];
        let built = MessageRepr::new(vec![TlvRepr::error(ErrorCode::NotAuthorized, &[])]);
        assert_eq!(built.to_bytes().expect("emit"), denied);
        let (message, _) = complete(&denied);
        assert_eq!(
            message.error(),
            Some((ErrorCode::NotAuthorized, &[0u8][..]))
        );
        let version = MessageRepr::new(vec![WireError::UnsupportedVersion(2).error_tlv()]);
        assert_eq!(
            version.to_bytes().expect("emit"),
            [0x01, 0x02, 0x22, 0x63, 0x1e, 0x01, 0, 1]
        );
        for code in 0..=255u8 {
            assert_eq!(ErrorCode::from_code(code).code(), code);
        }
    }

    /// §4.6 Extended TCP Header TLV (Figure 19) and §4.7 Cookie TLV (Figure 20).
    #[test]
    fn extended_header_and_cookie() {
        let bytes = [
            0x01, 0x07, 0x22, 0x63, //
            0x14, 0x03, 0x00, 0x00, // Extended TCP Header, 3 words, Unassigned
            0x02, 0x04, 0x05, 0xb4, // MSS 1460
            0x01, 0x03, 0x03, 0x07, // NOP, window scale 7
            0x16, 0x03, 0x00, 0x00, // Cookie, 3 words, Zero
            0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04, // opaque
        ];
        let built = MessageRepr::new(vec![
            TlvRepr::extended_tcp_header(&[0x02, 0x04, 0x05, 0xb4, 0x01, 0x03, 0x03, 0x07]),
            TlvRepr::cookie(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]),
        ]);
        assert_eq!(built.to_bytes().expect("emit"), bytes);
        assert_eq!(complete(&bytes).0, built);
    }

    #[test]
    fn incomplete_and_malformed_inputs() {
        let full = MessageRepr::new(vec![TlvRepr::connect(
            "10.0.3.2:80".parse().expect("literal"),
            &[],
        )])
        .to_bytes()
        .expect("emit");
        for cut in 0..full.len() {
            let needed = if cut < HEADER_LEN {
                HEADER_LEN
            } else {
                full.len()
            };
            assert_eq!(
                MessageRepr::parse(&full[..cut]),
                Ok(Parsed::Incomplete { needed }),
                "cut {cut}"
            );
        }
        let mut bad = full.clone();
        bad[0] = 2;
        assert_eq!(
            MessageRepr::parse(&bad),
            Err(WireError::UnsupportedVersion(2))
        );
        let mut bad = full.clone();
        bad[3] = 0;
        assert!(matches!(
            MessageRepr::parse(&bad),
            Err(WireError::Malformed { .. })
        ));
        let mut bad = full.clone();
        bad[5] = 0; // TLV length zero
        assert!(matches!(
            MessageRepr::parse(&bad),
            Err(WireError::Malformed { .. })
        ));
        let mut bad = full.clone();
        bad[5] = 9; // TLV past the message
        assert!(matches!(
            MessageRepr::parse(&bad),
            Err(WireError::Malformed { .. })
        ));
        let short_connect = [0x01, 0x03, 0x22, 0x63, 0x0a, 0x02, 0, 80, 0, 0, 0, 0];
        assert!(matches!(
            MessageRepr::parse(&short_connect),
            Err(WireError::Malformed { offset: 4, .. })
        ));
        assert_eq!(
            MessageRepr::parse(&[1, 0, 0x22, 0x63]),
            Err(malformed(1, "Total Length is zero"))
        );
    }

    #[test]
    fn unknown_tlvs_are_kept_for_an_unsupported_message_answer() {
        let bytes = [0x01, 0x02, 0x22, 0x63, 0xc8, 0x01, 0xaa, 0xbb];
        let (message, _) = complete(&bytes);
        assert_eq!(
            message.tlvs,
            vec![TlvRepr::Unknown {
                kind: 0xc8,
                value: vec![0xaa, 0xbb]
            }]
        );
        assert_eq!(message.to_bytes().expect("emit"), bytes);
    }

    #[test]
    fn tcp_option_lists() {
        assert_eq!(tcp_options(&[1, 1, 0, 9, 9]), Ok(vec![]));
        assert_eq!(tcp_options(&[4, 2, 1, 0]).expect("ok")[0].kind, 4);
        assert_eq!(tcp_options(&[2, 4, 5]), Err(0));
        assert_eq!(tcp_options(&[1, 2, 1]), Err(1));
    }

    fn tlv_strategy() -> impl Strategy<Value = TlvRepr> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..40);
        prop_oneof![
            Just(TlvRepr::Info),
            (any::<[u8; 16]>(), any::<u16>(), bytes()).prop_map(|(a, port, options)| {
                TlvRepr::connect(
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port),
                    &options,
                )
            }),
            bytes().prop_map(|b| TlvRepr::extended_tcp_header(&b)),
            bytes().prop_map(|b| TlvRepr::supported(&b)),
            bytes().prop_map(|b| TlvRepr::cookie(&b)),
            (any::<u8>(), bytes()).prop_map(|(c, v)| TlvRepr::error(ErrorCode::from_code(c), &v)),
        ]
    }

    proptest! {
        /// Whatever is built parses back to itself, and whatever parses re-emits to the same bytes.
        #[test]
        fn built_messages_round_trip(tlvs in proptest::collection::vec(tlv_strategy(), 0..6)) {
            let message = MessageRepr::new(tlvs);
            let bytes = message.to_bytes().expect("under 1020 bytes");
            let Ok(Parsed::Complete { message: parsed, len }) = MessageRepr::parse(&bytes) else {
                panic!("does not parse: {bytes:?}");
            };
            prop_assert_eq!(len, bytes.len());
            // IPv4-mapped Connect addresses stay IPv6 in the repr; equality is exact.
            prop_assert_eq!(parsed, message);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_reparse_the_same(bytes in proptest::collection::vec(any::<u8>(), 0..1100)) {
            if let Ok(Parsed::Complete { message, .. }) = MessageRepr::parse(&bytes) {
                let emitted = message.to_bytes().expect("parsed messages fit");
                let Ok(Parsed::Complete { message: again, .. }) = MessageRepr::parse(&emitted) else {
                    panic!("re-emitted message does not parse");
                };
                prop_assert_eq!(again, message);
            }
        }
    }
}
