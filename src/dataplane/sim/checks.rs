//! The invariants, checked after every step and at the end of a run.
//!
//! After each step, per live session: its phase moved only forward along
//! the documented lifecycle; the bytes queued toward the browser and
//! toward the backend stay within `buffer_bytes` plus what one read can
//! bring (plus, on io_uring, the receive completions one batch can hold:
//! the overshoot docs/ARCHITECTURE.md documents), plus a little for
//! control frames and HTTP answers; a finished session wants no reads; an
//! empty relay wants both legs (no stall); the relay counters agree with
//! what the peers saw; and each peer's stream is an exact prefix of what
//! the other sent (no corruption, reordering, duplication). Globally: the
//! handshake gauge counts exactly the sessions in their handshake, the
//! pool lends no more chunks than the live sessions' queues can hold, and
//! none at all when every session is idle.
//!
//! At the end (everything released): the pool's `outstanding` is 0 and
//! the gauge 0; every close code is one the events of that session call
//! for (docs/ARCHITECTURE.md's table); a close after the backend's EOF
//! delivered every backend byte; every claimed admission is CLOSED; the
//! reports agree with what happened.

use super::backend::{RfbServerState, RFB_APPLIANCE_HANDSHAKE_BYTES, RFB_BACKEND_HANDSHAKE_BYTES};
use super::browser::{RequestKind, RfbClient, Subprotocol, RFB_FROM_APPLIANCE, RFB_FROM_BROWSER};
use super::plan::{IoKind, Mode};
use super::wmks::WsServerState;
use super::world::{Conn, Env, World};
use crate::dataplane::router::TOMBSTONE_MS;
use crate::dataplane::session::Phase;
use crate::mailbox::{ticket_state, FromWorker};
use crate::protocol::websocket::close_code;

/// Bytes queued toward the browser beyond the relay bound that are not
/// relayed data: the 101 or an HTTP error answer, a close frame, a
/// heartbeat ping (each well under 512 bytes).
const CONTROL_SLACK_BYTES: usize = 1024;
/// wss: what one read can bring toward the browser grows by TLS record
/// overhead (22 bytes per record in TLS 1.3): at worst a read of 6-byte
/// pings becomes 24-byte records of pongs, 4 times its size. The server's
/// handshake flight adds about 1 KiB.
const TLS_EXPANSION: usize = 4;
const TLS_SLACK_BYTES: usize = 2048;
/// wss, toward the backend: a read of `recv_buffer_bytes` can complete a
/// TLS record begun by earlier reads, whose plaintext (up to 16 KiB) then
/// comes out at once. So "one read" brings up to a read plus a record.
const TLS_RECORD_PLAINTEXT_BYTES: usize = 16 * 1024;

/// Can a session go from `from` to `to` (in one or more transitions)?
/// Sniff → Handshake → Connecting → Relay → Closing → Done, and
/// Handshake → Responding → Done; any phase may end at Done.
pub fn reachable(from: Phase, to: Phase) -> bool {
    use Phase::*;
    match from {
        Sniff => true,
        Handshake => to != Sniff,
        Connecting => matches!(to, Connecting | Relay | Closing | Done),
        Relay => matches!(to, Relay | Closing | Done),
        Closing => matches!(to, Closing | Done),
        Responding => matches!(to, Responding | Done),
        Done => to == Done,
    }
}

/// The most bytes a queue may hold: `buffer_bytes`, plus one read (epoll)
/// or one read and a batch of completions (io_uring), plus control frames;
/// on wss (`tls`, toward the browser) with the TLS overhead of all that.
pub fn queue_bound(env: &Env, tls: bool, webmks: bool) -> usize {
    let l = env.plan.limits();
    let reads = match env.plan.io {
        IoKind::Epoll => 1,
        IoKind::Uring => 1 + env.plan.recv_completions_per_batch,
    };
    // WebMKS: the backend's bytes are TLS records too, so one read can
    // complete a record begun earlier (as toward the backend on wss).
    let read = l.recv_buffer_bytes
        + if webmks {
            TLS_RECORD_PLAINTEXT_BYTES
        } else {
            0
        };
    if tls {
        l.buffer_bytes + TLS_EXPANSION * reads * read + TLS_SLACK_BYTES
    } else {
        l.buffer_bytes + reads * read + CONTROL_SLACK_BYTES
    }
}

/// The same toward the backend (plaintext, but on wss a read may finish a
/// TLS record).
pub fn queue_bound_up(env: &Env, tls: bool) -> usize {
    let l = env.plan.limits();
    let reads = match env.plan.io {
        IoKind::Epoll => 1,
        IoKind::Uring => 1 + env.plan.recv_completions_per_batch,
    };
    let record = if tls { TLS_RECORD_PLAINTEXT_BYTES } else { 0 };
    l.buffer_bytes + reads * (l.recv_buffer_bytes + record) + CONTROL_SLACK_BYTES
}

/// Chunks a queue of `bytes` can need when each chunk but the ends holds
/// at least `per_chunk` bytes (frames are packed, see
/// `Session::push_browser`; bulk frames take a chunk each but alternate
/// with full reads).
fn chunks_for(bytes: usize, per_chunk: usize) -> usize {
    bytes.div_ceil(per_chunk.max(1)) + 3
}

/// WebMKS, once the session is closing: the last whole frame received
/// (from `from` on) may end in zeros where the session padded a frame it
/// was relaying half-way (so its close frame can follow a whole frame).
fn padded_tail(got: &[u8], at: usize, from: Option<usize>) -> bool {
    from.is_some_and(|f| at >= f && got[at..].iter().all(|&b| b == 0))
}

/// Check that `got` is a prefix of `sent`, comparing from `checked` on
/// (`usize::MAX`: a padded last frame ended the stream, see
/// `padded_tail`).
fn prefix(
    got: &[u8],
    sent: &[u8],
    checked: &mut usize,
    what: &str,
    pad_from: Option<usize>,
) -> Result<(), String> {
    if *checked == usize::MAX {
        // (A padded last frame was accepted: nothing may follow it.)
        return Ok(());
    }
    if let Some(i) = got
        .iter()
        .zip(sent)
        .skip(*checked)
        .position(|(a, b)| a != b)
    {
        if padded_tail(got, *checked + i, pad_from) {
            *checked = usize::MAX;
            return Ok(());
        }
    }
    if got.len() > sent.len() {
        return Err(format!(
            "{what}: {} bytes received, only {} sent (duplication)",
            got.len(),
            sent.len()
        ));
    }
    let from = (*checked).min(got.len());
    if let Some(i) = got[from..]
        .iter()
        .zip(&sent[from..got.len()])
        .position(|(a, b)| a != b)
    {
        let at = from + i;
        let window = |v: &[u8]| hex(&v[at.saturating_sub(8)..(at + 8).min(v.len())]);
        return Err(format!(
            "{what}: byte {at} of {} is {:#04x}, the sender sent {:#04x} (corruption or \
             reordering); received around it: {}, sent: {}",
            got.len(),
            got[at],
            sent[at],
            window(got),
            window(sent)
        ));
    }
    *checked = got.len();
    Ok(())
}

/// The per-step invariants; violations go to `world.env`.
pub fn after_step(world: &mut World) {
    let env = &mut world.env;
    let bound = queue_bound(env, false, false);
    let chunk = env.ctx.pool.chunk_bytes();
    let l = env.plan.limits().clone();
    let bulk_possible = env.plan.io == IoKind::Uring && l.splice_min_bytes > 0;
    let down_per_chunk = if bulk_possible {
        (chunk / 2).min((l.splice_min_bytes / 2).max(1))
    } else {
        chunk / 2
    };
    let (mut handshaking, mut chunks, mut live, mut all_idle) = (0, 0, 0, true);
    for c in &mut world.conns {
        let problems = check_conn(env, c);
        for p in problems {
            env.violate(p);
        }
        let Some(s) = c.session.as_ref() else {
            continue;
        };
        // The session's own pairs (they panic in a build with debug
        // assertions, which the simulation's builds have).
        s.check_invariants(&env.ctx);
        live += 1;
        let phase = s.phase();
        if matches!(phase, Phase::Sniff | Phase::Handshake) {
            handshaking += 1;
        }
        let down = s.browser_pending_len();
        // (WebMKS: TLS records, bounded like wss's queue toward the backend.)
        let unknown_up = if c.webmks {
            queue_bound_up(env, true)
        } else {
            bound
        };
        let up = queued_up(c).unwrap_or(unknown_up);
        let buffer = env.plan.limits().buffer_bytes;
        if down >= buffer {
            env.cov.full_down_steps += 1;
            env.cov.max_over_down = env.cov.max_over_down.max((down - buffer) as u64);
        }
        if let Some(up) = queued_up(c).filter(|&u| u >= buffer) {
            env.cov.full_up_steps += 1;
            env.cov.max_over_up = env.cov.max_over_up.max((up - buffer) as u64);
        }
        let lent = usize::from(c.uring.bulk_in_flight());
        chunks += chunks_for(down, down_per_chunk) + chunks_for(up, chunk / 2) + lent;
        let idle = phase == Phase::Relay
            && down == 0
            && up == 0
            && s.backend_pending().is_empty()
            && lent == 0;
        all_idle &= idle;
    }
    let gauge = env.ctx.handshakes.current();
    if gauge != handshaking {
        env.violate(format!(
            "the handshake gauge says {gauge}, {handshaking} live sessions are in their handshake"
        ));
    }
    let out = env.ctx.pool.outstanding;
    if out > chunks {
        env.violate(format!(
            "the pool lent {out} chunks; the live sessions' queues can hold at most {chunks}"
        ));
    }
    if all_idle && out > 0 {
        env.violate(format!(
            "{out} pool chunks lent while all {live} live sessions are idle (an idle session must hold no buffer)"
        ));
    }
}

/// Where the relayed streams start: with the appliance's own RFB
/// security phase, each peer's stream begins with handshake bytes that
/// are not relayed (the session counts neither).
#[derive(Debug, Clone, Copy, Default)]
struct Offsets {
    /// Browser's received payload / backend's sent bytes.
    down: (usize, usize),
    /// Backend's received bytes / browser's sent payload.
    up: (usize, usize),
    /// Bytes the session sends the backend that it does not count in
    /// `bytes_up` (its version, choice, response, and the ClientInit).
    up_uncounted: u64,
}

fn offsets(c: &Conn) -> Offsets {
    if !c.rfb {
        return Offsets::default();
    }
    Offsets {
        down: (RFB_FROM_APPLIANCE.len(), RFB_BACKEND_HANDSHAKE_BYTES),
        // The ClientInit is the first relayed byte on both sides.
        up: (RFB_APPLIANCE_HANDSHAKE_BYTES, RFB_FROM_BROWSER.len() - 1),
        up_uncounted: (RFB_APPLIANCE_HANDSHAKE_BYTES + 1) as u64,
    }
}

/// The security phase failed (the backend refused the appliance): no
/// relay stream follows the handshake bytes.
fn rfb_refused(c: &Conn) -> bool {
    c.browser.rfb == Some(RfbClient::Refused)
        || c.backend
            .rfb
            .as_ref()
            .is_some_and(|r| r.state == RfbServerState::Refused)
}

fn hex(v: &[u8]) -> String {
    v.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn tail(v: &[u8], from: usize) -> &[u8] {
    &v[from.min(v.len())..]
}

/// Bytes queued toward the backend, known exactly until the session
/// starts closing (then its queue only shrinks); with the RFB phase, only
/// once its bytes went out.
fn queued_up(c: &Conn) -> Option<usize> {
    // WebMKS: the queue holds TLS records, not the relayed bytes (the
    // session's own check_invariants bounds it).
    if c.webmks {
        return None;
    }
    let s = c.session.as_ref()?;
    let o = offsets(c);
    let pre_close = matches!(
        s.phase(),
        Phase::Handshake | Phase::Connecting | Phase::Relay
    );
    (pre_close && c.sent_to_backend >= o.up_uncounted)
        .then(|| (s.bytes_up + o.up_uncounted).saturating_sub(c.sent_to_backend) as usize)
}

/// WebMKS: where each direction's last whole frame starts, once the
/// session is closing (it may be padded, see `padded_tail`).
fn pad_from(c: &Conn) -> (Option<usize>, Option<usize>) {
    let closing = !matches!(
        c.phase(),
        Some(Phase::Sniff | Phase::Handshake | Phase::Connecting | Phase::Relay)
    );
    if !c.webmks || !closing {
        return (None, None);
    }
    let up = c.backend.ws.as_ref().map(|w| w.last_frame_at);
    (Some(c.browser.last_frame_at), up)
}

fn check_conn(env: &Env, c: &mut Conn) -> Vec<String> {
    let down_bound = queue_bound(env, c.tls, c.webmks);
    let bound = queue_bound_up(env, c.tls);
    let mut v = Vec::new();
    let id = c.id;
    let o = offsets(c);
    let (pad_down, pad_up) = pad_from(c);
    if !rfb_refused(c) {
        if let Err(e) = prefix(
            tail(&c.browser.received, o.down.0),
            tail(&c.backend.sent, o.down.1),
            &mut c.checked_down,
            "downstream",
            pad_down,
        ) {
            v.push(format!("conn {id}: {e}"));
        }
        if let Err(e) = prefix(
            tail(&c.backend.received, o.up.0),
            tail(&c.browser.sent_payload, o.up.1),
            &mut c.checked_up,
            "upstream",
            pad_up,
        ) {
            v.push(format!("conn {id}: {e}"));
        }
    }
    let Some(s) = c.session.as_ref() else {
        return v;
    };
    let ctx = &env.ctx;
    let phase = s.phase();
    if !reachable(c.last_phase, phase) {
        v.push(format!(
            "conn {id}: illegal phase change {:?} -> {phase:?}",
            c.last_phase
        ));
    }
    c.last_phase = phase;
    let down = s.browser_pending_len();
    if down > down_bound {
        v.push(format!(
            "conn {id}: {down} bytes queued toward the browser, bound {down_bound} ({phase:?})"
        ));
    }
    if !c.webmks && s.bytes_up + o.up_uncounted < c.sent_to_backend {
        v.push(format!(
            "conn {id}: {} bytes sent to the backend, {} relayed",
            c.sent_to_backend, s.bytes_up
        ));
    }
    if let Some(up) = queued_up(c) {
        if up > bound {
            v.push(format!(
                "conn {id}: {up} bytes queued toward the backend, bound {bound} ({phase:?})"
            ));
        }
    }
    if phase == Phase::Done && (s.want_browser_read(ctx) || s.want_backend_read(ctx)) {
        v.push(format!("conn {id}: a finished session still wants to read"));
    }
    let empty = down == 0 && queued_up(c) == Some(0) && s.backend_pending().is_empty();
    if phase == Phase::Relay && empty && !(s.want_browser_read(ctx) && s.want_backend_read(ctx)) {
        v.push(format!(
            "conn {id}: an empty relay does not want to read (browser: {}, backend: {}): stalled",
            s.want_browser_read(ctx),
            s.want_backend_read(ctx)
        ));
    }
    {
        // (Both layers splice: io_uring through the same pipe model.)
        let in_pipe = c.epoll.pipe.as_ref().map_or(0, |p| p.len());
        if s.pipe_bytes() != in_pipe {
            v.push(format!(
                "conn {id}: the session counts {} bytes in the pipe, the pipe holds {in_pipe}",
                s.pipe_bytes()
            ));
        }
    }
    // (A padded last frame counts only up to its start.)
    let received = if c.checked_down == usize::MAX {
        c.browser.last_frame_at as u64
    } else {
        tail(&c.browser.received, o.down.0).len() as u64
    };
    let sent = tail(&c.backend.sent, o.down.1).len() as u64;
    if !rfb_refused(c) && (s.bytes_down < received || s.bytes_down > sent) {
        v.push(format!(
            "conn {id}: bytes_down {} outside [{received} the browser got, {sent} the backend sent]",
            s.bytes_down
        ));
    }
    // (With the RFB phase the ClientInit is relayed but not counted.)
    let payload = tail(&c.browser.sent_payload, o.up.1 + usize::from(c.rfb)).len() as u64;
    // (WebMKS: the IO layer sends TLS records, more than the frames.)
    let over_io = !c.webmks && (c.backend.received.len() as u64) > c.sent_to_backend;
    if s.bytes_up > payload || over_io {
        v.push(format!(
            "conn {id}: bytes_up {} (browser sent {payload}, IO layer sent {}, backend got {})",
            s.bytes_up,
            c.sent_to_backend,
            c.backend.received.len()
        ));
    }
    v
}

/// After settling with the clock stopped and both peers answering: every
/// relay with live peers delivered everything both ways, and its VNC
/// security phase is over.
pub fn after_settle(world: &mut World) {
    let mut problems = Vec::new();
    for c in &world.conns {
        let Some(s) = c.session.as_ref() else {
            continue;
        };
        let peers_live = !c.browser.gone
            && !c.backend.gone
            && c.backend.accepted()
            && !c.blink.peer_fin
            && !c.klink.peer_fin;
        if s.phase() != Phase::Relay || !peers_live {
            continue;
        }
        let id = c.id;
        let ws_state = c.backend.ws.as_ref().map(|w| w.state);
        if ws_state == Some(WsServerState::Upgrade) {
            problems.push(format!(
                "conn {id}: the WebMKS upgrade stalls with both peers answering"
            ));
            continue;
        }
        if ws_state == Some(WsServerState::Closing) {
            // (Its close frame is on its way: the session is about to close.)
            continue;
        }
        if c.rfb && !rfb_refused(c) {
            let over = c.browser.rfb == Some(RfbClient::Done)
                && c.backend
                    .rfb
                    .as_ref()
                    .is_some_and(|r| r.state == RfbServerState::Relay);
            if !over {
                problems.push(format!(
                    "conn {id}: the VNC security phase stalls with both peers answering \
                     (browser at {:?}, backend at {:?})",
                    c.browser.rfb,
                    c.backend.rfb.as_ref().map(|r| r.state)
                ));
                continue;
            }
        }
        let o = offsets(c);
        let down = (
            tail(&c.browser.received, o.down.0).len(),
            tail(&c.backend.sent, o.down.1).len(),
        );
        let up = (
            tail(&c.backend.received, o.up.0).len(),
            tail(&c.browser.sent_payload, o.up.1).len(),
        );
        if down.0 != down.1 || up.0 != up.1 {
            problems.push(format!(
                "conn {id}: the relay stalls with both peers answering: the browser got {} of {} \
                 bytes, the backend {} of {} ({} queued for the browser, {} for the backend)",
                down.0,
                down.1,
                up.0,
                up.1,
                s.browser_pending_len(),
                s.backend_pending().len()
            ));
        }
    }
    for p in problems {
        world.env.violate(p);
    }
}

/// When conn `i`'s browser has just read its HTTP status: is it one the
/// request and what happened allow (docs/ARCHITECTURE.md's table)?
pub fn status_if_new(world: &mut World, i: usize) {
    let c = &world.conns[i];
    let Some(status) = c.browser.status else {
        return;
    };
    if c.status_checked {
        return;
    }
    let (id, kind, k, bound) = (c.id, c.browser.kind, c.admission, c.bound);
    let env = &world.env;
    let l = env.plan.limits();
    // A VMware console passes binary frames: base64 is refused.
    let base64_refused = c.webmks && c.browser.proto == Subprotocol::Base64;
    let mut ok: Vec<u16> = match kind {
        RequestKind::Good if base64_refused => vec![400],
        RequestKind::Good => vec![101],
        RequestKind::BadTicket => vec![403],
        RequestKind::UnknownSession => vec![404],
        RequestKind::NotHttp => vec![400],
        RequestKind::BadVersion => vec![426],
        RequestKind::Slow => vec![408],
        RequestKind::Oversize => vec![431],
    };
    if env.ms_since(c.started) >= l.handshake_timeout_ms {
        ok.push(408);
    }
    if let (Mode::Appliance, Some(k)) = (env.plan.mode, k) {
        if kind == RequestKind::Good {
            if world.admission_state(k) != ticket_state::PENDING {
                ok.push(403);
            }
            if env.now >= world.admission_expires_at(k) {
                ok.push(410);
            }
        }
        let forgotten = world
            .admission_finished_at(k)
            .is_some_and(|t| env.now >= t + std::time::Duration::from_millis(TOMBSTONE_MS));
        if forgotten && !bound {
            ok.push(404);
        }
    }
    let mut problems = Vec::new();
    if !ok.contains(&status) {
        problems.push(format!(
            "conn {id}: HTTP {status} for a {kind:?} request (expected one of {ok:?})"
        ));
    }
    if status == 101 {
        if let Some(k) = k {
            if !world.admission_opened_by(k, id) {
                problems.push(format!(
                    "conn {id}: a second 101 for admission {:#x}",
                    world.admission_id(k)
                ));
            }
        }
    }
    world.conns[i].status_checked = true;
    for p in problems {
        world.env.violate(p);
    }
}

/// The end of a run: nothing leaked, every session closed as documented.
pub fn at_end(world: &mut World) -> Result<(), String> {
    let env = &world.env;
    let out = env.ctx.pool.outstanding;
    if out != 0 {
        return Err(format!(
            "leak: {out} pool chunks still lent after every session was released"
        ));
    }
    let gauge = env.ctx.handshakes.current();
    if gauge != 0 {
        return Err(format!(
            "leak: the handshake gauge is {gauge} with no session left"
        ));
    }
    for c in &world.conns {
        end_of_conn(c)?;
    }
    for k in 0..world.admission_count() {
        let st = world.admission_state(k);
        let id = world.admission_id(k);
        if st == ticket_state::CLAIMED {
            return Err(format!(
                "admission {id:#x} still CLAIMED after its session ended"
            ));
        }
        if world.admission_was_opened(k).is_some() && st != ticket_state::CLOSED {
            return Err(format!(
                "admission {id:#x} was opened but is in state {st}, not CLOSED"
            ));
        }
    }
    check_reports(world)?;
    for c in &world.conns {
        let served = c.bound && c.browser.status == Some(101);
        if let (true, Some(k)) = (served, c.admission) {
            let aid = world.admission_id(k);
            if !world.ended_bound().contains(&aid) {
                return Err(format!(
                    "conn {}: its dedicated listener ({aid:#x}) was never reported done",
                    c.id
                ));
            }
        }
    }
    Ok(())
}

fn end_of_conn(c: &Conn) -> Result<(), String> {
    let id = c.id;
    let code = c.close_info.as_ref().and_then(|i| i.code);
    if let Some(code) = code {
        let allowed = c.allowed_codes.contains(&code) || c.browser.codes_caused.contains(&code);
        if !allowed {
            return Err(format!(
                "conn {id}: closed with {code} ({:?}), but what happened calls for {:?}",
                c.close_info,
                [c.allowed_codes.clone(), c.browser.codes_caused.clone()].concat()
            ));
        }
    }
    if let Some(frame_code) = c.browser.close_got {
        if frame_code.is_none() || frame_code != code {
            return Err(format!(
                "conn {id}: the close frame said {frame_code:?}, the session recorded {code:?}"
            ));
        }
    }
    let backend_eof = c
        .close_info
        .as_ref()
        .is_some_and(|i| i.code == Some(close_code::NORMAL) && i.reason == "backend closed");
    // (With the RFB phase: once it is over on both sides.)
    let relayed = !c.rfb
        || (c.browser.rfb == Some(RfbClient::Done)
            && c.backend
                .rfb
                .as_ref()
                .is_some_and(|r| r.state == RfbServerState::Relay));
    let o = offsets(c);
    let (got, sent) = (
        tail(&c.browser.received, o.down.0),
        tail(&c.backend.sent, o.down.1),
    );
    let whole = !c.backend.truncated && c.checked_down != usize::MAX;
    if backend_eof && relayed && whole && c.browser.close_got.is_some() && got != sent {
        return Err(format!(
            "conn {id}: closed after the backend's EOF, but the browser got {} of the {} bytes the backend sent",
            got.len(),
            sent.len()
        ));
    }
    Ok(())
}

fn check_reports(world: &World) -> Result<(), String> {
    let dropped = world
        .env
        .ctx
        .metrics
        .error_count(crate::cause::Cause::EventsDropped);
    for k in 0..world.admission_count() {
        let id = world.admission_id(k);
        let opened = world
            .reports()
            .iter()
            .filter(|r| matches!(r, FromWorker::Opened { id: x, .. } if *x == id))
            .count();
        let closed: Vec<Option<u16>> = world
            .reports()
            .iter()
            .filter_map(|r| match r {
                FromWorker::Closed { id: x, code, .. } if *x == id => Some(*code),
                _ => None,
            })
            .collect();
        if opened > 1 || closed.len() > 1 {
            return Err(format!(
                "admission {id:#x}: {opened} Opened and {} Closed reports",
                closed.len()
            ));
        }
        let claimant = world
            .conns
            .iter()
            .find(|c| c.admission == Some(k) && world.admission_was_opened(k) == Some(c.id));
        if let (Some(c), Some(code)) = (claimant, closed.first()) {
            let recorded = c.close_info.as_ref().and_then(|i| i.code);
            if *code != recorded {
                return Err(format!(
                    "admission {id:#x}: Closed report says {code:?}, the session closed with {recorded:?}"
                ));
            }
        }
        if dropped == 0 && claimant.is_some() && (opened != 1 || closed.len() != 1) {
            return Err(format!(
                "admission {id:#x}: no report was dropped, yet {opened} Opened and {} Closed arrived",
                closed.len()
            ));
        }
    }
    Ok(())
}
