//! The proxies under test. Each is started on 127.0.0.1 in front of the same
//! echo backend and handed back as a [`RunningProxy`]: where clients connect,
//! what they speak there, and a handle that stops it (in-process threads, or a
//! child process killed by PID with everything it forked).
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
use crate::relay;
use crate::server::ThreadServer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProxyKind {
    /// Baseline: raw TCP straight to the echo backend.
    #[value(name = "direct-tcp")]
    #[serde(rename = "direct-tcp")]
    Direct,
    /// In-process blocking TCP relay, no WebSocket: the floor.
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
pub struct ProxyEnv {
    pub backend: SocketAddr,
    pub websockify: PathBuf,
    pub consolegate: PathBuf,
    pub log_dir: PathBuf,
    pub startup_timeout: Duration,
    pub io_timeout: Duration,
    pub ws_path: String,
    pub ws_subprotocol: Option<String>,
}

enum Holder {
    Nothing,
    InProcess(ThreadServer),
    Child(ChildProc),
}

pub struct RunningProxy {
    pub addr: SocketAddr,
    pub transport: Transport,
    /// Command line, for child processes.
    pub command: Option<String>,
    holder: Holder,
}

impl RunningProxy {
    /// Stops the proxy and waits until it and everything it started are gone.
    pub fn stop(&mut self) {
        match std::mem::replace(&mut self.holder, Holder::Nothing) {
            Holder::Nothing => {}
            Holder::InProcess(mut s) => s.stop(),
            Holder::Child(mut c) => c.stop(),
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

pub fn start(kind: ProxyKind, env: &ProxyEnv, run: usize) -> Result<RunningProxy> {
    let ws = Transport::WebSocket {
        path: env.ws_path.clone(),
        subprotocol: env.ws_subprotocol.clone(),
    };
    let log = env.log_dir.join(format!("{}-run{run}.log", kind.name()));
    match kind {
        ProxyKind::Direct => Ok(RunningProxy {
            addr: env.backend,
            transport: Transport::Raw,
            command: None,
            holder: Holder::Nothing,
        }),
        ProxyKind::PlainRelay => {
            let server = relay::start(env.backend, env.io_timeout)?;
            Ok(RunningProxy {
                addr: server.addr(),
                transport: Transport::Raw,
                command: None,
                holder: Holder::InProcess(server),
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
                            addr,
                            transport: ws,
                            command: Some(c.command_line().to_string()),
                            holder: Holder::Child(c),
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
            let args = vec![
                "proxy".to_string(),
                "--io".to_string(),
                io.to_string(),
                "127.0.0.1:0".to_string(),
                env.backend.to_string(),
            ];
            let mut c = ChildProc::spawn(kind.name(), &env.consolegate, &args, &log)?;
            let addr = c
                .wait_for_line(env.startup_timeout, parse_listening_line)
                .context("waiting for `listening on <addr>`")?;
            Ok(RunningProxy {
                addr,
                transport: ws,
                command: Some(c.command_line().to_string()),
                holder: Holder::Child(c),
            })
        }
    }
}

/// Parses `listening on 127.0.0.1:43567 (io=uring, workers=2)`, also when a
/// log prefix comes first.
pub fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    let at = line.find("listening on ")?;
    let rest = &line[at + "listening on ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        assert_eq!(
            parse_listening_line("listening on 127.0.0.1:43567 (io=uring, workers=2)"),
            Some("127.0.0.1:43567".parse().unwrap())
        );
        assert_eq!(
            parse_listening_line("2026-01-01T00:00:00Z INFO listening on 127.0.0.1:1"),
            Some("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(parse_listening_line("listening on nowhere"), None);
        assert_eq!(parse_listening_line("starting"), None);
    }
}
