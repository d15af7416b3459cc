//! Answers the proxy gives by itself: [`ProxyError`] and its plain-text response.

use http::StatusCode;

use super::wire::{put_decimal, put_field, via_value};
use crate::acl::Denied;

/// Why a request is answered by the proxy itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request is malformed or not a proxy request (400).
    #[error("{0}")]
    BadRequest(String),
    /// An ACL denies it (403).
    #[error("{0}")]
    Denied(#[from] Denied),
    /// The request uses something the proxy does not implement, e.g. a transfer coding (501).
    #[error("{0}")]
    NotImplemented(String),
    /// The request head exceeds `limits.max_header_bytes` (431).
    #[error("request head too large")]
    HeadTooLarge,
    /// Credentials are missing or wrong (407).
    #[error("proxy authentication required")]
    AuthRequired,
    /// The server refused, is unreachable or failed (502). The text is what the client sees: name the
    /// host as the client gave it, never a resolved address.
    #[error("{0}")]
    BadGateway(String),
    /// Connecting to the server, or its response, timed out (504).
    #[error("{0}")]
    GatewayTimeout(String),
}

impl ProxyError {
    /// The status code sent to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::Denied(_) => StatusCode::FORBIDDEN,
            ProxyError::AuthRequired => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ProxyError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The one-line reason sent to the client. It names what the client asked for (host and port as
    /// given), never a resolved address, a denied network or the proxy's own addresses: those go to
    /// the log only.
    pub fn public_message(&self) -> String {
        match self {
            ProxyError::Denied(denied) => denied.public_reason(),
            other => other.to_string(),
        }
    }

    /// Squid's result code for the access log.
    pub(crate) fn result_code(&self) -> &'static str {
        match self {
            ProxyError::Denied(_) | ProxyError::AuthRequired => "TCP_DENIED",
            ProxyError::BadGateway(_) | ProxyError::GatewayTimeout(_) => "TCP_MISS",
            ProxyError::BadRequest(_)
            | ProxyError::NotImplemented(_)
            | ProxyError::HeadTooLarge => "NONE_NONE",
        }
    }
}

/// Writes a plain-text response with a one-line reason that closes the connection: the proxy's own
/// answers. `fields` are extra fields (a `Proxy-Authenticate` challenge).
pub fn write_text_response(
    out: &mut Vec<u8>,
    status: StatusCode,
    reason: &str,
    fields: &[(&[u8], &[u8])],
) {
    let body = format!(
        "{} {}\n",
        status.as_u16(),
        reason.replace(['\r', '\n'], " ")
    );
    out.extend_from_slice(b"HTTP/1.1 ");
    put_decimal(out, u64::from(status.as_u16()));
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    put_field(out, b"content-type", b"text/plain; charset=utf-8");
    put_field(out, b"connection", b"close");
    for (name, value) in fields {
        put_field(out, name, value);
    }
    out.extend_from_slice(b"content-length: ");
    put_decimal(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    super::date::with_date(|date| put_field(out, b"date", date));
    put_field(out, b"via", via_value(true));
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_statuses() {
        assert_eq!(ProxyError::AuthRequired.status().as_u16(), 407);
        assert_eq!(ProxyError::BadGateway("x".into()).status().as_u16(), 502);
        assert_eq!(
            ProxyError::GatewayTimeout("x".into()).status().as_u16(),
            504
        );
        assert_eq!(
            ProxyError::Denied(Denied::ConnectPort(1)).status().as_u16(),
            403
        );
        let mut out = Vec::new();
        write_text_response(
            &mut out,
            StatusCode::BAD_GATEWAY,
            "refused\r\nInjected: yes",
            &[],
        );
        let text = String::from_utf8(out).expect("ascii");
        assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{text}");
        assert!(text.contains("\r\nconnection: close\r\n"), "{text}");
        assert!(
            text.ends_with("\r\n\r\n502 refused  Injected: yes\n"),
            "{text}"
        );
        assert!(!text.contains("\r\nInjected"), "{text}");
    }
}
