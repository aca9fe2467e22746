//! Tests of the client role of the upgrade: the request's exact bytes, its
//! acceptance by our own server parser and by tungstenite's, and every way
//! a server's answer can be refused, fed at every split.

use super::super::{parse_request, write_upgrade_response, Request, RequestLimits, Side};
use super::*;
use proptest::prelude::*;
use std::io::{self, Read, Write};

const NONCE: [u8; 16] = *b"the sample nonce";
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
const LIMITS: ResponseLimits = ResponseLimits {
    max_response_bytes: 4096,
    max_headers: 32,
};

fn url(s: &str) -> WsUrl {
    WsUrl::parse(s).unwrap()
}

fn handshake(options: &ClientOptions) -> (String, ClientHandshake) {
    let mut out = Vec::new();
    let hs =
        write_client_request_with_key(&mut out, &url("wss://esx.example/ticket/T"), options, NONCE)
            .unwrap();
    (String::from_utf8(out).unwrap(), hs)
}

fn webmks() -> ClientHandshake {
    handshake(&ClientOptions::webmks()).1
}

/// A 101 with `Sec-WebSocket-Protocol: binary`, and `extra` header lines.
fn good_response(extra: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {ACCEPT}\r\nSec-WebSocket-Protocol: binary\r\n{extra}\r\n"
    )
}

/// `good_response` with the line starting with `name` replaced by `with`
/// (removed when empty).
fn response_with(name: &str, with: &str) -> String {
    good_response("")
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(|l| if l.starts_with(name) { with } else { l })
        .filter(|l| !l.is_empty())
        .map(|l| format!("{l}\r\n"))
        .collect::<String>()
        + "\r\n"
}

fn parse_err(hs: &ClientHandshake, response: &str) -> HttpError {
    match hs.parse_response(response.as_bytes(), &LIMITS) {
        Err(e) => e,
        other => panic!("expected an error, got {other:?} for {response:?}"),
    }
}

#[test]
fn request_bytes_are_exact() {
    let (request, hs) = handshake(&ClientOptions::webmks());
    assert_eq!(
        request,
        "GET /ticket/T HTTP/1.1\r\nHost: esx.example\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
    );
    assert_eq!(hs.key(), KEY);
    let options = ClientOptions {
        protocols: vec!["binary".into(), "vmware-vvc".into()],
        require_protocol: true,
        origin: Some("https://portal.example".into()),
    };
    let mut out = Vec::new();
    write_client_request_with_key(&mut out, &url("ws://[::1]:8080/?t=1"), &options, NONCE).unwrap();
    let request = String::from_utf8(out).unwrap();
    assert!(request.starts_with("GET /?t=1 HTTP/1.1\r\nHost: [::1]:8080\r\n"));
    assert!(request.contains("\r\nSec-WebSocket-Protocol: binary, vmware-vvc\r\n"));
    assert!(request.ends_with("\r\nOrigin: https://portal.example\r\n\r\n"));
    // No protocols: no header.
    let none = ClientOptions {
        protocols: vec![],
        require_protocol: false,
        origin: None,
    };
    assert!(!handshake(&none).0.contains("Sec-WebSocket-Protocol"));
}

#[test]
fn keys_are_fresh_base64_of_16_bytes() {
    let target = url("wss://h/");
    let mut keys = std::collections::HashSet::new();
    for _ in 0..50 {
        let hs = write_client_request(&mut Vec::new(), &target, &ClientOptions::webmks()).unwrap();
        assert_eq!(BASE64.decode(hs.key()).unwrap().len(), 16);
        keys.insert(hs.key().to_owned());
    }
    assert_eq!(keys.len(), 50);
}

#[test]
fn bad_options_are_our_fault() {
    let target = url("wss://h/");
    for options in [
        ClientOptions {
            protocols: vec!["bin ary".into()],
            ..ClientOptions::webmks()
        },
        ClientOptions {
            protocols: vec![String::new()],
            ..ClientOptions::webmks()
        },
        ClientOptions {
            origin: Some("https://x\r\nEvil: 1".into()),
            ..ClientOptions::webmks()
        },
        ClientOptions {
            protocols: vec![],
            require_protocol: true,
            origin: None,
        },
    ] {
        let mut out = Vec::new();
        let e = write_client_request_with_key(&mut out, &target, &options, NONCE).unwrap_err();
        assert_eq!(
            (e.kind(), e.side(), e.status()),
            ("bad_client_option", Side::Internal, 500)
        );
        assert!(out.is_empty(), "nothing written on error");
    }
    let e = HttpError::RandomUnavailable(getrandom::Error::UNSUPPORTED);
    assert_eq!((e.kind(), e.side()), ("random_unavailable", Side::Internal));
}

#[test]
fn our_server_accepts_our_request_and_we_accept_its_answer() {
    let (request, hs) = handshake(&ClientOptions::webmks());
    let limits = RequestLimits {
        max_request_bytes: 8192,
        max_headers: 32,
    };
    let Ok(Some((Request::Upgrade(up), n))) = parse_request(request.as_bytes(), &limits) else {
        panic!("our server refused our request");
    };
    assert_eq!(n, request.len());
    assert_eq!(
        (up.path.as_str(), up.host.as_deref(), up.key.as_str()),
        ("/ticket/T", Some("esx.example"), KEY)
    );
    assert_eq!(up.protocols, ["binary"]);
    assert_eq!((up.origin, up.query), (None, None));
    let mut response = Vec::new();
    write_upgrade_response(&mut response, &up.key, Some("binary"));
    // The server's first frame arrives with the head: it is left to us.
    response.extend_from_slice(&[0x82, 0x01, 0x2A]);
    let (accepted, consumed) = hs.parse_response(&response, &LIMITS).unwrap().unwrap();
    assert_eq!(accepted.protocol.as_deref(), Some("binary"));
    assert_eq!(&response[consumed..], [0x82, 0x01, 0x2A]);
}

/// An in-memory stream: reads `input`, collects writes.
struct Duplex {
    input: io::Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// The callback's error type is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
#[test]
fn tungstenite_accepts_our_request_and_we_accept_its_answer() {
    use tungstenite::handshake::server::{Request as TRequest, Response as TResponse};
    let (request, hs) = handshake(&ClientOptions::webmks());
    let stream = Duplex {
        input: io::Cursor::new(request.into_bytes()),
        output: Vec::new(),
    };
    let callback = |req: &TRequest, mut resp: TResponse| {
        assert_eq!(req.uri().path(), "/ticket/T");
        assert_eq!(req.headers()["sec-websocket-protocol"], "binary");
        resp.headers_mut()
            .insert("Sec-WebSocket-Protocol", "binary".parse().unwrap());
        Ok(resp)
    };
    let socket = tungstenite::accept_hdr(stream, callback).expect("tungstenite refused");
    let response = &socket.get_ref().output;
    let (accepted, consumed) = hs.parse_response(response, &LIMITS).unwrap().unwrap();
    assert_eq!(accepted.protocol.as_deref(), Some("binary"));
    assert_eq!(consumed, response.len());
}

#[test]
fn subprotocol_answers() {
    let hs = webmks();
    let none = response_with("Sec-WebSocket-Protocol", "");
    let (accepted, _) = hs
        .parse_response(none.as_bytes(), &LIMITS)
        .unwrap()
        .unwrap();
    assert_eq!(accepted.protocol, None, "absent accepted by default");
    let strict = handshake(&ClientOptions {
        require_protocol: true,
        ..ClientOptions::webmks()
    })
    .1;
    assert_eq!(parse_err(&strict, &none), HttpError::MissingSubprotocol);
    let other = response_with(
        "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Protocol: vmware-vvc",
    );
    let e = parse_err(&hs, &other);
    assert_eq!(e, HttpError::UnexpectedSubprotocol("vmware-vvc".into()));
    assert_eq!(
        (e.kind(), e.side(), e.status()),
        ("unexpected_subprotocol", Side::Backend, 502)
    );
    // Case matters (RFC 6455 §11.5), and a list is not one choice.
    for bad in ["Binary", "binary, vmware-vvc", "\"binary\""] {
        let r = response_with(
            "Sec-WebSocket-Protocol",
            &format!("Sec-WebSocket-Protocol: {bad}"),
        );
        assert_eq!(parse_err(&hs, &r).kind(), "unexpected_subprotocol", "{bad}");
    }
    // Offered none: any choice is unexpected, none is fine.
    let bare = handshake(&ClientOptions {
        protocols: vec![],
        require_protocol: false,
        origin: None,
    })
    .1;
    assert_eq!(
        parse_err(&bare, &good_response("")).kind(),
        "unexpected_subprotocol"
    );
    assert!(bare
        .parse_response(none.as_bytes(), &LIMITS)
        .unwrap()
        .is_some());
    // Escaped in the error.
    let r = response_with(
        "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Protocol: a\u{1b}[31m",
    );
    let e = parse_err(&hs, &r);
    assert!(!e.to_string().contains('\u{1b}'), "{e}");
}

#[test]
fn refusals_and_broken_answers() {
    let hs = webmks();
    let wrong_accept = response_with(
        "Sec-WebSocket-Accept",
        "Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    );
    let cases: Vec<(String, &str)> = vec![
        (wrong_accept, "accept_mismatch"),
        (response_with("Sec-WebSocket-Accept", ""), "accept_mismatch"),
        (
            good_response("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "bad_upgrade_response",
        ),
        (
            good_response("Sec-WebSocket-Protocol: binary\r\n"),
            "bad_upgrade_response",
        ),
        (
            good_response("Sec-WebSocket-Extensions: permessage-deflate\r\n"),
            "unexpected_extensions",
        ),
        (
            response_with("Upgrade:", "Upgrade: h2c"),
            "bad_upgrade_response",
        ),
        (response_with("Upgrade:", ""), "bad_upgrade_response"),
        (
            response_with("Connection:", "Connection: keep-alive"),
            "bad_upgrade_response",
        ),
        (
            good_response("").replacen("HTTP/1.1", "HTTP/1.0", 1),
            "response_not_http11",
        ),
        ("garbage\r\n\r\n".into(), "response_malformed"),
        ("\x15\x03\x03\x00\x02\x02\x28".into(), "response_malformed"),
        (good_response("X-Bad: \u{1}\r\n"), "response_malformed"),
    ];
    for (response, kind) in cases {
        let e = parse_err(&hs, &response);
        assert_eq!(e.kind(), kind, "{response:?}: {e}");
        assert_eq!((e.side(), e.status()), (Side::Backend, 502));
        assert!(e.to_string().starts_with("backend"), "{e}");
    }
    // Empty extension header values are no extension.
    let r = good_response("Sec-WebSocket-Extensions: \r\n");
    assert!(hs.parse_response(r.as_bytes(), &LIMITS).unwrap().is_some());
    // Token matching is case-insensitive and list-aware.
    let r = response_with("Connection:", "Connection: keep-alive, UPGRADE")
        .replace("Upgrade: websocket", "Upgrade: WebSocket");
    assert!(hs.parse_response(r.as_bytes(), &LIMITS).unwrap().is_some());
}

#[test]
fn non_101_carries_status_and_escaped_body() {
    let hs = webmks();
    let body = format!(
        "{{\"error\":\"ticket expired\"}}\n\u{1b}{}",
        "x".repeat(300)
    );
    let response = format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let HttpError::UpgradeRefused {
        status,
        body: shown,
    } = parse_err(&hs, &response)
    else {
        panic!("not a refusal");
    };
    assert_eq!(status, 403);
    assert!(
        shown.starts_with("{\\\"error\\\":\\\"ticket expired\\\"}\\n\\x1b"),
        "{shown}"
    );
    assert!(shown.len() < 2 * MAX_BODY_EXCERPT_BYTES && !shown.contains('\n'));
    // Without a body yet, and for a redirect or a 1xx: still a refusal.
    for head in [
        "HTTP/1.1 404 Not Found\r\n\r\n",
        "HTTP/1.1 302 Found\r\nLocation: /x\r\n\r\n",
        "HTTP/1.1 100 Continue\r\n\r\n",
        "HTTP/1.0 200 OK\r\n\r\n",
    ] {
        let e = parse_err(&hs, head);
        assert_eq!((e.kind(), e.status()), ("upgrade_refused", 502), "{head}");
    }
}

#[test]
fn oversize_heads_are_refused() {
    let hs = webmks();
    let small = ResponseLimits {
        max_response_bytes: 64,
        max_headers: 32,
    };
    let r = good_response("");
    assert_eq!(hs.parse_response(&r.as_bytes()[..63], &small), Ok(None));
    assert_eq!(
        hs.parse_response(&r.as_bytes()[..64], &small),
        Err(HttpError::ResponseTooLarge)
    );
    let exact = ResponseLimits {
        max_response_bytes: r.len(),
        max_headers: 32,
    };
    assert!(hs.parse_response(r.as_bytes(), &exact).unwrap().is_some());
    // Four header lines: three slots are too few, four are enough.
    let few = ResponseLimits {
        max_response_bytes: 4096,
        max_headers: 3,
    };
    let four = ResponseLimits {
        max_headers: 4,
        ..few
    };
    assert!(hs.parse_response(r.as_bytes(), &four).unwrap().is_some());
    assert_eq!(
        hs.parse_response(r.as_bytes(), &few),
        Err(HttpError::ResponseTooLarge)
    );
    let e = HttpError::ResponseTooLarge;
    assert_eq!((e.kind(), e.side()), ("response_too_large", Side::Backend));
}

#[test]
fn split_at_every_byte() {
    let hs = webmks();
    let mut response = good_response("").into_bytes();
    let head = response.len();
    response.extend_from_slice(b"\x82\x03abc");
    for i in 0..head {
        assert_eq!(
            hs.parse_response(&response[..i], &LIMITS),
            Ok(None),
            "prefix {i}"
        );
    }
    for i in head..=response.len() {
        let (accepted, consumed) = hs.parse_response(&response[..i], &LIMITS).unwrap().unwrap();
        assert_eq!(
            (accepted.protocol.as_deref(), consumed),
            (Some("binary"), head)
        );
    }
    // A refusal too: incomplete until its head is.
    let refusal = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\n\r\nbusy";
    for i in 0..refusal.len() - 4 {
        assert_eq!(
            hs.parse_response(&refusal[..i], &LIMITS),
            Ok(None),
            "prefix {i}"
        );
    }
    assert!(matches!(
        hs.parse_response(refusal, &LIMITS),
        Err(HttpError::UpgradeRefused { status: 503, body }) if body == "busy"
    ));
}

proptest! {
    #[test]
    fn arbitrary_answers_never_panic(
        buf in prop::collection::vec(any::<u8>(), 0..1024),
        max_bytes in 0usize..2048,
        max_headers in 0usize..80,
    ) {
        let limits = ResponseLimits { max_response_bytes: max_bytes, max_headers };
        match webmks().parse_response(&buf, &limits) {
            Ok(Some((_, n))) => prop_assert!(n <= buf.len() && n <= max_bytes),
            Ok(None) => prop_assert!(buf.len() < max_bytes),
            Err(e) => prop_assert_eq!(e.side(), Side::Backend),
        }
    }

    #[test]
    fn mutated_answers_never_panic(pos in 0usize..200, byte in any::<u8>()) {
        let mut buf = good_response("").into_bytes();
        let at = pos % buf.len();
        buf[at] = byte;
        let _ = webmks().parse_response(&buf, &LIMITS);
    }

    /// Any parsed URL and options make a request our server parser accepts
    /// with the same path, host and offers, and its answer is accepted.
    #[test]
    fn requests_round_trip_through_our_server(
        host in "[a-z]{1,10}(\\.[a-z]{1,5}){0,2}",
        port in prop::option::of(1u16..),
        path in "(/[A-Za-z0-9._~-]{0,8}){0,3}",
        query in prop::option::of("[a-z0-9=&]{0,12}"),
        protocols in prop::collection::vec("[a-z][a-z0-9.-]{0,8}", 0..3),
        origin in prop::option::of("https://[a-z]{1,8}"),
        nonce in any::<[u8; 16]>(),
        chosen in any::<prop::sample::Index>(),
    ) {
        let authority = port.map_or(host.clone(), |p| format!("{host}:{p}"));
        let query_part = query.as_ref().map_or(String::new(), |q| format!("?{q}"));
        let target = url(&format!("wss://{authority}{path}{query_part}"));
        let options = ClientOptions { protocols: protocols.clone(), require_protocol: false, origin: origin.clone() };
        let mut request = Vec::new();
        let hs = write_client_request_with_key(&mut request, &target, &options, nonce).unwrap();
        let limits = RequestLimits { max_request_bytes: 8192, max_headers: 32 };
        let Ok(Some((Request::Upgrade(up), n))) = parse_request(&request, &limits) else {
            return Err(TestCaseError::fail("our server refused our request"));
        };
        prop_assert_eq!(n, request.len());
        let expected_path = if path.is_empty() { "/".to_owned() } else { path.clone() };
        prop_assert_eq!(up.path, expected_path);
        prop_assert_eq!(up.query, query);
        prop_assert_eq!(up.host, Some(target.host_header()));
        prop_assert_eq!(up.origin, origin);
        prop_assert_eq!(&up.protocols, &protocols);
        let choice = (!protocols.is_empty()).then(|| protocols[chosen.index(protocols.len())].as_str());
        let mut response = Vec::new();
        write_upgrade_response(&mut response, &up.key, choice);
        let (accepted, _) = hs.parse_response(&response, &LIMITS).unwrap().unwrap();
        prop_assert_eq!(accepted.protocol.as_deref(), choice);
    }
}

#[test]
fn every_error_has_a_distinct_kind_a_side_and_a_status() {
    let all = [
        HttpError::Malformed(String::new()),
        HttpError::TooLarge,
        HttpError::MethodNotAllowed,
        HttpError::NotHttp11,
        HttpError::BadUpgrade(""),
        HttpError::UnsupportedVersion,
        HttpError::BadKey,
        HttpError::MissingHost,
        HttpError::BodyNotAllowed,
        HttpError::NoSupportedSubprotocol,
        HttpError::ResponseMalformed(String::new()),
        HttpError::ResponseTooLarge,
        HttpError::UpgradeRefused {
            status: 500,
            body: String::new(),
        },
        HttpError::ResponseNotHttp11,
        HttpError::BadUpgradeResponse(""),
        HttpError::AcceptMismatch,
        HttpError::UnexpectedSubprotocol(String::new()),
        HttpError::MissingSubprotocol,
        HttpError::UnexpectedExtensions(String::new()),
        HttpError::UrlScheme,
        HttpError::UrlUserinfo,
        HttpError::UrlFragment,
        HttpError::UrlPort,
        HttpError::UrlHost(""),
        HttpError::UrlPath,
        HttpError::UrlTooLong,
        HttpError::BadClientOption(""),
        HttpError::RandomUnavailable(getrandom::Error::UNSUPPORTED),
    ];
    let mut kinds: Vec<&str> = all.iter().map(HttpError::kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(kinds.len(), all.len());
    for e in &all {
        assert!(e
            .kind()
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
        let expected_status = match e.side() {
            Side::Browser => e.status(), // the request-specific statuses, tested elsewhere
            Side::Backend => 502,
            Side::Target => 400,
            Side::Internal => 500,
        };
        assert_eq!(e.status(), expected_status, "{e:?}");
        if e.side() == Side::Backend {
            assert!(e.to_string().starts_with("backend"), "{e}");
        }
        if e.side() == Side::Target {
            assert!(e.to_string().starts_with("target URL"), "{e}");
        }
    }
}
