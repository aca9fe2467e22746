//! The WebMKS benchmark: what a `webmks` session of the appliance costs
//! beside a `vnc` session of the same appliance, for the same workloads, in
//! the same run, on each io backend.
//!
//! Per run:
//!
//! 1. **TLS alone** (`tls_cost`): CPU seconds per GB of rustls decryption
//!    and encryption in memory, the term the CPU target allows.
//! 2. **Baselines** at each concurrency, no appliance: `direct-tcp` (raw
//!    TCP to the echo backend: the VNC relay's baseline, as in the latency
//!    benchmark) and `direct-wss` (TLS + WebSocket straight to the
//!    stand-in host's echo ticket: the WebMKS relay's baseline, so the
//!    host's own TLS and framing are not charged to the appliance).
//! 3. Per io backend (rotated per run), a fresh appliance
//!    (`consolegate run`, see `appliance`); sessions are created through
//!    its API (`POST /api/v1/sessions`, one per client session):
//!    `{"kind":"vnc"}` to the bench's TCP echo / stream / sink backends,
//!    `{"kind":"webmks","url":"wss://…/ticket/…","thumbprint":…}` to the
//!    stand-in host (`wss_backend`) running the same workloads. Clients
//!    speak the same WebSocket to both (masked binary frames, `binary`
//!    offered, as wmks.js does). Latency: closed-loop ping-pong; added
//!    latency = session − its baseline, same run, same concurrency.
//!    Throughput: bulk down (backend → browser) and up, CPU = the
//!    appliance's process tree utime+stime over the measured phase.
//!
//! Reported: medians across runs; ratios are computed within a run, then
//! their median taken. The targets: WebMKS CPU/GB ≤ VNC relay
//! CPU/GB + TLS CPU/GB (decryption for down, encryption for up: what the
//! appliance does to those bytes), and WebMKS added latency ≤ 1.25× the VNC
//! relay's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::appliance::{self, RunningAppliance};
use crate::client::{self, Transport};
use crate::common::{rotated, unix_now, Common};
use crate::proxy::ProxyKind;
use crate::report::{self, Machine, RunInfo};
use crate::rest::{self, CreatedSession, HttpMode, RestClient};
use crate::stats::{self, Percentiles};
use crate::throughput::{self, Direction};
use crate::tls_cost::{self, TlsCost};
use crate::webmks_load::{self, Connect, PingPongPlan, RoundTrip, Sink, TransferPlan};
use crate::wss_backend::{Identity, Mode, WssBackend};
use crate::wss_client::WssSession;

/// Most concurrent sessions per latency cell.
pub const MAX_CONCURRENCY: usize = 256;
/// Most sessions per transfer.
pub const MAX_SESSIONS: usize = 64;
/// The latency target: WebMKS added ≤ this × the VNC relay's.
pub const LATENCY_LIMIT: f64 = 1.25;
/// The CPU target: WebMKS ≤ this × (VNC relay + TLS).
pub const CPU_LIMIT: f64 = 1.0;
/// Demo clients the appliance allows (the demo console is not used here).
const DEMO_MAX_CLIENTS: usize = 16;
/// Bytes a stream backend may send beyond a session's budget (what the
/// appliance and the socket buffers hold when the client stops reading).
const STREAM_SLACK_BYTES: u64 = 64 << 20;
/// The TLS cost measurement takes at most this long per direction.
const TLS_COST_TIME_LIMIT: Duration = Duration::from_secs(30);
/// What the clients offer (wmks.js offers `binary, vmware-vvc`; the
/// appliance answers `binary`).
const CLIENT_SUBPROTOCOL: &str = "binary";

/// What a measurement went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// Raw TCP to the echo backend (the VNC relay's latency baseline).
    DirectTcp,
    /// TLS + WebSocket to the stand-in host (the WebMKS relay's baseline).
    DirectWss,
    /// A `vnc` session of the appliance to a TCP backend.
    Vnc,
    /// A `webmks` session of the appliance to the stand-in host.
    Webmks,
}

impl Via {
    pub fn name(self) -> &'static str {
        match self {
            Via::DirectTcp => "direct-tcp",
            Via::DirectWss => "direct-wss",
            Via::Vnc => "vnc",
            Via::Webmks => "webmks",
        }
    }

    /// The baseline its added latency is measured from.
    pub fn baseline(self) -> Option<Via> {
        match self {
            Via::Vnc => Some(Via::DirectTcp),
            Via::Webmks => Some(Via::DirectWss),
            Via::DirectTcp | Via::DirectWss => None,
        }
    }
}

/// The two relay kinds, alternated per run so neither always goes first.
fn relay_order(run: usize) -> [Via; 2] {
    if run % 2 == 1 {
        [Via::Vnc, Via::Webmks]
    } else {
        [Via::Webmks, Via::Vnc]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WebmksConfig {
    /// consolegate-epoll and/or consolegate-uring.
    pub proxies: Vec<ProxyKind>,
    pub runs: usize,
    pub concurrency: Vec<usize>,
    pub message_bytes: usize,
    pub warmup_round_trips: u64,
    pub round_trips: u64,
    pub time_limit_ms: u64,
    pub directions: Vec<Direction>,
    /// Concurrent sessions of a transfer.
    pub sessions: usize,
    /// Measured payload bytes per transfer, all sessions.
    pub bytes: u64,
    pub chunk_bytes: usize,
    pub warmup_bytes: u64,
    pub throughput_time_limit_ms: u64,
    /// Plaintext bytes of each TLS cost measurement.
    pub tls_cost_bytes: u64,
    pub common: Common,
}

/// One latency measurement in one run.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyCell {
    pub run: usize,
    pub via: Via,
    /// The appliance's io backend (none for the baselines).
    pub io: Option<ProxyKind>,
    pub concurrency: usize,
    pub ok: bool,
    pub error: Option<String>,
    pub round_trips: u64,
    /// Wall time of the measured phase (slowest session).
    pub measured_s: f64,
    pub time_limited: bool,
    pub latency: Option<Percentiles>,
    /// Minus the baseline's at the same concurrency in the same run.
    pub added: Option<Percentiles>,
}

/// One transfer in one run.
#[derive(Debug, Clone, Serialize)]
pub struct TransferCell {
    pub run: usize,
    pub via: Via,
    pub io: ProxyKind,
    pub direction: Direction,
    pub ok: bool,
    pub error: Option<String>,
    pub bytes: u64,
    pub seconds: f64,
    pub mb_per_s: Option<f64>,
    pub proxy_cpu_s: Option<f64>,
    /// Appliance CPU seconds per 10^9 payload bytes.
    pub cpu_s_per_gb: Option<f64>,
    pub time_limited: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub run: usize,
    pub tls: Option<TlsCost>,
    pub tls_error: Option<String>,
    /// What the stand-in host negotiated with the appliance.
    pub backend_cipher_suite: Option<String>,
    pub latency: Vec<LatencyCell>,
    pub throughput: Vec<TransferCell>,
}

/// Medians across runs of one via × io × concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct LatencySummary {
    pub via: Via,
    pub io: Option<ProxyKind>,
    pub concurrency: usize,
    pub runs: usize,
    pub runs_ok: usize,
    pub latency: Option<Percentiles>,
    pub added: Option<Percentiles>,
    /// WebMKS rows: added p50 ÷ the VNC relay's (same run, io, concurrency).
    pub added_p50_vs_vnc: Option<f64>,
    pub added_p99_vs_vnc: Option<f64>,
    pub added_p99_9_vs_vnc: Option<f64>,
    pub errors: Vec<String>,
}

/// Medians across runs of one io × direction, both relay kinds.
#[derive(Debug, Clone, Serialize)]
pub struct TransferSummary {
    pub io: ProxyKind,
    pub direction: Direction,
    pub runs: usize,
    pub runs_ok: usize,
    pub vnc_mb_per_s: Option<f64>,
    pub vnc_cpu_s_per_gb: Option<f64>,
    pub webmks_mb_per_s: Option<f64>,
    pub webmks_cpu_s_per_gb: Option<f64>,
    /// The direction's TLS term: decryption (down) or encryption (up).
    pub tls_cpu_s_per_gb: Option<f64>,
    /// VNC relay + TLS term, per run.
    pub budget_cpu_s_per_gb: Option<f64>,
    /// WebMKS ÷ budget, per run (target ≤ 1.0).
    pub webmks_vs_budget: Option<f64>,
    /// WebMKS − budget, per run (≤ 0 meets the target).
    pub excess_cpu_s_per_gb: Option<f64>,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TlsSummary {
    pub cipher_suite: Option<String>,
    pub decrypt_cpu_s_per_gb: Option<f64>,
    pub encrypt_cpu_s_per_gb: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct WebmksReport {
    #[serde(flatten)]
    pub run: RunInfo,
    pub config: WebmksConfig,
    pub tls: TlsSummary,
    pub latency: Vec<LatencySummary>,
    pub throughput: Vec<TransferSummary>,
    pub targets: Vec<crate::all::Target>,
    pub runs: Vec<RunRecord>,
}

/// The TLS term of a direction: what the appliance does to those bytes.
pub fn tls_term(tls: &TlsCost, direction: Direction) -> f64 {
    match direction {
        Direction::Down => tls.decrypt_cpu_s_per_gb,
        Direction::Up => tls.encrypt_cpu_s_per_gb,
    }
}

/// Fills `added` of every relay cell of one run from its baseline's cell.
pub fn fill_added(cells: &mut [LatencyCell]) {
    let snapshot = cells.to_vec();
    for c in cells.iter_mut() {
        let Some(base_via) = c.via.baseline() else {
            continue;
        };
        let base = snapshot
            .iter()
            .find(|b| b.via == base_via && b.concurrency == c.concurrency && b.run == c.run)
            .and_then(|b| b.latency);
        if let (Some(lat), Some(base)) = (c.latency, base) {
            c.added = Some(lat.minus(base));
        }
    }
}

/// Per-run ratios of WebMKS's added latency (figure `f`) to the VNC
/// relay's, same io and concurrency, then their median.
fn added_ratio(
    runs: &[RunRecord],
    io: Option<ProxyKind>,
    conc: usize,
    f: fn(&Percentiles) -> f64,
) -> Option<f64> {
    let ratios: Vec<f64> = runs
        .iter()
        .filter_map(|r| {
            let find = |via| {
                r.latency
                    .iter()
                    .find(|c| c.via == via && c.io == io && c.concurrency == conc && c.ok)
                    .and_then(|c| c.added)
            };
            stats::ratio(f(&find(Via::Webmks)?), f(&find(Via::Vnc)?))
        })
        .collect();
    stats::median(&ratios)
}

fn distinct_errors<'a>(errors: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in errors {
        if !out.contains(e) {
            out.push(e.clone());
        }
    }
    out
}

/// Medians across runs, per via × io × concurrency (baselines first).
pub fn summarize_latency(
    runs: &[RunRecord],
    proxies: &[ProxyKind],
    concurrency: &[usize],
) -> Vec<LatencySummary> {
    let mut keys: Vec<(Via, Option<ProxyKind>)> =
        vec![(Via::DirectTcp, None), (Via::DirectWss, None)];
    for &io in proxies {
        keys.push((Via::Vnc, Some(io)));
        keys.push((Via::Webmks, Some(io)));
    }
    let mut out = Vec::new();
    for (via, io) in keys {
        for &conc in concurrency {
            let cells: Vec<&LatencyCell> = runs
                .iter()
                .flat_map(|r| r.latency.iter())
                .filter(|c| c.via == via && c.io == io && c.concurrency == conc)
                .collect();
            let ok: Vec<&&LatencyCell> = cells.iter().filter(|c| c.ok).collect();
            let webmks = via == Via::Webmks;
            let ratio = |f| webmks.then(|| added_ratio(runs, io, conc, f)).flatten();
            out.push(LatencySummary {
                via,
                io,
                concurrency: conc,
                runs: cells.len(),
                runs_ok: ok.len(),
                latency: Percentiles::median_of(
                    &ok.iter().filter_map(|c| c.latency).collect::<Vec<_>>(),
                ),
                added: Percentiles::median_of(
                    &ok.iter().filter_map(|c| c.added).collect::<Vec<_>>(),
                ),
                added_p50_vs_vnc: ratio(|p| p.p50_us),
                added_p99_vs_vnc: ratio(|p| p.p99_us),
                added_p99_9_vs_vnc: ratio(|p| p.p99_9_us),
                errors: distinct_errors(cells.iter().filter_map(|c| c.error.as_ref())),
            });
        }
    }
    out
}

/// The figures of one run for one io × direction: VNC CPU, WebMKS CPU,
/// TLS term, MB/s of each.
struct RunPair {
    vnc: (f64, Option<f64>),
    webmks: (f64, Option<f64>),
    tls: Option<f64>,
}

fn run_pair(r: &RunRecord, io: ProxyKind, dir: Direction) -> Option<RunPair> {
    let find = |via| {
        r.throughput
            .iter()
            .find(|c| c.via == via && c.io == io && c.direction == dir && c.ok)
            .and_then(|c| Some((c.cpu_s_per_gb?, c.mb_per_s)))
    };
    Some(RunPair {
        vnc: find(Via::Vnc)?,
        webmks: find(Via::Webmks)?,
        tls: r.tls.as_ref().map(|t| tls_term(t, dir)),
    })
}

/// Medians across runs per io × direction, with the per-run budget
/// (VNC + TLS) and WebMKS's ratio to it.
pub fn summarize_throughput(
    runs: &[RunRecord],
    proxies: &[ProxyKind],
    directions: &[Direction],
) -> Vec<TransferSummary> {
    let mut out = Vec::new();
    for &io in proxies {
        for &dir in directions {
            let cells: Vec<&TransferCell> = runs
                .iter()
                .flat_map(|r| r.throughput.iter())
                .filter(|c| c.io == io && c.direction == dir)
                .collect();
            let col = |via: Via, f: fn(&TransferCell) -> Option<f64>| {
                let v: Vec<f64> = cells
                    .iter()
                    .filter(|c| c.via == via && c.ok)
                    .filter_map(|c| f(c))
                    .collect();
                stats::median(&v)
            };
            let pairs: Vec<RunPair> = runs.iter().filter_map(|r| run_pair(r, io, dir)).collect();
            let per_run = |f: fn(&RunPair) -> Option<f64>| {
                stats::median(&pairs.iter().filter_map(f).collect::<Vec<_>>())
            };
            out.push(TransferSummary {
                io,
                direction: dir,
                runs: runs.len(),
                runs_ok: pairs.len(),
                vnc_mb_per_s: col(Via::Vnc, |c| c.mb_per_s),
                vnc_cpu_s_per_gb: col(Via::Vnc, |c| c.cpu_s_per_gb),
                webmks_mb_per_s: col(Via::Webmks, |c| c.mb_per_s),
                webmks_cpu_s_per_gb: col(Via::Webmks, |c| c.cpu_s_per_gb),
                tls_cpu_s_per_gb: per_run(|p| p.tls),
                budget_cpu_s_per_gb: per_run(|p| Some(p.vnc.0 + p.tls?)),
                webmks_vs_budget: per_run(|p| stats::ratio(p.webmks.0, p.vnc.0 + p.tls?)),
                excess_cpu_s_per_gb: per_run(|p| Some(p.webmks.0 - (p.vnc.0 + p.tls?))),
                errors: distinct_errors(cells.iter().filter_map(|c| c.error.as_ref())),
            });
        }
    }
    out
}

fn summarize_tls(runs: &[RunRecord]) -> TlsSummary {
    let tls: Vec<&TlsCost> = runs.iter().filter_map(|r| r.tls.as_ref()).collect();
    let col = |f: fn(&TlsCost) -> f64| stats::median(&tls.iter().map(|t| f(t)).collect::<Vec<_>>());
    TlsSummary {
        cipher_suite: tls.first().map(|t| t.cipher_suite.clone()),
        decrypt_cpu_s_per_gb: col(|t| t.decrypt_cpu_s_per_gb),
        encrypt_cpu_s_per_gb: col(|t| t.encrypt_cpu_s_per_gb),
    }
}

fn check(value: Option<f64>, limit: f64) -> Option<bool> {
    value.map(|v| v <= limit)
}

/// The two targets per io backend (and concurrency / direction).
pub fn targets(
    lat: &[LatencySummary],
    tp: &[TransferSummary],
    proxies: &[ProxyKind],
) -> Vec<crate::all::Target> {
    let mut out = Vec::new();
    for &io in proxies {
        for s in lat
            .iter()
            .filter(|s| s.via == Via::Webmks && s.io == Some(io))
        {
            let vnc = lat
                .iter()
                .find(|v| v.via == Via::Vnc && v.io == Some(io) && v.concurrency == s.concurrency)
                .and_then(|v| v.added);
            let note = match (s.added, vnc) {
                (Some(w), Some(v)) => format!(
                    "added p50 {} vs {} µs, p99 {} vs {} µs (p99 ratio {})",
                    report::fmt_us(w.p50_us),
                    report::fmt_us(v.p50_us),
                    report::fmt_us(w.p99_us),
                    report::fmt_us(v.p99_us),
                    s.added_p99_vs_vnc.map_or("—".into(), report::fmt_ratio)
                ),
                _ => "not measured".into(),
            };
            out.push(crate::all::Target {
                target: format!(
                    "WebMKS added p50 at {} session(s) ≤ {LATENCY_LIMIT}× VNC relay's",
                    s.concurrency
                ),
                proxy: io,
                value: s.added_p50_vs_vnc,
                limit: LATENCY_LIMIT,
                met: check(s.added_p50_vs_vnc, LATENCY_LIMIT),
                note,
            });
        }
        for s in tp.iter().filter(|s| s.io == io) {
            let tls = if s.direction == Direction::Down {
                "decryption"
            } else {
                "encryption"
            };
            let f = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.3}"));
            out.push(crate::all::Target {
                target: format!(
                    "WebMKS {} CPU-s/GB ≤ VNC relay's + TLS {tls}",
                    s.direction.name()
                ),
                proxy: io,
                value: s.webmks_vs_budget,
                limit: CPU_LIMIT,
                met: check(s.webmks_vs_budget, CPU_LIMIT),
                note: format!(
                    "webmks {} vs {} + {} = {} CPU-s/GB (excess {})",
                    f(s.webmks_cpu_s_per_gb),
                    f(s.vnc_cpu_s_per_gb),
                    f(s.tls_cpu_s_per_gb),
                    f(s.budget_cpu_s_per_gb),
                    f(s.excess_cpu_s_per_gb)
                ),
            });
        }
    }
    out
}

/// The backends every run shares.
struct Backends {
    identity: Identity,
    echo: crate::server::ThreadServer,
    tcp: throughput::Backends,
    host: WssBackend,
}

impl Backends {
    fn start(cfg: &WebmksConfig) -> Result<Backends> {
        let identity = Identity::generate()?;
        let per_conn =
            cfg.warmup_bytes + cfg.bytes.div_ceil(cfg.sessions as u64) + STREAM_SLACK_BYTES;
        Ok(Backends {
            echo: crate::echo::start().context("starting the echo backend")?,
            tcp: throughput::start_backends(cfg.chunk_bytes, per_conn)?,
            host: WssBackend::start(&identity, cfg.chunk_bytes, per_conn)?,
            identity,
        })
    }

    fn stop(&mut self) {
        self.echo.stop();
        self.tcp.stream.stop();
        self.tcp.sink.stop();
        self.host.stop();
    }

    /// The API's `target` for `via` running `mode`.
    fn target_json(&self, via: Via, mode: Mode) -> serde_json::Value {
        let tcp = |addr: SocketAddr| serde_json::json!({"kind": "vnc", "host": addr.ip().to_string(), "port": addr.port()});
        match (via, mode) {
            (Via::Webmks, m) => serde_json::json!({
                "kind": "webmks",
                "url": self.host.url(m),
                "thumbprint": self.host.thumbprint,
            }),
            (_, Mode::Echo) => tcp(self.echo.addr()),
            (_, Mode::Stream) => tcp(self.tcp.stream.addr()),
            (_, Mode::Sink) => tcp(self.tcp.sink.addr()),
        }
    }
}

/// Creates `n` sessions to `target` on the appliance; each one's console
/// address and request path.
fn create_sessions(
    app: &RunningAppliance,
    target: &serde_json::Value,
    n: usize,
    io_timeout: Duration,
) -> Result<Vec<(SocketAddr, Transport)>, String> {
    let mut api = RestClient::new(app.control, &app.token, HttpMode::KeepAlive, io_timeout);
    let body = serde_json::json!({"target": target, "user": "bench"}).to_string();
    (0..n)
        .map(|_| {
            let r = api
                .post_json("/api/v1/sessions", &body)
                .map_err(|e| format!("POST /api/v1/sessions: {e}"))?;
            if r.status != 201 {
                return Err(format!(
                    "POST /api/v1/sessions: HTTP {}: {}",
                    r.status,
                    r.body_excerpt()
                ));
            }
            let created: CreatedSession =
                serde_json::from_slice(&r.body).map_err(|e| format!("201 body: {e}"))?;
            let (addr, path) = rest::parse_ws_url(&created.ws_url)?;
            Ok((
                addr,
                Transport::WebSocket {
                    path,
                    subprotocol: Some(CLIENT_SUBPROTOCOL.into()),
                },
            ))
        })
        .collect()
}

/// Everything one run needs.
struct RunCtx<'a> {
    cfg: &'a WebmksConfig,
    backends: &'a Backends,
    stop: &'a Arc<AtomicBool>,
    run: usize,
    hists: &'a mut BTreeMap<(Via, Option<ProxyKind>, usize), Histogram<u64>>,
}

impl RunCtx<'_> {
    fn io_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.common.io_timeout_ms)
    }

    fn ping_pong_plan(&self) -> PingPongPlan {
        PingPongPlan {
            warmup_round_trips: self.cfg.warmup_round_trips,
            round_trips: self.cfg.round_trips,
            time_limit: Duration::from_millis(self.cfg.time_limit_ms),
            io_timeout: self.io_timeout(),
        }
    }

    /// One latency cell over `connects`.
    fn latency_cell(
        &mut self,
        via: Via,
        io: Option<ProxyKind>,
        conc: usize,
        connects: Result<Vec<Connect>, String>,
    ) -> LatencyCell {
        let mut cell = LatencyCell {
            run: self.run,
            via,
            io,
            concurrency: conc,
            ok: false,
            error: None,
            round_trips: 0,
            measured_s: 0.0,
            time_limited: false,
            latency: None,
            added: None,
        };
        let result =
            connects.and_then(|c| webmks_load::ping_pong(c, &self.ping_pong_plan(), self.stop));
        match result {
            Ok(out) => {
                let lat = Percentiles::from_histogram(&out.hist);
                eprintln!(
                    "webmks run {}/{}: {:<10} {:<17} c={conc:<4} p50 {:>7} µs  p99 {:>7} µs",
                    self.run,
                    self.cfg.runs,
                    via.name(),
                    io.map_or("", |p| p.name()),
                    report::fmt_us(lat.p50_us),
                    report::fmt_us(lat.p99_us)
                );
                let merged = self
                    .hists
                    .entry((via, io, conc))
                    .or_insert_with(crate::workload::new_histogram);
                let _ = merged.add(&out.hist);
                cell.ok = true;
                cell.round_trips = out.hist.len();
                cell.measured_s = out.measured.as_secs_f64();
                cell.time_limited = out.time_limited;
                cell.latency = Some(lat);
            }
            Err(e) => {
                eprintln!(
                    "webmks run {}: {} c={conc}: failed: {e}",
                    self.run,
                    via.name()
                );
                cell.error = Some(e);
            }
        }
        cell
    }

    /// The two baselines at each concurrency.
    fn baselines(&mut self) -> Vec<LatencyCell> {
        let mut cells = Vec::new();
        let (io_timeout, bytes) = (self.io_timeout(), self.cfg.message_bytes);
        let echo = self.backends.echo.addr();
        let host = self.backends.host.addr();
        for &conc in &self.cfg.concurrency.clone() {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let tcp: Vec<Connect> = (0..conc)
                .map(|_| -> Connect {
                    Box::new(move |i| {
                        client::Session::connect(echo, &Transport::Raw, bytes, i, io_timeout)
                            .map(|s| Box::new(s) as Box<dyn RoundTrip>)
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            cells.push(self.latency_cell(Via::DirectTcp, None, conc, Ok(tcp)));
            let wss = match self.backends.identity.client_config() {
                Ok(tls) => Ok((0..conc)
                    .map(|_| -> Connect {
                        let tls = tls.clone();
                        Box::new(move |i| {
                            WssSession::connect(host, Mode::Echo.path(), tls, bytes, i, io_timeout)
                                .map(|s| Box::new(s) as Box<dyn RoundTrip>)
                        })
                    })
                    .collect()),
                Err(e) => Err(format!("client TLS config: {e:#}")),
            };
            cells.push(self.latency_cell(Via::DirectWss, None, conc, wss));
        }
        cells
    }

    /// Latency through the appliance's sessions, both relay kinds.
    fn appliance_latency(&mut self, app: &RunningAppliance, io: ProxyKind) -> Vec<LatencyCell> {
        let mut cells = Vec::new();
        let (io_timeout, bytes) = (self.io_timeout(), self.cfg.message_bytes);
        for &conc in &self.cfg.concurrency.clone() {
            for via in relay_order(self.run) {
                if self.stop.load(Ordering::SeqCst) {
                    return cells;
                }
                let target = self.backends.target_json(via, Mode::Echo);
                let connects = create_sessions(app, &target, conc, io_timeout).map(|sessions| {
                    sessions
                        .into_iter()
                        .map(|(addr, transport)| -> Connect {
                            Box::new(move |i| {
                                client::Session::connect(addr, &transport, bytes, i, io_timeout)
                                    .map(|s| Box::new(s) as Box<dyn RoundTrip>)
                                    .map_err(|e| e.to_string())
                            })
                        })
                        .collect()
                });
                cells.push(self.latency_cell(via, Some(io), conc, connects));
            }
        }
        cells
    }

    /// Bulk transfers through the appliance's sessions, both relay kinds.
    fn appliance_throughput(
        &mut self,
        app: &mut RunningAppliance,
        io: ProxyKind,
    ) -> Vec<TransferCell> {
        let mut cells = Vec::new();
        for &dir in &self.cfg.directions {
            for via in relay_order(self.run) {
                if self.stop.load(Ordering::SeqCst) {
                    return cells;
                }
                cells.push(self.transfer_cell(app, io, via, dir));
            }
        }
        cells
    }

    fn transfer_cell(
        &mut self,
        app: &mut RunningAppliance,
        io: ProxyKind,
        via: Via,
        dir: Direction,
    ) -> TransferCell {
        let cfg = self.cfg;
        let mode = if dir == Direction::Down {
            Mode::Stream
        } else {
            Mode::Sink
        };
        let plan = TransferPlan {
            direction: dir,
            warmup: cfg.warmup_bytes,
            quota: cfg.bytes.div_ceil(cfg.sessions as u64),
            chunk: cfg.chunk_bytes,
            time_limit: Duration::from_millis(cfg.throughput_time_limit_ms),
            io_timeout: self.io_timeout(),
        };
        let sink = match via {
            Via::Webmks => Sink {
                counter: &self.backends.host.sink,
                base: self.backends.host.base,
            },
            _ => Sink {
                counter: &self.backends.tcp.sink_counter,
                base: self.backends.tcp.base,
            },
        };
        let target = self.backends.target_json(via, mode);
        let result = app
            .pid()
            .ok_or_else(|| "no appliance process".to_string())
            .and_then(|pid| {
                let sessions = create_sessions(app, &target, cfg.sessions, self.io_timeout())?;
                webmks_load::transfer(sessions, &plan, pid, &sink, self.stop)
            });
        let result = result.map_err(|e| {
            if app.has_exited() {
                format!("{e} (appliance exited: {})", app.log_tail())
            } else {
                e
            }
        });
        transfer_cell_of(self.run, via, io, dir, result, cfg.runs)
    }
}

fn transfer_cell_of(
    run: usize,
    via: Via,
    io: ProxyKind,
    direction: Direction,
    result: Result<webmks_load::TransferOutcome, String>,
    runs: usize,
) -> TransferCell {
    let mut cell = TransferCell {
        run,
        via,
        io,
        direction,
        ok: false,
        error: None,
        bytes: 0,
        seconds: 0.0,
        mb_per_s: None,
        proxy_cpu_s: None,
        cpu_s_per_gb: None,
        time_limited: false,
    };
    match result {
        Ok(o) => {
            let gb = o.bytes as f64 / 1e9;
            cell.ok = true;
            cell.bytes = o.bytes;
            cell.seconds = o.seconds;
            cell.mb_per_s = (o.seconds > 0.0).then(|| o.bytes as f64 / 1e6 / o.seconds);
            cell.proxy_cpu_s = Some(o.proxy_cpu_s);
            cell.cpu_s_per_gb = (gb > 0.0).then(|| o.proxy_cpu_s / gb);
            cell.time_limited = o.time_limited;
            eprintln!(
                "webmks run {run}/{runs}: {:<10} {io:<17} {:<4} {:>8.1} MB/s  {:>6.3} CPU-s/GB  ({} MB in {:.2} s{})",
                via.name(),
                direction.name(),
                cell.mb_per_s.unwrap_or(0.0),
                cell.cpu_s_per_gb.unwrap_or(0.0),
                o.bytes / 1_000_000,
                o.seconds,
                if o.time_limited { ", time-limited" } else { "" }
            );
        }
        Err(e) => {
            eprintln!(
                "webmks run {run}: {} {io} {}: failed: {e}",
                via.name(),
                direction.name()
            );
            cell.error = Some(e);
        }
    }
    cell
}

fn io_name(io: ProxyKind) -> &'static str {
    if io == ProxyKind::ConsolegateEpoll {
        "epoll"
    } else {
        "uring"
    }
}

/// One run: TLS alone, the baselines, then each io backend's appliance.
fn one_run(ctx: &mut RunCtx<'_>) -> Result<RunRecord> {
    let cfg = ctx.cfg;
    let run = ctx.run;
    let (tls, tls_error) = match tls_cost::measure(
        &ctx.backends.identity,
        cfg.tls_cost_bytes,
        TLS_COST_TIME_LIMIT,
    ) {
        Ok(t) => {
            eprintln!(
                "webmks run {run}/{}: TLS alone ({}): decrypt {:.3}, encrypt {:.3} CPU-s/GB",
                cfg.runs, t.cipher_suite, t.decrypt_cpu_s_per_gb, t.encrypt_cpu_s_per_gb
            );
            (Some(t), None)
        }
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let mut latency = ctx.baselines();
    let mut transfers = Vec::new();
    for io in rotated(&cfg.proxies, run) {
        if ctx.stop.load(Ordering::SeqCst) {
            break;
        }
        let dir = cfg
            .common
            .out_dir
            .join("webmks")
            .join(format!("run{run}-{}", io_name(io)));
        let log = cfg
            .common
            .out_dir
            .join("logs")
            .join(format!("webmks-{}-run{run}.log", io.name()));
        let started = appliance::start(
            &cfg.common.consolegate,
            &dir,
            &dir.join("state"),
            io_name(io),
            DEMO_MAX_CLIENTS,
            &log,
            Duration::from_millis(cfg.common.startup_timeout_ms),
        );
        let mut app = match started {
            Ok(a) => a,
            Err(e) => {
                let msg = format!("appliance start: {e:#}");
                eprintln!("webmks run {run}: {io}: {msg}");
                for via in [Via::Vnc, Via::Webmks] {
                    for &conc in &cfg.concurrency {
                        latency.push(ctx.latency_cell(via, Some(io), conc, Err(msg.clone())));
                    }
                    for &d in &cfg.directions {
                        transfers.push(transfer_cell_of(
                            run,
                            via,
                            io,
                            d,
                            Err(msg.clone()),
                            cfg.runs,
                        ));
                    }
                }
                continue;
            }
        };
        latency.extend(ctx.appliance_latency(&app, io));
        transfers.extend(ctx.appliance_throughput(&mut app, io));
        app.stop();
    }
    fill_added(&mut latency);
    Ok(RunRecord {
        run,
        tls,
        tls_error,
        backend_cipher_suite: ctx.backends.host.cipher_suite(),
        latency,
        throughput: transfers,
    })
}

fn validate(cfg: &WebmksConfig) -> Result<()> {
    if cfg.proxies.is_empty() {
        bail!("the webmks benchmark needs consolegate-epoll and/or consolegate-uring in --proxies");
    }
    if cfg.runs == 0 || cfg.runs > crate::latency::MAX_RUNS {
        bail!("--runs must be in 1..={}", crate::latency::MAX_RUNS);
    }
    if cfg.concurrency.is_empty()
        || cfg
            .concurrency
            .iter()
            .any(|&c| c == 0 || c > MAX_CONCURRENCY)
    {
        bail!("--webmks-concurrency values must be in 1..={MAX_CONCURRENCY}");
    }
    if cfg.sessions == 0 || cfg.sessions > MAX_SESSIONS {
        bail!("--throughput-sessions must be in 1..={MAX_SESSIONS} for the webmks benchmark");
    }
    if cfg.chunk_bytes < 16 || cfg.chunk_bytes > throughput::MAX_CHUNK_BYTES {
        bail!(
            "--chunk-bytes must be in 16..={}",
            throughput::MAX_CHUNK_BYTES
        );
    }
    if cfg.message_bytes == 0 || cfg.message_bytes > client::MAX_MESSAGE_BYTES {
        bail!(
            "--message-bytes must be in 1..={}",
            client::MAX_MESSAGE_BYTES
        );
    }
    if cfg.bytes == 0 || cfg.tls_cost_bytes == 0 {
        bail!("--throughput-bytes and --webmks-tls-bytes must be positive");
    }
    Ok(())
}

fn write_hgrms(
    out_dir: &Path,
    hists: &BTreeMap<(Via, Option<ProxyKind>, usize), Histogram<u64>>,
) -> Result<()> {
    let dir = out_dir.join("hgrm").join("webmks");
    std::fs::create_dir_all(&dir)?;
    for ((via, io, conc), h) in hists {
        let name = match io {
            Some(io) => format!("{}-{}-c{conc}.hgrm", via.name(), io_name(*io)),
            None => format!("{}-c{conc}.hgrm", via.name()),
        };
        let text = report::percentile_distribution(h, report::TICKS_PER_HALF_DISTANCE, 1.0);
        std::fs::write(dir.join(&name), text).with_context(|| format!("writing {name}"))?;
    }
    Ok(())
}

/// Runs the whole comparison; writes `webmks.json`, `webmks.txt`,
/// `hgrm/webmks/` and the appliances' logs under the output directory.
pub fn run(cfg: WebmksConfig, stop: Arc<AtomicBool>) -> Result<WebmksReport> {
    validate(&cfg)?;
    let started = unix_now();
    let machine = Machine::describe();
    let out_dir: PathBuf = cfg.common.out_dir.clone();
    std::fs::create_dir_all(&out_dir)?;
    let mut backends = Backends::start(&cfg)?;
    eprintln!(
        "webmks: stand-in host on {} (SHA-1 {}), echo on {}",
        backends.host.addr(),
        backends.host.thumbprint,
        backends.echo.addr()
    );
    let mut hists = BTreeMap::new();
    let mut runs = Vec::new();
    for run in 1..=cfg.runs {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut ctx = RunCtx {
            cfg: &cfg,
            backends: &backends,
            stop: &stop,
            run,
            hists: &mut hists,
        };
        runs.push(one_run(&mut ctx)?);
    }
    backends.stop();
    write_hgrms(&out_dir, &hists)?;
    let latency = summarize_latency(&runs, &cfg.proxies, &cfg.concurrency);
    let throughput = summarize_throughput(&runs, &cfg.proxies, &cfg.directions);
    let report = WebmksReport {
        run: RunInfo::ended("webmks", started, &stop, machine),
        targets: targets(&latency, &throughput, &cfg.proxies),
        tls: summarize_tls(&runs),
        config: cfg,
        latency,
        throughput,
        runs,
    };
    let text = crate::webmks_report::render_text(&report);
    crate::common::write_report(&out_dir, "webmks", &text, &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(run: usize, via: Via, io: Option<ProxyKind>, conc: usize, p50: f64) -> LatencyCell {
        LatencyCell {
            run,
            via,
            io,
            concurrency: conc,
            ok: true,
            error: None,
            round_trips: 100,
            measured_s: 1.0,
            time_limited: false,
            latency: Some(Percentiles::from_array([
                p50,
                p50 * 2.0,
                p50 * 3.0,
                p50 * 4.0,
                p50 * 9.0,
            ])),
            added: None,
        }
    }

    fn tp(run: usize, via: Via, dir: Direction, cpu: f64) -> TransferCell {
        let mut c = transfer_cell_of(
            run,
            via,
            ProxyKind::ConsolegateEpoll,
            dir,
            Err(String::new()),
            1,
        );
        c.ok = true;
        c.error = None;
        c.cpu_s_per_gb = Some(cpu);
        c.mb_per_s = Some(1000.0 / cpu);
        c
    }

    fn tls(decrypt: f64, encrypt: f64) -> TlsCost {
        TlsCost {
            cipher_suite: "TLS13_AES_256_GCM_SHA384".into(),
            bytes: 1,
            decrypt_cpu_s: decrypt,
            encrypt_cpu_s: encrypt,
            decrypt_cpu_s_per_gb: decrypt,
            encrypt_cpu_s_per_gb: encrypt,
        }
    }

    /// A run with given VNC/WebMKS p50 (their baselines 20 and 30 µs) and
    /// down CPU figures.
    fn run(
        n: usize,
        vnc_p50: f64,
        webmks_p50: f64,
        vnc_cpu: f64,
        webmks_cpu: f64,
        decrypt: f64,
    ) -> RunRecord {
        let e = Some(ProxyKind::ConsolegateEpoll);
        let mut latency = vec![
            lat(n, Via::DirectTcp, None, 1, 20.0),
            lat(n, Via::DirectWss, None, 1, 30.0),
            lat(n, Via::Vnc, e, 1, vnc_p50),
            lat(n, Via::Webmks, e, 1, webmks_p50),
        ];
        fill_added(&mut latency);
        RunRecord {
            run: n,
            tls: Some(tls(decrypt, decrypt * 2.0)),
            tls_error: None,
            backend_cipher_suite: None,
            latency,
            throughput: vec![
                tp(n, Via::Vnc, Direction::Down, vnc_cpu),
                tp(n, Via::Webmks, Direction::Down, webmks_cpu),
            ],
        }
    }

    #[test]
    fn added_latency_is_over_each_relays_own_baseline() {
        let r = run(1, 50.0, 66.0, 0.5, 0.8, 0.3);
        let find = |via| r.latency.iter().find(|c| c.via == via).unwrap();
        assert_eq!(find(Via::DirectTcp).added, None);
        assert_eq!(find(Via::Vnc).added.unwrap().p50_us, 30.0);
        assert_eq!(find(Via::Vnc).added.unwrap().p99_us, 90.0);
        // 66 − 30 (direct wss), not − 20 (direct tcp).
        assert_eq!(find(Via::Webmks).added.unwrap().p50_us, 36.0);
        // A cell without its baseline gets nothing.
        let mut lone = vec![lat(1, Via::Webmks, None, 4, 10.0)];
        fill_added(&mut lone);
        assert_eq!(lone[0].added, None);
        assert_eq!(relay_order(1), [Via::Vnc, Via::Webmks]);
        assert_eq!(relay_order(2), [Via::Webmks, Via::Vnc]);
    }

    #[test]
    fn ratios_are_per_run_then_median_and_targets_follow() {
        let e = ProxyKind::ConsolegateEpoll;
        // Added p50 ratios 36/30 = 1.2, 60/30 = 2.0, 30/30 = 1.0 → 1.2.
        // CPU: 0.8 / (0.5 + 0.3) = 1.0, 1.5 / (0.6 + 0.4) = 1.5,
        // 0.7 / (0.5 + 0.2) = 1.0 → 1.0.
        let runs = vec![
            run(1, 50.0, 66.0, 0.5, 0.8, 0.3),
            run(2, 50.0, 90.0, 0.6, 1.5, 0.4),
            run(3, 50.0, 60.0, 0.5, 0.7, 0.2),
        ];
        let l = summarize_latency(&runs, &[e], &[1]);
        assert_eq!(l.len(), 4);
        let w = l.iter().find(|s| s.via == Via::Webmks).unwrap();
        assert_eq!((w.runs, w.runs_ok), (3, 3));
        assert!((w.added_p50_vs_vnc.unwrap() - 1.2).abs() < 1e-12);
        assert_eq!(
            l.iter()
                .find(|s| s.via == Via::Vnc)
                .unwrap()
                .added_p50_vs_vnc,
            None
        );
        let t = summarize_throughput(&runs, &[e], &[Direction::Down]);
        assert_eq!(t.len(), 1);
        let s = &t[0];
        assert_eq!(s.runs_ok, 3);
        assert_eq!(s.vnc_cpu_s_per_gb, Some(0.5));
        assert_eq!(s.webmks_cpu_s_per_gb, Some(0.8));
        assert_eq!(s.tls_cpu_s_per_gb, Some(0.3));
        assert!((s.budget_cpu_s_per_gb.unwrap() - 0.8).abs() < 1e-12);
        assert!((s.webmks_vs_budget.unwrap() - 1.0).abs() < 1e-12);
        assert!(s.excess_cpu_s_per_gb.unwrap().abs() < 1e-12);
        let targets = targets(&l, &t, &[e]);
        assert_eq!(targets.len(), 2);
        assert_eq!(targets[0].met, Some(true), "{:?}", targets[0]);
        assert_eq!(targets[0].limit, LATENCY_LIMIT);
        assert!(targets[1].target.contains("decryption"));
        assert_eq!(targets[1].met, Some(true));
        // Up uses the encryption term.
        assert_eq!(tls_term(&tls(0.3, 0.5), Direction::Up), 0.5);
    }

    #[test]
    fn a_missing_relay_leaves_the_ratio_out() {
        let e = ProxyKind::ConsolegateEpoll;
        let mut r = run(1, 50.0, 66.0, 0.5, 0.8, 0.3);
        r.throughput.retain(|c| c.via == Via::Vnc);
        r.latency.retain(|c| c.via != Via::Vnc);
        let t = summarize_throughput(std::slice::from_ref(&r), &[e], &[Direction::Down]);
        assert_eq!((t[0].runs_ok, t[0].webmks_vs_budget), (0, None));
        let l = summarize_latency(&[r], &[e], &[1]);
        let targets = targets(&l, &t, &[e]);
        assert!(targets.iter().all(|t| t.met.is_none()), "{targets:?}");
    }
}
