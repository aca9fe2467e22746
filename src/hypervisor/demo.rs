//! Built-in demo VNC server: a console to open when there is no hypervisor.
//!
//! What it does: [`DemoServer`] serves RFB 3.8 (3.3 and 3.7 clients are
//! accepted too) on a TCP listener, usually loopback, with security type None
//! or, when a password is configured, VNC Authentication. Every client sees
//! an animated test pattern — colour bars, a scrolling stripe, a bouncing
//! box, a frame counter, a key-press counter and a square that follows its
//! pointer — so a person can tell at a glance that the console is alive and
//! that input arrives. Frames are sent as Raw rectangles in whatever
//! true-colour pixel format the client asks for; incremental updates carry
//! only the bands that changed.
//!
//! What it does not do: it is not part of the data plane and not on the hot
//! path. It is a plain thread-per-client server on std sockets (no tokio, no
//! io_uring), bounded by `max_clients`, read/write timeouts and a frame-rate
//! cap. It implements no encodings but Raw, no colour-map formats, no
//! clipboard (client cut text is read and discarded) and no desktop resizing.
//! Client input never panics it: every message length is checked and hostile
//! input ends that client's connection with a log line.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::protocol::rfb;

/// Largest width or height accepted. A client costs about 12 bytes per
/// pixel (the drawn frame, the copy of what it was sent, and the update
/// being written), so 4096×4096 is ~200 MiB per client: already far more
/// than a demo needs.
pub const MAX_DIMENSION: u16 = 4096;
/// Fastest animation allowed (100 frames per second): the frame-rate cap.
pub const MIN_FRAME_INTERVAL_MS: u64 = 10;
/// Longest client cut text read (and discarded); more closes the client.
pub const MAX_CUT_TEXT_BYTES: usize = 1 << 20;
/// Most encodings one SetEncodings may list (noVNC sends about 20).
pub const MAX_ENCODINGS: usize = 512;
/// Longest desktop name sent in ServerInit.
pub const MAX_NAME_BYTES: usize = 1024;
/// Time a client has for the whole handshake (version to ClientInit).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that sends nothing for this long is disconnected, so dead peers
/// do not hold threads; live viewers keep requesting updates several times
/// a second, so this only ever catches the dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Time one write may block (a client that stops reading is dropped).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections being refused at once; beyond this they are just closed.
const MAX_REFUSING: usize = 8;
/// Rows per band when looking for changed regions.
const BAND_ROWS: usize = 16;
/// Bytes read from a client per `read` call.
const READ_CHUNK: usize = 4096;
/// The refusal reason sent to clients over `max_clients`.
pub const TOO_MANY_CLIENTS: &str = "too many clients";
/// The failure reason sent after a wrong VNC password (RFB 3.8).
pub const AUTH_FAILED: &str = "authentication failed";

/// Demo server settings. Each limit bounds one cost, named beside it.
#[derive(Clone, PartialEq, Eq)]
pub struct DemoConfig {
    /// Framebuffer width in pixels (1..=[`MAX_DIMENSION`]).
    pub width: u16,
    /// Framebuffer height in pixels (1..=[`MAX_DIMENSION`]).
    pub height: u16,
    /// Clients served at once; each costs a thread and two framebuffers
    /// (8 bytes per pixel). More are refused with "too many clients".
    pub max_clients: usize,
    /// Animation step and the minimum time between two updates to a client
    /// (clamped to at least [`MIN_FRAME_INTERVAL_MS`]).
    pub frame_interval_ms: u64,
    /// VNC password (VNC Authentication; first 8 bytes count), or `None`
    /// for security type None.
    pub password: Option<String>,
    /// Desktop name sent in ServerInit (cut to [`MAX_NAME_BYTES`]).
    pub name: String,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            width: 1024,
            height: 768,
            max_clients: 16,
            frame_interval_ms: 100,
            password: None,
            name: "consolegate demo".to_owned(),
        }
    }
}

impl std::fmt::Debug for DemoConfig {
    // Hand-written so the password never lands in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DemoConfig")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("max_clients", &self.max_clients)
            .field("frame_interval_ms", &self.frame_interval_ms)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("name", &self.name)
            .finish()
    }
}

/// Why one client's connection ended (for the log line).
#[derive(Debug, thiserror::Error)]
enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("unsupported pixel format: {0}")]
    PixelFormat(&'static str),
    #[error("wrong VNC password")]
    AuthFailed,
    #[error("idle for {0:?}")]
    Idle(Duration),
    #[error("no random challenge: {0}")]
    Random(getrandom::Error),
}

/// A running demo server. [`DemoServer::stop`] (or dropping it) stops it.
#[derive(Debug)]
pub struct DemoServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    cfg: DemoConfig,
    /// [`IDLE_TIMEOUT`], shortened by tests.
    idle_timeout: Duration,
    /// Animation time zero, shared so every client sees the same frame.
    started: Instant,
    stop: AtomicBool,
    registry: Mutex<Registry>,
    /// Client threads that panicked (should stay 0; checked by tests).
    panics: AtomicUsize,
}

#[derive(Debug, Default)]
struct Registry {
    next_id: u64,
    /// Live connections, so `stop` can shut them down and unblock threads.
    conns: Vec<(u64, TcpStream)>,
    served: usize,
    refusing: usize,
    threads: Vec<JoinHandle<()>>,
}

impl Shared {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A panicked client thread must not take the whole server with it.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Serve,
    Refuse,
}

/// Releases a connection's slot however its thread ends (panics included).
struct SlotGuard {
    shared: Arc<Shared>,
    id: u64,
    role: Role,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.shared.panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(client = self.id, "demo VNC client thread panicked");
        }
        let mut reg = self.shared.registry();
        reg.conns.retain(|(id, _)| *id != self.id);
        match self.role {
            Role::Serve => reg.served = reg.served.saturating_sub(1),
            Role::Refuse => reg.refusing = reg.refusing.saturating_sub(1),
        }
    }
}

impl DemoServer {
    /// Binds `bind` (use `127.0.0.1:0` for an ephemeral loopback port) and
    /// serves on a background accept thread with one thread per client, at
    /// most `max_clients`; more are refused with an RFB security failure
    /// "too many clients" and closed.
    pub fn start(bind: SocketAddr, cfg: DemoConfig) -> io::Result<DemoServer> {
        Self::start_with_idle(bind, cfg, IDLE_TIMEOUT)
    }

    fn start_with_idle(
        bind: SocketAddr,
        cfg: DemoConfig,
        idle_timeout: Duration,
    ) -> io::Result<DemoServer> {
        let cfg = normalize(cfg)?;
        let listener = TcpListener::bind(bind)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            cfg,
            idle_timeout: idle_timeout.max(Duration::from_millis(1)),
            started: Instant::now(),
            stop: AtomicBool::new(false),
            registry: Mutex::new(Registry::default()),
            panics: AtomicUsize::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("demo-vnc-accept".to_owned())
            .spawn(move || accept_loop(&listener, &accept_shared))?;
        tracing::info!(%addr, "demo VNC server listening");
        Ok(DemoServer {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The address it listens on (with the real port when bound to 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Clients being served right now (refused ones not counted).
    pub fn active_clients(&self) -> usize {
        self.shared.registry().served
    }

    /// Stops accepting, disconnects every client and joins all threads.
    /// Bounded: sockets are shut down, which wakes any blocked read or
    /// write at once, so no thread is waited on for a timeout.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        {
            let reg = self.shared.registry();
            // Set under the lock: the accept thread checks it under the same
            // lock before registering, so no connection slips past the sweep.
            self.shared.stop.store(true, Ordering::SeqCst);
            for (_, conn) in &reg.conns {
                let _ = conn.shutdown(Shutdown::Both);
            }
        }
        if let Some(accept) = self.accept.take() {
            // std's blocking accept has no cancel; a connection wakes it.
            match TcpStream::connect_timeout(&wake_addr(self.addr), Duration::from_secs(1)) {
                Ok(_) => {
                    let _ = accept.join();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not wake the demo accept thread; leaving it detached");
                }
            }
        }
        let threads = std::mem::take(&mut self.shared.registry().threads);
        for t in threads {
            let _ = t.join();
        }
        tracing::info!(addr = %self.addr, "demo VNC server stopped");
    }
}

impl Drop for DemoServer {
    fn drop(&mut self) {
        if !self.shared.stop.load(Ordering::SeqCst) {
            self.shutdown();
        }
    }
}

fn normalize(mut cfg: DemoConfig) -> io::Result<DemoConfig> {
    let valid = 1..=MAX_DIMENSION;
    if !valid.contains(&cfg.width) || !valid.contains(&cfg.height) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("demo framebuffer must be 1..={MAX_DIMENSION} pixels each way"),
        ));
    }
    cfg.frame_interval_ms = cfg.frame_interval_ms.max(MIN_FRAME_INTERVAL_MS);
    if cfg.name.len() > MAX_NAME_BYTES {
        let mut end = MAX_NAME_BYTES;
        while !cfg.name.is_char_boundary(end) {
            end -= 1;
        }
        cfg.name.truncate(end);
    }
    Ok(cfg)
}

/// Where to connect to wake our own accept: loopback if bound to "any".
fn wake_addr(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        match conn {
            Ok(stream) => admit(shared, stream),
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "demo VNC accept failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Reap finished threads so the handle list stays short.
        let mut reg = shared.registry();
        let (done, live): (Vec<_>, Vec<_>) = std::mem::take(&mut reg.threads)
            .into_iter()
            .partition(|t| t.is_finished());
        reg.threads = live;
        drop(reg);
        for t in done {
            let _ = t.join();
        }
    }
}

fn admit(shared: &Arc<Shared>, stream: TcpStream) {
    let peer = stream.peer_addr().ok();
    let Ok(handle_copy) = stream.try_clone() else {
        return;
    };
    let (id, role) = {
        let mut reg = shared.registry();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let role = if reg.served < shared.cfg.max_clients {
            reg.served += 1;
            Role::Serve
        } else if reg.refusing < MAX_REFUSING {
            reg.refusing += 1;
            Role::Refuse
        } else {
            tracing::warn!(?peer, "demo VNC: too many clients and refusals; closing");
            return;
        };
        let id = reg.next_id;
        reg.next_id += 1;
        reg.conns.push((id, handle_copy));
        (id, role)
    };
    let guard = SlotGuard {
        shared: Arc::clone(shared),
        id,
        role,
    };
    let thread_shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("demo-vnc-{id}"))
        .spawn(move || {
            let _guard = guard;
            let result = match role {
                Role::Serve => serve_client(stream, &thread_shared),
                Role::Refuse => refuse_client(stream),
            };
            match result {
                Ok(()) => tracing::debug!(client = id, ?peer, "demo VNC client left"),
                Err(e) => {
                    tracing::info!(client = id, ?peer, error = %e, "demo VNC client disconnected")
                }
            }
        });
    match spawned {
        // The guard went down with the failed closure and freed the slot.
        Err(e) => tracing::warn!(error = %e, "demo VNC: cannot spawn client thread"),
        Ok(handle) => shared.registry().threads.push(handle),
    }
}

/// Parses a client's ProtocolVersion the way RFC 6143 7.1.1 asks a server
/// to: 3.7 and 3.8 as such, any other 3.x as 3.3.
fn client_version(v: &[u8; 12]) -> Option<rfb::Version> {
    let ok = v.starts_with(b"RFB ")
        && v[4..7].iter().all(u8::is_ascii_digit)
        && v[7] == b'.'
        && v[8..11].iter().all(u8::is_ascii_digit)
        && v[11] == b'\n';
    if !ok || &v[4..7] != b"003" {
        return None;
    }
    Some(match &v[8..11] {
        b"007" => rfb::Version::V3_7,
        b"008" => rfb::Version::V3_8,
        b"000" | b"001" | b"002" => return None,
        m if m >= &b"008"[..] => rfb::Version::V3_8,
        _ => rfb::Version::V3_3,
    })
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Sends the version-appropriate security failure, then closes gently.
fn refuse_client(mut stream: TcpStream) -> Result<(), ClientError> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(rfb::BROWSER_PROTOCOL_VERSION)?;
    let mut v = [0u8; 12];
    stream.read_exact(&mut v)?;
    let mut msg = Vec::new();
    match client_version(&v) {
        Some(rfb::Version::V3_3) => msg.extend_from_slice(&0u32.to_be_bytes()),
        Some(_) => msg.push(0),
        None => return Err(ClientError::Protocol("not an RFB ProtocolVersion")),
    }
    put_string(&mut msg, TOO_MANY_CLIENTS);
    stream.write_all(&msg)?;
    // Half-close and drain briefly: closing with unread input would send a
    // reset that can destroy the reason before the client reads it.
    stream.shutdown(Shutdown::Write)?;
    let mut sink = [0u8; 256];
    for _ in 0..16 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Compares without an early exit, so timing does not reveal how many
/// leading bytes of a guessed response were right.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The RFB handshake from the server side; returns the client's version.
fn server_handshake(stream: &mut TcpStream, cfg: &DemoConfig) -> Result<rfb::Version, ClientError> {
    stream.write_all(rfb::BROWSER_PROTOCOL_VERSION)?;
    let mut v = [0u8; 12];
    stream.read_exact(&mut v)?;
    let version =
        client_version(&v).ok_or(ClientError::Protocol("not an RFB 3.x ProtocolVersion"))?;
    let sec = if cfg.password.is_some() {
        rfb::SECURITY_VNC_AUTH
    } else {
        rfb::SECURITY_NONE
    };
    if version == rfb::Version::V3_3 {
        stream.write_all(&u32::from(sec).to_be_bytes())?;
    } else {
        stream.write_all(&[1, sec])?;
        let mut choice = [0u8; 1];
        stream.read_exact(&mut choice)?;
        if choice[0] != sec {
            if version == rfb::Version::V3_8 {
                let mut msg = 1u32.to_be_bytes().to_vec();
                put_string(&mut msg, "security type not offered");
                stream.write_all(&msg)?;
            }
            return Err(ClientError::Protocol("chose a security type not offered"));
        }
    }
    if let Some(password) = &cfg.password {
        let mut challenge = [0u8; rfb::CHALLENGE_LEN];
        getrandom::fill(&mut challenge).map_err(ClientError::Random)?;
        stream.write_all(&challenge)?;
        let mut response = [0u8; rfb::CHALLENGE_LEN];
        stream.read_exact(&mut response)?;
        let expected = rfb::vnc_auth_response(password.as_bytes(), &challenge);
        if !same_bytes(&response, &expected) {
            let mut msg = 1u32.to_be_bytes().to_vec();
            if version == rfb::Version::V3_8 {
                put_string(&mut msg, AUTH_FAILED);
            }
            stream.write_all(&msg)?;
            return Err(ClientError::AuthFailed);
        }
        stream.write_all(&0u32.to_be_bytes())?;
    } else if version == rfb::Version::V3_8 {
        // Only 3.8 sends a SecurityResult after None.
        stream.write_all(&0u32.to_be_bytes())?;
    }
    // ClientInit: the shared flag does not matter, every client sees the
    // same pattern and none is disconnected for another.
    let mut shared = [0u8; 1];
    stream.read_exact(&mut shared)?;

    let mut init = Vec::with_capacity(24 + cfg.name.len());
    init.extend_from_slice(&cfg.width.to_be_bytes());
    init.extend_from_slice(&cfg.height.to_be_bytes());
    init.extend_from_slice(&PixelFormat::DEFAULT.encode());
    put_string(&mut init, &cfg.name);
    stream.write_all(&init)?;
    Ok(version)
}

/// An RFB PIXEL_FORMAT (RFC 6143 7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PixelFormat {
    bits_per_pixel: u8,
    depth: u8,
    big_endian: bool,
    true_colour: bool,
    red_max: u16,
    green_max: u16,
    blue_max: u16,
    red_shift: u8,
    green_shift: u8,
    blue_shift: u8,
}

impl PixelFormat {
    /// What we announce: 32 bpp, depth 24, little-endian 0x00RRGGBB.
    const DEFAULT: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    fn encode(&self) -> [u8; 16] {
        let [rm0, rm1] = self.red_max.to_be_bytes();
        let [gm0, gm1] = self.green_max.to_be_bytes();
        let [bm0, bm1] = self.blue_max.to_be_bytes();
        [
            self.bits_per_pixel,
            self.depth,
            u8::from(self.big_endian),
            u8::from(self.true_colour),
            rm0,
            rm1,
            gm0,
            gm1,
            bm0,
            bm1,
            self.red_shift,
            self.green_shift,
            self.blue_shift,
            0,
            0,
            0,
        ]
    }

    fn decode(b: &[u8; 16]) -> PixelFormat {
        PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: u16::from_be_bytes([b[4], b[5]]),
            green_max: u16::from_be_bytes([b[6], b[7]]),
            blue_max: u16::from_be_bytes([b[8], b[9]]),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        }
    }

    fn check(&self) -> Result<(), ClientError> {
        if !self.true_colour {
            return Err(ClientError::PixelFormat(
                "colour-map formats are not supported",
            ));
        }
        if !matches!(self.bits_per_pixel, 8 | 16 | 32) {
            return Err(ClientError::PixelFormat(
                "bits-per-pixel must be 8, 16 or 32",
            ));
        }
        Ok(())
    }
}

/// Turns our 0x00RRGGBB pixels into a client's format through one lookup
/// table per channel (any max, any shift), so a pixel costs three loads.
struct Converter {
    red: [u32; 256],
    green: [u32; 256],
    blue: [u32; 256],
    bytes: usize,
    big_endian: bool,
    /// Bits of a 32-bit pixel no channel uses, sent as ones. RFB leaves
    /// them unspecified; noVNC 1.3 (Debian 12) treats the padding byte of
    /// Raw pixels as alpha past its first chunk, so zeros would render as
    /// transparent (invisible) rows.
    pad: u32,
}

impl Converter {
    fn new(pf: &PixelFormat) -> Converter {
        fn table(max: u16, shift: u8) -> [u32; 256] {
            let mut t = [0u32; 256];
            for (c, slot) in (0u32..).zip(t.iter_mut()) {
                // Scale 0..=255 onto 0..=max, rounding to nearest.
                let v = (c * u32::from(max) + 127) / 255;
                // A shift past the pixel width just loses the channel.
                *slot = v.checked_shl(u32::from(shift)).unwrap_or(0);
            }
            t
        }
        let bytes = usize::from(pf.bits_per_pixel / 8).max(1);
        let mask = |max: u16, shift: u8| u32::from(max).checked_shl(u32::from(shift)).unwrap_or(0);
        let used = mask(pf.red_max, pf.red_shift)
            | mask(pf.green_max, pf.green_shift)
            | mask(pf.blue_max, pf.blue_shift);
        Converter {
            red: table(pf.red_max, pf.red_shift),
            green: table(pf.green_max, pf.green_shift),
            blue: table(pf.blue_max, pf.blue_shift),
            bytes,
            big_endian: pf.big_endian,
            pad: if bytes == 4 { !used } else { 0 },
        }
    }

    fn pixel(&self, rgb: u32) -> u32 {
        self.red[((rgb >> 16) & 0xFF) as usize]
            | self.green[((rgb >> 8) & 0xFF) as usize]
            | self.blue[(rgb & 0xFF) as usize]
            | self.pad
    }

    fn put_row(&self, row: &[u32], out: &mut Vec<u8>) {
        // The match is hoisted out of the pixel loop.
        match (self.bytes, self.big_endian) {
            (1, _) => out.extend(row.iter().map(|&p| self.pixel(p) as u8)),
            (2, false) => {
                for &p in row {
                    out.extend_from_slice(&(self.pixel(p) as u16).to_le_bytes());
                }
            }
            (2, true) => {
                for &p in row {
                    out.extend_from_slice(&(self.pixel(p) as u16).to_be_bytes());
                }
            }
            (_, false) => {
                for &p in row {
                    out.extend_from_slice(&self.pixel(p).to_le_bytes());
                }
            }
            (_, true) => {
                for &p in row {
                    out.extend_from_slice(&self.pixel(p).to_be_bytes());
                }
            }
        }
    }
}

/// A rectangle inside the framebuffer (always clipped before use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rect {
    x: usize,
    y: usize,
    w: usize,
    h: usize,
}

impl Rect {
    /// The client's request clipped to a `fw`×`fh` framebuffer.
    fn clipped(x: u16, y: u16, w: u16, h: u16, fw: usize, fh: usize) -> Rect {
        let x0 = usize::from(x).min(fw);
        let y0 = usize::from(y).min(fh);
        let x1 = (usize::from(x) + usize::from(w)).min(fw);
        let y1 = (usize::from(y) + usize::from(h)).min(fh);
        Rect {
            x: x0,
            y: y0,
            w: x1 - x0,
            h: y1 - y0,
        }
    }

    fn is_empty(&self) -> bool {
        self.w == 0 || self.h == 0
    }

    fn union(&self, o: &Rect) -> Rect {
        if self.is_empty() {
            return *o;
        }
        if o.is_empty() {
            return *self;
        }
        let x0 = self.x.min(o.x);
        let y0 = self.y.min(o.y);
        let x1 = (self.x + self.w).max(o.x + o.w);
        let y1 = (self.y + self.h).max(o.y + o.h);
        Rect {
            x: x0,
            y: y0,
            w: x1 - x0,
            h: y1 - y0,
        }
    }
}

/// What a client showed us of itself that the pattern reflects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct InputState {
    pointer: Option<(u16, u16)>,
    buttons: u8,
    key_presses: u64,
    last_key: u32,
}

/// The test pattern, drawn into an RGB888 framebuffer.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u32>,
}

const BAR_COLOURS: [u32; 8] = [
    0xFF_FF_FF, 0xFF_FF_00, 0x00_FF_FF, 0x00_FF_00, 0xFF_00_FF, 0xFF_00_00, 0x00_00_FF, 0x00_00_00,
];

/// 3×5 digit glyphs, one bit per pixel, row-major from the top-left.
const DIGITS: [u16; 10] = [
    0b111_101_101_101_111,
    0b010_110_010_010_111,
    0b111_001_111_100_111,
    0b111_001_111_001_111,
    0b101_101_111_001_001,
    0b111_100_111_001_111,
    0b111_100_111_101_111,
    0b111_001_001_001_001,
    0b111_101_111_101_111,
    0b111_101_111_001_111,
];

/// Position bouncing between 0 and `range` (a triangle wave).
fn bounce(t: u64, range: usize) -> usize {
    let range = range as u64;
    if range == 0 {
        return 0;
    }
    let p = t % (2 * range);
    (if p < range { p } else { 2 * range - p }) as usize
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![0; w * h],
        }
    }

    fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, rgb: u32) {
        let x0 = x.min(self.w);
        let x1 = x.saturating_add(w).min(self.w);
        let y1 = y.saturating_add(h).min(self.h);
        for row in y.min(self.h)..y1 {
            let start = row * self.w;
            if let Some(span) = self.px.get_mut(start + x0..start + x1) {
                span.fill(rgb);
            }
        }
    }

    fn number(&mut self, mut n: u64, right: usize, top: usize, scale: usize, rgb: u32) {
        // Right-aligned, drawn from the last digit leftwards.
        let mut x = right;
        loop {
            let glyph = DIGITS[(n % 10) as usize];
            x = x.saturating_sub(4 * scale);
            for gy in 0..5 {
                for gx in 0..3 {
                    if glyph & (1 << (14 - (gy * 3 + gx))) != 0 {
                        self.fill(x + gx * scale, top + gy * scale, scale, scale, rgb);
                    }
                }
            }
            n /= 10;
            if n == 0 || x == 0 {
                break;
            }
        }
    }

    /// Draws frame `n` with this client's pointer and key state.
    fn draw(&mut self, n: u64, input: &InputState) {
        let (w, h) = (self.w, self.h);
        let bars_h = (h * 2 / 3).max(1);
        for y in 0..bars_h {
            let row = y * w;
            for x in 0..w {
                if let Some(p) = self.px.get_mut(row + x) {
                    *p = BAR_COLOURS[(x * BAR_COLOURS.len() / w).min(BAR_COLOURS.len() - 1)];
                }
            }
        }
        // A grey stripe scrolling over the bars.
        let stripe_w = (w / 40).max(2);
        let stripe_x = (n as usize).wrapping_mul((w / 64).max(1)) % w;
        self.fill(stripe_x, 0, stripe_w, bars_h, 0x80_80_80);
        // Lower third: a blue ramp.
        for y in bars_h..h {
            let row = y * w;
            for x in 0..w {
                if let Some(p) = self.px.get_mut(row + x) {
                    *p = 0x20 + (x * 0xA0 / w) as u32;
                }
            }
        }
        // A box bouncing around the whole screen.
        let size = (w.min(h) / 10).max(4);
        let bx = bounce(
            n.wrapping_mul((w / 50).max(1) as u64),
            w.saturating_sub(size),
        );
        let by = bounce(
            n.wrapping_mul((h / 40).max(1) as u64),
            h.saturating_sub(size),
        );
        self.fill(bx, by, size, size, 0xFF_88_00);
        self.fill(bx + size / 4, by + size / 4, size / 2, size / 2, 0x40_20_00);
        // Frame counter at the bottom centre, key presses bottom-right.
        let scale = (h / 60).max(1);
        let top = h.saturating_sub(6 * scale);
        self.number(n, w / 2, top, scale, 0xFF_FF_FF);
        self.number(
            input.key_presses,
            w.saturating_sub(scale),
            top,
            scale,
            0xFF_FF_00,
        );
        if input.key_presses > 0 {
            // A swatch whose colour follows the last keysym.
            let c = input.last_key.wrapping_mul(0x9E37_79B9) >> 8 | 0x40_40_40;
            self.fill(
                w.saturating_sub(3 * scale),
                top.saturating_sub(4 * scale),
                2 * scale,
                2 * scale,
                c & 0xFF_FF_FF,
            );
        }
        // The client's pointer: a bordered square, red while a button is down.
        if let Some((px, py)) = input.pointer {
            let (px, py) = (usize::from(px), usize::from(py));
            let r = (w.min(h) / 100).max(4);
            self.fill(
                px.saturating_sub(r + 1),
                py.saturating_sub(r + 1),
                2 * r + 3,
                2 * r + 3,
                0,
            );
            let inner = if input.buttons != 0 {
                0xFF_00_00
            } else {
                0xFF_FF_FF
            };
            self.fill(
                px.saturating_sub(r),
                py.saturating_sub(r),
                2 * r + 1,
                2 * r + 1,
                inner,
            );
        }
    }
}

/// An outstanding FramebufferUpdateRequest (merged if several arrive).
#[derive(Debug, Clone, Copy)]
struct Pending {
    region: Rect,
    /// Non-incremental: send the whole region, changed or not.
    full: bool,
}

/// One served client after the handshake.
struct Session {
    converter: Converter,
    canvas: Canvas,
    /// What the client has: our pixels as of the last update sent (values
    /// above 0xFFFFFF mean "never sent", so they differ from any pixel).
    sent: Vec<u32>,
    input: InputState,
    input_changed: bool,
    /// Frame index last drawn into `canvas`.
    drawn: Option<u64>,
    pending: Option<Pending>,
    next_send_at: Instant,
    /// Bytes of a ClientCutText still to skip.
    discard: usize,
    out: Vec<u8>,
}

impl Session {
    fn new(cfg: &DemoConfig) -> Session {
        let (w, h) = (usize::from(cfg.width), usize::from(cfg.height));
        Session {
            converter: Converter::new(&PixelFormat::DEFAULT),
            canvas: Canvas::new(w, h),
            sent: vec![u32::MAX; w * h],
            input: InputState::default(),
            input_changed: false,
            drawn: None,
            pending: None,
            next_send_at: Instant::now(),
            discard: 0,
            out: Vec::new(),
        }
    }

    /// Handles every complete message at the front of `buf`; returns the
    /// bytes consumed (a partial message stays for the next read).
    fn on_input(&mut self, buf: &[u8]) -> Result<usize, ClientError> {
        let mut pos = 0;
        loop {
            let rest = buf.get(pos..).unwrap_or_default();
            if self.discard > 0 {
                let n = self.discard.min(rest.len());
                self.discard -= n;
                pos += n;
                if self.discard > 0 {
                    return Ok(pos);
                }
                continue;
            }
            let Some(&kind) = rest.first() else {
                return Ok(pos);
            };
            let need = match kind {
                0 => 20,
                2 => match rest.get(2..4) {
                    Some(&[a, b]) => {
                        let count = usize::from(u16::from_be_bytes([a, b]));
                        if count > MAX_ENCODINGS {
                            return Err(ClientError::Protocol("too many encodings"));
                        }
                        4 + 4 * count
                    }
                    _ => 4,
                },
                3 => 10,
                4 => 8,
                5 => 6,
                6 => 8,
                _ => return Err(ClientError::Protocol("unknown client message type")),
            };
            let Some(msg) = rest.get(..need) else {
                return Ok(pos);
            };
            pos += need;
            self.message(msg)?;
        }
    }

    fn message(&mut self, msg: &[u8]) -> Result<(), ClientError> {
        let be16 = |i: usize| match msg.get(i..i + 2) {
            Some(&[a, b]) => u16::from_be_bytes([a, b]),
            _ => 0,
        };
        let be32 = |i: usize| match msg.get(i..i + 4) {
            Some(&[a, b, c, d]) => u32::from_be_bytes([a, b, c, d]),
            _ => 0,
        };
        match msg.first() {
            Some(0) => {
                let mut raw = [0u8; 16];
                if let Some(src) = msg.get(4..20) {
                    raw.copy_from_slice(src);
                }
                let pf = PixelFormat::decode(&raw);
                if let Err(e) = pf.check() {
                    tracing::warn!(?pf, "demo VNC client asked for an unsupported pixel format");
                    return Err(e);
                }
                self.converter = Converter::new(&pf);
            }
            // SetEncodings: we only ever send Raw, which every client takes.
            Some(2) => {}
            Some(3) => {
                let region = Rect::clipped(
                    be16(2),
                    be16(4),
                    be16(6),
                    be16(8),
                    self.canvas.w,
                    self.canvas.h,
                );
                let full = msg.get(1) == Some(&0);
                self.pending = Some(match self.pending {
                    Some(p) => Pending {
                        region: p.region.union(&region),
                        full: p.full || full,
                    },
                    None => Pending { region, full },
                });
            }
            Some(4) => {
                if msg.get(1) != Some(&0) {
                    self.input.key_presses += 1;
                }
                self.input.last_key = be32(4);
                self.input_changed = true;
            }
            Some(5) => {
                self.input.buttons = msg.get(1).copied().unwrap_or(0);
                self.input.pointer = Some((be16(2), be16(4)));
                self.input_changed = true;
            }
            Some(6) => {
                // The length is signed in the extended-clipboard variant;
                // either way it is skipped, never stored.
                let len = (be32(4) as i32).unsigned_abs() as usize;
                if len > MAX_CUT_TEXT_BYTES {
                    return Err(ClientError::Protocol("client cut text too long"));
                }
                self.discard = len;
            }
            _ => return Err(ClientError::Protocol("unknown client message type")),
        }
        Ok(())
    }

    /// Sends an update if a request is pending, the rate cap allows, and
    /// (for incremental requests) something changed. Returns whether sent.
    fn maybe_update(
        &mut self,
        stream: &mut TcpStream,
        frame: u64,
        now: Instant,
        interval: Duration,
    ) -> Result<bool, ClientError> {
        let Some(pending) = self.pending else {
            return Ok(false);
        };
        if now < self.next_send_at {
            return Ok(false);
        }
        if self.drawn != Some(frame) || self.input_changed {
            self.canvas.draw(frame, &self.input);
            self.drawn = Some(frame);
            self.input_changed = false;
        }
        let rects = if pending.full {
            if pending.region.is_empty() {
                Vec::new()
            } else {
                vec![pending.region]
            }
        } else {
            let rects = changed_bands(&self.canvas, &self.sent, pending.region);
            if rects.is_empty() {
                // Nothing new yet: keep the request for the next frame.
                return Ok(false);
            }
            rects
        };
        self.encode_update(&rects);
        stream.write_all(&self.out)?;
        self.pending = None;
        self.next_send_at = now + interval;
        Ok(true)
    }

    /// Builds a Raw FramebufferUpdate for `rects` in `self.out` and records
    /// those pixels as sent.
    fn encode_update(&mut self, rects: &[Rect]) {
        let w = self.canvas.w;
        self.out.clear();
        self.out.extend_from_slice(&[0, 0]);
        let count = u16::try_from(rects.len()).unwrap_or(u16::MAX);
        self.out.extend_from_slice(&count.to_be_bytes());
        for r in rects.iter().take(usize::from(count)) {
            for v in [r.x, r.y, r.w, r.h] {
                // Rects are clipped to a framebuffer of at most 4096.
                self.out
                    .extend_from_slice(&u16::try_from(v).unwrap_or(0).to_be_bytes());
            }
            self.out.extend_from_slice(&0i32.to_be_bytes());
            for y in r.y..r.y + r.h {
                let span = y * w + r.x..y * w + r.x + r.w;
                if let (Some(src), Some(dst)) =
                    (self.canvas.px.get(span.clone()), self.sent.get_mut(span))
                {
                    self.converter.put_row(src, &mut self.out);
                    dst.copy_from_slice(src);
                }
            }
        }
    }
}

/// Per band of rows in `region`, the columns where `canvas` and `sent`
/// differ, as one rectangle per changed band.
fn changed_bands(canvas: &Canvas, sent: &[u32], region: Rect) -> Vec<Rect> {
    let mut rects = Vec::new();
    let w = canvas.w;
    let mut band = region.y;
    while band < region.y + region.h {
        let end = (band + BAND_ROWS).min(region.y + region.h);
        let mut lo = usize::MAX;
        let mut hi = 0;
        for y in band..end {
            let span = y * w + region.x..y * w + region.x + region.w;
            let (Some(a), Some(b)) = (canvas.px.get(span.clone()), sent.get(span)) else {
                continue;
            };
            if let Some(first) = a.iter().zip(b).position(|(p, q)| p != q) {
                let last = a.iter().zip(b).rposition(|(p, q)| p != q).unwrap_or(first);
                lo = lo.min(first);
                hi = hi.max(last);
            }
        }
        if lo <= hi {
            rects.push(Rect {
                x: region.x + lo,
                y: band,
                w: hi - lo + 1,
                h: end - band,
            });
        }
        band = end;
    }
    rects
}

fn serve_client(mut stream: TcpStream, shared: &Shared) -> Result<(), ClientError> {
    let cfg = &shared.cfg;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let version = server_handshake(&mut stream, cfg)?;
    tracing::debug!(?version, "demo VNC client authenticated");

    let interval = Duration::from_millis(cfg.frame_interval_ms);
    let idle = shared.idle_timeout;
    let mut session = Session::new(cfg);
    let mut inbuf: Vec<u8> = Vec::with_capacity(READ_CHUNK * 2);
    let mut chunk = [0u8; READ_CHUNK];
    let mut idle_deadline = Instant::now() + idle;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let now = Instant::now();
        let frame = frame_index(shared.started, now, interval);
        session.maybe_update(&mut stream, frame, now, interval)?;

        // Sleep in read() until input, the next frame, or the idle limit.
        let now = Instant::now();
        if now >= idle_deadline {
            return Err(ClientError::Idle(idle));
        }
        let mut wake = idle_deadline;
        if let Some(p) = session.pending {
            let due = if p.full {
                session.next_send_at
            } else {
                // An incremental request waits for something to change,
                // which is at the next frame at the earliest.
                session
                    .next_send_at
                    .max(next_frame_at(shared.started, now, interval))
            };
            wake = wake.min(due);
        }
        let wait = wake
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        stream.set_read_timeout(Some(wait))?;
        match stream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                idle_deadline = Instant::now() + idle;
                inbuf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                let used = session.on_input(&inbuf)?;
                inbuf.drain(..used.min(inbuf.len()));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// When frame `frame_index(now) + 1` starts.
fn next_frame_at(started: Instant, now: Instant, interval: Duration) -> Instant {
    let step = interval.as_millis().max(1);
    let since = now.saturating_duration_since(started).as_millis();
    let next_ms = (since / step + 1).saturating_mul(step);
    started + Duration::from_millis(u64::try_from(next_ms).unwrap_or(u64::MAX / 2))
}

fn frame_index(started: Instant, now: Instant, interval: Duration) -> u64 {
    let ms = now.saturating_duration_since(started).as_millis();
    let step = interval.as_millis().max(1);
    u64::try_from(ms / step).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn cfg(password: Option<&str>) -> DemoConfig {
        DemoConfig {
            width: 64,
            height: 48,
            max_clients: 4,
            frame_interval_ms: 20,
            password: password.map(str::to_owned),
            name: "demo under test".to_owned(),
        }
    }

    /// A minimal RFB client for tests.
    struct Client {
        s: TcpStream,
        w: usize,
        h: usize,
        name: String,
        bpp: usize,
        fb: Vec<u8>,
    }

    #[derive(Debug, PartialEq)]
    enum Connect {
        Ok,
        Failed(String),
    }

    fn read_string(s: &mut TcpStream) -> String {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut b = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut b).unwrap();
        String::from_utf8(b).unwrap()
    }

    impl Client {
        fn connect(
            addr: SocketAddr,
            version: &[u8; 12],
            password: Option<&str>,
        ) -> (Client, Connect) {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut c = Client {
                s: s.try_clone().unwrap(),
                w: 0,
                h: 0,
                name: String::new(),
                bpp: 4,
                fb: Vec::new(),
            };
            let mut v = [0u8; 12];
            s.read_exact(&mut v).unwrap();
            assert_eq!(&v, b"RFB 003.008\n");
            s.write_all(version).unwrap();
            // Servers treat any 3.x other than 3.7/3.8 as 3.3.
            let v33 = version != b"RFB 003.007\n" && version != b"RFB 003.008\n";
            let v38 = version == b"RFB 003.008\n";
            let sec = if v33 {
                let mut t = [0u8; 4];
                s.read_exact(&mut t).unwrap();
                let t = u32::from_be_bytes(t);
                if t == 0 {
                    return (c, Connect::Failed(read_string(&mut s)));
                }
                t as u8
            } else {
                let mut n = [0u8; 1];
                s.read_exact(&mut n).unwrap();
                if n[0] == 0 {
                    return (c, Connect::Failed(read_string(&mut s)));
                }
                let mut types = vec![0u8; n[0] as usize];
                s.read_exact(&mut types).unwrap();
                let t = types[0];
                s.write_all(&[t]).unwrap();
                t
            };
            if sec == 2 {
                let mut ch = [0u8; 16];
                s.read_exact(&mut ch).unwrap();
                s.write_all(&rfb::vnc_auth_response(
                    password.unwrap_or("").as_bytes(),
                    &ch,
                ))
                .unwrap();
            }
            if sec == 2 || v38 {
                let mut r = [0u8; 4];
                s.read_exact(&mut r).unwrap();
                if r != [0; 4] {
                    let reason = if v38 {
                        read_string(&mut s)
                    } else {
                        String::new()
                    };
                    return (c, Connect::Failed(reason));
                }
            }
            s.write_all(&[1]).unwrap();
            let mut init = [0u8; 20];
            s.read_exact(&mut init).unwrap();
            c.w = u16::from_be_bytes([init[0], init[1]]) as usize;
            c.h = u16::from_be_bytes([init[2], init[3]]) as usize;
            assert_eq!(&init[4..20], &PixelFormat::DEFAULT.encode());
            c.name = read_string(&mut s);
            c.fb = vec![0; c.w * c.h * 4];
            (c, Connect::Ok)
        }

        fn set_pixel_format(&mut self, pf: &PixelFormat) {
            let mut m = vec![0u8, 0, 0, 0];
            m.extend_from_slice(&pf.encode());
            self.s.write_all(&m).unwrap();
            self.bpp = usize::from(pf.bits_per_pixel / 8);
            self.fb = vec![0; self.w * self.h * self.bpp];
        }

        fn request(&mut self, incremental: bool, x: u16, y: u16, w: u16, h: u16) {
            let mut m = vec![3u8, u8::from(incremental)];
            for v in [x, y, w, h] {
                m.extend_from_slice(&v.to_be_bytes());
            }
            self.s.write_all(&m).unwrap();
        }

        /// Reads one FramebufferUpdate into `fb`; returns its rectangles.
        fn read_update(&mut self) -> Vec<Rect> {
            let mut hdr = [0u8; 4];
            self.s.read_exact(&mut hdr).unwrap();
            assert_eq!(hdr[0], 0, "FramebufferUpdate");
            let n = u16::from_be_bytes([hdr[2], hdr[3]]);
            let mut rects = Vec::new();
            for _ in 0..n {
                let mut r = [0u8; 12];
                self.s.read_exact(&mut r).unwrap();
                let f = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]) as usize;
                let rect = Rect {
                    x: f(0),
                    y: f(2),
                    w: f(4),
                    h: f(6),
                };
                assert_eq!(&r[8..12], &[0, 0, 0, 0], "Raw");
                assert!(rect.x + rect.w <= self.w && rect.y + rect.h <= self.h);
                let mut px = vec![0u8; rect.w * rect.h * self.bpp];
                self.s.read_exact(&mut px).unwrap();
                for row in 0..rect.h {
                    let dst = ((rect.y + row) * self.w + rect.x) * self.bpp;
                    let src = row * rect.w * self.bpp;
                    self.fb[dst..dst + rect.w * self.bpp]
                        .copy_from_slice(&px[src..src + rect.w * self.bpp]);
                }
                rects.push(rect);
            }
            rects
        }
    }

    #[test]
    fn handshake_none_and_full_then_incremental_updates() {
        let server = DemoServer::start(loopback(), cfg(None)).unwrap();
        let (mut c, r) = Client::connect(server.addr(), b"RFB 003.008\n", None);
        assert_eq!(r, Connect::Ok);
        assert_eq!((c.w, c.h, c.name.as_str()), (64, 48, "demo under test"));
        c.set_pixel_format(&PixelFormat::DEFAULT);
        c.s.write_all(&[2, 0, 0, 1, 0, 0, 0, 0]).unwrap(); // SetEncodings [Raw]
        c.request(false, 0, 0, 64, 48);
        let rects = c.read_update();
        assert_eq!(
            rects,
            vec![Rect {
                x: 0,
                y: 0,
                w: 64,
                h: 48
            }]
        );
        let first = c.fb.clone();
        let px: Vec<&[u8]> = first.chunks(4).collect();
        assert!(px.iter().any(|p| *p != px[0]), "pattern is not flat");
        // Colour bars: top-left is white, in 32bpp little-endian 0xFFRRGGBB
        // (unused bits are sent as ones, see `Converter::pad`).
        assert_eq!(px[0], &[0xFF, 0xFF, 0xFF, 0xFF]);

        c.request(true, 0, 0, 64, 48);
        let rects = c.read_update();
        assert!(!rects.is_empty());
        assert_ne!(c.fb, first, "the second frame differs");
        assert!(server.shared.panics.load(Ordering::Relaxed) == 0);
        server.stop();
    }

    #[test]
    fn requests_are_clipped() {
        let server = DemoServer::start(loopback(), cfg(None)).unwrap();
        let (mut c, _) = Client::connect(server.addr(), b"RFB 003.008\n", None);
        c.request(false, 60, 40, 1000, 1000);
        assert_eq!(
            c.read_update(),
            vec![Rect {
                x: 60,
                y: 40,
                w: 4,
                h: 8
            }]
        );
        c.request(false, 500, 500, 10, 10);
        assert_eq!(c.read_update(), vec![]);
        server.stop();
    }

    #[test]
    fn older_client_versions_are_served() {
        for pw in [None, Some("pw")] {
            let server = DemoServer::start(loopback(), cfg(pw)).unwrap();
            for v in [b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.005\n"] {
                let (mut c, r) = Client::connect(server.addr(), v, pw);
                assert_eq!(r, Connect::Ok, "{v:?} {pw:?}");
                c.request(false, 0, 0, 8, 8);
                assert_eq!(c.read_update().len(), 1);
            }
            server.stop();
        }
    }

    /// 16-bit 5-6-5 true colour, little- or big-endian.
    fn rgb565_format(big_endian: bool) -> PixelFormat {
        PixelFormat {
            bits_per_pixel: 16,
            depth: 16,
            big_endian,
            true_colour: true,
            red_max: 31,
            green_max: 63,
            blue_max: 31,
            red_shift: 11,
            green_shift: 5,
            blue_shift: 0,
        }
    }

    #[test]
    fn pixel_formats_convert() {
        let white = 0xFF_FF_FF;
        let red = 0xFF_00_00;
        let rgb565 = rgb565_format(false);
        let mut out = Vec::new();
        Converter::new(&rgb565).put_row(&[white, red], &mut out);
        assert_eq!(out, [0xFF, 0xFF, 0x00, 0xF8]);
        let be = PixelFormat {
            big_endian: true,
            ..rgb565
        };
        out.clear();
        Converter::new(&be).put_row(&[red], &mut out);
        assert_eq!(out, [0xF8, 0x00]);
        let bgr233 = PixelFormat {
            bits_per_pixel: 8,
            depth: 8,
            big_endian: false,
            true_colour: true,
            red_max: 7,
            green_max: 7,
            blue_max: 3,
            red_shift: 0,
            green_shift: 3,
            blue_shift: 6,
        };
        out.clear();
        Converter::new(&bgr233).put_row(&[white, red, 0x00_00_FF, 0x80_80_80], &mut out);
        assert_eq!(out, [0xFF, 0x07, 0xC0, 4 | (4 << 3) | (2 << 6)]);
        let bgr_be32 = PixelFormat {
            big_endian: true,
            red_shift: 0,
            blue_shift: 16,
            ..PixelFormat::DEFAULT
        };
        out.clear();
        Converter::new(&bgr_be32).put_row(&[0x12_34_56], &mut out);
        assert_eq!(out, [0xFF, 0x56, 0x34, 0x12]);
        // Silly shifts lose the channel instead of panicking.
        let odd = PixelFormat {
            red_shift: 200,
            green_max: 0xFFFF,
            green_shift: 31,
            ..PixelFormat::DEFAULT
        };
        out.clear();
        Converter::new(&odd).put_row(&[white], &mut out);
        // Green's one surviving bit and blue, plus the unused bits as ones.
        assert_eq!(out, (0x8000_0000u32 | 0xFF | 0x7FFF_FF00).to_le_bytes());
    }

    #[test]
    fn client_pixel_format_over_the_wire() {
        let server = DemoServer::start(loopback(), cfg(None)).unwrap();
        let (mut c, _) = Client::connect(server.addr(), b"RFB 003.008\n", None);
        let rgb565be = rgb565_format(true);
        c.set_pixel_format(&rgb565be);
        c.request(false, 0, 0, 64, 48);
        assert_eq!(c.read_update().len(), 1);
        assert_eq!(c.fb.len(), 64 * 48 * 2);
        assert_eq!(&c.fb[..2], &[0xFF, 0xFF], "white bar");
        // A colour-map format is refused by disconnecting.
        let cmap = PixelFormat {
            true_colour: false,
            bits_per_pixel: 8,
            ..PixelFormat::DEFAULT
        };
        c.set_pixel_format(&cmap);
        let mut b = [0u8; 1];
        assert!(matches!(c.s.read(&mut b), Ok(0) | Err(_)));
        server.stop();
    }

    #[test]
    fn pointer_and_keys_show_up() {
        let server = DemoServer::start(
            loopback(),
            DemoConfig {
                frame_interval_ms: 200,
                ..cfg(None)
            },
        )
        .unwrap();
        let (mut c, _) = Client::connect(server.addr(), b"RFB 003.008\n", None);
        c.request(false, 0, 0, 64, 48);
        c.read_update();
        let before = c.fb.clone();
        // Pointer at (10, 20) with a button down; the square is red there.
        c.s.write_all(&[5, 1, 0, 10, 0, 20]).unwrap();
        c.request(false, 0, 0, 64, 48);
        c.read_update();
        let at =
            |fb: &[u8], x: usize, y: usize| fb[(y * 64 + x) * 4..(y * 64 + x) * 4 + 4].to_vec();
        assert_eq!(at(&c.fb, 10, 20), [0, 0, 0xFF, 0xFF]);
        assert_ne!(before, c.fb);
        c.s.write_all(&[4, 1, 0, 0, 0, 0, 0, 0x61]).unwrap();
        // ClientCutText is skipped whatever its content.
        let mut cut = vec![6u8, 0, 0, 0, 0, 0, 0, 5];
        cut.extend_from_slice(b"\x03\x03\x03\x03\x03");
        c.s.write_all(&cut).unwrap();
        c.request(false, 0, 0, 64, 48);
        c.read_update();
        server.stop();
    }

    #[test]
    fn vnc_auth_right_and_wrong_password() {
        let server = DemoServer::start(loopback(), cfg(Some("s3cret"))).unwrap();
        let (_, r) = Client::connect(server.addr(), b"RFB 003.008\n", Some("s3cret"));
        assert_eq!(r, Connect::Ok);
        let (_, r) = Client::connect(server.addr(), b"RFB 003.008\n", Some("wrong"));
        assert_eq!(r, Connect::Failed(AUTH_FAILED.to_owned()));
        // 3.7 and 3.3 clients get a failure without a reason.
        let (_, r) = Client::connect(server.addr(), b"RFB 003.007\n", Some("wrong"));
        assert_eq!(r, Connect::Failed(String::new()));
        // Only the first 8 bytes count.
        let server2 = DemoServer::start(loopback(), cfg(Some("12345678-ignored"))).unwrap();
        let (_, r) = Client::connect(server2.addr(), b"RFB 003.008\n", Some("12345678"));
        assert_eq!(r, Connect::Ok);
        server.stop();
        server2.stop();
    }

    fn wait_until(mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "condition not reached in 5 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn max_clients_is_enforced() {
        let server = DemoServer::start(
            loopback(),
            DemoConfig {
                max_clients: 2,
                ..cfg(None)
            },
        )
        .unwrap();
        let (a, ra) = Client::connect(server.addr(), b"RFB 003.008\n", None);
        let (_b, rb) = Client::connect(server.addr(), b"RFB 003.008\n", None);
        assert_eq!((ra, rb), (Connect::Ok, Connect::Ok));
        assert_eq!(server.active_clients(), 2);
        for v in [b"RFB 003.008\n", b"RFB 003.003\n"] {
            let (_, r) = Client::connect(server.addr(), v, None);
            assert_eq!(r, Connect::Failed(TOO_MANY_CLIENTS.to_owned()));
        }
        // A slot frees when a client leaves.
        drop(a);
        wait_until(|| server.active_clients() == 1);
        let (_c, rc) = Client::connect(server.addr(), b"RFB 003.008\n", None);
        assert_eq!(rc, Connect::Ok);
        server.stop();
    }

    #[test]
    fn stop_is_prompt_with_clients_connected() {
        let server = DemoServer::start(
            loopback(),
            DemoConfig {
                max_clients: 8,
                ..cfg(None)
            },
        )
        .unwrap();
        let mut clients = Vec::new();
        for _ in 0..3 {
            let (mut c, r) = Client::connect(server.addr(), b"RFB 003.008\n", None);
            assert_eq!(r, Connect::Ok);
            c.request(true, 0, 0, 64, 48);
            clients.push(c);
        }
        // One more mid-handshake, and one that never speaks.
        let mut half = TcpStream::connect(server.addr()).unwrap();
        let mut v = [0u8; 12];
        half.read_exact(&mut v).unwrap();
        let _silent = TcpStream::connect(server.addr()).unwrap();
        wait_until(|| server.active_clients() == 5);
        let t = Instant::now();
        server.stop();
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "stop took {:?}",
            t.elapsed()
        );
        for c in &mut clients {
            // Drain whatever update was in flight; then EOF or reset.
            let mut buf = vec![0u8; 65536];
            loop {
                match c.s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }

    #[test]
    fn idle_clients_are_dropped() {
        let server =
            DemoServer::start_with_idle(loopback(), cfg(None), Duration::from_millis(50)).unwrap();
        let (mut c, r) = Client::connect(server.addr(), b"RFB 003.008\n", None);
        assert_eq!(r, Connect::Ok);
        let mut b = [0u8; 1];
        assert!(matches!(c.s.read(&mut b), Ok(0) | Err(_)));
        wait_until(|| server.active_clients() == 0);
        server.stop();
    }

    #[test]
    fn config_debug_hides_password() {
        let dbg = format!("{:?}", cfg(Some("hunter2")));
        assert!(
            !dbg.contains("hunter2") && dbg.contains("<redacted>"),
            "{dbg}"
        );
    }

    #[test]
    fn bad_config_is_refused() {
        assert!(DemoServer::start(
            loopback(),
            DemoConfig {
                width: 0,
                ..cfg(None)
            }
        )
        .is_err());
        assert!(DemoServer::start(
            loopback(),
            DemoConfig {
                height: MAX_DIMENSION + 1,
                ..cfg(None)
            }
        )
        .is_err());
    }

    #[test]
    fn oversized_messages_disconnect() {
        let server = DemoServer::start(loopback(), cfg(None)).unwrap();
        for msg in [
            vec![2u8, 0, 0xFF, 0xFF],                   // 65535 encodings
            vec![6u8, 0, 0, 0, 0x7F, 0xFF, 0xFF, 0xFF], // 2 GiB of cut text
            vec![6u8, 0, 0, 0, 0x80, 0, 0, 0],          // i32::MIN length
            vec![77u8],                                 // unknown type
        ] {
            let (mut c, _) = Client::connect(server.addr(), b"RFB 003.008\n", None);
            c.s.write_all(&msg).unwrap();
            let mut b = [0u8; 1];
            assert!(matches!(c.s.read(&mut b), Ok(0) | Err(_)), "{msg:?}");
        }
        assert_eq!(server.shared.panics.load(Ordering::Relaxed), 0);
        server.stop();
    }

    fn message_soup() -> impl Strategy<Value = Vec<u8>> {
        let one = (
            prop_oneof![
                Just(0u8),
                Just(2),
                Just(3),
                Just(4),
                Just(5),
                Just(6),
                any::<u8>()
            ],
            proptest::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(t, mut rest)| {
                rest.insert(0, t);
                rest
            });
        proptest::collection::vec(one, 0..8).prop_map(|v| v.concat())
    }

    #[test]
    fn garbage_never_panics_the_server() {
        let server = DemoServer::start(
            loopback(),
            DemoConfig {
                max_clients: 64,
                ..cfg(Some("pw"))
            },
        )
        .unwrap();
        let addr = server.addr();
        let config = ProptestConfig {
            cases: 48,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        proptest!(config, |(pre in proptest::collection::vec(any::<u8>(), 0..64), soup in message_soup(), authed in any::<bool>())| {
            if authed {
                let (mut c, r) = Client::connect(addr, b"RFB 003.008\n", Some("pw"));
                prop_assert_eq!(r, Connect::Ok);
                let _ = c.s.write_all(&soup);
                let _ = c.s.shutdown(Shutdown::Write);
                // Read until the server is done with us (bounded by updates
                // the soup asked for and the 5 s read timeout).
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = c.s.read(&mut buf) { if n == 0 { break; } }
            } else {
                let mut s = TcpStream::connect(addr).unwrap();
                let _ = s.write_all(&pre);
                let _ = s.write_all(&soup);
            }
        });
        // Still serving after all that.
        let (mut c, r) = Client::connect(addr, b"RFB 003.008\n", Some("pw"));
        assert_eq!(r, Connect::Ok);
        c.request(false, 0, 0, 64, 48);
        assert_eq!(c.read_update().len(), 1);
        assert_eq!(server.shared.panics.load(Ordering::Relaxed), 0);
        server.stop();
    }

    #[test]
    fn handshake_terminator_authenticates_to_demo() {
        use rfb::{Handshake, RfbError, RfbLimits};
        let server = DemoServer::start(loopback(), cfg(Some("s3cret"))).unwrap();

        // Drives `Handshake` over a real socket to the demo server, with a
        // pipelining in-memory browser; returns what the browser received.
        let run = |password: &[u8]| -> (Result<(), RfbError>, Vec<u8>, TcpStream) {
            let mut backend = TcpStream::connect(server.addr()).unwrap();
            backend
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut hs = Handshake::new(Some(password), RfbLimits::default());
            let mut to_browser = Vec::new();
            // The browser (noVNC-like, 3.8, None, shared) says everything at once.
            assert_eq!(hs.on_browser(b"RFB 003.008\n\x01\x01"), Ok(14));
            let mut buf = [0u8; 4096];
            while !hs.is_done() {
                backend.write_all(&hs.take_to_backend()).unwrap();
                to_browser.extend_from_slice(&hs.take_to_browser());
                let n = backend.read(&mut buf).unwrap();
                assert!(n > 0, "backend closed during handshake");
                match hs.on_backend(&buf[..n]) {
                    Ok(used) => {
                        to_browser.extend_from_slice(&hs.take_to_browser());
                        to_browser.extend_from_slice(&buf[used..n]);
                    }
                    Err(e) => {
                        to_browser.extend_from_slice(&hs.take_to_browser());
                        return (Err(e), to_browser, backend);
                    }
                }
            }
            backend.write_all(&hs.take_to_backend()).unwrap();
            to_browser.extend_from_slice(&hs.take_to_browser());
            (Ok(()), to_browser, backend)
        };

        let (r, to_browser, mut backend) = run(b"s3cret");
        assert_eq!(r, Ok(()));
        assert_eq!(to_browser, b"RFB 003.008\n\x01\x01\0\0\0\0");
        // Relay: the ServerInit now arrives untouched.
        let mut init = [0u8; 20];
        backend.read_exact(&mut init).unwrap();
        assert_eq!(&init[..4], &[0, 64, 0, 48]);
        assert_eq!(read_string(&mut backend), "demo under test");

        let (r, to_browser, _) = run(b"nope");
        assert_eq!(
            r,
            Err(RfbError::AuthFailed {
                reason: AUTH_FAILED.to_owned()
            })
        );
        // The browser learns why in its own SecurityResult.
        let notice = &to_browser[14..];
        assert_eq!(&notice[..4], &[0, 0, 0, 1]);
        assert!(String::from_utf8_lossy(&notice[8..]).contains(AUTH_FAILED));
        server.stop();
    }
}
