//! VMware's RFB client messages on a plain VNC server, sans-IO.
//!
//! VMware's own web client (wmks.js) speaks RFB with VMware extensions: it
//! sends client message 127 (`u8 127, u8 subtype, u16 length of the whole
//! message, payload`) for a resolution request as soon as it connects,
//! mouse wheels and some keys. A plain VNC server (TigerVNC, QEMU) closes
//! the connection on an unknown message type, so wmks.js pointed at one
//! would die half a second after connecting.
//!
//! What the appliance does instead, when the browser is wmks.js (it offers
//! the `vmware-vvc` subprotocol) and the target is plain VNC: it follows the
//! browser's client messages after ClientInit and
//!
//! - passes every standard message through unchanged;
//! - translates the VMware messages that have a standard equivalent:
//!   unicode key events (subtype 6) become KeyEvents (keysym = the code
//!   point below 256, else `0x0100_0000 | code point`), pointer events and
//!   wheels (subtype 2) become PointerEvents (a wheel: a press and release
//!   of button 4 or 5);
//! - drops the rest (resolution and topology requests, acks, caps, scan-code
//!   keys, session close, audio acks), counting them.
//!
//! A message type it does not know ends the filtering: from there the
//! bytes pass through raw, as they would without the appliance (the server
//! decides). Nothing here panics on input; a partial message waits in a
//! buffer of at most [`MAX_MESSAGE_BYTES`].

/// VMware's client message type.
pub const VMW_CLIENT_MESSAGE: u8 = 127;
/// Largest client message buffered whole (ClientCutText is passed through
/// as it comes, never buffered).
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// What the filter did, for metrics and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FilterStats {
    pub translated: u64,
    pub dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Parsing messages.
    Messages,
    /// Inside a ClientCutText: this many text bytes still pass through.
    CutText(u64),
    /// An unknown message type: everything passes through raw.
    Raw,
}

/// Follows the browser's RFB client messages (after ClientInit) and rewrites
/// VMware's into standard ones or drops them.
#[derive(Debug)]
pub struct ClientFilter {
    buf: Vec<u8>,
    mode: Mode,
    stats: FilterStats,
}

impl Default for ClientFilter {
    fn default() -> Self {
        Self::new()
    }
}

/// The length of the standard message at the start of `m` (its type byte
/// first), `Ok(None)` when more bytes are needed to tell, `Err(())` for a
/// type this filter does not know.
fn standard_len(m: &[u8]) -> Result<Option<usize>, ()> {
    let need = |n: usize| if m.len() >= n { Ok(Some(())) } else { Ok(None) };
    let len = match m[0] {
        0 => 20,   // SetPixelFormat
        3 => 10,   // FramebufferUpdateRequest
        4 => 8,    // KeyEvent
        5 => 6,    // PointerEvent
        150 => 10, // EnableContinuousUpdates
        2 => {
            // SetEncodings: 4 + 4 × count
            if need(4)?.is_none() {
                return Ok(None);
            }
            4 + 4 * usize::from(u16::from_be_bytes([m[2], m[3]]))
        }
        248 => {
            // Fence: 9 + length
            if need(9)?.is_none() {
                return Ok(None);
            }
            9 + usize::from(m[8])
        }
        251 => {
            // SetDesktopSize: 8 + 16 × screens
            if need(8)?.is_none() {
                return Ok(None);
            }
            8 + 16 * usize::from(m[6])
        }
        _ => return Err(()),
    };
    Ok(Some(len))
}

impl ClientFilter {
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            mode: Mode::Messages,
            stats: FilterStats::default(),
        }
    }

    pub fn stats(&self) -> FilterStats {
        self.stats
    }

    /// Bytes held back: the start of a message waiting for its rest (at
    /// most [`MAX_MESSAGE_BYTES`]).
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Filter `input`, appending what the server should get to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match self.mode {
                Mode::Raw => {
                    out.extend_from_slice(input);
                    return;
                }
                Mode::CutText(left) => {
                    let n = input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    let left = left - n as u64;
                    self.mode = if left == 0 {
                        Mode::Messages
                    } else {
                        Mode::CutText(left)
                    };
                }
                Mode::Messages => {
                    let room = MAX_MESSAGE_BYTES - self.buf.len();
                    let take = input.len().min(room.max(1));
                    self.buf.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.drain_messages(out);
                }
            }
        }
    }

    /// Take every whole message off the front of `buf`.
    fn drain_messages(&mut self, out: &mut Vec<u8>) {
        loop {
            if self.buf.is_empty() || self.mode != Mode::Messages {
                break;
            }
            let m = &self.buf[..];
            let whole = match m[0] {
                VMW_CLIENT_MESSAGE => {
                    if m.len() < 4 {
                        return self.keep_or_give_up(out);
                    }
                    let len = usize::from(u16::from_be_bytes([m[2], m[3]])).max(4);
                    if m.len() < len {
                        return self.keep_or_give_up(out);
                    }
                    translate(&mut self.stats, &self.buf[..len], out);
                    len
                }
                6 => {
                    // ClientCutText: the 8-byte head now, the text streams.
                    if m.len() < 8 {
                        return self.keep_or_give_up(out);
                    }
                    let text = u64::from(u32::from_be_bytes([m[4], m[5], m[6], m[7]]));
                    out.extend_from_slice(&m[..8]);
                    let rest = self.buf.split_off(8);
                    self.buf.clear();
                    self.mode = if text == 0 {
                        Mode::Messages
                    } else {
                        Mode::CutText(text)
                    };
                    // The rest of the buffer goes back through `feed`.
                    return self.feed(&rest, out);
                }
                _ => match standard_len(m) {
                    Ok(Some(len)) if m.len() >= len => {
                        out.extend_from_slice(&m[..len]);
                        len
                    }
                    Ok(_) => return self.keep_or_give_up(out),
                    Err(()) => {
                        // Unknown: from here on, raw.
                        self.mode = Mode::Raw;
                        out.extend_from_slice(&self.buf);
                        self.buf.clear();
                        return;
                    }
                },
            };
            self.buf.drain(..whole);
        }
    }

    /// A partial message waits for more bytes, unless it can never fit the
    /// buffer: then the filter gives up and passes everything raw.
    fn keep_or_give_up(&mut self, out: &mut Vec<u8>) {
        if self.buf.len() >= MAX_MESSAGE_BYTES {
            self.mode = Mode::Raw;
            out.extend_from_slice(&self.buf);
            self.buf.clear();
        }
    }
}

/// One whole VMware message: translated or dropped.
fn translate(stats: &mut FilterStats, m: &[u8], out: &mut Vec<u8>) {
    {
        let sub = m.get(1).copied().unwrap_or(0);
        match (sub, m.len()) {
            // Unicode key: u32 code point, u8 down, u8 modifiers.
            (6, 10) => {
                let cp = u32::from_be_bytes([m[4], m[5], m[6], m[7]]);
                let keysym = if cp < 0x100 { cp } else { 0x0100_0000 | cp };
                out.extend_from_slice(&[4, u8::from(m[8] != 0), 0, 0]);
                out.extend_from_slice(&keysym.to_be_bytes());
                stats.translated += 1;
            }
            // Pointer (type 0) or wheel (type 1): u32 x, u32 y, u32
            // buttons, i8 wheel delta, i8 horizontal delta.
            (2, 19) => {
                let x = clamp16(u32::from_be_bytes([m[5], m[6], m[7], m[8]]));
                let y = clamp16(u32::from_be_bytes([m[9], m[10], m[11], m[12]]));
                let buttons = m[16];
                if m[4] == 1 {
                    let delta = m[17] as i8;
                    if delta != 0 {
                        // Button 4 scrolls up, 5 down; pressed and released.
                        let b = if delta < 0 { 0x08 } else { 0x10 };
                        pointer(out, buttons | b, x, y);
                        pointer(out, buttons, x, y);
                    }
                } else {
                    pointer(out, buttons, x, y);
                }
                stats.translated += 1;
            }
            _ => stats.dropped += 1,
        }
    }
}

fn clamp16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

fn pointer(out: &mut Vec<u8>, mask: u8, x: u16, y: u16) {
    out.push(5);
    out.push(mask);
    out.extend_from_slice(&x.to_be_bytes());
    out.extend_from_slice(&y.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(f: &mut ClientFilter, bytes: &[u8], split: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in bytes.chunks(split.max(1)) {
            f.feed(chunk, &mut out);
        }
        out
    }

    fn vmw(sub: u8, payload: &[u8]) -> Vec<u8> {
        let mut m = vec![127, sub];
        m.extend_from_slice(&((payload.len() + 4) as u16).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn standard_messages_pass_and_vmware_ones_are_translated_or_dropped() {
        let mut input = Vec::new();
        input.extend_from_slice(&[3, 0, 0, 0, 0, 0, 1, 0, 1, 0]); // FBUpdateRequest
        input.extend(vmw(5, &[4, 0, 3, 0])); // resolution request: dropped
        input.extend_from_slice(&[2, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 7]); // SetEncodings(2)
        input.extend(vmw(6, &[0, 0, 0, 0x61, 1, 0])); // 'a' down
        input.extend(vmw(2, &[1, 0, 0, 0, 9, 0, 0, 0, 8, 0, 0, 0, 0, 0xff, 0])); // wheel up
        input.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 3, b'x', b'y', b'z']); // cut text
        input.extend_from_slice(&[5, 1, 0, 2, 0, 3]); // PointerEvent
        let want: Vec<u8> = [
            &[3, 0, 0, 0, 0, 0, 1, 0, 1, 0][..],
            &[2, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 7],
            &[4, 1, 0, 0, 0, 0, 0, 0x61],
            &[5, 0x08, 0, 9, 0, 8],
            &[5, 0, 0, 9, 0, 8],
            &[6, 0, 0, 0, 0, 0, 0, 3, b'x', b'y', b'z'],
            &[5, 1, 0, 2, 0, 3],
        ]
        .concat();
        for split in [1, 2, 3, 7, 1000] {
            let mut f = ClientFilter::new();
            assert_eq!(run(&mut f, &input, split), want, "split {split}");
            assert_eq!(
                f.stats(),
                FilterStats {
                    translated: 2,
                    dropped: 1
                }
            );
        }
    }

    #[test]
    fn an_unknown_type_ends_filtering_and_nothing_is_lost() {
        let mut f = ClientFilter::new();
        let input = [&[200u8, 1, 2, 3][..], &vmw(5, &[0; 4])].concat();
        assert_eq!(run(&mut f, &input, 2), input);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_input_never_panics_and_output_is_bounded(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            split in 1usize..64,
        ) {
            let mut f = ClientFilter::new();
            let out = run(&mut f, &data, split);
            // Translation never grows a message by more than 2x.
            proptest::prop_assert!(out.len() <= 2 * data.len() + 16);
            proptest::prop_assert!(f.buffered_bytes() <= MAX_MESSAGE_BYTES);
        }
    }
}
