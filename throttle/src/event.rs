//! Subflow events: what the throttle learns about MPTCP connections.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The MPTCP connection token (local token, as in `mptcp_pm` events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnectionToken(pub u32);

impl fmt::Display for ConnectionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// The addresses of one subflow seen from the proxy: `local` is the proxy's
/// address and port, `remote` the client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FourTuple {
    /// The proxy's side.
    pub local: SocketAddr,
    /// The client's side.
    pub remote: SocketAddr,
}

impl fmt::Display for FourTuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}<->{}", self.local, self.remote)
    }
}

/// What is known of the interface a subflow arrived on.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceRef {
    /// Kernel interface index, if known.
    pub index: Option<u32>,
    /// Interface name, if known.
    pub name: Option<String>,
}

/// One subflow as reported by an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubflowInfo {
    /// Addresses and ports.
    pub tuple: FourTuple,
    /// Interface the subflow arrived on, as far as the source knows.
    pub interface: InterfaceRef,
    /// MPTCP address id of the proxy's address (`loc_id`).
    pub local_id: Option<u8>,
    /// MPTCP address id of the client's address (`rem_id`).
    pub remote_id: Option<u8>,
    /// Whether the subflow is a backup subflow.
    pub backup: bool,
}

impl SubflowInfo {
    /// A subflow known only by its addresses.
    pub fn new(local: SocketAddr, remote: SocketAddr) -> Self {
        Self {
            tuple: FourTuple { local, remote },
            interface: InterfaceRef::default(),
            local_id: None,
            remote_id: None,
            backup: false,
        }
    }
}

/// How the proxy names a connection when it attaches information to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionSelector {
    /// By MPTCP token.
    Token(ConnectionToken),
    /// By the addresses of any of its subflows (for example the accepted
    /// socket's local and peer address).
    Tuple(FourTuple),
}

/// The destination of the request the proxy relays for a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Destination {
    /// Host name of the request (HTTP Host, TLS SNI, CONNECT target).
    pub host: Option<String>,
    /// Server address the proxy connected to.
    pub addr: Option<IpAddr>,
    /// Server port.
    pub port: Option<u16>,
}

/// Something that happened to an MPTCP connection or one of its subflows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubflowEvent {
    /// A connection was created; `subflow` is its initial subflow.
    ConnectionCreated {
        /// The connection.
        token: ConnectionToken,
        /// The initial subflow.
        subflow: SubflowInfo,
    },
    /// The connection is fully established (can add subflows).
    ConnectionEstablished {
        /// The connection.
        token: ConnectionToken,
        /// The initial subflow.
        subflow: SubflowInfo,
    },
    /// The connection is gone, with all its subflows.
    ConnectionClosed {
        /// The connection.
        token: ConnectionToken,
    },
    /// A subflow joined the connection.
    SubflowEstablished {
        /// The connection.
        token: ConnectionToken,
        /// The new subflow.
        subflow: SubflowInfo,
    },
    /// A subflow closed.
    SubflowClosed {
        /// The connection.
        token: ConnectionToken,
        /// The closed subflow.
        subflow: SubflowInfo,
    },
    /// The client announced an address (ADD_ADDR).
    AddressAnnounced {
        /// The connection.
        token: ConnectionToken,
        /// The client's address id.
        remote_id: u8,
        /// The address.
        addr: IpAddr,
        /// The port, if announced.
        port: Option<u16>,
    },
    /// The client withdrew an address (REMOVE_ADDR).
    AddressRemoved {
        /// The connection.
        token: ConnectionToken,
        /// The client's address id.
        remote_id: u8,
    },
    /// A subflow's backup flag changed (MP_PRIO).
    PriorityChanged {
        /// The connection.
        token: ConnectionToken,
        /// The subflow with its new flag.
        subflow: SubflowInfo,
    },
    /// The proxy learned where the connection's request goes.
    DestinationAttached {
        /// Which connection.
        connection: ConnectionSelector,
        /// Where its request goes.
        destination: Destination,
    },
    /// The event source lost events (the kernel's event socket overflowed, or a capture dropped
    /// packets): the owner task rebuilds the live subflows from the kernel (a resync).
    EventsLost,
}
