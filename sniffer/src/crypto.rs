//! MPTCP key-derived values and HMACs.
//!
//! - v1 (RFC 8684): token = most significant 32 bits of SHA-256(key), IDSN = least
//!   significant 64 bits; HMACs are HMAC-SHA256.
//! - v0 (RFC 6824): the same with SHA-1 and HMAC-SHA1.
//!
//! Keys are hashed as 8 big-endian bytes. An MP_JOIN exchange between host A (who sends the
//! SYN) and host B (whose token the SYN carries) uses:
//! SYN-ACK: leftmost 64 bits of HMAC(Key-B || Key-A, R-B || R-A);
//! third ACK: leftmost 160 bits of HMAC(Key-A || Key-B, R-A || R-B).
//! ADD_ADDR (v1): 64 bits of HMAC(Key-sender || Key-receiver, address id || address || port).

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};

/// The MPTCP protocol version, which selects the hash function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MptcpVersion {
    /// RFC 6824: SHA-1.
    V0,
    /// RFC 8684: SHA-256.
    V1,
}

impl MptcpVersion {
    /// The version carried in MP_CAPABLE (`0` → v0, anything else → v1).
    pub fn from_wire(version: u8) -> MptcpVersion {
        if version == 0 {
            MptcpVersion::V0
        } else {
            MptcpVersion::V1
        }
    }
}

/// Hash of a key with the version's hash function (20 or 32 bytes used).
fn key_digest(version: MptcpVersion, key: u64) -> ([u8; 32], usize) {
    let mut out = [0; 32];
    match version {
        MptcpVersion::V0 => {
            out[..20].copy_from_slice(&Sha1::digest(key.to_be_bytes()));
            (out, 20)
        }
        MptcpVersion::V1 => {
            out.copy_from_slice(&Sha256::digest(key.to_be_bytes()));
            (out, 32)
        }
    }
}

/// The token identifying the connection at the key's owner.
pub fn token(version: MptcpVersion, key: u64) -> u32 {
    let (digest, _) = key_digest(version, key);
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// The initial data sequence number of the key's owner.
pub fn idsn(version: MptcpVersion, key: u64) -> u64 {
    let (digest, len) = key_digest(version, key);
    let mut low = [0; 8];
    low.copy_from_slice(&digest[len - 8..len]);
    u64::from_be_bytes(low)
}

/// A full HMAC output (20 bytes for SHA-1, 32 for SHA-256).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HmacOutput {
    bytes: [u8; 32],
    len: usize,
}

impl HmacOutput {
    /// The HMAC bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// The leftmost 64 bits.
    pub fn leftmost_u64(&self) -> u64 {
        let mut word = [0; 8];
        word.copy_from_slice(&self.bytes[..8]);
        u64::from_be_bytes(word)
    }

    /// The rightmost 64 bits.
    pub fn rightmost_u64(&self) -> u64 {
        let mut word = [0; 8];
        word.copy_from_slice(&self.bytes[self.len - 8..self.len]);
        u64::from_be_bytes(word)
    }

    /// The leftmost 160 bits (what the MP_JOIN third ACK carries).
    pub fn leftmost_160(&self) -> [u8; 20] {
        let mut out = [0; 20];
        out.copy_from_slice(&self.bytes[..20]);
        out
    }
}

/// HMAC with an arbitrary key and message.
pub fn hmac_raw(version: MptcpVersion, key: &[u8], message: &[u8]) -> HmacOutput {
    let mut bytes = [0; 32];
    let len = match version {
        MptcpVersion::V0 => {
            let mut mac =
                <Hmac<Sha1> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
            mac.update(message);
            bytes[..20].copy_from_slice(&mac.finalize().into_bytes());
            20
        }
        MptcpVersion::V1 => {
            let mut mac =
                <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
            mac.update(message);
            bytes.copy_from_slice(&mac.finalize().into_bytes());
            32
        }
    };
    HmacOutput { bytes, len }
}

/// HMAC keyed with `first_key || second_key` (both as 8 big-endian bytes).
pub fn hmac_keys(
    version: MptcpVersion,
    first_key: u64,
    second_key: u64,
    message: &[u8],
) -> HmacOutput {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&first_key.to_be_bytes());
    key[8..].copy_from_slice(&second_key.to_be_bytes());
    hmac_raw(version, &key, message)
}

fn nonces(first: u32, second: u32) -> [u8; 8] {
    let mut message = [0; 8];
    message[..4].copy_from_slice(&first.to_be_bytes());
    message[4..].copy_from_slice(&second.to_be_bytes());
    message
}

/// The truncated HMAC host B puts in its MP_JOIN SYN-ACK.
pub fn join_synack_hmac(
    version: MptcpVersion,
    key_b: u64,
    key_a: u64,
    nonce_b: u32,
    nonce_a: u32,
) -> u64 {
    hmac_keys(version, key_b, key_a, &nonces(nonce_b, nonce_a)).leftmost_u64()
}

/// The 160-bit HMAC host A puts in its MP_JOIN third ACK.
pub fn join_ack_hmac(
    version: MptcpVersion,
    key_a: u64,
    key_b: u64,
    nonce_a: u32,
    nonce_b: u32,
) -> [u8; 20] {
    hmac_keys(version, key_a, key_b, &nonces(nonce_a, nonce_b)).leftmost_160()
}

/// How an ADD_ADDR HMAC matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddAddrHmacMatch {
    /// Rightmost 64 bits, as RFC 8684 §3.4.1 specifies.
    Rfc,
    /// Leftmost 64 bits, as Linux before 5.7 sent (a since-fixed bug).
    LegacyLeftmost,
}

/// Checks an ADD_ADDR HMAC. The message is address id || address || port; Linux always
/// appends the two port bytes (zero when no port is announced), so both variants are tried.
pub fn check_add_addr_hmac(
    sender_key: u64,
    receiver_key: u64,
    address_id: u8,
    address: std::net::IpAddr,
    port: Option<u16>,
    hmac: u64,
) -> Option<AddAddrHmacMatch> {
    let mut message = Vec::with_capacity(19);
    message.push(address_id);
    match address {
        std::net::IpAddr::V4(address) => message.extend_from_slice(&address.octets()),
        std::net::IpAddr::V6(address) => message.extend_from_slice(&address.octets()),
    }
    let without_port = message.len();
    message.extend_from_slice(&port.unwrap_or(0).to_be_bytes());
    let variants: &[&[u8]] = if port.is_some() {
        &[&message[..]]
    } else {
        &[&message[..], &message[..without_port]]
    };
    for variant in variants {
        let full = hmac_keys(MptcpVersion::V1, sender_key, receiver_key, variant);
        if full.rightmost_u64() == hmac {
            return Some(AddAddrHmacMatch::Rfc);
        }
        if full.leftmost_u64() == hmac {
            return Some(AddAddrHmacMatch::LegacyLeftmost);
        }
    }
    None
}
