//! Stand-ins for a VMware WebMKS endpoint (`wss://host:port/ticket/T`) for
//! the WebMKS relay's end-to-end tests: [`WssBackend`], a TLS WebSocket
//! server of our own that records what it got and can misbehave on purpose
//! ([`Behaviour`]), and [`Websockify`], Debian's `websockify --ssl-only` in
//! front of a VNC server, as a second, independent real peer.
//!
//! A [`WssBackend`] listens on 127.0.0.1:0 behind its own self-signed
//! certificate ([`BackendCert`], with the SHA-1 and SHA-256 thumbprints in
//! VMware's `AA:BB:…` format), answers the upgrade by hand (so that the
//! misbehaving answers can be built), and reads frames with its own parser so
//! that every frame it received is kept as it was on the wire: header bytes,
//! mask key and masked payload ([`RawFrame`]). A test can so check that the
//! browser's frames crossed the relay unchanged, mask key included. Every
//! connection gets a [`ConnectionRecord`]: the upgrade request, the frames
//! received and sent, pings, pongs, close frames, and how it ended.
//!
//! Rules it keeps, like the rest of tests/common: loopback only, every wait
//! bounded, every recording bounded ([`MAX_RECORDED_FRAMES`],
//! [`MAX_RECORDED_BYTES`]), all threads and sockets ended when the server
//! is dropped. It does not depend on the crate under test.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{
    check_pattern, ctx, fill_pattern, find_program, pick_free_port, signal_group, tail_of_file,
    tls_client_config, wait_child, IO_TIMEOUT, STARTUP_TIMEOUT,
};

/// Bound on the upgrade request (request line and headers), in bytes.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Largest frame payload the parser accepts from a client; a larger length
/// ends the connection as a protocol error.
pub const MAX_FRAME_PAYLOAD_BYTES: u64 = 64 << 20;
/// Frames kept per connection and direction (received, sent); later ones
/// are only counted.
pub const MAX_RECORDED_FRAMES: usize = 100_000;
/// Payload bytes kept per connection and direction; later frames are only
/// counted.
pub const MAX_RECORDED_BYTES: usize = 16 << 20;
/// How long a blocked read waits before the loop looks at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Bound on one blocked socket write (a peer that stops reading); dropping
/// the server shuts the sockets down, which ends a blocked write at once.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// One read of the VNC server in [`Behaviour::RelayTo`], sent as one frame.
pub const RELAY_READ_BYTES: usize = 64 * 1024;
/// Bound on the pings one connection of [`Behaviour::PingEveryMs`] sends.
pub const MAX_PINGS: u64 = 100_000;
/// How long [`Behaviour::CloseFrame`] waits for the client's first data
/// frame before it sends its close frame anyway.
pub const CLOSE_FRAME_WAIT: Duration = Duration::from_secs(10);

/// What [`Behaviour::CloseFrame`] and [`Behaviour::MaskedFrames`] send
/// first: an RFB 3.8 greeting, as a WebMKS host's first message.
pub const GREETING: &[u8; 12] = b"RFB 003.008\n";
/// The mask key of [`Behaviour::MaskedFrames`]'s frames.
pub const SERVER_MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];
/// The first frame [`Behaviour::Garbage`] sends: FIN and the reserved
/// opcode 3, a 4-byte payload; [`GARBAGE_RANDOM_BYTES`] bytes follow.
pub const GARBAGE_PREFIX: &[u8] = &[0x83, 0x04, b'j', b'u', b'n', b'k'];
pub const GARBAGE_RANDOM_BYTES: usize = 256;
/// The subprotocols [`Behaviour::WrongSubprotocol`] picks from: the first
/// one the client did not offer.
pub const WRONG_SUBPROTOCOLS: [&str; 3] = ["vmware-vvc", "uint8utf8", "chat"];
/// Reason of the close frame [`Behaviour::RelayTo`] sends when the VNC
/// server ends the connection (code 1000), and when it cannot reach it
/// (code 1011, [`RELAY_CONNECT_FAILED_REASON`]).
pub const RELAY_CLOSED_REASON: &str = "vnc server closed";
pub const RELAY_CONNECT_FAILED_REASON: &str = "vnc server unreachable";

pub const OPCODE_CONTINUATION: u8 = 0x0;
pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_BINARY: u8 = 0x2;
pub const OPCODE_CLOSE: u8 = 0x8;
pub const OPCODE_PING: u8 = 0x9;
pub const OPCODE_PONG: u8 = 0xA;

// ---------------------------------------------------------------------------
// Certificate and thumbprints
// ---------------------------------------------------------------------------

/// `AA:BB:…`: upper-case hex bytes joined by colons, as vSphere's
/// `sslThumbprint`.
pub fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// SHA-1 of a DER certificate in VMware's format (59 characters).
pub fn thumbprint_sha1(cert_der: &[u8]) -> String {
    use sha1::Digest as _;
    colon_hex(&sha1::Sha1::digest(cert_der))
}

/// SHA-256 of a DER certificate in VMware's format (95 characters).
pub fn thumbprint_sha256(cert_der: &[u8]) -> String {
    colon_hex(ring::digest::digest(&ring::digest::SHA256, cert_der).as_ref())
}

/// A self-signed certificate for `localhost` and 127.0.0.1 with its key
/// (DER for rustls, PEM files for websockify) and thumbprints.
pub struct BackendCert {
    pub cert_der: Vec<u8>,
    key_der: Vec<u8>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// SHA-1 thumbprint, `AA:BB:…` (what a vSphere ticket carries).
    pub sha1: String,
    /// SHA-256 thumbprint, `AA:BB:…`.
    pub sha256: String,
    _dir: tempfile::TempDir,
}

impl BackendCert {
    pub fn generate() -> BackendCert {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .expect("rcgen self-signed certificate");
        let dir = tempfile::Builder::new()
            .prefix("consolegate-wss-cert-")
            .tempdir()
            .expect("tempdir");
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        fs::write(&cert_path, ck.cert.pem()).expect("write cert.pem");
        super::write_private(&key_path, ck.signing_key.serialize_pem());
        let cert_der = ck.cert.der().to_vec();
        BackendCert {
            sha1: thumbprint_sha1(&cert_der),
            sha256: thumbprint_sha256(&cert_der),
            cert_der,
            key_der: ck.signing_key.serialize_der(),
            cert_path,
            key_path,
            _dir: dir,
        }
    }

    /// A rustls client configuration that trusts exactly this certificate.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        tls_client_config(&self.cert_der)
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(self.cert_der.clone())], key)
        .expect("server certificate");
        Arc::new(config)
    }
}

// ---------------------------------------------------------------------------
// Behaviours and recordings
// ---------------------------------------------------------------------------

/// What a [`WssBackend`] does on every connection (one behaviour per
/// server, chosen at start). Unless said otherwise a behaviour answers the
/// upgrade with 101 and `Sec-WebSocket-Protocol: binary` when the client
/// offered `binary` (no subprotocol header otherwise, no extension ever),
/// answers every ping with a pong of the same payload, answers a close
/// frame with the same code and then closes the connection, and records
/// every frame.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Relays to a TCP VNC server (connected once the upgrade is done): each
    /// read of the VNC server (at most [`RELAY_READ_BYTES`]) becomes one
    /// binary frame; the payload of each data frame from the client is
    /// written to the VNC server. When the VNC server ends or resets the
    /// connection (or a write to it fails) it sends close 1000
    /// [`RELAY_CLOSED_REASON`]; when it cannot reach it, close 1011
    /// [`RELAY_CONNECT_FAILED_REASON`].
    RelayTo(SocketAddr),
    /// [`Behaviour::RelayTo`], except that each whole client message (one
    /// binary frame with FIN) whose first byte is 127 is dropped instead of
    /// written to the VNC server, and counted
    /// ([`ConnectionRecord::messages_dropped`]). wmks.js sends each of
    /// VMware's client messages (type 127) as one such frame, so wmks.js
    /// stays connected to a plain VNC server through it: the harness's
    /// positive control for "stayed connected", not a model of a relay
    /// (which cannot count on one RFB message per frame).
    RelayDropping127(SocketAddr),
    /// Every data frame is sent back as one frame with the same FIN bit,
    /// opcode (continuations stay continuations) and payload.
    Echo,
    /// Sends one binary frame per size, filled with
    /// [`fill_pattern`](super::fill_pattern) bytes at continuous offsets
    /// from 0, and checks that the client's data (all data frames' payloads
    /// in order) follows the same pattern from offset 0
    /// ([`ConnectionRecord::upstream_bytes`],
    /// [`ConnectionRecord::upstream_first_mismatch`]).
    Pattern { sizes: Vec<usize> },
    /// Sends `messages` binary messages, each as one frame per entry of
    /// `fragment_sizes` (binary without FIN, continuations, the last with
    /// FIN), pattern bytes at continuous offsets from 0, with a ping
    /// (payload `frag M.I`) between every two fragments. The pongs are in
    /// [`ConnectionRecord::pongs`], the pings in
    /// [`ConnectionRecord::pings_sent`].
    Fragmented {
        messages: usize,
        fragment_sizes: Vec<usize>,
    },
    /// Sends a ping (payload `ping N`, N from 0) every `n` ms (at most
    /// [`MAX_PINGS`]) and echoes data frames as [`Behaviour::Echo`] does.
    PingEveryMs(u64),
    /// After the upgrade sends [`GARBAGE_PREFIX`] (a frame with the
    /// reserved opcode 3) then [`GARBAGE_RANDOM_BYTES`] pseudo-random bytes,
    /// and keeps the connection open.
    Garbage,
    /// After the upgrade starts a binary frame announcing
    /// `after_bytes + 1 MiB` of payload, sends `after_bytes` of it (pattern
    /// bytes) and shuts the TCP connection down (no close frame, no TLS
    /// close_notify).
    CloseMidFrame { after_bytes: usize },
    /// Sends [`GREETING`] as one binary frame, waits for the client's first
    /// data frame (at most [`CLOSE_FRAME_WAIT`]), then sends a close frame
    /// with this code and reason and waits for the echo
    /// ([`ConnectionRecord::close_received`]) before closing.
    CloseFrame { code: u16, reason: String },
    /// Completes TLS, reads (and records) the request, answers nothing and
    /// keeps the connection open until the client goes.
    NeverAnswerUpgrade,
    /// Answers the upgrade with this status, a text body
    /// ([`REFUSE_BODY`]) and `Connection: close`, then closes.
    RefuseUpgrade(u16),
    /// Answers 101 with a `Sec-WebSocket-Accept` derived from another key.
    BadAccept,
    /// Answers 101 choosing a subprotocol the client did not offer (the
    /// first of [`WRONG_SUBPROTOCOLS`] not offered).
    WrongSubprotocol,
    /// After the upgrade sends [`GREETING`] as a binary frame masked with
    /// [`SERVER_MASK`] (a server must not mask).
    MaskedFrames,
}

/// The body of [`Behaviour::RefuseUpgrade`]'s answer.
pub const REFUSE_BODY: &str = "refused by the test WebMKS backend\n";

/// The upgrade request a connection sent, as received.
#[derive(Clone, Debug, Default)]
pub struct UpgradeRequest {
    pub method: String,
    /// The request target, e.g. `/ticket/T`.
    pub path: String,
    /// HTTP minor version (1 for HTTP/1.1).
    pub version: u8,
    /// Every header in order, names as sent.
    pub headers: Vec<(String, String)>,
    pub host: Option<String>,
    /// `Sec-WebSocket-Protocol` (several headers joined with ", ").
    pub protocol: Option<String>,
    /// `Sec-WebSocket-Extensions` (several headers joined with ", ").
    pub extensions: Option<String>,
    pub origin: Option<String>,
    pub key: Option<String>,
}

impl UpgradeRequest {
    /// The values of header `name` (case-insensitive) joined with ", ".
    pub fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }

    /// The offered subprotocols, in order.
    pub fn offered_protocols(&self) -> Vec<String> {
        self.protocol
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect()
    }
}

/// One WebSocket frame as it was on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// Milliseconds since the connection was accepted.
    pub at_ms: u64,
    /// The header as sent: first two bytes, extended length, mask key.
    pub header: Vec<u8>,
    pub fin: bool,
    /// RSV1..3 as the low three bits.
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    /// The payload as on the wire (still masked when `mask` is set).
    pub wire_payload: Vec<u8>,
}

impl RawFrame {
    /// The payload, unmasked.
    pub fn payload(&self) -> Vec<u8> {
        match self.mask {
            Some(m) => self
                .wire_payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ m[i % 4])
                .collect(),
            None => self.wire_payload.clone(),
        }
    }

    /// Header and payload: the frame's exact bytes.
    pub fn wire(&self) -> Vec<u8> {
        let mut v = self.header.clone();
        v.extend_from_slice(&self.wire_payload);
        v
    }

    pub fn is_data(&self) -> bool {
        self.opcode <= OPCODE_BINARY
    }
}

/// Bytes of a payload a frame's `Debug` shows.
const DEBUG_PAYLOAD_BYTES: usize = 16;

impl std::fmt::Debug for RawFrame {
    /// One short line: a failing test's records stay readable.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let payload = self.payload();
        let shown = &payload[..payload.len().min(DEBUG_PAYLOAD_BYTES)];
        write!(
            f,
            "{}ms fin={} rsv={} op={} mask={:?} len={} payload={:02x?}{}",
            self.at_ms,
            self.fin as u8,
            self.rsv,
            self.opcode,
            self.mask,
            payload.len(),
            shown,
            if payload.len() > shown.len() {
                "…"
            } else {
                ""
            }
        )
    }
}

/// A close frame's contents (`code` None: an empty close payload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseRecord {
    pub at_ms: u64,
    pub code: Option<u16>,
    pub reason: String,
}

/// Everything one connection did, as the backend saw it.
#[derive(Clone, Debug, Default)]
pub struct ConnectionRecord {
    pub peer: Option<SocketAddr>,
    /// Why the TLS handshake failed (e.g. the client refused the
    /// certificate), if it did.
    pub tls_error: Option<String>,
    pub upgrade: Option<UpgradeRequest>,
    /// The HTTP status the backend answered (none: it never answered).
    pub answered_status: Option<u16>,
    /// The subprotocol the backend chose in its answer.
    pub answered_protocol: Option<String>,
    /// Frames received, in order (the first [`MAX_RECORDED_FRAMES`] /
    /// [`MAX_RECORDED_BYTES`]).
    pub frames: Vec<RawFrame>,
    pub frames_received: u64,
    pub payload_bytes_received: u64,
    /// Received frames counted but not kept (past the bounds).
    pub frames_not_kept: u64,
    /// Frames sent, in order, as on the wire (same bounds).
    pub sent: Vec<RawFrame>,
    pub frames_sent: u64,
    pub payload_bytes_sent: u64,
    pub sent_not_kept: u64,
    sent_kept_bytes: usize,
    received_kept_bytes: usize,
    /// Pings sent by the backend: (ms, payload).
    pub pings_sent: Vec<(u64, Vec<u8>)>,
    /// Pongs received: (ms, payload).
    pub pongs: Vec<(u64, Vec<u8>)>,
    /// Pings received from the client (each answered with a pong).
    pub pings_received: Vec<(u64, Vec<u8>)>,
    pub close_sent: Option<CloseRecord>,
    pub close_received: Option<CloseRecord>,
    /// Bytes that reached a connection that was never upgraded (or got a
    /// bad upgrade answer), not parsed as frames.
    pub unframed_bytes: u64,
    /// [`Behaviour::RelayDropping127`]: client messages not relayed.
    pub messages_dropped: u64,
    /// [`Behaviour::Pattern`]: data bytes received, and the stream offset
    /// of the first byte that broke the pattern.
    pub upstream_bytes: u64,
    pub upstream_first_mismatch: Option<u64>,
    /// What the client did wrong: unmasked frame, bad opcode, oversized
    /// frame, bad request.
    pub protocol_errors: Vec<String>,
    /// An error of the behaviour's own sending (e.g. the peer went away
    /// while it was writing).
    pub send_error: Option<String>,
    /// How the connection ended: `close handshake`, `eof`, `stopped`,
    /// `refused`, `error: …`.
    pub end: Option<String>,
    pub ended_at_ms: Option<u64>,
}

impl ConnectionRecord {
    /// The data frames received (text, binary, continuation).
    pub fn data_frames(&self) -> Vec<&RawFrame> {
        self.frames.iter().filter(|f| f.is_data()).collect()
    }

    /// The frames received with this opcode.
    pub fn frames_with_opcode(&self, opcode: u8) -> Vec<&RawFrame> {
        self.frames.iter().filter(|f| f.opcode == opcode).collect()
    }

    /// Every received data frame's payload, unmasked, concatenated.
    pub fn upstream_payload(&self) -> Vec<u8> {
        self.data_frames()
            .iter()
            .flat_map(|f| f.payload())
            .collect()
    }

    pub fn pong_payloads(&self) -> Vec<Vec<u8>> {
        self.pongs.iter().map(|(_, p)| p.clone()).collect()
    }

    pub fn ping_payloads(&self) -> Vec<Vec<u8>> {
        self.pings_sent.iter().map(|(_, p)| p.clone()).collect()
    }

    pub fn ended(&self) -> bool {
        self.end.is_some()
    }

    /// A few lines for failure messages: the upgrade, counts, the first
    /// and last frames each way, closes, errors, the end.
    pub fn summary(&self) -> String {
        fn ends(frames: &[RawFrame]) -> String {
            const SHOWN: usize = 4;
            let mut v: Vec<String> = frames
                .iter()
                .take(SHOWN)
                .map(|f| format!("{f:?}"))
                .collect();
            if frames.len() > 2 * SHOWN {
                v.push(format!("… {} more …", frames.len() - 2 * SHOWN));
            }
            let tail = frames
                .len()
                .saturating_sub(SHOWN)
                .max(SHOWN.min(frames.len()));
            v.extend(frames[tail..].iter().map(|f| format!("{f:?}")));
            v.join("\n      ")
        }
        let up = self.upgrade.as_ref().map_or("none".to_string(), |u| {
            format!(
                "{} {} protocol={:?} extensions={:?} origin={:?} host={:?}",
                u.method, u.path, u.protocol, u.extensions, u.origin, u.host
            )
        });
        format!(
            "peer {:?}, tls error {:?}\n  upgrade {} -> {:?} protocol {:?}\n  \
             received {} frames ({} payload bytes, {} not kept):\n      {}\n  \
             sent {} frames ({} payload bytes, {} not kept):\n      {}\n  \
             pings sent {}, pongs {}, pings received {}; close sent {:?}, received {:?}\n  \
             upstream {} bytes, first mismatch {:?}; dropped {}; unframed {}\n  \
             protocol errors {:?}; send error {:?}; end {:?} at {:?} ms",
            self.peer,
            self.tls_error,
            up,
            self.answered_status,
            self.answered_protocol,
            self.frames_received,
            self.payload_bytes_received,
            self.frames_not_kept,
            ends(&self.frames),
            self.frames_sent,
            self.payload_bytes_sent,
            self.sent_not_kept,
            ends(&self.sent),
            self.pings_sent.len(),
            self.pongs.len(),
            self.pings_received.len(),
            self.close_sent,
            self.close_received,
            self.upstream_bytes,
            self.upstream_first_mismatch,
            self.messages_dropped,
            self.unframed_bytes,
            self.protocol_errors,
            self.send_error,
            self.end,
            self.ended_at_ms,
        )
    }
}

/// Every record's summary, numbered.
pub fn summaries(records: &[ConnectionRecord]) -> String {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| format!("#{i}: {}", r.summary()))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------

struct Shared {
    stop: AtomicBool,
    records: Mutex<Vec<Arc<Mutex<ConnectionRecord>>>>,
    /// The sockets of the connections still running (by connection
    /// index: the accepted one, and a relay's VNC connection), to shut
    /// them down on drop; a connection's are forgotten when it ends, so a
    /// long test holds no descriptors of ended connections.
    sockets: Mutex<Vec<(usize, TcpStream)>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn track_socket(&self, connection: usize, socket: &TcpStream) {
        if let Ok(s) = socket.try_clone() {
            lock(&self.sockets).push((connection, s));
        }
    }

    fn forget_sockets(&self, connection: usize) {
        lock(&self.sockets).retain(|(c, _)| *c != connection);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not hide the recordings from the others.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A TLS WebSocket server on 127.0.0.1 standing in for a WebMKS host; see
/// the module doc. Dropping it ends every connection and thread.
pub struct WssBackend {
    pub addr: SocketAddr,
    pub cert: BackendCert,
    pub behaviour: Behaviour,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl WssBackend {
    /// Starts a backend with a fresh certificate.
    pub fn start(behaviour: Behaviour) -> WssBackend {
        Self::start_with_cert(behaviour, BackendCert::generate())
    }

    pub fn start_with_cert(behaviour: Behaviour, cert: BackendCert) -> WssBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            records: Mutex::new(Vec::new()),
            sockets: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        let config = cert.server_config();
        let (s, b) = (shared.clone(), behaviour.clone());
        let accept_thread = thread::spawn(move || accept_loop(listener, config, b, s));
        WssBackend {
            addr,
            cert,
            behaviour,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `wss://127.0.0.1:PORT/ticket/{ticket}`.
    pub fn url(&self, ticket: &str) -> String {
        self.url_with_host("127.0.0.1", ticket)
    }

    /// `wss://{host}:PORT/ticket/{ticket}` (the certificate names
    /// `localhost` and 127.0.0.1).
    pub fn url_with_host(&self, host: &str, ticket: &str) -> String {
        format!("wss://{host}:{}/ticket/{ticket}", self.port())
    }

    pub fn thumbprint_sha1(&self) -> &str {
        &self.cert.sha1
    }

    pub fn thumbprint_sha256(&self) -> &str {
        &self.cert.sha256
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        lock(&self.shared.records).len()
    }

    /// A snapshot of every connection's record, in accept order.
    pub fn connections(&self) -> Vec<ConnectionRecord> {
        lock(&self.shared.records)
            .iter()
            .map(|r| lock(r).clone())
            .collect()
    }

    /// Connection `index`'s record now; panics when there is none.
    pub fn connection(&self, index: usize) -> ConnectionRecord {
        let records = lock(&self.shared.records);
        let r = records.get(index).unwrap_or_else(|| {
            panic!(
                "{}the WSS backend has {} connections, no #{index}",
                ctx(),
                records.len()
            )
        });
        let record = lock(r).clone();
        record
    }

    /// Polls the records until `f` returns `Some`; panics with `what` and
    /// the records after `timeout`.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&[ConnectionRecord]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.connections();
            if let Some(v) = f(&records) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}timed out after {timeout:?} waiting for {what}; WSS backend ({:?}) records:\n{}",
                    ctx(),
                    self.behaviour,
                    summaries(&records)
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until connection `index` has sent its upgrade request.
    pub fn wait_upgrade(&self, index: usize, timeout: Duration) -> UpgradeRequest {
        self.wait_for(
            timeout,
            &format!("connection #{index}'s upgrade request"),
            |r| r.get(index).and_then(|c| c.upgrade.clone()),
        )
    }

    /// Waits until connection `index` has ended and returns its record.
    pub fn wait_ended(&self, index: usize, timeout: Duration) -> ConnectionRecord {
        self.wait_for(timeout, &format!("connection #{index} to end"), |r| {
            r.get(index).filter(|c| c.ended()).cloned()
        })
    }

    /// Shuts every connection's sockets down now (a host that goes away);
    /// the server keeps accepting.
    pub fn drop_connections(&self) {
        for (_, s) in lock(&self.shared.sockets).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for WssBackend {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.drop_connections();
        if let Some(h) = self.accept_thread.take() {
            let _ = h.join();
        }
        let threads: Vec<_> = lock(&self.shared.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        if thread::panicking() {
            eprintln!(
                "---- WSS backend {} ({:?}) records ----\n{}",
                self.addr,
                self.behaviour,
                summaries(&self.connections())
            );
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    behaviour: Behaviour,
    shared: Arc<Shared>,
) {
    while !shared.stop.load(Ordering::SeqCst) {
        let (tcp, peer) = match listener.accept() {
            Ok(v) => v,
            Err(_) => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let record = Arc::new(Mutex::new(ConnectionRecord {
            peer: Some(peer),
            ..ConnectionRecord::default()
        }));
        let id = {
            let mut records = lock(&shared.records);
            records.push(record.clone());
            records.len() - 1
        };
        shared.track_socket(id, &tcp);
        let (config, behaviour, s) = (config.clone(), behaviour.clone(), shared.clone());
        let handle = thread::spawn(move || serve_connection(id, tcp, config, behaviour, record, s));
        let mut threads = lock(&shared.threads);
        threads.retain(|h| !h.is_finished());
        threads.push(handle);
    }
}

// ---------------------------------------------------------------------------
// One connection: TLS, the upgrade, frames
// ---------------------------------------------------------------------------

/// The TLS connection shared by the connection's reader (which reads the
/// socket without a lock, then feeds rustls) and its writers (which
/// encrypt under `tls` and write under `out`, so records and frames go out
/// whole and in order). Lock order: `out`, then `tls`.
struct Link {
    out: Mutex<TcpStream>,
    tls: Mutex<rustls::ServerConnection>,
    record: Arc<Mutex<ConnectionRecord>>,
    shared: Arc<Shared>,
    /// The connection's index (in the records).
    id: usize,
    started: Instant,
    /// Set when the reader is done: the behaviour's sender stops.
    ended: AtomicBool,
    /// [`Behaviour::RelayTo`]'s connection to the VNC server (the frame
    /// loop writes to it; the sender thread reads a clone).
    vnc: Mutex<Option<TcpStream>>,
}

impl Link {
    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn done(&self) -> bool {
        self.ended.load(Ordering::SeqCst) || self.shared.stop.load(Ordering::SeqCst)
    }

    fn record(&self) -> MutexGuard<'_, ConnectionRecord> {
        lock(&self.record)
    }

    /// Encrypts `bytes` and writes them (and anything rustls had pending).
    fn write_plain(&self, bytes: &[u8]) -> io::Result<()> {
        let mut out = lock(&self.out);
        let mut wire = Vec::with_capacity(bytes.len() + 64);
        {
            let mut tls = lock(&self.tls);
            tls.writer().write_all(bytes)?;
            while tls.wants_write() {
                tls.write_tls(&mut wire)?;
            }
        }
        out.write_all(&wire)?;
        out.flush()
    }

    /// Sends one frame (whole) and records it.
    fn send_frame(
        &self,
        fin: bool,
        opcode: u8,
        payload: &[u8],
        mask: Option<[u8; 4]>,
    ) -> io::Result<()> {
        let frame = build_frame(fin, opcode, payload, mask);
        // Recorded before it is written: a client that has read a frame
        // finds it in the record.
        let header_len = frame.len() - payload.len();
        {
            let at_ms = self.ms();
            let mut r = self.record();
            r.frames_sent += 1;
            r.payload_bytes_sent += payload.len() as u64;
            if r.sent.len() < MAX_RECORDED_FRAMES
                && r.sent_kept_bytes + payload.len() <= MAX_RECORDED_BYTES
            {
                r.sent_kept_bytes += payload.len();
                r.sent.push(RawFrame {
                    at_ms,
                    header: frame[..header_len].to_vec(),
                    fin,
                    rsv: 0,
                    opcode,
                    mask,
                    wire_payload: frame[header_len..].to_vec(),
                });
            } else {
                r.sent_not_kept += 1;
            }
        }
        self.write_plain(&frame)
    }

    fn send_ping(&self, payload: &[u8]) -> io::Result<()> {
        let at = self.ms();
        self.record().pings_sent.push((at, payload.to_vec()));
        self.send_frame(true, OPCODE_PING, payload, None)
    }

    /// Sends a close frame, once per connection: a later call (another
    /// thread also ending the connection) sends nothing.
    fn send_close(&self, code: u16, reason: &str) -> io::Result<()> {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        let at_ms = self.ms();
        {
            let mut r = self.record();
            if r.close_sent.is_some() {
                return Ok(());
            }
            r.close_sent = Some(CloseRecord {
                at_ms,
                code: Some(code),
                reason: reason.to_string(),
            });
        }
        self.send_frame(true, OPCODE_CLOSE, &payload, None)
    }

    /// TLS close_notify, then the TCP connection is shut down.
    fn close_tls(&self) {
        let mut out = lock(&self.out);
        let mut wire = Vec::new();
        {
            let mut tls = lock(&self.tls);
            tls.send_close_notify();
            while tls.wants_write() {
                if tls.write_tls(&mut wire).is_err() {
                    break;
                }
            }
        }
        let _ = out.write_all(&wire);
        // Half-close: the reading side stays open so that what the client
        // still sends is read (see `linger`), not answered with a reset
        // (Chromium reports a reset after the close handshake as 1006).
        let _ = out.shutdown(Shutdown::Write);
    }

    /// Drops the TCP connection (no close frame, no close_notify).
    fn drop_tcp(&self) {
        let _ = lock(&self.out).shutdown(Shutdown::Both);
    }
}

/// Builds one frame (`mask`: masked as a client would, which a server must
/// not do).
pub fn build_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(if fin { 0x80 } else { 0 } | (opcode & 0x0F));
    f.extend_from_slice(&length_header(payload.len() as u64, mask.is_some()));
    match mask {
        Some(m) => {
            f.extend_from_slice(&m);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// The length byte (with the mask bit) and the extended length.
fn length_header(len: u64, masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut v = Vec::with_capacity(9);
    if len < 126 {
        v.push(mask_bit | len as u8);
    } else if len <= 0xFFFF {
        v.push(mask_bit | 126);
        v.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        v.push(mask_bit | 127);
        v.extend_from_slice(&len.to_be_bytes());
    }
    v
}

/// Parses one frame from the front of `buf` (removing it): `Ok(None)` when
/// more bytes are needed; `Err` for a length past
/// [`MAX_FRAME_PAYLOAD_BYTES`] or an invalid length encoding.
pub fn parse_frame(buf: &mut Vec<u8>, at_ms: u64) -> Result<Option<RawFrame>, String> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let masked = b1 & 0x80 != 0;
    let (len, mut pos) = match b1 & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        126 | 127 => return Ok(None),
        n => (n as u64, 2),
    };
    if len > MAX_FRAME_PAYLOAD_BYTES {
        return Err(format!(
            "frame of {len} bytes, more than {MAX_FRAME_PAYLOAD_BYTES}"
        ));
    }
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    let total = pos + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let frame = RawFrame {
        at_ms,
        header: buf[..pos].to_vec(),
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x07,
        opcode: b0 & 0x0F,
        mask,
        wire_payload: buf[pos..total].to_vec(),
    };
    buf.drain(..total);
    Ok(Some(frame))
}

/// The reading half: the socket (read without a lock, with a short
/// timeout) and the plaintext not consumed yet.
struct Reader {
    socket: TcpStream,
    pending: Vec<u8>,
    /// The peer's close_notify came: once `pending` is parsed, the reads
    /// are over.
    peer_closed: bool,
}

enum ReadOutcome {
    Data,
    Idle,
    Eof,
}

impl Reader {
    /// One socket read fed to rustls; the plaintext goes to `pending`.
    /// Plaintext rustls holds already (it can come with the end of the
    /// TLS handshake) is taken first, without a socket read.
    fn read_more(&mut self, link: &Link) -> io::Result<ReadOutcome> {
        let before = self.pending.len();
        drain_plaintext(&mut lock(&link.tls), &mut self.pending)?;
        if self.pending.len() > before {
            return Ok(ReadOutcome::Data);
        }
        if self.peer_closed {
            return Ok(ReadOutcome::Eof);
        }
        let mut buf = vec![0u8; 64 * 1024];
        let n = match self.socket.read(&mut buf) {
            Ok(0) => return Ok(ReadOutcome::Eof),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(ReadOutcome::Idle)
            }
            Err(e) => return Err(e),
        };
        let mut tls = lock(&link.tls);
        let mut input = &buf[..n];
        let mut peer_closed = false;
        while !input.is_empty() {
            if tls.read_tls(&mut input)? == 0 {
                return Err(io::Error::other("rustls took no bytes"));
            }
            let state = tls
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            peer_closed |= state.peer_has_closed();
            drain_plaintext(&mut tls, &mut self.pending)?;
        }
        // What came with the close_notify (a close frame, typically) is
        // parsed before the end is reported.
        self.peer_closed = peer_closed;
        Ok(if peer_closed && self.pending.len() == before {
            ReadOutcome::Eof
        } else {
            ReadOutcome::Data
        })
    }
}

/// Moves the plaintext rustls has decrypted into `out`.
fn drain_plaintext(tls: &mut rustls::ServerConnection, out: &mut Vec<u8>) -> io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match tls.reader().read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(k) => out.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn serve_connection(
    id: usize,
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    behaviour: Behaviour,
    record: Arc<Mutex<ConnectionRecord>>,
    shared: Arc<Shared>,
) {
    let started = Instant::now();
    let _ = tcp.set_nonblocking(false);
    let end = match handshake_tls(&tcp, config, &record) {
        Some(tls) => {
            let link = Arc::new(Link {
                out: Mutex::new(tcp.try_clone().expect("clone socket")),
                tls: Mutex::new(tls),
                record: record.clone(),
                shared: shared.clone(),
                id,
                started,
                ended: AtomicBool::new(false),
                vnc: Mutex::new(None),
            });
            let end = serve_upgraded(&link, tcp.try_clone().expect("clone socket"), &behaviour);
            link.ended.store(true, Ordering::SeqCst);
            end
        }
        None => "tls handshake failed".to_string(),
    };
    let _ = tcp.shutdown(Shutdown::Both);
    shared.forget_sockets(id);
    let mut r = lock(&record);
    r.end.get_or_insert(end);
    r.ended_at_ms = Some(started.elapsed().as_millis() as u64);
}

fn handshake_tls(
    tcp: &TcpStream,
    config: Arc<rustls::ServerConfig>,
    record: &Mutex<ConnectionRecord>,
) -> Option<rustls::ServerConnection> {
    let mut tls = rustls::ServerConnection::new(config).expect("server connection");
    // Writes accept everything; the socket's send buffer is the bound.
    tls.set_buffer_limit(None);
    let mut socket = tcp.try_clone().expect("clone socket");
    socket.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    socket.set_write_timeout(Some(WRITE_TIMEOUT)).ok()?;
    let _ = socket.set_nodelay(true);
    while tls.is_handshaking() {
        if let Err(e) = tls.complete_io(&mut socket) {
            lock(record).tls_error = Some(e.to_string());
            return None;
        }
    }
    Some(tls)
}

/// Reads the request, answers it per the behaviour, then runs the frame
/// loop; returns how the connection ended.
fn serve_upgraded(link: &Arc<Link>, socket: TcpStream, behaviour: &Behaviour) -> String {
    let _ = socket.set_read_timeout(Some(POLL_INTERVAL));
    let mut reader = Reader {
        socket,
        pending: Vec::new(),
        peer_closed: false,
    };
    let request = match read_request(link, &mut reader) {
        Ok(r) => r,
        Err(end) => return end,
    };
    link.record().upgrade = Some(request.clone());
    match answer_upgrade(link, &request, behaviour) {
        Ok(Answered::Upgraded) => {}
        Ok(Answered::Closed(end)) => {
            linger(link, &mut reader);
            return end;
        }
        Ok(Answered::Held) => return hold(link, &mut reader),
        Err(e) => return format!("error: answering the upgrade: {e}"),
    }
    let sender = start_sender(link, behaviour);
    let end = run_frames(link, &mut reader, behaviour);
    link.ended.store(true, Ordering::SeqCst);
    linger(link, &mut reader);
    link.drop_tcp();
    if let Some(v) = lock(&link.vnc).as_ref() {
        let _ = v.shutdown(Shutdown::Both);
    }
    if let Some(handle) = sender {
        let _ = handle.join();
    }
    end
}

/// Bound on [`linger`].
const LINGER: Duration = Duration::from_secs(1);

/// Reads and discards what the client still sends until it closes (at
/// most [`LINGER`]), so that closing the socket sends no reset.
fn linger(link: &Link, reader: &mut Reader) {
    let deadline = Instant::now() + LINGER;
    let mut buf = [0u8; 16 * 1024];
    while Instant::now() < deadline && !link.shared.stop.load(Ordering::SeqCst) {
        match reader.socket.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Reads until the end of the request headers and parses them.
fn read_request(link: &Link, reader: &mut Reader) -> Result<UpgradeRequest, String> {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        if let Some(end) = find_subslice(&reader.pending, b"\r\n\r\n") {
            let head: Vec<u8> = reader.pending.drain(..end + 4).collect();
            return parse_request(&head).map_err(|e| {
                link.record().protocol_errors.push(e.clone());
                let _ = link.write_plain(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                link.close_tls();
                format!("bad request: {e}")
            });
        }
        if reader.pending.len() > MAX_REQUEST_BYTES {
            return Err(format!("request longer than {MAX_REQUEST_BYTES} bytes"));
        }
        if link.done() {
            return Err("stopped".into());
        }
        if Instant::now() >= deadline {
            return Err(format!("no complete upgrade request within {IO_TIMEOUT:?}"));
        }
        match reader.read_more(link) {
            Ok(ReadOutcome::Eof) => return Err("eof before the upgrade request".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("error: reading the upgrade request: {e}")),
        }
    }
}

fn find_subslice(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_request(head: &[u8]) -> Result<UpgradeRequest, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete request".into()),
        Err(e) => return Err(format!("unparsable request: {e}")),
    }
    let mut r = UpgradeRequest {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        version: req.version.unwrap_or_default(),
        headers: req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        ..UpgradeRequest::default()
    };
    r.host = r.header("Host");
    r.protocol = r.header("Sec-WebSocket-Protocol");
    r.extensions = r.header("Sec-WebSocket-Extensions");
    r.origin = r.header("Origin");
    r.key = r.header("Sec-WebSocket-Key");
    Ok(r)
}

enum Answered {
    Upgraded,
    /// Answered (or not) without a usable upgrade: the connection is only
    /// read until the client goes.
    Held,
    Closed(String),
}

fn answer_upgrade(
    link: &Link,
    request: &UpgradeRequest,
    behaviour: &Behaviour,
) -> io::Result<Answered> {
    let is_upgrade = request
        .header("Upgrade")
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let status = match behaviour {
        Behaviour::NeverAnswerUpgrade => return Ok(Answered::Held),
        Behaviour::RefuseUpgrade(status) => Some(*status),
        _ if !is_upgrade || request.key.is_none() => Some(400),
        _ => None,
    };
    if let Some(status) = status {
        let response = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{REFUSE_BODY}",
            reason_phrase(status),
            REFUSE_BODY.len()
        );
        link.record().answered_status = Some(status);
        link.write_plain(response.as_bytes())?;
        link.close_tls();
        return Ok(Answered::Closed("refused".into()));
    }
    let key = request.key.clone().unwrap_or_default();
    let offered = request.offered_protocols();
    let (accept, protocol, answered) = match behaviour {
        Behaviour::BadAccept => (
            tungstenite::handshake::derive_accept_key(b"not the client's key"),
            offered.iter().find(|p| *p == "binary").cloned(),
            Answered::Held,
        ),
        Behaviour::WrongSubprotocol => (
            tungstenite::handshake::derive_accept_key(key.as_bytes()),
            WRONG_SUBPROTOCOLS
                .iter()
                .find(|w| !offered.iter().any(|o| o == *w))
                .map(|w| w.to_string()),
            Answered::Held,
        ),
        _ => (
            tungstenite::handshake::derive_accept_key(key.as_bytes()),
            offered.iter().find(|p| *p == "binary").cloned(),
            Answered::Upgraded,
        ),
    };
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
    );
    if let Some(p) = &protocol {
        response.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
    }
    response.push_str("\r\n");
    {
        let mut r = link.record();
        r.answered_status = Some(101);
        r.answered_protocol = protocol;
    }
    link.write_plain(response.as_bytes())?;
    Ok(answered)
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Refused",
    }
}

/// Reads (counting, not parsing) until the client goes or the server stops.
fn hold(link: &Link, reader: &mut Reader) -> String {
    loop {
        let n = reader.pending.len() as u64;
        reader.pending.clear();
        link.record().unframed_bytes += n;
        if link.done() {
            return "stopped".into();
        }
        match reader.read_more(link) {
            Ok(ReadOutcome::Eof) => return "eof".into(),
            Ok(_) => {}
            Err(e) => return format!("error: {e}"),
        }
    }
}

/// The frame loop: records every frame, answers pings and close frames,
/// hands data frames to the behaviour.
fn run_frames(link: &Link, reader: &mut Reader, behaviour: &Behaviour) -> String {
    loop {
        loop {
            let frame = match parse_frame(&mut reader.pending, link.ms()) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    link.record().protocol_errors.push(e.clone());
                    return format!("error: {e}");
                }
            };
            record_received(link, &frame);
            match handle_frame(link, &frame, behaviour) {
                Ok(None) => {}
                Ok(Some(end)) => return end,
                Err(e) => return format!("error: {e}"),
            }
        }
        if link.done() {
            return "stopped".into();
        }
        match reader.read_more(link) {
            Ok(ReadOutcome::Eof) => return "eof".into(),
            Ok(_) => {}
            Err(e) => return format!("error: {e}"),
        }
    }
}

fn record_received(link: &Link, frame: &RawFrame) {
    let mut r = link.record();
    r.frames_received += 1;
    r.payload_bytes_received += frame.wire_payload.len() as u64;
    if frame.mask.is_none() {
        r.protocol_errors
            .push(format!("unmasked client frame (opcode {})", frame.opcode));
    }
    if r.frames.len() < MAX_RECORDED_FRAMES
        && r.received_kept_bytes + frame.wire_payload.len() <= MAX_RECORDED_BYTES
    {
        r.received_kept_bytes += frame.wire_payload.len();
        r.frames.push(frame.clone());
    } else {
        r.frames_not_kept += 1;
    }
}

/// One received frame: `Some(end)` when the connection is over.
fn handle_frame(
    link: &Link,
    frame: &RawFrame,
    behaviour: &Behaviour,
) -> io::Result<Option<String>> {
    let payload = frame.payload();
    match frame.opcode {
        OPCODE_PING => {
            link.record()
                .pings_received
                .push((frame.at_ms, payload.clone()));
            link.send_frame(true, OPCODE_PONG, &payload, None)?;
        }
        OPCODE_PONG => link.record().pongs.push((frame.at_ms, payload)),
        OPCODE_CLOSE => return Ok(Some(close_received(link, frame.at_ms, &payload))),
        OPCODE_CONTINUATION | OPCODE_TEXT | OPCODE_BINARY => {
            on_data(link, frame, &payload, behaviour)?
        }
        other => link
            .record()
            .protocol_errors
            .push(format!("frame with reserved opcode {other}")),
    }
    Ok(None)
}

fn close_received(link: &Link, at_ms: u64, payload: &[u8]) -> String {
    let (code, reason) = if payload.len() >= 2 {
        (
            Some(u16::from_be_bytes([payload[0], payload[1]])),
            String::from_utf8_lossy(&payload[2..]).into_owned(),
        )
    } else {
        (None, String::new())
    };
    let already_sent = {
        let mut r = link.record();
        r.close_received = Some(CloseRecord {
            at_ms,
            code,
            reason: reason.clone(),
        });
        r.close_sent.is_some()
    };
    if !already_sent {
        // The echo: the same code (RFC 6455 5.5.1), no reason.
        let _ = match code {
            Some(c) => link.send_close(c, ""),
            None => link.send_frame(true, OPCODE_CLOSE, &[], None),
        };
    }
    link.close_tls();
    "close handshake".into()
}

/// A data frame for the behaviour.
fn on_data(link: &Link, frame: &RawFrame, payload: &[u8], behaviour: &Behaviour) -> io::Result<()> {
    match behaviour {
        Behaviour::Echo | Behaviour::PingEveryMs(_) => {
            link.send_frame(frame.fin, frame.opcode, payload, None)
        }
        Behaviour::RelayDropping127(_)
            if frame.fin && frame.opcode == OPCODE_BINARY && payload.first() == Some(&127) =>
        {
            link.record().messages_dropped += 1;
            Ok(())
        }
        Behaviour::RelayTo(_) | Behaviour::RelayDropping127(_) => {
            let written = match lock(&link.vnc).as_mut() {
                Some(vnc) => vnc.write_all(payload),
                None => return Ok(()),
            };
            // The VNC server has gone: the same close as when its side ends
            // (the frame loop goes on, for the client's echo).
            if written.is_err() {
                link.send_close(1000, RELAY_CLOSED_REASON)?;
            }
            Ok(())
        }
        Behaviour::Pattern { .. } => {
            let mut r = link.record();
            if r.upstream_first_mismatch.is_none() {
                if let Some(i) = check_pattern(r.upstream_bytes, payload) {
                    r.upstream_first_mismatch = Some(r.upstream_bytes + i as u64);
                }
            }
            r.upstream_bytes += payload.len() as u64;
            Ok(())
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// The behaviours' own sending
// ---------------------------------------------------------------------------

/// Starts the thread that sends what the behaviour sends by itself (for
/// a relay, after connecting to the VNC server).
fn start_sender(link: &Arc<Link>, behaviour: &Behaviour) -> Option<JoinHandle<()>> {
    if let Behaviour::RelayTo(target) | Behaviour::RelayDropping127(target) = behaviour {
        match TcpStream::connect_timeout(target, IO_TIMEOUT) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                link.shared.track_socket(link.id, &s);
                *lock(&link.vnc) = Some(s);
            }
            Err(e) => {
                link.record().send_error = Some(format!("connect {target}: {e}"));
                let _ = link.send_close(1011, RELAY_CONNECT_FAILED_REASON);
                return None;
            }
        }
    }
    let (l, b) = (link.clone(), behaviour.clone());
    Some(thread::spawn(move || {
        if let Err(e) = run_sender(&l, &b) {
            if !l.done() {
                l.record().send_error = Some(e.to_string());
            }
        }
    }))
}

fn run_sender(link: &Link, behaviour: &Behaviour) -> io::Result<()> {
    match behaviour {
        Behaviour::RelayTo(_) | Behaviour::RelayDropping127(_) => relay_downstream(link),
        Behaviour::Pattern { sizes } => {
            let mut offset = 0u64;
            for &size in sizes {
                let mut payload = vec![0u8; size];
                fill_pattern(offset, &mut payload);
                offset += size as u64;
                link.send_frame(true, OPCODE_BINARY, &payload, None)?;
            }
            Ok(())
        }
        Behaviour::Fragmented {
            messages,
            fragment_sizes,
        } => send_fragmented(link, *messages, fragment_sizes),
        Behaviour::PingEveryMs(interval_ms) => send_pings(link, *interval_ms),
        Behaviour::Garbage => {
            let mut bytes = GARBAGE_PREFIX.to_vec();
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            for _ in 0..GARBAGE_RANDOM_BYTES {
                // xorshift64: the same "random" bytes every run.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            link.write_plain(&bytes)
        }
        Behaviour::CloseMidFrame { after_bytes } => send_partial_frame(link, *after_bytes),
        Behaviour::CloseFrame { code, reason } => close_after_exchange(link, *code, reason),
        Behaviour::MaskedFrames => {
            link.send_frame(true, OPCODE_BINARY, GREETING, Some(SERVER_MASK))
        }
        _ => Ok(()),
    }
}

/// VNC → client: one read, one binary frame; close 1000 at the VNC
/// server's end.
fn relay_downstream(link: &Link) -> io::Result<()> {
    let Some(mut vnc) = lock(&link.vnc).as_ref().and_then(|v| v.try_clone().ok()) else {
        return Ok(());
    };
    vnc.set_read_timeout(Some(POLL_INTERVAL))?;
    let mut buf = vec![0u8; RELAY_READ_BYTES];
    while !link.done() {
        match vnc.read(&mut buf) {
            Ok(n) if n > 0 => link.send_frame(true, OPCODE_BINARY, &buf[..n], None)?,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            // The end or a reset (Xvnc resets when it closes with a client
            // message unread): the same close either way.
            _ => {
                if !link.done() {
                    link.send_close(1000, RELAY_CLOSED_REASON)?;
                }
                return Ok(());
            }
        }
    }
    Ok(())
}

fn send_fragmented(link: &Link, messages: usize, fragment_sizes: &[usize]) -> io::Result<()> {
    let mut offset = 0u64;
    for m in 0..messages {
        for (i, &size) in fragment_sizes.iter().enumerate() {
            if link.done() {
                return Ok(());
            }
            let last = i + 1 == fragment_sizes.len();
            let opcode = if i == 0 {
                OPCODE_BINARY
            } else {
                OPCODE_CONTINUATION
            };
            let mut payload = vec![0u8; size];
            fill_pattern(offset, &mut payload);
            offset += size as u64;
            link.send_frame(last, opcode, &payload, None)?;
            if !last {
                link.send_ping(format!("frag {m}.{i}").as_bytes())?;
            }
        }
    }
    Ok(())
}

fn send_pings(link: &Link, interval_ms: u64) -> io::Result<()> {
    let interval = Duration::from_millis(interval_ms.max(1));
    let mut next = Instant::now() + interval;
    for n in 0..MAX_PINGS {
        // Sleep in short steps so the end of the connection is seen soon.
        while Instant::now() < next {
            if link.done() {
                return Ok(());
            }
            thread::sleep((next - Instant::now()).min(Duration::from_millis(10)));
        }
        if link.done() {
            return Ok(());
        }
        link.send_ping(format!("ping {n}").as_bytes())?;
        // At least the interval between two pings, even after a delay.
        next = Instant::now() + interval;
    }
    Ok(())
}

/// The header of a binary frame announcing more than is sent, `after_bytes`
/// of its payload, then the TCP connection is dropped.
fn send_partial_frame(link: &Link, after_bytes: usize) -> io::Result<()> {
    let announced = after_bytes as u64 + (1 << 20);
    let mut bytes = vec![0x80 | OPCODE_BINARY];
    bytes.extend_from_slice(&length_header(announced, false));
    let mut payload = vec![0u8; after_bytes];
    fill_pattern(0, &mut payload);
    bytes.extend_from_slice(&payload);
    link.write_plain(&bytes)?;
    {
        let mut r = link.record();
        r.payload_bytes_sent += after_bytes as u64;
    }
    link.drop_tcp();
    Ok(())
}

fn close_after_exchange(link: &Link, code: u16, reason: &str) -> io::Result<()> {
    link.send_frame(true, OPCODE_BINARY, GREETING, None)?;
    let deadline = Instant::now() + CLOSE_FRAME_WAIT;
    while Instant::now() < deadline && !link.done() {
        if !link.record().data_frames().is_empty() {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    if link.done() {
        return Ok(());
    }
    link.send_close(code, reason)
}

// ---------------------------------------------------------------------------
// websockify: a second, independent real peer
// ---------------------------------------------------------------------------

pub const WEBSOCKIFY: &str = "/usr/bin/websockify";

/// Debian's websockify in front of a TCP target: `--ssl-only` with its own
/// certificate ([`Websockify::start_tls`]) or plain ws
/// ([`Websockify::start_plain`]). It ignores the request path and accepts
/// `binary` (or no subprotocol). Killed with its forked children (its own
/// process group) on drop.
pub struct Websockify {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The certificate of a TLS websockify.
    pub cert: Option<BackendCert>,
    pub target: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Websockify {
    pub fn start_tls(target: &str) -> Websockify {
        Self::start(target, Some(BackendCert::generate()))
    }

    pub fn start_plain(target: &str) -> Websockify {
        Self::start(target, None)
    }

    fn start(target: &str, cert: Option<BackendCert>) -> Websockify {
        assert!(
            std::path::Path::new(WEBSOCKIFY).is_file() || find_program("websockify").is_some(),
            "{}{WEBSOCKIFY} not found: install Debian package websockify (scripts/install-deps.sh test does)",
            ctx()
        );
        let dir = tempfile::Builder::new()
            .prefix("consolegate-websockify-")
            .tempdir()
            .expect("tempdir");
        let log = dir.path().join("websockify.log");
        let mut last_error = String::new();
        // The port is picked by binding :0 and releasing it; another process
        // may take it first, and websockify then exits: try another.
        for attempt in 1..=8 {
            let port = pick_free_port();
            let mut child = spawn_websockify(port, target, cert.as_ref(), &log);
            match wait_listening(port, &mut child) {
                Ok(()) => {
                    return Websockify {
                        child: Some(child),
                        addr: SocketAddr::from(([127, 0, 0, 1], port)),
                        cert,
                        target: target.to_string(),
                        log,
                        _dir: dir,
                    }
                }
                Err(e) => {
                    stop_group(&mut child);
                    last_error = format!(
                        "attempt {attempt} (port {port}): {e}; log:\n{}",
                        tail_of_file(&log, 4000)
                    );
                }
            }
        }
        panic!("{}could not start websockify: {last_error}", ctx());
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `wss://127.0.0.1:PORT{path}` (TLS) or `ws://…` (plain); websockify
    /// ignores the path, so `/ticket/T` works as on a WebMKS host.
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.cert.is_some() { "wss" } else { "ws" };
        format!("{scheme}://127.0.0.1:{}{path}", self.port())
    }

    pub fn thumbprint_sha1(&self) -> &str {
        &self.cert.as_ref().expect("a TLS websockify").sha1
    }

    pub fn thumbprint_sha256(&self) -> &str {
        &self.cert.as_ref().expect("a TLS websockify").sha256
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log(&self) -> String {
        tail_of_file(&self.log, 16 * 1024)
    }
}

impl Drop for Websockify {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_group(&mut c);
        }
        if thread::panicking() {
            eprintln!("---- websockify {} log ----\n{}", self.addr, self.log());
        }
    }
}

fn spawn_websockify(
    port: u16,
    target: &str,
    cert: Option<&BackendCert>,
    log: &std::path::Path,
) -> Child {
    let program = if std::path::Path::new(WEBSOCKIFY).is_file() {
        PathBuf::from(WEBSOCKIFY)
    } else {
        find_program("websockify").expect("websockify")
    };
    let mut cmd = Command::new(program);
    if let Some(c) = cert {
        cmd.arg("--ssl-only")
            .arg("--cert")
            .arg(&c.cert_path)
            .arg("--key")
            .arg(&c.key_path);
    }
    cmd.arg(format!("127.0.0.1:{port}")).arg(target);
    let log_file = fs::File::create(log).expect("create websockify log");
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("clone log"))
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("{}spawn websockify: {e}", ctx()))
}

/// Waits until `port` accepts while the child is alive.
fn wait_listening(port: u16, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("websockify exited with {status}"));
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return match child.try_wait() {
                Ok(None) => Ok(()),
                _ => Err("websockify exited right after the probe".into()),
            };
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "port {port} never accepted within {STARTUP_TIMEOUT:?}"
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// SIGTERM to the process group, a bounded wait, then SIGKILL to the group
/// (websockify forks one child per connection).
fn stop_group(child: &mut Child) {
    let pgid = child.id();
    if let Ok(None) = child.try_wait() {
        signal_group(pgid, "TERM");
        if wait_child(child, Duration::from_secs(3)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    signal_group(pgid, "KILL");
}
