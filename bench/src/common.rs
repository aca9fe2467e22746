//! What every benchmark shares: where the proxies are, how to start them,
//! timeouts, the output directory, and small helpers (run order, time).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::proxy::{ProxyEnv, ProxyKind};

#[derive(Debug, Clone, Serialize)]
pub struct Common {
    pub websockify: PathBuf,
    pub consolegate: PathBuf,
    /// Passed to every consolegate instance (`--consolegate-arg`).
    pub consolegate_args: Vec<String>,
    /// This executable (for `relay-server` and `sink-server`).
    pub bench_exe: PathBuf,
    pub ws_path: String,
    pub ws_subprotocol: Option<String>,
    pub startup_timeout_ms: u64,
    pub io_timeout_ms: u64,
    pub out_dir: PathBuf,
    pub meta: BTreeMap<String, String>,
}

impl Common {
    /// How to start a proxy in front of `backend`.
    pub fn env(&self, backend: SocketAddr) -> ProxyEnv {
        ProxyEnv {
            backend,
            websockify: self.websockify.clone(),
            consolegate: self.consolegate.clone(),
            consolegate_args: self.consolegate_args.clone(),
            bench_exe: self.bench_exe.clone(),
            log_dir: self.out_dir.join("logs"),
            startup_timeout: Duration::from_millis(self.startup_timeout_ms),
            ws_path: self.ws_path.clone(),
            ws_subprotocol: self.ws_subprotocol.clone(),
        }
    }
}

/// The proxies rotated by one place per run (run 1 keeps the given order),
/// so slow drift on a shared machine does not always hit the same proxy.
pub fn rotated(proxies: &[ProxyKind], run: usize) -> Vec<ProxyKind> {
    let mut v = proxies.to_vec();
    if !v.is_empty() {
        let n = v.len();
        v.rotate_left(run.saturating_sub(1) % n);
    }
    v
}

/// Write a file holding a secret (a JWT secret, a hypervisor password) with
/// mode 0600: the appliance refuses a secret file others may read. Created
/// 0600, so it is never readable by others, even for a moment.
pub fn write_private(path: &std::path::Path, contents: impl AsRef<[u8]>) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode on open: set it.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents.as_ref())?;
    Ok(())
}

/// Print a subcommand's text report and write `<name>.txt` and
/// `<name>.json` into `dir`.
pub fn write_report<T: Serialize>(
    dir: &std::path::Path,
    name: &str,
    text: &str,
    report: &T,
) -> anyhow::Result<()> {
    print!("{text}");
    std::fs::write(dir.join(format!("{name}.txt")), text)?;
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(report)? + "\n",
    )?;
    Ok(())
}

/// The proxies a subcommand measures: all asked for but direct TCP (which
/// is a latency baseline only).
pub fn proxies_under_test(kinds: &[ProxyKind]) -> Vec<ProxyKind> {
    kinds
        .iter()
        .copied()
        .filter(|p| *p != ProxyKind::Direct)
        .collect()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation() {
        use ProxyKind::*;
        let p = [PlainRelay, Websockify, ConsolegateEpoll];
        assert_eq!(rotated(&p, 1), p.to_vec());
        assert_eq!(
            rotated(&p, 2),
            vec![Websockify, ConsolegateEpoll, PlainRelay]
        );
        assert_eq!(rotated(&p, 4), p.to_vec());
        assert!(rotated(&[], 3).is_empty());
    }
}
