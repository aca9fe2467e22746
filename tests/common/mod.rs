//! Shared helpers of the end-to-end tests: real peers (TigerVNC `Xvnc`, the
//! `consolegate` binary, small TCP servers), WebSocket clients (plain and TLS)
//! and the bits of RFB the tests speak.
//!
//! Rules the helpers keep so the tests can too: every server listens on
//! 127.0.0.1 on an ephemeral port; every wait is a bounded poll against a
//! deadline (no fixed sleeps for synchronisation); every process a helper
//! starts is killed by PID when its guard drops; a missing peer is a failure
//! naming the Debian package, never a silent skip.
//!
//! Each test file includes this module with `#[macro_use] mod common;`, and
//! not every file uses every helper.
#![allow(dead_code)]
pub mod browser;
pub mod events;
pub mod qemu;
pub mod vcsim;
pub mod wss_backend;
pub mod x11;

#[allow(unused_imports)]
pub use browser::*;

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tungstenite::handshake::client::Response;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

/// The IO backends every end-to-end test runs against.
pub const IO_BACKENDS: [&str; 2] = ["epoll", "uring"];

/// `backend_tests!(name, ...)` turns each `fn name(io: &str)` into one
/// `#[test]` per IO backend: `name::epoll` and `name::uring`, so a failure
/// names its backend in the test name; the helpers' own panic messages name
/// it too (see [`ctx`]). The names are those of [`IO_BACKENDS`].
#[allow(unused_macros)]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn epoll() {
                    crate::common::set_current_io("epoll");
                    super::$name("epoll")
                }
                #[test]
                fn uring() {
                    crate::common::set_current_io("uring");
                    super::$name("uring")
                }
            }
        )*
    };
}

thread_local! {
    // libtest runs each test on its own thread.
    static CURRENT_IO: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Records the IO backend of the test running on this thread.
pub fn set_current_io(io: &str) {
    CURRENT_IO.with(|c| *c.borrow_mut() = io.to_string());
}

/// `"io=epoll: "` in a backend test, `""` elsewhere: the prefix of helper
/// panic messages.
pub fn ctx() -> String {
    CURRENT_IO.with(|c| {
        let c = c.borrow();
        if c.is_empty() {
            String::new()
        } else {
            format!("io={c}: ")
        }
    })
}

/// Drains a child's piped stdout for its whole life (so it never blocks on
/// a full pipe) into a shared buffer, and sends each line to the receiver.
pub fn drain_stdout_lines(child: &mut Child) -> (Arc<Mutex<String>>, mpsc::Receiver<String>) {
    let buf = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel::<String>();
    let out = child.stdout.take().expect("stdout is piped");
    let b = buf.clone();
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            {
                let mut b = b.lock().unwrap();
                b.push_str(&line);
                b.push('\n');
            }
            let _ = tx.send(line);
        }
    });
    (buf, rx)
}

/// How long a helper waits for a peer to come up before failing.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Default read timeout of test clients: long enough for a loaded 2-core CI
/// machine, short enough that a hung test fails rather than stalls.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

/// Polls `f` every few milliseconds until it returns `Some`, or panics with
/// `what` once `timeout` has passed.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("{}timed out after {timeout:?} waiting for {what}", ctx());
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A port that was free a moment ago on 127.0.0.1 (bound to :0 and released).
/// Racy by nature: callers that hand it to another program verify it listens.
pub fn pick_free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Finds an executable on PATH (like `command -v`), also looking in the
/// system directories in case PATH is minimal.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/bin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Sends a signal to every process of a process group (a child spawned with
/// `process_group(0)` leads its own group, with the group id = its pid).
pub fn signal_group(pgid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Sends a signal with /usr/bin/kill (keeps `unsafe` out of the tests).
pub fn send_signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Waits up to `timeout` for `child` to exit.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Ends a child: SIGTERM, a bounded wait, then SIGKILL. Always reaps it.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    send_signal(child.id(), "TERM");
    if wait_child(child, grace).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The last `max` bytes of a log file, for failure messages.
pub fn tail_of_file(path: &Path, max: usize) -> String {
    let data = fs::read(path).unwrap_or_default();
    let start = data.len().saturating_sub(max);
    String::from_utf8_lossy(&data[start..]).into_owned()
}

/// A field (in KiB) of /proc/<pid>/status or /proc/<pid>/smaps_rollup.
fn proc_kib(pid: u32, file: &str, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    proc_kib(pid, "status", "VmRSS").map(|k| k * 1024)
}

/// Peak resident set size of a process (VmHWM), in bytes.
pub fn hwm_bytes(pid: u32) -> Option<u64> {
    proc_kib(pid, "status", "VmHWM").map(|k| k * 1024)
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> Option<usize> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// A process's descriptor count once it stops changing (two readings
/// 300 ms apart agree). A proxy's workers create their rings, eventfds and
/// pipes after its `listening on` line, so a baseline is taken with this,
/// never right after start.
pub fn settled_fd_count(pid: u32) -> usize {
    let mut last = fd_count(pid).expect("fd count");
    wait_until(
        Duration::from_secs(10),
        "the descriptor count to settle",
        || {
            thread::sleep(Duration::from_millis(300));
            let now = fd_count(pid)?;
            let settled = now == last;
            last = now;
            settled.then_some(now)
        },
    )
}

/// Waits (bounded) until `pid` holds at most `most` descriptors and returns
/// the count; panics with the last count, the descriptors' targets and
/// `what` after `timeout`. Descriptors of ended sessions are closed a
/// moment after the client sees the close, hence the wait.
pub fn wait_fd_count_at_most(pid: u32, most: usize, timeout: Duration, what: &str) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let now = fd_count(pid).expect("fd count");
        if now <= most {
            return now;
        }
        if Instant::now() >= deadline {
            panic!(
                "{}{what}: {now} open descriptors, more than {most} after {timeout:?}: {}",
                ctx(),
                fd_targets(pid).join(", ")
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Descriptors of `pid` as (not pipes, pipe ends): pooled splice pipes
/// come and go with the pool, so leak checks bound them apart.
pub fn fd_counts_by_kind(pid: u32) -> (usize, usize) {
    let t = fd_targets(pid);
    let pipes = t.iter().filter(|t| t.starts_with("pipe:")).count();
    (t.len() - pipes, pipes)
}

/// Waits (bounded) until `pid` holds at most `most.0` descriptors that are
/// not pipes and at most `most.1` pipe ends, and returns both counts;
/// panics like [`wait_fd_count_at_most`] after `timeout`.
pub fn wait_fd_counts_at_most(
    pid: u32,
    most: (usize, usize),
    timeout: Duration,
    what: &str,
) -> (usize, usize) {
    let deadline = Instant::now() + timeout;
    loop {
        let (other, pipes) = fd_counts_by_kind(pid);
        if other <= most.0 && pipes <= most.1 {
            return (other, pipes);
        }
        if Instant::now() >= deadline {
            panic!(
                "{}{what}: {other} open descriptors besides pipes (at most {}) and {pipes} pipe ends \
                 (at most {}) after {timeout:?}: {}",
                ctx(),
                most.0,
                most.1,
                fd_targets(pid).join(", ")
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// What each open descriptor of `pid` points to (`socket:[…]`,
/// `pipe:[…]`, `anon_inode:[io_uring]`, a path), for failure messages.
pub fn fd_targets(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| fs::read_link(e.path()).ok())
                .map(|t| t.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat: 11 and 12 here.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Some(ticks as f64 / hz)
}

/// Raises this test process's soft open-file limit to the hard one (tests
/// that hold thousands of sockets); its children inherit it.
pub fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    let target = l.maximum;
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: target,
            maximum: l.maximum,
        },
    );
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Proportional set size of a process, in bytes.
pub fn pss_bytes(pid: u32) -> Option<u64> {
    proc_kib(pid, "smaps_rollup", "Pss").map(|k| k * 1024)
}

// ---------------------------------------------------------------------------
// Xvnc: the real VNC server behind the proxy
// ---------------------------------------------------------------------------

/// How to start an [`Xvnc`].
#[derive(Debug, Clone)]
pub struct XvncOptions {
    pub width: u32,
    pub height: u32,
    /// `Some(pw)`: VncAuth with this password; `None`: security type None.
    pub password: Option<String>,
}

impl Default for XvncOptions {
    fn default() -> Self {
        Self {
            width: 320,
            height: 240,
            password: None,
        }
    }
}

/// A TigerVNC `Xvnc` on 127.0.0.1, with the classic X weave on its root
/// window (`-retro`) so that its screen is never blank. Killed on drop.
pub struct Xvnc {
    child: Option<Child>,
    pub port: u16,
    pub display: u32,
    pub options: XvncOptions,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Xvnc {
    pub fn start() -> Xvnc {
        Self::start_with(XvncOptions::default())
    }

    pub fn with_password(password: &str) -> Xvnc {
        Self::start_with(XvncOptions {
            password: Some(password.to_string()),
            ..XvncOptions::default()
        })
    }

    pub fn start_with(options: XvncOptions) -> Xvnc {
        let xvnc = find_program("Xvnc").unwrap_or_else(|| {
            panic!("Xvnc not found: install Debian package tigervnc-standalone-server (make test does)")
        });
        let dir = tempfile::Builder::new()
            .prefix("consolegate-xvnc-")
            .tempdir()
            .expect("tempdir");
        let password_file = options.password.as_ref().map(|pw| {
            let path = dir.path().join("passwd");
            write_vnc_password_file(pw, &path);
            path
        });
        let log = dir.path().join("Xvnc.log");
        let mut last_error = String::new();
        // The RFB port is picked by binding :0 and releasing it, so another
        // process may take it first; Xvnc then exits ("failed to bind socket")
        // and we try another port.
        for attempt in 1..=8 {
            let port = pick_free_port();
            let mut cmd = Command::new(&xvnc);
            // -displayfd 1: Xvnc picks a free display itself (no clash with
            // parallel tests) and writes its number to stdout when ready.
            cmd.args(["-displayfd", "1", "-nolisten", "tcp"])
                .args(["-rfbport", &port.to_string()])
                .args(["-localhost", "-interface", "127.0.0.1"])
                .args([
                    "-geometry",
                    &format!("{}x{}", options.width, options.height),
                ])
                .args(["-depth", "24", "-retro", "-AlwaysShared"])
                .args(["-BlacklistThreshold", "1000000"]);
            match &password_file {
                Some(p) => {
                    cmd.args(["-SecurityTypes", "VncAuth", "-PasswordFile"])
                        .arg(p);
                }
                None => {
                    cmd.args(["-SecurityTypes", "None"]);
                }
            }
            let log_file = File::create(&log).expect("create Xvnc log");
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(log_file));
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {xvnc:?}: {e}"));
            let stdout = child.stdout.take().unwrap();
            let (tx, rx) = mpsc::channel();
            thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = tx.send(line);
            });
            let display = match rx.recv_timeout(STARTUP_TIMEOUT) {
                Ok(line) => line.trim().parse::<u32>().ok(),
                Err(_) => None,
            };
            let Some(display) = display else {
                stop_child(&mut child, Duration::from_secs(2));
                last_error = format!(
                    "attempt {attempt} (port {port}): Xvnc did not report a display; log:\n{}",
                    tail_of_file(&log, 4000)
                );
                continue;
            };
            // Ready: make sure the port is ours by reading the RFB greeting
            // while our Xvnc is still alive.
            match probe_rfb(port, &mut child) {
                Ok(()) => {
                    return Xvnc {
                        child: Some(child),
                        port,
                        display,
                        options,
                        log,
                        _dir: dir,
                    }
                }
                Err(e) => {
                    stop_child(&mut child, Duration::from_secs(2));
                    last_error = format!(
                        "attempt {attempt} (port {port}): {e}; log:\n{}",
                        tail_of_file(&log, 4000)
                    );
                }
            }
        }
        panic!("could not start Xvnc: {last_error}");
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `127.0.0.1:PORT`, as a proxy TARGET or token file entry.
    pub fn target(&self) -> String {
        self.addr().to_string()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills Xvnc at once (SIGKILL), as a crashed backend.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        tail_of_file(&self.log, 16 * 1024)
    }
}

impl Drop for Xvnc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM first so Xvnc removes its /tmp/.X<n>-lock and socket.
            stop_child(&mut c, Duration::from_secs(3));
        }
        if thread::panicking() {
            eprintln!(
                "---- Xvnc :{} (port {}) log ----\n{}",
                self.display,
                self.port,
                self.log()
            );
        }
    }
}

/// Connects to `port` and reads the 12-byte RFB ProtocolVersion while `child`
/// is alive.
fn probe_rfb(port: u16, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("Xvnc exited with {status}"));
        }
        if let Ok(mut s) = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(1),
        ) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut greeting = [0u8; 12];
            return match s.read_exact(&mut greeting) {
                Ok(()) if greeting.starts_with(b"RFB 003.") => match child.try_wait() {
                    Ok(None) => Ok(()),
                    _ => Err("Xvnc exited right after the probe".into()),
                },
                Ok(()) => Err(format!(
                    "port {port} answered {:?}, not RFB",
                    String::from_utf8_lossy(&greeting)
                )),
                Err(e) => Err(format!("reading the RFB greeting on port {port}: {e}")),
            };
        }
        if Instant::now() >= deadline {
            return Err(format!("port {port} never accepted"));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Writes a file holding a secret (a key, a password, a JWT secret) with
/// mode 0600, as the appliance requires of every secret file it reads
/// (`config::secrets`: others may not read it). Created 0600, so the
/// secret is never readable by others, even for a moment.
pub fn write_private(path: &Path, contents: impl AsRef<[u8]>) {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    // An existing file keeps its mode on open: set it.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod 0600 {}: {e}", path.display()));
    file.write_all(contents.as_ref())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Writes a VNC password file with `vncpasswd -f` (TigerVNC's obfuscated format).
pub fn write_vnc_password_file(password: &str, path: &Path) {
    let vncpasswd = find_program("vncpasswd").unwrap_or_else(|| {
        panic!("vncpasswd not found: install Debian package tigervnc-tools (make test does)")
    });
    let mut child = Command::new(vncpasswd)
        .arg("-f")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vncpasswd");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("vncpasswd");
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "vncpasswd -f failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    write_private(path, out.stdout);
}

// ---------------------------------------------------------------------------
// The proxy under test
// ---------------------------------------------------------------------------

/// Path of the consolegate binary: cargo's build of this package, or
/// `CONSOLEGATE_TEST_BIN` (e.g. a release build) when set.
pub fn consolegate_bin() -> PathBuf {
    match std::env::var_os("CONSOLEGATE_TEST_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_consolegate")),
    }
}

/// A running `consolegate proxy`. Killed on drop; its stderr and stdout are
/// printed when the test is failing.
/// A peer type holding a `process: Spawned` reads as that process (pid,
/// signals, exit, logs) and prints its `diagnostics()` when dropped during a
/// failing test.
macro_rules! spawned_peer {
    ($t:ty) => {
        impl std::ops::Deref for $t {
            type Target = Spawned;
            fn deref(&self) -> &Spawned {
                &self.process
            }
        }

        impl std::ops::DerefMut for $t {
            fn deref_mut(&mut self) -> &mut Spawned {
                &mut self.process
            }
        }

        impl Drop for $t {
            fn drop(&mut self) {
                if thread::panicking() {
                    eprintln!("{}", self.diagnostics());
                }
            }
        }
    };
}

/// A consolegate process a test started (`Proxy`, `Appliance`): its exit
/// status once seen, its stdout (drained for its whole life), its stderr
/// log. Killed and reaped on drop if still running.
pub struct Spawned {
    child: Child,
    exit: Option<ExitStatus>,
    stdout: Arc<Mutex<String>>,
    stderr_path: PathBuf,
}

impl Spawned {
    fn new(child: Child, stdout: Arc<Mutex<String>>, stderr_path: PathBuf) -> Spawned {
        Spawned {
            child,
            exit: None,
            stdout,
            stderr_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sigterm(&self) {
        assert!(
            send_signal(self.pid(), "TERM"),
            "{}kill -TERM failed",
            ctx()
        );
    }

    /// SIGKILL (a crash) and reap.
    pub fn kill9(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            self.exit = self.child.wait().ok();
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = wait_child(&mut self.child, timeout);
        }
        self.exit
    }

    /// `None` while running.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr_tail(64 * 1024)
    }

    fn stderr_tail(&self, max: usize) -> String {
        tail_of_file(&self.stderr_path, max)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub struct Proxy {
    process: Spawned,
    pub addr: SocketAddr,
    pub io: String,
    /// The `listening on ...` line, as printed.
    pub listening_line: String,
    args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// `consolegate proxy --io IO EXTRA... 127.0.0.1:0 [TARGET]`; returns once
    /// it has printed `listening on ADDR`.
    pub fn start(io: &str, extra: &[&str], target: Option<&str>) -> Proxy {
        Self::try_start(io, extra, target).unwrap_or_else(|e| panic!("io={io}: {e}"))
    }

    pub fn try_start(io: &str, extra: &[&str], target: Option<&str>) -> Result<Proxy, String> {
        Self::try_start_launch(io, extra, target, &Launch::default())
    }

    /// [`Proxy::start`] with a launcher prefix (e.g. `prlimit --nofile=64`)
    /// and extra environment (e.g. `FAILPOINTS`).
    pub fn start_launch(io: &str, extra: &[&str], target: Option<&str>, launch: &Launch) -> Proxy {
        Self::try_start_launch(io, extra, target, launch).unwrap_or_else(|e| panic!("io={io}: {e}"))
    }

    pub fn try_start_launch(
        io: &str,
        extra: &[&str],
        target: Option<&str>,
        launch: &Launch,
    ) -> Result<Proxy, String> {
        let mut args: Vec<String> = vec!["proxy".into(), "--io".into(), io.into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("127.0.0.1:0".into());
        if let Some(t) = target {
            args.push(t.into());
        }
        let dir = tempfile::Builder::new()
            .prefix("consolegate-proxy-")
            .tempdir()
            .expect("tempdir");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = File::create(&stderr_path).expect("create stderr log");
        let bin = consolegate_bin();
        let mut cmd = launch.command(&bin);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        for (k, v) in &launch.env {
            cmd.env(k, v);
        }
        // The log goes to a file that failure messages print: no ANSI colours.
        cmd.env("NO_COLOR", "1");
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;

        // stdout is drained for the whole life of the process (so it never
        // blocks on a full pipe) into a buffer, and each line goes to `rx`
        // until the `listening on` line has been seen.
        let (stdout_buf, rx) = drain_stdout_lines(&mut child);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let found = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = parse_listening_line(&line) {
                        break Ok((addr, line));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    break Err(format!("no `listening on` line within {STARTUP_TIMEOUT:?}"))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = wait_child(&mut child, Duration::from_secs(5));
                    break Err(format!(
                        "proxy closed stdout (exit status {status:?}) before `listening on`"
                    ));
                }
            }
        };
        match found {
            Ok((addr, line)) => {
                if let Some(reported) = line.split("io=").nth(1) {
                    let reported: String = reported
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if reported != io && !(io == "uring" && reported == "io_uring") {
                        stop_child(&mut child, Duration::from_secs(2));
                        return Err(format!(
                            "asked for --io {io} but the proxy runs io={reported}: {line:?}\nstderr:\n{}",
                            tail_of_file(&stderr_path, 8000)
                        ));
                    }
                }
                Ok(Proxy {
                    process: Spawned::new(child, stdout_buf, stderr_path),
                    addr,
                    io: io.to_string(),
                    listening_line: line,
                    args,
                    _dir: dir,
                })
            }
            Err(e) => {
                stop_child(&mut child, Duration::from_secs(2));
                Err(format!(
                    "{e}\ncommand: {} {}\nstdout:\n{}\nstderr:\n{}",
                    bin.display(),
                    args.join(" "),
                    stdout_buf.lock().unwrap(),
                    tail_of_file(&stderr_path, 8000)
                ))
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `ws://127.0.0.1:PORT` + `path`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.pid()).expect("read VmRSS of the proxy")
    }

    pub fn pss_bytes(&self) -> u64 {
        pss_bytes(self.pid()).expect("read Pss of the proxy")
    }

    /// Everything useful for a failure message.
    pub fn diagnostics(&self) -> String {
        format!(
            "---- consolegate {} (io={}, {}) ----\nstdout:\n{}\nstderr (tail):\n{}",
            self.args.join(" "),
            self.io,
            self.addr,
            self.stdout(),
            self.stderr_tail(16 * 1024)
        )
    }
}

spawned_peer!(Proxy);

/// `listening on 127.0.0.1:43567 (io=uring, workers=2)` → the address.
pub fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    let rest = line.split("listening on ").nth(1)?;
    rest.split_whitespace()
        .next()?
        .trim_end_matches(',')
        .parse()
        .ok()
}

/// Runs the binary with `args` to completion (bounded by `timeout`, killed
/// past it) and returns (status, stdout, stderr).
pub fn run_cli(args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
    run_cli_with(Command::new(consolegate_bin()), args, timeout)
}

/// Runs `cmd` with `args` to completion, stdout and stderr to files; killed
/// (and the test failed) past `timeout`.
fn run_cli_with(
    mut cmd: Command,
    args: &[&str],
    timeout: Duration,
) -> (ExitStatus, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn consolegate");
    let status = match wait_child(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{}consolegate {} did not exit within {timeout:?}; stderr:\n{}",
                ctx(),
                args.join(" "),
                tail_of_file(&err_path, 8000)
            );
        }
    };
    (
        status,
        fs::read_to_string(&out_path).unwrap_or_default(),
        fs::read_to_string(&err_path).unwrap_or_default(),
    )
}

// ---------------------------------------------------------------------------
// WebSocket clients
// ---------------------------------------------------------------------------

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A stream whose TCP socket the helpers can reach (to set timeouts, shut
/// down, or write raw bytes).
pub trait TcpBacked: Read + Write {
    fn tcp(&self) -> &TcpStream;
}

impl TcpBacked for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl TcpBacked for TlsStream {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
}

/// A WebSocket client session plus a byte buffer, so tests can read the
/// relayed stream as bytes whatever the framing (binary frames, or base64 in
/// text frames).
pub struct WsClient<S: TcpBacked> {
    pub ws: WebSocket<S>,
    /// The subprotocol the server chose (`Sec-WebSocket-Protocol`), if any.
    pub protocol: Option<String>,
    pub response: Response,
    pending: Vec<u8>,
}

impl<S: TcpBacked> std::fmt::Debug for WsClient<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsClient")
            .field("protocol", &self.protocol)
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// What ended a read.
#[derive(Debug)]
pub enum WsEnd {
    Timeout,
    Close(Option<(u16, String)>),
    Error(String),
}

pub type PlainClient = WsClient<TcpStream>;
pub type TlsClient = WsClient<TlsStream>;

/// Opens a TCP connection to `addr` with test timeouts set.
pub fn tcp_connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Builds the upgrade request for `url` offering `protocols` (none: no
/// `Sec-WebSocket-Protocol` header at all, as noVNC does by default).
pub fn ws_request(
    url: &str,
    protocols: &[&str],
    origin: Option<&str>,
) -> tungstenite::handshake::client::Request {
    use tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().expect("valid ws url");
    if !protocols.is_empty() {
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            protocols.join(", ").parse().unwrap(),
        );
    }
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    req
}

/// The error of a failed upgrade, with the HTTP status when the server
/// answered with one.
#[derive(Debug)]
pub struct HandshakeFailure {
    pub status: Option<u16>,
    pub body: String,
    pub message: String,
}

fn handshake_failure<S: Read + Write>(
    e: tungstenite::HandshakeError<tungstenite::ClientHandshake<S>>,
) -> HandshakeFailure {
    match e {
        tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp)) => HandshakeFailure {
            status: Some(resp.status().as_u16()),
            body: resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
            message: format!("HTTP {}", resp.status()),
        },
        tungstenite::HandshakeError::Failure(e) => HandshakeFailure {
            status: None,
            body: String::new(),
            message: e.to_string(),
        },
        tungstenite::HandshakeError::Interrupted(_) => HandshakeFailure {
            status: None,
            body: String::new(),
            message: "handshake timed out (interrupted)".into(),
        },
    }
}

/// WebSocket upgrade over any stream.
pub fn ws_handshake<S: TcpBacked>(
    stream: S,
    url: &str,
    protocols: &[&str],
    origin: Option<&str>,
) -> Result<WsClient<S>, HandshakeFailure> {
    let req = ws_request(url, protocols, origin);
    let (ws, response) = tungstenite::client::client(req, stream).map_err(handshake_failure)?;
    let protocol = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    Ok(WsClient {
        ws,
        protocol,
        response,
        pending: Vec::new(),
    })
}

/// Plain `ws://` session to the proxy, or the reason it failed.
pub fn try_ws_connect(
    addr: SocketAddr,
    path: &str,
    protocols: &[&str],
) -> Result<PlainClient, HandshakeFailure> {
    try_ws_connect_with(addr, path, protocols, None, IO_TIMEOUT)
}

/// Plain `ws://` upgrade with an `Origin` header and a bound on the whole
/// handshake (`timeout` applies to the connect and to each read).
pub fn try_ws_connect_with(
    addr: SocketAddr,
    path: &str,
    protocols: &[&str],
    origin: Option<&str>,
    timeout: Duration,
) -> Result<PlainClient, HandshakeFailure> {
    let url = format!("ws://{addr}{path}");
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| HandshakeFailure {
        status: None,
        body: String::new(),
        message: format!("connect {addr}: {e}"),
    })?;
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream.set_write_timeout(Some(timeout)).unwrap();
    stream.set_nodelay(true).unwrap();
    let c = ws_handshake(stream, &url, protocols, origin)?;
    c.ws.get_ref().set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    Ok(c)
}

/// Plain `ws://` upgrade over a socket whose receive buffer is fixed at
/// `rcvbuf` bytes (no autotuning), so a client that stops reading pushes back
/// on the proxy quickly.
pub fn ws_connect_small_rcvbuf(
    io: &str,
    addr: SocketAddr,
    path: &str,
    rcvbuf: usize,
) -> PlainClient {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(rcvbuf).unwrap();
    sock.connect_timeout(&addr.into(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("io={io}: connect {addr}: {e}"));
    let stream: TcpStream = sock.into();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    ws_handshake(stream, &format!("ws://{addr}{path}"), &[], None)
        .unwrap_or_else(|e| panic!("io={io}: ws upgrade failed: {e:?}"))
}

/// Plain `ws://` session to the proxy; panics (naming `io`) when refused.
pub fn ws_connect(io: &str, addr: SocketAddr, path: &str, protocols: &[&str]) -> PlainClient {
    try_ws_connect(addr, path, protocols).unwrap_or_else(|e| {
        panic!("io={io}: ws upgrade of {path} with protocols {protocols:?} failed: {e:?}")
    })
}

/// TLS client configuration (rustls with ring) that trusts exactly `ca_der`.
pub fn tls_client_config(ca_der: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca_der.to_vec()))
        .expect("add test CA");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(config)
}

/// `wss://` session: TLS (server name `localhost`) then the upgrade.
pub fn try_wss_connect(
    addr: SocketAddr,
    path: &str,
    protocols: &[&str],
    tls: Arc<rustls::ClientConfig>,
) -> Result<TlsClient, HandshakeFailure> {
    let fail = |message: String| HandshakeFailure {
        status: None,
        body: String::new(),
        message,
    };
    let tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .map_err(|e| fail(format!("connect {addr}: {e}")))?;
    tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(tls, name).map_err(|e| fail(format!("tls: {e}")))?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    // Finish the TLS handshake first, so a TLS failure is reported as such.
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| fail(format!("TLS handshake with {addr}: {e}")))?;
    }
    ws_handshake(
        stream,
        &format!("wss://localhost:{}{path}", addr.port()),
        protocols,
        None,
    )
}

impl<S: TcpBacked> WsClient<S> {
    /// Sends relayed bytes the way the negotiated subprotocol wants them.
    pub fn send(&mut self, data: &[u8]) {
        let msg = if self.protocol.as_deref() == Some("base64") {
            Message::Text(
                base64::engine::general_purpose::STANDARD
                    .encode(data)
                    .into(),
            )
        } else {
            Message::Binary(data.to_vec().into())
        };
        if let Err(e) = self.ws.send(msg) {
            panic!("{}ws send: {e}", ctx());
        }
    }

    /// The next message (pings included), or why there is none before
    /// `timeout`.
    pub fn next_message(&mut self, timeout: Duration) -> Result<Message, WsEnd> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WsEnd::Timeout);
            }
            self.ws
                .get_ref()
                .tcp()
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            match self.ws.read() {
                Ok(Message::Close(frame)) => return Err(WsEnd::Close(close_info(frame))),
                Ok(m) => return Ok(m),
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(WsEnd::Error(e.to_string())),
            }
        }
    }

    /// Reads relayed bytes until `n` are buffered (binary frames, or base64
    /// text frames under the `base64` subprotocol) and returns exactly `n`.
    pub fn read_exact(&mut self, n: usize, timeout: Duration) -> Result<Vec<u8>, WsEnd> {
        let deadline = Instant::now() + timeout;
        while self.pending.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_message(left)? {
                Message::Binary(b) => self.pending.extend_from_slice(&b),
                Message::Text(t) => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(t.as_bytes())
                        .map_err(|e| {
                            WsEnd::Error(format!("text frame is not base64: {e}: {:?}", t.as_str()))
                        })?;
                    self.pending.extend_from_slice(&bytes);
                }
                _ => {}
            }
        }
        Ok(self.pending.drain(..n).collect())
    }

    /// Like [`read_exact`](Self::read_exact) but panics with context.
    pub fn expect_bytes(&mut self, n: usize, what: &str) -> Vec<u8> {
        self.read_exact(n, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("{}reading {n} bytes of {what}: {e:?}", ctx()))
    }

    /// Reads until a close frame arrives (skipping data and pings) and returns
    /// its code and reason; panics on timeout or on a connection that ends
    /// without a close frame.
    pub fn expect_close(&mut self, timeout: Duration) -> (Option<u16>, String) {
        let start = Instant::now();
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            match self.next_message(left) {
                Ok(_) => continue,
                Err(WsEnd::Close(Some((code, reason)))) => return (Some(code), reason),
                Err(WsEnd::Close(None)) => return (None, String::new()),
                Err(WsEnd::Timeout) => panic!("{}no close frame within {timeout:?}", ctx()),
                Err(WsEnd::Error(e)) => panic!(
                    "{}connection ended without a close frame after {:?}: {e}",
                    ctx(),
                    start.elapsed()
                ),
            }
        }
    }

    /// Puts bytes back in front of the read buffer (after a test looked at a
    /// message itself).
    pub fn push_back(&mut self, data: &[u8]) {
        let mut v = data.to_vec();
        v.extend_from_slice(&self.pending);
        self.pending = v;
    }

    /// Bytes read from frames but not yet consumed.
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// Sends raw bytes on the socket underneath (for frames tungstenite
    /// would refuse to build).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.ws.get_mut().write_all(bytes).expect("raw write");
        self.ws.get_mut().flush().expect("raw flush");
    }

    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}

fn close_info(frame: Option<CloseFrame>) -> Option<(u16, String)> {
    frame.map(|f| (u16::from(f.code), f.reason.to_string()))
}

/// One client WebSocket frame, built by hand: `mask` None sends it unmasked
/// (a protocol error from a client).
pub fn raw_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            f.extend_from_slice(&m);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

// ---------------------------------------------------------------------------
// Raw HTTP (for error responses)
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    /// Asserts the JSON error body `{"error":{"code":..,"message":..}}`.
    pub fn assert_json_error(&self, context: &str) {
        let b = self.body.trim();
        assert!(
            b.starts_with('{') && b.ends_with('}') && b.contains("\"error\"") && b.contains("\"code\"") && b.contains("\"message\""),
            "{context}: expected a JSON error body {{\"error\":{{\"code\",\"message\"}}}}, got {:?} (head {:?})",
            self.body,
            self.head
        );
        if let Some(ct) = self.header("Content-Type") {
            assert!(
                ct.contains("json"),
                "{context}: Content-Type {ct:?} is not JSON"
            );
        }
    }
}

/// Sends `request` as is on a new connection and reads one HTTP response
/// (head, then Content-Length bytes or until the server closes).
pub fn raw_http(addr: SocketAddr, request: &[u8]) -> HttpResponse {
    let mut s = tcp_connect(addr);
    s.write_all(request).expect("write request");
    read_http_response(&mut s)
        .unwrap_or_else(|e| panic!("{}reading the HTTP response from {addr}: {e}", ctx()))
}

pub fn read_http_response(s: &mut impl Read) -> Result<HttpResponse, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) => {
                return Err(format!(
                    "connection closed after {} bytes: {:?}",
                    buf.len(),
                    String::from_utf8_lossy(&buf)
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("{e} after {:?}", String::from_utf8_lossy(&buf))),
        }
        if buf.len() > 64 * 1024 {
            return Err("response head over 64 KiB".into());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let mut resp = HttpResponse {
        status,
        head,
        body: String::new(),
    };
    let mut body = buf[head_end..].to_vec();
    match resp
        .header("Content-Length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(len) => {
            while body.len() < len {
                match s.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err(format!("reading body: {e}")),
                }
            }
            body.truncate(len);
        }
        None => loop {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
                Err(_) => break,
            }
        },
    }
    resp.body = String::from_utf8_lossy(&body).into_owned();
    Ok(resp)
}

/// A well-formed upgrade request; `extra` header lines are appended.
pub fn upgrade_request(path: &str, extra: &[&str]) -> Vec<u8> {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for h in extra {
        r.push_str(h);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

// ---------------------------------------------------------------------------
// RFB (the VNC protocol) as a client, over the relayed byte stream
// ---------------------------------------------------------------------------

pub const RFB_38: &[u8; 12] = b"RFB 003.008\n";

#[derive(Debug)]
pub struct ServerInit {
    pub width: u16,
    pub height: u16,
    pub bits_per_pixel: u8,
    pub name: String,
}

/// ProtocolVersion 3.8, security type None, SecurityResult OK, ClientInit
/// (shared), ServerInit.
pub fn rfb_handshake_none<S: TcpBacked>(c: &mut WsClient<S>) -> ServerInit {
    let greeting = c.expect_bytes(12, "the RFB ProtocolVersion");
    assert_eq!(&greeting, RFB_38, "{}RFB greeting", ctx());
    c.send(RFB_38);
    let n = c.expect_bytes(1, "the number of security types")[0] as usize;
    assert!(
        n > 0,
        "{}server refused the connection (0 security types)",
        ctx()
    );
    let types = c.expect_bytes(n, "the security types");
    assert!(
        types.contains(&1),
        "{}security type None (1) not offered: {types:?}",
        ctx()
    );
    c.send(&[1]);
    let result = c.expect_bytes(4, "the SecurityResult");
    assert_eq!(result, [0, 0, 0, 0], "{}SecurityResult is not OK", ctx());
    c.send(&[1]); // ClientInit: shared
    let init = c.expect_bytes(24, "the ServerInit");
    let name_len = u32::from_be_bytes(init[20..24].try_into().unwrap()) as usize;
    assert!(
        name_len < 4096,
        "{}absurd desktop name length {name_len}",
        ctx()
    );
    let name = c.expect_bytes(name_len, "the desktop name");
    ServerInit {
        width: u16::from_be_bytes([init[0], init[1]]),
        height: u16::from_be_bytes([init[2], init[3]]),
        bits_per_pixel: init[4],
        name: String::from_utf8_lossy(&name).into_owned(),
    }
}

/// Sends a full (non-incremental) FramebufferUpdateRequest and reads the
/// header of the FramebufferUpdate that answers it: (message type, rects,
/// first rect's x, y, w, h, encoding).
pub fn rfb_request_update<S: TcpBacked>(
    c: &mut WsClient<S>,
    width: u16,
    height: u16,
) -> (u8, u16, [u16; 4], i32) {
    // SetEncodings: Raw only, so the reply's size is predictable.
    c.send(&[2, 0, 0, 1, 0, 0, 0, 0]);
    let mut req = vec![3, 0, 0, 0, 0, 0];
    req.extend_from_slice(&width.to_be_bytes());
    req.extend_from_slice(&height.to_be_bytes());
    c.send(&req);
    let head = c.expect_bytes(4, "the FramebufferUpdate header");
    let rects = u16::from_be_bytes([head[2], head[3]]);
    let r = c.expect_bytes(12, "the first rectangle header");
    let rect = [
        u16::from_be_bytes([r[0], r[1]]),
        u16::from_be_bytes([r[2], r[3]]),
        u16::from_be_bytes([r[4], r[5]]),
        u16::from_be_bytes([r[6], r[7]]),
    ];
    let encoding = i32::from_be_bytes(r[8..12].try_into().unwrap());
    (head[0], rects, rect, encoding)
}

/// The whole framebuffer as one full (non-incremental) update, in a pixel
/// format set here (32 bits, little-endian, RGB in bits 16/8/0) with Raw
/// encoding only, every rectangle painted in place: what the server sent,
/// to compare pixel by pixel with what it should show.
pub fn rfb_framebuffer<S: TcpBacked>(
    c: &mut WsClient<S>,
    width: u16,
    height: u16,
) -> image::RgbaImage {
    let mut set_format = vec![0u8, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0];
    set_format.extend_from_slice(&[0, 0, 0]);
    c.send(&set_format);
    c.send(&[2, 0, 0, 1, 0, 0, 0, 0]); // SetEncodings: Raw
    let mut req = vec![3, 0, 0, 0, 0, 0];
    req.extend_from_slice(&width.to_be_bytes());
    req.extend_from_slice(&height.to_be_bytes());
    c.send(&req);
    let head = c.expect_bytes(4, "the FramebufferUpdate header");
    assert_eq!(
        head[0],
        0,
        "{}expected a FramebufferUpdate, got message {}",
        ctx(),
        head[0]
    );
    let mut img = image::RgbaImage::new(width.into(), height.into());
    for i in 0..u16::from_be_bytes([head[2], head[3]]) {
        let r = c.expect_bytes(12, "a rectangle header");
        let n = |at: usize| u16::from_be_bytes([r[at], r[at + 1]]) as u32;
        let (x, y, w, h) = (n(0), n(2), n(4), n(6));
        let encoding = i32::from_be_bytes(r[8..12].try_into().unwrap());
        assert_eq!(
            encoding,
            0,
            "{}rectangle {i} not Raw (asked for Raw only)",
            ctx()
        );
        assert!(
            x + w <= width.into() && y + h <= height.into(),
            "{}rectangle {i} ({x},{y} {w}x{h}) outside the {width}x{height} screen",
            ctx()
        );
        let px = c.expect_bytes((w * h * 4) as usize, "a rectangle's pixels");
        for (k, p) in px.chunks_exact(4).enumerate() {
            let (dx, dy) = (k as u32 % w, k as u32 / w);
            // Little-endian 0x00RRGGBB: B, G, R, padding.
            img.put_pixel(x + dx, y + dy, image::Rgba([p[2], p[1], p[0], 255]));
        }
    }
    img
}

// ---------------------------------------------------------------------------
// TLS material
// ---------------------------------------------------------------------------

/// A self-signed certificate for `localhost` / 127.0.0.1, written as PEM
/// files for `--cert` / `--key`.
pub struct TestCert {
    pub cert_der: Vec<u8>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCert {
    pub fn generate() -> TestCert {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .expect("rcgen self-signed certificate");
        let dir = tempfile::Builder::new()
            .prefix("consolegate-tls-")
            .tempdir()
            .unwrap();
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        fs::write(&cert_path, ck.cert.pem()).unwrap();
        write_private(&key_path, ck.signing_key.serialize_pem());
        TestCert {
            cert_der: ck.cert.der().to_vec(),
            cert_path,
            key_path,
            _dir: dir,
        }
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        tls_client_config(&self.cert_der)
    }

    pub fn cert_arg(&self) -> &str {
        self.cert_path.to_str().unwrap()
    }

    pub fn key_arg(&self) -> &str {
        self.key_path.to_str().unwrap()
    }
}

// ---------------------------------------------------------------------------
// Small TCP servers standing in for a backend
// ---------------------------------------------------------------------------

/// Byte `offset` of the test stream: the little-endian u64 counter of 8-byte
/// words, so loss, duplication or reordering anywhere shows.
pub fn pattern_byte(offset: u64) -> u8 {
    (offset / 8).to_le_bytes()[(offset % 8) as usize]
}

pub fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(offset + i as u64);
    }
}

/// Index of the first byte of `data` (found at stream `offset`) that breaks
/// the pattern.
pub fn check_pattern(offset: u64, data: &[u8]) -> Option<usize> {
    data.iter()
        .enumerate()
        .position(|(i, &b)| b != pattern_byte(offset + i as u64))
}

/// A backend that accepts one connection and writes the test pattern as fast
/// as the connection takes it, up to `total` bytes or until `deadline`, then
/// closes. `written()` counts bytes the kernel accepted.
pub struct StreamServer {
    pub addr: SocketAddr,
    written: Arc<AtomicU64>,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl StreamServer {
    /// `sndbuf`: SO_SNDBUF for the accepted socket (small keeps the kernel's
    /// share of the backlog small, so a stall shows sooner).
    pub fn start(total: u64, deadline: Duration, sndbuf: Option<usize>) -> StreamServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicBool::new(false));
        let (w, a, st, fin) = (
            written.clone(),
            accepted.clone(),
            stop.clone(),
            finished.clone(),
        );
        let handle = thread::spawn(move || {
            let end = Instant::now() + deadline;
            let mut sock = loop {
                if st.load(Ordering::SeqCst) || Instant::now() >= end {
                    fin.store(true, Ordering::SeqCst);
                    return;
                }
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            };
            a.fetch_add(1, Ordering::SeqCst);
            drop(listener);
            sock.set_nonblocking(false).unwrap();
            if let Some(size) = sndbuf {
                let _ = socket2::SockRef::from(&sock).set_send_buffer_size(size);
            }
            // Short write timeout: the loop re-checks stop/deadline while blocked.
            sock.set_write_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let mut chunk = vec![0u8; 64 * 1024];
            let mut offset = 0u64;
            let mut filled_at = u64::MAX;
            while offset < total && !st.load(Ordering::SeqCst) && Instant::now() < end {
                if filled_at != offset {
                    fill_pattern(offset, &mut chunk);
                    filled_at = offset;
                }
                let n = chunk.len().min((total - offset) as usize);
                match sock.write(&chunk[..n]) {
                    Ok(0) => break,
                    Ok(k) => {
                        offset += k as u64;
                        w.store(offset, Ordering::SeqCst);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            let _ = sock.shutdown(Shutdown::Both);
            fin.store(true, Ordering::SeqCst);
        });
        StreamServer {
            addr,
            written,
            accepted,
            stop,
            finished,
            handle: Some(handle),
        }
    }

    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// True once the writer has closed its socket (done, stopped or failed).
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// Closes the backend socket now (as a backend that goes away).
    pub fn close_now(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        self.close_now();
    }
}

/// A backend that echoes every byte on every connection, optionally after
/// sending a greeting, and counts accepted connections.
pub struct EchoServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start() -> EchoServer {
        Self::with_greeting(b"")
    }

    pub fn with_greeting(greeting: &[u8]) -> EchoServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, st) = (accepted.clone(), stop.clone());
        let greeting = greeting.to_vec();
        let handle = thread::spawn(move || {
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        let st = st.clone();
                        let greeting = greeting.clone();
                        conns.push(thread::spawn(move || {
                            s.set_nonblocking(false).unwrap();
                            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                            if !greeting.is_empty() && s.write_all(&greeting).is_err() {
                                return;
                            }
                            let mut buf = [0u8; 16 * 1024];
                            while !st.load(Ordering::SeqCst) {
                                match s.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(n) => {
                                        if s.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => break,
                                }
                            }
                        }));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        EchoServer {
            addr,
            accepted,
            stop,
            handle: Some(handle),
        }
    }

    pub fn target(&self) -> String {
        self.addr.to_string()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Small HTTP/1.1 client (the control API)
// ---------------------------------------------------------------------------

/// Bound on one control-API request (connect, write, each read).
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP/1.1 request on a new connection (`Connection: close`), with a
/// bearer token and a JSON body when given; the response with a chunked body
/// decoded. `Err` only when no HTTP response came back.
pub fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<HttpResponse, String> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    http_raw(addr, req.as_bytes())
}

/// Sends `request` as is on a new connection and reads one response (a
/// chunked body is decoded). `Err` only when no HTTP response came back.
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> Result<HttpResponse, String> {
    let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(HTTP_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(HTTP_TIMEOUT)).unwrap();
    s.write_all(request)
        .map_err(|e| format!("write request to {addr}: {e}"))?;
    let mut resp = read_http_response(&mut s)?;
    let chunked = resp
        .header("Transfer-Encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        resp.body = dechunk(&resp.body)
            .ok_or_else(|| format!("bad chunked body from {addr}: {:?}", resp.body))?;
    }
    Ok(resp)
}

/// Decodes a complete chunked body (extensions and trailers ignored).
fn dechunk(raw: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = raw;
    loop {
        let (line, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size..)?.strip_prefix("\r\n")?;
    }
}

impl HttpResponse {
    /// The body as JSON; panics with the response when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "{}response body is not JSON ({e}): {:?} (head {:?})",
                ctx(),
                self.body,
                self.head
            )
        })
    }

    /// Asserts `status` and the control API's error body
    /// `{"error":{"code":CODE,"message":"..."}}` with a JSON Content-Type.
    pub fn assert_api_error(&self, status: u16, code: &str, context: &str) {
        assert_eq!(
            self.status,
            status,
            "{}{context}: expected HTTP {status} {code}, got {} {:?}",
            ctx(),
            self.status,
            self.body
        );
        self.assert_error_shape(context);
        let v = self.json();
        assert_eq!(
            v["error"]["code"].as_str(),
            Some(code),
            "{}{context}: error code in {:?}",
            ctx(),
            self.body
        );
    }

    /// Asserts the JSON error shape: exactly `{"error":{"code":string,
    /// "message":string}}` (both non-empty) with a JSON Content-Type.
    pub fn assert_error_shape(&self, context: &str) {
        let v: serde_json::Value = serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "{}{context}: error body is not JSON ({e}): {:?} (HTTP {}, head {:?})",
                ctx(),
                self.body,
                self.status,
                self.head
            )
        });
        let ok = v.as_object().is_some_and(|o| o.len() == 1)
            && v["error"].as_object().is_some_and(|e| {
                e.get("code")
                    .and_then(|c| c.as_str())
                    .is_some_and(|c| !c.is_empty())
                    && e.get("message")
                        .and_then(|m| m.as_str())
                        .is_some_and(|m| !m.is_empty())
            });
        assert!(
            ok,
            "{}{context}: expected {{\"error\":{{\"code\",\"message\"}}}}, got HTTP {} {:?}",
            ctx(),
            self.status,
            self.body
        );
        let ct = self.header("Content-Type").unwrap_or_default();
        assert!(
            ct.contains("json"),
            "{}{context}: error Content-Type {ct:?} is not JSON (HTTP {} {:?})",
            ctx(),
            self.status,
            self.body
        );
    }
}

// ---------------------------------------------------------------------------
// The appliance under test (`consolegate run --config FILE`)
// ---------------------------------------------------------------------------

/// Admin bearer token written into every test appliance config.
pub const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789abcdef";
/// Read-only bearer token written into every test appliance config.
pub const READ_TOKEN: &str = "e2e-read-token-0123456789abcdef";

/// Ports handed out as dedicated-port ranges are taken from here: below the
/// kernel's ephemeral range (32768-60999 on Linux), so no outgoing
/// connection (ours or another test's) sits on one of them by chance.
const PORT_RANGES_FIRST: u16 = 20_000;
const PORT_RANGES_END: u16 = 32_700;
/// Next candidate start; seeded from the pid on first use so two test
/// processes running at once tend to start apart.
static NEXT_RANGE_START: AtomicUsize = AtomicUsize::new(0);

/// `len` consecutive ports on 127.0.0.1 that could all be bound a moment
/// ago, distinct from every range this process handed out before. Racy by
/// nature (another process may bind one later); the appliance skips such a
/// port, and tests leave slack where that matters.
pub fn reserve_port_range(len: u16) -> (u16, u16) {
    assert!(len > 0 && len < 2000, "port range length {len}");
    let span = (PORT_RANGES_END - PORT_RANGES_FIRST) as usize;
    let _ = NEXT_RANGE_START.compare_exchange(
        0,
        1 + (std::process::id() as usize * 7919) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..200 {
        let off = NEXT_RANGE_START.fetch_add(len as usize + 1, Ordering::SeqCst) % span;
        let first = PORT_RANGES_FIRST as usize + off;
        if first + len as usize > PORT_RANGES_END as usize {
            continue;
        }
        let first = first as u16;
        let last = first + len - 1;
        let all_free = (first..=last).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok());
        if all_free {
            return (first, last);
        }
    }
    panic!(
        "{}no range of {len} bindable ports found in {PORT_RANGES_FIRST}-{PORT_RANGES_END}",
        ctx()
    );
}

/// How to configure a test appliance. Each `*_toml` string is a list of
/// `key = value` lines added to that section.
#[derive(Debug, Clone, Default)]
pub struct ApplianceOptions {
    /// Dedicated-port range; `None`: a fresh 16-port range.
    pub port_range: Option<(u16, u16)>,
    /// State directory; `None`: `<appliance temp dir>/state`. Set it to
    /// share the state between a stopped appliance and its successor.
    pub state_dir: Option<PathBuf>,
    /// `console.web_dir` (e.g. /usr/share/novnc).
    pub web_dir: Option<PathBuf>,
    /// `demo.password`.
    pub demo_password: Option<String>,
    pub ports_toml: String,
    pub sessions_toml: String,
    pub demo_toml: String,
    pub limits_toml: String,
    /// Extra `[dataplane]` keys (e.g. `workers = 2`).
    pub dataplane_toml: String,
    /// `[tls]` on the console port: certificate and key files, plus extra
    /// `[tls]` keys.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub tls_toml: String,
    /// Extra `[control]` keys.
    pub control_toml: String,
    /// How the process is launched (limits, FAILPOINTS).
    pub launch: Launch,
    /// TOML appended at the end of the file (whole tables, e.g.
    /// `[[hypervisors]]`, `[cache]`, `[auth.jwt]`, `[viewers]`).
    pub extra_toml: String,
}

/// The TOML of a test appliance: loopback listeners on port 0, one admin and
/// one read token, the IO backend forced, a short drain grace, a small
/// demo screen, and `opts`.
pub fn appliance_config_text(
    io: &str,
    range: (u16, u16),
    state_dir: &Path,
    opts: &ApplianceOptions,
) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "[control]\nlisten = \"127.0.0.1:0\"\n{}\n\n",
        opts.control_toml
    ));
    t.push_str("[console]\nlisten = \"127.0.0.1:0\"\n");
    if let Some(w) = &opts.web_dir {
        t.push_str(&format!("web_dir = {:?}\n", w.display().to_string()));
    }
    t.push_str(&format!(
        "\n[ports]\nrange = \"{}-{}\"\nstate_dir = {:?}\n{}\n",
        range.0,
        range.1,
        state_dir.display().to_string(),
        opts.ports_toml
    ));
    t.push_str(&format!(
        "[[auth.tokens]]\ntoken = \"{ADMIN_TOKEN}\"\nrole = \"admin\"\n\n\
         [[auth.tokens]]\ntoken = \"{READ_TOKEN}\"\nrole = \"read\"\n\n"
    ));
    // A short drain grace unless the test sets its own.
    let grace = if opts.limits_toml.contains("drain_grace_ms") {
        ""
    } else {
        "drain_grace_ms = 200\n"
    };
    t.push_str(&format!(
        "[dataplane]\nio = \"{io}\"\n{}\n[dataplane.limits]\n{grace}{}\n",
        opts.dataplane_toml, opts.limits_toml
    ));
    // The test clients send no Origin unless a test asks: sessions are not
    // bound to one unless the test turns binding on itself.
    let binding = if opts.sessions_toml.contains("bind_origin") {
        ""
    } else {
        "bind_origin = false\n"
    };
    t.push_str(&format!("[sessions]\n{binding}{}\n", opts.sessions_toml));
    t.push_str("[demo]\nenabled = true\n");
    // A small default screen keeps demo traffic low; tests may override.
    if !opts.demo_toml.contains("width") {
        t.push_str("width = 320\nheight = 200\n");
    }
    if let Some(pw) = &opts.demo_password {
        t.push_str(&format!("password = {pw:?}\n"));
    }
    t.push_str(&opts.demo_toml);
    if let Some((cert, key)) = &opts.tls {
        t.push_str(&format!(
            "\n\n[tls]\ncert = {:?}\nkey = {:?}\n{}\n",
            cert.display().to_string(),
            key.display().to_string(),
            opts.tls_toml
        ));
    }
    t.push_str("\n\n[log]\nlevel = \"info\"\n");
    t.push_str(&opts.extra_toml);
    t
}

/// A session as `POST /api/v1/sessions` returned it.
#[derive(Debug, Clone)]
pub struct CreatedSession {
    pub id: String,
    pub ws_url: String,
    pub token: String,
    pub port: Option<u16>,
    /// `host:port` of `ws_url`.
    pub addr: SocketAddr,
    /// Path and query of `ws_url` (`/proxy/{id}?token=...`).
    pub path: String,
    pub json: serde_json::Value,
}

impl CreatedSession {
    pub fn from_json(v: &serde_json::Value) -> CreatedSession {
        let s = |k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("{}create response without string {k:?}: {v}", ctx()))
                .to_string()
        };
        let ws_url = s("ws_url");
        let rest = ws_url
            .strip_prefix("ws://")
            .or_else(|| ws_url.strip_prefix("wss://"))
            .unwrap_or_else(|| panic!("{}ws_url {ws_url:?} is not ws:// or wss://", ctx()));
        let (hostport, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let addr: SocketAddr = hostport
            .parse()
            .unwrap_or_else(|e| panic!("{}ws_url {ws_url:?}: host:port {hostport:?}: {e}", ctx()));
        CreatedSession {
            id: s("session_id"),
            token: s("token"),
            port: v["port"].as_u64().map(|p| p as u16),
            addr,
            path: path.to_string(),
            ws_url,
            json: v.clone(),
        }
    }

    /// The path with another token (to try a wrong ticket).
    pub fn path_with_token(&self, token: &str) -> String {
        format!("/proxy/{}?token={token}", self.id)
    }
}

/// How to launch a consolegate process beyond its arguments: a prefix that
/// execs it (so the PID stays the process's own, e.g. `prlimit
/// --nofile=64:64`) and extra environment (e.g. `FAILPOINTS`).
#[derive(Debug, Clone, Default)]
pub struct Launch {
    pub prefix: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Launch {
    /// With the open-files limit (soft and hard) at `n`.
    pub fn nofile(n: u64) -> Launch {
        Launch {
            prefix: vec!["prlimit".into(), format!("--nofile={n}:{n}"), "--".into()],
            env: Vec::new(),
        }
    }

    /// With `FAILPOINTS` set (the `failpoints` test build).
    pub fn failpoints(spec: &str) -> Launch {
        Launch {
            prefix: Vec::new(),
            env: vec![("FAILPOINTS".into(), spec.into())],
        }
    }

    fn command(&self, bin: &Path) -> Command {
        match self.prefix.split_first() {
            None => Command::new(bin),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
        }
    }
}

/// A running `consolegate run --config FILE`. Killed (SIGKILL) on drop
/// unless it has exited; its output is printed when the test is failing.
pub struct Appliance {
    process: Spawned,
    pub io: String,
    /// The control API (`control listening on ...`).
    pub control: SocketAddr,
    /// The console port (`listening on ... (io=...)`).
    pub console: SocketAddr,
    /// `console public url ...`.
    pub public_url: String,
    pub port_range: (u16, u16),
    pub state_dir: PathBuf,
    pub config_path: PathBuf,
    dir: tempfile::TempDir,
}

/// The child's environment without `CONSOLEGATE_*` variables: the appliance
/// refuses unknown ones, and the test harness's own (`CONSOLEGATE_TEST_BIN`)
/// must not leak into it.
pub fn scrub_consolegate_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CONSOLEGATE_") {
            cmd.env_remove(&k);
        }
    }
}

impl Appliance {
    pub fn start(io: &str, opts: ApplianceOptions) -> Appliance {
        Self::try_start(io, opts).unwrap_or_else(|e| panic!("io={io}: {e}"))
    }

    pub fn try_start(io: &str, opts: ApplianceOptions) -> Result<Appliance, String> {
        let dir = tempfile::Builder::new()
            .prefix("consolegate-appliance-")
            .tempdir()
            .expect("tempdir");
        let range = opts.port_range.unwrap_or_else(|| reserve_port_range(16));
        let state_dir = opts
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("state"));
        let config_path = dir.path().join("consolegate.toml");
        fs::write(
            &config_path,
            appliance_config_text(io, range, &state_dir, &opts),
        )
        .expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = File::create(&stderr_path).expect("create stderr log");
        let bin = consolegate_bin();
        let mut cmd = opts.launch.command(&bin);
        for (k, v) in &opts.launch.env {
            cmd.env(k, v);
        }
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        scrub_consolegate_env(&mut cmd);
        cmd.env("NO_COLOR", "1");
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;

        let (stdout_buf, rx) = drain_stdout_lines(&mut child);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let (mut control, mut console, mut public_url) = (None, None, None);
        let mut reported_io = None;
        let found = loop {
            if control.is_some() && console.is_some() && public_url.is_some() {
                break Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("control listening on ") {
                        control = rest.split_whitespace().next().and_then(|a| a.parse().ok());
                    } else if let Some(rest) = line.strip_prefix("console public url ") {
                        public_url = Some(rest.trim().to_string());
                    } else if let Some(addr) = parse_listening_line(&line) {
                        console = Some(addr);
                        reported_io = line.split("io=").nth(1).map(|r| {
                            r.chars()
                                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                                .collect::<String>()
                        });
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    break Err(format!(
                        "the three start-up lines not all printed within {STARTUP_TIMEOUT:?}"
                    ))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = wait_child(&mut child, Duration::from_secs(5));
                    break Err(format!(
                        "appliance closed stdout (exit status {status:?}) before its start-up lines"
                    ));
                }
            }
        };
        let fail = |child: &mut Child, e: String| {
            stop_child(child, Duration::from_secs(2));
            Err(format!(
                "{e}\ncommand: {} run --config {}\nconfig:\n{}\nstdout:\n{}\nstderr:\n{}",
                bin.display(),
                config_path.display(),
                fs::read_to_string(&config_path).unwrap_or_default(),
                stdout_buf.lock().unwrap(),
                tail_of_file(&stderr_path, 8000)
            ))
        };
        if let Err(e) = found {
            return fail(&mut child, e);
        }
        if let Some(r) = &reported_io {
            if r != io && !(io == "uring" && r == "io_uring") {
                return fail(
                    &mut child,
                    format!("asked for io={io} but the appliance runs io={r}"),
                );
            }
        }
        Ok(Appliance {
            process: Spawned::new(child, stdout_buf, stderr_path),
            io: io.to_string(),
            control: control.unwrap(),
            console: console.unwrap(),
            public_url: public_url.unwrap(),
            port_range: range,
            state_dir,
            config_path,
            dir,
        })
    }

    /// The appliance's temp directory (config, logs, default state dir).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn diagnostics(&self) -> String {
        format!(
            "---- consolegate run (io={}, control {}, console {}, ports {}-{}) ----\nconfig:\n{}\nstdout:\n{}\nstderr (tail):\n{}",
            self.io,
            self.control,
            self.console,
            self.port_range.0,
            self.port_range.1,
            fs::read_to_string(&self.config_path).unwrap_or_default(),
            self.stdout(),
            self.stderr_tail(16 * 1024)
        )
    }

    /// One control-API request; panics when no HTTP response comes back.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> HttpResponse {
        http_call(self.control, method, path, token, body)
            .unwrap_or_else(|e| panic!("io={}: {method} {path}: {e}", self.io))
    }

    /// `GET path` with the read token.
    pub fn get(&self, path: &str) -> HttpResponse {
        self.api("GET", path, Some(READ_TOKEN), None)
    }

    /// `consolegate_errors_total{cause=…}` for `cause`, summed over the
    /// workers and the control plane.
    pub fn errors_counted(&self, cause: &str) -> u64 {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "io={}: GET /metrics: {r:?}", self.io);
        let label = format!("cause=\"{cause}\"");
        r.body
            .lines()
            .filter(|l| l.starts_with("consolegate_errors_total{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    /// Polls `/metrics` (workers publish their counters once a second)
    /// until `cause` was counted at least `n` times, for up to `timeout`;
    /// returns the count.
    pub fn wait_errors_counted(&self, cause: &str, n: u64, timeout: Duration) -> u64 {
        wait_until(timeout, &format!("{n} × {cause} in /metrics"), || {
            let c = self.errors_counted(cause);
            (c >= n).then_some(c)
        })
    }

    /// `GET path` with the read token, asserting 200 and a JSON body.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let r = self.get(path);
        assert_eq!(r.status, 200, "io={}: GET {path}: {r:?}", self.io);
        r.json()
    }

    /// `POST /api/v1/sessions` with the admin token.
    pub fn try_create(&self, body: &serde_json::Value) -> HttpResponse {
        self.api(
            "POST",
            "/api/v1/sessions",
            Some(ADMIN_TOKEN),
            Some(&body.to_string()),
        )
    }

    /// `POST /api/v1/sessions`, asserting 201.
    pub fn create(&self, body: &serde_json::Value) -> CreatedSession {
        let r = self.try_create(body);
        assert_eq!(
            r.status, 201,
            "io={}: POST /api/v1/sessions {body}: {r:?}",
            self.io
        );
        CreatedSession::from_json(&r.json())
    }

    /// A shared-port session on the demo console for `user`.
    pub fn create_demo(&self, user: &str) -> CreatedSession {
        self.create(&serde_json::json!({"target": {"kind": "demo"}, "user": user}))
    }

    /// `GET /api/v1/sessions/{id}`, asserting 200.
    pub fn session(&self, id: &str) -> serde_json::Value {
        self.get_json(&format!("/api/v1/sessions/{id}"))
    }

    /// Polls `GET /api/v1/sessions/{id}` until `pred` holds; panics with the
    /// last record after `timeout`.
    pub fn wait_session(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.session(id);
            if pred(&v) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "io={}: session {id}: timed out after {timeout:?} waiting for {what}; last: {v}",
                    self.io
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the session's `state` is `state`.
    pub fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> serde_json::Value {
        self.wait_session(id, &format!("state {state:?}"), timeout, |v| {
            v["state"] == state
        })
    }

    /// `DELETE /api/v1/sessions/{id}` with the admin token.
    pub fn delete(&self, id: &str) -> HttpResponse {
        self.api(
            "DELETE",
            &format!("/api/v1/sessions/{id}"),
            Some(ADMIN_TOKEN),
            None,
        )
    }

    /// `GET /api/v1/ports`.
    pub fn ports(&self) -> serde_json::Value {
        self.get_json("/api/v1/ports")
    }

    /// Polls `GET /api/v1/ports` until `allocated_ports == n`.
    pub fn wait_allocated(&self, n: u64, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.ports();
            if v["allocated_ports"].as_u64() == Some(n) {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "io={}: allocated_ports never reached {n} within {timeout:?}; last: {v}",
                    self.io
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `consolegate ARGS... --config <this config>`-style CLI commands
    /// (`args` must place `{config}` where the path goes) with the scrubbed
    /// environment.
    pub fn cli(&self, args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
        let cfg = self.config_path.display().to_string();
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                if *a == "{config}" {
                    cfg.clone()
                } else {
                    a.to_string()
                }
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli_env(&args, &[], timeout)
    }
}

spawned_peer!(Appliance);

/// Like [`run_cli`], with a scrubbed environment (no `CONSOLEGATE_*` of
/// ours) plus `env`.
pub fn run_cli_env(
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(consolegate_bin());
    scrub_consolegate_env(&mut cmd);
    cmd.env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_cli_with(cmd, args, timeout)
}
