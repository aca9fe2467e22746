//! The simulated world of one seed: a worker context (pool, router,
//! report mailbox), browsers and backends joined to their sessions by
//! simulated legs, an IO layer that plays the epoll-like or the
//! io_uring-like contract, a clock that the world moves (ticks and jumps),
//! and the faults. One step = one random peer action, maybe an IO turn,
//! maybe time passing, maybe faults; the invariants are checked after each.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::backend::{Backend, ConnectPlan, RfbServer, RFB_APPLIANCE_HANDSHAKE_BYTES};
use super::browser::{Browser, BrowserLimits, RequestKind, RfbClient, Subprotocol};
use super::net::Link;
use super::plan::{IoKind, Mode, Mutation, Plan, PROXY_BACKEND};
use super::rng::Rng;
use super::wmks::{WsServer, WsServerState};
use super::{checks, epoll, uring};
use crate::dataplane::router::{base64_url, AdmissionTable, Router};
use crate::dataplane::session::{CloseInfo, Phase, Session, WorkerCtx};
use crate::mailbox::{
    self, ticket_state, Admission, FromWorker, Inbox, Target, TargetKind, WebMksTarget,
};
use crate::protocol::http_upgrade::WsUrl;
use crate::protocol::websocket::close_code;

/// Log lines kept for a failure report (verbose reruns only).
const LOG_LINES_KEPT: usize = 400;
/// Wind-down: rounds at most (the clock's pace makes the drain come
/// after about a quarter of them).
const WIND_DOWN_ROUNDS: u64 = 4_000;
/// Settling: rounds without any progress that end it, and rounds at most
/// (a 1-byte socket buffer moves one byte per round).
const SETTLE_STILL_ROUNDS: u32 = 20;
const SETTLE_ROUNDS_MIN: u64 = 400_000;
const SETTLE_ROUNDS_PER_SOCKET_LOAD: u64 = 4;
/// What a TLS 1.3 record adds to its plaintext: a 5-byte header, the
/// inner content type and a 16-byte AEAD tag.
const TLS13_RECORD_OVERHEAD_BYTES: usize = 5 + 1 + 16;
/// Wind-down: the clock moves the longest timeout / this per round.
const WIND_DOWN_PACE_DIVISOR: u32 = 400;

/// What the IO layer and the checks share: plan, dice, the worker's
/// context, the clock, the log and the first violation seen.
pub struct Env {
    pub plan: Plan,
    pub rng: Rng,
    pub ctx: WorkerCtx,
    pub now: Instant,
    pub step: u64,
    verbose: bool,
    pub lines: VecDeque<String>,
    pub violation: Option<String>,
    /// epoll: splice pipes not lent to a session.
    pub pipes_free: usize,
    /// io_uring: receive completions left in the current batch.
    pub recv_budget: usize,
    /// Writes to browsers so far (for the corrupting mutation).
    pub browser_writes: u64,
    pub cov: Coverage,
}

impl Env {
    /// Record a line of the step log (only when rerun verbosely).
    pub fn note(&mut self, line: impl FnOnce() -> String) {
        if self.verbose {
            if self.lines.len() == LOG_LINES_KEPT {
                self.lines.pop_front();
            }
            let at = self.step;
            self.lines.push_back(format!("[{at}] {}", line()));
        }
    }

    /// Record a broken invariant (the first one is reported).
    pub fn violate(&mut self, what: String) {
        if self.violation.is_none() {
            self.note(|| format!("VIOLATION: {what}"));
            self.violation = Some(what);
        }
    }

    pub fn ms_since(&self, t: Instant) -> u64 {
        self.now.saturating_duration_since(t).as_millis() as u64
    }
}

/// The epoll-like layer's view of one connection.
#[derive(Debug, Default)]
pub struct EpollState {
    pub backend_open: bool,
    pub connecting: bool,
    /// The splice pipe lent to this session and the bytes in it.
    pub pipe: Option<VecDeque<u8>>,
}

/// One browser connection: its session, peers, legs and what the world
/// knows about them.
pub struct Conn {
    pub id: u64,
    pub session: Option<Session>,
    pub browser: Browser,
    pub backend: Backend,
    pub blink: Link,
    pub klink: Link,
    pub epoll: EpollState,
    pub uring: uring::UringState,
    /// Index of the admission its request names (appliance mode).
    pub admission: Option<usize>,
    /// Came in on the admission's dedicated listener.
    pub bound: bool,
    pub expected_target: SocketAddr,
    pub started: Instant,
    // ---- bookkeeping for the checks ---------------------------------------
    pub last_phase: Phase,
    /// Close codes the events this session saw allow.
    pub allowed_codes: Vec<u16>,
    /// Bytes the IO layer reported sent to the backend.
    pub sent_to_backend: u64,
    pub upgraded_at: Option<Instant>,
    pub connected: bool,
    pub last_activity: Instant,
    pub asleep_until: u64,
    pub close_info: Option<CloseInfo>,
    pub released: bool,
    /// Refused at accept (worker full, too many in their handshake).
    pub refused: bool,
    pub checked_down: usize,
    pub checked_up: usize,
    /// The statuses the browser's answer may have (set when it arrives).
    pub status_checked: bool,
    /// The appliance does the RFB security phase for this session.
    pub rfb: bool,
    /// The browser speaks TLS (wss).
    pub tls: bool,
    /// A WebMKS relay (its backend is a simulated VMware host).
    pub webmks: bool,
    pub connected_at: Option<Instant>,
}

impl Conn {
    fn new(
        id: u64,
        session: Option<Session>,
        browser: Browser,
        backend: Backend,
        link_bytes: usize,
        now: Instant,
    ) -> Self {
        Self {
            id,
            refused: session.is_none(),
            session,
            browser,
            backend,
            blink: Link::new(link_bytes, link_bytes),
            klink: Link::new(link_bytes, link_bytes),
            epoll: EpollState::default(),
            uring: uring::UringState::default(),
            admission: None,
            bound: false,
            expected_target: PROXY_BACKEND.parse().expect("a literal address"),
            started: now,
            last_phase: Phase::Sniff,
            allowed_codes: Vec::new(),
            sent_to_backend: 0,
            upgraded_at: None,
            connected: false,
            last_activity: now,
            asleep_until: 0,
            close_info: None,
            released: false,
            checked_down: 0,
            checked_up: 0,
            status_checked: false,
            rfb: false,
            tls: false,
            webmks: false,
            connected_at: None,
        }
    }

    pub fn live(&self) -> bool {
        self.session.is_some()
    }

    pub fn phase(&self) -> Option<Phase> {
        self.session.as_ref().map(Session::phase)
    }

    pub fn allow(&mut self, code: u16) {
        if !self.allowed_codes.contains(&code) {
            self.allowed_codes.push(code);
        }
    }

    // ---- session calls with the world's bookkeeping -------------------------

    pub fn on_browser_data(&mut self, env: &mut Env, data: &[u8]) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let before = s.phase();
        if before != Phase::Done && !data.is_empty() {
            self.last_activity = env.now;
        }
        s.on_browser_data(&mut env.ctx, data, env.now);
        let after = s.phase();
        if matches!(before, Phase::Sniff | Phase::Handshake)
            && !matches!(after, Phase::Sniff | Phase::Handshake | Phase::Responding)
            && self.upgraded_at.is_none()
        {
            self.upgraded_at = Some(env.now);
        }
        let id = self.id;
        env.note(|| {
            format!(
                "conn {id}: browser data {} bytes, {before:?} -> {after:?}",
                data.len()
            )
        });
    }

    pub fn on_backend_data(&mut self, env: &mut Env, data: &[u8], fragment: bool) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if s.phase() == Phase::Relay && !data.is_empty() {
            self.last_activity = env.now;
        }
        if fragment {
            s.on_backend_data_fragment(&mut env.ctx, data, env.now);
        } else {
            s.on_backend_data(&mut env.ctx, data, env.now);
        }
        let id = self.id;
        // (TLS records differ from run to run: only their length is logged.)
        let shown = if self.webmks { 0 } else { data.len().min(6) };
        env.note(|| {
            format!(
                "conn {id}: backend data {} bytes {:02x?}",
                data.len(),
                &data[..shown]
            )
        });
    }

    /// A frame-buffer, bulk or splice read of `n` bytes landed (`kind`
    /// says which), with the same bookkeeping as data.
    pub fn note_backend_bytes(&mut self, env: &mut Env, n: usize, kind: &str) {
        if n > 0 && self.phase() == Some(Phase::Relay) {
            self.last_activity = env.now;
        }
        let id = self.id;
        env.note(|| format!("conn {id}: backend {kind} {n} bytes"));
    }

    pub fn browser_sent(&mut self, env: &mut Env, n: usize) {
        if let Some(s) = self.session.as_mut() {
            s.browser_sent(&mut env.ctx, n, env.now);
        }
    }

    pub fn backend_sent(&mut self, env: &mut Env, n: usize) {
        if let Some(s) = self.session.as_mut() {
            s.backend_sent(&mut env.ctx, n, env.now);
            self.sent_to_backend += n as u64;
        }
    }

    /// `take_connect`, checked: only after a good request, once, to the
    /// target the route names.
    pub fn take_connect(&mut self, env: &mut Env) -> Option<SocketAddr> {
        let addr = self.session.as_mut()?.take_connect()?;
        let id = self.id;
        if self.browser.kind != RequestKind::Good {
            env.violate(format!(
                "conn {id}: a backend connect after a {:?} request",
                self.browser.kind
            ));
        }
        if addr != self.expected_target {
            env.violate(format!(
                "conn {id}: connect to {addr}, the route names {}",
                self.expected_target
            ));
        }
        if self.backend.asked_at.is_some() {
            env.violate(format!("conn {id}: a second backend connect"));
        }
        self.backend.connect_asked(env.step);
        env.note(|| format!("conn {id}: connect to {addr}"));
        Some(addr)
    }

    pub fn connected(&mut self, env: &mut Env) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if s.phase() == Phase::Connecting {
            self.last_activity = env.now;
        }
        self.connected = true;
        self.connected_at = Some(env.now);
        s.on_backend_connected(&mut env.ctx, env.now);
        let id = self.id;
        env.note(|| format!("conn {id}: backend connected"));
    }

    pub fn connect_failed(&mut self, env: &mut Env) {
        self.allow(close_code::INTERNAL_ERROR);
        if let Some(s) = self.session.as_mut() {
            let e = io::Error::from(io::ErrorKind::ConnectionRefused);
            s.on_backend_connect_failed(&mut env.ctx, &e, env.now);
        }
        let id = self.id;
        env.note(|| format!("conn {id}: backend connect failed"));
    }

    pub fn browser_gone(&mut self, env: &mut Env, error: Option<io::Error>) {
        let id = self.id;
        env.note(|| format!("conn {id}: browser gone ({error:?})"));
        if let Some(s) = self.session.as_mut() {
            s.on_browser_gone(&mut env.ctx, error.as_ref(), env.now);
        }
    }

    pub fn backend_gone(&mut self, env: &mut Env, error: Option<io::Error>) {
        // Its close code was allowed when the world made the backend fail
        // (an EOF the IO layer causes itself, closing, calls for none).
        let id = self.id;
        env.note(|| format!("conn {id}: backend gone ({error:?})"));
        if let Some(s) = self.session.as_mut() {
            s.on_backend_gone(&mut env.ctx, error.as_ref(), env.now);
        }
    }

    /// The IO layer frees the session (nothing in flight any more).
    pub fn release(&mut self, env: &mut Env) {
        let Some(mut s) = self.session.take() else {
            return;
        };
        if !s.is_done() {
            env.violate(format!(
                "conn {}: released in phase {:?}",
                self.id,
                s.phase()
            ));
        }
        self.close_info = s.close_info().cloned();
        if env.plan.mutation != Some(Mutation::SkipRelease) {
            s.release(&mut env.ctx);
        }
        self.released = true;
        self.blink.session_close();
        self.klink.session_close();
        let (id, info) = (self.id, self.close_info.clone());
        env.note(|| format!("conn {id}: released, close {info:?}"));
    }
}

/// An admission and what the world saw happen to it.
struct AdmissionInfo {
    a: Arc<Admission>,
    /// When it stopped being usable (revoked, closed, expired): the router
    /// may forget it `TOMBSTONE_MS` later.
    finished_at: Option<Instant>,
    /// A browser got its 101.
    opened_by: Option<u64>,
}

/// How often the interesting paths ran (summed over seeds: the figures of
/// docs/SIMULATION.md, and a guard that the runs reach what they claim).
#[derive(Debug, Default, Clone, Copy)]
pub struct Coverage {
    /// Steps with the browser queue at or past `buffer_bytes` (the backend
    /// is not read: backpressure), and the most seen past it.
    pub full_down_steps: u64,
    pub max_over_down: u64,
    /// The same toward the backend.
    pub full_up_steps: u64,
    pub max_over_up: u64,
    pub copy_reads: u64,
    pub frame_reads: u64,
    pub splices: u64,
    pub bulk_receives: u64,
    pub multishot_fragments: u64,
    pub short_writes: u64,
    pub recv_cancels: u64,
    pub resets: u64,
    pub eofs: u64,
    pub revokes_delivered: u64,
    pub revokes_lost: u64,
    pub drains: u64,
    pub lost_wakeups: u64,
    pub clock_jumps: u64,
    pub long_waits: u64,
    pub quiet_moments: u64,
    pub reports_dropped: u64,
    /// Sessions upgraded over wss, and VNC security phases completed.
    pub wss_sessions: u64,
    pub rfb_handshakes: u64,
    /// WebMKS relays upgraded (browser side).
    pub webmks_sessions: u64,
}

impl Coverage {
    pub fn add(&mut self, o: &Coverage) {
        self.full_down_steps += o.full_down_steps;
        self.max_over_down = self.max_over_down.max(o.max_over_down);
        self.full_up_steps += o.full_up_steps;
        self.max_over_up = self.max_over_up.max(o.max_over_up);
        self.copy_reads += o.copy_reads;
        self.frame_reads += o.frame_reads;
        self.splices += o.splices;
        self.bulk_receives += o.bulk_receives;
        self.multishot_fragments += o.multishot_fragments;
        self.short_writes += o.short_writes;
        self.recv_cancels += o.recv_cancels;
        self.resets += o.resets;
        self.eofs += o.eofs;
        self.revokes_delivered += o.revokes_delivered;
        self.revokes_lost += o.revokes_lost;
        self.drains += o.drains;
        self.lost_wakeups += o.lost_wakeups;
        self.clock_jumps += o.clock_jumps;
        self.long_waits += o.long_waits;
        self.quiet_moments += o.quiet_moments;
        self.wss_sessions += o.wss_sessions;
        self.rfb_handshakes += o.rfb_handshakes;
        self.webmks_sessions += o.webmks_sessions;
        self.reports_dropped += o.reports_dropped;
    }
}

/// Figures of one run, summed over seeds for docs/SIMULATION.md.
#[derive(Debug, Default, Clone)]
pub struct RunStats {
    pub cov: Coverage,
    pub steps: u64,
    pub sessions: u64,
    pub upgraded: u64,
    pub bytes_down: u64,
    pub bytes_up: u64,
    pub codes: Vec<(Option<u16>, u64)>,
    pub statuses: Vec<(u16, u64)>,
    pub sim_ms: u64,
}

impl RunStats {
    pub fn add(&mut self, o: &RunStats) {
        self.cov.add(&o.cov);
        self.steps += o.steps;
        self.sessions += o.sessions;
        self.upgraded += o.upgraded;
        self.bytes_down += o.bytes_down;
        self.bytes_up += o.bytes_up;
        self.sim_ms += o.sim_ms;
        for (k, n) in &o.codes {
            bump(&mut self.codes, *k, *n);
        }
        for (k, n) in &o.statuses {
            bump(&mut self.statuses, *k, *n);
        }
    }
}

fn bump<K: PartialEq + Copy>(v: &mut Vec<(K, u64)>, k: K, n: u64) {
    match v.iter_mut().find(|(x, _)| *x == k) {
        Some(e) => e.1 += n,
        None => v.push((k, n)),
    }
}

pub struct World {
    pub env: Env,
    pub conns: Vec<Conn>,
    admissions: Vec<AdmissionInfo>,
    reports: Option<Inbox<FromWorker>>,
    received_reports: Vec<FromWorker>,
    draining: bool,
    /// Steps at which the next browsers connect.
    starts: Vec<u64>,
    next_tick: Instant,
    base: Instant,
    /// Dedicated listeners the sessions said are done with.
    ended_bound: Vec<u64>,
    winding_down: bool,
    /// When the admissions were last looked at.
    last_observed: Instant,
    /// Timer ticks are not logged (a long wait has thousands).
    quiet_ticks: bool,
}

impl World {
    pub fn new(seed: u64, steps: u64, mutation: Option<Mutation>, verbose: bool) -> Self {
        let mut rng = Rng::new(seed);
        let mut plan = Plan::new(seed, &mut rng, steps);
        plan.mutation = mutation;
        let base = Instant::now();
        let mut table = AdmissionTable::default();
        let admissions = admit(&plan, &mut rng, base);
        for info in &admissions {
            table.insert(info.a.clone());
        }
        let router = match plan.mode {
            Mode::Proxy => Router::Fixed(Target::vnc(
                PROXY_BACKEND.parse().expect("a literal address"),
                None,
            )),
            Mode::Appliance => Router::Appliance(table),
        };
        let tls = plan.tls.map(|_| super::tls::server_config());
        let mut ctx = WorkerCtx::new(Arc::new(plan.cfg.clone()), 0, router, None, tls);
        let reports = if plan.mode == Mode::Appliance {
            let (tx, rx) =
                mailbox::channel(plan.report_capacity).expect("an eventfd for the report mailbox");
            ctx.events = Some(tx);
            Some(rx)
        } else {
            None
        };
        let mut starts: Vec<u64> = (1..plan.sessions)
            .map(|_| rng.below(steps.max(1)))
            .collect();
        starts.push(0);
        starts.sort_unstable_by(|a, b| b.cmp(a));
        let tick = Duration::from_millis(plan.limits().timer_tick_ms);
        let pipes_free = plan.pipes;
        Self {
            env: Env {
                plan,
                rng,
                ctx,
                now: base,
                step: 0,
                verbose,
                lines: VecDeque::new(),
                violation: None,
                pipes_free,
                recv_budget: 0,
                browser_writes: 0,
                cov: Coverage::default(),
            },
            conns: Vec::new(),
            admissions,
            reports,
            received_reports: Vec::new(),
            draining: false,
            starts,
            next_tick: base + tick,
            base,
            ended_bound: Vec::new(),
            winding_down: false,
            last_observed: base,
            quiet_ticks: false,
        }
    }

    /// Run the steps, wind down, check the end. Err: the first violation.
    pub fn run(&mut self) -> Result<RunStats, String> {
        for _ in 0..self.env.plan.steps {
            self.step();
            self.check()?;
        }
        self.wind_down()?;
        checks::at_end(self)?;
        Ok(self.stats())
    }

    fn check(&mut self) -> Result<(), String> {
        self.observe_admissions();
        checks::after_step(self);
        match self.env.violation.take() {
            Some(v) => Err(v),
            None => Ok(()),
        }
    }

    fn step(&mut self) {
        self.env.step += 1;
        while self.starts.last().is_some_and(|&s| s <= self.env.step) && !self.draining {
            self.starts.pop();
            self.connect_browser();
        }
        let step = self.env.step;
        for c in &mut self.conns {
            c.backend.advance_connect(step);
        }
        for i in 0..self.conns.len() {
            self.peer_actions(i);
        }
        let tempo = self.env.plan.tempo;
        if self.env.rng.chance(tempo.io_turn) {
            self.io_turn();
        }
        if self.env.rng.chance(tempo.clock) {
            let tick = self.env.plan.limits().timer_tick_ms;
            let d = self.env.rng.range(1, 2 * tick as usize) as u64;
            self.advance_clock(Duration::from_millis(d));
        }
        self.faults();
        self.collect_reports(false);
    }

    // ---- peers ---------------------------------------------------------------

    fn connect_browser(&mut self) {
        let id = self.conns.len() as u64 + 1;
        let (kind, proto, admission, bound) = self.draw_request();
        let (path, target) = self.route_of(kind, admission);
        let env = &mut self.env;
        let mut browser = new_browser(env, kind, proto, &path);
        let tls = browser.tls.is_some();
        let mut backend = new_backend(env);
        let connect = backend.plan;
        // A VNC server with a password behind an admission that has it.
        let rfb = env.plan.rfb.clone().filter(|_| admission.is_some());
        if let Some(r) = &rfb {
            browser.rfb = Some(RfbClient::Waiting {
                upto: 12,
                pipelined: env.rng.chance(r.pipelined),
            });
            let password = if r.backend_accepts {
                r.password.clone()
            } else {
                "wrong".into()
            };
            backend.rfb = Some(RfbServer::new(password.into_bytes()));
        }
        let webmks = env.plan.webmks && admission.is_some();
        if webmks {
            browser.frames_raw = true;
            let max_frame = env.plan.limits().max_frame_bytes.min(1 << 20) as usize;
            let k = admission.expect("a WebMKS relay is an admission's");
            backend.ws = Some(WsServer::new(webmks_path(k), max_frame));
        }
        let live = self.conns.iter().filter(|c| c.live()).count();
        let peer = SocketAddr::from(([127, 0, 0, 1], 40_000 + id as u16));
        let bound_admission = bound.then(|| {
            self.admissions[admission.expect("bound implies one")]
                .a
                .clone()
        });
        let session = env
            .ctx
            .new_session(live, id, env.now, Some(peer), bound_admission);
        let mut c = Conn::new(id, session, browser, backend, env.plan.link_bytes, env.now);
        c.admission = admission;
        c.bound = bound;
        c.expected_target = target;
        c.rfb = rfb.is_some();
        c.tls = tls;
        c.webmks = webmks;
        let refused_vnc = rfb.as_ref().is_some_and(|r| !r.backend_accepts);
        let failing = matches!(
            connect,
            ConnectPlan::Refuse { .. } | ConnectPlan::Hang | ConnectPlan::FailNow
        );
        if refused_vnc || failing {
            c.allow(close_code::INTERNAL_ERROR);
        }
        if c.refused {
            // Closed at accept: the browser reads EOF and nothing else.
            c.blink.session_close();
            c.released = true;
        }
        env.note(|| format!("conn {id}: connects, {kind:?} {proto:?} tls={tls} webmks={webmks} admission={admission:?} bound={bound} backend={connect:?} refused={}", c.refused));
        // Accepted: the IO layer serves it at once (arms its reads).
        Self::pump_one(env, &mut c);
        self.conns.push(c);
    }

    /// What the next browser asks for: the request's kind, subprotocol,
    /// admission (appliance mode) and whether it comes in on the
    /// admission's dedicated listener.
    fn draw_request(&mut self) -> (RequestKind, Subprotocol, Option<usize>, bool) {
        let rng = &mut self.env.rng;
        let appliance = self.env.plan.mode == Mode::Appliance;
        let kind = pick_request_kind(rng, appliance);
        let proto = rng.pick(&[Subprotocol::None, Subprotocol::Binary, Subprotocol::Base64]);
        let admission = (appliance && !self.admissions.is_empty())
            .then(|| rng.below(self.admissions.len() as u64) as usize);
        let bound = admission.is_some() && rng.chance(200);
        (kind, proto, admission, bound)
    }

    /// The request's path and query, and the backend its route names.
    fn route_of(&self, kind: RequestKind, admission: Option<usize>) -> (String, SocketAddr) {
        let Some(i) = admission else {
            let fixed = PROXY_BACKEND.parse().expect("a literal address");
            return ("/websockify".to_string(), fixed);
        };
        let a = &self.admissions[i].a;
        let ticket = if kind == RequestKind::BadTicket {
            base64_url(&[0u8; 32])
        } else {
            base64_url(&a.ticket)
        };
        let sid = if kind == RequestKind::UnknownSession {
            0xdead
        } else {
            a.id
        };
        (format!("/proxy/{sid:x}?token={ticket}"), a.target.addr)
    }

    /// Conn `i`'s browser and backend act, each action with the plan's
    /// chance (a slow reader is stalled).
    fn peer_actions(&mut self, i: usize) {
        let env = &mut self.env;
        let c = &mut self.conns[i];
        let step = env.step;
        let (faults, tempo) = (env.plan.faults, env.plan.tempo);
        if env.rng.chance(tempo.browser_generate) {
            let r =
                c.browser
                    .generate(&mut env.rng, faults.browser_close * 10, faults.garbage * 10);
            if let Err(e) = r {
                env.violate(format!("conn {}: the browser saw {e}", c.id));
            }
        }
        if env.rng.chance(tempo.browser_write) {
            let max = env.rng.size(64 * 1024);
            c.browser.write(&mut c.blink, max);
        }
        if step >= c.browser.stalled_until && env.rng.chance(tempo.browser_read) {
            browser_read(env, c, None);
        }
        if env.rng.chance(tempo.backend_write) {
            c.backend.write(&mut c.klink, &mut env.rng);
        }
        if step >= c.backend.stalled_until && env.rng.chance(tempo.backend_read) {
            let max = env.rng.size(64 * 1024);
            if let Err(e) = c.backend.read(&mut c.klink, max, &mut env.rng) {
                env.violate(format!("conn {}: the backend saw {e}", c.id));
            }
        }
        checks::status_if_new(self, i);
    }

    // ---- the IO layer and the clock -------------------------------------------

    fn io_turn(&mut self) {
        match self.env.plan.io {
            IoKind::Epoll => {
                for c in &mut self.conns {
                    if self.env.step >= c.asleep_until {
                        epoll::pump(&mut self.env, c);
                    }
                }
            }
            IoKind::Uring => uring::turn(&mut self.env, &mut self.conns),
        }
        self.ended_bound.append(&mut self.env.ctx.ended_bound);
    }

    fn pump_one(env: &mut Env, c: &mut Conn) {
        match env.plan.io {
            IoKind::Epoll => epoll::pump(env, c),
            IoKind::Uring => uring::sync(env, c),
        }
    }

    fn advance_clock(&mut self, d: Duration) {
        self.env.now += d;
        if self.env.now >= self.next_tick {
            let (d_ms, at) = (d.as_millis(), self.env.ms_since(self.base));
            if !self.quiet_ticks {
                self.env
                    .note(|| format!("clock +{d_ms} ms to {at} ms: timer tick"));
            }
            self.tick();
        }
    }

    /// The worker's timer scan: purge the admission table, `on_tick` and
    /// a pump for every session (lost wake-ups end here, as in the real
    /// loops).
    fn tick(&mut self) {
        let env = &mut self.env;
        self.next_tick = env.now + Duration::from_millis(env.plan.limits().timer_tick_ms);
        if let Router::Appliance(t) = &mut env.ctx.router {
            t.purge(env.now);
        }
        let l = env.plan.limits().clone();
        for c in &mut self.conns {
            let Some(phase) = c.phase() else { continue };
            if l.idle_timeout_ms > 0 && env.ms_since(c.last_activity) >= l.idle_timeout_ms {
                c.allow(close_code::GOING_AWAY);
            }
            if let Some(t) = c.upgraded_at {
                if !c.connected && env.ms_since(t) >= l.connect_timeout_ms {
                    c.allow(close_code::INTERNAL_ERROR);
                }
            }
            // The VNC security phase must finish within the handshake
            // timeout of the connect (done at the latest when the backend
            // has the ClientInit).
            if let Some(t) = c.connected_at.filter(|_| c.rfb) {
                let done = c.backend.received.len() > RFB_APPLIANCE_HANDSHAKE_BYTES;
                if !done && env.ms_since(t) >= l.handshake_timeout_ms {
                    c.allow(close_code::INTERNAL_ERROR);
                }
            }
            // The WebMKS upgrade likewise, until the 101 reached the
            // appliance (sent, and read off the socket).
            if let Some(t) = c.connected_at.filter(|_| c.webmks) {
                let answered = c
                    .backend
                    .ws
                    .as_ref()
                    .is_some_and(|w| w.state != WsServerState::Upgrade)
                    && c.backend.unsent() == 0
                    && c.klink.session_available() == 0;
                if !answered && env.ms_since(t) >= l.handshake_timeout_ms {
                    c.allow(close_code::INTERNAL_ERROR);
                }
            }
            let _ = phase;
            let teardown = env.plan.io == IoKind::Uring && c.uring.teardown;
            if !teardown {
                if let Some(s) = c.session.as_mut() {
                    s.on_tick(&mut env.ctx, env.now);
                }
            }
            Self::pump_one(env, c);
        }
        self.ended_bound.append(&mut self.env.ctx.ended_bound);
    }

    // ---- faults ------------------------------------------------------------------

    fn faults(&mut self) {
        let f = self.env.plan.faults;
        let n = self.conns.len() as u64;
        if n == 0 {
            return;
        }
        let i = self.env.rng.below(n) as usize;
        self.peer_faults(i);
        if self.env.rng.chance(f.clock_jump) {
            let longest = self.env.plan.longest_timeout().as_millis() as usize;
            let d = self.env.rng.range(1, 2 * longest.max(1)) as u64;
            self.env.note(|| format!("FAULT clock jumps {d} ms"));
            self.env.cov.clock_jumps += 1;
            self.advance_clock(Duration::from_millis(d));
        }
        if self.env.rng.chance(f.long_wait) {
            self.long_wait();
        }
        if self.env.rng.chance(f.quiet_moment) {
            self.quiet_moment();
        }
        if !self.admissions.is_empty() {
            let k = self.env.rng.below(self.admissions.len() as u64) as usize;
            if self.env.rng.chance(f.revoke_message) {
                self.revoke(k, true);
            } else if self.env.rng.chance(f.revoke_lost) {
                self.revoke(k, false);
            }
        }
        if self.env.rng.chance(f.drain) {
            self.drain();
        }
    }

    /// What conn `i`'s peers may do wrong this step: reset, shut, close,
    /// stop reading; and its lost wake-ups.
    fn peer_faults(&mut self, i: usize) {
        let f = self.env.plan.faults;
        let step = self.env.step;
        if self.env.rng.chance(f.browser_reset) && !self.conns[i].browser.gone {
            let c = &mut self.conns[i];
            c.blink.peer_resets();
            c.browser.gone = true;
            self.env.cov.resets += 1;
            self.env
                .note(|| format!("FAULT conn {}: browser resets", i + 1));
        }
        if self.env.rng.chance(f.browser_fin) && !self.conns[i].browser.gone {
            let c = &mut self.conns[i];
            c.blink.peer_fin = true;
            c.browser.gone = true;
            self.env.cov.eofs += 1;
            self.env
                .note(|| format!("FAULT conn {}: browser shuts its side (EOF)", i + 1));
        }
        if self.env.rng.chance(f.browser_close) {
            let code = self.env.rng.pick(&[None, Some(1000), Some(4000)]);
            self.conns[i].browser.send_close(&mut self.env.rng, code);
        }
        let c = &mut self.conns[i];
        if self.env.rng.chance(f.backend_reset) && c.backend.accepted() && !c.backend.gone {
            c.klink.peer_resets();
            c.backend.gone = true;
            c.allow(close_code::INTERNAL_ERROR);
            self.env.cov.resets += 1;
            self.env
                .note(|| format!("FAULT conn {}: backend resets", i + 1));
        }
        if self.env.rng.chance(f.backend_fin) && c.backend.accepted() && !c.backend.gone {
            if let Some(ws) = c.backend.ws.as_mut() {
                if self.env.rng.chance(500) && ws.state == WsServerState::Open {
                    // The VMware host ends the console with a close frame.
                    let code = self
                        .env
                        .rng
                        .pick(&[None, Some(1000), Some(1001), Some(4000)]);
                    ws.send_close(code);
                    c.allow(code.unwrap_or(close_code::NORMAL));
                    self.env
                        .note(|| format!("FAULT conn {}: backend sends close {code:?}", i + 1));
                    return;
                }
            }
            c.backend.truncated = c.backend.unsent() > 0;
            c.klink.peer_fin = true;
            c.backend.gone = true;
            c.allow(close_code::NORMAL);
            self.env.cov.eofs += 1;
            self.env
                .note(|| format!("FAULT conn {}: backend shuts its side (EOF)", i + 1));
        }
        if self.env.rng.chance(f.stall_browser) {
            // Now and then a browser that stops reading for good (a frozen
            // tab: its connection stays up, its window stays shut).
            let steps = self.env.rng.pick(&[300, 300, 300, 100_000]);
            self.conns[i].browser.stalled_until = step + self.env.rng.range(1, steps) as u64;
        }
        if self.env.rng.chance(f.stall_backend) {
            let steps = self.env.rng.pick(&[300, 300, 300, 100_000]);
            self.conns[i].backend.stalled_until = step + self.env.rng.range(1, steps) as u64;
        }
        if self.env.rng.chance(f.lost_wakeup) {
            self.conns[i].asleep_until = step + self.env.rng.range(1, 60) as u64;
            self.env.cov.lost_wakeups += 1;
            self.env
                .note(|| format!("FAULT conn {}: wake-ups lost for a while", i + 1));
        }
    }

    /// Settle in the middle of the run: peers answer, backends hold their
    /// new data, the clock stops; then everything carries on as before.
    fn quiet_moment(&mut self) {
        self.env
            .note(|| "FAULT a quiet moment: settle with the clock stopped".into());
        self.env.cov.quiet_moments += 1;
        let quiet: Vec<bool> = self.conns.iter().map(|c| c.backend.quiet).collect();
        for c in &mut self.conns {
            c.backend.quiet = true;
            // (A lost wake-up lasts until the next timer tick, and the
            // clock stands still here.)
            c.asleep_until = 0;
        }
        if let Err(e) = self.settle() {
            self.env.violate(e);
        }
        for (c, q) in self.conns.iter_mut().zip(quiet) {
            c.backend.quiet = q;
        }
    }

    /// Time passes tick by tick (each tick pumps every session), the
    /// peers idle: up to minutes of a frozen tab.
    fn long_wait(&mut self) {
        let ticks = self.env.rng.range(10, 3000);
        self.env
            .note(|| format!("FAULT a long wait: {ticks} timer ticks, peers idle"));
        self.env.cov.long_waits += 1;
        let tick = Duration::from_millis(self.env.plan.limits().timer_tick_ms);
        self.quiet_ticks = true;
        for _ in 0..ticks {
            self.advance_clock(tick);
            self.check_quietly();
            if self.env.violation.is_some() {
                break;
            }
        }
        self.quiet_ticks = false;
        let at = self.env.ms_since(self.base);
        self.env.note(|| format!("the long wait ends at {at} ms"));
    }

    /// The per-step checks in the middle of a long action (the first
    /// violation stays recorded for the step's own check).
    fn check_quietly(&mut self) {
        self.observe_admissions();
        checks::after_step(self);
    }

    /// DELETE: the control plane revokes the shared state, then its Revoke
    /// message reaches the worker, or is lost (full mailbox).
    fn revoke(&mut self, k: usize, delivered: bool) {
        let a = self.admissions[k].a.clone();
        let changed = a.revoke();
        if delivered {
            self.env.cov.revokes_delivered += 1;
        } else {
            self.env.cov.revokes_lost += 1;
        }
        self.env.note(|| format!("FAULT admission {:#x} revoked (message delivered: {delivered}, state changed: {changed})", a.id));
        for c in &mut self.conns {
            if c.admission == Some(k) {
                c.allow(close_code::POLICY);
            }
        }
        if !delivered {
            return;
        }
        for c in &mut self.conns {
            let serves = c.session.as_ref().is_some_and(|s| s.serves(a.id));
            let teardown = self.env.plan.io == IoKind::Uring && c.uring.teardown;
            if serves && !teardown {
                if let Some(s) = c.session.as_mut() {
                    s.on_revoke(&mut self.env.ctx, self.env.now);
                }
                Self::pump_one(&mut self.env, c);
            }
        }
    }

    /// SIGTERM after the grace: every live session gets `on_drain`.
    fn drain(&mut self) {
        self.draining = true;
        self.env.cov.drains += 1;
        self.env.note(|| "FAULT drain".into());
        for c in &mut self.conns {
            c.allow(close_code::GOING_AWAY);
            let teardown = self.env.plan.io == IoKind::Uring && c.uring.teardown;
            if !teardown {
                if let Some(s) = c.session.as_mut() {
                    s.on_drain(&mut self.env.ctx, self.env.now);
                }
            }
            Self::pump_one(&mut self.env, c);
        }
    }

    /// The control plane takes the reports (all of them when `all`, else
    /// with the plan's chance).
    fn collect_reports(&mut self, all: bool) {
        let Some(rx) = self.reports.as_mut() else {
            return;
        };
        if !all && !self.env.rng.chance(self.env.plan.drain_reports) {
            return;
        }
        while let Some(r) = rx.try_recv() {
            self.received_reports.push(r);
        }
    }

    /// Note when each admission stopped being usable: at its expiry, or
    /// (revoked, closed) no earlier than the previous observation — a
    /// lower bound, so the 404 a forgotten admission gets is never refused
    /// by mistake.
    fn observe_admissions(&mut self) {
        for info in &mut self.admissions {
            if info.finished_at.is_some() {
                continue;
            }
            if self.env.now >= info.a.expires_at {
                info.finished_at = Some(info.a.expires_at);
            } else if matches!(info.a.state(), ticket_state::REVOKED | ticket_state::CLOSED) {
                info.finished_at = Some(self.last_observed);
            }
        }
        self.last_observed = self.env.now;
    }

    // ---- the end -----------------------------------------------------------------

    /// One round of responsive peers (every byte written and read, RFB
    /// answered) and an IO turn.
    fn healthy_round(&mut self) {
        self.env.step += 1;
        let step = self.env.step;
        for i in 0..self.conns.len() {
            let env = &mut self.env;
            let c = &mut self.conns[i];
            c.backend.advance_connect(step);
            c.browser.write(&mut c.blink, usize::MAX);
            browser_read(env, c, Some(usize::MAX));
            if let Err(e) = c.browser.rfb_step(&mut env.rng) {
                env.violate(format!("conn {}: the browser saw {e}", c.id));
            }
            c.backend.write(&mut c.klink, &mut env.rng);
            if let Err(e) = c.backend.read(&mut c.klink, usize::MAX, &mut env.rng) {
                env.violate(format!("conn {}: the backend saw {e}", c.id));
            }
            checks::status_if_new(self, i);
        }
        self.io_turn();
    }

    /// What moves in a healthy round (when it stops changing, nothing can).
    fn progress_mark(&self) -> Vec<u64> {
        let mut mark = Vec::with_capacity(self.conns.len() * 13);
        for c in &self.conns {
            let s = c.session.as_ref();
            mark.extend([
                c.browser.received.len() as u64,
                c.backend.received.len() as u64,
                c.backend.sent.len() as u64,
                c.browser.sent_payload.len() as u64,
                s.map_or(0, Session::browser_pending_len) as u64,
                s.map_or(0, |s| s.backend_pending().len()) as u64,
                u64::from(c.released),
                c.browser.unsent() as u64,
                // (A WebMKS host's TLS records leave it a byte a round on
                // a 1-byte socket, with nothing else to show for it.)
                c.backend.unsent() as u64,
                c.blink.buffered() as u64,
                c.klink.buffered() as u64,
                c.phase().map_or(99, |p| p as u64),
                c.sent_to_backend,
            ]);
        }
        mark
    }

    /// With the clock stopped (no timer can fire) and both peers
    /// answering, run healthy rounds until nothing moves any more; then
    /// every relay must have delivered everything both ways and every VNC
    /// security phase must be over: a session that waits here would wait
    /// for a timeout in production.
    fn settle(&mut self) -> Result<(), String> {
        let (mut still, mut last) = (0, self.progress_mark());
        let rounds_max = self.settle_rounds_max();
        for _ in 0..rounds_max {
            self.healthy_round();
            self.check()?;
            let mark = self.progress_mark();
            still = if mark == last { still + 1 } else { 0 };
            last = mark;
            if still == SETTLE_STILL_ROUNDS {
                checks::after_settle(self);
                return match self.env.violation.take() {
                    Some(v) => Err(v),
                    None => Ok(()),
                };
            }
        }
        Err(format!(
            "the relays never settled in {rounds_max} rounds with the clock stopped"
        ))
    }

    /// Enough rounds to move every byte in play through the simulated
    /// sockets several times, even a 1-byte socket buffer's one byte per
    /// round (a settle that works ends after a few still rounds anyway).
    /// Toward a WebMKS host, a browser byte can cost a whole TLS record:
    /// a browser that trickles one byte a round through a 1-byte socket
    /// has each byte sealed on its own, so it counts as a record's worth.
    fn settle_rounds_max(&self) -> u64 {
        let buffer = self.env.plan.limits().buffer_bytes;
        let up_expansion = if self.env.plan.webmks {
            1 + TLS13_RECORD_OVERHEAD_BYTES
        } else {
            1
        };
        let in_play: usize = self
            .conns
            .iter()
            .map(|c| {
                let up = c.browser.unsent() + c.blink.buffered() + buffer;
                let down = c.klink.buffered() + c.backend.unsent() + buffer;
                up * up_expansion + down
            })
            .sum();
        let per_round = self.env.plan.link_bytes.max(1);
        SETTLE_ROUNDS_MIN.max(SETTLE_ROUNDS_PER_SOCKET_LOAD * (in_play / per_round) as u64)
    }

    /// No new faults; peers read everything, answer, stop sending data;
    /// the clock runs past every timeout; after a while the worker drains.
    /// Every session must reach Done and be released.
    fn wind_down(&mut self) -> Result<(), String> {
        self.winding_down = true;
        self.env.note(|| "---- wind-down".into());
        self.starts.clear();
        for c in &mut self.conns {
            c.browser.stalled_until = 0;
            c.backend.stalled_until = 0;
            c.backend.quiet = true;
            c.asleep_until = 0;
            c.browser.done_sending |= c.browser.kind != RequestKind::Good;
        }
        let tick = Duration::from_millis(self.env.plan.limits().timer_tick_ms);
        let longest = self.env.plan.longest_timeout();
        // Fast enough to pass the drain and then every timeout three times
        // over within the rounds, slow enough for many IO turns per tick.
        let pace = tick.max(longest / WIND_DOWN_PACE_DIVISOR);
        let drain_at = self.env.now + longest + tick;
        let give_up = drain_at + 3 * longest + Duration::from_secs(10);
        self.settle()?;
        for _ in 0..WIND_DOWN_ROUNDS {
            self.healthy_round();
            self.advance_clock(pace);
            if !self.draining && self.env.now >= drain_at {
                self.drain();
            }
            self.collect_reports(true);
            self.check()?;
            if self.conns.iter().all(|c| c.released) {
                return Ok(());
            }
            if self.env.now >= give_up {
                break;
            }
        }
        let stuck: Vec<String> = self
            .conns
            .iter()
            .filter(|c| !c.released)
            .map(|c| {
                format!(
                    "conn {} in {:?} (uring in flight: {})",
                    c.id,
                    c.phase(),
                    c.uring.describe()
                )
            })
            .collect();
        Err(format!(
            "sessions never finished after the wind-down ({} ms past every timeout): {}",
            self.env.ms_since(drain_at),
            stuck.join(", ")
        ))
    }

    fn stats(&self) -> RunStats {
        let mut cov = self.env.cov;
        cov.reports_dropped = self
            .env
            .ctx
            .metrics
            .error_count(crate::cause::Cause::EventsDropped);
        let mut s = RunStats {
            cov,
            steps: self.env.step,
            sessions: self.conns.len() as u64,
            sim_ms: self.env.ms_since(self.base),
            ..RunStats::default()
        };
        for c in &self.conns {
            if c.browser.status == Some(101) {
                s.upgraded += 1;
                s.cov.wss_sessions += u64::from(c.tls);
            }
            s.cov.rfb_handshakes += u64::from(c.browser.rfb == Some(RfbClient::Done));
            s.cov.webmks_sessions += u64::from(c.webmks && c.browser.status == Some(101));
            s.bytes_down += c.browser.received.len() as u64;
            s.bytes_up += c.backend.received.len() as u64;
            if let Some(st) = c.browser.status {
                bump(&mut s.statuses, st, 1);
            }
            if c.browser.status == Some(101) {
                bump(&mut s.codes, c.close_info.as_ref().and_then(|i| i.code), 1);
            }
        }
        s
    }

    // ---- what the checks read ------------------------------------------------------

    pub fn admission_state(&self, k: usize) -> u8 {
        self.admissions[k].a.state()
    }

    pub fn admission_id(&self, k: usize) -> u64 {
        self.admissions[k].a.id
    }

    pub fn admission_expires_at(&self, k: usize) -> Instant {
        self.admissions[k].a.expires_at
    }

    pub fn admission_finished_at(&self, k: usize) -> Option<Instant> {
        self.admissions[k].finished_at
    }

    pub fn admission_count(&self) -> usize {
        self.admissions.len()
    }

    /// Record that conn `id` got the 101 of admission `k`; false when
    /// another one had it already.
    pub fn admission_opened_by(&mut self, k: usize, id: u64) -> bool {
        match self.admissions[k].opened_by {
            Some(other) => other == id,
            None => {
                self.admissions[k].opened_by = Some(id);
                true
            }
        }
    }

    pub fn admission_was_opened(&self, k: usize) -> Option<u64> {
        self.admissions[k].opened_by
    }

    pub fn reports(&self) -> &[FromWorker] {
        &self.received_reports
    }

    pub fn ended_bound(&self) -> &[u64] {
        &self.ended_bound
    }
}

/// The browser reads (at most `max`, or a random amount) and parses; a
/// protocol violation by the session becomes the world's violation.
fn browser_read(env: &mut Env, c: &mut Conn, max: Option<usize>) {
    let max = max.unwrap_or_else(|| env.rng.size(64 * 1024));
    if let Err(e) = c.browser.read(&mut c.blink, max, &mut env.rng) {
        env.violate(format!("conn {}: the browser saw {e}", c.id));
    }
}

/// The control plane's admissions (appliance mode): random tickets and
/// TTLs, each to its own target, with the plan's VNC password.
fn admit(plan: &Plan, rng: &mut Rng, base: Instant) -> Vec<AdmissionInfo> {
    if plan.mode != Mode::Appliance {
        return Vec::new();
    }
    (0..plan.admissions)
        .map(|i| {
            let mut ticket = vec![0u8; 32];
            rng.fill(&mut ticket);
            let ttl = Duration::from_millis(rng.range(100, 60_000) as u64);
            let addr = SocketAddr::from(([10, 0, 0, i as u8 + 1], 5900));
            let target = if plan.webmks {
                webmks_target(addr, i)
            } else {
                Target::vnc(addr, plan.rfb.as_ref().map(|r| r.password.clone()))
            };
            let a = Arc::new(Admission::new(
                0xa000 + i as u64,
                ticket,
                target,
                "sim".into(),
                base + ttl,
                None,
                None,
                None,
            ));
            AdmissionInfo {
                a,
                finished_at: None,
                opened_by: None,
            }
        })
        .collect()
}

/// The request target of admission `k`'s VMware console (its ticket).
fn webmks_path(k: usize) -> String {
    format!("/ticket/sim{k:04}")
}

/// Admission `k`'s VMware console at `addr`: `wss://esxi.sim/ticket/…`.
fn webmks_target(addr: SocketAddr, k: usize) -> Target {
    let url = format!("wss://{}{}", super::tls::WEBMKS_HOST, webmks_path(k));
    let url = WsUrl::parse(&url).expect("a valid WebMKS URL");
    let target = WebMksTarget::new(url, super::tls::webmks_client_config())
        .expect("a WebMKS target for the simulated host");
    Target {
        addr,
        kind: TargetKind::WebMks(Arc::new(target)),
    }
}

/// A browser sending `kind` of request to `path`, with its limits,
/// manners and (on a TLS worker, maybe) its TLS connection.
fn new_browser(env: &mut Env, kind: RequestKind, proto: Subprotocol, path: &str) -> Browser {
    let l = env.plan.limits();
    let request = Browser::request(kind, proto, path, l.max_request_bytes);
    let limits = BrowserLimits {
        max_frame_bytes: l.max_frame_bytes,
        max_message_bytes: env
            .rng
            .pick(&[16, 1000, l.buffer_bytes, 3 * l.buffer_bytes]),
    };
    let polite = env.rng.chance(900);
    let mut browser = Browser::new(kind, proto, limits, request, polite);
    if env.plan.tls.is_some_and(|t| env.rng.chance(t.share)) {
        browser.tls = Some(Box::new(super::tls::client()));
    }
    browser
}

/// A backend that accepts (mostly), refuses, ignores or fails the
/// connect, and writes small messages or bulk updates.
fn new_backend(env: &mut Env) -> Backend {
    let connect = match env.rng.below(100) {
        0..=79 => ConnectPlan::Accept {
            after_steps: env.rng.below(20),
        },
        80..=86 => ConnectPlan::Refuse {
            after_steps: env.rng.below(20),
        },
        87..=93 => ConnectPlan::Hang,
        _ => ConnectPlan::FailNow,
    };
    let recv = env.plan.limits().recv_buffer_bytes;
    Backend::new(connect, env.rng.pick(&[64, recv, 4 * recv]))
}

fn pick_request_kind(rng: &mut Rng, appliance: bool) -> RequestKind {
    match rng.below(100) {
        0..=81 => RequestKind::Good,
        82..=84 if appliance => RequestKind::BadTicket,
        85..=86 if appliance => RequestKind::UnknownSession,
        87..=89 => RequestKind::NotHttp,
        90..=92 => RequestKind::BadVersion,
        93..=96 => RequestKind::Slow,
        97..=99 => RequestKind::Oversize,
        _ => RequestKind::Good,
    }
}
