//! A small client of the appliance's `/ws/*` event endpoints for tests:
//! upgrade with a bearer token, read `{type, data, timestamp}` messages
//! with a deadline, wait for the first message of a type whose data
//! matches (keeping the others, in order), or make sure none comes.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::{Message, WebSocket};

use super::{ws_request, IO_TIMEOUT};

/// A subscriber of one `/ws/*` endpoint.
pub struct EventsClient {
    ws: WebSocket<TcpStream>,
    what: String,
    backlog: VecDeque<Value>,
}

impl EventsClient {
    /// Upgrades `path` with `token` and reads its `welcome`.
    pub fn connect(control: SocketAddr, path: &str, token: &str) -> EventsClient {
        let stream = TcpStream::connect_timeout(&control, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("{path}: connect: {e}"));
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut request = ws_request(&format!("ws://{control}{path}"), &[], None);
        request
            .headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        let (ws, _) = tungstenite::client::client(request, stream)
            .unwrap_or_else(|e| panic!("{path}: upgrade refused: {e}"));
        let mut client = EventsClient {
            ws,
            what: path.to_string(),
            backlog: VecDeque::new(),
        };
        client.next_where("welcome", Duration::from_secs(10), |_| true);
        client
    }

    /// The next message within `timeout` (None: none came); panics when
    /// the connection ends.
    fn read(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let slice = left.min(Duration::from_millis(200));
            self.ws.get_ref().set_read_timeout(Some(slice)).unwrap();
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    let v: Value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {text}", self.what));
                    return Some(v);
                }
                Ok(Message::Close(frame)) => panic!("{}: closed: {frame:?}", self.what),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("{}: {e}", self.what),
            }
        }
    }

    /// The first message of type `kind` whose data `want`s, within
    /// `timeout` (kept messages first); the others read meanwhile are kept.
    pub fn next_where(
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
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read(left) {
                Some(v) if matches(&v) => return v,
                Some(v) => {
                    assert!(self.backlog.len() < 100_000, "{}: backlog", self.what);
                    self.backlog.push_back(v);
                }
                None => panic!(
                    "{}: no {kind} as wanted within {timeout:?}; got meanwhile: {:?}",
                    self.what, self.backlog
                ),
            }
        }
    }

    /// Every message of type `kind` read within `quiet` (kept ones too).
    pub fn all_of(&mut self, kind: &str, quiet: Duration) -> Vec<Value> {
        let deadline = Instant::now() + quiet;
        while let Some(v) = self.read(deadline.saturating_duration_since(Instant::now())) {
            self.backlog.push_back(v);
        }
        let (found, rest): (VecDeque<Value>, VecDeque<Value>) =
            self.backlog.drain(..).partition(|v| v["type"] == kind);
        self.backlog = rest;
        found.into()
    }
}
