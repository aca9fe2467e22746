//! The live event endpoints on the control port: `/ws/monitor`,
//! `/ws/vm/{vm_id}`, `/ws/server/{hypervisor_id}` and `/ws/stats` (admin).
//!
//! Each request is authenticated before the upgrade (a bearer token in
//! `Authorization` or, since browsers cannot set headers on a WebSocket,
//! `?token=`): 401 / 403 / 404 / 503 as JSON, like the REST API. Without a
//! token, and only with `[events] allow_anonymous`, a client may join the
//! public rooms and sees public events only.
//!
//! After the upgrade, events are written to the connection's socket by the
//! fan-out itself ([`crate::events::sink`]), and one task per connection
//! reads the client's messages ([`crate::events::protocol`]) through
//! tungstenite, answers them, and writes out what the socket did not take
//! at once when it becomes writable. Why the upgrade is done here and not
//! with axum's `WebSocketUpgrade`: that hands over a socket only its own
//! task may write to, so every event cost a task wake-up and a re-framing
//! per subscriber.
//!
//! Also here: the periodic refresh of the VM lists (an event source that
//! needs the control plane's state).

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext};
use tungstenite::Message;

use super::api::{forbidden, ApiError, ApiResult};
use super::conn::ControlPeer;
use super::ControlState;
use crate::auth::Need;
use crate::events::bus::now_ms;
use crate::events::protocol::{
    error_data, message, parse_client, ClientMessage, ProtocolError, MAX_CLIENT_MESSAGE_BYTES,
};
use crate::events::sink::{text_frame, Sink};
use crate::events::{Room, Subscription, Visibility};
use crate::hypervisor::queue::Lane;

/// Close code for a policy violation (bad auth after the upgrade, message
/// rate, garbage, a subscriber that stays behind).
const CLOSE_POLICY: u16 = 1008;
/// Close code "try again later" (the bus filled up during the upgrade).
const CLOSE_TRY_AGAIN: u16 = 1013;
/// A send the client does not take within this long (it stopped reading
/// and its TCP window is full) ends the connection: it would otherwise
/// hold its socket buffers forever.
const SEND_TIMEOUT_MS: u64 = 10_000;
/// A subscriber told it lagged this many times without catching up in
/// between (its queue empty) is closed.
const MAX_LAG_NOTICES: u32 = 3;
/// Invalid messages in a row before the connection is closed.
const MAX_INVALID_MESSAGES_IN_ROW: u32 = 10;
/// Bytes read from a connection at a time, and tungstenite's read buffer,
/// per connection. Why small: clients send little (subscriptions, pings),
/// and an idle subscriber must stay cheap; a longer message (up to
/// `MAX_CLIENT_MESSAGE_BYTES`) takes several reads.
const READ_CHUNK_BYTES: usize = 1024;
/// After our close frame, how long the client's close (or its end) is
/// awaited, reading and discarding what it still sends: closing at once
/// would answer its late messages with a reset, which can destroy the
/// close frame before the client reads it.
const CLOSE_WAIT_MS: u64 = 1_000;

pub fn routes() -> Router<Arc<ControlState>> {
    Router::new()
        .route("/ws/monitor", get(monitor))
        .route("/ws/vm/{vm_id}", get(vm_room))
        .route("/ws/server/{hypervisor_id}", get(server_room))
        .route("/ws/stats", get(stats_room))
}

#[derive(Debug, Default, Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

type TokenParam = Result<Query<TokenQuery>, QueryRejection>;

async fn monitor(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    query: TokenParam,
    request: Request,
) -> Response {
    let visibility = match authenticate(&state, &headers, query, Need::Any, true) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    upgrade(state, request, Room::Monitor, visibility)
}

async fn vm_room(
    State(state): State<Arc<ControlState>>,
    Path(vm_id): Path<String>,
    headers: HeaderMap,
    query: TokenParam,
    request: Request,
) -> Response {
    let visibility = match authenticate(&state, &headers, query, Need::Any, true) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let vm = match state.fleet.resolve(&vm_id, Lane::Normal).await {
        Ok(found) => found.id,
        Err(e) => {
            state.count_error(e.code());
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::NOT_FOUND);
            return ApiError::new(status, e.code(), e.to_string()).into_response();
        }
    };
    if let Visibility::Viewer { vms, .. } = &visibility {
        let native = vm.split_once(':').map_or(vm.as_str(), |(_, n)| n);
        if !vms.allows(&[vm.as_str(), native]) {
            state.count_error("auth_forbidden");
            return forbidden(format!("the token does not allow VM {vm:?}")).into_response();
        }
    }
    upgrade(state, request, Room::Vm(vm), visibility)
}

async fn server_room(
    State(state): State<Arc<ControlState>>,
    Path(server): Path<String>,
    headers: HeaderMap,
    query: TokenParam,
    request: Request,
) -> Response {
    let visibility = match authenticate(&state, &headers, query, Need::Any, true) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    if !state.fleet.members().iter().any(|m| m.id == server) {
        state.count_error("hypervisor_not_found");
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "hypervisor_not_found",
            format!("no hypervisor {:?}", clip(&server)),
        )
        .into_response();
    }
    upgrade(state, request, Room::Server(server), visibility)
}

async fn stats_room(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    query: TokenParam,
    request: Request,
) -> Response {
    let visibility = match authenticate(&state, &headers, query, Need::Admin, false) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    upgrade(state, request, Room::Stats, visibility)
}

fn clip(text: &str) -> &str {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Who connects: a token from `Authorization: Bearer` or `?token=`; none
/// is anonymous (public rooms, with `allow_anonymous`) or 401.
fn authenticate(
    state: &ControlState,
    headers: &HeaderMap,
    query: TokenParam,
    need: Need,
    public_room: bool,
) -> ApiResult<Visibility> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let token = from_header.or_else(|| query.ok().and_then(|Query(q)| q.token));
    let token = token.filter(|t| !t.is_empty());
    if token.is_none() && public_room && state.cfg.events.allow_anonymous {
        return Ok(Visibility::Anonymous);
    }
    // The REST API's own check (counts, log line, 401 / 403 bodies).
    let principal = super::api::authorize_token(
        state,
        token.as_deref(),
        "missing token (Authorization: Bearer <token>, or ?token=<token>)",
        need,
    )?;
    Ok(Visibility::of(&principal))
}

/// Why a request is not a WebSocket upgrade (RFC 6455 4.2.1), or the
/// `Sec-WebSocket-Accept` value answering it.
fn accept_key(request: &Request) -> Result<String, &'static str> {
    fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    }
    let headers = request.headers();
    if request.method() != Method::GET {
        return Err("the method must be GET");
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err("Connection: upgrade is missing");
    }
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err("Upgrade: websocket is missing");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return Err("Sec-WebSocket-Version must be 13");
    }
    match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(key) if !key.is_empty() => {
            Ok(tungstenite::handshake::derive_accept_key(key.as_bytes()))
        }
        _ => Err("Sec-WebSocket-Key is missing"),
    }
}

fn upgrade(
    state: Arc<ControlState>,
    mut request: Request,
    room: Room,
    visibility: Visibility,
) -> Response {
    let accept = match accept_key(&request) {
        Ok(accept) => accept,
        Err(why) => {
            state.count_error("events_not_websocket");
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("a WebSocket upgrade is expected: {why}"),
            )
            .into_response();
        }
    };
    if state.events.is_full() {
        state.count_error("events_too_many_subscribers");
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_subscribers",
            format!(
                "{} event subscribers are connected already",
                state.events.limits().max_subscribers
            ),
        );
        e.retry_after_s = Some(5);
        return e.into_response();
    }
    let stream = request
        .extensions()
        .get::<ConnectInfo<ControlPeer>>()
        .and_then(|ConnectInfo(peer)| peer.stream());
    let Some(stream) = stream else {
        // Served without the control listener (in-process tests), or the
        // connection is already gone.
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the connection's socket is not available for an event stream",
        )
        .into_response();
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        // The client left before the switch completed: nothing to serve.
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut connection = Connection::new(state, stream, upgraded, visibility);
        connection.run(room).await;
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// What ends a connection.
enum End {
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The client closed: write out what is queued (its close answered),
    /// then let go.
    Closed,
    /// The peer is gone or stuck: just drop the socket.
    Drop,
}

/// A client's message allowance: `messages_per_s`, bursting to as many.
struct MessageRate {
    per_s: f64,
    tokens: f64,
    last: Instant,
}

impl MessageRate {
    fn new(per_s: u32) -> MessageRate {
        MessageRate {
            per_s: f64::from(per_s),
            tokens: f64::from(per_s),
            last: Instant::now(),
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_s).min(self.per_s);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// tungstenite's view of the connection: it reads the bytes just read
/// from the socket, and what it writes (answers to pings, its close
/// frames) is collected for the sink, so every frame leaves in order
/// through one place.
struct Wiring<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Wiring<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Wiring<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What reading the client's bytes came to.
enum Reading {
    /// Every whole message was handled; more bytes are awaited.
    More,
    /// The connection ends.
    End(End),
}

struct Connection {
    state: Arc<ControlState>,
    /// The socket, to wait until it is writable (writes go through the sink).
    stream: Arc<TcpStream>,
    /// The socket's reading side, as hyper handed it over.
    reader: TokioIo<hyper::upgrade::Upgraded>,
    websocket: WebSocketContext,
    chunk: Box<[u8]>,
    visibility: Visibility,
    rate: MessageRate,
    invalid_in_row: u32,
    lag_notices: u32,
    /// While frames wait for the socket: when it must have taken some.
    write_deadline: Option<tokio::time::Instant>,
}

impl Connection {
    fn new(
        state: Arc<ControlState>,
        stream: Arc<TcpStream>,
        upgraded: hyper::upgrade::Upgraded,
        visibility: Visibility,
    ) -> Connection {
        let rate = MessageRate::new(state.cfg.events.messages_per_s);
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_CHUNK_BYTES)
            .max_message_size(Some(MAX_CLIENT_MESSAGE_BYTES))
            .max_frame_size(Some(MAX_CLIENT_MESSAGE_BYTES));
        Connection {
            state,
            stream,
            reader: TokioIo::new(upgraded),
            websocket: WebSocketContext::new(Role::Server, Some(config)),
            chunk: vec![0; READ_CHUNK_BYTES].into_boxed_slice(),
            visibility,
            rate,
            invalid_in_row: 0,
            lag_notices: 0,
            write_deadline: None,
        }
    }

    async fn run(&mut self, room: Room) {
        let wire: Arc<dyn crate::events::Wire> = self.stream.clone();
        let sub = match self
            .state
            .events
            .subscribe_on(room.clone(), self.visibility.clone(), wire)
        {
            Ok(sub) => sub,
            Err(e) => {
                // Not registered: a sink of its own for the close.
                let sink = Sink::new(self.stream.clone(), 0);
                tracing::debug!(error = %e, "event subscriber refused");
                self.finish(
                    &sink,
                    End::Close(CLOSE_TRY_AGAIN, "too many event subscribers"),
                )
                .await;
                return;
            }
        };
        // No await since the subscription: the welcome is the first frame
        // (events are published on this same thread).
        let welcome = json!({
            "room": room.label(),
            "anonymous": self.visibility == Visibility::Anonymous,
            "subscription": sub.update_filter(|_| {}).to_json(),
        });
        let end = match self.send_message(sub.sink(), "welcome", &welcome) {
            Ok(()) => self.serve(&sub, room == Room::Stats).await,
            Err(end) => end,
        };
        let sink = sub.sink().clone();
        drop(sub);
        self.finish(&sink, end).await;
    }

    async fn serve(&mut self, sub: &Subscription, stats: bool) -> End {
        let interval = Duration::from_millis(self.state.cfg.events.stats_interval_ms);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_published = (Instant::now(), sub.bus().stats().events_published_total);
        let sink = sub.sink().clone();
        loop {
            if let Err(end) = self.write_out(&sink) {
                return end;
            }
            let waiting = self.write_deadline.is_some();
            let deadline = self
                .write_deadline
                .unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                read = self.reader.read(&mut self.chunk) => {
                    let n = match read {
                        Ok(0) | Err(_) => return End::Drop,
                        Ok(n) => n,
                    };
                    if let Reading::End(end) = self.on_bytes(n, sub) {
                        return end;
                    }
                }
                () = sink.notified() => {}
                ready = self.stream.writable(), if waiting => {
                    if ready.is_err() {
                        return End::Drop;
                    }
                }
                () = tokio::time::sleep_until(deadline), if waiting => {
                    self.state.count_error("events_send_timeout");
                    return End::Drop;
                }
                _ = ticker.tick(), if stats => {
                    let figures = stats_figures(sub, &mut last_published);
                    if let Err(end) = self.send_message(&sink, "stats", &figures) {
                        return end;
                    }
                }
            }
        }
    }

    /// Write out what waits for the socket, tell the client when events
    /// were dropped for it (a `lagged` notice; too many without catching
    /// up in between end the connection), and keep the deadline by which
    /// a stalled socket must take something.
    fn write_out(&mut self, sink: &Sink) -> Result<(), End> {
        let (written, empty) = sink.write_queued().map_err(|_| End::Drop)?;
        let dropped = sink.take_dropped();
        if dropped > 0 {
            self.lag_notices += 1;
            if self.lag_notices > MAX_LAG_NOTICES {
                self.state.count_error("events_subscriber_lagging");
                return Err(End::Close(
                    CLOSE_POLICY,
                    "subscriber too slow: it stayed behind after lagged notices",
                ));
            }
            self.send_message(sink, "lagged", &json!({"dropped": dropped}))?;
        } else if empty {
            self.lag_notices = 0;
        }
        self.write_deadline = if !sink.has_queued() {
            None
        } else if written > 0 || self.write_deadline.is_none() {
            Some(tokio::time::Instant::now() + Duration::from_millis(SEND_TIMEOUT_MS))
        } else {
            self.write_deadline
        };
        Ok(())
    }

    /// Hand `n` bytes just read to tungstenite and handle every message
    /// they complete.
    fn on_bytes(&mut self, n: usize, sub: &Subscription) -> Reading {
        let chunk = std::mem::take(&mut self.chunk);
        let mut wiring = Wiring {
            input: &chunk[..n],
            output: Vec::new(),
        };
        let outcome = loop {
            let read = self.websocket.read(&mut wiring);
            if let Err(end) = self.pass_on(sub.sink(), &mut wiring.output) {
                break Reading::End(end);
            }
            match read {
                Ok(Message::Close(_)) => {
                    // tungstenite queued the answering close: out with it.
                    let _ = self.websocket.flush(&mut wiring);
                    let _ = self.pass_on(sub.sink(), &mut wiring.output);
                    break Reading::End(End::Closed);
                }
                Ok(msg) => {
                    if let Err(end) = self.on_client_message(msg, sub) {
                        break Reading::End(end);
                    }
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    break Reading::More;
                }
                // A protocol error, a message too large, or the client's
                // close already answered: nothing more to read.
                Err(_) => break Reading::End(End::Drop),
            }
        };
        self.chunk = chunk;
        outcome
    }

    /// What tungstenite wrote (pongs, close frames), to the sink.
    fn pass_on(&self, sink: &Sink, output: &mut Vec<u8>) -> Result<(), End> {
        if output.is_empty() {
            return Ok(());
        }
        self.send_own(sink, Bytes::from(std::mem::take(output)))
    }

    fn on_client_message(&mut self, msg: Message, sub: &Subscription) -> Result<(), End> {
        let text = match msg {
            Message::Text(text) => text,
            Message::Binary(_) => tungstenite::Utf8Bytes::from_static(""),
            // Pings are answered by tungstenite; a close ends the
            // connection (handled by the caller).
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {
                return Ok(())
            }
        };
        if !self.rate.take(Instant::now()) {
            self.state.count_error("events_message_rate");
            return Err(End::Close(CLOSE_POLICY, "message rate exceeded"));
        }
        let parsed = if text.as_str().is_empty() {
            Err(ProtocolError::Binary)
        } else {
            parse_client(text.as_str())
        };
        match parsed.and_then(|m| self.apply(m, sub)) {
            Ok((kind, data)) => {
                self.invalid_in_row = 0;
                self.send_message(sub.sink(), kind, &data)
            }
            Err(e) => {
                self.invalid_in_row += 1;
                self.state.count_error("events_invalid_message");
                if self.invalid_in_row > MAX_INVALID_MESSAGES_IN_ROW {
                    return Err(End::Close(CLOSE_POLICY, "too many invalid messages"));
                }
                self.send_message(sub.sink(), "error", &error_data(&e))
            }
        }
    }

    /// Carry out a client's message; the answer's type and data.
    fn apply(
        &self,
        msg: ClientMessage,
        sub: &Subscription,
    ) -> Result<(&'static str, Value), ProtocolError> {
        match msg {
            ClientMessage::Subscribe(change) => {
                if let Some(kind) = change
                    .events
                    .iter()
                    .flatten()
                    .find(|k| !self.visibility.may_subscribe(**k))
                {
                    return Err(ProtocolError::EventNotAllowed(kind.name()));
                }
                let mut result = Ok(());
                let filter = sub.update_filter(|f| result = f.subscribe(&change));
                result.map(|()| ("subscribed", filter.to_json()))
            }
            ClientMessage::Unsubscribe(change) => {
                let filter = sub.update_filter(|f| f.unsubscribe(&change));
                Ok(("unsubscribed", filter.to_json()))
            }
            ClientMessage::Ping(data) => Ok(("pong", data)),
        }
    }

    fn send_message(&self, sink: &Sink, kind: &str, data: &Value) -> Result<(), End> {
        let text = message(kind, data, now_ms());
        self.send_own(sink, text_frame(text.as_bytes()))
    }

    fn send_own(&self, sink: &Sink, frame: Bytes) -> Result<(), End> {
        sink.send_own(frame).map_err(|e| {
            if matches!(e, crate::events::sink::SinkError::Overflow) {
                self.state.count_error("events_send_timeout");
            }
            End::Drop
        })
    }

    /// End the connection: for a close of ours, send it and wait (at most
    /// [`CLOSE_WAIT_MS`]) for the client's, reading and discarding what it
    /// still sends, since closing at once would answer its late messages
    /// with a reset, which can destroy the close frame before the client
    /// reads it; after the client's close, write out what is queued (its
    /// answer) within the same time.
    async fn finish(&mut self, sink: &Sink, end: End) {
        let mut wiring = Wiring {
            input: &[],
            output: Vec::new(),
        };
        match end {
            End::Drop => return,
            End::Closed => {}
            End::Close(code, reason) => {
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: tungstenite::Utf8Bytes::from_static(reason),
                };
                let _ = self.websocket.close(&mut wiring, Some(frame));
                let _ = self.websocket.flush(&mut wiring);
                if self.pass_on(sink, &mut wiring.output).is_err() {
                    return;
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(CLOSE_WAIT_MS), async {
            loop {
                let Ok((_, empty)) = sink.write_queued() else {
                    return;
                };
                let client_closed = !self.websocket.can_read();
                if empty && client_closed {
                    return;
                }
                tokio::select! {
                    read = self.reader.read(&mut self.chunk) => {
                        let Ok(n) = read else { return };
                        if n == 0 {
                            return;
                        }
                        let chunk = std::mem::take(&mut self.chunk);
                        let mut input = Wiring { input: &chunk[..n], output: Vec::new() };
                        while self.websocket.read(&mut input).is_ok() {}
                        self.chunk = chunk;
                    }
                    ready = self.stream.writable(), if !empty => {
                        if ready.is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .await;
    }
}

/// `/ws/stats`' message: the bus's figures and the event rate since the
/// last one.
fn stats_figures(sub: &Subscription, last: &mut (Instant, u64)) -> Value {
    let stats = sub.bus().stats();
    let now = Instant::now();
    let seconds = now.saturating_duration_since(last.0).as_secs_f64();
    let published = stats.events_published_total;
    let per_s = if seconds > 0.0 {
        published.saturating_sub(last.1) as f64 / seconds
    } else {
        0.0
    };
    *last = (now, published);
    let mut value = serde_json::to_value(&stats).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.insert(
            "events_per_s".into(),
            json!((per_s * 100.0).round() / 100.0),
        );
    }
    value
}

/// The control plane's own event source here: the periodic refresh of
/// the VM lists (the port pool's alert is an alert detector's:
/// `control/alert_sources.rs`).
pub async fn background(state: Arc<ControlState>) {
    let refresh_ms = state.cfg.events.vm_refresh_interval_ms;
    if refresh_ms == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(refresh_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        state.fleet.refresh_lists().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, headers: &[(&str, &str)]) -> Request {
        let mut builder = axum::http::Request::builder()
            .method(method)
            .uri("/ws/monitor");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn the_upgrade_is_checked_and_answered_as_rfc_6455_says() {
        let good = [
            ("Connection", "keep-alive, Upgrade"),
            ("Upgrade", "WebSocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ];
        // RFC 6455 1.3's example.
        assert_eq!(
            accept_key(&request("GET", &good)).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(
            accept_key(&request("POST", &good)).unwrap_err(),
            "the method must be GET"
        );
        for (missing, why) in [
            (0, "Connection: upgrade is missing"),
            (1, "Upgrade: websocket is missing"),
            (2, "Sec-WebSocket-Version must be 13"),
            (3, "Sec-WebSocket-Key is missing"),
        ] {
            let mut headers = good.to_vec();
            headers.remove(missing);
            assert_eq!(accept_key(&request("GET", &headers)).unwrap_err(), why);
        }
        let mut old = good.to_vec();
        old[2] = ("Sec-WebSocket-Version", "8");
        assert!(accept_key(&request("GET", &old)).is_err());
    }

    #[test]
    fn the_message_rate_allows_a_burst_then_refills() {
        let mut rate = MessageRate::new(5);
        let t0 = rate.last;
        assert!((0..5).all(|_| rate.take(t0)));
        assert!(!rate.take(t0));
        assert!(rate.take(t0 + Duration::from_millis(250)));
        assert!(!rate.take(t0 + Duration::from_millis(260)));
    }
}
