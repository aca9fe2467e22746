//! The config of one `[[hypervisors]] kind = "qemu"` entry: its VMs and
//! their QMP sockets, and the limits of the QMP connections.
//!
//! What it does not do: read files (the appliance's config loader does) or
//! know the `kind` tag (the loader's enum consumes it).

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Deserialize;

use super::qmp::{self, QmpLimits};

/// Default time a one-time VNC password lives when nobody reports it used.
pub const ONE_TIME_PASSWORD_TTL_MS: u64 = 30_000;
/// Largest `screendump` file read, in bytes: a 4K screen as PNG is a few
/// MiB; more means something else is writing there.
pub const MAX_SCREENDUMP_BYTES: u64 = 64 * 1024 * 1024;
/// Default interval of the guest's balloon statistics, in seconds (the
/// default `[events] metrics_interval_ms` is 5 000).
pub const BALLOON_STATS_POLLING_INTERVAL_S: u64 = 5;
/// Longest balloon statistics interval, in seconds (QEMU takes any
/// `int64`; past an hour the figures are too old to show).
pub const MAX_BALLOON_STATS_POLLING_INTERVAL_S: u64 = 3_600;
/// Longest id (hypervisor or VM), in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// `[[hypervisors]] kind = "qemu"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuConfig {
    /// The hypervisor's id (`[[hypervisors]] id`).
    pub id: String,
    /// The VMs: one QMP socket each.
    pub vms: Vec<QemuVmConfig>,
    /// Time QEMU has to answer one QMP command or handshake step.
    #[serde(default = "default_command_timeout_ms")]
    pub command_timeout_ms: u64,
    /// Commands in flight per VM; more answer 503 busy.
    #[serde(default = "default_max_in_flight_commands")]
    pub max_in_flight_commands: usize,
    /// First and longest wait between reconnection attempts to a QMP
    /// socket (the wait doubles from the first to the longest).
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// How long a console's one-time VNC password stays valid if the
    /// appliance never reports it used (QEMU expires it by itself, whole
    /// seconds, rounded up). While it is outstanding, the VM's next console
    /// waits (one VNC display has one password).
    #[serde(default = "default_one_time_password_ttl_ms")]
    pub one_time_password_ttl_ms: u64,
    /// Largest screendump file read, in bytes.
    #[serde(default = "default_max_screendump_bytes")]
    pub max_screendump_bytes: u64,
    /// Calls in flight at once (the control plane's queue).
    #[serde(default = "crate::hypervisor::queue::default_max_concurrent")]
    pub max_concurrent: usize,
    /// How often QEMU asks the guest's virtio-balloon driver for memory
    /// statistics, in seconds, set on a VM with a balloon device whose
    /// polling is off when its figures are first wanted (an interval
    /// someone else set is kept); 0: never turn polling on.
    #[serde(default = "default_balloon_stats_polling_interval_s")]
    pub balloon_stats_polling_interval_s: u64,
}

/// One VM of a QEMU hypervisor.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuVmConfig {
    /// The VM's id (unique within the hypervisor).
    pub id: String,
    /// Display name; the id when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Path of the VM's QMP unix socket (QEMU's `-qmp unix:PATH,server=on,wait=off`),
    /// reserved for the appliance: QMP serves one client at a time.
    pub qmp: PathBuf,
}

fn default_command_timeout_ms() -> u64 {
    qmp::COMMAND_TIMEOUT_MS
}
fn default_max_in_flight_commands() -> usize {
    qmp::MAX_IN_FLIGHT_COMMANDS
}
fn default_reconnect_min_ms() -> u64 {
    qmp::RECONNECT_MIN_MS
}
fn default_reconnect_max_ms() -> u64 {
    qmp::RECONNECT_MAX_MS
}
fn default_one_time_password_ttl_ms() -> u64 {
    ONE_TIME_PASSWORD_TTL_MS
}
fn default_max_screendump_bytes() -> u64 {
    MAX_SCREENDUMP_BYTES
}
fn default_balloon_stats_polling_interval_s() -> u64 {
    BALLOON_STATS_POLLING_INTERVAL_S
}

/// A config or start-up problem of the QEMU backend.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("qemu hypervisor {hypervisor:?}: {problem}")]
    Config { hypervisor: String, problem: String },
    #[error("qemu hypervisor {hypervisor:?}: screendump directory {dir}: {problem}")]
    ScreendumpDir {
        hypervisor: String,
        dir: PathBuf,
        problem: String,
    },
    #[error("the qemu backend must be started inside a tokio runtime")]
    NoRuntime,
}

impl QemuConfig {
    /// A config with one VM per `(id, qmp)` and every default: for code
    /// that builds configs (tests, the demo) rather than reading TOML.
    pub fn new(id: &str, vms: Vec<QemuVmConfig>) -> QemuConfig {
        QemuConfig {
            id: id.to_owned(),
            vms,
            command_timeout_ms: default_command_timeout_ms(),
            max_in_flight_commands: default_max_in_flight_commands(),
            reconnect_min_ms: default_reconnect_min_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            one_time_password_ttl_ms: default_one_time_password_ttl_ms(),
            max_screendump_bytes: default_max_screendump_bytes(),
            max_concurrent: crate::hypervisor::queue::default_max_concurrent(),
            balloon_stats_polling_interval_s: default_balloon_stats_polling_interval_s(),
        }
    }

    /// The QMP limits these settings give.
    pub fn qmp_limits(&self) -> QmpLimits {
        QmpLimits {
            command_timeout_ms: self.command_timeout_ms,
            max_in_flight_commands: self.max_in_flight_commands,
            max_line_bytes: qmp::MAX_LINE_BYTES,
            reconnect_min_ms: self.reconnect_min_ms,
            reconnect_max_ms: self.reconnect_max_ms,
        }
    }

    /// Checks what serde cannot: ids, uniqueness, non-zero limits.
    pub fn validate(&self) -> Result<(), QemuError> {
        let problem = |problem: String| QemuError::Config {
            hypervisor: self.id.clone(),
            problem,
        };
        check_id("hypervisor id", &self.id).map_err(problem)?;
        let mut seen = HashSet::new();
        for vm in &self.vms {
            check_id("VM id", &vm.id).map_err(problem)?;
            if !seen.insert(vm.id.as_str()) {
                return Err(problem(format!("VM id {:?} appears twice", vm.id)));
            }
            if vm.qmp.as_os_str().is_empty() {
                return Err(problem(format!("VM {:?} has an empty qmp path", vm.id)));
            }
        }
        let positive = [
            ("command_timeout_ms", self.command_timeout_ms),
            ("max_in_flight_commands", self.max_in_flight_commands as u64),
            ("reconnect_min_ms", self.reconnect_min_ms),
            ("max_screendump_bytes", self.max_screendump_bytes),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(problem(format!("{name} must be more than 0")));
            }
        }
        if self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(problem("reconnect_max_ms is below reconnect_min_ms".into()));
        }
        if self.balloon_stats_polling_interval_s > MAX_BALLOON_STATS_POLLING_INTERVAL_S {
            return Err(problem(format!(
                "balloon_stats_polling_interval_s must be at most {MAX_BALLOON_STATS_POLLING_INTERVAL_S}"
            )));
        }
        if self.one_time_password_ttl_ms < 1_000 {
            // QEMU expires passwords in whole seconds.
            return Err(problem(
                "one_time_password_ttl_ms must be at least 1000".into(),
            ));
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// How the appliance's loader is expected to read it: an internally
    /// tagged enum over `kind`, which consumes the tag, so
    /// `deny_unknown_fields` still catches typos.
    #[derive(Debug, Deserialize)]
    #[serde(tag = "kind", rename_all = "snake_case")]
    enum Entry {
        Qemu(QemuConfig),
    }

    #[derive(Debug, Deserialize)]
    struct File {
        hypervisors: Vec<Entry>,
    }

    #[test]
    fn parses_the_documented_example_with_defaults() {
        let text = r#"
            [[hypervisors]]
            id = "kvm1"
            kind = "qemu"
            vms = [{ id = "web01", qmp = "/run/qemu/web01.qmp" },
                   { id = "db01", name = "database", qmp = "/run/qemu/db01.qmp" }]
            command_timeout_ms = 2000
        "#;
        let file: File = toml::from_str(text).unwrap();
        let Entry::Qemu(config) = &file.hypervisors[0];
        assert_eq!(config.id, "kvm1");
        assert_eq!(config.vms.len(), 2);
        assert_eq!(config.vms[1].name.as_deref(), Some("database"));
        assert_eq!(config.command_timeout_ms, 2000);
        assert_eq!(config.one_time_password_ttl_ms, ONE_TIME_PASSWORD_TTL_MS);
        assert_eq!(
            config.balloon_stats_polling_interval_s,
            BALLOON_STATS_POLLING_INTERVAL_S
        );
        assert_eq!(config.qmp_limits().max_line_bytes, qmp::MAX_LINE_BYTES);
        config.validate().unwrap();
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values() {
        let typo = r#"
            [[hypervisors]]
            id = "kvm1"
            kind = "qemu"
            vms = []
            command_timeout = 2000
        "#;
        let e = toml::from_str::<File>(typo).unwrap_err().to_string();
        assert!(e.contains("command_timeout"), "{e}");
        let vm_typo = r#"
            [[hypervisors]]
            id = "kvm1"
            kind = "qemu"
            vms = [{ id = "a", qmp = "/x", vnc = "1" }]
        "#;
        assert!(toml::from_str::<File>(vm_typo).is_err());

        let vm = |id: &str| QemuVmConfig {
            id: id.into(),
            name: None,
            qmp: "/run/x.qmp".into(),
        };
        let bad = [
            QemuConfig::new("", vec![]),
            QemuConfig::new("kvm1", vec![vm("a"), vm("a")]),
            QemuConfig::new("kvm1", vec![vm("../etc")]),
            QemuConfig {
                command_timeout_ms: 0,
                ..QemuConfig::new("kvm1", vec![])
            },
            QemuConfig {
                reconnect_max_ms: 1,
                ..QemuConfig::new("kvm1", vec![])
            },
            QemuConfig {
                one_time_password_ttl_ms: 10,
                ..QemuConfig::new("kvm1", vec![])
            },
            QemuConfig {
                balloon_stats_polling_interval_s: MAX_BALLOON_STATS_POLLING_INTERVAL_S + 1,
                ..QemuConfig::new("kvm1", vec![])
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
        QemuConfig::new("kvm1", vec![vm("a"), vm("b")])
            .validate()
            .unwrap();
    }
}
