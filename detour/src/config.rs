//! What both daemons' configurations share: durations, key files, listen addresses, the error type.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML for this schema (unknown keys included).
    #[error("{origin}: {source}")]
    Parse {
        /// The file (or `command line`).
        origin: String,
        /// The TOML error, with the key and position.
        source: Box<toml::de::Error>,
    },
    /// A value that parses but cannot work.
    #[error("{origin}: {key}: {reason}")]
    Invalid {
        /// The file (or `command line`).
        origin: String,
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// A key file is unusable.
    #[error(transparent)]
    Key(#[from] crate::key::KeyError),
}

impl ConfigError {
    /// A value error.
    pub fn invalid(origin: &str, key: &str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }
}

/// A configuration schema: parsed with serde (`deny_unknown_fields`), then checked for values that parse
/// but cannot work.
pub trait Validated: serde::de::DeserializeOwned {
    /// Checks the values; `origin` names the file in errors.
    fn validate(&self, origin: &str) -> Result<(), ConfigError>;

    /// Parses and validates TOML text.
    fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Self = parse_toml(text, origin)?;
        config.validate(origin)?;
        Ok(config)
    }
}

/// `Default` from the serde defaults (what an empty table parses to), so each default is written once.
#[macro_export]
macro_rules! defaults_from_serde {
    ($($schema:ty),* $(,)?) => {
        $(impl Default for $schema {
            fn default() -> Self {
                $crate::config::parse_toml("", "defaults").expect("the defaults parse")
            }
        })*
    };
}

/// Reads a TOML file into `T`.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(&text, &path.display().to_string())
}

/// Parses TOML text into `T`; `origin` names it in errors.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        origin: origin.to_owned(),
        source: Box::new(source),
    })
}

/// serde: a duration such as `250ms`, `10s`, `5m` or `1h` (the proxy's format).
pub fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    mptcp_proxy::config::parse_duration(&text).map_err(serde::de::Error::custom)
}

/// `ADDR`, `ADDR:PORT` or `[V6]:PORT`; `default_port` when the port is missing.
pub fn parse_endpoint(text: &str, default_port: u16) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    text.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, default_port))
        .map_err(|_| format!("{text:?} is not ADDR or ADDR:PORT"))
}

/// serde: an endpoint with the detour protocol's default port.
pub fn endpoint<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_endpoint(&text, crate::wire::DEFAULT_PORT).map_err(serde::de::Error::custom)
}

/// serde: a list of endpoints with the detour protocol's default port.
pub fn endpoints<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<SocketAddr>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| parse_endpoint(text, crate::wire::DEFAULT_PORT))
        .collect::<Result<_, _>>()
        .map_err(serde::de::Error::custom)
}

/// serde: `"off"` or an `ADDR:PORT`.
pub fn optional_address<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text == "off" {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|e| {
        serde::de::Error::custom(format!("{text:?}: {e} (expected ADDR:PORT or \"off\")"))
    })
}

/// The Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_take_the_default_port() {
        assert_eq!(
            parse_endpoint("10.0.0.1", 45672),
            Ok("10.0.0.1:45672".parse().unwrap())
        );
        assert_eq!(
            parse_endpoint("10.0.0.1:9", 45672),
            Ok("10.0.0.1:9".parse().unwrap())
        );
        assert_eq!(
            parse_endpoint("[fd00::1]", 45672),
            Ok("[fd00::1]:45672".parse().unwrap())
        );
        assert!(parse_endpoint("example.org", 1).is_err());
    }
}
