//! Userspace fallback: per-client byte-rate limits for relay loops, for
//! deployments where tc/nftables cannot be used.

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::DefaultClock;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::rate::{Rate, Size};

/// Why a limiter could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimiterError {
    /// The rate is below one byte per second.
    #[error("rate {0} is below 1 byte per second")]
    RateTooLow(Rate),
    /// The burst must be 1 ..= 2^32-1 bytes.
    #[error("burst {0} must be between 1 byte and 4 GiB")]
    BadBurst(Size),
}

/// Limits the bytes per second relayed for each client address.
///
/// ```no_run
/// # async fn relay(limiter: &mptcp_throttle::ClientRateLimiter, client: std::net::IpAddr, chunk: &[u8]) {
/// limiter.until_ready(client, chunk.len() as u32).await;
/// // ... write `chunk` to the client ...
/// # }
/// ```
#[derive(Debug)]
pub struct ClientRateLimiter {
    limiter: RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock>,
    burst: NonZeroU32,
}

impl ClientRateLimiter {
    /// A limiter of `rate` per client, allowing `burst` bytes at once
    /// (default: one tenth of a second at `rate`, at least 64 KiB so one
    /// relay buffer always fits).
    pub fn new(rate: Rate, burst: Option<Size>) -> Result<Self, LimiterError> {
        let bytes_per_second = u32::try_from(rate.bytes_per_second()).unwrap_or(u32::MAX);
        let per_second = NonZeroU32::new(bytes_per_second).ok_or(LimiterError::RateTooLow(rate))?;
        let burst_bytes = match burst {
            Some(size) => u32::try_from(size.bytes())
                .ok()
                .and_then(NonZeroU32::new)
                .ok_or(LimiterError::BadBurst(size))?,
            None => NonZeroU32::new((bytes_per_second / 10).max(64 * 1024)).expect("non-zero"),
        };
        let quota = Quota::per_second(per_second).allow_burst(burst_bytes);
        Ok(Self {
            limiter: RateLimiter::keyed(quota),
            burst: burst_bytes,
        })
    }

    /// Waits until `client` may be sent `bytes` more bytes. Requests larger
    /// than the burst are split, so any size is accepted.
    pub async fn until_ready(&self, client: IpAddr, bytes: u32) {
        let mut left = bytes;
        while left > 0 {
            let chunk = left.min(self.burst.get());
            let n = NonZeroU32::new(chunk).expect("chunk > 0");
            // Cannot fail: chunk <= burst.
            let _ = self.limiter.until_key_n_ready(&client, n).await;
            left -= chunk;
        }
    }

    /// Whether `bytes` may be sent to `client` right now (consumes them if so).
    pub fn try_consume(&self, client: IpAddr, bytes: u32) -> bool {
        match NonZeroU32::new(bytes) {
            None => true,
            Some(n) => matches!(self.limiter.check_key_n(&client, n), Ok(Ok(()))),
        }
    }

    /// Drops state of clients that are back at full allowance.
    pub fn forget_idle_clients(&self) {
        self.limiter.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_enforced_per_client() {
        let rate: Rate = "8mbit".parse().unwrap(); // 1 MB/s
        let limiter = ClientRateLimiter::new(rate, Some(Size::from_bytes(100_000))).unwrap();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(limiter.try_consume(a, 100_000));
        assert!(!limiter.try_consume(a, 50_000));
        assert!(limiter.try_consume(b, 100_000));
    }

    #[test]
    fn too_low_rate_is_rejected() {
        let rate = Rate::from_bits_per_second(4);
        assert_eq!(
            ClientRateLimiter::new(rate, None).unwrap_err(),
            LimiterError::RateTooLow(rate)
        );
    }
}
