//! consolegate-bench: measures consolegate against direct TCP, a plain TCP
//! relay and websockify on this machine, all on 127.0.0.1.
//!
//! Layout: `proxy` (proxies under test), `common` (what every benchmark
//! shares), `workload`/`client`/`wsproto` (the blocking clients),
//! `evclient` (the event-driven client for many connections),
//! `echo`/`relay`/`server` (in-process servers), `childserver` (the bench's
//! own servers run as child processes), `child` (child processes), `procfs`
//! (CPU and memory of process trees), `tuning` (host limits), `stats`,
//! `report` and `svg` (figures and reporters), and one module per benchmark
//! (`latency`, `throughput`, `memory`, `handshakes`, `session_start`) plus
//! `all`. `session_start` drives consolegate in appliance mode: `appliance`
//! starts it, `rest` is the client of its control API. `webmks` compares
//! the appliance's `webmks` and `vnc` sessions: `wss_backend` (the stand-in
//! VMware host), `wss_client` (its direct baseline), `tls_cost` (TLS
//! alone), `webmks_load` (its load generators), `webmks_report`. `soak`
//! runs the appliance under steady relays and churn for a bounded time and
//! judges whether it grows (not part of `all`).

mod all;
mod appliance;
mod child;
mod childserver;
mod client;
mod common;
mod console_url;
mod downstream_bulk;
mod echo;
mod evclient;
mod events;
mod handshakes;
mod hypervisors;
mod latency;
mod memory;
mod procfs;
mod proxy;
mod relay;
mod report;
mod rest;
mod server;
mod session_start;
mod soak;
mod stats;
mod svg;
mod throughput;
mod tls_cost;
mod tuning;
mod webmks;
mod webmks_load;
mod webmks_report;
mod workload;
mod wsproto;
mod wss_backend;
mod wss_client;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::all::Bench;
use crate::common::Common;
use crate::memory::SessionCount;
use crate::proxy::ProxyKind;
use crate::rest::HttpMode;
use crate::session_start::PortMode;
use crate::throughput::Direction;

#[derive(Parser)]
#[command(
    version,
    about = "Benchmarks for consolegate (all traffic on 127.0.0.1)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Appliance mode: one live event (a demo session deleted through the
    /// REST API, its `session_closed`) fanned out to 1 000 and 10 000
    /// `/ws/monitor` subscribers: delivery latency p50/p99, the
    /// appliance's CPU per event, RSS per idle subscriber.
    Events {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        opts: events::EventsOpts,
    },
    /// Closed-loop round-trip latency of small messages through each proxy,
    /// and the latency each adds over direct TCP.
    Latency {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        opts: LatencyOpts,
    },
    /// Bulk throughput down (backend → browser) and up (browser → backend),
    /// and the proxy's CPU seconds per GB.
    Throughput {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        opts: ThroughputOpts,
    },
    /// Several bulk downstream sessions at once: proxy CPU per GB, split
    /// by thread (workers, io_uring io-wq, other).
    DownstreamBulk {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        opts: downstream_bulk::DownstreamBulkOpts,
    },
    /// Memory per idle session (PSS) and how many idle sessions stay live.
    Memory {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        opts: MemoryOpts,
    },
    /// WebSocket handshakes per second (connect, upgrade, 101, close).
    Handshakes {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        opts: HandshakeOpts,
    },
    /// Appliance mode: session creation (REST) → WebSocket upgrade → first
    /// relayed byte of the demo console, p50/p99, shared and dedicated ports.
    SessionStart {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        opts: SessionStartOpts,
    },
    /// Appliance mode: consoles opened by VM id in one URL
    /// (`/ws/console/demo:demo?token=…`), JWT (HS256, EdDSA) against the
    /// static bearer token: handshakes per CPU-second and p50/p99.
    ConsoleUrl {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        opts: console_url::ConsoleUrlOpts,
    },
    /// Appliance hypervisor layer (issue 10): console opens under a
    /// thumbnail storm (static hypervisor, slow VNC server), and API-session
    /// economy against the govmomi vSphere simulator.
    Hypervisors {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        opts: hypervisors::HypervisorsOpts,
    },
    /// Appliance mode: a `webmks` session (to a local TLS WebSocket
    /// stand-in for a VMware host) against a `vnc` session of the same
    /// appliance: added latency, CPU-s per GB both ways, and TLS alone.
    /// Takes the latency and throughput options (the same workloads);
    /// concurrency is --webmks-concurrency.
    Webmks {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        latency: LatencyOpts,
        #[command(flatten)]
        throughput: ThroughputOpts,
        #[command(flatten)]
        webmks: WebmksOpts,
    },
    /// Appliance mode for a bounded time (default 1 h): steady relays plus
    /// session churn through every lifecycle path; open descriptors, RSS and
    /// relay latency over time (soak.json, soak.md, soak.svg); exits non-zero
    /// when they grow or unexpected errors happen (what `make soak` runs).
    Soak {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        opts: SoakOpts,
    },
    /// Every benchmark in one run, one combined report (what `make bench` runs).
    All {
        #[command(flatten)]
        common: CommonArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        latency: LatencyOpts,
        #[command(flatten)]
        throughput: ThroughputOpts,
        #[command(flatten)]
        memory: MemoryOpts,
        #[command(flatten)]
        handshakes: HandshakeOpts,
        #[command(flatten)]
        session_start: SessionStartOpts,
        #[command(flatten)]
        downstream_bulk: downstream_bulk::DownstreamBulkOpts,
        #[command(flatten)]
        webmks: WebmksOpts,
        #[command(flatten)]
        events: all::AllEventsArgs,
        #[command(flatten)]
        console_url: all::AllConsoleUrlArgs,
        /// Benchmarks to leave out.
        #[arg(long, value_enum, value_delimiter = ',')]
        skip: Vec<Bench>,
    },
    /// (internal) The plain TCP relay as a child process of the bench.
    #[command(hide = true)]
    RelayServer {
        #[arg(long)]
        backend: SocketAddr,
        #[arg(long, default_value_t = 3600)]
        max_lifetime_s: u64,
    },
    /// (internal) The silent (echo-on-demand) backend as a child process.
    #[command(hide = true)]
    SinkServer {
        #[arg(long, default_value_t = 3600)]
        max_lifetime_s: u64,
    },
}

#[derive(Args)]
struct CommonArgs {
    /// Proxies under test, in order (latency always runs direct TCP first as
    /// the baseline). Memory and handshakes leave plain-relay out unless
    /// --memory-proxies / --handshake-proxies name it.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "plain-relay,websockify,consolegate-epoll,consolegate-uring"
    )]
    proxies: Vec<ProxyKind>,
    /// websockify executable.
    #[arg(long, default_value = "bench/.venv/bin/websockify")]
    websockify: PathBuf,
    /// consolegate executable.
    #[arg(long, default_value = "target/release/consolegate")]
    consolegate: PathBuf,
    /// Extra argument for every consolegate instance (repeatable), e.g.
    /// `--consolegate-arg=--workers=1`.
    #[arg(
        long = "consolegate-arg",
        value_name = "ARG",
        allow_hyphen_values = true
    )]
    consolegate_args: Vec<String>,
    /// Request path of the WebSocket upgrade.
    #[arg(long, default_value = "/")]
    ws_path: String,
    /// Sec-WebSocket-Protocol to offer (none by default).
    #[arg(long)]
    ws_subprotocol: Option<String>,
    /// Connect/read/write timeout of blocking client sockets.
    #[arg(long, default_value_t = 5_000)]
    io_timeout_ms: u64,
    /// How long a proxy may take to start listening.
    #[arg(long, default_value_t = 15_000)]
    startup_timeout_ms: u64,
    /// Where the reports, hgrm/, latency.svg and logs/ go.
    #[arg(long, default_value = "bench/results/manual")]
    out_dir: PathBuf,
    /// Free-form KEY=VALUE recorded in the report (e.g. tool versions).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
}

#[derive(Args)]
struct HostArgs {
    /// sysctl file whose settings are checked (and applied with --apply-sysctl).
    #[arg(long, default_value = "tuning/99-consolegate.conf")]
    tuning_file: PathBuf,
    /// Apply the tuning file's settings that the host does not meet
    /// (`sysctl -w`; changes the machine until reboot).
    #[arg(long)]
    apply_sysctl: bool,
}

#[derive(Args)]
struct LatencyOpts {
    /// Concurrent client sessions, one measurement per value (latency).
    #[arg(long, value_delimiter = ',', default_value = "1,4,64,1000")]
    concurrency: Vec<usize>,
    /// Repetitions of the latency comparison; the report gives the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Payload bytes per latency message.
    #[arg(long, default_value_t = 10)]
    message_bytes: usize,
    /// Round trips per session before measuring (discarded).
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Measured round trips per session, at most.
    #[arg(long, default_value_t = 5000)]
    round_trips: u64,
    /// Measured latency phase per session, at most (warm-up has the same bound).
    #[arg(long, default_value_t = 3_000)]
    time_limit_ms: u64,
}

#[derive(Args)]
struct ThroughputOpts {
    /// Directions to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "down,up")]
    directions: Vec<Direction>,
    /// Repetitions of the throughput comparison.
    #[arg(long, default_value_t = 3)]
    throughput_runs: usize,
    /// Measured payload per proxy × direction × run (e.g. 1GiB, 256MiB, 1000000).
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    throughput_bytes: u64,
    /// Concurrent sessions sharing that budget.
    #[arg(long, default_value_t = 1)]
    throughput_sessions: usize,
    /// Backend write size (down) and client frame payload (up).
    #[arg(long, default_value = "64KiB", value_parser = parse_bytes)]
    chunk_bytes: u64,
    /// Unmeasured payload per session first.
    #[arg(long, default_value = "8MiB", value_parser = parse_bytes)]
    throughput_warmup_bytes: u64,
    /// Measured phase per proxy × direction, at most.
    #[arg(long, default_value_t = 10_000)]
    throughput_time_limit_ms: u64,
}

#[derive(Args)]
struct MemoryOpts {
    /// Idle session counts (numbers or `max`: the most the host's limits allow).
    #[arg(long, value_delimiter = ',', default_value = "1000,8000,max")]
    memory_sessions: Vec<SessionCount>,
    /// Proxies for the memory benchmark (default: --proxies without plain-relay).
    #[arg(long, value_enum, value_delimiter = ',')]
    memory_proxies: Option<Vec<ProxyKind>>,
    /// websockify forks per session: its runs are capped at this count.
    #[arg(long, default_value_t = 1000)]
    websockify_max_sessions: usize,
    /// Handshakes in flight while opening idle sessions.
    #[arg(long, default_value_t = 128)]
    memory_connect_concurrency: usize,
    /// Opening N sessions, at most.
    #[arg(long, default_value_t = 120_000)]
    memory_open_timeout_ms: u64,
    /// Opening stops when no handshake completes for this long.
    #[arg(long, default_value_t = 5_000)]
    memory_stall_ms: u64,
    /// Hold before reading memory.
    #[arg(long, default_value_t = 1_000)]
    memory_hold_ms: u64,
    /// Waiting for PSS to stop moving, at most.
    #[arg(long, default_value_t = 15_000)]
    memory_settle_timeout_ms: u64,
    /// The liveness probe of all sessions, at most.
    #[arg(long, default_value_t = 30_000)]
    memory_probe_timeout_ms: u64,
}

#[derive(Args)]
struct HandshakeOpts {
    /// Proxies for the handshake benchmark (default: --proxies without plain-relay).
    #[arg(long, value_enum, value_delimiter = ',')]
    handshake_proxies: Option<Vec<ProxyKind>>,
    /// Repetitions of the handshake comparison.
    #[arg(long, default_value_t = 3)]
    handshake_runs: usize,
    /// Measured handshakes per proxy and run, at most.
    #[arg(long, default_value_t = 20_000)]
    handshakes: u64,
    /// Handshakes in flight.
    #[arg(long, default_value_t = 16)]
    handshake_concurrency: usize,
    /// Measured phase per proxy and run, at most.
    #[arg(long, default_value_t = 5_000)]
    handshake_time_limit_ms: u64,
    /// Unmeasured handshakes first.
    #[arg(long, default_value_t = 500)]
    handshake_warmup: u64,
}

#[derive(Args)]
struct SessionStartOpts {
    /// consolegate variants for session-start (default: the consolegate
    /// ones in --proxies).
    #[arg(long, value_enum, value_delimiter = ',')]
    session_start_proxies: Option<Vec<ProxyKind>>,
    /// Port modes: the shared console port and/or a dedicated port per session.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "shared,dedicated"
    )]
    session_start_modes: Vec<PortMode>,
    /// Client threads, each creating and opening sessions back to back; one
    /// cell per value.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    session_start_concurrency: Vec<usize>,
    /// Measured samples per cell, at most.
    #[arg(long, default_value_t = 2000)]
    session_start_samples: u64,
    /// Unmeasured samples per cell first.
    #[arg(long, default_value_t = 50)]
    session_start_warmup: u64,
    /// Measured phase per cell, at most (the warm-up has the same bound).
    #[arg(long, default_value_t = 20_000)]
    session_start_time_limit_ms: u64,
    /// REST connections: one kept alive per client thread, or a new one per
    /// request.
    #[arg(long, value_enum, default_value = "keep-alive")]
    session_start_http: HttpMode,
    /// Where the appliances keep their state (dedicated-port allocations,
    /// fsynced on every change), one subdirectory per cell; default: inside
    /// --out-dir. E.g. a tmpfs to take the disk out of the figure.
    #[arg(long, value_name = "DIR")]
    session_start_state_dir: Option<PathBuf>,
}

#[derive(Args)]
struct SoakOpts {
    /// io backend of the soaked appliance.
    #[arg(long, value_enum, default_value = "uring")]
    io: soak::SoakIo,
    /// Length of the workload, s.
    #[arg(long, default_value_t = 3600)]
    duration_s: u64,
    /// Sampling interval, s.
    #[arg(long, default_value_t = 10)]
    interval_s: u64,
    /// Share of the run, from its start, left out of the growth verdict…
    #[arg(long, default_value_t = 0.1)]
    warmup_fraction: f64,
    /// …but at least this long (at most half the run). io_uring workers
    /// touch their provided receive buffers (workers × 128 × 64 KiB = 16 MiB
    /// by default) one after the other, so RSS climbs until the ring has
    /// gone round once: about 4 minutes at the default workload (~35 KiB/s
    /// received per worker); a lighter workload needs a longer warm-up. The
    /// buffer pools, the registry's closed sessions and the workers'
    /// tombstones fill within 3 minutes (docs/RELIABILITY.md, "Soak").
    #[arg(long, default_value_t = 300.0)]
    warmup_min_s: f64,
    /// Long-lived sessions relaying round trips to the echo backend.
    #[arg(long, default_value_t = 50)]
    steady_sessions: usize,
    /// Round trips per second of each steady session.
    #[arg(long, default_value_t = 10.0)]
    steady_round_trips_per_s: f64,
    /// Payload bytes of each round trip.
    #[arg(long, default_value_t = 64)]
    message_bytes: usize,
    /// Churn operations per second, all kinds together (two thirds of them
    /// create a session).
    #[arg(long, default_value_t = 20.0)]
    churn_per_s: f64,
    /// Threads running the churn.
    #[arg(long, default_value_t = 4)]
    churn_threads: usize,
    /// Churn operations to run (default: all; e.g. to soak one path).
    #[arg(long, value_enum, value_delimiter = ',')]
    churn_kinds: Option<Vec<soak::churn::Kind>>,
    /// Descriptors the appliance may grow by (samples after the warm-up;
    /// idle after the workload vs before it).
    #[arg(long, default_value_t = 8.0)]
    fd_allowance: f64,
    /// RSS may grow by this share of its early mean, percent…
    #[arg(long, default_value_t = 5.0)]
    rss_allowance_percent: f64,
    /// …or by this many MiB, whichever is larger.
    #[arg(long, default_value_t = 4.0)]
    rss_allowance_mib: f64,
    /// Unexpected errors tolerated (expected refusals are not errors).
    #[arg(long, default_value_t = 0)]
    max_unexpected_errors: u64,
    /// Where the appliance keeps its state (dedicated-port allocations);
    /// default: inside --out-dir.
    #[arg(long, value_name = "DIR")]
    soak_state_dir: Option<PathBuf>,
}

impl SoakOpts {
    fn config(&self, common: &Common) -> soak::SoakConfig {
        soak::SoakConfig {
            io: self.io,
            duration_s: self.duration_s,
            interval_s: self.interval_s,
            steady_sessions: self.steady_sessions,
            steady_round_trips_per_s: self.steady_round_trips_per_s,
            message_bytes: self.message_bytes,
            churn_per_s: self.churn_per_s,
            churn_threads: self.churn_threads,
            churn_kinds: self
                .churn_kinds
                .clone()
                .unwrap_or_else(|| soak::churn::KINDS.to_vec()),
            allowances: soak::judge::Allowances {
                warmup_fraction: self.warmup_fraction,
                warmup_min_s: self.warmup_min_s,
                fd_count: self.fd_allowance,
                rss_percent: self.rss_allowance_percent,
                rss_floor_kib: self.rss_allowance_mib * 1024.0,
                unexpected_errors: self.max_unexpected_errors,
            },
            state_dir: self.soak_state_dir.clone(),
            common: common.clone(),
        }
    }
}

impl SessionStartOpts {
    fn config(&self, proxies: &[ProxyKind], common: &Common) -> session_start::SessionStartConfig {
        let proxies = match &self.session_start_proxies {
            Some(p) => p.clone(),
            None => session_start::consolegate_variants(proxies),
        };
        session_start::SessionStartConfig {
            proxies,
            modes: self.session_start_modes.clone(),
            concurrency: self.session_start_concurrency.clone(),
            samples: self.session_start_samples,
            warmup: self.session_start_warmup,
            time_limit_ms: self.session_start_time_limit_ms,
            http: self.session_start_http,
            state_root: self.session_start_state_dir.clone(),
            common: common.clone(),
        }
    }
}

#[derive(Args)]
struct WebmksOpts {
    /// Concurrent sessions per latency measurement of the webmks benchmark
    /// (its runs are --runs; its other options are the latency and
    /// throughput benchmarks').
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    webmks_concurrency: Vec<usize>,
    /// Plaintext bytes of each TLS-alone measurement (default: --throughput-bytes).
    #[arg(long, value_parser = parse_bytes)]
    webmks_tls_bytes: Option<u64>,
}

impl WebmksOpts {
    fn config(
        &self,
        latency: &LatencyOpts,
        throughput: &ThroughputOpts,
        proxies: &[ProxyKind],
        common: &Common,
    ) -> webmks::WebmksConfig {
        webmks::WebmksConfig {
            proxies: session_start::consolegate_variants(proxies),
            runs: latency.runs,
            concurrency: self.webmks_concurrency.clone(),
            message_bytes: latency.message_bytes,
            warmup_round_trips: latency.warmup,
            round_trips: latency.round_trips,
            time_limit_ms: latency.time_limit_ms,
            directions: throughput.directions.clone(),
            sessions: throughput.throughput_sessions,
            bytes: throughput.throughput_bytes,
            chunk_bytes: usize::try_from(throughput.chunk_bytes).unwrap_or(usize::MAX),
            warmup_bytes: throughput.throughput_warmup_bytes,
            throughput_time_limit_ms: throughput.throughput_time_limit_ms,
            tls_cost_bytes: self.webmks_tls_bytes.unwrap_or(throughput.throughput_bytes),
            common: common.clone(),
        }
    }
}

/// `123`, `64KiB`, `256MiB`, `1GiB`, `10MB`, `1GB` (KB/MB/GB decimal).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 256MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => return Err(format!("{s:?}: unknown unit {other:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?}: too large"))
}

fn parse_meta(items: &[String]) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| anyhow!("--meta {kv:?}: expected KEY=VALUE"))
        })
        .collect()
}

impl CommonArgs {
    fn common(&self) -> Result<Common> {
        Ok(Common {
            websockify: self.websockify.clone(),
            consolegate: self.consolegate.clone(),
            consolegate_args: self.consolegate_args.clone(),
            bench_exe: std::env::current_exe().context("locating this executable")?,
            ws_path: self.ws_path.clone(),
            ws_subprotocol: self.ws_subprotocol.clone(),
            startup_timeout_ms: self.startup_timeout_ms,
            io_timeout_ms: self.io_timeout_ms,
            out_dir: self.out_dir.clone(),
            meta: parse_meta(&self.meta)?,
        })
    }
}

/// The proxies of a benchmark that leaves plain-relay out by default.
fn without_relay(explicit: &Option<Vec<ProxyKind>>, all: &[ProxyKind]) -> Vec<ProxyKind> {
    match explicit {
        Some(v) => v.clone(),
        None => all
            .iter()
            .copied()
            .filter(|p| !matches!(p, ProxyKind::PlainRelay | ProxyKind::Direct))
            .collect(),
    }
}

impl LatencyOpts {
    fn config(&self, proxies: &[ProxyKind], common: &Common) -> latency::LatencyConfig {
        latency::LatencyConfig {
            proxies: proxies.to_vec(),
            concurrency: self.concurrency.clone(),
            runs: self.runs,
            message_bytes: self.message_bytes,
            warmup_round_trips: self.warmup,
            round_trips: self.round_trips,
            time_limit_ms: self.time_limit_ms,
            common: common.clone(),
        }
    }
}

impl ThroughputOpts {
    fn config(&self, proxies: &[ProxyKind], common: &Common) -> throughput::ThroughputConfig {
        throughput::ThroughputConfig {
            proxies: proxies.to_vec(),
            directions: self.directions.clone(),
            runs: self.throughput_runs,
            sessions: self.throughput_sessions,
            bytes: self.throughput_bytes,
            chunk_bytes: usize::try_from(self.chunk_bytes).unwrap_or(usize::MAX),
            warmup_bytes: self.throughput_warmup_bytes,
            time_limit_ms: self.throughput_time_limit_ms,
            common: common.clone(),
        }
    }
}

impl MemoryOpts {
    fn config(&self, proxies: &[ProxyKind], common: &Common) -> memory::MemoryConfig {
        memory::MemoryConfig {
            proxies: without_relay(&self.memory_proxies, proxies),
            sessions: self.memory_sessions.clone(),
            websockify_max_sessions: self.websockify_max_sessions,
            connect_concurrency: self.memory_connect_concurrency,
            open_timeout_ms: self.memory_open_timeout_ms,
            stall_ms: self.memory_stall_ms,
            hold_ms: self.memory_hold_ms,
            settle_timeout_ms: self.memory_settle_timeout_ms,
            probe_timeout_ms: self.memory_probe_timeout_ms,
            common: common.clone(),
        }
    }
}

impl HandshakeOpts {
    fn config(&self, proxies: &[ProxyKind], common: &Common) -> handshakes::HandshakeConfig {
        handshakes::HandshakeConfig {
            proxies: without_relay(&self.handshake_proxies, proxies),
            runs: self.handshake_runs,
            count: self.handshakes,
            concurrency: self.handshake_concurrency,
            time_limit_ms: self.handshake_time_limit_ms,
            warmup: self.handshake_warmup,
            common: common.clone(),
        }
    }
}

/// SIGINT/SIGTERM end the run early but cleanly (children killed, partial
/// results written); a second SIGINT exits at once.
fn install_signal_handlers() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, stop.clone())?;
    signal_hook::flag::register(SIGINT, stop.clone())?;
    signal_hook::flag::register(SIGTERM, stop.clone())?;
    Ok(stop)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("consolegate-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the open-file limit, reads the host's limits, and writes
/// `tuning.txt`.
fn prepare_host(host: &HostArgs, common: &Common) -> Result<tuning::Tuning> {
    let t = tuning::prepare(&host.tuning_file, host.apply_sysctl);
    eprint!("{}", t.render());
    std::fs::create_dir_all(&common.out_dir)?;
    std::fs::write(common.out_dir.join("tuning.txt"), t.render())?;
    Ok(t)
}

fn exit_code(interrupted: bool) -> ExitCode {
    if interrupted {
        eprintln!("consolegate-bench: interrupted; partial results written");
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::RelayServer {
            backend,
            max_lifetime_s,
        } => {
            tuning::raise_nofile();
            childserver::relay_server(backend, Duration::from_secs(max_lifetime_s))?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::SinkServer { max_lifetime_s } => {
            tuning::raise_nofile();
            childserver::sink_server(Duration::from_secs(max_lifetime_s))?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let stop = install_signal_handlers().context("installing signal handlers")?;
    match cli.command {
        Command::Events { common, host, opts } => {
            let c = common.common()?;
            prepare_host(&host, &c)?;
            let ok = events::run(&c, &opts, stop.clone())?;
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Ok(exit_code(true));
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Latency { common, host, opts } => {
            let c = common.common()?;
            prepare_host(&host, &c)?;
            let report = latency::run(opts.config(&common.proxies, &c), stop)?;
            if report.run.interrupted {
                return Ok(exit_code(true));
            }
            // Without the baseline no added latency exists: that is a failed run.
            if report
                .median
                .iter()
                .any(|s| s.proxy == ProxyKind::Direct && s.runs_ok == 0)
            {
                eprintln!("consolegate-bench: the direct-TCP baseline failed");
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Throughput { common, host, opts } => {
            let c = common.common()?;
            prepare_host(&host, &c)?;
            let r = throughput::run(opts.config(&common.proxies, &c), stop)?;
            Ok(exit_code(r.run.interrupted))
        }
        Command::DownstreamBulk { common, host, opts } => {
            let c = common.common()?;
            prepare_host(&host, &c)?;
            let r = downstream_bulk::run(opts.config(&common.proxies, &c), stop)?;
            Ok(exit_code(r.run.interrupted))
        }
        Command::Memory { common, host, opts } => {
            let c = common.common()?;
            let t = prepare_host(&host, &c)?;
            let r = memory::run(opts.config(&common.proxies, &c), t.capacity, stop)?;
            Ok(exit_code(r.run.interrupted))
        }
        Command::Handshakes { common, host, opts } => {
            let c = common.common()?;
            prepare_host(&host, &c)?;
            let r = handshakes::run(opts.config(&common.proxies, &c), stop)?;
            Ok(exit_code(r.run.interrupted))
        }
        Command::SessionStart { common, host, opts } => {
            let c = common.common()?;
            prepare_host(&host, &c)?;
            let r = session_start::run(opts.config(&common.proxies, &c), stop)?;
            if r.run.interrupted {
                return Ok(exit_code(true));
            }
            if r.cells.iter().all(|c| !c.ok) {
                eprintln!("consolegate-bench: no session-start cell succeeded");
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ConsoleUrl { common, host, opts } => {
            let c = common.common()?;
            prepare_host(&host, &c)?;
            let r = console_url::run(&c, &opts, stop)?;
            if r.runs.is_empty() {
                eprintln!("consolegate-bench: no console-url run finished");
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Hypervisors { common, host, opts } => {
            let c = common.common()?;
            prepare_host(&host, &c)?;
            let r = hypervisors::run(opts.config(&c), stop)?;
            if r.run.interrupted {
                return Ok(exit_code(true));
            }
            // Figures were written either way; a part asked for that never
            // succeeded once is a failure.
            let parts = &r.config.opts.hv_parts;
            let storm_ok = r.storm_median.iter().any(|m| m.runs_ok > 0);
            let pool_ok = r.pool_median.as_ref().is_some_and(|p| p.runs_ok > 0);
            if (parts.contains(&hypervisors::Part::Storm) && !storm_ok)
                || (parts.contains(&hypervisors::Part::Pool) && !pool_ok)
            {
                eprintln!("consolegate-bench: a hypervisors part never succeeded");
                return Ok(ExitCode::FAILURE);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Webmks {
            common,
            host,
            latency,
            throughput,
            webmks,
        } => {
            let c = common.common()?;
            prepare_host(&host, &c)?;
            let cfg = webmks.config(&latency, &throughput, &common.proxies, &c);
            let r = webmks::run(cfg, stop)?;
            Ok(exit_code(r.run.interrupted))
        }
        Command::Soak { common, host, opts } => {
            let c = common.common()?;
            prepare_host(&host, &c)?;
            let command_line = std::env::args().collect::<Vec<_>>().join(" ");
            let r = soak::run(opts.config(&c), stop, command_line)?;
            if r.run.interrupted {
                return Ok(exit_code(true));
            }
            if !r.verdict.pass {
                eprintln!("consolegate-bench: soak FAILED:");
                for f in &r.verdict.failures {
                    eprintln!("  - {f}");
                }
                return Ok(ExitCode::FAILURE);
            }
            eprintln!("consolegate-bench: soak passed");
            Ok(ExitCode::SUCCESS)
        }
        Command::All {
            common,
            host,
            latency,
            throughput,
            memory,
            handshakes,
            session_start,
            downstream_bulk,
            webmks,
            events,
            console_url,
            skip,
        } => {
            let c = common.common()?;
            let t = prepare_host(&host, &c)?;
            let p = &common.proxies;
            let cfg = all::AllConfig {
                skip,
                webmks: webmks.config(&latency, &throughput, p, &c),
                latency: latency.config(p, &c),
                throughput: throughput.config(p, &c),
                memory: memory.config(p, &c),
                handshakes: handshakes.config(p, &c),
                session_start: session_start.config(p, &c),
                downstream_bulk: downstream_bulk.config(p, &c),
                events: events.opts(),
                console_url: console_url.opts(),
                common: c,
            };
            let r = all::run(cfg, t, stop)?;
            Ok(exit_code(r.run.interrupted))
        }
        Command::RelayServer { .. } | Command::SinkServer { .. } => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_parses_lists() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "b",
            "latency",
            "--concurrency",
            "1,4,64",
            "--proxies",
            "plain-relay,consolegate-uring",
            "--meta",
            "websockify=0.13.0",
            "--consolegate-arg",
            "--workers=1",
            "--consolegate-arg=--busy-poll-us=50",
        ])
        .unwrap();
        let Command::Latency { common, opts, .. } = cli.command else {
            panic!("not latency");
        };
        assert_eq!(opts.concurrency, vec![1, 4, 64]);
        assert_eq!(
            common.proxies,
            vec![ProxyKind::PlainRelay, ProxyKind::ConsolegateUring]
        );
        assert_eq!(
            common.consolegate_args,
            vec!["--workers=1".to_string(), "--busy-poll-us=50".to_string()]
        );
        assert_eq!(parse_meta(&common.meta).unwrap()["websockify"], "0.13.0");
        assert!(parse_meta(&["nope".into()]).is_err());
    }

    #[test]
    fn all_takes_every_benchmarks_options() {
        let cli = Cli::try_parse_from([
            "b",
            "all",
            "--runs",
            "1",
            "--throughput-bytes",
            "256MiB",
            "--memory-sessions",
            "500,max",
            "--handshakes",
            "1000",
            "--skip",
            "latency",
            "--proxies",
            "websockify,consolegate-uring,plain-relay",
        ])
        .unwrap();
        let Command::All {
            common,
            throughput,
            memory,
            skip,
            ..
        } = cli.command
        else {
            panic!("not all");
        };
        assert_eq!(throughput.throughput_bytes, 256 << 20);
        assert_eq!(
            memory.memory_sessions,
            vec![SessionCount::N(500), SessionCount::Max]
        );
        assert_eq!(skip, vec![Bench::Latency]);
        let Command::All {
            events,
            console_url,
            ..
        } = Cli::try_parse_from(["b", "all", "--event-runs", "2"])
            .unwrap()
            .command
        else {
            panic!("not all");
        };
        let (e, c) = (events.opts(), console_url.opts());
        assert_eq!((e.subscribers, e.rounds, e.runs), (vec![1000], 20, 2));
        assert_eq!(c.console_url_algorithms, vec![console_url::JwtAlg::Hs256]);
        assert_eq!((c.console_url_rounds, c.console_url_samples), (2, 200));
        assert_eq!(
            without_relay(&memory.memory_proxies, &common.proxies),
            vec![ProxyKind::Websockify, ProxyKind::ConsolegateUring]
        );
    }

    #[test]
    fn session_start_options() {
        let cli = Cli::try_parse_from([
            "b",
            "all",
            "--skip",
            "latency,session-start",
            "--proxies",
            "websockify,consolegate-uring",
            "--session-start-modes",
            "dedicated",
            "--session-start-concurrency",
            "1,4",
            "--session-start-http",
            "new-connection",
        ])
        .unwrap();
        let Command::All {
            common,
            session_start,
            skip,
            ..
        } = cli.command
        else {
            panic!("not all");
        };
        assert_eq!(skip, vec![Bench::Latency, Bench::SessionStart]);
        let c = session_start.config(&common.proxies, &common.common().unwrap());
        assert_eq!(c.proxies, vec![ProxyKind::ConsolegateUring]);
        assert_eq!(c.modes, vec![PortMode::Dedicated]);
        assert_eq!(c.concurrency, vec![1, 4]);
        assert_eq!(c.http, HttpMode::NewConnection);
        assert_eq!((c.samples, c.warmup), (2000, 50));
        let cli = Cli::try_parse_from(["b", "session-start"]).unwrap();
        let Command::SessionStart { common, opts, .. } = cli.command else {
            panic!("not session-start");
        };
        let c = opts.config(&common.proxies, &common.common().unwrap());
        assert_eq!(
            c.proxies,
            vec![ProxyKind::ConsolegateEpoll, ProxyKind::ConsolegateUring]
        );
        assert_eq!(c.modes, vec![PortMode::Shared, PortMode::Dedicated]);
    }

    #[test]
    fn soak_options() {
        let cli = Cli::try_parse_from(["b", "soak"]).unwrap();
        let Command::Soak { common, opts, .. } = cli.command else {
            panic!("not soak");
        };
        let c = opts.config(&common.common().unwrap());
        assert_eq!(
            (c.io, c.duration_s, c.interval_s),
            (soak::SoakIo::Uring, 3600, 10)
        );
        assert_eq!((c.steady_sessions, c.churn_threads), (50, 4));
        assert_eq!(c.allowances.rss_floor_kib, 4096.0);
        assert_eq!(
            (c.allowances.warmup_fraction, c.allowances.warmup_min_s),
            (0.1, 300.0)
        );
        assert!(c.validate().is_ok());
        let cli = Cli::try_parse_from([
            "b",
            "soak",
            "--io",
            "epoll",
            "--duration-s",
            "20",
            "--interval-s",
            "1",
            "--churn-per-s",
            "5",
            "--rss-allowance-mib",
            "8",
            "--churn-kinds",
            "demo-shared,revoke-live",
        ])
        .unwrap();
        let Command::Soak { common, opts, .. } = cli.command else {
            panic!("not soak");
        };
        let c = opts.config(&common.common().unwrap());
        assert_eq!(
            (c.io, c.duration_s, c.interval_s),
            (soak::SoakIo::Epoll, 20, 1)
        );
        assert_eq!((c.churn_per_s, c.allowances.rss_floor_kib), (5.0, 8192.0));
        assert_eq!(
            c.churn_kinds,
            vec![soak::churn::Kind::DemoShared, soak::churn::Kind::RevokeLive]
        );
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("123"), Ok(123));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
        assert!(parse_bytes("1XB").is_err());
        assert!(parse_bytes("GiB").is_err());
        assert!(parse_bytes("99999999999999GiB").is_err());
    }
}
