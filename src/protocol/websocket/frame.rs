//! Masking and frame encoders.

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

/// A complete server control frame (unmasked), stored inline.
#[derive(Clone, Copy)]
pub struct ControlFrame {
    buf: [u8; 2 + MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl ControlFrame {
    /// The frame's wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// `parts` are concatenated as the payload; their total must be ≤ 125.
    fn build(opcode: Opcode, parts: &[&[u8]]) -> Self {
        let mut buf = [0u8; 2 + MAX_CONTROL_PAYLOAD];
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

/// Encode a whole client→server (masked) frame, minimal length encoding:
/// for tests, fuzzing and the bench client.
pub fn encode_client_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: Opcode,
    mask: [u8; 4],
    payload: &[u8],
) {
    let mut hdr = [0u8; MAX_SERVER_HEADER_LEN];
    let n = write_server_header(&mut hdr, fin, opcode, payload.len() as u64);
    hdr[1] |= MASK_BIT;
    out.reserve(n + 4 + payload.len());
    out.extend_from_slice(&hdr[..n]);
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask, 0);
}
