//! One client connection, served by one task: read a request head, check it, answer it (forward it,
//! open a tunnel, or answer as the final recipient), and go on while both sides keep the connection.
//!
//! Timeouts: a request head must arrive whole within `limits.header_read_timeout` of the connection
//! becoming ready for it (an idle kept-alive connection included, as hyper did); bodies move or give up
//! after `limits.idle_timeout` without progress; upstream waits have their own (`upstream.*`). On a
//! drain (`stop`), an idle connection closes at once and a busy one after its response.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::buffer::Buffer;
use super::error::{write_text_response, ProxyError};
use super::forward::{self, Upstream};
use super::wire::{self, RequestBody};
use super::{prepare, tunnel, Action, Pending, Prepared, Refused, Shared};
use crate::connection::{ClientConnection, ClientIo};

/// How long an answered refusal reads what the client still sends before closing, so that closing with
/// unread bytes does not reset the answer away.
const LINGER: Duration = Duration::from_secs(2);

/// How many bytes that linger reads at most.
const LINGER_BYTES: usize = 1 << 20;

/// The first allocation of a client connection's read buffer.
const CLIENT_BUFFER: usize = 8 * 1024;

/// Serves the HTTP client connection `stream` until it ends. `current` gives the configuration in force
/// (ACLs, credentials, upstream settings), read again for each request.
pub async fn serve_connection(
    current: impl Fn() -> Arc<Shared>,
    stream: TcpStream,
    client: Arc<ClientConnection>,
    mut stop: watch::Receiver<bool>,
) {
    let shared = current();
    // Room for the largest head plus a little, so that a head past the limit is seen (431).
    let limit = shared.config.limits.max_header_bytes + 4096;
    let mut conn = Conn {
        io: ClientIo::new(stream, client.clone()),
        client: client.clone(),
        rbuf: Buffer::new(CLIENT_BUFFER.min(limit), limit.max(CLIENT_BUFFER)),
        out: Vec::new(),
        upstream: None,
        timer: Box::pin(tokio::time::sleep_until(
            Instant::now() + Duration::from_secs(3600),
        )),
    };
    drop(shared);
    client
        .sampling_subflows(conn.run(&current, &mut stop))
        .await;
}

/// A client connection's state between requests.
pub(super) struct Conn {
    /// The client socket (counts bytes, logs the close).
    pub io: ClientIo,
    pub client: Arc<ClientConnection>,
    /// Bytes from the client not used yet.
    pub rbuf: Buffer,
    /// Bytes to write: the head going upstream, then the response going to the client.
    pub out: Vec<u8>,
    /// The upstream connection kept for the next request.
    pub upstream: Option<Upstream>,
    /// The one timer of the connection, reset for each wait.
    pub timer: Pin<Box<Sleep>>,
}

/// What the client sent next.
enum Next {
    Request(Box<Prepared>, usize),
    Refused(Box<Refused>),
    Close,
}

impl Conn {
    async fn run(&mut self, current: &impl Fn() -> Arc<Shared>, stop: &mut watch::Receiver<bool>) {
        loop {
            let shared = current();
            match self.next_request(&shared, stop).await {
                Next::Close => return,
                Next::Refused(refused) => {
                    self.refuse(&shared, *refused).await;
                    return;
                }
                Next::Request(prepared, len) => {
                    self.rbuf.consume(len);
                    let draining = *stop.borrow();
                    if !self.serve(&shared, *prepared, draining).await || *stop.borrow() {
                        return;
                    }
                }
            }
        }
    }

    /// Reads until a request head is complete, and checks it.
    async fn next_request(&mut self, shared: &Shared, stop: &mut watch::Receiver<bool>) -> Next {
        let limits = &shared.config.limits;
        self.timer
            .as_mut()
            .reset(Instant::now() + limits.header_read_timeout.min(limits.idle_timeout));
        loop {
            if !self.rbuf.is_empty() {
                let mut storage = wire::field_storage();
                match wire::parse_request(self.rbuf.bytes(), &mut storage, limits.max_header_bytes)
                {
                    Ok(Some(head)) => {
                        let len = head.len;
                        return match prepare(shared, &self.client, &head, &mut self.out) {
                            Ok(prepared) => Next::Request(Box::new(prepared), len),
                            Err(refused) => Next::Refused(Box::new(refused)),
                        };
                    }
                    Ok(None) => {}
                    Err(error) => {
                        return Next::Refused(Box::new(Refused {
                            error,
                            pending: Pending::new(shared, &self.client, "-", None),
                        }))
                    }
                }
            }
            if self.rbuf.is_empty() && *stop.borrow() {
                return Next::Close;
            }
            tokio::select! {
                biased;
                read = self.rbuf.fill(&mut self.io) => match read {
                    Ok(0) | Err(_) => return Next::Close,
                    Ok(_) => {}
                },
                () = self.timer.as_mut() => {
                    tracing::debug!(client = %self.client.client, "no request head within the time allowed");
                    return Next::Close;
                }
                changed = stop.changed(), if self.rbuf.is_empty() => {
                    if changed.is_err() {
                        return Next::Close;
                    }
                }
            }
        }
    }

    /// Serves a checked request; returns whether the connection goes on.
    async fn serve(&mut self, shared: &Arc<Shared>, prepared: Prepared, draining: bool) -> bool {
        let Prepared {
            mut pending,
            http11,
            close,
            body,
            action,
        } = prepared;
        match action {
            Action::Answer { status } => {
                pending.respond(shared, status);
                let written = self.write_out().await;
                pending.finish(shared, &self.client, self.out.len() as u64);
                // A body the proxy did not read would be taken for the next request.
                written && !close && !draining && body == RequestBody::None
            }
            Action::Connect { host, port } => {
                tunnel::connect(self, shared, host, port, pending).await;
                false
            }
            Action::Forward(plan) => {
                match forward::forward(self, shared, plan, pending, http11, close || draining).await
                {
                    Ok(keep) => keep,
                    Err(refused) => {
                        self.refuse(shared, refused).await;
                        false
                    }
                }
            }
        }
    }

    /// Answers a refused request with the proxy's own response and closes.
    pub(super) async fn refuse(&mut self, shared: &Shared, refused: Refused) {
        let Refused { error, mut pending } = refused;
        tracing::debug!(client = %self.client.client, %error, "request refused");
        pending.result = error.result_code();
        let status = error.status();
        pending.respond(shared, status.as_u16());
        let challenge = match (&error, &shared.credentials) {
            (ProxyError::AuthRequired, Some(credentials)) => Some(credentials.challenge()),
            _ => None,
        };
        let fields: Vec<(&[u8], &[u8])> = challenge
            .iter()
            .map(|c| (&b"proxy-authenticate"[..], c.as_bytes()))
            .collect();
        self.out.clear();
        write_text_response(&mut self.out, status, &error.public_message(), &fields);
        self.timer
            .as_mut()
            .reset(Instant::now() + shared.config.limits.idle_timeout.min(LINGER * 5));
        self.write_out().await;
        pending.finish(shared, &self.client, self.out.len() as u64);
        self.client.release_limits();
        self.linger().await;
    }

    /// Writes `out` to the client within the timer; false when the client is gone.
    pub(super) async fn write_out(&mut self) -> bool {
        tokio::select! {
            biased;
            written = self.io.write_all(&self.out) => written.is_ok(),
            () = self.timer.as_mut() => false,
        }
    }

    /// Writes `head` then `body` to the client, in one system call when the socket takes both.
    pub(super) async fn write_head_and(&mut self, body: &[u8]) -> io::Result<()> {
        let head = std::mem::take(&mut self.out);
        let result = write_two(&mut self.io, &head, body).await;
        self.out = head;
        result
    }

    /// Half-closes, then reads (and drops) what the client still sends, for a moment.
    async fn linger(&mut self) {
        let _ = tokio::time::timeout(LINGER, async {
            let _ = self.io.shutdown().await;
            let mut sink = vec![0u8; 16 * 1024];
            let mut total = 0;
            while total < LINGER_BYTES {
                match tokio::io::AsyncReadExt::read(&mut self.io, &mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n,
                }
            }
        })
        .await;
    }
}

/// Writes `a` then `b` with vectored writes until both are out.
pub(super) async fn write_two<W: AsyncWriteExt + Unpin>(
    io: &mut W,
    mut a: &[u8],
    mut b: &[u8],
) -> io::Result<()> {
    while !a.is_empty() {
        let n = io
            .write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n < a.len() {
            a = &a[n..];
        } else {
            b = &b[n - a.len()..];
            a = &[];
        }
    }
    if !b.is_empty() {
        io.write_all(b).await?;
    }
    Ok(())
}
