//! End-to-end tests of users (issue 12) on the real appliance
//! (`consolegate run --config FILE`): JWTs on the control API, roles,
//! sessions owned by their user, the `vms` claim.
//!
//! The tokens are minted here with the `jsonwebtoken` crate the appliance
//! verifies them with, signed with a secret written to the appliance's
//! temp dir. Control-plane behaviour runs on one IO backend; what touches
//! the relays runs on both.

#[macro_use]
mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The HS256 secret every test appliance verifies with.
const SECRET: &str = "e2e-jwt-secret-0123456789abcdef0123456789";
const ISSUER: &str = "https://portal.e2e";
const AUDIENCE: &str = "consolegate-e2e";
/// The demo console as the implicit `demo` hypervisor lists it.
const DEMO_VM: &str = "demo:demo";

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `[auth.jwt]` with HS256 and `secret_path`, plus `extra` keys.
fn jwt_toml(secret_path: &Path, extra: &str) -> String {
    format!(
        "\n[auth.jwt]\nenabled = true\nalgorithm = \"HS256\"\nhs256_secret_file = {:?}\n\
         issuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\nleeway_ms = 2000\n{extra}\n",
        secret_path.display().to_string()
    )
}

/// A secret file in a fresh temp dir (kept alive by the caller).
fn secret_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwt.secret");
    write_private(&path, format!("{SECRET}\n"));
    (dir, path)
}

/// Valid claims for `user` with `roles` (and `vms` when given).
fn claims(user: &str, roles: &str, vms: Option<Value>) -> Value {
    let mut c = json!({
        "sub": user, "iss": ISSUER, "aud": AUDIENCE,
        "exp": now_s() + 600, "iat": now_s(), "roles": roles,
    });
    if let Some(v) = vms {
        c["vms"] = v;
    }
    c
}

fn sign(c: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        c,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn token(user: &str, roles: &str, vms: Option<Value>) -> String {
    sign(&claims(user, roles, vms))
}

fn post(app: &Appliance, path: &str, token: &str, body: &Value) -> HttpResponse {
    app.api("POST", path, Some(token), Some(&body.to_string()))
}

fn console_of(app: &Appliance, token: &str, body: &Value) -> HttpResponse {
    post(app, &format!("/api/v1/vms/{DEMO_VM}/console"), token, body)
}

fn session_ids(app: &Appliance, token: &str) -> Vec<String> {
    let r = app.api("GET", "/api/v1/sessions", Some(token), None);
    assert_eq!(r.status, 200, "GET /api/v1/sessions: {r:?}");
    let mut ids: Vec<String> = r.json()["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

fn jwt_appliance(jwt_extra: &str, opts: ApplianceOptions) -> (Appliance, tempfile::TempDir) {
    let (dir, secret) = secret_file();
    let app = Appliance::start(
        "epoll",
        ApplianceOptions {
            extra_toml: format!("{}{}", jwt_toml(&secret, jwt_extra), opts.extra_toml),
            ..opts
        },
    );
    (app, dir)
}

#[test]
fn jwt_edge_cases_on_the_api() {
    set_current_io("epoll");
    let (app, _keep) = jwt_appliance("", ApplianceOptions::default());
    let admin = token("root", "admin", None);
    assert_eq!(
        app.api("GET", "/api/v1/stats", Some(&admin), None).status,
        200
    );
    let refused: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            {
                let mut c = claims("alice", "admin", None);
                c["exp"] = json!(now_s() - 120);
                sign(&c)
            },
            "auth_jwt_expired",
        ),
        (
            "not yet valid",
            {
                let mut c = claims("alice", "admin", None);
                c["nbf"] = json!(now_s() + 120);
                sign(&c)
            },
            "auth_jwt_not_yet_valid",
        ),
        (
            "wrong issuer",
            {
                let mut c = claims("alice", "admin", None);
                c["iss"] = json!("https://elsewhere");
                sign(&c)
            },
            "auth_jwt_wrong_issuer",
        ),
        (
            "wrong audience",
            {
                let mut c = claims("alice", "admin", None);
                c["aud"] = json!("another-service");
                sign(&c)
            },
            "auth_jwt_wrong_audience",
        ),
        (
            "wrong key",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims("alice", "admin", None),
                &EncodingKey::from_secret(b"not-the-secret-not-the-secret-not-the"),
            )
            .unwrap(),
            "auth_jwt_bad_signature",
        ),
        (
            "wrong algorithm",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS384),
                &claims("alice", "admin", None),
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap(),
            "auth_jwt_wrong_algorithm",
        ),
        (
            "alg none",
            {
                use base64::Engine as _;
                let b64 = |v: Value| {
                    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
                };
                format!(
                    "{}.{}.",
                    b64(json!({"alg": "none", "typ": "JWT"})),
                    b64(claims("alice", "admin", None))
                )
            },
            "auth_jwt_malformed",
        ),
        (
            "malformed",
            "eyJhbGciOiJIUzI1NiJ9.e30".to_string(),
            "auth_jwt_malformed",
        ),
        ("no role", token("alice", "guest", None), "auth_jwt_no_role"),
    ];
    for (what, tok, cause) in &refused {
        let before = app.errors_counted(cause);
        let r = app.api("GET", "/api/v1/stats", Some(tok), None);
        r.assert_api_error(401, "unauthorized", what);
        assert_eq!(
            app.errors_counted(cause),
            before + 1,
            "{what}: /metrics counts the refusal as {cause}"
        );
    }
    // The static tokens keep working next to the JWTs.
    assert_eq!(app.get("/api/v1/stats").status, 200);
    app.create_demo("service-user");
}

#[test]
fn users_own_their_sessions_and_reach_only_their_vms() {
    set_current_io("epoll");
    let (app, _keep) = jwt_appliance("", ApplianceOptions::default());
    let alice = token("alice", "viewer", Some(json!(["demo:*"])));
    let bob = token("bob", "viewer", Some(json!("demo")));
    let carol = token("carol", "viewer", None);
    let dave = token("dave", "viewer", Some(json!(["web-*", "db-?"])));
    let operator = token("olga", "operator", None);

    // Viewers open consoles by VM, as themselves.
    let r = console_of(&app, &alice, &json!({}));
    assert_eq!(r.status, 201, "alice's console: {r:?}");
    let a1 = r.json()["session_id"].as_str().unwrap().to_string();
    assert_eq!(app.session(&a1)["user"], "alice");
    let r = console_of(&app, &bob, &json!({"user": "bob"}));
    assert_eq!(r.status, 201, "bob's console: {r:?}");
    let b1 = r.json()["session_id"].as_str().unwrap().to_string();
    // Not as another user.
    console_of(&app, &bob, &json!({"user": "alice"})).assert_api_error(
        403,
        "forbidden",
        "a viewer opening a console as someone else",
    );
    // Only VMs their claim allows; none without one.
    console_of(&app, &carol, &json!({})).assert_api_error(
        403,
        "vm_not_allowed",
        "a viewer without a vms claim",
    );
    console_of(&app, &dave, &json!({})).assert_api_error(
        403,
        "vm_not_allowed",
        "a viewer whose vms claim does not match",
    );
    let r = app.api("GET", "/api/v1/vms", Some(&dave), None);
    assert_eq!(r.json()["vms"], json!([]), "dave lists no VM: {r:?}");
    let r = app.api("GET", "/api/v1/vms", Some(&alice), None);
    assert_eq!(r.json()["vms"][0]["id"], DEMO_VM, "alice lists the demo VM");
    app.api("GET", &format!("/api/v1/vms/{DEMO_VM}"), Some(&dave), None)
        .assert_api_error(403, "vm_not_allowed", "dave describing the demo VM");
    // No raw targets for viewers: the appliance is no open relay.
    post(
        &app,
        "/api/v1/sessions",
        &alice,
        &json!({"target": {"kind": "vnc", "host": "127.0.0.1", "port": 5900}}),
    )
    .assert_api_error(403, "forbidden", "a viewer asking for a raw target");
    // Nor the appliance's figures.
    app.api("GET", "/api/v1/stats", Some(&alice), None)
        .assert_api_error(403, "forbidden", "a viewer reading /api/v1/stats");

    // Each sees only their own sessions; another's is not found.
    assert_eq!(session_ids(&app, &alice), vec![a1.clone()]);
    assert_eq!(session_ids(&app, &bob), vec![b1.clone()]);
    assert!(session_ids(&app, ADMIN_TOKEN).contains(&a1));
    app.api("GET", &format!("/api/v1/sessions/{a1}"), Some(&bob), None)
        .assert_api_error(404, "session_not_found", "bob reading alice's session");
    app.api(
        "DELETE",
        &format!("/api/v1/sessions/{a1}"),
        Some(&bob),
        None,
    )
    .assert_api_error(404, "session_not_found", "bob deleting alice's session");
    assert_eq!(
        app.session(&a1)["state"],
        "pending",
        "alice's session survives"
    );
    // The read token cannot delete; the owner can.
    app.api(
        "DELETE",
        &format!("/api/v1/sessions/{a1}"),
        Some(READ_TOKEN),
        None,
    )
    .assert_api_error(403, "forbidden", "the read token deleting");
    let r = app.api(
        "DELETE",
        &format!("/api/v1/sessions/{a1}"),
        Some(&alice),
        None,
    );
    assert_eq!(r.status, 200, "alice deleting her own session: {r:?}");
    assert_eq!(app.session(&a1)["state"], "revoked");

    // Operators: raw targets (their own user by default), any session.
    let r = post(
        &app,
        "/api/v1/sessions",
        &operator,
        &json!({"target": {"kind": "demo"}}),
    );
    assert_eq!(r.status, 201, "operator's raw session: {r:?}");
    let o1 = r.json()["session_id"].as_str().unwrap().to_string();
    assert_eq!(app.session(&o1)["user"], "olga");
    let r = app.api(
        "DELETE",
        &format!("/api/v1/sessions/{b1}"),
        Some(&operator),
        None,
    );
    assert_eq!(r.status, 200, "operator deleting bob's session: {r:?}");
    // A static token still has to name the user.
    post(
        &app,
        "/api/v1/sessions",
        ADMIN_TOKEN,
        &json!({"target": {"kind": "demo"}}),
    )
    .assert_api_error(400, "bad_user", "a service token without a user");
}

#[test]
fn viewer_all_vms_opens_every_vm() {
    set_current_io("epoll");
    let (app, _keep) = jwt_appliance("viewer_all_vms = true", ApplianceOptions::default());
    let carol = token("carol", "viewer", None);
    let r = console_of(&app, &carol, &json!({}));
    assert_eq!(r.status, 201, "viewer_all_vms: {r:?}");
}

// ---------------------------------------------------------------------------
// The viewer pool: caps, eviction, idle expiry, close-sessions
// ---------------------------------------------------------------------------

/// A viewer pool appliance: `[viewers]` keys plus JWTs.
fn pool_appliance(io: &str, viewers: &str) -> (Appliance, tempfile::TempDir) {
    let (dir, secret) = secret_file();
    let app = Appliance::start(
        io,
        ApplianceOptions {
            extra_toml: format!(
                "{}\n[viewers]\n{viewers}\n",
                jwt_toml(&secret, "viewer_all_vms = true")
            ),
            ..Default::default()
        },
    );
    (app, dir)
}

/// A console of the demo VM for `tok`, connected, its RFB handshake done.
fn open_console(app: &Appliance, tok: &str) -> (CreatedSession, PlainClient, ServerInit) {
    let r = console_of(app, tok, &json!({}));
    assert_eq!(r.status, 201, "io={}: console: {r:?}", app.io);
    let s = CreatedSession::from_json(&r.json());
    let mut c = ws_connect(&app.io, s.addr, &s.path, &[]);
    let init = rfb_handshake_none(&mut c);
    app.wait_state(&s.id, "open", REPORT_TIMEOUT);
    (s, c, init)
}

/// Polls until session `a` was active after session `b`, as the API says
/// (the workers publish activity once per tick).
fn wait_more_recent(app: &Appliance, a: &str, b: &str) {
    wait_until(
        REPORT_TIMEOUT,
        &format!("{a} more recently active than {b}"),
        || {
            let (ra, rb) = (app.session(a), app.session(b));
            (ra["last_activity_ms"].as_u64()? > rb["last_activity_ms"].as_u64()?).then_some(())
        },
    );
}

/// A FramebufferUpdateRequest (incremental): traffic from the browser.
fn poke(c: &mut PlainClient, init: &ServerInit) {
    let mut m = vec![3u8, 1, 0, 0, 0, 0];
    m.extend_from_slice(&init.width.to_be_bytes());
    m.extend_from_slice(&init.height.to_be_bytes());
    c.send(&m);
}

const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn a_user_at_the_cap_evicts_their_least_recently_active_console() {
    set_current_io("epoll");
    let (app, _keep) = pool_appliance(
        "epoll",
        "max_sessions_per_user = 2\nwhen_full = \"evict\"\n",
    );
    let alice = token("alice", "viewer", None);
    let (s1, mut c1, init1) = open_console(&app, &alice);
    let (s2, mut c2, _) = open_console(&app, &alice);
    // s1 is the more recently active one.
    poke(&mut c1, &init1);
    wait_more_recent(&app, &s1.id, &s2.id);
    let r = console_of(&app, &alice, &json!({}));
    assert_eq!(r.status, 201, "a third console evicts one: {r:?}");
    let (code, reason) = c2.expect_close(Duration::from_secs(5));
    assert_eq!(code, Some(4001), "evicted close code (reason {reason:?})");
    assert!(reason.contains("evicted"), "close reason {reason:?}");
    let rec = app.session(&s2.id);
    assert_eq!(rec["state"], "revoked", "{rec}");
    assert!(
        rec["close_reason"]
            .as_str()
            .unwrap_or("")
            .contains("evicted"),
        "{rec}"
    );
    assert_eq!(app.session(&s1.id)["state"], "open", "s1 stays");
    assert!(app.errors_counted("evicted") >= 1, "evictions are counted");
    // A pending (never opened) console counts too: alice holds s1 and the
    // new pending one; the next evicts the least recent of those.
    let r = console_of(&app, &alice, &json!({}));
    assert_eq!(r.status, 201, "{r:?}");
    let _ = c1;
}

#[test]
fn a_user_at_the_cap_is_refused_with_refuse() {
    set_current_io("epoll");
    let (app, _keep) = pool_appliance(
        "epoll",
        "max_sessions_per_user = 2\nwhen_full = \"refuse\"\n",
    );
    let alice = token("alice", "viewer", None);
    // Pending sessions count: two created, none connected.
    for _ in 0..2 {
        assert_eq!(console_of(&app, &alice, &json!({})).status, 201);
    }
    let r = console_of(&app, &alice, &json!({}));
    r.assert_api_error(429, "too_many_sessions_for_user", "alice's third console");
    assert!(r.header("Retry-After").is_some(), "Retry-After: {r:?}");
    // Another user is not affected.
    let bob = token("bob", "viewer", None);
    assert_eq!(console_of(&app, &bob, &json!({})).status, 201);
}

#[test]
fn a_full_pool_evicts_across_users() {
    set_current_io("epoll");
    let (app, _keep) = pool_appliance(
        "epoll",
        "max_sessions = 2\nmax_sessions_per_user = 2\nwhen_full = \"evict\"\n",
    );
    let (alice, bob, carol) = (
        token("alice", "viewer", None),
        token("bob", "viewer", None),
        token("carol", "viewer", None),
    );
    let (sa, mut ca, _) = open_console(&app, &alice);
    let (sb, mut cb, init_b) = open_console(&app, &bob);
    poke(&mut cb, &init_b);
    wait_more_recent(&app, &sb.id, &sa.id);
    let r = console_of(&app, &carol, &json!({}));
    assert_eq!(r.status, 201, "carol's console evicts alice's: {r:?}");
    let (code, reason) = ca.expect_close(Duration::from_secs(5));
    assert_eq!(code, Some(4001), "reason {reason:?}");
    assert_eq!(app.session(&sb.id)["state"], "open", "bob's stays");
    let v = app.get_json("/api/v1/viewers");
    assert_eq!(v["max_sessions"], 2, "{v}");
    assert_eq!(v["active_sessions"], 2, "{v}");
    let users: Vec<&str> = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, vec!["bob", "carol"], "{v}");
    let _ = cb;
}

backend_tests!(idle_consoles_expire_and_active_ones_do_not);

fn idle_consoles_expire_and_active_ones_do_not(io: &str) {
    let (app, _keep) = pool_appliance(io, "idle_timeout_ms = 1500\n");
    let alice = token("alice", "viewer", None);
    // The idle console's last traffic is after this instant.
    let started = std::time::Instant::now();
    let (idle, mut idle_c, _) = open_console(&app, &alice);
    let (busy, mut busy_c, init) = open_console(&app, &alice);
    // Keep one console busy (a request every 200 ms; each brings an
    // update back) until the other closes.
    let (code, reason) = loop {
        poke(&mut busy_c, &init);
        match idle_c.next_message(Duration::from_millis(200)) {
            Err(WsEnd::Close(Some(info))) => break info,
            Err(WsEnd::Close(None)) => panic!("io={io}: the idle console closed without a code"),
            Err(WsEnd::Error(e)) => panic!("io={io}: the idle console broke: {e}"),
            Ok(_) | Err(WsEnd::Timeout) => {}
        }
        // Drain the busy console's updates.
        while busy_c.next_message(Duration::from_millis(1)).is_ok() {}
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "io={io}: the idle console was not closed within 10 s"
        );
    };
    let took = started.elapsed();
    assert_eq!(code, 1001, "io={io}: idle close code, reason {reason:?}");
    assert!(reason.contains("idle"), "io={io}: reason {reason:?}");
    assert!(
        took >= Duration::from_millis(1450),
        "io={io}: closed after {took:?}, before the idle timeout"
    );
    assert_eq!(
        app.session(&busy.id)["state"],
        "open",
        "io={io}: the busy one stays"
    );
    app.wait_state(&idle.id, "closed", REPORT_TIMEOUT);
}

#[test]
fn close_sessions_closes_all_of_one_user() {
    set_current_io("epoll");
    let (app, _keep) = pool_appliance("epoll", "");
    let (alice, bob) = (token("alice", "viewer", None), token("bob", "viewer", None));
    let (s1, mut c1, _) = open_console(&app, &alice);
    let pending = console_of(&app, &alice, &json!({}));
    assert_eq!(pending.status, 201);
    let s2 = CreatedSession::from_json(&pending.json());
    let (sb, _cb, _) = open_console(&app, &bob);
    post(&app, "/api/v1/users/alice/close-sessions", &bob, &json!({})).assert_api_error(
        403,
        "forbidden",
        "bob closing alice's sessions",
    );
    post(
        &app,
        "/api/v1/users/alice/close-sessions",
        READ_TOKEN,
        &json!({}),
    )
    .assert_api_error(403, "forbidden", "the read token closing sessions");
    let r = post(
        &app,
        "/api/v1/users/alice/close-sessions",
        &alice,
        &json!({}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["user"], "alice");
    assert_eq!(v["closed"], 2, "{v}");
    let (code, _) = c1.expect_close(Duration::from_secs(5));
    assert_eq!(code, Some(1008));
    assert_eq!(app.session(&s2.id)["state"], "revoked");
    assert_eq!(app.session(&s1.id)["state"], "revoked");
    assert_eq!(app.session(&sb.id)["state"], "open", "bob's stays");
    // The admin may close anyone's.
    let r = post(
        &app,
        "/api/v1/users/bob/close-sessions",
        ADMIN_TOKEN,
        &json!({}),
    );
    assert_eq!(r.json()["closed"], 1, "{r:?}");
}

// ---------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------

#[test]
fn console_creation_rate_limit_hits_and_recovers() {
    set_current_io("epoll");
    let (app, _keep) = pool_appliance(
        "epoll",
        "max_sessions_per_user = 100\n\n[rate_limits]\nsessions_per_user_per_minute = 30\n",
    );
    let alice = token("alice", "viewer", None);
    // A burst of 30, then one more every 2 s.
    for i in 0..30 {
        let r = console_of(&app, &alice, &json!({}));
        assert_eq!(r.status, 201, "creation {i} of the burst: {r:?}");
    }
    let before = app.errors_counted("rate_limited_sessions_per_minute");
    let r = console_of(&app, &alice, &json!({}));
    r.assert_api_error(429, "rate_limited", "the 31st console within a minute");
    let retry: u64 = r
        .header("Retry-After")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("Retry-After in {r:?}"));
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        app.errors_counted("rate_limited_sessions_per_minute"),
        before + 1
    );
    // Another user is not limited by alice's rate.
    let bob = token("bob", "viewer", None);
    assert_eq!(console_of(&app, &bob, &json!({})).status, 201);
    // It recovers by itself.
    let created = wait_until(Duration::from_secs(5), "alice's limit to recover", || {
        let r = console_of(&app, &alice, &json!({}));
        (r.status == 201).then_some(r)
    });
    assert_eq!(created.status, 201);
}
