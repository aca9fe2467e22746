//! Peers of the hypervisor end-to-end tests (tests/e2e_qemu.rs): a real
//! `qemu-system-x86_64` with two QMP sockets (one for the backend under
//! test, one for the test itself), a blocking QMP client for the test's
//! socket, a blocking RFB client that logs in like a viewer, and a TigerVNC
//! `Xvnc` started *without* `-AlwaysShared` (so the ClientInit shared flag
//! decides whether other viewers stay connected).
//!
//! Same rules as the rest of `common`: loopback only, sockets in the test's
//! temp dir, bounded polls, processes killed by PID, a missing program is
//! a failure naming its Debian package.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{find_program, pick_free_port, send_signal, stop_child, tail_of_file, STARTUP_TIMEOUT};

/// How many pixels of `img` are not black (text on SeaBIOS's screen).
pub fn lit_pixels(img: &image::RgbImage) -> usize {
    img.pixels().filter(|p| p.0 != [0, 0, 0]).count()
}

/// How a [`Qemu`]'s VNC display is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuVnc {
    /// `-vnc 127.0.0.1:N,password=on`: logins need the password QMP sets.
    Password,
    /// `-vnc 127.0.0.1:N`: no authentication.
    NoPassword,
    /// No `-vnc` at all.
    Without,
}

/// How to start a [`Qemu`].
#[derive(Debug, Clone)]
pub struct QemuOptions {
    pub vnc: QemuVnc,
    /// `-S`: stopped before the first instruction (QMP status `prelaunch`).
    pub prelaunch: bool,
    /// An rtl8139 NIC on this existing tap interface ([`Tap`]), without
    /// its boot ROM so the diskless guest sends nothing by itself. (QEMU's
    /// rtl8139 takes frames from the tap even while no guest driver
    /// enabled it, dropping them itself; its e1000 and virtio-net leave
    /// them queued in the tap, so the tap's counters would not move.)
    pub tap: Option<String>,
    /// A virtio-balloon device (no guest driver: the diskless guest never
    /// loads one, so it never reports statistics).
    pub balloon: QemuBalloon,
}

/// Whether a [`Qemu`] has a balloon device, and how it is named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuBalloon {
    Without,
    /// `-device virtio-balloon-pci,id=ID` (`/machine/peripheral/ID`).
    Named(String),
    /// `-device virtio-balloon-pci` (`/machine/peripheral-anon/device[N]`).
    Anonymous,
}

impl Default for QemuOptions {
    fn default() -> Self {
        QemuOptions {
            vnc: QemuVnc::Password,
            prelaunch: false,
            tap: None,
            balloon: QemuBalloon::Without,
        }
    }
}

/// A tap interface made for a test (`ip tuntap add mode tap`), quiet
/// (IPv6 off, so the kernel sends nothing by itself) and deleted on drop.
/// Needs root (CAP_NET_ADMIN); fails with a clear message otherwise.
pub struct Tap {
    pub name: String,
}

fn ip_binary() -> PathBuf {
    find_program("ip").unwrap_or_else(|| panic!("ip not found: install Debian package iproute2"))
}

/// Runs `ip ARGS`, panicking with its output when it fails.
fn ip(args: &[&str]) {
    let output = Command::new(ip_binary())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(
        output.status.success(),
        "ip {args:?} failed (tap tests need root / CAP_NET_ADMIN): {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Tap {
    /// `cgtap<N>`: N from the process id and `index`, so parallel test
    /// runs do not collide.
    pub fn create(index: u32) -> Tap {
        let name = format!("cgtap{}{index}", std::process::id() % 100_000);
        let _ = Command::new(ip_binary())
            .args(["link", "delete", &name])
            .output();
        ip(&["tuntap", "add", "mode", "tap", "name", &name]);
        let tap = Tap { name };
        let ipv6_off = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name);
        if Path::new(&ipv6_off).exists() {
            fs::write(&ipv6_off, "1").unwrap_or_else(|e| panic!("{ipv6_off}: {e}"));
        }
        tap
    }

    /// Brings the link up with `address` (CIDR) on the host's side.
    pub fn up_with(&self, address: &str) {
        ip(&["addr", "add", address, "dev", &self.name]);
        ip(&["link", "set", &self.name, "up"]);
    }

    /// One of the host's counters of the tap (`rx_bytes`, `tx_bytes`).
    pub fn counter(&self, which: &str) -> u64 {
        let path = format!("/sys/class/net/{}/statistics/{which}", self.name);
        fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("{path} unreadable"))
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new(ip_binary())
            .args(["link", "delete", &self.name])
            .output();
    }
}

/// A daemonized QEMU (TCG, no disk: SeaBIOS's 720×400 text screen).
/// Killed by PID on drop; [`Qemu::kill`] and [`Qemu::restart`] reuse the
/// same socket paths, as a restarted VM would.
pub struct Qemu {
    /// The backend's QMP socket.
    pub backend_qmp: PathBuf,
    /// The test's own QMP socket (a QMP socket serves one client at a time).
    pub test_qmp: PathBuf,
    /// The VNC display's TCP port on 127.0.0.1 (from `query-vnc`; 0
    /// without a display).
    pub vnc_port: u16,
    pub options: QemuOptions,
    dir: PathBuf,
    pid: Option<u32>,
    log: PathBuf,
}

/// The QEMU binary, or a failure naming the package.
pub fn qemu_binary() -> PathBuf {
    find_program("qemu-system-x86_64").unwrap_or_else(|| {
        panic!(
            "qemu-system-x86_64 not found: install Debian package qemu-system-x86 (make test does)"
        )
    })
}

impl Qemu {
    /// Starts QEMU with its sockets, pidfile and log in `dir`.
    pub fn start(dir: &Path, options: QemuOptions) -> Qemu {
        let mut qemu = Qemu {
            backend_qmp: dir.join("backend.qmp"),
            test_qmp: dir.join("test.qmp"),
            vnc_port: 0,
            options,
            dir: dir.to_path_buf(),
            pid: None,
            log: dir.join("qemu.log"),
        };
        qemu.launch();
        qemu
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn launch(&mut self) {
        assert!(self.pid.is_none(), "QEMU {:?} is running already", self.pid);
        let binary = qemu_binary();
        let pidfile = self.dir.join("qemu.pid");
        let _ = fs::remove_file(&pidfile);
        // Display N is port 5900 + N. Start from a port that was free a
        // moment ago; `to=` lets QEMU move on by itself if it was taken.
        let display = u32::from(pick_free_port().max(5901)) - 5900;
        let last = (display + 50).min(65535 - 5900);
        let vnc = match self.options.vnc {
            QemuVnc::Password => Some(format!("127.0.0.1:{display},to={last},password=on")),
            QemuVnc::NoPassword => Some(format!("127.0.0.1:{display},to={last}")),
            QemuVnc::Without => None,
        };
        let mut command = Command::new(&binary);
        command
            .args(["-machine", "pc,accel=tcg", "-nodefaults", "-vga", "std"])
            .args(["-display", "none"]);
        if let Some(vnc) = &vnc {
            command.args(["-vnc", vnc]);
        }
        command
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                self.backend_qmp.display()
            ))
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                self.test_qmp.display()
            ))
            .arg("-daemonize")
            .arg("-pidfile")
            .arg(&pidfile);
        if self.options.prelaunch {
            command.arg("-S");
        }
        if let Some(tap) = &self.options.tap {
            command
                .arg("-netdev")
                .arg(format!("tap,id=net0,ifname={tap},script=no,downscript=no"))
                .args(["-device", "rtl8139,netdev=net0,romfile="]);
        }
        match &self.options.balloon {
            QemuBalloon::Without => {}
            QemuBalloon::Named(id) => {
                command.args(["-device", &format!("virtio-balloon-pci,id={id}")]);
            }
            QemuBalloon::Anonymous => {
                command.args(["-device", "virtio-balloon-pci"]);
            }
        }
        let log = File::create(&self.log).expect("create QEMU log");
        // -daemonize: the command returns once the VM is set up (sockets
        // listening); its exit status says whether that worked.
        let status = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .status()
            .unwrap_or_else(|e| panic!("spawn {binary:?}: {e}"));
        assert!(
            status.success(),
            "QEMU failed to start ({status}); log:\n{}",
            tail_of_file(&self.log, 4000)
        );
        // QEMU removes its pidfile when it exits, so read it now.
        let pid = fs::read_to_string(&pidfile)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
            .unwrap_or_else(|| panic!("QEMU wrote no pidfile {pidfile:?}"));
        self.pid = Some(pid);
        let vnc = self
            .qmp()
            .execute("query-vnc", json!({}))
            .expect("query-vnc");
        if self.options.vnc == QemuVnc::Without {
            return;
        }
        self.vnc_port = vnc["service"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("query-vnc without a port: {vnc}"));
    }

    /// The guest screen's size and how many of its pixels are not black,
    /// from a `screendump` over the test's socket.
    pub fn screen(&self) -> Option<(u32, u32, usize)> {
        let path = self.dir.join("test-screen.png");
        let arguments = json!({"filename": path, "format": "png"});
        self.qmp().execute("screendump", arguments).ok()?;
        let png = fs::read(&path).ok();
        let _ = fs::remove_file(&path);
        let img = image::load_from_memory_with_format(&png?, image::ImageFormat::Png)
            .ok()?
            .to_rgb8();
        Some((img.width(), img.height(), lit_pixels(&img)))
    }

    /// Waits until SeaBIOS shows its 720×400 text screen with its text on
    /// it. QEMU starts on a 640×480 screen, for a few hundred milliseconds
    /// of TCG; then the text screen is blank but for the cursor (18 pixels)
    /// until SeaBIOS writes its banner and "No bootable device" (about
    /// 4 570 pixels, the blinking cursor aside): a test that took the
    /// screen in between saw no text.
    pub fn wait_for_text_screen(&self) {
        const TEXT_PIXELS: usize = 1_000;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let screen = self.screen();
            if let Some((720, 400, lit)) = screen {
                if lit >= TEXT_PIXELS {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the guest screen is still (width, height, lit pixels) {screen:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A new connection to the test's QMP socket.
    pub fn qmp(&self) -> TestQmp {
        TestQmp::connect(&self.test_qmp)
    }

    pub fn vnc_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.vnc_port))
    }

    /// SIGKILL, as a crash: no SHUTDOWN event, QMP just closes.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            send_signal(pid, "KILL");
            wait_gone(pid);
        }
    }

    /// Starts QEMU again on the same sockets (after [`Qemu::kill`] or a
    /// `quit`).
    pub fn restart(&mut self) {
        if let Some(pid) = self.pid.take() {
            wait_gone(pid);
        }
        self.launch();
    }

    /// Forgets a QEMU that exited by itself (`quit`), after waiting for it.
    pub fn wait_exit(&mut self) {
        if let Some(pid) = self.pid.take() {
            wait_gone(pid);
        }
    }

    pub fn log(&self) -> String {
        tail_of_file(&self.log, 8 * 1024)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            send_signal(pid, "TERM");
            if !gone_within(pid, Duration::from_secs(3)) {
                send_signal(pid, "KILL");
                wait_gone(pid);
            }
        }
        if thread::panicking() {
            eprintln!("---- QEMU log ----\n{}", self.log());
        }
    }
}

/// Whether process `pid` has exited (or is a zombie nobody reaped yet:
/// the daemon is not our child, so we cannot reap it).
fn is_gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

fn gone_within(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if is_gone(pid) {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    is_gone(pid)
}

fn wait_gone(pid: u32) {
    assert!(gone_within(pid, STARTUP_TIMEOUT), "QEMU {pid} did not exit");
}

/// A blocking QMP client on the test's own socket.
pub struct TestQmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl TestQmp {
    /// Connects (retrying while the socket is not there yet), reads the
    /// greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> TestQmp {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(stream) => break stream,
                Err(e) if Instant::now() >= deadline => panic!("QMP {path:?}: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut qmp = TestQmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            next_id: 1,
        };
        let greeting = qmp.read_message();
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities", json!({}))
            .expect("qmp_capabilities");
        qmp
    }

    fn read_message(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read from QMP");
        assert!(!line.is_empty(), "QMP closed the connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Runs a command; `Err` holds QEMU's error object. Events are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({"execute": command, "arguments": arguments, "id": id});
        writeln!(self.writer, "{message}").expect("write to QMP");
        loop {
            let mut answer = self.read_message();
            if answer.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(value) = answer.get_mut("return") {
                return Ok(value.take());
            }
            return Err(answer["error"].take());
        }
    }
}

// ---------------------------------------------------------------------------
// A viewer: RFB over TCP, blocking
// ---------------------------------------------------------------------------

/// A logged-in RFB client (32-bit true colour, Raw).
pub struct Viewer {
    stream: TcpStream,
    pub width: u16,
    pub height: u16,
}

fn read_exact(stream: &mut TcpStream, n: usize, what: &str) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n];
    stream
        .read_exact(&mut buf)
        .map_err(|e| format!("reading {what}: {e}"))?;
    Ok(buf)
}

fn read_u32(stream: &mut TcpStream, what: &str) -> Result<u32, String> {
    let b = read_exact(stream, 4, what)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_reason(stream: &mut TcpStream) -> String {
    match read_u32(stream, "a reason length") {
        Ok(len) if len < 4096 => read_exact(stream, len as usize, "a reason")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| e),
        Ok(len) => format!("a reason of {len} bytes"),
        Err(e) => e,
    }
}

impl Viewer {
    /// Logs in with RFB 3.8: VNC Authentication with `password`, or None;
    /// `shared` is the ClientInit flag. `Err` holds the server's reason.
    pub fn connect(
        addr: SocketAddr,
        password: Option<&str>,
        shared: bool,
    ) -> Result<Viewer, String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let version = read_exact(&mut stream, 12, "the version")?;
        if !version.starts_with(b"RFB 003.") {
            return Err(format!("not an RFB 3.x server: {version:?}"));
        }
        stream.write_all(b"RFB 003.008\n").unwrap();
        let count = read_exact(&mut stream, 1, "the security type count")?[0];
        if count == 0 {
            return Err(read_reason(&mut stream));
        }
        let types = read_exact(&mut stream, usize::from(count), "the security types")?;
        let wanted = if password.is_some() { 2 } else { 1 };
        if !types.contains(&wanted) {
            return Err(format!("security type {wanted} not offered: {types:?}"));
        }
        stream.write_all(&[wanted]).unwrap();
        if let Some(password) = password {
            let challenge: [u8; 16] = read_exact(&mut stream, 16, "the challenge")?
                .try_into()
                .unwrap();
            let response =
                consolegate::protocol::rfb::vnc_auth_response(password.as_bytes(), &challenge);
            stream.write_all(&response).unwrap();
        }
        if read_u32(&mut stream, "the SecurityResult")? != 0 {
            return Err(read_reason(&mut stream));
        }
        stream.write_all(&[u8::from(shared)]).unwrap();
        let init = read_exact(&mut stream, 24, "the ServerInit")?;
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
        read_exact(&mut stream, name_len as usize, "the desktop name")?;
        // SetPixelFormat: 32 bpp, depth 24, little-endian, true colour.
        let mut setup = vec![
            0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
        ];
        // SetEncodings: Raw only.
        setup.extend_from_slice(&[2, 0, 0, 1, 0, 0, 0, 0]);
        stream.write_all(&setup).unwrap();
        Ok(Viewer {
            stream,
            width: u16::from_be_bytes([init[0], init[1]]),
            height: u16::from_be_bytes([init[2], init[3]]),
        })
    }

    /// Asks for the whole screen and reads the FramebufferUpdate that
    /// answers (skipping other server messages); returns its rectangles.
    pub fn full_update(&mut self) -> Result<u16, String> {
        let mut request = vec![3, 0, 0, 0, 0, 0];
        request.extend_from_slice(&self.width.to_be_bytes());
        request.extend_from_slice(&self.height.to_be_bytes());
        self.stream
            .write_all(&request)
            .map_err(|e| format!("writing an update request: {e}"))?;
        loop {
            match read_exact(&mut self.stream, 1, "a message type")?[0] {
                0 => return self.read_update(),
                2 => {}
                3 => {
                    read_exact(&mut self.stream, 3, "padding")?;
                    let len = read_u32(&mut self.stream, "a cut text length")?;
                    read_exact(&mut self.stream, len as usize, "cut text")?;
                }
                other => return Err(format!("unexpected server message {other}")),
            }
        }
    }

    fn read_update(&mut self) -> Result<u16, String> {
        let head = read_exact(&mut self.stream, 3, "an update header")?;
        let rects = u16::from_be_bytes([head[1], head[2]]);
        for _ in 0..rects {
            let r = read_exact(&mut self.stream, 12, "a rectangle header")?;
            let (w, h) = (
                u16::from_be_bytes([r[4], r[5]]),
                u16::from_be_bytes([r[6], r[7]]),
            );
            let encoding = i32::from_be_bytes([r[8], r[9], r[10], r[11]]);
            if encoding != 0 {
                return Err(format!("rectangle in encoding {encoding}"));
            }
            read_exact(
                &mut self.stream,
                usize::from(w) * usize::from(h) * 4,
                "pixels",
            )?;
        }
        Ok(rects)
    }
}

// ---------------------------------------------------------------------------
// Xvnc without -AlwaysShared
// ---------------------------------------------------------------------------

/// TigerVNC `Xvnc`, 320×240, security None, started *without*
/// `-AlwaysShared` (unlike [`super::Xvnc`]): with its defaults, a client
/// whose ClientInit is not shared disconnects every other viewer. Killed
/// on drop.
pub struct XvncNotShared {
    child: Option<Child>,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl XvncNotShared {
    pub fn start() -> XvncNotShared {
        let xvnc = find_program("Xvnc").unwrap_or_else(|| {
            panic!("Xvnc not found: install Debian package tigervnc-standalone-server (make test does)")
        });
        let dir = tempfile::Builder::new()
            .prefix("consolegate-xvnc-")
            .tempdir()
            .expect("tempdir");
        let log = dir.path().join("Xvnc.log");
        let mut last_error = String::new();
        // The port was free a moment ago; if another process took it, Xvnc
        // exits and we try another.
        for attempt in 1..=8 {
            let port = pick_free_port();
            let mut child = Command::new(&xvnc)
                .args(["-displayfd", "1", "-nolisten", "tcp"])
                .args(["-rfbport", &port.to_string()])
                .args(["-localhost", "-interface", "127.0.0.1"])
                .args(["-geometry", "320x240", "-depth", "24", "-retro"])
                .args(["-SecurityTypes", "None"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(File::create(&log).expect("create Xvnc log")))
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {xvnc:?}: {e}"));
            let stdout = child.stdout.take().unwrap();
            let (sender, receiver) = mpsc::channel();
            thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(stdout).read_line(&mut line);
                let _ = sender.send(line);
            });
            let ready = receiver
                .recv_timeout(STARTUP_TIMEOUT)
                .is_ok_and(|line| !line.trim().is_empty());
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if ready
                && matches!(child.try_wait(), Ok(None))
                && Viewer::connect(addr, None, true).is_ok()
            {
                return XvncNotShared {
                    child: Some(child),
                    port,
                    log,
                    _dir: dir,
                };
            }
            stop_child(&mut child, Duration::from_secs(2));
            last_error = format!(
                "attempt {attempt} (port {port}); log:\n{}",
                tail_of_file(&log, 4000)
            );
        }
        panic!("could not start Xvnc: {last_error}");
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for XvncNotShared {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(3));
        }
        if thread::panicking() {
            eprintln!("---- Xvnc log ----\n{}", tail_of_file(&self.log, 8 * 1024));
        }
    }
}
