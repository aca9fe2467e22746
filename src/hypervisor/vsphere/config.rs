//! The configuration of one vSphere hypervisor (`[[hypervisors]]` with
//! `kind = "vsphere"`), and the password read from its file.
//!
//! The password never appears in the config struct (only the file's path
//! does) and [`Secret`]'s `Debug` prints nothing of it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hypervisor::pool::{self, PoolConfig};

/// A request to the API answered slower than this fails (`Timeout`).
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// A power action followed longer than this fails (`Timeout`): a guest
/// shutdown can take minutes.
pub const DEFAULT_TASK_TIMEOUT_MS: u64 = 300_000;
/// Hypervisor calls in flight at once (the control plane's queue uses it).
pub const DEFAULT_MAX_CONCURRENT: usize = 4;
/// How long one `WaitForUpdatesEx` waits for changes, in seconds, unless
/// configured: an answer every 20 s keeps the session alive (far below
/// the host's 30-minute idle timeout) and stays below the request timeout.
pub const DEFAULT_UPDATES_MAX_WAIT_S: u64 = 20;
/// Objects one `WaitForUpdatesEx` answer may carry unless configured (the
/// host truncates beyond and the next call continues).
pub const DEFAULT_UPDATES_MAX_OBJECTS: u64 = 1_000;
/// The longest pause between two attempts to follow updates again after
/// the session or the filter was lost, in ms, unless configured.
pub const DEFAULT_UPDATES_RECONNECT_MAX_MS: u64 = 30_000;
/// Largest `updates_max_objects` accepted (an answer's XML stays within
/// the SOAP response bound).
pub const MAX_UPDATES_MAX_OBJECTS: u64 = 10_000;
/// Largest `updates_max_wait_s` accepted.
pub const MAX_UPDATES_MAX_WAIT_S: u64 = 3_600;
/// Time of a request's timeout kept free beyond a `WaitForUpdatesEx`'s
/// wait, in ms (the answer must still arrive within the timeout).
pub const UPDATES_WAIT_MARGIN_MS: u64 = 2_000;
/// Largest password file read, in bytes.
pub const MAX_PASSWORD_FILE_BYTES: u64 = 4096;

/// One vSphere endpoint (ESXi or vCenter). Units are in the names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsphereConfig {
    /// The hypervisor's id in the appliance (`esx1`).
    pub id: String,
    /// The SOAP endpoint, `https://host[:port]/sdk`.
    pub url: String,
    pub username: String,
    /// A file holding the password (read at start, trailing newline
    /// dropped).
    pub password_file: PathBuf,
    /// Pin of the API endpoint's certificate (SHA-1 `AA:BB:…` or
    /// SHA-256); wins over `ca_file`. Without either, the system roots.
    #[serde(default)]
    pub thumbprint: Option<String>,
    /// PEM roots for the API endpoint's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    #[serde(default = "default_session_ttl_ms")]
    pub session_ttl_ms: u64,
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    #[serde(default = "default_acquire_timeout_ms")]
    pub acquire_timeout_ms: u64,
    #[serde(default = "default_keepalive_interval_ms")]
    pub keepalive_interval_ms: u64,
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    #[serde(default = "default_task_timeout_ms")]
    pub task_timeout_ms: u64,
    /// ESXi host names (as vCenter names them in console tickets) to
    /// addresses the appliance can reach (`"esx-07.lab" = "10.1.2.7"`).
    #[serde(default)]
    pub host_map: BTreeMap<String, String>,
    /// Follow power-state and name changes with the PropertyCollector's
    /// `WaitForUpdatesEx` on a session of its own (they reach
    /// `vm_status_changed` at once instead of at the next list refresh).
    #[serde(default = "default_follow_updates")]
    pub follow_updates: bool,
    /// `maxWaitSeconds` of each `WaitForUpdatesEx`; the wait used is at
    /// most `request_timeout_ms` less 2 s (at least 1 s), see
    /// [`VsphereConfig::updates_wait_s`].
    #[serde(default = "default_updates_max_wait_s")]
    pub updates_max_wait_s: u64,
    /// `maxObjectUpdates` of each `WaitForUpdatesEx`.
    #[serde(default = "default_updates_max_objects")]
    pub updates_max_objects: u64,
    /// The longest pause before following updates again once the session
    /// or the filter was lost (the pause doubles from 100 ms up to this).
    #[serde(default = "default_updates_reconnect_max_ms")]
    pub updates_reconnect_max_ms: u64,
}

fn default_follow_updates() -> bool {
    true
}
fn default_updates_max_wait_s() -> u64 {
    DEFAULT_UPDATES_MAX_WAIT_S
}
fn default_updates_max_objects() -> u64 {
    DEFAULT_UPDATES_MAX_OBJECTS
}
fn default_updates_reconnect_max_ms() -> u64 {
    DEFAULT_UPDATES_RECONNECT_MAX_MS
}

fn default_pool_size() -> usize {
    pool::DEFAULT_POOL_SIZE
}
fn default_session_ttl_ms() -> u64 {
    pool::DEFAULT_SESSION_TTL_MS
}
fn default_max_concurrent() -> usize {
    DEFAULT_MAX_CONCURRENT
}
fn default_acquire_timeout_ms() -> u64 {
    pool::DEFAULT_ACQUIRE_TIMEOUT_MS
}
fn default_keepalive_interval_ms() -> u64 {
    pool::DEFAULT_KEEPALIVE_INTERVAL_MS
}
fn default_request_timeout_ms() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_MS
}
fn default_task_timeout_ms() -> u64 {
    DEFAULT_TASK_TIMEOUT_MS
}

impl VsphereConfig {
    /// A config with every optional field at its default.
    pub fn new(id: &str, url: &str, username: &str, password_file: &Path) -> VsphereConfig {
        VsphereConfig {
            id: id.to_string(),
            url: url.to_string(),
            username: username.to_string(),
            password_file: password_file.to_path_buf(),
            thumbprint: None,
            ca_file: None,
            pool_size: default_pool_size(),
            session_ttl_ms: default_session_ttl_ms(),
            max_concurrent: default_max_concurrent(),
            acquire_timeout_ms: default_acquire_timeout_ms(),
            keepalive_interval_ms: default_keepalive_interval_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            task_timeout_ms: default_task_timeout_ms(),
            host_map: BTreeMap::new(),
            follow_updates: default_follow_updates(),
            updates_max_wait_s: default_updates_max_wait_s(),
            updates_max_objects: default_updates_max_objects(),
            updates_reconnect_max_ms: default_updates_reconnect_max_ms(),
        }
    }

    pub fn pool_config(&self) -> PoolConfig {
        PoolConfig {
            pool_size: self.pool_size,
            session_ttl_ms: self.session_ttl_ms,
            acquire_timeout_ms: self.acquire_timeout_ms,
            keepalive_interval_ms: self.keepalive_interval_ms,
        }
    }

    /// Refuses values that cannot work (before anything is read).
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() || self.username.is_empty() {
            return Err("id and username must not be empty".into());
        }
        if !self.url.starts_with("https://") {
            return Err(format!(
                "url {:?} must be https:// (the API carries credentials)",
                self.url
            ));
        }
        if self.max_concurrent == 0 || self.request_timeout_ms == 0 || self.task_timeout_ms == 0 {
            return Err(
                "max_concurrent, request_timeout_ms and task_timeout_ms must be above 0".into(),
            );
        }
        self.validate_updates()?;
        self.pool_config().validate()
    }

    /// The `maxWaitSeconds` sent: `updates_max_wait_s`, shortened so the
    /// answer comes within the request timeout.
    pub fn updates_wait_s(&self) -> u64 {
        let fits_s = self
            .request_timeout_ms
            .saturating_sub(UPDATES_WAIT_MARGIN_MS)
            / 1000;
        self.updates_max_wait_s.min(fits_s).max(1)
    }

    fn validate_updates(&self) -> Result<(), String> {
        if self.updates_max_wait_s == 0 || self.updates_max_wait_s > MAX_UPDATES_MAX_WAIT_S {
            return Err(format!(
                "updates_max_wait_s must be 1 to {MAX_UPDATES_MAX_WAIT_S}"
            ));
        }
        if self.updates_max_objects == 0 || self.updates_max_objects > MAX_UPDATES_MAX_OBJECTS {
            return Err(format!(
                "updates_max_objects must be 1 to {MAX_UPDATES_MAX_OBJECTS}"
            ));
        }
        if !(100..=3_600_000).contains(&self.updates_reconnect_max_ms) {
            return Err("updates_reconnect_max_ms must be 100 to 3600000".into());
        }
        Ok(())
    }

    /// Reads the password file: a private file (`o-rwx`, the rule of every
    /// secret file), at most [`MAX_PASSWORD_FILE_BYTES`].
    pub fn read_password(&self) -> Result<Secret, String> {
        let path = &self.password_file;
        let bytes = crate::config::secrets::read_private_file(path, MAX_PASSWORD_FILE_BYTES)
            .map_err(|e| format!("password file: {e}"))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| format!("password file {path:?} is not UTF-8 text"))?;
        let password = text.strip_suffix('\n').unwrap_or(&text);
        let password = password.strip_suffix('\r').unwrap_or(password);
        if password.is_empty() {
            return Err(format!("password file {path:?} is empty"));
        }
        Ok(Secret(password.to_string()))
    }
}

/// A password: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: &str) -> Secret {
        Secret(value.to_string())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
        id = "esx1"
        url = "https://esx1.example/sdk"
        username = "svc-console"
        password_file = "/etc/consolegate/esx1.password"
        thumbprint = "AA:BB"
        pool_size = 5
        session_ttl_ms = 300000
        max_concurrent = 4
        acquire_timeout_ms = 2000
        host_map = { "esx-07.lab" = "10.1.2.7" }
    "#;

    #[test]
    fn the_issue_example_parses_with_defaults_for_the_rest() {
        let c: VsphereConfig = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(c.id, "esx1");
        assert_eq!(c.thumbprint.as_deref(), Some("AA:BB"));
        assert_eq!(c.request_timeout_ms, DEFAULT_REQUEST_TIMEOUT_MS);
        assert_eq!(c.keepalive_interval_ms, pool::DEFAULT_KEEPALIVE_INTERVAL_MS);
        assert_eq!(c.host_map["esx-07.lab"], "10.1.2.7");
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused_also_inside_a_tagged_hypervisor_list() {
        let bad = format!("{EXAMPLE}\npool_sise = 3\n");
        assert!(toml::from_str::<VsphereConfig>(&bad).is_err());
        // How the appliance's config will hold it: `kind` picks the variant.
        #[derive(Debug, Deserialize)]
        #[serde(tag = "kind", rename_all = "snake_case")]
        enum Hypervisor {
            Vsphere(VsphereConfig),
        }
        #[derive(Debug, Deserialize)]
        struct File {
            hypervisors: Vec<Hypervisor>,
        }
        let text = format!("[[hypervisors]]\nkind = \"vsphere\"\n{EXAMPLE}");
        let file: File = toml::from_str(&text).unwrap();
        let Hypervisor::Vsphere(c) = &file.hypervisors[0];
        assert_eq!(c.username, "svc-console");
        let text = format!("[[hypervisors]]\nkind = \"vsphere\"\nbogus = 1\n{EXAMPLE}");
        assert!(toml::from_str::<File>(&text).is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        let good: VsphereConfig = toml::from_str(EXAMPLE).unwrap();
        let mut c = good.clone();
        c.url = "http://esx1/sdk".into();
        assert!(c.validate().is_err());
        let mut c = good.clone();
        c.pool_size = 0;
        assert!(c.validate().is_err());
        let mut c = good.clone();
        c.request_timeout_ms = 0;
        assert!(c.validate().is_err());
        let mut c = good.clone();
        c.updates_max_wait_s = 0;
        assert!(c.validate().unwrap_err().contains("updates_max_wait_s"));
        // The wait fits in the request timeout.
        let mut c = good.clone();
        assert_eq!(c.updates_wait_s(), DEFAULT_UPDATES_MAX_WAIT_S);
        c.request_timeout_ms = 5_000;
        assert_eq!(c.updates_wait_s(), 3);
        c.request_timeout_ms = 500;
        assert_eq!(c.updates_wait_s(), 1);
        let mut c = good;
        c.updates_max_objects = 0;
        assert!(c.validate().unwrap_err().contains("updates_max_objects"));
    }

    #[test]
    fn the_password_is_read_trimmed_and_never_printed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret-pass\n").unwrap();
        let c = VsphereConfig::new("esx1", "https://h/sdk", "u", &path);
        // Others may read it: refused, naming the file and the mode.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o604)).unwrap();
        let e = c.read_password().unwrap_err();
        assert!(
            e.contains("(mode 0604)") && e.contains(&format!("chmod o-rwx {}", path.display())),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let secret = c.read_password().unwrap();
        assert_eq!(secret.expose(), "s3cret-pass");
        assert!(!format!("{secret:?}").contains("s3cret"));
        assert!(!format!("{c:?}").contains("s3cret"));
        std::fs::write(&path, "\n").unwrap();
        assert!(c.read_password().is_err());
        let missing = VsphereConfig::new("esx1", "https://h/sdk", "u", &dir.path().join("no"));
        assert!(missing.read_password().is_err());
    }
}
