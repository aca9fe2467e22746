//! The vocabulary every hypervisor backend speaks: VMs, power states and
//! actions, console targets, thumbnails, operation progress, and one error
//! type that says which side failed and whether to retry.
//!
//! What this module does: plain data and the [`Hypervisor`] trait that the
//! backends (`vsphere`, `qemu`, `static`, `demo`) implement. What it does
//! not do: IO, pooling, queueing or caching (those wrap a backend), and it
//! depends on nothing in the data plane.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A VM's power state as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    /// Running (vSphere `poweredOn`, QEMU `running`).
    On,
    /// Stopped (vSphere `poweredOff`, QEMU `shutdown` / not started).
    Off,
    /// Suspended or paused (vSphere `suspended`, QEMU `paused`).
    Suspended,
    /// The hypervisor did not say, or said something new.
    Unknown,
}

/// One VM as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Unique across all hypervisors of the appliance (the API's `{vm}`).
    pub id: String,
    /// The hypervisor's own id of the VM (`vm-57`, a QEMU VM's config id).
    pub native_id: String,
    /// Display name.
    pub name: String,
    pub power: PowerState,
    /// The host the VM runs on, when the hypervisor says (vCenter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The configured hypervisor (`[[hypervisors]] id`).
    pub hypervisor: String,
}

/// A power action (`POST /api/v1/vms/{vm}/power`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    /// Power on (QEMU: `cont`).
    On,
    /// Hard power off (QEMU: `stop`).
    Off,
    /// Ask the guest to shut down (ACPI; vSphere `ShutdownGuest`).
    Shutdown,
    /// Hard reset.
    Reset,
    /// Suspend (vSphere `SuspendVM_Task`; QEMU `stop`).
    Suspend,
}

/// Where a console session goes, as a backend hands it out. The control
/// plane turns it into a data-plane target (resolving names off the
/// workers). Secrets in here (passwords, tickets) are never logged: the
/// `Debug` impl redacts them.
#[derive(Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// A VNC server over TCP. `password`, when set, is used by the data
    /// plane to authenticate (VNC auth); the browser never sees it.
    Vnc {
        host: String,
        port: u16,
        password: Option<String>,
    },
    /// A VMware WebMKS endpoint, `wss://host:port/ticket/{ticket}`, whose
    /// certificate is pinned to `thumbprint` (SHA-1 or SHA-256, `AA:BB:…`)
    /// when given, else verified against the configured roots.
    WebMks {
        url: String,
        thumbprint: Option<String>,
    },
}

impl std::fmt::Debug for ConsoleTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConsoleTarget::Vnc {
                host,
                port,
                password,
            } => f
                .debug_struct("Vnc")
                .field("host", host)
                .field("port", port)
                .field("password", &password.as_ref().map(|_| "<redacted>"))
                .finish(),
            ConsoleTarget::WebMks { .. } => f
                .debug_struct("WebMks")
                .field("url", &"<redacted>")
                .field("thumbprint", &"<redacted>")
                .finish(),
        }
    }
}

/// A console target plus what must happen once the data plane has used it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Console {
    pub target: ConsoleTarget,
    /// The credential is one-time (a QEMU VNC password): call
    /// [`Hypervisor::console_used`] once the appliance's backend leg has
    /// authenticated, so it cannot be used again.
    pub one_time: bool,
}

/// A PNG screenshot, scaled to fit the asked bounds.
#[derive(Clone, PartialEq, Eq)]
pub struct Thumbnail {
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

impl std::fmt::Debug for Thumbnail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Thumbnail")
            .field("png_bytes", &self.png.len())
            .field("width", &self.width)
            .field("height", &self.height)
            .finish()
    }
}

/// The most a thumbnail may be; a backend scales down (keeping the aspect
/// ratio) to fit, never up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThumbnailSize {
    pub max_width: u32,
    pub max_height: u32,
}

/// Where an operation (a power action) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationState {
    Queued,
    Running,
    Succeeded,
    Failed,
}

/// A progress report of a long operation; `percent` is 0..=100.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub state: OperationState,
    pub percent: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A VM's power state changed (QMP events, vSphere property updates, a
/// finished power action). Broadcast to the event bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatusChange {
    pub hypervisor: String,
    pub vm_id: String,
    pub old: PowerState,
    pub new: PowerState,
}

/// Receives progress of one operation; called from the control thread.
pub type ProgressSink = Box<dyn Fn(Progress) + Send + Sync>;

/// Which side of a hypervisor call failed, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The caller asked for something wrong (unknown VM, bad state).
    Caller,
    /// The hypervisor failed or could not be reached.
    Hypervisor,
    /// The appliance itself (config, a bug, a full queue).
    Internal,
}

/// One error type for every backend. Each variant maps to an HTTP status
/// and a stable snake_case code; `retry_after()` says when trying again
/// makes sense.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HypervisorError {
    /// No VM with that id on this hypervisor (404 `vm_not_found`).
    #[error("no VM {0:?}")]
    VmNotFound(String),
    /// No hypervisor with that id (404 `hypervisor_not_found`).
    #[error("no hypervisor {0:?}")]
    HypervisorNotFound(String),
    /// A bare VM id that more than one hypervisor has (409
    /// `vm_ambiguous`): the caller must say `hypervisor:vm`.
    #[error("{0}")]
    Ambiguous(String),
    /// The VM is not running, so it has no console or screen (409
    /// `vm_not_running`).
    #[error("VM {0:?} is not running")]
    VmNotRunning(String),
    /// The action does not apply in the VM's state (409 `invalid_state`).
    #[error("{0}")]
    InvalidState(String),
    /// The hypervisor cannot be reached: connect refused, TLS failure,
    /// timeout (503 `hypervisor_unavailable`, retry).
    #[error("hypervisor unreachable: {0}")]
    Unreachable(String),
    /// The endpoint's certificate did not match its pin or roots (502
    /// `hypervisor_cert_mismatch`): never retried silently.
    #[error("hypervisor certificate refused: {0}")]
    Certificate(String),
    /// Login refused (502 `hypervisor_auth_failed`).
    #[error("hypervisor login refused: {0}")]
    Auth(String),
    /// The API session is no longer valid (NotAuthenticated); the pool
    /// reconnects and retries once.
    #[error("hypervisor session expired")]
    SessionExpired,
    /// The hypervisor answered with a fault or something unparseable (502
    /// `hypervisor_error`).
    #[error("hypervisor error: {0}")]
    Protocol(String),
    /// The backend cannot do this (501 `unsupported`).
    #[error("not supported by this hypervisor: {0}")]
    Unsupported(String),
    /// No pooled session or queue slot within the wait (503
    /// `hypervisor_busy`, retry).
    #[error("hypervisor busy: {0}")]
    Busy(String),
    /// The call took longer than its limit (504 `hypervisor_timeout`).
    #[error("hypervisor call timed out after {0:?}")]
    Timeout(Duration),
}

impl HypervisorError {
    /// Stable snake_case code for JSON errors and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            HypervisorError::VmNotFound(_) => "vm_not_found",
            HypervisorError::HypervisorNotFound(_) => "hypervisor_not_found",
            HypervisorError::Ambiguous(_) => "vm_ambiguous",
            HypervisorError::VmNotRunning(_) => "vm_not_running",
            HypervisorError::InvalidState(_) => "invalid_state",
            HypervisorError::Unreachable(_) => "hypervisor_unavailable",
            HypervisorError::Certificate(_) => "hypervisor_cert_mismatch",
            HypervisorError::Auth(_) => "hypervisor_auth_failed",
            HypervisorError::SessionExpired => "hypervisor_session_expired",
            HypervisorError::Protocol(_) => "hypervisor_error",
            HypervisorError::Unsupported(_) => "unsupported",
            HypervisorError::Busy(_) => "hypervisor_busy",
            HypervisorError::Timeout(_) => "hypervisor_timeout",
        }
    }

    /// The HTTP status the REST API answers with.
    pub fn status(&self) -> u16 {
        match self {
            HypervisorError::VmNotFound(_) | HypervisorError::HypervisorNotFound(_) => 404,
            HypervisorError::VmNotRunning(_)
            | HypervisorError::InvalidState(_)
            | HypervisorError::Ambiguous(_) => 409,
            HypervisorError::Unreachable(_) | HypervisorError::Busy(_) => 503,
            HypervisorError::Certificate(_)
            | HypervisorError::Auth(_)
            | HypervisorError::SessionExpired
            | HypervisorError::Protocol(_) => 502,
            HypervisorError::Unsupported(_) => 501,
            HypervisorError::Timeout(_) => 504,
        }
    }

    pub fn side(&self) -> Side {
        match self {
            HypervisorError::VmNotFound(_)
            | HypervisorError::HypervisorNotFound(_)
            | HypervisorError::Ambiguous(_)
            | HypervisorError::VmNotRunning(_)
            | HypervisorError::InvalidState(_)
            | HypervisorError::Unsupported(_) => Side::Caller,
            HypervisorError::Busy(_) => Side::Internal,
            _ => Side::Hypervisor,
        }
    }

    /// The answer will be the same until the VM changes (not found, not
    /// running, unsupported): worth remembering for a short while instead
    /// of asking the hypervisor again at once.
    pub fn is_stable(&self) -> bool {
        matches!(
            self,
            HypervisorError::VmNotFound(_)
                | HypervisorError::VmNotRunning(_)
                | HypervisorError::Unsupported(_)
        )
    }

    /// Seconds after which a retry may succeed (Retry-After), or None when
    /// retrying will not help.
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            HypervisorError::Unreachable(_) => Some(5),
            HypervisorError::Busy(_) => Some(1),
            HypervisorError::Timeout(_) => Some(5),
            _ => None,
        }
    }
}

pub type HvResult<T> = Result<T, HypervisorError>;

/// What every backend does. Implementations are called on the control
/// thread only (behind the pool, queue and caches); the futures are `Send`
/// because axum's handlers must be.
///
/// `vm` arguments are the backend's own ids ([`VmInfo::native_id`]).
pub trait Hypervisor: Send + Sync {
    /// Every VM with its name, power state and host.
    fn list_vms(&self) -> impl Future<Output = HvResult<Vec<VmInfo>>> + Send;
    /// One VM.
    fn vm(&self, vm: &str) -> impl Future<Output = HvResult<VmInfo>> + Send;
    /// A console target for one new connection (a fresh ticket or one-time
    /// password each call). `VmNotRunning` when the VM is off.
    fn console(&self, vm: &str) -> impl Future<Output = HvResult<Console>> + Send;
    /// The one-time credential of a console was used: make it unusable.
    fn console_used(&self, vm: &str) -> impl Future<Output = HvResult<()>> + Send;
    /// A screenshot, scaled to fit `size`. `VmNotRunning` when off.
    fn thumbnail(
        &self,
        vm: &str,
        size: ThumbnailSize,
    ) -> impl Future<Output = HvResult<Thumbnail>> + Send;
    /// Run a power action to completion, reporting progress on the way.
    fn power(
        &self,
        vm: &str,
        action: PowerAction,
        progress: ProgressSink,
    ) -> impl Future<Output = HvResult<()>> + Send;
    /// A cheap call that proves the hypervisor is reachable and our
    /// credentials work (vSphere `CurrentTime`, QMP `query-status`).
    fn validate(&self) -> impl Future<Output = HvResult<()>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_statuses_codes_and_retry() {
        let cases: Vec<(HypervisorError, u16, &str, bool)> = vec![
            (
                HypervisorError::VmNotFound("x".into()),
                404,
                "vm_not_found",
                false,
            ),
            (
                HypervisorError::VmNotRunning("x".into()),
                409,
                "vm_not_running",
                false,
            ),
            (
                HypervisorError::Unreachable("x".into()),
                503,
                "hypervisor_unavailable",
                true,
            ),
            (
                HypervisorError::Busy("x".into()),
                503,
                "hypervisor_busy",
                true,
            ),
            (
                HypervisorError::Certificate("x".into()),
                502,
                "hypervisor_cert_mismatch",
                false,
            ),
            (
                HypervisorError::Timeout(Duration::from_secs(1)),
                504,
                "hypervisor_timeout",
                true,
            ),
        ];
        for (e, status, code, retry) in cases {
            assert_eq!(e.status(), status, "{e}");
            assert_eq!(e.code(), code, "{e}");
            assert_eq!(e.retry_after_s().is_some(), retry, "{e}");
        }
        assert_eq!(HypervisorError::VmNotFound("x".into()).side(), Side::Caller);
        assert_eq!(
            HypervisorError::Protocol("x".into()).side(),
            Side::Hypervisor
        );
    }

    #[test]
    fn console_targets_never_print_secrets() {
        let t = ConsoleTarget::Vnc {
            host: "h".into(),
            port: 5900,
            password: Some("sekrit".into()),
        };
        assert!(!format!("{t:?}").contains("sekrit"));
        let w = ConsoleTarget::WebMks {
            url: "wss://esx:443/ticket/TICKET123".into(),
            thumbprint: Some("AA:BB".into()),
        };
        let s = format!("{w:?}");
        assert!(!s.contains("TICKET123") && !s.contains("AA:BB"), "{s}");
    }

    #[test]
    fn power_states_serialize_snake_case() {
        assert_eq!(serde_json::to_string(&PowerState::On).unwrap(), "\"on\"");
        assert_eq!(
            serde_json::to_string(&PowerAction::Shutdown).unwrap(),
            "\"shutdown\""
        );
    }
}
