//! A console by VM id in one URL: `GET /ws/console/{vm}` with the user's
//! token (`?token=`, or `Authorization: Bearer`).
//!
//! The worker never waits for the control plane: it parks the half-open
//! connection (its upgrade request kept, the browser not read), sends a
//! [`ConsoleRequest`] through the bounded report queue, and goes on with
//! its other sessions. The control plane authenticates the token,
//! authorises the user for the VM, checks the viewer pool and rate limits,
//! acquires the console on the hypervisor's CRITICAL lane and answers
//! with an admission (as a ticket claim would yield) or the refusal the
//! REST call would have given. The answer completes the upgrade (a relay
//! like any other) or is written as the HTTP error. Parked connections are
//! bounded per worker (`max_parked_console_requests_per_worker`, 503
//! beyond) and in time (`connect_timeout_ms`, 504 after).
//!
//! Depends on the session stages and the mailbox's plain data; never on
//! the control plane or an IO backend.

use std::sync::Arc;
use std::time::Instant;

use super::ctx::{HandshakeSlot, WorkerCtx};
use super::{ms, Session, Stage};
use crate::cause::Cause;
use crate::dataplane::router::Route;
use crate::mailbox::{mono_ms, Admission, ConsoleAnswer, ConsoleRequest, FromWorker};
use crate::protocol::http_upgrade::{query_param, Upgrade};

/// The URL prefix of a console by VM id.
pub const CONSOLE_PATH_PREFIX: &str = "/ws/console/";
/// Longest VM id in the URL, decoded (the REST API's bound on ids).
pub const MAX_VM_ID_BYTES: usize = 256;
/// Retry-After (seconds) of a refusal for a full park or mailbox.
const BUSY_RETRY_AFTER_S: &str = "1";

/// A connection waiting for the control plane's answer.
pub(super) struct Parked {
    up: Upgrade,
    /// Bytes the browser sent behind its request (at most
    /// `max_request_bytes`; a browser sends none before the 101).
    leftover: Vec<u8>,
    /// Its place among the worker's parked connections.
    _slot: HandshakeSlot,
}

impl Parked {
    /// More bytes from a browser that did not wait for the answer; false
    /// when they go beyond `max_request_bytes`.
    pub(super) fn take_early(&mut self, data: &[u8], max: usize) -> bool {
        if self.leftover.len() + data.len() > max {
            return false;
        }
        self.leftover.extend_from_slice(data);
        true
    }
}

/// Whether a request path asks for a console by VM id.
pub fn is_console_path(path: &str) -> bool {
    path.starts_with(CONSOLE_PATH_PREFIX)
}

/// The VM id of `/ws/console/{vm}`, percent-decoded: 1 to
/// [`MAX_VM_ID_BYTES`] bytes of UTF-8 without control characters or `/`.
pub fn vm_from_path(path: &str) -> Option<String> {
    let raw = path
        .strip_prefix(CONSOLE_PATH_PREFIX)?
        .trim_end_matches('/');
    if raw.is_empty() || raw.len() > 3 * MAX_VM_ID_BYTES {
        return None;
    }
    let mut out = Vec::with_capacity(raw.len());
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let vm = String::from_utf8(out).ok()?;
    let clean = !vm.is_empty()
        && vm.len() <= MAX_VM_ID_BYTES
        && !vm.chars().any(|c| c.is_control() || c == '/');
    clean.then_some(vm)
}

impl Session {
    /// `/ws/console/{vm}`: park the connection and ask the control plane;
    /// refuse at once what needs no asking (bad id, no control plane, the
    /// park or the mailbox full).
    pub(super) fn park_console(
        &mut self,
        ctx: &mut WorkerCtx,
        up: Upgrade,
        leftover: Vec<u8>,
        now: Instant,
    ) {
        let Some(vm) = vm_from_path(&up.path) else {
            return self.console_refused_here(
                ctx,
                Cause::ConsoleBadVm,
                "the URL's VM id is empty, too long or not text",
                now,
            );
        };
        if ctx.events.is_none() {
            return self.console_refused_here(
                ctx,
                Cause::ConsoleNotServed,
                "consoles by VM id need the appliance (consolegate run)",
                now,
            );
        }
        let Some(slot) = ctx.parked_consoles.try_enter() else {
            return self.console_refused_here(
                ctx,
                Cause::ConsoleParkedOverLimit,
                "too many console requests wait on this worker; retry",
                now,
            );
        };
        let query = up.query.as_deref().unwrap_or("");
        let request = ConsoleRequest {
            worker: ctx.worker_id,
            session: self.id,
            vm,
            token: query_param(query, "token").or_else(|| up.bearer.as_ref().map(|b| b.0.clone())),
            user: query_param(query, "user"),
            peer: self.peer.map(|p| p.ip()),
            parked_at_ms: mono_ms(now),
        };
        let vm_for_log = request.vm.clone();
        let sent = ctx.events.as_ref().is_some_and(|tx| {
            tx.send(FromWorker::ConsoleRequest(Box::new(request)))
                .is_ok()
        });
        if !sent {
            return self.console_refused_here(
                ctx,
                Cause::ConsoleMailboxFull,
                "the control plane cannot take the request now; retry",
                now,
            );
        }
        tracing::debug!(session = self.id, worker = ctx.worker_id, vm = %vm_for_log, "console request parked");
        if let Stage::Front(f) = &mut self.stage {
            f.parked = Some(Box::new(Parked {
                up,
                leftover,
                _slot: slot,
            }));
        }
        self.deadline = Some(now + ms(ctx.cfg.limits.connect_timeout_ms));
    }

    /// Whether the connection waits for a console answer.
    pub fn console_parked(&self) -> bool {
        matches!(&self.stage, Stage::Front(f) if f.parked.is_some())
    }

    /// The control plane answered this connection's console request. The
    /// answer comes back (`Err`) when the connection no longer waits for
    /// one (it went away or timed out): the caller settles it.
    pub fn on_console_answer(
        &mut self,
        ctx: &mut WorkerCtx,
        answer: Box<ConsoleAnswer>,
        now: Instant,
    ) -> Result<(), Box<ConsoleAnswer>> {
        let parked = match &mut self.stage {
            Stage::Front(f) if f.parked.is_some() => f.parked.take(),
            _ => None,
        };
        let Some(parked) = parked else {
            return Err(answer);
        };
        let Parked { up, leftover, .. } = *parked;
        match answer.outcome {
            Ok(admission) => self.console_admitted(ctx, &up, admission, &leftover, now),
            Err(refusal) => {
                let cause = Cause::of_console_status(refusal.status);
                ctx.metrics.count(cause);
                tracing::info!(session = self.id, status = refusal.status, code = refusal.code, cause = cause.kind(), reason = %refusal.message, "console by VM id refused");
                let retry = refusal.retry_after_s.map(|s| s.to_string());
                let headers: Vec<(&str, &str)> = retry
                    .as_deref()
                    .map(|r| ("Retry-After", r))
                    .into_iter()
                    .collect();
                self.respond_with(
                    ctx,
                    refusal.status,
                    refusal.code,
                    &refusal.message,
                    &headers,
                    now,
                );
            }
        }
        self.settle(ctx, now);
        Ok(())
    }

    /// An admission for this connection: claim it (it can have been
    /// revoked meanwhile: evicted, closed by an admin) and upgrade.
    fn console_admitted(
        &mut self,
        ctx: &mut WorkerCtx,
        up: &Upgrade,
        admission: Arc<Admission>,
        leftover: &[u8],
        now: Instant,
    ) {
        if !admission.claim() {
            let cause = Cause::SessionRevokedBeforeConnect;
            ctx.metrics.count(cause);
            tracing::info!(
                session = self.id,
                "console revoked before its connection upgraded"
            );
            self.respond_error(ctx, cause, "the console was closed before it opened", now);
            return;
        }
        let route = Route {
            target: admission.target.clone(),
            admission: Some(admission),
        };
        self.upgrade(ctx, up, route, now);
        if !leftover.is_empty() && self.relay().is_some() {
            self.decode_input(ctx, leftover, now);
        }
    }

    /// No answer within `connect_timeout_ms`: 504.
    pub(super) fn console_timed_out(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        let cause = Cause::ConsoleTimeout;
        ctx.metrics.count(cause);
        tracing::info!(
            session = self.id,
            timeout_ms = ctx.cfg.limits.connect_timeout_ms,
            "console by VM id not ready in time"
        );
        let message = format!(
            "the console was not ready within connect_timeout_ms ({} ms)",
            ctx.cfg.limits.connect_timeout_ms
        );
        self.respond_error(ctx, cause, &message, now);
    }

    /// A refusal decided on the worker (no control-plane round trip).
    fn console_refused_here(
        &mut self,
        ctx: &mut WorkerCtx,
        cause: Cause,
        message: &str,
        now: Instant,
    ) {
        ctx.metrics.count(cause);
        tracing::info!(
            session = self.id,
            cause = cause.kind(),
            "console by VM id refused"
        );
        let status = cause.status().unwrap_or(503);
        let busy = status == 503;
        let headers: &[(&str, &str)] = if busy {
            &[("Retry-After", BUSY_RETRY_AFTER_S)]
        } else {
            &[]
        };
        self.respond_with(ctx, status, cause.kind(), message, headers, now);
    }
}

/// An answer no parked connection took (it went away or timed out): the
/// admission is claimed and closed at once, and reported closed, so the
/// registry frees its place in the viewer pool (and retires a one-time
/// credential) without waiting for its TTL.
pub fn abandon(ctx: &mut WorkerCtx, answer: ConsoleAnswer) {
    let Ok(admission) = answer.outcome else {
        return;
    };
    ctx.metrics.count(Cause::ConsoleAbandoned);
    tracing::info!(
        worker = ctx.worker_id,
        session = answer.session,
        "console answer for a connection that no longer waits; closed unused"
    );
    if admission.claim() {
        admission.close();
        ctx.report(FromWorker::Closed {
            id: admission.id,
            worker: ctx.worker_id,
            code: None,
            reason: "console request abandoned".into(),
            bytes_up: 0,
            bytes_down: 0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_from_paths() {
        assert_eq!(
            vm_from_path("/ws/console/demo:demo").as_deref(),
            Some("demo:demo")
        );
        assert_eq!(
            vm_from_path("/ws/console/demo%3Ademo/").as_deref(),
            Some("demo:demo")
        );
        assert_eq!(
            vm_from_path("/ws/console/vm%20one").as_deref(),
            Some("vm one")
        );
        assert_eq!(vm_from_path("/ws/console/"), None);
        assert_eq!(vm_from_path("/ws/console/a%2Fb"), None);
        assert_eq!(vm_from_path("/ws/console/a%0Ab"), None);
        assert_eq!(vm_from_path("/ws/console/%zz"), None);
        assert_eq!(vm_from_path("/ws/console/%e2%28"), None);
        assert_eq!(vm_from_path("/proxy/abc"), None);
        assert_eq!(
            vm_from_path(&format!("/ws/console/{}", "a".repeat(257))),
            None
        );
        assert!(vm_from_path(&format!("/ws/console/{}", "a".repeat(256))).is_some());
        assert!(is_console_path("/ws/console/x") && !is_console_path("/ws/consolex"));
    }
}
