//! The `consolegate` binary: CLI parsing, logging, signals. `anyhow` lives
//! only here, at the edge.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};

use consolegate::config::{IoChoice, Limits, ProxyConfig, TargetConfig, TlsFiles};
use consolegate::mailbox::{Target, TargetKind, WebMksTarget};
use consolegate::plane::DataPlane;

mod appliance;

#[derive(Parser, Debug)]
#[command(
    name = "consolegate",
    version,
    about = "A console proxy appliance: browsers (noVNC, WebMKS) to VM consoles"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The appliance: data-plane workers plus the control plane (REST,
    /// sessions, tickets, ports, metrics) and the built-in demo console.
    Run {
        /// Config file (default /etc/consolegate/consolegate.toml, else built-in defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Upgrade hand-off (set by the running process on SIGUSR2): take
        /// over its listeners and pending sessions through this socket.
        #[arg(long, hide = true)]
        takeover: Option<PathBuf>,
        /// Start this same command without --detach and exit at once, so the
        /// new process is a child of the service manager.
        #[arg(long, hide = true)]
        detach: bool,
    },
    /// Load, apply CONSOLEGATE_* overrides, validate and summarise a config.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Dedicated-port pool: status or cleanup of persisted allocations.
    Ports {
        /// Accepted before or after the subcommand.
        #[arg(long, global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        cmd: PortsCmd,
    },
    /// Write the man page (roff) generated from this CLI definition to stdout.
    #[command(hide = true)]
    Manpage,
    /// Write a shell completion script to stdout.
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// websockify-compatible WebSocket → TCP proxy:
    /// `consolegate proxy [options] [source_addr:]source_port [target_addr:target_port]`.
    Proxy(Box<ProxyArgs>),
}

#[derive(Subcommand, Debug)]
enum PortsCmd {
    /// Show the pool: total, allocated, free, utilization, health.
    Status,
    /// Reclaim persisted allocations whose port nothing listens on.
    Cleanup {
        /// One pass, then exit (the default).
        #[arg(long)]
        once: bool,
        /// Repeat every SECS seconds until interrupted.
        #[arg(long)]
        interval: Option<u64>,
    },
}

#[derive(Args, Debug)]
struct ProxyArgs {
    /// `[source_addr:]source_port` to listen on (websockify's first argument).
    source: String,
    /// `target_addr:target_port` to relay to (omit with --token-plugin).
    target: Option<String>,

    /// Token plugin: only `TokenFile` (websockify's `token: host:port` lines).
    #[arg(long)]
    token_plugin: Option<String>,
    /// File or directory of token files.
    #[arg(long)]
    token_source: Option<PathBuf>,
    /// Deprecated websockify spelling of `--token-plugin TokenFile --token-source FILE`.
    #[arg(long)]
    target_config: Option<PathBuf>,

    /// PEM certificate for wss (enables TLS; plain ws still accepted unless --ssl-only).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// PEM private key (default: the --cert file).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Refuse connections that are not TLS.
    #[arg(long)]
    ssl_only: bool,
    /// The target is a WebSocket over TLS (a VMware WebMKS endpoint, or any
    /// wss server): `host:port` means `wss://host:port/`. A `wss://` URL as
    /// the target implies it.
    #[arg(long)]
    ssl_target: bool,
    /// Pin the TLS target's certificate: its SHA-1 (`AA:BB:…`, as VMware
    /// tickets give it) or SHA-256 thumbprint.
    #[arg(long)]
    target_thumbprint: Option<String>,
    /// Trust the TLS target's certificate if this PEM CA file signed it
    /// (default: the system roots, unless --target-thumbprint).
    #[arg(long)]
    target_ca: Option<PathBuf>,
    /// Serve static files from this directory on the same port (e.g. noVNC).
    #[arg(long)]
    web: Option<PathBuf>,
    /// Close a session after this many seconds without traffic (0 = never).
    #[arg(long, default_value_t = 0)]
    idle_timeout: u64,
    /// Send a WebSocket ping every this many seconds (0 = never).
    #[arg(long, default_value_t = 0)]
    heartbeat: u64,
    /// Comma-separated allowlist of Origin values (default: any, with a warning).
    #[arg(long, value_delimiter = ',')]
    origin: Vec<String>,
    /// Verbose logging (same as RUST_LOG=debug).
    #[arg(short, long)]
    verbose: bool,

    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// IO backend.
    #[arg(long, default_value = "auto")]
    io: IoChoice,
    /// Do not pin workers to cores.
    #[arg(long)]
    no_pin: bool,

    /// Backend TCP connect timeout, milliseconds.
    #[arg(long)]
    connect_timeout_ms: Option<u64>,
    /// Time allowed from accept to a complete upgrade request, milliseconds.
    #[arg(long)]
    handshake_timeout_ms: Option<u64>,
    /// After SIGTERM, time live sessions keep running before 1001, milliseconds.
    #[arg(long)]
    drain_grace_ms: Option<u64>,
    /// Bytes buffered per direction per session before backpressure.
    #[arg(long)]
    buffer_bytes: Option<usize>,
    /// Largest WebSocket frame payload accepted from a browser, bytes.
    #[arg(long)]
    max_frame_bytes: Option<u64>,
    /// Live sessions per worker.
    #[arg(long)]
    max_sessions: Option<usize>,
    /// Spin this many microseconds after traffic before sleeping (0 = off).
    #[arg(long)]
    busy_poll_us: Option<u64>,
    /// io_uring provided receive buffers per worker (power of two).
    #[arg(long)]
    uring_buffers: Option<u16>,
    /// Sessions a worker may hold above the least-loaded one before it hands
    /// new connections over (0 = exact balance).
    #[arg(long)]
    balance_slack_sessions: Option<usize>,
    /// epoll: splice backend bytes to plain-ws browsers once a read brings
    /// at least this many bytes; io_uring: receive them straight into frame
    /// chunks (0 = neither).
    #[arg(long)]
    splice_min_bytes: Option<usize>,
    /// Capacity asked of each splice pipe, bytes.
    #[arg(long)]
    splice_pipe_bytes: Option<usize>,
    /// Splice pipes per worker (in use plus kept for reuse).
    #[arg(long)]
    splice_pipes: Option<usize>,
    /// io_uring: splice bulk downstream (as epoll does) instead of bulk
    /// receives; on by default (`--uring-splice=false` turns it off).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    uring_splice: Option<bool>,
}

/// websockify options we do not implement, with why. Refused with a clear
/// message instead of being silently ignored.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("--record", "session recording is not supported"),
    (
        "--traffic",
        "per-frame traffic printing is not supported; use -v",
    ),
    (
        "--daemon",
        "run under systemd instead (packaging/ ships a unit)",
    ),
    ("-D", "run under systemd instead (packaging/ ships a unit)"),
    ("--run-once", "not supported"),
    (
        "--timeout",
        "server-wide timeout is not supported; --idle-timeout is per session",
    ),
    (
        "--key-password",
        "encrypted keys are not supported; decrypt the key file",
    ),
    ("--verify-client", "client certificates are not supported"),
    ("--cafile", "client certificates are not supported"),
    (
        "--ssl-version",
        "TLS versions follow rustls's safe defaults (1.2, 1.3)",
    ),
    (
        "--ssl-ciphers",
        "cipher suites follow rustls's safe defaults",
    ),
    ("--unix-target", "UNIX socket targets are not supported"),
    ("--inetd", "inetd mode is not supported"),
    ("--web-auth", "web authentication plugins are not supported"),
    ("--wrap-mode", "wrapping a program is not supported"),
    (
        "--prefer-ipv6",
        "give an explicit [::] source address instead",
    ),
    ("-6", "give an explicit [::] source address instead"),
    ("--libserver", "not applicable"),
    (
        "--host-token",
        "Host-header tokens are not supported; use ?token=",
    ),
    (
        "--auth-plugin",
        "auth plugins are not supported; use the appliance mode's tickets",
    ),
    ("--auth-source", "auth plugins are not supported"),
    ("--log-file", "logs go to stderr (journald under systemd)"),
    ("--syslog", "logs go to stderr (journald under systemd)"),
    (
        "--legacy-syslog",
        "logs go to stderr (journald under systemd)",
    ),
    ("--file-only", "not supported"),
    ("--no-parent", "not supported"),
];

fn check_unsupported(args: &[String]) -> anyhow::Result<()> {
    for a in args.iter().skip(1) {
        let name = a.split('=').next().unwrap_or(a);
        if let Some((opt, why)) = UNSUPPORTED.iter().find(|(o, _)| *o == name) {
            bail!("websockify option {opt} is not supported by consolegate: {why}");
        }
    }
    Ok(())
}

fn parse_source(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    resolve(s).with_context(|| format!("source address {s:?}: expected [addr:]port"))
}

fn resolve(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.to_socket_addrs()?
        .next()
        .with_context(|| format!("{s:?} does not resolve"))
}

/// The proxy's one backend: `host:port` (a VNC server), or a WebMKS
/// endpoint: a `wss://host:port/path` URL, or `host:port` with
/// `--ssl-target` (path `/`). A TLS target's certificate is pinned by
/// `--target-thumbprint`, or checked against `--target-ca` or the system
/// roots; never unchecked.
fn fixed_target(t: &str, a: &ProxyArgs) -> anyhow::Result<Target> {
    use consolegate::protocol::http_upgrade::WsUrl;
    let url = if t.starts_with("wss://") || t.starts_with("ws://") {
        Some(t.to_string())
    } else if a.ssl_target {
        Some(format!("wss://{t}/"))
    } else {
        None
    };
    let Some(url) = url else {
        if a.target_thumbprint.is_some() || a.target_ca.is_some() {
            bail!("--target-thumbprint and --target-ca apply to a TLS target (--ssl-target or a wss:// URL)");
        }
        let addr = resolve(t).with_context(|| format!("target {t:?}: expected host:port"))?;
        return Ok(Target::vnc(addr, None));
    };
    let url = WsUrl::parse(&url).map_err(|e| anyhow::anyhow!("target {t:?}: {e}"))?;
    if !url.tls {
        bail!("target {t:?}: a WebSocket target must be wss:// (TLS)");
    }
    let trust = consolegate::pki::Trust::from_config(
        a.target_thumbprint.as_deref(),
        a.target_ca.as_deref(),
    )
    .map_err(|e| anyhow::anyhow!("target certificate: {e}"))?;
    let tls = consolegate::pki::client_config(&trust)
        .map_err(|e| anyhow::anyhow!("target certificate: {e}"))?;
    let addr = resolve(&format!("{}:{}", url.host, url.port))
        .with_context(|| format!("target {t:?} does not resolve"))?;
    let target = WebMksTarget::new(url, tls).map_err(|e| anyhow::anyhow!("target {t:?}: {e}"))?;
    Ok(Target {
        addr,
        kind: TargetKind::WebMks(std::sync::Arc::new(target)),
    })
}

fn proxy_config(a: ProxyArgs) -> anyhow::Result<ProxyConfig> {
    let listen = parse_source(&a.source)?;
    let target = match (&a.target, &a.token_plugin, &a.target_config) {
        (Some(t), None, None) => TargetConfig::Fixed(fixed_target(t, &a)?),
        (None, Some(p), None) => {
            if p != "TokenFile" && p != "websockify.token_plugins.TokenFile" {
                bail!("--token-plugin {p}: only TokenFile is supported");
            }
            let src = a
                .token_source
                .clone()
                .context("--token-plugin TokenFile needs --token-source FILE_OR_DIR")?;
            TargetConfig::TokenFile { source: src }
        }
        (None, None, Some(src)) => TargetConfig::TokenFile {
            source: src.clone(),
        },
        (None, None, None) => {
            bail!("give a target host:port or --token-plugin TokenFile --token-source FILE")
        }
        _ => bail!("give either a target host:port or a token plugin, not both"),
    };
    if a.token_source.is_some() && a.token_plugin.is_none() {
        bail!("--token-source needs --token-plugin TokenFile");
    }
    let tls = match (&a.cert, a.ssl_only) {
        (Some(cert), ssl_only) => Some(TlsFiles {
            cert: cert.clone(),
            key: a.key.clone().unwrap_or_else(|| cert.clone()),
            ssl_only,
        }),
        (None, true) => bail!("--ssl-only needs --cert"),
        (None, false) => {
            if a.key.is_some() {
                bail!("--key needs --cert");
            }
            None
        }
    };
    let mut limits = Limits {
        idle_timeout_ms: a.idle_timeout.saturating_mul(1000),
        heartbeat_ms: a.heartbeat.saturating_mul(1000),
        ..Limits::default()
    };
    if let Some(v) = a.connect_timeout_ms {
        limits.connect_timeout_ms = v;
    }
    if let Some(v) = a.handshake_timeout_ms {
        limits.handshake_timeout_ms = v;
    }
    if let Some(v) = a.drain_grace_ms {
        limits.drain_grace_ms = v;
    }
    if let Some(v) = a.buffer_bytes {
        limits.buffer_bytes = v;
    }
    if let Some(v) = a.max_frame_bytes {
        limits.max_frame_bytes = v;
    }
    if let Some(v) = a.max_sessions {
        limits.max_sessions_per_worker = v;
    }
    if let Some(v) = a.busy_poll_us {
        limits.busy_poll_us = v;
    }
    if let Some(v) = a.uring_buffers {
        limits.uring_provided_buffers = v;
    }
    if let Some(v) = a.balance_slack_sessions {
        limits.balance_slack_sessions = v;
    }
    if let Some(v) = a.splice_min_bytes {
        limits.splice_min_bytes = v;
    }
    if let Some(v) = a.splice_pipe_bytes {
        limits.splice_pipe_bytes = v;
    }
    if let Some(v) = a.splice_pipes {
        limits.splice_pipes_per_worker = v;
    }
    if let Some(on) = a.uring_splice {
        limits.uring_splice = on;
    }
    let origins: Vec<String> = a.origin.into_iter().filter(|o| !o.is_empty()).collect();
    Ok(ProxyConfig {
        listen,
        target,
        tls,
        web_dir: a.web,
        origins,
        workers: a.workers,
        io: a.io,
        pin_workers: !a.no_pin,
        limits,
    })
}

fn init_logging(json: bool, verbose: bool) {
    init_logging_filter(json, if verbose { "debug" } else { "info" });
}

/// Logging to stderr with RUST_LOG taking precedence over `default`.
pub(crate) fn init_logging_filter(json: bool, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal as _;
    // Colour codes only for a person at a terminal, not for journald/files.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// `consolegate proxy` is a websockify drop-in, and websockify reads a
/// `--key` (or a combined `--cert` PEM) whatever its mode: a key others may
/// read is a warning here, where `consolegate run` refuses it
/// (`config::secrets`).
fn warn_if_key_not_private(key: &std::path::Path) {
    use consolegate::config::secrets::{check_private_path, SecretError};
    if let Err(e @ SecretError::ReadableByOthers { .. }) = check_private_path(key) {
        tracing::warn!("TLS key: {e} (accepted in proxy mode for websockify compatibility)");
    }
}

fn run_proxy(cfg: ProxyConfig) -> anyhow::Result<()> {
    if cfg.origins.is_empty() {
        tracing::warn!("no --origin allowlist: any Origin is accepted (as websockify does)");
    }
    if let Some(tls) = &cfg.tls {
        warn_if_key_not_private(&tls.key);
    }
    // Before the workers accept: once they do, a flood can take every
    // descriptor, and the signal handler needs one.
    let signals = drain_signals()?;
    let dp = DataPlane::start(cfg)?;
    let control = dp.control();
    announce(&[listening_line(&dp)])?;
    tracing::info!(addr = %dp.addr, io = dp.backend.name(), workers = dp.workers, "proxy started");
    drain_on_signals(signals, control)?;
    let m = dp.join()?;
    let errors: Vec<String> = m.errors().iter().map(|(k, v)| format!("{k}={v}")).collect();
    tracing::info!(
        accepted = m.accepted,
        handshakes = m.handshakes_ok,
        closed = m.sessions_closed,
        bytes_up = m.bytes_browser_to_backend,
        bytes_down = m.bytes_backend_to_browser,
        errors = %errors.join(","),
        "stopped"
    );
    Ok(())
}

/// The start-up line tests and scripts wait for.
pub(crate) fn listening_line(dp: &DataPlane) -> String {
    format!(
        "listening on {} (io={}, workers={})",
        dp.addr,
        dp.backend.name(),
        dp.workers
    )
}

/// Print start-up lines on stdout and flush them at once.
pub(crate) fn announce(lines: &[String]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    for l in lines {
        writeln!(out, "{l}")?;
    }
    out.flush()
}

/// SIGTERM/SIGINT: first one drains the data plane (no new connections,
/// live sessions get their grace period), a second one exits at once.
/// The SIGTERM/SIGINT handler, registered before anything accepts
/// connections (it needs a descriptor, which a connection flood could
/// otherwise take first).
pub(crate) fn drain_signals() -> anyhow::Result<signal_hook::iterator::Signals> {
    Ok(signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?)
}

pub(crate) fn drain_on_signals(
    mut signals: signal_hook::iterator::Signals,
    control: std::sync::Arc<consolegate::dataplane::worker::WorkerControl>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("cg-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for sig in signals.forever() {
                seen += 1;
                if seen == 1 {
                    tracing::info!(
                        signal = sig,
                        "draining: no new connections, live sessions get their grace period"
                    );
                    control.start_drain();
                } else {
                    tracing::warn!(signal = sig, "second signal: exiting now");
                    std::process::exit(1);
                }
            }
        })?;
    Ok(())
}

/// The packages' man page: consolegate(1) from the clap definition.
fn write_manpage() -> anyhow::Result<()> {
    use clap::CommandFactory as _;
    let cmd = Cli::command();
    clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if let Err(e) = check_unsupported(&args) {
        eprintln!("consolegate: {e}");
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    // Fault injection (test builds only): FAILPOINTS=name=action;… at start.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let result = match cli.cmd {
        Command::Run { detach: true, .. } => consolegate::service::handoff::detach()
            .context("start the new process")
            .map(|_| ()),
        Command::Run {
            config, takeover, ..
        } => appliance::run(
            config.as_deref(),
            takeover.as_deref(),
            cli.log_format == "json",
        ),
        Command::CheckConfig { config } => appliance::check_config(config.as_deref()),
        Command::Ports { config, cmd } => {
            init_logging(cli.log_format == "json", false);
            match cmd {
                PortsCmd::Status => appliance::ports_status(config.as_deref()),
                PortsCmd::Cleanup { once, interval } => {
                    appliance::ports_cleanup(config.as_deref(), if once { None } else { interval })
                }
            }
        }
        Command::Manpage => write_manpage(),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "consolegate",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Proxy(a) => {
            init_logging(cli.log_format == "json", a.verbose);
            proxy_config(*a).and_then(run_proxy)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("consolegate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
