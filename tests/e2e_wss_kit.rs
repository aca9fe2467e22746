//! The WebMKS test kit's own tests: every [`Behaviour`] of the TLS
//! WebSocket backend (tests/common/wss_backend.rs) against a rustls +
//! tungstenite client, its recordings, its thumbprints; websockify
//! `--ssl-only` in front of Xvnc; and VMware's wmks.js in headless
//! Chromium (tests/browser/wmks.mjs) against websockify in front of Xvnc,
//! without consolegate: it connects and renders, then Xvnc closes it on
//! VMware's client message 127 (the behaviour the appliance has to fix).
//!
//! Needs Debian's websockify, tigervnc-standalone-server and chromium,
//! Node.js and tests/browser/node_modules (`bash scripts/install-deps.sh
//! test`); a missing piece fails the test, naming it.

#[macro_use]
mod common;

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::wss_backend::*;
use common::*;
use tungstenite::Message;

const ORIGIN: &str = "http://127.0.0.1:9";

/// TCP + TLS (server name `localhost`) to `addr`, handshake done.
fn tls_stream(addr: SocketAddr, tls: Arc<rustls::ClientConfig>, timeout: Duration) -> TlsStream {
    let tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect");
    tcp.set_read_timeout(Some(timeout)).unwrap();
    tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(tls, name).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .expect("TLS handshake with the backend");
    }
    stream
}

fn try_connect(
    backend: &WssBackend,
    path: &str,
    protocols: &[&str],
    timeout: Duration,
) -> Result<TlsClient, HandshakeFailure> {
    let stream = tls_stream(backend.addr, backend.cert.client_config(), timeout);
    let url = format!("wss://localhost:{}{path}", backend.port());
    ws_handshake(stream, &url, protocols, Some(ORIGIN))
}

fn connect(backend: &WssBackend, protocols: &[&str]) -> TlsClient {
    try_connect(backend, "/ticket/kit", protocols, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("upgrade to the WSS backend failed: {e:?}"))
}

/// The next data message (pings are answered by tungstenite as it reads).
fn next_data(c: &mut TlsClient) -> Message {
    loop {
        match c.next_message(IO_TIMEOUT) {
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
            Ok(m) => return m,
            Err(e) => panic!("no data message: {e:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Certificate, upgrade
// ---------------------------------------------------------------------------

#[test]
fn thumbprints_are_those_of_the_served_certificate() {
    // Known vectors: SHA-1 and SHA-256 of "abc".
    assert_eq!(
        thumbprint_sha1(b"abc"),
        "A9:99:3E:36:47:06:81:6A:BA:3E:25:71:78:50:C2:6C:9C:D0:D8:9D"
    );
    assert_eq!(
        thumbprint_sha256(b"abc"),
        "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD"
    );
    let backend = WssBackend::start(Behaviour::Echo);
    let stream = tls_stream(backend.addr, backend.cert.client_config(), IO_TIMEOUT);
    let served = stream.conn.peer_certificates().expect("a peer certificate")[0].to_vec();
    assert_eq!(served, backend.cert.cert_der);
    assert_eq!(backend.thumbprint_sha1(), thumbprint_sha1(&served));
    assert_eq!(backend.thumbprint_sha256(), thumbprint_sha256(&served));
    for (t, bytes) in [
        (backend.thumbprint_sha1(), 20),
        (backend.thumbprint_sha256(), 32),
    ] {
        let groups: Vec<&str> = t.split(':').collect();
        assert_eq!(groups.len(), bytes, "{t}");
        assert!(
            groups.iter().all(|g| g.len() == 2
                && g.chars()
                    .all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c))),
            "{t} is not upper-case hex pairs"
        );
    }
    // Another certificate, other thumbprints.
    assert_ne!(BackendCert::generate().sha1, backend.cert.sha1);
}

#[test]
fn upgrade_request_is_recorded_and_binary_chosen() {
    use tungstenite::client::IntoClientRequest;
    let backend = WssBackend::start(Behaviour::Echo);
    let stream = tls_stream(backend.addr, backend.cert.client_config(), IO_TIMEOUT);
    let mut req = format!("wss://localhost:{}/ticket/abc-123", backend.port())
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert(
        "Sec-WebSocket-Protocol",
        "binary, vmware-vvc".parse().unwrap(),
    );
    h.insert("Origin", ORIGIN.parse().unwrap());
    h.insert(
        "Sec-WebSocket-Extensions",
        "permessage-deflate; client_max_window_bits"
            .parse()
            .unwrap(),
    );
    let (_ws, response) = tungstenite::client::client(req, stream).expect("upgrade");
    assert_eq!(response.status().as_u16(), 101);
    assert_eq!(response.headers()["Sec-WebSocket-Protocol"], "binary");
    assert!(response.headers().get("Sec-WebSocket-Extensions").is_none());

    let up = backend.wait_upgrade(0, IO_TIMEOUT);
    assert_eq!(up.method, "GET");
    assert_eq!(up.path, "/ticket/abc-123");
    assert_eq!(up.version, 1);
    assert_eq!(
        up.host.as_deref(),
        Some(&*format!("localhost:{}", backend.port()))
    );
    assert_eq!(up.protocol.as_deref(), Some("binary, vmware-vvc"));
    assert_eq!(up.offered_protocols(), ["binary", "vmware-vvc"]);
    assert_eq!(
        up.extensions.as_deref(),
        Some("permessage-deflate; client_max_window_bits")
    );
    assert_eq!(up.origin.as_deref(), Some(ORIGIN));
    assert_eq!(up.key.as_ref().map(|k| k.len()), Some(24));
    assert_eq!(up.header("upgrade").as_deref(), Some("websocket"));
    let r = backend.connection(0);
    assert_eq!(r.answered_status, Some(101));
    assert_eq!(r.answered_protocol.as_deref(), Some("binary"));
    assert_eq!(r.tls_error, None);
}

#[test]
fn no_subprotocol_is_answered_when_none_is_offered() {
    let backend = WssBackend::start(Behaviour::Echo);
    let c = connect(&backend, &[]);
    assert_eq!(c.protocol, None);
    let up = backend.wait_upgrade(0, IO_TIMEOUT);
    assert_eq!(up.protocol, None);
    assert!(up.offered_protocols().is_empty());
    assert_eq!(backend.connection(0).answered_protocol, None);
}

#[test]
fn a_client_that_refuses_the_certificate_is_recorded() {
    let backend = WssBackend::start(Behaviour::Echo);
    let other = BackendCert::generate();
    let tcp = tcp_connect(backend.addr);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(other.client_config(), name).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    let mut err = None;
    while err.is_none() && stream.conn.is_handshaking() {
        err = stream.conn.complete_io(&mut stream.sock).err();
    }
    assert!(
        err.is_some(),
        "a certificate the client does not trust was accepted"
    );
    let r = backend.wait_ended(0, IO_TIMEOUT);
    let tls_error = r.tls_error.clone().expect("the TLS error is recorded");
    assert!(tls_error.contains("alert"), "{tls_error}");
    assert!(r.upgrade.is_none());
}

// ---------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------

#[test]
fn echo_records_frames_exactly_as_sent() {
    let backend = WssBackend::start(Behaviour::Echo);
    let mut c = connect(&backend, &["binary"]);
    let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let sent = [
        build_frame(true, OPCODE_BINARY, b"hello", Some([1, 2, 3, 4])),
        build_frame(
            true,
            OPCODE_TEXT,
            "héllo".as_bytes(),
            Some([0xF0, 0x0F, 0xAA, 0x55]),
        ),
        build_frame(true, OPCODE_BINARY, &big[..300], Some([9, 9, 9, 9])),
        build_frame(true, OPCODE_BINARY, &big, Some([0xDE, 0xAD, 0xBE, 0xEF])),
        build_frame(false, OPCODE_BINARY, b"frag", Some([5, 6, 7, 8])),
        build_frame(true, OPCODE_CONTINUATION, b"ment", Some([8, 7, 6, 5])),
    ];
    for f in &sent {
        c.send_raw(f);
    }
    assert_eq!(next_data(&mut c), Message::Binary(b"hello".to_vec().into()));
    assert_eq!(next_data(&mut c), Message::Text("héllo".into()));
    assert_eq!(
        next_data(&mut c),
        Message::Binary(big[..300].to_vec().into())
    );
    assert_eq!(next_data(&mut c), Message::Binary(big.clone().into()));
    assert_eq!(
        next_data(&mut c),
        Message::Binary(b"fragment".to_vec().into())
    );

    let r = backend.wait_for(IO_TIMEOUT, "six frames echoed", |r| {
        r.first().filter(|c| c.frames_sent >= 6).cloned()
    });
    assert_eq!(r.frames.len(), 6);
    for (got, want) in r.frames.iter().zip(&sent) {
        assert_eq!(&got.wire(), want, "a frame was not recorded as sent");
        assert!(got.mask.is_some());
        assert_eq!(got.header.len(), want.len() - got.wire_payload.len());
    }
    assert_eq!(r.frames[0].mask, Some([1, 2, 3, 4]));
    assert_eq!(r.frames[0].payload(), b"hello");
    assert_eq!(
        r.frames[3].header.len(),
        2 + 8 + 4,
        "64-bit length and mask"
    );
    assert_eq!(
        r.frames[2].header.len(),
        2 + 2 + 4,
        "16-bit length and mask"
    );
    assert_eq!(
        (r.frames[4].fin, r.frames[4].opcode),
        (false, OPCODE_BINARY)
    );
    assert_eq!(
        (r.frames[5].fin, r.frames[5].opcode),
        (true, OPCODE_CONTINUATION)
    );
    // The echoes: same FIN, opcode and payload, unmasked.
    for (echo, got) in r.sent.iter().zip(&r.frames) {
        assert_eq!(
            (echo.fin, echo.opcode, echo.mask),
            (got.fin, got.opcode, None)
        );
        assert_eq!(echo.payload(), got.payload());
    }
    assert_eq!(r.upstream_payload().len(), 5 + 6 + 300 + 70_000 + 8);
    assert!(r.protocol_errors.is_empty(), "{:?}", r.protocol_errors);
    // An unmasked client frame is a protocol error the backend records.
    c.send_raw(&build_frame(true, OPCODE_BINARY, b"bare", None));
    assert_eq!(next_data(&mut c), Message::Binary(b"bare".to_vec().into()));
    let r = backend.connection(0);
    assert_eq!(r.protocol_errors, ["unmasked client frame (opcode 2)"]);
}

#[test]
fn pings_from_the_client_are_answered() {
    let backend = WssBackend::start(Behaviour::Echo);
    let mut c = connect(&backend, &["binary"]);
    c.ws.send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    match c.next_message(IO_TIMEOUT) {
        Ok(Message::Pong(p)) => assert_eq!(&p[..], b"are you there"),
        other => panic!("expected the pong, got {other:?}"),
    }
    let r = backend.connection(0);
    assert_eq!(r.pings_received.len(), 1);
    assert_eq!(r.pings_received[0].1, b"are you there");
    assert_eq!(r.sent[0].opcode, OPCODE_PONG);
}

#[test]
fn pattern_is_sent_and_checked_both_ways() {
    let sizes = vec![0, 1, 125, 126, 65_535, 65_536, 300_000];
    let backend = WssBackend::start(Behaviour::Pattern {
        sizes: sizes.clone(),
    });
    let mut c = connect(&backend, &["binary"]);
    let mut offset = 0u64;
    for &size in &sizes {
        let Message::Binary(data) = next_data(&mut c) else {
            panic!("not a binary message")
        };
        assert_eq!(data.len(), size, "one frame per size");
        assert_eq!(check_pattern(offset, &data), None, "pattern at {offset}");
        offset += size as u64;
    }
    let r = backend.connection(0);
    assert_eq!(r.payload_bytes_sent, offset);
    assert_eq!(r.sent.len(), sizes.len());

    // Upstream: the pattern from offset 0 across frames of any size.
    let mut up = vec![0u8; 100_010];
    fill_pattern(0, &mut up);
    c.send(&up[..10]);
    c.send(&up[10..]);
    let r = backend.wait_for(IO_TIMEOUT, "100010 upstream bytes", |r| {
        r.first().filter(|c| c.upstream_bytes == 100_010).cloned()
    });
    assert_eq!(r.upstream_first_mismatch, None);
    // A wrong byte is found at its stream offset.
    let mut bad = vec![0u8; 20];
    fill_pattern(100_010, &mut bad);
    bad[7] ^= 0xFF;
    c.send(&bad);
    let r = backend.wait_for(IO_TIMEOUT, "the mismatch", |r| {
        r.first().filter(|c| c.upstream_bytes == 100_030).cloned()
    });
    assert_eq!(r.upstream_first_mismatch, Some(100_017));
}

#[test]
fn fragmented_messages_with_pings_between_fragments() {
    let fragment_sizes = vec![3, 1_000, 0, 70_000];
    let backend = WssBackend::start(Behaviour::Fragmented {
        messages: 2,
        fragment_sizes: fragment_sizes.clone(),
    });
    let mut c = connect(&backend, &["binary"]);
    let total: usize = fragment_sizes.iter().sum();
    for m in 0..2u64 {
        let Message::Binary(data) = next_data(&mut c) else {
            panic!("not a binary message")
        };
        assert_eq!(data.len(), total, "message {m} reassembled");
        assert_eq!(check_pattern(m * total as u64, &data), None);
    }
    // tungstenite answers each ping as it reads on.
    let _ = c.next_message(Duration::from_millis(200));
    let r = backend.wait_for(IO_TIMEOUT, "six pongs", |r| {
        r.first().filter(|c| c.pongs.len() >= 6).cloned()
    });
    let pings: Vec<Vec<u8>> = [
        "frag 0.0", "frag 0.1", "frag 0.2", "frag 1.0", "frag 1.1", "frag 1.2",
    ]
    .iter()
    .map(|p| p.as_bytes().to_vec())
    .collect();
    assert_eq!(r.ping_payloads(), pings);
    assert_eq!(r.pong_payloads(), pings);
    // On the wire: binary (no FIN), ping, continuation, ping, …, FIN.
    let shape: Vec<(bool, u8)> = r.sent.iter().take(7).map(|f| (f.fin, f.opcode)).collect();
    assert_eq!(
        shape,
        [
            (false, OPCODE_BINARY),
            (true, OPCODE_PING),
            (false, OPCODE_CONTINUATION),
            (true, OPCODE_PING),
            (false, OPCODE_CONTINUATION),
            (true, OPCODE_PING),
            (true, OPCODE_CONTINUATION),
        ]
    );
}

#[test]
fn pings_every_interval_and_records_pongs() {
    let backend = WssBackend::start(Behaviour::PingEveryMs(40));
    let mut c = connect(&backend, &["binary"]);
    c.send(b"still echoing");
    assert_eq!(
        next_data(&mut c),
        Message::Binary(b"still echoing".to_vec().into())
    );
    let deadline = Instant::now() + IO_TIMEOUT;
    while backend.connection(0).pongs.len() < 3 && Instant::now() < deadline {
        let _ = c.next_message(Duration::from_millis(50));
    }
    let r = backend.connection(0);
    assert!(r.pongs.len() >= 3, "{r:#?}");
    assert_eq!(
        r.pong_payloads()[..3],
        [b"ping 0".to_vec(), b"ping 1".to_vec(), b"ping 2".to_vec()]
    );
    let at: Vec<u64> = r.pings_sent.iter().map(|(t, _)| *t).collect();
    for w in at.windows(2) {
        assert!(
            w[1] - w[0] >= 30,
            "pings {at:?} closer than the 40 ms interval"
        );
    }
}

// ---------------------------------------------------------------------------
// Misbehaving backends
// ---------------------------------------------------------------------------

#[test]
fn garbage_is_a_protocol_error_for_the_client() {
    let backend = WssBackend::start(Behaviour::Garbage);
    let mut c = connect(&backend, &["binary"]);
    match c.next_message(IO_TIMEOUT) {
        Err(WsEnd::Error(e)) => assert!(e.to_lowercase().contains("opcode"), "{e}"),
        other => panic!("garbage was accepted: {other:?}"),
    }
    assert_eq!(backend.connection(0).answered_status, Some(101));
}

#[test]
fn close_mid_frame_drops_the_connection_inside_a_frame() {
    let backend = WssBackend::start(Behaviour::CloseMidFrame { after_bytes: 1_000 });
    let mut c = connect(&backend, &["binary"]);
    match c.next_message(IO_TIMEOUT) {
        Err(WsEnd::Error(_)) => {}
        other => panic!("expected a broken connection, got {other:?}"),
    }
    let r = backend.wait_ended(0, IO_TIMEOUT);
    assert_eq!(r.payload_bytes_sent, 1_000);
    assert_eq!(r.close_sent, None);
}

#[test]
fn close_frame_after_a_short_exchange_gets_its_echo() {
    let backend = WssBackend::start(Behaviour::CloseFrame {
        code: 4000,
        reason: "test over".into(),
    });
    let mut c = connect(&backend, &["binary"]);
    assert_eq!(next_data(&mut c), Message::Binary(GREETING.to_vec().into()));
    c.send(RFB_38);
    assert_eq!(
        c.expect_close(IO_TIMEOUT),
        (Some(4000), "test over".to_string())
    );
    // tungstenite sends the echo it queued on its next flush.
    let _ = c.ws.flush();
    let r = backend.wait_ended(0, IO_TIMEOUT);
    assert_eq!(r.close_sent.as_ref().map(|c| c.code), Some(Some(4000)));
    let echo = r.close_received.expect("the client's close echo");
    assert_eq!(echo.code, Some(4000));
    assert_eq!(r.end.as_deref(), Some("close handshake"));
    assert!(r.close_sent.unwrap().at_ms <= echo.at_ms);
}

#[test]
fn never_answered_upgrade_times_out_and_is_recorded() {
    let backend = WssBackend::start(Behaviour::NeverAnswerUpgrade);
    let start = Instant::now();
    let err = try_connect(
        &backend,
        "/ticket/silent",
        &["binary"],
        Duration::from_millis(700),
    )
    .expect_err("an upgrade nobody answered succeeded");
    assert!(start.elapsed() >= Duration::from_millis(700), "{err:?}");
    assert_eq!(err.status, None);
    let up = backend.wait_upgrade(0, IO_TIMEOUT);
    assert_eq!(up.path, "/ticket/silent");
    assert_eq!(backend.connection(0).answered_status, None);
}

#[test]
fn refused_upgrade_has_the_status_and_body() {
    let backend = WssBackend::start(Behaviour::RefuseUpgrade(403));
    let err = try_connect(&backend, "/ticket/expired", &["binary"], IO_TIMEOUT)
        .expect_err("a refused upgrade succeeded");
    assert_eq!(err.status, Some(403));
    assert_eq!(err.body, REFUSE_BODY);
    let r = backend.wait_ended(0, IO_TIMEOUT);
    assert_eq!(r.answered_status, Some(403));
    assert_eq!(r.end.as_deref(), Some("refused"));
}

#[test]
fn bad_accept_is_refused_by_the_client() {
    let backend = WssBackend::start(Behaviour::BadAccept);
    let err = try_connect(&backend, "/ticket/t", &["binary"], IO_TIMEOUT)
        .expect_err("a wrong Sec-WebSocket-Accept was accepted");
    assert!(err.message.contains("Accept"), "{err:?}");
    assert_eq!(backend.wait_upgrade(0, IO_TIMEOUT).path, "/ticket/t");
    assert_eq!(backend.connection(0).answered_status, Some(101));
}

#[test]
fn wrong_subprotocol_is_refused_by_the_client() {
    let backend = WssBackend::start(Behaviour::WrongSubprotocol);
    let err = try_connect(&backend, "/ticket/t", &["binary"], IO_TIMEOUT)
        .expect_err("a subprotocol not offered was accepted");
    assert!(err.message.to_lowercase().contains("protocol"), "{err:?}");
    backend.wait_upgrade(0, IO_TIMEOUT);
    assert_eq!(
        backend.connection(0).answered_protocol.as_deref(),
        Some("vmware-vvc")
    );
    // Offered both (as wmks.js does): another one not offered.
    let _ = try_connect(&backend, "/ticket/t", &["binary", "vmware-vvc"], IO_TIMEOUT)
        .expect_err("a subprotocol not offered was accepted");
    backend.wait_upgrade(1, IO_TIMEOUT);
    assert_eq!(
        backend.connection(1).answered_protocol.as_deref(),
        Some("uint8utf8")
    );
}

#[test]
fn masked_server_frames_are_refused_by_the_client() {
    let backend = WssBackend::start(Behaviour::MaskedFrames);
    let mut c = connect(&backend, &["binary"]);
    match c.next_message(IO_TIMEOUT) {
        Err(WsEnd::Error(e)) => assert!(e.to_lowercase().contains("mask"), "{e}"),
        other => panic!("a masked server frame was accepted: {other:?}"),
    }
    let r = backend.connection(0);
    assert_eq!(r.sent[0].mask, Some(SERVER_MASK));
    assert_eq!(r.sent[0].payload(), GREETING);
}

// ---------------------------------------------------------------------------
// Real VNC behind the kit's backend and behind websockify
// ---------------------------------------------------------------------------

#[test]
fn relay_to_xvnc_speaks_rfb_one_read_one_frame() {
    let mut xvnc = Xvnc::start();
    let backend = WssBackend::start(Behaviour::RelayTo(xvnc.addr()));
    let mut c = connect(&backend, &["binary", "vmware-vvc"]);
    assert_eq!(c.protocol.as_deref(), Some("binary"));
    // The greeting alone is the first message, as wmks.js needs.
    let Message::Binary(first) = next_data(&mut c) else {
        panic!("not binary")
    };
    assert_eq!(&first[..], RFB_38);
    c.push_back(&first);
    let init = rfb_handshake_none(&mut c);
    assert_eq!((init.width, init.height), (320, 240));
    let (kind, rects, _, _) = rfb_request_update(&mut c, init.width, init.height);
    assert_eq!(kind, 0, "a FramebufferUpdate");
    assert!(rects >= 1);
    let r = backend.connection(0);
    assert!(
        r.upstream_payload().starts_with(RFB_38),
        "the client's version reached Xvnc"
    );
    assert_eq!(r.sent[0].payload(), RFB_38);
    assert!(r
        .sent
        .iter()
        .all(|f| f.opcode == OPCODE_BINARY && f.fin && f.mask.is_none()));
    // The VNC server going away ends the session with a close frame.
    xvnc.kill();
    assert_eq!(
        c.expect_close(IO_TIMEOUT),
        (Some(1000), RELAY_CLOSED_REASON.to_string())
    );
    let _ = c.ws.flush();
    let r = backend.wait_ended(0, IO_TIMEOUT);
    assert_eq!(r.close_received.map(|c| c.code), Some(Some(1000)));
}

#[test]
fn relay_to_a_dead_vnc_server_closes_with_1011() {
    let port = pick_free_port();
    let backend = WssBackend::start(Behaviour::RelayTo(SocketAddr::from(([127, 0, 0, 1], port))));
    let mut c = connect(&backend, &["binary"]);
    assert_eq!(
        c.expect_close(IO_TIMEOUT),
        (Some(1011), RELAY_CONNECT_FAILED_REASON.to_string())
    );
    let _ = c.ws.flush();
    assert!(backend.wait_ended(0, IO_TIMEOUT).send_error.is_some());
}

#[test]
fn websockify_ssl_only_relays_to_xvnc() {
    let xvnc = Xvnc::start();
    let ws = Websockify::start_tls(&xvnc.target());
    let cert = ws.cert.as_ref().unwrap();
    let stream = tls_stream(ws.addr, cert.client_config(), IO_TIMEOUT);
    let served = stream.conn.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(thumbprint_sha1(&served), ws.thumbprint_sha1());
    assert_eq!(thumbprint_sha256(&served), ws.thumbprint_sha256());
    let url = ws.url("/ticket/ignored-by-websockify");
    assert!(url.starts_with("wss://127.0.0.1:"));
    let mut c = ws_handshake(stream, &url, &["binary"], Some(ORIGIN)).expect("upgrade");
    assert_eq!(c.protocol.as_deref(), Some("binary"));
    let init = rfb_handshake_none(&mut c);
    assert_eq!((init.width, init.height), (320, 240));
    // Plain ws too, with no subprotocol.
    let plain = Websockify::start_plain(&xvnc.target());
    assert!(plain.url("/").starts_with("ws://"));
    let mut c = ws_connect("plain", plain.addr, "/", &[]);
    assert_eq!(c.protocol, None);
    rfb_handshake_none(&mut c);
}

// ---------------------------------------------------------------------------
// VMware's wmks.js in headless Chromium, without consolegate
// ---------------------------------------------------------------------------

/// How long the wmks.js runs watch the connection after `connected`.
const WMKS_WATCH_MS: u64 = 5_000;
/// Xvnc ends a wmks.js connection this soon after `connected` (PEERS.md:
/// 0.2–1 s; the bound leaves room for a loaded machine).
const XVNC_CLOSES_WMKS_WITHIN_MS: u64 = 2_000;

#[test]
fn wmks_js_through_websockify_connects_renders_then_xvnc_closes_it_on_message_127() {
    let node = wmks_prerequisites();
    let xvnc = Xvnc::start();
    xvnc.draw_test_card();
    let websockify = Websockify::start_tls(&xvnc.target());
    let site = WmksSite::assemble();
    let http = StaticServer::start(site.path());
    let run = run_wmks(
        &node,
        &http.base_url(),
        &websockify.url("/ticket/kit"),
        WMKS_WATCH_MS,
        "wss-kit-wmks-websockify",
    );
    eprintln!(
        "wmks.js via websockify --ssl-only to Xvnc: states {:?}, protocol {:?}, stayed connected {} ms, \
         close {:?} {:?}, canvas {:?} with {} colours (rendered at {:?} ms), client messages by first byte {:?}",
        run.states,
        run.protocol,
        run.stayed_connected_ms,
        run.close_code,
        run.close_reason,
        run.canvas_size,
        run.canvas_colours,
        run.rendered_ms,
        run.sent_first_bytes
    );
    assert!(run.connected, "wmks.js never connected:\n{}", run.output);
    assert_eq!(run.offered, ["binary", "vmware-vvc"]);
    assert_eq!(run.protocol.as_deref(), Some("binary"));
    assert_eq!(run.text_messages_received, 0);
    // It rendered Xvnc's screen (the -retro weave: black and white).
    assert_eq!(run.canvas_size, (320, 240));
    assert!(
        run.rendered_while_connected,
        "nothing drawn while connected:\n{}",
        run.output
    );
    assert!(run.canvas_colours >= 2);
    // Then VMware's own client messages (type 127) made Xvnc close it.
    assert!(
        run.sent_first_bytes.get(&127).copied().unwrap_or(0) >= 1,
        "wmks.js sent no message 127: {:?}",
        run.sent_first_bytes
    );
    assert!(
        run.dropped,
        "the connection was not dropped:\n{}",
        run.output
    );
    assert!(
        run.stayed_connected_ms < XVNC_CLOSES_WMKS_WITHIN_MS,
        "stayed connected {} ms",
        run.stayed_connected_ms
    );
    assert!(run.close_code.is_some(), "no close code recorded");
    wait_until(IO_TIMEOUT, "Xvnc's 'unknown message type 127'", || {
        xvnc.log()
            .contains("unknown message type 127")
            .then_some(())
    });
}

#[test]
fn wmks_js_through_the_kit_backend_relaying_to_xvnc() {
    let node = wmks_prerequisites();
    let xvnc = Xvnc::start();
    let backend = WssBackend::start(Behaviour::RelayTo(xvnc.addr()));
    let site = WmksSite::assemble();
    let http = StaticServer::start(site.path());
    let run = run_wmks(
        &node,
        &http.base_url(),
        &backend.url("kit-ticket"),
        WMKS_WATCH_MS,
        "wss-kit-wmks-backend",
    );
    eprintln!(
        "wmks.js via the kit's backend to Xvnc: states {:?}, stayed connected {} ms, close {:?} {:?}",
        run.states, run.stayed_connected_ms, run.close_code, run.close_reason
    );
    assert!(run.connected, "wmks.js never connected:\n{}", run.output);
    assert_eq!(run.protocol.as_deref(), Some("binary"));
    assert!(run.rendered_while_connected, "{}", run.output);
    // What the backend saw of VMware's client.
    let r = backend.wait_ended(0, IO_TIMEOUT);
    let up = r.upgrade.as_ref().expect("the upgrade request");
    assert_eq!(up.path, "/ticket/kit-ticket");
    assert_eq!(up.offered_protocols(), ["binary", "vmware-vvc"]);
    assert_eq!(up.origin.as_deref(), Some(&*http.base_url()));
    assert_eq!(
        up.host.as_deref(),
        Some(&*format!("127.0.0.1:{}", backend.port()))
    );
    assert!(
        up.extensions
            .as_deref()
            .is_some_and(|e| e.contains("permessage-deflate")),
        "Chromium offers permessage-deflate: {up:?}"
    );
    let data = r.data_frames();
    assert!(data
        .iter()
        .all(|f| f.mask.is_some() && f.opcode == OPCODE_BINARY && f.fin));
    assert_eq!(
        data[0].payload(),
        RFB_38,
        "the client's version is its own message"
    );
    let vmware: Vec<Vec<u8>> = data
        .iter()
        .map(|f| f.payload())
        .filter(|p| p.first() == Some(&127))
        .collect();
    assert!(!vmware.is_empty(), "no message 127 from wmks.js");
    for m in &vmware {
        // u8 127, u8 subtype, u16 length of the whole message.
        assert!(m.len() >= 4, "{m:?}");
        assert_eq!(u16::from_be_bytes([m[2], m[3]]) as usize, m.len(), "{m:?}");
    }
    // Xvnc closed the VNC connection; the backend closed the WebSocket.
    eprintln!(
        "backend: close sent {:?}, received {:?}, end {:?}, send error {:?}",
        r.close_sent, r.close_received, r.end, r.send_error
    );
    assert!(run.dropped && run.stayed_connected_ms < XVNC_CLOSES_WMKS_WITHIN_MS);
    assert_eq!(run.close_code, Some(1000));
    assert_eq!(run.close_reason.as_deref(), Some(RELAY_CLOSED_REASON));
    assert!(xvnc.log().contains("unknown message type 127"));
}

/// The harness's positive control: without VMware's messages reaching
/// Xvnc, wmks.js stays connected for the whole watch and shows the test
/// card.
#[test]
fn wmks_js_stays_connected_when_its_vmware_messages_are_dropped() {
    const WATCH_MS: u64 = 3_000;
    let node = wmks_prerequisites();
    let xvnc = Xvnc::start();
    xvnc.draw_test_card();
    let backend = WssBackend::start(Behaviour::RelayDropping127(xvnc.addr()));
    let site = WmksSite::assemble();
    let http = StaticServer::start(site.path());
    let run = run_wmks(
        &node,
        &http.base_url(),
        &backend.url("kit-ticket"),
        WATCH_MS,
        "wss-kit-wmks-dropping-127",
    );
    let r = backend.connection(0);
    eprintln!(
        "wmks.js with its messages 127 dropped: states {:?}, stayed connected {} ms, canvas {} colours, \
         {} messages dropped, {} bytes to the page",
        run.states, run.stayed_connected_ms, run.canvas_colours, r.messages_dropped, run.bytes_received
    );
    assert!(run.connected, "{}", run.output);
    assert!(
        !run.dropped,
        "dropped after {} ms:\n{}",
        run.stayed_connected_ms, run.output
    );
    assert!(
        run.stayed_connected_ms >= WATCH_MS,
        "{}",
        run.stayed_connected_ms
    );
    assert!(r.messages_dropped >= 1);
    // The test card's twelve colours (and the cursor's).
    assert!(run.canvas_colours >= 12, "{} colours", run.canvas_colours);
    assert!(
        !xvnc.log().contains("unknown message type"),
        "{}",
        xvnc.log()
    );
}
