//! The two BPF programs that steer the proxy end's traffic to its shards
//! (threads), each a few instructions:
//!
//! - on the path sockets' `SO_REUSEPORT` group, a classic BPF program picks
//!   the socket (shard) from the sender's node ID in the CM block;
//! - on the multi-queue TUN device (`TUNSETSTEERINGEBPF`), an eBPF socket
//!   filter picks the queue (shard) from the destination IPv4 address.
//!
//! Both compute the same function the shards use in user space
//! ([`crate::node::shard_of_node`], [`crate::node::shard_of_address`]), so
//! each client's datagrams and the packets for its tunnel address meet on
//! the thread that holds its session. Where a program cannot be attached, a
//! shard that receives another's traffic hands it over (`shell`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `SO_ATTACH_REUSEPORT_CBPF` from `<asm-generic/socket.h>`.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// `TUNSETSTEERINGEBPF`: `_IOR('T', 224, int)`.
const TUNSETSTEERINGEBPF: libc::c_ulong = 0x8004_54e0;

/// `struct sock_filter`.
#[repr(C)]
#[derive(Clone, Copy)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

/// `struct sock_fprog`.
#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

// Classic BPF opcodes: class | size/op | mode/source.
/// `BPF_LD | BPF_W | BPF_ABS` (0x00 | 0x00 | 0x20).
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_ALU | BPF_MOD | BPF_K`.
const BPF_ALU_MOD_K: u16 = 0x04 | 0x90;
/// `BPF_RET | BPF_A`.
const BPF_RET_A: u16 = 0x06 | 0x10;

/// Where the program reads in the UDP payload: bytes 4..8 are node ID bytes
/// 2..6 (the CM block's node ID is at 2..8; a MAC's last four bytes vary most).
pub const NODE_HASH_OFFSET: u32 = 4;

/// Attaches to `socket`'s reuseport group the program that returns
/// `u32(payload[4..8]) % shards`: the index of the socket (in bind order)
/// for the sender's node. Datagrams too short to read go to socket 0.
pub fn attach_reuseport_steering(socket: RawFd, shards: u32) -> io::Result<()> {
    if shards == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no shard"));
    }
    let program = [
        SockFilter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: NODE_HASH_OFFSET,
        },
        SockFilter {
            code: BPF_ALU_MOD_K,
            jt: 0,
            jf: 0,
            k: shards,
        },
        SockFilter {
            code: BPF_RET_A,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    let fprog = SockFprog {
        len: program.len() as u16,
        filter: program.as_ptr(),
    };
    // SAFETY: fprog points at `program`, which outlives the call; the
    // kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            socket,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const SockFprog as *const libc::c_void,
            std::mem::size_of::<SockFprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy)]
struct BpfInsn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, imm: i32) -> BpfInsn {
    BpfInsn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off: 0,
        imm,
    }
}

// eBPF opcodes.
/// `BPF_ALU64 | BPF_MOV | BPF_X`.
const BPF_ALU64_MOV_X: u8 = 0x07 | 0xb0 | 0x08;
/// `BPF_LD | BPF_ABS | BPF_W` (0x00 | 0x20 | 0x00).
const BPF_LD_ABS_W: u8 = 0x20;
/// `BPF_ALU | BPF_MOD | BPF_K` (32-bit).
const BPF_ALU32_MOD_K: u8 = 0x04 | 0x90;
/// `BPF_JMP | BPF_EXIT`.
const BPF_EXIT: u8 = 0x05 | 0x90;

/// `BPF_PROG_LOAD` and `BPF_PROG_TYPE_SOCKET_FILTER`.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

/// Loads the eBPF socket filter that returns `u32(ip[16..20]) % shards`
/// (the destination of an IPv4 packet; anything else lands somewhere and is
/// handed over or dropped in user space).
pub fn load_tun_steering(shards: u32) -> io::Result<OwnedFd> {
    if shards == 0 || shards > i32::MAX as u32 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "shard count"));
    }
    let program = [
        // r6 = r1 (ld_abs reads the packet of the context in r6)
        insn(BPF_ALU64_MOV_X, 6, 1, 0),
        // r0 = ntohl(*(u32 *)(ip + 16))
        insn(BPF_LD_ABS_W, 0, 0, 16),
        // w0 %= shards
        insn(BPF_ALU32_MOD_K, 0, 0, shards as i32),
        insn(BPF_EXIT, 0, 0, 0),
    ];
    let license = c"GPL";
    // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license,
    // log_level, log_size, log_buf, ...; the rest zero.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SOCKET_FILTER.to_ne_bytes());
    attr[4..8].copy_from_slice(&(program.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(program.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // SAFETY: attr is a valid bpf_attr for PROG_LOAD whose pointers (program,
    // license) outlive the call; the result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new program descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Sets `program` as the queue-steering program of the TUN device that
/// `queue` (any of its queue descriptors) belongs to.
pub fn set_tun_steering(queue: &impl AsRawFd, program: &OwnedFd) -> io::Result<()> {
    let fd: libc::c_int = program.as_raw_fd();
    // SAFETY: TUNSETSTEERINGEBPF reads an int from the pointer, valid for the call.
    let rc = unsafe { libc::ioctl(queue.as_raw_fd(), TUNSETSTEERINGEBPF, &fd) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tun_steering_program_loads() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let program = load_tun_steering(3).expect("the kernel verifier takes it");
        assert!(program.as_raw_fd() >= 0);
        assert!(load_tun_steering(0).is_err());
    }
}
