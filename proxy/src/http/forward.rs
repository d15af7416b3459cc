//! Absolute-form forwarding, with one kept upstream connection per client connection.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::error::ProxyError;
use super::headers::{
    accepts_trailers, add_via, fix_response_framing, forward_trailers_accepted, remove_hop_by_hop,
};
use super::target::{parse_target, Target};
use super::{HttpConnection, Pending, Served, Shared};
use crate::connection::ClientConnection;
use crate::upstream::connect_upstream;

/// An idle upstream connection kept for the next request of the same client connection.
#[derive(Debug)]
pub(super) struct Upstream {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) peer: SocketAddr,
    pub(super) sender: SendRequest<Incoming>,
}

async fn open_upstream(
    shared: &Shared,
    client: &ClientConnection,
    target: &Target,
) -> Result<Upstream, ProxyError> {
    let (stream, peer) = connect_upstream(shared, &target.host, target.port).await?;
    client.upstream_connected();
    shared.attach_destination(client, &target.host, peer);
    let (sender, driver) = match hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
    {
        Ok(handshake) => handshake,
        Err(e) => {
            shared.upstream_error("protocol");
            return Err(ProxyError::BadGateway(format!("upstream {peer}: {e}")));
        }
    };
    tokio::spawn(async move {
        if let Err(error) = driver.await {
            tracing::debug!(%peer, %error, "upstream connection ended with an error");
        }
    });
    Ok(Upstream {
        host: target.host.clone(),
        port: target.port,
        peer,
        sender,
    })
}

impl HttpConnection {
    fn take_upstream(&self, host: &str, port: u16) -> Option<Upstream> {
        let mut slot = self.upstream.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(u) if u.host == host && u.port == port && !u.sender.is_closed() => Some(u),
            _ => None,
        }
    }

    fn keep_upstream(&self, upstream: Upstream) {
        *self.upstream.lock().unwrap_or_else(|p| p.into_inner()) = Some(upstream);
    }
}

/// Forwards an absolute-form request and returns the server's response head.
pub(super) async fn forward(
    shared: &Arc<Shared>,
    connection: &Arc<HttpConnection>,
    mut request: Request<Incoming>,
    pending: &mut Pending,
) -> Result<Served, ProxyError> {
    let target = parse_target(request.uri())?;
    shared.acl.check_safe_port(target.port)?;
    let mut upstream = match connection.take_upstream(&target.host, target.port) {
        Some(upstream) => upstream,
        None => open_upstream(shared, &connection.client, &target).await?,
    };
    pending.entry.peer = Some(upstream.peer.ip());

    let version = request.version();
    *request.uri_mut() = target.origin_form.clone();
    *request.version_mut() = Version::HTTP_11;
    let headers = request.headers_mut();
    let trailers = accepts_trailers(headers);
    remove_hop_by_hop(headers);
    if trailers {
        forward_trailers_accepted(headers);
    }
    let host = HeaderValue::from_str(&target.host_header)
        .map_err(|_| ProxyError::BadRequest("invalid host".into()))?;
    headers.insert(header::HOST, host);
    add_via(headers, version);

    if upstream.sender.ready().await.is_err() {
        // The kept connection closed since the last request; the body is untouched, so retry once.
        upstream = open_upstream(shared, &connection.client, &target).await?;
        upstream
            .sender
            .ready()
            .await
            .map_err(|e| ProxyError::BadGateway(format!("upstream {}: {e}", upstream.peer)))?;
    }
    let peer = upstream.peer;
    let mut response = match upstream.sender.send_request(request).await {
        Ok(response) => response,
        Err(e) => {
            shared.upstream_error("protocol");
            return Err(ProxyError::BadGateway(format!("upstream {peer}: {e}")));
        }
    };
    shared
        .metrics
        .first_byte_duration
        .observe(pending.started.elapsed().as_secs_f64());
    // Both Transfer-Encoding and Content-Length: the length goes (it would cut the body), and so does
    // the server connection.
    if !fix_response_framing(response.headers_mut()) {
        connection.keep_upstream(upstream);
    } else {
        tracing::info!(%peer, "response with both Transfer-Encoding and Content-Length; Content-Length removed");
    }
    let version = response.version();
    *response.version_mut() = Version::HTTP_11;
    remove_hop_by_hop(response.headers_mut());
    add_via(response.headers_mut(), version);
    Ok(Served::Response(response.map(|body| body.boxed())))
}
