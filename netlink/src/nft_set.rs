//! Named nftables sets and maps: their declaration, their elements (added, deleted and flushed in
//! batches), and reading elements back with their counters. A rule that looks a packet up in a set costs
//! one hash lookup whatever the number of elements, so state that grows with clients (subflows,
//! mappings) belongs in elements, not in rules:
//!
//! ```text
//! map m { type ipv4_addr . ipv4_addr . inet_service . inet_service : classid; }
//! meta nfproto ipv4 meta l4proto tcp meta priority set ip saddr . ip daddr . tcp sport . tcp dport map @m
//! ```
//!
//! - [`SetSpec`] declares a set or map (concatenated key, concatenated data, optional `counter` on every
//!   element, optional `size`) and writes its element messages.
//! - [`dump_elements`] reads every element with its counter (`nft list set`).
//! - The expressions that use sets are in [`crate::nft_expr`] ([`crate::nft_expr::SetLookup`],
//!   [`crate::nft_expr::PayloadToRegister`]).
//!
//! Messages are written as raw nfnetlink bytes ([`SetSpec`] and its element messages implement nftnl's
//! `NlMsg`), so they go into the same [`nftnl::Batch`] as tables, chains and rules: one transaction.
//! Element messages carry many elements each and request no ack (errors are still reported, see
//! [`crate::nft::send_batch_on`]), so a batch of tens of thousands of elements needs neither a huge
//! receive buffer nor one ack per message.

use std::ffi::c_void;

use nftnl::{Batch, MsgType, NlMsg, ProtoFamily};

use crate::socket::{
    attr_string, parse_attrs, MessageBuilder, NetlinkError, NetlinkSocket, NLM_F_ACK, NLM_F_CREATE,
    NLM_F_EXCL,
};

/// `NFNL_SUBSYS_NFTABLES`.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
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
const NFTA_SET_EXPR: u16 = 17;
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
const NFTA_SET_ELEM_EXPR: u16 = 7;
const NFTA_SET_ELEM_EXPRESSIONS: u16 = 11;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;

/// `NFT_SET_MAP`: elements carry data.
pub const NFT_SET_MAP: u32 = 0x8;

/// Bytes of element payload per message: well under the 64 KiB an attribute can hold.
const ELEMENTS_PER_MESSAGE_BYTES: usize = 32 * 1024;

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
    /// Data fields of a map, concatenated in this order; `None` for a set.
    pub data: Option<Vec<Field>>,
    /// Every element carries a counter (`counter` in the set's declaration), bumped by each lookup that
    /// finds it; read it with [`dump_elements`].
    pub counter: bool,
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

/// Bytes of a key or data made of `fields`: a lone field as is, a concatenation with each field padded
/// to a whole 32-bit register (as consecutive registers hold it).
fn fields_len(fields: &[Field]) -> u32 {
    match fields {
        [field] => field.len(),
        _ => fields.iter().map(|f| f.padded_len()).sum(),
    }
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
    /// A set of `key` (transaction id 1, no counter, no size limit).
    pub fn set(table: &str, family: ProtoFamily, name: &str, key: Vec<Field>) -> Self {
        Self {
            table: table.to_owned(),
            family,
            name: name.to_owned(),
            key,
            data: None,
            counter: false,
            size: None,
            id: 1,
        }
    }

    /// A map from `key` to `data`.
    pub fn map(
        table: &str,
        family: ProtoFamily,
        name: &str,
        key: Vec<Field>,
        data: Vec<Field>,
    ) -> Self {
        Self {
            data: Some(data),
            ..Self::set(table, family, name, key)
        }
    }

    /// Key length in bytes (a concatenation's fields each padded to 4).
    pub fn key_len(&self) -> u32 {
        fields_len(&self.key)
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
                    if let Some(data) = &spec.data {
                        b = b
                            .attr(NFTA_SET_DATA_TYPE, &concat_type(data).to_be_bytes())
                            .attr(NFTA_SET_DATA_LEN, &fields_len(data).to_be_bytes());
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
                    let first_order = |fields: &[Field]| {
                        fields
                            .first()
                            .map_or(BYTEORDER_BIG_ENDIAN, |f| f.byteorder())
                    };
                    for (kind, order) in [
                        (UDATA_SET_KEYBYTEORDER, Some(first_order(&spec.key))),
                        (
                            UDATA_SET_DATABYTEORDER,
                            spec.data.as_deref().map(first_order),
                        ),
                    ] {
                        if let Some(order) = order {
                            userdata.extend_from_slice(&[kind, 4]);
                            userdata.extend_from_slice(&order.to_ne_bytes());
                        }
                    }
                    b = b
                        .attr(NFTA_SET_ID, &spec.id.to_be_bytes())
                        .attr(NFTA_SET_USERDATA, &userdata);
                    if spec.counter {
                        // One stateful expression every element gets (as libnftnl writes a set's
                        // single expression): a counter starting at zero.
                        b = b
                            .begin_nest(NFTA_SET_EXPR)
                            .attr_str(NFTA_EXPR_NAME, "counter")
                            .begin_nest(NFTA_EXPR_DATA)
                            .end_nest()
                            .end_nest();
                    }
                    b
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

    /// A key from its fields' bytes, a concatenation's fields each padded to 4 bytes as the registers
    /// hold them. Panics when the number or length of the parts does not match the key's fields (a
    /// programming error).
    pub fn key_bytes(&self, parts: &[&[u8]]) -> Vec<u8> {
        assert_eq!(parts.len(), self.key.len(), "one part per key field");
        let mut key = Vec::with_capacity(self.key_len() as usize);
        for (field, part) in self.key.iter().zip(parts) {
            assert_eq!(part.len(), field.len() as usize, "{field:?} part length");
            key.extend_from_slice(part);
            if self.key.len() > 1 {
                key.resize(key.len() + (field.padded_len() - field.len()) as usize, 0);
            }
        }
        key
    }

    /// Adds elements (key and, for a map, data) to `batch`, many per message. Adding a key the set
    /// already holds with the same data changes nothing; with other data it fails the batch.
    pub fn add_elements<'k>(
        &self,
        batch: &mut Batch,
        elements: impl IntoIterator<Item = (&'k [u8], Option<&'k [u8]>)>,
    ) {
        self.element_messages(batch, NFT_MSG_NEWSETELEM, NLM_F_CREATE, elements);
    }

    /// Adds elements like [`SetSpec::add_elements`], but a key the set already holds fails the batch
    /// (`EEXIST`): for owners that must not install one key twice.
    pub fn add_new_elements<'k>(
        &self,
        batch: &mut Batch,
        elements: impl IntoIterator<Item = (&'k [u8], Option<&'k [u8]>)>,
    ) {
        self.element_messages(
            batch,
            NFT_MSG_NEWSETELEM,
            NLM_F_CREATE | NLM_F_EXCL,
            elements,
        );
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

/// One element as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// The key bytes.
    pub key: Vec<u8>,
    /// The data bytes (maps).
    pub data: Option<Vec<u8>>,
    /// `(packets, bytes)` of the element's counter, if the set has one.
    pub counter: Option<(u64, u64)>,
}

fn data_value(nested: &[u8]) -> Option<Vec<u8>> {
    parse_attrs(nested)
        .into_iter()
        .find(|(k, _)| *k == NFTA_DATA_VALUE)
        .map(|(_, v)| v.to_vec())
}

fn be_u64(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

/// A `counter` expression's `(packets, bytes)` from an `NFTA_EXPR` nest.
fn counter_of(expr: &[u8]) -> Option<(u64, u64)> {
    let attrs = parse_attrs(expr);
    let name = attrs.iter().find(|(k, _)| *k == NFTA_EXPR_NAME)?.1;
    if attr_string(name) != "counter" {
        return None;
    }
    let data = parse_attrs(attrs.iter().find(|(k, _)| *k == NFTA_EXPR_DATA)?.1);
    let get = |kind| {
        data.iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, v)| be_u64(v))
    };
    Some((get(NFTA_COUNTER_PACKETS)?, get(NFTA_COUNTER_BYTES)?))
}

/// Decodes the elements of one `NEWSETELEM` message payload (after the netlink header).
pub fn parse_elements(payload: &[u8]) -> Vec<Element> {
    let Some(attrs) = payload.get(4..) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (kind, list) in parse_attrs(attrs) {
        if kind != NFTA_SET_ELEM_LIST_ELEMENTS {
            continue;
        }
        for (kind, elem) in parse_attrs(list) {
            if kind != NFTA_LIST_ELEM {
                continue;
            }
            let mut element = Element {
                key: Vec::new(),
                data: None,
                counter: None,
            };
            for (kind, value) in parse_attrs(elem) {
                match kind {
                    NFTA_SET_ELEM_KEY => element.key = data_value(value).unwrap_or_default(),
                    NFTA_SET_ELEM_DATA => element.data = data_value(value),
                    NFTA_SET_ELEM_EXPR => element.counter = element.counter.or(counter_of(value)),
                    NFTA_SET_ELEM_EXPRESSIONS => {
                        for (_, expr) in parse_attrs(value) {
                            element.counter = element.counter.or(counter_of(expr));
                        }
                    }
                    _ => {}
                }
            }
            out.push(element);
        }
    }
    out
}

/// Every element of set `set` in table `table` (of `family`), with counters, from the calling thread's
/// network namespace.
pub fn dump_elements(
    table: &str,
    family: ProtoFamily,
    set: &str,
) -> Result<Vec<Element>, NetlinkError> {
    let operation = format!("list elements of set {table}/{set}");
    let mut socket =
        NetlinkSocket::open(libc::NETLINK_NETFILTER).map_err(|source| NetlinkError::Socket {
            operation: operation.clone(),
            source,
        })?;
    // struct nfgenmsg: family, version (NFNETLINK_V0), resource id (big endian, 0).
    let request = MessageBuilder::new(
        (libc::NFNL_SUBSYS_NFTABLES as u16) << 8 | NFT_MSG_GETSETELEM,
        0,
    )
    .header(&[family as u8, 0, 0, 0])
    .attr_str(NFTA_SET_ELEM_LIST_TABLE, table)
    .attr_str(NFTA_SET_ELEM_LIST_SET, set);
    let replies = socket.dump(request, &operation)?;
    Ok(replies
        .iter()
        .flat_map(|m| parse_elements(&m.payload))
        .collect())
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
            data: Some(vec![Field::ClassId]),
            counter: false,
            size: Some(1000),
            id: 3,
        }
    }

    #[test]
    fn concatenated_type_and_length_match_nft() {
        let spec = spec();
        // nft: ipv4_addr . ipv4_addr . inet_service . inet_service
        assert_eq!(concat_type(&spec.key), ((7 << 6 | 7) << 6 | 13) << 6 | 13);
        // `ipv4_addr . inet_service` is 461 in nft's listing of such a set.
        assert_eq!(concat_type(&[Field::Ipv4Addr, Field::InetService]), 461);
        assert_eq!(spec.key_len(), 16);
        assert_eq!(fields_len(&[Field::Ipv4Addr, Field::InetService]), 8);
        assert_eq!(fields_len(&[Field::InetService]), 2);
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

    /// The set message carries what libnftnl writes for the same set (nft's own encoding), plus the
    /// byte-order userdata `nft list` reads.
    #[test]
    fn new_set_message_matches_libnftnl() {
        use nftnl::nftnl_sys as sys;
        let pair = vec![Field::Ipv4Addr, Field::InetService];
        let mut spec = SetSpec::map("t", ProtoFamily::Ipv4, "m", pair.clone(), pair);
        spec.counter = true;
        spec.size = Some(64);
        let ours = parse_messages(&spec.message(MsgType::Add).bytes(7)).remove(0);
        let mut buf = vec![0u8; nftnl::nft_nlmsg_maxsize() as usize];
        // SAFETY: a set and an expression we allocate and free here; libnftnl copies the strings and
        // writes one message into `buf`, which has room for a maximal one.
        let len = unsafe {
            let s = sys::nftnl_set_alloc();
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, c"t".as_ptr());
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, c"m".as_ptr());
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FAMILY as u16, ProtoFamily::Ipv4 as u32);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_ID as u16, 1);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_TYPE as u16, 461);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_LEN as u16, 8);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_TYPE as u16, 461);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_LEN as u16, 8);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FLAGS as u16, NFT_SET_MAP);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DESC_SIZE as u16, 64);
            sys::nftnl_set_add_expr(s, sys::nftnl_expr_alloc(c"counter".as_ptr()));
            let header = sys::nftnl_nlmsg_build_hdr(
                buf.as_mut_ptr().cast(),
                libc::NFT_MSG_NEWSET as u16,
                ProtoFamily::Ipv4 as u16,
                (libc::NLM_F_CREATE | libc::NLM_F_ACK) as u16,
                7,
            );
            sys::nftnl_set_nlmsg_build_payload(header.cast(), s);
            sys::nftnl_set_free(s);
            u32::from_ne_bytes(buf[..4].try_into().unwrap()) as usize
        };
        let theirs = parse_messages(&buf[..len]).remove(0);
        assert_eq!(
            (ours.msg_type, ours.flags, ours.seq),
            (theirs.msg_type, theirs.flags, theirs.seq)
        );
        assert_eq!(ours.payload[..4], theirs.payload[..4], "nfgenmsg");
        let mut ours: Vec<_> = parse_attrs(&ours.payload[4..])
            .into_iter()
            .filter(|(k, _)| *k != NFTA_SET_USERDATA)
            .collect();
        let mut theirs = parse_attrs(&theirs.payload[4..]);
        ours.sort();
        theirs.sort();
        assert_eq!(ours, theirs);
    }
}
