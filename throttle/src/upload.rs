//! Upload classification at constant cost: one cls_bpf program on each IFB device's HTB looks the packet's
//! TCP four-tuple up in one BPF hash map (tuple → class id) and sets `skb->tc_classid`.
//!
//! Why BPF: nftables cannot classify there (redirected packets skip the IFB's netdev egress hook, and
//! prerouting runs after tc ingress), this kernel has no flower, and u32 hashes on one masked 32-bit word
//! into at most 256 buckets, each still a linear list, so its cost still grows with the subflows
//! (measured in `throttle/README.md`). A hash map lookup does not.
//!
//! The program (assembled in Rust with [`mptcp_netlink::bpf::Asm`], nothing to compile or ship):
//! IPv4 or IPv6 (no extension headers, as before) carrying TCP, not a non-first fragment; the key is
//! client address, proxy address (16 bytes each, IPv4 in the first 4), client port, proxy port (network
//! order) and the IP version. A hit sets the class (`skb->tc_classid` keeps the minor; the filter's
//! `classid` gives the major) and returns `TC_ACT_OK`; a miss returns
//! `TC_ACT_UNSPEC`, so HTB sends the packet unclassified (`default 0`: unshaped), as before.

use std::net::IpAddr;

use mptcp_netlink::bpf::{
    self, helper, Alu, Asm, BpfError, Cond, Map, Program, Size, R0, R1, R10, R2, R3, R4, R5, R6,
};

use crate::event::FourTuple;

/// Key size: two 16-byte addresses, two ports, the IP version and padding.
pub const KEY_LEN: usize = 40;
/// `__sk_buff.protocol`.
const SKB_PROTOCOL: i16 = 16;
/// `__sk_buff.tc_classid`.
const SKB_TC_CLASSID: i16 = 72;
/// `TC_ACT_OK` and `TC_ACT_UNSPEC`.
const TC_ACT_OK: i32 = 0;
const TC_ACT_UNSPEC: i32 = -1;

// Stack layout below the frame pointer.
const KEY: i16 = -40;
const HEADER: i16 = -88;
const PORTS: i16 = -96;

/// The map key of a subflow's upload packets (client → proxy).
pub fn key(tuple: &FourTuple) -> Option<[u8; KEY_LEN]> {
    let (client, proxy) = (
        tuple.remote.ip().to_canonical(),
        tuple.local.ip().to_canonical(),
    );
    let mut key = [0u8; KEY_LEN];
    let version = match (client, proxy) {
        (IpAddr::V4(c), IpAddr::V4(p)) => {
            key[0..4].copy_from_slice(&c.octets());
            key[16..20].copy_from_slice(&p.octets());
            4
        }
        (IpAddr::V6(c), IpAddr::V6(p)) => {
            key[0..16].copy_from_slice(&c.octets());
            key[16..32].copy_from_slice(&p.octets());
            6
        }
        _ => return None,
    };
    key[32..34].copy_from_slice(&tuple.remote.port().to_be_bytes());
    key[34..36].copy_from_slice(&tuple.local.port().to_be_bytes());
    key[36] = version;
    Some(key)
}

/// A 16-bit value as the program reads it from packet bytes in network order (a native-endian load).
fn network_u16(value: u16) -> i32 {
    i32::from(u16::from_ne_bytes(value.to_be_bytes()))
}

/// The classifier's instructions for the map with descriptor `map_fd`.
pub fn program(map_fd: i32) -> Vec<bpf::Insn> {
    let mut asm = Asm::new();
    let (v4, v6, ports, miss) = (
        asm.new_label(),
        asm.new_label(),
        asm.new_label(),
        asm.new_label(),
    );
    asm.mov(R6, R1);
    for slot in 0..5 {
        asm.store_imm(Size::DW, R10, KEY + 8 * slot, 0);
    }
    asm.load(Size::W, R2, R6, SKB_PROTOCOL)
        .jump_if(Cond::Eq, R2, network_u16(0x0800), v4)
        .jump_if(Cond::Eq, R2, network_u16(0x86dd), v6)
        .jump(miss);
    // load_bytes_relative(skb, offset in R2, stack + at, len) from the network header; R0 == 0 on success.
    let load = |asm: &mut Asm, at: i16, len: i32| {
        asm.mov(R1, R6)
            .mov(R3, R10)
            .alu(Alu::Add, R3, i32::from(at))
            .alu(Alu::Mov, R4, len)
            .alu(Alu::Mov, R5, helper::HDR_START_NET)
            .call(helper::SKB_LOAD_BYTES_RELATIVE);
    };
    // IPv4: TCP, not a later fragment; addresses; the transport header after IHL words.
    asm.label(v4).alu(Alu::Mov, R2, 0);
    load(&mut asm, HEADER, 20);
    asm.jump_if(Cond::Ne, R0, 0, miss)
        .load(Size::B, R2, R10, HEADER + 9)
        .jump_if(Cond::Ne, R2, libc::IPPROTO_TCP, miss)
        .load(Size::H, R2, R10, HEADER + 6)
        .alu(Alu::And, R2, network_u16(0x1fff))
        .jump_if(Cond::Ne, R2, 0, miss)
        .load(Size::W, R2, R10, HEADER + 12)
        .store(Size::W, R10, KEY, R2)
        .load(Size::W, R2, R10, HEADER + 16)
        .store(Size::W, R10, KEY + 16, R2)
        .store_imm(Size::B, R10, KEY + 36, 4)
        .load(Size::B, R2, R10, HEADER)
        .alu(Alu::And, R2, 0x0f)
        .alu(Alu::Lsh, R2, 2)
        .jump(ports);
    // IPv6: next header TCP (no extension headers); addresses.
    asm.label(v6).alu(Alu::Mov, R2, 0);
    load(&mut asm, HEADER, 40);
    asm.jump_if(Cond::Ne, R0, 0, miss)
        .load(Size::B, R2, R10, HEADER + 6)
        .jump_if(Cond::Ne, R2, libc::IPPROTO_TCP, miss);
    for word in 0..4 {
        asm.load(Size::DW, R2, R10, HEADER + 8 + 8 * word)
            .store(Size::DW, R10, KEY + 8 * word, R2);
    }
    asm.store_imm(Size::B, R10, KEY + 36, 6)
        .alu(Alu::Mov, R2, 40);
    // Ports: source (client) and destination (proxy), as in the packet.
    asm.label(ports);
    load(&mut asm, PORTS, 4);
    asm.jump_if(Cond::Ne, R0, 0, miss)
        .load(Size::W, R2, R10, PORTS)
        .store(Size::W, R10, KEY + 32, R2)
        .load_map_fd(R1, map_fd)
        .mov(R2, R10)
        .alu(Alu::Add, R2, i32::from(KEY))
        .call(helper::MAP_LOOKUP_ELEM)
        .jump_if(Cond::Eq, R0, 0, miss)
        .load(Size::W, R2, R0, 0)
        .store(Size::W, R6, SKB_TC_CLASSID, R2)
        .alu(Alu::Mov, R0, TC_ACT_OK)
        .exit();
    asm.label(miss).alu(Alu::Mov, R0, TC_ACT_UNSPEC).exit();
    asm.finish()
}

/// The upload classifier: its map (tuple → class id) and its program.
#[derive(Debug)]
pub struct UploadClassifier {
    map: Map,
    program: Program,
}

/// Name of the program and map, as `bpftool` shows them.
pub const BPF_NAME: &str = "mptcp_upload";

impl UploadClassifier {
    /// Creates the map (up to `max_entries` subflows, allocated as they are added) and loads the program.
    pub fn new(max_entries: u32) -> Result<Self, BpfError> {
        let map = Map::create(
            bpf::MAP_TYPE_HASH,
            KEY_LEN as u32,
            4,
            max_entries.max(1),
            bpf::F_NO_PREALLOC,
            BPF_NAME,
        )?;
        // The kernel's license check only matters for GPL-only helpers, which this program does not call.
        let program = Program::load(
            bpf::PROG_TYPE_SCHED_CLS,
            &program(map.fd()),
            "Apache-2.0",
            BPF_NAME,
        )?;
        Ok(Self { map, program })
    }

    /// The program's descriptor, for the cls_bpf filter.
    pub fn program_fd(&self) -> i32 {
        self.program.fd()
    }

    /// Classifies `tuple`'s upload packets into `classid`.
    pub fn set(&self, key: &[u8; KEY_LEN], classid: u32) -> Result<(), BpfError> {
        self.map
            .update(key, &classid.to_ne_bytes(), bpf::UPDATE_ANY)
    }

    /// Stops classifying `key`; `Ok(false)` when it was not there.
    pub fn remove(&self, key: &[u8; KEY_LEN]) -> Result<bool, BpfError> {
        self.map.delete(key)
    }

    /// The class of `key`, if any.
    pub fn get(&self, key: &[u8; KEY_LEN]) -> Result<Option<u32>, BpfError> {
        Ok(self
            .map
            .lookup(key)?
            .map(|v| u32::from_ne_bytes(v.try_into().expect("4-byte map value"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_puts_client_first_and_marks_the_version() {
        let tuple = FourTuple {
            local: "10.0.0.1:443".parse().unwrap(),
            remote: "192.0.2.7:50000".parse().unwrap(),
        };
        let key = key(&tuple).unwrap();
        assert_eq!(&key[0..4], &[192, 0, 2, 7]);
        assert_eq!(&key[16..20], &[10, 0, 0, 1]);
        assert_eq!(&key[32..36], &[0xc3, 0x50, 0x01, 0xbb]);
        assert_eq!(key[36], 4);
        let mixed = FourTuple {
            local: "[::ffff:10.0.0.1]:443".parse().unwrap(),
            remote: "192.0.2.7:50000".parse().unwrap(),
        };
        assert_eq!(super::key(&mixed).unwrap(), key, "v4-mapped is IPv4");
    }

    #[test]
    fn program_jumps_stay_inside() {
        let insns = program(3);
        for (i, insn) in insns.iter().enumerate() {
            if insn.code & 0x07 == 0x05 && insn.code != 0x85 && insn.code != 0x95 {
                let target = i as i64 + 1 + i64::from(insn.off);
                assert!((0..insns.len() as i64).contains(&target), "insn {i}");
            }
        }
    }
}
