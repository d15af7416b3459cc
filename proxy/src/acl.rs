//! Access control: which clients may use the proxy and which destinations it may reach.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use ipnet::IpNet;

use crate::config::{AclConfig, PortRange};

/// Cloud metadata services, denied as destinations whatever `acl.deny_destinations` says: AWS, GCP,
/// Azure and OpenStack (169.254.169.254), AWS over IPv6 (fd00:ec2::254), Alibaba (100.100.100.200).
/// They hand out credentials to whoever asks from inside the host's network.
pub const METADATA_ADDRESSES: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
];

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The client's address is not in `acl.allow_clients`.
    #[error("client {0} is not allowed to use this proxy")]
    Client(IpAddr),
    /// The destination is in `acl.deny_destinations`.
    #[error("destination {0} is in the denied network {1}")]
    Network(IpAddr, IpNet),
    /// The destination is one of the proxy's own addresses.
    #[error("destination {0} is this proxy")]
    OwnAddress(IpAddr),
    /// CONNECT to a port outside `acl.connect_ports`.
    #[error("CONNECT to port {0} is not allowed")]
    ConnectPort(u16),
    /// An absolute-form request to a port outside `acl.safe_ports`.
    #[error("requests to port {0} are not allowed")]
    SafePort(u16),
    /// A converter's Connect TLV to a port outside `acl.convert_ports`.
    #[error("conversion to port {0} is not allowed")]
    ConvertPort(u16),
    /// A cloud metadata address ([`METADATA_ADDRESSES`]).
    #[error("destination {0} is a cloud metadata service")]
    Metadata(IpAddr),
}

impl Denied {
    /// What the client is told: never the resolved address or the denied network (the log keeps them).
    pub fn public_reason(&self) -> String {
        match self {
            Denied::Client(_) => "this client is not allowed to use the proxy".to_owned(),
            Denied::Network(..) | Denied::OwnAddress(_) | Denied::Metadata(_) => {
                "the destination is not allowed".to_owned()
            }
            Denied::ConnectPort(port) => format!("CONNECT to port {port} is not allowed"),
            Denied::SafePort(port) => format!("requests to port {port} are not allowed"),
            Denied::ConvertPort(port) => format!("conversion to port {port} is not allowed"),
        }
    }
}

/// The compiled access-control lists.
#[derive(Debug)]
pub struct Acl {
    allow_clients: Vec<IpNet>,
    deny_destinations: Vec<IpNet>,
    deny_own_addresses: bool,
    own_addresses: Arc<OwnAddresses>,
    connect_ports: Vec<PortRange>,
    safe_ports: Vec<PortRange>,
    convert_ports: Vec<PortRange>,
}

/// The proxy host's own addresses, refreshed while the proxy runs ([`watch_own_addresses`]).
#[derive(Debug, Default)]
pub struct OwnAddresses {
    /// Always included: the configured listener addresses.
    fixed: Vec<IpAddr>,
    /// The interface addresses at the last refresh, plus `fixed`. Read once per upstream connection;
    /// written only when addresses change.
    current: RwLock<Arc<[IpAddr]>>,
}

impl OwnAddresses {
    fn contains(&self, ip: IpAddr) -> bool {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&ip)
    }

    /// Replaces the interface addresses (the listener addresses stay).
    pub fn set(&self, interfaces: impl IntoIterator<Item = IpAddr>) {
        let mut all: Vec<IpAddr> = interfaces
            .into_iter()
            .chain(self.fixed.iter().copied())
            .map(canonical)
            .collect();
        all.sort_unstable();
        all.dedup();
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if **current != *all {
            *current = all.into();
        }
    }
}

/// IPv4-mapped IPv6 addresses are checked as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl Acl {
    /// Builds the lists; `own_addresses` are the host's interface addresses (used when
    /// `deny_own_addresses` is set).
    pub fn new(config: &AclConfig, own_addresses: Vec<IpAddr>) -> Self {
        Self::with_listeners(config, own_addresses, Vec::new())
    }

    /// [`Acl::new`] where `listeners` (the configured listener addresses) stay in the own-address
    /// list across refreshes.
    pub fn with_listeners(
        config: &AclConfig,
        interfaces: Vec<IpAddr>,
        listeners: Vec<IpAddr>,
    ) -> Self {
        let own = OwnAddresses {
            fixed: listeners.into_iter().map(canonical).collect(),
            current: RwLock::new(Arc::from(Vec::new())),
        };
        own.set(interfaces);
        Self {
            allow_clients: config.allow_clients.clone(),
            deny_destinations: config.deny_destinations.clone(),
            deny_own_addresses: config.deny_own_addresses,
            own_addresses: Arc::new(own),
            connect_ports: config.connect_ports.clone(),
            safe_ports: config.safe_ports.clone(),
            convert_ports: config.convert_ports.clone(),
        }
    }

    /// The own-address list, to refresh it.
    pub fn own_addresses(&self) -> &Arc<OwnAddresses> {
        &self.own_addresses
    }

    /// Checks a client address.
    pub fn check_client(&self, client: IpAddr) -> Result<(), Denied> {
        let ip = canonical(client);
        if self.allow_clients.iter().any(|net| net.contains(&ip)) {
            Ok(())
        } else {
            Err(Denied::Client(client))
        }
    }

    /// Checks a resolved destination address.
    pub fn check_destination(&self, destination: IpAddr) -> Result<(), Denied> {
        let ip = canonical(destination);
        if METADATA_ADDRESSES.contains(&ip) {
            return Err(Denied::Metadata(destination));
        }
        if let Some(net) = self.deny_destinations.iter().find(|net| net.contains(&ip)) {
            return Err(Denied::Network(destination, *net));
        }
        if self.deny_own_addresses && self.own_addresses.contains(ip) {
            return Err(Denied::OwnAddress(destination));
        }
        Ok(())
    }

    /// Checks the port of a CONNECT request against `acl.connect_ports`.
    pub fn check_connect_port(&self, port: u16) -> Result<(), Denied> {
        if self.connect_ports.iter().any(|r| r.contains(port)) {
            Ok(())
        } else {
            Err(Denied::ConnectPort(port))
        }
    }

    /// Checks the port of an absolute-form request against `acl.safe_ports`.
    pub fn check_safe_port(&self, port: u16) -> Result<(), Denied> {
        if self.safe_ports.iter().any(|r| r.contains(port)) {
            Ok(())
        } else {
            Err(Denied::SafePort(port))
        }
    }

    /// Checks the port of a converter's Connect TLV against `acl.convert_ports`.
    pub fn check_convert_port(&self, port: u16) -> Result<(), Denied> {
        if self.convert_ports.iter().any(|r| r.contains(port)) {
            Ok(())
        } else {
            Err(Denied::ConvertPort(port))
        }
    }
}

/// The addresses of this host's interfaces (in the current network namespace).
pub fn local_addresses() -> std::io::Result<Vec<IpAddr>> {
    Ok(crate::sockets::interface_addresses()?
        .into_iter()
        .map(|(_, ip)| ip)
        .collect())
}

/// How often the own-address list is re-read even without a netlink event (events can be lost when
/// the socket's buffer overflows).
pub const OWN_ADDRESS_REFRESH: Duration = Duration::from_secs(30);

/// Keeps `own` current on a thread of its own: re-reads the interface addresses on every rtnetlink
/// address event (RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR) and every [`OWN_ADDRESS_REFRESH`], so an
/// address added while the proxy runs is protected within milliseconds. The thread ends once `own` is
/// dropped.
pub fn watch_own_addresses(own: &Arc<OwnAddresses>) -> std::io::Result<()> {
    use mptcp_netlink::NetlinkSocket;
    const RTNLGRP_IPV4_IFADDR: u32 = 5;
    const RTNLGRP_IPV6_IFADDR: u32 = 9;
    let socket = NetlinkSocket::open(libc::NETLINK_ROUTE)?;
    socket.add_membership(RTNLGRP_IPV4_IFADDR)?;
    socket.add_membership(RTNLGRP_IPV6_IFADDR)?;
    // Wakes up now and then to notice that the proxy is gone.
    socket.set_recv_timeout(Duration::from_secs(1))?;
    let own: Weak<OwnAddresses> = Arc::downgrade(own);
    std::thread::Builder::new()
        .name("own-addresses".into())
        .spawn(move || {
            let mut last = std::time::Instant::now();
            loop {
                let event = match socket.recv() {
                    Ok(_) => true,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        false
                    }
                    // ENOBUFS: events were lost; re-read everything.
                    Err(_) => true,
                };
                let Some(own) = own.upgrade() else { return };
                if event || last.elapsed() >= OWN_ADDRESS_REFRESH {
                    last = std::time::Instant::now();
                    match local_addresses() {
                        Ok(addresses) => own.set(addresses),
                        Err(error) => tracing::warn!(%error, "cannot re-read local addresses"),
                    }
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AclConfig;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address literal")
    }

    fn default_acl() -> Acl {
        Acl::new(&AclConfig::default(), vec![ip("10.0.1.1"), ip("fd00:1::1")])
    }

    #[test]
    fn default_clients_are_loopback_and_private_only() {
        let acl = default_acl();
        for allowed in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.254",
            "192.168.1.1",
            "::1",
            "fd00::5",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(acl.check_client(ip(allowed)), Ok(()), "{allowed}");
        }
        for denied in ["8.8.8.8", "172.32.0.1", "100.64.0.1", "2001:db8::1"] {
            assert!(acl.check_client(ip(denied)).is_err(), "{denied}");
        }
    }

    #[test]
    fn default_destinations_deny_loopback_link_local_and_self() {
        let acl = default_acl();
        for denied in [
            "127.0.0.1",
            "127.9.9.9",
            "169.254.169.254",
            "::1",
            "fe80::1",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
            "10.0.1.1",
            "fd00:1::1",
        ] {
            assert!(acl.check_destination(ip(denied)).is_err(), "{denied}");
        }
        for allowed in ["10.0.3.2", "192.168.0.10", "93.184.216.34", "fd00:3::2"] {
            assert_eq!(acl.check_destination(ip(allowed)), Ok(()), "{allowed}");
        }
    }

    #[test]
    fn own_addresses_can_be_allowed() {
        let config = AclConfig {
            deny_own_addresses: false,
            ..AclConfig::default()
        };
        let acl = Acl::new(&config, vec![ip("10.0.1.1")]);
        assert_eq!(acl.check_destination(ip("10.0.1.1")), Ok(()));
    }

    #[test]
    fn connect_ports_default_to_443_only() {
        let acl = default_acl();
        assert_eq!(acl.check_connect_port(443), Ok(()));
        for port in [25, 22, 80, 8443] {
            assert_eq!(acl.check_connect_port(port), Err(Denied::ConnectPort(port)));
        }
        let config = AclConfig {
            connect_ports: vec![
                "443".parse().expect("port"),
                "8000-8999".parse().expect("range"),
            ],
            ..AclConfig::default()
        };
        let acl = Acl::new(&config, vec![]);
        assert_eq!(acl.check_connect_port(8443), Ok(()));
        assert_eq!(acl.check_connect_port(22), Err(Denied::ConnectPort(22)));
        let none = Acl::new(
            &AclConfig {
                connect_ports: vec![],
                ..AclConfig::default()
            },
            vec![],
        );
        assert_eq!(none.check_connect_port(443), Err(Denied::ConnectPort(443)));
    }

    #[test]
    fn absolute_form_ports_default_to_squids_safe_ports() {
        let acl = default_acl();
        for port in [80, 21, 443, 70, 210, 280, 488, 591, 777, 1025, 8080, 65535] {
            assert_eq!(acl.check_safe_port(port), Ok(()), "{port}");
        }
        for port in [25, 22, 23, 110, 143, 1024, 1] {
            assert_eq!(
                acl.check_safe_port(port),
                Err(Denied::SafePort(port)),
                "{port}"
            );
        }
    }

    #[test]
    fn cloud_metadata_is_denied_whatever_the_configuration() {
        let open = AclConfig {
            deny_destinations: vec![],
            deny_own_addresses: false,
            ..AclConfig::default()
        };
        let acl = Acl::new(&open, vec![]);
        for metadata in [
            "169.254.169.254",
            "fd00:ec2::254",
            "100.100.100.200",
            "::ffff:169.254.169.254",
        ] {
            assert_eq!(
                acl.check_destination(ip(metadata)),
                Err(Denied::Metadata(ip(metadata))),
                "{metadata}"
            );
        }
        assert_eq!(acl.check_destination(ip("169.254.169.253")), Ok(()));
    }

    #[test]
    fn denials_do_not_tell_the_client_the_address_or_network() {
        let acl = default_acl();
        for (destination, secret) in [
            ("127.0.0.1", "127.0.0.0/8"),
            ("10.0.1.1", "10.0.1.1"),
            ("169.254.169.254", "169.254"),
        ] {
            let denied = acl
                .check_destination(ip(destination))
                .expect_err(destination);
            let reason = denied.public_reason();
            assert!(
                !reason.contains(secret) && !reason.contains(destination),
                "{reason}"
            );
        }
    }

    #[test]
    fn own_addresses_are_refreshed() {
        let acl = Acl::with_listeners(
            &AclConfig::default(),
            vec![ip("10.0.1.1")],
            vec![ip("10.9.9.9")],
        );
        assert_eq!(acl.check_destination(ip("10.0.7.7")), Ok(()));
        acl.own_addresses().set([ip("10.0.1.1"), ip("10.0.7.7")]);
        assert_eq!(
            acl.check_destination(ip("10.0.7.7")),
            Err(Denied::OwnAddress(ip("10.0.7.7")))
        );
        // The listener addresses stay whatever the interfaces say.
        acl.own_addresses().set([]);
        assert!(acl.check_destination(ip("10.9.9.9")).is_err());
        assert_eq!(acl.check_destination(ip("10.0.7.7")), Ok(()));
    }

    #[test]
    fn local_addresses_include_loopback() {
        let addresses = local_addresses().expect("getifaddrs");
        assert!(addresses.contains(&ip("127.0.0.1")), "{addresses:?}");
    }
}
