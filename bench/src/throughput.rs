//! The throughput benchmark: bulk data through each proxy, one direction at
//! a time, and what it costs the proxy in CPU time.
//!
//! - **down** (backend → browser): an in-process backend writes 64 KiB
//!   framebuffer-like chunks as fast as the proxy takes them; the clients
//!   read the proxy's WebSocket frames and count their payload bytes.
//! - **up** (browser → backend): the clients send masked binary frames
//!   (pre-encoded, each with its own mask, so the client spends its CPU on
//!   `write` only); an in-process sink backend counts what arrives.
//!
//! Bytes are counted at the receiving end. Proxy CPU is the utime + stime
//! of the proxy's whole process tree (websockify forks a process per
//! connection), read from /proc just before the measured phase starts and
//! right after it ends, while the connections are still open. Sessions
//! connect and warm up first (not measured), then start together; each
//! stops at its share of the byte budget or at the time limit.
//!
//! `direct-tcp` is not measured (it has no proxy process); `plain-relay` is a
//! child process like the proxies, so its CPU is read the same way.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::client::{self, Transport};
use crate::common::{rotated, unix_now, Common};
use crate::procfs;
use crate::proxy::{self, ProxyKind, RunningProxy};
use crate::report::RunInfo;
use crate::report::{self, Machine};
use crate::server::{ThreadServer, Tracker};
use crate::stats;
use crate::wsproto::{self, PayloadCounter};

pub const MAX_SESSIONS: usize = 256;
pub const MAX_CHUNK_BYTES: usize = 1 << 20;
/// Frames pre-encoded per upstream session (each with its own mask).
const UP_FRAMES: usize = 16;
/// Read buffer of a downstream client.
const DOWN_READ_BYTES: usize = 256 * 1024;
/// After the clients finish sending, how long the sink may take to receive
/// what the proxy still holds.
const UP_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Backend → browser (framebuffer updates).
    Down,
    /// Browser → backend (masked client frames).
    Up,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Down => "down",
            Direction::Up => "up",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ThroughputConfig {
    pub proxies: Vec<ProxyKind>,
    pub directions: Vec<Direction>,
    pub runs: usize,
    pub sessions: usize,
    /// Measured payload bytes per proxy × direction × run, all sessions.
    pub bytes: u64,
    /// Backend write size (down) and client frame payload (up).
    pub chunk_bytes: usize,
    /// Payload bytes per session before measuring.
    pub warmup_bytes: u64,
    pub time_limit_ms: u64,
    pub common: Common,
}

#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub proxy: ProxyKind,
    pub direction: Direction,
    pub run: usize,
    pub ok: bool,
    pub error: Option<String>,
    /// Payload bytes received at the far end during the measured phase.
    pub bytes: u64,
    pub seconds: f64,
    /// 10^6 bytes per second.
    pub mb_per_s: Option<f64>,
    pub proxy_cpu_s: Option<f64>,
    /// Proxy CPU seconds per 10^9 payload bytes.
    pub cpu_s_per_gb: Option<f64>,
    /// Processes in the proxy's tree at the end (websockify: 1 + sessions).
    pub proxy_processes: usize,
    /// This bench process's CPU (clients and backend) during the phase.
    pub bench_cpu_s: f64,
    /// Some session stopped at the time limit before its byte budget.
    pub time_limited: bool,
}

impl Measurement {
    fn failed(proxy: ProxyKind, direction: Direction, run: usize, error: String) -> Measurement {
        Measurement {
            proxy,
            direction,
            run,
            ok: false,
            error: Some(error),
            bytes: 0,
            seconds: 0.0,
            mb_per_s: None,
            proxy_cpu_s: None,
            cpu_s_per_gb: None,
            proxy_processes: 0,
            bench_cpu_s: 0.0,
            time_limited: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub proxy: ProxyKind,
    pub direction: Direction,
    pub runs: usize,
    pub runs_ok: usize,
    pub bytes: Option<f64>,
    pub mb_per_s: Option<f64>,
    pub cpu_s_per_gb: Option<f64>,
    /// This proxy's figure ÷ websockify's (medians of per-run ratios).
    pub mb_per_s_vs_websockify: Option<f64>,
    pub cpu_s_per_gb_vs_websockify: Option<f64>,
    pub time_limited_runs: usize,
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ThroughputReport {
    #[serde(flatten)]
    pub run: RunInfo,
    pub config: ThroughputConfig,
    pub median: Vec<Summary>,
    pub measurements: Vec<Measurement>,
}

/// Opens once; waiters time out instead of hanging.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Whether the gate opened within `timeout`.
    pub fn wait(&self, timeout: Duration) -> bool {
        let g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |open| !*open)
            .unwrap_or_else(|p| p.into_inner());
        *g
    }
}

/// What the sink backend has received, and when it last received anything.
#[derive(Default)]
pub struct SinkCounter {
    pub bytes: AtomicU64,
    /// Nanoseconds since `base` of the last byte received.
    pub last_ns: AtomicU64,
}

pub struct Backends {
    pub stream: ThreadServer,
    pub sink: ThreadServer,
    pub sink_counter: Arc<SinkCounter>,
    pub base: Instant,
}

/// Starts the stream (down) and sink (up) backends, in-process. The
/// stream backend writes at most `max_stream_bytes` per connection.
pub fn start_backends(chunk_bytes: usize, max_stream_bytes: u64) -> Result<Backends> {
    let chunk: Arc<Vec<u8>> = Arc::new((0..chunk_bytes).map(|i| (i % 251) as u8).collect());
    let stream = ThreadServer::start("stream", 1024, move |s: TcpStream, _t: &Tracker| {
        s.set_nodelay(true)?;
        let mut s = s;
        let mut sent = 0u64;
        // Bounded by bytes; ends early when the peer closes (write error).
        while sent < max_stream_bytes {
            s.write_all(&chunk)?;
            sent += chunk.len() as u64;
        }
        Ok(())
    })?;
    let counter = Arc::new(SinkCounter::default());
    let base = Instant::now();
    let c2 = counter.clone();
    let sink = ThreadServer::start("sink", 1024, move |mut s: TcpStream, _t: &Tracker| {
        let mut buf = vec![0u8; 256 * 1024];
        // Bounded by the peer: ends at EOF or error (the server's stop shuts
        // the socket down).
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            c2.bytes.fetch_add(n as u64, Ordering::Relaxed);
            let ns = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
            c2.last_ns.fetch_max(ns, Ordering::Relaxed);
        }
    })?;
    Ok(Backends {
        stream,
        sink,
        sink_counter: counter,
        base,
    })
}

enum Msg {
    /// Connected and warmed up; payload bytes of the warm-up.
    Ready(u64),
    Failed(usize, String),
    Done {
        bytes: u64,
        end: Instant,
        time_limited: bool,
    },
}

struct SessionPlan {
    addr: SocketAddr,
    transport: Transport,
    direction: Direction,
    warmup: u64,
    quota: u64,
    chunk: usize,
    time_limit: Duration,
    io_timeout: Duration,
    wait_limit: Duration,
}

fn run_session(
    id: usize,
    p: &SessionPlan,
    start: &Gate,
    release: &Gate,
    tx: &mpsc::Sender<Msg>,
    stop: &AtomicBool,
) {
    let fail = |e: String| {
        let _ = tx.send(Msg::Failed(id, e));
    };
    let (mut stream, leftover) =
        match client::open_stream(p.addr, &p.transport, p.io_timeout, id as u64) {
            Ok(s) => s,
            Err(e) => return fail(e.to_string()),
        };
    let websocket = matches!(p.transport, Transport::WebSocket { .. });
    let result = match p.direction {
        Direction::Down => down(&mut stream, leftover, websocket, p, start, tx, stop),
        Direction::Up => up(&mut stream, websocket, p, id, start, tx, stop),
    };
    match result {
        Ok(Some(done)) => {
            let _ = tx.send(done);
            // Hold the connection until the proxy's CPU has been read.
            release.wait(p.wait_limit);
        }
        Ok(None) => {}
        Err(e) => fail(e),
    }
}

#[allow(clippy::too_many_arguments)]
fn down(
    stream: &mut TcpStream,
    leftover: Vec<u8>,
    websocket: bool,
    p: &SessionPlan,
    start: &Gate,
    tx: &mpsc::Sender<Msg>,
    stop: &AtomicBool,
) -> Result<Option<Msg>, String> {
    let mut counter = PayloadCounter::default();
    let mut buf = vec![0u8; DOWN_READ_BYTES];
    let count = |c: &mut PayloadCounter, b: &[u8]| -> Result<u64, String> {
        if websocket {
            c.feed(b).map_err(|e| e.to_string())
        } else {
            Ok(b.len() as u64)
        }
    };
    let leftover = count(&mut counter, &leftover)?;
    warm_then_measure(p, start, tx, stop, leftover, |warm| {
        let n = stream.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(if warm {
                "closed during warm-up".into()
            } else {
                "closed by the proxy".into()
            });
        }
        count(&mut counter, &buf[..n])
    })
}

/// The two phases of a session: `step` (which moves some bytes and says
/// how many; `true` while warming up) until `p.warmup` bytes, counting
/// `first` already moved, then report ready, wait for the start, and
/// `step` until `p.quota` bytes, the time limit or a stop.
fn warm_then_measure(
    p: &SessionPlan,
    start: &Gate,
    tx: &mpsc::Sender<Msg>,
    stop: &AtomicBool,
    first: u64,
    mut step: impl FnMut(bool) -> Result<u64, String>,
) -> Result<Option<Msg>, String> {
    let mut got = first;
    let warm_deadline = Instant::now() + p.time_limit;
    while got < p.warmup {
        if Instant::now() >= warm_deadline || stop.load(Ordering::Relaxed) {
            return Err("warm-up did not finish in time".into());
        }
        got += step(true)?;
    }
    let _ = tx.send(Msg::Ready(got));
    if !start.wait(p.wait_limit) {
        return Ok(None);
    }
    let t0 = Instant::now();
    let deadline = t0 + p.time_limit;
    let mut bytes = 0u64;
    let mut time_limited = false;
    while bytes < p.quota {
        if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
            time_limited = true;
            break;
        }
        bytes += step(false)?;
    }
    Ok(Some(Msg::Done {
        bytes,
        end: Instant::now(),
        time_limited,
    }))
}

fn up(
    stream: &mut TcpStream,
    websocket: bool,
    p: &SessionPlan,
    id: usize,
    start: &Gate,
    tx: &mpsc::Sender<Msg>,
    stop: &AtomicBool,
) -> Result<Option<Msg>, String> {
    // UP_FRAMES frames, each with its own mask (or raw bytes).
    let payload: Vec<u8> = (0..p.chunk).map(|i| (i % 253) as u8).collect();
    let mut next_mask = client::mask_source(id as u64);
    let mut out = Vec::with_capacity(UP_FRAMES * (p.chunk + wsproto::MAX_CLIENT_HEADER));
    let mut frame = vec![0u8; p.chunk + wsproto::MAX_CLIENT_HEADER];
    for _ in 0..UP_FRAMES {
        if websocket {
            let n =
                wsproto::encode_client_frame(wsproto::OP_BINARY, &payload, next_mask(), &mut frame)
                    .map_err(|e| e.to_string())?;
            out.extend_from_slice(&frame[..n]);
        } else {
            out.extend_from_slice(&payload);
        }
    }
    let per_write = (UP_FRAMES * p.chunk) as u64;
    warm_then_measure(p, start, tx, stop, 0, |_| {
        stream
            .write_all(&out)
            .map_err(|e| format!("write: {e}"))
            .map(|()| per_write)
    })
}

/// One proxy × direction measurement against a running proxy.
fn measure(
    running: &RunningProxy,
    direction: Direction,
    run: usize,
    cfg: &ThroughputConfig,
    backends: &Backends,
    stop: &Arc<AtomicBool>,
) -> Measurement {
    let kind = running.kind;
    let Some(pid) = running.pid() else {
        return Measurement::failed(kind, direction, run, "no proxy process to measure".into());
    };
    let io_timeout = Duration::from_millis(cfg.common.io_timeout_ms);
    let time_limit = Duration::from_millis(cfg.time_limit_ms);
    let n = cfg.sessions;
    let plan = Arc::new(SessionPlan {
        addr: running.addr,
        transport: running.transport.clone(),
        direction,
        warmup: cfg.warmup_bytes,
        quota: cfg.bytes.div_ceil(n as u64),
        chunk: cfg.chunk_bytes,
        time_limit,
        io_timeout,
        wait_limit: time_limit * 2 + io_timeout * 2,
    });
    // The sink is shared by every measurement: count from here.
    let sink_base = backends.sink_counter.bytes.load(Ordering::Relaxed);
    let start = Arc::new(Gate::default());
    let release = Arc::new(Gate::default());
    let (tx, rx) = mpsc::channel();
    let mut handles = Vec::new();
    for id in 0..n {
        let (p, s, r, t, st) = (
            plan.clone(),
            start.clone(),
            release.clone(),
            tx.clone(),
            stop.clone(),
        );
        match std::thread::Builder::new()
            .name(format!("tp-{id}"))
            .spawn(move || run_session(id, &p, &s, &r, &t, &st))
        {
            Ok(h) => handles.push(h),
            Err(e) => {
                let _ = tx.send(Msg::Failed(id, format!("spawn: {e}")));
            }
        }
    }
    drop(tx);
    let finish = |m: Measurement, handles: Vec<std::thread::JoinHandle<()>>| {
        start.open();
        release.open();
        for h in handles {
            let _ = h.join();
        }
        m
    };
    let fail = |e: String| Measurement::failed(kind, direction, run, e);

    // 1. Every session connected and warmed up.
    let ready_deadline = Instant::now() + plan.wait_limit;
    let mut ready = 0;
    let mut warmed = 0u64;
    while ready < n {
        let left = ready_deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Msg::Ready(b)) => {
                ready += 1;
                warmed += b;
            }
            Ok(Msg::Failed(id, e)) => return finish(fail(format!("session {id}: {e}")), handles),
            Ok(Msg::Done { .. }) => {}
            Err(_) => return finish(fail("sessions not ready in time".into()), handles),
        }
    }
    // Upstream: the warm-up must have reached the sink before the baseline.
    let sink = &backends.sink_counter;
    if direction == Direction::Up {
        let want = sink_base + warmed;
        let until = Instant::now() + UP_DRAIN;
        while sink.bytes.load(Ordering::Relaxed) < want && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // 2. Baseline, then go.
    let cpu0 = procfs::tree_cpu(pid);
    let bench0 = procfs::self_cpu_s();
    let sink0 = sink.bytes.load(Ordering::Relaxed);
    let t0 = Instant::now();
    start.open();
    // 3. Every session done.
    let mut sent = 0u64;
    let mut last_end = t0;
    let mut time_limited = false;
    let mut done = 0;
    let done_deadline = Instant::now() + plan.wait_limit;
    while done < n {
        let left = done_deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Msg::Done {
                bytes,
                end,
                time_limited: tl,
            }) => {
                done += 1;
                sent += bytes;
                last_end = last_end.max(end);
                time_limited |= tl;
            }
            Ok(Msg::Failed(id, e)) => return finish(fail(format!("session {id}: {e}")), handles),
            Ok(Msg::Ready(_)) => {}
            Err(_) => return finish(fail("sessions did not finish in time".into()), handles),
        }
    }
    let (bytes, seconds) = match direction {
        Direction::Down => (sent, last_end.duration_since(t0).as_secs_f64()),
        Direction::Up => {
            // Let what the proxy still buffers reach the sink.
            let until = Instant::now() + UP_DRAIN;
            let mut last = sink.bytes.load(Ordering::Relaxed);
            let mut still = Instant::now();
            while last - sink0 < sent && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
                let now = sink.bytes.load(Ordering::Relaxed);
                if now != last {
                    last = now;
                    still = Instant::now();
                } else if still.elapsed() > Duration::from_millis(500) {
                    break;
                }
            }
            let received = sink.bytes.load(Ordering::Relaxed) - sink0;
            let last_ns = sink.last_ns.load(Ordering::Relaxed);
            let t0_ns = t0.duration_since(backends.base).as_nanos() as f64;
            let secs = ((last_ns as f64 - t0_ns) / 1e9).max(1e-9);
            (received, secs)
        }
    };
    let cpu1 = procfs::tree_cpu(pid);
    let bench1 = procfs::self_cpu_s();
    let proxy_cpu = (cpu1.cpu_s - cpu0.cpu_s).max(0.0);
    let gb = bytes as f64 / 1e9;
    let m = Measurement {
        proxy: kind,
        direction,
        run,
        ok: bytes > 0,
        error: (bytes == 0).then(|| "no bytes arrived".to_string()),
        bytes,
        seconds,
        mb_per_s: (seconds > 0.0).then(|| bytes as f64 / 1e6 / seconds),
        proxy_cpu_s: Some(proxy_cpu),
        cpu_s_per_gb: (gb > 0.0).then(|| proxy_cpu / gb),
        proxy_processes: cpu1.processes,
        bench_cpu_s: bench1 - bench0,
        time_limited,
    };
    finish(m, handles)
}

/// Per-run ratios of `f` to websockify's in the same run, then the median.
fn median_ratio(
    ms: &[Measurement],
    proxy: ProxyKind,
    direction: Direction,
    f: fn(&Measurement) -> Option<f64>,
) -> Option<f64> {
    let ratios: Vec<f64> = ms
        .iter()
        .filter(|m| m.ok && m.proxy == proxy && m.direction == direction)
        .filter_map(|m| {
            let w = ms.iter().find(|w| {
                w.ok && w.proxy == ProxyKind::Websockify
                    && w.direction == direction
                    && w.run == m.run
            })?;
            stats::ratio(f(m)?, f(w)?)
        })
        .collect();
    stats::median(&ratios)
}

pub fn summarize(ms: &[Measurement], proxies: &[ProxyKind], dirs: &[Direction]) -> Vec<Summary> {
    let mut out = Vec::new();
    for &direction in dirs {
        for &proxy in proxies {
            let all: Vec<&Measurement> = ms
                .iter()
                .filter(|m| m.proxy == proxy && m.direction == direction)
                .collect();
            let ok: Vec<&&Measurement> = all.iter().filter(|m| m.ok).collect();
            let col = |f: fn(&Measurement) -> Option<f64>| {
                stats::median(&ok.iter().filter_map(|m| f(m)).collect::<Vec<_>>())
            };
            let mut errors: Vec<String> = Vec::new();
            for e in all.iter().filter_map(|m| m.error.as_ref()) {
                if !errors.contains(e) {
                    errors.push(e.clone());
                }
            }
            out.push(Summary {
                proxy,
                direction,
                runs: all.len(),
                runs_ok: ok.len(),
                bytes: col(|m| Some(m.bytes as f64)),
                mb_per_s: col(|m| m.mb_per_s),
                cpu_s_per_gb: col(|m| m.cpu_s_per_gb),
                mb_per_s_vs_websockify: median_ratio(ms, proxy, direction, |m| m.mb_per_s),
                cpu_s_per_gb_vs_websockify: median_ratio(ms, proxy, direction, |m| m.cpu_s_per_gb),
                time_limited_runs: ok.iter().filter(|m| m.time_limited).count(),
                errors,
            });
        }
    }
    out
}

pub fn run(cfg: ThroughputConfig, stop: Arc<AtomicBool>) -> Result<ThroughputReport> {
    if cfg.sessions == 0 || cfg.sessions > MAX_SESSIONS {
        bail!("--throughput-sessions must be in 1..={MAX_SESSIONS}");
    }
    if cfg.chunk_bytes < 16 || cfg.chunk_bytes > MAX_CHUNK_BYTES {
        bail!("--chunk-bytes must be in 16..={MAX_CHUNK_BYTES}");
    }
    if cfg.runs == 0 || cfg.runs > crate::latency::MAX_RUNS {
        bail!(
            "--throughput-runs must be in 1..={}",
            crate::latency::MAX_RUNS
        );
    }
    if cfg.bytes == 0 {
        bail!("--throughput-bytes must be positive");
    }
    let started = unix_now();
    let machine = Machine::describe();
    std::fs::create_dir_all(&cfg.common.out_dir)?;
    let proxies = crate::common::proxies_under_test(&cfg.proxies);
    // Per connection the stream backend writes warm-up + budget + what the
    // proxy may still buffer; then it stops on its own.
    let per_conn = cfg.warmup_bytes + cfg.bytes.div_ceil(cfg.sessions as u64) + (64 << 20);
    let mut backends = start_backends(cfg.chunk_bytes, per_conn).context("starting backends")?;
    let mut measurements = Vec::new();
    'runs: for run in 1..=cfg.runs {
        for kind in rotated(&proxies, run) {
            for &dir in &cfg.directions {
                if stop.load(Ordering::SeqCst) {
                    break 'runs;
                }
                let backend = match dir {
                    Direction::Down => backends.stream.addr(),
                    Direction::Up => backends.sink.addr(),
                };
                let env = cfg.common.env(backend);
                let tag = format!("throughput-{}-run{run}", dir.name());
                let m = match proxy::start(kind, &env, &tag) {
                    Ok(mut running) => {
                        let m = measure(&running, dir, run, &cfg, &backends, &stop);
                        let m = if !m.ok && running.has_exited() {
                            Measurement {
                                error: Some(format!(
                                    "{} (proxy exited: {})",
                                    m.error.unwrap_or_default(),
                                    running.log_tail()
                                )),
                                ..m
                            }
                        } else {
                            m
                        };
                        running.stop();
                        m
                    }
                    Err(e) => Measurement::failed(kind, dir, run, format!("start: {e:#}")),
                };
                match (&m.error, m.mb_per_s, m.cpu_s_per_gb) {
                    (None, Some(mbps), Some(cpu)) => eprintln!(
                        "throughput run {run}/{}: {kind:<17} {:<4} {:>8.1} MB/s  {:>6.3} CPU-s/GB  ({} MB in {:.2} s{})",
                        cfg.runs,
                        dir.name(),
                        mbps,
                        cpu,
                        m.bytes / 1_000_000,
                        m.seconds,
                        if m.time_limited { ", time-limited" } else { "" }
                    ),
                    _ => eprintln!(
                        "throughput run {run}/{}: {kind} {}: failed: {}",
                        cfg.runs,
                        dir.name(),
                        m.error.as_deref().unwrap_or("?")
                    ),
                }
                measurements.push(m);
            }
        }
    }
    backends.stream.stop();
    backends.sink.stop();
    let median = summarize(&measurements, &proxies, &cfg.directions);
    let report = ThroughputReport {
        run: RunInfo::ended("throughput", started, &stop, machine),
        config: cfg,
        median,
        measurements,
    };
    let text = render_text(&report);
    crate::common::write_report(&report.config.common.out_dir, "throughput", &text, &report)?;
    Ok(report)
}

pub fn render_text(r: &ThroughputReport) -> String {
    let c = &r.config;
    let mut out = format!(
        "Throughput: {} MB per proxy × direction × run over {} session(s), {} B chunks/frames, \
         ≤ {} ms; median of {} run(s).\nCPU-s/GB = proxy process tree utime+stime per 10^9 payload bytes.\n\n",
        c.bytes / 1_000_000,
        c.sessions,
        c.chunk_bytes,
        c.time_limit_ms,
        c.runs
    );
    let header = [
        "proxy",
        "dir",
        "MB/s",
        "CPU-s/GB",
        "MB/s ÷ websockify",
        "CPU-s/GB ÷ websockify",
        "runs ok",
    ];
    let rows: Vec<Vec<String>> = r
        .median
        .iter()
        .map(|s| {
            let f = |v: Option<f64>, d: usize| v.map_or("—".into(), |v| format!("{v:.d$}"));
            vec![
                s.proxy.name().to_string(),
                s.direction.name().to_string(),
                f(s.mb_per_s, 0),
                f(s.cpu_s_per_gb, 3),
                s.mb_per_s_vs_websockify
                    .map_or("—".into(), report::fmt_ratio),
                s.cpu_s_per_gb_vs_websockify
                    .map_or("—".into(), report::fmt_ratio),
                format!(
                    "{}/{}{}",
                    s.runs_ok,
                    s.runs,
                    if s.time_limited_runs > 0 {
                        format!(" ({} time-limited)", s.time_limited_runs)
                    } else {
                        String::new()
                    }
                ),
            ]
        })
        .collect();
    out.push_str(&report::markdown_table(&header, &rows));
    for s in r.median.iter().filter(|s| !s.errors.is_empty()) {
        for e in &s.errors {
            out.push_str(&format!("- {} {}: {e}\n", s.proxy, s.direction.name()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(proxy: ProxyKind, dir: Direction, run: usize, mbps: f64, cpu: f64) -> Measurement {
        Measurement {
            ok: true,
            error: None,
            bytes: 1_000_000_000,
            seconds: 1.0,
            mb_per_s: Some(mbps),
            cpu_s_per_gb: Some(cpu),
            proxy_cpu_s: Some(cpu),
            ..Measurement::failed(proxy, dir, run, String::new())
        }
    }

    #[test]
    fn ratios_are_per_run_then_median() {
        use ProxyKind::*;
        let ms = vec![
            m(Websockify, Direction::Down, 1, 500.0, 2.0),
            m(ConsolegateEpoll, Direction::Down, 1, 1500.0, 0.5),
            m(Websockify, Direction::Down, 2, 400.0, 1.6),
            m(ConsolegateEpoll, Direction::Down, 2, 1600.0, 0.8),
            m(Websockify, Direction::Down, 3, 600.0, 2.0),
            Measurement::failed(ConsolegateEpoll, Direction::Down, 3, "x".into()),
        ];
        let s = summarize(&ms, &[Websockify, ConsolegateEpoll], &[Direction::Down]);
        assert_eq!(s[0].mb_per_s, Some(500.0));
        assert_eq!(s[0].cpu_s_per_gb_vs_websockify, Some(1.0));
        assert_eq!((s[1].runs, s[1].runs_ok), (3, 2));
        assert_eq!(s[1].mb_per_s, Some(1550.0));
        // Run 1: 0.25, run 2: 0.5 → 0.375.
        assert_eq!(s[1].cpu_s_per_gb_vs_websockify, Some(0.375));
        // Run 1: 3.0, run 2: 4.0 → 3.5.
        assert_eq!(s[1].mb_per_s_vs_websockify, Some(3.5));
        assert_eq!(s[1].errors, vec!["x".to_string()]);
    }

    #[test]
    fn gate_times_out_or_opens() {
        let g = Arc::new(Gate::default());
        assert!(!g.wait(Duration::from_millis(10)));
        let g2 = g.clone();
        let h = std::thread::spawn(move || g2.wait(Duration::from_secs(5)));
        g.open();
        assert!(h.join().unwrap());
    }
}
