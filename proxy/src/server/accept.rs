//! Accept loops: connection limits, bounded refusals, and serving a connection by listener mode.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};

use super::{Listener, LiveShared};
use crate::access_log::Entry;
use crate::config::ListenerMode;
use crate::connection::{ClientConnection, ConnectionContext, PerClientCounter};
use crate::convert::wire::ErrorCode as ConvertError;
use crate::http::{connect_upstream, Shared};
use crate::metrics::Metrics;
use crate::registry::ConnectionRegistry;
use crate::relay::relay;
use crate::sockets::{original_destination, transport_of, Transport};

/// What every accept loop shares besides the [`Shared`] state.
pub(super) struct AcceptContext {
    pub(super) permits: Arc<Semaphore>,
    pub(super) per_client: PerClientCounter,
    pub(super) refusals: Arc<Semaphore>,
    pub(super) registry: Arc<ConnectionRegistry>,
}

/// How a refused connection is answered.
enum Refusal {
    /// An HTTP status line and a one-line reason (forward listeners).
    Http(&'static str, &'static str),
    /// An RFC 8803 Error TLV (converters).
    Convert(ConvertError),
}

pub(super) async fn accept_loop(
    listener: Listener,
    live: Arc<LiveShared>,
    context: AcceptContext,
    mut stop: watch::Receiver<bool>,
    mut closed: watch::Receiver<bool>,
) {
    let AcceptContext {
        permits,
        per_client,
        refusals,
        registry,
    } = context;
    let forward = listener.config.mode == ListenerMode::Forward;
    // How this listener answers a refusal: HTTP status, RFC 8803 Error TLV, or (transparent) nothing.
    let answer = |status_line: &'static str, reason: &'static str, code: ConvertError| {
        if forward {
            Some(Refusal::Http(status_line, reason))
        } else if listener.convert.is_some() {
            Some(Refusal::Convert(code))
        } else {
            None
        }
    };
    // Answers a refused connection from the bounded budget, or closes it at once and counts it.
    let refuse = |metrics: &Metrics, stream: TcpStream, answer: Option<Refusal>| {
        let Some(answer) = answer else {
            return;
        };
        match refusals.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(async move {
                    match answer {
                        Refusal::Http(status_line, reason) => {
                            refuse(stream, status_line, reason).await
                        }
                        Refusal::Convert(code) => crate::convert::refuse(stream, code).await,
                    }
                    drop(permit);
                });
            }
            Err(_) => {
                metrics.refusals_dropped.inc();
                drop(stream);
            }
        }
    };
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.socket.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
            _ = closed.changed() => return,
        };
        // The configuration in force now: a reload applies from the next connection on.
        let shared = live.current();
        let transport = transport_of(stream.as_fd(), listener.mptcp);
        let count = |outcome| shared.metrics.connection(transport.as_str(), outcome);
        if let Err(denied) = shared.acl.check_client(client.ip()) {
            count("denied");
            tracing::info!(%client, "refused: {denied}");
            log_refusal(&shared, transport, client, 403, "TCP_DENIED");
            let reason = "this client is not allowed to use the proxy";
            let answer = answer("403 Forbidden", reason, ConvertError::NotAuthorized);
            refuse(&shared.metrics, stream, answer);
            continue;
        }
        let limits = &shared.config.limits;
        // `limit` names the key in the log; `reason` is what the client reads.
        let over_limit = |stream, limit: &str, reason| {
            count("over_limit");
            tracing::warn!(%client, "refused: {limit} reached");
            log_refusal(&shared, transport, client, 503, "NONE_NONE");
            let answer = answer(
                "503 Service Unavailable",
                reason,
                ConvertError::ResourceExceeded,
            );
            refuse(&shared.metrics, stream, answer);
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            over_limit(stream, "max_connections", "too many connections");
            continue;
        };
        let Some(slot) = per_client.acquire(client.ip(), limits.max_connections_per_client) else {
            over_limit(
                stream,
                "max_connections_per_client",
                "too many connections from this client",
            );
            continue;
        };
        // A converter sends the upstream SYN before any bookkeeping (RFC 8803: 0-RTT conversion).
        let prefetched = listener
            .convert
            .as_ref()
            .map(|converter| crate::convert::prefetch(&shared, converter, &stream, client.ip()));
        count("accepted");
        let _ = stream.set_nodelay(true);
        let connection = ClientConnection::accepted(
            &stream,
            ConnectionContext {
                client,
                transport,
                permit,
                slot,
                metrics: shared.metrics.clone(),
                interfaces: shared.interfaces.clone(),
                registry: Some(registry.clone()),
            },
        );
        tracing::debug!(%client, transport = transport.as_str(), "accepted");
        if let (Some(converter), Some(prefetched)) = (&listener.convert, prefetched) {
            crate::convert::spawn(
                shared.clone(),
                converter.clone(),
                stream,
                connection,
                prefetched,
            );
        } else if forward {
            tokio::spawn(serve_http(live.clone(), stream, connection, stop.clone()));
        } else {
            tokio::spawn(serve_transparent(
                shared.clone(),
                stream,
                connection,
                listener.config.tproxy,
            ));
        }
    }
}

fn log_refusal(
    shared: &Shared,
    transport: Transport,
    client: SocketAddr,
    status: u16,
    result: &'static str,
) {
    shared
        .access_log
        .log(Entry::new(client.ip(), transport, "-", result, status));
}

/// How long a refused connection is held to deliver its answer.
const REFUSAL_HOLD: std::time::Duration = std::time::Duration::from_secs(2);

/// Answers a connection the proxy will not serve, without reading its request.
async fn refuse(mut stream: TcpStream, status_line: &'static str, reason: &'static str) {
    let body = format!("{status_line}: {reason}\n");
    let response = format!(
        "HTTP/1.1 {status_line}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\nVia: 1.1 {}\r\n\r\n{body}",
        body.len(),
        crate::http::VIA_PSEUDONYM
    );
    let _ = tokio::time::timeout(REFUSAL_HOLD, async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent, so closing does not reset the answer away.
        let mut sink = tokio::io::sink();
        tokio::io::copy(&mut stream, &mut sink).await
    })
    .await;
}

async fn serve_http(
    live: Arc<LiveShared>,
    stream: TcpStream,
    client: Arc<ClientConnection>,
    stop: watch::Receiver<bool>,
) {
    // Each request takes the configuration in force when it arrives (ACLs, credentials, upstream).
    crate::http::serve_connection(move || live.current(), stream, client, stop).await;
}

async fn serve_transparent(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: Arc<ClientConnection>,
    tproxy: bool,
) {
    let started = Instant::now();
    let mut entry = Entry::new(
        client.client.ip(),
        client.transport,
        "CONNECT",
        "TCP_TUNNEL",
        200,
    );
    let destination = match original_destination(&stream) {
        Ok(Some(destination)) => destination,
        Ok(None) if tproxy => match stream.local_addr() {
            Ok(local) => local,
            Err(_) => return client.closed(&stream),
        },
        Ok(None) => {
            tracing::info!(client = %client.client, "refused: not a redirected connection");
            return client.closed(&stream);
        }
        Err(error) => {
            tracing::warn!(client = %client.client, %error, "cannot find the original destination");
            return client.closed(&stream);
        }
    };
    entry.url = destination.to_string();
    client.set_upstream(destination.to_string(), destination);
    let stream = Arc::new(stream);
    let host = destination.ip().to_string();
    match connect_upstream(&shared, &host, destination.port()).await {
        Ok((upstream, peer)) => {
            entry.peer = Some(peer.ip());
            let upstream = Arc::new(upstream);
            client.upstream_connected();
            let settings = shared.relay_settings(&client);
            let stats = client
                .sampling_subflows(relay(&stream, &upstream, b"", settings))
                .await
                .unwrap_or_default();
            entry.bytes = stats.download_bytes;
        }
        Err(error) => {
            tracing::info!(client = %client.client, %destination, %error, "transparent connection refused");
            entry.status = error.status().as_u16();
            entry.result = if entry.status == 403 {
                "TCP_DENIED"
            } else {
                "TCP_MISS"
            };
        }
    }
    entry.elapsed = started.elapsed();
    entry.subflows = client.max_subflows();
    shared.access_log.log(entry);
    client.closed(&stream);
}
