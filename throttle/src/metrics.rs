//! Metrics hooks: a histogram of rule-install latency (event sent to the owner task →
//! nftables batch acked), shareable between the owner task and an exporter.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::core::Change;
use crate::driver::ThrottleHooks;
use crate::kernel::KernelError;

/// Upper bounds of the histogram buckets, in microseconds.
pub const LATENCY_BUCKETS_MICROS: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// A point-in-time copy of the histogram.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Count per bucket of [`LATENCY_BUCKETS_MICROS`] (not cumulative).
    pub buckets: [u64; LATENCY_BUCKETS_MICROS.len()],
    /// Observations above the last bucket.
    pub overflow: u64,
    /// Number of observations.
    pub count: u64,
    /// Sum of all observations.
    pub sum: Duration,
    /// Changes that failed.
    pub failed_changes: u64,
}

/// Rule-install latency histogram; clone it, pass one clone to
/// [`crate::run_with_hooks`], read the other with [`Self::snapshot`].
#[derive(Debug, Clone, Default)]
pub struct InstallLatencyHistogram {
    inner: Arc<Mutex<LatencySnapshot>>,
}

impl InstallLatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one latency.
    pub fn observe(&self, latency: Duration) {
        let mut data = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        match LATENCY_BUCKETS_MICROS
            .iter()
            .position(|upper| micros <= *upper)
        {
            Some(i) => data.buckets[i] += 1,
            None => data.overflow += 1,
        }
        data.count += 1;
        data.sum += latency;
    }

    /// A copy of the current counts.
    pub fn snapshot(&self) -> LatencySnapshot {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ThrottleHooks for InstallLatencyHistogram {
    fn rule_installed(&mut self, latency: Duration) {
        self.observe(latency);
    }

    fn change_failed(&mut self, _change: &Change, _error: &KernelError) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failed_changes += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket() {
        let histogram = InstallLatencyHistogram::new();
        let reader = histogram.clone();
        histogram.observe(Duration::from_micros(80));
        histogram.observe(Duration::from_micros(100));
        histogram.observe(Duration::from_micros(700));
        histogram.observe(Duration::from_secs(3));
        let snap = reader.snapshot();
        assert_eq!(snap.buckets[0], 2);
        assert_eq!(snap.buckets[3], 1);
        assert_eq!(snap.overflow, 1);
        assert_eq!(snap.count, 4);
        assert_eq!(snap.sum, Duration::from_micros(3_000_880));
    }
}
