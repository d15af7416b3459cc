//! Header policy: hop-by-hop fields, `Via`, and message framing checks.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Version;

use super::error::ProxyError;
use super::VIA_PSEUDONYM;

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the de-facto `Proxy-Connection` and `Keep-Alive`.
/// `Trailer` is not one: it announces end-to-end trailer fields (RFC 9110 §6.6.2), which the proxy
/// passes on both ways.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Whether the request's `TE` accepts trailer fields (`TE: trailers`, RFC 9110 §10.1.4). Read before
/// [`remove_hop_by_hop`] removes `TE`.
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// Tells the server that trailers are accepted, for a client that accepts them: the proxy relays
/// them. `TE` is hop-by-hop, so it is named in `Connection` (RFC 9110 §10.1.4).
pub fn forward_trailers_accepted(headers: &mut HeaderMap) {
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("te"));
}

/// A response with both `Transfer-Encoding` and `Content-Length`: the transfer coding wins and the
/// `Content-Length` must go before the message is forwarded (RFC 9112 §6.3, item 3); forwarding it
/// would cut the body at that length. Returns true when it removed one: the server connection is then
/// not reused (the message may be an attempt at response smuggling).
pub fn fix_response_framing(headers: &mut HeaderMap) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING)
        && headers.contains_key(header::CONTENT_LENGTH)
    {
        headers.remove(header::CONTENT_LENGTH);
        return true;
    }
    false
}

/// What `Max-Forwards` (RFC 9110 §7.6.2) says about an OPTIONS or TRACE request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxForwards {
    /// Absent: forward unchanged.
    Absent,
    /// Zero: the proxy is the final recipient and answers itself.
    Zero,
    /// Forward with this (decremented) value.
    Forward(u64),
}

/// Reads and decrements `Max-Forwards`; only OPTIONS and TRACE honour it (RFC 9110 §7.6.2). A value
/// that is not a decimal number is a malformed request.
pub fn max_forwards(headers: &HeaderMap) -> Result<MaxForwards, ProxyError> {
    let mut values = headers.get_all(header::MAX_FORWARDS).iter();
    let Some(value) = values.next() else {
        return Ok(MaxForwards::Absent);
    };
    let text = value.to_str().unwrap_or("").trim();
    let parsed = (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse::<u64>().unwrap_or(u64::MAX));
    match (parsed, values.next()) {
        (Some(0), None) => Ok(MaxForwards::Zero),
        (Some(n), None) => Ok(MaxForwards::Forward(n - 1)),
        _ => Err(ProxyError::BadRequest("invalid Max-Forwards".into())),
    }
}

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

/// Rejects ambiguous or unsupported message framing (request smuggling, RFC 9112 §6.3): both
/// `Content-Length` and `Transfer-Encoding`, an invalid or conflicting length, a transfer coding that
/// does not end in `chunked` or applies it twice (400), and any transfer coding besides `chunked`
/// (501: the proxy re-frames bodies and would drop a coding it does not decode).
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
        let digits = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
        if !digits(first) || first.parse::<u64>().is_err() || values.any(|v| v != first) {
            return Err(ProxyError::BadRequest(
                "invalid or conflicting Content-Length".into(),
            ));
        }
    }
    if !codings.is_empty() {
        let mut list = Vec::new();
        for value in &codings {
            let value = value
                .to_str()
                .map_err(|_| ProxyError::BadRequest("invalid Transfer-Encoding".into()))?;
            list.extend(
                value
                    .split(',')
                    .map(|c| {
                        c.split(';')
                            .next()
                            .unwrap_or("")
                            .trim()
                            .to_ascii_lowercase()
                    })
                    .filter(|c| !c.is_empty()),
            );
        }
        if list.last().map(String::as_str) != Some("chunked") {
            return Err(ProxyError::BadRequest(
                "Transfer-Encoding must end in chunked".into(),
            ));
        }
        if list.iter().filter(|c| *c == "chunked").count() > 1 {
            return Err(ProxyError::BadRequest(
                "chunked applied more than once".into(),
            ));
        }
        if let Some(other) = list.iter().find(|c| *c != "chunked") {
            return Err(ProxyError::NotImplemented(format!(
                "transfer coding {other:?} is not supported"
            )));
        }
    }
    Ok(())
}

/// An HTTP/1.1 request needs exactly one `Host` field (RFC 9112 §3.2: 400 without one or with
/// several). Its value is replaced by the absolute-form target's authority when forwarding.
pub fn check_host(headers: &HeaderMap, version: http::Version) -> Result<(), ProxyError> {
    match headers.get_all(header::HOST).iter().count() {
        0 if version == http::Version::HTTP_11 => Err(ProxyError::BadRequest(
            "an HTTP/1.1 request needs Host".into(),
        )),
        0 | 1 => Ok(()),
        _ => Err(ProxyError::BadRequest("more than one Host".into())),
    }
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
            ("transfer-encoding", "chunked"),
            ("accept", "*/*"),
            ("content-length", "3"),
        ]);
        remove_hop_by_hop(&mut map);
        let mut left: Vec<&str> = map.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, vec!["accept", "content-length"]);
    }

    #[test]
    fn trailer_is_end_to_end_and_te_trailers_is_seen() {
        let mut map = headers(&[("trailer", "x-checksum"), ("te", "gzip;q=0.5, Trailers")]);
        assert!(accepts_trailers(&map));
        remove_hop_by_hop(&mut map);
        assert_eq!(
            map.get("trailer").map(|v| v.as_bytes()),
            Some(&b"x-checksum"[..])
        );
        assert!(!accepts_trailers(&headers(&[("te", "gzip")])));
        let mut out = HeaderMap::new();
        forward_trailers_accepted(&mut out);
        assert_eq!(out["te"], "trailers");
        assert_eq!(out["connection"], "te");
    }

    #[test]
    fn content_length_goes_when_transfer_encoding_is_present() {
        let mut map = headers(&[("content-length", "5"), ("transfer-encoding", "chunked")]);
        assert!(fix_response_framing(&mut map));
        assert!(!map.contains_key("content-length"));
        let mut map = headers(&[("content-length", "5")]);
        assert!(!fix_response_framing(&mut map));
        assert_eq!(map["content-length"], "5");
    }

    #[test]
    fn max_forwards_values() {
        assert_eq!(max_forwards(&headers(&[])).ok(), Some(MaxForwards::Absent));
        assert_eq!(
            max_forwards(&headers(&[("max-forwards", "0")])).ok(),
            Some(MaxForwards::Zero)
        );
        assert_eq!(
            max_forwards(&headers(&[("max-forwards", "3")])).ok(),
            Some(MaxForwards::Forward(2))
        );
        assert_eq!(
            max_forwards(&headers(&[("max-forwards", "99999999999999999999999")])).ok(),
            Some(MaxForwards::Forward(u64::MAX - 1))
        );
        for bad in ["-1", "x", "", "1 2"] {
            assert!(
                max_forwards(&headers(&[("max-forwards", bad)])).is_err(),
                "{bad:?}"
            );
        }
        assert!(max_forwards(&headers(&[("max-forwards", "1"), ("max-forwards", "2")])).is_err());
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
        assert!(check_framing(&headers(&[("transfer-encoding", "Chunked")])).is_ok());
        let err = check_framing(&headers(&[("transfer-encoding", "gzip, chunked")]))
            .expect_err("an unsupported coding would be dropped");
        assert_eq!(err.status(), StatusCode::NOT_IMPLEMENTED);
        for bad in [
            &[("content-length", "5"), ("transfer-encoding", "chunked")][..],
            &[("content-length", "5"), ("content-length", "6")][..],
            &[("content-length", "5, 6")][..],
            &[("content-length", "-1")][..],
            &[("transfer-encoding", "chunked, gzip")][..],
            &[("transfer-encoding", "chunked, chunked")][..],
            &[("transfer-encoding", "xchunked")][..],
            &[("content-length", "+5")][..],
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
