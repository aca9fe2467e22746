//! `all`: every benchmark in one run (what `make bench` does), then one
//! combined report: `report.json` (every figure, the configuration, the
//! machine, the host limits, ratios to websockify, the targets) and
//! `report.md` (the tables, the limits, the targets met or missed).
//!
//! Each benchmark still writes its own files (`latency.*`, `throughput.*`,
//! `memory.*`, `handshakes.*`, `session-start.*`, `webmks.*`, `events.*`,
//! `console-url.json`, `hgrm/`, `latency.svg`, `logs/`) into the
//! same directory. A benchmark that fails is recorded as such and the
//! others still run.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use serde::Serialize;

use crate::common::{unix_now, Common};
use crate::console_url::{self, ConsoleUrlOpts, ConsoleUrlReport, JwtAlg};
use crate::downstream_bulk::{self, BulkConfig, BulkReport};
use crate::events::{self, EventsOpts, EventsReport};
use crate::handshakes::{self, HandshakeConfig, HandshakeReport};
use crate::latency::{self, LatencyConfig, Report as LatencyReport};
use crate::memory::{self, MemoryConfig, MemoryReport};
use crate::proxy::ProxyKind;
use crate::report::RunInfo;
use crate::report::{self, Machine};
use crate::session_start::{self, SessionStartConfig, SessionStartReport};
use crate::throughput::{self, Direction, ThroughputConfig, ThroughputReport};
use crate::tuning::Tuning;
use crate::webmks::{self, WebmksConfig, WebmksReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bench {
    Latency,
    Throughput,
    Memory,
    Handshakes,
    SessionStart,
    DownstreamBulk,
    Webmks,
    Events,
    ConsoleUrl,
}

/// `all`'s event fan-out options: the `events` subcommand's flags with
/// smaller defaults (1 000 subscribers only, 20 rounds), so that it adds
/// well under a minute to `make bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct AllEventsArgs {
    /// Subscriber counts, one measurement each.
    #[arg(
        long = "event-subscribers",
        value_delimiter = ',',
        default_value = "1000"
    )]
    pub subscribers: Vec<usize>,
    /// Events (rounds) per run.
    #[arg(id = "all_event_rounds", long = "event-rounds", default_value_t = 20)]
    pub rounds: usize,
    /// Runs per subscriber count (medians are reported).
    #[arg(id = "all_event_runs", long = "event-runs", default_value_t = 3)]
    pub runs: usize,
}

impl AllEventsArgs {
    pub fn opts(&self) -> EventsOpts {
        EventsOpts {
            subscribers: self.subscribers.clone(),
            rounds: self.rounds,
            runs: self.runs,
            round_timeout_ms: events::DEFAULT_ROUND_TIMEOUT_MS,
            connect_timeout_ms: events::DEFAULT_CONNECT_TIMEOUT_MS,
        }
    }
}

/// `all`'s console-by-URL options: the `console-url` subcommand's flags
/// with smaller defaults (HS256 only, 2 rounds of 200 opens per variant).
#[derive(clap::Args, Debug, Clone)]
pub struct AllConsoleUrlArgs {
    /// JWT algorithms, one appliance instance each per run.
    #[arg(
        id = "all_console_url_algorithms",
        long = "console-url-algorithms",
        value_enum,
        value_delimiter = ',',
        default_value = "hs256"
    )]
    pub algorithms: Vec<JwtAlg>,
    /// Runs (fresh instances); the report gives the medians.
    #[arg(
        id = "all_console_url_runs",
        long = "console-url-runs",
        default_value_t = 3
    )]
    pub runs: usize,
    /// Rounds per variant (bearer, JWT) in each run, alternating.
    #[arg(
        id = "all_console_url_rounds",
        long = "console-url-rounds",
        default_value_t = 2
    )]
    pub rounds: usize,
    /// Console opens per round, back to back.
    #[arg(
        id = "all_console_url_samples",
        long = "console-url-samples",
        default_value_t = 200
    )]
    pub samples: u64,
}

impl AllConsoleUrlArgs {
    pub fn opts(&self) -> ConsoleUrlOpts {
        ConsoleUrlOpts {
            console_url_algorithms: self.algorithms.clone(),
            console_url_runs: self.runs,
            console_url_rounds: self.rounds,
            console_url_samples: self.samples,
            console_url_io: "epoll".into(),
        }
    }
}

pub struct AllConfig {
    pub skip: Vec<Bench>,
    pub latency: LatencyConfig,
    pub throughput: ThroughputConfig,
    pub memory: MemoryConfig,
    pub handshakes: HandshakeConfig,
    pub session_start: SessionStartConfig,
    pub downstream_bulk: BulkConfig,
    pub webmks: WebmksConfig,
    pub events: EventsOpts,
    pub console_url: ConsoleUrlOpts,
    pub common: Common,
}

/// One target of the issue, checked against one proxy's figure.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub proxy: ProxyKind,
    pub value: Option<f64>,
    pub limit: f64,
    /// `value ≤ limit` (or `≥` for rates); `None` when not measured.
    pub met: Option<bool>,
    pub note: String,
}

#[derive(Debug, Serialize)]
pub struct AllReport {
    #[serde(flatten)]
    pub run: RunInfo,
    pub schema_version: u32,
    pub wall_s: f64,
    pub machine_at_end: Machine,
    pub tuning: Tuning,
    pub common: Common,
    pub targets: Vec<Target>,
    pub errors: Vec<String>,
    pub latency: Option<LatencyReport>,
    pub throughput: Option<ThroughputReport>,
    pub memory: Option<MemoryReport>,
    pub handshakes: Option<HandshakeReport>,
    /// Appliance mode only (consolegate variants); no websockify equivalent.
    pub session_start: Option<SessionStartReport>,
    /// Several bulk downstream sessions at once, CPU split by thread.
    pub downstream_bulk: Option<BulkReport>,
    /// Appliance mode: `webmks` vs `vnc` sessions (consolegate variants).
    pub webmks: Option<WebmksReport>,
    /// Appliance mode: one live event fanned out to N subscribers.
    pub events: Option<EventsReport>,
    /// Appliance mode: consoles opened by VM id in one URL.
    pub console_url: Option<ConsoleUrlReport>,
}

const CONSOLEGATES: [ProxyKind; 2] = [ProxyKind::ConsolegateEpoll, ProxyKind::ConsolegateUring];

fn check(value: Option<f64>, limit: f64, at_most: bool) -> Option<bool> {
    value.map(|v| if at_most { v <= limit } else { v >= limit })
}

/// The issue's targets, per consolegate variant.
pub fn targets(
    lat: Option<&LatencyReport>,
    tp: Option<&ThroughputReport>,
    mem: Option<&MemoryReport>,
    hs: Option<&HandshakeReport>,
) -> Vec<Target> {
    let mut out = Vec::new();
    for proxy in CONSOLEGATES {
        if let Some(l) = lat {
            for conc in [1usize, 4] {
                let find = |p: ProxyKind| {
                    l.median
                        .iter()
                        .find(|s| s.proxy == p && s.concurrency == conc)
                        .and_then(|s| s.added)
                };
                let (me, floor) = (find(proxy), find(ProxyKind::PlainRelay));
                let ratio = |f: fn(&crate::stats::Percentiles) -> f64| match (me, floor) {
                    (Some(a), Some(b)) => crate::stats::ratio(f(&a), f(&b)),
                    _ => None,
                };
                let note = match (me, floor) {
                    (Some(a), Some(b)) => format!(
                        "added p50 {} vs {} µs, p99 {} vs {} µs",
                        report::fmt_us(a.p50_us),
                        report::fmt_us(b.p50_us),
                        report::fmt_us(a.p99_us),
                        report::fmt_us(b.p99_us)
                    ),
                    _ => "not measured".into(),
                };
                let r50 = ratio(|p| p.p50_us);
                let r99 = ratio(|p| p.p99_us);
                out.push(Target {
                    target: format!("added p50 at {conc} session(s) ≤ 1.0× plain relay"),
                    proxy,
                    value: r50,
                    limit: 1.0,
                    met: check(r50, 1.0, true),
                    note: note.clone(),
                });
                out.push(Target {
                    target: format!("added p99 at {conc} session(s) ≤ 1.5× plain relay"),
                    proxy,
                    value: r99,
                    limit: 1.5,
                    met: check(r99, 1.5, true),
                    note,
                });
            }
        }
        if let Some(t) = tp {
            for (dir, limit) in [(Direction::Down, 0.5), (Direction::Up, 1.0)] {
                let v = t
                    .median
                    .iter()
                    .find(|s| s.proxy == proxy && s.direction == dir)
                    .and_then(|s| s.cpu_s_per_gb);
                out.push(Target {
                    target: format!("{} CPU-s per GB ≤ {limit}", dir.name()),
                    proxy,
                    value: v,
                    limit,
                    met: check(v, limit, true),
                    note: String::new(),
                });
            }
        }
        if let Some(m) = mem {
            let biggest = m
                .cells
                .iter()
                .filter(|c| c.proxy == proxy && c.ok)
                .max_by_key(|c| c.held);
            // "8 KB": kB of 1000 bytes.
            let v = biggest.and_then(|c| c.pss_per_session_kib.map(|k| k * 1.024));
            out.push(Target {
                target: "idle session ≤ 8 kB PSS".into(),
                proxy,
                value: v,
                limit: 8.0,
                met: check(v, 8.0, true),
                note: biggest.map_or(String::new(), |c| format!("at {} sessions", c.held)),
            });
            let c8 = m.cells.iter().find(|c| c.proxy == proxy && c.asked == 8000);
            let v = c8.map(|c| c.live as f64);
            out.push(Target {
                target: "8 000 idle sessions held, all live".into(),
                proxy,
                value: v,
                limit: 8000.0,
                met: check(v, 8000.0, false),
                note: c8.map_or("not measured".into(), |c| c.limited_by.clone()),
            });
        }
        if let Some(h) = hs {
            let s = h.median.iter().find(|s| s.proxy == proxy);
            let v = s.and_then(|s| s.per_proxy_cpu_s);
            out.push(Target {
                target: "≥ 20 000 handshakes/s per core (per proxy CPU-second)".into(),
                proxy,
                value: v,
                limit: 20_000.0,
                met: check(v, 20_000.0, false),
                note: s.map_or(String::new(), |s| {
                    format!(
                        "{:.0}/s wall with {} worker(s), client on the same 2 vCPUs",
                        s.per_s.unwrap_or(0.0),
                        s.workers
                    )
                }),
            });
        }
    }
    out
}

/// The event fan-out's targets: p99 ≤ 10 ms to 1 000 subscribers, and
/// ≤ 16 KiB per idle subscriber (at the largest count measured).
pub fn event_targets(r: &EventsReport) -> Vec<Target> {
    let proxy = ProxyKind::ConsolegateEpoll;
    let at_1000 = r.counts.iter().find(|c| c.subscribers == 1000);
    let p99_ms = at_1000
        .and_then(|c| c.median("p99_us"))
        .map(|us| us / 1000.0);
    let largest = r
        .counts
        .iter()
        .filter(|c| !c.runs.is_empty())
        .max_by_key(|c| c.subscribers);
    let kib = largest
        .and_then(|c| c.median("rss_bytes_per_subscriber"))
        .map(|b| b / 1024.0);
    vec![
        Target {
            target: "event into 1 000 subscribers' sockets: p99 ≤ 10 ms".into(),
            proxy,
            value: p99_ms,
            limit: 10.0,
            met: check(p99_ms, 10.0, true),
            note: at_1000.map_or("not measured".into(), |c| {
                format!(
                    "median of {} runs, kernel receive timestamps (read by the bench: p99 {:.1} ms)",
                    c.runs.len(),
                    c.median("read_p99_us").unwrap_or(f64::NAN) / 1000.0
                )
            }),
        },
        Target {
            target: "idle event subscriber ≤ 16 KiB RSS".into(),
            proxy,
            value: kib,
            limit: 16.0,
            met: check(kib, 16.0, true),
            note: largest.map_or(String::new(), |c| {
                format!("at {} subscribers", c.subscribers)
            }),
        },
    ]
}

/// The per-proxy headline figures with their ratios to websockify.
pub fn headline(r: &AllReport) -> String {
    let proxies = [
        ProxyKind::PlainRelay,
        ProxyKind::Websockify,
        ProxyKind::ConsolegateEpoll,
        ProxyKind::ConsolegateUring,
    ];
    let header = [
        "proxy",
        "+p50 µs c=1",
        "+p50 µs c=4",
        "+p99 µs c=4",
        "down CPU-s/GB",
        "up CPU-s/GB",
        "idle KiB/session",
        "live (largest N)",
        "handshakes/s",
        "per CPU-s",
    ];
    let mut rows = Vec::new();
    let x = |v: Option<f64>, r: Option<f64>, d: usize| match (v, r) {
        (Some(v), Some(r)) => format!("{v:.d$} ({}×)", report::fmt_ratio_fine(r)),
        (Some(v), None) => format!("{v:.d$}"),
        _ => "—".into(),
    };
    for p in proxies {
        let lat = |conc: usize| {
            r.latency.as_ref().and_then(|l| {
                l.median
                    .iter()
                    .find(|s| s.proxy == p && s.concurrency == conc)
                    .cloned()
            })
        };
        let lat_ratio = |conc: usize, f: fn(&crate::stats::Percentiles) -> f64| {
            let ws = lat_for(r, ProxyKind::Websockify, conc)?;
            let me = lat_for(r, p, conc)?;
            crate::stats::ratio(f(&me), f(&ws))
        };
        let (l1, l4) = (lat(1), lat(4));
        let tp = |d: Direction| {
            r.throughput.as_ref().and_then(|t| {
                t.median
                    .iter()
                    .find(|s| s.proxy == p && s.direction == d)
                    .cloned()
            })
        };
        let (down, up) = (tp(Direction::Down), tp(Direction::Up));
        let mem = r.memory.as_ref().and_then(|m| {
            m.cells
                .iter()
                .filter(|c| c.proxy == p && c.ok)
                .max_by_key(|c| c.requested)
                .cloned()
        });
        let hs = r
            .handshakes
            .as_ref()
            .and_then(|h| h.median.iter().find(|s| s.proxy == p).cloned());
        if l1.is_none() && down.is_none() && mem.is_none() && hs.is_none() {
            continue;
        }
        rows.push(vec![
            p.name().to_string(),
            x(
                l1.as_ref().and_then(|s| s.added.map(|a| a.p50_us)),
                lat_ratio(1, |q| q.p50_us),
                0,
            ),
            x(
                l4.as_ref().and_then(|s| s.added.map(|a| a.p50_us)),
                lat_ratio(4, |q| q.p50_us),
                0,
            ),
            x(
                l4.as_ref().and_then(|s| s.added.map(|a| a.p99_us)),
                lat_ratio(4, |q| q.p99_us),
                0,
            ),
            x(
                down.as_ref().and_then(|s| s.cpu_s_per_gb),
                down.as_ref().and_then(|s| s.cpu_s_per_gb_vs_websockify),
                3,
            ),
            x(
                up.as_ref().and_then(|s| s.cpu_s_per_gb),
                up.as_ref().and_then(|s| s.cpu_s_per_gb_vs_websockify),
                3,
            ),
            x(
                mem.as_ref().and_then(|c| c.pss_per_session_kib),
                mem.as_ref().and_then(|c| c.pss_vs_websockify),
                1,
            ),
            mem.as_ref()
                .map_or("—".into(), |c| format!("{}/{}", c.live, c.requested)),
            x(
                hs.as_ref().and_then(|s| s.per_s),
                hs.as_ref().and_then(|s| s.per_s_vs_websockify),
                0,
            ),
            x(
                hs.as_ref().and_then(|s| s.per_proxy_cpu_s),
                hs.as_ref().and_then(|s| s.per_proxy_cpu_s_vs_websockify),
                0,
            ),
        ]);
    }
    report::markdown_table(&header, &rows)
}

fn lat_for(r: &AllReport, p: ProxyKind, conc: usize) -> Option<crate::stats::Percentiles> {
    r.latency
        .as_ref()?
        .median
        .iter()
        .find(|s| s.proxy == p && s.concurrency == conc)?
        .added
}

pub fn render_markdown(r: &AllReport) -> String {
    let mut out = String::new();
    let m = &r.run.machine;
    let _ = writeln!(out, "# consolegate benchmark report\n");
    let _ = writeln!(
        out,
        "Machine: {}  \nLoad at start: loadavg {}, CPU pressure (some, avg60) {}; at end: loadavg {}  \n\
         Wall time: {:.0} s{}\n",
        m.one_line(),
        m.loadavg_at_start,
        m.cpu_pressure_some_avg60_at_start
            .map_or("n/a".into(), |p| format!("{p:.1}%")),
        r.machine_at_end.loadavg_at_start,
        r.wall_s,
        if r.run.interrupted { " (interrupted: partial)" } else { "" }
    );
    if !r.common.meta.is_empty() {
        let meta: Vec<String> = r
            .common
            .meta
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "Versions: {}\n", meta.join(", "));
    }
    if !r.common.consolegate_args.is_empty() {
        let _ = writeln!(
            out,
            "consolegate extra arguments: `{}`\n",
            r.common.consolegate_args.join(" ")
        );
    }
    let _ = writeln!(out, "## Summary (ratio to websockify in parentheses)\n");
    out.push_str(&headline(r));
    let _ = writeln!(
        out,
        "\n+pXX: latency added over direct TCP (10-byte messages, median of runs). \
         CPU-s/GB: proxy process-tree CPU seconds per 10^9 payload bytes. \
         Idle KiB/session: PSS at the largest session count measured.\n"
    );
    if !r.targets.is_empty() {
        let _ = writeln!(out, "## Targets\n");
        let rows: Vec<Vec<String>> = r
            .targets
            .iter()
            .map(|t| {
                vec![
                    t.proxy.name().to_string(),
                    t.target.clone(),
                    t.value.map_or("—".into(), |v| {
                        if v.abs() >= 100.0 {
                            format!("{v:.0}")
                        } else {
                            format!("{v:.2}")
                        }
                    }),
                    match t.met {
                        Some(true) => "met".into(),
                        Some(false) => "MISSED".into(),
                        None => "n/a".into(),
                    },
                    t.note.clone(),
                ]
            })
            .collect();
        out.push_str(&report::markdown_table_with(
            &["proxy", "target", "value", "", "note"],
            &rows,
            &[0, 1, 3, 4],
        ));
        out.push('\n');
    }
    let _ = writeln!(out, "## Host limits\n\n```\n{}```\n", r.tuning.render());
    if let Some(l) = &r.latency {
        let _ = writeln!(out, "## Latency\n\n![latency percentiles](latency.svg)\n");
        out.push_str(&latency::render_text(l));
        out.push('\n');
    }
    if let Some(t) = &r.throughput {
        let _ = writeln!(out, "## Throughput\n");
        out.push_str(&throughput::render_text(t));
        out.push('\n');
    }
    if let Some(m) = &r.memory {
        let _ = writeln!(out, "## Idle sessions\n");
        out.push_str(&memory::render_text(m));
        out.push('\n');
    }
    if let Some(h) = &r.handshakes {
        let _ = writeln!(out, "## Handshakes\n");
        out.push_str(&handshakes::render_text(h));
        out.push('\n');
    }
    if let Some(s) = &r.session_start {
        let _ = writeln!(out, "## Session start (appliance)\n");
        out.push_str(&session_start::render_text(s));
        out.push('\n');
    }
    if let Some(b) = &r.downstream_bulk {
        let _ = writeln!(
            out,
            "## Downstream bulk (several sessions, CPU by thread)\n"
        );
        out.push_str(&downstream_bulk::render_text(b));
        out.push('\n');
    }
    if let Some(w) = &r.webmks {
        let _ = writeln!(out, "## WebMKS relay (appliance)\n");
        out.push_str(&crate::webmks_report::render_text(w));
        out.push('\n');
    }
    if let Some(e) = &r.events {
        let _ = writeln!(out, "## Event fan-out (appliance, /ws/monitor)\n");
        out.push_str(&events::render_text(e));
        out.push('\n');
    }
    if let Some(c) = &r.console_url {
        let _ = writeln!(out, "## Console by VM id (appliance, /ws/console/{{vm}})\n");
        out.push_str(&console_url::render_text(c));
        out.push('\n');
    }
    if !r.errors.is_empty() {
        let _ = writeln!(out, "## Errors\n");
        for e in &r.errors {
            let _ = writeln!(out, "- {e}");
        }
    }
    out
}

pub fn run(cfg: AllConfig, tuning: Tuning, stop: Arc<AtomicBool>) -> Result<AllReport> {
    let started = unix_now();
    let t0 = std::time::Instant::now();
    let machine = Machine::describe();
    std::fs::create_dir_all(&cfg.common.out_dir)?;
    let mut errors = Vec::new();
    let on = |b: Bench| !cfg.skip.contains(&b) && !stop.load(Ordering::SeqCst);
    let mut note = |name: &str, e: anyhow::Error| {
        eprintln!("all: {name} failed: {e:#}");
        errors.push(format!("{name}: {e:#}"));
    };
    let latency = if on(Bench::Latency) {
        eprintln!("== latency");
        latency::run(cfg.latency, stop.clone())
            .map_err(|e| note("latency", e))
            .ok()
    } else {
        None
    };
    let throughput = if on(Bench::Throughput) {
        eprintln!("== throughput");
        throughput::run(cfg.throughput, stop.clone())
            .map_err(|e| note("throughput", e))
            .ok()
    } else {
        None
    };
    let memory = if on(Bench::Memory) {
        eprintln!("== memory");
        memory::run(cfg.memory, tuning.capacity.clone(), stop.clone())
            .map_err(|e| note("memory", e))
            .ok()
    } else {
        None
    };
    let handshakes = if on(Bench::Handshakes) {
        eprintln!("== handshakes");
        handshakes::run(cfg.handshakes, stop.clone())
            .map_err(|e| note("handshakes", e))
            .ok()
    } else {
        None
    };
    // Only the appliance has sessions to create: without a consolegate
    // variant there is nothing to measure (not an error).
    let session_start = if on(Bench::SessionStart)
        && !session_start::consolegate_variants(&cfg.session_start.proxies).is_empty()
    {
        eprintln!("== session-start");
        session_start::run(cfg.session_start, stop.clone())
            .map_err(|e| note("session-start", e))
            .ok()
    } else {
        None
    };
    let downstream_bulk = if on(Bench::DownstreamBulk) && !cfg.downstream_bulk.proxies.is_empty() {
        eprintln!("== downstream-bulk");
        downstream_bulk::run(cfg.downstream_bulk, stop.clone())
            .map_err(|e| note("downstream-bulk", e))
            .ok()
    } else {
        None
    };
    let webmks = if on(Bench::Webmks) && !cfg.webmks.proxies.is_empty() {
        eprintln!("== webmks");
        webmks::run(cfg.webmks, stop.clone())
            .map_err(|e| note("webmks", e))
            .ok()
    } else {
        None
    };
    let events = if on(Bench::Events) {
        eprintln!("== events");
        events::measure_all(&cfg.common, &cfg.events, stop.clone())
            .map_err(|e| note("events", e))
            .ok()
    } else {
        None
    };
    let console_url = if on(Bench::ConsoleUrl) {
        eprintln!("== console-url");
        console_url::run(&cfg.common, &cfg.console_url, stop.clone())
            .map_err(|e| note("console-url", e))
            .ok()
    } else {
        None
    };
    let mut targets = targets(
        latency.as_ref(),
        throughput.as_ref(),
        memory.as_ref(),
        handshakes.as_ref(),
    );
    targets.extend(webmks.iter().flat_map(|w| w.targets.iter().cloned()));
    targets.extend(events.iter().flat_map(event_targets));
    let report = AllReport {
        run: RunInfo::ended("all", started, &stop, machine),
        schema_version: 1,
        wall_s: t0.elapsed().as_secs_f64(),
        machine_at_end: Machine::describe(),
        tuning,
        common: cfg.common,
        targets,
        errors,
        latency,
        throughput,
        memory,
        handshakes,
        session_start,
        downstream_bulk,
        webmks,
        events,
        console_url,
    };
    let md = render_markdown(&report);
    let dir = &report.common.out_dir;
    std::fs::write(dir.join("report.md"), &md)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    eprintln!("\n{}", headline(&report));
    eprintln!("report: {}", dir.join("report.md").display());
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(subscribers: usize, p99_us: f64, rss_bytes: f64) -> events::RunFigures {
        events::RunFigures {
            subscribers,
            rounds: 20,
            p50_us: p99_us / 2.0,
            p99_us,
            max_us: p99_us,
            read_p50_us: p99_us,
            read_p99_us: 2.0 * p99_us,
            cpu_ms_per_event: 1.0,
            cpu_ms_per_trigger_alone: 0.1,
            rss_kib_before: 0,
            rss_kib_after: 0,
            rss_bytes_per_subscriber: rss_bytes,
            load_average_1m: None,
        }
    }

    #[test]
    fn event_targets_take_the_medians() {
        let r = EventsReport {
            counts: vec![
                events::CountFigures {
                    subscribers: 1000,
                    runs: vec![
                        run(1000, 8_000.0, 12_000.0),
                        run(1000, 12_000.0, 12_000.0),
                        run(1000, 9_000.0, 12_000.0),
                    ],
                },
                events::CountFigures {
                    subscribers: 10_000,
                    runs: vec![run(10_000, 90_000.0, 20_000.0)],
                },
            ],
        };
        let t = event_targets(&r);
        assert_eq!((t[0].value, t[0].met), (Some(9.0), Some(true)));
        let kib = 20_000.0 / 1024.0;
        assert_eq!((t[1].value, t[1].met), (Some(kib), Some(false)));
        let none = event_targets(&EventsReport { counts: vec![] });
        assert_eq!((none[0].met, none[1].met), (None, None));
    }

    #[test]
    fn check_directions() {
        assert_eq!(check(Some(0.4), 0.5, true), Some(true));
        assert_eq!(check(Some(0.6), 0.5, true), Some(false));
        assert_eq!(check(Some(25_000.0), 20_000.0, false), Some(true));
        assert_eq!(check(None, 1.0, true), None);
    }
}
