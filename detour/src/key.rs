//! Pre-shared keys: the key file format, key ids, and signing and checking version 2 messages.
//!
//! A key file holds one line of at least 32 hex digits (128 bits; an even number of digits), for example
//! from `openssl rand -hex 32`. Blank lines and `#` comments around it are allowed. The key id that
//! messages carry is the first four bytes of SHA-256 over a fixed label and the key, so both ends derive it
//! from the same file and nothing has to be configured twice.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::wire::{field, Packet, Repr, V2Repr};

/// The fewest hex digits a key file may hold.
pub const MIN_HEX_DIGITS: usize = 32;
/// The most bytes a key may have (HMAC-SHA256 hashes longer keys first; more adds nothing).
pub const MAX_KEY_BYTES: usize = 64;

const KEY_ID_LABEL: &[u8] = b"mptcp-detour key id\0";

/// What is wrong with a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The contents are not one line of hex digits of the right length.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A pre-shared key and its id.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk {
    bytes: Vec<u8>,
    id: u32,
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        write!(f, "Psk {{ id: {:08x} }}", self.id)
    }
}

impl Psk {
    /// A key from raw bytes (16 to 64).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() * 2 < MIN_HEX_DIGITS {
            return Err(format!(
                "key has {} hex digits; at least {MIN_HEX_DIGITS} are needed",
                bytes.len() * 2
            ));
        }
        if bytes.len() > MAX_KEY_BYTES {
            return Err(format!(
                "key has {} hex digits; at most {} are used",
                bytes.len() * 2,
                MAX_KEY_BYTES * 2
            ));
        }
        let digest = Sha256::new()
            .chain_update(KEY_ID_LABEL)
            .chain_update(bytes)
            .finalize();
        Ok(Self {
            bytes: bytes.to_vec(),
            id: u32::from_be_bytes(digest[..4].try_into().expect("4 bytes")),
        })
    }

    /// Parses a key file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'));
        let line = lines.next().ok_or("no key line (one line of hex digits)")?;
        if lines.next().is_some() {
            return Err("more than one key line".into());
        }
        if !line.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err("the key line has characters other than hex digits".into());
        }
        if line.len() % 2 != 0 {
            return Err(format!("odd number of hex digits ({})", line.len()));
        }
        let bytes: Vec<u8> = (0..line.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex digits checked"))
            .collect();
        Self::from_bytes(&bytes)
    }

    /// Reads a key file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| KeyError::Format {
            path: path.to_owned(),
            reason,
        })
    }

    /// The id messages signed with this key carry.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(&self.bytes).expect("HMAC takes any key length")
    }

    /// A signed version 2 message; `repr.key_id` is replaced by this key's id.
    pub fn sign(&self, repr: &V2Repr) -> Vec<u8> {
        let repr = Repr::V2(V2Repr {
            key_id: self.id,
            ..*repr
        });
        let mut bytes = repr.to_bytes();
        let mut packet = Packet::new_unchecked(&mut bytes[..]);
        let tag = self
            .mac()
            .chain_update(packet.signed_bytes())
            .finalize()
            .into_bytes();
        packet.mac_mut().copy_from_slice(&tag);
        bytes
    }

    /// Whether a checked version 2 packet carries this key's id and a valid MAC (compared in constant
    /// time).
    pub fn verify<T: AsRef<[u8]>>(&self, packet: &Packet<T>) -> bool {
        if packet.version() != 2 || packet.key_id() != self.id {
            return false;
        }
        debug_assert_eq!(packet.mac().len(), field::V2_MAC.len());
        self.mac()
            .chain_update(packet.signed_bytes())
            .verify_slice(packet.mac())
            .is_ok()
    }
}

/// Random bytes from the kernel (`getrandom`), for nonces.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `bytes`.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
    u64::from_ne_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Op, Status};
    use std::net::Ipv4Addr;

    const KEY: &str = "00112233445566778899aabbccddeeff";

    fn request() -> V2Repr {
        V2Repr {
            op: Op::Request,
            status: Status::Ok,
            key_id: 0,
            nonce: 7,
            timestamp_ms: 1_700_000_000_000,
            rip: Ipv4Addr::new(10, 0, 3, 2),
            rpt: 80,
            dpt: 80,
            lifetime_s: 0,
        }
    }

    #[test]
    fn key_files() {
        assert!(Psk::parse(KEY).is_ok());
        assert!(Psk::parse(&format!("# detour collective\n\n{KEY}\n")).is_ok());
        assert!(Psk::parse(&format!("  {}  \n", KEY.to_uppercase())).is_ok());
        for bad in [
            "",
            "# only a comment\n",
            &KEY[..30],
            &KEY[..31],
            &format!("{KEY}\n{KEY}"),
            &format!("{}zz", &KEY[..30]),
            &"ab".repeat(65),
        ] {
            assert!(Psk::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn sign_then_verify_and_tamper() {
        let psk = Psk::parse(KEY).unwrap();
        let bytes = psk.sign(&request());
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert!(psk.verify(&packet));
        assert_eq!(packet.key_id(), psk.id());
        let other = Psk::parse(&"01".repeat(16)).unwrap();
        assert_ne!(other.id(), psk.id());
        assert!(!other.verify(&packet));
        for i in 0..bytes.len() {
            let mut tampered = bytes.clone();
            tampered[i] ^= 0x01;
            // Flipping the version byte makes it no message at all.
            if let Ok(packet) = Packet::new_checked(&tampered[..]) {
                assert!(!psk.verify(&packet), "flipping byte {i} went unnoticed");
            }
        }
    }

    /// RFC 4231 test case 2 (key "Jefe"), run through the same HMAC the messages use.
    #[test]
    fn hmac_is_rfc_4231_sha256() {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let tag = mac.finalize().into_bytes();
        assert_eq!(tag[..8], [0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e]);
    }

    #[test]
    fn debug_hides_the_key() {
        let text = format!("{:?}", Psk::parse(KEY).unwrap());
        assert!(!text.contains("0011"), "{text}");
    }
}
