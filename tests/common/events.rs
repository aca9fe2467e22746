//! A client of the appliance's `/ws/*` live events for the tests: the
//! upgrade with a bearer token (its refusal as status and JSON body), and
//! reads of `{type, data, timestamp}` messages with a deadline, keeping
//! the messages skipped while looking for another.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use super::{ws_request, IO_TIMEOUT};

/// How long an expected event may take to arrive.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);
/// Messages kept while looking for another, at most.
const MAX_BACKLOG: usize = 100_000;

/// A connected subscriber.
pub struct EventsClient {
    pub ws: WebSocket<TcpStream>,
    pub what: String,
    backlog: VecDeque<Value>,
}

/// What ended a read.
#[derive(Debug)]
pub enum Got {
    Message(Value),
    Closed(Option<u16>, String),
    Timeout,
}

/// Upgrade `path` on the control port with `token`; a refusal is its HTTP
/// status and JSON body.
pub fn try_events(
    control: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<EventsClient, (u16, Value)> {
    let stream = TcpStream::connect_timeout(&control, IO_TIMEOUT).expect("connect control");
    upgrade_events(stream, control, path, token)
}

/// A subscriber whose socket receives into a fixed `rcvbuf` bytes (no
/// autotuning), so not reading pushes back on the appliance quickly.
pub fn events_small_rcvbuf(
    control: SocketAddr,
    path: &str,
    token: &str,
    rcvbuf: usize,
) -> EventsClient {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(rcvbuf).unwrap();
    sock.connect_timeout(&control.into(), IO_TIMEOUT).unwrap();
    upgrade_events(sock.into(), control, path, Some(token))
        .unwrap_or_else(|(s, b)| panic!("{path}: refused with {s} {b}"))
}

/// The upgrade of `path` over `stream`, then its `welcome`; a refusal as
/// its status and JSON body.
fn upgrade_events(
    stream: TcpStream,
    control: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<EventsClient, (u16, Value)> {
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut req = ws_request(&format!("ws://{control}{path}"), &[], None);
    if let Some(t) = token {
        req.headers_mut()
            .insert("Authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tungstenite::client::client(req, stream) {
        Ok((ws, _)) => {
            let mut e = EventsClient {
                ws,
                what: path.to_string(),
                backlog: VecDeque::new(),
            };
            let welcome = e.next_of("welcome");
            assert!(welcome["data"]["room"].is_string(), "{welcome}");
            Ok(e)
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| serde_json::from_slice(b).unwrap_or(Value::Null))
                .unwrap_or(Value::Null);
            Err((resp.status().as_u16(), body))
        }
        Err(e) => panic!("{path}: upgrade failed without a status: {e}"),
    }
}

/// Upgrade `path`, which must succeed.
pub fn events(control: SocketAddr, path: &str, token: Option<&str>) -> EventsClient {
    try_events(control, path, token).unwrap_or_else(|(s, b)| panic!("{path}: refused with {s} {b}"))
}

impl EventsClient {
    pub fn send(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .unwrap_or_else(|e| panic!("{}: send: {e}", self.what));
    }

    pub fn send_json(&mut self, v: Value) {
        self.send(&v.to_string());
    }

    pub fn read(&mut self, timeout: Duration) -> Got {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Got::Timeout;
            }
            self.ws
                .get_ref()
                .set_read_timeout(Some(left.min(Duration::from_millis(500))))
                .unwrap();
            match self.ws.read() {
                Ok(Message::Text(t)) => {
                    let v: Value = serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {t}", self.what));
                    assert!(
                        v["type"].is_string() && v["timestamp"].is_u64() && v.get("data").is_some(),
                        "{}: every message is {{type, data, timestamp}}: {v}",
                        self.what
                    );
                    return Got::Message(v);
                }
                Ok(Message::Close(frame)) => {
                    return Got::Closed(
                        frame.as_ref().map(|f| u16::from(f.code)),
                        frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    )
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Got::Closed(None, String::new())
                }
                Err(e) => return Got::Closed(None, e.to_string()),
            }
        }
    }

    /// The next message of type `kind`.
    pub fn next_of(&mut self, kind: &str) -> Value {
        self.next_where(kind, |_| true)
    }

    /// The first message (kept ones first) of type `kind` whose data
    /// `want`s, within [`EVENT_TIMEOUT`]; the others read meanwhile are
    /// kept, in order.
    pub fn next_where(&mut self, kind: &str, want: impl Fn(&Value) -> bool) -> Value {
        self.next_where_within(kind, EVENT_TIMEOUT, want)
    }

    pub fn next_where_within(
        &mut self,
        kind: &str,
        timeout: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> Value {
        let matches = |v: &Value| v["type"] == kind && want(&v["data"]);
        if let Some(at) = self.backlog.iter().position(matches) {
            return self.backlog.remove(at).unwrap();
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read(deadline.saturating_duration_since(Instant::now())) {
                Got::Message(v) if matches(&v) => return v,
                Got::Message(v) => {
                    assert!(self.backlog.len() < MAX_BACKLOG, "{}: backlog", self.what);
                    self.backlog.push_back(v);
                }
                other => panic!(
                    "{}: waiting for {kind}: {other:?}; kept: {:?}",
                    self.what, self.backlog
                ),
            }
        }
    }

    /// Every message read or kept so far, and those arriving within
    /// `quiet`; the kept ones are consumed.
    pub fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        let mut all: Vec<Value> = self.backlog.drain(..).collect();
        let deadline = Instant::now() + quiet;
        loop {
            match self.read(deadline.saturating_duration_since(Instant::now())) {
                Got::Message(v) => all.push(v),
                Got::Timeout => return all,
                other => panic!("{}: {other:?}", self.what),
            }
        }
    }

    /// Every message of type `kind` kept so far or read within `quiet`;
    /// the others stay kept, in order.
    pub fn all_of(&mut self, kind: &str, quiet: Duration) -> Vec<Value> {
        let deadline = Instant::now() + quiet;
        loop {
            match self.read(deadline.saturating_duration_since(Instant::now())) {
                Got::Message(v) => {
                    assert!(self.backlog.len() < MAX_BACKLOG, "{}: backlog", self.what);
                    self.backlog.push_back(v);
                }
                Got::Timeout => break,
                other => panic!("{}: {other:?}", self.what),
            }
        }
        let (found, rest): (VecDeque<Value>, VecDeque<Value>) =
            self.backlog.drain(..).partition(|v| v["type"] == kind);
        self.backlog = rest;
        found.into()
    }

    /// No message of type `kind` within `quiet` (nor kept).
    pub fn none_of(&mut self, kind: &str, quiet: Duration) {
        if let Some(v) = self.backlog.iter().find(|v| v["type"] == kind) {
            panic!("{}: unexpected {kind}: {v}", self.what);
        }
        let deadline = Instant::now() + quiet;
        loop {
            match self.read(deadline.saturating_duration_since(Instant::now())) {
                Got::Message(v) if v["type"] == kind => {
                    panic!("{}: unexpected {kind}: {v}", self.what)
                }
                Got::Message(_) => {}
                Got::Timeout => return,
                other => panic!("{}: {other:?}", self.what),
            }
        }
    }

    /// The close that ends the connection within [`EVENT_TIMEOUT`]
    /// (messages before it are skipped): its code and reason.
    pub fn expect_close(&mut self) -> (Option<u16>, String) {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            match self.read(deadline.saturating_duration_since(Instant::now())) {
                Got::Closed(code, reason) => return (code, reason),
                Got::Message(_) => {}
                Got::Timeout => panic!("{}: not closed within {EVENT_TIMEOUT:?}", self.what),
            }
        }
    }

    /// `subscribe`, answered with `subscribed`.
    pub fn subscribe(&mut self, data: Value) -> Value {
        self.send_json(json!({"type": "subscribe", "data": data}));
        self.next_of("subscribed")
    }
}
