//! What the tracker reports.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

use crate::crypto::MptcpVersion;

/// Which host of an MPTCP connection: the one that sent the MP_CAPABLE SYN (client) or the
/// one that answered it (server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// The MP_CAPABLE initiator.
    Client,
    /// The MP_CAPABLE responder.
    Server,
}

impl Side {
    /// The other host.
    pub fn peer(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Side::Client => 0,
            Side::Server => 1,
        }
    }
}

/// A subflow's TCP 4-tuple, oriented from the host that sent the SYN to the one that answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct FourTuple {
    /// Address and port of the SYN's sender.
    pub initiator: SocketAddr,
    /// Address and port of the SYN's receiver.
    pub responder: SocketAddr,
}

/// What the throttle needs to classify a subflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct SubflowInfo {
    /// The 4-tuple.
    pub tuple: FourTuple,
    /// Which host of the connection opened this subflow (sent the SYN).
    pub initiator_side: Side,
    /// Address id of the initiator's address (0 for the initial subflow, from MP_JOIN SYN
    /// otherwise).
    pub initiator_address_id: Option<u8>,
    /// Address id of the responder's address (from MP_JOIN SYN-ACK).
    pub responder_address_id: Option<u8>,
    /// Whether the subflow is a backup path (MP_JOIN B flag or latest MP_PRIO).
    pub backup: bool,
}

/// Why a subflow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum SubflowCloseReason {
    /// Both hosts sent FIN.
    Fin,
    /// A RST without MP_TCPRST.
    Reset,
    /// A RST carrying MP_TCPRST.
    TcpRst {
        /// MP_TCPRST reason code.
        reason: u8,
        /// The T flag.
        transient: bool,
    },
    /// The connection was fast-closed (MP_FASTCLOSE).
    FastClose,
    /// No segment for longer than the idle timeout.
    IdleTimeout,
    /// Evicted to keep the tables bounded.
    Evicted,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionCloseReason {
    /// Its last subflow closed.
    LastSubflowClosed,
    /// MP_FASTCLOSE.
    FastClose,
}

/// Protocol violations and suspicious signalling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AnomalyKind {
    /// An MP_JOIN SYN carries a token no tracked connection owns.
    UnknownToken {
        /// The token.
        token: u32,
    },
    /// MP_CAPABLE keys differ from the keys of the handshake (or of the connection).
    KeyChange {
        /// Key seen earlier.
        expected: u64,
        /// Key seen now.
        seen: u64,
    },
    /// An ADD_ADDR reuses an announced address id for a different address.
    DuplicateAddressId {
        /// The address id.
        address_id: u8,
        /// Address announced first.
        previous: IpAddr,
        /// Address announced now.
        address: IpAddr,
    },
    /// An MP_JOIN or ADD_ADDR HMAC does not match the observed keys and nonces.
    HmacMismatch {
        /// Which option: `mp_join_syn_ack`, `mp_join_ack` or `add_addr`.
        option: &'static str,
    },
    /// An MPTCP option could not be parsed.
    MalformedOption,
}

/// One tracker event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Event {
    /// The MP_CAPABLE handshake completed.
    ConnectionEstablished {
        /// The server's token (the one the client's MP_JOINs carry); identifies the
        /// connection in every event.
        token: u32,
        /// The client's token.
        client_token: u32,
        /// Protocol version.
        version: MptcpVersion,
        /// The initial subflow.
        subflow: SubflowInfo,
    },
    /// A subflow completed its handshake (the initial one or an MP_JOIN).
    SubflowAdded {
        /// Connection token.
        token: u32,
        /// The subflow.
        subflow: SubflowInfo,
        /// Active subflows of the connection, this one included.
        active_subflows: usize,
    },
    /// A subflow ended.
    SubflowClosed {
        /// Connection token.
        token: u32,
        /// The subflow.
        subflow: SubflowInfo,
        /// Why.
        reason: SubflowCloseReason,
        /// Active subflows left.
        active_subflows: usize,
    },
    /// The connection reached the configured number of active subflows (the throttling
    /// trigger). Reported again only after the count fell below the threshold.
    MultipathThresholdReached {
        /// Connection token.
        token: u32,
        /// Active subflows.
        active_subflows: usize,
        /// The configured threshold.
        threshold: usize,
        /// Every active subflow.
        subflows: Vec<SubflowInfo>,
    },
    /// An ADD_ADDR announced an address.
    AddressAnnounced {
        /// Connection token.
        token: u32,
        /// The announcing host.
        side: Side,
        /// Address id.
        address_id: u8,
        /// The address.
        address: IpAddr,
        /// The port, if announced.
        port: Option<u16>,
        /// The subflow the option travelled on.
        via: FourTuple,
    },
    /// A REMOVE_ADDR withdrew an address id.
    AddressRemoved {
        /// Connection token.
        token: u32,
        /// The withdrawing host.
        side: Side,
        /// Address id.
        address_id: u8,
        /// The address, when it was announced or used by a subflow.
        address: Option<IpAddr>,
    },
    /// An MP_PRIO changed a subflow's backup flag.
    PriorityChanged {
        /// Connection token.
        token: u32,
        /// The subflow, with its new backup flag.
        subflow: SubflowInfo,
        /// The host that sent MP_PRIO.
        side: Side,
        /// v0 MP_PRIO address id.
        address_id: Option<u8>,
    },
    /// A SYN with MP_CAPABLE was answered by a SYN-ACK without it: plain TCP.
    Fallback {
        /// The connection's 4-tuple.
        tuple: FourTuple,
    },
    /// An MPTCP connection ended.
    ConnectionClosed {
        /// Connection token.
        token: u32,
        /// Why.
        reason: ConnectionCloseReason,
    },
    /// Something is wrong.
    Anomaly {
        /// What.
        kind: AnomalyKind,
        /// The segment's source and destination (as sent).
        source: SocketAddr,
        /// The segment's destination.
        destination: SocketAddr,
        /// The connection, when known.
        token: Option<u32>,
    },
}

impl Event {
    /// The token of the connection the event is about, when known.
    pub fn token(&self) -> Option<u32> {
        match self {
            Event::ConnectionEstablished { token, .. }
            | Event::SubflowAdded { token, .. }
            | Event::SubflowClosed { token, .. }
            | Event::MultipathThresholdReached { token, .. }
            | Event::AddressAnnounced { token, .. }
            | Event::AddressRemoved { token, .. }
            | Event::PriorityChanged { token, .. }
            | Event::ConnectionClosed { token, .. } => Some(*token),
            Event::Anomaly { token, .. } => *token,
            Event::Fallback { .. } => None,
        }
    }
}
