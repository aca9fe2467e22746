//! The epoll backend (mio, edge-triggered): the fallback where io_uring is
//! blocked (Docker's default seccomp profile, `kernel.io_uring_disabled`).
//!
//! Readiness is remembered per socket (readable / writable flags, cleared on
//! `WouldBlock`), and [`pump`] moves bytes until no direction can make
//! progress or a per-turn budget is spent, so one busy session cannot starve
//! the others. Reads go into one worker-wide receive buffer and are handed to
//! the session at once; the session's queues are the only per-session
//! buffers, taken from the pool only while bytes are pending.
//!
//! Bulk downstream on plain-ws binary sessions goes through a pipe instead
//! (`Session::splice_in_limit`): splice backend → pipe, the frame header
//! (MSG_MORE), splice pipe → browser. The pipe comes from the worker's
//! [`PipePool`] and goes back as soon as it is empty; while it holds bytes
//! it is the session's downstream buffer and the backend is not read.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener as StdListener};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use crate::cause::Cause;
use crate::dataplane::session::{Session, WorkerCtx};
use crate::dataplane::turn::{Turn, WorkerIo};
use crate::dataplane::worker::{self, AcceptBackoff, WorkerControl};
use crate::io::splice::{self, Pipe, PipePool};
use crate::mailbox::{Admission, WorkerInbox};
use crate::metrics::WorkerMetrics;

const LISTENER: Token = Token(usize::MAX);
const WAKE: Token = Token(usize::MAX - 1);
/// Dedicated listeners' tokens start here (session tokens are far below).
const DEDICATED_BASE: usize = 1 << 60;

/// A per-session listener (dedicated-port mode) and the session it serves.
struct Dedicated {
    l: TcpListener,
    a: Arc<Admission>,
    port: u16,
}
/// Rounds of [`pump`] per session per event before yielding to others.
const PUMP_ROUNDS_PER_TURN: usize = 32;
/// Readiness events taken from the kernel per poll.
const EVENTS_PER_POLL: usize = 1024;

/// One leg's edge-triggered readiness as last reported, and whether
/// WRITABLE interest is registered.
#[derive(Debug, Default, Clone, Copy)]
struct Leg {
    readable: bool,
    writable: bool,
    /// WRITABLE interest is registered (only while output is blocked: an
    /// always-on EPOLLOUT wakes the worker for every ACK that frees send
    /// space, a wasted context switch per message).
    write_interest: bool,
    /// The peer's FIN (or an error) was reported: keep reading to EOF even
    /// after a short read.
    hup: bool,
}

struct Conn {
    s: Session,
    browser: TcpStream,
    browser_leg: Leg,
    backend: Option<TcpStream>,
    backend_leg: Leg,
    /// The backend connect is under way (writability will report it).
    connecting: bool,
    /// The splice pipe lent to this session while a spliced frame's payload
    /// waits in it.
    pipe: Option<Pipe>,
}

fn token(idx: usize, backend: bool) -> Token {
    Token(idx << 1 | usize::from(backend))
}

/// One worker's sockets and the state the turns share.
struct EpollWorker {
    poll: Poll,
    listener: Option<TcpListener>,
    conns: slab::Slab<Conn>,
    dedicated: slab::Slab<Dedicated>,
    /// The worker-wide receive buffer.
    rbuf: Vec<u8>,
    pipes: PipePool,
    /// Sessions whose pump spent its budget: pumped again next turn.
    again: Vec<usize>,
    /// The shared listener may hold more connections.
    accept_again: bool,
    /// Failed accepts (EMFILE…) pause accepting; see AcceptBackoff.
    backoff: AcceptBackoff,
    next_id: u64,
}

impl WorkerIo for EpollWorker {
    fn add_dedicated(
        &mut self,
        _ctx: &mut WorkerCtx,
        a: Arc<Admission>,
        l: StdListener,
    ) -> io::Result<()> {
        let port = l.local_addr().map(|x| x.port()).unwrap_or(0);
        let entry = self.dedicated.vacant_entry();
        let mut ml = TcpListener::from_std(l);
        self.poll.registry().register(
            &mut ml,
            Token(DEDICATED_BASE + entry.key()),
            Interest::READABLE,
        )?;
        entry.insert(Dedicated { l: ml, a, port });
        Ok(())
    }

    fn adopt(
        &mut self,
        ctx: &mut WorkerCtx,
        stream: std::net::TcpStream,
        peer: std::net::SocketAddr,
        now: Instant,
    ) -> io::Result<()> {
        if stream.set_nonblocking(true).is_err() {
            return Ok(());
        }
        self.next_id += 1;
        let mut touched = Vec::new();
        add_conn(
            &mut self.conns,
            &mut self.poll,
            ctx,
            TcpStream::from_std(stream),
            peer,
            None,
            self.next_id,
            now,
            &mut touched,
        )?;
        for slot in touched {
            self.touched(ctx, slot, now)?;
        }
        Ok(())
    }

    fn session_slots(&self, out: &mut Vec<usize>) {
        out.extend(self.conns.iter().map(|(i, _)| i));
    }

    fn session_mut(&mut self, slot: usize) -> Option<&mut Session> {
        self.conns.get_mut(slot).map(|c| &mut c.s)
    }

    fn touched(&mut self, ctx: &mut WorkerCtx, slot: usize, now: Instant) -> io::Result<()> {
        if self.conns.contains(slot)
            && pump(
                &mut self.conns,
                slot,
                ctx,
                &mut self.poll,
                &mut self.rbuf,
                &mut self.pipes,
                now,
            )
        {
            self.again.push(slot);
        }
        Ok(())
    }

    fn close_dedicated(
        &mut self,
        ctx: &mut WorkerCtx,
        pred: &mut dyn FnMut(&Admission) -> bool,
    ) -> io::Result<()> {
        close_dedicated(&mut self.dedicated, &mut self.poll, ctx, |d| pred(&d.a));
        Ok(())
    }

    fn accepting(&self) -> bool {
        self.listener.is_some()
    }

    fn stop_accepting(&mut self, _ctx: &mut WorkerCtx) -> io::Result<()> {
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.accept_again = false;
        Ok(())
    }

    fn live_sessions(&self) -> usize {
        self.conns.len()
    }

    fn quiescent(&self) -> bool {
        self.conns.is_empty()
    }
}

/// Run one worker until drained. Returns its counters.
pub fn run(
    mut ctx: WorkerCtx,
    listener: StdListener,
    mut inbox: Option<WorkerInbox>,
    ctl: Arc<WorkerControl>,
) -> io::Result<WorkerMetrics> {
    let poll = Poll::new()?;
    let mut events = Events::with_capacity(EVENTS_PER_POLL);
    let mut listener = TcpListener::from_std(listener);
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    if let Some(ib) = inbox.as_ref() {
        let fd = ib.wake_fd();
        poll.registry()
            .register(&mut mio::unix::SourceFd(&fd), WAKE, Interest::READABLE)?;
    }
    let l = &ctx.cfg.limits;
    let pipes = PipePool::new(
        if l.splice_min_bytes > 0 {
            l.splice_pipes_per_worker
        } else {
            0
        },
        l.splice_pipe_bytes,
    );
    let mut w = EpollWorker {
        poll,
        listener: Some(listener),
        conns: slab::Slab::new(),
        dedicated: slab::Slab::new(),
        rbuf: vec![0u8; l.recv_buffer_bytes],
        pipes,
        again: Vec::new(),
        accept_again: false,
        backoff: AcceptBackoff::default(),
        next_id: (ctx.worker_id as u64) << 48,
    };
    let mut turn = Turn::new(&ctx, Instant::now());
    let busy_poll = Duration::from_micros(ctx.cfg.limits.busy_poll_us);
    let mut last_work = Instant::now();

    loop {
        let now = Instant::now();
        let timeout = if !w.again.is_empty()
            || w.accept_again
            || now.saturating_duration_since(last_work) < busy_poll
        {
            Duration::ZERO
        } else {
            turn.wait(now)
        };
        match w.poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let now = Instant::now();
        if !events.is_empty() {
            last_work = now;
        }
        turn.begin(&ctx, &ctl, now)?;
        let mut revisit = std::mem::take(&mut w.again);
        let (dedicated_ready, woken) = w.readiness(&events, &mut revisit);
        w.accept_all(
            &mut ctx,
            dedicated_ready,
            turn.draining(),
            now,
            &mut revisit,
        )?;
        if let Some(ib) = inbox.as_mut() {
            if woken {
                ib.reset();
            }
            turn.messages(&mut w, &mut ctx, ib, now)?;
        }
        revisit.sort_unstable();
        revisit.dedup();
        for slot in revisit {
            w.touched(&mut ctx, slot, now)?;
        }
        if turn.end(&mut w, &mut ctx, &ctl, Instant::now())? {
            return Ok(ctx.metrics);
        }
    }
}

impl EpollWorker {
    /// Record what this poll reported: session readiness (their slots go to
    /// `revisit`), listeners ready, the mailbox's wake-up.
    fn readiness(&mut self, events: &Events, revisit: &mut Vec<usize>) -> (Vec<usize>, bool) {
        let mut dedicated_ready = Vec::new();
        let mut woken = false;
        for ev in events.iter() {
            match ev.token() {
                LISTENER => self.accept_again = true,
                WAKE => woken = true,
                Token(t) if t >= DEDICATED_BASE => dedicated_ready.push(t - DEDICATED_BASE),
                Token(t) => {
                    let Some(c) = self.conns.get_mut(t >> 1) else {
                        continue;
                    };
                    let failed = ev.is_error() || ev.is_read_closed() || ev.is_write_closed();
                    let leg = if t & 1 == 1 {
                        &mut c.backend_leg
                    } else {
                        &mut c.browser_leg
                    };
                    leg.readable |= ev.is_readable() || failed;
                    leg.writable |= ev.is_writable() || failed;
                    leg.hup |= failed;
                    revisit.push(t >> 1);
                }
            }
        }
        (dedicated_ready, woken)
    }

    /// Accept on the shared listener and the dedicated ones that are ready
    /// (a pause after a failed accept retries them all when it ends:
    /// edge-triggered readiness does not fire again for connections
    /// already waiting).
    fn accept_all(
        &mut self,
        ctx: &mut WorkerCtx,
        mut dedicated_ready: Vec<usize>,
        draining: bool,
        now: Instant,
        revisit: &mut Vec<usize>,
    ) -> io::Result<()> {
        if self.backoff.retry_due(now) && !draining {
            self.accept_again = true;
            dedicated_ready.extend(self.dedicated.iter().map(|(i, _)| i));
        }
        if self.accept_again {
            self.accept_again = false;
            if let (Some(l), false) = (self.listener.as_ref(), self.backoff.paused(now)) {
                self.accept_again = accept_batch(
                    l,
                    None,
                    &mut self.poll,
                    &mut self.conns,
                    ctx,
                    &mut self.next_id,
                    now,
                    revisit,
                    &mut self.backoff,
                )?;
            }
        }
        for d in dedicated_ready {
            if self.backoff.paused(now) {
                break;
            }
            if let Some(dl) = self.dedicated.get(d) {
                let a = dl.a.clone();
                // A dedicated listener serves one session; a backlog beyond
                // the batch is picked up on its next readiness edge.
                let _ = accept_batch(
                    &dl.l,
                    Some(a),
                    &mut self.poll,
                    &mut self.conns,
                    ctx,
                    &mut self.next_id,
                    now,
                    revisit,
                    &mut self.backoff,
                )?;
            }
        }
        Ok(())
    }
}

/// WRITABLE interest only while output is blocked: an always-on EPOLLOUT
/// wakes the worker for every ACK that frees send space. Dropping it marks
/// the socket writable again (nothing is pending).
fn sync_write_interest(
    poll: &Poll,
    s: &mut TcpStream,
    tok: Token,
    blocked: bool,
    wint: &mut bool,
    writable: &mut bool,
) {
    if blocked == *wint {
        return;
    }
    let interest = if blocked {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    if poll.registry().reregister(s, tok, interest).is_ok() {
        *wint = blocked;
    }
    if !blocked {
        *writable = true;
    }
}

/// One read's outcome, with the edge-triggered readiness flag updated.
enum ReadOutcome {
    Data(usize),
    Eof,
    /// Nothing to read now (EAGAIN or EINTR).
    Nothing,
    Failed(io::Error),
}

/// Classify a read. A short read drained the socket, so the flag drops
/// without the extra read that would only return EAGAIN (a new edge wakes
/// us), unless the peer's FIN was reported: then read on to the EOF.
fn classify(r: io::Result<usize>, lim: usize, hup: bool, readable: &mut bool) -> ReadOutcome {
    match r {
        Ok(0) => {
            *readable = false;
            ReadOutcome::Eof
        }
        Ok(n) => {
            if n < lim && !hup {
                *readable = false;
            }
            ReadOutcome::Data(n)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            *readable = false;
            ReadOutcome::Nothing
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => ReadOutcome::Nothing,
        Err(e) => ReadOutcome::Failed(e),
    }
}

/// The non-data outcomes of a backend read; true when something happened.
fn backend_read_outcome(
    s: &mut Session,
    ctx: &mut WorkerCtx,
    o: ReadOutcome,
    now: Instant,
) -> bool {
    match o {
        ReadOutcome::Data(_) => true,
        ReadOutcome::Eof => {
            s.on_backend_gone(ctx, None, now);
            true
        }
        ReadOutcome::Nothing => false,
        ReadOutcome::Failed(e) => {
            s.on_backend_gone(ctx, Some(&e), now);
            true
        }
    }
}

/// Close the dedicated listeners `pred` selects and tell the control plane
/// their ports are free.
fn close_dedicated(
    dedicated: &mut slab::Slab<Dedicated>,
    poll: &mut Poll,
    ctx: &mut WorkerCtx,
    mut pred: impl FnMut(&Dedicated) -> bool,
) {
    let gone: Vec<usize> = dedicated
        .iter()
        .filter(|(_, d)| pred(d))
        .map(|(i, _)| i)
        .collect();
    for i in gone {
        let mut d = dedicated.remove(i);
        let _ = poll.registry().deregister(&mut d.l);
        worker::report_listener_closed(ctx, &d.a, d.port);
    }
}

/// Accept up to `accept_batch_max` connections; true when more may wait.
#[allow(clippy::too_many_arguments)]
fn accept_batch(
    l: &TcpListener,
    bound: Option<Arc<Admission>>,
    poll: &mut Poll,
    conns: &mut slab::Slab<Conn>,
    ctx: &mut WorkerCtx,
    next_id: &mut u64,
    now: Instant,
    revisit: &mut Vec<usize>,
    backoff: &mut AcceptBackoff,
) -> io::Result<bool> {
    for _ in 0..ctx.cfg.limits.accept_batch_max {
        let (stream, peer) = match l.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and friends: pause accepting rather than spin on a
                // listener we cannot serve; the pause's end retries.
                backoff.failed(ctx, &e, now);
                return Ok(false);
            }
        };
        backoff.succeeded();
        ctx.metrics.accepted += 1;
        // Shared-port connections may go to a less-loaded worker; a
        // dedicated port's session stays with its listener's worker.
        let stream = if bound.is_none() {
            match worker::place_accepted(
                ctx,
                conns.len(),
                std::net::TcpStream::from(std::os::fd::OwnedFd::from(stream)),
                peer,
            ) {
                Some(s) => TcpStream::from_std(s),
                None => continue,
            }
        } else {
            stream
        };
        add_conn(
            conns,
            poll,
            ctx,
            stream,
            peer,
            bound.clone(),
            *next_id + 1,
            now,
            revisit,
        )?;
        *next_id += 1;
    }
    Ok(true)
}

/// Serve one browser connection on this worker (accepted here or handed
/// over): register it and start its session, unless the worker is full.
#[allow(clippy::too_many_arguments)]
fn add_conn(
    conns: &mut slab::Slab<Conn>,
    poll: &mut Poll,
    ctx: &mut WorkerCtx,
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    bound: Option<Arc<Admission>>,
    id: u64,
    now: Instant,
    revisit: &mut Vec<usize>,
) -> io::Result<()> {
    let Some(session) = ctx.new_session(conns.len(), id, now, Some(peer), bound) else {
        return Ok(());
    };
    let _ = stream.set_nodelay(true);
    let entry = conns.vacant_entry();
    let idx = entry.key();
    poll.registry()
        .register(&mut stream, token(idx, false), Interest::READABLE)?;
    tracing::debug!(worker = ctx.worker_id, session = id, %peer, "accepted");
    entry.insert(Conn {
        s: session,
        browser: stream,
        browser_leg: Leg {
            readable: true,
            writable: true,
            ..Leg::default()
        },
        backend: None,
        backend_leg: Leg::default(),
        connecting: false,
        pipe: None,
    });
    revisit.push(idx);
    Ok(())
}

/// Move bytes for one session until nothing moves or the turn's budget is
/// spent. Removes the session when it is done. Returns true when the session
/// should be pumped again on the next turn (budget spent with work left).
fn pump(
    conns: &mut slab::Slab<Conn>,
    idx: usize,
    ctx: &mut WorkerCtx,
    poll: &mut Poll,
    rbuf: &mut [u8],
    pipes: &mut PipePool,
    now: Instant,
) -> bool {
    let Some(c) = conns.get_mut(idx) else {
        return false;
    };
    let mut more = false;
    for round in 0.. {
        if round == PUMP_ROUNDS_PER_TURN {
            more = true;
            break;
        }
        let mut progress = false;

        if let Some(addr) = c.s.take_connect() {
            progress = true;
            match TcpStream::connect(addr) {
                Ok(mut st) => {
                    match poll.registry().register(
                        &mut st,
                        token(idx, true),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        Ok(()) => {
                            c.backend = Some(st);
                            c.connecting = true;
                            // Writability reports the connect's completion.
                            c.backend_leg.write_interest = true;
                        }
                        Err(e) => c.s.on_backend_connect_failed(ctx, &e, now),
                    }
                }
                Err(e) => c.s.on_backend_connect_failed(ctx, &e, now),
            }
        }

        if c.connecting && c.backend_leg.writable {
            let st = c.backend.as_ref().expect("connecting implies a socket");
            match st.take_error() {
                Ok(None) => match st.peer_addr() {
                    Ok(_) => {
                        c.connecting = false;
                        let _ = st.set_nodelay(true);
                        c.s.on_backend_connected(ctx, now);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                        // Spurious wake-up before the handshake finished.
                        c.backend_leg.writable = false;
                    }
                    Err(e) => {
                        c.connecting = false;
                        c.s.on_backend_connect_failed(ctx, &e, now);
                        progress = true;
                    }
                },
                Ok(Some(e)) | Err(e) => {
                    c.connecting = false;
                    c.s.on_backend_connect_failed(ctx, &e, now);
                    progress = true;
                }
            }
        }

        if c.s.backend_should_close() || (c.backend.is_some() && c.s.is_done()) {
            if let Some(mut st) = c.backend.take() {
                let _ = poll.registry().deregister(&mut st);
                let _ = st.shutdown(Shutdown::Both);
            }
            c.s.backend_closed();
            c.connecting = false;
        }

        // Browser writes: queued bytes, and a spliced frame's payload from
        // its pipe once the frame's header is out.
        while c.browser_leg.writable && c.s.browser_pending_len() > 0 {
            let pending = c.s.browser_pending();
            let r = if !pending.is_empty() {
                let r = if c.s.pipe_bytes() > 0 {
                    // The pipe's bytes follow at once: header and payload
                    // leave in one segment, not a tiny one first.
                    splice::send(c.browser.as_raw_fd(), pending, true)
                } else {
                    c.browser.write(pending)
                };
                r.map(|n| (n, false))
            } else {
                let ready = c.s.splice_out_ready();
                match c.pipe.as_mut() {
                    Some(p) if ready > 0 => p.drain_to(c.browser.as_raw_fd(), ready),
                    // Cannot happen: spliced bytes are always in this
                    // session's pipe. End the session rather than spin.
                    _ => Err(io::Error::other("spliced bytes without a pipe")),
                }
                .map(|n| (n, true))
            };
            match r {
                Ok((0, _)) => {
                    c.browser_leg.writable = false;
                    break;
                }
                Ok((n, false)) => {
                    c.s.browser_sent(ctx, n, now);
                    progress = true;
                }
                Ok((n, true)) => {
                    c.s.splice_out_done(ctx, n, now);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.browser_leg.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    c.s.on_browser_gone(ctx, Some(&e), now);
                    break;
                }
            }
        }
        // An emptied pipe goes back to the pool: idle sessions hold none.
        if c.s.pipe_bytes() == 0 {
            if let Some(p) = c.pipe.take() {
                pipes.give(p);
            }
        }

        let blocked = !c.browser_leg.writable && c.s.browser_pending_len() > 0;
        let tok = token(idx, false);
        sync_write_interest(
            poll,
            &mut c.browser,
            tok,
            blocked,
            &mut c.browser_leg.write_interest,
            &mut c.browser_leg.writable,
        );

        // Backend writes.
        if !c.connecting {
            if let Some(st) = c.backend.as_mut() {
                while c.backend_leg.writable && !c.s.backend_pending().is_empty() {
                    match st.write(c.s.backend_pending()) {
                        Ok(0) => {
                            c.backend_leg.writable = false;
                        }
                        Ok(n) => {
                            c.s.backend_sent(ctx, n, now);
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            c.backend_leg.writable = false
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            c.s.on_backend_gone(ctx, Some(&e), now);
                            break;
                        }
                    }
                }
            }
        }

        if !c.connecting {
            if let Some(st) = c.backend.as_mut() {
                let blocked = !c.backend_leg.writable && !c.s.backend_pending().is_empty();
                let tok = token(idx, true);
                sync_write_interest(
                    poll,
                    st,
                    tok,
                    blocked,
                    &mut c.backend_leg.write_interest,
                    &mut c.backend_leg.writable,
                );
            }
        }

        // Browser read.
        if c.browser_leg.readable && c.s.want_browser_read(ctx) {
            let lim = c.s.browser_read_limit(ctx).min(rbuf.len());
            let r = c.browser.read(&mut rbuf[..lim]);
            match classify(r, lim, c.browser_leg.hup, &mut c.browser_leg.readable) {
                ReadOutcome::Data(n) => {
                    c.s.on_browser_data(ctx, &rbuf[..n], now);
                    progress = true;
                }
                ReadOutcome::Eof => c.s.on_browser_gone(ctx, None, now),
                ReadOutcome::Nothing => {}
                ReadOutcome::Failed(e) => c.s.on_browser_gone(ctx, Some(&e), now),
            }
        }

        // Backend read: bulk into a pipe when the session allows (splice),
        // else straight into a frame chunk (zero-copy framing), else through
        // the worker's receive buffer.
        if c.backend_leg.readable && !c.connecting {
            if let (Some(st), Some(lim)) = (c.backend.as_ref(), c.s.splice_in_limit(ctx)) {
                if c.pipe.is_none() {
                    c.pipe = pipes.take();
                }
                if let Some(p) = c.pipe.as_mut() {
                    let lim = lim.min(p.capacity());
                    // A short splice does not mean the socket is drained
                    // (the pipe may have run out of slots), so readiness
                    // drops only on EAGAIN: a stale flag costs one call, a
                    // wrongly dropped one would stall (edge-triggered).
                    match p.fill_from(st.as_raw_fd(), lim) {
                        Ok(0) => {
                            c.backend_leg.readable = false;
                            c.s.on_backend_gone(ctx, None, now);
                            progress = true;
                        }
                        Ok(n) => {
                            c.s.splice_in_done(ctx, n, now);
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            c.backend_leg.readable = false
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if splice::is_unsupported(&e) => {
                            // Nothing moved; copy from now on.
                            ctx.metrics.count(Cause::SpliceUnsupported);
                            tracing::warn!(worker = ctx.worker_id, error = %e, "splice refused, copying instead");
                            pipes.disable();
                        }
                        Err(e) => {
                            c.s.on_backend_gone(ctx, Some(&e), now);
                            progress = true;
                        }
                    }
                    if c.s.pipe_bytes() == 0 {
                        if let Some(p) = c.pipe.take() {
                            pipes.give(p);
                        }
                    }
                }
            }
        }
        if c.backend_leg.readable && !c.connecting {
            if let (Some(st), Some(buf)) = (c.backend.as_mut(), c.s.backend_frame_buf(ctx)) {
                let lim = buf.len();
                let r = st.read(buf);
                let outcome = classify(r, lim, c.backend_leg.hup, &mut c.backend_leg.readable);
                let n = match &outcome {
                    ReadOutcome::Data(n) => *n,
                    _ => 0,
                };
                c.s.backend_frame_done(ctx, n, now);
                progress |= backend_read_outcome(&mut c.s, ctx, outcome, now);
            }
        }
        if c.backend_leg.readable && !c.connecting && c.s.want_backend_read(ctx) {
            if let Some(st) = c.backend.as_mut() {
                let lim = c.s.backend_read_limit(ctx).min(rbuf.len());
                let r = st.read(&mut rbuf[..lim]);
                let outcome = classify(r, lim, c.backend_leg.hup, &mut c.backend_leg.readable);
                if let ReadOutcome::Data(n) = outcome {
                    c.s.on_backend_data(ctx, &rbuf[..n], now);
                    progress = true;
                } else {
                    progress |= backend_read_outcome(&mut c.s, ctx, outcome, now);
                }
            }
        }

        if c.s.is_done() || !progress {
            break;
        }
    }

    if c.s.is_done() {
        let mut c = conns.remove(idx);
        if let Some(p) = c.pipe.take() {
            // Closed, not reused, if bytes of this session are still in it.
            pipes.give(p);
        }
        if let Some(mut st) = c.backend.take() {
            let _ = poll.registry().deregister(&mut st);
        }
        let _ = poll.registry().deregister(&mut c.browser);
        // Half-close first so a response we just wrote is not cut off by a
        // reset when unread request bytes remain.
        let _ = c.browser.shutdown(Shutdown::Write);
        c.s.release(ctx);
        return false;
    }
    more
}
