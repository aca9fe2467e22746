//! Fuzzes the HTTP upgrade parser (`protocol::http_upgrade::parse_request`)
//! under varied `RequestLimits`, then what the caller does with a parsed
//! request: `choose_subprotocol`, `query_param`, the 101 response, and the
//! error response for a refused one.
//!
//! Checks, besides "no panic": consumed ≤ input length and ≤
//! `max_request_bytes`; the head alone parses to the same request (bytes
//! after it are not looked at); a shorter prefix of a complete head is
//! "incomplete", never an error (a request split across reads must not be
//! refused); a parsed request holds nothing longer than its head; the
//! subprotocol choice is one of the offers; error bodies are valid JSON that
//! carries the error's kind and message.
//!
//! Input layout: 2 bytes `max_request_bytes` (little-endian), 1 byte
//! `max_headers`, 1 byte where to cut the prefix, then the request bytes.
#![no_main]

use arbitrary::Arbitrary;
use consolegate::protocol::http_upgrade::{
    accept_key, choose_subprotocol, error_body, parse_request, query_param, write_error_response,
    write_upgrade_response, HttpError, Request, RequestLimits, Upgrade,
};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    max_request_bytes: [u8; 2],
    max_headers: u8,
    prefix_cut: u8,
    request: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    let limits = RequestLimits {
        max_request_bytes: usize::from(u16::from_le_bytes(input.max_request_bytes)),
        max_headers: usize::from(input.max_headers),
    };
    match parse_request(input.request, &limits) {
        Ok(None) => assert!(
            input.request.len() < limits.max_request_bytes,
            "an incomplete head at the size limit must be refused"
        ),
        Ok(Some((request, consumed))) => {
            check_parsed(input.request, &limits, &request, consumed, input.prefix_cut);
        }
        Err(error) => check_error(&error),
    }
});

fn check_parsed(
    buf: &[u8],
    limits: &RequestLimits,
    request: &Request,
    consumed: usize,
    prefix_cut: u8,
) {
    assert!(consumed > 0, "an empty head parsed");
    assert!(consumed <= buf.len(), "consumed past the input");
    assert!(
        consumed <= limits.max_request_bytes,
        "consumed past the limit"
    );
    // The head is self-contained: bytes after it (pipelined frames) change
    // nothing.
    let head = &buf[..consumed];
    let again = parse_request(head, limits).expect("the head alone must parse");
    assert_eq!(
        again,
        Some((request.clone(), consumed)),
        "the head alone parses differently"
    );
    // A request that arrives in two reads is parsed the same way: the first
    // read is "incomplete".
    let cut = usize::from(prefix_cut) * consumed / 256;
    assert_eq!(
        parse_request(&head[..cut], limits),
        Ok(None),
        "a prefix was not incomplete"
    );

    match request {
        Request::Get { path, query, .. } => {
            check_target(path, query.as_deref(), consumed);
        }
        Request::Upgrade(upgrade) => check_upgrade(upgrade, consumed),
    }
}

fn check_target(path: &str, query: Option<&str>, consumed: usize) {
    assert!(path.starts_with('/'), "path {path:?} is not origin-form");
    assert!(!path.contains('#') && !path.contains('?'));
    assert!(path.len() + query.map_or(0, str::len) < consumed);
    if let Some(query) = query {
        assert!(!query.contains('#'));
        // The parameter the proxy reads, and the first name in the query.
        let first = query.split('&').next().unwrap_or_default();
        let name = first.split('=').next().unwrap_or_default();
        for name in ["token", name] {
            if let Some(value) = query_param(query, name) {
                // Bad escapes stay, bad UTF-8 becomes U+FFFD (3 bytes).
                assert!(value.len() <= 3 * query.len(), "decoded value grew");
            }
        }
    }
}

fn check_upgrade(upgrade: &Upgrade, consumed: usize) {
    check_target(&upgrade.path, upgrade.query.as_deref(), consumed);
    assert!(upgrade.host.is_some(), "an upgrade without Host");
    assert_eq!(upgrade.key.len(), 24, "key is not base64 of 16 bytes");
    assert_eq!(accept_key(&upgrade.key).len(), 28);
    let strings = [&upgrade.host, &upgrade.origin, &upgrade.forwarded_for];
    for s in strings.into_iter().flatten() {
        assert!(s.len() < consumed);
    }
    let offered: usize = upgrade.protocols.iter().map(String::len).sum();
    assert!(
        offered < consumed,
        "more subprotocol bytes than the head holds"
    );
    assert!(upgrade.protocols.iter().all(|p| !p.is_empty()));
    let choice = choose_subprotocol(&upgrade.protocols);
    match choice {
        Ok(None) => assert!(upgrade.protocols.is_empty()),
        Ok(Some(p)) => {
            assert!(
                upgrade.protocols.iter().any(|o| o == p),
                "chose {p} not offered"
            );
        }
        Err(ref e) => {
            assert_eq!(*e, HttpError::NoSupportedSubprotocol);
            assert!(!upgrade
                .protocols
                .iter()
                .any(|o| o == "binary" || o == "base64"));
        }
    }
    let mut response = Vec::new();
    write_upgrade_response(&mut response, &upgrade.key, choice.ok().flatten());
    assert!(response.starts_with(b"HTTP/1.1 101 "));
    assert!(response.ends_with(b"\r\n\r\n"));
}

fn check_error(error: &HttpError) {
    let status = error.status();
    assert!((400..=505).contains(&status), "status {status}");
    let message = error.to_string();
    let body = error_body(error.kind(), &message);
    let json: serde_json::Value = serde_json::from_str(&body).expect("error body is not JSON");
    assert_eq!(json["error"]["code"], error.kind());
    assert_eq!(json["error"]["message"], message.as_str());
    let mut response = Vec::new();
    write_error_response(&mut response, status, error.kind(), &message, &[]);
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response has a head");
    // The message can carry request bytes: it must stay in the body.
    let head = String::from_utf8_lossy(&response[..split]);
    for line in head.split("\r\n") {
        assert!(
            !line.contains(['\r', '\n']),
            "a bare CR or LF in the response head"
        );
    }
    assert_eq!(
        &response[split + 4..],
        body.as_bytes(),
        "body differs from error_body"
    );
}
