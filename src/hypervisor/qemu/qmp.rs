//! A QMP (QEMU Machine Protocol) client on tokio: one persistent connection
//! to one VM's QMP unix socket, carrying both commands and asynchronous
//! events.
//!
//! What it does: a background task connects, reads the greeting, sends
//! `qmp_capabilities`, asks `query-status` (so the state at connect and the
//! events after it arrive in order on the same connection), then serves
//! commands and events until the connection drops; it then fails every
//! pending command with [`QmpError::Unreachable`] and reconnects with a
//! bounded exponential backoff. Commands carry a numeric `id` and answers
//! are matched by it, so several may be in flight; events are handed to a
//! callback in the order they arrive. One connection per VM is a must, not
//! a choice: a QMP socket serves one client at a time and a second
//! connection waits until the first closes.
//!
//! Bounds: commands in flight ([`QmpLimits::max_in_flight_commands`]),
//! line length ([`QmpLimits::max_line_bytes`]; a longer line drops the
//! connection), a timeout per command and per handshake step
//! ([`QmpLimits::command_timeout_ms`]), and the backoff's ceiling
//! ([`QmpLimits::reconnect_max_ms`]).
//!
//! What it does not do: interpret commands or events (the backend does),
//! start or stop QEMU, or use out-of-band execution. It depends on nothing
//! in the crate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;

/// Time QEMU has to answer one command (and each handshake step).
pub const COMMAND_TIMEOUT_MS: u64 = 5_000;
/// Commands awaiting an answer at once, per VM; more are refused as busy.
/// Each costs a map entry and a queued line of a few hundred bytes.
pub const MAX_IN_FLIGHT_COMMANDS: usize = 16;
/// Longest line accepted from QEMU (answers and events are one JSON line
/// each; the largest we ask for, `query-vnc` with many clients, stays far
/// below). A longer line drops the connection.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;
/// First wait before reconnecting; doubled after each failure.
pub const RECONNECT_MIN_MS: u64 = 100;
/// Longest wait between reconnection attempts.
pub const RECONNECT_MAX_MS: u64 = 5_000;
/// Bytes read from the socket per read call.
const READ_CHUNK_BYTES: usize = 8 * 1024;

/// The bounds of one client. [`Default`] gives the constants above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QmpLimits {
    pub command_timeout_ms: u64,
    pub max_in_flight_commands: usize,
    pub max_line_bytes: usize,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
}

impl Default for QmpLimits {
    fn default() -> Self {
        QmpLimits {
            command_timeout_ms: COMMAND_TIMEOUT_MS,
            max_in_flight_commands: MAX_IN_FLIGHT_COMMANDS,
            max_line_bytes: MAX_LINE_BYTES,
            reconnect_min_ms: RECONNECT_MIN_MS,
            reconnect_max_ms: RECONNECT_MAX_MS,
        }
    }
}

/// Why a command failed. QEMU's side, always, except [`QmpError::Busy`].
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Not connected, or the connection dropped before the answer.
    #[error("QMP socket {path}: {reason}")]
    Unreachable { path: String, reason: String },
    #[error("QEMU did not answer {command} within {timeout_ms} ms")]
    Timeout {
        command: &'static str,
        timeout_ms: u64,
    },
    #[error("{0} QMP commands are in flight already")]
    Busy(usize),
    /// QEMU answered with an error.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        command: &'static str,
        class: String,
        desc: String,
    },
}

/// What the connection task reports, in order, to the client's owner.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpNotice {
    /// Connected and negotiated; `status` is `query-status`'s `status` at
    /// connect (`running`, `paused`, `shutdown`, ...). Events that follow
    /// are newer than it.
    Connected { status: String },
    /// An asynchronous event (`STOP`, `RESUME`, `SHUTDOWN`, ...).
    Event { name: String, data: Value },
    /// The connection dropped; pending commands failed. Reconnecting.
    Disconnected { reason: String },
    /// An attempt to connect failed. Retrying after a backoff.
    ConnectFailed { reason: String },
}

/// Receives [`QmpNotice`]s on the connection task; must not block.
pub type NoticeHandler = Arc<dyn Fn(QmpNotice) + Send + Sync>;

type Answer = Result<Value, QmpError>;

/// A command waiting for its answer.
struct Pending {
    command: &'static str,
    answer: oneshot::Sender<Answer>,
}

/// The current connection, as commands see it.
#[derive(Default)]
struct Link {
    /// Lines to write; `None` while disconnected.
    outgoing: Option<mpsc::Sender<Vec<u8>>>,
    pending: HashMap<u64, Pending>,
    /// Why the last connection ended or the last attempt failed.
    last_error: String,
}

struct Shared {
    path: PathBuf,
    limits: QmpLimits,
    link: Mutex<Link>,
    next_id: AtomicU64,
    /// Commands sent, per command name (the names are the code's own, so
    /// the map is bounded by them).
    sent: Mutex<HashMap<&'static str, u64>>,
}

impl Shared {
    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count(&self, command: &'static str) {
        *self
            .sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(command)
            .or_default() += 1;
    }

    fn unreachable(&self, reason: impl Into<String>) -> QmpError {
        QmpError::Unreachable {
            path: self.path.display().to_string(),
            reason: reason.into(),
        }
    }

    fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.limits.command_timeout_ms)
    }
}

/// A persistent QMP connection to one socket. Dropping it stops the
/// connection task.
pub struct QmpClient {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("path", &self.shared.path)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Drop for QmpClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl QmpClient {
    /// Starts the connection task on the current tokio runtime (the caller
    /// must be inside one). `on_notice` sees every connect, event and
    /// disconnect, in order.
    pub fn start(path: &Path, limits: QmpLimits, on_notice: NoticeHandler) -> QmpClient {
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            limits,
            link: Mutex::new(Link::default()),
            next_id: AtomicU64::new(1),
            sent: Mutex::new(HashMap::new()),
        });
        let task = tokio::spawn(supervise(Arc::clone(&shared), on_notice));
        QmpClient { shared, task }
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub fn is_connected(&self) -> bool {
        self.shared.link().outgoing.is_some()
    }

    /// How many times `command` was sent, on any connection (handshake
    /// commands included). Tests use it to prove the absence of polling.
    pub fn commands_sent(&self, command: &str) -> u64 {
        let sent = self
            .shared
            .sent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        sent.get(command).copied().unwrap_or(0)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&self, command: &'static str, arguments: Option<Value>) -> Answer {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (answer, receiver) = oneshot::channel();
        let outgoing = {
            let mut link = self.shared.link();
            let Some(outgoing) = link.outgoing.clone() else {
                let reason = format!("not connected ({})", link.last_error);
                return Err(self.shared.unreachable(reason));
            };
            if link.pending.len() >= self.shared.limits.max_in_flight_commands {
                return Err(QmpError::Busy(link.pending.len()));
            }
            link.pending.insert(id, Pending { command, answer });
            outgoing
        };
        // Removes the entry however this future ends (answer, timeout, or
        // the caller giving up).
        let _guard = PendingGuard {
            shared: &self.shared,
            id,
        };
        let line = command_line(id, command, arguments);
        match outgoing.try_send(line) {
            Ok(()) => {}
            // Lines of commands that timed out may still wait for a write
            // QEMU does not take.
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(QmpError::Busy(self.shared.limits.max_in_flight_commands))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(self.shared.unreachable("connection closing"))
            }
        }
        self.shared.count(command);
        match timeout(self.shared.command_timeout(), receiver).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(self.shared.unreachable("connection closed")),
            Err(_) => Err(QmpError::Timeout {
                command,
                timeout_ms: self.shared.limits.command_timeout_ms,
            }),
        }
    }
}

struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.link().pending.remove(&self.id);
    }
}

fn command_line(id: u64, command: &str, arguments: Option<Value>) -> Vec<u8> {
    let mut message = json!({ "execute": command, "id": id });
    if let Some(arguments) = arguments {
        message["arguments"] = arguments;
    }
    let mut line = message.to_string().into_bytes();
    line.push(b'\n');
    line
}

/// The connection task: connect, serve, fail pending, back off, repeat.
async fn supervise(shared: Arc<Shared>, on_notice: NoticeHandler) {
    let min = shared.limits.reconnect_min_ms.max(1);
    let max = shared.limits.reconnect_max_ms.max(min);
    let mut backoff_ms = min;
    loop {
        match connect(&shared).await {
            Ok((connection, status)) => {
                backoff_ms = min;
                let reason = serve_connection(&shared, connection, status, &on_notice).await;
                tracing::warn!(path = %shared.path.display(), %reason, "QMP connection lost");
                on_notice(QmpNotice::Disconnected { reason });
            }
            Err(reason) => {
                tracing::debug!(path = %shared.path.display(), %reason, "QMP connect failed");
                shared.link().last_error = reason.clone();
                on_notice(QmpNotice::ConnectFailed { reason });
            }
        }
        tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
        backoff_ms = (backoff_ms * 2).min(max);
    }
}

/// Installs the connection for commands, serves it until it drops, then
/// fails whatever was pending. Returns why it dropped.
async fn serve_connection(
    shared: &Shared,
    connection: Connection,
    status: String,
    on_notice: &NoticeHandler,
) -> String {
    let (sender, receiver) = mpsc::channel(shared.limits.max_in_flight_commands.max(1));
    shared.link().outgoing = Some(sender);
    tracing::info!(path = %shared.path.display(), %status, "QMP connected");
    on_notice(QmpNotice::Connected { status });
    let reason = serve(shared, connection, receiver, on_notice).await;
    let pending = {
        let mut link = shared.link();
        link.outgoing = None;
        link.last_error = reason.clone();
        std::mem::take(&mut link.pending)
    };
    for (_, waiting) in pending {
        let _ = waiting
            .answer
            .send(Err(shared.unreachable(format!("connection lost: {reason}"))));
    }
    reason
}

struct Connection {
    reader: LineReader,
    writer: OwnedWriteHalf,
}

/// Connects and negotiates: greeting, `qmp_capabilities`, `query-status`.
async fn connect(shared: &Shared) -> Result<(Connection, String), String> {
    let limit = shared.command_timeout();
    let stream = timeout(limit, UnixStream::connect(&shared.path))
        .await
        .map_err(|_| format!("connect took longer than {limit:?}"))?
        .map_err(|e| format!("connect: {e}"))?;
    let (read_half, writer) = stream.into_split();
    let mut connection = Connection {
        reader: LineReader::new(read_half, shared.limits.max_line_bytes),
        writer,
    };
    // A QMP socket serves one client at a time: while another holds it,
    // the greeting never comes and this times out (then we retry).
    let greeting = timeout(limit, connection.reader.next_value())
        .await
        .map_err(|_| {
            format!("no QMP greeting within {limit:?} (another client may hold the socket)")
        })??;
    if !is_greeting(&greeting) {
        return Err("the socket's greeting is not QMP's".to_owned());
    }
    handshake_command(shared, &mut connection, "qmp_capabilities").await?;
    let status = handshake_command(shared, &mut connection, "query-status").await?;
    let status = status
        .get("status")
        .and_then(Value::as_str)
        .ok_or("query-status answered without a status")?
        .to_owned();
    Ok((connection, status))
}

/// Runs one command during the handshake, before events are dispatched;
/// events read meanwhile are older than the answer, so they are dropped.
async fn handshake_command(
    shared: &Shared,
    connection: &mut Connection,
    command: &'static str,
) -> Result<Value, String> {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let limit = shared.command_timeout();
    shared.count(command);
    timeout(limit, async {
        connection
            .writer
            .write_all(&command_line(id, command, None))
            .await
            .map_err(|e| format!("write: {e}"))?;
        loop {
            let message = connection.reader.next_value().await?;
            if message.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            return match parse_answer(command, message) {
                Ok(value) => Ok(value),
                Err(e) => Err(e.to_string()),
            };
        }
    })
    .await
    .map_err(|_| format!("no answer to {command} within {limit:?}"))?
}

/// `{"return": v}` → v; `{"error": {class, desc}}` → a command error.
/// Public only for the fuzz target.
#[doc(hidden)]
pub fn parse_answer(command: &'static str, mut message: Value) -> Answer {
    if let Some(value) = message.get_mut("return") {
        return Ok(value.take());
    }
    let error = message.get("error");
    let field = |name: &str| {
        error
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    Err(QmpError::Command {
        command,
        class: field("class"),
        desc: if error.is_some() {
            field("desc")
        } else {
            "an answer with neither return nor error".to_owned()
        },
    })
}

/// Moves lines both ways until the connection fails; returns why.
async fn serve(
    shared: &Shared,
    mut connection: Connection,
    mut outgoing: mpsc::Receiver<Vec<u8>>,
    on_notice: &NoticeHandler,
) -> String {
    let write_limit = shared.command_timeout();
    loop {
        tokio::select! {
            // Both branches are cancel-safe: a line is taken from the
            // reader's buffer only once complete, and `recv` loses nothing.
            message = connection.reader.next_value() => match message {
                Ok(message) => dispatch(shared, message, on_notice),
                Err(reason) => return reason,
            },
            line = outgoing.recv() => {
                let Some(line) = line else { return "client dropped".to_owned() };
                match timeout(write_limit, connection.writer.write_all(&line)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return format!("write: {e}"),
                    Err(_) => return format!("QEMU did not read a command within {write_limit:?}"),
                }
            }
        }
    }
}

/// What a message from QEMU is, by its fields. Public only for the fuzz
/// target.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// `{"event": name, "data": …}` (data `null` when absent).
    Event { name: String, data: Value },
    /// An answer (`return` or `error`) to the command with this `id`.
    Answer { id: u64 },
    /// Neither: ignored.
    Ignored,
}

/// Sorts one message; an `event` field wins over an `id`. Public only for
/// the fuzz target.
#[doc(hidden)]
pub fn classify(message: &Value) -> Incoming {
    if let Some(name) = message.get("event").and_then(Value::as_str) {
        let data = message.get("data").cloned().unwrap_or(Value::Null);
        return Incoming::Event {
            name: name.to_owned(),
            data,
        };
    }
    match message.get("id").and_then(Value::as_u64) {
        Some(id) => Incoming::Answer { id },
        None => Incoming::Ignored,
    }
}

/// Whether the first message of a connection is QMP's greeting
/// (`{"QMP": {"version": …, "capabilities": …}}`). Public only for the
/// fuzz target.
#[doc(hidden)]
pub fn is_greeting(message: &Value) -> bool {
    message.get("QMP").is_some()
}

/// An event goes to the handler; an answer to the command with its id.
fn dispatch(shared: &Shared, message: Value, on_notice: &NoticeHandler) {
    let id = match classify(&message) {
        Incoming::Event { name, data } => {
            on_notice(QmpNotice::Event { name, data });
            return;
        }
        Incoming::Answer { id } => id,
        Incoming::Ignored => {
            tracing::debug!("QMP message without event or id ignored");
            return;
        }
    };
    // An answer whose command timed out has no entry any more: dropped.
    let Some(waiting) = shared.link().pending.remove(&id) else {
        return;
    };
    let _ = waiting.answer.send(parse_answer(waiting.command, message));
}

/// Reads the socket into a [`LineFramer`] and yields its lines as JSON.
struct LineReader {
    half: OwnedReadHalf,
    framer: LineFramer,
}

impl LineReader {
    fn new(half: OwnedReadHalf, max_line_bytes: usize) -> Self {
        LineReader {
            half,
            framer: LineFramer::new(max_line_bytes),
        }
    }

    /// The next non-empty line as JSON. Cancel-safe: bytes move into the
    /// buffer only after a read completed.
    async fn next_value(&mut self) -> Result<Value, String> {
        loop {
            let line = self.next_line().await?;
            if let Some(value) = parse_line(&line)? {
                return Ok(value);
            }
        }
    }

    async fn next_line(&mut self) -> Result<Vec<u8>, String> {
        loop {
            if let Some(line) = self.framer.next_line()? {
                return Ok(line);
            }
            let mut chunk = [0u8; READ_CHUNK_BYTES];
            match self.half.read(&mut chunk).await {
                Ok(0) => return Err("QEMU closed the QMP connection".to_owned()),
                Ok(n) => self.framer.push(&chunk[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

/// Splits a byte stream into lines of at most `max_line_bytes` (the
/// newline not counted), without IO: [`LineReader`] pushes what it reads
/// and takes lines out. Public only for the fuzz target (`fuzz/`); the
/// client is the API.
#[doc(hidden)]
#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    /// Bytes at the front of `buf` already taken as lines. Taking a line
    /// only moves this offset; the taken bytes are dropped once per read
    /// (in [`LineFramer::push`]), so a read holding k lines costs one move
    /// of the partial line, not k moves of everything after each line.
    taken: usize,
    /// Bytes of `buf` after `taken` known to hold no newline.
    scanned: usize,
    max_line_bytes: usize,
}

impl LineFramer {
    /// An empty framer.
    pub fn new(max_line_bytes: usize) -> Self {
        LineFramer {
            buf: Vec::new(),
            taken: 0,
            scanned: 0,
            max_line_bytes,
        }
    }

    /// Appends bytes read from the stream. Call only after
    /// [`LineFramer::next_line`] answered `Ok(None)`, so the buffer stays
    /// within `max_line_bytes` plus one read.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.drain(..self.taken);
        self.taken = 0;
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole line without its newline; `Ok(None)` when more bytes
    /// are needed; an error (for the log) when the line in progress is
    /// longer than `max_line_bytes`, which ends the stream.
    pub fn next_line(&mut self) -> Result<Option<Vec<u8>>, String> {
        let from = self.taken + self.scanned;
        if let Some(offset) = self.buf[from..].iter().position(|&b| b == b'\n') {
            let end = from + offset;
            if end - self.taken > self.max_line_bytes {
                return Err(self.too_long());
            }
            let line = self.buf[self.taken..end].to_vec();
            self.taken = end + 1;
            self.scanned = 0;
            return Ok(Some(line));
        }
        self.scanned = self.buffered_bytes();
        if self.buffered_bytes() > self.max_line_bytes {
            return Err(self.too_long());
        }
        Ok(None)
    }

    /// Bytes held (a partial line and any lines not taken yet).
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len() - self.taken
    }

    fn too_long(&self) -> String {
        format!("QEMU sent a line longer than {} bytes", self.max_line_bytes)
    }
}

/// One line as JSON; `Ok(None)` for a blank line (skipped). Public only
/// for the fuzz target.
#[doc(hidden)]
pub fn parse_line(line: &[u8]) -> Result<Option<Value>, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(line)
        .map(Some)
        .map_err(|e| format!("QEMU sent a line that is not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader, Lines};
    use tokio::net::UnixListener;

    #[test]
    fn the_framer_splits_lines_across_reads_and_bounds_them() {
        let mut framer = LineFramer::new(8);
        assert_eq!(framer.next_line(), Ok(None));
        framer.push(b"{\"a\":");
        assert_eq!(framer.next_line(), Ok(None));
        framer.push(b"1}\r\n\n{}\n{\"b");
        assert_eq!(framer.next_line(), Ok(Some(b"{\"a\":1}\r".to_vec())));
        assert_eq!(framer.next_line(), Ok(Some(Vec::new())));
        assert_eq!(framer.next_line(), Ok(Some(b"{}".to_vec())));
        assert_eq!(framer.next_line(), Ok(None));
        assert_eq!(framer.buffered_bytes(), 3);
        // Eight bytes are allowed, a ninth without a newline is not.
        framer.push(b"\":22}");
        assert_eq!(framer.next_line(), Ok(None));
        framer.push(b"x");
        let error = framer.next_line().unwrap_err();
        assert!(error.contains("longer than 8 bytes"), "{error}");
        // A complete line over the limit fails too.
        let mut framer = LineFramer::new(2);
        framer.push(b"abc\n");
        assert!(framer.next_line().is_err());
    }

    #[test]
    fn taking_lines_moves_no_bytes_until_the_next_read() {
        // One read holding many lines: each line is taken where it lies;
        // the taken bytes are dropped once, when the next read comes.
        let mut framer = LineFramer::new(16);
        let lines: Vec<String> = (0..1000).map(|n| format!("{{\"n\":{n}}}")).collect();
        let mut read = lines.join("\n").into_bytes();
        read.extend_from_slice(b"\n{\"par");
        framer.push(&read);
        let mut left = read.len();
        for line in &lines {
            assert_eq!(framer.next_line(), Ok(Some(line.as_bytes().to_vec())));
            left -= line.len() + 1;
            assert_eq!(framer.buffered_bytes(), left);
            assert_eq!(
                framer.buf.len(),
                read.len(),
                "a taken line moved the buffer"
            );
        }
        assert_eq!(framer.next_line(), Ok(None));
        assert_eq!(framer.buffered_bytes(), 5);
        framer.push(b"tial\":1}\n");
        assert_eq!(framer.buf, b"{\"partial\":1}\n".to_vec());
        assert_eq!(framer.next_line(), Ok(Some(b"{\"partial\":1}".to_vec())));
        assert_eq!(framer.next_line(), Ok(None));
        assert_eq!(framer.buffered_bytes(), 0);
        // The bound counts the line in progress only, not the taken bytes.
        framer.push(b"0123456789abcdef");
        assert_eq!(framer.next_line(), Ok(None));
        framer.push(b"\n");
        assert_eq!(framer.next_line(), Ok(Some(b"0123456789abcdef".to_vec())));
        framer.push(b"0123456789abcdefg");
        assert!(framer.next_line().is_err());
    }

    #[test]
    fn lines_are_read_as_qmp_messages() {
        assert_eq!(parse_line(b" \r"), Ok(None));
        assert!(parse_line(b"{not json").unwrap_err().contains("not JSON"));
        let greeting = parse_line(br#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#)
            .unwrap()
            .unwrap();
        assert!(is_greeting(&greeting));
        let event = json!({"event": "STOP", "timestamp": {"seconds": 1}});
        assert_eq!(
            classify(&event),
            Incoming::Event {
                name: "STOP".to_owned(),
                data: Value::Null
            }
        );
        assert!(!is_greeting(&event));
        // An event name wins over an id; an id must be unsigned.
        let both = json!({"event": "RESUME", "id": 3, "data": {"x": 1}});
        assert!(matches!(classify(&both), Incoming::Event { ref data, .. } if data["x"] == 1));
        assert_eq!(
            classify(&json!({"id": 3, "return": {}})),
            Incoming::Answer { id: 3 }
        );
        assert_eq!(
            classify(&json!({"id": -3, "return": {}})),
            Incoming::Ignored
        );
        assert_eq!(classify(&json!({"event": 7})), Incoming::Ignored);
    }

    /// The server side of one QMP connection, scripted by each test.
    struct FakeConnection {
        lines: Lines<BufReader<OwnedReadHalf>>,
        writer: OwnedWriteHalf,
    }

    impl FakeConnection {
        /// Accepts a client, greets it and answers its handshake with
        /// `status`.
        async fn accept(listener: &UnixListener, status: &str) -> FakeConnection {
            let (stream, _) = listener.accept().await.unwrap();
            let (read_half, writer) = stream.into_split();
            let mut connection = FakeConnection {
                lines: BufReader::new(read_half).lines(),
                writer,
            };
            connection
                .send(json!({"QMP": {"version": {}, "capabilities": ["oob"]}}))
                .await;
            let (name, id) = connection.command().await;
            assert_eq!(name, "qmp_capabilities");
            connection.send(json!({"return": {}, "id": id})).await;
            let (name, id) = connection.command().await;
            assert_eq!(name, "query-status");
            // An event before the answer is older than it: not dispatched.
            connection.send(json!({"event": "OLD"})).await;
            connection
                .send(json!({"return": {"status": status, "running": true}, "id": id}))
                .await;
            connection
        }

        async fn command(&mut self) -> (String, Value) {
            let line = self.lines.next_line().await.unwrap().unwrap();
            let message: Value = serde_json::from_str(&line).unwrap();
            (
                message["execute"].as_str().unwrap().to_owned(),
                message["id"].clone(),
            )
        }

        async fn send(&mut self, message: Value) {
            self.send_raw(format!("{message}\n").as_bytes()).await;
        }

        async fn send_raw(&mut self, bytes: &[u8]) {
            self.writer.write_all(bytes).await.unwrap();
        }
    }

    fn limits() -> QmpLimits {
        QmpLimits {
            command_timeout_ms: 2_000,
            reconnect_min_ms: 10,
            reconnect_max_ms: 50,
            ..QmpLimits::default()
        }
    }

    /// A client on a fresh socket path, and its notices.
    fn client(
        dir: &tempfile::TempDir,
        limits: QmpLimits,
    ) -> (UnixListener, QmpClient, mpsc::UnboundedReceiver<QmpNotice>) {
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (sender, notices) = mpsc::unbounded_channel();
        let handler: NoticeHandler = Arc::new(move |notice| {
            let _ = sender.send(notice);
        });
        (listener, QmpClient::start(&path, limits, handler), notices)
    }

    /// The next notice other than failed connection attempts.
    async fn next_notice(notices: &mut mpsc::UnboundedReceiver<QmpNotice>) -> QmpNotice {
        loop {
            let notice = timeout(Duration::from_secs(5), notices.recv())
                .await
                .expect("a notice in time")
                .expect("notices open");
            if !matches!(notice, QmpNotice::ConnectFailed { .. }) {
                return notice;
            }
        }
    }

    #[tokio::test]
    async fn answers_are_matched_by_id_and_events_arrive_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, client, mut notices) = client(&dir, limits());
        let server = tokio::spawn(async move {
            let mut connection = FakeConnection::accept(&listener, "paused").await;
            let (first, first_id) = connection.command().await;
            let (second, second_id) = connection.command().await;
            connection
                .send(json!({"event": "STOP", "data": {"x": 1}}))
                .await;
            // Answers in the opposite order, split across writes.
            let answer = format!("{}\n", json!({"return": {"name": second}, "id": second_id}));
            let (head, tail) = answer.split_at(5);
            connection.send_raw(head.as_bytes()).await;
            connection.send_raw(tail.as_bytes()).await;
            connection
                .send(json!({"return": {"name": first}, "id": first_id}))
                .await;
            connection.send(json!({"event": "RESUME"})).await;
            connection
        });
        assert_eq!(
            next_notice(&mut notices).await,
            QmpNotice::Connected {
                status: "paused".into()
            }
        );
        let (a, b) = tokio::join!(
            client.execute("query-a", None),
            client.execute("query-b", Some(json!({"k": "v"})))
        );
        assert_eq!(a.unwrap()["name"], "query-a");
        assert_eq!(b.unwrap()["name"], "query-b");
        assert_eq!(
            next_notice(&mut notices).await,
            QmpNotice::Event {
                name: "STOP".into(),
                data: json!({"x": 1})
            }
        );
        assert_eq!(
            next_notice(&mut notices).await,
            QmpNotice::Event {
                name: "RESUME".into(),
                data: Value::Null
            }
        );
        assert_eq!(client.commands_sent("query-status"), 1);
        assert_eq!(client.commands_sent("qmp_capabilities"), 1);
        assert_eq!(client.commands_sent("query-a"), 1);
        assert_eq!(client.commands_sent("stop"), 0);
        drop(server.await.unwrap());
    }

    #[tokio::test]
    async fn errors_timeouts_and_the_in_flight_bound() {
        let dir = tempfile::tempdir().unwrap();
        let tight = QmpLimits {
            command_timeout_ms: 200,
            max_in_flight_commands: 2,
            ..limits()
        };
        let (listener, client, mut notices) = client(&dir, tight);
        let server = tokio::spawn(async move {
            let mut connection = FakeConnection::accept(&listener, "running").await;
            let (_, id) = connection.command().await;
            connection
                .send(
                    json!({"error": {"class": "GenericError", "desc": "no such thing"}, "id": id}),
                )
                .await;
            // Then never answer again, but keep the connection.
            while connection.lines.next_line().await.ok().flatten().is_some() {}
        });
        assert!(matches!(
            next_notice(&mut notices).await,
            QmpNotice::Connected { .. }
        ));
        let e = client.execute("screendump", None).await.unwrap_err();
        assert!(
            matches!(&e, QmpError::Command { command: "screendump", class, desc } if class == "GenericError" && desc == "no such thing"),
            "{e}"
        );
        let started = std::time::Instant::now();
        let (a, b, c) = tokio::join!(
            client.execute("hang-1", None),
            client.execute("hang-2", None),
            client.execute("hang-3", None)
        );
        assert!(matches!(
            a,
            Err(QmpError::Timeout {
                command: "hang-1",
                timeout_ms: 200
            })
        ));
        assert!(matches!(b, Err(QmpError::Timeout { .. })));
        assert!(matches!(c, Err(QmpError::Busy(2))), "{c:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // Timed-out commands left no entries behind.
        assert!(client.shared.link().pending.is_empty());
        server.abort();
    }

    #[tokio::test]
    async fn a_dead_connection_fails_pending_commands_and_is_reconnected() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, client, mut notices) = client(&dir, limits());
        let listener = Arc::new(listener);
        let first = Arc::clone(&listener);
        let server = tokio::spawn(async move {
            let mut connection = FakeConnection::accept(&first, "running").await;
            let _ = connection.command().await;
            drop(connection);
        });
        assert!(matches!(
            next_notice(&mut notices).await,
            QmpNotice::Connected { .. }
        ));
        let e = client.execute("query-vnc", None).await.unwrap_err();
        assert!(
            matches!(e, QmpError::Unreachable { ref reason, .. } if reason.contains("connection lost")),
            "{e}"
        );
        assert!(matches!(
            next_notice(&mut notices).await,
            QmpNotice::Disconnected { .. }
        ));
        server.await.unwrap();
        // While nobody answers, commands fail at once.
        let e = client.execute("query-vnc", None).await.unwrap_err();
        assert!(matches!(e, QmpError::Unreachable { .. }), "{e}");
        // The client comes back by itself.
        let second = Arc::clone(&listener);
        let server = tokio::spawn(async move {
            let mut connection = FakeConnection::accept(&second, "paused").await;
            let (_, id) = connection.command().await;
            connection
                .send(json!({"return": {"ok": true}, "id": id}))
                .await;
            connection
        });
        assert_eq!(
            next_notice(&mut notices).await,
            QmpNotice::Connected {
                status: "paused".into()
            }
        );
        assert_eq!(client.execute("query-vnc", None).await.unwrap()["ok"], true);
        assert_eq!(client.commands_sent("query-status"), 2);
        drop(server.await.unwrap());
    }

    #[tokio::test]
    async fn long_lines_and_garbage_drop_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let small = QmpLimits {
            max_line_bytes: 1024,
            ..limits()
        };
        let (listener, client, mut notices) = client(&dir, small);
        let server = tokio::spawn(async move {
            let mut connection = FakeConnection::accept(&listener, "running").await;
            connection.send_raw(&[b' '; 2000]).await;
            let mut connection = FakeConnection::accept(&listener, "running").await;
            connection.send_raw(b"{not json\n").await;
            // Not QMP at all.
            let (stream, _) = listener.accept().await.unwrap();
            let (_, mut writer) = stream.into_split();
            writer.write_all(b"{\"hello\": 1}\n").await.unwrap();
            (connection, writer)
        });
        assert!(matches!(
            next_notice(&mut notices).await,
            QmpNotice::Connected { .. }
        ));
        match next_notice(&mut notices).await {
            QmpNotice::Disconnected { reason } => {
                assert!(reason.contains("longer than 1024"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            next_notice(&mut notices).await,
            QmpNotice::Connected { .. }
        ));
        match next_notice(&mut notices).await {
            QmpNotice::Disconnected { reason } => assert!(reason.contains("not JSON"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let failed = loop {
            match timeout(Duration::from_secs(5), notices.recv())
                .await
                .unwrap()
                .unwrap()
            {
                QmpNotice::ConnectFailed { reason } if reason.contains("not QMP") => break reason,
                _ => continue,
            }
        };
        assert!(failed.contains("greeting"), "{failed}");
        assert!(!client.is_connected());
        drop(server.await.unwrap());
    }
}
