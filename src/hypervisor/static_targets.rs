//! The static backend: VNC servers named in the config, with no hypervisor
//! API behind them (`[[hypervisors]] kind = "static"`).
//!
//! What it does: lists the configured targets; hands out each one's VNC
//! address and password as its console (`one_time: false`: the password is
//! the server's own, the browser never sees it); takes thumbnails with the
//! appliance's own RFB snapshot ([`super::snapshot`]); power actions are
//! unsupported; `validate` always succeeds (there is no session to check).
//!
//! Power state: a target is `on` when a TCP connection to its VNC port
//! succeeds within `probe_timeout_ms` (then closed at once, before the RFB
//! greeting is answered, so no login is attempted and no server counts a
//! failure), and `unknown` otherwise: a refused or silent port says the
//! VNC server is down or unreachable, not that a machine is off.
//!
//! Passwords come from `password` or `password_file`; the file is read
//! once at start, one trailing newline removed. Passwords are never logged
//! and never printed by `Debug`.
//!
//! What it must not depend on: the data plane, the control plane.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::model::{
    Console, ConsoleTarget, HvResult, Hypervisor, HypervisorError, PowerAction, PowerState,
    ProgressSink, Thumbnail, ThumbnailSize, VmInfo,
};
use super::snapshot::{self, SnapshotLimits};

/// Default time a reachability probe may take.
pub const PROBE_TIMEOUT_MS: u64 = 500;
/// Longest password file read, in bytes (a VNC password uses 8).
pub const MAX_PASSWORD_FILE_BYTES: u64 = 4096;
/// Longest id (hypervisor or target), in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// `[[hypervisors]] kind = "static"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticConfig {
    pub id: String,
    pub vms: Vec<StaticVmConfig>,
    /// Time a TCP connect may take before a target is listed `unknown`.
    #[serde(default = "default_probe_timeout_ms")]
    pub probe_timeout_ms: u64,
    /// Time a thumbnail's RFB snapshot may take, connect to close.
    #[serde(default = "default_snapshot_timeout_ms")]
    pub snapshot_timeout_ms: u64,
    /// Calls in flight at once (the control plane's queue).
    #[serde(default = "crate::hypervisor::queue::default_max_concurrent")]
    pub max_concurrent: usize,
}

impl StaticConfig {
    /// A config with every optional field at its default.
    pub fn new(id: &str, vms: Vec<StaticVmConfig>, max_concurrent: usize) -> StaticConfig {
        StaticConfig {
            id: id.to_string(),
            vms,
            probe_timeout_ms: default_probe_timeout_ms(),
            snapshot_timeout_ms: default_snapshot_timeout_ms(),
            max_concurrent,
        }
    }
}

impl StaticVmConfig {
    pub fn new(
        id: &str,
        name: Option<String>,
        host: &str,
        port: u16,
        password: Option<String>,
    ) -> StaticVmConfig {
        StaticVmConfig {
            id: id.to_string(),
            name,
            host: host.to_string(),
            port,
            password,
            password_file: None,
        }
    }
}

fn default_probe_timeout_ms() -> u64 {
    PROBE_TIMEOUT_MS
}
fn default_snapshot_timeout_ms() -> u64 {
    snapshot::TOTAL_TIMEOUT_MS
}

/// One VNC target.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticVmConfig {
    pub id: String,
    /// Display name; the id when absent.
    #[serde(default)]
    pub name: Option<String>,
    pub host: String,
    pub port: u16,
    /// The VNC password (prefer `password_file`, which keeps it out of the
    /// config).
    #[serde(default)]
    pub password: Option<String>,
    /// A file holding the VNC password, read at start.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

impl std::fmt::Debug for StaticVmConfig {
    // Hand-written so the password never lands in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticVmConfig")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .finish()
    }
}

/// A config problem of the static backend.
#[derive(Debug, thiserror::Error)]
pub enum StaticError {
    #[error("static hypervisor {hypervisor:?}: {problem}")]
    Config { hypervisor: String, problem: String },
    #[error("static hypervisor {hypervisor:?}, VM {vm:?}: password file {path}: {problem}")]
    PasswordFile {
        hypervisor: String,
        vm: String,
        path: PathBuf,
        problem: String,
    },
}

/// A password kept out of `Debug` output.
#[derive(Clone, PartialEq, Eq)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone)]
struct Target {
    id: String,
    name: String,
    host: String,
    port: u16,
    password: Option<Secret>,
}

/// The targets of one static hypervisor entry.
#[derive(Debug, Clone)]
pub struct StaticBackend {
    id: String,
    targets: Vec<Target>,
    probe_timeout: Duration,
    snapshot_limits: SnapshotLimits,
}

impl StaticBackend {
    /// Validates `config` and reads the password files.
    pub fn new(config: StaticConfig) -> Result<StaticBackend, StaticError> {
        let problem = |problem: String| StaticError::Config {
            hypervisor: config.id.clone(),
            problem,
        };
        check_id("hypervisor id", &config.id).map_err(problem)?;
        if config.probe_timeout_ms == 0 || config.snapshot_timeout_ms == 0 {
            return Err(problem(
                "probe_timeout_ms and snapshot_timeout_ms must be more than 0".into(),
            ));
        }
        let mut seen = HashSet::new();
        let mut targets = Vec::with_capacity(config.vms.len());
        for vm in &config.vms {
            check_id("VM id", &vm.id).map_err(problem)?;
            if !seen.insert(vm.id.as_str()) {
                return Err(problem(format!("VM id {:?} appears twice", vm.id)));
            }
            if vm.host.is_empty() || vm.port == 0 {
                return Err(problem(format!("VM {:?} needs a host and a port", vm.id)));
            }
            targets.push(Target {
                id: vm.id.clone(),
                name: vm.name.clone().unwrap_or_else(|| vm.id.clone()),
                host: vm.host.clone(),
                port: vm.port,
                password: read_password(&config.id, vm)?,
            });
        }
        Ok(StaticBackend {
            id: config.id,
            targets,
            probe_timeout: Duration::from_millis(config.probe_timeout_ms),
            snapshot_limits: SnapshotLimits {
                total_timeout_ms: config.snapshot_timeout_ms,
                ..SnapshotLimits::default()
            },
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn find(&self, vm: &str) -> HvResult<&Target> {
        self.targets
            .iter()
            .find(|target| target.id == vm)
            .ok_or_else(|| HypervisorError::VmNotFound(vm.to_owned()))
    }

    fn info(&self, target: &Target, power: PowerState) -> VmInfo {
        VmInfo {
            id: target.id.clone(),
            native_id: target.id.clone(),
            name: target.name.clone(),
            power,
            host: Some(format!("{}:{}", target.host, target.port)),
            hypervisor: self.id.clone(),
        }
    }
}

/// `password`, or the contents of `password_file` less one trailing
/// newline; both at once is an error.
fn read_password(hypervisor: &str, vm: &StaticVmConfig) -> Result<Option<Secret>, StaticError> {
    let path = match (&vm.password, &vm.password_file) {
        (Some(_), Some(_)) => {
            return Err(StaticError::Config {
                hypervisor: hypervisor.to_owned(),
                problem: format!("VM {:?} has both password and password_file", vm.id),
            })
        }
        (Some(password), None) => return Ok(Some(Secret(password.clone()))),
        (None, None) => return Ok(None),
        (None, Some(path)) => path,
    };
    let problem = |problem: String| StaticError::PasswordFile {
        hypervisor: hypervisor.to_owned(),
        vm: vm.id.clone(),
        path: path.clone(),
        problem,
    };
    // A private file (o-rwx, the rule of every secret file); the error
    // names the file and its mode, never the contents.
    let bytes = crate::config::secrets::read_private_file(path, MAX_PASSWORD_FILE_BYTES)
        .map_err(|e| problem(e.to_string()))?;
    // Never echo the contents in the error.
    let mut text = String::from_utf8(bytes).map_err(|_| problem("not UTF-8 text".into()))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(problem("empty".into()));
    }
    Ok(Some(Secret(text)))
}

fn check_id(what: &str, id: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if id.is_empty() || id.len() > MAX_ID_BYTES || !id.chars().all(allowed) {
        return Err(format!(
            "{what} {id:?} must be 1 to {MAX_ID_BYTES} characters of A-Z a-z 0-9 - _ ."
        ));
    }
    Ok(())
}

/// `on` when the VNC port accepts a TCP connection in time, else `unknown`.
async fn probe(host: String, port: u16, limit: Duration) -> PowerState {
    match tokio::time::timeout(limit, TcpStream::connect((host.as_str(), port))).await {
        Ok(Ok(_)) => PowerState::On,
        _ => PowerState::Unknown,
    }
}

impl Hypervisor for StaticBackend {
    async fn list_vms(&self) -> HvResult<Vec<VmInfo>> {
        // Probes run concurrently: the list takes one probe timeout at most.
        let mut probes = JoinSet::new();
        for (index, target) in self.targets.iter().enumerate() {
            let (host, port, limit) = (target.host.clone(), target.port, self.probe_timeout);
            probes.spawn(async move { (index, probe(host, port, limit).await) });
        }
        let mut powers = vec![PowerState::Unknown; self.targets.len()];
        while let Some(done) = probes.join_next().await {
            if let Ok((index, power)) = done {
                if let Some(slot) = powers.get_mut(index) {
                    *slot = power;
                }
            }
        }
        Ok(self
            .targets
            .iter()
            .zip(powers)
            .map(|(target, power)| self.info(target, power))
            .collect())
    }

    async fn vm(&self, vm: &str) -> HvResult<VmInfo> {
        let target = self.find(vm)?;
        let power = probe(target.host.clone(), target.port, self.probe_timeout).await;
        Ok(self.info(target, power))
    }

    async fn console(&self, vm: &str) -> HvResult<Console> {
        let target = self.find(vm)?;
        Ok(Console {
            target: ConsoleTarget::Vnc {
                host: target.host.clone(),
                port: target.port,
                password: target.password.as_ref().map(|p| p.0.clone()),
            },
            one_time: false,
        })
    }

    async fn console_used(&self, vm: &str) -> HvResult<()> {
        // The password is the server's own and stays valid.
        self.find(vm).map(|_| ())
    }

    async fn thumbnail(&self, vm: &str, size: ThumbnailSize) -> HvResult<Thumbnail> {
        let target = self.find(vm)?;
        let password = target.password.as_ref().map(|p| p.0.as_str());
        snapshot::snapshot(
            &target.host,
            target.port,
            password,
            size,
            &self.snapshot_limits,
        )
        .await
    }

    async fn power(&self, vm: &str, action: PowerAction, _progress: ProgressSink) -> HvResult<()> {
        self.find(vm)?;
        Err(HypervisorError::Unsupported(format!(
            "static VNC targets have no power control ({action:?} on {vm})"
        )))
    }

    async fn validate(&self) -> HvResult<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::demo::{DemoConfig, DemoServer};

    fn vm(id: &str, port: u16) -> StaticVmConfig {
        StaticVmConfig {
            id: id.into(),
            name: None,
            host: "127.0.0.1".into(),
            port,
            password: None,
            password_file: None,
        }
    }

    fn config(vms: Vec<StaticVmConfig>) -> StaticConfig {
        StaticConfig {
            id: "lab".into(),
            vms,
            probe_timeout_ms: 500,
            snapshot_timeout_ms: 5_000,
            max_concurrent: 4,
        }
    }

    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    #[test]
    fn parses_the_documented_example() {
        #[derive(Deserialize)]
        #[serde(tag = "kind", rename_all = "snake_case")]
        enum Entry {
            Static(StaticConfig),
        }
        #[derive(Deserialize)]
        struct File {
            hypervisors: Vec<Entry>,
        }
        let text = r#"
            [[hypervisors]]
            id = "lab"
            kind = "static"
            vms = [{ id = "x1", name = "build box", host = "10.0.0.7", port = 5901, password_file = "/etc/consolegate/x1.password" }]
        "#;
        let file: File = toml::from_str(text).unwrap();
        let Entry::Static(config) = &file.hypervisors[0];
        assert_eq!(config.vms[0].port, 5901);
        assert_eq!(config.probe_timeout_ms, PROBE_TIMEOUT_MS);
        let typo = text.replace("password_file", "passwd_file");
        assert!(toml::from_str::<File>(&typo).is_err());
    }

    #[test]
    fn password_files_are_read_trimmed_and_never_shown() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cr3t!\n").unwrap();
        // Others may read it: refused, naming the file and the mode.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut open = vm("a", 5900);
        open.password_file = Some(path.clone());
        let e = StaticBackend::new(config(vec![open]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("(mode 0644)") && e.contains("chmod o-rwx") && !e.contains("s3cr3t"),
            "{e}"
        );
        // Group-readable is fine.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let mut with_file = vm("a", 5900);
        with_file.password_file = Some(path.clone());
        let backend = StaticBackend::new(config(vec![with_file.clone()])).unwrap();
        assert_eq!(backend.targets[0].password, Some(Secret("s3cr3t!".into())));
        assert!(!format!("{backend:?}").contains("s3cr3t"));
        let mut inline = vm("b", 5900);
        inline.password = Some("inline-pw".into());
        assert!(!format!("{inline:?}").contains("inline-pw"));
        // Only one newline goes; CRLF counts as one.
        std::fs::write(&path, "two\n\n").unwrap();
        let backend = StaticBackend::new(config(vec![with_file.clone()])).unwrap();
        assert_eq!(backend.targets[0].password, Some(Secret("two\n".into())));
        std::fs::write(&path, "crlf\r\n").unwrap();
        let backend = StaticBackend::new(config(vec![with_file.clone()])).unwrap();
        assert_eq!(backend.targets[0].password, Some(Secret("crlf".into())));
        // Empty, missing, both: errors that do not echo the contents.
        std::fs::write(&path, "\n").unwrap();
        assert!(StaticBackend::new(config(vec![with_file.clone()])).is_err());
        std::fs::write(&path, [0xFF, 0xFE]).unwrap();
        let e = StaticBackend::new(config(vec![with_file.clone()])).unwrap_err();
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        with_file.password = Some("x".into());
        assert!(StaticBackend::new(config(vec![with_file.clone()])).is_err());
        with_file.password = None;
        with_file.password_file = Some(dir.path().join("missing"));
        assert!(StaticBackend::new(config(vec![with_file])).is_err());
        assert!(StaticBackend::new(config(vec![vm("a", 1), vm("a", 2)])).is_err());
        assert!(StaticBackend::new(config(vec![vm("a", 0)])).is_err());
    }

    #[tokio::test]
    async fn lists_consoles_and_thumbnails_the_demo_server() {
        let server = DemoServer::start(
            "127.0.0.1:0".parse().unwrap(),
            DemoConfig {
                width: 200,
                height: 100,
                password: Some("demo-pw".into()),
                ..DemoConfig::default()
            },
        )
        .unwrap();
        let mut up = vm("up", server.addr().port());
        up.name = Some("the demo".into());
        up.password = Some("demo-pw".into());
        let backend = StaticBackend::new(config(vec![up, vm("down", closed_port())])).unwrap();
        let vms = backend.list_vms().await.unwrap();
        assert_eq!(vms.len(), 2);
        assert_eq!(
            (vms[0].name.as_str(), vms[0].power),
            ("the demo", PowerState::On)
        );
        assert_eq!(
            (vms[1].name.as_str(), vms[1].power),
            ("down", PowerState::Unknown)
        );
        assert_eq!(vms[0].hypervisor, "lab");
        let console = backend.console("up").await.unwrap();
        assert!(!console.one_time);
        assert_eq!(
            console.target,
            ConsoleTarget::Vnc {
                host: "127.0.0.1".into(),
                port: server.addr().port(),
                password: Some("demo-pw".into())
            }
        );
        let size = ThumbnailSize {
            max_width: 100,
            max_height: 100,
        };
        let thumb = backend.thumbnail("up", size).await.unwrap();
        assert_eq!((thumb.width, thumb.height), (100, 50));
        let e = backend.thumbnail("down", size).await.unwrap_err();
        assert!(matches!(e, HypervisorError::Unreachable(_)), "{e}");
        let e = backend
            .power("up", PowerAction::Reset, Box::new(|_| {}))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "unsupported");
        assert!(matches!(
            backend.console("nope").await,
            Err(HypervisorError::VmNotFound(_))
        ));
        backend.validate().await.unwrap();
        server.stop();
    }
}
