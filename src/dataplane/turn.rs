//! One worker turn's housekeeping, the same on every IO backend: the
//! heartbeat, the control plane's messages, dedicated listeners whose
//! session ended, the drain after SIGTERM, the timers (ticket purge,
//! listener expiry, session timeouts), the stats report and the published
//! load. An IO backend moves bytes and implements [`WorkerIo`], the few
//! socket-level actions these steps need; it calls [`Turn::begin`],
//! [`Turn::messages`] and [`Turn::end`] around its own event handling.
//!
//! Depends on the session, the router and the mailbox; never on an IO
//! backend (they depend on it).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dataplane::router::Router;
use crate::dataplane::session::{abandon_console_answer, Session, WorkerCtx};
use crate::dataplane::worker::{self, DrainState, Inbound, WorkerControl};
use crate::mailbox::{Admission, ConsoleAnswer, WorkerInbox};

/// Control-plane messages handled per turn before other work runs.
pub const MESSAGES_PER_TURN: usize = 1024;
/// How often a worker reports its counters to the control plane.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// What the housekeeping needs from an IO backend.
pub trait WorkerIo {
    /// Start accepting on a dedicated listener for this admission.
    fn add_dedicated(
        &mut self,
        ctx: &mut WorkerCtx,
        admission: Arc<Admission>,
        listener: TcpListener,
    ) -> io::Result<()>;
    /// Serve a connection another worker accepted (not while draining).
    fn adopt(
        &mut self,
        ctx: &mut WorkerCtx,
        stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) -> io::Result<()>;
    /// The slots of the sessions this worker serves (not those being torn
    /// down), into `out`.
    fn session_slots(&self, out: &mut Vec<usize>);
    fn session_mut(&mut self, slot: usize) -> Option<&mut Session>;
    /// The session at `slot` changed state: move its bytes, start or cancel
    /// its operations, free it when done.
    fn touched(&mut self, ctx: &mut WorkerCtx, slot: usize, now: Instant) -> io::Result<()>;
    /// Close the dedicated listeners whose admission `pred` picks, and tell
    /// the control plane their ports are free (at once, or once an
    /// operation on them completed).
    fn close_dedicated(
        &mut self,
        ctx: &mut WorkerCtx,
        pred: &mut dyn FnMut(&Admission) -> bool,
    ) -> io::Result<()>;
    /// Drain: stop accepting on the shared listener.
    fn stop_accepting(&mut self, ctx: &mut WorkerCtx) -> io::Result<()>;
    /// The shared listener is still open here (its accept may still
    /// complete): false once `stop_accepting` has fully taken effect.
    fn accepting(&self) -> bool;
    /// Sessions held, for the published load and the stats.
    fn live_sessions(&self) -> usize;
    /// Nothing is left in flight (sessions, listeners, operations): a
    /// draining worker may return.
    fn quiescent(&self) -> bool;
}

/// The housekeeping state of one worker.
pub struct Turn {
    drain: DrainState,
    tick: Duration,
    next_tick: Instant,
    next_stats: Instant,
    /// Reused slot list.
    slots: Vec<usize>,
}

impl Turn {
    pub fn new(ctx: &WorkerCtx, now: Instant) -> Self {
        let tick = Duration::from_millis(ctx.cfg.limits.timer_tick_ms);
        Self {
            drain: DrainState::default(),
            tick,
            next_tick: now + tick,
            next_stats: now + STATS_INTERVAL,
            slots: Vec::new(),
        }
    }

    /// The worker is draining (SIGTERM): it takes no new sessions.
    pub fn draining(&self) -> bool {
        self.drain.active()
    }

    /// The longest the backend may wait for events: until the next tick.
    pub fn wait(&self, now: Instant) -> Duration {
        self.next_tick.saturating_duration_since(now)
    }

    /// The start of a turn: the heartbeat the control plane watches, and
    /// fault injection (test builds).
    pub fn begin(&self, ctx: &WorkerCtx, ctl: &WorkerControl, now: Instant) -> io::Result<()> {
        ctl.beat(ctx.worker_id, now);
        worker::inject_faults(ctx.worker_id)
    }

    /// The control plane's messages and other workers' hand-overs, at most
    /// [`MESSAGES_PER_TURN`]; drained every turn, not only when the wake-up
    /// fired (a session is admitted before its browser is told the URL, but
    /// the wake-up can come after the browser's connection).
    pub fn messages<I: WorkerIo>(
        &mut self,
        io: &mut I,
        ctx: &mut WorkerCtx,
        inbox: &mut WorkerInbox,
        now: Instant,
    ) -> io::Result<()> {
        for _ in 0..MESSAGES_PER_TURN {
            let Some(msg) = inbox.try_recv() else {
                return Ok(());
            };
            match worker::take_message(ctx, msg) {
                None => {}
                Some(Inbound::Listener(a, l)) => io.add_dedicated(ctx, a, l)?,
                // A draining worker takes no new sessions.
                Some(Inbound::Adopt(..)) if self.draining() => {}
                Some(Inbound::Adopt(stream, peer)) => io.adopt(ctx, stream, peer, now)?,
                Some(Inbound::Revoke(id)) => {
                    self.for_each_session(io, ctx, now, |s, ctx| {
                        if s.serves(id) {
                            s.on_revoke(ctx, now);
                            true
                        } else {
                            false
                        }
                    })?;
                    io.close_dedicated(ctx, &mut |a| a.id == id)?;
                }
                Some(Inbound::ConsoleAnswer(answer)) => {
                    self.console_answer(io, ctx, answer, now)?
                }
            }
        }
        // More may be queued than one turn takes: come back at once.
        if inbox.has_pending() {
            inbox.wake().notify();
        }
        Ok(())
    }

    /// Hand a console answer to the connection parked for it; one that no
    /// connection takes any more is settled (its admission closed unused).
    fn console_answer<I: WorkerIo>(
        &mut self,
        io: &mut I,
        ctx: &mut WorkerCtx,
        answer: Box<ConsoleAnswer>,
        now: Instant,
    ) -> io::Result<()> {
        let mut answer = Some(answer);
        self.for_each_session(io, ctx, now, |s, ctx| {
            let Some(a) = answer.take_if(|a| a.session == s.id) else {
                return false;
            };
            match s.on_console_answer(ctx, a, now) {
                Ok(()) => true,
                Err(back) => {
                    answer = Some(back);
                    false
                }
            }
        })?;
        if let Some(a) = answer {
            abandon_console_answer(ctx, *a);
        }
        Ok(())
    }

    /// Apply `f` to every session; those it returns true for are touched.
    fn for_each_session<I: WorkerIo>(
        &mut self,
        io: &mut I,
        ctx: &mut WorkerCtx,
        now: Instant,
        mut f: impl FnMut(&mut Session, &mut WorkerCtx) -> bool,
    ) -> io::Result<()> {
        let mut slots = std::mem::take(&mut self.slots);
        slots.clear();
        io.session_slots(&mut slots);
        for &slot in &slots {
            let hit = io.session_mut(slot).is_some_and(|s| f(s, ctx));
            if hit {
                io.touched(ctx, slot, now)?;
            }
        }
        self.slots = slots;
        Ok(())
    }

    /// The end of a turn. Returns true once the worker drained and should
    /// return.
    pub fn end<I: WorkerIo>(
        &mut self,
        io: &mut I,
        ctx: &mut WorkerCtx,
        ctl: &WorkerControl,
        now: Instant,
    ) -> io::Result<bool> {
        // Dedicated-port sessions that ended: their listener closes now, so
        // the port is free for the next one.
        if !ctx.ended_bound.is_empty() {
            let ended = std::mem::take(&mut ctx.ended_bound);
            io.close_dedicated(ctx, &mut |a| {
                ended.contains(&a.id) && worker::dedicated_listener_done(a, false, now)
            })?;
        }
        let grace_ms = ctl.drain_grace_ms(ctx.cfg.limits.drain_grace_ms);
        let (close_listener, close_sessions) = self.drain.poll(ctl, grace_ms, now);
        if close_listener {
            tracing::info!(
                worker = ctx.worker_id,
                live = io.live_sessions(),
                "draining"
            );
            io.stop_accepting(ctx)?;
            io.close_dedicated(ctx, &mut |_| true)?;
        }
        if close_sessions {
            self.for_each_session(io, ctx, now, |s, ctx| {
                s.on_drain(ctx, now);
                true
            })?;
        }
        // An upgrade hand-off waits for this before it moves the pending
        // sessions to the new process.
        if self.draining() && !self.drain.reported_stopped && !io.accepting() {
            self.drain.reported_stopped = true;
            ctl.stopped_accepting(ctx.worker_id);
        }
        if now >= self.next_tick {
            self.next_tick = now + self.tick;
            self.on_tick(io, ctx, now)?;
        }
        if let Some(b) = &ctx.balance {
            b.publish(io.live_sessions());
        }
        if self.draining() && io.quiescent() {
            tracing::info!(worker = ctx.worker_id, "drained");
            return Ok(true);
        }
        Ok(false)
    }

    /// Every tick: expired tickets, dedicated listeners that are done, the
    /// stats report, and every session's timers.
    fn on_tick<I: WorkerIo>(
        &mut self,
        io: &mut I,
        ctx: &mut WorkerCtx,
        now: Instant,
    ) -> io::Result<()> {
        if let Router::Appliance(t) = &mut ctx.router {
            t.purge(now);
        }
        let mut slots = std::mem::take(&mut self.slots);
        slots.clear();
        io.session_slots(&mut slots);
        let live: std::collections::HashSet<u64> = slots
            .iter()
            .filter_map(|&s| io.session_mut(s).and_then(|s| s.bound_id()))
            .collect();
        self.slots = slots;
        io.close_dedicated(ctx, &mut |a| {
            worker::dedicated_listener_done(a, live.contains(&a.id), now)
        })?;
        if ctx.events.is_some() && now >= self.next_stats {
            self.next_stats = now + STATS_INTERVAL;
            let report = worker::stats_report(ctx, io.live_sessions());
            ctx.report(report);
        }
        self.for_each_session(io, ctx, now, |s, ctx| {
            s.on_tick(ctx, now);
            true
        })
    }
}
