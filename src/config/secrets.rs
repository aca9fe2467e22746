//! Secrets kept out of the config file: read from a file of their own
//! (`token_file = "/etc/consolegate/…"`) or from a systemd credential
//! (`credential = "admin-token"`: the unit's `LoadCredential=` copies it
//! into `$CREDENTIALS_DIRECTORY`, readable by the service only).
//!
//! A secret file must be a regular file, not readable by others (mode
//! `o-rwx`), at most [`MAX_SECRET_BYTES`], UTF-8; one trailing newline is
//! dropped. Errors name the file, never its content.
//!
//! The mode rule is shared by every secret the appliance reads from a file:
//! token files and credentials here, the JWT HS256 secret
//! (`auth::jwt`), the hypervisor password files (`hypervisor::static_targets`,
//! `hypervisor::vsphere::config`) read through [`read_private_file`], and
//! the console's TLS key, checked with the rest by
//! [`ApplianceConfig::check_secret_file_modes`] before anything starts (so
//! `check-config`, the start and a reload refuse the same files). Group
//! access is fine: the packaged files are 0640 root:consolegate.
//!
//! Like the rest of `config`, this opens no socket and depends on no plane;
//! its only IO is reading the files it is pointed at.

use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::appliance::{check_token, ApplianceConfig, ConfigFileError};
use super::users::JwtAlgorithm;
use crate::hypervisor::backend::HypervisorConfig;

/// Largest secret file read. A token is at most a few KiB; the cap makes a
/// wrong path (a device, a log) fail fast.
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;
/// The permission bits of "others": a secret file must have none of them.
const OTHERS_PERMISSION_BITS: u32 = 0o007;
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
        "{} holds a secret but others have access to it (mode {mode:04o}): refused; run: chmod o-rwx {}",
        path.display(),
        path.display()
    )]
    ReadableByOthers { path: PathBuf, mode: u32 },
    #[error("{} is larger than {max_bytes} bytes", path.display())]
    TooLarge { path: PathBuf, max_bytes: u64 },
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

/// Refuse `mode` (of the file at `path`) when it gives others any access:
/// read, write or execute. The one mode rule of every secret file.
pub fn check_private_mode(path: &Path, mode: u32) -> Result<(), SecretError> {
    let mode = mode & 0o7777;
    if mode & OTHERS_PERMISSION_BITS != 0 {
        return Err(SecretError::ReadableByOthers {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// Check the file at `path` (symbolic links followed, as a read would) is
/// a regular file that others cannot access, without reading it.
pub fn check_private_path(path: &Path) -> Result<(), SecretError> {
    let meta = std::fs::metadata(path).map_err(|source| SecretError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(SecretError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    check_private_mode(path, meta.mode())
}

/// Read a secret file: a regular file others cannot access, at most
/// `max_bytes`, any bytes (a key, a password). The open file's metadata is
/// checked, not the path's: what is checked is what is read.
pub fn read_private_file(path: &Path, max_bytes: u64) -> Result<Vec<u8>, SecretError> {
    let read_err = |source| SecretError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(SecretError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    check_private_mode(path, meta.mode())?;
    let mut bytes = Vec::new();
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > max_bytes {
        return Err(SecretError::TooLarge {
            path: path.to_path_buf(),
            max_bytes,
        });
    }
    Ok(bytes)
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
    let bytes = read_private_file(&path, MAX_SECRET_BYTES)?;
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
        self.check_secret_file_modes()?;
        Ok(warnings)
    }

    /// The secret files the config names besides the tokens, each with its
    /// key: the console's TLS private key, the JWT HS256 secret, the
    /// hypervisor password files. Not `auth.jwt.public_key_file`: a public
    /// key is public, any mode is fine. Not `vsphere ca_file` either (CA
    /// certificates are public).
    pub fn secret_files(&self) -> Vec<(String, PathBuf)> {
        let mut files = Vec::new();
        if let Some(tls) = &self.tls {
            files.push(("tls.key".to_string(), tls.key.clone()));
        }
        let jwt = &self.auth.jwt;
        if jwt.enabled && jwt.algorithm == JwtAlgorithm::HS256 {
            if let Some(p) = &jwt.hs256_secret_file {
                files.push(("auth.jwt.hs256_secret_file".to_string(), p.clone()));
            }
        }
        for (i, h) in self.hypervisors.iter().enumerate() {
            match h {
                HypervisorConfig::Vsphere(v) => files.push((
                    format!("hypervisors[{i}].password_file"),
                    v.password_file.clone(),
                )),
                HypervisorConfig::Static(s) => {
                    for (j, vm) in s.vms.iter().enumerate() {
                        if let Some(p) = &vm.password_file {
                            files.push((
                                format!("hypervisors[{i}].vms[{j}].password_file"),
                                p.clone(),
                            ));
                        }
                    }
                }
                // QEMU: one-time VNC passwords over QMP, no file; demo: none.
                HypervisorConfig::Qemu(_) | HypervisorConfig::Demo(_) => {}
            }
        }
        files
    }

    /// Refuse a config whose secret files ([`secret_files`](Self::secret_files))
    /// others may access, naming the key, the file, its mode and the chmod
    /// that fixes it. A file that cannot be read at all is left to the
    /// part that reads it (the TLS setup, the JWT verifier, the hypervisor),
    /// which reports it as before.
    pub fn check_secret_file_modes(&self) -> Result<(), ConfigFileError> {
        for (key, path) in self.secret_files() {
            match check_private_path(&path) {
                Ok(()) | Err(SecretError::Read { .. }) => {}
                Err(e) => {
                    return Err(ConfigFileError::Invalid {
                        key,
                        message: e.to_string(),
                    })
                }
            }
        }
        Ok(())
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
    fn the_mode_rule_refuses_any_access_by_others_and_allows_the_group() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o640, 0o660, 0o400, 0o440] {
            let p = write(dir.path(), &format!("ok{mode:o}"), "s", mode);
            assert_eq!(read_private_file(&p, 16).unwrap(), b"s");
            check_private_path(&p).unwrap();
        }
        for mode in [0o644, 0o604, 0o602, 0o601, 0o666, 0o777] {
            let p = write(dir.path(), &format!("open{mode:o}"), "s", mode);
            let e = read_private_file(&p, 16).unwrap_err();
            assert!(
                matches!(e, SecretError::ReadableByOthers { mode: m, .. } if m == mode),
                "{e}"
            );
            let text = e.to_string();
            assert!(
                text.contains(&format!("(mode {mode:04o})"))
                    && text.ends_with(&format!("run: chmod o-rwx {}", p.display())),
                "{text}"
            );
            assert!(matches!(
                check_private_path(&p),
                Err(SecretError::ReadableByOthers { .. })
            ));
        }
        let p = write(dir.path(), "big", "12345", 0o600);
        assert!(matches!(
            read_private_file(&p, 4),
            Err(SecretError::TooLarge { max_bytes: 4, .. })
        ));
    }

    /// A config naming one secret file of each kind, all 0600.
    fn config_with_secret_files(dir: &Path) -> ApplianceConfig {
        use crate::config::appliance::TlsConfig;
        use crate::hypervisor::static_targets::{StaticConfig, StaticVmConfig};
        use crate::hypervisor::vsphere::config::VsphereConfig;
        let mut c = ApplianceConfig {
            tls: Some(TlsConfig {
                cert: write(dir, "cert.pem", "public", 0o644),
                key: write(dir, "key.pem", "private", 0o600),
                allow_plain: false,
            }),
            ..ApplianceConfig::default()
        };
        c.auth.jwt.enabled = true;
        c.auth.jwt.hs256_secret_file = Some(write(dir, "jwt.secret", TOKEN, 0o600));
        let vc = write(dir, "vc.password", "p", 0o600);
        c.hypervisors
            .push(HypervisorConfig::Vsphere(VsphereConfig::new(
                "vc1",
                "https://vc.example/sdk",
                "u",
                &vc,
            )));
        let vm = StaticVmConfig {
            password_file: Some(write(dir, "vnc.password", "p", 0o600)),
            ..StaticVmConfig::new("x1", None, "10.0.0.7", 5901, None)
        };
        c.hypervisors
            .push(HypervisorConfig::Static(StaticConfig::new(
                "lab",
                vec![vm],
                4,
            )));
        c
    }

    #[test]
    fn every_secret_file_others_may_read_is_refused_naming_its_key() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let c = config_with_secret_files(dir.path());
        let files = c.secret_files();
        let keys: Vec<&str> = files.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "tls.key",
                "auth.jwt.hs256_secret_file",
                "hypervisors[0].password_file",
                "hypervisors[1].vms[0].password_file"
            ]
        );
        // The certificate is 0644 and that is fine: it is public.
        c.check_secret_file_modes().unwrap();
        for (key, path) in &files {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = c.check_secret_file_modes().unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("{key}: {}", path.display()))
                    && e.contains("(mode 0644)")
                    && e.contains("chmod o-rwx"),
                "{e}"
            );
            // resolve_secrets (check-config, the start, a reload) refuses it too.
            let e = c
                .clone()
                .resolve_secrets(None, CredentialMode::Required)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("{key}: ")), "{e}");
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o640)).unwrap();
        }
        c.check_secret_file_modes().unwrap();
        // A missing file is left to its reader (which says it cannot read it).
        std::fs::remove_file(&files[0].1).unwrap();
        c.check_secret_file_modes().unwrap();
        // JWTs off or a public key: the secret file is not one.
        let mut off = c.clone();
        off.auth.jwt.enabled = false;
        assert!(!off
            .secret_files()
            .iter()
            .any(|(k, _)| k.starts_with("auth.")));
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
