//! The user-defined multipath routing table (Table IV, §III-E2, `PROTOCOL.md` §8.4).
//!
//! Configuration types only; reading the file is the caller's business. In TOML:
//!
//! ```toml
//! default = "throughput-first"
//!
//! [[rule]]
//! port = 22
//! protocol = "tcp"
//! end_size = 200
//! priority = "responsiveness-first"
//! ```

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::packet::InnerPacket;
use crate::table::session::Protocol;

/// Routing priority of a class of packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Priority {
    /// `R_f`: send on the lowest-delay path (single-path mode).
    ResponsivenessFirst,
    /// `T_f`: spread over all paths by weight (all-paths mode).
    #[default]
    ThroughputFirst,
    /// Our extension: copy onto every live path (protected-path mode).
    Protected,
}

/// One row of Table IV. A field left out matches anything (`*` in the paper).
///
/// `ip` and `port` name the session's far end, so one rule covers both
/// directions: they match a packet whose destination *or* source is that
/// address or port (a client sends to the server's port; the proxy end sends
/// back from it).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingRule {
    /// Destination IP address.
    #[serde(default)]
    pub ip: Option<IpAddr>,
    /// Destination port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Option<Protocol>,
    /// Smallest matching inner packet length in bytes (inclusive).
    #[serde(default)]
    pub start_size: usize,
    /// Matching inner packet lengths are below this (exclusive); none = no limit.
    #[serde(default)]
    pub end_size: Option<usize>,
    /// Priority of matching packets.
    #[serde(default)]
    pub priority: Priority,
    /// Coordinated routing (Fig. 9): pins matching sessions to the path that
    /// leaves from this local interface while it is live.
    #[serde(default)]
    pub path: Option<String>,
    /// Selected-paths: with throughput-first, spreads matching packets by
    /// weight over the paths leaving these local interfaces only.
    #[serde(default)]
    pub paths: Vec<String>,
}

/// What a rule is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketClass {
    /// Source IP address.
    pub source: IpAddr,
    /// Destination IP address.
    pub destination: IpAddr,
    /// Source port, if the protocol has ports.
    pub source_port: Option<u16>,
    /// Destination port, if the protocol has ports.
    pub port: Option<u16>,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Inner packet length.
    pub length: usize,
}

impl From<&InnerPacket> for PacketClass {
    fn from(packet: &InnerPacket) -> Self {
        PacketClass {
            source: packet.source,
            destination: packet.destination,
            source_port: packet.source_port,
            port: packet.destination_port,
            protocol: packet.protocol,
            length: packet.total_len,
        }
    }
}

impl RoutingRule {
    /// Whether the rule matches `class`.
    pub fn matches(&self, class: &PacketClass) -> bool {
        self.ip
            .is_none_or(|ip| ip == class.destination || ip == class.source)
            && self
                .port
                .is_none_or(|port| Some(port) == class.port || Some(port) == class.source_port)
            && self.protocol.is_none_or(|p| p == class.protocol)
            && class.length >= self.start_size
            && self.end_size.is_none_or(|end| class.length < end)
    }
}

/// Errors in a routing table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutingError {
    /// A rule's size range is empty.
    #[error("rule {index}: start_size {start} is not below end_size {end}")]
    EmptySizeRange {
        /// Index of the rule.
        index: usize,
        /// Its start size.
        start: usize,
        /// Its end size.
        end: usize,
    },
}

/// Table IV: rules in order, first match wins.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingTable {
    /// Priority of packets no rule matches.
    #[serde(default)]
    pub default: Priority,
    /// The rules.
    #[serde(default, rename = "rule")]
    pub rules: Vec<RoutingRule>,
}

impl RoutingTable {
    /// Checks every rule.
    pub fn validate(&self) -> Result<(), RoutingError> {
        for (index, rule) in self.rules.iter().enumerate() {
            if let Some(end) = rule.end_size {
                if rule.start_size >= end {
                    return Err(RoutingError::EmptySizeRange {
                        index,
                        start: rule.start_size,
                        end,
                    });
                }
            }
        }
        Ok(())
    }

    /// The priority of `class`: the first matching rule's, else the default.
    pub fn classify(&self, class: &PacketClass) -> Priority {
        self.rule_for(class)
            .map_or(self.default, |rule| rule.priority)
    }

    /// The first rule matching `class`.
    pub fn rule_for(&self, class: &PacketClass) -> Option<&RoutingRule> {
        self.rules.iter().find(|rule| rule.matches(class))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Table IV of the paper.
    const TABLE_IV: &str = r#"
        default = "throughput-first"

        [[rule]]
        port = 22
        protocol = "tcp"
        start_size = 0
        end_size = 200
        priority = "responsiveness-first"

        [[rule]]
        ip = "192.168.1.2"
        port = 5222
        protocol = "udp"
        start_size = 200
        priority = "throughput-first"

        [[rule]]
        ip = "192.168.1.2"
        port = 5221
        protocol = "udp"
        end_size = 500
        priority = "responsiveness-first"
    "#;

    fn class(ip: &str, port: u16, protocol: Protocol, length: usize) -> PacketClass {
        PacketClass {
            source: "10.200.0.2".parse().unwrap(),
            destination: ip.parse().unwrap(),
            source_port: Some(40000),
            port: Some(port),
            protocol,
            length,
        }
    }

    #[test]
    fn table_iv_classifies_as_in_the_paper() {
        let table: RoutingTable = toml::from_str(TABLE_IV).unwrap();
        table.validate().unwrap();
        assert_eq!(table.rules.len(), 3);
        let ssh_small = class("203.0.113.7", 22, Protocol::Tcp, 120);
        let ssh_big = class("203.0.113.7", 22, Protocol::Tcp, 1400);
        let video = class("192.168.1.2", 5222, Protocol::Udp, 1200);
        let audio = class("192.168.1.2", 5221, Protocol::Udp, 300);
        let audio_big = class("192.168.1.2", 5221, Protocol::Udp, 800);
        assert_eq!(table.classify(&ssh_small), Priority::ResponsivenessFirst);
        assert_eq!(table.classify(&ssh_big), Priority::ThroughputFirst);
        assert_eq!(table.classify(&video), Priority::ThroughputFirst);
        assert_eq!(table.classify(&audio), Priority::ResponsivenessFirst);
        assert_eq!(table.classify(&audio_big), table.default);
    }

    #[test]
    fn boundaries_are_start_inclusive_end_exclusive() {
        let rule = RoutingRule {
            start_size: 200,
            end_size: Some(500),
            priority: Priority::Protected,
            ..RoutingRule::default()
        };
        let at = |len| rule.matches(&class("192.0.2.1", 1, Protocol::Udp, len));
        assert!(!at(199));
        assert!(at(200));
        assert!(at(499));
        assert!(!at(500));
    }

    #[test]
    fn unknown_fields_and_empty_ranges_are_rejected() {
        let typo = "[[rule]]\nprot = 22\npriority = \"protected\"\n";
        assert!(toml::from_str::<RoutingTable>(typo).is_err());
        let bad_priority = "[[rule]]\npriority = \"fastest\"\n";
        assert!(toml::from_str::<RoutingTable>(bad_priority).is_err());
        let empty: RoutingTable = toml::from_str(
            "[[rule]]\nstart_size = 500\nend_size = 200\npriority = \"protected\"\n",
        )
        .unwrap();
        assert_eq!(
            empty.validate(),
            Err(RoutingError::EmptySizeRange {
                index: 0,
                start: 500,
                end: 200
            })
        );
    }

    #[test]
    fn json_round_trip() {
        let table: RoutingTable = toml::from_str(TABLE_IV).unwrap();
        let json = serde_json::to_string(&table).unwrap();
        assert_eq!(serde_json::from_str::<RoutingTable>(&json).unwrap(), table);
    }

    #[test]
    fn a_rule_matches_both_directions_and_may_pin_a_path() {
        let table: RoutingTable =
            toml::from_str("[[rule]]\nport = 8080\nprotocol = \"tcp\"\npath = \"c2\"\n").unwrap();
        let request = class("10.0.3.2", 8080, Protocol::Tcp, 60);
        let reply = PacketClass {
            source: request.destination,
            destination: request.source,
            source_port: request.port,
            port: request.source_port,
            ..request
        };
        let rule = table.rule_for(&request).unwrap();
        assert_eq!(rule.path.as_deref(), Some("c2"));
        assert_eq!(rule.priority, Priority::ThroughputFirst);
        assert_eq!(table.rule_for(&reply), Some(rule));
        assert_eq!(
            table.rule_for(&class("10.0.3.2", 80, Protocol::Tcp, 60)),
            None
        );
    }
}
