//! A hand-written SVG of latency percentile distributions, in the style of
//! HdrHistogram's plotter: x is the percentile on a `1/(1 − p)` log axis
//! (0 %, 90 %, 99 %, 99.9 %, 99.99 %), y the latency (log axis, µs), one
//! panel per concurrency and one line per proxy.
//!
//! Pure: data in, a string out. No dependency beyond `std` and
//! `hdrhistogram` (to turn a histogram into points).

use std::fmt::Write as _;

use hdrhistogram::Histogram;

/// Highest `log10(1/(1-p))` shown: 99.99 %.
pub const X_DECADES: f64 = 4.0;

const PANEL_W: f64 = 560.0;
const PANEL_H: f64 = 330.0;
const MARGIN_L: f64 = 64.0;
const MARGIN_R: f64 = 30.0;
const MARGIN_T: f64 = 30.0;
const MARGIN_B: f64 = 44.0;
const COLUMNS: usize = 2;
const LEGEND_H: f64 = 28.0;
const TITLE_H: f64 = 34.0;

pub struct Series {
    pub name: String,
    pub color: &'static str,
    /// (quantile in 0..1, value), ascending quantile.
    pub points: Vec<(f64, f64)>,
}

pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

/// A fixed color per line name, so a proxy has the same color in every panel.
pub fn color_for(index: usize) -> &'static str {
    const PALETTE: [&str; 8] = [
        "#444444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf",
    ];
    PALETTE[index % PALETTE.len()]
}

/// Points of a histogram's percentile distribution (values divided by
/// `scale`), the same points the `.hgrm` files list, quantile 1.0 excluded.
pub fn points_from_histogram(h: &Histogram<u64>, scale: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    if h.is_empty() {
        return out;
    }
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        if q >= 1.0 {
            break;
        }
        out.push((q, v.value_iterated_to() as f64 / scale));
        if x_of(q) > X_DECADES {
            break;
        }
    }
    out
}

/// `log10(1/(1-q))`: 0 at the median's far left (p0), 1 at p90, 2 at p99…
pub fn x_of(q: f64) -> f64 {
    if q >= 1.0 {
        return f64::INFINITY;
    }
    (1.0 / (1.0 - q.max(0.0))).log10()
}

/// Decade bounds `[10^a, 10^b]` covering `lo..=hi` (values below 1 are
/// clamped to 1).
pub fn decade_bounds(lo: f64, hi: f64) -> (i32, i32) {
    let lo = lo.max(1.0);
    let hi = hi.max(lo);
    let a = lo.log10().floor() as i32;
    let mut b = hi.log10().ceil() as i32;
    if b <= a {
        b = a + 1;
    }
    (a, b)
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt_value(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.0} s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0} ms", v / 1e3)
    } else {
        format!("{v:.0} µs")
    }
}

/// The whole figure: a title, a legend of every line name, and the panels
/// in a grid.
pub fn latency_plot(title: &str, y_label: &str, panels: &[Panel]) -> String {
    // Legend: every distinct series name, in first-seen order.
    let mut names: Vec<(&str, &str)> = Vec::new();
    for p in panels {
        for s in &p.series {
            if !names.iter().any(|(n, _)| *n == s.name) {
                names.push((&s.name, s.color));
            }
        }
    }
    let rows = panels.len().div_ceil(COLUMNS).max(1);
    let cols = panels.len().clamp(1, COLUMNS);
    let width = PANEL_W * cols as f64;
    let height = TITLE_H + LEGEND_H + PANEL_H * rows as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    let mut lx = MARGIN_L;
    let ly = TITLE_H + 14.0;
    for (name, color) in &names {
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2.5"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 22.0,
            lx + 27.0,
            ly + 4.0,
            escape(name)
        );
        lx += 40.0 + 7.0 * name.chars().count() as f64;
    }
    for (i, p) in panels.iter().enumerate() {
        let ox = PANEL_W * (i % COLUMNS) as f64;
        let oy = TITLE_H + LEGEND_H + PANEL_H * (i / COLUMNS) as f64;
        panel(&mut out, p, ox, oy, y_label);
    }
    out.push_str("</svg>\n");
    out
}

fn panel(out: &mut String, p: &Panel, ox: f64, oy: f64, y_label: &str) {
    let x0 = ox + MARGIN_L;
    let x1 = ox + PANEL_W - MARGIN_R;
    let y0 = oy + PANEL_H - MARGIN_B; // bottom
    let y1 = oy + MARGIN_T; // top
    let values = p
        .series
        .iter()
        .flat_map(|s| s.points.iter().filter(|(q, _)| x_of(*q) <= X_DECADES))
        .map(|(_, v)| *v);
    let (lo, hi) = values.fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (a, b) = if lo.is_finite() {
        decade_bounds(lo, hi)
    } else {
        (0, 3)
    };
    let sx = |q: f64| x0 + (x1 - x0) * (x_of(q).min(X_DECADES) / X_DECADES);
    let sy = |v: f64| {
        let t = (v.max(1.0).log10() - f64::from(a)) / f64::from(b - a);
        y0 - (y0 - y1) * t.clamp(0.0, 1.0)
    };
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text>"#,
        (x0 + x1) / 2.0,
        oy + 18.0,
        escape(&p.title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{x0:.1}" y="{y1:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#888"/>"##,
        x1 - x0,
        y0 - y1
    );
    // x grid: 0, 90, 99, 99.9, 99.99 %.
    for (d, label) in ["0%", "90%", "99%", "99.9%", "99.99%"].iter().enumerate() {
        let x = x0 + (x1 - x0) * d as f64 / X_DECADES;
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{y1:.1}" x2="{x:.1}" y2="{y0:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            y0 + 16.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">percentile</text>"#,
        (x0 + x1) / 2.0,
        y0 + 34.0
    );
    // y grid: decades.
    for e in a..=b {
        let v = 10f64.powi(e);
        let y = sy(v);
        let _ = writeln!(
            out,
            r##"<line x1="{x0:.1}" y1="{y:.1}" x2="{x1:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 4.0,
            y + 4.0,
            fmt_value(v)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
        ox + 14.0,
        (y0 + y1) / 2.0,
        ox + 14.0,
        (y0 + y1) / 2.0,
        escape(y_label)
    );
    for s in &p.series {
        let pts: Vec<String> = s
            .points
            .iter()
            .filter(|(q, _)| x_of(*q) <= X_DECADES + 1e-9)
            .map(|(q, v)| format!("{:.1},{:.1}", sx(*q), sy(*v)))
            .collect();
        if pts.len() < 2 {
            continue;
        }
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.8" points="{}"><title>{}</title></polyline>"#,
            s.color,
            pts.join(" "),
            escape(&s.name)
        );
    }
}

/// Legend line inside a time-series panel.
const TS_LEGEND_H: f64 = 18.0;
/// Target number of grid lines per axis of a time-series panel.
const TS_TICKS: f64 = 6.0;

/// One line of a time-series panel: `(seconds, value)`, ascending time.
pub struct TimeSeries {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// A panel of values over time. Linear y from zero by default (so a flat
/// line looks flat and a slow climb is not magnified); logarithmic in
/// decades, with µs/ms/s labels, for latencies that span several.
pub struct TimePanel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<TimeSeries>,
    /// A dashed vertical line at this time, with its label (e.g. the end
    /// of a warm-up).
    pub marker: Option<(f64, String)>,
    /// Values are µs on a log axis.
    pub log_y: bool,
}

/// A round step (1, 2 or 5 × 10^k) near `raw`, for grid lines.
pub fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let mantissa = raw / magnitude;
    let nice = if mantissa <= 1.0 {
        1.0
    } else if mantissa <= 2.0 {
        2.0
    } else if mantissa <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// A step of seconds near `raw` that reads well on a clock: 1, 2, 5, 10,
/// 15, 30 s, 1, 2, 5, 10, 15, 30 min, 1 h, then whole hours.
pub fn time_step(raw: f64) -> f64 {
    const STEPS_S: [f64; 13] = [
        1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0,
    ];
    STEPS_S
        .iter()
        .copied()
        .find(|s| *s >= raw)
        .unwrap_or_else(|| (raw / 3600.0).ceil() * 3600.0)
}

/// The axis top for values up to `max`: a whole number of nice steps, and
/// that step.
pub fn axis_top(max: f64) -> (f64, f64) {
    axis_top_with(max, nice_step)
}

fn axis_top_with(max: f64, step_near: impl Fn(f64) -> f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    // A hair under, so float noise above a round maximum adds no step.
    let max = max * (1.0 - 1e-6);
    let step = step_near(max / TS_TICKS);
    ((max / step).ceil().max(1.0) * step, step)
}

/// Seconds as a tick label: whole minutes as `N min`, else seconds.
pub fn fmt_seconds(s: f64) -> String {
    if s >= 60.0 && (s / 60.0 - (s / 60.0).round()).abs() < 1e-9 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{s:.0} s")
    }
}

/// A tick label: as many decimals as the step needs.
fn fmt_tick(v: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{v:.0}")
    } else if step >= 0.1 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A panel's y axis: where a value goes (0 at the bottom, 1 at the top)
/// and its labelled grid lines.
enum YAxis {
    Linear {
        top: f64,
        step: f64,
    },
    /// Decades 10^low .. 10^high.
    Log {
        low: i32,
        high: i32,
    },
}

impl YAxis {
    fn for_values(values: impl Iterator<Item = f64> + Clone, log: bool) -> YAxis {
        if log {
            let positive = values.filter(|v| v.is_finite() && *v > 0.0);
            let lo = positive.clone().fold(f64::INFINITY, f64::min);
            let hi = positive.fold(0.0f64, f64::max);
            let (low, high) = if lo.is_finite() {
                decade_bounds(lo, hi)
            } else {
                (0, 3)
            };
            YAxis::Log { low, high }
        } else {
            let (top, step) = axis_top(values.fold(0.0f64, f64::max));
            YAxis::Linear { top, step }
        }
    }

    fn fraction(&self, v: f64) -> f64 {
        match *self {
            YAxis::Linear { top, .. } => v / top,
            YAxis::Log { low, high } => {
                (v.max(1.0).log10() - f64::from(low)) / f64::from(high - low)
            }
        }
        .clamp(0.0, 1.0)
    }

    fn ticks(&self) -> Vec<(f64, String)> {
        match *self {
            YAxis::Linear { top, step } => (0..=(top / step).round() as usize)
                .map(|k| step * k as f64)
                .map(|v| (v, fmt_tick(v, step)))
                .collect(),
            YAxis::Log { low, high } => (low..=high)
                .map(|e| 10f64.powi(e))
                .map(|v| (v, fmt_value(v)))
                .collect(),
        }
    }
}

/// Several time-series panels sharing one time axis (up to `x_max`
/// seconds, or the last point), in a grid of two columns, each with its
/// own legend and y axis.
pub fn time_series_plot(title: &str, x_max: Option<f64>, panels: &[TimePanel]) -> String {
    let last = panels
        .iter()
        .flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|pt| pt.0)))
        .fold(0.0f64, f64::max);
    let x_axis = axis_top_with(x_max.unwrap_or(last), time_step);
    let rows = panels.len().div_ceil(COLUMNS).max(1);
    let cols = panels.len().clamp(1, COLUMNS);
    let width = PANEL_W * cols as f64;
    let height = TITLE_H + (PANEL_H + TS_LEGEND_H) * rows as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    for (i, p) in panels.iter().enumerate() {
        let ox = PANEL_W * (i % COLUMNS) as f64;
        let oy = TITLE_H + (PANEL_H + TS_LEGEND_H) * (i / COLUMNS) as f64;
        time_panel(&mut out, p, ox, oy, x_axis);
    }
    out.push_str("</svg>\n");
    out
}

/// The plotting area of a panel, in SVG coordinates, and its scales.
struct Frame {
    x0: f64,
    x1: f64,
    /// Bottom and top.
    y0: f64,
    y1: f64,
    x_top: f64,
    y: YAxis,
}

impl Frame {
    fn sx(&self, t: f64) -> f64 {
        self.x0 + (self.x1 - self.x0) * (t / self.x_top).clamp(0.0, 1.0)
    }

    fn sy(&self, v: f64) -> f64 {
        self.y0 - (self.y0 - self.y1) * self.y.fraction(v)
    }
}

fn time_panel(out: &mut String, p: &TimePanel, ox: f64, oy: f64, x_axis: (f64, f64)) {
    let values = p.series.iter().flat_map(|s| s.points.iter().map(|pt| pt.1));
    let f = Frame {
        x0: ox + MARGIN_L,
        x1: ox + PANEL_W - MARGIN_R,
        y0: oy + TS_LEGEND_H + PANEL_H - MARGIN_B,
        y1: oy + TS_LEGEND_H + MARGIN_T,
        x_top: x_axis.0,
        y: YAxis::for_values(values, p.log_y),
    };
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-weight="bold">{}</text>"#,
        (f.x0 + f.x1) / 2.0,
        oy + 18.0,
        escape(&p.title)
    );
    time_legend(out, p, f.x0, oy + 36.0);
    time_grid(out, p, &f, ox, x_axis.1);
    if let Some((t, label)) = &p.marker {
        let x = f.sx(*t);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#999" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" fill="#666">{}</text>"##,
            f.y1,
            f.y0,
            x + 3.0,
            f.y1 + 12.0,
            escape(label)
        );
    }
    for s in &p.series {
        let pts: Vec<(String, String)> = s
            .points
            .iter()
            .filter(|(t, v)| t.is_finite() && v.is_finite())
            .map(|(t, v)| (format!("{:.1}", f.sx(*t)), format!("{:.1}", f.sy(*v))))
            .collect();
        let pts = without_flat_middles(&pts);
        if pts.len() < 2 {
            continue;
        }
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"><title>{}</title></polyline>"#,
            s.color,
            pts.join(" "),
            escape(&s.name)
        );
    }
}

/// The points of a polyline as `x,y` strings, leaving out every point
/// whose drawn y equals both neighbours' (the middle of a flat run draws
/// nothing), so an hour of a flat series stays a small file.
fn without_flat_middles(pts: &[(String, String)]) -> Vec<String> {
    let mut kept = Vec::with_capacity(pts.len());
    for (i, (x, y)) in pts.iter().enumerate() {
        let flat_before = i > 0 && pts[i - 1].1 == *y;
        let flat_after = i + 1 < pts.len() && pts[i + 1].1 == *y;
        if !(flat_before && flat_after) {
            kept.push(format!("{x},{y}"));
        }
    }
    kept
}

fn time_legend(out: &mut String, p: &TimePanel, x: f64, y: f64) {
    let mut lx = x;
    for s in &p.series {
        let _ = writeln!(
            out,
            r#"<line x1="{lx:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="2.5"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 18.0,
            s.color,
            lx + 22.0,
            y + 4.0,
            escape(&s.name)
        );
        lx += 36.0 + 7.0 * s.name.chars().count() as f64;
    }
}

/// The frame, the time grid every `x_step` seconds, the y grid and the y
/// label.
fn time_grid(out: &mut String, p: &TimePanel, f: &Frame, ox: f64, x_step: f64) {
    let _ = writeln!(
        out,
        r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#888"/>"##,
        f.x0,
        f.y1,
        f.x1 - f.x0,
        f.y0 - f.y1
    );
    for k in 0..=(f.x_top / x_step).round() as usize {
        let t = x_step * k as f64;
        let x = f.sx(t);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            f.y1,
            f.y0,
            f.y0 + 16.0,
            fmt_seconds(t)
        );
    }
    for (v, label) in f.y.ticks() {
        let y = f.sy(v);
        let _ = writeln!(
            out,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
            f.x0,
            f.x1,
            f.x0 - 4.0,
            y + 4.0,
        );
    }
    let mid = (f.y0 + f.y1) / 2.0;
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{mid:.1}" text-anchor="middle" transform="rotate(-90 {:.1} {mid:.1})">{}</text>"#,
        ox + 14.0,
        ox + 14.0,
        escape(&p.y_label)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_map_percentiles_and_decades() {
        assert_eq!(x_of(0.0), 0.0);
        assert!((x_of(0.9) - 1.0).abs() < 1e-12);
        assert!((x_of(0.999) - 3.0).abs() < 1e-9);
        assert!(x_of(1.0).is_infinite());
        assert_eq!(decade_bounds(15.0, 950.0), (1, 3));
        assert_eq!(decade_bounds(0.2, 0.5), (0, 1));
        assert_eq!(decade_bounds(100.0, 100.0), (2, 3));
        assert_eq!(escape("a<b & \"c\""), "a&lt;b &amp; &quot;c&quot;");
        assert_eq!(fmt_value(1000.0), "1 ms");
        assert_eq!(fmt_value(10.0), "10 µs");
    }

    #[test]
    fn points_follow_the_histogram() {
        let mut h = crate::workload::new_histogram();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        let pts = points_from_histogram(&h, 1.0);
        assert!(pts.len() > 20);
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        assert!(pts.iter().all(|(q, _)| *q < 1.0));
        // The median point is near 5000.
        let med = pts.iter().find(|(q, _)| *q >= 0.5).unwrap();
        assert!((med.1 - 5000.0).abs() < 50.0, "{med:?}");
        assert!(points_from_histogram(&crate::workload::new_histogram(), 1.0).is_empty());
    }

    #[test]
    fn time_axes_use_round_steps() {
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(130.0), 200.0);
        assert_eq!(nice_step(0.03), 0.05);
        assert_eq!(axis_top(3600.0), (4000.0, 1000.0));
        assert_eq!(axis_top(3000.0), (3000.0, 500.0));
        assert_eq!(axis_top(0.0), (1.0, 0.2));
        assert_eq!(axis_top(117.0), (120.0, 20.0));
        assert_eq!(time_step(600.0), 600.0);
        assert_eq!(time_step(3.4), 5.0);
        assert_eq!(time_step(2000.0), 3600.0);
        assert_eq!(time_step(9000.0), 10_800.0);
        assert_eq!(axis_top_with(3600.0, time_step), (3600.0, 600.0));
        assert_eq!(axis_top_with(20.0, time_step), (20.0, 5.0));
        assert_eq!(
            axis_top_with(3600.0 * (1.0 + 1e-9), time_step),
            (3600.0, 600.0)
        );
        assert_eq!(fmt_seconds(600.0), "10 min");
        assert_eq!(fmt_seconds(20.0), "20 s");
        assert_eq!(fmt_seconds(90.0), "90 s");
        assert_eq!(fmt_tick(2.5, 0.5), "2.5");
    }

    #[test]
    fn time_series_plot_has_a_line_per_series_and_the_marker() {
        let line = |name: &str, i: usize, v: f64| TimeSeries {
            name: name.into(),
            color: color_for(i),
            points: (0..=10).map(|k| (k as f64 * 360.3, v + k as f64)).collect(),
        };
        let panels = vec![
            TimePanel {
                title: "fds".into(),
                y_label: "open fds".into(),
                series: vec![line("fds", 1, 120.0)],
                marker: Some((360.0, "warm-up".into())),
                log_y: false,
            },
            TimePanel {
                title: "memory".into(),
                y_label: "MiB".into(),
                series: vec![line("RSS", 2, 30.0), line("Vm<HWM>", 3, 31.0)],
                marker: None,
                log_y: false,
            },
            TimePanel {
                title: "one point".into(),
                y_label: "µs".into(),
                series: vec![TimeSeries {
                    name: "p99".into(),
                    color: color_for(4),
                    points: vec![(1.0, 5.0)],
                }],
                marker: None,
                log_y: false,
            },
            TimePanel {
                title: "latency".into(),
                y_label: "µs".into(),
                series: vec![TimeSeries {
                    name: "p99".into(),
                    color: color_for(4),
                    points: vec![(0.0, 150.0), (600.0, 45_000.0), (3600.0, 900.0)],
                }],
                marker: None,
                log_y: true,
            },
        ];
        let svg = time_series_plot("Soak", Some(3600.0), &panels);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert_eq!(svg.matches("stroke-dasharray").count(), 1);
        assert!(svg.contains(">warm-up</text>"));
        assert!(svg.contains("Vm&lt;HWM&gt;"));
        // 3600 s in 10-minute steps.
        assert!(svg.contains(">60 min</text>") && svg.contains(">10 min</text>"));
        // Two columns, two rows.
        assert!(
            svg.contains("width=\"1120\" height=\"730\""),
            "{}",
            &svg[..200]
        );
    }

    #[test]
    fn flat_runs_keep_only_their_ends() {
        let p = |x: &str, y: &str| (x.to_string(), y.to_string());
        let pts = [
            p("1", "5"),
            p("2", "5"),
            p("3", "5"),
            p("4", "7"),
            p("5", "5"),
            p("6", "5"),
        ];
        assert_eq!(
            without_flat_middles(&pts),
            ["1,5", "3,5", "4,7", "5,5", "6,5"]
        );
        assert!(without_flat_middles(&[]).is_empty());
    }

    #[test]
    fn plot_is_one_svg_with_a_line_per_series() {
        let s = |name: &str, i: usize, k: f64| Series {
            name: name.into(),
            color: color_for(i),
            points: vec![
                (0.0, 10.0 * k),
                (0.5, 20.0 * k),
                (0.99, 80.0 * k),
                (0.9999, 400.0 * k),
            ],
        };
        let panels = vec![
            Panel {
                title: "1 session".into(),
                series: vec![s("direct-tcp", 0, 1.0), s("a<b", 1, 3.0)],
            },
            Panel {
                title: "4 sessions".into(),
                series: vec![s("direct-tcp", 0, 2.0), s("single", 2, 1.0)],
            },
            Panel {
                title: "empty".into(),
                series: vec![],
            },
        ];
        let svg = latency_plot("Latency", "round trip", &panels);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert_eq!(svg.matches("</polyline>").count(), 4);
        // Legend lists each name once; names are escaped.
        assert_eq!(svg.matches(">direct-tcp</text>").count(), 1);
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"));
        // Two columns, two rows.
        assert!(
            svg.contains("width=\"1120\" height=\"722\""),
            "{}",
            &svg[..200]
        );
        assert!(svg.contains(">99.99%</text>"));
    }
}
