//! The response body wrapper: byte counts, the client's rate limit, and the access-log line.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use hyper::body::{Body, Frame, SizeHint};
use mptcp_throttle::ClientRateLimiter;

use super::{Pending, ProxyBody, Shared};
use crate::connection::ClientConnection;

/// The serialized size of a response head, for the access log's byte count.
pub(super) fn head_len(response: &Response<ProxyBody>) -> u64 {
    let status_line =
        "HTTP/1.1 200 \r\n".len() + response.status().canonical_reason().map_or(0, str::len);
    let fields: usize = response
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    (status_line + fields + 2) as u64
}

/// A data frame waiting for the client's rate-limit budget.
type HeldFrame = (
    Frame<Bytes>,
    std::sync::Mutex<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
);

/// A response body that counts what it passes, keeps the client's user-space rate limit, and writes
/// the access-log line when it ends.
pub(super) struct LoggedBody {
    pub(super) inner: ProxyBody,
    pub(super) limit: Option<(Arc<ClientRateLimiter>, IpAddr)>,
    pub(super) held: Option<HeldFrame>,
    pub(super) body_bytes: u64,
    pub(super) head_bytes: u64,
    pub(super) pending: Option<Pending>,
    pub(super) shared: Arc<Shared>,
    pub(super) connection: Arc<ClientConnection>,
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some((_, wait)) = &mut self.held {
            let wait = wait.get_mut().unwrap_or_else(|p| p.into_inner());
            if wait.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if let Some((frame, _)) = self.held.take() {
                return Poll::Ready(Some(Ok(frame)));
            }
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let len = data.len();
                self.body_bytes += len as u64;
                if let Some((limiter, client)) = self.limit.clone() {
                    let Poll::Ready(Some(Ok(frame))) = polled else {
                        unreachable!("matched above")
                    };
                    let bytes = u32::try_from(len).unwrap_or(u32::MAX);
                    let wait: Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
                        Box::pin(async move { limiter.until_ready(client, bytes).await });
                    self.held = Some((frame, std::sync::Mutex::new(wait)));
                    return self.poll_frame(cx);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.connection.expect_next_head();
        if let Some(mut pending) = self.pending.take() {
            if let Some(gate) = pending.expect.take() {
                gate.abandon();
            }
            pending.entry.elapsed = pending.started.elapsed();
            self.shared
                .metrics
                .request_duration
                .observe(pending.entry.elapsed.as_secs_f64());
            pending.entry.bytes = self.head_bytes + self.body_bytes;
            self.connection.subflows();
            pending.entry.subflows = self.connection.max_subflows();
            self.shared.access_log.log(pending.entry);
        }
    }
}
