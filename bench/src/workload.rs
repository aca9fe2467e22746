//! Workloads: what the clients do against a proxy. For now one: closed-loop
//! request/response latency ("ping-pong"), N sessions on their own threads,
//! each sending one small message and waiting for its echo before the next.
//!
//! Closed loop means a slow reply delays the next request, so these are
//! round-trip latencies under at most N outstanding messages, not an
//! open-loop (fixed-rate) latency curve; that workload comes later.
//!
//! Every loop is bounded by a count and by a deadline, and stops early when
//! the run is interrupted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::client::{Session, Transport};

/// Histogram range in microseconds: 1 µs .. 60 s, 3 significant digits.
pub const HIST_LOWEST_US: u64 = 1;
pub const HIST_HIGHEST_US: u64 = 60_000_000;
pub const HIST_SIGFIG: u8 = 3;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_SIGFIG)
        .expect("static histogram bounds are valid")
}

#[derive(Debug, Clone)]
pub struct PingPongConfig {
    pub sessions: usize,
    pub message_bytes: usize,
    /// Round trips per session before measuring (discarded).
    pub warmup_round_trips: u64,
    /// Measured round trips per session, at most.
    pub round_trips: u64,
    /// Measured phase, at most (warm-up has the same bound of its own).
    pub time_limit: Duration,
    pub io_timeout: Duration,
}

pub struct PingPongOutcome {
    /// All sessions' measured round trips, in µs.
    pub hist: Histogram<u64>,
    /// Wall time of the measured phase (slowest session).
    pub measured: Duration,
    /// Whether some session hit the time limit before its count.
    pub time_limited: bool,
}

/// Lets every session finish connecting and warming up before any starts
/// measuring, so N sessions really overlap. Unlike `std::sync::Barrier` it
/// has a timeout, and parties that never arrive (a thread that failed to
/// spawn) can be cancelled, so it cannot hang the run.
struct StartGate {
    waiting_for: Mutex<usize>,
    cv: Condvar,
}

impl StartGate {
    fn new(parties: usize) -> StartGate {
        StartGate {
            waiting_for: Mutex::new(parties),
            cv: Condvar::new(),
        }
    }

    fn cancel(&self, parties: usize) {
        let mut w = self.waiting_for.lock().unwrap_or_else(|p| p.into_inner());
        *w = w.saturating_sub(parties);
        if *w == 0 {
            self.cv.notify_all();
        }
    }

    fn arrive_and_wait(&self, timeout: Duration) {
        let mut w = self.waiting_for.lock().unwrap_or_else(|p| p.into_inner());
        *w = w.saturating_sub(1);
        if *w == 0 {
            self.cv.notify_all();
            return;
        }
        let _ = self
            .cv
            .wait_timeout_while(w, timeout, |w| *w > 0)
            .unwrap_or_else(|p| p.into_inner());
    }
}

struct SessionResult {
    hist: Histogram<u64>,
    measured: Duration,
    time_limited: bool,
}

/// Runs the closed-loop workload against `addr`. Any session failing fails
/// the whole measurement (the first error is returned, with its session).
pub fn ping_pong(
    addr: SocketAddr,
    transport: &Transport,
    cfg: &PingPongConfig,
    stop: &Arc<AtomicBool>,
) -> Result<PingPongOutcome, String> {
    if cfg.sessions == 0 || cfg.sessions > usize::from(u16::MAX) {
        return Err(format!("session count {} out of range", cfg.sessions));
    }
    let gate = Arc::new(StartGate::new(cfg.sessions));
    // Time a session may spend connecting + warming up before the others stop
    // waiting for it.
    let gate_timeout = cfg.time_limit + cfg.io_timeout * 2;
    let mut handles = Vec::with_capacity(cfg.sessions);
    for id in 0..cfg.sessions {
        let (g, s, c, t) = (gate.clone(), stop.clone(), cfg.clone(), transport.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("session-{id}"))
            .stack_size(256 * 1024)
            .spawn(move || run_session(id as u16, addr, &t, &c, &g, gate_timeout, &s));
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                gate.cancel(cfg.sessions - id);
                for h in handles {
                    let _ = h.join();
                }
                return Err(format!("spawning session thread {id}: {e}"));
            }
        }
    }
    let mut hist = new_histogram();
    let mut measured = Duration::ZERO;
    let mut time_limited = false;
    let mut first_err = None;
    for (id, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(r)) => {
                hist.add(&r.hist)
                    .map_err(|e| format!("merging histograms: {e:?}"))?;
                measured = measured.max(r.measured);
                time_limited |= r.time_limited;
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(format!("session {id}: {e}"));
            }
            Err(_) => {
                first_err.get_or_insert(format!("session {id}: thread panicked"));
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if stop.load(Ordering::SeqCst) {
        return Err("interrupted".into());
    }
    Ok(PingPongOutcome {
        hist,
        measured,
        time_limited,
    })
}

fn run_session(
    id: u16,
    addr: SocketAddr,
    transport: &Transport,
    cfg: &PingPongConfig,
    gate: &StartGate,
    gate_timeout: Duration,
    stop: &AtomicBool,
) -> Result<SessionResult, String> {
    let prepared = prepare(id, addr, transport, cfg, stop);
    // Arrive even on failure, so the others are not kept waiting.
    gate.arrive_and_wait(gate_timeout);
    let mut session = prepared?;

    let mut hist = new_histogram();
    let start = Instant::now();
    let deadline = start + cfg.time_limit;
    let mut time_limited = false;
    for _ in 0..cfg.round_trips {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if Instant::now() >= deadline {
            time_limited = true;
            break;
        }
        let rtt = session.round_trip().map_err(|e| e.to_string())?;
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        hist.saturating_record(us.max(HIST_LOWEST_US));
    }
    Ok(SessionResult {
        hist,
        measured: start.elapsed(),
        time_limited,
    })
}

fn prepare(
    id: u16,
    addr: SocketAddr,
    transport: &Transport,
    cfg: &PingPongConfig,
    stop: &AtomicBool,
) -> Result<Session, String> {
    let mut s = Session::connect(addr, transport, cfg.message_bytes, id, cfg.io_timeout)
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + cfg.time_limit;
    for _ in 0..cfg.warmup_round_trips {
        if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
            break;
        }
        s.round_trip().map_err(|e| format!("warm-up: {e}"))?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_pong_against_echo_and_relay() {
        let mut echo = crate::echo::start().unwrap();
        let mut relay = crate::relay::start(echo.addr(), Duration::from_secs(2)).unwrap();
        let cfg = PingPongConfig {
            sessions: 3,
            message_bytes: 10,
            warmup_round_trips: 5,
            round_trips: 50,
            time_limit: Duration::from_secs(5),
            io_timeout: Duration::from_secs(2),
        };
        let stop = Arc::new(AtomicBool::new(false));
        for addr in [echo.addr(), relay.addr()] {
            let out = ping_pong(addr, &Transport::Raw, &cfg, &stop).unwrap();
            assert_eq!(out.hist.len(), 150);
            assert!(!out.time_limited);
        }
        relay.stop();
        echo.stop();
    }

    #[test]
    fn a_dead_server_fails_the_measurement_without_hanging() {
        let port = crate::child::free_port().unwrap();
        let cfg = PingPongConfig {
            sessions: 2,
            message_bytes: 10,
            warmup_round_trips: 1,
            round_trips: 1,
            time_limit: Duration::from_secs(1),
            io_timeout: Duration::from_millis(500),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let err = ping_pong(([127, 0, 0, 1], port).into(), &Transport::Raw, &cfg, &stop)
            .err()
            .unwrap();
        assert!(err.contains("connect"), "{err}");
    }
}
