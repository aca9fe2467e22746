//! Fault tests, each on both IO backends: the appliance and the proxy under
//! the faults a console proxy meets — out of file descriptors, a control
//! plane that stalls, a worker that dies, a revoke storm into full
//! mailboxes, a kill -9 in the middle of saving the port state, and floods
//! of slow readers. Fault injection uses the `failpoints` test build
//! (`make test` builds the binary with it): FAILPOINTS at start, or the
//! admin-only `/api/v1/debug/failpoints/{name}` endpoint.

#[macro_use]
mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

backend_tests!(
    fd_exhaustion_accept_backs_off_and_recovers,
    worker_panic_takes_the_appliance_down,
    worker_error_takes_the_proxy_down,
    stuck_workers_fail_readyz_until_they_turn_again,
    stuck_workers_withhold_the_watchdog_pings,
    revoke_storm_into_full_mailboxes_closes_every_console,
    stalled_control_plane_leaves_relays_flowing,
    kill9_while_saving_ports_leaves_the_state_file_intact,
    slow_readers_stay_inside_the_memory_budget,
    static_file_readers_that_read_nothing_hold_no_file,
);

fn set_failpoint(app: &Appliance, name: &str, actions: &str) {
    let r = app.api(
        "PUT",
        &format!("/api/v1/debug/failpoints/{name}"),
        Some(ADMIN_TOKEN),
        Some(actions),
    );
    assert_eq!(
        r.status, 204,
        "io={}: set failpoint {name}={actions}: {r:?} (is the binary built with --features failpoints?)",
        app.io
    );
}

fn clear_failpoint(app: &Appliance, name: &str) {
    let r = app.api(
        "DELETE",
        &format!("/api/v1/debug/failpoints/{name}"),
        Some(ADMIN_TOKEN),
        None,
    );
    assert_eq!(
        r.status, 204,
        "io={}: clear failpoint {name}: {r:?}",
        app.io
    );
}

/// A value of a `/metrics` series with these exact labels (0 if absent).
fn metric(app: &Appliance, series: &str) -> f64 {
    let r = app.get("/metrics");
    assert_eq!(r.status, 200, "io={}: /metrics: {r:?}", app.io);
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// Out of file descriptors
// ---------------------------------------------------------------------------

/// At an fd limit of 64, connections beyond what the proxy can accept make
/// accept fail with EMFILE. The worker pauses accepting (it once spun: 3.6
/// CPU-seconds in 3 s on io_uring), and serves again once descriptors free.
fn fd_exhaustion_accept_backs_off_and_recovers(io: &str) {
    let echo = EchoServer::start();
    let proxy = Proxy::start_launch(
        io,
        &["--workers", "1"],
        Some(&echo.target()),
        &Launch::nofile(64),
    );
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(tcp_connect(proxy.addr));
    }
    wait_until(
        Duration::from_secs(10),
        "the proxy to log its accept pause",
        || proxy.stderr().contains("pausing accepts").then_some(()),
    );
    let pid = proxy.pid();
    let cpu_before = cpu_seconds(pid).expect("proxy CPU time");
    let window = Duration::from_secs(3);
    std::thread::sleep(window); // a measurement window, not a synchronisation
    let used = cpu_seconds(pid).expect("proxy CPU time") - cpu_before;
    assert!(
        used < 0.3,
        "io={io}: the proxy used {used:.2} CPU-s in {window:?} while out of descriptors"
    );
    drop(held);
    let mut c = wait_until(
        Duration::from_secs(15),
        "a session once descriptors are free again",
        || try_ws_connect(proxy.addr, "/", &[]).ok(),
    );
    c.send(b"after");
    assert_eq!(c.expect_bytes(5, "the echo after recovery"), b"after");
    eprintln!("io={io}: {used:.3} CPU-s in {window:?} at the fd limit");
}

// ---------------------------------------------------------------------------
// Supervision
// ---------------------------------------------------------------------------

fn two_workers() -> ApplianceOptions {
    ApplianceOptions {
        dataplane_toml: "workers = 2\n".into(),
        ..Default::default()
    }
}

/// A worker that panics takes the appliance down (after the other worker
/// drained) with a non-zero status and a log line naming it, instead of
/// running on a worker short.
fn worker_panic_takes_the_appliance_down(io: &str) {
    let mut app = Appliance::start(io, two_workers());
    let ready = app.get("/readyz");
    assert_eq!(ready.status, 200, "io={io}: /readyz before: {ready:?}");
    let workers = ready.json()["workers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        workers.len(),
        2,
        "io={io}: /readyz lists both workers: {ready:?}"
    );
    assert!(
        workers.iter().all(|w| w["alive"] == true),
        "io={io}: {ready:?}"
    );
    assert_eq!(metric(&app, "consolegate_worker_alive{worker=\"1\"}"), 1.0);

    set_failpoint(&app, "worker-panic", "return(1)");
    let status = app
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("io={io}: the appliance did not exit after a worker panicked"));
    assert!(!status.success(), "io={io}: exit status {status:?}");
    let log = app.stderr();
    assert!(
        log.contains("worker 1 panicked"),
        "io={io}: no log line names the dead worker:\n{log}"
    );
}

/// The same for the proxy, with a worker whose loop returns an error.
fn worker_error_takes_the_proxy_down(io: &str) {
    let echo = EchoServer::start();
    let mut proxy = Proxy::start_launch(
        io,
        &["--workers", "2"],
        Some(&echo.target()),
        &Launch::failpoints("worker-error=1*off->return(0)"),
    );
    let status = proxy
        .wait_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("io={io}: the proxy did not exit after a worker failed"));
    assert!(!status.success(), "io={io}: exit status {status:?}");
    let log = proxy.stderr();
    assert!(
        log.contains("worker 0") && log.contains("failpoint worker-error"),
        "io={io}: no log line names the failed worker:\n{log}"
    );
}

/// A worker whose loop stops turning (here: every turn sleeps 1 s against a
/// 300 ms stall limit) makes /readyz answer 503 naming it, and ready again
/// once it turns.
fn stuck_workers_fail_readyz_until_they_turn_again(io: &str) {
    let app = Appliance::start(
        io,
        ApplianceOptions {
            control_toml: "worker_stall_ms = 300\n".into(),
            ..Default::default()
        },
    );
    set_failpoint(&app, "worker-stall", "sleep(1000)");
    let r = wait_until(
        Duration::from_secs(10),
        "/readyz to report a stuck worker",
        || {
            let r = app.get("/readyz");
            (r.status == 503).then_some(r)
        },
    );
    r.assert_api_error(503, "workers_unhealthy", "/readyz with stuck workers");
    assert!(r.body.contains("stuck"), "io={io}: {r:?}");
    clear_failpoint(&app, "worker-stall");
    wait_until(Duration::from_secs(10), "/readyz to recover", || {
        (app.get("/readyz").status == 200).then_some(())
    });
}

// ---------------------------------------------------------------------------
// The systemd watchdog
// ---------------------------------------------------------------------------

/// The watchdog period the test asks for (`WATCHDOG_USEC`): pings come
/// every half of it, each after a `/readyz` probe of at most a quarter.
const WATCHDOG_PERIOD_MS: u64 = 2_000;

/// The test's side of `$NOTIFY_SOCKET`: what systemd would receive.
struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    last_ping: Option<Instant>,
}

impl NotifySocket {
    fn bind(path: &std::path::Path) -> NotifySocket {
        let socket = std::os::unix::net::UnixDatagram::bind(path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        NotifySocket {
            socket,
            last_ping: None,
        }
    }

    /// The next message, if one comes within the socket's read timeout;
    /// a ping's time is noted.
    fn recv(&mut self) -> Option<String> {
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        let m = String::from_utf8_lossy(&buf[..n]).into_owned();
        if m.split('\n').any(|l| l == "WATCHDOG=1") {
            self.last_ping = Some(Instant::now());
        }
        Some(m)
    }

    /// The next message containing `want`, within `timeout`.
    fn wait_for(&mut self, timeout: Duration, want: &str) -> String {
        wait_until(timeout, &format!("{want} on the notify socket"), || {
            let m = self.recv()?;
            m.contains(want).then_some(m)
        })
    }

    /// Wait (up to `timeout`) until no ping has come for `silence`.
    fn wait_ping_silence(&mut self, timeout: Duration, silence: Duration) {
        wait_until(
            timeout,
            &format!("{silence:?} without a watchdog ping"),
            || {
                let _ = self.recv();
                let last = self.last_ping.expect("pings were seen before");
                (last.elapsed() >= silence).then_some(())
            },
        )
    }

    /// Time from the previous `WATCHDOG=1` to the next one, waited for
    /// up to `timeout`.
    fn next_ping_gap(&mut self, timeout: Duration) -> Duration {
        let before = self.last_ping;
        self.wait_for(timeout, "WATCHDOG=1");
        let now = self.last_ping.expect("a ping was just seen");
        now - before.unwrap_or(now)
    }

    /// Wait (up to `timeout`) until `count` pings in a row each came
    /// within the watchdog period: what keeps systemd from restarting.
    fn wait_steady_pings(&mut self, timeout: Duration, count: usize, what: &str) {
        let period = Duration::from_millis(WATCHDOG_PERIOD_MS);
        let deadline = Instant::now() + timeout;
        let mut steady = 0;
        self.next_ping_gap(timeout);
        while steady < count {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{what}: no {count} pings in a row within {period:?} each"
            );
            let gap = self.next_ping_gap(left);
            steady = if gap < period { steady + 1 } else { 0 };
        }
    }
}

/// Under systemd (here the test's own notify socket), READY=1 comes once
/// the listeners answer, and WATCHDOG=1 only while every worker turns: a
/// stuck worker makes `/readyz` fail and the pings stop for more than twice
/// the watchdog period (systemd would kill and restart the service), and
/// they come steadily again once it turns.
fn stuck_workers_withhold_the_watchdog_pings(io: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let mut notify = NotifySocket::bind(&path);
    let app = Appliance::start(
        io,
        ApplianceOptions {
            control_toml: "worker_stall_ms = 300\n".into(),
            launch: Launch {
                prefix: Vec::new(),
                env: vec![
                    ("NOTIFY_SOCKET".into(), path.display().to_string()),
                    (
                        "WATCHDOG_USEC".into(),
                        (WATCHDOG_PERIOD_MS * 1000).to_string(),
                    ),
                ],
            },
            ..Default::default()
        },
    );
    let ready = notify.wait_for(Duration::from_secs(20), "READY=1");
    assert!(
        ready.contains("STATUS=listening; workers running"),
        "io={io}: READY without its status: {ready:?}"
    );
    notify.wait_steady_pings(Duration::from_secs(20), 3, "healthy");

    // Every turn of every worker sleeps 6 s: /readyz answers 503 but for
    // the 300 ms after each turn.
    set_failpoint(&app, "worker-stall", "sleep(6000)");
    notify.wait_ping_silence(
        Duration::from_secs(30),
        Duration::from_millis(2 * WATCHDOG_PERIOD_MS),
    );
    let log = app.stderr();
    assert!(
        log.contains("watchdog pings withheld"),
        "io={io}: no log line says the pings stopped:\n{log}"
    );

    clear_failpoint(&app, "worker-stall");
    notify.wait_steady_pings(Duration::from_secs(30), 3, "after the workers turn again");
}

// ---------------------------------------------------------------------------
// Revoke storm
// ---------------------------------------------------------------------------

/// Twelve live consoles, workers stalled, mailboxes of one message: the
/// DELETEs overflow them (counted), yet every console closes with 1008
/// within a second of the workers running again (the admission's revoked
/// state is seen on the next tick; undelivered messages are retried).
fn revoke_storm_into_full_mailboxes_closes_every_console(io: &str) {
    let app = Appliance::start(
        io,
        ApplianceOptions {
            control_toml: "mailbox_capacity = 1\n".into(),
            dataplane_toml: "workers = 2\n".into(),
            ..Default::default()
        },
    );
    let mut consoles = Vec::new();
    for i in 0..12 {
        // A mailbox of one message may still hold the previous admission:
        // 503 dataplane_busy (with Retry-After) is the documented answer,
        // and a retry goes through once the workers drained it.
        let body = json!({"target": {"kind": "demo"}, "user": format!("user{i}")});
        let s = wait_until(
            Duration::from_secs(5),
            "a session past a full mailbox",
            || {
                let r = app.try_create(&body);
                match r.status {
                    201 => Some(CreatedSession::from_json(&r.json())),
                    503 => None,
                    _ => panic!("io={io}: create: {r:?}"),
                }
            },
        );
        let mut c = ws_connect(io, s.addr, &s.path, &[]);
        rfb_handshake_none(&mut c);
        consoles.push((s, c));
    }
    for (s, _) in &consoles {
        app.wait_state(&s.id, "open", Duration::from_secs(5));
    }
    set_failpoint(&app, "worker-stall", "sleep(250)");
    for (s, _) in &consoles {
        let r = app.delete(&s.id);
        assert_eq!(r.status, 200, "io={io}: DELETE {}: {r:?}", s.id);
    }
    let undelivered = metric(
        &app,
        "consolegate_errors_total{worker=\"control\",cause=\"revoke_undelivered\"}",
    );
    clear_failpoint(&app, "worker-stall");
    let released = Instant::now();
    for (s, c) in &mut consoles {
        let left = Duration::from_secs(1).saturating_sub(released.elapsed());
        let (code, reason) = c.expect_close(left.max(Duration::from_millis(1)));
        assert_eq!(
            code,
            Some(1008),
            "io={io}: session {} closed with {code:?} ({reason:?})",
            s.id
        );
    }
    let took = released.elapsed();
    assert!(
        took <= Duration::from_secs(1),
        "io={io}: the last console closed {took:?} after the workers resumed"
    );
    assert!(
        undelivered > 0.0,
        "io={io}: no revoke was refused by a full mailbox: the storm did not test the fallback"
    );
    eprintln!("io={io}: {undelivered} undelivered revokes, all consoles closed in {took:?}");
}

// ---------------------------------------------------------------------------
// Control plane stalled
// ---------------------------------------------------------------------------

/// Whether the control port answers `/healthz` within `timeout`.
fn control_answers(addr: SocketAddr, timeout: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200")
}

/// The control thread blocked for 3 s: relays keep flowing, and a session
/// admitted before the stall can still connect during it.
fn stalled_control_plane_leaves_relays_flowing(io: &str) {
    let echo = EchoServer::start();
    let app = Appliance::start(io, ApplianceOptions::default());
    let target = json!({"kind": "vnc", "host": "127.0.0.1", "port": echo.addr.port()});
    let live = app.create(&json!({"target": target, "user": "a"}));
    let later = app.create(&json!({"target": target, "user": "b"}));
    let mut c = ws_connect(io, live.addr, &live.path, &[]);
    c.send(b"before");
    assert_eq!(c.expect_bytes(6, "echo before the stall"), b"before");

    set_failpoint(&app, "control-stall", "1*sleep(3000)");
    wait_until(Duration::from_secs(5), "the control plane to stall", || {
        (!control_answers(app.control, Duration::from_millis(200))).then_some(())
    });
    let stalled = Instant::now();
    let mut worst = Duration::ZERO;
    for i in 0..20u32 {
        let msg = format!("during {i:02}");
        let t = Instant::now();
        c.send(msg.as_bytes());
        assert_eq!(
            c.expect_bytes(msg.len(), "echo during the stall"),
            msg.as_bytes()
        );
        worst = worst.max(t.elapsed());
    }
    let mut c2 = ws_connect(io, later.addr, &later.path, &[]);
    c2.send(b"new");
    assert_eq!(
        c2.expect_bytes(3, "echo of a session opened during the stall"),
        b"new"
    );
    let during = stalled.elapsed();
    assert!(
        !control_answers(app.control, Duration::from_millis(100))
            || during > Duration::from_secs(2),
        "io={io}: the control plane was not stalled while the relays were checked"
    );
    assert!(
        worst < Duration::from_millis(500),
        "io={io}: an echo took {worst:?} while the control plane stalled"
    );
    wait_until(
        Duration::from_secs(10),
        "the control plane to answer again",
        || control_answers(app.control, Duration::from_millis(500)).then_some(()),
    );
}

// ---------------------------------------------------------------------------
// kill -9 while saving the port state
// ---------------------------------------------------------------------------

fn persisted_ports(state_dir: &std::path::Path) -> Option<Vec<u64>> {
    let text = fs::read_to_string(state_dir.join("ports.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(
        v["allocations"]
            .as_array()?
            .iter()
            .filter_map(|a| a["port"].as_u64())
            .collect(),
    )
}

/// The saver is stopped between writing its temp file and the rename, and
/// the process is killed there: ports.json still holds the last complete
/// state, and a restart on the same state directory starts cleanly,
/// reclaims the dead process's ports and removes the temp file.
fn kill9_while_saving_ports_leaves_the_state_file_intact(io: &str) {
    let keep = tempfile::tempdir().unwrap();
    let state_dir = keep.path().join("state");
    let opts = ApplianceOptions {
        state_dir: Some(state_dir.clone()),
        ..Default::default()
    };
    let mut app = Appliance::start(io, opts.clone());
    let first =
        app.create(&json!({"target": {"kind": "demo"}, "user": "a", "port_mode": "dedicated"}));
    let port = u64::from(first.port.expect("a dedicated port"));
    wait_until(
        Duration::from_secs(5),
        "the first port to be persisted",
        || (persisted_ports(&state_dir)? == vec![port]).then_some(()),
    );
    set_failpoint(&app, "ports-save-before-rename", "sleep(10000)");
    app.create(&json!({"target": {"kind": "demo"}, "user": "b", "port_mode": "dedicated"}));
    let temp = wait_until(Duration::from_secs(5), "the saver's temp file", || {
        fs::read_dir(&state_dir)
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with(".ports.json.tmp"))
    });
    app.kill9();
    assert_eq!(
        persisted_ports(&state_dir),
        Some(vec![port]),
        "io={io}: ports.json after kill -9 mid-save (temp file {temp})"
    );
    let restarted = Appliance::start(io, opts);
    let ports = restarted.wait_allocated(0, Duration::from_secs(10));
    assert_eq!(
        ports["allocated_ports"], 0,
        "io={io}: the dead process's ports were reclaimed: {ports}"
    );
    wait_until(
        Duration::from_secs(5),
        "the stale temp file to be removed",
        || (!state_dir.join(&temp).exists()).then_some(()),
    );
    let s = restarted
        .create(&json!({"target": {"kind": "demo"}, "user": "c", "port_mode": "dedicated"}));
    let mut c = ws_connect(io, s.addr, &s.path, &[]);
    rfb_handshake_none(&mut c);
}

// ---------------------------------------------------------------------------
// Slow readers
// ---------------------------------------------------------------------------

/// A backend that accepts `n` connections and writes to each as fast as it
/// takes bytes (non-blocking, one thread), until `stop`.
fn flooding_backend(n: usize, stop: Arc<AtomicBool>) -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    std::thread::spawn(move || {
        let chunk = vec![0x5au8; 64 * 1024];
        let mut socks: Vec<TcpStream> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            while socks.len() < n {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(true).unwrap();
                        socks.push(s);
                    }
                    Err(_) => break,
                }
            }
            let mut progress = false;
            for s in &mut socks {
                if let Ok(k) = s.write(&chunk) {
                    w.fetch_add(k as u64, Ordering::Relaxed);
                    progress |= k > 0;
                }
            }
            if !progress {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    (addr, written)
}

/// Waits until `counter` stops growing for `quiet`.
fn wait_quiet(counter: &AtomicU64, quiet: Duration, limit: Duration, what: &str) {
    let start = Instant::now();
    let mut last = counter.load(Ordering::Relaxed);
    let mut since = Instant::now();
    while since.elapsed() < quiet {
        assert!(
            start.elapsed() < limit,
            "{}{what} did not settle within {limit:?}",
            ctx()
        );
        std::thread::sleep(Duration::from_millis(50));
        let now = counter.load(Ordering::Relaxed);
        if now != last {
            last = now;
            since = Instant::now();
        }
    }
}

/// 1 000 browsers that never read, each behind a backend that floods: the
/// proxy stops reading the backends (backpressure) and its peak memory
/// stays within sessions × 2 × (buffer_bytes + one chunk) of where it
/// started.
fn slow_readers_stay_inside_the_memory_budget(io: &str) {
    const SESSIONS: usize = 1000;
    const BUFFER: u64 = 32 * 1024;
    const RECV: u64 = 16 * 1024;
    raise_nofile();
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, written) = flooding_backend(SESSIONS, stop.clone());
    let proxy = Proxy::start(
        io,
        &[
            "--buffer-bytes",
            &BUFFER.to_string(),
            "--uring-buffers",
            "64",
            "--workers",
            "2",
        ],
        Some(&addr.to_string()),
    );
    let _ = RECV;
    let pid = proxy.pid();
    // Workers allocate their rings and buffers after the listening line.
    settled_fd_count(pid);
    let base = hwm_bytes(pid).expect("VmHWM");
    let mut clients = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect_timeout(&proxy.addr.into(), IO_TIMEOUT)
            .unwrap();
        let mut s: TcpStream = sock.into();
        s.write_all(&upgrade_request("/", &[])).unwrap();
        clients.push(s);
    }
    wait_quiet(
        &written,
        Duration::from_millis(1500),
        Duration::from_secs(60),
        "the flood",
    );
    let peak = hwm_bytes(pid).expect("VmHWM");
    stop.store(true, Ordering::SeqCst);
    // One chunk holds a read (64 KiB recv buffers by default) framed.
    let chunk = (64 * 1024 / 3 + 1) * 4 + 10;
    let budget = SESSIONS as u64 * 2 * (BUFFER + chunk) + 64 * 64 * 1024 * 2;
    let grew = peak.saturating_sub(base);
    eprintln!(
        "io={io}: {SESSIONS} slow readers: peak grew {} MiB (budget {} MiB), backends wrote {} MiB",
        grew >> 20,
        budget >> 20,
        written.load(Ordering::Relaxed) >> 20
    );
    assert!(
        grew <= budget,
        "io={io}: peak RSS grew {grew} bytes, over the budget of {budget}"
    );
    drop(clients);
}

/// 100 clients ask for an 8 MiB static file and read nothing: the proxy
/// streams it as they read, so it holds at most `buffer_bytes` of it per
/// connection (it once read every file whole: +560 MiB on epoll, +820 MiB
/// on io_uring).
fn static_file_readers_that_read_nothing_hold_no_file(io: &str) {
    const CLIENTS: usize = 100;
    const FILE: usize = 8 * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("big.bin"), vec![7u8; FILE]).unwrap();
    let proxy = Proxy::start(
        io,
        &[
            "--web",
            dir.path().to_str().unwrap(),
            "--buffer-bytes",
            "65536",
        ],
        Some("127.0.0.1:9"),
    );
    let pid = proxy.pid();
    // Workers open their rings after the listening line: measure once settled.
    let fds_before = settled_fd_count(pid);
    let base = hwm_bytes(pid).expect("VmHWM");
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect_timeout(&proxy.addr.into(), IO_TIMEOUT)
            .unwrap();
        let mut s: TcpStream = sock.into();
        s.write_all(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        clients.push(s);
    }
    // Every response has started (its head is readable).
    for s in &mut clients {
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "io={io}");
    }
    let peak = hwm_bytes(pid).expect("VmHWM");
    let grew = peak.saturating_sub(base);
    let budget = CLIENTS as u64 * 2 * (64 * 1024 + 100 * 1024);
    eprintln!(
        "io={io}: {CLIENTS} idle file readers: peak grew {} KiB (budget {} KiB)",
        grew >> 10,
        budget >> 10
    );
    assert!(
        grew <= budget,
        "io={io}: peak RSS grew {grew} bytes, over {budget}"
    );
    // One reader that does read gets the whole file.
    let mut reader = clients.pop().unwrap();
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    let body_start = rest
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap();
    assert_eq!(
        rest.len() - body_start,
        FILE,
        "io={io}: the file arrived whole"
    );
    drop(clients);
    wait_until(
        Duration::from_secs(15),
        "the proxy to release the readers' descriptors",
        || (fd_count(pid)? <= fds_before).then_some(()),
    );
}
