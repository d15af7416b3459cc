//! Access control: which clients may use the proxy and which destinations it may reach.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::AclConfig;

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
}

/// The compiled access-control lists.
#[derive(Debug, Clone)]
pub struct Acl {
    allow_clients: Vec<IpNet>,
    deny_destinations: Vec<IpNet>,
    own_addresses: Vec<IpAddr>,
    connect_ports: Vec<u16>,
}

/// IPv4-mapped IPv6 addresses are checked as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl Acl {
    /// Builds the lists; `own_addresses` are the host's interface addresses (used when
    /// `deny_own_addresses` is set).
    pub fn new(config: &AclConfig, own_addresses: Vec<IpAddr>) -> Self {
        Self {
            allow_clients: config.allow_clients.clone(),
            deny_destinations: config.deny_destinations.clone(),
            own_addresses: if config.deny_own_addresses {
                own_addresses.into_iter().map(canonical).collect()
            } else {
                Vec::new()
            },
            connect_ports: config.connect_ports.clone(),
        }
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
        if let Some(net) = self.deny_destinations.iter().find(|net| net.contains(&ip)) {
            return Err(Denied::Network(destination, *net));
        }
        if self.own_addresses.contains(&ip) {
            return Err(Denied::OwnAddress(destination));
        }
        Ok(())
    }

    /// Checks the port of a CONNECT request.
    pub fn check_connect_port(&self, port: u16) -> Result<(), Denied> {
        if self.connect_ports.is_empty() || self.connect_ports.contains(&port) {
            Ok(())
        } else {
            Err(Denied::ConnectPort(port))
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
    fn connect_ports() {
        let acl = default_acl();
        assert_eq!(acl.check_connect_port(25), Ok(()));
        let config = AclConfig {
            connect_ports: vec![443],
            ..AclConfig::default()
        };
        let acl = Acl::new(&config, vec![]);
        assert_eq!(acl.check_connect_port(443), Ok(()));
        assert_eq!(acl.check_connect_port(22), Err(Denied::ConnectPort(22)));
    }

    #[test]
    fn local_addresses_include_loopback() {
        let addresses = local_addresses().expect("getifaddrs");
        assert!(addresses.contains(&ip("127.0.0.1")), "{addresses:?}");
    }
}
