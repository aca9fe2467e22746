//! The epoll-like IO layer (the contract of src/io/epoll.rs `pump`): in
//! rounds, start the backend connect, finish it, close the backend when
//! the session says so, write queued bytes to the browser (and a spliced
//! frame's payload from its pipe), write to the backend, read the browser
//! while the session wants it (at most `browser_read_limit`), read the
//! backend by splice, into a frame chunk, or by copy (at most
//! `backend_read_limit`); a finished session is released at once. Every
//! read and write is short at random.

use std::collections::VecDeque;

use super::backend::ConnectPlan;
use super::net::{SockRead, SockWrite};
use super::plan::Mutation;
use super::world::{Conn, Env};

/// Rounds of a pump before it yields to other sessions (as epoll.rs).
const ROUNDS_PER_TURN: usize = 32;
/// Writes per round at most (a guard: each write makes progress or stops).
const WRITES_PER_ROUND: usize = 64;

/// Move bytes for one session until nothing moves or a random budget of
/// rounds is spent; release it when it is done.
pub fn pump(env: &mut Env, c: &mut Conn) {
    if !c.live() {
        return;
    }
    let rounds = env.rng.range(1, ROUNDS_PER_TURN);
    for _ in 0..rounds {
        let mut progress = connect(env, c);
        close_backend_when_asked(c);
        progress |= write_browser(env, c);
        give_back_empty_pipe(env, c);
        progress |= write_backend(env, c);
        progress |= read_browser(env, c);
        progress |= read_backend(env, c);
        if c.session.as_ref().is_none_or(|s| s.is_done()) || !progress {
            break;
        }
    }
    if c.session.as_ref().is_some_and(|s| s.is_done()) {
        if c.epoll.pipe.take().is_some() {
            // A pipe with bytes left is closed; either way the pool may
            // make another.
            env.pipes_free += 1;
        }
        c.klink.session_close();
        c.epoll.backend_open = false;
        c.release(env);
    }
}

fn connect(env: &mut Env, c: &mut Conn) -> bool {
    let mut progress = false;
    if c.take_connect(env).is_some() {
        progress = true;
        if c.backend.plan == ConnectPlan::FailNow {
            c.connect_failed(env);
        } else {
            c.epoll.backend_open = true;
            c.epoll.connecting = true;
        }
    }
    if c.epoll.connecting {
        if let Some(ok) = c.backend.outcome {
            c.epoll.connecting = false;
            if ok {
                c.connected(env);
            } else {
                c.connect_failed(env);
            }
            progress = true;
        }
    }
    progress
}

fn close_backend_when_asked(c: &mut Conn) {
    let Some(s) = c.session.as_mut() else {
        return;
    };
    if s.backend_should_close() || (c.epoll.backend_open && s.is_done()) {
        if c.epoll.backend_open {
            c.klink.session_close();
            c.epoll.backend_open = false;
        }
        s.backend_closed();
        c.epoll.connecting = false;
    }
}

/// Queued bytes to the browser, then a spliced frame's payload from its
/// pipe once the frame's header is out.
fn write_browser(env: &mut Env, c: &mut Conn) -> bool {
    let mut progress = false;
    for _ in 0..WRITES_PER_ROUND {
        let Some(s) = c.session.as_ref() else {
            break;
        };
        if s.browser_pending_len() == 0 {
            break;
        }
        match write_browser_once(env, c) {
            BrowserWrite::Wrote => progress = true,
            BrowserWrite::WouldBlock | BrowserWrite::Gone | BrowserWrite::Broken => break,
        }
    }
    progress
}

/// What [`write_browser_once`] did.
pub(super) enum BrowserWrite {
    Wrote,
    WouldBlock,
    /// The browser's socket failed: the connection is gone.
    Gone,
    /// Nothing could be written although the session said there was
    /// (a violation is recorded).
    Broken,
}

/// One write toward the browser, shared by both IO layers: the session's
/// queued bytes (a spliced frame's header among them), else the spliced
/// payload from the pipe; then what the session is told of it.
pub(super) fn write_browser_once(env: &mut Env, c: &mut Conn) -> BrowserWrite {
    let Some(s) = c.session.as_mut() else {
        return BrowserWrite::Broken;
    };
    let pending = s.browser_pending();
    let from_pipe = pending.is_empty();
    let result = if !from_pipe {
        let max = env.rng.size(pending.len());
        env.cov.short_writes += u64::from(max < pending.len());
        c.blink.session_write(pending, max)
    } else {
        let ready = s.splice_out_ready();
        let Some(pipe) = c
            .epoll
            .pipe
            .as_mut()
            .filter(|p| ready > 0 && p.len() >= ready)
        else {
            let id = c.id;
            env.violate(format!(
                "conn {id}: {} bytes pending for the browser, none to write, {ready} ready in a pipe of {:?} bytes",
                s.browser_pending_len(),
                c.epoll.pipe.as_ref().map(VecDeque::len)
            ));
            return BrowserWrite::Broken;
        };
        let max = env.rng.size(ready);
        let bytes: Vec<u8> = pipe.iter().take(max).copied().collect();
        let r = c.blink.session_write(&bytes, max);
        if let SockWrite::Wrote(n) = r {
            pipe.drain(..n);
        }
        r
    };
    match result {
        SockWrite::Wrote(n) => {
            env.browser_writes += 1;
            if env.plan.mutation == Some(Mutation::CorruptDownstream) && env.browser_writes == 5 {
                c.blink.corrupt_last_byte();
            }
            if from_pipe {
                if let Some(s) = c.session.as_mut() {
                    s.splice_out_done(&mut env.ctx, n, env.now);
                }
            } else {
                c.browser_sent(env, n);
            }
            BrowserWrite::Wrote
        }
        SockWrite::WouldBlock => BrowserWrite::WouldBlock,
        SockWrite::Failed(e) => {
            c.browser_gone(env, Some(e));
            BrowserWrite::Gone
        }
    }
}

/// An emptied pipe goes back to the pool: idle sessions hold none.
/// (A session that ended with bytes in its pipe forgets them; the pool
/// closes such a pipe instead of reusing it.)
pub(super) fn give_back_empty_pipe(env: &mut Env, c: &mut Conn) {
    let Some(s) = c.session.as_ref() else {
        return;
    };
    if s.pipe_bytes() == 0 {
        if let Some(p) = c.epoll.pipe.take() {
            if !p.is_empty() && !s.is_done() {
                env.violate(format!(
                    "conn {}: the session says its pipe is empty, it holds {} bytes",
                    c.id,
                    p.len()
                ));
            }
            env.pipes_free += 1;
        }
    }
}

fn write_backend(env: &mut Env, c: &mut Conn) -> bool {
    if c.epoll.connecting || !c.epoll.backend_open {
        return false;
    }
    let mut progress = false;
    for _ in 0..WRITES_PER_ROUND {
        let Some(s) = c.session.as_mut() else {
            break;
        };
        let pending = s.backend_pending();
        if pending.is_empty() {
            break;
        }
        let max = env.rng.size(pending.len());
        match c.klink.session_write(pending, max) {
            SockWrite::Wrote(n) => {
                c.backend_sent(env, n);
                progress = true;
            }
            SockWrite::WouldBlock => break,
            SockWrite::Failed(e) => {
                c.backend_gone(env, Some(e));
                break;
            }
        }
    }
    progress
}

fn read_browser(env: &mut Env, c: &mut Conn) -> bool {
    let Some(s) = c.session.as_ref() else {
        return false;
    };
    if !s.want_browser_read(&env.ctx) || !c.blink.session_readable() {
        return false;
    }
    let limit = s.browser_read_limit(&env.ctx);
    let mut buf = vec![0u8; env.rng.size(limit)];
    match c.blink.session_read(&mut buf) {
        SockRead::Data(n) => c.on_browser_data(env, &buf[..n]),
        SockRead::Eof => c.browser_gone(env, None),
        SockRead::Failed(e) => c.browser_gone(env, Some(e)),
        SockRead::WouldBlock => return false,
    }
    true
}

/// Splice, then a frame chunk, then a copy, as epoll.rs tries them.
fn read_backend(env: &mut Env, c: &mut Conn) -> bool {
    let mut progress = splice_in(env, c);
    progress |= read_into_frame(env, c);
    progress |= read_copy(env, c);
    progress
}

fn backend_readable(c: &Conn) -> bool {
    c.epoll.backend_open && !c.epoll.connecting && c.klink.session_readable()
}

fn splice_in(env: &mut Env, c: &mut Conn) -> bool {
    if !backend_readable(c) || env.plan.pipes == 0 {
        return false;
    }
    let progress = match splice_into_pipe(env, c) {
        None => return false,
        Some(SockRead::Data(_)) => true,
        Some(SockRead::Eof) => {
            c.backend_gone(env, None);
            true
        }
        Some(SockRead::Failed(e)) => {
            c.backend_gone(env, Some(e));
            true
        }
        Some(SockRead::WouldBlock) => false,
    };
    give_back_empty_pipe(env, c);
    progress
}

/// The backend → pipe half of a splice, the same in both simulated IO
/// layers: lends the connection a pipe from the pool, reads up to the
/// session's limit into it and reports the bytes to the session. None:
/// no splice now (the session wants none, or no pipe is free); else the
/// read's outcome, whose end of the leg the caller handles.
pub(super) fn splice_into_pipe(env: &mut Env, c: &mut Conn) -> Option<SockRead> {
    let limit = c
        .session
        .as_ref()
        .and_then(|s| s.splice_in_limit(&env.ctx))?;
    if c.epoll.pipe.is_none() && env.pipes_free > 0 {
        env.pipes_free -= 1;
        c.epoll.pipe = Some(VecDeque::new());
    }
    let pipe = c.epoll.pipe.as_mut()?;
    if !pipe.is_empty() {
        let id = c.id;
        env.violate(format!(
            "conn {id}: the session asks for a splice while its pipe holds {} bytes",
            pipe.len()
        ));
        return None;
    }
    let limit = limit.min(env.plan.pipe_bytes);
    let mut buf = vec![0u8; env.rng.size(limit)];
    let r = c.klink.session_read(&mut buf);
    if let SockRead::Data(n) = r {
        pipe.extend(&buf[..n]);
        if let Some(s) = c.session.as_mut() {
            s.splice_in_done(&mut env.ctx, n, env.now);
        }
        c.note_backend_bytes(env, n, "splice");
        env.cov.splices += 1;
    }
    Some(r)
}

fn read_into_frame(env: &mut Env, c: &mut Conn) -> bool {
    if !backend_readable(c) {
        return false;
    }
    let Conn { session, klink, .. } = c;
    let Some(s) = session.as_mut() else {
        return false;
    };
    let Some(buf) = s.backend_frame_buf(&mut env.ctx) else {
        return false;
    };
    let n = env.rng.size(buf.len());
    let r = klink.session_read(&mut buf[..n]);
    let got = match r {
        SockRead::Data(k) => k,
        _ => 0,
    };
    s.backend_frame_done(&mut env.ctx, got, env.now);
    c.note_backend_bytes(env, got, "frame read");
    env.cov.frame_reads += u64::from(got > 0);
    backend_outcome(env, c, r)
}

fn read_copy(env: &mut Env, c: &mut Conn) -> bool {
    if !backend_readable(c) {
        return false;
    }
    let Some(s) = c.session.as_ref() else {
        return false;
    };
    let ignore = env.plan.mutation == Some(Mutation::IgnoreReadLimits);
    if !s.want_backend_read(&env.ctx) && !ignore {
        return false;
    }
    let limit = if ignore {
        4 * env.plan.limits().recv_buffer_bytes
    } else {
        s.backend_read_limit(&env.ctx)
    };
    let mut buf = vec![0u8; env.rng.size(limit)];
    match c.klink.session_read(&mut buf) {
        SockRead::Data(n) => {
            c.on_backend_data(env, &buf[..n], false);
            env.cov.copy_reads += 1;
            true
        }
        r => backend_outcome(env, c, r),
    }
}

/// The non-data outcomes of a backend read; true when something happened.
fn backend_outcome(env: &mut Env, c: &mut Conn, r: SockRead) -> bool {
    match r {
        SockRead::Data(_) => true,
        SockRead::Eof => {
            c.backend_gone(env, None);
            true
        }
        SockRead::Failed(e) => {
            c.backend_gone(env, Some(e));
            true
        }
        SockRead::WouldBlock => false,
    }
}
