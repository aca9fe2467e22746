//! The edge of a connection, before anything else reads its bytes: who
//! the client is (the TCP peer; a PROXY header from a trusted proxy; its
//! `X-Forwarded-For` once the request head is read) and the per-client-IP
//! limits (`dataplane::client_limits`). The client address found here
//! becomes the session's peer: the logs, the ticket's client binding and
//! the control plane's record use it.
//!
//! Sans-IO like the rest of the session. Bytes are held here only while a
//! PROXY header may still be coming: at most one read plus
//! `proxy_protocol::MAX_HEADER_BYTES`.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::{ms, CloseInfo, Responding, Session, Stage, WorkerCtx};
use crate::cause::Cause;
use crate::dataplane::client_limits::{self, ClientPass, ClientSource, Refusal};
use crate::protocol::http_upgrade::{self, Upgrade};
use crate::protocol::proxy_protocol::{self, Detect};

/// What the front stage still waits for before its bytes go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Wait {
    /// Nothing: bytes go straight to the front stage.
    #[default]
    Nothing,
    /// The first bytes, to refuse a PROXY header from an untrusted peer.
    NotAHeader,
    /// A PROXY header from a trusted proxy.
    ProxyHeader { required: bool },
}

/// The front stage's edge state.
#[derive(Debug, Default)]
pub(super) struct EdgeFront {
    wait: Wait,
    /// Bytes held while `wait` is undecided.
    held: Vec<u8>,
    /// The per-IP check waits for `X-Forwarded-For` in the request head.
    forwarded: bool,
    /// This connection's places in the handshake counts.
    pass: ClientPass,
}

impl Session {
    /// A connection was just accepted: how its client will be known, and
    /// the checks that can be made before reading a byte.
    pub(super) fn edge_start(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        let Some(gate) = ctx.clients.as_ref() else {
            return;
        };
        let source = gate.source_of(self.peer);
        let Stage::Front(f) = &mut self.stage else {
            return;
        };
        if let Err(r) = gate.enter_total(&mut f.edge.pass) {
            self.refuse_limited(ctx, r, now);
            return;
        }
        match source {
            ClientSource::Peer => {
                f.edge.wait = Wait::NotAHeader;
                if let Some(ip) = self.peer.map(|p| p.ip()) {
                    self.client_known(ctx, ip, now);
                }
            }
            ClientSource::ProxyHeader { required } => f.edge.wait = Wait::ProxyHeader { required },
            ClientSource::Forwarded => {
                f.edge.wait = Wait::NotAHeader;
                f.edge.forwarded = true;
            }
        }
    }

    /// Browser bytes before the front stage sees them: `Some` with what
    /// it is to see (the held bytes and these, less a PROXY header), None
    /// while undecided or when the connection was refused.
    pub(super) fn edge_input<'a>(
        &mut self,
        ctx: &mut WorkerCtx,
        data: &'a [u8],
        now: Instant,
    ) -> Option<Cow<'a, [u8]>> {
        let Stage::Front(f) = &mut self.stage else {
            return Some(Cow::Borrowed(data));
        };
        match f.edge.wait {
            Wait::Nothing => Some(Cow::Borrowed(data)),
            Wait::NotAHeader => {
                // Mostly decided by the first byte ("G" of GET, 0x16 of
                // TLS): nothing is copied then.
                let fresh = f.edge.held.is_empty();
                let detected = if fresh {
                    proxy_protocol::detect(data)
                } else {
                    f.edge.held.extend_from_slice(data);
                    proxy_protocol::detect(&f.edge.held)
                };
                match detected {
                    Detect::NeedMore => {
                        if fresh {
                            f.edge.held.extend_from_slice(data);
                        }
                        None
                    }
                    Detect::NotProxy => {
                        f.edge.wait = Wait::Nothing;
                        Some(if fresh {
                            Cow::Borrowed(data)
                        } else {
                            Cow::Owned(std::mem::take(&mut f.edge.held))
                        })
                    }
                    Detect::Header(_) => {
                        self.refuse_header(
                            ctx,
                            Cause::ProxyHeaderUntrusted,
                            "from an untrusted address",
                            now,
                        );
                        None
                    }
                }
            }
            Wait::ProxyHeader { required } => {
                let room = proxy_protocol::MAX_HEADER_BYTES.saturating_sub(f.edge.held.len());
                f.edge.held.extend_from_slice(data);
                match proxy_protocol::parse(&f.edge.held) {
                    Ok(None) if room > 0 => None,
                    Ok(None) => {
                        self.refuse_header(ctx, Cause::ProxyHeaderInvalid, "too long", now);
                        None
                    }
                    Ok(Some((header, consumed))) => {
                        f.edge.wait = Wait::Nothing;
                        let rest = f.edge.held.split_off(consumed);
                        f.edge.held = Vec::new();
                        self.proxy_header_read(ctx, header.source, now)
                            .then_some(Cow::Owned(rest))
                    }
                    Err(proxy_protocol::ProxyError::Missing) if !required => {
                        f.edge.wait = Wait::Nothing;
                        let held = std::mem::take(&mut f.edge.held);
                        self.proxy_header_read(ctx, None, now)
                            .then_some(Cow::Owned(held))
                    }
                    Err(e) => {
                        let cause = match e {
                            proxy_protocol::ProxyError::Missing => Cause::ProxyHeaderMissing,
                            _ => Cause::ProxyHeaderInvalid,
                        };
                        self.refuse_header(ctx, cause, &e.to_string(), now);
                        None
                    }
                }
            }
        }
    }

    /// A trusted proxy's header named `source` (None: it named no client,
    /// or sent no header where one is optional). The client is known
    /// unless `X-Forwarded-For` is still to say; true when the
    /// connection goes on.
    fn proxy_header_read(
        &mut self,
        ctx: &mut WorkerCtx,
        source: Option<SocketAddr>,
        now: Instant,
    ) -> bool {
        if let Some(client) = source {
            tracing::debug!(session = self.id, proxy = ?self.peer, %client, "client address from a PROXY header");
            self.peer = Some(client);
        } else if ctx
            .clients
            .as_ref()
            .is_some_and(|g| g.shared.policy.forwarded_for)
        {
            if let Stage::Front(f) = &mut self.stage {
                f.edge.forwarded = true;
            }
            return true;
        }
        match self.peer.map(|p| p.ip()) {
            Some(ip) => self.client_known(ctx, ip, now),
            None => true,
        }
    }

    /// The upgrade request is read: a trusted proxy's `X-Forwarded-For`
    /// names the client now, and its limits are checked. False when the
    /// connection was refused (answered already).
    pub(super) fn edge_upgrade(&mut self, ctx: &mut WorkerCtx, up: &Upgrade, now: Instant) -> bool {
        let (Stage::Front(f), Some(gate)) = (&mut self.stage, ctx.clients.as_ref()) else {
            return true;
        };
        if !std::mem::take(&mut f.edge.forwarded) {
            return true;
        }
        let trusted = &gate.shared.policy.trusted_proxies;
        let forwarded = up
            .forwarded_for
            .as_deref()
            .and_then(|h| client_limits::forwarded_client(trusted, h));
        if let Some(ip) = forwarded {
            tracing::debug!(session = self.id, proxy = ?self.peer, client = %ip, "client address from X-Forwarded-For");
            self.peer = Some(SocketAddr::new(ip, 0));
        }
        match self.peer.map(|p| p.ip()) {
            Some(ip) => self.client_known(ctx, ip, now),
            None => true,
        }
    }

    /// The client is `ip`: its rate and its count in the handshake. False
    /// when refused (answered already).
    fn client_known(&mut self, ctx: &mut WorkerCtx, ip: IpAddr, now: Instant) -> bool {
        let (Stage::Front(f), Some(gate)) = (&mut self.stage, ctx.clients.as_ref()) else {
            return true;
        };
        match gate.enter_ip(&mut f.edge.pass, ip, now) {
            Ok(true) => true,
            Ok(false) => {
                ctx.metrics.count(Cause::ClientTableFull);
                true
            }
            Err(r) => {
                self.refuse_limited(ctx, r, now);
                false
            }
        }
    }

    /// Over a per-client limit: 429 with Retry-After and the JSON error
    /// body (on a TLS port, where no plaintext answer can be read, the
    /// connection is just closed), counted and logged (throttled).
    fn refuse_limited(&mut self, ctx: &mut WorkerCtx, r: Refusal, now: Instant) {
        ctx.metrics.count(r.cause);
        self.log_refusal(ctx, r.cause.kind(), now);
        if ctx.tls.is_some() {
            self.finish(ctx, now);
            return;
        }
        let retry = r.retry_after_s.to_string();
        let message = format!("too many connections from this address; retry in {retry} s");
        let mut resp = Vec::with_capacity(256);
        http_upgrade::write_error_response(
            &mut resp,
            429,
            r.cause.kind(),
            &message,
            &[("Retry-After", &retry)],
        );
        self.browser.push(ctx, &[&resp]);
        self.stage = Stage::Responding(Responding { body: None });
        self.deadline = Some(now + ms(ctx.cfg.limits.close_timeout_ms));
        self.close = Some(CloseInfo {
            code: None,
            reason: format!("HTTP 429 {}", r.cause.kind()),
        });
    }

    /// A PROXY header where none may come, none where one must, or a bad
    /// one: closed without an answer (the peer is not speaking HTTP to
    /// us), counted and logged.
    fn refuse_header(&mut self, ctx: &mut WorkerCtx, cause: Cause, why: &str, now: Instant) {
        ctx.metrics.count(cause);
        self.log_refusal(ctx, cause.kind(), now);
        tracing::debug!(session = self.id, peer = ?self.peer, cause = cause.kind(), why, "PROXY header refused");
        self.finish(ctx, now);
    }

    fn log_refusal(&self, ctx: &mut WorkerCtx, cause: &str, now: Instant) {
        let Some(suppressed) = ctx.clients.as_mut().and_then(|g| g.may_log(now)) else {
            return;
        };
        tracing::info!(
            session = self.id,
            worker = ctx.worker_id,
            client = ?self.peer,
            cause,
            suppressed,
            "connection refused at the edge"
        );
    }
}
