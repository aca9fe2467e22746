//! Child processes of the bench (websockify, consolegate): spawn with output
//! to a log file, wait until ready (a stdout line or an accepting port), and
//! stop by PID — the process and every descendant it forked (websockify forks
//! one handler per connection) — when stopped, dropped, or on error.
//!
//! Every wait here is bounded by a deadline; a child that never gets ready is
//! an error, never a hang.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rustix::process::{kill_process, Pid, Signal};

/// How long a child gets to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// Poll interval while waiting for a port or an exit.
const POLL: Duration = Duration::from_millis(20);

pub struct ChildProc {
    name: String,
    command_line: String,
    child: Option<Child>,
    log_path: PathBuf,
    stdout_pump: Option<JoinHandle<()>>,
    stdout_lines: Option<Receiver<String>>,
}

impl ChildProc {
    /// Spawns `program args…`, stderr (and stdout, after it has been read
    /// for readiness) appended to `log_path`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log_path: &Path,
    ) -> Result<ChildProc> {
        let command_line = std::iter::once(program.display().to_string())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut log =
            File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
        writeln!(log, "$ {command_line}")?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log.try_clone()?))
            .spawn()
            .with_context(|| format!("spawning {command_line}"))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        // Forward stdout lines to whoever waits for readiness, and to the log.
        // Ends at EOF, i.e. when the child and its descendants are gone.
        let stdout_pump = std::thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(log, "{line}");
                    let _ = tx.send(line);
                }
            })?;
        Ok(ChildProc {
            name: name.to_string(),
            command_line,
            child: Some(child),
            log_path: log_path.to_path_buf(),
            stdout_pump: Some(stdout_pump),
            stdout_lines: Some(rx),
        })
    }

    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// The child's PID while it has not been stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the child has exited (without reaping anything else).
    pub fn has_exited(&mut self) -> bool {
        self.exited().is_some()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            _ => None,
        }
    }

    fn failure(&mut self, what: &str) -> anyhow::Error {
        let status = self.exited().unwrap_or_else(|| "still running".into());
        anyhow!(
            "{}: {what} ({status}); log {}: {}",
            self.name,
            self.log_path.display(),
            log_tail(&self.log_path, 400)
        )
    }

    /// Waits for the first stdout line for which `parse` returns `Some`.
    pub fn wait_for_line<T>(
        &mut self,
        timeout: Duration,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let rx = self
            .stdout_lines
            .take()
            .ok_or_else(|| anyhow!("stdout already consumed"))?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.failure(&format!("no ready line within {timeout:?}")));
            }
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(v) = parse(&line) {
                        return Ok(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    // stdout closed: the child exited (or closed it). Give the
                    // exit status a moment to be reapable for the message.
                    let until = Instant::now() + Duration::from_millis(500);
                    while self.exited().is_none() && Instant::now() < until {
                        std::thread::sleep(POLL);
                    }
                    return Err(self.failure("exited before printing its ready line"));
                }
            }
        }
    }

    /// Waits until `addr` accepts a TCP connection (the probe connection is
    /// closed at once) or the child exits.
    pub fn wait_until_accepts(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.exited().is_some() {
                return Err(self.failure("exited before accepting connections"));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!("{addr} not accepting within {timeout:?}")));
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM, then SIGKILL after a grace period, to the child; SIGKILL to
    /// every descendant it had. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id();
        let descendants = descendants_of(pid);
        if child.try_wait().ok().flatten().is_none() {
            if let Some(p) = Pid::from_raw(pid as i32) {
                let _ = kill_process(p, Signal::TERM);
            }
            let deadline = Instant::now() + TERM_GRACE;
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
        // Forked children may outlive their parent (and hold its stdout).
        for d in descendants {
            if let Some(p) = Pid::from_raw(d as i32) {
                let _ = kill_process(p, Signal::KILL);
            }
        }
        if let Some(pump) = self.stdout_pump.take() {
            let deadline = Instant::now() + TERM_GRACE;
            while !pump.is_finished() && Instant::now() < deadline {
                std::thread::sleep(POLL);
            }
            if pump.is_finished() {
                let _ = pump.join();
            } else {
                eprintln!(
                    "{}: stdout still open after stop (pid {pid}); leaving reader thread",
                    self.name
                );
            }
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// All live descendants of `pid` (not `pid` itself).
fn descendants_of(pid: u32) -> Vec<u32> {
    crate::procfs::process_tree(pid)
        .into_iter()
        .filter(|&p| p != pid)
        .collect()
}

/// The last `max` bytes of a log, on one line, for error messages.
pub fn log_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return "(no log)".into();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    let s = String::from_utf8_lossy(&buf);
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.is_empty() {
        "(empty)".into()
    } else {
        s
    }
}

/// A port on 127.0.0.1 that was free a moment ago (bind to 0, read, release)
/// for servers that cannot report the port they bound themselves.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Checks that a program exists before trying to spawn it, for a clear error.
pub fn require_file(path: &Path, hint: &str) -> Result<()> {
    if !path.is_file() {
        bail!("{} not found ({hint})", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_a_child_and_its_forked_grandchild() {
        let dir = std::env::temp_dir().join(format!("cg-bench-child-{}", std::process::id()));
        let log = dir.join("sh.log");
        // The shell forks a long sleep and prints its PID.
        let mut c = ChildProc::spawn(
            "sh",
            Path::new("/bin/sh"),
            &["-c".into(), "sleep 30 & echo child $!; wait".into()],
            &log,
        )
        .unwrap();
        let grandchild: u32 = c
            .wait_for_line(Duration::from_secs(5), |l| {
                l.strip_prefix("child ").and_then(|p| p.trim().parse().ok())
            })
            .unwrap();
        let pid = c.child.as_ref().unwrap().id();
        c.stop();
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        // The grandchild was re-parented and killed; it may linger as a zombie
        // of whoever reaps orphans here, but it must not be running.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s[s.rfind(')')? + 1..].trim_start().to_string();
                    rest.chars().next()
                });
            match state {
                None | Some('Z') | Some('X') => break,
                Some(_) if Instant::now() < deadline => std::thread::sleep(POLL),
                Some(s) => panic!("grandchild {grandchild} still in state {s}"),
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn reports_a_child_that_exits_without_ready_line() {
        let dir = std::env::temp_dir().join(format!("cg-bench-exit-{}", std::process::id()));
        let mut c = ChildProc::spawn(
            "false",
            Path::new("/bin/sh"),
            &["-c".into(), "echo nope >&2; exit 3".into()],
            &dir.join("x.log"),
        )
        .unwrap();
        let err = c
            .wait_for_line(Duration::from_secs(5), |_| Some(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
