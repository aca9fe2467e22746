//! Thumbnails of any VNC server, taken without disturbing its users: the
//! appliance's own short RFB connection.
//!
//! What it does: connects over TCP (tokio), speaks RFB 3.3, 3.7 or 3.8 as a
//! client with security None or VNC Authentication, sends ClientInit with the
//! *shared* flag set (so the server keeps every other viewer connected),
//! asks for 32-bit true colour in Raw encoding, sends one non-incremental
//! FramebufferUpdateRequest for the whole screen, reads rectangles until the
//! screen is covered (skipping Bell, ServerCutText and SetColourMapEntries
//! in between, and the common pseudo-encodings should a server send them),
//! then closes and scales the pixels into a PNG ([`super::thumbnail`]).
//!
//! Everything the server sends is hostile input: every length is checked
//! against a named limit before anything is read or allocated, each read
//! has a timeout, the whole snapshot has one, and the bytes read are
//! bounded ([`SnapshotLimits`]). A misbehaving server is a typed
//! [`SnapshotError`], never a panic.
//!
//! What it does not do: keep connections open, send input, or speak any
//! encoding but Raw (every server must support it). It depends on the model,
//! the thumbnail encoder and `protocol::rfb`'s DES response, nothing else.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::model::{HvResult, HypervisorError, Thumbnail, ThumbnailSize};
use super::thumbnail;
use crate::protocol::rfb;

/// Largest framebuffer accepted, in pixels: what the thumbnail encoder
/// accepts (4 bytes each), 16 Mi pixels, e.g. 4096 × 4096. The pixels are
/// held once, so this is also the memory one snapshot may cost.
pub const MAX_FRAMEBUFFER_PIXELS: u64 = thumbnail::MAX_SOURCE_BYTES / 4;
/// Time one read (or write) may wait for the server.
pub const READ_TIMEOUT_MS: u64 = 5_000;
/// Time a whole snapshot may take, connect to close.
pub const TOTAL_TIMEOUT_MS: u64 = 15_000;
/// Bytes read beyond the pixels of the asked updates: handshake, headers,
/// cursor shapes, clipboard text. A server sending more is cut off.
pub const MAX_OVERHEAD_BYTES: u64 = 4 * 1024 * 1024;
/// Full-screen update requests sent before giving up on covering the
/// screen (a server may answer one request with part of the screen).
pub const MAX_UPDATE_ROUNDS: u32 = 4;
/// Longest desktop name (ServerInit) accepted; it is read and dropped.
pub const MAX_NAME_BYTES: u32 = 4096;
/// Longest failure reason kept from the server; the rest is not read.
pub const MAX_REASON_BYTES: u32 = 1024;
/// Longest ServerCutText skipped; more is treated as hostile.
pub const MAX_CUT_TEXT_BYTES: u32 = 1024 * 1024;
/// Bytes skipped per read when discarding data.
const SKIP_CHUNK_BYTES: usize = 16 * 1024;

/// RFB message and encoding numbers (RFC 6143 7.5, 7.6, 7.7, 7.8).
const CLIENT_SET_PIXEL_FORMAT: u8 = 0;
const CLIENT_SET_ENCODINGS: u8 = 2;
const CLIENT_UPDATE_REQUEST: u8 = 3;
const SERVER_UPDATE: u8 = 0;
const SERVER_COLOUR_MAP: u8 = 1;
const SERVER_BELL: u8 = 2;
const SERVER_CUT_TEXT: u8 = 3;
const ENCODING_RAW: i32 = 0;
const ENCODING_LAST_RECT: i32 = -224;
const ENCODING_DESKTOP_SIZE: i32 = -223;
const ENCODING_POINTER_POS: i32 = -232;
const ENCODING_CURSOR: i32 = -239;
const ENCODING_X_CURSOR: i32 = -240;
const ENCODING_EXTENDED_DESKTOP_SIZE: i32 = -308;
/// Bytes per pixel of the format we ask for.
const BYTES_PER_PIXEL: u64 = 4;

/// The pixel format we ask for: 32 bits per pixel, depth 24, little-endian,
/// true colour, red in the low byte — so each pixel arrives as the bytes
/// R, G, B, padding and becomes RGBA by setting the last byte.
const PIXEL_FORMAT: [u8; 16] = [
    32, 24, 0, 1, // bits per pixel, depth, big-endian flag, true colour
    0, 255, 0, 255, 0, 255, // red, green, blue maxima (u16 each)
    0, 8, 16, // red, green, blue shifts
    0, 0, 0, // padding
];

/// Bounds of one snapshot. [`Default`] gives the named constants above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotLimits {
    /// Largest framebuffer accepted, in pixels (at most
    /// [`MAX_FRAMEBUFFER_PIXELS`], which the encoder enforces anyway).
    pub max_framebuffer_pixels: u64,
    /// Time one read or write may wait.
    pub read_timeout_ms: u64,
    /// Time the whole snapshot may take.
    pub total_timeout_ms: u64,
    /// Most bytes read from the server. The effective bound of a snapshot
    /// is the smaller of this and the screen's pixels times
    /// [`MAX_UPDATE_ROUNDS`] plus [`MAX_OVERHEAD_BYTES`].
    pub max_read_bytes: u64,
}

impl Default for SnapshotLimits {
    fn default() -> Self {
        SnapshotLimits {
            max_framebuffer_pixels: MAX_FRAMEBUFFER_PIXELS,
            read_timeout_ms: READ_TIMEOUT_MS,
            total_timeout_ms: TOTAL_TIMEOUT_MS,
            max_read_bytes: MAX_FRAMEBUFFER_PIXELS * BYTES_PER_PIXEL * u64::from(MAX_UPDATE_ROUNDS)
                + MAX_OVERHEAD_BYTES,
        }
    }
}

/// Why a snapshot failed. The VNC server is always the side at fault,
/// except for a wrong configured password.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot connect to VNC server {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("VNC server connection failed: {0}")]
    Io(io::Error),
    #[error("VNC server closed the connection during the snapshot")]
    Closed,
    #[error("VNC server sent nothing for {0} ms")]
    ReadTimeout(u64),
    #[error("VNC snapshot took longer than {0} ms")]
    TotalTimeout(u64),
    #[error("not an RFB (VNC) server: its first bytes are not \"RFB xxx.yyy\\n\"")]
    NotRfb,
    #[error("VNC server speaks RFB {major}.{minor}, not 3.3 to 3.8")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("VNC server refused the connection: {0}")]
    Refused(String),
    #[error(
        "VNC server offers security types {offered:?}; usable are None (1){}",
        if *password_configured { " and VNC Authentication (2)" } else { ", and VNC Authentication (2) with a configured password" }
    )]
    NoCommonSecurity {
        offered: Vec<u8>,
        password_configured: bool,
    },
    #[error("VNC server rejected the password: {0}")]
    AuthFailed(String),
    #[error("VNC framebuffer {width}x{height} is empty or larger than {max_pixels} pixels")]
    BadSize {
        width: u16,
        height: u16,
        max_pixels: u64,
    },
    #[error("VNC server sent more than {0} bytes for one snapshot")]
    TooMuchData(u64),
    #[error("VNC server did not cover its screen in {0} full-screen updates")]
    Incomplete(u32),
    #[error("VNC server protocol error: {0}")]
    Protocol(String),
}

impl From<SnapshotError> for HypervisorError {
    fn from(e: SnapshotError) -> Self {
        match e {
            SnapshotError::Connect { .. } | SnapshotError::Io(_) | SnapshotError::Refused(_) => {
                HypervisorError::Unreachable(e.to_string())
            }
            SnapshotError::ReadTimeout(ms) | SnapshotError::TotalTimeout(ms) => {
                HypervisorError::Timeout(Duration::from_millis(ms))
            }
            SnapshotError::AuthFailed(_) | SnapshotError::NoCommonSecurity { .. } => {
                HypervisorError::Auth(e.to_string())
            }
            _ => HypervisorError::Protocol(e.to_string()),
        }
    }
}

/// The screen as read: `width × height` RGBA pixels (alpha 255 where the
/// server sent the pixel, 0 where it did not).
#[derive(Clone, PartialEq, Eq)]
pub struct Framebuffer {
    pub width: u32,
    pub height: u32,
    pub rgba: Vec<u8>,
    /// Pixels the server has sent at least once.
    covered: u64,
}

impl std::fmt::Debug for Framebuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framebuffer")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("covered", &self.covered)
            .finish()
    }
}

impl Framebuffer {
    fn new(width: u16, height: u16, limits: &SnapshotLimits) -> Result<Self, SnapshotError> {
        let pixels = u64::from(width) * u64::from(height);
        let max = limits.max_framebuffer_pixels.min(MAX_FRAMEBUFFER_PIXELS);
        if pixels == 0 || pixels > max {
            return Err(SnapshotError::BadSize {
                width,
                height,
                max_pixels: max,
            });
        }
        Ok(Framebuffer {
            width: u32::from(width),
            height: u32::from(height),
            rgba: vec![0; (pixels * BYTES_PER_PIXEL) as usize],
            covered: 0,
        })
    }

    fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    fn is_complete(&self) -> bool {
        self.covered >= self.pixels()
    }

    /// Stores one row of wire pixels (R, G, B, padding) at (x, y), which
    /// the caller has checked lie inside the screen.
    fn put_row(&mut self, x: u32, y: u32, wire: &[u8]) {
        let start =
            ((u64::from(y) * u64::from(self.width) + u64::from(x)) * BYTES_PER_PIXEL) as usize;
        let Some(dest) = self.rgba.get_mut(start..start + wire.len()) else {
            debug_assert!(false, "row outside the framebuffer");
            return;
        };
        for (to, from) in dest.chunks_exact_mut(4).zip(wire.chunks_exact(4)) {
            if to[3] == 0 {
                self.covered += 1;
            }
            to[..3].copy_from_slice(&from[..3]);
            to[3] = 255;
        }
    }
}

/// A thumbnail of the VNC server at `host:port`, scaled to fit `size`.
/// The PNG encoding runs on tokio's blocking pool so the control thread
/// stays free.
pub async fn snapshot(
    host: &str,
    port: u16,
    password: Option<&str>,
    size: ThumbnailSize,
    limits: &SnapshotLimits,
) -> HvResult<Thumbnail> {
    let fb = capture(host, port, password, limits).await?;
    tokio::task::spawn_blocking(move || thumbnail::from_rgba(fb.width, fb.height, fb.rgba, size))
        .await
        .map_err(|e| HypervisorError::Protocol(format!("thumbnail encoding task failed: {e}")))?
}

/// Reads the whole screen of the VNC server at `host:port` once.
pub async fn capture(
    host: &str,
    port: u16,
    password: Option<&str>,
    limits: &SnapshotLimits,
) -> Result<Framebuffer, SnapshotError> {
    let total = Duration::from_millis(limits.total_timeout_ms);
    timeout(total, capture_within(host, port, password, limits))
        .await
        .map_err(|_| SnapshotError::TotalTimeout(limits.total_timeout_ms))?
}

async fn capture_within(
    host: &str,
    port: u16,
    password: Option<&str>,
    limits: &SnapshotLimits,
) -> Result<Framebuffer, SnapshotError> {
    let read_timeout = Duration::from_millis(limits.read_timeout_ms);
    let stream = timeout(read_timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| SnapshotError::ReadTimeout(limits.read_timeout_ms))?
        .map_err(|source| SnapshotError::Connect {
            addr: format!("{host}:{port}"),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let mut wire = Wire::new(stream, limits);
    let version = negotiate_version(&mut wire).await?;
    authenticate(&mut wire, version, password).await?;
    let fb = initialise(&mut wire, limits).await?;
    read_screen(&mut wire, fb, limits).await
}

/// The versions we speak (RFC 6143 7.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V3_3,
    V3_7,
    V3_8,
}

/// What to answer a server's "RFB xxx.yyy\n".
fn parse_version(greeting: &[u8; 12]) -> Result<Version, SnapshotError> {
    let digits = |range: std::ops::Range<usize>| -> Option<u16> {
        let field = greeting.get(range)?;
        if !field.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(field).ok()?.parse().ok()
    };
    if &greeting[..4] != b"RFB " || greeting[7] != b'.' || greeting[11] != b'\n' {
        return Err(SnapshotError::NotRfb);
    }
    let (Some(major), Some(minor)) = (digits(4..7), digits(8..11)) else {
        return Err(SnapshotError::NotRfb);
    };
    match (major, minor) {
        // Unknown 3.x minors are 3.3 by the RFC; 4.x and 5.x (RealVNC)
        // and 3.889 (Apple) accept 3.8 clients.
        (3, 3..=6) => Ok(Version::V3_3),
        (3, 7) => Ok(Version::V3_7),
        (3, 8..) | (4 | 5, _) => Ok(Version::V3_8),
        _ => Err(SnapshotError::UnsupportedVersion { major, minor }),
    }
}

async fn negotiate_version(wire: &mut Wire) -> Result<Version, SnapshotError> {
    let mut greeting = [0u8; 12];
    wire.read_exact(&mut greeting).await?;
    let version = parse_version(&greeting)?;
    let answer: &[u8; 12] = match version {
        Version::V3_3 => b"RFB 003.003\n",
        Version::V3_7 => b"RFB 003.007\n",
        Version::V3_8 => b"RFB 003.008\n",
    };
    wire.write_all(answer).await?;
    Ok(version)
}

/// The security phase: choose None or VNC Authentication, answer the
/// challenge, read the result.
async fn authenticate(
    wire: &mut Wire,
    version: Version,
    password: Option<&str>,
) -> Result<(), SnapshotError> {
    let chosen = if version == Version::V3_3 {
        // 3.3: the server decides; 0 means it refuses, with a reason.
        match wire.u32().await? {
            0 => return Err(SnapshotError::Refused(wire.reason().await?)),
            t => {
                let t = u8::try_from(t).map_err(|_| {
                    SnapshotError::Protocol(format!("security type {t} does not exist"))
                })?;
                pick_security(&[t], password)?
            }
        }
    } else {
        let count = wire.u8().await?;
        if count == 0 {
            return Err(SnapshotError::Refused(wire.reason().await?));
        }
        let mut offered = vec![0u8; usize::from(count)];
        wire.read_exact(&mut offered).await?;
        let chosen = pick_security(&offered, password)?;
        wire.write_all(&[chosen]).await?;
        chosen
    };
    if chosen == rfb::SECURITY_VNC_AUTH {
        let mut challenge = [0u8; rfb::CHALLENGE_LEN];
        wire.read_exact(&mut challenge).await?;
        let password = password.unwrap_or_default().as_bytes();
        wire.write_all(&rfb::vnc_auth_response(password, &challenge))
            .await?;
    } else if version != Version::V3_8 {
        // Before 3.8 there is no SecurityResult after None.
        return Ok(());
    }
    match wire.u32().await? {
        0 => Ok(()),
        _ if version == Version::V3_8 => Err(SnapshotError::AuthFailed(wire.reason().await?)),
        _ => Err(SnapshotError::AuthFailed(
            "no reason given (RFB 3.3/3.7)".into(),
        )),
    }
}

/// None when offered (no secret needed), else VNC Authentication when we
/// have a password.
fn pick_security(offered: &[u8], password: Option<&str>) -> Result<u8, SnapshotError> {
    if offered.contains(&rfb::SECURITY_NONE) {
        Ok(rfb::SECURITY_NONE)
    } else if offered.contains(&rfb::SECURITY_VNC_AUTH) && password.is_some() {
        Ok(rfb::SECURITY_VNC_AUTH)
    } else {
        Err(SnapshotError::NoCommonSecurity {
            offered: offered.to_vec(),
            password_configured: password.is_some(),
        })
    }
}

/// ClientInit (shared) → ServerInit → our pixel format, Raw, and the one
/// full-screen update request.
async fn initialise(
    wire: &mut Wire,
    limits: &SnapshotLimits,
) -> Result<Framebuffer, SnapshotError> {
    // Shared flag 1: the server must not disconnect its other viewers
    // (TigerVNC, QEMU and others do so for a non-shared client).
    wire.write_all(&[1]).await?;
    let width = wire.u16().await?;
    let height = wire.u16().await?;
    let mut server_format = [0u8; 16];
    wire.read_exact(&mut server_format).await?;
    let name_len = wire.u32().await?;
    if name_len > MAX_NAME_BYTES {
        return Err(SnapshotError::Protocol(format!(
            "desktop name of {name_len} bytes (at most {MAX_NAME_BYTES})"
        )));
    }
    wire.skip(u64::from(name_len)).await?;
    let fb = Framebuffer::new(width, height, limits)?;
    // Now that the screen size is known, bound the bytes to what reading it
    // can take (the configured bound applies as well).
    wire.max_read_bytes = wire.max_read_bytes.min(
        wire.read_bytes
            + fb.pixels() * BYTES_PER_PIXEL * u64::from(MAX_UPDATE_ROUNDS)
            + MAX_OVERHEAD_BYTES,
    );
    let mut out = Vec::with_capacity(20 + 8 + 10);
    out.extend_from_slice(&[CLIENT_SET_PIXEL_FORMAT, 0, 0, 0]);
    out.extend_from_slice(&PIXEL_FORMAT);
    out.extend_from_slice(&[CLIENT_SET_ENCODINGS, 0]);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&ENCODING_RAW.to_be_bytes());
    out.extend_from_slice(&update_request(&fb));
    wire.write_all(&out).await?;
    Ok(fb)
}

/// A non-incremental FramebufferUpdateRequest for the whole screen.
fn update_request(fb: &Framebuffer) -> [u8; 10] {
    let mut req = [CLIENT_UPDATE_REQUEST, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    // Sizes came from u16 fields, so they fit.
    req[6..8].copy_from_slice(&(fb.width as u16).to_be_bytes());
    req[8..10].copy_from_slice(&(fb.height as u16).to_be_bytes());
    req
}

/// Reads server messages until the screen is covered.
async fn read_screen(
    wire: &mut Wire,
    mut fb: Framebuffer,
    limits: &SnapshotLimits,
) -> Result<Framebuffer, SnapshotError> {
    let mut rounds = 1;
    loop {
        match wire.u8().await? {
            SERVER_UPDATE => {
                read_update(wire, &mut fb, limits).await?;
                if fb.is_complete() {
                    return Ok(fb);
                }
                if rounds >= MAX_UPDATE_ROUNDS {
                    return Err(SnapshotError::Incomplete(rounds));
                }
                rounds += 1;
                wire.write_all(&update_request(&fb)).await?;
            }
            SERVER_COLOUR_MAP => {
                // Padding, first colour; then 6 bytes per colour. We asked
                // for true colour, so the map is of no use.
                wire.skip(3).await?;
                let count = wire.u16().await?;
                wire.skip(6 * u64::from(count)).await?;
            }
            SERVER_BELL => {}
            SERVER_CUT_TEXT => {
                wire.skip(3).await?;
                let len = wire.u32().await?;
                if len > MAX_CUT_TEXT_BYTES {
                    return Err(SnapshotError::Protocol(format!(
                        "clipboard text of {len} bytes (at most {MAX_CUT_TEXT_BYTES})"
                    )));
                }
                wire.skip(u64::from(len)).await?;
            }
            other => {
                return Err(SnapshotError::Protocol(format!(
                    "unexpected server message type {other}"
                )))
            }
        }
    }
}

/// One rectangle header (RFC 6143 7.6.1).
#[derive(Debug, Clone, Copy)]
struct Rect {
    x: u16,
    y: u16,
    width: u16,
    height: u16,
    encoding: i32,
}

/// One FramebufferUpdate, after its type byte.
async fn read_update(
    wire: &mut Wire,
    fb: &mut Framebuffer,
    limits: &SnapshotLimits,
) -> Result<(), SnapshotError> {
    wire.skip(1).await?;
    let count = wire.u16().await?;
    for _ in 0..count {
        let rect = Rect {
            x: wire.u16().await?,
            y: wire.u16().await?,
            width: wire.u16().await?,
            height: wire.u16().await?,
            encoding: wire.i32().await?,
        };
        match rect.encoding {
            ENCODING_RAW => read_raw(wire, fb, rect).await?,
            ENCODING_LAST_RECT => break,
            ENCODING_DESKTOP_SIZE => *fb = Framebuffer::new(rect.width, rect.height, limits)?,
            ENCODING_EXTENDED_DESKTOP_SIZE => {
                let screens = wire.u8().await?;
                wire.skip(3 + 16 * u64::from(screens)).await?;
                // y is the status of a resize we asked for (we never do);
                // only a change that succeeded resizes.
                if rect.y == 0 {
                    *fb = Framebuffer::new(rect.width, rect.height, limits)?;
                }
            }
            ENCODING_POINTER_POS => {}
            ENCODING_CURSOR => {
                let (w, h) = (u64::from(rect.width), u64::from(rect.height));
                wire.skip(w * h * BYTES_PER_PIXEL + w.div_ceil(8) * h)
                    .await?;
            }
            ENCODING_X_CURSOR => {
                let (w, h) = (u64::from(rect.width), u64::from(rect.height));
                if w * h > 0 {
                    wire.skip(6 + 2 * w.div_ceil(8) * h).await?;
                }
            }
            other => {
                return Err(SnapshotError::Protocol(format!(
                    "rectangle in encoding {other}, which was not asked for"
                )))
            }
        }
    }
    Ok(())
}

async fn read_raw(wire: &mut Wire, fb: &mut Framebuffer, rect: Rect) -> Result<(), SnapshotError> {
    let (x, y) = (u32::from(rect.x), u32::from(rect.y));
    let (w, h) = (u32::from(rect.width), u32::from(rect.height));
    if x + w > fb.width || y + h > fb.height {
        return Err(SnapshotError::Protocol(format!(
            "rectangle {w}x{h} at {x},{y} outside the {}x{} screen",
            fb.width, fb.height
        )));
    }
    // Charge the whole rectangle first: a hostile size fails before any
    // reading, not after megabytes.
    wire.charge(u64::from(w) * u64::from(h) * BYTES_PER_PIXEL)?;
    let mut row = vec![0u8; (u64::from(w) * BYTES_PER_PIXEL) as usize];
    for line in 0..h {
        wire.read_charged(&mut row).await?;
        fb.put_row(x, y + line, &row);
    }
    Ok(())
}

/// The connection, with the per-read timeout and the byte budget applied
/// to every read.
struct Wire {
    stream: BufReader<TcpStream>,
    read_timeout_ms: u64,
    read_bytes: u64,
    max_read_bytes: u64,
}

impl Wire {
    fn new(stream: TcpStream, limits: &SnapshotLimits) -> Self {
        Wire {
            stream: BufReader::new(stream),
            read_timeout_ms: limits.read_timeout_ms,
            read_bytes: 0,
            max_read_bytes: limits.max_read_bytes,
        }
    }

    /// Counts `n` bytes against the budget before they are read.
    fn charge(&mut self, n: u64) -> Result<(), SnapshotError> {
        self.read_bytes = self.read_bytes.saturating_add(n);
        if self.read_bytes > self.max_read_bytes {
            return Err(SnapshotError::TooMuchData(self.max_read_bytes));
        }
        Ok(())
    }

    async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), SnapshotError> {
        self.charge(buf.len() as u64)?;
        self.read_charged(buf).await
    }

    /// Reads bytes already counted by [`Wire::charge`].
    async fn read_charged(&mut self, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let limit = Duration::from_millis(self.read_timeout_ms);
        match timeout(limit, self.stream.read_exact(buf)).await {
            Err(_) => Err(SnapshotError::ReadTimeout(self.read_timeout_ms)),
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(SnapshotError::Closed),
            Ok(Err(e)) => Err(SnapshotError::Io(e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> Result<(), SnapshotError> {
        let limit = Duration::from_millis(self.read_timeout_ms);
        timeout(limit, self.stream.get_mut().write_all(data))
            .await
            .map_err(|_| SnapshotError::ReadTimeout(self.read_timeout_ms))?
            .map_err(SnapshotError::Io)
    }

    async fn skip(&mut self, n: u64) -> Result<(), SnapshotError> {
        self.charge(n)?;
        let mut scratch = [0u8; SKIP_CHUNK_BYTES];
        let mut left = n;
        while left > 0 {
            let step = left.min(SKIP_CHUNK_BYTES as u64) as usize;
            self.read_charged(&mut scratch[..step]).await?;
            left -= step as u64;
        }
        Ok(())
    }

    async fn u8(&mut self) -> Result<u8, SnapshotError> {
        let mut b = [0u8; 1];
        self.read_exact(&mut b).await?;
        Ok(b[0])
    }

    async fn u16(&mut self) -> Result<u16, SnapshotError> {
        let mut b = [0u8; 2];
        self.read_exact(&mut b).await?;
        Ok(u16::from_be_bytes(b))
    }

    async fn u32(&mut self) -> Result<u32, SnapshotError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b).await?;
        Ok(u32::from_be_bytes(b))
    }

    async fn i32(&mut self) -> Result<i32, SnapshotError> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b).await?;
        Ok(i32::from_be_bytes(b))
    }

    /// A length-prefixed reason string, cut to [`MAX_REASON_BYTES`] (the
    /// connection is ending, so the rest is not read).
    async fn reason(&mut self) -> Result<String, SnapshotError> {
        let len = self.u32().await?;
        let mut text = vec![0u8; len.min(MAX_REASON_BYTES) as usize];
        self.read_exact(&mut text).await?;
        let mut reason = String::from_utf8_lossy(&text).into_owned();
        if len > MAX_REASON_BYTES {
            reason.push('…');
        }
        Ok(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::demo::{DemoConfig, DemoServer};
    use std::net::SocketAddr;
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    /// One step of a scripted (possibly hostile) server.
    #[derive(Debug, Clone)]
    enum Step {
        Send(Vec<u8>),
        /// Reads exactly these bytes from the client, or fails the script.
        Expect(Vec<u8>),
        /// Stays silent far longer than any test's timeouts.
        Hang,
        /// Ends the server's side of the stream (FIN).
        Close,
    }

    /// Serves `script` to one client on 127.0.0.1; the handle says whether
    /// the client sent what the script expected. Afterwards it reads (and
    /// drops) what the client sends until it closes, so the client sees
    /// every byte sent rather than a reset.
    async fn scripted(script: Vec<Step>) -> (SocketAddr, JoinHandle<Result<(), String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.map_err(|e| e.to_string())?;
            for step in script {
                match step {
                    Step::Send(bytes) => conn.write_all(&bytes).await.map_err(|e| e.to_string())?,
                    Step::Expect(want) => {
                        let mut got = vec![0u8; want.len()];
                        conn.read_exact(&mut got).await.map_err(|e| e.to_string())?;
                        if got != want {
                            return Err(format!("client sent {got:?}, expected {want:?}"));
                        }
                    }
                    Step::Hang => tokio::time::sleep(Duration::from_secs(60)).await,
                    Step::Close => conn.shutdown().await.map_err(|e| e.to_string())?,
                }
            }
            let mut sink = [0u8; 4096];
            while matches!(conn.read(&mut sink).await, Ok(n) if n > 0) {}
            Ok(())
        });
        (addr, task)
    }

    fn limits() -> SnapshotLimits {
        SnapshotLimits {
            read_timeout_ms: 2_000,
            total_timeout_ms: 5_000,
            ..SnapshotLimits::default()
        }
    }

    async fn capture_from(
        addr: SocketAddr,
        password: Option<&str>,
    ) -> Result<Framebuffer, SnapshotError> {
        capture("127.0.0.1", addr.port(), password, &limits()).await
    }

    fn server_init(width: u16, height: u16, name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&width.to_be_bytes());
        out.extend_from_slice(&height.to_be_bytes());
        out.extend_from_slice(&[16, 16, 1, 1, 0, 31, 0, 63, 0, 31, 11, 5, 0, 0, 0, 0]);
        out.extend_from_slice(&(name.len() as u32).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
        out
    }

    fn rect_header(x: u16, y: u16, w: u16, h: u16, encoding: i32) -> Vec<u8> {
        let mut out = Vec::new();
        for v in [x, y, w, h] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&encoding.to_be_bytes());
        out
    }

    /// A Raw rectangle filled with one colour, in our pixel format.
    fn raw_rect(x: u16, y: u16, w: u16, h: u16, rgb: [u8; 3]) -> Vec<u8> {
        let mut out = rect_header(x, y, w, h, ENCODING_RAW);
        for _ in 0..u32::from(w) * u32::from(h) {
            out.extend_from_slice(&[rgb[0], rgb[1], rgb[2], 0]);
        }
        out
    }

    fn update(rects: &[Vec<u8>]) -> Vec<u8> {
        let mut out = vec![SERVER_UPDATE, 0];
        out.extend_from_slice(&(rects.len() as u16).to_be_bytes());
        for r in rects {
            out.extend_from_slice(r);
        }
        out
    }

    /// What the client sends after ServerInit for a `w × h` screen.
    fn client_setup(w: u16, h: u16) -> Vec<u8> {
        let mut out = vec![0, 0, 0, 0];
        out.extend_from_slice(&PIXEL_FORMAT);
        out.extend_from_slice(&[2, 0, 0, 1, 0, 0, 0, 0]);
        out.extend_from_slice(&[3, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&w.to_be_bytes());
        out.extend_from_slice(&h.to_be_bytes());
        out
    }

    fn reason(text: &str) -> Vec<u8> {
        let mut out = (text.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(text.as_bytes());
        out
    }

    /// A 3.8 handshake with security None up to (not including) ServerInit.
    fn none_38() -> Vec<Step> {
        vec![
            Step::Send(b"RFB 003.008\n".to_vec()),
            Step::Expect(b"RFB 003.008\n".to_vec()),
            Step::Send(vec![1, rfb::SECURITY_NONE]),
            Step::Expect(vec![rfb::SECURITY_NONE]),
            Step::Send(vec![0, 0, 0, 0]),
            // ClientInit with the shared flag set.
            Step::Expect(vec![1]),
        ]
    }

    fn pixel(fb: &Framebuffer, x: u32, y: u32) -> [u8; 4] {
        let i = ((y * fb.width + x) * 4) as usize;
        [fb.rgba[i], fb.rgba[i + 1], fb.rgba[i + 2], fb.rgba[i + 3]]
    }

    const BAR_COLOURS: [u32; 8] = [
        0xFF_FF_FF, 0xFF_FF_00, 0x00_FF_FF, 0x00_FF_00, 0xFF_00_FF, 0xFF_00_00, 0x00_00_FF,
        0x00_00_00,
    ];

    fn demo(password: Option<&str>) -> DemoServer {
        DemoServer::start(
            "127.0.0.1:0".parse().unwrap(),
            DemoConfig {
                width: 64,
                height: 48,
                max_clients: 4,
                frame_interval_ms: 50,
                password: password.map(str::to_owned),
                name: "snapshot test".to_owned(),
            },
        )
        .unwrap()
    }

    /// The demo draws colour bars across its top rows: most pixels of the
    /// first row must be the bar of their column (the scrolling stripe and
    /// the bouncing box cover a few), in the right channel order.
    fn assert_demo_bars(fb: &Framebuffer) {
        assert_eq!((fb.width, fb.height), (64, 48));
        assert!(fb.is_complete(), "{fb:?}");
        let matching = (0..fb.width)
            .filter(|&x| {
                let bar = BAR_COLOURS[(x as usize * 8 / fb.width as usize).min(7)];
                let want = [(bar >> 16) as u8, (bar >> 8) as u8, bar as u8, 255];
                pixel(fb, x, 0) == want
            })
            .count();
        assert!(matching >= 48, "only {matching} of 64 pixels show the bars");
    }

    #[tokio::test]
    async fn captures_the_demo_server_without_a_password() {
        let server = demo(None);
        let fb = capture_from(server.addr(), None).await.unwrap();
        assert_demo_bars(&fb);
        let thumb = snapshot(
            "127.0.0.1",
            server.addr().port(),
            None,
            ThumbnailSize {
                max_width: 32,
                max_height: 32,
            },
            &limits(),
        )
        .await
        .unwrap();
        assert_eq!((thumb.width, thumb.height), (32, 24));
        let img = image::load_from_memory(&thumb.png).unwrap();
        assert_eq!((img.width(), img.height()), (32, 24));
        server.stop();
    }

    #[tokio::test]
    async fn captures_the_demo_server_with_a_password_and_refuses_a_wrong_one() {
        let server = demo(Some("s3cret"));
        let fb = capture_from(server.addr(), Some("s3cret")).await.unwrap();
        assert_demo_bars(&fb);
        let wrong = capture_from(server.addr(), Some("nope")).await.unwrap_err();
        assert!(
            matches!(wrong, SnapshotError::AuthFailed(ref r) if r.contains("authentication failed")),
            "{wrong}"
        );
        assert!(matches!(
            HypervisorError::from(wrong),
            HypervisorError::Auth(_)
        ));
        let none = capture_from(server.addr(), None).await.unwrap_err();
        assert!(
            matches!(none, SnapshotError::NoCommonSecurity { ref offered, password_configured: false } if offered == &[2]),
            "{none}"
        );
        server.stop();
    }

    #[tokio::test]
    async fn speaks_3_3_and_skips_messages_and_pseudo_rectangles() {
        let mut script = vec![
            Step::Send(b"RFB 003.003\n".to_vec()),
            Step::Expect(b"RFB 003.003\n".to_vec()),
            Step::Send(u32::from(rfb::SECURITY_NONE).to_be_bytes().to_vec()),
            Step::Expect(vec![1]),
            Step::Send(server_init(2, 2, "three three")),
            Step::Expect(client_setup(2, 2)),
            // Bell, clipboard text and a colour map before the update.
            Step::Send(vec![SERVER_BELL]),
            Step::Send([vec![SERVER_CUT_TEXT, 0, 0, 0], reason("clip")].concat()),
            Step::Send(vec![SERVER_COLOUR_MAP, 0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6]),
        ];
        let mut cursor = rect_header(0, 0, 2, 1, ENCODING_CURSOR);
        cursor.extend_from_slice(&[0u8; 2 * 4 + 1]);
        script.push(Step::Send(update(&[
            cursor,
            rect_header(1, 1, 0, 0, ENCODING_POINTER_POS),
            raw_rect(0, 0, 2, 1, [10, 20, 30]),
            raw_rect(0, 1, 1, 1, [40, 50, 60]),
            raw_rect(1, 1, 1, 1, [70, 80, 90]),
            rect_header(0, 0, 0, 0, ENCODING_LAST_RECT),
        ])));
        let (addr, server) = scripted(script).await;
        let fb = capture_from(addr, None).await.unwrap();
        server.await.unwrap().unwrap();
        assert_eq!(pixel(&fb, 0, 0), [10, 20, 30, 255]);
        assert_eq!(pixel(&fb, 1, 0), [10, 20, 30, 255]);
        assert_eq!(pixel(&fb, 0, 1), [40, 50, 60, 255]);
        assert_eq!(pixel(&fb, 1, 1), [70, 80, 90, 255]);
    }

    #[tokio::test]
    async fn speaks_3_7_with_vnc_authentication() {
        let challenge = [7u8; 16];
        let (addr, server) = scripted(vec![
            Step::Send(b"RFB 003.007\n".to_vec()),
            Step::Expect(b"RFB 003.007\n".to_vec()),
            Step::Send(vec![2, 30, rfb::SECURITY_VNC_AUTH]),
            Step::Expect(vec![rfb::SECURITY_VNC_AUTH]),
            Step::Send(challenge.to_vec()),
            Step::Expect(rfb::vnc_auth_response(b"pw", &challenge).to_vec()),
            Step::Send(vec![0, 0, 0, 0]),
            Step::Expect(vec![1]),
            Step::Send(server_init(1, 1, "")),
            Step::Expect(client_setup(1, 1)),
            Step::Send(update(&[raw_rect(0, 0, 1, 1, [1, 2, 3])])),
        ])
        .await;
        let fb = capture_from(addr, Some("pw")).await.unwrap();
        server.await.unwrap().unwrap();
        assert_eq!(pixel(&fb, 0, 0), [1, 2, 3, 255]);
    }

    #[tokio::test]
    async fn asks_again_until_the_screen_is_covered_and_follows_a_resize() {
        let mut script = none_38();
        script.extend([
            Step::Send(server_init(2, 1, "")),
            Step::Expect(client_setup(2, 1)),
            // Half the screen, then a resize to 1x1, then the rest.
            Step::Send(update(&[raw_rect(0, 0, 1, 1, [9, 9, 9])])),
            Step::Expect(vec![3, 0, 0, 0, 0, 0, 0, 2, 0, 1]),
            Step::Send(update(&[rect_header(0, 0, 1, 1, ENCODING_DESKTOP_SIZE)])),
            Step::Expect(vec![3, 0, 0, 0, 0, 0, 0, 1, 0, 1]),
            Step::Send(update(&[raw_rect(0, 0, 1, 1, [5, 6, 7])])),
        ]);
        let (addr, server) = scripted(script).await;
        let fb = capture_from(addr, None).await.unwrap();
        server.await.unwrap().unwrap();
        assert_eq!((fb.width, fb.height), (1, 1));
        assert_eq!(pixel(&fb, 0, 0), [5, 6, 7, 255]);
    }

    /// Runs `after_handshake` (after a 3.8 None handshake and ServerInit
    /// of `w × h`) and returns the client's error.
    async fn failure(w: u16, h: u16, after_handshake: Vec<Step>) -> SnapshotError {
        let mut script = none_38();
        script.push(Step::Send(server_init(w, h, "x")));
        script.extend(after_handshake);
        let (addr, _server) = scripted(script).await;
        capture_from(addr, None).await.unwrap_err()
    }

    async fn early_failure(script: Vec<Step>, password: Option<&str>) -> SnapshotError {
        let (addr, _server) = scripted(script).await;
        capture_from(addr, password).await.unwrap_err()
    }

    #[tokio::test]
    async fn hostile_handshakes_are_typed_errors() {
        let e = early_failure(vec![Step::Send(b"SSH-2.0-Open\n".to_vec())], None).await;
        assert!(matches!(e, SnapshotError::NotRfb), "{e}");
        let e = early_failure(vec![Step::Send(b"RFB 002.000\n".to_vec())], None).await;
        assert!(
            matches!(e, SnapshotError::UnsupportedVersion { major: 2, minor: 0 }),
            "{e}"
        );
        let e = early_failure(vec![Step::Send(b"RFB 003.00x\n".to_vec())], None).await;
        assert!(matches!(e, SnapshotError::NotRfb), "{e}");
        let e = early_failure(
            vec![
                Step::Send(b"RFB 003.008\n".to_vec()),
                Step::Send([vec![0], reason("too many clients")].concat()),
            ],
            None,
        )
        .await;
        assert!(
            matches!(e, SnapshotError::Refused(ref r) if r == "too many clients"),
            "{e}"
        );
        assert!(matches!(
            HypervisorError::from(e),
            HypervisorError::Unreachable(_)
        ));
        let e = early_failure(
            vec![
                Step::Send(b"RFB 003.008\n".to_vec()),
                Step::Send(vec![2, 16, 19]),
            ],
            Some("pw"),
        )
        .await;
        assert!(
            matches!(e, SnapshotError::NoCommonSecurity { ref offered, password_configured: true } if offered == &[16, 19]),
            "{e}"
        );
        let e = early_failure(
            vec![
                Step::Send(b"RFB 003.003\n".to_vec()),
                Step::Send(0x1_0000u32.to_be_bytes().to_vec()),
            ],
            None,
        )
        .await;
        assert!(matches!(e, SnapshotError::Protocol(_)), "{e}");
        // A reason longer than the limit is cut, not read to its end.
        let e = early_failure(
            vec![
                Step::Send(b"RFB 003.008\n".to_vec()),
                Step::Expect(b"RFB 003.008\n".to_vec()),
                Step::Send(vec![1, 2]),
                Step::Expect(vec![2]),
                Step::Send(vec![0; 16]),
                Step::Send([vec![0, 0, 0, 1], reason(&"x".repeat(5000))].concat()),
            ],
            Some("pw"),
        )
        .await;
        match e {
            SnapshotError::AuthFailed(r) => {
                assert_eq!(r.chars().count(), MAX_REASON_BYTES as usize + 1)
            }
            other => panic!("{other}"),
        }
    }

    #[tokio::test]
    async fn hostile_sizes_and_messages_are_typed_errors() {
        let e = failure(65535, 65535, vec![]).await;
        assert!(
            matches!(e, SnapshotError::BadSize { width: 65535, .. }),
            "{e}"
        );
        let e = failure(0, 10, vec![]).await;
        assert!(matches!(e, SnapshotError::BadSize { .. }), "{e}");
        let mut huge_name = none_38();
        huge_name.push(Step::Send({
            let mut s = server_init(2, 2, "");
            let n = s.len();
            s[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
            s
        }));
        let e = early_failure(huge_name, None).await;
        assert!(
            matches!(e, SnapshotError::Protocol(ref m) if m.contains("desktop name")),
            "{e}"
        );
        let e = failure(
            2,
            2,
            vec![Step::Send(update(&[raw_rect(1, 1, 2, 2, [0, 0, 0])]))],
        )
        .await;
        assert!(
            matches!(e, SnapshotError::Protocol(ref m) if m.contains("outside")),
            "{e}"
        );
        let e = failure(
            2,
            2,
            vec![Step::Send(update(&[rect_header(0, 0, 2, 2, 7)]))],
        )
        .await;
        assert!(
            matches!(e, SnapshotError::Protocol(ref m) if m.contains("encoding 7")),
            "{e}"
        );
        let e = failure(2, 2, vec![Step::Send(vec![200])]).await;
        assert!(
            matches!(e, SnapshotError::Protocol(ref m) if m.contains("type 200")),
            "{e}"
        );
        let e = failure(
            2,
            2,
            vec![Step::Send(vec![
                SERVER_CUT_TEXT,
                0,
                0,
                0,
                0xFF,
                0xFF,
                0xFF,
                0xFF,
            ])],
        )
        .await;
        assert!(
            matches!(e, SnapshotError::Protocol(ref m) if m.contains("clipboard")),
            "{e}"
        );
    }

    #[tokio::test]
    async fn endless_oversized_or_truncated_streams_are_typed_errors() {
        // A cursor shape far larger than the budget fails before reading.
        let e = failure(
            2,
            2,
            vec![Step::Send(update(&[rect_header(
                0,
                0,
                65535,
                65535,
                ENCODING_CURSOR,
            )]))],
        )
        .await;
        assert!(matches!(e, SnapshotError::TooMuchData(_)), "{e}");
        // Endless bells run into the byte budget.
        let mut script = none_38();
        script.push(Step::Send(server_init(1, 1, "")));
        script.push(Step::Send(vec![SERVER_BELL; 64 * 1024]));
        let (addr, _server) = scripted(script).await;
        let small = SnapshotLimits {
            max_read_bytes: 32 * 1024,
            ..limits()
        };
        let e = capture("127.0.0.1", addr.port(), None, &small)
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::TooMuchData(32768)), "{e}");
        // Updates that never cover the screen.
        let e = failure(
            2,
            1,
            (0..MAX_UPDATE_ROUNDS)
                .map(|_| Step::Send(update(&[raw_rect(0, 0, 1, 1, [1, 1, 1])])))
                .collect(),
        )
        .await;
        assert!(
            matches!(e, SnapshotError::Incomplete(MAX_UPDATE_ROUNDS)),
            "{e}"
        );
        // Closed in the middle of a rectangle.
        let mut half = update(&[raw_rect(0, 0, 2, 2, [1, 1, 1])]);
        half.truncate(half.len() - 3);
        let (addr, server) = scripted(
            [
                none_38(),
                vec![
                    Step::Send(server_init(2, 2, "")),
                    Step::Send(half),
                    Step::Close,
                ],
            ]
            .concat(),
        )
        .await;
        let e = capture_from(addr, None).await.unwrap_err();
        drop(server);
        assert!(matches!(e, SnapshotError::Closed), "{e}");
    }

    #[tokio::test]
    async fn silent_servers_and_closed_ports_fail_in_time() {
        let (addr, _server) = scripted(vec![Step::Hang]).await;
        let quick = SnapshotLimits {
            read_timeout_ms: 100,
            total_timeout_ms: 5_000,
            ..SnapshotLimits::default()
        };
        let started = std::time::Instant::now();
        let e = capture("127.0.0.1", addr.port(), None, &quick)
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::ReadTimeout(100)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(matches!(
            HypervisorError::from(e),
            HypervisorError::Timeout(_)
        ));
        // Each read in time, the whole too slow.
        let (addr, _server) =
            scripted(vec![Step::Send(b"RFB 003.008\n".to_vec()), Step::Hang]).await;
        let slow = SnapshotLimits {
            read_timeout_ms: 5_000,
            total_timeout_ms: 100,
            ..SnapshotLimits::default()
        };
        let e = capture("127.0.0.1", addr.port(), None, &slow)
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::TotalTimeout(100)), "{e}");
        // Nobody listening.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let e = capture("127.0.0.1", port, None, &limits())
            .await
            .unwrap_err();
        assert!(matches!(e, SnapshotError::Connect { .. }), "{e}");
    }
}
