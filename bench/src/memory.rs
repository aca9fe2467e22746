//! The memory benchmark: what an idle session costs a proxy, and how many
//! idle sessions it holds.
//!
//! Per proxy and session count N: a silent backend (`sink-server`, a child
//! process, so its sockets count against its own open-file limit) and a
//! fresh proxy in front of it; the proxy's process-tree PSS is read once it
//! has settled with 0 sessions (the baseline); N WebSocket sessions are
//! opened by one event-driven client (mio) and held silent; once every
//! handshake is done and the tree's PSS and process count have stopped
//! moving, PSS is read again. Per session = (PSS − baseline) ÷ sessions
//! held at that moment. Then every held session sends a small frame and
//! must get it back from the backend through the proxy: `live / N`.
//!
//! PSS (proportional set size) splits shared pages among the processes
//! sharing them, so websockify's forked children are not charged for the
//! interpreter pages they share. Kernel socket memory is not in PSS; the
//! machine-wide TCP page count is reported beside it.
//!
//! Every phase is bounded in time (opening also stops when no handshake
//! completes for `--memory-stall-ms`), so a proxy that stops accepting
//! (websockify around 500 sessions) ends its run instead of hanging it.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::common::{unix_now, Common};
use crate::evclient::{IdleClient, OpenStats, ProbeStats, Reasons};
use crate::procfs::{self, SockStat, TreeMemory};
use crate::proxy::{self, ProxyKind, RunningProxy};
use crate::report::RunInfo;
use crate::report::{self, Machine};
use crate::tuning::Capacity;

/// A session count: a number, or `max` (the most this host's limits allow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SessionCount {
    N(usize),
    Max,
}

impl FromStr for SessionCount {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "max" => Ok(SessionCount::Max),
            v => v
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .map(SessionCount::N)
                .ok_or_else(|| format!("{s:?}: expected a positive number or `max`")),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryConfig {
    pub proxies: Vec<ProxyKind>,
    pub sessions: Vec<SessionCount>,
    /// websockify forks a process per session: it is run at most at this N.
    pub websockify_max_sessions: usize,
    /// Handshakes in flight while opening.
    pub connect_concurrency: usize,
    pub open_timeout_ms: u64,
    /// Opening stops when no handshake completes for this long.
    pub stall_ms: u64,
    /// Minimum hold between the last handshake and the measurement.
    pub hold_ms: u64,
    pub settle_timeout_ms: u64,
    pub probe_timeout_ms: u64,
    pub common: Common,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub proxy: ProxyKind,
    /// What was asked (`max` resolved).
    pub asked: usize,
    /// What was attempted after caps (host capacity, websockify's cap).
    pub requested: usize,
    pub cap_note: Option<String>,
    pub ok: bool,
    pub error: Option<String>,
    pub open: Option<OpenStats>,
    /// Sessions open when memory was read.
    pub held: usize,
    pub probe: Option<ProbeStats>,
    pub live: usize,
    pub baseline: Option<TreeMemory>,
    pub loaded: Option<TreeMemory>,
    /// (PSS − baseline PSS) ÷ held sessions, KiB.
    pub pss_per_session_kib: Option<f64>,
    pub rss_per_session_kib: Option<f64>,
    /// Machine-wide TCP socket buffer memory (all parties) ÷ held sessions, KiB.
    pub tcp_kernel_kib_per_session: Option<f64>,
    /// Machine-wide kernel slab growth ÷ held sessions, KiB: the kernel side
    /// of a session's 4 sockets here (client, proxy ×2, backend), plus
    /// whatever else the machine allocated meanwhile.
    pub slab_kib_per_session: Option<f64>,
    pub sockstat_before: SockStat,
    pub sockstat_loaded: SockStat,
    /// How long the tree took to settle after the last handshake.
    pub settle_s: f64,
    /// Whether it settled before the settle timeout.
    pub settled: bool,
    /// Bytes proxies sent to idle sessions (keepalives).
    pub unexpected_bytes: u64,
    /// Per-session PSS ÷ websockify's (at its largest measured N).
    pub pss_vs_websockify: Option<f64>,
    /// What stopped this cell short of `asked` live sessions.
    pub limited_by: String,
}

#[derive(Debug, Serialize)]
pub struct MemoryReport {
    #[serde(flatten)]
    pub run: RunInfo,
    pub capacity: Capacity,
    pub config: MemoryConfig,
    pub cells: Vec<Cell>,
}

/// Samples the tree's memory until two consecutive samples agree (PSS
/// within 0.5 % or 64 KiB, same process count), pumping client events in
/// between; bounded by `timeout`. Returns the last sample, whether it
/// settled, and the time taken.
fn settle(
    pid: u32,
    mut client: Option<&mut IdleClient>,
    min_wait: Duration,
    timeout: Duration,
) -> (TreeMemory, bool, f64) {
    let start = Instant::now();
    let step = Duration::from_millis(250);
    if let Some(c) = client.as_deref_mut() {
        let _ = c.pump(min_wait);
    } else {
        std::thread::sleep(min_wait);
    }
    let mut last = procfs::tree_memory(pid);
    let mut stable = 0;
    while start.elapsed() < timeout {
        if let Some(c) = client.as_deref_mut() {
            let _ = c.pump(step);
        } else {
            std::thread::sleep(step);
        }
        let now = procfs::tree_memory(pid);
        let tol = (last.pss_kib / 200).max(64);
        if now.processes == last.processes && now.pss_kib.abs_diff(last.pss_kib) <= tol {
            stable += 1;
        } else {
            stable = 0;
        }
        last = now;
        if stable >= 2 {
            return (last, true, start.elapsed().as_secs_f64());
        }
    }
    (last, false, start.elapsed().as_secs_f64())
}

fn top_reasons(r: &Reasons) -> String {
    let mut v: Vec<(&String, &u64)> = r.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter()
        .take(3)
        .map(|(k, n)| format!("{n}× {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves `max` and applies the host capacity and websockify's cap.
pub fn plan(
    kind: ProxyKind,
    asked: SessionCount,
    capacity: &Capacity,
    websockify_max: usize,
) -> (usize, usize, Option<String>) {
    let host_max = capacity.max_sessions.map(|m| m as usize);
    let asked_n = match asked {
        SessionCount::N(n) => n,
        SessionCount::Max => host_max.unwrap_or(10_000),
    };
    let mut requested = asked_n;
    let mut note = (asked == SessionCount::Max && host_max.is_some())
        .then(|| format!("max for this host: {}", capacity.limited_by));
    if let Some(m) = host_max {
        if requested > m {
            requested = m;
            note = Some(format!("capped at {m}: {}", capacity.limited_by));
        }
    }
    if kind == ProxyKind::Websockify && requested > websockify_max {
        requested = websockify_max;
        note = Some(format!(
            "capped at {websockify_max} (--websockify-max-sessions): websockify forks a process per session"
        ));
    }
    (asked_n, requested, note)
}

fn measure(
    running: &mut RunningProxy,
    requested: usize,
    cfg: &MemoryConfig,
    stop: &AtomicBool,
    cell: &mut Cell,
) -> Result<()> {
    let Some(pid) = running.pid() else {
        bail!("no proxy process to measure");
    };
    let settle_timeout = Duration::from_millis(cfg.settle_timeout_ms);
    let (baseline, _, _) = settle(pid, None, Duration::from_millis(300), settle_timeout);
    cell.baseline = Some(baseline);
    cell.sockstat_before = procfs::sockstat();
    let slab0 = procfs::slab_kib();

    let mut client = IdleClient::new(running.addr, &running.transport)?;
    let open = client.open(
        requested,
        cfg.connect_concurrency,
        Duration::from_millis(cfg.open_timeout_ms),
        Duration::from_millis(cfg.stall_ms),
        stop,
    )?;
    eprintln!(
        "memory: {} N={requested}: {} established, {} failed in {:.1} s{}{}",
        running.kind,
        open.established,
        open.failed,
        open.elapsed_s,
        if open.stalled { " (stalled)" } else { "" },
        if open.failed > 0 {
            format!(": {}", top_reasons(&open.reasons))
        } else {
            String::new()
        }
    );
    cell.open = Some(open);
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    let (loaded, settled, settle_s) = settle(
        pid,
        Some(&mut client),
        Duration::from_millis(cfg.hold_ms),
        settle_timeout,
    );
    cell.held = client.idle_count();
    cell.loaded = Some(loaded);
    cell.settled = settled;
    cell.settle_s = settle_s;
    cell.sockstat_loaded = procfs::sockstat();
    cell.unexpected_bytes = client.unexpected_bytes;
    if cell.held > 0 {
        let h = cell.held as f64;
        cell.pss_per_session_kib = Some((loaded.pss_kib as f64 - baseline.pss_kib as f64) / h);
        cell.rss_per_session_kib = Some((loaded.rss_kib as f64 - baseline.rss_kib as f64) / h);
        let pages =
            cell.sockstat_loaded.tcp_mem_pages as f64 - cell.sockstat_before.tcp_mem_pages as f64;
        cell.tcp_kernel_kib_per_session = Some(pages * 4.0 / h);
        if let (Some(a), Some(b)) = (slab0, procfs::slab_kib()) {
            cell.slab_kib_per_session = Some((b as f64 - a as f64) / h);
        }
    }
    let probe = client.probe(
        cfg.connect_concurrency.max(1) * 4,
        Duration::from_millis(cfg.probe_timeout_ms),
    )?;
    cell.live = probe.live;
    eprintln!(
        "memory: {} N={requested}: held {}, PSS {:.1} KiB/session (settled: {settled}, {:.1} s), live {}/{}{}",
        running.kind,
        cell.held,
        cell.pss_per_session_kib.unwrap_or(f64::NAN),
        settle_s,
        probe.live,
        requested,
        if probe.reasons.is_empty() {
            String::new()
        } else {
            format!(" (lost: {})", top_reasons(&probe.reasons))
        }
    );
    cell.probe = Some(probe);
    drop(client);
    Ok(())
}

fn limited_by(c: &Cell) -> String {
    let mut why = Vec::new();
    if let Some(n) = &c.cap_note {
        why.push(n.clone());
    }
    if let Some(o) = &c.open {
        if o.established < c.requested {
            let how = if o.stalled {
                " (no handshake completed for the stall timeout)"
            } else if o.timed_out {
                " (open timeout)"
            } else {
                ""
            };
            why.push(format!(
                "the proxy completed {} of {} handshakes{how}: {}",
                o.established,
                c.requested,
                top_reasons(&o.reasons)
            ));
        }
    }
    if let Some(p) = &c.probe {
        let lost = c
            .open
            .as_ref()
            .map_or(0, |o| o.established)
            .saturating_sub(p.live);
        if lost > 0 {
            why.push(format!(
                "{lost} opened sessions not live: {}",
                top_reasons(&p.reasons)
            ));
        }
    }
    if let Some(e) = &c.error {
        why.push(e.clone());
    }
    if why.is_empty() {
        "nothing: all live".into()
    } else {
        why.join("; ")
    }
}

pub fn run(cfg: MemoryConfig, capacity: Capacity, stop: Arc<AtomicBool>) -> Result<MemoryReport> {
    if cfg.sessions.is_empty() {
        bail!("--memory-sessions is empty");
    }
    let started = unix_now();
    let machine = Machine::describe();
    std::fs::create_dir_all(&cfg.common.out_dir)?;
    let proxies = crate::common::proxies_under_test(&cfg.proxies);
    let mut cells = Vec::new();
    'outer: for &kind in &proxies {
        let mut done_for_kind: Vec<usize> = Vec::new();
        for &asked in &cfg.sessions {
            if stop.load(Ordering::SeqCst) {
                break 'outer;
            }
            let (asked_n, requested, cap_note) =
                plan(kind, asked, &capacity, cfg.websockify_max_sessions);
            // websockify capped to the same N twice is one measurement.
            if done_for_kind.contains(&requested) {
                continue;
            }
            done_for_kind.push(requested);
            let mut cell = Cell {
                proxy: kind,
                asked: asked_n,
                requested,
                cap_note,
                ok: false,
                error: None,
                open: None,
                held: 0,
                probe: None,
                live: 0,
                baseline: None,
                loaded: None,
                pss_per_session_kib: None,
                rss_per_session_kib: None,
                tcp_kernel_kib_per_session: None,
                slab_kib_per_session: None,
                sockstat_before: SockStat::default(),
                sockstat_loaded: SockStat::default(),
                settle_s: 0.0,
                settled: false,
                unexpected_bytes: 0,
                pss_vs_websockify: None,
                limited_by: String::new(),
            };
            let tag = format!("memory-{requested}");
            let log = cfg
                .common
                .out_dir
                .join("logs")
                .join(format!("sink-{}-{tag}.log", kind.name()));
            let startup = Duration::from_millis(cfg.common.startup_timeout_ms);
            let result = (|| -> Result<()> {
                let (mut sink, sink_addr) = proxy::spawn_bench_server(
                    &cfg.common.bench_exe,
                    "sink-server",
                    &["sink-server".to_string()],
                    &log,
                    startup,
                )?;
                let env = cfg.common.env(sink_addr);
                let mut running = proxy::start(kind, &env, &tag)?;
                let r = measure(&mut running, requested, &cfg, &stop, &mut cell);
                let exited = running.has_exited();
                let tail = running.log_tail();
                running.stop();
                sink.stop();
                match r {
                    Err(e) if exited => Err(e.context(format!("proxy exited: {tail}"))),
                    other => other,
                }
            })();
            if let Err(e) = result {
                eprintln!("memory: {kind} N={requested}: failed: {e:#}");
                cell.error = Some(format!("{e:#}"));
            }
            cell.ok = cell.error.is_none() && cell.pss_per_session_kib.is_some();
            cell.limited_by = limited_by(&cell);
            cells.push(cell);
        }
    }
    fill_ratios(&mut cells);
    let report = MemoryReport {
        run: RunInfo::ended("memory", started, &stop, machine),
        capacity,
        config: cfg,
        cells,
    };
    let text = render_text(&report);
    crate::common::write_report(&report.config.common.out_dir, "memory", &text, &report)?;
    Ok(report)
}

/// Per-session PSS ÷ websockify's at its largest measured session count.
pub fn fill_ratios(cells: &mut [Cell]) {
    let reference = cells
        .iter()
        .filter(|c| c.proxy == ProxyKind::Websockify && c.ok)
        .max_by_key(|c| c.held)
        .and_then(|c| c.pss_per_session_kib);
    for c in cells.iter_mut() {
        c.pss_vs_websockify = match (c.pss_per_session_kib, reference) {
            (Some(v), Some(r)) => crate::stats::ratio(v, r),
            _ => None,
        };
    }
}

pub fn render_text(r: &MemoryReport) -> String {
    let mut out = String::from(
        "Idle sessions: memory per session (proxy process tree PSS − PSS with 0 sessions, \
         ÷ sessions held) and how many stayed live (a frame echoed through the proxy by the backend).\n\n",
    );
    let header = [
        "proxy",
        "asked",
        "tried",
        "opened",
        "live",
        "PSS KiB/session",
        "÷ websockify",
        "RSS KiB/session",
        "kernel slab KiB/session",
        "procs",
        "fds",
        "open s",
        "limited by",
    ];
    let rows: Vec<Vec<String>> = r
        .cells
        .iter()
        .map(|c| {
            let f = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.1}"));
            vec![
                c.proxy.name().to_string(),
                c.asked.to_string(),
                c.requested.to_string(),
                c.open
                    .as_ref()
                    .map_or("—".into(), |o| o.established.to_string()),
                format!("{}/{}", c.live, c.requested),
                f(c.pss_per_session_kib),
                c.pss_vs_websockify
                    .map_or("—".into(), report::fmt_ratio_fine),
                f(c.rss_per_session_kib),
                f(c.slab_kib_per_session),
                c.loaded.map_or("—".into(), |m| m.processes.to_string()),
                c.loaded.map_or("—".into(), |m| m.fds.to_string()),
                c.open
                    .as_ref()
                    .map_or("—".into(), |o| format!("{:.1}", o.elapsed_s)),
                c.limited_by.clone(),
            ]
        })
        .collect();
    out.push_str(&report::markdown_table_with(&header, &rows, &[0, 12]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(max: Option<u64>) -> Capacity {
        Capacity {
            by_proxy_fds: max,
            by_client_fds: None,
            by_backend_fds: None,
            by_ephemeral_ports: None,
            by_pid_max: None,
            max_sessions: max,
            limited_by: "the proxy's open-file limit".into(),
        }
    }

    #[test]
    fn session_counts_parse() {
        assert_eq!("1000".parse::<SessionCount>(), Ok(SessionCount::N(1000)));
        assert_eq!("max".parse::<SessionCount>(), Ok(SessionCount::Max));
        assert!("0".parse::<SessionCount>().is_err());
        assert!("lots".parse::<SessionCount>().is_err());
    }

    #[test]
    fn plan_caps_by_host_and_by_websockify() {
        let c = cap(Some(9968));
        assert_eq!(
            plan(ProxyKind::ConsolegateUring, SessionCount::N(8000), &c, 1000),
            (8000, 8000, None)
        );
        let (a, r, note) = plan(
            ProxyKind::ConsolegateUring,
            SessionCount::N(20_000),
            &c,
            1000,
        );
        assert_eq!((a, r), (20_000, 9968));
        assert!(note.unwrap().contains("open-file"));
        let (_, r, note) = plan(ProxyKind::ConsolegateEpoll, SessionCount::Max, &c, 1000);
        assert_eq!(r, 9968);
        assert!(note.unwrap().starts_with("max for this host"));
        let (a, r, note) = plan(ProxyKind::Websockify, SessionCount::N(8000), &c, 1000);
        assert_eq!((a, r), (8000, 1000));
        assert!(note.unwrap().contains("websockify"));
    }

    #[test]
    fn ratio_uses_websockify_at_its_largest_n() {
        let mk = |proxy, held, pss: f64| Cell {
            proxy,
            asked: held,
            requested: held,
            cap_note: None,
            ok: true,
            error: None,
            open: None,
            held,
            probe: None,
            live: held,
            baseline: None,
            loaded: None,
            pss_per_session_kib: Some(pss),
            rss_per_session_kib: None,
            tcp_kernel_kib_per_session: None,
            slab_kib_per_session: None,
            sockstat_before: SockStat::default(),
            sockstat_loaded: SockStat::default(),
            settle_s: 0.0,
            settled: true,
            unexpected_bytes: 0,
            pss_vs_websockify: None,
            limited_by: String::new(),
        };
        let mut cells = vec![
            mk(ProxyKind::Websockify, 100, 3000.0),
            mk(ProxyKind::Websockify, 500, 3400.0),
            mk(ProxyKind::ConsolegateUring, 8000, 6.8),
        ];
        fill_ratios(&mut cells);
        assert_eq!(cells[2].pss_vs_websockify, Some(0.002));
        assert_eq!(cells[1].pss_vs_websockify, Some(1.0));
        assert_eq!(limited_by(&cells[2]), "nothing: all live");
    }
}
