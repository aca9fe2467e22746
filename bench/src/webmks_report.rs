//! The WebMKS benchmark's text/Markdown report: what was measured, TLS
//! alone, the latency table, the throughput table with the CPU budget, and
//! the targets. Formatting only; the figures come from `webmks`.

use std::fmt::Write as _;

use crate::report;
use crate::webmks::WebmksReport;

fn opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.decimals$}"))
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), report::fmt_ratio)
}

fn latency_table(r: &WebmksReport) -> String {
    let header = [
        "via",
        "io",
        "conc",
        "p50",
        "p99",
        "p99.9",
        "+p50",
        "+p99",
        "+p99.9",
        "+p50 ÷ vnc",
        "+p99 ÷ vnc",
        "+p99.9 ÷ vnc",
        "runs ok",
    ];
    let us = |v: Option<f64>| v.map_or_else(|| "—".into(), report::fmt_us);
    let rows: Vec<Vec<String>> = r
        .latency
        .iter()
        .map(|s| {
            vec![
                s.via.name().to_string(),
                s.io.map_or_else(String::new, |p| p.name().to_string()),
                s.concurrency.to_string(),
                us(s.latency.map(|p| p.p50_us)),
                us(s.latency.map(|p| p.p99_us)),
                us(s.latency.map(|p| p.p99_9_us)),
                us(s.added.map(|p| p.p50_us)),
                us(s.added.map(|p| p.p99_us)),
                us(s.added.map(|p| p.p99_9_us)),
                ratio(s.added_p50_vs_vnc),
                ratio(s.added_p99_vs_vnc),
                ratio(s.added_p99_9_vs_vnc),
                format!("{}/{}", s.runs_ok, s.runs),
            ]
        })
        .collect();
    report::markdown_table_with(&header, &rows, &[0, 1])
}

fn throughput_table(r: &WebmksReport) -> String {
    let header = [
        "io",
        "dir",
        "vnc MB/s",
        "webmks MB/s",
        "vnc CPU-s/GB",
        "webmks CPU-s/GB",
        "TLS CPU-s/GB",
        "vnc + TLS",
        "webmks ÷ (vnc + TLS)",
        "excess",
        "runs ok",
    ];
    let rows: Vec<Vec<String>> = r
        .throughput
        .iter()
        .map(|s| {
            vec![
                s.io.name().to_string(),
                s.direction.name().to_string(),
                opt(s.vnc_mb_per_s, 0),
                opt(s.webmks_mb_per_s, 0),
                opt(s.vnc_cpu_s_per_gb, 3),
                opt(s.webmks_cpu_s_per_gb, 3),
                opt(s.tls_cpu_s_per_gb, 3),
                opt(s.budget_cpu_s_per_gb, 3),
                ratio(s.webmks_vs_budget),
                opt(s.excess_cpu_s_per_gb, 3),
                format!("{}/{}", s.runs_ok, s.runs),
            ]
        })
        .collect();
    report::markdown_table_with(&header, &rows, &[0, 1])
}

fn targets_table(r: &WebmksReport) -> String {
    let rows: Vec<Vec<String>> = r
        .targets
        .iter()
        .map(|t| {
            vec![
                t.proxy.name().to_string(),
                t.target.clone(),
                opt(t.value, 2),
                match t.met {
                    Some(true) => "met".into(),
                    Some(false) => "MISSED".into(),
                    None => "n/a".into(),
                },
                t.note.clone(),
            ]
        })
        .collect();
    report::markdown_table_with(
        &["proxy", "target", "value", "", "note"],
        &rows,
        &[0, 1, 3, 4],
    )
}

fn failures(r: &WebmksReport) -> String {
    let mut out = String::new();
    for s in &r.latency {
        for e in &s.errors {
            let io = s.io.map_or("", |p| p.name());
            let _ = writeln!(
                out,
                "- latency {} {io} c={}: {e}",
                s.via.name(),
                s.concurrency
            );
        }
    }
    for s in &r.throughput {
        for e in &s.errors {
            let _ = writeln!(
                out,
                "- throughput {} {}: {e}",
                s.io.name(),
                s.direction.name()
            );
        }
    }
    for run in &r.runs {
        if let Some(e) = &run.tls_error {
            let _ = writeln!(out, "- run {} TLS alone: {e}", run.run);
        }
    }
    out
}

/// The whole report, Markdown.
pub fn render_text(r: &WebmksReport) -> String {
    let c = &r.config;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "WebMKS relay vs VNC relay, same appliance (`consolegate run`), same run; median of {} run(s).\n\
         Latency: {} B messages, closed loop, µs; per session {} warm-up + up to {} round trips or {} ms. \
         +pXX = added over the session's baseline at the same concurrency in the same run: \
         `vnc` − `direct-tcp` (raw TCP to the echo backend), `webmks` − `direct-wss` \
         (TLS + WebSocket straight to the stand-in host). Ratios are per run, then the median.\n\
         Throughput: {} MB per transfer over {} session(s), {} B frames/chunks; CPU-s/GB = appliance \
         process tree utime+stime per 10^9 payload bytes. TLS CPU-s/GB = rustls alone, in memory, \
         one thread's CPU clock: decryption (down) or encryption (up) of the same volume.\n\
         Machine: {}; load at start: {}\n",
        r.runs.len(),
        c.message_bytes,
        c.warmup_round_trips,
        c.round_trips,
        c.time_limit_ms,
        c.bytes / 1_000_000,
        c.sessions,
        c.chunk_bytes,
        r.run.machine.one_line(),
        r.run.machine.loadavg_at_start,
    );
    let backend_suite = r.runs.iter().find_map(|x| x.backend_cipher_suite.clone());
    let _ = writeln!(
        out,
        "TLS alone ({}; the appliance ↔ stand-in host negotiated {}): decrypt {} CPU-s/GB, encrypt {} CPU-s/GB.\n",
        r.tls.cipher_suite.as_deref().unwrap_or("—"),
        backend_suite.as_deref().unwrap_or("—"),
        opt(r.tls.decrypt_cpu_s_per_gb, 3),
        opt(r.tls.encrypt_cpu_s_per_gb, 3),
    );
    out.push_str(&latency_table(r));
    out.push('\n');
    out.push_str(&throughput_table(r));
    out.push('\n');
    out.push_str(&targets_table(r));
    let f = failures(r);
    if !f.is_empty() {
        out.push_str("\nFailures:\n");
        out.push_str(&f);
    }
    if r.run.interrupted {
        out.push_str("\nInterrupted: the figures above are partial.\n");
    }
    out
}
