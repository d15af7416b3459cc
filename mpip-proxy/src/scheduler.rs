//! Path scheduling (§III-E, `PROTOCOL.md` §8): all-paths with Algorithm 1 weights
//! and equation 1 dispatch, single-path, selected-paths, protected-path with a
//! receive-side de-duplication window, Table IV classification and coordinated
//! session pinning (Fig. 9).

use std::collections::HashMap;
use std::time::Duration;

use crate::routing::{PacketClass, Priority, RoutingTable};
use crate::table::path::PathTable;
use crate::time::Timestamp;
use crate::wire::{NodeId, PathId, SessionId};

/// A source of uniformly distributed random numbers, injected so tests are deterministic.
pub trait RandomSource {
    /// The next uniformly distributed `u32`.
    fn next_u32(&mut self) -> u32;
}

/// SplitMix64: a small, fast, seedable generator (not cryptographic).
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub const fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }
}

impl RandomSource for SplitMix64 {
    fn next_u32(&mut self) -> u32 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as u32
    }
}

/// A Weyl sequence, `u_n = frac(seed + n / φ)`: uniformly distributed like
/// random draws, but with low discrepancy: any run of packets is split in
/// proportion to the weights almost exactly, where independent draws leave
/// random runs on one path that empty the other path's queue.
#[derive(Debug, Clone)]
pub struct WeylSequence {
    state: u64,
}

impl WeylSequence {
    /// A sequence starting at `seed`.
    pub const fn new(seed: u64) -> Self {
        WeylSequence { state: seed }
    }
}

impl RandomSource for WeylSequence {
    fn next_u32(&mut self) -> u32 {
        // 2^64 / φ, the golden-ratio increment.
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        (self.state >> 32) as u32
    }
}

/// Where equation 1's draws come from (`[scheduler] dispatch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dispatch {
    /// A low-discrepancy sequence ([`WeylSequence`]); the default.
    #[default]
    LowDiscrepancy,
    /// Independent pseudo-random draws ([`SplitMix64`]), as in the paper.
    Random,
}

/// The draw source for a [`Dispatch`] choice.
#[derive(Debug, Clone)]
pub enum DispatchSource {
    /// Independent pseudo-random draws.
    Random(SplitMix64),
    /// A low-discrepancy sequence.
    LowDiscrepancy(WeylSequence),
}

impl DispatchSource {
    /// The source for `dispatch`, seeded with `seed`.
    pub fn new(dispatch: Dispatch, seed: u64) -> Self {
        match dispatch {
            Dispatch::Random => DispatchSource::Random(SplitMix64::new(seed)),
            Dispatch::LowDiscrepancy => DispatchSource::LowDiscrepancy(WeylSequence::new(seed)),
        }
    }
}

impl RandomSource for DispatchSource {
    fn next_u32(&mut self) -> u32 {
        match self {
            DispatchSource::Random(source) => source.next_u32(),
            DispatchSource::LowDiscrepancy(source) => source.next_u32(),
        }
    }
}

/// How the packets of a session are spread over its paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Every live path, chosen per packet with probability `W_k / ΣW` (equation 1).
    AllPaths,
    /// The live path with the lowest real-time delay.
    SinglePath,
    /// Like all-paths, restricted to these paths.
    SelectedPaths(Vec<PathId>),
    /// A copy on every live path; the receiver keeps the first.
    ProtectedPath,
}

impl From<Priority> for Mode {
    fn from(priority: Priority) -> Self {
        match priority {
            Priority::ResponsivenessFirst => Mode::SinglePath,
            Priority::ThroughputFirst => Mode::AllPaths,
            Priority::Protected => Mode::ProtectedPath,
        }
    }
}

/// Where to send one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// No live path: drop (or queue) the packet.
    NoPath,
    /// Send on this path.
    One(PathId),
    /// Send a copy on each of these paths, flagged `DUPLICATE`.
    Copies(Vec<PathId>),
}

/// Scheduler parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Algorithm 1 step `S`.
    pub step: u16,
    /// Algorithm 1 period `T`.
    pub period: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            step: 10,
            period: Duration::from_millis(100),
        }
    }
}

/// Equation 1: picks a live path (of `subset`, if given) with probability
/// proportional to its weight.
pub fn pick_weighted(
    table: &PathTable,
    subset: Option<&[PathId]>,
    rng: &mut impl RandomSource,
) -> Option<PathId> {
    let eligible = |id: PathId| subset.is_none_or(|s| s.contains(&id));
    let total: u64 = table
        .live()
        .filter(|e| eligible(e.path_id))
        .map(|e| u64::from(e.weight))
        .sum();
    if total == 0 {
        return None;
    }
    // Uniform in 0..total without modulo bias worth caring about (total <= 255_000).
    let mut draw = (u64::from(rng.next_u32()) * total) >> 32;
    for entry in table.live().filter(|e| eligible(e.path_id)) {
        let weight = u64::from(entry.weight);
        if draw < weight {
            return Some(entry.path_id);
        }
        draw -= weight;
    }
    None
}

/// The live path with the lowest real-time delay; paths without a sample come
/// after measured ones; ties go to the lower path ID.
pub fn lowest_delay(table: &PathTable) -> Option<PathId> {
    table
        .live()
        .min_by_key(|e| (e.delay.realtime.is_none(), e.delay.realtime, e.path_id))
        .map(|e| e.path_id)
}

/// The sender-side scheduler: classification, pins, path choice and the
/// Algorithm 1 timer.
#[derive(Debug, Clone)]
pub struct Scheduler<R: RandomSource> {
    config: SchedulerConfig,
    routing: RoutingTable,
    rng: R,
    pins: HashMap<(NodeId, SessionId), PathId>,
    next_adjustment: Option<Timestamp>,
}

impl<R: RandomSource> Scheduler<R> {
    /// A scheduler with the routing table `routing` and random source `rng`.
    pub fn new(config: SchedulerConfig, routing: RoutingTable, rng: R) -> Self {
        Scheduler {
            config,
            routing,
            rng,
            pins: HashMap::new(),
            next_adjustment: None,
        }
    }

    /// Replaces the routing table (a reload or a profile switch).
    pub fn set_routing(&mut self, routing: RoutingTable) {
        self.routing = routing;
    }

    /// Replaces Algorithm 1's period and step (a reload).
    pub fn set_config(&mut self, config: SchedulerConfig) {
        self.config = config;
    }

    /// The mode for a packet of `class` according to the routing table.
    pub fn mode_for(&self, class: &PacketClass) -> Mode {
        Mode::from(self.routing.classify(class))
    }

    /// Chooses the path(s) for one packet of (`node`, `session`) in `mode`.
    /// A pin to a live path overrides the mode (except protected-path copies).
    pub fn select(
        &mut self,
        node: NodeId,
        session: SessionId,
        table: &PathTable,
        mode: &Mode,
    ) -> Selection {
        if *mode != Mode::ProtectedPath {
            if let Some(&pinned) = self.pins.get(&(node, session)) {
                if table.get(pinned).is_some_and(|e| e.live) {
                    return Selection::One(pinned);
                }
            }
        }
        let chosen = match mode {
            Mode::AllPaths => pick_weighted(table, None, &mut self.rng),
            Mode::SelectedPaths(subset) => pick_weighted(table, Some(subset), &mut self.rng),
            Mode::SinglePath => lowest_delay(table),
            Mode::ProtectedPath => {
                let all: Vec<PathId> = table.live().map(|e| e.path_id).collect();
                return match all.len() {
                    0 => Selection::NoPath,
                    1 => Selection::One(all[0]),
                    _ => Selection::Copies(all),
                };
            }
        };
        chosen.map_or(Selection::NoPath, Selection::One)
    }

    /// Pins (`node`, `session`) to `path` (coordinated routing).
    pub fn pin(&mut self, node: NodeId, session: SessionId, path: PathId) {
        self.pins.insert((node, session), path);
    }

    /// Removes the pin of (`node`, `session`); returns it.
    pub fn unpin(&mut self, node: NodeId, session: SessionId) -> Option<PathId> {
        self.pins.remove(&(node, session))
    }

    /// The pin of (`node`, `session`).
    pub fn pinned(&self, node: NodeId, session: SessionId) -> Option<PathId> {
        self.pins.get(&(node, session)).copied()
    }

    /// Coordinated routing (Fig. 9): pins `sessions`, most important first, to the
    /// live paths of `paths` in order of increasing delay, one session per path;
    /// with more sessions than paths, the rest wrap around. Returns the pins made.
    pub fn coordinate(
        &mut self,
        node: NodeId,
        sessions: &[SessionId],
        paths: &PathTable,
    ) -> Vec<(SessionId, PathId)> {
        let mut ranked: Vec<_> = paths
            .live()
            .map(|e| (e.delay.realtime.is_none(), e.delay.realtime, e.path_id))
            .collect();
        ranked.sort();
        if ranked.is_empty() {
            return Vec::new();
        }
        let pins: Vec<(SessionId, PathId)> = sessions
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, ranked[i % ranked.len()].2))
            .collect();
        for (session, path) in &pins {
            self.pin(node, *session, *path);
        }
        pins
    }

    /// Runs Algorithm 1 on `tables` if its period has elapsed at `now`; returns
    /// whether it ran. The first call only arms the timer.
    pub fn handle_timeout<'a>(
        &mut self,
        now: Timestamp,
        tables: impl IntoIterator<Item = &'a mut PathTable>,
    ) -> bool {
        match self.next_adjustment {
            None => {
                self.next_adjustment = Some(now + self.config.period);
                false
            }
            Some(due) if due <= now => {
                for table in tables {
                    table.adjust_weights(self.config.step);
                }
                self.next_adjustment = Some(now + self.config.period);
                true
            }
            Some(_) => false,
        }
    }

    /// When [`Scheduler::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.next_adjustment
    }
}

/// Sequences remembered by a [`DedupWindow`].
pub const DEDUP_WINDOW: u32 = 1024;

/// Receive-side protected-path filter for one session: the first copy of a
/// Packet Sequence passes, later copies and sequences older than the window
/// are dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DedupWindow {
    top: Option<u32>,
    seen: [u64; (DEDUP_WINDOW / 64) as usize],
}

impl DedupWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(sequence: u32) -> (usize, u64) {
        let index = sequence % DEDUP_WINDOW;
        ((index / 64) as usize, 1u64 << (index % 64))
    }

    fn set(&mut self, sequence: u32) {
        let (word, bit) = Self::slot(sequence);
        self.seen[word] |= bit;
    }

    fn clear(&mut self, sequence: u32) {
        let (word, bit) = Self::slot(sequence);
        self.seen[word] &= !bit;
    }

    fn is_set(&self, sequence: u32) -> bool {
        let (word, bit) = Self::slot(sequence);
        self.seen[word] & bit != 0
    }

    /// Whether the packet with `sequence` is the first copy (deliver it).
    pub fn accept(&mut self, sequence: u32) -> bool {
        let Some(top) = self.top else {
            self.top = Some(sequence);
            self.set(sequence);
            return true;
        };
        let ahead = sequence.wrapping_sub(top);
        if ahead != 0 && ahead < 1 << 31 {
            if ahead >= DEDUP_WINDOW {
                self.seen = [0; (DEDUP_WINDOW / 64) as usize];
            } else {
                for step in 1..=ahead {
                    self.clear(top.wrapping_add(step));
                }
            }
            self.set(sequence);
            self.top = Some(sequence);
            return true;
        }
        let behind = top.wrapping_sub(sequence);
        if behind >= DEDUP_WINDOW || self.is_set(sequence) {
            return false;
        }
        self.set(sequence);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const NODE: NodeId = NodeId([2, 0, 0, 0, 0, 1]);

    fn ep(port: u16) -> SocketAddr {
        SocketAddr::new([192, 0, 2, 1].into(), port)
    }

    fn table(weights: &[u16]) -> PathTable {
        let mut t = PathTable::new();
        for i in 0..weights.len() {
            let id = PathId(i as u8 + 1);
            t.insert(id, ep(id.0.into()), ep(1000 + u16::from(id.0)));
        }
        // Inserting resets unmeasured weights to 1000/N, so set them afterwards.
        for (i, w) in weights.iter().enumerate() {
            t.set_weight(PathId(i as u8 + 1), *w);
        }
        t
    }

    fn counts(
        scheduler: &mut Scheduler<SplitMix64>,
        t: &PathTable,
        mode: &Mode,
        n: usize,
    ) -> HashMap<PathId, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            match scheduler.select(NODE, SessionId(1), t, mode) {
                Selection::One(p) => *counts.entry(p).or_insert(0) += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        counts
    }

    fn scheduler(seed: u64) -> Scheduler<SplitMix64> {
        Scheduler::new(
            SchedulerConfig::default(),
            RoutingTable::default(),
            SplitMix64::new(seed),
        )
    }

    #[test]
    fn equation_1_dispatch_follows_weights() {
        let t = table(&[750, 250]);
        let mut s = scheduler(7);
        let n = 40_000;
        let c = counts(&mut s, &t, &Mode::AllPaths, n);
        let share = c[&PathId(1)] as f64 / n as f64;
        // Expected 0.75; binomial standard deviation is about 0.002.
        assert!((share - 0.75).abs() < 0.02, "share {share}");
    }

    #[test]
    fn dispatch_is_deterministic_for_a_seed() {
        let t = table(&[500, 300, 200]);
        let picks = |seed| {
            let mut s = scheduler(seed);
            (0..64)
                .map(|_| s.select(NODE, SessionId(1), &t, &Mode::AllPaths))
                .collect::<Vec<_>>()
        };
        assert_eq!(picks(1), picks(1));
        assert_ne!(picks(1), picks(2));
    }

    #[test]
    fn dead_paths_and_unselected_paths_get_nothing() {
        let mut t = table(&[500, 300, 200]);
        t.set_live(PathId(1), false);
        let mut s = scheduler(3);
        let c = counts(&mut s, &t, &Mode::AllPaths, 2_000);
        assert!(!c.contains_key(&PathId(1)));
        let subset = Mode::SelectedPaths(vec![PathId(1), PathId(3)]);
        let c = counts(&mut s, &t, &subset, 500);
        assert_eq!(c.get(&PathId(3)), Some(&500));
        t.set_live(PathId(3), false);
        assert_eq!(s.select(NODE, SessionId(1), &t, &subset), Selection::NoPath);
    }

    #[test]
    fn single_path_takes_the_lowest_delay() {
        let mut t = table(&[333, 333, 333]);
        assert_eq!(lowest_delay(&t), Some(PathId(1)), "no samples: lowest ID");
        t.record_delay(PathId(1), 50_000);
        t.record_delay(PathId(2), 20_000);
        assert_eq!(
            lowest_delay(&t),
            Some(PathId(2)),
            "measured beats unmeasured"
        );
        t.record_delay(PathId(3), 10_000);
        let mut s = scheduler(1);
        assert_eq!(
            s.select(NODE, SessionId(1), &t, &Mode::SinglePath),
            Selection::One(PathId(3))
        );
        t.set_live(PathId(3), false);
        assert_eq!(
            s.select(NODE, SessionId(1), &t, &Mode::SinglePath),
            Selection::One(PathId(2))
        );
    }

    #[test]
    fn protected_path_copies_on_every_live_path() {
        let mut t = table(&[500, 500, 500]);
        t.set_live(PathId(2), false);
        let mut s = scheduler(1);
        assert_eq!(
            s.select(NODE, SessionId(1), &t, &Mode::ProtectedPath),
            Selection::Copies(vec![PathId(1), PathId(3)])
        );
    }

    #[test]
    fn routing_table_picks_the_mode() {
        let routing: RoutingTable = RoutingTable {
            default: Priority::ThroughputFirst,
            rules: vec![crate::routing::RoutingRule {
                port: Some(5221),
                priority: Priority::ResponsivenessFirst,
                ..Default::default()
            }],
        };
        let s = Scheduler::new(SchedulerConfig::default(), routing, SplitMix64::new(0));
        let class = |port| PacketClass {
            source: "10.200.0.2".parse().unwrap(),
            destination: "192.168.1.2".parse().unwrap(),
            source_port: Some(40000),
            port: Some(port),
            protocol: crate::table::session::Protocol::Udp,
            length: 300,
        };
        assert_eq!(s.mode_for(&class(5221)), Mode::SinglePath);
        assert_eq!(s.mode_for(&class(5222)), Mode::AllPaths);
    }

    #[test]
    fn coordinated_routing_pins_sessions_by_importance() {
        // Fig. 9: video on the short-delay path, download on the other.
        let mut t = table(&[500, 500]);
        t.record_delay(PathId(1), 40_000);
        t.record_delay(PathId(2), 20_000);
        let (video, download) = (SessionId(1), SessionId(2));
        let mut s = scheduler(9);
        let pins = s.coordinate(NODE, &[video, download], &t);
        assert_eq!(pins, vec![(video, PathId(2)), (download, PathId(1))]);
        for _ in 0..100 {
            assert_eq!(
                s.select(NODE, video, &t, &Mode::AllPaths),
                Selection::One(PathId(2))
            );
            assert_eq!(
                s.select(NODE, download, &t, &Mode::AllPaths),
                Selection::One(PathId(1))
            );
        }
        // A pin to a dead path is ignored until the path returns.
        t.set_live(PathId(2), false);
        assert_eq!(
            s.select(NODE, video, &t, &Mode::AllPaths),
            Selection::One(PathId(1))
        );
        assert_eq!(s.unpin(NODE, video), Some(PathId(2)));
        assert_eq!(s.pinned(NODE, video), None);
    }

    #[test]
    fn algorithm_1_runs_once_per_period() {
        let config = SchedulerConfig {
            step: 25,
            period: Duration::from_millis(100),
        };
        let mut s = Scheduler::new(config, RoutingTable::default(), SplitMix64::new(0));
        let mut t = table(&[500, 500]);
        t.record_delay(PathId(1), 10_000);
        t.record_delay(PathId(2), 10_000);
        for _ in 0..8 {
            t.record_delay(PathId(2), 30_000);
        }
        let mut now = Timestamp::from_secs(1);
        assert!(
            !s.handle_timeout(now, [&mut t]),
            "first call arms the timer"
        );
        let mut runs = 0;
        for _ in 0..1000 {
            now += Duration::from_millis(1);
            if s.handle_timeout(now, [&mut t]) {
                runs += 1;
            }
        }
        assert_eq!(runs, 10);
        assert_eq!(t.get(PathId(1)).unwrap().weight, 500 + 10 * 25);
        assert_eq!(t.get(PathId(2)).unwrap().weight, 500 - 10 * 25);
        assert_eq!(s.poll_timeout(), Some(now + Duration::from_millis(100)));
    }

    #[test]
    fn weights_shift_traffic_away_from_a_congested_path() {
        let mut s = scheduler(11);
        let mut t = table(&[500, 500]);
        t.record_delay(PathId(1), 10_000);
        t.record_delay(PathId(2), 10_000);
        for _ in 0..8 {
            t.record_delay(PathId(2), 80_000);
        }
        for _ in 0..30 {
            t.adjust_weights(10);
        }
        let c = counts(&mut s, &t, &Mode::AllPaths, 10_000);
        assert!(c[&PathId(1)] > 3 * c.get(&PathId(2)).copied().unwrap_or(0));
    }

    #[test]
    fn dedup_window_keeps_first_copies_only() {
        let mut w = DedupWindow::new();
        assert!(w.accept(10));
        assert!(!w.accept(10));
        assert!(w.accept(12));
        assert!(w.accept(11), "late but first copy");
        assert!(!w.accept(11));
        assert!(!w.accept(12));
        assert!(w.accept(10 + DEDUP_WINDOW + 5));
        assert!(!w.accept(10), "older than the window");
        assert!(
            w.accept(12 + DEDUP_WINDOW),
            "slot reused for a new sequence"
        );
    }

    #[test]
    fn dedup_window_survives_wraparound() {
        let mut w = DedupWindow::new();
        assert!(w.accept(u32::MAX - 1));
        assert!(w.accept(1));
        assert!(w.accept(u32::MAX));
        assert!(!w.accept(u32::MAX));
        assert!(!w.accept(1));
        assert!(w.accept(0));
    }

    proptest::proptest! {
        #[test]
        fn prop_dedup_delivers_each_sequence_once(
            base in proptest::prelude::any::<u32>(),
            offsets in proptest::collection::vec(0u32..200, 1..400),
        ) {
            let mut w = DedupWindow::new();
            let mut delivered = std::collections::HashSet::new();
            for off in offsets {
                let seq = base.wrapping_add(off);
                let accepted = w.accept(seq);
                // Within a 200-wide spread nothing falls out of the window.
                proptest::prop_assert_eq!(accepted, delivered.insert(seq));
            }
        }
    }

    #[test]
    fn low_discrepancy_draws_split_every_window_by_weight() {
        let mut table = PathTable::new();
        for id in [1u8, 2] {
            table.insert(
                PathId(id),
                format!("10.0.{id}.2:5000").parse().unwrap(),
                format!("10.0.{id}.1:4789").parse().unwrap(),
            );
        }
        table.set_weight(PathId(1), 600);
        table.set_weight(PathId(2), 300);
        let worst_window = |source: &mut dyn FnMut() -> Option<PathId>| {
            let picks: Vec<bool> = (0..3000).map(|_| source() == Some(PathId(1))).collect();
            // The largest deviation from 2/3 on path 1 over any 30-packet window.
            picks
                .windows(30)
                .map(|w| (w.iter().filter(|p| **p).count() as f64 - 20.0).abs())
                .fold(0.0, f64::max)
        };
        let mut weyl = WeylSequence::new(7);
        let mut random = SplitMix64::new(7);
        let weyl_worst = worst_window(&mut || pick_weighted(&table, None, &mut weyl));
        let random_worst = worst_window(&mut || pick_weighted(&table, None, &mut random));
        assert!(weyl_worst <= 2.0, "low discrepancy: {weyl_worst}");
        assert!(
            random_worst > 5.0,
            "independent draws wander: {random_worst}"
        );
        let mut counts = [0usize; 2];
        let mut weyl = WeylSequence::new(99);
        for _ in 0..9000 {
            match pick_weighted(&table, None, &mut weyl) {
                Some(PathId(1)) => counts[0] += 1,
                _ => counts[1] += 1,
            }
        }
        assert!(
            counts[0].abs_diff(6000) <= 3,
            "equation 1's proportions: {counts:?}"
        );
    }
}
