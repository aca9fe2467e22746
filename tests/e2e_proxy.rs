//! End-to-end tests of `consolegate proxy` (the websockify-compatible CLI),
//! each run once per IO backend (`name::epoll`, `name::uring`), against real
//! peers on 127.0.0.1: TigerVNC's Xvnc, or small TCP servers from `common`
//! where a test needs to control the backend (echo, endless stream).
//!
//! Needs Debian's tigervnc-standalone-server (`make test` installs it).

#[macro_use]
mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use tungstenite::Message;

backend_tests!(
    rfb_session_through_proxy,
    any_path_is_accepted,
    subprotocol_binary_offered,
    subprotocol_binary_preferred_over_base64,
    subprotocol_base64,
    subprotocol_unsupported_is_400,
    token_file_routes_by_token,
    token_directory_routes_by_token,
    wss_and_plain_on_one_port,
    ssl_only_refuses_plain,
    backpressure_bounds_memory_and_stalls_backend,
    downstream_bulk_delivers_every_byte_in_whole_frames,
    downstream_bulk_without_uring_splice_delivers_every_byte,
    downstream_bulk_base64_takes_the_copying_path,
    splice_pipes_exhausted_falls_back_to_copying,
    sessions_ended_mid_bulk_leak_nothing,
    sessions_ended_mid_splice_close_their_pipes,
    backend_killed_closes_session,
    backend_end_of_stream_delivers_all_then_closes,
    backend_closed_mid_stream_closes_session,
    backend_connect_failure,
    idle_timeout_closes_session,
    heartbeat_sends_pings,
    bad_input_is_contained,
    origin_allowlist,
    web_serves_static_files,
    sigterm_drains_and_exits_zero,
    unsupported_websockify_option_fails,
);

/// RFB through the proxy, both ways: greeting, None security, ClientInit,
/// ServerInit, then a full FramebufferUpdate whose pixels are exactly the
/// test card the test drew into Xvnc.
fn rfb_session_through_proxy(io: &str) {
    let xvnc = Xvnc::start();
    let card = xvnc.draw_test_card();
    let proxy = Proxy::start(io, &[], Some(&xvnc.target()));
    let mut c = ws_connect(io, proxy.addr, "/websockify", &[]);
    assert_eq!(
        c.protocol, None,
        "io={io}: no subprotocol offered, none may be chosen"
    );

    let init = rfb_handshake_none(&mut c);
    assert_eq!(
        (init.width, init.height),
        (xvnc.options.width as u16, xvnc.options.height as u16),
        "io={io}: ServerInit size"
    );
    assert_eq!(init.bits_per_pixel, 32, "io={io}: ServerInit pixel format");
    assert!(!init.name.is_empty(), "io={io}: empty desktop name");

    let fb = rfb_framebuffer(&mut c, init.width, init.height);
    let cmp = card.compare(&fb, 0);
    assert_eq!(cmp.differ, 0, "io={io}: the relayed framebuffer: {cmp}");
    c.close();
}

/// websockify ignores the URL path; so does the proxy.
fn any_path_is_accepted(io: &str) {
    let xvnc = Xvnc::start();
    let proxy = Proxy::start(io, &[], Some(&xvnc.target()));
    for path in ["/", "/websockify", "/some/deeper/path?x=1&y=2"] {
        let mut c = ws_connect(io, proxy.addr, path, &[]);
        let greeting = c.expect_bytes(12, "the RFB greeting");
        assert_eq!(&greeting, RFB_38, "io={io}: greeting through path {path}");
        c.close();
    }
}

fn subprotocol_binary_offered(io: &str) {
    let xvnc = Xvnc::start();
    let proxy = Proxy::start(io, &[], Some(&xvnc.target()));
    let mut c = ws_connect(io, proxy.addr, "/websockify", &["binary"]);
    assert_eq!(
        c.protocol.as_deref(),
        Some("binary"),
        "io={io}: chosen subprotocol"
    );
    match c.next_message(IO_TIMEOUT) {
        Ok(Message::Binary(b)) => {
            assert!(b.starts_with(b"RFB"), "io={io}: first bytes {b:?}");
            c.push_back(&b);
        }
        other => panic!("io={io}: expected a binary frame with the greeting, got {other:?}"),
    }
    rfb_handshake_none(&mut c);
}

fn subprotocol_binary_preferred_over_base64(io: &str) {
    let xvnc = Xvnc::start();
    let proxy = Proxy::start(io, &[], Some(&xvnc.target()));
    let c = ws_connect(io, proxy.addr, "/", &["base64", "binary"]);
    assert_eq!(
        c.protocol.as_deref(),
        Some("binary"),
        "io={io}: binary wins over base64 when both are offered"
    );
}

/// `base64`: the relayed bytes travel base64-encoded in text frames, both ways.
fn subprotocol_base64(io: &str) {
    let xvnc = Xvnc::start();
    let proxy = Proxy::start(io, &[], Some(&xvnc.target()));
    let mut c = ws_connect(io, proxy.addr, "/websockify", &["base64"]);
    assert_eq!(
        c.protocol.as_deref(),
        Some("base64"),
        "io={io}: chosen subprotocol"
    );
    match c.next_message(IO_TIMEOUT) {
        Ok(Message::Text(t)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(t.as_bytes())
                .unwrap_or_else(|e| panic!("io={io}: text frame {t:?} is not base64: {e}"));
            assert!(bytes.starts_with(b"RFB"), "io={io}: decoded {bytes:?}");
            c.push_back(&bytes);
        }
        other => panic!("io={io}: expected a text frame, got {other:?}"),
    }
    // The handshake only succeeds if our base64 text frames reach Xvnc decoded.
    let init = rfb_handshake_none(&mut c);
    assert_eq!(
        init.width as u32, xvnc.options.width,
        "io={io}: ServerInit over base64"
    );
    let (msg_type, ..) = rfb_request_update(&mut c, init.width, init.height);
    assert_eq!(msg_type, 0, "io={io}: FramebufferUpdate over base64");
}

fn subprotocol_unsupported_is_400(io: &str) {
    let backend = EchoServer::start();
    let proxy = Proxy::start(io, &[], Some(&backend.target()));
    let r = raw_http(
        proxy.addr,
        &upgrade_request("/websockify", &["Sec-WebSocket-Protocol: chat, superchat"]),
    );
    assert_eq!(
        r.status, 400,
        "io={io}: only unsupported subprotocols offered: {r:?}"
    );
    r.assert_api_error(400, "no_supported_subprotocol", &format!("io={io}"));
    assert_eq!(
        backend.accepted(),
        0,
        "io={io}: a refused upgrade opened a backend connection"
    );
}

fn write_token_file(path: &std::path::Path, entries: &[(&str, String)]) {
    let mut text = String::from("# websockify TokenFile format: `token: host:port`\n\n");
    for (tok, target) in entries {
        text.push_str(&format!("{tok}: {target}\n"));
    }
    fs::write(path, text).unwrap();
}

/// Asserts that `?token=` values that map to nothing are refused with the
/// documented JSON 404 `unknown_token` (a missing token: 400
/// `missing_token`) and open no backend connection, while `tok1` reaches Xvnc and `echo` the
/// counting echo server.
fn check_token_routing(io: &str, proxy: &Proxy, xvnc: &Xvnc, counter: &EchoServer) {
    for (path, status, code) in [
        ("/websockify?token=nope", 404, "unknown_token"),
        ("/websockify?token=", 404, "unknown_token"),
        ("/websockify", 400, "missing_token"),
    ] {
        let r = raw_http(proxy.addr, &upgrade_request(path, &[]));
        r.assert_api_error(status, code, &format!("io={io} {path}"));
    }

    let mut c = ws_connect(io, proxy.addr, "/websockify?token=tok1", &[]);
    let init = rfb_handshake_none(&mut c);
    assert_eq!(
        init.width as u32, xvnc.options.width,
        "io={io}: tok1 reaches Xvnc"
    );

    let mut e = ws_connect(io, proxy.addr, "/websockify?token=echo", &[]);
    e.send(b"token routing");
    assert_eq!(
        e.expect_bytes(13, "the echo"),
        b"token routing",
        "io={io}: echo token"
    );
    assert_eq!(
        counter.accepted(),
        1,
        "io={io}: the refused tokens must not have opened backend connections"
    );
}

fn token_file_routes_by_token(io: &str) {
    let xvnc = Xvnc::start();
    let counter = EchoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens.cfg");
    write_token_file(
        &file,
        &[("tok1", xvnc.target()), ("echo", counter.target())],
    );
    let proxy = Proxy::start(
        io,
        &[
            "--token-plugin",
            "TokenFile",
            "--token-source",
            file.to_str().unwrap(),
        ],
        None,
    );
    check_token_routing(io, &proxy, &xvnc, &counter);
}

fn token_directory_routes_by_token(io: &str) {
    let xvnc = Xvnc::start();
    let counter = EchoServer::start();
    let dir = tempfile::tempdir().unwrap();
    write_token_file(&dir.path().join("vnc.conf"), &[("tok1", xvnc.target())]);
    write_token_file(&dir.path().join("echo.conf"), &[("echo", counter.target())]);
    let proxy = Proxy::start(
        io,
        &[
            "--token-plugin",
            "TokenFile",
            "--token-source",
            dir.path().to_str().unwrap(),
        ],
        None,
    );
    check_token_routing(io, &proxy, &xvnc, &counter);
}

/// Without --ssl-only one port serves both wss and plain ws (first byte tells).
fn wss_and_plain_on_one_port(io: &str) {
    let xvnc = Xvnc::start();
    let cert = TestCert::generate();
    let proxy = Proxy::start(
        io,
        &["--cert", cert.cert_arg(), "--key", cert.key_arg()],
        Some(&xvnc.target()),
    );
    let mut tls = try_wss_connect(proxy.addr, "/websockify", &["binary"], cert.client_config())
        .unwrap_or_else(|e| panic!("io={io}: wss upgrade failed: {e:?}"));
    assert_eq!(
        tls.protocol.as_deref(),
        Some("binary"),
        "io={io}: wss subprotocol"
    );
    let init = rfb_handshake_none(&mut tls);
    let (msg_type, ..) = rfb_request_update(&mut tls, init.width, init.height);
    assert_eq!(msg_type, 0, "io={io}: FramebufferUpdate over wss");

    let mut plain = ws_connect(io, proxy.addr, "/websockify", &[]);
    let init = rfb_handshake_none(&mut plain);
    assert_eq!(
        init.width as u32, xvnc.options.width,
        "io={io}: plain ws beside wss"
    );
    tls.close();
    plain.close();
}

fn ssl_only_refuses_plain(io: &str) {
    let backend = EchoServer::with_greeting(RFB_38);
    let cert = TestCert::generate();
    let proxy = Proxy::start(
        io,
        &[
            "--cert",
            cert.cert_arg(),
            "--key",
            cert.key_arg(),
            "--ssl-only",
        ],
        Some(&backend.target()),
    );
    // The proxy sniffs the first byte: not a TLS ClientHello under
    // --ssl-only, so it closes the connection without a word (no HTTP
    // answer, which would be plain text on a TLS-only port). One byte is
    // sent, which the proxy reads whole, so its close is a FIN (end of
    // stream), never a reset: the answer is exactly "closed, nothing sent".
    let mut plain = tcp_connect(proxy.addr);
    plain.write_all(b"G").unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    match plain.read_to_end(&mut got) {
        Ok(_) => assert!(
            got.is_empty(),
            "io={io}: --ssl-only answered a plain connection: {:?}",
            String::from_utf8_lossy(&got)
        ),
        Err(e) => panic!("io={io}: --ssl-only: the plain connection ended with {e} after {:?}, not a prompt close", started.elapsed()),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "io={io}: a plain connection under --ssl-only was closed only after {:?}",
        started.elapsed()
    );
    // A full plain upgrade is refused the same way (no 101, no status).
    let e = try_ws_connect_with(proxy.addr, "/websockify", &[], None, Duration::from_secs(5))
        .map(|_| ())
        .expect_err("--ssl-only accepted a plain ws upgrade");
    assert_eq!(
        e.status, None,
        "io={io}: --ssl-only answered with HTTP: {e:?}"
    );
    assert_eq!(
        backend.accepted(),
        0,
        "io={io}: refused plain client reached the backend"
    );

    let mut tls = try_wss_connect(proxy.addr, "/websockify", &[], cert.client_config())
        .unwrap_or_else(|e| panic!("io={io}: wss under --ssl-only failed: {e:?}"));
    assert_eq!(
        &tls.expect_bytes(12, "the greeting over wss"),
        RFB_38,
        "io={io}"
    );
    tls.send(b"over tls");
    assert_eq!(
        tls.expect_bytes(8, "the echo over wss"),
        b"over tls",
        "io={io}"
    );
}

/// A backend that writes as fast as it can and a client that stops reading:
/// the proxy's memory stays bounded and the backend's writes stall; when the
/// client reads again, it gets the whole stream intact and in order.
fn backpressure_bounds_memory_and_stalls_backend(io: &str) {
    const TOTAL: u64 = 64 << 20;
    const RSS_BUDGET: u64 = 16 << 20;
    let server = StreamServer::start(TOTAL, Duration::from_secs(90), Some(64 * 1024));
    let proxy = Proxy::start(io, &[], Some(&server.target()));
    let idle_rss = proxy.rss_bytes();

    let mut c = ws_connect_small_rcvbuf(io, proxy.addr, "/websockify", 64 * 1024);
    // One message proves the stream flows; then the client stops reading.
    let mut offset = 0u64;
    match c.next_message(IO_TIMEOUT) {
        Ok(Message::Binary(b)) => {
            assert_eq!(check_pattern(0, &b), None, "io={io}: first bytes corrupt");
            offset += b.len() as u64;
        }
        other => panic!("io={io}: expected the stream's first binary frame, got {other:?}"),
    }

    // Wait until the backend's written count stops growing for a while.
    let stall_window = Duration::from_millis(1500);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = server.written();
    let mut last_change = Instant::now();
    let mut max_rss = proxy.rss_bytes();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        max_rss = max_rss.max(proxy.rss_bytes());
        let now = server.written();
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() >= stall_window {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "io={io}: the backend never stalled (written {now} bytes): no backpressure"
        );
    }
    let stalled_at = server.written();
    assert!(
        stalled_at < TOTAL && !server.finished(),
        "io={io}: the backend wrote the whole stream ({stalled_at} bytes) while the client was not reading"
    );
    let growth = max_rss.saturating_sub(idle_rss);
    eprintln!(
        "io={io}: backend stalled after {stalled_at} bytes; proxy RSS idle {idle_rss} max {max_rss} (+{growth})"
    );
    assert!(
        growth < RSS_BUDGET,
        "io={io}: proxy RSS grew by {growth} bytes (idle {idle_rss}, max {max_rss}) while the client \
         was not reading; budget {RSS_BUDGET}"
    );

    // Resume: everything arrives, in order, then the backend's close.
    let read_deadline = Instant::now() + Duration::from_secs(60);
    while offset < TOTAL {
        let left = read_deadline.saturating_duration_since(Instant::now());
        match c.next_message(left) {
            Ok(Message::Binary(b)) => {
                if let Some(i) = check_pattern(offset, &b) {
                    panic!(
                        "io={io}: stream corrupt at byte {} (got {}, want {})",
                        offset + i as u64,
                        b[i],
                        pattern_byte(offset + i as u64)
                    );
                }
                offset += b.len() as u64;
            }
            Ok(_) => {}
            Err(e) => panic!("io={io}: stream ended at {offset} of {TOTAL} bytes: {e:?}"),
        }
    }
    assert_eq!(offset, TOTAL, "io={io}: received more than was sent");
    let (code, _) = c.expect_close(Duration::from_secs(5));
    assert_eq!(
        code,
        Some(1000),
        "io={io}: the backend closed normally after the stream"
    );
    // Not asserted: after the stream, RSS also counts buffers the proxy
    // keeps for reuse (e.g. an io_uring provided-buffer ring the kernel has
    // cycled through), a per-worker cost rather than a per-session one.
    eprintln!(
        "io={io}: proxy RSS after relaying {TOTAL} bytes: {} (idle {idle_rss})",
        proxy.rss_bytes()
    );
    // On epoll this stream went through a splice pipe, which was then the
    // session's downstream buffer while the client was not reading.
    let spliced = spliced_bytes(&proxy, 1);
    assert_splice_use(io, spliced, true, true, &proxy);
}

/// `bytes_spliced` of each "session closed" line in the proxy's log, once
/// `sessions` such lines are there.
fn spliced_bytes(proxy: &Proxy, sessions: usize) -> Vec<u64> {
    close_line_field(proxy, sessions, "bytes_spliced")
}

/// `field` of each "session closed" line in the proxy's log, once
/// `sessions` such lines are there.
fn close_line_field(proxy: &Proxy, sessions: usize, field: &str) -> Vec<u64> {
    let key = format!("{field}=");
    wait_until(
        Duration::from_secs(5),
        "the sessions' close log lines",
        || {
            let log = proxy.stderr();
            let v: Vec<u64> = log
                .lines()
                .filter(|l| l.contains("session closed"))
                .filter_map(|l| {
                    l.split(key.as_str())
                        .nth(1)?
                        .split_whitespace()
                        .next()?
                        .parse()
                        .ok()
                })
                .collect();
            (v.len() >= sessions).then_some(v)
        },
    )
}

/// Bulk downstream on plain binary sessions: when `expected`, the bulk
/// stream must have gone through a splice pipe on epoll, and on io_uring
/// too while `uring_splice` is on (the default); with it off, io_uring
/// takes bulk receives straight into frame chunks (`bytes_bulk_recv`).
/// Each session uses only one of the two paths, and base64 neither.
fn assert_splice_use(
    io: &str,
    spliced: Vec<u64>,
    expected: bool,
    uring_splice: bool,
    proxy: &Proxy,
) {
    let bulk = close_line_field(proxy, spliced.len().max(1), "bytes_bulk_recv");
    let bulk_total: u64 = bulk.iter().sum();
    let splices = io == "epoll" || uring_splice;
    if expected && !splices {
        assert!(
            bulk_total > 0,
            "io={io}: no byte came through a bulk receive ({bulk:?})\n{}",
            proxy.diagnostics()
        );
    } else {
        assert_eq!(bulk_total, 0, "io={io}: bulk receives used: {bulk:?}");
    }
    let total: u64 = spliced.iter().sum();
    if expected && splices {
        assert!(
            total > 0,
            "io={io}: no byte went through a splice pipe ({spliced:?})\n{}",
            proxy.diagnostics()
        );
    } else {
        assert_eq!(total, 0, "io={io}: bytes were spliced: {spliced:?}");
    }
}

/// A backend that writes the test pattern in the given steps (bulk writes
/// of several MiB, small writes with pauses between them), then waits for
/// one byte from the client before closing, so the session is still
/// relaying while the client checks its data.
fn scripted_backend(steps: &'static [(usize, u64)]) -> (SocketAddr, std::thread::JoinHandle<u64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut offset = 0u64;
        for &(len, pause_ms) in steps {
            let mut buf = vec![0u8; len];
            fill_pattern(offset, &mut buf);
            if s.write_all(&buf).is_err() {
                return offset;
            }
            offset += len as u64;
            if pause_ms > 0 {
                std::thread::sleep(Duration::from_millis(pause_ms));
            }
        }
        let mut b = [0u8; 1];
        let _ = s.read(&mut b);
        offset
    });
    (addr, h)
}

/// Several MiB downstream in large writes, with small writes in between:
/// every byte arrives in order, in well-formed binary frames no larger than
/// `buffer_bytes`, and the pongs to the client's pings (sent while bulk
/// frames are in flight) arrive as frames of their own, never inside one.
fn downstream_bulk_delivers_every_byte_in_whole_frames(io: &str) {
    downstream_bulk_in_whole_frames(io, true);
}

/// The same with io_uring's splicing off (`--uring-splice=false`): io_uring
/// then takes bulk receives straight into frame chunks; epoll still splices.
fn downstream_bulk_without_uring_splice_delivers_every_byte(io: &str) {
    downstream_bulk_in_whole_frames(io, false);
}

fn downstream_bulk_in_whole_frames(io: &str, uring_splice: bool) {
    const STEPS: &[(usize, u64)] = &[
        (1 << 20, 0),
        (3 << 20, 0),
        (10, 2),
        (10, 2),
        (700, 2),
        (2 << 20, 0),
        (5, 2),
        ((2 << 20) + 3, 0),
    ];
    let total: u64 = STEPS.iter().map(|s| s.0 as u64).sum();
    let (addr, backend) = scripted_backend(STEPS);
    // Pipes well under buffer_bytes: the browser is still read (pings)
    // while a spliced frame waits in the pipe.
    let proxy = Proxy::start(
        io,
        &[
            "--splice-min-bytes",
            "4096",
            "--splice-pipe-bytes",
            "65536",
            if uring_splice {
                "--uring-splice=true"
            } else {
                "--uring-splice=false"
            },
        ],
        Some(&addr.to_string()),
    );
    // A small receive buffer keeps the proxy's browser socket full, so the
    // pings arrive while spliced payload still waits in the pipe.
    let mut c = ws_connect_small_rcvbuf(io, proxy.addr, "/", 64 * 1024);
    // Pings from another thread (raw masked frames on a clone of the
    // socket), so they reach the proxy at any point of a spliced frame.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pinger = {
        let mut sock = c.ws.get_ref().try_clone().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0u16;
            while sent < 5000 && !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let f = raw_frame(0x9, &sent.to_be_bytes(), Some([7, 1, 9, 3]));
                if sock.write_all(&f).is_err() {
                    break;
                }
                sent += 1;
                std::thread::sleep(Duration::from_micros(100));
            }
            sent
        })
    };
    let (mut offset, mut frames, mut pongs, mut largest) = (0u64, 0u64, 0u16, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while offset < total {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_message(left) {
            Ok(Message::Binary(b)) => {
                assert!(!b.is_empty(), "io={io}: empty data frame at {offset}");
                assert!(
                    b.len() <= 256 * 1024,
                    "io={io}: a {} byte frame, over buffer_bytes",
                    b.len()
                );
                if let Some(i) = check_pattern(offset, &b) {
                    panic!(
                        "io={io}: stream corrupt at byte {} of frame {frames}",
                        offset + i as u64
                    );
                }
                offset += b.len() as u64;
                frames += 1;
                largest = largest.max(b.len());
                if frames % 8 == 0 {
                    // A slow reader: the proxy's browser socket stays full.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Ok(Message::Pong(p)) => {
                assert_eq!(p.as_ref(), &pongs.to_be_bytes(), "io={io}: pong payload");
                pongs += 1;
            }
            Ok(other) => panic!("io={io}: unexpected message {other:?} at {offset}"),
            Err(e) => panic!("io={io}: stream ended at {offset} of {total}: {e:?}"),
        }
    }
    assert_eq!(offset, total, "io={io}: more bytes than were sent");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let pings = pinger.join().unwrap();
    // Tell the backend we are done; it closes; the pongs and then the close
    // frame follow the last data frame.
    c.send(b"x");
    loop {
        match c.next_message(Duration::from_secs(5)) {
            Ok(Message::Pong(p)) => {
                assert_eq!(p.as_ref(), &pongs.to_be_bytes(), "io={io}: pong payload");
                pongs += 1;
            }
            Ok(other) => panic!("io={io}: unexpected message {other:?} after the stream"),
            Err(WsEnd::Close(Some((code, _)))) => {
                assert_eq!(code, 1000, "io={io}: close code");
                break;
            }
            Err(e) => panic!("io={io}: no close after the stream: {e:?}"),
        }
    }
    assert_eq!(pongs, pings, "io={io}: pongs for {pings} pings");
    assert_eq!(backend.join().unwrap(), total);
    eprintln!("io={io}: {total} bytes in {frames} frames, largest {largest}, {pings} pings");
    assert_splice_use(io, spliced_bytes(&proxy, 1), true, uring_splice, &proxy);
}

/// base64 must be encoded in user space: a bulk stream under the base64
/// subprotocol arrives intact, as text frames, without splicing.
fn downstream_bulk_base64_takes_the_copying_path(io: &str) {
    const TOTAL: u64 = 4 << 20;
    let server = StreamServer::start(TOTAL, Duration::from_secs(30), None);
    let proxy = Proxy::start(io, &[], Some(&server.target()));
    let mut c = ws_connect(io, proxy.addr, "/", &["base64"]);
    assert_eq!(c.protocol.as_deref(), Some("base64"), "io={io}");
    let mut offset = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while offset < TOTAL {
        let left = deadline.saturating_duration_since(Instant::now());
        match c.next_message(left) {
            Ok(Message::Text(t)) => {
                let b = base64::engine::general_purpose::STANDARD
                    .decode(t.as_bytes())
                    .unwrap_or_else(|e| panic!("io={io}: frame at {offset} is not base64: {e}"));
                assert_eq!(
                    check_pattern(offset, &b),
                    None,
                    "io={io}: corrupt at {offset}"
                );
                offset += b.len() as u64;
            }
            Ok(other) => panic!("io={io}: expected text frames, got {other:?}"),
            Err(e) => panic!("io={io}: stream ended at {offset} of {TOTAL}: {e:?}"),
        }
    }
    let (code, _) = c.expect_close(Duration::from_secs(5));
    assert_eq!(code, Some(1000), "io={io}");
    assert_splice_use(io, spliced_bytes(&proxy, 1), false, true, &proxy);
}

/// One worker, one splice pipe, and a client that stops reading while its
/// session holds the pipe: other sessions keep streaming through the
/// copying path, and every stream arrives intact.
fn splice_pipes_exhausted_falls_back_to_copying(io: &str) {
    const TOTAL: u64 = 8 << 20;
    let servers: Vec<StreamServer> = (0..3)
        .map(|_| StreamServer::start(TOTAL, Duration::from_secs(60), None))
        .collect();
    let token_dir = tempfile::tempdir().unwrap();
    let tokens = token_dir.path().join("tokens");
    let entries: Vec<(&str, String)> = ["s0", "s1", "s2"]
        .iter()
        .zip(&servers)
        .map(|(t, s)| (*t, s.target()))
        .collect();
    write_token_file(&tokens, &entries);
    let proxy = Proxy::start(
        io,
        &[
            "--workers",
            "1",
            "--splice-pipes",
            "1",
            "--token-plugin",
            "TokenFile",
            "--token-source",
            tokens.to_str().unwrap(),
        ],
        None,
    );
    // The staller: reads one frame, then nothing until the others are done.
    let mut stalled = ws_connect_small_rcvbuf(io, proxy.addr, "/?token=s0", 64 * 1024);
    let first = stalled
        .read_exact(1, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("io={io}: stalled stream did not start: {e:?}"));
    assert_eq!(check_pattern(0, &first), None);
    wait_until(
        Duration::from_secs(10),
        "the first backend to stall",
        || {
            let w = servers[0].written();
            std::thread::sleep(Duration::from_millis(300));
            (servers[0].written() == w).then_some(())
        },
    );
    for (i, tok) in ["s1", "s2"].iter().enumerate() {
        let mut c = ws_connect(io, proxy.addr, &format!("/?token={tok}"), &[]);
        let data = c
            .read_exact(TOTAL as usize, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("io={io}: stream {} cut short: {e:?}", i + 1));
        assert_eq!(
            check_pattern(0, &data),
            None,
            "io={io}: stream {} corrupt",
            i + 1
        );
        let (code, _) = c.expect_close(Duration::from_secs(5));
        assert_eq!(code, Some(1000), "io={io}");
    }
    // The staller resumes and gets its whole stream.
    let rest = stalled
        .read_exact(TOTAL as usize - 1, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("io={io}: stalled stream cut short: {e:?}"));
    assert_eq!(
        check_pattern(1, &rest),
        None,
        "io={io}: stalled stream corrupt"
    );
    let (code, _) = stalled.expect_close(Duration::from_secs(5));
    assert_eq!(code, Some(1000), "io={io}");
    // The one pipe was used; the sessions left without it took the copying
    // path (epoll) or bulk receives (io_uring).
    let spliced = spliced_bytes(&proxy, 3);
    assert!(
        spliced.iter().sum::<u64>() > 0,
        "io={io}: no byte went through the splice pipe ({spliced:?})\n{}",
        proxy.diagnostics()
    );
}

/// A backend that serves up to `connections` connections, each with the
/// test pattern in 64 KiB writes until the peer goes away (or 60 s pass).
fn endless_backend(connections: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for _ in 0..connections {
            let Ok((mut s, _)) = l.accept() else { return };
            std::thread::spawn(move || {
                let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
                let end = Instant::now() + Duration::from_secs(60);
                let mut buf = vec![0u8; 64 * 1024];
                let mut offset = 0u64;
                while Instant::now() < end {
                    fill_pattern(offset, &mut buf);
                    if s.write_all(&buf).is_err() {
                        return;
                    }
                    offset += buf.len() as u64;
                }
            });
        }
    });
    addr
}

/// Rounds of [`sessions_ended_mid_bulk_leak_nothing`] (the first warms the
/// pools up and sets the baseline).
const LEAK_ROUNDS: usize = 5;
/// Sessions per round, each ended one of three ways.
const LEAK_SESSIONS_PER_ROUND: usize = 9;
/// How much the proxy's peak RSS (VmHWM) may grow from the end of the
/// warm-up round to the end of the last: a little for the allocator's
/// bookkeeping and lazily touched pages. One session's buffers are far more
/// (a 1 MiB stream is in flight in each, in chunks of up to 64 KiB, and
/// `buffer_bytes` is 256 KiB per direction), so a per-session leak of its
/// buffers or of its splice pipe's pages (3 × 9 sessions after the
/// baseline) goes well over it.
const LEAK_HWM_ALLOWANCE_BYTES: u64 = 1536 * 1024;

/// Browsers that vanish, close, or break the protocol while bulk bytes
/// flow (on io_uring: while bulk receives are in flight), round after
/// round: every session ends and logs its close; once they are gone the
/// proxy holds no more descriptors than after the first (warm-up) round
/// and its peak memory has not grown past [`LEAK_HWM_ALLOWANCE_BYTES`]; it
/// keeps serving, and on SIGTERM it drains at once and exits 0 — an
/// io_uring worker only exits once every session's slot is freed, which
/// needs all its operations completed.
fn sessions_ended_mid_bulk_leak_nothing(io: &str) {
    let addr = endless_backend(LEAK_ROUNDS * LEAK_SESSIONS_PER_ROUND + 1);
    // A low bulk threshold: every stream is in bulk mode within its first
    // MiB (reads on a busy loopback are often a few KiB).
    let mut proxy = Proxy::start(
        io,
        &[
            "--workers",
            "1",
            "--drain-grace-ms",
            "100",
            "--splice-min-bytes",
            "1024",
            // The smallest provided-buffer ring (16 × 64 KiB): the kernel
            // cycles through all of it, touching every page, within the
            // warm-up round (the default 8 MiB ring takes ~6 rounds).
            "--uring-buffers",
            "16",
            // At most one pooled splice pipe: whether the pool holds it
            // after a round depends on how the last session ended (a pipe
            // with bytes left in it is closed, not pooled), so pipe ends
            // are bounded apart from the other descriptors.
            "--splice-pipes",
            "1",
            // io_uring's bulk receives are what this test ends mid-way
            // (splicing, the default, has a test of its own below).
            "--uring-splice=false",
        ],
        Some(&addr.to_string()),
    );
    let pid = proxy.pid();
    // The worker's ring, eventfds and pipe pool come after `listening on`.
    settled_fd_count(pid);
    let fds_at_start = fd_counts_by_kind(pid);
    let mut baseline = None;
    for round in 0..LEAK_ROUNDS {
        end_sessions_mid_bulk(io, &proxy, round);
        let ended = (round + 1) * LEAK_SESSIONS_PER_ROUND;
        let bulk = close_line_field(&proxy, ended, "bytes_bulk_recv");
        assert_eq!(
            bulk.len(),
            ended,
            "io={io}: close lines after round {round}"
        );
        if io == "uring" {
            assert!(
                bulk.iter().all(|&b| b > 0),
                "io={io}: a session without bulk receives: {bulk:?}"
            );
        }
        let (fds, hwm) = match baseline {
            None => {
                // Pooled splice pipes stay open between sessions: the
                // warm-up round sets the descriptor baseline.
                settled_fd_count(pid);
                let fds = fd_counts_by_kind(pid);
                let hwm = hwm_bytes(pid).expect("VmHWM");
                eprintln!(
                    "io={io}: after the warm-up round: {fds:?} descriptors (besides pipes, pipe ends; \
                     {fds_at_start:?} at start), VmHWM {} KiB",
                    hwm >> 10
                );
                baseline = Some((fds, hwm));
                continue;
            }
            Some(b) => b,
        };
        let now = wait_fd_counts_at_most(
            pid,
            // The pool's one pipe (two ends) on top of those at start.
            (fds.0, fds_at_start.1 + 2),
            // A poll: returns as soon as the sessions' sockets are closed;
            // long enough for a machine under heavy load.
            Duration::from_secs(15),
            &format!("after round {round} (warm-up: {fds:?})"),
        );
        let peak = hwm_bytes(pid).expect("VmHWM");
        eprintln!(
            "io={io}: after round {round}: {now:?} descriptors (warm-up {fds:?}), VmHWM {} KiB (+{} KiB)",
            peak >> 10,
            peak.saturating_sub(hwm) >> 10
        );
        assert!(
            peak.saturating_sub(hwm) <= LEAK_HWM_ALLOWANCE_BYTES,
            "io={io}: peak RSS grew from {hwm} to {peak} bytes over {round} rounds of {} sessions \
             (allowance {LEAK_HWM_ALLOWANCE_BYTES}): something is kept per session",
            LEAK_SESSIONS_PER_ROUND
        );
    }
    // Still serving.
    let mut c = ws_connect(io, proxy.addr, "/", &[]);
    let data = c
        .read_exact(1 << 20, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("io={io}: last stream did not start: {e:?}"));
    assert_eq!(
        check_pattern(0, &data),
        None,
        "io={io}: last stream corrupt"
    );
    proxy.sigterm();
    let (code, _) = c.expect_close(Duration::from_secs(5));
    assert_eq!(code, Some(1001), "io={io}: drain close code");
    drop(c);
    let status = proxy.wait_exit(Duration::from_secs(5)).unwrap_or_else(|| {
        panic!(
            "io={io}: proxy still running 5 s after SIGTERM (a session never freed?)\n{}",
            proxy.diagnostics()
        )
    });
    assert!(status.success(), "io={io}: exit status {status}");
}

/// Sessions per round of [`sessions_ended_mid_splice_close_their_pipes`].
const MID_SPLICE_SESSIONS: usize = 3;
/// Its rounds: the first sets the baseline (the pool may keep a pipe that
/// came back empty), the others must not add to it.
const MID_SPLICE_ROUNDS: usize = 3;

/// Bulk streams splice on both backends (io_uring through the worker's own
/// splice calls on poll completions, `uring_splice`, the default), and sessions that
/// end while their spliced frames wait in pipes leak no pipe: in each round
/// the browsers stall (stop reading) until a session's pipe holds its
/// bytes (usually each session's does; one that happened to leave bulk mode
/// as its browser stalled holds copied bytes instead), then vanish (a
/// reset, unread bytes left); every close line counts spliced bytes and no
/// bulk receive, and
/// after each round the proxy holds no more descriptors than after the
/// first, besides at most one kept empty pipe per session of a round.
fn sessions_ended_mid_splice_close_their_pipes(io: &str) {
    let addr = endless_backend(MID_SPLICE_SESSIONS * MID_SPLICE_ROUNDS);
    let proxy = Proxy::start(
        io,
        &[
            "--workers",
            "1",
            "--splice-min-bytes",
            "1024",
            "--splice-pipes",
            "4",
        ],
        Some(&addr.to_string()),
    );
    let pid = proxy.pid();
    settled_fd_count(pid);
    let at_start = fd_counts_by_kind(pid);
    let mut baseline = None;
    for round in 0..MID_SPLICE_ROUNDS {
        let mut clients = Vec::new();
        for i in 0..MID_SPLICE_SESSIONS {
            let mut c = ws_connect_small_rcvbuf(io, proxy.addr, "/", 64 * 1024);
            let data = c.read_exact(1 << 20, IO_TIMEOUT).unwrap_or_else(|e| {
                panic!("io={io}: round {round} stream {i} did not start: {e:?}")
            });
            assert_eq!(
                check_pattern(0, &data),
                None,
                "io={io}: round {round} stream {i} corrupt"
            );
            clients.push(c);
        }
        let lent = at_start.1 + 2 * MID_SPLICE_SESSIONS;
        wait_until(
            Duration::from_secs(15),
            "a stalled session to hold a splice pipe",
            || (fd_counts_by_kind(pid).1 >= at_start.1 + 2).then_some(()),
        );
        eprintln!(
            "io={io}: round {round}: {} pipe ends with the browsers stalled ({} at start)",
            fd_counts_by_kind(pid).1,
            at_start.1
        );
        drop(clients);
        let ended = (round + 1) * MID_SPLICE_SESSIONS;
        let spliced = spliced_bytes(&proxy, ended);
        assert!(
            spliced.len() == ended && spliced.iter().all(|&b| b > 0),
            "io={io}: a session without spliced bytes: {spliced:?}"
        );
        let bulk = close_line_field(&proxy, ended, "bytes_bulk_recv");
        assert!(
            bulk.iter().all(|&b| b == 0),
            "io={io}: bulk receives while splicing: {bulk:?}"
        );
        match baseline {
            None => {
                // Settled: every session's sockets and pipe are closed.
                wait_fd_counts_at_most(
                    pid,
                    (at_start.0, lent),
                    Duration::from_secs(15),
                    "after the first round",
                );
                settled_fd_count(pid);
                baseline = Some(fd_counts_by_kind(pid));
            }
            Some(b) => {
                // Pipe ends: the pool keeps a pipe that came back empty, and
                // how many did depends on where each reset caught its
                // session; at most one per session of a round (the pool
                // reuses kept pipes first). A pipe a session failed to give
                // back stays lent, so the pool could lend fewer each round
                // and a later session would splice nothing (checked above).
                let pipes = at_start.1 + 2 * MID_SPLICE_SESSIONS;
                wait_fd_counts_at_most(
                    pid,
                    (b.0, pipes),
                    Duration::from_secs(15),
                    &format!("after round {round} (first round: {b:?})"),
                );
            }
        }
    }
}

/// One round of [`sessions_ended_mid_bulk_leak_nothing`]: each session
/// reads 1 MiB of its endless stream, then its browser resets, closes, or
/// sends an unmasked frame (1002) and goes.
fn end_sessions_mid_bulk(io: &str, proxy: &Proxy, round: usize) {
    for i in 0..LEAK_SESSIONS_PER_ROUND {
        let mut c = ws_connect(io, proxy.addr, "/", &[]);
        let data = c
            .read_exact(1 << 20, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("io={io}: round {round} stream {i} did not start: {e:?}"));
        assert_eq!(
            check_pattern(0, &data),
            None,
            "io={io}: round {round} stream {i} corrupt"
        );
        match i % 3 {
            // Gone with unread bytes: a reset.
            0 => drop(c),
            1 => c.close(),
            // An unmasked frame: 1002, then gone.
            _ => {
                c.send_raw(&raw_frame(0x2, b"x", None));
                drop(c);
            }
        }
    }
}

/// Xvnc dies mid-session: the browser gets a close frame within 1 s.
fn backend_killed_closes_session(io: &str) {
    let mut xvnc = Xvnc::start();
    let proxy = Proxy::start(io, &[], Some(&xvnc.target()));
    let mut c = ws_connect(io, proxy.addr, "/websockify", &[]);
    rfb_handshake_none(&mut c);
    let killed = Instant::now();
    xvnc.kill();
    // The killed process's socket ends with a FIN (nothing was left
    // unread in it): the documented "backend closed", 1000.
    let (code, reason) = c.expect_close(Duration::from_secs(1));
    assert_eq!(
        code,
        Some(1000),
        "io={io}: close code after the backend died ({reason:?})"
    );
    assert!(
        killed.elapsed() <= Duration::from_secs(1),
        "io={io}: close took {:?}",
        killed.elapsed()
    );
    // The proxy itself lives on.
    assert!(
        proxy_is_alive(&proxy),
        "io={io}: proxy exited after a backend died"
    );
}

fn proxy_is_alive(proxy: &Proxy) -> bool {
    TcpStream::connect_timeout(&proxy.addr, Duration::from_secs(2)).is_ok()
}

/// A backend that sends a finite stream and closes: every byte is delivered
/// before the close frame, which says 1000.
fn backend_end_of_stream_delivers_all_then_closes(io: &str) {
    const TOTAL: u64 = 1 << 20;
    let server = StreamServer::start(TOTAL, Duration::from_secs(30), None);
    let proxy = Proxy::start(io, &[], Some(&server.target()));
    let mut c = ws_connect(io, proxy.addr, "/", &[]);
    let data = c
        .read_exact(TOTAL as usize, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("io={io}: stream cut short: {e:?}"));
    assert_eq!(check_pattern(0, &data), None, "io={io}: stream corrupt");
    wait_until(Duration::from_secs(5), "the backend to finish", || {
        server.finished().then_some(())
    });
    let closed_at = Instant::now();
    let (code, reason) = c.expect_close(Duration::from_secs(1));
    assert_eq!(
        code,
        Some(1000),
        "io={io}: backend closed normally; reason {reason:?}"
    );
    assert!(closed_at.elapsed() <= Duration::from_secs(1), "io={io}");
}

/// The backend closes its socket in the middle of a stream the client is
/// still reading: the client gets the close frame within 1 s.
fn backend_closed_mid_stream_closes_session(io: &str) {
    let mut server = StreamServer::start(1 << 30, Duration::from_secs(30), None);
    let proxy = Proxy::start(io, &[], Some(&server.target()));
    let mut c = ws_connect(io, proxy.addr, "/", &[]);
    let data = c
        .read_exact(256 * 1024, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("io={io}: stream did not start: {e:?}"));
    assert_eq!(check_pattern(0, &data), None, "io={io}: stream corrupt");
    let closed = Instant::now();
    server.close_now();
    let (code, reason) = c.expect_close(Duration::from_secs(1));
    assert_eq!(
        code,
        Some(1000),
        "io={io}: close code after the backend closed ({reason:?})"
    );
    assert!(
        closed.elapsed() <= Duration::from_secs(1),
        "io={io}: close took {:?}",
        closed.elapsed()
    );
}

/// Nothing listens at TARGET: the proxy answers the upgrade first (101,
/// then the backend connect: docs/ARCHITECTURE.md, `Connecting`), so the
/// session ends with close 1011, never an HTTP error.
fn backend_connect_failure(io: &str) {
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = Proxy::start(
        io,
        &["--connect-timeout-ms", "2000"],
        Some(&dead.to_string()),
    );
    let mut c = try_ws_connect(proxy.addr, "/websockify", &[]).unwrap_or_else(|e| {
        panic!("io={io}: the upgrade comes before the backend connect, yet it failed: {e:?}")
    });
    let (code, reason) = c.expect_close(Duration::from_secs(5));
    assert_eq!(
        code,
        Some(1011),
        "io={io}: connect failure close code ({reason:?})"
    );
    assert!(
        proxy_is_alive(&proxy),
        "io={io}: proxy exited after a failed connect"
    );
}

fn idle_timeout_closes_session(io: &str) {
    let backend = EchoServer::start();
    let proxy = Proxy::start(io, &["--idle-timeout", "1"], Some(&backend.target()));
    let mut c = ws_connect(io, proxy.addr, "/", &[]);
    c.send(b"hi");
    assert_eq!(c.expect_bytes(2, "the echo"), b"hi", "io={io}");
    let quiet_since = Instant::now();
    let (code, reason) = c.expect_close(Duration::from_secs(5));
    let idle = quiet_since.elapsed();
    eprintln!("io={io}: idle close after {idle:?}: {code:?} {reason:?}");
    assert!(
        idle >= Duration::from_millis(900),
        "io={io}: closed after {idle:?}, before the 1 s idle timeout"
    );
    assert_eq!(
        code,
        Some(1001),
        "io={io}: idle timeout closes with 1001 ({reason:?})"
    );
}

fn heartbeat_sends_pings(io: &str) {
    let backend = EchoServer::start();
    let proxy = Proxy::start(io, &["--heartbeat", "1"], Some(&backend.target()));
    let mut c = ws_connect(io, proxy.addr, "/", &[]);
    let start = Instant::now();
    let mut pings = 0;
    while pings < 2 {
        let left = Duration::from_secs(5).saturating_sub(start.elapsed());
        match c.next_message(left) {
            // tungstenite answers each ping with a pong by itself.
            Ok(Message::Ping(_)) => pings += 1,
            Ok(other) => panic!("io={io}: unexpected message {other:?}"),
            Err(e) => panic!(
                "io={io}: {pings} ping(s) in {:?}, then {e:?}",
                start.elapsed()
            ),
        }
    }
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "io={io}: two pings in {:?} with --heartbeat 1",
        start.elapsed()
    );
    // Pongs answered, the session is still up.
    c.send(b"still here");
    assert_eq!(
        c.expect_bytes(10, "the echo after pings"),
        b"still here",
        "io={io}"
    );
}

/// Malformed handshakes, an unmasked frame and an oversized frame each get
/// their error; a healthy session on the same proxy keeps relaying.
fn bad_input_is_contained(io: &str) {
    let backend = EchoServer::start();
    let proxy = Proxy::start(io, &["--max-frame-bytes", "1024"], Some(&backend.target()));
    let mut healthy = ws_connect(io, proxy.addr, "/websockify", &[]);
    healthy.send(b"before");
    assert_eq!(healthy.expect_bytes(6, "echo"), b"before", "io={io}");
    // With the healthy session up: what the bad clients must give back.
    let fds_before = settled_fd_count(proxy.pid());

    // No Sec-WebSocket-Key.
    let r = raw_http(
        proxy.addr,
        b"GET /websockify HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert_eq!(
        r.status, 400,
        "io={io}: upgrade without Sec-WebSocket-Key: {r:?}"
    );
    r.assert_api_error(400, "bad_key", &format!("io={io} missing key"));

    // Not HTTP at all: a malformed request, 400.
    let r = raw_http(proxy.addr, b"this is not http\r\n\r\n");
    assert_eq!(r.status, 400, "io={io}: garbage request: {r:?}");
    r.assert_api_error(400, "malformed", &format!("io={io} garbage"));

    // Unsupported WebSocket version.
    let mut req = String::from_utf8(upgrade_request("/websockify", &[])).unwrap();
    req = req.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let r = raw_http(proxy.addr, req.as_bytes());
    assert_eq!(r.status, 426, "io={io}: Sec-WebSocket-Version 8: {r:?}");
    r.assert_api_error(426, "unsupported_version", &format!("io={io} version"));
    assert_eq!(
        r.header("Sec-WebSocket-Version").as_deref(),
        Some("13"),
        "io={io}: RFC 6455 4.4: a 426 names the supported version"
    );
    assert_eq!(
        backend.accepted(),
        1,
        "io={io}: refused upgrades must not reach the backend"
    );

    // A client frame without a mask: protocol error.
    let mut c = ws_connect(io, proxy.addr, "/websockify", &[]);
    c.send(b"ok");
    assert_eq!(c.expect_bytes(2, "echo"), b"ok", "io={io}");
    c.send_raw(&raw_frame(0x2, b"unmasked", None));
    let (code, reason) = c.expect_close(Duration::from_secs(3));
    assert_eq!(
        code,
        Some(1002),
        "io={io}: unmasked client frame ({reason:?})"
    );

    // A frame over --max-frame-bytes: too big. The limit itself is fine.
    let mut c = ws_connect(io, proxy.addr, "/websockify", &[]);
    let at_limit = vec![7u8; 1024];
    c.send(&at_limit);
    assert_eq!(
        c.expect_bytes(1024, "echo of a frame at the limit"),
        at_limit,
        "io={io}"
    );
    c.send(&[8u8; 2048]);
    let (code, reason) = c.expect_close(Duration::from_secs(3));
    assert_eq!(
        code,
        Some(1009),
        "io={io}: frame over --max-frame-bytes ({reason:?})"
    );

    // A text frame that is not UTF-8 (no subprotocol: binary only).
    let mut c = ws_connect(io, proxy.addr, "/websockify", &[]);
    c.send_raw(&raw_frame(0x1, b"\xff\xfe\xfd", Some([1, 2, 3, 4])));
    let (code, reason) = c.expect_close(Duration::from_secs(3));
    assert_eq!(
        code,
        Some(1007),
        "io={io}: invalid UTF-8 text frame ({reason:?})"
    );

    healthy.send(b"after");
    assert_eq!(
        healthy.expect_bytes(5, "echo after the bad clients"),
        b"after",
        "io={io}: the healthy session was disturbed"
    );
    // The bad clients are gone and hold nothing in the proxy.
    drop(c);
    wait_fd_count_at_most(
        proxy.pid(),
        fds_before,
        Duration::from_secs(5),
        "after the bad clients left",
    );
}

fn origin_allowlist(io: &str) {
    let backend = EchoServer::start();
    let proxy = Proxy::start(
        io,
        &["--origin", "http://good.example,https://also.good.example"],
        Some(&backend.target()),
    );
    let r = raw_http(
        proxy.addr,
        &upgrade_request("/websockify", &["Origin: http://evil.example"]),
    );
    assert_eq!(r.status, 403, "io={io}: Origin not in the allowlist: {r:?}");
    r.assert_api_error(403, "origin_not_allowed", &format!("io={io} origin"));
    assert_eq!(
        backend.accepted(),
        0,
        "io={io}: refused origin reached the backend"
    );

    for origin in ["http://good.example", "https://also.good.example"] {
        let mut c = try_ws_connect_with(proxy.addr, "/websockify", &[], Some(origin), IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("io={io}: allowed origin {origin} refused: {e:?}"));
        c.send(b"hello");
        assert_eq!(c.expect_bytes(5, "echo"), b"hello", "io={io}");
    }
}

/// `--web DIR`: plain GETs are static files from DIR (with the MIME types a
/// browser insists on for ES modules), and nothing outside DIR.
fn web_serves_static_files(io: &str) {
    let root = tempfile::tempdir().unwrap();
    let web = root.path().join("web");
    fs::create_dir_all(web.join("core")).unwrap();
    fs::write(
        web.join("index.html"),
        "<!doctype html><title>t</title>hello page",
    )
    .unwrap();
    fs::write(web.join("core/mod.js"), "export const x = 1;\n").unwrap();
    fs::write(root.path().join("secret.txt"), "TOP-SECRET").unwrap();
    let backend = EchoServer::start();
    let proxy = Proxy::start(
        io,
        &["--web", web.to_str().unwrap()],
        Some(&backend.target()),
    );
    let get = |path: &str| {
        raw_http(
            proxy.addr,
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
    };

    let r = get("/index.html");
    assert_eq!(r.status, 200, "io={io}: GET /index.html: {r:?}");
    assert!(r.body.contains("hello page"), "io={io}: body {:?}", r.body);
    assert!(
        r.header("Content-Type")
            .unwrap_or_default()
            .starts_with("text/html"),
        "io={io}: html Content-Type: {r:?}"
    );
    let r = get("/core/mod.js");
    assert_eq!(r.status, 200, "io={io}: GET /core/mod.js: {r:?}");
    let ct = r.header("Content-Type").unwrap_or_default();
    assert!(
        ct.starts_with("text/javascript") || ct.starts_with("application/javascript"),
        "io={io}: ES modules need a JavaScript MIME type, got {ct:?}"
    );
    let r = get("/missing.html");
    assert_eq!(r.status, 404, "io={io}: GET /missing.html: {r:?}");
    r.assert_api_error(404, "not_found", &format!("io={io}: GET /missing.html"));
    // Every spelling of a `..` segment (decoded before the path is split)
    // is refused before the filesystem sees it: 403 `forbidden`.
    for path in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/core/../../secret.txt",
        "/..%2fsecret.txt",
    ] {
        let r = get(path);
        assert!(
            !r.body.contains("TOP-SECRET"),
            "io={io}: {path} escaped the web root: {r:?}"
        );
        r.assert_api_error(403, "forbidden", &format!("io={io}: GET {path}"));
    }
    // The WebSocket still works on the same port.
    let mut c = ws_connect(io, proxy.addr, "/websockify", &[]);
    c.send(b"ws");
    assert_eq!(c.expect_bytes(2, "echo"), b"ws", "io={io}");
}

/// Grace period of [`sigterm_drains_and_exits_zero`]: long enough that
/// "refused at once" (well within it) and "refused when the grace ends"
/// cannot be confused on a loaded machine.
const DRAIN_GRACE: Duration = Duration::from_millis(2000);

/// SIGTERM: new connections are refused at once, live sessions keep relaying
/// for --drain-grace-ms and are then closed with 1001, and the process exits 0.
fn sigterm_drains_and_exits_zero(io: &str) {
    let backend = EchoServer::start();
    let grace_ms = DRAIN_GRACE.as_millis().to_string();
    let mut proxy = Proxy::start(
        io,
        &["--drain-grace-ms", &grace_ms],
        Some(&backend.target()),
    );
    let mut c = ws_connect(io, proxy.addr, "/websockify", &[]);
    c.send(b"live");
    assert_eq!(c.expect_bytes(4, "echo"), b"live", "io={io}");

    let signalled = Instant::now();
    proxy.sigterm();
    // The listeners close at once (docs/ARCHITECTURE.md: "SIGTERM closes
    // the listeners at once"): a connect is refused by the kernel, within
    // half the grace period. (A connect that raced the signal may still
    // have been queued before the close: poll until the first refusal,
    // then every later connect must be refused too, never accepted.)
    let addr: SocketAddr = proxy.addr;
    let connect_refused = || match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => true,
        Err(e) => panic!("io={io}: connect after SIGTERM: {e}, not a refusal"),
        Ok(_) => false,
    };
    wait_until(
        DRAIN_GRACE / 2,
        "new connections to be refused right after SIGTERM",
        || connect_refused().then_some(()),
    );
    for i in 0..5 {
        assert!(
            connect_refused(),
            "io={io}: connect {i} after the first refusal was accepted: a listener reopened"
        );
    }
    // Still relaying during the grace period.
    c.send(b"draining");
    assert_eq!(
        c.expect_bytes(8, "echo during the grace period"),
        b"draining",
        "io={io}"
    );
    assert!(
        signalled.elapsed() < DRAIN_GRACE,
        "io={io}: the checks during the grace period took {:?}",
        signalled.elapsed()
    );

    let (code, reason) = c.expect_close(DRAIN_GRACE + Duration::from_secs(3));
    let after = signalled.elapsed();
    assert_eq!(code, Some(1001), "io={io}: drain close code ({reason:?})");
    assert!(
        after >= DRAIN_GRACE - Duration::from_millis(50),
        "io={io}: live session closed {after:?} after SIGTERM, before --drain-grace-ms {grace_ms}"
    );
    let status = proxy
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("io={io}: proxy still running 5 s after SIGTERM"));
    assert!(
        status.success(),
        "io={io}: exit status after SIGTERM: {status}"
    );
}

/// websockify options the proxy does not implement fail loudly.
fn unsupported_websockify_option_fails(io: &str) {
    let (status, _out, err) = run_cli(
        &[
            "proxy",
            "--io",
            io,
            "--record",
            "x",
            "127.0.0.1:0",
            "127.0.0.1:5900",
        ],
        Duration::from_secs(10),
    );
    assert!(!status.success(), "io={io}: --record accepted: {status}");
    assert!(
        err.contains("record"),
        "io={io}: stderr does not name --record: {err:?}"
    );
}
