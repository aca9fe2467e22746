//! `events`: the appliance's live event fan-out. N WebSocket subscribers
//! on `/ws/monitor` (one mio thread holds them all), then rounds of one
//! real event each: a demo session is created and deleted through the
//! REST API, and its `session_closed` event must reach every subscriber.
//!
//! Per run: the delivery latency (from the DELETE request being sent to
//! the event's arrival in each subscriber's socket, by the kernel's
//! receive timestamp, SO_TIMESTAMPNS; HdrHistogram, µs), the latency to
//! the bench having read it (which adds the bench's one reading thread
//! working through N sockets), the appliance's
//! CPU per event (its CPU time over the rounds / rounds, and the same for
//! rounds with no subscriber, so the fan-out's share shows), and memory
//! per idle subscriber (RSS after N subscribers connected and settled,
//! minus before, / N). Medians over runs; a fresh appliance per run.
//!
//! Bounded: subscribers, rounds and runs are counted, every wait has a
//! deadline, connects are paced (at most [`MAX_CONNECTING`] in their
//! handshake at once).

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

use crate::appliance;
use crate::common::Common;
use crate::procfs;
use crate::rest::{HttpMode, RestClient};
use crate::stats::median;
use crate::wsproto::{self, UpgradeResponse};

/// Subscribers in their handshake at once (the listen backlog is finite).
const MAX_CONNECTING: usize = 256;
/// How long one poll may block, so deadlines and the stop flag are seen.
const POLL_SLICE: Duration = Duration::from_millis(20);
/// Largest buffered input per subscriber before it is given up.
const MAX_RX_BYTES: usize = 1 << 20;
/// Time to let the appliance settle before reading its RSS.
const SETTLE: Duration = Duration::from_millis(1_000);
/// The fixed request key (every subscriber may use the same one).
const KEY_RAW: [u8; 16] = *b"consolegate-evnt";
/// How long all subscribers may take to receive one event, by default.
pub const DEFAULT_ROUND_TIMEOUT_MS: u64 = 10_000;
/// How long all subscribers may take to connect, by default.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 120_000;

#[derive(clap::Args, Debug, Clone)]
pub struct EventsOpts {
    /// Subscriber counts, one measurement each.
    #[arg(
        long = "event-subscribers",
        value_delimiter = ',',
        default_value = "1000,10000"
    )]
    pub subscribers: Vec<usize>,
    /// Events (rounds) per run.
    #[arg(long = "event-rounds", default_value_t = 50)]
    pub rounds: usize,
    /// Runs per subscriber count (medians are reported).
    #[arg(long = "event-runs", default_value_t = 3)]
    pub runs: usize,
    /// How long all subscribers may take to receive one event.
    #[arg(long = "event-round-timeout-ms", default_value_t = DEFAULT_ROUND_TIMEOUT_MS)]
    pub round_timeout_ms: u64,
    /// How long all subscribers may take to connect.
    #[arg(long = "event-connect-timeout-ms", default_value_t = DEFAULT_CONNECT_TIMEOUT_MS)]
    pub connect_timeout_ms: u64,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    pub subscribers: usize,
    pub rounds: usize,
    /// Until the event is in the subscriber's socket (kernel timestamp).
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Until the bench has read it (adds the bench's own reading).
    pub read_p50_us: f64,
    pub read_p99_us: f64,
    /// Appliance CPU per event with N subscribers (ms).
    pub cpu_ms_per_event: f64,
    /// Appliance CPU per create + delete with no subscriber (ms).
    pub cpu_ms_per_trigger_alone: f64,
    pub rss_kib_before: u64,
    pub rss_kib_after: u64,
    pub rss_bytes_per_subscriber: f64,
    pub load_average_1m: Option<f64>,
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    Upgrading,
    Open,
}

#[derive(Debug, Clone, Copy)]
struct Arrival {
    arrived: Option<SystemTime>,
    read: Instant,
}

struct Subscriber {
    stream: TcpStream,
    phase: Phase,
    rx: Vec<u8>,
    welcomed: bool,
    /// When the current round's event arrived.
    /// The round's event: when it arrived (kernel timestamp, wall clock)
    /// and when the bench read it.
    got: Option<Arrival>,
    /// The kernel timestamp of the latest bytes read.
    last_arrival: Option<SystemTime>,
}

/// All subscribers, on one poll.
struct Fleet {
    poll: Poll,
    subs: Vec<Subscriber>,
    key: String,
    request: Vec<u8>,
    /// The current round's session id, searched for in each message.
    needle: Vec<u8>,
    failed: usize,
}

impl Fleet {
    fn new(control: SocketAddr, token: &str) -> Result<Fleet> {
        let key = wsproto::encode_key(KEY_RAW);
        let request = wsproto::upgrade_request(
            &control.to_string(),
            &format!("/ws/monitor?token={token}"),
            &key,
            None,
        )
        .into_bytes();
        Ok(Fleet {
            poll: Poll::new()?,
            subs: Vec::new(),
            key,
            request,
            needle: Vec::new(),
            failed: 0,
        })
    }

    fn connect_one(&mut self, control: SocketAddr) -> io::Result<()> {
        let mut stream = TcpStream::connect(control)?;
        nix::sys::socket::setsockopt(
            &stream,
            nix::sys::socket::sockopt::ReceiveTimestampns,
            &true,
        )
        .map_err(io::Error::from)?;
        let token = Token(self.subs.len());
        self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.subs.push(Subscriber {
            stream,
            phase: Phase::Connecting,
            rx: Vec::new(),
            welcomed: false,
            got: None,
            last_arrival: None,
        });
        Ok(())
    }

    fn welcomed(&self) -> usize {
        self.subs.iter().filter(|s| s.welcomed).count()
    }

    /// Connect `n` subscribers, at most [`MAX_CONNECTING`] in their
    /// handshake at once; all must be welcomed within `timeout`.
    fn connect_all(
        &mut self,
        control: SocketAddr,
        n: usize,
        timeout: Duration,
        stop: &AtomicBool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut events = Events::with_capacity(1024);
        while self.welcomed() < n {
            if Instant::now() > deadline || stop.load(Ordering::Relaxed) {
                bail!(
                    "{} of {n} subscribers welcomed within {timeout:?}",
                    self.welcomed()
                );
            }
            if self.failed > 0 {
                bail!("{} subscribers failed while connecting", self.failed);
            }
            let in_flight = self.subs.len() - self.welcomed();
            for _ in in_flight..MAX_CONNECTING {
                if self.subs.len() >= n {
                    break;
                }
                self.connect_one(control)
                    .context("connecting a subscriber")?;
            }
            self.pump(&mut events)?;
        }
        Ok(())
    }

    /// One poll: handshakes, then frames.
    fn pump(&mut self, events: &mut Events) -> Result<()> {
        self.poll.poll(events, Some(POLL_SLICE))?;
        for event in events.iter() {
            let index = event.token().0;
            if let Err(e) = self.service(index, event.is_writable()) {
                self.failed += 1;
                eprintln!("events: subscriber {index}: {e}");
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut self.subs[index].stream);
            }
        }
        Ok(())
    }

    fn service(&mut self, index: usize, writable: bool) -> Result<(), String> {
        let sub = &mut self.subs[index];
        if sub.phase == Phase::Connecting {
            if !writable {
                return Ok(());
            }
            if let Some(e) = sub.stream.take_error().map_err(|e| e.to_string())? {
                return Err(format!("connect: {e}"));
            }
            match sub.stream.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(format!("connect: {e}")),
            }
            // The request is a few hundred bytes: one write takes it.
            sub.stream
                .write_all(&self.request)
                .map_err(|e| format!("upgrade request: {e}"))?;
            let _ = sub.stream.set_nodelay(true);
            sub.phase = Phase::Upgrading;
        }
        let mut buf = [0u8; 16 * 1024];
        loop {
            match read_stamped(&sub.stream, &mut buf) {
                Ok((0, _)) => return Err("closed by the appliance".into()),
                Ok((n, arrived)) => {
                    sub.rx.extend_from_slice(&buf[..n]);
                    sub.last_arrival = arrived.or(sub.last_arrival);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
            if sub.rx.len() > MAX_RX_BYTES {
                return Err("too much unread input".into());
            }
        }
        if sub.phase == Phase::Upgrading {
            match wsproto::check_upgrade_response(&sub.rx, &self.key)? {
                UpgradeResponse::Partial => return Ok(()),
                UpgradeResponse::Accepted { body_offset } => {
                    sub.rx.drain(..body_offset);
                    sub.phase = Phase::Open;
                }
            }
        }
        // Read once this subscriber's bytes are in: one poll returns up
        // to 1 024 ready subscribers, and the last of them is read well
        // after the poll returned (one clock per poll made every
        // subscriber of a batch look as early as its first).
        let arrival = Arrival {
            arrived: sub.last_arrival,
            read: Instant::now(),
        };
        frames(sub, &self.needle, arrival)
    }

    /// Wait until every subscriber has the current round's event.
    fn await_round(&mut self, timeout: Duration, stop: &AtomicBool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut events = Events::with_capacity(1024);
        loop {
            let missing = self.subs.iter().filter(|s| s.got.is_none()).count();
            if missing == 0 {
                return Ok(());
            }
            if Instant::now() > deadline || stop.load(Ordering::Relaxed) {
                bail!(
                    "{missing} of {} subscribers did not get the event within {timeout:?}",
                    self.subs.len()
                );
            }
            if self.failed > 0 {
                bail!("{} subscribers failed", self.failed);
            }
            self.pump(&mut events)?;
        }
    }
}

/// Take the complete frames out of `sub.rx`: the welcome, and the round's
/// event (found by its session id).
fn frames(sub: &mut Subscriber, needle: &[u8], now: Arrival) -> Result<(), String> {
    loop {
        let Some(h) = wsproto::parse_header(&sub.rx).map_err(|e| format!("{e:?}"))? else {
            return Ok(());
        };
        let len = usize::try_from(h.payload_len).map_err(|_| "huge frame".to_string())?;
        let end = h.header_len + len;
        if sub.rx.len() < end {
            return Ok(());
        }
        let payload = &sub.rx[h.header_len..end];
        if h.opcode == 0x8 {
            return Err(format!("closed: {}", String::from_utf8_lossy(payload)));
        }
        if !sub.welcomed && contains(payload, b"\"welcome\"") {
            sub.welcomed = true;
        } else if sub.got.is_none() && !needle.is_empty() && contains(payload, needle) {
            sub.got = Some(now);
        }
        sub.rx.drain(..end);
    }
}

/// Read what is there, with the kernel's receive timestamp of the last
/// segment read (SO_TIMESTAMPNS; None if the kernel gave none).
fn read_stamped(stream: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, Option<SystemTime>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut space = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    let mut arrived = None;
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmTimestampns(ts) = cmsg {
            let since_epoch = Duration::new(
                u64::try_from(ts.tv_sec()).unwrap_or(0),
                u32::try_from(ts.tv_nsec()).unwrap_or(0),
            );
            arrived = Some(UNIX_EPOCH + since_epoch);
        }
    }
    Ok((msg.bytes, arrived))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn rss_kib(pid: u32) -> Result<u64> {
    procfs::status_kib(pid)
        .and_then(|m| m.get("VmRSS").copied())
        .ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))
}

fn cpu_s(pid: u32) -> f64 {
    procfs::tree_cpu(pid).cpu_s
}

/// Create a demo session; its id.
fn create(rest: &mut RestClient) -> Result<String> {
    let r = rest
        .post_json(
            "/api/v1/sessions",
            r#"{"target":{"kind":"demo"},"user":"bench-events"}"#,
        )
        .map_err(|e| anyhow!("POST /api/v1/sessions: {e}"))?;
    if r.status != 201 {
        bail!("POST /api/v1/sessions: {} {}", r.status, r.body_excerpt());
    }
    let v: serde_json::Value = serde_json::from_slice(&r.body)?;
    v["session_id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no session_id in {}", r.body_excerpt()))
}

fn delete(rest: &mut RestClient, id: &str) -> Result<()> {
    let r = rest
        .delete(&format!("/api/v1/sessions/{id}"))
        .map_err(|e| anyhow!("DELETE: {e}"))?;
    if r.status != 200 && r.status != 204 {
        bail!(
            "DELETE /api/v1/sessions/{id}: {} {}",
            r.status,
            r.body_excerpt()
        );
    }
    Ok(())
}

/// One run: a fresh appliance, N subscribers, the rounds.
fn run_once(
    common: &Common,
    opts: &EventsOpts,
    n: usize,
    run: usize,
    stop: &AtomicBool,
) -> Result<RunFigures> {
    let dir = common.out_dir.join(format!("events-{n}-{run}"));
    let extra = format!(
        "\n[events]\nmax_subscribers = {}\nsubscriber_queue_events = 256\nvm_refresh_interval_ms = 0\n",
        n + 16
    );
    let mut app = appliance::start_with(
        &common.consolegate,
        &dir,
        &dir.join("state"),
        "epoll",
        16,
        &dir.join("appliance.log"),
        Duration::from_millis(common.startup_timeout_ms),
        &extra,
    )?;
    let result = measure(common, opts, n, &app, stop);
    if result.is_err() {
        eprintln!("events: appliance log tail:\n{}", app.log_tail());
    }
    app.stop();
    result
}

fn measure(
    common: &Common,
    opts: &EventsOpts,
    n: usize,
    app: &appliance::RunningAppliance,
    stop: &AtomicBool,
) -> Result<RunFigures> {
    let pid = app
        .pid()
        .ok_or_else(|| anyhow!("the appliance has no pid"))?;
    let io_timeout = Duration::from_millis(common.io_timeout_ms);
    let mut rest = RestClient::new(app.control, &app.token, HttpMode::KeepAlive, io_timeout);
    rest.preconnect().map_err(|e| anyhow!("control API: {e}"))?;
    // The trigger alone (create + delete, nobody listening).
    let cpu0 = cpu_s(pid);
    for _ in 0..opts.rounds {
        let id = create(&mut rest)?;
        delete(&mut rest, &id)?;
    }
    let alone_ms = (cpu_s(pid) - cpu0) * 1000.0 / opts.rounds as f64;
    std::thread::sleep(SETTLE);
    let rss_before = rss_kib(pid)?;
    let mut fleet = Fleet::new(app.control, &app.token)?;
    fleet.connect_all(
        app.control,
        n,
        Duration::from_millis(opts.connect_timeout_ms),
        stop,
    )?;
    let settle_until = Instant::now() + SETTLE;
    let mut events = Events::with_capacity(1024);
    while Instant::now() < settle_until {
        fleet.pump(&mut events)?;
    }
    let rss_after = rss_kib(pid)?;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut read_histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let cpu1 = cpu_s(pid);
    for _ in 0..opts.rounds {
        let id = create(&mut rest)?;
        fleet.needle = id.clone().into_bytes();
        for s in &mut fleet.subs {
            s.got = None;
        }
        let sent_wall = SystemTime::now();
        let sent = Instant::now();
        delete(&mut rest, &id)?;
        fleet.await_round(Duration::from_millis(opts.round_timeout_ms), stop)?;
        for s in &fleet.subs {
            let Some(got) = s.got else { continue };
            let read_us = got.read.saturating_duration_since(sent).as_micros();
            read_histogram.record(u64::try_from(read_us).unwrap_or(u64::MAX).max(1))?;
            let arrived = got
                .arrived
                .ok_or_else(|| anyhow!("the kernel gave no receive timestamp"))?;
            let us = arrived
                .duration_since(sent_wall)
                .map_or(0, |d| d.as_micros());
            histogram.record(u64::try_from(us).unwrap_or(u64::MAX).max(1))?;
        }
    }
    let per_event_ms = (cpu_s(pid) - cpu1) * 1000.0 / opts.rounds as f64;
    Ok(RunFigures {
        subscribers: n,
        rounds: opts.rounds,
        p50_us: histogram.value_at_quantile(0.50) as f64,
        p99_us: histogram.value_at_quantile(0.99) as f64,
        max_us: histogram.max() as f64,
        read_p50_us: read_histogram.value_at_quantile(0.50) as f64,
        read_p99_us: read_histogram.value_at_quantile(0.99) as f64,
        cpu_ms_per_event: per_event_ms,
        cpu_ms_per_trigger_alone: alone_ms,
        rss_kib_before: rss_before,
        rss_kib_after: rss_after,
        rss_bytes_per_subscriber: (rss_after.saturating_sub(rss_before) * 1024) as f64 / n as f64,
        load_average_1m: procfs::loadavg_1m(),
    })
}

/// The medians of each figure over the runs.
fn medians(runs: &[RunFigures]) -> HashMap<&'static str, f64> {
    let mut out = HashMap::new();
    type Field = fn(&RunFigures) -> f64;
    let fields: [(&'static str, Field); 8] = [
        ("p50_us", |r| r.p50_us),
        ("p99_us", |r| r.p99_us),
        ("max_us", |r| r.max_us),
        ("read_p50_us", |r| r.read_p50_us),
        ("read_p99_us", |r| r.read_p99_us),
        ("cpu_ms_per_event", |r| r.cpu_ms_per_event),
        ("cpu_ms_per_trigger_alone", |r| r.cpu_ms_per_trigger_alone),
        ("rss_bytes_per_subscriber", |r| r.rss_bytes_per_subscriber),
    ];
    for (name, get) in fields {
        let values: Vec<f64> = runs.iter().map(get).collect();
        if let Some(m) = median(&values) {
            out.insert(name, m);
        }
    }
    out
}

fn report(all: &[(usize, Vec<RunFigures>)]) -> String {
    let mut text = String::from(
        "| subscribers | runs | p50 | p99 | max | read p50 | read p99 | CPU per event | CPU per trigger alone | RSS per idle subscriber | load (1 min) |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for (n, runs) in all {
        let m = medians(runs);
        let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
        let loads: Vec<String> = runs
            .iter()
            .map(|r| r.load_average_1m.map_or("?".into(), |l| format!("{l:.1}")))
            .collect();
        text.push_str(&format!(
            "| {n} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.1} KiB | {} |\n",
            runs.len(),
            get("p50_us") / 1000.0,
            get("p99_us") / 1000.0,
            get("max_us") / 1000.0,
            get("read_p50_us") / 1000.0,
            get("read_p99_us") / 1000.0,
            get("cpu_ms_per_event"),
            get("cpu_ms_per_trigger_alone"),
            get("rss_bytes_per_subscriber") / 1024.0,
            loads.join(", "),
        ));
    }
    text
}

/// One subscriber count's runs.
#[derive(Debug, Clone, Serialize)]
pub struct CountFigures {
    pub subscribers: usize,
    pub runs: Vec<RunFigures>,
}

impl CountFigures {
    /// The median of one figure over the runs (`p50_us`, `p99_us`,
    /// `max_us` until the event is in the socket, `read_p50_us`,
    /// `read_p99_us` until the bench read it, `cpu_ms_per_event`, `cpu_ms_per_trigger_alone`,
    /// `rss_bytes_per_subscriber`).
    pub fn median(&self, figure: &str) -> Option<f64> {
        medians(&self.runs).get(figure).copied()
    }
}

/// Every subscriber count measured (what `all` keeps).
#[derive(Debug, Clone, Serialize)]
pub struct EventsReport {
    pub counts: Vec<CountFigures>,
}

/// The table of medians, one row per subscriber count.
pub fn render_text(r: &EventsReport) -> String {
    let all: Vec<(usize, Vec<RunFigures>)> = r
        .counts
        .iter()
        .map(|c| (c.subscribers, c.runs.clone()))
        .collect();
    report(&all)
}

/// Every run of every subscriber count; writes `events.md` and
/// `events.json` and prints the table.
pub fn measure_all(
    common: &Common,
    opts: &EventsOpts,
    stop: Arc<AtomicBool>,
) -> Result<EventsReport> {
    std::fs::create_dir_all(&common.out_dir)?;
    let mut counts = Vec::new();
    for &n in &opts.subscribers {
        let mut runs = Vec::new();
        for run in 0..opts.runs {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            match run_once(common, opts, n, run, &stop) {
                Ok(f) => {
                    eprintln!(
                        "events: {n} subscribers, run {}: p50 {:.2} ms, p99 {:.2} ms, CPU {:.2} ms/event ({:.2} alone), {:.1} KiB/subscriber, load {:?}",
                        run + 1,
                        f.p50_us / 1000.0,
                        f.p99_us / 1000.0,
                        f.cpu_ms_per_event,
                        f.cpu_ms_per_trigger_alone,
                        f.rss_bytes_per_subscriber / 1024.0,
                        f.load_average_1m
                    );
                    runs.push(f);
                }
                Err(e) => eprintln!("events: {n} subscribers, run {}: failed: {e:#}", run + 1),
            }
        }
        counts.push(CountFigures {
            subscribers: n,
            runs,
        });
    }
    let r = EventsReport { counts };
    let text = render_text(&r);
    print!("{text}");
    std::fs::write(common.out_dir.join("events.md"), &text)?;
    std::fs::write(
        common.out_dir.join("events.json"),
        serde_json::to_string_pretty(&r.counts)?,
    )?;
    Ok(r)
}

/// The `events` subcommand: true when every subscriber count has a run.
pub fn run(common: &Common, opts: &EventsOpts, stop: Arc<AtomicBool>) -> Result<bool> {
    let r = measure_all(common, opts, stop)?;
    Ok(r.counts.iter().all(|c| !c.runs.is_empty()))
}
