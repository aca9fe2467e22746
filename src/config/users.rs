//! The users' part of the appliance config: `[auth.jwt]` (who a request
//! is, from a JSON Web Token the portal issued) and `[viewers]` (the pool
//! of consoles: per user, in total, idle expiry, what a full pool does).
//!
//! Plain values and their validation, like the rest of `config`: no file is
//! read here (the key files are opened by `crate::auth` at start-up) and
//! nothing here depends on the planes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::appliance::{ApplianceConfig, ConfigFileError};
use super::Limits;

/// Largest `auth.jwt.leeway_ms`: clocks that disagree by more than five
/// minutes need fixing, not a wider window for expired tokens.
pub const MAX_JWT_LEEWAY_MS: u64 = 300_000;
/// Longest claim name (`auth.jwt.roles_claim`).
pub const MAX_CLAIM_NAME_BYTES: usize = 64;
/// Longest `auth.jwt.issuer` / `auth.jwt.audience`.
pub const MAX_JWT_NAME_BYTES: usize = 1024;

/// The signature algorithm every token must use (pinned: a token whose
/// header names another algorithm, or `none`, is refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with a shared secret (`hs256_secret_file`).
    HS256,
    /// RSA PKCS#1 v1.5 with SHA-256 (`public_key_file`, PEM).
    RS256,
    /// Ed25519 (`public_key_file`, PEM).
    EdDSA,
}

/// `[auth.jwt]`: JSON Web Tokens on the control API, next to the static
/// `[[auth.tokens]]` (which keep working for services). Off by default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// Accept JWTs as bearer tokens. Cost: one signature check per request
    /// (measured CPU: HS256 ~3.5 µs, RS256 ~40 µs, EdDSA ~55 µs; see
    /// docs/BENCHMARKS.md).
    pub enabled: bool,
    /// `HS256`, `RS256` or `EdDSA`.
    pub algorithm: JwtAlgorithm,
    /// HS256: a file holding the shared secret (at least 32 bytes; a
    /// trailing newline is not part of it). Never inline in this file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hs256_secret_file: Option<PathBuf>,
    /// RS256 / EdDSA: the issuer's public key, PEM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
    /// The `iss` every token must carry (required when enabled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// An `aud` every token must carry (required when enabled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, applied in whole seconds
    /// (JWT times are seconds). Cost: a token stays usable this much past
    /// its expiry.
    pub leeway_ms: u64,
    /// The claim that holds the roles (`viewer`, `operator`, `admin`; a
    /// string, space-separated string or array; the highest wins).
    pub roles_claim: String,
    /// Viewers may open consoles of every VM. Off: only those their `vms`
    /// claim names (ids or glob patterns), none without the claim.
    pub viewer_all_vms: bool,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            algorithm: JwtAlgorithm::HS256,
            hs256_secret_file: None,
            public_key_file: None,
            issuer: None,
            audience: None,
            leeway_ms: 30_000,
            roles_claim: "roles".to_string(),
            viewer_all_vms: false,
        }
    }
}

/// What a new console does when its user is at their cap or the pool is
/// full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenFull {
    /// Close the least recently active console (the user's own when the
    /// user is at their cap, anyone's when the pool is full) to make room.
    Evict,
    /// Refuse the new one: 429 with Retry-After.
    Refuse,
}

/// `[viewers]`: the pool of consoles (live and pending sessions) the
/// appliance holds for its users.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ViewersConfig {
    /// Consoles open or pending at once, in total: the pool's size. Cost: a
    /// registry entry each, plus buffers while relaying.
    pub max_sessions: usize,
    /// Consoles open or pending at once per user.
    pub max_sessions_per_user: usize,
    /// A console with no traffic either way for this long is closed (1001,
    /// reason "idle timeout"); 0 = never. Applies to appliance sessions
    /// (the stricter of this and `dataplane.limits.idle_timeout_ms` when
    /// both are set). Cost: too short closes consoles people look at
    /// without touching (a still screen sends nothing).
    pub idle_timeout_ms: u64,
    /// `evict` or `refuse` when a user is at their cap or the pool is full.
    pub when_full: WhenFull,
}

impl Default for ViewersConfig {
    fn default() -> Self {
        Self {
            max_sessions: 10_000,
            max_sessions_per_user: 20,
            idle_timeout_ms: 1_800_000,
            when_full: WhenFull::Refuse,
        }
    }
}

/// Largest value of a `[rate_limits]` key.
pub const MAX_RATE_LIMIT: u32 = 1_000_000;
/// Smallest `rate_limits.max_tracked_ips`: a table must hold a probe
/// window of slots.
pub const MIN_TRACKED_IPS: usize = 64;
/// Largest `rate_limits.max_tracked_ips` (16 Mi slots: 384 MiB on the
/// console side, far more than a reasonable deployment wants).
pub const MAX_TRACKED_IPS: usize = 1 << 24;

/// `[rate_limits]`: how fast anyone may ask for consoles. A limit of n per
/// window allows a burst of n, then one more every window / n (GCRA);
/// 0 turns it off. Over a limit: 429 with Retry-After, counted in
/// `/metrics` (`consolegate_errors_total{cause="rate_limited_…"}`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// Consoles a user may create per minute (both `POST` endpoints).
    /// Cost: a little state per user active within the window.
    pub sessions_per_user_per_minute: u32,
    /// … per hour.
    pub sessions_per_user_per_hour: u32,
    /// … per day.
    pub sessions_per_user_per_day: u32,
    /// REST requests (every `/api/` route; `/healthz`, `/readyz` and
    /// `/metrics` are exempt so probes and scrapers behind one address
    /// keep working) per client IP per second, with a burst of as many.
    /// Cost: one entry per client IP seen within a second, at most
    /// `max_tracked_ips`.
    pub rest_per_ip_per_s: u32,
    /// WebSocket (console port) connections per client IP per second,
    /// with a burst of as many; checked on the worker before any byte is
    /// read (after the PROXY header when one is expected). Cost: a slot of
    /// the shared client table per IP.
    pub handshakes_per_ip_per_s: u32,
    /// Console-port connections of one client IP still in their handshake
    /// (TLS, upgrade request, ticket check) at once.
    pub handshaking_per_ip: u32,
    /// Console-port connections still in their handshake at once, in total
    /// (answered with 429, unlike `dataplane.limits.max_handshaking_connections`,
    /// the hard bound, beyond which a connection is closed unanswered).
    pub handshaking_total: u32,
    /// Client IPs tracked at once by each per-IP table (the console port's
    /// and the control port's; an IPv6 client counts by its /64). Cost:
    /// 24 bytes per slot on the console side, allocated at start when a
    /// per-IP console limit is on; about 64 bytes per IP in use on the
    /// control side. When the table is full a new IP replaces an idle one,
    /// or (console side, all its candidate slots busy) goes unlimited and
    /// is counted as `client_table_full`.
    pub max_tracked_ips: usize,
}

/// Default of `rate_limits.max_tracked_ips`.
pub const DEFAULT_MAX_TRACKED_IPS: usize = 65_536;

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            sessions_per_user_per_minute: 0,
            sessions_per_user_per_hour: 0,
            sessions_per_user_per_day: 0,
            rest_per_ip_per_s: 0,
            handshakes_per_ip_per_s: 0,
            handshaking_per_ip: 0,
            handshaking_total: 0,
            max_tracked_ips: DEFAULT_MAX_TRACKED_IPS,
        }
    }
}

impl RateLimitsConfig {
    pub fn validate(&self) -> Result<(), ConfigFileError> {
        for (key, v) in [
            (
                "rate_limits.sessions_per_user_per_minute",
                self.sessions_per_user_per_minute,
            ),
            (
                "rate_limits.sessions_per_user_per_hour",
                self.sessions_per_user_per_hour,
            ),
            (
                "rate_limits.sessions_per_user_per_day",
                self.sessions_per_user_per_day,
            ),
            ("rate_limits.rest_per_ip_per_s", self.rest_per_ip_per_s),
            (
                "rate_limits.handshakes_per_ip_per_s",
                self.handshakes_per_ip_per_s,
            ),
            ("rate_limits.handshaking_per_ip", self.handshaking_per_ip),
            ("rate_limits.handshaking_total", self.handshaking_total),
        ] {
            if v > MAX_RATE_LIMIT {
                return Err(invalid(key, format!("at most {MAX_RATE_LIMIT} (0 = off)")));
            }
        }
        if !(MIN_TRACKED_IPS..=MAX_TRACKED_IPS).contains(&self.max_tracked_ips) {
            return Err(invalid(
                "rate_limits.max_tracked_ips",
                format!("must be between {MIN_TRACKED_IPS} and {MAX_TRACKED_IPS}"),
            ));
        }
        Ok(())
    }
}

/// Shortest non-zero `viewers.idle_timeout_ms`: the workers check idle
/// time once per tick, and a console idle for less than a second is not
/// idle.
pub const MIN_IDLE_TIMEOUT_MS: u64 = 1000;

impl ApplianceConfig {
    /// The pool's size: `[viewers] max_sessions`, or the old
    /// `[sessions] max_sessions` when a file still sets it.
    pub fn pool_max_sessions(&self) -> usize {
        self.sessions
            .max_sessions
            .unwrap_or(self.viewers.max_sessions)
    }

    /// Consoles per user: `[viewers] max_sessions_per_user`, or the old
    /// `[sessions]` key when set.
    pub fn pool_max_sessions_per_user(&self) -> usize {
        self.sessions
            .max_sessions_per_user
            .unwrap_or(self.viewers.max_sessions_per_user)
    }

    /// The data-plane limits of appliance sessions: `[dataplane.limits]`
    /// with the idle timeout the stricter of its own and `[viewers]`'s
    /// (0 is "never" in both).
    pub fn console_limits(&self) -> Limits {
        let mut limits = self.dataplane.limits.clone();
        limits.idle_timeout_ms = match (limits.idle_timeout_ms, self.viewers.idle_timeout_ms) {
            (0, v) => v,
            (d, 0) => d,
            (d, v) => d.min(v),
        };
        limits
    }

    pub(super) fn validate_viewers(&self) -> Result<(), ConfigFileError> {
        self.rate_limits.validate()?;
        let (total_key, total) = match self.sessions.max_sessions {
            Some(n) => ("sessions.max_sessions", n),
            None => ("viewers.max_sessions", self.viewers.max_sessions),
        };
        if !(1..=10_000_000).contains(&total) {
            return Err(invalid(total_key, "must be between 1 and 10000000"));
        }
        let (user_key, per_user) = match self.sessions.max_sessions_per_user {
            Some(n) => ("sessions.max_sessions_per_user", n),
            None => (
                "viewers.max_sessions_per_user",
                self.viewers.max_sessions_per_user,
            ),
        };
        if per_user < 1 || per_user > total {
            return Err(invalid(
                user_key,
                format!("must be between 1 and {total_key} ({total})"),
            ));
        }
        let idle = self.viewers.idle_timeout_ms;
        if idle != 0 && !(MIN_IDLE_TIMEOUT_MS..=7 * 86_400_000).contains(&idle) {
            return Err(invalid(
                "viewers.idle_timeout_ms",
                format!("0 (never) or between {MIN_IDLE_TIMEOUT_MS} and 604800000 (a week)"),
            ));
        }
        Ok(())
    }

    pub(super) fn viewers_warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        for (set, key) in [
            (self.sessions.max_sessions.is_some(), "max_sessions"),
            (
                self.sessions.max_sessions_per_user.is_some(),
                "max_sessions_per_user",
            ),
        ] {
            if set {
                w.push(format!(
                    "sessions.{key} has moved to viewers.{key}; the [sessions] value is used"
                ));
            }
        }
        w
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigFileError {
    ConfigFileError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

impl JwtConfig {
    /// Cross-field rules; pure (the files are opened by `crate::auth`).
    pub fn validate(&self) -> Result<(), ConfigFileError> {
        if self.leeway_ms > MAX_JWT_LEEWAY_MS {
            return Err(invalid(
                "auth.jwt.leeway_ms",
                format!("must be at most {MAX_JWT_LEEWAY_MS}"),
            ));
        }
        let claim = self.roles_claim.trim();
        if claim.is_empty() || claim.len() > MAX_CLAIM_NAME_BYTES {
            return Err(invalid(
                "auth.jwt.roles_claim",
                format!("must be 1..{MAX_CLAIM_NAME_BYTES} bytes"),
            ));
        }
        if !self.enabled {
            return Ok(());
        }
        for (key, value) in [
            ("auth.jwt.issuer", &self.issuer),
            ("auth.jwt.audience", &self.audience),
        ] {
            match value.as_deref().map(str::trim) {
                None | Some("") => {
                    return Err(invalid(
                        key,
                        "required when auth.jwt.enabled (tokens of another issuer or for another service must not pass)",
                    ))
                }
                Some(v) if v.len() > MAX_JWT_NAME_BYTES => {
                    return Err(invalid(key, format!("at most {MAX_JWT_NAME_BYTES} bytes")))
                }
                Some(_) => {}
            }
        }
        let empty = |p: &Option<PathBuf>| p.as_ref().is_none_or(|p| p.as_os_str().is_empty());
        match self.algorithm {
            JwtAlgorithm::HS256 => {
                if empty(&self.hs256_secret_file) {
                    return Err(invalid(
                        "auth.jwt.hs256_secret_file",
                        "required with algorithm HS256",
                    ));
                }
                if self.public_key_file.is_some() {
                    return Err(invalid(
                        "auth.jwt.public_key_file",
                        "does not apply to HS256 (set hs256_secret_file)",
                    ));
                }
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::EdDSA => {
                if empty(&self.public_key_file) {
                    return Err(invalid(
                        "auth.jwt.public_key_file",
                        format!("required with algorithm {:?}", self.algorithm),
                    ));
                }
                if self.hs256_secret_file.is_some() {
                    return Err(invalid(
                        "auth.jwt.hs256_secret_file",
                        format!("does not apply to {:?}", self.algorithm),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(e: ConfigFileError) -> String {
        match e {
            ConfigFileError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn jwt_rules_name_their_key() {
        let on = JwtConfig {
            enabled: true,
            hs256_secret_file: Some("/etc/consolegate/jwt.secret".into()),
            issuer: Some("https://portal.example".into()),
            audience: Some("consolegate".into()),
            ..JwtConfig::default()
        };
        on.validate().unwrap();
        JwtConfig::default().validate().unwrap();
        let cases: Vec<(&str, JwtConfig)> = vec![
            (
                "auth.jwt.issuer",
                JwtConfig {
                    issuer: None,
                    ..on.clone()
                },
            ),
            (
                "auth.jwt.audience",
                JwtConfig {
                    audience: Some(" ".into()),
                    ..on.clone()
                },
            ),
            (
                "auth.jwt.hs256_secret_file",
                JwtConfig {
                    hs256_secret_file: None,
                    ..on.clone()
                },
            ),
            (
                "auth.jwt.public_key_file",
                JwtConfig {
                    public_key_file: Some("/k.pem".into()),
                    ..on.clone()
                },
            ),
            (
                "auth.jwt.public_key_file",
                JwtConfig {
                    algorithm: JwtAlgorithm::EdDSA,
                    hs256_secret_file: None,
                    ..on.clone()
                },
            ),
            (
                "auth.jwt.hs256_secret_file",
                JwtConfig {
                    algorithm: JwtAlgorithm::RS256,
                    public_key_file: Some("/k.pem".into()),
                    ..on.clone()
                },
            ),
            (
                "auth.jwt.leeway_ms",
                JwtConfig {
                    leeway_ms: MAX_JWT_LEEWAY_MS + 1,
                    ..on.clone()
                },
            ),
            (
                "auth.jwt.roles_claim",
                JwtConfig {
                    roles_claim: String::new(),
                    ..on.clone()
                },
            ),
        ];
        for (key, cfg) in cases {
            assert_eq!(key_of(cfg.validate().unwrap_err()), key, "{cfg:?}");
        }
    }
}
