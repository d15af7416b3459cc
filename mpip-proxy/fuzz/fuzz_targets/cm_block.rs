//! Fuzzes the CM block codec: untrusted bytes must never panic, and whatever
//! parses must re-emit to a block that parses to the same representation. An
//! `ASSIGN` payload goes through the Address Assignment parser too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mpip_proxy::wire::{frame, AssignmentPacket, AssignmentRepr, CmFlags, CmPacket, CmRepr, Framing};

fuzz_target!(|data: &[u8]| {
    let framing = frame(data);
    let Ok(packet) = CmPacket::new_checked(data) else {
        assert!(!matches!(framing, Ok(Framing::Complete { .. })));
        return;
    };
    let repr = CmRepr::parse(&packet).expect("checked packet parses");
    assert_eq!(framing, Ok(Framing::Complete { cm_len: packet.cm_len() }));
    let bytes = repr.encapsulate(packet.payload()).expect("parsed repr emits");
    let again = CmPacket::new_checked(&bytes[..]).expect("emitted block checks");
    assert_eq!(CmRepr::parse(&again).expect("re-parse"), repr);
    assert_eq!(again.payload(), packet.payload());
    if repr.flags.contains(CmFlags::ASSIGN) {
        if let Ok(assignment) = AssignmentPacket::new_checked(packet.payload()) {
            let parsed = AssignmentRepr::parse(&assignment);
            assert_eq!(&parsed.to_bytes()[..], &packet.payload()[..parsed.to_bytes().len()]);
        }
    }
});
