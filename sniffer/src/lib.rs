//! MPTCP option wire format, crypto, tracker and capture.
//!
//! - [`wire`]: sans-IO views and representations of the MPTCP option (every RFC 8684 subtype
//!   and the RFC 6824 variants), a TCP options walker and minimal IP/TCP header views.
//! - [`crypto`]: key → token / IDSN, MP_JOIN and ADD_ADDR HMACs.
//! - [`tracker`]: sans-IO connection/subflow tracker producing [`tracker::Event`]s.
//! - [`capture`]: pcap/pcapng readers, link-layer decoding, live `AF_PACKET` capture with a
//!   kernel BPF filter.
//! - [`output`]: per-option records (JSON / text) matching Wireshark's field semantics.
//! - [`cli`]: the `mptcp-sniffer` tool's logic ([`cli::run`]).
//!
//! Embedding the tracker (the caller owns the clock and the packets):
//!
//! ```
//! use mptcp_sniffer::capture::{self, CaptureFile};
//! use mptcp_sniffer::tracker::{Event, Tracker, TrackerConfig};
//!
//! let data = include_bytes!("../tests/fixtures/ptcpdump/mptcp.pcap");
//! let mut file = CaptureFile::parse(data)?;
//! let mut tracker = Tracker::new(TrackerConfig { multipath_threshold: 2, ..TrackerConfig::default() });
//! let mut tokens = Vec::new();
//! while let Some(frame) = file.next_frame()? {
//!     if let Ok(Some(segment)) = capture::decode_frame(frame.link, frame.data) {
//!         tracker.handle_segment(frame.timestamp, &segment);
//!     }
//!     while let Some(event) = tracker.poll_event() {
//!         if let Event::ConnectionEstablished { token, .. } = event {
//!             tokens.push(token);
//!         }
//!     }
//! }
//! assert_eq!(tokens, [0x64a48c01]);
//! # Ok::<(), mptcp_sniffer::capture::CaptureError>(())
//! ```

pub mod capture;
pub mod cli;
pub mod crypto;
pub mod fuzz;
pub mod output;
pub mod tracker;
pub mod wire;

pub use tracker::{Event, Tracker, TrackerConfig};
