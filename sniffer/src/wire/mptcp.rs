//! The MPTCP TCP option (kind 30): every subtype of RFC 8684 (MPTCP v1) and the RFC 6824 (v0)
//! forms that differ (MP_CAPABLE v0 with the checksum flag, ADD_ADDR v0 with its IP-version field,
//! MP_PRIO v0 with an address id).
//!
//! [`Packet`] is a zero-copy view over the bytes of one option (kind and length bytes included);
//! [`MptcpRepr`] is its owned, high-level representation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

/// TCP option kind of MPTCP.
pub const OPTION_KIND: u8 = 30;

/// The largest option a TCP header can carry (40 bytes of options area).
pub const MAX_OPTION_LEN: usize = 40;

/// Byte offsets of the option's fields. Offsets count from the option's kind byte.
pub mod field {
    /// A range of bytes.
    pub type Field = core::ops::Range<usize>;

    /// Option kind (always 30).
    pub const KIND: usize = 0;
    /// Option length, kind and length bytes included.
    pub const LENGTH: usize = 1;
    /// Subtype in the high nibble; version, flags or IP version in the low nibble.
    pub const SUBTYPE: usize = 2;
    /// The fourth byte: MP_CAPABLE and DSS flags, address ids, MP_TCPRST reason.
    pub const FOURTH: usize = 3;
    /// Smallest possible option: kind, length, subtype.
    pub const MIN_LEN: usize = 3;

    /// MP_CAPABLE: sender's key.
    pub const CAPABLE_SENDER_KEY: Field = 4..12;
    /// MP_CAPABLE: receiver's key (third ACK and first data).
    pub const CAPABLE_RECEIVER_KEY: Field = 12..20;
    /// MP_CAPABLE: data-level length (v1 with data).
    pub const CAPABLE_DATA_LEN: Field = 20..22;
    /// MP_CAPABLE: DSS checksum (v1 with data, checksums negotiated).
    pub const CAPABLE_CHECKSUM: Field = 22..24;

    /// MP_JOIN: address id (SYN and SYN-ACK).
    pub const JOIN_ADDRESS_ID: usize = 3;
    /// MP_JOIN SYN: receiver's token.
    pub const JOIN_SYN_TOKEN: Field = 4..8;
    /// MP_JOIN SYN: sender's random number.
    pub const JOIN_SYN_NONCE: Field = 8..12;
    /// MP_JOIN SYN-ACK: sender's truncated (leftmost 64 bits) HMAC.
    pub const JOIN_SYNACK_HMAC: Field = 4..12;
    /// MP_JOIN SYN-ACK: sender's random number.
    pub const JOIN_SYNACK_NONCE: Field = 12..16;
    /// MP_JOIN third ACK: sender's HMAC (leftmost 160 bits).
    pub const JOIN_ACK_HMAC: Field = 4..24;

    /// DSS: flags byte.
    pub const DSS_FLAGS: usize = 3;
    /// DSS: start of the variable part (data ACK, then mapping).
    pub const DSS_VARIABLE: usize = 4;

    /// ADD_ADDR: address id.
    pub const ADD_ADDR_ID: usize = 3;
    /// ADD_ADDR: start of the address.
    pub const ADD_ADDR_ADDRESS: usize = 4;

    /// REMOVE_ADDR: start of the list of address ids.
    pub const REMOVE_ADDR_IDS: usize = 3;

    /// MP_PRIO v0: address id.
    pub const PRIO_ADDRESS_ID: usize = 3;

    /// MP_FAIL: 64-bit data sequence number.
    pub const FAIL_DSN: Field = 4..12;

    /// MP_FASTCLOSE: receiver's key.
    pub const FASTCLOSE_RECEIVER_KEY: Field = 4..12;

    /// MP_TCPRST: reason code.
    pub const TCPRST_REASON: usize = 3;
}

/// MP_CAPABLE flag A: checksum required.
pub const CAPABLE_FLAG_CHECKSUM: u8 = 0x80;
/// MP_CAPABLE flag H (v1: HMAC-SHA256, v0: HMAC-SHA1).
pub const CAPABLE_FLAG_HMAC: u8 = 0x01;
/// DSS flag A: data ACK present.
pub const DSS_FLAG_DATA_ACK: u8 = 0x01;
/// DSS flag a: data ACK is 8 octets.
pub const DSS_FLAG_DATA_ACK_64: u8 = 0x02;
/// DSS flag M: mapping (DSN, subflow sequence number, data-level length, checksum) present.
pub const DSS_FLAG_MAPPING: u8 = 0x04;
/// DSS flag m: DSN is 8 octets.
pub const DSS_FLAG_DSN_64: u8 = 0x08;
/// DSS flag F: DATA_FIN.
pub const DSS_FLAG_DATA_FIN: u8 = 0x10;
/// MP_TCPRST flag T: the error is transient.
pub const TCPRST_FLAG_TRANSIENT: u8 = 0x01;

/// The MPTCP option subtypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subtype {
    /// 0x0: MP_CAPABLE.
    MpCapable,
    /// 0x1: MP_JOIN.
    MpJoin,
    /// 0x2: DSS.
    Dss,
    /// 0x3: ADD_ADDR.
    AddAddr,
    /// 0x4: REMOVE_ADDR.
    RemoveAddr,
    /// 0x5: MP_PRIO.
    MpPrio,
    /// 0x6: MP_FAIL.
    MpFail,
    /// 0x7: MP_FASTCLOSE.
    MpFastclose,
    /// 0x8: MP_TCPRST.
    MpTcpRst,
}

impl Subtype {
    /// Every subtype, in wire order.
    pub const ALL: [Subtype; 9] = [
        Subtype::MpCapable,
        Subtype::MpJoin,
        Subtype::Dss,
        Subtype::AddAddr,
        Subtype::RemoveAddr,
        Subtype::MpPrio,
        Subtype::MpFail,
        Subtype::MpFastclose,
        Subtype::MpTcpRst,
    ];

    /// The subtype of a 4-bit wire value, if assigned.
    pub fn from_wire(value: u8) -> Option<Subtype> {
        Subtype::ALL.get(usize::from(value)).copied()
    }

    /// The 4-bit wire value.
    pub fn wire_value(self) -> u8 {
        self as u8
    }

    /// The snake_case name used in JSON output (`mp_capable`, `dss`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Subtype::MpCapable => "mp_capable",
            Subtype::MpJoin => "mp_join",
            Subtype::Dss => "dss",
            Subtype::AddAddr => "add_addr",
            Subtype::RemoveAddr => "remove_addr",
            Subtype::MpPrio => "mp_prio",
            Subtype::MpFail => "mp_fail",
            Subtype::MpFastclose => "mp_fastclose",
            Subtype::MpTcpRst => "mp_tcprst",
        }
    }
}

/// Why bytes are not a well-formed MPTCP option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum MptcpError {
    /// The buffer is shorter than the 3-byte minimum or than the option's length field.
    #[error("MPTCP option truncated: {available} bytes available, {needed} needed")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The option kind is not 30.
    #[error("TCP option kind {0} is not MPTCP (30)")]
    NotMptcp(u8),
    /// The subtype is not assigned (or is MP_EXPERIMENTAL, 0xf).
    #[error("unknown MPTCP subtype {0:#x}")]
    UnknownSubtype(u8),
    /// The length is not valid for this subtype (and its flags).
    #[error("invalid length {length} for MPTCP {} option", subtype.name())]
    BadLength {
        /// The subtype.
        subtype: Subtype,
        /// The option's length field.
        length: u8,
    },
}

/// How wide a data sequence number or data ACK is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeqNumber {
    /// 4 octets: the low 32 bits of the 64-bit number.
    Bits32(u32),
    /// 8 octets.
    Bits64(u64),
}

impl SeqNumber {
    /// The raw value as carried on the wire.
    pub fn value(self) -> u64 {
        match self {
            SeqNumber::Bits32(value) => u64::from(value),
            SeqNumber::Bits64(value) => value,
        }
    }

    fn wire_len(self) -> usize {
        match self {
            SeqNumber::Bits32(_) => 4,
            SeqNumber::Bits64(_) => 8,
        }
    }
}

/// Where the variable fields of a DSS option sit, computed from its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DssLayout {
    data_ack: Option<(usize, usize)>,
    dsn: Option<(usize, usize)>,
    subflow_seq: usize,
    data_len: usize,
    checksum: Option<usize>,
}

impl DssLayout {
    fn new(flags: u8, length: usize) -> Option<DssLayout> {
        let mut offset = field::DSS_VARIABLE;
        let data_ack = if flags & DSS_FLAG_DATA_ACK != 0 {
            let width = if flags & DSS_FLAG_DATA_ACK_64 != 0 {
                8
            } else {
                4
            };
            offset += width;
            Some((offset - width, width))
        } else {
            None
        };
        if flags & DSS_FLAG_MAPPING == 0 {
            return (length == offset).then_some(DssLayout {
                data_ack,
                dsn: None,
                subflow_seq: 0,
                data_len: 0,
                checksum: None,
            });
        }
        let width = if flags & DSS_FLAG_DSN_64 != 0 { 8 } else { 4 };
        let dsn = Some((offset, width));
        let subflow_seq = offset + width;
        let data_len = subflow_seq + 4;
        let end = data_len + 2;
        let checksum = if length == end + 2 {
            Some(end)
        } else if length == end {
            None
        } else {
            return None;
        };
        Some(DssLayout {
            data_ack,
            dsn,
            subflow_seq,
            data_len,
            checksum,
        })
    }
}

/// The shape of an ADD_ADDR option, derived from its length and low nibble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AddAddrLayout {
    v0: bool,
    ipv6: bool,
    port: bool,
    hmac: bool,
}

impl AddAddrLayout {
    fn new(low_nibble: u8, length: usize) -> Option<AddAddrLayout> {
        let v0 = low_nibble == 4 || low_nibble == 6;
        let (ipv6, port, hmac) = match length {
            8 => (false, false, false),
            10 => (false, true, false),
            16 => (false, false, true),
            18 => (false, true, true),
            20 => (true, false, false),
            22 => (true, true, false),
            28 => (true, false, true),
            30 => (true, true, true),
            _ => return None,
        };
        if v0 && (hmac || ipv6 != (low_nibble == 6)) {
            return None;
        }
        Some(AddAddrLayout {
            v0,
            ipv6,
            port,
            hmac,
        })
    }

    fn address_len(self) -> usize {
        if self.ipv6 {
            16
        } else {
            4
        }
    }
}

fn read_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(word)
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(word)
}

/// A read/write view of one MPTCP option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it; accessors may panic on malformed bytes.
    pub fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps untrusted bytes, checking that every accessor of the option's subtype is in bounds.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, MptcpError> {
        let packet = Packet::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks the kind, the length field against the buffer and the length against the subtype.
    pub fn check_len(&self) -> Result<(), MptcpError> {
        let bytes = self.buffer.as_ref();
        if bytes.len() < field::MIN_LEN {
            return Err(MptcpError::Truncated {
                needed: field::MIN_LEN,
                available: bytes.len(),
            });
        }
        if bytes[field::KIND] != OPTION_KIND {
            return Err(MptcpError::NotMptcp(bytes[field::KIND]));
        }
        let length = usize::from(bytes[field::LENGTH]);
        if length > bytes.len() {
            return Err(MptcpError::Truncated {
                needed: length,
                available: bytes.len(),
            });
        }
        let subtype = self.subtype()?;
        let bad = MptcpError::BadLength {
            subtype,
            length: bytes[field::LENGTH],
        };
        let valid = match subtype {
            Subtype::MpCapable => matches!(length, 4 | 12 | 20 | 22 | 24),
            Subtype::MpJoin => matches!(length, 12 | 16 | 24),
            Subtype::Dss => {
                length > field::DSS_FLAGS
                    && DssLayout::new(bytes[field::DSS_FLAGS], length).is_some()
            }
            Subtype::AddAddr => AddAddrLayout::new(self.low_nibble(), length).is_some(),
            Subtype::RemoveAddr => length > field::REMOVE_ADDR_IDS,
            Subtype::MpPrio => matches!(length, 3 | 4),
            Subtype::MpFail | Subtype::MpFastclose => length == 12,
            Subtype::MpTcpRst => length == 4,
        };
        if valid {
            Ok(())
        } else {
            Err(bad)
        }
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    /// The option kind (30 for MPTCP).
    pub fn kind(&self) -> u8 {
        self.bytes()[field::KIND]
    }

    /// The option length field.
    pub fn option_len(&self) -> u8 {
        self.bytes()[field::LENGTH]
    }

    /// The raw 4-bit subtype.
    pub fn subtype_value(&self) -> u8 {
        self.bytes()[field::SUBTYPE] >> 4
    }

    /// The subtype, or an error for unassigned values.
    pub fn subtype(&self) -> Result<Subtype, MptcpError> {
        let value = self.subtype_value();
        Subtype::from_wire(value).ok_or(MptcpError::UnknownSubtype(value))
    }

    /// The low nibble of the subtype byte: MP_CAPABLE version, MP_JOIN/MP_PRIO flags,
    /// ADD_ADDR v0 IP version or v1 flags, MP_TCPRST flags.
    pub fn low_nibble(&self) -> u8 {
        self.bytes()[field::SUBTYPE] & 0x0f
    }

    /// The whole subtype byte (subtype and low nibble), as Wireshark shows MP_JOIN, MP_PRIO
    /// and MP_TCPRST flags.
    pub fn subtype_byte(&self) -> u8 {
        self.bytes()[field::SUBTYPE]
    }

    /// The fourth byte: MP_CAPABLE or DSS flags, MP_JOIN/ADD_ADDR/MP_PRIO address id,
    /// MP_TCPRST reason.
    pub fn fourth_byte(&self) -> u8 {
        self.bytes()[field::FOURTH]
    }

    /// MP_CAPABLE: the MPTCP version.
    pub fn capable_version(&self) -> u8 {
        self.low_nibble()
    }

    /// MP_CAPABLE: the flags byte (A, B, C, D..H).
    pub fn capable_flags(&self) -> u8 {
        self.fourth_byte()
    }

    /// MP_CAPABLE: the sender's key (options of 12 bytes or more).
    pub fn capable_sender_key(&self) -> u64 {
        read_u64(self.bytes(), field::CAPABLE_SENDER_KEY.start)
    }

    /// MP_CAPABLE: the receiver's key (options of 20 bytes or more).
    pub fn capable_receiver_key(&self) -> u64 {
        read_u64(self.bytes(), field::CAPABLE_RECEIVER_KEY.start)
    }

    /// MP_CAPABLE: the data-level length (options of 22 bytes or more).
    pub fn capable_data_len(&self) -> u16 {
        read_u16(self.bytes(), field::CAPABLE_DATA_LEN.start)
    }

    /// MP_CAPABLE: the checksum (24-byte options).
    pub fn capable_checksum(&self) -> u16 {
        read_u16(self.bytes(), field::CAPABLE_CHECKSUM.start)
    }

    /// MP_JOIN SYN/SYN-ACK and MP_PRIO: the backup flag.
    pub fn backup(&self) -> bool {
        self.low_nibble() & 0x01 != 0
    }

    /// MP_JOIN SYN/SYN-ACK: the address id.
    pub fn join_address_id(&self) -> u8 {
        self.bytes()[field::JOIN_ADDRESS_ID]
    }

    /// MP_JOIN SYN: the receiver's token.
    pub fn join_token(&self) -> u32 {
        read_u32(self.bytes(), field::JOIN_SYN_TOKEN.start)
    }

    /// MP_JOIN SYN: the sender's random number.
    pub fn join_syn_nonce(&self) -> u32 {
        read_u32(self.bytes(), field::JOIN_SYN_NONCE.start)
    }

    /// MP_JOIN SYN-ACK: the truncated HMAC.
    pub fn join_synack_hmac(&self) -> u64 {
        read_u64(self.bytes(), field::JOIN_SYNACK_HMAC.start)
    }

    /// MP_JOIN SYN-ACK: the sender's random number.
    pub fn join_synack_nonce(&self) -> u32 {
        read_u32(self.bytes(), field::JOIN_SYNACK_NONCE.start)
    }

    /// MP_JOIN third ACK: the 160-bit HMAC.
    pub fn join_ack_hmac(&self) -> [u8; 20] {
        let mut hmac = [0; 20];
        hmac.copy_from_slice(&self.bytes()[field::JOIN_ACK_HMAC]);
        hmac
    }

    /// DSS: the flags byte.
    pub fn dss_flags(&self) -> u8 {
        self.fourth_byte()
    }

    fn dss_layout(&self) -> DssLayout {
        DssLayout::new(self.dss_flags(), usize::from(self.option_len())).unwrap_or(DssLayout {
            data_ack: None,
            dsn: None,
            subflow_seq: 0,
            data_len: 0,
            checksum: None,
        })
    }

    fn read_seq(&self, at: (usize, usize)) -> SeqNumber {
        match at {
            (offset, 8) => SeqNumber::Bits64(read_u64(self.bytes(), offset)),
            (offset, _) => SeqNumber::Bits32(read_u32(self.bytes(), offset)),
        }
    }

    /// DSS: the data ACK, if present.
    pub fn dss_data_ack(&self) -> Option<SeqNumber> {
        self.dss_layout().data_ack.map(|at| self.read_seq(at))
    }

    /// DSS: the data sequence number, if a mapping is present.
    pub fn dss_dsn(&self) -> Option<SeqNumber> {
        self.dss_layout().dsn.map(|at| self.read_seq(at))
    }

    /// DSS: the mapping (DSN, subflow sequence number, data-level length, checksum), if present.
    pub fn dss_mapping(&self) -> Option<DssMapping> {
        let layout = self.dss_layout();
        let dsn = self.read_seq(layout.dsn?);
        Some(DssMapping {
            dsn,
            subflow_seq: read_u32(self.bytes(), layout.subflow_seq),
            data_len: read_u16(self.bytes(), layout.data_len),
            checksum: layout.checksum.map(|at| read_u16(self.bytes(), at)),
        })
    }

    /// DSS: the DATA_FIN flag.
    pub fn dss_data_fin(&self) -> bool {
        self.dss_flags() & DSS_FLAG_DATA_FIN != 0
    }

    fn add_addr_layout(&self) -> Option<AddAddrLayout> {
        AddAddrLayout::new(self.low_nibble(), usize::from(self.option_len()))
    }

    /// ADD_ADDR: whether this is the RFC 6824 (v0) form, with an IP-version nibble.
    pub fn add_addr_is_v0(&self) -> bool {
        self.add_addr_layout().is_some_and(|layout| layout.v0)
    }

    /// ADD_ADDR v1: the echo flag (E).
    pub fn add_addr_echo(&self) -> bool {
        !self.add_addr_is_v0() && self.low_nibble() & 0x01 != 0
    }

    /// ADD_ADDR: the address id.
    pub fn add_addr_id(&self) -> u8 {
        self.bytes()[field::ADD_ADDR_ID]
    }

    /// ADD_ADDR: the advertised address.
    pub fn add_addr_address(&self) -> IpAddr {
        let at = field::ADD_ADDR_ADDRESS;
        match self.add_addr_layout() {
            Some(layout) if layout.ipv6 => {
                let mut octets = [0; 16];
                octets.copy_from_slice(&self.bytes()[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            }
            _ => IpAddr::V4(Ipv4Addr::from(read_u32(self.bytes(), at))),
        }
    }

    /// ADD_ADDR: the advertised port, if present.
    pub fn add_addr_port(&self) -> Option<u16> {
        let layout = self.add_addr_layout()?;
        layout
            .port
            .then(|| read_u16(self.bytes(), field::ADD_ADDR_ADDRESS + layout.address_len()))
    }

    /// ADD_ADDR v1: the truncated HMAC, if present.
    pub fn add_addr_hmac(&self) -> Option<u64> {
        let layout = self.add_addr_layout()?;
        let at = field::ADD_ADDR_ADDRESS + layout.address_len() + if layout.port { 2 } else { 0 };
        layout.hmac.then(|| read_u64(self.bytes(), at))
    }

    /// REMOVE_ADDR: the list of address ids.
    pub fn remove_addr_ids(&self) -> &[u8] {
        &self.bytes()[field::REMOVE_ADDR_IDS..usize::from(self.option_len())]
    }

    /// MP_PRIO v0: the address id, if present (4-byte form).
    pub fn prio_address_id(&self) -> Option<u8> {
        (self.option_len() == 4).then(|| self.bytes()[field::PRIO_ADDRESS_ID])
    }

    /// MP_FAIL: the 64-bit data sequence number.
    pub fn fail_dsn(&self) -> u64 {
        read_u64(self.bytes(), field::FAIL_DSN.start)
    }

    /// MP_FASTCLOSE: the receiver's key.
    pub fn fastclose_receiver_key(&self) -> u64 {
        read_u64(self.bytes(), field::FASTCLOSE_RECEIVER_KEY.start)
    }

    /// MP_TCPRST: the U, V, W, T flags (low nibble).
    pub fn tcprst_flags(&self) -> u8 {
        self.low_nibble()
    }

    /// MP_TCPRST: the reason code.
    pub fn tcprst_reason(&self) -> u8 {
        self.bytes()[field::TCPRST_REASON]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// Writes the kind, length and subtype byte (subtype in the high nibble).
    pub fn set_header(&mut self, length: u8, subtype: Subtype, low_nibble: u8) {
        let bytes = self.bytes_mut();
        bytes[field::KIND] = OPTION_KIND;
        bytes[field::LENGTH] = length;
        bytes[field::SUBTYPE] = (subtype.wire_value() << 4) | (low_nibble & 0x0f);
    }

    /// Writes the fourth byte (flags, address id or reason depending on the subtype).
    pub fn set_fourth_byte(&mut self, value: u8) {
        self.bytes_mut()[field::FOURTH] = value;
    }

    /// Writes a big-endian 16-bit value at `at`.
    pub fn set_u16(&mut self, at: usize, value: u16) {
        self.bytes_mut()[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }

    /// Writes a big-endian 32-bit value at `at`.
    pub fn set_u32(&mut self, at: usize, value: u32) {
        self.bytes_mut()[at..at + 4].copy_from_slice(&value.to_be_bytes());
    }

    /// Writes a big-endian 64-bit value at `at`.
    pub fn set_u64(&mut self, at: usize, value: u64) {
        self.bytes_mut()[at..at + 8].copy_from_slice(&value.to_be_bytes());
    }

    /// Copies `value` to `at`.
    pub fn set_bytes(&mut self, at: usize, value: &[u8]) {
        self.bytes_mut()[at..at + value.len()].copy_from_slice(value);
    }

    fn set_seq(&mut self, at: usize, value: SeqNumber) {
        match value {
            SeqNumber::Bits32(value) => self.set_u32(at, value),
            SeqNumber::Bits64(value) => self.set_u64(at, value),
        }
    }
}

/// MP_CAPABLE. Present fields depend on the handshake step: SYN (v1: none; v0: sender key),
/// SYN-ACK (sender key), third ACK (both keys), first data in v1 (both keys and the
/// data-level length, plus the checksum when checksums are in use).
///
/// Invariant: each field requires the previous one (`receiver_key` requires `sender_key`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MpCapableRepr {
    /// MPTCP version: 0 (RFC 6824) or 1 (RFC 8684).
    pub version: u8,
    /// Flags byte: A (checksum required, 0x80), B, C, D..G, H (HMAC algorithm, 0x01).
    pub flags: u8,
    /// The sender's 64-bit key.
    pub sender_key: Option<u64>,
    /// The receiver's 64-bit key.
    pub receiver_key: Option<u64>,
    /// Data-level length of the data carried with the option.
    pub data_len: Option<u16>,
    /// DSS checksum of that data.
    pub checksum: Option<u16>,
}

impl MpCapableRepr {
    /// Whether the A flag (checksum required) is set.
    pub fn checksum_required(&self) -> bool {
        self.flags & CAPABLE_FLAG_CHECKSUM != 0
    }

    fn wire_len(&self) -> usize {
        if self.checksum.is_some() {
            24
        } else if self.data_len.is_some() {
            22
        } else if self.receiver_key.is_some() {
            20
        } else if self.sender_key.is_some() {
            12
        } else {
            4
        }
    }
}

/// MP_JOIN, in its three handshake forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MpJoinRepr {
    /// SYN: the receiver's token and the sender's random number.
    Syn {
        /// The backup flag.
        backup: bool,
        /// The sender's address id.
        address_id: u8,
        /// The receiver's token.
        token: u32,
        /// The sender's random number.
        nonce: u32,
    },
    /// SYN-ACK: the leftmost 64 bits of the sender's HMAC and its random number.
    SynAck {
        /// The backup flag.
        backup: bool,
        /// The sender's address id.
        address_id: u8,
        /// Truncated HMAC.
        hmac: u64,
        /// The sender's random number.
        nonce: u32,
    },
    /// Third ACK: the leftmost 160 bits of the sender's HMAC.
    Ack {
        /// The HMAC.
        hmac: [u8; 20],
    },
}

/// The DSS mapping part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DssMapping {
    /// Data sequence number (raw, 32 or 64 bits).
    pub dsn: SeqNumber,
    /// Subflow sequence number (relative to the subflow's initial sequence number).
    pub subflow_seq: u32,
    /// Data-level length (0 means an infinite mapping).
    pub data_len: u16,
    /// DSS checksum, when checksums are in use.
    pub checksum: Option<u16>,
}

/// DSS: data sequence signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DssRepr {
    /// The DATA_FIN flag.
    pub data_fin: bool,
    /// The data ACK (raw, 32 or 64 bits).
    pub data_ack: Option<SeqNumber>,
    /// The mapping.
    pub mapping: Option<DssMapping>,
}

impl DssRepr {
    /// The flags byte this option is emitted with.
    pub fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.data_fin {
            flags |= DSS_FLAG_DATA_FIN;
        }
        if let Some(ack) = self.data_ack {
            flags |= DSS_FLAG_DATA_ACK;
            if matches!(ack, SeqNumber::Bits64(_)) {
                flags |= DSS_FLAG_DATA_ACK_64;
            }
        }
        if let Some(mapping) = self.mapping {
            flags |= DSS_FLAG_MAPPING;
            if matches!(mapping.dsn, SeqNumber::Bits64(_)) {
                flags |= DSS_FLAG_DSN_64;
            }
        }
        flags
    }

    fn wire_len(&self) -> usize {
        let ack = self.data_ack.map_or(0, SeqNumber::wire_len);
        let mapping = self.mapping.map_or(0, |mapping| {
            mapping.dsn.wire_len() + 4 + 2 + if mapping.checksum.is_some() { 2 } else { 0 }
        });
        field::DSS_VARIABLE + ack + mapping
    }
}

/// Which protocol version an ADD_ADDR uses, and the v1-only fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddAddrForm {
    /// RFC 6824: the low nibble carries the IP version; no HMAC.
    V0,
    /// RFC 8684.
    V1 {
        /// The echo flag (E): this option acknowledges an ADD_ADDR.
        echo: bool,
        /// The truncated HMAC (absent in echoes).
        hmac: Option<u64>,
    },
}

/// ADD_ADDR: announce an additional address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddAddrRepr {
    /// The address id.
    pub address_id: u8,
    /// The address.
    pub address: IpAddr,
    /// The port, if announced.
    pub port: Option<u16>,
    /// v0 or v1 fields.
    pub form: AddAddrForm,
}

impl AddAddrRepr {
    fn wire_len(&self) -> usize {
        let address = if self.address.is_ipv6() { 16 } else { 4 };
        let port = if self.port.is_some() { 2 } else { 0 };
        let hmac = match self.form {
            AddAddrForm::V1 { hmac: Some(_), .. } => 8,
            _ => 0,
        };
        field::ADD_ADDR_ADDRESS + address + port + hmac
    }

    /// Whether this is an echo (v1 E flag).
    pub fn echo(&self) -> bool {
        matches!(self.form, AddAddrForm::V1 { echo: true, .. })
    }

    /// The truncated HMAC, if present.
    pub fn hmac(&self) -> Option<u64> {
        match self.form {
            AddAddrForm::V1 { hmac, .. } => hmac,
            AddAddrForm::V0 => None,
        }
    }
}

/// The most address ids one REMOVE_ADDR can carry (40-byte option).
pub const MAX_REMOVED_IDS: usize = MAX_OPTION_LEN - field::REMOVE_ADDR_IDS;

/// REMOVE_ADDR: withdraw one or more address ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoveAddrRepr {
    ids: [u8; MAX_REMOVED_IDS],
    count: u8,
}

impl RemoveAddrRepr {
    /// A REMOVE_ADDR for `ids`; `None` when the list is empty or longer than
    /// [`MAX_REMOVED_IDS`].
    pub fn new(ids: &[u8]) -> Option<RemoveAddrRepr> {
        if ids.is_empty() || ids.len() > MAX_REMOVED_IDS {
            return None;
        }
        let mut repr = RemoveAddrRepr {
            ids: [0; MAX_REMOVED_IDS],
            count: ids.len() as u8,
        };
        repr.ids[..ids.len()].copy_from_slice(ids);
        Some(repr)
    }

    /// The withdrawn address ids.
    pub fn address_ids(&self) -> &[u8] {
        &self.ids[..usize::from(self.count)]
    }
}

/// MP_PRIO: change the backup priority of a subflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MpPrioRepr {
    /// The backup flag.
    pub backup: bool,
    /// v0 only: the address id the change applies to.
    pub address_id: Option<u8>,
}

/// MP_FAIL: fall back to regular TCP after a checksum failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MpFailRepr {
    /// The 64-bit data sequence number of the failed data.
    pub dsn: u64,
}

/// MP_FASTCLOSE: abruptly close the whole MPTCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MpFastcloseRepr {
    /// The key of the option's receiver.
    pub receiver_key: u64,
}

/// MP_TCPRST: why a subflow was reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MpTcpRstRepr {
    /// The U, V, W, T flags (low nibble; T = transient = 0x1).
    pub flags: u8,
    /// Reason code (0 unspecified, 1 MPTCP-specific, 2 lack of resources, ...).
    pub reason: u8,
}

impl MpTcpRstRepr {
    /// Whether the T (transient) flag is set.
    pub fn transient(&self) -> bool {
        self.flags & TCPRST_FLAG_TRANSIENT != 0
    }
}

/// One MPTCP option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MptcpRepr {
    /// MP_CAPABLE.
    MpCapable(MpCapableRepr),
    /// MP_JOIN.
    MpJoin(MpJoinRepr),
    /// DSS.
    Dss(DssRepr),
    /// ADD_ADDR.
    AddAddr(AddAddrRepr),
    /// REMOVE_ADDR.
    RemoveAddr(RemoveAddrRepr),
    /// MP_PRIO.
    MpPrio(MpPrioRepr),
    /// MP_FAIL.
    MpFail(MpFailRepr),
    /// MP_FASTCLOSE.
    MpFastclose(MpFastcloseRepr),
    /// MP_TCPRST.
    MpTcpRst(MpTcpRstRepr),
}

impl MptcpRepr {
    /// Parses a checked option.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&T>) -> Result<MptcpRepr, MptcpError> {
        packet.check_len()?;
        let length = usize::from(packet.option_len());
        let repr = match packet.subtype()? {
            Subtype::MpCapable => MptcpRepr::MpCapable(MpCapableRepr {
                version: packet.capable_version(),
                flags: packet.capable_flags(),
                sender_key: (length >= 12).then(|| packet.capable_sender_key()),
                receiver_key: (length >= 20).then(|| packet.capable_receiver_key()),
                data_len: (length >= 22).then(|| packet.capable_data_len()),
                checksum: (length >= 24).then(|| packet.capable_checksum()),
            }),
            Subtype::MpJoin => MptcpRepr::MpJoin(match length {
                12 => MpJoinRepr::Syn {
                    backup: packet.backup(),
                    address_id: packet.join_address_id(),
                    token: packet.join_token(),
                    nonce: packet.join_syn_nonce(),
                },
                16 => MpJoinRepr::SynAck {
                    backup: packet.backup(),
                    address_id: packet.join_address_id(),
                    hmac: packet.join_synack_hmac(),
                    nonce: packet.join_synack_nonce(),
                },
                _ => MpJoinRepr::Ack {
                    hmac: packet.join_ack_hmac(),
                },
            }),
            Subtype::Dss => MptcpRepr::Dss(DssRepr {
                data_fin: packet.dss_data_fin(),
                data_ack: packet.dss_data_ack(),
                mapping: packet.dss_mapping(),
            }),
            Subtype::AddAddr => MptcpRepr::AddAddr(AddAddrRepr {
                address_id: packet.add_addr_id(),
                address: packet.add_addr_address(),
                port: packet.add_addr_port(),
                form: if packet.add_addr_is_v0() {
                    AddAddrForm::V0
                } else {
                    AddAddrForm::V1 {
                        echo: packet.add_addr_echo(),
                        hmac: packet.add_addr_hmac(),
                    }
                },
            }),
            Subtype::RemoveAddr => MptcpRepr::RemoveAddr(
                RemoveAddrRepr::new(packet.remove_addr_ids()).ok_or(MptcpError::BadLength {
                    subtype: Subtype::RemoveAddr,
                    length: packet.option_len(),
                })?,
            ),
            Subtype::MpPrio => MptcpRepr::MpPrio(MpPrioRepr {
                backup: packet.backup(),
                address_id: packet.prio_address_id(),
            }),
            Subtype::MpFail => MptcpRepr::MpFail(MpFailRepr {
                dsn: packet.fail_dsn(),
            }),
            Subtype::MpFastclose => MptcpRepr::MpFastclose(MpFastcloseRepr {
                receiver_key: packet.fastclose_receiver_key(),
            }),
            Subtype::MpTcpRst => MptcpRepr::MpTcpRst(MpTcpRstRepr {
                flags: packet.tcprst_flags(),
                reason: packet.tcprst_reason(),
            }),
        };
        Ok(repr)
    }

    /// The subtype.
    pub fn subtype(&self) -> Subtype {
        match self {
            MptcpRepr::MpCapable(_) => Subtype::MpCapable,
            MptcpRepr::MpJoin(_) => Subtype::MpJoin,
            MptcpRepr::Dss(_) => Subtype::Dss,
            MptcpRepr::AddAddr(_) => Subtype::AddAddr,
            MptcpRepr::RemoveAddr(_) => Subtype::RemoveAddr,
            MptcpRepr::MpPrio(_) => Subtype::MpPrio,
            MptcpRepr::MpFail(_) => Subtype::MpFail,
            MptcpRepr::MpFastclose(_) => Subtype::MpFastclose,
            MptcpRepr::MpTcpRst(_) => Subtype::MpTcpRst,
        }
    }

    /// The length of the emitted option, kind and length bytes included.
    pub fn buffer_len(&self) -> usize {
        match self {
            MptcpRepr::MpCapable(repr) => repr.wire_len(),
            MptcpRepr::MpJoin(MpJoinRepr::Syn { .. }) => 12,
            MptcpRepr::MpJoin(MpJoinRepr::SynAck { .. }) => 16,
            MptcpRepr::MpJoin(MpJoinRepr::Ack { .. }) => 24,
            MptcpRepr::Dss(repr) => repr.wire_len(),
            MptcpRepr::AddAddr(repr) => repr.wire_len(),
            MptcpRepr::RemoveAddr(repr) => field::REMOVE_ADDR_IDS + repr.address_ids().len(),
            MptcpRepr::MpPrio(repr) => 3 + usize::from(repr.address_id.is_some()),
            MptcpRepr::MpFail(_) | MptcpRepr::MpFastclose(_) => 12,
            MptcpRepr::MpTcpRst(_) => 4,
        }
    }

    /// Writes the option into `packet`, whose buffer must be at least
    /// [`buffer_len`](Self::buffer_len) bytes long.
    pub fn emit(&self, packet: &mut Packet<&mut [u8]>) {
        let length = self.buffer_len();
        let length_byte = length as u8;
        packet.bytes_mut()[..length].fill(0);
        match self {
            MptcpRepr::MpCapable(repr) => {
                packet.set_header(length_byte, Subtype::MpCapable, repr.version);
                packet.set_fourth_byte(repr.flags);
                let fields = [
                    (repr.sender_key, field::CAPABLE_SENDER_KEY.start),
                    (repr.receiver_key, field::CAPABLE_RECEIVER_KEY.start),
                ];
                for (key, at) in fields {
                    if length > at {
                        packet.set_u64(at, key.unwrap_or(0));
                    }
                }
                if length > field::CAPABLE_DATA_LEN.start {
                    packet.set_u16(field::CAPABLE_DATA_LEN.start, repr.data_len.unwrap_or(0));
                }
                if let Some(checksum) = repr.checksum {
                    packet.set_u16(field::CAPABLE_CHECKSUM.start, checksum);
                }
            }
            MptcpRepr::MpJoin(MpJoinRepr::Syn {
                backup,
                address_id,
                token,
                nonce,
            }) => {
                packet.set_header(length_byte, Subtype::MpJoin, u8::from(*backup));
                packet.set_fourth_byte(*address_id);
                packet.set_u32(field::JOIN_SYN_TOKEN.start, *token);
                packet.set_u32(field::JOIN_SYN_NONCE.start, *nonce);
            }
            MptcpRepr::MpJoin(MpJoinRepr::SynAck {
                backup,
                address_id,
                hmac,
                nonce,
            }) => {
                packet.set_header(length_byte, Subtype::MpJoin, u8::from(*backup));
                packet.set_fourth_byte(*address_id);
                packet.set_u64(field::JOIN_SYNACK_HMAC.start, *hmac);
                packet.set_u32(field::JOIN_SYNACK_NONCE.start, *nonce);
            }
            MptcpRepr::MpJoin(MpJoinRepr::Ack { hmac }) => {
                packet.set_header(length_byte, Subtype::MpJoin, 0);
                packet.set_bytes(field::JOIN_ACK_HMAC.start, hmac);
            }
            MptcpRepr::Dss(repr) => {
                packet.set_header(length_byte, Subtype::Dss, 0);
                packet.set_fourth_byte(repr.flags());
                let mut at = field::DSS_VARIABLE;
                if let Some(ack) = repr.data_ack {
                    packet.set_seq(at, ack);
                    at += ack.wire_len();
                }
                if let Some(mapping) = repr.mapping {
                    packet.set_seq(at, mapping.dsn);
                    at += mapping.dsn.wire_len();
                    packet.set_u32(at, mapping.subflow_seq);
                    packet.set_u16(at + 4, mapping.data_len);
                    if let Some(checksum) = mapping.checksum {
                        packet.set_u16(at + 6, checksum);
                    }
                }
            }
            MptcpRepr::AddAddr(repr) => {
                let low_nibble = match repr.form {
                    AddAddrForm::V0 if repr.address.is_ipv6() => 6,
                    AddAddrForm::V0 => 4,
                    AddAddrForm::V1 { echo, .. } => u8::from(echo),
                };
                packet.set_header(length_byte, Subtype::AddAddr, low_nibble);
                packet.set_fourth_byte(repr.address_id);
                let mut at = field::ADD_ADDR_ADDRESS;
                match repr.address {
                    IpAddr::V4(address) => {
                        packet.set_bytes(at, &address.octets());
                        at += 4;
                    }
                    IpAddr::V6(address) => {
                        packet.set_bytes(at, &address.octets());
                        at += 16;
                    }
                }
                if let Some(port) = repr.port {
                    packet.set_u16(at, port);
                    at += 2;
                }
                if let Some(hmac) = repr.hmac() {
                    packet.set_u64(at, hmac);
                }
            }
            MptcpRepr::RemoveAddr(repr) => {
                packet.set_header(length_byte, Subtype::RemoveAddr, 0);
                packet.set_bytes(field::REMOVE_ADDR_IDS, repr.address_ids());
            }
            MptcpRepr::MpPrio(repr) => {
                packet.set_header(length_byte, Subtype::MpPrio, u8::from(repr.backup));
                if let Some(address_id) = repr.address_id {
                    packet.set_fourth_byte(address_id);
                }
            }
            MptcpRepr::MpFail(repr) => {
                packet.set_header(length_byte, Subtype::MpFail, 0);
                packet.set_u64(field::FAIL_DSN.start, repr.dsn);
            }
            MptcpRepr::MpFastclose(repr) => {
                packet.set_header(length_byte, Subtype::MpFastclose, 0);
                packet.set_u64(field::FASTCLOSE_RECEIVER_KEY.start, repr.receiver_key);
            }
            MptcpRepr::MpTcpRst(repr) => {
                packet.set_header(length_byte, Subtype::MpTcpRst, repr.flags);
                packet.set_fourth_byte(repr.reason);
            }
        }
    }

    /// Emits into a new vector (convenience for tests and tools).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = vec![0; self.buffer_len()];
        self.emit(&mut Packet::new_unchecked(&mut bytes[..]));
        bytes
    }

    /// Checks and parses an option from untrusted bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<MptcpRepr, MptcpError> {
        MptcpRepr::parse(&Packet::new_checked(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    fn round_trip(bytes: &[u8]) -> MptcpRepr {
        let repr = MptcpRepr::from_bytes(bytes).unwrap();
        assert_eq!(repr.buffer_len(), bytes.len());
        assert_eq!(repr.to_bytes(), bytes);
        repr
    }

    #[test]
    fn dss_layouts() {
        // A + a + M + m + checksum: 4 + 8 + 8 + 4 + 2 + 2.
        let repr = MptcpRepr::Dss(DssRepr {
            data_fin: true,
            data_ack: Some(SeqNumber::Bits64(1 << 40)),
            mapping: Some(DssMapping {
                dsn: SeqNumber::Bits64(7 << 50),
                subflow_seq: 9,
                data_len: 1,
                checksum: Some(0xbeef),
            }),
        });
        assert_eq!(repr.buffer_len(), 28);
        let bytes = repr.to_bytes();
        assert_eq!(bytes[3], 0x1f);
        assert_eq!(round_trip(&bytes), repr);
    }

    #[test]
    fn rejects_bad_lengths_without_panicking() {
        assert!(matches!(
            MptcpRepr::from_bytes(&hex("1e032000")),
            Err(MptcpError::BadLength {
                subtype: Subtype::Dss,
                length: 3
            })
        ));
        assert!(matches!(
            MptcpRepr::from_bytes(&hex("1e0c1000")),
            Err(MptcpError::Truncated {
                needed: 12,
                available: 4
            })
        ));
        assert!(matches!(
            MptcpRepr::from_bytes(&hex("1e04f000")),
            Err(MptcpError::UnknownSubtype(15))
        ));
        assert!(matches!(
            MptcpRepr::from_bytes(&hex("0204")),
            Err(MptcpError::Truncated { .. })
        ));
        assert!(matches!(
            MptcpRepr::from_bytes(&hex("020405b4")),
            Err(MptcpError::NotMptcp(2))
        ));
        assert!(matches!(
            MptcpRepr::from_bytes(&hex("1e0a3401c0a80001")),
            Err(MptcpError::Truncated { .. })
        ));
        assert!(matches!(
            MptcpRepr::from_bytes(&hex("1e0a3401c0a800010000")),
            Ok(MptcpRepr::AddAddr(AddAddrRepr {
                form: AddAddrForm::V0,
                port: Some(0),
                ..
            }))
        ));
    }

    #[test]
    fn tcprst_transient() {
        let repr = round_trip(&hex("1e04810 1".replace(' ', "").as_str()));
        let MptcpRepr::MpTcpRst(rst) = repr else {
            panic!("{repr:?}")
        };
        assert!(rst.transient());
        assert_eq!(rst.reason, 1);
    }
}
