//! Connecting to servers: resolve, check every address against the destination ACL, connect.
//!
//! Used by the forward proxy, CONNECT tunnels and transparent listeners alike.

use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpStream;

use crate::http::{ProxyError, Shared};
use crate::sockets::upstream_socket;

/// Resolves `host`, checks every address against the destination ACL, and connects to the first
/// allowed address that answers, within `upstream.connect_timeout`.
pub async fn connect_upstream(
    shared: &Shared,
    host: &str,
    port: u16,
) -> Result<(TcpStream, SocketAddr), ProxyError> {
    let timeout = shared.config.upstream.connect_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let addresses: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            match tokio::time::timeout_at(deadline, tokio::net::lookup_host((host, port))).await {
                Err(_) => {
                    return Err(ProxyError::GatewayTimeout(format!(
                        "resolving {host} timed out"
                    )))
                }
                Ok(Err(e)) => {
                    return Err(ProxyError::BadGateway(format!(
                        "cannot resolve {host}: {e}"
                    )))
                }
                Ok(Ok(addresses)) => addresses.collect(),
            }
        }
    };
    let mut denied = None;
    let allowed: Vec<SocketAddr> = addresses
        .into_iter()
        .filter(|a| match shared.acl.check_destination(a.ip()) {
            Ok(()) => true,
            Err(d) => {
                denied.get_or_insert(d);
                false
            }
        })
        .collect();
    if allowed.is_empty() {
        shared.upstream_error(if denied.is_some() {
            "denied"
        } else {
            "resolve"
        });
        return Err(match denied {
            Some(d) => ProxyError::Denied(d),
            None => ProxyError::BadGateway(format!("{host} has no address")),
        });
    }
    let mut last_error = None;
    for address in allowed {
        let socket = upstream_socket(address, shared.config.upstream.mptcp)
            .map_err(|e| ProxyError::BadGateway(format!("socket for {address}: {e}")))?;
        match tokio::time::timeout_at(deadline, socket.connect(address)).await {
            Err(_) => {
                shared.upstream_error("timeout");
                return Err(ProxyError::GatewayTimeout(format!(
                    "connecting to {address} timed out after {timeout:?}"
                )));
            }
            Ok(Ok(stream)) => return Ok((stream, address)),
            Ok(Err(e)) => last_error = Some((address, e)),
        }
    }
    let Some((address, error)) = last_error else {
        return Err(ProxyError::BadGateway(format!("{host} has no address")));
    };
    shared.upstream_error(if error.kind() == std::io::ErrorKind::ConnectionRefused {
        "refused"
    } else {
        "unreachable"
    });
    Err(ProxyError::BadGateway(format!(
        "connecting to {address}: {error}"
    )))
}
