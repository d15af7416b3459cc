//! The Path Information Table (Table III) of one session, Algorithm 1, and the
//! queue of delay feedback owed to peers (§III-D2, §III-E1, `PROTOCOL.md` §7–8).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::wire::{Feedback, PathId, SessionId};

/// Highest path weight (Algorithm 1).
pub const MAX_WEIGHT: u16 = 1000;

/// Lowest path weight (Algorithm 1): congested paths are never dropped entirely.
pub const MIN_WEIGHT: u16 = 1;

/// Samples averaged into the real-time path delay.
pub const DELAY_WINDOW: usize = 8;

/// Delay metrics of one path, in microseconds (with the unknown clock offset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DelayMetrics {
    window: [i32; DELAY_WINDOW],
    filled: usize,
    next: usize,
    /// Minimum Path Delay `Dmin` over the smoothed values.
    pub min: Option<i64>,
    /// Real-Time Path Delay `D`: moving average of the last [`DELAY_WINDOW`] samples.
    pub realtime: Option<i64>,
    /// Real-Time Queueing Delay `Q = D − Dmin`.
    pub queueing: i64,
    /// Maximum Queueing Delay `Qmax`.
    pub max_queueing: i64,
}

impl DelayMetrics {
    /// Adds a one-way delay sample and updates `D`, `Dmin`, `Q` and `Qmax`.
    pub fn record(&mut self, sample_us: i32) {
        self.window[self.next] = sample_us;
        self.next = (self.next + 1) % DELAY_WINDOW;
        self.filled = (self.filled + 1).min(DELAY_WINDOW);
        let sum: i64 = self.window[..self.filled]
            .iter()
            .map(|&v| i64::from(v))
            .sum();
        // `filled` is in 1..=8.
        let realtime = sum / self.filled as i64;
        let min = self.min.map_or(realtime, |m| m.min(realtime));
        self.realtime = Some(realtime);
        self.min = Some(min);
        self.queueing = realtime - min;
        self.max_queueing = self.max_queueing.max(self.queueing);
    }

    /// Whether any sample was recorded.
    pub fn has_sample(&self) -> bool {
        self.realtime.is_some()
    }
}

/// One row of Table III.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathEntry {
    /// This node's ID of the path.
    pub path_id: PathId,
    /// Local UDP endpoint of the path.
    pub local: SocketAddr,
    /// Remote UDP endpoint of the path (NAT-mapped if the peer is behind a NAT).
    pub remote: SocketAddr,
    /// Whether the path manager considers the path usable.
    pub live: bool,
    /// Delay metrics.
    pub delay: DelayMetrics,
    /// Path weight `W` in `MIN_WEIGHT..=MAX_WEIGHT`.
    pub weight: u16,
}

/// The Path Information Table of one session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathTable {
    entries: Vec<PathEntry>,
}

impl PathTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a live path (or updates its endpoints if the ID exists).
    ///
    /// While no path has a delay sample, every weight is reset to `1000 / N`;
    /// afterwards a new path starts at `1000 / N` and the others keep theirs.
    pub fn insert(&mut self, path_id: PathId, local: SocketAddr, remote: SocketAddr) {
        if let Some(entry) = self.get_mut(path_id) {
            entry.local = local;
            entry.remote = remote;
            entry.live = true;
            return;
        }
        self.entries.push(PathEntry {
            path_id,
            local,
            remote,
            live: true,
            delay: DelayMetrics::default(),
            weight: MIN_WEIGHT,
        });
        let initial = initial_weight(self.entries.len());
        if self.entries.iter().any(|e| e.delay.has_sample()) {
            if let Some(last) = self.entries.last_mut() {
                last.weight = initial;
            }
        } else {
            for entry in &mut self.entries {
                entry.weight = initial;
            }
        }
    }

    /// Removes a path; returns whether it existed.
    pub fn remove(&mut self, path_id: PathId) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| e.path_id != path_id);
        before != self.entries.len()
    }

    /// Marks a path live or dead; returns whether it exists.
    pub fn set_live(&mut self, path_id: PathId, live: bool) -> bool {
        match self.get_mut(path_id) {
            Some(entry) => {
                entry.live = live;
                true
            }
            None => false,
        }
    }

    /// Feeds a delay sample returned by the peer for `path_id`; returns whether the path exists.
    pub fn record_delay(&mut self, path_id: PathId, sample_us: i32) -> bool {
        match self.get_mut(path_id) {
            Some(entry) => {
                entry.delay.record(sample_us);
                true
            }
            None => false,
        }
    }

    /// Sets a path's weight, clamped to `MIN_WEIGHT..=MAX_WEIGHT`.
    pub fn set_weight(&mut self, path_id: PathId, weight: u16) -> bool {
        match self.get_mut(path_id) {
            Some(entry) => {
                entry.weight = weight.clamp(MIN_WEIGHT, MAX_WEIGHT);
                true
            }
            None => false,
        }
    }

    /// Algorithm 1: over the live paths with a delay sample, paths whose queueing
    /// delay is at most the average gain `step`, the others lose `step`, clamped
    /// to `MIN_WEIGHT..=MAX_WEIGHT`. Paths without a sample keep their weight.
    pub fn adjust_weights(&mut self, step: u16) {
        let measured: Vec<i64> = self
            .entries
            .iter()
            .filter(|e| e.live && e.delay.has_sample())
            .map(|e| e.delay.queueing)
            .collect();
        if measured.is_empty() {
            return;
        }
        let sum: i128 = measured.iter().map(|&q| i128::from(q)).sum();
        let n = measured.len() as i128;
        for entry in &mut self.entries {
            if !(entry.live && entry.delay.has_sample()) {
                continue;
            }
            // Q_i <= Q_avg  <=>  Q_i * N <= sum, without rounding.
            if i128::from(entry.delay.queueing) * n <= sum {
                entry.weight = entry.weight.saturating_add(step).min(MAX_WEIGHT);
            } else {
                entry.weight = entry.weight.saturating_sub(step).max(MIN_WEIGHT);
            }
        }
    }

    /// The row of `path_id`.
    pub fn get(&self, path_id: PathId) -> Option<&PathEntry> {
        self.entries.iter().find(|e| e.path_id == path_id)
    }

    fn get_mut(&mut self, path_id: PathId) -> Option<&mut PathEntry> {
        self.entries.iter_mut().find(|e| e.path_id == path_id)
    }

    /// All rows, in insertion order.
    pub fn entries(&self) -> &[PathEntry] {
        &self.entries
    }

    /// The live rows.
    pub fn live(&self) -> impl Iterator<Item = &PathEntry> + '_ {
        self.entries.iter().filter(|e| e.live)
    }
}

/// Initial weight of each of `n` paths: `1000 / n`, at least 1.
pub fn initial_weight(n: usize) -> u16 {
    let n = u16::try_from(n.max(1)).unwrap_or(u16::MAX);
    (MAX_WEIGHT / n).max(MIN_WEIGHT)
}

/// Delay samples measured on packets received from one peer node, waiting to
/// be returned to it in the Feedback Path ID / Path Delay fields
/// (`PROTOCOL.md` §7). One queue per peer, so nothing here scans other peers.
#[derive(Debug, Clone, Default)]
pub struct FeedbackQueue {
    pending: BTreeMap<SessionId, SessionFeedback>,
    session_cursor: Option<SessionId>,
}

#[derive(Debug, Clone, Default)]
struct SessionFeedback {
    latest: BTreeMap<PathId, i32>,
    cursor: Option<PathId>,
}

impl FeedbackQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores the latest sample for the peer's path `path` of `session`.
    pub fn record(&mut self, session: SessionId, path: PathId, delay_us: i32) {
        self.pending
            .entry(session)
            .or_default()
            .latest
            .insert(path, delay_us);
    }

    /// The next sample to return for `session`, round robin over paths.
    pub fn take(&mut self, session: SessionId) -> Option<Feedback> {
        let queue = self.pending.get_mut(&session)?;
        let after = queue.cursor;
        let next = after
            .and_then(|c| {
                queue
                    .latest
                    .range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded))
                    .next()
            })
            .or_else(|| queue.latest.iter().next())
            .map(|(path, delay)| (*path, *delay));
        let (path, delay_us) = next?;
        queue.latest.remove(&path);
        queue.cursor = Some(path);
        if queue.latest.is_empty() {
            self.pending.remove(&session);
        }
        Some(Feedback {
            path_id: path,
            delay_us,
        })
    }

    /// The next sample owed for any session, taking the sessions with samples
    /// pending in turn, so no session starves (used by heartbeats).
    pub fn take_any(&mut self) -> Option<(SessionId, Feedback)> {
        let session = self
            .session_cursor
            .and_then(|c| {
                self.pending
                    .range((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded))
                    .next()
            })
            .or_else(|| self.pending.iter().next())
            .map(|(session, _)| *session)?;
        self.session_cursor = Some(session);
        self.take(session).map(|f| (session, f))
    }

    /// Sessions with samples pending.
    pub fn sessions_with_feedback(&self) -> Vec<SessionId> {
        self.pending.keys().copied().collect()
    }

    /// Whether no sample is pending.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: u16) -> SocketAddr {
        SocketAddr::new([192, 0, 2, 1].into(), port)
    }

    fn table_with(n: u8) -> PathTable {
        let mut table = PathTable::new();
        for id in 1..=n {
            table.insert(PathId(id), ep(u16::from(id)), ep(1000 + u16::from(id)));
        }
        table
    }

    #[test]
    fn delay_metrics_follow_the_paper() {
        let mut m = DelayMetrics::default();
        m.record(10_000);
        assert_eq!(
            (m.min, m.realtime, m.queueing),
            (Some(10_000), Some(10_000), 0)
        );
        m.record(14_000);
        // D = average(10000, 14000) = 12000, Dmin stays 10000.
        assert_eq!(m.realtime, Some(12_000));
        assert_eq!(m.min, Some(10_000));
        assert_eq!(m.queueing, 2_000);
        assert_eq!(m.max_queueing, 2_000);
        for _ in 0..DELAY_WINDOW {
            m.record(10_000);
        }
        assert_eq!(m.queueing, 0);
        assert_eq!(m.max_queueing, 2_000, "Qmax keeps the peak");
    }

    #[test]
    fn negative_samples_from_clock_offset_are_fine() {
        let mut m = DelayMetrics::default();
        m.record(-50_000);
        m.record(-40_000);
        assert_eq!(m.min, Some(-50_000));
        assert_eq!(m.queueing, 5_000);
    }

    #[test]
    fn initial_weights_are_1000_over_n() {
        let table = table_with(3);
        assert!(table.entries().iter().all(|e| e.weight == 333));
        assert_eq!(initial_weight(0), 1000);
        assert_eq!(initial_weight(5000), 1);
    }

    #[test]
    fn algorithm_1_moves_weight_to_low_delay_paths_and_clamps() {
        let mut table = table_with(2);
        let step = 10;
        table.record_delay(PathId(1), 20_000);
        table.record_delay(PathId(2), 20_000);
        // Path 2 becomes congested: its queueing delay rises above the average.
        for _ in 0..DELAY_WINDOW {
            table.record_delay(PathId(2), 60_000);
        }
        let w1 = table.get(PathId(1)).unwrap().weight;
        let w2 = table.get(PathId(2)).unwrap().weight;
        table.adjust_weights(step);
        assert_eq!(table.get(PathId(1)).unwrap().weight, w1 + step);
        assert_eq!(table.get(PathId(2)).unwrap().weight, w2 - step);
        for _ in 0..200 {
            table.adjust_weights(step);
        }
        assert_eq!(table.get(PathId(1)).unwrap().weight, MAX_WEIGHT);
        assert_eq!(table.get(PathId(2)).unwrap().weight, MIN_WEIGHT);
    }

    #[test]
    fn algorithm_1_skips_dead_and_unmeasured_paths() {
        let mut table = table_with(3);
        table.record_delay(PathId(1), 1_000);
        table.record_delay(PathId(2), 1_000);
        table.record_delay(PathId(2), 9_000);
        table.set_live(PathId(2), false);
        table.adjust_weights(50);
        assert_eq!(table.get(PathId(1)).unwrap().weight, 383);
        assert_eq!(
            table.get(PathId(2)).unwrap().weight,
            333,
            "dead path untouched"
        );
        assert_eq!(table.get(PathId(3)).unwrap().weight, 333, "no sample yet");
    }

    #[test]
    fn equal_queueing_delays_all_gain() {
        let mut table = table_with(2);
        table.record_delay(PathId(1), 5_000);
        table.record_delay(PathId(2), 7_000);
        table.adjust_weights(10);
        assert!(table.entries().iter().all(|e| e.weight == 510));
    }

    #[test]
    fn path_added_after_measurement_keeps_existing_weights() {
        let mut table = table_with(2);
        table.record_delay(PathId(1), 5_000);
        table.set_weight(PathId(1), 900);
        table.insert(PathId(3), ep(3), ep(1003));
        assert_eq!(table.get(PathId(1)).unwrap().weight, 900);
        assert_eq!(table.get(PathId(3)).unwrap().weight, 333);
        assert!(table.remove(PathId(3)));
        assert!(!table.remove(PathId(3)));
    }

    #[test]
    fn feedback_is_returned_round_robin_latest_first() {
        let s = SessionId(5);
        let mut queue = FeedbackQueue::new();
        queue.record(s, PathId(1), 100);
        queue.record(s, PathId(2), 200);
        queue.record(s, PathId(1), 150);
        assert_eq!(queue.sessions_with_feedback(), vec![s]);
        let first = queue.take(s).unwrap();
        assert_eq!(
            first,
            Feedback {
                path_id: PathId(1),
                delay_us: 150
            }
        );
        queue.record(s, PathId(1), 175);
        // Path 2 is next even though path 1 has a newer sample.
        assert_eq!(queue.take(s).unwrap().path_id, PathId(2));
        assert_eq!(queue.take(s).unwrap().delay_us, 175);
        assert_eq!(queue.take(s), None);
        assert!(queue.sessions_with_feedback().is_empty());
        assert!(queue.is_empty());
    }

    #[test]
    fn take_any_alternates_between_sessions() {
        let mut queue = FeedbackQueue::new();
        let mut taken = Vec::new();
        for round in 0..4 {
            // The control session is refilled every round, as heartbeats do.
            queue.record(SessionId::CONTROL, PathId(1), round);
            queue.record(SessionId(7), PathId(1), 100 + round);
            taken.push(queue.take_any().unwrap().0);
        }
        assert!(
            taken.contains(&SessionId(7)),
            "data session not starved: {taken:?}"
        );
        assert!(taken.contains(&SessionId::CONTROL));
        assert_eq!(FeedbackQueue::new().take_any(), None);
    }
}
