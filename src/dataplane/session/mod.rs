//! The relay session state machine: one browser connection from accept to
//! close, sans-IO.
//!
//! The IO backends (epoll, io_uring) move bytes and report events; this
//! type decides everything else: TLS (rustls as a state machine), the HTTP
//! upgrade, routing, WebSocket framing both ways, backpressure, timeouts and
//! close codes. It never touches a socket, a clock (time is passed in) or a
//! runtime, and nothing a client sends makes it panic.
//!
//! A session is a [`Stage`] that owns only what it uses, handing over to the
//! next (sozu's `upgrade()` shape):
//!
//! - `Front` ([`front`]): sniff (TLS or plain?), then the HTTP upgrade
//!   request, the origin and subprotocol checks and routing; it holds the
//!   request bytes and the connection's place among those in their
//!   handshake. It becomes a `Relay` (the upgrade was accepted) or a
//!   `Responding` (an HTTP answer: an error or a static file).
//! - `Relay` ([`relay`]): connecting, open, then closing (our close frame
//!   sent, waiting for the browser's); it holds the browser's frame decoder,
//!   the queue toward the backend and the backend leg, and a [`RelayKind`]
//!   with what one kind of backend needs: [`vnc`] (raw RFB over TCP, with
//!   the appliance's own VNC security handshake and the zero-copy
//!   downstream paths). A new kind of backend is a new variant.
//! - `Responding`: the answer is being written (a static file streamed as
//!   the browser takes it).
//! - `Done`.
//!
//! The browser leg ([`browser`]: the queue toward the browser and TLS) is
//! shared by every stage.
//!
//! Backpressure contract with the IO layer: read from the browser only while
//! [`Session::want_browser_read`] holds and at most
//! [`Session::browser_read_limit`] bytes; likewise for the backend. Every
//! byte handed in is consumed, so the bound on buffered bytes is
//! `buffer_bytes` plus what one read can bring.
//!
//! After every event [`Session::check_invariants`] (debug builds) states
//! the pairs that must hold: queues within their bound, in-flight sends
//! within their queues, one spliced frame or one bulk receive at a time,
//! nothing left of a stage that is over.

mod browser;
mod console;
mod ctx;
mod edge;
mod front;
mod relay;
mod vnc;
mod webmks;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use console::{abandon as abandon_console_answer, is_console_path, vm_from_path};
pub use ctx::{HandshakeGauge, HandshakeSlot, WorkerCtx};

use crate::mailbox::{Admission, FromWorker};
use browser::BrowserLeg;
use front::Front;
use relay::{Relay, RelayPhase};

/// The stage a session is in, as the IO layer and tests see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Sniff,
    Handshake,
    Connecting,
    Relay,
    Closing,
    Responding,
    Done,
}

/// Why a session ended, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// WebSocket close code sent (or echoed); None when the session ended
    /// without one (HTTP response, browser vanished).
    pub code: Option<u16>,
    pub reason: String,
}

/// An HTTP answer being written: an error, or a static file streamed as the
/// browser takes it.
struct Responding {
    body: Option<crate::dataplane::web::WebBody>,
}

enum Stage {
    Front(Front),
    Responding(Responding),
    Relay(Box<Relay>),
    /// Over. A relay that ended stays here until [`Session::release`]: an
    /// io_uring send or receive may still hold its buffers.
    Done(Option<Box<Relay>>),
}

pub struct Session {
    pub id: u64,
    started: Instant,
    peer: Option<SocketAddr>,
    /// The admission of the dedicated listener this connection came from.
    bound: Option<Arc<Admission>>,
    browser: BrowserLeg,
    stage: Stage,
    /// When the current stage's timer fires: the handshake, the backend
    /// connect, the VNC handshake, the close handshake, an idle response.
    deadline: Option<Instant>,
    close: Option<CloseInfo>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Payload bytes that went through a pipe (for the close log line).
    pub bytes_spliced: u64,
    /// Payload bytes received straight into frame chunks by bulk receives
    /// (for the close log line).
    pub bytes_bulk_recv: u64,
    /// The browser left after its close frame while ours to a WebMKS
    /// backend was still queued: it is no longer read or written, and the
    /// session ends once the backend has its close (or on the close timer).
    browser_gone: bool,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Session {
    pub fn new(
        id: u64,
        ctx: &WorkerCtx,
        now: Instant,
        peer: Option<SocketAddr>,
        bound: Option<Arc<Admission>>,
    ) -> Self {
        Self::with_slot(id, ctx, now, peer, bound, None)
    }

    fn with_slot(
        id: u64,
        ctx: &WorkerCtx,
        now: Instant,
        peer: Option<SocketAddr>,
        bound: Option<Arc<Admission>>,
        slot: Option<HandshakeSlot>,
    ) -> Self {
        Self {
            id,
            started: now,
            peer,
            bound,
            browser: BrowserLeg::new(),
            stage: Stage::Front(Front::new(ctx.tls.is_some(), slot)),
            deadline: Some(now + ms(ctx.cfg.limits.handshake_timeout_ms)),
            close: None,
            bytes_up: 0,
            bytes_down: 0,
            bytes_spliced: 0,
            bytes_bulk_recv: 0,
            browser_gone: false,
        }
    }

    pub fn phase(&self) -> Phase {
        match &self.stage {
            Stage::Front(f) if f.sniffing => Phase::Sniff,
            Stage::Front(_) => Phase::Handshake,
            Stage::Responding(_) => Phase::Responding,
            Stage::Relay(r) => match r.phase {
                RelayPhase::Connecting => Phase::Connecting,
                RelayPhase::Open => Phase::Relay,
                RelayPhase::Closing { .. } => Phase::Closing,
            },
            Stage::Done(_) => Phase::Done,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.stage, Stage::Done(_))
    }

    pub fn close_info(&self) -> Option<&CloseInfo> {
        self.close.as_ref()
    }

    pub fn target(&self) -> Option<SocketAddr> {
        self.relay().map(|r| r.target)
    }

    fn relay(&self) -> Option<&Relay> {
        match &self.stage {
            Stage::Relay(r) => Some(r),
            _ => None,
        }
    }

    fn relay_mut(&mut self) -> Option<&mut Relay> {
        match &mut self.stage {
            Stage::Relay(r) => Some(r),
            _ => None,
        }
    }

    /// The relay, live or ended (an ended one's queues may still be held by
    /// io_uring operations until [`Session::release`]).
    fn any_relay(&self) -> Option<&Relay> {
        match &self.stage {
            Stage::Relay(r) | Stage::Done(Some(r)) => Some(r),
            _ => None,
        }
    }

    fn any_relay_mut(&mut self) -> Option<&mut Relay> {
        match &mut self.stage {
            Stage::Relay(r) | Stage::Done(Some(r)) => Some(r),
            _ => None,
        }
    }

    // ---- what the IO layer asks -------------------------------------------

    /// Read from the browser now?
    pub fn want_browser_read(&self, ctx: &WorkerCtx) -> bool {
        if self.browser_gone {
            return false;
        }
        match &self.stage {
            // A parked console request reads nothing until its answer.
            Stage::Front(f) => f.parked.is_none(),
            // WebMKS: the browser waits until the backend's upgrade is done.
            Stage::Relay(r) if !r.is_closing() && r.handshaking() && r.vnc().is_none() => false,
            Stage::Relay(r) => match r.phase {
                RelayPhase::Closing { .. } => true,
                _ => {
                    r.to_backend.len() < ctx.cfg.limits.buffer_bytes
                        && self.down_queued() < ctx.cfg.limits.buffer_bytes
                }
            },
            Stage::Responding(_) | Stage::Done(_) => false,
        }
    }

    /// Most bytes to read from the browser in one go.
    pub fn browser_read_limit(&self, ctx: &WorkerCtx) -> usize {
        let l = &ctx.cfg.limits;
        match &self.stage {
            Stage::Relay(r) if !r.is_closing() => l
                .buffer_bytes
                .saturating_sub(r.to_backend.len())
                .clamp(1, l.recv_buffer_bytes),
            _ => l.recv_buffer_bytes,
        }
    }

    /// Bytes waiting for the browser: queued, plus a spliced frame's
    /// payload still in the pipe.
    fn down_queued(&self) -> usize {
        self.browser.queued() + self.pipe_bytes()
    }

    /// The backend connection to open, once.
    pub fn take_connect(&mut self) -> Option<SocketAddr> {
        self.relay_mut().and_then(|r| r.connect_to.take())
    }

    /// The backend socket should be closed now (the session is ending).
    pub fn backend_should_close(&self) -> bool {
        match &self.stage {
            // WebMKS: once our close frame and close_notify are sent.
            Stage::Relay(r) => {
                r.backend.is_up()
                    && r.is_closing()
                    && (r.vnc().is_some() || r.to_backend.is_empty())
            }
            Stage::Done(Some(r)) => r.backend.is_up(),
            // A session that never relayed has no backend.
            _ => false,
        }
    }

    /// The IO layer closed the backend socket.
    pub fn backend_closed(&mut self) {
        if let Some(r) = self.any_relay_mut() {
            r.backend = relay::BackendState::Closed;
        }
    }

    /// Bytes to write to the browser (the first contiguous run). While a
    /// spliced frame is under way, only its header's bytes (then nothing
    /// until [`Session::splice_out_ready`] is 0).
    pub fn browser_pending(&self) -> &[u8] {
        let f = self.browser.to_browser.front();
        match self.splice_out() {
            Some(sp) => &f[..sp.before.min(f.len())],
            None => f,
        }
    }

    /// Bytes waiting for the browser, in the queue and in a splice pipe.
    pub fn browser_pending_len(&self) -> usize {
        self.down_queued()
    }

    /// Bytes to write to the backend (the first contiguous run).
    pub fn backend_pending(&self) -> &[u8] {
        match self.any_relay() {
            Some(r) if r.backend.is_open() => r.to_backend.front(),
            _ => &[],
        }
    }

    /// An asynchronous send of the first `n` pending browser bytes started
    /// (io_uring): they stay in place until [`Session::browser_sent`].
    pub fn browser_send_started(&mut self, n: usize) {
        self.browser.inflight = n;
    }

    /// Same as [`Session::browser_send_started`] for the backend.
    pub fn backend_send_started(&mut self, n: usize) {
        if let Some(r) = self.any_relay_mut() {
            r.backend_inflight = n;
        }
    }

    /// `n` bytes of [`Session::browser_pending`] were written.
    pub fn browser_sent(&mut self, ctx: &mut WorkerCtx, n: usize, now: Instant) {
        self.browser.sent(ctx, n);
        self.splice_header_sent(n);
        let pipe = self.pipe_bytes();
        self.browser.note_drained(ctx, pipe, now);
        if n > 0 && matches!(&self.stage, Stage::Responding(r) if r.body.is_some()) {
            self.deadline = Some(now + front::web_response_grace(ctx));
            self.stream_web_body(ctx, now);
        }
        self.settle(ctx, now);
    }

    /// `n` bytes of [`Session::backend_pending`] were written.
    pub fn backend_sent(&mut self, ctx: &mut WorkerCtx, n: usize, now: Instant) {
        if let Some(r) = self.any_relay_mut() {
            r.sent_to_backend(ctx, n, now);
        }
        self.check_invariants(ctx);
    }

    /// Return every buffer to the pool; call before dropping a done session,
    /// once no send or receive is in flight.
    pub fn release(&mut self, ctx: &mut WorkerCtx) {
        self.browser.release(ctx);
        match std::mem::replace(&mut self.stage, Stage::Done(None)) {
            Stage::Relay(mut r) | Stage::Done(Some(mut r)) => r.release(ctx),
            _ => {}
        }
    }

    /// The earliest instant at which [`Session::on_tick`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        let ping = self.relay().and_then(|r| r.next_ping);
        match (self.deadline, ping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---- events from the IO layer -----------------------------------------

    /// Bytes arrived from the browser (raw: TLS records when TLS is on).
    pub fn on_browser_data(&mut self, ctx: &mut WorkerCtx, data: &[u8], now: Instant) {
        if data.is_empty() || self.is_done() {
            return;
        }
        if let Some(r) = self.relay_mut() {
            r.last_activity = now;
        }
        // Who the client is (a PROXY header) before anything else reads.
        let Some(data) = self.edge_input(ctx, data, now) else {
            self.settle(ctx, now);
            return;
        };
        let data: &[u8] = &data;
        if data.is_empty() {
            self.settle(ctx, now);
            return;
        }
        if matches!(&self.stage, Stage::Front(f) if f.sniffing) {
            self.sniff(ctx, data[0], now);
            if self.is_done() {
                return;
            }
        }
        if self.browser.tls.is_some() {
            self.tls_input(ctx, data, now);
        } else {
            self.plain_input(ctx, data, now);
        }
        self.settle(ctx, now);
    }

    /// Plaintext bytes from the browser, by stage. Consumes all of `data`.
    fn plain_input(&mut self, ctx: &mut WorkerCtx, data: &[u8], now: Instant) {
        match &self.stage {
            Stage::Front(_) => self.front_input(ctx, data, now),
            Stage::Relay(_) => self.decode_input(ctx, data, now),
            Stage::Responding(_) | Stage::Done(_) => {}
        }
    }

    fn tls_input(&mut self, ctx: &mut WorkerCtx, data: &[u8], now: Instant) {
        // The leg hands plaintext back run by run; this session takes it.
        let mut browser = std::mem::replace(&mut self.browser, BrowserLeg::new());
        let outcome = browser.tls_input(ctx, data, |ctx, leg, plain| {
            std::mem::swap(&mut self.browser, leg);
            self.plain_input(ctx, plain, now);
            std::mem::swap(&mut self.browser, leg);
            !self.is_done()
        });
        self.browser = browser;
        match outcome {
            browser::TlsInput::Ok => {}
            browser::TlsInput::Closed => self.on_browser_gone(ctx, None, now),
            browser::TlsInput::Failed(cause, why) => {
                ctx.metrics.count(cause);
                tracing::info!(session = self.id, error = %why, "TLS input refused");
                // The alert rustls queued goes out; then the connection ends.
                if self.browser.queued() > 0 && !self.is_done() {
                    self.stage = Stage::Responding(Responding { body: None });
                    self.deadline = Some(now + ms(ctx.cfg.limits.close_timeout_ms));
                } else {
                    self.finish(ctx, now);
                }
            }
        }
    }

    /// The browser closed its side (EOF) or the socket failed.
    pub fn on_browser_gone(
        &mut self,
        ctx: &mut WorkerCtx,
        error: Option<&io::Error>,
        now: Instant,
    ) {
        if self.is_done() {
            return;
        }
        match error {
            Some(e) => {
                ctx.metrics.count(crate::cause::Cause::BrowserIo);
                tracing::debug!(session = self.id, error = %e, "browser connection failed");
            }
            None => {
                if matches!(self.phase(), Phase::Connecting | Phase::Relay) {
                    ctx.metrics
                        .count(crate::cause::Cause::BrowserEofWithoutClose);
                }
            }
        }
        if self.close.is_none() {
            self.close = Some(CloseInfo {
                code: None,
                reason: "browser went away".into(),
            });
        }
        self.browser.drop_unsent(ctx);
        // The IO layer drops a pipe that still holds bytes with the session.
        self.drop_splice();
        let backend_close_queued = matches!(
            &self.stage,
            Stage::Relay(r) if matches!(r.phase, RelayPhase::Closing { close_received: true })
                && !r.backend_flushed()
        );
        if backend_close_queued && error.is_none() {
            // The browser ran its close and left at once (its FIN right
            // behind its close frame): our close frame and close_notify to
            // the WebMKS backend still go out; `settle` ends the session
            // once they did, the close timer if they never do.
            self.browser_gone = true;
            self.settle(ctx, now);
            return;
        }
        self.finish(ctx, now);
        self.check_invariants(ctx);
    }

    // ---- control ----------------------------------------------------------

    /// Whether this connection belongs to appliance session `id` (it
    /// carries it, or came in on its dedicated listener).
    pub fn serves(&self, id: u64) -> bool {
        self.admission().is_some_and(|a| a.id == id) || self.bound_id() == Some(id)
    }

    fn admission(&self) -> Option<&Arc<Admission>> {
        self.relay().and_then(|r| r.admission.as_ref())
    }

    /// The admission of the dedicated listener this connection came from.
    pub fn bound_id(&self) -> Option<u64> {
        self.bound.as_ref().map(|a| a.id)
    }

    /// The control plane revoked the session (DELETE, close-sessions:
    /// 1008; evicted from the viewer pool: 4001).
    pub fn on_revoke(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        let (cause, reason) = self.revoke_cause();
        ctx.metrics.count(cause);
        self.end_for(ctx, cause, reason, now);
        self.settle(ctx, now);
    }

    /// Why the control plane revoked this session, from the admission.
    fn revoke_cause(&self) -> (crate::cause::Cause, &'static str) {
        match self.admission().map(|a| a.revoke_cause()) {
            Some(crate::mailbox::revoke_cause::EVICTED) => (
                crate::cause::Cause::Evicted,
                "evicted: the least recently active console, closed to make room",
            ),
            _ => (crate::cause::Cause::Revoked, "session revoked"),
        }
    }

    /// Server shutdown: close with 1001.
    pub fn on_drain(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        self.end_for(
            ctx,
            crate::cause::Cause::Drained,
            "server shutting down",
            now,
        );
        self.settle(ctx, now);
    }

    /// End the session for `cause`: a relay closes with the cause's close
    /// code, a connection still in its handshake just ends.
    fn end_for(
        &mut self,
        ctx: &mut WorkerCtx,
        cause: crate::cause::Cause,
        reason: &str,
        now: Instant,
    ) {
        match &self.stage {
            Stage::Relay(r) if !r.is_closing() => {
                let code = cause
                    .close_code()
                    .unwrap_or(crate::protocol::websocket::close_code::POLICY);
                self.start_close(ctx, code, reason, now);
            }
            Stage::Front(_) => self.finish(ctx, now),
            _ => {}
        }
    }

    /// Timers: handshake, connect, idle, heartbeat, close.
    pub fn on_tick(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        let expired = self.deadline.is_some_and(|d| now >= d);
        match &self.stage {
            Stage::Front(f) if expired && f.parked.is_some() => self.console_timed_out(ctx, now),
            Stage::Front(_) if expired => self.handshake_timed_out(ctx, now),
            Stage::Relay(_) => self.relay_tick(ctx, expired, now),
            Stage::Responding(_) if expired => self.finish(ctx, now),
            _ => {}
        }
        self.settle(ctx, now);
    }

    // ---- ending -------------------------------------------------------------

    /// After every event: end what is over, then check the invariants.
    fn settle(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        let flushed = self.down_queued() == 0;
        match &self.stage {
            // (A WebMKS session also waits, on its close timer, until the
            // backend got our close frame: on io_uring the browser's side
            // may finish first, and ending then would cut it.)
            Stage::Relay(r)
                if flushed
                    && r.backend_flushed()
                    && matches!(
                        r.phase,
                        RelayPhase::Closing {
                            close_received: true
                        }
                    ) =>
            {
                self.finish(ctx, now)
            }
            Stage::Responding(r) if flushed && r.body.is_none() => self.finish(ctx, now),
            _ => {}
        }
        self.check_invariants(ctx);
    }

    fn finish(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        self.deadline = None;
        let relay = match std::mem::replace(&mut self.stage, Stage::Done(None)) {
            Stage::Relay(r) => r,
            done @ Stage::Done(_) => {
                self.stage = done;
                return;
            }
            // No relay was ever set up: nothing to report.
            Stage::Front(_) | Stage::Responding(_) => return,
        };
        // Only the connection that claimed the ticket frees the dedicated
        // port; a refused second connection ending must not.
        if let (Some(a), Some(_)) = (&self.bound, &relay.admission) {
            ctx.ended_bound.push(a.id);
        }
        ctx.metrics.sessions_closed += 1;
        let info = self.close.clone().unwrap_or(CloseInfo {
            code: None,
            reason: "closed".into(),
        });
        tracing::info!(
            session = self.id,
            worker = ctx.worker_id,
            code = info.code.unwrap_or(0),
            reason = %info.reason,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            bytes_spliced = self.bytes_spliced,
            bytes_bulk_recv = self.bytes_bulk_recv,
            duration_ms = now.duration_since(self.started).as_millis() as u64,
            "session closed"
        );
        if let Some(a) = relay.admission.as_ref() {
            // The shared state first: the control plane reconciles from
            // it even if the report below is lost.
            a.close();
            let id = a.id;
            ctx.report(FromWorker::Closed {
                id,
                worker: ctx.worker_id,
                code: info.code,
                reason: info.reason,
                bytes_up: self.bytes_up,
                bytes_down: self.bytes_down,
            });
        }
        // Its buffers go back in `release`, once no operation holds them.
        self.stage = Stage::Done(Some(relay));
    }
}

impl Session {
    /// The pairs that must hold after every event (debug builds): queues
    /// within their bound, in-flight sends within their queues, one spliced
    /// frame or one bulk receive at a time, and nothing left of a stage that
    /// is over. A violation is a bug in this module, never in the input.
    pub fn check_invariants(&self, ctx: &WorkerCtx) {
        if !cfg!(debug_assertions) {
            return;
        }
        let l = &ctx.cfg.limits;
        // One read beyond the bound, framed (or base64-expanded), plus the
        // control frames a read's worth of pings can ask for, plus TLS
        // record overhead: what "buffer_bytes plus one read" means in bytes.
        // On io_uring a multishot receive being cancelled may still
        // complete into every provided buffer once (docs/ARCHITECTURE.md).
        let chunk = WorkerCtx::chunk_bytes_for(l.recv_buffer_bytes);
        let down_bound = l.buffer_bytes + (3 + usize::from(l.uring_provided_buffers)) * chunk;
        debug_assert!(
            self.browser.inflight <= self.browser.queued(),
            "browser send of {} bytes beyond the {} queued",
            self.browser.inflight,
            self.browser.queued()
        );
        debug_assert!(
            self.browser.queued() <= down_bound || matches!(self.stage, Stage::Done(_)),
            "{} bytes queued for the browser, over {down_bound}",
            self.browser.queued()
        );
        match &self.stage {
            Stage::Relay(r) | Stage::Done(Some(r)) => {
                debug_assert!(
                    r.backend_inflight <= r.to_backend.len(),
                    "backend send beyond its queue"
                );
                debug_assert!(
                    r.to_backend.len() <= down_bound,
                    "{} bytes queued for the backend, over {down_bound}",
                    r.to_backend.len(),
                );
                if let Some(sp) = r.vnc().and_then(|v| v.splice()) {
                    let v = r.vnc().expect("a splice is a VNC relay's");
                    debug_assert!(
                        sp.before <= self.browser.queued(),
                        "splice header beyond the queue"
                    );
                    debug_assert!(
                        sp.in_pipe <= l.buffer_bytes.max(l.splice_pipe_bytes),
                        "spliced frame over its bound"
                    );
                    debug_assert!(!v.bulk_receiving(), "a splice and a bulk receive at once");
                }
                if r.is_closing() {
                    debug_assert!(r.next_ping.is_none(), "pings while closing");
                }
                if let relay::RelayKind::WebMks(w) = &r.kind {
                    debug_assert!(
                        w.deferred() <= 2 * webmks::MAX_DEFERRED_CONTROL_FRAMES,
                        "deferred control frames over their bound"
                    );
                    // One read's plaintext: a TLS record may add its own.
                    let held_bound = down_bound + webmks::MAX_TLS_RECORD_PLAINTEXT_BYTES;
                    debug_assert!(
                        w.held_up_len() <= held_bound,
                        "{} browser bytes held for the backend's upgrade, over {held_bound}",
                        w.held_up_len()
                    );
                }
                if matches!(self.stage, Stage::Done(_)) {
                    debug_assert!(self.deadline.is_none(), "a timer on a finished session");
                }
            }
            Stage::Front(_) => {}
            Stage::Responding(_) => {}
            Stage::Done(None) => {
                debug_assert!(self.deadline.is_none(), "a timer on a finished session");
            }
        }
    }
}

#[cfg(test)]
mod tests;
