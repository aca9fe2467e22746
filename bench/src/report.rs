//! Reporters: the text table (Markdown, so it pastes into docs/BENCHMARKS.md
//! as-is), HdrHistogram percentile-distribution files in the classic
//! `Value Percentile TotalCount 1/(1-Percentile)` format (hdrhistogram 7.5 has
//! no printer), and a description of the machine. The JSON is serde over the
//! types in `latency.rs`; this module only formats.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::stats::Percentiles;

/// Quantile ticks per half distance to 100%, as in HdrHistogram's own output.
pub const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// The classic HdrHistogram percentile distribution (as written by Java's
/// `outputPercentileDistribution`), values divided by `scale`.
pub fn percentile_distribution(
    h: &Histogram<u64>,
    ticks_per_half_distance: u32,
    scale: f64,
) -> String {
    let d = usize::from(h.sigfig());
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if !h.is_empty() {
        let mut total: u64 = 0;
        for v in h.iter_quantiles(ticks_per_half_distance) {
            total += v.count_since_last_iteration();
            let value = v.value_iterated_to() as f64 / scale;
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                let _ = writeln!(
                    out,
                    "{value:12.d$} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(out, "{value:12.d$} {q:2.12} {total:10}");
            }
        }
    }
    let (mean, stdev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (h.mean() / scale, h.stdev() / scale, h.max() as f64 / scale)
    };
    let _ = writeln!(
        out,
        "#[Mean    = {mean:12.d$}, StdDeviation   = {stdev:12.d$}]"
    );
    let _ = writeln!(
        out,
        "#[Max     = {max:12.d$}, Total count    = {:12}]",
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_bucket_count(h.sigfig())
    );
    out
}

/// HdrHistogram's sub-bucket count for a precision: the power of two that
/// covers 2 × 10^sigfig (2048 for 3 digits).
fn sub_bucket_count(sigfig: u8) -> u64 {
    let single_unit = 2 * 10u64.pow(u32::from(sigfig));
    single_unit.next_power_of_two()
}

/// One row of the summary table.
pub struct Row {
    pub proxy: String,
    pub concurrency: usize,
    pub latency: Option<Percentiles>,
    pub added: Option<Percentiles>,
    pub vs_websockify: Option<f64>,
    pub vs_plain_relay: Option<f64>,
    pub round_trips_per_s: Option<f64>,
    pub runs_ok: usize,
    pub runs: usize,
}

/// Microseconds: whole numbers as such, medians of an even count with one decimal.
pub fn fmt_us(v: f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Two decimals, or four below 0.01 (memory ratios are that small).
pub fn fmt_ratio_fine(v: f64) -> String {
    if v != 0.0 && v.abs() < 0.01 {
        format!("{v:.4}")
    } else {
        fmt_ratio(v)
    }
}

/// Two decimals, without a "-0.00".
pub fn fmt_ratio(v: f64) -> String {
    if v.abs() < 0.005 {
        "0.00".into()
    } else {
        format!("{v:.2}")
    }
}

/// A Markdown table with aligned columns.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "proxy",
        "conc",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "+p50",
        "+p90",
        "+p99",
        "+p99.9",
        "+p50 ÷ websockify",
        "+p50 ÷ plain-relay",
        "rt/s",
        "runs ok",
    ];
    let dash = || "—".to_string();
    let mut cells: Vec<Vec<String>> = Vec::new();
    for r in rows {
        let mut c = vec![r.proxy.clone(), r.concurrency.to_string()];
        match r.latency {
            Some(p) => c.extend(p.to_array().iter().map(|v| fmt_us(*v))),
            None => {
                c.push("failed".into());
                c.extend((0..4).map(|_| dash()));
            }
        }
        match r.added {
            Some(a) => c.extend(a.to_array()[..4].iter().map(|v| fmt_us(*v))),
            None => c.extend((0..4).map(|_| dash())),
        }
        for x in [r.vs_websockify, r.vs_plain_relay] {
            c.push(x.map_or_else(dash, fmt_ratio));
        }
        c.push(r.round_trips_per_s.map_or_else(dash, |v| format!("{v:.0}")));
        c.push(format!("{}/{}", r.runs_ok, r.runs));
        cells.push(c);
    }
    markdown_table(&header, &cells)
}

/// A Markdown table with aligned columns: the first column left-aligned
/// (names), the others right-aligned (numbers).
pub fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    markdown_table_with(header, rows, &[0])
}

/// A Markdown table; the columns in `left` are left-aligned (text), the
/// others right-aligned (numbers).
pub fn markdown_table_with(header: &[&str], rows: &[Vec<String>], left: &[usize]) -> String {
    let width = |i: usize| {
        rows.iter()
            .filter_map(|c| c.get(i))
            .map(|c| c.chars().count())
            .chain(std::iter::once(header[i].chars().count()))
            .max()
            .unwrap_or(0)
            .max(3)
    };
    let widths: Vec<usize> = (0..header.len()).map(width).collect();
    let line = |vals: &[String]| {
        let mut s = String::from("|");
        for (i, w) in widths.iter().enumerate() {
            let v = vals.get(i).map_or("", String::as_str);
            let pad = w - v.chars().count().min(*w);
            if left.contains(&i) {
                let _ = write!(s, " {v}{} |", " ".repeat(pad));
            } else {
                let _ = write!(s, " {}{v} |", " ".repeat(pad));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    out.push('|');
    for (i, w) in widths.iter().enumerate() {
        if left.contains(&i) {
            let _ = write!(out, " {} |", "-".repeat(*w));
        } else {
            let _ = write!(out, " {}: |", "-".repeat(w - 1));
        }
    }
    out.push('\n');
    for c in rows {
        out.push_str(&line(c));
    }
    out
}

/// What every benchmark report starts with (flattened into its JSON).
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    pub benchmark: &'static str,
    pub started_at_unix_s: u64,
    pub finished_at_unix_s: u64,
    pub interrupted: bool,
    pub machine: Machine,
}

impl RunInfo {
    /// A run of `benchmark` on `machine` that started at `started` (unix
    /// seconds) and ends now, interrupted if `stop` is set.
    pub fn ended(
        benchmark: &'static str,
        started: u64,
        stop: &std::sync::atomic::AtomicBool,
        machine: Machine,
    ) -> RunInfo {
        RunInfo {
            benchmark,
            started_at_unix_s: started,
            finished_at_unix_s: crate::common::unix_now(),
            interrupted: stop.load(std::sync::atomic::Ordering::SeqCst),
            machine,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub logical_cpus: usize,
    pub memory_total_kib: Option<u64>,
    pub kernel: String,
    pub os: String,
    /// `/proc/loadavg` when the run started: other work on a shared machine.
    pub loadavg_at_start: String,
    /// `/proc/pressure/cpu` "some avg60" (% of time something waited for a
    /// CPU) when the run started.
    pub cpu_pressure_some_avg60_at_start: Option<f64>,
}

impl Machine {
    pub fn describe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let memory_total_kib = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok());
        let os = read("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| "unknown".into());
        let loadavg = read("/proc/loadavg");
        let cpu_pressure_some_avg60_at_start = read("/proc/pressure/cpu")
            .lines()
            .find(|l| l.starts_with("some"))
            .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("avg60=")))
            .and_then(|v| v.parse().ok());
        Machine {
            loadavg_at_start: loadavg
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
            cpu_pressure_some_avg60_at_start,
            cpu_model,
            logical_cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_total_kib,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            os,
        }
    }

    pub fn one_line(&self) -> String {
        let mem = self
            .memory_total_kib
            .map(|k| format!(", {:.0} GiB", k as f64 / 1024.0 / 1024.0))
            .unwrap_or_default();
        format!(
            "{} logical CPUs ({}){mem}, {}, Linux {}",
            self.logical_cpus, self.cpu_model, self.os, self.kernel
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_distribution_classic_format() {
        let mut h = crate::workload::new_histogram();
        for v in 1..=4u64 {
            h.record(v * 10).unwrap();
        }
        let text = percentile_distribution(&h, 1, 1.0);
        let expected = concat!(
            "       Value     Percentile TotalCount 1/(1-Percentile)\n",
            "\n",
            "      10.000 0.000000000000          1           1.00\n",
            "      20.000 0.500000000000          2           2.00\n",
            "      30.000 0.750000000000          3           4.00\n",
            "      40.000 0.875000000000          4           8.00\n",
            "      40.000 1.000000000000          4\n",
            "#[Mean    =       25.000, StdDeviation   =       11.180]\n",
            "#[Max     =       40.000, Total count    =            4]\n",
            "#[Buckets =           16, SubBuckets     =         2048]\n",
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn percentile_distribution_scales_and_handles_empty() {
        let mut h = crate::workload::new_histogram();
        h.record(1500).unwrap();
        let text = percentile_distribution(&h, 5, 1000.0);
        assert!(
            text.contains("       1.500 1.000000000000          1\n"),
            "{text}"
        );
        let empty = percentile_distribution(&crate::workload::new_histogram(), 5, 1.0);
        assert!(empty.starts_with("       Value"));
        assert!(empty.contains("Total count    =            0]"));
    }

    #[test]
    fn table_is_aligned_markdown() {
        let p = Percentiles::from_array([55.0, 60.0, 70.0, 80.0, 900.0]);
        let rows = vec![
            Row {
                proxy: "plain-relay".into(),
                concurrency: 1,
                latency: Some(p),
                added: Some(p.minus(Percentiles::from_array([20.0, 20.0, 20.0, 20.0, 20.0]))),
                vs_websockify: Some(0.0625),
                vs_plain_relay: Some(1.0),
                round_trips_per_s: Some(18000.4),
                runs_ok: 3,
                runs: 3,
            },
            Row {
                proxy: "consolegate-uring".into(),
                concurrency: 4,
                latency: None,
                added: None,
                vs_websockify: None,
                vs_plain_relay: None,
                round_trips_per_s: None,
                runs_ok: 0,
                runs: 3,
            },
        ];
        let t = table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        let widths: Vec<usize> = lines.iter().map(|l| l.chars().count()).collect();
        assert!(widths.iter().all(|w| *w == widths[0]), "{t}");
        assert!(lines[1].starts_with("| ----"));
        assert!(
            lines[2].contains("|   35 |") && lines[2].contains(" 0.06 |"),
            "{t}"
        );
        assert!(lines[3].contains("failed"));
        assert_eq!(fmt_us(12.5), "12.5");
        assert_eq!(fmt_us(12.0), "12");
        assert_eq!(fmt_ratio(-0.001), "0.00");
        assert_eq!(fmt_ratio(-0.25), "-0.25");
    }
}
