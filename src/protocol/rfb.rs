//! RFB (VNC, RFC 6143) security-handshake terminator, sans-IO.
//!
//! What it does: [`Handshake`] stands between a browser (an RFB client such
//! as noVNC) and a VM console (an RFB server such as QEMU or TigerVNC) for the
//! first phase of the protocol only. Towards the backend it is the client: it
//! negotiates the version, picks VNC Authentication when it has a password
//! (None otherwise) and answers the DES challenge itself. Towards the browser
//! it is the server: it always offers RFB 3.8 and the single security type
//! None, because the browser was already authenticated by its single-use
//! ticket, and the VNC password must never reach it. Once the backend accepted
//! us and the browser's ClientInit has been forwarded, the handshake is done
//! and the caller relays raw bytes both ways (ServerInit included): the two
//! ends agree on everything after the security phase, so nothing later needs
//! translating.
//!
//! Order of events: the browser's greeting is queued by [`Handshake::new`].
//! A 3.8 browser is offered None as soon as its version arrives (so its
//! choice overlaps our backend authentication), but its SecurityResult is
//! withheld until the backend has accepted us; a 3.3 or 3.7 browser is sent
//! its security type(s) only then. Two things follow: a backend failure can
//! still reach the browser as an RFB failure with a reason (noVNC shows it to
//! the user) instead of a bare disconnect, and no browser byte reaches the
//! backend before the backend's security phase succeeded.
//!
//! What it does not do: any IO, clocks or timers (the caller enforces the
//! handshake timeout), security types other than None and VNC Authentication
//! (VeNCrypt, TLS, Apple ARD, ...), or anything after ClientInit. Nothing here
//! panics on input, and every buffer is bounded: reason strings by
//! [`RfbLimits::max_reason_bytes`], bytes that arrive ahead of their turn by
//! [`RfbLimits::max_early_bytes`], everything else by the fixed message sizes
//! of the protocol.

use des::cipher::{BlockCipherEncrypt, KeyInit};
use des::Des;

/// What we announce to every browser: we terminate security ourselves, so the
/// browser always sees a 3.8 server regardless of the backend's version.
pub const BROWSER_PROTOCOL_VERSION: &[u8; 12] = b"RFB 003.008\n";

/// A ProtocolVersion message is always exactly 12 bytes: "RFB xxx.yyy\n".
const VERSION_LEN: usize = 12;
/// Security type "None" (RFC 6143 7.2.1).
pub const SECURITY_NONE: u8 = 1;
/// Security type "VNC Authentication" (RFC 6143 7.2.2).
pub const SECURITY_VNC_AUTH: u8 = 2;
/// Length of the VNC Authentication challenge and of its response.
pub const CHALLENGE_LEN: usize = 16;
/// VNC Authentication uses only this many bytes of the password.
pub const VNC_PASSWORD_LEN: usize = 8;

/// Which peer an error is attributed to (for close codes, logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The browser (RFB client) side.
    Browser,
    /// The VM console (RFB server) side.
    Backend,
}

/// The three RFB versions that exist in practice (RFC 6143 7.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// RFB 3.3: the server dictates the security type, no failure reasons.
    V3_3,
    /// RFB 3.7: the client picks from a list; no SecurityResult after None.
    V3_7,
    /// RFB 3.8: like 3.7, plus a SecurityResult after None and failure reasons.
    V3_8,
}

impl Version {
    /// The 12-byte ProtocolVersion message for this version.
    pub fn wire(self) -> &'static [u8; 12] {
        match self {
            Version::V3_3 => b"RFB 003.003\n",
            Version::V3_7 => b"RFB 003.007\n",
            Version::V3_8 => b"RFB 003.008\n",
        }
    }

    /// What to speak with a server that announced `major.minor`: the highest
    /// version we know that it must accept, or `None` if we cannot talk to it.
    fn for_server(major: u16, minor: u16) -> Option<Version> {
        match (major, minor) {
            // RFC 6143 7.1.1: unknown 3.x versions are to be treated as 3.3
            // (3.4 and 3.6 were used by UltraVNC, 3.5 by some old servers).
            (3, 3..=6) => Some(Version::V3_3),
            (3, 7) => Some(Version::V3_7),
            // 3.889 is Apple Remote Desktop; it accepts 3.8 clients.
            (3, 8..) => Some(Version::V3_8),
            // RealVNC 4.x and 5.x announce 004.00x / 005.000 yet accept 3.8.
            (4 | 5, _) => Some(Version::V3_8),
            _ => None,
        }
    }

    /// What a browser answering our 3.8 offer speaks.
    fn for_client(major: u16, minor: u16) -> Option<Version> {
        match (major, minor) {
            (3, 3..=6) => Some(Version::V3_3),
            (3, 7) => Some(Version::V3_7),
            // A client must not answer above our 3.8, but being strict here
            // would only break odd clients; they get 3.8 semantics.
            (3, 8..) => Some(Version::V3_8),
            _ => None,
        }
    }
}

/// Bounds on what the handshake buffers. Each costs at most its size in
/// bytes of heap per handshake in flight, and only when a peer uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RfbLimits {
    /// Longest failure-reason string kept from the backend; a longer one is
    /// cut (and marked with "…") instead of being read to its end, since the
    /// connection is closing anyway.
    pub max_reason_bytes: usize,
    /// Bytes a peer may send ahead of its turn (a browser pipelining its
    /// ClientInit and first messages before the backend accepted us, or a
    /// backend talking before ClientInit); they are held and forwarded in
    /// order once the handshake is done. More is an error.
    pub max_early_bytes: usize,
}

impl Default for RfbLimits {
    fn default() -> Self {
        RfbLimits {
            max_reason_bytes: 1024,
            // noVNC pipelines nothing; a client that does sends ClientInit
            // plus SetPixelFormat, SetEncodings and an update request, which
            // fit comfortably.
            max_early_bytes: 1024,
        }
    }
}

/// Why a handshake failed. Every variant says which side caused it
/// ([`RfbError::side`]) and has a stable metric name ([`RfbError::kind`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RfbError {
    /// The backend's first bytes are not an RFB ProtocolVersion (wrong port,
    /// TLS-only listener, an SSH or HTTP server, ...).
    #[error("backend is not an RFB (VNC) server: its first bytes are not \"RFB xxx.yyy\\n\"")]
    BackendNotRfb,
    /// The backend speaks an RFB version we cannot.
    #[error("backend speaks RFB {major}.{minor}, which is not supported (3.3 to 3.8, 4.x, 5.x)")]
    UnsupportedVersion {
        /// Major version the backend announced.
        major: u16,
        /// Minor version the backend announced.
        minor: u16,
    },
    /// No security type the backend offers is one we can complete.
    #[error(
        "backend offers security types {offered:?}, none usable (we do None = 1{})",
        if *password_configured { " and VNC Authentication = 2" } else { "; VNC Authentication = 2 needs a configured password" }
    )]
    NoCommonSecurity {
        /// The types the backend offered (at most 255 by the format).
        offered: Vec<u8>,
        /// Whether we had a password (so VNC Authentication was possible).
        password_configured: bool,
    },
    /// The backend rejected our VNC password (SecurityResult "failed").
    #[error("backend rejected the VNC password: {reason}")]
    AuthFailed {
        /// The backend's reason (RFB 3.8), or a note that none was given.
        reason: String,
    },
    /// The backend refused the connection before authentication (security
    /// type 0 or an empty type list: too many clients, blacklisted, ...).
    #[error("backend refused the connection: {reason}")]
    BackendRefused {
        /// The backend's reason string.
        reason: String,
    },
    /// The backend broke the protocol in a way not covered above.
    #[error("backend protocol error: {0}")]
    BackendProtocol(&'static str),
    /// The browser broke the protocol.
    #[error("browser protocol error: {0}")]
    BrowserProtocol(&'static str),
    /// A peer sent more than a limit allows before the handshake was done.
    #[error("{side:?} sent more than {max} bytes of {what} during the RFB handshake")]
    TooLong {
        /// Who sent it.
        side: Side,
        /// What overflowed.
        what: &'static str,
        /// The limit that was exceeded.
        max: usize,
    },
}

impl RfbError {
    /// Stable snake_case name for metric labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            RfbError::BackendNotRfb => "backend_not_rfb",
            RfbError::UnsupportedVersion { .. } => "unsupported_version",
            RfbError::NoCommonSecurity { .. } => "no_common_security",
            RfbError::AuthFailed { .. } => "auth_failed",
            RfbError::BackendRefused { .. } => "backend_refused",
            RfbError::BackendProtocol(_) => "backend_protocol",
            RfbError::BrowserProtocol(_) => "browser_protocol",
            RfbError::TooLong { .. } => "too_long",
        }
    }

    /// Which peer caused the failure.
    pub fn side(&self) -> Side {
        match self {
            RfbError::BrowserProtocol(_) => Side::Browser,
            RfbError::TooLong { side, .. } => *side,
            RfbError::BackendNotRfb
            | RfbError::UnsupportedVersion { .. }
            | RfbError::NoCommonSecurity { .. }
            | RfbError::AuthFailed { .. }
            | RfbError::BackendRefused { .. }
            | RfbError::BackendProtocol(_) => Side::Backend,
        }
    }
}

/// The VNC Authentication response to `challenge` for `password`.
///
/// DES-ECB over the two 8-byte halves of the challenge, keyed with the
/// password truncated or zero-padded to 8 bytes, each key byte bit-reversed:
/// the original VNC code fed its key to a DES implementation that numbered
/// bits from the other end, and every server since copies that quirk.
pub fn vnc_auth_response(password: &[u8], challenge: &[u8; CHALLENGE_LEN]) -> [u8; CHALLENGE_LEN] {
    des_response(&vnc_des_key(password), challenge)
}

/// The bit-reversed, zero-padded DES key VNC derives from a password.
fn vnc_des_key(password: &[u8]) -> [u8; VNC_PASSWORD_LEN] {
    let mut key = [0u8; VNC_PASSWORD_LEN];
    for (k, p) in key.iter_mut().zip(password) {
        *k = p.reverse_bits();
    }
    key
}

fn des_response(
    key: &[u8; VNC_PASSWORD_LEN],
    challenge: &[u8; CHALLENGE_LEN],
) -> [u8; CHALLENGE_LEN] {
    let cipher = Des::new(&(*key).into());
    let mut out = [0u8; CHALLENGE_LEN];
    // Two independent blocks: VNC uses plain ECB, no chaining.
    for (src, dst) in challenge.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
        let mut half = [0u8; 8];
        half.copy_from_slice(src);
        let mut block = half.into();
        cipher.encrypt_block(&mut block);
        dst.copy_from_slice(&block);
    }
    out
}

/// Collects a fixed-size field that may arrive split across reads.
#[derive(Debug, Clone, Copy, Default)]
struct Acc {
    buf: [u8; CHALLENGE_LEN],
    len: usize,
}

impl Acc {
    /// Appends from `data[*i..]` until `want` bytes are held; returns them
    /// once complete (and resets, so the next field starts empty).
    fn fill(&mut self, want: usize, data: &[u8], i: &mut usize) -> Option<[u8; CHALLENGE_LEN]> {
        let want = want.min(CHALLENGE_LEN);
        let rest = data.get(*i..).unwrap_or_default();
        let n = (want.saturating_sub(self.len)).min(rest.len());
        if let (Some(dst), Some(src)) = (self.buf.get_mut(self.len..self.len + n), rest.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.len += n;
        *i += n;
        if self.len < want {
            return None;
        }
        let out = self.buf;
        *self = Acc::default();
        Some(out)
    }

    fn fill_u32(&mut self, data: &[u8], i: &mut usize) -> Option<u32> {
        self.fill(4, data, i)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Like `fill(12)`, but checks every byte against "RFB ddd.ddd\n" as it
    /// arrives, so a non-RFB peer is rejected on its first wrong byte instead
    /// of after a read timeout. `Err` on a mismatch.
    fn fill_version(&mut self, data: &[u8], i: &mut usize) -> Result<Option<(u16, u16)>, ()> {
        while self.len < VERSION_LEN {
            let Some(&b) = data.get(*i) else {
                return Ok(None);
            };
            let ok = match self.len {
                0..=3 => b == b"RFB "[self.len],
                4..=6 | 8..=10 => b.is_ascii_digit(),
                7 => b == b'.',
                _ => b == b'\n',
            };
            if !ok {
                return Err(());
            }
            self.buf[self.len] = b;
            self.len += 1;
            *i += 1;
        }
        let digits = |r: std::ops::Range<usize>| {
            self.buf[r]
                .iter()
                .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'))
        };
        let version = (digits(4..7), digits(8..11));
        *self = Acc::default();
        Ok(Some(version))
    }
}

/// Why a backend failure reason is being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReasonFor {
    Refused,
    AuthFailed,
}

/// Where we are with the backend (we are its client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackendState {
    Version,
    /// RFB 3.3: the server names the type as a u32.
    SecurityType33,
    /// RFB 3.7/3.8: number of types that follow (0 = failure + reason).
    SecurityCount,
    SecurityList {
        count: u8,
        got: u8,
    },
    Challenge,
    SecurityResult,
    ReasonLength(ReasonFor),
    Reason {
        why: ReasonFor,
        want: usize,
        truncated: bool,
    },
    /// Security succeeded; the server waits for ClientInit.
    Ready,
}

/// Where we are with the browser (we are its server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrowserState {
    Version,
    /// 3.3/3.7: the security types are sent only once the backend accepted
    /// us, so a backend failure can still be reported to the browser with a
    /// reason (those versions cannot report one after None).
    SendTypes,
    /// 3.7/3.8: the browser's one-byte choice.
    Choice,
    /// 3.8: the SecurityResult waits for the backend's, so that a backend
    /// failure can become a SecurityResult "failed" with a reason.
    SendResult,
    ClientInit,
    Done,
}

/// The security-phase state machine for one proxied console connection.
///
/// Feed it with [`on_backend`](Self::on_backend) and
/// [`on_browser`](Self::on_browser) in any interleaving and split at any
/// byte; after each call send what [`take_to_backend`](Self::take_to_backend)
/// and [`take_to_browser`](Self::take_to_browser) return. When
/// [`is_done`](Self::is_done) turns true, relay raw bytes both ways.
pub struct Handshake {
    /// The DES key (already bit-reversed), while it may still be needed.
    key: Option<[u8; VNC_PASSWORD_LEN]>,
    password_configured: bool,
    limits: RfbLimits,
    backend: BackendState,
    browser: BrowserState,
    backend_version: Option<Version>,
    browser_version: Option<Version>,
    backend_acc: Acc,
    browser_acc: Acc,
    /// The backend's security type list (at most 255 by the format).
    offered: [u8; 255],
    /// The security type agreed with the backend.
    security_type: Option<u8>,
    reason: Vec<u8>,
    backend_ok: bool,
    done: bool,
    failed: Option<RfbError>,
    to_backend: Vec<u8>,
    to_browser: Vec<u8>,
    early_browser: Vec<u8>,
    early_backend: Vec<u8>,
}

impl std::fmt::Debug for Handshake {
    // Hand-written so the key never lands in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("password_configured", &self.password_configured)
            .field("backend", &self.backend)
            .field("browser", &self.browser)
            .field("backend_version", &self.backend_version)
            .field("browser_version", &self.browser_version)
            .field("security_type", &self.security_type)
            .field("done", &self.done)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        // Best effort: do not leave the key in freed memory longer than needed.
        self.wipe_key();
    }
}

impl Handshake {
    /// A handshake that authenticates to the backend with `password` (VNC
    /// Authentication; only its first 8 bytes count), or, with `None`,
    /// requires the backend to offer security type None.
    ///
    /// The browser's ProtocolVersion greeting is queued at once: it does not
    /// depend on the backend, and sending it early overlaps the two legs.
    pub fn new(password: Option<&[u8]>, limits: RfbLimits) -> Self {
        Handshake {
            key: password.map(vnc_des_key),
            password_configured: password.is_some(),
            limits,
            backend: BackendState::Version,
            browser: BrowserState::Version,
            backend_version: None,
            browser_version: None,
            backend_acc: Acc::default(),
            browser_acc: Acc::default(),
            offered: [0; 255],
            security_type: None,
            reason: Vec::new(),
            backend_ok: false,
            done: false,
            failed: None,
            to_backend: Vec::new(),
            to_browser: BROWSER_PROTOCOL_VERSION.to_vec(),
            early_browser: Vec::new(),
            early_backend: Vec::new(),
        }
    }

    /// Bytes received from the backend. Returns how many were consumed:
    /// before the handshake is done, all of them (or an error); in the call
    /// that completes it, the bytes after the consumed prefix are relay bytes
    /// for the browser (send them after [`take_to_browser`](Self::take_to_browser));
    /// once done, 0.
    ///
    /// After an error, send what `take_to_browser` holds (it may explain the
    /// failure to the browser in RFB terms), then close both sides; further
    /// calls return the same error.
    pub fn on_backend(&mut self, data: &[u8]) -> Result<usize, RfbError> {
        self.guarded(|h| h.backend_input(data))
    }

    /// Bytes received from the browser. Returns how many were consumed, with
    /// the same contract as [`on_backend`](Self::on_backend): leftover bytes
    /// in the call that completes the handshake are relay bytes for the
    /// backend (send them after [`take_to_backend`](Self::take_to_backend)).
    pub fn on_browser(&mut self, data: &[u8]) -> Result<usize, RfbError> {
        self.guarded(|h| h.browser_input(data))
    }

    /// One input step: the stored error after a failure, nothing once
    /// done, else `step`, whose error is stored (and the browser told).
    fn guarded(
        &mut self,
        step: impl FnOnce(&mut Self) -> Result<usize, RfbError>,
    ) -> Result<usize, RfbError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.done {
            return Ok(0);
        }
        let result = step(self);
        if let Err(e) = &result {
            self.fail(e);
        }
        result
    }

    /// Bytes to send to the backend, in order; the caller now owns them.
    pub fn take_to_backend(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.to_backend)
    }

    /// Bytes to send to the browser, in order; the caller now owns them.
    pub fn take_to_browser(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.to_browser)
    }

    /// Whether anything waits in either output queue.
    pub fn has_output(&self) -> bool {
        !self.to_backend.is_empty() || !self.to_browser.is_empty()
    }

    /// True once the backend accepted us and the browser's ClientInit was
    /// queued for the backend: from here on (after draining both `take_*`
    /// queues) the caller relays raw bytes both ways, ServerInit included.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// True once the backend's security phase succeeded (useful to tell a
    /// slow browser from a slow backend when the handshake times out).
    pub fn backend_authenticated(&self) -> bool {
        self.backend_ok
    }

    /// The version spoken with the backend, once known.
    pub fn backend_version(&self) -> Option<Version> {
        self.backend_version
    }

    /// The version the browser chose, once known.
    pub fn browser_version(&self) -> Option<Version> {
        self.browser_version
    }

    /// The security type used with the backend (1 None, 2 VNC
    /// Authentication), once chosen.
    pub fn backend_security_type(&self) -> Option<u8> {
        self.security_type
    }

    fn backend_input(&mut self, data: &[u8]) -> Result<usize, RfbError> {
        if self.backend_ok {
            // Security is over on this leg and the server should be silent
            // until ClientInit; if it talks anyway, keep the bytes in order.
            self.hold_early(Side::Backend, data)?;
            return Ok(data.len());
        }
        let n = self.step_backend(data)?;
        if !self.backend_ok {
            return Ok(n);
        }
        // The backend just accepted us: the browser leg may proceed, and any
        // bytes it sent ahead are now processed.
        self.unblock_browser()?;
        if self.done {
            return Ok(n);
        }
        self.hold_early(Side::Backend, data.get(n..).unwrap_or_default())?;
        Ok(data.len())
    }

    fn browser_input(&mut self, data: &[u8]) -> Result<usize, RfbError> {
        if !self.early_browser.is_empty() {
            // Earlier bytes are still waiting for the backend; keep order.
            self.hold_early(Side::Browser, data)?;
            return Ok(data.len());
        }
        let n = self.step_browser(data)?;
        if self.done {
            return Ok(n);
        }
        self.hold_early(Side::Browser, data.get(n..).unwrap_or_default())?;
        Ok(data.len())
    }

    fn hold_early(&mut self, side: Side, data: &[u8]) -> Result<(), RfbError> {
        if data.is_empty() {
            return Ok(());
        }
        let buf = match side {
            Side::Browser => &mut self.early_browser,
            Side::Backend => &mut self.early_backend,
        };
        if buf.len().saturating_add(data.len()) > self.limits.max_early_bytes {
            return Err(RfbError::TooLong {
                side,
                what: "data ahead of the handshake",
                max: self.limits.max_early_bytes,
            });
        }
        buf.extend_from_slice(data);
        Ok(())
    }

    fn unblock_browser(&mut self) -> Result<(), RfbError> {
        let mut early = std::mem::take(&mut self.early_browser);
        let n = self.step_browser(&early)?;
        let rest = early.get(n..).unwrap_or_default();
        if self.done {
            // Pipelined after ClientInit: these are relay bytes.
            self.to_backend.extend_from_slice(rest);
        } else {
            // Cannot happen (the browser leg only ever waits for the
            // backend), but keeping the bytes is cheaper than proving it.
            early.drain(..n.min(early.len()));
            self.early_browser = early;
        }
        Ok(())
    }

    /// Advances the backend leg over `data`; returns the bytes consumed,
    /// fewer than `data.len()` only once the leg is complete.
    fn step_backend(&mut self, data: &[u8]) -> Result<usize, RfbError> {
        let mut i = 0;
        loop {
            match self.backend {
                BackendState::Version => {
                    let (major, minor) = match self.backend_acc.fill_version(data, &mut i) {
                        Err(()) => return Err(RfbError::BackendNotRfb),
                        Ok(None) => break,
                        Ok(Some(v)) => v,
                    };
                    let v = Version::for_server(major, minor)
                        .ok_or(RfbError::UnsupportedVersion { major, minor })?;
                    self.backend_version = Some(v);
                    self.to_backend.extend_from_slice(v.wire());
                    self.backend = if v == Version::V3_3 {
                        BackendState::SecurityType33
                    } else {
                        BackendState::SecurityCount
                    };
                }
                BackendState::SecurityType33 => {
                    let Some(t) = self.backend_acc.fill_u32(data, &mut i) else {
                        break;
                    };
                    match t {
                        0 => self.backend = BackendState::ReasonLength(ReasonFor::Refused),
                        // RFB 3.3 None: straight to initialisation.
                        1 => {
                            self.security_type = Some(SECURITY_NONE);
                            self.backend_ready();
                        }
                        2 if self.key.is_some() => {
                            self.security_type = Some(SECURITY_VNC_AUTH);
                            self.backend = BackendState::Challenge;
                        }
                        _ => {
                            let t = u8::try_from(t).map_err(|_| {
                                RfbError::BackendProtocol("RFB 3.3 security type out of range")
                            })?;
                            return Err(RfbError::NoCommonSecurity {
                                offered: vec![t],
                                password_configured: self.password_configured,
                            });
                        }
                    }
                }
                BackendState::SecurityCount => {
                    let Some(&count) = data.get(i) else {
                        break;
                    };
                    i += 1;
                    self.backend = if count == 0 {
                        BackendState::ReasonLength(ReasonFor::Refused)
                    } else {
                        BackendState::SecurityList { count, got: 0 }
                    };
                }
                BackendState::SecurityList { count, got } => {
                    let rest = data.get(i..).unwrap_or_default();
                    let n = usize::from(count - got).min(rest.len());
                    let start = usize::from(got);
                    if let (Some(dst), Some(src)) =
                        (self.offered.get_mut(start..start + n), rest.get(..n))
                    {
                        dst.copy_from_slice(src);
                    }
                    i += n;
                    // n <= count - got <= 255, so this fits a u8.
                    let got = got.saturating_add(u8::try_from(n).unwrap_or(u8::MAX));
                    if got < count {
                        self.backend = BackendState::SecurityList { count, got };
                        break;
                    }
                    self.choose_security(usize::from(count))?;
                }
                BackendState::Challenge => {
                    let Some(challenge) = self.backend_acc.fill(CHALLENGE_LEN, data, &mut i) else {
                        break;
                    };
                    let Some(key) = self.key else {
                        // Only reachable with a key; say so rather than panic.
                        return Err(RfbError::BackendProtocol(
                            "challenge without VNC Authentication",
                        ));
                    };
                    self.to_backend
                        .extend_from_slice(&des_response(&key, &challenge));
                    self.wipe_key();
                    self.backend = BackendState::SecurityResult;
                }
                BackendState::SecurityResult => {
                    let Some(result) = self.backend_acc.fill_u32(data, &mut i) else {
                        break;
                    };
                    if result == 0 {
                        self.backend_ready();
                        continue;
                    }
                    // Any non-zero word is a failure (1 failed; some servers
                    // send 2 for "too many attempts").
                    let why = if self.security_type == Some(SECURITY_VNC_AUTH) {
                        ReasonFor::AuthFailed
                    } else {
                        ReasonFor::Refused
                    };
                    if self.backend_version == Some(Version::V3_8) {
                        self.backend = BackendState::ReasonLength(why);
                    } else {
                        return Err(reason_error(
                            why,
                            "no reason given (RFB 3.3/3.7)".to_owned(),
                        ));
                    }
                }
                BackendState::ReasonLength(why) => {
                    let Some(len) = self.backend_acc.fill_u32(data, &mut i) else {
                        break;
                    };
                    let len = usize::try_from(len).unwrap_or(usize::MAX);
                    let want = len.min(self.limits.max_reason_bytes);
                    self.reason = Vec::with_capacity(want);
                    self.backend = BackendState::Reason {
                        why,
                        want,
                        truncated: len > want,
                    };
                }
                BackendState::Reason {
                    why,
                    want,
                    truncated,
                } => {
                    let rest = data.get(i..).unwrap_or_default();
                    let n = want.saturating_sub(self.reason.len()).min(rest.len());
                    self.reason
                        .extend_from_slice(rest.get(..n).unwrap_or_default());
                    i += n;
                    if self.reason.len() < want {
                        break;
                    }
                    // The rest of an over-long reason is never read: the
                    // connection closes on this error.
                    let text = printable(&self.reason, truncated);
                    return Err(reason_error(why, text));
                }
                BackendState::Ready => break,
            }
        }
        Ok(i)
    }

    /// Picks from the 3.7/3.8 list in `self.offered[..count]`: VNC
    /// Authentication when we have a password (the server asked for it), else
    /// None.
    fn choose_security(&mut self, count: usize) -> Result<(), RfbError> {
        let offered = self.offered.get(..count).unwrap_or_default();
        let choice = if self.key.is_some() && offered.contains(&SECURITY_VNC_AUTH) {
            SECURITY_VNC_AUTH
        } else if offered.contains(&SECURITY_NONE) {
            SECURITY_NONE
        } else {
            return Err(RfbError::NoCommonSecurity {
                offered: offered.to_vec(),
                password_configured: self.password_configured,
            });
        };
        self.security_type = Some(choice);
        self.to_backend.push(choice);
        if choice == SECURITY_VNC_AUTH {
            self.backend = BackendState::Challenge;
        } else if self.backend_version == Some(Version::V3_8) {
            self.backend = BackendState::SecurityResult;
        } else {
            // RFB 3.7 sends no SecurityResult after None.
            self.backend_ready();
        }
        Ok(())
    }

    fn backend_ready(&mut self) {
        self.backend = BackendState::Ready;
        self.backend_ok = true;
        self.wipe_key();
    }

    fn wipe_key(&mut self) {
        if let Some(k) = self.key.as_mut() {
            k.fill(0);
        }
        self.key = None;
    }

    /// Advances the browser leg over `data`; returns the bytes consumed,
    /// fewer than `data.len()` when the leg waits for the backend or is done.
    fn step_browser(&mut self, data: &[u8]) -> Result<usize, RfbError> {
        let mut i = 0;
        loop {
            match self.browser {
                BrowserState::Version => {
                    let (major, minor) = match self.browser_acc.fill_version(data, &mut i) {
                        Err(()) => {
                            return Err(RfbError::BrowserProtocol(
                                "first bytes are not an RFB ProtocolVersion",
                            ))
                        }
                        Ok(None) => break,
                        Ok(Some(v)) => v,
                    };
                    let v = Version::for_client(major, minor).ok_or(RfbError::BrowserProtocol(
                        "asked for an RFB version other than 3.x",
                    ))?;
                    self.browser_version = Some(v);
                    if v == Version::V3_8 {
                        // Offer None right away so the browser's choice
                        // overlaps our backend authentication.
                        self.to_browser.extend_from_slice(&[1, SECURITY_NONE]);
                        self.browser = BrowserState::Choice;
                    } else {
                        self.browser = BrowserState::SendTypes;
                    }
                }
                BrowserState::SendTypes => {
                    if !self.backend_ok {
                        break;
                    }
                    if self.browser_version == Some(Version::V3_3) {
                        // RFB 3.3: the server dictates the type; None needs
                        // no SecurityResult, so ClientInit follows.
                        self.to_browser
                            .extend_from_slice(&u32::from(SECURITY_NONE).to_be_bytes());
                        self.browser = BrowserState::ClientInit;
                    } else {
                        self.to_browser.extend_from_slice(&[1, SECURITY_NONE]);
                        self.browser = BrowserState::Choice;
                    }
                }
                BrowserState::Choice => {
                    let Some(&choice) = data.get(i) else {
                        break;
                    };
                    i += 1;
                    if choice != SECURITY_NONE {
                        if self.browser_version == Some(Version::V3_8) {
                            push_failure_result(&mut self.to_browser, "security type not offered");
                        }
                        self.browser = BrowserState::Done;
                        return Err(RfbError::BrowserProtocol(
                            "chose a security type that was not offered",
                        ));
                    }
                    self.browser = if self.browser_version == Some(Version::V3_8) {
                        BrowserState::SendResult
                    } else {
                        // RFB 3.7 sends no SecurityResult after None.
                        BrowserState::ClientInit
                    };
                }
                BrowserState::SendResult => {
                    if !self.backend_ok {
                        break;
                    }
                    self.to_browser.extend_from_slice(&0u32.to_be_bytes());
                    self.browser = BrowserState::ClientInit;
                }
                BrowserState::ClientInit => {
                    // Both paths here wait for backend_ok; checked anyway so
                    // ClientInit can never reach an unauthenticated backend.
                    if !self.backend_ok {
                        break;
                    }
                    let Some(&shared) = data.get(i) else {
                        break;
                    };
                    i += 1;
                    self.to_backend.push(shared);
                    self.browser = BrowserState::Done;
                    self.done = true;
                    let early = std::mem::take(&mut self.early_backend);
                    self.to_browser.extend_from_slice(&early);
                    break;
                }
                BrowserState::Done => break,
            }
        }
        Ok(i)
    }

    /// Records the error and, where the browser's RFB state still allows a
    /// failure with a reason, queues one so the user sees why (noVNC shows
    /// it) instead of a bare disconnect.
    fn fail(&mut self, err: &RfbError) {
        self.failed = Some(err.clone());
        self.wipe_key();
        if err.side() != Side::Backend {
            return;
        }
        let reason = format!("console backend: {err}");
        match (self.browser, self.browser_version) {
            (BrowserState::SendTypes, Some(Version::V3_3)) => {
                // 3.3 failure: security type 0, then the reason.
                self.to_browser.extend_from_slice(&0u32.to_be_bytes());
                push_string(&mut self.to_browser, &reason);
            }
            (BrowserState::SendTypes, Some(_)) => {
                // 3.7/3.8 failure: an empty type list, then the reason.
                self.to_browser.push(0);
                push_string(&mut self.to_browser, &reason);
            }
            (BrowserState::Choice | BrowserState::SendResult, Some(Version::V3_8)) => {
                // The browser reads its SecurityResult after sending its
                // choice, whether or not that choice has reached us yet.
                push_failure_result(&mut self.to_browser, &reason);
            }
            _ => return,
        }
        self.browser = BrowserState::Done;
    }
}

fn reason_error(why: ReasonFor, reason: String) -> RfbError {
    match why {
        ReasonFor::Refused => RfbError::BackendRefused { reason },
        ReasonFor::AuthFailed => RfbError::AuthFailed { reason },
    }
}

/// SecurityResult "failed" plus the 3.8 reason string.
fn push_failure_result(out: &mut Vec<u8>, reason: &str) {
    out.extend_from_slice(&1u32.to_be_bytes());
    push_string(out, reason);
}

/// An RFB string: u32 length, then the bytes.
fn push_string(out: &mut Vec<u8>, s: &str) {
    // Our reasons are short (bounded by max_reason_bytes plus a fixed text).
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes().get(..len as usize).unwrap_or(s.as_bytes()));
}

/// A backend reason made safe for logs: lossy UTF-8, control characters
/// (newlines included, against log injection) replaced by spaces.
fn printable(raw: &[u8], truncated: bool) -> String {
    let mut s: String = String::from_utf8_lossy(raw)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if truncated {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // ---- independent references -------------------------------------------

    /// Bit reversal written differently from `u8::reverse_bits`.
    fn reverse_by_loop(b: u8) -> u8 {
        let mut out = 0u8;
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                out |= 0x80 >> bit;
            }
        }
        out
    }

    fn reference_response(password: &[u8], challenge: &[u8; 16]) -> [u8; 16] {
        let mut key = [0u8; 8];
        for (i, k) in key.iter_mut().enumerate() {
            *k = reverse_by_loop(password.get(i).copied().unwrap_or(0));
        }
        des_response(&key, challenge)
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn des_known_vectors() {
        // Computed with OpenSSL (`openssl enc -des-ecb -nopad`, legacy
        // provider) with the bit-reversed key, independently of this code.
        let cases: [(&[u8], &str, &str); 4] = [
            (
                b"passwd",
                "000102030405060708090a0b0c0d0e0f",
                "e8399b58571e87ed8445c8716b6dd945",
            ),
            (
                b"password123",
                "00112233445566778899aabbccddeeff",
                "b7b9c87777661a7a2299733209bfdfce",
            ),
            // Only 8 bytes count: "password" and "password123" agree.
            (
                b"password",
                "00112233445566778899aabbccddeeff",
                "b7b9c87777661a7a2299733209bfdfce",
            ),
            // The classic DES all-zero vector.
            (
                b"",
                "00000000000000000000000000000000",
                "8ca64de9c1b123a78ca64de9c1b123a7",
            ),
        ];
        for (pw, ch, want) in cases {
            let ch: [u8; 16] = hex(ch).try_into().unwrap();
            assert_eq!(
                vnc_auth_response(pw, &ch).to_vec(),
                hex(want),
                "password {pw:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn des_matches_independent_bit_reversal(pw in proptest::collection::vec(any::<u8>(), 0..12), ch in any::<[u8; 16]>()) {
            prop_assert_eq!(vnc_auth_response(&pw, &ch), reference_response(&pw, &ch));
        }
    }

    // ---- mock peers --------------------------------------------------------

    /// An RFB server as a backend would be, scripted by its configuration.
    struct MockServer {
        /// 3.7/3.8: the list (empty = refuse); 3.3: first element as a u32.
        types: Vec<u8>,
        password: Option<Vec<u8>>,
        refuse_reason: Vec<u8>,
        fail_reason: Vec<u8>,
        /// Bytes sent right after the SecurityResult (misbehaviour).
        chatter_after_result: Vec<u8>,
        challenge: [u8; 16],
        server_init: Vec<u8>,
        // state
        version: Option<Version>,
        inbox: Vec<u8>,
        pos: usize,
        stage: u8,
        chosen: u8,
        out: Vec<u8>,
        client_init: Option<u8>,
        relayed: Vec<u8>,
        auth_ok: Option<bool>,
    }

    impl MockServer {
        fn new(announce: &[u8], types: &[u8], password: Option<&[u8]>) -> Self {
            MockServer {
                types: types.to_vec(),
                password: password.map(<[u8]>::to_vec),
                refuse_reason: b"too many clients".to_vec(),
                fail_reason: b"Authentication failure".to_vec(),
                chatter_after_result: Vec::new(),
                challenge: *b"0123456789abcdef",
                server_init: b"SERVERINIT-BYTES".to_vec(),
                version: None,
                inbox: Vec::new(),
                pos: 0,
                stage: 0,
                chosen: 0,
                out: announce.to_vec(),
                client_init: None,
                relayed: Vec::new(),
                auth_ok: None,
            }
        }

        fn take(&mut self, n: usize) -> Option<Vec<u8>> {
            let v = self.inbox.get(self.pos..self.pos + n)?.to_vec();
            self.pos += n;
            Some(v)
        }

        fn send_result(&mut self, ok: bool) {
            self.auth_ok = Some(ok);
            if ok {
                self.out.extend_from_slice(&0u32.to_be_bytes());
                let chatter = self.chatter_after_result.clone();
                self.out.extend_from_slice(&chatter);
                self.stage = 5;
            } else {
                self.out.extend_from_slice(&1u32.to_be_bytes());
                if self.version == Some(Version::V3_8) {
                    let r = self.fail_reason.clone();
                    self.out.extend_from_slice(&(r.len() as u32).to_be_bytes());
                    self.out.extend_from_slice(&r);
                }
                self.stage = 99;
            }
        }

        fn recv(&mut self, data: &[u8]) {
            self.inbox.extend_from_slice(data);
            loop {
                match self.stage {
                    0 => {
                        let Some(v) = self.take(12) else { return };
                        self.version = Some(match &v[..] {
                            b"RFB 003.003\n" => Version::V3_3,
                            b"RFB 003.007\n" => Version::V3_7,
                            b"RFB 003.008\n" => Version::V3_8,
                            other => panic!("server got version {other:?}"),
                        });
                        if self.version == Some(Version::V3_3) {
                            let t = self.types.first().copied().unwrap_or(0);
                            self.out.extend_from_slice(&u32::from(t).to_be_bytes());
                            if t == 0 {
                                let r = self.refuse_reason.clone();
                                self.out.extend_from_slice(&(r.len() as u32).to_be_bytes());
                                self.out.extend_from_slice(&r);
                                self.stage = 99;
                            } else {
                                self.chosen = t;
                                self.stage = if t == 2 { 3 } else { 5 };
                                if t == 1 {
                                    // RFB 3.3 None: no SecurityResult.
                                    self.auth_ok = Some(true);
                                }
                                if t == 2 {
                                    let c = self.challenge;
                                    self.out.extend_from_slice(&c);
                                }
                            }
                        } else {
                            self.out.push(self.types.len() as u8);
                            if self.types.is_empty() {
                                let r = self.refuse_reason.clone();
                                self.out.extend_from_slice(&(r.len() as u32).to_be_bytes());
                                self.out.extend_from_slice(&r);
                                self.stage = 99;
                            } else {
                                let t = self.types.clone();
                                self.out.extend_from_slice(&t);
                                self.stage = 2;
                            }
                        }
                    }
                    2 => {
                        let Some(c) = self.take(1) else { return };
                        let c = c[0];
                        assert!(self.types.contains(&c), "client chose unoffered {c}");
                        self.chosen = c;
                        if c == 2 {
                            let ch = self.challenge;
                            self.out.extend_from_slice(&ch);
                            self.stage = 3;
                        } else if self.version == Some(Version::V3_8) {
                            self.send_result(true);
                        } else {
                            self.auth_ok = Some(true);
                            self.stage = 5;
                        }
                    }
                    3 => {
                        let Some(resp) = self.take(16) else { return };
                        let pw = self.password.clone().unwrap_or_default();
                        let ok = resp == reference_response(&pw, &self.challenge);
                        self.send_result(ok);
                    }
                    5 => {
                        let Some(ci) = self.take(1) else { return };
                        self.client_init = Some(ci[0]);
                        let si = self.server_init.clone();
                        self.out.extend_from_slice(&si);
                        self.stage = 6;
                    }
                    6 => {
                        self.relayed.extend_from_slice(&self.inbox[self.pos..]);
                        self.pos = self.inbox.len();
                        return;
                    }
                    _ => return,
                }
            }
        }
    }

    /// A browser (noVNC-like) client for the given version, choosing None.
    struct MockClient {
        reply: Vec<u8>,
        version: Version,
        inbox: Vec<u8>,
        pos: usize,
        stage: u8,
        out: Vec<u8>,
        /// Sent right after ClientInit (the first client messages).
        after_init: Vec<u8>,
        server_init_len: usize,
        got_server_init: Option<Vec<u8>>,
        failure: Option<String>,
    }

    impl MockClient {
        fn new(reply: &[u8], version: Version) -> Self {
            MockClient {
                reply: reply.to_vec(),
                version,
                inbox: Vec::new(),
                pos: 0,
                stage: 0,
                out: Vec::new(),
                after_init: b"SETENCODINGS".to_vec(),
                server_init_len: 16,
                got_server_init: None,
                failure: None,
            }
        }

        fn take(&mut self, n: usize) -> Option<Vec<u8>> {
            let v = self.inbox.get(self.pos..self.pos + n)?.to_vec();
            self.pos += n;
            Some(v)
        }

        fn take_string(&mut self) -> Option<String> {
            let len = self.inbox.get(self.pos..self.pos + 4)?;
            let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
            let s = self.inbox.get(self.pos + 4..self.pos + 4 + len)?;
            let s = String::from_utf8(s.to_vec()).unwrap();
            self.pos += 4 + len;
            Some(s)
        }

        fn init(&mut self) {
            self.out.push(1);
            let a = self.after_init.clone();
            self.out.extend_from_slice(&a);
            self.stage = 5;
        }

        fn recv(&mut self, data: &[u8]) {
            self.inbox.extend_from_slice(data);
            loop {
                match self.stage {
                    0 => {
                        let Some(v) = self.take(12) else { return };
                        assert_eq!(&v, BROWSER_PROTOCOL_VERSION);
                        let r = self.reply.clone();
                        self.out.extend_from_slice(&r);
                        self.stage = 1;
                    }
                    1 if self.version == Version::V3_3 => {
                        let Some(t) = self.take(4) else { return };
                        match u32::from_be_bytes(t.try_into().unwrap()) {
                            1 => self.init(),
                            0 => {
                                let Some(r) = self.take_string() else {
                                    self.pos -= 4;
                                    return;
                                };
                                self.failure = Some(r);
                                self.stage = 99;
                            }
                            t => panic!("3.3 type {t}"),
                        }
                    }
                    1 => {
                        let Some(n) = self.take(1) else { return };
                        if n[0] == 0 {
                            let Some(r) = self.take_string() else {
                                self.pos -= 1;
                                return;
                            };
                            self.failure = Some(r);
                            self.stage = 99;
                            continue;
                        }
                        let Some(list) = self.take(usize::from(n[0])) else {
                            self.pos -= 1;
                            return;
                        };
                        assert_eq!(list, vec![1]);
                        self.out.push(1);
                        if self.version == Version::V3_8 {
                            self.stage = 2;
                        } else {
                            self.init();
                        }
                    }
                    2 => {
                        let Some(r) = self.take(4) else { return };
                        if r == [0, 0, 0, 0] {
                            self.init();
                        } else {
                            let Some(s) = self.take_string() else {
                                self.pos -= 4;
                                return;
                            };
                            self.failure = Some(s);
                            self.stage = 99;
                        }
                    }
                    5 => {
                        let n = self.server_init_len;
                        let Some(si) = self.take(n) else { return };
                        self.got_server_init = Some(si);
                        self.stage = 6;
                    }
                    _ => return,
                }
            }
        }
    }

    /// How bytes are moved: chunk sizes (cycled) and which side goes first.
    #[derive(Clone, Debug)]
    struct Schedule {
        chunks: Vec<usize>,
        backend_first: Vec<bool>,
    }

    impl Schedule {
        fn one_shot() -> Self {
            Schedule {
                chunks: vec![usize::MAX],
                backend_first: vec![true],
            }
        }
        fn bytewise() -> Self {
            Schedule {
                chunks: vec![1],
                backend_first: vec![true, false],
            }
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        result: Result<(), RfbError>,
        server_got: Vec<u8>,
        client_got: Vec<u8>,
    }

    /// Passes `data` from one side (the backend when `from_backend`)
    /// through `hs`, or straight across once the handshake is done; what
    /// reaches the other side is recorded in `got` and given to `deliver`.
    fn pass(
        hs: &mut Handshake,
        from_backend: bool,
        data: &[u8],
        got: &mut Vec<u8>,
        deliver: &mut dyn FnMut(&[u8]),
    ) -> Result<(), RfbError> {
        let mut forward = |b: &[u8]| {
            got.extend_from_slice(b);
            deliver(b);
        };
        if hs.is_done() {
            forward(data);
            return Ok(());
        }
        let used = if from_backend {
            hs.on_backend(data)?
        } else {
            hs.on_browser(data)?
        };
        let out = if from_backend {
            hs.take_to_browser()
        } else {
            hs.take_to_backend()
        };
        forward(&out);
        if used < data.len() {
            assert!(hs.is_done());
            forward(&data[used..]);
        }
        Ok(())
    }

    /// Moves bytes between the mocks through `hs` (and, once done, directly:
    /// the relay) until nothing moves.
    fn drive(
        server: &mut MockServer,
        client: &mut MockClient,
        hs: &mut Handshake,
        s: &Schedule,
    ) -> Outcome {
        let mut sent_s = 0; // server.out bytes already moved
        let mut sent_c = 0;
        let mut server_got = Vec::new();
        let mut client_got = Vec::new();
        let mut result = Ok(());
        'outer: for step in 0..100_000usize {
            let mut progress = false;
            let chunk = s.chunks[step % s.chunks.len()].max(1);
            let backend_first = s.backend_first[step % s.backend_first.len()];
            for phase in 0..2 {
                let backend_turn = (phase == 0) == backend_first;
                let step = if backend_turn {
                    let n = (server.out.len() - sent_s).min(chunk);
                    let data = server.out[sent_s..sent_s + n].to_vec();
                    sent_s += n;
                    (n > 0).then(|| pass(hs, true, &data, &mut client_got, &mut |b| client.recv(b)))
                } else {
                    let n = (client.out.len() - sent_c).min(chunk);
                    let data = client.out[sent_c..sent_c + n].to_vec();
                    sent_c += n;
                    (n > 0)
                        .then(|| pass(hs, false, &data, &mut server_got, &mut |b| server.recv(b)))
                };
                match step {
                    Some(Err(e)) => {
                        result = Err(e);
                        break 'outer;
                    }
                    Some(Ok(())) => progress = true,
                    None => {}
                }
                // Outputs produced by the other side's input.
                let out = hs.take_to_backend();
                if !out.is_empty() {
                    progress = true;
                    server_got.extend_from_slice(&out);
                    server.recv(&out);
                }
                let out = hs.take_to_browser();
                if !out.is_empty() {
                    progress = true;
                    client_got.extend_from_slice(&out);
                    client.recv(&out);
                }
            }
            if !progress {
                break;
            }
        }
        // After an error the caller flushes the browser notice.
        let out = hs.take_to_browser();
        client_got.extend_from_slice(&out);
        client.recv(&out);
        Outcome {
            result,
            server_got,
            client_got,
        }
    }

    fn server_for(v: Version, password: Option<&[u8]>) -> MockServer {
        match v {
            Version::V3_3 => MockServer::new(
                v.wire(),
                &[if password.is_some() { 2 } else { 1 }],
                password,
            ),
            _ => MockServer::new(
                v.wire(),
                if password.is_some() { &[2] } else { &[1] },
                password,
            ),
        }
    }

    fn run(
        sv: Version,
        cv: Version,
        password: Option<&[u8]>,
        sched: &Schedule,
    ) -> (Outcome, MockServer, MockClient, Handshake) {
        let mut server = server_for(sv, password);
        let mut client = MockClient::new(cv.wire(), cv);
        let mut hs = Handshake::new(password, RfbLimits::default());
        let out = drive(&mut server, &mut client, &mut hs, sched);
        (out, server, client, hs)
    }

    const VERSIONS: [Version; 3] = [Version::V3_3, Version::V3_7, Version::V3_8];

    #[test]
    fn every_version_combination_with_none_and_vnc_auth() {
        for sv in VERSIONS {
            for cv in VERSIONS {
                for pw in [None, Some(&b"secret"[..])] {
                    for sched in [Schedule::one_shot(), Schedule::bytewise()] {
                        let ctx = format!("server {sv:?} client {cv:?} pw {pw:?} {sched:?}");
                        let (out, server, client, hs) = run(sv, cv, pw, &sched);
                        assert_eq!(out.result, Ok(()), "{ctx}");
                        assert!(hs.is_done(), "{ctx}");
                        assert_eq!(server.version, Some(sv), "{ctx}");
                        assert_eq!(hs.backend_version(), Some(sv), "{ctx}");
                        assert_eq!(hs.browser_version(), Some(cv), "{ctx}");
                        assert_eq!(server.auth_ok, Some(true), "{ctx}");
                        assert_eq!(
                            hs.backend_security_type(),
                            Some(if pw.is_some() { 2 } else { 1 }),
                            "{ctx}"
                        );
                        assert_eq!(server.client_init, Some(1), "{ctx}");
                        assert_eq!(server.relayed, b"SETENCODINGS", "{ctx}");
                        assert_eq!(
                            client.got_server_init.as_deref(),
                            Some(&b"SERVERINIT-BYTES"[..]),
                            "{ctx}"
                        );
                        assert_eq!(client.failure, None, "{ctx}");
                    }
                }
            }
        }
    }

    #[test]
    fn browser_sees_exact_bytes_per_version() {
        let (out, ..) = run(
            Version::V3_8,
            Version::V3_8,
            Some(b"pw"),
            &Schedule::one_shot(),
        );
        assert_eq!(
            out.client_got,
            b"RFB 003.008\n\x01\x01\0\0\0\0SERVERINIT-BYTES"
        );
        let (out, ..) = run(
            Version::V3_8,
            Version::V3_7,
            Some(b"pw"),
            &Schedule::one_shot(),
        );
        assert_eq!(out.client_got, b"RFB 003.008\n\x01\x01SERVERINIT-BYTES");
        let (out, ..) = run(
            Version::V3_8,
            Version::V3_3,
            Some(b"pw"),
            &Schedule::one_shot(),
        );
        assert_eq!(out.client_got, b"RFB 003.008\n\0\0\0\x01SERVERINIT-BYTES");
    }

    #[test]
    fn backend_sees_exact_bytes() {
        let pw = b"secret";
        let (out, server, ..) = run(
            Version::V3_8,
            Version::V3_8,
            Some(pw),
            &Schedule::one_shot(),
        );
        let mut want = b"RFB 003.008\n\x02".to_vec();
        want.extend_from_slice(&reference_response(pw, &server.challenge));
        want.push(1);
        want.extend_from_slice(b"SETENCODINGS");
        assert_eq!(out.server_got, want);
        let (out, ..) = run(Version::V3_3, Version::V3_8, None, &Schedule::one_shot());
        assert_eq!(out.server_got, b"RFB 003.003\n\x01SETENCODINGS");
    }

    #[test]
    fn bytewise_equals_one_shot() {
        for sv in VERSIONS {
            for cv in VERSIONS {
                for pw in [None, Some(&b"pw"[..])] {
                    let (a, ..) = run(sv, cv, pw, &Schedule::one_shot());
                    let (b, ..) = run(sv, cv, pw, &Schedule::bytewise());
                    assert_eq!(a, b, "{sv:?} {cv:?}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn any_split_and_interleaving_gives_the_same_outcome(
            sv in 0usize..3, cv in 0usize..3, pw in any::<bool>(),
            chunks in proptest::collection::vec(1usize..20, 1..8),
            order in proptest::collection::vec(any::<bool>(), 1..8),
        ) {
            let pw = pw.then_some(&b"hunter2"[..]);
            let sched = Schedule { chunks, backend_first: order };
            let (a, ..) = run(VERSIONS[sv], VERSIONS[cv], pw, &Schedule::one_shot());
            let (b, ..) = run(VERSIONS[sv], VERSIONS[cv], pw, &sched);
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn wrong_password_fails_with_reason_and_browser_is_told() {
        for cv in VERSIONS {
            let mut server = server_for(Version::V3_8, Some(b"right"));
            let mut client = MockClient::new(cv.wire(), cv);
            let mut hs = Handshake::new(Some(b"wrong"), RfbLimits::default());
            // Browser first, so its version is known when the backend fails.
            let out = drive(
                &mut server,
                &mut client,
                &mut hs,
                &Schedule {
                    chunks: vec![usize::MAX],
                    backend_first: vec![false],
                },
            );
            let err = out.result.unwrap_err();
            assert_eq!(
                err,
                RfbError::AuthFailed {
                    reason: "Authentication failure".into()
                }
            );
            assert_eq!(err.kind(), "auth_failed");
            assert_eq!(err.side(), Side::Backend);
            let failure = client.failure.expect("browser told");
            assert!(failure.contains("Authentication failure"), "{failure}");
            assert!(server.client_init.is_none());
            // The same error again on any further input.
            assert_eq!(hs.on_backend(b"x"), Err(err.clone()));
            assert_eq!(hs.on_browser(b"x"), Err(err));
        }
    }

    #[test]
    fn old_server_auth_failure_has_no_reason() {
        for sv in [Version::V3_3, Version::V3_7] {
            let mut server = server_for(sv, Some(b"right"));
            let mut client = MockClient::new(b"RFB 003.008\n", Version::V3_8);
            let mut hs = Handshake::new(Some(b"wrong"), RfbLimits::default());
            let out = drive(&mut server, &mut client, &mut hs, &Schedule::one_shot());
            assert!(
                matches!(out.result, Err(RfbError::AuthFailed { .. })),
                "{:?}",
                out.result
            );
        }
    }

    #[test]
    fn server_refusal_carries_reason() {
        for sv in VERSIONS {
            let mut server = MockServer::new(sv.wire(), &[], None);
            if sv == Version::V3_3 {
                server.types = vec![0];
            }
            let mut client = MockClient::new(b"RFB 003.008\n", Version::V3_8);
            let mut hs = Handshake::new(None, RfbLimits::default());
            let out = drive(&mut server, &mut client, &mut hs, &Schedule::one_shot());
            assert_eq!(
                out.result,
                Err(RfbError::BackendRefused {
                    reason: "too many clients".into()
                }),
                "{sv:?}"
            );
        }
    }

    #[test]
    fn refusal_reason_reaches_each_browser_version() {
        for cv in VERSIONS {
            let mut hs = Handshake::new(None, RfbLimits::default());
            hs.take_to_browser();
            hs.on_browser(cv.wire()).unwrap();
            hs.take_to_browser();
            let mut msg = b"RFB 003.008\n\x00".to_vec();
            msg.extend_from_slice(&4u32.to_be_bytes());
            msg.extend_from_slice(b"busy");
            let err = hs.on_backend(&msg).unwrap_err();
            let notice = hs.take_to_browser();
            let text = format!("console backend: {err}");
            let mut want = match cv {
                Version::V3_3 => 0u32.to_be_bytes().to_vec(),
                Version::V3_7 => vec![0],
                Version::V3_8 => 1u32.to_be_bytes().to_vec(),
            };
            want.extend_from_slice(&(text.len() as u32).to_be_bytes());
            want.extend_from_slice(text.as_bytes());
            assert_eq!(notice, want, "{cv:?}");
        }
    }

    #[test]
    fn no_common_security_type() {
        let mut server = MockServer::new(b"RFB 003.008\n", &[16, 19], None);
        let mut client = MockClient::new(b"RFB 003.008\n", Version::V3_8);
        let mut hs = Handshake::new(Some(b"pw"), RfbLimits::default());
        let out = drive(&mut server, &mut client, &mut hs, &Schedule::one_shot());
        let err = out.result.unwrap_err();
        assert_eq!(
            err,
            RfbError::NoCommonSecurity {
                offered: vec![16, 19],
                password_configured: true
            }
        );
        assert_eq!(err.kind(), "no_common_security");

        // VNC auth only, but no password configured.
        let mut hs = Handshake::new(None, RfbLimits::default());
        let err = hs.on_backend(b"RFB 003.008\n\x01\x02").unwrap_err();
        assert_eq!(
            err,
            RfbError::NoCommonSecurity {
                offered: vec![2],
                password_configured: false
            }
        );
        assert!(
            err.to_string().contains("needs a configured password"),
            "{err}"
        );
        let mut hs = Handshake::new(None, RfbLimits::default());
        let err = hs.on_backend(b"RFB 003.003\n\0\0\0\x02").unwrap_err();
        assert_eq!(
            err,
            RfbError::NoCommonSecurity {
                offered: vec![2],
                password_configured: false
            }
        );
        let mut hs = Handshake::new(None, RfbLimits::default());
        let err = hs.on_backend(b"RFB 003.003\n\0\0\x01\0").unwrap_err();
        assert_eq!(err.kind(), "backend_protocol");
    }

    #[test]
    fn security_choice_prefers_vnc_auth_with_password_else_none() {
        let mut hs = Handshake::new(Some(b"pw"), RfbLimits::default());
        hs.on_backend(b"RFB 003.008\n\x03\x10\x01\x02").unwrap();
        assert_eq!(hs.take_to_backend(), b"RFB 003.008\n\x02");
        // A password but the server only offers None: None is used.
        let mut hs = Handshake::new(Some(b"pw"), RfbLimits::default());
        hs.on_backend(b"RFB 003.008\n\x02\x10\x01").unwrap();
        assert_eq!(hs.take_to_backend(), b"RFB 003.008\n\x01");
        assert_eq!(hs.backend_security_type(), Some(1));
        let mut hs = Handshake::new(None, RfbLimits::default());
        hs.on_backend(b"RFB 003.007\n\x02\x02\x01").unwrap();
        assert_eq!(hs.take_to_backend(), b"RFB 003.007\n\x01");
        assert!(hs.backend_authenticated(), "3.7 None has no SecurityResult");
    }

    #[test]
    fn version_mapping() {
        let cases: [(&[u8], &[u8]); 8] = [
            (b"RFB 003.003\n", b"RFB 003.003\n"),
            (b"RFB 003.005\n", b"RFB 003.003\n"),
            (b"RFB 003.007\n", b"RFB 003.007\n"),
            (b"RFB 003.008\n", b"RFB 003.008\n"),
            (b"RFB 003.889\n", b"RFB 003.008\n"),
            (b"RFB 004.001\n", b"RFB 003.008\n"),
            (b"RFB 005.000\n", b"RFB 003.008\n"),
            (b"RFB 003.010\n", b"RFB 003.008\n"),
        ];
        for (server, reply) in cases {
            let mut hs = Handshake::new(None, RfbLimits::default());
            assert_eq!(hs.on_backend(server), Ok(12));
            assert_eq!(
                hs.take_to_backend(),
                reply,
                "{:?}",
                String::from_utf8_lossy(server)
            );
        }
        for bad in [
            &b"RFB 002.000\n"[..],
            b"RFB 003.002\n",
            b"RFB 006.000\n",
            b"RFB 000.000\n",
        ] {
            let mut hs = Handshake::new(None, RfbLimits::default());
            let err = hs.on_backend(bad).unwrap_err();
            assert_eq!(err.kind(), "unsupported_version", "{bad:?}");
        }
        let mut hs = Handshake::new(None, RfbLimits::default());
        assert_eq!(
            hs.on_backend(b"RFB 003.002\n").unwrap_err(),
            RfbError::UnsupportedVersion { major: 3, minor: 2 }
        );
    }

    #[test]
    fn non_rfb_backend_fails_on_first_wrong_byte() {
        let mut hs = Handshake::new(None, RfbLimits::default());
        assert_eq!(hs.on_backend(b"S"), Err(RfbError::BackendNotRfb));
        let mut hs = Handshake::new(None, RfbLimits::default());
        assert_eq!(hs.on_backend(b"RFB 00"), Ok(6));
        assert_eq!(hs.on_backend(b"x"), Err(RfbError::BackendNotRfb));
        let mut hs = Handshake::new(None, RfbLimits::default());
        // A TLS-only server answers with a TLS record, not a version.
        assert_eq!(hs.on_backend(&[0x16, 3, 1]), Err(RfbError::BackendNotRfb));
    }

    #[test]
    fn browser_protocol_errors() {
        let mut hs = Handshake::new(None, RfbLimits::default());
        let err = hs.on_browser(b"GET / HTTP/1.1\r\n").unwrap_err();
        assert_eq!(err.kind(), "browser_protocol");
        assert_eq!(err.side(), Side::Browser);

        let mut hs = Handshake::new(None, RfbLimits::default());
        assert!(hs.on_browser(b"RFB 004.000\n").is_err());

        // Choosing a type we did not offer: 3.8 gets a failed SecurityResult.
        let mut hs = Handshake::new(None, RfbLimits::default());
        hs.take_to_browser();
        hs.on_browser(b"RFB 003.008\n").unwrap();
        assert_eq!(hs.take_to_browser(), [1, 1]);
        let err = hs.on_browser(&[2]).unwrap_err();
        assert_eq!(err.side(), Side::Browser);
        let out = hs.take_to_browser();
        assert_eq!(&out[..4], &[0, 0, 0, 1]);
    }

    #[test]
    fn long_reason_is_truncated_not_buffered() {
        let limits = RfbLimits {
            max_reason_bytes: 8,
            ..RfbLimits::default()
        };
        let mut hs = Handshake::new(None, limits);
        let mut msg = b"RFB 003.008\n\x00".to_vec();
        msg.extend_from_slice(&u32::MAX.to_be_bytes());
        msg.extend_from_slice(b"line one\nline two");
        let err = hs.on_backend(&msg).unwrap_err();
        assert_eq!(
            err,
            RfbError::BackendRefused {
                reason: "line one…".into()
            }
        );
        // Control characters never reach a log line.
        let mut hs = Handshake::new(None, RfbLimits::default());
        let mut msg = b"RFB 003.008\n\x00".to_vec();
        msg.extend_from_slice(&5u32.to_be_bytes());
        msg.extend_from_slice(b"a\nb\x1bc");
        assert_eq!(
            hs.on_backend(&msg).unwrap_err(),
            RfbError::BackendRefused {
                reason: "a b c".into()
            }
        );
        // Zero limit: no hang, an immediate error.
        let mut hs = Handshake::new(
            None,
            RfbLimits {
                max_reason_bytes: 0,
                ..RfbLimits::default()
            },
        );
        let mut msg = b"RFB 003.008\n\x00".to_vec();
        msg.extend_from_slice(&3u32.to_be_bytes());
        assert_eq!(
            hs.on_backend(&msg).unwrap_err(),
            RfbError::BackendRefused {
                reason: "…".into()
            }
        );
    }

    #[test]
    fn browser_pipelining_is_held_and_forwarded_in_order() {
        let mut hs = Handshake::new(Some(b"pw"), RfbLimits::default());
        // A browser that sends everything before the backend said a word.
        let early = b"RFB 003.008\n\x01\x01SETPIXELFORMAT";
        assert_eq!(hs.on_browser(early), Ok(early.len()));
        assert!(!hs.is_done());
        assert_eq!(hs.take_to_browser(), b"RFB 003.008\n\x01\x01");
        assert_eq!(hs.on_backend(b"RFB 003.008\n\x01\x02"), Ok(14));
        let challenge = [7u8; 16];
        assert_eq!(hs.on_backend(&challenge), Ok(16));
        assert_eq!(hs.take_to_backend().len(), 12 + 1 + 16);
        // SecurityResult OK plus a stray byte the relay should carry.
        assert_eq!(hs.on_backend(b"\0\0\0\0!"), Ok(4));
        assert!(hs.is_done());
        assert_eq!(hs.take_to_backend(), b"\x01SETPIXELFORMAT");
        assert_eq!(hs.take_to_browser(), b"\0\0\0\0");
        assert_eq!(hs.on_backend(b"more"), Ok(0));
        assert_eq!(hs.on_browser(b"more"), Ok(0));
    }

    #[test]
    fn backend_chatter_before_client_init_is_forwarded_after_result() {
        let mut server = server_for(Version::V3_8, None);
        server.chatter_after_result = b"??".to_vec();
        server.server_init = b"SERVERINIT-BYTE".to_vec(); // 15 + the 2 above..
        let mut client = MockClient::new(b"RFB 003.008\n", Version::V3_8);
        client.server_init_len = 17;
        let mut hs = Handshake::new(None, RfbLimits::default());
        let out = drive(&mut server, &mut client, &mut hs, &Schedule::bytewise());
        assert_eq!(out.result, Ok(()));
        assert_eq!(
            client.got_server_init.as_deref(),
            Some(&b"??SERVERINIT-BYTE"[..])
        );
    }

    #[test]
    fn split_at_done_returns_leftover() {
        let mut hs = Handshake::new(None, RfbLimits::default());
        hs.on_backend(b"RFB 003.008\n\x01\x01\0\0\0\0").unwrap();
        assert!(hs.backend_authenticated());
        assert_eq!(hs.on_browser(b"RFB 003.008\n\x01"), Ok(13));
        assert_eq!(hs.on_browser(b"\x00rest"), Ok(1));
        assert!(hs.is_done());
        assert_eq!(hs.take_to_backend(), b"RFB 003.008\n\x01\x00");
    }

    #[test]
    fn early_bytes_are_bounded() {
        let limits = RfbLimits {
            max_early_bytes: 4,
            ..RfbLimits::default()
        };
        let mut hs = Handshake::new(None, limits);
        hs.on_browser(b"RFB 003.008\n\x01").unwrap();
        assert_eq!(hs.on_browser(b"\x01abc"), Ok(4));
        let err = hs.on_browser(b"d").unwrap_err();
        assert_eq!(
            err,
            RfbError::TooLong {
                side: Side::Browser,
                what: "data ahead of the handshake",
                max: 4
            }
        );
        assert_eq!(err.side(), Side::Browser);
        assert_eq!(err.kind(), "too_long");

        let mut hs = Handshake::new(None, limits);
        let err = hs
            .on_backend(b"RFB 003.008\n\x01\x01\0\0\0\0hello")
            .unwrap_err();
        assert_eq!(err.side(), Side::Backend);
    }

    #[test]
    fn error_kinds_are_stable_and_distinct() {
        let all = [
            RfbError::BackendNotRfb,
            RfbError::UnsupportedVersion { major: 9, minor: 9 },
            RfbError::NoCommonSecurity {
                offered: vec![],
                password_configured: false,
            },
            RfbError::AuthFailed {
                reason: String::new(),
            },
            RfbError::BackendRefused {
                reason: String::new(),
            },
            RfbError::BackendProtocol("x"),
            RfbError::BrowserProtocol("x"),
            RfbError::TooLong {
                side: Side::Browser,
                what: "x",
                max: 1,
            },
        ];
        let kinds: std::collections::HashSet<_> = all.iter().map(RfbError::kind).collect();
        assert_eq!(kinds.len(), all.len());
        for e in &all {
            assert!(e
                .kind()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let hs = Handshake::new(Some(b"\x42\x42\x42\x42"), RfbLimits::default());
        let dbg = format!("{hs:?}");
        assert!(!dbg.contains("66"), "{dbg}"); // 0x42 reversed is 0x42 = 66
        assert!(dbg.contains("password_configured: true"));
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics_and_stays_bounded(
            pw in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..10)),
            feeds in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..64)), 0..24),
            prefix in 0usize..4,
        ) {
            let limits = RfbLimits { max_reason_bytes: 32, max_early_bytes: 64 };
            let mut hs = Handshake::new(pw.as_deref(), limits);
            // Valid-looking prefixes reach the deeper states more often.
            let prefixes: [&[u8]; 4] = [b"", b"RFB 003.008\n", b"RFB 003.003\n", b"RFB 003.007\n"];
            let _ = hs.on_backend(prefixes[prefix]);
            let _ = hs.on_browser(prefixes[(prefix + 1) % 4]);
            let mut total_out = 0usize;
            for (backend, data) in feeds {
                let r = if backend { hs.on_backend(&data) } else { hs.on_browser(&data) };
                if let Ok(n) = r {
                    prop_assert!(n <= data.len());
                    if n < data.len() { prop_assert!(hs.is_done()); }
                }
                total_out += hs.take_to_backend().len() + hs.take_to_browser().len();
            }
            // Output is a handful of fixed messages, forwarded early bytes
            // and one failure notice: bounded whatever the input.
            prop_assert!(total_out <= 4096, "{total_out}");
        }

        #[test]
        fn arbitrary_backend_after_valid_start_never_panics(
            tail in proptest::collection::vec(any::<u8>(), 0..300),
            cut in 0usize..300,
        ) {
            for pw in [None, Some(&b"pw"[..])] {
                let mut a = Handshake::new(pw, RfbLimits::default());
                let mut b = Handshake::new(pw, RfbLimits::default());
                let mut data = b"RFB 003.008\n".to_vec();
                data.extend_from_slice(&tail);
                let ra = a.on_backend(&data);
                let cut = cut.min(data.len());
                let rb = match b.on_backend(&data[..cut]) {
                    Ok(n) => {
                        prop_assert_eq!(n, cut);
                        b.on_backend(&data[cut..]).map(|m| n + m)
                    }
                    Err(e) => Err(e),
                };
                // Split or not, the same verdict and the same output.
                prop_assert_eq!(ra, rb);
                prop_assert_eq!(a.take_to_backend(), b.take_to_backend());
            }
        }
    }
}
