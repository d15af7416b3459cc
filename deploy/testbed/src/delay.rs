//! A user-space delay line: extra delay, jitter and random loss on one interface and direction of a
//! namespace, for kernels without netem. Test and benchmark equipment only, never production code.
//!
//! [`DelayLine::start`] installs an nftables table in the namespace whose one rule hands every packet of
//! the interface and direction to an nfqueue (`oifname DEV queue num N bypass` in `postrouting` for
//! egress, `iifname DEV ...` in `prerouting` for ingress). A thread bound to that queue (through
//! `mptcp_netlink::nfqueue`) notes each packet's arrival, drops the configured fraction at once, and
//! releases the rest with ACCEPT verdicts when their time has come, in arrival order. Dropping the
//! [`DelayLine`] deletes the table, releases what is still held and unbinds the queue.
//!
//! Properties:
//! - **Order is kept.** A packet's release time is `max(arrival + delay ± jitter, previous release)`, so
//!   jitter never reorders (like netem with a rate); releases go out as one batch verdict per wake-up.
//! - **Metadata only.** The kernel copies no packet bytes to user space ([`CopyMode::Meta`]), and GSO
//!   packets are queued whole (`NFQA_CFG_F_GSO`), so 64 KiB TSO writes cost one queue entry.
//! - **A full queue drops**, like netem's `limit` and a router's full buffer: [`DelayConfig::limit`]
//!   packets may be held (default 16384; 100 ms of 100 Mbit/s is about 850 full-size packets), and
//!   [`DelayConfig::fail_open`] makes the kernel accept overflow undelayed instead.
//! - **Crash-safe rules.** The rule has `bypass`, so if the process dies without cleaning up, packets
//!   flow undelayed rather than being black-holed until the table is deleted.
//!
//! Egress delay on a host's own TCP sockets holds their skbs, which count against TCP Small Queues
//! (`net.ipv4.tcp_limit_output_bytes`, 4 MiB here): at 100 ms that caps one flow near 330 Mbit/s. Put
//! the delay on a forwarding hop or on the receiver's ingress for faster flows.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mptcp_netlink::nfqueue::{self, CopyMode, Queue, QueueConfig, QueueError, Verdict};
use mptcp_netlink::nft::{self, QueueExpr};
use nftnl::expr::{Cmp, CmpOp, Meta};
use nftnl::{Batch, Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table};

/// Which packets of the interface are delayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Packets leaving through the interface (`postrouting`, after routing and NAT).
    Egress,
    /// Packets arriving on the interface (`prerouting`, before conntrack and routing).
    Ingress,
}

/// What the line does to each packet.
#[derive(Debug, Clone, PartialEq)]
pub struct DelayConfig {
    /// Added one-way delay.
    pub delay: Duration,
    /// Each packet's delay is drawn uniformly from `delay ± jitter` (never below zero, never reordering).
    pub jitter: Duration,
    /// Fraction of packets dropped at random, 0.0 to 1.0.
    pub loss: f64,
    /// Packets held at most; more are dropped (or accepted undelayed with `fail_open`).
    pub limit: u32,
    /// Accept packets undelayed when the queue is full instead of dropping them.
    pub fail_open: bool,
    /// Seed of the loss and jitter generator; 0 picks one from the clock.
    pub seed: u64,
}

impl Default for DelayConfig {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            // 100 ms at 1 Gbit/s of full-size unsegmented packets is about 8500.
            limit: 16384,
            fail_open: false,
            seed: 0,
        }
    }
}

/// Errors of the delay line.
#[derive(Debug, thiserror::Error)]
pub enum DelayError {
    /// A parameter is out of range.
    #[error("invalid delay line setting: {0}")]
    Invalid(String),
    /// Entering the namespace failed.
    #[error(transparent)]
    Namespace(#[from] crate::TestbedError),
    /// Installing or removing the nftables rule failed.
    #[error(transparent)]
    Netlink(#[from] mptcp_netlink::NetlinkError),
    /// The queue failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Other I/O.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Counters of a running line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DelayStats {
    /// Packets handed to the line.
    pub queued: u64,
    /// Packets released (ACCEPT).
    pub released: u64,
    /// Packets dropped by the configured loss.
    pub lost: u64,
    /// Most packets held at once.
    pub max_held: u64,
    /// Verdicts the kernel refused.
    pub verdict_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    queued: AtomicU64,
    released: AtomicU64,
    lost: AtomicU64,
    max_held: AtomicU64,
    verdict_errors: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> DelayStats {
        DelayStats {
            queued: self.queued.load(Ordering::Relaxed),
            released: self.released.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            max_held: self.max_held.load(Ordering::Relaxed),
            verdict_errors: self.verdict_errors.load(Ordering::Relaxed),
        }
    }
}

/// A running delay line; dropping it removes its rule and releases every held packet.
#[derive(Debug)]
pub struct DelayLine {
    table: String,
    queue: u16,
    stop: Arc<OwnedFd>,
    counters: Arc<Counters>,
    worker: Option<JoinHandle<Result<(), DelayError>>>,
}

/// Queue numbers tried, per namespace; a number another program holds is skipped.
const QUEUE_BASE: u16 = 3000;
const QUEUE_TRIES: u16 = 256;

impl DelayLine {
    /// Starts a line on `dev`'s `direction` in network namespace `netns` (`/var/run/netns/NAME`; `None`:
    /// the caller's namespace). Returns once the rule is installed, so the next packet is delayed.
    pub fn start(
        netns: Option<&str>,
        dev: &str,
        direction: Direction,
        config: DelayConfig,
    ) -> Result<Self, DelayError> {
        validate(dev, &config)?;
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let table = format!(
            "testbed_delay_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let counters = Arc::new(Counters::default());
        let (ready_tx, ready_rx) = mpsc::channel();
        let worker = {
            let netns = netns.map(str::to_owned);
            let dev = dev.to_owned();
            let table = table.clone();
            let stop = stop.clone();
            let counters = counters.clone();
            std::thread::Builder::new()
                .name(format!("delay-{dev}"))
                .spawn(move || {
                    run_worker(
                        netns.as_deref(),
                        &dev,
                        direction,
                        &config,
                        &table,
                        &stop,
                        &counters,
                        ready_tx,
                    )
                })?
        };
        match ready_rx.recv() {
            Ok(queue) => Ok(Self {
                table,
                queue,
                stop,
                counters,
                worker: Some(worker),
            }),
            // The worker failed before it was ready: its result says why.
            Err(_) => Err(worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                .err()
                .unwrap_or_else(|| DelayError::Invalid("delay line worker exited".into()))),
        }
    }

    /// The nftables table (family `inet`) holding the rule.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The nfqueue number the line is bound to.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// The counters so far.
    pub fn stats(&self) -> DelayStats {
        self.counters.snapshot()
    }

    /// Stops the line: deletes the rule, releases every held packet, unbinds; returns the final counters.
    pub fn stop(mut self) -> Result<DelayStats, DelayError> {
        self.shutdown()?;
        Ok(self.counters.snapshot())
    }

    fn shutdown(&mut self) -> Result<(), DelayError> {
        let Some(worker) = self.worker.take() else {
            return Ok(());
        };
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a valid buffer to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("delay line {}: stopping: {e}", self.table);
        }
    }
}

fn validate(dev: &str, config: &DelayConfig) -> Result<(), DelayError> {
    if dev.is_empty() || dev.len() >= libc::IFNAMSIZ || dev.contains(['\0', '/', ' ']) {
        return Err(DelayError::Invalid(format!("interface name {dev:?}")));
    }
    if !(0.0..=1.0).contains(&config.loss) {
        return Err(DelayError::Invalid(format!(
            "loss {} is not between 0 and 1",
            config.loss
        )));
    }
    if config.limit == 0 {
        return Err(DelayError::Invalid("limit 0".into()));
    }
    if config.delay > Duration::from_secs(60) || config.jitter > Duration::from_secs(60) {
        return Err(DelayError::Invalid("delay or jitter above 60 s".into()));
    }
    Ok(())
}

/// `name` NUL-padded to `IFNAMSIZ`, as `meta oifname` loads it.
fn interface_name_bytes(name: &str) -> [u8; libc::IFNAMSIZ] {
    let mut bytes = [0u8; libc::IFNAMSIZ];
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    bytes
}

fn install_batch(table_name: &str, dev: &str, direction: Direction, queue: u16) -> Batch {
    let table = Table::new(nft::cstring(table_name), ProtoFamily::Inet);
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    let mut chain = Chain::new(c"delay", &table);
    match direction {
        // After NAT (100) and the mangle/filter hooks, so the packet is final when held.
        Direction::Egress => chain.set_hook(Hook::PostRouting, 300),
        // Before conntrack (-200): held packets have not created state yet.
        Direction::Ingress => chain.set_hook(Hook::PreRouting, -300),
    }
    chain.set_type(ChainType::Filter);
    chain.set_policy(Policy::Accept);
    batch.add(&chain, MsgType::Add);
    let mut rule = Rule::new(&chain);
    rule.add_expr(match direction {
        Direction::Egress => &Meta::OifName,
        Direction::Ingress => &Meta::IifName,
    });
    let name = interface_name_bytes(dev);
    rule.add_expr(&Cmp::new(CmpOp::Eq, &name[..]));
    rule.add_expr(&QueueExpr {
        num: queue,
        bypass: true,
    });
    batch.add(&rule, MsgType::Add);
    batch
}

/// xorshift64*: loss and jitter draws; quality is ample for a test instrument.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let seed = if seed == 0 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            nanos ^ u64::from(std::process::id()) << 32
        } else {
            seed
        };
        Self(seed | 1)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The sans-IO heart of the line: which packets to drop, and when each held one is due.
struct Schedule {
    config: DelayConfig,
    rng: Rng,
    held: std::collections::VecDeque<(u32, Instant)>,
    last_release: Option<Instant>,
}

impl Schedule {
    fn new(config: DelayConfig) -> Self {
        let rng = Rng::new(config.seed);
        Self {
            config,
            rng,
            held: Default::default(),
            last_release: None,
        }
    }

    /// A packet arrived at `now`: `false` means drop it now, `true` that it is held.
    fn arrive(&mut self, id: u32, now: Instant) -> bool {
        if self.config.loss > 0.0 && self.rng.next_f64() < self.config.loss {
            return false;
        }
        let mut delay = self.config.delay;
        if !self.config.jitter.is_zero() {
            let offset = self.config.jitter.mul_f64(2.0 * self.rng.next_f64());
            delay = (delay + offset).saturating_sub(self.config.jitter);
        }
        let mut release = now + delay;
        if let Some(last) = self.last_release {
            release = release.max(last);
        }
        self.last_release = Some(release);
        self.held.push_back((id, release));
        true
    }

    /// The id of the last packet due at `now` (all before it are due too), removing them; and how many.
    fn due(&mut self, now: Instant) -> Option<(u32, u64)> {
        let mut last = None;
        let mut count = 0;
        while let Some(&(id, release)) = self.held.front() {
            if release > now {
                break;
            }
            self.held.pop_front();
            last = Some(id);
            count += 1;
        }
        last.map(|id| (id, count))
    }

    fn next_release(&self) -> Option<Instant> {
        self.held.front().map(|&(_, release)| release)
    }

    /// Everything still held, for the final release: the last id and how many.
    fn drain(&mut self) -> Option<(u32, u64)> {
        let count = self.held.len() as u64;
        let last = self.held.back().map(|&(id, _)| id);
        self.held.clear();
        last.map(|id| (id, count))
    }
}

#[allow(clippy::too_many_arguments)]
fn run_worker(
    netns: Option<&str>,
    dev: &str,
    direction: Direction,
    config: &DelayConfig,
    table: &str,
    stop: &OwnedFd,
    counters: &Counters,
    ready: mpsc::Sender<u16>,
) -> Result<(), DelayError> {
    if let Some(ns) = netns {
        crate::enter_namespace(ns)?;
    }
    let mut flags = nfqueue::flags::GSO;
    if config.fail_open {
        flags |= nfqueue::flags::FAIL_OPEN;
    }
    let queue_config = QueueConfig {
        copy: CopyMode::Meta,
        max_len: config.limit,
        flags,
    };
    let mut queue = None;
    for number in QUEUE_BASE..QUEUE_BASE + QUEUE_TRIES {
        match Queue::bind(number, queue_config) {
            Ok(q) => {
                queue = Some(q);
                break;
            }
            Err(QueueError::Busy(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let mut queue = queue.ok_or_else(|| {
        DelayError::Invalid(format!(
            "no free nfqueue number in {QUEUE_BASE}..{}",
            QUEUE_BASE + QUEUE_TRIES
        ))
    })?;
    nft::send_batch(
        install_batch(table, dev, direction, queue.number()),
        "install delay rule",
    )?;
    let _ = ready.send(queue.number());
    let result = serve(&mut queue, config, stop, counters);
    // Whatever happened: no new packets, then release what is held, then unbind.
    let removed = nft::send_batch(
        nft::delete_table_batch(table, ProtoFamily::Inet),
        "delete delay rule",
    );
    // Packets queued before the deletion but not read yet come after every held one (ids only grow).
    let mut unread = Vec::new();
    while queue.recv(|p| unread.push(p.id)).unwrap_or(0) > 0 {}
    let released = result.and_then(|mut schedule| {
        let held = schedule.drain();
        let last = unread.last().copied().or(held.map(|(id, _)| id));
        if let Some(last) = last {
            queue.verdict_batch(last, Verdict::Accept)?;
            let count = held.map_or(0, |(_, n)| n) + unread.len() as u64;
            counters
                .queued
                .fetch_add(unread.len() as u64, Ordering::Relaxed);
            counters.released.fetch_add(count, Ordering::Relaxed);
        }
        Ok(())
    });
    counters
        .verdict_errors
        .store(queue.verdict_errors(), Ordering::Relaxed);
    let unbound = queue.unbind().map_err(DelayError::from);
    released?;
    removed?;
    unbound
}

/// The receive-hold-release loop, until `stop` is signalled; returns what is still held.
fn serve(
    queue: &mut Queue,
    config: &DelayConfig,
    stop: &OwnedFd,
    counters: &Counters,
) -> Result<Schedule, DelayError> {
    let mut schedule = Schedule::new(config.clone());
    let mut arrived: Vec<u32> = Vec::with_capacity(256);
    loop {
        // Read everything waiting; one arrival time per read is precise enough (microseconds).
        loop {
            arrived.clear();
            let n = queue.recv(|p| arrived.push(p.id))?;
            if n == 0 {
                break;
            }
            let now = Instant::now();
            counters.queued.fetch_add(n as u64, Ordering::Relaxed);
            for &id in &arrived {
                if !schedule.arrive(id, now) {
                    // Dropped before any later batch accept can cover its id.
                    queue.verdict(id, Verdict::Drop)?;
                    counters.lost.fetch_add(1, Ordering::Relaxed);
                }
            }
            counters
                .max_held
                .fetch_max(schedule.held.len() as u64, Ordering::Relaxed);
        }
        if let Some((last, count)) = schedule.due(Instant::now()) {
            queue.verdict_batch(last, Verdict::Accept)?;
            counters.released.fetch_add(count, Ordering::Relaxed);
        }
        counters
            .verdict_errors
            .store(queue.verdict_errors(), Ordering::Relaxed);
        let timeout = schedule
            .next_release()
            .map(|at| at.saturating_duration_since(Instant::now()));
        if wait(queue.socket().as_raw_fd(), stop.as_raw_fd(), timeout)? {
            return Ok(schedule);
        }
    }
}

/// Waits until the queue socket is readable, `timeout` passes, or `stop` fires (returns `true`).
fn wait(socket: i32, stop: i32, timeout: Option<Duration>) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: socket,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: fds and ts are valid for the call; a null sigmask leaves the mask unchanged.
    let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, ts_ptr, std::ptr::null()) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(fds[1].revents & libc::POLLIN != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(delay_ms: u64, jitter_ms: u64, loss: f64) -> DelayConfig {
        DelayConfig {
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::from_millis(jitter_ms),
            loss,
            seed: 42,
            ..Default::default()
        }
    }

    #[test]
    fn packets_are_released_after_the_delay_in_order() {
        let t0 = Instant::now();
        let mut s = Schedule::new(config(20, 0, 0.0));
        assert!(s.arrive(1, t0));
        assert!(s.arrive(2, t0 + Duration::from_millis(5)));
        assert_eq!(s.due(t0 + Duration::from_millis(19)), None);
        assert_eq!(s.due(t0 + Duration::from_millis(20)), Some((1, 1)));
        assert_eq!(s.next_release(), Some(t0 + Duration::from_millis(25)));
        assert_eq!(s.due(t0 + Duration::from_millis(30)), Some((2, 1)));
        assert_eq!(s.due(t0 + Duration::from_millis(30)), None);
    }

    #[test]
    fn jitter_stays_in_range_and_never_reorders() {
        let t0 = Instant::now();
        let mut s = Schedule::new(config(20, 10, 0.0));
        let mut previous = t0;
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 100);
            assert!(s.arrive(i, now));
            let (_, release) = *s.held.back().unwrap();
            assert!(release >= previous, "reordered at {i}");
            // Never earlier than delay - jitter; later than delay + jitter only to keep order.
            assert!(release >= now + Duration::from_millis(10));
            previous = release;
        }
        let spread: Vec<Duration> = s
            .held
            .iter()
            .enumerate()
            .map(|(i, &(_, r))| r - (t0 + Duration::from_micros(i as u64 * 100)))
            .collect();
        assert!(spread.iter().all(|d| *d <= Duration::from_millis(31)));
        assert!(spread.iter().any(|d| *d < Duration::from_millis(25)));
    }

    #[test]
    fn loss_drops_about_the_configured_fraction() {
        let mut s = Schedule::new(config(0, 0, 0.1));
        let now = Instant::now();
        let dropped = (0..100_000u32).filter(|&i| !s.arrive(i, now)).count();
        assert!((9_000..11_000).contains(&dropped), "{dropped}");
    }

    #[test]
    fn drain_releases_everything_up_to_the_last_id() {
        let mut s = Schedule::new(config(1000, 0, 0.0));
        let now = Instant::now();
        for id in [7, 8, 9] {
            s.arrive(id, now);
        }
        assert_eq!(s.drain(), Some((9, 3)));
        assert_eq!(s.drain(), None);
    }

    #[test]
    fn bad_settings_are_refused() {
        let ok = DelayConfig::default();
        assert!(validate("", &ok).is_err());
        assert!(validate("averyverylongname", &ok).is_err());
        assert!(validate("p1", &config(1, 0, 1.5)).is_err());
        let zero = DelayConfig {
            limit: 0,
            ..Default::default()
        };
        assert!(validate("p1", &zero).is_err());
        assert!(validate("p1", &ok).is_ok());
    }
}
