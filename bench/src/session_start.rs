//! The session-start benchmark: how long from asking the appliance for a
//! console session to the first byte of that console in the browser.
//!
//! Against `consolegate run` (appliance mode, see `appliance`), per sample:
//!
//! - t0: just before `POST /api/v1/sessions` (`{"target":{"kind":"demo"},
//!   "user":"bench"}`, plus `"port_mode":"dedicated"` in dedicated mode);
//! - t1: `201 Created` received and its JSON parsed (`ws_url`);
//! - t2: `101 Switching Protocols` received on `ws_url` (TCP connect to the
//!   console port or the session's dedicated port, upgrade request, ticket
//!   checked and consumed by a worker);
//! - t3: the first binary frame received: the built-in demo console's
//!   `RFB 003.008\n`, relayed (the worker connected to the demo server, which
//!   greeted first).
//!
//! Recorded in µs: t3−t0 (creation → first byte) and its parts t1−t0 (API),
//! t2−t1 (upgrade) and t3−t2 (backend connect + first byte). The client then
//! sends a close frame and drops the connection; the session is not deleted
//! (it ends with its connection).
//!
//! Cells: each consolegate io backend × port mode (shared console port or a
//! dedicated per-session port) × concurrency (client threads, each running
//! samples back to back), each against a fresh appliance. Every cell is
//! bounded by a sample count and a time limit, after a short unmeasured
//! warm-up; a cell gives up after a run of consecutive failures. A client
//! refused with 503 or 429 (port pool exhausted, too many sessions) pauses
//! 5 ms per refusal in a row (at most 100 ms, in no sample) before its next
//! attempt, as the appliance's `Retry-After` asks, only shorter. websockify
//! has no equivalent (no control plane, no sessions to create), so there is
//! no baseline and no ratio here.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::appliance::{self, RunningAppliance};
use crate::client::{self, Transport};
use crate::common::{unix_now, Common};
use crate::procfs;
use crate::proxy::ProxyKind;
use crate::report::RunInfo;
use crate::report::{self, Machine};
use crate::rest::{self, CreatedSession, HttpMode, RestClient};
use crate::stats::Percentiles;
use crate::workload::{new_histogram, HIST_LOWEST_US};
use crate::wsproto;

/// Most client threads per cell.
pub const MAX_CONCURRENCY: usize = 256;
/// A cell stops after this many failures in a row on one client thread.
const MAX_CONSECUTIVE_FAILURES: u64 = 50;
/// Distinct failure reasons kept per cell (the rest are counted as "other").
const MAX_REASONS: usize = 16;
/// Frames read while waiting for the first binary frame, at most.
const MAX_FRAMES_BEFORE_DATA: usize = 16;
/// Receive buffer for the first frame.
const FIRST_FRAME_BUF: usize = 64 * 1024;
/// What the demo console sends first.
pub const RFB_PREFIX: &[u8] = b"RFB ";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PortMode {
    /// The shared console port (`ws://console/proxy/<id>?token=…`).
    Shared,
    /// A dedicated listener per session, allocated from the port range.
    Dedicated,
}

impl PortMode {
    pub fn name(self) -> &'static str {
        match self {
            PortMode::Shared => "shared",
            PortMode::Dedicated => "dedicated",
        }
    }

    /// The `POST /api/v1/sessions` body.
    pub fn request_body(self) -> &'static str {
        match self {
            PortMode::Shared => r#"{"target":{"kind":"demo"},"user":"bench"}"#,
            PortMode::Dedicated => {
                r#"{"target":{"kind":"demo"},"user":"bench","port_mode":"dedicated"}"#
            }
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SessionStartConfig {
    /// consolegate-epoll and/or consolegate-uring.
    pub proxies: Vec<ProxyKind>,
    pub modes: Vec<PortMode>,
    pub concurrency: Vec<usize>,
    /// Measured samples per cell, at most (attempts, failures included).
    pub samples: u64,
    /// Unmeasured samples per cell first (one client).
    pub warmup: u64,
    /// Measured phase per cell, at most (the warm-up has the same bound).
    pub time_limit_ms: u64,
    pub http: HttpMode,
    /// Parent of the appliances' state directories (`<this>/<cell>/state`);
    /// `None`: inside the output directory.
    pub state_root: Option<std::path::PathBuf>,
    pub common: Common,
}

/// Percentiles of the four intervals of a cell, µs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Parts {
    /// t3 − t0: creation → first relayed byte.
    pub total: Percentiles,
    /// t1 − t0: POST → 201 parsed.
    pub api: Percentiles,
    /// t2 − t1: connect + upgrade → 101.
    pub upgrade: Percentiles,
    /// t3 − t2: backend connect + first byte relayed.
    pub first_byte: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub proxy: ProxyKind,
    pub mode: PortMode,
    pub concurrency: usize,
    pub ok: bool,
    pub error: Option<String>,
    /// Measured samples attempted, completed and failed.
    pub attempted: u64,
    pub completed: u64,
    pub failed: u64,
    pub failure_reasons: BTreeMap<String, u64>,
    pub warmup_completed: u64,
    pub warmup_failed: u64,
    pub seconds: f64,
    /// Completed samples per second of the measured phase.
    pub sessions_per_s: Option<f64>,
    pub count_reached: bool,
    pub time_limited: bool,
    pub http: HttpMode,
    /// TCP connections the REST clients opened in the measured phase.
    pub http_connects: u64,
    pub workers: Option<usize>,
    pub percentiles: Option<Parts>,
    pub mean_total_us: Option<f64>,
    /// Appliance CPU (process tree: workers, control plane and the in-process
    /// demo console) per completed sample, ms.
    pub appliance_cpu_ms_per_session: Option<f64>,
    /// The first binary frame of the first sample, as text.
    pub greeting: Option<String>,
    /// hgrm files per part, relative to the output directory.
    pub hgrm: BTreeMap<String, String>,
    /// `GET /api/v1/stats` after the measured phase.
    pub appliance_stats: Option<serde_json::Value>,
    /// Time after the phase until the stats showed no live or pending
    /// session and no allocated port (polled every 20 ms for 3 s), ms.
    pub settled_ms: Option<f64>,
    /// The last stats polled, when they never settled.
    pub appliance_stats_settled: Option<serde_json::Value>,
    pub appliance_log: Option<String>,
    /// The instance's config file (its token is random and thrown away).
    pub appliance_config: Option<String>,
    pub port_range: Option<String>,
}

impl Cell {
    fn failed(
        proxy: ProxyKind,
        mode: PortMode,
        concurrency: usize,
        http: HttpMode,
        e: String,
    ) -> Cell {
        Cell {
            proxy,
            mode,
            concurrency,
            ok: false,
            error: Some(e),
            attempted: 0,
            completed: 0,
            failed: 0,
            failure_reasons: BTreeMap::new(),
            warmup_completed: 0,
            warmup_failed: 0,
            seconds: 0.0,
            sessions_per_s: None,
            count_reached: false,
            time_limited: false,
            http,
            http_connects: 0,
            workers: None,
            percentiles: None,
            mean_total_us: None,
            appliance_cpu_ms_per_session: None,
            greeting: None,
            hgrm: BTreeMap::new(),
            appliance_stats: None,
            settled_ms: None,
            appliance_stats_settled: None,
            appliance_log: None,
            appliance_config: None,
            port_range: None,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SessionStartReport {
    #[serde(flatten)]
    pub run: RunInfo,
    pub config: SessionStartConfig,
    pub cells: Vec<Cell>,
}

/// One sample's intervals.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timings {
    api: Duration,
    upgrade: Duration,
    first_byte: Duration,
    pub(crate) total: Duration,
}

/// The four histograms of a client thread or a cell, µs.
struct Hists {
    total: Histogram<u64>,
    api: Histogram<u64>,
    upgrade: Histogram<u64>,
    first_byte: Histogram<u64>,
}

impl Hists {
    fn new() -> Hists {
        Hists {
            total: new_histogram(),
            api: new_histogram(),
            upgrade: new_histogram(),
            first_byte: new_histogram(),
        }
    }

    fn record(&mut self, t: &Timings) {
        let us = |d: Duration| {
            u64::try_from(d.as_micros())
                .unwrap_or(u64::MAX)
                .max(HIST_LOWEST_US)
        };
        self.total.saturating_record(us(t.total));
        self.api.saturating_record(us(t.api));
        self.upgrade.saturating_record(us(t.upgrade));
        self.first_byte.saturating_record(us(t.first_byte));
    }

    fn add(&mut self, o: &Hists) -> Result<()> {
        for (a, b) in self.parts_mut().into_iter().zip(o.parts()) {
            a.1.add(b.1)
                .map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?;
        }
        Ok(())
    }

    fn parts(&self) -> [(&'static str, &Histogram<u64>); 4] {
        [
            ("total", &self.total),
            ("api", &self.api),
            ("upgrade", &self.upgrade),
            ("first-byte", &self.first_byte),
        ]
    }

    fn parts_mut(&mut self) -> [(&'static str, &mut Histogram<u64>); 4] {
        [
            ("total", &mut self.total),
            ("api", &mut self.api),
            ("upgrade", &mut self.upgrade),
            ("first-byte", &mut self.first_byte),
        ]
    }
}

/// The failure reason that collects the reasons beyond [`MAX_REASONS`].
const OTHER: &str = "other";

/// Failure reasons, bounded in number.
#[derive(Default)]
pub(crate) struct Reasons(pub(crate) BTreeMap<String, u64>);

impl Reasons {
    pub(crate) fn add_n(&mut self, reason: &str, n: u64) {
        let key: String = reason.chars().take(120).collect();
        let named = self.0.len() - usize::from(self.0.contains_key(OTHER));
        let key = if self.0.contains_key(&key) || named < MAX_REASONS {
            key
        } else {
            OTHER.to_string()
        };
        *self.0.entry(key).or_insert(0) += n;
    }

    pub(crate) fn merge(&mut self, o: Reasons) {
        for (k, v) in o.0 {
            self.add_n(&k, v);
        }
    }
}

/// Whether the first bytes of the first binary frame look like the demo
/// console's RFB greeting (`RFB xxx.yyy\n`; a frame may carry only part of it).
pub fn looks_like_rfb_greeting(payload: &[u8]) -> bool {
    let n = payload.len().min(RFB_PREFIX.len());
    n > 0 && payload[..n] == RFB_PREFIX[..n]
}

/// The payload of the first binary (or continuation) frame in the server
/// byte stream `buf`: `Ok(Err(consumed))` when more bytes are needed, with
/// the complete ping/pong frames before it consumed. A close or text frame,
/// or more than [`MAX_FRAMES_BEFORE_DATA`] control frames, is an error.
fn first_binary_frame(buf: &[u8]) -> Result<Result<Vec<u8>, usize>, String> {
    let mut pos = 0;
    for _ in 0..MAX_FRAMES_BEFORE_DATA {
        let Some(h) = wsproto::parse_header(&buf[pos..]).map_err(|e| format!("frame: {e}"))? else {
            return Ok(Err(pos));
        };
        // payload_len ≤ MAX_RX_PAYLOAD (1 MiB): fits usize.
        let end = pos + h.header_len + h.payload_len as usize;
        if end > pos + FIRST_FRAME_BUF {
            return Err(format!("a {}-byte first frame", h.payload_len));
        }
        if buf.len() < end {
            return Ok(Err(pos));
        }
        let mut payload = buf[pos + h.header_len..end].to_vec();
        if let Some(m) = h.mask {
            wsproto::apply_mask(&mut payload, m, 0);
        }
        match h.opcode {
            wsproto::OP_BINARY | wsproto::OP_CONTINUATION => return Ok(Ok(payload)),
            wsproto::OP_PING | wsproto::OP_PONG => pos = end,
            wsproto::OP_CLOSE => {
                let code = if payload.len() >= 2 {
                    u16::from_be_bytes([payload[0], payload[1]])
                } else {
                    1005
                };
                let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default());
                return Err(format!("close frame {code} {reason}")
                    .trim_end()
                    .to_string());
            }
            other => return Err(format!("opcode {other:#x} before any binary frame")),
        }
    }
    Err(format!(
        "{MAX_FRAMES_BEFORE_DATA} control frames and no data"
    ))
}

/// Reads until the first binary frame is complete; bounded by `deadline`
/// (and each read by the socket's timeout).
pub(crate) fn read_first_binary(
    stream: &mut TcpStream,
    leftover: &[u8],
    deadline: Instant,
) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; FIRST_FRAME_BUF];
    if leftover.len() > buf.len() {
        return Err("too many bytes after the 101".into());
    }
    buf[..leftover.len()].copy_from_slice(leftover);
    let mut len = leftover.len();
    loop {
        match first_binary_frame(&buf[..len])? {
            Ok(payload) => return Ok(payload),
            Err(consumed) => {
                buf.copy_within(consumed..len, 0);
                len -= consumed;
            }
        }
        if len == buf.len() {
            return Err("first frame larger than the buffer".into());
        }
        if Instant::now() >= deadline {
            return Err("timed out".into());
        }
        let n = stream
            .read(&mut buf[len..])
            .map_err(|e| format!("read: {}", io_kind(&e)))?;
        if n == 0 {
            return Err("EOF".into());
        }
        len += n;
    }
}

fn io_kind(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

/// One sample: create, connect, first byte, close. Errors start with the
/// stage that failed (`api`, `upgrade`, `first byte`).
pub(crate) fn sample(
    rest: &mut RestClient,
    console: std::net::SocketAddr,
    mode: PortMode,
    io_timeout: Duration,
    salt: u64,
    mask: [u8; 4],
) -> Result<(Timings, Vec<u8>), String> {
    let t0 = Instant::now();
    let resp = rest
        .post_json("/api/v1/sessions", mode.request_body())
        .map_err(|e| format!("api: {e}"))?;
    if resp.status != 201 {
        let what = rest::error_code(&resp.body).unwrap_or_else(|| resp.body_excerpt());
        return Err(format!("api: HTTP {} {what}", resp.status));
    }
    let created: CreatedSession =
        serde_json::from_slice(&resp.body).map_err(|e| format!("api: bad 201 body: {e}"))?;
    let t1 = Instant::now();
    let (addr, target) = rest::parse_ws_url(&created.ws_url).map_err(|e| format!("api: {e}"))?;
    match (mode, created.port) {
        (PortMode::Shared, None) if addr == console => {}
        (PortMode::Dedicated, Some(p)) if p == addr.port() => {}
        (m, p) => {
            return Err(format!(
                "api: {} session {} came back with port {p:?}, ws_url {}",
                m.name(),
                created.session_id,
                addr
            ))
        }
    }
    let transport = Transport::WebSocket {
        path: target,
        subprotocol: None,
    };
    let (mut stream, leftover) = client::open_stream(addr, &transport, io_timeout, salt)
        .map_err(|e| format!("upgrade: {e}"))?;
    let t2 = Instant::now();
    let payload = read_first_binary(&mut stream, &leftover, t2 + io_timeout)
        .map_err(|e| format!("first byte: {e}"))?;
    let t3 = Instant::now();
    if !looks_like_rfb_greeting(&payload) {
        return Err(format!(
            "first byte: not an RFB greeting: {:?}",
            String::from_utf8_lossy(&payload[..payload.len().min(32)])
        ));
    }
    // Close politely; the session ends with its connection.
    let mut close = [0u8; 2 + wsproto::MAX_CLIENT_HEADER];
    if let Ok(n) =
        wsproto::encode_client_frame(wsproto::OP_CLOSE, &1000u16.to_be_bytes(), mask, &mut close)
    {
        let _ = stream.write_all(&close[..n]);
    }
    drop(stream);
    Ok((
        Timings {
            api: t1 - t0,
            upgrade: t2 - t1,
            first_byte: t3 - t2,
            total: t3 - t0,
        },
        payload,
    ))
}

/// The pause before the next attempt after a refusal for lack of capacity
/// (`503`, `429`: the appliance asks clients to come back later), growing
/// with the refusals in a row; none after other failures. The pause is in
/// no sample; without it a refused client would spin through its failure
/// budget in milliseconds while the appliance is freeing capacity.
pub fn backoff_after(reason: &str, in_a_row: u64) -> Option<Duration> {
    let refused = reason.starts_with("api: HTTP 503") || reason.starts_with("api: HTTP 429");
    refused.then(|| {
        BACKOFF_STEP
            .saturating_mul(in_a_row.min(u64::from(u32::MAX)) as u32)
            .min(BACKOFF_MAX)
    })
}

/// Backoff per refusal in a row, and its cap.
const BACKOFF_STEP: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// What one client thread did.
struct ClientOut {
    hists: Hists,
    attempted: u64,
    completed: u64,
    failed: u64,
    reasons: Reasons,
    connects: u64,
    time_limited: bool,
    greeting: Option<Vec<u8>>,
    gave_up: Option<String>,
}

/// Where and how a client thread works.
struct ClientPlan<'a> {
    control: std::net::SocketAddr,
    console: std::net::SocketAddr,
    token: &'a str,
    mode: PortMode,
    http: HttpMode,
    io_timeout: Duration,
    deadline: Instant,
    budget: &'a AtomicU64,
    stop: &'a AtomicBool,
    /// Set when a client gives up: the others stop too.
    abort: &'a AtomicBool,
}

/// Runs samples back to back until the shared budget, the deadline, a stop,
/// an abort or [`MAX_CONSECUTIVE_FAILURES`] ends it.
fn run_client(id: u64, plan: &ClientPlan) -> ClientOut {
    let mut out = ClientOut {
        hists: Hists::new(),
        attempted: 0,
        completed: 0,
        failed: 0,
        reasons: Reasons::default(),
        connects: 0,
        time_limited: false,
        greeting: None,
        gave_up: None,
    };
    let mut rest = RestClient::new(plan.control, plan.token, plan.http, plan.io_timeout);
    if let Err(e) = rest.preconnect() {
        out.gave_up = Some(format!("api: {e}"));
        plan.abort.store(true, Ordering::SeqCst);
        return out;
    }
    let mut masks = client::mask_source(id);
    let mut in_a_row = 0;
    loop {
        if plan.stop.load(Ordering::Relaxed) || plan.abort.load(Ordering::Relaxed) {
            break;
        }
        if Instant::now() >= plan.deadline {
            out.time_limited = true;
            break;
        }
        if plan
            .budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_err()
        {
            break;
        }
        out.attempted += 1;
        let salt = (id << 32) ^ out.attempted;
        match sample(
            &mut rest,
            plan.console,
            plan.mode,
            plan.io_timeout,
            salt,
            masks(),
        ) {
            Ok((t, payload)) => {
                out.hists.record(&t);
                out.completed += 1;
                in_a_row = 0;
                out.greeting.get_or_insert(payload);
            }
            Err(e) => {
                out.failed += 1;
                out.reasons.add_n(&e, 1);
                in_a_row += 1;
                if in_a_row >= MAX_CONSECUTIVE_FAILURES {
                    out.gave_up = Some(format!("{in_a_row} failures in a row, last: {e}"));
                    plan.abort.store(true, Ordering::SeqCst);
                    break;
                }
                if let Some(wait) = backoff_after(&e, in_a_row) {
                    let left = plan.deadline.saturating_duration_since(Instant::now());
                    std::thread::sleep(wait.min(left));
                }
            }
        }
    }
    out.connects = rest.connects;
    out
}

/// Runs `threads` clients against one budget and merges what they did.
fn run_clients(threads: usize, plan: &ClientPlan) -> Result<ClientOut> {
    let outs: Vec<std::thread::Result<ClientOut>> = std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(threads);
        for id in 0..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("session-start-{id}"))
                .stack_size(256 * 1024)
                .spawn_scoped(s, move || run_client(id as u64, plan));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    plan.abort.store(true, Ordering::SeqCst);
                    eprintln!("session-start: spawning client thread {id}: {e}");
                    break;
                }
            }
        }
        handles.into_iter().map(|h| h.join()).collect()
    });
    if outs.len() < threads {
        bail!(
            "could spawn only {} of {threads} client threads",
            outs.len()
        );
    }
    let mut all = ClientOut {
        hists: Hists::new(),
        attempted: 0,
        completed: 0,
        failed: 0,
        reasons: Reasons::default(),
        connects: 0,
        time_limited: false,
        greeting: None,
        gave_up: None,
    };
    for o in outs {
        let o = o.map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        all.hists.add(&o.hists)?;
        all.attempted += o.attempted;
        all.completed += o.completed;
        all.failed += o.failed;
        all.reasons.merge(o.reasons);
        all.connects += o.connects;
        all.time_limited |= o.time_limited;
        if all.greeting.is_none() {
            all.greeting = o.greeting;
        }
        if all.gave_up.is_none() {
            all.gave_up = o.gave_up;
        }
    }
    Ok(all)
}

fn write_hgrm(out_dir: &Path, rel: &str, h: &Histogram<u64>) -> Result<()> {
    let path = out_dir.join(rel);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(
        &path,
        report::percentile_distribution(h, report::TICKS_PER_HALF_DISTANCE, 1.0),
    )
    .with_context(|| format!("writing {}", path.display()))
}

fn io_of(kind: ProxyKind) -> Option<&'static str> {
    match kind {
        ProxyKind::ConsolegateEpoll => Some("epoll"),
        ProxyKind::ConsolegateUring => Some("uring"),
        _ => None,
    }
}

/// The consolegate variants among `proxies` (the only ones this benchmark
/// can measure).
pub fn consolegate_variants(proxies: &[ProxyKind]) -> Vec<ProxyKind> {
    let mut v: Vec<ProxyKind> = proxies
        .iter()
        .copied()
        .filter(|p| io_of(*p).is_some())
        .collect();
    v.dedup();
    v
}

/// One cell against a running appliance.
fn measure(
    app: &RunningAppliance,
    kind: ProxyKind,
    mode: PortMode,
    conc: usize,
    cfg: &SessionStartConfig,
    stop: &AtomicBool,
) -> Result<Cell> {
    let pid = app.pid().context("no appliance process")?;
    let io_timeout = Duration::from_millis(cfg.common.io_timeout_ms);
    let limit = Duration::from_millis(cfg.time_limit_ms);
    let abort = AtomicBool::new(false);
    let mut cell = Cell::failed(kind, mode, conc, cfg.http, String::new());
    cell.error = None;
    cell.workers = app.workers;
    cell.port_range = Some(format!("{}-{}", app.port_range.0, app.port_range.1));
    cell.appliance_config = Some(app.config_path.display().to_string());

    let warmup_budget = AtomicU64::new(cfg.warmup);
    let budget = AtomicU64::new(cfg.samples);
    // One phase's plan: its own sample budget and deadline.
    let plan = |budget| ClientPlan {
        control: app.control,
        console: app.console,
        token: &app.token,
        mode,
        http: cfg.http,
        io_timeout,
        deadline: Instant::now() + limit,
        budget,
        stop,
        abort: &abort,
    };
    if cfg.warmup > 0 {
        let w = run_clients(1, &plan(&warmup_budget))?;
        cell.warmup_completed = w.completed;
        cell.warmup_failed = w.failed;
        if w.completed == 0 {
            let why = w
                .gave_up
                .or_else(|| w.reasons.0.keys().next().cloned())
                .unwrap_or_else(|| "nothing ran".into());
            bail!("warm-up: no sample completed: {why}");
        }
    }

    // A warm-up client that gave up must not stop the measured phase.
    abort.store(false, Ordering::SeqCst);
    let plan = plan(&budget);
    let cpu0 = procfs::tree_cpu(pid);
    let t0 = Instant::now();
    let m = run_clients(conc, &plan)?;
    let seconds = t0.elapsed().as_secs_f64();
    let cpu1 = procfs::tree_cpu(pid);

    cell.attempted = m.attempted;
    cell.completed = m.completed;
    cell.failed = m.failed;
    cell.failure_reasons = m.reasons.0;
    cell.seconds = seconds;
    cell.sessions_per_s = (seconds > 0.0 && m.completed > 0).then(|| m.completed as f64 / seconds);
    cell.count_reached = m.attempted >= cfg.samples;
    cell.time_limited = m.time_limited && !cell.count_reached;
    cell.http_connects = m.connects;
    cell.greeting = m
        .greeting
        .map(|g| String::from_utf8_lossy(&g[..g.len().min(32)]).to_string());
    let cpu = (cpu1.cpu_s - cpu0.cpu_s).max(0.0);
    cell.appliance_cpu_ms_per_session =
        (m.completed > 0).then(|| cpu * 1000.0 / m.completed as f64);
    if !m.hists.total.is_empty() {
        cell.percentiles = Some(Parts {
            total: Percentiles::from_histogram(&m.hists.total),
            api: Percentiles::from_histogram(&m.hists.api),
            upgrade: Percentiles::from_histogram(&m.hists.upgrade),
            first_byte: Percentiles::from_histogram(&m.hists.first_byte),
        });
        cell.mean_total_us = Some(m.hists.total.mean());
        for (part, h) in m.hists.parts() {
            let rel = format!(
                "hgrm/session-start/{}-{}-c{conc}-{part}.hgrm",
                kind.name(),
                mode.name()
            );
            write_hgrm(&cfg.common.out_dir, &rel, h)?;
            cell.hgrm.insert(part.to_string(), rel);
        }
    }
    cell.ok = m.completed > 0;
    cell.error = match (&m.gave_up, m.completed) {
        (Some(g), _) => Some(g.clone()),
        (None, 0) => Some("no sample completed".into()),
        _ => None,
    };
    // What the appliance counted (errors, sessions, ports) right after the
    // phase, and how long until every session and dedicated port it handed
    // out was released (bounded).
    let mut rest = RestClient::new(app.control, &app.token, HttpMode::KeepAlive, io_timeout);
    let mut get_stats = || {
        rest.get("/api/v1/stats")
            .ok()
            .filter(|r| r.status == 200)
            .and_then(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
    };
    let settle_from = Instant::now();
    cell.appliance_stats = get_stats();
    let mut last = cell.appliance_stats.clone();
    while !stop.load(Ordering::Relaxed) && settle_from.elapsed() < SETTLE_LIMIT {
        if last.as_ref().is_some_and(is_settled) {
            cell.settled_ms = Some(settle_from.elapsed().as_secs_f64() * 1000.0);
            break;
        }
        std::thread::sleep(SETTLE_POLL);
        last = get_stats();
    }
    if cell.settled_ms.is_none() {
        cell.appliance_stats_settled = last;
    }
    Ok(cell)
}

/// How long to wait for the appliance to release every session and port
/// after a phase, and how often to look.
const SETTLE_LIMIT: Duration = Duration::from_secs(3);
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// `GET /api/v1/stats` says no session is live or pending and no dedicated
/// port is allocated.
pub fn is_settled(stats: &serde_json::Value) -> bool {
    let zero = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_u64()).unwrap_or(0) == 0;
    stats.get("live_sessions").is_some()
        && zero(stats.get("live_sessions"))
        && zero(stats.pointer("/sessions_by_state/pending"))
        && zero(stats.pointer("/sessions_by_state/open"))
        && zero(stats.pointer("/ports/allocated_ports"))
}

pub fn run(cfg: SessionStartConfig, stop: Arc<AtomicBool>) -> Result<SessionStartReport> {
    let proxies = consolegate_variants(&cfg.proxies);
    if proxies.is_empty() {
        bail!("session-start measures the appliance: name consolegate-epoll and/or consolegate-uring in --proxies or --session-start-proxies");
    }
    if cfg.concurrency.is_empty()
        || cfg
            .concurrency
            .iter()
            .any(|&c| c == 0 || c > MAX_CONCURRENCY)
    {
        bail!("--session-start-concurrency values must be in 1..={MAX_CONCURRENCY}");
    }
    if cfg.modes.is_empty() {
        bail!("--session-start-modes: name shared and/or dedicated");
    }
    if cfg.samples == 0 {
        bail!("--session-start-samples must be positive");
    }
    let started = unix_now();
    let machine = Machine::describe();
    let out_dir = cfg.common.out_dir.clone();
    std::fs::create_dir_all(&out_dir)?;
    let startup = Duration::from_millis(cfg.common.startup_timeout_ms);
    let mut cells = Vec::new();
    'cells: for &kind in &proxies {
        let io = io_of(kind).expect("filtered to consolegate variants");
        for &mode in &cfg.modes {
            for &conc in &cfg.concurrency {
                if stop.load(Ordering::SeqCst) {
                    break 'cells;
                }
                let tag = format!("{}-{}-c{conc}", kind.name(), mode.name());
                let dir = out_dir.join("session-start").join(&tag);
                let state_dir = match &cfg.state_root {
                    Some(root) => root.join(&tag).join("state"),
                    None => dir.join("state"),
                };
                let log = out_dir
                    .join("logs")
                    .join(format!("session-start-{tag}.log"));
                // Room for every session open at once, with margin for
                // sessions still closing.
                let demo_clients = (conc * 4).clamp(64, 10_000);
                let cell = match appliance::start(
                    &cfg.common.consolegate,
                    &dir,
                    &state_dir,
                    io,
                    demo_clients,
                    &log,
                    startup,
                ) {
                    Ok(mut app) => {
                        let mut c =
                            measure(&app, kind, mode, conc, &cfg, &stop).unwrap_or_else(|e| {
                                Cell::failed(kind, mode, conc, cfg.http, format!("{e:#}"))
                            });
                        if app.has_exited() {
                            let msg = format!("appliance exited: {}", app.log_tail());
                            c.ok = false;
                            c.error = Some(match c.error.take() {
                                Some(e) => format!("{e} ({msg})"),
                                None => msg,
                            });
                        }
                        c.appliance_log = Some(
                            app.log_path()
                                .strip_prefix(&out_dir)
                                .unwrap_or(app.log_path())
                                .display()
                                .to_string(),
                        );
                        app.stop();
                        c
                    }
                    Err(e) => Cell::failed(kind, mode, conc, cfg.http, format!("start: {e:#}")),
                };
                match (&cell.percentiles, cell.ok) {
                    (Some(p), true) => eprintln!(
                        "session-start: {:<17} {:<9} c={conc:<3} creation→first byte p50 {} p99 {} max {} µs  (api p50 {}, upgrade p50 {}, first byte p50 {}; {} ok, {} failed, {:.0}/s)",
                        kind.name(),
                        mode.name(),
                        report::fmt_us(p.total.p50_us),
                        report::fmt_us(p.total.p99_us),
                        report::fmt_us(p.total.max_us),
                        report::fmt_us(p.api.p50_us),
                        report::fmt_us(p.upgrade.p50_us),
                        report::fmt_us(p.first_byte.p50_us),
                        cell.completed,
                        cell.failed,
                        cell.sessions_per_s.unwrap_or(0.0),
                    ),
                    _ => eprintln!(
                        "session-start: {} {} c={conc}: failed: {}",
                        kind.name(),
                        mode.name(),
                        cell.error.as_deref().unwrap_or("?")
                    ),
                }
                cells.push(cell);
            }
        }
    }
    let report = SessionStartReport {
        run: RunInfo::ended("session-start", started, &stop, machine),
        config: cfg,
        cells,
    };
    let text = render_text(&report);
    crate::common::write_report(&out_dir, "session-start", &text, &report)?;
    Ok(report)
}

/// p50 / p99 of a part, "a / b".
fn p50_p99(p: &Percentiles) -> String {
    format!(
        "{} / {}",
        report::fmt_us(p.p50_us),
        report::fmt_us(p.p99_us)
    )
}

pub fn render_text(r: &SessionStartReport) -> String {
    let c = &r.config;
    let mut out = format!(
        "Session start, appliance mode (`consolegate run`): POST /api/v1/sessions → 201 → WebSocket \
         upgrade on ws_url → 101 → first binary frame (the demo console's RFB greeting, relayed). \
         µs; ≤ {} samples or {} ms per cell after {} warm-up; concurrency = client threads running \
         samples back to back; REST over {}; a fresh appliance per cell, log level warn. \
         No websockify figure: it has no control plane.\n\n",
        c.samples,
        c.time_limit_ms,
        c.warmup,
        match c.http {
            HttpMode::KeepAlive => "one keep-alive connection per client thread",
            HttpMode::NewConnection => "a new TCP connection per request",
        }
    );
    let header = [
        "proxy",
        "mode",
        "conc",
        "p50",
        "p90",
        "p99",
        "max",
        "API p50 / p99",
        "upgrade p50 / p99",
        "backend + 1st byte p50 / p99",
        "sessions/s",
        "CPU ms/session",
        "ok / failed",
    ];
    let dash = || "—".to_string();
    let rows: Vec<Vec<String>> = r
        .cells
        .iter()
        .map(|cell| {
            let mut row = vec![
                cell.proxy.name().to_string(),
                cell.mode.name().to_string(),
                cell.concurrency.to_string(),
            ];
            match &cell.percentiles {
                Some(p) => {
                    for v in [
                        p.total.p50_us,
                        p.total.p90_us,
                        p.total.p99_us,
                        p.total.max_us,
                    ] {
                        row.push(report::fmt_us(v));
                    }
                    row.push(p50_p99(&p.api));
                    row.push(p50_p99(&p.upgrade));
                    row.push(p50_p99(&p.first_byte));
                }
                None => {
                    row.push("failed".into());
                    row.extend((0..6).map(|_| dash()));
                }
            }
            row.push(cell.sessions_per_s.map_or_else(dash, |v| format!("{v:.0}")));
            row.push(
                cell.appliance_cpu_ms_per_session
                    .map_or_else(dash, |v| format!("{v:.2}")),
            );
            row.push(format!("{} / {}", cell.completed, cell.failed));
            row
        })
        .collect();
    out.push_str(&report::markdown_table_with(&header, &rows, &[0, 1]));
    for cell in &r.cells {
        let name = format!("{} {} c={}", cell.proxy, cell.mode.name(), cell.concurrency);
        if let Some(e) = &cell.error {
            out.push_str(&format!("- {name}: {e}\n"));
        }
        for (reason, n) in &cell.failure_reasons {
            out.push_str(&format!("- {name}: {n} × {reason}\n"));
        }
        if cell.ok && cell.settled_ms.is_none() {
            out.push_str(&format!(
                "- {name}: the appliance still counted live/pending sessions or allocated ports {} s after the phase\n",
                SETTLE_LIMIT.as_secs()
            ));
        }
        if cell.time_limited {
            out.push_str(&format!(
                "- {name}: time limit reached after {} samples\n",
                cell.attempted
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() <= 125);
        let mut f = vec![0x80 | opcode, payload.len() as u8];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn first_binary_frame_skips_pings_and_waits_for_the_rest() {
        let mut s = server_frame(wsproto::OP_PING, b"hi");
        s.extend(server_frame(wsproto::OP_BINARY, b"RFB 003.008\n"));
        assert_eq!(first_binary_frame(&s), Ok(Ok(b"RFB 003.008\n".to_vec())));
        // Cut inside the binary frame: the ping is consumed, more is needed.
        assert_eq!(first_binary_frame(&s[..6]), Ok(Err(4)));
        assert_eq!(first_binary_frame(&s[..1]), Ok(Err(0)));
        assert_eq!(first_binary_frame(&[]), Ok(Err(0)));
        let close = server_frame(wsproto::OP_CLOSE, b"\x03\xf0gone");
        assert_eq!(
            first_binary_frame(&close),
            Err("close frame 1008 gone".to_string())
        );
        assert!(first_binary_frame(&server_frame(wsproto::OP_TEXT, b"x"))
            .unwrap_err()
            .contains("0x1"));
        let pings: Vec<u8> = (0..MAX_FRAMES_BEFORE_DATA)
            .flat_map(|_| server_frame(wsproto::OP_PONG, b""))
            .collect();
        assert!(first_binary_frame(&pings).is_err());
        // A masked server frame is unmasked.
        let mut out = [0u8; 32];
        let n = wsproto::encode_client_frame(wsproto::OP_BINARY, b"RFB", [1, 2, 3, 4], &mut out)
            .unwrap();
        assert_eq!(first_binary_frame(&out[..n]), Ok(Ok(b"RFB".to_vec())));
    }

    #[test]
    fn settled_stats() {
        let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert!(is_settled(&v(
            r#"{"live_sessions":0,"sessions_by_state":{"closed":9,"pending":0,"open":0},"ports":{"allocated_ports":0}}"#
        )));
        // Shared-port instances may report no ports section.
        assert!(is_settled(&v(r#"{"live_sessions":0}"#)));
        assert!(!is_settled(&v(
            r#"{"live_sessions":0,"sessions_by_state":{"pending":6}}"#
        )));
        assert!(!is_settled(&v(
            r#"{"live_sessions":0,"ports":{"allocated_ports":40}}"#
        )));
        assert!(!is_settled(&v(r#"{"live_sessions":2}"#)));
        assert!(!is_settled(&v("{}")));
    }

    #[test]
    fn backoff_only_after_capacity_refusals() {
        let ms = Duration::from_millis;
        assert_eq!(
            backoff_after("api: HTTP 503 port_pool_exhausted", 1),
            Some(ms(5))
        );
        assert_eq!(backoff_after("api: HTTP 429 too_many", 4), Some(ms(20)));
        assert_eq!(backoff_after("api: HTTP 503 x", 49), Some(ms(100)));
        assert_eq!(backoff_after("api: HTTP 503 x", u64::MAX), Some(ms(100)));
        assert_eq!(backoff_after("api: HTTP 500 internal", 3), None);
        assert_eq!(
            backoff_after("upgrade: websocket handshake: upgrade refused: HTTP 503", 3),
            None
        );
    }

    #[test]
    fn rfb_greeting_check() {
        assert!(looks_like_rfb_greeting(b"RFB 003.008\n"));
        assert!(looks_like_rfb_greeting(b"RF"));
        assert!(!looks_like_rfb_greeting(b""));
        assert!(!looks_like_rfb_greeting(b"HTTP/1.1"));
    }

    #[test]
    fn reasons_are_bounded() {
        let mut r = Reasons::default();
        for i in 0..(MAX_REASONS as u64 + 5) {
            r.add_n(&format!("reason {i}"), 1);
        }
        r.add_n("reason 0", 2);
        assert_eq!(r.0.len(), MAX_REASONS + 1);
        assert_eq!(r.0["reason 0"], 3);
        assert_eq!(r.0["other"], 5);
        let mut m = Reasons::default();
        m.merge(r);
        assert_eq!(m.0["other"], 5);
    }

    #[test]
    fn variants_and_bodies() {
        use ProxyKind::*;
        assert_eq!(
            consolegate_variants(&[PlainRelay, ConsolegateUring, Websockify, ConsolegateEpoll]),
            vec![ConsolegateUring, ConsolegateEpoll]
        );
        assert!(consolegate_variants(&[PlainRelay]).is_empty());
        let v: serde_json::Value =
            serde_json::from_str(PortMode::Dedicated.request_body()).unwrap();
        assert_eq!(v["port_mode"], "dedicated");
        assert_eq!(v["target"]["kind"], "demo");
        let v: serde_json::Value = serde_json::from_str(PortMode::Shared.request_body()).unwrap();
        assert!(v.get("port_mode").is_none());
    }

    #[test]
    fn table_renders_ok_and_failed_cells() {
        let p = Percentiles::from_array([900.0, 1000.0, 2500.0, 3000.0, 9000.0]);
        let mut ok = Cell::failed(
            ProxyKind::ConsolegateEpoll,
            PortMode::Shared,
            1,
            HttpMode::KeepAlive,
            String::new(),
        );
        ok.ok = true;
        ok.error = None;
        ok.completed = 2000;
        ok.failed = 1;
        ok.failure_reasons.insert("api: HTTP 503 x".into(), 1);
        ok.sessions_per_s = Some(812.4);
        ok.appliance_cpu_ms_per_session = Some(0.456);
        ok.percentiles = Some(Parts {
            total: p,
            api: p,
            upgrade: p,
            first_byte: p,
        });
        let bad = Cell::failed(
            ProxyKind::ConsolegateUring,
            PortMode::Dedicated,
            8,
            HttpMode::KeepAlive,
            "start: boom".into(),
        );
        let common = Common {
            websockify: "w".into(),
            consolegate: "c".into(),
            consolegate_args: vec![],
            bench_exe: "b".into(),
            ws_path: "/".into(),
            ws_subprotocol: None,
            startup_timeout_ms: 1,
            io_timeout_ms: 1,
            out_dir: "o".into(),
            meta: BTreeMap::new(),
        };
        let r = SessionStartReport {
            run: RunInfo {
                benchmark: "session-start",
                started_at_unix_s: 0,
                finished_at_unix_s: 0,
                interrupted: false,
                machine: Machine::describe(),
            },
            config: SessionStartConfig {
                proxies: vec![ProxyKind::ConsolegateEpoll],
                modes: vec![PortMode::Shared],
                concurrency: vec![1],
                samples: 2000,
                warmup: 50,
                time_limit_ms: 20_000,
                http: HttpMode::KeepAlive,
                state_root: None,
                common,
            },
            cells: vec![ok, bad],
        };
        let t = render_text(&r);
        let table: Vec<&str> = t.lines().filter(|l| l.starts_with('|')).collect();
        assert_eq!(table.len(), 4, "{t}");
        let w = table[0].chars().count();
        assert!(table.iter().all(|l| l.chars().count() == w), "{t}");
        assert!(
            table[2].contains("|    900 | 1000 | 2500 | 9000 |") && table[2].contains("900 / 2500"),
            "{t}"
        );
        assert!(
            table[2].contains(" 812 |") && table[2].contains(" 0.46 |"),
            "{t}"
        );
        assert!(table[3].contains("failed"), "{t}");
        assert!(
            t.contains("- consolegate-uring dedicated c=8: start: boom"),
            "{t}"
        );
        assert!(t.contains("1 × api: HTTP 503 x"), "{t}");
        assert!(t.contains("keep-alive"));
    }
}
