//! Answers the proxy gives by itself: [`ProxyError`] and its plain-text response.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};

use super::headers::add_via;
use super::ProxyBody;
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

/// A plain-text response with a one-line reason, closing the connection.
pub fn text_response(status: StatusCode, reason: &str) -> Response<ProxyBody> {
    let body = format!(
        "{} {}\n",
        status.as_u16(),
        reason.replace(['\r', '\n'], " ")
    );
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    add_via(headers, Version::HTTP_11);
    response
}

pub(crate) fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

pub(crate) fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
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
        let response = text_response(StatusCode::BAD_GATEWAY, "refused\r\nInjected: yes");
        assert_eq!(response.headers()["connection"], "close");
    }
}
