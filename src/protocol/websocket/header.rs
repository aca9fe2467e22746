//! The header and control-frame rules that the [`Decoder`] and the
//! [`FrameTracker`] share, as pure functions of the bytes and the stream
//! state, so that both enforce exactly the same RFC 6455 checks.
//!
//! [`Decoder`]: super::Decoder
//! [`FrameTracker`]: super::FrameTracker

use super::*;

/// What the first two header bytes decide, once validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Start {
    pub(super) opcode: Opcode,
    pub(super) fin: bool,
    /// The mask bit (already checked against the role).
    pub(super) masked: bool,
    /// The whole header's length: 2, plus 2 or 8 for the extended length,
    /// plus 4 for the mask key.
    pub(super) header_len: u8,
}

/// Checks what the first two header bytes alone decide, in RFC 6455 order
/// (reserved bits, opcode, mask bit, control and fragmentation rules), so a
/// hostile peer is cut off without waiting for (or buffering) more.
/// `message_open`: a fragmented data message is in progress.
#[inline]
pub(super) fn check_start(b0: u8, b1: u8, role: Role, message_open: bool) -> Result<Start, Fault> {
    if b0 & RSV_BITS != 0 {
        return Err(Fault::ReservedBits((b0 & RSV_BITS) >> 4));
    }
    let opcode =
        Opcode::from_u8(b0 & OPCODE_BITS).ok_or(Fault::ReservedOpcode(b0 & OPCODE_BITS))?;
    let masked = b1 & MASK_BIT != 0;
    if masked != role.peer_masks() {
        return Err(if masked {
            Fault::MaskedFrame
        } else {
            Fault::UnmaskedFrame
        });
    }
    let fin = b0 & FIN_BIT != 0;
    match opcode {
        _ if opcode.is_control() => {
            if !fin {
                return Err(Fault::FragmentedControl(opcode));
            }
        }
        Opcode::Continuation => {
            if !message_open {
                return Err(Fault::UnexpectedContinuation);
            }
        }
        _ => {
            if message_open {
                return Err(Fault::ExpectedContinuation);
            }
        }
    }
    let extended = match b1 & LEN7_BITS {
        LEN_16 => 2,
        LEN_64 => 8,
        _ => 0,
    };
    let key = if masked { 4 } else { 0 };
    Ok(Start {
        opcode,
        fin,
        masked,
        header_len: 2 + extended + key,
    })
}

/// The payload length and mask key (zeros when unmasked) of a complete
/// header whose start was validated; `h` holds at least its `header_len`
/// bytes. Non-minimal length encodings are accepted: being liberal there
/// costs nothing and some clients produce them.
#[inline]
pub(super) fn length_and_key(h: &[u8], masked: bool) -> (u64, [u8; 4]) {
    let (len, key_at) = match h[1] & LEN7_BITS {
        LEN_16 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
        LEN_64 => (
            u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            10,
        ),
        n => (u64::from(n), 2),
    };
    let key = if masked {
        [h[key_at], h[key_at + 1], h[key_at + 2], h[key_at + 3]]
    } else {
        [0; 4]
    };
    (len, key)
}

/// The rules on a frame's declared length: the 64-bit form's top bit is
/// clear, a control payload fits 125 bytes (and a close payload is not one
/// byte), and a data frame is within `max_frame_bytes`.
#[inline]
pub(super) fn check_length(opcode: Opcode, len: u64, max_frame_bytes: u64) -> Result<(), Fault> {
    if len >> 63 != 0 {
        return Err(Fault::LengthMsbSet);
    }
    if opcode.is_control() {
        if len > MAX_CONTROL_PAYLOAD as u64 {
            return Err(Fault::ControlTooLong(len));
        }
        if opcode == Opcode::Close && len == 1 {
            return Err(Fault::BadClosePayload);
        }
    } else if len > max_frame_bytes {
        return Err(Fault::FrameTooBig {
            len,
            max: max_frame_bytes,
        });
    }
    Ok(())
}

/// The event for a complete, unmasked control payload (≤125 bytes): close
/// frames have their code and reason checked.
pub(super) fn control_event(opcode: Opcode, payload: &[u8]) -> Result<Event, Fault> {
    Ok(match opcode {
        Opcode::Ping => Event::Ping(ControlPayload::truncated(payload)),
        Opcode::Pong => Event::Pong(ControlPayload::truncated(payload)),
        _ => {
            let (code, reason) = match payload {
                [] => (None, &[][..]),
                [hi, lo, reason @ ..] => {
                    let code = u16::from_be_bytes([*hi, *lo]);
                    if !is_valid_close_code(code) {
                        return Err(Fault::InvalidCloseCode(code));
                    }
                    (Some(code), reason)
                }
                // Length 1 is rejected by check_length already.
                [_] => return Err(Fault::BadClosePayload),
            };
            if std::str::from_utf8(reason).is_err() {
                return Err(Fault::InvalidCloseReason);
            }
            Event::Close {
                code,
                reason: ControlPayload::truncated(reason),
            }
        }
    })
}
