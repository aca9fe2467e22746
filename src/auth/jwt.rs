//! JSON Web Token verification with the `jsonwebtoken` crate: the
//! algorithm pinned by config, `exp` / `nbf` / `iss` / `aud` checked with
//! the configured leeway, then the claims read into a [`Principal`].
//!
//! Why `jsonwebtoken` 9 (not 10+): 9 verifies with `ring`, which the
//! appliance already builds for rustls; 10 needs either `aws-lc-rs` (a C
//! build) or the RustCrypto stack (the `rsa` crate among others).

use std::path::Path;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::{AuthError, Principal, VmGrant, MAX_USER_BYTES, MAX_VM_PATTERNS, MAX_VM_PATTERN_BYTES};
use crate::config::appliance::Role;
use crate::config::secrets::{read_private_file, SecretError};
use crate::config::users::{JwtAlgorithm, JwtConfig};

/// Shortest HS256 secret accepted: 256 bits, the hash's size (RFC 7518
/// §3.2 asks for at least that).
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// Largest key file read (a 4096-bit RSA public key PEM is ~800 bytes).
pub const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;
/// Longest token verified; longer ones are refused unread. Tokens travel
/// in a header bounded by `control.max_request_bytes` anyway.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Errors loading the verifier's key at start-up.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("auth.jwt: cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("auth.jwt: {path}: {message}")]
    Bad { path: String, message: String },
    /// The HS256 secret file is unreadable or others may read it.
    #[error("auth.jwt.hs256_secret_file: {0}")]
    Secret(#[from] SecretError),
}

/// Verifies tokens of one issuer, one audience, one algorithm. Immutable
/// after start: shared read-only (no lock) by whoever checks tokens.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    roles_claim: String,
    viewer_all_vms: bool,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A public key's file: any mode (a public key is public, so unlike the
/// HS256 secret it gets no `o-rwx` check).
fn read_key_file(path: &Path) -> Result<Vec<u8>, KeyError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?;
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(KeyError::Bad {
            path: shown,
            message: format!("larger than {MAX_KEY_FILE_BYTES} bytes: not a key"),
        });
    }
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: shown,
        source,
    })
}

impl JwtVerifier {
    /// The verifier `[auth.jwt]` describes, its key read from its file.
    /// `None` when JWTs are off. The config is validated already.
    pub fn from_config(cfg: &JwtConfig) -> Result<Option<Self>, KeyError> {
        if !cfg.enabled {
            return Ok(None);
        }
        let (algorithm, key) = match cfg.algorithm {
            JwtAlgorithm::HS256 => {
                let path = cfg.hs256_secret_file.as_deref().unwrap_or(Path::new(""));
                // A shared secret: the file must be private (o-rwx).
                let mut secret = read_private_file(path, MAX_KEY_FILE_BYTES)?;
                while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    secret.pop();
                }
                if secret.len() < MIN_HS256_SECRET_BYTES {
                    return Err(KeyError::Bad {
                        path: path.display().to_string(),
                        message: format!(
                            "an HS256 secret must be at least {MIN_HS256_SECRET_BYTES} bytes"
                        ),
                    });
                }
                (Algorithm::HS256, DecodingKey::from_secret(&secret))
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::EdDSA => {
                let path = cfg.public_key_file.as_deref().unwrap_or(Path::new(""));
                let pem = read_key_file(path)?;
                let parsed = if cfg.algorithm == JwtAlgorithm::RS256 {
                    DecodingKey::from_rsa_pem(&pem).map(|k| (Algorithm::RS256, k))
                } else {
                    DecodingKey::from_ed_pem(&pem).map(|k| (Algorithm::EdDSA, k))
                };
                parsed.map_err(|e| KeyError::Bad {
                    path: path.display().to_string(),
                    message: format!("not a {:?} public key in PEM: {e}", cfg.algorithm),
                })?
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.leeway = cfg.leeway_ms.div_ceil(1000);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[cfg.issuer.as_deref().unwrap_or_default().trim()]);
        validation.set_audience(&[cfg.audience.as_deref().unwrap_or_default().trim()]);
        Ok(Some(Self {
            key,
            validation,
            roles_claim: cfg.roles_claim.trim().to_string(),
            viewer_all_vms: cfg.viewer_all_vms,
        }))
    }

    /// The principal a token stands for, or why it does not stand for any.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| refusal(e.kind()))?;
        self.principal(&data.claims)
    }

    fn principal(&self, claims: &Map<String, Value>) -> Result<Principal, AuthError> {
        let user = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_USER_BYTES => s.clone(),
            _ => return Err(AuthError::BadClaim("sub")),
        };
        let role = roles_of(claims.get(&self.roles_claim)).ok_or(AuthError::NoRole)?;
        let vms = match role {
            Role::Viewer if self.viewer_all_vms => VmGrant::All,
            Role::Viewer => VmGrant::Patterns(vm_patterns(claims.get("vms"))?),
            _ => VmGrant::All,
        };
        Ok(Principal {
            role,
            user: Some(user),
            vms,
        })
    }
}

/// Why a token was refused, from the crate's error.
fn refusal(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::WrongAlgorithm,
        ErrorKind::MissingRequiredClaim(c) => match c.as_str() {
            "exp" => AuthError::BadClaim("exp"),
            "sub" => AuthError::BadClaim("sub"),
            "iss" => AuthError::WrongIssuer,
            "aud" => AuthError::WrongAudience,
            _ => AuthError::Malformed,
        },
        _ => AuthError::Malformed,
    }
}

/// The highest known role a roles claim names (a string, a
/// space-separated string, or an array of strings); unknown names are
/// ignored.
fn roles_of(claim: Option<&Value>) -> Option<Role> {
    let rank = |r: &str| match r {
        "viewer" => Some((1, Role::Viewer)),
        "operator" => Some((2, Role::Operator)),
        "admin" => Some((3, Role::Admin)),
        _ => None,
    };
    let names: Vec<&str> = match claim? {
        Value::String(s) => s.split_whitespace().collect(),
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => return None,
    };
    names
        .into_iter()
        .take(MAX_VM_PATTERNS)
        .filter_map(rank)
        .max_by_key(|(n, _)| *n)
        .map(|(_, r)| r)
}

/// The `vms` claim: an array of ids / glob patterns (or one string).
/// Absent: no VM.
fn vm_patterns(claim: Option<&Value>) -> Result<Vec<String>, AuthError> {
    let list: Vec<&Value> = match claim {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(v @ Value::String(_)) => vec![v],
        Some(Value::Array(a)) => a.iter().collect(),
        Some(_) => return Err(AuthError::BadClaim("vms")),
    };
    if list.len() > MAX_VM_PATTERNS {
        return Err(AuthError::BadClaim("vms"));
    }
    list.into_iter()
        .map(|v| match v {
            Value::String(s) if !s.is_empty() && s.len() <= MAX_VM_PATTERN_BYTES => Ok(s.clone()),
            _ => Err(AuthError::BadClaim("vms")),
        })
        .collect()
}

#[cfg(test)]
mod tests;
