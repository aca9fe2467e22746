//! Appliance-mode configuration: the TOML file
//! (`/etc/consolegate/consolegate.toml`), the `CONSOLEGATE_<SECTION>_<KEY>`
//! environment overrides, and the cross-field validation that runs before
//! anything listens.
//!
//! Every limit of the appliance lives here with its unit in its name; the
//! data-plane limits are the shared [`Limits`] struct, nested as
//! `[dataplane.limits]` (a nested table rather than flattened keys because
//! serde cannot combine `flatten` with `deny_unknown_fields`, and a typo in a
//! limit must be an error, not a silently ignored key). The cost of each key is
//! documented beside its field and in `packaging/consolegate.toml`.
//!
//! Start-up order, as the binary is expected to call it:
//! [`ApplianceConfig::load`] → [`ApplianceConfig::apply_env`] →
//! [`ApplianceConfig::validate`] → [`ApplianceConfig::resolve_state_dir`] →
//! [`ApplianceConfig::ensure_admin_token`] (print the token it returns, once).
//! [`ApplianceConfig::load_with_env`] does the first three.
//!
//! What this module does not do: open sockets, start threads, print, or
//! depend on the planes it configures. Its only IO is reading the config file,
//! probing the state directory for writability and asking the OS for random
//! bytes for a generated token.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hypervisor::backend::{DemoHypervisorConfig, HypervisorConfig, MAX_HYPERVISORS};
use crate::hypervisor::fleet::{CacheConfig, FleetSettings, QueueSettings};
use crate::hypervisor::operations::OperationsConfig;

use super::{ConfigError, IoChoice, Limits, ProxyConfig, TargetConfig};

/// Where the packaged config file is installed and looked for by default.
pub const DEFAULT_PATH: &str = "/etc/consolegate/consolegate.toml";
/// The state directory used by a system install (created by the package).
pub const SYSTEM_STATE_DIR: &str = "/var/lib/consolegate";
/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "CONSOLEGATE_";
/// `CONSOLEGATE_*` variables that are not config overrides and are skipped by
/// [`ApplianceConfig::apply_env`]: `CONSOLEGATE_CONFIG` names the config file
/// and is read by the CLI, not by this module.
pub const ENV_RESERVED: &[&str] = &["CONSOLEGATE_CONFIG"];
/// Largest config file read. A config is a few KiB; the cap makes pointing
/// `--config` at a device or a log file fail fast instead of eating memory.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Shortest accepted API token, in characters. A token is the only thing
/// between the network and the admin API; 16 random characters is the least
/// that resists guessing, and the generated ones are 64.
pub const MIN_TOKEN_CHARS: usize = 16;
/// Longest accepted API token: tokens travel in an HTTP header whose size is
/// bounded by `control.max_request_bytes`.
pub const MAX_TOKEN_CHARS: usize = 4096;
/// `sessions.target_networks` by default: loopback, the IPv4 private
/// ranges (RFC 1918), shared address space (RFC 6598) and IPv6 unique local
/// addresses, where consoles live.
pub const DEFAULT_TARGET_NETWORKS: &[&str] = &[
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "::1/128",
    "fc00::/7",
];
/// Most entries in `sessions.target_networks` (each is checked per raw
/// target, linearly).
pub const MAX_TARGET_NETWORKS: usize = 256;
/// Random bytes in a generated admin token (hex-encoded: 64 characters).
const GENERATED_TOKEN_BYTES: usize = 32;

/// Errors of loading, overriding and validating the appliance config. Each one
/// names where the bad value came from: the file, the key path, or the
/// environment variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be read (missing, unreadable, too large, not UTF-8).
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema (unknown key,
    /// wrong type). `message` starts with the key path and the line.
    #[error("{}: {message}", path.as_deref().unwrap_or("config"))]
    Parse {
        path: Option<String>,
        message: String,
    },
    /// A `CONSOLEGATE_*` variable is unknown or its value does not parse.
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    /// A value parsed but breaks a rule (range, cross-field).
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigFileError {
    ConfigFileError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The whole appliance config. Every section has defaults, so an empty file
/// (or none) is a working appliance; unknown keys are errors.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApplianceConfig {
    pub control: ControlConfig,
    pub console: ConsoleConfig,
    pub ports: PortsConfig,
    pub auth: AuthConfig,
    pub dataplane: DataplaneConfig,
    pub sessions: SessionsConfig,
    pub demo: DemoConfig,
    pub log: LogConfig,
    /// `[service]`: running under systemd (the upgrade hand-off).
    pub service: ServiceConfig,
    /// TLS on the console port (wss). Absent: plain ws, for a TLS-terminating
    /// proxy in front or for loopback use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// `[[hypervisors]]`: where VMs come from (vsphere, qemu, static,
    /// demo). None configured and `[demo]` on: the demo console is listed
    /// as hypervisor `demo`. Not serialised (it holds paths to secrets).
    #[serde(skip_serializing)]
    pub hypervisors: Vec<HypervisorConfig>,
    /// `[queue]`: the priority queue in front of every hypervisor.
    pub queue: QueueSettings,
    /// `[cache]`: VM lists and thumbnails.
    pub cache: CacheConfig,
    /// `[operations]`: power actions remembered for the API.
    pub operations: OperationsConfig,
    /// `[viewers]`: the pool of consoles, per user and in total.
    pub viewers: super::users::ViewersConfig,
    /// `[rate_limits]`: console creation per user, per-IP limits.
    pub rate_limits: super::users::RateLimitsConfig,
    /// `[network]`: trusted proxies, PROXY protocol, X-Forwarded-For.
    pub network: super::network::NetworkConfig,
    /// `[events]`: the live event endpoints (`/ws/*`).
    pub events: super::events::EventsConfig,
}

/// `[control]`: the REST API, `/metrics` and the `/ws/*` event endpoints, and
/// the mailboxes between the planes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Address of the control port. Loopback by default: the API hands out
    /// console tickets, so exposing it is an explicit decision.
    pub listen: SocketAddr,
    /// Largest REST request (head + body) in bytes; 413 beyond. Cost: up to
    /// this much memory per in-flight request.
    pub max_request_bytes: usize,
    /// Time a REST request may take, hypervisor calls included; 504 beyond.
    pub request_timeout_ms: u64,
    /// Messages queued per worker mailbox (control → worker). Cost: one
    /// message slot (~100 B) each, per worker, allocated up front; when full
    /// the control plane refuses new sessions for that worker (503) instead
    /// of blocking.
    pub mailbox_capacity: usize,
    /// Messages queued from all workers to the control plane (session
    /// events, stats). Cost: one slot each, allocated up front; when full,
    /// workers drop events (counted in a metric) rather than stall a relay;
    /// session state is reconciled from the admissions regardless.
    pub events_capacity: usize,
    /// A worker whose loop has not turned for this long counts as stuck:
    /// `/readyz` answers 503 naming it. A turn happens at least every
    /// `dataplane.limits.timer_tick_ms`. Cost: too short flags a worker on
    /// an overloaded host; too long notices a stuck one late.
    pub worker_stall_ms: u64,
    /// Require a bearer token (any role) on `/metrics`. Off by default (the
    /// control port listens on loopback); turn on when it is reachable by
    /// others, since metrics name users' session counts and errors.
    pub metrics_require_token: bool,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            max_request_bytes: 64 * 1024,
            request_timeout_ms: 30_000,
            mailbox_capacity: 1024,
            events_capacity: 4096,
            worker_stall_ms: 10_000,
            metrics_require_token: false,
        }
    }
}

/// `[console]`: where browsers connect (`/proxy/{session_id}`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Address of the shared console port. Loopback by default (the tests'
    /// rule); set `0.0.0.0:6080` to serve browsers on other machines.
    pub listen: SocketAddr,
    /// Base of the `ws_url` handed out (`{public_url}/proxy/{id}`), as
    /// browsers must reach it (a DNS name, a load balancer). Unset: derived
    /// from `listen` and `[tls]`, see [`ApplianceConfig::public_url`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// Static files (e.g. noVNC) served on the console port to requests that
    /// are not WebSocket upgrades. Unset: none. Cost: a file read per request,
    /// each at most `dataplane.limits.web_max_file_bytes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub web_dir: Option<PathBuf>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 6080)),
            public_url: None,
            web_dir: None,
        }
    }
}

/// `[ports]`: dedicated per-session listeners, allocated from a bitmap.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PortsConfig {
    /// `"FIRST-LAST"`, inclusive. Cost: one bit of bitmap per port, and one
    /// listening socket per session that asks for a dedicated port.
    pub range: String,
    /// Where allocations are persisted (atomically, temp + rename) so a
    /// restart restores them. Unset: `/var/lib/consolegate` when writable,
    /// else `$XDG_STATE_HOME/consolegate` (or `~/.local/state/consolegate`),
    /// else a temporary directory; see [`ApplianceConfig::resolve_state_dir`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    /// Address dedicated listeners bind. Unset: the IP of `console.listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen_ip: Option<IpAddr>,
    /// A port found in use by another process is skipped for this long
    /// before it is tried again. Cost: shorter means more failed binds on a
    /// busy host; longer means such ports stay unusable longer after the
    /// other process leaves.
    pub external_retry_ms: u64,
    /// Ports tried per allocation before the session is refused (503).
    /// Cost: each attempt is a bind syscall on the control plane.
    pub max_bind_attempts: u32,
    /// How often stale allocations (sessions that are gone) are reclaimed.
    /// Cost: one scan of the bitmap and the registry per interval.
    pub cleanup_interval_ms: u64,
}

impl Default for PortsConfig {
    fn default() -> Self {
        Self {
            range: "6100-6999".to_string(),
            state_dir: None,
            listen_ip: None,
            external_retry_ms: 60_000,
            max_bind_attempts: 16,
            cleanup_interval_ms: 30_000,
        }
    }
}

/// `[auth]`: bearer tokens of the control API.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `[[auth.tokens]]` entries. None configured: an admin token is
    /// generated at start when the appliance runs without a config file
    /// ([`ApplianceConfig::ensure_admin_token`]); with a config file it
    /// refuses to start instead.
    pub tokens: Vec<TokenConfig>,
    /// `[auth.jwt]`: users' JSON Web Tokens.
    pub jwt: super::users::JwtConfig,
}

/// One API token, given inline (`token`), in a file (`token_file`) or as a
/// systemd credential (`credential`, a name in `$CREDENTIALS_DIRECTORY`,
/// set up by the unit's `LoadCredential=`): exactly one of the three. Files
/// and credentials are read by [`ApplianceConfig::resolve_secrets`], which
/// fills `token`; `validate` only checks the shape.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub token: String,
    /// Absolute path of a file holding the token (one line). It must not be
    /// readable by others (mode `o-rwx`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Name of a systemd credential holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    pub role: Role,
}

impl TokenConfig {
    /// An inline token.
    pub fn new(token: String, role: Role) -> Self {
        Self {
            token,
            token_file: None,
            credential: None,
            role,
        }
    }
}

// Written by hand so that `{:?}` of a config (log lines, panics) never
// prints a secret.
impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("token", &Redacted(self.token.len()))
            .field("token_file", &self.token_file)
            .field("credential", &self.credential)
            .field("role", &self.role)
            .finish()
    }
}

struct Redacted(usize);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<redacted, {} chars>", self.0)
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: create and close sessions, change state.
    Admin,
    /// Read-only endpoints and events.
    Read,
    /// Consoles of any VM and raw targets, power actions, any session;
    /// not the appliance's own switches (failpoints).
    Operator,
    /// A user (JWT only: it needs a `sub`): their own consoles, of the VMs
    /// their token allows, opened through `POST /api/v1/vms/{vm}/console`.
    Viewer,
}

/// `[dataplane]`: the worker threads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Worker threads; 0 = one per core. Cost: a thread, a ring and a
    /// buffer pool each.
    pub workers: usize,
    /// `auto` probes io_uring and falls back to epoll where it is blocked.
    pub io: IoChoice,
    /// Pin each worker to its own core (when there are no more workers than
    /// cores). Turn off on shared hosts where other work needs the cores.
    pub pin_workers: bool,
    /// `[dataplane.limits]`: every relay limit, see [`Limits`].
    pub limits: Limits,
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self {
            workers: 0,
            io: IoChoice::Auto,
            pin_workers: true,
            limits: Limits::default(),
        }
    }
}

/// `[sessions]`: admission of console sessions.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionsConfig {
    /// Time from creation to the browser's first connect; the ticket is void
    /// after it. Cost: longer means a leaked ticket stays usable longer and
    /// pending sessions hold their slot (and dedicated port) longer.
    pub ticket_ttl_ms: u64,
    /// Moved to `[viewers] max_sessions`; still read here (it wins, with
    /// a warning) so older files keep working.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sessions: Option<usize>,
    /// Moved to `[viewers] max_sessions_per_user`; still read here (it
    /// wins, with a warning).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sessions_per_user: Option<usize>,
    /// Random bytes per ticket (≥ 16 = 128 bits). Cost: longer URLs only.
    pub ticket_bytes: usize,
    /// Default for sessions created without an explicit choice: accept the
    /// ticket only from a browser whose `Origin` matches the origin recorded
    /// at creation. Cost: none when the portal and the console share an
    /// origin; breaks embedding from another origin unless it is recorded.
    pub bind_origin: bool,
    /// Default for sessions created without an explicit choice: accept the
    /// ticket only from the client IP recorded at creation. Off by default
    /// because NAT, proxies and mobile clients change the address between
    /// the portal request and the WebSocket.
    pub bind_client_ip: bool,
    /// The origin of the portal that opens consoles (`https://portal.example`).
    /// With `bind_origin`, a session created without an `origin` is bound
    /// to it. Unset: the console's own web origin when it serves noVNC
    /// (`console.web_dir`), else such a request is refused (400
    /// `origin_required`) rather than bound to nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub portal_origin: Option<String>,
    /// Networks that raw targets (`{"kind":"vnc","host":…}`) may be in, as
    /// CIDRs; a target resolving elsewhere is refused (403
    /// `target_not_allowed`), so a leaked admin token cannot turn the
    /// appliance into a scanner of other networks. Default: loopback and
    /// the private ranges. Link-local addresses (169.254.0.0/16, the cloud
    /// metadata service; fe80::/10), multicast and unspecified addresses
    /// are refused whatever this says. Targets from hypervisors are not raw.
    pub target_networks: Vec<String>,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            ticket_ttl_ms: 60_000,
            max_sessions: None,
            max_sessions_per_user: None,
            ticket_bytes: 32,
            bind_origin: true,
            bind_client_ip: false,
            portal_origin: None,
            target_networks: DEFAULT_TARGET_NETWORKS
                .iter()
                .map(|n| n.to_string())
                .collect(),
        }
    }
}

/// `[demo]`: the built-in RFB server, so a fresh install has a console to
/// open.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    /// On by default so `make run` works out of the box; turn off in
    /// production.
    pub enabled: bool,
    /// Framebuffer width in pixels. Cost: width × height × 4 bytes.
    pub width: u16,
    /// Framebuffer height in pixels.
    pub height: u16,
    /// Time between frames. Cost: shorter means more CPU and bandwidth per
    /// demo client.
    pub frame_interval_ms: u64,
    /// Demo viewers at once; further connects are refused.
    pub max_clients: usize,
    /// VNC password of the demo server (1 to 8 bytes: VNC authentication
    /// uses no more), to exercise the path where the appliance answers the
    /// VNC challenge itself. Unset: no VNC authentication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

// By hand so that `{:?}` never prints the password.
impl std::fmt::Debug for DemoConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoConfig")
            .field("enabled", &self.enabled)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("frame_interval_ms", &self.frame_interval_ms)
            .field("max_clients", &self.max_clients)
            .field(
                "password",
                &self.password.as_ref().map(|p| Redacted(p.len())),
            )
            .finish()
    }
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            width: 1024,
            height: 768,
            frame_interval_ms: 100,
            max_clients: 16,
            password: None,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A level (`info`) or an `EnvFilter` string (`info,consolegate=debug`).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_string(),
        }
    }
}

/// `[service]`: how the appliance behaves under a service manager.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// Upgrade hand-off (SIGUSR2): once the new process took over the
    /// listeners, the previous one keeps relaying its live consoles for at
    /// most this long, then closes them with 1001 and exits; it exits
    /// earlier when the last one ends. 0 closes them at once. Cost: two
    /// processes (and binaries) in memory for up to this long.
    pub upgrade_drain_deadline_ms: u64,
    /// Upgrade hand-off: how long each step may take (the new process
    /// starting and connecting, preparing, starting its planes) before the
    /// running process gives up on it. Before the listeners are handed
    /// over, giving up leaves the running process as it was.
    pub handoff_timeout_ms: u64,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            upgrade_drain_deadline_ms: 3_600_000,
            handoff_timeout_ms: 30_000,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `[tls]`: certificate and key (PEM) for wss on the console port. Both are
/// required when the section is present.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Also accept plain ws on the console port. Off: with TLS configured a
    /// ticket must never cross in clear.
    #[serde(default)]
    pub allow_plain: bool,
}

/// Where a loaded config came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// No file was asked for: the built-in defaults.
    BuiltIn,
    /// Read from this file.
    File(PathBuf),
    /// The default path was used and does not exist: the built-in defaults.
    DefaultFileMissing(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::BuiltIn => write!(f, "built-in defaults"),
            Source::File(p) => write!(f, "{}", p.display()),
            Source::DefaultFileMissing(p) => {
                write!(f, "built-in defaults ({} not found)", p.display())
            }
        }
    }
}

/// How the state directory was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateDirOrigin {
    /// `ports.state_dir` was set.
    Configured,
    /// `/var/lib/consolegate`.
    System,
    /// `$XDG_STATE_HOME/consolegate` or `~/.local/state/consolegate`.
    User,
    /// A directory under the temporary directory: allocations do not
    /// survive a reboot.
    Temporary,
}

/// The state directory in use and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDirChoice {
    pub path: PathBuf,
    pub origin: StateDirOrigin,
}

impl std::fmt::Display for StateDirChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = match self.origin {
            StateDirOrigin::Configured => "configured",
            StateDirOrigin::System => "system default",
            StateDirOrigin::User => "per-user default: /var/lib/consolegate is not writable",
            StateDirOrigin::Temporary => {
                "temporary: no persistent default is writable, allocations will not survive a reboot"
            }
        };
        write!(f, "{} ({why})", self.path.display())
    }
}

impl ApplianceConfig {
    /// Read the config. `None`: the built-in defaults. `Some(path)`: that
    /// file, which must exist, except [`DEFAULT_PATH`], whose absence means
    /// the built-in defaults (reported in the returned [`Source`]). The
    /// result is not validated yet: environment overrides may still fix it.
    pub fn load(path: Option<&Path>) -> Result<(Self, Source), ConfigFileError> {
        Self::load_from(path, Path::new(DEFAULT_PATH))
    }

    /// [`load`](Self::load) with the default path as a parameter, so tests
    /// need not depend on what `/etc` holds.
    fn load_from(
        path: Option<&Path>,
        default_path: &Path,
    ) -> Result<(Self, Source), ConfigFileError> {
        let Some(path) = path else {
            return Ok((Self::default(), Source::BuiltIn));
        };
        let read_err = |source| ConfigFileError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == default_path => {
                return Ok((
                    Self::default(),
                    Source::DefaultFileMissing(path.to_path_buf()),
                ));
            }
            Err(e) => return Err(read_err(e)),
        };
        let mut text = String::new();
        // One byte more than the cap tells "exactly at the cap" from "over".
        file.take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(read_err(std::io::Error::other(format!(
                "larger than {MAX_FILE_BYTES} bytes"
            ))));
        }
        match Self::from_toml_str(&text) {
            Ok(cfg) => Ok((cfg, Source::File(path.to_path_buf()))),
            Err(ConfigFileError::Parse { message, .. }) => Err(ConfigFileError::Parse {
                path: Some(path.display().to_string()),
                message,
            }),
            Err(e) => Err(e),
        }
    }

    /// [`load`](Self::load), then [`apply_env`](Self::apply_env), then
    /// [`validate`](Self::validate).
    pub fn load_with_env(
        path: Option<&Path>,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Self, Source), ConfigFileError> {
        let (mut cfg, source) = Self::load(path)?;
        cfg.apply_env(vars)?;
        cfg.validate()?;
        Ok((cfg, source))
    }

    /// Parse a TOML document. Errors carry the key path and the line, e.g.
    /// `control.listen (line 2, column 10): invalid socket address syntax`.
    pub fn from_toml_str(s: &str) -> Result<Self, ConfigFileError> {
        toml::from_str(s).map_err(|e| ConfigFileError::Parse {
            path: None,
            message: describe_toml_error(s, &e),
        })
    }

    /// Apply `CONSOLEGATE_<SECTION>_<KEY>` overrides, e.g.
    /// `CONSOLEGATE_CONTROL_LISTEN`, `CONSOLEGATE_DATAPLANE_WORKERS`,
    /// `CONSOLEGATE_DATAPLANE_LIMITS_IDLE_TIMEOUT_MS`, `CONSOLEGATE_TLS_CERT`.
    /// `CONSOLEGATE_AUTH_TOKEN` adds an admin token and
    /// `CONSOLEGATE_AUTH_READ_TOKEN` a read token. Variables without the
    /// prefix and those in [`ENV_RESERVED`] are ignored; any other
    /// `CONSOLEGATE_*` variable that names no key is an error, so a typo is
    /// never silent. On error nothing is applied.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigFileError> {
        let schema = schema();
        let mut doc = to_table(self);
        // `[tls]` needs both keys; its check waits until all variables are in.
        let mut tls_vars: Vec<String> = Vec::new();
        for (var, value) in vars {
            let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if ENV_RESERVED.contains(&var.as_str()) {
                continue;
            }
            let env_err = |message: String| ConfigFileError::Env {
                var: var.clone(),
                message,
            };
            let name = rest.to_ascii_lowercase();
            let role = match name.as_str() {
                "auth_token" => Some(Role::Admin),
                "auth_read_token" => Some(Role::Read),
                _ => None,
            };
            if let Some(role) = role {
                if let Err(m) = check_token(&value) {
                    return Err(env_err(m));
                }
                let entry = to_table(&TokenConfig::new(value, role));
                let tokens = doc
                    .entry("auth")
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .and_then(|t| {
                        t.entry("tokens")
                            .or_insert_with(|| toml::Value::Array(Vec::new()))
                            .as_array_mut()
                    });
                match tokens {
                    Some(a) => a.push(toml::Value::Table(entry)),
                    None => return Err(env_err("auth.tokens is not an array".into())),
                }
                continue;
            }
            let Some((path, kind)) = resolve_env_key(&schema, &name) else {
                return Err(env_err(format!(
                    "no such setting (expected {ENV_PREFIX}<SECTION>_<KEY> naming a key of \
                     the config file, e.g. CONSOLEGATE_CONTROL_LISTEN, or \
                     CONSOLEGATE_AUTH_TOKEN)"
                )));
            };
            let key = path.join(".");
            let parsed = match kind {
                Kind::Integer => value
                    .trim()
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|_| format!("{key}: expected an integer, got {value:?}")),
                Kind::Bool => match value.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" => Ok(toml::Value::Boolean(true)),
                    "false" | "0" => Ok(toml::Value::Boolean(false)),
                    _ => Err(format!("{key}: expected true or false, got {value:?}")),
                },
                Kind::String => Ok(toml::Value::String(value.clone())),
                Kind::StringList => Ok(toml::Value::Array(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|v| !v.is_empty())
                        .map(|v| toml::Value::String(v.to_string()))
                        .collect(),
                )),
                Kind::NotSettable => Err(format!(
                    "{key} cannot be set from the environment (use CONSOLEGATE_AUTH_TOKEN \
                     or CONSOLEGATE_AUTH_READ_TOKEN for tokens)"
                )),
            };
            let parsed = parsed.map_err(env_err)?;
            set_path(&mut doc, &path, parsed);
            if path[0] == "tls" {
                tls_vars.push(var.clone());
                continue;
            }
            // Type-check now, so the error names this variable. `[tls]` is
            // left out: it may be half-set until its second variable comes,
            // and its error must not be blamed on this one.
            let mut check = doc.clone();
            check.remove("tls");
            if let Err(e) = toml::Value::Table(check).try_into::<ApplianceConfig>() {
                return Err(env_err(format!(
                    "{key}: {}{}",
                    e.message().trim_end(),
                    hint(&key)
                )));
            }
        }
        match toml::Value::Table(doc).try_into::<ApplianceConfig>() {
            Ok(mut cfg) => {
                // Not serialised (secrets' paths), so not in `doc`: keep them.
                cfg.hypervisors = std::mem::take(&mut self.hypervisors);
                *self = cfg;
                Ok(())
            }
            Err(e) => Err(ConfigFileError::Env {
                var: if tls_vars.is_empty() {
                    format!("{ENV_PREFIX}*")
                } else {
                    tls_vars.join(", ")
                },
                message: format!(
                    "{} (CONSOLEGATE_TLS_CERT and CONSOLEGATE_TLS_KEY go together unless the \
                     file has [tls])",
                    e.message().trim_end()
                ),
            }),
        }
    }

    /// Check ranges and cross-field rules; the first broken rule is
    /// returned, naming its key (`sessions.ticket_bytes`,
    /// `auth.tokens[1].token`, `dataplane.limits.uring_entries`). Pure: no
    /// IO (file existence is checked by whoever opens the files). Logs a
    /// warning for legal but doubtful combinations.
    pub fn validate(&self) -> Result<(), ConfigFileError> {
        // [control]
        let c = &self.control;
        in_range(
            "control.max_request_bytes",
            c.max_request_bytes as u64,
            1024,
            16 << 20,
        )?;
        in_range(
            "control.request_timeout_ms",
            c.request_timeout_ms,
            1,
            600_000,
        )?;
        in_range(
            "control.mailbox_capacity",
            c.mailbox_capacity as u64,
            1,
            1 << 20,
        )?;
        in_range(
            "control.events_capacity",
            c.events_capacity as u64,
            1,
            1 << 22,
        )?;
        in_range("control.worker_stall_ms", c.worker_stall_ms, 100, 600_000)?;

        // [console]
        if sockets_collide(self.console.listen, self.control.listen) {
            return Err(invalid(
                "console.listen",
                format!(
                    "{} collides with control.listen {}",
                    self.console.listen, self.control.listen
                ),
            ));
        }
        if let Some(url) = &self.console.public_url {
            check_public_url(url).map_err(|m| invalid("console.public_url", m))?;
        }

        if let Some(dir) = &self.console.web_dir {
            if dir.as_os_str().is_empty() {
                return Err(invalid(
                    "console.web_dir",
                    "must not be empty (leave it out to serve no files)",
                ));
            }
        }

        // [ports]
        let p = &self.ports;
        let (first, last) = parse_port_range(&p.range).map_err(|m| invalid("ports.range", m))?;
        for (name, addr) in [
            ("console.listen", self.console.listen),
            ("control.listen", self.control.listen),
        ] {
            if (first..=last).contains(&addr.port()) {
                return Err(invalid(
                    "ports.range",
                    format!("{first}-{last} contains the {name} port {}", addr.port()),
                ));
            }
        }
        if let Some(dir) = &p.state_dir {
            if !dir.is_absolute() {
                return Err(invalid(
                    "ports.state_dir",
                    format!("{} must be an absolute path", dir.display()),
                ));
            }
        }
        in_range(
            "ports.external_retry_ms",
            p.external_retry_ms,
            1,
            86_400_000,
        )?;
        in_range(
            "ports.max_bind_attempts",
            u64::from(p.max_bind_attempts),
            1,
            65_535,
        )?;
        in_range(
            "ports.cleanup_interval_ms",
            p.cleanup_interval_ms,
            1,
            86_400_000,
        )?;

        // [auth]
        for (i, t) in self.auth.tokens.iter().enumerate() {
            check_token_source(i, t)?;
            if t.role == Role::Viewer {
                return Err(invalid(
                    format!("auth.tokens[{i}].role"),
                    "viewer is a user's role: it comes from a JWT (a static token has no user)",
                ));
            }
        }
        self.check_duplicate_tokens()?;
        self.auth.jwt.validate()?;

        // [dataplane]
        let d = &self.dataplane;
        in_range("dataplane.workers", d.workers as u64, 0, 4096)?;
        // The data plane's own rules, run through `ProxyConfig::validate` so
        // the two modes can never disagree on what a valid limit is.
        let probe = ProxyConfig {
            listen: self.console.listen,
            target: TargetConfig::Fixed(crate::mailbox::Target::vnc(self.console.listen, None)),
            tls: None,
            web_dir: None,
            origins: Vec::new(),
            workers: d.workers,
            io: d.io,
            pin_workers: d.pin_workers,
            limits: d.limits.clone(),
        };
        if let Err(e) = probe.validate() {
            #[allow(unreachable_patterns)]
            return Err(match e {
                ConfigError::Invalid { key, message } => {
                    invalid(format!("dataplane.limits.{key}"), message)
                }
                other => invalid("dataplane.limits", other.to_string()),
            });
        }

        // [sessions]
        let s = &self.sessions;
        in_range("sessions.ticket_ttl_ms", s.ticket_ttl_ms, 1, 86_400_000)?;
        self.validate_viewers()?;
        self.network.validate()?;
        self.events.validate()?;
        if s.ticket_bytes < 16 {
            return Err(invalid("sessions.ticket_bytes", "must be ≥ 16 (128 bits)"));
        }
        in_range("sessions.ticket_bytes", s.ticket_bytes as u64, 16, 64)?;
        if let Some(o) = &s.portal_origin {
            check_origin(o).map_err(|m| invalid("sessions.portal_origin", m))?;
        }
        if s.target_networks.len() > MAX_TARGET_NETWORKS {
            return Err(invalid(
                "sessions.target_networks",
                format!("at most {MAX_TARGET_NETWORKS} networks"),
            ));
        }
        self.target_networks()?;

        // [demo]
        let m = &self.demo;
        in_range("demo.width", u64::from(m.width), 16, 8192)?;
        in_range("demo.height", u64::from(m.height), 16, 8192)?;
        in_range("demo.frame_interval_ms", m.frame_interval_ms, 10, 60_000)?;
        in_range("demo.max_clients", m.max_clients as u64, 1, 10_000)?;
        if let Some(pw) = &m.password {
            // RFB's VNC authentication keys DES with the first 8 bytes; a
            // longer password would be silently truncated by real servers.
            if pw.is_empty() || pw.len() > 8 {
                return Err(invalid(
                    "demo.password",
                    format!("must be 1 to 8 bytes ({})", pw.len()),
                ));
            }
        }

        // [log]
        let level = self.log.level.trim();
        // A bare word is a target name to EnvFilter, so `inf` would silently
        // mean "everything from target inf": bare words must be levels.
        if !level.contains(['=', ',', '[']) {
            const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
            if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
                return Err(invalid(
                    "log.level",
                    format!("{level:?} is not a level (trace, debug, info, warn, error, off) or a filter like \"info,consolegate=debug\""),
                ));
            }
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(level) {
            return Err(invalid(
                "log.level",
                format!("{:?} is not a level or filter: {e}", self.log.level),
            ));
        }

        // [service]
        in_range(
            "service.upgrade_drain_deadline_ms",
            self.service.upgrade_drain_deadline_ms,
            0,
            7 * 86_400_000,
        )?;
        in_range(
            "service.handoff_timeout_ms",
            self.service.handoff_timeout_ms,
            1_000,
            600_000,
        )?;

        // [tls]
        if let Some(t) = &self.tls {
            if t.cert.as_os_str().is_empty() {
                return Err(invalid("tls.cert", "must not be empty"));
            }
            if t.key.as_os_str().is_empty() {
                return Err(invalid("tls.key", "must not be empty"));
            }
        }
        self.validate_hypervisors()
    }

    /// `[[hypervisors]]`, `[queue]`, `[cache]`, `[operations]`.
    fn validate_hypervisors(&self) -> Result<(), ConfigFileError> {
        if self.hypervisors.len() > MAX_HYPERVISORS {
            return Err(invalid(
                "hypervisors",
                format!("at most {MAX_HYPERVISORS} hypervisors"),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, h) in self.hypervisors.iter().enumerate() {
            let key = format!("hypervisors[{i}] ({})", h.id());
            h.validate().map_err(|m| invalid(&key, m))?;
            if !seen.insert(h.id()) {
                return Err(invalid(&key, "the id appears twice"));
            }
            if matches!(h, HypervisorConfig::Demo(_)) && !self.demo.enabled {
                return Err(invalid(&key, "kind demo needs [demo] enabled = true"));
            }
            self.queue
                .for_hypervisor(h.max_concurrent())
                .validate()
                .map_err(|m| invalid(&key, m))?;
        }
        self.queue
            .for_hypervisor(crate::hypervisor::queue::DEFAULT_MAX_CONCURRENT)
            .validate()
            .map_err(|m| invalid("queue", m))?;
        self.cache.validate().map_err(|m| invalid("cache", m))?;
        self.operations
            .validate()
            .map_err(|m| invalid("operations", m))
    }

    /// The hypervisors to start: those configured, or with none and the
    /// demo console on, the demo console as hypervisor `demo`.
    pub fn effective_hypervisors(&self) -> Vec<HypervisorConfig> {
        if self.hypervisors.is_empty() && self.demo.enabled {
            return vec![HypervisorConfig::Demo(DemoHypervisorConfig::implicit())];
        }
        self.hypervisors.clone()
    }

    /// What the fleet is configured with besides the hypervisors.
    pub fn fleet_settings(&self) -> FleetSettings {
        FleetSettings {
            queue: self.queue,
            cache: self.cache,
            operations: self.operations,
        }
    }

    /// No two tokens alike (those from files and credentials count once
    /// [`resolve_secrets`](Self::resolve_secrets) read them). The message
    /// names the other entry, never the value.
    pub fn check_duplicate_tokens(&self) -> Result<(), ConfigFileError> {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, t) in self.auth.tokens.iter().enumerate() {
            if t.token.is_empty() {
                continue;
            }
            if let Some(j) = seen.insert(t.token.as_str(), i) {
                return Err(invalid(
                    format!("auth.tokens[{i}].token"),
                    format!("duplicate of auth.tokens[{j}]"),
                ));
            }
        }
        Ok(())
    }

    /// Whether an admin token is configured (inline, in a file or as a
    /// credential, read or not).
    pub fn has_admin_token(&self) -> bool {
        self.auth.tokens.iter().any(|t| t.role == Role::Admin)
    }

    /// When no admin token is configured (the built-in default has none),
    /// generate one from the OS RNG (32 bytes, hex), add it, and return it
    /// so the caller prints it once. `None` when an admin token exists.
    pub fn ensure_admin_token(&mut self) -> Option<String> {
        if self.auth.tokens.iter().any(|t| t.role == Role::Admin) {
            return None;
        }
        let mut bytes = [0u8; GENERATED_TOKEN_BYTES];
        // The OS RNG only fails on a broken system (no getrandom syscall and
        // no /dev/urandom); starting without an admin token is not an option.
        getrandom::fill(&mut bytes).expect("the OS random number generator failed");
        let token = hex(&bytes);
        self.auth
            .tokens
            .push(TokenConfig::new(token.clone(), Role::Admin));
        Some(token)
    }

    /// Pick the state directory: `ports.state_dir` when set (it must be
    /// writable), else the first writable of `/var/lib/consolegate`,
    /// `$XDG_STATE_HOME/consolegate` / `~/.local/state/consolegate`, and a
    /// directory under the temporary directory. Creates the directory, stores
    /// the choice in `ports.state_dir` and reports how it was chosen.
    pub fn resolve_state_dir(&mut self) -> Result<StateDirChoice, ConfigFileError> {
        let candidates = match &self.ports.state_dir {
            Some(dir) => vec![(dir.clone(), StateDirOrigin::Configured)],
            None => default_state_dirs(|k| std::env::var_os(k)),
        };
        let choice = choose_state_dir(&candidates).map_err(|m| invalid("ports.state_dir", m))?;
        self.ports.state_dir = Some(choice.path.clone());
        Ok(choice)
    }

    /// `ports.range` as `(first, last)`, inclusive. Call after
    /// [`validate`](Self::validate); an invalid range yields the default.
    pub fn port_range(&self) -> (u16, u16) {
        parse_port_range(&self.ports.range).unwrap_or((6100, 6999))
    }

    /// The base URL browsers are told to use: `console.public_url` without a
    /// trailing slash, or `ws[s]://{console.listen}` (`localhost` when
    /// listening on all interfaces).
    pub fn public_url(&self) -> String {
        self.public_url_with(self.console.listen)
    }

    /// Legal but doubtful combinations, for the caller to log once logging
    /// is set up (printed by `check-config`). Validation itself logs
    /// nothing: it runs before the log subscriber exists.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        match &self.console.public_url {
            Some(url) if self.tls.is_some() && url.starts_with("ws://") => w.push(
                "console.public_url is ws:// but [tls] is set: browsers will be told to \
                 connect without TLS to a TLS port"
                    .to_string(),
            ),
            // Legal (public_url_with can use the bound address), but the
            // URL is only right for browsers on this host.
            None if self.console.listen.ip().is_unspecified() => w.push(format!(
                "console.listen is {} and console.public_url is unset: ws_url will name \
                 localhost; set console.public_url to the name browsers use",
                self.console.listen
            )),
            _ => {}
        }
        w.extend(self.viewers_warnings());
        if self.tls.as_ref().is_some_and(|t| t.allow_plain) {
            w.push(
                "tls.allow_plain is on: tickets may cross the network in clear on the \
                 console port"
                    .to_string(),
            );
        }
        w
    }

    /// The origin sessions are bound to when created without one (see
    /// `sessions.portal_origin`): the configured one, else the console's
    /// own web origin when it serves files (noVNC), else none.
    pub fn default_origin(&self, public_url: &str) -> Option<String> {
        if let Some(o) = &self.sessions.portal_origin {
            return Some(o.trim_end_matches('/').to_string());
        }
        self.console.web_dir.as_ref()?;
        let (scheme, rest) = public_url.split_once("://")?;
        let scheme = if scheme == "wss" { "https" } else { "http" };
        let host = rest.split('/').next().unwrap_or(rest);
        Some(format!("{scheme}://{host}"))
    }

    /// `sessions.target_networks`, parsed.
    pub fn target_networks(&self) -> Result<Vec<ipnet::IpNet>, ConfigFileError> {
        self.sessions
            .target_networks
            .iter()
            .enumerate()
            .map(|(i, n)| {
                n.trim().parse::<ipnet::IpNet>().map_err(|e| {
                    invalid(
                        format!("sessions.target_networks[{i}]"),
                        format!("{n:?} is not a network in CIDR form (10.0.0.0/8): {e}"),
                    )
                })
            })
            .collect()
    }

    /// [`public_url`](Self::public_url) derived from the address the console
    /// port is actually bound to: use it when `console.listen` has port 0
    /// (ephemeral ports, as the tests use).
    pub fn public_url_with(&self, bound: SocketAddr) -> String {
        if let Some(url) = &self.console.public_url {
            return url.trim_end_matches('/').to_string();
        }
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        let addr = bound;
        if addr.ip().is_unspecified() {
            format!("{scheme}://localhost:{}", addr.port())
        } else {
            // SocketAddr's Display brackets IPv6 as URLs need.
            format!("{scheme}://{addr}")
        }
    }

    /// The address dedicated per-session listeners bind.
    pub fn dedicated_listen_ip(&self) -> IpAddr {
        self.ports.listen_ip.unwrap_or(self.console.listen.ip())
    }

    /// Worker threads to start: `dataplane.workers`, or one per core.
    pub fn worker_count(&self) -> usize {
        match self.dataplane.workers {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        }
    }

    /// A human-readable summary for `consolegate check-config`: the derived
    /// values, then the effective config as TOML with tokens redacted.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let (first, last) = self.port_range();
        let derived = if self.console.public_url.is_some() {
            ""
        } else {
            " (derived from console.listen)"
        };
        let _ = writeln!(out, "# effective configuration");
        let _ = writeln!(out, "# control API:        http://{}", self.control.listen);
        let _ = writeln!(
            out,
            "# console WebSockets: {}/proxy/{{session_id}}{derived}",
            self.public_url()
        );
        let _ = writeln!(
            out,
            "# dedicated ports:    {}:{first}-{last} ({} ports)",
            self.dedicated_listen_ip(),
            u32::from(last) - u32::from(first) + 1
        );
        let state = match &self.ports.state_dir {
            Some(d) => d.display().to_string(),
            None => {
                "chosen at start (/var/lib/consolegate if writable, else per-user, else temporary)"
                    .into()
            }
        };
        let _ = writeln!(out, "# state directory:    {state}");
        let hypervisors: Vec<String> = self
            .effective_hypervisors()
            .iter()
            .map(|h| format!("{} ({})", h.id(), h.kind()))
            .collect();
        let _ = writeln!(
            out,
            "# hypervisors:        {}",
            if hypervisors.is_empty() {
                "none".to_string()
            } else {
                hypervisors.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "# workers:            {} ({})",
            self.worker_count(),
            if self.dataplane.workers == 0 {
                "one per core"
            } else {
                "configured"
            }
        );
        let admins = self
            .auth
            .tokens
            .iter()
            .filter(|t| t.role == Role::Admin)
            .count();
        let _ = writeln!(
            out,
            "# tokens:             {} admin, {} read{}",
            admins,
            self.auth.tokens.len() - admins,
            if admins == 0 {
                " (none: generated at start without a config file; with one, start is refused)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "# tls:                {}",
            if self.tls.is_some() {
                "on (wss)"
            } else {
                "off (ws)"
            }
        );
        out.push('\n');
        let mut shown = self.clone();
        for t in &mut shown.auth.tokens {
            if !t.token.is_empty() {
                t.token = format!("<redacted, {} chars>", t.token.len());
            }
        }
        if let Some(pw) = &mut shown.demo.password {
            *pw = format!("<redacted, {} chars>", pw.len());
        }
        match toml::to_string_pretty(&shown) {
            Ok(s) => out.push_str(&s),
            Err(e) => {
                let _ = writeln!(out, "# (cannot render as TOML: {e})");
            }
        }
        out
    }
}

fn in_range(key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigFileError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("{value} is out of range: must be between {min} and {max}"),
        ));
    }
    Ok(())
}

/// Two listen addresses collide when their ports match and their IPs are
/// equal or either is a wildcard (which binds every address).
fn sockets_collide(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let shape = || format!("{s:?} is not FIRST-LAST like \"6100-6999\"");
    let (a, b) = s.split_once('-').ok_or_else(shape)?;
    let first: u16 = a.trim().parse().map_err(|_| shape())?;
    let last: u16 = b.trim().parse().map_err(|_| shape())?;
    if first == 0 {
        return Err("port 0 is not a port (first must be ≥ 1)".into());
    }
    if first > last {
        return Err(format!("first > last ({first} > {last})"));
    }
    Ok((first, last))
}

fn check_public_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("wss://")
        .or_else(|| url.strip_prefix("ws://"))
        .ok_or_else(|| format!("must start with ws:// or wss:// (got {url:?})"))?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) || url.contains(['?', '#']) {
        // It is a base: `/proxy/{id}` is appended to it.
        return Err(format!(
            "{url:?} must be a plain base URL (no spaces, query or fragment)"
        ));
    }
    Ok(())
}

/// An Origin as browsers send it: `scheme://host[:port]`, nothing after.
pub fn check_origin(origin: &str) -> Result<(), String> {
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(|| format!("must start with http:// or https:// (got {origin:?})"))?;
    let host = rest.trim_end_matches('/');
    if host.is_empty()
        || host.contains(['/', '?', '#', '@'])
        || origin.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{origin:?} is not an origin (scheme://host[:port], no path)"
        ));
    }
    Ok(())
}

/// `auth.tokens[i]` names exactly one source, in a usable form; an inline
/// token follows [`check_token`].
fn check_token_source(i: usize, t: &TokenConfig) -> Result<(), ConfigFileError> {
    let sources = usize::from(!t.token.is_empty())
        + usize::from(t.token_file.is_some())
        + usize::from(t.credential.is_some());
    if sources != 1 {
        return Err(invalid(
            format!("auth.tokens[{i}]"),
            "give exactly one of token, token_file and credential",
        ));
    }
    if !t.token.is_empty() {
        return check_token(&t.token).map_err(|m| invalid(format!("auth.tokens[{i}].token"), m));
    }
    if let Some(path) = &t.token_file {
        if !path.is_absolute() {
            return Err(invalid(
                format!("auth.tokens[{i}].token_file"),
                format!("{} must be an absolute path", path.display()),
            ));
        }
    }
    if let Some(name) = &t.credential {
        check_credential_name(name)
            .map_err(|m| invalid(format!("auth.tokens[{i}].credential"), m))?;
    }
    Ok(())
}

/// A systemd credential name: a plain file name in `$CREDENTIALS_DIRECTORY`.
pub fn check_credential_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a credential name (letters, digits, - _ . @; no slash)"
        ))
    }
}

/// Token rules shared by the file, token files, credentials and
/// `CONSOLEGATE_AUTH_TOKEN`. Messages never contain the token.
pub fn check_token(token: &str) -> Result<(), String> {
    let n = token.chars().count();
    if n < MIN_TOKEN_CHARS {
        return Err(format!("shorter than {MIN_TOKEN_CHARS} characters ({n})"));
    }
    if n > MAX_TOKEN_CHARS {
        return Err(format!("longer than {MAX_TOKEN_CHARS} characters ({n})"));
    }
    // Tokens travel in an HTTP header: printable ASCII without spaces.
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".into());
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The default state directories in order of preference. `var` reads the
/// environment (a parameter so tests need not touch the process env).
fn default_state_dirs(
    var: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Vec<(PathBuf, StateDirOrigin)> {
    let mut v = vec![(PathBuf::from(SYSTEM_STATE_DIR), StateDirOrigin::System)];
    let abs = |k: &str| var(k).map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(x) = abs("XDG_STATE_HOME") {
        v.push((x.join("consolegate"), StateDirOrigin::User));
    } else if let Some(h) = abs("HOME") {
        v.push((h.join(".local/state/consolegate"), StateDirOrigin::User));
    }
    // Per user, so two users on one host do not fight over one directory.
    let user = var("USER").and_then(|u| u.into_string().ok()).filter(|u| {
        !u.is_empty()
            && u.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    });
    let name = match user {
        Some(u) => format!("consolegate-{u}"),
        None => "consolegate".to_string(),
    };
    v.push((std::env::temp_dir().join(name), StateDirOrigin::Temporary));
    v
}

/// The first candidate that can be created and written to.
fn choose_state_dir(candidates: &[(PathBuf, StateDirOrigin)]) -> Result<StateDirChoice, String> {
    let mut tried = Vec::new();
    for (path, origin) in candidates {
        let probed = match origin {
            // Under the shared temporary directory anyone may have made the
            // name first (a symlink, or a directory of theirs).
            StateDirOrigin::Temporary => probe_private_dir(path),
            _ => probe_writable(path),
        };
        match probed {
            Ok(()) => {
                return Ok(StateDirChoice {
                    path: path.clone(),
                    origin: *origin,
                })
            }
            Err(e) => tried.push(format!("{}: {e}", path.display())),
        }
    }
    Err(format!(
        "no writable state directory ({})",
        tried.join("; ")
    ))
}

/// A state directory in a place other users can write to (the temporary
/// directory): it must be a real directory (not a symlink), owned by this
/// user, writable by nobody else; created with mode 0700 when missing.
fn probe_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.file_type().is_dir() {
        return Err(std::io::Error::other(
            "exists and is not a directory (a symlink?): refused",
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::other("writable by other users: refused"));
    }
    // Our own uid, without unsafe: the owner of a file we just created.
    let probe = dir.join(format!(".owner-probe-{}", std::process::id()));
    let ours = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .and_then(|f| f.metadata())
        .map(|m| m.uid());
    let _ = std::fs::remove_file(&probe);
    if ours? != meta.uid() {
        return Err(std::io::Error::other("owned by another user: refused"));
    }
    Ok(())
}

fn probe_writable(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Permission bits lie for root and for read-only mounts; writing a file
    // is the only reliable test.
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

// ---- environment overrides -------------------------------------------------

/// What an environment value is parsed as before the schema check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Integer,
    Bool,
    String,
    /// A list of strings, given comma-separated.
    StringList,
    NotSettable,
}

/// Keys that are absent from the serialized defaults because they are
/// optional; all are strings in TOML.
const OPTIONAL_KEYS: &[&[&str]] = &[
    &["console", "public_url"],
    &["console", "web_dir"],
    &["demo", "password"],
    &["ports", "state_dir"],
    &["ports", "listen_ip"],
    &["tls", "cert"],
    &["tls", "key"],
    &["sessions", "portal_origin"],
    &["auth", "jwt", "hs256_secret_file"],
    &["auth", "jwt", "public_key_file"],
    &["auth", "jwt", "issuer"],
    &["auth", "jwt", "audience"],
];

/// The defaults as a TOML table, with the optional keys added as strings:
/// the set of keys an environment variable may name, and their types. Built
/// from the structs so a new field (in `Limits` too) is overridable at once.
fn schema() -> toml::Table {
    let mut t = to_table(&ApplianceConfig::default());
    for path in OPTIONAL_KEYS {
        set_path(&mut t, path, toml::Value::String(String::new()));
    }
    set_path(&mut t, &["tls", "allow_plain"], toml::Value::Boolean(false));
    // Empty by default, a list of strings all the same.
    set_path(
        &mut t,
        &["network", "trusted_proxies"],
        toml::Value::Array(vec![toml::Value::String(String::new())]),
    );
    // The moved `[sessions]` pool keys (optional integers).
    for key in ["max_sessions", "max_sessions_per_user"] {
        set_path(&mut t, &["sessions", key], toml::Value::Integer(0));
    }
    t
}

fn to_table<T: Serialize>(v: &T) -> toml::Table {
    match toml::Value::try_from(v) {
        Ok(toml::Value::Table(t)) => t,
        // All our config structs serialize to tables.
        _ => toml::Table::new(),
    }
}

fn set_path(t: &mut toml::Table, path: &[impl AsRef<str>], value: toml::Value) {
    let (last, parents) = path.split_last().expect("non-empty key path");
    let mut cur = t;
    for p in parents {
        let entry = cur
            .entry(p.as_ref().to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        cur = entry.as_table_mut().expect("made a table above");
    }
    cur.insert(last.as_ref().to_string(), value);
}

/// Map `sessions_ticket_ttl_ms` to `["sessions", "ticket_ttl_ms"]` by
/// walking the schema: at each level a leaf whose name is the whole rest, or
/// a table whose name plus `_` prefixes it.
fn resolve_env_key(t: &toml::Table, name: &str) -> Option<(Vec<String>, Kind)> {
    for (k, v) in t {
        if let toml::Value::Table(inner) = v {
            if let Some(rest) = name
                .strip_prefix(k.as_str())
                .and_then(|r| r.strip_prefix('_'))
            {
                if let Some((mut path, kind)) = resolve_env_key(inner, rest) {
                    path.insert(0, k.clone());
                    return Some((path, kind));
                }
            }
        } else if k == name {
            let kind = match v {
                toml::Value::Integer(_) => Kind::Integer,
                toml::Value::Boolean(_) => Kind::Bool,
                toml::Value::String(_) => Kind::String,
                // Non-empty: `auth.tokens` (empty by default) is a list of tables.
                toml::Value::Array(a) if !a.is_empty() && a.iter().all(toml::Value::is_str) => {
                    Kind::StringList
                }
                _ => Kind::NotSettable,
            };
            return Some((vec![k.clone()], kind));
        }
    }
    None
}

/// An example appended to serde's terse messages for string-typed keys.
fn hint(key: &str) -> &'static str {
    if key.ends_with(".listen") {
        " (expected an address like 127.0.0.1:8080)"
    } else if key.ends_with(".listen_ip") {
        " (expected an IP address like 0.0.0.0)"
    } else {
        ""
    }
}

// ---- parse errors ----------------------------------------------------------

/// `key.path (line L, column C): message` from a toml error. toml reports a
/// byte span; the key path is found by re-parsing the document into its
/// spanned form and locating the entry that holds the span.
fn describe_toml_error(input: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.to_string().trim_end().to_string();
    };
    let (line, col) = line_col(input, span.start);
    let key = toml::de::DeTable::parse(input)
        .ok()
        .and_then(|doc| key_at(doc.get_ref(), &span, ""));
    let msg = e.message().trim_end();
    match key {
        Some(k) => format!("{k} (line {line}, column {col}): {msg}"),
        None => format!("line {line}, column {col}: {msg}"),
    }
}

fn line_col(input: &str, offset: usize) -> (usize, usize) {
    let before = &input[..offset.min(input.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn covers(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end && outer.start < outer.end
}

/// The deepest key path whose key or value span covers `span`.
fn key_at(t: &toml::de::DeTable<'_>, span: &Range<usize>, prefix: &str) -> Option<String> {
    for (k, v) in t.iter() {
        let here = if prefix.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{prefix}.{}", k.get_ref())
        };
        match v.get_ref() {
            toml::de::DeValue::Table(inner) => {
                if let Some(p) = key_at(inner, span, &here) {
                    return Some(p);
                }
            }
            toml::de::DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let here_i = format!("{here}[{i}]");
                    if let toml::de::DeValue::Table(inner) = item.get_ref() {
                        if let Some(p) = key_at(inner, span, &here_i) {
                            return Some(p);
                        }
                    }
                    if covers(&item.span(), span) {
                        return Some(here_i);
                    }
                }
            }
            _ => {}
        }
        if covers(&k.span(), span) || covers(&v.span(), span) {
            return Some(here);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKAGED: &str = include_str!("../../packaging/consolegate.toml");
    const TOKEN_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const TOKEN_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse_err(s: &str) -> String {
        match ApplianceConfig::from_toml_str(s) {
            Err(e @ ConfigFileError::Parse { .. }) => e.to_string(),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    fn env_err(cfg: &mut ApplianceConfig, pairs: &[(&str, &str)]) -> (String, String) {
        match cfg.apply_env(env(pairs)) {
            Err(ConfigFileError::Env { var, message }) => (var, message),
            other => panic!("expected an env error, got {other:?}"),
        }
    }

    fn invalid_key(cfg: &ApplianceConfig) -> String {
        match cfg.validate() {
            Err(ConfigFileError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid-value error, got {other:?}"),
        }
    }

    fn as_value(cfg: &ApplianceConfig) -> toml::Value {
        toml::Value::try_from(cfg).unwrap()
    }

    #[test]
    fn built_in_default_is_a_working_loopback_appliance() {
        let c = ApplianceConfig::default();
        c.validate().unwrap();
        assert_eq!(c.control.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.console.listen, "127.0.0.1:6080".parse().unwrap());
        assert_eq!(c.public_url(), "ws://127.0.0.1:6080");
        assert_eq!(c.port_range(), (6100, 6999));
        assert_eq!(c.dedicated_listen_ip(), IpAddr::from(Ipv4Addr::LOCALHOST));
        assert!(c.demo.enabled);
        assert!(c.auth.tokens.is_empty());
        assert!(c.ports.state_dir.is_none());
        assert!(c.worker_count() >= 1);
        // An empty file is the same as no file.
        let empty = ApplianceConfig::from_toml_str("").unwrap();
        assert_eq!(as_value(&empty), as_value(&c));
    }

    #[test]
    fn packaged_file_parses_validates_and_equals_the_defaults() {
        let mut c = ApplianceConfig::from_toml_str(PACKAGED).unwrap();
        c.validate().unwrap();
        // The deliberate differences (production defaults), documented in
        // the file's header.
        assert_eq!(
            c.ports.state_dir.as_deref(),
            Some(Path::new(SYSTEM_STATE_DIR))
        );
        c.ports.state_dir = None;
        assert!(!c.demo.enabled);
        c.demo.enabled = true;
        assert_eq!(c.auth.tokens.len(), 1);
        assert_eq!(c.auth.tokens[0].credential.as_deref(), Some("admin-token"));
        assert_eq!(c.auth.tokens[0].role, Role::Admin);
        c.auth.tokens.clear();
        assert_eq!(as_value(&c), as_value(&ApplianceConfig::default()));
    }

    #[test]
    fn packaged_file_shows_every_key() {
        fn walk(t: &toml::Table, prefix: &str, out: &mut Vec<String>) {
            for (k, v) in t {
                match v {
                    toml::Value::Table(inner) => walk(inner, &format!("{prefix}{k}."), out),
                    _ => out.push(format!("{prefix}{k}")),
                }
            }
        }
        let mut keys = Vec::new();
        walk(&schema(), "", &mut keys);
        assert!(keys.len() > 40, "{keys:?}");
        // Present keys must be in their section; optional ones shown commented.
        let file: toml::Table = toml::from_str(PACKAGED).unwrap();
        for key in keys {
            let path: Vec<&str> = key.split('.').collect();
            let (leaf, sections) = path.split_last().unwrap();
            let section = sections
                .iter()
                .try_fold(&file, |t, p| t.get(*p).and_then(|v| v.as_table()));
            let in_file = section.is_some_and(|t| t.contains_key(*leaf));
            let commented = PACKAGED.contains(&format!("# {leaf} = "));
            assert!(in_file || commented, "packaged file lacks {key}");
        }
    }

    #[test]
    fn load_sources() {
        let dir = tempfile::tempdir().unwrap();
        let default_path = dir.path().join("consolegate.toml");
        // No path: built-in.
        let (_, src) = ApplianceConfig::load_from(None, &default_path).unwrap();
        assert_eq!(src, Source::BuiltIn);
        // The default path missing: built-in, with a note.
        let (c, src) = ApplianceConfig::load_from(Some(&default_path), &default_path).unwrap();
        assert_eq!(src, Source::DefaultFileMissing(default_path.clone()));
        assert!(src.to_string().contains("not found"), "{src}");
        assert!(c.demo.enabled);
        // Another missing path: an error that says so.
        let other = dir.path().join("other.toml");
        let e = ApplianceConfig::load_from(Some(&other), &default_path).unwrap_err();
        assert!(matches!(e, ConfigFileError::Read { .. }), "{e:?}");
        let m = e.to_string();
        assert!(
            m.contains("other.toml") && m.contains("No such file"),
            "{m}"
        );
        // A file.
        std::fs::write(&other, "[dataplane]\nworkers = 3\n").unwrap();
        let (c, src) = ApplianceConfig::load_from(Some(&other), &default_path).unwrap();
        assert_eq!(src, Source::File(other.clone()));
        assert_eq!(c.dataplane.workers, 3);
        // A parse error names the file.
        std::fs::write(&other, "[dataplane]\nworkerz = 3\n").unwrap();
        let m = ApplianceConfig::load_from(Some(&other), &default_path)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("other.toml") && m.contains("dataplane.workerz"),
            "{m}"
        );
        // The public entry point reads a real file too.
        std::fs::write(&other, PACKAGED).unwrap();
        let (_, src) = ApplianceConfig::load(Some(&other)).unwrap();
        assert_eq!(src, Source::File(other.clone()));
        // Too large.
        std::fs::write(&other, vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let m = ApplianceConfig::load_from(Some(&other), &default_path)
            .unwrap_err()
            .to_string();
        assert!(m.contains("larger than"), "{m}");
    }

    #[test]
    fn hypervisors_survive_environment_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "[[hypervisors]]\nkind = \"static\"\nid = \"lab\"\n\
             vms = [{ id = \"a\", host = \"127.0.0.1\", port = 5900 }]\n",
        )
        .unwrap();
        let (c, _) = ApplianceConfig::load_with_env(
            Some(&p),
            [("CONSOLEGATE_DATAPLANE_WORKERS".to_string(), "2".to_string())],
        )
        .unwrap();
        assert_eq!(c.dataplane.workers, 2);
        let ids: Vec<&str> = c.hypervisors.iter().map(|h| h.id()).collect();
        assert_eq!(ids, ["lab"]);
    }

    #[test]
    fn load_with_env_overrides_then_validates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[dataplane]\nworkers = 3\n").unwrap();
        let (c, _) = ApplianceConfig::load_with_env(
            Some(&p),
            env(&[("CONSOLEGATE_DATAPLANE_WORKERS", "5")]),
        )
        .unwrap();
        assert_eq!(c.dataplane.workers, 5);
        let e = ApplianceConfig::load_with_env(
            Some(&p),
            env(&[("CONSOLEGATE_SESSIONS_TICKET_BYTES", "8")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("sessions.ticket_bytes"), "{e}");
    }

    #[test]
    fn file_errors_name_the_key_and_line() {
        let m = parse_err("[control]\nlisten = \"127.0.0.1:8080\"\nbogus = 1\n");
        assert!(m.contains("control.bogus") && m.contains("line 3"), "{m}");
        assert!(m.contains("unknown field"), "{m}");
        let m = parse_err("[nosuchsection]\nx = 1\n");
        assert!(m.contains("nosuchsection"), "{m}");
        let m = parse_err("[dataplane.limits]\nbuffer_bytes = 4096\nidle_timeout = 5\n");
        assert!(
            m.contains("dataplane.limits.idle_timeout") && m.contains("line 3"),
            "{m}"
        );
        let m = parse_err("[control]\nlisten = \"nope\"\n");
        assert!(m.contains("control.listen") && m.contains("line 2"), "{m}");
        let m = parse_err("[dataplane]\nworkers = \"four\"\n");
        assert!(m.contains("dataplane.workers"), "{m}");
        let m = parse_err("[dataplane]\nio = \"kqueue\"\n");
        assert!(m.contains("dataplane.io") && m.contains("epoll"), "{m}");
        let m = parse_err(&format!(
            "[[auth.tokens]]\ntoken = \"{TOKEN_A}\"\nrole = \"admin\"\n[[auth.tokens]]\ntoken = \"{TOKEN_B}\"\nrole = \"root\"\n"
        ));
        assert!(
            m.contains("auth.tokens[1].role") && m.contains("admin") && m.contains("read"),
            "{m}"
        );
        let m = parse_err("[tls]\ncert = \"/c.pem\"\n");
        assert!(m.contains("tls") && m.contains("key"), "{m}");
        let m = parse_err("[log]\nformat = \"xml\"\n");
        assert!(m.contains("log.format"), "{m}");
        // Syntax errors still give the line.
        let m = parse_err("[control]\nlisten = \n");
        assert!(m.contains("line 2"), "{m}");
        // Token values never show up in an error about their entry.
        let m = parse_err(&format!(
            "[[auth.tokens]]\ntoken = \"{TOKEN_A}\"\nrole = \"x\"\n"
        ));
        assert!(!m.contains(TOKEN_A), "{m}");
    }

    #[test]
    fn file_values_are_read() {
        let c = ApplianceConfig::from_toml_str(&format!(
            r#"
            [control]
            listen = "127.0.0.1:9090"
            [console]
            listen = "0.0.0.0:6080"
            public_url = "wss://console.example.com/"
            [ports]
            range = "7000-7010"
            state_dir = "/srv/cg"
            listen_ip = "10.0.0.1"
            [[auth.tokens]]
            token = "{TOKEN_A}"
            role = "admin"
            [[auth.tokens]]
            token = "{TOKEN_B}"
            role = "read"
            [dataplane]
            workers = 2
            io = "epoll"
            pin_workers = false
            [dataplane.limits]
            idle_timeout_ms = 600000
            [sessions]
            ticket_ttl_ms = 30000
            [demo]
            enabled = false
            [log]
            format = "json"
            level = "info,consolegate=debug"
            [tls]
            cert = "/c.pem"
            key = "/k.pem"
            "#
        ))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.control.listen.port(), 9090);
        assert_eq!(c.public_url(), "wss://console.example.com");
        assert_eq!(c.port_range(), (7000, 7010));
        assert_eq!(
            c.dedicated_listen_ip(),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(c.auth.tokens[1].role, Role::Read);
        assert_eq!(c.dataplane.io, IoChoice::Epoll);
        assert!(!c.dataplane.pin_workers);
        assert_eq!(c.worker_count(), 2);
        assert_eq!(c.dataplane.limits.idle_timeout_ms, 600_000);
        // Unnamed limits keep their defaults.
        assert_eq!(
            c.dataplane.limits.buffer_bytes,
            Limits::default().buffer_bytes
        );
        assert_eq!(c.sessions.ticket_ttl_ms, 30_000);
        assert_eq!(c.sessions.ticket_bytes, 32);
        assert!(!c.demo.enabled);
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.tls.as_ref().unwrap().key, PathBuf::from("/k.pem"));
    }

    #[test]
    fn env_overrides_every_kind_of_key() {
        let mut c = ApplianceConfig::default();
        c.apply_env(env(&[
            ("PATH", "/usr/bin"),                      // not ours: ignored
            ("CONSOLEGATE_CONFIG", "/elsewhere.toml"), // reserved: ignored
            ("CONSOLEGATE_CONTROL_LISTEN", "127.0.0.1:9090"),
            ("CONSOLEGATE_DATAPLANE_WORKERS", "4"),
            ("CONSOLEGATE_DATAPLANE_IO", "epoll"),
            ("CONSOLEGATE_DATAPLANE_PIN_WORKERS", "false"),
            ("CONSOLEGATE_DATAPLANE_LIMITS_IDLE_TIMEOUT_MS", "600000"),
            ("CONSOLEGATE_DATAPLANE_LIMITS_Uring_Entries", "1024"),
            ("CONSOLEGATE_SESSIONS_TICKET_TTL_MS", "30000"),
            ("CONSOLEGATE_SESSIONS_BIND_CLIENT_IP", "1"),
            ("CONSOLEGATE_DEMO_ENABLED", "false"),
            ("CONSOLEGATE_DEMO_PASSWORD", "s3cret"),
            ("CONSOLEGATE_CONSOLE_WEB_DIR", "/usr/share/novnc"),
            ("CONSOLEGATE_CONSOLE_PUBLIC_URL", "wss://c.example.com"),
            ("CONSOLEGATE_PORTS_RANGE", "7000-7099"),
            ("CONSOLEGATE_PORTS_LISTEN_IP", "::"),
            ("CONSOLEGATE_PORTS_STATE_DIR", "/srv/state"),
            ("CONSOLEGATE_LOG_FORMAT", "json"),
            ("CONSOLEGATE_LOG_LEVEL", "debug"),
            ("CONSOLEGATE_TLS_CERT", "/c.pem"),
            ("CONSOLEGATE_TLS_KEY", "/k.pem"),
            ("CONSOLEGATE_AUTH_TOKEN", TOKEN_A),
            ("CONSOLEGATE_AUTH_READ_TOKEN", TOKEN_B),
        ]))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.control.listen.port(), 9090);
        assert_eq!(c.dataplane.workers, 4);
        assert_eq!(c.dataplane.io, IoChoice::Epoll);
        assert!(!c.dataplane.pin_workers);
        assert_eq!(c.dataplane.limits.idle_timeout_ms, 600_000);
        assert_eq!(c.dataplane.limits.uring_entries, 1024);
        assert_eq!(c.sessions.ticket_ttl_ms, 30_000);
        assert!(c.sessions.bind_client_ip);
        assert!(!c.demo.enabled);
        assert_eq!(c.demo.password.as_deref(), Some("s3cret"));
        assert_eq!(
            c.console.web_dir.as_deref(),
            Some(Path::new("/usr/share/novnc"))
        );
        assert_eq!(c.public_url(), "wss://c.example.com");
        assert_eq!(c.port_range(), (7000, 7099));
        assert!(c.dedicated_listen_ip().is_unspecified());
        assert_eq!(c.ports.state_dir.as_deref(), Some(Path::new("/srv/state")));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, "debug");
        assert_eq!(c.tls.as_ref().unwrap().cert, PathBuf::from("/c.pem"));
        assert_eq!(c.auth.tokens.len(), 2);
        assert_eq!(
            (c.auth.tokens[0].token.as_str(), c.auth.tokens[0].role),
            (TOKEN_A, Role::Admin)
        );
        assert_eq!(
            (c.auth.tokens[1].token.as_str(), c.auth.tokens[1].role),
            (TOKEN_B, Role::Read)
        );
        // Env tokens add to those of the file.
        let mut c2 = c.clone();
        c2.apply_env(env(&[(
            "CONSOLEGATE_AUTH_TOKEN",
            "cccccccccccccccccccccccc",
        )]))
        .unwrap();
        assert_eq!(c2.auth.tokens.len(), 3);
        // An override of one key keeps the others, including [tls] from a file.
        c.apply_env(env(&[("CONSOLEGATE_TLS_KEY", "/k2.pem")]))
            .unwrap();
        assert_eq!(c.tls.as_ref().unwrap().cert, PathBuf::from("/c.pem"));
        assert_eq!(c.tls.as_ref().unwrap().key, PathBuf::from("/k2.pem"));
    }

    #[test]
    fn env_reaches_every_limit() {
        // Each Limits field, set to its default from the environment, round
        // trips: the mapping is derived from the struct, not a hand list.
        let schema = schema();
        let limits = schema["dataplane"]["limits"].as_table().unwrap();
        assert_eq!(limits.len(), 30);
        let vars: Vec<(String, String)> = limits
            .iter()
            .map(|(k, v)| {
                (
                    format!("CONSOLEGATE_DATAPLANE_LIMITS_{}", k.to_uppercase()),
                    v.to_string(),
                )
            })
            .collect();
        let mut c = ApplianceConfig::default();
        c.apply_env(vars).unwrap();
        assert_eq!(as_value(&c), as_value(&ApplianceConfig::default()));
    }

    #[test]
    fn env_errors_name_the_variable() {
        let mut c = ApplianceConfig::default();
        let before = as_value(&c);
        let (var, m) = env_err(&mut c, &[("CONSOLEGATE_CONTROL_LISTN", "127.0.0.1:1")]);
        assert_eq!(var, "CONSOLEGATE_CONTROL_LISTN");
        assert!(m.contains("no such setting"), "{m}");
        let (var, _) = env_err(&mut c, &[("CONSOLEGATE_WORKERS", "4")]);
        assert_eq!(var, "CONSOLEGATE_WORKERS");
        let (var, _) = env_err(&mut c, &[("CONSOLEGATE_DATAPLANE_LIMITS", "x")]);
        assert_eq!(var, "CONSOLEGATE_DATAPLANE_LIMITS");
        let (var, m) = env_err(&mut c, &[("CONSOLEGATE_DATAPLANE_WORKERS", "four")]);
        assert_eq!(var, "CONSOLEGATE_DATAPLANE_WORKERS");
        assert!(
            m.contains("dataplane.workers") && m.contains("integer"),
            "{m}"
        );
        let (_, m) = env_err(&mut c, &[("CONSOLEGATE_DATAPLANE_WORKERS", "-1")]);
        assert!(m.contains("dataplane.workers"), "{m}");
        let (_, m) = env_err(&mut c, &[("CONSOLEGATE_DEMO_ENABLED", "yes please")]);
        assert!(m.contains("true or false"), "{m}");
        let (var, m) = env_err(&mut c, &[("CONSOLEGATE_CONSOLE_LISTEN", "localhost")]);
        assert_eq!(var, "CONSOLEGATE_CONSOLE_LISTEN");
        assert!(
            m.contains("console.listen") && m.contains("127.0.0.1:8080"),
            "{m}"
        );
        let (_, m) = env_err(&mut c, &[("CONSOLEGATE_DATAPLANE_IO", "kqueue")]);
        assert!(m.contains("epoll"), "{m}");
        let (_, m) = env_err(&mut c, &[("CONSOLEGATE_AUTH_TOKENS", "x")]);
        assert!(m.contains("CONSOLEGATE_AUTH_TOKEN"), "{m}");
        let (var, m) = env_err(&mut c, &[("CONSOLEGATE_AUTH_TOKEN", "short-secret")]);
        assert_eq!(var, "CONSOLEGATE_AUTH_TOKEN");
        assert!(m.contains("16") && !m.contains("short-secret"), "{m}");
        let (var, m) = env_err(&mut c, &[("CONSOLEGATE_TLS_CERT", "/c.pem")]);
        assert!(
            var.contains("CONSOLEGATE_TLS_CERT") && m.contains("key"),
            "{var}: {m}"
        );
        // A half-set [tls] is not blamed on the variables after it.
        let mut c2 = ApplianceConfig::default();
        c2.apply_env(env(&[
            ("CONSOLEGATE_TLS_CERT", "/c.pem"),
            ("CONSOLEGATE_DATAPLANE_WORKERS", "2"),
            ("CONSOLEGATE_TLS_KEY", "/k.pem"),
        ]))
        .unwrap();
        assert_eq!(c2.dataplane.workers, 2);
        assert!(c2.tls.is_some());
        // A failure applies nothing, even the good variables before it.
        let _ = env_err(
            &mut c,
            &[
                ("CONSOLEGATE_DATAPLANE_WORKERS", "4"),
                ("CONSOLEGATE_DEMO_ENABLD", "false"),
            ],
        );
        assert_eq!(as_value(&c), before);
    }

    #[test]
    fn each_validation_rule_names_its_key() {
        type Edit = fn(&mut ApplianceConfig);
        let cases: &[(&str, Edit)] = &[
            ("control.max_request_bytes", |c| {
                c.control.max_request_bytes = 10
            }),
            ("control.request_timeout_ms", |c| {
                c.control.request_timeout_ms = 0
            }),
            ("control.mailbox_capacity", |c| {
                c.control.mailbox_capacity = 0
            }),
            ("control.events_capacity", |c| c.control.events_capacity = 0),
            ("console.listen", |c| {
                c.console.listen = "127.0.0.1:8080".parse().unwrap()
            }),
            ("console.listen", |c| {
                c.console.listen = "0.0.0.0:8080".parse().unwrap()
            }),
            ("console.public_url", |c| {
                c.console.public_url = Some("http://x:6080".into())
            }),
            ("console.public_url", |c| {
                c.console.public_url = Some("ws://".into())
            }),
            ("console.public_url", |c| {
                c.console.public_url = Some("ws://x/?a=b".into())
            }),
            ("ports.range", |c| c.ports.range = "6999-6100".into()),
            ("ports.range", |c| c.ports.range = "6100".into()),
            ("ports.range", |c| c.ports.range = "0-10".into()),
            ("ports.range", |c| c.ports.range = "6100-70000".into()),
            ("ports.range", |c| c.ports.range = "6000-6100".into()),
            ("ports.range", |c| c.ports.range = "8000-8100".into()),
            ("ports.state_dir", |c| {
                c.ports.state_dir = Some("relative/dir".into())
            }),
            ("ports.external_retry_ms", |c| c.ports.external_retry_ms = 0),
            ("ports.max_bind_attempts", |c| c.ports.max_bind_attempts = 0),
            ("ports.cleanup_interval_ms", |c| {
                c.ports.cleanup_interval_ms = 0
            }),
            ("auth.tokens[0].token", |c| {
                c.auth
                    .tokens
                    .push(TokenConfig::new("short".into(), Role::Admin))
            }),
            ("auth.tokens[0].token", |c| {
                c.auth
                    .tokens
                    .push(TokenConfig::new("has a space in it ok".into(), Role::Admin))
            }),
            ("auth.tokens[1].token", |c| {
                for role in [Role::Admin, Role::Read] {
                    c.auth.tokens.push(TokenConfig::new(TOKEN_A.into(), role));
                }
            }),
            ("dataplane.workers", |c| c.dataplane.workers = 100_000),
            ("dataplane.limits.uring_entries", |c| {
                c.dataplane.limits.uring_entries = 100
            }),
            ("dataplane.limits.buffer_bytes", |c| {
                c.dataplane.limits.buffer_bytes = 1
            }),
            ("dataplane.limits.handshake_timeout_ms", |c| {
                c.dataplane.limits.handshake_timeout_ms = 0
            }),
            ("sessions.ticket_ttl_ms", |c| c.sessions.ticket_ttl_ms = 0),
            ("sessions.max_sessions", |c| {
                c.sessions.max_sessions = Some(0)
            }),
            ("sessions.max_sessions_per_user", |c| {
                c.sessions.max_sessions_per_user = Some(0)
            }),
            ("sessions.max_sessions_per_user", |c| {
                c.sessions.max_sessions_per_user = Some(20_000)
            }),
            ("viewers.max_sessions", |c| c.viewers.max_sessions = 0),
            ("viewers.max_sessions_per_user", |c| {
                c.viewers.max_sessions_per_user = 20_000
            }),
            ("viewers.idle_timeout_ms", |c| c.viewers.idle_timeout_ms = 1),
            ("sessions.ticket_bytes", |c| c.sessions.ticket_bytes = 15),
            ("sessions.ticket_bytes", |c| c.sessions.ticket_bytes = 65),
            ("demo.width", |c| c.demo.width = 0),
            ("demo.height", |c| c.demo.height = 9000),
            ("demo.frame_interval_ms", |c| c.demo.frame_interval_ms = 1),
            ("demo.max_clients", |c| c.demo.max_clients = 0),
            ("demo.password", |c| c.demo.password = Some("".into())),
            ("demo.password", |c| {
                c.demo.password = Some("123456789".into())
            }),
            ("console.web_dir", |c| c.console.web_dir = Some("".into())),
            ("log.level", |c| c.log.level = "inf".into()),
            ("log.level", |c| {
                c.log.level = "info,consolegate=loud".into()
            }),
            ("tls.cert", |c| {
                c.tls = Some(TlsConfig {
                    cert: "".into(),
                    key: "/k".into(),
                    allow_plain: false,
                })
            }),
            ("tls.key", |c| {
                c.tls = Some(TlsConfig {
                    cert: "/c".into(),
                    key: "".into(),
                    allow_plain: false,
                })
            }),
        ];
        for (key, edit) in cases {
            let mut c = ApplianceConfig::default();
            edit(&mut c);
            assert_eq!(&invalid_key(&c), key);
            let shown = c.validate().unwrap_err().to_string();
            assert!(shown.starts_with(&format!("{key}: ")), "{shown}");
            assert!(!shown.contains(TOKEN_A), "{shown}");
        }
        let mut c = ApplianceConfig::default();
        c.sessions.ticket_bytes = 8;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "sessions.ticket_bytes: must be ≥ 16 (128 bits)"
        );
        c.sessions.ticket_bytes = 16;
        c.validate().unwrap();
        // Ephemeral ports (tests) never collide.
        let mut c = ApplianceConfig::default();
        c.control.listen = "127.0.0.1:0".parse().unwrap();
        c.console.listen = "127.0.0.1:0".parse().unwrap();
        c.validate().unwrap();
        // The same port on different specific IPs does not collide.
        let mut c = ApplianceConfig::default();
        c.console.listen = "127.0.0.2:8080".parse().unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn ensure_admin_token_generates_only_when_no_admin() {
        let mut c = ApplianceConfig::default();
        let t = c
            .ensure_admin_token()
            .expect("built-in default has no token");
        assert_eq!(t.len(), 64);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            c.auth.tokens,
            vec![TokenConfig::new(t.clone(), Role::Admin)]
        );
        c.validate().unwrap();
        assert_eq!(c.ensure_admin_token(), None);
        // Random: another config gets another token.
        assert_ne!(ApplianceConfig::default().ensure_admin_token().unwrap(), t);
        // A read token alone leaves nobody able to administer: generate.
        let mut c = ApplianceConfig::default();
        c.auth
            .tokens
            .push(TokenConfig::new(TOKEN_B.into(), Role::Read));
        assert!(c.ensure_admin_token().is_some());
        assert_eq!(c.auth.tokens.len(), 2);
        // A configured admin token: nothing generated.
        let mut c = ApplianceConfig::default();
        c.apply_env(env(&[("CONSOLEGATE_AUTH_TOKEN", TOKEN_A)]))
            .unwrap();
        assert_eq!(c.ensure_admin_token(), None);
    }

    #[test]
    fn summary_and_debug_redact_tokens() {
        let mut c = ApplianceConfig::default();
        c.auth
            .tokens
            .push(TokenConfig::new(TOKEN_A.into(), Role::Admin));
        c.auth
            .tokens
            .push(TokenConfig::new(TOKEN_B.into(), Role::Read));
        let s = c.summary();
        assert!(!s.contains(TOKEN_A) && !s.contains(TOKEN_B), "{s}");
        assert!(s.contains("<redacted, 32 chars>"), "{s}");
        assert!(s.contains("1 admin, 1 read"), "{s}");
        assert!(s.contains("ws://127.0.0.1:6080/proxy/"), "{s}");
        assert!(s.contains("6100-6999 (900 ports)"), "{s}");
        let d = format!("{c:?}");
        assert!(!d.contains(TOKEN_A) && d.contains("redacted"), "{d}");
        c.demo.password = Some("pw-1234".into());
        assert!(!format!("{c:?}").contains("pw-1234"));
        assert!(!c.summary().contains("pw-1234"));
        // The TOML part of the summary is itself a valid config.
        let back = ApplianceConfig::from_toml_str(&s).unwrap();
        assert_eq!(back.auth.tokens.len(), 2);
        assert_eq!(
            back.dataplane.limits.buffer_bytes,
            c.dataplane.limits.buffer_bytes
        );
        // Without tokens it says what happens at start.
        assert!(ApplianceConfig::default()
            .summary()
            .contains("generated at start without a config file"));
    }

    #[test]
    fn public_url_derivation() {
        let mut c = ApplianceConfig::default();
        assert_eq!(c.public_url(), "ws://127.0.0.1:6080");
        c.tls = Some(TlsConfig {
            cert: "/c".into(),
            key: "/k".into(),
            allow_plain: false,
        });
        assert_eq!(c.public_url(), "wss://127.0.0.1:6080");
        c.console.listen = "0.0.0.0:6443".parse().unwrap();
        assert_eq!(c.public_url(), "wss://localhost:6443");
        c.console.listen = "[::1]:6080".parse().unwrap();
        assert_eq!(c.public_url(), "wss://[::1]:6080");
        assert_eq!(
            c.public_url_with("127.0.0.1:41234".parse().unwrap()),
            "wss://127.0.0.1:41234"
        );
        c.console.public_url = Some("wss://gw.example.com/consoles/".into());
        assert_eq!(c.public_url(), "wss://gw.example.com/consoles");
        c.validate().unwrap();
    }

    #[test]
    fn state_dir_choice() {
        let dir = tempfile::tempdir().unwrap();
        // A path under a regular file cannot be created, even by root.
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let blocked = file.join("state");
        let good = dir.path().join("state");
        let choice = choose_state_dir(&[
            (blocked.clone(), StateDirOrigin::System),
            (good.clone(), StateDirOrigin::User),
        ])
        .unwrap();
        assert_eq!(
            choice,
            StateDirChoice {
                path: good.clone(),
                origin: StateDirOrigin::User
            }
        );
        assert!(good.is_dir());
        assert_eq!(
            std::fs::read_dir(&good).unwrap().count(),
            0,
            "probe file left behind"
        );
        assert!(choice.to_string().contains("not writable"));
        let e = choose_state_dir(&[(blocked.clone(), StateDirOrigin::System)]).unwrap_err();
        assert!(e.contains(&blocked.display().to_string()), "{e}");

        // Candidates, from a fake environment.
        let fake = |xdg: Option<&'static str>| {
            move |k: &str| -> Option<std::ffi::OsString> {
                match k {
                    "XDG_STATE_HOME" => xdg.map(Into::into),
                    "HOME" => Some("/home/u".into()),
                    "USER" => Some("u".into()),
                    _ => None,
                }
            }
        };
        let v = default_state_dirs(fake(Some("/x/state")));
        assert_eq!(
            v[0],
            (PathBuf::from(SYSTEM_STATE_DIR), StateDirOrigin::System)
        );
        assert_eq!(
            v[1],
            (PathBuf::from("/x/state/consolegate"), StateDirOrigin::User)
        );
        assert_eq!(
            v[2],
            (
                std::env::temp_dir().join("consolegate-u"),
                StateDirOrigin::Temporary
            )
        );
        let v = default_state_dirs(fake(Some("relative")));
        assert_eq!(v[1].0, PathBuf::from("/home/u/.local/state/consolegate"));
        let v = default_state_dirs(fake(None));
        assert_eq!(v[1].0, PathBuf::from("/home/u/.local/state/consolegate"));

        // Configured: used as is, or an error naming the key.
        let mut c = ApplianceConfig::default();
        c.ports.state_dir = Some(good.clone());
        let choice = c.resolve_state_dir().unwrap();
        assert_eq!(choice.origin, StateDirOrigin::Configured);
        c.ports.state_dir = Some(blocked);
        let e = c.resolve_state_dir().unwrap_err().to_string();
        assert!(e.starts_with("ports.state_dir: "), "{e}");
    }

    #[test]
    fn target_networks_portal_origin_and_warnings() {
        let mut c = ApplianceConfig::default();
        let nets = c.target_networks().unwrap();
        assert!(nets
            .iter()
            .any(|n| n.contains(&"10.1.2.3".parse::<IpAddr>().unwrap())));
        assert!(!nets
            .iter()
            .any(|n| n.contains(&"169.254.169.254".parse::<IpAddr>().unwrap())));
        c.sessions.target_networks = vec!["10.0.0.0/8".into(), "nonsense".into()];
        assert_eq!(invalid_key(&c), "sessions.target_networks[1]");
        c.apply_env(env(&[(
            "CONSOLEGATE_SESSIONS_TARGET_NETWORKS",
            "192.168.7.0/24, 10.9.0.0/16",
        )]))
        .unwrap();
        assert_eq!(
            c.sessions.target_networks,
            ["192.168.7.0/24", "10.9.0.0/16"]
        );
        c.validate().unwrap();

        c.sessions.portal_origin = Some("https://portal.example/path".into());
        assert_eq!(invalid_key(&c), "sessions.portal_origin");
        c.sessions.portal_origin = Some("https://portal.example:8443".into());
        c.validate().unwrap();
        assert_eq!(
            c.default_origin("ws://127.0.0.1:6080").as_deref(),
            Some("https://portal.example:8443")
        );
        c.sessions.portal_origin = None;
        assert_eq!(c.default_origin("ws://127.0.0.1:6080"), None);
        c.console.web_dir = Some("/usr/share/novnc".into());
        assert_eq!(
            c.default_origin("wss://console.example:6443").as_deref(),
            Some("https://console.example:6443")
        );

        // Doubtful combinations are returned for logging, not logged by
        // validate (which runs before logging exists).
        c.console.listen = "0.0.0.0:6080".parse().unwrap();
        let w = c.warnings();
        assert!(
            w.iter().any(|m| m.contains("console.public_url is unset")),
            "{w:?}"
        );
        c.apply_env(env(&[
            ("CONSOLEGATE_TLS_CERT", "/c.pem"),
            ("CONSOLEGATE_TLS_KEY", "/k.pem"),
            ("CONSOLEGATE_TLS_ALLOW_PLAIN", "true"),
        ]))
        .unwrap();
        assert!(c.tls.as_ref().unwrap().allow_plain);
        assert!(c.warnings().iter().any(|m| m.contains("allow_plain")));
    }

    #[test]
    fn a_temporary_state_dir_must_be_our_own_real_directory() {
        let base = tempfile::tempdir().unwrap();
        let fresh = base.path().join("fresh");
        probe_private_dir(&fresh).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // A symlink planted where the directory would be is refused.
        let target = base.path().join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        let link = base.path().join("planted");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = probe_private_dir(&link).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        // So is a directory others may write to.
        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = probe_private_dir(&open).unwrap_err().to_string();
        assert!(e.contains("other users"), "{e}");
        // And choose_state_dir moves on to the next candidate.
        let next = base.path().join("next");
        let c = choose_state_dir(&[
            (link, StateDirOrigin::Temporary),
            (next.clone(), StateDirOrigin::Temporary),
        ])
        .unwrap();
        assert_eq!(c.path, next);
    }
}
