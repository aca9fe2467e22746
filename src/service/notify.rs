//! The service manager's side channel (sd_notify): `READY=1` once the
//! listeners are up and the workers run, `RELOADING=1`/`READY=1` around a
//! reload, `STOPPING=1` when draining, `MAINPID=` when an upgrade hands the
//! service to a new process, and `WATCHDOG=1` from a watchdog thread that
//! pings only while the control plane answers `/readyz` (which fails when a
//! worker is dead or stuck), so systemd restarts an appliance that stopped
//! making progress.
//!
//! Outside systemd (`$NOTIFY_SOCKET` unset) every call does nothing.
//! Depends on nothing of the appliance but an address to probe.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Longest the watchdog waits for `/readyz` (connect and answer), and at
/// most half the ping interval: a probe that takes longer counts as failed.
pub const PROBE_TIMEOUT_MS: u64 = 5_000;
/// Largest `/readyz` answer head read by the probe.
const PROBE_MAX_BYTES: usize = 4096;

/// Sends notifications when running under a service manager.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    /// Enabled when `$NOTIFY_SOCKET` is set.
    pub fn from_env() -> Self {
        Self {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|v| !v.is_empty()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }

    /// Listeners up, workers running.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// A reload begins; [`ready`](Self::ready) ends it.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// Draining towards exit: no more watchdog pings are expected.
    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// The service's main process is now `pid` (upgrade hand-off; sent by
    /// the current main process, which the default `NotifyAccess=main`
    /// allows).
    pub fn main_pid(&self, pid: u32, status: &str) {
        self.send(&[NotifyState::MainPid(pid), NotifyState::Status(status)]);
    }

    fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}

/// The watchdog period systemd asks for (`$WATCHDOG_USEC`), when it asks
/// this process: `$WATCHDOG_PID` unset or naming it, or `successor` (the
/// variables a new process inherits in an upgrade name the previous main
/// process, whose place it takes).
pub fn watchdog_period(successor: bool) -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC")
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|u| *u > 0)?;
    let pid = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok());
    let ours = successor || pid.is_none_or(|p| p == std::process::id());
    ours.then(|| Duration::from_micros(usec))
}

/// A running watchdog thread; stops when dropped or [`stop`](Self::stop)ped.
#[derive(Debug)]
pub struct Watchdog {
    stop: Arc<AtomicBool>,
}

impl Watchdog {
    /// Ping every half `period` while `/readyz` on `control` answers 200.
    pub fn spawn(
        notifier: Notifier,
        period: Duration,
        control: SocketAddr,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let interval = (period / 2).max(Duration::from_millis(10));
        let timeout = (interval / 2).min(Duration::from_millis(PROBE_TIMEOUT_MS));
        let target = probe_address(control);
        std::thread::Builder::new()
            .name("cg-watchdog".into())
            .spawn(move || {
                let mut failing = false;
                while !flag.load(Ordering::Acquire) {
                    let started = Instant::now();
                    match probe_ready(target, timeout) {
                        Ok(()) => {
                            if failing {
                                tracing::info!("control plane and workers healthy again; watchdog pings resume");
                            }
                            failing = false;
                            notifier.watchdog();
                        }
                        Err(why) => {
                            if !failing {
                                tracing::error!(reason = %why, "not ready: watchdog pings withheld, systemd will restart the service if this lasts");
                            }
                            failing = true;
                        }
                    }
                    sleep_unless(&flag, interval.saturating_sub(started.elapsed()));
                }
            })?;
        Ok(Self { stop })
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sleep `total`, waking early when `flag` is set (checked every 50 ms).
fn sleep_unless(flag: &AtomicBool, total: Duration) {
    const STEP: Duration = Duration::from_millis(50);
    let end = Instant::now() + total;
    while !flag.load(Ordering::Acquire) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(STEP));
    }
}

/// Where to reach a control listener bound to `addr`: the loopback of its
/// family when it listens on every address.
pub fn probe_address(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port()))
        }
        ip if ip.is_unspecified() => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port())),
        _ => addr,
    }
}

/// `GET /readyz` answered 200 within `timeout`.
pub fn probe_ready(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    s.set_write_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < PROBE_MAX_BYTES {
        s.set_read_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        let n = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let status = line.lines().next().unwrap_or("").to_string();
    if status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        // The body names the dead or stuck worker.
        let body = line.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        Err(format!("/readyz: {status} {body}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(answer: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut b = [0u8; 256];
                let _ = s.read(&mut b);
                let _ = s.write_all(answer.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn the_probe_wants_a_200() {
        let ok = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        probe_ready(ok, Duration::from_secs(5)).unwrap();
        let bad =
            serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n{\"error\":\"worker 1 is dead\"}");
        let e = probe_ready(bad, Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("503") && e.contains("worker 1 is dead"), "{e}");
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = probe_ready(silent.local_addr().unwrap(), Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("read"), "{e}");
    }

    #[test]
    fn unspecified_addresses_are_probed_on_loopback() {
        assert_eq!(
            probe_address("0.0.0.0:8080".parse().unwrap()),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert_eq!(
            probe_address("[::]:8080".parse().unwrap()),
            "[::1]:8080".parse().unwrap()
        );
        assert_eq!(
            probe_address("10.1.2.3:8080".parse().unwrap()),
            "10.1.2.3:8080".parse().unwrap()
        );
    }
}
