//! The bodies of the cargo-fuzz targets in `fuzz/`, as library functions so `cargo test` replays the
//! checked-in corpora through exactly the code the fuzzer runs (`tests/fuzz_corpus.rs`).
//!
//! Adding a target: write `pub fn NAME(data: &[u8])` here, a `fuzz/fuzz_targets/NAME.rs` that calls
//! it, a `[[bin]]` in `fuzz/Cargo.toml`, a seed in `fuzz/corpus/NAME/`, and a row in the replay test.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Uri;

use crate::connection::{scan_head, HeadScanResult};
use crate::convert::converter::{decide, CookieJar, Policy};
use crate::convert::wire::{MessageRepr, Parsed};
use crate::http::headers;
use crate::http::target::{host_and_port, loggable, parse_target};

/// The request-head scanner and every parser a request target and its fields go through: never a
/// panic; a head scanned whole or in two pieces gets the same verdict; what `parse_target` accepts
/// has a host, a non-zero port and a path; the logged URL never carries user info.
pub fn request_head(data: &[u8]) {
    const LIMIT: usize = 8192;
    let whole = scan_head(data, LIMIT);
    // Fed in two pieces as a socket may deliver it: the first piece alone is at most as complete.
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    if let HeadScanResult::Complete(_) = scan_head(&data[..split], LIMIT) {
        assert!(
            !matches!(whole, HeadScanResult::Partial),
            "a prefix completed but the whole is partial"
        );
    }
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut fields);
    if !matches!(request.parse(data), Ok(httparse::Status::Complete(_))) {
        return;
    }
    if let Some(Ok(uri)) = request.path.map(str::parse::<Uri>) {
        if let Ok(target) = parse_target(&uri) {
            assert!(!target.host.is_empty() && target.port != 0);
            assert!(target.origin_form.path().starts_with('/'));
        }
        let logged = loggable(&uri);
        if let Some(authority) = uri.authority() {
            // The logged authority (between `scheme://` and the path) carries no user info; the
            // path may contain anything.
            let after_scheme = logged.split_once("://").map_or(logged.as_str(), |(_, r)| r);
            let logged_authority = after_scheme.split(['/', '?']).next().unwrap_or("");
            assert!(!logged_authority.contains('@'), "{logged}");
            let _ = host_and_port(authority, None);
        }
    }
    let mut map = HeaderMap::new();
    for field in request.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) {
            map.append(name, value);
        }
    }
    let _ = headers::check_framing(&map);
    let _ = headers::max_forwards(&map);
    let _ = headers::accepts_trailers(&map);
    headers::remove_hop_by_hop(&mut map);
    assert!(!map.contains_key(http::header::CONNECTION));
    if headers::fix_response_framing(&mut map) {
        assert!(!map.contains_key(http::header::CONTENT_LENGTH));
    }
}

/// The configuration parser and validation: any text gives a config or an error, never a panic.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::Config::from_toml(text, "fuzz");
    }
}

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
