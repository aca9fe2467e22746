//! The live event endpoints on the control port: `/ws/monitor`,
//! `/ws/vm/{vm_id}`, `/ws/server/{hypervisor_id}` and `/ws/stats` (admin).
//!
//! Each request is authenticated before the upgrade (a bearer token in
//! `Authorization` or, since browsers cannot set headers on a WebSocket,
//! `?token=`): 401 / 403 / 404 / 503 as JSON, like the REST API. Without a
//! token, and only with `[events] allow_anonymous`, a client may join the
//! public rooms and sees public events only. After the upgrade one task
//! per connection relays its [`Subscription`]'s queue and answers its
//! messages ([`crate::events::protocol`]).
//!
//! Also here: the control plane's own event sources that need its state
//! (the port pool above 90 %, the periodic refresh of the VM lists).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::SinkExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{forbidden, ApiError, ApiResult};
use super::ControlState;
use crate::auth::Need;
use crate::events::bus::now_ms;
use crate::events::protocol::{
    error_data, message, parse_client, AlertData, ClientMessage, ProtocolError,
    MAX_CLIENT_MESSAGE_BYTES,
};
use crate::events::{Event, Room, Subscription, Visibility};
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
/// WebSocket read buffer per connection, in bytes. Why small: clients send
/// little (subscriptions, pings), and an idle subscriber must stay cheap.
const READ_BUFFER_BYTES: usize = 4096;
/// Events already queued when a connection wakes are framed into one
/// buffer and written together, up to this many bytes (then written out,
/// and the batch goes on): one write for a burst of events instead of one
/// per event. Why not larger: the buffer is kept per connection.
const WRITE_BATCH_BYTES: usize = 8 * 1024;
/// Most queued events taken in one wake-up: the connection then waits its
/// turn again, so a subscriber with a full queue does not hold the control
/// thread for its whole queue.
const MAX_EVENTS_PER_WAKE: usize = 32;
/// Most bytes waiting to be written per connection beyond what the kernel
/// took (a batch is flushed before the next is taken; a larger message
/// ends the connection). Events are well under 4 KiB.
const MAX_WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// After our close frame, how long the client's close (or its end) is
/// awaited, reading and discarding what it still sends: closing at once
/// would answer its late messages with a reset, which can destroy the
/// close frame before the client reads it.
const CLOSE_WAIT_MS: u64 = 1_000;
/// Port pool use that raises an alert, and the use it must fall under
/// before the next one.
const PORT_ALERT_PERCENT: f64 = 90.0;
const PORT_REARM_PERCENT: f64 = 85.0;
/// How often the port pool's use is checked.
const PORT_CHECK_INTERVAL_MS: u64 = 1_000;

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

type Upgrade = Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>;
type TokenParam = Result<Query<TokenQuery>, QueryRejection>;

async fn monitor(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    query: TokenParam,
    ws: Upgrade,
) -> Response {
    let visibility = match authenticate(&state, &headers, query, Need::Any, true) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    upgrade(state, ws, Room::Monitor, visibility)
}

async fn vm_room(
    State(state): State<Arc<ControlState>>,
    Path(vm_id): Path<String>,
    headers: HeaderMap,
    query: TokenParam,
    ws: Upgrade,
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
    upgrade(state, ws, Room::Vm(vm), visibility)
}

async fn server_room(
    State(state): State<Arc<ControlState>>,
    Path(server): Path<String>,
    headers: HeaderMap,
    query: TokenParam,
    ws: Upgrade,
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
    upgrade(state, ws, Room::Server(server), visibility)
}

async fn stats_room(
    State(state): State<Arc<ControlState>>,
    headers: HeaderMap,
    query: TokenParam,
    ws: Upgrade,
) -> Response {
    let visibility = match authenticate(&state, &headers, query, Need::Admin, false) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    upgrade(state, ws, Room::Stats, visibility)
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

fn upgrade(state: Arc<ControlState>, ws: Upgrade, room: Room, visibility: Visibility) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            state.count_error("events_not_websocket");
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("a WebSocket upgrade is expected: {rejection}"),
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
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BATCH_BYTES)
        .max_write_buffer_size(MAX_WRITE_BUFFER_BYTES)
        .max_message_size(MAX_CLIENT_MESSAGE_BYTES)
        .max_frame_size(MAX_CLIENT_MESSAGE_BYTES)
        .on_upgrade(move |socket| async move {
            let mut connection = Connection::new(state, socket, visibility.clone());
            connection.run(room, visibility).await;
        })
}

/// What ends a connection.
enum End {
    /// Close with this code and reason.
    Close(u16, &'static str),
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

struct Connection {
    state: Arc<ControlState>,
    socket: WebSocket,
    visibility: Visibility,
    rate: MessageRate,
    invalid_in_row: u32,
    lag_notices: u32,
}

impl Connection {
    fn new(state: Arc<ControlState>, socket: WebSocket, visibility: Visibility) -> Connection {
        let rate = MessageRate::new(state.cfg.events.messages_per_s);
        Connection {
            state,
            socket,
            visibility,
            rate,
            invalid_in_row: 0,
            lag_notices: 0,
        }
    }

    async fn run(&mut self, room: Room, visibility: Visibility) {
        let mut sub = match self.state.events.subscribe(room.clone(), visibility) {
            Ok(sub) => sub,
            Err(e) => {
                self.close(CLOSE_TRY_AGAIN, &e.to_string()).await;
                return;
            }
        };
        let welcome = json!({
            "room": room.label(),
            "anonymous": self.visibility == Visibility::Anonymous,
            "subscription": sub.update_filter(|_| {}).to_json(),
        });
        if let Err(end) = self.send_message("welcome", &welcome).await {
            self.finish(end).await;
            return;
        }
        let end = self.serve(&mut sub, room == Room::Stats).await;
        drop(sub);
        self.finish(end).await;
    }

    async fn serve(&mut self, sub: &mut Subscription, stats: bool) -> End {
        let interval = Duration::from_millis(self.state.cfg.events.stats_interval_ms);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut last_published = (Instant::now(), sub.bus().stats().events_published_total);
        loop {
            tokio::select! {
                incoming = self.socket.recv() => {
                    let Some(Ok(msg)) = incoming else { return End::Drop };
                    if let Err(end) = self.on_client_message(msg, sub).await {
                        return end;
                    }
                }
                frame = sub.recv() => {
                    let Some(frame) = frame else { return End::Close(1001, "shutting down") };
                    if let Err(end) = self.deliver_queued(frame, sub).await {
                        return end;
                    }
                }
                _ = ticker.tick(), if stats => {
                    let figures = stats_figures(sub, &mut last_published);
                    if let Err(end) = self.send_message("stats", &figures).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Send `first` and what else is queued already (at most
    /// [`MAX_EVENTS_PER_WAKE`]), framed into one buffer, then flush it.
    async fn deliver_queued(
        &mut self,
        first: Utf8Bytes,
        sub: &mut Subscription,
    ) -> Result<(), End> {
        self.deliver(first, sub).await?;
        for _ in 1..MAX_EVENTS_PER_WAKE {
            let Some(frame) = sub.try_recv() else { break };
            self.deliver(frame, sub).await?;
        }
        self.flush().await
    }

    /// Queue one event for writing (see [`Connection::deliver_queued`]),
    /// after a `lagged` notice when the queue overflowed since the last
    /// one.
    async fn deliver(&mut self, frame: Utf8Bytes, sub: &Subscription) -> Result<(), End> {
        let dropped = sub.take_dropped();
        if dropped > 0 {
            self.lag_notices += 1;
            if self.lag_notices > MAX_LAG_NOTICES {
                self.state.count_error("events_subscriber_lagging");
                return Err(End::Close(
                    CLOSE_POLICY,
                    "subscriber too slow: it stayed behind after lagged notices",
                ));
            }
            let notice = message("lagged", &json!({"dropped": dropped}), now_ms());
            self.feed(Message::Text(Utf8Bytes::from(notice))).await?;
        } else if sub.is_caught_up() {
            self.lag_notices = 0;
        }
        self.feed(Message::Text(frame)).await
    }

    async fn on_client_message(&mut self, msg: Message, sub: &Subscription) -> Result<(), End> {
        let text = match msg {
            Message::Text(text) => text,
            Message::Binary(_) => Utf8Bytes::from_static(""),
            // Pings are answered by the WebSocket layer; a close ends the
            // connection on the next read.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) => return Ok(()),
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
                self.send_message(kind, &data).await
            }
            Err(e) => {
                self.invalid_in_row += 1;
                self.state.count_error("events_invalid_message");
                if self.invalid_in_row > MAX_INVALID_MESSAGES_IN_ROW {
                    return Err(End::Close(CLOSE_POLICY, "too many invalid messages"));
                }
                self.send_message("error", &error_data(&e)).await
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

    async fn send_message(&mut self, kind: &str, data: &Value) -> Result<(), End> {
        let text = message(kind, data, now_ms());
        self.send(Message::Text(Utf8Bytes::from(text))).await
    }

    async fn send(&mut self, msg: Message) -> Result<(), End> {
        self.feed(msg).await?;
        self.flush().await
    }

    /// Frame `msg` into the write buffer (written out when the buffer
    /// passes [`WRITE_BATCH_BYTES`], or by [`Connection::flush`]).
    async fn feed(&mut self, msg: Message) -> Result<(), End> {
        let fed = tokio::time::timeout(Self::send_limit(), self.socket.feed(msg)).await;
        self.sent(fed)
    }

    async fn flush(&mut self) -> Result<(), End> {
        let flushed = tokio::time::timeout(Self::send_limit(), self.socket.flush()).await;
        self.sent(flushed)
    }

    fn send_limit() -> Duration {
        Duration::from_millis(SEND_TIMEOUT_MS)
    }

    fn sent(
        &self,
        outcome: Result<Result<(), axum::Error>, tokio::time::error::Elapsed>,
    ) -> Result<(), End> {
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Drop),
            Err(_) => {
                self.state.count_error("events_send_timeout");
                Err(End::Drop)
            }
        }
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(reason.to_string()),
        };
        let limit = Duration::from_millis(SEND_TIMEOUT_MS);
        let sent = tokio::time::timeout(limit, self.socket.send(Message::Close(Some(frame)))).await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(CLOSE_WAIT_MS), async {
            while let Some(Ok(msg)) = self.socket.recv().await {
                if matches!(msg, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }

    async fn finish(&mut self, end: End) {
        if let End::Close(code, reason) = end {
            self.close(code, reason).await;
        }
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

/// The control plane's own event sources: the port pool's use (an alert
/// above 90 %) and the periodic refresh of the VM lists.
pub async fn background(state: Arc<ControlState>) {
    let refresh_ms = state.cfg.events.vm_refresh_interval_ms;
    if refresh_ms > 0 {
        let fleet = state.fleet.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(refresh_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                fleet.refresh_lists().await;
            }
        });
    }
    let mut tick = tokio::time::interval(Duration::from_millis(PORT_CHECK_INTERVAL_MS));
    let mut alerted = false;
    loop {
        tick.tick().await;
        let Some(pool) = &state.ports else { continue };
        let stats = pool.stats();
        if !alerted && stats.utilization_percent > PORT_ALERT_PERCENT {
            alerted = true;
            state.events.publish(&Event::alert(&AlertData {
                alert_id: format!("port_pool_high:{}", now_ms()),
                alert_type: "port_pool_high".into(),
                severity: "warning".into(),
                title: "port pool above 90 %".into(),
                message: format!(
                    "{} of {} dedicated ports allocated ({} %)",
                    stats.allocated_ports, stats.total_ports, stats.utilization_percent
                ),
                entity_type: "port_pool".into(),
                entity_id: "ports".into(),
            }));
        } else if alerted && stats.utilization_percent < PORT_REARM_PERCENT {
            alerted = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
