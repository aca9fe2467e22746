//! The io_uring-like IO layer (the contract of src/io/uring.rs `sync` and
//! `complete`): operations are submitted by `sync` and complete later, in
//! batches, in an order the dice choose.
//!
//! - One send in flight per leg, from the session's queue, whose bytes
//!   must stay put until it completes: the completion checks that the
//!   queue still starts at the same address with the same bytes
//!   (`*_send_started` … `*_sent`), then "sends" a random prefix.
//! - Multishot receives on both legs, armed while the session wants bytes,
//!   cancelled when it stops; a batch may still deliver up to
//!   `recv_completions_per_batch` receives (each at most
//!   `recv_buffer_bytes`) before the cancel lands — the documented
//!   overshoot.
//! - Bulk receives into the chunk the session lends
//!   (`backend_bulk_buf`): MSG_DONTWAIT, so the kernel fills the chunk at
//!   submission and the completion comes in a later batch; EAGAIN leads to
//!   a poll.
//! - Splice (the same sessions while the pool has a pipe, `plan.pipes`):
//!   the worker's own non-blocking splices through the session's splice
//!   steps, as the epoll layer does them (the pipe is `Conn::epoll.pipe`),
//!   with polls (POLLIN on the backend, POLLOUT on the browser) when a
//!   socket would block; never while a receive or poll of the backend is
//!   in flight, and no send to the browser while a spliced frame lasts.
//! - Connect, cancels, teardown: a finished session's sockets are shut,
//!   every pending operation completes, and only then is it released.

use std::io;

use super::backend::ConnectPlan;
use super::epoll::{self, BrowserWrite};
use super::net::{SockRead, SockWrite};
use super::plan::Mutation;
use super::world::{Conn, Env};

/// A send in flight: where the bytes were and what they were.
#[derive(Debug)]
pub struct SendOp {
    address: usize,
    bytes: Vec<u8>,
}

/// What a bulk receive found when it was submitted (MSG_DONTWAIT).
#[derive(Debug, Clone, Copy)]
pub enum BulkRead {
    Bytes(usize),
    Eof,
    Again,
    Failed(io::ErrorKind),
}

/// The io_uring layer's view of one connection (uring.rs `Conn`).
#[derive(Debug, Default)]
pub struct UringState {
    backend_socket: bool,
    b_recv: bool,
    b_recv_cancel: bool,
    b_send: Option<SendOp>,
    /// A backend receive in flight: multishot, or the bulk one (`k_bulk`).
    k_recv: bool,
    k_recv_cancel: bool,
    k_bulk: Option<BulkRead>,
    k_poll: bool,
    k_drained: bool,
    /// A POLLOUT poll on the browser (a spliced frame is blocked).
    b_poll: bool,
    k_send: Option<SendOp>,
    k_connecting: bool,
    k_connect_cancel: bool,
    cancels: u32,
    b_eof: bool,
    k_eof: bool,
    pub teardown: bool,
}

impl UringState {
    fn in_flight(&self) -> bool {
        self.b_recv
            || self.b_send.is_some()
            || self.k_recv
            || self.k_poll
            || self.b_poll
            || self.k_send.is_some()
            || self.k_connecting
            || self.cancels > 0
    }

    /// A bulk receive holds a chunk lent by the session.
    pub fn bulk_in_flight(&self) -> bool {
        self.k_bulk.is_some()
    }

    pub fn describe(&self) -> String {
        format!(
            "b_recv={} b_send={} k_recv={} k_bulk={} k_poll={} k_send={} connecting={} cancels={} teardown={}",
            self.b_recv,
            self.b_send.is_some(),
            self.k_recv,
            self.k_bulk.is_some(),
            self.k_poll,
            self.k_send.is_some(),
            self.k_connecting,
            self.cancels,
            self.teardown
        )
    }
}

#[derive(Debug)]
enum RecvEnd {
    Eof,
    Cancelled,
    Failed(io::ErrorKind),
}

#[derive(Debug)]
enum Cqe {
    RecvData { browser: bool, bytes: Vec<u8> },
    RecvEnd { browser: bool, end: RecvEnd },
    Bulk(BulkRead),
    Poll,
    BrowserPoll,
    Sent { browser: bool, n: usize },
    SendFailed { browser: bool },
    Connect(Option<bool>),
    Cancel,
}

/// One wait of the completion loop: collect a batch of completions over
/// all sessions (those whose wake-up is lost have none for now), apply
/// them, then `sync` each session they touched.
pub fn turn(env: &mut Env, conns: &mut [Conn]) {
    if conns.is_empty() {
        return;
    }
    env.recv_budget = env.plan.recv_completions_per_batch;
    let mut batch: Vec<(usize, Cqe)> = Vec::new();
    let start = env.rng.below(conns.len() as u64) as usize;
    for j in 0..conns.len() {
        let i = (start + j) % conns.len();
        // A lost wake-up, io_uring style: this session's completions are
        // late (the loop always syncs a session it delivered bytes to, so
        // skipping that would break the contract, not test the session).
        if env.step >= conns[i].asleep_until {
            collect(env, &mut conns[i], i, &mut batch);
        }
    }
    let mut touched = Vec::new();
    for (i, cqe) in batch {
        complete(env, &mut conns[i], cqe);
        touched.push(i);
    }
    touched.sort_unstable();
    touched.dedup();
    for i in touched {
        sync(env, &mut conns[i]);
    }
}

fn collect(env: &mut Env, c: &mut Conn, i: usize, batch: &mut Vec<(usize, Cqe)>) {
    if !c.live() {
        return;
    }
    let mutant = env.plan.mutation == Some(Mutation::IgnoreReadLimits);
    if c.uring.b_recv {
        collect_recv(env, c, i, true, false, batch);
    }
    if c.uring.k_recv && c.uring.k_bulk.is_none() {
        collect_recv(env, c, i, false, mutant, batch);
    }
    if let Some(b) = c.uring.k_bulk {
        batch.push((i, Cqe::Bulk(b)));
    }
    let readable = c.klink.session_readable() || c.klink.session_closed;
    if c.uring.k_poll && readable && env.rng.chance(700) {
        batch.push((i, Cqe::Poll));
    }
    let writable = c.blink.session_room() > 0 || c.blink.session_closed || c.blink.peer_reset;
    if c.uring.b_poll && writable && env.rng.chance(700) {
        batch.push((i, Cqe::BrowserPoll));
    }
    for browser in [true, false] {
        let (op, link) = if browser {
            (&c.uring.b_send, &c.blink)
        } else {
            (&c.uring.k_send, &c.klink)
        };
        let Some(op) = op else { continue };
        if link.session_closed || link.peer_reset {
            batch.push((i, Cqe::SendFailed { browser }));
        } else if link.session_room() > 0 && env.rng.chance(700) {
            let n = env.rng.size(op.bytes.len()).min(link.session_room());
            env.cov.short_writes += u64::from(n < op.bytes.len());
            batch.push((i, Cqe::Sent { browser, n }));
        }
    }
    if c.uring.k_connecting {
        if c.uring.k_connect_cancel {
            if env.rng.chance(700) {
                batch.push((i, Cqe::Connect(None)));
            }
        } else if let Some(ok) = c.backend.outcome {
            batch.push((i, Cqe::Connect(Some(ok))));
        }
    }
    for _ in 0..c.uring.cancels {
        if env.rng.chance(800) {
            batch.push((i, Cqe::Cancel));
        }
    }
}

/// Completions of one multishot receive: its final one (cancelled, EOF,
/// error), or data while the batch has provided buffers left.
fn collect_recv(
    env: &mut Env,
    c: &mut Conn,
    i: usize,
    browser: bool,
    mutant: bool,
    batch: &mut Vec<(usize, Cqe)>,
) {
    let (cancel, link) = if browser {
        (c.uring.b_recv_cancel, &mut c.blink)
    } else {
        (c.uring.k_recv_cancel, &mut c.klink)
    };
    let end = if cancel && !mutant {
        env.rng.chance(700).then_some(RecvEnd::Cancelled)
    } else if link.session_closed {
        Some(RecvEnd::Eof)
    } else if link.peer_reset {
        Some(RecvEnd::Failed(io::ErrorKind::ConnectionReset))
    } else if link.session_available() == 0 && link.peer_fin {
        Some(RecvEnd::Eof)
    } else {
        None
    };
    if let Some(end) = end {
        batch.push((i, Cqe::RecvEnd { browser, end }));
        return;
    }
    if cancel && !mutant {
        // Submitted with the last sync: it lands before any more data
        // (DEFER_TASKRUN runs the receives' task work after submission).
        return;
    }
    let recv = env.plan.limits().recv_buffer_bytes;
    let mut budget = if mutant { 4 } else { env.recv_budget };
    while budget > 0 && link.session_available() > 0 {
        let mut buf = vec![0u8; env.rng.size(recv)];
        if let SockRead::Data(n) = link.session_read(&mut buf) {
            buf.truncate(n);
            batch.push((
                i,
                Cqe::RecvData {
                    browser,
                    bytes: buf,
                },
            ));
        }
        budget -= 1;
        if !mutant {
            env.recv_budget -= 1;
        }
        if !env.rng.chance(600) {
            break;
        }
    }
}

/// A leg reached EOF or failed (uring.rs `Conn::leg_ended`).
fn leg_ended(env: &mut Env, c: &mut Conn, browser: bool, error: Option<io::Error>) {
    if browser {
        c.uring.b_eof = true;
        if !c.uring.teardown {
            c.browser_gone(env, error);
        }
    } else {
        c.uring.k_eof = true;
        if !c.uring.teardown {
            c.backend_gone(env, error);
        }
    }
}

fn complete(env: &mut Env, c: &mut Conn, cqe: Cqe) {
    let teardown = c.uring.teardown;
    match cqe {
        Cqe::RecvData { browser, bytes } => {
            if !teardown {
                if browser {
                    c.on_browser_data(env, &bytes);
                } else {
                    c.on_backend_data(env, &bytes, true);
                    env.cov.multishot_fragments += 1;
                }
            }
        }
        Cqe::RecvEnd { browser, end } => {
            if browser {
                c.uring.b_recv = false;
                c.uring.b_recv_cancel = false;
            } else {
                c.uring.k_recv = false;
                c.uring.k_recv_cancel = false;
            }
            match end {
                RecvEnd::Cancelled => {}
                RecvEnd::Eof => leg_ended(env, c, browser, None),
                RecvEnd::Failed(k) => leg_ended(env, c, browser, Some(io::Error::from(k))),
            }
        }
        Cqe::Bulk(b) => {
            c.uring.k_recv = false;
            c.uring.k_bulk = None;
            bulk_done(env, c, b, teardown);
        }
        Cqe::Poll => {
            c.uring.k_poll = false;
            c.uring.k_drained = false;
        }
        Cqe::BrowserPoll => c.uring.b_poll = false,
        Cqe::Sent { browser, n } => sent(env, c, browser, n),
        Cqe::SendFailed { browser } => {
            if let Some(s) = c.session.as_mut() {
                if browser {
                    c.uring.b_send = None;
                    s.browser_send_started(0);
                } else {
                    c.uring.k_send = None;
                    s.backend_send_started(0);
                }
            }
            if !teardown {
                let e = io::Error::from(io::ErrorKind::BrokenPipe);
                if browser {
                    c.browser_gone(env, Some(e));
                } else {
                    c.backend_gone(env, Some(e));
                }
            }
        }
        Cqe::Connect(result) => {
            c.uring.k_connecting = false;
            if teardown || c.uring.k_connect_cancel {
                return;
            }
            match result {
                Some(true) => c.connected(env),
                _ => c.connect_failed(env),
            }
        }
        Cqe::Cancel => c.uring.cancels = c.uring.cancels.saturating_sub(1),
    }
}

fn bulk_done(env: &mut Env, c: &mut Conn, b: BulkRead, teardown: bool) {
    let Some(s) = c.session.as_mut() else {
        return;
    };
    match b {
        BulkRead::Bytes(n) if !teardown => {
            s.backend_bulk_done(&mut env.ctx, n, env.now);
            c.note_backend_bytes(env, n, "bulk receive");
            env.cov.bulk_receives += 1;
        }
        BulkRead::Bytes(_) => s.backend_bulk_done(&mut env.ctx, 0, env.now),
        BulkRead::Again => {
            s.backend_bulk_done(&mut env.ctx, 0, env.now);
            c.uring.k_drained = true;
        }
        BulkRead::Eof => {
            s.backend_bulk_done(&mut env.ctx, 0, env.now);
            leg_ended(env, c, false, None);
        }
        BulkRead::Failed(k) => {
            s.backend_bulk_done(&mut env.ctx, 0, env.now);
            leg_ended(env, c, false, Some(io::Error::from(k)));
        }
    }
}

/// A send completed with `n` bytes: its bytes must still be where they
/// were, unchanged; then they reach the peer and the session is told.
fn sent(env: &mut Env, c: &mut Conn, browser: bool, n: usize) {
    let op = if browser {
        c.uring.b_send.take()
    } else {
        c.uring.k_send.take()
    };
    let (Some(op), Some(s)) = (op, c.session.as_ref()) else {
        return;
    };
    let pending = if browser {
        s.browser_pending()
    } else {
        s.backend_pending()
    };
    // (An empty view: the session hides the backend queue once the backend
    // is closed; its in-flight bytes stay queued, but cannot be looked at.)
    let hidden = pending.is_empty() && !browser;
    let intact = hidden
        || (pending.as_ptr() as usize == op.address
            && pending.len() >= op.bytes.len()
            && pending[..op.bytes.len()] == op.bytes[..]);
    if !intact {
        let id = c.id;
        env.violate(format!(
            "conn {id}: bytes of an in-flight send to the {} moved or changed before it completed",
            if browser { "browser" } else { "backend" }
        ));
        return;
    }
    let link = if browser { &mut c.blink } else { &mut c.klink };
    match link.session_write(&op.bytes[..n], n) {
        SockWrite::Wrote(w) if w == n => {}
        other => {
            let id = c.id;
            env.violate(format!(
                "conn {id}: the simulated send of {n} bytes failed: {other:?}"
            ));
            return;
        }
    }
    if browser {
        env.browser_writes += 1;
        if env.plan.mutation == Some(Mutation::CorruptDownstream) && env.browser_writes == 5 {
            c.blink.corrupt_last_byte();
        }
        c.browser_sent(env, n);
    } else {
        c.backend_sent(env, n);
    }
}

/// Bring one session's operations in line with what it wants
/// (uring.rs `sync`), and release it once it is done with nothing in
/// flight.
pub fn sync(env: &mut Env, c: &mut Conn) {
    if !c.live() {
        return;
    }
    if !c.uring.teardown {
        start_connect(env, c);
        if c.session.as_ref().is_some_and(|s| s.backend_should_close()) {
            end_backend(c);
        }
        splice_pump(env, c);
        start_sends(env, c);
        arm_receives(env, c);
        if c.session.as_ref().is_some_and(|s| s.is_done()) {
            c.uring.teardown = true;
            c.blink.session_close();
            end_backend(c);
        }
    }
    if c.uring.teardown && !c.uring.in_flight() {
        if c.epoll.pipe.take().is_some() {
            // A pipe with bytes left is closed; either way the pool may
            // make another.
            env.pipes_free += 1;
        }
        c.release(env);
    }
}

/// uring.rs `splice_pump`: the spliced frame out (header, then payload),
/// the empty pipe back, the next splice in; until nothing moves or a
/// random share of `SPLICE_ROUNDS` is spent (then a poll, as uring.rs).
fn splice_pump(env: &mut Env, c: &mut Conn) {
    const SPLICE_ROUNDS: usize = 32;
    let rounds = env.rng.range(1, SPLICE_ROUNDS);
    for _ in 0..rounds {
        let mut progress = splice_out(env, c);
        epoll::give_back_empty_pipe(env, c);
        if c.session.as_ref().is_none_or(|s| s.is_done()) {
            return;
        }
        progress |= splice_in(env, c);
        if !progress {
            return;
        }
    }
    if c.session.as_ref().is_some_and(|s| s.pipe_bytes() > 0) {
        c.uring.b_poll |= !c.uring.b_eof && c.uring.b_send.is_none();
    } else {
        c.uring.k_drained = true;
    }
}

/// One step of the spliced frame to the browser: its header, else payload.
fn splice_out(env: &mut Env, c: &mut Conn) -> bool {
    let u = &mut c.uring;
    let Some(s) = c.session.as_mut() else {
        return false;
    };
    if s.pipe_bytes() == 0 || u.b_poll || u.b_eof {
        return false;
    }
    if u.b_send.is_some() {
        let id = c.id;
        env.violate(format!(
            "conn {id}: a send to the browser in flight during a splice"
        ));
        return false;
    }
    match epoll::write_browser_once(env, c) {
        BrowserWrite::Wrote | BrowserWrite::Gone => true,
        BrowserWrite::WouldBlock => {
            c.uring.b_poll = true;
            false
        }
        BrowserWrite::Broken => false,
    }
}

/// Splice backend bytes into a pipe when the session allows it and no
/// receive or poll of the backend is in flight; EAGAIN: poll first.
fn splice_in(env: &mut Env, c: &mut Conn) -> bool {
    let u = &c.uring;
    if env.plan.pipes == 0
        || u.k_recv
        || u.k_poll
        || u.k_drained
        || u.k_eof
        || u.k_connecting
        || !u.backend_socket
    {
        return false;
    }
    let progress = match epoll::splice_into_pipe(env, c) {
        None => return false,
        Some(SockRead::Data(_)) => true,
        Some(SockRead::Eof) => {
            leg_ended(env, c, false, None);
            true
        }
        Some(SockRead::Failed(e)) => {
            leg_ended(env, c, false, Some(e));
            true
        }
        Some(SockRead::WouldBlock) => {
            c.uring.k_drained = true;
            false
        }
    };
    epoll::give_back_empty_pipe(env, c);
    progress
}

fn start_connect(env: &mut Env, c: &mut Conn) {
    if c.take_connect(env).is_none() {
        return;
    }
    if c.backend.plan == ConnectPlan::FailNow {
        c.connect_failed(env);
        return;
    }
    c.uring.backend_socket = true;
    c.uring.k_connecting = true;
}

/// Stop using the backend: cancel a pending connect or shut the socket.
fn end_backend(c: &mut Conn) {
    if c.uring.k_connecting && !c.uring.k_connect_cancel {
        c.uring.k_connect_cancel = true;
        c.uring.cancels += 1;
    } else if c.uring.backend_socket {
        c.klink.session_close();
    }
    c.uring.k_eof = true;
    if let Some(s) = c.session.as_mut() {
        s.backend_closed();
    }
}

fn start_sends(_env: &mut Env, c: &mut Conn) {
    let Some(s) = c.session.as_mut() else {
        return;
    };
    // (A spliced frame goes out in `splice_pump`.)
    if c.uring.b_send.is_none() && s.browser_pending_len() > 0 && s.pipe_bytes() == 0 {
        let p = s.browser_pending();
        let op = SendOp {
            address: p.as_ptr() as usize,
            bytes: p.to_vec(),
        };
        s.browser_send_started(op.bytes.len());
        c.uring.b_send = Some(op);
    }
    let can_send = !c.uring.k_connecting && c.uring.backend_socket;
    if c.uring.k_send.is_none() && can_send && !s.backend_pending().is_empty() {
        let p = s.backend_pending();
        let op = SendOp {
            address: p.as_ptr() as usize,
            bytes: p.to_vec(),
        };
        s.backend_send_started(op.bytes.len());
        c.uring.k_send = Some(op);
    }
}

/// Receives: arm when wanted, cancel when not (backpressure); bulk
/// receives into a lent chunk, or a poll when the last one found nothing.
fn arm_receives(env: &mut Env, c: &mut Conn) {
    let Some(s) = c.session.as_mut() else {
        return;
    };
    let u = &mut c.uring;
    let want_b = s.want_browser_read(&env.ctx) && !u.b_eof;
    if want_b && !u.b_recv {
        u.b_recv = true;
    } else if !want_b && u.b_recv && !u.b_recv_cancel {
        u.b_recv_cancel = true;
        u.cancels += 1;
        env.cov.recv_cancels += 1;
    }
    let want_k = s.want_backend_read(&env.ctx) && !u.k_eof && !u.k_connecting && u.backend_socket;
    let bulk = want_k && s.bulk_recv_wanted(&env.ctx);
    // Splicing, with bytes still queued for the browser: their send's
    // completion brings the next splice (uring.rs `drain_first`).
    let can_lend = env.plan.pipes > 0 && env.pipes_free > 0;
    let drain_first = bulk && can_lend && s.splice_in_limit(&env.ctx).is_none();
    if want_k && !u.k_recv && !u.k_poll {
        if bulk && u.k_drained {
            u.k_poll = true;
        } else if drain_first {
        } else if let Some(buf) = bulk.then(|| s.backend_bulk_buf(&mut env.ctx)).flatten() {
            // MSG_DONTWAIT: what is there now lands in the chunk now.
            let n = env.rng.size(buf.len());
            let read = match c.klink.session_read(&mut buf[..n]) {
                SockRead::Data(k) => BulkRead::Bytes(k),
                SockRead::Eof => BulkRead::Eof,
                SockRead::WouldBlock => BulkRead::Again,
                SockRead::Failed(e) => BulkRead::Failed(e.kind()),
            };
            u.k_recv = true;
            u.k_bulk = Some(read);
        } else {
            u.k_recv = true;
        }
    } else if (bulk || !want_k) && u.k_recv && u.k_bulk.is_none() && !u.k_recv_cancel {
        // Bulk bytes are flowing (end the multishot receive; bulk receives
        // start after its last completion) or the session wants no bytes.
        u.k_recv_cancel = true;
        u.cancels += 1;
        env.cov.recv_cancels += 1;
    }
}
