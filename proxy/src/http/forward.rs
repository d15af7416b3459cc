//! Absolute-form forwarding, with one kept upstream connection per client connection.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Request, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::error::ProxyError;
use super::headers::{
    accepts_trailers, add_via, fix_response_framing, forward_trailers_accepted, remove_hop_by_hop,
};
use super::request_body::{ExpectGate, RequestBody};
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
    pub(super) sender: SendRequest<RequestBody>,
    /// The task driving the connection, aborted when a request on it is given up.
    driver: tokio::task::AbortHandle,
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
            tracing::info!(%peer, error = %e, "upstream handshake failed");
            return Err(ProxyError::BadGateway(format!(
                "{}:{}: {e}",
                target.host, target.port
            )));
        }
    };
    let driver = tokio::spawn(async move {
        if let Err(error) = driver.await {
            tracing::debug!(%peer, %error, "upstream connection ended with an error");
        }
    })
    .abort_handle();
    Ok(Upstream {
        host: target.host.clone(),
        port: target.port,
        peer,
        sender,
        driver,
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

/// Whether the request carries `Expect: 100-continue`.
fn expects_continue(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::EXPECT)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
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

    let protocol_error = |e: hyper::Error| {
        if connection.client_body_failed.load(Ordering::Acquire) {
            return ProxyError::BadRequest("malformed or incomplete request body".into());
        }
        shared.upstream_error("protocol");
        tracing::info!(host = %target.host, port = target.port, error = %e, "upstream failed");
        ProxyError::BadGateway(format!("{}:{}: {e}", target.host, target.port))
    };
    if upstream.sender.ready().await.is_err() {
        // The kept connection closed since the last request; the body is untouched, so retry once.
        upstream = open_upstream(shared, &connection.client, &target).await?;
        pending.entry.peer = Some(upstream.peer.ip());
        upstream.sender.ready().await.map_err(protocol_error)?;
    }
    let peer = upstream.peer;

    // Expect: 100-continue holds the body back until the server asks for it (see ExpectGate).
    let gate = (expects_continue(request.headers()) && !request.body().is_end_stream())
        .then(|| Arc::new(ExpectGate::default()));
    if let Some(gate) = &gate {
        let gate = gate.clone();
        hyper::ext::on_informational(&mut request, move |informational| {
            if informational.status() == StatusCode::CONTINUE {
                gate.open();
            }
        });
    }
    connection.request_started();
    let request = request.map(|body| RequestBody::new(body, connection, gate.clone()));
    let upstream_config = &shared.config.upstream;
    let sending = upstream.sender.send_request(request);
    tokio::pin!(sending);
    let expect_wait = tokio::time::sleep(upstream_config.expect_continue_timeout);
    tokio::pin!(expect_wait);
    let response_deadline = connection.response_deadline(upstream_config.response_timeout);
    tokio::pin!(response_deadline);
    let mut response = loop {
        tokio::select! {
            response = &mut sending => break response.map_err(protocol_error)?,
            () = &mut expect_wait, if gate.as_ref().is_some_and(|g| g.is_waiting()) => {
                // The server ignores the expectation: send the body anyway (RFC 9110 §10.1.1).
                if let Some(gate) = &gate {
                    gate.open();
                }
            }
            () = &mut response_deadline => {
                upstream.driver.abort();
                shared.upstream_error("timeout");
                tracing::info!(%peer, "no response head within upstream.response_timeout");
                return Err(ProxyError::GatewayTimeout(format!(
                    "{}:{} sent no response within {:?}",
                    target.host, target.port, upstream_config.response_timeout
                )));
            }
        }
    };
    shared
        .metrics
        .first_byte_duration
        .observe(pending.started.elapsed().as_secs_f64());
    // Both Transfer-Encoding and Content-Length: the length goes (it would cut the body), and so does
    // the server connection.
    let ambiguous = fix_response_framing(response.headers_mut());
    if ambiguous {
        tracing::info!(%peer, "response with both Transfer-Encoding and Content-Length; Content-Length removed");
    }
    match gate {
        // The final answer came before the body was asked for: the body is never sent, and the
        // server connection ends once this response has been relayed.
        Some(gate) if gate.is_waiting() => pending.expect = Some(gate),
        _ if ambiguous => {}
        _ => connection.keep_upstream(upstream),
    }
    let version = response.version();
    *response.version_mut() = Version::HTTP_11;
    remove_hop_by_hop(response.headers_mut());
    add_via(response.headers_mut(), version);
    Ok(Served::Response(response.map(|body| body.boxed())))
}
