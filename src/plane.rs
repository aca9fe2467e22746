//! Starting, running and stopping the data plane: the listeners, one
//! worker thread per core on the chosen IO backend, each supervised. This
//! is the one module that knows both the data plane's logic
//! (`dataplane`) and the IO backends (`io`): the backends depend on
//! `dataplane`, never the other way round.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use anyhow::Context as _;

use crate::config::{ProxyConfig, TargetConfig};
use crate::dataplane::balance::{Balancer, WorkerLoads};
use crate::dataplane::client_limits::{ClientGate, ClientLimits, ClientPolicy};
use crate::dataplane::router::{AdmissionTable, Router};
use crate::dataplane::session::{HandshakeGauge, WorkerCtx};
use crate::dataplane::tls::ReloadableCert;
use crate::dataplane::tokens::{self, SharedTokens, TokenFile};
use crate::dataplane::web::WebRoot;
use crate::dataplane::worker::WorkerControl;
use crate::io::{self, IoBackend};
use crate::mailbox::{self, FromWorker, Inbox, ToWorker, WorkerInbox};
use crate::metrics::WorkerMetrics;

/// The data plane's side of the control-plane wiring.
pub struct ApplianceLink {
    /// The control plane's queue to each worker, in worker order.
    pub inboxes: Vec<Inbox<ToWorker>>,
    pub events: mailbox::Sender<FromWorker>,
    /// Per-client-IP limits and trusted proxies of the console port.
    pub clients: ClientPolicy,
}

/// A running data plane.
pub struct DataPlane {
    pub addr: SocketAddr,
    pub backend: IoBackend,
    pub workers: usize,
    control: Arc<WorkerControl>,
    loads: Arc<WorkerLoads>,
    handles: Vec<std::thread::JoinHandle<anyhow::Result<WorkerMetrics>>>,
    /// The console certificate, replaceable on reload (with TLS).
    tls_cert: Option<Arc<ReloadableCert>>,
    /// A duplicate of each worker's listener (same sockets), kept for an
    /// upgrade hand-off: the workers close theirs when they drain.
    listener_dups: Vec<TcpListener>,
    handshakes: Arc<HandshakeGauge>,
}

impl DataPlane {
    /// Bind the listeners, build each worker's context and start the threads.
    pub fn start(cfg: ProxyConfig) -> anyhow::Result<Self> {
        Self::start_with(cfg, None)
    }

    /// Same, wired to a control plane (appliance mode): one inbox per worker
    /// and the shared report queue.
    pub fn start_with(cfg: ProxyConfig, link: Option<ApplianceLink>) -> anyhow::Result<Self> {
        let mut plane = Self::start_inherited(cfg, link, Vec::new())?;
        // No hand-off here: kept, the duplicates would hold the port open
        // (connects queued, never refused) after SIGTERM closed the
        // workers' listeners.
        drop(plane.take_listener_dups());
        Ok(plane)
    }

    /// Same, on listeners a previous process handed over (an upgrade): at
    /// most one per worker, all bound to the same address (one SO_REUSEPORT
    /// group); workers beyond them get new listeners in that group.
    pub fn start_inherited(
        cfg: ProxyConfig,
        link: Option<ApplianceLink>,
        inherited: Vec<TcpListener>,
    ) -> anyhow::Result<Self> {
        cfg.validate()?;
        let backend = io::select(cfg.io).context("io backend")?;
        let n = cfg.worker_count();
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        if inherited.len() > n {
            anyhow::bail!("{} inherited listeners for {n} workers", inherited.len());
        }
        // Every worker gets its own SO_REUSEPORT listener; the first decides
        // the port when port 0 was asked for.
        let mut listeners = inherited;
        if listeners.is_empty() {
            listeners.push(
                io::sys::reuseport_listener(cfg.listen, 1024)
                    .with_context(|| format!("listen on {}", cfg.listen))?,
            );
        }
        let addr = listeners[0].local_addr()?;
        while listeners.len() < n {
            listeners.push(io::sys::reuseport_listener(addr, 1024)?);
        }
        let listener_dups = listeners
            .iter()
            .map(TcpListener::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .context("duplicate listeners")?;
        let (tls, tls_cert) = match &cfg.tls {
            Some(t) => {
                let (c, r) = crate::dataplane::tls::reloadable_server_config(&t.cert, &t.key)?;
                (Some(c), Some(r))
            }
            None => (None, None),
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
        let (control_inboxes, events, clients) = match link {
            Some(l) => {
                if l.inboxes.len() != n {
                    anyhow::bail!("{} mailboxes for {n} workers", l.inboxes.len());
                }
                let clients = ClientLimits::new(l.clients, std::time::Instant::now());
                (
                    l.inboxes.into_iter().map(Some).collect(),
                    Some(l.events),
                    Some(clients),
                )
            }
            None => ((0..n).map(|_| None).collect::<Vec<_>>(), None, None),
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
            ctx.clients = clients.clone().map(ClientGate::new);
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
            tls_cert,
            listener_dups,
            handshakes,
        })
    }

    /// The console certificate, to replace on reload (None without TLS).
    pub fn tls_cert(&self) -> Option<Arc<ReloadableCert>> {
        self.tls_cert.clone()
    }

    /// The duplicates of the workers' listeners, for an upgrade hand-off
    /// (taken once).
    pub fn take_listener_dups(&mut self) -> Vec<TcpListener> {
        std::mem::take(&mut self.listener_dups)
    }

    /// The count of connections in their handshake, across all workers.
    pub fn handshake_gauge(&self) -> Arc<HandshakeGauge> {
        self.handshakes.clone()
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
