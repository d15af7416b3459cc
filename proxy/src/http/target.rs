//! Absolute-form request targets.

use http::Uri;

use super::error::ProxyError;

/// Where an absolute-form request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The host, without IPv6 brackets.
    pub host: String,
    /// The port (80 when absent).
    pub port: u16,
    /// The `Host` header value: the authority without user info, port omitted when 80.
    pub host_header: String,
    /// The origin-form request target (`/path?query`).
    pub origin_form: Uri,
}

/// Parses an absolute-form request target (`http://host[:port]/path`).
pub fn parse_target(uri: &Uri) -> Result<Target, ProxyError> {
    match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") => {}
        Some(s) if s.eq_ignore_ascii_case("https") => {
            return Err(ProxyError::BadRequest(
                "https:// URLs go through CONNECT".into(),
            ))
        }
        Some(other) => {
            return Err(ProxyError::BadRequest(format!(
                "unsupported URL scheme {other:?}"
            )))
        }
        None => {
            return Err(ProxyError::BadRequest(
                "expected an absolute-form URL (http://host/path): this is a proxy".into(),
            ))
        }
    }
    let authority = uri
        .authority()
        .ok_or_else(|| ProxyError::BadRequest("URL has no host".into()))?;
    let bracketed = authority.host();
    let host = bracketed.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(ProxyError::BadRequest("URL has an empty host".into()));
    }
    let port = authority.port_u16().unwrap_or(80);
    let host_header = if port == 80 {
        bracketed.to_owned()
    } else {
        format!("{bracketed}:{port}")
    };
    let origin_form = uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .filter(|pq| pq.starts_with('/'))
        .unwrap_or("/")
        .parse()
        .map_err(|_| ProxyError::BadRequest("invalid path".into()))?;
    Ok(Target {
        host: host.to_owned(),
        port,
        host_header,
        origin_form,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn absolute_form_targets() {
        let t = parse_target(&"http://example.com/a?b=1".parse().expect("uri")).expect("target");
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.host_header.as_str(),
                t.origin_form.to_string().as_str()
            ),
            ("example.com", 80, "example.com", "/a?b=1")
        );
        let t =
            parse_target(&"http://user:pw@[fd00:3::2]:8080".parse().expect("uri")).expect("target");
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.host_header.as_str(),
                t.origin_form.to_string().as_str()
            ),
            ("fd00:3::2", 8080, "[fd00:3::2]:8080", "/")
        );
        for bad in ["/relative", "https://example.com/", "ftp://example.com/"] {
            let err = parse_target(&bad.parse().expect("uri")).expect_err(bad);
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
