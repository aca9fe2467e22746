//! Trust for outgoing TLS: the rustls client configurations the appliance
//! uses when it is the client — the hypervisor API clients (vSphere SOAP)
//! and, later, the data plane's WebMKS backend leg.
//!
//! Three ways to trust a server, and no way to trust nothing:
//! - [`Trust::SystemRoots`]: the operating system's roots, read with
//!   `rustls-native-certs` (see [`system_roots`] for why not
//!   `webpki-roots`), with the usual name and validity checks;
//! - [`Trust::CaFile`]: the roots of one PEM file (a vCenter's VMCA root,
//!   a lab CA), with the same checks;
//! - [`Trust::Pinned`]: exactly one leaf certificate, named by its SHA-1
//!   thumbprint as VMware prints it (`AA:BB:…`) or by its SHA-256, compared
//!   in constant time. The handshake signatures are still verified with
//!   the crypto provider, so a server must hold the pinned certificate's
//!   private key.
//!
//! Failures are named: [`PkiError`] for configuration (an unreadable CA
//! file, a malformed thumbprint), and [`classify`] tells a handshake that
//! failed on a pin mismatch (`cert_mismatch`) from one that failed on an
//! untrusted chain (`cert_untrusted`).
//!
//! What it does not do: open connections, or know about hypervisors or the
//! data plane. It depends on nothing else in the crate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use subtle::ConstantTimeEq;

/// Most certificates read from one CA file: a bundle larger than this is a
/// mistake (the whole Mozilla store is ~150), and the bound keeps a wrong
/// path (a huge file) from being parsed for long.
pub const MAX_CA_FILE_CERTIFICATES: usize = 1000;
/// Largest CA file read, in bytes (1 MiB holds ~500 PEM certificates).
pub const MAX_CA_FILE_BYTES: u64 = 1024 * 1024;

/// Configuration errors, each with a stable code.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The CA file cannot be read (missing, permissions, too large).
    #[error("CA file {path:?} cannot be read: {reason}")]
    CaFileUnreadable { path: PathBuf, reason: String },
    /// The CA file holds no usable certificate (not PEM, or every
    /// certificate rejected by webpki).
    #[error("CA file {path:?} holds no usable certificate: {reason}")]
    CaFileInvalid { path: PathBuf, reason: String },
    /// The thumbprint is not 20 or 32 hex bytes.
    #[error("bad certificate thumbprint {0:?}: want SHA-1 (20 bytes) or SHA-256 (32 bytes) in hex, with or without colons")]
    BadThumbprint(String),
    /// The system has no usable root certificates.
    #[error("no system root certificates: {0}")]
    NoSystemRoots(String),
    /// rustls refused the configuration (a provider without TLS 1.2/1.3).
    #[error("TLS client configuration refused: {0}")]
    Config(String),
}

impl PkiError {
    /// Stable snake_case code for logs and API errors.
    pub fn code(&self) -> &'static str {
        match self {
            PkiError::CaFileUnreadable { .. } => "ca_file_unreadable",
            PkiError::CaFileInvalid { .. } => "ca_file_invalid",
            PkiError::BadThumbprint(_) => "bad_thumbprint",
            PkiError::NoSystemRoots(_) => "no_system_roots",
            PkiError::Config(_) => "tls_config",
        }
    }
}

/// Which digest a thumbprint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThumbprintAlgorithm {
    /// 20 bytes; what vSphere gives (`sslThumbprint`, the host's
    /// "SHA1 thumbprint").
    Sha1,
    /// 32 bytes; what newer hosts list too (`certThumbprintList`).
    Sha256,
}

/// The digest of a DER certificate, SHA-1 or SHA-256.
#[derive(Clone, PartialEq, Eq)]
pub struct Thumbprint {
    algorithm: ThumbprintAlgorithm,
    digest: Vec<u8>,
}

impl Thumbprint {
    /// Parses `AA:BB:…` or `aabb…` (case-insensitive): 20 bytes are SHA-1,
    /// 32 bytes SHA-256. With colons, every group is exactly two digits.
    pub fn parse(text: &str) -> Result<Thumbprint, PkiError> {
        let bad = || PkiError::BadThumbprint(text.to_string());
        let trimmed = text.trim();
        let hex: String = if trimmed.contains(':') {
            let groups: Vec<&str> = trimmed.split(':').collect();
            if groups.iter().any(|g| g.len() != 2) {
                return Err(bad());
            }
            groups.concat()
        } else {
            trimmed.to_string()
        };
        if hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let digest: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        let algorithm = match digest.len() {
            20 => ThumbprintAlgorithm::Sha1,
            32 => ThumbprintAlgorithm::Sha256,
            _ => return Err(bad()),
        };
        Ok(Thumbprint { algorithm, digest })
    }

    /// The thumbprint of a DER certificate.
    pub fn of_certificate(algorithm: ThumbprintAlgorithm, der: &[u8]) -> Thumbprint {
        let digest = match algorithm {
            ThumbprintAlgorithm::Sha1 => {
                ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der)
            }
            ThumbprintAlgorithm::Sha256 => ring::digest::digest(&ring::digest::SHA256, der),
        };
        Thumbprint {
            algorithm,
            digest: digest.as_ref().to_vec(),
        }
    }

    pub fn algorithm(&self) -> ThumbprintAlgorithm {
        self.algorithm
    }

    /// Whether `der` is the pinned certificate. The digests are compared
    /// in constant time, so the comparison leaks nothing of the pin.
    pub fn matches(&self, der: &[u8]) -> bool {
        let seen = Thumbprint::of_certificate(self.algorithm, der);
        bool::from(seen.digest.as_slice().ct_eq(self.digest.as_slice()))
    }
}

/// `AA:BB:…`, upper case, as VMware prints it.
impl fmt::Display for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.digest.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Thumbprint({:?}, {self})", self.algorithm)
    }
}

impl std::str::FromStr for Thumbprint {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Thumbprint::parse(s)
    }
}

/// How a server's certificate is trusted. There is deliberately no
/// "accept anything".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The operating system's roots, with name and validity checks.
    SystemRoots,
    /// The roots of a PEM file, with name and validity checks.
    CaFile(PathBuf),
    /// One leaf certificate by thumbprint; names and dates are not
    /// checked (the pin names the certificate itself, and VMware hosts'
    /// self-signed certificates rarely carry the name the appliance uses).
    Pinned(Thumbprint),
}

impl Trust {
    /// The trust a hypervisor's config asks for: a pin wins over a CA
    /// file, and with neither the system roots apply.
    pub fn from_config(
        thumbprint: Option<&str>,
        ca_file: Option<&Path>,
    ) -> Result<Trust, PkiError> {
        match (thumbprint, ca_file) {
            (Some(pin), _) => Ok(Trust::Pinned(Thumbprint::parse(pin)?)),
            (None, Some(path)) => Ok(Trust::CaFile(path.to_path_buf())),
            (None, None) => Ok(Trust::SystemRoots),
        }
    }
}

/// The crypto provider every outgoing TLS connection uses (ring, as the
/// rest of the crate).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration for `trust`: TLS 1.2 and 1.3, no client
/// certificate, no ALPN (callers set it when they need it).
pub fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>, PkiError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Config(e.to_string()))?;
    let config = match trust {
        Trust::SystemRoots => builder.with_root_certificates(system_roots()?),
        Trust::CaFile(path) => builder.with_root_certificates(ca_file_roots(path)?),
        Trust::Pinned(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pin: pin.clone(),
                algorithms: provider.signature_verification_algorithms,
            })),
    };
    Ok(Arc::new(config.with_no_client_auth()))
}

/// The operating system's roots. `rustls-native-certs` rather than
/// `webpki-roots`: an appliance's operators add their own CAs (a vCenter's
/// VMCA root, a corporate CA) to the system store with
/// `update-ca-certificates`, and expect them to count; a root list compiled
/// into the binary would ignore them and only change with a rebuild.
pub fn system_roots() -> Result<RootCertStore, PkiError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "the system store is empty".to_string());
        return Err(PkiError::NoSystemRoots(why));
    }
    Ok(roots)
}

/// The roots of a PEM file.
pub fn ca_file_roots(path: &Path) -> Result<RootCertStore, PkiError> {
    let unreadable = |reason: String| PkiError::CaFileUnreadable {
        path: path.to_path_buf(),
        reason,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| unreadable(e.to_string()))?
        .len();
    if size > MAX_CA_FILE_BYTES {
        return Err(unreadable(format!(
            "{size} bytes, more than the {MAX_CA_FILE_BYTES} allowed"
        )));
    }
    let pem = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
    let invalid = |reason: String| PkiError::CaFileInvalid {
        path: path.to_path_buf(),
        reason,
    };
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&pem).take(MAX_CA_FILE_CERTIFICATES) {
        certs.push(cert.map_err(|e| invalid(format!("not PEM: {e:?}")))?);
    }
    if certs.is_empty() {
        return Err(invalid("no CERTIFICATE block".to_string()));
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(invalid(format!(
            "{ignored} certificate(s), none usable as a root"
        )));
    }
    Ok(roots)
}

/// Verifies a server by the thumbprint of its leaf certificate, and the
/// handshake's signatures with the provider's algorithms (so the server
/// must hold the key of the pinned certificate).
#[derive(Debug)]
struct PinnedVerifier {
    pin: Thumbprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pin.matches(end_entity.as_ref()) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(ThumbprintMismatch {
                    algorithm: self.pin.algorithm,
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The error a pinned verifier reports: the server's certificate is not
/// the pinned one. (The seen thumbprint is not carried: logs name the
/// cause, not certificate material.)
#[derive(Debug)]
pub struct ThumbprintMismatch {
    pub algorithm: ThumbprintAlgorithm,
}

impl fmt::Display for ThumbprintMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server's certificate does not match the pinned {:?} thumbprint",
            self.algorithm
        )
    }
}

impl std::error::Error for ThumbprintMismatch {}

/// Why a handshake's certificate check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertProblem {
    /// Not the pinned certificate.
    Mismatch,
    /// Not trusted by the roots (unknown issuer, wrong name, expired…).
    Untrusted,
}

impl CertProblem {
    pub fn code(self) -> &'static str {
        match self {
            CertProblem::Mismatch => "cert_mismatch",
            CertProblem::Untrusted => "cert_untrusted",
        }
    }
}

/// Whether a rustls error is a certificate refusal, and which.
pub fn classify(error: &rustls::Error) -> Option<CertProblem> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(other))
            if other.0.downcast_ref::<ThumbprintMismatch>().is_some() =>
        {
            Some(CertProblem::Mismatch)
        }
        rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented => {
            Some(CertProblem::Untrusted)
        }
        _ => None,
    }
}

/// The rustls error somewhere in an error's source chain (an HTTP client
/// wraps it in `io::Error`s), if any.
pub fn find_tls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    // A source chain is short; the bound keeps a cyclic one from looping.
    for _ in 0..16 {
        let e = current?;
        if let Some(tls) = tls_at(e) {
            return Some(tls);
        }
        current = e.source();
    }
    None
}

/// The rustls error `error` is, or that the `io::Error`s it is wrap (an
/// `io::Error`'s `source()` skips the error it wraps, and HTTP clients wrap
/// tokio-rustls's `io::Error` in another).
fn tls_at<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = error;
    for _ in 0..4 {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let inner = current.downcast_ref::<std::io::Error>()?.get_ref()?;
        current = inner;
    }
    None
}

#[cfg(test)]
mod tests;
