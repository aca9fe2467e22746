//! The soak's verdict: does the appliance grow? Pure arithmetic over the
//! samples (time, open descriptors, resident memory) plus the counts of
//! unexpected errors; no IO, unit-tested on made-up series.
//!
//! The rule, after a warm-up (what is bounded but filled lazily fills
//! first, measured in docs/RELIABILITY.md: io_uring's provided receive
//! buffers are touched one after the other until the ring has gone round
//! once, 16 MiB with the defaults; the workers' buffer pools keep freed
//! chunks up to their high-water mark; the registry keeps 1024 closed
//! sessions; the workers keep finished tickets for two minutes after they
//! end):
//!
//! - a least-squares line through each series gives its slope; the slope
//!   times the judged span is the growth the line projects;
//! - the mean of the last third of the samples minus the mean of the first
//!   third is the growth the data shows, robust to a spike or two;
//! - either figure above its allowance is growth. Descriptors get a small
//!   absolute allowance (the count moves with the sessions live at the
//!   instant of a sample); memory gets a relative one with an absolute
//!   floor (a few MiB: heap fragmentation moves in steps).

use serde::Serialize;

/// Fewest samples after the warm-up for a verdict (three per third).
pub const MIN_JUDGED_SAMPLES: usize = 9;
/// The warm-up never takes more than this share of the run.
pub const MAX_WARMUP_SHARE: f64 = 0.5;

/// The allowances; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Allowances {
    /// Share of the run, from its start, left out of the judgement…
    pub warmup_fraction: f64,
    /// …but at least this long (up to [`MAX_WARMUP_SHARE`] of the run).
    pub warmup_min_s: f64,
    /// Descriptors the count may grow by.
    pub fd_count: f64,
    /// Memory may grow by this share of its first-third mean, in percent…
    pub rss_percent: f64,
    /// …or by this many KiB, whichever is larger.
    pub rss_floor_kib: f64,
    /// Unexpected client-side errors tolerated (expected refusals are not
    /// errors and are counted apart).
    pub unexpected_errors: u64,
}

/// One sample as the judge sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Seconds since the workload started.
    pub t_s: f64,
    pub fds: f64,
    pub rss_kib: f64,
}

/// How one series moved after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Trend {
    /// Least-squares slope, per hour.
    pub slope_per_hour: f64,
    /// Slope × judged span: the growth the line projects over the run.
    pub projected_growth: f64,
    pub first_third_mean: f64,
    pub last_third_mean: f64,
    /// Last-third mean − first-third mean.
    pub thirds_growth: f64,
    pub min: f64,
    pub max: f64,
    pub allowance: f64,
    pub grows: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub pass: bool,
    /// Samples at or after `judged_from_s`.
    pub judged_samples: usize,
    pub judged_from_s: f64,
    pub judged_to_s: f64,
    pub fds: Option<Trend>,
    pub rss_kib: Option<Trend>,
    /// Every reason the run failed, in words with the figures.
    pub failures: Vec<String>,
}

/// Least-squares slope of `y` over `x`; `None` for fewer than two points
/// or no spread in `x`.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, y) in points {
        sxy += (x - mean_x) * (y - mean_y);
        sxx += (x - mean_x) * (x - mean_x);
    }
    (sxx > 0.0).then(|| sxy / sxx)
}

/// Means of the first and the last third of `values` (by count; the
/// middle takes the remainder); `None` below three values.
pub fn thirds(values: &[f64]) -> Option<(f64, f64)> {
    let k = values.len() / 3;
    if k == 0 {
        return None;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Some((mean(&values[..k]), mean(&values[values.len() - k..])))
}

/// Medians of the first, middle and last third of `values` (by count, as
/// in [`thirds`]); `None` below three values. For a noisy series (the
/// interval p99 on a shared machine) whose means a few spikes would move.
pub fn third_medians(values: &[f64]) -> Option<[f64; 3]> {
    let k = values.len() / 3;
    if k == 0 {
        return None;
    }
    let (first, rest) = values.split_at(k);
    let (middle, last) = rest.split_at(rest.len() - k);
    Some([
        crate::stats::median(first)?,
        crate::stats::median(middle)?,
        crate::stats::median(last)?,
    ])
}

/// The trend of `(t_s, value)` points against an allowance computed from
/// the first-third mean.
pub fn trend(points: &[(f64, f64)], allowance_for: impl Fn(f64) -> f64) -> Option<Trend> {
    let values: Vec<f64> = points.iter().map(|p| p.1).collect();
    let (first, last) = thirds(&values)?;
    let per_s = slope(points)?;
    let span = points.last()?.0 - points.first()?.0;
    let allowance = allowance_for(first);
    let projected = per_s * span;
    let thirds_growth = last - first;
    Some(Trend {
        slope_per_hour: per_s * 3600.0,
        projected_growth: projected,
        first_third_mean: first,
        last_third_mean: last,
        thirds_growth,
        min: values.iter().copied().fold(f64::INFINITY, f64::min),
        max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        allowance,
        grows: projected > allowance || thirds_growth > allowance,
    })
}

/// Seconds from the start of a `duration_s` run left out of the verdict.
pub fn warmup_s(duration_s: f64, a: &Allowances) -> f64 {
    (duration_s * a.warmup_fraction)
        .max(a.warmup_min_s)
        .min(duration_s * MAX_WARMUP_SHARE)
}

/// The memory allowance for a first-third mean of `first_kib`.
pub fn rss_allowance_kib(a: &Allowances, first_kib: f64) -> f64 {
    (first_kib * a.rss_percent / 100.0).max(a.rss_floor_kib)
}

/// Judges a run of `duration_s` seconds from its samples and its count of
/// unexpected errors; `other_failures` (the appliance died, the workload
/// did not run, …) are added to the verdict as they are.
pub fn judge(
    samples: &[Point],
    duration_s: f64,
    unexpected_errors: u64,
    a: &Allowances,
    other_failures: Vec<String>,
) -> Verdict {
    let from = warmup_s(duration_s, a);
    let judged: Vec<&Point> = samples.iter().filter(|p| p.t_s >= from).collect();
    let mut failures = other_failures;
    let to = judged.last().map_or(from, |p| p.t_s);
    let (fds, rss) = if judged.len() < MIN_JUDGED_SAMPLES {
        failures.push(format!(
            "only {} samples after the warm-up (at {from:.0} s); {MIN_JUDGED_SAMPLES} needed: \
             run longer or sample more often",
            judged.len()
        ));
        (None, None)
    } else {
        let fd_points: Vec<(f64, f64)> = judged.iter().map(|p| (p.t_s, p.fds)).collect();
        let rss_points: Vec<(f64, f64)> = judged.iter().map(|p| (p.t_s, p.rss_kib)).collect();
        (
            trend(&fd_points, |_| a.fd_count),
            trend(&rss_points, |first| rss_allowance_kib(a, first)),
        )
    };
    if let Some(t) = fds.filter(|t| t.grows) {
        failures.push(format!(
            "open descriptors grow: {:.1} → {:.1} (first → last third mean, {:+.1}), \
             slope {:+.2}/h projecting {:+.1} over the judged {:.0} s; allowance {:.0}",
            t.first_third_mean,
            t.last_third_mean,
            t.thirds_growth,
            t.slope_per_hour,
            t.projected_growth,
            to - from,
            t.allowance
        ));
    }
    if let Some(t) = rss.filter(|t| t.grows) {
        failures.push(format!(
            "RSS grows: {:.1} → {:.1} MiB (first → last third mean, {:+.2} MiB), \
             slope {:+.2} MiB/h projecting {:+.2} MiB over the judged {:.0} s; allowance {:.2} MiB",
            t.first_third_mean / 1024.0,
            t.last_third_mean / 1024.0,
            t.thirds_growth / 1024.0,
            t.slope_per_hour / 1024.0,
            t.projected_growth / 1024.0,
            to - from,
            t.allowance / 1024.0
        ));
    }
    if unexpected_errors > a.unexpected_errors {
        failures.push(format!(
            "{unexpected_errors} unexpected errors (tolerated: {})",
            a.unexpected_errors
        ));
    }
    Verdict {
        pass: failures.is_empty(),
        judged_samples: judged.len(),
        judged_from_s: from,
        judged_to_s: to,
        fds,
        rss_kib: rss,
        failures,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn third_medians_ignore_a_spike_and_show_a_step() {
        let flat = [5.0, 4.0, 900.0, 6.0, 5.0, 4.0, 5.0, 6.0, 5.0];
        assert_eq!(third_medians(&flat), Some([5.0, 5.0, 5.0]));
        // Ten values: the middle third takes the remainder (4 values).
        let step = [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0];
        assert_eq!(third_medians(&step), Some([1.0, 2.0, 3.0]));
        assert_eq!(third_medians(&[1.0, 2.0]), None);
    }

    const A: Allowances = Allowances {
        warmup_fraction: 0.1,
        warmup_min_s: 300.0,
        fd_count: 8.0,
        rss_percent: 5.0,
        rss_floor_kib: 4096.0,
        unexpected_errors: 0,
    };

    /// 361 samples over an hour: `fds(k)` and `rss(k)` at sample k.
    fn run(fds: impl Fn(usize) -> f64, rss: impl Fn(usize) -> f64) -> Vec<Point> {
        (0..=360)
            .map(|k| Point {
                t_s: k as f64 * 10.0,
                fds: fds(k),
                rss_kib: rss(k),
            })
            .collect()
    }

    /// A deterministic wobble in -1..=1.
    fn wobble(k: usize) -> f64 {
        ((k * 7919) % 21) as f64 / 10.0 - 1.0
    }

    #[test]
    fn warmup_is_a_share_with_a_floor_and_a_ceiling() {
        assert_eq!(warmup_s(3600.0, &A), 360.0);
        assert_eq!(warmup_s(1200.0, &A), 300.0);
        assert_eq!(warmup_s(20.0, &A), 10.0);
        let none = Allowances {
            warmup_fraction: 0.0,
            warmup_min_s: 0.0,
            ..A
        };
        assert_eq!(warmup_s(3600.0, &none), 0.0);
    }

    #[test]
    fn slope_and_thirds() {
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), Some(2.0));
        assert_eq!(slope(&[(0.0, 1.0)]), None);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0)]), None);
        let flat = slope(&[(0.0, 5.0), (1.0, 4.0), (2.0, 6.0), (3.0, 5.0)]).unwrap();
        assert!(flat.abs() < 0.31, "{flat}");
        assert_eq!(thirds(&[1.0, 2.0]), None);
        assert_eq!(thirds(&[1.0, 9.0, 3.0]), Some((1.0, 3.0)));
        // Seven values: thirds of two, the middle keeps three.
        assert_eq!(
            thirds(&[1.0, 3.0, 100.0, 100.0, 100.0, 5.0, 7.0]),
            Some((2.0, 6.0))
        );
    }

    #[test]
    fn a_flat_noisy_run_passes() {
        // ±6 descriptors of churn noise, ±1.5 MiB of heap wobble, and a big
        // climb inside the warm-up that must not count.
        let s = run(
            |k| 130.0 + 6.0 * wobble(k) + if k < 30 { k as f64 } else { 30.0 },
            |k| 40_000.0 + 1500.0 * wobble(k + 3) + if k < 30 { 300.0 * k as f64 } else { 9000.0 },
        );
        let v = judge(&s, 3600.0, 0, &A, vec![]);
        assert!(v.pass, "{v:#?}");
        assert_eq!(v.judged_samples, 325);
        assert_eq!((v.judged_from_s, v.judged_to_s), (360.0, 3600.0));
        let fds = v.fds.unwrap();
        assert!(!fds.grows && fds.projected_growth.abs() < 3.0, "{fds:?}");
        assert_eq!(fds.allowance, 8.0);
        let rss = v.rss_kib.unwrap();
        // 5 % of ~49 000 KiB is below the 4 MiB floor.
        assert_eq!(rss.allowance, 4096.0);
        assert!(!rss.grows, "{rss:?}");
    }

    #[test]
    fn a_slow_descriptor_leak_fails() {
        // One descriptor every 200 s: 16 over the judged 54 minutes, hidden
        // in noise of ±6.
        let s = run(|k| 130.0 + 6.0 * wobble(k) + (k / 20) as f64, |_| 40_000.0);
        let v = judge(&s, 3600.0, 0, &A, vec![]);
        assert!(!v.pass);
        let fds = v.fds.unwrap();
        assert!(fds.grows && fds.projected_growth > 12.0, "{fds:?}");
        assert!(v.failures[0].starts_with("open descriptors grow"), "{v:?}");
        assert!(!v.rss_kib.unwrap().grows);
    }

    #[test]
    fn memory_growth_beyond_the_allowance_fails_and_within_passes() {
        // 200 MiB growing 8 % over the run: 5 % of 200 MiB = 10 MiB allowed.
        let base = 200.0 * 1024.0;
        let s = run(|_| 100.0, |k| base * (1.0 + 0.08 * k as f64 / 360.0));
        let v = judge(&s, 3600.0, 0, &A, vec![]);
        assert!(!v.pass);
        let rss = v.rss_kib.unwrap();
        assert!(rss.grows && (rss.allowance - 0.05 * rss.first_third_mean).abs() < 1e-6);
        assert!(v.failures[0].starts_with("RSS grows"), "{v:?}");
        // 2 % over the run stays inside.
        let s = run(|_| 100.0, |k| base * (1.0 + 0.02 * k as f64 / 360.0));
        assert!(judge(&s, 3600.0, 0, &A, vec![]).pass);
        // A one-off step of 16 MiB late in the run: too little of the last
        // third for its mean, but the slope projects it.
        let s = run(
            |_| 100.0,
            |k| base + if k > 300 { 16.0 * 1024.0 } else { 0.0 },
        );
        let v = judge(&s, 3600.0, 0, &A, vec![]);
        let rss = v.rss_kib.unwrap();
        assert!(rss.grows && rss.thirds_growth < rss.allowance, "{rss:?}");
    }

    #[test]
    fn errors_other_failures_and_short_runs_fail() {
        let s = run(|_| 100.0, |_| 40_000.0);
        let v = judge(&s, 3600.0, 2, &A, vec![]);
        assert!(!v.pass);
        assert_eq!(
            v.failures,
            vec!["2 unexpected errors (tolerated: 0)".to_string()]
        );
        let lenient = Allowances {
            unexpected_errors: 2,
            ..A
        };
        assert!(judge(&s, 3600.0, 2, &lenient, vec![]).pass);
        let v = judge(&s, 3600.0, 0, &A, vec!["the appliance exited".into()]);
        assert_eq!(v.failures, vec!["the appliance exited".to_string()]);
        // Eight samples after the warm-up are too few to judge.
        let v = judge(&s[..44], 3600.0, 0, &A, vec![]);
        assert!(!v.pass && v.fds.is_none());
        assert!(v.failures[0].starts_with("only 8 samples"), "{v:?}");
    }
}
