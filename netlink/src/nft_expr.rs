//! nftables expressions that address registers explicitly, for rules that build a concatenated key
//! (`ip saddr . tcp dport`), look it up in a set or map of [`crate::nft_set`] ([`SetLookup`]), or use
//! what a map lookup returned (`dnat to ... map @m`, `meta priority set ... map @m`).
//!
//! nftnl's own expressions (and [`crate::nft::PayloadLoad`]/[`crate::nft::RegisterExpr`]) always use
//! register 1. A concatenation puts each field in the next 32-bit register (`NFT_REG32_00`,
//! `NFT_REG32_01`, ...), and a map of `ipv4_addr . inet_service` returns the address in `NFT_REG32_00`
//! and the port in `NFT_REG32_01`, which is how `nft` itself compiles these rules (`nft --debug=netlink`).

use std::ffi::CString;
use std::ptr::NonNull;

use nftnl::expr::Expression;
use nftnl::nftnl_sys as sys;
use nftnl::Rule;

use crate::nft::{alloc_expr, PayloadLoad};
use crate::nft_set::SetSpec;

/// `NFT_REG_1`: the first 128-bit register (the same storage as `NFT_REG32_00`..`03`).
pub const REG_1: u32 = libc::NFT_REG_1 as u32;
/// `NFT_REG32_00`: the first 32-bit register; a concatenation's first field.
pub const REG32_00: u32 = 8;
/// `NFT_REG32_01`: the second 32-bit register; a concatenation's second field.
pub const REG32_01: u32 = 9;

fn set_u32(expr: NonNull<sys::nftnl_expr>, attr: u32, value: u32) {
    // SAFETY: expr is a live expression; every attribute set through here is a u32 of that expression.
    unsafe { sys::nftnl_expr_set_u32(expr.as_ptr(), attr as u16, value) };
}

/// A `payload` load into register `dreg` (`payload load 2b @ transport header + 2 => reg 9`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadToRegister {
    /// What to load.
    pub load: PayloadLoad,
    /// The destination register ([`REG_1`], [`REG32_00`], [`REG32_01`], ...).
    pub dreg: u32,
}

impl Expression for PayloadToRegister {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"payload");
        set_u32(expr, sys::NFTNL_EXPR_PAYLOAD_DREG, self.dreg);
        set_u32(expr, sys::NFTNL_EXPR_PAYLOAD_BASE, self.load.base);
        set_u32(expr, sys::NFTNL_EXPR_PAYLOAD_OFFSET, self.load.offset);
        set_u32(expr, sys::NFTNL_EXPR_PAYLOAD_LEN, self.load.len);
        expr
    }
}

/// `ct [original|reply] <key>` into register `dreg` (`ct load src_ip => reg 1, dir original`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CtLoad {
    /// `NFT_CT_*` (e.g. `libc::NFT_CT_SRC_IP`, `libc::NFT_CT_PROTO_DST`, `libc::NFT_CT_STATUS`).
    pub key: u32,
    /// `Some(IP_CT_DIR_ORIGINAL = 0)` or `Some(IP_CT_DIR_REPLY = 1)` for keys of one direction.
    pub direction: Option<u8>,
    /// The destination register.
    pub dreg: u32,
}

/// `IP_CT_DIR_ORIGINAL`.
pub const CT_DIR_ORIGINAL: u8 = 0;
/// `IP_CT_DIR_REPLY`.
pub const CT_DIR_REPLY: u8 = 1;

impl Expression for CtLoad {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"ct");
        set_u32(expr, sys::NFTNL_EXPR_CT_KEY, self.key);
        set_u32(expr, sys::NFTNL_EXPR_CT_DREG, self.dreg);
        if let Some(direction) = self.direction {
            // SAFETY: NFTNL_EXPR_CT_DIR is a u8 attribute of a ct expression.
            unsafe {
                sys::nftnl_expr_set_u8(expr.as_ptr(), sys::NFTNL_EXPR_CT_DIR as u16, direction)
            };
        }
        expr
    }
}

/// `lookup reg SREG set NAME [dreg DREG]`: membership in a named set, or with `dreg`, a map lookup whose
/// data lands in `dreg`. A miss ends the rule (or, with `invert`, a hit does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetLookup {
    /// The set or map (in the rule's table).
    pub set: CString,
    /// The set's transaction id ([`SetSpec::id`]), to find a set created in the same batch by id as
    /// well as by name.
    pub set_id: Option<u32>,
    /// Where the key starts ([`REG_1`] for a key built from [`REG32_00`] on).
    pub sreg: u32,
    /// For maps: where the data goes.
    pub dreg: Option<u32>,
    /// Match when the key is absent (`!= @set`); not with `dreg`.
    pub invert: bool,
}

impl SetLookup {
    /// A lookup of the key in register 1 in `set`.
    pub fn new(set: &str) -> Self {
        Self {
            set: crate::nft::cstring(set),
            set_id: None,
            sreg: REG_1,
            dreg: None,
            invert: false,
        }
    }

    /// A map lookup of the key in register 1 whose data goes to register 1.
    pub fn map(set: &str) -> Self {
        Self {
            dreg: Some(REG_1),
            ..Self::new(set)
        }
    }

    /// A lookup in `spec` of the concatenated key loaded from [`REG32_00`] on; for a map, the data goes
    /// to register 1.
    pub fn of(spec: &SetSpec) -> Self {
        Self {
            set_id: Some(spec.id),
            sreg: REG32_00,
            dreg: spec.data.as_ref().map(|_| REG_1),
            ..Self::new(&spec.name)
        }
    }
}

impl Expression for SetLookup {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"lookup");
        set_u32(expr, sys::NFTNL_EXPR_LOOKUP_SREG, self.sreg);
        // SAFETY: NFTNL_EXPR_LOOKUP_SET is a string attribute; the CString outlives the call (it is copied).
        unsafe {
            sys::nftnl_expr_set_str(
                expr.as_ptr(),
                sys::NFTNL_EXPR_LOOKUP_SET as u16,
                self.set.as_ptr(),
            )
        };
        if let Some(id) = self.set_id {
            set_u32(expr, sys::NFTNL_EXPR_LOOKUP_SET_ID, id);
        }
        if let Some(dreg) = self.dreg {
            set_u32(expr, sys::NFTNL_EXPR_LOOKUP_DREG, dreg);
        }
        if self.invert {
            set_u32(
                expr,
                sys::NFTNL_EXPR_LOOKUP_FLAGS,
                libc::NFT_LOOKUP_F_INV as u32,
            );
        }
        expr
    }
}

/// `nat snat|dnat <family> addr_min reg A [proto_min reg P]`, the form `dnat ip to ip saddr . tcp dport
/// map @m` compiles to (address in `A`, port in `P`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatFromRegisters {
    /// `libc::NFT_NAT_SNAT` or `libc::NFT_NAT_DNAT`.
    pub nat_type: i32,
    /// `libc::NFPROTO_IPV4` or `NFPROTO_IPV6`.
    pub family: u32,
    /// The register holding the address.
    pub addr_reg: u32,
    /// The register holding the port, if any.
    pub port_reg: Option<u32>,
}

impl Expression for NatFromRegisters {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"nat");
        set_u32(expr, sys::NFTNL_EXPR_NAT_TYPE, self.nat_type as u32);
        set_u32(expr, sys::NFTNL_EXPR_NAT_FAMILY, self.family);
        set_u32(expr, sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, self.addr_reg);
        set_u32(expr, sys::NFTNL_EXPR_NAT_REG_ADDR_MAX, self.addr_reg);
        if let Some(port) = self.port_reg {
            set_u32(expr, sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, port);
            set_u32(expr, sys::NFTNL_EXPR_NAT_REG_PROTO_MAX, port);
        }
        expr
    }
}

/// `fib daddr type` into register 1: the route type of the destination address; compare with
/// `RTN_LOCAL` (2) for "addressed to this host".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FibDaddrType;

/// `RTN_LOCAL`, what [`FibDaddrType`] loads for a local destination.
pub const RTN_LOCAL: u32 = 2;
/// `NFT_FIB_RESULT_ADDRTYPE` (`enum nft_fib_result`; not in the libc crate).
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;
/// `NFTA_FIB_F_DADDR` (`enum nft_fib_flags`).
const NFTA_FIB_F_DADDR: u32 = 1 << 1;

impl Expression for FibDaddrType {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"fib");
        set_u32(expr, sys::NFTNL_EXPR_FIB_DREG, REG_1);
        set_u32(expr, sys::NFTNL_EXPR_FIB_RESULT, NFT_FIB_RESULT_ADDRTYPE);
        set_u32(expr, sys::NFTNL_EXPR_FIB_FLAGS, NFTA_FIB_F_DADDR);
        expr
    }
}

/// `tcp option maxseg size set` from register 1 (load the value with an `Immediate` first): rewrites the
/// MSS option of a SYN in place, with the checksum fixed up by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpMaxsegSet;

/// `NFT_EXTHDR_OP_TCPOPT` (not in the libc crate).
const NFT_EXTHDR_OP_TCPOPT: u32 = 1;
/// TCP option kind 2, maximum segment size.
const TCPOPT_MAXSEG: u32 = 2;

impl Expression for TcpMaxsegSet {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        let expr = alloc_expr(c"exthdr");
        set_u32(expr, sys::NFTNL_EXPR_EXTHDR_SREG, REG_1);
        // SAFETY: NFTNL_EXPR_EXTHDR_TYPE is a u8 attribute of an exthdr expression.
        unsafe {
            sys::nftnl_expr_set_u8(
                expr.as_ptr(),
                sys::NFTNL_EXPR_EXTHDR_TYPE as u16,
                TCPOPT_MAXSEG as u8,
            )
        };
        // The option's value: two bytes after kind and length.
        set_u32(expr, sys::NFTNL_EXPR_EXTHDR_OFFSET, 2);
        set_u32(expr, sys::NFTNL_EXPR_EXTHDR_LEN, 2);
        set_u32(expr, sys::NFTNL_EXPR_EXTHDR_OP, NFT_EXTHDR_OP_TCPOPT);
        expr
    }
}
