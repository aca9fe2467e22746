//! `ws://` and `wss://` target URLs (RFC 6455 §3), such as a WebMKS ticket's
//! `wss://host:port/ticket/T`, parsed into what a client connection needs:
//! TLS or not, the host (a DNS name usable as a TLS server name, or an IP
//! literal), the port, and the request target.
//!
//! Strict on purpose, since the URL comes from an API caller or a
//! hypervisor: no user information, no fragment, no percent-encoded or
//! non-ASCII host (international names must come as their ASCII `xn--`
//! form), no IPv6 zone, a port in 1-65535, and only RFC 3986 characters in
//! the path and query. Errors are typed ([`HttpError`]'s `Url*` variants,
//! side [`Side::Target`](super::Side::Target)) and never quote the URL, which carries a ticket;
//! `WsUrl`'s `Debug` redacts the path and query for the same reason.

use super::HttpError;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest URL accepted, in bytes. A WebMKS ticket URL is under 200 bytes;
/// 4 KiB leaves room for long query strings while keeping the request line
/// well inside any server's limit (8 KiB is common).
pub const MAX_URL_BYTES: usize = 4096;
/// Longest DNS name (RFC 1035 §2.3.4, without a trailing dot).
const MAX_DNS_NAME_BYTES: usize = 253;
/// Longest DNS label (RFC 1035 §2.3.4).
const MAX_DNS_LABEL_BYTES: usize = 63;

/// The host of a WebSocket URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlHost {
    /// A DNS name, valid as a TLS server name (SNI): ASCII letters, digits,
    /// `-` and `_`, labels of 1-63 characters not starting or ending with
    /// `-`, at most 253 in all, no trailing dot, not all-numeric at the end.
    /// Kept as written (names compare case-insensitively).
    Name(String),
    /// An IPv4 literal (sent without SNI).
    Ipv4(Ipv4Addr),
    /// An IPv6 literal, written in brackets in the URL (sent without SNI).
    Ipv6(Ipv6Addr),
}

impl fmt::Display for UrlHost {
    /// The host as it appears in a URL or `Host` header (IPv6 bracketed).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UrlHost::Name(name) => f.write_str(name),
            UrlHost::Ipv4(ip) => write!(f, "{ip}"),
            UrlHost::Ipv6(ip) => write!(f, "[{ip}]"),
        }
    }
}

/// A parsed `ws://` / `wss://` URL.
#[derive(Clone, PartialEq, Eq)]
pub struct WsUrl {
    /// `wss://`: the connection is TLS.
    pub tls: bool,
    /// The host.
    pub host: UrlHost,
    /// The port (the scheme's default, 80 or 443, when the URL has none).
    pub port: u16,
    /// The request target: path and query as written, `/` when the URL has
    /// no path. Carries the ticket: never log it.
    pub path_and_query: String,
}

impl fmt::Debug for WsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WsUrl")
            .field("tls", &self.tls)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("path_and_query", &"<redacted>")
            .finish()
    }
}

impl WsUrl {
    /// Parses and validates `url`; see the module doc for the rules.
    pub fn parse(url: &str) -> Result<WsUrl, HttpError> {
        if url.len() > MAX_URL_BYTES {
            return Err(HttpError::UrlTooLong);
        }
        let (tls, rest) = split_scheme(url)?;
        if rest.contains('#') {
            return Err(HttpError::UrlFragment);
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, target) = rest.split_at(authority_end);
        if authority.contains('@') {
            return Err(HttpError::UrlUserinfo);
        }
        let (host, port) = split_port(authority)?;
        let host = parse_host(host)?;
        let port = match port {
            None => default_port(tls),
            Some(digits) => parse_port(digits)?,
        };
        check_target(target)?;
        let path_and_query = match target {
            "" => "/".to_owned(),
            t if t.starts_with('?') => format!("/{t}"),
            t => t.to_owned(),
        };
        Ok(WsUrl {
            tls,
            host,
            port,
            path_and_query,
        })
    }

    /// The scheme's default port: 443 for `wss`, 80 for `ws`.
    pub fn default_port(&self) -> u16 {
        default_port(self.tls)
    }

    /// The `Host` header value: the host, and `:port` unless it is the
    /// scheme's default (RFC 6455 §4.1 item 4, RFC 9110 §7.2).
    pub fn host_header(&self) -> String {
        if self.port == self.default_port() {
            self.host.to_string()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The name to send as TLS SNI: the host name, or `None` for an IP
    /// literal (RFC 6066 §3: literals are not sent).
    pub fn server_name(&self) -> Option<&str> {
        match &self.host {
            UrlHost::Name(name) => Some(name),
            UrlHost::Ipv4(_) | UrlHost::Ipv6(_) => None,
        }
    }
}

fn default_port(tls: bool) -> u16 {
    if tls {
        443
    } else {
        80
    }
}

/// `ws://` or `wss://` (ASCII case-insensitive), and the rest.
fn split_scheme(url: &str) -> Result<(bool, &str), HttpError> {
    let (scheme, rest) = url.split_once("://").ok_or(HttpError::UrlScheme)?;
    if scheme.eq_ignore_ascii_case("wss") {
        Ok((true, rest))
    } else if scheme.eq_ignore_ascii_case("ws") {
        Ok((false, rest))
    } else {
        Err(HttpError::UrlScheme)
    }
}

/// Splits `host[:port]` or `[v6][:port]` into the host text (brackets
/// kept) and the port digits if a `:` is there.
fn split_port(authority: &str) -> Result<(&str, Option<&str>), HttpError> {
    if authority.starts_with('[') {
        let close = authority
            .find(']')
            .ok_or(HttpError::UrlHost("unclosed '[' in an IPv6 literal"))?;
        let (host, after) = authority.split_at(close + 1);
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(port) => Ok((host, Some(port))),
                None => Err(HttpError::UrlHost("text after an IPv6 literal")),
            },
        };
    }
    Ok(match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

/// 1-65535, decimal digits only (leading zeros allowed, as RFC 3986 does).
fn parse_port(digits: &str) -> Result<u16, HttpError> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::UrlPort);
    }
    match digits.trim_start_matches('0').parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(HttpError::UrlPort),
    }
}

fn parse_host(host: &str) -> Result<UrlHost, HttpError> {
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or(HttpError::UrlHost("unclosed '[' in an IPv6 literal"))?;
        return inner
            .parse::<Ipv6Addr>()
            .map(UrlHost::Ipv6)
            .map_err(|_| HttpError::UrlHost("invalid IPv6 literal (zones are not supported)"));
    }
    if host.is_empty() {
        return Err(HttpError::UrlHost("empty host"));
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(UrlHost::Ipv4(ip));
    }
    check_dns_name(host)?;
    Ok(UrlHost::Name(host.to_owned()))
}

/// A DNS name usable as a TLS server name; see [`UrlHost::Name`].
fn check_dns_name(name: &str) -> Result<(), HttpError> {
    if name.len() > MAX_DNS_NAME_BYTES {
        return Err(HttpError::UrlHost("name longer than 253 characters"));
    }
    if name.ends_with('.') {
        return Err(HttpError::UrlHost("name with a trailing dot"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > MAX_DNS_LABEL_BYTES {
            return Err(HttpError::UrlHost("empty or over-long label in a name"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(HttpError::UrlHost(
                "character not allowed in a name (use the xn-- form of international names)",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(HttpError::UrlHost("label starting or ending with '-'"));
        }
    }
    // "10.0.0.256" or "1.2.3" look like IPv4 but are not valid addresses;
    // taking them for names would send them to DNS.
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::UrlHost("invalid IPv4 address"));
    }
    Ok(())
}

/// The path and query: RFC 3986 `pchar`s, `/` and `?`, with every `%`
/// followed by two hex digits. Keeps control characters, spaces and
/// quotes out of the request line.
fn check_target(target: &str) -> Result<(), HttpError> {
    let bytes = target.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |at: usize| bytes.get(at).is_some_and(u8::is_ascii_hexdigit);
                if !(hex(i + 1) && hex(i + 2)) {
                    return Err(HttpError::UrlPath);
                }
                i += 3;
                continue;
            }
            b if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&b) => {}
            _ => return Err(HttpError::UrlPath),
        }
        i += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Side;
    use super::*;
    use proptest::prelude::*;

    fn parse(url: &str) -> WsUrl {
        WsUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn err(url: &str) -> HttpError {
        match WsUrl::parse(url) {
            Err(e) => e,
            Ok(u) => panic!("{url} parsed as {u:?}"),
        }
    }

    #[test]
    fn webmks_ticket_urls() {
        let u = parse("wss://esx01.lab.example:443/ticket/52ab3c?x=1");
        assert_eq!(
            u,
            WsUrl {
                tls: true,
                host: UrlHost::Name("esx01.lab.example".into()),
                port: 443,
                path_and_query: "/ticket/52ab3c?x=1".into()
            }
        );
        assert_eq!(u.host_header(), "esx01.lab.example");
        assert_eq!(u.server_name(), Some("esx01.lab.example"));
        let u = parse("wss://10.0.0.5:902/ticket/T");
        assert_eq!(u.host, UrlHost::Ipv4(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(
            (u.port, u.host_header(), u.server_name()),
            (902, "10.0.0.5:902".into(), None)
        );
        let u = parse("WSS://[fe80::1]:8443/ticket/T");
        assert_eq!(u.host, UrlHost::Ipv6("fe80::1".parse().unwrap()));
        assert_eq!(u.host_header(), "[fe80::1]:8443");
        let u = parse("wss://[::1]");
        assert_eq!(
            (u.port, u.host_header(), u.path_and_query.as_str()),
            (443, "[::1]".into(), "/")
        );
    }

    #[test]
    fn default_ports_and_targets() {
        let u = parse("ws://host");
        assert_eq!(
            (u.tls, u.port, u.host_header(), u.path_and_query.as_str()),
            (false, 80, "host".into(), "/")
        );
        assert_eq!(parse("ws://host:80/").host_header(), "host");
        assert_eq!(parse("ws://host:443/").host_header(), "host:443");
        assert_eq!(parse("wss://host:80/").host_header(), "host:80");
        assert_eq!(parse("ws://host:0080/").port, 80);
        assert_eq!(parse("ws://host?a=b").path_and_query, "/?a=b");
        assert_eq!(
            parse("ws://h/a%2Fb/~x;y=1?q=%20&r=:@").path_and_query,
            "/a%2Fb/~x;y=1?q=%20&r=:@"
        );
        assert_eq!(
            parse("ws://under_score.example/").host,
            UrlHost::Name("under_score.example".into())
        );
        assert_eq!(parse("ws://localhost:65535/").port, 65535);
    }

    #[test]
    fn errors_are_typed_and_never_quote_the_url() {
        let cases: &[(&str, &str)] = &[
            ("https://host/", "url_scheme"),
            ("host/ticket", "url_scheme"),
            ("ws:/host", "url_scheme"),
            ("wss://user:secret@host/", "url_userinfo"),
            ("wss://host/ticket#frag", "url_fragment"),
            ("wss://host:0/", "url_port"),
            ("wss://host:65536/", "url_port"),
            ("wss://host:/", "url_port"),
            ("wss://host:+1/", "url_port"),
            ("wss://host:1x/", "url_port"),
            ("wss://[::1]:/", "url_port"),
            ("wss:///ticket", "url_host"),
            ("wss://[::1/", "url_host"),
            ("wss://[::1]x/", "url_host"),
            ("wss://[fe80::1%25eth0]/", "url_host"),
            ("wss://[1.2.3.4]/", "url_host"),
            ("wss://host.example./", "url_host"),
            ("wss://-host/", "url_host"),
            ("wss://host-.example/", "url_host"),
            ("wss://a..b/", "url_host"),
            ("wss://ex ample/", "url_host"),
            ("wss://exämple.com/", "url_host"),
            ("wss://ex%41mple.com/", "url_host"),
            ("wss://1.2.3/", "url_host"),
            ("wss://10.0.0.256/", "url_host"),
            ("wss://h/a b", "url_path"),
            ("wss://h/a\r\nX: y", "url_path"),
            ("wss://h/%zz", "url_path"),
            ("wss://h/%4", "url_path"),
            ("wss://h/\"quoted\"", "url_path"),
            ("wss://h/é", "url_path"),
        ];
        for (url, kind) in cases {
            let e = err(url);
            assert_eq!(e.kind(), *kind, "{url}: {e}");
            assert_eq!((e.side(), e.status()), (Side::Target, 400));
            assert!(!e.to_string().contains("secret") && !e.to_string().contains("ticket"));
        }
        let long = format!("wss://h/{}", "a".repeat(MAX_URL_BYTES));
        assert_eq!(err(&long), HttpError::UrlTooLong);
        assert_eq!(
            err(&format!("wss://{}.example/", "a".repeat(64))).kind(),
            "url_host"
        );
        let name = vec!["a".repeat(63); 4].join(".");
        assert_eq!(name.len(), 255);
        assert_eq!(err(&format!("wss://{name}/")).kind(), "url_host");
    }

    #[test]
    fn debug_redacts_the_ticket() {
        let u = parse("wss://h:9443/ticket/SECRET");
        let shown = format!("{u:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("9443") && shown.contains("<redacted>"));
    }

    #[test]
    fn names_we_accept_are_valid_tls_server_names() {
        for url in [
            "wss://a/",
            "wss://esx01.lab.example/",
            "wss://xn--bcher-kva.example/",
            "wss://under_score.example/",
            "wss://1a.example/",
            "wss://host.123abc/",
        ] {
            let u = parse(url);
            let name = u.server_name().unwrap().to_owned();
            assert!(
                rustls::pki_types::ServerName::try_from(name.clone()).is_ok(),
                "{name}"
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s in "\\PC{0,80}", pre in prop_oneof![Just("ws://"), Just("wss://"), Just("")]) {
            let url = format!("{pre}{s}");
            if let Ok(u) = WsUrl::parse(&url) {
                // Whatever parses makes a clean request line and Host.
                prop_assert!(u.path_and_query.starts_with('/'));
                prop_assert!(u.path_and_query.bytes().all(|b| b.is_ascii_graphic()));
                prop_assert!(u.host_header().bytes().all(|b| b.is_ascii_graphic()));
                prop_assert!(u.port > 0);
                if let Some(name) = u.server_name() {
                    prop_assert!(rustls::pki_types::ServerName::try_from(name.to_owned()).is_ok(), "{}", name);
                }
            }
        }

        #[test]
        fn built_urls_round_trip(
            tls in any::<bool>(),
            labels in prop::collection::vec("[a-z0-9]([a-z0-9_-]{0,10}[a-z0-9])?", 1..4),
            port in prop::option::of(1u16..),
            path in "(/[A-Za-z0-9._~%-]{0,12}){0,4}(\\?[a-z=&0-9]{0,10})?",
        ) {
            prop_assume!(!labels.last().unwrap().bytes().all(|b| b.is_ascii_digit()));
            let path = path.replace('%', "%25");
            let host = labels.join(".");
            let scheme = if tls { "wss" } else { "ws" };
            let url = match port {
                Some(p) => format!("{scheme}://{host}:{p}{path}"),
                None => format!("{scheme}://{host}{path}"),
            };
            let u = WsUrl::parse(&url).unwrap();
            prop_assert_eq!(u.tls, tls);
            prop_assert_eq!(u.host, UrlHost::Name(host.clone()));
            prop_assert_eq!(u.port, port.unwrap_or(if tls { 443 } else { 80 }));
            let expected = if path.is_empty() { "/".to_owned() } else if path.starts_with('?') { format!("/{path}") } else { path.clone() };
            prop_assert_eq!(u.path_and_query, expected);
        }
    }
}
