//! End-to-end tests of the appliance (`consolegate run --config FILE`), each
//! run once per IO backend (`name::epoll`, `name::uring`): the REST control
//! API creates sessions, and WebSocket clients (tungstenite) open them on the
//! console port or on dedicated ports, relayed to TigerVNC's Xvnc or to the
//! built-in demo console. (noVNC in Chromium through the appliance:
//! tests/e2e_browser.rs.)
//!
//! Every appliance gets its own temp dir (config, logs, state dir), loopback
//! listeners on port 0 and, for dedicated ports, a range of ports below the
//! kernel's ephemeral range that was free when the test started
//! ([`common::reserve_port_range`]). Every wait is a bounded poll.
//!
//! Needs Debian's tigervnc-standalone-server and tigervnc-tools
//! (`bash scripts/install-deps.sh test`).

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

backend_tests!(
    shared_session_relays_rfb,
    sessions_balanced_over_workers,
    vnc_password_answered_by_appliance,
    ticket_rules,
    delete_revokes_live_session,
    dedicated_ports_200_sessions,
    port_pool_exhausted_and_foreign_port_skipped,
    restart_restores_and_reclaims_ports,
    ports_cli_status_and_cleanup,
    api_auth,
    config_errors,
    metrics_and_health,
    bad_input_does_not_disturb_live_session,
);

/// How long a worker report may take to show in the API (they arrive within
/// ~10-20 ms; generous for a loaded 2-core machine).
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Small helpers of this file
// ---------------------------------------------------------------------------

fn vnc_target(xvnc: &Xvnc, password: Option<&str>) -> Value {
    let mut t = json!({"kind": "vnc", "host": "127.0.0.1", "port": xvnc.port});
    if let Some(pw) = password {
        t["password"] = json!(pw);
    }
    t
}

fn connect(io: &str, s: &CreatedSession) -> PlainClient {
    ws_connect(io, s.addr, &s.path, &[])
}

/// An upgrade request for `path` on `addr`, answered with an HTTP error.
fn refused_upgrade(addr: SocketAddr, path: &str) -> HttpResponse {
    raw_http(addr, &upgrade_request(path, &[]))
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{}{key:?} is not a number in {v}", ctx()))
}

/// RFB ProtocolVersion exchange (3.8); returns the security types offered.
fn rfb_offer(c: &mut PlainClient) -> Vec<u8> {
    let greeting = c.expect_bytes(12, "the RFB ProtocolVersion");
    assert_eq!(&greeting, RFB_38, "{}RFB greeting", ctx());
    c.send(RFB_38);
    let n = c.expect_bytes(1, "the number of security types")[0] as usize;
    if n == 0 {
        let len = u32::from_be_bytes(c.expect_bytes(4, "the reason length").try_into().unwrap());
        let reason = c.expect_bytes(len.min(4096) as usize, "the reason");
        panic!(
            "{}0 security types offered: {:?}",
            ctx(),
            String::from_utf8_lossy(&reason)
        );
    }
    c.expect_bytes(n, "the security types")
}

/// After [`rfb_offer`]: choose None, expect SecurityResult OK, ClientInit
/// (shared), read ServerInit.
fn rfb_choose_none(c: &mut PlainClient) -> ServerInit {
    c.send(&[1]);
    let result = c.expect_bytes(4, "the SecurityResult");
    assert_eq!(result, [0, 0, 0, 0], "{}SecurityResult is not OK", ctx());
    c.send(&[1]);
    let init = c.expect_bytes(24, "the ServerInit");
    let name_len = u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize;
    assert!(name_len < 4096, "{}absurd desktop name length", ctx());
    let name = c.expect_bytes(name_len, "the desktop name");
    ServerInit {
        width: u16::from_be_bytes([init[0], init[1]]),
        height: u16::from_be_bytes([init[2], init[3]]),
        bits_per_pixel: init[4],
        name: String::from_utf8_lossy(&name).into_owned(),
    }
}

/// A full (non-incremental) Raw FramebufferUpdate of the whole screen:
/// asserts the reply is a FramebufferUpdate and reads all its rectangles;
/// returns their pixels, concatenated.
fn rfb_full_update(c: &mut PlainClient, init: &ServerInit, what: &str) -> Vec<u8> {
    // SetEncodings: Raw only, so every rectangle's size is known.
    c.send(&[2, 0, 0, 1, 0, 0, 0, 0]);
    let mut req = vec![3, 0, 0, 0, 0, 0];
    req.extend_from_slice(&init.width.to_be_bytes());
    req.extend_from_slice(&init.height.to_be_bytes());
    c.send(&req);
    let head = c.expect_bytes(4, "the FramebufferUpdate header");
    assert_eq!(
        head[0],
        0,
        "{}{what}: expected a FramebufferUpdate, got message type {}",
        ctx(),
        head[0]
    );
    let rects = u16::from_be_bytes([head[2], head[3]]);
    assert!(
        rects >= 1,
        "{}{what}: FramebufferUpdate with no rectangle",
        ctx()
    );
    let bpp = init.bits_per_pixel as usize / 8;
    let mut pixels = Vec::new();
    for i in 0..rects {
        let r = c.expect_bytes(12, "a rectangle header");
        let (w, h) = (
            u16::from_be_bytes([r[4], r[5]]) as usize,
            u16::from_be_bytes([r[6], r[7]]) as usize,
        );
        let encoding = i32::from_be_bytes(r[8..12].try_into().unwrap());
        assert_eq!(
            encoding,
            0,
            "{}{what}: rectangle {i} not Raw (asked for Raw only)",
            ctx()
        );
        pixels.extend(c.expect_bytes(w * h * bpp, "a rectangle's pixels"));
    }
    assert!(!pixels.is_empty(), "{}{what}: no pixels", ctx());
    pixels
}

fn distinct_colours(pixels: &[u8]) -> usize {
    let mut c: Vec<&[u8]> = pixels.chunks(4).collect();
    c.sort();
    c.dedup();
    c.len()
}

/// Sum of the samples of metric `name` whose labels contain `label` (all
/// samples when `None`), or `None` when there is no such sample.
fn metric_sum(text: &str, name: &str, label: Option<&str>) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(l) = label {
            if !rest.split('}').next().unwrap_or("").contains(l) {
                continue;
            }
        }
        if let Some(v) = rest
            .rsplit_once(' ')
            .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// `(port, owner)` pairs of `<state_dir>/ports.json`.
/// Allocations are written coalesced (within ~200 ms of a change): poll
/// until `ports.json` lists exactly `expected`, then return it.
fn wait_persisted(state_dir: &Path, expected: &BTreeSet<(u16, u64)>) -> BTreeSet<(u16, u64)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = persisted_allocations(state_dir);
        if &got == expected || Instant::now() >= deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn persisted_allocations(state_dir: &Path) -> BTreeSet<(u16, u64)> {
    let path = state_dir.join("ports.json");
    let text = fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}read {}: {e}", ctx(), path.display()));
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{}{} is not JSON ({e}): {text}", ctx(), path.display()));
    v["allocations"]
        .as_array()
        .unwrap_or_else(|| {
            panic!(
                "{}{} has no allocations array: {text}",
                ctx(),
                path.display()
            )
        })
        .iter()
        .map(|a| (u64_of(a, "port") as u16, u64_of(a, "owner")))
        .collect()
}

fn owner_of(s: &CreatedSession) -> u64 {
    u64::from_str_radix(&s.id, 16)
        .unwrap_or_else(|e| panic!("{}session id {:?} is not hex: {e}", ctx(), s.id))
}

fn dedicated_demo(user: &str) -> Value {
    json!({"target": {"kind": "demo"}, "user": user, "port_mode": "dedicated"})
}

/// Waits until every port of `ports` can be bound on 127.0.0.1 (SO_REUSEADDR,
/// as listeners do): after an appliance exits, the kernel may keep its
/// sockets a few milliseconds longer (io_uring rings are torn down
/// asynchronously after the process is gone).
fn wait_ports_bindable(ports: &BTreeSet<u16>, what: &str) {
    wait_until(Duration::from_secs(10), what, || {
        ports
            .iter()
            .all(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok())
            .then_some(())
    });
}

fn range_ports(r: (u16, u16)) -> BTreeSet<u16> {
    (r.0..=r.1).collect()
}

// ---------------------------------------------------------------------------
// 1. A shared-port session relays RFB both ways
// ---------------------------------------------------------------------------

/// POST a session for a real Xvnc, open its ws_url on the console port, do
/// the RFB handshake and a FramebufferUpdate; the API shows pending → open
/// → closed with byte counts.
fn shared_session_relays_rfb(io: &str) {
    let xvnc = Xvnc::start();
    let card = xvnc.draw_test_card();
    let app = Appliance::start(io, ApplianceOptions::default());
    let before = now_unix_ms();
    let s = app.create(&json!({
        "target": vnc_target(&xvnc, None), "user": "alice", "vm_id": "vm-1"
    }));
    assert_eq!(
        s.port, None,
        "io={io}: a shared session has no dedicated port: {}",
        s.json
    );
    assert_eq!(
        s.addr, app.console,
        "io={io}: a shared session's ws_url must point at the console port: {}",
        s.ws_url
    );
    assert_eq!(
        s.path,
        format!("/proxy/{}?token={}", s.id, s.token),
        "io={io}: ws_url path"
    );
    assert!(
        s.ws_url.starts_with(&app.public_url),
        "io={io}: ws_url {} is not under the public url {}",
        s.ws_url,
        app.public_url
    );
    let exp = u64_of(&s.json, "expires_at_ms");
    assert!(
        exp > before && exp < before + 3_600_000,
        "io={io}: expires_at_ms {exp} (now {before})"
    );
    let rec = app.session(&s.id);
    assert_eq!(rec["state"], "pending", "io={io}: before connecting: {rec}");
    assert_eq!(rec["user"], "alice", "io={io}: {rec}");
    assert_eq!(rec["port_mode"], "shared", "io={io}: {rec}");

    let mut c = connect(io, &s);
    let init = rfb_handshake_none(&mut c);
    assert_eq!(
        (init.width as u32, init.height as u32),
        (xvnc.options.width, xvnc.options.height),
        "io={io}: ServerInit size is Xvnc's"
    );
    // The framebuffer is exactly the test card drawn into Xvnc.
    let fb = rfb_framebuffer(&mut c, init.width, init.height);
    let cmp = card.compare(&fb, 0);
    assert_eq!(cmp.differ, 0, "io={io}: the relayed framebuffer: {cmp}");
    let pixel_bytes = fb.len() as u64;
    let open = app.wait_state(&s.id, "open", REPORT_TIMEOUT);
    assert!(
        open["worker"].is_u64(),
        "io={io}: an open session names its worker: {open}"
    );

    c.close();
    let closed = app.wait_state(&s.id, "closed", REPORT_TIMEOUT);
    let up = u64_of(&closed, "bytes_browser_to_backend");
    let down = u64_of(&closed, "bytes_backend_to_browser");
    assert!(
        up > 12 + 1,
        "io={io}: bytes_browser_to_backend {up}: at least the version, security type and ClientInit went up: {closed}"
    );
    assert!(
        down >= pixel_bytes,
        "io={io}: bytes_backend_to_browser {down} < the {pixel_bytes} pixel bytes received: {closed}"
    );
    let list = app.get_json("/api/v1/sessions");
    let found = list["sessions"]
        .as_array()
        .is_some_and(|a| a.iter().any(|r| r["session_id"] == s.id.as_str()));
    assert!(
        found,
        "io={io}: GET /api/v1/sessions lists the session: {list}"
    );
}

/// Sessions spread evenly over the workers whatever the kernel's SO_REUSEPORT
/// hash picks (alone, it puts 8 connections 4 and 4 on two workers only 27 %
/// of the time): 8 browsers on 2 workers end up 4 and 4, every one reaches
/// its console (the handed-over ones too), and the hand-overs are counted.
fn sessions_balanced_over_workers(io: &str) {
    let app = Appliance::start(
        io,
        ApplianceOptions {
            dataplane_toml: "workers = 2\n".into(),
            ..Default::default()
        },
    );
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for i in 0..8 {
        let s = app.create(&json!({"target": {"kind": "demo"}, "user": format!("user-{i}")}));
        let mut c = connect(io, &s);
        let init = rfb_handshake_none(&mut c);
        assert!(
            init.width > 0,
            "io={io}: session {i} reached the demo console"
        );
        ids.push(s.id.clone());
        clients.push(c);
    }
    let mut per_worker = [0usize; 2];
    for id in &ids {
        let open = app.wait_state(id, "open", REPORT_TIMEOUT);
        let w = open["worker"]
            .as_u64()
            .unwrap_or_else(|| panic!("io={io}: an open session names its worker: {open}"));
        per_worker[w as usize] += 1;
    }
    assert_eq!(
        per_worker,
        [4, 4],
        "io={io}: 8 sessions on 2 workers, per worker"
    );
    let stats = wait_until(
        REPORT_TIMEOUT,
        "worker reports with 4 live sessions each",
        || {
            let st = app.get_json("/api/v1/stats");
            let w = st["workers"].as_array()?.clone();
            (w.len() == 2 && w.iter().all(|x| x["live_sessions"] == 4)).then_some(w)
        },
    );
    let handed: u64 = stats.iter().map(|x| u64_of(x, "handed_over")).sum();
    let adopted: u64 = stats.iter().map(|x| u64_of(x, "adopted")).sum();
    assert_eq!(
        handed, adopted,
        "io={io}: every hand-over was adopted: {stats:?}"
    );
    let accepted: u64 = stats.iter().map(|x| u64_of(x, "accepted")).sum();
    assert_eq!(accepted, 8, "io={io}: 8 connections accepted: {stats:?}");
    let metrics = app.get("/metrics").body;
    assert_eq!(
        metric_sum(&metrics, "consolegate_handed_over_total", None),
        Some(handed as f64),
        "io={io}: /metrics counts the hand-overs"
    );
    for c in clients {
        c.close();
    }
}

// ---------------------------------------------------------------------------
// 2. VNC passwords stay in the appliance
// ---------------------------------------------------------------------------

/// The appliance answers VncAuth itself: the browser is offered None only
/// and reaches Xvnc's ServerInit; a wrong password gives the browser a
/// failed SecurityResult and close 1011; the demo with a password behaves
/// the same.
fn vnc_password_answered_by_appliance(io: &str) {
    const PW: &str = "s3cretpw";
    let xvnc = Xvnc::with_password(PW);
    let app = Appliance::start(
        io,
        ApplianceOptions {
            demo_password: Some("demopw12".into()),
            ..ApplianceOptions::default()
        },
    );

    // Right password.
    let good = app.create(&json!({"target": vnc_target(&xvnc, Some(PW)), "user": "alice"}));
    let rec = app.session(&good.id);
    assert_eq!(
        rec["target"]["has_password"], true,
        "io={io}: the record says there is a password: {rec}"
    );
    let listing = app.get("/api/v1/sessions");
    assert!(
        !rec.to_string().contains(PW) && !listing.body.contains(PW),
        "io={io}: the VNC password leaks through the API: {rec}"
    );
    let mut c = connect(io, &good);
    let types = rfb_offer(&mut c);
    assert_eq!(
        types,
        vec![1],
        "io={io}: the browser must be offered security type None only"
    );
    let init = rfb_choose_none(&mut c);
    assert_eq!(
        (init.width as u32, init.height as u32),
        (xvnc.options.width, xvnc.options.height),
        "io={io}: ServerInit from Xvnc"
    );
    let pixels = rfb_full_update(&mut c, &init, "update after VncAuth");
    assert!(distinct_colours(&pixels) > 1, "io={io}: Xvnc pixels");
    app.wait_state(&good.id, "open", REPORT_TIMEOUT);
    c.close();

    // Wrong password.
    let bad = app.create(&json!({"target": vnc_target(&xvnc, Some("wrongpw1")), "user": "alice"}));
    let mut c = connect(io, &bad);
    let types = rfb_offer(&mut c);
    assert_eq!(
        types,
        vec![1],
        "io={io}: wrong password: still None only towards the browser"
    );
    c.send(&[1]);
    let result = c.expect_bytes(4, "the SecurityResult (wrong password)");
    assert_eq!(
        result,
        [0, 0, 0, 1],
        "io={io}: a wrong backend password must give the browser SecurityResult failed"
    );
    let (code, reason) = c.expect_close(IO_TIMEOUT);
    assert_eq!(
        code,
        Some(1011),
        "io={io}: close code after a failed backend authentication (reason {reason:?})"
    );
    let rec = app.wait_state(&bad.id, "closed", REPORT_TIMEOUT);
    assert_eq!(
        rec["close_code"], 1011,
        "io={io}: the record's close code: {rec}"
    );

    // The demo console with [demo] password.
    let d = app.create_demo("carol");
    let rec = app.session(&d.id);
    assert_eq!(
        rec["target"]["has_password"], true,
        "io={io}: the demo target carries [demo] password: {rec}"
    );
    let mut c = connect(io, &d);
    let types = rfb_offer(&mut c);
    assert_eq!(types, vec![1], "io={io}: demo with a password: None only");
    let init = rfb_choose_none(&mut c);
    assert_eq!(
        (init.width, init.height),
        (320, 200),
        "io={io}: the demo's configured size"
    );
    let pixels = rfb_full_update(&mut c, &init, "demo update");
    assert!(distinct_colours(&pixels) > 1, "io={io}: demo pixels");
    c.close();
}

// ---------------------------------------------------------------------------
// 3. Tickets: single use, right token, TTL, known session
// ---------------------------------------------------------------------------

fn ticket_rules(io: &str) {
    let app = Appliance::start(io, ApplianceOptions::default());
    let s = app.create_demo("alice");

    // A wrong token: refused, and the ticket stays usable.
    let wrong = "A".repeat(s.token.len());
    let r = refused_upgrade(s.addr, &s.path_with_token(&wrong));
    r.assert_api_error(403, "bad_ticket", "wrong token");
    assert_eq!(
        app.session(&s.id)["state"],
        "pending",
        "io={io}: a wrong token must not consume the session"
    );

    let mut c = connect(io, &s);
    let open = app.wait_state(&s.id, "open", REPORT_TIMEOUT);
    let refused_before = u64_of(&open, "refused_connects");

    // The same ticket again while the first connection is live.
    let r = refused_upgrade(s.addr, &s.path);
    r.assert_api_error(403, "ticket_replay", "replayed ticket");
    app.wait_session(
        &s.id,
        &format!("refused_connects == {}", refused_before + 1),
        REPORT_TIMEOUT,
        |v| v["refused_connects"].as_u64() == Some(refused_before + 1),
    );
    // The replay did not disturb the first connection.
    let init = rfb_handshake_none(&mut c);
    rfb_full_update(&mut c, &init, "after the replay");
    c.close();
    app.wait_state(&s.id, "closed", REPORT_TIMEOUT);
    let r = refused_upgrade(s.addr, &s.path);
    r.assert_api_error(
        403,
        "ticket_replay",
        "a used ticket after its session closed",
    );

    // Unknown session id.
    let r = refused_upgrade(
        app.console,
        "/proxy/0123456789abcdef?token=AAAAAAAAAAAAAAAAAAAAAA",
    );
    r.assert_api_error(404, "unknown_session", "unknown session id");
    let r = app.get("/api/v1/sessions/0123456789abcdef");
    r.assert_api_error(404, "session_not_found", "GET unknown session");

    // TTL: ttl_s 1, unused → expired, then refused.
    let t = app.create(&json!({"target": {"kind": "demo"}, "user": "bob", "ttl_s": 1}));
    let exp = u64_of(&t.json, "expires_at_ms");
    let now = now_unix_ms();
    assert!(
        exp > now && exp <= now + 2_000,
        "io={io}: ttl_s 1 → expires_at_ms {exp} (now {now})"
    );
    let created = Instant::now();
    let rec = app.wait_state(&t.id, "expired", Duration::from_secs(6));
    assert!(
        created.elapsed() >= Duration::from_millis(900),
        "io={io}: expired after {:?}, before its 1 s TTL: {rec}",
        created.elapsed()
    );
    let r = refused_upgrade(t.addr, &t.path);
    r.assert_api_error(410, "ticket_expired", "connect with an expired ticket");
    assert_eq!(
        app.session(&t.id)["state"],
        "expired",
        "io={io}: stays expired after the refused connect"
    );
}

// ---------------------------------------------------------------------------
// 4. DELETE ends a live relay
// ---------------------------------------------------------------------------

fn delete_revokes_live_session(io: &str) {
    let xvnc = Xvnc::start();
    let app = Appliance::start(io, ApplianceOptions::default());
    let s = app.create(&json!({"target": vnc_target(&xvnc, None), "user": "alice"}));
    let mut c = connect(io, &s);
    let init = rfb_handshake_none(&mut c);
    rfb_full_update(&mut c, &init, "before DELETE");
    app.wait_state(&s.id, "open", REPORT_TIMEOUT);

    let t0 = Instant::now();
    let r = app.delete(&s.id);
    assert_eq!(r.status, 200, "io={io}: DELETE: {r:?}");
    let (code, reason) = c.expect_close(Duration::from_secs(5));
    let took = t0.elapsed();
    assert_eq!(
        code,
        Some(1008),
        "io={io}: close code of a revoked session (reason {reason:?})"
    );
    assert!(
        reason.contains("revoked"),
        "io={io}: close reason {reason:?} should say revoked"
    );
    assert!(
        took < Duration::from_secs(1),
        "io={io}: the relay closed {took:?} after DELETE; must be within 1 s"
    );
    assert_eq!(
        app.session(&s.id)["state"],
        "revoked",
        "io={io}: state right after DELETE"
    );
    // The worker's close report adds the relay's figures to the record.
    let rec = app.wait_session(
        &s.id,
        "the close report (close_code 1008, byte counts)",
        REPORT_TIMEOUT,
        |v| v["close_code"] == 1008 && v["bytes_backend_to_browser"].as_u64() > Some(0),
    );
    assert_eq!(rec["state"], "revoked", "io={io}: stays revoked: {rec}");
    let r = app.delete(&s.id);
    r.assert_api_error(404, "session_not_found", "second DELETE");
    // Still 403 after the worker dropped the admission: tombstones keep
    // the documented answer (it was a 404 once).
    let r = refused_upgrade(s.addr, &s.path);
    r.assert_api_error(
        403,
        "ticket_replay",
        "the ticket of a revoked, used session",
    );
}

// ---------------------------------------------------------------------------
// 5. Dedicated ports: 200 sessions at once
// ---------------------------------------------------------------------------

fn dedicated_ports_200_sessions(io: &str) {
    const N: usize = 200;
    const THREADS: usize = 4;
    let range = reserve_port_range(250);
    let app = Appliance::start(
        io,
        ApplianceOptions {
            port_range: Some(range),
            sessions_toml: "max_sessions_per_user = 300\n".into(),
            ..ApplianceOptions::default()
        },
    );

    let started = Instant::now();
    let mut sessions: Vec<CreatedSession> = thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let app = &app;
                scope.spawn(move || {
                    set_current_io(io);
                    (0..N / THREADS)
                        .map(|_| app.create(&dedicated_demo(&format!("user{t}"))))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("create thread"))
            .collect()
    });
    eprintln!(
        "io={io}: {N} dedicated sessions created in {:?}",
        started.elapsed()
    );
    sessions.sort_by_key(|s| s.port);

    let ports: BTreeSet<u16> = sessions
        .iter()
        .map(|s| {
            let p = s
                .port
                .unwrap_or_else(|| panic!("io={io}: dedicated session without a port: {}", s.json));
            assert!(
                (range.0..=range.1).contains(&p),
                "io={io}: port {p} outside {range:?}"
            );
            assert_eq!(
                s.addr,
                SocketAddr::from(([127, 0, 0, 1], p)),
                "io={io}: ws_url {} must use the dedicated port",
                s.ws_url
            );
            p
        })
        .collect();
    assert_eq!(
        ports.len(),
        N,
        "io={io}: {N} sessions must get {N} distinct ports"
    );
    let stats = app.ports();
    assert_eq!(stats["allocated_ports"], N, "io={io}: /ports: {stats}");
    assert_eq!(stats["total_ports"], 250, "io={io}: /ports: {stats}");
    assert_eq!(
        stats["free_ports"].as_u64(),
        Some(250 - N as u64),
        "io={io}: /ports: {stats}"
    );
    let expected: BTreeSet<(u16, u64)> = sessions
        .iter()
        .map(|s| (s.port.unwrap(), owner_of(s)))
        .collect();
    let persisted = wait_persisted(&app.state_dir, &expected);
    assert_eq!(
        persisted, expected,
        "io={io}: ports.json lists every allocation"
    );

    // A dedicated port serves its own session only (the refusal leaves
    // both tickets unused).
    let (a, b) = (&sessions[10], &sessions[11]);
    let r = refused_upgrade(a.addr, &b.path);
    r.assert_api_error(
        404,
        "unknown_session",
        &format!(
            "session {}'s ticket on session {}'s dedicated port",
            b.id, a.id
        ),
    );

    // A handful relay (first, last, both of the above and some in between),
    // and stay open until their sessions are deleted.
    let picks = [0, 10, 11, N / 2, N - 2, N - 1];
    let mut clients = Vec::new();
    for &i in &picks {
        let s = &sessions[i];
        let mut c = connect(io, s);
        let init = rfb_handshake_none(&mut c);
        rfb_full_update(&mut c, &init, &format!("dedicated port {:?}", s.port));
        clients.push(c);
    }
    for &i in &picks {
        app.wait_state(&sessions[i].id, "open", REPORT_TIMEOUT);
    }

    for s in &sessions {
        let r = app.delete(&s.id);
        assert_eq!(r.status, 200, "io={io}: DELETE {}: {r:?}", s.id);
    }
    for (c, &i) in clients.iter_mut().zip(&picks) {
        let (code, _) = c.expect_close(Duration::from_secs(5));
        assert_eq!(
            code,
            Some(1008),
            "io={io}: live session on port {:?} after DELETE",
            sessions[i].port
        );
    }
    app.wait_allocated(0, Duration::from_secs(15));
    wait_until(
        Duration::from_secs(5),
        "ports.json to list no allocation",
        || {
            persisted_allocations(&app.state_dir)
                .is_empty()
                .then_some(())
        },
    );
    for &i in &picks {
        let p = sessions[i].port.unwrap();
        assert!(
            TcpStream::connect(("127.0.0.1", p)).is_err(),
            "io={io}: port {p} still accepts after its session was deleted"
        );
    }
}

// ---------------------------------------------------------------------------
// 6. Port pool exhaustion; ports held by other processes
// ---------------------------------------------------------------------------

fn port_pool_exhausted_and_foreign_port_skipped(io: &str) {
    // A: 3 ports, 4th session refused.
    let range = reserve_port_range(3);
    let app = Appliance::start(
        io,
        ApplianceOptions {
            port_range: Some(range),
            ..ApplianceOptions::default()
        },
    );
    let got: Vec<CreatedSession> = (0..3)
        .map(|_| app.create(&dedicated_demo("alice")))
        .collect();
    let ports: BTreeSet<u16> = got.iter().map(|s| s.port.unwrap()).collect();
    assert_eq!(
        ports,
        range_ports(range),
        "io={io}: the 3 sessions get the 3 ports"
    );
    let r = app.try_create(&dedicated_demo("alice"));
    r.assert_api_error(
        503,
        "port_pool_exhausted",
        "4th dedicated session of 3 ports",
    );
    let retry = r.header("Retry-After");
    let secs: Option<u64> = retry.as_deref().and_then(|v| v.parse().ok());
    assert!(
        secs.is_some_and(|s| s >= 1),
        "io={io}: 503 port_pool_exhausted needs Retry-After in seconds, got {retry:?}"
    );
    let stats = app.ports();
    assert_eq!(
        (
            stats["allocated_ports"].as_u64(),
            stats["free_ports"].as_u64()
        ),
        (Some(3), Some(0)),
        "io={io}: /ports when full: {stats}"
    );
    // Shared sessions do not need the pool.
    let shared = app.create_demo("alice");
    assert_eq!(
        shared.port, None,
        "io={io}: shared session while the pool is full"
    );
    // A deleted pending session gives its port back.
    let freed = got[1].port.unwrap();
    assert_eq!(
        app.delete(&got[1].id).status,
        200,
        "io={io}: DELETE pending"
    );
    app.wait_allocated(2, REPORT_TIMEOUT);
    let again = app.create(&dedicated_demo("alice"));
    assert_eq!(
        again.port,
        Some(freed),
        "io={io}: the freed port is handed out again"
    );
    drop(app);

    // B: 4 ports, one held by another process before start: never handed out.
    let range = reserve_port_range(4);
    let held = range.0 + 1;
    let squatter = TcpListener::bind(("127.0.0.1", held))
        .unwrap_or_else(|e| panic!("io={io}: bind {held} as another process would: {e}"));
    let app = Appliance::start(
        io,
        ApplianceOptions {
            port_range: Some(range),
            ..ApplianceOptions::default()
        },
    );
    let got: Vec<u16> = (0..3)
        .map(|_| app.create(&dedicated_demo("alice")).port.unwrap())
        .collect();
    let mut want = range_ports(range);
    want.remove(&held);
    assert_eq!(
        got.iter().copied().collect::<BTreeSet<_>>(),
        want,
        "io={io}: the 3 free ports, never {held} (held by another socket)"
    );
    let r = app.try_create(&dedicated_demo("alice"));
    r.assert_api_error(
        503,
        "port_pool_exhausted",
        "all free ports taken, one held elsewhere",
    );
    assert!(
        r.header("Retry-After").is_some(),
        "io={io}: Retry-After: {r:?}"
    );
    let stats = app.ports();
    assert!(
        stats["externally_taken"].as_u64() >= Some(1),
        "io={io}: /ports counts the port held by another process: {stats}"
    );
    // The squatter is untouched: it still accepts.
    assert!(
        TcpStream::connect(("127.0.0.1", held)).is_ok(),
        "io={io}: the held port must still be ours"
    );
    drop(squatter);
}

// ---------------------------------------------------------------------------
// 7. Restart: persisted allocations restored, stale ones reclaimed
// ---------------------------------------------------------------------------

/// `consolegate ports --config FILE status`: the pool as JSON (the part
/// before the `state file:` line).
fn ports_status(app_config: &Path) -> Value {
    let cfg = app_config.display().to_string();
    let (st, out, err) = run_cli_env(
        &["ports", "--config", &cfg, "status"],
        &[],
        Duration::from_secs(20),
    );
    assert!(
        st.success(),
        "{}ports status failed ({st}): {out}{err}",
        ctx()
    );
    let json_part = out.split("state file:").next().unwrap_or("");
    serde_json::from_str(json_part.trim()).unwrap_or_else(|e| {
        panic!(
            "{}ports status did not print the pool as JSON ({e}): {out}",
            ctx()
        )
    })
}

fn restart_restores_and_reclaims_ports(io: &str) {
    let state = tempfile::Builder::new()
        .prefix("consolegate-restart-")
        .tempdir()
        .unwrap();
    let range = reserve_port_range(5);
    let all = range_ports(range);
    let opts = ApplianceOptions {
        port_range: Some(range),
        state_dir: Some(state.path().join("state")),
        ..ApplianceOptions::default()
    };
    let state_dir = state.path().join("state");

    // Appliance A: three dedicated sessions, one of them live, then a crash.
    let mut a = Appliance::start(io, opts.clone());
    let sa: Vec<CreatedSession> = (0..3).map(|_| a.create(&dedicated_demo("alice"))).collect();
    let mut live = connect(io, &sa[0]);
    rfb_handshake_none(&mut live);
    let before: BTreeSet<(u16, u64)> = sa.iter().map(|s| (s.port.unwrap(), owner_of(s))).collect();
    assert_eq!(
        wait_persisted(&state_dir, &before),
        before,
        "io={io}: ports.json before the crash"
    );
    a.kill9();
    drop(live);
    wait_ports_bindable(
        &before.iter().map(|(p, _)| *p).collect(),
        "the crashed appliance's listeners to be gone",
    );
    assert_eq!(
        persisted_allocations(&state_dir),
        before,
        "io={io}: ports.json after kill -9 keeps the three allocations"
    );
    let offline = ports_status(&a.config_path);
    assert_eq!(
        (
            offline["total_ports"].as_u64(),
            offline["allocated_ports"].as_u64()
        ),
        (Some(5), Some(3)),
        "io={io}: `ports status` with the appliance down: {offline}"
    );

    // One of the persisted ports is still in use by something else.
    let held = sa[1].port.unwrap();
    let squatter = TcpListener::bind(("127.0.0.1", held))
        .unwrap_or_else(|e| panic!("io={io}: bind persisted port {held}: {e}"));

    // Appliance B on the same state: the two free ones are reclaimed, the
    // held one stays claimed.
    let mut b = Appliance::start(
        io,
        ApplianceOptions {
            ports_toml: "cleanup_interval_ms = 1000\n".into(),
            ..opts.clone()
        },
    );
    let stats = b.ports();
    assert_eq!(
        stats["allocated_ports"].as_u64(),
        Some(1),
        "io={io}: after restart only the port still in use stays allocated: {stats}"
    );
    let persisted = persisted_allocations(&state_dir);
    assert_eq!(
        persisted,
        BTreeSet::from([(held, owner_of(&sa[1]))]),
        "io={io}: ports.json after restart lists only the held port"
    );
    let sb: Vec<CreatedSession> = (0..4).map(|_| b.create(&dedicated_demo("bob"))).collect();
    let got: BTreeSet<u16> = sb.iter().map(|s| s.port.unwrap()).collect();
    let mut want = all.clone();
    want.remove(&held);
    assert_eq!(
        got, want,
        "io={io}: new sessions get the reclaimed ports and the never-used ones, never {held}"
    );
    let r = b.try_create(&dedicated_demo("bob"));
    r.assert_api_error(503, "port_pool_exhausted", "pool full after restart");
    // A reclaimed port works.
    let reused = sb
        .iter()
        .find(|s| s.port == sa[0].port)
        .expect("the crashed session's port was handed out again");
    // (Kept open: a dedicated session that ends gives its port back.)
    let mut reused_client = connect(io, reused);
    let init = rfb_handshake_none(&mut reused_client);
    rfb_full_update(&mut reused_client, &init, "reclaimed port");
    // The file is written within ~200 ms of a change (coalesced).
    let deadline = Instant::now() + Duration::from_secs(5);
    let online = loop {
        let s = ports_status(&b.config_path);
        if s["allocated_ports"].as_u64() == Some(5) || Instant::now() >= deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        online["allocated_ports"].as_u64(),
        Some(5),
        "io={io}: `ports status` with the appliance up: {online}"
    );

    // The squatter goes: B's periodic cleanup (every second here) reclaims
    // the stale claim, and the port is handed out again.
    drop(squatter);
    b.wait_allocated(4, Duration::from_secs(10));
    let late = b.create(&dedicated_demo("bob"));
    assert_eq!(
        late.port,
        Some(held),
        "io={io}: once nothing holds {held}, the cleanup pass reclaims it"
    );

    // Graceful stop of B (with a live relay): a successor on the same state
    // may use every port.
    b.sigterm();
    let (code, _) = reused_client.expect_close(Duration::from_secs(5));
    assert_eq!(
        code,
        Some(1001),
        "io={io}: a live relay at SIGTERM closes with 1001 (going away)"
    );
    let st = b.wait_exit(Duration::from_secs(10));
    assert!(
        st.is_some_and(|s| s.success()),
        "io={io}: SIGTERM must drain and exit 0, got {st:?}"
    );
    wait_ports_bindable(&all, "the stopped appliance's listeners to be gone");
    let c3 = Appliance::start(io, opts);
    let got: BTreeSet<u16> = (0..5)
        .map(|_| c3.create(&dedicated_demo("carol")).port.unwrap())
        .collect();
    assert_eq!(
        got, all,
        "io={io}: after a graceful stop, a restart may hand out every port"
    );
}

// ---------------------------------------------------------------------------
// 7b. `consolegate ports status|cleanup --config FILE`
// ---------------------------------------------------------------------------

fn ports_cli_status_and_cleanup(io: &str) {
    let range = reserve_port_range(4);
    let mut app = Appliance::start(
        io,
        ApplianceOptions {
            port_range: Some(range),
            ..ApplianceOptions::default()
        },
    );
    let created: BTreeSet<(u16, u64)> = (0..2)
        .map(|_| {
            let s = app.create(&dedicated_demo("alice"));
            (s.port.unwrap(), owner_of(&s))
        })
        .collect();
    assert_eq!(
        wait_persisted(&app.state_dir, &created),
        created,
        "io={io}: ports.json lists both allocations before the crash"
    );
    app.kill9();
    // An io_uring process's sockets can outlive its reaping by a few ms
    // (the ring's teardown runs asynchronously): wait until the crashed
    // appliance's listeners are really gone before asking for a cleanup.
    wait_ports_bindable(
        &created.iter().map(|(p, _)| *p).collect(),
        "the crashed appliance's listeners to be gone",
    );
    let cfg = app.config_path.display().to_string();
    let mut problems = Vec::new();
    // The spelling of the brief first (`--config` after the subcommand),
    // then the one clap accepts today.
    let mut run = |sub: &str| -> String {
        let (st, out, err) = run_cli_env(
            &["ports", sub, "--config", &cfg],
            &[],
            Duration::from_secs(20),
        );
        if st.success() {
            return out;
        }
        problems.push(format!(
            "`consolegate ports {sub} --config FILE` failed ({st}): {}",
            err.trim()
        ));
        let (st, out, err) = run_cli_env(
            &["ports", "--config", &cfg, sub],
            &[],
            Duration::from_secs(20),
        );
        assert!(
            st.success(),
            "io={io}: ports --config FILE {sub} failed ({st}): {out}{err}"
        );
        out
    };
    let status = run("status");
    assert!(
        status.contains("\"allocated_ports\": 2") && status.contains("\"total_ports\": 4"),
        "io={io}: ports status after a crash with 2 allocations: {status}"
    );
    let cleanup = run("cleanup");
    let report: Value = serde_json::from_str(cleanup.lines().next().unwrap_or(""))
        .unwrap_or_else(|e| panic!("io={io}: ports cleanup prints a JSON report ({e}): {cleanup}"));
    assert_eq!(
        report["reclaimed"], 2,
        "io={io}: cleanup reclaims the 2 stale ports: {report}"
    );
    let status = run("status");
    assert!(
        status.contains("\"allocated_ports\": 0"),
        "io={io}: ports status after cleanup: {status}"
    );
    assert!(
        persisted_allocations(&app.state_dir).is_empty(),
        "io={io}: ports.json after cleanup"
    );
    assert!(problems.is_empty(), "io={io}: {}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// 8. Bearer tokens and roles
// ---------------------------------------------------------------------------

fn api_auth(io: &str) {
    let app = Appliance::start(io, ApplianceOptions::default());
    let demo = json!({"target": {"kind": "demo"}, "user": "alice"}).to_string();
    let calls: [(&str, &str, Option<&str>); 6] = [
        ("GET", "/api/v1/sessions", None),
        ("POST", "/api/v1/sessions", Some(&demo)),
        ("GET", "/api/v1/sessions/0123456789abcdef", None),
        ("DELETE", "/api/v1/sessions/0123456789abcdef", None),
        ("GET", "/api/v1/ports", None),
        ("GET", "/api/v1/stats", None),
    ];
    for (method, path, body) in calls {
        let what = format!("{method} {path}");
        let r = app.api(method, path, None, body);
        r.assert_api_error(401, "unauthorized", &format!("{what} without a token"));
        let r = app.api(method, path, Some("not-a-valid-token-at-all-0000"), body);
        r.assert_api_error(
            401,
            "unauthorized",
            &format!("{what} with an unknown token"),
        );
        // The admin token in another scheme is no bearer token.
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Basic {ADMIN_TOKEN}\r\n"
        );
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            ));
        } else {
            req.push_str("\r\n");
        }
        let r = http_raw(app.control, req.as_bytes()).unwrap();
        r.assert_api_error(401, "unauthorized", &format!("{what} with Basic auth"));
    }
    let r = app.api("POST", "/api/v1/sessions", Some(READ_TOKEN), Some(&demo));
    r.assert_api_error(403, "forbidden", "POST with the read token");
    let r = app.api(
        "DELETE",
        "/api/v1/sessions/0123456789abcdef",
        Some(READ_TOKEN),
        None,
    );
    r.assert_api_error(403, "forbidden", "DELETE with the read token");

    for path in ["/api/v1/sessions", "/api/v1/ports", "/api/v1/stats"] {
        for token in [READ_TOKEN, ADMIN_TOKEN] {
            let r = app.api("GET", path, Some(token), None);
            assert_eq!(
                r.status, 200,
                "io={io}: GET {path} with a valid token: {r:?}"
            );
            r.json();
        }
    }
    let list = app.get_json("/api/v1/sessions");
    assert_eq!(
        list["sessions"].as_array().map(Vec::len),
        Some(0),
        "io={io}: refused POSTs created nothing: {list}"
    );
    // The admin token does create.
    let s = app.create_demo("alice");
    let rec = app.session(&s.id);
    assert_eq!(rec["state"], "pending", "io={io}: {rec}");
    // Unknown endpoint: JSON 404 (after auth or not, but JSON).
    let r = app.get("/api/v1/nope");
    r.assert_api_error(404, "not_found", "unknown endpoint");
}

// ---------------------------------------------------------------------------
// 9. Config errors name what is wrong
// ---------------------------------------------------------------------------

fn config_errors(io: &str) {
    let dir = tempfile::Builder::new()
        .prefix("consolegate-config-")
        .tempdir()
        .unwrap();
    let range = reserve_port_range(4);
    let valid = appliance_config_text(
        io,
        range,
        &dir.path().join("state"),
        &ApplianceOptions::default(),
    );
    let write = |name: &str, text: &str| -> String {
        let p = dir.path().join(name);
        fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let check = |path: &str, env: &[(&str, &str)]| {
        let (st, out, err) = run_cli_env(
            &["check-config", "--config", path],
            env,
            Duration::from_secs(20),
        );
        (st, format!("{out}{err}"))
    };

    let good = write("good.toml", &valid);
    let (st, out) = check(&good, &[]);
    assert!(
        st.success(),
        "io={io}: check-config on a valid file: {st}: {out}"
    );

    // Unknown key in [control].
    let bad_key = valid.replacen("[control]\n", "[control]\nlistn = \"127.0.0.1:0\"\n", 1);
    let p = write("unknown-key.toml", &bad_key);
    let (st, out) = check(&p, &[]);
    assert!(
        !st.success(),
        "io={io}: check-config accepted an unknown key: {out}"
    );
    assert!(
        out.contains("listn"),
        "io={io}: the error must name the key `listn`: {out}"
    );

    // Unknown key in a nested table.
    let bad_nested = valid.replacen(
        "[dataplane.limits]\n",
        "[dataplane.limits]\nidle_timeout_secs = 5\n",
        1,
    );
    let p = write("unknown-nested.toml", &bad_nested);
    let (st, out) = check(&p, &[]);
    assert!(
        !st.success(),
        "io={io}: unknown key in [dataplane.limits] accepted: {out}"
    );
    assert!(
        out.contains("idle_timeout_secs"),
        "io={io}: the error must name `idle_timeout_secs`: {out}"
    );

    // A bad value.
    let bad_range = valid.replacen(
        &format!("range = \"{}-{}\"", range.0, range.1),
        "range = \"30000-20000\"",
        1,
    );
    let p = write("bad-range.toml", &bad_range);
    let (st, out) = check(&p, &[]);
    assert!(
        !st.success(),
        "io={io}: a reversed port range accepted: {out}"
    );
    assert!(
        out.contains("range"),
        "io={io}: the error must name ports.range: {out}"
    );

    // Environment overrides: a typo is an error naming the variable.
    let (st, out) = check(&good, &[("CONSOLEGATE_CONTROL_LISTN", "127.0.0.1:0")]);
    assert!(
        !st.success(),
        "io={io}: CONSOLEGATE_CONTROL_LISTN accepted: {out}"
    );
    assert!(
        out.contains("CONSOLEGATE_CONTROL_LISTN"),
        "io={io}: the error must name the variable: {out}"
    );
    let (st, out) = check(&good, &[("CONSOLEGATE_CONTROL_LISTEN", "127.0.0.1:0")]);
    assert!(
        st.success(),
        "io={io}: the correct variable is accepted: {out}"
    );

    // `run` refuses the bad file too, without starting.
    let p = write("run-unknown-key.toml", &bad_key);
    let (st, out, err) = run_cli_env(&["run", "--config", &p], &[], Duration::from_secs(20));
    assert!(
        !st.success(),
        "io={io}: run with an unknown key exited {st}"
    );
    assert!(
        !out.contains("listening on"),
        "io={io}: run started with a bad config: {out}"
    );
    assert!(
        format!("{out}{err}").contains("listn"),
        "io={io}: run's error names the key: {out}{err}"
    );
}

// ---------------------------------------------------------------------------
// 10. Health and metrics (the OpenAPI document: tests/e2e_openapi.rs)
// ---------------------------------------------------------------------------

fn metrics_and_health(io: &str) {
    let app = Appliance::start(io, ApplianceOptions::default());
    for path in ["/healthz", "/readyz"] {
        let r = app.api("GET", path, None, None);
        assert_eq!(r.status, 200, "io={io}: {path}: {r:?}");
    }

    let s = app.create_demo("alice");
    let mut c = connect(io, &s);
    let init = rfb_handshake_none(&mut c);
    rfb_full_update(&mut c, &init, "metrics session");
    let metrics = wait_until(REPORT_TIMEOUT, "/metrics to show the open session", || {
        let r = app.api("GET", "/metrics", None, None);
        (r.status == 200
            && metric_sum(&r.body, "consolegate_sessions", Some("state=\"open\"")) == Some(1.0)
            && metric_sum(&r.body, "consolegate_handshakes_total", None).is_some_and(|v| v >= 1.0))
        .then_some(r)
    });
    let ct = metrics.header("Content-Type").unwrap_or_default();
    assert!(
        ct.starts_with("text/plain"),
        "io={io}: /metrics Content-Type {ct:?}"
    );
    assert!(
        metrics
            .body
            .contains("consolegate_sessions{state=\"open\"}"),
        "io={io}: /metrics: {}",
        metrics.body
    );
    c.close();
    wait_until(
        REPORT_TIMEOUT,
        "/metrics to show the closed session",
        || {
            let r = app.api("GET", "/metrics", None, None);
            (metric_sum(&r.body, "consolegate_sessions", Some("state=\"closed\"")) == Some(1.0)
                && metric_sum(&r.body, "consolegate_sessions", Some("state=\"open\"")) == Some(0.0))
            .then_some(())
        },
    );
    // Every answer's shape against docs/openapi.json: tests/e2e_openapi.rs.
}

// ---------------------------------------------------------------------------
// 11. Hostile input on both ports does not touch a live session
// ---------------------------------------------------------------------------

/// Sends `bytes` to `addr`; the HTTP answer, or `None` when the connection
/// ended without one.
fn poke(addr: SocketAddr, bytes: &[u8]) -> Option<HttpResponse> {
    http_raw(addr, bytes).ok()
}

/// Records in `problems` how `got` differs from the documented answer:
/// exactly `status`, and (when `code` is given) the JSON error shape with
/// that `code`.
fn expect_answer(
    problems: &mut Vec<String>,
    what: &str,
    got: Option<&HttpResponse>,
    status: u16,
    code: Option<&str>,
) {
    let Some(r) = got else {
        problems.push(format!(
            "{what}: expected HTTP {status} {code:?}, got no answer"
        ));
        return;
    };
    let body: Option<Value> = serde_json::from_str(&r.body).ok();
    let got_code = body
        .as_ref()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
    let shape_ok = body.as_ref().is_some_and(|v| {
        v.as_object().is_some_and(|o| o.len() == 1)
            && v["error"]["code"].is_string()
            && v["error"]["message"].is_string()
    }) && r.header("Content-Type").is_some_and(|c| c.contains("json"));
    if r.status != status || (code.is_some() && (got_code.as_deref() != code || !shape_ok)) {
        problems.push(format!(
            "{what}: expected HTTP {status} {code:?}, got {} {:.200}",
            r.status, r.body
        ));
    }
}

/// Hostile input on both ports, each answered exactly as documented
/// (docs/ARCHITECTURE.md for the console port, docs/openapi.json for the
/// control port), while a live session relays on, untouched.
fn bad_input_does_not_disturb_live_session(io: &str) {
    let xvnc = Xvnc::start();
    let app = Appliance::start(io, ApplianceOptions::default());
    let s = app.create(&json!({"target": vnc_target(&xvnc, None), "user": "alice"}));
    let mut live = connect(io, &s);
    let init = rfb_handshake_none(&mut live);
    rfb_full_update(&mut live, &init, "before the bad input");
    app.wait_state(&s.id, "open", REPORT_TIMEOUT);
    let fds_before = settled_fd_count(app.pid());

    // Differences from the documented answers are collected and reported at
    // the end, after the main point (the live session) has been checked.
    let mut problems: Vec<String> = Vec::new();

    // A slowloris request left open for the whole test.
    let mut slow = tcp_connect(app.console);
    slow.write_all(b"GET /proxy/").unwrap();
    let mut slow_ctl = tcp_connect(app.control);
    slow_ctl
        .write_all(b"POST /api/v1/sessions HTTP/1.1\r\nContent-Length: 100\r\n")
        .unwrap();

    // ---- console port
    let console = app.console;
    let big = format!(
        "GET /proxy/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let bad_version = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
        s.path
    );
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let console_cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "not HTTP",
            b"this is not http\r\n\r\n".to_vec(),
            400,
            "malformed",
        ),
        ("4 KiB of noise", noise.clone(), 400, "malformed"),
        ("20 KB header", big.into_bytes(), 431, "too_large"),
        (
            "Sec-WebSocket-Version 8",
            bad_version.into_bytes(),
            426,
            "unsupported_version",
        ),
        (
            "non-hex session id",
            upgrade_request("/proxy/zzzz?token=x", &[]),
            400,
            "bad_path",
        ),
        (
            "session id too long",
            upgrade_request("/proxy/0123456789abcdef0123?token=x", &[]),
            400,
            "bad_path",
        ),
        (
            "no token",
            upgrade_request(&format!("/proxy/{}", s.id), &[]),
            400,
            "missing_token",
        ),
        (
            "the live session's ticket replayed",
            upgrade_request(&s.path, &[]),
            403,
            "ticket_replay",
        ),
    ];
    for (what, bytes, status, code) in &console_cases {
        expect_answer(
            &mut problems,
            &format!("console: {what}"),
            poke(console, bytes).as_ref(),
            *status,
            Some(code),
        );
    }
    // A valid session whose browser breaks the WebSocket protocol.
    let other = app.create_demo("mallory");
    let mut m = connect(io, &other);
    m.send_raw(&raw_frame(0x2, b"unmasked", None));
    // Data (the demo's greeting) may come first; then the close.
    let deadline = Instant::now() + IO_TIMEOUT;
    let end = loop {
        match m.next_message(deadline.saturating_duration_since(Instant::now())) {
            Ok(_) => continue,
            Err(e) => break e,
        }
    };
    if !matches!(end, WsEnd::Close(Some((1002, _)))) {
        problems.push(format!(
            "console: unmasked client frame: expected close 1002, got {end:?}"
        ));
    }
    drop(m);

    // ---- control port
    let ctl = app.control;
    let post = |body: &str| {
        http_call(
            ctl,
            "POST",
            "/api/v1/sessions",
            Some(ADMIN_TOKEN),
            Some(body),
        )
        .ok()
    };
    let demo = |extra: Value| {
        let mut v = json!({"target": {"kind": "demo"}, "user": "a"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v.to_string()
    };
    let vnc = |target: Value| json!({"target": target, "user": "a"}).to_string();
    // (what, body, status, code): serde's refusals (not JSON, a wrong type,
    // an unknown field, a number out of range) are 400 `bad_request`; the
    // handler's own checks name the field.
    let json_bodies: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed JSON",
            "{\"target\": {".into(),
            400,
            "bad_request",
        ),
        ("JSON array", "[1,2,3]".into(), 400, "bad_request"),
        (
            "unknown field",
            demo(json!({"evil": 1})),
            400,
            "bad_request",
        ),
        (
            "unknown target kind",
            json!({"target": {"kind": "vmware"}, "user": "a"}).to_string(),
            400,
            "unsupported_target",
        ),
        (
            "vnc without host",
            vnc(json!({"kind": "vnc", "port": 5900})),
            400,
            "bad_target",
        ),
        (
            "vnc port 0",
            vnc(json!({"kind": "vnc", "host": "127.0.0.1", "port": 0})),
            400,
            "bad_target",
        ),
        (
            "vnc port 70000",
            vnc(json!({"kind": "vnc", "host": "127.0.0.1", "port": 70000})),
            400,
            "bad_request",
        ),
        (
            "empty user",
            json!({"target": {"kind": "demo"}, "user": ""}).to_string(),
            400,
            "bad_user",
        ),
        ("ttl_s 0", demo(json!({"ttl_s": 0})), 400, "bad_ttl"),
        (
            "ttl_s huge",
            demo(json!({"ttl_s": 10_000_000u64})),
            400,
            "bad_ttl",
        ),
        (
            "bad port_mode",
            demo(json!({"port_mode": "weird"})),
            400,
            "bad_port_mode",
        ),
        (
            "user of 10 KB",
            json!({"target": {"kind": "demo"}, "user": "u".repeat(10_000)}).to_string(),
            400,
            "bad_user",
        ),
        (
            "unresolvable host",
            vnc(json!({"kind": "vnc", "host": "no-such-host.invalid", "port": 5900})),
            422,
            "target_unresolvable",
        ),
        (
            "body over max_request_bytes",
            demo(json!({"vm_id": "v".repeat(100_000)})),
            413,
            "body_too_large",
        ),
    ];
    for (what, body, status, code) in &json_bodies {
        expect_answer(
            &mut problems,
            &format!("control: {what}"),
            post(body).as_ref(),
            *status,
            Some(code),
        );
    }
    // The body is read as JSON whatever its Content-Type says: "hi" is
    // not JSON, 400 `bad_request` (not 415).
    let r = http_raw(
        ctl,
        format!(
            "POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nhi"
        )
        .as_bytes(),
    )
    .ok();
    expect_answer(
        &mut problems,
        "control: text/plain body",
        r.as_ref(),
        400,
        Some("bad_request"),
    );
    let r = http_call(
        ctl,
        "GET",
        "/api/v1/sessions/not-hex!",
        Some(READ_TOKEN),
        None,
    )
    .ok();
    expect_answer(
        &mut problems,
        "control: bad session id",
        r.as_ref(),
        400,
        Some("bad_session_id"),
    );
    let r = http_call(
        ctl,
        "PUT",
        "/api/v1/sessions",
        Some(ADMIN_TOKEN),
        Some("{}"),
    )
    .ok();
    expect_answer(
        &mut problems,
        "control: PUT /api/v1/sessions",
        r.as_ref(),
        405,
        Some("method_not_allowed"),
    );
    // Below the API, hyper refuses what is not HTTP/1.1 itself: a bare 400
    // (no JSON body: the request never reached the router).
    expect_answer(
        &mut problems,
        "control: not HTTP",
        poke(
            ctl,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        )
        .as_ref(),
        400,
        None,
    );
    expect_answer(
        &mut problems,
        "control: 4 KiB of noise",
        poke(ctl, &noise).as_ref(),
        400,
        None,
    );
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    expect_answer(
        &mut problems,
        "control: 100 KB header",
        poke(ctl, big.as_bytes()).as_ref(),
        431,
        Some("request_head_too_large"),
    );

    // ---- the live session is untouched
    let pixels = rfb_full_update(&mut live, &init, "after the bad input");
    assert!(
        distinct_colours(&pixels) > 1,
        "io={io}: pixels after the bad input"
    );
    let rec = app.session(&s.id);
    assert_eq!(
        rec["state"], "open",
        "io={io}: the live session after the bad input: {rec}"
    );
    assert!(
        app.api("GET", "/healthz", None, None).status == 200,
        "io={io}: /healthz after the bad input"
    );
    // And new sessions still work.
    let fresh = app.create_demo("alice");
    let mut c = connect(io, &fresh);
    rfb_handshake_none(&mut c);
    c.close();
    // The bad clients are gone (the slowloris ones once dropped) and hold
    // nothing in the appliance (the fresh session has ended too).
    drop((slow, slow_ctl));
    app.wait_state(&fresh.id, "closed", REPORT_TIMEOUT);
    wait_fd_count_at_most(
        app.pid(),
        fds_before,
        Duration::from_secs(5),
        "after the bad clients left",
    );
    live.close();
    let mut app = app;
    assert!(
        app.try_exit_status().is_none(),
        "io={io}: the appliance died"
    );
    assert!(
        problems.is_empty(),
        "io={io}: the live session survived, but some answers differ from the documented ones:\n  {}",
        problems.join("\n  ")
    );
}
