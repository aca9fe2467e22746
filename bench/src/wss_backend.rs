//! The WebMKS case's stand-in for a VMware host's console endpoint
//! (`wss://host:port/ticket/T`), in-process on 127.0.0.1:
//!
//! - TLS (rustls, the ring provider as the appliance uses) with a
//!   self-signed certificate made at start with rcgen; the bench pins it by
//!   its SHA-1 thumbprint, as a ticket's `sslThumbprint` does;
//! - the server side of the WebSocket upgrade: it answers `binary`, the
//!   subprotocol the appliance offers (ESXi is reported to drop a
//!   connection that does not offer it, so a request without it is refused
//!   with 400 here too), and insists on masked client frames;
//! - then the workload named by the ticket path, the same three the VNC
//!   relay's backends run: [`Mode::Echo`] (each data frame back as one
//!   unmasked frame with the same payload: latency), [`Mode::Stream`]
//!   (binary frames of `chunk_bytes` as fast as the peer takes them, up to
//!   a byte bound: backend → browser), [`Mode::Sink`] (counts the data
//!   payload it receives: browser → backend).
//!
//! One thread per connection ([`ThreadServer`]). It measures nothing and
//! shares no code with the appliance (a bug both had would hide).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ServerConfig, ServerConnection, StreamOwned};
use sha1::{Digest, Sha1};

use crate::server::{ThreadServer, Tracker};
use crate::throughput::SinkCounter;
use crate::wsproto::{self, PayloadCounter};

/// The subprotocol the appliance offers on its WebMKS backend leg.
pub const SUBPROTOCOL: &str = "binary";
/// Longest upgrade request head accepted.
const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// Most connections served at once (above the bench's concurrency).
const MAX_CONNS: usize = 4096;
/// Read buffer of the sink and of the handshake.
const READ_BYTES: usize = 256 * 1024;
/// Echo buffer: one maximal frame plus its header.
const ECHO_BUF_BYTES: usize = wsproto::MAX_RX_PAYLOAD as usize + wsproto::MAX_CLIENT_HEADER;
/// Longest server frame header: 2 + 8 (64-bit length), no mask.
const MAX_SERVER_HEADER: usize = 10;
/// Names in the certificate (the appliance pins it, so they do not matter
/// to it; the bench's own direct client checks `localhost`).
const CERT_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// What a connection does once upgraded; chosen by the ticket path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Echo,
    Stream,
    Sink,
}

impl Mode {
    /// The ticket path that selects this mode.
    pub fn path(self) -> &'static str {
        match self {
            Mode::Echo => "/ticket/echo",
            Mode::Stream => "/ticket/stream",
            Mode::Sink => "/ticket/sink",
        }
    }

    fn from_path(path: &str) -> Option<Mode> {
        [Mode::Echo, Mode::Stream, Mode::Sink]
            .into_iter()
            .find(|m| m.path() == path)
    }
}

/// The TLS rustls uses here and in the appliance: ring.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed certificate and its key, made once per run.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    /// SHA-1 of the certificate, `AA:BB:…` (a ticket's `sslThumbprint`).
    pub sha1_thumbprint: String,
}

impl Identity {
    pub fn generate() -> Result<Identity> {
        let names: Vec<String> = CERT_NAMES.iter().map(|n| n.to_string()).collect();
        let made = rcgen::generate_simple_self_signed(names).context("rcgen self-signed cert")?;
        let cert = made.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(made.signing_key.serialize_der());
        let sha1_thumbprint = sha1_thumbprint(&cert);
        Ok(Identity {
            cert,
            key,
            sha1_thumbprint,
        })
    }

    /// The host's side: TLS 1.2 and 1.3 with rustls's defaults.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let key = PrivateKeyDer::Pkcs8(self.key.clone_key());
        let cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)?;
        Ok(Arc::new(cfg))
    }

    /// A client that trusts this certificate alone (the bench's direct
    /// baseline and the TLS cost measurement; the appliance pins it by
    /// thumbprint instead).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone())?;
        let cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(cfg))
    }
}

/// The server name the bench's own clients check.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(CERT_NAMES[0]).expect("a valid DNS name")
}

/// SHA-1 of `der`, upper-case hex pairs joined by colons.
pub fn sha1_thumbprint(der: &[u8]) -> String {
    let digest = Sha1::digest(der);
    let pairs: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    pairs.join(":")
}

/// A checked upgrade request and the answer to it.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    pub mode: Mode,
    /// The whole `101 Switching Protocols` response.
    pub response: String,
    /// Bytes of the request head (frames may follow in the same read).
    pub head_len: usize,
}

/// A refused upgrade: the status to answer and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

impl Refusal {
    fn new(status: u16, reason: impl Into<String>) -> Refusal {
        Refusal {
            status,
            reason: reason.into(),
        }
    }

    /// The HTTP response, connection closed after it.
    pub fn response(&self) -> String {
        format!(
            "HTTP/1.1 {} Refused\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{}",
            self.status,
            self.reason.len(),
            self.reason
        )
    }
}

/// Checks the upgrade request at the start of `head` (RFC 6455 §4.2.1,
/// and `binary` offered) and builds the 101: `Ok(None)` while the head is
/// incomplete.
pub fn answer_upgrade(head: &[u8]) -> Result<Option<Upgrade>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(head) {
        Ok(httparse::Status::Partial) if head.len() >= MAX_REQUEST_BYTES => {
            return Err(Refusal::new(431, "request head too long"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(n)) => n,
        Err(e) => return Err(Refusal::new(400, format!("bad request: {e}"))),
    };
    if req.method != Some("GET") {
        return Err(Refusal::new(405, "an upgrade is a GET"));
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(Refusal::new(400, "not a WebSocket upgrade"));
    }
    if header("sec-websocket-version").as_deref() != Some("13") {
        return Err(Refusal::new(426, "Sec-WebSocket-Version must be 13"));
    }
    let key = header("sec-websocket-key").ok_or_else(|| Refusal::new(400, "no key"))?;
    if !has_token("sec-websocket-protocol", SUBPROTOCOL) {
        return Err(Refusal::new(400, "subprotocol binary not offered"));
    }
    let path = req.path.unwrap_or("");
    let mode = Mode::from_path(path).ok_or_else(|| Refusal::new(404, "unknown ticket"))?;
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n",
        wsproto::accept_for_key(&key)
    );
    Ok(Some(Upgrade {
        mode,
        response,
        head_len,
    }))
}

/// Writes an unmasked (server) frame header into `out`; returns its length.
pub fn server_header(
    fin: bool,
    opcode: u8,
    len: usize,
    out: &mut [u8; MAX_SERVER_HEADER],
) -> usize {
    out[0] = if fin { 0x80 } else { 0 } | (opcode & 0x0F);
    match len {
        0..=125 => {
            out[1] = len as u8;
            2
        }
        126..=0xFFFF => {
            out[1] = 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            out[1] = 127;
            out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// The echo workload over an upgraded connection: each data frame (masked,
/// as a client must send it) comes back as one unmasked frame with the same
/// FIN bit, opcode and payload; pings are answered, a close is echoed and
/// ends it. `first` are frame bytes that came with the request.
pub fn echo<S: Read + Write>(s: &mut S, first: &[u8]) -> io::Result<()> {
    let mut rx = vec![0u8; ECHO_BUF_BYTES];
    let mut tx = vec![0u8; ECHO_BUF_BYTES];
    if first.len() > rx.len() {
        return Err(invalid("too many bytes behind the request"));
    }
    rx[..first.len()].copy_from_slice(first);
    let (mut start, mut end) = (0usize, first.len());
    loop {
        while let Some(h) = wsproto::parse_header(&rx[start..end]).map_err(invalid)? {
            // payload_len <= MAX_RX_PAYLOAD, so the frame fits the buffer.
            let total = h.header_len + h.payload_len as usize;
            if end - start < total {
                break;
            }
            let mask = h.mask.ok_or_else(|| invalid("unmasked client frame"))?;
            let payload = &mut rx[start + h.header_len..start + total];
            wsproto::apply_mask(payload, mask, 0);
            let opcode = match h.opcode {
                wsproto::OP_PONG => None,
                wsproto::OP_PING => Some(wsproto::OP_PONG),
                other => Some(other),
            };
            if let Some(op) = opcode {
                let mut head = [0u8; MAX_SERVER_HEADER];
                let n = server_header(h.fin, op, payload.len(), &mut head);
                tx[..n].copy_from_slice(&head[..n]);
                tx[n..n + payload.len()].copy_from_slice(payload);
                // One write per frame: one TLS record (or a few) per message.
                s.write_all(&tx[..n + payload.len()])?;
                s.flush()?;
            }
            if h.opcode == wsproto::OP_CLOSE {
                return Ok(());
            }
            start += total;
        }
        rx.copy_within(start..end, 0);
        end -= start;
        start = 0;
        if end == rx.len() {
            return Err(invalid("frame larger than the buffer"));
        }
        let n = s.read(&mut rx[end..])?;
        if n == 0 {
            return Ok(());
        }
        end += n;
    }
}

/// The stream workload: `frame` (one pre-encoded binary frame carrying
/// `payload_bytes`) again and again until `max_payload_bytes` went out or
/// the peer goes away.
pub fn stream<S: Write>(
    s: &mut S,
    frame: &[u8],
    payload_bytes: u64,
    max_payload_bytes: u64,
) -> io::Result<()> {
    let mut sent = 0u64;
    while sent < max_payload_bytes {
        s.write_all(frame)?;
        sent += payload_bytes;
    }
    s.flush()
}

/// The sink workload: counts the data payload of the frames received into
/// `counter` (and when the last byte came, in ns since `base`), until the
/// peer closes.
pub fn sink<S: Read>(
    s: &mut S,
    first: &[u8],
    counter: &SinkCounter,
    base: Instant,
) -> io::Result<()> {
    let mut frames = PayloadCounter::default();
    let mut buf = vec![0u8; READ_BYTES];
    let add = |frames: &mut PayloadCounter, bytes: &[u8]| -> io::Result<()> {
        let got = frames.feed(bytes).map_err(invalid)?;
        counter.bytes.fetch_add(got, Ordering::Relaxed);
        let ns = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        counter.last_ns.fetch_max(ns, Ordering::Relaxed);
        Ok(())
    };
    add(&mut frames, first)?;
    // Bounded by the peer: ends at EOF or error (the server's stop shuts
    // the socket down).
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        add(&mut frames, &buf[..n])?;
    }
}

/// The running stand-in host.
pub struct WssBackend {
    server: ThreadServer,
    pub thumbprint: String,
    /// What [`Mode::Sink`] connections received.
    pub sink: Arc<SinkCounter>,
    /// The sink's time base (`SinkCounter::last_ns`).
    pub base: Instant,
    suite: Arc<Mutex<Option<String>>>,
}

/// What every connection handler shares.
struct Shared {
    tls: Arc<ServerConfig>,
    frame: Vec<u8>,
    chunk_bytes: u64,
    max_stream_bytes: u64,
    sink: Arc<SinkCounter>,
    base: Instant,
    suite: Arc<Mutex<Option<String>>>,
}

impl WssBackend {
    /// Starts on 127.0.0.1 (ephemeral port) with `identity`; stream
    /// connections send frames of `chunk_bytes` payload, at most
    /// `max_stream_bytes` each.
    pub fn start(identity: &Identity, chunk_bytes: usize, max_stream_bytes: u64) -> Result<Self> {
        let payload: Vec<u8> = (0..chunk_bytes).map(|i| (i % 251) as u8).collect();
        let mut head = [0u8; MAX_SERVER_HEADER];
        let n = server_header(true, wsproto::OP_BINARY, payload.len(), &mut head);
        let frame = [&head[..n], payload.as_slice()].concat();
        let sink = Arc::new(SinkCounter::default());
        let base = Instant::now();
        let suite = Arc::new(Mutex::new(None));
        let shared = Arc::new(Shared {
            tls: identity.server_config()?,
            frame,
            chunk_bytes: chunk_bytes as u64,
            max_stream_bytes,
            sink: sink.clone(),
            base,
            suite: suite.clone(),
        });
        let server = ThreadServer::start("wss", MAX_CONNS, move |tcp, _t: &Tracker| {
            serve(tcp, &shared)
        })
        .context("starting the wss backend")?;
        Ok(WssBackend {
            server,
            thumbprint: identity.sha1_thumbprint.clone(),
            sink,
            base,
            suite,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The ticket URL of `mode`.
    pub fn url(&self, mode: Mode) -> String {
        format!("wss://{}{}", self.addr(), mode.path())
    }

    /// The cipher suite the last upgraded connection negotiated.
    pub fn cipher_suite(&self) -> Option<String> {
        self.suite.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn stop(&mut self) {
        self.server.stop();
    }
}

/// One connection: TLS, the upgrade, then its workload.
fn serve(tcp: TcpStream, shared: &Shared) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let conn = ServerConnection::new(shared.tls.clone()).map_err(io::Error::other)?;
    let mut tls = StreamOwned::new(conn, tcp);
    let mut head = Vec::new();
    let mut buf = vec![0u8; 4096];
    let upgrade = loop {
        let n = tls.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        match answer_upgrade(&head) {
            Ok(Some(u)) => break u,
            Ok(None) => {}
            Err(refusal) => {
                tls.write_all(refusal.response().as_bytes())?;
                tls.conn.send_close_notify();
                return tls.flush();
            }
        }
    };
    if let Some(suite) = tls.conn.negotiated_cipher_suite() {
        *shared.suite.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(format!("{:?}", suite.suite()));
    }
    tls.write_all(upgrade.response.as_bytes())?;
    tls.flush()?;
    let first = &head[upgrade.head_len..];
    match upgrade.mode {
        Mode::Echo => echo(&mut tls, first),
        Mode::Stream => stream(
            &mut tls,
            &shared.frame,
            shared.chunk_bytes,
            shared.max_stream_bytes,
        ),
        Mode::Sink => sink(&mut tls, first, &shared.sink, shared.base),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(path: &str, protocols: Option<&str>) -> String {
        let mut r = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:1\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n"
        );
        if let Some(p) = protocols {
            r.push_str(&format!("Sec-WebSocket-Protocol: {p}\r\n"));
        }
        r.push_str("\r\n");
        r
    }

    #[test]
    fn the_upgrade_answers_binary_with_the_right_accept() {
        let req = request("/ticket/echo", Some("binary"));
        let with_frame = [req.as_bytes(), &[0x82, 0x80, 1, 2, 3, 4]].concat();
        let u = answer_upgrade(&with_frame).unwrap().unwrap();
        assert_eq!(u.mode, Mode::Echo);
        assert_eq!(u.head_len, req.len());
        assert!(u
            .response
            .starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        // RFC 6455 §1.3's example key.
        assert!(u
            .response
            .contains("\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(u
            .response
            .contains("\r\nSec-WebSocket-Protocol: binary\r\n"));
        assert!(u.response.ends_with("\r\n\r\n"));
        // wmks.js's offer: binary is chosen.
        let u = answer_upgrade(request("/ticket/sink", Some("binary, vmware-vvc")).as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(u.mode, Mode::Sink);
        assert!(u.response.contains("Sec-WebSocket-Protocol: binary\r\n"));
        assert_eq!(
            answer_upgrade(request("/ticket/stream", Some("binary")).as_bytes())
                .unwrap()
                .unwrap()
                .mode,
            Mode::Stream
        );
    }

    #[test]
    fn the_upgrade_refuses_what_a_host_would() {
        let refused = |r: &str| answer_upgrade(r.as_bytes()).unwrap_err().status;
        assert_eq!(refused(&request("/ticket/echo", None)), 400);
        assert_eq!(refused(&request("/ticket/echo", Some("vmware-vvc"))), 400);
        assert_eq!(refused(&request("/ticket/nope", Some("binary"))), 404);
        let post = request("/ticket/echo", Some("binary")).replacen("GET", "POST", 1);
        assert_eq!(refused(&post), 405);
        let v8 = request("/ticket/echo", Some("binary")).replace("Version: 13", "Version: 8");
        assert_eq!(refused(&v8), 426);
        assert_eq!(refused("NOT HTTP\r\n\r\n"), 400);
        let full = request("/ticket/echo", Some("binary"));
        assert_eq!(answer_upgrade(&full.as_bytes()[..40]), Ok(None));
        let endless = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_REQUEST_BYTES));
        assert_eq!(refused(&endless), 431);
        assert!(Refusal::new(404, "x")
            .response()
            .starts_with("HTTP/1.1 404 "));
    }

    #[test]
    fn server_headers_use_the_shortest_length() {
        let mut h = [0u8; MAX_SERVER_HEADER];
        assert_eq!(server_header(true, wsproto::OP_BINARY, 10, &mut h), 2);
        assert_eq!(&h[..2], &[0x82, 10]);
        assert_eq!(server_header(false, wsproto::OP_TEXT, 300, &mut h), 4);
        assert_eq!(&h[..4], &[0x01, 126, 0x01, 0x2C]);
        assert_eq!(server_header(true, wsproto::OP_BINARY, 65_536, &mut h), 10);
        assert_eq!(&h[..10], &[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        let parsed = wsproto::parse_header(&h).unwrap().unwrap();
        assert_eq!((parsed.payload_len, parsed.mask), (65_536, None));
    }

    /// An in-memory duplex: reads from `input`, collects writes.
    struct Duplex {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            // Two bytes at a time: frames arrive split anywhere.
            let n = b.len().min(2);
            self.input.read(&mut b[..n])
        }
    }

    impl Write for Duplex {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn echo_answers_each_frame_unmasked_and_ends_on_close() {
        let mut input = Vec::new();
        let mut f = vec![0u8; 400];
        for (op, payload) in [
            (wsproto::OP_BINARY, &b"0123456789"[..]),
            (wsproto::OP_PING, b"hi"),
            (wsproto::OP_BINARY, &[7u8; 300][..]),
            (wsproto::OP_CLOSE, &[0x03, 0xE8][..]),
            (wsproto::OP_BINARY, b"never"),
        ] {
            let n = wsproto::encode_client_frame(op, payload, [9, 8, 7, 6], &mut f).unwrap();
            input.extend_from_slice(&f[..n]);
        }
        // The first frame came with the request.
        let mut d = Duplex {
            input: io::Cursor::new(input[16..].to_vec()),
            output: Vec::new(),
        };
        echo(&mut d, &input[..16]).unwrap();
        let mut want = vec![0x82, 10];
        want.extend_from_slice(b"0123456789");
        want.extend_from_slice(&[0x8A, 2, b'h', b'i']);
        want.extend_from_slice(&[0x82, 126, 0x01, 0x2C]);
        want.extend_from_slice(&[7u8; 300]);
        want.extend_from_slice(&[0x88, 2, 0x03, 0xE8]);
        assert_eq!(d.output, want);
        // A client frame without a mask is refused.
        let mut d = Duplex {
            input: io::Cursor::new(vec![0x82, 1, b'x']),
            output: Vec::new(),
        };
        assert!(echo(&mut d, &[]).is_err());
        assert!(d.output.is_empty());
    }

    #[test]
    fn sink_counts_payload_and_stream_stops_at_its_bound() {
        let counter = SinkCounter::default();
        let mut f = vec![0u8; 1100];
        let n =
            wsproto::encode_client_frame(wsproto::OP_BINARY, &[1u8; 1000], [1; 4], &mut f).unwrap();
        let two = [&f[..n], &f[..n]].concat();
        let mut d = Duplex {
            input: io::Cursor::new(two[5..].to_vec()),
            output: Vec::new(),
        };
        sink(&mut d, &two[..5], &counter, Instant::now()).unwrap();
        assert_eq!(counter.bytes.load(Ordering::Relaxed), 2000);
        let mut out = Vec::new();
        stream(&mut out, b"abcd", 3, 10).unwrap();
        assert_eq!(out, b"abcd".repeat(4));
    }

    #[test]
    fn thumbprints_are_colon_hex_sha1() {
        let t = sha1_thumbprint(b"abc");
        // SHA-1("abc") = a9993e36…
        assert!(t.starts_with("A9:99:3E:36:"), "{t}");
        assert_eq!(t.len(), 20 * 3 - 1);
        let id = Identity::generate().unwrap();
        assert_eq!(id.sha1_thumbprint, sha1_thumbprint(&id.cert));
        assert!(id.server_config().is_ok() && id.client_config().is_ok());
    }
}
