//! govmomi's vSphere simulator, served by the project's own Go program
//! (`tests/support/vcsim/main.go`: AcquireTicket with a WebMKS endpoint in
//! front of a real VNC server, `/screen`, idle session expiry, debug
//! stats), built offline from Debian's `golang-go` and
//! `golang-github-vmware-govmomi-dev`.
//!
//! The binary is built once per source (and Go version) into
//! `target/tmp/vcsim/`, under a unique temporary name renamed into place,
//! so parallel test binaries never see half a binary. Each [`Vcsim`] runs
//! on ephemeral 127.0.0.1 ports, is stopped by PID on drop, and can be
//! killed and restarted on the same port with the same certificate.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha1::Digest as _;

use super::{
    drain_stdout_lines, find_program, http_call, stop_child, tail_of_file, wait_child,
    STARTUP_TIMEOUT,
};

/// The Go program's source, built by [`binary`].
const SOURCE: &str = include_str!("../support/vcsim/main.go");
const SOURCE_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/vcsim/main.go");
/// Where Debian's govmomi package puts the simulator library.
const GOVMOMI_SIMULATOR: &str = "/usr/share/gocode/src/github.com/vmware/govmomi/simulator";
/// A cold build takes 40–90 s on two cores; this bounds a hung one.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// The only user the simulator accepts.
pub const USERNAME: &str = "user";
pub const PASSWORD: &str = "pass";
/// The VMs of the simulator's default vCenter model.
pub const VMS: [&str; 4] = [
    "DC0_C0_RP0_VM0",
    "DC0_C0_RP0_VM1",
    "DC0_H0_VM0",
    "DC0_H0_VM1",
];

/// The built simulator: once per test binary, cached across them.
pub fn binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(build).clone()
}

fn build() -> PathBuf {
    let go = find_program("go").unwrap_or_else(|| {
        panic!("go not found: install Debian package golang-go (make test does)")
    });
    assert!(
        Path::new(GOVMOMI_SIMULATOR).is_dir(),
        "govmomi's simulator library not found at {GOVMOMI_SIMULATOR}: install Debian package golang-github-vmware-govmomi-dev (make test does)"
    );
    let version = Command::new(&go)
        .arg("version")
        .output()
        .expect("go version");
    let mut hasher = sha1::Sha1::new();
    hasher.update(SOURCE.as_bytes());
    hasher.update(&version.stdout);
    let hash: String = hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vcsim");
    let binary = root.join(format!("vcsim-{hash}"));
    if binary.is_file() {
        return binary;
    }
    fs::create_dir_all(&root).expect("create target/tmp/vcsim");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let unique = format!("vcsim-{hash}.{}.{nanos}.tmp", std::process::id());
    let temporary = root.join(unique);
    let log = root.join(format!("build-{}.log", std::process::id()));
    let started = Instant::now();
    let mut child = Command::new(&go)
        .args(["build", "-o"])
        .arg(&temporary)
        .arg(SOURCE_PATH)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", root.join("gocache"))
        .env("GOFLAGS", "")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("build log"))
        .spawn()
        .expect("spawn go build");
    let status = wait_child(&mut child, BUILD_TIMEOUT).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("go build of the simulator took more than {BUILD_TIMEOUT:?}")
    });
    assert!(
        status.success(),
        "go build of {SOURCE_PATH} failed ({status}):\n{}",
        tail_of_file(&log, 8000)
    );
    eprintln!(
        "vcsim: built {} in {:.1} s",
        binary.display(),
        started.elapsed().as_secs_f64()
    );
    // Atomic: a parallel build of the same source renames an identical file.
    fs::rename(&temporary, &binary).expect("rename the simulator into place");
    let _ = fs::remove_file(&log);
    binary
}

/// How to start a [`Vcsim`].
#[derive(Debug, Clone, Default)]
pub struct VcsimOptions {
    /// The VNC server tickets relay to (none: tickets lead nowhere).
    pub vnc: Option<SocketAddr>,
    /// Expire API sessions idle longer than this (0: never).
    pub session_idle_ms: u64,
    /// VM names powered off at start.
    pub powered_off: Vec<String>,
    /// Tickets name the VM's ESXi host, as vCenter does, instead of
    /// 127.0.0.1.
    pub ticket_host_esxi: bool,
}

/// What the simulator counted (`GET /debug/stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct VcsimStats {
    pub logins: u64,
    pub logouts: u64,
    pub active_sessions: u64,
    pub expired_sessions: u64,
    pub acquire_tickets: u64,
    pub tickets_redeemed: u64,
    pub tickets_refused: u64,
    pub screens: u64,
    pub sdk_requests: u64,
}

/// A running simulator. Stopped (SIGTERM, then SIGKILL) on drop.
pub struct Vcsim {
    child: Option<Child>,
    /// `https://127.0.0.1:P/sdk`
    pub url: String,
    pub port: u16,
    /// SHA-1 (`AA:BB:…`) and SHA-256 of the API endpoint's certificate.
    pub thumbprint: String,
    pub thumbprint_sha256: String,
    pub webmks_port: u16,
    pub webmks_thumbprint: String,
    pub debug: SocketAddr,
    options: VcsimOptions,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Vcsim {
    pub fn start(options: VcsimOptions) -> Vcsim {
        let dir = tempfile::Builder::new()
            .prefix("consolegate-vcsim-")
            .tempdir()
            .expect("tempdir");
        super::write_private(&dir.path().join("password"), format!("{PASSWORD}\n"));
        let mut sim = Vcsim {
            child: None,
            url: String::new(),
            port: 0,
            thumbprint: String::new(),
            thumbprint_sha256: String::new(),
            webmks_port: 0,
            webmks_thumbprint: String::new(),
            debug: SocketAddr::from(([127, 0, 0, 1], 0)),
            log: dir.path().join("vcsim.log"),
            options,
            dir,
        };
        sim.spawn("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("vcsim did not start: {e}"));
        sim
    }

    /// A file holding the simulator's password.
    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join("password")
    }

    fn spawn(&mut self, listen: &str) -> Result<(), String> {
        let certs = self.dir.path().join("certs");
        fs::create_dir_all(&certs).unwrap();
        let vnc = self
            .options
            .vnc
            .map(|a| a.to_string())
            .unwrap_or_else(|| "127.0.0.1:1".to_string());
        let mut command = Command::new(binary());
        command
            .args(["-listen", listen, "-vnc", &vnc])
            .arg("-cert-dir")
            .arg(&certs)
            .args([
                "-session-idle-ms",
                &self.options.session_idle_ms.to_string(),
            ])
            .args(["-powered-off", &self.options.powered_off.join(",")])
            .args([
                "-ticket-host",
                if self.options.ticket_host_esxi {
                    "esxi"
                } else {
                    "address"
                },
            ])
            .args(["-username", USERNAME, "-password", PASSWORD])
            // The simulator's datastore directories go in our tempdir.
            .env("TMPDIR", self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&self.log).unwrap());
        let mut child = command.spawn().map_err(|e| format!("spawn: {e}"))?;
        let (_, lines) = drain_stdout_lines(&mut child);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) if line.starts_with("VCSIM_READY ") => {
                    self.read_ready_line(&line)?;
                    self.child = Some(child);
                    return Ok(());
                }
                Ok(_) => {}
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!(
                            "vcsim exited ({status}) before it was ready:\n{}",
                            tail_of_file(&self.log, 8000)
                        ));
                    }
                }
            }
            if Instant::now() >= deadline {
                stop_child(&mut child, Duration::from_secs(2));
                return Err(format!(
                    "no ready line within {STARTUP_TIMEOUT:?}:\n{}",
                    tail_of_file(&self.log, 8000)
                ));
            }
        }
    }

    fn read_ready_line(&mut self, line: &str) -> Result<(), String> {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                .map(str::to_string)
                .ok_or_else(|| format!("ready line without {name}: {line:?}"))
        };
        self.url = field("url")?;
        self.port = field("port")?.parse().map_err(|e| format!("port: {e}"))?;
        self.thumbprint = field("thumbprint")?;
        self.thumbprint_sha256 = field("thumbprint_sha256")?;
        self.webmks_port = field("webmks_port")?
            .parse()
            .map_err(|e| format!("webmks_port: {e}"))?;
        self.webmks_thumbprint = field("webmks_thumbprint")?;
        let debug = field("debug_url")?;
        self.debug = debug
            .trim_start_matches("http://")
            .parse()
            .map_err(|e| format!("debug_url: {e}"))?;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the simulator at once (SIGKILL), as a crashed host.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the simulator again on the same port with the same
    /// certificates (a restarted host). Retries while the port is still
    /// held by the old process's sockets.
    pub fn restart(&mut self) {
        self.kill();
        let listen = format!("127.0.0.1:{}", self.port);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match self.spawn(&listen) {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!("vcsim did not restart on {listen}: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    pub fn stats(&self) -> VcsimStats {
        let response = http_call(self.debug, "GET", "/debug/stats", None, None)
            .unwrap_or_else(|e| panic!("vcsim debug stats: {e}"));
        assert_eq!(response.status, 200, "{}", response.body);
        serde_json::from_str(&response.body)
            .unwrap_or_else(|e| panic!("vcsim stats {:?}: {e}", response.body))
    }

    /// Expires every API session now; returns how many there were.
    pub fn expire_sessions(&self) -> u64 {
        self.expire_sessions_after(0)
    }

    /// Expires every API session once `requests` more SDK requests have
    /// been answered (0: now); returns how many sessions there are now.
    pub fn expire_sessions_after(&self, requests: u32) -> u64 {
        let path = format!("/debug/expire-sessions?after_requests={requests}");
        let response = http_call(self.debug, "POST", &path, None, None)
            .unwrap_or_else(|e| panic!("vcsim expire: {e}"));
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()["expired"].as_u64().unwrap()
    }

    /// The simulator's stderr, for failure messages.
    pub fn log(&self) -> String {
        tail_of_file(&self.log, 16 * 1024)
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- vcsim log ----\n{}", self.log());
        }
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(2));
        }
    }
}
