//! nftables over `NETLINK_NETFILTER`: the pieces every table of the workspace shares. Batches are built with
//! libnftnl (`nftnl`); this module adds the expressions nftnl lacks (`payload` loads at any offset, `meta`
//! and `ct` loads and stores such as `meta priority set`), turns a batch into one buffer whose rule
//! additions echo their handles, and sends a batch and waits for every ack.

use std::ffi::{CStr, CString};
use std::ptr::NonNull;
use std::time::Duration;

use nftnl::expr::Expression;
use nftnl::nftnl_sys as sys;
use nftnl::{Batch, MsgType, ProtoFamily, Rule, Table};

use crate::nft_expr::{PayloadToRegister, REG_1};
use crate::socket::{
    attr_string, parse_attrs, parse_error, Message, NetlinkError, NetlinkSocket, NLMSG_ERROR,
    NLMSG_HDRLEN, NLM_F_ACK, NLM_F_ECHO,
};

/// `NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWRULE`.
pub const NFT_NEWRULE_MSG_TYPE: u16 = (10 << 8) | 6;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;

/// A fresh nftnl expression of kind `name` (`payload`, `lookup`, ...), owned by the caller until a rule
/// takes it.
pub(crate) fn alloc_expr(name: &CStr) -> NonNull<sys::nftnl_expr> {
    // SAFETY: name is a valid C string; allocation failure is handled.
    let raw = unsafe { sys::nftnl_expr_alloc(name.as_ptr()) };
    NonNull::new(raw).expect("nftnl_expr_alloc: out of memory")
}

/// `payload load` of `len` bytes at `offset` from header `base` (`NFT_PAYLOAD_*_HEADER`) into register 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadLoad {
    /// `NFT_PAYLOAD_LL_HEADER`, `_NETWORK_HEADER` or `_TRANSPORT_HEADER`.
    pub base: u32,
    /// Offset from the start of that header.
    pub offset: u32,
    /// Bytes to load.
    pub len: u32,
}

impl PayloadLoad {
    /// A load from the network header.
    pub fn network(offset: u32, len: u32) -> Self {
        Self {
            base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
            offset,
            len,
        }
    }

    /// A load from the transport header.
    pub fn transport(offset: u32, len: u32) -> Self {
        Self {
            base: libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
            offset,
            len,
        }
    }
}

impl Expression for PayloadLoad {
    fn to_expr(&self, rule: &Rule) -> NonNull<sys::nftnl_expr> {
        PayloadToRegister {
            load: *self,
            dreg: REG_1,
        }
        .to_expr(rule)
    }
}

/// A `meta` or `ct` expression that moves one key between the packet and register 1: `meta <key>`
/// (a load), `meta <key> set` and `ct <key> set` (stores). nftnl only offers `meta mark set`; HTB
/// needs `meta priority set`.
#[derive(Debug, Clone, Copy)]
pub struct RegisterExpr {
    name: &'static CStr,
    key_attr: u32,
    key: u32,
    register_attr: u32,
}

impl RegisterExpr {
    /// `meta <key>` into register 1.
    pub fn meta_load(key: u32) -> Self {
        Self {
            name: c"meta",
            key_attr: sys::NFTNL_EXPR_META_KEY,
            key,
            register_attr: sys::NFTNL_EXPR_META_DREG,
        }
    }

    /// `meta <key> set` from register 1 (`priority` selects the HTB class, `mark` the fwmark).
    pub fn meta_set(key: u32) -> Self {
        Self {
            name: c"meta",
            key_attr: sys::NFTNL_EXPR_META_KEY,
            key,
            register_attr: sys::NFTNL_EXPR_META_SREG,
        }
    }

    /// `ct <key>` into register 1.
    pub fn ct_load(key: u32) -> Self {
        Self {
            name: c"ct",
            key_attr: sys::NFTNL_EXPR_CT_KEY,
            key,
            register_attr: sys::NFTNL_EXPR_CT_DREG,
        }
    }

    /// `ct <key> set` from register 1.
    pub fn ct_set(key: u32) -> Self {
        Self {
            name: c"ct",
            key_attr: sys::NFTNL_EXPR_CT_KEY,
            key,
            register_attr: sys::NFTNL_EXPR_CT_SREG,
        }
    }
}

impl Expression for RegisterExpr {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(self.name);
        // SAFETY: expr is a live expression of this kind; both attributes are u32.
        unsafe {
            sys::nftnl_expr_set_u32(expr.as_ptr(), self.key_attr as u16, self.key);
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                self.register_attr as u16,
                libc::NFT_REG_1 as u32,
            );
        }
        expr
    }
}

/// `queue num N [bypass]`: hands the packet to user space on nfqueue `num` (see [`crate::nfqueue`]).
/// With `bypass`, packets pass untouched while no program has bound the queue; without it they are
/// dropped.
///
/// Built as the x_tables `NFQUEUE` target (revision 3) through nft's compat expression, as iptables-nft
/// does: kernels built without `nft_queue` (like the project's test machines, where a native `queue`
/// statement fails with ENOENT) still have it. nftnl's `Verdict::Queue` could not name a queue anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueExpr {
    /// The queue number.
    pub num: u16,
    /// Accept (instead of drop) while nobody listens on the queue.
    pub bypass: bool,
}

impl Expression for QueueExpr {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        /// `NFQ_FLAG_BYPASS`.
        const BYPASS: u16 = 0x01;
        /// `XT_ALIGN(sizeof(struct xt_NFQ_info_v3))`.
        const INFO_LEN: usize = 8;
        // struct xt_NFQ_info_v3 { __u16 queuenum; __u16 queues_total; __u16 flags; } in host order.
        let mut info = [0u8; INFO_LEN];
        info[0..2].copy_from_slice(&self.num.to_ne_bytes());
        info[2..4].copy_from_slice(&1u16.to_ne_bytes());
        if self.bypass {
            info[4..6].copy_from_slice(&BYPASS.to_ne_bytes());
        }
        let expr = alloc_expr(c"target");
        // SAFETY: expr is a live target expression. libnftnl keeps (and later frees) the info pointer
        // instead of copying it, so it gets a malloc'd buffer of its own; the name is copied.
        unsafe {
            let data = libc::malloc(INFO_LEN).cast::<u8>();
            assert!(!data.is_null(), "malloc: out of memory");
            std::ptr::copy_nonoverlapping(info.as_ptr(), data, INFO_LEN);
            sys::nftnl_expr_set_str(
                expr.as_ptr(),
                sys::NFTNL_EXPR_TG_NAME as u16,
                c"NFQUEUE".as_ptr(),
            );
            sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_TG_REV as u16, 3);
            sys::nftnl_expr_set(
                expr.as_ptr(),
                sys::NFTNL_EXPR_TG_INFO as u16,
                data.cast(),
                INFO_LEN as u32,
            );
        }
        expr
    }
}

/// A C string for nftnl names and comments; NUL bytes (which no name may hold) are dropped.
pub fn cstring(text: &str) -> CString {
    CString::new(text.replace('\0', "")).expect("NUL bytes removed")
}

/// A batch that deletes table `name` of `family` if it exists (adding it first makes the deletion succeed
/// whether or not the table is there).
pub fn delete_table_batch(name: &str, family: ProtoFamily) -> Batch {
    let table = Table::new(cstring(name), family);
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch
}

/// A finalized batch as one buffer, with `NLM_F_ECHO` set on rule additions so the kernel reports their
/// handles. Returns the bytes, the sequence numbers of messages that request an ack, and those of rule
/// additions.
pub fn finalize(batch: Batch) -> (Vec<u8>, Vec<u32>, Vec<u32>) {
    let finalized = batch.finalize();
    let mut bytes = Vec::new();
    for chunk in &finalized {
        bytes.extend_from_slice(chunk);
    }
    let mut acked = Vec::new();
    let mut rule_adds = Vec::new();
    let mut pos = 0;
    while pos + NLMSG_HDRLEN <= bytes.len() {
        let len = u32::from_ne_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        if len < NLMSG_HDRLEN {
            break;
        }
        let msg_type = u16::from_ne_bytes([bytes[pos + 4], bytes[pos + 5]]);
        let mut flags = u16::from_ne_bytes([bytes[pos + 6], bytes[pos + 7]]);
        let seq = u32::from_ne_bytes(bytes[pos + 8..pos + 12].try_into().expect("4 bytes"));
        if msg_type == NFT_NEWRULE_MSG_TYPE {
            flags |= NLM_F_ECHO;
            bytes[pos + 6..pos + 8].copy_from_slice(&flags.to_ne_bytes());
            rule_adds.push(seq);
        }
        if flags & NLM_F_ACK != 0 {
            acked.push(seq);
        }
        pos += (len + 3) & !3;
    }
    (bytes, acked, rule_adds)
}

/// Reads an echoed `NEWRULE`: chain name and handle.
pub fn parse_rule_echo(payload: &[u8]) -> Option<(String, u64)> {
    let attrs = parse_attrs(payload.get(4..)?);
    let chain = attrs
        .iter()
        .find(|(k, _)| *k == NFTA_RULE_CHAIN)
        .map(|(_, v)| attr_string(v))?;
    let handle = attrs
        .iter()
        .find(|(k, _)| *k == NFTA_RULE_HANDLE)
        .and_then(|(_, v)| v.get(..8))
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))?;
    Some((chain, handle))
}

/// Sends `batch` on a fresh `NETLINK_NETFILTER` socket of the calling thread's network namespace and waits
/// (up to 5 s) for every ack, as [`send_batch_on`] does. Returns the echoed messages (rule handles, see
/// [`parse_rule_echo`]); the first error the kernel answered fails the whole call (a batch is one
/// transaction).
pub fn send_batch(batch: Batch, operation: &str) -> Result<Vec<Message>, NetlinkError> {
    let socket_error = |source| NetlinkError::Socket {
        operation: operation.to_owned(),
        source,
    };
    let socket = NetlinkSocket::open(libc::NETLINK_NETFILTER).map_err(socket_error)?;
    socket
        .set_recv_timeout(Duration::from_secs(5))
        .map_err(socket_error)?;
    send_batch_on(&socket, batch, operation)
}

/// Sends `batch` on `socket` (a `NETLINK_NETFILTER` socket) and waits for the kernel's answers, for
/// batches of any size: the socket's buffers are forced large enough for the batch, and messages that ask
/// for no ack (set elements, see [`crate::nft_set`]) are still checked for errors. Returns the echoed
/// messages; the first error fails the call (a batch is one transaction).
pub fn send_batch_on(
    socket: &NetlinkSocket,
    batch: Batch,
    operation: &str,
) -> Result<Vec<Message>, NetlinkError> {
    let socket_error = |source| NetlinkError::Socket {
        operation: operation.to_owned(),
        source,
    };
    let (bytes, acked, _) = finalize(batch);
    if bytes.len() > 1 << 20 {
        socket
            .force_buffer_sizes(bytes.len().saturating_mul(2))
            .map_err(socket_error)?;
    }
    socket.send(&bytes).map_err(socket_error)?;
    let (mut echoes, mut errors) = socket.collect_batch_replies(&acked).map_err(socket_error)?;
    // nfnetlink handles the whole batch inside send(), so every answer is queued by now, including the
    // error of a message that asked for no ack and comes after the last ack.
    for message in socket.recv_pending().map_err(socket_error)? {
        if message.msg_type == NLMSG_ERROR {
            let (errno, text) = parse_error(&message);
            if errno != 0 {
                errors.push((message.seq, errno, text));
            }
        } else {
            echoes.push(message);
        }
    }
    if let Some((_, errno, message)) = errors.into_iter().next() {
        return Err(NetlinkError::Kernel {
            operation: operation.to_owned(),
            source: std::io::Error::from_raw_os_error(-errno),
            message,
        });
    }
    Ok(echoes)
}
