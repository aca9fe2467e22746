//! `systemctl reload` (SIGHUP): read the config again, with its token files,
//! credentials and TLS certificate, and apply what can change while
//! consoles are live:
//!
//! - the API tokens (`[[auth.tokens]]`, from the file, token files,
//!   credentials and `CONSOLEGATE_AUTH_*`): the next request is checked
//!   against the new set;
//! - the users' JWT verifier (`[auth.jwt]`, its key file read again): the
//!   next request's JWT is checked with it;
//! - the console certificate (`tls.cert`, `tls.key`): handshakes that begin
//!   after the reload present it, connected sessions keep theirs;
//! - the log filter (`log.level`).
//!
//! Everything else (listen addresses, workers, limits, sessions, ports…)
//! is compared with the running config and each changed key is named in a
//! warning: it applies at the next start, which an upgrade hand-off
//! (SIGUSR2, see `handoff`) provides without dropping consoles.
//!
//! A config that does not load, validate, resolve its secrets or whose
//! certificate pair does not load is refused as a whole: one error line
//! names the key, and nothing changes. Depends on the config, the control
//! state and the data plane's certificate; never on an IO backend.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::auth::jwt::KeyError;
use crate::auth::JwtVerifier;
use crate::config::appliance::{ApplianceConfig, ConfigFileError, Source};
use crate::config::secrets::{credentials_dir_from_env, CredentialMode};
use crate::control::ControlState;
use crate::dataplane::tls::{ReloadableCert, TlsError};
use crate::service::logging::LogControl;
use crate::service::notify::Notifier;

/// Why a reload was refused. The running config stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] ConfigFileError),
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Jwt(#[from] KeyError),
    #[error("log.level: {0}")]
    Log(String),
}

impl ReloadError {
    /// The key (or file, or variable) the refusal is about, for the log
    /// line's `key` field.
    pub fn key(&self) -> String {
        match self {
            ReloadError::Config(ConfigFileError::Invalid { key, .. }) => key.clone(),
            ReloadError::Config(ConfigFileError::Env { var, .. }) => var.clone(),
            ReloadError::Config(ConfigFileError::Read { path, .. }) => path.display().to_string(),
            // "path: key.path (line L, column C): …"
            ReloadError::Config(ConfigFileError::Parse { message, .. }) => message
                .split([' ', ':'])
                .next()
                .unwrap_or("config")
                .to_string(),
            ReloadError::Tls(TlsError::Cert { .. }) => "tls.cert".into(),
            ReloadError::Tls(_) => "tls.key".into(),
            ReloadError::Jwt(_) => "auth.jwt".into(),
            ReloadError::Log(_) => "log.level".into(),
        }
    }
}

/// What a reload applied and what waits for a restart.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub tokens: usize,
    pub certificate_replaced: bool,
    /// Changed keys that apply only at the next start.
    pub needs_restart: Vec<String>,
}

/// Load, override, validate and read the secrets of a config, with the
/// service's rule: a config file must give an admin token. What `run`,
/// `check-config` and a reload all do first.
pub fn load_config(
    path: Option<&Path>,
    vars: impl IntoIterator<Item = (String, String)>,
    credentials: CredentialMode,
) -> Result<(ApplianceConfig, Source, Vec<String>), ConfigFileError> {
    let (mut cfg, source) = ApplianceConfig::load_with_env(path, vars)?;
    let warnings = cfg.resolve_secrets(credentials_dir_from_env().as_deref(), credentials)?;
    require_admin_with_file(&cfg, &source)?;
    Ok((cfg, source, warnings))
}

/// With a config file (the packaged appliance) at least one admin token is
/// required: none means the service refuses to start instead of making one
/// up and printing it. Only the built-in defaults (`consolegate run` with
/// no `--config`, as `make run` does) generate one.
pub fn require_admin_with_file(
    cfg: &ApplianceConfig,
    source: &Source,
) -> Result<(), ConfigFileError> {
    if matches!(source, Source::BuiltIn) || cfg.has_admin_token() {
        return Ok(());
    }
    Err(ConfigFileError::Invalid {
        key: "auth.tokens".into(),
        message: format!(
            "no admin token in {source}: add an [[auth.tokens]] entry with role = \"admin\" \
             (token_file = \"/path\" or credential = \"admin-token\" with the unit's \
             LoadCredential=), or set CONSOLEGATE_AUTH_TOKEN"
        ),
    })
}

/// Applies reloads to a running appliance.
pub struct Reloader {
    path: Option<PathBuf>,
    /// The config in force (secrets read).
    running: Mutex<ApplianceConfig>,
    control: Arc<ControlState>,
    cert: Option<Arc<ReloadableCert>>,
    log: LogControl,
    notifier: Notifier,
    /// The admin token generated at start (built-in defaults only), kept
    /// across reloads: the defaults have none to reload.
    generated_tokens: Vec<crate::config::appliance::TokenConfig>,
}

impl Reloader {
    /// `running` is the config as [`load_config`] returned it, before the
    /// start-up filled anything in (state directory, generated token);
    /// `generated_tokens` are the tokens the start-up generated.
    pub fn new(
        path: Option<PathBuf>,
        running: ApplianceConfig,
        control: Arc<ControlState>,
        cert: Option<Arc<ReloadableCert>>,
        log: LogControl,
        notifier: Notifier,
        generated_tokens: Vec<crate::config::appliance::TokenConfig>,
    ) -> Self {
        Self {
            path,
            running: Mutex::new(running),
            control,
            cert,
            log,
            notifier,
            generated_tokens,
        }
    }

    /// Reload now, logging the outcome (one line: applied, or refused with
    /// the key). Returns the same.
    pub fn reload(&self) -> Result<ReloadReport, ReloadError> {
        self.notifier.reloading();
        let result = self.try_reload();
        match &result {
            Ok(r) => {
                tracing::info!(
                    tokens = r.tokens,
                    certificate_replaced = r.certificate_replaced,
                    "configuration reloaded: new sessions and API requests use it"
                );
                if !r.needs_restart.is_empty() {
                    tracing::warn!(
                        keys = %r.needs_restart.join(", "),
                        "changed settings apply only at the next start (systemctl kill -s USR2 \
                         consolegate hands over without dropping consoles)"
                    );
                }
                self.notifier.ready("reloaded");
            }
            Err(e) => {
                tracing::error!(key = %e.key(), error = %e, "reload refused: the configuration in force stays");
                self.notifier
                    .ready("reload refused; previous configuration in force");
            }
        }
        result
    }

    fn try_reload(&self) -> Result<ReloadReport, ReloadError> {
        let (next, _, warnings) = load_config(
            self.path.as_deref(),
            std::env::vars(),
            CredentialMode::Required,
        )?;
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let mut running = self
            .running
            .lock()
            .map_err(|_| ReloadError::Log("reload state poisoned".into()))?;
        let mut report = ReloadReport {
            tokens: next.auth.tokens.len(),
            needs_restart: changed_keys(&running, &next),
            ..ReloadReport::default()
        };
        // The steps that can still fail, before anything is applied. The
        // certificate and the JWT key are read again even from the same
        // paths: the files may be new.
        let jwt = JwtVerifier::from_config(&next.auth.jwt)?;
        if let (Some(cert), Some(tls)) = (&self.cert, &next.tls) {
            cert.replace(&tls.cert, &tls.key)?;
            report.certificate_replaced = true;
        }
        self.log
            .set_level(&next.log.level)
            .map_err(ReloadError::Log)?;
        let mut tokens = next.auth.tokens.clone();
        tokens.extend(self.generated_tokens.iter().cloned());
        report.tokens = tokens.len();
        self.control.api_tokens.store(Arc::new(tokens));
        self.control.jwt.store(jwt.map(Arc::new));
        *running = next;
        Ok(report)
    }
}

/// Keys whose value differs between `a` and `b`, except those a reload
/// applies (`auth`, `log.level`, `tls.cert`, `tls.key`), as dotted paths.
pub fn changed_keys(a: &ApplianceConfig, b: &ApplianceConfig) -> Vec<String> {
    let ta = toml::Value::try_from(a).unwrap_or(toml::Value::Table(Default::default()));
    let tb = toml::Value::try_from(b).unwrap_or(toml::Value::Table(Default::default()));
    let mut out = Vec::new();
    diff("", &ta, &tb, &mut out);
    out.retain(|k| {
        !(k == "auth"
            || k.starts_with("auth.")
            || k == "log.level"
            || k == "tls.cert"
            || k == "tls.key")
    });
    out
}

fn diff(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
    match (a, b) {
        (toml::Value::Table(ta), toml::Value::Table(tb)) => {
            let mut keys: Vec<&String> = ta.keys().chain(tb.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (ta.get(k), tb.get(k)) {
                    (Some(x), Some(y)) => diff(&path, x, y, out),
                    _ => out.push(path),
                }
            }
        }
        (x, y) if x != y => out.push(prefix.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::appliance::{Role, TokenConfig};

    #[test]
    fn changed_keys_skip_what_a_reload_applies() {
        let a = ApplianceConfig::default();
        let mut b = a.clone();
        b.auth
            .tokens
            .push(TokenConfig::new("0123456789abcdef0123".into(), Role::Admin));
        b.auth.jwt.leeway_ms = 1000;
        b.log.level = "debug".into();
        assert!(changed_keys(&a, &b).is_empty());
        b.dataplane.limits.idle_timeout_ms = 5;
        b.console.listen = "127.0.0.1:7000".parse().unwrap();
        b.console.public_url = Some("wss://x".into());
        assert_eq!(
            changed_keys(&a, &b),
            vec![
                "console.listen".to_string(),
                "console.public_url".to_string(),
                "dataplane.limits.idle_timeout_ms".to_string()
            ]
        );
    }

    #[test]
    fn an_admin_token_is_required_with_a_config_file() {
        let cfg = ApplianceConfig::default();
        require_admin_with_file(&cfg, &Source::BuiltIn).unwrap();
        let e = require_admin_with_file(&cfg, &Source::File("/etc/c.toml".into()))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("auth.tokens: no admin token in /etc/c.toml"),
            "{e}"
        );
        assert!(require_admin_with_file(
            &cfg,
            &Source::DefaultFileMissing("/etc/consolegate/consolegate.toml".into())
        )
        .is_err());
        let mut cfg = cfg;
        cfg.auth.tokens.push(TokenConfig {
            credential: Some("admin-token".into()),
            ..TokenConfig::new(String::new(), Role::Admin)
        });
        require_admin_with_file(&cfg, &Source::File("/etc/c.toml".into())).unwrap();
    }

    #[test]
    fn refusals_name_their_key() {
        let e = ReloadError::Config(ConfigFileError::Invalid {
            key: "dataplane.limits.uring_entries".into(),
            message: "x".into(),
        });
        assert_eq!(e.key(), "dataplane.limits.uring_entries");
        let e = ReloadError::Config(ConfigFileError::Parse {
            path: Some("/etc/c.toml".into()),
            message: "control.listen (line 2, column 10): invalid socket address".into(),
        });
        assert_eq!(e.key(), "control.listen");
        let e = ReloadError::Tls(TlsError::Cert {
            path: "/c".into(),
            message: "m".into(),
        });
        assert_eq!(e.key(), "tls.cert");
        let e = ReloadError::Jwt(KeyError::Bad {
            path: "/k".into(),
            message: "m".into(),
        });
        assert_eq!(e.key(), "auth.jwt");
    }
}
