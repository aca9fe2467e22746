//! What one seed sets up: the worker's limits (small, so bounds are hit
//! often), the io contract (epoll-like or io_uring-like), proxy or
//! appliance mode, how many browsers connect, and which faults are on and
//! how often ("swarm" style: each seed enables a random subset, so some
//! runs go deep without resets and others are all faults).

use std::time::Duration;

use super::rng::Rng;
use crate::config::{IoChoice, Limits, ProxyConfig, TargetConfig, TlsFiles};
use crate::mailbox::Target;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Epoll,
    Uring,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `consolegate proxy`: one fixed backend.
    Proxy,
    /// Admitted sessions with single-use tickets, reporting to the control
    /// plane through a bounded mailbox.
    Appliance,
}

/// A deliberate defect in the simulated IO layer, for the self-test that
/// shows each family of checks can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// Read the backend whether or not the session wants it, 4× the limit.
    IgnoreReadLimits,
    /// Flip one byte on its way to the browser.
    CorruptDownstream,
    /// Drop finished sessions without `release`.
    SkipRelease,
}

/// Chances per world step, per mille (0 = off in this seed).
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub browser_reset: u32,
    pub browser_fin: u32,
    pub browser_close: u32,
    pub garbage: u32,
    pub backend_reset: u32,
    pub backend_fin: u32,
    pub revoke_message: u32,
    pub revoke_lost: u32,
    pub drain: u32,
    pub stall_browser: u32,
    pub stall_backend: u32,
    pub lost_wakeup: u32,
    pub clock_jump: u32,
    /// A long quiet while: hundreds of timer ticks with IO turns but no
    /// peer acting (a frozen tab, a backend with nothing to say).
    pub long_wait: u32,
    /// A healthy moment: the clock stops, every peer answers until nothing
    /// moves, and every relay must then be drained (see `World::settle`).
    pub quiet_moment: u32,
}

/// How busy each actor is: chances per world step, per mille.
#[derive(Debug, Clone, Copy)]
pub struct Tempo {
    pub browser_generate: u32,
    pub browser_write: u32,
    pub browser_read: u32,
    pub backend_write: u32,
    pub backend_read: u32,
    pub io_turn: u32,
    /// Time passes (up to two timer ticks).
    pub clock: u32,
}

/// Appliance sessions whose VNC server wants a password: the appliance
/// authenticates itself and offers the browser security type None.
#[derive(Debug, Clone)]
pub struct RfbPlan {
    /// The admissions' password.
    pub password: String,
    /// The backends accept it (else they refuse: close 1011).
    pub backend_accepts: bool,
    /// Chance per browser, per mille, that it sends its three security
    /// messages at once instead of waiting for each answer.
    pub pipelined: u32,
}

/// wss: the worker has a TLS config; browsers sniffed as TLS or plain.
#[derive(Debug, Clone, Copy)]
pub struct TlsPlan {
    /// Chance per browser, per mille, that it speaks TLS.
    pub share: u32,
    /// Plain connections are refused (`--ssl-only`).
    pub ssl_only: bool,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub io: IoKind,
    pub mode: Mode,
    pub cfg: ProxyConfig,
    /// Browsers that connect during the run.
    pub sessions: usize,
    /// Admissions the control plane made (appliance mode).
    pub admissions: usize,
    /// Capacity of the report mailbox to the control plane.
    pub report_capacity: usize,
    /// Chance per step that the control plane drains it (0: never).
    pub drain_reports: u32,
    /// Steps with random actions before the wind-down.
    pub steps: u64,
    /// io_uring: receive completions per batch at most (the provided
    /// buffers one wait can fill).
    pub recv_completions_per_batch: usize,
    /// epoll: splice pipes in the worker's pool, and their capacity.
    pub pipes: usize,
    pub pipe_bytes: usize,
    /// Socket buffer sizes (each way) of the simulated legs.
    pub link_bytes: usize,
    pub faults: Faults,
    pub tempo: Tempo,
    pub rfb: Option<RfbPlan>,
    /// Appliance sessions to VMware consoles: the admissions' targets are
    /// WebMKS (TLS, then a WebSocket whose frames pass through).
    pub webmks: bool,
    pub tls: Option<TlsPlan>,
    pub mutation: Option<Mutation>,
}

impl Plan {
    pub fn new(seed: u64, rng: &mut Rng, steps: u64) -> Self {
        let io = if rng.chance(500) {
            IoKind::Epoll
        } else {
            IoKind::Uring
        };
        let mode = if rng.chance(500) {
            Mode::Proxy
        } else {
            Mode::Appliance
        };
        let limits = random_limits(rng);
        let tls = rng.chance(250).then(|| TlsPlan {
            share: rng.pick(&[500, 1000]),
            ssl_only: rng.chance(200),
        });
        let cfg = ProxyConfig {
            listen: "127.0.0.1:0".parse().expect("a literal address"),
            target: match mode {
                Mode::Proxy => TargetConfig::Fixed(Target::vnc(
                    PROXY_BACKEND.parse().expect("a literal address"),
                    None,
                )),
                Mode::Appliance => TargetConfig::Appliance,
            },
            tls: tls.map(|t| TlsFiles {
                // Never read: the simulation hands the worker its config.
                cert: "sim.pem".into(),
                key: "sim.pem".into(),
                ssl_only: t.ssl_only,
            }),
            web_dir: None,
            origins: vec![],
            workers: 1,
            io: match io {
                IoKind::Epoll => IoChoice::Epoll,
                IoKind::Uring => IoChoice::Uring,
            },
            pin_workers: false,
            limits,
        };
        if let Err(e) = cfg.validate() {
            panic!("the simulator made an invalid config: {e}");
        }
        let pipes = if cfg.limits.splice_min_bytes > 0 {
            rng.range(0, cfg.limits.splice_pipes_per_worker)
        } else {
            0
        };
        let mut plan = Self {
            seed,
            io,
            mode,
            sessions: rng.range(1, 4),
            admissions: rng.range(1, 3),
            report_capacity: rng.range(1, 4),
            drain_reports: rng.pick(&[0, 5, 100, 500]),
            steps,
            recv_completions_per_batch: rng.range(1, 4),
            pipes,
            pipe_bytes: rng
                .pick(&[4096, 16 * 1024, 64 * 1024])
                .min(cfg.limits.splice_pipe_bytes),
            link_bytes: rng.pick(&[1, 100, 3000, 3000, 64 * 1024, 64 * 1024]),
            faults: random_faults(rng),
            tempo: random_tempo(rng),
            rfb: (mode == Mode::Appliance && rng.chance(350)).then(|| RfbPlan {
                password: "s3cret".into(),
                backend_accepts: rng.chance(900),
                pipelined: rng.pick(&[0, 300, 1000]),
            }),
            tls,
            mutation: None,
            cfg,
            webmks: false,
        };
        // WebMKS or the VNC security phase, not both (one target kind per
        // run). Drawn from a generator of its own: the main one's draws
        // stay those of the VNC-only simulator, whose seeds replay.
        plan.webmks = mode == Mode::Appliance
            && plan.rfb.is_none()
            && Rng::new(seed ^ WEBMKS_DRAW_SALT).chance(500);
        plan
    }

    pub fn limits(&self) -> &Limits {
        &self.cfg.limits
    }

    /// The longest timeout in force (the wind-down waits past it).
    pub fn longest_timeout(&self) -> Duration {
        let l = self.limits();
        let ms = [
            l.handshake_timeout_ms,
            l.connect_timeout_ms,
            l.idle_timeout_ms,
            l.close_timeout_ms.max(5_000),
            l.heartbeat_ms,
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        Duration::from_millis(ms)
    }

    /// One line for the failure report.
    pub fn summary(&self) -> String {
        let l = self.limits();
        format!(
            "seed={} io={:?} mode={:?} rfb={:?} webmks={} tls={:?} sessions={} admissions={} reports_cap={} drain_reports={}‰ \
             buffer_bytes={} recv_buffer_bytes={} max_frame_bytes={} splice_min_bytes={} pipes={} \
             link_bytes={} completions/batch={} timeouts(ms): handshake={} connect={} idle={} \
             heartbeat={} close={} tick={} faults={:?} tempo={:?} mutation={:?}",
            self.seed,
            self.io,
            self.mode,
            self.rfb,
            self.webmks,
            self.tls,
            self.sessions,
            self.admissions,
            self.report_capacity,
            self.drain_reports,
            l.buffer_bytes,
            l.recv_buffer_bytes,
            l.max_frame_bytes,
            l.splice_min_bytes,
            self.pipes,
            self.link_bytes,
            self.recv_completions_per_batch,
            l.handshake_timeout_ms,
            l.connect_timeout_ms,
            l.idle_timeout_ms,
            l.heartbeat_ms,
            l.close_timeout_ms,
            l.timer_tick_ms,
            self.faults,
            self.tempo,
            self.mutation,
        )
    }
}

/// Mixed into the seed for the WebMKS draw (any constant will do).
const WEBMKS_DRAW_SALT: u64 = 0x0057_4542_4d4b_5300;

/// The fixed backend of proxy mode (never dialled: the world plays it).
pub const PROXY_BACKEND: &str = "127.0.0.1:5900";

/// Valid limits (`ProxyConfig::validate` passes), as small as allowed so
/// that queues reach their bounds within a few hundred steps.
fn random_limits(rng: &mut Rng) -> Limits {
    let recv = rng.pick(&[1024, 1500, 4096, 16 * 1024]);
    let splice_min = if rng.chance(300) {
        0
    } else {
        rng.pick(&[1, 512, recv / 2, recv]).min(recv)
    };
    Limits {
        buffer_bytes: rng.pick(&[4096, 5000, 8192, 16 * 1024, 64 * 1024]),
        recv_buffer_bytes: recv,
        max_frame_bytes: rng.pick(&[64, 1000, 4096, 1 << 20]),
        max_request_bytes: rng.pick(&[512, 1024, 8192]),
        handshake_timeout_ms: rng.range(20, 3000) as u64,
        connect_timeout_ms: rng.range(20, 3000) as u64,
        idle_timeout_ms: if rng.chance(400) {
            0
        } else {
            rng.range(100, 10_000) as u64
        },
        heartbeat_ms: if rng.chance(400) {
            0
        } else {
            rng.range(30, 2000) as u64
        },
        close_timeout_ms: rng.range(20, 2000) as u64,
        timer_tick_ms: rng.range(5, 200) as u64,
        max_sessions_per_worker: if rng.chance(150) { 2 } else { 50_000 },
        max_handshaking_connections: if rng.chance(150) {
            rng.range(1, 2)
        } else {
            4096
        },
        pool_max_free_buffers: rng.range(0, 8),
        splice_min_bytes: splice_min,
        splice_pipe_bytes: rng.pick(&[4096, 64 * 1024, 256 * 1024]),
        splice_pipes_per_worker: rng.range(1, 4),
        ..Limits::default()
    }
}

fn random_tempo(rng: &mut Rng) -> Tempo {
    let mut pace = || rng.pick(&[100, 300, 600, 900]);
    Tempo {
        browser_generate: pace(),
        browser_write: pace(),
        browser_read: pace(),
        backend_write: pace(),
        backend_read: pace(),
        io_turn: pace(),
        clock: rng.pick(&[20, 100, 300]),
    }
}

fn random_faults(rng: &mut Rng) -> Faults {
    let mut on = |rate: u32| if rng.chance(500) { rate } else { 0 };
    Faults {
        browser_reset: on(2),
        browser_fin: on(2),
        browser_close: on(3),
        garbage: on(3),
        backend_reset: on(2),
        backend_fin: on(3),
        revoke_message: on(2),
        revoke_lost: on(2),
        drain: on(1),
        stall_browser: on(20),
        stall_backend: on(20),
        lost_wakeup: on(30),
        clock_jump: on(10),
        long_wait: on(2),
        quiet_moment: on(3),
    }
}
