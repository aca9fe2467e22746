//! Helpers shared by the fuzz targets: how a byte stream is cut into the
//! chunks and output buffers a real IO loop would hand the WebSocket decoder,
//! the loop that drives a [`Decoder`] over them while checking its progress
//! contract, and the [`Role`] a decoder plays.
//!
//! Nothing here may hide a product bug: every check is an `assert!` so that
//! libFuzzer records a crash, and nothing catches a panic.

use consolegate::protocol::websocket::{
    apply_mask, Decoder, DecoderLimits, Event, Fault, PayloadMode, Role as CodecRole, WsError,
};

/// How many chunk lengths and output sizes a [`Plan`] cycles through.
pub const PLAN_SLOTS: usize = 8;

/// Output buffer sizes at or above this byte value stand for large buffers
/// (4 KiB steps up to 64 KiB), as a worker's relay buffer would be.
const LARGE_OUT_FROM: u8 = 0xF0;
/// A chunk length byte of this value means "the whole rest of the stream".
const CHUNK_REST: u8 = 0xFF;

/// How a stream reaches the decoder: input chunk lengths and output buffer
/// sizes, each cycling through [`PLAN_SLOTS`] fuzzer-chosen values.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Input chunk lengths; 0 is an empty read, [`CHUNK_REST`] the rest.
    pub chunk_lengths: [u8; PLAN_SLOTS],
    /// Output buffer sizes; see [`LARGE_OUT_FROM`].
    pub out_sizes: [u8; PLAN_SLOTS],
}

impl Plan {
    /// One chunk and one roomy output buffer: the reference run.
    pub fn whole() -> Self {
        Plan {
            chunk_lengths: [CHUNK_REST; PLAN_SLOTS],
            out_sizes: [u8::MAX; PLAN_SLOTS],
        }
    }

    fn chunk_len(&self, call: usize, rest: usize) -> usize {
        match self.chunk_lengths[call % PLAN_SLOTS] {
            CHUNK_REST => rest,
            n => usize::from(n).min(rest),
        }
    }

    fn out_size(&self, call: usize) -> usize {
        match self.out_sizes[call % PLAN_SLOTS] {
            n if n >= LARGE_OUT_FROM => usize::from(n - LARGE_OUT_FROM + 1) * 4096,
            n => usize::from(n),
        }
    }
}

/// Everything a decoder produced from one stream.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Data bytes written, in order, across all calls.
    pub data: Vec<u8>,
    /// Control events, in order.
    pub events: Vec<Event>,
    /// The error that stopped decoding, if any.
    pub error: Option<WsError>,
    /// Input bytes consumed in total.
    pub consumed: usize,
}

/// Which end of a connection the decoder under test plays.
///
/// `Server` decodes the masked frames a browser sends and refuses unmasked
/// ones; `Client` (the backend leg of a WebMKS relay) decodes the unmasked
/// frames a server sends and refuses masked ones, blaming the backend. Both
/// WebSocket targets loop over [`Role::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Decodes client→server frames (masked).
    Server,
    /// Decodes server→client frames (unmasked).
    Client,
}

impl Role {
    /// Every role the codec implements.
    pub const ALL: [Role; 2] = [Role::Server, Role::Client];

    /// The codec's name for this role.
    pub fn codec(self) -> CodecRole {
        match self {
            Role::Server => CodecRole::Server,
            Role::Client => CodecRole::Client,
        }
    }

    /// A fresh decoder of this role.
    pub fn decoder(self, mode: PayloadMode, limits: DecoderLimits) -> Decoder {
        match self {
            Role::Server => Decoder::new(mode, limits),
            Role::Client => Decoder::with_role(CodecRole::Client, mode, limits),
        }
    }

    /// `frame`, a complete frame as a server writes it (unmasked, from
    /// `write_server_header`, `close_frame`, `ping_frame`, `pong_frame`), as
    /// the peer of this role would send it: masked with `mask` for a
    /// server's peer, as it is for a client's.
    pub fn to_wire(self, frame: &[u8], mask: [u8; 4]) -> Vec<u8> {
        match self {
            Role::Server => mask_server_frame(frame, mask),
            Role::Client => frame.to_vec(),
        }
    }

    /// `frame` (an unmasked server frame) as the wrong peer would send it:
    /// unmasked to a server, masked to a client.
    pub fn wrong_direction(self, frame: &[u8], mask: [u8; 4]) -> Vec<u8> {
        match self {
            Role::Server => frame.to_vec(),
            Role::Client => mask_server_frame(frame, mask),
        }
    }

    /// The error this role's decoder gives for a frame in the wrong
    /// direction.
    pub fn refused(self) -> WsError {
        match self {
            Role::Server => WsError::UnmaskedFrame,
            Role::Client => WsError::Backend(Fault::MaskedFrame),
        }
    }
}

/// Turn one unmasked frame into the same frame masked with `mask`: set the
/// mask bit, insert the key after the length, mask the payload.
pub fn mask_server_frame(frame: &[u8], mask: [u8; 4]) -> Vec<u8> {
    assert!(frame.len() >= 2, "a frame has at least two header bytes");
    let header_len = match frame[1] & 0x7F {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    assert!(frame[1] & 0x80 == 0, "server frames are unmasked");
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&frame[..header_len]);
    out[1] |= 0x80;
    out.extend_from_slice(&mask);
    let payload_at = out.len();
    out.extend_from_slice(&frame[header_len..]);
    apply_mask(&mut out[payload_at..], mask, 0);
    out
}

/// Drive `decoder` over `stream` as `plan` cuts it, asserting the progress
/// contract of `Decoder::decode` on every call, and stop at the first error
/// (checking that the decoder stays poisoned, then never using it again).
///
/// Like a real IO loop, each call decodes every byte received and not yet
/// consumed; each call first receives the plan's next chunk.
pub fn drive(decoder: &mut Decoder, mode: PayloadMode, stream: &[u8], plan: &Plan) -> Outcome {
    let mut outcome = Outcome::default();
    // Sizes past the stream length plus a carry change nothing: clamp them,
    // which keeps the buffer (zeroed on every run) small.
    let mut out = vec![0u8; stream.len() + 8];
    // Each call consumes a byte, or is an empty read (never two in a row),
    // or stalls on a small buffer (and the next one gets room): a decoder
    // that stalls anyway trips this bound instead of looping for ever.
    let max_calls = 4 * stream.len() + 64;
    let (mut at, mut received) = (0usize, 0usize);
    let (mut previous_empty, mut previous_stalled) = (false, false);
    for call in 0.. {
        if at == stream.len() {
            break;
        }
        assert!(
            call < max_calls,
            "decoder made no progress in {max_calls} calls"
        );
        let mut chunk = plan.chunk_len(call, stream.len() - received);
        if chunk == 0 && at == received && previous_empty {
            chunk = 1;
        }
        received += chunk;
        let input = &stream[at..received];
        let mut size = plan.out_size(call).min(out.len());
        if previous_stalled {
            size = size.max(input.len() + 3);
        }
        let progress = match decoder.decode(input, &mut out[..size]) {
            Ok(p) => p,
            Err(e) => {
                check_poisoned(decoder, e, input, &mut out);
                outcome.error = Some(e);
                return outcome;
            }
        };
        assert!(progress.consumed <= input.len(), "consumed past the input");
        assert!(progress.written <= size, "wrote past the output buffer");
        if mode == PayloadMode::Raw {
            assert!(
                progress.written <= progress.consumed,
                "raw mode wrote more than it read"
            );
        }
        check_guaranteed_progress(mode, input.len(), size, &progress);
        outcome.data.extend_from_slice(&out[..progress.written]);
        outcome.consumed += progress.consumed;
        at += progress.consumed;
        if let Some(event) = progress.event {
            check_event(decoder, &event);
            outcome.events.push(event);
        }
        previous_empty = input.is_empty();
        previous_stalled = !input.is_empty()
            && progress.consumed == 0
            && progress.written == 0
            && progress.event.is_none();
    }
    outcome
}

/// Raw mode: with `size ≥ input` everything is consumed unless an event
/// stops it. Base64 mode: with ≥ 3 bytes of room, something happens.
fn check_guaranteed_progress(
    mode: PayloadMode,
    input_len: usize,
    size: usize,
    progress: &consolegate::protocol::websocket::Progress,
) {
    if progress.event.is_some() || input_len == 0 {
        return;
    }
    match mode {
        PayloadMode::Raw if size >= input_len => assert_eq!(
            progress.consumed, input_len,
            "raw mode with room for all input left some unconsumed"
        ),
        PayloadMode::Base64 if size >= 3 => assert!(
            progress.consumed > 0 || progress.written > 0,
            "base64 mode with 3 bytes of room made no progress"
        ),
        _ => {}
    }
}

/// After an error, the decoder answers every call with the same error.
fn check_poisoned(decoder: &mut Decoder, error: WsError, input: &[u8], out: &mut [u8]) {
    assert!(!decoder.is_idle(), "a poisoned decoder claims to be idle");
    assert_eq!(
        decoder.decode(input, out),
        Err(error),
        "decoder not poisoned"
    );
    assert_eq!(decoder.decode(&[], out), Err(error), "decoder not poisoned");
}

/// What every event must satisfy.
fn check_event(decoder: &mut Decoder, event: &Event) {
    match event {
        Event::Ping(p) | Event::Pong(p) => assert!(p.as_slice().len() <= 125),
        Event::Close { code, reason } => {
            assert!(
                decoder.close_received(),
                "close event without close_received"
            );
            if let Some(code) = code {
                assert!(consolegate::protocol::websocket::is_valid_close_code(*code));
            }
            assert!(
                std::str::from_utf8(reason.as_slice()).is_ok(),
                "close reason not UTF-8"
            );
            // Nothing follows a close: input is swallowed, nothing written.
            let garbage = b"\x81\x85garbage";
            let mut out = [0u8; 8];
            let after = decoder.decode(garbage, &mut out);
            let expected = Ok((garbage.len(), 0, None));
            assert_eq!(after.map(|p| (p.consumed, p.written, p.event)), expected);
        }
    }
}
