//! Figures derived from histograms: the reported percentiles, latency added
//! over the direct-TCP baseline, ratios between proxies, and the median across
//! repeated runs (the machine is shared and noisy, so one run proves little).

use hdrhistogram::Histogram;
use serde::Serialize;

/// Reported round-trip figures, in microseconds. Also used for *added*
/// latency (proxied − direct), which can be negative on a noisy machine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    #[serde(rename = "p99.9_us")]
    pub p99_9_us: f64,
    pub max_us: f64,
}

impl Percentiles {
    pub fn from_histogram(h: &Histogram<u64>) -> Percentiles {
        let q = |q: f64| h.value_at_quantile(q) as f64;
        Percentiles {
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p99_9_us: q(0.999),
            max_us: h.max() as f64,
        }
    }

    /// p50, p90, p99, p99.9, max.
    pub fn to_array(self) -> [f64; 5] {
        [
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p99_9_us,
            self.max_us,
        ]
    }

    pub fn from_array(a: [f64; 5]) -> Percentiles {
        Percentiles {
            p50_us: a[0],
            p90_us: a[1],
            p99_us: a[2],
            p99_9_us: a[3],
            max_us: a[4],
        }
    }

    /// `self − base`, figure by figure.
    pub fn minus(self, base: Percentiles) -> Percentiles {
        let (a, b) = (self.to_array(), base.to_array());
        Percentiles::from_array(std::array::from_fn(|i| a[i] - b[i]))
    }

    /// Median of each figure across `runs` (`None` when empty).
    pub fn median_of(runs: &[Percentiles]) -> Option<Percentiles> {
        if runs.is_empty() {
            return None;
        }
        let arrays: Vec<[f64; 5]> = runs.iter().map(|p| p.to_array()).collect();
        let mut out = [0.0; 5];
        for (i, o) in out.iter_mut().enumerate() {
            let col: Vec<f64> = arrays.iter().map(|a| a[i]).collect();
            *o = median(&col)?;
        }
        Some(Percentiles::from_array(out))
    }
}

/// The median: the middle value, or the mean of the two middle values for an
/// even count. `None` for no values; NaNs are ignored.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Pearson's correlation coefficient of the pairs; `None` for fewer than
/// three or when either side does not vary.
pub fn correlation(pairs: &[(f64, f64)]) -> Option<f64> {
    if pairs.len() < 3 {
        return None;
    }
    let n = pairs.len() as f64;
    let mx = pairs.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pairs.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in pairs {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// `added / reference`, when the reference added something measurable.
pub fn ratio(added: f64, reference: f64) -> Option<f64> {
    (reference > 0.0).then(|| added / reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_even_empty_nan() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN]), None);
        assert_eq!(median(&[5.0]), Some(5.0));
        assert_eq!(median(&[9.0, 1.0, 5.0]), Some(5.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[-3.0, f64::NAN, 7.0, 1.0]), Some(1.0));
    }

    #[test]
    fn median_of_runs_is_per_figure() {
        let p = |a: f64, m: f64| Percentiles::from_array([a, a + 1.0, a + 2.0, a + 3.0, m]);
        // The median max comes from a different run than the median p50.
        let m = Percentiles::median_of(&[p(10.0, 500.0), p(30.0, 100.0), p(20.0, 900.0)]).unwrap();
        assert_eq!(m.to_array(), [20.0, 21.0, 22.0, 23.0, 500.0]);
        assert_eq!(Percentiles::median_of(&[]), None);
    }

    #[test]
    fn correlation_of_pairs() {
        let up = [(1.0, 2.0), (2.0, 4.0), (3.0, 6.5)];
        assert!(correlation(&up).unwrap() > 0.99);
        let down = [(1.0, 6.0), (2.0, 4.0), (3.0, 2.0)];
        assert!((correlation(&down).unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(correlation(&[(1.0, 1.0), (2.0, 1.0), (3.0, 1.0)]), None);
        assert_eq!(correlation(&up[..2]), None);
    }

    #[test]
    fn added_and_ratio() {
        let direct = Percentiles::from_array([20.0, 25.0, 40.0, 80.0, 300.0]);
        let proxied = Percentiles::from_array([75.0, 90.0, 30.0, 100.0, 1300.0]);
        let added = proxied.minus(direct);
        assert_eq!(added.to_array(), [55.0, 65.0, -10.0, 20.0, 1000.0]);
        assert_eq!(ratio(55.0, 550.0), Some(0.1));
        assert_eq!(ratio(55.0, 0.0), None);
        assert_eq!(ratio(55.0, -4.0), None);
    }

    #[test]
    fn percentiles_from_histogram() {
        let mut h = crate::workload::new_histogram();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let p = Percentiles::from_histogram(&h);
        assert_eq!(p.p50_us, 500.0);
        assert_eq!(p.p90_us, 900.0);
        assert_eq!(p.p99_us, 990.0);
        assert_eq!(p.p99_9_us, 999.0);
        assert_eq!(p.max_us, 1000.0);
    }
}
