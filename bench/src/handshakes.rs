//! The handshake benchmark: WebSocket sessions set up per second.
//!
//! One event-driven client (mio) keeps `--handshake-concurrency`
//! connections in flight, each: TCP connect → upgrade request → `101`
//! (accept key checked) → close; the proxy connects each session to a
//! silent backend (`sink-server`, a child process). Bounded by a count and a
//! time limit per proxy and run; a short unmeasured warm-up comes first.
//!
//! Reported per proxy: handshakes per second; per second per worker
//! (consolegate: its data-plane worker count, from its ready line;
//! websockify: 1, it accepts in one process and forks); and per second of
//! proxy CPU (process tree utime + stime), which is what "per core" means
//! on a machine where the client shares the two vCPUs with the proxy.
//! The client's own cost caps the first two figures here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::common::{rotated, unix_now, Common};
use crate::evclient::{self, Reasons};
use crate::procfs::{self, SockStat};
use crate::proxy::{self, ProxyKind, RunningProxy};
use crate::report::RunInfo;
use crate::report::{self, Machine};
use crate::stats::{self, Percentiles};

pub const MAX_CONCURRENCY: usize = 4096;

#[derive(Debug, Clone, Serialize)]
pub struct HandshakeConfig {
    pub proxies: Vec<ProxyKind>,
    pub runs: usize,
    /// Measured handshakes per proxy and run, at most.
    pub count: u64,
    pub concurrency: usize,
    pub time_limit_ms: u64,
    pub warmup: u64,
    pub common: Common,
}

#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub proxy: ProxyKind,
    pub run: usize,
    pub ok: bool,
    pub error: Option<String>,
    pub completed: u64,
    pub failed: u64,
    /// Cut off in flight by the time limit.
    pub unfinished: u64,
    pub reasons: Reasons,
    pub seconds: f64,
    pub per_s: Option<f64>,
    pub workers: usize,
    pub per_s_per_worker: Option<f64>,
    pub proxy_cpu_s: Option<f64>,
    /// Handshakes per second of proxy CPU time.
    pub per_proxy_cpu_s: Option<f64>,
    pub bench_cpu_s: f64,
    /// Connect → 101, µs.
    pub handshake_us: Option<Percentiles>,
    pub count_reached: bool,
    pub sockstat_after: SockStat,
}

impl Measurement {
    fn failed(proxy: ProxyKind, run: usize, error: String) -> Measurement {
        Measurement {
            proxy,
            run,
            ok: false,
            error: Some(error),
            completed: 0,
            failed: 0,
            unfinished: 0,
            reasons: Reasons::new(),
            seconds: 0.0,
            per_s: None,
            workers: 1,
            per_s_per_worker: None,
            proxy_cpu_s: None,
            per_proxy_cpu_s: None,
            bench_cpu_s: 0.0,
            handshake_us: None,
            count_reached: false,
            sockstat_after: SockStat::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub proxy: ProxyKind,
    pub runs: usize,
    pub runs_ok: usize,
    pub workers: usize,
    pub per_s: Option<f64>,
    pub per_s_per_worker: Option<f64>,
    pub per_proxy_cpu_s: Option<f64>,
    pub handshake_p50_us: Option<f64>,
    pub handshake_p99_us: Option<f64>,
    pub per_s_vs_websockify: Option<f64>,
    pub per_proxy_cpu_s_vs_websockify: Option<f64>,
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct HandshakeReport {
    #[serde(flatten)]
    pub run: RunInfo,
    pub config: HandshakeConfig,
    pub median: Vec<Summary>,
    pub measurements: Vec<Measurement>,
}

fn measure(
    running: &RunningProxy,
    run: usize,
    cfg: &HandshakeConfig,
    stop: &AtomicBool,
) -> Result<Measurement> {
    let pid = running.pid().context("no proxy process to measure")?;
    let limit = Duration::from_millis(cfg.time_limit_ms);
    let mut warm_hist = crate::workload::new_histogram();
    if cfg.warmup > 0 {
        let w = evclient::churn_handshakes(
            running.addr,
            &running.transport,
            cfg.concurrency,
            cfg.warmup,
            limit,
            &mut warm_hist,
            stop,
        )?;
        if w.completed == 0 {
            bail!("warm-up: no handshake completed ({:?})", w.reasons);
        }
    }
    let mut hist = crate::workload::new_histogram();
    let cpu0 = procfs::tree_cpu(pid);
    let bench0 = procfs::self_cpu_s();
    let s = evclient::churn_handshakes(
        running.addr,
        &running.transport,
        cfg.concurrency,
        cfg.count,
        limit,
        &mut hist,
        stop,
    )?;
    let cpu1 = procfs::tree_cpu(pid);
    let bench1 = procfs::self_cpu_s();
    let workers = running.workers.unwrap_or(1).max(1);
    let per_s = (s.elapsed_s > 0.0).then(|| s.completed as f64 / s.elapsed_s);
    let cpu = (cpu1.cpu_s - cpu0.cpu_s).max(0.0);
    Ok(Measurement {
        proxy: running.kind,
        run,
        ok: s.completed > 0,
        error: (s.completed == 0).then(|| format!("no handshake completed: {:?}", s.reasons)),
        completed: s.completed,
        failed: s.failed,
        unfinished: s.unfinished,
        seconds: s.elapsed_s,
        per_s,
        workers,
        per_s_per_worker: per_s.map(|v| v / workers as f64),
        proxy_cpu_s: Some(cpu),
        per_proxy_cpu_s: (cpu > 0.0).then(|| s.completed as f64 / cpu),
        bench_cpu_s: bench1 - bench0,
        handshake_us: (!hist.is_empty()).then(|| Percentiles::from_histogram(&hist)),
        count_reached: s.count_reached,
        reasons: s.reasons,
        sockstat_after: procfs::sockstat(),
    })
}

fn median_ratio(
    ms: &[Measurement],
    proxy: ProxyKind,
    f: fn(&Measurement) -> Option<f64>,
) -> Option<f64> {
    let r: Vec<f64> = ms
        .iter()
        .filter(|m| m.ok && m.proxy == proxy)
        .filter_map(|m| {
            let w = ms
                .iter()
                .find(|w| w.ok && w.proxy == ProxyKind::Websockify && w.run == m.run)?;
            stats::ratio(f(m)?, f(w)?)
        })
        .collect();
    stats::median(&r)
}

pub fn summarize(ms: &[Measurement], proxies: &[ProxyKind]) -> Vec<Summary> {
    proxies
        .iter()
        .map(|&proxy| {
            let all: Vec<&Measurement> = ms.iter().filter(|m| m.proxy == proxy).collect();
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
            Summary {
                proxy,
                runs: all.len(),
                runs_ok: ok.len(),
                workers: ok.first().map_or(1, |m| m.workers),
                per_s: col(|m| m.per_s),
                per_s_per_worker: col(|m| m.per_s_per_worker),
                per_proxy_cpu_s: col(|m| m.per_proxy_cpu_s),
                handshake_p50_us: col(|m| m.handshake_us.map(|p| p.p50_us)),
                handshake_p99_us: col(|m| m.handshake_us.map(|p| p.p99_us)),
                per_s_vs_websockify: median_ratio(ms, proxy, |m| m.per_s),
                per_proxy_cpu_s_vs_websockify: median_ratio(ms, proxy, |m| m.per_proxy_cpu_s),
                errors,
            }
        })
        .collect()
}

pub fn run(cfg: HandshakeConfig, stop: Arc<AtomicBool>) -> Result<HandshakeReport> {
    if cfg.concurrency == 0 || cfg.concurrency > MAX_CONCURRENCY {
        bail!("--handshake-concurrency must be in 1..={MAX_CONCURRENCY}");
    }
    if cfg.runs == 0 || cfg.runs > crate::latency::MAX_RUNS {
        bail!(
            "--handshake-runs must be in 1..={}",
            crate::latency::MAX_RUNS
        );
    }
    if cfg.count == 0 {
        bail!("--handshakes must be positive");
    }
    let started = unix_now();
    let machine = Machine::describe();
    std::fs::create_dir_all(&cfg.common.out_dir)?;
    let proxies = crate::common::proxies_under_test(&cfg.proxies);
    let mut measurements = Vec::new();
    'runs: for run in 1..=cfg.runs {
        for kind in rotated(&proxies, run) {
            if stop.load(Ordering::SeqCst) {
                break 'runs;
            }
            // A fresh backend (new port) per measurement: the proxy's
            // connections to it leave TIME_WAIT sockets, and a new
            // destination gives the next run the whole ephemeral port range.
            let tag = format!("handshakes-run{run}");
            let (mut sink, sink_addr) = match proxy::spawn_bench_server(
                &cfg.common.bench_exe,
                "sink-server",
                &["sink-server".to_string()],
                &cfg.common
                    .out_dir
                    .join("logs")
                    .join(format!("sink-{}-{tag}.log", kind.name())),
                Duration::from_millis(cfg.common.startup_timeout_ms),
            ) {
                Ok(s) => s,
                Err(e) => {
                    measurements.push(Measurement::failed(kind, run, format!("sink: {e:#}")));
                    continue;
                }
            };
            let env = cfg.common.env(sink_addr);
            let m = match proxy::start(kind, &env, &tag) {
                Ok(mut running) => {
                    let m = measure(&running, run, &cfg, &stop)
                        .unwrap_or_else(|e| Measurement::failed(kind, run, format!("{e:#}")));
                    let m = if !m.ok && running.has_exited() {
                        Measurement {
                            error: Some(format!(
                                "{} (proxy exited: {})",
                                m.error.clone().unwrap_or_default(),
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
                Err(e) => Measurement::failed(kind, run, format!("start: {e:#}")),
            };
            sink.stop();
            match m.per_s {
                Some(v) if m.ok => eprintln!(
                    "handshakes run {run}/{}: {kind:<17} {v:>8.0}/s  {:>8.0}/s per worker  {:>8} per CPU-s  ({} ok, {} failed in {:.2} s)",
                    cfg.runs,
                    m.per_s_per_worker.unwrap_or(0.0),
                    m.per_proxy_cpu_s.map_or("—".into(), |v| format!("{v:.0}")),
                    m.completed,
                    m.failed,
                    m.seconds
                ),
                _ => eprintln!(
                    "handshakes run {run}/{}: {kind}: failed: {}",
                    cfg.runs,
                    m.error.as_deref().unwrap_or("?")
                ),
            }
            measurements.push(m);
        }
    }
    let median = summarize(&measurements, &proxies);
    let report = HandshakeReport {
        run: RunInfo::ended("handshakes", started, &stop, machine),
        config: cfg,
        median,
        measurements,
    };
    let text = render_text(&report);
    crate::common::write_report(&report.config.common.out_dir, "handshakes", &text, &report)?;
    Ok(report)
}

pub fn render_text(r: &HandshakeReport) -> String {
    let c = &r.config;
    let mut out = format!(
        "Handshakes (connect → upgrade → 101 → close), {} in flight, ≤ {} per run or {} ms; median of {} run(s).\n\
         per CPU-s = handshakes per second of proxy CPU time (process tree).\n\n",
        c.concurrency, c.count, c.time_limit_ms, c.runs
    );
    let header = [
        "proxy",
        "workers",
        "handshakes/s",
        "per worker",
        "per CPU-s",
        "p50 µs",
        "p99 µs",
        "/s ÷ websockify",
        "per CPU-s ÷ websockify",
        "runs ok",
    ];
    let f = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.0}"));
    let rows: Vec<Vec<String>> = r
        .median
        .iter()
        .map(|s| {
            vec![
                s.proxy.name().to_string(),
                s.workers.to_string(),
                f(s.per_s),
                f(s.per_s_per_worker),
                f(s.per_proxy_cpu_s),
                f(s.handshake_p50_us),
                f(s.handshake_p99_us),
                s.per_s_vs_websockify.map_or("—".into(), report::fmt_ratio),
                s.per_proxy_cpu_s_vs_websockify
                    .map_or("—".into(), report::fmt_ratio),
                format!("{}/{}", s.runs_ok, s.runs),
            ]
        })
        .collect();
    out.push_str(&report::markdown_table(&header, &rows));
    for s in r.median.iter().filter(|s| !s.errors.is_empty()) {
        for e in &s.errors {
            out.push_str(&format!("- {}: {e}\n", s.proxy));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_medians_and_ratios() {
        let m = |proxy, run, per_s: f64, cpu: f64| Measurement {
            ok: true,
            error: None,
            per_s: Some(per_s),
            per_s_per_worker: Some(per_s / 2.0),
            per_proxy_cpu_s: Some(cpu),
            workers: 2,
            ..Measurement::failed(proxy, run, String::new())
        };
        let ms = vec![
            m(ProxyKind::Websockify, 1, 40.0, 50.0),
            m(ProxyKind::ConsolegateUring, 1, 8000.0, 20000.0),
            m(ProxyKind::Websockify, 2, 50.0, 40.0),
            m(ProxyKind::ConsolegateUring, 2, 9000.0, 24000.0),
        ];
        let s = summarize(&ms, &[ProxyKind::Websockify, ProxyKind::ConsolegateUring]);
        assert_eq!(s[1].per_s, Some(8500.0));
        assert_eq!(s[1].per_s_per_worker, Some(4250.0));
        // Per run: 200 and 180 → 190; 400 and 600 → 500.
        assert_eq!(s[1].per_s_vs_websockify, Some(190.0));
        assert_eq!(s[1].per_proxy_cpu_s_vs_websockify, Some(500.0));
    }
}
