//! Absolute-form request targets.

use http::uri::Authority;
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
    let (host, port) = host_and_port(authority, Some(80))?;
    let bracketed = authority.host();
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

/// The host (without IPv6 brackets) and port of an authority, checked: the host is an IP literal or
/// a DNS name (no percent-encoding, no zone, nothing a resolver could read differently from the ACL),
/// and a port that is present must be 1-65535. Without a port, `default` is used; `None` means the
/// port is required (CONNECT). User info is ignored here (see [`loggable`]).
pub fn host_and_port(
    authority: &Authority,
    default: Option<u16>,
) -> Result<(String, u16), ProxyError> {
    let text = authority.as_str();
    let host_port = text.rsplit_once('@').map_or(text, |(_, rest)| rest);
    let (host, port) = if let Some(rest) = host_port.strip_prefix('[') {
        let (literal, after) = rest
            .split_once(']')
            .ok_or_else(|| ProxyError::BadRequest("unclosed IPv6 literal".into()))?;
        if literal.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(ProxyError::BadRequest("invalid IPv6 literal".into()));
        }
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| ProxyError::BadRequest("invalid authority".into()))?,
            ),
        };
        (literal, port)
    } else {
        match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        }
    };
    if host.is_empty() {
        return Err(ProxyError::BadRequest("URL has an empty host".into()));
    }
    if !host_port.starts_with('[') && !is_dns_name(host) {
        return Err(ProxyError::BadRequest(
            "the host is neither an IP address nor a DNS name".into(),
        ));
    }
    let port = match port {
        // RFC 3986 §3.2.3: an empty port means the default.
        None | Some("") => {
            default.ok_or_else(|| ProxyError::BadRequest("a port is needed".into()))?
        }
        Some(p) => p
            .bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| p.parse::<u16>().ok())
            .flatten()
            .filter(|p| *p != 0)
            .ok_or_else(|| ProxyError::BadRequest("invalid port".into()))?,
    };
    Ok((host.to_owned(), port))
}

/// Letters, digits, `-`, `_` and `.`, in labels of 1-63 bytes, at most 253 bytes: what a resolver
/// and the ACL read the same way. IPv4 literals pass too.
fn is_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The request target as the access log shows it: without user info, which may hold a password.
pub fn loggable(uri: &Uri) -> String {
    match uri.authority() {
        Some(authority) if authority.as_str().contains('@') => {
            let host_port = authority
                .as_str()
                .rsplit_once('@')
                .map_or(authority.as_str(), |(_, rest)| rest);
            match uri.scheme_str() {
                Some(scheme) => format!(
                    "{scheme}://{host_port}{}",
                    uri.path_and_query().map_or("", |pq| pq.as_str())
                ),
                None => host_port.to_owned(),
            }
        }
        _ => uri.to_string(),
    }
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
        for bad in [
            "/relative",
            "https://example.com/",
            "ftp://example.com/",
            "http://example.com:99999/",
            "http://example.com:0/",
            "http://example.com:8x/",
            "http://%31%30.0.3.2/",
            "http://[fe80::1%25eth0]/",
            "http://[10.0.3.2]/",
        ] {
            // Some do not even parse as a URI (hyper answers those 400 itself).
            if let Ok(uri) = bad.parse::<Uri>() {
                let err = parse_target(&uri).expect_err(bad);
                assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{bad}");
            }
        }
    }

    #[test]
    fn ports_and_hosts() {
        let authority = |s: &str| s.parse::<Authority>().expect("authority");
        assert_eq!(
            host_and_port(&authority("example.com:"), Some(80)).ok(),
            Some(("example.com".to_owned(), 80))
        );
        assert_eq!(
            host_and_port(&authority("u:p@[::1]:443"), None).ok(),
            Some(("::1".to_owned(), 443))
        );
        assert!(host_and_port(&authority("example.com"), None).is_err());
        assert!(host_and_port(&authority("example.com:65536"), None).is_err());
        assert!(host_and_port(&authority("example.com:+443"), None).is_err());
    }

    #[test]
    fn user_info_never_reaches_the_log() {
        let uri: Uri = "http://user:secretpw@example.com:8080/x?y=1"
            .parse()
            .expect("uri");
        assert_eq!(loggable(&uri), "http://example.com:8080/x?y=1");
        let uri: Uri = "http://example.com/x".parse().expect("uri");
        assert_eq!(loggable(&uri), "http://example.com/x");
        let connect: Uri = "user:pw@example.com:443".parse().expect("authority-form");
        assert_eq!(loggable(&connect), "example.com:443");
    }
}
