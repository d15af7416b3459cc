//! TCP re-sequencing buffer for one session (§IV-B, `PROTOCOL.md` §9).
//!
//! Segments ahead of the next expected sequence number `S` wait in the buffer;
//! the segment at `S` releases every consecutive buffered segment. The buffer
//! holds at most `capacity` segments (100 in the paper) and is flushed in order
//! when full, or when its oldest segment has waited `timeout`, so one lost
//! segment cannot block the session. Sans-IO: `handle_*` in, `poll_*` out.

use std::collections::VecDeque;
use std::time::Duration;

use crate::time::Timestamp;

/// Re-sequencer parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResequencerConfig {
    /// Most segments held (the paper uses 100).
    pub capacity: usize,
    /// Longest time a segment waits for a missing predecessor, when the
    /// paths' delays are alike; the node adds the spread of the paths'
    /// one-way delays ([`Resequencer::set_timeout`]).
    pub timeout: Duration,
    /// The timeout never grows beyond this.
    pub max_timeout: Duration,
}

impl Default for ResequencerConfig {
    fn default() -> Self {
        ResequencerConfig {
            capacity: 100,
            timeout: Duration::from_millis(50),
            max_timeout: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone)]
struct Held<T> {
    sequence: u32,
    len: u32,
    arrived: Timestamp,
    packet: T,
}

/// Counters of what the re-sequencer did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResequencerStats {
    /// Segments delivered at once, in order.
    pub in_order: u64,
    /// Segments that waited in the buffer.
    pub buffered: u64,
    /// Flushes because the buffer was full.
    pub full_flushes: u64,
    /// Flushes because the oldest segment timed out.
    pub timeout_flushes: u64,
    /// Later copies of a held sequence number, dropped (the held copy goes up).
    pub duplicates: u64,
}

/// The re-sequencing buffer of one TCP session; `T` is the packet type.
#[derive(Debug, Clone)]
pub struct Resequencer<T> {
    config: ResequencerConfig,
    timeout: Duration,
    next: Option<u32>,
    held: Vec<Held<T>>,
    ready: VecDeque<T>,
    stats: ResequencerStats,
}

/// `a` is before `b` in TCP sequence space.
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

impl<T> Resequencer<T> {
    /// An empty buffer.
    pub fn new(config: ResequencerConfig) -> Self {
        Resequencer {
            timeout: config.timeout,
            config,
            next: None,
            held: Vec::new(),
            ready: VecDeque::new(),
            stats: ResequencerStats::default(),
        }
    }

    /// The next in-order sequence number expected (`S`, the "Next Sequence No" of Table II).
    pub fn next_sequence(&self) -> Option<u32> {
        self.next
    }

    /// Sets the next expected sequence number, e.g. from the SYN or SYN-ACK seen
    /// at session set-up, so segments reordered ahead of the very first data
    /// segment are held too. Without it the first segment received sets `S`.
    pub fn expect(&mut self, next: u32) {
        self.next = Some(next);
        self.release_consecutive();
    }

    /// Segments waiting.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// What happened so far.
    pub fn stats(&self) -> ResequencerStats {
        self.stats
    }

    /// Handles a received segment starting at `sequence` and occupying `len`
    /// sequence numbers (payload plus SYN and FIN). Zero-length segments (pure
    /// ACKs) and old segments (retransmissions) pass at once; a second copy of a
    /// segment already held is dropped.
    pub fn handle_segment(&mut self, now: Timestamp, sequence: u32, len: u32, packet: T) {
        let Some(next) = self.next else {
            self.next = Some(sequence.wrapping_add(len));
            self.deliver(packet);
            return;
        };
        if len == 0 || before(sequence, next) {
            self.deliver(packet);
            return;
        }
        if sequence == next {
            self.next = Some(next.wrapping_add(len));
            self.deliver(packet);
            self.release_consecutive();
            return;
        }
        if self.held.iter().any(|h| h.sequence == sequence) {
            self.stats.duplicates += 1;
            return;
        }
        let position = self
            .held
            .iter()
            .position(|h| before(sequence, h.sequence))
            .unwrap_or(self.held.len());
        self.held.insert(
            position,
            Held {
                sequence,
                len,
                arrived: now,
                packet,
            },
        );
        self.stats.buffered += 1;
        if self.held.len() >= self.config.capacity {
            self.stats.full_flushes += 1;
            self.flush();
        }
    }

    /// Flushes the buffer if its oldest segment has waited for the timeout.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        if self.poll_timeout().is_some_and(|due| due <= now) {
            self.stats.timeout_flushes += 1;
            self.flush();
        }
    }

    /// Sets the timeout in force, within the configured `timeout` and
    /// `max_timeout`: a segment that came over a fast path waits as long as
    /// the slowest path's packets may take to catch up.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout.clamp(
            self.config.timeout,
            self.config.max_timeout.max(self.config.timeout),
        );
    }

    /// The timeout in force.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// When the oldest held segment times out.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.held
            .iter()
            .map(|h| h.arrived)
            .min()
            .map(|oldest| oldest + self.timeout)
    }

    /// The next packet to pass to the transport layer, in order.
    pub fn poll_deliver(&mut self) -> Option<T> {
        self.ready.pop_front()
    }

    fn deliver(&mut self, packet: T) {
        self.stats.in_order += 1;
        self.ready.push_back(packet);
    }

    fn release_consecutive(&mut self) {
        while let Some(next) = self.next {
            // Held segments are sorted; the first one decides.
            match self.held.first() {
                Some(h) if !before(next, h.sequence) => {
                    let h = self.held.remove(0);
                    let end = h.sequence.wrapping_add(h.len);
                    if before(next, end) {
                        self.next = Some(end);
                    }
                    self.deliver(h.packet);
                }
                _ => break,
            }
        }
    }

    /// Delivers everything held, in sequence order, and skips `S` past the gap.
    fn flush(&mut self) {
        for h in std::mem::take(&mut self.held) {
            let end = h.sequence.wrapping_add(h.len);
            if self.next.is_none_or(|n| before(n, end)) {
                self.next = Some(end);
            }
            self.deliver(h.packet);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MSS: u32 = 1000;

    fn drain(r: &mut Resequencer<u32>) -> Vec<u32> {
        std::iter::from_fn(|| r.poll_deliver()).collect()
    }

    fn reseq() -> Resequencer<u32> {
        Resequencer::new(ResequencerConfig::default())
    }

    #[test]
    fn in_order_segments_pass_straight_through() {
        let mut r = reseq();
        for i in 0..5 {
            r.handle_segment(Timestamp::ZERO, 1 + i * MSS, MSS, i);
        }
        assert_eq!(drain(&mut r), vec![0, 1, 2, 3, 4]);
        assert_eq!(r.next_sequence(), Some(1 + 5 * MSS));
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn reordered_segments_are_released_in_order() {
        let mut r = reseq();
        let t = Timestamp::ZERO;
        r.handle_segment(t, 0, MSS, 0);
        r.handle_segment(t, 2 * MSS, MSS, 2);
        r.handle_segment(t, 3 * MSS, MSS, 3);
        assert_eq!(drain(&mut r), vec![0]);
        assert_eq!(r.held(), 2);
        r.handle_segment(t, MSS, MSS, 1);
        assert_eq!(drain(&mut r), vec![1, 2, 3]);
        assert_eq!(r.next_sequence(), Some(4 * MSS));
    }

    #[test]
    fn full_buffer_is_flushed_in_order() {
        let config = ResequencerConfig::default();
        let mut r = reseq();
        r.handle_segment(Timestamp::ZERO, 0, MSS, 0);
        drain(&mut r);
        // Segment 1 is lost; 2..=capacity+1 arrive in reverse order.
        let last = config.capacity as u32 + 1;
        for i in (2..=last).rev() {
            r.handle_segment(Timestamp::ZERO, i * MSS, MSS, i);
        }
        assert_eq!(r.held(), 0);
        assert_eq!(drain(&mut r), (2..=last).collect::<Vec<_>>());
        assert_eq!(r.stats().full_flushes, 1);
        assert_eq!(r.next_sequence(), Some((last + 1) * MSS));
        // The lost segment's retransmission is old now and passes at once.
        r.handle_segment(Timestamp::ZERO, MSS, MSS, 1);
        assert_eq!(drain(&mut r), vec![1]);
    }

    #[test]
    fn one_lost_segment_cannot_block_past_the_timeout() {
        let config = ResequencerConfig::default();
        let mut r = reseq();
        let t0 = Timestamp::from_secs(1);
        r.handle_segment(t0, 0, MSS, 0);
        r.handle_segment(t0, 2 * MSS, MSS, 2);
        drain(&mut r);
        let due = r.poll_timeout().unwrap();
        assert_eq!(due, t0 + config.timeout);
        r.handle_timeout(t0 + (config.timeout - Duration::from_micros(1)));
        assert!(drain(&mut r).is_empty());
        r.handle_timeout(due);
        assert_eq!(drain(&mut r), vec![2]);
        assert_eq!(r.stats().timeout_flushes, 1);
        assert_eq!(r.poll_timeout(), None);
        r.handle_segment(due, 3 * MSS, MSS, 3);
        assert_eq!(drain(&mut r), vec![3], "continues after the gap");
    }

    #[test]
    fn pure_acks_pass_and_duplicates_of_held_segments_are_dropped() {
        let mut r = reseq();
        let t = Timestamp::ZERO;
        r.handle_segment(t, 0, MSS, 0);
        r.handle_segment(t, 5 * MSS, 0, 100);
        r.handle_segment(t, 2 * MSS, MSS, 2);
        r.handle_segment(t, 2 * MSS, MSS, 22);
        assert_eq!(drain(&mut r), vec![0, 100]);
        assert_eq!(r.stats().duplicates, 1);
        assert_eq!(r.held(), 1);
        r.handle_segment(t, MSS, MSS, 1);
        assert_eq!(
            drain(&mut r),
            vec![1, 2],
            "the first copy is the one delivered"
        );
    }

    #[test]
    fn expected_start_holds_segments_ahead_of_the_first() {
        let mut r = reseq();
        r.expect(0);
        r.handle_segment(Timestamp::ZERO, MSS, MSS, 1);
        assert!(drain(&mut r).is_empty());
        r.handle_segment(Timestamp::ZERO, 0, MSS, 0);
        assert_eq!(drain(&mut r), vec![0, 1]);
    }

    #[test]
    fn works_across_sequence_wraparound() {
        let mut r = reseq();
        let t = Timestamp::ZERO;
        let start = u32::MAX - 1500;
        r.handle_segment(t, start, MSS, 0);
        r.handle_segment(t, start.wrapping_add(2 * MSS), MSS, 2);
        r.handle_segment(t, start.wrapping_add(MSS), MSS, 1);
        assert_eq!(drain(&mut r), vec![0, 1, 2]);
        assert_eq!(r.next_sequence(), Some(start.wrapping_add(3 * MSS)));
    }

    proptest! {
        #[test]
        fn prop_shuffled_segments_come_out_in_order(
            order in Just((0u32..60).collect::<Vec<_>>()).prop_shuffle()
        ) {
            let config = ResequencerConfig { capacity: 100, timeout: Duration::from_secs(1), max_timeout: Duration::from_secs(1) };
            let mut r = Resequencer::new(config);
            r.handle_segment(Timestamp::ZERO, 0, 1, u32::MAX);
            for &i in &order {
                r.handle_segment(Timestamp::ZERO, 1 + i * 10, 10, i);
            }
            let out: Vec<u32> = std::iter::from_fn(|| r.poll_deliver()).skip(1).collect();
            prop_assert_eq!(out, (0u32..60).collect::<Vec<_>>());
            prop_assert_eq!(r.held(), 0);
        }

        #[test]
        fn prop_with_loss_every_received_segment_is_delivered_once(
            order in Just((0u32..150).collect::<Vec<_>>()).prop_shuffle(),
            lost in proptest::collection::hash_set(0u32..150, 0..20),
        ) {
            let mut r = Resequencer::new(ResequencerConfig::default());
            let mut now = Timestamp::ZERO;
            r.handle_segment(now, 0, 1, u32::MAX);
            for &i in order.iter().filter(|i| !lost.contains(i)) {
                now += Duration::from_millis(1);
                r.handle_timeout(now);
                r.handle_segment(now, 1 + i * 10, 10, i);
            }
            r.handle_timeout(now + Duration::from_secs(1));
            let mut out: Vec<u32> = std::iter::from_fn(|| r.poll_deliver()).skip(1).collect();
            prop_assert_eq!(r.held(), 0);
            out.sort_unstable();
            let expected: Vec<u32> = (0u32..150).filter(|i| !lost.contains(i)).collect();
            prop_assert_eq!(out, expected);
        }
    }
}
