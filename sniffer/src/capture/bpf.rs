//! The classic-BPF program attached to live capture sockets, and a small interpreter used to
//! test it in user space.
//!
//! The program runs on `AF_PACKET`/`SOCK_DGRAM` sockets, so the packet starts at the network
//! header and the EtherType comes from the `SKF_AD_PROTOCOL` ancillary load (this works on
//! Ethernet, loopback and point-to-point interfaces alike).
//!
//! **What passes** (everything else is dropped in the kernel):
//! - only IPv4 packets with protocol TCP that are not non-first fragments, and IPv6 packets
//!   whose fixed header's next header is TCP (IPv6 extension headers before TCP: dropped);
//! - of those, segments with SYN, FIN or RST set, and segments whose options area holds an
//!   option of kind 30 (MPTCP) among its first [`MAX_WALKED_OPTIONS`] options (NOPs count);
//!   the walk is unrolled, since cBPF has no loops;
//! - segments whose options area has more than [`MAX_WALKED_OPTIONS`] options before the
//!   walk concludes also pass (user space decides).
//!
//! Segments without options, with only other options (timestamps, SACK, ...), or with an
//! option list that ends (End-of-Option-List, the end of the header, a length below 2 or past
//! the header) before a kind-30 option are dropped.

/// A classic BPF instruction (same layout as the kernel's `struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instruction {
    /// Opcode.
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Constant.
    pub k: u32,
}

/// How many TCP options the unrolled walk looks at.
pub const MAX_WALKED_OPTIONS: usize = 14;

// Opcode parts (linux/bpf_common.h, linux/filter.h).
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ST: u16 = 0x02;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const IMM: u16 = 0x00;
const ABS: u16 = 0x20;
const IND: u16 = 0x40;
const MEM: u16 = 0x60;
const MSH: u16 = 0xa0;
const ADD: u16 = 0x00;
const SUB: u16 = 0x10;
const AND: u16 = 0x50;
const RSH: u16 = 0x70;
const JA: u16 = 0x00;
const JEQ: u16 = 0x10;
const JGT: u16 = 0x20;
const JGE: u16 = 0x30;
const JSET: u16 = 0x40;
const K: u16 = 0x00;
const X: u16 = 0x08;
const TAX: u16 = 0x00;
const TXA: u16 = 0x80;

/// `SKF_AD_OFF + SKF_AD_PROTOCOL`: load the packet's EtherType (host order).
pub const AD_PROTOCOL: u32 = 0xffff_f000;

/// Scratch memory slot holding the offset of the end of the TCP header.
const SLOT_TCP_END: u32 = 0;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Next,
    Label(String),
}

/// A tiny assembler with labels, so the unrolled program stays readable.
#[derive(Debug, Default)]
struct Assembler {
    code: Vec<(u16, u32, Target, Target)>,
    labels: Vec<(String, usize)>,
}

impl Assembler {
    fn stmt(&mut self, code: u16, k: u32) {
        self.code.push((code, k, Target::Next, Target::Next));
    }

    fn jump(&mut self, code: u16, k: u32, jt: Target, jf: Target) {
        self.code.push((code, k, jt, jf));
    }

    fn goto(&mut self, label: &str) {
        self.code
            .push((JMP | JA, 0, label_target(label), Target::Next));
    }

    fn label(&mut self, name: &str) {
        self.labels.push((name.to_string(), self.code.len()));
    }

    fn finish(self) -> Vec<Instruction> {
        let find = |name: &str| -> usize {
            self.labels
                .iter()
                .find(|(label, _)| label == name)
                .unwrap_or_else(|| panic!("undefined BPF label {name}"))
                .1
        };
        self.code
            .iter()
            .enumerate()
            .map(|(pc, (code, k, jt, jf))| {
                let offset = |target: &Target| -> usize {
                    match target {
                        Target::Next => 0,
                        Target::Label(name) => find(name)
                            .checked_sub(pc + 1)
                            .unwrap_or_else(|| panic!("backward BPF jump to {name}")),
                    }
                };
                if *code == JMP | JA {
                    return Instruction {
                        code: *code,
                        jt: 0,
                        jf: 0,
                        k: offset(jt) as u32,
                    };
                }
                let short = |target: &Target| -> u8 {
                    u8::try_from(offset(target))
                        .unwrap_or_else(|_| panic!("BPF jump too far at {pc}"))
                };
                Instruction {
                    code: *code,
                    jt: short(jt),
                    jf: short(jf),
                    k: *k,
                }
            })
            .collect()
    }
}

fn label_target(name: &str) -> Target {
    Target::Label(name.to_string())
}

/// The filter program; accepted packets are truncated to `snap_len` bytes.
pub fn mptcp_filter(snap_len: u32) -> Vec<Instruction> {
    use Target::Next;
    let drop = || label_target("drop");
    let accept = || label_target("accept");
    let mut asm = Assembler::default();
    asm.stmt(LD | H | ABS, AD_PROTOCOL);
    asm.jump(JMP | JEQ | K, 0x0800, label_target("ipv4"), Next);
    asm.jump(
        JMP | JEQ | K,
        0x86dd,
        label_target("ipv6"),
        label_target("drop_early"),
    );

    asm.label("ipv4");
    asm.stmt(LD | B | ABS, 9);
    asm.jump(JMP | JEQ | K, 6, Next, label_target("drop_early"));
    asm.stmt(LD | H | ABS, 6);
    asm.jump(JMP | JSET | K, 0x1fff, label_target("drop_early"), Next);
    asm.stmt(LDX | B | MSH, 0); // X = IPv4 header length
    asm.goto("tcp");

    asm.label("ipv6");
    asm.stmt(LD | B | ABS, 6);
    asm.jump(JMP | JEQ | K, 6, Next, label_target("drop_early"));
    asm.stmt(LDX | W | IMM, 40); // X = IPv6 header length
    asm.goto("tcp");

    asm.label("drop_early");
    asm.stmt(RET | K, 0);

    // X = offset of the TCP header.
    asm.label("tcp");
    asm.stmt(LD | B | IND, 13);
    asm.jump(JMP | JSET | K, 0x07, accept(), Next); // FIN, SYN or RST
    asm.stmt(LD | B | IND, 12);
    asm.stmt(ALU | AND | K, 0xf0);
    asm.stmt(ALU | RSH | K, 2); // A = TCP header length
    asm.jump(JMP | JGT | K, 20, Next, drop());
    asm.stmt(ALU | ADD | X, 0);
    asm.stmt(ST, SLOT_TCP_END); // M[0] = end of the TCP header
    asm.stmt(MISC | TXA, 0);
    asm.stmt(ALU | ADD | K, 20);
    asm.stmt(MISC | TAX, 0); // X = first option

    for step in 0..MAX_WALKED_OPTIONS {
        asm.label(&format!("option{step}"));
        asm.stmt(LD | MEM, SLOT_TCP_END);
        asm.stmt(ALU | SUB | X, 0); // A = bytes left in the options area
        asm.jump(JMP | JEQ | K, 0, drop(), Next);
        asm.jump(JMP | JGT | K, 40, drop(), Next); // the cursor ran past the end
        asm.stmt(LD | B | IND, 0); // kind
        asm.jump(JMP | JEQ | K, 30, accept(), Next);
        asm.jump(JMP | JEQ | K, 0, drop(), Next); // End of Option List
        asm.jump(JMP | JEQ | K, 1, label_target(&format!("nop{step}")), Next);
        asm.stmt(LD | B | IND, 1); // length
        asm.jump(JMP | JGE | K, 2, Next, drop());
        asm.stmt(ALU | ADD | X, 0);
        asm.stmt(MISC | TAX, 0);
        asm.goto(&format!("option{}", step + 1));
        asm.label(&format!("nop{step}"));
        asm.stmt(MISC | TXA, 0);
        asm.stmt(ALU | ADD | K, 1);
        asm.stmt(MISC | TAX, 0);
    }
    // Too many options to decide here: let user space look.
    asm.label(&format!("option{MAX_WALKED_OPTIONS}"));
    asm.label("accept");
    asm.stmt(RET | K, snap_len);
    asm.label("drop");
    asm.stmt(RET | K, 0);
    asm.finish()
}

/// Runs `program` on `packet` (starting at the network header) whose EtherType is `protocol`,
/// like the kernel would; returns the number of bytes to keep (0 = drop). Supports the opcodes
/// [`mptcp_filter`] uses; a load outside the packet drops it, as in the kernel.
pub fn run(program: &[Instruction], packet: &[u8], protocol: u16) -> u32 {
    let mut a: u32 = 0;
    let mut x: u32 = 0;
    let mut memory = [0u32; 16];
    let mut pc = 0;
    let load = |offset: u32, size: usize| -> Option<u32> {
        let offset = offset as usize;
        let bytes = packet.get(offset..offset.checked_add(size)?)?;
        Some(
            bytes
                .iter()
                .fold(0u32, |acc, byte| (acc << 8) | u32::from(*byte)),
        )
    };
    while let Some(instruction) = program.get(pc) {
        let Instruction { code, jt, jf, k } = *instruction;
        pc += 1;
        let jump = |condition: bool| usize::from(if condition { jt } else { jf });
        match code {
            c if c == LD | H | ABS && k == AD_PROTOCOL => a = u32::from(protocol),
            c if c == LD | H | ABS || c == LD | B | ABS || c == LD | B | IND => {
                let size = if c & 0x18 == H { 2 } else { 1 };
                let offset = if c & IND != 0 { x.wrapping_add(k) } else { k };
                match load(offset, size) {
                    Some(value) => a = value,
                    None => return 0,
                }
            }
            c if c == LDX | B | MSH => match load(k, 1) {
                Some(value) => x = (value & 0x0f) * 4,
                None => return 0,
            },
            c if c == LDX | W | IMM => x = k,
            c if c == LD | MEM => a = memory[k as usize & 15],
            c if c == ST => memory[k as usize & 15] = a,
            c if c == ALU | ADD | K => a = a.wrapping_add(k),
            c if c == ALU | ADD | X => a = a.wrapping_add(x),
            c if c == ALU | SUB | X => a = a.wrapping_sub(x),
            c if c == ALU | AND | K => a &= k,
            c if c == ALU | RSH | K => a = a.checked_shr(k).unwrap_or(0),
            c if c == MISC | TAX => x = a,
            c if c == MISC | TXA => a = x,
            c if c == JMP | JA => pc += k as usize,
            c if c == JMP | JEQ | K => pc += jump(a == k),
            c if c == JMP | JGT | K => pc += jump(a > k),
            c if c == JMP | JGE | K => pc += jump(a >= k),
            c if c == JMP | JSET | K => pc += jump(a & k != 0),
            c if c == RET | K => return k,
            _ => return 0,
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_tcp(flags: u8, options: &[u8]) -> Vec<u8> {
        let mut options = options.to_vec();
        while options.len() % 4 != 0 {
            options.push(0);
        }
        let mut packet = vec![0u8; 40];
        packet[0] = 0x45;
        packet[9] = 6;
        packet[20 + 12] = ((20 + options.len()) as u8 / 4) << 4;
        packet[20 + 13] = flags;
        packet.extend_from_slice(&options);
        packet.extend_from_slice(b"payload");
        packet
    }

    const TIMESTAMPS: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
    const DSS: [u8; 8] = [30, 8, 0x20, 0x01, 0, 0, 0, 9];

    #[test]
    fn program_is_within_kernel_limits() {
        let program = mptcp_filter(256);
        assert!(program.len() < 4096, "{}", program.len());
        assert_eq!(program.last().unwrap().code, RET | K);
    }

    #[test]
    fn ipv4_conditions() {
        let program = mptcp_filter(65535);
        assert_eq!(
            run(&program, &ipv4_tcp(0x10, &[]), 0x0800),
            0,
            "plain ACK without options"
        );
        assert_eq!(
            run(&program, &ipv4_tcp(0x10, &TIMESTAMPS), 0x0800),
            0,
            "timestamps only"
        );
        assert_eq!(run(&program, &ipv4_tcp(0x02, &[]), 0x0800), 65535, "SYN");
        assert_eq!(run(&program, &ipv4_tcp(0x11, &[]), 0x0800), 65535, "FIN");
        assert_eq!(run(&program, &ipv4_tcp(0x14, &[]), 0x0800), 65535, "RST");
        let mut with_dss = TIMESTAMPS.to_vec();
        with_dss.extend_from_slice(&DSS);
        assert_eq!(
            run(&program, &ipv4_tcp(0x10, &with_dss), 0x0800),
            65535,
            "timestamps + DSS"
        );
        assert_eq!(
            run(&program, &ipv4_tcp(0x10, &DSS), 0x0800),
            65535,
            "DSS first"
        );
        // MPTCP after End-of-Option-List, or after a zero-length option, is not an option.
        let mut after_end = vec![0u8, 0, 0, 0];
        after_end.extend_from_slice(&DSS);
        assert_eq!(run(&program, &ipv4_tcp(0x10, &after_end), 0x0800), 0);
        let mut after_bad = vec![8u8, 0, 1, 1];
        after_bad.extend_from_slice(&DSS);
        assert_eq!(run(&program, &ipv4_tcp(0x10, &after_bad), 0x0800), 0);
        // An option running past the header does not pass.
        assert_eq!(run(&program, &ipv4_tcp(0x10, &[8, 40, 0, 0]), 0x0800), 0);
        // Fifteen NOPs then MPTCP: beyond the walk, passed to user space.
        let mut nops = vec![1u8; 15];
        nops.extend_from_slice(&DSS);
        assert_eq!(run(&program, &ipv4_tcp(0x10, &nops), 0x0800), 65535);
        // Thirteen NOPs then MPTCP: found by the walk.
        let mut nops = vec![1u8; 13];
        nops.extend_from_slice(&DSS);
        assert_eq!(run(&program, &ipv4_tcp(0x10, &nops), 0x0800), 65535);
        let mut udp = ipv4_tcp(0x02, &[]);
        udp[9] = 17;
        assert_eq!(run(&program, &udp, 0x0800), 0);
        let mut fragment = ipv4_tcp(0x02, &DSS);
        fragment[7] = 1;
        assert_eq!(run(&program, &fragment, 0x0800), 0);
        assert_eq!(run(&program, &ipv4_tcp(0x02, &DSS), 0x0806), 0, "ARP");
        assert_eq!(
            run(&program, &ipv4_tcp(0x02, &[])[..30], 0x0800),
            0,
            "truncated"
        );
        // IPv4 options move the TCP header.
        let mut with_ip_options = ipv4_tcp(0x10, &DSS);
        with_ip_options[0] = 0x46;
        with_ip_options.splice(20..20, [1, 1, 1, 0]);
        assert_eq!(run(&program, &with_ip_options, 0x0800), 65535);
    }

    #[test]
    fn ipv6_conditions() {
        let program = mptcp_filter(1500);
        let ipv6 = |flags: u8, options: &[u8]| {
            let mut packet = vec![0u8; 40];
            packet[0] = 0x60;
            packet[6] = 6;
            packet.extend_from_slice(&ipv4_tcp(flags, options)[20..]);
            packet
        };
        assert_eq!(run(&program, &ipv6(0x10, &TIMESTAMPS), 0x86dd), 0);
        assert_eq!(run(&program, &ipv6(0x10, &DSS), 0x86dd), 1500);
        assert_eq!(run(&program, &ipv6(0x04, &[]), 0x86dd), 1500);
        let mut extension = ipv6(0x02, &DSS);
        extension[6] = 0;
        assert_eq!(run(&program, &extension, 0x86dd), 0);
    }
}
