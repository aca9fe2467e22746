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
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
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

/// `consolegate_errors_total` for `cause`, summed over the workers and
/// the control plane.
fn metric(app: &Appliance, cause: &str) -> u64 {
    let text = app.get("/metrics").body;
    let label = format!("cause=\"{cause}\"");
    text.lines()
        .filter(|l| l.starts_with("consolegate_errors_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum::<f64>() as u64
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
        let before = metric(&app, cause);
        let r = app.api("GET", "/api/v1/stats", Some(tok), None);
        r.assert_api_error(401, "unauthorized", what);
        assert_eq!(
            metric(&app, cause),
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
