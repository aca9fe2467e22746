//! Secrets kept out of the config file: read from a file of their own
//! (`token_file = "/etc/consolegate/…"`) or from a systemd credential
//! (`credential = "admin-token"`: the unit's `LoadCredential=` copies it
//! into `$CREDENTIALS_DIRECTORY`, readable by the service only).
//!
//! A secret file must be a regular file, not readable by others (mode
//! `o-rwx`), at most [`MAX_SECRET_BYTES`], UTF-8; one trailing newline is
//! dropped. Errors name the file, never its content.
//!
//! Like the rest of `config`, this opens no socket and depends on no plane;
//! its only IO is reading the files it is pointed at.

use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::appliance::{check_token, ApplianceConfig, ConfigFileError};

/// Largest secret file read. A token is at most a few KiB; the cap makes a
/// wrong path (a device, a log) fail fast.
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;
/// The variable systemd sets to the directory of the unit's credentials.
pub const CREDENTIALS_ENV: &str = "CREDENTIALS_DIRECTORY";

/// Why a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "{} is readable by others (mode {mode:04o}); run: chmod o-rwx {}",
        path.display(),
        path.display()
    )]
    ReadableByOthers { path: PathBuf, mode: u32 },
    #[error("{} is larger than {MAX_SECRET_BYTES} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("{} is empty", path.display())]
    Empty { path: PathBuf },
    #[error("{} is not UTF-8 text", path.display())]
    NotText { path: PathBuf },
    #[error(
        "credential {name:?}: ${CREDENTIALS_ENV} is not set (credentials exist only for a \
         service started by systemd with LoadCredential={name}:…)"
    )]
    NoCredentials { name: String },
}

/// Where a secret comes from.
#[derive(Debug, Clone, Copy)]
pub enum SecretSource<'a> {
    File(&'a Path),
    /// A name in the credentials directory.
    Credential(&'a str),
}

/// What to do with a credential when there is no credentials directory
/// (`consolegate check-config` run by hand, outside the service).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialMode {
    /// An error: the service cannot start without it.
    Required,
    /// A warning: it will be there when systemd starts the service.
    SkipOutsideService,
}

/// Read one secret.
pub fn read_secret(
    source: SecretSource<'_>,
    credentials_dir: Option<&Path>,
) -> Result<String, SecretError> {
    let path = match source {
        SecretSource::File(p) => p.to_path_buf(),
        SecretSource::Credential(name) => match credentials_dir {
            Some(dir) => dir.join(name),
            None => {
                return Err(SecretError::NoCredentials {
                    name: name.to_string(),
                })
            }
        },
    };
    let read_err = |source| SecretError::Read {
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(read_err)?;
    // The open file's metadata, not the path's: what is checked is what is read.
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(SecretError::NotAFile { path });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(SecretError::ReadableByOthers { path, mode });
    }
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_SECRET_BYTES {
        return Err(SecretError::TooLarge { path });
    }
    let text = String::from_utf8(bytes).map_err(|_| SecretError::NotText { path: path.clone() })?;
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if text.is_empty() {
        return Err(SecretError::Empty { path });
    }
    Ok(text.to_string())
}

impl ApplianceConfig {
    /// Read every secret kept in a file or credential into the config (the
    /// `token` of each such `[[auth.tokens]]` entry) and check it like an
    /// inline one, then check for duplicates. Call after
    /// [`validate`](Self::validate). Returns warnings (credentials skipped
    /// outside the service with [`CredentialMode::SkipOutsideService`]).
    pub fn resolve_secrets(
        &mut self,
        credentials_dir: Option<&Path>,
        mode: CredentialMode,
    ) -> Result<Vec<String>, ConfigFileError> {
        let mut warnings = Vec::new();
        for (i, t) in self.auth.tokens.iter_mut().enumerate() {
            let (source, key) = match (&t.token_file, &t.credential) {
                (Some(p), _) => (SecretSource::File(p), "token_file"),
                (None, Some(n)) => (SecretSource::Credential(n), "credential"),
                (None, None) => continue,
            };
            let key = format!("auth.tokens[{i}].{key}");
            let value = match read_secret(source, credentials_dir) {
                Ok(v) => v,
                Err(e @ SecretError::NoCredentials { .. })
                    if mode == CredentialMode::SkipOutsideService =>
                {
                    warnings.push(format!("{key}: not checked: {e}"));
                    continue;
                }
                Err(e) => {
                    return Err(ConfigFileError::Invalid {
                        key,
                        message: e.to_string(),
                    })
                }
            };
            check_token(&value).map_err(|m| ConfigFileError::Invalid {
                key: key.clone(),
                message: format!("the token read: {m}"),
            })?;
            t.token = value;
        }
        self.check_duplicate_tokens()?;
        Ok(warnings)
    }
}

/// `$CREDENTIALS_DIRECTORY`, when set.
pub fn credentials_dir_from_env() -> Option<PathBuf> {
    std::env::var_os(CREDENTIALS_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::appliance::{Role, TokenConfig};
    use std::os::unix::fs::PermissionsExt as _;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn reads_private_files_and_refuses_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let ok = write(dir.path(), "ok", &format!("{TOKEN}\n"), 0o640);
        assert_eq!(read_secret(SecretSource::File(&ok), None).unwrap(), TOKEN);
        let crlf = write(dir.path(), "crlf", &format!("{TOKEN}\r\n"), 0o600);
        assert_eq!(read_secret(SecretSource::File(&crlf), None).unwrap(), TOKEN);
        let open = write(dir.path(), "open", TOKEN, 0o644);
        let e = read_secret(SecretSource::File(&open), None).unwrap_err();
        assert!(
            matches!(e, SecretError::ReadableByOthers { mode: 0o644, .. }),
            "{e}"
        );
        assert!(!e.to_string().contains(TOKEN), "{e}");
        let empty = write(dir.path(), "empty", "\n", 0o600);
        assert!(matches!(
            read_secret(SecretSource::File(&empty), None),
            Err(SecretError::Empty { .. })
        ));
        let big = write(
            dir.path(),
            "big",
            &"x".repeat(MAX_SECRET_BYTES as usize + 1),
            0o600,
        );
        assert!(matches!(
            read_secret(SecretSource::File(&big), None),
            Err(SecretError::TooLarge { .. })
        ));
        assert!(matches!(
            read_secret(SecretSource::File(dir.path()), None),
            Err(SecretError::NotAFile { .. } | SecretError::ReadableByOthers { .. })
        ));
        let missing = dir.path().join("missing");
        assert!(matches!(
            read_secret(SecretSource::File(&missing), None),
            Err(SecretError::Read { .. })
        ));
    }

    #[test]
    fn credentials_come_from_the_credentials_directory() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "admin-token", TOKEN, 0o400);
        let src = SecretSource::Credential("admin-token");
        assert_eq!(read_secret(src, Some(dir.path())).unwrap(), TOKEN);
        let e = read_secret(src, None).unwrap_err();
        assert!(e.to_string().contains("LoadCredential=admin-token"), "{e}");
    }

    #[test]
    fn resolve_fills_tokens_and_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "t", TOKEN, 0o600);
        let mut c = ApplianceConfig::default();
        c.auth.tokens.push(TokenConfig {
            token_file: Some(file.clone()),
            ..TokenConfig::new(String::new(), Role::Admin)
        });
        c.auth.tokens.push(TokenConfig {
            credential: Some("read-token".into()),
            ..TokenConfig::new(String::new(), Role::Read)
        });
        c.validate().unwrap();
        // By hand, outside the service: the credential is a warning.
        let mut by_hand = c.clone();
        let w = by_hand
            .resolve_secrets(None, CredentialMode::SkipOutsideService)
            .unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].starts_with("auth.tokens[1].credential"), "{w:?}");
        assert_eq!(by_hand.auth.tokens[0].token, TOKEN);
        // In the service it is required.
        let e = c
            .clone()
            .resolve_secrets(None, CredentialMode::Required)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("auth.tokens[1].credential: "), "{e}");
        // The same token twice is refused once both are read.
        write(dir.path(), "read-token", TOKEN, 0o400);
        let e = c
            .clone()
            .resolve_secrets(Some(dir.path()), CredentialMode::Required)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "auth.tokens[1].token: duplicate of auth.tokens[0]");
        write(dir.path(), "read-token", "short", 0o400);
        let e = c
            .resolve_secrets(Some(dir.path()), CredentialMode::Required)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("auth.tokens[1].credential: the token read: shorter"),
            "{e}"
        );
    }

    #[test]
    fn a_token_entry_names_exactly_one_source() {
        let mut c = ApplianceConfig::default();
        c.auth.tokens.push(TokenConfig {
            token_file: Some("/etc/t".into()),
            ..TokenConfig::new(TOKEN.into(), Role::Admin)
        });
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("auth.tokens[0]: give exactly one"));
        let mut c = ApplianceConfig::default();
        c.auth
            .tokens
            .push(TokenConfig::new(String::new(), Role::Admin));
        assert!(c.validate().is_err());
        let mut c = ApplianceConfig::default();
        c.auth.tokens.push(TokenConfig {
            token_file: Some("relative".into()),
            ..TokenConfig::new(String::new(), Role::Admin)
        });
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("auth.tokens[0].token_file"));
        let mut c = ApplianceConfig::default();
        c.auth.tokens.push(TokenConfig {
            credential: Some("../etc/shadow".into()),
            ..TokenConfig::new(String::new(), Role::Admin)
        });
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("auth.tokens[0].credential"));
        // From TOML.
        let c = ApplianceConfig::from_toml_str(
            "[[auth.tokens]]\ncredential = \"admin-token\"\nrole = \"admin\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.has_admin_token());
    }
}
