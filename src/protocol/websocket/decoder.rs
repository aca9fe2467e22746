//! The streaming frame decoder: headers, unmasking, UTF-8 and base64.

use super::*;

/// What one [`Decoder::decode`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Input bytes consumed (the caller drops them).
    pub consumed: usize,
    /// Data bytes written to `data_out` (unmasked / base64-decoded payload
    /// for the backend).
    pub written: usize,
    /// A control frame completed. Decoding stops right after it, so the
    /// caller can react (reply pong, echo close) before calling decode again
    /// with the rest.
    pub event: Option<Event>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MsgKind {
    Text,
    Binary,
}

/// The frame whose payload is being read.
#[derive(Debug, Clone, Copy)]
struct Frame {
    opcode: Opcode,
    fin: bool,
    /// Whether the payload is masked (client→server frames are).
    masked: bool,
    mask: [u8; 4],
    /// Payload bytes not yet consumed.
    remaining: u64,
    /// Payload bytes consumed so far, mod 4: where the mask key continues.
    mask_off: u8,
}

/// Streaming decoder of the frames one peer sends: masked client→server
/// frames from a browser ([`Role::Server`], [`Decoder::new`]), or unmasked
/// server→client frames from a backend ([`Role::Client`],
/// [`Decoder::with_role`]).
///
/// Holds partial header bytes (≤14) and control payloads (≤125) internally so
/// `decode` can always consume whatever it is given; never allocates.
pub struct Decoder {
    role: Role,
    pub(super) mode: PayloadMode,
    limits: DecoderLimits,
    hdr: [u8; MAX_CLIENT_HEADER_LEN],
    hdr_len: u8,
    /// Total header length once the first two bytes are validated; 0 before.
    hdr_need: u8,
    in_payload: bool,
    frame: Frame,
    /// The data message in progress (set from its first frame to its FIN).
    message: Option<MsgKind>,
    ctrl: [u8; MAX_CONTROL_PAYLOAD],
    ctrl_len: u8,
    utf8: Utf8Validator,
    b64: Base64Decoder,
    close_received: bool,
    poisoned: Option<WsError>,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("role", &self.role)
            .field("mode", &self.mode)
            .field("in_payload", &self.in_payload)
            .field("message", &self.message)
            .field("close_received", &self.close_received)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl Decoder {
    /// A decoder at the start of a browser's stream (the server role:
    /// frames must be masked; errors blame the browser).
    pub fn new(mode: PayloadMode, limits: DecoderLimits) -> Self {
        Self::with_role(Role::Server, mode, limits)
    }

    /// A decoder at the start of a stream, playing `role`: [`Role::Client`]
    /// decodes a server's (a backend's) unmasked frames, refuses masked ones
    /// with [`Fault::MaskedFrame`], and blames the backend for every error
    /// ([`WsError::Backend`]).
    pub fn with_role(role: Role, mode: PayloadMode, limits: DecoderLimits) -> Self {
        Self {
            role,
            mode,
            limits,
            hdr: [0; MAX_CLIENT_HEADER_LEN],
            hdr_len: 0,
            hdr_need: 0,
            in_payload: false,
            frame: Frame {
                opcode: Opcode::Continuation,
                fin: false,
                masked: false,
                mask: [0; 4],
                remaining: 0,
                mask_off: 0,
            },
            message: None,
            ctrl: [0; MAX_CONTROL_PAYLOAD],
            ctrl_len: 0,
            utf8: Utf8Validator::default(),
            b64: Base64Decoder::default(),
            close_received: false,
            poisoned: None,
        }
    }

    /// Decode as much of `input` as possible.
    ///
    /// Data payload bytes are unmasked (and base64-decoded in Base64 mode)
    /// into `data_out`. Decoding stops when the next payload byte does not fit
    /// in `data_out` (so `consumed < input.len()` is possible: the caller
    /// keeps the rest and calls again later), when input is exhausted, or
    /// right after a control frame completes (`event` set). Headers and
    /// control payloads never need `data_out`, so they are consumed even when
    /// it is full or empty.
    ///
    /// In Raw mode `written ≤ consumed`, so if `data_out.len() ≥ input.len()`
    /// all input is consumed unless an event or error stops it. In Base64 mode
    /// up to 3 characters are carried between calls (so one call may write
    /// a little more than it consumed), and completing a group needs room
    /// for its 1-3 output bytes: give at least 3 bytes of room to guarantee
    /// progress.
    ///
    /// After an error the decoder is poisoned: every later call returns the
    /// same error, because the stream position is no longer trustworthy.
    /// After a Close frame, further input is ignored (consumed, nothing
    /// written): RFC 6455 5.5.1 says nothing follows a close.
    pub fn decode(&mut self, input: &[u8], data_out: &mut [u8]) -> Result<Progress, WsError> {
        if let Some(e) = self.poisoned {
            return Err(e);
        }
        if self.close_received {
            return Ok(Progress {
                consumed: input.len(),
                ..Progress::default()
            });
        }
        let mut p = Progress::default();
        match self.run(input, data_out, &mut p) {
            Ok(()) => Ok(p),
            Err(fault) => Err(self.poison(fault)),
        }
    }

    /// Records the error (every later call returns it). Out of line: errors
    /// end a stream, and keeping their mapping off the hot path keeps the
    /// per-frame code small.
    #[cold]
    #[inline(never)]
    fn poison(&mut self, fault: Fault) -> WsError {
        let e = WsError::from_fault(self.role, fault);
        self.poisoned = Some(e);
        e
    }

    /// The role this decoder plays.
    pub fn role(&self) -> Role {
        self.role
    }

    /// True after a Close frame was decoded.
    pub fn close_received(&self) -> bool {
        self.close_received
    }

    /// True when between frames and messages: no partial header, frame or
    /// fragmented message is in progress (false once poisoned).
    pub fn is_idle(&self) -> bool {
        self.poisoned.is_none() && !self.in_payload && self.hdr_len == 0 && self.message.is_none()
    }

    fn run(&mut self, input: &[u8], out: &mut [u8], p: &mut Progress) -> Result<(), Fault> {
        loop {
            if !self.in_payload && !self.read_header(input, &mut p.consumed)? {
                return Ok(());
            }
            if self.frame.opcode.is_control() {
                self.read_control_payload(input, &mut p.consumed);
                if self.frame.remaining > 0 {
                    return Ok(());
                }
                self.in_payload = false;
                p.event = Some(self.finish_control()?);
                return Ok(());
            }
            if self.frame.remaining > 0 {
                match self.mode {
                    PayloadMode::Raw => self.raw_payload(input, out, p)?,
                    PayloadMode::Base64 => self.base64_payload(input, out, p)?,
                }
                // Still inside the payload: input ran out or data_out is full.
                if self.frame.remaining > 0 {
                    return Ok(());
                }
            }
            self.in_payload = false;
            self.finish_data_frame()?;
        }
    }

    /// Accumulate header bytes; Ok(true) once a whole header is validated
    /// and the frame set up, Ok(false) when input ran out first.
    fn read_header(&mut self, input: &[u8], pos: &mut usize) -> Result<bool, Fault> {
        if self.hdr_len == 0 && input.len() - *pos >= MAX_CLIENT_HEADER_LEN {
            // The longest possible header is at hand: one fixed-size copy
            // instead of two partial ones, because streams of small frames
            // (pointer events) are dominated by header handling.
            self.hdr
                .copy_from_slice(&input[*pos..*pos + MAX_CLIENT_HEADER_LEN]);
            let need = self.check_first_two()?;
            *pos += usize::from(need);
            self.finish_header()?;
            return Ok(true);
        }
        loop {
            let need = if self.hdr_need == 0 {
                2
            } else {
                usize::from(self.hdr_need)
            };
            let have = usize::from(self.hdr_len);
            if have < need {
                let take = (need - have).min(input.len() - *pos);
                self.hdr[have..have + take].copy_from_slice(&input[*pos..*pos + take]);
                self.hdr_len += take as u8;
                *pos += take;
                if have + take < need {
                    return Ok(false);
                }
            }
            if self.hdr_need == 0 {
                // Validate as soon as two bytes are in, so a hostile client is
                // cut off without us waiting for (or buffering) more.
                self.hdr_need = self.check_first_two()?;
            } else {
                self.finish_header()?;
                return Ok(true);
            }
        }
    }

    /// Checks what the first two header bytes alone decide (see
    /// [`header::check_start`], plus the base64 subprotocol's text-only
    /// rule); returns the full header length.
    fn check_first_two(&self) -> Result<u8, Fault> {
        let start =
            header::check_start(self.hdr[0], self.hdr[1], self.role, self.message.is_some())?;
        if start.opcode == Opcode::Binary && self.mode == PayloadMode::Base64 {
            return Err(Fault::BinaryInBase64Mode);
        }
        Ok(start.header_len)
    }

    /// The header is complete (and its first two bytes valid): check the
    /// length and set up the frame.
    fn finish_header(&mut self) -> Result<(), Fault> {
        let masked = self.hdr[1] & MASK_BIT != 0;
        let (len, mask) = header::length_and_key(&self.hdr, masked);
        let b0 = self.hdr[0];
        self.hdr_len = 0;
        self.hdr_need = 0;
        // check_first_two already rejected reserved opcodes.
        let opcode =
            Opcode::from_u8(b0 & OPCODE_BITS).ok_or(Fault::ReservedOpcode(b0 & OPCODE_BITS))?;
        header::check_length(opcode, len, self.limits.max_frame_bytes)?;
        match opcode {
            _ if opcode.is_control() => self.ctrl_len = 0,
            Opcode::Text => self.start_message(MsgKind::Text),
            Opcode::Binary => self.start_message(MsgKind::Binary),
            _ => {}
        }
        self.frame = Frame {
            opcode,
            fin: b0 & FIN_BIT != 0,
            masked,
            mask,
            remaining: len,
            mask_off: 0,
        };
        self.in_payload = true;
        Ok(())
    }

    fn start_message(&mut self, kind: MsgKind) {
        self.message = Some(kind);
        self.utf8 = Utf8Validator::default();
        self.b64 = Base64Decoder::default();
    }

    /// Copy payload bytes out of the input, unmasking them if masked.
    #[inline]
    fn unmask_copy(&self, src: &[u8], dst: &mut [u8]) {
        unmask_copy(&self.frame, src, dst);
    }

    fn advance(&mut self, n: usize) {
        self.frame.remaining -= n as u64;
        self.frame.mask_off = ((usize::from(self.frame.mask_off) + n) & 3) as u8;
    }

    fn read_control_payload(&mut self, input: &[u8], pos: &mut usize) {
        let n = ((input.len() - *pos) as u64).min(self.frame.remaining) as usize;
        let at = usize::from(self.ctrl_len);
        // at + remaining == frame length ≤ 125, checked in finish_header.
        let frame = self.frame;
        unmask_copy(&frame, &input[*pos..*pos + n], &mut self.ctrl[at..at + n]);
        self.ctrl_len += n as u8;
        *pos += n;
        self.advance(n);
    }

    fn finish_control(&mut self) -> Result<Event, Fault> {
        let payload = &self.ctrl[..usize::from(self.ctrl_len)];
        let event = header::control_event(self.frame.opcode, payload)?;
        if matches!(event, Event::Close { .. }) {
            self.close_received = true;
        }
        Ok(event)
    }

    fn finish_data_frame(&mut self) -> Result<(), Fault> {
        if !self.frame.fin {
            return Ok(());
        }
        let kind = self.message.take();
        match self.mode {
            PayloadMode::Raw if kind == Some(MsgKind::Text) && self.utf8.len != 0 => {
                Err(Fault::InvalidUtf8)
            }
            PayloadMode::Base64 if self.b64.len != 0 => Err(Fault::Base64Truncated),
            _ => Ok(()),
        }
    }

    fn raw_payload(&mut self, input: &[u8], out: &mut [u8], p: &mut Progress) -> Result<(), Fault> {
        let room = (input.len() - p.consumed).min(out.len() - p.written);
        let n = (room as u64).min(self.frame.remaining) as usize;
        let dst = &mut out[p.written..p.written + n];
        self.unmask_copy(&input[p.consumed..p.consumed + n], dst);
        if self.message == Some(MsgKind::Text) && self.utf8.feed(dst).is_err() {
            return Err(Fault::InvalidUtf8);
        }
        p.consumed += n;
        p.written += n;
        self.advance(n);
        Ok(())
    }

    fn base64_payload(
        &mut self,
        input: &[u8],
        out: &mut [u8],
        p: &mut Progress,
    ) -> Result<(), Fault> {
        // The input is borrowed immutably, so unmask a block at a time into
        // the stack; re-unmasking the unused tail later is cheap as long as
        // the block is about what `data_out` can take (`base64_block_chars`):
        // a call with little room (a nearly full relay buffer, or the fuzz
        // targets' tiny buffers) must not unmask 512 characters to decode 4.
        let mut scratch = [0u8; BASE64_BLOCK_CHARS];
        loop {
            let room = out.len() - p.written;
            let avail = (input.len() - p.consumed).min(base64_block_chars(room));
            let k = (avail as u64).min(self.frame.remaining) as usize;
            if k == 0 {
                return Ok(());
            }
            let chunk = &mut scratch[..k];
            self.unmask_copy(&input[p.consumed..p.consumed + k], chunk);
            let used = self.b64.feed(chunk, out, &mut p.written)?;
            p.consumed += used;
            self.advance(used);
            if used < k {
                // data_out cannot take the next group.
                return Ok(());
            }
        }
    }
}

/// Most base64 characters unmasked onto the stack at a time.
pub(super) const BASE64_BLOCK_CHARS: usize = 512;

/// How many base64 characters to unmask for `room` bytes of output: the
/// whole groups that fit (4 characters per 3 bytes), plus up to 3
/// characters completing a group carried over and one more group (a padded
/// group may fit in less than 3 bytes), at most [`BASE64_BLOCK_CHARS`].
/// Only text with padded groups inside a message can use more, and then
/// `base64_payload` simply takes another block.
pub(super) fn base64_block_chars(room: usize) -> usize {
    (4 * (room / 3) + 8).min(BASE64_BLOCK_CHARS)
}

/// Copy `src` into `dst` (same length), unmasking at the frame's key
/// offset when the frame is masked; a server's unmasked payload is a plain
/// copy rather than an XOR with zeros.
#[inline]
fn unmask_copy(frame: &Frame, src: &[u8], dst: &mut [u8]) {
    if frame.masked {
        mask_copy(src, dst, frame.mask, usize::from(frame.mask_off));
    } else {
        dst.copy_from_slice(src);
    }
}

/// Incremental UTF-8 validation: std's validator on each chunk plus a carry
/// of at most 3 bytes of a sequence split across chunks or frames.
#[derive(Debug, Default, Clone, Copy)]
struct Utf8Validator {
    buf: [u8; 4],
    len: u8,
}

impl Utf8Validator {
    fn feed(&mut self, mut s: &[u8]) -> Result<(), ()> {
        if self.len > 0 {
            let have = usize::from(self.len);
            let need: usize = match self.buf[0] {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let take = need.saturating_sub(have).min(s.len());
            self.buf[have..have + take].copy_from_slice(&s[..take]);
            let total = have + take;
            match std::str::from_utf8(&self.buf[..total]) {
                Ok(_) => self.len = 0,
                // error_len None: a valid but incomplete sequence, so far.
                Err(e) if e.error_len().is_none() => {
                    self.len = total as u8;
                    return Ok(());
                }
                Err(_) => return Err(()),
            }
            s = &s[take..];
        }
        match std::str::from_utf8(s) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let rest = &s[e.valid_up_to()..];
                if rest.len() >= self.buf.len() {
                    return Err(());
                }
                self.buf[..rest.len()].copy_from_slice(rest);
                self.len = rest.len() as u8;
                Ok(())
            }
            Err(_) => Err(()),
        }
    }
}

const B64_INVALID: u8 = 0x80;
const B64_PAD: u8 = 0x40;
/// Standard alphabet → 6-bit value; '=' → B64_PAD; others → B64_INVALID.
const B64_TABLE: [u8; 256] = {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut t = [B64_INVALID; 256];
    let mut i = 0;
    while i < 64 {
        t[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    t[b'=' as usize] = B64_PAD;
    t
};

/// Decodes one 4-character group into up to 3 bytes; returns how many.
/// '=' is allowed only as "xx==" or "xxx="; non-zero trailing bits are
/// ignored (as Python's websockify does) rather than rejected.
#[inline]
fn decode_b64_group(g: [u8; 4]) -> Result<([u8; 3], usize), Fault> {
    let [a, b, c, d] = g.map(|ch| B64_TABLE[usize::from(ch)]);
    let bytes = [
        (a << 2) | ((b & 0x3F) >> 4),
        ((b & 0x0F) << 4) | ((c & 0x3F) >> 2),
        ((c & 0x03) << 6) | (d & 0x3F),
    ];
    if (a | b | c | d) & (B64_INVALID | B64_PAD) == 0 {
        return Ok((bytes, 3));
    }
    if (a | b | c | d) & B64_INVALID != 0 || a == B64_PAD || b == B64_PAD {
        return Err(Fault::InvalidBase64);
    }
    match (c == B64_PAD, d == B64_PAD) {
        (true, true) => Ok((bytes, 1)),
        (false, true) => Ok((bytes, 2)),
        _ => Err(Fault::InvalidBase64),
    }
}

/// Incremental base64 decoding with a carry of up to 3 characters.
#[derive(Debug, Default, Clone, Copy)]
struct Base64Decoder {
    buf: [u8; 3],
    len: u8,
}

impl Base64Decoder {
    /// Decodes unmasked chars from `src` into `out[*written..]`; returns how
    /// many chars were used. Uses fewer than `src.len()` only when `out`
    /// lacks room for the next group's bytes (nothing is held back as output).
    fn feed(&mut self, src: &[u8], out: &mut [u8], written: &mut usize) -> Result<usize, Fault> {
        let mut i = 0;
        // Complete a group carried over from the previous chunk.
        while self.len > 0 {
            let Some(&ch) = src.get(i) else {
                return Ok(i);
            };
            if B64_TABLE[usize::from(ch)] == B64_INVALID {
                return Err(Fault::InvalidBase64);
            }
            if self.len == 3 {
                let (bytes, n) = decode_b64_group([self.buf[0], self.buf[1], self.buf[2], ch])?;
                if out.len() - *written < n {
                    return Ok(i);
                }
                out[*written..*written + n].copy_from_slice(&bytes[..n]);
                *written += n;
                self.len = 0;
            } else {
                self.buf[usize::from(self.len)] = ch;
                self.len += 1;
            }
            i += 1;
        }
        // Whole groups.
        loop {
            let groups = (src.len() - i) / 4;
            if groups == 0 {
                break;
            }
            let fit = (out.len() - *written) / 3;
            if fit > 0 {
                // Fast path over plain groups; a padded (or bad) group ends
                // it and goes through decode_b64_group below.
                let k = groups.min(fit);
                let src_groups = src[i..i + 4 * k].chunks_exact(4);
                let dst_groups = out[*written..*written + 3 * k].chunks_exact_mut(3);
                let mut done = 0;
                for (g, o) in src_groups.zip(dst_groups) {
                    let [a, b, c, d] =
                        [g[0], g[1], g[2], g[3]].map(|ch| B64_TABLE[usize::from(ch)]);
                    if (a | b | c | d) & (B64_INVALID | B64_PAD) != 0 {
                        break;
                    }
                    o[0] = (a << 2) | (b >> 4);
                    o[1] = (b << 4) | (c >> 2);
                    o[2] = (c << 6) | d;
                    done += 1;
                }
                *written += 3 * done;
                i += 4 * done;
                if done < k {
                    // At least 3 bytes of room remain for this group.
                    let (bytes, n) =
                        decode_b64_group([src[i], src[i + 1], src[i + 2], src[i + 3]])?;
                    out[*written..*written + n].copy_from_slice(&bytes[..n]);
                    *written += n;
                    i += 4;
                }
            } else {
                // Under 3 bytes of room: a padded group may still fit.
                let (bytes, n) = decode_b64_group([src[i], src[i + 1], src[i + 2], src[i + 3]])?;
                if out.len() - *written < n {
                    return Ok(i);
                }
                out[*written..*written + n].copy_from_slice(&bytes[..n]);
                *written += n;
                i += 4;
            }
        }
        // Carry the tail (< 4 chars), rejecting bad characters right away.
        for &ch in &src[i..] {
            if B64_TABLE[usize::from(ch)] == B64_INVALID {
                return Err(Fault::InvalidBase64);
            }
            self.buf[usize::from(self.len)] = ch;
            self.len += 1;
        }
        Ok(src.len())
    }
}
