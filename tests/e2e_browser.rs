//! Browser end-to-end tests: real noVNC (Debian's /usr/share/novnc, served
//! by consolegate itself) in Debian's headless Chromium, driven by
//! playwright-core (`tests/browser/novnc.mjs`), once per IO backend:
//!
//! - through `consolegate proxy --web` to a TigerVNC Xvnc, over ws and over
//!   wss (`--cert/--key`): noVNC's app, core/rfb.js with no subprotocol and
//!   with `binary`;
//! - through the appliance (`consolegate run` with `console.web_dir`), over
//!   ws and with `[tls]` over wss: the demo console and Xvnc sessions, and
//!   the page README tells users to open, the session's `viewer_url`, with
//!   the ticket bound to the console's own origin (`bind_origin`, the
//!   default).
//!
//! Every run must show the server's picture: the test draws a known test
//! card into Xvnc (a minimal X11 client, tests/common/x11.rs), or uses the
//! demo console's deterministic pattern, and compares noVNC's canvas (its
//! size, then every pixel) and the page's screenshot with it
//! (tests/common/browser.rs).
//!
//! Needs Debian's chromium, novnc and tigervnc-standalone-server, Node.js, and
//! tests/browser/node_modules (`bash scripts/install-deps.sh test`, which
//! `make test` runs). A missing piece fails the test, naming it.

#[macro_use]
mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::json;

backend_tests!(
    novnc_through_the_proxy_over_ws,
    novnc_through_the_proxy_over_wss,
    novnc_through_the_appliance_over_ws,
    novnc_through_the_appliance_over_wss,
);

/// Framebuffer of every server here (smaller than the 900×700 page).
const WIDTH: u32 = 640;
const HEIGHT: u32 = 480;

fn xvnc_with_test_card() -> (Xvnc, ExpectedImage) {
    let xvnc = Xvnc::start_with(XvncOptions {
        width: WIDTH,
        height: HEIGHT,
        password: None,
    });
    let card = xvnc.draw_test_card();
    (xvnc, card)
}

/// The three runs through `consolegate proxy`, each checked against the
/// test card; the `binary` one must have negotiated `binary`.
fn proxy_runs(io: &str, tls: Option<&TestCert>) {
    let node = browser_prerequisites();
    let (xvnc, card) = xvnc_with_test_card();
    let mut args = vec!["--web", NOVNC];
    if let Some(c) = tls {
        args.extend(["--cert", c.cert_arg(), "--key", c.key_arg()]);
    }
    let proxy = Proxy::start(io, &args, Some(&xvnc.target()));
    let scheme = if tls.is_some() { "https" } else { "http" };
    let runs = ["app", "none", "binary"].map(|k| BrowserRun::new(k, &card));
    let run = run_novnc(
        &node,
        &format!("{scheme}://{}", proxy.addr),
        &format!("novnc-proxy-{scheme}-{io}"),
        &runs,
    );
    let ws_scheme = if tls.is_some() { "wss://" } else { "ws://" };
    for kind in ["app", "none", "binary"] {
        let rec = run_record(&run.out_dir, kind);
        assert!(
            rec["ws"].as_str().is_some_and(|u| u.starts_with(ws_scheme)),
            "io={io}: run {kind} did not use {ws_scheme}: {rec}"
        );
        let want = if kind == "binary" { "binary" } else { "" };
        assert_eq!(rec["protocol"], want, "io={io}: run {kind}: {rec}");
    }
}

fn novnc_through_the_proxy_over_ws(io: &str) {
    proxy_runs(io, None);
}

fn novnc_through_the_proxy_over_wss(io: &str) {
    let cert = TestCert::generate();
    proxy_runs(io, Some(&cert));
}

/// An appliance that serves noVNC, with a 640×480 demo console frozen at
/// its first frames, TLS when `cert` is given, and Origin binding on (the
/// default: sessions bind to the console's own web origin).
fn appliance(io: &str, cert: Option<&TestCert>) -> Appliance {
    Appliance::start(
        io,
        ApplianceOptions {
            web_dir: Some(PathBuf::from(NOVNC)),
            demo_toml: demo_toml(WIDTH, HEIGHT),
            // A ticket outlives a slow script (the runs use them one
            // after the other).
            sessions_toml: "bind_origin = true\nticket_ttl_ms = 600000\n".into(),
            tls: cert.map(|c| (c.cert_path.clone(), c.key_path.clone())),
            ..ApplianceOptions::default()
        },
    )
}

/// The page README tells users to open, from `POST /api/v1/sessions`.
fn viewer_url(io: &str, app: &Appliance, s: &CreatedSession) -> String {
    let viewer = s.json["viewer_url"]
        .as_str()
        .unwrap_or_else(|| {
            panic!(
                "io={io}: with console.web_dir a shared session has a viewer_url: {}",
                s.json
            )
        })
        .to_string();
    let web_origin = app.public_url.replacen("ws", "http", 1);
    assert!(
        viewer.starts_with(&format!("{web_origin}/vnc.html?")) && viewer.contains(&s.id),
        "io={io}: viewer_url {viewer:?} is not noVNC on the console ({web_origin}) for session {}",
        s.id
    );
    viewer
}

/// After a browser run: the session was opened by it and has ended (the
/// script disconnects), having carried the picture down.
fn assert_session_served(io: &str, app: &Appliance, run: &str, s: &CreatedSession) {
    let rec = app.wait_state(&s.id, "closed", Duration::from_secs(5));
    // The picture itself was checked; here the record must show this
    // session carried it (the test card in Tight is ~600 bytes: a dozen
    // flat rectangles).
    assert!(
        rec["bytes_backend_to_browser"].as_u64() > Some(400)
            && rec["bytes_browser_to_backend"].as_u64() > Some(0),
        "io={io}: run {run}: session {} carried (almost) nothing: {rec}",
        s.id
    );
}

/// Over ws: noVNC's app on a demo session, core/rfb.js on Xvnc sessions
/// (no subprotocol, `binary`), and a demo session's `viewer_url`; each
/// ticket is single-use, so each run has its own session.
fn novnc_through_the_appliance_over_ws(io: &str) {
    let node = browser_prerequisites();
    let (xvnc, card) = xvnc_with_test_card();
    let demo = ExpectedImage::demo(WIDTH, HEIGHT);
    let app = appliance(io, None);
    let xvnc_target = json!({"kind": "vnc", "host": "127.0.0.1", "port": xvnc.port});
    let app_session = app.create_demo("alice");
    let none = app.create(&json!({"target": xvnc_target, "user": "alice"}));
    let binary = app.create(&json!({"target": xvnc_target, "user": "alice"}));
    let viewed = app.create_demo("bob");
    let viewer = viewer_url(io, &app, &viewed);
    let runs = [
        BrowserRun::new("app", &demo).path(&app_session.path),
        BrowserRun::new("none", &card).path(&none.path),
        BrowserRun::new("binary", &card).path(&binary.path),
        BrowserRun::viewer(&viewer, &demo),
    ];
    let run = run_novnc(
        &node,
        &format!("http://{}", app.console),
        &format!("novnc-appliance-http-{io}"),
        &runs,
    );
    assert_eq!(
        run_record(&run.out_dir, "binary")["protocol"],
        "binary",
        "io={io}: the binary run negotiated binary"
    );
    for (kind, s) in [
        ("app", &app_session),
        ("none", &none),
        ("binary", &binary),
        ("viewer", &viewed),
    ] {
        assert_session_served(io, &app, kind, s);
    }
}

/// With `[tls]`: the `viewer_url` is https and its noVNC connects over wss;
/// core/rfb.js with `binary` on an Xvnc session over wss too.
fn novnc_through_the_appliance_over_wss(io: &str) {
    let node = browser_prerequisites();
    let cert = TestCert::generate();
    let (xvnc, card) = xvnc_with_test_card();
    let demo = ExpectedImage::demo(WIDTH, HEIGHT);
    let app = appliance(io, Some(&cert));
    assert!(
        app.public_url.starts_with("wss://"),
        "io={io}: public url {}",
        app.public_url
    );
    let binary = app.create(&json!({
        "target": {"kind": "vnc", "host": "127.0.0.1", "port": xvnc.port}, "user": "alice"
    }));
    let viewed = app.create_demo("bob");
    let viewer = viewer_url(io, &app, &viewed);
    assert!(viewer.starts_with("https://"), "io={io}: {viewer}");
    let runs = [
        BrowserRun::new("binary", &card).path(&binary.path),
        BrowserRun::viewer(&viewer, &demo),
    ];
    let run = run_novnc(
        &node,
        &format!("https://{}", app.console),
        &format!("novnc-appliance-https-{io}"),
        &runs,
    );
    for kind in ["binary", "viewer"] {
        let rec = run_record(&run.out_dir, kind);
        assert!(
            rec["ws"].as_str().is_some_and(|u| u.starts_with("wss://")),
            "io={io}: run {kind} did not use wss: {rec}"
        );
    }
    assert_session_served(io, &app, "binary", &binary);
    assert_session_served(io, &app, "viewer", &viewed);
}
