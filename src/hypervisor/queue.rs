//! The priority queue in front of every hypervisor: at most
//! `max_concurrent` calls run against one hypervisor at a time, and the
//! callers waiting for a slot are served by lane — CRITICAL (console
//! opens) first, then HIGH (power actions), NORMAL (VM lists) and LOW
//! (thumbnails, background refresh) — first in, first out within a lane.
//!
//! One slot (`critical_reserve`) is kept for console opens: the other lanes
//! never take the last free slot, so a console open waits for no
//! thumbnail or power action to finish — only for other console opens.
//!
//! Every lane is bounded (`max_queue_depth` waiters; one more is refused
//! with [`HypervisorError::Busy`], a 503 with Retry-After), and a wait is
//! bounded by `queue_timeout_ms`. A caller that goes away while it waits
//! (its future dropped: the HTTP client disconnected, or every caller of a
//! single-flight fetch left) leaves the queue without ever reaching the
//! hypervisor: its slot is skipped when its turn comes.
//!
//! Runs on the control plane's runtime. The lock is a std mutex held for a
//! few pushes and pops, never across an await. It depends on nothing but
//! the hypervisor model.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::model::{HvResult, HypervisorError};

/// Calls running at once against one hypervisor unless configured.
pub const DEFAULT_MAX_CONCURRENT: usize = 4;
/// Serde default of `max_concurrent` in `[[hypervisors]]`.
pub fn default_max_concurrent() -> usize {
    DEFAULT_MAX_CONCURRENT
}

/// Slots only console opens may take, unless configured.
pub const DEFAULT_CRITICAL_RESERVE: usize = 1;
/// Waiters per lane unless configured.
pub const DEFAULT_MAX_QUEUE_DEPTH: usize = 1000;
/// Longest wait for a slot unless configured.
pub const DEFAULT_QUEUE_TIMEOUT_MS: u64 = 30_000;
/// Recent waits kept per lane for the p99 (a ring; older ones drop out).
pub const WAIT_SAMPLES: usize = 1024;
/// Largest `max_concurrent` accepted.
pub const MAX_CONCURRENT_LIMIT: usize = 256;
/// Largest `max_queue_depth` accepted.
pub const MAX_QUEUE_DEPTH_LIMIT: usize = 100_000;
/// Seconds a refused caller is told to wait (Retry-After).
pub const RETRY_AFTER_S: u64 = 1;

/// The lanes, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    /// Console opens: a person is waiting in front of a blank screen.
    Critical,
    /// Power actions.
    High,
    /// VM lists and descriptions.
    Normal,
    /// Thumbnails and background refreshes.
    Low,
}

impl Lane {
    pub const ALL: [Lane; 4] = [Lane::Critical, Lane::High, Lane::Normal, Lane::Low];

    fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Lane::Critical => "critical",
            Lane::High => "high",
            Lane::Normal => "normal",
            Lane::Low => "low",
        }
    }
}

/// Sizes and times of one hypervisor's queue; units in the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub max_concurrent: usize,
    /// Of `max_concurrent`, slots only the CRITICAL lane may use; below
    /// `max_concurrent` (0 when it is 1).
    pub critical_reserve: usize,
    pub max_queue_depth: usize,
    pub queue_timeout_ms: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            critical_reserve: DEFAULT_CRITICAL_RESERVE,
            max_queue_depth: DEFAULT_MAX_QUEUE_DEPTH,
            queue_timeout_ms: DEFAULT_QUEUE_TIMEOUT_MS,
        }
    }
}

impl QueueConfig {
    /// Refuses sizes and times that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_concurrent == 0 || self.max_concurrent > MAX_CONCURRENT_LIMIT {
            return Err(format!(
                "max_concurrent {} must be 1..={MAX_CONCURRENT_LIMIT}",
                self.max_concurrent
            ));
        }
        if self.critical_reserve >= self.max_concurrent && self.max_concurrent > 1 {
            return Err(format!(
                "critical_reserve {} must be below max_concurrent {}",
                self.critical_reserve, self.max_concurrent
            ));
        }
        if self.max_concurrent == 1 && self.critical_reserve > 0 {
            return Err("critical_reserve must be 0 when max_concurrent is 1".into());
        }
        if self.max_queue_depth == 0 || self.max_queue_depth > MAX_QUEUE_DEPTH_LIMIT {
            return Err(format!(
                "max_queue_depth {} must be 1..={MAX_QUEUE_DEPTH_LIMIT}",
                self.max_queue_depth
            ));
        }
        if self.queue_timeout_ms == 0 {
            return Err("queue_timeout_ms must be above 0".into());
        }
        Ok(())
    }
}

/// One lane's figures (`GET /api/v1/queue/stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaneStats {
    pub lane: Lane,
    /// Callers that asked for a slot in this lane.
    pub total_requests: u64,
    /// Callers waiting now.
    pub in_queue: usize,
    /// Mean and 99th percentile of the waits of the last
    /// [`WAIT_SAMPLES`] callers that got a slot.
    pub avg_wait_ms: f64,
    pub p99_wait_ms: f64,
    /// Refused because the lane was full.
    pub rejected: u64,
    /// Waited past `queue_timeout_ms`.
    pub timed_out: u64,
    /// Went away while waiting (skipped, never reached the hypervisor).
    pub abandoned: u64,
}

/// The whole queue's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueStats {
    pub max_concurrent: usize,
    pub running: usize,
    pub lanes: Vec<LaneStats>,
}

#[derive(Debug, Default)]
struct LaneState {
    waiters: VecDeque<Waiter>,
    total_requests: u64,
    rejected: u64,
    timed_out: u64,
    abandoned: u64,
    /// Waits in microseconds, a ring of [`WAIT_SAMPLES`].
    waits_us: Vec<u64>,
    next_sample: usize,
}

impl LaneState {
    fn record_wait(&mut self, waited: Duration) {
        let us = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        if self.waits_us.len() < WAIT_SAMPLES {
            self.waits_us.push(us);
        } else {
            self.waits_us[self.next_sample] = us;
        }
        self.next_sample = (self.next_sample + 1) % WAIT_SAMPLES;
    }

    /// Waiters whose caller went away are dropped from the count here.
    fn purge_abandoned(&mut self) {
        let before = self.waiters.len();
        self.waiters.retain(|w| !w.tx.is_closed());
        self.abandoned += (before - self.waiters.len()) as u64;
    }

    fn stats(&self, lane: Lane) -> LaneStats {
        let (avg, p99) = wait_figures(&self.waits_us);
        LaneStats {
            lane,
            total_requests: self.total_requests,
            in_queue: self.waiters.len(),
            avg_wait_ms: avg,
            p99_wait_ms: p99,
            rejected: self.rejected,
            timed_out: self.timed_out,
            abandoned: self.abandoned,
        }
    }
}

/// Mean and p99 (nearest rank) of waits in µs, in ms.
fn wait_figures(waits_us: &[u64]) -> (f64, f64) {
    if waits_us.is_empty() {
        return (0.0, 0.0);
    }
    let sum: u128 = waits_us.iter().map(|w| u128::from(*w)).sum();
    let avg = sum as f64 / waits_us.len() as f64 / 1000.0;
    let mut sorted = waits_us.to_vec();
    sorted.sort_unstable();
    let rank = (sorted.len() * 99).div_ceil(100).max(1) - 1;
    (avg, sorted[rank] as f64 / 1000.0)
}

#[derive(Debug)]
struct Waiter {
    tx: oneshot::Sender<Permit>,
    enqueued: Instant,
}

#[derive(Debug, Default)]
struct State {
    running: usize,
    lanes: [LaneState; 4],
}

impl State {
    /// The next waiter that may take a slot now: the most urgent lane's
    /// oldest, among the lanes under their limit.
    fn pop_next(&mut self, config: &QueueConfig) -> Option<(Lane, Waiter)> {
        let running = self.running;
        Lane::ALL
            .iter()
            .filter(|lane| running < config.limit(**lane))
            .find_map(|lane| Some((*lane, self.lanes[lane.index()].waiters.pop_front()?)))
    }
}

impl QueueConfig {
    /// Slots a lane's calls may fill: all for console opens, all but the
    /// reserve for the rest.
    fn limit(&self, lane: Lane) -> usize {
        match lane {
            Lane::Critical => self.max_concurrent,
            _ => self.max_concurrent - self.critical_reserve,
        }
    }
}

#[derive(Debug)]
struct Inner {
    config: QueueConfig,
    state: Mutex<State>,
}

/// One hypervisor's queue. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct PriorityQueue {
    inner: Arc<Inner>,
}

/// A running call's slot; dropping it lets the next waiter in.
#[derive(Debug)]
pub struct Permit {
    queue: Option<Arc<Inner>>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(inner) = self.queue.take() {
            release(&inner);
        }
    }
}

fn lock(inner: &Inner) -> MutexGuard<'_, State> {
    // A panic while holding this lock cannot leave the counters worse than
    // off by one; keep serving.
    inner.state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A slot freed: hand it to the next waiter still there.
fn release(inner: &Arc<Inner>) {
    let mut state = lock(inner);
    state.running = state.running.saturating_sub(1);
    while state.running < inner.config.max_concurrent {
        let Some((lane, waiter)) = state.pop_next(&inner.config) else {
            break;
        };
        state.running += 1;
        let permit = Permit {
            queue: Some(inner.clone()),
        };
        match waiter.tx.send(permit) {
            Ok(()) => state.lanes[lane.index()].record_wait(waiter.enqueued.elapsed()),
            Err(mut unused) => {
                // The caller left: the slot goes to the next one. Disarm
                // the permit first (its drop would take this lock again).
                unused.queue = None;
                state.running -= 1;
                state.lanes[lane.index()].abandoned += 1;
            }
        }
    }
}

impl PriorityQueue {
    pub fn new(config: QueueConfig) -> Result<PriorityQueue, String> {
        config.validate()?;
        Ok(PriorityQueue {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(State::default()),
            }),
        })
    }

    pub fn config(&self) -> QueueConfig {
        self.inner.config
    }

    /// Wait for a slot in `lane`. Refused at once when the lane is full;
    /// `Busy` after `queue_timeout_ms`. Dropping the future leaves the
    /// queue.
    pub async fn admit(&self, lane: Lane) -> HvResult<Permit> {
        let rx = {
            let mut state = lock(&self.inner);
            state.lanes[lane.index()].total_requests += 1;
            if state.running < self.inner.config.limit(lane) {
                state.running += 1;
                state.lanes[lane.index()].record_wait(Duration::ZERO);
                return Ok(Permit {
                    queue: Some(self.inner.clone()),
                });
            }
            let lane_state = &mut state.lanes[lane.index()];
            lane_state.purge_abandoned();
            if lane_state.waiters.len() >= self.inner.config.max_queue_depth {
                lane_state.rejected += 1;
                return Err(HypervisorError::Busy(format!(
                    "{} callers already wait in the {} lane",
                    lane_state.waiters.len(),
                    lane.name()
                )));
            }
            let (tx, rx) = oneshot::channel();
            lane_state.waiters.push_back(Waiter {
                tx,
                enqueued: Instant::now(),
            });
            rx
        };
        let limit = Duration::from_millis(self.inner.config.queue_timeout_ms);
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(permit)) => Ok(permit),
            // The sender is only dropped by `release` after a failed send,
            // which means we were gone; cannot happen while we wait.
            Ok(Err(_)) => Err(HypervisorError::Busy("queue closed".into())),
            Err(_) => {
                let mut state = lock(&self.inner);
                let lane_state = &mut state.lanes[lane.index()];
                lane_state.timed_out += 1;
                // Our waiter is closed now (rx dropped with the timeout):
                // purged here so in_queue stays true. Not counted as
                // abandoned: it timed out.
                let before = lane_state.abandoned;
                lane_state.purge_abandoned();
                lane_state.abandoned = before;
                Err(HypervisorError::Busy(format!(
                    "no slot within {} ms in the {} lane",
                    self.inner.config.queue_timeout_ms,
                    lane.name()
                )))
            }
        }
    }

    /// Run `call` once a slot in `lane` is free, holding the slot until it
    /// finishes.
    pub async fn run<T, F>(&self, lane: Lane, call: F) -> HvResult<T>
    where
        F: std::future::Future<Output = HvResult<T>>,
    {
        let _permit = self.admit(lane).await?;
        call.await
    }

    pub fn stats(&self) -> QueueStats {
        let mut state = lock(&self.inner);
        let running = state.running;
        let lanes = Lane::ALL
            .iter()
            .map(|lane| {
                let lane_state = &mut state.lanes[lane.index()];
                lane_state.purge_abandoned();
                lane_state.stats(*lane)
            })
            .collect();
        QueueStats {
            max_concurrent: self.inner.config.max_concurrent,
            running,
            lanes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn queue(max_concurrent: usize, depth: usize, timeout_ms: u64) -> PriorityQueue {
        PriorityQueue::new(QueueConfig {
            max_concurrent,
            critical_reserve: 0,
            max_queue_depth: depth,
            queue_timeout_ms: timeout_ms,
        })
        .unwrap()
    }

    fn lane_stats(q: &PriorityQueue, lane: Lane) -> LaneStats {
        q.stats()
            .lanes
            .into_iter()
            .find(|l| l.lane == lane)
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn lanes_are_served_most_urgent_first_and_fifo_within() {
        let q = queue(1, 100, 60_000);
        let held = q.admit(Lane::Normal).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Queued in an order that is the reverse of the priorities.
        for (i, lane) in [
            Lane::Low,
            Lane::Low,
            Lane::Normal,
            Lane::High,
            Lane::Critical,
        ]
        .into_iter()
        .enumerate()
        {
            let (q, order) = (q.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _p = q.admit(lane).await.unwrap();
                order.lock().unwrap().push((lane, i));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
            tokio::task::yield_now().await;
        }
        assert_eq!(q.stats().lanes.iter().map(|l| l.in_queue).sum::<usize>(), 5);
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            *order.lock().unwrap(),
            vec![
                (Lane::Critical, 4),
                (Lane::High, 3),
                (Lane::Normal, 2),
                (Lane::Low, 0),
                (Lane::Low, 1)
            ]
        );
        assert_eq!(q.stats().running, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_concurrent_calls_run() {
        let q = queue(3, 1000, 60_000);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..40 {
            let (q, running, peak) = (q.clone(), running.clone(), peak.clone());
            let lane = Lane::ALL[i % 4];
            tasks.push(tokio::spawn(async move {
                q.run(lane, async {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                })
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        let total: u64 = q.stats().lanes.iter().map(|l| l.total_requests).sum();
        assert_eq!(total, 40);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_lane_refuses_with_busy_and_counts_it() {
        let q = queue(1, 2, 60_000);
        let _held = q.admit(Lane::Low).await.unwrap();
        let a = tokio::spawn({
            let q = q.clone();
            async move { q.admit(Lane::Low).await.map(|_| ()) }
        });
        let b = tokio::spawn({
            let q = q.clone();
            async move { q.admit(Lane::Low).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        let err = q.admit(Lane::Low).await.unwrap_err();
        assert_eq!(err.code(), "hypervisor_busy");
        assert_eq!(err.retry_after_s(), Some(RETRY_AFTER_S));
        // Another lane is not full.
        let c = tokio::spawn({
            let q = q.clone();
            async move { q.admit(Lane::Critical).await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        let low = lane_stats(&q, Lane::Low);
        assert_eq!((low.rejected, low.in_queue, low.total_requests), (1, 2, 4));
        assert_eq!(lane_stats(&q, Lane::Critical).in_queue, 1);
        a.abort();
        b.abort();
        c.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_leaves_never_gets_the_slot() {
        let q = queue(1, 10, 60_000);
        let held = q.admit(Lane::Normal).await.unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let gone = tokio::spawn({
            let (q, ran) = (q.clone(), ran.clone());
            async move {
                q.run(Lane::Critical, async {
                    ran.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                })
                .await
            }
        });
        let stays = tokio::spawn({
            let (q, ran) = (q.clone(), ran.clone());
            async move {
                q.run(Lane::Low, async {
                    ran.fetch_add(10, Ordering::SeqCst);
                    Ok(())
                })
                .await
            }
        });
        tokio::task::yield_now().await;
        gone.abort();
        let _ = gone.await;
        drop(held);
        stays.await.unwrap().unwrap();
        assert_eq!(
            ran.load(Ordering::SeqCst),
            10,
            "only the caller still there ran"
        );
        assert_eq!(lane_stats(&q, Lane::Critical).abandoned, 1);
        assert_eq!(q.stats().running, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_timeout_is_busy() {
        let q = queue(1, 10, 250);
        let _held = q.admit(Lane::Normal).await.unwrap();
        let started = tokio::time::Instant::now();
        let err = q.admit(Lane::Low).await.unwrap_err();
        assert_eq!(err.code(), "hypervisor_busy");
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        let low = lane_stats(&q, Lane::Low);
        assert_eq!((low.timed_out, low.in_queue, low.abandoned), (1, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_reserve_lets_a_console_open_past_a_thumbnail_storm() {
        let q = PriorityQueue::new(QueueConfig {
            max_concurrent: 3,
            critical_reserve: 1,
            ..QueueConfig::default()
        })
        .unwrap();
        let peak = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let mut storm = Vec::new();
        for _ in 0..50 {
            let (q, peak, running) = (q.clone(), peak.clone(), running.clone());
            storm.push(tokio::spawn(async move {
                q.run(Lane::Low, async {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                })
                .await
            }));
        }
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        let permit = q.admit(Lane::Critical).await.unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "the reserved slot was free"
        );
        drop(permit);
        for t in storm {
            t.await.unwrap().unwrap();
        }
        assert_eq!(
            peak.load(Ordering::SeqCst),
            2,
            "thumbnails never took the reserve"
        );
    }

    #[test]
    fn wait_figures_are_mean_and_nearest_rank_p99() {
        assert_eq!(wait_figures(&[]), (0.0, 0.0));
        let waits: Vec<u64> = (1..=100).map(|ms| ms * 1000).collect();
        let (avg, p99) = wait_figures(&waits);
        assert!((avg - 50.5).abs() < 1e-9);
        assert_eq!(p99, 99.0);
    }

    #[test]
    fn config_limits_are_checked() {
        assert!(QueueConfig::default().validate().is_ok());
        for bad in [
            QueueConfig {
                max_concurrent: 0,
                ..QueueConfig::default()
            },
            QueueConfig {
                max_queue_depth: 0,
                ..QueueConfig::default()
            },
            QueueConfig {
                queue_timeout_ms: 0,
                ..QueueConfig::default()
            },
            QueueConfig {
                max_concurrent: 2,
                critical_reserve: 2,
                ..QueueConfig::default()
            },
            QueueConfig {
                max_concurrent: 1,
                critical_reserve: 1,
                ..QueueConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
