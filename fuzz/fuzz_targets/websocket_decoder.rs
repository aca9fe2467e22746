//! Fuzzes the WebSocket frame decoder (`protocol::websocket::Decoder`) in
//! both payload modes with hostile byte streams, cut into arbitrary input
//! chunks and decoded into arbitrary output buffer sizes.
//!
//! Checks, besides "no panic, no hang": each call's progress contract
//! (consumed ≤ input, written ≤ buffer, guaranteed progress with room, see
//! `consolegate_fuzz::drive`), that an error poisons the decoder, and that
//! the result does not depend on how the stream was cut: the chunked run
//! gives the same events and error as one call over the whole stream, and
//! the same data when no error cut it short.
//!
//! Input layout (17 bytes, then the stream), so seeds are real wire bytes
//! behind a short header: `flags` (bit 0 Base64 mode, bits 1-3 the frame
//! size limit), 8 chunk lengths, 8 output buffer sizes, then the frames.
#![no_main]

use arbitrary::Arbitrary;
use consolegate::protocol::websocket::{DecoderLimits, PayloadMode};
use consolegate_fuzz::{drive, Outcome, Plan, Role, PLAN_SLOTS};
use libfuzzer_sys::fuzz_target;

/// Frame size limits to try: the edges of the 7/16/64-bit length forms, the
/// default (1 MiB) and "unlimited".
const FRAME_LIMITS: [u64; 8] = [0, 1, 125, 126, 65_535, 65_536, 1 << 20, u64::MAX >> 1];

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    flags: u8,
    chunk_lengths: [u8; PLAN_SLOTS],
    out_sizes: [u8; PLAN_SLOTS],
    stream: &'a [u8],
}

fuzz_target!(|input: Input<'_>| {
    let mode = if input.flags & 1 == 0 {
        PayloadMode::Raw
    } else {
        PayloadMode::Base64
    };
    let limits = DecoderLimits {
        max_frame_bytes: FRAME_LIMITS[usize::from((input.flags >> 1) & 7)],
    };
    let plan = Plan {
        chunk_lengths: input.chunk_lengths,
        out_sizes: input.out_sizes,
    };
    for role in Role::ALL {
        let chunked = drive(&mut role.decoder(mode, limits), mode, input.stream, &plan);
        let whole = drive(
            &mut role.decoder(mode, limits),
            mode,
            input.stream,
            &Plan::whole(),
        );
        check_same(&chunked, &whole);
    }
});

/// The cut of the stream must not change what the decoder saw.
fn check_same(chunked: &Outcome, whole: &Outcome) {
    assert_eq!(
        chunked.events, whole.events,
        "events depend on the chunking"
    );
    assert_eq!(
        chunked.error, whole.error,
        "the error depends on the chunking"
    );
    if whole.error.is_none() {
        assert_eq!(chunked.data, whole.data, "data depends on the chunking");
        assert_eq!(chunked.consumed, whole.consumed);
    } else {
        // An error drops the data of the call it ends, so the two runs
        // agree only up to the shorter one.
        let n = chunked.data.len().min(whole.data.len());
        assert_eq!(
            chunked.data[..n],
            whole.data[..n],
            "data depends on the chunking"
        );
    }
}
