//! Starting, running and stopping the workers.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::config::{ProxyConfig, TargetConfig};
use crate::dataplane::balance::{Balancer, WorkerLoads};
use crate::dataplane::router::{AdmissionTable, Router};
use crate::dataplane::session::WorkerCtx;
use crate::dataplane::tokens::TokenFile;
use crate::dataplane::web::WebRoot;
use crate::io::{self, IoBackend};
use crate::mailbox::{
    self, ticket_state, Admission, FromWorker, Inbox, ToWorker, WorkerInbox, WorkerStats,
};
use crate::metrics::WorkerMetrics;

/// The little state workers share: the drain flag. Read with a relaxed load
/// once per loop turn.
#[derive(Debug, Default)]
pub struct WorkerControl {
    draining: AtomicBool,
}

impl WorkerControl {
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
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
        let control = Arc::new(WorkerControl::default());
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
        for (i, listener) in listeners.into_iter().enumerate() {
            let router = make_router(&cfg)?;
            let mut ctx = WorkerCtx::new(cfg.clone(), i, router, web.clone(), tls.clone());
            ctx.events = events.clone();
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

fn make_router(cfg: &ProxyConfig) -> anyhow::Result<Router> {
    Ok(match &cfg.target {
        TargetConfig::Fixed(a) => Router::Fixed(*a),
        TargetConfig::Appliance => Router::Appliance(AdmissionTable::default()),
        TargetConfig::TokenFile { source } => {
            let l = &cfg.limits;
            let f = TokenFile::load(
                source,
                l.token_reload_interval_ms,
                l.max_tokens,
                l.token_max_file_bytes,
            )
            .with_context(|| format!("token source {}", source.display()))?;
            Router::Tokens(Box::new(f))
        }
    })
}

fn run_worker(
    ctx: WorkerCtx,
    listener: TcpListener,
    inbox: Option<WorkerInbox>,
    control: Arc<WorkerControl>,
    backend: IoBackend,
    pin: bool,
    cpu: usize,
) -> anyhow::Result<WorkerMetrics> {
    if pin {
        if let Err(e) = io::sys::pin_to_cpu(cpu) {
            tracing::warn!(worker = ctx.worker_id, cpu, error = %e, "could not pin worker");
        }
    }
    let id = ctx.worker_id;
    let m = match backend {
        IoBackend::Epoll => io::epoll::run(ctx, listener, inbox, control),
        IoBackend::Uring => io::uring::run(ctx, listener, inbox, control),
    }
    .with_context(|| format!("worker {id}"))?;
    Ok(m)
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
