//! The WebMKS relay kind: a VMware console (`wss://host:port/ticket/T`).
//!
//! The backend leg is TLS (rustls as a state machine, pinned to the
//! ticket's thumbprint or checked against roots, as the control plane's
//! `WebMksTarget` says), then an HTTP/1.1 upgrade as a client (a fresh key,
//! `Sec-WebSocket-Protocol: binary`, no extensions), then WebSocket frames.
//!
//! Frames pass through unchanged, one frame out for each frame in (wmks.js
//! tells the RFB handshake from ServerInit by the size of the first
//! message): backend → browser frames are already unmasked server frames;
//! browser → backend frames keep the browser's mask, whose key the page
//! cannot predict. A [`FrameTracker`] per direction follows the frame
//! boundaries without copying payloads, so the appliance's own control
//! frames (pongs, pings, close) go in only between frames; pings are
//! answered on each leg by the appliance itself, and the close handshake
//! runs on both legs.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::Instant;

use super::browser::{flush_sealed, seal_all};
use super::ctx::WorkerCtx;
use super::relay::{Relay, RelayKind, RelayPhase};
use super::Session;
use crate::cause::Cause;
use crate::mailbox::WebMksTarget;
use crate::protocol::http_upgrade::{self, ClientHandshake, ClientOptions, ResponseLimits};
use crate::protocol::websocket::{
    self, close_code, ControlFrame, DecoderLimits, Event, FrameTracker, MaskKeySource, Role, Scan,
};

/// Largest upgrade response head from the backend.
pub const MAX_UPGRADE_RESPONSE_BYTES: usize = 16 * 1024;
/// Most header lines in it.
const MAX_UPGRADE_RESPONSE_HEADERS: usize = 64;
/// Our own control frames waiting for a frame boundary, per direction.
/// Beyond, pongs and pings are dropped (a close frame is always kept).
pub const MAX_DEFERRED_CONTROL_FRAMES: usize = 8;

enum WsPhase {
    /// TCP connect under way: nothing sent yet.
    NotStarted,
    /// Our upgrade request is sent (behind the TLS handshake); the answer's
    /// head accumulates here.
    Upgrading {
        handshake: ClientHandshake,
        head: Vec<u8>,
    },
    /// Frames flow.
    Open,
}

pub(super) struct WebMksRelay {
    target: Arc<WebMksTarget>,
    tls: Box<rustls::ClientConnection>,
    phase: WsPhase,
    /// Backend → browser frames (server frames: unmasked).
    down: FrameTracker,
    /// Browser → backend frames (client frames: masked).
    up: FrameTracker,
    keys: MaskKeySource,
    /// Browser bytes that came before the backend's upgrade was done
    /// (frames the browser sent right behind its own request); at most
    /// `max_request_bytes`, since the browser is not read meanwhile.
    held_up: Vec<u8>,
    to_browser_later: Vec<ControlFrame>,
    to_backend_later: Vec<ControlFrame>,
    /// Our close frame went to the backend (or it closed first).
    backend_close_done: bool,
}

impl WebMksRelay {
    pub(super) fn new(target: Arc<WebMksTarget>, max_frame_bytes: u64) -> Result<Self, String> {
        let tls = rustls::ClientConnection::new(target.tls.clone(), target.server_name.clone())
            .map_err(|e| e.to_string())?;
        let limits = DecoderLimits { max_frame_bytes };
        Ok(Self {
            target,
            tls: Box::new(tls),
            phase: WsPhase::NotStarted,
            down: FrameTracker::new(Role::Client, limits),
            up: FrameTracker::new(Role::Server, limits),
            keys: MaskKeySource::new(),
            held_up: Vec::new(),
            to_browser_later: Vec::new(),
            to_backend_later: Vec::new(),
            backend_close_done: false,
        })
    }

    pub(super) fn upgraded(&self) -> bool {
        matches!(self.phase, WsPhase::Open)
    }

    pub(super) fn downstream_at_boundary(&self) -> bool {
        self.down.at_frame_boundary()
    }

    pub(super) fn defer_to_browser(&mut self, frame: ControlFrame) {
        defer(&mut self.to_browser_later, frame);
    }

    pub(super) fn deferred(&self) -> usize {
        self.to_browser_later.len() + self.to_backend_later.len()
    }
}

/// Keep `frame` for the next boundary; a full list drops the oldest ping or
/// pong (never a close frame).
fn defer(list: &mut Vec<ControlFrame>, frame: ControlFrame) {
    if list.len() >= MAX_DEFERRED_CONTROL_FRAMES {
        if let Some(i) = list.iter().position(|f| !is_close(f)) {
            list.remove(i);
        } else {
            return;
        }
    }
    list.push(frame);
}

fn is_close(f: &ControlFrame) -> bool {
    f.as_bytes().first().is_some_and(|b| b & 0x0f == 0x8)
}

/// A close code the appliance may send on: the peer's when it is one that
/// may be sent, else `fallback`.
fn sendable_code(code: Option<u16>, fallback: u16) -> u16 {
    match code {
        Some(c) if websocket::is_valid_close_code(c) => c,
        _ => fallback,
    }
}

impl Session {
    fn webmks(&self) -> Option<&WebMksRelay> {
        match &self.relay()?.kind {
            RelayKind::WebMks(w) => Some(w),
            RelayKind::Vnc(_) => None,
        }
    }

    /// The TCP connect completed: start TLS and send the upgrade request
    /// (rustls holds it until its handshake is done).
    pub(super) fn webmks_connected(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        let Some(Relay {
            kind: RelayKind::WebMks(w),
            to_backend,
            ..
        }) = self.relay_mut()
        else {
            return;
        };
        let mut req = Vec::with_capacity(512);
        match http_upgrade::write_client_request(&mut req, &w.target.url, &ClientOptions::webmks())
        {
            Ok(handshake) => {
                w.phase = WsPhase::Upgrading {
                    handshake,
                    head: Vec::new(),
                };
                seal_all(&mut w.tls, &req, to_backend, &mut ctx.pool);
            }
            Err(e) => {
                let cause = Cause::from(&e);
                tracing::error!(session = self.id, error = %e, "WebMKS upgrade request not built");
                self.close_for(ctx, cause, "backend upgrade failed", now);
            }
        }
    }

    /// TLS records from the backend.
    pub(super) fn webmks_backend_data(
        &mut self,
        ctx: &mut WorkerCtx,
        mut data: &[u8],
        now: Instant,
    ) {
        while !data.is_empty() && self.webmks().is_some() {
            let Some(Relay {
                kind: RelayKind::WebMks(w),
                to_backend,
                ..
            }) = self.relay_mut()
            else {
                return;
            };
            match w.tls.read_tls(&mut data) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    self.webmks_tls_failed(ctx, Cause::BackendTls, &e.to_string(), now);
                    return;
                }
            }
            if let Err(e) = w.tls.process_new_packets() {
                // The alert rustls queued goes to the backend.
                flush_sealed(&mut w.tls, to_backend, &mut ctx.pool);
                let cause = match crate::pki::classify(&e) {
                    Some(crate::pki::CertProblem::Mismatch) => Cause::BackendCertMismatch,
                    Some(crate::pki::CertProblem::Untrusted) => Cause::BackendCertUntrusted,
                    None => Cause::BackendTls,
                };
                self.webmks_tls_failed(ctx, cause, &e.to_string(), now);
                return;
            }
            flush_sealed(&mut w.tls, to_backend, &mut ctx.pool);
            if !self.webmks_drain_plaintext(ctx, now) {
                return;
            }
        }
    }

    fn webmks_tls_failed(&mut self, ctx: &mut WorkerCtx, cause: Cause, why: &str, now: Instant) {
        // Never the ticket: the URL is not in `why` (rustls errors name
        // certificates and alerts only).
        tracing::warn!(session = self.id, cause = cause.kind(), error = %why, "backend TLS failed");
        self.close_for(ctx, cause, cause.kind(), now);
    }

    /// Hand what rustls decrypted to the upgrade or the frame relay; false
    /// once the session stopped taking backend bytes.
    fn webmks_drain_plaintext(&mut self, ctx: &mut WorkerCtx, now: Instant) -> bool {
        loop {
            let Some(Relay {
                kind: RelayKind::WebMks(w),
                phase,
                ..
            }) = self.relay_mut()
            else {
                return false;
            };
            if *phase != RelayPhase::Open {
                return false;
            }
            let mut buf = std::mem::take(&mut ctx.tls_plain);
            let r = w.tls.reader().read(&mut buf);
            let go_on = match r {
                Ok(0) => {
                    // close_notify: the backend will send nothing more.
                    ctx.tls_plain = buf;
                    self.on_backend_gone(ctx, None, now);
                    return false;
                }
                Ok(n) => {
                    self.webmks_plain(ctx, &buf[..n], now);
                    true
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ctx.tls_plain = buf;
                    return true;
                }
                Err(e) => {
                    ctx.tls_plain = buf;
                    self.webmks_tls_failed(ctx, Cause::BackendTls, &e.to_string(), now);
                    return false;
                }
            };
            ctx.tls_plain = buf;
            if !go_on {
                return false;
            }
        }
    }

    /// Decrypted backend bytes: the upgrade answer, then frames.
    fn webmks_plain(&mut self, ctx: &mut WorkerCtx, plain: &[u8], now: Instant) {
        let Some(w) = self.relay_mut().and_then(Relay::webmks_mut) else {
            return;
        };
        let WsPhase::Upgrading { handshake, head } = &mut w.phase else {
            self.webmks_down(ctx, plain, now);
            return;
        };
        let room = (MAX_UPGRADE_RESPONSE_BYTES + 1).saturating_sub(head.len());
        head.extend_from_slice(&plain[..plain.len().min(room)]);
        let limits = ResponseLimits {
            max_response_bytes: MAX_UPGRADE_RESPONSE_BYTES,
            max_headers: MAX_UPGRADE_RESPONSE_HEADERS,
        };
        match handshake.parse_response(head, &limits) {
            Ok(None) => {}
            Ok(Some((accepted, consumed))) => {
                let rest = head.split_off(consumed.min(head.len()));
                let rest = [rest.as_slice(), &plain[plain.len().min(room)..]].concat();
                w.phase = WsPhase::Open;
                let held = std::mem::take(&mut w.held_up);
                self.deadline = None;
                tracing::debug!(session = self.id, protocol = ?accepted.protocol, "WebMKS upgrade done");
                if !held.is_empty() {
                    self.webmks_browser_frames(ctx, &held, now);
                }
                self.webmks_down(ctx, &rest, now);
            }
            Err(e) => {
                let cause = Cause::from(&e);
                tracing::warn!(session = self.id, cause = cause.kind(), error = %e, "backend refused the WebSocket upgrade");
                self.close_for(ctx, cause, cause.kind(), now);
            }
        }
    }

    /// Backend frames toward the browser: data passes through unchanged,
    /// control frames are the appliance's to answer.
    fn webmks_down(&mut self, ctx: &mut WorkerCtx, mut data: &[u8], now: Instant) {
        while !data.is_empty() {
            let Some(r) = self.relay_mut() else { return };
            if r.phase != RelayPhase::Open {
                return;
            }
            r.last_activity = now;
            let Some(w) = r.webmks_mut() else { return };
            let scan = match w.down.scan(data) {
                Ok(s) => s,
                Err(e) => {
                    ctx.metrics.count(Cause::from(&e));
                    tracing::warn!(session = self.id, error = %e, "backend broke the WebSocket protocol");
                    self.start_close(
                        ctx,
                        close_code::INTERNAL_ERROR,
                        "backend protocol error",
                        now,
                    );
                    return;
                }
            };
            let consumed = scan.consumed();
            match scan {
                Scan::Forward(n) => self.webmks_forward_down(ctx, &data[..n], now),
                Scan::Header { raw, .. } => self.webmks_forward_down(ctx, raw.as_bytes(), now),
                Scan::Control { event, .. } => self.webmks_backend_control(ctx, event, now),
                Scan::NeedMore { .. } | Scan::AfterClose { .. } => {}
            }
            data = &data[consumed..];
            if consumed == 0 {
                break;
            }
        }
        self.webmks_flush_deferred_down(ctx);
    }

    fn webmks_forward_down(&mut self, ctx: &mut WorkerCtx, bytes: &[u8], now: Instant) {
        self.browser.down_since.get_or_insert(now);
        self.bytes_down += bytes.len() as u64;
        ctx.metrics.bytes_backend_to_browser += bytes.len() as u64;
        self.browser.push(ctx, &[bytes]);
        self.webmks_flush_deferred_down(ctx);
    }

    /// Our frames for the browser that waited for a boundary.
    fn webmks_flush_deferred_down(&mut self, ctx: &mut WorkerCtx) {
        let Some(w) = self.relay_mut().and_then(Relay::webmks_mut) else {
            return;
        };
        if !w.down.at_frame_boundary() || w.to_browser_later.is_empty() {
            return;
        }
        let frames = std::mem::take(&mut w.to_browser_later);
        for f in frames {
            self.browser.push(ctx, &[f.as_bytes()]);
        }
    }

    fn webmks_backend_control(&mut self, ctx: &mut WorkerCtx, event: Event, now: Instant) {
        match event {
            Event::Ping(p) => {
                let Some(w) = self.relay_mut().and_then(Relay::webmks_mut) else {
                    return;
                };
                match w.keys.next_key() {
                    Ok(key) => {
                        let pong = websocket::client_pong_frame(p.as_slice(), key);
                        self.webmks_send_backend_control(ctx, pong);
                    }
                    Err(e) => self.close_for(ctx, Cause::from(&e), "no randomness", now),
                }
            }
            Event::Pong(_) => {}
            Event::Close { code, reason } => {
                ctx.metrics.count(Cause::BackendClosedWs);
                let why = String::from_utf8_lossy(reason.as_slice())
                    .escape_debug()
                    .to_string();
                tracing::debug!(session = self.id, code = ?code, reason = %why, "backend closed the WebSocket");
                // Its close is echoed by webmks_closing (below start_close).
                let code = sendable_code(code, close_code::NORMAL);
                self.start_close(ctx, code, "backend closed", now);
                self.close = Some(super::CloseInfo {
                    code: Some(code),
                    reason: format!("backend closed: {why}"),
                });
            }
        }
    }

    /// One of our control frames for the backend (masked): at the next
    /// frame boundary of the upstream.
    fn webmks_send_backend_control(&mut self, ctx: &mut WorkerCtx, frame: ControlFrame) {
        let Some(Relay {
            kind: RelayKind::WebMks(w),
            to_backend,
            ..
        }) = self.relay_mut()
        else {
            return;
        };
        if w.up.at_frame_boundary() && w.to_backend_later.is_empty() {
            seal_all(&mut w.tls, frame.as_bytes(), to_backend, &mut ctx.pool);
        } else {
            defer(&mut w.to_backend_later, frame);
        }
    }

    fn webmks_flush_deferred_up(&mut self, ctx: &mut WorkerCtx) {
        let Some(Relay {
            kind: RelayKind::WebMks(w),
            to_backend,
            ..
        }) = self.relay_mut()
        else {
            return;
        };
        if !w.up.at_frame_boundary() {
            return;
        }
        for f in std::mem::take(&mut w.to_backend_later) {
            seal_all(&mut w.tls, f.as_bytes(), to_backend, &mut ctx.pool);
        }
    }

    /// The browser's frames toward the backend: data passes through with
    /// the browser's mask, control frames are the appliance's to answer.
    pub(super) fn webmks_browser_frames(
        &mut self,
        ctx: &mut WorkerCtx,
        mut data: &[u8],
        now: Instant,
    ) {
        let max_held = ctx.cfg.limits.max_request_bytes;
        let Some(w) = self.relay_mut().and_then(Relay::webmks_mut) else {
            return;
        };
        if !w.upgraded() {
            // Kept for when the backend is ready (the browser is not read
            // meanwhile; these came with its request).
            let take = data.len().min(max_held.saturating_sub(w.held_up.len()));
            w.held_up.extend_from_slice(&data[..take]);
            return;
        }
        while !data.is_empty() {
            let Some(r) = self.relay_mut() else { return };
            let closing = r.is_closing();
            let Some(w) = r.webmks_mut() else { return };
            if w.up.close_received() {
                return;
            }
            let scan = match w.up.scan(data) {
                Ok(s) => s,
                Err(e) => {
                    ctx.metrics.count(Cause::from(&e));
                    tracing::info!(session = self.id, error = %e, "protocol error from browser");
                    self.start_close(ctx, e.close_code(), &e.to_string(), now);
                    // The browser broke the protocol: do not wait for its close.
                    self.set_close_received();
                    return;
                }
            };
            let consumed = scan.consumed();
            match scan {
                // After our close frame, data is dropped while we wait for
                // the browser's close.
                Scan::Forward(_) | Scan::Header { .. } if closing => {}
                Scan::Forward(n) => self.webmks_forward_up(ctx, &data[..n], now),
                Scan::Header { raw, .. } => self.webmks_forward_up(ctx, raw.as_bytes(), now),
                Scan::Control { event, .. } => self.on_ws_event(ctx, event, now),
                Scan::NeedMore { .. } | Scan::AfterClose { .. } => {}
            }
            data = &data[consumed..];
            if consumed == 0 {
                break;
            }
        }
        self.webmks_flush_deferred_up(ctx);
    }

    fn webmks_forward_up(&mut self, ctx: &mut WorkerCtx, bytes: &[u8], now: Instant) {
        let Some(Relay {
            kind: RelayKind::WebMks(w),
            to_backend,
            up_since,
            ..
        }) = self.relay_mut()
        else {
            return;
        };
        up_since.get_or_insert(now);
        seal_all(&mut w.tls, bytes, to_backend, &mut ctx.pool);
        self.bytes_up += bytes.len() as u64;
        ctx.metrics.bytes_browser_to_backend += bytes.len() as u64;
        self.webmks_flush_deferred_up(ctx);
    }

    /// The relay is closing with `code` (called before the close frame to
    /// the browser is queued): finish a half-relayed frame in each
    /// direction so a control frame may follow it, and run the close
    /// handshake with the backend (our close frame, then TLS close_notify).
    pub(super) fn webmks_closing(&mut self, ctx: &mut WorkerCtx, code: u16) {
        let limit = ctx.cfg.limits.buffer_bytes as u64;
        let Some(Relay {
            kind: RelayKind::WebMks(w),
            to_backend,
            backend,
            ..
        }) = self.relay_mut()
        else {
            return;
        };
        let backend_up = backend.is_up();
        if w.upgraded() && backend_up && !w.backend_close_done {
            // The rest of a browser frame we were relaying (its bytes are
            // masked garbage to the backend, which is being left anyway).
            let rest = w.up.remaining_in_frame();
            if rest > 0 && rest <= limit {
                let pad = vec![0u8; rest as usize];
                // (The tracker keeps following the browser's real stream:
                // its close frame must still be found.)
                seal_all(&mut w.tls, &pad, to_backend, &mut ctx.pool);
            }
            for f in std::mem::take(&mut w.to_backend_later) {
                seal_all(&mut w.tls, f.as_bytes(), to_backend, &mut ctx.pool);
            }
            if let Ok(key) = w.keys.next_key() {
                let close = websocket::client_close_frame(code, "", key);
                seal_all(&mut w.tls, close.as_bytes(), to_backend, &mut ctx.pool);
            }
        }
        if backend_up {
            w.tls.send_close_notify();
            flush_sealed(&mut w.tls, to_backend, &mut ctx.pool);
        }
        w.backend_close_done = true;
        // The rest of a backend frame the browser was receiving: zeros, so
        // our close frame can follow a whole frame.
        // (Beyond `buffer_bytes` of padding, our frames stay deferred and
        // the session ends on its close timer instead.)
        let rest = w.down.remaining_in_frame();
        if rest > limit {
            return;
        }
        let frames = std::mem::take(&mut w.to_browser_later);
        // No more backend bytes are relayed: the downstream is at a
        // boundary once padded.
        w.down = FrameTracker::new(Role::Client, DecoderLimits { max_frame_bytes: 0 });
        if rest > 0 {
            let pad = vec![0u8; rest as usize];
            self.browser.push(ctx, &[&pad]);
        }
        for f in frames {
            self.browser.push(ctx, &[f.as_bytes()]);
        }
    }
}
