//! Sans-IO HTTP/1.1 upgrade to WebSocket (RFC 6455 §4), both roles.
//!
//! Server role (the browser leg, this file): parsing the one request a
//! browser sends before a WebSocket session, plus plain `GET`/`HEAD`
//! requests for the static files served with `--web`, and the few responses
//! we write back. Client role (the backend leg of a WebSocket backend such
//! as a WebMKS host, [`client`]): the upgrade request we send and a
//! streaming parser of the server's answer, which checks
//! `Sec-WebSocket-Accept`, the chosen subprotocol and that no extension was
//! negotiated; and [`url`], the parser of `ws://` / `wss://` target URLs.
//!
//! Bytes in, typed values or typed errors out: this module touches no socket,
//! clock, file or runtime, allocates only for the values it returns, and never
//! panics on input (proptests feed it arbitrary bytes). Every error says
//! which side failed ([`HttpError::side`]). It depends on no other
//! consolegate module but `protocol::Side`, so that the IO backends, the
//! fuzzers and the tests can all drive it directly.
//!
//! What it deliberately does not do: keep-alive, request or response bodies,
//! chunked encoding, absolute-form targets, redirects, or anything after the
//! first request. The proxy answers exactly one request per connection, then
//! either switches to WebSocket framing or closes; as a client it sends one
//! request and switches or fails.

pub mod client;
pub mod url;

pub use super::Side;
pub use client::{
    write_client_request, write_client_request_with_key, Accepted, ClientHandshake, ClientOptions,
    ResponseLimits,
};
pub use url::{UrlHost, WsUrl};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

/// Hard upper bound on the header slots we hand to httparse. The slots live
/// on the stack (one `httparse::Header` is two fat pointers, 32 bytes), so
/// 64 of them cost 2 KiB per parse; browsers send 10–20 headers for an
/// upgrade. A configured `max_headers` above this is clamped to it.
pub const MAX_HEADERS_CAP: usize = 64;

/// The GUID RFC 6455 §1.3 appends to the key before hashing.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Limits applied while parsing one request. Both come from config.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest request head (request line plus headers), in bytes. A buffer
    /// that reaches this length without a complete head is rejected with 431,
    /// so a slow or hostile client can pin at most this much memory.
    pub max_request_bytes: usize,
    /// Largest number of header lines; clamped to [`MAX_HEADERS_CAP`].
    pub max_headers: usize,
}

/// A validated WebSocket upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// Raw request path (still percent-encoded), without the query.
    pub path: String,
    /// Raw query string without the leading `?`; `None` when there is no `?`.
    pub query: Option<String>,
    /// `Host` header. Always `Some` for an upgrade (a missing Host is an
    /// error); kept optional so callers need not special-case the type.
    pub host: Option<String>,
    /// `Origin` header, for the caller's origin policy.
    pub origin: Option<String>,
    /// `Sec-WebSocket-Key`, validated to be base64 of exactly 16 bytes.
    pub key: String,
    /// `Sec-WebSocket-Protocol` offers, in client order, comma-split and
    /// trimmed across repeated headers.
    pub protocols: Vec<String>,
    /// `X-Forwarded-For`, raw (repeated headers joined with ", "). For logs
    /// only: it is client-controlled and must not be trusted for policy.
    pub forwarded_for: Option<String>,
    /// `Authorization: Bearer <token>`, the token (a browser cannot set it
    /// on a WebSocket; other clients can). Redacted in `Debug`.
    pub bearer: Option<BearerToken>,
}

/// A bearer token from the request: compared and handed on, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(pub String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// One parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A WebSocket upgrade (the request carried an `Upgrade` header).
    Upgrade(Upgrade),
    /// A plain GET/HEAD (no Upgrade header): for static files (--web).
    Get {
        /// Raw request path (still percent-encoded), without the query.
        path: String,
        /// Raw query string without the leading `?`.
        query: Option<String>,
        /// True for `HEAD`: the response must carry headers only.
        head: bool,
    },
}

/// Why an upgrade failed, on either role. [`HttpError::side`] says who
/// failed: the browser (a request we refused: the variants up to
/// `NoSupportedSubprotocol`), the backend (its answer to our request), the
/// target (a bad WebSocket URL), or our side (options, randomness).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    /// The bytes are not a well-formed HTTP/1.x request head.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The head exceeded `max_request_bytes` or `max_headers`.
    #[error("request head too large")]
    TooLarge,
    /// A method other than GET/HEAD, or an upgrade attempted with HEAD.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// An upgrade over HTTP/1.0, or a version httparse does not know.
    #[error("HTTP/1.1 required")]
    NotHttp11,
    /// The upgrade headers are wrong (which one is in the message).
    #[error("bad upgrade request: {0}")]
    BadUpgrade(&'static str),
    /// `Sec-WebSocket-Version` missing or not 13.
    #[error("unsupported WebSocket version (only 13 is supported)")]
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` missing, repeated, or not base64 of 16 bytes.
    #[error("invalid Sec-WebSocket-Key")]
    BadKey,
    /// An HTTP/1.1 request without a `Host` header (RFC 9112 §3.2).
    #[error("missing Host header")]
    MissingHost,
    /// The request announced a body (`Content-Length` > 0 or
    /// `Transfer-Encoding`); we never read bodies, so accepting one would let
    /// its bytes be taken for WebSocket frames.
    #[error("request body not allowed")]
    BodyNotAllowed,
    /// The client offered subprotocols but none we speak.
    #[error("no supported subprotocol (offer \"binary\" or \"base64\")")]
    NoSupportedSubprotocol,

    // ---- the client role: the backend's answer to our upgrade request ----
    /// The backend's bytes are not a well-formed HTTP/1.x response head.
    #[error("backend sent a malformed upgrade response: {0}")]
    ResponseMalformed(String),
    /// The backend's response head exceeded the size or header-count limit.
    #[error("backend sent an upgrade response head over the size limit")]
    ResponseTooLarge,
    /// The backend answered with a status other than 101. `body` is the
    /// start of the body as far as it had arrived, escaped for logs.
    #[error("backend refused the upgrade with status {status} (body: \"{body}\")")]
    UpgradeRefused {
        /// The response status.
        status: u16,
        /// Up to [`client::MAX_BODY_EXCERPT_BYTES`] bytes of the body,
        /// ASCII-escaped.
        body: String,
    },
    /// The backend answered 101 over a version other than HTTP/1.1.
    #[error("backend switched protocols over HTTP/1.0 (RFC 6455 requires HTTP/1.1)")]
    ResponseNotHttp11,
    /// The backend's 101 lacks `Upgrade: websocket` or `Connection: Upgrade`,
    /// or repeats a single-valued WebSocket header (which one is said).
    #[error("backend sent a bad upgrade response: {0}")]
    BadUpgradeResponse(&'static str),
    /// `Sec-WebSocket-Accept` missing or not the hash of our key (RFC 6455
    /// §4.1: the client must fail the connection).
    #[error("backend's Sec-WebSocket-Accept does not match our key")]
    AcceptMismatch,
    /// The backend chose a subprotocol we did not offer (escaped).
    #[error("backend chose subprotocol \"{0}\", which was not offered")]
    UnexpectedSubprotocol(String),
    /// The backend chose no subprotocol although one is required.
    #[error("backend chose no subprotocol, but one is required")]
    MissingSubprotocol,
    /// The backend negotiated extensions; we offer none (escaped value).
    #[error("backend negotiated extensions that were not offered: \"{0}\"")]
    UnexpectedExtensions(String),

    // ---- the target: a ws:// or wss:// URL ----
    /// Not `ws://` or `wss://`.
    #[error("target URL must start with ws:// or wss://")]
    UrlScheme,
    /// `user:password@` in the authority (never sent, never accepted).
    #[error("target URL must not carry user information")]
    UrlUserinfo,
    /// A `#fragment` (meaningless for WebSocket URLs, RFC 6455 §3).
    #[error("target URL must not have a fragment")]
    UrlFragment,
    /// A port that is empty, not a number, or outside 1-65535.
    #[error("target URL has an invalid port (1-65535)")]
    UrlPort,
    /// A host that is neither an IP literal nor a valid DNS name usable as
    /// a TLS server name (why is in the message).
    #[error("target URL has an invalid host: {0}")]
    UrlHost(&'static str),
    /// A path or query character outside RFC 3986's, or a bad `%` escape.
    #[error("target URL has an invalid character or escape in its path or query")]
    UrlPath,
    /// Longer than [`url::MAX_URL_BYTES`].
    #[error("target URL is too long")]
    UrlTooLong,

    // ---- our side ----
    /// A client option is unusable (a subprotocol that is not a token, an
    /// Origin with control characters): a configuration error.
    #[error("invalid WebSocket client option: {0}")]
    BadClientOption(&'static str),
    /// The operating system's random number generator failed, so no
    /// `Sec-WebSocket-Key` can be made.
    #[error("the operating system's random number generator failed: {0}")]
    RandomUnavailable(getrandom::Error),
}

impl HttpError {
    /// HTTP status code to answer with: for the browser's errors, the
    /// answer to its request; for the backend's, 502 (a gateway's answer to
    /// a bad upstream); for a bad target URL, 400 (the caller's request);
    /// for our side, 500.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::TooLarge => 431,
            HttpError::MethodNotAllowed => 405,
            HttpError::NotHttp11 => 505,
            HttpError::UnsupportedVersion => 426,
            _ => match self.side() {
                Side::Browser | Side::Target => 400,
                Side::Backend => 502,
                Side::Internal => 500,
            },
        }
    }

    /// Which side failed.
    pub fn side(&self) -> Side {
        match self {
            HttpError::Malformed(_)
            | HttpError::TooLarge
            | HttpError::MethodNotAllowed
            | HttpError::NotHttp11
            | HttpError::BadUpgrade(_)
            | HttpError::UnsupportedVersion
            | HttpError::BadKey
            | HttpError::MissingHost
            | HttpError::BodyNotAllowed
            | HttpError::NoSupportedSubprotocol => Side::Browser,
            HttpError::ResponseMalformed(_)
            | HttpError::ResponseTooLarge
            | HttpError::UpgradeRefused { .. }
            | HttpError::ResponseNotHttp11
            | HttpError::BadUpgradeResponse(_)
            | HttpError::AcceptMismatch
            | HttpError::UnexpectedSubprotocol(_)
            | HttpError::MissingSubprotocol
            | HttpError::UnexpectedExtensions(_) => Side::Backend,
            HttpError::UrlScheme
            | HttpError::UrlUserinfo
            | HttpError::UrlFragment
            | HttpError::UrlPort
            | HttpError::UrlHost(_)
            | HttpError::UrlPath
            | HttpError::UrlTooLong => Side::Target,
            HttpError::BadClientOption(_) | HttpError::RandomUnavailable(_) => Side::Internal,
        }
    }

    /// Stable snake_case name, for metric labels and the JSON error `code`.
    pub fn kind(&self) -> &'static str {
        match self {
            HttpError::Malformed(_) => "malformed",
            HttpError::TooLarge => "too_large",
            HttpError::MethodNotAllowed => "method_not_allowed",
            HttpError::NotHttp11 => "not_http11",
            HttpError::BadUpgrade(_) => "bad_upgrade",
            HttpError::UnsupportedVersion => "unsupported_version",
            HttpError::BadKey => "bad_key",
            HttpError::MissingHost => "missing_host",
            HttpError::BodyNotAllowed => "body_not_allowed",
            HttpError::NoSupportedSubprotocol => "no_supported_subprotocol",
            HttpError::ResponseMalformed(_) => "response_malformed",
            HttpError::ResponseTooLarge => "response_too_large",
            HttpError::UpgradeRefused { .. } => "upgrade_refused",
            HttpError::ResponseNotHttp11 => "response_not_http11",
            HttpError::BadUpgradeResponse(_) => "bad_upgrade_response",
            HttpError::AcceptMismatch => "accept_mismatch",
            HttpError::UnexpectedSubprotocol(_) => "unexpected_subprotocol",
            HttpError::MissingSubprotocol => "missing_subprotocol",
            HttpError::UnexpectedExtensions(_) => "unexpected_extensions",
            HttpError::UrlScheme => "url_scheme",
            HttpError::UrlUserinfo => "url_userinfo",
            HttpError::UrlFragment => "url_fragment",
            HttpError::UrlPort => "url_port",
            HttpError::UrlHost(_) => "url_host",
            HttpError::UrlPath => "url_path",
            HttpError::UrlTooLong => "url_too_long",
            HttpError::BadClientOption(_) => "bad_client_option",
            HttpError::RandomUnavailable(_) => "random_unavailable",
        }
    }
}

/// Parse one request from the start of `buf`.
///
/// * `Ok(None)`: the head is incomplete; call again with more bytes.
/// * `Ok(Some((request, consumed)))`: `consumed` is the length of the head.
///   Bytes after it belong to the next protocol (a client may pipeline its
///   first WebSocket frames) and are the caller's.
/// * `Err(_)`: answer with [`write_error_response`] and close.
///
/// Only the first `max_request_bytes` of `buf` are ever looked at, so the
/// cost of one call is bounded; re-parsing from the start on every read is
/// O(max_request_bytes) per call, which the handshake timeout bounds overall.
pub fn parse_request(
    buf: &[u8],
    limits: &RequestLimits,
) -> Result<Option<(Request, usize)>, HttpError> {
    // A TLS ClientHello on a plain port is the commonest "not HTTP" input;
    // say so instead of "invalid token", since the fix is on the client URL.
    if buf.first() == Some(&0x16) {
        return Err(HttpError::Malformed(
            "TLS handshake received on a plain-HTTP listener".to_owned(),
        ));
    }
    let window = &buf[..buf.len().min(limits.max_request_bytes)];
    let slots = limits.max_headers.min(MAX_HEADERS_CAP);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
    let mut req = httparse::Request::new(&mut headers[..slots]);
    let consumed = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= limits.max_request_bytes {
                Err(HttpError::TooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooLarge),
        Err(httparse::Error::Version) => {
            // Only a real "HTTP/x.y" of another version earns 505; garbage in
            // the version slot is a malformed request (websockify says 400).
            let line = window.split(|&b| b == b'\n').next().unwrap_or_default();
            let is_http = line
                .split(|&b| b == b' ')
                .nth(2)
                .is_some_and(|v| v.starts_with(b"HTTP/"));
            return Err(if is_http {
                HttpError::NotHttp11
            } else {
                HttpError::Malformed("not an HTTP request line".to_owned())
            });
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    // httparse fills all three on Complete; treat absence as malformed rather
    // than unwrap, so a future httparse change cannot turn into a panic.
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(HttpError::Malformed("incomplete request line".to_owned()));
    };
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err(HttpError::MethodNotAllowed),
    };
    let (path, query) = split_target(target)?;
    let h = Headers::collect(req.headers)?;

    if h.transfer_encoding || h.content_length > 0 {
        return Err(HttpError::BodyNotAllowed);
    }
    if minor == 1 && h.host.is_none() {
        return Err(HttpError::MissingHost);
    }

    let Some(upgrade) = h.upgrade else {
        return Ok(Some((Request::Get { path, query, head }, consumed)));
    };
    // RFC 6455 §4.2.1 lists the checks in this order; we follow it so the
    // error a broken client sees is the first thing it got wrong.
    if head {
        return Err(HttpError::MethodNotAllowed);
    }
    if minor != 1 {
        return Err(HttpError::NotHttp11);
    }
    if !header_has_token(&upgrade, "websocket") {
        return Err(HttpError::BadUpgrade("Upgrade header is not \"websocket\""));
    }
    if !h.connection.iter().any(|v| header_has_token(v, "upgrade")) {
        return Err(HttpError::BadUpgrade(
            "Connection header lacks the \"upgrade\" token",
        ));
    }
    if h.version.as_deref() != Some("13") {
        return Err(HttpError::UnsupportedVersion);
    }
    let key = match h.key {
        Some(k) if key_is_valid(&k) => k,
        _ => return Err(HttpError::BadKey),
    };
    Ok(Some((
        Request::Upgrade(Upgrade {
            path,
            query,
            host: h.host,
            origin: h.origin,
            key,
            protocols: h.protocols,
            forwarded_for: h.forwarded_for,
            bearer: h.bearer,
        }),
        consumed,
    )))
}

/// Split an origin-form request target into raw path and raw query.
fn split_target(target: &str) -> Result<(String, Option<String>), HttpError> {
    // Only origin-form ("/path?query") is meaningful for us: absolute-form is
    // for forward proxies and "*" for OPTIONS, neither of which we are.
    if !target.starts_with('/') {
        return Err(HttpError::Malformed(
            "request target must start with '/'".to_owned(),
        ));
    }
    // A fragment is never sent by a conforming client; drop it so it cannot
    // leak into a path or a token.
    let target = target.split('#').next().unwrap_or(target);
    Ok(match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    })
}

/// The headers we care about, gathered in one pass.
#[derive(Default)]
struct Headers {
    host: Option<String>,
    origin: Option<String>,
    upgrade: Option<String>,
    connection: Vec<String>,
    version: Option<String>,
    key: Option<String>,
    protocols: Vec<String>,
    forwarded_for: Option<String>,
    bearer: Option<BearerToken>,
    content_length: u64,
    transfer_encoding: bool,
}

impl Headers {
    fn collect(raw: &[httparse::Header<'_>]) -> Result<Self, HttpError> {
        let mut h = Headers::default();
        let mut seen_content_length = false;
        for header in raw {
            let name = header.name;
            // Headers we do not read may carry any obs-text; only the ones we
            // use must be UTF-8.
            let value = || {
                std::str::from_utf8(header.value)
                    .map(|v| v.trim_matches([' ', '\t']))
                    .map_err(|_| HttpError::Malformed(format!("{name} header is not UTF-8")))
            };
            if name.eq_ignore_ascii_case("host") {
                set_once(&mut h.host, value()?, "Host")?;
            } else if name.eq_ignore_ascii_case("origin") {
                set_once(&mut h.origin, value()?, "Origin")?;
            } else if name.eq_ignore_ascii_case("upgrade") {
                // Upgrade is a list header; repeated lines concatenate.
                let v = value()?;
                h.upgrade = Some(match h.upgrade.take() {
                    Some(prev) => format!("{prev}, {v}"),
                    None => v.to_owned(),
                });
            } else if name.eq_ignore_ascii_case("connection") {
                h.connection.push(value()?.to_owned());
            } else if name.eq_ignore_ascii_case("sec-websocket-version") {
                // A repeated version is ambiguous; treat it as unsupported so
                // the client is told which one we speak.
                if h.version.is_some() {
                    return Err(HttpError::UnsupportedVersion);
                }
                h.version = Some(value()?.to_owned());
            } else if name.eq_ignore_ascii_case("sec-websocket-key") {
                if h.key.is_some() {
                    return Err(HttpError::BadKey);
                }
                h.key = Some(value().map_err(|_| HttpError::BadKey)?.to_owned());
            } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
                // Bounded: at most max_headers lines of at most
                // max_request_bytes in total.
                h.protocols.extend(
                    value()?
                        .split(',')
                        .map(|p| p.trim_matches([' ', '\t']))
                        .filter(|p| !p.is_empty())
                        .map(str::to_owned),
                );
            } else if name.eq_ignore_ascii_case("x-forwarded-for") {
                let v = value()?;
                h.forwarded_for = Some(match h.forwarded_for.take() {
                    Some(prev) => format!("{prev}, {v}"),
                    None => v.to_owned(),
                });
            } else if name.eq_ignore_ascii_case("authorization") {
                // Only the Bearer scheme means anything here; a repeat is
                // ambiguous and refused like a repeated Host.
                if h.bearer.is_some() {
                    return Err(HttpError::Malformed(
                        "repeated Authorization header".to_owned(),
                    ));
                }
                let v = value()?;
                let token = v
                    .split_once(' ')
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map(|(_, t)| t.trim_matches([' ', '\t']))
                    .filter(|t| !t.is_empty());
                h.bearer = token.map(|t| BearerToken(t.to_owned()));
            } else if name.eq_ignore_ascii_case("content-length") {
                // Conflicting lengths are a request-smuggling signal
                // (RFC 9112 §6.3); reject any repeat outright.
                if seen_content_length {
                    return Err(HttpError::Malformed(
                        "repeated Content-Length header".to_owned(),
                    ));
                }
                seen_content_length = true;
                let v = value()?;
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(HttpError::Malformed("invalid Content-Length".to_owned()));
                }
                // Too many digits to fit is certainly a body.
                h.content_length = v.parse().unwrap_or(u64::MAX);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                h.transfer_encoding = true;
            }
        }
        Ok(h)
    }
}

/// Store a single-valued header, rejecting a repeat (RFC 9112 §3.2 requires
/// 400 for more than one Host; the same ambiguity applies to Origin).
fn set_once(slot: &mut Option<String>, value: &str, name: &str) -> Result<(), HttpError> {
    if slot.is_some() {
        return Err(HttpError::Malformed(format!("repeated {name} header")));
    }
    *slot = Some(value.to_owned());
    Ok(())
}

/// RFC 6455 §4.2.1 item 5: the key is base64 of a 16-byte nonce.
fn key_is_valid(key: &str) -> bool {
    // 16 bytes encode to exactly 24 characters; checking first keeps a huge
    // value from being decoded at all.
    key.len() == 24 && matches!(BASE64.decode(key), Ok(bytes) if bytes.len() == 16)
}

/// Sec-WebSocket-Accept for a key (RFC 6455 §4.2.2 item 5.4).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WEBSOCKET_GUID.as_bytes());
    BASE64.encode(sha.finalize())
}

/// Append a 101 Switching Protocols response, with Sec-WebSocket-Protocol
/// when `protocol` is Some.
pub fn write_upgrade_response(out: &mut Vec<u8>, key: &str, protocol: Option<&str>) {
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.extend_from_slice(accept_key(key).as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(p) = protocol {
        push_header(out, "Sec-WebSocket-Protocol", p);
    }
    out.extend_from_slice(b"\r\n");
}

/// Append an error response with a JSON body
/// `{"error":{"code":"<code>","message":"<message>"}}` and
/// `Connection: close`. A 426 carries `Sec-WebSocket-Version: 13` (RFC 6455
/// §4.4) and a 405 carries `Allow: GET, HEAD` (RFC 9110 §15.5.6), so callers
/// cannot forget them. `extra_headers` is for e.g. `Retry-After`.
pub fn write_error_response(
    out: &mut Vec<u8>,
    status: u16,
    code: &str,
    message: &str,
    extra_headers: &[(&str, &str)],
) {
    let body = error_body(code, message);

    // A status outside 100..=999 cannot be written as three digits; it is a
    // caller bug, answered as a generic server error rather than a panic.
    let status = if (100..=999).contains(&status) {
        status
    } else {
        500
    };
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)).as_bytes());
    push_header(out, "Content-Type", "application/json");
    push_header(out, "Connection", "close");
    push_header(out, "Content-Length", &body.len().to_string());
    if status == 426 {
        push_header(out, "Sec-WebSocket-Version", "13");
    }
    if status == 405 {
        push_header(out, "Allow", "GET, HEAD");
    }
    for (name, value) in extra_headers {
        push_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
}

/// The project's error body, `{"error":{"code":"<code>","message":"<message>"}}`,
/// with both strings JSON-escaped.
pub fn error_body(code: &str, message: &str) -> String {
    let mut body = String::with_capacity(32 + code.len() + message.len());
    body.push_str("{\"error\":{\"code\":\"");
    json_escape_into(&mut body, code);
    body.push_str("\",\"message\":\"");
    json_escape_into(&mut body, message);
    body.push_str("\"}}");
    body
}

/// Append `name: value\r\n`, dropping control characters so a value that
/// came from elsewhere can never split the response (header injection).
fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend(name.bytes().filter(|b| !b.is_ascii_control()));
    out.extend_from_slice(b": ");
    out.extend(
        value
            .bytes()
            .filter(|b| !b.is_ascii_control() || *b == b'\t'),
    );
    out.extend_from_slice(b"\r\n");
}

/// JSON string escaping (RFC 8259 §7) without pulling in a JSON crate.
fn json_escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
}

/// Standard reason phrase (RFC 9110 §15) for the statuses we may send.
fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        413 => "Content Too Large",
        414 => "URI Too Long",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Value of a query parameter, percent-decoded (`+` → space as in forms),
/// first occurrence; `None` if absent. Bad `%` escapes are kept literally and
/// invalid UTF-8 becomes U+FFFD, so this never fails.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (form_decode(k) == name).then(|| form_decode(v))
    })
}

/// application/x-www-form-urlencoded decoding, lenient on bad escapes.
fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => match (
                bytes.get(i + 1).copied().and_then(hex_val),
                bytes.get(i + 2).copied().and_then(hex_val),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Case-insensitive token search in a comma-separated header value (e.g.
/// `Connection: keep-alive, Upgrade`).
pub fn header_has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim_matches([' ', '\t']).eq_ignore_ascii_case(token))
}

/// Our subprotocols in preference order: raw binary frames first, websockify's
/// legacy base64 text frames for old clients.
const SUBPROTOCOLS: [&str; 2] = ["binary", "base64"];

/// Pick the subprotocol to answer with, websockify-compatible: none offered →
/// `Ok(None)` (raw binary, what noVNC sends today); otherwise the first of
/// `binary`, `base64` (our preference order) that the client offered; offers
/// with neither → [`HttpError::NoSupportedSubprotocol`]. Names compare
/// case-sensitively, as RFC 6455 §11.5 registers them.
pub fn choose_subprotocol(offered: &[String]) -> Result<Option<&'static str>, HttpError> {
    if offered.is_empty() {
        return Ok(None);
    }
    SUBPROTOCOLS
        .into_iter()
        .find(|ours| offered.iter().any(|o| o == ours))
        .map(Some)
        .ok_or(HttpError::NoSupportedSubprotocol)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: RequestLimits = RequestLimits {
        max_request_bytes: 8192,
        max_headers: 32,
    };

    const GOOD: &str = "GET /websockify?token=abc%20d HTTP/1.1\r\n\
        Host: example.com:6080\r\n\
        Upgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Protocol: base64, binary\r\n\
        Origin: https://portal.example.com\r\n\
        X-Forwarded-For: 10.0.0.1\r\n\
        \r\n";

    fn parse(s: &str) -> Result<Option<(Request, usize)>, HttpError> {
        parse_request(s.as_bytes(), &LIMITS)
    }

    fn parse_err(s: &str) -> HttpError {
        match parse(s) {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    /// A valid upgrade with one header line replaced (or removed if `with`
    /// is empty).
    fn good_with(header: &str, with: &str) -> String {
        GOOD.lines()
            .map(|l| {
                if l.starts_with(header) {
                    with.to_owned()
                } else {
                    l.to_owned()
                }
            })
            .filter(|l| !l.is_empty())
            .map(|l| l + "\r\n")
            .collect::<String>()
            + "\r\n"
    }

    #[test]
    fn rfc6455_accept_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn parses_full_upgrade() {
        let (req, n) = parse(GOOD).unwrap().unwrap();
        assert_eq!(n, GOOD.len());
        assert_eq!(
            req,
            Request::Upgrade(Upgrade {
                path: "/websockify".into(),
                query: Some("token=abc%20d".into()),
                host: Some("example.com:6080".into()),
                origin: Some("https://portal.example.com".into()),
                key: "dGhlIHNhbXBsZSBub25jZQ==".into(),
                protocols: vec!["base64".into(), "binary".into()],
                forwarded_for: Some("10.0.0.1".into()),
                bearer: None,
            })
        );
    }

    #[test]
    fn bearer_token_is_taken_and_never_printed() {
        let with = |auth: &str| {
            let req = GOOD.replace("Origin:", &format!("{auth}\r\nOrigin:"));
            match parse(&req) {
                Ok(Some((Request::Upgrade(u), _))) => Ok(u.bearer),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e),
            }
        };
        let token = with("Authorization: Bearer s3cret.jwt").unwrap().unwrap();
        assert_eq!(token.0, "s3cret.jwt");
        assert!(!format!("{token:?}").contains("s3cret"));
        assert_eq!(with("authorization: bearer  x ").unwrap().unwrap().0, "x");
        assert_eq!(with("Authorization: Basic dXNlcg==").unwrap(), None);
        assert_eq!(with("Authorization: Bearer").unwrap(), None);
        assert!(with("Authorization: Bearer a\r\nAuthorization: Bearer b").is_err());
    }

    #[test]
    fn trailing_bytes_are_not_consumed() {
        let mut buf = GOOD.as_bytes().to_vec();
        buf.extend_from_slice(&[0x82, 0x80, 1, 2, 3, 4]);
        let (_, n) = parse_request(&buf, &LIMITS).unwrap().unwrap();
        assert_eq!(n, GOOD.len());
    }

    #[test]
    fn every_prefix_is_incomplete() {
        for i in 0..GOOD.len() {
            assert_eq!(parse(&GOOD[..i]), Ok(None), "prefix of {i} bytes");
        }
    }

    #[test]
    fn plain_get_and_head() {
        let (req, _) = parse("GET /vnc.html HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            req,
            Request::Get {
                path: "/vnc.html".into(),
                query: None,
                head: false
            }
        );
        let (req, _) = parse("HEAD /a?b=c#frag HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            req,
            Request::Get {
                path: "/a".into(),
                query: Some("b=c".into()),
                head: true
            }
        );
        // HTTP/1.0 needs no Host and may fetch static files.
        assert!(matches!(
            parse("GET / HTTP/1.0\r\n\r\n"),
            Ok(Some((Request::Get { .. }, _)))
        ));
        // Empty query is distinct from none.
        let (req, _) = parse("GET /? HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(matches!(req, Request::Get { query: Some(q), .. } if q.is_empty()));
    }

    #[test]
    fn leading_empty_lines_and_bare_lf_tolerated() {
        // RFC 9112 §2.2: servers SHOULD ignore a CRLF before the request line
        // and MAY accept bare LF; httparse does both.
        let (req, _) = parse("\r\nGET / HTTP/1.1\nHost: x\n\n").unwrap().unwrap();
        assert!(matches!(req, Request::Get { .. }));
    }

    #[test]
    fn header_names_and_tokens_are_case_insensitive() {
        let s = "GET / HTTP/1.1\r\nhOsT: x\r\nUPGRADE: WebSocket\r\nconnection: UPGRADE\r\n\
                 sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nSEC-WEBSOCKET-VERSION: 13\r\n\r\n";
        assert!(matches!(parse(s), Ok(Some((Request::Upgrade(_), _)))));
    }

    #[test]
    fn repeated_headers_combine() {
        let s = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: a, ,b\r\n\
                 Sec-WebSocket-Protocol:c\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n\r\n";
        let Ok(Some((Request::Upgrade(u), _))) = parse(s) else {
            panic!("not an upgrade")
        };
        assert_eq!(u.protocols, ["a", "b", "c"]);
        assert_eq!(u.forwarded_for.as_deref(), Some("1.1.1.1, 2.2.2.2"));
        assert_eq!(u.origin, None);
    }

    #[test]
    fn obsolete_line_folding_is_rejected() {
        let s = "GET / HTTP/1.1\r\nHost: x\r\nX-Long: a\r\n b\r\n\r\n";
        assert_eq!(parse_err(s).status(), 400);
    }

    #[test]
    fn non_utf8_in_unused_header_is_ignored() {
        let mut buf = b"GET / HTTP/1.1\r\nHost: x\r\nX-Junk: \xff\xfe\r\n\r\n".to_vec();
        assert!(parse_request(&buf, &LIMITS).unwrap().is_some());
        buf = b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n".to_vec();
        assert_eq!(
            parse_request(&buf, &LIMITS).unwrap_err().kind(),
            "malformed"
        );
    }

    #[test]
    fn errors_map_to_statuses() {
        let cases: Vec<(String, &str, u16)> = vec![
            ("garbage\r\n\r\n".into(), "malformed", 400),
            ("\x16\x03\x01\x02\x00".into(), "malformed", 400),
            (
                "POST / HTTP/1.1\r\nHost: x\r\n\r\n".into(),
                "method_not_allowed",
                405,
            ),
            (GOOD.replacen("GET", "HEAD", 1), "method_not_allowed", 405),
            (GOOD.replacen("HTTP/1.1", "HTTP/1.0", 1), "not_http11", 505),
            (GOOD.replacen("HTTP/1.1", "HTTP/2.0", 1), "not_http11", 505),
            (good_with("Upgrade:", "Upgrade: h2c"), "bad_upgrade", 400),
            (
                good_with("Connection:", "Connection: keep-alive"),
                "bad_upgrade",
                400,
            ),
            (good_with("Connection:", ""), "bad_upgrade", 400),
            (
                good_with("Sec-WebSocket-Version:", "Sec-WebSocket-Version: 8"),
                "unsupported_version",
                426,
            ),
            (
                good_with("Sec-WebSocket-Version:", ""),
                "unsupported_version",
                426,
            ),
            (
                good_with("Sec-WebSocket-Key:", "Sec-WebSocket-Key: short"),
                "bad_key",
                400,
            ),
            (
                // Right length and alphabet, but 24 characters without
                // padding decode to 18 bytes, not 16.
                good_with(
                    "Sec-WebSocket-Key:",
                    "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAAA",
                ),
                "bad_key",
                400,
            ),
            (
                good_with(
                    "Sec-WebSocket-Key:",
                    "Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==",
                ),
                "bad_key",
                400,
            ),
            (good_with("Sec-WebSocket-Key:", ""), "bad_key", 400),
            (good_with("Host:", ""), "missing_host", 400),
            ("GET / HTTP/1.1\r\n\r\n".into(), "missing_host", 400),
            (
                good_with("Origin:", "Content-Length: 5"),
                "body_not_allowed",
                400,
            ),
            (
                good_with("Origin:", "Transfer-Encoding: chunked"),
                "body_not_allowed",
                400,
            ),
            (good_with("Origin:", "Content-Length: -1"), "malformed", 400),
            (good_with("Origin:", "Host: other"), "malformed", 400),
            (
                "GET http://evil/ HTTP/1.1\r\nHost: x\r\n\r\n".into(),
                "malformed",
                400,
            ),
        ];
        for (req, kind, status) in cases {
            let e = parse_err(&req);
            assert_eq!((e.kind(), e.status()), (kind, status), "request: {req:?}");
        }
        // Repeated key.
        let dup = GOOD.replacen(
            "Origin:",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin:",
            1,
        );
        assert_eq!(parse_err(&dup).kind(), "bad_key");
        // Content-Length: 0 is fine.
        let zero = good_with("Origin:", "Content-Length: 0");
        assert!(parse(&zero).unwrap().is_some());
    }

    #[test]
    fn size_limit() {
        let small = RequestLimits {
            max_request_bytes: 64,
            max_headers: 32,
        };
        // Incomplete and below the limit: wait.
        assert_eq!(parse_request(&GOOD.as_bytes()[..63], &small), Ok(None));
        // Reaching the limit without a complete head: reject.
        assert_eq!(
            parse_request(&GOOD.as_bytes()[..64], &small),
            Err(HttpError::TooLarge)
        );
        assert_eq!(
            parse_request(GOOD.as_bytes(), &small),
            Err(HttpError::TooLarge)
        );
        // Exactly at the limit is accepted.
        let exact = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let lim = RequestLimits {
            max_request_bytes: exact.len(),
            max_headers: 32,
        };
        assert!(parse_request(exact.as_bytes(), &lim).unwrap().is_some());
    }

    #[test]
    fn header_count_limit() {
        let few = RequestLimits {
            max_request_bytes: 8192,
            max_headers: 8,
        };
        // GOOD has 8 headers: exactly at the limit.
        assert!(parse_request(GOOD.as_bytes(), &few).unwrap().is_some());
        let nine = GOOD.replacen("Origin:", "X-A: 1\r\nOrigin:", 1);
        assert_eq!(
            parse_request(nine.as_bytes(), &few),
            Err(HttpError::TooLarge)
        );
        // Rejected early, before the head is even complete.
        let partial = &nine[..nine.len() - 2];
        assert_eq!(
            parse_request(partial.as_bytes(), &few),
            Err(HttpError::TooLarge)
        );
        // A configured limit above the cap is clamped, not a panic.
        let huge = RequestLimits {
            max_request_bytes: 1 << 20,
            max_headers: 10_000,
        };
        let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
        for i in 0..MAX_HEADERS_CAP {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(
            parse_request(many.as_bytes(), &huge),
            Err(HttpError::TooLarge)
        );
        // Zero headers allowed: only a header-less HTTP/1.0 GET parses.
        let none = RequestLimits {
            max_request_bytes: 8192,
            max_headers: 0,
        };
        assert!(parse_request(b"GET / HTTP/1.0\r\n\r\n", &none)
            .unwrap()
            .is_some());
    }

    #[test]
    fn upgrade_response_bytes() {
        let mut out = Vec::new();
        write_upgrade_response(&mut out, "dGhlIHNhbXBsZSBub25jZQ==", Some("binary"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
             Sec-WebSocket-Protocol: binary\r\n\r\n"
        );
        let mut out = Vec::new();
        write_upgrade_response(&mut out, "dGhlIHNhbXBsZSBub25jZQ==", None);
        let s = String::from_utf8(out).unwrap();
        assert!(!s.contains("Sec-WebSocket-Protocol"));
        assert!(s.ends_with("\r\n\r\n"));
    }

    fn split_response(out: &[u8]) -> (String, String) {
        let s = String::from_utf8(out.to_vec()).unwrap();
        let (h, b) = s.split_once("\r\n\r\n").unwrap();
        (h.to_owned(), b.to_owned())
    }

    #[test]
    fn error_response_format() {
        let mut out = Vec::new();
        write_error_response(
            &mut out,
            503,
            "busy",
            "quote \" back \\ nl \n ctl \u{1} é",
            &[("Retry-After", "5")],
        );
        let (head, body) = split_response(&out);
        assert!(head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(head.contains("\r\nContent-Type: application/json"));
        assert!(head.contains("\r\nConnection: close"));
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        assert!(head.ends_with("\r\nRetry-After: 5"));
        assert_eq!(
            body,
            r#"{"error":{"code":"busy","message":"quote \" back \\ nl \n ctl \u0001 é"}}"#
        );
    }

    #[test]
    fn error_response_special_statuses() {
        let mut out = Vec::new();
        let e = HttpError::UnsupportedVersion;
        write_error_response(&mut out, e.status(), e.kind(), &e.to_string(), &[]);
        let (head, _) = split_response(&out);
        assert!(head.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(head.contains("\r\nSec-WebSocket-Version: 13"));

        let mut out = Vec::new();
        write_error_response(&mut out, 405, "method_not_allowed", "no", &[]);
        assert!(split_response(&out).0.contains("\r\nAllow: GET, HEAD"));

        // Out-of-range status and injected CR/LF are neutralised.
        let mut out = Vec::new();
        write_error_response(&mut out, 7, "x", "y", &[("X-A", "1\r\nSet-Cookie: evil")]);
        let (head, _) = split_response(&out);
        assert!(head.starts_with("HTTP/1.1 500 Internal Server Error\r\n"));
        assert!(head.contains("\r\nX-A: 1Set-Cookie: evil"));
        assert!(!head.contains("\r\nSet-Cookie"));
    }

    #[test]
    fn query_params() {
        let q = "token=a%2Fb+c&x=1&token=second&empty=&flag&bad=%zz%4&utf=%C3%A9&inv=%ff";
        assert_eq!(query_param(q, "token").as_deref(), Some("a/b c"));
        assert_eq!(query_param(q, "x").as_deref(), Some("1"));
        assert_eq!(query_param(q, "empty").as_deref(), Some(""));
        assert_eq!(query_param(q, "flag").as_deref(), Some(""));
        assert_eq!(query_param(q, "bad").as_deref(), Some("%zz%4"));
        assert_eq!(query_param(q, "utf").as_deref(), Some("é"));
        assert_eq!(query_param(q, "inv").as_deref(), Some("\u{fffd}"));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param("", "x"), None);
        assert_eq!(query_param("a%20b=1", "a b").as_deref(), Some("1"));
        assert_eq!(query_param("%", "%").as_deref(), Some(""));
    }

    #[test]
    fn tokens_in_headers() {
        assert!(header_has_token("keep-alive, Upgrade", "upgrade"));
        assert!(header_has_token("Upgrade", "upgrade"));
        assert!(header_has_token(" \tupgrade\t ,x", "UPGRADE"));
        assert!(!header_has_token("upgraded", "upgrade"));
        assert!(!header_has_token("", "upgrade"));
    }

    #[test]
    fn subprotocol_choice() {
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(choose_subprotocol(&[]), Ok(None));
        assert_eq!(
            choose_subprotocol(&v(&["base64", "binary"])),
            Ok(Some("binary"))
        );
        assert_eq!(
            choose_subprotocol(&v(&["chat", "base64"])),
            Ok(Some("base64"))
        );
        assert_eq!(
            choose_subprotocol(&v(&["Binary"])),
            Err(HttpError::NoSupportedSubprotocol)
        );
        assert_eq!(HttpError::NoSupportedSubprotocol.status(), 400);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..2048),
                                       max_bytes in 0usize..4096, max_headers in 0usize..100) {
            let limits = RequestLimits { max_request_bytes: max_bytes, max_headers };
            if let Ok(Some((_, n))) = parse_request(&buf, &limits) {
                prop_assert!(n <= buf.len() && n <= max_bytes);
            }
        }

        #[test]
        fn mutated_valid_request_never_panics(pos in 0usize..GOOD.len(), byte in any::<u8>()) {
            let mut buf = GOOD.as_bytes().to_vec();
            buf[pos] = byte;
            let _ = parse_request(&buf, &LIMITS);
        }

        #[test]
        fn query_param_never_panics(q in ".{0,200}", n in ".{0,10}") {
            let _ = query_param(&q, &n);
        }

        #[test]
        fn error_body_is_well_formed(msg in "\\PC{0,50}|[\\x00-\\x1f\"\\\\]{0,20}") {
            let mut out = Vec::new();
            write_error_response(&mut out, 400, "malformed", &msg, &[]);
            let (head, body) = split_response(&out);
            let expected = format!("Content-Length: {}", body.len());
            prop_assert!(head.contains(&expected));
            prop_assert!(!body.bytes().any(|b| b < 0x20));
        }
    }
}
