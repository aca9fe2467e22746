//! Running as a system service: readiness and the watchdog (`notify`),
//! journald logging (`logging`), reload on SIGHUP (`reload`), and the
//! upgrade hand-off of listeners and pending sessions to a new process
//! (`handoff`, over `wire`, carrying `pending` sessions); plus the
//! start-up check of the descriptor limit against the configured maximum.
//!
//! Wiring-level code like `plane`: it knows the control state and the data
//! plane's shared handles, never an IO backend, tokio or axum (the control
//! thread is stopped through a closure the binary gives it).

pub mod handoff;
pub mod logging;
pub mod notify;
pub mod pending;
pub mod reload;
pub mod wire;

use std::path::{Path, PathBuf};

use crate::config::appliance::ApplianceConfig;

/// Descriptors kept beside the sessions' ones: listeners, the control
/// plane's connections, the journal, eventfds, the config and state files.
pub const FD_HEADROOM: u64 = 1024;

/// Where the hand-off socket goes: systemd's `$RUNTIME_DIRECTORY` (the
/// unit's `RuntimeDirectory=`, private to the service), else the state
/// directory.
pub fn runtime_dir(state_dir: &Path) -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|v| {
            v.to_str()
                .and_then(|s| s.split(':').next())
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| state_dir.to_path_buf())
}

/// Descriptors the configured maximum needs at worst: two per session
/// (browser, backend), one per connection in its handshake, one per
/// dedicated port, two per splice pipe of every worker, and
/// [`FD_HEADROOM`]. The unit's `LimitNOFILE=` is sized from it.
pub fn fds_needed(cfg: &ApplianceConfig) -> u64 {
    let (first, last) = cfg.port_range();
    let limits = &cfg.dataplane.limits;
    let sessions = cfg.pool_max_sessions() as u64;
    let ports = u64::from(last - first) + 1;
    let pipes = if limits.splice_min_bytes > 0 {
        2 * limits.splice_pipes_per_worker as u64 * cfg.worker_count() as u64
    } else {
        0
    };
    2 * sessions + limits.max_handshaking_connections as u64 + ports + pipes + FD_HEADROOM
}

/// A warning when the soft descriptor limit is below [`fds_needed`].
pub fn fd_limit_warning(cfg: &ApplianceConfig) -> Option<String> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current?;
    let needed = fds_needed(cfg);
    (limit < needed).then(|| {
        format!(
            "the descriptor limit ({limit}) is below what viewers.max_sessions = {} may need \
             ({needed}: 2 per session, handshakes, dedicated ports, splice pipes): raise \
             LimitNOFILE= (systemd) or ulimit -n, or lower viewers.max_sessions",
            cfg.pool_max_sessions()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_need_follows_the_config() {
        let mut cfg = ApplianceConfig::default();
        cfg.dataplane.workers = 2;
        // 2 × 10 000 sessions + 4096 handshakes + 900 ports + 2 × 64 × 2
        // pipes + headroom.
        assert_eq!(fds_needed(&cfg), 20_000 + 4096 + 900 + 256 + FD_HEADROOM);
        cfg.dataplane.limits.splice_min_bytes = 0;
        cfg.viewers.max_sessions = 100;
        assert_eq!(fds_needed(&cfg), 200 + 4096 + 900 + FD_HEADROOM);
    }
}
