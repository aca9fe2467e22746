//! The hypervisor layer's benchmarks (issue 10), against `consolegate run`
//! with `[[hypervisors]]`, each part repeated `--hv-runs` times (medians of
//! the runs; ratios are taken inside one run, then their median):
//!
//! - **storm** — console opens under a thumbnail storm. A `static`
//!   hypervisor (`max_concurrent` slots) whose one VM is [`SlowVnc`], a VNC
//!   server of the bench that answers each connection only after a delay,
//!   then serves a small framebuffer (RFB 3.8, security None, one Raw
//!   update: what the appliance's snapshot asks for). N thumbnail requests
//!   are fired at once, each with its own size (`?width=W`), so the
//!   thumbnail cache cannot merge them: N real snapshots queue on the LOW
//!   lane. Once the queue holds them all, consoles are opened one after
//!   another (`POST /api/v1/vms/{vm}/console`, timed request → 201) while
//!   thumbnails still wait (checked with `GET /api/v1/queue/stats` before
//!   each open, untimed). Cells: each `critical_reserve` asked for (1 is
//!   the default queue), and the floor: the same opens with no storm.
//! - **pool** — API-session economy against the govmomi vSphere simulator
//!   (tests/support/vcsim/main.go, built here with Debian's Go and
//!   govmomi): U users at once, each one VM list then T thumbnails over C
//!   connections, through one vsphere hypervisor with `pool_size` P. The
//!   simulator has 4 VMs, so every thumbnail asks its own size: every one
//!   is a real `/screen` fetch. Reported: the simulator's logins, the peak
//!   of its live API sessions (polled), its screens and SDK requests, wall
//!   time, latency and errors, against the naive one session per request.
//!
//! Every server listens on 127.0.0.1; every child is stopped by PID; every
//! loop is bounded by a count and a deadline. A fresh appliance (and, for
//! pool, a fresh simulator) per cell and run, so no cache carries over.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use sha1::Digest as _;

use crate::appliance::{self, ReadyLines};
use crate::child::{self, ChildProc};
use crate::common::{unix_now, Common};
use crate::report::{self, Machine, RunInfo};
use crate::rest::{self, HttpMode, RestClient};
use crate::server::{ThreadServer, Tracker};
use crate::stats::{self, Percentiles};
use crate::workload::{new_histogram, HIST_LOWEST_US};

/// The static hypervisor's id and its VM's id in the storm.
const STORM_HYPERVISOR: &str = "lab";
const STORM_VM: &str = "slow";
/// The vsphere hypervisor's id in the pool part.
const POOL_HYPERVISOR: &str = "vc1";
/// Untimed console opens before each storm cell's measured ones.
const WARMUP_OPENS: u64 = 5;
/// Narrowest thumbnail asked for; each request adds its index to it.
const MIN_THUMBNAIL_WIDTH: u32 = 32;
/// Thumbnail box height: larger than any screen here, so the width
/// (distinct per request) decides the size.
const THUMBNAIL_BOX_HEIGHT: u32 = 1024;
/// The appliance's default `cache.max_thumbnail_width`.
const MAX_THUMBNAIL_WIDTH: u32 = 1280;
/// The simulator's only user and its password.
const VCSIM_USERNAME: &str = "user";
const VCSIM_PASSWORD: &str = "pass";
/// Where Debian's golang-github-vmware-govmomi-dev puts the simulator.
const GOVMOMI_SIMULATOR: &str = "/usr/share/gocode/src/github.com/vmware/govmomi/simulator";
/// A cold `go build` of the simulator takes 40–90 s on two cores.
const VCSIM_BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the simulator's live sessions are sampled for the peak.
const SESSION_POLL: Duration = Duration::from_millis(10);
/// How often the queue is polled while the storm builds up, and how long
/// the storm may take to be fully queued.
const QUEUE_POLL: Duration = Duration::from_millis(5);
const QUEUE_FILL_LIMIT: Duration = Duration::from_secs(20);
/// Connections the slow VNC server serves at once (the appliance makes at
/// most `max_concurrent`).
const SLOW_VNC_MAX_CONNECTIONS: usize = 256;
/// Client messages read per connection before the slow VNC server gives up.
const SLOW_VNC_MAX_MESSAGES: usize = 64;
/// Framebuffer updates served per connection, at most.
const SLOW_VNC_MAX_UPDATES: usize = 4;
/// Longest ClientCutText skipped.
const SLOW_VNC_MAX_CUT_TEXT_BYTES: u32 = 1 << 20;
/// How long client threads may take to connect before a phase starts.
const GATE_LIMIT: Duration = Duration::from_secs(20);
/// Distinct failure reasons kept (the rest are "other").
const MAX_REASONS: usize = 16;
/// Stack of every client thread (blocking HTTP only).
const CLIENT_STACK_BYTES: usize = 256 * 1024;
/// Most thumbnail requests in a storm, users, connections per user.
pub const MAX_STORM_THUMBNAILS: usize = 1000;
pub const MAX_POOL_USERS: usize = 100;
pub const MAX_USER_CONNECTIONS: usize = 16;

/// The two measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    /// Console opens under a thumbnail storm (static hypervisor, slow VNC).
    Storm,
    /// API-session economy against the vSphere simulator.
    Pool,
}

/// `consolegate-bench hypervisors` options (all prefixed `hv-`).
#[derive(Debug, Clone, clap::Args)]
pub struct HypervisorsOpts {
    /// Parts to run.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "storm,pool")]
    pub hv_parts: Vec<Part>,
    /// Repetitions of each part; the report gives medians.
    #[arg(long, default_value_t = 3)]
    pub hv_runs: usize,
    /// The appliance's data-plane io backend (epoll or uring).
    #[arg(long, default_value = "epoll")]
    pub hv_io: String,
    /// Thumbnail requests fired at once in the storm.
    #[arg(long, default_value_t = 200)]
    pub hv_storm_thumbnails: usize,
    /// The slow VNC server's delay before it greets each connection.
    #[arg(long, default_value_t = 100)]
    pub hv_storm_delay_ms: u64,
    /// Its framebuffer, WIDTHxHEIGHT.
    #[arg(long, default_value = "320x240", value_parser = parse_size)]
    pub hv_storm_framebuffer: (u16, u16),
    /// `max_concurrent` of the static hypervisor.
    #[arg(long, default_value_t = 4)]
    pub hv_storm_max_concurrent: usize,
    /// `[queue] critical_reserve` values, one storm cell each (the floor
    /// cell, without storm, uses the first).
    #[arg(long, value_delimiter = ',', default_value = "1,0")]
    pub hv_storm_reserves: Vec<usize>,
    /// Measured console opens per cell, at most (a storm cell also stops
    /// when no thumbnail waits any more).
    #[arg(long, default_value_t = 200)]
    pub hv_storm_opens: u64,
    /// One storm cell, at most (its thumbnails included).
    #[arg(long, default_value_t = 120_000)]
    pub hv_storm_time_limit_ms: u64,
    /// Simulated users, all at once.
    #[arg(long, default_value_t = 10)]
    pub hv_pool_users: usize,
    /// Thumbnails per user (after its one VM list).
    #[arg(long, default_value_t = 70)]
    pub hv_pool_thumbnails: usize,
    /// Connections per user sharing its thumbnails (a browser uses 6).
    #[arg(long, default_value_t = 6)]
    pub hv_pool_user_connections: usize,
    /// `pool_size` (and `max_concurrent`) of the vsphere hypervisor.
    #[arg(long, default_value_t = 4)]
    pub hv_pool_size: usize,
    /// One pool run, at most.
    #[arg(long, default_value_t = 300_000)]
    pub hv_pool_time_limit_ms: u64,
    /// Go toolchain (Debian golang-go).
    #[arg(long, default_value = "go")]
    pub hv_go: PathBuf,
    /// The simulator's Go source.
    #[arg(long, default_value = "tests/support/vcsim/main.go")]
    pub hv_vcsim_source: PathBuf,
    /// Where the built simulator is cached.
    #[arg(long, default_value = "target/bench-vcsim")]
    pub hv_vcsim_dir: PathBuf,
}

/// `WIDTHxHEIGHT`, each 1..=4096.
pub fn parse_size(s: &str) -> Result<(u16, u16), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?}: expected WIDTHxHEIGHT"))?;
    let side = |v: &str| -> Result<u16, String> {
        match v.trim().parse::<u16>() {
            Ok(n) if (1..=4096).contains(&n) => Ok(n),
            _ => Err(format!("{s:?}: each side must be 1..=4096")),
        }
    };
    Ok((side(w)?, side(h)?))
}

impl HypervisorsOpts {
    pub fn config(&self, common: &Common) -> HypervisorsConfig {
        HypervisorsConfig {
            opts: self.clone(),
            common: common.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HypervisorsConfig {
    #[serde(flatten)]
    pub opts: HypervisorsOpts,
    #[serde(skip)]
    pub common: Common,
}

impl Serialize for HypervisorsOpts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("HypervisorsOpts", 16)?;
        st.serialize_field("parts", &self.hv_parts)?;
        st.serialize_field("runs", &self.hv_runs)?;
        st.serialize_field("io", &self.hv_io)?;
        st.serialize_field("storm_thumbnails", &self.hv_storm_thumbnails)?;
        st.serialize_field("storm_delay_ms", &self.hv_storm_delay_ms)?;
        st.serialize_field("storm_framebuffer", &self.hv_storm_framebuffer)?;
        st.serialize_field("storm_max_concurrent", &self.hv_storm_max_concurrent)?;
        st.serialize_field("storm_reserves", &self.hv_storm_reserves)?;
        st.serialize_field("storm_opens", &self.hv_storm_opens)?;
        st.serialize_field("pool_users", &self.hv_pool_users)?;
        st.serialize_field("pool_thumbnails", &self.hv_pool_thumbnails)?;
        st.serialize_field("pool_user_connections", &self.hv_pool_user_connections)?;
        st.serialize_field("pool_size", &self.hv_pool_size)?;
        st.serialize_field("storm_time_limit_ms", &self.hv_storm_time_limit_ms)?;
        st.serialize_field("pool_time_limit_ms", &self.hv_pool_time_limit_ms)?;
        st.serialize_field("vcsim_source", &self.hv_vcsim_source)?;
        st.end()
    }
}

impl HypervisorsConfig {
    fn validate(&self) -> Result<()> {
        let o = &self.opts;
        if o.hv_runs == 0 || o.hv_runs > 100 {
            bail!("--hv-runs must be 1..=100");
        }
        if !matches!(o.hv_io.as_str(), "epoll" | "uring") {
            bail!("--hv-io must be epoll or uring");
        }
        if o.hv_storm_thumbnails == 0 || o.hv_storm_thumbnails > MAX_STORM_THUMBNAILS {
            bail!("--hv-storm-thumbnails must be 1..={MAX_STORM_THUMBNAILS}");
        }
        if o.hv_storm_reserves.is_empty()
            || o.hv_storm_reserves
                .iter()
                .any(|r| *r >= o.hv_storm_max_concurrent)
        {
            bail!("--hv-storm-reserves: each must be below --hv-storm-max-concurrent");
        }
        if o.hv_pool_users == 0 || o.hv_pool_users > MAX_POOL_USERS {
            bail!("--hv-pool-users must be 1..={MAX_POOL_USERS}");
        }
        if o.hv_pool_user_connections == 0 || o.hv_pool_user_connections > MAX_USER_CONNECTIONS {
            bail!("--hv-pool-user-connections must be 1..={MAX_USER_CONNECTIONS}");
        }
        if o.hv_pool_size == 0 {
            bail!("--hv-pool-size must be at least 1");
        }
        // Widths must stay distinct and within the appliance's bound.
        let widest = thumbnail_width(o.hv_storm_thumbnails.max(
            o.hv_pool_users * o.hv_pool_thumbnails, // ÷ VMs ≥ 1: bounded by this
        ));
        if widest > MAX_THUMBNAIL_WIDTH {
            bail!("too many thumbnails: widths would pass {MAX_THUMBNAIL_WIDTH} px");
        }
        Ok(())
    }
}

/// The thumbnail width of request `index` (distinct per index).
pub fn thumbnail_width(index: usize) -> u32 {
    MIN_THUMBNAIL_WIDTH.saturating_add(u32::try_from(index).unwrap_or(u32::MAX))
}

/// The thumbnail path of request `index` for `vm`.
pub fn thumbnail_path(vm: &str, index: usize) -> String {
    format!(
        "/api/v1/vms/{vm}/thumbnail?width={}&height={THUMBNAIL_BOX_HEIGHT}",
        thumbnail_width(index)
    )
}

/// Pool thumbnail `g` (0-based across all users): which VM, and which size
/// index. `(VM, size)` is distinct for every `g`.
pub fn pool_plan(g: usize, vms: usize) -> (usize, usize) {
    let vms = vms.max(1);
    (g % vms, g / vms)
}

// ---------------------------------------------------------------------------
// Start gate, failure reasons
// ---------------------------------------------------------------------------

/// Lets client threads connect first, then go all at once. The opener
/// holds the write lock; each thread counts itself ready and waits on a
/// read. Dropping the write guard on any path (error included) lets every
/// thread go, so a failure can never leave a thread waiting forever.
#[derive(Default)]
struct Gate {
    lock: RwLock<()>,
    ready: AtomicUsize,
}

impl Gate {
    fn arrive(&self) {
        self.ready.fetch_add(1, Ordering::SeqCst);
        drop(self.lock.read().unwrap_or_else(|p| p.into_inner()));
    }

    /// Waits (bounded) until `n` threads arrived.
    fn wait_ready(&self, n: usize) {
        let deadline = Instant::now() + GATE_LIMIT;
        while self.ready.load(Ordering::SeqCst) < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Reasons(pub BTreeMap<String, u64>);

impl Reasons {
    pub fn add(&mut self, reason: &str) {
        self.add_n(reason, 1);
    }

    pub fn add_n(&mut self, reason: &str, n: u64) {
        let key: String = reason.chars().take(160).collect();
        let key = if self.0.contains_key(&key) || self.0.len() < MAX_REASONS {
            key
        } else {
            "other".to_string()
        };
        *self.0.entry(key).or_insert(0) += n;
    }

    fn merge(&mut self, o: &Reasons) {
        for (k, v) in &o.0 {
            self.add_n(k, *v);
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

// ---------------------------------------------------------------------------
// The slow VNC server
// ---------------------------------------------------------------------------

/// A VNC server that greets each connection after `delay`, then serves a
/// `width × height` framebuffer of colour bars: RFB 3.8, security None,
/// Raw encoding, 32-bit true colour in whatever shifts and byte order the
/// client sets. Counts the connections it greeted and the updates it sent.
pub struct SlowVnc {
    server: ThreadServer,
    pub greeted: Arc<AtomicU64>,
    pub updates: Arc<AtomicU64>,
}

impl SlowVnc {
    pub fn start(delay: Duration, size: (u16, u16), io_timeout: Duration) -> io::Result<SlowVnc> {
        let greeted = Arc::new(AtomicU64::new(0));
        let updates = Arc::new(AtomicU64::new(0));
        let (g, u) = (greeted.clone(), updates.clone());
        let server = ThreadServer::start(
            "slow-vnc",
            SLOW_VNC_MAX_CONNECTIONS,
            move |stream: TcpStream, _t: &Tracker| {
                stream.set_read_timeout(Some(io_timeout))?;
                stream.set_write_timeout(Some(io_timeout))?;
                stream.set_nodelay(true)?;
                // The point of this server: a hypervisor that is slow to
                // answer. The delay is bounded by the option's value.
                std::thread::sleep(delay);
                g.fetch_add(1, Ordering::Relaxed);
                serve_rfb(stream, size, &u)
            },
        )?;
        Ok(SlowVnc {
            server,
            greeted,
            updates,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn stop(&mut self) {
        self.server.stop();
    }
}

/// The client's pixel format (RFC 6143 7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub big_endian: bool,
    pub true_colour: bool,
    pub max: [u16; 3],
    pub shift: [u8; 3],
}

/// What the server announces: 32 bpp, depth 24, little-endian, RGB in
/// bits 16/8/0.
pub const SERVER_FORMAT: [u8; 16] = [32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0];

impl PixelFormat {
    pub fn parse(b: &[u8; 16]) -> PixelFormat {
        PixelFormat {
            bits_per_pixel: b[0],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            max: [
                u16::from_be_bytes([b[4], b[5]]),
                u16::from_be_bytes([b[6], b[7]]),
                u16::from_be_bytes([b[8], b[9]]),
            ],
            shift: [b[10], b[11], b[12]],
        }
    }

    /// One pixel's 4 bytes.
    pub fn encode(&self, rgb: [u8; 3]) -> [u8; 4] {
        let mut v: u32 = 0;
        for ((c, max), shift) in rgb.iter().zip(self.max).zip(self.shift) {
            let c = u32::from(*c) * u32::from(max) / 255;
            v |= c.checked_shl(u32::from(shift)).unwrap_or(0);
        }
        if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    }
}

/// The colour of column `x` of `width`: eight bars.
pub fn bar_colour(x: u16, width: u16) -> [u8; 3] {
    const BARS: [[u8; 3]; 8] = [
        [255, 255, 255],
        [255, 255, 0],
        [0, 255, 255],
        [0, 255, 0],
        [255, 0, 255],
        [255, 0, 0],
        [0, 0, 255],
        [0, 0, 0],
    ];
    let i = usize::from(x) * 8 / usize::from(width.max(1));
    BARS[i.min(7)]
}

/// One FramebufferUpdate: the whole screen as one Raw rectangle.
pub fn full_update(size: (u16, u16), format: &PixelFormat) -> Vec<u8> {
    let (w, h) = size;
    let mut out = Vec::with_capacity(16 + usize::from(w) * usize::from(h) * 4);
    out.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    out.extend_from_slice(&w.to_be_bytes());
    out.extend_from_slice(&h.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
    let row: Vec<u8> = (0..w)
        .flat_map(|x| format.encode(bar_colour(x, w)))
        .collect();
    for _ in 0..h {
        out.extend_from_slice(&row);
    }
    out
}

fn protocol_error(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The RFB 3.8 server side after the delay: handshake, then client
/// messages until EOF, answering each update request with the screen.
fn serve_rfb(mut s: TcpStream, size: (u16, u16), updates: &AtomicU64) -> io::Result<()> {
    s.write_all(b"RFB 003.008\n")?;
    let mut version = [0u8; 12];
    s.read_exact(&mut version)?;
    if &version[..4] != b"RFB " {
        return Err(protocol_error("client version is not RFB".into()));
    }
    s.write_all(&[1, 1])?; // one security type: None
    let mut chosen = [0u8; 1];
    s.read_exact(&mut chosen)?;
    if chosen[0] != 1 {
        return Err(protocol_error(format!(
            "client chose security {}",
            chosen[0]
        )));
    }
    s.write_all(&[0, 0, 0, 0])?; // SecurityResult: OK
    let mut shared = [0u8; 1];
    s.read_exact(&mut shared)?;
    let name = b"consolegate-bench slow VNC";
    let mut init = Vec::with_capacity(24 + name.len());
    init.extend_from_slice(&size.0.to_be_bytes());
    init.extend_from_slice(&size.1.to_be_bytes());
    init.extend_from_slice(&SERVER_FORMAT);
    init.extend_from_slice(&(name.len() as u32).to_be_bytes());
    init.extend_from_slice(name);
    s.write_all(&init)?;
    client_messages(&mut s, size, updates)
}

fn client_messages(s: &mut TcpStream, size: (u16, u16), updates: &AtomicU64) -> io::Result<()> {
    let mut format = PixelFormat::parse(&SERVER_FORMAT);
    let mut sent = 0;
    for _ in 0..SLOW_VNC_MAX_MESSAGES {
        let mut kind = [0u8; 1];
        if s.read(&mut kind)? == 0 {
            return Ok(());
        }
        match kind[0] {
            0 => {
                let mut b = [0u8; 19];
                s.read_exact(&mut b)?;
                let mut f = [0u8; 16];
                f.copy_from_slice(&b[3..]);
                format = PixelFormat::parse(&f);
                if format.bits_per_pixel != 32 || !format.true_colour {
                    return Err(protocol_error("only 32-bit true colour is served".into()));
                }
            }
            2 => {
                let mut b = [0u8; 3];
                s.read_exact(&mut b)?;
                let n = u16::from_be_bytes([b[1], b[2]]);
                skip(s, u64::from(n) * 4)?;
            }
            3 => {
                skip(s, 9)?;
                if sent >= SLOW_VNC_MAX_UPDATES {
                    return Ok(());
                }
                s.write_all(&full_update(size, &format))?;
                sent += 1;
                updates.fetch_add(1, Ordering::Relaxed);
            }
            4 => skip(s, 7)?,
            5 => skip(s, 5)?,
            6 => {
                let mut b = [0u8; 7];
                s.read_exact(&mut b)?;
                let n = u32::from_be_bytes([b[3], b[4], b[5], b[6]]);
                if n > SLOW_VNC_MAX_CUT_TEXT_BYTES {
                    return Err(protocol_error(format!("{n}-byte clipboard")));
                }
                skip(s, u64::from(n))?;
            }
            other => return Err(protocol_error(format!("client message type {other}"))),
        }
    }
    Ok(())
}

fn skip(s: &mut TcpStream, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut s.take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The appliance with hypervisors
// ---------------------------------------------------------------------------

/// A running `consolegate run` with a config of this module.
pub struct HvAppliance {
    pub control: SocketAddr,
    pub token: String,
    child: ChildProc,
}

impl HvAppliance {
    pub fn stop(&mut self) {
        self.child.stop();
    }

    pub fn has_exited(&mut self) -> bool {
        self.child.has_exited()
    }

    pub fn log_path(&self) -> &Path {
        self.child.log_path()
    }

    pub fn rest(&self, io_timeout: Duration) -> RestClient {
        RestClient::new(self.control, &self.token, HttpMode::KeepAlive, io_timeout)
    }
}

/// `[queue]`, and the hypervisor tables, appended to the base config.
#[derive(Debug, Clone)]
pub struct HvSettings {
    pub io: String,
    pub critical_reserve: usize,
    pub max_queue_depth: usize,
    pub queue_timeout_ms: u64,
    pub request_timeout_ms: u64,
    /// The `[[hypervisors]]` table(s), rendered.
    pub hypervisors: String,
}

/// The whole config file.
pub fn render_config(
    s: &HvSettings,
    token: &str,
    port_range: (u16, u16),
    state_dir: &Path,
) -> String {
    format!(
        // No periodic VM-list refresh for live events: the storm counts the
        // thumbnails' VNC connections, and a refresh probing the static
        // VMs would add its own.
        "# Written by consolegate-bench (hypervisors); one instance, loopback only.\n\
         [control]\nlisten = \"127.0.0.1:0\"\nrequest_timeout_ms = {}\n\n\
         [console]\nlisten = \"127.0.0.1:0\"\n\n\
         [ports]\nrange = \"{}-{}\"\nstate_dir = {}\n\n\
         [[auth.tokens]]\ntoken = {}\nrole = \"admin\"\n\n\
         [dataplane]\nio = {}\n\n\
         [dataplane.limits]\ndrain_grace_ms = {}\n\n\
         [demo]\nenabled = false\n\n\
         [log]\nlevel = \"warn\"\n\n\
         [sessions]\nmax_sessions_per_user = 100000\nmax_sessions = 100000\nbind_origin = false\n\n\
         [events]\nvm_refresh_interval_ms = 0\n\n\
         [queue]\ncritical_reserve = {}\nmax_queue_depth = {}\nqueue_timeout_ms = {}\n\n{}",
        s.request_timeout_ms,
        port_range.0,
        port_range.1,
        appliance::toml_string(&state_dir.display().to_string()),
        appliance::toml_string(token),
        appliance::toml_string(&s.io),
        appliance::DRAIN_GRACE_MS,
        s.critical_reserve,
        s.max_queue_depth,
        s.queue_timeout_ms,
        s.hypervisors,
    )
}

/// The storm's static hypervisor: one VM, the slow VNC server.
pub fn static_hypervisor(vnc: SocketAddr, max_concurrent: usize) -> String {
    format!(
        "[[hypervisors]]\nkind = \"static\"\nid = \"{STORM_HYPERVISOR}\"\nmax_concurrent = {max_concurrent}\n\
         vms = [{{ id = \"{STORM_VM}\", host = \"{}\", port = {} }}]\n",
        vnc.ip(),
        vnc.port()
    )
}

/// The pool's vsphere hypervisor.
pub fn vsphere_hypervisor(
    url: &str,
    thumbprint: &str,
    password_file: &Path,
    pool_size: usize,
) -> String {
    format!(
        "[[hypervisors]]\nkind = \"vsphere\"\nid = \"{POOL_HYPERVISOR}\"\nurl = {}\nusername = {}\n\
         password_file = {}\nthumbprint = {}\npool_size = {pool_size}\nmax_concurrent = {pool_size}\n",
        appliance::toml_string(url),
        appliance::toml_string(VCSIM_USERNAME),
        appliance::toml_string(&password_file.display().to_string()),
        appliance::toml_string(thumbprint),
    )
}

/// Writes `dir/consolegate.toml` and starts the appliance on it.
pub fn start_appliance(
    exe: &Path,
    dir: &Path,
    settings: &HvSettings,
    log: &Path,
    startup: Duration,
) -> Result<HvAppliance> {
    child::require_file(exe, "build it: cargo build --release --bin consolegate")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let state_dir = std::path::absolute(dir.join("state"))?;
    let token = appliance::random_token();
    let config = render_config(settings, &token, appliance::probe_port_range()?, &state_dir);
    let config_path = dir.join("consolegate.toml");
    std::fs::write(&config_path, config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let args = vec![
        "run".to_string(),
        "--config".to_string(),
        config_path.display().to_string(),
    ];
    let mut child = ChildProc::spawn("consolegate-hypervisors", exe, &args, log)?;
    let seen = RefCell::new(ReadyLines::default());
    let ready = child
        .wait_for_line(startup, |l| {
            let mut s = seen.borrow_mut();
            s.feed(l).then(|| s.clone())
        })
        .context("waiting for `control listening on` and `listening on`")?;
    Ok(HvAppliance {
        control: ready.control.ok_or_else(|| anyhow!("no control address"))?,
        token,
        child,
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(u64::MAX)
        .max(HIST_LOWEST_US)
}

fn write_hgrm(out_dir: &Path, rel: &str, h: &Histogram<u64>) -> Result<()> {
    let path = out_dir.join(rel);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(
        &path,
        report::percentile_distribution(h, report::TICKS_PER_HALF_DISTANCE, 1.0),
    )
    .with_context(|| format!("writing {}", path.display()))
}

/// A GET answered 200 with a JSON body.
fn get_json(rest: &mut RestClient, path: &str) -> Result<serde_json::Value, String> {
    let r = rest.get(path).map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!("HTTP {} {}", r.status, r.body_excerpt()));
    }
    serde_json::from_slice(&r.body).map_err(|e| format!("bad JSON: {e}"))
}

/// The LOW lane of the storm hypervisor: (total_requests, in_queue).
pub fn low_lane(stats: &serde_json::Value) -> Option<(u64, u64)> {
    let lanes = stats
        .pointer(&format!("/queues/{STORM_HYPERVISOR}/lanes"))?
        .as_array()?;
    let low = lanes.iter().find(|l| l["lane"] == "low")?;
    Some((low["total_requests"].as_u64()?, low["in_queue"].as_u64()?))
}

// ---------------------------------------------------------------------------
// Storm
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct StormCell {
    /// `critical_reserve=N`, or `no storm` (the floor).
    pub name: String,
    pub critical_reserve: usize,
    pub storm: bool,
    pub ok: bool,
    pub error: Option<String>,
    /// Measured console opens: answered 201, and not.
    pub opens: u64,
    pub open_failures: u64,
    pub open_failure_reasons: Reasons,
    /// Console open latency (request → 201 parsed), µs.
    pub open_latency: Option<Percentiles>,
    /// Fewest thumbnails waiting on the LOW lane just before an open.
    pub min_thumbnails_waiting: Option<u64>,
    /// The storm: requests, 200 + PNG answers, failures.
    pub thumbnails: usize,
    pub thumbnails_ok: usize,
    pub thumbnail_failure_reasons: Reasons,
    /// From the first request sent to the last answer, ms.
    pub storm_ms: Option<f64>,
    /// Until the LOW lane had every request, ms.
    pub queued_ms: Option<f64>,
    pub thumbnail_latency: Option<Percentiles>,
    /// Snapshots the slow VNC server served (connections greeted, updates).
    pub vnc_connections: u64,
    pub vnc_updates: u64,
    /// This cell's p99 over the floor's, and over the first reserve's, in
    /// the same run.
    pub p99_vs_floor: Option<f64>,
    pub p99_vs_default: Option<f64>,
    pub hgrm: Option<String>,
    pub queue_stats: Option<serde_json::Value>,
    pub appliance_log: Option<String>,
}

impl StormCell {
    fn new(name: String, critical_reserve: usize, storm: bool) -> StormCell {
        StormCell {
            name,
            critical_reserve,
            storm,
            ok: false,
            error: None,
            opens: 0,
            open_failures: 0,
            open_failure_reasons: Reasons::default(),
            open_latency: None,
            min_thumbnails_waiting: None,
            thumbnails: 0,
            thumbnails_ok: 0,
            thumbnail_failure_reasons: Reasons::default(),
            storm_ms: None,
            queued_ms: None,
            thumbnail_latency: None,
            vnc_connections: 0,
            vnc_updates: 0,
            p99_vs_floor: None,
            p99_vs_default: None,
            hgrm: None,
            queue_stats: None,
            appliance_log: None,
        }
    }
}

/// The storm cells of one run: each reserve under storm, then the floor.
pub fn storm_cells(reserves: &[usize]) -> Vec<(String, usize, bool)> {
    let mut cells: Vec<(String, usize, bool)> = reserves
        .iter()
        .map(|r| (format!("critical_reserve={r}"), *r, true))
        .collect();
    cells.push((
        "no storm".to_string(),
        reserves.first().copied().unwrap_or(1),
        false,
    ));
    cells
}

/// What the storm threads did.
struct StormOutcome {
    ok: usize,
    reasons: Reasons,
    latency: Histogram<u64>,
    wall: Duration,
}

/// Fires `n` thumbnail requests at once (one connection each, opened
/// first), says so on `started`, and returns when all answered or failed.
fn fire_storm(
    control: SocketAddr,
    token: &str,
    n: usize,
    io_timeout: Duration,
    started: mpsc::Sender<()>,
) -> Result<StormOutcome> {
    let results: Mutex<Vec<(Result<(), String>, Duration)>> = Mutex::new(Vec::with_capacity(n));
    let gate = Gate::default();
    let t0 = std::thread::scope(|s| -> Result<Instant> {
        let guard = gate.lock.write().unwrap_or_else(|p| p.into_inner());
        for i in 0..n {
            let (gate, results) = (&gate, &results);
            std::thread::Builder::new()
                .name(format!("storm-{i}"))
                .stack_size(CLIENT_STACK_BYTES)
                .spawn_scoped(s, move || {
                    let mut rest = RestClient::new(control, token, HttpMode::KeepAlive, io_timeout);
                    let pre = rest.preconnect();
                    gate.arrive();
                    let t = Instant::now();
                    let r = match pre {
                        Ok(()) => one_thumbnail(&mut rest, &thumbnail_path(&storm_vm_id(), i)),
                        Err(e) => Err(format!("connect: {e}")),
                    };
                    let mut v = results.lock().unwrap_or_else(|p| p.into_inner());
                    v.push((r, t.elapsed()));
                })
                .context("spawning a storm thread")?;
        }
        gate.wait_ready(n);
        drop(guard);
        let t0 = Instant::now();
        let _ = started.send(());
        Ok(t0)
    })?;
    let wall = t0.elapsed();
    let mut out = StormOutcome {
        ok: 0,
        reasons: Reasons::default(),
        latency: new_histogram(),
        wall,
    };
    for (r, d) in results.into_inner().unwrap_or_else(|p| p.into_inner()) {
        out.latency.saturating_record(micros(d));
        match r {
            Ok(()) => out.ok += 1,
            Err(e) => out.reasons.add(&e),
        }
    }
    out.reasons.add_n(
        "not sent",
        n.saturating_sub(out.ok + out.reasons.total() as usize) as u64,
    );
    out.reasons.0.retain(|_, v| *v > 0);
    Ok(out)
}

fn storm_vm_id() -> String {
    format!("{STORM_HYPERVISOR}:{STORM_VM}")
}

/// One thumbnail GET: 200 and a PNG, or why not.
fn one_thumbnail(rest: &mut RestClient, path: &str) -> Result<(), String> {
    let r = rest.get(path).map_err(|e| e.to_string())?;
    if r.status != 200 {
        let code = rest::error_code(&r.body).unwrap_or_else(|| r.body_excerpt());
        return Err(format!("HTTP {} {code}", r.status));
    }
    if !r.body.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Err("200 without a PNG".into());
    }
    Ok(())
}

/// One console open: 201 with a session id, or why not.
fn one_open(rest: &mut RestClient) -> Result<Duration, String> {
    let path = format!("/api/v1/vms/{}/console", storm_vm_id());
    let t = Instant::now();
    let r = rest
        .post_json(&path, r#"{"user":"bench"}"#)
        .map_err(|e| e.to_string())?;
    let d = t.elapsed();
    if r.status != 201 {
        let code = rest::error_code(&r.body).unwrap_or_else(|| r.body_excerpt());
        return Err(format!("HTTP {} {code}", r.status));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&r.body).map_err(|e| format!("bad 201 body: {e}"))?;
    if !v["session_id"].is_string() {
        return Err("201 without session_id".into());
    }
    Ok(d)
}

/// Waits (bounded) until the LOW lane has seen all `n` thumbnail calls.
fn wait_until_queued(rest: &mut RestClient, n: usize, since: Instant) -> Option<Duration> {
    let deadline = Instant::now() + QUEUE_FILL_LIMIT;
    while Instant::now() < deadline {
        if let Ok(v) = get_json(rest, "/api/v1/queue/stats") {
            if low_lane(&v).is_some_and(|(total, _)| total >= n as u64) {
                return Some(since.elapsed());
            }
        }
        std::thread::sleep(QUEUE_POLL);
    }
    None
}

/// The measured opens: back to back, each after an untimed look at the
/// queue; under storm, only while thumbnails still wait.
fn measure_opens(
    rest: &mut RestClient,
    cell: &mut StormCell,
    max: u64,
    deadline: Instant,
    stop: &AtomicBool,
) -> Histogram<u64> {
    let mut h = new_histogram();
    while cell.opens + cell.open_failures < max
        && Instant::now() < deadline
        && !stop.load(Ordering::Relaxed)
    {
        let waiting = get_json(rest, "/api/v1/queue/stats")
            .ok()
            .and_then(|v| low_lane(&v))
            .map(|(_, q)| q);
        if cell.storm {
            match waiting {
                Some(q) if q > 0 => {
                    cell.min_thumbnails_waiting =
                        Some(cell.min_thumbnails_waiting.map_or(q, |m| m.min(q)));
                }
                _ => break,
            }
        }
        match one_open(rest) {
            Ok(d) => {
                h.saturating_record(micros(d));
                cell.opens += 1;
            }
            Err(e) => {
                cell.open_failures += 1;
                cell.open_failure_reasons.add(&e);
            }
        }
    }
    h
}

/// One storm cell against a fresh appliance.
fn storm_cell(
    cfg: &HypervisorsConfig,
    vnc: &SlowVnc,
    spec: &(String, usize, bool),
    run: usize,
    stop: &AtomicBool,
) -> StormCell {
    let (name, reserve, storm) = spec;
    let mut cell = StormCell::new(name.clone(), *reserve, *storm);
    let o = &cfg.opts;
    let tag = format!("storm-r{run}-{}", name.replace([' ', '='], "-"));
    let dir = cfg.common.out_dir.join("hypervisors").join(&tag);
    let log = cfg.common.out_dir.join("logs").join(format!("{tag}.log"));
    let limit_ms = o.hv_storm_time_limit_ms;
    let settings = HvSettings {
        io: o.hv_io.clone(),
        critical_reserve: *reserve,
        max_queue_depth: (o.hv_storm_thumbnails * 2).max(1000),
        queue_timeout_ms: limit_ms,
        request_timeout_ms: limit_ms.min(600_000),
        hypervisors: static_hypervisor(vnc.addr(), o.hv_storm_max_concurrent),
    };
    let startup = Duration::from_millis(cfg.common.startup_timeout_ms);
    let mut app = match start_appliance(&cfg.common.consolegate, &dir, &settings, &log, startup) {
        Ok(a) => a,
        Err(e) => {
            cell.error = Some(format!("start: {e:#}"));
            return cell;
        }
    };
    let (g0, u0) = (
        vnc.greeted.load(Ordering::Relaxed),
        vnc.updates.load(Ordering::Relaxed),
    );
    if let Err(e) = run_storm_cell(cfg, &app, &mut cell, &tag, stop) {
        cell.error = Some(format!("{e:#}"));
    }
    cell.vnc_connections = vnc.greeted.load(Ordering::Relaxed) - g0;
    cell.vnc_updates = vnc.updates.load(Ordering::Relaxed) - u0;
    if app.has_exited() {
        cell.ok = false;
        cell.error = Some(format!(
            "appliance exited: {}",
            child::log_tail(app.log_path(), 600)
        ));
    }
    cell.appliance_log = Some(relative(app.log_path(), &cfg.common.out_dir));
    app.stop();
    cell
}

fn relative(p: &Path, base: &Path) -> String {
    p.strip_prefix(base).unwrap_or(p).display().to_string()
}

fn run_storm_cell(
    cfg: &HypervisorsConfig,
    app: &HvAppliance,
    cell: &mut StormCell,
    tag: &str,
    stop: &AtomicBool,
) -> Result<()> {
    let o = &cfg.opts;
    let io_timeout = Duration::from_millis(cfg.common.io_timeout_ms);
    let limit = Duration::from_millis(o.hv_storm_time_limit_ms);
    let deadline = Instant::now() + limit;
    let mut rest = app.rest(io_timeout);
    for _ in 0..WARMUP_OPENS {
        one_open(&mut rest).map_err(|e| anyhow!("warm-up console open: {e}"))?;
    }
    let h = if cell.storm {
        let n = o.hv_storm_thumbnails;
        cell.thumbnails = n;
        let (tx, rx) = mpsc::channel();
        let (control, token) = (app.control, app.token.clone());
        std::thread::scope(|s| -> Result<Histogram<u64>> {
            let storm = s.spawn(|| fire_storm(control, &token, n, limit, tx));
            // Sent once every thumbnail request is on its way; an error
            // drops the sender instead (then the join below says why).
            let _ = rx.recv_timeout(GATE_LIMIT + Duration::from_secs(5));
            let t0 = Instant::now();
            cell.queued_ms = wait_until_queued(&mut rest, n, t0).map(|d| d.as_secs_f64() * 1e3);
            let h = measure_opens(&mut rest, cell, o.hv_storm_opens, deadline, stop);
            let out = storm
                .join()
                .map_err(|_| anyhow!("the storm thread panicked"))??;
            cell.thumbnails_ok = out.ok;
            cell.thumbnail_failure_reasons = out.reasons;
            cell.storm_ms = Some(out.wall.as_secs_f64() * 1e3);
            cell.thumbnail_latency = Some(Percentiles::from_histogram(&out.latency));
            Ok(h)
        })?
    } else {
        measure_opens(&mut rest, cell, o.hv_storm_opens, deadline, stop)
    };
    cell.queue_stats = get_json(&mut rest, "/api/v1/queue/stats").ok();
    if !h.is_empty() {
        cell.open_latency = Some(Percentiles::from_histogram(&h));
        let rel = format!("hgrm/hypervisors/{tag}.hgrm");
        write_hgrm(&cfg.common.out_dir, &rel, &h)?;
        cell.hgrm = Some(rel);
    }
    cell.ok = cell.opens > 0
        && cell.open_failures == 0
        && (!cell.storm || cell.thumbnails_ok == cell.thumbnails);
    if cell.storm && cell.queued_ms.is_none() {
        cell.ok = false;
        cell.error = Some(format!(
            "the LOW lane never held all {} thumbnails within {QUEUE_FILL_LIMIT:?}",
            cell.thumbnails
        ));
    }
    Ok(())
}

/// Fills each cell's ratios from the same run's floor and default cells.
pub fn storm_ratios(cells: &mut [StormCell]) {
    let p99 = |c: &StormCell| c.open_latency.map(|p| p.p99_us);
    let floor = cells.iter().find(|c| !c.storm).and_then(p99);
    let default = cells.iter().find(|c| c.storm).and_then(p99);
    for c in cells.iter_mut() {
        if let Some(v) = p99(c) {
            c.p99_vs_floor = floor.and_then(|f| stats::ratio(v, f));
            c.p99_vs_default = if c.storm {
                default.and_then(|d| stats::ratio(v, d))
            } else {
                None
            };
        }
    }
}

/// One storm run: every cell.
fn storm_run(cfg: &HypervisorsConfig, run: usize, stop: &AtomicBool) -> Result<Vec<StormCell>> {
    let o = &cfg.opts;
    let io_timeout = Duration::from_millis(cfg.common.io_timeout_ms);
    let mut vnc = SlowVnc::start(
        Duration::from_millis(o.hv_storm_delay_ms),
        o.hv_storm_framebuffer,
        io_timeout,
    )
    .context("starting the slow VNC server")?;
    let mut cells = Vec::new();
    for spec in storm_cells(&o.hv_storm_reserves) {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let c = storm_cell(cfg, &vnc, &spec, run, stop);
        print_storm_cell(run, &c);
        cells.push(c);
    }
    vnc.stop();
    storm_ratios(&mut cells);
    Ok(cells)
}

fn print_storm_cell(run: usize, c: &StormCell) {
    match (&c.open_latency, &c.error) {
        (Some(p), None) => eprintln!(
            "hypervisors storm run {run}: {:<18} opens {} p50 {} p99 {} max {} µs; thumbnails {}/{} in {} ms; VNC snapshots {}",
            c.name,
            c.opens,
            report::fmt_us(p.p50_us),
            report::fmt_us(p.p99_us),
            report::fmt_us(p.max_us),
            c.thumbnails_ok,
            c.thumbnails,
            c.storm_ms.map_or("—".into(), |v| format!("{v:.0}")),
            c.vnc_connections,
        ),
        (_, e) => eprintln!(
            "hypervisors storm run {run}: {} failed: {}",
            c.name,
            e.as_deref().unwrap_or("no open measured")
        ),
    }
}

// ---------------------------------------------------------------------------
// The vSphere simulator
// ---------------------------------------------------------------------------

/// What the simulator's ready line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcsimReady {
    pub url: String,
    pub thumbprint: String,
    pub debug: SocketAddr,
}

/// `VCSIM_READY url=… port=… thumbprint=… … debug_url=http://…`.
pub fn parse_vcsim_ready(line: &str) -> Option<VcsimReady> {
    let rest = line.trim().strip_prefix("VCSIM_READY ")?;
    let field = |name: &str| {
        rest.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_string)
    };
    Some(VcsimReady {
        url: field("url")?,
        thumbprint: field("thumbprint")?,
        debug: field("debug_url")?
            .trim_start_matches("http://")
            .parse()
            .ok()?,
    })
}

/// `GET /debug/stats` of the simulator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct VcsimStats {
    pub logins: u64,
    pub logouts: u64,
    pub active_sessions: u64,
    pub screens: u64,
    pub sdk_requests: u64,
}

fn vcsim_stats(rest: &mut RestClient) -> Result<VcsimStats, String> {
    let v = get_json(rest, "/debug/stats")?;
    serde_json::from_value(v).map_err(|e| format!("simulator stats: {e}"))
}

/// Builds the simulator (cached by source and Go version) and returns it.
pub fn build_vcsim(go: &Path, source: &Path, dir: &Path) -> Result<PathBuf> {
    let version = Command::new(go).arg("version").output().map_err(|e| {
        anyhow!(
            "{}: {e}: the pool benchmark builds the vSphere simulator with Go: install Debian package golang-go",
            go.display()
        )
    })?;
    if !Path::new(GOVMOMI_SIMULATOR).is_dir() {
        bail!("govmomi's simulator library is not at {GOVMOMI_SIMULATOR}: install Debian package golang-github-vmware-govmomi-dev");
    }
    let text = std::fs::read(source)
        .with_context(|| format!("reading the simulator's source {}", source.display()))?;
    let mut hasher = sha1::Sha1::new();
    hasher.update(&text);
    hasher.update(&version.stdout);
    let hash: String = hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let binary = dir.join(format!("vcsim-{hash}"));
    if binary.is_file() {
        return Ok(binary);
    }
    let temporary = dir.join(format!("vcsim-{hash}.{}.tmp", std::process::id()));
    let log = dir.join(format!("build-{}.log", std::process::id()));
    eprintln!(
        "hypervisors: building the vSphere simulator (go build, up to {VCSIM_BUILD_TIMEOUT:?})"
    );
    let mut child = Command::new(go)
        .args(["build", "-o"])
        .arg(std::path::absolute(&temporary)?)
        .arg(std::path::absolute(source)?)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", std::path::absolute(dir.join("gocache"))?)
        .env("GOFLAGS", "")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("spawning go build")?;
    let deadline = Instant::now() + VCSIM_BUILD_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("go build of the simulator took more than {VCSIM_BUILD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if !status.success() {
        bail!(
            "go build of {} failed ({status}): {}",
            source.display(),
            child::log_tail(&log, 2000)
        );
    }
    std::fs::rename(&temporary, &binary)?;
    let _ = std::fs::remove_file(&log);
    Ok(binary)
}

/// A running simulator (stopped by PID).
pub struct Vcsim {
    pub ready: VcsimReady,
    pub password_file: PathBuf,
    child: ChildProc,
}

impl Vcsim {
    pub fn start(binary: &Path, dir: &Path, log: &Path, startup: Duration) -> Result<Vcsim> {
        let dir = std::path::absolute(dir)?;
        std::fs::create_dir_all(dir.join("certs"))?;
        let password_file = dir.join("password");
        crate::common::write_private(&password_file, format!("{VCSIM_PASSWORD}\n"))?;
        // env(1) execs the simulator in place (same PID), with its
        // datastore directories in our own directory.
        let args: Vec<String> = vec![
            format!("TMPDIR={}", dir.display()),
            binary.display().to_string(),
            "-listen".into(),
            "127.0.0.1:0".into(),
            "-vnc".into(),
            "127.0.0.1:1".into(),
            "-cert-dir".into(),
            dir.join("certs").display().to_string(),
            "-username".into(),
            VCSIM_USERNAME.into(),
            "-password".into(),
            VCSIM_PASSWORD.into(),
        ];
        let mut child = ChildProc::spawn("vcsim", Path::new("/usr/bin/env"), &args, log)?;
        let ready = child
            .wait_for_line(startup, parse_vcsim_ready)
            .context("waiting for the simulator's VCSIM_READY line")?;
        Ok(Vcsim {
            ready,
            password_file,
            child,
        })
    }

    pub fn stop(&mut self) {
        self.child.stop();
    }
}

// ---------------------------------------------------------------------------
// Pool
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
pub struct PoolRun {
    pub ok: bool,
    pub error: Option<String>,
    /// Requests planned (users × (1 + thumbnails)), answered 200, failed.
    pub requests: u64,
    pub requests_ok: u64,
    pub errors: u64,
    pub status_503: u64,
    pub failure_reasons: Reasons,
    pub wall_s: Option<f64>,
    /// Every request, the VM lists, the thumbnails; µs.
    pub latency: Option<Percentiles>,
    pub list_latency: Option<Percentiles>,
    pub thumbnail_latency: Option<Percentiles>,
    /// VMs the list gave (powered on).
    pub vms: usize,
    /// The simulator's counters over the run.
    pub logins: u64,
    pub logouts_during_run: u64,
    pub screens: u64,
    pub sdk_requests: u64,
    /// Most live API sessions seen (polled every 10 ms).
    pub peak_active_sessions: u64,
    /// Live API sessions after the run, and after the appliance stopped.
    pub active_after_run: Option<u64>,
    pub active_after_stop: Option<u64>,
    /// One API session per request.
    pub naive_sessions: u64,
    /// logins / naive_sessions.
    pub logins_vs_naive: Option<f64>,
    /// `GET /api/v1/hypervisors` after the run (pool figures).
    pub hypervisors: Option<serde_json::Value>,
    pub appliance_log: Option<String>,
}

impl PoolRun {
    fn new(requests: u64) -> PoolRun {
        PoolRun {
            ok: false,
            error: None,
            requests,
            requests_ok: 0,
            errors: 0,
            status_503: 0,
            failure_reasons: Reasons::default(),
            wall_s: None,
            latency: None,
            list_latency: None,
            thumbnail_latency: None,
            vms: 0,
            logins: 0,
            logouts_during_run: 0,
            screens: 0,
            sdk_requests: 0,
            peak_active_sessions: 0,
            active_after_run: None,
            active_after_stop: None,
            naive_sessions: requests,
            logins_vs_naive: None,
            hypervisors: None,
            appliance_log: None,
        }
    }
}

/// What the users did, merged.
struct UsersOutcome {
    ok: u64,
    failed: u64,
    status_503: u64,
    reasons: Reasons,
    all: Histogram<u64>,
    lists: Histogram<u64>,
    thumbnails: Histogram<u64>,
    vms: usize,
}

impl UsersOutcome {
    fn new() -> UsersOutcome {
        UsersOutcome {
            ok: 0,
            failed: 0,
            status_503: 0,
            reasons: Reasons::default(),
            all: new_histogram(),
            lists: new_histogram(),
            thumbnails: new_histogram(),
            vms: 0,
        }
    }

    fn record(&mut self, list: bool, d: Duration, r: Result<(), String>) {
        let us = micros(d);
        self.all.saturating_record(us);
        if list {
            self.lists.saturating_record(us);
        } else {
            self.thumbnails.saturating_record(us);
        }
        match r {
            Ok(()) => self.ok += 1,
            Err(e) => {
                self.failed += 1;
                if e.starts_with("HTTP 503") {
                    self.status_503 += 1;
                }
                self.reasons.add(&e);
            }
        }
    }

    fn merge(&mut self, o: &UsersOutcome) {
        self.ok += o.ok;
        self.failed += o.failed;
        self.status_503 += o.status_503;
        self.reasons.merge(&o.reasons);
        let _ = self.all.add(&o.all);
        let _ = self.lists.add(&o.lists);
        let _ = self.thumbnails.add(&o.thumbnails);
        self.vms = self.vms.max(o.vms);
    }
}

/// Where and how the users work.
struct UserPlan<'a> {
    control: SocketAddr,
    token: &'a str,
    thumbnails: usize,
    connections: usize,
    io_timeout: Duration,
    deadline: Instant,
    gate: &'a Gate,
    stop: &'a AtomicBool,
}

/// `GET /api/v1/vms?hypervisor=…`: the powered-on VMs' ids.
fn list_vms(rest: &mut RestClient) -> Result<Vec<String>, String> {
    let v = get_json(rest, &format!("/api/v1/vms?hypervisor={POOL_HYPERVISOR}"))?;
    let ids: Vec<String> = v["vms"]
        .as_array()
        .ok_or("no vms array")?
        .iter()
        .filter(|vm| vm["power"] == "on")
        .filter_map(|vm| vm["id"].as_str().map(str::to_string))
        .collect();
    if ids.is_empty() {
        return Err("the list has no powered-on VM".into());
    }
    Ok(ids)
}

/// One user: its VM list, then its thumbnails over its connections.
fn run_user(user: usize, plan: &UserPlan) -> UsersOutcome {
    let mut out = UsersOutcome::new();
    let mut rest = RestClient::new(
        plan.control,
        plan.token,
        HttpMode::KeepAlive,
        plan.io_timeout,
    );
    let pre = rest.preconnect();
    plan.gate.arrive();
    let t = Instant::now();
    let listed = pre
        .map_err(|e| e.to_string())
        .and_then(|()| list_vms(&mut rest));
    let vms = match listed {
        Ok(v) => {
            out.record(true, t.elapsed(), Ok(()));
            v
        }
        Err(e) => {
            out.record(true, t.elapsed(), Err(format!("VM list: {e}")));
            out.failed += plan.thumbnails as u64;
            out.reasons
                .add_n("no VM list: thumbnails not asked", plan.thumbnails as u64);
            return out;
        }
    };
    out.vms = vms.len();
    let next = AtomicUsize::new(0);
    let parts: Vec<UsersOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..plan.connections)
            .filter_map(|c| {
                let (next, vms) = (&next, &vms);
                std::thread::Builder::new()
                    .name(format!("user{user}-{c}"))
                    .stack_size(CLIENT_STACK_BYTES)
                    .spawn_scoped(s, move || user_connection(user, plan, next, vms))
                    .ok()
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let mut asked = 0;
    for p in &parts {
        out.merge(p);
        asked += p.ok + p.failed;
    }
    // Thumbnails no connection asked for (deadline, stop, no thread).
    let missing = (plan.thumbnails as u64).saturating_sub(asked);
    if missing > 0 {
        out.failed += missing;
        out.reasons
            .add_n("not asked (deadline, stop or no thread)", missing);
    }
    out
}

fn user_connection(
    user: usize,
    plan: &UserPlan,
    next: &AtomicUsize,
    vms: &[String],
) -> UsersOutcome {
    let mut out = UsersOutcome::new();
    let mut rest = RestClient::new(
        plan.control,
        plan.token,
        HttpMode::KeepAlive,
        plan.io_timeout,
    );
    loop {
        if Instant::now() >= plan.deadline || plan.stop.load(Ordering::Relaxed) {
            break;
        }
        let i = next.fetch_add(1, Ordering::SeqCst);
        if i >= plan.thumbnails {
            break;
        }
        let (vm, size) = pool_plan(user * plan.thumbnails + i, vms.len());
        let t = Instant::now();
        let r = one_thumbnail(&mut rest, &thumbnail_path(&vms[vm], size));
        out.record(false, t.elapsed(), r);
    }
    out
}

/// Samples the simulator's live sessions until `done`; the peak.
fn poll_peak(debug: SocketAddr, done: &AtomicBool, deadline: Instant) -> u64 {
    let mut rest = RestClient::new(debug, "", HttpMode::KeepAlive, Duration::from_secs(5));
    let mut peak = 0;
    while !done.load(Ordering::SeqCst) && Instant::now() < deadline {
        if let Ok(s) = vcsim_stats(&mut rest) {
            peak = peak.max(s.active_sessions);
        }
        std::thread::sleep(SESSION_POLL);
    }
    peak
}

/// One pool run: fresh simulator, fresh appliance, all users at once.
fn pool_run(cfg: &HypervisorsConfig, binary: &Path, run: usize, stop: &AtomicBool) -> PoolRun {
    let o = &cfg.opts;
    let requests = (o.hv_pool_users * (1 + o.hv_pool_thumbnails)) as u64;
    let mut out = PoolRun::new(requests);
    let dir = cfg
        .common
        .out_dir
        .join("hypervisors")
        .join(format!("pool-r{run}"));
    let logs = cfg.common.out_dir.join("logs");
    let startup = Duration::from_millis(cfg.common.startup_timeout_ms);
    let mut sim = match Vcsim::start(
        binary,
        &dir.join("vcsim"),
        &logs.join(format!("pool-r{run}-vcsim.log")),
        startup,
    ) {
        Ok(s) => s,
        Err(e) => {
            out.error = Some(format!("simulator: {e:#}"));
            return out;
        }
    };
    let limit_ms = o.hv_pool_time_limit_ms;
    let settings = HvSettings {
        io: o.hv_io.clone(),
        critical_reserve: 1.min(o.hv_pool_size.saturating_sub(1)),
        max_queue_depth: (requests as usize * 2).max(1000),
        queue_timeout_ms: limit_ms,
        request_timeout_ms: limit_ms.min(600_000),
        hypervisors: vsphere_hypervisor(
            &sim.ready.url,
            &sim.ready.thumbprint,
            &sim.password_file,
            o.hv_pool_size,
        ),
    };
    let log = logs.join(format!("pool-r{run}-appliance.log"));
    match start_appliance(&cfg.common.consolegate, &dir, &settings, &log, startup) {
        Ok(mut app) => {
            if let Err(e) = measure_pool(cfg, &app, &sim, &mut out, run, stop) {
                out.error = Some(format!("{e:#}"));
            }
            if app.has_exited() {
                out.error = Some(format!(
                    "appliance exited: {}",
                    child::log_tail(app.log_path(), 600)
                ));
            }
            out.appliance_log = Some(relative(app.log_path(), &cfg.common.out_dir));
            app.stop();
            let mut debug = RestClient::new(
                sim.ready.debug,
                "",
                HttpMode::KeepAlive,
                Duration::from_secs(5),
            );
            out.active_after_stop = vcsim_stats(&mut debug).ok().map(|s| s.active_sessions);
        }
        Err(e) => out.error = Some(format!("start: {e:#}")),
    }
    sim.stop();
    out.ok = out.error.is_none() && out.errors == 0 && out.requests_ok == out.requests;
    out
}

fn measure_pool(
    cfg: &HypervisorsConfig,
    app: &HvAppliance,
    sim: &Vcsim,
    out: &mut PoolRun,
    run: usize,
    stop: &AtomicBool,
) -> Result<()> {
    let o = &cfg.opts;
    let mut debug = RestClient::new(
        sim.ready.debug,
        "",
        HttpMode::KeepAlive,
        Duration::from_secs(5),
    );
    let before = vcsim_stats(&mut debug).map_err(|e| anyhow!("simulator stats: {e}"))?;
    let limit = Duration::from_millis(o.hv_pool_time_limit_ms);
    let deadline = Instant::now() + limit;
    let gate = Gate::default();
    let done = AtomicBool::new(false);
    let plan = UserPlan {
        control: app.control,
        token: &app.token,
        thumbnails: o.hv_pool_thumbnails,
        connections: o.hv_pool_user_connections,
        io_timeout: limit,
        deadline,
        gate: &gate,
        stop,
    };
    let (users, peak, wall) = std::thread::scope(|s| -> Result<_> {
        let debug_addr = sim.ready.debug;
        let done = &done;
        let peak = s.spawn(move || poll_peak(debug_addr, done, deadline));
        // Held until every user has connected; dropped on every path.
        let guard = gate.lock.write().unwrap_or_else(|p| p.into_inner());
        let mut handles = Vec::new();
        for u in 0..o.hv_pool_users {
            let plan = &plan;
            let h = std::thread::Builder::new()
                .name(format!("user{u}"))
                .stack_size(CLIENT_STACK_BYTES)
                .spawn_scoped(s, move || run_user(u, plan));
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    done.store(true, Ordering::SeqCst);
                    bail!("spawning user {u}: {e}");
                }
            }
        }
        gate.wait_ready(o.hv_pool_users);
        drop(guard);
        let t0 = Instant::now();
        let mut users = UsersOutcome::new();
        for h in handles {
            let r = h.join().map_err(|_| anyhow!("a user thread panicked"))?;
            users.merge(&r);
        }
        let wall = t0.elapsed();
        done.store(true, Ordering::SeqCst);
        let peak = peak.join().map_err(|_| anyhow!("the poller panicked"))?;
        Ok((users, peak, wall))
    })?;
    let after = vcsim_stats(&mut debug).map_err(|e| anyhow!("simulator stats: {e}"))?;
    fill_pool_run(out, &users, peak, wall, &before, &after);
    let mut rest = app.rest(Duration::from_millis(cfg.common.io_timeout_ms));
    out.hypervisors = get_json(&mut rest, "/api/v1/hypervisors").ok();
    if !users.all.is_empty() {
        let rel = format!("hgrm/hypervisors/pool-r{run}.hgrm");
        write_hgrm(&cfg.common.out_dir, &rel, &users.all)?;
    }
    Ok(())
}

fn fill_pool_run(
    out: &mut PoolRun,
    users: &UsersOutcome,
    peak: u64,
    wall: Duration,
    before: &VcsimStats,
    after: &VcsimStats,
) {
    out.requests_ok = users.ok;
    out.errors = out.requests.saturating_sub(users.ok);
    out.status_503 = users.status_503;
    out.failure_reasons = users.reasons.clone();
    out.wall_s = Some(wall.as_secs_f64());
    let p = |h: &Histogram<u64>| (!h.is_empty()).then(|| Percentiles::from_histogram(h));
    out.latency = p(&users.all);
    out.list_latency = p(&users.lists);
    out.thumbnail_latency = p(&users.thumbnails);
    out.vms = users.vms;
    out.logins = after.logins - before.logins.min(after.logins);
    out.logouts_during_run = after.logouts - before.logouts.min(after.logouts);
    out.screens = after.screens - before.screens.min(after.screens);
    out.sdk_requests = after.sdk_requests - before.sdk_requests.min(after.sdk_requests);
    out.peak_active_sessions = peak.max(after.active_sessions);
    out.active_after_run = Some(after.active_sessions);
    out.logins_vs_naive = stats::ratio(out.logins as f64, out.naive_sessions as f64);
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

/// Medians across runs of one storm cell.
#[derive(Debug, Clone, Serialize)]
pub struct StormMedian {
    pub name: String,
    pub runs_ok: usize,
    pub opens: u64,
    pub open_latency: Option<Percentiles>,
    pub storm_ms: Option<f64>,
    pub thumbnails: usize,
    pub thumbnails_ok: usize,
    pub vnc_connections: u64,
    pub p99_vs_floor: Option<f64>,
    pub p99_vs_default: Option<f64>,
}

/// Medians across pool runs.
#[derive(Debug, Clone, Serialize)]
pub struct PoolMedian {
    pub runs_ok: usize,
    pub requests: u64,
    pub errors_total: u64,
    pub status_503_total: u64,
    pub wall_s: Option<f64>,
    pub latency: Option<Percentiles>,
    pub logins: Option<f64>,
    pub max_logins: u64,
    pub peak_active_sessions: Option<f64>,
    pub max_peak_active_sessions: u64,
    pub screens: Option<f64>,
    pub sdk_requests: Option<f64>,
    pub naive_sessions: u64,
    pub logins_vs_naive: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub value: Option<f64>,
    pub met: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct HypervisorsReport {
    #[serde(flatten)]
    pub run: RunInfo,
    pub machine_at_end: Machine,
    pub config: HypervisorsConfig,
    pub consolegate: PathBuf,
    pub errors: Vec<String>,
    pub storm_runs: Vec<Vec<StormCell>>,
    pub storm_median: Vec<StormMedian>,
    pub pool_runs: Vec<PoolRun>,
    pub pool_median: Option<PoolMedian>,
    pub targets: Vec<Target>,
}

fn median_u(values: impl Iterator<Item = u64>) -> Option<f64> {
    let v: Vec<f64> = values.map(|x| x as f64).collect();
    stats::median(&v)
}

pub fn storm_medians(runs: &[Vec<StormCell>]) -> Vec<StormMedian> {
    let mut names: Vec<String> = Vec::new();
    for c in runs.iter().flatten() {
        if !names.contains(&c.name) {
            names.push(c.name.clone());
        }
    }
    names
        .into_iter()
        .map(|name| {
            let cells: Vec<&StormCell> = runs.iter().flatten().filter(|c| c.name == name).collect();
            let ok: Vec<&&StormCell> = cells.iter().filter(|c| c.ok).collect();
            let lat: Vec<Percentiles> = ok.iter().filter_map(|c| c.open_latency).collect();
            let f = |g: &dyn Fn(&StormCell) -> Option<f64>| {
                stats::median(&ok.iter().filter_map(|c| g(c)).collect::<Vec<_>>())
            };
            StormMedian {
                runs_ok: ok.len(),
                opens: cells.iter().map(|c| c.opens).sum(),
                open_latency: Percentiles::median_of(&lat),
                storm_ms: f(&|c| c.storm_ms),
                thumbnails: cells.iter().map(|c| c.thumbnails).sum(),
                thumbnails_ok: cells.iter().map(|c| c.thumbnails_ok).sum(),
                vnc_connections: cells.iter().map(|c| c.vnc_connections).sum(),
                p99_vs_floor: f(&|c| c.p99_vs_floor),
                p99_vs_default: f(&|c| c.p99_vs_default),
                name,
            }
        })
        .collect()
}

pub fn pool_median(runs: &[PoolRun]) -> Option<PoolMedian> {
    if runs.is_empty() {
        return None;
    }
    let ok: Vec<&PoolRun> = runs.iter().filter(|r| r.error.is_none()).collect();
    let lat: Vec<Percentiles> = ok.iter().filter_map(|r| r.latency).collect();
    Some(PoolMedian {
        runs_ok: runs.iter().filter(|r| r.ok).count(),
        requests: runs.iter().map(|r| r.requests).sum(),
        errors_total: runs.iter().map(|r| r.errors).sum(),
        status_503_total: runs.iter().map(|r| r.status_503).sum(),
        wall_s: stats::median(&ok.iter().filter_map(|r| r.wall_s).collect::<Vec<_>>()),
        latency: Percentiles::median_of(&lat),
        logins: median_u(ok.iter().map(|r| r.logins)),
        max_logins: ok.iter().map(|r| r.logins).max().unwrap_or(0),
        peak_active_sessions: median_u(ok.iter().map(|r| r.peak_active_sessions)),
        max_peak_active_sessions: ok.iter().map(|r| r.peak_active_sessions).max().unwrap_or(0),
        screens: median_u(ok.iter().map(|r| r.screens)),
        sdk_requests: median_u(ok.iter().map(|r| r.sdk_requests)),
        naive_sessions: runs.first().map_or(0, |r| r.naive_sessions),
        logins_vs_naive: stats::median(
            &ok.iter()
                .filter_map(|r| r.logins_vs_naive)
                .collect::<Vec<_>>(),
        ),
    })
}

/// Open p99 target of the issue, µs.
pub const OPEN_P99_TARGET_US: f64 = 50_000.0;

pub fn targets(storm: &[StormMedian], pool: Option<&PoolMedian>, pool_size: usize) -> Vec<Target> {
    let mut t = Vec::new();
    if let Some(d) = storm
        .iter()
        .find(|m| m.name.starts_with("critical_reserve="))
    {
        let v = d.open_latency.map(|p| p.p99_us / 1000.0);
        t.push(Target {
            target: format!("console open p99 ≤ 50 ms under the storm ({})", d.name),
            value: v,
            met: v.map(|ms| ms * 1000.0 <= OPEN_P99_TARGET_US),
        });
    }
    if let Some(p) = pool {
        // The pool's sessions, plus the one the WaitForUpdatesEx follower
        // (live vm_status_changed) keeps for itself.
        let logins_max = pool_size as u64 + 1;
        t.push(Target {
            target: format!("hypervisor logins ≤ pool_size + 1 ({logins_max}), worst run"),
            value: Some(p.max_logins as f64),
            met: Some(p.runs_ok > 0 && p.max_logins <= logins_max),
        });
        t.push(Target {
            target: "zero errors (and zero 503s) to users, all runs".into(),
            value: Some(p.errors_total as f64),
            met: Some(p.errors_total == 0 && p.status_503_total == 0),
        });
    }
    t
}

fn ms(us: f64) -> String {
    format!("{:.1}", us / 1000.0)
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "—".to_string(), f)
}

pub fn render_text(r: &HypervisorsReport) -> String {
    let o = &r.config.opts;
    let mut out = String::new();
    out.push_str(&format!(
        "Hypervisor layer benchmarks (issue 10), `consolegate run` ({}) on this machine: {}.\n\
         Load at start: loadavg {}, CPU pressure (some, avg60) {}; at end: loadavg {}.\n\n",
        o.hv_io,
        r.run.machine.one_line(),
        r.run.machine.loadavg_at_start,
        r.run
            .machine
            .cpu_pressure_some_avg60_at_start
            .map_or("n/a".into(), |p| format!("{p:.1}%")),
        r.machine_at_end.loadavg_at_start,
    ));
    if !r.storm_median.is_empty() {
        out.push_str(&render_storm(r));
    }
    if let Some(p) = &r.pool_median {
        out.push_str(&render_pool(r, p));
    }
    if !r.targets.is_empty() {
        out.push_str("\nTargets:\n\n");
        let rows: Vec<Vec<String>> = r
            .targets
            .iter()
            .map(|t| {
                vec![
                    t.target.clone(),
                    opt(t.value, |v| format!("{v:.1}")),
                    match t.met {
                        Some(true) => "met".into(),
                        Some(false) => "MISSED".into(),
                        None => "n/a".into(),
                    },
                ]
            })
            .collect();
        out.push_str(&report::markdown_table_with(
            &["target", "value", ""],
            &rows,
            &[0, 2],
        ));
    }
    for e in &r.errors {
        out.push_str(&format!("- error: {e}\n"));
    }
    out
}

fn render_storm(r: &HypervisorsReport) -> String {
    let o = &r.config.opts;
    let (fw, fh) = o.hv_storm_framebuffer;
    let mut out = format!(
        "Console open under a thumbnail storm: static hypervisor, max_concurrent = {}, its VM a VNC server \
         that greets each connection after {} ms, then serves {fw}x{fh} (RFB 3.8, None, Raw). {} thumbnail \
         requests at once, each its own size (so {} real snapshots queue on the LOW lane); then up to {} \
         console opens one after another (POST /api/v1/vms/{{vm}}/console → 201, timed) while thumbnails \
         still wait. Medians of {} runs (ms); ratios of p99 within a run, then their median.\n\n",
        o.hv_storm_max_concurrent,
        o.hv_storm_delay_ms,
        o.hv_storm_thumbnails,
        o.hv_storm_thumbnails,
        o.hv_storm_opens,
        o.hv_runs
    );
    let rows: Vec<Vec<String>> = r
        .storm_median
        .iter()
        .map(|m| {
            let p = m.open_latency;
            vec![
                m.name.clone(),
                format!("{}/{}", m.runs_ok, o.hv_runs),
                m.opens.to_string(),
                opt(p.map(|p| p.p50_us), ms),
                opt(p.map(|p| p.p99_us), ms),
                opt(p.map(|p| p.max_us), ms),
                opt(m.p99_vs_floor, |v| format!("{v:.1}×")),
                opt(m.p99_vs_default, |v| format!("{v:.1}×")),
                if m.thumbnails > 0 {
                    format!("{}/{}", m.thumbnails_ok, m.thumbnails)
                } else {
                    "—".into()
                },
                opt(m.storm_ms, |v| format!("{v:.0}")),
                m.vnc_connections.to_string(),
            ]
        })
        .collect();
    out.push_str(&report::markdown_table_with(
        &[
            "cell",
            "runs ok",
            "opens",
            "open p50",
            "open p99",
            "open max",
            "p99 vs floor",
            "p99 vs default",
            "thumbnails ok",
            "storm ms",
            "VNC snapshots",
        ],
        &rows,
        &[0],
    ));
    for (i, run) in r.storm_runs.iter().enumerate() {
        for c in run {
            if let Some(e) = &c.error {
                out.push_str(&format!("- run {} {}: {e}\n", i + 1, c.name));
            }
            for (reason, n) in c
                .open_failure_reasons
                .0
                .iter()
                .chain(&c.thumbnail_failure_reasons.0)
            {
                out.push_str(&format!("- run {} {}: {n} × {reason}\n", i + 1, c.name));
            }
        }
    }
    out
}

fn render_pool(r: &HypervisorsReport, p: &PoolMedian) -> String {
    let o = &r.config.opts;
    let mut out = format!(
        "\nPool economy against the govmomi vSphere simulator: {} users at once, each 1 VM list + {} thumbnails \
         over {} connections = {} requests per run, one vsphere hypervisor with pool_size = max_concurrent = {}. \
         The simulator has 4 VMs: every thumbnail asks its own size, so each is a real /screen fetch. \
         Medians of {} runs.\n\n",
        o.hv_pool_users,
        o.hv_pool_thumbnails,
        o.hv_pool_user_connections,
        o.hv_pool_users * (1 + o.hv_pool_thumbnails),
        o.hv_pool_size,
        o.hv_runs
    );
    let row = vec![
        format!("{}/{}", p.runs_ok, o.hv_runs),
        opt(p.wall_s, |v| format!("{v:.1}")),
        opt(p.latency.map(|l| l.p50_us), ms),
        opt(p.latency.map(|l| l.p99_us), ms),
        format!("{} ({} × 503)", p.errors_total, p.status_503_total),
        opt(p.logins, |v| format!("{v:.0}")),
        opt(p.peak_active_sessions, |v| format!("{v:.0}")),
        p.naive_sessions.to_string(),
        opt(p.logins_vs_naive, |v| format!("{:.1}×", 1.0 / v)),
        opt(p.screens, |v| format!("{v:.0}")),
        opt(p.sdk_requests, |v| format!("{v:.0}")),
    ];
    out.push_str(&report::markdown_table_with(
        &[
            "runs ok",
            "wall s",
            "p50 ms",
            "p99 ms",
            "errors",
            "logins",
            "peak sessions",
            "naive sessions",
            "fewer sessions",
            "screens",
            "SDK requests",
        ],
        &[row],
        &[],
    ));
    for (i, run) in r.pool_runs.iter().enumerate() {
        if let Some(e) = &run.error {
            out.push_str(&format!("- pool run {}: {e}\n", i + 1));
        }
        for (reason, n) in &run.failure_reasons.0 {
            out.push_str(&format!("- pool run {}: {n} × {reason}\n", i + 1));
        }
    }
    out
}

pub fn run(cfg: HypervisorsConfig, stop: Arc<AtomicBool>) -> Result<HypervisorsReport> {
    cfg.validate()?;
    let started = unix_now();
    let machine = Machine::describe();
    let out_dir = cfg.common.out_dir.clone();
    std::fs::create_dir_all(&out_dir)?;
    let o = &cfg.opts;
    let mut errors = Vec::new();
    let mut storm_runs = Vec::new();
    let mut pool_runs = Vec::new();
    let vcsim = if o.hv_parts.contains(&Part::Pool) {
        match build_vcsim(&o.hv_go, &o.hv_vcsim_source, &o.hv_vcsim_dir) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("hypervisors: pool: {e:#}");
                errors.push(format!("pool: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    for run in 1..=o.hv_runs {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if o.hv_parts.contains(&Part::Storm) {
            match storm_run(&cfg, run, &stop) {
                Ok(cells) => storm_runs.push(cells),
                Err(e) => errors.push(format!("storm run {run}: {e:#}")),
            }
        }
        if let Some(binary) = &vcsim {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let p = pool_run(&cfg, binary, run, &stop);
            print_pool_run(run, &p);
            pool_runs.push(p);
        }
    }
    let storm_median = storm_medians(&storm_runs);
    let pool_median = pool_median(&pool_runs);
    let targets = targets(&storm_median, pool_median.as_ref(), o.hv_pool_size);
    let report = HypervisorsReport {
        run: RunInfo::ended("hypervisors", started, &stop, machine),
        machine_at_end: Machine::describe(),
        consolegate: cfg.common.consolegate.clone(),
        config: cfg,
        errors,
        storm_runs,
        storm_median,
        pool_runs,
        pool_median,
        targets,
    };
    let text = render_text(&report);
    crate::common::write_report(&out_dir, "hypervisors", &text, &report)?;
    Ok(report)
}

fn print_pool_run(run: usize, p: &PoolRun) {
    eprintln!(
        "hypervisors pool run {run}: {}/{} ok ({} × 503) in {} s; p50 {} p99 {} ms; logins {} (naive {}), peak sessions {}, screens {}{}",
        p.requests_ok,
        p.requests,
        p.status_503,
        opt(p.wall_s, |v| format!("{v:.1}")),
        opt(p.latency.map(|l| l.p50_us), ms),
        opt(p.latency.map(|l| l.p99_us), ms),
        p.logins,
        p.naive_sessions,
        p.peak_active_sessions,
        p.screens,
        p.error.as_deref().map(|e| format!("; error: {e}")).unwrap_or_default(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Speaks the client side the appliance's snapshot speaks (3.8, None,
    /// shared, SetPixelFormat RGB in bits 0/8/16, Raw, one request).
    fn snapshot_client(addr: SocketAddr) -> (u16, u16, Vec<u8>) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut v = [0u8; 12];
        s.read_exact(&mut v).unwrap();
        assert_eq!(&v, b"RFB 003.008\n");
        s.write_all(b"RFB 003.008\n").unwrap();
        let mut sec = [0u8; 2];
        s.read_exact(&mut sec).unwrap();
        assert_eq!(sec, [1, 1]);
        s.write_all(&[1]).unwrap();
        let mut result = [0u8; 4];
        s.read_exact(&mut result).unwrap();
        assert_eq!(result, [0; 4]);
        s.write_all(&[1]).unwrap();
        let mut init = [0u8; 24];
        s.read_exact(&mut init).unwrap();
        let (w, h) = (
            u16::from_be_bytes([init[0], init[1]]),
            u16::from_be_bytes([init[2], init[3]]),
        );
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
        let mut name = vec![0u8; name_len as usize];
        s.read_exact(&mut name).unwrap();
        let mut msg = vec![
            0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 0, 8, 16, 0, 0, 0,
        ];
        msg.extend_from_slice(&[2, 0, 0, 1, 0, 0, 0, 0]);
        msg.extend_from_slice(&[3, 0, 0, 0, 0, 0]);
        msg.extend_from_slice(&w.to_be_bytes());
        msg.extend_from_slice(&h.to_be_bytes());
        s.write_all(&msg).unwrap();
        let mut head = [0u8; 16];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head[..4], &[0, 0, 0, 1]);
        assert_eq!(&head[12..16], &[0, 0, 0, 0], "Raw");
        let mut pixels = vec![0u8; usize::from(w) * usize::from(h) * 4];
        s.read_exact(&mut pixels).unwrap();
        (w, h, pixels)
    }

    #[test]
    fn slow_vnc_waits_then_serves_bars_in_the_clients_format() {
        let delay = Duration::from_millis(60);
        let mut vnc = SlowVnc::start(delay, (16, 4), Duration::from_secs(5)).unwrap();
        let t = Instant::now();
        let (w, h, px) = snapshot_client(vnc.addr());
        assert!(t.elapsed() >= delay);
        assert_eq!((w, h), (16, 4));
        // Column 0 white, column 2 yellow (bar 1: R+G) as R, G, B, pad.
        assert_eq!(&px[..4], &[255, 255, 255, 0]);
        assert_eq!(&px[8..12], &[255, 255, 0, 0]);
        // Column 10 red (bar 5) in every row.
        for row in 0..4 {
            let i = (row * 16 + 10) * 4;
            assert_eq!(&px[i..i + 3], &[255, 0, 0]);
        }
        // Stopping joins the connection thread: the counts are final.
        vnc.stop();
        assert_eq!(vnc.greeted.load(Ordering::SeqCst), 1);
        assert_eq!(vnc.updates.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn pixel_formats_and_sizes() {
        let f = PixelFormat::parse(&SERVER_FORMAT);
        assert_eq!(f.encode([1, 2, 3]), [3, 2, 1, 0]);
        let be = PixelFormat {
            big_endian: true,
            ..f
        };
        assert_eq!(be.encode([1, 2, 3]), [0, 1, 2, 3]);
        assert_eq!(parse_size("320x240"), Ok((320, 240)));
        assert!(parse_size("0x10").is_err() && parse_size("10").is_err());
        assert_eq!(full_update((2, 1), &f).len(), 16 + 8);
    }

    #[test]
    fn every_thumbnail_asks_its_own_size() {
        let mut seen = std::collections::HashSet::new();
        for g in 0..700 {
            let (vm, size) = pool_plan(g, 4);
            assert!(vm < 4);
            assert!(seen.insert((vm, thumbnail_width(size))));
        }
        assert_eq!(
            thumbnail_path("lab:slow", 3),
            "/api/v1/vms/lab:slow/thumbnail?width=35&height=1024"
        );
    }

    #[test]
    fn config_renders_the_hypervisor_and_queue() {
        let s = HvSettings {
            io: "epoll".into(),
            critical_reserve: 0,
            max_queue_depth: 1000,
            queue_timeout_ms: 5000,
            request_timeout_ms: 6000,
            hypervisors: static_hypervisor("127.0.0.1:5901".parse().unwrap(), 4),
        };
        let t = render_config(&s, "tok", (20_000, 20_199), Path::new("/tmp/s"));
        for want in [
            "[control]\nlisten = \"127.0.0.1:0\"\nrequest_timeout_ms = 6000\n",
            "range = \"20000-20199\"\nstate_dir = \"/tmp/s\"",
            "token = \"tok\"\nrole = \"admin\"",
            "[dataplane]\nio = \"epoll\"",
            "[demo]\nenabled = false",
            "bind_origin = false",
            "[queue]\ncritical_reserve = 0\nmax_queue_depth = 1000\nqueue_timeout_ms = 5000\n",
            "[[hypervisors]]\nkind = \"static\"\nid = \"lab\"\nmax_concurrent = 4\n",
            "vms = [{ id = \"slow\", host = \"127.0.0.1\", port = 5901 }]",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        let vs = vsphere_hypervisor("https://127.0.0.1:1/sdk", "AA:BB", Path::new("/p"), 4);
        for want in [
            "kind = \"vsphere\"\nid = \"vc1\"\nurl = \"https://127.0.0.1:1/sdk\"\nusername = \"user\"",
            "password_file = \"/p\"\nthumbprint = \"AA:BB\"\npool_size = 4\nmax_concurrent = 4\n",
        ] {
            assert!(vs.contains(want), "missing {want:?} in\n{vs}");
        }
    }

    #[test]
    fn ready_line_and_queue_stats() {
        let r = parse_vcsim_ready(
            "VCSIM_READY url=https://127.0.0.1:4431/sdk port=4431 thumbprint=AA:BB thumbprint_sha256=CC webmks_port=1 webmks_thumbprint=DD debug_url=http://127.0.0.1:999",
        )
        .unwrap();
        assert_eq!(r.url, "https://127.0.0.1:4431/sdk");
        assert_eq!(r.thumbprint, "AA:BB");
        assert_eq!(r.debug, "127.0.0.1:999".parse().unwrap());
        assert!(parse_vcsim_ready("something else").is_none());
        let stats: serde_json::Value = serde_json::from_str(
            r#"{"queues":{"lab":{"max_concurrent":4,"running":3,"lanes":[{"lane":"critical","total_requests":5,"in_queue":0},{"lane":"low","total_requests":200,"in_queue":190}]}}}"#,
        )
        .unwrap();
        assert_eq!(low_lane(&stats), Some((200, 190)));
    }

    fn cell(name: &str, storm: bool, p99_ms: f64) -> StormCell {
        let mut c = StormCell::new(name.into(), 1, storm);
        c.ok = true;
        c.opens = 10;
        c.open_latency = Some(Percentiles::from_array([
            p99_ms * 500.0,
            p99_ms * 800.0,
            p99_ms * 1000.0,
            p99_ms * 1000.0,
            p99_ms * 1200.0,
        ]));
        c
    }

    #[test]
    fn ratios_medians_and_targets() {
        let run = |a: f64, b: f64, f: f64| {
            let mut v = vec![
                cell("critical_reserve=1", true, a),
                cell("critical_reserve=0", true, b),
                cell("no storm", false, f),
            ];
            storm_ratios(&mut v);
            v
        };
        let runs = vec![
            run(4.0, 40.0, 2.0),
            run(6.0, 90.0, 3.0),
            run(5.0, 50.0, 1.0),
        ];
        assert_eq!(runs[0][1].p99_vs_default, Some(10.0));
        assert_eq!(runs[0][0].p99_vs_floor, Some(2.0));
        let m = storm_medians(&runs);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].open_latency.unwrap().p99_us, 5000.0);
        assert_eq!(m[1].p99_vs_default, Some(10.0));
        assert_eq!(m[0].p99_vs_floor, Some(2.0));
        let t = targets(&m, None, 4);
        assert_eq!(t[0].met, Some(true));
        let slow = vec![run(60.0, 70.0, 1.0)];
        assert_eq!(targets(&storm_medians(&slow), None, 4)[0].met, Some(false));
    }
}
