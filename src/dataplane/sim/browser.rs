//! The simulated browser: sends the upgrade request and masked frames of
//! random sizes and kinds (fragmented messages, pings, pongs, close frames,
//! and sometimes a protocol error), and reads what the session sends: the
//! HTTP answer, then server frames, which it checks (framing, order, pong
//! payloads, nothing after the close frame) and whose payload it keeps for
//! the world to compare with what the backend wrote.

use std::collections::VecDeque;
use std::io::{Read as _, Write as _};

use base64::Engine as _;

use super::net::Link;
use super::rng::Rng;
use crate::protocol::websocket::{close_code, encode_client_frame, Opcode};

/// The key every simulated browser sends, and the accept value it expects
/// (RFC 6455 1.3's example).
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subprotocol {
    None,
    Binary,
    Base64,
}

/// What the browser's request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// A valid upgrade (right ticket in appliance mode).
    Good,
    /// Appliance: the right session id with a wrong ticket (403).
    BadTicket,
    /// Appliance: an id no one admitted (404).
    UnknownSession,
    /// Not HTTP at all (400).
    NotHttp,
    /// `Sec-WebSocket-Version: 8` (426).
    BadVersion,
    /// Stops halfway through its request (408 at the handshake timeout).
    Slow,
    /// A head longer than `max_request_bytes` (431).
    Oversize,
}

/// The deliberate protocol errors, with the close code each must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Garbage {
    Unmasked,
    ReservedBits,
    ReservedOpcode,
    UnexpectedContinuation,
    ExpectedContinuation,
    FragmentedControl,
    ControlTooLong,
    BadClosePayload,
    InvalidCloseCode,
    LengthMsbSet,
    TooBig,
    InvalidUtf8,
    InvalidBase64,
    BinaryInBase64,
}

impl Garbage {
    fn code(self) -> u16 {
        match self {
            Garbage::TooBig => close_code::TOO_BIG,
            Garbage::InvalidUtf8 | Garbage::InvalidBase64 => close_code::INVALID_PAYLOAD,
            Garbage::BinaryInBase64 => close_code::UNSUPPORTED_DATA,
            _ => close_code::PROTOCOL_ERROR,
        }
    }

    /// The bytes of this error (`data_op` the mode's data opcode; a frame
    /// over `max_frame_bytes` is only its header: the length is refused).
    fn bytes(self, data_op: Opcode, mask: [u8; 4], max_frame_bytes: u64) -> Vec<u8> {
        let mut v = Vec::new();
        let frame = |v: &mut Vec<u8>, fin: bool, op: Opcode, payload: &[u8]| {
            encode_client_frame(v, fin, op, mask, payload)
        };
        match self {
            Garbage::Unmasked => v.extend_from_slice(&[0x80 | data_op.as_u8(), 1, b'x']),
            Garbage::ReservedBits => {
                frame(&mut v, true, data_op, b"");
                v[0] |= 0x40;
            }
            Garbage::ReservedOpcode => v.extend_from_slice(&[0x83, 0x80, 1, 2, 3, 4]),
            Garbage::UnexpectedContinuation => frame(&mut v, true, Opcode::Continuation, b""),
            Garbage::ExpectedContinuation => {
                // The first fragment is valid (empty, so nothing reaches the
                // backend); the second data frame is the error.
                frame(&mut v, false, data_op, b"");
                frame(&mut v, true, data_op, b"");
            }
            Garbage::FragmentedControl => frame(&mut v, false, Opcode::Ping, b""),
            Garbage::ControlTooLong => frame(&mut v, true, Opcode::Ping, &[0; 126]),
            Garbage::BadClosePayload => frame(&mut v, true, Opcode::Close, &[3]),
            Garbage::InvalidCloseCode => frame(&mut v, true, Opcode::Close, &1005u16.to_be_bytes()),
            Garbage::LengthMsbSet => {
                v.extend_from_slice(&[0x80 | data_op.as_u8(), 0x80 | 127, 0x80]);
                v.extend_from_slice(&[0; 7]);
                v.extend_from_slice(&mask);
            }
            Garbage::TooBig => {
                let mut hdr = [0u8; 10];
                let n = crate::protocol::websocket::write_server_header(
                    &mut hdr,
                    true,
                    data_op,
                    max_frame_bytes + 1,
                );
                hdr[1] |= 0x80;
                v.extend_from_slice(&hdr[..n]);
                v.extend_from_slice(&mask);
            }
            Garbage::InvalidUtf8 => frame(&mut v, true, Opcode::Text, &[0xff, b'a']),
            Garbage::InvalidBase64 => frame(&mut v, true, Opcode::Text, b"!!!!"),
            Garbage::BinaryInBase64 => frame(&mut v, true, Opcode::Binary, b"QUJD"),
        }
        v
    }
}

/// Limits the browser respects (or breaks on purpose).
#[derive(Debug, Clone, Copy)]
pub struct BrowserLimits {
    pub max_frame_bytes: u64,
    /// Largest message it sends (a few `buffer_bytes`: enough to fill the
    /// session's queue toward a slow backend).
    pub max_message_bytes: usize,
}

#[derive(Debug)]
pub struct Browser {
    pub kind: RequestKind,
    pub proto: Subprotocol,
    limits: BrowserLimits,
    /// Generated bytes not yet written to the socket.
    out: VecDeque<u8>,
    /// The payload the backend should see, in order.
    pub sent_payload: Vec<u8>,
    /// No more frames will be generated (close or garbage sent, or the
    /// browser only ever sends its request).
    pub done_sending: bool,
    /// Close codes this browser's own frames call for (its close, echoed;
    /// its protocol error).
    pub codes_caused: Vec<u16>,
    /// Unparsed bytes read from the session.
    inbuf: Vec<u8>,
    head_done: bool,
    /// The body of an HTTP error answer.
    body: Vec<u8>,
    /// The HTTP status the session answered.
    pub status: Option<u16>,
    /// Payload of the session's data frames, decoded.
    pub received: Vec<u8>,
    /// The session's close frame: its code (None: empty payload).
    pub close_got: Option<Option<u16>>,
    /// Pings sent and not answered yet (payloads, in order).
    pings_out: VecDeque<Vec<u8>>,
    pings_sent: u32,
    /// The session's side reached EOF.
    pub eof: bool,
    /// This browser reset or shut its connection.
    pub gone: bool,
    /// Stop reading until this step (a slow browser).
    pub stalled_until: u64,
    /// Answers pings and close frames (false: a rude browser).
    pub polite: bool,
    /// Data frames sent (for the run's figures).
    pub frames_sent: u64,
    /// Appliance with a VNC password: the browser's RFB security phase
    /// with the appliance comes before any relay data.
    pub rfb: Option<RfbClient>,
    /// wss: its TLS connection, and records not written to the socket yet.
    pub tls: Option<Box<rustls::ClientConnection>>,
    wire_out: Vec<u8>,
    /// WebMKS: frames pass through unchanged, so `sent_payload` and
    /// `received` hold the raw bytes of data frames (header, mask and
    /// payload as on the wire), not their payload.
    pub frames_raw: bool,
    /// Where the last whole data frame it received starts in `received`
    /// (WebMKS pads a half-relayed frame with zeros when closing).
    pub last_frame_at: usize,
}

/// The bytes the appliance sends a browser in its RFB security phase: its
/// version, the one security type None, SecurityResult OK.
pub const RFB_FROM_APPLIANCE: &[u8] = b"RFB 003.008\n\x01\x01\x00\x00\x00\x00";
/// The browser's side: version, choice None, ClientInit (shared). The
/// ClientInit is forwarded to the backend; the rest is the appliance's.
pub const RFB_FROM_BROWSER: &[u8] = b"RFB 003.008\n\x01\x01";

/// Where a browser is in its RFB security phase (a noVNC-like client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RfbClient {
    /// Waiting for `upto` bytes of [`RFB_FROM_APPLIANCE`] before sending
    /// its next message; `pipelined` sends all three messages at once.
    Waiting { upto: usize, pipelined: bool },
    /// SecurityResult OK arrived: relay data may flow.
    Done,
    /// The appliance reported a failure (the backend refused it).
    Refused,
}

impl Browser {
    pub fn new(
        kind: RequestKind,
        proto: Subprotocol,
        limits: BrowserLimits,
        request: Vec<u8>,
        polite: bool,
    ) -> Self {
        Self {
            kind,
            proto,
            limits,
            out: request.into(),
            sent_payload: Vec::new(),
            done_sending: kind != RequestKind::Good,
            codes_caused: Vec::new(),
            inbuf: Vec::new(),
            head_done: false,
            body: Vec::new(),
            status: None,
            received: Vec::new(),
            close_got: None,
            pings_out: VecDeque::new(),
            pings_sent: 0,
            eof: false,
            gone: false,
            stalled_until: 0,
            polite,
            frames_sent: 0,
            rfb: None,
            tls: None,
            wire_out: Vec::new(),
            frames_raw: false,
            last_frame_at: 0,
        }
    }

    /// The upgrade request for `path_and_query`, or a broken one.
    pub fn request(
        kind: RequestKind,
        proto: Subprotocol,
        path_and_query: &str,
        max_request_bytes: usize,
    ) -> Vec<u8> {
        let protocol = match proto {
            Subprotocol::None => "",
            Subprotocol::Binary => "Sec-WebSocket-Protocol: binary\r\n",
            Subprotocol::Base64 => "Sec-WebSocket-Protocol: base64\r\n",
        };
        let version = if kind == RequestKind::BadVersion {
            "8"
        } else {
            "13"
        };
        let mut head = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: sim\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n\
             Sec-WebSocket-Version: {version}\r\n{protocol}"
        );
        match kind {
            RequestKind::NotHttp => return b"this is not http\r\n\r\n".to_vec(),
            RequestKind::Slow => {
                // Half a request: the rest never comes.
                head.truncate(head.len() / 2);
                return head.into_bytes();
            }
            RequestKind::Oversize => {
                while head.len() <= max_request_bytes {
                    head.push_str("X-Filler: 0123456789012345678901234567890123456789\r\n");
                }
            }
            _ => {}
        }
        head.push_str("\r\n");
        head.into_bytes()
    }

    /// Queue more frames when few are waiting: a message (perhaps
    /// fragmented, with pings between fragments), a ping, a pong, and
    /// rarely (per the world's dice) a close frame or a protocol error.
    pub fn generate(
        &mut self,
        rng: &mut Rng,
        close_per_mille: u32,
        garbage_per_mille: u32,
    ) -> Result<(), String> {
        if self.done_sending || self.gone || self.out.len() > 64 * 1024 {
            return Ok(());
        }
        if self.rfb.is_some_and(|r| r != RfbClient::Done) {
            return self.rfb_step(rng);
        }
        if rng.chance(close_per_mille) {
            let code = rng.pick(&[None, Some(1000), Some(1001), Some(3000), Some(4999)]);
            self.send_close(rng, code);
            return Ok(());
        }
        if rng.chance(garbage_per_mille) {
            self.send_garbage(rng);
            return Ok(());
        }
        match rng.below(20) {
            0 => {
                let p = self.next_ping_payload();
                self.frame(rng, true, Opcode::Ping, &p);
                self.pings_out.push_back(p);
            }
            // An unsolicited pong (a heartbeat): the session ignores it.
            1 => self.frame(rng, true, Opcode::Pong, b"hb"),
            _ => self.message(rng),
        }
        Ok(())
    }

    /// The RFB security phase: answer each appliance message once it has
    /// arrived (or, pipelining, everything after its version), check each.
    pub fn rfb_step(&mut self, rng: &mut Rng) -> Result<(), String> {
        let Some(RfbClient::Waiting { upto, pipelined }) = self.rfb else {
            return Ok(());
        };
        if self.received.len() < upto {
            return Ok(());
        }
        if self.received[..upto] != RFB_FROM_APPLIANCE[..upto] {
            if upto == RFB_FROM_APPLIANCE.len() && self.received[..14] == RFB_FROM_APPLIANCE[..14] {
                // A failed SecurityResult: the backend refused us.
                self.rfb = Some(RfbClient::Refused);
                self.done_sending = true;
                return Ok(());
            }
            return Err(format!(
                "the appliance's RFB greeting was {:?}",
                String::from_utf8_lossy(&self.received[..upto])
            ));
        }
        let (send, next) = match (upto, pipelined) {
            (12, true) => (RFB_FROM_BROWSER, 18),
            (12, false) => (&RFB_FROM_BROWSER[..12], 14),
            (14, _) => (&RFB_FROM_BROWSER[12..13], 18),
            (18, true) => (&[][..], 0),
            _ => (&RFB_FROM_BROWSER[13..], 0),
        };
        if !send.is_empty() {
            self.data_message(rng, send);
        }
        self.rfb = Some(if next == 0 {
            RfbClient::Done
        } else {
            RfbClient::Waiting {
                upto: next,
                pipelined,
            }
        });
        Ok(())
    }

    /// One unfragmented data message carrying `payload`.
    fn data_message(&mut self, rng: &mut Rng, payload: &[u8]) {
        if self.proto == Subprotocol::Base64 {
            let text = base64::engine::general_purpose::STANDARD.encode(payload);
            self.frame(rng, true, Opcode::Text, text.as_bytes());
        } else {
            self.frame(rng, true, Opcode::Binary, payload);
        }
        self.frames_sent += 1;
        if !self.frames_raw {
            self.sent_payload.extend_from_slice(payload);
        }
    }

    fn next_ping_payload(&mut self) -> Vec<u8> {
        self.pings_sent += 1;
        format!("p{}", self.pings_sent).into_bytes()
    }

    fn frame(&mut self, rng: &mut Rng, fin: bool, op: Opcode, payload: &[u8]) {
        let mut mask = [0u8; 4];
        rng.fill(&mut mask);
        let mut v = Vec::with_capacity(payload.len() + 14);
        encode_client_frame(&mut v, fin, op, mask, payload);
        let data = matches!(op, Opcode::Binary | Opcode::Text | Opcode::Continuation);
        if self.frames_raw && data {
            self.sent_payload.extend_from_slice(&v);
        }
        self.out.extend(v);
    }

    /// One data message: random bytes (binary), text with multi-byte
    /// characters (raw mode) or base64 text (base64 mode), cut into
    /// fragments at arbitrary points, a ping sometimes between them.
    fn message(&mut self, rng: &mut Rng) {
        let max = self.limits.max_message_bytes;
        let len = if rng.chance(30) { 0 } else { rng.size(max) };
        let (op, wire, payload) = match self.proto {
            Subprotocol::Base64 => {
                let mut raw = vec![0u8; len];
                rng.fill(&mut raw);
                let text = base64::engine::general_purpose::STANDARD.encode(&raw);
                (Opcode::Text, text.into_bytes(), raw)
            }
            _ if rng.chance(300) => {
                let s = random_text(rng, len);
                (Opcode::Text, s.clone().into_bytes(), s.into_bytes())
            }
            _ => {
                let mut raw = vec![0u8; len];
                rng.fill(&mut raw);
                (Opcode::Binary, raw.clone(), raw)
            }
        };
        let max_frame = self.limits.max_frame_bytes.min(1 << 20) as usize;
        let mut pieces = Vec::new();
        let mut rest = &wire[..];
        let want_fragments = rng.chance(250);
        while rest.len() > max_frame || (want_fragments && !rest.is_empty() && rng.chance(600)) {
            let lowest = usize::from(rest.len() > max_frame);
            let cut = rng.range(lowest, rest.len().min(max_frame));
            pieces.push(&rest[..cut]);
            rest = &rest[cut..];
        }
        pieces.push(rest);
        let last = pieces.len() - 1;
        for (i, piece) in pieces.iter().enumerate() {
            let frame_op = if i == 0 { op } else { Opcode::Continuation };
            self.frame(rng, i == last, frame_op, piece);
            if i < last && rng.chance(100) {
                let p = self.next_ping_payload();
                self.frame(rng, true, Opcode::Ping, &p);
                self.pings_out.push_back(p);
            }
        }
        self.frames_sent += pieces.len() as u64;
        if !self.frames_raw {
            self.sent_payload.extend_from_slice(&payload);
        }
    }

    /// A close frame (code None: empty payload; the session echoes 1000).
    pub fn send_close(&mut self, rng: &mut Rng, code: Option<u16>) {
        if self.done_sending {
            return;
        }
        let payload = match code {
            None => Vec::new(),
            Some(c) => {
                let mut p = c.to_be_bytes().to_vec();
                p.extend_from_slice(b"bye");
                p
            }
        };
        self.frame(rng, true, Opcode::Close, &payload);
        self.codes_caused.push(code.unwrap_or(close_code::NORMAL));
        self.done_sending = true;
    }

    /// A protocol error the session must answer with its close code.
    fn send_garbage(&mut self, rng: &mut Rng) {
        let base64 = self.proto == Subprotocol::Base64;
        let mut kinds = vec![
            Garbage::Unmasked,
            Garbage::ReservedBits,
            Garbage::ReservedOpcode,
            Garbage::UnexpectedContinuation,
            Garbage::ExpectedContinuation,
            Garbage::FragmentedControl,
            Garbage::ControlTooLong,
            Garbage::BadClosePayload,
            Garbage::InvalidCloseCode,
            Garbage::LengthMsbSet,
            Garbage::TooBig,
        ];
        if self.frames_raw {
            // WebMKS passes frames through unread: only errors its frame
            // tracker sees before any byte of them is relayed.
            kinds.retain(|g| {
                !matches!(
                    g,
                    Garbage::ExpectedContinuation
                        | Garbage::BadClosePayload
                        | Garbage::InvalidCloseCode
                )
            });
        } else if base64 {
            kinds.extend([Garbage::InvalidBase64, Garbage::BinaryInBase64]);
        } else {
            kinds.push(Garbage::InvalidUtf8);
        }
        let g = rng.pick(&kinds);
        let data_op = if base64 { Opcode::Text } else { Opcode::Binary };
        let mut mask = [0u8; 4];
        rng.fill(&mut mask);
        self.out
            .extend(g.bytes(data_op, mask, self.limits.max_frame_bytes));
        self.codes_caused.push(g.code());
        self.done_sending = true;
    }

    /// Write up to `max` generated bytes; returns how many went.
    pub fn write(&mut self, link: &mut Link, max: usize) -> usize {
        if self.gone {
            return 0;
        }
        let Some(tls) = self.tls.as_mut() else {
            let n = max.min(self.out.len()).min(link.peer_room());
            let chunk: Vec<u8> = self.out.iter().take(n).copied().collect();
            let taken = link.peer_write(&chunk);
            self.out.drain(..taken);
            return taken;
        };
        // wss: plaintext into rustls (as much as it takes), its records
        // out as the socket takes them (its handshake included).
        if !self.out.is_empty() {
            let chunk: Vec<u8> = self.out.iter().take(max.min(64 * 1024)).copied().collect();
            let taken = tls.writer().write(&chunk).unwrap_or(0);
            self.out.drain(..taken);
        }
        while tls.wants_write() {
            if tls.write_tls(&mut self.wire_out).is_err() {
                break;
            }
        }
        let n = max.min(self.wire_out.len()).min(link.peer_room());
        let taken = link.peer_write(&self.wire_out[..n]);
        self.wire_out.drain(..taken);
        taken
    }

    /// Bytes generated and not on the wire yet (plaintext and records).
    pub fn unsent(&self) -> usize {
        self.out.len() + self.wire_out.len()
    }

    /// Bytes off the wire in, plaintext out (wss), or the bytes as they are.
    fn decrypt(&mut self, wire: Vec<u8>) -> Result<Vec<u8>, String> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(wire);
        };
        let mut plain = Vec::new();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            // (Never an empty read: rustls would take it as the end.)
            tls.read_tls(&mut rest)
                .map_err(|e| format!("TLS records it cannot read: {e}"))?;
            tls.process_new_packets()
                .map_err(|e| format!("a TLS error: {e}"))?;
            let mut buf = [0u8; 16 * 1024];
            loop {
                match tls.reader().read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => plain.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(format!("TLS plaintext: {e}")),
                }
            }
        }
        Ok(plain)
    }

    /// Read up to `max` bytes the session wrote and parse them. Returns a
    /// violation of the protocol by the session, if any.
    pub fn read(&mut self, link: &mut Link, max: usize, rng: &mut Rng) -> Result<usize, String> {
        let wire = link.peer_read(max);
        let n = wire.len();
        let got = self.decrypt(wire)?;
        if !got.is_empty() && self.close_got.is_some() {
            return Err(format!(
                "{} bytes arrived after the session's close frame",
                got.len()
            ));
        }
        self.inbuf.extend_from_slice(&got);
        if link.peer_sees_eof() {
            self.eof = true;
        }
        if !self.head_done {
            self.parse_head()?;
        }
        if self.head_done && self.status == Some(101) {
            self.parse_frames(rng)?;
        } else if self.head_done {
            // An error answer: a JSON body, then the connection closes.
            self.body.append(&mut self.inbuf);
            let prefix = b"{\"error\"";
            let n = self.body.len().min(prefix.len());
            if self.body[..n] != prefix[..n] {
                return Err(format!(
                    "HTTP {:?} with a body that is not an error: {:?}",
                    self.status,
                    String::from_utf8_lossy(&self.body)
                ));
            }
        }
        Ok(n)
    }

    fn parse_head(&mut self) -> Result<(), String> {
        let Some(end) = self.inbuf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if self.inbuf.len() > 64 * 1024 {
                return Err("an HTTP head longer than 64 KiB".into());
            }
            return Ok(());
        };
        let head = String::from_utf8_lossy(&self.inbuf[..end]).into_owned();
        let status = head
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("not an HTTP/1.1 status line: {head:?}"))?;
        self.status = Some(status);
        self.head_done = true;
        let lower = head.to_ascii_lowercase();
        if status == 101 {
            if !head.contains(&format!("Sec-WebSocket-Accept: {ACCEPT}")) {
                return Err(format!("101 without the right accept value: {head:?}"));
            }
            let want = match self.proto {
                Subprotocol::None => None,
                Subprotocol::Binary => Some("sec-websocket-protocol: binary"),
                Subprotocol::Base64 => Some("sec-websocket-protocol: base64"),
            };
            match want {
                Some(w) if !lower.contains(w) => {
                    return Err(format!("101 without the subprotocol asked: {head:?}"))
                }
                None if lower.contains("sec-websocket-protocol") => {
                    return Err(format!("101 with a subprotocol not asked for: {head:?}"))
                }
                _ => {}
            }
            self.inbuf.drain(..end + 4);
        } else {
            self.inbuf.drain(..end + 4);
        }
        Ok(())
    }

    fn parse_frames(&mut self, rng: &mut Rng) -> Result<(), String> {
        let mut at = 0;
        let result = loop {
            let b = &self.inbuf[at..];
            if b.len() < 2 {
                break Ok(());
            }
            let (b0, b1) = (b[0], b[1]);
            // (WebMKS passes the backend's fragmented messages through.)
            let fin_missing = b0 & 0x80 == 0 && !self.frames_raw;
            if b0 & 0x70 != 0 || fin_missing || b1 & 0x80 != 0 {
                break Err(format!("bad server frame header {b0:#04x} {b1:#04x}"));
            }
            let (len, hl) = match b1 & 0x7f {
                126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
                127 if b.len() >= 10 => {
                    let mut l = [0u8; 8];
                    l.copy_from_slice(&b[2..10]);
                    (u64::from_be_bytes(l), 10)
                }
                126 | 127 => break Ok(()),
                n => (u64::from(n), 2),
            };
            let Ok(len) = usize::try_from(len) else {
                break Err("a frame longer than memory".into());
            };
            if b.len() < hl + len {
                break Ok(());
            }
            let payload = b[hl..hl + len].to_vec();
            if self.frames_raw && b0 & 0x0f <= 0x2 {
                self.last_frame_at = self.received.len();
                self.received.extend_from_slice(&b[..hl + len]);
            }
            at += hl + len;
            if self.close_got.is_some() {
                break Err("a frame after the session's close frame".into());
            }
            if let Err(e) = self.on_frame(b0 & 0x0f, payload, rng) {
                break Err(e);
            }
        };
        self.inbuf.drain(..at);
        result
    }

    fn on_frame(&mut self, op: u8, payload: Vec<u8>, rng: &mut Rng) -> Result<(), String> {
        let data_op = if self.proto == Subprotocol::Base64 {
            1
        } else {
            2
        };
        match op {
            // (WebMKS: recorded raw by the caller.)
            0x0..=0x2 if self.frames_raw => {}
            _ if op == data_op => {
                if op == 1 {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(&payload)
                        .map_err(|e| format!("a text frame that is not base64: {e}"))?;
                    self.received.extend_from_slice(&raw);
                } else {
                    self.received.extend_from_slice(&payload);
                }
            }
            0x9 => {
                if payload.len() > 125 {
                    return Err("a ping longer than 125 bytes".into());
                }
                if self.polite && !self.done_sending && !self.gone {
                    self.frame(rng, true, Opcode::Pong, &payload);
                }
            }
            0xA => match self.pings_out.pop_front() {
                Some(p) if p == payload => {}
                other => {
                    return Err(format!(
                        "pong {:?} does not answer the oldest ping {:?}",
                        String::from_utf8_lossy(&payload),
                        other.map(|p| String::from_utf8_lossy(&p).into_owned())
                    ))
                }
            },
            0x8 => {
                let code = match payload.as_slice() {
                    [] => None,
                    [hi, lo, reason @ ..] => {
                        if std::str::from_utf8(reason).is_err() {
                            return Err("a close reason that is not UTF-8".into());
                        }
                        Some(u16::from_be_bytes([*hi, *lo]))
                    }
                    [_] => return Err("a 1-byte close payload".into()),
                };
                self.close_got = Some(code);
                if self.polite && !self.done_sending && !self.gone {
                    // The echo RFC 6455 asks for.
                    self.send_close(rng, code);
                }
            }
            other => return Err(format!("unexpected server opcode {other:#x}")),
        }
        Ok(())
    }
}

/// Valid UTF-8 of about `len` bytes, with multi-byte characters that
/// fragmenting may cut in the middle.
fn random_text(rng: &mut Rng, len: usize) -> String {
    let mut s = String::with_capacity(len + 4);
    while s.len() < len {
        s.push(rng.pick(&['a', 'Z', ' ', 'é', '€', '😀']));
    }
    s
}
