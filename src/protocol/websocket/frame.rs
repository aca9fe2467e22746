//! Masking and frame encoders: unmasked frames for the server role (to a
//! browser) and masked frames for the client role (to a backend).

use super::*;

/// `key` rotated so that index 0 is the mask byte for payload offset `offset`.
#[inline]
fn rotated_key(mask: [u8; 4], offset: usize) -> [u8; 4] {
    let o = offset & 3;
    [
        mask[o],
        mask[(o + 1) & 3],
        mask[(o + 2) & 3],
        mask[(o + 3) & 3],
    ]
}

#[inline]
fn key_u64(k: [u8; 4]) -> u64 {
    u64::from_ne_bytes([k[0], k[1], k[2], k[3], k[0], k[1], k[2], k[3]])
}

/// Apply an RFC 6455 mask to `data` in place, starting at key offset
/// `offset` (taken mod 4). XORs 8 bytes at a time: masking sits on the
/// upstream hot path, and a byte loop costs several times more.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let k = rotated_key(mask, offset);
    let k8 = key_u64(k);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ k8).to_ne_bytes());
    }
    // Whole 8-byte words keep the key phase, so the tail restarts at k[0].
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= k[i & 3];
    }
}

/// Copy `src` into `dst` (same length) unmasking on the way: one pass over
/// the payload instead of a copy followed by `apply_mask`.
#[inline]
pub(super) fn mask_copy(src: &[u8], dst: &mut [u8], mask: [u8; 4], offset: usize) {
    let k = rotated_key(mask, offset);
    let k8 = key_u64(k);
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (dc, sc) in (&mut d).zip(&mut s) {
        let mut w = [0u8; 8];
        w.copy_from_slice(sc);
        dc.copy_from_slice(&(u64::from_ne_bytes(w) ^ k8).to_ne_bytes());
    }
    for (i, (db, sb)) in d.into_remainder().iter_mut().zip(s.remainder()).enumerate() {
        *db = sb ^ k[i & 3];
    }
}

/// Header length `write_server_header` would produce for this payload length.
pub fn server_header_len(payload_len: u64) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Write a server→client (unmasked) frame header into `out`; returns the
/// header length (2, 4 or 10), always using the minimal length encoding.
///
/// # Panics
/// If `out` is shorter than the header (a caller bug, not input: pass at
/// least [`MAX_SERVER_HEADER_LEN`] bytes). `payload_len` must be below 2^63,
/// which no real buffer reaches.
pub fn write_server_header(out: &mut [u8], fin: bool, opcode: Opcode, payload_len: u64) -> usize {
    let b0 = if fin { FIN_BIT } else { 0 } | opcode.as_u8();
    let n = server_header_len(payload_len);
    let h = &mut out[..n];
    h[0] = b0;
    match n {
        2 => h[1] = payload_len as u8,
        4 => {
            h[1] = LEN_16;
            h[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        }
        _ => {
            h[1] = LEN_64;
            h[2..10].copy_from_slice(&payload_len.to_be_bytes());
        }
    }
    n
}

/// Header length `write_client_header` would produce for this payload
/// length: the server form plus the 4-byte mask key.
pub fn client_header_len(payload_len: u64) -> usize {
    server_header_len(payload_len) + MASK_KEY_LEN
}

/// Write a client→server (masked) frame header with mask key `key` into
/// `out`; returns the header length (6, 8 or 14), minimal length encoding.
/// The payload that follows must be masked with the same key from offset 0:
/// [`apply_mask`]`(payload, key, 0)` in place, so a payload already in the
/// caller's buffer is never copied.
///
/// The key must be fresh and unpredictable for every frame (RFC 6455
/// 5.3): take it from a [`MaskKeySource`].
///
/// # Panics
/// If `out` is shorter than the header (a caller bug, not input: pass at
/// least [`MAX_CLIENT_HEADER_LEN`] bytes). `payload_len` must be below 2^63.
pub fn write_client_header(
    out: &mut [u8],
    fin: bool,
    opcode: Opcode,
    payload_len: u64,
    key: [u8; 4],
) -> usize {
    let n = write_server_header(out, fin, opcode, payload_len);
    out[1] |= MASK_BIT;
    out[n..n + MASK_KEY_LEN].copy_from_slice(&key);
    n + MASK_KEY_LEN
}

/// A complete control frame, stored inline: unmasked as a server sends it
/// ([`ping_frame`], [`pong_frame`], [`close_frame`]), or masked as a client
/// sends it ([`ControlFrame::masked`], [`client_ping_frame`], …).
#[derive(Clone, Copy)]
pub struct ControlFrame {
    buf: [u8; 2 + MASK_KEY_LEN + MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl ControlFrame {
    /// The frame's wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// The same frame as a client sends it: mask bit set, `key` after the
    /// length, payload masked with it. Masking a frame that already is
    /// masked returns it unchanged (never masks twice).
    pub fn masked(&self, key: [u8; 4]) -> ControlFrame {
        if self.buf[1] & MASK_BIT != 0 {
            return *self;
        }
        let payload_len = usize::from(self.buf[1]);
        let mut buf = [0u8; 2 + MASK_KEY_LEN + MAX_CONTROL_PAYLOAD];
        buf[0] = self.buf[0];
        buf[1] = self.buf[1] | MASK_BIT;
        buf[2..2 + MASK_KEY_LEN].copy_from_slice(&key);
        let payload_at = 2 + MASK_KEY_LEN;
        let payload = &mut buf[payload_at..payload_at + payload_len];
        payload.copy_from_slice(&self.buf[2..2 + payload_len]);
        apply_mask(payload, key, 0);
        ControlFrame {
            buf,
            len: (payload_at + payload_len) as u8,
        }
    }

    /// `parts` are concatenated as the payload; their total must be ≤ 125.
    fn build(opcode: Opcode, parts: &[&[u8]]) -> Self {
        let mut buf = [0u8; 2 + MASK_KEY_LEN + MAX_CONTROL_PAYLOAD];
        let mut at = 2;
        for part in parts {
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        buf[0] = FIN_BIT | opcode.as_u8();
        buf[1] = (at - 2) as u8;
        Self { buf, len: at as u8 }
    }
}

impl fmt::Debug for ControlFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ControlFrame(b\"{}\")", self.as_bytes().escape_ascii())
    }
}

/// A ping frame; the payload is truncated to 125 bytes.
pub fn ping_frame(payload: &[u8]) -> ControlFrame {
    ControlFrame::build(
        Opcode::Ping,
        &[&payload[..payload.len().min(MAX_CONTROL_PAYLOAD)]],
    )
}

/// A pong frame; the payload is truncated to 125 bytes.
pub fn pong_frame(payload: &[u8]) -> ControlFrame {
    ControlFrame::build(
        Opcode::Pong,
        &[&payload[..payload.len().min(MAX_CONTROL_PAYLOAD)]],
    )
}

/// A close frame with `code` and `reason`; the reason is truncated to fit
/// 123 bytes on a UTF-8 character boundary, so the browser never sees an
/// invalid reason (which it would have to treat as a protocol error).
pub fn close_frame(code: u16, reason: &str) -> ControlFrame {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    ControlFrame::build(
        Opcode::Close,
        &[&code.to_be_bytes(), &reason.as_bytes()[..end]],
    )
}

/// A ping frame as a client sends it (masked with `key`); the payload is
/// truncated to 125 bytes.
pub fn client_ping_frame(payload: &[u8], key: [u8; 4]) -> ControlFrame {
    ping_frame(payload).masked(key)
}

/// A pong frame as a client sends it (masked with `key`): the answer to a
/// backend's ping, with the ping's payload; truncated to 125 bytes.
pub fn client_pong_frame(payload: &[u8], key: [u8; 4]) -> ControlFrame {
    pong_frame(payload).masked(key)
}

/// A close frame as a client sends it (masked with `key`), the reason
/// truncated as in [`close_frame`].
pub fn client_close_frame(code: u16, reason: &str, key: [u8; 4]) -> ControlFrame {
    close_frame(code, reason).masked(key)
}

/// Encode a whole client→server (masked) frame, minimal length encoding:
/// for tests, fuzzing and the bench client.
pub fn encode_client_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: Opcode,
    mask: [u8; 4],
    payload: &[u8],
) {
    let mut hdr = [0u8; MAX_CLIENT_HEADER_LEN];
    let n = write_client_header(&mut hdr, fin, opcode, payload.len() as u64, mask);
    out.reserve(n + payload.len());
    out.extend_from_slice(&hdr[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
}
