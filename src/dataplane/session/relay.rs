//! The relay stage, whatever the backend: the browser's WebSocket frames
//! (decoded, control frames answered here), the queue toward the backend,
//! the backend leg's state, the idle and heartbeat timers, and the close
//! handshake. What differs per backend lives in [`RelayKind`].

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::ctx::WorkerCtx;
use super::vnc::VncRelay;
use super::{ms, CloseInfo, Session, Stage};
use crate::cause::Cause;
use crate::dataplane::buffer::ByteQueue;
use crate::mailbox::{ticket_state, Admission};
use crate::protocol::websocket::{self, close_code, Decoder, Event, PayloadMode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RelayPhase {
    /// 101 sent; the backend connect is under way.
    Connecting,
    /// Relaying both ways.
    Open,
    /// Our close frame is queued; waiting for the browser's
    /// (`close_received`: it came, or never will).
    Closing { close_received: bool },
}

/// The backend connection as the session sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BackendState {
    Connecting,
    Open,
    Closed,
}

impl BackendState {
    /// A socket the IO layer holds (connecting or open).
    pub(super) fn is_up(self) -> bool {
        matches!(self, Self::Connecting | Self::Open)
    }

    pub(super) fn is_open(self) -> bool {
        self == Self::Open
    }
}

/// What one kind of backend needs beyond the common relay.
pub(super) enum RelayKind {
    /// Raw RFB over TCP (a VNC server, QEMU, the demo).
    Vnc(VncRelay),
}

pub(super) struct Relay {
    pub(super) phase: RelayPhase,
    /// The appliance session this connection is (after routing).
    pub(super) admission: Option<Arc<Admission>>,
    pub(super) target: SocketAddr,
    /// The backend connection to open, taken once by the IO layer.
    pub(super) connect_to: Option<SocketAddr>,
    pub(super) backend: BackendState,
    /// The browser's frames.
    pub(super) decoder: Decoder,
    pub(super) mode: PayloadMode,
    pub(super) to_backend: ByteQueue,
    /// Bytes at the front of `to_backend` an io_uring send holds.
    pub(super) backend_inflight: usize,
    /// Since when relayed bytes wait for the backend socket.
    pub(super) up_since: Option<Instant>,
    pub(super) last_activity: Instant,
    pub(super) next_ping: Option<Instant>,
    pub(super) kind: RelayKind,
}

impl Relay {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        phase: RelayPhase,
        admission: Option<Arc<Admission>>,
        target: SocketAddr,
        backend: BackendState,
        decoder: Decoder,
        mode: PayloadMode,
        now: Instant,
        kind: RelayKind,
    ) -> Self {
        Self {
            phase,
            admission,
            target,
            connect_to: Some(target),
            backend,
            decoder,
            mode,
            to_backend: ByteQueue::new(),
            backend_inflight: 0,
            up_since: None,
            last_activity: now,
            next_ping: None,
            kind,
        }
    }

    pub(super) fn is_closing(&self) -> bool {
        matches!(self.phase, RelayPhase::Closing { .. })
    }

    pub(super) fn vnc(&self) -> &VncRelay {
        match &self.kind {
            RelayKind::Vnc(v) => v,
        }
    }

    pub(super) fn vnc_mut(&mut self) -> &mut VncRelay {
        match &mut self.kind {
            RelayKind::Vnc(v) => v,
        }
    }

    /// `n` bytes of the backend queue were written.
    pub(super) fn sent_to_backend(&mut self, ctx: &mut WorkerCtx, n: usize, now: Instant) {
        self.backend_inflight = 0;
        self.to_backend.consume(&mut ctx.pool, n);
        if self.to_backend.is_empty() {
            if let Some(t) = self.up_since.take() {
                ctx.metrics
                    .relay_up_us
                    .record(now.saturating_duration_since(t).as_micros() as u64);
            }
        }
    }

    /// Every buffer back to the pool (nothing in flight any more).
    pub(super) fn release(&mut self, ctx: &mut WorkerCtx) {
        self.backend_inflight = 0;
        self.to_backend.clear(&mut ctx.pool);
        match &mut self.kind {
            RelayKind::Vnc(v) => v.release(ctx),
        }
    }
}

impl Session {
    /// WebSocket frames from the browser: payload to the backend queue (or
    /// to the appliance's own RFB handshake), control frames answered here.
    pub(super) fn decode_input(&mut self, ctx: &mut WorkerCtx, mut data: &[u8], now: Instant) {
        while !data.is_empty() {
            let Some(r) = self.relay_mut() else { return };
            if r.decoder.close_received() {
                return;
            }
            let discard = r.is_closing();
            let via_rfb = !discard && r.vnc().in_rfb_handshake();
            let result = if discard || via_rfb {
                // After our close frame, data is read and dropped while we
                // wait for the browser's close; during the RFB handshake the
                // appliance reads the browser's answers itself.
                let mut out = std::mem::take(&mut ctx.decoded);
                let res = r.decoder.decode(data, &mut out);
                ctx.decoded = out;
                res
            } else {
                // Base64 decoding needs room for a whole group (3 bytes) to progress.
                let spare = r.to_backend.spare(&mut ctx.pool, 64);
                let res = r.decoder.decode(data, spare);
                r.to_backend.commit(res.as_ref().map_or(0, |p| p.written));
                res
            };
            match result {
                Ok(p) => {
                    data = &data[p.consumed..];
                    if via_rfb && p.written > 0 {
                        let out = std::mem::take(&mut ctx.decoded);
                        self.rfb_browser_input(ctx, &out[..p.written], now);
                        ctx.decoded = out;
                    } else if !discard && p.written > 0 {
                        if let Some(r) = self.relay_mut() {
                            r.up_since.get_or_insert(now);
                        }
                        self.bytes_up += p.written as u64;
                        ctx.metrics.bytes_browser_to_backend += p.written as u64;
                    }
                    if let Some(ev) = p.event {
                        self.on_ws_event(ctx, ev, now);
                    }
                    if p.consumed == 0 && p.written == 0 && p.event.is_none() {
                        // No progress possible (cannot happen with a non-empty
                        // output buffer, but never spin).
                        break;
                    }
                }
                Err(e) => {
                    if discard {
                        self.set_close_received();
                    } else {
                        ctx.metrics.count(Cause::from(&e));
                        tracing::info!(session = self.id, error = %e, "protocol error from browser");
                        self.start_close(ctx, e.close_code(), &e.to_string(), now);
                        // The browser broke the protocol: do not wait for its close.
                        self.set_close_received();
                    }
                    break;
                }
            }
        }
        // Release an uncommitted spare chunk.
        if let Some(r) = self.relay_mut() {
            r.to_backend.consume(&mut ctx.pool, 0);
        }
    }

    fn set_close_received(&mut self) {
        if let Some(r) = self.relay_mut() {
            if let RelayPhase::Closing { close_received } = &mut r.phase {
                *close_received = true;
            }
        }
    }

    fn on_ws_event(&mut self, ctx: &mut WorkerCtx, ev: Event, now: Instant) {
        let closing = self.relay().is_some_and(Relay::is_closing);
        match ev {
            Event::Ping(p) => {
                if !closing {
                    let f = websocket::pong_frame(p.as_slice());
                    self.browser.push(ctx, &[f.as_bytes()]);
                }
            }
            Event::Pong(_) => {}
            Event::Close { code, reason } => {
                if !closing {
                    // Echo the browser's code, as RFC 6455 5.5.1 suggests.
                    let echo = code.unwrap_or(close_code::NORMAL);
                    // The browser's words: escaped before they reach a log
                    // line or the API (a newline must not forge a line).
                    let why = String::from_utf8_lossy(reason.as_slice())
                        .escape_debug()
                        .to_string();
                    tracing::debug!(session = self.id, code = echo, reason = %why, "browser closed");
                    self.start_close(ctx, echo, "", now);
                    self.close = Some(CloseInfo {
                        code: Some(echo),
                        reason: format!("browser closed: {why}"),
                    });
                }
                self.set_close_received();
            }
        }
    }

    /// Queue a close frame and stop relaying; the backend is closed by the
    /// IO layer (see [`Session::backend_should_close`]).
    pub(super) fn start_close(
        &mut self,
        ctx: &mut WorkerCtx,
        code: u16,
        reason: &str,
        now: Instant,
    ) {
        match &self.stage {
            Stage::Relay(r) if !r.is_closing() => {}
            Stage::Front(_) => {
                self.finish(ctx, now);
                return;
            }
            _ => return,
        }
        let f = websocket::close_frame(code, reason);
        self.browser.push(ctx, &[f.as_bytes()]);
        self.browser.close_notify(ctx);
        self.deadline = Some(now + ms(ctx.cfg.limits.close_timeout_ms));
        if let Some(r) = self.relay_mut() {
            r.phase = RelayPhase::Closing {
                close_received: false,
            };
            r.next_ping = None;
            // Bytes for a backend we are leaving are dropped.
            r.to_backend.truncate_to(&mut ctx.pool, r.backend_inflight);
        }
        if self.close.is_none() {
            self.close = Some(CloseInfo {
                code: Some(code),
                reason: reason.to_string(),
            });
        }
    }

    /// Close for `cause`, with its close code, counted and logged.
    pub(super) fn close_for(
        &mut self,
        ctx: &mut WorkerCtx,
        cause: Cause,
        reason: &str,
        now: Instant,
    ) {
        ctx.metrics.count(cause);
        let code = cause.close_code().unwrap_or(close_code::INTERNAL_ERROR);
        self.start_close(ctx, code, reason, now);
    }

    /// The relay's timers: connect, the VNC handshake, idle, heartbeat,
    /// close; and a revoke the control plane's message never brought.
    pub(super) fn relay_tick(&mut self, ctx: &mut WorkerCtx, expired: bool, now: Instant) {
        let Some(r) = self.relay() else { return };
        let revoked = r
            .admission
            .as_ref()
            .is_some_and(|a| a.state() == ticket_state::REVOKED);
        let (idle, heartbeat) = (ctx.cfg.limits.idle_timeout_ms, ctx.cfg.limits.heartbeat_ms);
        match r.phase {
            RelayPhase::Closing { .. } if expired => self.finish(ctx, now),
            RelayPhase::Closing { .. } => {}
            // The control plane revoked the session: its Revoke message
            // may never have arrived (full mailbox), the shared state
            // always does.
            _ if revoked => {
                ctx.metrics.count(Cause::Revoked);
                self.start_close(ctx, close_code::POLICY, "session revoked", now);
            }
            RelayPhase::Connecting if expired => {
                tracing::warn!(session = self.id, backend = ?r.target, "backend connect timed out");
                self.close_for(
                    ctx,
                    Cause::BackendConnectTimeout,
                    "backend connect timed out",
                    now,
                );
            }
            RelayPhase::Open if expired && r.vnc().in_rfb_handshake() => {
                tracing::warn!(
                    session = self.id,
                    "VNC handshake with the backend timed out"
                );
                self.close_for(
                    ctx,
                    Cause::RfbHandshakeTimeout,
                    "VNC handshake timed out",
                    now,
                );
            }
            RelayPhase::Open if idle > 0 && now.duration_since(r.last_activity) >= ms(idle) => {
                tracing::info!(session = self.id, "idle timeout");
                self.close_for(ctx, Cause::IdleTimeout, "idle timeout", now);
            }
            RelayPhase::Open => {
                if let Some(p) = r.next_ping.filter(|p| now >= *p) {
                    let frame = websocket::ping_frame(b"consolegate");
                    self.browser.push(ctx, &[frame.as_bytes()]);
                    let hb = ms(heartbeat);
                    // Skip missed beats rather than bursting pings.
                    let next = if p + hb > now { p + hb } else { now + hb };
                    if let Some(r) = self.relay_mut() {
                        r.next_ping = Some(next);
                    }
                }
            }
            RelayPhase::Connecting => {}
        }
    }

    /// The backend TCP connect completed.
    pub fn on_backend_connected(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        let hb = ctx.cfg.limits.heartbeat_ms;
        let handshake = ms(ctx.cfg.limits.handshake_timeout_ms);
        let id = self.id;
        let Some(r) = self.relay_mut() else { return };
        if r.backend != BackendState::Connecting {
            return;
        }
        r.backend = BackendState::Open;
        if r.phase != RelayPhase::Connecting {
            return;
        }
        r.phase = RelayPhase::Open;
        r.last_activity = now;
        if hb > 0 {
            r.next_ping = Some(now + ms(hb));
        }
        // The VNC security handshake must finish in time too.
        let rfb = r.vnc().in_rfb_handshake();
        tracing::debug!(session = id, backend = ?r.target, "backend connected");
        self.deadline = rfb.then(|| now + handshake);
        self.check_invariants(ctx);
    }

    /// The backend connect failed.
    pub fn on_backend_connect_failed(
        &mut self,
        ctx: &mut WorkerCtx,
        err: &io::Error,
        now: Instant,
    ) {
        let id = self.id;
        let Some(r) = self.relay_mut() else { return };
        r.backend = BackendState::Closed;
        tracing::warn!(session = id, backend = ?r.target, error = %err, "backend connect failed");
        self.close_for(
            ctx,
            Cause::BackendConnectFailed,
            "backend connect failed",
            now,
        );
        self.settle(ctx, now);
    }

    /// The backend closed (EOF) or failed.
    pub fn on_backend_gone(
        &mut self,
        ctx: &mut WorkerCtx,
        error: Option<&io::Error>,
        now: Instant,
    ) {
        let Some(r) = self.relay_mut() else { return };
        if !r.backend.is_up() {
            return;
        }
        r.backend = BackendState::Closed;
        match error {
            None => {
                ctx.metrics.count(Cause::BackendClosed);
                self.start_close(ctx, close_code::NORMAL, "backend closed", now);
            }
            Some(e) => {
                tracing::warn!(session = self.id, error = %e, "backend connection failed");
                self.close_for(ctx, Cause::BackendIo, "backend connection failed", now);
            }
        }
        self.settle(ctx, now);
    }

    /// Relayed backend bytes: counted, then framed for the browser.
    pub(super) fn relay_down(&mut self, ctx: &mut WorkerCtx, data: &[u8]) {
        self.bytes_down += data.len() as u64;
        ctx.metrics.bytes_backend_to_browser += data.len() as u64;
        let mode = self.relay().map_or(PayloadMode::Raw, |r| r.mode);
        self.browser.frame_down(ctx, mode, data);
    }
}
