//! `nfnetlink_queue`: packets that an nftables `queue` statement (or iptables `NFQUEUE`) hands to user
//! space, and the verdicts that release them.
//!
//! A [`Queue`] binds one queue number in the calling thread's network namespace and configures it
//! (copy mode, maximum length, flags); [`Queue::recv`] reads the next batch of queued packets as
//! [`QueuedPacket`]s, and [`Queue::verdict`] / [`Queue::verdict_batch`] release them. The kernel keeps
//! every queued packet until it gets a verdict (or the queue is unbound, which drops them), so the
//! caller decides when each one leaves: the testbed's delay line holds them for a configured time.
//!
//! Wire format: `include/uapi/linux/netfilter/nfnetlink_queue.h`. Every message carries a
//! `struct nfgenmsg` (family, version, queue number in network order); attribute values are big-endian.

use std::io;

use crate::socket::{
    error_of, messages, MessageBuilder, NetlinkError, NetlinkSocket, NLMSG_ERROR, NLM_F_ACK,
};

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;

const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_IFINDEX_INDEV: u16 = 5;
const NFQA_IFINDEX_OUTDEV: u16 = 6;
const NFQA_PAYLOAD: u16 = 10;
const NFQA_CAP_LEN: u16 = 13;
const NFQA_SKB_INFO: u16 = 14;

const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;

const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_CFG_CMD_UNBIND: u8 = 2;

/// `NFQA_SKB_GSO`: the packet is a GSO super-packet (only with [`flags::GSO`]).
pub const SKB_INFO_GSO: u32 = 1 << 1;

/// `NFQA_CFG_F_*` queue flags.
pub mod flags {
    /// Accept instead of drop when the queue is full or the socket cannot take the packet.
    pub const FAIL_OPEN: u32 = 1;
    /// Attach conntrack information.
    pub const CONNTRACK: u32 = 1 << 1;
    /// Queue GSO packets whole instead of segmenting them first.
    pub const GSO: u32 = 1 << 2;
    /// Attach the socket's uid and gid.
    pub const UID_GID: u32 = 1 << 3;
}

/// What the kernel copies of each packet to user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMode {
    /// Metadata only (id, hook, interfaces, length): enough to decide a verdict.
    Meta,
    /// Metadata and the first `n` bytes of the packet (0 or more than 65531 means all of it).
    Packet(u16),
}

/// A verdict for a queued packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Drop the packet.
    Drop,
    /// Let it continue through the rest of the hook.
    Accept,
}

impl Verdict {
    fn code(self) -> u32 {
        match self {
            Verdict::Drop => libc::NF_DROP as u32,
            Verdict::Accept => libc::NF_ACCEPT as u32,
        }
    }
}

/// How to configure a queue when binding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// What is copied to user space.
    pub copy: CopyMode,
    /// How many packets the kernel holds awaiting a verdict before it drops (or, with
    /// [`flags::FAIL_OPEN`], accepts) further packets. The kernel's default is 1024.
    pub max_len: u32,
    /// `NFQA_CFG_F_*` flags ([`flags`]).
    pub flags: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            copy: CopyMode::Meta,
            max_len: 1024,
            flags: flags::GSO,
        }
    }
}

/// Errors of the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Opening the socket or a configuration request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The queue number is bound by another socket (`EPERM`; also what a caller without
    /// `CAP_NET_ADMIN` gets).
    #[error("queue {0} is in use by another program (or CAP_NET_ADMIN is missing)")]
    Busy(u16),
    /// Receiving or sending failed.
    #[error("nfqueue: {0}")]
    Io(#[from] io::Error),
}

/// One queued packet, as the kernel described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuedPacket<'a> {
    /// The id to give a verdict for; ids grow by one per queued packet (modulo 2^32).
    pub id: u32,
    /// `hw_protocol` (ethertype: 0x0800 IPv4, 0x86dd IPv6).
    pub hw_protocol: u16,
    /// The netfilter hook that queued it (`NF_INET_*`).
    pub hook: u8,
    /// Input interface index, if any.
    pub indev: Option<u32>,
    /// Output interface index, if any.
    pub outdev: Option<u32>,
    /// The packet's full length (`NFQA_CAP_LEN` when the copy was cut, else the payload's length).
    pub len: u32,
    /// `NFQA_SKB_INFO` bits ([`SKB_INFO_GSO`], ...).
    pub skb_info: u32,
    /// The copied bytes (empty in [`CopyMode::Meta`]).
    pub payload: &'a [u8],
}

impl<'a> QueuedPacket<'a> {
    /// Decodes the attributes of an `NFQNL_MSG_PACKET` payload (after `struct nfgenmsg`); `None` when
    /// the packet header is missing.
    pub fn parse(attrs: &'a [u8]) -> Option<Self> {
        let mut packet = QueuedPacket {
            id: 0,
            hw_protocol: 0,
            hook: 0,
            indev: None,
            outdev: None,
            len: 0,
            skb_info: 0,
            payload: &[],
        };
        let mut have_header = false;
        let mut cap_len = None;
        for (kind, value) in crate::socket::parse_attrs(attrs) {
            match kind {
                NFQA_PACKET_HDR if value.len() >= 7 => {
                    packet.id = be32(&value[0..4]);
                    packet.hw_protocol = u16::from_be_bytes([value[4], value[5]]);
                    packet.hook = value[6];
                    have_header = true;
                }
                NFQA_IFINDEX_INDEV if value.len() >= 4 => packet.indev = Some(be32(value)),
                NFQA_IFINDEX_OUTDEV if value.len() >= 4 => packet.outdev = Some(be32(value)),
                NFQA_CAP_LEN if value.len() >= 4 => cap_len = Some(be32(value)),
                NFQA_SKB_INFO if value.len() >= 4 => packet.skb_info = be32(value),
                NFQA_PAYLOAD => packet.payload = value,
                _ => {}
            }
        }
        packet.len = cap_len.unwrap_or(packet.payload.len() as u32);
        have_header.then_some(packet)
    }
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"))
}

/// `struct nfgenmsg`: family, version 0, resource id (the queue number) in network order.
fn nfgenmsg(queue: u16) -> [u8; 4] {
    let [hi, lo] = queue.to_be_bytes();
    [libc::AF_UNSPEC as u8, 0, hi, lo]
}

fn config_request(queue: u16) -> MessageBuilder {
    MessageBuilder::new((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG, 0).header(&nfgenmsg(queue))
}

/// A bound queue. Dropping it unbinds the queue, which drops every packet still awaiting a verdict:
/// give verdicts first.
#[derive(Debug)]
pub struct Queue {
    socket: NetlinkSocket,
    number: u16,
    buf: Vec<u8>,
    /// Errors the kernel answered to verdicts (an unknown id, ...), counted rather than returned.
    verdict_errors: u64,
}

impl Queue {
    /// Binds queue `number` in the calling thread's network namespace and applies `config`.
    ///
    /// The socket's receive buffer is raised to 8 MiB and overruns do not fail `recv`: the kernel then
    /// drops the packet (or accepts it with [`flags::FAIL_OPEN`]) and counts it in
    /// `/proc/net/netfilter/nfnetlink_queue`.
    pub fn bind(number: u16, config: QueueConfig) -> Result<Self, QueueError> {
        let mut socket = NetlinkSocket::open(libc::NETLINK_NETFILTER).map_err(|source| {
            NetlinkError::Socket {
                operation: "open nfqueue socket".into(),
                source,
            }
        })?;
        let _ = socket.set_recv_buffer_force(8 << 20);
        let _ = socket.set_no_enobufs();
        let operation = format!("bind nfqueue {number}");
        let bind = config_request(number).attr(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0]);
        match socket.request(bind, &operation) {
            Ok(_) => {}
            // Another socket's queue: EPERM (EBUSY on older kernels).
            Err(e) if matches!(e.errno(), Some(libc::EPERM | libc::EBUSY)) => {
                return Err(QueueError::Busy(number))
            }
            Err(e) => return Err(e.into()),
        }
        let (mode, range) = match config.copy {
            CopyMode::Meta => (1u8, 0u32),
            CopyMode::Packet(n) => (2u8, u32::from(n)),
        };
        let mut params = [0u8; 5];
        params[..4].copy_from_slice(&range.to_be_bytes());
        params[4] = mode;
        let configure = config_request(number)
            .attr(NFQA_CFG_PARAMS, &params)
            .attr(NFQA_CFG_QUEUE_MAXLEN, &config.max_len.to_be_bytes())
            .attr(NFQA_CFG_MASK, &u32::MAX.to_be_bytes())
            .attr(NFQA_CFG_FLAGS, &config.flags.to_be_bytes());
        let queue = Self {
            socket,
            number,
            buf: vec![0u8; 1 << 17],
            verdict_errors: 0,
        };
        let mut queue = queue;
        queue
            .socket
            .request(configure, &format!("configure nfqueue {number}"))?;
        Ok(queue)
    }

    /// The queue number.
    pub fn number(&self) -> u16 {
        self.number
    }

    /// The socket, to wait for readability (poll) before [`Queue::recv`].
    pub fn socket(&self) -> &NetlinkSocket {
        &self.socket
    }

    /// How many verdicts the kernel refused so far (they are not returned as errors).
    pub fn verdict_errors(&self) -> u64 {
        self.verdict_errors
    }

    /// Receives one datagram without blocking and calls `each` for every packet in it. Returns how
    /// many packets it held; `Ok(0)` when nothing was waiting.
    pub fn recv(&mut self, mut each: impl FnMut(QueuedPacket<'_>)) -> Result<usize, QueueError> {
        let len = match self.socket.recv_into(&mut self.buf, libc::MSG_DONTWAIT) {
            Ok(len) => len,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        let mut count = 0;
        for msg in messages(&self.buf[..len]) {
            if msg.msg_type == NLMSG_ERROR {
                if error_of(&msg).0 != 0 {
                    self.verdict_errors += 1;
                }
                continue;
            }
            if msg.msg_type != ((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET) {
                continue;
            }
            if let Some(packet) = msg.payload.get(4..).and_then(QueuedPacket::parse) {
                count += 1;
                each(packet);
            }
        }
        Ok(count)
    }

    fn send_verdict(&mut self, msg_type: u16, id: u32, verdict: Verdict) -> Result<(), QueueError> {
        let mut hdr = [0u8; 8];
        hdr[..4].copy_from_slice(&verdict.code().to_be_bytes());
        hdr[4..].copy_from_slice(&id.to_be_bytes());
        let seq = self.socket.next_seq();
        let bytes = MessageBuilder::new((NFNL_SUBSYS_QUEUE << 8) | msg_type, 0)
            .header(&nfgenmsg(self.number))
            .attr(NFQA_VERDICT_HDR, &hdr)
            .finish(seq);
        self.socket.send(&bytes)?;
        Ok(())
    }

    /// Gives packet `id` its verdict.
    pub fn verdict(&mut self, id: u32, verdict: Verdict) -> Result<(), QueueError> {
        self.send_verdict(NFQNL_MSG_VERDICT, id, verdict)
    }

    /// Gives every queued packet with an id up to and including `id` (in queue order) the same
    /// verdict, in one message. Packets that should get another verdict must get it first.
    pub fn verdict_batch(&mut self, id: u32, verdict: Verdict) -> Result<(), QueueError> {
        self.send_verdict(NFQNL_MSG_VERDICT_BATCH, id, verdict)
    }

    /// Unbinds the queue (dropping whatever still awaits a verdict) and waits for the kernel's ack.
    pub fn unbind(mut self) -> Result<(), QueueError> {
        self.unbind_inner()
    }

    fn unbind_inner(&mut self) -> Result<(), QueueError> {
        let unbind = config_request(self.number)
            .attr(NFQA_CFG_CMD, &[NFQNL_CFG_CMD_UNBIND, 0, 0, 0])
            .finish(0);
        // Packets may still arrive before the unbind: send it, then skip everything but its answer.
        let seq = self.socket.next_seq();
        let mut bytes = unbind;
        bytes[8..12].copy_from_slice(&seq.to_ne_bytes());
        let flags = u16::from_ne_bytes([bytes[6], bytes[7]]) | NLM_F_ACK;
        bytes[6..8].copy_from_slice(&flags.to_ne_bytes());
        self.socket.send(&bytes)?;
        self.socket
            .set_recv_timeout(std::time::Duration::from_secs(2))?;
        loop {
            let len = self.socket.recv_into(&mut self.buf, 0)?;
            for msg in messages(&self.buf[..len]) {
                if msg.msg_type == NLMSG_ERROR && msg.seq == seq {
                    let (errno, message) = error_of(&msg);
                    if errno == 0 {
                        return Ok(());
                    }
                    return Err(NetlinkError::Kernel {
                        operation: format!("unbind nfqueue {}", self.number),
                        source: io::Error::from_raw_os_error(-errno),
                        message,
                    }
                    .into());
                }
            }
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // Closing the socket unbinds too; this is the orderly way, best effort.
        let _ = self.unbind_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::NLMSG_HDRLEN;

    /// An `NFQNL_MSG_PACKET` as the kernel builds it for a 1500-byte GSO packet in meta mode.
    fn packet_message(id: u32) -> Vec<u8> {
        let mut hdr = [0u8; 7];
        hdr[..4].copy_from_slice(&id.to_be_bytes());
        hdr[4..6].copy_from_slice(&0x0800u16.to_be_bytes());
        hdr[6] = 4; // NF_INET_POST_ROUTING
        MessageBuilder::new((NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET, 0)
            .header(&[2, 0, 0, 7])
            .attr(NFQA_PACKET_HDR, &hdr)
            .attr(NFQA_IFINDEX_OUTDEV, &3u32.to_be_bytes())
            .attr(NFQA_SKB_INFO, &SKB_INFO_GSO.to_be_bytes())
            .attr(NFQA_CAP_LEN, &1500u32.to_be_bytes())
            .finish(0)
    }

    #[test]
    fn packet_attributes_decode() {
        let msg = packet_message(0xdead_beef);
        let packet = QueuedPacket::parse(&msg[NLMSG_HDRLEN + 4..]).unwrap();
        assert_eq!(packet.id, 0xdead_beef);
        assert_eq!(packet.hw_protocol, 0x0800);
        assert_eq!(packet.hook, 4);
        assert_eq!(packet.outdev, Some(3));
        assert_eq!(packet.indev, None);
        assert_eq!(packet.len, 1500);
        assert_eq!(packet.skb_info, SKB_INFO_GSO);
        assert!(packet.payload.is_empty());
    }

    #[test]
    fn a_message_without_packet_header_is_skipped_and_truncation_is_safe() {
        let msg = packet_message(1);
        for cut in 0..msg.len() {
            // Never panics; a cut inside the packet header loses the packet.
            let _ = QueuedPacket::parse(&msg[(NLMSG_HDRLEN + 4).min(cut)..cut]);
        }
        let without = MessageBuilder::new(0, 0)
            .attr(NFQA_CAP_LEN, &1u32.to_be_bytes())
            .finish(0);
        assert_eq!(QueuedPacket::parse(&without[NLMSG_HDRLEN..]), None);
    }

    #[test]
    fn queue_number_is_big_endian_in_nfgenmsg() {
        assert_eq!(nfgenmsg(0x1234), [0, 0, 0x12, 0x34]);
    }
}
