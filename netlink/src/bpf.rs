//! eBPF without a compiler: the `bpf(2)` calls for maps and programs, and a small assembler with
//! labels for the few instructions a classifier needs. Programs are written as instruction lists in
//! Rust (see the throttle's upload classifier), so nothing outside the workspace is needed to build or
//! load them; attaching (cls_bpf over rtnetlink) is the caller's business.
//!
//! Needs `CAP_BPF` (or `CAP_SYS_ADMIN`) to create maps and load programs; map memory is charged to the
//! memory cgroup on current kernels (no `RLIMIT_MEMLOCK` games).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Why a `bpf(2)` call failed.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The kernel refused a call; for program loads `log` holds the verifier's reason.
    #[error("{operation}: {source}{}", if log.is_empty() { String::new() } else { format!("\nverifier log:\n{log}") })]
    Kernel {
        /// What was being done.
        operation: &'static str,
        /// The errno.
        source: io::Error,
        /// The verifier log (program loads only).
        log: String,
    },
}

impl BpfError {
    /// The errno.
    pub fn errno(&self) -> Option<i32> {
        match self {
            BpfError::Kernel { source, .. } => source.raw_os_error(),
        }
    }
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;

/// `BPF_MAP_TYPE_HASH`.
pub const MAP_TYPE_HASH: u32 = 1;
/// `BPF_PROG_TYPE_SCHED_CLS` (cls_bpf).
pub const PROG_TYPE_SCHED_CLS: u32 = 3;
/// `BPF_F_NO_PREALLOC`: allocate hash elements on insert rather than all at creation.
pub const F_NO_PREALLOC: u32 = 1;
/// `BPF_ANY`: create or update.
pub const UPDATE_ANY: u64 = 0;

/// `union bpf_attr`, as far as the commands here use it (the kernel zero-fills the rest).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Self([0; 128])
    }
    fn u32(&mut self, offset: usize, value: u32) -> &mut Self {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }
    fn u64(&mut self, offset: usize, value: u64) -> &mut Self {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }
    fn name(&mut self, offset: usize, name: &str) -> &mut Self {
        // BPF_OBJ_NAME_LEN is 16 with the NUL; the kernel accepts [A-Za-z0-9_.].
        let bytes: Vec<u8> = name
            .bytes()
            .filter(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.')
            .take(15)
            .collect();
        self.0[offset..offset + bytes.len()].copy_from_slice(&bytes);
        self
    }
}

fn bpf(command: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, aligned bpf_attr buffer of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn kernel(operation: &'static str) -> impl FnOnce(io::Error) -> BpfError {
    move |source| BpfError::Kernel {
        operation,
        source,
        log: String::new(),
    }
}

/// A BPF map, closed (and freed once no program holds it) when dropped.
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl Map {
    /// Creates a map (`BPF_MAP_CREATE`).
    pub fn create(
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        flags: u32,
        name: &str,
    ) -> Result<Self, BpfError> {
        let mut attr = Attr::new();
        attr.u32(0, map_type)
            .u32(4, key_size)
            .u32(8, value_size)
            .u32(12, max_entries)
            .u32(16, flags)
            .name(28, name);
        let fd = bpf(BPF_MAP_CREATE, &mut attr).map_err(kernel("create bpf map"))?;
        Ok(Self {
            // SAFETY: the kernel returned a fresh descriptor we now own.
            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            key_size: key_size as usize,
            value_size: value_size as usize,
        })
    }

    /// The map's descriptor (for [`Asm::load_map_fd`]).
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    fn elem(&self, key: &[u8], value: u64, flags: u64) -> Attr {
        assert_eq!(key.len(), self.key_size, "bpf map key size");
        let mut attr = Attr::new();
        attr.u32(0, self.fd() as u32)
            .u64(8, key.as_ptr() as u64)
            .u64(16, value)
            .u64(24, flags);
        attr
    }

    /// Sets `key` to `value` (`BPF_MAP_UPDATE_ELEM`); `E2BIG` when the map is full.
    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> Result<(), BpfError> {
        assert_eq!(value.len(), self.value_size, "bpf map value size");
        let mut attr = self.elem(key, value.as_ptr() as u64, flags);
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map_err(kernel("update bpf map element"))?;
        Ok(())
    }

    /// Deletes `key`; `Ok(false)` when it was not there.
    pub fn delete(&self, key: &[u8]) -> Result<bool, BpfError> {
        let mut attr = self.elem(key, 0, 0);
        match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(kernel("delete bpf map element")(e)),
        }
    }

    /// The value of `key`, if present.
    pub fn lookup(&self, key: &[u8]) -> Result<Option<Vec<u8>>, BpfError> {
        let mut value = vec![0u8; self.value_size];
        let mut attr = self.elem(key, value.as_mut_ptr() as u64, 0);
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(kernel("look up bpf map element")(e)),
        }
    }
}

/// A loaded program; attach it by descriptor, then it may be dropped (the attachment holds it).
#[derive(Debug)]
pub struct Program {
    fd: OwnedFd,
}

impl Program {
    /// Loads `insns` (`BPF_PROG_LOAD`). On refusal the verifier's log is in the error.
    pub fn load(
        prog_type: u32,
        insns: &[Insn],
        license: &str,
        name: &str,
    ) -> Result<Self, BpfError> {
        let license = std::ffi::CString::new(license).expect("license without NUL");
        let load = |log: &mut [u8]| {
            let mut attr = Attr::new();
            attr.u32(0, prog_type)
                .u32(4, insns.len() as u32)
                .u64(8, insns.as_ptr() as u64)
                .u64(16, license.as_ptr() as u64)
                .u32(24, u32::from(!log.is_empty()))
                .u32(28, log.len() as u32)
                .u64(32, log.as_mut_ptr() as u64)
                .name(48, name);
            bpf(BPF_PROG_LOAD, &mut attr)
        };
        match load(&mut []) {
            // SAFETY: the kernel returned a fresh descriptor we now own.
            Ok(fd) => Ok(Self {
                fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            }),
            Err(_) => {
                // Load again with a log to say why.
                let mut log = vec![0u8; 1 << 16];
                let source = match load(&mut log) {
                    Ok(fd) => {
                        // SAFETY: as above (a transient failure the second try did not see).
                        return Ok(Self {
                            fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
                        });
                    }
                    Err(e) => e,
                };
                let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                Err(BpfError::Kernel {
                    operation: "load bpf program",
                    source,
                    log: String::from_utf8_lossy(&log[..end]).trim_end().to_owned(),
                })
            }
        }
    }

    /// The program's descriptor (for `TCA_BPF_FD`).
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    /// Opcode.
    pub code: u8,
    /// `dst_reg` in the low nibble, `src_reg` in the high one.
    pub regs: u8,
    /// Offset (memory access or jump).
    pub off: i16,
    /// Immediate.
    pub imm: i32,
}

/// Registers: `R0` return value, `R1`-`R5` helper arguments, `R6`-`R9` callee-saved, `R10` frame pointer.
pub type Reg = u8;
/// Return value and helper result.
pub const R0: Reg = 0;
/// First argument (the context at entry).
pub const R1: Reg = 1;
/// Second argument.
pub const R2: Reg = 2;
/// Third argument.
pub const R3: Reg = 3;
/// Fourth argument.
pub const R4: Reg = 4;
/// Fifth argument.
pub const R5: Reg = 5;
/// Callee-saved.
pub const R6: Reg = 6;
/// Callee-saved.
pub const R7: Reg = 7;
/// Read-only frame pointer; the stack is the 512 bytes below it.
pub const R10: Reg = 10;

/// Access sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// 1 byte.
    B,
    /// 2 bytes.
    H,
    /// 4 bytes.
    W,
    /// 8 bytes.
    DW,
}

impl Size {
    fn bits(self) -> u8 {
        match self {
            Size::W => 0x00,
            Size::H => 0x08,
            Size::B => 0x10,
            Size::DW => 0x18,
        }
    }
}

/// Conditional jumps (64-bit compares).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// unsigned `>`
    Gt,
}

impl Cond {
    fn bits(self) -> u8 {
        match self {
            Cond::Eq => 0x10,
            Cond::Gt => 0x20,
            Cond::Ne => 0x50,
        }
    }
}

/// 64-bit ALU operations with an immediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alu {
    /// `+=`
    Add,
    /// `&=`
    And,
    /// `<<=`
    Lsh,
    /// `=`
    Mov,
}

impl Alu {
    fn bits(self) -> u8 {
        match self {
            Alu::Add => 0x00,
            Alu::And => 0x50,
            Alu::Lsh => 0x60,
            Alu::Mov => 0xb0,
        }
    }
}

const CLASS_LD: u8 = 0x00;
const CLASS_LDX: u8 = 0x01;
const CLASS_ST: u8 = 0x02;
const CLASS_STX: u8 = 0x03;
const CLASS_JMP: u8 = 0x05;
const CLASS_ALU64: u8 = 0x07;
const MODE_MEM: u8 = 0x60;
const SRC_X: u8 = 0x08;
const OP_CALL: u8 = 0x80;
const OP_EXIT: u8 = 0x90;
const PSEUDO_MAP_FD: u8 = 1;

/// Helper ids (`enum bpf_func_id`).
pub mod helper {
    /// `bpf_map_lookup_elem(map, key)`.
    pub const MAP_LOOKUP_ELEM: i32 = 1;
    /// `bpf_skb_load_bytes_relative(skb, offset, to, len, start_header)`.
    pub const SKB_LOAD_BYTES_RELATIVE: i32 = 68;
    /// `BPF_HDR_START_NET`: offsets from the network header.
    pub const HDR_START_NET: i32 = 1;
}

/// A jump target, placed with [`Asm::label`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

/// An instruction list with forward and backward jumps to labels.
#[derive(Debug, Default)]
pub struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
}

fn insn(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

impl Asm {
    /// An empty program.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new, not yet placed, label.
    pub fn new_label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Places `label` at the next instruction.
    pub fn label(&mut self, label: Label) -> &mut Self {
        self.labels[label.0] = Some(self.insns.len());
        self
    }

    fn push(&mut self, insn: Insn) -> &mut Self {
        self.insns.push(insn);
        self
    }

    /// `dst = src` (64 bit).
    pub fn mov(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.push(insn(CLASS_ALU64 | Alu::Mov.bits() | SRC_X, dst, src, 0, 0))
    }

    /// `dst <op>= imm` (64 bit).
    pub fn alu(&mut self, op: Alu, dst: Reg, imm: i32) -> &mut Self {
        self.push(insn(CLASS_ALU64 | op.bits(), dst, 0, 0, imm))
    }

    /// `dst += src` (64 bit).
    pub fn add_reg(&mut self, dst: Reg, src: Reg) -> &mut Self {
        self.push(insn(CLASS_ALU64 | Alu::Add.bits() | SRC_X, dst, src, 0, 0))
    }

    /// `dst = *(size *)(src + off)`.
    pub fn load(&mut self, size: Size, dst: Reg, src: Reg, off: i16) -> &mut Self {
        self.push(insn(CLASS_LDX | MODE_MEM | size.bits(), dst, src, off, 0))
    }

    /// `*(size *)(dst + off) = src`.
    pub fn store(&mut self, size: Size, dst: Reg, off: i16, src: Reg) -> &mut Self {
        self.push(insn(CLASS_STX | MODE_MEM | size.bits(), dst, src, off, 0))
    }

    /// `*(size *)(dst + off) = imm`.
    pub fn store_imm(&mut self, size: Size, dst: Reg, off: i16, imm: i32) -> &mut Self {
        self.push(insn(CLASS_ST | MODE_MEM | size.bits(), dst, 0, off, imm))
    }

    /// `dst = map` by descriptor (a two-slot `ld_imm64` the kernel rewrites to the map's address).
    pub fn load_map_fd(&mut self, dst: Reg, map_fd: i32) -> &mut Self {
        self.push(insn(
            CLASS_LD | Size::DW.bits(),
            dst,
            PSEUDO_MAP_FD,
            0,
            map_fd,
        ))
        .push(insn(0, 0, 0, 0, 0))
    }

    /// `if dst <cond> imm goto target`.
    pub fn jump_if(&mut self, cond: Cond, dst: Reg, imm: i32, target: Label) -> &mut Self {
        self.fixups.push((self.insns.len(), target));
        self.push(insn(CLASS_JMP | cond.bits(), dst, 0, 0, imm))
    }

    /// `goto target`.
    pub fn jump(&mut self, target: Label) -> &mut Self {
        self.fixups.push((self.insns.len(), target));
        self.push(insn(CLASS_JMP, 0, 0, 0, 0))
    }

    /// Calls helper `id` (arguments in R1-R5, result in R0; R1-R5 are clobbered).
    pub fn call(&mut self, id: i32) -> &mut Self {
        self.push(insn(CLASS_JMP | OP_CALL, 0, 0, 0, id))
    }

    /// Returns R0.
    pub fn exit(&mut self) -> &mut Self {
        self.push(insn(CLASS_JMP | OP_EXIT, 0, 0, 0, 0))
    }

    /// The instructions with every jump resolved. Panics on a jump to a label never placed (a
    /// programming error).
    pub fn finish(mut self) -> Vec<Insn> {
        for (at, label) in std::mem::take(&mut self.fixups) {
            let target = self.labels[label.0].expect("jump to a label that was never placed");
            let off = target as i64 - at as i64 - 1;
            self.insns[at].off = i16::try_from(off).expect("jump within 32K instructions");
        }
        self.insns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_expects() {
        let mut asm = Asm::new();
        let out = asm.new_label();
        asm.mov(R6, R1)
            .load(Size::W, R2, R6, 16)
            .jump_if(Cond::Ne, R2, 8, out)
            .store_imm(Size::DW, R10, -8, 0)
            .label(out)
            .alu(Alu::Mov, R0, -1)
            .exit();
        let insns = asm.finish();
        // r6 = r1: BPF_ALU64 | BPF_MOV | BPF_X, dst 6, src 1.
        assert_eq!(
            insns[0],
            Insn {
                code: 0xbf,
                regs: 0x16,
                off: 0,
                imm: 0
            }
        );
        // r2 = *(u32 *)(r6 + 16): BPF_LDX | BPF_MEM | BPF_W.
        assert_eq!(
            insns[1],
            Insn {
                code: 0x61,
                regs: 0x62,
                off: 16,
                imm: 0
            }
        );
        // if r2 != 8 goto +1 (over the store).
        assert_eq!(
            insns[2],
            Insn {
                code: 0x55,
                regs: 0x02,
                off: 1,
                imm: 8
            }
        );
        // *(u64 *)(r10 - 8) = 0: BPF_ST | BPF_MEM | BPF_DW.
        assert_eq!(
            insns[3],
            Insn {
                code: 0x7a,
                regs: 0x0a,
                off: -8,
                imm: 0
            }
        );
        assert_eq!(
            insns[4],
            Insn {
                code: 0xb7,
                regs: 0x00,
                off: 0,
                imm: -1
            }
        );
        assert_eq!(
            insns[5],
            Insn {
                code: 0x95,
                regs: 0,
                off: 0,
                imm: 0
            }
        );
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }

    #[test]
    fn map_fd_load_takes_two_slots() {
        let mut asm = Asm::new();
        asm.load_map_fd(R1, 7).exit();
        let insns = asm.finish();
        assert_eq!(insns.len(), 3);
        assert_eq!(
            insns[0],
            Insn {
                code: 0x18,
                regs: 0x11,
                off: 0,
                imm: 7
            }
        );
    }
}
