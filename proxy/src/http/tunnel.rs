//! CONNECT tunnels: connect, answer 200, then relay the upgraded client socket.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::error::{empty, ProxyError};
use super::{HttpConnection, Pending, Served, Shared};
use crate::connection::ClientIo;
use crate::relay::relay;
use crate::upstream::connect_upstream;

pub(super) async fn connect(
    shared: &Arc<Shared>,
    connection: &Arc<HttpConnection>,
    mut request: Request<Incoming>,
    pending: &mut Pending,
) -> Result<Served, ProxyError> {
    let authority = request
        .uri()
        .authority()
        .cloned()
        .ok_or_else(|| ProxyError::BadRequest("CONNECT needs host:port".into()))?;
    if authority.as_str().contains('@') {
        return Err(ProxyError::BadRequest(
            "CONNECT takes host:port, without user info".into(),
        ));
    }
    let (host, port) = super::target::host_and_port(&authority, None)?;
    shared.acl.check_connect_port(port)?;
    let (upstream, peer) = connect_upstream(shared, &host, port).await?;
    connection.client.upstream_connected();
    shared.attach_destination(&connection.client, &host, peer);
    pending.entry.peer = Some(peer.ip());
    pending.entry.result = "TCP_TUNNEL";
    pending.entry.status = 200;
    let on_upgrade = hyper::upgrade::on(&mut request);
    let shared = shared.clone();
    let client = connection.client.clone();
    let mut entry = pending.entry.clone();
    let started = pending.started;
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                tracing::debug!(%error, "CONNECT upgrade failed");
                return;
            }
        };
        let Ok(parts) = upgraded.downcast::<TokioIo<ClientIo>>() else {
            tracing::error!("CONNECT upgrade returned an unexpected stream type");
            return;
        };
        // Keep only the bytes the client sent past the CONNECT head: `read_buf` can hold on to hyper's
        // whole read buffer, which would stay allocated for the tunnel's lifetime.
        let hyper::upgrade::Parts { io, read_buf, .. } = parts;
        let prefix = read_buf.to_vec();
        drop(read_buf);
        let Some(stream) = io.into_inner().into_stream() else {
            return;
        };
        let (stream, upstream) = (Arc::new(stream), Arc::new(upstream));
        let settings = shared.relay_settings(&client);
        let result = client
            .sampling_subflows(relay(&stream, &upstream, &prefix, settings))
            .await;
        let stats = result.unwrap_or_else(|error| {
            tracing::debug!(%error, "tunnel ended with an error");
            Default::default()
        });
        entry.bytes = CONNECT_ESTABLISHED.len() as u64 + stats.download_bytes;
        entry.elapsed = started.elapsed();
        entry.subflows = client.max_subflows();
        shared.access_log.log(entry);
        client.closed(&stream);
    });
    Ok(Served::Tunnel(Response::new(empty())))
}

/// What hyper writes for an established tunnel, counted in the access log's byte total.
const CONNECT_ESTABLISHED: &str = "HTTP/1.1 200 OK\r\n\r\n";
