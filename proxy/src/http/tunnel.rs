//! CONNECT tunnels: connect, answer 200, then relay the client socket both ways.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use super::conn::Conn;
use super::{Pending, Refused, Shared};
use crate::relay::relay;
use crate::upstream::connect_upstream;

/// What the proxy writes for an established tunnel, counted in the access log's byte total.
const CONNECT_ESTABLISHED: &[u8] = b"HTTP/1.1 200 OK\r\n\r\n";

/// Opens a tunnel to `host:port` (its port already allowed) and relays until it ends; the client
/// connection ends with it.
pub(super) async fn connect(
    conn: &mut Conn,
    shared: &Arc<Shared>,
    host: String,
    port: u16,
    mut pending: Pending,
) {
    let (upstream, peer) = match connect_upstream(shared, &host, port).await {
        Ok(connected) => connected,
        Err(error) => {
            conn.refuse(shared, Refused { error, pending }).await;
            return;
        }
    };
    let client = conn.client.clone();
    client.upstream_connected();
    shared.attach_destination(&client, &host, peer);
    pending.peer = Some(peer.ip());
    pending.result = "TCP_TUNNEL";
    pending.respond(shared, 200);
    if conn.io.write_all(CONNECT_ESTABLISHED).await.is_err() {
        pending.finish(shared, &client, 0);
        return;
    }
    // Bytes the client sent past the CONNECT head go first; the connection's buffers are freed, as the
    // tunnel may stay open (and idle) for long.
    let prefix = conn.rbuf.bytes().to_vec();
    conn.rbuf.release();
    conn.out = Vec::new();
    conn.upstream = None;
    let Some(stream) = conn.io.take_stream() else {
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
    pending.finish(
        shared,
        &client,
        CONNECT_ESTABLISHED.len() as u64 + stats.download_bytes,
    );
    client.closed(&stream);
}
