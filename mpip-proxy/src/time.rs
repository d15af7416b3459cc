//! Time values passed into the sans-IO cores.
//!
//! No core reads a clock: every `handle_*` and `poll_*` call takes the current
//! [`Timestamp`] from the caller, so tests drive a simulated clock.

use std::ops::{Add, AddAssign};
use std::time::Duration;

/// A point in time, in microseconds since an arbitrary epoch chosen by the caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The epoch.
    pub const ZERO: Timestamp = Timestamp(0);

    /// A timestamp `micros` microseconds after the epoch.
    pub const fn from_micros(micros: u64) -> Self {
        Timestamp(micros)
    }

    /// A timestamp `millis` milliseconds after the epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Timestamp(millis * 1000)
    }

    /// A timestamp `secs` seconds after the epoch.
    pub const fn from_secs(secs: u64) -> Self {
        Timestamp(secs * 1_000_000)
    }

    /// Microseconds since the epoch.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// The low 32 bits of the microsecond count: the CM block's Packet Timestamp.
    pub const fn to_wire(self) -> u32 {
        self.0 as u32
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;

    fn add(self, rhs: Duration) -> Timestamp {
        let micros = u64::try_from(rhs.as_micros()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(micros))
    }
}

impl AddAssign<Duration> for Timestamp {
    fn add_assign(&mut self, rhs: Duration) {
        *self = *self + rhs;
    }
}

/// One-way delay sample in microseconds computed from a received Packet Timestamp.
///
/// The clocks of the two nodes are not synchronised, so the value carries an
/// unknown constant offset and may be negative; only differences between paths
/// and samples are meaningful (§III-D2 of the paper).
pub fn one_way_delay_sample(sent_wire: u32, received: Timestamp) -> i32 {
    received.to_wire().wrapping_sub(sent_wire) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_sample_survives_wraparound() {
        let sent = Timestamp::from_micros(u64::from(u32::MAX) - 10);
        let received = sent + Duration::from_micros(25);
        assert_eq!(one_way_delay_sample(sent.to_wire(), received), 25);
    }

    #[test]
    fn delay_sample_is_negative_for_clock_offset() {
        let received = Timestamp::from_micros(1_000);
        assert_eq!(one_way_delay_sample(1_500, received), -500);
    }

    #[test]
    fn saturating_since_never_underflows() {
        let a = Timestamp::from_millis(5);
        let b = Timestamp::from_millis(7);
        assert_eq!(b.saturating_since(a), Duration::from_millis(2));
        assert_eq!(a.saturating_since(b), Duration::ZERO);
    }
}
