//! Rates and sizes written in `tc` units.
//!
//! The suffixes follow iproute2's `get_rate64` and `get_size` (tc-util.c) so an
//! operator can copy values from `tc` command lines: rates are bits per second
//! unless the suffix ends in `bps` (bytes per second, case-insensitive, so
//! `10mbps` is 80 Mbit/s); sizes are bytes, with binary (1024) multipliers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// Why a rate or size string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitParseError {
    /// The string is empty or does not start with a number.
    #[error("{input:?} does not start with a number")]
    NotANumber {
        /// The rejected text.
        input: String,
    },
    /// The suffix is not one `tc` knows.
    #[error("{input:?} has unknown unit {unit:?} (expected e.g. bit, kbit, mbit, gbit, bps, kbps, mbps)")]
    UnknownUnit {
        /// The rejected text.
        input: String,
        /// The suffix that was not recognised.
        unit: String,
    },
    /// The value is zero, negative or does not fit 64 bits.
    #[error("{input:?} is out of range (must be > 0 and fit in 64 bits)")]
    OutOfRange {
        /// The rejected text.
        input: String,
    },
}

/// A rate in bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate {
    bits_per_second: u64,
}

impl Rate {
    /// A rate of `bits_per_second` bits per second.
    pub const fn from_bits_per_second(bits_per_second: u64) -> Self {
        Self { bits_per_second }
    }

    /// The rate in bits per second.
    pub const fn bits_per_second(self) -> u64 {
        self.bits_per_second
    }

    /// The rate in bytes per second (what the kernel's `tc_ratespec` and
    /// `TCA_HTB_RATE64` carry), rounded down.
    pub const fn bytes_per_second(self) -> u64 {
        self.bits_per_second / 8
    }
}

// Suffix table of iproute2 get_rate64(): scale to bits per second.
const RATE_UNITS: &[(&str, f64)] = &[
    ("", 1.0),
    ("bit", 1.0),
    ("kibit", 1024.0),
    ("kbit", 1000.0),
    ("mibit", 1024.0 * 1024.0),
    ("mbit", 1_000_000.0),
    ("gibit", 1024.0 * 1024.0 * 1024.0),
    ("gbit", 1_000_000_000.0),
    ("tibit", 1024.0 * 1024.0 * 1024.0 * 1024.0),
    ("tbit", 1_000_000_000_000.0),
    ("bps", 8.0),
    ("kibps", 8.0 * 1024.0),
    ("kbps", 8000.0),
    ("mibps", 8.0 * 1024.0 * 1024.0),
    ("mbps", 8_000_000.0),
    ("gibps", 8.0 * 1024.0 * 1024.0 * 1024.0),
    ("gbps", 8_000_000_000.0),
    ("tibps", 8.0 * 1024.0 * 1024.0 * 1024.0 * 1024.0),
    ("tbps", 8_000_000_000_000.0),
];

// Suffix table of iproute2 get_size(): scale to bytes.
const SIZE_UNITS: &[(&str, f64)] = &[
    ("", 1.0),
    ("b", 1.0),
    ("kbit", 1024.0 / 8.0),
    ("k", 1024.0),
    ("kb", 1024.0),
    ("mbit", 1024.0 * 1024.0 / 8.0),
    ("m", 1024.0 * 1024.0),
    ("mb", 1024.0 * 1024.0),
    ("gbit", 1024.0 * 1024.0 * 1024.0 / 8.0),
    ("g", 1024.0 * 1024.0 * 1024.0),
    ("gb", 1024.0 * 1024.0 * 1024.0),
];

fn parse_scaled(input: &str, units: &[(&str, f64)]) -> Result<u64, UnitParseError> {
    let text = input.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| UnitParseError::NotANumber {
        input: input.to_owned(),
    })?;
    let unit_lower = unit.trim().to_ascii_lowercase();
    let scale = units
        .iter()
        .find(|(name, _)| *name == unit_lower)
        .map(|(_, scale)| *scale)
        .ok_or_else(|| UnitParseError::UnknownUnit {
            input: input.to_owned(),
            unit: unit.to_owned(),
        })?;
    let scaled = (value * scale).round();
    if !(scaled >= 1.0 && scaled < u64::MAX as f64) {
        return Err(UnitParseError::OutOfRange {
            input: input.to_owned(),
        });
    }
    Ok(scaled as u64)
}

impl FromStr for Rate {
    type Err = UnitParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_scaled(s, RATE_UNITS).map(Self::from_bits_per_second)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = self.bits_per_second;
        for (unit, scale) in [("gbit", 1_000_000_000), ("mbit", 1_000_000), ("kbit", 1000)] {
            if bits >= scale && bits % scale == 0 {
                return write!(f, "{}{unit}", bits / scale);
            }
        }
        write!(f, "{bits}bit")
    }
}

/// A size in bytes (HTB burst and cburst).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Size {
    bytes: u64,
}

impl Size {
    /// A size of `bytes` bytes.
    pub const fn from_bytes(bytes: u64) -> Self {
        Self { bytes }
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.bytes
    }
}

impl FromStr for Size {
    type Err = UnitParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_scaled(s, SIZE_UNITS).map(Self::from_bytes)
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}b", self.bytes)
    }
}

/// Accepts either a string with a unit or a plain integer (bits per second).
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match NumberOrText::deserialize(deserializer)? {
            NumberOrText::Number(0) => Err(serde::de::Error::custom("rate must be > 0")),
            NumberOrText::Number(n) => Ok(Rate::from_bits_per_second(n)),
            NumberOrText::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match NumberOrText::deserialize(deserializer)? {
            NumberOrText::Number(0) => Err(serde::de::Error::custom("size must be > 0")),
            NumberOrText::Number(n) => Ok(Size::from_bytes(n)),
            NumberOrText::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_follow_tc_units() {
        let cases = [
            ("20mbit", 20_000_000),
            ("1gbit", 1_000_000_000),
            ("500kbit", 500_000),
            ("10mbps", 80_000_000),
            ("10MBps", 80_000_000),
            ("1200", 1200),
            ("1.5mbit", 1_500_000),
            ("1kibit", 1024),
            ("100bps", 800),
        ];
        for (text, bits) in cases {
            let rate: Rate = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(rate.bits_per_second(), bits, "{text}");
        }
    }

    #[test]
    fn bad_rates_are_rejected() {
        assert!(matches!(
            "20mbits".parse::<Rate>(),
            Err(UnitParseError::UnknownUnit { .. })
        ));
        assert!(matches!(
            "fast".parse::<Rate>(),
            Err(UnitParseError::NotANumber { .. })
        ));
        assert!(matches!(
            "0mbit".parse::<Rate>(),
            Err(UnitParseError::OutOfRange { .. })
        ));
    }

    #[test]
    fn sizes_follow_tc_units() {
        assert_eq!("15k".parse::<Size>().unwrap().bytes(), 15 * 1024);
        assert_eq!("1600".parse::<Size>().unwrap().bytes(), 1600);
        assert_eq!("1mb".parse::<Size>().unwrap().bytes(), 1024 * 1024);
        assert_eq!("8kbit".parse::<Size>().unwrap().bytes(), 1024);
    }

    #[test]
    fn display_round_trips() {
        for text in ["20mbit", "1gbit", "1234bit", "500kbit"] {
            let rate: Rate = text.parse().unwrap();
            assert_eq!(rate.to_string(), text);
            assert_eq!(rate.to_string().parse::<Rate>().unwrap(), rate);
        }
    }
}
