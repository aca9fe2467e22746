//! Upgrade without dropping consoles: the running process (the
//! predecessor) hands its listening sockets and its pending sessions to a
//! new process (the successor, usually a newer binary just installed at
//! the same path), then drains its live sessions for up to
//! `service.upgrade_drain_deadline_ms` and exits.
//!
//! The sequence (docs/PACKAGING.md draws it):
//!
//! 1. SIGUSR2 to the main process (`systemctl kill -s USR2 --kill-whom=main
//!    consolegate`; the package's postinst does it on upgrade). The
//!    predecessor binds a unix socket in `$RUNTIME_DIRECTORY` (else the
//!    state directory) and starts `consolegate run <same arguments>
//!    --takeover SOCKET --detach`; that process starts the successor and
//!    exits at once, so the successor is a child of the service manager,
//!    not of the predecessor.
//! 2. The successor connects (same user id, checked with `SO_PEERCRED`);
//!    the predecessor sends an offer and duplicates of its listeners: one
//!    console listener per worker (one `SO_REUSEPORT` group) and the
//!    control listener.
//! 3. The successor loads and checks its config (secrets, certificate,
//!    listen addresses equal to the inherited ones) and answers `prepared`
//!    or `refused`. Up to here nothing changed: on a refusal, a timeout or
//!    a crash the predecessor carries on as before.
//! 4. The predecessor stops its control API, stops accepting on every
//!    listener (new connections wait in the kernel's queues, which the
//!    successor now shares), waits (briefly) for connections still in
//!    their handshake, takes its pending sessions (claiming each ticket so
//!    it can be used only once, over there) and sends them: `commit`.
//! 5. The successor starts its workers on the inherited listeners and its
//!    control plane on the inherited control listener, admits the sessions
//!    and answers `started` with its PID.
//! 6. The predecessor tells systemd `MAINPID=<successor>` and answers
//!    `done`; the successor sends `READY=1` and runs the watchdog. The
//!    predecessor's live consoles go on until they end or the drain
//!    deadline closes them (1001); then it exits 0.
//!
//! From step 4 on there is no way back: a failure there ends the
//! predecessor with a non-zero status after the usual short drain, and
//! systemd restarts the service.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::control::ControlState;
use crate::dataplane::session::HandshakeGauge;
use crate::dataplane::worker::WorkerControl;
use crate::service::notify::Notifier;
use crate::service::pending::{self, PendingSession};
use crate::service::wire::{Wire, WireError};

/// Version of the messages below; a successor that speaks another one
/// refuses the offer.
pub const PROTOCOL_VERSION: u32 = 1;
/// The socket's file name in the runtime directory.
pub const SOCKET_NAME: &str = "handoff.sock";
/// Longest wait for connections in their handshake before the pending
/// sessions are taken (a handshake that claims its ticket after that gets
/// 403: its ticket went to the successor).
pub const HANDSHAKE_SETTLE_MS: u64 = 2_000;
/// Poll interval while waiting on the workers.
const POLL: Duration = Duration::from_millis(5);

/// Why a hand-off did not happen or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("hand-off socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the new process {}: {source}", exe.display())]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("the new process did not {step} within {timeout_ms} ms")]
    Timeout { step: &'static str, timeout_ms: u64 },
    #[error("the new process refused: {0}")]
    Refused(String),
    #[error("{side} at step {step}: {error}")]
    Wire {
        side: &'static str,
        step: &'static str,
        error: WireError,
    },
    #[error("unexpected message at step {0}")]
    Protocol(&'static str),
    #[error("the peer runs as uid {peer}, this process as {own}")]
    Peer { peer: u32, own: u32 },
    #[error("a hand-off is already under way")]
    Busy,
    #[error("the appliance is draining")]
    Draining,
    #[error("{0}")]
    Internal(String),
}

impl HandoffError {
    /// For `map_err`: the wire failed at `step` of the hand-off, in the
    /// process named by `side`.
    fn on_wire(
        side: &'static str,
        step: &'static str,
    ) -> impl Fn(WireError) -> HandoffError + Copy {
        move |error| HandoffError::Wire { side, step, error }
    }
}

/// Messages, in the order of the sequence above.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Offer {
        version: u32,
        pid: u32,
        /// Console listeners that follow, then the control listener.
        console_listeners: usize,
        demo_addr: Option<SocketAddr>,
    },
    Prepared,
    Refused {
        reason: String,
    },
    Commit {
        sessions: Vec<PendingSession>,
    },
    Started {
        pid: u32,
    },
    Done,
}

/// How a hand-off the predecessor began ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing changed; this process goes on serving.
    Abandoned(String),
    /// The successor runs; this process drains and exits 0.
    HandedOver { pid: u32, sessions: usize },
    /// Past the point of no return: this process drains briefly and exits
    /// non-zero so that systemd restarts the service.
    Failed(String),
}

/// The listener duplicates a hand-off passes on.
struct HeldListeners {
    console: Vec<TcpListener>,
    control: TcpListener,
}

/// What the predecessor needs to hand over.
pub struct Predecessor {
    pub state: Arc<ControlState>,
    pub workers: Arc<WorkerControl>,
    pub handshakes: Arc<HandshakeGauge>,
    /// Duplicates of the workers' listeners and of the control listener,
    /// until a drain or a finished hand-off closes them: held, they would
    /// keep the ports accepting (into the kernel's queue) after the
    /// workers closed theirs.
    listeners: Mutex<Option<HeldListeners>>,
    pub notifier: Notifier,
    /// Where the socket goes.
    pub runtime_dir: PathBuf,
    /// The program to start, and its arguments (without argv[0]).
    pub exe: PathBuf,
    pub args: Vec<OsString>,
    pub demo_addr: Option<SocketAddr>,
    /// Stop the control API and wait for it to have stopped (false: it
    /// did not within the time given).
    pub stop_control: Box<dyn Fn(Duration) -> bool + Send + Sync>,
    /// Live consoles' drain after the hand-off, and the usual one.
    pub upgrade_drain_ms: u64,
    pub drain_grace_ms: u64,
    pub step_timeout: Duration,
    busy: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
}

impl Predecessor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: Arc<ControlState>,
        workers: Arc<WorkerControl>,
        handshakes: Arc<HandshakeGauge>,
        console: Vec<TcpListener>,
        control: TcpListener,
        notifier: Notifier,
        runtime_dir: PathBuf,
        demo_addr: Option<SocketAddr>,
        stop_control: Box<dyn Fn(Duration) -> bool + Send + Sync>,
    ) -> Self {
        let svc = state.cfg.service.clone();
        let drain_grace_ms = state.cfg.dataplane.limits.drain_grace_ms;
        let (exe, args) = successor_command();
        Self {
            state,
            workers,
            handshakes,
            listeners: Mutex::new(Some(HeldListeners { console, control })),
            notifier,
            runtime_dir,
            exe,
            args,
            demo_addr,
            stop_control,
            upgrade_drain_ms: svc.upgrade_drain_deadline_ms,
            drain_grace_ms,
            step_timeout: Duration::from_millis(svc.handoff_timeout_ms),
            busy: AtomicBool::new(false),
            outcome: Mutex::new(None),
        }
    }

    /// Close the listener duplicates (SIGTERM's drain: new connections
    /// are refused at once); no hand-off is possible after.
    pub fn close_listeners(&self) {
        if let Ok(mut held) = self.listeners.lock() {
            held.take();
        }
    }

    /// The last hand-off's outcome, once one passed the point of no return.
    pub fn final_outcome(&self) -> Option<Outcome> {
        self.outcome.lock().ok().and_then(|o| o.clone())
    }

    /// Run a hand-off (on the calling thread), log and record its outcome.
    pub fn hand_over(&self) -> Outcome {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Outcome::Abandoned(HandoffError::Busy.to_string());
        }
        if let Some(done) = self.final_outcome() {
            // One hand-off per process: the listeners are gone.
            return Outcome::Abandoned(format!("already handed over ({done:?})"));
        }
        tracing::info!(exe = %self.exe.display(), "upgrade hand-off: starting the new process");
        let outcome = self.try_hand_over();
        match &outcome {
            Outcome::Abandoned(why) => {
                tracing::error!(reason = %why, "upgrade hand-off abandoned; this process goes on serving")
            }
            Outcome::HandedOver { pid, sessions } => tracing::info!(
                pid,
                pending_sessions = sessions,
                drain_deadline_ms = self.upgrade_drain_ms,
                "upgrade hand-off done: the new process serves; live consoles stay here until they end"
            ),
            Outcome::Failed(why) => {
                tracing::error!(reason = %why, "upgrade hand-off failed after the listeners were handed over; exiting so that systemd restarts the service");
                self.workers.start_drain_with_grace(self.drain_grace_ms);
            }
        }
        if !matches!(outcome, Outcome::Abandoned(_)) {
            if let Ok(mut o) = self.outcome.lock() {
                *o = Some(outcome.clone());
            }
        }
        self.busy.store(false, Ordering::Release);
        outcome
    }

    fn try_hand_over(&self) -> Outcome {
        let path = self.runtime_dir.join(SOCKET_NAME);
        let prepared = match self.prepare(&path) {
            Ok(wire) => wire,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Outcome::Abandoned(e.to_string());
            }
        };
        let _ = std::fs::remove_file(&path);
        match self.commit(prepared) {
            Ok(o) => o,
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }

    /// Steps 1–3: nothing changes here yet.
    fn prepare(&self, path: &Path) -> Result<Wire, HandoffError> {
        if self.workers.is_draining() {
            return Err(HandoffError::Draining);
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|source| HandoffError::Socket {
            path: path.to_path_buf(),
            source,
        })?;
        spawn_successor(&self.exe, &self.args, path, self.step_timeout)?;
        let stream = accept_within(&listener, self.step_timeout)
            .map_err(|source| HandoffError::Socket {
                path: path.to_path_buf(),
                source,
            })?
            .ok_or(HandoffError::Timeout {
                step: "connect",
                timeout_ms: self.step_timeout.as_millis() as u64,
            })?;
        check_peer(&stream)?;
        let mut wire = Wire::new(stream);
        // The successor restores the port allocations from the file.
        crate::control::persist_ports(&self.state);
        // Held only while the offer goes out, so that a SIGTERM meanwhile
        // waits for one bounded send at most.
        let guard = self
            .listeners
            .lock()
            .map_err(|_| HandoffError::Internal("listener lock poisoned".into()))?;
        let held = guard.as_ref().ok_or(HandoffError::Draining)?;
        let offer = Message::Offer {
            version: PROTOCOL_VERSION,
            pid: std::process::id(),
            console_listeners: held.console.len(),
            demo_addr: self.demo_addr,
        };
        let t = self.step_timeout;
        let fail = |step| HandoffError::on_wire("new process", step);
        wire.send(&offer, t).map_err(fail("offer"))?;
        let mut fds: Vec<BorrowedFd<'_>> = held.console.iter().map(|l| l.as_fd()).collect();
        fds.push(held.control.as_fd());
        wire.send_fds(&fds, t).map_err(fail("offer"))?;
        drop(fds);
        drop(guard);
        match wire.recv::<Message>(t).map_err(fail("prepare"))? {
            Message::Prepared => Ok(wire),
            Message::Refused { reason } => Err(HandoffError::Refused(reason)),
            _ => Err(HandoffError::Protocol("prepare")),
        }
    }

    /// Steps 4–6: past the point of no return.
    fn commit(&self, mut wire: Wire) -> Result<Outcome, HandoffError> {
        let t = self.step_timeout;
        if !(self.stop_control)(t) {
            return Err(HandoffError::Internal(
                "the control API did not stop".into(),
            ));
        }
        self.workers.start_drain_with_grace(self.upgrade_drain_ms);
        wait_until(t, || self.workers.none_accepting().then_some(())).ok_or(
            HandoffError::Internal("the workers did not stop accepting".into()),
        )?;
        let settle = Duration::from_millis(HANDSHAKE_SETTLE_MS).min(t);
        let _ = wait_until(settle, || (self.handshakes.current() == 0).then_some(()));
        let (sessions, left) = pending::take_pending(&self.state, Instant::now());
        if left > 0 {
            tracing::warn!(
                sessions = left,
                "pending WebMKS sessions cannot be handed over; their tickets expire here"
            );
        }
        let carried = sessions.len();
        let fail = |step| HandoffError::on_wire("new process", step);
        wire.send(&Message::Commit { sessions }, t)
            .map_err(fail("commit"))?;
        let pid = match wire.recv::<Message>(t).map_err(fail("start"))? {
            Message::Started { pid } => pid,
            _ => return Err(HandoffError::Protocol("start")),
        };
        self.notifier
            .main_pid(pid, &format!("handed over to PID {pid}; draining"));
        // The new process holds the sockets now; kept here, they would
        // keep accepting after it closes its own at its next SIGTERM.
        self.close_listeners();
        wire.send(&Message::Done, t).map_err(fail("done"))?;
        Ok(Outcome::HandedOver {
            pid,
            sessions: carried,
        })
    }
}

/// The successor's end of a hand-off.
#[derive(Debug)]
pub struct Successor {
    wire: Wire,
    pub predecessor_pid: u32,
    pub demo_addr: Option<SocketAddr>,
    /// One per predecessor worker, same SO_REUSEPORT group.
    pub console: Vec<TcpListener>,
    pub control: TcpListener,
    step_timeout: Duration,
}

impl Successor {
    /// Connect to the predecessor at `path` and receive its offer.
    pub fn connect(path: &Path, step_timeout: Duration) -> Result<Self, HandoffError> {
        let stream = UnixStream::connect(path).map_err(|source| HandoffError::Socket {
            path: path.to_path_buf(),
            source,
        })?;
        check_peer(&stream)?;
        let mut wire = Wire::new(stream);
        let fail = HandoffError::on_wire("running process", "offer");
        let (pid, count, demo_addr) = match wire.recv::<Message>(step_timeout).map_err(fail)? {
            Message::Offer {
                version,
                pid,
                console_listeners,
                demo_addr,
            } => {
                if version != PROTOCOL_VERSION {
                    let reason = format!(
                        "hand-off protocol {version}, this binary speaks {PROTOCOL_VERSION}"
                    );
                    let _ = wire.send(
                        &Message::Refused {
                            reason: reason.clone(),
                        },
                        step_timeout,
                    );
                    return Err(HandoffError::Refused(reason));
                }
                (pid, console_listeners, demo_addr)
            }
            _ => return Err(HandoffError::Protocol("offer")),
        };
        let mut fds = wire.recv_fds(count + 1, step_timeout).map_err(fail)?;
        let control = TcpListener::from(fds.pop().ok_or(HandoffError::Protocol("offer"))?);
        let console = fds.into_iter().map(TcpListener::from).collect();
        Ok(Self {
            wire,
            predecessor_pid: pid,
            demo_addr,
            console,
            control,
            step_timeout,
        })
    }

    /// Step 3, refused: the predecessor goes on.
    pub fn refuse(mut self, reason: &str) {
        let _ = self.wire.send(
            &Message::Refused {
                reason: reason.to_string(),
            },
            self.step_timeout,
        );
    }

    /// Step 3, ready; then wait for the pending sessions (step 4, which
    /// may take the predecessor up to a few step timeouts).
    pub fn prepared(&mut self) -> Result<Vec<PendingSession>, HandoffError> {
        let t = self.step_timeout;
        let fail = |step| HandoffError::on_wire("running process", step);
        self.wire
            .send(&Message::Prepared, t)
            .map_err(fail("prepare"))?;
        match self.wire.recv::<Message>(t * 3).map_err(fail("commit"))? {
            Message::Commit { sessions } => Ok(sessions),
            _ => Err(HandoffError::Protocol("commit")),
        }
    }

    /// Step 5 done; wait for step 6 (this process is the main one now).
    pub fn started(mut self) -> Result<(), HandoffError> {
        let t = self.step_timeout;
        let fail = |step| HandoffError::on_wire("running process", step);
        self.wire
            .send(
                &Message::Started {
                    pid: std::process::id(),
                },
                t,
            )
            .map_err(fail("start"))?;
        match self.wire.recv::<Message>(t).map_err(fail("done"))? {
            Message::Done => Ok(()),
            _ => Err(HandoffError::Protocol("done")),
        }
    }
}

/// The successor's command: this program as it is named on disk now (the
/// upgraded file, not the running one), with this process's arguments
/// minus the hand-off flags.
fn successor_command() -> (PathBuf, Vec<OsString>) {
    let mut args = std::env::args_os();
    let argv0 = args.next().map(PathBuf::from);
    // argv[0] is the path systemd started (/usr/bin/consolegate): the new
    // binary after an upgrade. current_exe() would be the old, deleted one.
    let exe = match argv0 {
        Some(p) if p.is_absolute() => p,
        _ => std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/usr/bin/consolegate")),
    };
    (exe, strip_handoff_flags(args.collect()))
}

/// Remove `--takeover PATH`, `--takeover=PATH` and `--detach`.
pub fn strip_handoff_flags(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip_next = false;
    for a in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--takeover" {
            skip_next = true;
        } else if s.starts_with("--takeover=") || s == "--detach" {
        } else {
            out.push(a);
        }
    }
    out
}

/// Start `exe args --takeover PATH --detach` and wait for it to exit (it
/// only starts the real successor).
fn spawn_successor(
    exe: &Path,
    args: &[OsString],
    socket: &Path,
    timeout: Duration,
) -> Result<(), HandoffError> {
    let spawn_err = |source| HandoffError::Spawn {
        exe: exe.to_path_buf(),
        source,
    };
    let mut child = Command::new(exe)
        .args(args)
        .arg("--takeover")
        .arg(socket)
        .arg("--detach")
        .stdin(Stdio::null())
        .spawn()
        .map_err(spawn_err)?;
    let status = wait_until(timeout, || child.try_wait().ok().flatten());
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(HandoffError::Refused(format!(
            "the new process exited at once: {s}"
        ))),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(HandoffError::Timeout {
                step: "start",
                timeout_ms: timeout.as_millis() as u64,
            })
        }
    }
}

/// `--detach`: start this same command without it, and return (the caller
/// exits), so the real process is re-parented to the service manager.
pub fn detach() -> std::io::Result<()> {
    let mut args = std::env::args_os();
    let _ = args.next();
    let rest: Vec<OsString> = args.filter(|a| a != "--detach").collect();
    let exe = std::env::current_exe()?;
    Command::new(exe).args(rest).stdin(Stdio::null()).spawn()?;
    Ok(())
}

/// Accept one connection within `timeout` (a non-blocking accept, polled).
fn accept_within(
    listener: &UnixListener,
    timeout: Duration,
) -> std::io::Result<Option<UnixStream>> {
    listener.set_nonblocking(true)?;
    let end = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= end {
                    return Ok(None);
                }
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The peer runs as our user (the socket's directory is private too).
fn check_peer(stream: &UnixStream) -> Result<(), HandoffError> {
    let cred = rustix::net::sockopt::socket_peercred(stream)
        .map_err(|e| HandoffError::Internal(format!("SO_PEERCRED: {e}")))?;
    let own = rustix::process::getuid().as_raw();
    let peer = cred.uid.as_raw();
    if peer != own {
        return Err(HandoffError::Peer { peer, own });
    }
    Ok(())
}

/// Poll `f` every few milliseconds until it gives a value or `timeout` ends.
fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handoff_flags_are_stripped_from_the_arguments() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            strip_handoff_flags(args(&[
                "--log-format",
                "json",
                "run",
                "--config",
                "/etc/c.toml",
                "--takeover",
                "/run/x.sock",
                "--detach"
            ])),
            args(&["--log-format", "json", "run", "--config", "/etc/c.toml"])
        );
        assert_eq!(
            strip_handoff_flags(args(&["run", "--takeover=/run/x.sock"])),
            args(&["run"])
        );
    }

    #[test]
    fn the_peer_check_passes_for_our_own_user() {
        let (a, _b) = UnixStream::pair().unwrap();
        check_peer(&a).unwrap();
    }
}
