//! What every worker shares and does whatever its IO backend: the drain
//! flag and heartbeats ([`WorkerControl`]), the accept backoff, messages
//! from the control plane turned into socket actions, hand-overs, the
//! stats report. Starting the threads is `crate::plane`'s job; this module
//! never depends on an IO backend.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cause::Cause;
use crate::dataplane::router::Router;
use crate::dataplane::session::WorkerCtx;
use crate::mailbox::{ticket_state, Admission, FromWorker, ToWorker, WorkerStats};

/// The little state workers share: the drain flag, and each worker's
/// heartbeat (its last loop turn, and whether it still runs), which the
/// control plane reads for `/readyz`, `/metrics` and the watchdog.
#[derive(Debug)]
pub struct WorkerControl {
    draining: AtomicBool,
    /// A worker ended on its own (error or panic): the process must stop
    /// and exit non-zero.
    failed: AtomicBool,
    started: Instant,
    beats: Box<[WorkerBeat]>,
    /// The drain's grace period when set (an upgrade hand-off drains for
    /// `service.upgrade_drain_deadline_ms`); [`NO_GRACE_OVERRIDE`] = the
    /// configured `drain_grace_ms`. Read at every turn, so it can change
    /// during a drain.
    grace_override_ms: AtomicU64,
    /// Workers that stopped accepting on the shared listener since the
    /// drain began.
    stopped_accepting: AtomicUsize,
}

/// [`WorkerControl`]'s grace override when there is none.
const NO_GRACE_OVERRIDE: u64 = u64::MAX;

#[derive(Debug)]
struct WorkerBeat {
    /// Milliseconds since `started` at the worker's last loop turn.
    last_turn_ms: AtomicU64,
    alive: AtomicBool,
}

/// One worker as the control plane sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerHealth {
    pub worker: usize,
    pub alive: bool,
    /// Time since the worker's last loop turn.
    pub last_turn_age_ms: u64,
}

impl WorkerControl {
    pub fn new(workers: usize) -> Self {
        Self {
            draining: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            started: Instant::now(),
            beats: (0..workers)
                .map(|_| WorkerBeat {
                    last_turn_ms: AtomicU64::new(0),
                    alive: AtomicBool::new(true),
                })
                .collect(),
            grace_override_ms: AtomicU64::new(NO_GRACE_OVERRIDE),
            stopped_accepting: AtomicUsize::new(0),
        }
    }

    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Drain with this grace period instead of the configured one (an
    /// upgrade hand-off: live sessions stay for up to `grace_ms`). Calling
    /// it again during the drain moves the deadline.
    pub fn start_drain_with_grace(&self, grace_ms: u64) {
        self.grace_override_ms
            .store(grace_ms.min(NO_GRACE_OVERRIDE - 1), Ordering::Release);
        self.start_drain();
    }

    /// The grace period in force: the override, or `configured_ms`.
    pub fn drain_grace_ms(&self, configured_ms: u64) -> u64 {
        match self.grace_override_ms.load(Ordering::Acquire) {
            NO_GRACE_OVERRIDE => configured_ms,
            ms => ms,
        }
    }

    /// Worker `worker` no longer accepts on the shared listener (once per
    /// worker, after its listener is gone).
    pub fn stopped_accepting(&self, worker: usize) {
        let _ = worker;
        self.stopped_accepting.fetch_add(1, Ordering::AcqRel);
    }

    /// Every worker stopped accepting (or died).
    pub fn none_accepting(&self) -> bool {
        let dead = self
            .beats
            .iter()
            .filter(|b| !b.alive.load(Ordering::Acquire))
            .count();
        self.stopped_accepting.load(Ordering::Acquire) + dead >= self.beats.len()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// A worker's loop turned (once per turn: one relaxed store).
    pub fn beat(&self, worker: usize, now: Instant) {
        if let Some(b) = self.beats.get(worker) {
            let ms = now.saturating_duration_since(self.started).as_millis() as u64;
            b.last_turn_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// Worker `worker` stopped running. Unless the data plane was draining
    /// (a normal exit), that is a failure: every other worker drains and
    /// the process exits non-zero.
    pub fn worker_exited(&self, worker: usize, failed: bool) {
        if let Some(b) = self.beats.get(worker) {
            b.alive.store(false, Ordering::Release);
        }
        if failed {
            self.failed.store(true, Ordering::Release);
            self.start_drain();
        }
    }

    /// A worker ended on its own.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub fn health(&self, now: Instant) -> Vec<WorkerHealth> {
        let now_ms = now.saturating_duration_since(self.started).as_millis() as u64;
        self.beats
            .iter()
            .enumerate()
            .map(|(worker, b)| WorkerHealth {
                worker,
                alive: b.alive.load(Ordering::Acquire),
                last_turn_age_ms: now_ms.saturating_sub(b.last_turn_ms.load(Ordering::Relaxed)),
            })
            .collect()
    }

    /// Every worker runs and turned its loop within `stall_ms`.
    pub fn all_healthy(&self, stall_ms: u64, now: Instant) -> bool {
        self.health(now)
            .iter()
            .all(|h| h.alive && h.last_turn_age_ms <= stall_ms)
    }
}

/// What a worker does when `accept` fails (EMFILE, ENFILE, ENOBUFS…):
/// stop accepting for a while, doubling the pause while it keeps failing,
/// instead of retrying at once (a busy loop that burns a core and floods
/// the log while the process is out of descriptors). Connections wait in
/// the listen backlog meanwhile and are taken once accepting works again.
#[derive(Debug)]
pub struct AcceptBackoff {
    until: Option<Instant>,
    delay: Duration,
}

/// First pause after a failed accept.
pub const ACCEPT_BACKOFF_MIN_MS: u64 = 20;
/// Longest pause between accept attempts while they keep failing.
pub const ACCEPT_BACKOFF_MAX_MS: u64 = 1_000;

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self {
            until: None,
            delay: Duration::from_millis(ACCEPT_BACKOFF_MIN_MS),
        }
    }
}

impl AcceptBackoff {
    /// An accept failed: pause. Counted every time, logged when a pause
    /// starts after success (not on every retry).
    pub fn failed(&mut self, ctx: &mut WorkerCtx, error: &std::io::Error, now: Instant) {
        ctx.metrics.count(Cause::AcceptFailed);
        if self.delay == Duration::from_millis(ACCEPT_BACKOFF_MIN_MS) {
            tracing::warn!(worker = ctx.worker_id, error = %error, "accept failed; pausing accepts");
        }
        self.until = Some(now + self.delay);
        self.delay = (self.delay * 2).min(Duration::from_millis(ACCEPT_BACKOFF_MAX_MS));
    }

    /// An accept worked: back to normal.
    pub fn succeeded(&mut self) {
        self.until = None;
        self.delay = Duration::from_millis(ACCEPT_BACKOFF_MIN_MS);
    }

    /// Accepting is paused.
    pub fn paused(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// A pause just ended: time to try again (once).
    pub fn retry_due(&mut self, now: Instant) -> bool {
        match self.until {
            Some(u) if now >= u => {
                self.until = None;
                true
            }
            _ => false,
        }
    }
}

/// Drain bookkeeping common to both backends.
#[derive(Debug, Default)]
pub struct DrainState {
    /// When the listener was closed and live sessions got their grace.
    pub began: Option<Instant>,
    /// Sessions were told to close.
    pub closed_sessions: bool,
    /// Reported to [`WorkerControl::stopped_accepting`].
    pub reported_stopped: bool,
}

impl DrainState {
    /// Returns (listener should close now, sessions should be closed now).
    /// `grace_ms` is read at every call, so a grace changed during the
    /// drain ([`WorkerControl::start_drain_with_grace`]) applies.
    pub fn poll(&mut self, ctl: &WorkerControl, grace_ms: u64, now: Instant) -> (bool, bool) {
        if self.began.is_none() && ctl.is_draining() {
            self.began = Some(now);
            self.closed_sessions = grace_ms == 0;
            return (true, self.closed_sessions);
        }
        match self.began {
            Some(b) if now >= b + Duration::from_millis(grace_ms) && !self.closed_sessions => {
                self.closed_sessions = true;
                (false, true)
            }
            _ => (false, false),
        }
    }

    pub fn active(&self) -> bool {
        self.began.is_some()
    }
}

/// Fault injection for the fault tests: with the `failpoints` feature,
/// `worker-panic` / `worker-error` configured as `return(N)` make worker N
/// panic / fail, and `worker-stall` (`sleep(ms)`) stalls every worker's
/// turn. Without the feature this is nothing at all.
pub fn inject_faults(worker: usize) -> std::io::Result<()> {
    #[cfg(feature = "failpoints")]
    {
        let hit = |name: &str| {
            fail::eval(name, |arg| arg)
                .flatten()
                .is_some_and(|w| w.trim() == worker.to_string())
        };
        if hit("worker-panic") {
            panic!("failpoint worker-panic");
        }
        if hit("worker-error") {
            return Err(std::io::Error::other("failpoint worker-error"));
        }
        fail::fail_point!("worker-stall");
    }
    let _ = worker;
    Ok(())
}

/// What the IO layer must do after a control-plane message.
pub enum Inbound {
    /// Start accepting on a dedicated listener for this admission.
    Listener(Arc<Admission>, TcpListener),
    /// Close live sessions and listeners of this session id.
    Revoke(u64),
    /// Serve a connection another worker accepted.
    Adopt(std::net::TcpStream, SocketAddr),
    /// The answer to a parked console request.
    ConsoleAnswer(Box<crate::mailbox::ConsoleAnswer>),
}

/// Apply a control-plane message to the worker's state; returns what the
/// IO layer has to do with sockets.
pub fn take_message(ctx: &mut WorkerCtx, msg: ToWorker) -> Option<Inbound> {
    match msg {
        ToWorker::Admit(a) => {
            if let Router::Appliance(t) = &mut ctx.router {
                t.insert(a);
            }
            None
        }
        ToWorker::AdmitDedicated(a, l) => Some(Inbound::Listener(a, l)),
        // The admission's shared state is revoked already (the control
        // plane does that first); its entry stays as a tombstone so a late
        // connect gets 403, and the live connection is closed now.
        ToWorker::Revoke { id } => Some(Inbound::Revoke(id)),
        ToWorker::Adopt { stream, peer } => {
            if let Some(b) = &ctx.balance {
                b.adopted();
            }
            ctx.metrics.adopted += 1;
            Some(Inbound::Adopt(stream, peer))
        }
        ToWorker::ConsoleAnswer(answer) => Some(Inbound::ConsoleAnswer(answer)),
    }
}

/// A connection this worker's listener just accepted: hand it to a
/// less-loaded worker, or give it back to be served here. `live` is the
/// number of sessions this worker holds.
pub fn place_accepted(
    ctx: &mut WorkerCtx,
    live: usize,
    stream: std::net::TcpStream,
    peer: SocketAddr,
) -> Option<std::net::TcpStream> {
    let Some(b) = &ctx.balance else {
        return Some(stream);
    };
    match b.offload(live, stream, peer) {
        Ok(to) => {
            ctx.metrics.handed_over += 1;
            tracing::debug!(worker = ctx.worker_id, to, %peer, "connection handed over");
            None
        }
        Err(stream) => Some(stream),
    }
}

/// Whether a dedicated listener should close now: its admission was revoked,
/// expired unused, or was claimed and its session is no longer live here.
pub fn dedicated_listener_done(a: &Admission, session_live: bool, now: Instant) -> bool {
    match a.state() {
        ticket_state::REVOKED => true,
        ticket_state::PENDING => now >= a.expires_at,
        _ => !session_live,
    }
}

/// A dedicated listener was dropped: log it and tell the control plane
/// the port may be released.
pub fn report_listener_closed(ctx: &mut WorkerCtx, a: &Admission, port: u16) {
    tracing::debug!(
        worker = ctx.worker_id,
        port,
        session = a.id,
        "dedicated listener closed"
    );
    ctx.report(FromWorker::ListenerClosed { id: a.id, port });
}

/// Periodic worker report (appliance mode).
pub fn stats_report(ctx: &WorkerCtx, live_sessions: usize) -> FromWorker {
    let m = &ctx.metrics;
    FromWorker::Stats(Box::new(WorkerStats {
        worker: ctx.worker_id,
        live_sessions,
        accepted: m.accepted,
        handed_over: m.handed_over,
        adopted: m.adopted,
        handshakes_ok: m.handshakes_ok,
        vmware_translated: m.vmware_messages_translated,
        vmware_dropped: m.vmware_messages_dropped,
        sessions_closed: m.sessions_closed,
        bytes_browser_to_backend: m.bytes_browser_to_backend,
        bytes_backend_to_browser: m.bytes_backend_to_browser,
        errors: m.errors().to_vec(),
        pool_outstanding: ctx.pool.outstanding,
        pool_free: ctx.pool.free_len(),
        relay_down_us: m.relay_down_us.clone(),
        relay_up_us: m.relay_up_us.clone(),
    }))
}
