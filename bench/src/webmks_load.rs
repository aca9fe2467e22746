//! The WebMKS case's load generators: closed-loop ping-pong and bulk
//! transfer over a list of per-session targets. Every appliance session has
//! its own URL (`/proxy/<id>?token=…`), which the benchmark-wide workloads
//! (`workload::ping_pong`, the throughput benchmark) do not take: they
//! point every session at one address. Same shape as those, so the figures
//! compare: a thread per session connects and warms up first (not
//! measured), all start together behind a gate, each stops at its count or
//! byte budget or at the time limit, and any session failing fails the
//! measurement.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::client::{self, Transport};
use crate::procfs;
use crate::throughput::{Direction, Gate, SinkCounter};
use crate::workload::{new_histogram, HIST_LOWEST_US};
use crate::wsproto::{self, PayloadCounter};

/// Read buffer of a downstream client (as the throughput benchmark's).
const DOWN_READ_BYTES: usize = 256 * 1024;
/// Frames pre-encoded per upstream session, each with its own mask.
const UP_FRAMES: usize = 16;
/// After the clients finish sending, how long the sink may take to receive
/// what the appliance still holds; and how long it may stay still.
const UP_DRAIN: Duration = Duration::from_secs(5);
const UP_STILL: Duration = Duration::from_millis(500);
/// Poll period while waiting for the sink.
const SINK_POLL: Duration = Duration::from_millis(5);

/// One closed-loop client session.
pub trait RoundTrip {
    /// Sends one message and waits for its whole echo.
    fn round_trip(&mut self) -> Result<Duration, String>;
}

impl RoundTrip for client::Session {
    fn round_trip(&mut self) -> Result<Duration, String> {
        client::Session::round_trip(self).map_err(|e| e.to_string())
    }
}

impl RoundTrip for crate::wss_client::WssSession {
    fn round_trip(&mut self) -> Result<Duration, String> {
        crate::wss_client::WssSession::round_trip(self)
    }
}

/// Opens session number `id` (run on its own thread).
pub type Connect = Box<dyn FnOnce(u16) -> Result<Box<dyn RoundTrip>, String> + Send>;

#[derive(Debug, Clone)]
pub struct PingPongPlan {
    pub warmup_round_trips: u64,
    pub round_trips: u64,
    /// Measured phase per session, at most (the warm-up has its own).
    pub time_limit: Duration,
    pub io_timeout: Duration,
}

impl PingPongPlan {
    /// How long the coordinator waits for all sessions at each step.
    fn wait_limit(&self) -> Duration {
        self.time_limit * 2 + self.io_timeout * 2
    }
}

pub struct PingPongOutcome {
    /// All sessions' measured round trips, µs.
    pub hist: Histogram<u64>,
    /// Wall time of the measured phase (slowest session).
    pub measured: Duration,
    pub time_limited: bool,
}

enum Ready {
    /// Connected and warmed up; payload bytes of the warm-up.
    Ok(u64),
    Failed(usize, String),
}

/// Spawns one thread per item of `work`, named `name-<i>`.
fn spawn_all<T, R>(
    name: &str,
    work: Vec<T>,
    run: impl Fn(usize, T) -> R + Send + Sync + Clone + 'static,
) -> Result<Vec<std::thread::JoinHandle<R>>, String>
where
    T: Send + 'static,
    R: Send + 'static,
{
    let mut handles = Vec::with_capacity(work.len());
    for (i, w) in work.into_iter().enumerate() {
        let run = run.clone();
        let h = std::thread::Builder::new()
            .name(format!("{name}-{i}"))
            .stack_size(256 * 1024)
            .spawn(move || run(i, w))
            .map_err(|e| format!("spawning thread {i}: {e}"))?;
        handles.push(h);
    }
    Ok(handles)
}

/// Waits for `n` ready messages: the warm-up bytes of all, or the first
/// failure, or a time-out.
fn wait_ready(rx: &mpsc::Receiver<Ready>, n: usize, limit: Duration) -> Result<u64, String> {
    let deadline = Instant::now() + limit;
    let mut warmed = 0;
    for _ in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ready::Ok(b)) => warmed += b,
            Ok(Ready::Failed(id, e)) => return Err(format!("session {id}: {e}")),
            Err(_) => return Err("sessions not ready in time".into()),
        }
    }
    Ok(warmed)
}

/// The closed-loop workload over `connects` (one session each).
pub fn ping_pong(
    connects: Vec<Connect>,
    plan: &PingPongPlan,
    stop: &Arc<AtomicBool>,
) -> Result<PingPongOutcome, String> {
    let n = connects.len();
    let gate = Arc::new(Gate::default());
    let abort = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (g, a, s, p) = (gate.clone(), abort.clone(), stop.clone(), plan.clone());
    let handles = spawn_all("webmks-rt", connects, move |i, connect| {
        one_session(i, connect, &p, &g, &a, &s, &tx)
    })?;
    let ready = wait_ready(&rx, n, plan.wait_limit());
    if ready.is_err() {
        abort.store(true, Ordering::SeqCst);
    }
    gate.open();
    let mut hist = new_histogram();
    let (mut measured, mut time_limited) = (Duration::ZERO, false);
    let mut first_err = ready.err();
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok((hh, m, tl))) => {
                hist.add(&hh)
                    .map_err(|e| format!("merging histograms: {e:?}"))?;
                measured = measured.max(m);
                time_limited |= tl;
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(format!("session {i}: {e}"));
            }
            Err(_) => {
                first_err.get_or_insert(format!("session {i}: thread panicked"));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None if stop.load(Ordering::SeqCst) => Err("interrupted".into()),
        None => Ok(PingPongOutcome {
            hist,
            measured,
            time_limited,
        }),
    }
}

type SessionResult = Result<(Histogram<u64>, Duration, bool), String>;

fn one_session(
    id: usize,
    connect: Connect,
    plan: &PingPongPlan,
    gate: &Gate,
    abort: &AtomicBool,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Ready>,
) -> SessionResult {
    let warm = || -> Result<Box<dyn RoundTrip>, String> {
        let mut s = connect(u16::try_from(id).unwrap_or(u16::MAX))?;
        let deadline = Instant::now() + plan.time_limit;
        for _ in 0..plan.warmup_round_trips {
            if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                break;
            }
            s.round_trip().map_err(|e| format!("warm-up: {e}"))?;
        }
        Ok(s)
    };
    let mut session = match warm() {
        Ok(s) => {
            let _ = tx.send(Ready::Ok(0));
            s
        }
        Err(e) => {
            let _ = tx.send(Ready::Failed(id, e.clone()));
            return Err(e);
        }
    };
    if !gate.wait(plan.wait_limit()) || abort.load(Ordering::SeqCst) {
        return Err("not started".into());
    }
    let mut hist = new_histogram();
    let start = Instant::now();
    let deadline = start + plan.time_limit;
    let mut time_limited = false;
    for _ in 0..plan.round_trips {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if Instant::now() >= deadline {
            time_limited = true;
            break;
        }
        let rtt = session.round_trip()?;
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX);
        hist.saturating_record(us.max(HIST_LOWEST_US));
    }
    Ok((hist, start.elapsed(), time_limited))
}

#[derive(Debug, Clone)]
pub struct TransferPlan {
    pub direction: Direction,
    /// Payload bytes per session before measuring.
    pub warmup: u64,
    /// Measured payload bytes per session.
    pub quota: u64,
    /// Client frame payload (up).
    pub chunk: usize,
    pub time_limit: Duration,
    pub io_timeout: Duration,
}

impl TransferPlan {
    fn wait_limit(&self) -> Duration {
        self.time_limit * 2 + self.io_timeout * 2
    }
}

#[derive(Debug, Clone, Copy)]
pub struct TransferOutcome {
    /// Payload bytes received at the far end in the measured phase.
    pub bytes: u64,
    pub seconds: f64,
    /// CPU seconds of the appliance's process tree over the phase.
    pub proxy_cpu_s: f64,
    pub time_limited: bool,
}

/// Where the far end of an upstream transfer counts.
pub struct Sink<'a> {
    pub counter: &'a SinkCounter,
    pub base: Instant,
}

struct Done {
    bytes: u64,
    end: Instant,
    time_limited: bool,
}

/// Bulk transfer through the appliance (`pid`) over `targets` (WebSocket
/// sessions, one each), in `plan.direction`. Down: the sessions' backends
/// stream on their own, the clients count payload. Up: the clients send
/// masked frames, `sink` counts what arrives.
pub fn transfer(
    targets: Vec<(SocketAddr, Transport)>,
    plan: &TransferPlan,
    pid: u32,
    sink: &Sink<'_>,
    stop: &Arc<AtomicBool>,
) -> Result<TransferOutcome, String> {
    let n = targets.len();
    // The sink is shared by every measurement: count from here.
    let sink_before = sink.counter.bytes.load(Ordering::Relaxed);
    let (start, release) = (Arc::new(Gate::default()), Arc::new(Gate::default()));
    let abort = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let (g, r, a, s, p) = (
        start.clone(),
        release.clone(),
        abort.clone(),
        stop.clone(),
        plan.clone(),
    );
    let handles = spawn_all("webmks-tp", targets, move |i, (addr, transport)| {
        let out = transfer_session(i, addr, &transport, &p, &g, &a, &s, &ready_tx);
        match out {
            Ok(Some(d)) => {
                let _ = done_tx.send(Ok(d));
                // Hold the connection until the appliance's CPU is read.
                r.wait(p.wait_limit());
            }
            Ok(None) => {}
            Err(e) => {
                let _ = done_tx.send(Err(format!("session {i}: {e}")));
            }
        }
    })?;
    let finish = |result: Result<TransferOutcome, String>| {
        if result.is_err() {
            abort.store(true, Ordering::SeqCst);
        }
        start.open();
        release.open();
        for h in handles {
            let _ = h.join();
        }
        result
    };
    let warmed = match wait_ready(&ready_rx, n, plan.wait_limit()) {
        Ok(w) => w,
        Err(e) => return finish(Err(e)),
    };
    let steps = Steps {
        start: &start,
        done_rx: &done_rx,
        n,
        warmed_to: sink_before + warmed,
    };
    finish(measure(plan, pid, sink, &steps))
}

/// The coordinator's side of a transfer whose sessions are ready.
struct Steps<'a> {
    start: &'a Gate,
    done_rx: &'a mpsc::Receiver<Result<Done, String>>,
    n: usize,
    /// The sink's count once the warm-up arrived (up).
    warmed_to: u64,
}

/// From the go to the last byte: the appliance's CPU and what arrived.
fn measure(
    plan: &TransferPlan,
    pid: u32,
    sink: &Sink<'_>,
    steps: &Steps<'_>,
) -> Result<TransferOutcome, String> {
    let (start, done_rx, n) = (steps.start, steps.done_rx, steps.n);
    let counter = sink.counter;
    if plan.direction == Direction::Up {
        // The warm-up must have reached the sink before the baseline.
        let until = Instant::now() + UP_DRAIN;
        while counter.bytes.load(Ordering::Relaxed) < steps.warmed_to && Instant::now() < until {
            std::thread::sleep(SINK_POLL);
        }
    }
    let cpu0 = procfs::tree_cpu(pid);
    let sink0 = counter.bytes.load(Ordering::Relaxed);
    let t0 = Instant::now();
    start.open();
    let (mut sent, mut last_end, mut time_limited) = (0u64, t0, false);
    let deadline = Instant::now() + plan.wait_limit();
    for _ in 0..n {
        let left = deadline.saturating_duration_since(Instant::now());
        match done_rx.recv_timeout(left) {
            Ok(Ok(d)) => {
                sent += d.bytes;
                last_end = last_end.max(d.end);
                time_limited |= d.time_limited;
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("sessions did not finish in time".into()),
        }
    }
    let (bytes, seconds) = match plan.direction {
        Direction::Down => (sent, last_end.duration_since(t0).as_secs_f64()),
        Direction::Up => drain_sink(counter, sink.base, sink0, sent, t0),
    };
    let cpu1 = procfs::tree_cpu(pid);
    if bytes == 0 {
        return Err("no bytes arrived".into());
    }
    Ok(TransferOutcome {
        bytes,
        seconds,
        proxy_cpu_s: (cpu1.cpu_s - cpu0.cpu_s).max(0.0),
        time_limited,
    })
}

/// Waits until the sink has `sent` bytes since `sink0` (or stays still);
/// bytes received and seconds from `t0` to the last one.
fn drain_sink(
    counter: &SinkCounter,
    base: Instant,
    sink0: u64,
    sent: u64,
    t0: Instant,
) -> (u64, f64) {
    let until = Instant::now() + UP_DRAIN;
    let mut last = counter.bytes.load(Ordering::Relaxed);
    let mut still = Instant::now();
    while last - sink0 < sent && Instant::now() < until {
        std::thread::sleep(SINK_POLL);
        let now = counter.bytes.load(Ordering::Relaxed);
        if now != last {
            last = now;
            still = Instant::now();
        } else if still.elapsed() > UP_STILL {
            break;
        }
    }
    let received = counter.bytes.load(Ordering::Relaxed) - sink0;
    let last_ns = counter.last_ns.load(Ordering::Relaxed) as f64;
    let t0_ns = t0.duration_since(base).as_nanos() as f64;
    (received, ((last_ns - t0_ns) / 1e9).max(1e-9))
}

#[allow(clippy::too_many_arguments)]
fn transfer_session(
    id: usize,
    addr: SocketAddr,
    transport: &Transport,
    plan: &TransferPlan,
    start: &Gate,
    abort: &AtomicBool,
    stop: &AtomicBool,
    ready: &mpsc::Sender<Ready>,
) -> Result<Option<Done>, String> {
    let opened = client::open_stream(addr, transport, plan.io_timeout, id as u64);
    let (mut stream, leftover) = match opened {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Ready::Failed(id, e.to_string()));
            return Err(e.to_string());
        }
    };
    let phases = Phases {
        plan,
        start,
        abort,
        stop,
        ready,
        id,
    };
    match plan.direction {
        Direction::Down => down(&mut stream, &leftover, &phases),
        Direction::Up => up(&mut stream, &phases),
    }
}

/// What a transfer session needs to run its two phases.
struct Phases<'a> {
    plan: &'a TransferPlan,
    start: &'a Gate,
    abort: &'a AtomicBool,
    stop: &'a AtomicBool,
    ready: &'a mpsc::Sender<Ready>,
    id: usize,
}

impl Phases<'_> {
    /// `step` (bytes moved; `true` while warming up) until the warm-up is
    /// done, counting `first`; ready; the gate; `step` until the quota,
    /// the time limit or a stop.
    fn run(
        &self,
        first: u64,
        mut step: impl FnMut(bool) -> Result<u64, String>,
    ) -> Result<Option<Done>, String> {
        let p = self.plan;
        let mut got = first;
        let warm_deadline = Instant::now() + p.time_limit;
        while got < p.warmup {
            let late = Instant::now() >= warm_deadline || self.stop.load(Ordering::Relaxed);
            let r = if late {
                Err("warm-up did not finish in time".to_string())
            } else {
                step(true)
            };
            match r {
                Ok(n) => got += n,
                Err(e) => {
                    let _ = self.ready.send(Ready::Failed(self.id, e.clone()));
                    return Err(e);
                }
            }
        }
        let _ = self.ready.send(Ready::Ok(got));
        if !self.start.wait(p.wait_limit()) || self.abort.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let deadline = Instant::now() + p.time_limit;
        let (mut bytes, mut time_limited) = (0u64, false);
        while bytes < p.quota {
            if Instant::now() >= deadline || self.stop.load(Ordering::Relaxed) {
                time_limited = true;
                break;
            }
            bytes += step(false)?;
        }
        Ok(Some(Done {
            bytes,
            end: Instant::now(),
            time_limited,
        }))
    }
}

fn down(
    stream: &mut TcpStream,
    leftover: &[u8],
    phases: &Phases<'_>,
) -> Result<Option<Done>, String> {
    let mut counter = PayloadCounter::default();
    let first = counter.feed(leftover).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; DOWN_READ_BYTES];
    phases.run(first, |warm| {
        let n = stream.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(if warm {
                "closed during warm-up"
            } else {
                "closed by the appliance"
            }
            .into());
        }
        counter.feed(&buf[..n]).map_err(|e| e.to_string())
    })
}

fn up(stream: &mut TcpStream, phases: &Phases<'_>) -> Result<Option<Done>, String> {
    let chunk = phases.plan.chunk;
    let payload: Vec<u8> = (0..chunk).map(|i| (i % 253) as u8).collect();
    let mut next_mask = client::mask_source(phases.id as u64);
    let mut out = Vec::with_capacity(UP_FRAMES * (chunk + wsproto::MAX_CLIENT_HEADER));
    let mut frame = vec![0u8; chunk + wsproto::MAX_CLIENT_HEADER];
    for _ in 0..UP_FRAMES {
        let n = wsproto::encode_client_frame(wsproto::OP_BINARY, &payload, next_mask(), &mut frame)
            .map_err(|e| e.to_string())?;
        out.extend_from_slice(&frame[..n]);
    }
    let per_write = (UP_FRAMES * chunk) as u64;
    phases.run(0, |_| {
        stream
            .write_all(&out)
            .map_err(|e| format!("write: {e}"))
            .map(|()| per_write)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wss_backend::{Identity, Mode, WssBackend};

    /// Ping-pong over a mix of sessions (a raw TCP echo and the stand-in
    /// host): the driver takes any session kind.
    #[test]
    fn ping_pong_over_mixed_sessions() {
        let mut echo = crate::echo::start().unwrap();
        let id = Identity::generate().unwrap();
        let mut host = WssBackend::start(&id, 1024, 1 << 20).unwrap();
        let tls = id.client_config().unwrap();
        let io = Duration::from_secs(5);
        let (echo_addr, host_addr) = (echo.addr(), host.addr());
        let raw: Connect = Box::new(move |i| {
            client::Session::connect(echo_addr, &Transport::Raw, 10, i, io)
                .map(|s| Box::new(s) as Box<dyn RoundTrip>)
                .map_err(|e| e.to_string())
        });
        let wss: Connect = Box::new(move |i| {
            crate::wss_client::WssSession::connect(host_addr, Mode::Echo.path(), tls, 10, i, io)
                .map(|s| Box::new(s) as Box<dyn RoundTrip>)
        });
        let plan = PingPongPlan {
            warmup_round_trips: 5,
            round_trips: 40,
            time_limit: Duration::from_secs(5),
            io_timeout: io,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let out = ping_pong(vec![raw, wss], &plan, &stop).unwrap();
        assert_eq!(out.hist.len(), 80);
        assert!(!out.time_limited);
        // A session that cannot connect fails the measurement, no hang.
        let dead: Connect = Box::new(|_| Err("refused".into()));
        let err = ping_pong(vec![dead], &plan, &stop).err().unwrap();
        assert!(err.contains("refused"), "{err}");
        host.stop();
        echo.stop();
    }
}
