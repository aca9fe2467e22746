//! The soak: the appliance (`consolegate run`, see `appliance`) under two
//! workloads at once for a bounded time, sampled at a fixed interval, and
//! judged for growth.
//!
//! - **Steady relays** (`steady`): N long-lived sessions to the bench's echo
//!   backend, each making a small request/response round trip at a bounded
//!   rate; every round trip's time goes into the interval's HdrHistogram.
//! - **Churn** (`churn`): a paced stream of short lives through the REST
//!   API, covering every lifecycle path: the demo console opened and closed
//!   (shared and dedicated ports), echo sessions used and closed, sessions
//!   deleted while live (close 1008), tickets left to expire (shared and
//!   dedicated; the later connect gets 410), bad and replayed tickets (403)
//!   and unknown sessions (404). The refusals are the workload's own and are
//!   counted apart from errors.
//!
//! Every `interval_s` the sampler reads the appliance's open descriptors
//! (`/proc/PID/fd`), VmRSS, VmHWM, threads and CPU time, its
//! `/api/v1/stats` (live sessions, ports, buffer chunks), the interval's
//! latency percentiles and the churn counts. At the end the workload stops,
//! the appliance must release every session and port, and `judge` decides
//! (see there for the rule). Out: `soak.json`, `soak.md`, `soak.svg` and
//! `hgrm/soak-*.hgrm` in the output directory, the appliance's log in
//! `logs/`.
//!
//! What it does not do: start anything but the appliance and the in-process
//! echo backend, listen anywhere but 127.0.0.1, or run a loop without a
//! count and a deadline.

pub mod churn;
pub mod judge;
mod steady;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::appliance::{self, RunningAppliance};
use crate::common::{unix_now, Common};
use crate::procfs;
use crate::report::{self, Machine, RunInfo};
use crate::rest::{HttpMode, RestClient};
use crate::session_start::{self, Reasons};
use crate::stats::Percentiles;
use crate::svg::{self, TimePanel, TimeSeries};
use crate::workload::{new_histogram, HIST_LOWEST_US};

/// Longest soak accepted (a week).
pub const MAX_DURATION_S: u64 = 7 * 24 * 3600;
/// Most samples in one run (bounds the report and the plot).
pub const MAX_SAMPLES: u64 = 100_000;
/// Most steady sessions (a thread each, plus one in the echo backend).
pub const MAX_STEADY_SESSIONS: usize = 1000;
/// Most churn threads.
pub const MAX_CHURN_THREADS: usize = 64;
/// Highest churn and per-session round-trip rates accepted, per second.
pub const MAX_RATE_PER_S: f64 = 1000.0;
/// `[demo] max_clients` of the soaked appliance: above the demo sessions
/// the churn ever has open at once.
const DEMO_MAX_CLIENTS: usize = 256;
/// How long the appliance may take, after the workload, to release every
/// session and dedicated port, and how often to look.
const SETTLE_LIMIT: Duration = Duration::from_secs(15);
const SETTLE_POLL: Duration = Duration::from_millis(100);
/// Longest single sleep of a waiting loop, so a stop is seen quickly.
const SLEEP_SLICE: Duration = Duration::from_millis(100);
/// Unexpected errors printed as they happen (all are counted).
const MAX_ERRORS_PRINTED: u64 = 20;
/// Rows of the sample table in the Markdown summary.
const SUMMARY_ROWS: usize = 13;

/// The io backend of the soaked appliance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SoakIo {
    Uring,
    Epoll,
}

impl SoakIo {
    pub fn name(self) -> &'static str {
        match self {
            SoakIo::Uring => "uring",
            SoakIo::Epoll => "epoll",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakConfig {
    pub io: SoakIo,
    pub duration_s: u64,
    pub interval_s: u64,
    pub steady_sessions: usize,
    /// Round trips per second of each steady session.
    pub steady_round_trips_per_s: f64,
    /// Payload of each round trip.
    pub message_bytes: usize,
    /// Churn operations per second, all kinds together.
    pub churn_per_s: f64,
    pub churn_threads: usize,
    /// The churn operations to run (all by default).
    pub churn_kinds: Vec<churn::Kind>,
    pub allowances: judge::Allowances,
    /// Where the appliance keeps its state; default inside the output
    /// directory.
    pub state_dir: Option<PathBuf>,
    pub common: Common,
}

impl SoakConfig {
    pub fn validate(&self) -> Result<()> {
        if self.duration_s == 0 || self.duration_s > MAX_DURATION_S {
            bail!("--duration-s must be in 1..={MAX_DURATION_S}");
        }
        if self.interval_s == 0 || self.duration_s.div_ceil(self.interval_s) > MAX_SAMPLES {
            bail!("--interval-s must be positive and give at most {MAX_SAMPLES} samples");
        }
        if self.steady_sessions > MAX_STEADY_SESSIONS {
            bail!("--steady-sessions must be at most {MAX_STEADY_SESSIONS}");
        }
        if churn::pattern_of(&self.churn_kinds).is_empty() {
            bail!("--churn-kinds: name at least one kind");
        }
        if self.churn_threads == 0 || self.churn_threads > MAX_CHURN_THREADS {
            bail!("--churn-threads must be in 1..={MAX_CHURN_THREADS}");
        }
        for (name, rate) in [
            ("--steady-round-trips-per-s", self.steady_round_trips_per_s),
            ("--churn-per-s", self.churn_per_s),
        ] {
            if !(rate > 0.0 && rate <= MAX_RATE_PER_S) {
                bail!("{name} must be in (0, {MAX_RATE_PER_S}]");
            }
        }
        if self.message_bytes == 0 || self.message_bytes > crate::client::MAX_MESSAGE_BYTES {
            bail!(
                "--message-bytes must be in 1..={}",
                crate::client::MAX_MESSAGE_BYTES
            );
        }
        let w = self.allowances.warmup_fraction;
        if !(0.0..=judge::MAX_WARMUP_SHARE).contains(&w) || self.allowances.warmup_min_s < 0.0 {
            bail!(
                "--warmup-fraction must be in [0, {}] and --warmup-min-s not negative",
                judge::MAX_WARMUP_SHARE
            );
        }
        Ok(())
    }
}

/// Counters of one churn kind.
#[derive(Default)]
struct KindCounts {
    ok: AtomicU64,
    failed: AtomicU64,
}

/// What the workload threads share with the sampler. Counters are
/// cumulative; the sampler takes differences.
struct Shared {
    /// The workload must end (deadline reached, stop asked, appliance gone).
    end: AtomicBool,
    deadline: Instant,
    io_timeout: Duration,
    control: SocketAddr,
    console: SocketAddr,
    echo: SocketAddr,
    token: String,
    message_bytes: usize,
    /// Steady round trips since the last sample, µs.
    relay: Mutex<Histogram<u64>>,
    /// Churn demo opens (POST → first relayed byte) since the last sample, µs.
    open: Mutex<Histogram<u64>>,
    steady_round_trips: AtomicU64,
    steady_opens: AtomicU64,
    churn_ops: AtomicU64,
    by_kind: [KindCounts; churn::KINDS.len()],
    /// Sessions created (201) by either workload.
    created: AtomicU64,
    /// Sessions the churn ended itself: closed, deleted, left to expire.
    closed: AtomicU64,
    revoked: AtomicU64,
    expiring_created: AtomicU64,
    expired_confirmed: AtomicU64,
    /// Expected refusals by HTTP status.
    refused_403: AtomicU64,
    refused_404: AtomicU64,
    refused_410: AtomicU64,
    unexpected: AtomicU64,
    reasons: Mutex<Reasons>,
    started: Instant,
    /// Used tickets (their `ws_url`), newest last, for replays and bad
    /// tickets.
    used: Mutex<VecDeque<(Instant, String)>>,
    /// Sessions left to expire, oldest first.
    expiring: Mutex<VecDeque<churn::Expiring>>,
}

impl Shared {
    fn ended(&self) -> bool {
        self.end.load(Ordering::Relaxed) || Instant::now() >= self.deadline
    }

    /// Counts an unexpected error and keeps its reason.
    fn error(&self, what: &str) {
        let n = self.unexpected.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= MAX_ERRORS_PRINTED {
            eprintln!(
                "soak: t={:.1}s unexpected error: {what}",
                self.started.elapsed().as_secs_f64()
            );
        }
        self.reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add_n(what, 1);
    }

    fn record(hist: &Mutex<Histogram<u64>>, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        hist.lock()
            .unwrap_or_else(|p| p.into_inner())
            .saturating_record(us.max(HIST_LOWEST_US));
    }

    fn rest(&self) -> RestClient {
        RestClient::new(
            self.control,
            &self.token,
            HttpMode::KeepAlive,
            self.io_timeout,
        )
    }
}

/// Sleeps until `until`, in slices, returning early (false) when the
/// workload ends.
fn sleep_until(shared: &Shared, until: Instant) -> bool {
    loop {
        if shared.ended() {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(SLEEP_SLICE));
    }
}

/// Latency of one interval, µs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct IntervalLatency {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl IntervalLatency {
    fn of(h: &Histogram<u64>) -> Option<IntervalLatency> {
        (!h.is_empty()).then(|| IntervalLatency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5) as f64,
            p99_us: h.value_at_quantile(0.99) as f64,
            max_us: h.max() as f64,
        })
    }
}

/// What `/proc` says about the appliance at one instant.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcFigures {
    pub fds: Option<usize>,
    pub rss_kib: Option<u64>,
    pub hwm_kib: Option<u64>,
    pub threads: Option<u64>,
    /// Cumulative user + system CPU seconds.
    pub cpu_s: Option<f64>,
}

impl ProcFigures {
    fn read(pid: u32) -> ProcFigures {
        let status = procfs::status_kib(pid);
        let stat = procfs::read_stat(pid);
        ProcFigures {
            fds: procfs::fd_count(pid),
            rss_kib: status.as_ref().and_then(|s| s.get("VmRSS").copied()),
            hwm_kib: status.as_ref().and_then(|s| s.get("VmHWM").copied()),
            threads: stat.map(|s| s.num_threads),
            cpu_s: stat
                .map(|s| (s.utime + s.stime) as f64 / procfs::clock_ticks_per_second() as f64),
        }
    }
}

/// What `/api/v1/stats` says at one instant.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ApplianceFigures {
    pub live_sessions: Option<u64>,
    pub pending: Option<u64>,
    pub open: Option<u64>,
    pub ports_allocated: Option<u64>,
    /// Σ over workers of pool chunks lent out.
    pub buffer_chunks_in_use: Option<u64>,
    /// Σ over workers of pool chunks kept for reuse: the pool grows to its
    /// high-water mark (at most `pool_max_free_buffers` per worker) during
    /// the warm-up.
    pub buffer_chunks_free: Option<u64>,
    /// Sessions the registry remembers, open or finished (the finished
    /// ones are capped at 1024): fills during the warm-up.
    pub sessions_remembered: Option<u64>,
}

impl ApplianceFigures {
    fn from_stats(v: &serde_json::Value) -> ApplianceFigures {
        let num = |p: &str| v.pointer(p).and_then(|x| x.as_u64());
        let per_worker = |key: &str| {
            v.get("workers").and_then(|w| w.as_array()).map(|ws| {
                ws.iter()
                    .filter_map(|w| w.get(key).and_then(|x| x.as_u64()))
                    .sum()
            })
        };
        let remembered = v
            .get("sessions_by_state")
            .and_then(|m| m.as_object())
            .map(|m| m.values().filter_map(|x| x.as_u64()).sum());
        ApplianceFigures {
            live_sessions: num("/live_sessions"),
            pending: num("/sessions_by_state/pending"),
            open: num("/sessions_by_state/open"),
            ports_allocated: num("/ports/allocated_ports"),
            buffer_chunks_in_use: per_worker("buffer_chunks_in_use"),
            buffer_chunks_free: per_worker("buffer_chunks_free"),
            sessions_remembered: remembered,
        }
    }
}

/// One sample: the state at `t_s` and what happened since the last one.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the workload started.
    pub t_s: f64,
    #[serde(flatten)]
    pub process: ProcFigures,
    /// CPU of the interval, % of one core.
    pub cpu_percent: Option<f64>,
    #[serde(flatten)]
    pub appliance: ApplianceFigures,
    pub relay: Option<IntervalLatency>,
    pub session_open: Option<IntervalLatency>,
    pub steady_round_trips: u64,
    pub churn_ops: u64,
    pub created: u64,
    pub closed: u64,
    pub expected_refusals: u64,
    pub unexpected_errors: u64,
    /// The bench's own descriptors (a control: a leak here is not the
    /// appliance's).
    pub bench_fds: Option<usize>,
    /// Other work on the machine: the 1-minute load average and the share
    /// of the last 10 s in which a runnable task waited for a CPU (%).
    pub loadavg_1m: Option<f64>,
    pub cpu_pressure_avg10: Option<f64>,
}

/// Churn operations of one kind.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct KindTotals {
    pub ok: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    pub steady_round_trips: u64,
    /// Steady sessions opened (the first N, then any reopened after an error).
    pub steady_opens: u64,
    pub churn_ops: u64,
    pub churn_ops_per_s: f64,
    pub churn_by_kind: BTreeMap<&'static str, KindTotals>,
    pub sessions_created: u64,
    pub sessions_closed: u64,
    pub sessions_revoked: u64,
    pub sessions_left_to_expire: u64,
    pub expiries_confirmed: u64,
    /// Expected refusals by HTTP status ("403", "404", "410").
    pub expected_refusals: BTreeMap<String, u64>,
    pub unexpected_errors: u64,
    pub unexpected_reasons: BTreeMap<String, u64>,
    /// Every steady round trip after the warm-up.
    pub relay: Option<Percentiles>,
    /// Every churn demo open after the warm-up.
    pub session_open: Option<Percentiles>,
}

/// The headline figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub fds_idle_before: Option<usize>,
    pub fds_first_sample: Option<usize>,
    pub fds_last_sample: Option<usize>,
    pub fds_max: Option<usize>,
    pub fds_idle_after: Option<usize>,
    pub rss_idle_before_kib: Option<u64>,
    pub rss_first_sample_kib: Option<u64>,
    pub rss_last_sample_kib: Option<u64>,
    pub rss_idle_after_kib: Option<u64>,
    /// VmHWM at the end: the peak RSS of the whole run.
    pub rss_peak_kib: Option<u64>,
    /// Interval p99s of the relay after the warm-up: lowest, median, highest.
    pub relay_p99_us_min: Option<f64>,
    pub relay_p99_us_median: Option<f64>,
    pub relay_p99_us_max: Option<f64>,
    /// Correlation of the interval p99 with the machine's CPU pressure
    /// (other work waiting for a CPU), after the warm-up.
    pub relay_p99_vs_cpu_pressure_r: Option<f64>,
    /// The interval p99 over the run, after the warm-up: median of each
    /// third, and the least-squares slope per hour. Reported, not judged:
    /// on a shared machine the p99 follows the machine's load (hence its
    /// median per third beside it).
    pub relay_p99_us_third_medians: Option<[f64; 3]>,
    pub relay_p99_us_slope_per_hour: Option<f64>,
    pub loadavg_1m_third_medians: Option<[f64; 3]>,
    pub cpu_s_total: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    #[serde(flatten)]
    pub run: RunInfo,
    pub command_line: String,
    pub config: SoakConfig,
    pub io: String,
    pub workers: Option<usize>,
    pub port_range: String,
    pub appliance_log: String,
    pub idle_before: ProcFigures,
    pub idle_after: Option<ProcFigures>,
    /// The idle appliance's descriptors by kind, before and after the
    /// workload (where a descriptor leak would show).
    pub fd_kinds_before: BTreeMap<String, usize>,
    pub fd_kinds_after: BTreeMap<String, usize>,
    /// Seconds after the workload until no session or port was held.
    pub settled_after_s: Option<f64>,
    /// `/api/v1/stats` at the end (the appliance's own counters).
    pub appliance_stats_end: Option<serde_json::Value>,
    pub samples: Vec<Sample>,
    pub totals: Totals,
    pub figures: Figures,
    pub verdict: judge::Verdict,
}

fn get_stats(rest: &mut RestClient) -> Option<serde_json::Value> {
    rest.get("/api/v1/stats")
        .ok()
        .filter(|r| r.status == 200)
        .and_then(|r| serde_json::from_slice(&r.body).ok())
}

/// Cumulative counters at one instant, for differences.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    round_trips: u64,
    churn_ops: u64,
    created: u64,
    closed: u64,
    refusals: u64,
    errors: u64,
}

impl Counts {
    fn now(s: &Shared) -> Counts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            round_trips: l(&s.steady_round_trips),
            churn_ops: l(&s.churn_ops),
            created: l(&s.created),
            closed: l(&s.closed) + l(&s.revoked) + l(&s.expired_confirmed),
            refusals: l(&s.refused_403) + l(&s.refused_404) + l(&s.refused_410),
            errors: l(&s.unexpected),
        }
    }
}

/// The sampler's running state.
struct Sampler<'a> {
    shared: &'a Shared,
    pid: u32,
    rest: RestClient,
    last: Counts,
    last_cpu: Option<(Instant, f64)>,
    /// Everything after the warm-up.
    relay_all: Histogram<u64>,
    open_all: Histogram<u64>,
    warmup_s: f64,
}

impl Sampler<'_> {
    fn take(&mut self, t_s: f64) -> Sample {
        let process = ProcFigures::read(self.pid);
        let now = Instant::now();
        let cpu_percent = match (self.last_cpu, process.cpu_s) {
            (Some((at, before)), Some(cpu)) => {
                let wall = now.duration_since(at).as_secs_f64();
                (wall > 0.0).then(|| (cpu - before) / wall * 100.0)
            }
            _ => None,
        };
        if let Some(cpu) = process.cpu_s {
            self.last_cpu = Some((now, cpu));
        }
        let appliance = get_stats(&mut self.rest)
            .map(|v| ApplianceFigures::from_stats(&v))
            .unwrap_or_default();
        let take = |m: &Mutex<Histogram<u64>>| {
            std::mem::replace(
                &mut *m.lock().unwrap_or_else(|p| p.into_inner()),
                new_histogram(),
            )
        };
        let (relay, open) = (take(&self.shared.relay), take(&self.shared.open));
        if t_s > self.warmup_s {
            let _ = self.relay_all.add(&relay);
            let _ = self.open_all.add(&open);
        }
        let c = Counts::now(self.shared);
        let d = |f: fn(&Counts) -> u64| f(&c).saturating_sub(f(&self.last));
        let sample = Sample {
            t_s,
            process,
            cpu_percent,
            appliance,
            relay: IntervalLatency::of(&relay),
            session_open: IntervalLatency::of(&open),
            steady_round_trips: d(|c| c.round_trips),
            churn_ops: d(|c| c.churn_ops),
            created: d(|c| c.created),
            closed: d(|c| c.closed),
            expected_refusals: d(|c| c.refusals),
            unexpected_errors: d(|c| c.errors),
            bench_fds: procfs::fd_count(std::process::id()),
            loadavg_1m: procfs::loadavg_1m(),
            cpu_pressure_avg10: procfs::cpu_pressure_avg10(),
        };
        self.last = c;
        sample
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "?".into(), |v| v.to_string())
}

fn progress_line(s: &Sample) -> String {
    format!(
        "soak: t={:>5.0}s fds {} rss {} KiB hwm {} KiB live {} relay p50/p99/max {} µs churn {} ok, {} refused, {} errors",
        s.t_s,
        opt(s.process.fds),
        opt(s.process.rss_kib),
        opt(s.process.hwm_kib),
        opt(s.appliance.live_sessions),
        s.relay.map_or_else(
            || "-".into(),
            |r| format!("{:.0}/{:.0}/{:.0}", r.p50_us, r.p99_us, r.max_us)
        ),
        s.churn_ops,
        s.expected_refusals,
        s.unexpected_errors,
    )
}

/// Samples every interval until the duration is over, a stop is asked or
/// the appliance exits (then a failure is returned beside the samples).
fn sample_loop(
    sampler: &mut Sampler,
    app: &mut RunningAppliance,
    cfg: &SoakConfig,
    start: Instant,
    stop: &AtomicBool,
) -> (Vec<Sample>, Option<String>) {
    let interval = Duration::from_secs(cfg.interval_s);
    let count = cfg.duration_s.div_ceil(cfg.interval_s);
    let mut samples = Vec::new();
    for k in 1..=count {
        let due = start + interval * u32::try_from(k).unwrap_or(u32::MAX);
        let due = due.min(start + Duration::from_secs(cfg.duration_s));
        while Instant::now() < due && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(
                due.saturating_duration_since(Instant::now())
                    .min(SLEEP_SLICE),
            );
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if app.has_exited() {
            return (
                samples,
                Some(format!("the appliance exited: {}", app.log_tail())),
            );
        }
        let s = sampler.take(start.elapsed().as_secs_f64());
        eprintln!("{}", progress_line(&s));
        samples.push(s);
    }
    (samples, None)
}

/// After the workload: waits until the appliance holds no session and no
/// dedicated port; returns the seconds it took (`None`: never, within
/// [`SETTLE_LIMIT`]) and the last stats seen.
fn settle(rest: &mut RestClient) -> (Option<f64>, Option<serde_json::Value>) {
    let from = Instant::now();
    let mut last = None;
    while from.elapsed() < SETTLE_LIMIT {
        last = get_stats(rest);
        if last.as_ref().is_some_and(session_start::is_settled) {
            return (Some(from.elapsed().as_secs_f64()), last);
        }
        std::thread::sleep(SETTLE_POLL);
    }
    (None, last)
}

/// The whole run: appliance, echo backend, workload, sampling, verdict,
/// reports.
pub fn run(cfg: SoakConfig, stop: Arc<AtomicBool>, command_line: String) -> Result<SoakReport> {
    cfg.validate()?;
    let started = unix_now();
    let machine = Machine::describe();
    let out_dir = cfg.common.out_dir.clone();
    std::fs::create_dir_all(&out_dir)?;
    let dir = out_dir.join("soak");
    let state_dir = cfg.state_dir.clone().unwrap_or_else(|| dir.join("state"));
    let _ = std::fs::remove_dir_all(&state_dir);
    let log = out_dir.join("logs").join("soak-appliance.log");
    let mut echo = crate::echo::start().context("starting the echo backend")?;
    let mut app = appliance::start(
        &cfg.common.consolegate,
        &dir,
        &state_dir,
        cfg.io.name(),
        DEMO_MAX_CLIENTS,
        &log,
        Duration::from_millis(cfg.common.startup_timeout_ms),
    )?;
    let result = soak_appliance(&cfg, &mut app, echo.addr(), &stop);
    let alive = !app.has_exited();
    app.stop();
    echo.stop();
    let mut outcome = result?;
    if !alive && outcome.failures.is_empty() {
        outcome.failures.push("the appliance exited".into());
    }
    let report = build_report(
        cfg,
        outcome,
        &app,
        &out_dir,
        started,
        machine,
        &stop,
        command_line,
    );
    write_outputs(&out_dir, &report)?;
    Ok(report)
}

/// What the run measured, before the verdict.
struct Outcome {
    idle_before: ProcFigures,
    idle_after: Option<ProcFigures>,
    fd_kinds_before: BTreeMap<String, usize>,
    fd_kinds_after: BTreeMap<String, usize>,
    settled_after_s: Option<f64>,
    stats_end: Option<serde_json::Value>,
    samples: Vec<Sample>,
    totals: Totals,
    failures: Vec<String>,
}

/// Runs both workloads and the sampler against a started appliance.
fn soak_appliance(
    cfg: &SoakConfig,
    app: &mut RunningAppliance,
    echo: SocketAddr,
    stop: &AtomicBool,
) -> Result<Outcome> {
    let pid = app.pid().context("no appliance process")?;
    let io_timeout = Duration::from_millis(cfg.common.io_timeout_ms);
    let idle_before = ProcFigures::read(pid);
    let fd_kinds_before = procfs::fd_kinds(pid);
    let start = Instant::now();
    let shared = Shared {
        end: AtomicBool::new(false),
        deadline: start + Duration::from_secs(cfg.duration_s),
        io_timeout,
        control: app.control,
        console: app.console,
        echo,
        token: app.token.clone(),
        message_bytes: cfg.message_bytes,
        relay: Mutex::new(new_histogram()),
        open: Mutex::new(new_histogram()),
        steady_round_trips: AtomicU64::new(0),
        steady_opens: AtomicU64::new(0),
        churn_ops: AtomicU64::new(0),
        by_kind: Default::default(),
        created: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        revoked: AtomicU64::new(0),
        expiring_created: AtomicU64::new(0),
        expired_confirmed: AtomicU64::new(0),
        refused_403: AtomicU64::new(0),
        refused_404: AtomicU64::new(0),
        refused_410: AtomicU64::new(0),
        unexpected: AtomicU64::new(0),
        reasons: Mutex::new(Reasons::default()),
        started: start,
        used: Mutex::new(VecDeque::new()),
        expiring: Mutex::new(VecDeque::new()),
    };
    let mut sampler = Sampler {
        shared: &shared,
        pid,
        rest: shared.rest(),
        last: Counts::default(),
        last_cpu: idle_before.cpu_s.map(|c| (start, c)),
        relay_all: new_histogram(),
        open_all: new_histogram(),
        warmup_s: judge::warmup_s(cfg.duration_s as f64, &cfg.allowances),
    };
    let pacer = churn::Pacer::new(start, cfg);
    let (samples, died) = std::thread::scope(|scope| {
        let spawned = steady::spawn(scope, &shared, cfg)
            .and_then(|()| churn::spawn(scope, &shared, &pacer, cfg.churn_threads));
        let out = match spawned {
            Ok(()) => sample_loop(&mut sampler, app, cfg, start, stop),
            Err(e) => (Vec::new(), Some(format!("starting the workload: {e:#}"))),
        };
        // Everything the scope joins sees this.
        shared.end.store(true, Ordering::SeqCst);
        out
    });
    let mut failures: Vec<String> = died.into_iter().collect();
    // The sampler's kept-alive connection would be one of the appliance's
    // descriptors in the idle count: close it, and poll on connections the
    // appliance closes after each answer.
    sampler.rest = RestClient::new(app.control, &app.token, HttpMode::NewConnection, io_timeout);
    let (settled_after_s, stats_end) = settle(&mut sampler.rest);
    let idle_after = (!app.has_exited()).then(|| ProcFigures::read(pid));
    let fd_kinds_after = procfs::fd_kinds(pid);
    if settled_after_s.is_none() && failures.is_empty() {
        failures.push(format!(
            "sessions or dedicated ports still held {SETTLE_LIMIT:?} after the workload: {}",
            stats_end.as_ref().map_or_else(
                || "no stats".into(),
                |v| serde_json::to_string(&ApplianceFigures::from_stats(v)).unwrap_or_default()
            )
        ));
    }
    let elapsed = start.elapsed().as_secs_f64().min(cfg.duration_s as f64);
    let totals = totals(&shared, &sampler, elapsed);
    failures.extend(workload_failures(cfg, &totals, elapsed));
    Ok(Outcome {
        idle_before,
        idle_after,
        fd_kinds_before,
        fd_kinds_after,
        settled_after_s,
        stats_end,
        samples,
        totals,
        failures,
    })
}

/// The workload must have run as asked, or the verdict means little: at
/// least half the asked churn rate, and round trips on every steady session.
fn workload_failures(cfg: &SoakConfig, t: &Totals, elapsed_s: f64) -> Vec<String> {
    let mut out = Vec::new();
    if elapsed_s <= 0.0 {
        return out;
    }
    if t.churn_ops_per_s < cfg.churn_per_s / 2.0 {
        out.push(format!(
            "the churn ran at {:.1} operations/s, under half the {} asked (machine too busy?)",
            t.churn_ops_per_s, cfg.churn_per_s
        ));
    }
    let asked = cfg.steady_sessions as f64 * cfg.steady_round_trips_per_s * elapsed_s;
    if (t.steady_round_trips as f64) < asked / 2.0 {
        out.push(format!(
            "the steady relays made {} round trips, under half the {asked:.0} asked",
            t.steady_round_trips
        ));
    }
    out
}

fn totals(s: &Shared, sampler: &Sampler, elapsed_s: f64) -> Totals {
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let by_kind = churn::KINDS
        .iter()
        .zip(&s.by_kind)
        .map(|(k, c)| {
            (
                k.name(),
                KindTotals {
                    ok: l(&c.ok),
                    failed: l(&c.failed),
                },
            )
        })
        .collect();
    let churn_ops = l(&s.churn_ops);
    let pct = |h: &Histogram<u64>| (!h.is_empty()).then(|| Percentiles::from_histogram(h));
    Totals {
        steady_round_trips: l(&s.steady_round_trips),
        steady_opens: l(&s.steady_opens),
        churn_ops,
        churn_ops_per_s: if elapsed_s > 0.0 {
            churn_ops as f64 / elapsed_s
        } else {
            0.0
        },
        churn_by_kind: by_kind,
        sessions_created: l(&s.created),
        sessions_closed: l(&s.closed),
        sessions_revoked: l(&s.revoked),
        sessions_left_to_expire: l(&s.expiring_created),
        expiries_confirmed: l(&s.expired_confirmed),
        expected_refusals: [
            ("403", l(&s.refused_403)),
            ("404", l(&s.refused_404)),
            ("410", l(&s.refused_410)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        unexpected_errors: l(&s.unexpected),
        unexpected_reasons: s
            .reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone(),
        relay: pct(&sampler.relay_all),
        session_open: pct(&sampler.open_all),
    }
}

fn figures(o: &Outcome, warmup_s: f64) -> Figures {
    let judged: Vec<&Sample> = o.samples.iter().filter(|s| s.t_s >= warmup_s).collect();
    let mut p99s: Vec<f64> = judged
        .iter()
        .filter_map(|s| s.relay.map(|r| r.p99_us))
        .collect();
    p99s.sort_by(f64::total_cmp);
    let last = o.samples.last();
    Figures {
        fds_idle_before: o.idle_before.fds,
        fds_first_sample: judged.first().and_then(|s| s.process.fds),
        fds_last_sample: last.and_then(|s| s.process.fds),
        fds_max: o.samples.iter().filter_map(|s| s.process.fds).max(),
        fds_idle_after: o.idle_after.and_then(|p| p.fds),
        rss_idle_before_kib: o.idle_before.rss_kib,
        rss_first_sample_kib: judged.first().and_then(|s| s.process.rss_kib),
        rss_last_sample_kib: last.and_then(|s| s.process.rss_kib),
        rss_idle_after_kib: o.idle_after.and_then(|p| p.rss_kib),
        rss_peak_kib: o
            .idle_after
            .and_then(|p| p.hwm_kib)
            .or_else(|| last.and_then(|s| s.process.hwm_kib)),
        relay_p99_us_min: p99s.first().copied(),
        relay_p99_us_median: crate::stats::median(&p99s),
        relay_p99_us_max: p99s.last().copied(),
        relay_p99_vs_cpu_pressure_r: crate::stats::correlation(
            &judged
                .iter()
                .filter_map(|s| Some((s.relay?.p99_us, s.cpu_pressure_avg10?)))
                .collect::<Vec<_>>(),
        ),
        relay_p99_us_third_medians: judge::third_medians(
            &judged
                .iter()
                .filter_map(|s| Some(s.relay?.p99_us))
                .collect::<Vec<_>>(),
        ),
        relay_p99_us_slope_per_hour: judge::slope(
            &judged
                .iter()
                .filter_map(|s| Some((s.t_s, s.relay?.p99_us)))
                .collect::<Vec<_>>(),
        )
        .map(|per_s| per_s * 3600.0),
        loadavg_1m_third_medians: judge::third_medians(
            &judged
                .iter()
                .filter_map(|s| s.loadavg_1m)
                .collect::<Vec<_>>(),
        ),
        cpu_s_total: o
            .idle_after
            .and_then(|p| p.cpu_s)
            .or_else(|| last.and_then(|s| s.process.cpu_s)),
    }
}

/// The judge's view of the samples that have both figures.
fn points(samples: &[Sample]) -> Vec<judge::Point> {
    samples
        .iter()
        .filter_map(|s| {
            Some(judge::Point {
                t_s: s.t_s,
                fds: s.process.fds? as f64,
                rss_kib: s.process.rss_kib? as f64,
            })
        })
        .collect()
}

/// The idle appliance after the workload must hold no more descriptors
/// than before it (plus the allowance): a direct check for descriptors
/// that outlive their sessions.
fn idle_failure(o: &Outcome, a: &judge::Allowances) -> Option<String> {
    let (before, after) = (o.idle_before.fds?, o.idle_after?.fds?);
    (after as f64 > before as f64 + a.fd_count).then(|| {
        format!(
            "the idle appliance holds {after} descriptors after the workload, {before} before it \
             (allowance {:.0}; by kind before {:?}, after {:?})",
            a.fd_count, o.fd_kinds_before, o.fd_kinds_after
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    cfg: SoakConfig,
    mut o: Outcome,
    app: &RunningAppliance,
    out_dir: &std::path::Path,
    started: u64,
    machine: Machine,
    stop: &AtomicBool,
    command_line: String,
) -> SoakReport {
    let warmup_s = judge::warmup_s(cfg.duration_s as f64, &cfg.allowances);
    if let Some(f) = idle_failure(&o, &cfg.allowances) {
        o.failures.push(f);
    }
    let verdict = judge::judge(
        &points(&o.samples),
        cfg.duration_s as f64,
        o.totals.unexpected_errors,
        &cfg.allowances,
        std::mem::take(&mut o.failures),
    );
    let figures = figures(&o, warmup_s);
    let rel = |p: &std::path::Path| p.strip_prefix(out_dir).unwrap_or(p).display().to_string();
    SoakReport {
        run: RunInfo::ended("soak", started, stop, machine),
        command_line,
        io: cfg.io.name().to_string(),
        workers: app.workers,
        port_range: format!("{}-{}", app.port_range.0, app.port_range.1),
        appliance_log: rel(app.log_path()),
        config: cfg,
        idle_before: o.idle_before,
        idle_after: o.idle_after,
        fd_kinds_before: o.fd_kinds_before,
        fd_kinds_after: o.fd_kinds_after,
        settled_after_s: o.settled_after_s,
        appliance_stats_end: o.stats_end,
        samples: o.samples,
        totals: o.totals,
        figures,
        verdict,
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn us(v: Option<f64>) -> String {
    v.map_or_else(|| "?".into(), report::fmt_us)
}

/// The Markdown summary: what ran, the headline figures, the verdict, and
/// a thinned table of the samples.
pub fn render_markdown(r: &SoakReport) -> String {
    let mut out = String::from("## Soak\n\n");
    let _ = writeln!(out, "Command: `{}`\n", r.command_line);
    out.push_str(&intro(r));
    let verdict = if r.verdict.pass { "PASS" } else { "FAIL" };
    let _ = writeln!(out, "**Verdict: {verdict}**{}\n", verdict_note(r));
    for failure in &r.verdict.failures {
        let _ = writeln!(out, "- {failure}");
    }
    if !r.verdict.failures.is_empty() {
        out.push('\n');
    }
    out.push_str(&figures_table(&r.figures));
    out.push('\n');
    out.push_str(&trend_lines(r));
    out.push_str(&activity_lines(r));
    out.push('\n');
    out.push_str(&sample_table(&r.samples));
    out
}

/// What ran, where, and how it was sampled.
fn intro(r: &SoakReport) -> String {
    let c = &r.config;
    format!(
        "{} s of `consolegate run` (io={}, {} workers, log level warn) on {}; load average at \
         the start {}. Workload, all on 127.0.0.1: {} steady sessions to an echo backend, each \
         making a {}-byte round trip {} times a second; churn at {} operations/s on {} threads \
         ({}). Sampled every {} s; the first {:.0} s are warm-up{}.\n\n",
        c.duration_s,
        r.io,
        opt(r.workers),
        r.run.machine.one_line(),
        r.run.machine.loadavg_at_start,
        c.steady_sessions,
        c.message_bytes,
        c.steady_round_trips_per_s,
        c.churn_per_s,
        c.churn_threads,
        churn_description(&c.churn_kinds),
        c.interval_s,
        r.verdict.judged_from_s,
        short_warmup_note(r.verdict.judged_from_s, c.allowances.warmup_min_s)
    )
}

/// Said when the run was too short for the warm-up it asked for (the
/// warm-up is at most half the run).
fn short_warmup_note(warmup_s: f64, warmup_min_s: f64) -> String {
    if warmup_s + 0.5 < warmup_min_s {
        format!(
            " (cut to half the run, below --warmup-min-s {warmup_min_s:.0}: memory still \
             filling, io_uring's receive buffers above all, can be judged as growth)"
        )
    } else {
        String::new()
    }
}

/// The churn in words: every path, or the kinds it was limited to.
fn churn_description(kinds: &[churn::Kind]) -> String {
    if churn::KINDS.iter().all(|k| kinds.contains(k)) {
        "demo console opened and closed on the shared and on dedicated ports, echo sessions \
         used and closed, sessions deleted while live, tickets left to expire, bad and replayed \
         tickets, unknown sessions"
            .into()
    } else {
        let names: Vec<&str> = churn::KINDS
            .iter()
            .filter(|k| kinds.contains(k))
            .map(|k| k.name())
            .collect();
        format!("only {}", names.join(", "))
    }
}

/// Descriptors and memory: idle before, first judged, last, peak, idle after.
fn figures_table(f: &Figures) -> String {
    let rows = vec![
        vec![
            "open descriptors".to_string(),
            opt(f.fds_idle_before),
            opt(f.fds_first_sample),
            opt(f.fds_last_sample),
            opt(f.fds_max),
            opt(f.fds_idle_after),
        ],
        vec![
            "RSS (MiB)".to_string(),
            mib(f.rss_idle_before_kib),
            mib(f.rss_first_sample_kib),
            mib(f.rss_last_sample_kib),
            format!("{} (VmHWM)", mib(f.rss_peak_kib)),
            mib(f.rss_idle_after_kib),
        ],
    ];
    report::markdown_table(
        &[
            "",
            "idle before",
            "first judged sample",
            "last sample",
            "peak",
            "idle after",
        ],
        &rows,
    )
}

/// `3 × a, 1 × b` (or `3 a, 1 b` with `times = false`).
fn counted<K: std::fmt::Display, V: std::fmt::Display>(
    items: impl Iterator<Item = (K, V)>,
    times: bool,
    separator: &str,
) -> String {
    items
        .map(|(k, v)| {
            if times {
                format!("{v} × {k}")
            } else {
                format!("{v} {k}")
            }
        })
        .collect::<Vec<_>>()
        .join(separator)
}

/// Latency, sessions, errors, idle descriptors, CPU, settling.
fn activity_lines(r: &SoakReport) -> String {
    let (f, t) = (&r.figures, &r.totals);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "- Relay round trip (steady sessions, after the warm-up): p50 {} µs, p99 {} µs, max {} µs; \
         interval p99 lowest / median / highest {} / {} / {} µs. Churned demo opens \
         (POST → first relayed byte): p50 {} µs, p99 {} µs.",
        us(t.relay.map(|p| p.p50_us)),
        us(t.relay.map(|p| p.p99_us)),
        us(t.relay.map(|p| p.max_us)),
        us(f.relay_p99_us_min),
        us(f.relay_p99_us_median),
        us(f.relay_p99_us_max),
        us(t.session_open.map(|p| p.p50_us)),
        us(t.session_open.map(|p| p.p99_us)),
    );
    if let Some(r) = f.relay_p99_vs_cpu_pressure_r {
        let _ = writeln!(
            out,
            "- The interval p99 against the machine's CPU pressure (other work waiting for a \
             CPU, /proc/pressure/cpu some avg10): correlation r = {r:.2}."
        );
    }
    if let (Some([a, b, c]), Some(slope)) =
        (f.relay_p99_us_third_medians, f.relay_p99_us_slope_per_hour)
    {
        let load = f
            .loadavg_1m_third_medians
            .map_or("n/a".to_string(), |[x, y, z]| {
                format!("{x:.1} / {y:.1} / {z:.1}")
            });
        let _ = writeln!(
            out,
            "- The interval p99 over the judged span (reported, not judged): median of the \
             first / middle / last third {a:.0} / {b:.0} / {c:.0} µs, least-squares slope \
             {slope:+.0} µs/h; the machine's 1-minute load average, median per third: {load}."
        );
    }
    let reasons = if t.unexpected_reasons.is_empty() {
        String::new()
    } else {
        format!(" ({})", counted(t.unexpected_reasons.iter(), true, "; "))
    };
    let _ = writeln!(
        out,
        "- Sessions: {} created, {} closed by the client, {} deleted while live, {} left to \
         expire ({} expiries confirmed); {} churn operations ({:.1}/s); {} steady round trips, \
         {} steady opens. Expected refusals: {}. Unexpected errors: {}{reasons}.",
        t.sessions_created,
        t.sessions_closed,
        t.sessions_revoked,
        t.sessions_left_to_expire,
        t.expiries_confirmed,
        t.churn_ops,
        t.churn_ops_per_s,
        t.steady_round_trips,
        t.steady_opens,
        counted(t.expected_refusals.iter(), true, ", "),
        t.unexpected_errors,
    );
    let _ = writeln!(
        out,
        "- Idle descriptors by kind, before the workload: {}; after: {}.",
        counted(r.fd_kinds_before.iter(), false, ", "),
        counted(r.fd_kinds_after.iter(), false, ", ")
    );
    let _ = writeln!(
        out,
        "- Appliance CPU: {} s in total. After the workload {}.",
        f.cpu_s_total
            .map_or_else(|| "?".into(), |v| format!("{v:.1}")),
        r.settled_after_s.map_or_else(
            || format!("sessions or ports were still held after {SETTLE_LIMIT:?}"),
            |s| format!("every session and dedicated port was released within {s:.1} s")
        )
    );
    out
}

fn verdict_note(r: &SoakReport) -> String {
    let a = &r.config.allowances;
    format!(
        " — judged on {} samples from {:.0} s to {:.0} s: descriptors may grow by at most {:.0}, \
         RSS by at most {} % or {:.0} MiB (whichever is larger), {} unexpected errors tolerated; \
         growth is the least-squares slope × the judged span and the last-third mean − the \
         first-third mean.",
        r.verdict.judged_samples,
        r.verdict.judged_from_s,
        r.verdict.judged_to_s,
        a.fd_count,
        a.rss_percent,
        a.rss_floor_kib / 1024.0,
        a.unexpected_errors
    )
}

fn trend_lines(r: &SoakReport) -> String {
    let mut out = String::new();
    if let Some(t) = &r.verdict.fds {
        let _ = writeln!(
            out,
            "- Descriptors after the warm-up: {:.0}–{:.0}, first / last third mean {:.1} / {:.1} \
             ({:+.1}), slope {:+.2}/h ({:+.1} over the judged span); allowance {:.0}.",
            t.min,
            t.max,
            t.first_third_mean,
            t.last_third_mean,
            t.thirds_growth,
            t.slope_per_hour,
            t.projected_growth,
            t.allowance
        );
    }
    if let Some(t) = &r.verdict.rss_kib {
        let m = |k: f64| k / 1024.0;
        let _ = writeln!(
            out,
            "- RSS after the warm-up: {:.1}–{:.1} MiB, first / last third mean {:.2} / {:.2} MiB \
             ({:+.2}), slope {:+.2} MiB/h ({:+.2} MiB over the judged span); allowance {:.2} MiB.",
            m(t.min),
            m(t.max),
            m(t.first_third_mean),
            m(t.last_third_mean),
            m(t.thirds_growth),
            m(t.slope_per_hour),
            m(t.projected_growth),
            m(t.allowance)
        );
    }
    out
}

/// About [`SUMMARY_ROWS`] samples, evenly spaced, the last included.
fn sample_table(samples: &[Sample]) -> String {
    if samples.is_empty() {
        return String::new();
    }
    let step = samples.len().div_ceil(SUMMARY_ROWS).max(1);
    let mut picked: Vec<&Sample> = samples.iter().step_by(step).collect();
    if let Some(last) = samples.last() {
        if !std::ptr::eq(*picked.last().unwrap_or(&last), last) {
            picked.push(last);
        }
    }
    let rows: Vec<Vec<String>> = picked
        .iter()
        .map(|s| {
            vec![
                svg::fmt_seconds(s.t_s.round()),
                opt(s.process.fds),
                mib(s.process.rss_kib),
                mib(s.process.hwm_kib),
                opt(s.appliance.live_sessions),
                us(s.relay.map(|r| r.p50_us)),
                us(s.relay.map(|r| r.p99_us)),
                us(s.relay.map(|r| r.max_us)),
                s.churn_ops.to_string(),
                s.expected_refusals.to_string(),
                s.unexpected_errors.to_string(),
                s.cpu_percent
                    .map_or_else(|| "?".into(), |v| format!("{v:.0}")),
            ]
        })
        .collect();
    report::markdown_table(
        &[
            "t",
            "fds",
            "RSS MiB",
            "HWM MiB",
            "live",
            "relay p50 µs",
            "p99 µs",
            "max µs",
            "churn ops",
            "refused",
            "errors",
            "CPU %",
        ],
        &rows,
    )
}

/// fds, memory, relay latency, sessions and the machine over time.
pub fn render_plot(r: &SoakReport) -> String {
    let warmup = r.verdict.judged_from_s;
    let marker = (warmup > 0.0).then(|| (warmup, "warm-up ends".to_string()));
    let line = |name: &str, color: usize, f: &dyn Fn(&Sample) -> Option<f64>| TimeSeries {
        name: name.into(),
        color: svg::color_for(color),
        points: r
            .samples
            .iter()
            .filter_map(|s| Some((s.t_s, f(s)?)))
            .collect(),
    };
    let interval = r.config.interval_s as f64;
    let panel = |title: &str, y_label: &str, series: Vec<TimeSeries>| TimePanel {
        title: title.into(),
        y_label: y_label.into(),
        series,
        marker: marker.clone(),
        log_y: false,
    };
    let kib_to_mib = |v: Option<u64>| v.map(|k| k as f64 / 1024.0);
    let panels = vec![
        panel(
            "Open descriptors",
            "descriptors",
            vec![line("fds", 1, &|s| s.process.fds.map(|v| v as f64))],
        ),
        panel(
            "Memory",
            "MiB",
            vec![
                line("VmHWM (peak)", 0, &|s| kib_to_mib(s.process.hwm_kib)),
                line("VmRSS", 2, &|s| kib_to_mib(s.process.rss_kib)),
            ],
        ),
        TimePanel {
            log_y: true,
            ..panel(
                "Relay round trip per interval",
                "log scale",
                vec![
                    line("p50", 3, &|s| s.relay.map(|r| r.p50_us)),
                    line("p99", 2, &|s| s.relay.map(|r| r.p99_us)),
                    line("max", 0, &|s| s.relay.map(|r| r.max_us)),
                ],
            )
        },
        panel(
            "Sessions",
            "sessions / operations per second",
            vec![
                line("live sessions", 1, &|s| {
                    s.appliance.live_sessions.map(|v| v as f64)
                }),
                line("churn ops/s", 5, &|s| Some(s.churn_ops as f64 / interval)),
            ],
        ),
        panel(
            "CPU: the appliance and the machine",
            "% / load",
            vec![
                line("appliance CPU % of a core", 1, &|s| s.cpu_percent),
                line("CPU pressure % (avg10)", 2, &|s| s.cpu_pressure_avg10),
                line("load average ×10", 0, &|s| s.loadavg_1m.map(|l| l * 10.0)),
            ],
        ),
    ];
    let verdict = if r.verdict.pass { "pass" } else { "FAIL" };
    svg::time_series_plot(
        &format!(
            "consolegate soak: {} s, io={}, {} steady sessions + {}/s churn: {verdict}",
            r.config.duration_s, r.io, r.config.steady_sessions, r.config.churn_per_s
        ),
        Some(r.config.duration_s as f64),
        &panels,
    )
}

fn write_outputs(out_dir: &std::path::Path, r: &SoakReport) -> Result<()> {
    let md = render_markdown(r);
    crate::common::write_report(out_dir, "soak", &md, r)?;
    std::fs::write(out_dir.join("soak.md"), &md)?;
    std::fs::write(out_dir.join("soak.svg"), render_plot(r))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_s: f64, fds: usize, rss_kib: u64) -> Sample {
        Sample {
            t_s,
            process: ProcFigures {
                fds: Some(fds),
                rss_kib: Some(rss_kib),
                hwm_kib: Some(rss_kib + 100),
                threads: Some(8),
                cpu_s: Some(t_s / 10.0),
            },
            cpu_percent: Some(10.0),
            appliance: ApplianceFigures {
                live_sessions: Some(52),
                ..Default::default()
            },
            relay: Some(IntervalLatency {
                count: 100,
                p50_us: 90.0,
                p99_us: 400.0 + t_s,
                max_us: 900.0,
            }),
            session_open: None,
            steady_round_trips: 100,
            churn_ops: 200,
            created: 130,
            closed: 120,
            expected_refusals: 30,
            unexpected_errors: 0,
            bench_fds: Some(200),
            loadavg_1m: Some(2.0),
            cpu_pressure_avg10: Some(t_s / 100.0),
        }
    }

    #[test]
    fn a_warmup_cut_short_is_said() {
        assert_eq!(short_warmup_note(300.0, 300.0), "");
        assert_eq!(short_warmup_note(360.0, 300.0), "");
        assert!(short_warmup_note(150.0, 300.0).contains("below --warmup-min-s 300"));
    }

    #[test]
    fn stats_figures_are_read_from_the_stats_json() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"live_sessions":53,"sessions_by_state":{"pending":2,"open":51,"closed":7},
                "ports":{"allocated_ports":3},
                "workers":[{"buffer_chunks_in_use":4,"buffer_chunks_free":20},
                           {"buffer_chunks_in_use":6,"buffer_chunks_free":1}]}"#,
        )
        .unwrap();
        let f = ApplianceFigures::from_stats(&v);
        assert_eq!(
            (
                f.live_sessions,
                f.pending,
                f.open,
                f.ports_allocated,
                f.buffer_chunks_in_use,
                f.buffer_chunks_free,
                f.sessions_remembered
            ),
            (
                Some(53),
                Some(2),
                Some(51),
                Some(3),
                Some(10),
                Some(21),
                Some(60)
            )
        );
        let f = ApplianceFigures::from_stats(&serde_json::json!({}));
        assert_eq!((f.live_sessions, f.ports_allocated), (None, None));
    }

    #[test]
    fn points_skip_samples_without_figures_and_idle_check_uses_the_allowance() {
        let mut s = vec![sample(10.0, 120, 30_000), sample(20.0, 121, 30_100)];
        s[1].process.fds = None;
        assert_eq!(points(&s).len(), 1);
        let a = judge::Allowances {
            warmup_fraction: 0.1,
            warmup_min_s: 300.0,
            fd_count: 8.0,
            rss_percent: 5.0,
            rss_floor_kib: 4096.0,
            unexpected_errors: 0,
        };
        let mut o = Outcome {
            idle_before: ProcFigures {
                fds: Some(20),
                ..Default::default()
            },
            idle_after: Some(ProcFigures {
                fds: Some(28),
                ..Default::default()
            }),
            fd_kinds_before: BTreeMap::new(),
            fd_kinds_after: BTreeMap::new(),
            settled_after_s: Some(0.1),
            stats_end: None,
            samples: s,
            totals: Totals {
                steady_round_trips: 0,
                steady_opens: 0,
                churn_ops: 0,
                churn_ops_per_s: 0.0,
                churn_by_kind: BTreeMap::new(),
                sessions_created: 0,
                sessions_closed: 0,
                sessions_revoked: 0,
                sessions_left_to_expire: 0,
                expiries_confirmed: 0,
                expected_refusals: BTreeMap::new(),
                unexpected_errors: 0,
                unexpected_reasons: BTreeMap::new(),
                relay: None,
                session_open: None,
            },
            failures: vec![],
        };
        assert_eq!(idle_failure(&o, &a), None);
        o.idle_after = Some(ProcFigures {
            fds: Some(29),
            ..Default::default()
        });
        let f = idle_failure(&o, &a).unwrap();
        assert!(
            f.contains("29 descriptors after the workload, 20 before"),
            "{f}"
        );
    }

    #[test]
    fn summary_table_is_thinned_and_keeps_the_last_sample() {
        let samples: Vec<Sample> = (1..=360)
            .map(|k| sample(k as f64 * 10.0, 130, 40_000))
            .collect();
        let t = sample_table(&samples);
        let lines: Vec<&str> = t.lines().collect();
        // Header, rule, every 28th sample from the first (13 rows), the last.
        assert_eq!(lines.len(), 2 + 13 + 1, "{t}");
        assert!(lines[2].starts_with("| 10 s "), "{t}");
        assert!(lines.last().unwrap().starts_with("| 60 min "), "{t}");
        assert!(sample_table(&[]).is_empty());
    }

    #[test]
    fn workload_that_did_not_run_is_a_failure() {
        let cfg = SoakConfig {
            io: SoakIo::Epoll,
            duration_s: 100,
            interval_s: 10,
            steady_sessions: 10,
            steady_round_trips_per_s: 10.0,
            message_bytes: 64,
            churn_per_s: 20.0,
            churn_threads: 4,
            churn_kinds: churn::KINDS.to_vec(),
            allowances: judge::Allowances {
                warmup_fraction: 0.1,
                warmup_min_s: 300.0,
                fd_count: 8.0,
                rss_percent: 5.0,
                rss_floor_kib: 4096.0,
                unexpected_errors: 0,
            },
            state_dir: None,
            common: Common {
                websockify: PathBuf::new(),
                consolegate: PathBuf::new(),
                consolegate_args: vec![],
                bench_exe: PathBuf::new(),
                ws_path: "/".into(),
                ws_subprotocol: None,
                startup_timeout_ms: 1,
                io_timeout_ms: 1,
                out_dir: PathBuf::new(),
                meta: BTreeMap::new(),
            },
        };
        assert!(cfg.validate().is_ok());
        let mut t = Totals {
            steady_round_trips: 10_000,
            steady_opens: 10,
            churn_ops: 2000,
            churn_ops_per_s: 20.0,
            churn_by_kind: BTreeMap::new(),
            sessions_created: 0,
            sessions_closed: 0,
            sessions_revoked: 0,
            sessions_left_to_expire: 0,
            expiries_confirmed: 0,
            expected_refusals: BTreeMap::new(),
            unexpected_errors: 0,
            unexpected_reasons: BTreeMap::new(),
            relay: None,
            session_open: None,
        };
        assert!(workload_failures(&cfg, &t, 100.0).is_empty());
        t.churn_ops_per_s = 9.0;
        t.steady_round_trips = 4000;
        let f = workload_failures(&cfg, &t, 100.0);
        assert_eq!(f.len(), 2, "{f:?}");
        let bad = SoakConfig {
            interval_s: 0,
            ..cfg.clone()
        };
        assert!(bad.validate().is_err());
        let bad = SoakConfig {
            churn_per_s: 0.0,
            ..cfg
        };
        assert!(bad.validate().is_err());
    }
}
