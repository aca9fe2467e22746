//! Fuzzes the client role of the WebSocket upgrade: `WsUrl::parse` of a
//! target URL, the request `write_client_request_with_key` builds for it,
//! and `ClientHandshake::parse_response` of the backend's answer (status,
//! `Upgrade`/`Connection`, `Sec-WebSocket-Accept` against our key, the
//! subprotocol and extension checks) under varied `ResponseLimits`.
//!
//! Checks, besides "no panic":
//! - a URL that parses is at most `MAX_URL_BYTES`, its target starts with
//!   `/` and is visible ASCII, its port is not 0, SNI is sent for names
//!   only, and written back as `ws[s]://host[:port]target` it parses to the
//!   same URL;
//! - the request we write for it is accepted by our own server-side parser
//!   (`parse_request`) as an upgrade with our key, target and offers;
//! - the 101 our own server writes (`write_upgrade_response`) for that key
//!   and an offered subprotocol is accepted, choosing it;
//! - on the fuzzed answer: "incomplete" only below `max_response_bytes`;
//!   an accepted head is within the input and the limit, is a 101 over
//!   HTTP/1.1 carrying the accept value of our key, chose an offered
//!   subprotocol (or none, when allowed), parses the same alone, and each
//!   shorter prefix of it is "incomplete" (an answer split across reads is
//!   not refused); every error blames the backend (502) and its message,
//!   which goes to the log, holds no control character.
//!
//! Input layout: `flags` (bits 0-1 the offered subprotocols, bit 2
//! require_protocol, bit 3 an Origin), 16 bytes of key nonce, 2 bytes
//! `max_response_bytes` (little-endian), 1 byte `max_headers`, 1 byte where
//! to cut a prefix, 1 byte URL length, the URL, then the response.
#![no_main]

use consolegate::protocol::http_upgrade::{
    accept_key, parse_request, write_client_request_with_key, write_upgrade_response,
    ClientHandshake, ClientOptions, HttpError, Request, RequestLimits, ResponseLimits, Side,
    UrlHost, WsUrl,
};
use libfuzzer_sys::fuzz_target;

/// Bytes before the URL.
const HEADER_BYTES: usize = 22;
/// The URL used when the fuzzed one does not parse.
const FALLBACK_URL: &str = "wss://esx-01.example.com/ticket/0123456789abcdef";
/// Offered subprotocol sets (`flags & 3`).
const OFFERS: [&[&str]; 4] = [
    &[],
    &["binary"],
    &["binary", "base64"],
    &["vmware-vvc", "binary"],
];
/// Generous limits for our own server parser reading our request.
const SERVER_LIMITS: RequestLimits = RequestLimits {
    max_request_bytes: 65_536,
    max_headers: 64,
};

struct Input<'a> {
    flags: u8,
    nonce: [u8; 16],
    limits: ResponseLimits,
    prefix_cut: u8,
    url: &'a [u8],
    response: &'a [u8],
}

fn split(bytes: &[u8]) -> Option<Input<'_>> {
    let (header, rest) = bytes.split_at_checked(HEADER_BYTES)?;
    let url_len = usize::from(header[21]).min(rest.len());
    let (url, response) = rest.split_at(url_len);
    Some(Input {
        flags: header[0],
        nonce: header[1..17].try_into().ok()?,
        limits: ResponseLimits {
            max_response_bytes: usize::from(u16::from_le_bytes([header[17], header[18]])),
            max_headers: usize::from(header[19]),
        },
        prefix_cut: header[20],
        url,
        response,
    })
}

fuzz_target!(|bytes: &[u8]| {
    let Some(input) = split(bytes) else {
        return;
    };
    let url = std::str::from_utf8(input.url)
        .ok()
        .and_then(|text| check_url(text).ok())
        .unwrap_or_else(|| WsUrl::parse(FALLBACK_URL).expect("the fallback URL parses"));
    let options = ClientOptions {
        protocols: OFFERS[usize::from(input.flags & 3)]
            .iter()
            .map(|p| p.to_string())
            .collect(),
        require_protocol: input.flags & 4 != 0,
        origin: (input.flags & 8 != 0).then(|| "https://portal.example.com".to_owned()),
    };
    let mut request = Vec::new();
    let handshake = match write_client_request_with_key(&mut request, &url, &options, input.nonce) {
        Ok(handshake) => handshake,
        Err(e) => {
            assert!(request.is_empty(), "a refused request wrote bytes");
            assert_eq!(e.side(), Side::Internal, "{e}");
            assert!(options.require_protocol && options.protocols.is_empty());
            return;
        }
    };
    check_request(&request, &url, &options, &handshake);
    check_own_response(&handshake, &options);
    check_response(&handshake, &options, &input);
});

/// A URL that parses must be sane and survive being written back.
fn check_url(text: &str) -> Result<WsUrl, HttpError> {
    let url = WsUrl::parse(text).inspect_err(|e| {
        assert_eq!(e.side(), Side::Target, "{e}");
        assert_eq!(e.status(), 400);
    })?;
    assert!(text.len() <= consolegate::protocol::http_upgrade::url::MAX_URL_BYTES);
    assert!(url.path_and_query.starts_with('/'));
    assert!(url.path_and_query.bytes().all(|b| b.is_ascii_graphic()));
    assert!(url.port != 0, "port 0 accepted");
    let host_header = url.host_header();
    assert!(host_header.bytes().all(|b| b.is_ascii_graphic()));
    assert_eq!(
        url.server_name().is_some(),
        matches!(url.host, UrlHost::Name(_)),
        "SNI for an IP literal, or none for a name"
    );
    let scheme = if url.tls { "wss" } else { "ws" };
    let again = format!("{scheme}://{host_header}{}", url.path_and_query);
    assert_eq!(
        WsUrl::parse(&again).as_ref(),
        Ok(&url),
        "the URL written back parses differently"
    );
    Ok(url)
}

/// Our request must be one our own server accepts, with our key and offers.
fn check_request(
    request: &[u8],
    url: &WsUrl,
    options: &ClientOptions,
    handshake: &ClientHandshake,
) {
    let (upgrade, consumed) = match parse_request(request, &SERVER_LIMITS) {
        Ok(Some((Request::Upgrade(upgrade), consumed))) => (upgrade, consumed),
        other => panic!("our own server refused our request: {other:?}"),
    };
    assert_eq!(consumed, request.len());
    assert_eq!(upgrade.key, handshake.key());
    assert_eq!(upgrade.protocols, options.protocols);
    assert_eq!(upgrade.origin, options.origin);
    assert_eq!(upgrade.host.as_deref(), Some(url.host_header().as_str()));
    let target = match &upgrade.query {
        Some(query) => format!("{}?{query}", upgrade.path),
        None => upgrade.path.clone(),
    };
    assert_eq!(target, url.path_and_query, "the target changed on the way");
}

/// The 101 our own server side writes must be accepted.
fn check_own_response(handshake: &ClientHandshake, options: &ClientOptions) {
    let chosen = options.protocols.last().map(String::as_str);
    let mut response = Vec::new();
    write_upgrade_response(&mut response, handshake.key(), chosen);
    let limits = ResponseLimits {
        max_response_bytes: 4096,
        max_headers: 64,
    };
    let (accepted, consumed) = match handshake.parse_response(&response, &limits) {
        Ok(Some(accepted)) => accepted,
        other => panic!("our own 101 was refused: {other:?}"),
    };
    assert_eq!(consumed, response.len());
    assert_eq!(accepted.protocol.as_deref(), chosen);
}

fn check_response(handshake: &ClientHandshake, options: &ClientOptions, input: &Input<'_>) {
    let limits = &input.limits;
    let response = input.response;
    match handshake.parse_response(response, limits) {
        Ok(None) => assert!(
            response.len() < limits.max_response_bytes,
            "an incomplete head at the size limit must be refused"
        ),
        Ok(Some((accepted, consumed))) => {
            assert!(consumed > 0 && consumed <= response.len());
            assert!(consumed <= limits.max_response_bytes, "read past the limit");
            let head = &response[..consumed];
            // Empty lines before the status line are skipped (as httparse
            // and RFC 9112 section 2.2's robustness rule do).
            let status_line = head
                .iter()
                .position(|&b| b != b'\r' && b != b'\n')
                .map_or(&head[..0], |at| &head[at..]);
            assert!(
                status_line.starts_with(b"HTTP/1.1 101"),
                "accepted a non-101"
            );
            let accept = accept_key(handshake.key());
            assert!(
                head.windows(accept.len()).any(|w| w == accept.as_bytes()),
                "accepted without our accept value"
            );
            match &accepted.protocol {
                Some(p) => assert!(options.protocols.contains(p), "chose {p} not offered"),
                None => assert!(!options.require_protocol, "no subprotocol accepted"),
            }
            let again = handshake.parse_response(head, limits);
            assert_eq!(
                again,
                Ok(Some((accepted, consumed))),
                "the head alone differs"
            );
            let cut = usize::from(input.prefix_cut) * consumed / 256;
            assert_eq!(
                handshake.parse_response(&head[..cut], limits),
                Ok(None),
                "a prefix of an accepted head was not incomplete"
            );
        }
        Err(e) => {
            assert_eq!(e.side(), Side::Backend, "{e}");
            assert_eq!(e.status(), 502);
            let message = e.to_string();
            assert!(
                !message.chars().any(char::is_control),
                "a control character in a log message: {message:?}"
            );
        }
    }
}
