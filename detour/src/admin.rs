//! The admin listener both daemons run: `/metrics`, `/healthz`, `/readyz` through `mptcp_proxy::admin`,
//! with the daemon's metrics registered beside the process metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Binds `address` and serves until `stop` turns true.
pub async fn serve_metrics(
    address: SocketAddr,
    register: impl FnOnce(&mut Registry),
    stop: watch::Receiver<bool>,
) -> std::io::Result<JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(address = %listener.local_addr()?, "metrics listener (/metrics, /healthz, /readyz)");
    let registry = Arc::new(mptcp_proxy::metrics::Metrics::with_extension(register));
    let state = Arc::new(mptcp_proxy::admin::AdminState::new(registry));
    Ok(tokio::spawn(mptcp_proxy::admin::serve(
        listener, state, stop,
    )))
}
