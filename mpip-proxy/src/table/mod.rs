//! The MPIP tables of §III-C and §III-D.
//!
//! - [`availability`]: MPIP availability of remote endpoints and the handshake state.
//! - [`node`]: node ID ↔ UDP endpoints, as observed (NAT-mapped) and as announced.
//! - [`session`]: the Session Information Table (Table II), with expiry.
//! - [`path`]: the Path Information Table (Table III) of one session, Algorithm 1,
//!   and the queue of delay feedback to return to a peer.

pub mod availability;
pub mod node;
pub mod path;
pub mod session;
