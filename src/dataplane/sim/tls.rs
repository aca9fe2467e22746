//! TLS for the simulation, made once per process: the worker's server
//! config and the browsers' client config (wss), and for the WebMKS relay
//! the simulated VMware host's server config and the appliance's client
//! config that trusts it. Every length on the wire must be the same from
//! run to run, or a seed would not replay: Ed25519 keys (fixed-length
//! signatures), fixed serial numbers and dates (rcgen's defaults), TLS 1.3
//! only, and no session tickets. Only the bytes differ between processes
//! (keys and randoms), never their sizes.

use std::sync::{Arc, OnceLock};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// The name the worker's certificate is for and the browsers ask for.
const SERVER_NAME: &str = "consolegate.sim";
/// The name of the simulated VMware hosts (the WebMKS URLs' host).
pub const WEBMKS_HOST: &str = "esxi.sim";

/// A server config for `name` and a client config that trusts it.
struct Pair {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

fn pair(name: &str, serial: u8) -> Pair {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("an Ed25519 key");
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string()]).expect("certificate params");
    params.serial_number = Some(rcgen::SerialNumber::from(vec![0x5a, 0x5a, 0x5a, serial]));
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
    Pair {
        server: Arc::new(server),
        client: Arc::new(client),
    }
}

struct Configs {
    worker: Pair,
    webmks: Pair,
}

fn configs() -> &'static Configs {
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    CONFIGS.get_or_init(|| Configs {
        worker: pair(SERVER_NAME, 0x5a),
        webmks: pair(WEBMKS_HOST, 0x5b),
    })
}

/// The worker's browser-facing TLS config.
pub fn server_config() -> Arc<ServerConfig> {
    configs().worker.server.clone()
}

/// A browser's TLS connection to the worker.
pub fn client() -> ClientConnection {
    let name = ServerName::try_from(SERVER_NAME).expect("a DNS name");
    ClientConnection::new(configs().worker.client.clone(), name).expect("a client connection")
}

/// The config the appliance's WebMKS relays use (trusts the simulated
/// VMware hosts' certificate).
pub fn webmks_client_config() -> Arc<ClientConfig> {
    configs().webmks.client.clone()
}

/// A simulated VMware host's end of one WebMKS connection.
pub fn webmks_server() -> ServerConnection {
    ServerConnection::new(configs().webmks.server.clone()).expect("a server connection")
}
