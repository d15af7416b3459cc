//! HTTP/1 message heads on the wire (sans-IO): parsing requests and responses with httparse into views of
//! the bytes received, and writing the heads the proxy sends on, rewritten, straight into an output
//! buffer. No header map is built and no field is copied except into the output.
//!
//! Parsing is httparse's with its defaults (what hyper used): tokens for methods and field names, no
//! control bytes in values, no obs-fold, bare LF line ends accepted. The field policy (framing, Host,
//! hop-by-hop fields) is [`super::headers`].

use super::error::ProxyError;
use super::headers::{self, Fields};

/// The most fields a head may have (hyper's default); more is answered 431.
pub const MAX_FIELDS: usize = 100;

/// Storage for the fields of one parsed head.
pub type FieldStorage<'b> = [httparse::Header<'b>; MAX_FIELDS];

/// An empty [`FieldStorage`].
pub const fn field_storage<'b>() -> FieldStorage<'b> {
    [httparse::EMPTY_HEADER; MAX_FIELDS]
}

/// A request head parsed from the start of a buffer.
#[derive(Debug)]
pub struct RequestHead<'b> {
    /// The method, as sent.
    pub method: &'b str,
    /// The request target, as sent.
    pub target: &'b str,
    /// HTTP/1.1 (true) or HTTP/1.0 (false).
    pub http11: bool,
    /// The fields, in order.
    pub fields: &'b [httparse::Header<'b>],
    /// Bytes of the head, the blank line included.
    pub len: usize,
}

/// A response head parsed from the start of a buffer.
#[derive(Debug)]
pub struct ResponseHead<'b> {
    /// The status code.
    pub status: u16,
    /// The reason phrase, as sent (may be empty).
    pub reason: &'b str,
    /// HTTP/1.1 (true) or HTTP/1.0 (false).
    pub http11: bool,
    /// The fields, in order.
    pub fields: &'b [httparse::Header<'b>],
    /// Bytes of the head, the blank line included.
    pub len: usize,
}

/// Parses the request head at the start of `buf`; `Ok(None)` while it is incomplete and within `limit`
/// bytes.
pub fn parse_request<'b>(
    buf: &'b [u8],
    storage: &'b mut FieldStorage<'b>,
    limit: usize,
) -> Result<Option<RequestHead<'b>>, ProxyError> {
    let mut request = httparse::Request::new(storage);
    match request.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() > limit => Err(ProxyError::HeadTooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) if len > limit => Err(ProxyError::HeadTooLarge),
        Ok(httparse::Status::Complete(len)) => Ok(Some(RequestHead {
            method: request.method.unwrap_or_default(),
            target: request.path.unwrap_or_default(),
            http11: request.version == Some(1),
            fields: request.headers,
            len,
        })),
        Err(httparse::Error::TooManyHeaders) => Err(ProxyError::HeadTooLarge),
        Err(httparse::Error::Version) => Err(ProxyError::BadRequest(
            "unsupported HTTP version (HTTP/1.0 and HTTP/1.1 are)".into(),
        )),
        Err(error) => Err(ProxyError::BadRequest(format!(
            "malformed request head: {error}"
        ))),
    }
}

/// Why a response head could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// Not an HTTP/1.x response head.
    #[error("malformed response head: {0}")]
    Malformed(httparse::Error),
    /// Longer than the limit (or more than [`MAX_FIELDS`] fields).
    #[error("response head too large")]
    TooLarge,
}

/// Parses the response head at the start of `buf`; `Ok(None)` while it is incomplete and within `limit`
/// bytes.
pub fn parse_response<'b>(
    buf: &'b [u8],
    storage: &'b mut FieldStorage<'b>,
    limit: usize,
) -> Result<Option<ResponseHead<'b>>, ResponseError> {
    let mut response = httparse::Response::new(storage);
    match response.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() > limit => Err(ResponseError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) if len > limit => Err(ResponseError::TooLarge),
        Ok(httparse::Status::Complete(len)) => Ok(Some(ResponseHead {
            status: response.code.unwrap_or_default(),
            reason: response.reason.unwrap_or_default(),
            http11: response.version == Some(1),
            fields: response.headers,
            len,
        })),
        Err(httparse::Error::TooManyHeaders) => Err(ResponseError::TooLarge),
        Err(error) => Err(ResponseError::Malformed(error)),
    }
}

/// Appends `name: value\r\n`.
pub fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal.
pub fn put_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends `n` in lowercase hexadecimal (a chunk size).
pub fn put_hex(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// The `Via` field value this proxy adds for a message that arrived as HTTP/1.1 or HTTP/1.0.
pub fn via_value(http11: bool) -> &'static [u8] {
    if http11 {
        b"1.1 mptcp-proxy"
    } else {
        b"1.0 mptcp-proxy"
    }
}

/// How the proxy frames a request body it sends upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked (re-framed by the proxy).
    Chunked,
}

/// What the proxy writes in place of the fields it rewrites in a forwarded request.
#[derive(Debug, Clone, Copy)]
pub struct RequestRewrite<'a> {
    /// The origin-form target (`/path?query`).
    pub origin_form: &'a str,
    /// The `Host` value (the absolute-form authority, without user info).
    pub host: &'a str,
    /// The decremented `Max-Forwards`, when the request had one to decrement.
    pub max_forwards: Option<u64>,
    /// The client accepts trailer fields (`TE: trailers`): say so upstream.
    pub te_trailers: bool,
    /// The body's framing.
    pub body: RequestBody,
}

/// Writes the head of a forwarded request: `METHOD origin-form HTTP/1.1`, `Host`, the end-to-end fields
/// in their order, then the proxy's framing, `TE`, `Max-Forwards` and `Via` (appended after any `Via`
/// the request had, RFC 9110 §7.6.3). Hop-by-hop fields, those `Connection` names, and the fields
/// rewritten here are left out.
pub fn write_request_head(out: &mut Vec<u8>, head: &RequestHead<'_>, rewrite: &RequestRewrite<'_>) {
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(rewrite.origin_form.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    put_field(out, b"host", rewrite.host.as_bytes());
    let fields = Fields(head.fields);
    let named = fields.connection_names();
    for field in head.fields {
        let name = field.name;
        if headers::is_hop_by_hop(name)
            || named.contains(name)
            || name.eq_ignore_ascii_case("host")
            || name.eq_ignore_ascii_case("content-length")
            || (rewrite.max_forwards.is_some() && name.eq_ignore_ascii_case("max-forwards"))
        {
            continue;
        }
        put_field(out, name.as_bytes(), field.value);
    }
    match rewrite.body {
        RequestBody::None => {}
        RequestBody::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            put_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        RequestBody::Chunked => put_field(out, b"transfer-encoding", b"chunked"),
    }
    if let Some(left) = rewrite.max_forwards {
        out.extend_from_slice(b"max-forwards: ");
        put_decimal(out, left);
        out.extend_from_slice(b"\r\n");
    }
    if rewrite.te_trailers {
        // TE is hop-by-hop, so it is named in Connection (RFC 9110 §10.1.4).
        put_field(out, b"te", b"trailers");
        put_field(out, b"connection", b"te");
    }
    put_field(out, b"via", via_value(head.http11));
    out.extend_from_slice(b"\r\n");
}

/// How the body of an upstream response is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    /// No body: a response to HEAD, 1xx, 204 or 304.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// Chunked.
    Chunked,
    /// Until the server closes the connection.
    Close,
}

/// What the proxy learned from an upstream response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseFraming {
    /// How its body is delimited.
    pub body: ResponseBody,
    /// It had both `Transfer-Encoding` and `Content-Length`: the length is dropped (it would cut the
    /// body), and the connection is not reused (RFC 9112 §6.3, item 3).
    pub ambiguous: bool,
    /// The server keeps the connection open after this response.
    pub keep_alive: bool,
    /// A valid `Content-Length` without `Transfer-Encoding`: the length of a body, or of the body a
    /// response to HEAD (or a 304) stands for.
    pub length: Option<u64>,
}

/// Reads the framing of a response to a request with `method` (RFC 9112 §6.3). A `Content-Length`
/// that is not one decimal number (or a list of equal ones) is an error.
pub fn response_framing(
    head: &ResponseHead<'_>,
    method_is_head: bool,
) -> Result<ResponseFraming, &'static str> {
    let fields = Fields(head.fields);
    let connection = fields.connection_options();
    let keep_alive = if head.http11 {
        !connection.close
    } else {
        connection.keep_alive && !connection.close
    };
    let no_body = method_is_head
        || (100..200).contains(&head.status)
        || head.status == 204
        || head.status == 304;
    let codings = fields.transfer_codings();
    let length = fields.content_length();
    let ambiguous = codings.present && length.is_some();
    let declared = if codings.present {
        None
    } else {
        length.and_then(Result::ok)
    };
    if no_body {
        return Ok(ResponseFraming {
            body: ResponseBody::None,
            ambiguous,
            keep_alive: keep_alive && !ambiguous,
            length: declared,
        });
    }
    if codings.present {
        // Transfer-Encoding wins over Content-Length; without chunked last, the body runs to the close.
        let body = if codings.chunked_last {
            ResponseBody::Chunked
        } else {
            ResponseBody::Close
        };
        return Ok(ResponseFraming {
            body,
            ambiguous,
            keep_alive: keep_alive && !ambiguous && body == ResponseBody::Chunked,
            length: None,
        });
    }
    match length {
        Some(Ok(n)) => Ok(ResponseFraming {
            body: ResponseBody::Length(n),
            ambiguous: false,
            keep_alive,
            length: Some(n),
        }),
        Some(Err(())) => Err("invalid Content-Length in the response"),
        None => Ok(ResponseFraming {
            body: ResponseBody::Close,
            ambiguous: false,
            keep_alive: false,
            length: None,
        }),
    }
}

/// How the proxy frames a response body for its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientBody {
    /// No body.
    None,
    /// `Content-Length` bytes, as the server sent them.
    Length(u64),
    /// Chunked: the server's chunks re-framed, or a close-delimited body cut into chunks.
    Chunked,
    /// Until the proxy closes the connection (an HTTP/1.0 client, which knows no chunks).
    Close,
}

/// Chooses how a response body reaches a client that speaks HTTP/1.1 (`http11`) or HTTP/1.0.
pub fn client_body(body: ResponseBody, http11: bool) -> ClientBody {
    match body {
        ResponseBody::None => ClientBody::None,
        ResponseBody::Length(n) => ClientBody::Length(n),
        ResponseBody::Chunked | ResponseBody::Close if http11 => ClientBody::Chunked,
        ResponseBody::Chunked | ResponseBody::Close => ClientBody::Close,
    }
}

/// What the proxy writes in place of the fields it rewrites in a response it relays.
#[derive(Debug, Clone, Copy)]
pub struct ResponseRewrite<'a> {
    /// How the body is framed for the client.
    pub body: ClientBody,
    /// The `Content-Length` to send: the body's, or for a response without a body the one the server
    /// declared.
    pub length: Option<u64>,
    /// The proxy closes the client connection after this response.
    pub close: bool,
    /// The client is HTTP/1.0 and keeps the connection: say `Connection: keep-alive`.
    pub keep_alive_http10: bool,
    /// A `Date` value, when the response has none (RFC 9110 §6.6.1).
    pub date: Option<&'a [u8]>,
}

/// Writes the head of a relayed response: `HTTP/1.1 STATUS REASON`, the end-to-end fields in their
/// order, the proxy's framing and `Connection`, `Date` if missing, and `Via`. Hop-by-hop fields, those
/// `Connection` names and the server's `Content-Length` are left out: the framing is the proxy's.
pub fn write_response_head(
    out: &mut Vec<u8>,
    head: &ResponseHead<'_>,
    rewrite: &ResponseRewrite<'_>,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    put_decimal(out, u64::from(head.status));
    out.push(b' ');
    if head.reason.is_empty() {
        let reason = http::StatusCode::from_u16(head.status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        out.extend_from_slice(reason.as_bytes());
    } else {
        out.extend_from_slice(head.reason.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    let named = Fields(head.fields).connection_names();
    for field in head.fields {
        let name = field.name;
        if headers::is_hop_by_hop(name)
            || named.contains(name)
            || name.eq_ignore_ascii_case("content-length")
        {
            continue;
        }
        put_field(out, name.as_bytes(), field.value);
    }
    if let Some(length) = rewrite.length {
        out.extend_from_slice(b"content-length: ");
        put_decimal(out, length);
        out.extend_from_slice(b"\r\n");
    }
    if rewrite.body == ClientBody::Chunked {
        put_field(out, b"transfer-encoding", b"chunked");
    }
    if rewrite.close {
        put_field(out, b"connection", b"close");
    } else if rewrite.keep_alive_http10 {
        put_field(out, b"connection", b"keep-alive");
    }
    if let Some(date) = rewrite.date {
        put_field(out, b"date", date);
    }
    put_field(out, b"via", via_value(head.http11));
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &[u8], f: impl FnOnce(&RequestHead<'_>)) {
        let mut storage = field_storage();
        let head = parse_request(raw, &mut storage, 8192)
            .expect("valid")
            .expect("complete");
        f(&head);
    }

    #[test]
    fn requests_are_rewritten_without_hop_by_hop_fields() {
        let raw = b"GET http://example.com/a?b=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\n\
                    Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nProxy-Authorization: Basic eA==\r\n\
                    Keep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nVia: 1.1 other\r\nAccept: */*\r\n\r\n";
        request(raw, |head| {
            assert_eq!(head.len, raw.len());
            let mut out = Vec::new();
            write_request_head(
                &mut out,
                head,
                &RequestRewrite {
                    origin_form: "/a?b=1",
                    host: "example.com",
                    max_forwards: None,
                    te_trailers: true,
                    body: RequestBody::None,
                },
            );
            assert_eq!(
                String::from_utf8(out).expect("ascii"),
                "GET /a?b=1 HTTP/1.1\r\nhost: example.com\r\nUser-Agent: t\r\nVia: 1.1 other\r\n\
                 Accept: */*\r\nte: trailers\r\nconnection: te\r\nvia: 1.1 mptcp-proxy\r\n\r\n"
            );
        });
    }

    #[test]
    fn request_framing_and_max_forwards_are_the_proxys() {
        let raw =
            b"POST http://h/ HTTP/1.0\r\nHost: h\r\nContent-Length: 5\r\nMax-Forwards: 3\r\n\r\n";
        request(raw, |head| {
            assert!(!head.http11);
            let mut out = Vec::new();
            write_request_head(
                &mut out,
                head,
                &RequestRewrite {
                    origin_form: "/",
                    host: "h",
                    max_forwards: Some(2),
                    te_trailers: false,
                    body: RequestBody::Length(5),
                },
            );
            assert_eq!(
                String::from_utf8(out).expect("ascii"),
                "POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\nmax-forwards: 2\r\n\
                 via: 1.0 mptcp-proxy\r\n\r\n"
            );
        });
    }

    #[test]
    fn request_parse_errors() {
        let mut storage = field_storage();
        assert!(matches!(
            parse_request(b"GET http://h/ HTTP/1.1\r\nHost: h\r\n", &mut storage, 8192),
            Ok(None)
        ));
        let mut storage = field_storage();
        assert!(matches!(
            parse_request(&[b'a'; 100], &mut storage, 50),
            Err(ProxyError::HeadTooLarge)
        ));
        for bad in [
            &b"GET http://h/ HTTP/1.1\r\nX: a\0b\r\n\r\n"[..],
            b"GET http://h/ HTTP/1.1\r\n X: b\r\n\r\n",
            b"G@T http://h/ HTTP/1.1\r\n\r\n",
            b"GET http://h/ HTTP/2.0\r\n\r\n",
            b"GET http://h/ x HTTP/1.1\r\n\r\n",
        ] {
            let mut storage = field_storage();
            let error = parse_request(bad, &mut storage, 8192).expect_err("malformed");
            assert_eq!(error.status().as_u16(), 400, "{bad:?}");
        }
        let many: String = (0..=MAX_FIELDS).map(|i| format!("X-{i}: v\r\n")).collect();
        let raw = format!("GET http://h/ HTTP/1.1\r\n{many}\r\n");
        let mut storage = field_storage();
        assert!(matches!(
            parse_request(raw.as_bytes(), &mut storage, 1 << 20),
            Err(ProxyError::HeadTooLarge)
        ));
    }

    fn framing(raw: &[u8], method_is_head: bool) -> Result<ResponseFraming, &'static str> {
        let mut storage = field_storage();
        let head = parse_response(raw, &mut storage, 8192)
            .expect("valid")
            .expect("complete");
        response_framing(&head, method_is_head)
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let ok = |raw: &[u8]| framing(raw, false).expect("framing");
        assert_eq!(
            ok(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
            ResponseFraming {
                body: ResponseBody::Length(5),
                ambiguous: false,
                keep_alive: true,
                length: Some(5),
            }
        );
        let both =
            ok(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(both.body, ResponseBody::Chunked);
        assert!(both.ambiguous && !both.keep_alive);
        assert_eq!(
            ok(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").body,
            ResponseBody::Close
        );
        let close = ok(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(close.body, ResponseBody::Close);
        assert!(!close.keep_alive);
        assert!(!ok(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n").keep_alive);
        assert!(
            ok(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n")
                .keep_alive
        );
        assert!(
            !ok(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n").keep_alive
        );
        for raw in [
            &b"HTTP/1.1 204 No Content\r\n\r\n"[..],
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
        ] {
            assert_eq!(ok(raw).body, ResponseBody::None, "{raw:?}");
        }
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true)
                .expect("framing")
                .body,
            ResponseBody::None
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        ] {
            assert!(framing(bad, false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn responses_are_rewritten_for_the_client() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\
                    Connection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTrailer: x-sum\r\n\r\n";
        let mut storage = field_storage();
        let head = parse_response(raw, &mut storage, 8192)
            .expect("valid")
            .expect("complete");
        let mut out = Vec::new();
        write_response_head(
            &mut out,
            &head,
            &ResponseRewrite {
                body: ClientBody::Chunked,
                length: None,
                close: true,
                keep_alive_http10: false,
                date: Some(b"Thu, 01 Jan 1970 00:00:00 GMT"),
            },
        );
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            "HTTP/1.1 200 OK\r\nTrailer: x-sum\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\
             date: Thu, 01 Jan 1970 00:00:00 GMT\r\nvia: 1.1 mptcp-proxy\r\n\r\n"
        );
        assert_eq!(client_body(ResponseBody::Close, true), ClientBody::Chunked);
        assert_eq!(client_body(ResponseBody::Chunked, false), ClientBody::Close);
    }

    #[test]
    fn numbers() {
        let mut out = Vec::new();
        put_decimal(&mut out, 0);
        out.push(b' ');
        put_decimal(&mut out, u64::MAX);
        out.push(b' ');
        put_hex(&mut out, 0);
        out.push(b' ');
        put_hex(&mut out, 0x1a2b);
        assert_eq!(out, b"0 18446744073709551615 0 1a2b");
    }
}
