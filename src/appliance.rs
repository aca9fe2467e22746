//! `consolegate run`, `check-config` and `ports`: the appliance wiring at
//! the binary's edge (config → demo server → data plane → control thread →
//! signals). `anyhow` is allowed here.

use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use consolegate::config::appliance::{ApplianceConfig, LogFormat, Role, Source, TokenConfig};
use consolegate::config::appliance::{ConfigFileError, ServiceConfig};
use consolegate::config::secrets::CredentialMode;
use consolegate::config::{ProxyConfig, TargetConfig, TlsFiles};
use consolegate::control::{self, registry::Registry, ControlCounters, ControlState};
use consolegate::hypervisor::backend::StartContext;
use consolegate::hypervisor::demo::{DemoConfig as DemoServerConfig, DemoServer};
use consolegate::hypervisor::fleet::Fleet;
use consolegate::mailbox;
use consolegate::plane::{ApplianceLink, DataPlane};
use consolegate::ports::{self, PortPool, PortPoolConfig, PortRange, PortStore};
use consolegate::service::handoff::{Outcome, Predecessor, Successor};
use consolegate::service::notify::{self, Notifier, Watchdog};
use consolegate::service::{self, logging, reload};

/// The control plane's thread stack. Its futures (axum handlers awaiting
/// hypervisor calls through queue and cache) nest deeply; 8 MiB, as a
/// main thread gets, leaves room in debug builds too.
const CONTROL_THREAD_STACK_BYTES: usize = 8 * 1024 * 1024;

fn load(path: Option<&Path>) -> anyhow::Result<(ApplianceConfig, Source)> {
    let (mut cfg, source) = ApplianceConfig::load(path)?;
    cfg.apply_env(std::env::vars())?;
    cfg.validate()?;
    Ok((cfg, source))
}

/// Longest `run` waits for its own `/readyz` before telling the service
/// manager it is ready.
const READY_PROBE_DEADLINE_MS: u64 = 10_000;

/// The unit's `ExecReload=` pre-check: the whole load a reload does
/// (overrides, validation, token files, credentials when systemd provides
/// them, the admin-token rule, the certificate pair, the JWT key), so a bad config makes
/// `systemctl reload` fail visibly instead of being refused in the log only.
pub fn check_config(path: Option<&Path>) -> anyhow::Result<()> {
    let (cfg, source, secret_warnings) =
        reload::load_config(path, std::env::vars(), CredentialMode::SkipOutsideService)?;
    if let Some(tls) = &cfg.tls {
        consolegate::dataplane::tls::reloadable_server_config(&tls.cert, &tls.key)?;
    }
    consolegate::auth::JwtVerifier::from_config(&cfg.auth.jwt)?;
    println!("config OK ({source:?})");
    for w in cfg.warnings().into_iter().chain(secret_warnings) {
        println!("warning: {w}");
    }
    println!("{}", cfg.summary());
    Ok(())
}

fn pool_for(cfg: &ApplianceConfig) -> anyhow::Result<PortPool> {
    let (first, last) = cfg.port_range();
    let pc = PortPoolConfig {
        range: PortRange::new(first, last)?,
        bind_ip: cfg.dedicated_listen_ip(),
        max_bind_attempts: cfg.ports.max_bind_attempts as usize,
        external_retry_ms: cfg.ports.external_retry_ms,
        ..PortPoolConfig::default()
    };
    Ok(PortPool::new(pc)?)
}

pub fn ports_status(path: Option<&Path>) -> anyhow::Result<()> {
    let (mut cfg, _) = load(path)?;
    let dir = cfg.resolve_state_dir()?;
    let pool = pool_for(&cfg)?;
    let store = PortStore::new(&dir.path);
    let allocs = store.load()?;
    for a in &allocs {
        pool.restore_claim(a.port, a.owner, a.allocated_at_unix_ms);
    }
    let stats = pool.stats();
    println!("{}", serde_json::to_string_pretty(&stats)?);
    println!("state file: {}", store.path().display());
    Ok(())
}

pub fn ports_cleanup(path: Option<&Path>, interval_s: Option<u64>) -> anyhow::Result<()> {
    let (mut cfg, _) = load(path)?;
    let dir = cfg.resolve_state_dir()?;
    let store = PortStore::new(&dir.path);
    loop {
        // A fresh pool from the file: a persisted port nothing listens on
        // is stale (no process can own a session on it any more).
        let pool = pool_for(&cfg)?;
        let report = ports::restore_and_reclaim(&pool, &store, |_| false)?;
        println!("{}", serde_json::to_string(&report)?);
        match interval_s {
            None => return Ok(()),
            Some(s) => std::thread::sleep(Duration::from_secs(s.max(1))),
        }
    }
}

pub fn run(path: Option<&Path>, takeover: Option<&Path>, json_logs: bool) -> anyhow::Result<()> {
    let loaded = reload::load_config(path, std::env::vars(), CredentialMode::Required);
    // An upgrade's new process: connect to the running one first, so a
    // config it cannot use is refused over there (which then goes on).
    let mut successor = match takeover {
        Some(socket) => Some(connect_successor(socket, &loaded)?),
        None => None,
    };
    let (mut cfg, source, secret_warnings) = loaded?;
    let json = json_logs || cfg.log.format == LogFormat::Json;
    let log = logging::init(json, &cfg.log.level);
    if let Some(s) = successor.take() {
        successor = Some(check_inherited(s, &cfg)?);
    }
    let notifier = Notifier::from_env();
    tracing::info!(source = ?source, sink = ?log.sink, "configuration loaded");
    // Validation ran before logging existed; its doubts are logged now.
    for w in cfg.warnings().into_iter().chain(secret_warnings) {
        tracing::warn!("{w}");
    }
    if let Some(w) = service::fd_limit_warning(&cfg) {
        tracing::warn!("{w}");
    }
    // What a reload compares against: the config as loaded, before the
    // start-up fills anything in.
    let as_loaded = cfg.clone();
    let mut generated = Vec::new();
    if let Some(token) = cfg.ensure_admin_token() {
        // Only the built-in defaults (no config file) get here: make one
        // and say it once. With a file, load_config refused no admin.
        println!("admin token: {token}");
        generated.push(TokenConfig::new(token, Role::Admin));
    }
    if cfg.console.web_dir.is_none() && !matches!(source, Source::File(_)) {
        // Out of the box: serve Debian's noVNC on the console port when it
        // is installed, so the demo console opens in a browser.
        let novnc = std::path::PathBuf::from("/usr/share/novnc");
        if novnc.join("vnc.html").is_file() {
            tracing::info!(dir = %novnc.display(), "serving noVNC on the console port");
            cfg.console.web_dir = Some(novnc);
        }
    }
    let state_dir = cfg.resolve_state_dir()?;
    // The JWT key is read now, so a bad key file stops the start at once.
    let jwt = consolegate::auth::JwtVerifier::from_config(&cfg.auth.jwt)?;
    tracing::info!(dir = %state_dir.path.display(), origin = ?state_dir.origin, "state directory");

    // The built-in demo console, so the appliance works with no hypervisor.
    let demo = if cfg.demo.enabled {
        let d = DemoServer::start(
            "127.0.0.1:0".parse().expect("literal address"),
            DemoServerConfig {
                width: cfg.demo.width,
                height: cfg.demo.height,
                max_clients: cfg.demo.max_clients,
                frame_interval_ms: cfg.demo.frame_interval_ms,
                password: cfg.demo.password.clone(),
                name: "consolegate demo".into(),
            },
        )
        .context("demo server")?;
        tracing::info!(addr = %d.addr(), "demo console started");
        Some(d)
    } else {
        None
    };

    // Ports: restore persisted allocations, reclaim the stale ones.
    let pool = pool_for(&cfg)?;
    let store = PortStore::new(&state_dir.path);
    let stale = store.remove_stale_temp_files();
    if stale > 0 {
        tracing::info!(
            removed = stale,
            "temp files of an interrupted port-state save removed"
        );
    }
    // restore_and_reclaim logs its own report.
    match ports::restore_and_reclaim(&pool, &store, |_| false) {
        Ok(_) => {}
        Err(e @ ports::PortError::Corrupt { .. }) => match store.quarantine() {
            // Kept for the operator: the first save would overwrite it.
            Ok(kept) => {
                tracing::error!(error = %e, kept = %kept.display(), "port state file corrupt; kept aside, starting empty")
            }
            Err(q) => anyhow::bail!("{e}; and it cannot be moved aside ({q}): fix or remove it"),
        },
        Err(e) => tracing::warn!(error = %e, "port state not restored; starting empty"),
    }

    // Before the workers accept (see drain_signals); SIGHUP and SIGUSR2
    // too, so a reload or hand-off that comes early is held, not fatal.
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGUSR2,
    ])?;
    // An upgrade's new process gets the pending sessions before it starts
    // its planes (the running one stopped accepting: connections wait in
    // the shared listeners' queues meanwhile).
    let pending = match successor.as_mut() {
        Some(s) => s.prepared().context("upgrade hand-off: pending sessions")?,
        None => Vec::new(),
    };
    let (inherited_console, inherited_control) = match successor.as_mut() {
        Some(s) => (
            std::mem::take(&mut s.console),
            Some(s.control.try_clone().context("control listener")?),
        ),
        None => (Vec::new(), None),
    };

    // Mailboxes between the planes.
    let n = cfg.worker_count();
    let mut senders = Vec::with_capacity(n);
    let mut inboxes = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = mailbox::channel(cfg.control.mailbox_capacity)?;
        senders.push(tx);
        inboxes.push(rx);
    }
    let (events_tx, events_rx) = mailbox::channel(cfg.control.events_capacity)?;

    let proxy = ProxyConfig {
        listen: cfg.console.listen,
        target: TargetConfig::Appliance,
        tls: cfg.tls.as_ref().map(|t| TlsFiles {
            cert: t.cert.clone(),
            key: t.key.clone(),
            // With TLS on, plain ws only when asked for: a ticket must
            // not cross the network in clear by default.
            ssl_only: !t.allow_plain,
        }),
        web_dir: cfg.console.web_dir.clone(),
        origins: Vec::new(),
        workers: n,
        io: cfg.dataplane.io,
        pin_workers: cfg.dataplane.pin_workers,
        limits: cfg.console_limits(),
    };
    let mut dp = DataPlane::start_inherited(
        proxy,
        Some(ApplianceLink {
            inboxes,
            events: events_tx,
            clients: consolegate::dataplane::client_limits::ClientPolicy::from_config(
                &cfg.rate_limits,
                &cfg.network,
            ),
        }),
        inherited_console,
    )?;
    let public_url = cfg.public_url_with(dp.addr);
    // Bound here so the real address (port 0 in tests) can be printed.
    let control_listener = match inherited_control {
        Some(l) => l,
        None => std::net::TcpListener::bind(cfg.control.listen)
            .with_context(|| format!("control listen {}", cfg.control.listen))?,
    };
    let control_dup = control_listener.try_clone().context("control listener")?;
    let control_addr = control_listener.local_addr()?;
    // The hypervisors start on the control plane's runtime (their tasks
    // run once it serves).
    let runtime = control::runtime()?;
    let fleet = {
        let _entered = runtime.enter();
        let screendumps = state_dir.path.join("screendumps");
        Fleet::start(
            &cfg.effective_hypervisors(),
            cfg.fleet_settings(),
            &StartContext {
                demo_addr: demo.as_ref().map(|d| d.addr()),
                demo_password: cfg.demo.password.clone(),
                screendump_dir: &screendumps,
            },
        )?
    };
    for m in fleet.members() {
        tracing::info!(hypervisor = %m.id, kind = m.kind, "hypervisor configured");
    }
    let events = consolegate::events::EventBus::new(consolegate::events::bus::BusLimits {
        max_subscribers: cfg.events.max_subscribers,
        subscriber_queue_events: cfg.events.subscriber_queue_events,
    });
    fleet.set_events(events.clone());
    let mut registry = Registry::new(cfg.pool_max_sessions(), cfg.pool_max_sessions_per_user());
    registry.set_events(events.clone());
    registry.set_close_report_wait_ms(cfg.events.session_close_report_wait_ms);
    let alerts = consolegate::events::alerts::AlertCenter::new(
        events.clone(),
        control::alert_sources::thresholds(&cfg),
    );
    let api_tokens = arc_swap::ArcSwap::from_pointee(cfg.auth.tokens.clone());
    let state = Arc::new(ControlState {
        events,
        alerts: Mutex::new(alerts),
        jwt: arc_swap::ArcSwapOption::new(jwt.map(Arc::new)),
        user_rates: control::limits::UserRates::new(&cfg.rate_limits),
        api_tokens,
        clients: control::client_ip::ClientIps::new(&cfg.rate_limits, &cfg.network),
        registry: Mutex::new(registry),
        cfg,
        workers: senders,
        ports: Some(pool),
        port_store: Some(store),
        worker_stats: Mutex::new(Vec::new()),
        counters: Mutex::new(ControlCounters::default()),
        demo_addr: demo.as_ref().map(|d| d.addr()),
        public_url: public_url.clone(),
        started: Instant::now(),
        next_worker: AtomicUsize::new(0),
        loads: dp.loads(),
        data_plane: dp.control(),
        io_backend: dp.backend.name(),
        ports_dirty: std::sync::atomic::AtomicBool::new(false),
        pending_revokes: Mutex::new(Vec::new()),
        fleet,
        one_time: Mutex::new(std::collections::HashMap::new()),
    });
    control::persist_ports(&state);

    let (sd_tx, sd_rx) = tokio::sync::watch::channel(false);
    let sd_tx = Arc::new(sd_tx);
    let control_stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let control_thread = {
        let state = state.clone();
        let stopped = control_stopped.clone();
        std::thread::Builder::new()
            .name("cg-control".into())
            .stack_size(CONTROL_THREAD_STACK_BYTES)
            .spawn(move || {
                let r = control::serve(runtime, state.clone(), control_listener, events_rx, sd_rx);
                stopped.store(true, std::sync::atomic::Ordering::Release);
                if let Err(e) = &r {
                    // Without its control plane the appliance is useless:
                    // stop the data plane too, so the process exits non-zero.
                    tracing::error!(error = %e, "control plane failed; stopping");
                    state.data_plane.start_drain();
                }
                r
            })?
    };
    crate::announce(&[
        format!("control listening on {control_addr}"),
        crate::listening_line(&dp),
        format!("console public url {public_url}"),
    ])?;

    let reloader = reload::Reloader::new(
        path.map(Path::to_path_buf),
        as_loaded,
        state.clone(),
        dp.tls_cert(),
        log,
        notifier.clone(),
        generated,
    );
    let predecessor = Arc::new(Predecessor::new(
        state.clone(),
        dp.control(),
        dp.handshake_gauge(),
        dp.take_listener_dups(),
        control_dup,
        notifier.clone(),
        service::runtime_dir(&state_dir.path),
        demo.as_ref().map(|d| d.addr()),
        stop_control(sd_tx.clone(), control_stopped),
    ));
    let watchdog = Arc::new(Mutex::new(None));
    handle_signals(
        signals,
        dp.control(),
        reloader,
        notifier.clone(),
        predecessor.clone(),
        watchdog.clone(),
    )?;
    if let Some(s) = successor {
        let demo_map = s.demo_addr.zip(demo.as_ref().map(|d| d.addr()));
        let admitted = service::pending::admit_pending(&state, pending, demo_map, Instant::now());
        s.started().context("upgrade hand-off: start")?;
        tracing::info!(
            pending_sessions = admitted,
            "upgrade hand-off: this process took over the listeners"
        );
    }
    let dog = report_ready(&notifier, control_addr, takeover.is_some())?;
    if let Ok(mut slot) = watchdog.lock() {
        *slot = dog;
    }

    let metrics = dp.join();
    let _ = sd_tx.send(true);
    let control_result = control_thread.join();
    let handed_over = predecessor.final_outcome();
    if !matches!(handed_over, Some(Outcome::HandedOver { .. })) {
        // After a hand-off the file is the new process's.
        control::persist_ports(&state);
    }
    if let Some(d) = demo {
        d.stop();
    }
    let m = metrics?;
    tracing::info!(
        accepted = m.accepted,
        handshakes = m.handshakes_ok,
        closed = m.sessions_closed,
        "stopped"
    );
    if let Some(Outcome::Failed(why)) = handed_over {
        anyhow::bail!("upgrade hand-off failed: {why}");
    }
    match control_result {
        Ok(r) => r.map_err(Into::into),
        Err(_) => anyhow::bail!("control plane panicked"),
    }
}

/// The new process of an upgrade: connect to the running one and receive
/// its offer (listeners); a config that did not load is refused there.
fn connect_successor(
    socket: &Path,
    loaded: &Result<(ApplianceConfig, Source, Vec<String>), ConfigFileError>,
) -> anyhow::Result<Successor> {
    let timeout_ms = match loaded {
        Ok((cfg, _, _)) => cfg.service.handoff_timeout_ms,
        Err(_) => ServiceConfig::default().handoff_timeout_ms,
    };
    let s = Successor::connect(socket, Duration::from_millis(timeout_ms))
        .context("upgrade hand-off: connect")?;
    if let Err(e) = loaded {
        s.refuse(&e.to_string());
        anyhow::bail!("upgrade hand-off refused: {e}");
    }
    Ok(s)
}

/// The inherited listeners must be the ones this config asks for.
fn check_inherited(s: Successor, cfg: &ApplianceConfig) -> anyhow::Result<Successor> {
    let same = |want: std::net::SocketAddr, got: std::io::Result<std::net::SocketAddr>| {
        got.is_ok_and(|g| g == want || (want.port() == 0 && g.ip() == want.ip()))
    };
    let problem = if s.console.is_empty() || s.console.len() > cfg.worker_count() {
        Some(format!(
            "{} console listeners for {} workers",
            s.console.len(),
            cfg.worker_count()
        ))
    } else if !same(cfg.console.listen, s.console[0].local_addr()) {
        Some(format!(
            "console.listen is not {:?}",
            s.console[0].local_addr()
        ))
    } else if !same(cfg.control.listen, s.control.local_addr()) {
        Some(format!(
            "control.listen is not {:?}",
            s.control.local_addr()
        ))
    } else {
        None
    };
    match problem {
        Some(why) => {
            s.refuse(&why);
            anyhow::bail!("upgrade hand-off refused: {why} (changing it needs a restart)")
        }
        None => Ok(s),
    }
}

/// Stop the control API and wait (up to the given time) until it stopped.
fn stop_control(
    shutdown: Arc<tokio::sync::watch::Sender<bool>>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
) -> Box<dyn Fn(Duration) -> bool + Send + Sync> {
    Box::new(move |timeout| {
        let _ = shutdown.send(true);
        let end = Instant::now() + timeout;
        while !stopped.load(std::sync::atomic::Ordering::Acquire) {
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    })
}

/// Tell the service manager the appliance is ready once its own `/readyz`
/// answers (listeners up, every worker turning), and start the watchdog
/// pings when the unit asks for them.
fn report_ready(
    notifier: &Notifier,
    control_addr: std::net::SocketAddr,
    successor: bool,
) -> anyhow::Result<Option<Watchdog>> {
    if !notifier.enabled() {
        return Ok(None);
    }
    let target = notify::probe_address(control_addr);
    let deadline = Instant::now() + Duration::from_millis(READY_PROBE_DEADLINE_MS);
    loop {
        match notify::probe_ready(target, Duration::from_millis(notify::PROBE_TIMEOUT_MS)) {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => {
                anyhow::bail!("not ready within {READY_PROBE_DEADLINE_MS} ms: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    notifier.ready("listening; workers running");
    tracing::info!("ready (sd_notify READY=1)");
    match notify::watchdog_period(successor) {
        Some(period) => {
            tracing::info!(
                period_ms = period.as_millis() as u64,
                "watchdog pings on while /readyz answers 200"
            );
            Ok(Some(Watchdog::spawn(
                notifier.clone(),
                period,
                control_addr,
            )?))
        }
        None => Ok(None),
    }
}

/// SIGHUP reloads (config, tokens, certificate; refused whole when
/// invalid). SIGUSR2 hands the listeners and pending sessions to a new
/// process (an upgrade), on a thread of its own so that SIGTERM still
/// works meanwhile. SIGTERM/SIGINT: the first drains the data plane (no
/// new connections, live sessions get their grace period), a second exits
/// at once.
fn handle_signals(
    mut signals: signal_hook::iterator::Signals,
    control: Arc<consolegate::dataplane::worker::WorkerControl>,
    reloader: reload::Reloader,
    notifier: Notifier,
    predecessor: Arc<Predecessor>,
    watchdog: Arc<Mutex<Option<Watchdog>>>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("cg-signals".into())
        .spawn(move || {
            let mut stops = 0;
            for sig in signals.forever() {
                if sig == signal_hook::consts::SIGHUP {
                    // Logs its own outcome.
                    let _ = reloader.reload();
                    continue;
                }
                if sig == signal_hook::consts::SIGUSR2 {
                    let (p, dog) = (predecessor.clone(), watchdog.clone());
                    let spawned =
                        std::thread::Builder::new()
                            .name("cg-handoff".into())
                            .spawn(move || {
                                if matches!(p.hand_over(), Outcome::HandedOver { .. }) {
                                    // The new process pings now.
                                    if let Ok(mut d) = dog.lock() {
                                        d.take();
                                    }
                                }
                            });
                    if let Err(e) = spawned {
                        tracing::error!(error = %e, "upgrade hand-off: no thread");
                    }
                    continue;
                }
                stops += 1;
                if stops == 1 {
                    tracing::info!(
                        signal = sig,
                        "draining: no new connections, live sessions get their grace period"
                    );
                    notifier.stopping("draining");
                    control.start_drain();
                    // The hand-off's duplicates would keep the console
                    // port accepting into its queue: refused from now on.
                    predecessor.close_listeners();
                } else {
                    tracing::warn!(signal = sig, "second signal: exiting now");
                    std::process::exit(1);
                }
            }
        })?;
    Ok(())
}
