//! Session state machine tests: no sockets, time passed in.

use super::*;
use crate::config::{IoChoice, Limits, ProxyConfig, TargetConfig};
use crate::dataplane::router::Router;
use crate::protocol::websocket::{self, encode_client_frame, Opcode};

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn cfg_with(f: impl FnOnce(&mut ProxyConfig)) -> Arc<ProxyConfig> {
    let mut c = ProxyConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        target: TargetConfig::Fixed(crate::mailbox::Target::vnc(
            "127.0.0.1:5900".parse().unwrap(),
            None,
        )),
        tls: None,
        web_dir: None,
        origins: vec![],
        workers: 1,
        io: IoChoice::Epoll,
        pin_workers: false,
        limits: Limits {
            buffer_bytes: 8192,
            recv_buffer_bytes: 4096,
            ..Limits::default()
        },
    };
    f(&mut c);
    Arc::new(c)
}

fn ctx_with(f: impl FnOnce(&mut ProxyConfig)) -> WorkerCtx {
    let cfg = cfg_with(f);
    WorkerCtx::new(
        cfg,
        0,
        Router::Fixed(crate::mailbox::Target::vnc(
            "127.0.0.1:5900".parse().unwrap(),
            None,
        )),
        None,
        None,
    )
}

fn upgrade_request(extra: &str) -> Vec<u8> {
    format!(
        "GET /websockify HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn drain_browser(s: &mut Session, ctx: &mut WorkerCtx, now: Instant) -> Vec<u8> {
    let mut out = Vec::new();
    while s.browser_pending_len() > 0 {
        let p = s.browser_pending().to_vec();
        out.extend_from_slice(&p);
        s.browser_sent(ctx, p.len(), now);
    }
    out
}

fn drain_backend(s: &mut Session, ctx: &mut WorkerCtx) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let p = s.backend_pending().to_vec();
        if p.is_empty() {
            break;
        }
        out.extend_from_slice(&p);
        s.backend_sent(ctx, p.len(), Instant::now());
    }
    out
}

fn frame(op: Opcode, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_client_frame(&mut v, true, op, [1, 2, 3, 4], payload);
    v
}

/// A session through the handshake and backend connect.
fn relaying(ctx: &mut WorkerCtx, now: Instant) -> Session {
    let mut s = Session::new(1, ctx, now, None, None);
    s.on_browser_data(ctx, &upgrade_request(""), now);
    let resp = drain_browser(&mut s, ctx, now);
    assert!(
        resp.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&resp)
    );
    assert_eq!(s.take_connect(), Some("127.0.0.1:5900".parse().unwrap()));
    s.on_backend_connected(ctx, now);
    assert_eq!(s.phase(), Phase::Relay);
    s
}

/// Parse server frames (unmasked) into (opcode byte, payload).
fn server_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut v = Vec::new();
    while b.len() >= 2 {
        let op = b[0] & 0x0f;
        let (len, hl) = match b[1] & 0x7f {
            126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        v.push((op, b[hl..hl + len].to_vec()));
        b = &b[hl + len..];
    }
    v
}

#[test]
fn relays_both_ways_and_closes_on_browser_close() {
    let now = Instant::now();
    let mut ctx = ctx_with(|_| {});
    let mut s = relaying(&mut ctx, now);
    s.on_browser_data(&mut ctx, &frame(Opcode::Binary, b"RFB 003.008\n"), now);
    assert_eq!(drain_backend(&mut s, &mut ctx), b"RFB 003.008\n");
    s.on_backend_data(&mut ctx, b"\x01\x01", now);
    let out = drain_browser(&mut s, &mut ctx, now);
    assert_eq!(server_frames(&out), vec![(2, b"\x01\x01".to_vec())]);
    let mut close = Vec::new();
    encode_client_frame(
        &mut close,
        true,
        Opcode::Close,
        [9, 9, 9, 9],
        &1000u16.to_be_bytes(),
    );
    s.on_browser_data(&mut ctx, &close, now);
    assert!(s.backend_should_close());
    let out = drain_browser(&mut s, &mut ctx, now);
    assert_eq!(server_frames(&out)[0].0, 8);
    assert!(s.is_done());
    assert_eq!(s.bytes_up, 12);
    assert_eq!(s.bytes_down, 2);
    s.release(&mut ctx);
    assert_eq!(ctx.pool.outstanding, 0);
}

#[test]
fn request_split_byte_by_byte_with_frames_in_the_same_packet() {
    let now = Instant::now();
    let mut ctx = ctx_with(|_| {});
    let mut s = Session::new(1, &ctx, now, None, None);
    let mut bytes = upgrade_request("");
    bytes.extend(frame(Opcode::Binary, b"early"));
    for b in &bytes {
        s.on_browser_data(&mut ctx, std::slice::from_ref(b), now);
    }
    assert_eq!(s.phase(), Phase::Connecting);
    assert!(s.take_connect().is_some());
    s.on_backend_connected(&mut ctx, now);
    assert_eq!(drain_backend(&mut s, &mut ctx), b"early");
}

#[test]
fn ping_gets_pong() {
    let now = Instant::now();
    let mut ctx = ctx_with(|_| {});
    let mut s = relaying(&mut ctx, now);
    s.on_browser_data(&mut ctx, &frame(Opcode::Ping, b"hi"), now);
    let out = drain_browser(&mut s, &mut ctx, now);
    assert_eq!(server_frames(&out), vec![(10, b"hi".to_vec())]);
}

#[test]
fn unmasked_frame_closes_with_1002_and_counts() {
    let now = Instant::now();
    let mut ctx = ctx_with(|_| {});
    let mut s = relaying(&mut ctx, now);
    s.on_browser_data(&mut ctx, &[0x82, 0x01, b'x'], now);
    let out = drain_browser(&mut s, &mut ctx, now);
    let f = server_frames(&out);
    assert_eq!(f[0].0, 8);
    assert_eq!(u16::from_be_bytes([f[0].1[0], f[0].1[1]]), 1002);
    assert!(s.is_done());
    assert_eq!(ctx.metrics.errors().iter().map(|e| e.1).sum::<u64>(), 1);
}

#[test]
fn oversized_frame_closes_with_1009() {
    let now = Instant::now();
    let mut ctx = ctx_with(|c| c.limits.max_frame_bytes = 16);
    let mut s = relaying(&mut ctx, now);
    s.on_browser_data(&mut ctx, &frame(Opcode::Binary, &[0u8; 17]), now);
    let f = server_frames(&drain_browser(&mut s, &mut ctx, now));
    assert_eq!(u16::from_be_bytes([f[0].1[0], f[0].1[1]]), 1009);
}

#[test]
fn backend_eof_sends_1000_after_pending_data() {
    let now = Instant::now();
    let mut ctx = ctx_with(|_| {});
    let mut s = relaying(&mut ctx, now);
    s.on_backend_data(&mut ctx, b"last", now);
    s.on_backend_gone(&mut ctx, None, now);
    let f = server_frames(&drain_browser(&mut s, &mut ctx, now));
    assert_eq!(f[0], (2, b"last".to_vec()));
    assert_eq!(f[1].0, 8);
    assert_eq!(u16::from_be_bytes([f[1].1[0], f[1].1[1]]), 1000);
    // Waits for the browser's close, then a timeout ends it.
    assert!(!s.is_done());
    s.on_tick(&mut ctx, now + Duration::from_secs(5));
    assert!(s.is_done());
}

#[test]
fn connect_failure_and_timeout_close_with_1011() {
    let now = Instant::now();
    let mut ctx = ctx_with(|c| c.limits.connect_timeout_ms = 100);
    let mut s = Session::new(1, &ctx, now, None, None);
    s.on_browser_data(&mut ctx, &upgrade_request(""), now);
    drain_browser(&mut s, &mut ctx, now);
    assert!(s.take_connect().is_some());
    s.on_tick(&mut ctx, now + Duration::from_millis(150));
    let f = server_frames(&drain_browser(&mut s, &mut ctx, now));
    assert_eq!(u16::from_be_bytes([f[0].1[0], f[0].1[1]]), 1011);
    assert!(s.backend_should_close());

    let mut s = Session::new(2, &ctx, now, None, None);
    s.on_browser_data(&mut ctx, &upgrade_request(""), now);
    drain_browser(&mut s, &mut ctx, now);
    s.take_connect();
    s.on_backend_connect_failed(
        &mut ctx,
        &io::Error::from(io::ErrorKind::ConnectionRefused),
        now,
    );
    let f = server_frames(&drain_browser(&mut s, &mut ctx, now));
    assert_eq!(u16::from_be_bytes([f[0].1[0], f[0].1[1]]), 1011);
}

#[test]
fn backpressure_stops_reads_when_the_browser_is_slow() {
    let now = Instant::now();
    let mut ctx = ctx_with(|_| {});
    let mut s = relaying(&mut ctx, now);
    let mut fed = 0;
    while s.want_backend_read(&ctx) {
        let n = s.backend_read_limit(&ctx);
        s.on_backend_data(&mut ctx, &vec![7u8; n], now);
        fed += n;
        assert!(fed < 1 << 20, "never stopped reading");
    }
    let limit = ctx.cfg.limits.buffer_bytes;
    assert!(s.browser_pending_len() <= limit + ctx.cfg.limits.recv_buffer_bytes + 14);
    // The browser drains: reading resumes.
    drain_browser(&mut s, &mut ctx, now);
    assert!(s.want_backend_read(&ctx));
}

#[test]
fn base64_subprotocol_decodes_up_and_encodes_down() {
    let now = Instant::now();
    let mut ctx = ctx_with(|_| {});
    let mut s = Session::new(1, &ctx, now, None, None);
    s.on_browser_data(
        &mut ctx,
        &upgrade_request("Sec-WebSocket-Protocol: base64\r\n"),
        now,
    );
    let resp = String::from_utf8(drain_browser(&mut s, &mut ctx, now)).unwrap();
    assert!(
        resp.to_ascii_lowercase()
            .contains("sec-websocket-protocol: base64"),
        "{resp}"
    );
    s.take_connect();
    s.on_backend_connected(&mut ctx, now);
    s.on_browser_data(&mut ctx, &frame(Opcode::Text, b"aGVsbG8="), now);
    assert_eq!(drain_backend(&mut s, &mut ctx), b"hello");
    s.on_backend_data(&mut ctx, b"hello", now);
    let f = server_frames(&drain_browser(&mut s, &mut ctx, now));
    assert_eq!(f, vec![(1, b"aGVsbG8=".to_vec())]);
}

#[test]
fn bad_requests_get_http_errors() {
    let now = Instant::now();
    let mut ctx = ctx_with(|c| c.origins = vec!["https://ok.example".into()]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"BREW / HTCPCP/1.0\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        (b"this is not http\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        (b"GET /\x00 HTTP/1.1\r\n\r\n".to_vec(), "HTTP/1.1 400"),
        (
            upgrade_request("Origin: https://evil.example\r\n"),
            "HTTP/1.1 403",
        ),
        (
            upgrade_request("Origin: https://ok.example\r\nSec-WebSocket-Protocol: chat\r\n"),
            "HTTP/1.1 400",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "HTTP/1.1 400",
        ),
    ];
    for (req, want) in cases {
        let mut s = Session::new(1, &ctx, now, None, None);
        s.on_browser_data(&mut ctx, &req, now);
        let out = String::from_utf8(drain_browser(&mut s, &mut ctx, now)).unwrap();
        assert!(out.starts_with(want), "{want}: {out}");
        assert!(out.contains("\"error\""), "{out}");
        assert!(s.is_done());
        assert!(s.take_connect().is_none());
    }
}

#[test]
fn handshake_timeout_and_oversized_request() {
    let now = Instant::now();
    let mut ctx = ctx_with(|c| c.limits.handshake_timeout_ms = 50);
    let mut s = Session::new(1, &ctx, now, None, None);
    s.on_browser_data(&mut ctx, b"GET / HTTP/1.1\r\n", now);
    s.on_tick(&mut ctx, now + Duration::from_millis(60));
    let out = String::from_utf8(drain_browser(&mut s, &mut ctx, now)).unwrap();
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");

    let mut s = Session::new(2, &ctx, now, None, None);
    let big = vec![b'a'; ctx.cfg.limits.max_request_bytes + 10];
    s.on_browser_data(&mut ctx, &big, now);
    let out = String::from_utf8(drain_browser(&mut s, &mut ctx, now)).unwrap();
    assert!(out.starts_with("HTTP/1.1 4"), "{out}");
    assert!(s.is_done());
}

#[test]
fn idle_timeout_and_heartbeat() {
    let now = Instant::now();
    let mut ctx = ctx_with(|c| {
        c.limits.idle_timeout_ms = 1000;
        c.limits.heartbeat_ms = 300;
    });
    let mut s = relaying(&mut ctx, now);
    s.on_tick(&mut ctx, now + Duration::from_millis(310));
    let f = server_frames(&drain_browser(&mut s, &mut ctx, now));
    assert_eq!(f[0].0, 9, "ping");
    s.on_tick(&mut ctx, now + Duration::from_millis(1010));
    let f = server_frames(&drain_browser(&mut s, &mut ctx, now));
    let close = f.iter().find(|f| f.0 == 8).expect("close frame");
    assert_eq!(u16::from_be_bytes([close.1[0], close.1[1]]), 1001);
}

#[test]
fn drain_closes_with_1001_and_browser_eof_ends_it() {
    let now = Instant::now();
    let mut ctx = ctx_with(|_| {});
    let mut s = relaying(&mut ctx, now);
    s.on_drain(&mut ctx, now);
    let f = server_frames(&drain_browser(&mut s, &mut ctx, now));
    assert_eq!(u16::from_be_bytes([f[0].1[0], f[0].1[1]]), 1001);
    s.on_browser_gone(&mut ctx, None, now);
    assert!(s.is_done());
}

#[test]
fn in_flight_bytes_survive_a_close() {
    let now = Instant::now();
    let mut ctx = ctx_with(|_| {});
    let mut s = relaying(&mut ctx, now);
    s.on_browser_data(&mut ctx, &frame(Opcode::Binary, b"abcdef"), now);
    let p = s.backend_pending().as_ptr();
    s.backend_send_started(6);
    // The browser vanishes while the backend send is in flight.
    s.on_browser_gone(&mut ctx, None, now);
    assert_eq!(s.backend_pending().as_ptr(), p);
    s.backend_sent(&mut ctx, 6, now);
    s.release(&mut ctx);
    assert_eq!(ctx.pool.outstanding, 0);
}

#[test]
fn an_idle_session_is_small() {
    // The per-idle-session budget is 8 KB including kernel socket memory;
    // the struct itself must stay a small fraction of it.
    let size = std::mem::size_of::<Session>();
    assert!(size <= 1024, "Session is {size} bytes");
}

#[test]
fn zero_copy_downstream_frames_in_place() {
    let now = Instant::now();
    let mut ctx = ctx_with(|_| {});
    let mut s = relaying(&mut ctx, now);
    let buf = s.backend_frame_buf(&mut ctx).expect("fresh chunk");
    assert!(buf.len() <= ctx.cfg.limits.recv_buffer_bytes);
    buf[..3].copy_from_slice(b"abc");
    s.backend_frame_done(&mut ctx, 3, now);
    assert!(s.backend_frame_buf(&mut ctx).is_none(), "queue not empty");
    let f = server_frames(&drain_browser(&mut s, &mut ctx, now));
    assert_eq!(f, vec![(2, b"abc".to_vec())]);
    assert_eq!(s.bytes_down, 3);
    // A read of nothing releases the chunk.
    let _ = s.backend_frame_buf(&mut ctx).unwrap();
    s.backend_frame_done(&mut ctx, 0, now);
    assert_eq!(s.browser_pending_len(), 0);
    s.release(&mut ctx);
    assert_eq!(ctx.pool.outstanding, 0);
}

fn splice_ctx() -> WorkerCtx {
    ctx_with(|c| {
        c.limits.splice_min_bytes = 1024;
        c.limits.splice_pipe_bytes = 64 * 1024;
    })
}

/// A relaying session whose last backend read was bulk (splicing allowed).
fn bulk_relaying(ctx: &mut WorkerCtx, now: Instant) -> Session {
    let mut s = relaying(ctx, now);
    assert_eq!(s.splice_in_limit(ctx), None, "no bulk read yet");
    s.on_backend_data(ctx, &[1u8; 2048], now);
    assert_eq!(s.splice_in_limit(ctx), None, "bytes queued for the browser");
    drain_browser(&mut s, ctx, now);
    s
}

/// What the epoll layer does with a session's browser output: queued bytes
/// up to the spliced frame's payload, then the pipe (simulated: `pipe`
/// holds the bytes spliced in), then the rest. `step` bounds each write.
fn drain_with_pipe(
    s: &mut Session,
    ctx: &mut WorkerCtx,
    pipe: &mut Vec<u8>,
    step: usize,
    now: Instant,
) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        let p = s.browser_pending();
        if !p.is_empty() {
            let n = p.len().min(step);
            out.extend_from_slice(&p[..n]);
            s.browser_sent(ctx, n, now);
            continue;
        }
        let r = s.splice_out_ready();
        if r > 0 {
            let n = r.min(step).min(pipe.len());
            out.extend(pipe.drain(..n));
            s.splice_out_done(ctx, n, now);
            continue;
        }
        assert_eq!(s.browser_pending_len(), 0, "stuck with bytes pending");
        return out;
    }
    panic!("no progress");
}

#[test]
fn spliced_frame_header_then_pipe_then_later_frames() {
    let now = Instant::now();
    let mut ctx = splice_ctx();
    let mut s = bulk_relaying(&mut ctx, now);
    let lim = s.splice_in_limit(&ctx).expect("bulk read: splice allowed");
    assert_eq!(lim, ctx.cfg.limits.buffer_bytes, "bounded by buffer_bytes");
    let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let mut pipe = payload.clone();
    let later = now + Duration::from_millis(5);
    s.splice_in_done(&mut ctx, pipe.len(), later);
    assert_eq!(s.pipe_bytes(), 5000);
    assert_eq!(s.browser_pending_len(), 4 + 5000, "header + pipe");
    assert_eq!(s.browser_pending().len(), 4, "only the header goes first");
    assert_eq!(s.splice_out_ready(), 0, "header not sent yet");
    // Backpressure: no backend read, no second splice while the pipe holds bytes.
    assert!(!s.want_backend_read(&ctx));
    assert!(s.backend_frame_buf(&mut ctx).is_none());
    assert_eq!(s.splice_in_limit(&ctx), None);
    // A ping from the browser and the server's drain land after the frame.
    s.on_browser_data(&mut ctx, &frame(Opcode::Ping, b"p"), later);
    s.on_drain(&mut ctx, later);
    assert_eq!(s.phase(), Phase::Closing);
    assert_eq!(s.browser_pending().len(), 4, "still only the header first");
    let out = drain_with_pipe(&mut s, &mut ctx, &mut pipe, 3, later);
    let f = server_frames(&out);
    assert_eq!(f.len(), 3, "{f:?}");
    assert_eq!(f[0], (2, payload));
    assert_eq!(f[1], (0xA, b"p".to_vec()), "pong after the spliced frame");
    assert_eq!(f[2].0, 8, "close after the spliced frame");
    assert_eq!(u16::from_be_bytes([f[2].1[0], f[2].1[1]]), 1001);
    assert_eq!(s.pipe_bytes(), 0);
    assert_eq!((s.bytes_down, s.bytes_spliced), (2048 + 5000, 5000));
    assert_eq!(ctx.metrics.bytes_backend_to_browser, 2048 + 5000);
    assert!(ctx.metrics.relay_down_us.0.len() >= 2, "latency recorded");
    // The browser's close ends the session (everything was flushed).
    s.on_browser_data(
        &mut ctx,
        &frame(Opcode::Close, &1000u16.to_be_bytes()),
        later,
    );
    assert!(s.is_done());
    s.release(&mut ctx);
    assert_eq!(ctx.pool.outstanding, 0);
}

#[test]
fn closing_waits_for_the_pipe_to_drain() {
    let now = Instant::now();
    let mut ctx = splice_ctx();
    let mut s = bulk_relaying(&mut ctx, now);
    let mut pipe = vec![9u8; 3000];
    s.splice_in_done(&mut ctx, 3000, now);
    // Backend EOF and the browser's close while the pipe still holds bytes.
    s.on_backend_gone(&mut ctx, None, now);
    s.on_browser_data(&mut ctx, &frame(Opcode::Close, &1000u16.to_be_bytes()), now);
    assert!(!s.is_done(), "done before the spliced frame went out");
    let out = drain_with_pipe(&mut s, &mut ctx, &mut pipe, 1000, now);
    assert!(s.is_done());
    let f = server_frames(&out);
    assert_eq!(f[0], (2, vec![9u8; 3000]));
    assert_eq!(f[1].0, 8);
}

#[test]
fn browser_gone_mid_splice_drops_the_pipe_bytes() {
    let now = Instant::now();
    let mut ctx = splice_ctx();
    let mut s = bulk_relaying(&mut ctx, now);
    s.splice_in_done(&mut ctx, 4000, now);
    s.browser_sent(&mut ctx, 4, now);
    s.splice_out_done(&mut ctx, 1000, now);
    assert_eq!(s.pipe_bytes(), 3000);
    s.on_browser_gone(&mut ctx, None, now);
    assert!(s.is_done());
    assert_eq!(s.pipe_bytes(), 0);
    assert_eq!(s.browser_pending_len(), 0);
    s.release(&mut ctx);
    assert_eq!(ctx.pool.outstanding, 0);
}

#[test]
fn splicing_only_for_bulk_plain_binary_relay() {
    let now = Instant::now();
    // Small reads: no splice; a short splice goes back to plain reads.
    let mut ctx = splice_ctx();
    let mut s = relaying(&mut ctx, now);
    s.on_backend_data(&mut ctx, &[1u8; 10], now);
    drain_browser(&mut s, &mut ctx, now);
    assert_eq!(s.splice_in_limit(&ctx), None, "small read");
    let buf = s.backend_frame_buf(&mut ctx).unwrap();
    let n = 1500.min(buf.len());
    s.backend_frame_done(&mut ctx, n, now);
    drain_browser(&mut s, &mut ctx, now);
    assert!(s.splice_in_limit(&ctx).is_some(), "zero-copy bulk read");
    let mut pipe = vec![3u8; 100];
    s.splice_in_done(&mut ctx, 100, now);
    drain_with_pipe(&mut s, &mut ctx, &mut pipe, 4096, now);
    assert_eq!(
        s.splice_in_limit(&ctx),
        None,
        "a short splice ends bulk mode"
    );
    // Not in the relay phase yet.
    let mut s = Session::new(2, &ctx, now, None, None);
    assert_eq!(s.splice_in_limit(&ctx), None);
    s.on_browser_data(&mut ctx, &upgrade_request(""), now);
    drain_browser(&mut s, &mut ctx, now);
    assert_eq!(s.splice_in_limit(&ctx), None, "connecting");

    // Turned off.
    let mut ctx = ctx_with(|c| c.limits.splice_min_bytes = 0);
    let mut s = relaying(&mut ctx, now);
    s.on_backend_data(&mut ctx, &[1u8; 4096], now);
    drain_browser(&mut s, &mut ctx, now);
    assert_eq!(s.splice_in_limit(&ctx), None, "splice_min_bytes = 0");

    // base64 must be encoded in user space.
    let mut ctx = splice_ctx();
    let mut s = relaying_base64_after_3000_bytes(&mut ctx, now);
    drain_browser(&mut s, &mut ctx, now);
    assert_eq!(s.splice_in_limit(&ctx), None, "base64");

    // Binary explicitly chosen: allowed.
    let mut s = Session::new(4, &ctx, now, None, None);
    s.on_browser_data(
        &mut ctx,
        &upgrade_request("Sec-WebSocket-Protocol: binary\r\n"),
        now,
    );
    drain_browser(&mut s, &mut ctx, now);
    s.take_connect();
    s.on_backend_connected(&mut ctx, now);
    s.on_backend_data(&mut ctx, &[1u8; 3000], now);
    drain_browser(&mut s, &mut ctx, now);
    assert!(s.splice_in_limit(&ctx).is_some(), "binary");
}

/// io_uring bulk receive: a pool chunk lent outside the queue, filled while
/// earlier frames are still queued and while pongs/pings are queued, then
/// appended as one frame behind them; nothing lands inside it.
#[test]
fn bulk_receive_frames_in_place_behind_queued_frames() {
    let now = Instant::now();
    let mut ctx = splice_ctx();
    let mut s = relaying(&mut ctx, now);
    assert!(!s.bulk_recv_wanted(&ctx), "no bulk read yet");
    assert!(s.backend_bulk_buf(&mut ctx).is_none());
    s.on_backend_data(&mut ctx, &[1u8; 2048], now);
    // Unlike splicing, a queued frame does not stop a bulk receive.
    assert!(s.browser_pending_len() > 0);
    assert!(s.bulk_recv_wanted(&ctx), "bulk read: bulk receive allowed");
    let room = s.backend_bulk_buf(&mut ctx).expect("a lent chunk");
    assert_eq!(
        room.len(),
        ctx.cfg.limits.recv_buffer_bytes,
        "one read's worth"
    );
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    room[..3000].copy_from_slice(&payload);
    let at = room.as_ptr();
    assert!(!s.bulk_recv_wanted(&ctx), "one bulk receive at a time");
    assert!(s.backend_bulk_buf(&mut ctx).is_none());
    // While the receive is under way: a ping from the browser (its pong is
    // queued now), part of the first frame goes out.
    let later = now + Duration::from_millis(5);
    s.on_browser_data(&mut ctx, &frame(Opcode::Ping, b"p"), later);
    s.browser_sent(&mut ctx, 3, later);
    s.backend_bulk_done(&mut ctx, 3000, later);
    assert_eq!((s.bytes_down, s.bytes_bulk_recv), (2048 + 3000, 3000));
    assert_eq!(ctx.metrics.bytes_backend_to_browser, 2048 + 3000);
    assert!(s.bulk_recv_wanted(&ctx), "still bulk (3000 >= 1024)");
    // The payload was not copied: the frame's bytes are the lent chunk's.
    let mut sent = 3;
    let mut out = Vec::new();
    let mut in_place = false;
    while s.browser_pending_len() > 0 {
        let p = s.browser_pending();
        if p.len() > 4 && p[4..].as_ptr() == at {
            in_place = true;
        }
        out.extend_from_slice(p);
        let n = p.len();
        s.browser_sent(&mut ctx, n, later);
        sent += n;
    }
    assert!(in_place, "the frame was copied");
    // The first 3 bytes (of the first frame's header) went out earlier.
    let mut all = frame_header_of(2048)[..3].to_vec();
    all.extend_from_slice(&out);
    let f = server_frames(&all);
    assert_eq!(f.len(), 3, "{sent} bytes sent");
    assert_eq!(f[0], (2, vec![1u8; 2048]));
    assert_eq!(f[1], (0xA, b"p".to_vec()), "pong before the bulk frame");
    assert_eq!(f[2], (2, payload));
    assert!(!ctx.metrics.relay_down_us.0.is_empty(), "latency recorded");
    // A short bulk read ends bulk mode; nothing received (no data yet,
    // EOF, error) returns the chunk and keeps it.
    let _ = s.backend_bulk_buf(&mut ctx).unwrap();
    s.backend_bulk_done(&mut ctx, 0, later);
    assert!(s.bulk_recv_wanted(&ctx), "nothing came: still bulk");
    let _ = s.backend_bulk_buf(&mut ctx).unwrap();
    s.backend_bulk_done(&mut ctx, 10, later);
    assert!(s.bulk_recv_wanted(&ctx), "one short read is forgiven");
    let _ = s.backend_bulk_buf(&mut ctx).unwrap();
    s.backend_bulk_done(&mut ctx, 2000, later);
    let _ = s.backend_bulk_buf(&mut ctx).unwrap();
    s.backend_bulk_done(&mut ctx, 10, later);
    assert!(s.bulk_recv_wanted(&ctx), "a bulk read in between resets it");
    let _ = s.backend_bulk_buf(&mut ctx).unwrap();
    s.backend_bulk_done(&mut ctx, 10, later);
    assert!(!s.bulk_recv_wanted(&ctx), "two short reads end bulk mode");
    // Back in bulk mode (a bulk read on the copying path), one short
    // bulk read is forgiven again.
    s.on_backend_data(&mut ctx, &[5u8; 1500], later);
    let _ = s.backend_bulk_buf(&mut ctx).unwrap();
    s.backend_bulk_done(&mut ctx, 10, later);
    assert!(s.bulk_recv_wanted(&ctx));
    drain_browser(&mut s, &mut ctx, later);
    assert_eq!(ctx.pool.outstanding, 0, "an idle session holds no chunk");
}

fn frame_header_of(len: usize) -> Vec<u8> {
    let mut hdr = [0u8; websocket::MAX_SERVER_HEADER_LEN];
    let n = websocket::write_server_header(&mut hdr, true, Opcode::Binary, len as u64);
    hdr[..n].to_vec()
}

/// Backpressure, the session ending mid-receive, and the cases that must
/// take the copying path.
#[test]
fn bulk_receive_bounds_and_ends_cleanly() {
    let now = Instant::now();
    let mut ctx = splice_ctx();
    let mut s = relaying(&mut ctx, now);
    s.on_backend_data(&mut ctx, &[1u8; 4096], now);
    // Fill to_browser to its bound with bulk frames nobody sends.
    let mut guard = 0;
    while s.bulk_recv_wanted(&ctx) {
        let room = s.backend_bulk_buf(&mut ctx).unwrap();
        let n = room.len();
        assert!(
            s.browser_pending_len() + n <= ctx.cfg.limits.buffer_bytes + 4096,
            "a receive may bring more than the bound allows"
        );
        s.backend_bulk_done(&mut ctx, n, now);
        guard += 1;
        assert!(guard < 100);
    }
    assert!(!s.want_backend_read(&ctx), "backpressure");
    assert!(s.browser_pending_len() >= ctx.cfg.limits.buffer_bytes);
    drain_browser(&mut s, &mut ctx, now);
    // The session ends (browser gone) while a receive is in flight: the
    // chunk stays lent (the kernel may still write it) until the receive
    // completes; its bytes are then dropped, not queued.
    let _ = s.backend_bulk_buf(&mut ctx).unwrap();
    s.on_browser_gone(&mut ctx, None, now);
    assert!(s.is_done());
    assert_eq!(ctx.pool.outstanding, 1, "the lent chunk is still out");
    let down = s.bytes_down;
    s.backend_bulk_done(&mut ctx, 4096, now);
    assert_eq!(s.bytes_down, down, "bytes after the end are dropped");
    assert_eq!(s.browser_pending_len(), 0);
    s.release(&mut ctx);
    assert_eq!(ctx.pool.outstanding, 0);
    // release() returns a chunk still lent (the IO layer calls it only
    // once nothing is in flight).
    let mut s = relaying(&mut ctx, now);
    s.on_backend_data(&mut ctx, &[1u8; 4096], now);
    drain_browser(&mut s, &mut ctx, now);
    let _ = s.backend_bulk_buf(&mut ctx).unwrap();
    s.on_drain(&mut ctx, now);
    s.release(&mut ctx);
    assert_eq!(ctx.pool.outstanding, 0);

    // Multishot fragments: one short read alone keeps bulk mode, two in
    // a row end it; plain reads (epoll) end it at once.
    let mut s = relaying(&mut ctx, now);
    s.on_backend_data_fragment(&mut ctx, &[1u8; 1500], now);
    s.on_backend_data_fragment(&mut ctx, &[1u8; 100], now);
    assert!(s.bulk_recv_wanted(&ctx), "one fragment ended bulk mode");
    s.on_backend_data_fragment(&mut ctx, &[1u8; 1500], now);
    s.on_backend_data_fragment(&mut ctx, &[1u8; 100], now);
    assert!(s.bulk_recv_wanted(&ctx), "a bulk read in between resets it");
    s.on_backend_data_fragment(&mut ctx, &[1u8; 100], now);
    assert!(!s.bulk_recv_wanted(&ctx), "two short reads end bulk mode");
    s.on_backend_data_fragment(&mut ctx, &[1u8; 100], now);
    assert!(!s.bulk_recv_wanted(&ctx), "short reads do not start it");
    s.on_backend_data(&mut ctx, &[1u8; 1500], now);
    s.on_backend_data(&mut ctx, &[1u8; 100], now);
    assert!(!s.bulk_recv_wanted(&ctx), "a plain short read ends it");
    assert_eq!(s.bytes_down, 3 * 1500 + 5 * 100);
    drain_browser(&mut s, &mut ctx, now);
    s.release(&mut ctx);

    // Off, base64: copying path.
    let mut ctx = ctx_with(|c| c.limits.splice_min_bytes = 0);
    let mut s = relaying(&mut ctx, now);
    s.on_backend_data(&mut ctx, &[1u8; 4096], now);
    assert!(!s.bulk_recv_wanted(&ctx), "splice_min_bytes = 0");
    let mut ctx = splice_ctx();
    let mut s = relaying_base64_after_3000_bytes(&mut ctx, now);
    assert!(!s.bulk_recv_wanted(&ctx), "base64");
    assert!(s.backend_bulk_buf(&mut ctx).is_none());
}

/// A base64 session in its relay phase that has had 3000 backend bytes.
fn relaying_base64_after_3000_bytes(ctx: &mut WorkerCtx, now: Instant) -> Session {
    let mut s = Session::new(3, ctx, now, None, None);
    s.on_browser_data(
        ctx,
        &upgrade_request("Sec-WebSocket-Protocol: base64\r\n"),
        now,
    );
    drain_browser(&mut s, ctx, now);
    s.take_connect();
    s.on_backend_connected(ctx, now);
    s.on_backend_data(ctx, &[1u8; 3000], now);
    s
}

/// An appliance worker context with one admitted session (id 0xabc, ticket
/// of 32 bytes of 7) and the receiving end of its report queue.
fn appliance_ctx(now: Instant) -> (WorkerCtx, Arc<Admission>, crate::mailbox::Inbox<FromWorker>) {
    use crate::dataplane::router::AdmissionTable;
    let cfg = cfg_with(|c| c.target = TargetConfig::Appliance);
    let a = Arc::new(Admission::new(
        0xabc,
        vec![7u8; 32],
        crate::mailbox::Target::vnc("127.0.0.1:5900".parse().unwrap(), None),
        "alice".into(),
        now + Duration::from_secs(60),
        None,
        None,
        None,
    ));
    let mut table = AdmissionTable::default();
    table.insert(a.clone());
    let mut ctx = WorkerCtx::new(cfg, 0, Router::Appliance(table), None, None);
    let (tx, rx) = crate::mailbox::channel(16).unwrap();
    ctx.events = Some(tx);
    (ctx, a, rx)
}

fn appliance_request(id: &str, ticket: &[u8]) -> Vec<u8> {
    let token = crate::dataplane::router::base64_url(ticket);
    format!(
        "GET /proxy/{id}?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

fn reports(rx: &mut crate::mailbox::Inbox<FromWorker>) -> Vec<FromWorker> {
    std::iter::from_fn(|| rx.try_recv()).collect()
}

#[test]
fn a_revoked_admission_closes_its_relay_on_the_next_tick_without_a_message() {
    let now = Instant::now();
    let (mut ctx, a, mut rx) = appliance_ctx(now);
    let mut s = Session::new(1, &ctx, now, None, None);
    s.on_browser_data(&mut ctx, &appliance_request("abc", &[7u8; 32]), now);
    assert!(drain_browser(&mut s, &mut ctx, now).starts_with(b"HTTP/1.1 101"));
    assert!(s.take_connect().is_some());
    s.on_backend_connected(&mut ctx, now);
    assert_eq!(s.phase(), Phase::Relay);
    assert_eq!(a.state(), crate::mailbox::ticket_state::CLAIMED);
    // DELETE: the control plane revokes the shared state; its Revoke
    // message is lost (full mailbox). The tick alone must close it.
    assert!(a.revoke());
    s.on_tick(&mut ctx, now + Duration::from_millis(1));
    assert_eq!(s.phase(), Phase::Closing);
    let out = drain_browser(&mut s, &mut ctx, now);
    let frames = server_frames(&out);
    let (op, payload) = frames.last().unwrap();
    assert_eq!(*op, 8, "a close frame");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1008);
    // The browser answers; the session ends and marks the admission closed,
    // so the registry reconciles even without the Closed report.
    let mut close = Vec::new();
    encode_client_frame(
        &mut close,
        true,
        Opcode::Close,
        [1, 1, 1, 1],
        &1008u16.to_be_bytes(),
    );
    s.on_browser_data(&mut ctx, &close, now);
    assert!(s.is_done());
    assert_eq!(a.state(), crate::mailbox::ticket_state::CLOSED);
    let r = reports(&mut rx);
    assert!(matches!(
        r.first(),
        Some(FromWorker::Opened { id: 0xabc, .. })
    ));
    assert!(matches!(
        r.last(),
        Some(FromWorker::Closed {
            id: 0xabc,
            code: Some(1008),
            ..
        })
    ));
}

#[test]
fn refusals_are_reported_only_for_admitted_sessions() {
    let now = Instant::now();
    let (mut ctx, _a, mut rx) = appliance_ctx(now);
    // A made-up id: refused (404), but nothing reaches the control plane.
    let mut s = Session::new(1, &ctx, now, None, None);
    s.on_browser_data(&mut ctx, &appliance_request("def0", &[7u8; 32]), now);
    assert!(drain_browser(&mut s, &mut ctx, now).starts_with(b"HTTP/1.1 404"));
    assert!(reports(&mut rx).is_empty(), "a stranger's id was reported");
    // The real id with a wrong ticket: reported for the session's record.
    let mut s = Session::new(2, &ctx, now, None, None);
    s.on_browser_data(&mut ctx, &appliance_request("abc", &[8u8; 32]), now);
    assert!(drain_browser(&mut s, &mut ctx, now).starts_with(b"HTTP/1.1 403"));
    let r = reports(&mut rx);
    assert!(
        matches!(
            r.as_slice(),
            [FromWorker::Refused {
                id: 0xabc,
                kind: "bad_ticket"
            }]
        ),
        "{r:?}"
    );
}

#[test]
fn revoked_and_expired_tickets_answer_403_and_410_not_404() {
    let now = Instant::now();
    let (mut ctx, a, _rx) = appliance_ctx(now);
    let try_connect = |ctx: &mut WorkerCtx, at: Instant| {
        if let Router::Appliance(t) = &mut ctx.router {
            t.purge(at);
        }
        let mut s = Session::new(3, ctx, at, None, None);
        s.on_browser_data(ctx, &appliance_request("abc", &[7u8; 32]), at);
        let out = drain_browser(&mut s, ctx, at);
        String::from_utf8_lossy(&out[..12]).into_owned()
    };
    let expired = now + Duration::from_secs(61);
    assert_eq!(try_connect(&mut ctx, expired), "HTTP/1.1 410");
    a.revoke();
    assert_eq!(try_connect(&mut ctx, now), "HTTP/1.1 403");
}

#[test]
fn handshaking_connections_are_capped_and_their_slots_come_back() {
    let now = Instant::now();
    let mut ctx = ctx_with(|c| c.limits.max_handshaking_connections = 2);
    let mut a = ctx.new_session(0, 1, now, None, None).unwrap();
    let b = ctx.new_session(1, 2, now, None, None).unwrap();
    assert!(ctx.new_session(2, 3, now, None, None).is_none());
    assert_eq!(ctx.handshakes.current(), 2);
    assert!(ctx
        .metrics
        .errors()
        .iter()
        .any(|(k, n)| *k == "handshaking_over_limit" && *n == 1));
    // `a` finishes its upgrade: it relays now and no longer counts.
    a.on_browser_data(&mut ctx, &upgrade_request(""), now);
    assert_eq!(a.phase(), Phase::Connecting);
    assert_eq!(ctx.handshakes.current(), 1);
    let c = ctx.new_session(2, 3, now, None, None).unwrap();
    // A connection that goes away mid-handshake gives its slot back too.
    drop(b);
    drop(c);
    assert_eq!(ctx.handshakes.current(), 0);
}
