//! wss for the simulation: one server config for the worker and one client
//! config for the browsers, made once per process. Every length on the
//! wire must be the same from run to run, or a seed would not replay: an
//! Ed25519 key (fixed-length signatures), a fixed serial number and dates
//! (rcgen's defaults), TLS 1.3 only, and no session tickets. Only the
//! bytes differ between processes (keys and randoms), never their sizes.

use std::sync::{Arc, OnceLock};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};

/// The name the certificate is for and the browsers ask for.
const SERVER_NAME: &str = "consolegate.sim";

struct Configs {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

fn configs() -> &'static Configs {
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("an Ed25519 key");
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .expect("certificate params");
        params.serial_number = Some(rcgen::SerialNumber::from(vec![0x5a, 0x5a, 0x5a, 0x5a]));
        let cert = params.self_signed(&key).expect("a self-signed certificate");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .expect("the server certificate");
        server.send_tls13_tickets = 0;
        let mut roots = RootCertStore::empty();
        roots.add(cert.der().clone()).expect("the root");
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Configs {
            server: Arc::new(server),
            client: Arc::new(client),
        }
    })
}

/// The worker's browser-facing TLS config.
pub fn server_config() -> Arc<ServerConfig> {
    configs().server.clone()
}

/// A browser's TLS connection to the worker.
pub fn client() -> ClientConnection {
    let name = ServerName::try_from(SERVER_NAME).expect("a DNS name");
    ClientConnection::new(configs().client.clone(), name).expect("a client connection")
}
