//! `downstream-bulk`: the proxy's CPU per GB with several bulk downstream
//! sessions at once, split by thread, the way it is measured from outside.
//!
//! N sessions (default 4) through the proxy; each backend connection writes
//! `write_bytes` at a time (default 64 KiB) as fast as the proxy takes them,
//! the clients read WebSocket frames and discard them, T bytes in all
//! (default 1 GiB). Proxy CPU is the utime + stime of the proxy process
//! (every thread) from `/proc/<pid>/stat`, read after every session is
//! connected and warmed up and again when the last byte arrived. The same
//! readings per thread (`/proc/<pid>/task/*/stat`) give the breakdown:
//! data-plane workers (`cg-worker-*`), io_uring's io-wq workers
//! (`iou-wrk-*`: operations the kernel could not complete inline and punted
//! to a thread), SQPOLL threads (`iou-sqp-*`), the rest, and threads that
//! exited during the phase. A sampler reads the task list every
//! [`SAMPLE_MS`] ms, so short-lived io-wq workers are seen too. After each
//! run the proxy's log gives how the bytes went (spliced, bulk receives,
//! copied) and its error counters (e.g. `uring_no_buffers`).
//!
//! Differs from `throughput --directions down` (one session by default) in
//! the session count and in what it reports; the backend and client are the
//! same kind (in-process threads, blocking sockets).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::client::{self, Transport};
use crate::common::{rotated, unix_now, Common};
use crate::procfs;
use crate::proxy::{self, ProxyKind, RunningProxy};
use crate::report::{self, Machine, RunInfo};
use crate::server::{ThreadServer, Tracker};
use crate::stats;
use crate::throughput::Gate;
use crate::wsproto::PayloadCounter;

/// Most sessions (one client thread and one backend thread each).
pub const MAX_SESSIONS: usize = 256;
/// Largest backend write.
pub const MAX_WRITE_BYTES: usize = 16 << 20;
/// Most runs.
pub const MAX_RUNS: usize = 50;
/// Period of the per-thread sampler.
pub const SAMPLE_MS: u64 = 50;
/// Extra bytes each backend connection may write beyond its share (what
/// the proxy and the sockets still hold when the client stops).
const BACKEND_SLACK_BYTES: u64 = 64 << 20;

/// The flags of `downstream-bulk` (also taken by `all`).
#[derive(Debug, Clone, clap::Args)]
pub struct DownstreamBulkOpts {
    /// Proxies for downstream-bulk (default: the consolegate ones in --proxies).
    #[arg(long, value_enum, value_delimiter = ',')]
    bulk_proxies: Option<Vec<ProxyKind>>,
    /// Repetitions; every run measures every proxy once (rotated order).
    #[arg(long, default_value_t = 3)]
    bulk_runs: usize,
    /// Concurrent sessions sharing the byte budget.
    #[arg(long, default_value_t = 4)]
    bulk_sessions: usize,
    /// Bytes per backend write.
    #[arg(long, default_value = "64KiB", value_parser = crate::parse_bytes)]
    bulk_write_bytes: u64,
    /// Measured payload per proxy and run, all sessions together.
    #[arg(long, default_value = "1GiB", value_parser = crate::parse_bytes)]
    bulk_bytes: u64,
    /// Bytes per client read (a browser's WebSocket reads are small).
    #[arg(long, default_value = "256KiB", value_parser = crate::parse_bytes)]
    bulk_read_bytes: u64,
    /// Unmeasured payload per session first.
    #[arg(long, default_value = "8MiB", value_parser = crate::parse_bytes)]
    bulk_warmup_bytes: u64,
    /// Measured phase per proxy and run, at most.
    #[arg(long, default_value_t = 20_000)]
    bulk_time_limit_ms: u64,
}

impl DownstreamBulkOpts {
    pub fn config(&self, proxies: &[ProxyKind], common: &Common) -> BulkConfig {
        let proxies = match &self.bulk_proxies {
            Some(p) => p.clone(),
            None => proxies
                .iter()
                .copied()
                .filter(|p| matches!(p, ProxyKind::ConsolegateEpoll | ProxyKind::ConsolegateUring))
                .collect(),
        };
        BulkConfig {
            proxies,
            runs: self.bulk_runs,
            sessions: self.bulk_sessions,
            write_bytes: usize::try_from(self.bulk_write_bytes).unwrap_or(usize::MAX),
            read_bytes: usize::try_from(self.bulk_read_bytes).unwrap_or(usize::MAX),
            bytes: self.bulk_bytes,
            warmup_bytes: self.bulk_warmup_bytes,
            time_limit_ms: self.bulk_time_limit_ms,
            common: common.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BulkConfig {
    pub proxies: Vec<ProxyKind>,
    pub runs: usize,
    pub sessions: usize,
    pub write_bytes: usize,
    pub read_bytes: usize,
    pub bytes: u64,
    pub warmup_bytes: u64,
    pub time_limit_ms: u64,
    pub common: Common,
}

/// Who a proxy thread is, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ThreadClass {
    /// consolegate's data-plane workers (`cg-worker-N`).
    Worker,
    /// io_uring's io-wq workers (`iou-wrk-PID`).
    IoWq,
    /// io_uring SQPOLL threads (`iou-sqp-PID`).
    SqPoll,
    Other,
}

impl ThreadClass {
    pub fn of(comm: &str) -> ThreadClass {
        if comm.starts_with("cg-worker") {
            ThreadClass::Worker
        } else if comm.starts_with("iou-wrk") {
            ThreadClass::IoWq
        } else if comm.starts_with("iou-sqp") {
            ThreadClass::SqPoll
        } else {
            ThreadClass::Other
        }
    }
}

/// One thread's name and CPU ticks (utime + stime).
#[derive(Debug, Clone, PartialEq, Eq)]
struct TaskTicks {
    comm: String,
    ticks: u64,
}

/// The process's own ticks (all threads, exited ones included) and its
/// live threads' ticks, at one instant.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    process_ticks: u64,
    tasks: HashMap<u32, TaskTicks>,
}

fn snapshot(pid: u32) -> Snapshot {
    let process_ticks = procfs::read_stat(pid).map_or(0, |s| s.utime + s.stime);
    let mut tasks = HashMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for entry in dir.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let Ok(line) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            if let (Some(comm), Some(st)) = (stat_comm(&line), procfs::parse_stat(&line)) {
                tasks.insert(
                    tid,
                    TaskTicks {
                        comm: comm.to_string(),
                        ticks: st.utime + st.stime,
                    },
                );
            }
        }
    }
    Snapshot {
        process_ticks,
        tasks,
    }
}

/// The command name of a `stat` line: between the first `(` and the last `)`.
fn stat_comm(line: &str) -> Option<&str> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    (open < close).then(|| &line[open + 1..close])
}

/// CPU seconds of the measured phase by thread class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Breakdown {
    pub worker_s: f64,
    pub io_wq_s: f64,
    pub sqpoll_s: f64,
    pub other_s: f64,
    /// Threads that exited during the phase (the process total minus the
    /// threads alive at the end; io-wq workers that came and went, as far
    /// as the sampler did not see them).
    pub exited_s: f64,
}

impl Breakdown {
    fn add(&mut self, class: ThreadClass, s: f64) {
        match class {
            ThreadClass::Worker => self.worker_s += s,
            ThreadClass::IoWq => self.io_wq_s += s,
            ThreadClass::SqPoll => self.sqpoll_s += s,
            ThreadClass::Other => self.other_s += s,
        }
    }
}

/// Tracks every thread seen between the two snapshots: its ticks at the
/// first sighting (0 for threads born after the start) and the last.
#[derive(Debug, Default)]
struct TaskLedger {
    seen: HashMap<u32, (ThreadClass, u64, u64)>,
    max_io_wq: usize,
}

impl TaskLedger {
    fn start(base: &Snapshot) -> TaskLedger {
        let mut l = TaskLedger::default();
        for (tid, t) in &base.tasks {
            l.seen
                .insert(*tid, (ThreadClass::of(&t.comm), t.ticks, t.ticks));
        }
        l.max_io_wq = l.count_io_wq(base);
        l
    }

    fn count_io_wq(&self, s: &Snapshot) -> usize {
        s.tasks
            .values()
            .filter(|t| ThreadClass::of(&t.comm) == ThreadClass::IoWq)
            .count()
    }

    fn observe(&mut self, s: &Snapshot) {
        for (tid, t) in &s.tasks {
            let class = ThreadClass::of(&t.comm);
            let e = self.seen.entry(*tid).or_insert((class, 0, t.ticks));
            e.0 = class;
            e.2 = e.2.max(t.ticks);
        }
        self.max_io_wq = self.max_io_wq.max(self.count_io_wq(s));
    }

    /// Per class, from the ledger; what the process total has beyond that
    /// went to threads never sampled.
    fn breakdown(&self, process_ticks: u64, hz: f64) -> Breakdown {
        let mut b = Breakdown::default();
        let mut sum = 0u64;
        for &(class, first, last) in self.seen.values() {
            let d = last.saturating_sub(first);
            sum += d;
            b.add(class, d as f64 / hz);
        }
        b.exited_s = process_ticks.saturating_sub(sum) as f64 / hz;
        b
    }
}

/// How the proxy moved the bytes, from its log (consolegate's close lines
/// and its `stopped` line).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LogFigures {
    pub sessions_closed: u64,
    pub bytes_down: u64,
    pub bytes_spliced: u64,
    pub bytes_bulk_recv: u64,
    /// The `errors=` of the `stopped` line (e.g. `uring_no_buffers=3`).
    pub errors: String,
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..].split_whitespace().next()
}

/// Sums the close lines of a consolegate log.
pub fn parse_log(text: &str) -> LogFigures {
    let mut f = LogFigures::default();
    for line in text.lines() {
        let num = |k: &str| field(line, k).and_then(|v| v.parse::<u64>().ok());
        if line.contains("session closed") {
            f.sessions_closed += 1;
            f.bytes_down += num("bytes_down").unwrap_or(0);
            f.bytes_spliced += num("bytes_spliced").unwrap_or(0);
            f.bytes_bulk_recv += num("bytes_bulk_recv").unwrap_or(0);
        } else if line.contains(" stopped") {
            f.errors = field(line, "errors").unwrap_or("").to_string();
        }
    }
    f
}

#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub proxy: ProxyKind,
    pub run: usize,
    pub ok: bool,
    pub error: Option<String>,
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_s: Option<f64>,
    pub proxy_cpu_s: f64,
    pub cpu_s_per_gb: Option<f64>,
    pub threads: Breakdown,
    pub max_io_wq_threads: usize,
    pub log: LogFigures,
    pub time_limited: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub proxy: ProxyKind,
    pub runs: usize,
    pub runs_ok: usize,
    pub mb_per_s: Option<f64>,
    pub cpu_s_per_gb: Option<f64>,
    pub cpu_s_per_gb_range: Option<(f64, f64)>,
    /// Per thread class, CPU-s per GB (medians).
    pub worker_s_per_gb: Option<f64>,
    pub io_wq_s_per_gb: Option<f64>,
    pub other_s_per_gb: Option<f64>,
    pub exited_s_per_gb: Option<f64>,
    pub max_io_wq_threads: usize,
    /// Share of the downstream bytes that went by splice / bulk receive.
    pub spliced_share: Option<f64>,
    pub bulk_recv_share: Option<f64>,
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct BulkReport {
    #[serde(flatten)]
    pub run: RunInfo,
    pub config: BulkConfig,
    pub median: Vec<Summary>,
    /// io_uring's CPU-s/GB over epoll's, per run (same run, so the same
    /// machine load), then the median and the range; None unless both ran.
    pub uring_over_epoll: Option<RunRatio>,
    pub measurements: Vec<Measurement>,
}

/// The backend: every connection writes `write_bytes` at a time, at most
/// `max_bytes`, or until the peer goes away.
fn start_backend(write_bytes: usize, max_bytes: u64) -> Result<ThreadServer> {
    let chunk: Arc<Vec<u8>> = Arc::new((0..write_bytes).map(|i| (i % 251) as u8).collect());
    let server = ThreadServer::start("bulk", MAX_SESSIONS, move |s: TcpStream, _t: &Tracker| {
        s.set_nodelay(true)?;
        let mut s = s;
        let mut sent = 0u64;
        while sent < max_bytes {
            s.write_all(&chunk)?;
            sent += chunk.len() as u64;
        }
        Ok(())
    })?;
    Ok(server)
}

enum Msg {
    Ready,
    Failed(usize, String),
    Done {
        bytes: u64,
        end: Instant,
        time_limited: bool,
    },
}

struct Plan {
    addr: SocketAddr,
    transport: Transport,
    warmup: u64,
    quota: u64,
    read_bytes: usize,
    time_limit: Duration,
    io_timeout: Duration,
    wait_limit: Duration,
}

/// One client: connect, read `warmup` payload bytes, report ready, wait
/// for the start, read `quota` payload bytes (or stop at the time limit),
/// report, and hold the connection until released.
fn client(id: usize, p: &Plan, start: &Gate, release: &Gate, tx: &mpsc::Sender<Msg>) {
    let result = (|| -> Result<Option<Msg>, String> {
        let (mut s, leftover) = client::open_stream(p.addr, &p.transport, p.io_timeout, id as u64)
            .map_err(|e| e.to_string())?;
        let mut counter = PayloadCounter::default();
        let mut buf = vec![0u8; p.read_bytes];
        let mut read = |c: &mut PayloadCounter| -> Result<u64, String> {
            let n = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed by the proxy".into());
            }
            c.feed(&buf[..n]).map_err(|e| e.to_string())
        };
        let mut got = counter.feed(&leftover).map_err(|e| e.to_string())?;
        let warm_deadline = Instant::now() + p.time_limit;
        while got < p.warmup {
            if Instant::now() > warm_deadline {
                return Err("warm-up did not finish in time".into());
            }
            got += read(&mut counter)?;
        }
        let _ = tx.send(Msg::Ready);
        if !start.wait(p.wait_limit) {
            return Ok(None);
        }
        let deadline = Instant::now() + p.time_limit;
        let (mut bytes, mut time_limited) = (0u64, false);
        while bytes < p.quota {
            if Instant::now() > deadline {
                time_limited = true;
                break;
            }
            bytes += read(&mut counter)?;
        }
        Ok(Some(Msg::Done {
            bytes,
            end: Instant::now(),
            time_limited,
        }))
    })();
    match result {
        Ok(Some(done)) => {
            let _ = tx.send(done);
            release.wait(p.wait_limit);
        }
        Ok(None) => {}
        Err(e) => {
            let _ = tx.send(Msg::Failed(id, e));
        }
    }
}

/// Samples the proxy's threads every [`SAMPLE_MS`] until `stop`.
fn spawn_sampler(
    pid: u32,
    ledger: Arc<Mutex<TaskLedger>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("bulk-sampler".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let s = snapshot(pid);
                ledger.lock().unwrap_or_else(|p| p.into_inner()).observe(&s);
                std::thread::sleep(Duration::from_millis(SAMPLE_MS));
            }
        })
}

/// What the clients reported for the measured phase.
struct Phase {
    bytes: u64,
    end: Instant,
    time_limited: bool,
}

/// Wait for `n` messages of one kind: `Ready` (phase None) or `Done`.
fn collect(
    rx: &mpsc::Receiver<Msg>,
    n: usize,
    t0: Instant,
    limit: Duration,
) -> Result<Phase, String> {
    let deadline = Instant::now() + limit;
    let mut phase = Phase {
        bytes: 0,
        end: t0,
        time_limited: false,
    };
    let mut got = 0;
    while got < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Msg::Ready) => got += 1,
            Ok(Msg::Done {
                bytes,
                end,
                time_limited,
            }) => {
                got += 1;
                phase.bytes += bytes;
                phase.end = phase.end.max(end);
                phase.time_limited |= time_limited;
            }
            Ok(Msg::Failed(id, e)) => return Err(format!("session {id}: {e}")),
            Err(_) => return Err("sessions did not answer in time".into()),
        }
    }
    Ok(phase)
}

/// One proxy, one run: connect and warm up every session, then measure.
fn measure(running: &RunningProxy, run: usize, cfg: &BulkConfig) -> Measurement {
    let mut m = Measurement {
        proxy: running.kind,
        run,
        ok: false,
        error: None,
        bytes: 0,
        seconds: 0.0,
        mb_per_s: None,
        proxy_cpu_s: 0.0,
        cpu_s_per_gb: None,
        threads: Breakdown::default(),
        max_io_wq_threads: 0,
        log: LogFigures::default(),
        time_limited: false,
    };
    let Some(pid) = running.pid() else {
        m.error = Some("no proxy process to measure".into());
        return m;
    };
    let io_timeout = Duration::from_millis(cfg.common.io_timeout_ms);
    let time_limit = Duration::from_millis(cfg.time_limit_ms);
    let plan = Arc::new(Plan {
        addr: running.addr,
        transport: running.transport.clone(),
        warmup: cfg.warmup_bytes,
        quota: cfg.bytes.div_ceil(cfg.sessions as u64),
        read_bytes: cfg.read_bytes,
        time_limit,
        io_timeout,
        wait_limit: time_limit * 2 + io_timeout * 2,
    });
    let (start, release) = (Arc::new(Gate::default()), Arc::new(Gate::default()));
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for id in 0..cfg.sessions {
        let (p, s, r, t) = (plan.clone(), start.clone(), release.clone(), tx.clone());
        match std::thread::Builder::new()
            .name(format!("bulk-{id}"))
            .spawn(move || client(id, &p, &s, &r, &t))
        {
            Ok(h) => handles.push(h),
            Err(e) => {
                let _ = tx.send(Msg::Failed(id, format!("spawn: {e}")));
            }
        }
    }
    drop(tx);
    let result = (|| -> Result<(), String> {
        collect(&rx, cfg.sessions, Instant::now(), plan.wait_limit)?;
        let hz = procfs::clock_ticks_per_second() as f64;
        let base = snapshot(pid);
        let ledger = Arc::new(Mutex::new(TaskLedger::start(&base)));
        let sampling = Arc::new(AtomicBool::new(false));
        let sampler =
            spawn_sampler(pid, ledger.clone(), sampling.clone()).map_err(|e| e.to_string());
        let t0 = Instant::now();
        start.open();
        let phase = collect(&rx, cfg.sessions, t0, plan.wait_limit);
        let end = snapshot(pid);
        sampling.store(true, Ordering::Relaxed);
        if let Ok(h) = sampler {
            let _ = h.join();
        }
        let phase = phase?;
        let mut ledger = ledger.lock().unwrap_or_else(|p| p.into_inner());
        ledger.observe(&end);
        let ticks = end.process_ticks.saturating_sub(base.process_ticks);
        m.threads = ledger.breakdown(ticks, hz);
        m.max_io_wq_threads = ledger.max_io_wq;
        m.bytes = phase.bytes;
        m.seconds = phase.end.duration_since(t0).as_secs_f64();
        m.time_limited = phase.time_limited;
        m.proxy_cpu_s = ticks as f64 / hz;
        let gb = m.bytes as f64 / 1e9;
        m.mb_per_s = (m.seconds > 0.0).then(|| m.bytes as f64 / 1e6 / m.seconds);
        m.cpu_s_per_gb = (gb > 0.0).then(|| m.proxy_cpu_s / gb);
        m.ok = m.bytes > 0;
        if !m.ok {
            return Err("no bytes arrived".into());
        }
        Ok(())
    })();
    if let Err(e) = result {
        m.error = Some(e);
    }
    start.open();
    release.open();
    for h in handles {
        let _ = h.join();
    }
    m
}

fn per_gb(ms: &[&Measurement], f: fn(&Measurement) -> f64) -> Option<f64> {
    let v: Vec<f64> = ms
        .iter()
        .filter(|m| m.bytes > 0)
        .map(|m| f(m) / (m.bytes as f64 / 1e9))
        .collect();
    stats::median(&v)
}

fn share(ms: &[&Measurement], f: fn(&LogFigures) -> u64) -> Option<f64> {
    let v: Vec<f64> = ms
        .iter()
        .filter(|m| m.log.bytes_down > 0)
        .map(|m| f(&m.log) as f64 / m.log.bytes_down as f64)
        .collect();
    stats::median(&v)
}

pub fn summarize(ms: &[Measurement], proxies: &[ProxyKind]) -> Vec<Summary> {
    proxies
        .iter()
        .map(|&proxy| {
            let all: Vec<&Measurement> = ms.iter().filter(|m| m.proxy == proxy).collect();
            let ok: Vec<&Measurement> = all.iter().copied().filter(|m| m.ok).collect();
            let cpu: Vec<f64> = ok.iter().filter_map(|m| m.cpu_s_per_gb).collect();
            let range = cpu.iter().copied().fold(None, |r: Option<(f64, f64)>, v| {
                Some(r.map_or((v, v), |(a, b)| (a.min(v), b.max(v))))
            });
            let mut errors: Vec<String> = Vec::new();
            for e in all.iter().filter_map(|m| m.error.as_ref()) {
                if !errors.contains(e) {
                    errors.push(e.clone());
                }
            }
            Summary {
                proxy,
                runs: all.len(),
                runs_ok: ok.len(),
                mb_per_s: stats::median(&ok.iter().filter_map(|m| m.mb_per_s).collect::<Vec<_>>()),
                cpu_s_per_gb: stats::median(&cpu),
                cpu_s_per_gb_range: range,
                worker_s_per_gb: per_gb(&ok, |m| m.threads.worker_s),
                io_wq_s_per_gb: per_gb(&ok, |m| m.threads.io_wq_s),
                other_s_per_gb: per_gb(&ok, |m| m.threads.other_s + m.threads.sqpoll_s),
                exited_s_per_gb: per_gb(&ok, |m| m.threads.exited_s),
                max_io_wq_threads: ok.iter().map(|m| m.max_io_wq_threads).max().unwrap_or(0),
                spliced_share: share(&ok, |l| l.bytes_spliced),
                bulk_recv_share: share(&ok, |l| l.bytes_bulk_recv),
                errors,
            }
        })
        .collect()
}

/// A ratio taken within each run, then summarized over the runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RunRatio {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

/// `numerator`'s CPU-s/GB over `denominator`'s, in every run where both
/// succeeded: the load of a shared machine moves both alike, so the ratio
/// is steadier than either figure.
pub fn ratio_per_run(
    ms: &[Measurement],
    numerator: ProxyKind,
    denominator: ProxyKind,
) -> Option<RunRatio> {
    let cpu = |kind: ProxyKind, run: usize| {
        ms.iter()
            .find(|m| m.proxy == kind && m.run == run && m.ok)
            .and_then(|m| m.cpu_s_per_gb)
    };
    let mut runs: Vec<usize> = ms.iter().map(|m| m.run).collect();
    runs.sort_unstable();
    runs.dedup();
    let ratios: Vec<f64> = runs
        .into_iter()
        .filter_map(|run| match (cpu(numerator, run), cpu(denominator, run)) {
            (Some(n), Some(d)) if d > 0.0 => Some(n / d),
            _ => None,
        })
        .collect();
    let median = stats::median(&ratios)?;
    Some(RunRatio {
        median,
        min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        runs: ratios.len(),
    })
}

fn check(cfg: &BulkConfig) -> Result<()> {
    if cfg.sessions == 0 || cfg.sessions > MAX_SESSIONS {
        bail!("--bulk-sessions must be in 1..={MAX_SESSIONS}");
    }
    if cfg.write_bytes == 0 || cfg.write_bytes > MAX_WRITE_BYTES {
        bail!("--bulk-write-bytes must be in 1..={MAX_WRITE_BYTES}");
    }
    if cfg.read_bytes == 0 || cfg.read_bytes > MAX_WRITE_BYTES {
        bail!("--bulk-read-bytes must be in 1..={MAX_WRITE_BYTES}");
    }
    if cfg.runs == 0 || cfg.runs > MAX_RUNS {
        bail!("--bulk-runs must be in 1..={MAX_RUNS}");
    }
    if cfg.bytes == 0 {
        bail!("--bulk-bytes must be positive");
    }
    Ok(())
}

/// One proxy, one run: start it, measure, stop it, read its log.
fn one(kind: ProxyKind, run: usize, cfg: &BulkConfig, backend: SocketAddr) -> Measurement {
    let env = cfg.common.env(backend);
    let tag = format!("downstream-bulk-run{run}");
    let log = env.log_dir.join(format!("{}-{tag}.log", kind.name()));
    match proxy::start(kind, &env, &tag) {
        Ok(mut running) => {
            let mut m = measure(&running, run, cfg);
            if !m.ok && running.has_exited() {
                m.error = Some(format!(
                    "{} (proxy exited: {})",
                    m.error.clone().unwrap_or_default(),
                    running.log_tail()
                ));
            }
            running.stop();
            m.log = std::fs::read_to_string(&log)
                .map(|t| parse_log(&t))
                .unwrap_or_default();
            m
        }
        Err(e) => Measurement {
            error: Some(format!("start: {e:#}")),
            ..measure_failed(kind, run)
        },
    }
}

fn measure_failed(proxy: ProxyKind, run: usize) -> Measurement {
    Measurement {
        proxy,
        run,
        ok: false,
        error: None,
        bytes: 0,
        seconds: 0.0,
        mb_per_s: None,
        proxy_cpu_s: 0.0,
        cpu_s_per_gb: None,
        threads: Breakdown::default(),
        max_io_wq_threads: 0,
        log: LogFigures::default(),
        time_limited: false,
    }
}

fn print_line(m: &Measurement, runs: usize) {
    match (&m.error, m.cpu_s_per_gb) {
        (None, Some(cpu)) => eprintln!(
            "downstream-bulk run {}/{runs}: {:<17} {:>7.1} MB/s {:>6.3} CPU-s/GB (workers {:.2} s, io-wq {:.2} s over ≤{} threads, other {:.2} s, exited {:.2} s; {} MB in {:.2} s{})",
            m.run,
            m.proxy,
            m.mb_per_s.unwrap_or(0.0),
            cpu,
            m.threads.worker_s,
            m.threads.io_wq_s,
            m.max_io_wq_threads,
            m.threads.other_s + m.threads.sqpoll_s,
            m.threads.exited_s,
            m.bytes / 1_000_000,
            m.seconds,
            if m.time_limited { ", time-limited" } else { "" }
        ),
        _ => eprintln!(
            "downstream-bulk run {}/{runs}: {} failed: {}",
            m.run,
            m.proxy,
            m.error.as_deref().unwrap_or("?")
        ),
    }
}

pub fn run(cfg: BulkConfig, stop: Arc<AtomicBool>) -> Result<BulkReport> {
    check(&cfg)?;
    let started = unix_now();
    let machine = Machine::describe();
    std::fs::create_dir_all(&cfg.common.out_dir)?;
    let proxies = crate::common::proxies_under_test(&cfg.proxies);
    let per_conn = cfg.warmup_bytes + cfg.bytes.div_ceil(cfg.sessions as u64) + BACKEND_SLACK_BYTES;
    let mut backend = start_backend(cfg.write_bytes, per_conn).context("starting the backend")?;
    let mut measurements = Vec::new();
    'runs: for run in 1..=cfg.runs {
        for kind in rotated(&proxies, run) {
            if stop.load(Ordering::SeqCst) {
                break 'runs;
            }
            let m = one(kind, run, &cfg, backend.addr());
            print_line(&m, cfg.runs);
            measurements.push(m);
        }
    }
    backend.stop();
    let report = BulkReport {
        run: RunInfo::ended("downstream-bulk", started, &stop, machine),
        median: summarize(&measurements, &proxies),
        uring_over_epoll: ratio_per_run(
            &measurements,
            ProxyKind::ConsolegateUring,
            ProxyKind::ConsolegateEpoll,
        ),
        config: cfg,
        measurements,
    };
    let text = render_text(&report);
    crate::common::write_report(
        &report.config.common.out_dir,
        "downstream-bulk",
        &text,
        &report,
    )?;
    Ok(report)
}

pub fn render_text(r: &BulkReport) -> String {
    let c = &r.config;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Downstream bulk: {} session(s), backend writes of {} B, {} MB per proxy and run, ≤ {} ms; median of {} run(s).\n\
         CPU-s/GB = proxy process utime+stime (all threads) per 10^9 payload bytes; by thread class below \
         (workers = cg-worker-*, io-wq = iou-wrk-*, exited = threads gone before the end).\n",
        c.sessions,
        c.write_bytes,
        c.bytes / 1_000_000,
        c.time_limit_ms,
        c.runs
    );
    let f = |v: Option<f64>, d: usize| v.map_or("—".into(), |v| format!("{v:.d$}"));
    let pct = |v: Option<f64>| v.map_or("—".into(), |v| format!("{:.1}%", v * 100.0));
    let rows: Vec<Vec<String>> = r
        .median
        .iter()
        .map(|s| {
            vec![
                s.proxy.name().to_string(),
                f(s.mb_per_s, 0),
                f(s.cpu_s_per_gb, 3),
                s.cpu_s_per_gb_range
                    .map_or("—".into(), |(a, b)| format!("{a:.3}–{b:.3}")),
                f(s.worker_s_per_gb, 3),
                f(s.io_wq_s_per_gb, 3),
                s.max_io_wq_threads.to_string(),
                f(s.other_s_per_gb, 3),
                f(s.exited_s_per_gb, 3),
                pct(s.spliced_share),
                pct(s.bulk_recv_share),
                format!("{}/{}", s.runs_ok, s.runs),
            ]
        })
        .collect();
    out.push_str(&report::markdown_table(
        &[
            "proxy",
            "MB/s",
            "CPU-s/GB",
            "range",
            "workers",
            "io-wq",
            "io-wq threads",
            "other",
            "exited",
            "spliced",
            "bulk recv",
            "runs ok",
        ],
        &rows,
    ));
    if let Some(q) = r.uring_over_epoll {
        let _ = writeln!(
            out,
            "\nio_uring ÷ epoll CPU-s/GB, per run: median {:.2} (range {:.2}–{:.2}, {} run(s)).",
            q.median, q.min, q.max, q.runs
        );
    }
    for s in r.median.iter().filter(|s| !s.errors.is_empty()) {
        let _ = writeln!(out, "\n{}: {}", s.proxy, s.errors.join("; "));
    }
    let errs: Vec<String> = r
        .measurements
        .iter()
        .filter(|m| !m.log.errors.is_empty())
        .map(|m| format!("{} run {}: {}", m.proxy, m.run, m.log.errors))
        .collect();
    if !errs.is_empty() {
        let _ = writeln!(out, "\nProxy error counters: {}", errs.join("; "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_threads_by_name() {
        assert_eq!(ThreadClass::of("cg-worker-1"), ThreadClass::Worker);
        assert_eq!(ThreadClass::of("iou-wrk-4242"), ThreadClass::IoWq);
        assert_eq!(ThreadClass::of("iou-sqp-4242"), ThreadClass::SqPoll);
        assert_eq!(ThreadClass::of("consolegate"), ThreadClass::Other);
        assert_eq!(stat_comm("12 (iou-wrk-9) S 1"), Some("iou-wrk-9"));
        assert_eq!(stat_comm("12 (a (b)) S 1"), Some("a (b)"));
        assert_eq!(stat_comm("garbage"), None);
    }

    fn snap(process_ticks: u64, tasks: &[(u32, &str, u64)]) -> Snapshot {
        Snapshot {
            process_ticks,
            tasks: tasks
                .iter()
                .map(|&(tid, comm, ticks)| {
                    (
                        tid,
                        TaskTicks {
                            comm: comm.into(),
                            ticks,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn ledger_splits_by_class_and_counts_the_unseen_as_exited() {
        let base = snap(100, &[(1, "consolegate", 10), (2, "cg-worker-0", 80)]);
        let mut l = TaskLedger::start(&base);
        // An io-wq worker is born, seen twice, then gone; another never seen.
        l.observe(&snap(0, &[(2, "cg-worker-0", 120), (9, "iou-wrk-1", 5)]));
        l.observe(&snap(0, &[(2, "cg-worker-0", 150), (9, "iou-wrk-1", 7)]));
        let end = snap(300, &[(1, "consolegate", 11), (2, "cg-worker-0", 170)]);
        l.observe(&end);
        assert_eq!(l.max_io_wq, 1);
        let b = l.breakdown(300 - 100, 100.0);
        assert!((b.worker_s - 0.90).abs() < 1e-9, "{b:?}");
        assert!((b.io_wq_s - 0.07).abs() < 1e-9, "{b:?}");
        assert!((b.other_s - 0.01).abs() < 1e-9, "{b:?}");
        // 200 ticks in all: 90 + 7 + 1 seen, 102 unseen.
        assert!((b.exited_s - 1.02).abs() < 1e-9, "{b:?}");
    }

    fn measured(proxy: ProxyKind, run: usize, cpu: Option<f64>) -> Measurement {
        Measurement {
            ok: cpu.is_some(),
            cpu_s_per_gb: cpu,
            ..measure_failed(proxy, run)
        }
    }

    #[test]
    fn ratio_is_taken_within_each_run() {
        use ProxyKind::{ConsolegateEpoll as E, ConsolegateUring as U};
        let ms = [
            measured(E, 1, Some(0.5)),
            measured(U, 1, Some(1.0)),
            measured(U, 2, Some(0.9)),
            measured(E, 2, Some(0.6)),
            // A run where epoll failed counts for neither.
            measured(E, 3, None),
            measured(U, 3, Some(5.0)),
            measured(E, 4, Some(0.8)),
            measured(U, 4, Some(0.8)),
        ];
        let q = ratio_per_run(&ms, U, E).expect("three comparable runs");
        assert_eq!(q.runs, 3);
        assert!((q.median - 1.5).abs() < 1e-9, "{q:?}");
        assert!(
            (q.min - 1.0).abs() < 1e-9 && (q.max - 2.0).abs() < 1e-9,
            "{q:?}"
        );
        assert_eq!(ratio_per_run(&ms[..1], U, E), None);
    }

    #[test]
    fn reads_the_proxy_log() {
        let log = "x INFO consolegate::dataplane::session: session closed session=1 worker=0 code=0 \
                   reason=browser went away bytes_up=0 bytes_down=1000 bytes_spliced=900 bytes_bulk_recv=50 duration_ms=3\n\
                   x INFO consolegate::dataplane::session: session closed session=2 worker=1 code=0 \
                   reason=x bytes_up=0 bytes_down=500 bytes_spliced=0 bytes_bulk_recv=400 duration_ms=3\n\
                   x INFO consolegate: stopped accepted=2 handshakes=2 closed=2 bytes_up=0 bytes_down=1500 errors=browser_io=2,uring_no_buffers=3\n";
        let f = parse_log(log);
        assert_eq!(f.sessions_closed, 2);
        assert_eq!(
            (f.bytes_down, f.bytes_spliced, f.bytes_bulk_recv),
            (1500, 900, 450)
        );
        assert_eq!(f.errors, "browser_io=2,uring_no_buffers=3");
    }

    #[test]
    fn our_own_threads_are_read() {
        let pid = std::process::id();
        let s = snapshot(pid);
        // The main thread's id is the process id.
        let main = s.tasks.get(&pid).expect("the main thread");
        assert!(!main.comm.is_empty());
        // A thread's ticks never exceed its process's (all threads).
        assert!(main.ticks <= snapshot(pid).process_ticks);
    }
}
