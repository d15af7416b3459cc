//! The bodies of the cargo-fuzz targets in `fuzz/`, as library functions so `cargo test` replays the
//! checked-in corpora through exactly the code the fuzzer runs (`tests/fuzz_corpus.rs`).
//!
//! Adding a target: write `pub fn NAME(data: &[u8])` here, a `fuzz/fuzz_targets/NAME.rs` that calls
//! it, a `[[bin]]` in `fuzz/Cargo.toml`, a seed in `fuzz/corpus/NAME/`, and a row in the replay test.

use http::Uri;

use crate::convert::converter::{decide, CookieJar, Policy};
use crate::convert::wire::{MessageRepr, Parsed};
use crate::http::headers::{self, Fields, MaxForwards};
use crate::http::target::{host_and_port, loggable, parse_target};
use crate::http::wire::{self, RequestRewrite};

/// The request-head parser and every parser a request target and its fields go through: never a
/// panic; a head parsed whole or in two pieces gets the same verdict; what `parse_target` accepts
/// has a host, a non-zero port and a path; the logged URL never carries user info; a forwarded head
/// parses again and carries no hop-by-hop field but the proxy's own.
pub fn request_head(data: &[u8]) {
    const LIMIT: usize = 8192;
    let mut storage = wire::field_storage();
    let whole = wire::parse_request(data, &mut storage, LIMIT);
    // Fed in two pieces as a socket may deliver it: the first piece alone is at most as complete.
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let mut prefix_storage = wire::field_storage();
    if let Ok(Some(_)) = wire::parse_request(&data[..split], &mut prefix_storage, LIMIT) {
        assert!(
            !matches!(whole, Ok(None)),
            "a prefix completed but the whole is partial"
        );
    }
    let Ok(Some(head)) = whole else {
        return;
    };
    assert!(head.len <= LIMIT && head.len <= data.len());
    if let Ok(uri) = head.target.parse::<Uri>() {
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
    let fields = Fields(head.fields);
    let framing = headers::check_framing(fields, head.http11);
    let _ = headers::check_host(fields, head.http11);
    let max_forwards = headers::max_forwards(fields);
    let te_trailers = headers::accepts_trailers(fields);
    let _ = headers::expects_continue(fields);
    let Ok(body) = framing else {
        return;
    };
    let mut out = Vec::new();
    wire::write_request_head(
        &mut out,
        &head,
        &RequestRewrite {
            origin_form: "/",
            host: "example.com",
            max_forwards: match max_forwards {
                Ok(MaxForwards::Forward(n)) => Some(n),
                _ => None,
            },
            te_trailers,
            body,
        },
    );
    let mut again = wire::field_storage();
    let forwarded = match wire::parse_request(&out, &mut again, usize::MAX) {
        Ok(Some(forwarded)) => forwarded,
        other => panic!("forwarded head does not parse: {other:?}"),
    };
    assert_eq!(forwarded.len, out.len());
    for field in forwarded.fields {
        let own = field.name.eq_ignore_ascii_case("te")
            || field.name.eq_ignore_ascii_case("connection")
            || field.name.eq_ignore_ascii_case("transfer-encoding");
        assert!(
            own || !headers::is_hop_by_hop(field.name),
            "hop-by-hop {} forwarded",
            field.name
        );
    }
    assert_eq!(
        headers::check_framing(Fields(forwarded.fields), true).ok(),
        Some(body)
    );
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
