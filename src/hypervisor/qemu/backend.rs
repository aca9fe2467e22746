//! [`QemuBackend`]: the [`Hypervisor`] of one `kind = "qemu"` entry, one
//! persistent QMP connection per VM.
//!
//! What it does: lists the configured VMs with the power state QMP's
//! events keep current (no polling); hands out consoles as one-time VNC
//! passwords (`set_password`, then `expire_password` when used); takes
//! thumbnails with `screendump` (PNG) into the appliance's private
//! directory, or with the appliance's own RFB snapshot when that fails;
//! runs power actions to completion (see [`super::power`]); publishes every
//! power-state change on a bounded broadcast channel.
//!
//! What it does not do: start QEMU processes, pool or queue calls (the
//! control plane wraps it), or touch the data plane.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

use super::config::{QemuConfig, QemuError, QemuVmConfig};
use super::counters::BalloonProbe;
use super::password::{self, PasswordSlot};
use super::power;
use super::qmp::{NoticeHandler, QmpClient, QmpError};
use super::state::VmState;
use crate::hypervisor::model::{
    Console, ConsoleTarget, HvResult, Hypervisor, HypervisorError, PowerAction, PowerState,
    ProgressSink, Thumbnail, ThumbnailSize, VmInfo, VmStatusChange,
};
use crate::hypervisor::snapshot::{self, SnapshotLimits};
use crate::hypervisor::thumbnail;

/// Power-state changes kept for slow subscribers; a subscriber that falls
/// further behind is told how many it missed (`RecvError::Lagged`).
pub const STATUS_CHANGES_CAPACITY: usize = 256;

impl From<QmpError> for HypervisorError {
    fn from(e: QmpError) -> Self {
        match e {
            QmpError::Unreachable { .. } => HypervisorError::Unreachable(e.to_string()),
            QmpError::Timeout { timeout_ms, .. } => {
                HypervisorError::Timeout(Duration::from_millis(timeout_ms))
            }
            QmpError::Busy(_) => HypervisorError::Busy(e.to_string()),
            QmpError::Command { .. } => HypervisorError::Protocol(e.to_string()),
        }
    }
}

/// The QEMU VMs of one hypervisor entry. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct QemuBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QemuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuBackend")
            .field("id", &self.inner.config.id)
            .field("vms", &self.inner.vms.len())
            .finish()
    }
}

struct Inner {
    config: QemuConfig,
    vms: Vec<Vm>,
    changes: broadcast::Sender<VmStatusChange>,
    screendump_dir: PathBuf,
    snapshot_limits: SnapshotLimits,
}

/// One VM: its QMP connection and what the connection's notices say.
pub(super) struct Vm {
    pub(super) id: String,
    name: String,
    pub(super) client: QmpClient,
    pub(super) state: watch::Receiver<VmState>,
    slot: PasswordSlot,
    /// Its balloon device as last found (see [`super::counters`]).
    balloon: std::sync::Mutex<Option<BalloonProbe>>,
}

impl Vm {
    pub(super) fn state(&self) -> VmState {
        self.state.borrow().clone()
    }

    pub(super) fn balloon_probe(&self) -> Option<BalloonProbe> {
        self.balloon
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(super) fn set_balloon_probe(&self, probe: Option<BalloonProbe>) {
        *self
            .balloon
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = probe;
    }

    /// The state, when QMP is up and the guest is not off: what consoles
    /// and thumbnails need.
    fn running(&self) -> HvResult<VmState> {
        let state = self.state();
        if state.power == PowerState::Off {
            return Err(HypervisorError::VmNotRunning(self.id.clone()));
        }
        if !state.connected {
            return Err(self.unreachable(&state));
        }
        Ok(state)
    }

    pub(super) fn unreachable(&self, state: &VmState) -> HypervisorError {
        HypervisorError::Unreachable(format!(
            "VM {}: QMP socket {} is not connected ({})",
            self.id,
            self.client.path().display(),
            state.last_error.as_deref().unwrap_or("not tried yet")
        ))
    }
}

/// Where a VM's VNC display listens and how it authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
struct VncEndpoint {
    host: String,
    port: u16,
    /// `query-vnc`'s `auth`: `vnc` (password), `none`, `vencrypt`, ...
    auth: String,
}

impl QemuBackend {
    /// Validates `config`, checks `screendump_dir` (an existing directory
    /// the appliance created for this, private to its user: mode 0700; QEMU
    /// must be able to write into it, else thumbnails fall back to RFB
    /// snapshots), and starts one QMP connection task per VM on the current
    /// tokio runtime.
    pub fn start(config: QemuConfig, screendump_dir: &Path) -> Result<QemuBackend, QemuError> {
        config.validate()?;
        check_private_dir(&config.id, screendump_dir)?;
        tokio::runtime::Handle::try_current().map_err(|_| QemuError::NoRuntime)?;
        let (changes, _) = broadcast::channel(STATUS_CHANGES_CAPACITY);
        let vms = config
            .vms
            .iter()
            .map(|vm| start_vm(&config, vm, &changes))
            .collect();
        let snapshot_limits = SnapshotLimits {
            read_timeout_ms: config.command_timeout_ms,
            ..SnapshotLimits::default()
        };
        Ok(QemuBackend {
            inner: Arc::new(Inner {
                config,
                vms,
                changes,
                screendump_dir: screendump_dir.to_path_buf(),
                snapshot_limits,
            }),
        })
    }

    /// The hypervisor's id.
    pub fn id(&self) -> &str {
        &self.inner.config.id
    }

    /// Every power-state change of this hypervisor's VMs from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<VmStatusChange> {
        self.inner.changes.subscribe()
    }

    /// A VM's figures from QMP and /proc (see [`super::counters`]).
    pub async fn counters(&self, vm: &str) -> HvResult<crate::hypervisor::metrics::VmCounters> {
        let balloon_interval_s = self.inner.config.balloon_stats_polling_interval_s;
        super::counters::counters(self.find(vm)?, balloon_interval_s).await
    }

    /// How many `command`s were sent to VM `vm` (None: no such VM).
    pub fn commands_sent(&self, vm: &str, command: &str) -> Option<u64> {
        self.find(vm)
            .ok()
            .map(|vm| vm.client.commands_sent(command))
    }

    fn find(&self, vm: &str) -> HvResult<&Vm> {
        self.inner
            .vms
            .iter()
            .find(|candidate| candidate.id == vm)
            .ok_or_else(|| HypervisorError::VmNotFound(vm.to_owned()))
    }

    fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.inner.config.command_timeout_ms)
    }

    fn password_ttl(&self) -> Duration {
        Duration::from_millis(self.inner.config.one_time_password_ttl_ms)
    }

    fn info(&self, vm: &Vm) -> VmInfo {
        VmInfo {
            id: vm.id.clone(),
            native_id: vm.id.clone(),
            name: vm.name.clone(),
            power: vm.state.borrow().power,
            host: None,
            hypervisor: self.inner.config.id.clone(),
        }
    }

    /// Waits (bounded by the command timeout, for all VMs together) until
    /// each VM's first connection attempt has finished, so a list right
    /// after start shows real power states.
    async fn first_attempts(&self, vms: &[&Vm]) {
        let deadline = tokio::time::Instant::now() + self.command_timeout();
        for vm in vms {
            let mut state = vm.state.clone();
            let _ = tokio::time::timeout_at(deadline, state.wait_for(|s| s.attempts > 0)).await;
        }
    }

    /// `query-vnc` → where and how to reach the VM's VNC display.
    async fn vnc_endpoint(&self, vm: &Vm) -> HvResult<VncEndpoint> {
        let answer = vm.client.execute("query-vnc", None).await?;
        parse_query_vnc(&vm.id, &answer)
    }

    /// A fresh random password on the VM's display, which QEMU itself
    /// expires after the TTL should the appliance never report it used.
    async fn set_one_time_password(&self, vm: &Vm) -> HvResult<String> {
        let password = password::generate().map_err(|e| {
            HypervisorError::Protocol(format!("no random bytes for a VNC password: {e}"))
        })?;
        let arguments = json!({ "protocol": "vnc", "password": password });
        vm.client.execute("set_password", Some(arguments)).await?;
        let seconds = self.password_ttl().as_millis().div_ceil(1000);
        let arguments = json!({ "protocol": "vnc", "time": format!("+{seconds}") });
        vm.client
            .execute("expire_password", Some(arguments))
            .await?;
        Ok(password)
    }

    /// Makes the display's password unusable for new logins; connected
    /// clients keep their sessions.
    async fn expire_now(&self, vm: &Vm) -> HvResult<()> {
        let arguments = json!({ "protocol": "vnc", "time": "now" });
        vm.client
            .execute("expire_password", Some(arguments))
            .await?;
        Ok(())
    }

    async fn acquire_slot(&self, vm: &Vm) -> HvResult<tokio::sync::OwnedSemaphorePermit> {
        vm.slot
            .acquire(self.command_timeout())
            .await
            .ok_or_else(|| {
                HypervisorError::Busy(format!(
                    "VM {}: another console's one-time VNC password is still outstanding",
                    vm.id
                ))
            })
    }

    /// `screendump` into the private directory, read (bounded), removed,
    /// scaled. Any failure but a dead connection is `Protocol`, which the
    /// caller answers with an RFB snapshot.
    async fn screendump(&self, vm: &Vm, size: ThumbnailSize) -> HvResult<Thumbnail> {
        let name = format!("screendump-{}.png", random_hex()?);
        let path = self.inner.screendump_dir.join(name);
        let arguments = json!({ "filename": path, "format": "png" });
        let dumped = vm.client.execute("screendump", Some(arguments)).await;
        let written = dumped.is_ok();
        let max_bytes = self.inner.config.max_screendump_bytes;
        let decoded = tokio::task::spawn_blocking(move || {
            // Removed whatever happened: QEMU may have created it and failed.
            let bytes = written.then(|| read_bounded(&path, max_bytes));
            let _ = std::fs::remove_file(&path);
            bytes.map(|bytes| bytes.and_then(|png| thumbnail::from_png(&png, size)))
        })
        .await
        .map_err(|e| HypervisorError::Protocol(format!("screendump task failed: {e}")))?;
        match (dumped, decoded) {
            (Err(e), _) => Err(e.into()),
            (Ok(_), Some(result)) => result,
            (Ok(_), None) => Err(HypervisorError::Protocol("screendump vanished".into())),
        }
    }

    /// The appliance's own RFB connection to the VM's display, with a
    /// one-time password of its own when the display has one.
    async fn snapshot(&self, vm: &Vm, size: ThumbnailSize) -> HvResult<Thumbnail> {
        let endpoint = self.vnc_endpoint(vm).await?;
        let limits = &self.inner.snapshot_limits;
        match endpoint.auth.as_str() {
            "none" => snapshot::snapshot(&endpoint.host, endpoint.port, None, size, limits).await,
            "vnc" => {
                let _permit = self.acquire_slot(vm).await?;
                let password = self.set_one_time_password(vm).await?;
                let taken = snapshot::snapshot(
                    &endpoint.host,
                    endpoint.port,
                    Some(&password),
                    size,
                    limits,
                )
                .await;
                let expired = self.expire_now(vm).await;
                let thumbnail = taken?;
                expired.map(|()| thumbnail)
            }
            other => Err(unsupported_auth(&vm.id, other)),
        }
    }
}

fn start_vm(
    config: &QemuConfig,
    vm: &QemuVmConfig,
    changes: &broadcast::Sender<VmStatusChange>,
) -> Vm {
    let (state_sender, state) = watch::channel(VmState::default());
    let hypervisor = config.id.clone();
    let vm_id = vm.id.clone();
    let changes = changes.clone();
    let handler: NoticeHandler = Arc::new(move |notice| {
        let mut change = None;
        state_sender.send_modify(|state| change = state.apply(&notice));
        if let Some((old, new)) = change {
            tracing::info!(%hypervisor, vm = %vm_id, ?old, ?new, "VM power state changed");
            // No subscriber is fine: nobody is listening yet.
            let _ = changes.send(VmStatusChange {
                hypervisor: hypervisor.clone(),
                vm_id: vm_id.clone(),
                old,
                new,
            });
        }
    });
    Vm {
        id: vm.id.clone(),
        name: vm.name.clone().unwrap_or_else(|| vm.id.clone()),
        client: QmpClient::start(&vm.qmp, config.qmp_limits(), handler),
        state,
        slot: PasswordSlot::default(),
        balloon: std::sync::Mutex::new(None),
    }
}

fn check_private_dir(hypervisor: &str, dir: &Path) -> Result<(), QemuError> {
    use std::os::unix::fs::PermissionsExt;
    let problem = |problem: String| QemuError::ScreendumpDir {
        hypervisor: hypervisor.to_owned(),
        dir: dir.to_path_buf(),
        problem,
    };
    let meta = std::fs::metadata(dir).map_err(|e| problem(e.to_string()))?;
    if !meta.is_dir() {
        return Err(problem("not a directory".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(problem(format!(
            "mode {mode:o} lets other users in; it must be 0700 (screenshots are private)"
        )));
    }
    Ok(())
}

fn random_hex() -> HvResult<String> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes)
        .map_err(|e| HypervisorError::Protocol(format!("no random bytes: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The file's bytes, refusing more than `max_bytes`.
fn read_bounded(path: &Path, max_bytes: u64) -> HvResult<Vec<u8>> {
    let failed = |e: std::io::Error| {
        HypervisorError::Protocol(format!("reading screendump {}: {e}", path.display()))
    };
    let file = std::fs::File::open(path).map_err(failed)?;
    let mut bytes = Vec::new();
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(failed)?;
    if bytes.len() as u64 > max_bytes {
        return Err(HypervisorError::Protocol(format!(
            "screendump is larger than {max_bytes} bytes"
        )));
    }
    Ok(bytes)
}

fn unsupported_auth(vm: &str, auth: &str) -> HypervisorError {
    HypervisorError::Unsupported(format!(
        "VM {vm}'s VNC display uses authentication {auth:?}; the appliance speaks VNC passwords \
         (start QEMU with -vnc HOST:DISPLAY,password=on)"
    ))
}

/// Reads `query-vnc`'s answer; says precisely why a display is unusable.
fn parse_query_vnc(vm: &str, answer: &Value) -> HvResult<VncEndpoint> {
    if answer.get("enabled").and_then(Value::as_bool) != Some(true) {
        return Err(HypervisorError::Unsupported(format!(
            "VM {vm} has no VNC display: QEMU was started without -vnc \
             (add -vnc 127.0.0.1:DISPLAY,password=on)"
        )));
    }
    let field = |name: &str| answer.get(name).and_then(Value::as_str);
    if field("family") == Some("unix") {
        return Err(HypervisorError::Unsupported(format!(
            "VM {vm}'s VNC display listens on a unix socket; the appliance reaches VNC over TCP"
        )));
    }
    let (Some(host), Some(service), Some(auth)) = (field("host"), field("service"), field("auth"))
    else {
        return Err(HypervisorError::Protocol(format!(
            "query-vnc of VM {vm} lacks host, service or auth: {answer}"
        )));
    };
    let port = service.parse::<u16>().map_err(|_| {
        HypervisorError::Protocol(format!(
            "query-vnc of VM {vm}: service {service:?} is not a port"
        ))
    })?;
    // A display on every address is reached on loopback: QMP is a unix
    // socket, so QEMU runs on this machine.
    let host = match host {
        "0.0.0.0" | "" => "127.0.0.1",
        "::" => "::1",
        other => other,
    };
    Ok(VncEndpoint {
        host: host.to_owned(),
        port,
        auth: auth.to_owned(),
    })
}

impl Hypervisor for QemuBackend {
    async fn list_vms(&self) -> HvResult<Vec<VmInfo>> {
        let vms: Vec<&Vm> = self.inner.vms.iter().collect();
        self.first_attempts(&vms).await;
        Ok(vms.into_iter().map(|vm| self.info(vm)).collect())
    }

    async fn vm(&self, vm: &str) -> HvResult<VmInfo> {
        let vm = self.find(vm)?;
        self.first_attempts(&[vm]).await;
        Ok(self.info(vm))
    }

    async fn console(&self, vm: &str) -> HvResult<Console> {
        let vm = self.find(vm)?;
        vm.running()?;
        let endpoint = self.vnc_endpoint(vm).await?;
        match endpoint.auth.as_str() {
            "vnc" => {}
            "none" => {
                return Err(HypervisorError::Unsupported(format!(
                    "VM {}'s VNC display is not password-protected (auth none), so the appliance \
                     cannot give out one-time passwords and anyone could connect; start QEMU with \
                     -vnc HOST:DISPLAY,password=on",
                    vm.id
                )))
            }
            other => return Err(unsupported_auth(&vm.id, other)),
        }
        let permit = self.acquire_slot(vm).await?;
        let password = self.set_one_time_password(vm).await?;
        // Held until console_used (or the password's TTL): a second
        // console or a snapshot would replace this password.
        vm.slot.hold(permit, self.password_ttl());
        Ok(Console {
            target: ConsoleTarget::Vnc {
                host: endpoint.host,
                port: endpoint.port,
                password: Some(password),
            },
            one_time: true,
        })
    }

    async fn console_used(&self, vm: &str) -> HvResult<()> {
        let vm = self.find(vm)?;
        let expired = self.expire_now(vm).await;
        vm.slot.release();
        expired
    }

    async fn thumbnail(&self, vm: &str, size: ThumbnailSize) -> HvResult<Thumbnail> {
        let vm = self.find(vm)?;
        vm.running()?;
        match self.screendump(vm, size).await {
            Err(HypervisorError::Protocol(why)) => {
                tracing::info!(vm = %vm.id, %why, "screendump failed; taking an RFB snapshot");
                self.snapshot(vm, size).await
            }
            other => other,
        }
    }

    async fn power(&self, vm: &str, action: PowerAction, progress: ProgressSink) -> HvResult<()> {
        let vm = self.find(vm)?;
        power::run(vm, action, self.command_timeout(), &progress).await
    }

    async fn validate(&self) -> HvResult<()> {
        let mut failures = Vec::new();
        for vm in &self.inner.vms {
            match vm.client.execute("query-status", None).await {
                Ok(_) => return Ok(()),
                Err(e) => failures.push(format!("{}: {e}", vm.id)),
            }
        }
        if failures.is_empty() {
            return Ok(());
        }
        Err(HypervisorError::Unreachable(failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_vnc_answers_become_endpoints_or_clear_refusals() {
        let ok = json!({"enabled": true, "auth": "vnc", "family": "ipv4", "service": "5977", "host": "127.0.0.1", "clients": []});
        assert_eq!(
            parse_query_vnc("web01", &ok).unwrap(),
            VncEndpoint {
                host: "127.0.0.1".into(),
                port: 5977,
                auth: "vnc".into()
            }
        );
        let any = json!({"enabled": true, "auth": "none", "family": "ipv4", "service": "5900", "host": "0.0.0.0"});
        assert_eq!(parse_query_vnc("a", &any).unwrap().host, "127.0.0.1");
        let off = parse_query_vnc("web01", &json!({"enabled": false})).unwrap_err();
        assert!(
            matches!(&off, HypervisorError::Unsupported(m) if m.contains("no VNC display") && m.contains("web01")),
            "{off}"
        );
        let unix =
            json!({"enabled": true, "auth": "vnc", "family": "unix", "service": "/x", "host": ""});
        assert!(matches!(
            parse_query_vnc("a", &unix),
            Err(HypervisorError::Unsupported(_))
        ));
        let bad = json!({"enabled": true, "auth": "vnc", "family": "ipv4", "service": "http", "host": "h"});
        assert!(matches!(
            parse_query_vnc("a", &bad),
            Err(HypervisorError::Protocol(_))
        ));
        assert!(matches!(
            parse_query_vnc("a", &json!({"enabled": true})),
            Err(HypervisorError::Protocol(_))
        ));
    }

    #[test]
    fn qmp_errors_map_to_hypervisor_errors() {
        let e: HypervisorError = QmpError::Unreachable {
            path: "/x".into(),
            reason: "gone".into(),
        }
        .into();
        assert_eq!(e.code(), "hypervisor_unavailable");
        let e: HypervisorError = QmpError::Timeout {
            command: "stop",
            timeout_ms: 5,
        }
        .into();
        assert_eq!(e.status(), 504);
        let e: HypervisorError = QmpError::Busy(16).into();
        assert_eq!(e.code(), "hypervisor_busy");
    }

    #[tokio::test]
    async fn start_refuses_a_shared_screendump_directory_and_bad_configs() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let vm = QemuVmConfig {
            id: "a".into(),
            name: None,
            qmp: dir.path().join("a.qmp"),
        };
        let config = QemuConfig::new("kvm1", vec![vm]);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = QemuBackend::start(config.clone(), dir.path()).unwrap_err();
        assert!(e.to_string().contains("0700"), "{e}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let e = QemuBackend::start(config.clone(), &dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, QemuError::ScreendumpDir { .. }), "{e}");
        let backend = QemuBackend::start(config, dir.path()).unwrap();
        // Nobody serves the socket: listed, state unknown; calls unreachable.
        let vms = backend.list_vms().await.unwrap();
        assert_eq!(vms.len(), 1);
        assert_eq!((vms[0].id.as_str(), vms[0].name.as_str()), ("a", "a"));
        assert_eq!(vms[0].power, PowerState::Unknown);
        let e = backend.console("a").await.unwrap_err();
        assert!(
            matches!(e, HypervisorError::Unreachable(ref m) if m.contains("a.qmp")),
            "{e}"
        );
        assert!(matches!(
            backend.vm("b").await,
            Err(HypervisorError::VmNotFound(_))
        ));
        assert!(matches!(
            backend.validate().await,
            Err(HypervisorError::Unreachable(_))
        ));
    }
}
