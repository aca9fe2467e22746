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
use crate::dataplane::router::Router;
use crate::dataplane::session::{Session, WorkerCtx};
use crate::dataplane::worker::{self, AcceptBackoff, DrainState, Inbound, WorkerControl};
use crate::io::splice::{self, Pipe, PipePool};
use crate::mailbox::{Admission, WorkerInbox};
use crate::metrics::WorkerMetrics;

const LISTENER: Token = Token(usize::MAX);
const WAKE: Token = Token(usize::MAX - 1);
/// Dedicated listeners' tokens start here (session tokens are far below).
const DEDICATED_BASE: usize = 1 << 60;
/// Control-plane messages handled per wake-up before other work runs.
const MESSAGES_PER_TURN: usize = 1024;
/// How often a worker reports its counters to the control plane.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

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

struct Conn {
    s: Session,
    browser: TcpStream,
    b_readable: bool,
    b_writable: bool,
    /// WRITABLE interest is registered (only while output is blocked: an
    /// always-on EPOLLOUT wakes the worker for every ACK that frees send
    /// space, a wasted context switch per message).
    b_wint: bool,
    /// The peer's FIN (or an error) was reported: keep reading to EOF even
    /// after a short read.
    b_hup: bool,
    backend: Option<TcpStream>,
    k_readable: bool,
    k_writable: bool,
    k_wint: bool,
    k_hup: bool,
    k_connecting: bool,
    /// The splice pipe lent to this session while a spliced frame's payload
    /// waits in it.
    pipe: Option<Pipe>,
}

fn token(idx: usize, backend: bool) -> Token {
    Token(idx << 1 | usize::from(backend))
}

/// Run one worker until drained. Returns its counters.
pub fn run(
    mut ctx: WorkerCtx,
    listener: StdListener,
    mut inbox: Option<WorkerInbox>,
    ctl: Arc<WorkerControl>,
) -> io::Result<WorkerMetrics> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(EVENTS_PER_POLL);
    let mut listener = Some(TcpListener::from_std(listener));
    if let Some(l) = listener.as_mut() {
        poll.registry().register(l, LISTENER, Interest::READABLE)?;
    }
    if let Some(ib) = inbox.as_ref() {
        let fd = ib.wake_fd();
        poll.registry()
            .register(&mut mio::unix::SourceFd(&fd), WAKE, Interest::READABLE)?;
    }
    let mut dedicated: slab::Slab<Dedicated> = slab::Slab::new();
    let mut next_stats = Instant::now() + STATS_INTERVAL;
    let mut conns: slab::Slab<Conn> = slab::Slab::new();
    let mut rbuf = vec![0u8; ctx.cfg.limits.recv_buffer_bytes];
    let l = &ctx.cfg.limits;
    let mut pipes = PipePool::new(
        if l.splice_min_bytes > 0 {
            l.splice_pipes_per_worker
        } else {
            0
        },
        l.splice_pipe_bytes,
    );
    let tick = Duration::from_millis(ctx.cfg.limits.timer_tick_ms);
    let mut next_tick = Instant::now() + tick;
    let mut drain = DrainState::default();
    let mut again: Vec<usize> = Vec::new();
    let mut accept_again = false;
    // Failed accepts (EMFILE…) pause accepting; see AcceptBackoff.
    let mut backoff = AcceptBackoff::default();
    let mut next_id: u64 = (ctx.worker_id as u64) << 48;
    let busy_poll = Duration::from_micros(ctx.cfg.limits.busy_poll_us);
    let mut last_work = Instant::now();

    loop {
        let now = Instant::now();
        let timeout = if !again.is_empty()
            || accept_again
            || now.saturating_duration_since(last_work) < busy_poll
        {
            Duration::ZERO
        } else {
            next_tick.saturating_duration_since(now)
        };
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        let now = Instant::now();
        if !events.is_empty() {
            last_work = now;
        }
        ctl.beat(ctx.worker_id, now);
        worker::inject_faults(ctx.worker_id)?;
        let mut revisit = std::mem::take(&mut again);
        let mut dedicated_ready: Vec<usize> = Vec::new();
        let mut woken = false;
        for ev in events.iter() {
            if ev.token() == LISTENER {
                accept_again = true;
                continue;
            }
            if ev.token() == WAKE {
                woken = true;
                continue;
            }
            if ev.token().0 >= DEDICATED_BASE {
                dedicated_ready.push(ev.token().0 - DEDICATED_BASE);
                continue;
            }
            let idx = ev.token().0 >> 1;
            let is_backend = ev.token().0 & 1 == 1;
            let Some(c) = conns.get_mut(idx) else {
                continue;
            };
            let failed = ev.is_error() || ev.is_read_closed() || ev.is_write_closed();
            if is_backend {
                c.k_readable |= ev.is_readable() || failed;
                c.k_writable |= ev.is_writable() || failed;
                c.k_hup |= failed;
            } else {
                c.b_readable |= ev.is_readable() || failed;
                c.b_writable |= ev.is_writable() || failed;
                c.b_hup |= failed;
            }
            revisit.push(idx);
        }
        // A pause that ends retries every listener: edge-triggered
        // readiness does not fire again for connections already waiting.
        if backoff.retry_due(now) && !drain.active() {
            accept_again = true;
            dedicated_ready.extend(dedicated.iter().map(|(i, _)| i));
        }
        if accept_again {
            accept_again = false;
            if let (Some(l), false) = (listener.as_ref(), backoff.paused(now)) {
                accept_again = accept_batch(
                    l,
                    None,
                    &mut poll,
                    &mut conns,
                    &mut ctx,
                    &mut next_id,
                    now,
                    &mut revisit,
                    &mut backoff,
                )?;
            }
        }
        for d in dedicated_ready {
            if backoff.paused(now) {
                break;
            }
            if let Some(dl) = dedicated.get(d) {
                let a = dl.a.clone();
                // A dedicated listener serves one session; a backlog beyond
                // the batch is picked up on its next readiness edge.
                let _ = accept_batch(
                    &dl.l,
                    Some(a),
                    &mut poll,
                    &mut conns,
                    &mut ctx,
                    &mut next_id,
                    now,
                    &mut revisit,
                    &mut backoff,
                )?;
            }
        }
        // Messages are drained every turn, not only when the eventfd fired:
        // a session is admitted (queued here) before its browser is told
        // the URL, but the wake-up can land in a later epoll batch than the
        // browser's connection, which must not find the session unknown.
        if let Some(ib) = inbox.as_mut() {
            if woken {
                ib.reset();
            }
            {
                for _ in 0..MESSAGES_PER_TURN {
                    let Some(msg) = ib.try_recv() else { break };
                    match worker::take_message(&mut ctx, msg) {
                        None => {}
                        Some(Inbound::Listener(a, l)) => {
                            let port = l.local_addr().map(|x| x.port()).unwrap_or(0);
                            let entry = dedicated.vacant_entry();
                            let mut ml = TcpListener::from_std(l);
                            poll.registry().register(
                                &mut ml,
                                Token(DEDICATED_BASE + entry.key()),
                                Interest::READABLE,
                            )?;
                            entry.insert(Dedicated { l: ml, a, port });
                        }
                        Some(Inbound::Adopt(stream, peer)) => {
                            // A draining worker takes no new sessions.
                            if drain.active() || stream.set_nonblocking(true).is_err() {
                                continue;
                            }
                            next_id += 1;
                            add_conn(
                                &mut conns,
                                &mut poll,
                                &mut ctx,
                                TcpStream::from_std(stream),
                                peer,
                                None,
                                next_id,
                                now,
                                &mut revisit,
                            )?;
                        }
                        Some(Inbound::Revoke(id)) => {
                            let hit: Vec<usize> = conns
                                .iter()
                                .filter(|(_, c)| c.s.serves(id))
                                .map(|(i, _)| i)
                                .collect();
                            for idx in hit {
                                if let Some(c) = conns.get_mut(idx) {
                                    c.s.on_revoke(&mut ctx, now);
                                }
                                revisit.push(idx);
                            }
                            close_dedicated(&mut dedicated, &mut poll, &mut ctx, |d| d.a.id == id);
                        }
                    }
                }
                // More may be queued than one turn takes: come back at once.
                if ib.has_pending() {
                    ib.wake().notify();
                }
            }
        }
        revisit.sort_unstable();
        revisit.dedup();
        for idx in revisit {
            if conns.contains(idx)
                && pump(
                    &mut conns, idx, &mut ctx, &mut poll, &mut rbuf, &mut pipes, now,
                )
            {
                again.push(idx);
            }
        }

        if !ctx.ended_bound.is_empty() {
            let ended = std::mem::take(&mut ctx.ended_bound);
            close_dedicated(&mut dedicated, &mut poll, &mut ctx, |d| {
                ended.contains(&d.a.id) && worker::dedicated_listener_done(&d.a, false, now)
            });
        }
        let now = Instant::now();
        let (close_listener, close_sessions) = drain.poll(&ctl, ctx.cfg.limits.drain_grace_ms, now);
        if close_listener {
            if let Some(mut l) = listener.take() {
                let _ = poll.registry().deregister(&mut l);
            }
            close_dedicated(&mut dedicated, &mut poll, &mut ctx, |_| true);
            accept_again = false;
            tracing::info!(worker = ctx.worker_id, live = conns.len(), "draining");
        }
        if close_sessions {
            let ids: Vec<usize> = conns.iter().map(|(i, _)| i).collect();
            for idx in ids {
                if let Some(c) = conns.get_mut(idx) {
                    c.s.on_drain(&mut ctx, now);
                }
                pump(
                    &mut conns, idx, &mut ctx, &mut poll, &mut rbuf, &mut pipes, now,
                );
            }
        }
        if now >= next_tick {
            next_tick = now + tick;
            if let Router::Appliance(t) = &mut ctx.router {
                t.purge(now);
            }
            if !dedicated.is_empty() {
                let live: std::collections::HashSet<u64> =
                    conns.iter().filter_map(|(_, c)| c.s.bound_id()).collect();
                close_dedicated(&mut dedicated, &mut poll, &mut ctx, |d| {
                    worker::dedicated_listener_done(&d.a, live.contains(&d.a.id), now)
                });
            }
            if ctx.events.is_some() && now >= next_stats {
                next_stats = now + STATS_INTERVAL;
                let report = worker::stats_report(&ctx, conns.len());
                ctx.report(report);
            }
            let ids: Vec<usize> = conns.iter().map(|(i, _)| i).collect();
            for idx in ids {
                if let Some(c) = conns.get_mut(idx) {
                    c.s.on_tick(&mut ctx, now);
                }
                if pump(
                    &mut conns, idx, &mut ctx, &mut poll, &mut rbuf, &mut pipes, now,
                ) {
                    again.push(idx);
                }
            }
        }
        if let Some(b) = &ctx.balance {
            b.publish(conns.len());
        }
        if drain.active() && conns.is_empty() {
            tracing::info!(worker = ctx.worker_id, "drained");
            return Ok(ctx.metrics);
        }
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
    pred: impl Fn(&Dedicated) -> bool,
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
        b_readable: true,
        b_writable: true,
        b_wint: false,
        b_hup: false,
        backend: None,
        k_readable: false,
        k_writable: false,
        k_wint: false,
        k_hup: false,
        k_connecting: false,
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
                            c.k_connecting = true;
                            // Writability reports the connect's completion.
                            c.k_wint = true;
                        }
                        Err(e) => c.s.on_backend_connect_failed(ctx, &e, now),
                    }
                }
                Err(e) => c.s.on_backend_connect_failed(ctx, &e, now),
            }
        }

        if c.k_connecting && c.k_writable {
            let st = c.backend.as_ref().expect("connecting implies a socket");
            match st.take_error() {
                Ok(None) => match st.peer_addr() {
                    Ok(_) => {
                        c.k_connecting = false;
                        let _ = st.set_nodelay(true);
                        c.s.on_backend_connected(ctx, now);
                        progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                        // Spurious wake-up before the handshake finished.
                        c.k_writable = false;
                    }
                    Err(e) => {
                        c.k_connecting = false;
                        c.s.on_backend_connect_failed(ctx, &e, now);
                        progress = true;
                    }
                },
                Ok(Some(e)) | Err(e) => {
                    c.k_connecting = false;
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
            c.k_connecting = false;
        }

        // Browser writes: queued bytes, and a spliced frame's payload from
        // its pipe once the frame's header is out.
        while c.b_writable && c.s.browser_pending_len() > 0 {
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
                    c.b_writable = false;
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
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.b_writable = false,
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

        let blocked = !c.b_writable && c.s.browser_pending_len() > 0;
        let tok = token(idx, false);
        sync_write_interest(
            poll,
            &mut c.browser,
            tok,
            blocked,
            &mut c.b_wint,
            &mut c.b_writable,
        );

        // Backend writes.
        if !c.k_connecting {
            if let Some(st) = c.backend.as_mut() {
                while c.k_writable && !c.s.backend_pending().is_empty() {
                    match st.write(c.s.backend_pending()) {
                        Ok(0) => {
                            c.k_writable = false;
                        }
                        Ok(n) => {
                            c.s.backend_sent(ctx, n, now);
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.k_writable = false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            c.s.on_backend_gone(ctx, Some(&e), now);
                            break;
                        }
                    }
                }
            }
        }

        if !c.k_connecting {
            if let Some(st) = c.backend.as_mut() {
                let blocked = !c.k_writable && !c.s.backend_pending().is_empty();
                let tok = token(idx, true);
                sync_write_interest(poll, st, tok, blocked, &mut c.k_wint, &mut c.k_writable);
            }
        }

        // Browser read.
        if c.b_readable && c.s.want_browser_read(ctx) {
            let lim = c.s.browser_read_limit(ctx).min(rbuf.len());
            let r = c.browser.read(&mut rbuf[..lim]);
            match classify(r, lim, c.b_hup, &mut c.b_readable) {
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
        if c.k_readable && !c.k_connecting {
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
                            c.k_readable = false;
                            c.s.on_backend_gone(ctx, None, now);
                            progress = true;
                        }
                        Ok(n) => {
                            c.s.splice_in_done(ctx, n, now);
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.k_readable = false,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e)
                            if matches!(
                                e.raw_os_error(),
                                Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                            ) =>
                        {
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
        if c.k_readable && !c.k_connecting {
            if let (Some(st), Some(buf)) = (c.backend.as_mut(), c.s.backend_frame_buf(ctx)) {
                let lim = buf.len();
                let r = st.read(buf);
                let outcome = classify(r, lim, c.k_hup, &mut c.k_readable);
                let n = match &outcome {
                    ReadOutcome::Data(n) => *n,
                    _ => 0,
                };
                c.s.backend_frame_done(ctx, n, now);
                progress |= backend_read_outcome(&mut c.s, ctx, outcome, now);
            }
        }
        if c.k_readable && !c.k_connecting && c.s.want_backend_read(ctx) {
            if let Some(st) = c.backend.as_mut() {
                let lim = c.s.backend_read_limit(ctx).min(rbuf.len());
                let r = st.read(&mut rbuf[..lim]);
                let outcome = classify(r, lim, c.k_hup, &mut c.k_readable);
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
