//! Authentication of MPIP datagrams (`PROTOCOL.md` §11), sans-IO: shared
//! keys, the HMAC tag of the version-2 CM block, the replay window, and the
//! per-source rate limit of handshakes.
//!
//! A key file holds one or more keys. Each has a one-byte ID and at least
//! 32 bytes of secret, and may be bound to one client node ID (a key per
//! client) or not (a key per deployment). Two keys with different IDs are
//! accepted at once during a rotation; a node sends with the first key of
//! its file, and the proxy end answers each client with the key that client
//! used.
//!
//! ```toml
//! [[key]]
//! id = 2
//! secret = "64 hex digits (32 bytes) or more"
//! node = "02:00:00:00:00:c1"   # optional: only this client node may use it
//! ```

use std::net::IpAddr;
use std::path::Path;

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::time::Timestamp;
use crate::wire::{auth_field, NodeId, AUTH_TAG_LEN};

/// Shortest secret accepted, in bytes (the HMAC-SHA-256 block half).
pub const MIN_SECRET_LEN: usize = 32;

/// Counters remembered behind the highest one seen from a peer. Data packets
/// spread over paths of different delay arrive out of order; 4096 covers
/// 20 ms of delay difference at about 2 Gbit/s of full-size packets.
pub const REPLAY_WINDOW: u64 = 4096;

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Group or others may read the file.
    #[error("{path}: mode {mode:o} lets others read the keys; chmod 600 it")]
    Permissions {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Not TOML, or a key the rules refuse.
    #[error("{origin}: {reason}")]
    Invalid {
        /// The file.
        origin: String,
        /// Why.
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    key: Vec<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: u8,
    secret: String,
    #[serde(default)]
    node: Option<String>,
}

/// One shared key.
#[derive(Clone)]
pub struct Key {
    /// Its ID on the wire.
    pub id: u8,
    /// The only node that may authenticate with it, if bound.
    pub node: Option<NodeId>,
    secret: Vec<u8>,
    /// The HMAC state after the key, cloned per datagram.
    mac: Hmac<Sha256>,
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.node == other.node && self.secret == other.secret
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// A key from its ID and secret; `None` if the secret is shorter than
    /// [`MIN_SECRET_LEN`].
    pub fn new(id: u8, secret: &[u8], node: Option<NodeId>) -> Option<Key> {
        if secret.len() < MIN_SECRET_LEN {
            return None;
        }
        Some(Key {
            id,
            node,
            secret: secret.to_vec(),
            mac: Hmac::<Sha256>::new_from_slice(secret).ok()?,
        })
    }

    /// The tag of `datagram`, whose tag field starts at `tag_at`: HMAC-SHA-256
    /// over everything but the tag field, truncated to 128 bits.
    pub fn tag(&self, datagram: &[u8], tag_at: usize) -> [u8; AUTH_TAG_LEN] {
        let mut mac = self.mac.clone();
        mac.update(&datagram[..tag_at]);
        mac.update(&datagram[tag_at + AUTH_TAG_LEN..]);
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; AUTH_TAG_LEN];
        tag.copy_from_slice(&full[..AUTH_TAG_LEN]);
        tag
    }

    /// Writes the tag of `datagram` into it; `auth_at` is where its
    /// authentication extension starts.
    pub fn sign(&self, datagram: &mut [u8], auth_at: usize) {
        let tag_at = auth_at + auth_field::TAG.start;
        let tag = self.tag(datagram, tag_at);
        datagram[tag_at..tag_at + AUTH_TAG_LEN].copy_from_slice(&tag);
    }

    /// Whether the tag in `datagram` is right (compared in constant time).
    pub fn verify(&self, datagram: &[u8], auth_at: usize) -> bool {
        let tag_at = auth_at + auth_field::TAG.start;
        let Some(received) = datagram.get(tag_at..tag_at + AUTH_TAG_LEN) else {
            return false;
        };
        let mut mac = self.mac.clone();
        mac.update(&datagram[..tag_at]);
        mac.update(&datagram[tag_at + AUTH_TAG_LEN..]);
        mac.verify_truncated_left(received).is_ok()
    }
}

/// The keys of one node: the first is the one it sends with.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRing {
    keys: Vec<Key>,
}

impl KeyRing {
    /// A ring of `keys`, the first being the send key; `None` if empty or an
    /// ID repeats.
    pub fn new(keys: Vec<Key>) -> Option<KeyRing> {
        let mut ids: Vec<u8> = keys.iter().map(|k| k.id).collect();
        ids.sort_unstable();
        ids.dedup();
        (!keys.is_empty() && ids.len() == keys.len()).then_some(KeyRing { keys })
    }

    /// Parses a key file's text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<KeyRing, KeyError> {
        let invalid = |reason: String| KeyError::Invalid {
            origin: origin.to_owned(),
            reason,
        };
        let file: KeyFile = toml::from_str(text).map_err(|e| invalid(e.message().to_owned()))?;
        let mut keys = Vec::with_capacity(file.key.len());
        for entry in file.key {
            let secret = parse_hex(&entry.secret)
                .ok_or_else(|| invalid(format!("key {}: secret is not hex digits", entry.id)))?;
            let node = entry
                .node
                .as_deref()
                .map(|text| {
                    crate::config::parse_node_id(text).ok_or_else(|| {
                        invalid(format!(
                            "key {}: node {text:?} is not six hex bytes",
                            entry.id
                        ))
                    })
                })
                .transpose()?;
            let key = Key::new(entry.id, &secret, node).ok_or_else(|| {
                invalid(format!(
                    "key {}: secret of {} bytes; at least {MIN_SECRET_LEN} (openssl rand -hex 32)",
                    entry.id,
                    secret.len()
                ))
            })?;
            keys.push(key);
        }
        KeyRing::new(keys).ok_or_else(|| invalid("no key, or a key ID used twice".to_owned()))
    }

    /// Reads a key file, which only its owner may read.
    pub fn from_file(path: &Path) -> Result<KeyRing, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let name = path.display().to_string();
        let read = |source| KeyError::Read {
            path: name.clone(),
            source,
        };
        let metadata = std::fs::metadata(path).map_err(read)?;
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: name, mode });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Self::from_toml(&text, &name)
    }

    /// The key this node sends with.
    pub fn send_key(&self) -> &Key {
        &self.keys[0]
    }

    /// The key with `id`.
    pub fn get(&self, id: u8) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// Every key.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A fresh key file stanza with 32 random bytes from the kernel, for
/// `--generate-key`.
pub fn generate_key_stanza(id: u8) -> std::io::Result<String> {
    let mut secret = [0u8; 32];
    let mut random = std::fs::File::open("/dev/urandom")?;
    std::io::Read::read_exact(&mut random, &mut secret)?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "[[key]]\nid = {id}\nsecret = \"{hex}\"\n# node = \"02:00:00:00:00:c1\"   # bind it to one client node\n"
    ))
}

/// The counters received from one peer: the highest, and which of the
/// [`REPLAY_WINDOW`] below it were seen (RFC 4303 §3.4.3, with a wider window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayWindow {
    top: Option<u64>,
    seen: Box<[u64; (REPLAY_WINDOW / 64) as usize]>,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            top: None,
            seen: Box::new([0; (REPLAY_WINDOW / 64) as usize]),
        }
    }
}

impl ReplayWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(counter: u64) -> (usize, u64) {
        let index = counter % REPLAY_WINDOW;
        ((index / 64) as usize, 1u64 << (index % 64))
    }

    /// Whether `counter` is new: above the highest, or within the window and
    /// not seen yet.
    pub fn check(&self, counter: u64) -> bool {
        match self.top {
            None => true,
            Some(top) if counter > top => true,
            Some(top) => {
                let (word, bit) = Self::slot(counter);
                top - counter < REPLAY_WINDOW && self.seen[word] & bit == 0
            }
        }
    }

    /// Records `counter` if it is new; returns whether it was.
    pub fn accept(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        match self.top {
            Some(top) if counter <= top => {}
            Some(top) => {
                let ahead = counter - top;
                if ahead >= REPLAY_WINDOW {
                    self.seen.fill(0);
                } else {
                    for step in 1..=ahead {
                        let (word, bit) = Self::slot(top + step);
                        self.seen[word] &= !bit;
                    }
                }
                self.top = Some(counter);
            }
            None => self.top = Some(counter),
        }
        let (word, bit) = Self::slot(counter);
        self.seen[word] |= bit;
        true
    }

    /// The highest counter seen.
    pub fn top(&self) -> Option<u64> {
        self.top
    }
}

/// Limits of [`SourceLimiter`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Handshakes per second allowed from one source address.
    pub per_source: f64,
    /// Burst allowed from one source address.
    pub burst: f64,
    /// Handshakes per second allowed from all sources together.
    pub total: f64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_source: 5.0,
            burst: 10.0,
            total: 5000.0,
        }
    }
}

/// Token buckets for handshakes (`ENABLE`, and anything from an unknown node,
/// the datagrams that make the proxy end do work or keep state) per source
/// address, in a fixed array indexed by a keyed hash of the address: a
/// flood from spoofed addresses cannot grow it. Sources that share a bucket
/// share its rate. One more bucket caps all sources together.
#[derive(Debug, Clone)]
pub struct SourceLimiter {
    limit: RateLimit,
    buckets: Vec<(f64, Timestamp)>,
    total: (f64, Timestamp),
    seed: u64,
}

/// Buckets of a [`SourceLimiter`].
const BUCKETS: usize = 4096;

impl SourceLimiter {
    /// A limiter with `limit`; `seed` keys the hash (so nobody can pick
    /// addresses that share one bucket).
    pub fn new(limit: RateLimit, seed: u64) -> Self {
        SourceLimiter {
            limit,
            buckets: vec![(limit.burst, Timestamp::ZERO); BUCKETS],
            total: (limit.total, Timestamp::ZERO),
            seed,
        }
    }

    /// The limits in use.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    fn index(&self, source: IpAddr) -> usize {
        let bits: u128 = match source {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        };
        let mut x = self.seed ^ (bits as u64) ^ ((bits >> 64) as u64).rotate_left(17);
        // SplitMix64 finaliser.
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((x ^ (x >> 31)) % BUCKETS as u64) as usize
    }

    fn take(bucket: &mut (f64, Timestamp), now: Timestamp, rate: f64, burst: f64) -> bool {
        let elapsed = now.saturating_since(bucket.1).as_secs_f64();
        bucket.0 = (bucket.0 + elapsed * rate).min(burst);
        bucket.1 = now;
        if bucket.0 >= 1.0 {
            bucket.0 -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a handshake from `source` may be handled at `now` (takes a token).
    pub fn allow(&mut self, now: Timestamp, source: IpAddr) -> bool {
        let limit = self.limit;
        let index = self.index(source);
        // Peek the total first so a refused source does not spend its token.
        let total_burst = limit.total.max(1.0);
        let elapsed = now.saturating_since(self.total.1).as_secs_f64();
        if (self.total.0 + elapsed * limit.total).min(total_burst) < 1.0 {
            return false;
        }
        if !Self::take(&mut self.buckets[index], now, limit.per_source, limit.burst) {
            return false;
        }
        Self::take(&mut self.total, now, limit.total, total_burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    const SECRET: [u8; 32] = [7; 32];

    #[test]
    fn tags_cover_everything_but_themselves() {
        let key = Key::new(1, &SECRET, None).unwrap();
        let mut datagram = vec![0u8; 80];
        for (i, b) in datagram.iter_mut().enumerate() {
            *b = i as u8;
        }
        let auth_at = 30;
        key.sign(&mut datagram, auth_at);
        assert!(key.verify(&datagram, auth_at));
        for at in [0, 29, 30, 38, 70, 79] {
            let mut forged = datagram.clone();
            forged[at] ^= 1;
            assert!(!key.verify(&forged, auth_at), "a flip at {at} is caught");
        }
        let other = Key::new(1, &[8; 32], None).unwrap();
        assert!(!other.verify(&datagram, auth_at), "another secret");
        assert!(!key.verify(&datagram[..40], auth_at), "cut short");
        assert!(
            Key::new(1, &[0; 31], None).is_none(),
            "short secrets refused"
        );
    }

    #[test]
    fn key_files_parse_and_refuse_bad_keys() {
        let hex: String = "ab".repeat(32);
        let ring = KeyRing::from_toml(
            &format!(
                "[[key]]\nid = 2\nsecret = \"{hex}\"\n\n[[key]]\nid = 1\nsecret = \"{hex}\"\nnode = \"02:00:00:00:00:c1\"\n"
            ),
            "keys.toml",
        )
        .unwrap();
        assert_eq!(ring.send_key().id, 2);
        assert_eq!(
            ring.get(1).unwrap().node,
            Some(NodeId([2, 0, 0, 0, 0, 0xc1]))
        );
        assert!(ring.get(3).is_none());
        for (text, says) in [
            (
                format!("[[key]]\nid = 1\nsecret = \"{}\"\n", "ab".repeat(16)),
                "at least 32",
            ),
            ("[[key]]\nid = 1\nsecret = \"xyz\"\n".to_owned(), "not hex"),
            (
                format!("[[key]]\nid = 1\nsecret = \"{hex}\"\nnode = \"me\"\n"),
                "six hex bytes",
            ),
            (
                format!(
                    "[[key]]\nid = 1\nsecret = \"{hex}\"\n[[key]]\nid = 1\nsecret = \"{hex}\"\n"
                ),
                "used twice",
            ),
            (
                format!("[[key]]\nid = 1\nsecret = \"{hex}\"\ncolour = 1\n"),
                "unknown field",
            ),
            ("key = []\n".to_owned(), "no key"),
        ] {
            let error = KeyRing::from_toml(&text, "keys.toml")
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("keys.toml") && error.contains(says),
                "{error}"
            );
        }
    }

    #[test]
    fn key_files_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, generate_key_stanza(5).unwrap()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = KeyRing::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("chmod 600"), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ring = KeyRing::from_file(&path).unwrap();
        assert_eq!(ring.send_key().id, 5);
    }

    #[test]
    fn replay_window_accepts_each_counter_once() {
        let mut w = ReplayWindow::new();
        assert!(w.accept(1000));
        assert!(!w.accept(1000), "replayed");
        assert!(w.accept(998), "late but new");
        assert!(!w.accept(998));
        assert!(w.accept(1000 + REPLAY_WINDOW + 3));
        assert!(!w.accept(1000), "fell out of the window");
        assert!(!w.check(3));
        assert!(w.accept(1000 + REPLAY_WINDOW + 2), "just behind the top");
        assert_eq!(w.top(), Some(1000 + REPLAY_WINDOW + 3));
    }

    proptest! {
        #[test]
        fn prop_window_delivers_each_counter_once(
            base in 0u64..u64::MAX / 2,
            offsets in proptest::collection::vec(0u64..3000, 1..500),
        ) {
            let mut w = ReplayWindow::new();
            let mut delivered = std::collections::HashSet::new();
            for off in offsets {
                let c = base + off;
                // Within a 3000-wide spread nothing falls out of the window.
                prop_assert_eq!(w.accept(c), delivered.insert(c));
            }
        }
    }

    #[test]
    fn sources_are_limited_alone_and_together() {
        let limit = RateLimit {
            per_source: 2.0,
            burst: 4.0,
            total: 100.0,
        };
        let mut limiter = SourceLimiter::new(limit, 42);
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let b: IpAddr = "198.51.100.8".parse().unwrap();
        let t = Timestamp::from_secs(10);
        let allowed = (0..10).filter(|_| limiter.allow(t, a)).count();
        assert_eq!(allowed, 4, "the burst");
        assert!(limiter.allow(t, b), "another source has its own bucket");
        assert!(!limiter.allow(t + Duration::from_millis(100), a));
        assert!(
            limiter.allow(t + Duration::from_millis(600), a),
            "refilled at 2/s"
        );
        // Many sources: the total caps them.
        let mut limiter = SourceLimiter::new(limit, 42);
        let total = (0..1000u32)
            .filter(|i| limiter.allow(t, IpAddr::V4((0x0a00_0000 + i).into())))
            .count();
        assert!((100..=101).contains(&total), "{total}");
    }
}
