//! The bodies of the cargo-fuzz targets in `fuzz/`, as library functions so `cargo test` replays the
//! checked-in corpora through exactly the code the fuzzer runs (`tests/fuzz_corpus.rs`).
//!
//! Adding a target: write `pub fn NAME(data: &[u8])` here, a `fuzz/fuzz_targets/NAME.rs` that calls
//! it, a `[[bin]]` in `fuzz/Cargo.toml`, a seed in `fuzz/corpus/NAME/`, and a row in the replay test.

use crate::convert::converter::{decide, CookieJar, Policy};
use crate::convert::wire::{MessageRepr, Parsed};

/// RFC 8803 Convert messages: the parser never panics, whatever parses re-emits to bytes that parse
/// the same, and the converter's decisions (open, and requiring cookies) never panic.
pub fn convert_message(data: &[u8]) {
    if let Ok(Parsed::Complete { message, .. }) = MessageRepr::parse(data) {
        let bytes = message.to_bytes().expect("a parsed message fits");
        match MessageRepr::parse(&bytes) {
            Ok(Parsed::Complete { message: again, .. }) => assert_eq!(again, message),
            other => panic!("re-emitted message does not parse: {other:?}"),
        }
    }
    let client = std::net::IpAddr::from([10, 0, 1, 2]);
    let _ = decide(data, client, &Policy { cookies: None });
    let _ = decide(
        data,
        client,
        &Policy {
            cookies: Some(CookieJar::new([1; 32])),
        },
    );
}
