//! The latency benchmark: direct TCP and each proxy under test, one after the
//! other, in front of one echo backend, running the closed-loop ping-pong
//! workload at each concurrency; repeated `runs` times, reported as the median
//! of each figure across runs, with every run's figures kept in the JSON.
//!
//! This module wires proxies, workload and reporters together; it does no
//! measuring or formatting of its own.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::common::{unix_now, Common};
use crate::echo;
use crate::proxy::{self, ProxyKind};
use crate::report::RunInfo;
use crate::report::{self, Machine, Row};
use crate::stats::{self, Percentiles};
use crate::svg;
use crate::workload::{self, PingPongConfig};

/// Most concurrent sessions one measurement may open (threads and sockets on
/// a small machine).
pub const MAX_CONCURRENCY: usize = 2000;
/// Most repetitions of the whole comparison.
pub const MAX_RUNS: usize = 50;

#[derive(Debug, Clone, Serialize)]
pub struct LatencyConfig {
    pub proxies: Vec<ProxyKind>,
    pub concurrency: Vec<usize>,
    pub runs: usize,
    pub message_bytes: usize,
    pub warmup_round_trips: u64,
    pub round_trips: u64,
    pub time_limit_ms: u64,
    pub common: Common,
}

/// One proxy × concurrency measurement in one run.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub proxy: ProxyKind,
    pub concurrency: usize,
    pub ok: bool,
    pub error: Option<String>,
    pub round_trips: u64,
    pub measured_s: f64,
    pub round_trips_per_s: Option<f64>,
    /// Some session hit the time limit before its round-trip count.
    pub time_limited: bool,
    pub mean_us: Option<f64>,
    pub latency: Option<Percentiles>,
    /// Proxied − direct-TCP at the same concurrency in the same run.
    pub added: Option<Percentiles>,
    pub added_p50_vs_websockify: Option<f64>,
    pub added_p50_vs_plain_relay: Option<f64>,
    /// Percentile distribution file, relative to the output directory.
    pub hgrm: Option<String>,
}

impl Cell {
    fn failed(proxy: ProxyKind, concurrency: usize, error: String) -> Cell {
        Cell {
            proxy,
            concurrency,
            ok: false,
            error: Some(error),
            round_trips: 0,
            measured_s: 0.0,
            round_trips_per_s: None,
            time_limited: false,
            mean_us: None,
            latency: None,
            added: None,
            added_p50_vs_websockify: None,
            added_p50_vs_plain_relay: None,
            hgrm: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxyStart {
    pub proxy: ProxyKind,
    pub addr: Option<String>,
    pub command: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub run: usize,
    pub proxies: Vec<ProxyStart>,
    pub cells: Vec<Cell>,
}

/// Median across runs of one proxy × concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub proxy: ProxyKind,
    pub concurrency: usize,
    pub runs: usize,
    pub runs_ok: usize,
    pub latency: Option<Percentiles>,
    pub added: Option<Percentiles>,
    pub added_p50_vs_websockify: Option<f64>,
    pub added_p50_vs_plain_relay: Option<f64>,
    pub round_trips_per_s: Option<f64>,
    /// Distinct errors of the failed runs.
    pub errors: Vec<String>,
    /// All runs' round trips merged, relative to the output directory.
    pub hgrm_all_runs: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub run: RunInfo,
    pub schema_version: u32,
    pub config: LatencyConfig,
    pub histogram_unit: &'static str,
    /// Median of each figure across runs (figures of failed runs left out).
    pub median: Vec<Summary>,
    pub runs: Vec<Run>,
    /// The percentile plot, relative to the output directory.
    pub plot: Option<String>,
}

/// Fills `added` and the ratios of every cell of one run from the direct-TCP,
/// websockify and plain-relay cells at the same concurrency.
pub fn fill_added(cells: &mut [Cell]) {
    let find = |cells: &[Cell], kind: ProxyKind, conc: usize| {
        cells
            .iter()
            .find(|c| c.proxy == kind && c.concurrency == conc)
            .and_then(|c| c.latency)
    };
    let snapshot = cells.to_vec();
    for c in cells.iter_mut() {
        let (Some(lat), Some(base)) =
            (c.latency, find(&snapshot, ProxyKind::Direct, c.concurrency))
        else {
            continue;
        };
        if c.proxy == ProxyKind::Direct {
            continue;
        }
        let added = lat.minus(base);
        c.added = Some(added);
        let added_p50_of =
            |kind| find(&snapshot, kind, c.concurrency).map(|l| l.minus(base).p50_us);
        c.added_p50_vs_websockify =
            added_p50_of(ProxyKind::Websockify).and_then(|r| stats::ratio(added.p50_us, r));
        c.added_p50_vs_plain_relay =
            added_p50_of(ProxyKind::PlainRelay).and_then(|r| stats::ratio(added.p50_us, r));
    }
}

/// The median of each figure across runs, per proxy × concurrency, in the
/// order given. Ratios and added latencies are medians of the per-run values
/// (each computed within one run), not recomputed from medians.
pub fn summarize(runs: &[Run], proxies: &[ProxyKind], concurrency: &[usize]) -> Vec<Summary> {
    let mut out = Vec::new();
    for &proxy in proxies {
        for &conc in concurrency {
            let cells: Vec<&Cell> = runs
                .iter()
                .flat_map(|r| r.cells.iter())
                .filter(|c| c.proxy == proxy && c.concurrency == conc)
                .collect();
            let ok: Vec<&&Cell> = cells.iter().filter(|c| c.ok).collect();
            let lat: Vec<Percentiles> = ok.iter().filter_map(|c| c.latency).collect();
            let added: Vec<Percentiles> = ok.iter().filter_map(|c| c.added).collect();
            let col = |f: fn(&Cell) -> Option<f64>| {
                stats::median(&ok.iter().filter_map(|c| f(c)).collect::<Vec<_>>())
            };
            let mut errors: Vec<String> = Vec::new();
            for e in cells.iter().filter_map(|c| c.error.as_ref()) {
                if !errors.contains(e) {
                    errors.push(e.clone());
                }
            }
            out.push(Summary {
                proxy,
                concurrency: conc,
                runs: cells.len(),
                runs_ok: ok.len(),
                latency: Percentiles::median_of(&lat),
                added: Percentiles::median_of(&added),
                added_p50_vs_websockify: col(|c| c.added_p50_vs_websockify),
                added_p50_vs_plain_relay: col(|c| c.added_p50_vs_plain_relay),
                round_trips_per_s: col(|c| c.round_trips_per_s),
                errors,
                hgrm_all_runs: None,
            });
        }
    }
    out
}

/// Direct TCP first (the baseline of the run), then the proxies rotated by
/// one place per run, so slow drift on a shared machine does not always hit
/// the same proxy.
fn run_order(proxies: &[ProxyKind], run: usize) -> Vec<ProxyKind> {
    let (base, rest) = proxies.split_at(1.min(proxies.len()));
    let mut rest = rest.to_vec();
    if !rest.is_empty() {
        let n = rest.len();
        rest.rotate_left((run.saturating_sub(1)) % n);
    }
    base.iter().copied().chain(rest).collect()
}

fn hgrm_name(proxy: ProxyKind, conc: usize) -> String {
    format!("{}-c{conc}.hgrm", proxy.name())
}

fn write_hgrm(out_dir: &Path, rel: &str, h: &Histogram<u64>) -> Result<()> {
    let path = out_dir.join(rel);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let text = report::percentile_distribution(h, report::TICKS_PER_HALF_DISTANCE, 1.0);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// Runs the whole comparison; writes `latency.json`, `latency.txt`, the
/// `.hgrm` files and child logs under `out_dir`; prints the table.
pub fn run(cfg: LatencyConfig, stop: Arc<AtomicBool>) -> Result<Report> {
    if cfg.runs == 0 || cfg.runs > MAX_RUNS {
        bail!("--runs must be in 1..={MAX_RUNS}");
    }
    if cfg.concurrency.is_empty()
        || cfg
            .concurrency
            .iter()
            .any(|&c| c == 0 || c > MAX_CONCURRENCY)
    {
        bail!("--concurrency values must be in 1..={MAX_CONCURRENCY}");
    }
    if cfg.message_bytes == 0 || cfg.message_bytes > crate::client::MAX_MESSAGE_BYTES {
        bail!(
            "--message-bytes must be in 1..={}",
            crate::client::MAX_MESSAGE_BYTES
        );
    }
    let started = unix_now();
    // Before anything of ours runs: load here is other work on the machine.
    let machine = Machine::describe();
    let out_dir = cfg.common.out_dir.clone();
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;

    // The baseline always runs first; then each proxy once, in the given order.
    let mut proxies = vec![ProxyKind::Direct];
    for p in &cfg.proxies {
        if !proxies.contains(p) {
            proxies.push(*p);
        }
    }
    let mut echo = echo::start().context("starting the echo backend")?;
    let env = cfg.common.env(echo.addr());
    let workload_cfg = |sessions| PingPongConfig {
        sessions,
        message_bytes: cfg.message_bytes,
        warmup_round_trips: cfg.warmup_round_trips,
        round_trips: cfg.round_trips,
        time_limit: Duration::from_millis(cfg.time_limit_ms),
        io_timeout: Duration::from_millis(cfg.common.io_timeout_ms),
    };
    eprintln!("echo backend on {}", echo.addr());

    let mut all_runs: BTreeMap<(ProxyKind, usize), Histogram<u64>> = BTreeMap::new();
    let mut runs = Vec::new();
    for run in 1..=cfg.runs {
        let mut starts = Vec::new();
        let mut cells = Vec::new();
        for kind in run_order(&proxies, run) {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let mut running = match proxy::start(kind, &env, &format!("latency-run{run}")) {
                Ok(p) => p,
                Err(e) => {
                    let msg = format!("{e:#}");
                    eprintln!("run {run}/{}: {kind}: failed to start: {msg}", cfg.runs);
                    starts.push(ProxyStart {
                        proxy: kind,
                        addr: None,
                        command: None,
                        error: Some(msg.clone()),
                    });
                    cells.extend(
                        cfg.concurrency
                            .iter()
                            .map(|&c| Cell::failed(kind, c, msg.clone())),
                    );
                    continue;
                }
            };
            starts.push(ProxyStart {
                proxy: kind,
                addr: Some(running.addr.to_string()),
                command: running.command.clone(),
                error: None,
            });
            for &conc in &cfg.concurrency {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let wl = workload_cfg(conc);
                let result = workload::ping_pong(running.addr, &running.transport, &wl, &stop);
                if stop.load(Ordering::SeqCst) {
                    // A measurement cut short is no measurement: leave it out.
                    break;
                }
                let cell = match result {
                    Ok(out) => {
                        let rel = format!("hgrm/run-{run}/{}", hgrm_name(kind, conc));
                        write_hgrm(&out_dir, &rel, &out.hist)?;
                        all_runs
                            .entry((kind, conc))
                            .or_insert_with(workload::new_histogram)
                            .add(&out.hist)
                            .map_err(|e| anyhow::anyhow!("merging histograms: {e:?}"))?;
                        let secs = out.measured.as_secs_f64();
                        let lat = Percentiles::from_histogram(&out.hist);
                        eprintln!(
                            "run {run}/{}: {kind:<17} c={conc:<4} p50 {:>7} µs  p99 {:>7} µs  ({} round trips)",
                            cfg.runs,
                            report::fmt_us(lat.p50_us),
                            report::fmt_us(lat.p99_us),
                            out.hist.len()
                        );
                        Cell {
                            ok: true,
                            error: None,
                            round_trips: out.hist.len(),
                            measured_s: secs,
                            round_trips_per_s: (secs > 0.0).then(|| out.hist.len() as f64 / secs),
                            time_limited: out.time_limited,
                            mean_us: Some(out.hist.mean()),
                            latency: Some(lat),
                            hgrm: Some(rel),
                            ..Cell::failed(kind, conc, String::new())
                        }
                    }
                    Err(e) => {
                        eprintln!("run {run}/{}: {kind} c={conc}: failed: {e}", cfg.runs);
                        Cell::failed(kind, conc, e)
                    }
                };
                cells.push(cell);
            }
            running.stop();
        }
        fill_added(&mut cells);
        runs.push(Run {
            run,
            proxies: starts,
            cells,
        });
        if stop.load(Ordering::SeqCst) {
            break;
        }
    }
    echo.stop();

    let mut median = summarize(&runs, &proxies, &cfg.concurrency);
    for s in &mut median {
        if let Some(h) = all_runs.get(&(s.proxy, s.concurrency)) {
            let rel = format!("hgrm/all-runs/{}", hgrm_name(s.proxy, s.concurrency));
            write_hgrm(&out_dir, &rel, h)?;
            s.hgrm_all_runs = Some(rel);
        }
    }
    let plot = if all_runs.is_empty() {
        None
    } else {
        let text = plot_svg(&all_runs, &proxies, &cfg.concurrency, cfg.message_bytes);
        std::fs::write(out_dir.join("latency.svg"), text)?;
        Some("latency.svg".to_string())
    };
    let report = Report {
        run: RunInfo::ended("latency", started, &stop, machine),
        schema_version: 2,
        config: cfg,
        histogram_unit: "microseconds",
        median,
        runs,
        plot,
    };
    let text = render_text(&report);
    print!("{text}");
    std::fs::write(out_dir.join("latency.txt"), &text)?;
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(out_dir.join("latency.json"), json + "\n")?;
    eprintln!("results in {}", out_dir.display());
    Ok(report)
}

/// The percentile distributions of all runs merged: one panel per
/// concurrency, one line per proxy (a proxy keeps its color across panels).
pub fn plot_svg(
    hists: &BTreeMap<(ProxyKind, usize), Histogram<u64>>,
    proxies: &[ProxyKind],
    concurrency: &[usize],
    message_bytes: usize,
) -> String {
    let panels: Vec<svg::Panel> = concurrency
        .iter()
        .map(|&conc| svg::Panel {
            title: format!(
                "{conc} concurrent session{}",
                if conc == 1 { "" } else { "s" }
            ),
            series: proxies
                .iter()
                .enumerate()
                .filter_map(|(i, &p)| {
                    let h = hists.get(&(p, conc))?;
                    Some(svg::Series {
                        name: p.name().to_string(),
                        color: svg::color_for(i),
                        points: svg::points_from_histogram(h, 1.0),
                    })
                })
                .collect(),
        })
        .collect();
    svg::latency_plot(
        &format!("Round-trip latency of {message_bytes}-byte messages (all runs merged)"),
        "round trip",
        &panels,
    )
}

/// The table with its context: what ran, where, and which proxies failed why.
pub fn render_text(r: &Report) -> String {
    let rows: Vec<Row> = r
        .median
        .iter()
        .map(|s| Row {
            proxy: s.proxy.name().to_string(),
            concurrency: s.concurrency,
            latency: s.latency,
            added: s.added,
            vs_websockify: s.added_p50_vs_websockify,
            vs_plain_relay: s.added_p50_vs_plain_relay,
            round_trips_per_s: s.round_trips_per_s,
            runs_ok: s.runs_ok,
            runs: s.runs,
        })
        .collect();
    let c = &r.config;
    let mut out = format!(
        "Round-trip latency of {} B messages, closed loop, µs; median of {} run(s).\n\
         Per session: {} warm-up + up to {} measured round trips or {} ms.\n\
         +pXX = latency added over direct TCP at the same concurrency (same run).\n\
         Machine: {}\n\
         Load at start: loadavg {}, CPU pressure (some, avg60) {}\n\n",
        c.message_bytes,
        r.runs.len(),
        c.warmup_round_trips,
        c.round_trips,
        c.time_limit_ms,
        r.run.machine.one_line(),
        r.run.machine.loadavg_at_start,
        r.run
            .machine
            .cpu_pressure_some_avg60_at_start
            .map_or_else(|| "n/a".to_string(), |p| format!("{p:.1}%")),
    );
    out.push_str(&report::table(&rows));
    let failures: Vec<String> = r
        .median
        .iter()
        .filter(|s| s.runs_ok < s.runs || s.runs == 0)
        .flat_map(|s| {
            s.errors
                .iter()
                .map(move |e| format!("- {} c={}: {e}", s.proxy, s.concurrency))
        })
        .collect();
    if !failures.is_empty() {
        out.push_str("\nFailures:\n");
        for f in failures {
            out.push_str(&f);
            out.push('\n');
        }
    }
    if r.run.interrupted {
        out.push_str("\nInterrupted: the figures above are partial.\n");
    }
    if !c.common.meta.is_empty() {
        out.push('\n');
        for (k, v) in &c.common.meta {
            out.push_str(&format!("{k}: {v}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(proxy: ProxyKind, conc: usize, p50: f64) -> Cell {
        Cell {
            ok: true,
            error: None,
            latency: Some(Percentiles::from_array([
                p50,
                p50 * 2.0,
                p50 * 3.0,
                p50 * 4.0,
                p50 * 10.0,
            ])),
            round_trips_per_s: Some(1e6 / p50),
            ..Cell::failed(proxy, conc, String::new())
        }
    }

    #[test]
    fn run_order_keeps_the_baseline_first_and_rotates_the_rest() {
        use ProxyKind::*;
        let all = [Direct, PlainRelay, Websockify, ConsolegateEpoll];
        assert_eq!(run_order(&all, 1), all.to_vec());
        assert_eq!(
            run_order(&all, 2),
            vec![Direct, Websockify, ConsolegateEpoll, PlainRelay]
        );
        assert_eq!(run_order(&all, 4), all.to_vec());
        assert_eq!(run_order(&[Direct], 3), vec![Direct]);
    }

    #[test]
    fn added_latency_and_ratios_within_a_run() {
        let mut cells = vec![
            ok(ProxyKind::Direct, 4, 20.0),
            ok(ProxyKind::PlainRelay, 4, 70.0),
            ok(ProxyKind::Websockify, 4, 520.0),
            ok(ProxyKind::ConsolegateEpoll, 4, 45.0),
            Cell::failed(ProxyKind::ConsolegateUring, 4, "no uring".into()),
            ok(ProxyKind::Direct, 1, 10.0),
        ];
        fill_added(&mut cells);
        assert_eq!(cells[0].added, None);
        assert_eq!(cells[1].added.unwrap().p50_us, 50.0);
        assert_eq!(cells[1].added.unwrap().p90_us, 100.0);
        assert_eq!(cells[2].added.unwrap().p50_us, 500.0);
        assert_eq!(cells[3].added.unwrap().p50_us, 25.0);
        assert_eq!(cells[3].added_p50_vs_websockify, Some(0.05));
        assert_eq!(cells[3].added_p50_vs_plain_relay, Some(0.5));
        assert_eq!(cells[2].added_p50_vs_websockify, Some(1.0));
        assert_eq!(cells[4].added, None);
    }

    #[test]
    fn summary_is_the_median_of_runs_and_skips_failures() {
        let run = |n: usize, ws: f64, cg: Option<f64>| {
            let mut cells = vec![
                ok(ProxyKind::Direct, 1, 20.0),
                ok(ProxyKind::Websockify, 1, ws),
            ];
            cells.push(match cg {
                Some(v) => ok(ProxyKind::ConsolegateEpoll, 1, v),
                None => Cell::failed(ProxyKind::ConsolegateEpoll, 1, "boom".into()),
            });
            fill_added(&mut cells);
            Run {
                run: n,
                proxies: vec![],
                cells,
            }
        };
        let runs = vec![
            run(1, 620.0, Some(60.0)),
            run(2, 520.0, None),
            run(3, 820.0, Some(40.0)),
        ];
        let kinds = [
            ProxyKind::Direct,
            ProxyKind::Websockify,
            ProxyKind::ConsolegateEpoll,
        ];
        let s = summarize(&runs, &kinds, &[1]);
        assert_eq!(s.len(), 3);
        assert_eq!(s[1].latency.unwrap().p50_us, 620.0);
        assert_eq!(s[1].added.unwrap().p50_us, 600.0);
        // Two good runs: the median is their mean.
        assert_eq!((s[2].runs, s[2].runs_ok), (3, 2));
        assert_eq!(s[2].latency.unwrap().p50_us, 50.0);
        assert_eq!(s[2].added.unwrap().p50_us, 30.0);
        // Per-run ratios 40/600 and 20/800, then their median.
        let r = s[2].added_p50_vs_websockify.unwrap();
        assert!((r - (40.0 / 600.0 + 20.0 / 800.0) / 2.0).abs() < 1e-12);
        assert_eq!(s[2].errors, vec!["boom".to_string()]);
    }
}
