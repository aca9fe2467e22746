//! Alerts and who sees the live events, end to end against a real
//! appliance (`consolegate run`): sustained rate limiting, a stuck worker
//! (the `failpoints` test build), an exhausted hypervisor pool (the
//! govmomi simulator with `pool_size = 1`) and a hypervisor down (the
//! simulator killed, then restarted) each raise one `alert` and, once
//! over, one `alert_cleared`, counted in `/metrics`; a viewer's JWT (HS256,
//! signed here) sees only its VMs' and its own sessions' events, is
//! refused the rooms it may not join, and never gets alerts or stats; and
//! `session_closed` of a session deleted while relaying carries the bytes
//! its worker relayed.
//!
//! The event plane is the control thread's: one IO backend (epoll) is
//! enough. Every wait is a bounded poll; every load loop is bounded in
//! count and time; peers are started and stopped by the test.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::events::{events, try_events, EventsClient};
use common::vcsim::{Vcsim, VcsimOptions, USERNAME};
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const IO: &str = "epoll";
/// The address the floods come from, so the test's own calls (from
/// 127.0.0.1) keep their per-IP budget.
const FLOODER: &str = "127.0.0.9";
/// Bounds of a flood of refused REST calls.
const FLOOD_MAX_REQUESTS: u64 = 50_000;
const FLOOD_MAX_TIME: Duration = Duration::from_secs(40);
/// How long a hypervisor may take to be found reachable.
const EVENT_WAIT: Duration = Duration::from_secs(20);
/// Alerts sample fast and clear quickly here; the rate alert needs
/// 20 refusals a second for 1 s (measured over 3 s spans).
const FAST_ALERTS: &str =
    "\n[events]\nalert_check_interval_ms = 100\nalert_clear_after_ms = 1000\n\
     rate_limit_alert_refusals_per_s = 20\nrate_limit_alert_after_ms = 1000\n";

fn appliance(opts: ApplianceOptions) -> Appliance {
    set_current_io(IO);
    Appliance::start(IO, opts)
}

/// A value of a `/metrics` series with these exact labels (0 if absent).
fn metric(app: &Appliance, series: &str) -> f64 {
    let r = app.get("/metrics");
    assert_eq!(r.status, 200, "/metrics: {r:?}");
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn alert_metrics(app: &Appliance, alert_type: &str) -> (f64, f64, f64) {
    let series = |name: &str| metric(app, &format!("{name}{{type=\"{alert_type}\"}}"));
    (
        series("consolegate_alerts_raised_total"),
        series("consolegate_alerts_cleared_total"),
        series("consolegate_alerts_active"),
    )
}

/// One REST call from `source` (a loopback address), its status.
fn rest_status_from(source: &str, to: SocketAddr, path: &str) -> Option<u16> {
    let src: IpAddr = source.parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    socket.bind(&SocketAddr::new(src, 0).into()).ok()?;
    socket.connect_timeout(&to.into(), IO_TIMEOUT).ok()?;
    let mut s: TcpStream = socket.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\nAuthorization: Bearer {READ_TOKEN}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// REST calls from [`FLOODER`] until `stop` (bounded); how many were
/// refused with 429.
fn flood(control: SocketAddr, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let started = Instant::now();
        let mut refused = 0;
        for _ in 0..FLOOD_MAX_REQUESTS {
            if stop.load(Ordering::Relaxed) || started.elapsed() > FLOOD_MAX_TIME {
                break;
            }
            if rest_status_from(FLOODER, control, "/api/v1/stats") == Some(429) {
                refused += 1;
            }
        }
        refused
    })
}

/// The next `alert` of `alert_type`, then its `alert_cleared` (same id);
/// between them, no other `alert` of that type.
fn raised_then_cleared(
    e: &mut EventsClient,
    alert_type: &str,
    end_condition: impl FnOnce(),
) -> (Value, Value) {
    let raised = e.next_where("alert", |d| d["alert_type"] == alert_type);
    end_condition();
    let id = raised["data"]["alert_id"].clone();
    let cleared = e.next_where("alert_cleared", |d| d["alert_id"] == id);
    let again: Vec<Value> = e
        .drain(Duration::from_millis(300))
        .into_iter()
        .filter(|v| v["type"] == "alert" && v["data"]["alert_type"] == alert_type)
        .collect();
    assert!(again.is_empty(), "raised more than once: {again:?}");
    assert_eq!(cleared["data"]["alert_type"], alert_type, "{cleared}");
    assert!(cleared["data"]["duration_ms"].is_u64(), "{cleared}");
    (raised, cleared)
}

#[test]
fn sustained_rate_limiting_raises_one_alert_without_addresses_then_clears_it() {
    let app = appliance(ApplianceOptions {
        extra_toml: format!("{FAST_ALERTS}\n[rate_limits]\nrest_per_ip_per_s = 50\n"),
        ..ApplianceOptions::default()
    });
    let mut admin = events(app.control, "/ws/monitor", Some(ADMIN_TOKEN));
    admin.subscribe(json!({"events": ["alert", "alert_cleared"]}));
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flood(app.control, stop.clone());
    let (raised, cleared) = raised_then_cleared(&mut admin, "rate_limit_sustained", || {
        stop.store(true, Ordering::Relaxed);
    });
    let refused = flooder.join().unwrap();
    assert!(refused > 20, "only {refused} refusals");
    let d = &raised["data"];
    assert_eq!(
        (&d["severity"], &d["entity_type"], &d["entity_id"]),
        (&json!("warning"), &json!("rate_limits"), &json!("per_ip")),
        "{raised}"
    );
    // Alerts carry no client address (the log lines do).
    for v in [&raised, &cleared] {
        assert!(!v.to_string().contains(FLOODER), "{v}");
    }
    assert_eq!(alert_metrics(&app, "rate_limit_sustained"), (1.0, 1.0, 0.0));
}

#[test]
fn a_stuck_worker_raises_worker_unhealthy_then_clears_it() {
    let app = appliance(ApplianceOptions {
        control_toml: "worker_stall_ms = 300\n".into(),
        dataplane_toml: "workers = 1".into(),
        extra_toml: FAST_ALERTS.into(),
        ..ApplianceOptions::default()
    });
    let mut admin = events(app.control, "/ws/monitor", Some(ADMIN_TOKEN));
    admin.subscribe(json!({"events": ["alert", "alert_cleared"]}));
    let failpoint = |method: &str, body: Option<&str>| {
        let r = app.api(
            method,
            "/api/v1/debug/failpoints/worker-stall",
            Some(ADMIN_TOKEN),
            body,
        );
        assert_eq!(
            r.status, 204,
            "{method} failpoint worker-stall: {r:?} (is the binary built with --features consolegate/failpoints?)"
        );
    };
    // Every turn of the worker's loop sleeps 1 s against a 300 ms limit.
    failpoint("PUT", Some("sleep(1000)"));
    let (raised, cleared) = raised_then_cleared(&mut admin, "worker_unhealthy", || {
        failpoint("DELETE", None);
    });
    let d = &raised["data"];
    assert_eq!(
        (&d["severity"], &d["entity_type"], &d["entity_id"]),
        (&json!("critical"), &json!("worker"), &json!("0")),
        "{raised}"
    );
    assert!(
        d["message"].as_str().unwrap().contains("has not turned"),
        "{raised}"
    );
    assert!(
        cleared["data"]["duration_ms"].as_u64().unwrap() >= 1000,
        "{cleared}"
    );
    assert_eq!(alert_metrics(&app, "worker_unhealthy"), (1.0, 1.0, 0.0));
}

#[test]
fn an_exhausted_vsphere_pool_raises_an_alert_in_its_server_room_then_clears_it() {
    let sim = Vcsim::start(VcsimOptions::default());
    let app = appliance(ApplianceOptions {
        extra_toml: format!(
            "{FAST_ALERTS}\n[[hypervisors]]\nkind = \"vsphere\"\nid = \"esx1\"\nurl = {:?}\n\
             username = {USERNAME:?}\npassword_file = {:?}\nthumbprint = {:?}\npool_size = 1\n\
             max_concurrent = 8\nacquire_timeout_ms = 10000\nrequest_timeout_ms = 5000\n",
            sim.url,
            sim.password_file().display().to_string(),
            sim.thumbprint
        ),
        ..ApplianceOptions::default()
    });
    let mut server = events(app.control, "/ws/server/esx1", Some(ADMIN_TOKEN));
    server.subscribe(json!({"events": ["alert", "alert_cleared"]}));
    let list = app.get_json("/api/v1/vms?hypervisor=esx1");
    let vm = list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["power"] == "on")
        .and_then(|v| v["id"].as_str())
        .unwrap_or_else(|| panic!("no running VM in {list}"))
        .to_string();
    // Console opens at once, each holding the only API session while it
    // asks for a ticket: the others wait for it (up to three rounds).
    let waited = |app: &Appliance| {
        let all = app.get_json("/api/v1/hypervisors");
        all["hypervisors"]
            .as_array()
            .and_then(|hs| hs.iter().find(|h| h["id"] == "esx1"))
            .and_then(|h| h["pool"]["waited_checkouts"].as_u64())
            .unwrap_or_else(|| panic!("no pool figures of esx1 in {all}"))
    };
    for round in 0..3 {
        let callers: Vec<_> = (0..8)
            .map(|i| {
                let control = app.control;
                let vm = vm.clone();
                thread::spawn(move || {
                    let body = json!({"user": format!("u{round}-{i}")}).to_string();
                    http_call(
                        control,
                        "POST",
                        &format!("/api/v1/vms/{vm}/console"),
                        Some(ADMIN_TOKEN),
                        Some(&body),
                    )
                    .map(|r| r.status)
                })
            })
            .collect();
        for c in callers {
            let _ = c.join().unwrap();
        }
        if waited(&app) > 0 {
            break;
        }
    }
    assert!(waited(&app) > 0, "no checkout ever waited for the pool");
    let (raised, _cleared) = raised_then_cleared(&mut server, "hypervisor_pool_exhausted", || {});
    let d = &raised["data"];
    assert_eq!(
        (&d["entity_type"], &d["entity_id"], &d["severity"]),
        (&json!("hypervisor"), &json!("esx1"), &json!("warning")),
        "{raised}"
    );
    assert_eq!(
        alert_metrics(&app, "hypervisor_pool_exhausted"),
        (1.0, 1.0, 0.0)
    );
}

/// Whether `GET /api/v1/hypervisors` says `id`'s last call reached it.
fn reachable(app: &Appliance, id: &str) -> Option<bool> {
    let all = app.get_json("/api/v1/hypervisors");
    all["hypervisors"]
        .as_array()?
        .iter()
        .find(|h| h["id"] == id)?["reachable"]
        .as_bool()
}

#[test]
fn a_vsphere_host_that_goes_down_and_comes_back_raises_hypervisor_down_then_clears_it() {
    let mut sim = Vcsim::start(VcsimOptions::default());
    // The VM lists are refetched every second (the least allowed): that is
    // what finds the host gone, and back.
    let app = appliance(ApplianceOptions {
        extra_toml: format!(
            "{FAST_ALERTS}vm_refresh_interval_ms = 1000\n\n[cache]\nvm_list_ttl_ms = 100\n\n\
             [[hypervisors]]\nkind = \"vsphere\"\nid = \"esx1\"\nurl = {:?}\n\
             username = {USERNAME:?}\npassword_file = {:?}\nthumbprint = {:?}\n\
             request_timeout_ms = 2000\n",
            sim.url,
            sim.password_file().display().to_string(),
            sim.thumbprint
        ),
        ..ApplianceOptions::default()
    });
    let mut monitor = events(app.control, "/ws/monitor", Some(ADMIN_TOKEN));
    monitor.subscribe(json!({"events": ["alert", "alert_cleared"]}));
    wait_until(EVENT_WAIT, "esx1 reachable", || {
        thread::sleep(Duration::from_millis(100));
        (reachable(&app, "esx1") == Some(true)).then_some(())
    });
    assert!(
        monitor
            .drain(Duration::from_millis(500))
            .iter()
            .all(|v| v["data"]["alert_type"] != "hypervisor_down"),
        "an alert while the host answered"
    );
    sim.kill();
    let (raised, cleared) = raised_then_cleared(&mut monitor, "hypervisor_down", || {
        assert_eq!(reachable(&app, "esx1"), Some(false));
        sim.restart();
    });
    let d = &raised["data"];
    assert_eq!(
        (&d["severity"], &d["entity_type"], &d["entity_id"]),
        (&json!("critical"), &json!("hypervisor"), &json!("esx1")),
        "{raised}"
    );
    assert!(!d["message"].as_str().unwrap().is_empty(), "{raised}");
    assert_eq!(reachable(&app, "esx1"), Some(true), "cleared while down");
    assert!(
        cleared["data"]["duration_ms"].as_u64().unwrap() >= 1000,
        "cleared before alert_clear_after_ms: {cleared}"
    );
    assert_eq!(alert_metrics(&app, "hypervisor_down"), (1.0, 1.0, 0.0));
}

#[test]
fn session_closed_of_a_session_deleted_while_relaying_carries_its_bytes() {
    const CHUNK: usize = 16 * 1024;
    const CHUNKS: usize = 16;
    let echo = EchoServer::start();
    let app = appliance(ApplianceOptions {
        extra_toml: "\n[events]\nsession_close_report_wait_ms = 5000\n".into(),
        ..ApplianceOptions::default()
    });
    let mut admin = events(app.control, "/ws/monitor", Some(ADMIN_TOKEN));
    admin.subscribe(json!({"events": ["session_closed"]}));
    let target = json!({"kind": "vnc", "host": "127.0.0.1", "port": echo.addr.port()});
    let s = app.create(&json!({"target": target, "user": "alice"}));
    let mut browser = ws_connect(IO, s.addr, &s.path, &[]);
    let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
    for _ in 0..CHUNKS {
        browser.send(&chunk);
        assert_eq!(browser.expect_bytes(CHUNK, "echo"), chunk);
    }
    let relayed = (CHUNK * CHUNKS) as u64;
    let r = app.delete(&s.id);
    assert!(r.status < 300, "DELETE: {r:?}");
    let closed = admin.next_where("session_closed", |d| d["session_id"] == s.id.as_str());
    let d = &closed["data"];
    assert_eq!(d["reason"], "revoked through the API", "{closed}");
    assert_eq!(d["bytes_final"], true, "{closed}");
    let up = d["bytes_browser_to_backend"].as_u64().unwrap();
    let down = d["bytes_backend_to_browser"].as_u64().unwrap();
    assert!(
        up >= relayed && down >= relayed,
        "{relayed} each way: {closed}"
    );
    assert_eq!(d["bytes"].as_u64().unwrap(), up + down, "{closed}");
}

// ---------------------------------------------------------------------------
// A viewer's JWT on the event endpoints
// ---------------------------------------------------------------------------

const SECRET: &str = "e2e-alerts-jwt-secret-0123456789abcdef0123";
const ISSUER: &str = "https://portal.e2e";
const AUDIENCE: &str = "consolegate-e2e";

fn viewer_jwt(user: &str, vms: &[&str]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = json!({
        "sub": user, "iss": ISSUER, "aud": AUDIENCE, "exp": now + 600, "iat": now,
        "roles": "viewer", "vms": vms,
    });
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// `[auth.jwt]` (HS256, its secret in a 0600 file under `dir`), a static
/// hypervisor `lab` with `web-1` and `db-1` on the two listeners' ports,
/// fast list refreshes and alerts, and a REST limit for the flood.
fn viewer_appliance(dir: &std::path::Path, web: u16, db: u16) -> Appliance {
    let secret = dir.join("jwt.secret");
    common::write_private(&secret, format!("{SECRET}\n"));
    appliance(ApplianceOptions {
        extra_toml: format!(
            "{FAST_ALERTS}vm_refresh_interval_ms = 1000\n\n[rate_limits]\nrest_per_ip_per_s = 50\n\n\
             [cache]\nvm_list_ttl_ms = 200\n\n\
             [auth.jwt]\nenabled = true\nalgorithm = \"HS256\"\nhs256_secret_file = {:?}\n\
             issuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\nleeway_ms = 2000\n\n\
             [[hypervisors]]\nkind = \"static\"\nid = \"lab\"\n\
             vms = [{{ id = \"web-1\", host = \"127.0.0.1\", port = {web} }}, \
             {{ id = \"db-1\", host = \"127.0.0.1\", port = {db} }}]\n",
            secret.display().to_string()
        ),
        ..ApplianceOptions::default()
    })
}

/// A demo console of `user`, connected through the RFB handshake.
fn open_demo(app: &Appliance, user: &str) -> (CreatedSession, PlainClient) {
    let s = app.create_demo(user);
    let mut browser = ws_connect(IO, s.addr, &s.path, &["binary"]);
    rfb_handshake_none(&mut browser);
    (s, browser)
}

/// A `vm_status_changed` of `vm` from `on`.
fn went_down(vm: &'static str) -> impl Fn(&Value) -> bool {
    move |d| d["vm_id"] == vm && d["old_status"] == "on"
}

fn refused(app: &Appliance, path: &str, token: &str) -> (u16, Value) {
    match try_events(app.control, path, Some(token)) {
        Ok(_) => panic!("{path}: a viewer was let in"),
        Err(refusal) => refusal,
    }
}

#[test]
fn a_viewer_jwt_sees_only_its_vms_and_sessions_and_never_alerts_or_stats() {
    let dir = tempfile::tempdir().unwrap();
    let web = TcpListener::bind("127.0.0.1:0").unwrap();
    let db = TcpListener::bind("127.0.0.1:0").unwrap();
    let app = viewer_appliance(
        dir.path(),
        web.local_addr().unwrap().port(),
        db.local_addr().unwrap().port(),
    );
    let vera = viewer_jwt("vera", &["web-*"]);
    // Both VMs listed on before anyone subscribes (the refresh's baseline).
    wait_until(Duration::from_secs(20), "both static VMs on", || {
        // Well under the per-IP REST limit, which the test's calls share.
        thread::sleep(Duration::from_millis(100));
        let list = app.api("GET", "/api/v1/vms?hypervisor=lab", Some(ADMIN_TOKEN), None);
        let vms = list.json()["vms"].as_array().cloned().unwrap_or_default();
        (vms.len() == 2 && vms.iter().all(|v| v["power"] == "on")).then_some(())
    });

    // Rooms a viewer may not join: documented refusals before the upgrade.
    let (status, body) = refused(&app, "/ws/vm/lab:db-1", &vera);
    assert_eq!(
        (status, &body["error"]["code"]),
        (403, &json!("forbidden")),
        "{body}"
    );
    let (status, body) = refused(&app, "/ws/stats", &vera);
    assert_eq!(
        (status, &body["error"]["code"]),
        (403, &json!("forbidden")),
        "{body}"
    );
    let mut admin = events(app.control, "/ws/monitor", Some(ADMIN_TOKEN));
    let mut viewer = events(app.control, "/ws/monitor", Some(&vera));
    let mut viewer_vm = events(app.control, "/ws/vm/lab:web-1", Some(&vera));
    // Admin-only events cannot even be subscribed to.
    for kind in ["alert", "alert_cleared"] {
        viewer.send_json(json!({"type": "subscribe", "data": {"events": [kind]}}));
        let err = viewer.next_of("error");
        assert_eq!(err["data"]["code"], "event_not_allowed", "{kind}: {err}");
    }

    // Sessions: the viewer's own, and someone else's.
    let (own, _own_browser) = open_demo(&app, "vera");
    let (other, _other_browser) = open_demo(&app, "bob");
    for s in [&own, &other] {
        admin.next_where("session_opened", |d| d["session_id"] == s.id.as_str());
    }
    viewer.next_where("session_opened", |d| d["session_id"] == own.id.as_str());

    // Both VNC servers stop: both VMs change; the viewer hears of web-1.
    drop((web, db));
    for vm in ["lab:web-1", "lab:db-1"] {
        admin.next_where("vm_status_changed", went_down(vm));
    }
    viewer.next_where("vm_status_changed", went_down("lab:web-1"));
    viewer_vm.next_where("vm_status_changed", went_down("lab:web-1"));

    // An alert: the admin gets it.
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flood(app.control, stop.clone());
    admin.next_where("alert", |d| d["alert_type"] == "rate_limit_sustained");
    stop.store(true, Ordering::Relaxed);
    flooder.join().unwrap();

    // Everything the viewer's connections got: only what it may see.
    for (what, client) in [("monitor", &mut viewer), ("vm room", &mut viewer_vm)] {
        for v in client.drain(Duration::from_secs(2)) {
            let kind = v["type"].as_str().unwrap_or_default();
            let d = &v["data"];
            let allowed = match kind {
                "session_opened" | "session_closed" => d["user"] == "vera",
                "vm_status_changed" | "progress" => d["vm_id"] == "lab:web-1",
                "server_status_changed" | "error" | "subscribed" | "pong" => what == "monitor",
                _ => false,
            };
            assert!(allowed, "viewer {what} got {v}");
        }
    }
}
