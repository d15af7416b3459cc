//! Packet sources: capture files (pcap, pcapng) and live `AF_PACKET` capture, plus the
//! link-layer decapsulation they share.

pub mod bpf;
pub mod file;
pub mod link;
pub mod live;

pub use file::{CaptureError, CaptureFile, CaptureReader, Frame, IncompleteRecord};
pub use link::{LinkError, LinkType};
pub use live::{LiveCapture, LiveCaptureError, LiveFrame, LiveOptions};

use crate::wire::{IpError, Segment};

/// Why a frame could not be decoded down to a TCP segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Link-layer problem.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// IP or TCP header problem.
    #[error(transparent)]
    Ip(#[from] IpError),
}

/// Decodes a frame down to its TCP segment; `Ok(None)` for frames that carry no TCP.
pub fn decode_frame(link: LinkType, data: &[u8]) -> Result<Option<Segment<'_>>, DecodeError> {
    let Some(ip) = link::ip_payload(link, data)? else {
        return Ok(None);
    };
    Ok(Segment::parse_ip(ip)?)
}
