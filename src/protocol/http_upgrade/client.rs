//! The client role of the upgrade (RFC 6455 §4.1): the request a WebSocket
//! client sends to a server (a WebMKS host), and a streaming parser of the
//! server's answer.
//!
//! The request says exactly what RFC 6455 requires and nothing else: the
//! request line with the URL's path and query, `Host` (the URL's host, and
//! its port unless the scheme's default), `Upgrade`, `Connection`, a fresh
//! `Sec-WebSocket-Key` (16 bytes from the OS CSPRNG, base64),
//! `Sec-WebSocket-Version: 13`, the offered subprotocols (`binary` for
//! WebMKS) and an optional `Origin`. No extension is offered.
//!
//! The answer must be `HTTP/1.1 101` with `Upgrade: websocket`,
//! `Connection: Upgrade`, the `Sec-WebSocket-Accept` of our key, no
//! `Sec-WebSocket-Extensions`, and either one of the offered subprotocols
//! or none. "None" is accepted unless [`ClientOptions::require_protocol`]
//! is set: RFC 6455 §4.1 makes a missing `Sec-WebSocket-Protocol` mean "no
//! subprotocol" rather than an error, and `binary` frames are the same
//! bytes as no subprotocol's, so accepting it costs nothing and keeps
//! servers that never echo the header (older websockify) working; VMware
//! hosts answer `binary`. Any other status is an error carrying the status
//! and the start of the body, escaped, for the log.

use super::{accept_key, header_has_token, HttpError, WsUrl, BASE64, MAX_HEADERS_CAP};
use base64::Engine as _;

/// Bytes of a refusal's body kept for the log (escaped, so a few more
/// characters on screen).
pub const MAX_BODY_EXCERPT_BYTES: usize = 128;
/// Length of the random nonce behind `Sec-WebSocket-Key` (RFC 6455 §4.1).
const KEY_NONCE_BYTES: usize = 16;

/// What our upgrade request offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// Subprotocols offered, in preference order; empty: none (no header).
    /// Each must be an RFC 9110 token.
    pub protocols: Vec<String>,
    /// Refuse a 101 that chooses no subprotocol while some were offered
    /// (see the module doc for why the default accepts it).
    pub require_protocol: bool,
    /// The `Origin` header, if any (visible ASCII).
    pub origin: Option<String>,
}

impl ClientOptions {
    /// What the WebMKS backend leg offers: `binary` only (others report
    /// that ESXi drops a connection that does not offer it, and one that
    /// also offered `vmware-vvc` was closed after the version message), a
    /// missing answer accepted, no `Origin`.
    pub fn webmks() -> Self {
        Self {
            protocols: vec!["binary".to_owned()],
            require_protocol: false,
            origin: None,
        }
    }
}

/// Limits applied while parsing the server's answer.
#[derive(Debug, Clone, Copy)]
pub struct ResponseLimits {
    /// Largest response head (status line plus headers), in bytes; a
    /// buffer that reaches it without a complete head is refused
    /// ([`HttpError::ResponseTooLarge`]).
    pub max_response_bytes: usize,
    /// Largest number of header lines; clamped to [`MAX_HEADERS_CAP`].
    pub max_headers: usize,
}

/// The server accepted the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The subprotocol the server chose (one we offered), if any.
    pub protocol: Option<String>,
}

/// What we sent, kept to check the answer against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHandshake {
    key: String,
    protocols: Vec<String>,
    require_protocol: bool,
}

/// Appends our upgrade request for `url` to `out`, with a fresh key from
/// the OS CSPRNG; returns what [`ClientHandshake::parse_response`] needs.
/// Nothing is appended on error.
pub fn write_client_request(
    out: &mut Vec<u8>,
    url: &WsUrl,
    options: &ClientOptions,
) -> Result<ClientHandshake, HttpError> {
    let mut nonce = [0u8; KEY_NONCE_BYTES];
    getrandom::fill(&mut nonce).map_err(HttpError::RandomUnavailable)?;
    write_client_request_with_key(out, url, options, nonce)
}

/// [`write_client_request`] with the key's nonce given: for tests and
/// fuzzing only (a real key must be unpredictable).
pub fn write_client_request_with_key(
    out: &mut Vec<u8>,
    url: &WsUrl,
    options: &ClientOptions,
    nonce: [u8; KEY_NONCE_BYTES],
) -> Result<ClientHandshake, HttpError> {
    if options.protocols.is_empty() && options.require_protocol {
        return Err(HttpError::BadClientOption(
            "a subprotocol is required but none is offered",
        ));
    }
    if !options.protocols.iter().all(|p| is_token(p)) {
        return Err(HttpError::BadClientOption("a subprotocol is not a token"));
    }
    if let Some(origin) = &options.origin {
        if origin.is_empty() || !origin.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(HttpError::BadClientOption(
                "the Origin is empty or not visible ASCII",
            ));
        }
    }
    let key = BASE64.encode(nonce);
    // The URL parser admits only visible ASCII in the target and host, so
    // nothing here can split a line.
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(url.path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(url.host_header().as_bytes());
    out.extend_from_slice(b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\r\nSec-WebSocket-Version: 13\r\n");
    if !options.protocols.is_empty() {
        out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        out.extend_from_slice(options.protocols.join(", ").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(origin) = &options.origin {
        out.extend_from_slice(b"Origin: ");
        out.extend_from_slice(origin.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(ClientHandshake {
        key,
        protocols: options.protocols.clone(),
        require_protocol: options.require_protocol,
    })
}

/// RFC 9110 §5.6.2 token: one or more tchar.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl ClientHandshake {
    /// The `Sec-WebSocket-Key` we sent.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Parses the server's answer from the start of `buf`.
    ///
    /// * `Ok(None)`: the head is incomplete; call again with more bytes.
    /// * `Ok(Some((accepted, consumed)))`: the upgrade succeeded; `consumed`
    ///   is the length of the head, and the bytes after it are the server's
    ///   first frames, the caller's.
    /// * `Err(_)`: the backend refused or broke the handshake; close.
    ///
    /// Only the first `max_response_bytes` of `buf` are looked at, so one
    /// call's cost is bounded; re-parsing from the start on each read is
    /// O(max_response_bytes), bounded overall by the handshake timeout.
    pub fn parse_response(
        &self,
        buf: &[u8],
        limits: &ResponseLimits,
    ) -> Result<Option<(Accepted, usize)>, HttpError> {
        let window = &buf[..buf.len().min(limits.max_response_bytes)];
        let slots = limits.max_headers.min(MAX_HEADERS_CAP);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
        let mut response = httparse::Response::new(&mut headers[..slots]);
        let consumed = match response.parse(window) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return if buf.len() >= limits.max_response_bytes {
                    Err(HttpError::ResponseTooLarge)
                } else {
                    Ok(None)
                };
            }
            Err(httparse::Error::TooManyHeaders) => return Err(HttpError::ResponseTooLarge),
            Err(e) => return Err(HttpError::ResponseMalformed(e.to_string())),
        };
        let (Some(status), Some(minor)) = (response.code, response.version) else {
            return Err(HttpError::ResponseMalformed(
                "incomplete status line".to_owned(),
            ));
        };
        if status != 101 {
            return Err(HttpError::UpgradeRefused {
                status,
                body: excerpt(&buf[consumed..]),
            });
        }
        if minor != 1 {
            return Err(HttpError::ResponseNotHttp11);
        }
        let protocol = self.check_headers(response.headers)?;
        Ok(Some((Accepted { protocol }, consumed)))
    }

    /// The checks on a 101's headers, in RFC 6455 §4.1's order; returns the
    /// chosen subprotocol.
    fn check_headers(&self, raw: &[httparse::Header<'_>]) -> Result<Option<String>, HttpError> {
        let h = ResponseHeaders::collect(raw)?;
        if !h.upgrade.iter().any(|v| header_has_token(v, "websocket")) {
            return Err(HttpError::BadUpgradeResponse(
                "Upgrade header is not \"websocket\"",
            ));
        }
        if !h.connection.iter().any(|v| header_has_token(v, "upgrade")) {
            return Err(HttpError::BadUpgradeResponse(
                "Connection header lacks the \"upgrade\" token",
            ));
        }
        if h.accept.as_deref() != Some(accept_key(&self.key).as_str()) {
            return Err(HttpError::AcceptMismatch);
        }
        if let Some(extensions) = h.extensions {
            return Err(HttpError::UnexpectedExtensions(extensions));
        }
        match h.protocol {
            Some(chosen) if self.protocols.contains(&chosen) => Ok(Some(chosen)),
            Some(chosen) => Err(HttpError::UnexpectedSubprotocol(
                chosen.escape_default().to_string(),
            )),
            None if self.require_protocol => Err(HttpError::MissingSubprotocol),
            None => Ok(None),
        }
    }
}

/// The start of a body, ASCII-escaped for a log line.
fn excerpt(body: &[u8]) -> String {
    body[..body.len().min(MAX_BODY_EXCERPT_BYTES)]
        .escape_ascii()
        .to_string()
}

/// The headers of a 101 we read, gathered in one pass.
#[derive(Default)]
struct ResponseHeaders {
    upgrade: Vec<String>,
    connection: Vec<String>,
    accept: Option<String>,
    protocol: Option<String>,
    /// Escaped, for the error; `None` when absent or empty.
    extensions: Option<String>,
}

impl ResponseHeaders {
    fn collect(raw: &[httparse::Header<'_>]) -> Result<Self, HttpError> {
        let mut h = ResponseHeaders::default();
        for header in raw {
            let name = header.name;
            // Only the headers we read must be UTF-8.
            let value = || {
                std::str::from_utf8(header.value)
                    .map(|v| v.trim_matches([' ', '\t']).to_owned())
                    .map_err(|_| {
                        HttpError::ResponseMalformed(format!("{name} header is not UTF-8"))
                    })
            };
            if name.eq_ignore_ascii_case("upgrade") {
                h.upgrade.push(value()?);
            } else if name.eq_ignore_ascii_case("connection") {
                h.connection.push(value()?);
            } else if name.eq_ignore_ascii_case("sec-websocket-accept") {
                if h.accept.is_some() {
                    return Err(HttpError::BadUpgradeResponse(
                        "repeated Sec-WebSocket-Accept header",
                    ));
                }
                h.accept = Some(value()?);
            } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
                // RFC 6455 §4.2.2: the server answers with one value.
                if h.protocol.is_some() {
                    return Err(HttpError::BadUpgradeResponse(
                        "repeated Sec-WebSocket-Protocol header",
                    ));
                }
                h.protocol = Some(value()?);
            } else if name.eq_ignore_ascii_case("sec-websocket-extensions")
                && !header.value.iter().all(|b| matches!(b, b' ' | b'\t'))
            {
                let shown = header.value[..header.value.len().min(MAX_BODY_EXCERPT_BYTES)]
                    .escape_ascii()
                    .to_string();
                h.extensions = Some(shown);
            }
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests;
