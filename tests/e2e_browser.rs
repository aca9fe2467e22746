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

    let NovncRun {
        out_dir,
        status,
        output,
    } = run_novnc(
        &node,
        &format!("http://{}", proxy.addr),
        &format!("novnc-{io}"),
        &RUNS,
        &[],
    );
    assert!(
        status.success(),
        "io={io}: novnc.mjs failed ({status}):\n{output}\n{}",
        proxy.diagnostics()
    );

    for run in RUNS {
        check_screenshot(&out_dir, run, &output);
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
