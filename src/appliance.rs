//! `consolegate run`, `check-config` and `ports`: the appliance wiring at
//! the binary's edge (config → demo server → data plane → control thread →
//! signals). `anyhow` is allowed here.

use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use consolegate::config::appliance::{ApplianceConfig, LogFormat, Source};
use consolegate::config::{ProxyConfig, TargetConfig, TlsFiles};
use consolegate::control::{self, registry::Registry, ControlCounters, ControlState};
use consolegate::hypervisor::backend::StartContext;
use consolegate::hypervisor::demo::{DemoConfig as DemoServerConfig, DemoServer};
use consolegate::hypervisor::fleet::Fleet;
use consolegate::mailbox;
use consolegate::plane::{ApplianceLink, DataPlane};
use consolegate::ports::{self, PortPool, PortPoolConfig, PortRange, PortStore};

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

pub fn check_config(path: Option<&Path>) -> anyhow::Result<()> {
    let (cfg, source) = load(path)?;
    println!("config OK ({source:?})");
    for w in cfg.warnings() {
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

pub fn run(path: Option<&Path>, json_logs: bool) -> anyhow::Result<()> {
    let (mut cfg, source) = load(path)?;
    let json = json_logs || cfg.log.format == LogFormat::Json;
    crate::init_logging_filter(json, &cfg.log.level);
    tracing::info!(source = ?source, "configuration loaded");
    // Validation ran before logging existed; its doubts are logged now.
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    if let Some(token) = cfg.ensure_admin_token() {
        // The built-in default has no token: make one and say it once.
        println!("admin token: {token}");
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

    // Before the workers accept (see drain_signals).
    let signals = crate::drain_signals()?;

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
    let dp = DataPlane::start_with(
        proxy,
        Some(ApplianceLink {
            inboxes,
            events: events_tx,
        }),
    )?;
    let public_url = cfg.public_url_with(dp.addr);
    // Bound here so the real address (port 0 in tests) can be printed.
    let control_listener = std::net::TcpListener::bind(cfg.control.listen)
        .with_context(|| format!("control listen {}", cfg.control.listen))?;
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
    let state = Arc::new(ControlState {
        events,
        jwt,
        user_rates: control::limits::UserRates::new(&cfg.rate_limits),
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
    let control_thread = {
        let state = state.clone();
        std::thread::Builder::new()
            .name("cg-control".into())
            .stack_size(CONTROL_THREAD_STACK_BYTES)
            .spawn(move || {
                let r = control::serve(runtime, state.clone(), control_listener, events_rx, sd_rx);
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

    crate::drain_on_signals(signals, dp.control())?;

    let metrics = dp.join();
    let _ = sd_tx.send(true);
    let control_result = control_thread.join();
    control::persist_ports(&state);
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
    match control_result {
        Ok(r) => r.map_err(Into::into),
        Err(_) => anyhow::bail!("control plane panicked"),
    }
}
