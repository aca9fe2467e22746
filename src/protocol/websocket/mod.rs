//! RFC 6455 WebSocket frame codec, both roles, sans-IO.
//!
//! What it does, by [`Role`]:
//!
//! * Server role (the browser leg): decodes the masked frames a browser
//!   sends ([`Decoder::new`]), streaming data payloads straight into a
//!   caller-provided buffer (unmasked, and base64-decoded for the legacy
//!   websockify `base64` subprotocol) and surfacing control frames as
//!   [`Event`]s; encodes the unmasked frames a server sends
//!   ([`write_server_header`], [`ping_frame`], [`pong_frame`],
//!   [`close_frame`]).
//! * Client role (the backend leg of a WebSocket backend such as a WebMKS
//!   host): decodes a server's unmasked frames and refuses masked ones
//!   ([`Decoder::with_role`]); encodes masked frames with a fresh key per
//!   frame from the OS CSPRNG ([`MaskKeySource`], [`write_client_header`] +
//!   [`apply_mask`] in place, [`client_ping_frame`], [`client_pong_frame`],
//!   [`client_close_frame`]).
//! * Pass-through relaying: [`FrameTracker`] follows frame boundaries in
//!   one direction without copying or unmasking data payloads, hands over
//!   control frames, and says where the relay may insert its own.
//!
//! Every error is a [`WsError`] that names the side that failed ("browser
//! sent …" / "backend sent …", [`WsError::side`]), a stable
//! [`WsError::kind`] and the close code to send.
//!
//! What it does not do: the HTTP upgrade (`http_upgrade`), any IO, clocks or
//! timers, extensions (none are negotiated, so RSV bits must be zero), or
//! message reassembly: data is streamed through frame by frame and never
//! buffered as a whole message, so a session's memory does not depend on how
//! large a peer's messages are. Nothing here panics on input or allocates
//! while decoding. It depends on no other consolegate module but
//! `protocol::Side`.

use std::fmt;

pub use super::Side;

/// Longest header a server (unmasked) frame can have.
pub const MAX_SERVER_HEADER_LEN: usize = 10;
/// Largest control-frame payload (RFC 6455 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Longest header a client (masked) frame can have: 2 + 8 (length) + 4 (key).
pub const MAX_CLIENT_HEADER_LEN: usize = 14;
/// Length of a mask key (RFC 6455 5.3).
const MASK_KEY_LEN: usize = 4;
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

/// What a peer can get wrong on a WebSocket, whichever peer it was: the
/// checks are the same on both legs, only the masking rule is mirrored.
/// [`WsError`] pairs a fault with the side that committed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// A frame without the mask bit from a client (RFC 6455 5.1).
    #[error("sent an unmasked frame (client frames must be masked)")]
    UnmaskedFrame,
    /// A frame with the mask bit from a server (RFC 6455 5.1).
    #[error("sent a masked frame (server frames must not be masked)")]
    MaskedFrame,
    /// RSV1-3 set (value shifted down to 0..7) with no extension negotiated.
    #[error("set reserved header bits {0:#05b} without a negotiated extension")]
    ReservedBits(u8),
    /// An opcode RFC 6455 reserves (3-7, 0xB-0xF).
    #[error("used reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A control frame without FIN (RFC 6455 5.5).
    #[error("sent a fragmented control frame ({0:?} without FIN)")]
    FragmentedControl(Opcode),
    /// A control frame declaring more than 125 payload bytes.
    #[error("sent a control frame with a {0}-byte payload (limit 125)")]
    ControlTooLong(u64),
    /// A continuation frame with no fragmented message open.
    #[error("sent a continuation frame outside a fragmented message")]
    UnexpectedContinuation,
    /// A new Text/Binary frame while a fragmented message is open.
    #[error("started a new data message before finishing the fragmented one")]
    ExpectedContinuation,
    /// A 64-bit length with its most significant bit set (RFC 6455 5.2).
    #[error("sent a 64-bit frame length with the most significant bit set")]
    LengthMsbSet,
    /// A data frame longer than [`DecoderLimits::max_frame_bytes`].
    #[error("sent a {len}-byte frame, over the {max}-byte limit")]
    FrameTooBig {
        /// The length the frame declared.
        len: u64,
        /// The configured limit.
        max: u64,
    },
    /// A text message (Raw mode) that is not valid UTF-8.
    #[error("sent a text message that is not valid UTF-8")]
    InvalidUtf8,
    /// Base64 mode: a non-alphabet character or misplaced '='.
    #[error("sent invalid base64 (bad character or misplaced '=')")]
    InvalidBase64,
    /// Base64 mode: a message that is not a whole number of 4-char groups.
    #[error("ended a base64 message in the middle of a 4-character group")]
    Base64Truncated,
    /// Base64 mode: a Binary frame (the subprotocol is text-only).
    #[error("sent a binary frame on the text-only base64 subprotocol")]
    BinaryInBase64Mode,
    /// A close frame with a 1-byte payload (a code needs 2).
    #[error("sent a close frame with a 1-byte payload")]
    BadClosePayload,
    /// A close code [`is_valid_close_code`] rejects.
    #[error("sent close code {0}, which is not allowed on the wire")]
    InvalidCloseCode(u16),
    /// A close reason that is not valid UTF-8.
    #[error("sent a close reason that is not valid UTF-8")]
    InvalidCloseReason,
}

impl Fault {
    /// The close code to send the peer that committed this fault.
    pub fn close_code(&self) -> u16 {
        match self {
            Fault::FrameTooBig { .. } => close_code::TOO_BIG,
            Fault::InvalidUtf8
            | Fault::InvalidBase64
            | Fault::Base64Truncated
            | Fault::InvalidCloseReason => close_code::INVALID_PAYLOAD,
            Fault::BinaryInBase64Mode => close_code::UNSUPPORTED_DATA,
            Fault::UnmaskedFrame
            | Fault::MaskedFrame
            | Fault::ReservedBits(_)
            | Fault::ReservedOpcode(_)
            | Fault::FragmentedControl(_)
            | Fault::ControlTooLong(_)
            | Fault::UnexpectedContinuation
            | Fault::ExpectedContinuation
            | Fault::LengthMsbSet
            | Fault::BadClosePayload
            | Fault::InvalidCloseCode(_) => close_code::PROTOCOL_ERROR,
        }
    }

    /// A short stable snake_case name for metrics and logs (the same on
    /// both sides; [`WsError::side`] tells them apart).
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::UnmaskedFrame => "unmasked_frame",
            Fault::MaskedFrame => "masked_frame",
            Fault::ReservedBits(_) => "reserved_bits",
            Fault::ReservedOpcode(_) => "reserved_opcode",
            Fault::FragmentedControl(_) => "fragmented_control",
            Fault::ControlTooLong(_) => "control_too_long",
            Fault::UnexpectedContinuation => "unexpected_continuation",
            Fault::ExpectedContinuation => "expected_continuation",
            Fault::LengthMsbSet => "length_msb_set",
            Fault::FrameTooBig { .. } => "frame_too_big",
            Fault::InvalidUtf8 => "invalid_utf8",
            Fault::InvalidBase64 => "invalid_base64",
            Fault::Base64Truncated => "base64_truncated",
            Fault::BinaryInBase64Mode => "binary_in_base64_mode",
            Fault::BadClosePayload => "bad_close_payload",
            Fault::InvalidCloseCode(_) => "invalid_close_code",
            Fault::InvalidCloseReason => "invalid_close_reason",
        }
    }
}

/// Everything that can go wrong on a WebSocket leg, with the side to blame.
///
/// The variants without a payload of their own are the browser's faults
/// (the server role, as the data plane has always decoded them); the
/// backend's faults (the client role) are [`WsError::Backend`]. Both carry
/// the same [`Fault`]s, so [`WsError::kind`] and [`WsError::close_code`] are
/// the same for the same fault, and the message names the side ("browser
/// sent …" / "backend sent …"). [`WsError::from_fault`] builds either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// The browser sent a frame without the mask bit (RFC 6455 5.1).
    UnmaskedFrame,
    /// The browser set RSV1-3 (value shifted down to 0..7).
    ReservedBits(u8),
    /// The browser used an opcode RFC 6455 reserves (3-7, 0xB-0xF).
    ReservedOpcode(u8),
    /// The browser sent a control frame without FIN (RFC 6455 5.5).
    FragmentedControl(Opcode),
    /// The browser sent a control frame declaring more than 125 bytes.
    ControlTooLong(u64),
    /// The browser sent a continuation frame with no message open.
    UnexpectedContinuation,
    /// The browser started a data message inside a fragmented one.
    ExpectedContinuation,
    /// The browser sent a 64-bit length with its most significant bit set.
    LengthMsbSet,
    /// The browser sent a data frame over [`DecoderLimits::max_frame_bytes`].
    FrameTooBig {
        /// The length the frame declared.
        len: u64,
        /// The configured limit.
        max: u64,
    },
    /// The browser sent a text message (Raw mode) that is not UTF-8.
    InvalidUtf8,
    /// Base64 mode: the browser sent a bad character or misplaced '='.
    InvalidBase64,
    /// Base64 mode: the browser's message is not whole 4-char groups.
    Base64Truncated,
    /// Base64 mode: the browser sent a Binary frame.
    BinaryInBase64Mode,
    /// The browser sent a close frame with a 1-byte payload.
    BadClosePayload,
    /// The browser sent a close code [`is_valid_close_code`] rejects.
    InvalidCloseCode(u16),
    /// The browser sent a close reason that is not valid UTF-8.
    InvalidCloseReason,
    /// The browser sent a frame with the mask bit set where unmasked frames
    /// are required. Nothing here produces it (a server expects masked
    /// frames); it exists so that every [`Fault`] has a browser form.
    MaskedFrame,
    /// The backend (the peer of the client role: a WebMKS host) broke a
    /// framing rule.
    Backend(Fault),
    /// The operating system's random number generator failed, so no mask
    /// key can be made. Our side's failure, not a peer's.
    RandomUnavailable(getrandom::Error),
}

// Written by hand so that the message always starts with the side
// ("browser sent …", "backend sent …") and matches the fault's wording.
impl fmt::Display for WsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self, self.fault()) {
            (WsError::RandomUnavailable(e), _) => write!(
                f,
                "the operating system's random number generator failed: {e}"
            ),
            (_, Some(fault)) => write!(f, "{} {fault}", self.side().as_str()),
            (_, None) => f.write_str("internal WebSocket error"),
        }
    }
}

impl WsError {
    /// The error for `fault` committed by the peer of `role`: a browser for
    /// [`Role::Server`], the backend for [`Role::Client`].
    pub fn from_fault(role: Role, fault: Fault) -> Self {
        if role == Role::Client {
            return WsError::Backend(fault);
        }
        match fault {
            Fault::UnmaskedFrame => WsError::UnmaskedFrame,
            Fault::MaskedFrame => WsError::MaskedFrame,
            Fault::ReservedBits(v) => WsError::ReservedBits(v),
            Fault::ReservedOpcode(v) => WsError::ReservedOpcode(v),
            Fault::FragmentedControl(op) => WsError::FragmentedControl(op),
            Fault::ControlTooLong(len) => WsError::ControlTooLong(len),
            Fault::UnexpectedContinuation => WsError::UnexpectedContinuation,
            Fault::ExpectedContinuation => WsError::ExpectedContinuation,
            Fault::LengthMsbSet => WsError::LengthMsbSet,
            Fault::FrameTooBig { len, max } => WsError::FrameTooBig { len, max },
            Fault::InvalidUtf8 => WsError::InvalidUtf8,
            Fault::InvalidBase64 => WsError::InvalidBase64,
            Fault::Base64Truncated => WsError::Base64Truncated,
            Fault::BinaryInBase64Mode => WsError::BinaryInBase64Mode,
            Fault::BadClosePayload => WsError::BadClosePayload,
            Fault::InvalidCloseCode(code) => WsError::InvalidCloseCode(code),
            Fault::InvalidCloseReason => WsError::InvalidCloseReason,
        }
    }

    /// The peer's fault, or `None` for a failure on our side.
    pub fn fault(&self) -> Option<Fault> {
        Some(match *self {
            WsError::UnmaskedFrame => Fault::UnmaskedFrame,
            WsError::MaskedFrame => Fault::MaskedFrame,
            WsError::ReservedBits(v) => Fault::ReservedBits(v),
            WsError::ReservedOpcode(v) => Fault::ReservedOpcode(v),
            WsError::FragmentedControl(op) => Fault::FragmentedControl(op),
            WsError::ControlTooLong(len) => Fault::ControlTooLong(len),
            WsError::UnexpectedContinuation => Fault::UnexpectedContinuation,
            WsError::ExpectedContinuation => Fault::ExpectedContinuation,
            WsError::LengthMsbSet => Fault::LengthMsbSet,
            WsError::FrameTooBig { len, max } => Fault::FrameTooBig { len, max },
            WsError::InvalidUtf8 => Fault::InvalidUtf8,
            WsError::InvalidBase64 => Fault::InvalidBase64,
            WsError::Base64Truncated => Fault::Base64Truncated,
            WsError::BinaryInBase64Mode => Fault::BinaryInBase64Mode,
            WsError::BadClosePayload => Fault::BadClosePayload,
            WsError::InvalidCloseCode(code) => Fault::InvalidCloseCode(code),
            WsError::InvalidCloseReason => Fault::InvalidCloseReason,
            WsError::Backend(fault) => fault,
            WsError::RandomUnavailable(_) => return None,
        })
    }

    /// Which side failed: the browser, the backend, or ours.
    pub fn side(&self) -> Side {
        match self {
            WsError::Backend(_) => Side::Backend,
            WsError::RandomUnavailable(_) => Side::Internal,
            _ => Side::Browser,
        }
    }

    /// The close code to send the side that failed (for our own failure:
    /// 1011, to either peer).
    pub fn close_code(&self) -> u16 {
        self.fault()
            .map_or(close_code::INTERNAL_ERROR, |fault| fault.close_code())
    }

    /// A short stable snake_case name for metrics and logs; the same fault
    /// has the same kind on both sides ([`WsError::side`] tells them apart).
    pub fn kind(&self) -> &'static str {
        self.fault()
            .map_or("random_unavailable", |fault| fault.kind())
    }
}

/// Which end of a WebSocket connection we play on one leg: it decides which
/// frames the peer must mask (RFC 6455 5.1: a client masks every frame, a
/// server none) and which side an error blames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// We are the server: the peer is a browser, its frames must be masked
    /// and ours are not (the browser leg).
    Server,
    /// We are the client: the peer is a server (a WebMKS host), its frames
    /// must not be masked and ours are (the backend leg).
    Client,
}

impl Role {
    /// The side our peer is on.
    pub fn peer(self) -> Side {
        match self {
            Role::Server => Side::Browser,
            Role::Client => Side::Backend,
        }
    }

    /// Whether the frames we receive in this role carry a mask.
    pub fn peer_masks(self) -> bool {
        self == Role::Server
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

#[cfg(test)]
mod client_tests;
mod decoder;
mod frame;
mod header;
mod keys;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;
mod tracker;

pub use decoder::{Decoder, Progress};
use frame::mask_copy;
pub use frame::{
    apply_mask, client_close_frame, client_header_len, client_ping_frame, client_pong_frame,
    close_frame, encode_client_frame, ping_frame, pong_frame, server_header_len,
    write_client_header, write_server_header, ControlFrame,
};
pub use keys::{MaskKeySource, MASK_KEY_BATCH_BYTES};
pub use tracker::{FrameHeader, FrameTracker, RawHeader, Scan, Step};
