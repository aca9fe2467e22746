//! A console by VM id for a connection parked on a worker
//! (`/ws/console/{vm}` on the console port): the control plane's half.
//!
//! Each [`ConsoleRequest`] runs as one task on the control runtime:
//! authenticate the token (a static `[[auth.tokens]]` token or a JWT,
//! exactly as the REST API does), then the same path as
//! `POST /api/v1/vms/{vm}/console` ([`super::vms::open_vm_console`]: the
//! role and `vms` claim, the viewer pool, the user's rate limits, the
//! VM's console on the CRITICAL lane, an ordinary single-use session),
//! delivered to the asking worker's mailbox instead of every worker's.
//! A refusal carries the status, code and message the REST call would
//! have given.
//!
//! Why the token is verified here and not on the worker: the check is a
//! few microseconds (docs/BENCHMARKS.md, "Console by VM id with JWT") next
//! to the rest of a console open, which must run here anyway (registry,
//! pool, rate limits, hypervisor); one place authenticates REST and
//! console requests alike, and the workers hold no key.
//!
//! Tasks are bounded by the workers' parks
//! (`max_parked_console_requests_per_worker` each); none blocks the
//! control thread. Must not depend on `crate::dataplane::session` or
//! `crate::io`.

use std::sync::Arc;
use std::time::Instant;

use super::api::{after_revoke, SessionOptions};
use super::api::{authorize_token, refuse_when_draining, session_user, ApiError, Delivery};
use super::vms::open_vm_console;
use super::ControlState;
use crate::auth::Need;
use crate::mailbox::{mono_ms, Admission, ConsoleAnswer, ConsoleRefusal, ConsoleRequest, ToWorker};

/// The message of a 401 for a console URL without a token.
const MISSING_TOKEN: &str =
    "missing token: open /ws/console/{vm}?token=<JWT or token>, or send Authorization: Bearer";

/// Serve one console request in the background.
pub fn spawn(state: &Arc<ControlState>, request: Box<ConsoleRequest>) {
    let state = state.clone();
    tokio::spawn(async move {
        let outcome = open(&state, &request).await;
        answer(&state, &request, outcome);
    });
}

/// Authenticate, then open the console as the REST route does.
async fn open(state: &ControlState, request: &ConsoleRequest) -> Result<Arc<Admission>, ApiError> {
    let principal = authorize_token(
        state,
        request.token.as_deref(),
        MISSING_TOKEN,
        Need::OpenConsole,
    )?;
    refuse_when_draining(state)?;
    let options = SessionOptions {
        user: session_user(&principal, request.user.clone())?,
        ..SessionOptions::default()
    };
    let (_, admission, vm) =
        open_vm_console(state, &principal, &request.vm, options, Delivery::Caller).await?;
    tracing::info!(
        session = %super::registry::id_hex(admission.id),
        user = ?admission.user,
        vm = %vm.id,
        worker = request.worker,
        waited_ms = mono_ms(Instant::now()).saturating_sub(request.parked_at_ms),
        "console by VM id admitted"
    );
    Ok(admission)
}

/// The REST error as the worker writes it.
fn refusal(e: ApiError) -> ConsoleRefusal {
    ConsoleRefusal {
        status: e.status.as_u16(),
        code: e.code,
        message: e.message,
        retry_after_s: e.retry_after_s,
    }
}

/// Send the outcome to the asking worker. A full mailbox leaves the
/// connection to its 504; an admission it could not take is revoked at
/// once (its place in the pool and its one-time credential freed).
fn answer(
    state: &ControlState,
    request: &ConsoleRequest,
    outcome: Result<Arc<Admission>, ApiError>,
) {
    let outcome = outcome.map_err(refusal);
    let message = ToWorker::ConsoleAnswer(Box::new(ConsoleAnswer {
        session: request.session,
        outcome,
    }));
    let Some(tx) = state.workers.get(request.worker) else {
        return;
    };
    let Err(ToWorker::ConsoleAnswer(undelivered)) = tx.send_or_return(message) else {
        return;
    };
    state.count_error("console_answer_undelivered");
    tracing::warn!(
        worker = request.worker,
        "a worker mailbox refused a console answer"
    );
    if let Ok(admission) = undelivered.outcome {
        let revoked = state
            .registry
            .lock()
            .map(|mut r| r.revoke(admission.id).is_some())
            .unwrap_or(false);
        if revoked {
            after_revoke(state, admission.id);
        }
    }
}
