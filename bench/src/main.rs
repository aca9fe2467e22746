//! consolegate-bench: measures consolegate against direct TCP, a plain TCP
//! relay and websockify on this machine, all on 127.0.0.1.
//!
//! Layout, so the harness can grow: `proxy` (proxies under test), `workload`
//! (what clients do), `client`/`wsproto` (the hand-written clients),
//! `echo`/`relay`/`server` (in-process servers), `child` (child processes),
//! `stats` and `report` (figures and reporters), and one module per benchmark
//! wiring them together (`latency`).

mod child;
mod client;
mod echo;
mod latency;
mod proxy;
mod relay;
mod report;
mod server;
mod stats;
mod workload;
mod wsproto;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::proxy::ProxyKind;

#[derive(Parser)]
#[command(
    version,
    about = "Benchmarks for consolegate (all traffic on 127.0.0.1)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Closed-loop round-trip latency of small messages through each proxy,
    /// and the latency each adds over direct TCP.
    Latency(LatencyArgs),
}

#[derive(Args)]
struct LatencyArgs {
    /// Proxies under test, in order (direct TCP always runs first as the baseline).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "plain-relay,websockify,consolegate-epoll,consolegate-uring"
    )]
    proxies: Vec<ProxyKind>,
    /// Concurrent client sessions, one measurement per value.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    concurrency: Vec<usize>,
    /// Repetitions of the whole comparison; the report gives the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 10)]
    message_bytes: usize,
    /// Round trips per session before measuring (discarded).
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Measured round trips per session, at most.
    #[arg(long, default_value_t = 5000)]
    round_trips: u64,
    /// Measured phase per session, at most (warm-up has the same bound).
    #[arg(long, default_value_t = 10_000)]
    time_limit_ms: u64,
    /// Connect/read/write timeout of client sockets.
    #[arg(long, default_value_t = 5_000)]
    io_timeout_ms: u64,
    /// How long a proxy may take to start listening.
    #[arg(long, default_value_t = 15_000)]
    startup_timeout_ms: u64,
    /// websockify executable.
    #[arg(long, default_value = "bench/.venv/bin/websockify")]
    websockify: PathBuf,
    /// consolegate executable.
    #[arg(long, default_value = "target/release/consolegate")]
    consolegate: PathBuf,
    /// Request path of the WebSocket upgrade.
    #[arg(long, default_value = "/")]
    ws_path: String,
    /// Sec-WebSocket-Protocol to offer (none by default).
    #[arg(long)]
    ws_subprotocol: Option<String>,
    /// Where latency.json, latency.txt, hgrm/ and logs/ go.
    #[arg(long, default_value = "bench/results/manual")]
    out_dir: PathBuf,
    /// Free-form KEY=VALUE recorded in the report (e.g. tool versions).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    meta: Vec<String>,
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

fn run(cli: Cli) -> Result<ExitCode> {
    let stop = install_signal_handlers().context("installing signal handlers")?;
    match cli.command {
        Command::Latency(a) => {
            let cfg = latency::LatencyConfig {
                proxies: a.proxies,
                concurrency: a.concurrency,
                runs: a.runs,
                message_bytes: a.message_bytes,
                warmup_round_trips: a.warmup,
                round_trips: a.round_trips,
                time_limit_ms: a.time_limit_ms,
                io_timeout_ms: a.io_timeout_ms,
                startup_timeout_ms: a.startup_timeout_ms,
                websockify: a.websockify,
                consolegate: a.consolegate,
                ws_path: a.ws_path,
                ws_subprotocol: a.ws_subprotocol,
                out_dir: a.out_dir,
                meta: parse_meta(&a.meta)?,
            };
            let report = latency::run(cfg, stop)?;
            if report.interrupted {
                eprintln!("consolegate-bench: interrupted; partial results written");
                return Ok(ExitCode::from(130));
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
        ])
        .unwrap();
        let Command::Latency(a) = cli.command;
        assert_eq!(a.concurrency, vec![1, 4, 64]);
        assert_eq!(
            a.proxies,
            vec![ProxyKind::PlainRelay, ProxyKind::ConsolegateUring]
        );
        assert_eq!(parse_meta(&a.meta).unwrap()["websockify"], "0.13.0");
        assert!(parse_meta(&["nope".into()]).is_err());
    }
}
