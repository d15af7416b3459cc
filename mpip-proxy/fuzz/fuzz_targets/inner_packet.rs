//! Fuzzes inner-packet parsing and SYN MSS clamping: never panic, and a clamped
//! SYN keeps a valid TCP checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mpip_proxy::mss::{clamp_syn, MssRewrite};
use mpip_proxy::packet::{checksum, InnerPacket};

fuzz_target!(|data: &[u8]| {
    let _ = InnerPacket::parse(data);
    let mut packet = data.to_vec();
    if let Ok(MssRewrite::Clamped { .. }) = clamp_syn(&mut packet, 1200) {
        assert_eq!(checksum::tcp_checksum_ok(&packet), Ok(true));
    }
});
