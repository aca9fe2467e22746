//! Browser tests: real noVNC in Debian's headless Chromium, driven by
//! tests/browser/novnc.mjs, and the pictures they must show.
//!
//! A run is checked against the framebuffer the VNC server sends, which the
//! test knows: a picture it drew into Xvnc ([`Xvnc::draw_test_card`]), or the
//! appliance's demo pattern ([`ExpectedImage::demo`]). The script waits until
//! noVNC's canvas has the framebuffer's size and the expected colours at
//! sampled points, then saves the canvas itself (at framebuffer size) and a
//! screenshot of the page; [`run_novnc`] then compares every pixel of the
//! canvas, and the screenshot where the canvas is shown, with the expected
//! picture, within small, stated tolerances.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::{ctx, find_program, signal_group, wait_child, x11, Xvnc};

pub const CHROMIUM: &str = "/usr/lib/chromium/chromium";
pub const NOVNC: &str = "/usr/share/novnc";
/// Bound on one page step (load, connect, first picture) inside the script.
pub const STEP_TIMEOUT_MS: u64 = 20_000;
/// Bound on the whole script, past which it is killed with its browser.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(150);
/// Largest difference per colour channel between the canvas and the
/// expected framebuffer: noVNC draws the server's pixels as they are (Raw,
/// or Tight's lossless palettes and fills for flat colours), so only a
/// lossy encoding would come near it.
pub const CANVAS_TOLERANCE: u8 = 8;
/// The same on the screenshot, read at the middle of flat areas only (a
/// scaled canvas is interpolated at edges).
pub const SCREENSHOT_TOLERANCE: u8 = 24;
/// Spacing in framebuffer pixels of the points the script samples and the
/// screenshot is checked at.
const SAMPLE_STEP: u32 = 16;
/// A sample point needs a flat neighbourhood this far around it (in
/// framebuffer pixels) to be checked on a screenshot.
const FLAT_RADIUS: u32 = 3;

pub fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Fails (never skips) naming what is missing and how to get it.
pub fn browser_prerequisites() -> PathBuf {
    let node = find_program("node").unwrap_or_else(|| {
        panic!(
            "node not found: install Node.js >= 20 with npm (NodeSource's nodejs package; \
             scripts/install-deps.sh test checks it)"
        )
    });
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} not found: install Debian package chromium (make test does)"
    );
    assert!(
        Path::new(NOVNC).join("core/rfb.js").is_file()
            && Path::new(NOVNC).join("vnc.html").is_file(),
        "noVNC not found in {NOVNC}: install Debian package novnc (make test does)"
    );
    assert!(
        browser_dir().join("node_modules/playwright-core/package.json").is_file(),
        "tests/browser/node_modules/playwright-core is missing: run `bash scripts/install-deps.sh test` \
         (npm ci in tests/browser; make test does)"
    );
    node
}

// ---------------------------------------------------------------------------
// Expected pictures
// ---------------------------------------------------------------------------

/// The framebuffer a VNC server sends: its size, and for each pixel the
/// colour it must have (`None`: not checked, e.g. where the demo animates).
#[derive(Clone)]
pub struct ExpectedImage {
    pub width: u32,
    pub height: u32,
    pixel: Arc<dyn Fn(u32, u32) -> Option<[u8; 3]> + Send + Sync>,
    /// Checked pixels of the canvas that may differ anyway (a cursor or
    /// pointer drawn into the framebuffer), with why.
    pub mismatch_budget: usize,
    /// Sampled points that may differ (the same, at [`SAMPLE_STEP`]).
    pub sample_mismatch_budget: usize,
    pub what: String,
}

/// The twelve colours of [`ExpectedImage::test_card`], far apart in every
/// channel pair, so a swapped channel, a shifted or mirrored picture, or a
/// wrong pixel format shows.
pub const TEST_CARD_COLOURS: [u32; 12] = [
    0xFF_00_00, 0x00_FF_00, 0x00_00_FF, 0xFF_FF_00, //
    0x00_FF_FF, 0xFF_00_FF, 0xFF_FF_FF, 0x00_00_00, //
    0xFF_80_00, 0x80_00_FF, 0x00_80_40, 0x80_80_80,
];

fn rgb(c: u32) -> [u8; 3] {
    [(c >> 16) as u8, (c >> 8) as u8, c as u8]
}

impl ExpectedImage {
    /// A 4 × 3 grid of flat blocks in [`TEST_CARD_COLOURS`], row by row
    /// from the top left, covering the whole screen.
    pub fn test_card(width: u32, height: u32) -> ExpectedImage {
        ExpectedImage {
            width,
            height,
            pixel: Arc::new(move |x, y| {
                // Xvnc draws the X cursor (its default, 16 × 16 at most)
                // into the framebuffer, where the pointer starts: the
                // middle of the screen.
                let (cx, cy) = (width / 2, height / 2);
                if x.abs_diff(cx) < CURSOR_REACH && y.abs_diff(cy) < CURSOR_REACH {
                    return None;
                }
                let (col, row) = test_card_cell(width, height, x, y);
                Some(rgb(TEST_CARD_COLOURS[(row * 4 + col) as usize]))
            }),
            mismatch_budget: 0,
            sample_mismatch_budget: 0,
            what: format!("the {width}x{height} test card drawn into Xvnc"),
        }
    }

    /// The appliance's demo console (src/hypervisor/demo.rs) at frame
    /// `0..=DEMO_FRAMES_MAX`, which `[demo] frame_interval_ms = 60000`
    /// gives for the first minutes: eight colour bars over the top two
    /// thirds, a blue ramp below. Not checked: where the scrolling stripe
    /// and the bouncing box can be by then (the top left), and the
    /// counters at the bottom.
    pub fn demo(width: u32, height: u32) -> ExpectedImage {
        const BARS: [u32; 8] = [
            0xFF_FF_FF, 0xFF_FF_00, 0x00_FF_FF, 0x00_FF_00, 0xFF_00_FF, 0xFF_00_00, 0x00_00_FF,
            0x00_00_00,
        ];
        let (w, h) = (width as u64, height as u64);
        let bars_h = (h * 2 / 3).max(1);
        let n = DEMO_FRAMES_MAX;
        // The stripe: `stripe_x = n * (w / 64)`, `w / 40` wide.
        let stripe_end = n * (w / 64).max(1) + (w / 40).max(2);
        // The box: at `(n * (w / 50), n * (h / 40))`, `min(w, h) / 10` big.
        let size = (w.min(h) / 10).max(4);
        let box_end_x = n * (w / 50).max(1) + size;
        let box_end_y = n * (h / 40).max(1) + size;
        // The counters: `6 * scale` from the bottom, a swatch `4 * scale`
        // above them.
        let scale = (h / 60).max(1);
        let counters_top = h.saturating_sub(10 * scale);
        ExpectedImage {
            width,
            height,
            pixel: Arc::new(move |x, y| {
                let (x, y) = (x as u64, y as u64);
                if (x < box_end_x && y < box_end_y) || y >= counters_top {
                    return None;
                }
                if y < bars_h {
                    if x < stripe_end {
                        return None;
                    }
                    return Some(rgb(BARS[((x * 8 / w) as usize).min(7)]));
                }
                Some([0, 0, (0x20 + x * 0xA0 / w) as u8])
            }),
            // (The demo draws a client's pointer once the client moves it;
            // nothing moves the mouse in these pages.)
            mismatch_budget: 0,
            sample_mismatch_budget: 0,
            what: format!("the appliance's {width}x{height} demo pattern"),
        }
    }

    pub fn at(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        (self.pixel)(x, y)
    }

    /// Compares `img` (which must have the expected size) with the
    /// picture: how many pixels were checked, how many differ by more than
    /// `tolerance` in a channel, the first few, and their bounding box.
    pub fn compare(&self, img: &image::RgbaImage, tolerance: u8) -> Comparison {
        assert_eq!(
            img.dimensions(),
            (self.width, self.height),
            "{}a {}x{} picture compared with {}",
            ctx(),
            img.width(),
            img.height(),
            self.what
        );
        let mut c = Comparison {
            bbox: (u32::MAX, u32::MAX, 0, 0),
            ..Comparison::default()
        };
        for (x, y, p) in img.enumerate_pixels() {
            let Some(want) = self.at(x, y) else { continue };
            c.checked += 1;
            let got = [p[0], p[1], p[2]];
            if !close(got, want, tolerance) {
                c.differ += 1;
                c.bbox = (
                    c.bbox.0.min(x),
                    c.bbox.1.min(y),
                    c.bbox.2.max(x),
                    c.bbox.3.max(y),
                );
                if c.first.len() < 10 {
                    c.first.push(format!("({x},{y}) {got:?} want {want:?}"));
                }
            }
        }
        c
    }

    /// Points on a [`SAMPLE_STEP`] grid whose colour is known and the same
    /// [`FLAT_RADIUS`] around them.
    pub fn sample_points(&self) -> Vec<(u32, u32, [u8; 3])> {
        let mut v = Vec::new();
        let r = FLAT_RADIUS;
        for y in (SAMPLE_STEP / 2..self.height).step_by(SAMPLE_STEP as usize) {
            for x in (SAMPLE_STEP / 2..self.width).step_by(SAMPLE_STEP as usize) {
                let Some(c) = self.at(x, y) else { continue };
                let flat = (y.saturating_sub(r)..=(y + r).min(self.height - 1)).all(|yy| {
                    (x.saturating_sub(r)..=(x + r).min(self.width - 1))
                        .all(|xx| self.at(xx, yy) == Some(c))
                });
                if flat {
                    v.push((x, y, c));
                }
            }
        }
        v
    }

    /// The script's `--expect` file.
    fn write_expect_file(&self, path: &Path) {
        let points: Vec<serde_json::Value> = self
            .sample_points()
            .iter()
            .map(|(x, y, c)| serde_json::json!([x, y, c[0], c[1], c[2]]))
            .collect();
        assert!(
            points.len() >= 100,
            "{}{}: only {} sample points",
            ctx(),
            self.what,
            points.len()
        );
        let v = serde_json::json!({
            "width": self.width,
            "height": self.height,
            "tolerance": CANVAS_TOLERANCE,
            "max_mismatches": self.sample_mismatch_budget,
            "points": points,
        });
        fs::write(path, v.to_string()).expect("write the expect file");
    }
}

/// The outcome of [`ExpectedImage::compare`].
#[derive(Debug, Default)]
pub struct Comparison {
    pub checked: usize,
    pub differ: usize,
    pub first: Vec<String>,
    /// (min x, min y, max x, max y) of the differing pixels.
    pub bbox: (u32, u32, u32, u32),
}

impl std::fmt::Display for Comparison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} checked pixels differ",
            self.differ, self.checked
        )?;
        if self.differ > 0 {
            let b = self.bbox;
            write!(
                f,
                " (within ({},{})-({},{}); first: {})",
                b.0,
                b.1,
                b.2,
                b.3,
                self.first.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Half the side of the square around the screen's middle that
/// [`ExpectedImage::test_card`] leaves to Xvnc's cursor.
const CURSOR_REACH: u32 = 12;

/// Frames of the demo pattern [`ExpectedImage::demo`] allows for (one a
/// minute at `frame_interval_ms = 60000`).
pub const DEMO_FRAMES_MAX: u64 = 10;

/// `[demo]` keys that make the demo's picture [`ExpectedImage::demo`].
pub fn demo_toml(width: u32, height: u32) -> String {
    format!("width = {width}\nheight = {height}\nframe_interval_ms = 60000\n")
}

/// Column (0..4) and row (0..3) of the test card's block holding (x, y).
fn test_card_cell(width: u32, height: u32, x: u32, y: u32) -> (u32, u32) {
    ((x * 4 / width).min(3), (y * 3 / height).min(2))
}

impl Xvnc {
    /// Paints [`ExpectedImage::test_card`] over the whole root window
    /// (hiding the `-retro` weave) and returns it.
    pub fn draw_test_card(&self) -> ExpectedImage {
        let (w, h) = (self.options.width, self.options.height);
        let mut fills = Vec::new();
        for row in 0..3u32 {
            for col in 0..4u32 {
                let (x0, x1) = (col * w / 4, (col + 1) * w / 4);
                let (y0, y1) = (row * h / 3, (row + 1) * h / 3);
                // Same cell boundaries as `test_card_cell`.
                assert_eq!(test_card_cell(w, h, x0, y0), (col, row));
                assert_eq!(test_card_cell(w, h, x1 - 1, y1 - 1), (col, row));
                fills.push((
                    x0 as i16,
                    y0 as i16,
                    (x1 - x0) as u16,
                    (y1 - y0) as u16,
                    TEST_CARD_COLOURS[(row * 4 + col) as usize],
                ));
            }
        }
        x11::fill_root(self.display, &fills);
        ExpectedImage::test_card(w, h)
    }
}

// ---------------------------------------------------------------------------
// Running the script
// ---------------------------------------------------------------------------

/// One run of the script: its kind (`app`, `none`, `binary`, `viewer`), the
/// WebSocket path (an appliance ticket), the page (`viewer`) and the
/// picture it must show.
#[derive(Clone)]
pub struct BrowserRun {
    pub kind: &'static str,
    pub ws_path: Option<String>,
    pub viewer_url: Option<String>,
    pub expected: ExpectedImage,
    /// Whether noVNC scales the canvas to the window (`resize=scale`).
    pub scaled: bool,
}

impl BrowserRun {
    pub fn new(kind: &'static str, expected: &ExpectedImage) -> BrowserRun {
        BrowserRun {
            kind,
            ws_path: None,
            viewer_url: None,
            expected: expected.clone(),
            scaled: false,
        }
    }

    /// With an appliance session's path (`/proxy/{id}?token=...`).
    pub fn path(mut self, path: &str) -> BrowserRun {
        self.ws_path = Some(path.trim_start_matches('/').to_string());
        self
    }

    /// The `viewer` run of an appliance session's `viewer_url` (noVNC's app
    /// with `resize=scale`).
    pub fn viewer(url: &str, expected: &ExpectedImage) -> BrowserRun {
        BrowserRun {
            kind: "viewer",
            ws_path: None,
            viewer_url: Some(url.to_string()),
            expected: expected.clone(),
            scaled: true,
        }
    }
}

/// The script's process group (node and the Chromium it starts): killed on
/// drop so that no browser outlives the test.
pub struct ScriptGuard(pub Child);

impl Drop for ScriptGuard {
    fn drop(&mut self) {
        let pgid = self.0.id();
        if let Ok(None) = self.0.try_wait() {
            // playwright closes its browser on SIGTERM.
            signal_group(pgid, "TERM");
            if wait_child(&mut self.0, Duration::from_secs(5)).is_none() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        // Whatever is left of the group (a browser process, say).
        signal_group(pgid, "KILL");
    }
}

/// What one run of tests/browser/novnc.mjs left: its output directory and
/// its output.
pub struct NovncRun {
    pub out_dir: PathBuf,
    pub status: ExitStatus,
    pub output: String,
}

/// Runs novnc.mjs with `node`: noVNC from `base` (http or https) in
/// headless Chromium, once per run, into a fresh
/// `CARGO_TARGET_TMPDIR/<out_name>`; asserts that every run passed and
/// checks its canvas and screenshot against its expected picture
/// ([`check_canvas`], [`check_screenshot`]). Panics when the script is
/// still running after [`SCRIPT_TIMEOUT`]; the script's process group is
/// killed either way.
pub fn run_novnc(node: &Path, base: &str, out_name: &str, runs: &[BrowserRun]) -> NovncRun {
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(out_name);
    let _ = fs::remove_dir_all(&out_dir);
    fs::create_dir_all(&out_dir).unwrap();
    let mut args: Vec<String> = vec![
        "--base".into(),
        base.into(),
        "--out-dir".into(),
        out_dir.display().to_string(),
        "--runs".into(),
        runs.iter().map(|r| r.kind).collect::<Vec<_>>().join(","),
        "--chromium".into(),
        CHROMIUM.into(),
        "--timeout-ms".into(),
        STEP_TIMEOUT_MS.to_string(),
    ];
    for r in runs {
        let expect = out_dir.join(format!("expect-{}.json", r.kind));
        r.expected.write_expect_file(&expect);
        args.push("--expect".into());
        args.push(format!("{}={}", r.kind, expect.display()));
        if let Some(p) = &r.ws_path {
            args.push("--ws-path".into());
            args.push(format!("{}={p}", r.kind));
        }
        if let Some(u) = &r.viewer_url {
            args.push("--viewer-url".into());
            args.push(u.clone());
        }
    }
    let log_path = out_dir.join("novnc.log");
    let log = File::create(&log_path).unwrap();
    let child = Command::new(node)
        .arg(browser_dir().join("novnc.mjs"))
        .args(&args)
        .current_dir(browser_dir())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{}spawn node: {e}", ctx()));
    let mut guard = ScriptGuard(child);
    let status = wait_child(&mut guard.0, SCRIPT_TIMEOUT);
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!(
            "{}novnc.mjs still running after {SCRIPT_TIMEOUT:?}; output so far:\n{output}",
            ctx()
        )
    });
    drop(guard);
    assert!(
        status.success(),
        "{}novnc.mjs failed ({status}):\n{output}",
        ctx()
    );
    for r in runs {
        assert!(
            output.contains(&format!("ok run={} ", r.kind)),
            "{}run {} not reported ok:\n{output}",
            ctx(),
            r.kind
        );
        check_canvas(&out_dir, r);
        check_screenshot(&out_dir, r);
    }
    NovncRun {
        out_dir,
        status,
        output,
    }
}

/// What the script recorded about run `run` (`<run>.json`).
pub fn run_record(out_dir: &Path, run: &str) -> serde_json::Value {
    let path = out_dir.join(format!("{run}.json"));
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}{}: {e}", ctx(), path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}{}: {e}", ctx(), path.display()))
}

fn load_png(path: &Path) -> image::RgbaImage {
    let data = fs::read(path).unwrap_or_else(|e| panic!("{}{}: {e}", ctx(), path.display()));
    image::load_from_memory_with_format(&data, image::ImageFormat::Png)
        .unwrap_or_else(|e| panic!("{}{} is not a PNG: {e}", ctx(), path.display()))
        .to_rgba8()
}

fn close(a: [u8; 3], b: [u8; 3], tolerance: u8) -> bool {
    a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= tolerance)
}

/// Every checked pixel of noVNC's canvas (saved at its own size) has the
/// expected colour within [`CANVAS_TOLERANCE`], but for at most the
/// picture's `mismatch_budget`; the canvas has the framebuffer's size.
pub fn check_canvas(out_dir: &Path, run: &BrowserRun) {
    let want = &run.expected;
    let img = load_png(&out_dir.join(format!("canvas-{}.png", run.kind)));
    assert_eq!(
        img.dimensions(),
        (want.width, want.height),
        "{}run {}: the canvas is not the server's {}x{} framebuffer",
        ctx(),
        run.kind,
        want.width,
        want.height
    );
    let c = want.compare(&img, CANVAS_TOLERANCE);
    eprintln!(
        "{}run {}: canvas {}x{}: {c}, compared with {}",
        ctx(),
        run.kind,
        want.width,
        want.height,
        want.what
    );
    assert!(
        c.differ <= want.mismatch_budget,
        "{}run {}: canvas: {c}, compared with {} (at most {} may differ)",
        ctx(),
        run.kind,
        want.what,
        want.mismatch_budget,
    );
}

/// The screenshot shows the canvas where the page says it is, at its size
/// (or scaled with its aspect kept), with the expected colours at the
/// sample points within [`SCREENSHOT_TOLERANCE`].
pub fn check_screenshot(out_dir: &Path, run: &BrowserRun) {
    let want = &run.expected;
    let rec = run_record(out_dir, run.kind);
    let f = |k: &str| {
        rec["rect"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("{}run {}: rect.{k} in {rec}", ctx(), run.kind))
    };
    let (rx, ry, rw, rh) = (f("x"), f("y"), f("width"), f("height"));
    let dpr = rec["devicePixelRatio"].as_f64().unwrap_or(1.0);
    if run.scaled {
        let (a, b) = (rw / rh, want.width as f64 / want.height as f64);
        assert!(
            (a - b).abs() / b < 0.02 && rw >= 100.0,
            "{}run {}: the scaled canvas {rw}x{rh} lost the framebuffer's aspect",
            ctx(),
            run.kind
        );
    } else {
        assert_eq!(
            (rw.round() as u32, rh.round() as u32),
            (want.width, want.height),
            "{}run {}: the canvas is shown at {rw}x{rh}, not at its size",
            ctx(),
            run.kind
        );
    }
    let shot = load_png(&out_dir.join(format!("novnc-{}.png", run.kind)));
    let (sw, sh) = shot.dimensions();
    let points = want.sample_points();
    let (mut differ, mut first) = (0usize, Vec::new());
    for &(x, y, c) in &points {
        let sx = ((rx + (x as f64 + 0.5) * rw / want.width as f64) * dpr) as u32;
        let sy = ((ry + (y as f64 + 0.5) * rh / want.height as f64) * dpr) as u32;
        assert!(
            sx < sw && sy < sh,
            "{}run {}: canvas point ({x},{y}) at ({sx},{sy}) is off the {sw}x{sh} screenshot",
            ctx(),
            run.kind
        );
        let p = shot.get_pixel(sx, sy);
        let got = [p[0], p[1], p[2]];
        if !close(got, c, SCREENSHOT_TOLERANCE) {
            differ += 1;
            if first.len() < 10 {
                first.push(format!("({x},{y})→({sx},{sy}) {got:?} want {c:?}"));
            }
        }
    }
    assert!(
        differ <= want.sample_mismatch_budget,
        "{}run {}: {differ} of {} screenshot points differ from {} (at most {} may); first: {}",
        ctx(),
        run.kind,
        points.len(),
        want.what,
        want.sample_mismatch_budget,
        first.join(", ")
    );
}

// ---------------------------------------------------------------------------
// VMware's own WebMKS client: wmks.js in headless Chromium (tests/browser/wmks.mjs)
// ---------------------------------------------------------------------------

/// The test page (tests/browser/wmks-test.html), served next to wmks.js.
pub const WMKS_PAGE: &str = "wmks-test.html";
/// Bound on the page load and on reaching "connected" inside wmks.mjs.
pub const WMKS_STEP_TIMEOUT_MS: u64 = 20_000;

/// wmks.js as npm's `opennebula-wmks` ships it (one ES module that bundles
/// the jQuery and jQuery UI it needs).
pub fn wmks_js() -> PathBuf {
    browser_dir().join("node_modules/opennebula-wmks/dist/wmks.js")
}

/// Fails (never skips) naming what is missing; returns node's path.
pub fn wmks_prerequisites() -> PathBuf {
    let node = find_program("node").unwrap_or_else(|| {
        panic!(
            "node not found: install Node.js >= 20 with npm (NodeSource's nodejs package; \
             scripts/install-deps.sh test checks it)"
        )
    });
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} not found: install Debian package chromium (make test does)"
    );
    for (what, path) in [
        (
            "playwright-core",
            browser_dir().join("node_modules/playwright-core/package.json"),
        ),
        ("opennebula-wmks", wmks_js()),
    ] {
        assert!(
            path.is_file(),
            "{} is missing ({what}): run `bash scripts/install-deps.sh test` (npm ci in \
             tests/browser; make test does)",
            path.display()
        );
    }
    node
}

/// A directory holding the wmks.js test page and wmks.js, for
/// [`StaticServer`] or as a web root the appliance serves
/// (`console.web_dir`, `consolegate proxy --web`): the page is then at
/// `<origin>/wmks-test.html`.
pub struct WmksSite {
    dir: tempfile::TempDir,
}

impl WmksSite {
    pub fn assemble() -> WmksSite {
        let dir = tempfile::Builder::new()
            .prefix("consolegate-wmks-site-")
            .tempdir()
            .expect("tempdir");
        fs::copy(browser_dir().join(WMKS_PAGE), dir.path().join(WMKS_PAGE))
            .expect("copy wmks-test.html");
        fs::copy(wmks_js(), dir.path().join("wmks.js")).unwrap_or_else(|e| {
            panic!(
                "copy {}: {e} (run `bash scripts/install-deps.sh test`)",
                wmks_js().display()
            )
        });
        WmksSite { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Bound on one request of [`StaticServer`] (request line and headers).
const STATIC_MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Read timeout of one [`StaticServer`] connection.
const STATIC_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A minimal http server on 127.0.0.1:0 that serves the files of one
/// directory (flat: names of letters, digits, `.`, `_`, `-`), one request
/// per connection. Stopped on drop.
pub struct StaticServer {
    pub addr: std::net::SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl StaticServer {
    pub fn start(root: &Path) -> StaticServer {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, root) = (stop.clone(), root.to_path_buf());
        let handle = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let root = root.clone();
                        conns.push(std::thread::spawn(move || serve_static(s, &root)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        StaticServer {
            addr,
            stop,
            handle: Some(handle),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve_static(mut s: std::net::TcpStream, root: &Path) {
    use std::io::{Read, Write};
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(STATIC_READ_TIMEOUT));
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < STATIC_MAX_REQUEST_BYTES {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&req);
    let target = line.split_whitespace().nth(1).unwrap_or("/");
    let name = target
        .split('?')
        .next()
        .unwrap_or("")
        .trim_start_matches('/');
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    let file = valid.then(|| fs::read(root.join(name)).ok()).flatten();
    let (status, body, kind) = match file {
        Some(body) => {
            let kind = match name.rsplit('.').next() {
                Some("html") => "text/html; charset=utf-8",
                Some("js") | Some("mjs") => "text/javascript",
                Some("json") | Some("map") => "application/json",
                Some("css") => "text/css",
                _ => "application/octet-stream",
            };
            ("200 OK", body, kind)
        }
        None => ("404 Not Found", b"not found\n".to_vec(), "text/plain"),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(&body);
}

/// What one run of tests/browser/wmks.mjs saw (times in ms since the page
/// called `connect()`); `record` is the script's whole result
/// (`out_dir/wmks.json`).
#[derive(Debug)]
pub struct WmksRun {
    pub out_dir: PathBuf,
    pub status: ExitStatus,
    pub output: String,
    pub record: serde_json::Value,
    /// wmks.js reported `connected` (RFB handshake done, ServerInit read).
    pub connected: bool,
    /// The connection states in order: (ms, state).
    pub states: Vec<(u64, String)>,
    pub connected_ms: Option<u64>,
    pub disconnected_ms: Option<u64>,
    /// Connected, then disconnected within the watch.
    pub dropped: bool,
    /// From `connected` to the drop, or to the end of the watch.
    pub stayed_connected_ms: u64,
    /// The WebSocket's close code and reason as the page saw them.
    pub close_code: Option<u16>,
    pub close_reason: Option<String>,
    /// The subprotocols wmks.js offered, and the one negotiated (None: the
    /// WebSocket never opened).
    pub offered: Vec<String>,
    pub protocol: Option<String>,
    /// The most distinct colours the canvas showed, and its size.
    pub canvas_colours: u64,
    pub canvas_size: (u32, u32),
    /// The canvas showed more than one colour.
    pub rendered: bool,
    pub rendered_ms: Option<u64>,
    pub rendered_while_connected: bool,
    /// How many client messages began with each byte (127: VMware's own
    /// RFB client messages).
    pub sent_first_bytes: std::collections::BTreeMap<u8, u64>,
    pub messages_received: u64,
    pub bytes_received: u64,
    /// Text messages received (wmks.js fails on them).
    pub text_messages_received: u64,
    /// wmks.js's error events (`websocketerror`, `protocolerror`, …).
    pub errors: Vec<String>,
    pub screenshot: PathBuf,
}

/// Runs wmks.mjs with `node`: the page `page_base/wmks-test.html` (an http
/// origin serving a [`WmksSite`]) connects wmks.js to `ws_url` and is
/// watched for `watch_ms` after `connected`; the results go to a fresh
/// `CARGO_TARGET_TMPDIR/<out_name>`. Returns what the page saw without
/// judging it (the test asserts); panics only when the harness failed
/// (page or wmks.js not loaded, Chromium failed, script timed out). The
/// script's process group is killed either way.
pub fn run_wmks(
    node: &Path,
    page_base: &str,
    ws_url: &str,
    watch_ms: u64,
    out_name: &str,
) -> WmksRun {
    run_wmks_with(node, page_base, ws_url, watch_ms, out_name, None)
}

/// [`run_wmks`] with options for `WMKS.createWMKS` (JSON, e.g.
/// `{"enableVVC": false}`; None: wmks.js's defaults).
pub fn run_wmks_with(
    node: &Path,
    page_base: &str,
    ws_url: &str,
    watch_ms: u64,
    out_name: &str,
    options: Option<&serde_json::Value>,
) -> WmksRun {
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(out_name);
    let _ = fs::remove_dir_all(&out_dir);
    fs::create_dir_all(&out_dir).unwrap();
    let mut args: Vec<String> = vec![
        "--page-base".into(),
        page_base.into(),
        "--ws-url".into(),
        ws_url.into(),
        "--out-dir".into(),
        out_dir.display().to_string(),
        "--watch-ms".into(),
        watch_ms.to_string(),
        "--chromium".into(),
        CHROMIUM.into(),
        "--timeout-ms".into(),
        WMKS_STEP_TIMEOUT_MS.to_string(),
    ];
    if let Some(o) = options {
        args.push("--options".into());
        args.push(o.to_string());
    }
    let log_path = out_dir.join("wmks.log");
    let log = File::create(&log_path).unwrap();
    let child = Command::new(node)
        .arg(browser_dir().join("wmks.mjs"))
        .args(&args)
        .current_dir(browser_dir())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("{}spawn node: {e}", ctx()));
    let mut guard = ScriptGuard(child);
    let limit = Duration::from_millis(2 * WMKS_STEP_TIMEOUT_MS + watch_ms + 30_000);
    let status = wait_child(&mut guard.0, limit);
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!(
            "{}wmks.mjs still running after {limit:?}; output so far:\n{output}",
            ctx()
        )
    });
    drop(guard);
    assert!(
        status.success(),
        "{}wmks.mjs failed ({status}):\n{output}",
        ctx()
    );
    let record = run_record(&out_dir, "wmks");
    parse_wmks_record(out_dir, status, output, record)
}

fn parse_wmks_record(
    out_dir: PathBuf,
    status: ExitStatus,
    output: String,
    record: serde_json::Value,
) -> WmksRun {
    let num = |v: &serde_json::Value| v.as_f64().map(|f| f.max(0.0) as u64);
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string);
    let socket = &record["socket"];
    let states = record["states"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        num(&s["t"]).unwrap_or(0),
                        text(&s["state"]).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let sent_first_bytes = socket["sent_first_bytes"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k.parse::<u8>().ok()?, num(v)?)))
                .collect()
        })
        .unwrap_or_default();
    WmksRun {
        connected: record["connected"].as_bool().unwrap_or(false),
        states,
        connected_ms: num(&record["connected_ms"]),
        disconnected_ms: num(&record["disconnected_ms"]),
        dropped: record["dropped"].as_bool().unwrap_or(false),
        stayed_connected_ms: num(&record["stayed_connected_ms"]).unwrap_or(0),
        close_code: num(&socket["close_code"]).map(|c| c as u16),
        close_reason: text(&socket["close_reason"]),
        offered: socket["offered"]
            .as_array()
            .map(|a| a.iter().filter_map(text).collect())
            .unwrap_or_default(),
        protocol: text(&socket["protocol"]),
        canvas_colours: num(&record["canvas"]["colours"]).unwrap_or(0),
        canvas_size: (
            num(&record["canvas"]["width"]).unwrap_or(0) as u32,
            num(&record["canvas"]["height"]).unwrap_or(0) as u32,
        ),
        rendered: record["rendered"].as_bool().unwrap_or(false),
        rendered_ms: num(&record["rendered_ms"]),
        rendered_while_connected: record["rendered_while_connected"]
            .as_bool()
            .unwrap_or(false),
        sent_first_bytes,
        messages_received: num(&socket["messages_received"]).unwrap_or(0),
        bytes_received: num(&socket["bytes_received"]).unwrap_or(0),
        text_messages_received: num(&socket["text_messages_received"]).unwrap_or(0),
        errors: record["errors"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| text(&e["type"])).collect())
            .unwrap_or_default(),
        screenshot: out_dir.join("wmks.png"),
        out_dir,
        status,
        output,
        record,
    }
}
