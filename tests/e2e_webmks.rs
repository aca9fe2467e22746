//! End-to-end tests of the WebMKS relay: a browser WebSocket (ws or wss) →
//! consolegate (`consolegate run`, a `{"kind":"webmks"}` session) → a TLS
//! WebSocket backend standing in for an ESXi host's
//! `wss://host:port/ticket/{ticket}` (the kit's [`WssBackend`]), on both IO
//! backends.
//!
//! What they hold the relay to (docs/ARCHITECTURE.md, issue 9): frames pass
//! through one out for each in, browser frames keep the browser's mask key,
//! backend frames reach the browser unmasked and unchanged; the appliance
//! answers pings on each leg itself; the backend's close code reaches the
//! browser; a backend whose certificate does not match the ticket's
//! thumbprint, that refuses or botches the upgrade, or that goes away ends
//! the session with the documented close code (1011 for the backend's
//! faults, 1000 for an end); a slow browser stops backend reads (the
//! appliance's memory stays bounded); a ticket opens one backend connection
//! at most. Random sequences of frames (property tests) come out whole and
//! in order. VMware's own client, wmks.js in headless Chromium, works
//! through a `webmks` session, and its VMware messages (type 127) reach the
//! backend unchanged: the VMware client filter applies to plain `vnc`
//! targets only, a WebMKS host understands them.
//!
//! The browser side here is a raw WebSocket client of this file's own
//! ([`RawWs`]): it sends frames byte for byte as built (mask keys chosen by
//! the test, writes split where the test says) and reads frames as they are
//! on the wire, so frame boundaries, FIN bits and opcodes are checked, not
//! just the reassembled messages.
//!
//! Needs Xvnc, chromium, Node.js and tests/browser/node_modules for the
//! wmks.js test (`bash scripts/install-deps.sh test`); a missing piece fails
//! the test, naming it.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::wss_backend::*;
use common::*;
use serde_json::json;

backend_tests!(
    every_byte_both_ways_tiny_to_beyond_buffer_bytes,
    text_binary_fragments_and_pings_pass_through,
    backend_close_code_and_reason_reach_the_browser,
    thumbprint_pins_the_backend_certificate,
    backend_refusing_or_botching_the_upgrade_ends_with_1011,
    backend_gone_mid_session,
    slow_browser_stops_backend_reads,
    ticket_opens_one_backend_connection,
    random_frame_sequences_come_out_whole_and_in_order,
    wmks_js_through_a_webmks_session,
    novnc_through_a_webmks_session,
    proxy_ssl_target_relays_every_byte_pinned,
    proxy_ssl_target_refuses_an_unpinned_or_wrong_certificate,
    wmks_js_on_a_plain_vnc_session_stays_connected,
);

/// How often a pinging backend pings the appliance.
const BACKEND_PING_MS: u64 = 20;
/// The relay's per-direction bound (the default `buffer_bytes`).
const BUFFER_BYTES: usize = 256 * 1024;
/// Read timeout of one poll of the raw client's socket.
const POLL: Duration = Duration::from_millis(50);
/// The user every session is created for.
const USER: &str = "webmks-e2e";

// ---------------------------------------------------------------------------
// The appliance and its sessions
// ---------------------------------------------------------------------------

/// The browser leg of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leg {
    Ws,
    Wss,
}

const LEGS: [Leg; 2] = [Leg::Ws, Leg::Wss];

/// An appliance whose console port takes wss (its own certificate) and
/// plain ws (`allow_plain`), with `limits` added to `[dataplane.limits]`.
fn appliance(io: &str, cert: &TestCert, limits: &str) -> Appliance {
    Appliance::start(
        io,
        ApplianceOptions {
            tls: Some((cert.cert_path.clone(), cert.key_path.clone())),
            tls_toml: "allow_plain = true".into(),
            limits_toml: limits.into(),
            ..Default::default()
        },
    )
}

/// `POST /api/v1/sessions` with a webmks target at `backend`, pinned to
/// `thumbprint`.
fn webmks_session(
    app: &Appliance,
    backend: &WssBackend,
    ticket: &str,
    thumbprint: &str,
) -> CreatedSession {
    app.create(&json!({
        "target": {"kind": "webmks", "url": backend.url(ticket), "thumbprint": thumbprint},
        "user": USER,
    }))
}

/// A fresh ticket name (unique in the test process).
fn ticket(what: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// Waits until the session is closed and returns its record.
fn wait_closed(app: &Appliance, s: &CreatedSession) -> serde_json::Value {
    app.wait_state(&s.id, "closed", IO_TIMEOUT)
}

// ---------------------------------------------------------------------------
// A raw WebSocket client (the browser)
// ---------------------------------------------------------------------------

/// Why a read of [`RawWs`] ended without a frame.
#[derive(Debug)]
// The error text is read through `Debug`, in failure messages.
#[allow(dead_code)]
enum RawEnd {
    Timeout,
    Eof,
    Error(String),
}

/// A close frame as the browser received it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Close {
    code: Option<u16>,
    reason: String,
}

/// The browser: a WebSocket client over plain TCP or TLS that writes bytes
/// as given and reads frames as they are on the wire.
struct RawWs {
    stream: Box<dyn TcpBacked>,
    /// Bytes read and not parsed into a frame yet.
    buf: Vec<u8>,
    /// The subprotocol the appliance chose.
    protocol: Option<String>,
    started: Instant,
    /// `io=… ws` / `io=… wss`, for failure messages.
    what: String,
}

/// A refused upgrade: the HTTP status and body.
#[derive(Debug)]
struct Refused {
    status: u16,
    body: String,
}

impl RawWs {
    /// TCP (with a fixed receive buffer when `rcvbuf` is set), TLS for
    /// [`Leg::Wss`] (trusting `cert`), then the upgrade of `path`.
    fn try_connect(
        io: &str,
        leg: Leg,
        addr: SocketAddr,
        path: &str,
        protocols: &[&str],
        cert: &TestCert,
        rcvbuf: Option<usize>,
    ) -> Result<RawWs, Refused> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        if let Some(n) = rcvbuf {
            sock.set_recv_buffer_size(n).expect("SO_RCVBUF");
        }
        sock.connect_timeout(&addr.into(), IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("io={io}: connect {addr}: {e}"));
        let tcp: TcpStream = sock.into();
        tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut stream: Box<dyn TcpBacked> = match leg {
            Leg::Ws => Box::new(tcp),
            Leg::Wss => {
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let conn = rustls::ClientConnection::new(cert.client_config(), name).unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                while s.conn.is_handshaking() {
                    s.conn
                        .complete_io(&mut s.sock)
                        .unwrap_or_else(|e| panic!("io={io}: TLS handshake with {addr}: {e}"));
                }
                Box::new(s)
            }
        };
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Origin: http://127.0.0.1:9\r\n"
        );
        if !protocols.is_empty() {
            req.push_str(&format!(
                "Sec-WebSocket-Protocol: {}\r\n",
                protocols.join(", ")
            ));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).expect("write upgrade");
        stream.flush().expect("flush upgrade");
        // The head, then whatever came behind it (frames) stays buffered.
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            match stream.read(&mut chunk) {
                Ok(0) => panic!(
                    "io={io}: connection closed during the upgrade: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("io={io}: reading the upgrade answer: {e}"),
            }
            assert!(buf.len() < 64 * 1024, "io={io}: upgrade answer too long");
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("io={io}: bad status line: {head:?}"));
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        if status != 101 {
            let len: usize = header("Content-Length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = buf[head_end..].to_vec();
            while body.len() < len {
                match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                }
            }
            return Err(Refused {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        assert_eq!(
            header("Sec-WebSocket-Accept").as_deref(),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "io={io}: accept key"
        );
        assert_eq!(
            header("Sec-WebSocket-Extensions"),
            None,
            "io={io}: no extension is ever negotiated"
        );
        Ok(RawWs {
            stream,
            buf: buf[head_end..].to_vec(),
            protocol: header("Sec-WebSocket-Protocol"),
            started: Instant::now(),
            what: format!("io={io} {leg:?}"),
        })
    }

    fn connect(
        io: &str,
        leg: Leg,
        s: &CreatedSession,
        protocols: &[&str],
        cert: &TestCert,
    ) -> RawWs {
        Self::try_connect(io, leg, s.addr, &s.path, protocols, cert, None)
            .unwrap_or_else(|e| panic!("io={io} {leg:?}: upgrade refused: {e:?}"))
    }

    /// Writes `bytes` as is.
    fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .and_then(|_| self.stream.flush())
            .unwrap_or_else(|e| panic!("{}: browser write: {e}", self.what));
    }

    /// Builds a masked frame, sends it and returns its bytes.
    fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let f = build_frame(fin, opcode, payload, Some(mask));
        self.send(&f);
        f
    }

    /// The next frame on the wire.
    fn read_frame(&mut self, timeout: Duration) -> Result<RawFrame, RawEnd> {
        let deadline = Instant::now() + timeout;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let at = self.started.elapsed().as_millis() as u64;
            match parse_frame(&mut self.buf, at) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => return Err(RawEnd::Error(e)),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RawEnd::Timeout);
            }
            self.stream
                .tcp()
                .set_read_timeout(Some(left.min(POLL).max(Duration::from_millis(1))))
                .unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(RawEnd::Eof),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(RawEnd::Error(e.to_string())),
            }
        }
    }

    /// The next data frame (pings and pongs skipped, the appliance's pings
    /// answered); panics on anything else.
    fn next_data(&mut self, timeout: Duration) -> RawFrame {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left) {
                Ok(f) if f.opcode == OPCODE_PING => {
                    let pong = build_frame(true, OPCODE_PONG, &f.payload(), Some([1, 2, 3, 4]));
                    self.send(&pong);
                }
                Ok(f) if f.opcode == OPCODE_PONG => {}
                Ok(f) if f.opcode == OPCODE_CLOSE => panic!(
                    "{}: close {:?} where a data frame was expected",
                    self.what,
                    close_of(&f)
                ),
                Ok(f) => return f,
                Err(e) => panic!("{}: no data frame: {e:?}", self.what),
            }
        }
    }

    /// Reads on (data frames dropped) until the close frame; panics when
    /// the connection ends without one.
    fn expect_close(&mut self, timeout: Duration) -> Close {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left) {
                Ok(f) if f.opcode == OPCODE_CLOSE => {
                    assert_eq!(f.mask, None, "{}: a masked close frame", self.what);
                    return close_of(&f);
                }
                Ok(_) => {}
                Err(e) => panic!("{}: no close frame: {e:?}", self.what),
            }
        }
    }

    /// Every byte until the appliance ends the connection (frames or
    /// not); panics after `timeout`.
    fn read_to_end(&mut self, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: the connection is still open after {timeout:?} ({} bytes read)",
                self.what,
                self.buf.len()
            );
            self.stream
                .tcp()
                .set_read_timeout(Some(left.min(POLL)))
                .unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => return std::mem::take(&mut self.buf),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                // A TLS connection that ends without close_notify.
                Err(_) => return std::mem::take(&mut self.buf),
            }
        }
    }

    /// Sends a close frame with `code`.
    fn send_close(&mut self, code: u16) {
        let f = build_frame(true, OPCODE_CLOSE, &code.to_be_bytes(), Some([7, 7, 7, 7]));
        self.send(&f);
    }
}

fn close_of(f: &RawFrame) -> Close {
    let p = f.payload();
    if p.len() < 2 {
        return Close {
            code: None,
            reason: String::new(),
        };
    }
    Close {
        code: Some(u16::from_be_bytes([p[0], p[1]])),
        reason: String::from_utf8_lossy(&p[2..]).into_owned(),
    }
}

/// A mask key that differs per frame (the relay must keep it).
fn mask_for(i: usize) -> [u8; 4] {
    let b = (i as u32).wrapping_mul(0x9E37_79B9).to_be_bytes();
    [b[0] | 1, b[1], b[2] ^ 0x5A, b[3]]
}

/// The browser's data frames the backend received, as on the wire.
fn received_data_wire(r: &ConnectionRecord) -> Vec<Vec<u8>> {
    r.data_frames().iter().map(|f| f.wire()).collect()
}

// ---------------------------------------------------------------------------
// Every byte, both ways
// ---------------------------------------------------------------------------

/// Frame payload sizes: the header length boundaries, one read (64 KiB),
/// `buffer_bytes` and beyond (three times, within the default
/// `max_frame_bytes` of 1 MiB), and empty frames.
const SIZES: &[usize] = &[
    0,
    1,
    2,
    125,
    126,
    127,
    1000,
    65535,
    65536,
    65537,
    100_000,
    BUFFER_BYTES - 1,
    BUFFER_BYTES,
    BUFFER_BYTES + 1,
    3 * BUFFER_BYTES - 1001,
    1,
];

fn every_byte_both_ways_tiny_to_beyond_buffer_bytes(io: &str) {
    let cert = TestCert::generate();
    let app = appliance(io, &cert, "");
    let total: u64 = SIZES.iter().map(|&n| n as u64).sum();
    for leg in LEGS {
        let what = format!("io={io} {leg:?}");
        let backend = WssBackend::start(Behaviour::Pattern {
            sizes: SIZES.to_vec(),
        });
        let s = webmks_session(&app, &backend, &ticket("bytes"), backend.thumbprint_sha1());
        let mut c = RawWs::connect(io, leg, &s, &["binary"], &cert);
        assert_eq!(c.protocol.as_deref(), Some("binary"), "{what}");

        // Downstream: one frame per backend frame, unmasked, every byte.
        let mut offset = 0u64;
        for (i, &size) in SIZES.iter().enumerate() {
            let f = c.next_data(IO_TIMEOUT);
            assert_eq!(
                (f.fin, f.opcode, f.rsv, f.mask),
                (true, OPCODE_BINARY, 0, None),
                "{what}: frame {i}: {f:?}"
            );
            assert_eq!(f.wire_payload.len(), size, "{what}: frame {i} re-framed");
            assert_eq!(
                check_pattern(offset, &f.wire_payload),
                None,
                "{what}: frame {i} corrupt"
            );
            offset += size as u64;
        }
        // Upstream: every frame reaches the backend as sent, mask key
        // included.
        let sent: Vec<Vec<u8>> = SIZES
            .iter()
            .scan(0u64, |at, &size| {
                let mut p = vec![0u8; size];
                fill_pattern(*at, &mut p);
                *at += size as u64;
                Some(p)
            })
            .enumerate()
            .map(|(i, p)| c.send_frame(true, OPCODE_BINARY, &p, mask_for(i)))
            .collect();
        let r = backend.wait_for(IO_TIMEOUT, "every upstream byte", |r| {
            r.first().filter(|c| c.upstream_bytes == total).cloned()
        });
        assert_eq!(r.upstream_first_mismatch, None, "{what}");
        assert_eq!(
            received_data_wire(&r),
            sent,
            "{what}: a browser frame was changed"
        );
        assert!(r.protocol_errors.is_empty(), "{what}: {r:?}");

        // The browser ends it: its code is echoed, and the backend gets a
        // close frame too (then TLS close_notify).
        c.send_close(1000);
        assert_eq!(c.expect_close(IO_TIMEOUT).code, Some(1000), "{what}");
        let r = backend.wait_ended(0, IO_TIMEOUT);
        assert_eq!(
            r.close_received.as_ref().and_then(|c| c.code),
            Some(1000),
            "{what}: {}",
            r.summary()
        );
        let v = wait_closed(&app, &s);
        assert_eq!(v["close_code"], 1000, "{what}: {v}");
        assert!(
            v["bytes_backend_to_browser"].as_u64().unwrap() >= total
                && v["bytes_browser_to_backend"].as_u64().unwrap() >= total,
            "{what}: bytes counted: {v}"
        );
    }
}

// ---------------------------------------------------------------------------
// Text, binary, fragments, pings
// ---------------------------------------------------------------------------

fn text_binary_fragments_and_pings_pass_through(io: &str) {
    let cert = TestCert::generate();
    let app = appliance(io, &cert, "");
    for leg in LEGS {
        let what = format!("io={io} {leg:?}");
        // Echoes, and pings the appliance every `BACKEND_PING_MS`.
        let backend = WssBackend::start(Behaviour::PingEveryMs(BACKEND_PING_MS));
        let s = webmks_session(&app, &backend, &ticket("frames"), backend.thumbprint_sha1());
        // wmks.js's offer: `binary` is chosen.
        let mut c = RawWs::connect(io, leg, &s, &["binary", "vmware-vvc"], &cert);
        assert_eq!(c.protocol.as_deref(), Some("binary"), "{what}");
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
        // (fin, opcode, payload) of every data frame, in order.
        let data: Vec<(bool, u8, Vec<u8>)> = vec![
            (true, OPCODE_TEXT, "héllo wörld".as_bytes().to_vec()),
            (true, OPCODE_BINARY, vec![127, 5, 0, 4]),
            (false, OPCODE_TEXT, b"frag".to_vec()),
            (false, OPCODE_CONTINUATION, b"men".to_vec()),
            (true, OPCODE_CONTINUATION, b"ted".to_vec()),
            (true, OPCODE_BINARY, big.clone()),
            (true, OPCODE_BINARY, Vec::new()),
            (false, OPCODE_BINARY, big[..300].to_vec()),
            (true, OPCODE_CONTINUATION, big[300..].to_vec()),
        ];
        let mut sent = Vec::new();
        for (i, (fin, op, p)) in data.iter().enumerate() {
            sent.push(c.send_frame(*fin, *op, p, mask_for(i)));
            if i == 2 || i == 7 {
                // A ping between two fragments: the appliance answers it.
                c.send_frame(true, OPCODE_PING, format!("p{i}").as_bytes(), [9, 8, 7, 6]);
            }
        }
        // The echoes, frame for frame, and the appliance's pongs; never
        // the backend's pings (the appliance answers them itself, and its
        // own heartbeat is off).
        let (mut echoes, mut pongs) = (Vec::new(), Vec::new());
        while echoes.len() < data.len() {
            match c.read_frame(IO_TIMEOUT) {
                Ok(f) if f.opcode == OPCODE_PONG => pongs.push(f.payload()),
                Ok(f) if f.opcode == OPCODE_PING => {
                    panic!("{what}: a ping reached the browser: {f:?}")
                }
                Ok(f) => {
                    assert_eq!(f.mask, None, "{what}: a masked frame to the browser");
                    echoes.push((f.fin, f.opcode, f.payload()));
                }
                Err(e) => panic!("{what}: {} echoes, then {e:?}", echoes.len()),
            }
        }
        assert_eq!(echoes, data, "{what}: echoed frames differ");
        assert_eq!(pongs, [b"p2".to_vec(), b"p7".to_vec()], "{what}: pongs");
        let r = backend.wait_for(IO_TIMEOUT, "every data frame", |r| {
            r.first()
                .filter(|c| c.data_frames().len() >= data.len())
                .cloned()
        });
        assert_eq!(received_data_wire(&r), sent, "{what}: frames changed");
        assert!(
            r.pings_received.is_empty(),
            "{what}: the browser's pings reached the backend: {:?}",
            r.pings_received
        );
        assert!(r.protocol_errors.is_empty(), "{what}: {}", r.summary());
        // The backend's pings are answered, in order (some may be skipped:
        // RFC 6455 5.5.3).
        let r = backend.wait_for(IO_TIMEOUT, "three pongs", |r| {
            r.first().filter(|c| c.pongs.len() >= 3).cloned()
        });
        let (answered, pings) = (r.pong_payloads(), r.ping_payloads());
        assert!(
            is_subsequence(&answered, &pings),
            "{what}: pongs {answered:?} for pings {pings:?}"
        );
        // The upgrade as the appliance made it: the ticket's path and
        // host, `binary` only, no extension, a fresh key.
        let up = r.upgrade.clone().expect("the upgrade request");
        assert!(up.path.starts_with("/ticket/frames-"), "{what}: {up:?}");
        assert_eq!(up.offered_protocols(), ["binary"], "{what}");
        assert_eq!(up.extensions, None, "{what}");
        assert_eq!(
            up.host.as_deref(),
            Some(&*format!("127.0.0.1:{}", backend.port())),
            "{what}"
        );
        assert_ne!(
            up.key.as_deref(),
            Some("dGhlIHNhbXBsZSBub25jZQ=="),
            "{what}: the browser's key was reused"
        );
        // The browser's close reaches the backend as a close frame.
        c.send_close(4001);
        assert_eq!(c.expect_close(IO_TIMEOUT).code, Some(4001), "{what}");
        let r = backend.wait_ended(0, IO_TIMEOUT);
        assert_eq!(
            r.close_received.as_ref().and_then(|c| c.code),
            Some(4001),
            "{what}: {}",
            r.summary()
        );
    }
}

// ---------------------------------------------------------------------------
// Close codes
// ---------------------------------------------------------------------------

fn backend_close_code_and_reason_reach_the_browser(io: &str) {
    let cert = TestCert::generate();
    let app = appliance(io, &cert, "");
    for (leg, code, reason) in [
        (Leg::Ws, 4321u16, "host says bye"),
        (Leg::Wss, 1001, "vm powered off"),
    ] {
        let what = format!("io={io} {leg:?}");
        let backend = WssBackend::start(Behaviour::CloseFrame {
            code,
            reason: reason.into(),
        });
        let s = webmks_session(&app, &backend, &ticket("close"), backend.thumbprint_sha1());
        let mut c = RawWs::connect(io, leg, &s, &["binary"], &cert);
        assert_eq!(c.next_data(IO_TIMEOUT).payload(), GREETING, "{what}");
        c.send_frame(true, OPCODE_BINARY, RFB_38, [3, 1, 4, 1]);
        let close = c.expect_close(IO_TIMEOUT);
        assert_eq!(
            close,
            Close {
                code: Some(code),
                reason: reason.into()
            },
            "{what}"
        );
        // The appliance echoed the backend's close to the backend itself.
        let r = backend.wait_ended(0, IO_TIMEOUT);
        assert_eq!(
            r.close_received.as_ref().and_then(|c| c.code),
            Some(code),
            "{what}: {}",
            r.summary()
        );
        assert_eq!(r.end.as_deref(), Some("close handshake"), "{what}");
        c.send_close(code);
        let v = wait_closed(&app, &s);
        assert_eq!(v["close_code"], code, "{what}: {v}");
        assert!(
            v["close_reason"].as_str().unwrap_or("").contains(reason),
            "{what}: {v}"
        );
    }
}

// ---------------------------------------------------------------------------
// Certificate pinning
// ---------------------------------------------------------------------------

fn thumbprint_pins_the_backend_certificate(io: &str) {
    let cert = TestCert::generate();
    let app = appliance(io, &cert, "");
    let backend = WssBackend::start(Behaviour::Echo);
    let other = BackendCert::generate();
    let mut refused = 0;
    for (leg, pin) in [(Leg::Ws, &other.sha1), (Leg::Wss, &other.sha256)] {
        let what = format!("io={io} {leg:?}");
        let t = ticket("pin");
        let s = webmks_session(&app, &backend, &t, pin);
        let mut c = RawWs::connect(io, leg, &s, &["binary"], &cert);
        let close = c.expect_close(IO_TIMEOUT);
        assert_eq!(
            close,
            Close {
                code: Some(1011),
                reason: "backend_cert_mismatch".into()
            },
            "{what}"
        );
        refused += 1;
        let r = backend.wait_ended(refused - 1, IO_TIMEOUT);
        assert!(
            r.tls_error.is_some() && r.upgrade.is_none(),
            "{what}: the appliance went on past a certificate it does not trust: {}",
            r.summary()
        );
        let v = wait_closed(&app, &s);
        assert_eq!(v["close_code"], 1011, "{what}: {v}");
        // The ticket is a secret: not in any log line.
        let logs = format!("{}{}", app.stdout(), app.stderr());
        assert!(
            logs.contains("backend_cert_mismatch"),
            "{what}: no log line names the cause"
        );
        assert!(!logs.contains(&t), "{what}: the ticket reached a log line");
    }
    app.wait_errors_counted("backend_cert_mismatch", 2, IO_TIMEOUT);
    // The right pin, in either form, opens the console.
    for (leg, pin) in [
        (Leg::Ws, backend.thumbprint_sha256().to_string()),
        (Leg::Wss, backend.thumbprint_sha1().to_lowercase()),
    ] {
        let what = format!("io={io} {leg:?} pin {pin}");
        let s = webmks_session(&app, &backend, &ticket("pin-ok"), &pin);
        let mut c = RawWs::connect(io, leg, &s, &["binary"], &cert);
        c.send_frame(true, OPCODE_BINARY, b"pinned", [1, 1, 2, 3]);
        assert_eq!(c.next_data(IO_TIMEOUT).payload(), b"pinned", "{what}");
        c.send_close(1000);
        assert_eq!(c.expect_close(IO_TIMEOUT).code, Some(1000), "{what}");
    }
}

// ---------------------------------------------------------------------------
// A backend that refuses or botches the upgrade, or breaks the protocol
// ---------------------------------------------------------------------------

fn backend_refusing_or_botching_the_upgrade_ends_with_1011(io: &str) {
    const HANDSHAKE_TIMEOUT_MS: u64 = 1_500;
    let cert = TestCert::generate();
    let app = appliance(
        io,
        &cert,
        &format!("handshake_timeout_ms = {HANDSHAKE_TIMEOUT_MS}"),
    );
    let cases = [
        (
            Leg::Ws,
            Behaviour::RefuseUpgrade(404),
            "backend_upgrade_refused",
        ),
        (
            Leg::Wss,
            Behaviour::RefuseUpgrade(404),
            "backend_upgrade_refused",
        ),
        (Leg::Ws, Behaviour::BadAccept, "backend_upgrade_invalid"),
        (
            Leg::Wss,
            Behaviour::WrongSubprotocol,
            "backend_upgrade_invalid",
        ),
        (
            Leg::Ws,
            Behaviour::NeverAnswerUpgrade,
            "backend handshake timed out",
        ),
        (Leg::Wss, Behaviour::Garbage, "backend protocol error"),
        (Leg::Ws, Behaviour::MaskedFrames, "backend protocol error"),
    ];
    for (leg, behaviour, reason) in cases {
        let what = format!("io={io} {leg:?} {behaviour:?}");
        let backend = WssBackend::start(behaviour.clone());
        let s = webmks_session(
            &app,
            &backend,
            &ticket("refused"),
            backend.thumbprint_sha1(),
        );
        let start = Instant::now();
        let mut c = RawWs::connect(io, leg, &s, &["binary"], &cert);
        let close = c.expect_close(IO_TIMEOUT);
        assert_eq!(
            close,
            Close {
                code: Some(1011),
                reason: reason.into()
            },
            "{what}: {}",
            summaries(&backend.connections())
        );
        if matches!(behaviour, Behaviour::NeverAnswerUpgrade) {
            let took = start.elapsed();
            assert!(
                took >= Duration::from_millis(HANDSHAKE_TIMEOUT_MS - 100),
                "{what}: closed after {took:?}"
            );
        }
        let up = backend.wait_upgrade(0, IO_TIMEOUT);
        assert!(up.path.starts_with("/ticket/refused-"), "{what}");
        if let Behaviour::RefuseUpgrade(status) = behaviour {
            assert_eq!(backend.connection(0).answered_status, Some(status));
        }
        // Nothing of the browser's reached a backend that never upgraded.
        let v = wait_closed(&app, &s);
        assert_eq!(v["close_code"], 1011, "{what}: {v}");
        assert_eq!(backend.accepted(), 1, "{what}: the appliance retried");
    }
    for cause in [
        "backend_upgrade_refused",
        "backend_upgrade_invalid",
        "backend_upgrade_timeout",
    ] {
        app.wait_errors_counted(cause, 1, IO_TIMEOUT);
    }
}

// ---------------------------------------------------------------------------
// A backend that goes away
// ---------------------------------------------------------------------------

fn backend_gone_mid_session(io: &str) {
    let cert = TestCert::generate();
    let app = appliance(io, &cert, "");
    // The host drops the TCP connection between frames: 1000.
    for leg in LEGS {
        let what = format!("io={io} {leg:?}");
        let backend = WssBackend::start(Behaviour::Echo);
        let s = webmks_session(&app, &backend, &ticket("gone"), backend.thumbprint_sha1());
        let mut c = RawWs::connect(io, leg, &s, &["binary"], &cert);
        c.send_frame(true, OPCODE_BINARY, b"before", [4, 4, 4, 4]);
        assert_eq!(c.next_data(IO_TIMEOUT).payload(), b"before", "{what}");
        backend.drop_connections();
        let close = c.expect_close(IO_TIMEOUT);
        assert_eq!(
            close,
            Close {
                code: Some(1000),
                reason: "backend closed".into()
            },
            "{what}"
        );
        c.send_close(1000);
        let v = wait_closed(&app, &s);
        assert_eq!(v["close_code"], 1000, "{what}: {v}");
    }
    drop(app);
    const AFTER_BYTES: usize = 10_000;
    // The host dies inside a frame (the header announced `AFTER_BYTES` +
    // 1 MiB, within a raised `max_frame_bytes`): what it sent of the frame
    // reaches the browser. With the default `buffer_bytes` the rest of the
    // frame is more than the appliance pads, so no close frame can follow
    // it and the connection just ends (after `close_timeout_ms`); with a
    // `buffer_bytes` above it, the frame is finished with zeros and the
    // close frame (1000) follows.
    for (buffer_bytes, padded) in [(BUFFER_BYTES, false), (4 << 20, true)] {
        let app = appliance(
            io,
            &cert,
            &format!(
                "max_frame_bytes = {}\nbuffer_bytes = {buffer_bytes}",
                4 << 20
            ),
        );
        for leg in LEGS {
            let what = format!("io={io} {leg:?} mid-frame, buffer_bytes {buffer_bytes}");
            let backend = WssBackend::start(Behaviour::CloseMidFrame {
                after_bytes: AFTER_BYTES,
            });
            let s = webmks_session(&app, &backend, &ticket("mid"), backend.thumbprint_sha1());
            let mut c = RawWs::connect(io, leg, &s, &["binary"], &cert);
            let bytes = c.read_to_end(Duration::from_secs(5));
            let announced = AFTER_BYTES as u64 + (1 << 20);
            assert!(
                bytes.len() >= 10 + AFTER_BYTES,
                "{what}: {} bytes",
                bytes.len()
            );
            let mut head = vec![0x82, 127];
            head.extend_from_slice(&announced.to_be_bytes());
            assert_eq!(bytes[..10], head[..], "{what}: the frame's header");
            assert_eq!(
                check_pattern(0, &bytes[10..10 + AFTER_BYTES]),
                None,
                "{what}: the frame's bytes"
            );
            let rest = &bytes[10 + AFTER_BYTES..];
            if padded {
                let pad = (announced as usize) - AFTER_BYTES;
                assert!(
                    rest.len() >= pad,
                    "{what}: {} bytes after the data",
                    rest.len()
                );
                assert!(rest[..pad].iter().all(|&b| b == 0), "{what}: padding");
                let mut tail = rest[pad..].to_vec();
                let close = parse_frame(&mut tail, 0)
                    .unwrap_or_else(|e| panic!("{what}: {e}"))
                    .unwrap_or_else(|| panic!("{what}: no close frame after the padding"));
                assert_eq!(close.opcode, OPCODE_CLOSE, "{what}: {close:?}");
                assert_eq!(
                    close_of(&close),
                    Close {
                        code: Some(1000),
                        reason: "backend closed".into()
                    },
                    "{what}"
                );
            } else {
                assert!(
                    rest.is_empty(),
                    "{what}: {} bytes after the data",
                    rest.len()
                );
            }
            let v = wait_closed(&app, &s);
            assert_eq!(v["close_code"], 1000, "{what}: {v}");
            assert_eq!(
                v["bytes_backend_to_browser"].as_u64(),
                Some((10 + AFTER_BYTES) as u64),
                "{what}: {v}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Backpressure
// ---------------------------------------------------------------------------

/// The browser's fixed receive buffer while it stalls.
const SLOW_RCVBUF_BYTES: usize = 8 * 1024;
/// What the backend offers a browser that stops reading: 48 MiB, more than
/// the kernel's socket buffers between the two can hold (on the test
/// machines `tcp_rmem` lets a receive buffer grow to 32 MiB), so a relay
/// that kept reading the backend would let it send everything.
const SLOW_FRAMES: usize = 192;
const SLOW_FRAME_BYTES: usize = 256 * 1024;
/// What the browser reads and checks once it reads again (then it goes).
const SLOW_CHECKED_BYTES: u64 = 8 << 20;
/// The default `recv_buffer_bytes` and `uring_provided_buffers`.
const RECV_BUFFER_BYTES: u64 = 64 * 1024;
const URING_PROVIDED_BUFFERS: u64 = 128;
/// Allocator and TLS slack on top of the appliance's own bounds.
const RSS_SLACK_BYTES: u64 = 2 << 20;

/// Most the appliance's VmRSS may grow while one of its sessions is
/// stalled by a slow browser: `buffer_bytes` per direction plus one read,
/// and, on io_uring, the worker's provided buffers (kernel-filled, so
/// resident once used), plus slack. The appliance has one worker.
fn rss_growth_bound(io: &str) -> u64 {
    let ring = if io == "uring" {
        URING_PROVIDED_BUFFERS * RECV_BUFFER_BYTES
    } else {
        0
    };
    2 * BUFFER_BYTES as u64 + RECV_BUFFER_BYTES + ring + RSS_SLACK_BYTES
}

fn slow_browser_stops_backend_reads(io: &str) {
    let cert = TestCert::generate();
    let app = Appliance::start(
        io,
        ApplianceOptions {
            tls: Some((cert.cert_path.clone(), cert.key_path.clone())),
            tls_toml: "allow_plain = true".into(),
            dataplane_toml: "workers = 1".into(),
            ..Default::default()
        },
    );
    let total = (SLOW_FRAMES * SLOW_FRAME_BYTES) as u64;
    for leg in LEGS {
        let what = format!("io={io} {leg:?}");
        let backend = WssBackend::start(Behaviour::Pattern {
            sizes: vec![SLOW_FRAME_BYTES; SLOW_FRAMES],
        });
        let s = webmks_session(&app, &backend, &ticket("slow"), backend.thumbprint_sha1());
        let rss_before = rss_bytes(app.pid()).expect("appliance VmRSS");
        let mut c = RawWs::try_connect(
            io,
            leg,
            s.addr,
            &s.path,
            &["binary"],
            &cert,
            Some(SLOW_RCVBUF_BYTES),
        )
        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
        // The browser reads nothing; the backend's sending must stall.
        let sent = wait_until(Duration::from_secs(30), "the backend to stall", || {
            let a = backend.connections().first()?.payload_bytes_sent;
            // Stalled: no progress for 300 ms (polled, bounded).
            let settle = Instant::now() + Duration::from_millis(300);
            while Instant::now() < settle {
                std::thread::sleep(Duration::from_millis(20));
                if backend.connection(0).payload_bytes_sent != a {
                    return None;
                }
            }
            Some(a)
        });
        let rss_stalled = rss_bytes(app.pid()).expect("appliance VmRSS");
        let growth = rss_stalled.saturating_sub(rss_before);
        eprintln!(
            "{what}: backend stalled after {sent} of {total} bytes; appliance VmRSS {} KiB → {} KiB \
             (+{} KiB, bound {} KiB)",
            rss_before / 1024,
            rss_stalled / 1024,
            growth / 1024,
            rss_growth_bound(io) / 1024
        );
        assert!(
            sent < total,
            "{what}: the backend sent everything to a browser that reads nothing"
        );
        assert!(
            growth <= rss_growth_bound(io),
            "{what}: appliance VmRSS grew {growth} bytes while the browser stalled"
        );
        // The browser reads again: the bytes come whole, in the backend's
        // frames.
        socket2::SockRef::from(c.stream.tcp())
            .set_recv_buffer_size(4 << 20)
            .unwrap();
        let mut offset = 0u64;
        while offset < SLOW_CHECKED_BYTES {
            let f = c.next_data(IO_TIMEOUT);
            assert_eq!(
                f.wire_payload.len(),
                SLOW_FRAME_BYTES,
                "{what}: at {offset}"
            );
            assert_eq!(
                check_pattern(offset, &f.wire_payload),
                None,
                "{what}: frame at {offset}"
            );
            offset += SLOW_FRAME_BYTES as u64;
        }
        // Then it goes away with bytes still on the way: the session ends
        // and the backend connection with it.
        drop(c);
        let v = wait_closed(&app, &s);
        eprintln!("{what}: browser gone: {}", v["close_reason"]);
        let r = backend.wait_ended(0, IO_TIMEOUT);
        assert!(r.payload_bytes_sent < total, "{what}: {}", r.summary());
    }
}

// ---------------------------------------------------------------------------
// Tickets
// ---------------------------------------------------------------------------

fn ticket_opens_one_backend_connection(io: &str) {
    let cert = TestCert::generate();
    let app = appliance(io, &cert, "");
    let backend = WssBackend::start(Behaviour::Echo);
    let s = webmks_session(&app, &backend, &ticket("once"), backend.thumbprint_sha1());
    let mut first = RawWs::connect(io, Leg::Ws, &s, &["binary"], &cert);
    first.send_frame(true, OPCODE_BINARY, b"first", [5, 5, 5, 5]);
    assert_eq!(first.next_data(IO_TIMEOUT).payload(), b"first");
    // The same ticket again, on either leg, while the first is open and
    // after it ended: 403, and no backend connection.
    let replay = |leg: Leg| {
        RawWs::try_connect(io, leg, s.addr, &s.path, &["binary"], &cert, None)
            .err()
            .unwrap_or_else(|| panic!("io={io} {leg:?}: a replayed ticket was accepted"))
    };
    for leg in LEGS {
        let e = replay(leg);
        assert_eq!(e.status, 403, "io={io} {leg:?}: {e:?}");
        assert!(e.body.contains("ticket_replay"), "io={io}: {e:?}");
    }
    first.send_close(1000);
    first.expect_close(IO_TIMEOUT);
    wait_closed(&app, &s);
    let e = replay(Leg::Wss);
    assert_eq!(e.status, 403, "io={io}: after the session: {e:?}");
    // A wrong ticket for the session: 403 too.
    let wrong = RawWs::try_connect(
        io,
        Leg::Ws,
        s.addr,
        &s.path_with_token("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
        &["binary"],
        &cert,
        None,
    )
    .err()
    .expect("a wrong ticket was accepted");
    assert_eq!(wrong.status, 403, "io={io}: {wrong:?}");
    assert_eq!(backend.accepted(), 1, "io={io}: one ticket, one backend");
    // The refusals of an admitted session are counted on it (reported
    // by the worker, so polled).
    app.wait_session(&s.id, "3 refused connects", IO_TIMEOUT, |v| {
        v["refused_connects"].as_u64().unwrap_or(0) >= 3
    });
}

// ---------------------------------------------------------------------------
// Property: random frame sequences, split anywhere
// ---------------------------------------------------------------------------

/// One data message: text or binary, in fragments, each followed (or not)
/// by a ping from the browser.
#[derive(Debug, Clone)]
struct Message {
    text: bool,
    fragments: Vec<(Vec<u8>, bool)>,
}

fn payload_strategy() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    prop_oneof![
        6 => proptest::collection::vec(any::<u8>(), 0..200),
        3 => proptest::collection::vec(any::<u8>(), 200..5_000),
        1 => (60_000usize..300_000).prop_map(|n| (0..n).map(|i| (i * 7 % 251) as u8).collect()),
    ]
}

fn message_strategy() -> impl proptest::strategy::Strategy<Value = Message> {
    use proptest::prelude::*;
    (
        any::<bool>(),
        proptest::collection::vec((payload_strategy(), any::<bool>()), 1..4),
    )
        .prop_map(|(text, fragments)| Message { text, fragments })
}

/// The frames of `messages` (masked with per-frame keys), the data frames
/// alone as (fin, opcode, payload), and the ping payloads.
#[allow(clippy::type_complexity)]
fn frames_of(
    messages: &[Message],
) -> (
    Vec<u8>,
    Vec<Vec<u8>>,
    Vec<(bool, u8, Vec<u8>)>,
    Vec<Vec<u8>>,
) {
    let (mut wire, mut data_wire, mut data, mut pings) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut n = 0usize;
    for (m, message) in messages.iter().enumerate() {
        let last = message.fragments.len() - 1;
        for (i, (payload, ping_after)) in message.fragments.iter().enumerate() {
            let opcode = match (i, message.text) {
                (0, true) => OPCODE_TEXT,
                (0, false) => OPCODE_BINARY,
                _ => OPCODE_CONTINUATION,
            };
            let f = build_frame(i == last, opcode, payload, Some(mask_for(n)));
            n += 1;
            wire.extend_from_slice(&f);
            data_wire.push(f);
            data.push((i == last, opcode, payload.clone()));
            if *ping_after {
                let p = format!("ping {m}.{i}").into_bytes();
                wire.extend_from_slice(&build_frame(true, OPCODE_PING, &p, Some(mask_for(n))));
                n += 1;
                pings.push(p);
            }
        }
    }
    (wire, data_wire, data, pings)
}

/// `part`'s items appear in `whole` in the same order.
fn is_subsequence(part: &[Vec<u8>], whole: &[Vec<u8>]) -> bool {
    let mut rest = whole.iter();
    part.iter().all(|p| rest.any(|w| w == p))
}

/// Cases per IO backend (each a fresh session: tickets are single-use).
const PROPERTY_CASES: u32 = 16;

fn random_frame_sequences_come_out_whole_and_in_order(io: &str) {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    let cert = TestCert::generate();
    let app = appliance(io, &cert, "");
    // The backend echoes every data frame and pings the appliance every
    // few ms, so its pings fall between (and inside) the echoed frames.
    let backend = WssBackend::start(Behaviour::PingEveryMs(BACKEND_PING_MS / 4));
    let mut runner = TestRunner::new(Config {
        cases: PROPERTY_CASES,
        failure_persistence: None,
        max_shrink_iters: 32,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec(message_strategy(), 1..10),
        proptest::collection::vec(1usize..5_000, 1..8),
        any::<bool>(),
    );
    let result = runner.run(&strategy, |(messages, splits, tls)| {
        let leg = if tls { Leg::Wss } else { Leg::Ws };
        let what = format!("io={io} {leg:?}");
        let index = backend.accepted();
        let s = webmks_session(&app, &backend, &ticket("prop"), backend.thumbprint_sha1());
        let mut c = RawWs::connect(io, leg, &s, &["binary"], &cert);
        let (wire, data_wire, data, pings) = frames_of(&messages);
        // The frames' bytes, written in pieces of the chosen sizes (so
        // frames and headers are cut at arbitrary positions).
        let mut at = 0;
        for size in splits.iter().cycle() {
            if at >= wire.len() {
                break;
            }
            let end = (at + size).min(wire.len());
            c.send(&wire[at..end]);
            at = end;
        }
        let (mut echoes, mut pongs) = (Vec::new(), Vec::new());
        while echoes.len() < data.len() {
            match c.read_frame(IO_TIMEOUT) {
                Ok(f) if f.opcode == OPCODE_PONG => pongs.push(f.payload()),
                Ok(f) if f.opcode == OPCODE_PING => {
                    return Err(TestCaseError::fail(format!(
                        "{what}: a ping reached the browser: {f:?}"
                    )))
                }
                Ok(f) => {
                    prop_assert_eq!(f.mask, None, "{}", what);
                    echoes.push((f.fin, f.opcode, f.payload()));
                }
                Err(e) => {
                    return Err(TestCaseError::fail(format!(
                        "{what}: {} of {} echoes, then {e:?}",
                        echoes.len(),
                        data.len()
                    )))
                }
            }
        }
        // Pongs for pings sent last may still be on their way.
        while pongs.len() < pings.len() {
            match c.read_frame(IO_TIMEOUT) {
                Ok(f) if f.opcode == OPCODE_PONG => pongs.push(f.payload()),
                Ok(f) => prop_assert!(false, "{what}: extra frame {f:?}"),
                Err(e) => return Err(TestCaseError::fail(format!("{what}: pongs: {e:?}"))),
            }
        }
        prop_assert!(
            echoes == data,
            "{what}: echoed frames differ from those sent"
        );
        prop_assert_eq!(&pongs, &pings, "{}: pongs", what);
        c.send_close(1000);
        let close = c.expect_close(IO_TIMEOUT);
        prop_assert_eq!(close.code, Some(1000));
        let r = backend.wait_ended(index, IO_TIMEOUT);
        prop_assert!(
            received_data_wire(&r) == data_wire,
            "{what}: the backend got other frames: {}",
            r.summary()
        );
        prop_assert!(r.pings_received.is_empty(), "{what}: {}", r.summary());
        prop_assert_eq!(
            r.close_received.as_ref().and_then(|c| c.code),
            Some(1000),
            "{}: the browser's close did not reach the backend",
            what
        );
        prop_assert!(r.protocol_errors.is_empty(), "{what}: {}", r.summary());
        // The backend's pings were answered by the appliance, in order
        // (RFC 6455 5.5.3 lets it answer only the latest of several pings
        // that waited for a frame boundary: a subsequence).
        let (answered, pings) = (r.pong_payloads(), r.ping_payloads());
        prop_assert!(
            is_subsequence(&answered, &pings),
            "{what}: pongs {answered:?} for pings {pings:?}"
        );
        Ok(())
    });
    if let Err(e) = result {
        panic!("io={io}: {e}\n{}", summaries(&backend.connections()));
    }
}

// ---------------------------------------------------------------------------
// VMware's wmks.js in headless Chromium, through a webmks session
// ---------------------------------------------------------------------------

/// What a wmks.js run needs: node, an appliance (wss and plain ws), and the
/// wmks.js page served over HTTP. The site and the certificate live as
/// long as the page: the server and the appliance read their files.
struct WmksPage {
    node: std::path::PathBuf,
    app: Appliance,
    http: StaticServer,
    _site: WmksSite,
    _cert: TestCert,
}

fn wmks_page(io: &str) -> WmksPage {
    let node = wmks_prerequisites();
    let cert = TestCert::generate();
    let app = appliance(io, &cert, "");
    let site = WmksSite::assemble();
    let http = StaticServer::start(site.path());
    WmksPage {
        node,
        app,
        http,
        _site: site,
        _cert: cert,
    }
}

/// How long wmks.js is watched after `connected`.
const WMKS_WATCH_MS: u64 = 3_000;

fn wmks_js_through_a_webmks_session(io: &str) {
    let page = wmks_page(io);
    let (node, app, http) = (&page.node, &page.app, &page.http);

    // 1. A host that relays to Xvnc and drops VMware's messages (type 127)
    //    before they reach it: wmks.js connects, renders the test card and
    //    stays connected, which only works when each of its messages
    //    crossed the relay as its own frame.
    let xvnc = Xvnc::start();
    xvnc.draw_test_card();
    let backend = WssBackend::start(Behaviour::RelayDropping127(xvnc.addr()));
    let t = ticket("wmks");
    let s = webmks_session(app, &backend, &t, backend.thumbprint_sha1());
    let run = run_wmks(
        node,
        &http.base_url(),
        &s.ws_url.replace("wss://", "ws://"),
        WMKS_WATCH_MS,
        &format!("webmks-{io}-wmks-dropping-127"),
    );
    let r = backend.connection(0);
    eprintln!(
        "io={io}: wmks.js through a webmks session: states {:?}, protocol {:?}, stayed connected {} ms, \
         canvas {} colours, client messages by first byte {:?}, {} dropped by the host",
        run.states, run.protocol, run.stayed_connected_ms, run.canvas_colours, run.sent_first_bytes,
        r.messages_dropped
    );
    assert!(
        run.connected,
        "io={io}: wmks.js never connected:\n{}",
        run.output
    );
    assert_eq!(run.offered, ["binary", "vmware-vvc"], "io={io}");
    assert_eq!(run.protocol.as_deref(), Some("binary"), "io={io}");
    assert_eq!(run.text_messages_received, 0, "io={io}");
    assert!(
        !run.dropped && run.stayed_connected_ms >= WMKS_WATCH_MS,
        "io={io}: dropped after {} ms:\n{}",
        run.stayed_connected_ms,
        run.output
    );
    assert!(
        run.canvas_colours >= 12,
        "io={io}: the test card was not rendered ({} colours)",
        run.canvas_colours
    );
    // What the host got: the appliance's own upgrade, and wmks.js's
    // frames unchanged (masked by Chromium, one message each), VMware's
    // messages among them.
    let up = r.upgrade.as_ref().expect("the upgrade request");
    assert_eq!(up.path, format!("/ticket/{t}"), "io={io}");
    assert_eq!(up.offered_protocols(), ["binary"], "io={io}");
    assert_eq!(up.extensions, None, "io={io}: permessage-deflate offered");
    let data = r.data_frames();
    assert!(
        data.iter()
            .all(|f| f.mask.is_some() && f.opcode == OPCODE_BINARY && f.fin),
        "io={io}: {}",
        r.summary()
    );
    assert_eq!(data[0].payload(), RFB_38, "io={io}: the version first");
    let vmware: Vec<Vec<u8>> = data
        .iter()
        .map(|f| f.payload())
        .filter(|p| p.first() == Some(&127))
        .collect();
    assert!(
        r.messages_dropped >= 1 && vmware.len() as u64 == r.messages_dropped,
        "io={io}: {} messages 127 relayed, {} dropped by the host",
        vmware.len(),
        r.messages_dropped
    );
    for m in &vmware {
        // u8 127, u8 subtype, u16 length of the whole message: whole.
        assert!(m.len() >= 4, "io={io}: {m:?}");
        assert_eq!(
            u16::from_be_bytes([m[2], m[3]]) as usize,
            m.len(),
            "io={io}: {m:?}"
        );
    }
    assert_eq!(
        run.sent_first_bytes.get(&127).copied().unwrap_or(0),
        vmware.len() as u64,
        "io={io}: every message 127 wmks.js sent reached the host"
    );
    drop(backend);

    // 2. A host that hands them to Xvnc as they are: Xvnc closes the VNC
    //    connection on message 127 (as a plain VNC server does), the host
    //    closes the WebSocket with 1000, and the appliance brings that
    //    close to wmks.js: it does not filter a WebMKS session.
    let backend = WssBackend::start(Behaviour::RelayTo(xvnc.addr()));
    let s = webmks_session(app, &backend, &ticket("wmks"), backend.thumbprint_sha1());
    let run = run_wmks(
        node,
        &http.base_url(),
        &s.ws_url.replace("wss://", "ws://"),
        WMKS_WATCH_MS,
        &format!("webmks-{io}-wmks-relay"),
    );
    eprintln!(
        "io={io}: wmks.js, host relaying message 127: states {:?}, stayed connected {} ms, close {:?} {:?}",
        run.states, run.stayed_connected_ms, run.close_code, run.close_reason
    );
    assert!(run.connected, "io={io}: {}", run.output);
    assert!(run.rendered_while_connected, "io={io}: {}", run.output);
    assert!(
        run.dropped,
        "io={io}: Xvnc kept a connection with message 127"
    );
    assert_eq!(run.close_code, Some(1000), "io={io}");
    assert_eq!(
        run.close_reason.as_deref(),
        Some(RELAY_CLOSED_REASON),
        "io={io}"
    );
    let r = backend.wait_ended(0, IO_TIMEOUT);
    assert!(
        r.data_frames()
            .iter()
            .any(|f| f.payload().first() == Some(&127)),
        "io={io}: no message 127 reached the host"
    );
    assert!(xvnc.log().contains("unknown message type 127"), "io={io}");
    let v = wait_closed(app, &s);
    assert_eq!(v["close_code"], 1000, "io={io}: {v}");
}

/// noVNC in headless Chromium through a `webmks` session: the host stand-in
/// relays to Xvnc, noVNC reaches "connected" and renders Xvnc's test card
/// whole (the canvas and a screenshot checked against it), the host got the
/// appliance's own upgrade for the ticket's path offering `binary` only,
/// and the session ends as the browser closes it, with the picture's bytes
/// counted.
fn novnc_through_a_webmks_session(io: &str) {
    let node = browser_prerequisites();
    let cert = TestCert::generate();
    let app = Appliance::start(
        io,
        ApplianceOptions {
            tls: Some((cert.cert_path.clone(), cert.key_path.clone())),
            tls_toml: "allow_plain = true".into(),
            web_dir: Some(std::path::PathBuf::from(NOVNC)),
            ..Default::default()
        },
    );
    let xvnc = Xvnc::start_with(XvncOptions {
        width: 640,
        height: 480,
        password: None,
    });
    let card = xvnc.draw_test_card();
    let backend = WssBackend::start(Behaviour::RelayTo(xvnc.addr()));
    let t = ticket("novnc");
    let s = webmks_session(&app, &backend, &t, backend.thumbprint_sha1());
    let run = run_novnc(
        &node,
        &format!("http://{}", app.console),
        &format!("novnc-webmks-{io}"),
        &[BrowserRun::new("none", &card).path(&s.path)],
    );
    let r = backend.wait_ended(0, IO_TIMEOUT);
    let up = r.upgrade.as_ref().expect("the upgrade request");
    assert_eq!(up.path, format!("/ticket/{t}"), "io={io}");
    assert_eq!(up.offered_protocols(), ["binary"], "io={io}");
    assert!(
        r.data_frames()
            .iter()
            .all(|f| f.mask.is_some() && f.opcode == OPCODE_BINARY),
        "io={io}: {}",
        r.summary()
    );
    let v = wait_closed(&app, &s);
    assert!(
        v["bytes_backend_to_browser"].as_u64() > Some(400),
        "io={io}: the console carried (almost) nothing: {v}\n{}",
        run.output
    );
}

// ---------------------------------------------------------------------------
// Proxy mode: `consolegate proxy --ssl-target` (no control plane)
// ---------------------------------------------------------------------------

/// `consolegate proxy` with a TLS WebSocket target, websockify's drop-in
/// for a WebMKS endpoint: pinned by `--target-thumbprint` in its SHA-1
/// form (`--ssl-target host:port`, path `/`) and its SHA-256 form (a
/// `wss://` URL, whose path reaches the host), every byte passes both ways
/// from 0 bytes to beyond `buffer_bytes`, one message per frame; the host
/// got `binary` offered, and the browser's close reaches it.
fn proxy_ssl_target_relays_every_byte_pinned(io: &str) {
    let total: u64 = SIZES.iter().map(|&n| n as u64).sum();
    let backend = WssBackend::start(Behaviour::Pattern {
        sizes: SIZES.to_vec(),
    });
    let t = ticket("proxy");
    let host_port = format!("127.0.0.1:{}", backend.port());
    let sha1 = backend.thumbprint_sha1().to_string();
    let sha256 = backend.thumbprint_sha256().to_string();
    let cases: [(Vec<&str>, String, String); 2] = [
        (
            vec!["--ssl-target", "--target-thumbprint", &sha1],
            host_port,
            "/".to_string(),
        ),
        (
            vec!["--target-thumbprint", &sha256],
            backend.url(&t),
            format!("/ticket/{t}"),
        ),
    ];
    for (i, (args, target, path)) in cases.iter().enumerate() {
        let what = format!("io={io} proxy {args:?} {target}");
        let proxy = Proxy::start(io, args, Some(target));
        let mut c = ws_connect(io, proxy.addr, "/", &["binary"]);
        assert_eq!(c.protocol.as_deref(), Some("binary"), "{what}");
        let mut offset = 0u64;
        for (k, &size) in SIZES.iter().enumerate() {
            match c.next_message(IO_TIMEOUT) {
                Ok(tungstenite::Message::Binary(b)) => {
                    assert_eq!(b.len(), size, "{what}: message {k} re-framed");
                    assert_eq!(
                        check_pattern(offset, &b),
                        None,
                        "{what}: message {k} corrupt"
                    );
                }
                other => panic!("{what}: message {k}: {other:?}"),
            }
            offset += size as u64;
        }
        let mut at = 0u64;
        for &size in SIZES {
            let mut p = vec![0u8; size];
            fill_pattern(at, &mut p);
            at += size as u64;
            c.send(&p);
        }
        let r = backend.wait_for(IO_TIMEOUT, "every upstream byte", |r| {
            r.get(i).filter(|c| c.upstream_bytes == total).cloned()
        });
        assert_eq!(r.upstream_first_mismatch, None, "{what}");
        assert_eq!(
            received_data_wire(&r).len(),
            SIZES.len(),
            "{what}: re-framed upstream"
        );
        let up = r.upgrade.as_ref().expect("the upgrade request");
        assert_eq!(&up.path, path, "{what}");
        assert_eq!(up.offered_protocols(), ["binary"], "{what}");
        if i == 0 {
            // The close handshake as a browser runs it: our close, its echo.
            c.send_raw(&raw_frame(0x8, &1000u16.to_be_bytes(), Some([7, 7, 7, 7])));
            let (code, _) = c.expect_close(IO_TIMEOUT);
            assert_eq!(code, Some(1000), "{what}");
        } else {
            // A client that sends its close and leaves at once: the close
            // still reaches the host (on io_uring the browser's end used to
            // cut the close frame queued for the host).
            c.close();
        }
        let r = backend.wait_ended(i, IO_TIMEOUT);
        assert_eq!(
            r.close_received.as_ref().and_then(|c| c.code),
            Some(1000),
            "{what}: {}\n{}",
            r.summary(),
            proxy.stderr()
        );
    }
}

/// `consolegate proxy --ssl-target` never relays to a host it cannot
/// trust: a thumbprint of another certificate, or no pin at all against a
/// self-signed host (the system roots do not know it), closes the browser
/// with 1011 and the cause as its reason, logged; no upgrade reaches the
/// host. A pin without a TLS target is refused at start.
fn proxy_ssl_target_refuses_an_unpinned_or_wrong_certificate(io: &str) {
    let backend = WssBackend::start(Behaviour::Echo);
    let other = BackendCert::generate();
    let target = format!("127.0.0.1:{}", backend.port());
    let cases: [(Vec<&str>, &str); 2] = [
        (
            vec!["--ssl-target", "--target-thumbprint", &other.sha1],
            "backend_cert_mismatch",
        ),
        (vec!["--ssl-target"], "backend_cert_untrusted"),
    ];
    for (i, (args, cause)) in cases.iter().enumerate() {
        let what = format!("io={io} proxy {args:?}");
        let proxy = Proxy::start(io, args, Some(&target));
        let mut c = ws_connect(io, proxy.addr, "/", &["binary"]);
        let (code, reason) = c.expect_close(IO_TIMEOUT);
        assert_eq!((code, reason.as_str()), (Some(1011), *cause), "{what}");
        let r = backend.wait_ended(i, IO_TIMEOUT);
        assert!(
            r.tls_error.is_some() && r.upgrade.is_none(),
            "{what}: the proxy went on past a certificate it does not trust: {}",
            r.summary()
        );
        wait_until(IO_TIMEOUT, "the cause in the log", || {
            proxy.stderr().contains(cause).then_some(())
        });
    }
    let err = Proxy::try_start(io, &["--target-thumbprint", &other.sha1], Some(&target))
        .err()
        .unwrap_or_else(|| panic!("io={io}: a pin without a TLS target was accepted"));
    assert!(err.contains("--target-thumbprint"), "io={io}: {err}");
}

/// How long wmks.js must stay connected to a plain VNC server (issue 9).
const WMKS_PLAIN_WATCH_MS: u64 = 5_000;

/// wmks.js (offering `binary, vmware-vvc`) through a plain `vnc` session
/// to Xvnc: the appliance translates or drops VMware's client messages
/// (type 127) that Xvnc would hang up on, so wmks.js stays connected for
/// the whole watch with the test card rendered, Xvnc never saw a message
/// 127, and the metrics count what was dropped or translated.
fn wmks_js_on_a_plain_vnc_session_stays_connected(io: &str) {
    let page = wmks_page(io);
    let (node, app, http) = (&page.node, &page.app, &page.http);
    let xvnc = Xvnc::start();
    xvnc.draw_test_card();
    let s = app.create(&json!({
        "target": {"kind": "vnc", "host": "127.0.0.1", "port": xvnc.port},
        "user": "wmks",
    }));
    let run = run_wmks(
        node,
        &http.base_url(),
        &s.ws_url.replace("wss://", "ws://"),
        WMKS_PLAIN_WATCH_MS,
        &format!("webmks-{io}-wmks-plain-vnc"),
    );
    eprintln!(
        "io={io}: wmks.js on a plain vnc session: states {:?}, stayed connected {} ms, canvas {} colours, \
         client messages by first byte {:?}",
        run.states, run.stayed_connected_ms, run.canvas_colours, run.sent_first_bytes
    );
    assert!(
        run.connected,
        "io={io}: wmks.js never connected:\n{}",
        run.output
    );
    assert!(
        !run.dropped && run.stayed_connected_ms >= WMKS_PLAIN_WATCH_MS,
        "io={io}: dropped after {} ms:\n{}\nXvnc: {}",
        run.stayed_connected_ms,
        run.output,
        xvnc.log()
    );
    assert!(
        run.canvas_colours >= 12,
        "io={io}: the test card was not rendered ({} colours)",
        run.canvas_colours
    );
    let sent_127 = run.sent_first_bytes.get(&127).copied().unwrap_or(0);
    assert!(
        sent_127 >= 1,
        "io={io}: wmks.js sent no VMware message: {:?}",
        run.sent_first_bytes
    );
    assert!(
        !xvnc.log().contains("unknown message type 127"),
        "io={io}: a VMware message reached Xvnc:\n{}",
        xvnc.log()
    );
    let metrics = app.get("/metrics").body;
    let handled: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("consolegate_vmware_client_messages_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        handled >= sent_127 as f64,
        "io={io}: {sent_127} VMware messages sent, {handled} counted as translated or dropped"
    );
}
