//! The relay session state machine: one browser connection from accept to
//! close, sans-IO.
//!
//! The IO backends (epoll, io_uring) move bytes and report events; this
//! type decides everything else: TLS (rustls as a state machine), the HTTP
//! upgrade, routing, WebSocket framing both ways, backpressure, timeouts and
//! close codes. It never touches a socket, a clock (time is passed in) or a
//! runtime, and nothing a client sends makes it panic.
//!
//! Backpressure contract with the IO layer: read from the browser only while
//! [`Session::want_browser_read`] holds and at most
//! [`Session::browser_read_limit`] bytes; likewise for the backend. Every
//! byte handed in is consumed, so the bound on buffered bytes is
//! `buffer_bytes` plus what one read can bring.
//!
//! Lifecycle: `Sniff` (TLS or plain?) → `Handshake` (HTTP upgrade) →
//! `Connecting` (101 sent, backend connect under way) → `Relay` →
//! `Closing` (close frame sent, waiting for the browser's) → `Done`.
//! Requests that end in an HTTP response (errors, static files) go
//! `Handshake` → `Responding` → `Done`.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::cause::Cause;
use crate::config::ProxyConfig;
use crate::dataplane::buffer::{BufPool, ByteQueue, Lent};
use crate::dataplane::router::{ConnInfo, Router};
use crate::dataplane::web::WebRoot;
use crate::mailbox::{self, Admission, FromWorker};
use crate::metrics::WorkerMetrics;
use crate::protocol::http_upgrade::{self, Request, RequestLimits};
use crate::protocol::rfb::{self, RfbError, RfbLimits};
use crate::protocol::websocket::{
    self, close_code, Decoder, DecoderLimits, Event, Opcode, PayloadMode,
};

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
    /// Plaintext out of rustls, and frame assembly for TLS and base64.
    scratch: Vec<u8>,
    /// One outgoing frame assembled for rustls (wss only).
    tls_frame: Vec<u8>,
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
        // A chunk holds one whole downstream frame: the largest read plus
        // the largest header, base64-expanded in the worst case.
        let chunk = (l.recv_buffer_bytes / 3 + 1) * 4 + websocket::MAX_SERVER_HEADER_LEN;
        let pool = BufPool::new(chunk, l.pool_max_free_buffers);
        let scratch = vec![0u8; chunk];
        let handshakes = HandshakeGauge::new(l.max_handshaking_connections);
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
            scratch,
            tls_frame: Vec::new(),
        }
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
        let mut s = Session::new(id, self, now, peer, bound);
        s.handshake_slot = Some(slot);
        Some(s)
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    None,
    Connecting,
    Open,
    Closed,
}

/// Why a session ended, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// WebSocket close code sent (or echoed); None when the session ended
    /// without one (HTTP response, browser vanished).
    pub code: Option<u16>,
    pub reason: String,
}

pub struct Session {
    pub id: u64,
    phase: Phase,
    tls: Option<Box<rustls::ServerConnection>>,
    req: Vec<u8>,
    decoder: Option<Decoder>,
    mode: PayloadMode,
    to_browser: ByteQueue,
    to_backend: ByteQueue,
    backend: Backend,
    connect_to: Option<SocketAddr>,
    target: Option<SocketAddr>,
    started: Instant,
    deadline: Option<Instant>,
    last_activity: Instant,
    next_ping: Option<Instant>,
    /// The browser's close frame arrived (or will never come): once our
    /// output is flushed the session is done.
    close_received: bool,
    close: Option<CloseInfo>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    peer: Option<SocketAddr>,
    /// The admission of the dedicated listener this connection came from.
    bound: Option<Arc<Admission>>,
    /// The appliance session this connection is (after routing).
    admission: Option<Arc<Admission>>,
    /// The RFB security handshake the appliance performs itself when the
    /// target has a VNC password (the browser is offered security None).
    rfb: Option<Box<rfb::Handshake>>,
    /// Bytes at the front of each queue that an io_uring send holds; they
    /// must stay put until it completes (always 0 on epoll).
    browser_inflight: usize,
    backend_inflight: usize,
    /// Since when relayed bytes wait for the browser / the backend socket
    /// (for the relay latency histograms).
    down_since: Option<Instant>,
    up_since: Option<Instant>,
    /// A spliced frame under way (epoll): its payload waits in the IO
    /// layer's pipe, not in `to_browser`.
    splice: Option<SpliceOut>,
    /// The last backend read brought at least `splice_min_bytes`: bulk
    /// transfer, so the IO layer may try a splice next.
    splice_hint: bool,
    /// Payload bytes that went through a pipe (for the close log line).
    pub bytes_spliced: u64,
    /// The pool chunk an io_uring bulk receive is filling (see
    /// [`Session::backend_bulk_buf`]): outside `to_browser`, so frames
    /// queued meanwhile (pongs, pings, the close frame) never land in the
    /// bytes the kernel writes, and never inside the frame.
    bulk_in: Option<Lent>,
    /// The last bulk receive was short: one more ends bulk mode.
    bulk_short: bool,
    /// Payload bytes received straight into frame chunks by bulk receives
    /// (for the close log line).
    pub bytes_bulk_recv: u64,
    /// This connection's place among those in their handshake; dropped as
    /// soon as it leaves the handshake (see [`Session::set_phase`]).
    handshake_slot: Option<HandshakeSlot>,
    /// A static file being sent (`Responding`), streamed as the browser
    /// takes it so at most `buffer_bytes` of it is ever queued.
    web_body: Option<crate::dataplane::web::WebBody>,
}

/// One downstream frame whose payload the IO layer spliced into a pipe:
/// the first `before` bytes of `to_browser` (the rest of its header) go to
/// the browser first, then the `in_pipe` bytes from the pipe, then whatever
/// was queued after the header (pings, pongs, the close frame): nothing can
/// land inside the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SpliceOut {
    before: usize,
    in_pipe: usize,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// How long a static-file response may go without the browser taking a
/// byte before the connection is dropped (renewed on every write).
fn web_response_grace(ctx: &WorkerCtx) -> Duration {
    ms(ctx.cfg.limits.close_timeout_ms.max(5_000))
}

/// `io::Write` into a ByteQueue (rustls writes its records through it).
struct QueueWriter<'a> {
    q: &'a mut ByteQueue,
    pool: &'a mut BufPool,
}

impl Write for QueueWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.q.push(self.pool, buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Session {
    pub fn new(
        id: u64,
        ctx: &WorkerCtx,
        now: Instant,
        peer: Option<SocketAddr>,
        bound: Option<Arc<Admission>>,
    ) -> Self {
        let l = &ctx.cfg.limits;
        let phase = if ctx.tls.is_some() {
            Phase::Sniff
        } else {
            Phase::Handshake
        };
        Self {
            id,
            phase,
            tls: None,
            req: Vec::new(),
            decoder: None,
            mode: PayloadMode::Raw,
            to_browser: ByteQueue::new(),
            to_backend: ByteQueue::new(),
            backend: Backend::None,
            connect_to: None,
            target: None,
            started: now,
            deadline: Some(now + ms(l.handshake_timeout_ms)),
            last_activity: now,
            next_ping: None,
            close_received: false,
            close: None,
            bytes_up: 0,
            bytes_down: 0,
            browser_inflight: 0,
            backend_inflight: 0,
            down_since: None,
            up_since: None,
            splice: None,
            splice_hint: false,
            bytes_spliced: 0,
            bulk_in: None,
            bulk_short: false,
            bytes_bulk_recv: 0,
            handshake_slot: None,
            web_body: None,
            peer,
            bound,
            admission: None,
            rfb: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Every phase change goes through here: leaving the handshake gives
    /// the connection's handshake slot back.
    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
        if !matches!(phase, Phase::Sniff | Phase::Handshake) {
            self.handshake_slot = None;
        }
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    pub fn close_info(&self) -> Option<&CloseInfo> {
        self.close.as_ref()
    }

    pub fn target(&self) -> Option<SocketAddr> {
        self.target
    }

    // ---- what the IO layer asks -------------------------------------------

    /// Read from the browser now?
    pub fn want_browser_read(&self, ctx: &WorkerCtx) -> bool {
        match self.phase {
            Phase::Sniff | Phase::Handshake | Phase::Closing => true,
            Phase::Connecting | Phase::Relay => {
                self.to_backend.len() < ctx.cfg.limits.buffer_bytes
                    && self.down_queued() < ctx.cfg.limits.buffer_bytes
            }
            Phase::Responding | Phase::Done => false,
        }
    }

    /// Most bytes to read from the browser in one go.
    pub fn browser_read_limit(&self, ctx: &WorkerCtx) -> usize {
        let l = &ctx.cfg.limits;
        match self.phase {
            Phase::Sniff | Phase::Handshake | Phase::Closing => l.recv_buffer_bytes,
            _ => l
                .buffer_bytes
                .saturating_sub(self.to_backend.len())
                .clamp(1, l.recv_buffer_bytes),
        }
    }

    /// Read from the backend now? Never while a spliced frame's payload
    /// waits in the pipe: the pipe is the downstream buffer then, and a full
    /// browser socket must stop the backend (backpressure).
    pub fn want_backend_read(&self, ctx: &WorkerCtx) -> bool {
        self.phase == Phase::Relay
            && self.backend == Backend::Open
            && self.splice.is_none()
            && self.to_browser.len() < ctx.cfg.limits.buffer_bytes
    }

    /// Bytes waiting for the browser: queued, plus a spliced frame's
    /// payload still in the pipe.
    fn down_queued(&self) -> usize {
        self.to_browser.len() + self.splice.map_or(0, |s| s.in_pipe)
    }

    /// Most bytes to read from the backend in one go (one frame's payload).
    pub fn backend_read_limit(&self, ctx: &WorkerCtx) -> usize {
        let l = &ctx.cfg.limits;
        let room = l.buffer_bytes.saturating_sub(self.to_browser.len());
        let room = match self.mode {
            PayloadMode::Raw => room,
            PayloadMode::Base64 => room / 4 * 3,
        };
        room.clamp(1, l.recv_buffer_bytes)
    }

    /// The backend connection to open, once.
    pub fn take_connect(&mut self) -> Option<SocketAddr> {
        self.connect_to.take()
    }

    /// The backend socket should be closed now (the session is ending).
    pub fn backend_should_close(&self) -> bool {
        matches!(self.backend, Backend::Connecting | Backend::Open)
            && matches!(self.phase, Phase::Closing | Phase::Responding | Phase::Done)
    }

    /// The IO layer closed the backend socket.
    pub fn backend_closed(&mut self) {
        self.backend = Backend::Closed;
    }

    /// Bytes to write to the browser (the first contiguous run). While a
    /// spliced frame is under way, only its header's bytes (then nothing
    /// until [`Session::splice_out_ready`] is 0).
    pub fn browser_pending(&self) -> &[u8] {
        let f = self.to_browser.front();
        match self.splice {
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
        if self.backend == Backend::Open {
            self.to_backend.front()
        } else {
            &[]
        }
    }

    /// An asynchronous send of the first `n` pending browser bytes started
    /// (io_uring): they stay in place until [`Session::browser_sent`].
    pub fn browser_send_started(&mut self, n: usize) {
        self.browser_inflight = n;
    }

    /// Same as [`Session::browser_send_started`] for the backend.
    pub fn backend_send_started(&mut self, n: usize) {
        self.backend_inflight = n;
    }

    /// `n` bytes of [`Session::browser_pending`] were written.
    pub fn browser_sent(&mut self, ctx: &mut WorkerCtx, n: usize, now: Instant) {
        self.browser_inflight = 0;
        self.to_browser.consume(&mut ctx.pool, n);
        if let Some(sp) = self.splice.as_mut() {
            sp.before = sp.before.saturating_sub(n);
        }
        self.note_down_drained(ctx, now);
        if self.web_body.is_some() && n > 0 {
            self.deadline = Some(now + web_response_grace(ctx));
            self.stream_web_body(ctx, now);
        }
        self.advance(ctx, now);
    }

    /// Queue more of a static file while less than `buffer_bytes` waits
    /// for the browser; a read error ends the response (the connection
    /// closes short of its Content-Length, which the browser notices).
    fn stream_web_body(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        let limit = ctx.cfg.limits.buffer_bytes;
        while self.to_browser.len() < limit {
            let Some(body) = self.web_body.as_mut() else {
                return;
            };
            let mut scratch = std::mem::take(&mut ctx.scratch);
            let room = (limit - self.to_browser.len()).min(scratch.len());
            let r = body.read_chunk(&mut scratch[..room]);
            match r {
                Ok(0) => {
                    ctx.scratch = scratch;
                    self.web_body = None;
                }
                Ok(n) => {
                    self.push_browser(ctx, &[&scratch[..n]]);
                    ctx.scratch = scratch;
                }
                Err(e) => {
                    ctx.scratch = scratch;
                    ctx.metrics.count(Cause::WebRead);
                    tracing::warn!(session = self.id, error = %e, "static file read failed");
                    self.web_body = None;
                    self.finish(ctx, now);
                    return;
                }
            }
        }
    }

    /// Downstream fully written: record how long its bytes waited.
    fn note_down_drained(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        if self.down_queued() == 0 {
            if let Some(t) = self.down_since.take() {
                ctx.metrics
                    .relay_down_us
                    .record(now.saturating_duration_since(t).as_micros() as u64);
            }
        }
    }

    /// `n` bytes of [`Session::backend_pending`] were written.
    pub fn backend_sent(&mut self, ctx: &mut WorkerCtx, n: usize, now: Instant) {
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

    /// Return every buffer to the pool; call before dropping a done session,
    /// once no send is in flight.
    pub fn release(&mut self, ctx: &mut WorkerCtx) {
        self.browser_inflight = 0;
        self.backend_inflight = 0;
        self.to_browser.clear(&mut ctx.pool);
        self.to_backend.clear(&mut ctx.pool);
        self.req = Vec::new();
        self.splice = None;
        // Only reached once no receive is in flight (the IO layer's rule).
        if let Some(lent) = self.bulk_in.take() {
            ctx.pool.give_back(lent);
        }
    }

    /// The earliest instant at which [`Session::on_tick`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.deadline, self.next_ping) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---- events from the IO layer -----------------------------------------

    /// Bytes arrived from the browser (raw: TLS records when TLS is on).
    pub fn on_browser_data(&mut self, ctx: &mut WorkerCtx, data: &[u8], now: Instant) {
        if data.is_empty() || self.phase == Phase::Done {
            return;
        }
        self.last_activity = now;
        if self.phase == Phase::Sniff {
            self.sniff(ctx, data[0], now);
            if self.phase == Phase::Done {
                return;
            }
        }
        if self.tls.is_some() {
            self.tls_input(ctx, data, now);
            self.flush_tls(ctx);
        } else {
            self.plain_input(ctx, data, now);
        }
        self.advance(ctx, now);
    }

    /// The browser closed its side (EOF) or the socket failed.
    pub fn on_browser_gone(
        &mut self,
        ctx: &mut WorkerCtx,
        error: Option<&io::Error>,
        now: Instant,
    ) {
        if self.phase == Phase::Done {
            return;
        }
        match error {
            Some(e) => {
                ctx.metrics.count(Cause::BrowserIo);
                tracing::debug!(session = self.id, error = %e, "browser connection failed");
            }
            None => {
                if matches!(self.phase, Phase::Connecting | Phase::Relay) {
                    ctx.metrics.count(Cause::BrowserEofWithoutClose);
                }
            }
        }
        if self.close.is_none() {
            self.close = Some(CloseInfo {
                code: None,
                reason: "browser went away".into(),
            });
        }
        self.to_browser
            .truncate_to(&mut ctx.pool, self.browser_inflight);
        // The IO layer drops a pipe that still holds bytes with the session.
        self.splice = None;
        self.finish(ctx, now);
    }

    /// The backend TCP connect completed.
    pub fn on_backend_connected(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        if self.backend != Backend::Connecting {
            return;
        }
        self.backend = Backend::Open;
        if self.phase == Phase::Connecting {
            self.set_phase(Phase::Relay);
            // The VNC security handshake must finish in time too.
            self.deadline = self
                .rfb
                .as_ref()
                .map(|_| now + ms(ctx.cfg.limits.handshake_timeout_ms));
            self.last_activity = now;
            let hb = ctx.cfg.limits.heartbeat_ms;
            if hb > 0 {
                self.next_ping = Some(now + ms(hb));
            }
            tracing::debug!(session = self.id, backend = ?self.target, "backend connected");
        }
    }

    /// The backend connect failed.
    pub fn on_backend_connect_failed(
        &mut self,
        ctx: &mut WorkerCtx,
        err: &io::Error,
        now: Instant,
    ) {
        self.backend = Backend::Closed;
        ctx.metrics.count(Cause::BackendConnectFailed);
        tracing::warn!(session = self.id, backend = ?self.target, error = %err, "backend connect failed");
        self.start_close(
            ctx,
            close_code::INTERNAL_ERROR,
            "backend connect failed",
            now,
        );
    }

    /// Bytes arrived from the backend.
    pub fn on_backend_data(&mut self, ctx: &mut WorkerCtx, data: &[u8], now: Instant) {
        if data.is_empty() || !matches!(self.phase, Phase::Relay) {
            return;
        }
        self.last_activity = now;
        self.note_backend_read(ctx, data.len());
        let data = match self.rfb.as_mut() {
            None => data,
            Some(h) => {
                let r = h.on_backend(data);
                let n = self.rfb_flush(ctx, r, now);
                match n {
                    Some(n) if n < data.len() && self.phase == Phase::Relay => &data[n..],
                    _ => return,
                }
            }
        };
        self.down_since.get_or_insert(now);
        self.relay_down(ctx, data);
    }

    /// io_uring multishot: backend bytes whose size is set by provided
    /// buffer boundaries as much as by the stream (measured: 64 KiB writes
    /// arrive as 779 + 64757 bytes, the second filling the buffer), relayed
    /// like any; but in bulk mode one short read alone does not end it
    /// (two in a row do, as for bulk receives), or a batch of completions
    /// that ends on a fragment would never switch to bulk receives.
    pub fn on_backend_data_fragment(&mut self, ctx: &mut WorkerCtx, data: &[u8], now: Instant) {
        let (hint, short_before) = (self.splice_hint, self.bulk_short);
        self.on_backend_data(ctx, data, now);
        let short = data.len() < ctx.cfg.limits.splice_min_bytes;
        if short && hint && !short_before && self.phase == Phase::Relay {
            self.splice_hint = true;
            self.bulk_short = true;
        }
    }

    /// Remember whether a plain backend read of `n` bytes was bulk.
    fn note_backend_read(&mut self, ctx: &WorkerCtx, n: usize) {
        let min = ctx.cfg.limits.splice_min_bytes;
        self.splice_hint = min > 0 && n >= min;
        self.bulk_short = false;
    }

    /// Splicing (epoll): how many backend bytes may be moved into a pipe
    /// now, or None when this session must take the copying path. Only a
    /// plain-ws binary session in its relay phase (no TLS, no base64, no
    /// RFB handshake of our own), with nothing queued for the browser (the
    /// frame header goes first, then the pipe), wanting backend bytes, whose
    /// last backend read was bulk. Follow with [`Session::splice_in_done`].
    pub fn splice_in_limit(&self, ctx: &WorkerCtx) -> Option<usize> {
        let l = &ctx.cfg.limits;
        if !self.bulk_downstream(ctx) || !self.to_browser.is_empty() {
            return None;
        }
        Some(l.buffer_bytes.min(l.splice_pipe_bytes).max(1))
    }

    /// Backend bytes go to the browser as is, in binary frames: plain ws
    /// (no TLS), binary or no subprotocol (not base64), no RFB handshake of
    /// our own under way.
    fn raw_frames(&self) -> bool {
        self.tls.is_none() && self.rfb.is_none() && self.mode == PayloadMode::Raw
    }

    /// Bulk downstream: a raw-frames session wanting backend bytes whose
    /// last backend read brought at least `splice_min_bytes` (the splice
    /// hint; 0 turns it off).
    fn bulk_downstream(&self, ctx: &WorkerCtx) -> bool {
        self.splice_hint
            && ctx.cfg.limits.splice_min_bytes > 0
            && self.raw_frames()
            && self.want_backend_read(ctx)
    }

    /// io_uring: may the next backend read be a bulk receive straight into
    /// a frame chunk ([`Session::backend_bulk_buf`])? The splicing
    /// conditions, except that frames may be queued (the chunk is queued
    /// after them), and no bulk receive is under way already.
    pub fn bulk_recv_wanted(&self, ctx: &WorkerCtx) -> bool {
        self.bulk_in.is_none() && self.bulk_downstream(ctx)
    }

    /// io_uring bulk receive: lend a pool chunk, kept by the session until
    /// [`Session::backend_bulk_done`], and return the room after its header
    /// space, at most one read's worth (`backend_read_limit`, so the
    /// `buffer_bytes` bound holds). The bytes stay put while lent, so the
    /// kernel may write them asynchronously. None unless
    /// [`Session::bulk_recv_wanted`].
    pub fn backend_bulk_buf(&mut self, ctx: &mut WorkerCtx) -> Option<&mut [u8]> {
        if !self.bulk_recv_wanted(ctx) {
            return None;
        }
        let limit = self.backend_read_limit(ctx);
        let lent = ctx.pool.lend(websocket::MAX_SERVER_HEADER_LEN)?;
        let room = self.bulk_in.insert(lent).room();
        let n = room.len().min(limit);
        Some(&mut room[..n])
    }

    /// The bulk receive into [`Session::backend_bulk_buf`] completed with
    /// `n` bytes: queue them as one binary frame after whatever is queued
    /// (the header goes into the chunk's headroom, the payload does not
    /// move), and count them. `n == 0` (nothing came: no data yet, EOF,
    /// error, teardown) returns the chunk and leaves the hint alone. Two
    /// short reads in a row (under `splice_min_bytes`) end bulk mode: one
    /// alone is often the first segment of a bulk write that woke the
    /// poll, and leaving bulk mode costs a multishot episode (measured:
    /// ~12 copied 64 KiB reads before its cancel lands). Bytes arriving
    /// after the relay ended are dropped, as
    /// [`Session::on_backend_data`] does.
    pub fn backend_bulk_done(&mut self, ctx: &mut WorkerCtx, n: usize, now: Instant) {
        let Some(lent) = self.bulk_in.take() else {
            return;
        };
        if n == 0 || self.phase != Phase::Relay {
            ctx.pool.give_back(lent);
            return;
        }
        let mut hdr = [0u8; websocket::MAX_SERVER_HEADER_LEN];
        let hl = websocket::write_server_header(&mut hdr, true, Opcode::Binary, n as u64);
        self.to_browser
            .append_with_header(&mut ctx.pool, lent, &hdr[..hl], n);
        let short = n < ctx.cfg.limits.splice_min_bytes;
        if !short || self.bulk_short {
            self.note_backend_read(ctx, n);
        }
        self.bulk_short = short;
        self.last_activity = now;
        self.down_since.get_or_insert(now);
        self.bytes_down += n as u64;
        self.bytes_bulk_recv += n as u64;
        ctx.metrics.bytes_backend_to_browser += n as u64;
    }

    /// `n` backend bytes now wait in the pipe: queue the header of a binary
    /// frame of exactly `n` bytes (server frames are unmasked); the pipe's
    /// bytes follow it. A splice that brought less than `splice_min_bytes`
    /// sends the session back to plain reads.
    pub fn splice_in_done(&mut self, ctx: &mut WorkerCtx, n: usize, now: Instant) {
        let min = ctx.cfg.limits.splice_min_bytes;
        self.splice_hint = min > 0 && n >= min;
        // One spliced frame at a time: `splice_in_limit` says None while one
        // is under way, so the IO layer never splices a second one in.
        debug_assert!(self.splice.is_none(), "a second spliced frame");
        if n == 0 || self.splice.is_some() {
            return;
        }
        let mut hdr = [0u8; websocket::MAX_SERVER_HEADER_LEN];
        let hl = websocket::write_server_header(&mut hdr, true, Opcode::Binary, n as u64);
        self.to_browser.push(&mut ctx.pool, &hdr[..hl]);
        // Whatever was queued before goes first too (nothing, when the IO
        // layer asked `splice_in_limit`).
        self.splice = Some(SpliceOut {
            before: self.to_browser.len(),
            in_pipe: n,
        });
        self.last_activity = now;
        self.down_since.get_or_insert(now);
        self.bytes_down += n as u64;
        self.bytes_spliced += n as u64;
        ctx.metrics.bytes_backend_to_browser += n as u64;
    }

    /// Pipe bytes that may be spliced to the browser now: the spliced
    /// frame's payload once its header is out, else 0.
    pub fn splice_out_ready(&self) -> usize {
        match self.splice {
            Some(sp) if sp.before == 0 => sp.in_pipe,
            _ => 0,
        }
    }

    /// Bytes of a spliced frame still in the pipe (0: the pipe is empty and
    /// may go back to the worker's pool).
    pub fn pipe_bytes(&self) -> usize {
        self.splice.map_or(0, |s| s.in_pipe)
    }

    /// `n` pipe bytes went to the browser.
    pub fn splice_out_done(&mut self, ctx: &mut WorkerCtx, n: usize, now: Instant) {
        let Some(sp) = self.splice.as_mut() else {
            return;
        };
        sp.in_pipe = sp.in_pipe.saturating_sub(n);
        if sp.in_pipe == 0 {
            self.splice = None;
        }
        self.note_down_drained(ctx, now);
        self.advance(ctx, now);
    }

    /// Zero-copy downstream: when nothing is queued for the browser and the
    /// payload goes out as is (plain ws, binary, relaying), the IO layer may
    /// read backend bytes straight into a frame chunk, behind room for the
    /// header. Follow with [`Session::backend_frame_done`].
    pub fn backend_frame_buf(&mut self, ctx: &mut WorkerCtx) -> Option<&mut [u8]> {
        if !self.raw_frames() || !self.want_backend_read(ctx) {
            return None;
        }
        let limit = self.backend_read_limit(ctx);
        self.to_browser
            .fresh_with_headroom(&mut ctx.pool, websocket::MAX_SERVER_HEADER_LEN)
            .map(move |b| {
                let n = b.len().min(limit);
                &mut b[..n]
            })
    }

    /// `n` backend bytes were read into [`Session::backend_frame_buf`].
    pub fn backend_frame_done(&mut self, ctx: &mut WorkerCtx, n: usize, now: Instant) {
        let mut hdr = [0u8; websocket::MAX_SERVER_HEADER_LEN];
        let hl = websocket::write_server_header(&mut hdr, true, Opcode::Binary, n as u64);
        self.to_browser
            .commit_with_header(&mut ctx.pool, &hdr[..hl], n);
        if n > 0 {
            self.note_backend_read(ctx, n);
            self.last_activity = now;
            self.down_since.get_or_insert(now);
            self.bytes_down += n as u64;
            ctx.metrics.bytes_backend_to_browser += n as u64;
        }
    }

    /// Relayed backend bytes: counted, then framed for the browser.
    fn relay_down(&mut self, ctx: &mut WorkerCtx, data: &[u8]) {
        self.bytes_down += data.len() as u64;
        ctx.metrics.bytes_backend_to_browser += data.len() as u64;
        self.frame_down(ctx, data);
    }

    /// Frame bytes for the browser (binary, or base64 text), uncounted.
    fn frame_down(&mut self, ctx: &mut WorkerCtx, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        match self.mode {
            PayloadMode::Raw => self.send_data_frame(ctx, Opcode::Binary, data),
            PayloadMode::Base64 => {
                // Encode chunk by chunk: each chunk is its own text frame,
                // whole base64 groups, so the browser decodes each frame.
                let step = ctx.scratch.len() / 4 * 3;
                for part in data.chunks(step.max(3)) {
                    let mut scratch = std::mem::take(&mut ctx.scratch);
                    let n = base64::engine::general_purpose::STANDARD
                        .encode_slice(part, &mut scratch)
                        .unwrap_or(0);
                    self.send_data_frame(ctx, Opcode::Text, &scratch[..n]);
                    ctx.scratch = scratch;
                }
            }
        }
    }

    /// The backend closed (EOF) or failed.
    pub fn on_backend_gone(
        &mut self,
        ctx: &mut WorkerCtx,
        error: Option<&io::Error>,
        now: Instant,
    ) {
        if matches!(self.backend, Backend::Closed | Backend::None) {
            return;
        }
        self.backend = Backend::Closed;
        match error {
            None => self.start_close(ctx, close_code::NORMAL, "backend closed", now),
            Some(e) => {
                ctx.metrics.count(Cause::BackendIo);
                tracing::warn!(session = self.id, error = %e, "backend connection failed");
                self.start_close(
                    ctx,
                    close_code::INTERNAL_ERROR,
                    "backend connection failed",
                    now,
                );
            }
        }
    }

    /// Timers: handshake, connect, idle, heartbeat, close.
    pub fn on_tick(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        let (idle, heartbeat) = (ctx.cfg.limits.idle_timeout_ms, ctx.cfg.limits.heartbeat_ms);
        let expired = self.deadline.is_some_and(|d| now >= d);
        match self.phase {
            Phase::Sniff | Phase::Handshake if expired => {
                ctx.metrics.count(Cause::HandshakeTimeout);
                tracing::info!(session = self.id, "handshake timed out");
                self.respond_error(
                    ctx,
                    408,
                    "handshake_timeout",
                    "the request did not arrive in time",
                    now,
                );
                if self.tls.as_ref().is_some_and(|t| t.is_handshaking())
                    || self.phase == Phase::Sniff
                {
                    // Nothing sensible can be sent on an unfinished TLS handshake.
                    self.finish(ctx, now);
                }
            }
            Phase::Connecting if expired => {
                ctx.metrics.count(Cause::BackendConnectTimeout);
                tracing::warn!(session = self.id, backend = ?self.target, "backend connect timed out");
                self.start_close(
                    ctx,
                    close_code::INTERNAL_ERROR,
                    "backend connect timed out",
                    now,
                );
            }
            Phase::Relay if expired && self.rfb.is_some() => {
                ctx.metrics.count(Cause::RfbHandshakeTimeout);
                tracing::warn!(
                    session = self.id,
                    "VNC handshake with the backend timed out"
                );
                self.start_close(
                    ctx,
                    close_code::INTERNAL_ERROR,
                    "VNC handshake timed out",
                    now,
                );
            }
            Phase::Connecting | Phase::Relay if self.admission_revoked() => {
                // The control plane revoked the session: its Revoke message
                // may never have arrived (full mailbox), the shared state
                // always does.
                self.on_revoke(ctx, now);
            }
            Phase::Relay => {
                if idle > 0 && now.duration_since(self.last_activity) >= ms(idle) {
                    ctx.metrics.count(Cause::IdleTimeout);
                    tracing::info!(session = self.id, "idle timeout");
                    self.start_close(ctx, close_code::GOING_AWAY, "idle timeout", now);
                } else if let Some(p) = self.next_ping.filter(|p| now >= *p) {
                    let frame = websocket::ping_frame(b"consolegate");
                    self.push_browser(ctx, &[frame.as_bytes()]);
                    let hb = ms(heartbeat);
                    // Skip missed beats rather than bursting pings.
                    self.next_ping = Some(if p + hb > now { p + hb } else { now + hb });
                }
            }
            Phase::Closing | Phase::Responding if expired => self.finish(ctx, now),
            _ => {}
        }
        self.advance(ctx, now);
    }

    fn admission_revoked(&self) -> bool {
        self.admission
            .as_ref()
            .is_some_and(|a| a.state() == crate::mailbox::ticket_state::REVOKED)
    }

    /// Whether this connection belongs to appliance session `id` (it
    /// carries it, or came in on its dedicated listener).
    pub fn serves(&self, id: u64) -> bool {
        self.admission.as_ref().is_some_and(|a| a.id == id) || self.bound_id() == Some(id)
    }

    /// The admission of the dedicated listener this connection came from.
    pub fn bound_id(&self) -> Option<u64> {
        self.bound.as_ref().map(|a| a.id)
    }

    /// The control plane revoked the session (DELETE): close with 1008.
    pub fn on_revoke(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        ctx.metrics.count(Cause::Revoked);
        match self.phase {
            Phase::Connecting | Phase::Relay => {
                self.start_close(ctx, close_code::POLICY, "session revoked", now)
            }
            Phase::Sniff | Phase::Handshake => self.finish(ctx, now),
            _ => {}
        }
        self.advance(ctx, now);
    }

    /// Server shutdown: close with 1001.
    pub fn on_drain(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        match self.phase {
            Phase::Connecting | Phase::Relay => {
                self.start_close(ctx, close_code::GOING_AWAY, "server shutting down", now)
            }
            Phase::Sniff | Phase::Handshake => self.finish(ctx, now),
            _ => {}
        }
        self.advance(ctx, now);
    }

    // ---- internals ---------------------------------------------------------

    fn sniff(&mut self, ctx: &mut WorkerCtx, first: u8, now: Instant) {
        // A TLS ClientHello starts with record type 22 (handshake); websockify
        // sniffs the same way to serve ws and wss on one port.
        let tls_cfg = ctx.tls.clone();
        let ssl_only = ctx.cfg.tls.as_ref().is_some_and(|t| t.ssl_only);
        self.set_phase(Phase::Handshake);
        if first == 0x16 {
            if let Some(cfg) = tls_cfg {
                match rustls::ServerConnection::new(cfg) {
                    Ok(conn) => self.tls = Some(Box::new(conn)),
                    Err(e) => {
                        ctx.metrics.count(Cause::TlsSetup);
                        tracing::error!(session = self.id, error = %e, "TLS session setup failed");
                        self.finish(ctx, now);
                    }
                }
            }
        } else if ssl_only {
            ctx.metrics.count(Cause::PlainOnTlsOnly);
            tracing::info!(session = self.id, "plain connection refused (--ssl-only)");
            self.finish(ctx, now);
        }
    }

    fn tls_input(&mut self, ctx: &mut WorkerCtx, mut data: &[u8], now: Instant) {
        while !data.is_empty() && self.phase != Phase::Done {
            let Some(tls) = self.tls.as_mut() else { return };
            match tls.read_tls(&mut data) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    ctx.metrics.count(Cause::TlsRead);
                    tracing::info!(session = self.id, error = %e, "TLS input refused");
                    self.finish(ctx, now);
                    return;
                }
            }
            if let Err(e) = tls.process_new_packets() {
                ctx.metrics.count(Cause::TlsError);
                tracing::info!(session = self.id, error = %e, "TLS error from browser");
                // Send the alert rustls queued, then close.
                self.flush_tls(ctx);
                self.set_phase(Phase::Responding);
                self.deadline = Some(now + ms(ctx.cfg.limits.close_timeout_ms));
                return;
            }
            self.drain_tls_plaintext(ctx, now);
        }
    }

    fn drain_tls_plaintext(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        loop {
            let Some(tls) = self.tls.as_mut() else { return };
            let mut scratch = std::mem::take(&mut ctx.scratch);
            let r = tls.reader().read(&mut scratch);
            match r {
                Ok(0) => {
                    ctx.scratch = scratch;
                    // close_notify: the browser is done sending.
                    self.on_browser_gone(ctx, None, now);
                    return;
                }
                Ok(n) => {
                    self.plain_input(ctx, &scratch[..n], now);
                    ctx.scratch = scratch;
                }
                Err(e) => {
                    ctx.scratch = scratch;
                    if e.kind() != io::ErrorKind::WouldBlock {
                        self.on_browser_gone(ctx, Some(&e), now);
                    }
                    return;
                }
            }
        }
    }

    /// Encrypt `data` for the browser, all of it. rustls takes plaintext
    /// only while its unsent output is under its buffer limit (64 KiB by
    /// default) and says so by taking less: a frame larger than that was
    /// once cut short here (the rest silently dropped, the stream corrupt).
    /// So: write what it takes, move its records into `to_browser` (whose
    /// bound the read limits already keep), and go on until all is in.
    fn write_tls_plaintext(&mut self, ctx: &mut WorkerCtx, mut data: &[u8]) {
        while !data.is_empty() {
            let Some(tls) = self.tls.as_mut() else { return };
            let taken = tls.writer().write(data).unwrap_or(0);
            data = &data[taken..];
            self.flush_tls(ctx);
            if taken == 0 {
                // With its output just flushed rustls always takes bytes,
                // unless the connection is closing: the rest cannot be sent.
                ctx.metrics.count(Cause::TlsWrite);
                tracing::debug!(
                    session = self.id,
                    unsent = data.len(),
                    "TLS connection takes no more plaintext"
                );
                return;
            }
        }
    }

    fn flush_tls(&mut self, ctx: &mut WorkerCtx) {
        if let Some(tls) = self.tls.as_mut() {
            let mut w = QueueWriter {
                q: &mut self.to_browser,
                pool: &mut ctx.pool,
            };
            while tls.wants_write() {
                if tls.write_tls(&mut w).is_err() {
                    break;
                }
            }
        }
    }

    /// Plaintext bytes from the browser, by phase. Consumes all of `data`.
    fn plain_input(&mut self, ctx: &mut WorkerCtx, data: &[u8], now: Instant) {
        match self.phase {
            Phase::Handshake => {
                let max = ctx.cfg.limits.max_request_bytes;
                let take = data.len().min(max.saturating_sub(self.req.len()).max(1));
                self.req.extend_from_slice(&data[..take.min(data.len())]);
                let rest_from = take.min(data.len());
                self.try_handshake(ctx, now);
                if matches!(self.phase, Phase::Connecting) && rest_from < data.len() {
                    self.decode_input(ctx, &data[rest_from..], now);
                }
            }
            Phase::Connecting | Phase::Relay | Phase::Closing => self.decode_input(ctx, data, now),
            Phase::Sniff | Phase::Responding | Phase::Done => {}
        }
    }

    fn try_handshake(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        let l = &ctx.cfg.limits;
        let limits = RequestLimits {
            max_request_bytes: l.max_request_bytes,
            max_headers: l.max_headers,
        };
        let parsed = http_upgrade::parse_request(&self.req, &limits);
        let (request, consumed) = match parsed {
            Ok(None) => return,
            Ok(Some(r)) => r,
            Err(e) => {
                ctx.metrics.count(Cause::from(&e));
                tracing::info!(session = self.id, status = e.status(), error = %e, "bad handshake");
                self.respond_error(ctx, e.status(), e.kind(), &e.to_string(), now);
                return;
            }
        };
        let leftover = self.req.split_off(consumed);
        self.req = Vec::new();
        let up = match request {
            Request::Get { path, head, .. } => {
                match ctx.web.clone() {
                    Some(web) => {
                        ctx.metrics.static_responses += 1;
                        let (resp, body) = web.open(&path, head);
                        self.push_browser(ctx, &[&resp]);
                        self.set_phase(Phase::Responding);
                        self.web_body = body;
                        self.deadline = Some(now + web_response_grace(ctx));
                        self.stream_web_body(ctx, now);
                    }
                    None => {
                        ctx.metrics.count(Cause::NotWebsocket);
                        self.respond_error(
                            ctx,
                            400,
                            "not_websocket",
                            "this port expects a WebSocket upgrade request",
                            now,
                        );
                    }
                }
                return;
            }
            Request::Upgrade(up) => up,
        };
        if !ctx.cfg.origins.is_empty() {
            let ok = up
                .origin
                .as_deref()
                .is_some_and(|o| ctx.cfg.origins.iter().any(|a| a.eq_ignore_ascii_case(o)));
            if !ok {
                ctx.metrics.count(Cause::OriginNotAllowed);
                tracing::warn!(session = self.id, origin = ?up.origin, "origin not allowed");
                self.respond_error(
                    ctx,
                    403,
                    "origin_not_allowed",
                    "this Origin is not allowed",
                    now,
                );
                return;
            }
        }
        let protocol = match http_upgrade::choose_subprotocol(&up.protocols) {
            Ok(p) => p,
            Err(e) => {
                ctx.metrics.count(Cause::from(&e));
                tracing::info!(session = self.id, offered = ?up.protocols, "no supported subprotocol");
                self.respond_error(ctx, e.status(), e.kind(), &e.to_string(), now);
                return;
            }
        };
        let info = ConnInfo {
            peer: self.peer.map(|p| p.ip()),
            bound: self.bound.as_ref(),
        };
        let route = match ctx.router.route(&up, info, now) {
            Ok(r) => r,
            Err(e) => {
                ctx.metrics.count(Cause::from(&e));
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
                self.respond_error(ctx, e.status(), e.kind(), &e.to_string(), now);
                return;
            }
        };
        let addr = route.addr;
        if let Some(a) = route.admission {
            ctx.report(FromWorker::Opened {
                id: a.id,
                worker: ctx.worker_id,
                peer: self.peer,
            });
            if let Some(pw) = a.target.password.as_deref() {
                self.rfb = Some(Box::new(rfb::Handshake::new(
                    Some(pw.as_bytes()),
                    RfbLimits::default(),
                )));
            }
            self.admission = Some(a);
        }
        self.mode = if protocol == Some("base64") {
            PayloadMode::Base64
        } else {
            PayloadMode::Raw
        };
        self.decoder = Some(Decoder::new(
            self.mode,
            DecoderLimits {
                max_frame_bytes: ctx.cfg.limits.max_frame_bytes,
            },
        ));
        let mut resp = Vec::with_capacity(256);
        http_upgrade::write_upgrade_response(&mut resp, &up.key, protocol);
        self.push_browser(ctx, &[&resp]);
        // The appliance's own RFB greeting to the browser, if it speaks RFB
        // for the backend's security phase.
        if let Some(h) = self.rfb.as_mut() {
            let hello = h.take_to_browser();
            self.relay_down(ctx, &hello);
        }
        ctx.metrics.handshakes_ok += 1;
        tracing::debug!(
            session = self.id,
            worker = ctx.worker_id,
            backend = %addr,
            path = ?up.path,
            protocol = protocol.unwrap_or("-"),
            "session open"
        );
        self.set_phase(Phase::Connecting);
        self.backend = Backend::Connecting;
        self.target = Some(addr);
        self.connect_to = Some(addr);
        self.deadline = Some(now + ms(ctx.cfg.limits.connect_timeout_ms));
        if !leftover.is_empty() {
            self.decode_input(ctx, &leftover, now);
        }
    }

    /// WebSocket frames from the browser: payload to the backend queue,
    /// control frames answered here.
    fn decode_input(&mut self, ctx: &mut WorkerCtx, mut data: &[u8], now: Instant) {
        while !data.is_empty() && !matches!(self.phase, Phase::Done | Phase::Responding) {
            let Some(dec) = self.decoder.as_mut() else {
                return;
            };
            if dec.close_received() {
                return;
            }
            let discard = self.phase == Phase::Closing;
            let via_rfb = !discard && self.rfb.is_some();
            let result = if discard || via_rfb {
                // After our close frame, data is read and dropped while we
                // wait for the browser's close.
                let mut scratch = std::mem::take(&mut ctx.scratch);
                let r = dec.decode(data, &mut scratch);
                ctx.scratch = scratch;
                r
            } else {
                // Base64 decoding needs room for a whole group (3 bytes) to progress.
                let spare = self.to_backend.spare(&mut ctx.pool, 64);
                let r = dec.decode(data, spare);
                if let Ok(p) = &r {
                    self.to_backend.commit(p.written);
                } else {
                    self.to_backend.commit(0);
                }
                r
            };
            match result {
                Ok(p) => {
                    data = &data[p.consumed..];
                    if via_rfb && p.written > 0 {
                        let scratch = std::mem::take(&mut ctx.scratch);
                        self.rfb_browser_input(ctx, &scratch[..p.written], now);
                        ctx.scratch = scratch;
                    } else if !discard {
                        if p.written > 0 {
                            self.up_since.get_or_insert(now);
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
                        self.close_received = true;
                    } else {
                        ctx.metrics.count(Cause::from(&e));
                        tracing::info!(session = self.id, error = %e, "protocol error from browser");
                        self.start_close(ctx, e.close_code(), &e.to_string(), now);
                        // The browser broke the protocol: do not wait for its close.
                        self.close_received = true;
                    }
                    break;
                }
            }
        }
        // Release an uncommitted spare chunk.
        self.to_backend.consume(&mut ctx.pool, 0);
    }

    fn on_ws_event(&mut self, ctx: &mut WorkerCtx, ev: Event, now: Instant) {
        match ev {
            Event::Ping(p) => {
                if self.phase != Phase::Closing {
                    let f = websocket::pong_frame(p.as_slice());
                    self.push_browser(ctx, &[f.as_bytes()]);
                }
            }
            Event::Pong(_) => {}
            Event::Close { code, reason } => {
                self.close_received = true;
                if self.phase != Phase::Closing {
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
            }
        }
    }

    /// Browser payload during the RFB security phase.
    fn rfb_browser_input(&mut self, ctx: &mut WorkerCtx, data: &[u8], now: Instant) {
        let Some(h) = self.rfb.as_mut() else {
            self.to_backend.push(&mut ctx.pool, data);
            return;
        };
        let r = h.on_browser(data);
        if let Some(n) = self.rfb_flush(ctx, r, now) {
            if n < data.len() && self.phase == Phase::Relay {
                // Handshake done: the rest is relay data.
                self.bytes_up += (data.len() - n) as u64;
                ctx.metrics.bytes_browser_to_backend += (data.len() - n) as u64;
                self.to_backend.push(&mut ctx.pool, &data[n..]);
            }
        }
    }

    /// Send what the RFB handshake produced both ways, end it when done,
    /// and turn its errors into a close. Returns the bytes it consumed.
    fn rfb_flush(
        &mut self,
        ctx: &mut WorkerCtx,
        r: Result<usize, RfbError>,
        now: Instant,
    ) -> Option<usize> {
        let (to_backend, to_browser, done) = match self.rfb.as_mut() {
            Some(h) => (h.take_to_backend(), h.take_to_browser(), h.is_done()),
            None => return None,
        };
        if !to_backend.is_empty() {
            self.to_backend.push(&mut ctx.pool, &to_backend);
        }
        // RFB messages of our own are not relayed payload: not counted.
        self.frame_down(ctx, &to_browser);
        match r {
            Ok(n) => {
                if done {
                    self.rfb = None;
                    self.deadline = None;
                    tracing::debug!(session = self.id, "VNC security handshake done");
                }
                Some(n)
            }
            Err(e) => {
                ctx.metrics.count(Cause::from(&e));
                let (code, who) = match e.side() {
                    rfb::Side::Backend => (close_code::INTERNAL_ERROR, "backend"),
                    rfb::Side::Browser => (close_code::PROTOCOL_ERROR, "browser"),
                };
                tracing::warn!(session = self.id, side = who, error = %e, "VNC handshake failed");
                self.rfb = None;
                self.start_close(ctx, code, &e.to_string(), now);
                None
            }
        }
    }

    /// Queue a close frame and stop relaying; the backend is closed by the
    /// IO layer (see [`Session::backend_should_close`]).
    fn start_close(&mut self, ctx: &mut WorkerCtx, code: u16, reason: &str, now: Instant) {
        match self.phase {
            Phase::Connecting | Phase::Relay => {
                let f = websocket::close_frame(code, reason);
                self.push_browser(ctx, &[f.as_bytes()]);
                if let Some(tls) = self.tls.as_mut() {
                    tls.send_close_notify();
                    self.flush_tls(ctx);
                }
                self.set_phase(Phase::Closing);
                self.next_ping = None;
                self.deadline = Some(now + ms(ctx.cfg.limits.close_timeout_ms));
                // Bytes for a backend we are leaving are dropped.
                self.to_backend
                    .truncate_to(&mut ctx.pool, self.backend_inflight);
                if self.close.is_none() {
                    self.close = Some(CloseInfo {
                        code: Some(code),
                        reason: reason.to_string(),
                    });
                }
            }
            Phase::Sniff | Phase::Handshake => self.finish(ctx, now),
            Phase::Closing | Phase::Responding | Phase::Done => {}
        }
    }

    fn respond_error(
        &mut self,
        ctx: &mut WorkerCtx,
        status: u16,
        code: &str,
        message: &str,
        now: Instant,
    ) {
        let mut resp = Vec::with_capacity(256);
        http_upgrade::write_error_response(&mut resp, status, code, message, &[]);
        self.push_browser(ctx, &[&resp]);
        self.set_phase(Phase::Responding);
        self.deadline = Some(now + ms(ctx.cfg.limits.close_timeout_ms));
        self.close = Some(CloseInfo {
            code: None,
            reason: format!("HTTP {status} {code}"),
        });
    }

    /// Frame `payload` and queue it for the browser.
    fn send_data_frame(&mut self, ctx: &mut WorkerCtx, op: Opcode, payload: &[u8]) {
        let mut hdr = [0u8; websocket::MAX_SERVER_HEADER_LEN];
        let n = websocket::write_server_header(&mut hdr, true, op, payload.len() as u64);
        self.push_browser(ctx, &[&hdr[..n], payload]);
    }

    /// Queue plaintext for the browser, through TLS when it is on.
    fn push_browser(&mut self, ctx: &mut WorkerCtx, parts: &[&[u8]]) {
        match self.tls.as_ref() {
            Some(_) => {
                // One write per frame so rustls makes one record, not two;
                // the assembly buffer is the worker's, reused.
                let mut buf = std::mem::take(&mut ctx.tls_frame);
                buf.clear();
                for p in parts {
                    buf.extend_from_slice(p);
                }
                self.write_tls_plaintext(ctx, &buf);
                ctx.tls_frame = buf;
            }
            None => {
                let total: usize = parts.iter().map(|p| p.len()).sum();
                // Keep a frame in one chunk when it fits, so one send carries it.
                let spare = self.to_browser.spare(&mut ctx.pool, total);
                if spare.len() >= total {
                    let mut at = 0;
                    for p in parts {
                        spare[at..at + p.len()].copy_from_slice(p);
                        at += p.len();
                    }
                    self.to_browser.commit(total);
                } else {
                    self.to_browser.commit(0);
                    for p in parts {
                        self.to_browser.push(&mut ctx.pool, p);
                    }
                }
            }
        }
    }

    /// Move to Done once nothing is left to do.
    fn advance(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        let flushed = self.down_queued() == 0;
        match self.phase {
            Phase::Closing if flushed && self.close_received => self.finish(ctx, now),
            Phase::Responding if flushed && self.web_body.is_none() => self.finish(ctx, now),
            _ => {}
        }
    }

    fn finish(&mut self, ctx: &mut WorkerCtx, now: Instant) {
        if self.phase == Phase::Done {
            return;
        }
        let was_session = self.decoder.is_some();
        self.set_phase(Phase::Done);
        // Only the connection that claimed the ticket frees the dedicated
        // port; a refused second connection ending must not.
        if let (Some(a), Some(_)) = (&self.bound, &self.admission) {
            ctx.ended_bound.push(a.id);
        }
        self.deadline = None;
        self.next_ping = None;
        if was_session {
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
            if let Some(a) = self.admission.as_ref() {
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
        }
    }
}

#[cfg(test)]
mod tests;
