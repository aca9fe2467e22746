//! Security rules of the appliance, end to end on both IO backends: what
//! binds a ticket (Origin, client address), which targets a raw session may
//! name, TLS on the console port, who may read `/metrics`, what is parsed
//! before authentication, request time limits, and that nothing a browser
//! sends can forge a log line. See docs/SECURITY.md for the threat model.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

backend_tests!(
    origin_binding_binds_or_refuses,
    raw_targets_stay_inside_the_allowed_networks,
    tls_console_refuses_plain_ws_unless_allowed,
    metrics_can_require_a_token,
    bodies_are_parsed_only_after_authentication,
    slow_requests_end_with_504,
    a_close_reason_cannot_forge_a_log_line,
    readyz_lists_every_worker,
);

fn binding_on(portal: Option<&str>) -> ApplianceOptions {
    let mut t = String::from("bind_origin = true\n");
    if let Some(p) = portal {
        t.push_str(&format!("portal_origin = {p:?}\n"));
    }
    ApplianceOptions {
        sessions_toml: t,
        ..Default::default()
    }
}

/// With `bind_origin` on (the default) a session made without an origin is
/// bound to the portal's, or refused when there is none to bind to; an
/// explicit origin binds; Origins compare case-insensitively.
fn origin_binding_binds_or_refuses(io: &str) {
    let app = Appliance::start(io, binding_on(None));
    let r = app.try_create(&json!({"target": {"kind": "demo"}, "user": "a"}));
    r.assert_api_error(
        400,
        "origin_required",
        "no origin, no portal origin, binding on",
    );
    let r = app
        .try_create(&json!({"target": {"kind": "demo"}, "user": "a", "origin": "https://x/path"}));
    r.assert_api_error(400, "bad_origin", "an origin with a path");

    let app = Appliance::start(io, binding_on(Some("https://portal.example")));
    let s = app.create_demo("a");
    for origin in [
        None,
        Some("http://evil.example"),
        Some("https://portal.example.evil"),
    ] {
        let r = try_ws_connect_with(s.addr, &s.path, &[], origin, IO_TIMEOUT).unwrap_err();
        assert_eq!(r.status, Some(403), "io={io}: Origin {origin:?}: {r:?}");
        assert!(r.body.contains("origin_mismatch"), "io={io}: {r:?}");
    }
    let mut c = try_ws_connect_with(
        s.addr,
        &s.path,
        &[],
        Some("HTTPS://Portal.Example"),
        IO_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("io={io}: the portal's Origin in upper case: {e:?}"));
    rfb_handshake_none(&mut c);

    // An explicit origin overrides the portal's.
    let s = app.create(
        &json!({"target": {"kind": "demo"}, "user": "b", "origin": "https://other.example"}),
    );
    let r = try_ws_connect_with(
        s.addr,
        &s.path,
        &[],
        Some("https://portal.example"),
        IO_TIMEOUT,
    )
    .unwrap_err();
    assert_eq!(r.status, Some(403), "io={io}: {r:?}");
    try_ws_connect_with(
        s.addr,
        &s.path,
        &[],
        Some("https://other.example"),
        IO_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("io={io}: explicit origin: {e:?}"));

    // Binding off: an origin in the request is an error, none binds nothing.
    let app = Appliance::start(io, ApplianceOptions::default());
    let r =
        app.try_create(&json!({"target": {"kind": "demo"}, "user": "a", "origin": "https://p"}));
    r.assert_api_error(400, "origin_binding_disabled", "origin with binding off");
}

/// Raw targets must resolve into `sessions.target_networks`; link-local
/// (the cloud metadata address) is refused whatever the list says.
fn raw_targets_stay_inside_the_allowed_networks(io: &str) {
    let app = Appliance::start(io, ApplianceOptions::default());
    let vnc =
        |host: &str| json!({"target": {"kind": "vnc", "host": host, "port": 80}, "user": "a"});
    for host in ["169.254.169.254", "0.0.0.0", "224.0.0.1", "8.8.8.8"] {
        app.try_create(&vnc(host)).assert_api_error(
            403,
            "target_not_allowed",
            &format!("raw target {host}"),
        );
    }
    assert_eq!(
        app.try_create(&vnc("127.0.0.1")).status,
        201,
        "io={io}: loopback is allowed by default"
    );
    assert_eq!(
        app.try_create(&vnc("10.1.2.3")).status,
        201,
        "io={io}: private ranges are allowed"
    );

    let narrow = Appliance::start(
        io,
        ApplianceOptions {
            sessions_toml: "target_networks = [\"10.9.0.0/16\", \"169.254.0.0/16\"]\n".into(),
            ..Default::default()
        },
    );
    narrow.try_create(&vnc("127.0.0.1")).assert_api_error(
        403,
        "target_not_allowed",
        "loopback outside a narrowed list",
    );
    narrow.try_create(&vnc("169.254.169.254")).assert_api_error(
        403,
        "target_not_allowed",
        "link-local even when listed",
    );
    assert_eq!(narrow.try_create(&vnc("10.9.4.4")).status, 201, "io={io}");
    let text = narrow.get("/metrics").body;
    assert!(
        text.contains("cause=\"target_not_allowed\"} 2"),
        "io={io}: refusals are counted by cause"
    );
}

/// With `[tls]`, the console port speaks wss only (a ticket must not cross
/// in clear), unless `allow_plain` says otherwise.
fn tls_console_refuses_plain_ws_unless_allowed(io: &str) {
    let cert = TestCert::generate();
    let tls_opts = |toml: &str| ApplianceOptions {
        tls: Some((cert.cert_path.clone(), cert.key_path.clone())),
        tls_toml: toml.into(),
        ..Default::default()
    };
    let app = Appliance::start(io, tls_opts(""));
    let s = app.create_demo("a");
    assert!(s.ws_url.starts_with("wss://"), "io={io}: {}", s.ws_url);
    assert!(
        try_ws_connect(s.addr, &s.path, &[]).is_err(),
        "io={io}: plain ws accepted on a TLS console port"
    );
    let mut c = try_wss_connect(s.addr, &s.path, &[], cert.client_config())
        .unwrap_or_else(|e| panic!("io={io}: wss: {e:?}"));
    rfb_handshake_none(&mut c);

    let app = Appliance::start(io, tls_opts("allow_plain = true\n"));
    let s = app.create_demo("a");
    let mut c = try_ws_connect(s.addr, &s.path, &[])
        .unwrap_or_else(|e| panic!("io={io}: plain ws with allow_plain: {e:?}"));
    rfb_handshake_none(&mut c);
    assert!(
        app.stderr().contains("allow_plain is on"),
        "io={io}: the doubtful setting is logged once logging is up"
    );
}

fn metrics_can_require_a_token(io: &str) {
    let open = Appliance::start(io, ApplianceOptions::default());
    assert_eq!(
        open.api("GET", "/metrics", None, None).status,
        200,
        "io={io}"
    );
    let closed = Appliance::start(
        io,
        ApplianceOptions {
            control_toml: "metrics_require_token = true\n".into(),
            ..Default::default()
        },
    );
    closed.api("GET", "/metrics", None, None).assert_api_error(
        401,
        "unauthorized",
        "/metrics without a token",
    );
    let r = closed.api("GET", "/metrics", Some(READ_TOKEN), None);
    assert_eq!(r.status, 200, "io={io}: /metrics with a read token: {r:?}");
    assert!(r.body.contains("consolegate_worker_alive"), "io={io}");
}

/// A stranger's body is never parsed: garbage without a token is a 401,
/// not a 400 that would tell the parser ran.
fn bodies_are_parsed_only_after_authentication(io: &str) {
    let app = Appliance::start(io, ApplianceOptions::default());
    app.api("POST", "/api/v1/sessions", None, Some("{not json"))
        .assert_api_error(401, "unauthorized", "garbage body without a token");
    app.api(
        "POST",
        "/api/v1/sessions",
        Some(READ_TOKEN),
        Some("{not json"),
    )
    .assert_api_error(403, "forbidden", "garbage body with a read token");
    app.api(
        "POST",
        "/api/v1/sessions",
        Some(ADMIN_TOKEN),
        Some("{not json"),
    )
    .assert_api_error(400, "bad_request", "garbage body with the admin token");
    let big = "x".repeat(200 * 1024);
    app.api("POST", "/api/v1/sessions", Some(ADMIN_TOKEN), Some(&big))
        .assert_api_error(413, "body_too_large", "a body over max_request_bytes");
}

/// `control.request_timeout_ms` bounds every request (here a session
/// creation slowed by a failpoint).
fn slow_requests_end_with_504(io: &str) {
    let app = Appliance::start(
        io,
        ApplianceOptions {
            control_toml: "request_timeout_ms = 300\n".into(),
            ..Default::default()
        },
    );
    let r = app.api(
        "PUT",
        "/api/v1/debug/failpoints/api-delay",
        Some(ADMIN_TOKEN),
        Some("return(2000)"),
    );
    assert_eq!(r.status, 204, "io={io}: failpoint: {r:?}");
    let t = std::time::Instant::now();
    app.try_create(&json!({"target": {"kind": "demo"}, "user": "a"}))
        .assert_api_error(
            504,
            "request_timeout",
            "a creation slower than request_timeout_ms",
        );
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "io={io}: took {:?}",
        t.elapsed()
    );
}

/// A browser's close reason with a newline in it is logged escaped, never
/// as a line of its own.
fn a_close_reason_cannot_forge_a_log_line(io: &str) {
    let app = Appliance::start(io, ApplianceOptions::default());
    let s = app.create_demo("a");
    let mut c = ws_connect(io, s.addr, &s.path, &[]);
    rfb_handshake_none(&mut c);
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye\nFORGED level=ERROR admin logged in");
    c.send_raw(&raw_frame(0x8, &payload, Some([1, 2, 3, 4])));
    let (code, _) = c.expect_close(Duration::from_secs(3));
    assert_eq!(code, Some(1000), "io={io}: the echoed close code");
    let rec = app.wait_state(&s.id, "closed", Duration::from_secs(5));
    let log = wait_until(Duration::from_secs(5), "the close log line", || {
        let l = app.stderr();
        l.contains("FORGED").then_some(l)
    });
    for line in log.lines() {
        assert!(
            !line.trim_start().starts_with("FORGED"),
            "io={io}: a browser forged a log line: {line:?}"
        );
    }
    assert!(
        rec["close_reason"]
            .as_str()
            .is_some_and(|r| r.contains("bye\\nFORGED")),
        "io={io}: the recorded reason is escaped too: {rec}"
    );
}

fn readyz_lists_every_worker(io: &str) {
    let app = Appliance::start(
        io,
        ApplianceOptions {
            dataplane_toml: "workers = 2\n".into(),
            ..Default::default()
        },
    );
    let v = app.get_json("/readyz");
    assert_eq!(v["status"], "ready", "io={io}: {v}");
    let workers = v["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2, "io={io}: {v}");
    for w in workers {
        assert_eq!(w["alive"], true, "io={io}: {v}");
        assert!(
            w["last_turn_age_ms"].as_u64().is_some_and(|a| a < 5000),
            "io={io}: {v}"
        );
    }
    let m = app.get("/metrics").body;
    for w in ["0", "1"] {
        assert!(
            m.contains(&format!("consolegate_worker_alive{{worker=\"{w}\"}} 1")),
            "io={io}: worker {w} alive in /metrics"
        );
        assert!(
            m.contains(&format!(
                "consolegate_worker_last_turn_age_seconds{{worker=\"{w}\"}}"
            )),
            "io={io}: worker {w} last turn in /metrics"
        );
    }
}
