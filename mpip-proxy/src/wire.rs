//! The Control Message (CM) block: wire format, zero-copy view and owned representation.
//!
//! The layout is specified in `PROTOCOL.md`. In short: the CM block leads the UDP
//! payload of the encapsulation, the inner IP packet follows it. The fixed part is
//! [`FIXED_LEN`] = 25 bytes; a variable Local IP Address List follows, announced by
//! the last byte of the fixed part. A version-2 block ends with the
//! [`AUTH_LEN`]-byte authentication extension (key ID, counter, tag;
//! `PROTOCOL.md` §11). All integers are big-endian.
//!
//! [`CmPacket::new_checked`] is the only entry point for untrusted bytes: once it
//! returned `Ok`, every accessor is in bounds. [`frame`] tells a caller that reads
//! from a byte stream whether it holds a whole CM block yet ("need more bytes" is
//! a [`Framing`] state, not an error).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// CM block format version carried in byte 0: a block without authentication.
pub const VERSION: u8 = 1;

/// Version of a CM block that ends with the authentication extension.
pub const VERSION_AUTH: u8 = 2;

/// Length of the authentication extension: key ID (1), counter (8), tag (16).
pub const AUTH_LEN: usize = 1 + 8 + AUTH_TAG_LEN;

/// Length of the authentication tag: HMAC-SHA-256 truncated to 128 bits.
pub const AUTH_TAG_LEN: usize = 16;

/// Offsets inside the authentication extension.
pub mod auth_field {
    use super::field::Field;

    /// Key ID (u8).
    pub const KEY_ID: usize = 0;
    /// The sender's counter (u64), strictly increasing over its lifetime.
    pub const COUNTER: Field = 1..9;
    /// The tag.
    pub const TAG: Field = 9..25;
}

/// Length of the fixed part of the CM block, as in the paper (§III-B).
pub const FIXED_LEN: usize = 25;

/// Most entries a Local IP Address List may carry.
pub const MAX_ADDRESSES: usize = 16;

/// Length of an IPv4 address-list entry: kind, port, address.
pub const ADDRESS_ENTRY_V4_LEN: usize = 1 + 2 + 4;

/// Length of an IPv6 address-list entry: kind, port, address.
pub const ADDRESS_ENTRY_V6_LEN: usize = 1 + 2 + 16;

/// Address-list entry kind for IPv4.
pub const ADDRESS_KIND_V4: u8 = 4;

/// Address-list entry kind for IPv6.
pub const ADDRESS_KIND_V6: u8 = 6;

/// Byte offsets of the fixed part of the CM block.
pub mod field {
    /// A byte range inside the CM block.
    pub type Field = core::ops::Range<usize>;

    /// Format version (u8).
    pub const VERSION: usize = 0;
    /// CM Flags (u8).
    pub const FLAGS: usize = 1;
    /// Source Node ID (6 bytes, a MAC address by default).
    pub const NODE_ID: Field = 2..8;
    /// Session ID (u16).
    pub const SESSION_ID: Field = 8..10;
    /// Path ID chosen by the sender for this packet (u8).
    pub const PATH_ID: usize = 10;
    /// Feedback Path ID: the peer's path the Path Delay belongs to (u8).
    pub const FEEDBACK_PATH_ID: usize = 11;
    /// Packet Timestamp: sender clock, microseconds, low 32 bits (u32).
    pub const TIMESTAMP: Field = 12..16;
    /// Path Delay: one-way delay sample in microseconds (i32).
    pub const PATH_DELAY: Field = 16..20;
    /// Packet Sequence: per session and direction (u32).
    pub const SEQUENCE: Field = 20..24;
    /// Number of Local IP Address List entries (u8).
    pub const ADDRESS_COUNT: usize = 24;
    /// Start of the Local IP Address List.
    pub const ADDRESSES: usize = 25;
}

/// Errors found while checking, parsing or emitting a CM block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The datagram ends inside the CM block.
    #[error("CM block truncated: need {needed} bytes, datagram has {available}")]
    Truncated {
        /// Bytes the CM block needs.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// Byte 0 holds a version this implementation does not speak.
    #[error("unsupported CM block version {0}")]
    BadVersion(u8),
    /// Flag bits reserved in this version are set.
    #[error("reserved CM flag bits set: {0:#04x}")]
    ReservedFlags(u8),
    /// The address count exceeds [`MAX_ADDRESSES`].
    #[error("Local IP Address List length {0} exceeds {MAX_ADDRESSES}")]
    BadAddressCount(usize),
    /// An address-list entry has a kind other than 4 or 6.
    #[error("unknown address-list entry kind {0}")]
    BadAddressKind(u8),
    /// The output buffer is too small for [`CmRepr::emit`].
    #[error("emit buffer too small: need {needed} bytes, have {available}")]
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
}

/// Result of [`frame`]: whether a buffer holds a complete CM block yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// The CM block is complete and `cm_len` bytes long; the inner packet follows.
    Complete {
        /// Length of the CM block, fixed part plus address list.
        cm_len: usize,
    },
    /// At least `needed` bytes in total are required before the block can be judged.
    NeedMore {
        /// Minimum total length to retry with.
        needed: usize,
    },
}

/// Decides whether `buf` starts with a complete, well-formed CM block.
///
/// Checks the version, the reserved flags, the address count and every entry
/// kind as soon as the bytes are there, so malformed input fails early.
pub fn frame(buf: &[u8]) -> Result<Framing, WireError> {
    let mut auth = 0;
    if let Some(&version) = buf.get(field::VERSION) {
        match version {
            VERSION => {}
            VERSION_AUTH => auth = AUTH_LEN,
            other => return Err(WireError::BadVersion(other)),
        }
    }
    if let Some(&flags) = buf.get(field::FLAGS) {
        if flags & !CmFlags::ALL.bits() != 0 {
            return Err(WireError::ReservedFlags(flags & !CmFlags::ALL.bits()));
        }
    }
    if buf.len() < FIXED_LEN {
        return Ok(Framing::NeedMore { needed: FIXED_LEN });
    }
    let count = usize::from(buf[field::ADDRESS_COUNT]);
    if count > MAX_ADDRESSES {
        return Err(WireError::BadAddressCount(count));
    }
    let mut offset = field::ADDRESSES;
    for _ in 0..count {
        let Some(&kind) = buf.get(offset) else {
            return Ok(Framing::NeedMore { needed: offset + 1 });
        };
        let entry_len = match kind {
            ADDRESS_KIND_V4 => ADDRESS_ENTRY_V4_LEN,
            ADDRESS_KIND_V6 => ADDRESS_ENTRY_V6_LEN,
            other => return Err(WireError::BadAddressKind(other)),
        };
        offset += entry_len;
        if buf.len() < offset {
            return Ok(Framing::NeedMore { needed: offset });
        }
    }
    offset += auth;
    if buf.len() < offset {
        return Ok(Framing::NeedMore { needed: offset });
    }
    Ok(Framing::Complete { cm_len: offset })
}

/// CM Flags (byte 1). Bits 6 and 7 are reserved and must be zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct CmFlags(u8);

impl CmFlags {
    /// No flag.
    pub const NONE: CmFlags = CmFlags(0);
    /// Handshake query: "I speak MPIP, confirm if you do" (Flags_Enable).
    pub const ENABLE: CmFlags = CmFlags(0x01);
    /// Handshake confirmation, sent in reply to [`CmFlags::ENABLE`].
    pub const CONFIRM: CmFlags = CmFlags(0x02);
    /// The sender's local addresses changed (Flags_IP_Change).
    pub const IP_CHANGE: CmFlags = CmFlags(0x04);
    /// Heartbeat or path probe: keeps paths and delay feedback fresh; no inner packet.
    pub const HEARTBEAT: CmFlags = CmFlags(0x08);
    /// Feedback Path ID and Path Delay hold a valid delay sample.
    pub const FEEDBACK: CmFlags = CmFlags(0x10);
    /// Protected-path copy: the receiver keeps the first copy of a sequence number.
    pub const DUPLICATE: CmFlags = CmFlags(0x20);
    /// The payload after the CM block is an [`AssignmentPacket`] (tunnel address
    /// given by the proxy end with its `CONFIRM`), not an inner IP packet.
    pub const ASSIGN: CmFlags = CmFlags(0x40);
    /// The inner IPv4 header was left out but its TTL; the receiver rebuilds it from the
    /// session's 5-tuple (`PROTOCOL.md` §9).
    pub const COMPRESSED: CmFlags = CmFlags(0x80);
    /// Every defined flag.
    pub const ALL: CmFlags = CmFlags(0xff);

    /// Flags from raw bits; `None` if a reserved bit is set (version 1
    /// reserves none; the check stays for the next version).
    #[allow(clippy::bad_bit_mask)]
    pub const fn from_bits(bits: u8) -> Option<CmFlags> {
        if bits & !Self::ALL.0 == 0 {
            Some(CmFlags(bits))
        } else {
            None
        }
    }

    /// Flags from raw bits, dropping reserved bits.
    #[allow(clippy::bad_bit_mask)]
    pub const fn from_bits_truncate(bits: u8) -> CmFlags {
        CmFlags(bits & Self::ALL.0)
    }

    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: CmFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of `self` and `other`.
    pub const fn union(self, other: CmFlags) -> CmFlags {
        CmFlags(self.0 | other.0)
    }

    /// `self` without the bits of `other`.
    pub const fn difference(self, other: CmFlags) -> CmFlags {
        CmFlags(self.0 & !other.0)
    }

    /// Sets the bits of `other`.
    pub fn insert(&mut self, other: CmFlags) {
        self.0 |= other.0;
    }

    /// Clears the bits of `other`.
    pub fn remove(&mut self, other: CmFlags) {
        self.0 &= !other.0;
    }
}

impl fmt::Debug for CmFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(CmFlags, &str); 8] = [
            (CmFlags::ENABLE, "ENABLE"),
            (CmFlags::CONFIRM, "CONFIRM"),
            (CmFlags::IP_CHANGE, "IP_CHANGE"),
            (CmFlags::HEARTBEAT, "HEARTBEAT"),
            (CmFlags::FEEDBACK, "FEEDBACK"),
            (CmFlags::DUPLICATE, "DUPLICATE"),
            (CmFlags::ASSIGN, "ASSIGN"),
            (CmFlags::COMPRESSED, "COMPRESSED"),
        ];
        let mut first = true;
        write!(f, "CmFlags(")?;
        for (flag, name) in NAMES {
            if self.contains(flag) {
                if !first {
                    write!(f, "|")?;
                }
                write!(f, "{name}")?;
                first = false;
            }
        }
        write!(f, ")")
    }
}

/// Globally unique node identifier: a MAC address of one of the node's NICs by default.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(pub [u8; 6]);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// Session identifier, unique per pair of nodes. Session 0 is node-level control.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SessionId(pub u16);

impl SessionId {
    /// The node-level control session used by handshakes, heartbeats and probes.
    pub const CONTROL: SessionId = SessionId(0);
}

/// Path identifier, unique on the node that allocated it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PathId(pub u8);

/// A one-way delay sample returned to the peer that sent the measured packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Feedback {
    /// The peer's Path ID of the measured packet.
    pub path_id: PathId,
    /// The sample in microseconds (receiver clock minus sender clock; offset unknown).
    pub delay_us: i32,
}

/// A zero-copy view of a CM block at the start of `buffer`.
#[derive(Debug, Clone)]
pub struct CmPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> CmPacket<T> {
    /// Wraps `buffer` without any check. Accessors may panic on short or malformed
    /// buffers: use [`CmPacket::new_checked`] for bytes from the network.
    pub const fn new_unchecked(buffer: T) -> Self {
        CmPacket { buffer }
    }

    /// Wraps `buffer` after checking that it holds a complete, well-formed CM block.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks version, flags, address list and length; see [`frame`].
    pub fn check_len(&self) -> Result<(), WireError> {
        let buf = self.buffer.as_ref();
        match frame(buf)? {
            Framing::Complete { .. } => Ok(()),
            Framing::NeedMore { needed } => Err(WireError::Truncated {
                needed,
                available: buf.len(),
            }),
        }
    }

    /// Returns the underlying buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Format version.
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VERSION]
    }

    /// CM Flags, reserved bits dropped.
    pub fn flags(&self) -> CmFlags {
        CmFlags::from_bits_truncate(self.buffer.as_ref()[field::FLAGS])
    }

    /// Source Node ID.
    pub fn node_id(&self) -> NodeId {
        let mut id = [0u8; 6];
        id.copy_from_slice(&self.buffer.as_ref()[field::NODE_ID]);
        NodeId(id)
    }

    /// Session ID.
    pub fn session_id(&self) -> SessionId {
        SessionId(read_u16(&self.buffer.as_ref()[field::SESSION_ID]))
    }

    /// Path ID the sender chose for this packet.
    pub fn path_id(&self) -> PathId {
        PathId(self.buffer.as_ref()[field::PATH_ID])
    }

    /// Feedback Path ID (meaningful only with [`CmFlags::FEEDBACK`]).
    pub fn feedback_path_id(&self) -> PathId {
        PathId(self.buffer.as_ref()[field::FEEDBACK_PATH_ID])
    }

    /// Packet Timestamp: the sender's clock in microseconds, low 32 bits.
    pub fn timestamp(&self) -> u32 {
        read_u32(&self.buffer.as_ref()[field::TIMESTAMP])
    }

    /// Path Delay in microseconds (meaningful only with [`CmFlags::FEEDBACK`]).
    pub fn path_delay(&self) -> i32 {
        read_u32(&self.buffer.as_ref()[field::PATH_DELAY]) as i32
    }

    /// Packet Sequence of this session and direction.
    pub fn sequence(&self) -> u32 {
        read_u32(&self.buffer.as_ref()[field::SEQUENCE])
    }

    /// Number of Local IP Address List entries.
    pub fn address_count(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::ADDRESS_COUNT])
    }

    /// Iterates the Local IP Address List.
    pub fn addresses(&self) -> AddressIter<'_> {
        AddressIter {
            buf: self.buffer.as_ref(),
            offset: field::ADDRESSES,
            remaining: self.address_count(),
        }
    }

    /// Length of the whole CM block: fixed part, address list and, in a
    /// version-2 block, the authentication extension.
    pub fn cm_len(&self) -> usize {
        self.auth_offset()
            + if self.version() == VERSION_AUTH {
                AUTH_LEN
            } else {
                0
            }
    }

    /// Where the authentication extension starts (the end of the address
    /// list); meaningful in a version-2 block.
    pub fn auth_offset(&self) -> usize {
        let buf = self.buffer.as_ref();
        let mut offset = field::ADDRESSES;
        for _ in 0..self.address_count() {
            offset += if buf[offset] == ADDRESS_KIND_V6 {
                ADDRESS_ENTRY_V6_LEN
            } else {
                ADDRESS_ENTRY_V4_LEN
            };
        }
        offset
    }

    /// The authentication extension of a version-2 block.
    pub fn auth(&self) -> Option<AuthExt> {
        if self.version() != VERSION_AUTH {
            return None;
        }
        let ext = &self.buffer.as_ref()[self.auth_offset()..][..AUTH_LEN];
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&ext[auth_field::COUNTER]);
        let mut tag = [0u8; AUTH_TAG_LEN];
        tag.copy_from_slice(&ext[auth_field::TAG]);
        Some(AuthExt {
            key_id: ext[auth_field::KEY_ID],
            counter: u64::from_be_bytes(counter),
            tag,
        })
    }

    /// The bytes after the CM block: the inner IP packet, empty for control packets.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.cm_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> CmPacket<T> {
    fn buf_mut(&mut self) -> &mut [u8] {
        self.buffer.as_mut()
    }

    /// Sets the format version.
    pub fn set_version(&mut self, version: u8) {
        self.buf_mut()[field::VERSION] = version;
    }

    /// Sets the CM Flags.
    pub fn set_flags(&mut self, flags: CmFlags) {
        self.buf_mut()[field::FLAGS] = flags.bits();
    }

    /// Sets the Source Node ID.
    pub fn set_node_id(&mut self, id: NodeId) {
        self.buf_mut()[field::NODE_ID].copy_from_slice(&id.0);
    }

    /// Sets the Session ID.
    pub fn set_session_id(&mut self, id: SessionId) {
        self.buf_mut()[field::SESSION_ID].copy_from_slice(&id.0.to_be_bytes());
    }

    /// Sets the Path ID.
    pub fn set_path_id(&mut self, id: PathId) {
        self.buf_mut()[field::PATH_ID] = id.0;
    }

    /// Sets the Feedback Path ID.
    pub fn set_feedback_path_id(&mut self, id: PathId) {
        self.buf_mut()[field::FEEDBACK_PATH_ID] = id.0;
    }

    /// Sets the Packet Timestamp.
    pub fn set_timestamp(&mut self, micros: u32) {
        self.buf_mut()[field::TIMESTAMP].copy_from_slice(&micros.to_be_bytes());
    }

    /// Sets the Path Delay.
    pub fn set_path_delay(&mut self, delay_us: i32) {
        self.buf_mut()[field::PATH_DELAY].copy_from_slice(&delay_us.to_be_bytes());
    }

    /// Sets the Packet Sequence.
    pub fn set_sequence(&mut self, sequence: u32) {
        self.buf_mut()[field::SEQUENCE].copy_from_slice(&sequence.to_be_bytes());
    }

    /// Mutable access to the bytes after the CM block (the inner packet).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.cm_len();
        &mut self.buf_mut()[start..]
    }
}

/// Iterator over the Local IP Address List of a checked [`CmPacket`].
#[derive(Debug, Clone)]
pub struct AddressIter<'a> {
    buf: &'a [u8],
    offset: usize,
    remaining: usize,
}

impl Iterator for AddressIter<'_> {
    type Item = SocketAddr;

    fn next(&mut self) -> Option<SocketAddr> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let kind = self.buf[self.offset];
        let port = read_u16(&self.buf[self.offset + 1..self.offset + 3]);
        let start = self.offset + 3;
        let ip = if kind == ADDRESS_KIND_V6 {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&self.buf[start..start + 16]);
            self.offset += ADDRESS_ENTRY_V6_LEN;
            IpAddr::V6(Ipv6Addr::from(octets))
        } else {
            let mut octets = [0u8; 4];
            octets.copy_from_slice(&self.buf[start..start + 4]);
            self.offset += ADDRESS_ENTRY_V4_LEN;
            IpAddr::V4(Ipv4Addr::from(octets))
        };
        Some(SocketAddr::new(ip, port))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

/// Owned, high-level representation of a CM block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmRepr {
    /// CM Flags other than [`CmFlags::FEEDBACK`], which follows from `feedback`.
    pub flags: CmFlags,
    /// Source Node ID.
    pub node_id: NodeId,
    /// Session ID ([`SessionId::CONTROL`] for node-level control packets).
    pub session_id: SessionId,
    /// Path ID the sender chose for this packet.
    pub path_id: PathId,
    /// Delay feedback for one of the receiver's paths, if any.
    pub feedback: Option<Feedback>,
    /// Packet Timestamp (see [`crate::time::Timestamp::to_wire`]).
    pub timestamp: u32,
    /// Packet Sequence of this session and direction.
    pub sequence: u32,
    /// Local IP Address List: the sender's (address, encapsulation port) pairs.
    pub addresses: Vec<SocketAddr>,
    /// The authentication extension (a version-2 block), if any.
    pub auth: Option<AuthExt>,
}

/// The authentication extension of a version-2 CM block (`PROTOCOL.md` §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AuthExt {
    /// Which of the shared keys the tag was made with.
    pub key_id: u8,
    /// The sender's counter: strictly increasing, the replay window's index.
    pub counter: u64,
    /// HMAC-SHA-256 over the datagram but the tag, truncated to 128 bits.
    /// Emitted as given (normally zero, then signed in place).
    pub tag: [u8; AUTH_TAG_LEN],
}

impl CmRepr {
    /// Parses a checked packet.
    pub fn parse<T: AsRef<[u8]>>(packet: &CmPacket<T>) -> Result<CmRepr, WireError> {
        packet.check_len()?;
        let raw_flags = packet.flags();
        let feedback = raw_flags.contains(CmFlags::FEEDBACK).then(|| Feedback {
            path_id: packet.feedback_path_id(),
            delay_us: packet.path_delay(),
        });
        Ok(CmRepr {
            flags: raw_flags.difference(CmFlags::FEEDBACK),
            node_id: packet.node_id(),
            session_id: packet.session_id(),
            path_id: packet.path_id(),
            feedback,
            timestamp: packet.timestamp(),
            sequence: packet.sequence(),
            addresses: packet.addresses().collect(),
            auth: packet.auth(),
        })
    }

    /// Length of the emitted CM block.
    pub fn buffer_len(&self) -> usize {
        FIXED_LEN
            + self.auth.map_or(0, |_| AUTH_LEN)
            + self
                .addresses
                .iter()
                .map(|a| match a {
                    SocketAddr::V4(_) => ADDRESS_ENTRY_V4_LEN,
                    SocketAddr::V6(_) => ADDRESS_ENTRY_V6_LEN,
                })
                .sum::<usize>()
    }

    /// Writes the CM block into the start of `buf`; returns the bytes written.
    ///
    /// IPv6 flow info and scope ID are not carried.
    pub fn emit(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        if self.addresses.len() > MAX_ADDRESSES {
            return Err(WireError::BadAddressCount(self.addresses.len()));
        }
        let needed = self.buffer_len();
        if buf.len() < needed {
            return Err(WireError::BufferTooSmall {
                needed,
                available: buf.len(),
            });
        }
        let mut flags = self.flags.difference(CmFlags::FEEDBACK);
        let feedback = self.feedback.unwrap_or(Feedback {
            path_id: PathId(0),
            delay_us: 0,
        });
        if self.feedback.is_some() {
            flags.insert(CmFlags::FEEDBACK);
        }
        {
            let mut packet = CmPacket::new_unchecked(&mut buf[..needed]);
            packet.set_version(if self.auth.is_some() {
                VERSION_AUTH
            } else {
                VERSION
            });
            packet.set_flags(flags);
            packet.set_node_id(self.node_id);
            packet.set_session_id(self.session_id);
            packet.set_path_id(self.path_id);
            packet.set_feedback_path_id(feedback.path_id);
            packet.set_timestamp(self.timestamp);
            packet.set_path_delay(feedback.delay_us);
            packet.set_sequence(self.sequence);
        }
        // Fits in a byte: checked against MAX_ADDRESSES above.
        buf[field::ADDRESS_COUNT] = self.addresses.len() as u8;
        let mut offset = field::ADDRESSES;
        for address in &self.addresses {
            let port = address.port().to_be_bytes();
            match address.ip() {
                IpAddr::V4(ip) => {
                    buf[offset] = ADDRESS_KIND_V4;
                    buf[offset + 1..offset + 3].copy_from_slice(&port);
                    buf[offset + 3..offset + 7].copy_from_slice(&ip.octets());
                    offset += ADDRESS_ENTRY_V4_LEN;
                }
                IpAddr::V6(ip) => {
                    buf[offset] = ADDRESS_KIND_V6;
                    buf[offset + 1..offset + 3].copy_from_slice(&port);
                    buf[offset + 3..offset + 19].copy_from_slice(&ip.octets());
                    offset += ADDRESS_ENTRY_V6_LEN;
                }
            }
        }
        if let Some(auth) = self.auth {
            let ext = &mut buf[offset..offset + AUTH_LEN];
            ext[auth_field::KEY_ID] = auth.key_id;
            ext[auth_field::COUNTER].copy_from_slice(&auth.counter.to_be_bytes());
            ext[auth_field::TAG].copy_from_slice(&auth.tag);
            offset += AUTH_LEN;
        }
        Ok(offset)
    }

    /// Emits the CM block followed by `inner` into a new datagram payload.
    pub fn encapsulate(&self, inner: &[u8]) -> Result<Vec<u8>, WireError> {
        let mut out = vec![0u8; self.buffer_len() + inner.len()];
        let cm_len = self.emit(&mut out)?;
        out[cm_len..].copy_from_slice(inner);
        Ok(out)
    }
}

/// Byte offsets of the Address Assignment payload (`PROTOCOL.md` §4.3).
pub mod assignment_field {
    use super::field::Field;

    /// Address family of the assignment: `4` (the only one defined).
    pub const KIND: usize = 0;
    /// Prefix length of the tunnel network.
    pub const PREFIX_LEN: usize = 1;
    /// The client's tunnel address.
    pub const CLIENT: Field = 2..6;
    /// The proxy end's tunnel address (the HTTP proxy and the gateway).
    pub const PROXY: Field = 6..10;
}

/// Length of an IPv4 Address Assignment payload.
pub const ASSIGNMENT_LEN: usize = 10;

/// Errors of an Address Assignment payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AssignmentError {
    /// Shorter than [`ASSIGNMENT_LEN`].
    #[error("address assignment truncated: {0} bytes")]
    Truncated(usize),
    /// An address family other than 4.
    #[error("address assignment of unknown kind {0}")]
    BadKind(u8),
    /// A prefix length above 30 leaves no room for two hosts.
    #[error("address assignment prefix length {0} is not in 1..=30")]
    BadPrefixLen(u8),
    /// The two addresses are not in one network of that prefix length.
    #[error("client {client} and proxy {proxy} are not in one /{prefix_len}")]
    NotOneNetwork {
        /// Client tunnel address.
        client: Ipv4Addr,
        /// Proxy tunnel address.
        proxy: Ipv4Addr,
        /// Prefix length.
        prefix_len: u8,
    },
}

/// Zero-copy view of an Address Assignment, the payload of a `CONFIRM | ASSIGN`.
#[derive(Debug, Clone, Copy)]
pub struct AssignmentPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> AssignmentPacket<T> {
    /// Checks length, kind, prefix length and that both addresses share the
    /// network; the only entry for received bytes.
    pub fn new_checked(buffer: T) -> Result<Self, AssignmentError> {
        let bytes = buffer.as_ref();
        if bytes.len() < ASSIGNMENT_LEN {
            return Err(AssignmentError::Truncated(bytes.len()));
        }
        if bytes[assignment_field::KIND] != ADDRESS_KIND_V4 {
            return Err(AssignmentError::BadKind(bytes[assignment_field::KIND]));
        }
        let packet = AssignmentPacket { buffer };
        let prefix_len = packet.prefix_len();
        if !(1..=30).contains(&prefix_len) {
            return Err(AssignmentError::BadPrefixLen(prefix_len));
        }
        let mask = u32::MAX << (32 - u32::from(prefix_len));
        let (client, proxy) = (packet.client(), packet.proxy());
        if u32::from(client) & mask != u32::from(proxy) & mask || client == proxy {
            return Err(AssignmentError::NotOneNetwork {
                client,
                proxy,
                prefix_len,
            });
        }
        Ok(packet)
    }

    /// Prefix length of the tunnel network.
    pub fn prefix_len(&self) -> u8 {
        self.buffer.as_ref()[assignment_field::PREFIX_LEN]
    }

    /// The client's tunnel address.
    pub fn client(&self) -> Ipv4Addr {
        ipv4_at(&self.buffer.as_ref()[assignment_field::CLIENT])
    }

    /// The proxy end's tunnel address.
    pub fn proxy(&self) -> Ipv4Addr {
        ipv4_at(&self.buffer.as_ref()[assignment_field::PROXY])
    }
}

fn ipv4_at(bytes: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])
}

/// An Address Assignment: the client's tunnel address and the proxy's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignmentRepr {
    /// The client's tunnel address.
    pub client: Ipv4Addr,
    /// The proxy end's tunnel address.
    pub proxy: Ipv4Addr,
    /// Prefix length of the tunnel network.
    pub prefix_len: u8,
}

impl AssignmentRepr {
    /// Reads a checked packet.
    pub fn parse<T: AsRef<[u8]>>(packet: &AssignmentPacket<T>) -> AssignmentRepr {
        AssignmentRepr {
            client: packet.client(),
            proxy: packet.proxy(),
            prefix_len: packet.prefix_len(),
        }
    }

    /// The payload bytes.
    pub fn to_bytes(&self) -> [u8; ASSIGNMENT_LEN] {
        let mut out = [0u8; ASSIGNMENT_LEN];
        out[assignment_field::KIND] = ADDRESS_KIND_V4;
        out[assignment_field::PREFIX_LEN] = self.prefix_len;
        out[assignment_field::CLIENT].copy_from_slice(&self.client.octets());
        out[assignment_field::PROXY].copy_from_slice(&self.proxy.octets());
        out
    }
}

fn read_u16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

fn read_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_repr() -> CmRepr {
        CmRepr {
            flags: CmFlags::ENABLE.union(CmFlags::HEARTBEAT),
            node_id: NodeId([0x02, 0, 0, 0, 0, 0x0a]),
            session_id: SessionId(0x1234),
            path_id: PathId(7),
            feedback: Some(Feedback {
                path_id: PathId(3),
                delay_us: -1500,
            }),
            timestamp: 0xdead_beef,
            sequence: 42,
            addresses: vec![
                "192.0.2.1:4789".parse().unwrap(),
                "[2001:db8::1]:4789".parse().unwrap(),
            ],
            auth: None,
        }
    }

    #[test]
    fn version_2_ends_with_the_authentication_extension() {
        let mut repr = sample_repr();
        repr.auth = Some(AuthExt {
            key_id: 9,
            counter: 0x0102_0304_0506_0708,
            tag: [0xaa; AUTH_TAG_LEN],
        });
        let bytes = repr.encapsulate(b"inner").unwrap();
        let list = 7 + 19;
        assert_eq!(bytes[0], VERSION_AUTH);
        assert_eq!(bytes.len(), FIXED_LEN + list + AUTH_LEN + 5);
        let ext = &bytes[FIXED_LEN + list..];
        assert_eq!(ext[0], 9);
        assert_eq!(&ext[1..9], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&ext[9..25], &[0xaa; 16]);
        let packet = CmPacket::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.auth_offset(), FIXED_LEN + list);
        assert_eq!(packet.cm_len(), FIXED_LEN + list + AUTH_LEN);
        assert_eq!(packet.payload(), b"inner");
        assert_eq!(CmRepr::parse(&packet).unwrap(), repr);
        // Cut inside the extension: need more.
        let cut = &bytes[..FIXED_LEN + list + 10];
        assert_eq!(
            frame(cut),
            Ok(Framing::NeedMore {
                needed: FIXED_LEN + list + AUTH_LEN
            })
        );
        assert!(CmPacket::new_checked(cut).is_err());
        // Version 3 is nobody's.
        let mut bad = bytes.clone();
        bad[0] = 3;
        assert_eq!(frame(&bad), Err(WireError::BadVersion(3)));
    }

    #[test]
    fn fixed_part_is_25_bytes_at_documented_offsets() {
        let repr = CmRepr {
            addresses: vec![],
            auth: None,
            ..sample_repr()
        };
        let mut buf = [0u8; FIXED_LEN];
        assert_eq!(repr.emit(&mut buf), Ok(FIXED_LEN));
        assert_eq!(buf[0], VERSION);
        assert_eq!(buf[1], 0x01 | 0x08 | 0x10);
        assert_eq!(&buf[2..8], &[0x02, 0, 0, 0, 0, 0x0a]);
        assert_eq!(&buf[8..10], &[0x12, 0x34]);
        assert_eq!(buf[10], 7);
        assert_eq!(buf[11], 3);
        assert_eq!(&buf[12..16], &[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(&buf[16..20], &(-1500i32).to_be_bytes());
        assert_eq!(&buf[20..24], &[0, 0, 0, 42]);
        assert_eq!(buf[24], 0);
    }

    #[test]
    fn round_trip_with_addresses_and_payload() {
        let repr = sample_repr();
        let inner = [0x45u8, 0, 0, 20];
        let datagram = repr.encapsulate(&inner).unwrap();
        assert_eq!(datagram.len(), FIXED_LEN + 7 + 19 + inner.len());
        let packet = CmPacket::new_checked(&datagram[..]).unwrap();
        assert_eq!(packet.payload(), &inner);
        assert_eq!(CmRepr::parse(&packet).unwrap(), repr);
    }

    #[test]
    fn feedback_flag_follows_feedback_field() {
        let repr = CmRepr {
            feedback: None,
            ..sample_repr()
        };
        let bytes = repr.encapsulate(&[]).unwrap();
        assert!(!CmPacket::new_unchecked(&bytes[..])
            .flags()
            .contains(CmFlags::FEEDBACK));
        let parsed = CmRepr::parse(&CmPacket::new_checked(&bytes[..]).unwrap()).unwrap();
        assert_eq!(parsed.feedback, None);
    }

    #[test]
    fn truncated_fixed_part_is_rejected_and_framed_as_need_more() {
        let bytes = sample_repr().encapsulate(&[]).unwrap();
        for len in 0..FIXED_LEN {
            assert_eq!(
                frame(&bytes[..len]),
                Ok(Framing::NeedMore { needed: FIXED_LEN })
            );
            assert_eq!(
                CmPacket::new_checked(&bytes[..len]).unwrap_err(),
                WireError::Truncated {
                    needed: FIXED_LEN,
                    available: len
                }
            );
        }
    }

    #[test]
    fn truncated_address_list_needs_more() {
        let bytes = sample_repr().encapsulate(&[]).unwrap();
        let full = bytes.len();
        assert_eq!(frame(&bytes), Ok(Framing::Complete { cm_len: full }));
        assert_eq!(
            frame(&bytes[..full - 1]),
            Ok(Framing::NeedMore { needed: full })
        );
        assert_eq!(
            frame(&bytes[..FIXED_LEN + 3]),
            Ok(Framing::NeedMore {
                needed: FIXED_LEN + ADDRESS_ENTRY_V4_LEN
            })
        );
    }

    #[test]
    fn bad_version_flags_count_and_kind_are_errors() {
        let mut bytes = sample_repr().encapsulate(&[]).unwrap();
        bytes[0] = 4;
        assert_eq!(
            CmPacket::new_checked(&bytes[..]).unwrap_err(),
            WireError::BadVersion(4)
        );
        // The version is judged from the first byte alone.
        assert_eq!(frame(&bytes[..1]), Err(WireError::BadVersion(4)));
        bytes[0] = VERSION;
        bytes[field::ADDRESS_COUNT] = (MAX_ADDRESSES + 1) as u8;
        assert_eq!(
            CmPacket::new_checked(&bytes[..]).unwrap_err(),
            WireError::BadAddressCount(MAX_ADDRESSES + 1)
        );
        bytes[field::ADDRESS_COUNT] = 2;
        bytes[field::ADDRESSES] = 5;
        assert_eq!(
            CmPacket::new_checked(&bytes[..]).unwrap_err(),
            WireError::BadAddressKind(5)
        );
    }

    #[test]
    fn emit_rejects_small_buffer_and_long_list() {
        let repr = sample_repr();
        let mut small = vec![0u8; repr.buffer_len() - 1];
        assert_eq!(
            repr.emit(&mut small),
            Err(WireError::BufferTooSmall {
                needed: repr.buffer_len(),
                available: repr.buffer_len() - 1
            })
        );
        let long = CmRepr {
            addresses: vec!["192.0.2.1:1".parse().unwrap(); MAX_ADDRESSES + 1],
            ..repr
        };
        let mut buf = vec![0u8; long.buffer_len()];
        assert_eq!(
            long.emit(&mut buf),
            Err(WireError::BadAddressCount(MAX_ADDRESSES + 1))
        );
    }

    #[test]
    fn setters_rewrite_fields_in_place() {
        let mut bytes = sample_repr().encapsulate(&[1, 2, 3]).unwrap();
        let mut packet = CmPacket::new_checked(&mut bytes[..]).unwrap();
        packet.set_sequence(99);
        packet.set_timestamp(5);
        packet.payload_mut()[0] = 9;
        assert_eq!(packet.sequence(), 99);
        assert_eq!(packet.timestamp(), 5);
        assert_eq!(packet.payload(), &[9, 2, 3]);
    }

    #[test]
    fn flags_debug_names_bits() {
        let flags = CmFlags::ENABLE.union(CmFlags::DUPLICATE);
        assert_eq!(format!("{flags:?}"), "CmFlags(ENABLE|DUPLICATE)");
        // Version 1 defines all eight bits; a new flag needs a new version.
        assert_eq!(CmFlags::from_bits(0xff), Some(CmFlags::ALL));
    }

    fn arb_socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port)),
        ]
    }

    prop_compose! {
        fn arb_repr()(
            flags in 0u8..=CmFlags::ALL.bits(),
            node in any::<[u8; 6]>(),
            session in any::<u16>(),
            path in any::<u8>(),
            feedback in proptest::option::of((any::<u8>(), any::<i32>())),
            timestamp in any::<u32>(),
            sequence in any::<u32>(),
            addresses in proptest::collection::vec(arb_socket_addr(), 0..=MAX_ADDRESSES),
            auth in proptest::option::of((any::<u8>(), any::<u64>(), any::<[u8; AUTH_TAG_LEN]>())),
        ) -> CmRepr {
            CmRepr {
                flags: CmFlags::from_bits_truncate(flags).difference(CmFlags::FEEDBACK),
                node_id: NodeId(node),
                session_id: SessionId(session),
                path_id: PathId(path),
                feedback: feedback.map(|(p, d)| Feedback { path_id: PathId(p), delay_us: d }),
                timestamp,
                sequence,
                addresses,
                auth: auth.map(|(key_id, counter, tag)| AuthExt { key_id, counter, tag }),
            }
        }
    }

    proptest! {
        #[test]
        fn prop_emit_parse_round_trip(repr in arb_repr(), inner in proptest::collection::vec(any::<u8>(), 0..64)) {
            let bytes = repr.encapsulate(&inner).unwrap();
            prop_assert_eq!(bytes.len(), repr.buffer_len() + inner.len());
            let packet = CmPacket::new_checked(&bytes[..]).unwrap();
            prop_assert_eq!(packet.payload(), &inner[..]);
            prop_assert_eq!(CmRepr::parse(&packet).unwrap(), repr);
        }

        #[test]
        fn prop_arbitrary_bytes_never_panic(
            mut bytes in proptest::collection::vec(any::<u8>(), 0..200),
            force_version in any::<bool>(),
            low_flags in any::<bool>(),
        ) {
            // Steer half the inputs past the version and flags checks.
            if force_version && !bytes.is_empty() {
                bytes[0] = VERSION;
            }
            if low_flags && bytes.len() > 1 {
                bytes[1] &= CmFlags::ALL.bits();
            }
            let framing = frame(&bytes);
            if let Ok(packet) = CmPacket::new_checked(&bytes[..]) {
                let repr = CmRepr::parse(&packet).unwrap();
                prop_assert_eq!(framing, Ok(Framing::Complete { cm_len: packet.cm_len() }));
                prop_assert_eq!(repr.buffer_len(), packet.cm_len());
                let _ = packet.payload();
            }
        }

        #[test]
        fn prop_valid_prefix_is_need_more(repr in arb_repr(), cut in any::<prop::sample::Index>()) {
            let bytes = repr.encapsulate(&[]).unwrap();
            let len = cut.index(bytes.len());
            match frame(&bytes[..len]).unwrap() {
                Framing::NeedMore { needed } => prop_assert!(needed > len && needed <= bytes.len()),
                Framing::Complete { .. } => prop_assert!(false, "prefix {len} of {} framed complete", bytes.len()),
            }
        }
    }

    #[test]
    fn assignment_round_trip_and_checks() {
        let repr = AssignmentRepr {
            client: Ipv4Addr::new(10, 200, 0, 2),
            proxy: Ipv4Addr::new(10, 200, 0, 1),
            prefix_len: 24,
        };
        let bytes = repr.to_bytes();
        assert_eq!(bytes, [4, 24, 10, 200, 0, 2, 10, 200, 0, 1]);
        let packet = AssignmentPacket::new_checked(&bytes[..]).unwrap();
        assert_eq!(AssignmentRepr::parse(&packet), repr);
        assert_eq!(
            AssignmentPacket::new_checked(&bytes[..9]).unwrap_err(),
            AssignmentError::Truncated(9)
        );
        let mut bad = bytes;
        bad[0] = 6;
        assert_eq!(
            AssignmentPacket::new_checked(&bad[..]).unwrap_err(),
            AssignmentError::BadKind(6)
        );
        let mut bad = bytes;
        bad[1] = 31;
        assert!(AssignmentPacket::new_checked(&bad[..]).is_err());
        let mut bad = bytes;
        bad[6] = 11;
        assert!(matches!(
            AssignmentPacket::new_checked(&bad[..]),
            Err(AssignmentError::NotOneNetwork { .. })
        ));
    }

    proptest! {
        #[test]
        fn assignment_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            if let Ok(packet) = AssignmentPacket::new_checked(&bytes[..]) {
                let repr = AssignmentRepr::parse(&packet);
                prop_assert_eq!(&repr.to_bytes()[..], &bytes[..ASSIGNMENT_LEN]);
            }
        }
    }
}
