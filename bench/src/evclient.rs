//! Event-driven clients (mio, one thread) for the benchmarks that hold or
//! churn thousands of connections, where a thread per session would be the
//! bottleneck: [`IdleClient`] opens N sessions, holds them silent, and
//! probes which are still live; [`churn_handshakes`] connects, upgrades and
//! closes as fast as it can.
//!
//! Every phase is bounded by a deadline (and the handshake churn by a
//! count); a connection that does not progress is given up and counted
//! with its reason, never waited on forever.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

use crate::client::Transport;
use crate::wsproto::{self, UpgradeResponse};

/// Longest upgrade response accepted.
const MAX_RESPONSE: usize = 4096;
/// Payload of a liveness probe: the session index, echoed back.
const PROBE_BYTES: usize = 8;
/// How long one poll call may block, so deadlines and the stop flag are seen.
const POLL_SLICE: Duration = Duration::from_millis(50);

/// A fixed request key: every session may use the same one (the proxy only
/// has to answer it correctly), which keeps SHA-1 out of the client's loop.
const KEY_RAW: [u8; 16] = *b"consolegate-benc";

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Unused,
    Connecting,
    Upgrading,
    Idle,
    Probing,
    Live,
    Dead,
}

struct Slot {
    stream: Option<TcpStream>,
    state: State,
    /// Request bytes written so far, then response/probe bytes read.
    sent: usize,
    rx: Vec<u8>,
    started: Option<Instant>,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            stream: None,
            state: State::Unused,
            sent: 0,
            rx: Vec::new(),
            started: None,
        }
    }
}

/// Counts of why sessions were lost, by reason.
pub type Reasons = BTreeMap<String, u64>;

fn bump(reasons: &mut Reasons, why: impl Into<String>) {
    *reasons.entry(why.into()).or_default() += 1;
}

/// Short, stable error kinds for the reason counts (not full messages,
/// which carry addresses).
fn kind(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("{:?} (os error {code})", e.kind()),
        None => format!("{:?}", e.kind()),
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct OpenStats {
    pub requested: usize,
    pub established: usize,
    pub failed: usize,
    pub reasons: Reasons,
    pub elapsed_s: f64,
    /// Opening ended because nothing progressed for the stall timeout.
    pub stalled: bool,
    /// Opening ended at its deadline.
    pub timed_out: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ProbeStats {
    pub probed: usize,
    pub live: usize,
    /// Sessions found closed before or during the probe, by reason.
    pub reasons: Reasons,
    pub elapsed_s: f64,
}

struct Wire {
    websocket: bool,
    request: Vec<u8>,
    key: String,
}

impl Wire {
    fn new(addr: SocketAddr, transport: &Transport) -> Wire {
        match transport {
            Transport::Raw => Wire {
                websocket: false,
                request: Vec::new(),
                key: String::new(),
            },
            Transport::WebSocket { path, subprotocol } => {
                let key = wsproto::encode_key(KEY_RAW);
                let request =
                    wsproto::upgrade_request(&addr.to_string(), path, &key, subprotocol.as_deref())
                        .into_bytes();
                Wire {
                    websocket: true,
                    request,
                    key,
                }
            }
        }
    }
}

/// Outcome of driving one slot after an event.
enum Step {
    Pending,
    Done,
    Failed(String),
}

/// Drives connect → upgrade as far as the socket allows.
fn drive_handshake(slot: &mut Slot, wire: &Wire) -> Step {
    let Some(stream) = slot.stream.as_mut() else {
        return Step::Failed("no socket".into());
    };
    if slot.state == State::Connecting {
        match stream.take_error() {
            Ok(Some(e)) | Err(e) => return Step::Failed(format!("connect: {}", kind(&e))),
            Ok(None) => {}
        }
        match stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Step::Pending,
            Err(e) => return Step::Failed(format!("connect: {}", kind(&e))),
        }
        if !wire.websocket {
            return Step::Done;
        }
        slot.state = State::Upgrading;
        slot.sent = 0;
    }
    // Write what is left of the request.
    while slot.sent < wire.request.len() {
        match stream.write(&wire.request[slot.sent..]) {
            Ok(0) => return Step::Failed("upgrade: write returned 0".into()),
            Ok(n) => slot.sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Pending,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Step::Failed(format!("upgrade write: {}", kind(&e))),
        }
    }
    // Read the response until the headers are complete. Bounded by
    // MAX_RESPONSE: every successful read grows `rx`.
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Step::Failed("closed during the upgrade".into()),
            Ok(n) => {
                slot.rx.extend_from_slice(&buf[..n]);
                match wsproto::check_upgrade_response(&slot.rx, &wire.key) {
                    Ok(UpgradeResponse::Accepted { .. }) => {
                        slot.rx = Vec::new();
                        return Step::Done;
                    }
                    Ok(UpgradeResponse::Partial) if slot.rx.len() < MAX_RESPONSE => continue,
                    Ok(UpgradeResponse::Partial) => {
                        return Step::Failed("upgrade response too long".into())
                    }
                    Err(e) => {
                        let short: String = e.chars().take(60).collect();
                        return Step::Failed(format!("upgrade: {short}"));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Pending,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Step::Failed(format!("upgrade read: {}", kind(&e))),
        }
    }
}

/// N sessions opened through a proxy and held silent.
pub struct IdleClient {
    poll: Poll,
    events: Events,
    slots: Vec<Slot>,
    wire: Wire,
    addr: SocketAddr,
    /// Sessions lost while idle, by reason.
    pub lost_while_idle: Reasons,
    /// Bytes proxies sent to idle sessions (e.g. keepalive pings).
    pub unexpected_bytes: u64,
}

impl IdleClient {
    pub fn new(addr: SocketAddr, transport: &Transport) -> io::Result<IdleClient> {
        Ok(IdleClient {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            slots: Vec::new(),
            wire: Wire::new(addr, transport),
            addr,
            lost_while_idle: Reasons::new(),
            unexpected_bytes: 0,
        })
    }

    pub fn idle_count(&self) -> usize {
        self.slots.iter().filter(|s| s.state == State::Idle).count()
    }

    fn kill(&mut self, idx: usize) {
        let s = &mut self.slots[idx];
        if let Some(mut st) = s.stream.take() {
            let _ = self.poll.registry().deregister(&mut st);
        }
        s.state = State::Dead;
        s.rx = Vec::new();
    }

    /// Opens `n` sessions, at most `concurrency` handshakes in flight. Ends
    /// when all are open or failed, at `timeout`, or after `stall` without
    /// any progress; sessions still opening then are closed and counted.
    pub fn open(
        &mut self,
        n: usize,
        concurrency: usize,
        timeout: Duration,
        stall: Duration,
        stop: &AtomicBool,
    ) -> io::Result<OpenStats> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut stats = OpenStats {
            requested: n,
            ..OpenStats::default()
        };
        self.slots = (0..n).map(|_| Slot::empty()).collect();
        let mut next = 0usize;
        let mut in_flight = 0usize;
        let mut last_progress = Instant::now();
        loop {
            // Start connections up to the concurrency limit.
            while next < n && in_flight < concurrency.max(1) {
                let idx = next;
                next += 1;
                match TcpStream::connect(self.addr) {
                    Ok(mut st) => {
                        let _ = st.set_nodelay(true);
                        self.poll.registry().register(
                            &mut st,
                            Token(idx),
                            Interest::READABLE | Interest::WRITABLE,
                        )?;
                        let s = &mut self.slots[idx];
                        s.stream = Some(st);
                        s.state = State::Connecting;
                        in_flight += 1;
                    }
                    Err(e) => {
                        bump(&mut stats.reasons, format!("connect: {}", kind(&e)));
                        self.slots[idx].state = State::Dead;
                        stats.failed += 1;
                        last_progress = Instant::now();
                    }
                }
            }
            if in_flight == 0 && next >= n {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                stats.timed_out = true;
                break;
            }
            if now.duration_since(last_progress) >= stall {
                stats.stalled = true;
                break;
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let wait = POLL_SLICE.min(deadline - now);
            match self.poll.poll(&mut self.events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let tokens: Vec<usize> = self.events.iter().map(|e| e.token().0).collect();
            for idx in tokens {
                if idx >= self.slots.len() {
                    continue;
                }
                match self.slots[idx].state {
                    State::Connecting | State::Upgrading => {
                        match drive_handshake(&mut self.slots[idx], &self.wire) {
                            Step::Pending => {}
                            Step::Done => {
                                in_flight -= 1;
                                stats.established += 1;
                                last_progress = Instant::now();
                                let s = &mut self.slots[idx];
                                s.state = State::Idle;
                                if let Some(st) = s.stream.as_mut() {
                                    self.poll.registry().reregister(
                                        st,
                                        Token(idx),
                                        Interest::READABLE,
                                    )?;
                                }
                            }
                            Step::Failed(why) => {
                                in_flight -= 1;
                                stats.failed += 1;
                                last_progress = Instant::now();
                                bump(&mut stats.reasons, why);
                                self.kill(idx);
                            }
                        }
                    }
                    State::Idle => self.on_idle_event(idx),
                    _ => {}
                }
            }
        }
        // Give up on what is still opening, and on what was never started.
        for idx in 0..self.slots.len() {
            match self.slots[idx].state {
                State::Connecting | State::Upgrading => {
                    bump(&mut stats.reasons, "handshake not finished in time");
                    stats.failed += 1;
                    self.kill(idx);
                }
                State::Unused => {
                    bump(&mut stats.reasons, "not attempted (opening stopped)");
                    stats.failed += 1;
                    self.slots[idx].state = State::Dead;
                }
                _ => {}
            }
        }
        // Sessions that died while others were still opening count as
        // established-then-lost: they are in `lost_while_idle`.
        stats.elapsed_s = start.elapsed().as_secs_f64();
        Ok(stats)
    }

    fn on_idle_event(&mut self, idx: usize) {
        let mut buf = [0u8; 512];
        // Bounded: a proxy flooding an idle session is cut off after 64 KiB.
        for _ in 0..128 {
            let Some(st) = self.slots[idx].stream.as_mut() else {
                return;
            };
            match st.read(&mut buf) {
                Ok(0) => {
                    bump(&mut self.lost_while_idle, "closed by the proxy while idle");
                    self.kill(idx);
                    return;
                }
                Ok(n) => self.unexpected_bytes += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    bump(
                        &mut self.lost_while_idle,
                        format!("idle read: {}", kind(&e)),
                    );
                    self.kill(idx);
                    return;
                }
            }
        }
    }

    /// Handles whatever happens to idle sessions for `d` (a peer closing,
    /// a keepalive arriving).
    pub fn pump(&mut self, d: Duration) -> io::Result<()> {
        let deadline = Instant::now() + d;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(());
            }
            match self
                .poll
                .poll(&mut self.events, Some(POLL_SLICE.min(deadline - now)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let tokens: Vec<usize> = self.events.iter().map(|e| e.token().0).collect();
            for idx in tokens {
                if idx < self.slots.len() && self.slots[idx].state == State::Idle {
                    self.on_idle_event(idx);
                }
            }
        }
    }

    /// Sends every idle session a small message and waits for its echo from
    /// the backend through the proxy: a session is live only if both legs
    /// still work. At most `concurrency` probes in flight; `timeout` bounds
    /// the whole probe.
    pub fn probe(&mut self, concurrency: usize, timeout: Duration) -> io::Result<ProbeStats> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut stats = ProbeStats {
            reasons: self.lost_while_idle.clone(),
            ..ProbeStats::default()
        };
        let candidates: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].state == State::Idle)
            .collect();
        let mut next = 0usize;
        let mut in_flight = 0usize;
        let mut frame = [0u8; PROBE_BYTES + wsproto::MAX_CLIENT_HEADER];
        loop {
            while next < candidates.len() && in_flight < concurrency.max(1) {
                let idx = candidates[next];
                next += 1;
                if self.slots[idx].state != State::Idle {
                    continue; // died meanwhile (already counted)
                }
                stats.probed += 1;
                let payload = (idx as u64).to_le_bytes();
                let len = if self.wire.websocket {
                    let mask = [idx as u8, 0x5a, (idx >> 8) as u8, 0xa5];
                    wsproto::encode_client_frame(wsproto::OP_BINARY, &payload, mask, &mut frame)
                        .map_err(|e| io::Error::other(e.to_string()))?
                } else {
                    frame[..PROBE_BYTES].copy_from_slice(&payload);
                    PROBE_BYTES
                };
                let Some(st) = self.slots[idx].stream.as_mut() else {
                    continue;
                };
                match st.write(&frame[..len]) {
                    Ok(n) if n == len => {
                        let s = &mut self.slots[idx];
                        s.state = State::Probing;
                        s.rx.clear();
                        in_flight += 1;
                    }
                    Ok(_) => {
                        bump(&mut stats.reasons, "probe: short write");
                        self.kill(idx);
                    }
                    Err(e) => {
                        bump(&mut stats.reasons, format!("probe write: {}", kind(&e)));
                        self.kill(idx);
                    }
                }
            }
            if in_flight == 0 && next >= candidates.len() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match self
                .poll
                .poll(&mut self.events, Some(POLL_SLICE.min(deadline - now)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let tokens: Vec<usize> = self.events.iter().map(|e| e.token().0).collect();
            for idx in tokens {
                if idx >= self.slots.len() {
                    continue;
                }
                match self.slots[idx].state {
                    State::Idle => {
                        self.on_idle_event(idx);
                        if self.slots[idx].state == State::Dead {
                            // Counted in lost_while_idle, now part of the probe's view.
                            bump(&mut stats.reasons, "closed by the proxy while idle");
                        }
                    }
                    State::Probing => match self.read_probe(idx) {
                        Step::Pending => {}
                        Step::Done => {
                            in_flight -= 1;
                            stats.live += 1;
                            self.slots[idx].state = State::Live;
                            self.slots[idx].rx = Vec::new();
                        }
                        Step::Failed(why) => {
                            in_flight -= 1;
                            bump(&mut stats.reasons, why);
                            self.kill(idx);
                        }
                    },
                    _ => {}
                }
            }
        }
        for idx in 0..self.slots.len() {
            if self.slots[idx].state == State::Probing {
                bump(&mut stats.reasons, "no echo before the probe deadline");
                self.kill(idx);
            }
        }
        // Live sessions go back to idle (they may be probed again).
        for s in &mut self.slots {
            if s.state == State::Live {
                s.state = State::Idle;
            }
        }
        stats.elapsed_s = start.elapsed().as_secs_f64();
        Ok(stats)
    }

    fn read_probe(&mut self, idx: usize) -> Step {
        let websocket = self.wire.websocket;
        let s = &mut self.slots[idx];
        let Some(st) = s.stream.as_mut() else {
            return Step::Failed("no socket".into());
        };
        let mut buf = [0u8; 256];
        let mut eof = false;
        loop {
            match st.read(&mut buf) {
                Ok(0) => {
                    // The echo may have come with the close: judge it first.
                    eof = true;
                    break;
                }
                Ok(n) => {
                    if s.rx.len() + n > 4096 {
                        return Step::Failed("probe: too much data back".into());
                    }
                    s.rx.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Step::Failed(format!("probe read: {}", kind(&e))),
            }
        }
        let expected = (idx as u64).to_le_bytes();
        let payload = if websocket {
            match ws_payload(&s.rx) {
                Ok(p) => p,
                Err(e) => return Step::Failed(format!("probe: {e}")),
            }
        } else {
            s.rx.clone()
        };
        if payload.len() < PROBE_BYTES {
            return if eof {
                Step::Failed("closed during the probe".into())
            } else {
                Step::Pending
            };
        }
        if payload[..] == expected[..] {
            Step::Done
        } else {
            Step::Failed("probe: echo differs".into())
        }
    }
}

/// The data payload of the complete server frames in `buf` (pings and pongs
/// skipped); stops at an incomplete frame.
pub fn ws_payload(buf: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(h) = wsproto::parse_header(&buf[at..]).map_err(|e| e.to_string())? {
        let end = at + h.header_len + h.payload_len as usize;
        if end > buf.len() {
            break;
        }
        let mut p = buf[at + h.header_len..end].to_vec();
        if let Some(m) = h.mask {
            wsproto::apply_mask(&mut p, m, 0);
        }
        match h.opcode {
            wsproto::OP_BINARY | wsproto::OP_CONTINUATION | wsproto::OP_TEXT => {
                out.extend_from_slice(&p)
            }
            wsproto::OP_PING | wsproto::OP_PONG => {}
            wsproto::OP_CLOSE => return Err("close frame".into()),
            op => return Err(format!("opcode {op:#x}")),
        }
        at = end;
    }
    Ok(out)
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChurnStats {
    pub completed: u64,
    pub failed: u64,
    /// In flight when the time limit ended the run.
    pub unfinished: u64,
    pub reasons: Reasons,
    pub elapsed_s: f64,
    /// The run stopped at its count (false: at its time limit or on errors).
    pub count_reached: bool,
}

/// Most failures tolerated before a churn gives up (a dead proxy).
const MAX_CHURN_FAILURES: u64 = 1000;

/// Connect → upgrade (101 checked) → close, `concurrency` at a time, until
/// `count` have completed or `time_limit` passed. For raw transport (the
/// plain relay) the "handshake" is connect plus one echoed byte, which
/// proves the backend leg was opened. Records each handshake's duration
/// (µs, connect to 101) into `hist`.
pub fn churn_handshakes(
    addr: SocketAddr,
    transport: &Transport,
    concurrency: usize,
    count: u64,
    time_limit: Duration,
    hist: &mut Histogram<u64>,
    stop: &AtomicBool,
) -> io::Result<ChurnStats> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let wire = Wire::new(addr, transport);
    let conc = concurrency.max(1);
    let mut slots: Vec<Slot> = (0..conc).map(|_| Slot::empty()).collect();
    let mut stats = ChurnStats::default();
    let start = Instant::now();
    let deadline = start + time_limit;
    let mut started: u64 = 0;
    let mut in_flight = 0usize;
    loop {
        // (Re)start idle slots.
        for (idx, s) in slots.iter_mut().enumerate() {
            if s.stream.is_some() || started >= count {
                continue;
            }
            if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
                break;
            }
            started += 1;
            match TcpStream::connect(addr) {
                Ok(mut st) => {
                    let _ = st.set_nodelay(true);
                    poll.registry().register(
                        &mut st,
                        Token(idx),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    s.stream = Some(st);
                    s.state = State::Connecting;
                    s.sent = 0;
                    s.rx.clear();
                    s.started = Some(Instant::now());
                    in_flight += 1;
                }
                Err(e) => {
                    stats.failed += 1;
                    bump(&mut stats.reasons, format!("connect: {}", kind(&e)));
                }
            }
        }
        if in_flight == 0 {
            stats.count_reached = started >= count && stats.completed + stats.failed >= count;
            break;
        }
        let now = Instant::now();
        if now >= deadline || stop.load(Ordering::Relaxed) || stats.failed >= MAX_CHURN_FAILURES {
            break;
        }
        match poll.poll(&mut events, Some(POLL_SLICE.min(deadline - now))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            let idx = ev.token().0;
            let Some(s) = slots.get_mut(idx) else {
                continue;
            };
            if s.stream.is_none() {
                continue;
            }
            let step = match s.state {
                State::Connecting | State::Upgrading => match drive_handshake(s, &wire) {
                    Step::Done if !wire.websocket => {
                        // Raw: one byte out, wait for it to come back.
                        s.state = State::Probing;
                        match s.stream.as_mut().map(|st| st.write(b"x")) {
                            Some(Ok(1)) => raw_echo(s),
                            _ => Step::Failed("raw: write".into()),
                        }
                    }
                    other => other,
                },
                State::Probing => raw_echo(s),
                _ => Step::Pending,
            };
            match step {
                Step::Pending => continue,
                Step::Done => {
                    stats.completed += 1;
                    if let Some(t) = s.started {
                        let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                        hist.saturating_record(us.max(1));
                    }
                }
                Step::Failed(why) => {
                    stats.failed += 1;
                    bump(&mut stats.reasons, why);
                }
            }
            // Close (dropping deregisters) and free the slot.
            s.stream = None;
            s.state = State::Unused;
            in_flight -= 1;
        }
    }
    // Cut off by the time limit (or the stop flag): neither done nor failed.
    stats.unfinished = slots.iter().filter(|s| s.stream.is_some()).count() as u64;
    stats.elapsed_s = start.elapsed().as_secs_f64();
    Ok(stats)
}

fn raw_echo(s: &mut Slot) -> Step {
    let Some(st) = s.stream.as_mut() else {
        return Step::Failed("no socket".into());
    };
    let mut b = [0u8; 16];
    loop {
        match st.read(&mut b) {
            Ok(0) => return Step::Failed("raw: closed".into()),
            Ok(_) => return Step::Done,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Pending,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Step::Failed(format!("raw read: {}", kind(&e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn ws_payload_skips_control_frames_and_waits_for_whole_frames() {
        let mut buf = vec![0x89, 2, b'h', b'i']; // ping
        buf.extend_from_slice(&[0x02, 3, 1, 2, 3]);
        buf.extend_from_slice(&[0x80, 5, 4, 5]); // incomplete continuation
        assert_eq!(ws_payload(&buf).unwrap(), vec![1, 2, 3]);
        buf.extend_from_slice(&[6, 7, 8]);
        assert_eq!(ws_payload(&buf).unwrap(), vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(ws_payload(&[0x88, 0]).is_err());
    }

    /// A tiny WebSocket echo server: answers every upgrade, then echoes
    /// each frame's payload as one server frame; closes the connections
    /// whose index is in `close`.
    fn ws_server(conns: usize, close: Vec<usize>) -> (SocketAddr, std::thread::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = std::thread::spawn(move || {
            let mut held = Vec::new();
            for i in 0..conns {
                let (mut s, _) = l.accept().unwrap();
                wsproto::answer_upgrade(&mut s);
                if close.contains(&i) {
                    drop(s);
                } else {
                    held.push(s);
                }
            }
            for mut s in held {
                let mut hdr = [0u8; 6];
                if s.read_exact(&mut hdr).is_err() {
                    continue;
                }
                let h = wsproto::parse_header(&hdr).unwrap().unwrap();
                let mut p = vec![0u8; h.payload_len as usize];
                s.read_exact(&mut p).unwrap();
                wsproto::apply_mask(&mut p, h.mask.unwrap(), 0);
                let mut out = vec![0x82, p.len() as u8];
                out.extend_from_slice(&p);
                s.write_all(&out).unwrap();
            }
        });
        (addr, h)
    }

    #[test]
    fn idle_client_opens_holds_and_probes() {
        let (addr, server) = ws_server(5, vec![1, 3]);
        let t = Transport::WebSocket {
            path: "/".into(),
            subprotocol: None,
        };
        let stop = AtomicBool::new(false);
        let mut c = IdleClient::new(addr, &t).unwrap();
        let open = c
            .open(5, 2, Duration::from_secs(10), Duration::from_secs(5), &stop)
            .unwrap();
        assert_eq!((open.established, open.failed), (5, 0), "{open:?}");
        c.pump(Duration::from_millis(200)).unwrap();
        let probe = c.probe(4, Duration::from_secs(5)).unwrap();
        assert_eq!(probe.live, 3, "{probe:?}");
        assert_eq!(probe.reasons.values().sum::<u64>(), 2, "{probe:?}");
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn idle_client_gives_up_on_a_silent_server() {
        // Accepts (the kernel does) but never answers the upgrade.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let t = Transport::WebSocket {
            path: "/".into(),
            subprotocol: None,
        };
        let stop = AtomicBool::new(false);
        let mut c = IdleClient::new(l.local_addr().unwrap(), &t).unwrap();
        let t0 = Instant::now();
        let open = c
            .open(
                3,
                3,
                Duration::from_secs(10),
                Duration::from_millis(300),
                &stop,
            )
            .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(open.stalled);
        assert_eq!((open.established, open.failed), (0, 3));
    }

    #[test]
    fn churn_counts_handshakes_and_respects_the_count() {
        let (addr, server) = ws_server(7, (0..7).collect());
        let t = Transport::WebSocket {
            path: "/".into(),
            subprotocol: None,
        };
        let stop = AtomicBool::new(false);
        let mut h = crate::workload::new_histogram();
        let s = churn_handshakes(addr, &t, 3, 7, Duration::from_secs(10), &mut h, &stop).unwrap();
        assert_eq!((s.completed, s.failed), (7, 0), "{s:?}");
        assert!(s.count_reached);
        assert_eq!(h.len(), 7);
        server.join().unwrap();
    }
}
