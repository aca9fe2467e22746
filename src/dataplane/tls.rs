//! rustls server configuration from PEM files (`--cert`, `--key`).
//!
//! The connection objects built from it are driven sans-IO by the session
//! (bytes in with `read_tls`, bytes out with `write_tls`), so TLS fits both
//! IO backends unchanged.
//!
//! [`reloadable_server_config`] presents a certificate that can be replaced
//! while the workers run ([`ReloadableCert::replace`], on a reload): each
//! handshake picks the current one when it starts, so sessions already
//! connected keep theirs and new ones get the new one.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate file {path}: {message}")]
    Cert { path: String, message: String },
    #[error("key file {path}: {message}")]
    Key { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A server config for browser-facing TLS. `key` may be the same file as
/// `cert` (websockify accepts a combined PEM).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (certs, key) = read_pair(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The certificate of a [`reloadable_server_config`], replaceable at run
/// time. Handshakes take the current one when they begin (one atomic load).
#[derive(Debug)]
pub struct ReloadableCert {
    current: ArcSwap<CertifiedKey>,
}

impl ReloadableCert {
    /// Load `cert` and `key` and present them to the handshakes that begin
    /// from now on. On error the current certificate stays.
    pub fn replace(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        self.current.store(Arc::new(certified_key(cert, key)?));
        Ok(())
    }

    /// The end-entity certificate presented now (DER).
    pub fn current_der(&self) -> Vec<u8> {
        self.current
            .load()
            .cert
            .first()
            .map(|c| c.as_ref().to_vec())
            .unwrap_or_default()
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Like [`server_config`], with a certificate that [`ReloadableCert::replace`]
/// swaps for the handshakes that follow.
pub fn reloadable_server_config(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<rustls::ServerConfig>, Arc<ReloadableCert>), TlsError> {
    let resolver = Arc::new(ReloadableCert {
        current: ArcSwap::from_pointee(certified_key(cert, key)?),
    });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver.clone());
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(cfg), resolver))
}

/// The pair as a signing key, checked to belong together.
fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let (certs, private) = read_pair(cert, key)?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, private, &provider).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        message: e.to_string(),
    })
}

/// The PEM certificate chain and private key.
fn read_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.display().to_string(),
            message: "no certificate found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        message: e.to_string(),
    })?;
    Ok((certs, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_self_signed_pair_and_reports_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        server_config(&cert, &key).unwrap();
        let e = server_config(&key, &cert).unwrap_err().to_string();
        assert!(e.contains("c.pem") || e.contains("k.pem"), "{e}");
        let missing = dir.path().join("missing.pem");
        assert!(server_config(&missing, &key).is_err());
    }

    #[test]
    fn a_reloadable_certificate_is_replaced_only_by_a_good_pair() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str| {
            let ck = rcgen::generate_simple_self_signed(vec![name.into()]).unwrap();
            let cert = dir.path().join(format!("{name}.crt"));
            let key = dir.path().join(format!("{name}.key"));
            std::fs::write(&cert, ck.cert.pem()).unwrap();
            std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
            (cert, key, ck.cert.der().to_vec())
        };
        let (c1, k1, der1) = write("one");
        let (c2, k2, der2) = write("two");
        let (_cfg, cert) = reloadable_server_config(&c1, &k1).unwrap();
        assert_eq!(cert.current_der(), der1);
        // A key that does not belong to the certificate is refused.
        let e = cert.replace(&c2, &k1).unwrap_err().to_string();
        assert!(e.contains("one.key"), "{e}");
        assert_eq!(cert.current_der(), der1);
        cert.replace(&c2, &k2).unwrap();
        assert_eq!(cert.current_der(), der2);
    }
}
