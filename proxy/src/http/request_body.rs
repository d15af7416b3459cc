//! The request body as sent upstream: tells the connection when it has been sent (the response timeout
//! starts then), and holds it back under `Expect: 100-continue` until the server asks for it.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::HttpConnection;

/// Why the request body stops: the client's body failed, or the server answered before asking for it.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a forwarded request.
pub(crate) struct RequestBody {
    inner: Incoming,
    /// Set while the body is being sent: told when it ends.
    connection: Option<Arc<HttpConnection>>,
    /// Set under `Expect: 100-continue`.
    gate: Option<Arc<ExpectGate>>,
}

impl RequestBody {
    /// Wraps a client's request body. `connection` learns when the body has been sent.
    pub(crate) fn new(
        inner: Incoming,
        connection: &Arc<HttpConnection>,
        gate: Option<Arc<ExpectGate>>,
    ) -> Self {
        let connection = if inner.is_end_stream() {
            connection.request_sent();
            None
        } else {
            Some(connection.clone())
        };
        Self {
            inner,
            connection,
            gate,
        }
    }

    fn finished(&mut self) {
        if let Some(connection) = self.connection.take() {
            connection.request_sent();
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(gate) = &self.gate {
            match gate.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(false) => {
                    // The server answered without asking for the body and that answer has been
                    // relayed: end this connection's request (the server connection closes).
                    return Poll::Ready(Some(Err(
                        "request body not sent: the server answered first".into(),
                    )));
                }
                Poll::Ready(true) => {}
            }
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Err(_))) => {
                // The client's body is malformed or cut: the request fails because of the client.
                if let Some(connection) = &self.connection {
                    connection.client_body_failed.store(true, Ordering::Release);
                }
                self.finished();
            }
            Poll::Ready(None) => self.finished(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.finished(),
            _ => {}
        }
        polled.map(|frame| frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.finished();
    }
}

const WAITING: u8 = 0;
const OPEN: u8 = 1;
const ABANDONED: u8 = 2;

/// `Expect: 100-continue` (RFC 9110 §10.1.1): the client waits for 100 Continue before it sends the
/// body, and hyper tells it to go on the moment the body is first read. So the body is not read until
/// the server says 100 Continue, or `upstream.expect_continue_timeout` passes (a server that ignores
/// the expectation). If the server gives its final answer first, the body is never read: the client
/// gets that answer without a 100 and does not send the body.
#[derive(Debug, Default)]
pub(crate) struct ExpectGate {
    state: AtomicU8,
    waker: AtomicWaker,
}

impl ExpectGate {
    /// Lets the body through (the server sent 100 Continue, or the wait is over).
    pub(crate) fn open(&self) {
        if self
            .state
            .compare_exchange(WAITING, OPEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.waker.wake();
        }
    }

    /// Whether the body was never asked for.
    pub(crate) fn is_waiting(&self) -> bool {
        self.state.load(Ordering::Acquire) == WAITING
    }

    /// The response has been relayed without the body being asked for: give the body up.
    pub(crate) fn abandon(&self) {
        if self
            .state
            .compare_exchange(WAITING, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.waker.wake();
        }
    }

    /// Ready(true) once open, Ready(false) once abandoned.
    fn poll(&self, cx: &mut Context<'_>) -> Poll<bool> {
        let check = || match self.state.load(Ordering::Acquire) {
            OPEN => Poll::Ready(true),
            ABANDONED => Poll::Ready(false),
            _ => Poll::Pending,
        };
        if let Poll::Ready(open) = check() {
            return Poll::Ready(open);
        }
        self.waker.register(cx.waker());
        check()
    }
}
