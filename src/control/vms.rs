//! The REST API of the hypervisor layer: hypervisors, VMs, thumbnails,
//! console-by-VM, power actions and their operations, queue and cache
//! figures. Handlers here only translate HTTP ↔ [`Fleet`]; queueing,
//! caching and pooling live in `crate::hypervisor`.
//!
//! A console opened by VM becomes an ordinary single-use session (the same
//! registry, tickets and data plane as `POST /api/v1/sessions`); the
//! target the hypervisor hands out (a VNC address with a one-time
//! password, or a WebMKS ticket URL with its thumbprint) never leaves the
//! appliance. Targets from configured hypervisors are trusted as the
//! operator configured them: `sessions.target_networks` applies to raw
//! targets only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::api::{
    admit_session, authorize, parse_body, refuse_when_draining, resolve_host, session_user,
    ApiError, ApiResult, CreateResp, Delivery, SessionOptions,
};
use super::registry::TargetView;
use super::ControlState;
use crate::auth::{Need, Principal, VmGrant};
use crate::hypervisor::fleet::VmRef;
use crate::hypervisor::model::{ConsoleTarget, HypervisorError, PowerAction, VmInfo};
use crate::hypervisor::queue::Lane;
use crate::mailbox::{Admission, Target, TargetKind, WebMksTarget};

pub fn routes() -> Router<Arc<ControlState>> {
    Router::new()
        .route("/api/v1/hypervisors", get(hypervisors))
        .route("/api/v1/vms", get(list_vms))
        .route("/api/v1/vms/{vm}", get(get_vm))
        .route("/api/v1/vms/{vm}/thumbnail", get(thumbnail))
        .route("/api/v1/vms/{vm}/console", post(console))
        .route("/api/v1/vms/{vm}/power", post(power))
        .route("/api/v1/operations/{id}", get(operation))
        .route("/api/v1/queue/stats", get(queue_stats))
}

/// A hypervisor error as an API error: its status, code and Retry-After;
/// counted and logged.
pub(super) fn hv_error(state: &ControlState, e: HypervisorError) -> ApiError {
    state.count_error(e.code());
    if e.status() >= 500 {
        tracing::warn!(code = e.code(), error = %e, "hypervisor call failed");
    } else {
        tracing::info!(code = e.code(), error = %e, "hypervisor request refused");
    }
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut err = ApiError::new(status, e.code(), e.to_string());
    err.retry_after_s = e.retry_after_s();
    err
}

fn bad_query(state: &ControlState, e: QueryRejection) -> ApiError {
    state.count_error("bad_query");
    ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text())
}

async fn hypervisors(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    authorize(&state, &headers, Need::ReadAll)?;
    Ok(Json(json!({"hypervisors": state.fleet.hypervisors()})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    hypervisor: Option<String>,
}

async fn list_vms(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let principal = authorize(&state, &headers, Need::Any)?;
    let Query(q) = query.map_err(|e| bad_query(&state, e))?;
    let mut list = state
        .fleet
        .list(q.hypervisor.as_deref())
        .await
        .map_err(|e| hv_error(&state, e))?;
    // A viewer sees the VMs their token allows.
    list.vms
        .retain(|v| principal.vms.allows(&[&v.id, &v.native_id]));
    Ok(Json(
        json!({"vms": list.vms, "unavailable": list.unavailable}),
    ))
}

async fn get_vm(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(vm): Path<String>,
) -> ApiResult<Json<VmInfo>> {
    let principal = authorize(&state, &headers, Need::Any)?;
    let info = state
        .fleet
        .describe(&vm)
        .await
        .map_err(|e| hv_error(&state, e))?;
    if !principal.vms.allows(&[&info.id, &info.native_id]) {
        state.count_error("vm_not_allowed");
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "vm_not_allowed",
            format!("the token does not allow VM {:?} (its vms claim)", info.id),
        ));
    }
    Ok(Json(info))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThumbnailQuery {
    width: Option<u32>,
    height: Option<u32>,
}

async fn thumbnail(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(vm): Path<String>,
    query: Result<Query<ThumbnailQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let principal = authorize(&state, &headers, Need::Any)?;
    let Query(q) = query.map_err(|e| bad_query(&state, e))?;
    if principal.vms != VmGrant::All {
        let wanted = state
            .fleet
            .resolve(&vm, Lane::Low)
            .await
            .map_err(|e| hv_error(&state, e))?;
        require_vm(&state, &principal, &wanted)?;
    }
    let size = state.fleet.thumbnail_size(q.width, q.height).map_err(|e| {
        state.count_error("bad_thumbnail_size");
        ApiError::new(StatusCode::BAD_REQUEST, "bad_thumbnail_size", e.to_string())
    })?;
    let (_, entry) = state
        .fleet
        .thumbnail(&vm, size)
        .await
        .map_err(|e| hv_error(&state, e))?;
    let cached = entry.value.clone().map_err(|e| hv_error(&state, e))?;
    let max_age = entry.remaining().as_secs();
    let mut out_headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&cached.etag) {
        out_headers.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("private, max-age={max_age}")) {
        out_headers.insert(header::CACHE_CONTROL, v);
    }
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| {
            tags.split(',')
                .any(|t| t.trim() == cached.etag || t.trim() == "*")
        });
    if unchanged {
        return Ok((StatusCode::NOT_MODIFIED, out_headers).into_response());
    }
    out_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
    Ok((StatusCode::OK, out_headers, cached.thumbnail.png.clone()).into_response())
}

/// `POST /api/v1/vms/{vm}/console`: the options of `POST /api/v1/sessions`
/// without the target (the hypervisor gives it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleReq {
    /// Required with a static token; a JWT's `sub` by default.
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    ttl_s: Option<u64>,
    #[serde(default)]
    port_mode: Option<String>,
    #[serde(default)]
    origin: Option<String>,
    #[serde(default)]
    client_ip: Option<IpAddr>,
}

async fn console(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(vm): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let principal = authorize(&state, &headers, Need::OpenConsole)?;
    refuse_when_draining(&state)?;
    let req: ConsoleReq = parse_body(&state, body)?;
    let options = SessionOptions {
        user: session_user(&principal, req.user)?,
        vm_id: None,
        ttl_s: req.ttl_s,
        port_mode: req.port_mode,
        origin: req.origin,
        client_ip: req.client_ip,
    };
    let (resp, _, found) =
        open_vm_console(&state, &principal, &vm, options, Delivery::Mailboxes).await?;
    Ok((StatusCode::CREATED, Json(console_json(resp, &found))))
}

/// A console of `vm` for `principal`, as `POST /api/v1/vms/{vm}/console`
/// and `/ws/console/{vm}` on the console port open it: the options
/// checked (rate limit last), the VM resolved and the grant checked on
/// the CRITICAL lane, the console acquired, and an ordinary single-use
/// session admitted (its one-time credential remembered, or retired when
/// the session could not be made).
pub(super) async fn open_vm_console(
    state: &ControlState,
    principal: &Principal,
    vm: &str,
    mut options: SessionOptions,
    delivery: Delivery,
) -> ApiResult<(CreateResp, Arc<Admission>, VmRef)> {
    // Everything the caller sent is checked before the hypervisor is
    // asked for a ticket or a password.
    let checked = options.check(state)?;
    // The grant is checked on the resolved VM (its id and native id; the
    // VM lists are cached), before the hypervisor hands out a ticket.
    let wanted = state
        .fleet
        .resolve(vm, Lane::Critical)
        .await
        .map_err(|e| hv_error(state, e))?;
    require_vm(state, principal, &wanted)?;
    let (found, console) = state
        .fleet
        .console(&wanted.id)
        .await
        .map_err(|e| hv_error(state, e))?;
    options.vm_id = Some(found.id.clone());
    let opened = match data_plane_target(state, &console.target).await {
        Ok((target, view)) => admit_session(state, target, view, &options, checked, delivery).await,
        Err(e) => Err(e),
    };
    match opened {
        Ok((resp, admission)) => {
            if console.one_time {
                state.remember_one_time(&resp.session_id, found.clone());
            }
            Ok((resp, admission, found))
        }
        Err(e) => {
            if console.one_time {
                // The credential will never be used: expire it now.
                state.spawn_console_used(found);
            }
            Err(e)
        }
    }
}

/// 403 `vm_not_allowed` unless the principal may open consoles of `vm`.
fn require_vm(state: &ControlState, principal: &Principal, vm: &VmRef) -> ApiResult<()> {
    if principal.vms.allows(&[&vm.id, &vm.native]) {
        return Ok(());
    }
    state.count_error("vm_not_allowed");
    tracing::info!(vm = %vm.id, user = ?principal.user, "VM outside the token's vms claim refused");
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "vm_not_allowed",
        format!("the token does not allow VM {:?} (its vms claim)", vm.id),
    ))
}

fn console_json(resp: CreateResp, vm: &VmRef) -> serde_json::Value {
    let mut v = serde_json::to_value(resp).unwrap_or_else(|_| json!({}));
    if let Some(map) = v.as_object_mut() {
        map.insert("vm_id".into(), json!(vm.id));
    }
    v
}

/// The data-plane target for what a hypervisor handed out (names
/// resolved here, off the workers).
async fn data_plane_target(
    state: &ControlState,
    console: &ConsoleTarget,
) -> ApiResult<(Target, TargetView)> {
    let bad_target = |what: String| {
        state.count_error("hypervisor_bad_target");
        tracing::warn!(problem = %what, "the hypervisor gave an unusable console target");
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "hypervisor_error",
            format!("the hypervisor's console target is unusable: {what}"),
        )
    };
    match console {
        ConsoleTarget::Vnc {
            host,
            port,
            password,
        } => {
            let addr = resolve_host(state, host, *port).await?;
            let view = TargetView {
                kind: "vnc".into(),
                host: host.clone(),
                port: *port,
                has_password: password.is_some(),
            };
            Ok((Target::vnc(addr, password.clone()), view))
        }
        ConsoleTarget::WebMks { url, thumbprint } => {
            // Errors name the problem, never the URL (it holds the ticket).
            let url = crate::protocol::http_upgrade::WsUrl::parse(url)
                .map_err(|e| bad_target(format!("url: {e}")))?;
            let trust = crate::pki::Trust::from_config(thumbprint.as_deref(), None)
                .map_err(|e| bad_target(format!("thumbprint: {e}")))?;
            let tls = crate::pki::client_config(&trust).map_err(|e| bad_target(e.to_string()))?;
            let host = url.host.to_string();
            let addr = resolve_host(state, &host, url.port).await?;
            let view = TargetView {
                kind: "webmks".into(),
                host,
                port: url.port,
                has_password: false,
            };
            let target =
                WebMksTarget::new(url, tls).map_err(|e| bad_target(format!("url: {e}")))?;
            Ok((
                Target {
                    addr,
                    kind: TargetKind::WebMks(Arc::new(target)),
                },
                view,
            ))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PowerReq {
    action: PowerAction,
}

async fn power(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(vm): Path<String>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Response> {
    authorize(&state, &headers, Need::Operate)?;
    let req: PowerReq = parse_body(&state, body)?;
    let op = state
        .fleet
        .power(&vm, req.action)
        .await
        .map_err(|e| hv_error(&state, e))?;
    tracing::info!(vm = %op.vm, action = ?req.action, operation = %op.id, "power action started");
    let location = format!("/api/v1/operations/{}", op.id);
    let mut resp = (StatusCode::ACCEPTED, Json(op)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    Ok(resp)
}

async fn operation(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    authorize(&state, &headers, Need::ReadAll)?;
    match state.fleet.operation(&id) {
        Some(op) => Ok(Json(op).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "operation_not_found",
            "no such operation (finished ones are kept for operations.retention_ms)",
        )),
    }
}

async fn queue_stats(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
) -> ApiResult<Json<serde_json::Value>> {
    authorize(&state, &headers, Need::ReadAll)?;
    let stats = state.fleet.stats().await;
    let lanes: HashMap<&str, serde_json::Value> = stats
        .hypervisors
        .iter()
        .map(|h| (h.id.as_str(), json!(h.queue)))
        .collect();
    Ok(Json(json!({
        "queues": lanes,
        "pools": stats.hypervisors.iter().filter_map(|h| h.pool.map(|p| (h.id.clone(), p))).collect::<HashMap<_, _>>(),
        "vm_list_cache": stats.vm_list_cache,
        "thumbnail_cache": stats.thumbnail_cache,
        "operations": stats.operations,
    })))
}
