//! The REST API on the control port (axum): sessions, ports, stats,
//! health, metrics, OpenAPI. Every error is JSON `{"error":{"code","message"}}`
//! with a status that says who is at fault, counted and logged.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::registry::{self, id_hex, PortMode, Record, TargetView};
use super::ControlState;
use crate::auth::{Need, Principal};
use crate::config::users::WhenFull;
use crate::dataplane::router::base64_url;
use crate::mailbox::{Admission, Target, ToWorker};

/// The OpenAPI document, kept in docs/ and served as is.
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// An API error: status, stable code, message, optional Retry-After.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
        let mut resp = (self.status, body).into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

pub(super) type ApiResult<T> = Result<T, ApiError>;

pub fn router(state: Arc<ControlState>) -> Router {
    let max_body = state.cfg.control.max_request_bytes;
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/sessions", get(list_sessions).post(create_session))
        .route(
            "/api/v1/sessions/{id}",
            get(get_session).delete(delete_session),
        )
        .route("/api/v1/ports", get(ports))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/viewers", get(viewers))
        .route(
            "/api/v1/users/{user}/close-sessions",
            axum::routing::post(close_user_sessions),
        )
        .merge(super::vms::routes())
        .merge(super::events_ws::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    #[cfg(feature = "failpoints")]
    let router = router.route(
        "/api/v1/debug/failpoints/{name}",
        axum::routing::put(set_failpoint).delete(clear_failpoint),
    );
    router
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limit_time,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limit_head,
        ))
        // Outermost: a caller over its per-IP budget costs nothing more.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::client_ip::limit_rest_per_ip,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Who the caller is (`Authorization: Bearer`: a static token or, with
/// `[auth.jwt]` on, a JWT) and whether that is enough for `need`: 401
/// when no principal, 403 when the role is not enough; counted by cause.
pub(super) fn authorize(
    state: &ControlState,
    headers: &HeaderMap,
    need: Need,
) -> ApiResult<Principal> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    authorize_token(
        state,
        token,
        "missing bearer token (Authorization: Bearer <token>)",
        need,
    )
}

/// [`authorize`] for a token taken from elsewhere (a console URL's
/// `?token=`); `missing` is the message when there is none.
pub(super) fn authorize_token(
    state: &ControlState,
    token: Option<&str>,
    missing: &str,
    need: Need,
) -> ApiResult<Principal> {
    let Some(token) = token else {
        state.count_error("auth_missing");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            missing,
        ));
    };
    let principal = state.principal_of(token).map_err(|e| {
        state.count_error(e.kind());
        tracing::warn!(cause = e.kind(), "API request with a refused token");
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    })?;
    if !principal.has(need) {
        state.count_error("auth_forbidden");
        return Err(forbidden(format!(
            "this needs {} (the token has {:?})",
            need.describe(),
            principal.role
        )));
    }
    Ok(principal)
}

pub(super) fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

/// Refuse request heads larger than `control.max_request_bytes` (hyper's
/// own limit is far larger) with 431 and the JSON error shape.
async fn limit_head(
    State(state): State<Arc<ControlState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let head: usize = req.uri().to_string().len()
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head > state.cfg.control.max_request_bytes {
        state.count_error("request_head_too_large");
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request_head_too_large",
            format!(
                "request head over {} bytes",
                state.cfg.control.max_request_bytes
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// Bound every request by `control.request_timeout_ms` (504 with the JSON
/// error shape beyond): a stuck hypervisor call must not hold a client, nor
/// its connection, forever.
async fn limit_time(
    State(state): State<Arc<ControlState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = Duration::from_millis(state.cfg.control.request_timeout_ms);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            state.count_error("request_timeout");
            tracing::warn!(
                timeout_ms = limit.as_millis() as u64,
                "API request timed out"
            );
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "request_timeout",
                format!("the request took longer than {} ms", limit.as_millis()),
            )
            .into_response()
        }
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Ready: not draining, and every worker alive and turning its loop (a
/// dead or stuck worker means sessions on the shared port can fail).
async fn readyz(State(state): State<Arc<ControlState>>) -> Response {
    if state.data_plane.is_draining() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "draining", "shutting down")
            .into_response();
    }
    let stall_ms = state.cfg.control.worker_stall_ms;
    let health = state.data_plane.health(Instant::now());
    let workers: Vec<serde_json::Value> = health
        .iter()
        .map(|h| {
            json!({
                "worker": h.worker,
                "alive": h.alive,
                "last_turn_age_ms": h.last_turn_age_ms,
            })
        })
        .collect();
    let bad: Vec<String> = health
        .iter()
        .filter(|h| !h.alive || h.last_turn_age_ms > stall_ms)
        .map(|h| {
            if h.alive {
                format!("worker {} stuck for {} ms", h.worker, h.last_turn_age_ms)
            } else {
                format!("worker {} is dead", h.worker)
            }
        })
        .collect();
    if !bad.is_empty() {
        state.count_error("workers_unhealthy");
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "workers_unhealthy",
            bad.join("; "),
        )
        .into_response();
    }
    Json(json!({"status": "ready", "workers": workers})).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

async fn metrics(State(state): State<Arc<ControlState>>, headers: HeaderMap) -> Response {
    if state.cfg.control.metrics_require_token {
        if let Err(e) = authorize(&state, &headers, Need::ReadAll) {
            return e.into_response();
        }
    }
    let fleet = state.fleet.stats().await;
    let body = super::metrics_text::render(&state, &fleet);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// `target` as the API takes it; [`TargetReq::spec`] checks it into a
/// [`TargetSpec`] (one variant per kind), naming the field that is wrong.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetReq {
    /// "vnc" (a VNC server), "webmks" (a VMware WebMKS endpoint) or "demo"
    /// (the built-in demo server).
    pub kind: String,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub password: Option<String>,
    /// webmks: `wss://host:port/ticket/T`.
    #[serde(default)]
    pub url: Option<String>,
    /// webmks: the ticket's `sslThumbprint` (SHA-1 `AA:BB:…`, or SHA-256).
    #[serde(default)]
    pub thumbprint: Option<String>,
}

// By hand: passwords, ticket URLs and thumbprints never reach a log line.
impl std::fmt::Debug for TargetReq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetReq")
            .field("kind", &self.kind)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field(
                "thumbprint",
                &self.thumbprint.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A checked target, one variant per kind.
pub enum TargetSpec {
    Demo,
    Vnc {
        host: String,
        port: u16,
        password: Option<String>,
    },
    WebMks {
        url: crate::protocol::http_upgrade::WsUrl,
        trust: crate::pki::Trust,
    },
}

impl TargetReq {
    /// The fields this kind needs, checked; the others must be absent.
    pub fn spec(&self) -> Result<TargetSpec, ApiError> {
        let only = |allowed: &[&str]| -> Result<(), ApiError> {
            let given = [
                ("host", self.host.is_some()),
                ("port", self.port.is_some()),
                ("password", self.password.is_some()),
                ("url", self.url.is_some()),
                ("thumbprint", self.thumbprint.is_some()),
            ];
            match given.iter().find(|(k, set)| *set && !allowed.contains(k)) {
                Some((k, _)) => Err(bad(
                    "bad_target",
                    format!("target.{k} does not apply to kind {}", self.kind),
                )),
                None => Ok(()),
            }
        };
        match self.kind.as_str() {
            "demo" => {
                only(&[])?;
                Ok(TargetSpec::Demo)
            }
            "vnc" => {
                only(&["host", "port", "password"])?;
                let host = self
                    .host
                    .clone()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| bad("bad_target", "target.host is required for kind vnc"))?;
                if host.len() > MAX_FIELD_BYTES {
                    return Err(bad("bad_target", "target.host is too long"));
                }
                let port = self
                    .port
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad("bad_target", "target.port is required (1-65535)"))?;
                if self
                    .password
                    .as_ref()
                    .is_some_and(|p| p.len() > MAX_FIELD_BYTES)
                {
                    return Err(bad("bad_target", "target.password is too long"));
                }
                Ok(TargetSpec::Vnc {
                    host,
                    port,
                    password: self.password.clone(),
                })
            }
            "webmks" => {
                only(&["url", "thumbprint"])?;
                let url = self
                    .url
                    .as_deref()
                    .ok_or_else(|| bad("bad_target", "target.url is required for kind webmks"))?;
                // The error says what is wrong, never the URL (the ticket).
                let url = crate::protocol::http_upgrade::WsUrl::parse(url)
                    .map_err(|e| bad("bad_target", format!("target.url: {e}")))?;
                if !url.tls {
                    return Err(bad("bad_target", "target.url must be wss://"));
                }
                let trust = crate::pki::Trust::from_config(self.thumbprint.as_deref(), None)
                    .map_err(|e| bad("bad_target", format!("target.thumbprint: {e}")))?;
                Ok(TargetSpec::WebMks { url, trust })
            }
            other => Err(bad(
                "unsupported_target",
                format!("target.kind {other:?} is not supported (vnc, webmks, demo)"),
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateReq {
    pub target: TargetReq,
    /// Required with a static token; a JWT's `sub` by default.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub vm_id: Option<String>,
    #[serde(default)]
    pub ttl_s: Option<u64>,
    #[serde(default)]
    pub port_mode: Option<String>,
    /// Bind the ticket to this browser Origin (when sessions.bind_origin).
    #[serde(default)]
    pub origin: Option<String>,
    /// Bind the ticket to this client address (when sessions.bind_client_ip).
    #[serde(default)]
    pub client_ip: Option<IpAddr>,
}

#[derive(Debug, Serialize)]
pub struct CreateResp {
    pub session_id: String,
    pub ws_url: String,
    pub token: String,
    pub expires_at_ms: u64,
    pub port: Option<u16>,
    /// A noVNC page that opens this session, when the console serves noVNC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viewer_url: Option<String>,
}

/// Largest user / vm_id / host strings accepted.
const MAX_FIELD_BYTES: usize = 256;
/// Largest ticket lifetime a request may ask for.
const MAX_TTL_S: u64 = 3600;

fn bad(code: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, msg)
}

/// A JSON body, parsed only after the caller was authorised (a stranger's
/// body costs a bounded read, never a parse). Too large → 413, not JSON or
/// not the schema → 400, both in the JSON error shape.
pub(super) fn parse_body<T: serde::de::DeserializeOwned>(
    state: &ControlState,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<T> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            state.count_error("body_too_large");
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "request body over {} bytes",
                    state.cfg.control.max_request_bytes
                ),
            )
        } else {
            state.count_error("bad_body");
            bad("bad_request", e.body_text())
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        state.count_error("bad_json");
        bad("bad_request", format!("request body: {e}"))
    })
}

async fn create_session(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<(StatusCode, Json<CreateResp>)> {
    let principal = authorize(&state, &headers, Need::Operate)?;
    // Fault tests: a slow session creation (`api-delay` = return(ms)).
    #[cfg(feature = "failpoints")]
    if let Some(ms) =
        fail::eval("api-delay", |arg| arg.and_then(|a| a.parse::<u64>().ok())).flatten()
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    refuse_when_draining(&state)?;
    let req: CreateReq = parse_body(&state, body)?;
    let options = SessionOptions {
        user: session_user(&principal, req.user)?,
        vm_id: req.vm_id,
        ttl_s: req.ttl_s,
        port_mode: req.port_mode,
        origin: req.origin,
        client_ip: req.client_ip,
    };
    let checked = options.check(&state)?;
    let (target, view) = resolve_target(&state, &req.target).await?;
    let resp = open_session(&state, target, view, &options, checked).await?;
    Ok((StatusCode::CREATED, Json(resp)))
}

/// The user a new session belongs to: a viewer's own (`sub`; asking for
/// another user's is 403), for operators and admins the one asked for or
/// their own, and for a static token (a service, no user of its own) the
/// one asked for.
pub(super) fn session_user(principal: &Principal, asked: Option<String>) -> ApiResult<String> {
    match (&principal.user, asked) {
        (Some(own), Some(asked)) if !principal.sees_all() && *own != asked => Err(forbidden(
            format!("a viewer opens consoles as themself ({own:?}), not as {asked:?}"),
        )),
        (_, Some(asked)) => Ok(asked),
        (Some(own), None) => Ok(own.clone()),
        (None, None) => Err(bad(
            "bad_user",
            "user is required (the token is a service's, not a user's)",
        )),
    }
}

/// 503 `draining` once the appliance is shutting down.
pub(super) fn refuse_when_draining(state: &ControlState) -> ApiResult<()> {
    if state.data_plane.is_draining() {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the appliance is shutting down",
        );
        e.retry_after_s = Some(5);
        return Err(e);
    }
    Ok(())
}

/// What a new session is opened with besides its target: the fields of
/// `POST /api/v1/sessions` and `POST /api/v1/vms/{vm}/console`.
#[derive(Debug, Default)]
pub struct SessionOptions {
    pub user: String,
    pub vm_id: Option<String>,
    pub ttl_s: Option<u64>,
    pub port_mode: Option<String>,
    pub origin: Option<String>,
    pub client_ip: Option<IpAddr>,
}

/// [`SessionOptions`] checked.
#[derive(Debug)]
pub struct CheckedOptions {
    mode: PortMode,
    ttl: Duration,
    origin: Option<String>,
}

impl SessionOptions {
    /// Every field checked before any target is resolved (or hypervisor
    /// asked): a bad request costs nothing downstream.
    pub fn check(&self, state: &ControlState) -> ApiResult<CheckedOptions> {
        if self.user.is_empty() || self.user.len() > MAX_FIELD_BYTES {
            return Err(bad("bad_user", "user must be 1..256 bytes"));
        }
        if self
            .vm_id
            .as_ref()
            .is_some_and(|v| v.len() > MAX_FIELD_BYTES)
        {
            return Err(bad("bad_vm_id", "vm_id must be at most 256 bytes"));
        }
        let mode = match self.port_mode.as_deref() {
            None | Some("shared") => PortMode::Shared,
            Some("dedicated") => PortMode::Dedicated,
            Some(other) => {
                return Err(bad(
                    "bad_port_mode",
                    format!("port_mode {other:?}: expected shared or dedicated"),
                ))
            }
        };
        let ttl = match self.ttl_s {
            None => Duration::from_millis(state.cfg.sessions.ticket_ttl_ms),
            Some(0) => return Err(bad("bad_ttl", "ttl_s must be positive")),
            Some(s) if s > MAX_TTL_S => {
                return Err(bad("bad_ttl", format!("ttl_s must be at most {MAX_TTL_S}")))
            }
            Some(s) => Duration::from_secs(s),
        };
        let origin = session_origin(state, self.origin.as_deref())?;
        if self.client_ip.is_some() && !state.cfg.sessions.bind_client_ip {
            return Err(bad(
                "client_ip_binding_disabled",
                "sessions.bind_client_ip is off",
            ));
        }
        // Last: only a request that is otherwise good spends a cell.
        if let Err(limited) = state.user_rates.check(&self.user) {
            state.count_error(limited.cause);
            tracing::info!(user = ?self.user, cause = limited.cause, "console creation rate-limited");
            let mut err = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "user {:?} creates consoles too fast ({}); retry in {} s",
                    self.user, limited.cause, limited.retry_after_s
                ),
            );
            err.retry_after_s = Some(limited.retry_after_s);
            return Err(err);
        }
        Ok(CheckedOptions { mode, ttl, origin })
    }
}

/// How a new session's admission reaches the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Through the workers' mailboxes (every worker for the shared port,
    /// one for a dedicated listener), for the browser that brings the
    /// ticket.
    Mailboxes,
    /// To the caller, who hands it to the connection that asked (a
    /// console by VM id, parked on its worker): no ticket ever leaves the
    /// appliance, so it is bound to neither an Origin nor a port.
    Caller,
}

/// Admit a session to `target`: registry record, ticket, dedicated port
/// when asked, hand-over to the data plane; any failure rolls back.
pub(super) async fn open_session(
    state: &ControlState,
    target: Target,
    view: TargetView,
    options: &SessionOptions,
    checked: CheckedOptions,
) -> ApiResult<CreateResp> {
    admit_session(state, target, view, options, checked, Delivery::Mailboxes)
        .await
        .map(|(resp, _)| resp)
}

/// [`open_session`], delivered as asked; also returns the admission.
pub(super) async fn admit_session(
    state: &ControlState,
    target: Target,
    view: TargetView,
    options: &SessionOptions,
    checked: CheckedOptions,
    delivery: Delivery,
) -> ApiResult<(CreateResp, Arc<Admission>)> {
    let CheckedOptions { mode, ttl, origin } = checked;
    let (mode, origin) = match delivery {
        Delivery::Mailboxes => (mode, origin),
        Delivery::Caller => (PortMode::Shared, None),
    };
    let addr = target.addr;
    let id = random_u64();
    let mut ticket = vec![0u8; state.cfg.sessions.ticket_bytes];
    getrandom::fill(&mut ticket).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("random: {e}"),
        )
    })?;
    let now = Instant::now();
    let expires = now + ttl;
    let expires_at_ms = registry::unix_ms(SystemTime::now() + ttl);

    make_room(state, &options.user)?;

    // Dedicated port: claim + bind now (the bind is the OS check).
    let dedicated = match mode {
        PortMode::Shared => None,
        PortMode::Dedicated => Some(claim_port(state, id)?),
    };
    let port = dedicated.as_ref().map(|(p, _)| *p);
    let admission = Arc::new(Admission::new(
        id,
        ticket.clone(),
        target,
        options.user.clone(),
        expires,
        origin,
        options.client_ip.map(|ip| ip.to_canonical()),
        port,
    ));

    let record = Record::pending(
        id,
        options.user.clone(),
        options.vm_id.clone(),
        view,
        mode,
        port,
        registry::unix_ms(SystemTime::now()),
        expires_at_ms,
        now,
        expires,
        Some(admission.clone()),
    );
    state
        .registry
        .lock()
        .map_err(|_| internal())?
        .insert(record);
    if delivery == Delivery::Mailboxes {
        hand_over(state, &admission, dedicated)?;
    }
    if port.is_some() {
        super::mark_ports_dirty(state);
    }
    if let Ok(mut c) = state.counters.lock() {
        c.sessions_created += 1;
    }

    let token = base64_url(&ticket);
    let ws_url = ws_url(&state.public_url, port, id, &token);
    let viewer_url = state.cfg.console.web_dir.as_ref().map(|_| {
        let base = state.public_url.replacen("ws", "http", 1);
        let path = format!("proxy/{}?token={}", id_hex(id), token);
        format!(
            "{base}/vnc.html?autoconnect=true&resize=scale&path={}",
            urlencode(&path)
        )
    });
    tracing::info!(
        session = %id_hex(id),
        user = ?options.user,
        vm = ?options.vm_id,
        backend = %addr,
        port = ?port,
        "session created"
    );
    let resp = CreateResp {
        session_id: id_hex(id),
        ws_url,
        token,
        expires_at_ms,
        port,
        viewer_url: if port.is_none() { viewer_url } else { None },
    };
    Ok((resp, admission))
}

/// Room in the viewer pool for one more console of `user`: with
/// `[viewers] when_full = "evict"` the least recently active console goes
/// (the user's own at their cap, anyone's when the pool is full); with
/// `refuse`, or nothing to evict, 429 with Retry-After.
fn make_room(state: &ControlState, user: &str) -> ApiResult<()> {
    let evict = state.cfg.viewers.when_full == WhenFull::Evict;
    let made = state
        .registry
        .lock()
        .map_err(|_| internal())?
        .make_room(user, evict);
    match made {
        Ok(evicted) => {
            for r in evicted {
                tracing::info!(session = %id_hex(r.id), user = ?r.user, for_user = ?user, "console evicted to make room");
                state.count_error("evicted");
                after_revoke(state, r.id);
            }
            Ok(())
        }
        Err(e) => {
            state.count_error(e.code());
            let mut err = ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.code(), e.to_string());
            err.retry_after_s = Some(POOL_FULL_RETRY_AFTER_S);
            Err(err)
        }
    }
}

/// Retry-After of a refusal for a full pool or a user at their cap: about
/// the time a user takes to close a console elsewhere.
const POOL_FULL_RETRY_AFTER_S: u64 = 5;

/// `GET /api/v1/viewers`: the pool, per user.
async fn viewers(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
) -> ApiResult<Json<super::registry::Viewers>> {
    authorize(&state, &headers, Need::ReadAll)?;
    let unix_now = registry::unix_ms(SystemTime::now());
    let v = state
        .registry
        .lock()
        .map_err(|_| internal())?
        .viewers(Instant::now(), unix_now);
    Ok(Json(v))
}

/// `POST /api/v1/users/{user}/close-sessions`: every console of one user
/// (open or pending) closed, by an admin or the user themself.
async fn close_user_sessions(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let principal = authorize(&state, &headers, Need::Any)?;
    if user.is_empty() || user.len() > MAX_FIELD_BYTES {
        return Err(bad("bad_user", "user must be 1..256 bytes"));
    }
    if !principal.has(Need::Admin) && principal.user.as_deref() != Some(user.as_str()) {
        state.count_error("auth_forbidden");
        return Err(forbidden(
            "closing a user's sessions needs the admin role, or the user's own token",
        ));
    }
    let closed: Vec<u64> = {
        let mut registry = state.registry.lock().map_err(|_| internal())?;
        registry
            .sessions_of(&user)
            .into_iter()
            .filter(|id| registry.revoke(*id).is_some())
            .collect()
    };
    for id in &closed {
        after_revoke(&state, *id);
    }
    tracing::info!(user = ?user, closed = closed.len(), by = ?principal.user, "user's sessions closed");
    Ok(Json(json!({
        "user": user,
        "closed": closed.len(),
        "session_ids": closed.iter().map(|id| id_hex(*id)).collect::<Vec<_>>(),
    })))
}

/// A dedicated port for session `id`, bound.
fn claim_port(state: &ControlState, id: u64) -> ApiResult<(u16, std::net::TcpListener)> {
    let Some(pool) = &state.ports else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ports_unavailable",
            "dedicated ports are not configured",
        ));
    };
    pool.allocate(id).map_err(|e| {
        state.count_error(e.code());
        tracing::warn!(error = %e, "port allocation failed");
        let status = if e.code() == "port_pool_exhausted" {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        let mut err = ApiError::new(status, e.code(), e.to_string());
        err.retry_after_s = e.retry_after_secs().or(Some(10));
        err
    })
}

/// Hand the admission to the data plane (every worker for the shared
/// port, the least-loaded one for a dedicated listener); a refusal rolls
/// the session back and answers 503.
fn hand_over(
    state: &ControlState,
    admission: &Arc<Admission>,
    dedicated: Option<(u16, std::net::TcpListener)>,
) -> ApiResult<()> {
    let id = admission.id;
    let sent = match dedicated {
        Some((p, listener)) => {
            let w = state.pick_worker();
            match state.workers[w].send(ToWorker::AdmitDedicated(admission.clone(), listener)) {
                Ok(()) => Ok(()),
                Err(e) => {
                    if let Some(pool) = &state.ports {
                        pool.release(p, id);
                    }
                    Err(e)
                }
            }
        }
        None => {
            let mut r = Ok(());
            for w in &state.workers {
                if let Err(e) = w.send(ToWorker::Admit(admission.clone())) {
                    r = Err(e);
                    break;
                }
            }
            r
        }
    };
    if let Err(e) = sent {
        admission.revoke();
        state.send_revoke(id);
        state.registry.lock().map_err(|_| internal())?.rollback(id);
        state.count_error("mailbox_full");
        tracing::warn!(error = %e, "a worker mailbox refused the session");
        let mut err = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "dataplane_busy",
            format!("the data plane cannot take the session now: {e}"),
        );
        err.retry_after_s = Some(1);
        return Err(err);
    }
    Ok(())
}

/// The origin a new session's ticket is bound to: the one asked for, or
/// with `bind_origin` and none asked for, the portal's (configured, or the
/// console's own web origin when it serves noVNC); with binding on and no
/// origin to bind to, the request is refused rather than bound to nothing.
fn session_origin(state: &ControlState, asked: Option<&str>) -> ApiResult<Option<String>> {
    let bind = state.cfg.sessions.bind_origin;
    match asked {
        Some(_) if !bind => Err(bad(
            "origin_binding_disabled",
            "sessions.bind_origin is off",
        )),
        Some(o) => {
            crate::config::appliance::check_origin(o).map_err(|m| bad("bad_origin", m))?;
            Ok(Some(o.trim_end_matches('/').to_string()))
        }
        None if !bind => Ok(None),
        None => match state.cfg.default_origin(&state.public_url) {
            Some(o) => Ok(Some(o)),
            None => {
                state.count_error("origin_required");
                Err(bad(
                    "origin_required",
                    "sessions.bind_origin is on: give the \"origin\" of the page that will \
                     open the console, or configure sessions.portal_origin",
                ))
            }
        },
    }
}

fn internal() -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal state unavailable",
    )
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // A failing system RNG is not recoverable for tickets either; ids only
    // need uniqueness, so fall back to the clock rather than fail.
    if getrandom::fill(&mut b).is_err() {
        return registry::unix_ms(SystemTime::now()).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    u64::from_le_bytes(b) | 1
}

fn urlencode(s: &str) -> String {
    let mut o = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// `ws_url` for a session: the console port's public URL, or the same host
/// with the dedicated port.
pub fn ws_url(public_url: &str, port: Option<u16>, id: u64, token: &str) -> String {
    let base = match port {
        None => public_url.trim_end_matches('/').to_string(),
        Some(p) => {
            let (scheme, rest) = public_url.split_once("://").unwrap_or(("ws", public_url));
            let hostport = rest.split('/').next().unwrap_or(rest);
            let host = match hostport.rsplit_once(':') {
                Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
                _ => hostport,
            };
            format!("{scheme}://{host}:{p}")
        }
    };
    format!("{base}/proxy/{}?token={token}", id_hex(id))
}

/// The data-plane target for a request's `target`: names resolved here,
/// on the control plane (workers never block on DNS), raw targets kept
/// inside `sessions.target_networks`.
async fn resolve_target(state: &ControlState, t: &TargetReq) -> ApiResult<(Target, TargetView)> {
    match t.spec()? {
        TargetSpec::Demo => {
            let addr = state.demo_addr.ok_or_else(|| {
                bad(
                    "demo_disabled",
                    "the built-in demo server is disabled (demo.enabled)",
                )
            })?;
            let password = state.cfg.demo.password.clone();
            let view = TargetView {
                kind: "demo".into(),
                host: addr.ip().to_string(),
                port: addr.port(),
                has_password: password.is_some(),
            };
            Ok((Target::vnc(addr, password), view))
        }
        TargetSpec::Vnc {
            host,
            port,
            password,
        } => {
            let addr = resolve_host(state, &host, port).await?;
            check_target_network(state, &host, addr)?;
            let view = TargetView {
                kind: "vnc".into(),
                host,
                port,
                has_password: password.is_some(),
            };
            Ok((Target::vnc(addr, password), view))
        }
        TargetSpec::WebMks { url, trust } => {
            let host = url.host.to_string();
            let addr = resolve_host(state, &host, url.port).await?;
            check_target_network(state, &host, addr)?;
            let tls = crate::pki::client_config(&trust).map_err(|e| {
                state.count_error("target_tls_config");
                bad("bad_target", format!("target TLS: {e}"))
            })?;
            let view = TargetView {
                kind: "webmks".into(),
                host,
                port: url.port,
                has_password: false,
            };
            let target = crate::mailbox::WebMksTarget::new(url, tls)
                .map_err(|e| bad("bad_target", format!("target.url: {e}")))?;
            Ok((
                Target {
                    addr,
                    kind: crate::mailbox::TargetKind::WebMks(Arc::new(target)),
                },
                view,
            ))
        }
    }
}

pub(super) async fn resolve_host(
    state: &ControlState,
    host: &str,
    port: u16,
) -> ApiResult<SocketAddr> {
    tokio::net::lookup_host((host, port))
        .await
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| {
            state.count_error("target_unresolvable");
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "target_unresolvable",
                format!("{host}:{port} does not resolve"),
            )
        })
}

/// A raw target must resolve into `sessions.target_networks`, and never to
/// a link-local (cloud metadata), multicast or unspecified address.
fn check_target_network(state: &ControlState, host: &str, addr: SocketAddr) -> ApiResult<()> {
    let ip = addr.ip().to_canonical();
    let never = match ip {
        IpAddr::V4(v4) => {
            v4.is_link_local() || v4.is_multicast() || v4.is_unspecified() || v4.is_broadcast()
        }
        IpAddr::V6(v6) => v6.is_unicast_link_local() || v6.is_multicast() || v6.is_unspecified(),
    };
    let allowed = !never
        && state
            .cfg
            .target_networks()
            .map(|nets| nets.iter().any(|n| n.contains(&ip)))
            .unwrap_or(false);
    if allowed {
        return Ok(());
    }
    state.count_error("target_not_allowed");
    tracing::warn!(target = %host, addr = %ip, "raw target outside sessions.target_networks refused");
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "target_not_allowed",
        format!("{host} ({ip}) is not in a network raw targets may use (sessions.target_networks)"),
    ))
}

fn parse_id(s: &str) -> ApiResult<u64> {
    if s.is_empty() || s.len() > 16 {
        return Err(bad("bad_session_id", "session ids are 16 hex digits"));
    }
    u64::from_str_radix(s, 16).map_err(|_| bad("bad_session_id", "session ids are 16 hex digits"))
}

async fn list_sessions(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    let principal = authorize(&state, &headers, Need::Any)?;
    let mut list = state
        .registry
        .lock()
        .map_err(|_| internal())?
        .list(Instant::now());
    // A viewer sees only their own consoles.
    list.retain(|r| principal.owns(&r.user));
    Ok(Json(json!({"sessions": list})))
}

fn session_not_found(message: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "session_not_found", message)
}

async fn get_session(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Record>> {
    let principal = authorize(&state, &headers, Need::Any)?;
    let id = parse_id(&id)?;
    state
        .registry
        .lock()
        .map_err(|_| internal())?
        .get(id, Instant::now())
        // Another user's session is "not found" to a viewer: its
        // existence is not theirs to know.
        .filter(|r| principal.owns(&r.user))
        .map(Json)
        .ok_or_else(|| session_not_found("no such session"))
}

async fn delete_session(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Record>> {
    let principal = authorize(&state, &headers, Need::OpenConsole)?;
    let id = parse_id(&id)?;
    let rec = {
        let mut registry = state.registry.lock().map_err(|_| internal())?;
        match registry.owner_of(id) {
            Some(owner) if principal.owns(owner) => registry.revoke(id),
            _ => None,
        }
    }
    .ok_or_else(|| session_not_found("no such live session"))?;
    after_revoke(&state, id);
    tracing::info!(session = %id_hex(id), by = ?principal.user, "session revoked");
    Ok(Json(rec))
}

/// What follows a session's revocation in the registry: tell the workers,
/// settle its one-time credential, count it.
pub(super) fn after_revoke(state: &ControlState, id: u64) {
    // Every worker may hold the admission; the one with the relay closes it
    // at once. The admission is marked revoked already, so no new connect
    // can use it and a live relay closes on its worker's next tick even if
    // a full mailbox refuses the message (which is then retried).
    state.send_revoke(id);
    state.settle_one_time(id);
    if let Ok(mut c) = state.counters.lock() {
        c.sessions_revoked += 1;
    }
}

#[cfg(feature = "failpoints")]
async fn set_failpoint(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    actions: String,
) -> ApiResult<StatusCode> {
    authorize(&state, &headers, Need::Admin)?;
    fail::cfg(name.clone(), actions.trim()).map_err(|e| bad("bad_failpoint", e))?;
    tracing::warn!(failpoint = %name, actions = %actions.trim(), "failpoint set");
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(feature = "failpoints")]
async fn clear_failpoint(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    authorize(&state, &headers, Need::Admin)?;
    fail::remove(&name);
    Ok(StatusCode::NO_CONTENT)
}

async fn ports(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    authorize(&state, &headers, Need::ReadAll)?;
    let Some(pool) = &state.ports else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ports_unavailable",
            "dedicated ports are not configured",
        ));
    };
    Ok(Json(
        serde_json::to_value(pool.stats()).map_err(|_| internal())?,
    ))
}

async fn stats(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    authorize(&state, &headers, Need::ReadAll)?;
    Ok(Json(super::metrics_text::stats_json(&state)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls() {
        assert_eq!(
            ws_url("ws://127.0.0.1:6080", None, 0xab, "T"),
            "ws://127.0.0.1:6080/proxy/00000000000000ab?token=T"
        );
        assert_eq!(
            ws_url("wss://console.example:443/", Some(6100), 1, "T"),
            "wss://console.example:6100/proxy/0000000000000001?token=T"
        );
        assert_eq!(
            ws_url("ws://host", Some(6101), 1, "T"),
            "ws://host:6101/proxy/0000000000000001?token=T"
        );
    }

    #[test]
    fn ids_parse_and_urlencode() {
        assert_eq!(parse_id("00000000000000ab").unwrap(), 0xab);
        assert!(parse_id("xyz").is_err());
        assert!(parse_id("").is_err());
        assert_eq!(urlencode("proxy/ab?token=x"), "proxy/ab%3Ftoken%3Dx");
    }

    #[test]
    fn openapi_document_is_json_and_lists_the_paths() {
        let v: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
        let paths = v["paths"].as_object().unwrap();
        for p in [
            "/api/v1/sessions",
            "/api/v1/sessions/{id}",
            "/api/v1/ports",
            "/api/v1/stats",
            "/api/v1/viewers",
            "/api/v1/users/{user}/close-sessions",
            "/healthz",
            "/readyz",
            "/metrics",
        ] {
            assert!(paths.contains_key(p), "{p}");
        }
    }
}
