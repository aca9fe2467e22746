//! RFC 6455 WebSocket frame codec, server side, sans-IO.
//!
//! What it does: decodes the masked frames a browser sends ([`Decoder`]),
//! streaming data payloads straight into a caller-provided buffer (unmasked,
//! and base64-decoded for the legacy websockify `base64` subprotocol), and
//! surfacing control frames as [`Event`]s; and encodes the unmasked frames the
//! server sends ([`write_server_header`], [`ping_frame`], [`pong_frame`],
//! [`close_frame`]).
//!
//! What it does not do: the HTTP upgrade (`http_upgrade`), any IO, clocks or
//! timers, extensions (none are negotiated, so RSV bits must be zero), or
//! message reassembly: data is streamed through frame by frame and never
//! buffered as a whole message, so a session's memory does not depend on how
//! large a browser's messages are. Hostile input becomes a [`WsError`] that
//! names the close code to send; nothing here panics on input or allocates
//! while decoding.

use std::fmt;

/// Longest header a server (unmasked) frame can have.
pub const MAX_SERVER_HEADER_LEN: usize = 10;
/// Largest control-frame payload (RFC 6455 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Longest header a client (masked) frame can have: 2 + 8 (length) + 4 (key).
const MAX_CLIENT_HEADER_LEN: usize = 14;
/// A close reason must leave room for the 2-byte code inside 125 bytes.
const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

const FIN_BIT: u8 = 0x80;
const RSV_BITS: u8 = 0x70;
const OPCODE_BITS: u8 = 0x0F;
const MASK_BIT: u8 = 0x80;
const LEN7_BITS: u8 = 0x7F;
const LEN_16: u8 = 126;
const LEN_64: u8 = 127;

/// Frame opcodes defined by RFC 6455 5.2 (the rest are reserved).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    /// 0x0: a later fragment of a fragmented data message.
    Continuation,
    /// 0x1: a data message of UTF-8 text.
    Text,
    /// 0x2: a data message of arbitrary bytes.
    Binary,
    /// 0x8: the closing handshake.
    Close,
    /// 0x9: a keepalive request; the peer answers with a pong.
    Ping,
    /// 0xA: a keepalive answer (or unsolicited heartbeat).
    Pong,
}

impl Opcode {
    /// The 4-bit wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            Opcode::Continuation => 0x0,
            Opcode::Text => 0x1,
            Opcode::Binary => 0x2,
            Opcode::Close => 0x8,
            Opcode::Ping => 0x9,
            Opcode::Pong => 0xA,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    /// RFC 6455 5.5: opcodes with the high bit set are control frames.
    fn is_control(self) -> bool {
        self.as_u8() & 0x8 != 0
    }
}

/// Close codes we send (RFC 6455 7.4.1).
pub mod close_code {
    /// The session ended normally.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down or the backend went away.
    pub const GOING_AWAY: u16 = 1001;
    /// The browser broke the framing rules.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// The browser sent a kind of data this endpoint does not accept.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// The payload did not match its declared type (bad UTF-8, bad base64).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The session violated a policy (ticket, rate, timeout).
    pub const POLICY: u16 = 1008;
    /// A frame exceeded our size limit.
    pub const TOO_BIG: u16 = 1009;
    /// Something failed on our side.
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// Whether a close code received from a peer is allowed on the wire.
///
/// RFC 6455 7.4 plus the IANA registry: 1000-1003 and 1007-1011 are defined,
/// 1012-1014 were registered later and browsers send them; 1004 is reserved,
/// 1005, 1006 and 1015 are "must not be sent" markers for APIs; 1016-2999 are
/// unassigned (reserved for the protocol); 3000-4999 belong to libraries and
/// applications. Everything else is a protocol error.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// How data payloads map to bytes for the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadMode {
    /// Payload bytes are the data (subprotocol "binary" or none). Text frames
    /// are accepted too (some clients send text), with their UTF-8 validated
    /// incrementally across chunks and fragments: invalid → `InvalidUtf8`.
    Raw,
    /// Subprotocol "base64" (old websockify clients): text frames carry
    /// base64 and the decoder outputs the decoded bytes, decoding
    /// incrementally across chunk and fragment boundaries. Each message must
    /// be a whole number of 4-character groups. Binary frames are rejected
    /// (the protocol is text-only).
    Base64,
}

/// Limits the decoder enforces on hostile input.
#[derive(Debug, Clone, Copy)]
pub struct DecoderLimits {
    /// Largest accepted data-frame payload length in bytes (header length
    /// field); larger → `FrameTooBig` (1009). Control frames are bounded by
    /// the protocol (125 bytes) instead.
    pub max_frame_bytes: u64,
}

/// Everything a browser can get wrong on a WebSocket. Every variant is the
/// browser's fault; [`WsError::close_code`] says what to send back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// A frame without the mask bit (RFC 6455 5.1).
    #[error("browser sent an unmasked frame (client frames must be masked)")]
    UnmaskedFrame,
    /// RSV1-3 set (value shifted down to 0..7) with no extension negotiated.
    #[error("browser set reserved header bits {0:#05b} without a negotiated extension")]
    ReservedBits(u8),
    /// An opcode RFC 6455 reserves (3-7, 0xB-0xF).
    #[error("browser used reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A control frame without FIN (RFC 6455 5.5).
    #[error("browser sent a fragmented control frame ({0:?} without FIN)")]
    FragmentedControl(Opcode),
    /// A control frame declaring more than 125 payload bytes.
    #[error("browser sent a control frame with a {0}-byte payload (limit 125)")]
    ControlTooLong(u64),
    /// A continuation frame with no fragmented message open.
    #[error("browser sent a continuation frame outside a fragmented message")]
    UnexpectedContinuation,
    /// A new Text/Binary frame while a fragmented message is open.
    #[error("browser started a new data message before finishing the fragmented one")]
    ExpectedContinuation,
    /// A 64-bit length with its most significant bit set (RFC 6455 5.2).
    #[error("browser sent a 64-bit frame length with the most significant bit set")]
    LengthMsbSet,
    /// A data frame longer than [`DecoderLimits::max_frame_bytes`].
    #[error("browser sent a {len}-byte frame, over the {max}-byte limit")]
    FrameTooBig {
        /// The length the frame declared.
        len: u64,
        /// The configured limit.
        max: u64,
    },
    /// A text message (Raw mode) that is not valid UTF-8.
    #[error("browser sent a text message that is not valid UTF-8")]
    InvalidUtf8,
    /// Base64 mode: a non-alphabet character or misplaced '='.
    #[error("browser sent invalid base64 (bad character or misplaced '=')")]
    InvalidBase64,
    /// Base64 mode: a message that is not a whole number of 4-char groups.
    #[error("browser ended a base64 message in the middle of a 4-character group")]
    Base64Truncated,
    /// Base64 mode: a Binary frame (the subprotocol is text-only).
    #[error("browser sent a binary frame on the text-only base64 subprotocol")]
    BinaryInBase64Mode,
    /// A close frame with a 1-byte payload (a code needs 2).
    #[error("browser sent a close frame with a 1-byte payload")]
    BadClosePayload,
    /// A close code [`is_valid_close_code`] rejects.
    #[error("browser sent close code {0}, which is not allowed on the wire")]
    InvalidCloseCode(u16),
    /// A close reason that is not valid UTF-8.
    #[error("browser sent a close reason that is not valid UTF-8")]
    InvalidCloseReason,
}

impl WsError {
    /// The close code to send the browser for this error.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::FrameTooBig { .. } => close_code::TOO_BIG,
            WsError::InvalidUtf8
            | WsError::InvalidBase64
            | WsError::Base64Truncated
            | WsError::InvalidCloseReason => close_code::INVALID_PAYLOAD,
            WsError::BinaryInBase64Mode => close_code::UNSUPPORTED_DATA,
            WsError::UnmaskedFrame
            | WsError::ReservedBits(_)
            | WsError::ReservedOpcode(_)
            | WsError::FragmentedControl(_)
            | WsError::ControlTooLong(_)
            | WsError::UnexpectedContinuation
            | WsError::ExpectedContinuation
            | WsError::LengthMsbSet
            | WsError::BadClosePayload
            | WsError::InvalidCloseCode(_) => close_code::PROTOCOL_ERROR,
        }
    }

    /// A short stable snake_case name for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            WsError::UnmaskedFrame => "unmasked_frame",
            WsError::ReservedBits(_) => "reserved_bits",
            WsError::ReservedOpcode(_) => "reserved_opcode",
            WsError::FragmentedControl(_) => "fragmented_control",
            WsError::ControlTooLong(_) => "control_too_long",
            WsError::UnexpectedContinuation => "unexpected_continuation",
            WsError::ExpectedContinuation => "expected_continuation",
            WsError::LengthMsbSet => "length_msb_set",
            WsError::FrameTooBig { .. } => "frame_too_big",
            WsError::InvalidUtf8 => "invalid_utf8",
            WsError::InvalidBase64 => "invalid_base64",
            WsError::Base64Truncated => "base64_truncated",
            WsError::BinaryInBase64Mode => "binary_in_base64_mode",
            WsError::BadClosePayload => "bad_close_payload",
            WsError::InvalidCloseCode(_) => "invalid_close_code",
            WsError::InvalidCloseReason => "invalid_close_reason",
        }
    }
}

/// A control frame's payload, stored inline (≤125 bytes) so events need no
/// allocation and can be copied into a reply.
#[derive(Clone, Copy)]
pub struct ControlPayload {
    buf: [u8; MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl ControlPayload {
    /// The payload bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// A payload holding `bytes`; `None` if longer than 125 bytes.
    pub fn new(bytes: &[u8]) -> Option<Self> {
        (bytes.len() <= MAX_CONTROL_PAYLOAD).then(|| Self::truncated(bytes))
    }

    fn truncated(bytes: &[u8]) -> Self {
        let n = bytes.len().min(MAX_CONTROL_PAYLOAD);
        let mut buf = [0; MAX_CONTROL_PAYLOAD];
        buf[..n].copy_from_slice(&bytes[..n]);
        Self { buf, len: n as u8 }
    }
}

// Manual impls: only the first `len` bytes are meaningful.
impl PartialEq for ControlPayload {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for ControlPayload {}

impl fmt::Debug for ControlPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ControlPayload(b\"{}\")", self.as_slice().escape_ascii())
    }
}

/// A control frame the browser sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Ping received; answer with [`pong_frame`] of the same payload.
    Ping(ControlPayload),
    /// Pong received (answer to our ping, or a heartbeat).
    Pong(ControlPayload),
    /// Close frame received. `code` is `None` when the payload was empty;
    /// `reason` has been checked to be valid UTF-8.
    Close {
        /// The peer's close code, already checked with [`is_valid_close_code`].
        code: Option<u16>,
        /// The peer's reason text (may be empty).
        reason: ControlPayload,
    },
}

mod decoder;
mod frame;
#[cfg(test)]
mod tests;

pub use decoder::{Decoder, Progress};
use frame::mask_copy;
pub use frame::{
    apply_mask, close_frame, encode_client_frame, ping_frame, pong_frame, server_header_len,
    write_server_header, ControlFrame,
};
