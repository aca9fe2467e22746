//! End-to-end tests of a console by VM id in one URL (issue 13 item 4):
//! `GET /ws/console/{vm}?token=<JWT>` on the console port of the real
//! appliance (`consolegate run`). The worker parks the connection, the
//! control plane authenticates the token and opens the console on the
//! hypervisor's CRITICAL lane, and the upgrade completes into a relay —
//! or is answered with the status and JSON error the REST call gives.
//!
//! Peers are real: the appliance's demo VNC server, Xvnc behind a static
//! hypervisor, the govmomi vSphere simulator (WebMKS tickets to a real
//! Xvnc, a powered-off VM), a vSphere "host" that accepts TCP and never
//! answers, noVNC in headless Chromium. Tokens are minted here with the
//! `jsonwebtoken` crate, signed with a secret written to a temp dir.

#[macro_use]
mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::vcsim::{Vcsim, VcsimOptions, USERNAME};
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

backend_tests!(
    console_by_url_relays_and_refuses_like_the_rest_call,
    a_slow_hypervisor_times_out_without_stalling_the_worker,
    novnc_opens_a_console_by_url,
);

const SECRET: &str = "e2e-console-vm-secret-0123456789abcdef012345";
const ISSUER: &str = "https://portal.e2e";
const AUDIENCE: &str = "consolegate-e2e";
const DEMO_VM: &str = "demo:demo";
const DEADLINE: Duration = Duration::from_secs(20);

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `[auth.jwt]` (HS256, the secret in `dir`) plus `extra` TOML.
fn jwt_toml(dir: &Path, extra: &str) -> String {
    let secret = dir.join("jwt.secret");
    write_private(&secret, format!("{SECRET}\n"));
    format!(
        "\n[auth.jwt]\nenabled = true\nalgorithm = \"HS256\"\nhs256_secret_file = {:?}\n\
         issuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\nleeway_ms = 1000\n\n{extra}\n",
        secret.display().to_string()
    )
}

fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A token for `user` with `roles`, the `vms` claim when given, valid for
/// `valid_s` seconds from now (negative: expired).
fn token_for(user: &str, roles: &str, vms: Option<Value>, valid_s: i64) -> String {
    let mut c = json!({
        "sub": user, "iss": ISSUER, "aud": AUDIENCE,
        "exp": now_s() + valid_s, "iat": now_s() - 60, "roles": roles,
    });
    if let Some(v) = vms {
        c["vms"] = v;
    }
    sign(&c)
}

fn viewer(user: &str, vms: &[&str]) -> String {
    token_for(user, "viewer", Some(json!(vms)), 600)
}

fn console_path(vm: &str, token: &str) -> String {
    format!("/ws/console/{vm}?token={token}")
}

/// An upgrade to `path` that must be refused: its status and JSON code.
fn refused(addr: SocketAddr, path: &str, extra: &[&str]) -> HttpResponse {
    let r = raw_http(addr, &upgrade_request(path, extra));
    assert_ne!(r.status, 101, "{}{path} was not refused: {r:?}", ctx());
    r.assert_json_error(path);
    r
}

fn assert_refusal(r: &HttpResponse, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{}{what}: {r:?}", ctx());
    let body: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["error"]["code"], code, "{}{what}: {r:?}", ctx());
}

/// The value of one `/metrics` series (0 when absent).
fn series(app: &Appliance, name: &str) -> f64 {
    app.get("/metrics")
        .body
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The sessions of `user` as `GET /api/v1/sessions` lists them.
fn sessions_of(app: &Appliance, user: &str) -> Vec<Value> {
    app.get_json("/api/v1/sessions")["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["user"] == user)
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------
// The demo VM: relays, refusals, the pool, the static bearer path
// ---------------------------------------------------------------------------

/// RFB bytes through `/ws/console/demo:demo?token=<JWT>` with a raw
/// client; the session is alice's, listed and in the viewer pool; every
/// refusal carries the REST call's status and code and is counted.
fn console_by_url_relays_and_refuses_like_the_rest_call(io: &str) {
    let dir = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        io,
        ApplianceOptions {
            extra_toml: jwt_toml(
                dir.path(),
                "[viewers]\nmax_sessions_per_user = 2\nwhen_full = \"refuse\"\n",
            ),
            ..ApplianceOptions::default()
        },
    );
    let console = app.console;
    let alice = viewer("alice", &["demo:*"]);
    let mut c = ws_connect(io, console, &console_path(DEMO_VM, &alice), &[]);
    let init = rfb_handshake_none(&mut c);
    assert_eq!((init.width, init.height), (320, 200), "{}", ctx());
    let frame = rfb_framebuffer(&mut c, init.width, init.height);
    assert_eq!(frame.dimensions(), (320, 200), "{}", ctx());
    let listed = sessions_of(&app, "alice");
    assert_eq!(listed.len(), 1, "{}{listed:?}", ctx());
    assert_eq!(listed[0]["vm_id"], DEMO_VM, "{}{listed:?}", ctx());
    let id = listed[0]["session_id"].as_str().unwrap().to_string();
    app.wait_state(&id, "open", DEADLINE);
    let pool = app.get_json("/api/v1/viewers");
    let users = pool["users"].as_array().unwrap();
    assert!(
        users
            .iter()
            .any(|u| u["user"] == "alice" && u["sessions"] == 1),
        "{}alice's console is in the viewer pool: {pool}",
        ctx()
    );

    // Authorization: Bearer works as well as ?token= (a non-browser client).
    let (r, _bearer_held) = raw_http_upgrade(console, &format!("/ws/console/{DEMO_VM}"), &alice);
    assert!(
        r.starts_with("HTTP/1.1 101"),
        "{}Bearer header: {r:?}",
        ctx()
    );
    // A static [[auth.tokens]] token opens a console for the user it names.
    let path = format!("/ws/console/{DEMO_VM}?token={ADMIN_TOKEN}&user=svc");
    let mut s = ws_connect(io, console, &path, &[]);
    assert_eq!(rfb_handshake_none(&mut s).width, 320, "{}", ctx());
    assert_eq!(sessions_of(&app, "svc").len(), 1, "{}", ctx());

    // Refusals: the REST call's status and code.
    let r = refused(console, &format!("/ws/console/{DEMO_VM}"), &[]);
    assert_refusal(&r, 401, "unauthorized", "no token");
    let expired = token_for("alice", "viewer", Some(json!(["demo:*"])), -120);
    let r = refused(console, &console_path(DEMO_VM, &expired), &[]);
    assert_refusal(&r, 401, "unauthorized", "an expired token");
    assert!(r.body.contains("expired"), "{}{r:?}", ctx());
    let r = refused(console, &console_path(DEMO_VM, "not.a.jwt"), &[]);
    assert_refusal(&r, 401, "unauthorized", "a malformed token");
    let bob = viewer("bob", &["lab:*"]);
    let r = refused(console, &console_path(DEMO_VM, &bob), &[]);
    assert_refusal(&r, 403, "vm_not_allowed", "a VM outside bob's vms claim");
    let r = refused(console, &console_path("demo:nope", &alice), &[]);
    assert_refusal(&r, 404, "vm_not_found", "an unknown VM");
    let r = refused(console, "/ws/console/%zz?token=x", &[]);
    assert_refusal(&r, 400, "console_bad_vm", "a VM id that is not text");
    // alice holds one console (and the Bearer one): at the cap, refused.
    let r = refused(console, &console_path(DEMO_VM, &alice), &[]);
    assert_refusal(&r, 429, "too_many_sessions_for_user", "alice at her cap");
    assert!(r.header("Retry-After").is_some(), "{}{r:?}", ctx());

    app.wait_errors_counted("console_unauthorized", 3, DEADLINE);
    app.wait_errors_counted("console_forbidden", 1, DEADLINE);
    app.wait_errors_counted("console_vm_not_found", 1, DEADLINE);
    app.wait_errors_counted("console_limited", 1, DEADLINE);
    app.wait_errors_counted("console_bad_vm", 1, DEADLINE);
    // The relay carried on through all of it.
    let frame = rfb_framebuffer(&mut c, init.width, init.height);
    assert_eq!(frame.dimensions(), (320, 200), "{}", ctx());
}

/// Sends an upgrade with `Authorization: Bearer token` and returns the
/// response head and the connection (its console stays open while held).
fn raw_http_upgrade(addr: SocketAddr, path: &str, token: &str) -> (String, std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut s = tcp_connect(addr);
    let auth = format!("Authorization: Bearer {token}");
    s.write_all(&upgrade_request(path, &[&auth])).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    (String::from_utf8_lossy(&head).into_owned(), s)
}

// ---------------------------------------------------------------------------
// A hypervisor that never answers: 504 within connect_timeout_ms, the
// worker keeps relaying meanwhile, parked connections are bounded
// ---------------------------------------------------------------------------

/// A vSphere hypervisor whose "host" accepts TCP and never says a word,
/// another whose port is closed, and a static Xvnc: a console of the
/// silent one is answered 504 after `connect_timeout_ms` while the Xvnc
/// relay on the same (single) worker keeps flowing; a third parked
/// request beyond the limit of two is refused at once with 503; the
/// closed one answers 503 `hypervisor_unavailable`.
fn a_slow_hypervisor_times_out_without_stalling_the_worker(io: &str) {
    let dir = tempfile::tempdir().unwrap();
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = pick_free_port();
    let xvnc = Xvnc::start_with(XvncOptions {
        width: 200,
        height: 100,
        password: None,
    });
    let password = dir.path().join("vsphere.password");
    write_private(&password, "secret\n");
    let thumbprint = vec!["AB"; 20].join(":");
    let vsphere = |id: &str, port: u16| {
        format!(
            "\n[[hypervisors]]\nkind = \"vsphere\"\nid = \"{id}\"\nurl = \"https://127.0.0.1:{port}/sdk\"\n\
             username = \"u\"\npassword_file = {:?}\nthumbprint = \"{thumbprint}\"\npool_size = 1\n\
             acquire_timeout_ms = 6000\nrequest_timeout_ms = 6000\n",
            password.display().to_string()
        )
    };
    let extra = format!(
        "{}{}{}\n[[hypervisors]]\nkind = \"static\"\nid = \"lab\"\n\
         vms = [{{ id = \"x1\", name = \"box\", host = \"127.0.0.1\", port = {} }}]\n",
        jwt_toml(dir.path(), ""),
        vsphere("slow", silent.local_addr().unwrap().port()),
        vsphere("gone", closed_port),
        xvnc.port
    );
    let app = Appliance::start(
        io,
        ApplianceOptions {
            dataplane_toml: "workers = 1\n".into(),
            limits_toml: "connect_timeout_ms = 1500\nmax_parked_console_requests_per_worker = 2\n"
                .into(),
            extra_toml: extra,
            ..ApplianceOptions::default()
        },
    );
    let console = app.console;
    let operator = token_for("olga", "operator", None, 600);
    let mut relay = ws_connect(io, console, &console_path("lab:x1", &operator), &[]);
    let init = rfb_handshake_none(&mut relay);
    assert_eq!((init.width, init.height), (200, 100), "{}", ctx());

    // Two requests park (the limit); a third is refused at once.
    let slow_path = console_path("slow:vm-1", &operator);
    let started = Instant::now();
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let path = slow_path.clone();
            std::thread::spawn(move || raw_http(console, &upgrade_request(&path, &[])))
        })
        .collect();
    // Both reached the control plane (each asked the silent hypervisor on
    // the CRITICAL lane), so both are parked: a third is refused at once.
    let asked = "consolegate_queue_requests_total{hypervisor=\"slow\",lane=\"critical\",outcome=\"requested\"}";
    wait_until(DEADLINE, "two console requests at the hypervisor", || {
        (series(&app, asked) >= 2.0).then_some(())
    });
    let r = refused(console, &slow_path, &[]);
    assert_refusal(
        &r,
        503,
        "console_parked_over_limit",
        "a third parked request",
    );
    assert!(r.header("Retry-After").is_some(), "{}{r:?}", ctx());
    // Meanwhile the worker relays: framebuffer updates keep coming.
    let mut updates = 0;
    while started.elapsed() < Duration::from_millis(1000) {
        let frame = rfb_framebuffer(&mut relay, init.width, init.height);
        assert_eq!(frame.dimensions(), (200, 100), "{}", ctx());
        updates += 1;
    }
    assert!(updates >= 2, "{}only {updates} updates while parked", ctx());
    for w in waiting {
        let r = w.join().unwrap();
        assert_refusal(
            &r,
            504,
            "console_timeout",
            "a hypervisor that never answers",
        );
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_millis(5000),
        "{}504 after connect_timeout_ms (1500 ms), not {waited:?}",
        ctx()
    );
    app.wait_errors_counted("console_timeout", 2, DEADLINE);
    app.wait_errors_counted("console_parked_over_limit", 1, DEADLINE);
    // A hypervisor that is not there: 503 from the hypervisor layer.
    let r = refused(console, &console_path("gone:vm-1", &operator), &[]);
    assert_refusal(
        &r,
        503,
        "hypervisor_unavailable",
        "a hypervisor that is down",
    );
    assert!(r.header("Retry-After").is_some(), "{}{r:?}", ctx());
    app.wait_errors_counted("console_unavailable", 1, DEADLINE);
    let frame = rfb_framebuffer(&mut relay, init.width, init.height);
    assert_eq!(frame.dimensions(), (200, 100), "{}", ctx());
    drop(silent);
}

// ---------------------------------------------------------------------------
// noVNC in headless Chromium
// ---------------------------------------------------------------------------

/// noVNC served by the appliance opens `/ws/console/lab:x1?token=<JWT>`
/// and shows Xvnc's test card whole.
fn novnc_opens_a_console_by_url(io: &str) {
    let node = browser_prerequisites();
    let dir = tempfile::tempdir().unwrap();
    let xvnc = Xvnc::start_with(XvncOptions {
        width: 640,
        height: 480,
        password: None,
    });
    let card = xvnc.draw_test_card();
    let extra = format!(
        "{}\n[[hypervisors]]\nkind = \"static\"\nid = \"lab\"\n\
         vms = [{{ id = \"x1\", name = \"build box\", host = \"127.0.0.1\", port = {} }}]\n",
        jwt_toml(dir.path(), ""),
        xvnc.port
    );
    let app = Appliance::start(
        io,
        ApplianceOptions {
            web_dir: Some(PathBuf::from(NOVNC)),
            extra_toml: extra,
            ..ApplianceOptions::default()
        },
    );
    let token = viewer("vera", &["lab:x*"]);
    let run = run_novnc(
        &node,
        &format!("http://{}", app.console),
        &format!("novnc-console-by-url-{io}"),
        &[BrowserRun::new("none", &card).path(&console_path("lab:x1", &token))],
    );
    let record = wait_until(DEADLINE, "vera's console closed", || {
        let s = app.get_json("/api/v1/sessions");
        s["sessions"]
            .as_array()?
            .iter()
            .find(|s| s["user"] == "vera" && s["state"] == "closed")
            .cloned()
    });
    assert_eq!(record["vm_id"], "lab:x1", "{}{record}", ctx());
    assert!(
        record["bytes_backend_to_browser"].as_u64() > Some(400),
        "{}the console carried (almost) nothing: {record} ({})",
        ctx(),
        run.output
    );
}

// ---------------------------------------------------------------------------
// vSphere: WebMKS through the URL, and a powered-off VM
// ---------------------------------------------------------------------------

/// The simulator's VM opens through the URL (a WebMKS relay to Xvnc); its
/// powered-off VM answers 409 `vm_not_running`.
#[test]
fn vsphere_console_by_url_and_a_powered_off_vm() {
    set_current_io("epoll");
    let dir = tempfile::tempdir().unwrap();
    let xvnc = Xvnc::start_with(XvncOptions {
        width: 400,
        height: 300,
        password: None,
    });
    let sim = Vcsim::start(VcsimOptions {
        vnc: Some(xvnc.addr()),
        powered_off: vec!["DC0_H0_VM1".into()],
        ..VcsimOptions::default()
    });
    let extra = format!(
        "{}\n[[hypervisors]]\nkind = \"vsphere\"\nid = \"esx1\"\nurl = {:?}\nusername = {USERNAME:?}\n\
         password_file = {:?}\nthumbprint = {:?}\npool_size = 1\n\
         acquire_timeout_ms = 5000\nrequest_timeout_ms = 5000\n",
        jwt_toml(dir.path(), ""),
        sim.url,
        sim.password_file().display().to_string(),
        sim.thumbprint
    );
    let app = Appliance::start(
        "epoll",
        ApplianceOptions {
            extra_toml: extra,
            ..ApplianceOptions::default()
        },
    );
    let vms = app.get_json("/api/v1/vms");
    let id_of = |name: &str| {
        vms["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["id"].as_str())
            .unwrap_or_else(|| panic!("no VM {name} in {vms}"))
            .to_string()
    };
    let (on, off) = (id_of("DC0_H0_VM0"), id_of("DC0_H0_VM1"));
    let token = viewer("wanda", &["esx1:*"]);
    let mut c = ws_connect("epoll", app.console, &console_path(&on, &token), &[]);
    let init = rfb_handshake_none(&mut c);
    assert_eq!((init.width, init.height), (400, 300), "{}", ctx());
    let r = refused(app.console, &console_path(&off, &token), &[]);
    assert_refusal(&r, 409, "vm_not_running", "a powered-off VM");
    app.wait_errors_counted("console_conflict", 1, DEADLINE);
    assert_eq!(sim.stats().tickets_redeemed, 1, "{}", ctx());
}
