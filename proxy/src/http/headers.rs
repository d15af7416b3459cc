//! Header policy on the fields as received (httparse's views of the head): hop-by-hop fields,
//! `Connection` options, message framing checks, `Host`, `Max-Forwards`, `TE` and `Expect`.

use super::error::ProxyError;
use super::wire::RequestBody;

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

/// Whether a field is hop-by-hop by name (fields that `Connection` names are too: see
/// [`Fields::connection_names`]).
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// The comma-separated elements of a list field value, trimmed, empty ones skipped.
fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|e| !e.is_empty())
}

/// The fields of one head, in order.
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a, 'b>(pub &'a [httparse::Header<'b>]);

/// The field names a `Connection` (or `Proxy-Connection`) field lists: hop-by-hop for this connection.
#[derive(Debug, Default)]
pub struct ConnectionNames<'b> {
    names: Vec<&'b [u8]>,
}

impl ConnectionNames<'_> {
    /// Whether `name` is listed.
    pub fn contains(&self, name: &str) -> bool {
        self.names
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// The `Connection` options that decide whether a connection stays open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnectionOptions {
    /// `close`.
    pub close: bool,
    /// `keep-alive` (what an HTTP/1.0 peer needs to keep the connection).
    pub keep_alive: bool,
}

/// The transfer codings of a message, as far as framing needs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Codings {
    /// A `Transfer-Encoding` field is present.
    pub present: bool,
    /// The last coding is `chunked`.
    pub chunked_last: bool,
}

impl<'a, 'b> Fields<'a, 'b> {
    /// The values of every field called `name`, in order.
    pub fn values(self, name: &'a str) -> impl Iterator<Item = &'b [u8]> + 'a {
        self.0
            .iter()
            .filter(move |f| f.name.eq_ignore_ascii_case(name))
            .map(|f| f.value)
    }

    /// The value of the first field called `name`.
    pub fn get(self, name: &str) -> Option<&'b [u8]> {
        self.0
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
            .map(|f| f.value)
    }

    /// What `Connection` and `Proxy-Connection` list.
    pub fn connection_names(self) -> ConnectionNames<'b> {
        let mut names = ConnectionNames::default();
        for field in self.0 {
            if field.name.eq_ignore_ascii_case("connection")
                || field.name.eq_ignore_ascii_case("proxy-connection")
            {
                names.names.extend(list(field.value));
            }
        }
        names
    }

    /// `close` and `keep-alive` in `Connection` (or the de-facto `Proxy-Connection`).
    pub fn connection_options(self) -> ConnectionOptions {
        let mut options = ConnectionOptions::default();
        for field in self.0 {
            if field.name.eq_ignore_ascii_case("connection")
                || field.name.eq_ignore_ascii_case("proxy-connection")
            {
                for option in list(field.value) {
                    options.close |= option.eq_ignore_ascii_case(b"close");
                    options.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
                }
            }
        }
        options
    }

    /// Whether `Transfer-Encoding` is present and ends in `chunked`.
    pub fn transfer_codings(self) -> Codings {
        let mut codings = Codings::default();
        for value in self.values("transfer-encoding") {
            codings.present = true;
            if let Some(last) = list(value).last() {
                let coding = last
                    .split(|b| *b == b';')
                    .next()
                    .unwrap_or(b"")
                    .trim_ascii();
                codings.chunked_last = coding.eq_ignore_ascii_case(b"chunked");
            }
        }
        codings
    }

    /// The `Content-Length`: None when absent, an error unless every value (of every field, and of a
    /// list) is the same decimal number.
    pub fn content_length(self) -> Option<Result<u64, ()>> {
        let mut length = None;
        for value in self.values("content-length") {
            let mut any = false;
            for element in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                any = true;
                let parsed = (!element.is_empty() && element.iter().all(u8::is_ascii_digit))
                    .then(|| std::str::from_utf8(element).ok()?.parse::<u64>().ok())
                    .flatten();
                match (parsed, length) {
                    (None, _) => return Some(Err(())),
                    (Some(n), Some(Ok(m))) if n != m => return Some(Err(())),
                    (Some(n), _) => length = Some(Ok(n)),
                }
            }
            if !any {
                return Some(Err(()));
            }
        }
        length
    }
}

/// Whether the request's `TE` accepts trailer fields (`TE: trailers`, RFC 9110 §10.1.4).
pub fn accepts_trailers(fields: Fields<'_, '_>) -> bool {
    fields.values("te").flat_map(list).any(|t| {
        t.split(|b| *b == b';')
            .next()
            .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"trailers"))
    })
}

/// Whether the request carries `Expect: 100-continue`.
pub fn expects_continue(fields: Fields<'_, '_>) -> bool {
    fields
        .values("expect")
        .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"100-continue"))
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
pub fn max_forwards(fields: Fields<'_, '_>) -> Result<MaxForwards, ProxyError> {
    let mut values = fields.values("max-forwards");
    let Some(value) = values.next() else {
        return Ok(MaxForwards::Absent);
    };
    let text = value.trim_ascii();
    let parsed = (!text.is_empty() && text.iter().all(u8::is_ascii_digit)).then(|| {
        std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(u64::MAX)
    });
    match (parsed, values.next()) {
        (Some(0), None) => Ok(MaxForwards::Zero),
        (Some(n), None) => Ok(MaxForwards::Forward(n - 1)),
        _ => Err(ProxyError::BadRequest("invalid Max-Forwards".into())),
    }
}

/// Checks a request's framing and says how its body is delimited. Ambiguous or unsupported framing is
/// refused (request smuggling, RFC 9112 §6.3): both `Content-Length` and `Transfer-Encoding`, an invalid
/// or conflicting length, a transfer coding that does not end in `chunked` or applies it twice (400),
/// `Transfer-Encoding` in HTTP/1.0 (400), and any transfer coding besides `chunked` (501: the proxy
/// re-frames bodies and would drop a coding it does not decode).
pub fn check_framing(fields: Fields<'_, '_>, http11: bool) -> Result<RequestBody, ProxyError> {
    let length = fields.content_length();
    let mut codings = fields.values("transfer-encoding").peekable();
    if codings.peek().is_none() {
        return match length {
            None => Ok(RequestBody::None),
            Some(Ok(n)) => Ok(RequestBody::Length(n)),
            Some(Err(())) => Err(ProxyError::BadRequest(
                "invalid or conflicting Content-Length".into(),
            )),
        };
    }
    if length.is_some() {
        return Err(ProxyError::BadRequest(
            "both Content-Length and Transfer-Encoding (ambiguous framing)".into(),
        ));
    }
    if !http11 {
        return Err(ProxyError::BadRequest(
            "Transfer-Encoding in an HTTP/1.0 request".into(),
        ));
    }
    let mut chunked = 0;
    let mut last_chunked = false;
    let mut other = None;
    for value in codings {
        if std::str::from_utf8(value).is_err() {
            return Err(ProxyError::BadRequest("invalid Transfer-Encoding".into()));
        }
        for coding in list(value) {
            let name = coding
                .split(|b| *b == b';')
                .next()
                .unwrap_or(b"")
                .trim_ascii();
            if name.is_empty() {
                continue;
            }
            last_chunked = name.eq_ignore_ascii_case(b"chunked");
            if last_chunked {
                chunked += 1;
            } else if other.is_none() {
                other = Some(String::from_utf8_lossy(name).to_ascii_lowercase());
            }
        }
    }
    if !last_chunked {
        return Err(ProxyError::BadRequest(
            "Transfer-Encoding must end in chunked".into(),
        ));
    }
    if chunked > 1 {
        return Err(ProxyError::BadRequest(
            "chunked applied more than once".into(),
        ));
    }
    if let Some(other) = other {
        return Err(ProxyError::NotImplemented(format!(
            "transfer coding {other:?} is not supported"
        )));
    }
    Ok(RequestBody::Chunked)
}

/// An HTTP/1.1 request needs exactly one `Host` field (RFC 9112 §3.2: 400 without one or with
/// several). Its value is replaced by the absolute-form target's authority when forwarding.
pub fn check_host(fields: Fields<'_, '_>, http11: bool) -> Result<(), ProxyError> {
    match fields.values("host").count() {
        0 if http11 => Err(ProxyError::BadRequest(
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

    /// Runs `f` over the fields `pairs`.
    fn with<T>(pairs: &[(&str, &str)], f: impl FnOnce(Fields<'_, '_>) -> T) -> T {
        let fields: Vec<httparse::Header<'_>> = pairs
            .iter()
            .map(|(name, value)| httparse::Header {
                name,
                value: value.as_bytes(),
            })
            .collect();
        f(Fields(&fields))
    }

    #[test]
    fn hop_by_hop_and_connection_names() {
        for name in [
            "Connection",
            "keep-alive",
            "TE",
            "Proxy-Authorization",
            "upgrade",
        ] {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in ["Trailer", "Accept", "Content-Length", "Via"] {
            assert!(!is_hop_by_hop(name), "{name}");
        }
        with(
            &[
                ("connection", "keep-alive, X-Secret"),
                ("Proxy-Connection", "x-other"),
            ],
            |f| {
                let names = f.connection_names();
                assert!(names.contains("x-secret") && names.contains("X-Other"));
                assert!(!names.contains("accept"));
                assert_eq!(
                    f.connection_options(),
                    ConnectionOptions {
                        close: false,
                        keep_alive: true
                    }
                );
            },
        );
        with(&[("Connection", "Close")], |f| {
            assert!(f.connection_options().close)
        });
    }

    #[test]
    fn trailers_and_expect() {
        assert!(with(&[("te", "gzip;q=0.5, Trailers")], accepts_trailers));
        assert!(!with(&[("te", "gzip")], accepts_trailers));
        assert!(with(&[("expect", "100-Continue")], expects_continue));
        assert!(!with(&[("expect", "x")], expects_continue));
    }

    #[test]
    fn max_forwards_values() {
        assert_eq!(with(&[], max_forwards).ok(), Some(MaxForwards::Absent));
        assert_eq!(
            with(&[("max-forwards", "0")], max_forwards).ok(),
            Some(MaxForwards::Zero)
        );
        assert_eq!(
            with(&[("max-forwards", "3")], max_forwards).ok(),
            Some(MaxForwards::Forward(2))
        );
        assert_eq!(
            with(&[("max-forwards", "99999999999999999999999")], max_forwards).ok(),
            Some(MaxForwards::Forward(u64::MAX - 1))
        );
        for bad in ["-1", "x", "", "1 2"] {
            assert!(
                with(&[("max-forwards", bad)], max_forwards).is_err(),
                "{bad:?}"
            );
        }
        assert!(with(
            &[("max-forwards", "1"), ("max-forwards", "2")],
            max_forwards
        )
        .is_err());
    }

    #[test]
    fn framing_checks() {
        let check = |pairs: &[(&str, &str)]| with(pairs, |f| check_framing(f, true));
        assert_eq!(check(&[]).ok(), Some(RequestBody::None));
        assert_eq!(
            check(&[("content-length", "5")]).ok(),
            Some(RequestBody::Length(5))
        );
        assert_eq!(
            check(&[("transfer-encoding", "Chunked")]).ok(),
            Some(RequestBody::Chunked)
        );
        let err = check(&[("transfer-encoding", "gzip, chunked")])
            .expect_err("an unsupported coding would be dropped");
        assert_eq!(err.status(), StatusCode::NOT_IMPLEMENTED);
        for bad in [
            &[("content-length", "5"), ("transfer-encoding", "chunked")][..],
            &[("transfer-encoding", "chunked"), ("content-length", "5")][..],
            &[("content-length", "5"), ("content-length", "6")][..],
            &[("content-length", "5, 6")][..],
            &[("content-length", "-1")][..],
            &[("content-length", "")][..],
            &[("content-length", "99999999999999999999")][..],
            &[("transfer-encoding", "chunked, gzip")][..],
            &[("transfer-encoding", "chunked, chunked")][..],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ][..],
            &[("transfer-encoding", "xchunked")][..],
            &[("content-length", "+5")][..],
        ] {
            let err = check(bad).expect_err("must be rejected");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad:?}");
        }
        assert_eq!(
            check(&[("content-length", "5"), ("content-length", "5")]).ok(),
            Some(RequestBody::Length(5))
        );
        assert_eq!(
            check(&[("content-length", "5, 5")]).ok(),
            Some(RequestBody::Length(5))
        );
        let http10 = with(&[("transfer-encoding", "chunked")], |f| {
            check_framing(f, false)
        });
        assert_eq!(
            http10.expect_err("no chunked in 1.0").status(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn host_checks() {
        assert!(with(&[("host", "a")], |f| check_host(f, true)).is_ok());
        assert!(with(&[], |f| check_host(f, false)).is_ok());
        assert!(with(&[], |f| check_host(f, true)).is_err());
        assert!(with(&[("host", "a"), ("Host", "b")], |f| check_host(f, true)).is_err());
    }
}
