//! The host limits that decide how many sessions a run can hold: the
//! open-file limit of the bench (inherited by every proxy it starts) and the
//! kernel settings listed in `tuning/99-consolegate.conf`.
//!
//! At start-up the bench raises its soft `RLIMIT_NOFILE` to the hard limit
//! (children inherit it). It changes kernel settings (`sysctl -w`) only when
//! asked with `--apply-sysctl`, since that changes the machine for everyone;
//! otherwise it reports what it would change. From the limits it derives
//! the largest session count each party can hold, and which one binds.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use serde::Serialize;

/// Descriptors a process needs besides its sessions' sockets (listeners,
/// epoll/uring, eventfds, logs, stdio), kept free when sizing runs.
pub const FD_HEADROOM: u64 = 64;

/// The sysctls read and reported, whether or not the tuning file lists them.
pub const REPORTED_SYSCTLS: &[&str] = &[
    "fs.nr_open",
    "fs.file-max",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_mem",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_tw_reuse",
    "kernel.pid_max",
    "kernel.threads-max",
];

#[derive(Debug, Clone, Serialize)]
pub struct SysctlCheck {
    pub key: String,
    pub current: Option<String>,
    pub recommended: String,
    /// Current value already meets the recommendation.
    pub ok: bool,
    /// Outcome of `sysctl -w` when `--apply-sysctl` was given.
    pub applied: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tuning {
    pub nofile_soft_at_start: Option<u64>,
    pub nofile_soft: Option<u64>,
    pub nofile_hard: Option<u64>,
    /// What raising the soft limit did.
    pub nofile_note: String,
    pub sysctls: BTreeMap<String, String>,
    pub tuning_file: Option<String>,
    pub checks: Vec<SysctlCheck>,
    pub apply_sysctl: bool,
    pub capacity: Capacity,
}

/// The largest number of proxied idle sessions each party can hold under
/// the limits read, and the binding one.
#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    /// A proxy holds 2 sockets per session (browser and backend).
    pub by_proxy_fds: Option<u64>,
    /// The bench holds 1 client socket per session.
    pub by_client_fds: Option<u64>,
    /// The silent backend (a child of the bench) holds 1 per session.
    pub by_backend_fds: Option<u64>,
    /// Each leg (client→proxy, proxy→backend) is one destination, so its
    /// source ports come from the ephemeral range.
    pub by_ephemeral_ports: Option<u64>,
    /// Every websockify session is a process.
    pub by_pid_max: Option<u64>,
    pub max_sessions: Option<u64>,
    pub limited_by: String,
}

/// Raises the soft open-file limit to the hard one; returns (before, after,
/// hard, note).
pub fn raise_nofile() -> (Option<u64>, Option<u64>, Option<u64>, String) {
    let before = getrlimit(Resource::Nofile);
    let Some(hard) = before.maximum else {
        return (
            before.current,
            before.current,
            None,
            "hard limit is unlimited; soft limit left as is".into(),
        );
    };
    if before.current == Some(hard) {
        return (
            before.current,
            Some(hard),
            Some(hard),
            format!("soft limit already at the hard limit {hard}"),
        );
    }
    let note = match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    ) {
        Ok(()) => format!(
            "raised the soft limit from {} to the hard limit {hard}",
            before.current.map_or("unlimited".into(), |v| v.to_string())
        ),
        Err(e) => format!("could not raise the soft limit to {hard}: {e}"),
    };
    let after = getrlimit(Resource::Nofile);
    (before.current, after.current, Some(hard), note)
}

pub fn read_sysctl(key: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let v = std::fs::read_to_string(path).ok()?;
    Some(v.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// `key = value` lines of a sysctl.d file (comments and blanks skipped).
pub fn parse_sysctl_conf(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            let k = k.trim().trim_start_matches('-').to_string();
            let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
            (!k.is_empty() && !v.is_empty()).then_some((k, v))
        })
        .collect()
}

fn numbers(v: &str) -> Option<Vec<u64>> {
    v.split_whitespace().map(|x| x.parse().ok()).collect()
}

/// Whether `current` meets `recommended` for `key`: at least as large for
/// limits and sizes, a range at least as wide for the port range, the same
/// value otherwise (per-socket buffer defaults are a choice, not a floor).
pub fn meets(key: &str, current: &str, recommended: &str) -> bool {
    let (Some(c), Some(r)) = (numbers(current), numbers(recommended)) else {
        return current == recommended;
    };
    if c.len() != r.len() {
        return false;
    }
    match key {
        "net.ipv4.ip_local_port_range" if c.len() == 2 => {
            c[1].saturating_sub(c[0]) >= r[1].saturating_sub(r[0])
        }
        "fs.file-max"
        | "fs.nr_open"
        | "net.core.somaxconn"
        | "net.ipv4.tcp_max_syn_backlog"
        | "net.ipv4.tcp_mem"
        | "kernel.pid_max"
        | "kernel.threads-max" => c.iter().zip(&r).all(|(a, b)| a >= b),
        _ => c == r,
    }
}

/// Size of `ip_local_port_range` ("low high").
pub fn port_range_size(v: &str) -> Option<u64> {
    let n = numbers(v)?;
    (n.len() == 2 && n[1] >= n[0]).then(|| n[1] - n[0] + 1)
}

pub fn capacity(nofile: Option<u64>, sysctls: &BTreeMap<String, String>) -> Capacity {
    let fds = |per_session: u64| nofile.map(|n| n.saturating_sub(FD_HEADROOM) / per_session);
    let by_ephemeral_ports = sysctls
        .get("net.ipv4.ip_local_port_range")
        .and_then(|v| port_range_size(v));
    let by_pid_max = sysctls
        .get("kernel.pid_max")
        .and_then(|v| v.parse::<u64>().ok())
        .map(|p| p.saturating_sub(1000));
    let mut c = Capacity {
        by_proxy_fds: fds(2),
        by_client_fds: fds(1),
        by_backend_fds: fds(1),
        by_ephemeral_ports,
        by_pid_max,
        max_sessions: None,
        limited_by: String::new(),
    };
    let candidates = [
        (
            c.by_proxy_fds,
            "the proxy's open-file limit (RLIMIT_NOFILE, 2 per session)",
        ),
        (
            c.by_client_fds,
            "the bench's open-file limit (1 per session)",
        ),
        (
            c.by_backend_fds,
            "the backend's open-file limit (1 per session)",
        ),
        (
            c.by_ephemeral_ports,
            "the ephemeral port range (net.ipv4.ip_local_port_range) per destination",
        ),
    ];
    if let Some((n, why)) = candidates
        .iter()
        .filter_map(|(n, why)| n.map(|n| (n, *why)))
        .min_by_key(|(n, _)| *n)
    {
        c.max_sessions = Some(n);
        c.limited_by = why.to_string();
    } else {
        c.limited_by = "unknown (no limits readable)".into();
    }
    c
}

/// Reads (and, with `apply`, changes) the host limits; never fails.
pub fn prepare(tuning_file: &Path, apply: bool) -> Tuning {
    let (soft_before, soft, hard, nofile_note) = raise_nofile();
    let conf = std::fs::read_to_string(tuning_file).ok();
    let recommended = conf.as_deref().map(parse_sysctl_conf).unwrap_or_default();
    let mut checks = Vec::new();
    for (key, want) in &recommended {
        let current = read_sysctl(key);
        let ok = current.as_deref().is_some_and(|c| meets(key, c, want));
        let applied = (apply && !ok).then(|| {
            match Command::new("sysctl")
                .arg("-w")
                .arg(format!("{key}={want}"))
                .output()
            {
                Ok(o) if o.status.success() => "applied".to_string(),
                Ok(o) => format!(
                    "failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim().replace('\n', " ")
                ),
                Err(e) => format!("failed: {e}"),
            }
        });
        checks.push(SysctlCheck {
            key: key.clone(),
            current,
            recommended: want.clone(),
            ok,
            applied,
        });
    }
    let mut sysctls = BTreeMap::new();
    for key in REPORTED_SYSCTLS
        .iter()
        .map(|k| k.to_string())
        .chain(recommended.iter().map(|(k, _)| k.clone()))
    {
        if let Some(v) = read_sysctl(&key) {
            sysctls.insert(key, v);
        }
    }
    Tuning {
        nofile_soft_at_start: soft_before,
        nofile_soft: soft,
        nofile_hard: hard,
        nofile_note,
        capacity: capacity(soft, &sysctls),
        sysctls,
        tuning_file: conf.is_some().then(|| tuning_file.display().to_string()),
        checks,
        apply_sysctl: apply,
    }
}

impl Tuning {
    /// Human-readable summary for the text report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let n = |v: Option<u64>| v.map_or("unlimited".into(), |v| v.to_string());
        out.push_str(&format!(
            "Open files: soft {} (at start {}), hard {}: {}\n",
            n(self.nofile_soft),
            n(self.nofile_soft_at_start),
            n(self.nofile_hard),
            self.nofile_note
        ));
        let c = &self.capacity;
        let o = |v: Option<u64>| v.map_or("?".into(), |v| v.to_string());
        out.push_str(&format!(
            "Session capacity here: proxy fds {}, client fds {}, backend fds {}, ephemeral ports {} \
             → at most {} sessions, limited by {}\n",
            o(c.by_proxy_fds),
            o(c.by_client_fds),
            o(c.by_backend_fds),
            o(c.by_ephemeral_ports),
            o(c.max_sessions),
            c.limited_by
        ));
        let off: Vec<&SysctlCheck> = self.checks.iter().filter(|c| !c.ok).collect();
        if let Some(f) = &self.tuning_file {
            if off.is_empty() {
                out.push_str(&format!("Kernel settings: all of {f} already met\n"));
            } else {
                out.push_str(&format!(
                    "Kernel settings below {f}{}:\n",
                    if self.apply_sysctl {
                        ""
                    } else {
                        " (not changed: pass --apply-sysctl)"
                    }
                ));
                for c in off {
                    out.push_str(&format!(
                        "  {} = {} (recommended {}){}\n",
                        c.key,
                        c.current.as_deref().unwrap_or("?"),
                        c.recommended,
                        c.applied
                            .as_deref()
                            .map_or(String::new(), |a| format!(": {a}"))
                    ));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysctl_conf() {
        let text = "# comment\n\nfs.file-max = 1048576\n\
                    net.ipv4.ip_local_port_range = 1024 65000   # trailing\n\
                    -net.core.somaxconn=8192\n; also a comment\nbroken line\n";
        assert_eq!(
            parse_sysctl_conf(text),
            vec![
                ("fs.file-max".into(), "1048576".into()),
                ("net.ipv4.ip_local_port_range".into(), "1024 65000".into()),
                ("net.core.somaxconn".into(), "8192".into()),
            ]
        );
    }

    #[test]
    fn meets_compares_by_kind() {
        assert!(meets("fs.file-max", "2466177", "1048576"));
        assert!(!meets("net.core.somaxconn", "4096", "8192"));
        assert!(!meets(
            "net.ipv4.tcp_mem",
            "287901 383868 575802",
            "786432 1048576 1572864"
        ));
        assert!(meets(
            "net.ipv4.tcp_mem",
            "786432 1048576 1572864",
            "786432 1048576 1572864"
        ));
        // Range width, not the bounds themselves.
        assert!(!meets(
            "net.ipv4.ip_local_port_range",
            "32768 60999",
            "1024 65000"
        ));
        assert!(meets(
            "net.ipv4.ip_local_port_range",
            "1000 65535",
            "1024 65000"
        ));
        // Buffer defaults are a choice: only equal meets.
        assert!(!meets(
            "net.ipv4.tcp_rmem",
            "4096 131072 33554432",
            "4096 16384 4194304"
        ));
        assert!(meets("x.y", "abc", "abc"));
        assert!(!meets("fs.file-max", "1 2", "1"));
    }

    #[test]
    fn capacity_arithmetic_names_the_binding_limit() {
        let sysctls: BTreeMap<String, String> = [
            (
                "net.ipv4.ip_local_port_range".to_string(),
                "32768 60999".to_string(),
            ),
            ("kernel.pid_max".to_string(), "32768".to_string()),
        ]
        .into_iter()
        .collect();
        let c = capacity(Some(20_000), &sysctls);
        assert_eq!(c.by_proxy_fds, Some(9968));
        assert_eq!(c.by_client_fds, Some(19936));
        assert_eq!(c.by_ephemeral_ports, Some(28232));
        assert_eq!(c.max_sessions, Some(9968));
        assert!(c.limited_by.contains("proxy's open-file limit"));
        let c = capacity(Some(1_048_576), &sysctls);
        assert_eq!(c.max_sessions, Some(28232));
        assert!(c.limited_by.contains("ephemeral port range"));
        assert_eq!(capacity(None, &BTreeMap::new()).max_sessions, None);
        assert_eq!(port_range_size("1024 65000"), Some(63977));
        assert_eq!(port_range_size("9 1"), None);
    }
}
