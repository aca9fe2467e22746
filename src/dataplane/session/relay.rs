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
use super::webmks::WebMksRelay;
use super::{ms, CloseInfo, Session, Stage};
use crate::cause::Cause;
use crate::dataplane::buffer::ByteQueue;
use crate::mailbox::{ticket_state, Admission};
use crate::protocol::websocket::{self, close_code, ControlFrame, Event, PayloadMode};

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
// The whole Relay is boxed per session already; the VNC variant, the hot
// path, stays inline (one indirection less per event).
#[allow(clippy::large_enum_variant)]
pub(super) enum RelayKind {
    /// Raw RFB over TCP (a VNC server, QEMU, the demo).
    Vnc(VncRelay),
    /// A VMware WebMKS endpoint: TLS, then a WebSocket whose frames pass
    /// through unchanged both ways.
    WebMks(Box<WebMksRelay>),
}

pub(super) struct Relay {
    pub(super) phase: RelayPhase,
    /// The appliance session this connection is (after routing).
    pub(super) admission: Option<Arc<Admission>>,
    pub(super) target: SocketAddr,
    /// The backend connection to open, taken once by the IO layer.
    pub(super) connect_to: Option<SocketAddr>,
    pub(super) backend: BackendState,
    /// How relayed payload is framed for the browser (binary, or base64
    /// text; always binary pass-through for WebMKS).
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

    /// Nothing of ours is left for the backend: a WebMKS backend has been
    /// handed our close frame and TLS close_notify (or is gone). A VNC
    /// backend has no closing handshake: its socket is just closed.
    pub(super) fn backend_flushed(&self) -> bool {
        self.vnc().is_some() || self.to_backend.is_empty() || !self.backend.is_open()
    }

    pub(super) fn vnc(&self) -> Option<&VncRelay> {
        match &self.kind {
            RelayKind::Vnc(v) => Some(v),
            RelayKind::WebMks(_) => None,
        }
    }

    pub(super) fn vnc_mut(&mut self) -> Option<&mut VncRelay> {
        match &mut self.kind {
            RelayKind::Vnc(v) => Some(v),
            RelayKind::WebMks(_) => None,
        }
    }

    pub(super) fn webmks_mut(&mut self) -> Option<&mut WebMksRelay> {
        match &mut self.kind {
            RelayKind::WebMks(w) => Some(w),
            RelayKind::Vnc(_) => None,
        }
    }

    /// The backend-side handshake the appliance runs itself is still under
    /// way (the VNC security handshake; the WebMKS TLS + upgrade): its
    /// timer runs, and for WebMKS the browser is not read yet.
    pub(super) fn handshaking(&self) -> bool {
        match &self.kind {
            RelayKind::Vnc(v) => v.in_rfb_handshake(),
            RelayKind::WebMks(w) => !w.upgraded(),
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
            RelayKind::WebMks(_) => {}
        }
    }
}

impl Session {
    /// The browser's WebSocket bytes, by relay kind.
    pub(super) fn decode_input(&mut self, ctx: &mut WorkerCtx, data: &[u8], now: Instant) {
        match self.relay().map(|r| &r.kind) {
            Some(RelayKind::Vnc(_)) => self.vnc_browser_frames(ctx, data, now),
            Some(RelayKind::WebMks(_)) => self.webmks_browser_frames(ctx, data, now),
            None => {}
        }
    }

    pub(super) fn set_close_received(&mut self) {
        if let Some(r) = self.relay_mut() {
            if let RelayPhase::Closing { close_received } = &mut r.phase {
                *close_received = true;
            }
        }
    }

    /// A control frame from the browser: pings answered, a close echoed.
    pub(super) fn on_ws_event(&mut self, ctx: &mut WorkerCtx, ev: Event, now: Instant) {
        let closing = self.relay().is_some_and(Relay::is_closing);
        match ev {
            Event::Ping(p) => {
                if !closing {
                    let f = websocket::pong_frame(p.as_slice());
                    self.send_browser_control(ctx, f);
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
        // The backend leg's own closing first (WebMKS: the close frame to
        // the backend, the end of a half-sent frame toward the browser).
        self.webmks_closing(ctx, code);
        let f = websocket::close_frame(code, reason);
        self.send_browser_control(ctx, f);
        self.browser.close_notify(ctx);
        self.deadline = Some(now + ms(ctx.cfg.limits.close_timeout_ms));
        if let Some(r) = self.relay_mut() {
            r.phase = RelayPhase::Closing {
                close_received: false,
            };
            r.next_ping = None;
            // Bytes for a backend we are leaving are dropped (WebMKS keeps
            // its queue: it is TLS records, and ends with our close frame).
            if r.vnc().is_some() {
                r.to_backend.truncate_to(&mut ctx.pool, r.backend_inflight);
            }
        }
        if self.close.is_none() {
            self.close = Some(CloseInfo {
                code: Some(code),
                reason: reason.to_string(),
            });
        }
    }

    /// One of our own control frames (pong, ping, close) for the browser:
    /// at once, or — WebMKS, whose frames pass through — at the next frame
    /// boundary of the downstream.
    pub(super) fn send_browser_control(&mut self, ctx: &mut WorkerCtx, frame: ControlFrame) {
        if let Some(w) = self.relay_mut().and_then(Relay::webmks_mut) {
            if !w.downstream_at_boundary() {
                w.defer_to_browser(frame);
                return;
            }
        }
        self.browser.push(ctx, &[frame.as_bytes()]);
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
        // The pool's view of this console's activity: published here, once
        // per tick, never per frame.
        if let Some(a) = &r.admission {
            a.note_activity(crate::mailbox::mono_ms(r.last_activity));
        }
        let (idle, heartbeat) = (ctx.cfg.limits.idle_timeout_ms, ctx.cfg.limits.heartbeat_ms);
        match r.phase {
            RelayPhase::Closing { .. } if expired => self.finish(ctx, now),
            RelayPhase::Closing { .. } => {}
            // The control plane revoked the session: its Revoke message
            // may never have arrived (full mailbox), the shared state
            // always does.
            _ if revoked => {
                let (cause, reason) = self.revoke_cause();
                ctx.metrics.count(cause);
                let code = cause.close_code().unwrap_or(close_code::POLICY);
                self.start_close(ctx, code, reason, now);
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
            RelayPhase::Open if expired && r.handshaking() => {
                let cause = match r.kind {
                    RelayKind::Vnc(_) => Cause::RfbHandshakeTimeout,
                    RelayKind::WebMks(_) => Cause::BackendUpgradeTimeout,
                };
                tracing::warn!(
                    session = self.id,
                    cause = cause.kind(),
                    "backend handshake timed out"
                );
                self.close_for(ctx, cause, "backend handshake timed out", now);
            }
            RelayPhase::Open if idle > 0 && now.duration_since(r.last_activity) >= ms(idle) => {
                tracing::info!(session = self.id, "idle timeout");
                self.close_for(ctx, Cause::IdleTimeout, "idle timeout", now);
            }
            RelayPhase::Open => {
                if let Some(p) = r.next_ping.filter(|p| now >= *p) {
                    // Not behind bytes the browser has yet to take: they
                    // keep the link busy, or the browser is not reading and
                    // the ping would only grow the queue past its bound, a
                    // beat at a time.
                    if self.down_queued() == 0 {
                        let frame = websocket::ping_frame(b"consolegate");
                        self.send_browser_control(ctx, frame);
                    }
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
        tracing::debug!(session = id, backend = ?r.target, "backend connected");
        // WebMKS: TLS and the upgrade request start now.
        self.webmks_connected(ctx, now);
        // The backend handshake (VNC security, WebMKS upgrade) must finish
        // in time too.
        let handshaking = self.relay().is_some_and(Relay::handshaking);
        self.deadline = handshaking.then(|| now + handshake);
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
