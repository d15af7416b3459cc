//! `mptcp-detour` configuration (TOML). `deploy/examples/mptcp-detour.toml` documents every key; the
//! defaults here are the ones it shows.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::config::{duration, endpoint, optional_address, ConfigError, Validated};

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The key for NAT detours that name none (one line of at least 32 hex digits).
    #[serde(default)]
    pub psk_file: Option<PathBuf>,
    /// Detour subflows per connection (the thesis's N, 2 by default).
    #[serde(default = "default_max_detours")]
    pub max_detours: usize,
    /// How long to wait for a detour's answer before asking again.
    #[serde(default = "default_request_timeout", deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// How many times to ask one detour for one mapping.
    #[serde(default = "default_attempts")]
    pub request_attempts: u32,
    /// How long a mapping no connection uses is kept before it is released.
    #[serde(default = "default_linger", deserialize_with = "duration")]
    pub mapping_linger: Duration,
    /// Open subflows from the in-kernel path manager's `subflow` endpoints and to addresses the server
    /// announces, as the in-kernel path manager would (the userspace one replaces it), within the
    /// kernel's `ip mptcp limits`.
    #[serde(default = "yes")]
    pub kernel_paths: bool,
    /// NAT detours (thesis §4.1.2), oldest first.
    #[serde(default, rename = "nat_detour")]
    pub nat_detours: Vec<NatDetourConfig>,
    /// Tunnel detours (thesis §4.1.1: OpenVPN), oldest first; used before NAT detours.
    #[serde(default, rename = "tunnel_detour")]
    pub tunnel_detours: Vec<TunnelDetourConfig>,
    /// Which connections get detours.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Prometheus.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// One NAT detour host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatDetourConfig {
    /// `ADDR[:PORT]` of its `mptcp-detourd` (port 45672 by default).
    #[serde(deserialize_with = "endpoint")]
    pub address: SocketAddr,
    /// Its key, if not the top-level `psk_file`.
    #[serde(default)]
    pub psk_file: Option<PathBuf>,
    /// Protocol version: 2 (authenticated, the default) or 1 (the thesis's, for old detours).
    #[serde(default = "default_version")]
    pub version: u8,
}

/// One tunnel detour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelDetourConfig {
    /// The tunnel's interface (OpenVPN's `tun0`, WireGuard's `wg0`...); its IPv4 address is the
    /// subflow's source and the subflow is bound to it.
    pub interface: String,
    /// Clamp the MSS of SYNs leaving through the tunnel to this (for tunnels that, unlike OpenVPN's
    /// `mssfix`, do not clamp it themselves). Off by default.
    #[serde(default)]
    pub mss: Option<u16>,
}

/// Policy rules: the first that matches a connection's destination decides; `default_detour` otherwise.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Whether connections no rule matches get detours.
    #[serde(default = "yes")]
    pub default_detour: bool,
    /// The rules.
    #[serde(default, rename = "rule")]
    pub rules: Vec<PolicyRule>,
}

/// One rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// Destination networks (any, if empty).
    #[serde(default)]
    pub destinations: Vec<IpNet>,
    /// Destination ports (any, if empty).
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Whether matching connections get detours.
    pub detour: bool,
}

/// Metrics.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `/metrics`, `/healthz`, `/readyz` listener, or `"off"`.
    #[serde(
        default = "default_metrics_address",
        deserialize_with = "optional_address"
    )]
    pub address: Option<SocketAddr>,
}

fn yes() -> bool {
    true
}
fn default_max_detours() -> usize {
    2
}
fn default_request_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_attempts() -> u32 {
    3
}
fn default_linger() -> Duration {
    Duration::from_secs(60)
}
fn default_version() -> u8 {
    2
}
fn default_metrics_address() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9467)))
}

crate::defaults_from_serde!(PolicyConfig, MetricsConfig, ClientConfig);

impl PolicyConfig {
    /// Whether a connection to `remote` gets detours.
    pub fn selects(&self, remote: SocketAddr) -> bool {
        let ip: IpAddr = remote.ip().to_canonical();
        self.rules
            .iter()
            .find(|rule| {
                (rule.destinations.is_empty() || rule.destinations.iter().any(|n| n.contains(&ip)))
                    && (rule.ports.is_empty() || rule.ports.contains(&remote.port()))
            })
            .map_or(self.default_detour, |rule| rule.detour)
    }
}

impl ClientConfig {
    /// The key file of NAT detour `index`.
    pub fn key_file(&self, index: usize) -> Option<&PathBuf> {
        self.nat_detours[index]
            .psk_file
            .as_ref()
            .or(self.psk_file.as_ref())
    }
}

impl Validated for ClientConfig {
    /// Checks values that parse but cannot work.
    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::invalid(origin, &key, reason);
        if self.nat_detours.is_empty() && self.tunnel_detours.is_empty() {
            return Err(invalid(
                "nat_detour".into(),
                "no NAT or tunnel detour configured (--nat-detour, --tunnel-detour)".into(),
            ));
        }
        if self.max_detours == 0 {
            return Err(invalid("max_detours".into(), "must be at least 1".into()));
        }
        if self.request_attempts == 0 {
            return Err(invalid(
                "request_attempts".into(),
                "must be at least 1".into(),
            ));
        }
        if self.request_timeout < Duration::from_millis(10) {
            return Err(invalid("request_timeout".into(), "at least 10ms".into()));
        }
        for (i, detour) in self.nat_detours.iter().enumerate() {
            let key = |field: &str| format!("nat_detour[{i}].{field}");
            match detour.version {
                1 => {}
                2 if self.key_file(i).is_some() => {}
                2 => {
                    return Err(invalid(
                        key("psk_file"),
                        format!(
                        "{}: version 2 needs a key (psk_file here or at the top, or --psk-file)",
                        detour.address
                    ),
                    ))
                }
                other => {
                    return Err(invalid(
                        key("version"),
                        format!("{other}: versions are 1 and 2"),
                    ))
                }
            }
            if !detour.address.is_ipv4() {
                return Err(invalid(
                    key("address"),
                    format!("{}: NAT detours are IPv4", detour.address),
                ));
            }
            if detour.address.port() == 0 {
                return Err(invalid(key("address"), "port 0".into()));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, tunnel) in self.tunnel_detours.iter().enumerate() {
            let name = &tunnel.interface;
            if name.is_empty()
                || name.len() >= libc::IFNAMSIZ
                || name.contains(['/', ':', '\0'])
                || name.contains(char::is_whitespace)
            {
                return Err(invalid(
                    format!("tunnel_detour[{i}].interface"),
                    format!("{name:?} is not an interface name"),
                ));
            }
            if !names.insert(name) {
                return Err(invalid(
                    format!("tunnel_detour[{i}].interface"),
                    format!("{name} is listed twice"),
                ));
            }
            if matches!(tunnel.mss, Some(mss) if !(536..=9000).contains(&mss)) {
                return Err(invalid(
                    format!("tunnel_detour[{i}].mss"),
                    "between 536 and 9000".into(),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_rule_decides() {
        let config = ClientConfig::from_toml(
            r#"
            psk_file = "/k"
            [[nat_detour]]
            address = "10.1.6.2"
            [policy]
            default_detour = false
            [[policy.rule]]
            destinations = ["10.1.3.0/24"]
            ports = [22]
            detour = false
            [[policy.rule]]
            destinations = ["10.1.0.0/16"]
            detour = true
            "#,
            "test",
        )
        .unwrap();
        let policy = &config.policy;
        assert!(!policy.selects("10.1.3.2:22".parse().unwrap()));
        assert!(policy.selects("10.1.3.2:80".parse().unwrap()));
        assert!(policy.selects("[::ffff:10.1.3.2]:80".parse().unwrap()));
        assert!(!policy.selects("192.0.2.1:80".parse().unwrap()));
        assert_eq!(
            config.nat_detours[0].address,
            "10.1.6.2:45672".parse().unwrap()
        );
        assert!(PolicyConfig::default().selects("192.0.2.1:1".parse().unwrap()));
    }
}
