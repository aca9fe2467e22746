//! Alerts that are raised once when a condition starts and cleared once it
//! ends (`alert` / `alert_cleared`), with hysteresis so a condition that
//! flickers does not flood the subscribers:
//!
//! - `hypervisor_down` (critical, per hypervisor): its last call did not
//!   reach it; cleared once it has been reachable for
//!   `alert_clear_after_ms`;
//! - `hypervisor_pool_exhausted` (warning, per hypervisor): a checkout of
//!   the hypervisor's API-session pool had to wait, or was refused, for
//!   lack of a free session; cleared once none had to for
//!   `alert_clear_after_ms`;
//! - `port_pool_high` (warning, one for the appliance): more than
//!   [`PORT_POOL_RAISE_PERCENT`] of the dedicated ports allocated; cleared
//!   once under [`PORT_POOL_CLEAR_PERCENT`] for `alert_clear_after_ms`
//!   (between the two it stays as it is);
//! - `worker_unhealthy` (critical, per worker): a worker's loop has not
//!   turned for longer than `[control] worker_stall_ms` (the limit
//!   `/readyz` uses), or its thread ended; cleared once it has turned
//!   normally for `alert_clear_after_ms`;
//! - `rate_limit_sustained` (warning, one for the appliance): the per-IP
//!   limits (REST requests, console handshakes, connections in their
//!   handshake) refused at least `rate_limit_alert_refusals_per_s` a
//!   second for `rate_limit_alert_after_ms`; cleared once under half that
//!   rate for `alert_clear_after_ms`. No client address is in it: the
//!   log lines of the refusals name them.
//!
//! [`AlertCenter`] is fed samples (counter totals, hypervisors'
//! reachability, the port pool's use and worker heartbeats,
//! with the time passed in) by the control plane every
//! `alert_check_interval_ms`, publishes on the bus and keeps the counts
//! `/metrics` shows. [`Hysteresis`] is the detector each alert uses.
//!
//! Must not depend on `crate::control`, `crate::hypervisor`,
//! `crate::dataplane`, `crate::io` or `crate::plane`: the control plane
//! reads those and passes plain figures in.

use std::collections::{BTreeMap, HashMap};

use super::bus::EventBus;
use super::protocol::{AlertData, Event};

/// The alert types this module raises, as they appear in `alert_type`.
pub const HYPERVISOR_DOWN: &str = "hypervisor_down";
pub const POOL_EXHAUSTED: &str = "hypervisor_pool_exhausted";
pub const PORT_POOL_HIGH: &str = "port_pool_high";
pub const WORKER_UNHEALTHY: &str = "worker_unhealthy";
pub const RATE_LIMIT_SUSTAINED: &str = "rate_limit_sustained";
/// The alert types counted in `/metrics` (this module's).
pub const ALERT_TYPES: [&str; 5] = [
    HYPERVISOR_DOWN,
    POOL_EXHAUSTED,
    PORT_POOL_HIGH,
    RATE_LIMIT_SUSTAINED,
    WORKER_UNHEALTHY,
];
/// Above this share of the dedicated ports allocated, `port_pool_high`.
pub const PORT_POOL_RAISE_PERCENT: f64 = 90.0;
/// Under this share, `port_pool_high` may clear: the 5-point band keeps a
/// pool that hovers around 90 % from raising and clearing on every
/// allocation.
pub const PORT_POOL_CLEAR_PERCENT: f64 = 85.0;
/// The shortest span a refusal rate is measured over, in ms: the workers
/// report their counts once a second, so a span of three reports keeps a
/// steady rate's estimate within a third of the truth.
pub const RATE_WINDOW_MS: u64 = 3_000;
/// Hypervisors tracked at most (each holds two integers and a detector);
/// a fleet is far smaller, the bound only caps a misconfiguration.
pub const MAX_TRACKED_HYPERVISORS: usize = 4096;

/// The thresholds, from `[events]` and `[control] worker_stall_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertThresholds {
    /// How long a condition must be gone before its alert clears.
    pub clear_after_ms: u64,
    /// A worker whose loop has not turned for longer is unhealthy.
    pub worker_stall_ms: u64,
    /// Refusals per second by the per-IP limits that count as sustained
    /// rate limiting (0 = the alert is off).
    pub rate_limit_refusals_per_s: u32,
    /// How long the rate must hold before the alert is raised.
    pub rate_limit_after_ms: u64,
}

/// How a sample looks to a detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The condition holds.
    Bad,
    /// The condition is clearly gone.
    Good,
    /// Between the two thresholds: neither raises nor clears, and resets
    /// neither's timer's progress (the hysteresis band).
    Between,
}

/// What a sample changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Raised,
    Cleared,
}

/// Raise after the condition held for `raise_after_ms`, clear after it
/// was gone for `clear_after_ms`; each at most once per episode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hysteresis {
    raise_after_ms: u64,
    clear_after_ms: u64,
    active: bool,
    /// Since when the samples say Bad (inactive) or Good (active).
    since_ms: Option<u64>,
}

impl Hysteresis {
    pub fn new(raise_after_ms: u64, clear_after_ms: u64) -> Self {
        Self {
            raise_after_ms,
            clear_after_ms,
            active: false,
            since_ms: None,
        }
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// One sample at `now_ms` (monotonic).
    pub fn observe(&mut self, level: Level, now_ms: u64) -> Option<Change> {
        let (toward, wait_ms) = if self.active {
            (Level::Good, self.clear_after_ms)
        } else {
            (Level::Bad, self.raise_after_ms)
        };
        if level == Level::Between {
            return None;
        }
        if level != toward {
            self.since_ms = None;
            return None;
        }
        let since = *self.since_ms.get_or_insert(now_ms);
        if now_ms.saturating_sub(since) < wait_ms {
            return None;
        }
        self.active = !self.active;
        self.since_ms = None;
        Some(if self.active {
            Change::Raised
        } else {
            Change::Cleared
        })
    }
}

/// A counter total turned into a rate over spans of at least `window_ms`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateOf {
    /// The span's start: (total, ms).
    start: Option<(u64, u64)>,
}

impl RateOf {
    /// Per second since the span's start, once the span is `window_ms`
    /// long (then a new span starts); None before (the first sample only
    /// starts a span). A total that went down (a restarted source) counts
    /// from zero.
    pub fn per_s(&mut self, total: u64, now_ms: u64, window_ms: u64) -> Option<f64> {
        let Some((start_total, start_ms)) = self.start else {
            self.start = Some((total, now_ms));
            return None;
        };
        let elapsed_ms = now_ms.saturating_sub(start_ms);
        if elapsed_ms < window_ms.max(1) {
            return None;
        }
        self.start = Some((total, now_ms));
        let delta = total.checked_sub(start_total).unwrap_or(total);
        Some(delta as f64 * 1000.0 / elapsed_ms as f64)
    }
}

/// One worker's heartbeat, as the control plane reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerBeat {
    pub worker: usize,
    pub alive: bool,
    pub last_turn_age_ms: u64,
}

/// An alert in force: what its clearing repeats.
#[derive(Debug, Clone)]
struct Raised {
    data: AlertData,
    at_ms: u64,
}

struct PoolWatch {
    detector: Hysteresis,
    /// Checkouts that had to wait (refused ones included), at the
    /// previous sample.
    last_total: Option<u64>,
}

/// `/metrics`: alerts raised and cleared by type, and those in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertCounts {
    pub raised: BTreeMap<&'static str, u64>,
    pub cleared: BTreeMap<&'static str, u64>,
    pub active: BTreeMap<&'static str, u64>,
}

/// The detectors, what they raised, and the counts; owned by the control
/// plane's alert task.
pub struct AlertCenter {
    bus: EventBus,
    thresholds: AlertThresholds,
    pools: HashMap<String, PoolWatch>,
    /// `hypervisor_down`'s detector per hypervisor.
    downs: HashMap<String, Hysteresis>,
    ports: Hysteresis,
    workers: Vec<Hysteresis>,
    rate: Hysteresis,
    refusals: RateOf,
    /// Alerts in force, by alert key (type and entity).
    raised: HashMap<String, Raised>,
    counts: AlertCounts,
}

impl std::fmt::Debug for AlertCenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertCenter")
            .field("thresholds", &self.thresholds)
            .field("active", &self.raised.len())
            .finish()
    }
}

/// What a detector says when it raises an alert; [`Alerting::into_data`]
/// adds the alert's type and a fresh id.
struct Alerting {
    /// The id names the entity too (one alert per hypervisor, per worker).
    per_entity_id: bool,
    severity: &'static str,
    title: String,
    message: String,
    entity_type: &'static str,
    entity_id: String,
}

impl Alerting {
    fn into_data(self, kind: &'static str) -> AlertData {
        let now = super::bus::now_ms();
        let alert_id = if self.per_entity_id {
            format!("{kind}:{}:{now}", self.entity_id)
        } else {
            format!("{kind}:{now}")
        };
        AlertData {
            alert_id,
            alert_type: kind.into(),
            severity: self.severity.into(),
            title: self.title,
            message: self.message,
            entity_type: self.entity_type.into(),
            entity_id: self.entity_id,
        }
    }
}

impl AlertCenter {
    pub fn new(bus: EventBus, thresholds: AlertThresholds) -> Self {
        Self {
            bus,
            thresholds,
            pools: HashMap::new(),
            downs: HashMap::new(),
            ports: Hysteresis::new(0, thresholds.clear_after_ms),
            workers: Vec::new(),
            rate: Hysteresis::new(thresholds.rate_limit_after_ms, thresholds.clear_after_ms),
            refusals: RateOf::default(),
            raised: HashMap::new(),
            counts: AlertCounts::default(),
        }
    }

    pub fn counts(&self) -> AlertCounts {
        self.counts.clone()
    }

    /// Add `delta` to the count of `kind` (saturating).
    fn count(map: &mut BTreeMap<&'static str, u64>, kind: &'static str, delta: i64) {
        let entry = map.entry(kind).or_insert(0);
        *entry = entry.saturating_add_signed(delta);
    }

    fn raise(&mut self, kind: &'static str, alerting: Alerting, now_ms: u64) {
        let data = alerting.into_data(kind);
        let key = format!("{kind}:{}", data.entity_id);
        tracing::warn!(alert = kind, entity = %data.entity_id, "{}", data.message);
        self.bus.publish(&Event::alert(&data));
        Self::count(&mut self.counts.raised, kind, 1);
        Self::count(&mut self.counts.active, kind, 1);
        self.raised.insert(
            key,
            Raised {
                data,
                at_ms: now_ms,
            },
        );
    }

    fn clear(&mut self, kind: &'static str, entity_id: &str, message: String, now_ms: u64) {
        let Some(raised) = self.raised.remove(&format!("{kind}:{entity_id}")) else {
            return;
        };
        tracing::info!(alert = kind, entity = %entity_id, "alert cleared: {message}");
        let mut data = raised.data;
        data.message = message;
        let duration_ms = now_ms.saturating_sub(raised.at_ms);
        self.bus.publish(&Event::alert_cleared(&data, duration_ms));
        Self::count(&mut self.counts.cleared, kind, 1);
        Self::count(&mut self.counts.active, kind, -1);
    }

    /// A hypervisor's pool: `starved_total` checkouts that waited or were
    /// refused since start.
    pub fn observe_pool(&mut self, hypervisor: &str, starved_total: u64, now_ms: u64) {
        if !self.pools.contains_key(hypervisor) && self.pools.len() >= MAX_TRACKED_HYPERVISORS {
            return;
        }
        let clear_after_ms = self.thresholds.clear_after_ms;
        let watch = self
            .pools
            .entry(hypervisor.to_string())
            .or_insert_with(|| PoolWatch {
                detector: Hysteresis::new(0, clear_after_ms),
                last_total: None,
            });
        let previous = watch.last_total.replace(starved_total);
        let starved = starved_total.saturating_sub(previous.unwrap_or(starved_total));
        let level = if starved > 0 { Level::Bad } else { Level::Good };
        match watch.detector.observe(level, now_ms) {
            Some(Change::Raised) => self.raise(
                POOL_EXHAUSTED,
                Alerting {
                    per_entity_id: true,
                    severity: "warning",
                    title: format!("hypervisor {hypervisor}: API-session pool exhausted"),
                    message: format!(
                        "{starved} checkouts had to wait for a free API session or were refused"
                    ),
                    entity_type: "hypervisor",
                    entity_id: hypervisor.to_string(),
                },
                now_ms,
            ),
            Some(Change::Cleared) => self.clear(
                POOL_EXHAUSTED,
                hypervisor,
                format!("no checkout waited for {clear_after_ms} ms"),
                now_ms,
            ),
            None => {}
        }
    }

    /// A hypervisor's reachability: whether its last call reached it
    /// (None before any call: says nothing), and the error it gave.
    pub fn observe_hypervisor(
        &mut self,
        hypervisor: &str,
        reachable: Option<bool>,
        error: Option<&str>,
        now_ms: u64,
    ) {
        if !self.downs.contains_key(hypervisor) && self.downs.len() >= MAX_TRACKED_HYPERVISORS {
            return;
        }
        let clear_after_ms = self.thresholds.clear_after_ms;
        let detector = self
            .downs
            .entry(hypervisor.to_string())
            .or_insert_with(|| Hysteresis::new(0, clear_after_ms));
        let level = match reachable {
            Some(false) => Level::Bad,
            Some(true) => Level::Good,
            None => Level::Between,
        };
        match detector.observe(level, now_ms) {
            Some(Change::Raised) => self.raise(
                HYPERVISOR_DOWN,
                Alerting {
                    per_entity_id: true,
                    severity: "critical",
                    title: format!("hypervisor {hypervisor} is down"),
                    message: error.unwrap_or("the hypervisor did not answer").to_string(),
                    entity_type: "hypervisor",
                    entity_id: hypervisor.to_string(),
                },
                now_ms,
            ),
            Some(Change::Cleared) => self.clear(
                HYPERVISOR_DOWN,
                hypervisor,
                format!("hypervisor {hypervisor} answered again for {clear_after_ms} ms"),
                now_ms,
            ),
            None => {}
        }
    }

    /// The dedicated port pool's use: `allocated` of `total` ports.
    pub fn observe_ports(&mut self, allocated: usize, total: usize, now_ms: u64) {
        let percent = if total == 0 {
            0.0
        } else {
            allocated as f64 * 100.0 / total as f64
        };
        let level = if percent > PORT_POOL_RAISE_PERCENT {
            Level::Bad
        } else if percent < PORT_POOL_CLEAR_PERCENT {
            Level::Good
        } else {
            Level::Between
        };
        let clear_after_ms = self.thresholds.clear_after_ms;
        match self.ports.observe(level, now_ms) {
            Some(Change::Raised) => self.raise(
                PORT_POOL_HIGH,
                Alerting {
                    per_entity_id: false,
                    severity: "warning",
                    title: format!("port pool above {PORT_POOL_RAISE_PERCENT} %"),
                    message: format!(
                        "{allocated} of {total} dedicated ports allocated ({percent:.1} %)"
                    ),
                    entity_type: "port_pool",
                    entity_id: "ports".into(),
                },
                now_ms,
            ),
            Some(Change::Cleared) => self.clear(
                PORT_POOL_HIGH,
                "ports",
                format!(
                    "{allocated} of {total} dedicated ports allocated ({percent:.1} %), \
                     under {PORT_POOL_CLEAR_PERCENT} % for {clear_after_ms} ms"
                ),
                now_ms,
            ),
            None => {}
        }
    }

    /// Every worker's heartbeat.
    pub fn observe_workers(&mut self, beats: &[WorkerBeat], now_ms: u64) {
        let stall_ms = self.thresholds.worker_stall_ms;
        let clear_after_ms = self.thresholds.clear_after_ms;
        for beat in beats {
            while self.workers.len() <= beat.worker && self.workers.len() < beats.len() {
                self.workers.push(Hysteresis::new(0, clear_after_ms));
            }
            let Some(detector) = self.workers.get_mut(beat.worker) else {
                continue;
            };
            let bad = !beat.alive || beat.last_turn_age_ms > stall_ms;
            let level = if bad { Level::Bad } else { Level::Good };
            let entity = beat.worker.to_string();
            match detector.observe(level, now_ms) {
                Some(Change::Raised) => {
                    let message = if beat.alive {
                        format!(
                            "worker {} has not turned its loop for {} ms (limit {stall_ms} ms)",
                            beat.worker, beat.last_turn_age_ms
                        )
                    } else {
                        format!("worker {} is dead", beat.worker)
                    };
                    self.raise(
                        WORKER_UNHEALTHY,
                        Alerting {
                            per_entity_id: true,
                            severity: "critical",
                            title: format!("worker {} is unhealthy", beat.worker),
                            message,
                            entity_type: "worker",
                            entity_id: entity,
                        },
                        now_ms,
                    );
                }
                Some(Change::Cleared) => self.clear(
                    WORKER_UNHEALTHY,
                    &entity,
                    format!(
                        "worker {} turned normally for {clear_after_ms} ms",
                        beat.worker
                    ),
                    now_ms,
                ),
                None => {}
            }
        }
    }

    /// Refusals by the per-IP limits since start (all causes summed).
    pub fn observe_refusals(&mut self, refusals_total: u64, now_ms: u64) {
        let threshold = self.thresholds.rate_limit_refusals_per_s;
        let Some(per_s) = self.refusals.per_s(refusals_total, now_ms, RATE_WINDOW_MS) else {
            return;
        };
        if threshold == 0 {
            return;
        }
        let level = if per_s >= f64::from(threshold) {
            Level::Bad
        } else if per_s < f64::from(threshold) / 2.0 {
            Level::Good
        } else {
            Level::Between
        };
        match self.rate.observe(level, now_ms) {
            Some(Change::Raised) => self.raise(
                RATE_LIMIT_SUSTAINED,
                Alerting {
                    per_entity_id: false,
                    severity: "warning",
                    title: "sustained rate limiting".into(),
                    message: format!(
                        "the per-IP limits refuse {per_s:.1} requests or connections a second \
                         (alert at {threshold}/s for {} ms)",
                        self.thresholds.rate_limit_after_ms
                    ),
                    entity_type: "rate_limits",
                    entity_id: "per_ip".into(),
                },
                now_ms,
            ),
            Some(Change::Cleared) => self.clear(
                RATE_LIMIT_SUSTAINED,
                "per_ip",
                format!(
                    "refusals under {:.1}/s for {} ms",
                    f64::from(threshold) / 2.0,
                    self.thresholds.clear_after_ms
                ),
                now_ms,
            ),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::bus::BusLimits;
    use crate::events::protocol::{Room, Visibility};
    use serde_json::Value;

    #[test]
    fn hysteresis_raises_once_after_the_delay_and_clears_once() {
        let mut h = Hysteresis::new(100, 50);
        assert_eq!(h.observe(Level::Bad, 0), None);
        // A good sample restarts the wait.
        assert_eq!(h.observe(Level::Good, 60), None);
        assert_eq!(h.observe(Level::Bad, 70), None);
        assert_eq!(h.observe(Level::Bad, 160), None);
        assert_eq!(h.observe(Level::Bad, 170), Some(Change::Raised));
        assert!(h.is_active());
        assert_eq!(h.observe(Level::Bad, 500), None, "raised once");
        assert_eq!(h.observe(Level::Good, 510), None);
        // The band neither clears nor restarts the clearing.
        assert_eq!(h.observe(Level::Between, 540), None);
        assert_eq!(h.observe(Level::Good, 560), Some(Change::Cleared));
        assert_eq!(h.observe(Level::Good, 900), None, "cleared once");
        assert!(!h.is_active());
        let mut at_once = Hysteresis::new(0, 0);
        assert_eq!(at_once.observe(Level::Bad, 5), Some(Change::Raised));
        assert_eq!(at_once.observe(Level::Good, 6), Some(Change::Cleared));
    }

    #[test]
    fn rates_come_from_successive_totals() {
        let mut r = RateOf::default();
        assert_eq!(r.per_s(10, 1_000, 3_000), None);
        assert_eq!(r.per_s(20, 2_000, 3_000), None, "the span is too short");
        assert_eq!(r.per_s(70, 4_000, 3_000), Some(20.0));
        assert_eq!(r.per_s(70, 4_000, 3_000), None, "a new span");
        assert_eq!(r.per_s(6, 7_000, 3_000), Some(2.0), "a reset counts from 0");
    }

    fn center() -> (AlertCenter, crate::events::Subscription) {
        let bus = EventBus::new(BusLimits {
            max_subscribers: 4,
            subscriber_queue_events: 64,
        });
        let sub = bus.subscribe(Room::Monitor, Visibility::All).unwrap();
        let thresholds = AlertThresholds {
            clear_after_ms: 1_000,
            worker_stall_ms: 300,
            rate_limit_refusals_per_s: 10,
            rate_limit_after_ms: 2_000,
        };
        (AlertCenter::new(bus, thresholds), sub)
    }

    fn drain(sub: &mut crate::events::Subscription) -> Vec<Value> {
        std::iter::from_fn(|| sub.try_recv())
            .map(|m| serde_json::from_str(m.as_str()).unwrap())
            .collect()
    }

    #[test]
    fn pool_exhaustion_per_hypervisor_raises_then_clears() {
        let (mut c, mut sub) = center();
        c.observe_pool("esx1", 0, 0);
        c.observe_pool("esx2", 7, 0);
        assert!(drain(&mut sub).is_empty(), "the first sample is a baseline");
        c.observe_pool("esx1", 3, 100);
        c.observe_pool("esx2", 7, 100);
        c.observe_pool("esx1", 5, 200);
        let got = drain(&mut sub);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["type"], "alert");
        assert_eq!(got[0]["data"]["alert_type"], POOL_EXHAUSTED);
        assert_eq!(got[0]["data"]["entity_id"], "esx1");
        let id = got[0]["data"]["alert_id"].clone();
        // Quiet, but not for long enough: still raised.
        c.observe_pool("esx1", 5, 900);
        assert!(drain(&mut sub).is_empty());
        c.observe_pool("esx1", 5, 1_950);
        let got = drain(&mut sub);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["type"], "alert_cleared");
        assert_eq!(got[0]["data"]["alert_id"], id);
        assert_eq!(got[0]["data"]["duration_ms"], 1_850);
        let counts = c.counts();
        assert_eq!(counts.raised[POOL_EXHAUSTED], 1);
        assert_eq!(counts.cleared[POOL_EXHAUSTED], 1);
        assert_eq!(counts.active[POOL_EXHAUSTED], 0);
    }

    #[test]
    fn a_hypervisor_down_raises_once_and_clears_after_it_answered_long_enough() {
        let (mut c, mut sub) = center();
        // Before any call nothing is known: no alert.
        c.observe_hypervisor("esx1", None, None, 0);
        c.observe_hypervisor("esx1", Some(true), None, 100);
        assert!(drain(&mut sub).is_empty());
        c.observe_hypervisor("esx1", Some(false), Some("connection refused"), 200);
        c.observe_hypervisor("esx2", Some(true), None, 200);
        let got = drain(&mut sub);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["type"], "alert");
        let d = &got[0]["data"];
        assert_eq!(d["alert_type"], HYPERVISOR_DOWN);
        assert_eq!(d["severity"], "critical");
        assert_eq!(
            (&d["entity_type"], &d["entity_id"]),
            (&"hypervisor".into(), &"esx1".into())
        );
        assert_eq!(d["message"], "connection refused");
        let id = d["alert_id"].clone();
        // Still down, and unknown, for a long time: not raised again.
        for at in [300, 5_000, 9_000] {
            c.observe_hypervisor("esx1", Some(false), Some("connection refused"), at);
        }
        c.observe_hypervisor("esx1", None, None, 9_100);
        assert!(drain(&mut sub).is_empty(), "raised once");
        // Up, but down again within the clearing time: still raised.
        c.observe_hypervisor("esx1", Some(true), None, 9_200);
        c.observe_hypervisor("esx1", Some(false), None, 9_800);
        c.observe_hypervisor("esx1", Some(true), None, 10_000);
        c.observe_hypervisor("esx1", Some(true), None, 10_900);
        assert!(
            drain(&mut sub).is_empty(),
            "the flap restarted the clearing"
        );
        c.observe_hypervisor("esx1", Some(true), None, 11_000);
        let got = drain(&mut sub);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["type"], "alert_cleared");
        assert_eq!(got[0]["data"]["alert_id"], id);
        assert_eq!(got[0]["data"]["duration_ms"], 10_800);
        c.observe_hypervisor("esx1", Some(true), None, 20_000);
        assert!(drain(&mut sub).is_empty(), "cleared once");
        let counts = c.counts();
        assert_eq!(
            (
                counts.raised[HYPERVISOR_DOWN],
                counts.cleared[HYPERVISOR_DOWN]
            ),
            (1, 1)
        );
        assert_eq!(counts.active[HYPERVISOR_DOWN], 0);
        // A new episode is a new alert.
        c.observe_hypervisor("esx1", Some(false), None, 21_000);
        let got = drain(&mut sub);
        assert_eq!(got[0]["data"]["message"], "the hypervisor did not answer");
        assert_eq!(c.counts().active[HYPERVISOR_DOWN], 1);
    }

    #[test]
    fn the_port_pool_above_90_percent_raises_once_and_clears_under_85() {
        let (mut c, mut sub) = center();
        c.observe_ports(90, 100, 0);
        assert!(drain(&mut sub).is_empty(), "90 % is not above 90 %");
        c.observe_ports(91, 100, 100);
        let got = drain(&mut sub);
        assert_eq!(got.len(), 1, "{got:?}");
        let d = &got[0]["data"];
        assert_eq!(d["alert_type"], PORT_POOL_HIGH);
        assert_eq!(d["severity"], "warning");
        assert_eq!(
            (&d["entity_type"], &d["entity_id"]),
            (&"port_pool".into(), &"ports".into())
        );
        assert!(
            d["message"].as_str().unwrap().starts_with("91 of 100"),
            "{d}"
        );
        let id = d["alert_id"].clone();
        // Full, then in the band (85–90 %) for long: neither again nor cleared.
        c.observe_ports(100, 100, 200);
        for at in [1_000, 3_000, 6_000] {
            c.observe_ports(87, 100, at);
        }
        assert!(drain(&mut sub).is_empty());
        // Under 85 %, then in the band: the band does not restart it.
        c.observe_ports(50, 100, 7_000);
        c.observe_ports(86, 100, 7_500);
        c.observe_ports(10, 100, 8_000);
        let got = drain(&mut sub);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["type"], "alert_cleared");
        assert_eq!(got[0]["data"]["alert_id"], id);
        assert!(
            got[0]["data"]["message"]
                .as_str()
                .unwrap()
                .contains("under 85 %"),
            "{got:?}"
        );
        c.observe_ports(0, 100, 9_000);
        c.observe_ports(0, 0, 10_000);
        assert!(
            drain(&mut sub).is_empty(),
            "cleared once; an empty range is 0 %"
        );
        let counts = c.counts();
        assert_eq!(
            (
                counts.raised[PORT_POOL_HIGH],
                counts.cleared[PORT_POOL_HIGH],
                counts.active[PORT_POOL_HIGH]
            ),
            (1, 1, 0)
        );
    }

    fn beat(worker: usize, alive: bool, age: u64) -> WorkerBeat {
        WorkerBeat {
            worker,
            alive,
            last_turn_age_ms: age,
        }
    }

    #[test]
    fn a_stalled_or_dead_worker_raises_once_and_clears_after_it_turns() {
        let (mut c, mut sub) = center();
        c.observe_workers(&[beat(0, true, 10), beat(1, true, 10)], 0);
        c.observe_workers(&[beat(0, true, 10), beat(1, true, 400)], 100);
        c.observe_workers(&[beat(0, true, 10), beat(1, true, 500)], 200);
        let got = drain(&mut sub);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["data"]["alert_type"], WORKER_UNHEALTHY);
        assert_eq!(got[0]["data"]["entity_id"], "1");
        assert_eq!(got[0]["data"]["severity"], "critical");
        let id = got[0]["data"]["alert_id"].clone();
        // Turning again, then a short stall within the clearing time.
        c.observe_workers(&[beat(0, true, 10), beat(1, true, 10)], 300);
        c.observe_workers(&[beat(0, true, 10), beat(1, true, 301)], 800);
        c.observe_workers(&[beat(0, true, 10), beat(1, true, 10)], 900);
        c.observe_workers(&[beat(0, true, 10), beat(1, true, 10)], 1_800);
        assert!(
            drain(&mut sub).is_empty(),
            "the stall restarted the clearing"
        );
        c.observe_workers(&[beat(0, true, 10), beat(1, true, 10)], 1_900);
        let got = drain(&mut sub);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["type"], "alert_cleared");
        assert_eq!(got[0]["data"]["alert_id"], id);
        c.observe_workers(&[beat(0, false, 10), beat(1, true, 10)], 2_000);
        let got = drain(&mut sub);
        assert!(
            got[0]["data"]["message"].as_str().unwrap().contains("dead"),
            "{got:?}"
        );
        assert_eq!(c.counts().active[WORKER_UNHEALTHY], 1);
    }

    #[test]
    fn refusals_must_be_sustained_and_clear_under_half_the_rate() {
        let (mut c, mut sub) = center();
        let mut total = 0;
        let mut step = |c: &mut AlertCenter, add: u64, n: u64| {
            total += add;
            c.observe_refusals(total, n * RATE_WINDOW_MS);
        };
        step(&mut c, 0, 0);
        // 20/s for one span only, then 2/s: not sustained.
        step(&mut c, 60, 1);
        step(&mut c, 6, 2);
        assert!(drain(&mut sub).is_empty());
        // 20/s over two spans (3 s ≥ 2 s): raised once.
        step(&mut c, 60, 3);
        assert!(drain(&mut sub).is_empty());
        step(&mut c, 60, 4);
        step(&mut c, 60, 5);
        let got = drain(&mut sub);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["data"]["alert_type"], RATE_LIMIT_SUSTAINED);
        assert_eq!(got[0]["data"]["entity_id"], "per_ip");
        // 8/s is inside the band (5–10): stays raised however long.
        for n in 6..=12 {
            step(&mut c, 24, n);
        }
        assert!(drain(&mut sub).is_empty());
        // 1/s for two spans: cleared.
        step(&mut c, 3, 13);
        assert!(drain(&mut sub).is_empty());
        step(&mut c, 3, 14);
        let got = drain(&mut sub);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["type"], "alert_cleared");
        assert_eq!(c.counts().raised[RATE_LIMIT_SUSTAINED], 1);
    }
}
