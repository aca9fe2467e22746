//! The control plane: one thread running a current-thread tokio runtime
//! with the axum REST API, the session registry, the port pool, the TTL
//! sweeper and the reader of the workers' reports.
//!
//! It reaches the workers only through their bounded mailboxes
//! ([`crate::mailbox`]), never blocks on them (a full mailbox is a 503), and
//! nothing here runs on a worker thread: the data plane never touches tokio.

pub mod alert_sources;
pub mod api;
pub mod client_ip;
pub mod conn;
pub mod console_open;
pub mod events_ws;
pub mod limits;
pub mod metrics_text;
pub mod registry;
pub mod vms;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::collections::HashMap;

use crate::auth::{AuthError, Principal};
use crate::config::appliance::{ApplianceConfig, Role, TokenConfig};
use crate::dataplane::worker::WorkerControl;
use crate::hypervisor::fleet::{Fleet, VmRef};
use crate::mailbox::{self, FromWorker, Inbox, ToWorker, WorkerStats};
use crate::metrics::ErrorCounts;
use crate::ports::PortPool;

use registry::Registry;

/// Errors of the control plane itself (start-up, binding).
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("control runtime: {0}")]
    Runtime(std::io::Error),
}

/// Control-plane counters (errors by kind), next to the workers' snapshots.
#[derive(Debug, Default)]
pub struct ControlCounters {
    pub errors: ErrorCounts,
    pub sessions_created: u64,
    pub sessions_expired: u64,
    pub sessions_revoked: u64,
    pub reports_received: u64,
}

impl ControlCounters {
    pub fn error(&mut self, kind: &'static str) {
        self.errors.add(kind, 1);
    }
}

/// Everything the handlers share. The mutexes are only ever taken on the
/// control thread (axum needs `Send + Sync` state even on a current-thread
/// runtime), so they are uncontended.
pub struct ControlState {
    pub cfg: ApplianceConfig,
    pub workers: Vec<mailbox::Sender<ToWorker>>,
    pub registry: Mutex<Registry>,
    pub ports: Option<PortPool>,
    pub port_store: Option<crate::ports::PortStore>,
    pub worker_stats: Mutex<Vec<WorkerStats>>,
    pub counters: Mutex<ControlCounters>,
    pub demo_addr: Option<SocketAddr>,
    pub public_url: String,
    pub started: Instant,
    pub next_worker: AtomicUsize,
    /// Sessions per worker, published by the workers.
    pub loads: Arc<crate::dataplane::balance::WorkerLoads>,
    pub data_plane: Arc<WorkerControl>,
    pub io_backend: &'static str,
    /// Port allocations changed since the last save.
    pub ports_dirty: std::sync::atomic::AtomicBool,
    /// Revoke messages a full mailbox refused, as (worker, session id),
    /// retried by the sweeper. A revoked console closes on its worker's
    /// next tick anyway (the admission's shared state); the message only
    /// makes it immediate. At most [`MAX_PENDING_REVOKES`].
    pub pending_revokes: Mutex<Vec<(usize, u64)>>,
    /// The API tokens in force: `cfg.auth.tokens` at start, replaced
    /// whole by a reload (SIGHUP), read lock-free per request.
    pub api_tokens: arc_swap::ArcSwap<Vec<TokenConfig>>,
    /// The hypervisors, their queues and caches.
    pub fleet: Arc<Fleet>,
    /// Sessions whose target carries a one-time credential (a QEMU VNC
    /// password), by session id: expired once the data plane has used it,
    /// or when the session ends without using it. Bounded by the
    /// registry's `max_sessions` (an entry exists only for a live
    /// session, and is removed with it).
    pub one_time: Mutex<HashMap<u64, VmRef>>,
    /// `[auth.jwt]`'s verifier (key loaded at start, replaced whole by a
    /// reload); `None` when off. Read lock-free per request.
    pub jwt: arc_swap::ArcSwapOption<crate::auth::JwtVerifier>,
    /// `[rate_limits]`: console creation per user.
    pub user_rates: limits::UserRates,
    /// Client addresses (trusted proxies) and the per-IP REST limit.
    pub clients: client_ip::ClientIps,
    /// The live event bus behind `/ws/*`.
    pub events: crate::events::EventBus,
    /// The alert detectors (fed by `alert_sources`) and their counts.
    pub alerts: Mutex<crate::events::alerts::AlertCenter>,
}

/// Undelivered revoke messages kept for retry; beyond, the oldest are
/// dropped (the tick still closes those consoles).
pub const MAX_PENDING_REVOKES: usize = 65_536;

impl ControlState {
    /// Who a bearer token stands for: a static `[[auth.tokens]]` entry
    /// (a service), else, with `[auth.jwt]` on, a verified JWT (a user).
    pub fn principal_of(&self, token: &str) -> Result<Principal, AuthError> {
        if let Some(role) = self.role_of(token) {
            return Ok(Principal::service(role));
        }
        match self.jwt.load().as_deref() {
            Some(v) => v.verify(token),
            None => Err(AuthError::Unknown),
        }
    }

    /// The role a bearer token grants, if any (constant-time comparison).
    pub fn role_of(&self, token: &str) -> Option<Role> {
        use subtle::ConstantTimeEq;
        let mut found = None;
        let tokens = self.api_tokens.load();
        for t in tokens.iter() {
            // Compare every configured token so the time does not say which
            // one (or whether any) matched early.
            let eq = t.token.len() == token.len()
                && bool::from(t.token.as_bytes().ct_eq(token.as_bytes()));
            if eq && found.is_none() {
                found = Some(t.role);
            }
        }
        found
    }

    /// Tell every worker to close session `id` now (its admission is
    /// revoked already); a worker whose mailbox is full gets the message
    /// again from the sweeper. Returns how many workers it did not reach.
    pub fn send_revoke(&self, id: u64) -> usize {
        let mut missed = 0;
        for (w, tx) in self.workers.iter().enumerate() {
            if tx.send(ToWorker::Revoke { id }).is_err() {
                missed += 1;
                self.count_error("revoke_undelivered");
                if let Ok(mut p) = self.pending_revokes.lock() {
                    if p.len() >= MAX_PENDING_REVOKES {
                        p.remove(0);
                    }
                    p.push((w, id));
                }
            }
        }
        missed
    }

    /// Retry the revoke messages full mailboxes refused.
    fn retry_revokes(&self) {
        let pending = match self.pending_revokes.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return,
        };
        let mut still = Vec::new();
        for (w, id) in pending {
            if self.workers[w].send(ToWorker::Revoke { id }).is_err() {
                still.push((w, id));
            }
        }
        if let Ok(mut p) = self.pending_revokes.lock() {
            still.append(&mut p);
            *p = still;
        }
    }

    /// Session `session_id` (hex, as the API gives it) holds a one-time
    /// credential of `vm`.
    pub fn remember_one_time(&self, session_id: &str, vm: VmRef) {
        if let Ok(id) = u64::from_str_radix(session_id, 16) {
            if let Ok(mut m) = self.one_time.lock() {
                m.insert(id, vm);
            }
        }
    }

    /// Session `id` used its one-time credential, or ended (closed,
    /// expired, revoked) without: expire the credential now.
    pub fn settle_one_time(&self, id: u64) {
        let vm = self.one_time.lock().ok().and_then(|mut m| m.remove(&id));
        if let Some(vm) = vm {
            self.spawn_console_used(vm);
        }
    }

    /// Expire a one-time console credential, in the background (on the
    /// control runtime; never on a worker).
    pub fn spawn_console_used(&self, vm: VmRef) {
        let fleet = self.fleet.clone();
        tokio::spawn(async move {
            if let Err(e) = fleet.console_used(&vm).await {
                tracing::warn!(vm = %vm.id, error = %e, "could not expire a one-time console credential");
            }
        });
    }

    pub fn count_error(&self, kind: &'static str) {
        if let Ok(mut c) = self.counters.lock() {
            c.error(kind);
        }
    }

    /// The worker that owns a dedicated listener: the least-loaded one,
    /// round-robin among equals.
    pub fn pick_worker(&self) -> usize {
        let n = self.workers.len().max(1);
        let start = self.next_worker.fetch_add(1, Ordering::Relaxed) % n;
        let w = self.loads.least_loaded(start);
        if w < n {
            w
        } else {
            start
        }
    }
}

/// Serve the control plane until `shutdown` fires. Runs on the calling
/// thread (the control thread).
/// The control plane's runtime: one thread, built before the control
/// state so the hypervisor backends can start their tasks on it.
pub fn runtime() -> Result<tokio::runtime::Runtime, ControlError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ControlError::Runtime)
}

pub fn serve(
    rt: tokio::runtime::Runtime,
    state: Arc<ControlState>,
    listener: std::net::TcpListener,
    events: Inbox<FromWorker>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ControlError> {
    rt.block_on(async move {
        let addr = listener.local_addr().map_err(ControlError::Runtime)?;
        listener
            .set_nonblocking(true)
            .map_err(ControlError::Runtime)?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|source| ControlError::Bind { addr, source })?;
        tracing::info!(%addr, "control plane listening");
        let app = api::router(state.clone());
        // Connections share their socket with the event fan-out, and get
        // their socket options (conn.rs).
        let listener = conn::ControlListener::new(listener);
        let reports = forward_reports(events).map_err(ControlError::Runtime)?;
        tokio::spawn(pump_reports(state.clone(), reports));
        tokio::spawn(sweeper(state.clone()));
        tokio::spawn(port_saver(state.clone()));
        tokio::spawn(events_ws::background(state.clone()));
        tokio::spawn(crate::hypervisor::metrics::run(
            state.fleet.clone(),
            state.events.clone(),
            crate::hypervisor::metrics::MetricsSettings {
                interval_ms: state.cfg.events.metrics_interval_ms,
                max_vms_per_round: state.cfg.events.vm_metrics_max_vms_per_round,
            },
        ));
        tokio::spawn(alert_sources::run(state.clone()));
        let mut sd = shutdown.clone();
        // With the peer address (the per-IP limits and logs need it) and
        // the socket (the event endpoints write to it directly).
        let app = app.into_make_service_with_connect_info::<conn::ControlPeer>();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = sd.wait_for(|v| *v).await;
            })
            .await
            .map_err(ControlError::Runtime);
        // Log out of the hypervisors (pooled vSphere sessions).
        state.fleet.shutdown().await;
        served
    })
}

/// Most reports applied in one turn before the pump yields to the other
/// tasks (the API, the event subscribers), so a burst of reports cannot
/// starve them.
const MAX_REPORTS_PER_TURN: usize = 256;

/// Reports handed from the reader thread to the control runtime and not
/// yet applied, at most. Behind it the workers' queue holds at most
/// `[control] events_capacity`; when both are full a worker counts the
/// report it could not queue, as before.
const REPORT_FORWARD_QUEUE: usize = 256;

/// A thread that blocks on the workers' report queue and forwards each
/// report to the control runtime as it arrives.
///
/// Why a thread and not a poll or the queue's eventfd: a console by VM id
/// (`/ws/console/{vm}`) waits for the control plane to read its request,
/// and the former 10 ms poll cost it ~10 ms at p50 (docs/BENCHMARKS.md,
/// "Console by VM id"); awaiting the eventfd in tokio needs `unsafe`
/// registration (`AsyncFd::register`), which the house rules keep inside
/// `io/`, while a blocking receive is safe code. The thread ends when
/// every worker's sender is gone or the control plane stopped reading.
fn forward_reports(mut inbox: Inbox<FromWorker>) -> std::io::Result<ReportReceiver> {
    let (tx, rx) = tokio::sync::mpsc::channel(REPORT_FORWARD_QUEUE);
    std::thread::Builder::new()
        .name("cg-reports".into())
        .spawn(move || {
            while let Some(report) = inbox.recv_blocking() {
                if tx.blocking_send(report).is_err() {
                    return;
                }
            }
        })?;
    Ok(rx)
}

type ReportReceiver = tokio::sync::mpsc::Receiver<FromWorker>;

/// Apply the workers' reports as the reader thread forwards them.
async fn pump_reports(state: Arc<ControlState>, mut reports: ReportReceiver) {
    let mut batch = Vec::with_capacity(MAX_REPORTS_PER_TURN);
    loop {
        let received = reports.recv_many(&mut batch, MAX_REPORTS_PER_TURN).await;
        if received == 0 {
            return;
        }
        for report in batch.drain(..) {
            apply_report(&state, report);
        }
        if received == MAX_REPORTS_PER_TURN {
            tokio::task::yield_now().await;
        }
    }
}

fn apply_report(state: &Arc<ControlState>, msg: FromWorker) {
    if let Ok(mut c) = state.counters.lock() {
        c.reports_received += 1;
    }
    match msg {
        FromWorker::Stats(s) => {
            if let Ok(mut all) = state.worker_stats.lock() {
                let w = s.worker;
                if all.len() <= w {
                    all.resize_with(w + 1, WorkerStats::default);
                }
                all[w] = *s;
            }
        }
        FromWorker::BackendAuthenticated { id } => state.settle_one_time(id),
        FromWorker::ConsoleRequest(request) => console_open::spawn(state, request),
        FromWorker::ListenerClosed { id, port } => {
            if let Some(p) = &state.ports {
                p.release(port, id);
            }
            mark_ports_dirty(state);
            if let Ok(mut r) = state.registry.lock() {
                r.listener_closed(id);
            }
        }
        other => {
            let id = match &other {
                FromWorker::Opened { id, .. } | FromWorker::Closed { id, .. } => Some(*id),
                _ => None,
            };
            let closed = match &other {
                FromWorker::Closed { id, .. } => Some(*id),
                _ => None,
            };
            if let Ok(mut r) = state.registry.lock() {
                let now = Instant::now();
                r.apply(other, now);
                if let Some(record) = id.and_then(|id| r.get(id, now)) {
                    log_session_event(&record);
                }
            }
            if let Some(id) = closed {
                state.settle_one_time(id);
            }
        }
    }
}

/// One line per session opened and ended, with the session id, user, VM
/// and close reason as fields (journald keeps them as `CG_SESSION`,
/// `CG_USER`, `CG_VM`, `CG_REASON`).
fn log_session_event(r: &registry::Record) {
    let vm = r.vm_id.as_deref().unwrap_or("");
    match r.state {
        registry::State::Open => tracing::info!(
            session = %r.session_id,
            user = %r.user,
            vm,
            peer = r.peer.as_deref().unwrap_or(""),
            "session opened"
        ),
        registry::State::Pending => {}
        _ => tracing::info!(
            session = %r.session_id,
            user = %r.user,
            vm,
            code = r.close_code.unwrap_or(0),
            reason = r.close_reason.as_deref().unwrap_or(""),
            bytes_up = r.bytes_browser_to_backend,
            bytes_down = r.bytes_backend_to_browser,
            "session ended"
        ),
    }
}

/// Note that the port allocations changed; [`port_saver`] writes them.
pub fn mark_ports_dirty(state: &ControlState) {
    state.ports_dirty.store(true, Ordering::Release);
}

/// How often changed port allocations are written. Why coalesced and off
/// the control thread: each save is write + fsync + rename + fsync of the
/// directory; done per allocation and release on this thread it cost the
/// API ~1 ms at p50 and ~33 ms at p99 (bench session-start, dedicated).
/// A crash loses at most this much of the record, which is harmless: the
/// crashed process's listeners are gone with it, so restore reclaims them.
const PORT_SAVE_INTERVAL: Duration = Duration::from_millis(200);

async fn port_saver(state: Arc<ControlState>) {
    let mut tick = tokio::time::interval(PORT_SAVE_INTERVAL);
    loop {
        tick.tick().await;
        if state.ports_dirty.swap(false, Ordering::AcqRel) {
            let s = state.clone();
            if tokio::task::spawn_blocking(move || persist_ports(&s))
                .await
                .is_err()
            {
                state.count_error("ports_persist_failed");
            }
        }
    }
}

/// Write the port allocations now (atomic temp + rename inside the store).
pub fn persist_ports(state: &ControlState) {
    if let (Some(pool), Some(store)) = (&state.ports, &state.port_store) {
        if let Err(e) = store.save(&pool.allocations()) {
            state.count_error("ports_persist_failed");
            tracing::warn!(error = %e, "could not persist port allocations");
        }
    }
}

/// Expire tickets not used within their TTL, prune old records, and run
/// the port cleanup pass.
async fn sweeper(state: Arc<ControlState>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let cleanup_every = Duration::from_millis(state.cfg.ports.cleanup_interval_ms.max(1000));
    let mut last_cleanup = Instant::now();
    loop {
        tick.tick().await;
        // Fault tests block the control thread here (`control-stall` =
        // sleep(ms)) to show the relays do not depend on it.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("control-stall");
        let now = Instant::now();
        state.retry_revokes();
        state.user_rates.retain_recent();
        state.clients.retain_recent();
        let expired = match state.registry.lock() {
            Ok(mut r) => {
                // Reconcile first: a claimed admission whose report is late
                // is open, not expired.
                r.reconcile();
                r.flush_overdue_reports(now);
                r.expire(now)
            }
            Err(_) => Vec::new(),
        };
        if !expired.is_empty() {
            if let Ok(mut c) = state.counters.lock() {
                c.sessions_expired += expired.len() as u64;
            }
            for id in expired {
                tracing::info!(session = %registry::id_hex(id), "ticket expired unused");
                state.settle_one_time(id);
                // Workers drop expired admissions (and dedicated listeners)
                // on their own tick; the revoke makes it immediate.
                state.send_revoke(id);
            }
        }
        if now.duration_since(last_cleanup) >= cleanup_every {
            last_cleanup = now;
            if let Some(pool) = &state.ports {
                let live = |owner: u64| {
                    state
                        .registry
                        .lock()
                        .map(|r| r.holds_port(owner))
                        .unwrap_or(true)
                };
                let report = crate::ports::cleanup(pool, live);
                if report.reclaimed > 0 {
                    tracing::info!(
                        reclaimed = report.reclaimed,
                        "stale port allocations reclaimed"
                    );
                    mark_ports_dirty(&state);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_are_forwarded_as_they_arrive_and_the_reader_ends_with_the_senders() {
        let (tx, inbox) = mailbox::channel::<FromWorker>(4).unwrap();
        let mut reports = forward_reports(inbox).unwrap();
        let limit = Duration::from_secs(5);
        for id in [7, 8] {
            tx.send(FromWorker::BackendAuthenticated { id }).unwrap();
            let got = tokio::time::timeout(limit, reports.recv()).await;
            assert!(
                matches!(got, Ok(Some(FromWorker::BackendAuthenticated { id: got_id })) if got_id == id),
                "report {id} not forwarded"
            );
        }
        drop(tx);
        let end = tokio::time::timeout(limit, reports.recv()).await;
        assert!(matches!(end, Ok(None)), "the reader did not end");
    }
}
