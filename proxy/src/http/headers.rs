//! Header policy: hop-by-hop fields, `Via`, and message framing checks.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

use super::error::ProxyError;
use super::VIA_PSEUDONYM;

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the de-facto `Proxy-Connection` and `Keep-Alive`.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .chain(headers.get_all("proxy-connection").iter())
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Appends this proxy to `Via`, with the protocol version the message arrived with.
pub fn add_via(headers: &mut HeaderMap, version: Version) {
    let protocol = match version {
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        _ => "1.1",
    };
    let value = format!("{protocol} {VIA_PSEUDONYM}");
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.append(header::VIA, value);
    }
}

/// Rejects ambiguous message framing (request smuggling, RFC 9112 §6.3): both `Content-Length` and
/// `Transfer-Encoding`, conflicting lengths, or a transfer coding that does not end in `chunked`.
pub fn check_framing(headers: &HeaderMap) -> Result<(), ProxyError> {
    let lengths: Vec<&HeaderValue> = headers.get_all(header::CONTENT_LENGTH).iter().collect();
    let codings: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if !lengths.is_empty() && !codings.is_empty() {
        return Err(ProxyError::BadRequest(
            "both Content-Length and Transfer-Encoding (ambiguous framing)".into(),
        ));
    }
    let mut values = lengths
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("invalid").split(','))
        .map(str::trim);
    if let Some(first) = values.next() {
        if first.parse::<u64>().is_err() || values.any(|v| v != first) {
            return Err(ProxyError::BadRequest(
                "invalid or conflicting Content-Length".into(),
            ));
        }
    }
    if let Some(last) = codings.last() {
        let last_coding = last
            .to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .map(|c| c.trim().to_ascii_lowercase());
        if last_coding.as_deref() != Some("chunked") {
            return Err(ProxyError::BadRequest(
                "Transfer-Encoding must end in chunked".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut map = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("proxy-connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-authorization", "Basic eA=="),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("accept", "*/*"),
            ("content-length", "3"),
        ]);
        remove_hop_by_hop(&mut map);
        let mut left: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["accept", "content-length"]);
    }

    #[test]
    fn via_is_appended() {
        let mut map = headers(&[("via", "1.1 other")]);
        add_via(&mut map, Version::HTTP_10);
        let via: Vec<&str> = map
            .get_all("via")
            .iter()
            .map(|v| v.to_str().expect("ascii"))
            .collect();
        assert_eq!(via, vec!["1.1 other", "1.0 mptcp-proxy"]);
    }

    #[test]
    fn framing_checks() {
        assert!(check_framing(&headers(&[("content-length", "5")])).is_ok());
        assert!(check_framing(&headers(&[("transfer-encoding", "gzip, chunked")])).is_ok());
        for bad in [
            &[("content-length", "5"), ("transfer-encoding", "chunked")][..],
            &[("content-length", "5"), ("content-length", "6")][..],
            &[("content-length", "5, 6")][..],
            &[("content-length", "-1")][..],
            &[("transfer-encoding", "chunked, gzip")][..],
        ] {
            let err = check_framing(&headers(bad)).expect_err("must be rejected");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        }
        assert!(check_framing(&headers(&[
            ("content-length", "5"),
            ("content-length", "5")
        ]))
        .is_ok());
    }
}
