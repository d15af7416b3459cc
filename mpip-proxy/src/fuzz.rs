//! The bodies of the cargo-fuzz targets in `fuzz/`, as library functions so `cargo test` replays the
//! checked-in corpora through exactly the code the fuzzer runs (`tests/fuzz_corpus.rs`).
//!
//! Adding a target: write `pub fn NAME(data: &[u8])` here, a `fuzz/fuzz_targets/NAME.rs` that calls
//! it, a `[[bin]]` in `fuzz/Cargo.toml`, a seed in `fuzz/corpus/NAME/`, and a row in the replay test.

use crate::mss::{clamp_syn, MssRewrite};
use crate::packet::{checksum, InnerPacket};
use crate::wire::{frame, AssignmentPacket, AssignmentRepr, CmFlags, CmPacket, CmRepr, Framing};

/// The CM block codec: untrusted bytes never panic, and whatever parses re-emits to a block that
/// parses to the same representation. An `ASSIGN` payload goes through the Address Assignment parser.
pub fn cm_block(data: &[u8]) {
    let framing = frame(data);
    let Ok(packet) = CmPacket::new_checked(data) else {
        assert!(!matches!(framing, Ok(Framing::Complete { .. })));
        return;
    };
    let repr = CmRepr::parse(&packet).expect("checked packet parses");
    assert_eq!(
        framing,
        Ok(Framing::Complete {
            cm_len: packet.cm_len()
        })
    );
    let bytes = repr
        .encapsulate(packet.payload())
        .expect("parsed repr emits");
    let again = CmPacket::new_checked(&bytes[..]).expect("emitted block checks");
    assert_eq!(CmRepr::parse(&again).expect("re-parse"), repr);
    assert_eq!(again.payload(), packet.payload());
    if repr.flags.contains(CmFlags::ASSIGN) {
        if let Ok(assignment) = AssignmentPacket::new_checked(packet.payload()) {
            let parsed = AssignmentRepr::parse(&assignment);
            assert_eq!(
                &parsed.to_bytes()[..],
                &packet.payload()[..parsed.to_bytes().len()]
            );
        }
    }
}

/// Inner-packet parsing and SYN MSS clamping: never panic, and a clamped SYN keeps a valid TCP
/// checksum.
pub fn inner_packet(data: &[u8]) {
    let _ = InnerPacket::parse(data);
    let mut packet = data.to_vec();
    if let Ok(MssRewrite::Clamped { .. }) = clamp_syn(&mut packet, 1200) {
        assert_eq!(checksum::tcp_checksum_ok(&packet), Ok(true));
    }
}
