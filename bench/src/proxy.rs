//! The proxies under test. Each is started on 127.0.0.1 in front of the same
//! echo backend and handed back as a [`RunningProxy`]: where clients connect,
//! what they speak there, and a handle that stops it: a child process killed
//! by PID with everything it forked. The plain relay runs as a child too
//! (`consolegate-bench relay-server`), so its CPU time and memory are read
//! from /proc exactly like the real proxies'.
//!
//! `direct-tcp` is not a proxy: it is the baseline every added latency is
//! measured from (clients talk raw TCP to the echo backend itself).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::child::{self, ChildProc};
use crate::client::Transport;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyKind {
    /// Baseline: raw TCP straight to the echo backend.
    #[value(name = "direct-tcp")]
    #[serde(rename = "direct-tcp")]
    Direct,
    /// Blocking TCP relay, no WebSocket (`consolegate-bench relay-server`,
    /// a child process): the floor.
    PlainRelay,
    /// websockify (Python) from the bench virtualenv.
    Websockify,
    /// `consolegate proxy --io epoll`.
    ConsolegateEpoll,
    /// `consolegate proxy --io uring`.
    ConsolegateUring,
}

impl ProxyKind {
    pub fn name(self) -> &'static str {
        match self {
            ProxyKind::Direct => "direct-tcp",
            ProxyKind::PlainRelay => "plain-relay",
            ProxyKind::Websockify => "websockify",
            ProxyKind::ConsolegateEpoll => "consolegate-epoll",
            ProxyKind::ConsolegateUring => "consolegate-uring",
        }
    }
}

impl std::fmt::Display for ProxyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What every proxy needs to know to start.
#[derive(Clone)]
pub struct ProxyEnv {
    pub backend: SocketAddr,
    pub websockify: PathBuf,
    pub consolegate: PathBuf,
    /// Extra arguments for every consolegate instance (`--consolegate-arg`).
    pub consolegate_args: Vec<String>,
    /// This executable, for `relay-server`.
    pub bench_exe: PathBuf,
    pub log_dir: PathBuf,
    pub startup_timeout: Duration,
    pub ws_path: String,
    pub ws_subprotocol: Option<String>,
}

pub struct RunningProxy {
    pub kind: ProxyKind,
    pub addr: SocketAddr,
    pub transport: Transport,
    /// Command line, for child processes.
    pub command: Option<String>,
    /// Data-plane threads, when the proxy says (consolegate's ready line).
    pub workers: Option<usize>,
    child: Option<ChildProc>,
}

impl RunningProxy {
    /// The proxy's process (the root of the tree measured), if it has one.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.pid())
    }

    /// Whether the proxy process is gone (crashed or exited).
    pub fn has_exited(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.has_exited())
    }

    /// The end of the proxy's log, for error messages.
    pub fn log_tail(&self) -> String {
        self.child
            .as_ref()
            .map_or_else(String::new, |c| child::log_tail(c.log_path(), 400))
    }

    /// Stops the proxy and waits until it and everything it started are gone.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.stop();
        }
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Attempts at websockify start-up: its port is picked by bind-and-release,
/// so another process can take it in between.
const WEBSOCKIFY_ATTEMPTS: usize = 3;

/// Starts `kind` in front of `env.backend`; `tag` names its log file
/// (`<proxy>-<tag>.log`).
pub fn start(kind: ProxyKind, env: &ProxyEnv, tag: &str) -> Result<RunningProxy> {
    let ws = Transport::WebSocket {
        path: env.ws_path.clone(),
        subprotocol: env.ws_subprotocol.clone(),
    };
    let log = env.log_dir.join(format!("{}-{tag}.log", kind.name()));
    match kind {
        ProxyKind::Direct => Ok(RunningProxy {
            kind,
            addr: env.backend,
            transport: Transport::Raw,
            command: None,
            workers: None,
            child: None,
        }),
        ProxyKind::PlainRelay => {
            let args = vec![
                "relay-server".to_string(),
                "--backend".to_string(),
                env.backend.to_string(),
            ];
            let mut c = ChildProc::spawn(kind.name(), &env.bench_exe, &args, &log)?;
            let addr = c
                .wait_for_line(env.startup_timeout, |l| {
                    parse_listening_line(l).map(|(a, _)| a)
                })
                .context("waiting for `listening on <addr>`")?;
            Ok(RunningProxy {
                kind,
                addr,
                transport: Transport::Raw,
                command: Some(c.command_line().to_string()),
                workers: None,
                child: Some(c),
            })
        }
        ProxyKind::Websockify => {
            child::require_file(&env.websockify, "run scripts/bench.sh to create the venv")?;
            let mut last = anyhow!("websockify did not start");
            for _ in 0..WEBSOCKIFY_ATTEMPTS {
                let port = child::free_port()?;
                let addr: SocketAddr = ([127, 0, 0, 1], port).into();
                let args = vec![addr.to_string(), env.backend.to_string()];
                let mut c = ChildProc::spawn(kind.name(), &env.websockify, &args, &log)?;
                match c.wait_until_accepts(addr, env.startup_timeout) {
                    Ok(()) => {
                        return Ok(RunningProxy {
                            kind,
                            addr,
                            transport: ws,
                            command: Some(c.command_line().to_string()),
                            workers: None,
                            child: Some(c),
                        })
                    }
                    Err(e) => {
                        c.stop();
                        last = e;
                    }
                }
            }
            Err(last)
        }
        ProxyKind::ConsolegateEpoll | ProxyKind::ConsolegateUring => {
            let io = if kind == ProxyKind::ConsolegateEpoll {
                "epoll"
            } else {
                "uring"
            };
            child::require_file(&env.consolegate, "build it: cargo build --release")?;
            let mut args = vec!["proxy".to_string(), "--io".to_string(), io.to_string()];
            args.extend(env.consolegate_args.iter().cloned());
            args.push("127.0.0.1:0".to_string());
            args.push(env.backend.to_string());
            let mut c = ChildProc::spawn(kind.name(), &env.consolegate, &args, &log)?;
            let (addr, workers) = c
                .wait_for_line(env.startup_timeout, parse_listening_line)
                .context("waiting for `listening on <addr>`")?;
            Ok(RunningProxy {
                kind,
                addr,
                transport: ws,
                command: Some(c.command_line().to_string()),
                workers,
                child: Some(c),
            })
        }
    }
}

/// Parses `listening on 127.0.0.1:43567 (io=uring, workers=2)`, also when a
/// log prefix comes first: the address, and the worker count when given.
pub fn parse_listening_line(line: &str) -> Option<(SocketAddr, Option<usize>)> {
    let at = line.find("listening on ")?;
    let rest = &line[at + "listening on ".len()..];
    let addr = rest.split_whitespace().next()?.parse().ok()?;
    let workers = rest.find("workers=").and_then(|w| {
        let digits: String = rest[w + "workers=".len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    });
    Some((addr, workers))
}

/// Starts one of the bench's own servers (`relay-server`, `sink-server`) as
/// a child process and returns it with the address it announced.
pub fn spawn_bench_server(
    bench_exe: &std::path::Path,
    name: &str,
    args: &[String],
    log: &std::path::Path,
    timeout: Duration,
) -> Result<(ChildProc, SocketAddr)> {
    let mut c = ChildProc::spawn(name, bench_exe, args, log)?;
    let addr = c
        .wait_for_line(timeout, |l| parse_listening_line(l).map(|(a, _)| a))
        .with_context(|| format!("waiting for {name} to listen"))?;
    Ok((c, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        assert_eq!(
            parse_listening_line("listening on 127.0.0.1:43567 (io=uring, workers=2)"),
            Some(("127.0.0.1:43567".parse().unwrap(), Some(2)))
        );
        assert_eq!(
            parse_listening_line("2026-01-01T00:00:00Z INFO listening on 127.0.0.1:1"),
            Some(("127.0.0.1:1".parse().unwrap(), None))
        );
        assert_eq!(parse_listening_line("listening on nowhere"), None);
        assert_eq!(parse_listening_line("starting"), None);
    }
}
