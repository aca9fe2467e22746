//! The relay matrix: every relay path, on both IO backends, over ws and
//! wss, with the binary and the base64 subprotocol, with backend writes and
//! browser messages from 1 byte to beyond `buffer_bytes`, checking every
//! byte both ways — in proxy mode (`consolegate proxy --cert`) and in the
//! appliance's `[tls]` mode.
//!
//! Why it exists: wss once corrupted any frame larger than rustls's 64 KiB
//! send buffer (a full-screen Raw update), and no test sent one.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tungstenite::Message;

backend_tests!(relay_matrix_proxy, relay_matrix_appliance_tls);

/// The relay's per-direction bound in these tests (the default).
const BUFFER_BYTES: usize = 256 * 1024;

/// Backend write sizes and browser message sizes: the frame-header length
/// boundaries (125/126, 65535/65536), rustls's 64 KiB send buffer, one read
/// (`recv_buffer_bytes`, 64 KiB) and `buffer_bytes` on each side, and a
/// write several times the bound (whose base64 form still fits the default
/// `max_frame_bytes`, 1 MiB, as one browser message).
const SIZES: &[usize] = &[
    1,
    2,
    125,
    126,
    127,
    1000,
    16 * 1024,
    65535,
    65536,
    65537,
    100_000,
    BUFFER_BYTES - 1,
    BUFFER_BYTES,
    BUFFER_BYTES + 1,
    3 * BUFFER_BYTES - 1001,
];

fn total() -> u64 {
    SIZES.iter().map(|&n| n as u64).sum()
}

/// One backend connection: writes the pattern downstream in `SIZES` steps
/// (a pause between writes, so each tends to be its own read), then reads
/// the whole upstream pattern and returns how many bytes matched before the
/// first wrong one (or the end).
fn pattern_backend() -> (SocketAddr, JoinHandle<Result<u64, String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut offset = 0u64;
        for &n in SIZES {
            let mut buf = vec![0u8; n];
            fill_pattern(offset, &mut buf);
            s.write_all(&buf)
                .map_err(|e| format!("backend write at {offset}: {e}"))?;
            offset += n as u64;
            std::thread::sleep(Duration::from_millis(3));
        }
        let want = total();
        let mut got = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        while got < want {
            let n = s
                .read(&mut buf)
                .map_err(|e| format!("backend read at {got} of {want}: {e}"))?;
            if n == 0 {
                return Err(format!("browser bytes ended at {got} of {want}"));
            }
            if let Some(i) = check_pattern(got, &buf[..n]) {
                return Err(format!("upstream corrupt at byte {}", got + i as u64));
            }
            got += n as u64;
        }
        Ok(got)
    });
    (addr, h)
}

/// Reads the whole downstream pattern, checking every byte and every
/// frame: binary frames under `binary`/none, base64 text frames under
/// `base64`, none larger than `buffer_bytes` of payload.
fn read_downstream<S: TcpBacked>(c: &mut WsClient<S>, what: &str) {
    let want = total();
    let (mut offset, mut frames) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(60);
    let base64 = c.protocol.as_deref() == Some("base64");
    while offset < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let bytes = match c.next_message(left) {
            Ok(Message::Binary(b)) if !base64 => b.to_vec(),
            Ok(Message::Text(t)) if base64 => {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(t.as_bytes())
                    .unwrap_or_else(|e| panic!("{what}: frame {frames} is not base64: {e}"))
            }
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => continue,
            Ok(other) => panic!("{what}: unexpected {other:?} at byte {offset}"),
            Err(e) => panic!("{what}: downstream ended at {offset} of {want}: {e:?}"),
        };
        assert!(!bytes.is_empty(), "{what}: empty data frame at {offset}");
        assert!(
            bytes.len() <= BUFFER_BYTES,
            "{what}: a {}-byte frame, over buffer_bytes",
            bytes.len()
        );
        if let Some(i) = check_pattern(offset, &bytes) {
            panic!(
                "{what}: downstream corrupt at byte {} (frame {frames} of {} bytes)",
                offset + i as u64,
                bytes.len()
            );
        }
        offset += bytes.len() as u64;
        frames += 1;
    }
    assert_eq!(offset, want, "{what}: more bytes than the backend wrote");
}

/// Sends the upstream pattern as one message per size.
fn send_upstream<S: TcpBacked>(c: &mut WsClient<S>) {
    let mut offset = 0u64;
    for &n in SIZES {
        let mut buf = vec![0u8; n];
        fill_pattern(offset, &mut buf);
        c.send(&buf);
        offset += n as u64;
    }
}

/// One session of the matrix: downstream checked, then upstream checked by
/// the backend.
fn run_session<S: TcpBacked>(
    mut c: WsClient<S>,
    protocol: Option<&str>,
    backend: JoinHandle<Result<u64, String>>,
    what: &str,
) {
    assert_eq!(
        c.protocol.as_deref(),
        protocol,
        "{what}: chosen subprotocol"
    );
    read_downstream(&mut c, what);
    send_upstream(&mut c);
    match backend.join().expect("backend thread") {
        Ok(n) => assert_eq!(n, total(), "{what}: upstream bytes"),
        Err(e) => panic!("{what}: {e}"),
    }
    c.close();
}

/// The protocols a browser offers in each cell, and what must be chosen.
const PROTOCOLS: &[(&[&str], Option<&str>)] = &[
    (&[], None),
    (&["binary"], Some("binary")),
    (&["base64"], Some("base64")),
];

fn relay_matrix_proxy(io: &str) {
    let cert = TestCert::generate();
    for &(offered, chosen) in PROTOCOLS {
        for tls in [false, true] {
            let (addr, backend) = pattern_backend();
            let proxy = Proxy::start(
                io,
                &["--cert", cert.cert_arg(), "--key", cert.key_arg()],
                Some(&addr.to_string()),
            );
            let what = format!(
                "io={io} proxy {} offered={offered:?}",
                if tls { "wss" } else { "ws" }
            );
            if tls {
                let c = try_wss_connect(proxy.addr, "/", offered, cert.client_config())
                    .unwrap_or_else(|e| panic!("{what}: {e:?}"));
                run_session(c, chosen, backend, &what);
            } else {
                let c = ws_connect(io, proxy.addr, "/", offered);
                run_session(c, chosen, backend, &what);
            }
        }
    }
}

fn relay_matrix_appliance_tls(io: &str) {
    let cert = TestCert::generate();
    let app = Appliance::start(
        io,
        ApplianceOptions {
            tls: Some((cert.cert_path.clone(), cert.key_path.clone())),
            ..Default::default()
        },
    );
    for &(offered, chosen) in PROTOCOLS {
        let (addr, backend) = pattern_backend();
        let s = app.create(&json!({
            "target": {"kind": "vnc", "host": "127.0.0.1", "port": addr.port()},
            "user": "matrix",
        }));
        assert!(
            s.ws_url.starts_with("wss://"),
            "io={io}: with [tls] the ws_url must be wss://, got {}",
            s.ws_url
        );
        let what = format!("io={io} appliance wss offered={offered:?}");
        let c = try_wss_connect(s.addr, &s.path, offered, cert.client_config())
            .unwrap_or_else(|e| panic!("{what}: {e:?}\n{}", app.diagnostics()));
        run_session(c, chosen, backend, &what);
    }
}
