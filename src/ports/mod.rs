//! The port bitmap for dedicated per-session listeners.
//!
//! In dedicated-port mode each console session gets its own TCP port from a
//! configurable range (default 6100–6999). This module hands those ports out
//! and takes them back:
//!
//! - [`PortBitmap`]: one bit per port in `AtomicU64` words. Claiming and
//!   releasing are single atomic read-modify-write operations; there is no
//!   mutex anywhere, so any thread may allocate or release at any time.
//! - [`PortPool`]: the bitmap plus the OS check. [`PortPool::allocate`]
//!   claims a bit and binds the listener itself; the successful bind *is* the
//!   check, so nothing can take the port between "check" and "use". Ports
//!   another process holds are skipped for a while and counted.
//! - [`PortStore`]: the allocations persisted as `ports.json` in the state
//!   directory, written atomically (temp file, fsync, rename, fsync dir).
//! - [`restore_and_reclaim`] and [`cleanup`]: at start, and periodically,
//!   release ports whose session is gone *and* that nothing listens on. A port
//!   something still listens on stays claimed, so it is never handed out
//!   twice.
//!
//! What it must not depend on: no async runtime (no tokio), nothing from the
//! data plane, no other `crate::` module. It does blocking file IO only in
//! [`PortStore`] and non-blocking socket calls (bind, listen) in the pool; the
//! caller decides on which thread those run. It never accepts connections:
//! the listener it returns is handed to the worker that owns the session.
//!
//! How the control plane uses it, per session in dedicated-port mode:
//! `pool.allocate(session_id)` → hand the bound, non-blocking listener to
//! the worker that owns the session → on session end the worker drops the
//! listener and the control plane calls `pool.release(port, session_id)`.
//! Any failure after `allocate` while creating the session must drop the
//! listener and release the port the same way. Persistence is
//! `store.save(&pool.allocations())`, as often as the caller likes
//! (coalesced); at start `restore_and_reclaim` runs before any allocation.
//!
//! Every error here is on the *internal* side (capacity, local OS, local
//! state file); nothing in this module reads input from a browser or a
//! hypervisor.

mod bitmap;
mod pool;
mod reclaim;
mod store;

#[cfg(test)]
mod test_util;

pub use bitmap::{
    Health, PortBitmap, PortRange, PortStats, HEALTH_CRITICAL_PERCENT, HEALTH_WARNING_PERCENT,
};
pub use pool::{PoolStats, PortPool, PortPoolConfig};
pub use reclaim::{cleanup, restore_and_reclaim, ReclaimReport};
pub use store::{Allocation, PortStore, MAX_STATE_FILE_BYTES, STATE_FILE_NAME};

use std::path::PathBuf;

/// Everything that can go wrong in this module. All of it is internal
/// (capacity, local OS or local state file), never the browser's fault.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// No port could be handed out: every bit is claimed, or the ports left
    /// are held by other processes, or `max_bind_attempts` binds failed in a
    /// row. The HTTP layer answers 503 with `Retry-After: retry_after_secs`.
    #[error(
        "port pool {range} exhausted: {allocated} of {total} ports allocated, \
         {externally_taken} held by other processes ({reason})"
    )]
    Exhausted {
        range: PortRange,
        total: usize,
        allocated: usize,
        externally_taken: usize,
        reason: &'static str,
        retry_after_secs: u64,
    },
    /// A port range (from config or CLI) that cannot be used.
    #[error("invalid port range {input:?}: {reason}")]
    InvalidRange { input: String, reason: String },
    /// A pool setting out of bounds; `key` names the setting.
    #[error("invalid port pool setting {key}: {message}")]
    InvalidConfig { key: &'static str, message: String },
    /// Session id 0 is reserved: the pool uses it to mean "no owner yet".
    #[error("session id 0 cannot own a port (0 is reserved)")]
    InvalidOwner,
    /// A local OS call failed for a reason other than "port taken"
    /// (address not local, out of file descriptors, disk full, ...).
    #[error("{op} {target}: {source}")]
    Io {
        op: &'static str,
        target: String,
        #[source]
        source: std::io::Error,
    },
    /// The state file exists but cannot be trusted; it is left untouched so
    /// an operator can look at it.
    #[error("port state file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

impl PortError {
    /// Stable machine-readable code for API error bodies and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            PortError::Exhausted { .. } => "port_pool_exhausted",
            PortError::InvalidRange { .. } => "invalid_port_range",
            PortError::InvalidConfig { .. } => "invalid_port_config",
            PortError::InvalidOwner => "invalid_session_id",
            PortError::Io { .. } => "port_io_error",
            PortError::Corrupt { .. } => "port_state_corrupt",
        }
    }

    /// Seconds the client should wait before retrying, when retrying can
    /// help (only for [`PortError::Exhausted`]).
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            PortError::Exhausted {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_stable() {
        let range: PortRange = "6100-6101".parse().unwrap();
        let e = PortError::Exhausted {
            range,
            total: 2,
            allocated: 2,
            externally_taken: 0,
            reason: "all ports allocated",
            retry_after_secs: 5,
        };
        assert_eq!(e.code(), "port_pool_exhausted");
        assert_eq!(e.retry_after_secs(), Some(5));
        assert!(e.to_string().contains("6100-6101"));
        assert_eq!(PortError::InvalidOwner.code(), "invalid_session_id");
        assert_eq!(PortError::InvalidOwner.retry_after_secs(), None);
        let c = PortError::Corrupt {
            path: "/x/ports.json".into(),
            reason: "bad".into(),
        };
        assert_eq!(c.code(), "port_state_corrupt");
        assert!(c.to_string().contains("/x/ports.json"));
    }
}
