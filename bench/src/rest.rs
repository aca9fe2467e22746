//! A small blocking HTTP/1.1 client for the appliance's control API
//! (`POST /api/v1/sessions`, `GET /api/v1/stats`, `DELETE /api/v1/sessions/{id}`): JSON bodies with
//! `Content-Length`, a bearer token, and one keep-alive connection reused
//! across requests (or a fresh connection per request, on request).
//!
//! Hand-written like the WebSocket client, so what is timed is a connect (when
//! needed), one `write`, and the reads up to the last body byte: no pool, no
//! runtime, no redirects. Responses must carry `Content-Length` (the
//! appliance's JSON responses do); chunked bodies are refused as an error.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::Deserialize;

/// Longest response (head + body) accepted.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Whether the client keeps its TCP connection between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HttpMode {
    /// One connection, reused (HTTP/1.1 keep-alive); reopened when the
    /// server closes it.
    KeepAlive,
    /// A new TCP connection per request (`Connection: close`).
    NewConnection,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// Bytes of the head, including the blank line.
    pub head_len: usize,
    pub content_length: usize,
    /// The server said `Connection: close`.
    pub close: bool,
}

/// Parses the response head in `buf`: `Ok(None)` while incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(n)) => n,
        Err(e) => return Err(format!("bad HTTP response: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    let value = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    if value("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return Err("chunked response bodies are not supported".into());
    }
    let content_length = match value("content-length") {
        Some(v) => v.parse().map_err(|_| format!("bad Content-Length {v:?}"))?,
        // No body by definition, or none announced.
        None if status == 204 || status == 304 || (100..200).contains(&status) => 0,
        None => return Err(format!("HTTP {status} without Content-Length")),
    };
    let close = value("connection").is_some_and(|v| v.split(',').any(|t| t.trim() == "close"));
    Ok(Some(Head {
        status,
        head_len,
        content_length,
        close,
    }))
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text, shortened, for error messages.
    pub fn body_excerpt(&self) -> String {
        let s = String::from_utf8_lossy(&self.body);
        s.chars().take(200).collect()
    }
}

#[derive(Debug)]
pub enum RestError {
    Connect(io::Error),
    Io(io::Error),
    Protocol(String),
}

impl std::fmt::Display for RestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestError::Connect(e) => write!(f, "connect: {e}"),
            RestError::Io(e) => write!(f, "io: {e}"),
            RestError::Protocol(m) => write!(f, "http: {m}"),
        }
    }
}

impl std::error::Error for RestError {}

impl From<io::Error> for RestError {
    fn from(e: io::Error) -> Self {
        RestError::Io(e)
    }
}

pub struct RestClient {
    addr: SocketAddr,
    bearer: String,
    mode: HttpMode,
    io_timeout: Duration,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
    /// Connections opened so far.
    pub connects: u64,
}

impl RestClient {
    pub fn new(addr: SocketAddr, bearer: &str, mode: HttpMode, io_timeout: Duration) -> Self {
        RestClient {
            addr,
            bearer: bearer.to_string(),
            mode,
            io_timeout,
            stream: None,
            buf: vec![0; MAX_RESPONSE_BYTES],
            connects: 0,
        }
    }

    /// Opens the keep-alive connection now, so the first timed request does
    /// not pay for it. No-op in `NewConnection` mode.
    pub fn preconnect(&mut self) -> Result<(), RestError> {
        if self.mode == HttpMode::KeepAlive && self.stream.is_none() {
            self.stream = Some(self.connect()?);
        }
        Ok(())
    }

    fn connect(&mut self) -> Result<TcpStream, RestError> {
        let s =
            TcpStream::connect_timeout(&self.addr, self.io_timeout).map_err(RestError::Connect)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(self.io_timeout))?;
        s.set_write_timeout(Some(self.io_timeout))?;
        self.connects += 1;
        Ok(s)
    }

    pub fn post_json(&mut self, path: &str, body: &str) -> Result<Response, RestError> {
        self.request("POST", path, Some(body))
    }

    pub fn get(&mut self, path: &str) -> Result<Response, RestError> {
        self.request("GET", path, None)
    }

    pub fn delete(&mut self, path: &str) -> Result<Response, RestError> {
        self.request("DELETE", path, None)
    }

    fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Response, RestError> {
        let req = request_text(
            method,
            path,
            &self.addr.to_string(),
            &self.bearer,
            body,
            self.mode == HttpMode::KeepAlive,
        );
        // A kept connection the server closed while idle fails on first use
        // (EOF or reset before any byte): retry once on a new connection.
        let reused = self.stream.is_some();
        match self.exchange(req.as_bytes()) {
            Err(RestError::Io(e)) if reused && is_stale(&e) => {
                self.stream = None;
                self.exchange(req.as_bytes())
            }
            r => r,
        }
    }

    fn exchange(&mut self, req: &[u8]) -> Result<Response, RestError> {
        let mut stream = match self.stream.take() {
            Some(s) => s,
            None => self.connect()?,
        };
        stream.write_all(req)?;
        let mut len = 0;
        let head = loop {
            if len == self.buf.len() {
                return Err(RestError::Protocol("response head too long".into()));
            }
            let n = stream.read(&mut self.buf[len..])?;
            if n == 0 {
                return Err(RestError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before the response",
                )));
            }
            len += n;
            if let Some(h) = parse_head(&self.buf[..len]).map_err(RestError::Protocol)? {
                break h;
            }
        };
        let total = head.head_len + head.content_length;
        if total > self.buf.len() {
            return Err(RestError::Protocol(format!(
                "response of {total} bytes is larger than {MAX_RESPONSE_BYTES}"
            )));
        }
        while len < total {
            let n = stream.read(&mut self.buf[len..total])?;
            if n == 0 {
                return Err(RestError::Protocol(
                    "connection closed inside the body".into(),
                ));
            }
            len += n;
        }
        if len > total {
            return Err(RestError::Protocol("bytes after the response".into()));
        }
        if self.mode == HttpMode::KeepAlive && !head.close {
            self.stream = Some(stream);
        }
        Ok(Response {
            status: head.status,
            body: self.buf[head.head_len..total].to_vec(),
        })
    }
}

fn is_stale(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// The request bytes.
pub fn request_text(
    method: &str,
    path: &str,
    host: &str,
    bearer: &str,
    body: Option<&str>,
    keep_alive: bool,
) -> String {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {bearer}\r\n\
         Accept: application/json\r\nConnection: {}\r\n",
        if keep_alive { "keep-alive" } else { "close" }
    );
    if let Some(b) = body {
        r.push_str("Content-Type: application/json\r\n");
        r.push_str(&format!("Content-Length: {}\r\n\r\n", b.len()));
        r.push_str(b);
    } else {
        r.push_str("\r\n");
    }
    r
}

/// The fields of `201 Created` from `POST /api/v1/sessions` the bench uses.
#[derive(Debug, Clone, Deserialize)]
pub struct CreatedSession {
    pub session_id: String,
    pub ws_url: String,
    #[serde(default)]
    pub port: Option<u16>,
}

/// `ws://127.0.0.1:PORT/path?query` → the address and the request target
/// (`/path?query`). Only plain `ws://` with a literal IP address: the bench
/// talks to 127.0.0.1 and resolves no names.
pub fn parse_ws_url(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("{url:?}: not a ws:// URL"))?;
    let (hostport, target) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = hostport
        .parse()
        .map_err(|_| format!("{url:?}: host {hostport:?} is not an IP:port"))?;
    Ok((addr, target.to_string()))
}

/// `{"error":{"code":"..."}}` of an error response, when it has one.
pub fn error_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("error")?.get("code")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn heads_partial_complete_and_refused() {
        let ok = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\
                   content-length: 5\r\n\r\nhello";
        assert_eq!(
            parse_head(ok).unwrap(),
            Some(Head {
                status: 201,
                head_len: ok.len() - 5,
                content_length: 5,
                close: false
            })
        );
        assert_eq!(parse_head(&ok[..30]).unwrap(), None);
        let close =
            b"HTTP/1.1 503 Service Unavailable\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n";
        let h = parse_head(close).unwrap().unwrap();
        assert!(h.close && h.status == 503 && h.content_length == 0);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert_eq!(
            parse_head(b"HTTP/1.1 204 No Content\r\n\r\n")
                .unwrap()
                .unwrap()
                .content_length,
            0
        );
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(parse_head(b"NOPE\r\n\r\n").is_err());
    }

    #[test]
    fn ws_urls_and_error_codes() {
        assert_eq!(
            parse_ws_url("ws://127.0.0.1:44179/proxy/537b?token=KU7T-_x").unwrap(),
            (
                "127.0.0.1:44179".parse().unwrap(),
                "/proxy/537b?token=KU7T-_x".to_string()
            )
        );
        assert_eq!(parse_ws_url("ws://127.0.0.1:1").unwrap().1, "/".to_string());
        assert!(parse_ws_url("wss://127.0.0.1:1/x").is_err());
        assert!(parse_ws_url("ws://localhost:80/x").is_err());
        assert_eq!(
            error_code(br#"{"error":{"code":"port_pool_exhausted","message":"m"}}"#),
            Some("port_pool_exhausted".into())
        );
        assert_eq!(error_code(b"not json"), None);
        let c: CreatedSession = serde_json::from_str(
            r#"{"session_id":"ab","ws_url":"ws://127.0.0.1:2/proxy/ab?token=t","token":"t","expires_at_ms":1,"port":null}"#,
        )
        .unwrap();
        assert_eq!((c.session_id.as_str(), c.port), ("ab", None));
    }

    #[test]
    fn request_text_has_length_and_token() {
        let r = request_text("POST", "/api/v1/sessions", "h:1", "tok", Some("{}"), true);
        assert!(r.starts_with("POST /api/v1/sessions HTTP/1.1\r\nHost: h:1\r\n"));
        assert!(r.contains("\r\nAuthorization: Bearer tok\r\n"));
        assert!(r.contains("\r\nConnection: keep-alive\r\n"));
        assert!(r.ends_with("Content-Length: 2\r\n\r\n{}"));
        let g = request_text("GET", "/x", "h:1", "tok", None, false);
        assert!(g.ends_with("Connection: close\r\n\r\n"));
    }

    /// A server answering `n` requests on one connection, then closing it;
    /// the client must reuse the connection, then reconnect transparently.
    #[test]
    fn keep_alive_reuses_and_survives_a_server_close() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut conns = 0;
            for _ in 0..2 {
                let (mut s, _) = l.accept().unwrap();
                conns += 1;
                let answers = if conns == 1 { 2 } else { 1 };
                for _ in 0..answers {
                    let mut req = Vec::new();
                    let mut b = [0u8; 1];
                    while !req.ends_with(b"\r\n\r\n") {
                        s.read_exact(&mut b).unwrap();
                        req.push(b[0]);
                    }
                    let text = String::from_utf8_lossy(&req).to_string();
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    let mut body = vec![0u8; len];
                    s.read_exact(&mut body).unwrap();
                    s.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
                        .unwrap();
                }
            }
            conns
        });
        let mut c = RestClient::new(addr, "t", HttpMode::KeepAlive, Duration::from_secs(5));
        c.preconnect().unwrap();
        let r1 = c.post_json("/a", "{}").unwrap();
        c.post_json("/a", "{}").unwrap();
        assert_eq!((r1.status, r1.body.as_slice()), (201, &b"ok"[..]));
        assert_eq!(c.connects, 1);
        // The server closed the first connection: the third request reconnects.
        let r3 = c.post_json("/a", "{}").unwrap();
        assert_eq!(r3.status, 201);
        assert_eq!(c.connects, 2);
        assert_eq!(server.join().unwrap(), 2);
    }
}
