//! The front stage: from the first byte to a decision. Sniff TLS, read the
//! HTTP upgrade request (bounded by `max_request_bytes` and the handshake
//! timer), check Origin and subprotocol, route (fixed target, token table,
//! or an admitted session and its ticket), then hand over: to a relay (101
//! sent) or to an HTTP answer (an error, or a static file).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ctx::{HandshakeSlot, WorkerCtx};
use super::relay::{BackendState, Relay, RelayKind, RelayPhase};
use super::vnc::VncRelay;
use super::webmks::WebMksRelay;
use super::{ms, Responding, Session, Stage};
use crate::cause::Cause;
use crate::dataplane::router::{ConnInfo, Route};
use crate::mailbox::{Admission, FromWorker, TargetKind};
use crate::protocol::http_upgrade::{self, Request, RequestLimits, Upgrade};
use crate::protocol::rfb::{self, RfbLimits};
use crate::protocol::websocket::{Decoder, DecoderLimits, PayloadMode};

/// What the front stage holds.
pub(super) struct Front {
    /// No byte seen yet on a port that serves TLS too: the first byte says
    /// which.
    pub(super) sniffing: bool,
    /// The request head so far.
    req: Vec<u8>,
    /// This connection's place among those in their handshake; given back
    /// when the stage ends (dropped with it).
    _slot: Option<HandshakeSlot>,
    /// A console by VM id waiting for the control plane ([`super::console`]).
    pub(super) parked: Option<Box<super::console::Parked>>,
    /// Who the client is and its per-IP places (`edge.rs`).
    pub(super) edge: super::edge::EdgeFront,
}

impl Front {
    pub(super) fn new(tls_port: bool, slot: Option<HandshakeSlot>) -> Self {
        Self {
            sniffing: tls_port,
            req: Vec::new(),
            _slot: slot,
            parked: None,
            edge: Default::default(),
        }
    }
}

/// How long a static-file response may go without the browser taking a
/// byte before the connection is dropped (renewed on every write).
pub(super) fn web_response_grace(ctx: &WorkerCtx) -> Duration {
    ms(ctx.cfg.limits.close_timeout_ms.max(5_000))
}

impl Session {
    pub(super) fn sniff(&mut self, ctx: &mut WorkerCtx, first: u8, now: Instant) {
        // A TLS ClientHello starts with record type 22 (handshake); websockify
        // sniffs the same way to serve ws and wss on one port.
        if let Stage::Front(f) = &mut self.stage {
            f.sniffing = false;
        }
        let ssl_only = ctx.cfg.tls.as_ref().is_some_and(|t| t.ssl_only);
        match (first, ctx.tls.clone()) {
            (0x16, Some(cfg)) => match rustls::ServerConnection::new(cfg) {
                Ok(conn) => self.browser.tls = Some(Box::new(conn)),
                Err(e) => {
                    ctx.metrics.count(Cause::TlsSetup);
                    tracing::error!(session = self.id, error = %e, "TLS session setup failed");
                    self.finish(ctx, now);
                }
            },
            _ if ssl_only => {
                ctx.metrics.count(Cause::PlainOnTlsOnly);
                tracing::info!(session = self.id, "plain connection refused (TLS only)");
                self.finish(ctx, now);
            }
            _ => {}
        }
    }

    /// Request bytes: accumulate (bounded) and try to parse the head.
    pub(super) fn front_input(&mut self, ctx: &mut WorkerCtx, data: &[u8], now: Instant) {
        let Stage::Front(f) = &mut self.stage else {
            return;
        };
        let max = ctx.cfg.limits.max_request_bytes;
        if let Some(p) = f.parked.as_mut() {
            if !p.take_early(data, max) {
                ctx.metrics.count(Cause::RequestTooLarge);
                self.respond_error(
                    ctx,
                    Cause::RequestTooLarge,
                    "bytes before the upgrade answer",
                    now,
                );
            }
            return;
        }
        let take = data.len().min(max.saturating_sub(f.req.len()).max(1));
        f.req.extend_from_slice(&data[..take]);
        self.try_handshake(ctx, now);
        if take < data.len() && self.relay().is_some() {
            // Frames the browser sent right behind its request.
            self.decode_input(ctx, &data[take..], now);
        }
    }

    /// The request did not arrive in time: 408 when HTTP can still be
    /// answered, else just end.
    pub(super) fn handshake_timed_out(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        ctx.metrics.count(Cause::HandshakeTimeout);
        tracing::info!(session = self.id, "handshake timed out");
        let tls_unfinished = self
            .browser
            .tls
            .as_ref()
            .is_some_and(|t| t.is_handshaking());
        let sniffing = matches!(&self.stage, Stage::Front(f) if f.sniffing);
        if tls_unfinished || sniffing {
            // Nothing sensible can be sent on an unfinished TLS handshake.
            self.finish(ctx, now);
        } else {
            self.respond_error(
                ctx,
                Cause::HandshakeTimeout,
                "the request did not arrive in time",
                now,
            );
        }
    }

    fn try_handshake(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        let Stage::Front(f) = &mut self.stage else {
            return;
        };
        let l = &ctx.cfg.limits;
        let limits = RequestLimits {
            max_request_bytes: l.max_request_bytes,
            max_headers: l.max_headers,
        };
        let (request, consumed) = match http_upgrade::parse_request(&f.req, &limits) {
            Ok(None) => return,
            Ok(Some(r)) => r,
            Err(e) => {
                let cause = Cause::from(&e);
                ctx.metrics.count(cause);
                tracing::info!(session = self.id, status = e.status(), error = %e, "bad handshake");
                self.respond_error(ctx, cause, &e.to_string(), now);
                return;
            }
        };
        let leftover = f.req.split_off(consumed);
        f.req = Vec::new();
        let up = match request {
            Request::Get { path, head, .. } => {
                self.respond_get(ctx, &path, head, now);
                return;
            }
            Request::Upgrade(up) => up,
        };
        if !self.edge_upgrade(ctx, &up, now) {
            return;
        }
        if let Err((cause, message)) = check_origin_and_protocol(ctx, &up) {
            ctx.metrics.count(cause);
            tracing::info!(session = self.id, origin = ?up.origin, offered = ?up.protocols, cause = cause.kind(), "upgrade refused");
            self.respond_error(ctx, cause, &message, now);
            return;
        }
        if super::console::is_console_path(&up.path) {
            self.park_console(ctx, up, leftover, now);
            return;
        }
        let route = match self.route(ctx, &up, now) {
            Some(r) => r,
            None => return,
        };
        self.upgrade(ctx, &up, route, now);
        if !leftover.is_empty() {
            self.decode_input(ctx, &leftover, now);
        }
    }

    /// A plain GET: a static file when the port serves them, else 400.
    fn respond_get(&mut self, ctx: &mut WorkerCtx, path: &str, head: bool, now: Instant) {
        let Some(web) = ctx.web.clone() else {
            ctx.metrics.count(Cause::NotWebsocket);
            self.respond_error(
                ctx,
                Cause::NotWebsocket,
                "this port expects a WebSocket upgrade request",
                now,
            );
            return;
        };
        ctx.metrics.static_responses += 1;
        let (resp, body) = web.open(path, head);
        self.browser.push(ctx, &[&resp]);
        self.stage = Stage::Responding(Responding { body });
        self.deadline = Some(now + web_response_grace(ctx));
        self.stream_web_body(ctx, now);
    }

    /// Queue more of a static file while less than `buffer_bytes` waits
    /// for the browser; a read error ends the response (the connection
    /// closes short of its Content-Length, which the browser notices).
    pub(super) fn stream_web_body(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        let limit = ctx.cfg.limits.buffer_bytes;
        while self.browser.queued() < limit {
            let Stage::Responding(Responding { body: Some(body) }) = &mut self.stage else {
                return;
            };
            let mut scratch = std::mem::take(&mut ctx.scratch);
            let room = (limit - self.browser.queued()).min(scratch.len());
            let r = body.read_chunk(&mut scratch[..room]);
            match r {
                Ok(0) => {
                    self.stage = Stage::Responding(Responding { body: None });
                }
                Ok(n) => self.browser.push(ctx, &[&scratch[..n]]),
                Err(e) => {
                    ctx.metrics.count(Cause::WebRead);
                    tracing::warn!(session = self.id, error = %e, "static file read failed");
                    ctx.scratch = scratch;
                    self.finish(ctx, now);
                    return;
                }
            }
            ctx.scratch = scratch;
        }
    }

    /// Answer with an HTTP error (the JSON error body) and end.
    pub(super) fn respond_error(
        &mut self,
        ctx: &mut WorkerCtx,
        cause: Cause,
        message: &str,
        now: Instant,
    ) {
        let status = cause.status().unwrap_or(400);
        self.respond_with(ctx, status, cause.kind(), message, &[], now);
    }

    /// Answer with HTTP `status` and the JSON error body `{code, message}`
    /// (plus `headers`, e.g. Retry-After), and end.
    pub(super) fn respond_with(
        &mut self,
        ctx: &mut WorkerCtx,
        status: u16,
        code: &str,
        message: &str,
        headers: &[(&str, &str)],
        now: Instant,
    ) {
        let mut resp = Vec::with_capacity(256);
        http_upgrade::write_error_response(&mut resp, status, code, message, headers);
        self.browser.push(ctx, &[&resp]);
        self.stage = Stage::Responding(Responding { body: None });
        self.deadline = Some(now + ms(ctx.cfg.limits.close_timeout_ms));
        self.close = Some(super::CloseInfo {
            code: None,
            reason: format!("HTTP {status} {code}"),
        });
    }

    /// Route the upgrade; on refusal answer it (and tell the control plane,
    /// for sessions it made) and return None.
    fn route(&mut self, ctx: &mut WorkerCtx, up: &Upgrade, now: Instant) -> Option<Route> {
        let info = ConnInfo {
            peer: self.peer.map(|p| p.ip()),
            bound: self.bound.as_ref(),
        };
        match ctx.router.route(up, info, now) {
            Ok(r) => Some(r),
            Err(e) => {
                let cause = Cause::from(&e);
                ctx.metrics.count(cause);
                tracing::info!(session = self.id, error = %e, "route refused");
                let id = self
                    .bound
                    .as_ref()
                    .map(|a| a.id)
                    .or_else(|| crate::dataplane::router::session_id_from_path(&up.path));
                // Only for sessions the control plane made: anyone can send
                // a made-up id, and must not fill the report queue with it.
                if let Some(id) = id {
                    if self.bound.is_some() || ctx.router.knows(id) {
                        ctx.report(FromWorker::Refused { id, kind: e.kind() });
                    }
                }
                self.respond_error(ctx, cause, &e.to_string(), now);
                None
            }
        }
    }

    /// Accepted: answer 101 and become a relay (connecting).
    pub(super) fn upgrade(
        &mut self,
        ctx: &mut WorkerCtx,
        up: &Upgrade,
        route: Route,
        now: Instant,
    ) {
        // Checked in check_origin_and_protocol.
        let protocol = http_upgrade::choose_subprotocol(&up.protocols).unwrap_or(None);
        let mode = if protocol == Some("base64") {
            PayloadMode::Base64
        } else {
            PayloadMode::Raw
        };
        let kind = match self.relay_kind(ctx, &route, mode, &up.protocols) {
            Ok(k) => k,
            Err((cause, message)) => {
                ctx.metrics.count(cause);
                tracing::warn!(session = self.id, cause = cause.kind(), error = %message, "upgrade refused");
                self.settle_refused_claim(ctx, route.admission.as_ref(), cause);
                self.respond_error(ctx, cause, &message, now);
                return;
            }
        };
        let admission = route.admission;
        if let Some(a) = &admission {
            ctx.report(FromWorker::Opened {
                id: a.id,
                worker: ctx.worker_id,
                peer: self.peer,
            });
        }
        let addr = route.target.addr;
        let relay = Relay::new(
            RelayPhase::Connecting,
            admission,
            addr,
            BackendState::Connecting,
            mode,
            now,
            kind,
        );
        let mut resp = Vec::with_capacity(256);
        http_upgrade::write_upgrade_response(&mut resp, &up.key, protocol);
        self.browser.push(ctx, &[&resp]);
        self.stage = Stage::Relay(Box::new(relay));
        self.deadline = Some(now + ms(ctx.cfg.limits.connect_timeout_ms));
        // The appliance's own RFB greeting to the browser, if it speaks RFB
        // for the backend's security phase.
        self.vnc_greeting(ctx);
        ctx.metrics.handshakes_ok += 1;
        tracing::debug!(
            session = self.id,
            worker = ctx.worker_id,
            backend = %addr,
            path = ?up.path,
            protocol = protocol.unwrap_or("-"),
            "session open"
        );
    }

    /// The route claimed `admission`'s ticket, then the upgrade was refused
    /// (no relay will report on it): close it and report it closed, and
    /// free its dedicated port. Left CLAIMED, the control plane would count
    /// the session open for good (a claimed admission never expires).
    fn settle_refused_claim(
        &mut self,
        ctx: &mut WorkerCtx,
        admission: Option<&Arc<Admission>>,
        cause: Cause,
    ) {
        let Some(a) = admission else { return };
        // The shared state first: the control plane reconciles from it
        // even if the report is lost.
        a.close();
        if self.bound.is_some() {
            ctx.ended_bound.push(a.id);
        }
        ctx.report(FromWorker::Closed {
            id: a.id,
            worker: ctx.worker_id,
            code: None,
            reason: format!("upgrade refused: {}", cause.kind()),
            bytes_up: 0,
            bytes_down: 0,
        });
    }

    /// What the backend kind needs for this session: the VNC relay (with
    /// the appliance's own RFB handshake when the target has a password),
    /// or the WebMKS relay (binary frames only: base64 cannot pass through).
    fn relay_kind(
        &self,
        ctx: &WorkerCtx,
        route: &Route,
        mode: PayloadMode,
        offered: &[String],
    ) -> Result<RelayKind, (Cause, String)> {
        let max_frame_bytes = ctx.cfg.limits.max_frame_bytes;
        match &route.target.kind {
            TargetKind::Vnc { password } => {
                // VMware's client (it offers `vmware-vvc`) on a plain VNC
                // server: the appliance runs the RFB handshake itself, to
                // know where its client messages start and filter them.
                let vmware_client = offered.iter().any(|p| p == "vmware-vvc");
                let rfb = (password.is_some() || vmware_client).then(|| {
                    Box::new(rfb::Handshake::new(
                        password.as_deref().map(str::as_bytes),
                        RfbLimits::default(),
                    ))
                });
                let decoder = Decoder::new(mode, DecoderLimits { max_frame_bytes });
                Ok(RelayKind::Vnc(VncRelay::new(decoder, rfb, vmware_client)))
            }
            TargetKind::WebMks(_) if mode == PayloadMode::Base64 => Err((
                Cause::NoSupportedSubprotocol,
                "a VMware console passes binary frames through: offer `binary` or no subprotocol"
                    .into(),
            )),
            TargetKind::WebMks(t) => WebMksRelay::new(t.clone(), max_frame_bytes)
                .map(|w| RelayKind::WebMks(Box::new(w)))
                .map_err(|e| (Cause::BackendTls, format!("backend TLS setup: {e}"))),
        }
    }
}

/// The Origin allowlist (proxy mode's `--origin`) and a subprotocol we
/// speak; the error's cause and message otherwise.
fn check_origin_and_protocol(ctx: &WorkerCtx, up: &Upgrade) -> Result<(), (Cause, String)> {
    if !ctx.cfg.origins.is_empty() {
        let ok = up
            .origin
            .as_deref()
            .is_some_and(|o| ctx.cfg.origins.iter().any(|a| a.eq_ignore_ascii_case(o)));
        if !ok {
            return Err((Cause::OriginNotAllowed, "this Origin is not allowed".into()));
        }
    }
    http_upgrade::choose_subprotocol(&up.protocols)
        .map(|_| ())
        .map_err(|e| (Cause::from(&e), e.to_string()))
}
