//! Browser end-to-end test: real noVNC (Debian's /usr/share/novnc, served by
//! the proxy itself with `--web`) in Debian's headless Chromium, driven by
//! playwright-core (`tests/browser/novnc.mjs`), through `consolegate proxy` to
//! a TigerVNC Xvnc, once per IO backend.
//!
//! The script connects three ways (noVNC's vnc.html app; core/rfb.js with no
//! subprotocol; core/rfb.js with `wsProtocols: ['binary']`), waits for the
//! RFB connection, checks the canvas shows the Xvnc desktop and saves PNG
//! screenshots under `target/tmp/novnc-<io>/`.
//!
//! Needs Debian's chromium, novnc and tigervnc-standalone-server, Node.js, and
//! tests/browser/node_modules (`bash scripts/install-deps.sh test`, which
//! `make test` runs). A missing piece fails the test, naming it.

#[macro_use]
mod common;

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

backend_tests!(novnc_in_chromium);

const RUNS: [&str; 3] = ["app", "none", "binary"];

fn novnc_in_chromium(io: &str) {
    let node = browser_prerequisites();
    let xvnc = Xvnc::start_with(XvncOptions {
        width: 640,
        height: 480,
        password: None,
    });
    let proxy = Proxy::start(io, &["--web", NOVNC], Some(&xvnc.target()));

    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("novnc-{io}"));
    let _ = fs::remove_dir_all(&out_dir);
    fs::create_dir_all(&out_dir).unwrap();
    let log_path = out_dir.join("novnc.log");
    let log = File::create(&log_path).unwrap();

    let child = Command::new(&node)
        .arg(browser_dir().join("novnc.mjs"))
        .arg("--base")
        .arg(format!("http://{}", proxy.addr))
        .arg("--out-dir")
        .arg(&out_dir)
        .arg("--runs")
        .arg(RUNS.join(","))
        .arg("--chromium")
        .arg(CHROMIUM)
        .arg("--timeout-ms")
        .arg(STEP_TIMEOUT_MS.to_string())
        .current_dir(browser_dir())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("io={io}: spawn node: {e}"));
    let mut guard = ScriptGuard(child);
    let status = wait_child(&mut guard.0, SCRIPT_TIMEOUT);
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| {
        panic!(
            "io={io}: novnc.mjs still running after {SCRIPT_TIMEOUT:?}; output so far:\n{output}"
        )
    });
    drop(guard);
    assert!(
        status.success(),
        "io={io}: novnc.mjs failed ({status}):\n{output}\n{}",
        proxy.diagnostics()
    );

    for run in RUNS {
        let png = out_dir.join(format!("novnc-{run}.png"));
        let data = fs::read(&png).unwrap_or_else(|e| {
            panic!(
                "io={io}: screenshot {} missing ({e}); output:\n{output}",
                png.display()
            )
        });
        let (w, h) =
            png_size(&data).unwrap_or_else(|| panic!("io={io}: {} is not a PNG", png.display()));
        assert!(
            w >= 640 && h >= 480 && data.len() > 2_000,
            "io={io}: screenshot {} looks empty: {w}x{h}, {} bytes",
            png.display(),
            data.len()
        );
        assert!(
            output.contains(&format!("ok run={run} ")),
            "io={io}: run {run} not reported ok:\n{output}"
        );
    }
    assert!(
        output.contains("protocol=\"binary\""),
        "io={io}: the binary run did not negotiate `binary`:\n{output}"
    );
}
