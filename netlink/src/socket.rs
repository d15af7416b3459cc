//! A small blocking netlink socket and message builder (rtnetlink, nfnetlink
//! and generic netlink all share this framing).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// `struct nlmsghdr` size.
pub const NLMSG_HDRLEN: usize = 16;
/// `NLMSG_ERROR`.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
pub const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_MULTI`.
pub const NLM_F_MULTI: u16 = 0x2;
/// `NLM_F_ACK`.
pub const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_ECHO`.
pub const NLM_F_ECHO: u16 = 0x8;
/// `NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`).
pub const NLM_F_DUMP: u16 = 0x300;
/// `NLM_F_REPLACE`.
pub const NLM_F_REPLACE: u16 = 0x100;
/// `NLM_F_EXCL`.
pub const NLM_F_EXCL: u16 = 0x200;
/// `NLM_F_CREATE`.
pub const NLM_F_CREATE: u16 = 0x400;
/// `NLA_F_NESTED`.
pub const NLA_F_NESTED: u16 = 0x8000;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
const NETLINK_EXT_ACK: libc::c_int = 11;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;

/// A netlink request the kernel refused, or a socket failure.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel answered with an error code.
    #[error("{operation}: {source}{}", message.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        /// What was being done.
        operation: String,
        /// The errno.
        source: io::Error,
        /// Extended ack message, if the kernel sent one.
        message: Option<String>,
    },
    /// Sending or receiving failed.
    #[error("{operation}: netlink socket: {source}")]
    Socket {
        /// What was being done.
        operation: String,
        /// The failure.
        source: io::Error,
    },
}

impl NetlinkError {
    /// The errno, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { source, .. } | NetlinkError::Socket { source, .. } => {
                source.raw_os_error()
            }
        }
    }
}

/// Builds one netlink message.
#[derive(Debug, Clone)]
pub struct MessageBuilder {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

impl MessageBuilder {
    /// Starts a message of `msg_type` with `flags` (`NLM_F_REQUEST` is added).
    pub fn new(msg_type: u16, flags: u16) -> Self {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&msg_type.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        Self {
            buf,
            nests: Vec::new(),
        }
    }

    /// Appends a fixed family header (e.g. `struct tcmsg`), padded to 4 bytes.
    pub fn header(mut self, bytes: &[u8]) -> Self {
        self.buf.extend_from_slice(bytes);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// Appends an attribute.
    pub fn attr(mut self, kind: u16, value: &[u8]) -> Self {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// Appends a `u8` attribute.
    pub fn attr_u8(self, kind: u16, value: u8) -> Self {
        self.attr(kind, &[value])
    }

    /// Appends a native-endian `u16` attribute.
    pub fn attr_u16(self, kind: u16, value: u16) -> Self {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// Appends a native-endian `u32` attribute.
    pub fn attr_u32(self, kind: u16, value: u32) -> Self {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// Appends a native-endian `u64` attribute.
    pub fn attr_u64(self, kind: u16, value: u64) -> Self {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// Appends a NUL-terminated string attribute.
    pub fn attr_str(self, kind: u16, value: &str) -> Self {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.attr(kind, &bytes)
    }

    /// Opens a nested attribute; close it with [`MessageBuilder::end_nest`].
    pub fn begin_nest(mut self, kind: u16) -> Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    /// Closes the innermost nested attribute.
    pub fn end_nest(mut self) -> Self {
        let start = self.nests.pop().expect("end_nest without begin_nest");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// Finishes the message with sequence number `seq`.
    pub fn finish(mut self, seq: u32) -> Vec<u8> {
        assert!(self.nests.is_empty(), "unclosed nested attribute");
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// One received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// `nlmsg_type`.
    pub msg_type: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// Everything after the header.
    pub payload: Vec<u8>,
}

/// Splits a datagram into messages.
pub fn parse_messages(buf: &[u8]) -> Vec<Message> {
    messages(buf)
        .map(|m| Message {
            msg_type: m.msg_type,
            flags: m.flags,
            seq: m.seq,
            payload: m.payload.to_vec(),
        })
        .collect()
}

/// One message borrowed from a receive buffer (see [`messages`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef<'a> {
    /// `nlmsg_type`.
    pub msg_type: u16,
    /// `nlmsg_flags`.
    pub flags: u16,
    /// `nlmsg_seq`.
    pub seq: u32,
    /// Everything after the header.
    pub payload: &'a [u8],
}

/// Splits a datagram into messages without copying (hot receive loops; [`parse_messages`] owns its
/// messages). A truncated or malformed tail ends the iteration.
pub fn messages(mut buf: &[u8]) -> impl Iterator<Item = MessageRef<'_>> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        let msg = MessageRef {
            msg_type: u16::from_ne_bytes([buf[4], buf[5]]),
            flags: u16::from_ne_bytes([buf[6], buf[7]]),
            seq: u32::from_ne_bytes(buf[8..12].try_into().expect("4 bytes")),
            payload: &buf[NLMSG_HDRLEN..len],
        };
        buf = &buf[align4(len).min(buf.len())..];
        Some(msg)
    })
}

/// The errno of an `NLMSG_ERROR` payload (0 is an ack), and the extended-ack message if there is one.
pub fn error_of(msg: &MessageRef<'_>) -> (i32, Option<String>) {
    parse_error(&Message {
        msg_type: msg.msg_type,
        flags: msg.flags,
        seq: msg.seq,
        payload: msg.payload.to_vec(),
    })
}

/// Splits attributes; the nested flag is masked off the kind.
pub fn parse_attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= 4 {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            break;
        }
        out.push((kind, &buf[4..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

/// Reads a NUL-terminated string attribute.
pub fn attr_string(value: &[u8]) -> String {
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

/// Reads a native-endian `u32` attribute.
pub fn attr_u32(value: &[u8]) -> Option<u32> {
    value
        .get(..4)
        .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")))
}

/// Reads a native-endian `u16` attribute.
pub fn attr_u16(value: &[u8]) -> Option<u16> {
    value.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]]))
}

/// What an `NLMSG_ERROR` message says.
pub(crate) fn parse_error(msg: &Message) -> (i32, Option<String>) {
    let errno = msg
        .payload
        .get(..4)
        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
        .unwrap_or(0);
    let mut message = None;
    if msg.flags & NLM_F_ACK_TLVS != 0 {
        // struct nlmsgerr: error, then the request's header (whole request
        // unless capped), then TLVs.
        let inner_len = if msg.flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            msg.payload
                .get(4..8)
                .map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")) as usize)
                .unwrap_or(NLMSG_HDRLEN)
        };
        if let Some(tlvs) = msg.payload.get(4 + align4(inner_len)..) {
            for (kind, value) in parse_attrs(tlvs) {
                if kind == NLMSGERR_ATTR_MSG {
                    message = Some(attr_string(value));
                }
            }
        }
    }
    (errno, message)
}

/// Answers to a batch: non-ack messages (echoes), and `(seq, errno, message)`
/// of each error.
pub type BatchReplies = (Vec<Message>, Vec<(u32, i32, Option<String>)>);

/// A blocking netlink socket of one protocol.
#[derive(Debug)]
pub struct NetlinkSocket {
    fd: OwnedFd,
    seq: u32,
}

impl NetlinkSocket {
    /// Opens and binds a socket of `protocol` (`NETLINK_ROUTE`, ...).
    pub fn open(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: zeroed sockaddr_nl is a valid "any port" address.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = Self {
            fd,
            seq: std::process::id().wrapping_mul(7919),
        };
        // Extended acks give readable reasons; best effort.
        let _ = socket.set_int_option(NETLINK_EXT_ACK, 1);
        // Large dumps and batches.
        let _ = socket.set_buffer_sizes(4 << 20);
        Ok(socket)
    }

    fn set_int_option(&self, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
        // SAFETY: value is a valid c_int for the duration of the call.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                SOL_NETLINK,
                option,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_buffer_sizes(&self, bytes: libc::c_int) -> io::Result<()> {
        for option in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
            // SAFETY: bytes is a valid c_int for the duration of the call.
            let rc = unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    &bytes as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Sets the receive buffer to `bytes`, past `net.core.rmem_max` (`SO_RCVBUFFORCE`, needs
    /// `CAP_NET_ADMIN`); falls back to `SO_RCVBUF` without it.
    pub fn set_recv_buffer_force(&self, bytes: usize) -> io::Result<()> {
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        for option in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: value is a valid c_int for the duration of the call.
            let rc = unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    &value as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            if rc == 0 {
                return Ok(());
            }
        }
        Err(io::Error::last_os_error())
    }

    /// `NETLINK_NO_ENOBUFS`: a full receive buffer drops messages silently instead of failing the next
    /// `recv` with `ENOBUFS` (for sockets that count their own losses, like a packet queue).
    pub fn set_no_enobufs(&self) -> io::Result<()> {
        const NETLINK_NO_ENOBUFS: libc::c_int = 5;
        self.set_int_option(NETLINK_NO_ENOBUFS, 1)
    }

    /// Receives one datagram into `buf` (`flags` as for recv(2), e.g. `MSG_DONTWAIT`); returns its
    /// length. Iterate it with [`messages`]; a datagram larger than `buf` is truncated.
    pub fn recv_into(&self, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
        loop {
            // SAFETY: buf is valid for writes of its length.
            let rc = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    flags,
                )
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            return Ok(rc as usize);
        }
    }

    /// Sets both buffer sizes past `net.core.{r,w}mem_max` (`SO_SNDBUFFORCE`, `SO_RCVBUFFORCE`; needs
    /// `CAP_NET_ADMIN`). An nftables batch must reach the kernel in one message, so a batch of tens of
    /// thousands of set elements needs a send buffer of several MiB, as `nft` itself sets.
    pub fn force_buffer_sizes(&self, bytes: usize) -> io::Result<()> {
        let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        for option in [libc::SO_SNDBUFFORCE, libc::SO_RCVBUFFORCE] {
            // SAFETY: bytes is a valid c_int for the duration of the call.
            let rc = unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    &bytes as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Joins a multicast group (generic netlink group ids included).
    pub fn add_membership(&self, group: u32) -> io::Result<()> {
        self.set_int_option(NETLINK_ADD_MEMBERSHIP, group as libc::c_int)
    }

    /// Sets how long [`NetlinkSocket::recv`] waits.
    pub fn set_recv_timeout(&self, timeout: Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: tv is a valid timeval for the duration of the call.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next sequence number.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends raw bytes (one or more messages) to the kernel.
    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: zeroed sockaddr_nl addresses the kernel (pid 0).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: bytes and addr are valid for the call.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr() as *const libc::c_void,
                bytes.len(),
                0,
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one datagram and splits it into messages.
    pub fn recv(&self) -> io::Result<Vec<Message>> {
        self.recv_with_flags(0)
    }

    /// Receives what is queued without waiting: the messages of every datagram already there.
    pub fn recv_pending(&self) -> io::Result<Vec<Message>> {
        let mut all = Vec::new();
        loop {
            match self.recv_with_flags(libc::MSG_DONTWAIT) {
                Ok(messages) => all.extend(messages),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(all),
                Err(e) => return Err(e),
            }
        }
    }

    fn recv_with_flags(&self, flags: libc::c_int) -> io::Result<Vec<Message>> {
        let mut buf = vec![0u8; 1 << 16];
        let len = self.recv_into(&mut buf, flags)?;
        Ok(parse_messages(&buf[..len]))
    }

    /// Sends one request built by `builder` with `NLM_F_ACK` and waits for
    /// its ack; returns the other messages answered to it (echoes, replies).
    pub fn request(
        &mut self,
        builder: MessageBuilder,
        operation: &str,
    ) -> Result<Vec<Message>, NetlinkError> {
        self.exchange(builder, NLM_F_ACK, operation)
    }

    /// Sends a dump request and collects every reply until `NLMSG_DONE`.
    pub fn dump(
        &mut self,
        builder: MessageBuilder,
        operation: &str,
    ) -> Result<Vec<Message>, NetlinkError> {
        self.exchange(builder, NLM_F_DUMP, operation)
    }

    /// Sends `builder` with `extra_flags` added and collects the replies to its
    /// sequence number until `NLMSG_DONE`, an ack, or an error.
    fn exchange(
        &mut self,
        builder: MessageBuilder,
        extra_flags: u16,
        operation: &str,
    ) -> Result<Vec<Message>, NetlinkError> {
        let socket_error = |source| NetlinkError::Socket {
            operation: operation.to_owned(),
            source,
        };
        let seq = self.next_seq();
        let mut bytes = builder.finish(seq);
        let flags = u16::from_ne_bytes([bytes[6], bytes[7]]) | extra_flags;
        bytes[6..8].copy_from_slice(&flags.to_ne_bytes());
        self.send(&bytes).map_err(socket_error)?;
        let mut replies = Vec::new();
        loop {
            for msg in self.recv().map_err(socket_error)? {
                if msg.seq != seq {
                    continue;
                }
                match msg.msg_type {
                    NLMSG_DONE => return Ok(replies),
                    NLMSG_ERROR => {
                        let (errno, message) = parse_error(&msg);
                        if errno == 0 {
                            return Ok(replies);
                        }
                        return Err(NetlinkError::Kernel {
                            operation: operation.to_owned(),
                            source: io::Error::from_raw_os_error(-errno),
                            message,
                        });
                    }
                    _ => replies.push(msg),
                }
            }
        }
    }

    /// Collects answers to a batch of messages already sent: waits until
    /// every sequence number in `acked` got an ack or error. Returns the
    /// other messages (echoes) and the errors by sequence number.
    ///
    /// A failed nftables batch is aborted and its end message is never
    /// acked; the kernel has queued every answer by the time `send` returns
    /// (netlink requests are handled in the sender's context), so once an
    /// error is seen the rest is drained without blocking.
    pub fn collect_batch_replies(&self, acked: &[u32]) -> io::Result<BatchReplies> {
        let mut pending: std::collections::BTreeSet<u32> = acked.iter().copied().collect();
        let mut others = Vec::new();
        let mut errors = Vec::new();
        while !pending.is_empty() {
            let messages = if errors.is_empty() {
                self.recv()?
            } else {
                match self.recv_with_flags(libc::MSG_DONTWAIT) {
                    Ok(messages) => messages,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            };
            for msg in messages {
                if msg.msg_type == NLMSG_ERROR {
                    let (errno, message) = parse_error(&msg);
                    pending.remove(&msg.seq);
                    if errno != 0 {
                        errors.push((msg.seq, errno, message));
                    }
                } else {
                    others.push(msg);
                }
            }
        }
        Ok((others, errors))
    }
}

impl AsRawFd for NetlinkSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod walker_tests {
    use super::*;

    #[test]
    fn attribute_walker_stops_on_truncation() {
        let buf = MessageBuilder::new(0, 0)
            .attr(7, &[1, 2, 3])
            .attr(9, &[4])
            .finish(0);
        let mut attrs = buf[NLMSG_HDRLEN..].to_vec();
        assert_eq!(
            parse_attrs(&attrs),
            vec![(7, &[1u8, 2, 3][..]), (9, &[4u8][..])]
        );
        assert!(parse_attrs(&attrs[..6]).is_empty());
        attrs[0] = 200; // a length past the end
        assert!(parse_attrs(&attrs).is_empty());
    }
}
