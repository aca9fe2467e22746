//! Handshakes in memory between a rustls client built by [`client_config`]
//! and a rustls server holding rcgen certificates.

use super::*;
use rustls::pki_types::PrivateKeyDer;
use rustls::{ClientConnection, ServerConfig, ServerConnection};

struct Server {
    config: Arc<ServerConfig>,
    leaf_der: Vec<u8>,
}

fn server_with(chain: Vec<CertificateDer<'static>>, key_der: Vec<u8>) -> Server {
    let leaf_der = chain[0].as_ref().to_vec();
    let key = PrivateKeyDer::try_from(key_der).unwrap();
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    Server {
        config: Arc::new(config),
        leaf_der,
    }
}

fn self_signed_server(name: &str) -> Server {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    server_with(vec![ck.cert.der().clone()], ck.signing_key.serialize_der())
}

/// A CA (its PEM) and a server whose leaf it signed for `name`.
fn ca_signed_server(name: &str) -> (String, Server) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let server = server_with(vec![leaf.der().clone()], leaf_key.serialize_der());
    (ca.pem(), server)
}

/// Runs a handshake to the end; the client's error when it fails.
fn handshake(client: Arc<ClientConfig>, server: &Server, name: &str) -> Result<(), rustls::Error> {
    let name = ServerName::try_from(name.to_string()).unwrap();
    let mut client = ClientConnection::new(client, name).unwrap();
    let mut server = ServerConnection::new(server.config.clone()).unwrap();
    // A TLS 1.3 handshake takes 2 round trips; 10 is plenty.
    for _ in 0..10 {
        let mut buf = Vec::new();
        client.write_tls(&mut buf).unwrap();
        if !buf.is_empty() {
            server.read_tls(&mut buf.as_slice()).unwrap();
            if server.process_new_packets().is_err() {
                // The server's alert still goes to the client below.
            }
        }
        let mut buf = Vec::new();
        server.write_tls(&mut buf).unwrap();
        if !buf.is_empty() {
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets()?;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

fn pinned(pin: &str) -> Arc<ClientConfig> {
    client_config(&Trust::Pinned(Thumbprint::parse(pin).unwrap())).unwrap()
}

#[test]
fn the_right_sha1_pin_is_accepted_whatever_the_name() {
    let server = self_signed_server("esx1.example");
    let pin = Thumbprint::of_certificate(ThumbprintAlgorithm::Sha1, &server.leaf_der);
    let text = pin.to_string();
    assert_eq!(text.len(), 20 * 3 - 1, "{text}");
    // The name asked differs from the certificate's: a pin names the
    // certificate, not the host.
    handshake(pinned(&text), &server, "10.0.0.7").unwrap();
    handshake(pinned(&text.to_lowercase().replace(':', "")), &server, "x").unwrap();
}

#[test]
fn a_wrong_pin_is_a_mismatch() {
    let server = self_signed_server("esx1.example");
    let other = self_signed_server("esx1.example");
    let pin = Thumbprint::of_certificate(ThumbprintAlgorithm::Sha1, &other.leaf_der);
    let err = handshake(pinned(&pin.to_string()), &server, "esx1.example").unwrap_err();
    assert_eq!(classify(&err), Some(CertProblem::Mismatch), "{err}");
    assert_eq!(classify(&err).unwrap().code(), "cert_mismatch");
}

#[test]
fn a_sha256_pin_is_accepted_and_checked() {
    let server = self_signed_server("esx1.example");
    let pin = Thumbprint::of_certificate(ThumbprintAlgorithm::Sha256, &server.leaf_der);
    assert_eq!(pin.algorithm(), ThumbprintAlgorithm::Sha256);
    handshake(pinned(&pin.to_string()), &server, "esx1.example").unwrap();
    let other = self_signed_server("esx1.example");
    let err = handshake(pinned(&pin.to_string()), &other, "esx1.example").unwrap_err();
    assert_eq!(classify(&err), Some(CertProblem::Mismatch), "{err}");
}

#[test]
fn a_ca_file_trusts_what_it_signed_and_nothing_else() {
    let (ca_pem, server) = ca_signed_server("vcenter.example");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, ca_pem).unwrap();
    let config = client_config(&Trust::CaFile(path.clone())).unwrap();
    handshake(config.clone(), &server, "vcenter.example").unwrap();
    // Another name than the certificate's is refused: roots check names.
    let err = handshake(config.clone(), &server, "other.example").unwrap_err();
    assert_eq!(classify(&err), Some(CertProblem::Untrusted), "{err}");
    // A self-signed certificate the CA did not sign is untrusted.
    let stranger = self_signed_server("vcenter.example");
    let err = handshake(config, &stranger, "vcenter.example").unwrap_err();
    assert_eq!(classify(&err), Some(CertProblem::Untrusted), "{err}");
    assert_eq!(CertProblem::Untrusted.code(), "cert_untrusted");
}

#[test]
fn system_roots_do_not_trust_a_self_signed_host() {
    // The machine has a CA store (ca-certificates); a self-signed host is
    // not in it.
    let config = client_config(&Trust::SystemRoots).unwrap();
    let server = self_signed_server("esx1.example");
    let err = handshake(config, &server, "esx1.example").unwrap_err();
    assert_eq!(classify(&err), Some(CertProblem::Untrusted), "{err}");
}

#[test]
fn bad_ca_files_name_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let err = client_config(&Trust::CaFile(missing)).unwrap_err();
    assert_eq!(err.code(), "ca_file_unreadable", "{err}");

    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello, not a certificate\n").unwrap();
    let err = client_config(&Trust::CaFile(garbage)).unwrap_err();
    assert_eq!(err.code(), "ca_file_invalid", "{err}");

    let broken = dir.path().join("broken.pem");
    std::fs::write(
        &broken,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = client_config(&Trust::CaFile(broken)).unwrap_err();
    assert_eq!(err.code(), "ca_file_invalid", "{err}");
}

#[test]
fn thumbprints_parse_in_every_usual_spelling_and_refuse_the_rest() {
    let sha1 = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01";
    let a = Thumbprint::parse(sha1).unwrap();
    let b = Thumbprint::parse(&sha1.to_lowercase()).unwrap();
    let c = Thumbprint::parse(&sha1.replace(':', "")).unwrap();
    let d = Thumbprint::parse(&format!("  {sha1}\n")).unwrap();
    assert!(a == b && b == c && c == d);
    assert_eq!(a.algorithm(), ThumbprintAlgorithm::Sha1);
    assert_eq!(a.to_string(), sha1);
    let sha256 = "00".repeat(32);
    assert_eq!(
        Thumbprint::parse(&sha256).unwrap().algorithm(),
        ThumbprintAlgorithm::Sha256
    );
    for bad in [
        "",
        "AB",
        "AB:CD",
        "zz".repeat(20).as_str(),
        "ABC:D:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01",
        "AB::CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01",
        "0".repeat(41).as_str(),
        "00".repeat(21).as_str(),
        "é".repeat(20).as_str(),
    ] {
        let err = Thumbprint::parse(bad).unwrap_err();
        assert_eq!(err.code(), "bad_thumbprint", "{bad:?}");
    }
    assert!(matches!(
        Trust::from_config(Some("nope"), None),
        Err(PkiError::BadThumbprint(_))
    ));
    assert_eq!(Trust::from_config(None, None).unwrap(), Trust::SystemRoots);
}

#[test]
fn tls_errors_are_found_inside_io_errors() {
    let inner = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
    let io = std::io::Error::other(inner);
    let found = find_tls_error(&io).unwrap();
    assert_eq!(classify(found), Some(CertProblem::Untrusted));
    // As hyper-rustls reports it: tokio-rustls's io::Error in another.
    let mismatch = rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
        Arc::new(ThumbprintMismatch {
            algorithm: ThumbprintAlgorithm::Sha1,
        }),
    )));
    let twice = std::io::Error::other(std::io::Error::other(mismatch));
    let found = find_tls_error(&twice).expect("found inside both io::Errors");
    assert_eq!(classify(found), Some(CertProblem::Mismatch));
    let plain = std::io::Error::other("connection refused");
    assert!(find_tls_error(&plain).is_none());
    assert_eq!(classify(&rustls::Error::DecryptError), None);
}
