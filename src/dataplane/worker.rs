//! Starting, running and stopping the workers.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::cause::Cause;
use crate::config::{ProxyConfig, TargetConfig};
use crate::dataplane::balance::{Balancer, WorkerLoads};
use crate::dataplane::router::{AdmissionTable, Router};
use crate::dataplane::session::{HandshakeGauge, WorkerCtx};
use crate::dataplane::tokens::{self, SharedTokens, TokenFile};
use crate::dataplane::web::WebRoot;
use crate::io::{self, IoBackend};
use crate::mailbox::{
    self, ticket_state, Admission, FromWorker, Inbox, ToWorker, WorkerInbox, WorkerStats,
};
use crate::metrics::WorkerMetrics;

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
}

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
        }
    }

    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Release);
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
    fn worker_exited(&self, worker: usize, failed: bool) {
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
    pub deadline: Option<Instant>,
    /// Sessions were told to close.
    pub closed_sessions: bool,
}

impl DrainState {
    /// Returns (listener should close now, sessions should be closed now).
    pub fn poll(&mut self, ctl: &WorkerControl, grace_ms: u64, now: Instant) -> (bool, bool) {
        if self.deadline.is_none() && ctl.is_draining() {
            self.deadline = Some(now + Duration::from_millis(grace_ms));
            return (true, false);
        }
        match self.deadline {
            Some(d) if now >= d && !self.closed_sessions => {
                self.closed_sessions = true;
                (false, true)
            }
            _ => (false, false),
        }
    }

    pub fn active(&self) -> bool {
        self.deadline.is_some()
    }
}

/// The data plane's side of the control-plane wiring.
pub struct ApplianceLink {
    /// The control plane's queue to each worker, in worker order.
    pub inboxes: Vec<Inbox<ToWorker>>,
    pub events: mailbox::Sender<FromWorker>,
}

/// A running data plane.
pub struct DataPlane {
    pub addr: SocketAddr,
    pub backend: IoBackend,
    pub workers: usize,
    control: Arc<WorkerControl>,
    loads: Arc<WorkerLoads>,
    handles: Vec<std::thread::JoinHandle<anyhow::Result<WorkerMetrics>>>,
}

impl DataPlane {
    /// Bind the listeners, build each worker's context and start the threads.
    pub fn start(cfg: ProxyConfig) -> anyhow::Result<Self> {
        Self::start_with(cfg, None)
    }

    /// Same, wired to a control plane (appliance mode): one inbox per worker
    /// and the shared report queue.
    pub fn start_with(cfg: ProxyConfig, link: Option<ApplianceLink>) -> anyhow::Result<Self> {
        cfg.validate()?;
        let backend = io::select(cfg.io).context("io backend")?;
        let n = cfg.worker_count();
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        // Every worker gets its own SO_REUSEPORT listener; the first decides
        // the port when port 0 was asked for.
        let first = io::sys::reuseport_listener(cfg.listen, 1024)
            .with_context(|| format!("listen on {}", cfg.listen))?;
        let addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..n {
            listeners.push(io::sys::reuseport_listener(addr, 1024)?);
        }
        let tls = match &cfg.tls {
            Some(t) => Some(crate::dataplane::tls::server_config(&t.cert, &t.key)?),
            None => None,
        };
        let web = match &cfg.web_dir {
            Some(d) => Some(Arc::new(
                WebRoot::new(d, cfg.limits.web_max_file_bytes)
                    .map_err(|e| anyhow::anyhow!("--web {}: {e}", d.display()))?,
            )),
            None => None,
        };
        let cfg = Arc::new(cfg);
        let control = Arc::new(WorkerControl::new(n));
        let mut handles = Vec::new();
        // A worker's inbox: the control plane's queue (appliance mode) and,
        // with more than one worker, a separate bounded queue for
        // hand-overs, behind one wake-up.
        let (control_inboxes, events) = match link {
            Some(l) => {
                if l.inboxes.len() != n {
                    anyhow::bail!("{} mailboxes for {n} workers", l.inboxes.len());
                }
                (l.inboxes.into_iter().map(Some).collect(), Some(l.events))
            }
            None => ((0..n).map(|_| None).collect::<Vec<_>>(), None),
        };
        let handoff_capacity = (n > 1).then_some(cfg.limits.handoff_queue_connections);
        let mut inboxes = Vec::with_capacity(n);
        let mut senders = Vec::with_capacity(n);
        for control in control_inboxes {
            match WorkerInbox::new(control, handoff_capacity).context("worker mailbox")? {
                Some((inbox, handoff)) => {
                    inboxes.push(Some(inbox));
                    senders.extend(handoff);
                }
                None => inboxes.push(None),
            }
        }
        let loads = Arc::new(WorkerLoads::new(n));
        let handshakes = HandshakeGauge::new(cfg.limits.max_handshaking_connections);
        let tokens = token_table(&cfg, &control)?;
        for (i, listener) in listeners.into_iter().enumerate() {
            let router = make_router(&cfg, &tokens);
            let mut ctx = WorkerCtx::new(cfg.clone(), i, router, web.clone(), tls.clone());
            ctx.events = events.clone();
            ctx.handshakes = handshakes.clone();
            if n > 1 {
                ctx.balance = Some(Balancer::new(
                    i,
                    loads.clone(),
                    senders.clone(),
                    cfg.limits.balance_slack_sessions,
                ));
            }
            let inbox = inboxes[i].take();
            let control = control.clone();
            let pin = cfg.pin_workers && n <= cores;
            let h = std::thread::Builder::new()
                .name(format!("cg-worker-{i}"))
                .spawn(move || run_worker(ctx, listener, inbox, control, backend, pin, i % cores))
                .context("spawn worker")?;
            handles.push(h);
        }
        Ok(Self {
            addr,
            backend,
            workers: n,
            control,
            loads,
            handles,
        })
    }

    pub fn control(&self) -> Arc<WorkerControl> {
        self.control.clone()
    }

    /// Sessions per worker, for placing dedicated-port sessions.
    pub fn loads(&self) -> Arc<WorkerLoads> {
        self.loads.clone()
    }

    /// Wait for every worker to exit; merged counters.
    pub fn join(self) -> anyhow::Result<WorkerMetrics> {
        let mut total = WorkerMetrics::default();
        let mut first_err = None;
        for h in self.handles {
            match h.join() {
                Ok(Ok(m)) => total.merge(&m),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "worker failed");
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(anyhow::anyhow!("a worker panicked"));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(total),
        }
    }
}

/// The token table of proxy mode, loaded (and its names resolved) once for
/// all workers by the loader thread; None for other targets.
fn token_table(
    cfg: &ProxyConfig,
    control: &Arc<WorkerControl>,
) -> anyhow::Result<Option<SharedTokens>> {
    let TargetConfig::TokenFile { source } = &cfg.target else {
        return Ok(None);
    };
    let l = &cfg.limits;
    let f = TokenFile::load(
        source,
        l.token_reload_interval_ms,
        l.max_tokens,
        l.token_max_file_bytes,
    )
    .with_context(|| format!("token source {}", source.display()))?;
    let control = control.clone();
    let shared = tokens::spawn_loader(f, move || control.is_draining()).context("token loader")?;
    Ok(Some(shared))
}

fn make_router(cfg: &ProxyConfig, tokens: &Option<SharedTokens>) -> Router {
    match (&cfg.target, tokens) {
        (TargetConfig::TokenFile { .. }, Some(t)) => Router::Tokens(t.clone()),
        (TargetConfig::Appliance, _) => Router::Appliance(AdmissionTable::default()),
        (TargetConfig::Fixed(t), _) => Router::Fixed(t.clone()),
        // A token source always comes with its table (token_table).
        (TargetConfig::TokenFile { .. }, None) => Router::Appliance(AdmissionTable::default()),
    }
}

/// One worker thread, supervised: whatever ends it (an error out of its
/// loop, a panic) is logged, marks it dead, and — unless the data plane was
/// draining — drains the other workers so the process exits non-zero
/// rather than run on with a worker short (every shared-port session
/// creation would then fail). Why not restart it: its sessions, buffers and
/// listener die with it, and a restarted loop would inherit nothing sound.
fn run_worker(
    ctx: WorkerCtx,
    listener: TcpListener,
    inbox: Option<WorkerInbox>,
    control: Arc<WorkerControl>,
    backend: IoBackend,
    pin: bool,
    cpu: usize,
) -> anyhow::Result<WorkerMetrics> {
    let id = ctx.worker_id;
    if pin {
        if let Err(e) = io::sys::pin_to_cpu(cpu) {
            tracing::warn!(worker = id, cpu, error = %e, "could not pin worker");
        }
    }
    let ctl = control.clone();
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || match backend {
        IoBackend::Epoll => io::epoll::run(ctx, listener, inbox, ctl),
        IoBackend::Uring => io::uring::run(ctx, listener, inbox, ctl),
    }));
    let result = match ran {
        Ok(Ok(m)) if control.is_draining() => Ok(m),
        Ok(Ok(_)) => Err(anyhow::anyhow!("worker {id} stopped unexpectedly")),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context(format!("worker {id}"))),
        Err(panic) => Err(anyhow::anyhow!(
            "worker {id} panicked: {}",
            panic_message(panic.as_ref())
        )),
    };
    if let Err(e) = &result {
        tracing::error!(
            worker = id,
            error = format!("{e:#}"),
            "worker died; stopping the data plane"
        );
    }
    control.worker_exited(id, result.is_err());
    result
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
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
