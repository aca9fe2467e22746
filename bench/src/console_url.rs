//! The console-by-URL benchmark: what a JWT costs on the console
//! handshake path (issue 12, issue 13 item 4).
//!
//! Against `consolegate run` with `[auth.jwt]` on (one instance per
//! algorithm and run) and the built-in demo VM (`demo:demo`), each sample
//! is one console opened by URL: connect to the console port, `GET
//! /ws/console/demo:demo?token=…` (the worker parks it, the control plane
//! authenticates the token, opens the console and admits it), `101`, the
//! first binary frame (the demo's `RFB 003.008\n`, relayed), a close
//! frame. The token is either the static `[[auth.tokens]]` bearer token
//! (with `&user=bench`, no signature to check) or the user's JWT, signed
//! with the instance's algorithm (HS256, or EdDSA with a fresh Ed25519
//! pair). Bearer and JWT rounds alternate on the same instance, so both
//! see the same machine; the appliance's CPU comes from /proc/PID/stat
//! around each round.
//!
//! Reported per algorithm: handshakes per CPU-second of the appliance for
//! bearer and JWT and their ratio, handshake latency p50/p99 (HdrHistogram,
//! µs, connect → first byte); medians over the runs; the load average.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::appliance;
use crate::client::{self, Transport};
use crate::common::Common;
use crate::procfs;
use crate::report::Machine;
use crate::workload::new_histogram;
use crate::wsproto;

/// Most samples per round.
pub const MAX_SAMPLES: u64 = 100_000;
/// Most rounds per variant and run.
pub const MAX_ROUNDS: usize = 100;
/// Most runs.
pub const MAX_RUNS: usize = 20;
/// The demo VM every instance lists (no hypervisor configured).
const DEMO_VM: &str = "demo:demo";
const ISSUER: &str = "https://portal.bench";
const AUDIENCE: &str = "consolegate-bench";
/// The user the tokens name.
const USER: &str = "bench";

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JwtAlg {
    Hs256,
    Eddsa,
}

impl JwtAlg {
    fn config_name(self) -> &'static str {
        match self {
            Self::Hs256 => "HS256",
            Self::Eddsa => "EdDSA",
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleUrlOpts {
    /// JWT algorithms, one appliance instance each per run.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "hs256,eddsa")]
    pub console_url_algorithms: Vec<JwtAlg>,
    /// Runs (fresh instances); the report gives the medians.
    #[arg(long, default_value_t = 3)]
    pub console_url_runs: usize,
    /// Rounds per variant (bearer, JWT) in each run, alternating.
    #[arg(long, default_value_t = 3)]
    pub console_url_rounds: usize,
    /// Console opens per round, back to back.
    #[arg(long, default_value_t = 400)]
    pub console_url_samples: u64,
    /// IO backend of the instances.
    #[arg(long, default_value = "epoll")]
    pub console_url_io: String,
}

/// One variant's figures in one run.
#[derive(Debug, Clone, Serialize)]
pub struct VariantFigures {
    pub handshakes: u64,
    pub failures: u64,
    pub cpu_s: f64,
    pub per_cpu_s: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    pub algorithm: JwtAlg,
    pub bearer: VariantFigures,
    pub jwt: VariantFigures,
    /// JWT handshakes per CPU-second over bearer's.
    pub ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsoleUrlReport {
    pub io: String,
    pub loadavg_at_start: String,
    pub loadavg_at_end: String,
    pub runs: Vec<RunFigures>,
    /// Per algorithm: median bearer/s-CPU, JWT/s-CPU, ratio, p50/p99s.
    pub medians: Vec<serde_json::Value>,
}

impl ConsoleUrlOpts {
    fn validate(&self) -> Result<()> {
        if self.console_url_runs == 0 || self.console_url_runs > MAX_RUNS {
            bail!("--console-url-runs must be 1..={MAX_RUNS}");
        }
        if self.console_url_rounds == 0 || self.console_url_rounds > MAX_ROUNDS {
            bail!("--console-url-rounds must be 1..={MAX_ROUNDS}");
        }
        if self.console_url_samples == 0 || self.console_url_samples > MAX_SAMPLES {
            bail!("--console-url-samples must be 1..={MAX_SAMPLES}");
        }
        if !matches!(self.console_url_io.as_str(), "epoll" | "uring") {
            bail!("--console-url-io must be epoll or uring");
        }
        Ok(())
    }
}

/// The signing side of one instance: its `[auth.jwt]` table and a token.
struct Signer {
    toml: String,
    jwt: String,
}

fn signer(alg: JwtAlg, dir: &Path) -> Result<Signer> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let now = crate::common::unix_now() as i64;
    let claims = serde_json::json!({
        "sub": USER, "iss": ISSUER, "aud": AUDIENCE, "exp": now + 24 * 3600,
        "iat": now, "roles": "viewer", "vms": ["demo:*"],
    });
    let (key_line, header, key) = match alg {
        JwtAlg::Hs256 => {
            let secret = appliance::random_token();
            let path = dir.join("jwt.secret");
            crate::common::write_private(&path, &secret)?;
            (
                format!("hs256_secret_file = {}", toml_path(&path)),
                Header::new(Algorithm::HS256),
                EncodingKey::from_secret(secret.as_bytes()),
            )
        }
        JwtAlg::Eddsa => {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
            let path = dir.join("jwt-ed25519.pem");
            std::fs::write(&path, pair.public_key_pem())?;
            (
                format!("public_key_file = {}", toml_path(&path)),
                Header::new(Algorithm::EdDSA),
                EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes())?,
            )
        }
    };
    let jwt = jsonwebtoken::encode(&header, &claims, &key)?;
    let toml = format!(
        "\n[auth.jwt]\nenabled = true\nalgorithm = \"{}\"\n{key_line}\nissuer = \"{ISSUER}\"\n\
         audience = \"{AUDIENCE}\"\n\n[viewers]\nmax_sessions = 100000\n\
         max_sessions_per_user = 100000\n",
        alg.config_name()
    );
    Ok(Signer { toml, jwt })
}

fn toml_path(p: &Path) -> String {
    appliance::toml_string(&p.display().to_string())
}

/// One console opened by URL: connect → 101 → first binary frame →
/// close. Returns the time to the first frame.
fn open_console(console: SocketAddr, path: &str, io_timeout: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let transport = Transport::WebSocket {
        path: path.to_string(),
        subprotocol: None,
    };
    let (mut stream, leftover) = client::open_stream(console, &transport, io_timeout, 7)
        .map_err(|e| format!("upgrade: {e}"))?;
    let payload = crate::session_start::read_first_binary(&mut stream, &leftover, t0 + io_timeout)
        .map_err(|e| format!("first byte: {e}"))?;
    let took = t0.elapsed();
    if !crate::session_start::looks_like_rfb_greeting(&payload) {
        return Err("first frame is not an RFB greeting".into());
    }
    let mut close = [0u8; 2 + wsproto::MAX_CLIENT_HEADER];
    if let Ok(n) = wsproto::encode_client_frame(
        wsproto::OP_CLOSE,
        &1000u16.to_be_bytes(),
        [1, 2, 3, 4],
        &mut close,
    ) {
        let _ = stream.write_all(&close[..n]);
    }
    Ok(took)
}

/// Accumulated figures of one variant over its rounds.
struct Tally {
    hist: Histogram<u64>,
    ok: u64,
    failures: u64,
    cpu_ticks: u64,
    first_failure: Option<String>,
}

impl Tally {
    fn new() -> Self {
        Self {
            hist: new_histogram(),
            ok: 0,
            failures: 0,
            cpu_ticks: 0,
            first_failure: None,
        }
    }

    fn figures(&self) -> VariantFigures {
        let cpu_s = self.cpu_ticks as f64 / procfs::clock_ticks_per_second() as f64;
        VariantFigures {
            handshakes: self.ok,
            failures: self.failures,
            cpu_s,
            per_cpu_s: if cpu_s > 0.0 {
                self.ok as f64 / cpu_s
            } else {
                0.0
            },
            p50_us: self.hist.value_at_quantile(0.5),
            p99_us: self.hist.value_at_quantile(0.99),
        }
    }
}

/// One round: `samples` console opens back to back, the appliance's CPU
/// ticks around them.
fn round(
    pid: u32,
    console: SocketAddr,
    path: &str,
    samples: u64,
    io_timeout: Duration,
    tally: &mut Tally,
    stop: &AtomicBool,
) -> Result<()> {
    let before = procfs::read_stat(pid).context("reading /proc/PID/stat")?;
    for _ in 0..samples {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match open_console(console, path, io_timeout) {
            Ok(t) => {
                tally.ok += 1;
                let _ = tally.hist.record(t.as_micros().max(1) as u64);
            }
            Err(e) => {
                tally.failures += 1;
                tally.first_failure.get_or_insert(e);
                if tally.failures > samples / 10 + 5 {
                    bail!("too many failures: {:?}", tally.first_failure);
                }
            }
        }
    }
    let after = procfs::read_stat(pid).context("reading /proc/PID/stat")?;
    tally.cpu_ticks += after.total_ticks().saturating_sub(before.total_ticks());
    Ok(())
}

/// One run of one algorithm on a fresh instance.
fn run_one(
    common: &Common,
    opts: &ConsoleUrlOpts,
    alg: JwtAlg,
    run: usize,
    stop: &AtomicBool,
) -> Result<RunFigures> {
    let dir: PathBuf = common
        .out_dir
        .join(format!("console-url/{}-{run}", alg.config_name()));
    std::fs::create_dir_all(&dir)?;
    let s = signer(alg, &dir)?;
    let io: &'static str = if opts.console_url_io == "uring" {
        "uring"
    } else {
        "epoll"
    };
    let mut app = appliance::start_with(
        &common.consolegate,
        &dir,
        &dir.join("state"),
        io,
        64,
        &dir.join("consolegate.log"),
        Duration::from_millis(common.startup_timeout_ms),
        &s.toml,
    )?;
    let pid = app.pid().context("appliance pid")?;
    let io_timeout = Duration::from_millis(common.io_timeout_ms);
    let bearer_path = format!("/ws/console/{DEMO_VM}?token={}&user={USER}", app.token);
    let jwt_path = format!("/ws/console/{DEMO_VM}?token={}", s.jwt);
    // Warm-up (unmeasured): both paths work before anything is counted.
    for path in [&bearer_path, &jwt_path] {
        for _ in 0..20 {
            open_console(app.console, path, io_timeout)
                .map_err(|e| anyhow::anyhow!("warm-up: {e}"))?;
        }
    }
    let (mut bearer, mut jwt) = (Tally::new(), Tally::new());
    for _ in 0..opts.console_url_rounds {
        let n = opts.console_url_samples;
        round(
            pid,
            app.console,
            &bearer_path,
            n,
            io_timeout,
            &mut bearer,
            stop,
        )?;
        round(pid, app.console, &jwt_path, n, io_timeout, &mut jwt, stop)?;
    }
    app.stop();
    let (b, j) = (bearer.figures(), jwt.figures());
    let ratio = if b.per_cpu_s > 0.0 {
        j.per_cpu_s / b.per_cpu_s
    } else {
        0.0
    };
    Ok(RunFigures {
        algorithm: alg,
        bearer: b,
        jwt: j,
        ratio,
    })
}

/// [`crate::stats::median`], 0 for no runs (a cell of the table).
fn median(v: Vec<f64>) -> f64 {
    crate::stats::median(&v).unwrap_or(0.0)
}

fn medians(runs: &[RunFigures], alg: JwtAlg) -> serde_json::Value {
    let of = |f: &dyn Fn(&RunFigures) -> f64| {
        median(runs.iter().filter(|r| r.algorithm == alg).map(f).collect())
    };
    serde_json::json!({
        "algorithm": alg,
        "bearer_per_cpu_s": of(&|r| r.bearer.per_cpu_s),
        "jwt_per_cpu_s": of(&|r| r.jwt.per_cpu_s),
        "ratio": of(&|r| r.ratio),
        "bearer_p50_us": of(&|r| r.bearer.p50_us as f64),
        "bearer_p99_us": of(&|r| r.bearer.p99_us as f64),
        "jwt_p50_us": of(&|r| r.jwt.p50_us as f64),
        "jwt_p99_us": of(&|r| r.jwt.p99_us as f64),
    })
}

/// Every run of every algorithm; writes console-url.json and prints the
/// table.
pub fn run(
    common: &Common,
    opts: &ConsoleUrlOpts,
    stop: Arc<AtomicBool>,
) -> Result<ConsoleUrlReport> {
    opts.validate()?;
    std::fs::create_dir_all(&common.out_dir)?;
    let start = Machine::describe();
    let mut runs = Vec::new();
    for run in 0..opts.console_url_runs {
        for &alg in &opts.console_url_algorithms {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let r = run_one(common, opts, alg, run, &stop)?;
            eprintln!(
                "console-url run {run} {}: bearer {:.0}/CPU-s, JWT {:.0}/CPU-s, ratio {:.3}",
                alg.config_name(),
                r.bearer.per_cpu_s,
                r.jwt.per_cpu_s,
                r.ratio
            );
            runs.push(r);
        }
    }
    let end = Machine::describe();
    let report = ConsoleUrlReport {
        io: opts.console_url_io.clone(),
        loadavg_at_start: start.loadavg_at_start,
        loadavg_at_end: end.loadavg_at_start,
        medians: opts
            .console_url_algorithms
            .iter()
            .map(|&a| medians(&runs, a))
            .collect(),
        runs,
    };
    let path = common.out_dir.join("console-url.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    println!("{}", render_text(&report));
    Ok(report)
}

pub fn render_text(r: &ConsoleUrlReport) -> String {
    let mut t = format!(
        "Console by VM id with JWT (io={}, loadavg start {}, end {})\n\
         | algorithm | bearer handshakes/CPU-s | JWT handshakes/CPU-s | JWT/bearer | bearer p50/p99 µs | JWT p50/p99 µs |\n\
         | --- | --- | --- | --- | --- | --- |\n",
        r.io, r.loadavg_at_start, r.loadavg_at_end
    );
    for m in &r.medians {
        t.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.3} | {:.0} / {:.0} | {:.0} / {:.0} |\n",
            m["algorithm"].as_str().unwrap_or("?"),
            m["bearer_per_cpu_s"].as_f64().unwrap_or(0.0),
            m["jwt_per_cpu_s"].as_f64().unwrap_or(0.0),
            m["ratio"].as_f64().unwrap_or(0.0),
            m["bearer_p50_us"].as_f64().unwrap_or(0.0),
            m["bearer_p99_us"].as_f64().unwrap_or(0.0),
            m["jwt_p50_us"].as_f64().unwrap_or(0.0),
            m["jwt_p99_us"].as_f64().unwrap_or(0.0),
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn signers_write_their_key_and_config() {
        let dir = std::env::temp_dir().join(format!("cg-bench-signer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for alg in [JwtAlg::Hs256, JwtAlg::Eddsa] {
            let s = signer(alg, &dir).unwrap();
            assert!(s.toml.contains(alg.config_name()), "{}", s.toml);
            assert_eq!(s.jwt.split('.').count(), 3);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
