//! The few WebSocket (RFC 6455) pieces a benchmark *client* needs, sans-IO:
//! the upgrade request and its `Sec-WebSocket-Accept` check, encoding a masked
//! client frame into a caller's buffer, and parsing a frame header.
//!
//! It touches no socket and allocates nothing per frame, so the timed loop in
//! `client.rs` stays allocation-free. It is deliberately not the proxy's codec
//! (`consolegate::protocol`): measuring a proxy with its own codec would hide
//! bugs that both share.

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 §1.3 appends to the key before hashing.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest payload this client accepts in one server frame. Echoed messages are
/// tiny; anything bigger means the proxy is misbehaving.
pub const MAX_RX_PAYLOAD: u64 = 1 << 20;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Longest client frame header: 2 + 8 (64-bit length) + 4 (mask key).
pub const MAX_CLIENT_HEADER: usize = 14;

#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Reserved bits set: no extension was negotiated.
    ReservedBits,
    /// Opcode 3–7 or 0xB–0xF.
    UnknownOpcode(u8),
    /// A control frame that is fragmented or longer than 125 bytes.
    BadControlFrame,
    /// The payload is larger than [`MAX_RX_PAYLOAD`].
    TooLarge(u64),
    /// The output buffer is too small for the frame.
    BufferTooSmall,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::ReservedBits => write!(f, "frame has reserved bits set"),
            FrameError::UnknownOpcode(op) => write!(f, "unknown opcode {op:#x}"),
            FrameError::BadControlFrame => write!(f, "fragmented or oversized control frame"),
            FrameError::TooLarge(n) => write!(f, "frame payload of {n} bytes exceeds the limit"),
            FrameError::BufferTooSmall => write!(f, "buffer too small for frame"),
        }
    }
}

impl std::error::Error for FrameError {}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: u8,
    /// Mask key when the frame is masked (server frames should not be).
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes taken by the header itself, i.e. where the payload starts.
    pub header_len: usize,
}

/// Parses the header at the start of `buf`. `Ok(None)` means more bytes are
/// needed. Never panics on any input.
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin || (b1 & 0x7F) > 125 {
                return Err(FrameError::BadControlFrame);
            }
        }
        other => return Err(FrameError::UnknownOpcode(other)),
    }
    let masked = b1 & 0x80 != 0;
    let (payload_len, mut pos) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    if payload_len > MAX_RX_PAYLOAD {
        return Err(FrameError::TooLarge(payload_len));
    }
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let mut m = [0u8; 4];
        m.copy_from_slice(&buf[pos..pos + 4]);
        pos += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(FrameHeader {
        fin,
        opcode,
        mask,
        payload_len,
        header_len: pos,
    }))
}

/// XORs `data` with `mask`, where `data` starts at byte `offset` of the payload.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[(offset + i) & 3];
    }
}

/// Writes a single final, masked client frame carrying `payload` into `out`
/// and returns its length. No allocation.
pub fn encode_client_frame(
    opcode: u8,
    payload: &[u8],
    mask: [u8; 4],
    out: &mut [u8],
) -> Result<usize, FrameError> {
    let len = payload.len();
    let header_len = match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    } + 4;
    let total = header_len + len;
    if out.len() < total {
        return Err(FrameError::BufferTooSmall);
    }
    out[0] = 0x80 | (opcode & 0x0F);
    match len {
        0..=125 => out[1] = 0x80 | len as u8,
        126..=0xFFFF => {
            out[1] = 0x80 | 126;
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out[1] = 0x80 | 127;
            out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out[header_len - 4..header_len].copy_from_slice(&mask);
    out[header_len..total].copy_from_slice(payload);
    apply_mask(&mut out[header_len..total], mask, 0);
    Ok(total)
}

/// Base64 of 16 key bytes, as sent in `Sec-WebSocket-Key`.
pub fn encode_key(raw: [u8; 16]) -> String {
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// The `Sec-WebSocket-Accept` value a server must answer to `key`.
pub fn accept_for_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Tests' server side of the upgrade: reads the request head from `s` and
/// answers `101` with the right accept key.
#[cfg(test)]
pub fn answer_upgrade(s: &mut std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut req = Vec::new();
    let mut b = [0u8; 1];
    while !req.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        req.push(b[0]);
    }
    let req = String::from_utf8(req).unwrap();
    let key = req
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
        .unwrap();
    write!(
        s,
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_for_key(key)
    )
    .unwrap();
}

/// The HTTP/1.1 upgrade request.
pub fn upgrade_request(host: &str, path: &str, key: &str, subprotocol: Option<&str>) -> String {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(p) = subprotocol {
        req.push_str("Sec-WebSocket-Protocol: ");
        req.push_str(p);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req
}

/// Outcome of feeding the bytes read so far to [`check_upgrade_response`].
#[derive(Debug, PartialEq, Eq)]
pub enum UpgradeResponse {
    /// Headers are incomplete; read more.
    Partial,
    /// 101 with the right accept value; frames start at this offset.
    Accepted { body_offset: usize },
}

/// Checks a server's answer to the upgrade: status 101, `Upgrade: websocket`
/// and the `Sec-WebSocket-Accept` that matches `key`.
pub fn check_upgrade_response(buf: &[u8], key: &str) -> Result<UpgradeResponse, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let body_offset = match resp.parse(buf) {
        Ok(httparse::Status::Partial) => return Ok(UpgradeResponse::Partial),
        Ok(httparse::Status::Complete(n)) => n,
        Err(e) => return Err(format!("bad HTTP response to upgrade: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        return Err(format!(
            "upgrade refused: HTTP {code} {}",
            resp.reason.unwrap_or("")
        ));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    match header("upgrade") {
        Some(v) if v.eq_ignore_ascii_case("websocket") => {}
        other => return Err(format!("101 without `Upgrade: websocket` (got {other:?})")),
    }
    let expected = accept_for_key(key);
    match header("sec-websocket-accept") {
        Some(v) if v == expected => Ok(UpgradeResponse::Accepted { body_offset }),
        other => Err(format!(
            "wrong Sec-WebSocket-Accept: got {other:?}, expected {expected}"
        )),
    }
}

/// Counts the data payload in a stream of server frames without copying it:
/// feed it whatever a read returned, in any split. Ping/pong payloads are
/// skipped, not counted; a close frame or a malformed header is an error.
/// (The throughput client's receive path.)
#[derive(Debug, Default)]
pub struct PayloadCounter {
    hdr: [u8; MAX_CLIENT_HEADER],
    hdr_len: usize,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// Whether the current frame's payload is data (counted).
    counting: bool,
    pub frames: u64,
}

impl PayloadCounter {
    /// Header length implied by its first two bytes.
    fn header_len(b1: u8) -> usize {
        let ext = match b1 & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
    }

    /// Data payload bytes contained in `buf`.
    pub fn feed(&mut self, mut buf: &[u8]) -> Result<u64, FrameError> {
        let mut counted = 0u64;
        // Bounded: every turn consumes at least one byte of `buf`.
        while !buf.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(buf.len() as u64);
                if self.counting {
                    counted += take;
                }
                self.remaining -= take;
                buf = &buf[take as usize..];
                continue;
            }
            let need = if self.hdr_len < 2 {
                2
            } else {
                Self::header_len(self.hdr[1])
            };
            let take = (need - self.hdr_len).min(buf.len());
            self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&buf[..take]);
            self.hdr_len += take;
            buf = &buf[take..];
            if self.hdr_len < need || need == 2 && Self::header_len(self.hdr[1]) > 2 {
                continue;
            }
            let h = parse_header(&self.hdr[..self.hdr_len])?.ok_or(FrameError::BufferTooSmall)?;
            self.hdr_len = 0;
            self.frames += 1;
            self.counting = match h.opcode {
                OP_BINARY | OP_TEXT | OP_CONTINUATION => true,
                OP_PING | OP_PONG => false,
                _ => return Err(FrameError::UnknownOpcode(h.opcode)),
            };
            self.remaining = h.payload_len;
        }
        Ok(counted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_matches_rfc6455_example() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_for_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn masked_hello_matches_rfc6455_vector() {
        // RFC 6455 §5.7: a single-frame masked text message containing "Hello".
        let mut out = [0u8; 32];
        let n = encode_client_frame(OP_TEXT, b"Hello", [0x37, 0xfa, 0x21, 0x3d], &mut out).unwrap();
        assert_eq!(
            &out[..n],
            &[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
        let h = parse_header(&out[..n]).unwrap().unwrap();
        assert_eq!(
            h,
            FrameHeader {
                fin: true,
                opcode: OP_TEXT,
                mask: Some([0x37, 0xfa, 0x21, 0x3d]),
                payload_len: 5,
                header_len: 6
            }
        );
        let mut p = out[h.header_len..n].to_vec();
        apply_mask(&mut p, h.mask.unwrap(), 0);
        assert_eq!(p, b"Hello");
    }

    #[test]
    fn parses_rfc6455_unmasked_and_fragmented_vectors() {
        // Unmasked "Hello".
        let h = parse_header(&[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f])
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.mask, h.payload_len, h.header_len),
            (true, OP_TEXT, None, 5, 2)
        );
        // Fragmented "Hel" + "lo".
        let h = parse_header(&[0x01, 0x03, 0x48, 0x65, 0x6c])
            .unwrap()
            .unwrap();
        assert_eq!((h.fin, h.opcode, h.payload_len), (false, OP_TEXT, 3));
        let h = parse_header(&[0x80, 0x02, 0x6c, 0x6f]).unwrap().unwrap();
        assert_eq!((h.fin, h.opcode, h.payload_len), (true, OP_CONTINUATION, 2));
        // Unmasked ping "Hello".
        let h = parse_header(&[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f])
            .unwrap()
            .unwrap();
        assert_eq!((h.opcode, h.payload_len), (OP_PING, 5));
        // 256 bytes binary in a single unmasked message: 16-bit length.
        let h = parse_header(&[0x82, 0x7E, 0x01, 0x00]).unwrap().unwrap();
        assert_eq!((h.opcode, h.payload_len, h.header_len), (OP_BINARY, 256, 4));
        // 64 KiB binary: 64-bit length.
        let h = parse_header(&[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, h.header_len), (65536, 10));
    }

    #[test]
    fn ten_byte_binary_frame_layout() {
        let payload = *b"0123456789";
        let mask = [1, 2, 3, 4];
        let mut out = [0u8; 64];
        let n = encode_client_frame(OP_BINARY, &payload, mask, &mut out).unwrap();
        assert_eq!(n, 2 + 4 + 10);
        assert_eq!(&out[..6], &[0x82, 0x80 | 10, 1, 2, 3, 4]);
        for i in 0..10 {
            assert_eq!(out[6 + i], payload[i] ^ mask[i % 4]);
        }
    }

    #[test]
    fn encodes_extended_lengths() {
        let payload = vec![7u8; 300];
        let mut out = vec![0u8; 400];
        let n = encode_client_frame(OP_BINARY, &payload, [9, 9, 9, 9], &mut out).unwrap();
        assert_eq!(n, 4 + 4 + 300);
        assert_eq!(&out[..4], &[0x82, 0x80 | 126, 0x01, 0x2C]);
        let payload = vec![7u8; 70_000];
        let mut out = vec![0u8; 70_100];
        let n = encode_client_frame(OP_BINARY, &payload, [9, 9, 9, 9], &mut out).unwrap();
        assert_eq!(n, 10 + 4 + 70_000);
        assert_eq!(out[1], 0x80 | 127);
        assert_eq!(&out[2..10], &70_000u64.to_be_bytes());
        assert_eq!(
            encode_client_frame(OP_BINARY, &payload, [0; 4], &mut [0u8; 10]),
            Err(FrameError::BufferTooSmall)
        );
    }

    #[test]
    fn partial_and_hostile_headers() {
        assert_eq!(parse_header(&[]), Ok(None));
        assert_eq!(parse_header(&[0x82]), Ok(None));
        assert_eq!(parse_header(&[0x82, 0x7E, 0x01]), Ok(None));
        assert_eq!(parse_header(&[0x82, 0x7F, 0, 0, 0]), Ok(None));
        assert_eq!(parse_header(&[0x82, 0x85, 1, 2]), Ok(None));
        assert_eq!(parse_header(&[0xC2, 0x00]), Err(FrameError::ReservedBits));
        assert_eq!(
            parse_header(&[0x83, 0x00]),
            Err(FrameError::UnknownOpcode(3))
        );
        assert_eq!(
            parse_header(&[0x09, 0x00]),
            Err(FrameError::BadControlFrame)
        );
        assert_eq!(
            parse_header(&[0x89, 0x7E, 0, 200]),
            Err(FrameError::BadControlFrame)
        );
        assert!(matches!(
            parse_header(&[0x82, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn upgrade_response_checks() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok =
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x82\x01A";
        let body = ok.len() - 3;
        assert_eq!(
            check_upgrade_response(ok, key),
            Ok(UpgradeResponse::Accepted { body_offset: body })
        );
        assert_eq!(
            check_upgrade_response(&ok[..20], key),
            Ok(UpgradeResponse::Partial)
        );
        let wrong = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                      Sec-WebSocket-Accept: AAAA\r\n\r\n";
        assert!(check_upgrade_response(wrong, key).is_err());
        let refused = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        assert!(check_upgrade_response(refused, key)
            .unwrap_err()
            .contains("404"));
        let req = upgrade_request("127.0.0.1:1", "/", key, Some("binary"));
        assert!(req.starts_with("GET / HTTP/1.1\r\n"));
        assert!(req.contains("\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"));
        assert!(req.contains("\r\nSec-WebSocket-Protocol: binary\r\n"));
        assert!(req.ends_with("\r\n\r\n"));
        assert_eq!(encode_key([0u8; 16]), "AAAAAAAAAAAAAAAAAAAAAA==");
    }

    #[test]
    fn payload_counter_counts_data_in_any_split() {
        let mut stream = Vec::new();
        // 3-byte binary, a ping, a 300-byte (16-bit length) binary, a
        // 70 000-byte (64-bit length) continuation.
        stream.extend_from_slice(&[0x02, 3, 1, 2, 3]);
        stream.extend_from_slice(&[0x89, 2, b'h', b'i']);
        stream.extend_from_slice(&[0x02, 126, 0x01, 0x2C]);
        stream.extend(std::iter::repeat_n(7u8, 300));
        stream.extend_from_slice(&[0x80, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
        stream.extend(std::iter::repeat_n(9u8, 70_000));
        for split in [1usize, 2, 3, 7, 64, 1000, stream.len()] {
            let mut c = PayloadCounter::default();
            let total: u64 = stream.chunks(split).map(|ch| c.feed(ch).unwrap()).sum();
            assert_eq!(total, 3 + 300 + 70_000, "split {split}");
            assert_eq!(c.frames, 4);
        }
        let mut c = PayloadCounter::default();
        assert_eq!(c.feed(&[0x88, 0]), Err(FrameError::UnknownOpcode(OP_CLOSE)));
        let mut c = PayloadCounter::default();
        assert_eq!(c.feed(&[0x03, 0]), Err(FrameError::UnknownOpcode(3)));
    }
}
