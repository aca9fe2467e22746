//! The control API against its document, end to end on both IO backends:
//! a real appliance (`consolegate run`) is driven through every path,
//! method and documented status of docs/openapi.json, and each real answer
//! is checked against the document: the status must be documented for that
//! path and method, the Content-Type must be the documented media type, the
//! body must validate against the documented schema (JSON Schema, with the
//! `$ref`s to `#/components/...` resolved; OpenAPI 3.0's `nullable` made
//! JSON Schema's `null` type), and documented required headers
//! (`Retry-After`) must be there. Request bodies the server accepts must
//! validate against the request schema, and the refused ones it can
//! describe must not. At the end every documented answer must have been
//! seen, or be on a short list of answers a test cannot provoke, each with
//! the reason.
//!
//! That the served `/api/v1/openapi.json` equals docs/openapi.json is
//! checked too, as a minor extra: the binary embeds that file.
//!
//! Fault injection (`/api/v1/debug/failpoints/{name}`, test builds only,
//! deliberately undocumented) slows a request past `request_timeout_ms`
//! and stalls the workers for `/readyz`'s 503.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

backend_tests!(responses_match_the_openapi_document);

/// A request head past `control.max_request_bytes` (64 KiB by default).
const BIG_HEADER_BYTES: usize = 100_000;
/// `control.request_timeout_ms` of the test appliance: a DNS lookup that
/// fails must finish well within it, the delayed request must not.
const REQUEST_TIMEOUT_MS: u64 = 4_000;

/// Documented answers no test can provoke, with why; anything documented
/// and not on this list must be seen.
fn unreachable_answers() -> BTreeMap<(&'static str, &'static str, u16), &'static str> {
    let mut m = BTreeMap::new();
    m.insert(
        ("/api/v1/ports", "get", 404),
        "`consolegate run` always has a port pool",
    );
    m.insert(
        ("/api/v1/sessions", "post", 500),
        "needs a port pool failing other than by exhaustion, or a poisoned registry lock",
    );
    // The timeout layer wraps every route, but only session creation has a
    // failpoint that slows it (`api-delay`).
    for (path, method) in [
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/api/v1/openapi.json", "get"),
        ("/api/v1/sessions", "get"),
        ("/api/v1/sessions/{id}", "get"),
        ("/api/v1/sessions/{id}", "delete"),
        ("/api/v1/ports", "get"),
        ("/api/v1/stats", "get"),
        ("/api/v1/viewers", "get"),
        ("/api/v1/users/{user}/close-sessions", "post"),
    ] {
        m.insert(
            (path, method, 504),
            "no failpoint slows it (the same layer gives POST /api/v1/sessions its 504)",
        );
    }
    // The hypervisor layer: this appliance has the demo hypervisor only,
    // which never fails, is never off and has no power control.
    for (path, method) in [
        ("/api/v1/hypervisors", "get"),
        ("/api/v1/vms", "get"),
        ("/api/v1/vms/{vm}", "get"),
        ("/api/v1/vms/{vm}/thumbnail", "get"),
        ("/api/v1/vms/{vm}/console", "post"),
        ("/api/v1/vms/{vm}/power", "post"),
        ("/api/v1/operations/{id}", "get"),
        ("/api/v1/queue/stats", "get"),
    ] {
        m.insert(
            (path, method, 504),
            "needs a hung hypervisor; tests/e2e_hypervisors.rs and the queue's unit tests time calls out",
        );
    }
    for (path, method, status) in [
        ("/api/v1/vms", "get", 503),
        ("/api/v1/vms/{vm}", "get", 409),
        ("/api/v1/vms/{vm}", "get", 502),
        ("/api/v1/vms/{vm}", "get", 503),
        ("/api/v1/vms/{vm}/thumbnail", "get", 409),
        ("/api/v1/vms/{vm}/thumbnail", "get", 501),
        ("/api/v1/vms/{vm}/thumbnail", "get", 502),
        ("/api/v1/vms/{vm}/thumbnail", "get", 503),
        ("/api/v1/vms/{vm}/console", "post", 409),
        ("/api/v1/vms/{vm}/console", "post", 422),
        ("/api/v1/vms/{vm}/console", "post", 500),
        ("/api/v1/vms/{vm}/console", "post", 502),
        ("/api/v1/vms/{vm}/power", "post", 202),
        ("/api/v1/vms/{vm}/power", "post", 409),
        ("/api/v1/vms/{vm}/power", "post", 502),
        ("/api/v1/vms/{vm}/power", "post", 503),
        ("/api/v1/operations/{id}", "get", 200),
    ] {
        m.insert(
            (path, method, status),
            "the demo hypervisor cannot give it (ambiguous ids, VMs off, power, a failing or unreachable hypervisor): \
             tests/e2e_hypervisors.rs gets it from vcsim and QEMU",
        );
    }
    m
}

// ---------------------------------------------------------------------------
// The document
// ---------------------------------------------------------------------------

fn openapi_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json")
}

/// OpenAPI 3.0's `nullable: true` as JSON Schema: `null` added to the type
/// (and to an enum), or the schema wrapped in `anyOf` with `{"type":"null"}`
/// when it has no type of its own (`allOf` of a `$ref`).
fn json_schema_of(v: &Value) -> Value {
    match v {
        Value::Array(a) => Value::Array(a.iter().map(json_schema_of).collect()),
        Value::Object(o) => {
            let mut out: serde_json::Map<String, Value> = o
                .iter()
                .filter(|(k, _)| k.as_str() != "nullable")
                .map(|(k, x)| (k.clone(), json_schema_of(x)))
                .collect();
            if o.get("nullable") != Some(&Value::Bool(true)) {
                return Value::Object(out);
            }
            match out.get("type").cloned() {
                Some(Value::String(t)) => {
                    out.insert("type".into(), json!([t, "null"]));
                    if let Some(Value::Array(e)) = out.get_mut("enum") {
                        e.push(Value::Null);
                    }
                    Value::Object(out)
                }
                _ => json!({"anyOf": [Value::Object(out), {"type": "null"}]}),
            }
        }
        other => other.clone(),
    }
}

struct Spec {
    doc: Value,
    /// `components` as JSON Schema, the root every `$ref` resolves in.
    components: Value,
}

impl Spec {
    fn load() -> Spec {
        let path = openapi_path();
        let text =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let doc: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        let components = json_schema_of(&doc["components"]);
        Spec { doc, components }
    }

    /// A validator for `schema` (an OpenAPI schema object from the
    /// document), with `#/components/...` references resolvable.
    fn validator(&self, schema: &Value) -> jsonschema::Validator {
        let root = json!({
            "allOf": [json_schema_of(schema)],
            "components": self.components,
        });
        jsonschema::draft7::new(&root)
            .unwrap_or_else(|e| panic!("schema {schema} does not compile: {e}"))
    }

    /// Why `instance` does not match `schema` (empty when it does).
    fn errors(&self, schema: &Value, instance: &Value) -> Vec<String> {
        let v = self.validator(schema);
        v.iter_errors(instance)
            .map(|e| format!("at {}: {e}", e.instance_path()))
            .collect()
    }

    fn operation(&self, template: &str, method: &str) -> &Value {
        let op = &self.doc["paths"][template][method];
        assert!(
            op.is_object(),
            "{}{} {template} is not in docs/openapi.json",
            ctx(),
            method.to_uppercase()
        );
        op
    }

    /// The response object documented for `status` (a `$ref` resolved).
    fn response(&self, template: &str, method: &str, status: u16) -> Option<Value> {
        let r = self.operation(template, method)["responses"]
            .get(status.to_string())?
            .clone();
        match r["$ref"].as_str() {
            Some(target) => {
                let name = target
                    .strip_prefix("#/components/responses/")
                    .unwrap_or_else(|| panic!("response $ref {target} outside components"));
                Some(self.doc["components"]["responses"][name].clone())
            }
            None => Some(r),
        }
    }

    /// Every documented (path, method, status).
    fn documented(&self) -> BTreeSet<(String, String, u16)> {
        let mut all = BTreeSet::new();
        for (path, ops) in self.doc["paths"].as_object().expect("paths") {
            for (method, op) in ops.as_object().expect("operations") {
                for status in op["responses"].as_object().expect("responses").keys() {
                    let s: u16 = status
                        .parse()
                        .unwrap_or_else(|_| panic!("status {status:?} of {method} {path}"));
                    all.insert((path.clone(), method.clone(), s));
                }
            }
        }
        all
    }

    fn request_schema(&self, template: &str, method: &str) -> Value {
        self.operation(template, method)["requestBody"]["content"]["application/json"]["schema"]
            .clone()
    }
}

// ---------------------------------------------------------------------------
// The checker: one real request, one check against the document
// ---------------------------------------------------------------------------

struct Checker<'a> {
    spec: &'a Spec,
    control: SocketAddr,
    seen: BTreeSet<(String, String, u16)>,
    problems: Vec<String>,
}

impl<'a> Checker<'a> {
    fn new(spec: &'a Spec, control: SocketAddr) -> Checker<'a> {
        Checker {
            spec,
            control,
            seen: BTreeSet::new(),
            problems: Vec::new(),
        }
    }

    /// `method path` (an instance of `template`) with an optional bearer
    /// token and JSON body; the answer checked against the document.
    fn call(
        &mut self,
        method: &str,
        template: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> HttpResponse {
        let r = http_call(self.control, method, path, token, body)
            .unwrap_or_else(|e| panic!("{}{method} {path}: {e}", ctx()));
        self.check(method, template, path, &r);
        r
    }

    /// Like [`call`](Self::call), asserting the status too.
    fn expect(
        &mut self,
        status: u16,
        method: &str,
        template: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> HttpResponse {
        let r = self.call(method, template, path, token, body);
        assert_eq!(
            r.status,
            status,
            "{}{method} {path} with body {body:?}: {r:?}",
            ctx()
        );
        r
    }

    /// A request with a head over `control.max_request_bytes`: 431.
    fn head_too_large(&mut self, method: &str, template: &str, path: &str) {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nX-Big: {}\r\n\r\n",
            "a".repeat(BIG_HEADER_BYTES)
        );
        let r = http_raw(self.control, req.as_bytes())
            .unwrap_or_else(|e| panic!("{}{method} {path} with a big head: {e}", ctx()));
        assert_eq!(
            r.status,
            431,
            "{}{method} {path} with a big head: {r:?}",
            ctx()
        );
        self.check(method, template, path, &r);
    }

    /// The answer must be documented for `template`/`method`, carry the
    /// documented media type and headers, and its body must validate.
    fn check(&mut self, method: &str, template: &str, path: &str, r: &HttpResponse) {
        let m = method.to_ascii_lowercase();
        let what = format!("{method} {path} → {}", r.status);
        self.seen
            .insert((template.to_string(), m.clone(), r.status));
        let Some(doc) = self.spec.response(template, &m, r.status) else {
            self.problems.push(format!(
                "{what}: status not documented for {method} {template}; body {:.300}",
                r.body
            ));
            return;
        };
        self.check_headers(&what, &doc, r);
        let Some(content) = doc["content"].as_object() else {
            if !r.body.is_empty() {
                self.problems.push(format!(
                    "{what}: documented without a body, got {:.300}",
                    r.body
                ));
            }
            return;
        };
        let got_type = r.header("Content-Type").unwrap_or_default();
        let media = got_type.split(';').next().unwrap_or("").trim().to_string();
        let Some(media_doc) = content.get(&media) else {
            self.problems.push(format!(
                "{what}: Content-Type {got_type:?}, documented {:?}",
                content.keys().collect::<Vec<_>>()
            ));
            return;
        };
        let schema = &media_doc["schema"];
        let instance = if media == "application/json" {
            match serde_json::from_str::<Value>(&r.body) {
                Ok(v) => v,
                Err(e) => {
                    self.problems
                        .push(format!("{what}: body is not JSON ({e}): {:.300}", r.body));
                    return;
                }
            }
        } else {
            if r.body.is_empty() {
                self.problems.push(format!("{what}: empty {media} body"));
            }
            Value::String(r.body.clone())
        };
        let errors = self.spec.errors(schema, &instance);
        if !errors.is_empty() {
            self.problems.push(format!(
                "{what}: body does not match the documented schema:\n      {}\n    body: {:.600}",
                errors.join("\n      "),
                r.body
            ));
        }
    }

    fn check_headers(&mut self, what: &str, doc: &Value, r: &HttpResponse) {
        let Some(headers) = doc["headers"].as_object() else {
            return;
        };
        for (name, h) in headers {
            match r.header(name) {
                None if h["required"] == true => self
                    .problems
                    .push(format!("{what}: documented header {name} missing")),
                None => {}
                Some(v) => {
                    let value = v
                        .parse::<i64>()
                        .map(Value::from)
                        .unwrap_or(Value::String(v.clone()));
                    let errors = self.spec.errors(&h["schema"], &value);
                    if !errors.is_empty() {
                        self.problems
                            .push(format!("{what}: header {name}: {v:?}: {errors:?}"));
                    }
                }
            }
        }
    }

    /// The request schema of `POST /api/v1/sessions` must accept `body`
    /// (`accepted`) or refuse it.
    fn request_body(&mut self, body: &str, accepted: bool) {
        let schema = self.spec.request_schema("/api/v1/sessions", "post");
        let value: Value = match serde_json::from_str(body) {
            Ok(v) => v,
            Err(_) => {
                assert!(!accepted, "{}an accepted body that is not JSON", ctx());
                return;
            }
        };
        let errors = self.spec.errors(&schema, &value);
        if accepted && !errors.is_empty() {
            self.problems.push(format!(
                "the server accepted {body:.200} but the CreateSession schema refuses it: {errors:?}"
            ));
        }
        if !accepted && errors.is_empty() {
            self.problems.push(format!(
                "the server refused {body:.200} as malformed but the CreateSession schema accepts it"
            ));
        }
    }

    fn finish(self) -> (BTreeSet<(String, String, u16)>, Vec<String>) {
        (self.seen, self.problems)
    }
}

// ---------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------

fn set_failpoint(app: &Appliance, name: &str, actions: Option<&str>) {
    let (method, body) = match actions {
        Some(a) => ("PUT", Some(a)),
        None => ("DELETE", None),
    };
    let r = app.api(
        method,
        &format!("/api/v1/debug/failpoints/{name}"),
        Some(ADMIN_TOKEN),
        body,
    );
    assert_eq!(
        r.status, 204,
        "io={}: failpoint {name} {actions:?}: {r:?} (is the binary built with --features failpoints?)",
        app.io
    );
}

fn responses_match_the_openapi_document(io: &str) {
    let spec = Spec::load();
    let web = tempfile::tempdir().unwrap();
    fs::write(web.path().join("vnc.html"), "<!doctype html>").unwrap();
    let echo = EchoServer::with_greeting(RFB_38);
    let mut app = Appliance::start(
        io,
        ApplianceOptions {
            port_range: Some(reserve_port_range(2)),
            web_dir: Some(web.path().to_path_buf()),
            control_toml: format!(
                "metrics_require_token = true\nworker_stall_ms = 300\nrequest_timeout_ms = {REQUEST_TIMEOUT_MS}\n"
            ),
            sessions_toml: "max_sessions_per_user = 2\n".into(),
            // Long enough to see the draining answers at the end.
            limits_toml: "drain_grace_ms = 5000\n".into(),
            extra_toml: jwt_toml(web.path()),
            ..Default::default()
        },
    );
    let mut ck = Checker::new(&spec, app.control);

    health_and_metrics(&mut ck, &app);
    let ids = sessions(&mut ck, &app, &echo);
    records(&mut ck, &app, &ids);
    pool_and_stats(&mut ck);
    hypervisors(&mut ck);
    undocumented_routes_answer_json_errors(&mut ck);
    readyz_with_stuck_workers(&mut ck, &app);
    draining(&mut ck, &mut app, ids.live);

    // Binding on, no portal origin, no noVNC: the origin rules.
    let bound = Appliance::start(
        io,
        ApplianceOptions {
            sessions_toml: "bind_origin = true\n".into(),
            ..Default::default()
        },
    );
    let (seen, mut problems) = ck.finish();
    let mut ck = Checker::new(&spec, bound.control);
    origin_rules(&mut ck);
    let (seen_bound, problems_bound) = ck.finish();
    problems.extend(problems_bound);

    let seen: BTreeSet<_> = seen.union(&seen_bound).cloned().collect();
    let unreachable = unreachable_answers();
    for (path, method, status) in spec.documented() {
        let key = (path.as_str(), method.as_str(), status);
        let listed = unreachable.keys().any(|&(p, m, s)| (p, m, s) == key);
        if !seen.contains(&(path.clone(), method.clone(), status)) && !listed {
            problems.push(format!(
                "{} {path} {status} is documented but no request of this test got it",
                method.to_uppercase()
            ));
        }
        if listed && seen.contains(&(path.clone(), method.clone(), status)) {
            problems.push(format!(
                "{} {path} {status} is listed as unreachable, yet this test got it: take it off the list",
                method.to_uppercase()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "io={io}: the control API and docs/openapi.json disagree:\n  {}",
        problems.join("\n  ")
    );
    eprintln!("io={io}: {} documented answers seen", seen.len());
}

/// /healthz, /readyz, /metrics (token required here), the document itself.
fn health_and_metrics(ck: &mut Checker, app: &Appliance) {
    for path in ["/healthz", "/readyz", "/api/v1/openapi.json"] {
        ck.expect(200, "GET", path, path, None, None);
        ck.head_too_large("GET", path, path);
    }
    let served = ck.expect(
        200,
        "GET",
        "/api/v1/openapi.json",
        "/api/v1/openapi.json",
        None,
        None,
    );
    // A minor extra (the binary embeds docs/openapi.json): reported with
    // the rest, after the checks of real answers.
    let docs: Value = serde_json::from_str(&fs::read_to_string(openapi_path()).unwrap()).unwrap();
    if served.json() != docs {
        ck.problems.push(format!(
            "io={}: /api/v1/openapi.json differs from docs/openapi.json (a stale build?)",
            app.io
        ));
    }
    ck.expect(401, "GET", "/metrics", "/metrics", None, None);
    let m = ck.expect(200, "GET", "/metrics", "/metrics", Some(READ_TOKEN), None);
    assert!(
        m.body.contains("consolegate_worker_alive"),
        "io={}: /metrics: {}",
        app.io,
        m.body
    );
    ck.head_too_large("GET", "/metrics", "/metrics");
}

/// Session ids a later step looks at.
struct Ids {
    /// The open relay, kept up until the draining step.
    live: PlainClient,
    pending: String,
    revoked_pending: String,
    open: String,
    closed: String,
    expired: String,
    dedicated: String,
}

const SESSIONS: &str = "/api/v1/sessions";

/// `POST /api/v1/sessions`: every documented answer, and the request
/// schema against what the server accepts and refuses.
fn sessions(ck: &mut Checker, app: &Appliance, echo: &EchoServer) -> Ids {
    let io = app.io.clone();
    let demo = |user: &str| json!({"target": {"kind": "demo"}, "user": user});
    let post = |ck: &mut Checker, status: u16, token: Option<&str>, body: &Value| {
        let text = body.to_string();
        ck.expect(status, "POST", SESSIONS, SESSIONS, token, Some(&text))
    };
    post(ck, 401, None, &demo("a"));
    post(ck, 401, Some("not-a-token-000000000000000000"), &demo("a"));
    post(ck, 403, Some(READ_TOKEN), &demo("a"));

    // Created: shared (with viewer_url), dedicated (with port), raw vnc,
    // and a short-lived one.
    let created = |ck: &mut Checker, body: Value| -> CreatedSession {
        let r = post(ck, 201, Some(ADMIN_TOKEN), &body);
        ck.request_body(&body.to_string(), true);
        CreatedSession::from_json(&r.json())
    };
    let shared = created(
        ck,
        json!({"target": {"kind": "demo"}, "user": "u1", "vm_id": "vm-7", "ttl_s": 600}),
    );
    assert!(
        shared.json["viewer_url"].is_string() && shared.json["port"].is_null(),
        "io={io}: a shared session with console.web_dir: {}",
        shared.json
    );
    let dedicated = created(
        ck,
        json!({"target": {"kind": "demo"}, "user": "u2", "port_mode": "dedicated"}),
    );
    assert!(
        dedicated.json["port"].is_u64() && dedicated.json.get("viewer_url").is_none(),
        "io={io}: a dedicated session: {}",
        dedicated.json
    );
    let vnc_target = json!({"kind": "vnc", "host": "127.0.0.1", "port": echo.addr.port()});
    let open = created(ck, json!({"target": vnc_target, "user": "u3"}));
    let closed = created(
        ck,
        json!({"target": {"kind": "demo"}, "user": "u4", "port_mode": "shared"}),
    );
    let pending = created(ck, demo("u5"));
    let revoked_pending = created(ck, demo("u6"));
    let expired = created(
        ck,
        json!({"target": {"kind": "demo"}, "user": "u7", "ttl_s": 1}),
    );

    // 400: the body, then each field the handler checks.
    let long = "x".repeat(300);
    let refused: Vec<(Value, &str, bool)> = vec![
        // (body, code, the request schema can tell)
        (json!([1, 2, 3]), "bad_request", true),
        // No user: a static token must name one (a JWT's is its `sub`).
        (json!({"target": {"kind": "demo"}}), "bad_user", false),
        (
            json!({"target": {"kind": "demo"}, "user": "a", "evil": 1}),
            "bad_request",
            true,
        ),
        (
            json!({"target": {"kind": "vnc", "host": "127.0.0.1", "port": 70000}, "user": "a"}),
            "bad_request",
            true,
        ),
        (
            json!({"target": {"kind": "demo"}, "user": "a", "client_ip": "not-an-ip"}),
            "bad_request",
            false,
        ),
        (
            json!({"target": {"kind": "demo"}, "user": ""}),
            "bad_user",
            true,
        ),
        (
            json!({"target": {"kind": "demo"}, "user": long}),
            "bad_user",
            true,
        ),
        (
            json!({"target": {"kind": "demo"}, "user": "a", "vm_id": long}),
            "bad_vm_id",
            true,
        ),
        (
            json!({"target": {"kind": "demo"}, "user": "a", "ttl_s": 0}),
            "bad_ttl",
            true,
        ),
        (
            json!({"target": {"kind": "demo"}, "user": "a", "ttl_s": 3601}),
            "bad_ttl",
            true,
        ),
        (
            json!({"target": {"kind": "demo"}, "user": "a", "port_mode": "weird"}),
            "bad_port_mode",
            true,
        ),
        (
            json!({"target": {"kind": "vnc", "port": 5900}, "user": "a"}),
            "bad_target",
            false,
        ),
        (
            json!({"target": {"kind": "vnc", "host": "127.0.0.1", "port": 0}, "user": "a"}),
            "bad_target",
            true,
        ),
        (
            json!({"target": {"kind": "vmware"}, "user": "a"}),
            "unsupported_target",
            true,
        ),
        (
            json!({"target": {"kind": "demo"}, "user": "a", "origin": "https://portal.example"}),
            "origin_binding_disabled",
            false,
        ),
        (
            json!({"target": {"kind": "demo"}, "user": "a", "client_ip": "127.0.0.1"}),
            "client_ip_binding_disabled",
            false,
        ),
    ];
    for (body, code, schema_tells) in &refused {
        post(ck, 400, Some(ADMIN_TOKEN), body).assert_api_error(400, code, &format!("POST {body}"));
        if *schema_tells {
            ck.request_body(&body.to_string(), false);
        }
    }
    let r = ck.expect(
        400,
        "POST",
        SESSIONS,
        SESSIONS,
        Some(ADMIN_TOKEN),
        Some("{\"target\": {"),
    );
    r.assert_api_error(400, "bad_request", "malformed JSON");
    ck.request_body("{\"target\": {", false);

    let raw =
        |host: &str| json!({"target": {"kind": "vnc", "host": host, "port": 5900}, "user": "a"});
    post(ck, 403, Some(ADMIN_TOKEN), &raw("169.254.169.254")).assert_api_error(
        403,
        "target_not_allowed",
        "the metadata address",
    );
    post(ck, 422, Some(ADMIN_TOKEN), &raw("no-such-host.invalid")).assert_api_error(
        422,
        "target_unresolvable",
        "an unresolvable host",
    );
    let big = json!({"target": {"kind": "demo"}, "user": "a", "vm_id": "v".repeat(100_000)});
    post(ck, 413, Some(ADMIN_TOKEN), &big).assert_api_error(413, "body_too_large", "a big body");

    // 429: u1 has one session; max_sessions_per_user = 2.
    created(ck, demo("u1"));
    post(ck, 429, Some(ADMIN_TOKEN), &demo("u1")).assert_api_error(
        429,
        "too_many_sessions_for_user",
        "a third session for u1",
    );
    // 503: two dedicated ports, one taken above.
    created(
        ck,
        json!({"target": {"kind": "demo"}, "user": "u8", "port_mode": "dedicated"}),
    );
    post(
        ck,
        503,
        Some(ADMIN_TOKEN),
        &json!({"target": {"kind": "demo"}, "user": "u9", "port_mode": "dedicated"}),
    )
    .assert_api_error(503, "port_pool_exhausted", "a third dedicated port of two");
    // 504: a creation slowed past request_timeout_ms.
    set_failpoint(
        app,
        "api-delay",
        Some(&format!("return({})", REQUEST_TIMEOUT_MS + 1000)),
    );
    post(ck, 504, Some(ADMIN_TOKEN), &demo("u10")).assert_api_error(
        504,
        "request_timeout",
        "a slowed creation",
    );
    set_failpoint(app, "api-delay", None);
    ck.head_too_large("POST", SESSIONS, SESSIONS);

    // Open, then closed, relays (for the records' optional fields).
    let mut c = ws_connect(&io, open.addr, &open.path, &[]);
    assert_eq!(c.expect_bytes(12, "the echoed greeting"), RFB_38);
    app.wait_state(&open.id, "open", Duration::from_secs(5));
    let mut d = ws_connect(&io, closed.addr, &closed.path, &[]);
    rfb_handshake_none(&mut d);
    d.close();
    app.wait_state(&closed.id, "closed", Duration::from_secs(5));
    app.wait_state(&expired.id, "expired", Duration::from_secs(5));
    Ids {
        live: c,
        pending: pending.id,
        revoked_pending: revoked_pending.id,
        open: open.id,
        closed: closed.id,
        expired: expired.id,
        dedicated: dedicated.id,
    }
}

const SESSION: &str = "/api/v1/sessions/{id}";

/// `GET /api/v1/sessions[/{id}]`, `DELETE /api/v1/sessions/{id}`.
fn records(ck: &mut Checker, app: &Appliance, ids: &Ids) {
    let list = ck.expect(200, "GET", SESSIONS, SESSIONS, Some(READ_TOKEN), None);
    let states: BTreeSet<String> = list.json()["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .filter_map(|s| s["state"].as_str().map(str::to_string))
        .collect();
    for want in ["pending", "open", "closed", "expired"] {
        assert!(
            states.contains(want),
            "io={}: the list holds a {want} session: {states:?}",
            app.io
        );
    }
    ck.expect(401, "GET", SESSIONS, SESSIONS, None, None);
    ck.head_too_large("GET", SESSIONS, SESSIONS);

    for id in [
        &ids.pending,
        &ids.open,
        &ids.closed,
        &ids.expired,
        &ids.dedicated,
    ] {
        let path = format!("{SESSIONS}/{id}");
        ck.expect(200, "GET", SESSION, &path, Some(READ_TOKEN), None);
    }
    let open = app.session(&ids.open);
    assert!(
        open["worker"].is_u64() && open["peer"].is_string(),
        "io={}: an open record names its worker and peer: {open}",
        app.io
    );
    let closed = app.session(&ids.closed);
    assert!(
        closed["close_code"].is_u64() && closed["close_reason"].is_string(),
        "io={}: a closed record has its close code and reason: {closed}",
        app.io
    );
    let unknown = format!("{SESSIONS}/0123456789abcdef");
    let bad = format!("{SESSIONS}/xyz!");
    let pending = format!("{SESSIONS}/{}", ids.revoked_pending);
    ck.expect(400, "GET", SESSION, &bad, Some(READ_TOKEN), None);
    ck.expect(404, "GET", SESSION, &unknown, Some(READ_TOKEN), None);
    ck.expect(401, "GET", SESSION, &unknown, None, None);
    ck.head_too_large("GET", SESSION, &unknown);

    ck.expect(401, "DELETE", SESSION, &pending, None, None);
    ck.expect(403, "DELETE", SESSION, &pending, Some(READ_TOKEN), None);
    ck.expect(400, "DELETE", SESSION, &bad, Some(ADMIN_TOKEN), None);
    let r = ck.expect(200, "DELETE", SESSION, &pending, Some(ADMIN_TOKEN), None);
    assert_eq!(r.json()["state"], "revoked", "io={}: {r:?}", app.io);
    ck.expect(404, "DELETE", SESSION, &pending, Some(ADMIN_TOKEN), None);
    ck.expect(404, "DELETE", SESSION, &unknown, Some(ADMIN_TOKEN), None);
    ck.head_too_large("DELETE", SESSION, &pending);
}

fn pool_and_stats(ck: &mut Checker) {
    let viewer = viewer_token();
    for path in ["/api/v1/ports", "/api/v1/stats", "/api/v1/viewers"] {
        for token in [READ_TOKEN, ADMIN_TOKEN] {
            ck.expect(200, "GET", path, path, Some(token), None);
        }
        ck.expect(401, "GET", path, path, None, None);
        ck.expect(403, "GET", path, path, Some(&viewer), None);
        ck.head_too_large("GET", path, path);
    }
    ck.expect(403, "GET", "/metrics", "/metrics", Some(&viewer), None);
    // Closing one user's sessions: the user themself or an admin.
    const CLOSE: &str = "/api/v1/users/{user}/close-sessions";
    let own = "/api/v1/users/openapi-viewer/close-sessions";
    ck.expect(200, "POST", CLOSE, own, Some(&viewer), None);
    ck.expect(
        200,
        "POST",
        CLOSE,
        "/api/v1/users/u1/close-sessions",
        Some(ADMIN_TOKEN),
        None,
    );
    ck.expect(
        403,
        "POST",
        CLOSE,
        "/api/v1/users/u1/close-sessions",
        Some(&viewer),
        None,
    );
    ck.expect(403, "POST", CLOSE, own, Some(READ_TOKEN), None);
    ck.expect(401, "POST", CLOSE, own, None, None);
    let long = format!("/api/v1/users/{}/close-sessions", "u".repeat(300));
    ck.expect(400, "POST", CLOSE, &long, Some(ADMIN_TOKEN), None);
    ck.head_too_large("POST", CLOSE, own);
}

/// The HS256 secret of the test appliance's `[auth.jwt]`.
const JWT_SECRET: &str = "openapi-jwt-secret-0123456789abcdef0123456789";

/// `[auth.jwt]` for the test appliance, its secret in `dir`.
fn jwt_toml(dir: &Path) -> String {
    let secret = dir.join("jwt.secret");
    write_private(&secret, JWT_SECRET);
    format!(
        "\n[auth.jwt]\nenabled = true\nhs256_secret_file = {:?}\nissuer = \"openapi\"\naudience = \"consolegate\"\n",
        secret.display().to_string()
    )
}

/// A viewer's JWT (user `openapi-viewer`).
fn viewer_token() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "openapi-viewer", "iss": "openapi", "aud": "consolegate",
                "exp": now + 600, "roles": ["viewer"]}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// The hypervisor layer, on the demo hypervisor (`demo:demo`).
fn hypervisors(ck: &mut Checker) {
    for path in ["/api/v1/hypervisors", "/api/v1/vms", "/api/v1/queue/stats"] {
        ck.expect(200, "GET", path, path, Some(READ_TOKEN), None);
        ck.expect(401, "GET", path, path, None, None);
        ck.head_too_large("GET", path, path);
    }
    let vms = "/api/v1/vms";
    ck.expect(
        400,
        "GET",
        vms,
        "/api/v1/vms?colour=red",
        Some(READ_TOKEN),
        None,
    )
    .assert_api_error(400, "bad_query", "an unknown parameter");
    ck.expect(
        404,
        "GET",
        vms,
        "/api/v1/vms?hypervisor=nohv",
        Some(READ_TOKEN),
        None,
    )
    .assert_api_error(404, "hypervisor_not_found", "an unknown hypervisor");

    let vm = "/api/v1/vms/{vm}";
    let listed = ck.expect(
        200,
        "GET",
        vm,
        "/api/v1/vms/demo:demo",
        Some(READ_TOKEN),
        None,
    );
    assert_eq!(listed.json()["hypervisor"], "demo", "{}{listed:?}", ctx());
    ck.expect(200, "GET", vm, "/api/v1/vms/demo", Some(READ_TOKEN), None);
    ck.expect(401, "GET", vm, "/api/v1/vms/demo:demo", None, None);
    ck.expect(
        404,
        "GET",
        vm,
        "/api/v1/vms/demo:nope",
        Some(READ_TOKEN),
        None,
    )
    .assert_api_error(404, "vm_not_found", "an unknown VM");
    ck.head_too_large("GET", vm, "/api/v1/vms/demo:demo");

    thumbnails(ck);
    consoles(ck);

    let power = "/api/v1/vms/{vm}/power";
    let path = "/api/v1/vms/demo:demo/power";
    let on = json!({"action": "on"}).to_string();
    ck.expect(501, "POST", power, path, Some(ADMIN_TOKEN), Some(&on))
        .assert_api_error(501, "unsupported", "power on the demo");
    ck.expect(401, "POST", power, path, None, Some(&on));
    ck.expect(403, "POST", power, path, Some(READ_TOKEN), Some(&on));
    ck.expect(
        404,
        "POST",
        power,
        "/api/v1/vms/demo:nope/power",
        Some(ADMIN_TOKEN),
        Some(&on),
    );
    ck.expect(
        400,
        "POST",
        power,
        path,
        Some(ADMIN_TOKEN),
        Some(r#"{"action":"explode"}"#),
    )
    .assert_api_error(400, "bad_request", "an unknown action");
    let big = format!(
        r#"{{"action":"on","x":"{}"}}"#,
        "a".repeat(BIG_HEADER_BYTES)
    );
    ck.expect(413, "POST", power, path, Some(ADMIN_TOKEN), Some(&big));
    ck.head_too_large("POST", power, path);

    let op = "/api/v1/operations/{id}";
    ck.expect(
        404,
        "GET",
        op,
        "/api/v1/operations/op-999",
        Some(READ_TOKEN),
        None,
    )
    .assert_api_error(404, "operation_not_found", "an unknown operation");
    ck.expect(401, "GET", op, "/api/v1/operations/op-1", None, None);
    ck.head_too_large("GET", op, "/api/v1/operations/op-1");
}

/// Thumbnails of the demo: a PNG with an ETag, 304 for that ETag.
fn thumbnails(ck: &mut Checker) {
    let t = "/api/v1/vms/{vm}/thumbnail";
    let path = "/api/v1/vms/demo:demo/thumbnail?width=64&height=48";
    let r = ck.expect(200, "GET", t, path, Some(READ_TOKEN), None);
    let etag = r.header("ETag").expect("an ETag");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {READ_TOKEN}\r\nIf-None-Match: {etag}\r\n\r\n"
    );
    let r = http_raw(ck.control, request.as_bytes()).expect("a 304");
    assert_eq!(r.status, 304, "{}{r:?}", ctx());
    ck.check("GET", t, path, &r);
    ck.expect(
        400,
        "GET",
        t,
        "/api/v1/vms/demo:demo/thumbnail?width=0",
        Some(READ_TOKEN),
        None,
    )
    .assert_api_error(400, "bad_thumbnail_size", "width 0");
    ck.expect(
        400,
        "GET",
        t,
        "/api/v1/vms/demo:demo/thumbnail?depth=3",
        Some(READ_TOKEN),
        None,
    )
    .assert_api_error(400, "bad_query", "an unknown parameter");
    ck.expect(401, "GET", t, path, None, None);
    ck.expect(
        404,
        "GET",
        t,
        "/api/v1/vms/demo:nope/thumbnail",
        Some(READ_TOKEN),
        None,
    );
    ck.head_too_large("GET", t, path);
}

/// Consoles by VM: created (a session with `vm_id`), refused bodies, the
/// user cap (`max_sessions_per_user = 2` here).
fn consoles(ck: &mut Checker) {
    let c = "/api/v1/vms/{vm}/console";
    let path = "/api/v1/vms/demo:demo/console";
    let body = |user: &str| json!({"user": user}).to_string();
    for _ in 0..2 {
        let r = ck.expect(
            201,
            "POST",
            c,
            path,
            Some(ADMIN_TOKEN),
            Some(&body("hv-user")),
        );
        assert_eq!(r.json()["vm_id"], "demo:demo", "{}{r:?}", ctx());
    }
    ck.expect(
        429,
        "POST",
        c,
        path,
        Some(ADMIN_TOKEN),
        Some(&body("hv-user")),
    );
    ck.expect(401, "POST", c, path, None, Some(&body("a")));
    ck.expect(403, "POST", c, path, Some(READ_TOKEN), Some(&body("a")));
    ck.expect(
        404,
        "POST",
        c,
        "/api/v1/vms/demo:nope/console",
        Some(ADMIN_TOKEN),
        Some(&body("a")),
    )
    .assert_api_error(404, "vm_not_found", "a console of an unknown VM");
    ck.expect(
        400,
        "POST",
        c,
        path,
        Some(ADMIN_TOKEN),
        Some(r#"{"user":"a","target":{}}"#),
    )
    .assert_api_error(400, "bad_request", "a target given to a console by VM");
    let big = format!(r#"{{"user":"{}"}}"#, "a".repeat(BIG_HEADER_BYTES));
    ck.expect(413, "POST", c, path, Some(ADMIN_TOKEN), Some(&big));
    ck.head_too_large("POST", c, path);
}

/// An unknown path and a method a path does not take: the JSON error shape
/// the document's description promises (not part of any operation).
fn undocumented_routes_answer_json_errors(ck: &mut Checker) {
    let error_schema = json!({"$ref": "#/components/schemas/Error"});
    for (method, path, status, code) in [
        ("GET", "/api/v1/nope", 404, "not_found"),
        ("PUT", SESSIONS, 405, "method_not_allowed"),
        ("POST", "/healthz", 405, "method_not_allowed"),
    ] {
        let r = http_call(ck.control, method, path, Some(ADMIN_TOKEN), Some("{}"))
            .unwrap_or_else(|e| panic!("{}{method} {path}: {e}", ctx()));
        r.assert_api_error(status, code, &format!("{method} {path}"));
        let errors = ck.spec.errors(&error_schema, &r.json());
        assert!(errors.is_empty(), "{}{method} {path}: {errors:?}", ctx());
    }
}

/// 503 `workers_unhealthy` while the workers are stalled, 200 again after.
fn readyz_with_stuck_workers(ck: &mut Checker, app: &Appliance) {
    set_failpoint(app, "worker-stall", Some("sleep(1000)"));
    wait_until(
        Duration::from_secs(10),
        "/readyz to report a stuck worker",
        || (app.api("GET", "/readyz", None, None).status == 503).then_some(()),
    );
    ck.expect(503, "GET", "/readyz", "/readyz", None, None)
        .assert_api_error(503, "workers_unhealthy", "/readyz, workers stalled");
    set_failpoint(app, "worker-stall", None);
    wait_until(Duration::from_secs(10), "/readyz to recover", || {
        (app.api("GET", "/readyz", None, None).status == 200).then_some(())
    });
}

/// SIGTERM with a live relay: during the drain grace, /readyz and
/// `POST /api/v1/sessions` answer 503 `draining`.
fn draining(ck: &mut Checker, app: &mut Appliance, live: PlainClient) {
    app.sigterm();
    wait_until(Duration::from_secs(3), "/readyz to report draining", || {
        (app.api("GET", "/readyz", None, None).status == 503).then_some(())
    });
    ck.expect(503, "GET", "/readyz", "/readyz", None, None)
        .assert_api_error(503, "draining", "/readyz while draining");
    let body = json!({"target": {"kind": "demo"}, "user": "late"}).to_string();
    ck.expect(
        503,
        "POST",
        SESSIONS,
        SESSIONS,
        Some(ADMIN_TOKEN),
        Some(&body),
    )
    .assert_api_error(503, "draining", "POST while draining");
    let console = "/api/v1/vms/{vm}/console";
    ck.expect(
        503,
        "POST",
        console,
        "/api/v1/vms/demo:demo/console",
        Some(ADMIN_TOKEN),
        Some(&json!({"user": "late"}).to_string()),
    )
    .assert_api_error(503, "draining", "a console by VM while draining");
    // The last session goes: the workers need not wait out the grace.
    drop(live);
    let status = app.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "io={}: exit after SIGTERM: {status:?}",
        app.io
    );
}

/// With `bind_origin` on and nothing to bind to: 400 `origin_required`;
/// a malformed origin: 400 `bad_origin`; a good one: 201.
fn origin_rules(ck: &mut Checker) {
    let with = |origin: Option<&str>| {
        let mut v = json!({"target": {"kind": "demo"}, "user": "a"});
        if let Some(o) = origin {
            v["origin"] = json!(o);
        }
        v.to_string()
    };
    for (origin, status, code) in [
        (None, 400, Some("origin_required")),
        (Some("https://portal.example/path"), 400, Some("bad_origin")),
        (Some("https://portal.example"), 201, None),
    ] {
        let body = with(origin);
        let r = ck.expect(
            status,
            "POST",
            SESSIONS,
            SESSIONS,
            Some(ADMIN_TOKEN),
            Some(&body),
        );
        if let Some(code) = code {
            r.assert_api_error(status, code, &format!("origin {origin:?}"));
        }
    }
}
