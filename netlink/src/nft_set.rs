//! Named nftables sets and maps, their elements, and reading elements back with their counters.
//!
//! A rule that looks a packet up in a set (or map) costs one hash lookup whatever the number of elements,
//! so state that grows with clients (mappings, per-subflow marks) belongs in elements, not in rules. nftnl's
//! `Set` has no data (maps), no per-element expressions and no element deletion; this module adds them:
//!
//! - [`SetSpec`] describes a named set or map (`type K : V`, optional `counter` on every element) and is
//!   added to a batch like any nftnl object.
//! - [`SetElements`] adds or deletes elements (key, and data for a map) in one batch, split into messages
//!   that fit a netlink attribute.
//! - [`dump_elements`] reads every element with its counter (`nft list set`).

use std::ffi::{c_void, CString};
use std::os::raw::c_char;
use std::ptr::NonNull;

use nftnl::nftnl_sys as sys;
use nftnl::{MsgType, NlMsg, ProtoFamily};

use crate::nft::cstring;
use crate::socket::{parse_attrs, MessageBuilder, NetlinkError, NetlinkSocket};

/// How many elements go in one `NEWSETELEM`/`DELSETELEM` message. A message's element list is one
/// netlink attribute (at most 64 KiB); a concatenated key and data with their nests take about 60 bytes.
pub const ELEMENTS_PER_MESSAGE: usize = 256;

const NFT_MSG_GETSETELEM: u16 = 13;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_EXPR: u16 = 7;
const NFTA_SET_ELEM_EXPRESSIONS: u16 = 11;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;

/// A named set or map of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    /// The table.
    pub table: String,
    /// The table's family.
    pub family: ProtoFamily,
    /// The set's name.
    pub name: String,
    /// A batch-local id, so rules in the same batch can refer to the set.
    pub id: u32,
    /// nft's datatype of the key (see [`crate::nft_expr::datatype`]); only `nft list` reads it.
    pub key_type: u32,
    /// Key length in bytes (each concatenated field padded to 4).
    pub key_len: u32,
    /// For a map: the data's datatype and length.
    pub data: Option<(u32, u32)>,
    /// Every element carries a counter (`counter` in the set's declaration), updated by each lookup that
    /// finds it.
    pub counter: bool,
    /// The expected number of elements (`size`), a hint for the kernel's choice of backend; 0 for none.
    pub size_hint: u32,
}

impl SetSpec {
    /// A set of `key_len`-byte keys of type `key_type`.
    pub fn set(table: &str, family: ProtoFamily, name: &str, key_type: u32, key_len: u32) -> Self {
        Self {
            table: table.to_owned(),
            family,
            name: name.to_owned(),
            id: 1,
            key_type,
            key_len,
            data: None,
            counter: false,
            size_hint: 0,
        }
    }

    /// A map from such keys to `data_len`-byte values of type `data_type`.
    pub fn map(
        table: &str,
        family: ProtoFamily,
        name: &str,
        (key_type, key_len): (u32, u32),
        (data_type, data_len): (u32, u32),
    ) -> Self {
        Self {
            data: Some((data_type, data_len)),
            ..Self::set(table, family, name, key_type, key_len)
        }
    }

    /// The libnftnl object: table, name, family, id, key and data types, flags and the counter.
    fn build(&self) -> Owned {
        let set = Owned::set();
        let name = cstring(&self.name);
        let table = cstring(&self.table);
        // SAFETY: `set` is a live nftnl_set; strings are copied by libnftnl.
        unsafe {
            let s = set.0.as_ptr();
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, name.as_ptr());
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FAMILY as u16, self.family as u32);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_ID as u16, self.id);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_TYPE as u16, self.key_type);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_LEN as u16, self.key_len);
            let mut flags = 0u32;
            if let Some((data_type, data_len)) = self.data {
                flags |= libc::NFT_SET_MAP as u32;
                sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_TYPE as u16, data_type);
                sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_LEN as u16, data_len);
            }
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FLAGS as u16, flags);
            if self.size_hint > 0 {
                sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DESC_SIZE as u16, self.size_hint);
            }
            if self.counter {
                let counter = sys::nftnl_expr_alloc(c"counter".as_ptr());
                assert!(!counter.is_null(), "nftnl_expr_alloc: out of memory");
                // The set takes ownership of the expression.
                sys::nftnl_set_add_expr(s, counter);
            }
        }
        set
    }

    /// An empty element list of this set, to fill with [`SetElements::add`].
    pub fn elements(&self) -> SetElements {
        SetElements {
            table: self.table.clone(),
            family: self.family,
            set: self.name.clone(),
            elements: Vec::new(),
        }
    }
}

/// An `nftnl_set` we own (freed on drop).
struct Owned(NonNull<sys::nftnl_set>);

impl Owned {
    fn set() -> Self {
        // SAFETY: plain allocation; failure is handled.
        let raw = unsafe { sys::nftnl_set_alloc() };
        Self(NonNull::new(raw).expect("nftnl_set_alloc: out of memory"))
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: we own the set; it frees its elements and expressions.
        unsafe { sys::nftnl_set_free(self.0.as_ptr()) };
    }
}

fn write_header(
    buf: *mut c_void,
    msg_type: libc::c_int,
    family: u16,
    flags: libc::c_int,
    seq: u32,
) -> *mut libc::nlmsghdr {
    // SAFETY: the batch gives `buf` room for one maximal message (NlMsg's contract).
    unsafe {
        sys::nftnl_nlmsg_build_hdr(
            buf.cast::<c_char>(),
            msg_type as u16,
            family,
            flags as u16,
            seq,
        )
        .cast()
    }
}

// SAFETY: `write` builds one message within the buffer the batch provides.
unsafe impl NlMsg for SetSpec {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let set = self.build();
        let (kind, flags) = match msg_type {
            MsgType::Add => (libc::NFT_MSG_NEWSET, libc::NLM_F_CREATE | libc::NLM_F_ACK),
            MsgType::Del => (libc::NFT_MSG_DELSET, libc::NLM_F_ACK),
        };
        let header = write_header(buf, kind, self.family as u16, flags, seq);
        // SAFETY: header is the message just started in `buf`; `set` is live.
        unsafe { sys::nftnl_set_nlmsg_build_payload(header.cast(), set.0.as_ptr()) };
    }
}

/// Elements to add to or delete from one set: add it to a batch with [`SetElements::add_to`] (or
/// [`SetElements::delete_from`]). Keys and data are raw bytes as the set declares them: a concatenation's
/// fields each padded to 4 bytes, addresses and ports in network order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetElements {
    table: String,
    family: ProtoFamily,
    set: String,
    elements: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl SetElements {
    /// Adds an element (`data` is `None` for a set, the value for a map).
    pub fn push(&mut self, key: &[u8], data: Option<&[u8]>) {
        self.elements.push((key.to_vec(), data.map(<[u8]>::to_vec)));
    }

    /// How many elements.
    pub fn len(&self) -> usize {
        self.elements.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.elements.is_empty()
    }

    /// Appends messages adding every element to `batch` (adding one that exists fails the batch).
    pub fn add_to(&self, batch: &mut nftnl::Batch) {
        self.write_chunks(batch, MsgType::Add);
    }

    /// Appends messages deleting every element (deleting one that is absent fails the batch).
    pub fn delete_from(&self, batch: &mut nftnl::Batch) {
        self.write_chunks(batch, MsgType::Del);
    }

    fn write_chunks(&self, batch: &mut nftnl::Batch, msg_type: MsgType) {
        for chunk in self.elements.chunks(ELEMENTS_PER_MESSAGE) {
            batch.add(
                &ElementChunk {
                    owner: self,
                    elements: chunk,
                },
                msg_type,
            );
        }
    }
}

struct ElementChunk<'a> {
    owner: &'a SetElements,
    elements: &'a [(Vec<u8>, Option<Vec<u8>>)],
}

// SAFETY: `write` builds one message within the buffer the batch provides; a chunk is small enough.
unsafe impl NlMsg for ElementChunk<'_> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let set = Owned::set();
        let table: CString = cstring(&self.owner.table);
        let name: CString = cstring(&self.owner.set);
        // SAFETY: `set` is live; libnftnl copies strings and element bytes.
        unsafe {
            let s = set.0.as_ptr();
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(s, sys::NFTNL_SET_NAME as u16, name.as_ptr());
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FAMILY as u16, self.owner.family as u32);
            for (key, data) in self.elements {
                let elem = sys::nftnl_set_elem_alloc();
                assert!(!elem.is_null(), "nftnl_set_elem_alloc: out of memory");
                sys::nftnl_set_elem_set(
                    elem,
                    sys::NFTNL_SET_ELEM_KEY as u16,
                    key.as_ptr().cast(),
                    key.len() as u32,
                );
                if let Some(data) = data {
                    sys::nftnl_set_elem_set(
                        elem,
                        sys::NFTNL_SET_ELEM_DATA as u16,
                        data.as_ptr().cast(),
                        data.len() as u32,
                    );
                }
                sys::nftnl_set_elem_add(s, elem);
            }
        }
        let (kind, flags) = match msg_type {
            MsgType::Add => (
                libc::NFT_MSG_NEWSETELEM,
                libc::NLM_F_CREATE | libc::NLM_F_EXCL | libc::NLM_F_ACK,
            ),
            MsgType::Del => (libc::NFT_MSG_DELSETELEM, libc::NLM_F_ACK),
        };
        let header = write_header(buf, kind, self.owner.family as u16, flags, seq);
        // SAFETY: header is the message just started in `buf`; `set` is live.
        unsafe { sys::nftnl_set_elems_nlmsg_build_payload(header.cast(), set.0.as_ptr()) };
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
    if crate::socket::attr_string(name) != "counter" {
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
