//! The configured hypervisors (`[[hypervisors]]`, tagged by `kind`) and
//! the one type that holds any of them: [`Backend`] dispatches the
//! [`Hypervisor`] calls to vSphere, QEMU or a static list (the demo
//! console is a static list of one).
//!
//! Why an enum and not `dyn Hypervisor`: the trait's methods return `impl
//! Future` (no boxing per call), which makes it not object-safe; four
//! kinds known at compile time fit an enum.
//!
//! Depends on nothing but the backends; runs on the control plane.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;
use tokio::sync::broadcast;

use super::model::{
    Console, HvResult, Hypervisor, PowerAction, ProgressSink, Thumbnail, ThumbnailSize, VmInfo,
    VmStatusChange,
};
use super::pool::PoolStats;
use super::qemu::{QemuBackend, QemuConfig};
use super::static_targets::{StaticBackend, StaticConfig, StaticVmConfig};
use super::vsphere::{VsphereBackend, VsphereConfig};

/// Most `[[hypervisors]]` entries accepted.
pub const MAX_HYPERVISORS: usize = 64;
/// Id of the demo hypervisor added when none is configured.
pub const DEMO_HYPERVISOR_ID: &str = "demo";
/// Id of the demo console's VM.
pub const DEMO_VM_ID: &str = "demo";

/// One `[[hypervisors]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HypervisorConfig {
    Vsphere(VsphereConfig),
    Qemu(QemuConfig),
    Static(StaticConfig),
    Demo(DemoHypervisorConfig),
}

/// `kind = "demo"`: the built-in demo console (`[demo]`) as a VM list of
/// one, so `make run` shows a VM out of the box.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoHypervisorConfig {
    pub id: String,
    /// The VM's display name.
    #[serde(default = "default_demo_name")]
    pub name: String,
    #[serde(default = "super::queue::default_max_concurrent")]
    pub max_concurrent: usize,
}

fn default_demo_name() -> String {
    "consolegate demo".into()
}

impl DemoHypervisorConfig {
    /// The demo hypervisor added when `[demo]` is on and no hypervisor is
    /// configured.
    pub fn implicit() -> DemoHypervisorConfig {
        DemoHypervisorConfig {
            id: DEMO_HYPERVISOR_ID.into(),
            name: default_demo_name(),
            max_concurrent: super::queue::default_max_concurrent(),
        }
    }
}

impl HypervisorConfig {
    pub fn id(&self) -> &str {
        match self {
            HypervisorConfig::Vsphere(c) => &c.id,
            HypervisorConfig::Qemu(c) => &c.id,
            HypervisorConfig::Static(c) => &c.id,
            HypervisorConfig::Demo(c) => &c.id,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            HypervisorConfig::Vsphere(_) => "vsphere",
            HypervisorConfig::Qemu(_) => "qemu",
            HypervisorConfig::Static(_) => "static",
            HypervisorConfig::Demo(_) => "demo",
        }
    }

    /// Calls in flight at once against this hypervisor.
    pub fn max_concurrent(&self) -> usize {
        match self {
            HypervisorConfig::Vsphere(c) => c.max_concurrent,
            HypervisorConfig::Qemu(c) => c.max_concurrent,
            HypervisorConfig::Static(c) => c.max_concurrent,
            HypervisorConfig::Demo(c) => c.max_concurrent,
        }
    }

    /// Checks what can be checked without reading files or connecting.
    pub fn validate(&self) -> Result<(), String> {
        let id = self.id();
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if id.is_empty()
            || id.len() > super::static_targets::MAX_ID_BYTES
            || !id.chars().all(allowed)
        {
            return Err(format!(
                "hypervisor id {id:?} must be 1 to {} characters of A-Z a-z 0-9 - _ .",
                super::static_targets::MAX_ID_BYTES
            ));
        }
        match self {
            HypervisorConfig::Vsphere(c) => c.validate(),
            HypervisorConfig::Qemu(c) => c.validate().map_err(|e| e.to_string()),
            HypervisorConfig::Static(_) | HypervisorConfig::Demo(_) => Ok(()),
        }
    }
}

/// A configuration or start-up problem of one hypervisor.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("hypervisor {id:?}: {problem}")]
    Start { id: String, problem: String },
    #[error("hypervisor {id:?}: kind demo needs the demo console ([demo] enabled = true)")]
    NoDemo { id: String },
}

/// Where start-up finds what the backends need from the appliance.
#[derive(Debug, Clone)]
pub struct StartContext<'a> {
    /// The demo console's address, when `[demo]` is on.
    pub demo_addr: Option<SocketAddr>,
    pub demo_password: Option<String>,
    /// A private directory (0700) for QEMU screendumps, one subdirectory
    /// per hypervisor is made in it.
    pub screendump_dir: &'a Path,
}

/// Any configured hypervisor.
#[derive(Debug)]
pub enum Backend {
    Vsphere(VsphereBackend),
    Qemu(QemuBackend),
    Static(StaticBackend),
}

/// Calls the same method on whichever backend this is. Each call's future
/// is boxed: the three backends' futures are large (a vSphere call holds
/// its SOAP exchange), and nested inline in the fleet's, queue's and
/// cache's futures they overflowed the control thread's stack (seen with a
/// QEMU thumbnail in a debug build). One allocation per hypervisor call is
/// nothing beside the call.
macro_rules! dispatch {
    ($self:ident, $b:ident => $call:expr) => {
        match $self {
            Backend::Vsphere($b) => Box::pin(async move { $call }).await,
            Backend::Qemu($b) => Box::pin(async move { $call }).await,
            Backend::Static($b) => Box::pin(async move { $call }).await,
        }
    };
}

impl Backend {
    /// Builds one backend. Must run inside the control plane's tokio
    /// runtime (QEMU starts its QMP connections; vSphere its keep-alive).
    pub fn start(
        config: &HypervisorConfig,
        cx: &StartContext<'_>,
    ) -> Result<Backend, BackendError> {
        let fail = |problem: String| BackendError::Start {
            id: config.id().to_string(),
            problem,
        };
        config.validate().map_err(fail)?;
        match config {
            HypervisorConfig::Vsphere(c) => {
                let backend = VsphereBackend::new(c).map_err(|e| fail(e.to_string()))?;
                // Ends with the runtime; sessions are logged out by
                // `shutdown`.
                drop(backend.spawn_keepalive());
                backend.spawn_updates();
                Ok(Backend::Vsphere(backend))
            }
            HypervisorConfig::Qemu(c) => {
                let dir = cx.screendump_dir.join(&c.id);
                make_private_dir(&dir).map_err(fail)?;
                let backend =
                    QemuBackend::start(c.clone(), &dir).map_err(|e| fail(e.to_string()))?;
                Ok(Backend::Qemu(backend))
            }
            HypervisorConfig::Static(c) => Ok(Backend::Static(
                StaticBackend::new(c.clone()).map_err(|e| fail(e.to_string()))?,
            )),
            HypervisorConfig::Demo(c) => {
                let addr = cx
                    .demo_addr
                    .ok_or_else(|| BackendError::NoDemo { id: c.id.clone() })?;
                let config = StaticConfig::new(
                    &c.id,
                    vec![StaticVmConfig::new(
                        DEMO_VM_ID,
                        Some(c.name.clone()),
                        &addr.ip().to_string(),
                        addr.port(),
                        cx.demo_password.clone(),
                    )],
                    c.max_concurrent,
                );
                Ok(Backend::Static(
                    StaticBackend::new(config).map_err(|e| fail(e.to_string()))?,
                ))
            }
        }
    }

    /// The API-session pool's figures (vSphere only: the others hold no
    /// API sessions).
    pub fn pool_stats(&self) -> Option<PoolStats> {
        match self {
            Backend::Vsphere(b) => Some(b.stats()),
            _ => None,
        }
    }

    /// The vSphere update follower's figures (None: not vSphere, or it
    /// does not follow updates).
    pub fn updates_stats(&self) -> Option<crate::hypervisor::vsphere::updates::UpdatesStats> {
        match self {
            Backend::Vsphere(b) => b.updates_stats(),
            _ => None,
        }
    }

    /// Whether power actions can work at all (static VNC targets, the demo
    /// included, have none).
    pub fn has_power_control(&self) -> bool {
        !matches!(self, Backend::Static(_))
    }

    /// Power-state changes the hypervisor pushes (QEMU's QMP events).
    pub fn subscribe(&self) -> Option<broadcast::Receiver<VmStatusChange>> {
        match self {
            Backend::Qemu(b) => Some(b.subscribe()),
            Backend::Vsphere(b) => b.subscribe(),
            Backend::Static(_) => None,
        }
    }

    /// Log out of everything (vSphere sessions).
    pub async fn shutdown(&self) {
        if let Backend::Vsphere(b) = self {
            b.shutdown().await;
        }
    }
}

impl Hypervisor for Backend {
    async fn list_vms(&self) -> HvResult<Vec<VmInfo>> {
        dispatch!(self, b => b.list_vms().await)
    }
    async fn vm(&self, vm: &str) -> HvResult<VmInfo> {
        dispatch!(self, b => b.vm(vm).await)
    }
    async fn console(&self, vm: &str) -> HvResult<Console> {
        dispatch!(self, b => b.console(vm).await)
    }
    async fn console_used(&self, vm: &str) -> HvResult<()> {
        dispatch!(self, b => b.console_used(vm).await)
    }
    async fn thumbnail(&self, vm: &str, size: ThumbnailSize) -> HvResult<Thumbnail> {
        dispatch!(self, b => b.thumbnail(vm, size).await)
    }
    async fn power(&self, vm: &str, action: PowerAction, progress: ProgressSink) -> HvResult<()> {
        dispatch!(self, b => b.power(vm, action, progress).await)
    }
    async fn validate(&self) -> HvResult<()> {
        dispatch!(self, b => b.validate().await)
    }
}

/// Creates `dir` (and its parents) private to the appliance: mode 0700.
fn make_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("screendump directory {}: {e}", dir.display()))?;
    // An existing directory keeps its mode; make sure it is private.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("screendump directory {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct File {
        hypervisors: Vec<HypervisorConfig>,
    }

    #[test]
    fn the_issue_example_parses_by_kind() {
        let text = r#"
            [[hypervisors]]
            id = "esx1"
            kind = "vsphere"
            url = "https://esx1.example/sdk"
            username = "svc-console"
            password_file = "/etc/consolegate/esx1.password"
            thumbprint = "AA:BB"
            pool_size = 5
            session_ttl_ms = 300000
            max_concurrent = 4
            acquire_timeout_ms = 2000

            [[hypervisors]]
            id = "kvm1"
            kind = "qemu"
            vms = [{ id = "web01", qmp = "/run/qemu/web01.qmp" }]

            [[hypervisors]]
            id = "lab"
            kind = "static"
            vms = [{ id = "x1", name = "build box", host = "10.0.0.7", port = 5901, password_file = "/etc/consolegate/x1.password" }]

            [[hypervisors]]
            id = "demo"
            kind = "demo"
        "#;
        let file: File = toml::from_str(text).unwrap();
        let kinds: Vec<(&str, &str)> = file
            .hypervisors
            .iter()
            .map(|h| (h.id(), h.kind()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("esx1", "vsphere"),
                ("kvm1", "qemu"),
                ("lab", "static"),
                ("demo", "demo")
            ]
        );
        assert_eq!(file.hypervisors[0].max_concurrent(), 4);
        for h in &file.hypervisors {
            h.validate().unwrap();
        }
    }

    #[test]
    fn unknown_kinds_and_keys_are_refused() {
        let bad_kind = "[[hypervisors]]\nid = \"x\"\nkind = \"hyperv\"\n";
        assert!(toml::from_str::<File>(bad_kind).is_err());
        let bad_key = "[[hypervisors]]\nid = \"x\"\nkind = \"demo\"\ncolour = 1\n";
        let e = toml::from_str::<File>(bad_key).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        let bad_id = HypervisorConfig::Demo(DemoHypervisorConfig {
            id: "a b".into(),
            ..DemoHypervisorConfig::implicit()
        });
        assert!(bad_id.validate().is_err());
    }

    #[tokio::test]
    async fn the_demo_kind_lists_the_demo_console() {
        let dir = tempfile::tempdir().unwrap();
        let demo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cx = StartContext {
            demo_addr: Some(demo.local_addr().unwrap()),
            demo_password: None,
            screendump_dir: dir.path(),
        };
        let backend = Backend::start(
            &HypervisorConfig::Demo(DemoHypervisorConfig::implicit()),
            &cx,
        )
        .unwrap();
        let vms = backend.list_vms().await.unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!(
            (vms[0].native_id.as_str(), vms[0].name.as_str()),
            ("demo", "consolegate demo")
        );
        assert_eq!(vms[0].power, super::super::model::PowerState::On);
        let no_demo = StartContext {
            demo_addr: None,
            ..cx
        };
        assert!(matches!(
            Backend::start(
                &HypervisorConfig::Demo(DemoHypervisorConfig::implicit()),
                &no_demo
            ),
            Err(BackendError::NoDemo { .. })
        ));
    }
}
