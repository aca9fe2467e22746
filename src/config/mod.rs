//! Typed configuration of the data plane: every limit the relay obeys, each
//! named with its unit.
//!
//! This module only describes values and validates them; it opens no socket
//! and reads no file except what a caller hands it. The CLI (`main.rs`) fills
//! a [`ProxyConfig`] from websockify-compatible flags; the appliance mode will
//! fill the same struct from TOML.

pub mod appliance;
pub mod events;
pub mod network;
pub mod secrets;
pub mod users;

use std::net::SocketAddr;
use std::path::PathBuf;

/// Which IO backend drives the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoChoice {
    /// Probe io_uring at start-up and fall back to epoll when it is blocked.
    Auto,
    Uring,
    Epoll,
}

impl std::str::FromStr for IoChoice {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "uring" | "io_uring" => Ok(Self::Uring),
            "epoll" => Ok(Self::Epoll),
            other => Err(ConfigError::Invalid {
                key: "io",
                message: format!("unknown io backend {other:?}: expected auto, uring or epoll"),
            }),
        }
    }
}

/// Where a browser session is relayed to.
#[derive(Debug, Clone)]
pub enum TargetConfig {
    /// One fixed backend for every connection (`consolegate proxy SRC
    /// HOST:PORT`, or a `wss://` URL for a WebMKS endpoint).
    Fixed(crate::mailbox::Target),
    /// websockify's TokenFile plugin: `?token=` picks the backend.
    TokenFile { source: PathBuf },
    /// Appliance mode: sessions admitted by the control plane
    /// (`/proxy/{session_id}?token=<ticket>`).
    Appliance,
}

/// TLS on the browser leg.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Refuse plain (non-TLS) connections.
    pub ssl_only: bool,
}

/// Limits of one relay session and of each worker. Every field carries its
/// unit; the defaults are what a console needs, with the cost written beside.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Bytes buffered per direction per session before the reading side is
    /// paused (backpressure). Cost: at most 2× this per busy session; idle
    /// sessions hold no buffer (buffers come from the worker's pool).
    pub buffer_bytes: usize,
    /// Largest WebSocket frame payload accepted from a browser (close 1009
    /// beyond). VNC client messages are tiny; 1 MiB leaves room for clipboard.
    pub max_frame_bytes: u64,
    /// Largest HTTP request head (the upgrade request) in bytes (431 beyond).
    pub max_request_bytes: usize,
    /// Most HTTP headers in the upgrade request.
    pub max_headers: usize,
    /// Time from accept to a complete upgrade request (slowloris guard).
    pub handshake_timeout_ms: u64,
    /// Time allowed for the backend TCP connect.
    pub connect_timeout_ms: u64,
    /// Close a session with no traffic in either direction for this long
    /// (0 = never).
    pub idle_timeout_ms: u64,
    /// Send a WebSocket ping this often (0 = never). Keep it under the common
    /// 60 s load-balancer idle limit.
    pub heartbeat_ms: u64,
    /// After SIGTERM: time live sessions keep running before they are closed
    /// with 1001.
    pub drain_grace_ms: u64,
    /// After we send a close frame: time we wait for the browser's reply
    /// before dropping the connection.
    pub close_timeout_ms: u64,
    /// Live sessions per worker; further accepts are closed at once.
    pub max_sessions_per_worker: usize,
    /// Free buffers a worker keeps for reuse (the rest are freed).
    pub pool_max_free_buffers: usize,
    /// Largest static file served by `--web`.
    pub web_max_file_bytes: u64,
    /// How often the token file's modification time is checked.
    pub token_reload_interval_ms: u64,
    /// Most tokens read from a token source.
    pub max_tokens: usize,
    /// Largest token file read.
    pub token_max_file_bytes: u64,
    /// Granularity of the worker's timer scan.
    pub timer_tick_ms: u64,
    /// Connections accepted per listener wake-up before other work runs.
    pub accept_batch_max: usize,
    /// io_uring: submission queue entries per worker ring.
    pub uring_entries: u32,
    /// io_uring: provided buffers per worker (each `recv_buffer_bytes`).
    /// Cost: count × size resident per worker (the kernel cycles through
    /// all of them); a buffer is held only from a receive's completion until
    /// its bytes are queued, so a few per busy session in one batch suffice.
    pub uring_provided_buffers: u16,
    /// Size of one receive buffer (one read from a socket at most).
    pub recv_buffer_bytes: usize,
    /// After a loop turn that did work, keep polling without sleeping for
    /// this long before blocking (0 = never). Waking a halted vCPU costs
    /// tens of microseconds on virtual machines; spinning briefly after
    /// traffic avoids it. Cost: up to this much CPU per burst of traffic,
    /// none while idle.
    pub busy_poll_us: u64,
    /// A worker that accepts a connection while holding more than this many
    /// sessions above the least-loaded worker hands it to that worker before
    /// reading from it (the kernel's SO_REUSEPORT hash is lumpy for a few
    /// sessions). 0 = exact balance; `max_sessions_per_worker` or more =
    /// leave placement to the hash. Cost: a mailbox message and a wake-up of
    /// the other worker per connection handed over.
    pub balance_slack_sessions: usize,
    /// Hand-overs queued per worker at most (beyond, the accepting worker
    /// keeps the connection). Their queue is separate from the control
    /// plane's mailbox, so a connection flood cannot crowd out a revoke.
    pub handoff_queue_connections: usize,
    /// Connections still in their handshake (TLS, HTTP upgrade, ticket
    /// check), across all workers; a connection accepted beyond is closed
    /// at once (counted as `handshaking_over_limit`). Cost: what a flood of
    /// idle or slow connections (slowloris) can hold before
    /// `handshake_timeout_ms` ends them: a descriptor and up to
    /// `max_request_bytes` each. Live relays do not count.
    pub max_handshaking_connections: usize,
    /// epoll, plain-ws binary sessions: once a backend read brings at least
    /// this many bytes, move the following backend bytes to the browser
    /// through a pipe with splice(2) instead of copying them through user
    /// space; a splice that brings fewer goes back to plain reads. 0 = never
    /// splice. At most `recv_buffer_bytes` (a plain read never brings more).
    /// Cost: three syscalls per frame instead of two, so small messages
    /// (input events, cursor updates) stay on plain reads.
    /// io_uring uses the same threshold for its bulk receive (single-shot
    /// recvs straight into frame chunks instead of multishot recvs into the
    /// provided-buffer ring and a copy); 0 turns that off too. Cost there:
    /// a pool chunk per read in flight, and a poll round trip when the
    /// backend pauses.
    pub splice_min_bytes: usize,
    /// Capacity asked of each splice pipe (F_SETPIPE_SZ; clamped to
    /// /proc/sys/fs/pipe-max-size, the kernel's default when refused). One
    /// spliced frame carries at most this much (and at most `buffer_bytes`).
    /// Cost: up to this much kernel memory per pipe while it holds data.
    pub splice_pipe_bytes: usize,
    /// Pipes a worker holds for splicing (in use plus kept for reuse). A
    /// session takes one only while spliced bytes wait in it; when all are
    /// taken, sessions use the copying path. Cost: two file descriptors per
    /// pipe, and up to `splice_pipe_bytes` of kernel memory per pipe in use.
    pub splice_pipes_per_worker: usize,
    /// io_uring: splice bulk downstream like epoll (the worker's own
    /// non-blocking splice(2) calls, woken by POLL_ADD completions, through
    /// the same pipe pool) instead of bulk receives into the provided-buffer
    /// ring. On by default: on a quiet machine it cut io_uring's CPU per GB
    /// of bulk downstream by ~28 % and brought it to epoll's level
    /// (docs/BENCHMARKS.md, "io_uring downstream CPU on a quiet machine").
    /// Cost: as for epoll's splicing.
    pub uring_splice: bool,
    /// Connections to `/ws/console/{vm}` a worker holds parked while the
    /// control plane authenticates them and acquires their console (each
    /// for at most `connect_timeout_ms`); beyond, 503 at once. Cost: a
    /// descriptor, the request's upgrade fields and a control-plane task
    /// each; they count among `max_handshaking_connections` too.
    pub max_parked_console_requests_per_worker: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            buffer_bytes: 256 * 1024,
            max_frame_bytes: 1024 * 1024,
            max_request_bytes: 8 * 1024,
            max_headers: 48,
            handshake_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            idle_timeout_ms: 0,
            heartbeat_ms: 0,
            drain_grace_ms: 5_000,
            close_timeout_ms: 1_000,
            max_sessions_per_worker: 50_000,
            pool_max_free_buffers: 64,
            web_max_file_bytes: 8 * 1024 * 1024,
            token_reload_interval_ms: 1_000,
            max_tokens: 100_000,
            token_max_file_bytes: 16 * 1024 * 1024,
            timer_tick_ms: 100,
            accept_batch_max: 256,
            uring_entries: 4096,
            uring_provided_buffers: 128,
            recv_buffer_bytes: 64 * 1024,
            busy_poll_us: 0,
            balance_slack_sessions: 0,
            handoff_queue_connections: 1024,
            max_handshaking_connections: 4096,
            splice_min_bytes: 16 * 1024,
            splice_pipe_bytes: 256 * 1024,
            splice_pipes_per_worker: 64,
            uring_splice: true,
            max_parked_console_requests_per_worker: 256,
        }
    }
}

/// Everything the data plane needs to run `consolegate proxy`.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub target: TargetConfig,
    pub tls: Option<TlsFiles>,
    pub web_dir: Option<PathBuf>,
    /// Allowed `Origin` values; empty = any (with a warning at start-up).
    pub origins: Vec<String>,
    /// Worker threads; 0 = one per core.
    pub workers: usize,
    pub io: IoChoice,
    /// Pin each worker to its own core (when there are no more workers
    /// than cores).
    pub pin_workers: bool,
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

impl ProxyConfig {
    /// Check cross-field rules and ranges; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |key: &'static str, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        if l.recv_buffer_bytes < 1024 || l.recv_buffer_bytes > 16 * 1024 * 1024 {
            return bad("recv_buffer_bytes", "must be between 1 KiB and 16 MiB");
        }
        if l.buffer_bytes < 4096 {
            return bad("buffer_bytes", "must be at least 4096");
        }
        if l.max_frame_bytes == 0 {
            return bad("max_frame_bytes", "must be positive");
        }
        if l.max_request_bytes < 256 || l.max_request_bytes > 1024 * 1024 {
            return bad("max_request_bytes", "must be between 256 B and 1 MiB");
        }
        if l.max_headers == 0 || l.max_headers > 64 {
            return bad("max_headers", "must be between 1 and 64");
        }
        if l.handshake_timeout_ms == 0 {
            return bad("handshake_timeout_ms", "must be positive");
        }
        if l.connect_timeout_ms == 0 {
            return bad("connect_timeout_ms", "must be positive");
        }
        if l.timer_tick_ms == 0 || l.timer_tick_ms > 1000 {
            return bad("timer_tick_ms", "must be between 1 and 1000");
        }
        if l.max_sessions_per_worker == 0 {
            return bad("max_sessions_per_worker", "must be positive");
        }
        if l.accept_batch_max == 0 {
            return bad("accept_batch_max", "must be positive");
        }
        if l.max_handshaking_connections == 0 || l.max_handshaking_connections > 10_000_000 {
            return bad(
                "max_handshaking_connections",
                "must be between 1 and 10000000",
            );
        }
        if l.max_parked_console_requests_per_worker == 0
            || l.max_parked_console_requests_per_worker > 1_000_000
        {
            return bad(
                "max_parked_console_requests_per_worker",
                "must be between 1 and 1000000",
            );
        }
        if l.handoff_queue_connections == 0 || l.handoff_queue_connections > 1_000_000 {
            return bad("handoff_queue_connections", "must be between 1 and 1000000");
        }
        if !l.uring_entries.is_power_of_two() || l.uring_entries < 64 {
            return bad("uring_entries", "must be a power of two ≥ 64");
        }
        if !l.uring_provided_buffers.is_power_of_two() || l.uring_provided_buffers < 16 {
            return bad(
                "uring_provided_buffers",
                "must be a power of two between 16 and 32768",
            );
        }
        if l.splice_min_bytes > l.recv_buffer_bytes {
            return bad(
                "splice_min_bytes",
                "must be at most recv_buffer_bytes (0 turns splicing off)",
            );
        }
        if l.splice_min_bytes > 0 {
            if l.splice_pipe_bytes < 4096 || l.splice_pipe_bytes > 64 * 1024 * 1024 {
                return bad("splice_pipe_bytes", "must be between 4 KiB and 64 MiB");
            }
            if l.splice_pipes_per_worker == 0 {
                return bad(
                    "splice_pipes_per_worker",
                    "must be positive (set splice_min_bytes = 0 to turn splicing off)",
                );
            }
        }
        Ok(())
    }

    /// The number of workers to start: `workers`, or one per core.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ProxyConfig {
        ProxyConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            target: TargetConfig::Fixed(crate::mailbox::Target::vnc(
                "127.0.0.1:5900".parse().unwrap(),
                None,
            )),
            tls: None,
            web_dir: None,
            origins: vec![],
            workers: 0,
            io: IoChoice::Auto,
            pin_workers: true,
            limits: Limits::default(),
        }
    }

    #[test]
    fn defaults_validate() {
        cfg().validate().unwrap();
        assert!(cfg().worker_count() >= 1);
    }

    #[test]
    fn errors_name_the_key() {
        let mut c = cfg();
        c.limits.uring_entries = 100;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("uring_entries"), "{e}");
        let mut c = cfg();
        c.limits.handshake_timeout_ms = 0;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("handshake_timeout_ms"));
    }

    #[test]
    fn splice_limits_validate() {
        let mut c = cfg();
        c.limits.splice_min_bytes = c.limits.recv_buffer_bytes + 1;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("splice_min_bytes"), "{e}");
        let mut c = cfg();
        c.limits.splice_pipe_bytes = 100;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("splice_pipe_bytes"), "{e}");
        let mut c = cfg();
        c.limits.splice_pipes_per_worker = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("splice_pipes_per_worker"), "{e}");
        // Splicing off: the pipe limits are not looked at.
        c.limits.splice_min_bytes = 0;
        c.limits.splice_pipe_bytes = 0;
        c.validate().unwrap();
    }

    #[test]
    fn io_choice_parses() {
        assert_eq!("uring".parse::<IoChoice>().unwrap(), IoChoice::Uring);
        assert_eq!("epoll".parse::<IoChoice>().unwrap(), IoChoice::Epoll);
        assert!("kqueue"
            .parse::<IoChoice>()
            .unwrap_err()
            .to_string()
            .contains("kqueue"));
    }
}
