//! The simulated VMware host of a WebMKS relay: a TLS server (rustls),
//! then the server side of a WebSocket upgrade (it checks the appliance's
//! request: target, key, `binary` offered), then server frames both ways.
//! It sends binary messages (sometimes fragmented), pings it expects the
//! appliance to answer, and on a fault a close frame; it reads the client
//! frames the appliance passes through (the browser's, masked as the
//! browser masked them) and the appliance's own pongs and close frame.
//!
//! What the checks compare: the raw bytes of the data frames it sent
//! (`Backend::sent`) with those the browser received, and the raw bytes of
//! the data frames it received with those the browser sent — WebMKS frames
//! pass through unchanged, header and mask included.

use std::collections::VecDeque;
use std::io::{Read as _, Write as _};

use super::rng::Rng;
use crate::protocol::http_upgrade::write_upgrade_response;
use crate::protocol::websocket::{write_server_header, Opcode};

/// Most plaintext the server keeps unsent (it stops generating beyond).
const MAX_UNSENT_BYTES: usize = 64 * 1024;
/// Largest upgrade request head it accepts from the appliance.
const MAX_REQUEST_HEAD_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsServerState {
    /// Waiting for the appliance's upgrade request.
    Upgrade,
    /// 101 sent: frames flow.
    Open,
    /// A close frame went or came; nothing more is generated.
    Closing,
}

pub struct WsServer {
    tls: Box<rustls::ServerConnection>,
    /// TLS records not on the socket yet.
    wire_out: Vec<u8>,
    /// Decrypted bytes not parsed yet.
    plain_in: Vec<u8>,
    pub state: WsServerState,
    /// The request target the appliance must ask for (carries the ticket).
    path: String,
    /// Its pings not answered yet (payloads, in order).
    pings_out: VecDeque<Vec<u8>>,
    pings_sent: u32,
    /// Largest data frame payload it sends (the appliance's
    /// `max_frame_bytes`: the frames pass through its tracker).
    max_frame_bytes: usize,
    /// The appliance's close frame: its code (None: empty payload).
    pub close_got: Option<Option<u16>>,
    /// Its own close frame's code, once sent.
    pub close_sent: Option<u16>,
    /// Where the last whole data frame it received starts in `received`
    /// (the appliance pads a half-relayed frame with zeros when closing).
    pub last_frame_at: usize,
}

impl std::fmt::Debug for WsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsServer")
            .field("state", &self.state)
            .field("close_got", &self.close_got)
            .field("close_sent", &self.close_sent)
            .finish_non_exhaustive()
    }
}

impl WsServer {
    pub fn new(path: String, max_frame_bytes: usize) -> Self {
        Self {
            tls: Box::new(super::tls::webmks_server()),
            wire_out: Vec::new(),
            plain_in: Vec::new(),
            state: WsServerState::Upgrade,
            path,
            pings_out: VecDeque::new(),
            pings_sent: 0,
            max_frame_bytes: max_frame_bytes.max(1),
            close_got: None,
            close_sent: None,
            last_frame_at: 0,
        }
    }

    /// Bytes not on the wire yet (plaintext in rustls and records).
    pub fn unsent(&self) -> usize {
        self.wire_out.len() + usize::from(self.tls.wants_write())
    }

    /// Generate frames when little is waiting: a binary message (the raw
    /// frames go to `sent`), or a ping. Nothing while `quiet`.
    pub fn generate(&mut self, rng: &mut Rng, write_max: usize, quiet: bool, sent: &mut Vec<u8>) {
        if self.state != WsServerState::Open || quiet || self.wire_out.len() > MAX_UNSENT_BYTES {
            return;
        }
        if rng.chance(50) {
            self.pings_sent += 1;
            let p = format!("k{}", self.pings_sent).into_bytes();
            self.plain(&server_frame(true, Opcode::Ping, &p));
            self.pings_out.push_back(p);
            return;
        }
        let len = rng.size(write_max);
        let mut payload = vec![0u8; len];
        rng.fill(&mut payload);
        let mut rest = &payload[..];
        let fragment = rng.chance(200);
        let mut first = true;
        loop {
            let most = rest.len().min(self.max_frame_bytes);
            let cut = if fragment && most > 1 {
                rng.range(1, most)
            } else {
                most
            };
            let fin = cut == rest.len();
            let op = if first {
                Opcode::Binary
            } else {
                Opcode::Continuation
            };
            let f = server_frame(fin, op, &rest[..cut]);
            sent.extend_from_slice(&f);
            self.plain(&f);
            rest = &rest[cut..];
            first = false;
            if fin {
                break;
            }
        }
    }

    /// Its close frame (a fault: the VMware host ends the console).
    pub fn send_close(&mut self, code: Option<u16>) {
        if self.state != WsServerState::Open {
            return;
        }
        let payload = code.map(|c| c.to_be_bytes().to_vec()).unwrap_or_default();
        self.plain(&server_frame(true, Opcode::Close, &payload));
        self.close_sent = Some(code.unwrap_or(1000));
        self.state = WsServerState::Closing;
    }

    fn plain(&mut self, bytes: &[u8]) {
        // rustls buffers what it cannot seal yet (the handshake).
        let _ = self.tls.writer().write_all(bytes);
    }

    /// Records ready, onto the wire (as much as `room` takes); returns how
    /// many bytes `put` took.
    pub fn flush(&mut self, put: impl FnOnce(&[u8]) -> usize) -> usize {
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut self.wire_out).is_err() {
                break;
            }
        }
        let taken = put(&self.wire_out);
        self.wire_out.drain(..taken);
        taken
    }

    /// Records from the appliance: decrypt, then the upgrade request or
    /// client frames (data frames' raw bytes go to `received`).
    pub fn input(&mut self, wire: &[u8], received: &mut Vec<u8>) -> Result<(), String> {
        let mut rest = wire;
        while !rest.is_empty() {
            self.tls
                .read_tls(&mut rest)
                .map_err(|e| format!("TLS records it cannot read: {e}"))?;
            match self.tls.process_new_packets() {
                Ok(_) => {}
                // The appliance gave up during the TLS handshake (rustls
                // reports a close_notify then as an alert): the end.
                Err(rustls::Error::AlertReceived(rustls::AlertDescription::CloseNotify)) => {
                    self.state = WsServerState::Closing;
                    return Ok(());
                }
                Err(e) => return Err(format!("a TLS error: {e}")),
            }
            let mut buf = [0u8; 16 * 1024];
            loop {
                match self.tls.reader().read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => self.plain_in.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("TLS plaintext: {e}")),
                }
            }
        }
        if self.state == WsServerState::Upgrade {
            self.upgrade()?;
        }
        if self.state != WsServerState::Upgrade {
            self.frames(received)?;
        }
        Ok(())
    }

    /// The appliance's upgrade request, checked; the 101 answer.
    fn upgrade(&mut self) -> Result<(), String> {
        let Some(end) = self.plain_in.windows(4).position(|w| w == b"\r\n\r\n") else {
            if self.plain_in.len() > MAX_REQUEST_HEAD_BYTES {
                return Err("an upgrade request longer than 16 KiB".into());
            }
            return Ok(());
        };
        let head = String::from_utf8_lossy(&self.plain_in[..end]).into_owned();
        self.plain_in.drain(..end + 4);
        let want = format!("GET {} HTTP/1.1\r\n", self.path);
        if !head.starts_with(&want[..want.len() - 2]) {
            return Err(format!(
                "an upgrade request for another target: {:?}",
                head.lines().next()
            ));
        }
        let lower = head.to_ascii_lowercase();
        if !lower.contains("\r\nsec-websocket-protocol: binary") {
            return Err("an upgrade request without the binary subprotocol".into());
        }
        let key = head
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .ok_or("an upgrade request without a key")?
            .to_string();
        let mut answer = Vec::new();
        write_upgrade_response(&mut answer, &key, Some("binary"));
        self.plain(&answer);
        self.state = WsServerState::Open;
        Ok(())
    }

    /// Whole client frames: data frames' raw bytes to `received`; a pong
    /// must answer an outstanding ping (older ones may go unanswered, in
    /// order); the close frame is echoed.
    fn frames(&mut self, received: &mut Vec<u8>) -> Result<(), String> {
        let mut at = 0;
        let result = loop {
            let Some((op, hl, len)) = client_header(&self.plain_in[at..])? else {
                break Ok(());
            };
            if self.plain_in.len() - at < hl + len {
                break Ok(());
            }
            let raw = &self.plain_in[at..at + hl + len];
            if self.close_got.is_some() {
                break Err("a frame after the appliance's close frame".into());
            }
            let mut payload = raw[hl..].to_vec();
            let mask = [raw[hl - 4], raw[hl - 3], raw[hl - 2], raw[hl - 1]];
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
            match op {
                0x0..=0x2 => {
                    self.last_frame_at = received.len();
                    received.extend_from_slice(raw);
                }
                0x9 => self.plain(&server_frame(true, Opcode::Pong, &payload)),
                // RFC 6455 5.5.3: an endpoint with several pings unanswered
                // may answer only the latest (the appliance drops the oldest
                // deferred control frames beyond its bound), so a pong
                // settles its ping and every older one; it must answer a
                // ping that was sent and is still outstanding.
                0xA => match self.pings_out.iter().position(|p| *p == payload) {
                    Some(i) => {
                        self.pings_out.drain(..=i);
                    }
                    None => {
                        break Err(format!(
                            "pong {payload:?} answers no outstanding ping (outstanding: {:?})",
                            self.pings_out
                        ))
                    }
                },
                0x8 => {
                    let code = match payload.as_slice() {
                        [] => None,
                        [hi, lo, ..] => Some(u16::from_be_bytes([*hi, *lo])),
                        [_] => break Err("a 1-byte close payload from the appliance".into()),
                    };
                    self.close_got = Some(code);
                    if self.close_sent.is_none() {
                        self.plain(&server_frame(
                            true,
                            Opcode::Close,
                            &payload[..2.min(payload.len())],
                        ));
                        self.close_sent = code.or(Some(1000));
                    }
                    self.state = WsServerState::Closing;
                }
                other => break Err(format!("client opcode {other:#x} from the appliance")),
            }
            at += hl + len;
        };
        self.plain_in.drain(..at);
        result
    }
}

/// An unmasked server frame.
pub fn server_frame(fin: bool, op: Opcode, payload: &[u8]) -> Vec<u8> {
    let mut hdr = [0u8; 10];
    let n = write_server_header(&mut hdr, fin, op, payload.len() as u64);
    let mut v = Vec::with_capacity(n + payload.len());
    v.extend_from_slice(&hdr[..n]);
    v.extend_from_slice(payload);
    v
}

/// A client frame's opcode, header length (mask included) and payload
/// length, once its header is in; an unmasked frame is an error.
fn client_header(b: &[u8]) -> Result<Option<(u8, usize, usize)>, String> {
    if b.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (b[0], b[1]);
    if b1 & 0x80 == 0 || b0 & 0x70 != 0 {
        return Err(format!(
            "a bad client frame header {b0:#04x} {b1:#04x} from the appliance"
        ));
    }
    let (len, hl) = match b1 & 0x7f {
        126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 8),
        127 if b.len() >= 10 => {
            let mut l = [0u8; 8];
            l.copy_from_slice(&b[2..10]);
            (u64::from_be_bytes(l), 14)
        }
        126 | 127 => return Ok(None),
        n => (u64::from(n), 6),
    };
    if b.len() < hl {
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_| "a frame longer than memory".to_string())?;
    Ok(Some((b0 & 0x0f, hl, len)))
}
