//! nftables named sets and maps with concatenated keys, their elements, and the expressions that look
//! packets up in them, so that one rule classifies any number of flows in O(1):
//!
//! ```text
//! map m { type ipv4_addr . ipv4_addr . inet_service . inet_service : classid; }
//! meta nfproto ipv4 meta l4proto tcp meta priority set ip saddr . ip daddr . tcp sport . tcp dport map @m
//! ```
//!
//! Messages are written as raw nfnetlink bytes ([`SetSpec`] and [`ElementsMsg`] implement nftnl's
//! `NlMsg`), so they go into the same [`nftnl::Batch`] as tables, chains and rules: one transaction.
//! Element messages carry many elements each and request no ack (errors are still reported), so a batch
//! of tens of thousands of elements needs neither a huge receive buffer nor one ack per element; large
//! batches need [`crate::NetlinkSocket::force_buffer_sizes`] on the sending socket.

use std::ffi::{c_void, CStr, CString};
use std::ptr::NonNull;

use nftnl::expr::Expression;
use nftnl::nftnl_sys as sys;
use nftnl::{Batch, MsgType, NlMsg, ProtoFamily, Rule};

use crate::nft::{cstring, finalize, PayloadLoad};
use crate::socket::{
    Message, MessageBuilder, NetlinkError, NetlinkSocket, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE,
};

/// `NFNL_SUBSYS_NFTABLES`.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;

const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_DESC: u16 = 9;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_USERDATA: u16 = 13;
/// libnftnl's `NFTNL_UDATA_SET_KEYBYTEORDER` / `_DATABYTEORDER` and nft's `BYTEORDER_*`: how `nft list`
/// prints keys and data (the kernel never reads them).
const UDATA_SET_KEYBYTEORDER: u8 = 0;
const UDATA_SET_DATABYTEORDER: u8 = 1;
const BYTEORDER_HOST_ENDIAN: u32 = 1;
const BYTEORDER_BIG_ENDIAN: u32 = 2;
const NFTA_SET_DESC_SIZE: u16 = 1;
const NFTA_LIST_ELEM: u16 = 1;

const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;

/// `NFT_SET_MAP`: elements carry data.
pub const NFT_SET_MAP: u32 = 0x8;

/// Bytes of element payload per message: well under the 64 KiB an attribute can hold.
const ELEMENTS_PER_MESSAGE_BYTES: usize = 32 * 1024;

/// The nft `NFT_REG32_00` register: concatenated keys are loaded into consecutive 32-bit registers from
/// here (a field shorter than 4 bytes still takes a whole register, zero-padded).
pub const NFT_REG32_00: u32 = 8;

/// One field of a set key or a map's data: nft's datatype and its length. The ids are nft's
/// (`enum datatypes` in nftables' `datatype.h`); the kernel only stores them, `nft list` uses them to
/// print elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// `ipv4_addr` (4 bytes, network order).
    Ipv4Addr,
    /// `ipv6_addr` (16 bytes, network order).
    Ipv6Addr,
    /// `inet_service`: a port (2 bytes, network order).
    InetService,
    /// `mark` (4 bytes, host order): `meta mark`, `ct mark`.
    Mark,
    /// `classid` (4 bytes, host order): `meta priority`, a tc class handle.
    ClassId,
}

impl Field {
    /// nft's datatype id.
    pub fn type_id(self) -> u32 {
        match self {
            Field::Ipv4Addr => 7,
            Field::Ipv6Addr => 8,
            Field::InetService => 13,
            Field::Mark => 19,
            Field::ClassId => 23,
        }
    }

    /// Length in bytes, unpadded.
    pub fn len(self) -> u32 {
        match self {
            Field::Ipv4Addr | Field::Mark | Field::ClassId => 4,
            Field::Ipv6Addr => 16,
            Field::InetService => 2,
        }
    }

    /// Always false: every field has bytes (for clippy's `len_without_is_empty`).
    pub fn is_empty(self) -> bool {
        false
    }

    /// nft's byte order of the field (for `nft list`).
    fn byteorder(self) -> u32 {
        match self {
            Field::Mark | Field::ClassId => BYTEORDER_HOST_ENDIAN,
            Field::Ipv4Addr | Field::Ipv6Addr | Field::InetService => BYTEORDER_BIG_ENDIAN,
        }
    }

    /// Length rounded up to whole 32-bit registers, as it sits in a concatenated key.
    pub fn padded_len(self) -> u32 {
        self.len().div_ceil(4) * 4
    }
}

/// A named set (or, with `data`, a map) in a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    /// Table name.
    pub table: String,
    /// Table family.
    pub family: ProtoFamily,
    /// Set name.
    pub name: String,
    /// Key fields, concatenated in this order.
    pub key: Vec<Field>,
    /// Data of a map; `None` for a set.
    pub data: Option<Field>,
    /// Most elements the kernel accepts (`size`); `None` for no limit.
    pub size: Option<u32>,
    /// Transaction-local id (`NFTA_SET_ID`) so that rules in the same batch find the new set.
    pub id: u32,
}

/// nft's concatenated datatype: each field's id shifted in 6 bits at a time (`concat_subtype_add`).
fn concat_type(fields: &[Field]) -> u32 {
    fields
        .iter()
        .fold(0u32, |acc, field| (acc << 6) | field.type_id())
}

/// A finished nfnetlink message, copied into the batch buffer as is (its sequence number is set when
/// written).
struct RawMessage {
    msg_type: u16,
    flags: u16,
    family: u8,
    build: Box<dyn Fn(MessageBuilder) -> MessageBuilder>,
}

impl RawMessage {
    fn bytes(&self, seq: u32) -> Vec<u8> {
        // struct nfgenmsg: family, version (NFNETLINK_V0), res_id (big endian, 0).
        let builder = MessageBuilder::new((NFNL_SUBSYS_NFTABLES << 8) | self.msg_type, self.flags)
            .header(&[self.family, 0, 0, 0]);
        (self.build)(builder).finish(seq)
    }
}

/// Copies `bytes` (one netlink message) into nftnl's batch buffer.
///
/// # Safety
/// `buf` must have room for `nftnl::nft_nlmsg_maxsize()` bytes, as `NlMsg::write` promises.
unsafe fn copy_into(buf: *mut c_void, bytes: &[u8]) {
    assert!(
        bytes.len() <= nftnl::nft_nlmsg_maxsize() as usize,
        "nfnetlink message of {} bytes does not fit a batch page",
        bytes.len()
    );
    // SAFETY: the caller guarantees room for nft_nlmsg_maxsize bytes, checked above.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast::<u8>(), bytes.len()) };
}

impl SetSpec {
    /// Key length in bytes: each field padded to 4.
    pub fn key_len(&self) -> u32 {
        self.key.iter().map(|f| f.padded_len()).sum()
    }

    fn message(&self, msg_type: MsgType) -> RawMessage {
        let spec = self.clone();
        match msg_type {
            MsgType::Add => RawMessage {
                msg_type: NFT_MSG_NEWSET,
                flags: NLM_F_CREATE | NLM_F_ACK,
                family: self.family as u8,
                build: Box::new(move |mut b| {
                    b = b
                        .attr_str(NFTA_SET_TABLE, &spec.table)
                        .attr_str(NFTA_SET_NAME, &spec.name)
                        .attr(
                            NFTA_SET_FLAGS,
                            &(if spec.data.is_some() { NFT_SET_MAP } else { 0 }).to_be_bytes(),
                        )
                        .attr(NFTA_SET_KEY_TYPE, &concat_type(&spec.key).to_be_bytes())
                        .attr(NFTA_SET_KEY_LEN, &spec.key_len().to_be_bytes());
                    if let Some(data) = spec.data {
                        b = b
                            .attr(NFTA_SET_DATA_TYPE, &data.type_id().to_be_bytes())
                            .attr(NFTA_SET_DATA_LEN, &data.len().to_be_bytes());
                    }
                    // No NFTA_SET_DESC_CONCAT: the kernel takes field lengths only for interval
                    // sets (NFT_SET_CONCAT, the pipapo backend); an exact-match concatenated key is
                    // one opaque key for the hash backend.
                    if let Some(size) = spec.size {
                        b = b
                            .begin_nest(NFTA_SET_DESC)
                            .attr(NFTA_SET_DESC_SIZE, &size.to_be_bytes())
                            .end_nest();
                    }
                    let mut userdata = Vec::new();
                    let key_order = spec
                        .key
                        .first()
                        .map_or(BYTEORDER_BIG_ENDIAN, |f| f.byteorder());
                    for (kind, order) in [
                        (UDATA_SET_KEYBYTEORDER, Some(key_order)),
                        (UDATA_SET_DATABYTEORDER, spec.data.map(Field::byteorder)),
                    ] {
                        if let Some(order) = order {
                            userdata.extend_from_slice(&[kind, 4]);
                            userdata.extend_from_slice(&order.to_ne_bytes());
                        }
                    }
                    b.attr(NFTA_SET_ID, &spec.id.to_be_bytes())
                        .attr(NFTA_SET_USERDATA, &userdata)
                }),
            },
            MsgType::Del => RawMessage {
                msg_type: NFT_MSG_DELSET,
                flags: NLM_F_ACK,
                family: self.family as u8,
                build: Box::new(move |b| {
                    b.attr_str(NFTA_SET_TABLE, &spec.table)
                        .attr_str(NFTA_SET_NAME, &spec.name)
                }),
            },
        }
    }

    /// A key from its fields' bytes, each padded to 4 bytes as the registers hold them. Panics when the
    /// number or length of the parts does not match the key's fields (a programming error).
    pub fn key_bytes(&self, parts: &[&[u8]]) -> Vec<u8> {
        assert_eq!(parts.len(), self.key.len(), "one part per key field");
        let mut key = Vec::with_capacity(self.key_len() as usize);
        for (field, part) in self.key.iter().zip(parts) {
            assert_eq!(part.len(), field.len() as usize, "{field:?} part length");
            key.extend_from_slice(part);
            key.resize(key.len() + (field.padded_len() - field.len()) as usize, 0);
        }
        key
    }

    /// Adds elements (key and, for a map, data) to `batch`, many per message.
    pub fn add_elements<'k>(
        &self,
        batch: &mut Batch,
        elements: impl IntoIterator<Item = (&'k [u8], Option<&'k [u8]>)>,
    ) {
        self.element_messages(batch, NFT_MSG_NEWSETELEM, NLM_F_CREATE, elements);
    }

    /// Deletes elements by key from `batch`. Deleting a key the set does not hold fails the batch
    /// (`ENOENT`).
    pub fn delete_elements<'k>(&self, batch: &mut Batch, keys: impl IntoIterator<Item = &'k [u8]>) {
        self.element_messages(
            batch,
            NFT_MSG_DELSETELEM,
            0,
            keys.into_iter().map(|key| (key, None)),
        );
    }

    /// Removes every element of the set (a `DELSETELEM` without elements flushes the set).
    pub fn flush(&self, batch: &mut Batch) {
        let spec = self.clone();
        batch.add(
            &ElementsMsg(RawMessage {
                msg_type: NFT_MSG_DELSETELEM,
                flags: 0,
                family: self.family as u8,
                build: Box::new(move |b| {
                    b.attr_str(NFTA_SET_ELEM_LIST_TABLE, &spec.table)
                        .attr_str(NFTA_SET_ELEM_LIST_SET, &spec.name)
                }),
            }),
            MsgType::Del,
        );
    }

    fn element_messages<'k>(
        &self,
        batch: &mut Batch,
        msg_type: u16,
        flags: u16,
        elements: impl IntoIterator<Item = (&'k [u8], Option<&'k [u8]>)>,
    ) {
        let mut chunk: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        let mut bytes = 0;
        let mut flush = |chunk: &mut Vec<(Vec<u8>, Option<Vec<u8>>)>| {
            if chunk.is_empty() {
                return;
            }
            let (table, name) = (self.table.clone(), self.name.clone());
            let elements = std::mem::take(chunk);
            batch.add(
                &ElementsMsg(RawMessage {
                    msg_type,
                    flags,
                    family: self.family as u8,
                    build: Box::new(move |mut b| {
                        b = b
                            .attr_str(NFTA_SET_ELEM_LIST_TABLE, &table)
                            .attr_str(NFTA_SET_ELEM_LIST_SET, &name)
                            .begin_nest(NFTA_SET_ELEM_LIST_ELEMENTS);
                        for (key, data) in &elements {
                            b = b
                                .begin_nest(NFTA_LIST_ELEM)
                                .begin_nest(NFTA_SET_ELEM_KEY)
                                .attr(NFTA_DATA_VALUE, key)
                                .end_nest();
                            if let Some(data) = data {
                                b = b
                                    .begin_nest(NFTA_SET_ELEM_DATA)
                                    .attr(NFTA_DATA_VALUE, data)
                                    .end_nest();
                            }
                            b = b.end_nest();
                        }
                        b.end_nest()
                    }),
                }),
                MsgType::Add,
            );
        };
        for (key, data) in elements {
            bytes += key.len() + data.map_or(0, <[u8]>::len) + 24;
            chunk.push((key.to_vec(), data.map(<[u8]>::to_vec)));
            if bytes >= ELEMENTS_PER_MESSAGE_BYTES {
                flush(&mut chunk);
                bytes = 0;
            }
        }
        flush(&mut chunk);
    }
}

// SAFETY: `write` writes one complete netlink message of at most nft_nlmsg_maxsize bytes.
unsafe impl NlMsg for SetSpec {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        // SAFETY: forwarded from the caller.
        unsafe { copy_into(buf, &self.message(msg_type).bytes(seq)) }
    }
}

/// One element message (add, delete or flush) built by [`SetSpec`]; the batch's message type is ignored.
struct ElementsMsg(RawMessage);

// SAFETY: `write` writes one complete netlink message of at most nft_nlmsg_maxsize bytes.
unsafe impl NlMsg for ElementsMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        // SAFETY: forwarded from the caller.
        unsafe { copy_into(buf, &self.0.bytes(seq)) }
    }
}

/// Sends `batch` on `socket` (a `NETLINK_NETFILTER` socket) and waits for the kernel's answers, like
/// [`crate::nft::send_batch`], for batches of any size: the socket's buffers are forced large enough for
/// the batch, and a batch whose messages ask for no ack (elements only, on kernels that do not ack the
/// batch end) is still checked for errors. Returns the echoed messages; the first error fails the call
/// (a batch is one transaction).
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
    if acked.is_empty() {
        // The kernel handled the batch inside send(); anything it answered is queued now.
        for message in socket.recv_pending().map_err(socket_error)? {
            if message.msg_type == NLMSG_ERROR {
                let errno = message
                    .payload
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                if errno != 0 {
                    errors.push((message.seq, errno, None));
                }
            } else {
                echoes.push(message);
            }
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

fn alloc_expr(name: &CStr) -> NonNull<sys::nftnl_expr> {
    // SAFETY: name is a valid C string; allocation failure is handled.
    let raw = unsafe { sys::nftnl_expr_alloc(name.as_ptr()) };
    NonNull::new(raw).expect("nftnl_expr_alloc: out of memory")
}

/// A `payload` load into any register (for concatenated keys: [`NFT_REG32_00`] + n).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadLoadTo {
    /// What to load.
    pub load: PayloadLoad,
    /// Destination register.
    pub register: u32,
}

impl Expression for PayloadLoadTo {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"payload");
        // SAFETY: expr is a live payload expression; the attributes are u32.
        unsafe {
            for (attr, value) in [
                (sys::NFTNL_EXPR_PAYLOAD_DREG, self.register),
                (sys::NFTNL_EXPR_PAYLOAD_BASE, self.load.base),
                (sys::NFTNL_EXPR_PAYLOAD_OFFSET, self.load.offset),
                (sys::NFTNL_EXPR_PAYLOAD_LEN, self.load.len),
            ] {
                sys::nftnl_expr_set_u32(expr.as_ptr(), attr as u16, value);
            }
        }
        expr
    }
}

/// `lookup`: the key in registers from `source` looked up in a named set; for a map, the element's data
/// goes to `destination` (a miss ends the rule, like a failed comparison).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// Set or map name.
    pub set: CString,
    /// The set's transaction id ([`SetSpec::id`]).
    pub set_id: u32,
    /// First register of the key.
    pub source: u32,
    /// Register for a map's data; `None` for a set (match only).
    pub destination: Option<u32>,
}

impl Lookup {
    /// A lookup in `spec` with the key at [`NFT_REG32_00`] and map data into `NFT_REG_1`.
    pub fn map(spec: &SetSpec) -> Self {
        Self {
            set: cstring(&spec.name),
            set_id: spec.id,
            source: NFT_REG32_00,
            destination: spec.data.map(|_| libc::NFT_REG_1 as u32),
        }
    }
}

impl Expression for Lookup {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"lookup");
        // SAFETY: expr is a live lookup expression; SET is a C string, the rest u32.
        unsafe {
            sys::nftnl_expr_set_str(
                expr.as_ptr(),
                sys::NFTNL_EXPR_LOOKUP_SET as u16,
                self.set.as_ptr(),
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_LOOKUP_SET_ID as u16,
                self.set_id,
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_LOOKUP_SREG as u16,
                self.source,
            );
            if let Some(destination) = self.destination {
                sys::nftnl_expr_set_u32(
                    expr.as_ptr(),
                    sys::NFTNL_EXPR_LOOKUP_DREG as u16,
                    destination,
                );
            }
        }
        expr
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::{parse_attrs, parse_messages};

    fn spec() -> SetSpec {
        SetSpec {
            table: "t".into(),
            family: ProtoFamily::Inet,
            name: "dl4".into(),
            key: vec![
                Field::Ipv4Addr,
                Field::Ipv4Addr,
                Field::InetService,
                Field::InetService,
            ],
            data: Some(Field::ClassId),
            size: Some(1000),
            id: 3,
        }
    }

    #[test]
    fn concatenated_type_and_length_match_nft() {
        let spec = spec();
        // nft: ipv4_addr . ipv4_addr . inet_service . inet_service
        assert_eq!(concat_type(&spec.key), ((7 << 6 | 7) << 6 | 13) << 6 | 13);
        assert_eq!(spec.key_len(), 16);
        let key = spec.key_bytes(&[&[10, 0, 0, 1], &[10, 0, 0, 2], &[0, 80], &[0xc3, 0x50]]);
        assert_eq!(
            key,
            [10, 0, 0, 1, 10, 0, 0, 2, 0, 80, 0, 0, 0xc3, 0x50, 0, 0]
        );
    }

    #[test]
    fn new_set_message_carries_map_attributes() {
        let bytes = spec().message(MsgType::Add).bytes(42);
        let messages = parse_messages(&bytes);
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].msg_type, (10 << 8) | NFT_MSG_NEWSET);
        assert_eq!(messages[0].seq, 42);
        let attrs = parse_attrs(&messages[0].payload[4..]);
        let get = |kind| attrs.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
        assert_eq!(get(NFTA_SET_FLAGS), Some(&NFT_SET_MAP.to_be_bytes()[..]));
        assert_eq!(get(NFTA_SET_KEY_LEN), Some(&16u32.to_be_bytes()[..]));
        assert_eq!(get(NFTA_SET_DATA_TYPE), Some(&23u32.to_be_bytes()[..]));
        let desc = parse_attrs(get(NFTA_SET_DESC).unwrap());
        assert_eq!(desc, vec![(NFTA_SET_DESC_SIZE, &1000u32.to_be_bytes()[..])]);
    }

    #[test]
    fn elements_are_split_over_messages_of_bounded_size() {
        let spec = spec();
        let keys: Vec<Vec<u8>> = (0..5000u32)
            .map(|i| spec.key_bytes(&[&i.to_be_bytes(), &[10, 0, 0, 2], &[0, 80], &[0, 1]]))
            .collect();
        let data = 0x4d50_0010u32.to_ne_bytes();
        let mut batch = Batch::new();
        spec.add_elements(
            &mut batch,
            keys.iter().map(|k| (k.as_slice(), Some(&data[..]))),
        );
        let finalized = batch.finalize();
        let mut all = Vec::new();
        for chunk in &finalized {
            all.extend_from_slice(chunk);
        }
        let messages = parse_messages(&all);
        let element_messages: Vec<_> = messages
            .iter()
            .filter(|m| m.msg_type == (10 << 8) | NFT_MSG_NEWSETELEM)
            .collect();
        assert!(
            element_messages.len() > 1,
            "5000 elements need several messages"
        );
        let mut count = 0;
        for message in &element_messages {
            assert!(message.payload.len() < 40 * 1024);
            assert_eq!(
                message.flags & NLM_F_ACK,
                0,
                "element messages ask for no ack"
            );
            let attrs = parse_attrs(&message.payload[4..]);
            let list = attrs
                .iter()
                .find(|(k, _)| *k == NFTA_SET_ELEM_LIST_ELEMENTS)
                .unwrap()
                .1;
            count += parse_attrs(list).len();
        }
        assert_eq!(count, 5000);
    }
}
