//! What a worker lends its sessions: config, buffer pool, router, metrics,
//! the report queue to the control plane, scratch space, and the gauge of
//! connections still in their handshake (shared by all workers).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::Session;
use crate::cause::Cause;
use crate::config::ProxyConfig;
use crate::dataplane::buffer::BufPool;
use crate::dataplane::router::Router;
use crate::dataplane::web::WebRoot;
use crate::mailbox::{self, Admission, FromWorker};
use crate::metrics::WorkerMetrics;
use crate::protocol::websocket;

/// Connections still in their handshake across all workers, bounded by
/// `max_handshaking_connections` (a slowloris guard that needs no lock: one
/// atomic add per connection, one subtract when its handshake ends).
#[derive(Debug)]
pub struct HandshakeGauge {
    count: AtomicUsize,
    max: usize,
}

/// One connection's place in the [`HandshakeGauge`], given back on drop.
#[derive(Debug)]
pub struct HandshakeSlot(Arc<HandshakeGauge>);

impl HandshakeGauge {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            count: AtomicUsize::new(0),
            max,
        })
    }

    /// A place for one more connection, or None when all are taken.
    pub fn try_enter(self: &Arc<Self>) -> Option<HandshakeSlot> {
        let before = self.count.fetch_add(1, Ordering::AcqRel);
        if before >= self.max {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(HandshakeSlot(self.clone()))
    }

    pub fn current(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a worker lends its sessions: config, pool, router, metrics, scratch.
pub struct WorkerCtx {
    pub cfg: Arc<ProxyConfig>,
    pub worker_id: usize,
    pub pool: BufPool,
    pub router: Router,
    pub web: Option<Arc<WebRoot>>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub metrics: WorkerMetrics,
    /// Reports to the control plane (appliance mode).
    pub events: Option<mailbox::Sender<FromWorker>>,
    /// Hands new connections to less-loaded workers (more than one worker).
    pub balance: Option<crate::dataplane::balance::Balancer>,
    /// Ids of dedicated-port sessions that ended in this turn: the IO layer
    /// closes their listeners at once (the port is free for the next one).
    pub ended_bound: Vec<u64>,
    /// Connections in their handshake, shared by all workers.
    pub handshakes: Arc<HandshakeGauge>,
    /// This worker's connections parked on a console request (bounded by
    /// `max_parked_console_requests_per_worker`).
    pub parked_consoles: Arc<HandshakeGauge>,
    /// Per-client-IP limits and the client address behind a proxy
    /// (appliance mode; `dataplane::client_limits`).
    pub clients: Option<crate::dataplane::client_limits::ClientGate>,
    /// Frame assembly for base64 and payload decoded for our own use (the
    /// RFB handshake, discarded bytes while closing).
    pub(super) scratch: Vec<u8>,
    /// Plaintext out of TLS records, the browser's or a WebMKS backend's
    /// (apart from `scratch`, which handling that plaintext may need).
    pub(super) tls_plain: Vec<u8>,
    /// Browser payload decoded for the appliance's own use (its RFB
    /// handshake, bytes dropped while closing): apart from `scratch`, which
    /// framing our answers needs at the same time.
    pub(super) decoded: Vec<u8>,
    /// One outgoing frame assembled for rustls (wss only).
    pub(super) tls_frame: Vec<u8>,
}

impl WorkerCtx {
    pub fn new(
        cfg: Arc<ProxyConfig>,
        worker_id: usize,
        router: Router,
        web: Option<Arc<WebRoot>>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let l = &cfg.limits;
        let chunk = Self::chunk_bytes_for(l.recv_buffer_bytes);
        let pool = BufPool::new(chunk, l.pool_max_free_buffers);
        let handshakes = HandshakeGauge::new(l.max_handshaking_connections);
        let parked_consoles = HandshakeGauge::new(l.max_parked_console_requests_per_worker);
        Self {
            cfg,
            worker_id,
            pool,
            router,
            web,
            tls,
            metrics: WorkerMetrics::default(),
            events: None,
            balance: None,
            ended_bound: Vec::new(),
            handshakes,
            parked_consoles,
            clients: None,
            scratch: vec![0u8; chunk],
            tls_plain: vec![0u8; chunk],
            decoded: vec![0u8; chunk],
            tls_frame: Vec::new(),
        }
    }

    /// A chunk holds one whole downstream frame: the largest read plus the
    /// largest header, base64-expanded in the worst case.
    pub fn chunk_bytes_for(recv_buffer_bytes: usize) -> usize {
        (recv_buffer_bytes / 3 + 1) * 4 + websocket::MAX_SERVER_HEADER_LEN
    }

    /// A session for a connection just accepted (or adopted), unless this
    /// worker holds `max_sessions_per_worker` (`live`) or the workers hold
    /// `max_handshaking_connections` connections in their handshake: then
    /// None, counted and logged, and the caller closes the socket.
    pub fn new_session(
        &mut self,
        live: usize,
        id: u64,
        now: Instant,
        peer: Option<SocketAddr>,
        bound: Option<Arc<Admission>>,
    ) -> Option<Session> {
        if live >= self.cfg.limits.max_sessions_per_worker {
            self.metrics.refused_over_limit += 1;
            self.metrics.count(Cause::OverSessionLimit);
            tracing::warn!(
                worker = self.worker_id,
                ?peer,
                "session limit reached, connection refused"
            );
            return None;
        }
        let Some(slot) = self.handshakes.try_enter() else {
            self.metrics.refused_over_limit += 1;
            self.metrics.count(Cause::HandshakingOverLimit);
            tracing::debug!(
                worker = self.worker_id,
                ?peer,
                "too many connections in their handshake, refused"
            );
            return None;
        };
        let mut session = Session::with_slot(id, self, now, peer, bound, Some(slot));
        session.edge_start(self, now);
        Some(session)
    }

    /// Report to the control plane without blocking; a full mailbox drops
    /// the report and counts it.
    pub fn report(&mut self, msg: FromWorker) {
        if let Some(tx) = &self.events {
            if tx.send(msg).is_err() {
                self.metrics.count(Cause::EventsDropped);
            }
        }
    }
}
