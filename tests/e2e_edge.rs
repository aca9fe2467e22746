//! End-to-end tests of the edge (issue 12 item 4) on the real appliance
//! (`consolegate run --config FILE`): per-client-IP limits on the control
//! port (`rest_per_ip_per_s`) and on the console port
//! (`handshakes_per_ip_per_s`, `handshaking_per_ip`, `handshaking_total`),
//! and the client address from a load balancer (PROXY protocol v1 and v2,
//! `X-Forwarded-For`) only when the TCP peer is a trusted proxy.
//!
//! Clients pick their source address on the loopback network (127.0.0.1
//! is the trusted proxy in these tests, 127.0.0.2 and .3 are strangers), so
//! one machine plays a load balancer and several clients. Console-port
//! tests run on both IO backends; control-port tests on one.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use consolegate::protocol::proxy_protocol::{encode_v1, encode_v2};
use serde_json::json;

const TRUSTED: &str = "127.0.0.1";
const STRANGER: &str = "127.0.0.2";
const STRANGER_2: &str = "127.0.0.3";
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a limit may take to recover (a rate of a few per second, or a
/// handshake slot given back).
const RECOVERY: Duration = Duration::from_secs(10);

/// A TCP connection to `to` from the loopback address `source`.
fn connect_from(source: &str, to: SocketAddr) -> TcpStream {
    let src: IpAddr = source.parse().unwrap();
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::new(src, 0).into())
        .unwrap_or_else(|e| panic!("{}bind {source}: {e}", ctx()));
    socket
        .connect_timeout(&to.into(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}connect {to} from {source}: {e}", ctx()));
    let s: TcpStream = socket.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s
}

/// Reads a response head (up to the blank line): its status and text.
/// `Err` when the connection ends (or fails) before one.
fn read_head(s: &mut TcpStream) -> Result<(u16, String), String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&buf))),
            Ok(_) => buf.push(byte[0]),
            Err(e) => return Err(format!("{e} after {:?}", String::from_utf8_lossy(&buf))),
        }
        if buf.len() > 16 * 1024 {
            return Err("head over 16 KiB".into());
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((status, head))
}

/// Sends `bytes` from `source` to the console port and reads the whole
/// response (an error answer ends with the connection). A refusal at
/// accept may be written before the request arrives, so a failed write is
/// not an error: the answer is read all the same.
fn console_call(app: &Appliance, source: &str, bytes: &[u8]) -> Result<HttpResponse, String> {
    let mut s = connect_from(source, app.console);
    let _ = s.write_all(bytes);
    read_http_response(&mut s)
}

/// An upgrade request for a session that does not exist: answered 404 when
/// no limit stands in the way.
fn unknown_session_request() -> Vec<u8> {
    upgrade_request("/proxy/00000000000000ff?token=nothing", &[])
}

/// The status of one console request (0 when no answer came back).
fn console_status(app: &Appliance, source: &str, bytes: &[u8]) -> u16 {
    console_call(app, source, bytes).map_or(0, |r| r.status)
}

/// Asserts a per-IP refusal: 429, Retry-After ≥ 1, the JSON error body
/// with `code`.
fn assert_refused(r: &HttpResponse, code: &str, context: &str) {
    assert_eq!(r.status, 429, "{}{context}: {r:?}", ctx());
    let retry: u64 = r
        .header("Retry-After")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{}{context}: no Retry-After in {r:?}", ctx()));
    assert!(retry >= 1, "{}{context}: Retry-After {retry}", ctx());
    r.assert_json_error(context);
    assert!(
        r.body.contains(code),
        "{}{context}: code {code} not in {:?}",
        ctx(),
        r.body
    );
}

/// Sends requests from `source` until one is refused (429); at most
/// `attempts`. Returns the refusal and how many passed before it.
fn until_refused(
    app: &Appliance,
    source: &str,
    bytes: &[u8],
    attempts: usize,
) -> (HttpResponse, usize) {
    for passed in 0..attempts {
        let r = console_call(app, source, bytes).unwrap_or_else(|e| panic!("{}{e}", ctx()));
        if r.status == 429 {
            return (r, passed);
        }
    }
    panic!("{}no 429 from {source} within {attempts} requests", ctx());
}

/// An appliance with `[rate_limits]` and `[network]` as given, one worker
/// (accept order is connect order), long handshake timeout (idle
/// connections stay in their handshake for the whole test).
fn edge_appliance(io: &str, rate_limits: &str, network: &str, sessions: &str) -> Appliance {
    Appliance::start(
        io,
        ApplianceOptions {
            dataplane_toml: "workers = 1".into(),
            limits_toml: "handshake_timeout_ms = 60000".into(),
            sessions_toml: sessions.into(),
            extra_toml: format!("\n[rate_limits]\n{rate_limits}\n\n[network]\n{network}\n"),
            ..ApplianceOptions::default()
        },
    )
}

// ---- the control port ---------------------------------------------------

/// One REST call from `source` with optional `X-Forwarded-For`.
fn rest_from(app: &Appliance, source: &str, path: &str, forwarded: Option<&str>) -> HttpResponse {
    let mut s = connect_from(source, app.control);
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAuthorization: Bearer {READ_TOKEN}\r\n",
        app.control
    );
    if let Some(f) = forwarded {
        req.push_str(&format!("X-Forwarded-For: {f}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    read_http_response(&mut s).unwrap_or_else(|e| panic!("{}GET {path}: {e}", ctx()))
}

/// REST calls until a 429 (at most `attempts`): the refusal and how many
/// passed.
fn rest_until_refused(
    app: &Appliance,
    source: &str,
    forwarded: Option<&str>,
) -> (HttpResponse, usize) {
    for passed in 0..20 {
        let r = rest_from(app, source, "/api/v1/stats", forwarded);
        if r.status == 429 {
            return (r, passed);
        }
        assert_eq!(r.status, 200, "{r:?}");
    }
    panic!("no 429 from {source} (X-Forwarded-For {forwarded:?}) within 20 requests");
}

#[test]
fn rest_per_ip_limit_refuses_then_recovers_and_honours_trusted_forwarded_for() {
    set_current_io("epoll");
    let app = edge_appliance(
        "epoll",
        "rest_per_ip_per_s = 3",
        &format!("trusted_proxies = [\"{TRUSTED}/32\"]"),
        "",
    );
    // A stranger: a burst of 3, then 429 with Retry-After and the JSON body.
    let (refused, passed) = rest_until_refused(&app, STRANGER, None);
    assert!((1..=3).contains(&passed), "{passed} passed before the 429");
    assert_refused(&refused, "rate_limited", "REST over the per-IP rate");
    assert!(
        refused.body.contains("rate_limited_rest_per_ip"),
        "{refused:?}"
    );
    // Probes and scrapers are exempt while the address is throttled.
    assert_eq!(rest_from(&app, STRANGER, "/healthz", None).status, 200);
    assert_eq!(rest_from(&app, STRANGER, "/metrics", None).status, 200);
    // X-Forwarded-For from a stranger is not taken: still the same budget.
    let r = rest_from(&app, STRANGER, "/api/v1/stats", Some("203.0.113.50"));
    assert_eq!(
        r.status, 429,
        "a stranger's X-Forwarded-For must not buy a new budget: {r:?}"
    );
    // Another address has its own budget.
    assert_eq!(
        rest_from(&app, STRANGER_2, "/api/v1/stats", None).status,
        200
    );
    // The limit recovers by itself.
    wait_until(RECOVERY, "the stranger's REST budget to recover", || {
        (rest_from(&app, STRANGER, "/api/v1/stats", None).status == 200).then_some(())
    });
    // From the trusted proxy, each forwarded client has its own budget.
    let (r, _) = rest_until_refused(&app, TRUSTED, Some("6.6.6.6, 203.0.113.1"));
    assert_refused(&r, "rate_limited", "REST via the proxy, client 203.0.113.1");
    assert!(r.body.contains("203.0.113.1"), "{r:?}");
    let r = rest_from(&app, TRUSTED, "/api/v1/stats", Some("203.0.113.2"));
    assert_eq!(
        r.status, 200,
        "another forwarded client has its own budget: {r:?}"
    );
    assert!(app.errors_counted("rate_limited_rest_per_ip") >= 2);
}

// ---- the console port: per-IP limits --------------------------------------

fn handshakes_per_ip_refused_then_recover(io: &str) {
    let app = edge_appliance(io, "handshakes_per_ip_per_s = 3", "", "");
    let req = unknown_session_request();
    let (refused, passed) = until_refused(&app, STRANGER, &req, 20);
    assert!(
        (1..=3).contains(&passed),
        "{}{passed} passed before the 429",
        ctx()
    );
    assert_refused(
        &refused,
        "rate_limited_handshakes_per_ip",
        "handshakes over the per-IP rate",
    );
    // Another client IP has its own budget.
    assert_eq!(console_status(&app, STRANGER_2, &req), 404);
    // Recovers by itself.
    wait_until(RECOVERY, "the handshake budget to recover", || {
        (console_status(&app, STRANGER, &req) == 404).then_some(())
    });
    app.wait_errors_counted("rate_limited_handshakes_per_ip", 1, RECOVERY);
}

/// Connections that never finish their handshake hold their IP's places;
/// one more is refused at once; a place given back is taken again.
fn handshaking_per_ip_counts_unfinished_connections(io: &str) {
    let app = edge_appliance(io, "handshaking_per_ip = 2", "", "");
    let req = unknown_session_request();
    let idle_a = connect_from(STRANGER, app.console);
    let mut idle_b = connect_from(STRANGER, app.console);
    idle_b.write_all(b"GET /half").unwrap();
    let r = console_call(&app, STRANGER, &req).unwrap_or_else(|e| panic!("{}{e}", ctx()));
    assert_refused(
        &r,
        "handshaking_per_ip_over_limit",
        "a third connection in the handshake",
    );
    // Other IPs are not affected.
    assert_eq!(console_status(&app, STRANGER_2, &req), 404);
    // Still refused while both are held (bounded: not a timing fluke).
    for _ in 0..3 {
        assert_eq!(console_status(&app, STRANGER, &req), 429, "{}", ctx());
    }
    drop(idle_a);
    wait_until(RECOVERY, "a place given back", || {
        (console_status(&app, STRANGER, &req) == 404).then_some(())
    });
    drop(idle_b);
    app.wait_errors_counted("handshaking_per_ip_over_limit", 4, RECOVERY);
}

fn handshaking_total_bounds_everyone(io: &str) {
    let app = edge_appliance(io, "handshaking_total = 2", "", "");
    let req = unknown_session_request();
    let idle_a = connect_from(STRANGER, app.console);
    let idle_b = connect_from(STRANGER_2, app.console);
    let r = console_call(&app, TRUSTED, &req).unwrap_or_else(|e| panic!("{}{e}", ctx()));
    assert_refused(
        &r,
        "handshaking_total_over_limit",
        "a third connection in all",
    );
    drop(idle_b);
    wait_until(RECOVERY, "a total place given back", || {
        (console_status(&app, TRUSTED, &req) == 404).then_some(())
    });
    drop(idle_a);
    app.wait_errors_counted("handshaking_total_over_limit", 1, RECOVERY);
}

// ---- the console port: the client address from a load balancer -------------

/// Whether the console closed the connection without answering.
fn closed_unanswered(app: &Appliance, source: &str, bytes: &[u8]) -> bool {
    let mut s = connect_from(source, app.console);
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0) | Err(_))
}

fn proxy_protocol_from_trusted_and_untrusted(io: &str) {
    let app = edge_appliance(
        io,
        "handshakes_per_ip_per_s = 2",
        &format!("trusted_proxies = [\"{TRUSTED}\"]\nconsole_proxy_protocol = \"required\""),
        "bind_client_ip = true",
    );
    let front: SocketAddr = "10.0.0.1:443".parse().unwrap();
    let req = unknown_session_request();
    let via = |header: Vec<u8>| [header, req.clone()].concat();
    // v1 for client A: A's budget is spent, the proxy's own address is not
    // what counts.
    let a: SocketAddr = "203.0.113.1:50000".parse().unwrap();
    let (r, passed) = until_refused(&app, TRUSTED, &via(encode_v1(a, front)), 20);
    assert!((1..=2).contains(&passed), "{}{passed} passed", ctx());
    assert_refused(&r, "rate_limited_handshakes_per_ip", "PROXY v1 client A");
    // v2 for client B, through the same proxy: its own budget.
    let b: SocketAddr = "203.0.113.2:50001".parse().unwrap();
    assert_eq!(
        console_status(&app, TRUSTED, &via(encode_v2(b, front, &[]))),
        404
    );
    // IPv6 through v1 and v2 as well.
    let c6: SocketAddr = "[2001:db8::5]:1234".parse().unwrap();
    let f6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    assert_eq!(console_status(&app, TRUSTED, &via(encode_v1(c6, f6))), 404);

    // The session's recorded peer and the ticket's client binding use the
    // carried address.
    let bound =
        |ip: &str| app.create(&json!({"target": {"kind": "demo"}, "user": "u", "client_ip": ip}));
    let s = bound("198.51.100.7");
    let carried: SocketAddr = "198.51.100.7:4242".parse().unwrap();
    let mut conn = connect_from(TRUSTED, app.console);
    conn.write_all(
        &[
            encode_v2(carried, front, &[0x04, 0x00, 0x01, 0x00]),
            upgrade_request(&s.path, &[]),
        ]
        .concat(),
    )
    .unwrap();
    let (status, head) = read_head(&mut conn).unwrap_or_else(|e| panic!("{}{e}", ctx()));
    assert_eq!(status, 101, "{}{head}", ctx());
    let record = app.wait_session(&s.id, "open with its peer", RECOVERY, |v| {
        v["state"] == "open"
    });
    assert_eq!(
        record["peer"],
        json!("198.51.100.7:4242"),
        "{}{record}",
        ctx()
    );
    drop(conn);
    let s2 = bound("198.51.100.7");
    let other: SocketAddr = "198.51.100.8:4242".parse().unwrap();
    let r = console_call(
        &app,
        TRUSTED,
        &[encode_v1(other, front), upgrade_request(&s2.path, &[])].concat(),
    )
    .unwrap_or_else(|e| panic!("{}{e}", ctx()));
    r.assert_api_error(
        403,
        "client_ip_mismatch",
        "a ticket bound to another client",
    );

    // From a stranger, a PROXY header is refused (closed, counted); so is a
    // trusted proxy's connection without one (required).
    let forged = via(encode_v1("192.0.2.99:1".parse().unwrap(), front));
    assert!(closed_unanswered(&app, STRANGER, &forged), "{}", ctx());
    assert!(
        closed_unanswered(&app, STRANGER, &via(encode_v2(a, front, &[]))),
        "{}",
        ctx()
    );
    assert!(closed_unanswered(&app, TRUSTED, &req), "{}", ctx());
    // A stranger without a header is an ordinary client (another one: the
    // refused connections above spent the first stranger's budget).
    assert_eq!(console_status(&app, STRANGER_2, &req), 404);
    app.wait_errors_counted("proxy_header_untrusted", 2, RECOVERY);
    app.wait_errors_counted("proxy_header_missing", 1, RECOVERY);
}

fn forwarded_for_from_trusted_and_untrusted(io: &str) {
    let app = edge_appliance(
        io,
        "handshakes_per_ip_per_s = 2",
        &format!("trusted_proxies = [\"{TRUSTED}\"]"),
        "",
    );
    let path = "/proxy/00000000000000ff?token=nothing";
    let with_xff = |ip: &str| upgrade_request(path, &[&format!("X-Forwarded-For: 6.6.6.6, {ip}")]);
    // Through the trusted proxy: each forwarded client has its own budget.
    let (r, passed) = until_refused(&app, TRUSTED, &with_xff("203.0.113.5"), 20);
    assert!((1..=2).contains(&passed), "{}{passed} passed", ctx());
    assert_refused(
        &r,
        "rate_limited_handshakes_per_ip",
        "X-Forwarded-For client",
    );
    assert_eq!(console_status(&app, TRUSTED, &with_xff("203.0.113.6")), 404);
    // From a stranger the header is ignored: rotating it buys nothing.
    let mut statuses = Vec::new();
    for i in 0..6 {
        statuses.push(console_status(
            &app,
            STRANGER,
            &with_xff(&format!("198.51.100.{i}")),
        ));
    }
    assert!(
        statuses.contains(&429),
        "{}a stranger's X-Forwarded-For was taken: {statuses:?}",
        ctx()
    );
    // The session's peer is the forwarded client.
    let s = app.create_demo("u");
    let mut conn = connect_from(TRUSTED, app.console);
    conn.write_all(&upgrade_request(
        &s.path,
        &["X-Forwarded-For: 203.0.113.77"],
    ))
    .unwrap();
    let (status, head) = read_head(&mut conn).unwrap_or_else(|e| panic!("{}{e}", ctx()));
    assert_eq!(status, 101, "{}{head}", ctx());
    let record = app.wait_session(&s.id, "open with its peer", RECOVERY, |v| {
        v["state"] == "open"
    });
    assert_eq!(record["peer"], json!("203.0.113.77:0"), "{}{record}", ctx());
}

backend_tests!(
    handshakes_per_ip_refused_then_recover,
    handshaking_per_ip_counts_unfinished_connections,
    handshaking_total_bounds_everyone,
    proxy_protocol_from_trusted_and_untrusted,
    forwarded_for_from_trusted_and_untrusted,
);
