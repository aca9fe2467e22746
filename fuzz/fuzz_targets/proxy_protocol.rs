//! Fuzzes the PROXY protocol parser (`protocol::proxy_protocol::parse` and
//! `detect`), what a console-port session runs on the first bytes a
//! trusted load balancer sends, and the `X-Forwarded-For` reader
//! (`dataplane::client_limits::forwarded_client`).
//!
//! Checks, besides "no panic": a header consumes at most the input and at
//! most `V1_MAX_BYTES` (v1) or `V2_MAX_BYTES` (v2); the bytes after it are
//! never looked at (the header alone parses the same); every shorter
//! prefix of a complete header is "incomplete", never an error (a header
//! split across reads must not be refused); an error is never reported for
//! fewer bytes than `detect` needs; `detect` agrees with `parse` on what
//! is a header; a v1 header written back by `encode_v1` parses to the same
//! addresses; the forwarded client, when found, is one of the header's
//! entries.
//!
//! Input layout: 1 byte where to cut a prefix, then the bytes.
#![no_main]

use consolegate::dataplane::client_limits::forwarded_client;
use consolegate::protocol::proxy_protocol::{
    detect, encode_v1, parse, Detect, ProxyError, Version, V1_MAX_BYTES, V2_MAX_BYTES,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Some((&cut, input)) = bytes.split_first() else {
        return;
    };
    let detected = detect(input);
    match parse(input) {
        Ok(None) => assert!(
            input.len() < V2_MAX_BYTES,
            "incomplete after {} bytes",
            input.len()
        ),
        Ok(Some((header, consumed))) => {
            assert!(consumed <= input.len());
            let max = match header.version {
                Version::V1 => V1_MAX_BYTES,
                Version::V2 => V2_MAX_BYTES,
            };
            assert!(consumed <= max, "{consumed} > {max}");
            assert_eq!(detected, Detect::Header(header.version));
            let alone = parse(&input[..consumed]);
            assert_eq!(alone, Ok(Some((header, consumed))));
            let prefix = usize::from(cut) % consumed.max(1);
            assert_eq!(parse(&input[..prefix]), Ok(None), "prefix {prefix}");
            if let (Version::V1, Some(s), Some(d)) =
                (header.version, header.source, header.destination)
            {
                if s.is_ipv4() == d.is_ipv4() {
                    let again = encode_v1(s, d);
                    let (h, n) = parse(&again).unwrap().unwrap();
                    assert_eq!(
                        (h.source, h.destination, n),
                        (Some(s), Some(d), again.len())
                    );
                }
            }
        }
        Err(ProxyError::Missing) => assert_eq!(detected, Detect::NotProxy),
        Err(_) => assert!(matches!(detected, Detect::Header(_))),
    }
    if let Ok(text) = std::str::from_utf8(input) {
        let trusted = ["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        if let Some(ip) = forwarded_client(&trusted, text) {
            let found = text.split(',').any(|e| {
                let e = e.trim();
                e.parse::<std::net::IpAddr>().map(|x| x.to_canonical()) == Ok(ip)
                    || e.parse::<std::net::SocketAddr>()
                        .map(|x| x.ip().to_canonical())
                        == Ok(ip)
            });
            assert!(found, "{ip} not among {text:?}");
        }
    }
});
