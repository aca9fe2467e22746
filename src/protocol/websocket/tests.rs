//! Unit and property tests of the frame codec (decoder and encoders).

use super::decoder::{base64_block_chars, BASE64_BLOCK_CHARS};
use super::test_support::*;
use super::*;
use proptest::prelude::*;
use proptest::sample::Index;

fn raw() -> Decoder {
    Decoder::new(PayloadMode::Raw, LIMITS)
}

fn b64() -> Decoder {
    Decoder::new(PayloadMode::Base64, LIMITS)
}

fn frame(fin: bool, op: Opcode, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_client_frame(&mut v, fin, op, MASK, payload);
    v
}

#[derive(Debug, Default)]
struct Outcome {
    data: Vec<u8>,
    events: Vec<Event>,
    error: Option<WsError>,
    consumed: usize,
}

/// Feed `input` in one go (re-calling after events) with a roomy buffer.
fn decode_all(dec: &mut Decoder, input: &[u8]) -> Outcome {
    feed_chunks(dec, &[input], &[input.len().max(1)])
}

/// Feed `chunks` in order; `data_out` sizes cycle through `sizes`.
/// Stops at the first error. Guards against a stall (no progress at all)
/// by bumping the next buffer to 3 bytes, and fails if even that stalls.
fn feed_chunks(dec: &mut Decoder, chunks: &[&[u8]], sizes: &[usize]) -> Outcome {
    let mut o = Outcome::default();
    let max = sizes.iter().copied().max().unwrap_or(0).max(3);
    let mut out = vec![0u8; max];
    let mut k = 0;
    for chunk in chunks {
        let mut pos = 0;
        let mut stalled = false;
        while pos < chunk.len() {
            let mut size = sizes[k % sizes.len()];
            k += 1;
            if stalled {
                size = size.max(3);
            }
            match dec.decode(&chunk[pos..], &mut out[..size]) {
                Ok(p) => {
                    assert!(p.consumed <= chunk.len() - pos);
                    assert!(p.written <= size);
                    // Base64 carries up to 3 chars between calls, so only
                    // Raw mode bounds a single call's output by its input.
                    if dec.mode == PayloadMode::Raw {
                        assert!(p.written <= p.consumed, "written > consumed: {p:?}");
                    }
                    o.data.extend_from_slice(&out[..p.written]);
                    o.consumed += p.consumed;
                    pos += p.consumed;
                    if let Some(e) = p.event {
                        o.events.push(e);
                    }
                    let none = p.consumed == 0 && p.written == 0 && p.event.is_none();
                    assert!(
                        !(none && stalled),
                        "decoder stalled with {size} bytes of room"
                    );
                    stalled = none;
                }
                Err(e) => {
                    o.error = Some(e);
                    return o;
                }
            }
        }
    }
    o
}

fn err_of(mode: PayloadMode, input: &[u8]) -> WsError {
    let mut d = Decoder::new(mode, LIMITS);
    let o = decode_all(&mut d, input);
    let e = o
        .error
        .unwrap_or_else(|| panic!("expected an error, got {o:?}"));
    // Poisoned: the same error again, whatever comes next.
    assert_eq!(d.decode(b"", &mut [0; 8]), Err(e));
    assert_eq!(
        d.decode(&frame(true, Opcode::Binary, b"x"), &mut [0; 8]),
        Err(e)
    );
    assert!(!d.is_idle());
    e
}

// ---- RFC 6455 5.7 examples ----

#[test]
fn rfc_masked_hello() {
    let input = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    let mut d = raw();
    let mut out = [0u8; 16];
    let p = d.decode(&input, &mut out).unwrap();
    assert_eq!(
        p,
        Progress {
            consumed: 11,
            written: 5,
            event: None
        }
    );
    assert_eq!(&out[..5], b"Hello");
    assert!(d.is_idle());
    assert_eq!(frame(true, Opcode::Text, b"Hello"), input);
}

#[test]
fn rfc_unmasked_examples_are_server_frames_and_rejected_from_clients() {
    // Single-frame unmasked text, as a server would send it.
    let mut h = [0u8; MAX_SERVER_HEADER_LEN];
    assert_eq!(write_server_header(&mut h, true, Opcode::Text, 5), 2);
    assert_eq!(&h[..2], [0x81, 0x05]);
    let mut unmasked = vec![0x81, 0x05];
    unmasked.extend_from_slice(b"Hello");
    assert_eq!(err_of(PayloadMode::Raw, &unmasked), WsError::UnmaskedFrame);
    // Fragmented unmasked "Hel" + "lo".
    assert_eq!(write_server_header(&mut h, false, Opcode::Text, 3), 2);
    assert_eq!(&h[..2], [0x01, 0x03]);
    assert_eq!(
        write_server_header(&mut h, true, Opcode::Continuation, 2),
        2
    );
    assert_eq!(&h[..2], [0x80, 0x02]);
}

#[test]
fn rfc_fragmented_hello_masked() {
    let mut input = frame(false, Opcode::Text, b"Hel");
    input.extend(frame(true, Opcode::Continuation, b"lo"));
    let mut d = raw();
    let o = decode_all(&mut d, &input);
    assert_eq!(o.error, None);
    assert_eq!(o.data, b"Hello");
    assert!(d.is_idle());
}

#[test]
fn rfc_ping_and_masked_pong() {
    let mut ping = vec![0x89, 0x05];
    ping.extend_from_slice(b"Hello");
    assert_eq!(ping_frame(b"Hello").as_bytes(), ping);
    let pong = [
        0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    let mut d = raw();
    let p = d.decode(&pong, &mut []).unwrap();
    assert_eq!(p.consumed, 11);
    assert_eq!(p.event, Some(Event::Pong(cp(b"Hello"))));
    let p = raw()
        .decode(&frame(true, Opcode::Ping, b"Hello"), &mut [])
        .unwrap();
    assert_eq!(p.event, Some(Event::Ping(cp(b"Hello"))));
    let mut pong_reply = vec![0x8a, 0x05];
    pong_reply.extend_from_slice(b"Hello");
    assert_eq!(pong_frame(b"Hello").as_bytes(), pong_reply);
}

#[test]
fn rfc_256_and_64k_binary() {
    let mut h = [0u8; MAX_SERVER_HEADER_LEN];
    assert_eq!(write_server_header(&mut h, true, Opcode::Binary, 256), 4);
    assert_eq!(&h[..4], [0x82, 0x7E, 0x01, 0x00]);
    assert_eq!(write_server_header(&mut h, true, Opcode::Binary, 65536), 10);
    assert_eq!(h, [0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]);
    for len in [256usize, 65536] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let input = frame(true, Opcode::Binary, &payload);
        assert_eq!(input[1], 0x80 | if len == 256 { 126 } else { 127 });
        let mut d = raw();
        let mut out = vec![0u8; len];
        let p = d.decode(&input, &mut out).unwrap();
        assert_eq!(p.consumed, input.len());
        assert_eq!(out, payload);
    }
}

// ---- errors ----

#[test]
fn unmasked_frame() {
    let e = err_of(PayloadMode::Raw, &raw_frame(0x82, None, Form::Min, 1, b"x"));
    assert_eq!((e, e.close_code()), (WsError::UnmaskedFrame, 1002));
    // Detected from the first two bytes alone.
    let mut d = raw();
    assert_eq!(
        d.decode(&[0x82, 0x01], &mut []),
        Err(WsError::UnmaskedFrame)
    );
}

#[test]
fn reserved_bits() {
    for (bit, v) in [(0x40u8, 4u8), (0x20, 2), (0x10, 1)] {
        let e = err_of(
            PayloadMode::Raw,
            &raw_frame(0x82 | bit, Some(MASK), Form::Min, 0, b""),
        );
        assert_eq!((e, e.close_code()), (WsError::ReservedBits(v), 1002));
    }
}

#[test]
fn reserved_opcodes() {
    for op in (3..=7).chain(0xB..=0xF) {
        let e = err_of(
            PayloadMode::Raw,
            &raw_frame(0x80 | op, Some(MASK), Form::Min, 0, b""),
        );
        assert_eq!((e, e.close_code()), (WsError::ReservedOpcode(op), 1002));
    }
}

#[test]
fn fragmented_control() {
    for op in [Opcode::Ping, Opcode::Pong, Opcode::Close] {
        let e = err_of(PayloadMode::Raw, &frame(false, op, b""));
        assert_eq!((e, e.close_code()), (WsError::FragmentedControl(op), 1002));
    }
}

#[test]
fn control_too_long() {
    let e = err_of(PayloadMode::Raw, &frame(true, Opcode::Ping, &[0; 126]));
    assert_eq!((e, e.close_code()), (WsError::ControlTooLong(126), 1002));
    let e = err_of(
        PayloadMode::Raw,
        &raw_frame(0x88, Some(MASK), Form::L64, 70_000, b""),
    );
    assert_eq!(e, WsError::ControlTooLong(70_000));
    // 125 is fine, even in a non-minimal encoding.
    let o = decode_all(
        &mut raw(),
        &raw_frame(0x89, Some(MASK), Form::L64, 125, &[7; 125]),
    );
    assert_eq!(o.events, [Event::Ping(cp(&[7; 125]))]);
}

#[test]
fn unexpected_continuation() {
    let e = err_of(PayloadMode::Raw, &frame(true, Opcode::Continuation, b"x"));
    assert_eq!((e, e.close_code()), (WsError::UnexpectedContinuation, 1002));
    // Also after a message has finished.
    let mut input = frame(true, Opcode::Text, b"a");
    input.extend(frame(true, Opcode::Continuation, b"b"));
    assert_eq!(
        err_of(PayloadMode::Raw, &input),
        WsError::UnexpectedContinuation
    );
}

#[test]
fn expected_continuation() {
    for op in [Opcode::Text, Opcode::Binary] {
        let mut input = frame(false, Opcode::Binary, b"a");
        input.extend(frame(true, op, b"b"));
        let e = err_of(PayloadMode::Raw, &input);
        assert_eq!((e, e.close_code()), (WsError::ExpectedContinuation, 1002));
    }
}

#[test]
fn length_msb_set() {
    let e = err_of(
        PayloadMode::Raw,
        &raw_frame(0x82, Some(MASK), Form::L64, 1 << 63, b""),
    );
    assert_eq!((e, e.close_code()), (WsError::LengthMsbSet, 1002));
    let e = err_of(
        PayloadMode::Raw,
        &raw_frame(0x82, Some(MASK), Form::L64, u64::MAX, b""),
    );
    assert_eq!(e, WsError::LengthMsbSet);
}

#[test]
fn frame_too_big() {
    let limits = DecoderLimits {
        max_frame_bytes: 100,
    };
    let mut d = Decoder::new(PayloadMode::Raw, limits);
    let o = decode_all(&mut d, &raw_frame(0x82, Some(MASK), Form::L16, 101, b""));
    let e = o.error.unwrap();
    assert_eq!(e, WsError::FrameTooBig { len: 101, max: 100 });
    assert_eq!((e.close_code(), e.kind()), (1009, "frame_too_big"));
    let mut d = Decoder::new(PayloadMode::Raw, limits);
    let o = decode_all(&mut d, &frame(true, Opcode::Binary, &[1; 100]));
    assert_eq!((o.error, o.data.len()), (None, 100));
    // Control frames are bounded by the protocol, not by this limit.
    let mut d = Decoder::new(PayloadMode::Raw, DecoderLimits { max_frame_bytes: 0 });
    let o = decode_all(&mut d, &frame(true, Opcode::Ping, b"abc"));
    assert_eq!(o.events, [Event::Ping(cp(b"abc"))]);
}

#[test]
fn close_payload_of_one_byte() {
    let e = err_of(PayloadMode::Raw, &frame(true, Opcode::Close, &[3]));
    assert_eq!((e, e.close_code()), (WsError::BadClosePayload, 1002));
}

#[test]
fn invalid_close_codes() {
    for code in [
        0u16,
        999,
        1004,
        1005,
        1006,
        1015,
        1016,
        2000,
        2999,
        5000,
        u16::MAX,
    ] {
        let e = err_of(
            PayloadMode::Raw,
            &frame(true, Opcode::Close, &code.to_be_bytes()),
        );
        assert_eq!((e, e.close_code()), (WsError::InvalidCloseCode(code), 1002));
    }
}

#[test]
fn valid_close_codes_and_close_event() {
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 4999,
    ] {
        assert!(is_valid_close_code(code));
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice("bye ünïcode".as_bytes());
        let mut d = raw();
        let o = decode_all(&mut d, &frame(true, Opcode::Close, &payload));
        assert_eq!(o.error, None);
        assert_eq!(
            o.events,
            [Event::Close {
                code: Some(code),
                reason: cp("bye ünïcode".as_bytes())
            }]
        );
        assert!(d.close_received());
    }
    let o = decode_all(&mut raw(), &frame(true, Opcode::Close, b""));
    assert_eq!(
        o.events,
        [Event::Close {
            code: None,
            reason: cp(b"")
        }]
    );
}

#[test]
fn close_reason_invalid_utf8() {
    let e = err_of(
        PayloadMode::Raw,
        &frame(true, Opcode::Close, &[0x03, 0xE8, b'a', 0xFF]),
    );
    assert_eq!((e, e.close_code()), (WsError::InvalidCloseReason, 1007));
    // A reason cut mid-character is invalid too.
    let e = err_of(
        PayloadMode::Raw,
        &frame(true, Opcode::Close, &[0x03, 0xE8, 0xE2, 0x82]),
    );
    assert_eq!(e, WsError::InvalidCloseReason);
}

#[test]
fn input_after_close_is_ignored() {
    let mut input = frame(true, Opcode::Close, &1000u16.to_be_bytes());
    let close_len = input.len();
    input.extend(frame(true, Opcode::Binary, b"ignored"));
    input.extend_from_slice(&[0xFF; 9]); // garbage, would be an error
    let mut d = raw();
    let mut out = [0u8; 64];
    let p = d.decode(&input, &mut out).unwrap();
    assert_eq!(p.consumed, close_len);
    assert!(matches!(
        p.event,
        Some(Event::Close {
            code: Some(1000),
            ..
        })
    ));
    let p = d.decode(&input[close_len..], &mut out).unwrap();
    assert_eq!(
        p,
        Progress {
            consumed: input.len() - close_len,
            written: 0,
            event: None
        }
    );
    assert!(d.close_received());
}

#[test]
fn error_kinds_and_codes_are_stable_and_distinct() {
    let all = [
        WsError::UnmaskedFrame,
        WsError::ReservedBits(1),
        WsError::ReservedOpcode(3),
        WsError::FragmentedControl(Opcode::Ping),
        WsError::ControlTooLong(126),
        WsError::UnexpectedContinuation,
        WsError::ExpectedContinuation,
        WsError::LengthMsbSet,
        WsError::FrameTooBig { len: 2, max: 1 },
        WsError::InvalidUtf8,
        WsError::InvalidBase64,
        WsError::Base64Truncated,
        WsError::BinaryInBase64Mode,
        WsError::BadClosePayload,
        WsError::InvalidCloseCode(5),
        WsError::InvalidCloseReason,
    ];
    let mut kinds: Vec<_> = all.iter().map(WsError::kind).collect();
    for k in &kinds {
        assert!(
            k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{k}"
        );
    }
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(kinds.len(), all.len());
    for e in all {
        assert!([1002, 1003, 1007, 1009].contains(&e.close_code()));
        assert!(e.to_string().starts_with("browser "), "{e}");
    }
}

// ---- liberal acceptance, streaming behaviour ----

#[test]
fn non_minimal_lengths_accepted() {
    for form in [Form::L16, Form::L64] {
        let mut input = raw_frame(0x82, Some(MASK), form, 5, b"abcde");
        input.extend(raw_frame(0x89, Some(MASK), form, 2, b"hi"));
        let o = decode_all(&mut raw(), &input);
        assert_eq!(o.error, None);
        assert_eq!(o.data, b"abcde");
        assert_eq!(o.events, [Event::Ping(cp(b"hi"))]);
    }
}

#[test]
fn zero_length_frames() {
    let mut input = frame(true, Opcode::Binary, b"");
    input.extend(frame(false, Opcode::Text, b""));
    input.extend(frame(false, Opcode::Continuation, b""));
    input.extend(frame(true, Opcode::Continuation, b""));
    input.extend(frame(true, Opcode::Ping, b""));
    let mut d = raw();
    let p = d.decode(&input, &mut []).unwrap();
    assert_eq!(
        p,
        Progress {
            consumed: input.len(),
            written: 0,
            event: Some(Event::Ping(cp(b"")))
        }
    );
    assert!(d.is_idle());
}

#[test]
fn control_frames_interleaved_in_fragmented_message() {
    let mut input = frame(false, Opcode::Binary, b"ab");
    input.extend(frame(true, Opcode::Ping, b"p1"));
    input.extend(frame(false, Opcode::Continuation, b"cd"));
    input.extend(frame(true, Opcode::Pong, b"p2"));
    input.extend(frame(true, Opcode::Close, &1001u16.to_be_bytes()));
    let mut d = raw();
    let o = decode_all(&mut d, &input);
    assert_eq!(o.error, None);
    assert_eq!(o.data, b"abcd");
    assert_eq!(
        o.events,
        [
            Event::Ping(cp(b"p1")),
            Event::Pong(cp(b"p2")),
            Event::Close {
                code: Some(1001),
                reason: cp(b"")
            }
        ]
    );
}

#[test]
fn stops_right_after_control_frame() {
    let mut input = frame(true, Opcode::Binary, b"one");
    input.extend(frame(true, Opcode::Ping, b"x"));
    let split = input.len();
    input.extend(frame(true, Opcode::Binary, b"two"));
    let mut d = raw();
    let mut out = [0u8; 16];
    let p = d.decode(&input, &mut out).unwrap();
    assert_eq!(
        (p.consumed, p.written, p.event),
        (split, 3, Some(Event::Ping(cp(b"x"))))
    );
    assert_eq!(&out[..3], b"one");
    let p = d.decode(&input[split..], &mut out).unwrap();
    assert_eq!(
        (p.consumed, p.written, p.event),
        (input.len() - split, 3, None)
    );
    assert_eq!(&out[..3], b"two");
}

#[test]
fn empty_data_out_consumes_headers_only() {
    let input = frame(true, Opcode::Binary, b"payload");
    let mut d = raw();
    let p = d.decode(&input, &mut []).unwrap();
    assert_eq!(
        p,
        Progress {
            consumed: 6,
            written: 0,
            event: None
        }
    );
    assert!(!d.is_idle());
    let p = d.decode(&input[6..], &mut []).unwrap();
    assert_eq!(p, Progress::default());
    let mut out = [0u8; 4];
    let p = d.decode(&input[6..], &mut out).unwrap();
    assert_eq!((p.consumed, p.written), (4, 4));
    assert_eq!(&out, b"payl");
    let p = d.decode(&input[10..], &mut out).unwrap();
    assert_eq!((p.consumed, p.written), (3, 3));
    assert!(d.is_idle());
}

#[test]
fn byte_at_a_time_equals_one_shot() {
    let mut input = frame(false, Opcode::Text, "héllo wörld ".as_bytes());
    input.extend(frame(true, Opcode::Ping, b"ping!"));
    input.extend(frame(true, Opcode::Continuation, "€𝄞 done".as_bytes()));
    input.extend(frame(true, Opcode::Binary, &(0..=255).collect::<Vec<u8>>()));
    input.extend(frame(true, Opcode::Binary, &[9; 70_000]));
    input.extend(frame(true, Opcode::Close, &[0x03, 0xE9, b'o', b'k']));
    let one = decode_all(&mut raw(), &input);
    assert_eq!(one.error, None);
    assert_eq!(one.events.len(), 2);
    let chunks: Vec<&[u8]> = input.chunks(1).collect();
    for sizes in [&[1usize][..], &[0, 1, 2], &[7, 0, 300]] {
        let mut d = raw();
        let bytewise = feed_chunks(&mut d, &chunks, sizes);
        assert_eq!(bytewise.error, None);
        assert_eq!(bytewise.data, one.data);
        assert_eq!(bytewise.events, one.events);
        assert!(d.close_received());
    }
}

#[test]
fn partial_header_is_not_idle() {
    let input = frame(true, Opcode::Binary, b"abc");
    let mut d = raw();
    assert!(d.is_idle());
    for i in 0..input.len() - 1 {
        let p = d.decode(&input[i..=i], &mut [0; 8]).unwrap();
        assert_eq!(p.consumed, 1);
        assert!(!d.is_idle(), "idle after byte {i}");
    }
    d.decode(&input[input.len() - 1..], &mut [0; 8]).unwrap();
    assert!(d.is_idle());
    // Mid fragmented message is not idle either.
    d.decode(&frame(false, Opcode::Binary, b"a"), &mut [0; 8])
        .unwrap();
    assert!(!d.is_idle());
}

// ---- UTF-8 ----

#[test]
fn utf8_split_across_frames_and_chunks() {
    let text = "a€b𝄞cé";
    let bytes = text.as_bytes();
    for cut in 0..=bytes.len() {
        let mut input = frame(false, Opcode::Text, &bytes[..cut]);
        input.extend(frame(true, Opcode::Ping, b""));
        input.extend(frame(true, Opcode::Continuation, &bytes[cut..]));
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        let o = feed_chunks(&mut raw(), &chunks, &[1, 2, 3]);
        assert_eq!(o.error, None, "cut {cut}");
        assert_eq!(o.data, bytes);
    }
    // Every byte of a 4-byte character in its own frame.
    let mut input = frame(false, Opcode::Text, &[0xF0]);
    input.extend(frame(false, Opcode::Continuation, &[0x9D]));
    input.extend(frame(false, Opcode::Continuation, &[0x84]));
    input.extend(frame(true, Opcode::Continuation, &[0x9E]));
    let o = decode_all(&mut raw(), &input);
    assert_eq!((o.error, o.data), (None, "𝄞".as_bytes().to_vec()));
}

#[test]
fn utf8_invalid_sequences() {
    let bad: &[&[u8]] = &[
        &[0xFF],
        &[0x80],                   // lone continuation
        &[0xC3, 0x28],             // bad continuation
        &[0xC0, 0x80],             // overlong NUL
        &[0xC1, 0xBF],             // overlong
        &[0xE0, 0x80, 0x80],       // overlong 3-byte
        &[0xF0, 0x80, 0x80, 0x80], // overlong 4-byte
        &[0xED, 0xA0, 0x80],       // surrogate U+D800
        &[0xED, 0xBF, 0xBF],       // surrogate U+DFFF
        &[0xF4, 0x90, 0x80, 0x80], // above U+10FFFF
        &[0xF5, 0x80, 0x80, 0x80],
        &[b'o', b'k', 0xE2, 0x82], // ends mid-character
        &[0xF0, 0x9D, 0x84],       // ends mid-character
    ];
    for b in bad {
        let e = err_of(PayloadMode::Raw, &frame(true, Opcode::Text, b));
        assert_eq!((e, e.close_code()), (WsError::InvalidUtf8, 1007), "{b:x?}");
        // Same split into one frame per byte, fed byte by byte.
        let mut input = Vec::new();
        for (i, byte) in b.iter().enumerate() {
            let op = if i == 0 {
                Opcode::Text
            } else {
                Opcode::Continuation
            };
            input.extend(frame(i + 1 == b.len(), op, &[*byte]));
        }
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        let o = feed_chunks(&mut raw(), &chunks, &[1]);
        assert_eq!(o.error, Some(WsError::InvalidUtf8), "{b:x?}");
    }
}

#[test]
fn utf8_invalid_fails_fast() {
    // A surrogate prefix is rejected before the message (or frame) ends.
    let mut d = raw();
    let input = frame(false, Opcode::Text, &[b'x', 0xED, 0xA0]);
    assert_eq!(d.decode(&input, &mut [0; 16]), Err(WsError::InvalidUtf8));
    let mut d = raw();
    d.decode(&frame(false, Opcode::Text, &[0xF0]), &mut [0; 16])
        .unwrap();
    let r = d.decode(&frame(false, Opcode::Continuation, &[0x80]), &mut [0; 16]);
    assert_eq!(r, Err(WsError::InvalidUtf8)); // F0 80 is overlong
}

#[test]
fn binary_is_not_utf8_checked() {
    let o = decode_all(
        &mut raw(),
        &frame(true, Opcode::Binary, &[0xFF, 0xC0, 0xED]),
    );
    assert_eq!((o.error, o.data), (None, vec![0xFF, 0xC0, 0xED]));
}

// ---- base64 ----

#[test]
fn base64_basic_and_padding() {
    for data in [
        &b""[..],
        b"a",
        b"ab",
        b"abc",
        b"abcd",
        b"\x00\xff\x10 hello world",
    ] {
        let o = decode_all(&mut b64(), &frame(true, Opcode::Text, &b64enc(data)));
        assert_eq!((o.error, &o.data[..]), (None, data));
    }
}

#[test]
fn base64_across_chunk_and_fragment_boundaries() {
    let data: Vec<u8> = (0..=255).collect();
    let text = b64enc(&data);
    for cut in [0, 1, 2, 3, 5, 7, 100, text.len() - 1, text.len()] {
        let mut input = frame(false, Opcode::Text, &text[..cut]);
        input.extend(frame(true, Opcode::Pong, b"z"));
        input.extend(frame(true, Opcode::Continuation, &text[cut..]));
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        let mut d = b64();
        let o = feed_chunks(&mut d, &chunks, &[3, 1, 0, 5]);
        assert_eq!(o.error, None, "cut {cut}");
        assert_eq!(o.data, data);
        assert_eq!(o.events, [Event::Pong(cp(b"z"))]);
        assert!(d.is_idle());
    }
}

#[test]
fn base64_padded_group_fits_small_room() {
    let input = frame(true, Opcode::Text, b"QUJDRA==");
    let mut d = b64();
    // "QUJD" needs 3 bytes of room: with 2, only the header goes.
    let p = d.decode(&input, &mut [0u8; 2]).unwrap();
    assert_eq!((p.consumed, p.written), (6, 0));
    let rest = &input[6..];
    let p = d.decode(rest, &mut [0u8; 1]).unwrap();
    assert_eq!((p.consumed, p.written), (0, 0));
    let mut three = [0u8; 3];
    let p = d.decode(rest, &mut three).unwrap();
    assert_eq!((p.consumed, p.written, &three), (4, 3, b"ABC"));
    // "RA==" decodes to one byte, so one byte of room is enough.
    let mut one = [0u8; 1];
    let p = d.decode(&rest[4..], &mut one).unwrap();
    assert_eq!((p.consumed, p.written, one), (4, 1, *b"D"));
    assert!(d.is_idle());
}

/// A call with little room unmasks only about what that room can take
/// (`base64_block_chars`), not a whole 512-character block: a long message
/// decoded a few bytes at a time still comes out whole and exact.
#[test]
fn base64_small_room_decodes_long_messages_exactly() {
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 7 + i / 256) as u8).collect();
    let input = frame(true, Opcode::Text, &b64enc(&data));
    for sizes in [&[3][..], &[1, 2, 4], &[0, 5, 7, 3], &[600, 1, 8]] {
        let mut d = b64();
        let o = feed_chunks(&mut d, &[&input], sizes);
        assert_eq!((o.error, o.consumed), (None, input.len()), "{sizes:?}");
        assert_eq!(o.data, data, "{sizes:?}");
        assert!(d.is_idle());
    }
    for room in 0..2000 {
        let chars = base64_block_chars(room);
        assert!(chars <= BASE64_BLOCK_CHARS);
        // A carried group (3 chars) and every whole group that fits.
        assert!(chars >= (3 + 4 * (room / 3) + 4).min(BASE64_BLOCK_CHARS));
    }
}

/// Padded groups inside a message give 1 byte per 4 characters, more than
/// one block for the room: the decoder takes further blocks in the same
/// call and fills the room.
#[test]
fn base64_padded_groups_fill_the_room_in_one_call() {
    let text = b"QQ==".repeat(40);
    let input = frame(true, Opcode::Text, &text);
    let header_len = input.len() - text.len();
    let mut out = [0u8; 30];
    let p = b64().decode(&input, &mut out).unwrap();
    assert_eq!((p.consumed, p.written), (header_len + 120, 30));
    assert_eq!(out, [b'A'; 30]);
}

#[test]
fn base64_invalid_chars() {
    for bad in [
        &b"QUJ!"[..],
        b"QU J",
        b"QUJD\n",
        b"\xc3\xa9AAA",
        b"QUJDR-==",
        b"-",
    ] {
        // Not FIN: bad characters are caught without waiting for the end.
        let e = err_of(PayloadMode::Base64, &frame(false, Opcode::Text, bad));
        assert_eq!(
            (e, e.close_code()),
            (WsError::InvalidBase64, 1007),
            "{bad:?}"
        );
    }
}

#[test]
fn base64_bad_padding() {
    for bad in [&b"=AAA"[..], b"A===", b"AA=A", b"====", b"QQ==QQ=A"] {
        let e = err_of(PayloadMode::Base64, &frame(true, Opcode::Text, bad));
        assert_eq!(e, WsError::InvalidBase64, "{bad:?}");
    }
    // Padded groups followed by more groups are accepted (liberal).
    let o = decode_all(&mut b64(), &frame(true, Opcode::Text, b"QQ==QUJD"));
    assert_eq!((o.error, o.data), (None, b"AABC".to_vec()));
}

#[test]
fn base64_mid_group_end() {
    for bad in [&b"Q"[..], b"QU", b"QUJ", b"QUJDR"] {
        let e = err_of(PayloadMode::Base64, &frame(true, Opcode::Text, bad));
        assert_eq!((e, e.close_code()), (WsError::Base64Truncated, 1007));
    }
    // Across fragments: the message, not the frame, must be whole groups.
    let mut input = frame(false, Opcode::Text, b"QU");
    input.extend(frame(true, Opcode::Continuation, b"JD"));
    assert_eq!(decode_all(&mut b64(), &input).data, b"ABC");
    let mut input = frame(false, Opcode::Text, b"QU");
    input.extend(frame(true, Opcode::Continuation, b"J"));
    assert_eq!(
        err_of(PayloadMode::Base64, &input),
        WsError::Base64Truncated
    );
}

#[test]
fn base64_binary_frame_rejected() {
    let e = err_of(PayloadMode::Base64, &frame(true, Opcode::Binary, b"QUJD"));
    assert_eq!((e, e.close_code()), (WsError::BinaryInBase64Mode, 1003));
}

// ---- masking ----

#[test]
fn apply_mask_matches_naive() {
    let mask = [0x12, 0x34, 0x56, 0x78];
    for offset in 0..8 {
        for len in 0..=100usize {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let naive: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[(i + offset) % 4])
                .collect();
            let mut fast = data.clone();
            apply_mask(&mut fast, mask, offset);
            assert_eq!(fast, naive, "offset {offset} len {len}");
            let mut copied = vec![0u8; len];
            mask_copy(&data, &mut copied, mask, offset);
            assert_eq!(copied, naive, "mask_copy offset {offset} len {len}");
        }
    }
}

// ---- server frames ----

/// Tiny independent parser of unmasked server frames' headers.
fn parse_server_header(h: &[u8]) -> (bool, u8, u64, usize) {
    let fin = h[0] & 0x80 != 0;
    assert_eq!(h[0] & 0x70, 0);
    assert_eq!(h[1] & 0x80, 0, "server frames are unmasked");
    match h[1] {
        126 => (
            fin,
            h[0] & 0xF,
            u64::from(u16::from_be_bytes([h[2], h[3]])),
            4,
        ),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[2..10]);
            (fin, h[0] & 0xF, u64::from_be_bytes(b), 10)
        }
        n => (fin, h[0] & 0xF, u64::from(n), 2),
    }
}

#[test]
fn server_header_lengths_and_round_trip() {
    let cases = [
        (0u64, 2usize),
        (1, 2),
        (125, 2),
        (126, 4),
        (65535, 4),
        (65536, 10),
        (u64::from(u32::MAX) + 1, 10),
        ((1 << 63) - 1, 10),
    ];
    for (len, hlen) in cases {
        for (fin, op) in [
            (true, Opcode::Binary),
            (false, Opcode::Text),
            (true, Opcode::Continuation),
        ] {
            let mut h = [0xAAu8; MAX_SERVER_HEADER_LEN];
            assert_eq!(server_header_len(len), hlen);
            assert_eq!(write_server_header(&mut h, fin, op, len), hlen);
            assert_eq!(parse_server_header(&h), (fin, op.as_u8(), len, hlen));
        }
    }
    let mut h = [0u8; MAX_SERVER_HEADER_LEN];
    write_server_header(&mut h, true, Opcode::Binary, u64::from(u32::MAX) + 1);
    assert_eq!(h, [0x82, 127, 0, 0, 0, 1, 0, 0, 0, 0]);
}

#[test]
fn control_frames() {
    let long = [b'p'; 200];
    let f = ping_frame(&long);
    assert_eq!(f.as_bytes().len(), 127);
    assert_eq!(&f.as_bytes()[..2], [0x89, 125]);
    assert_eq!(pong_frame(b"").as_bytes(), [0x8A, 0]);
    assert_eq!(close_frame(1000, "").as_bytes(), [0x88, 2, 0x03, 0xE8]);
    let f = close_frame(close_code::GOING_AWAY, "bye");
    assert_eq!(f.as_bytes(), [0x88, 5, 0x03, 0xE9, b'b', b'y', b'e']);
    // 61 two-byte characters = 122 bytes, plus one more: 124 > 123, so
    // the last character is dropped, not split.
    let reason = "é".repeat(62);
    let f = close_frame(1011, &reason);
    assert_eq!(f.as_bytes()[1], 2 + 122);
    assert!(std::str::from_utf8(&f.as_bytes()[4..]).is_ok());
    let f = close_frame(1011, &"x".repeat(300));
    assert_eq!(f.as_bytes().len(), 2 + 125);
    // The decoder accepts what we produce, once masked like a client.
    let (op, payload) = (Opcode::Close, &f.as_bytes()[2..]);
    let o = decode_all(&mut raw(), &frame(true, op, payload));
    assert_eq!(
        o.events,
        [Event::Close {
            code: Some(1011),
            reason: cp(&[b'x'; 123])
        }]
    );
}

#[test]
fn control_payload_basics() {
    assert!(ControlPayload::new(&[0; 126]).is_none());
    assert_eq!(ControlPayload::new(&[1; 125]).unwrap().as_slice(), [1; 125]);
    assert_eq!(format!("{:?}", cp(b"hi\n")), "ControlPayload(b\"hi\\n\")");
    assert_eq!(cp(b"a"), cp(b"a"));
    assert_ne!(cp(b"a"), cp(b"a\0"));
    for op in [
        Opcode::Continuation,
        Opcode::Text,
        Opcode::Binary,
        Opcode::Close,
        Opcode::Ping,
        Opcode::Pong,
    ] {
        assert_eq!(Opcode::from_u8(op.as_u8()), Some(op));
    }
}

// ---- property tests ----

fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..2000)
}

/// Decodes `input` in a loop until it is all consumed, an error, or no
/// progress (only possible with too little room); never panics.
fn drive(dec: &mut Decoder, input: &[u8], sizes: &[usize]) {
    let mut out = [0u8; 64];
    let mut pos = 0;
    let mut idle_rounds = 0;
    let mut k = 0;
    while pos < input.len() && idle_rounds < 4 {
        let size = sizes[k % sizes.len()].min(out.len());
        k += 1;
        match dec.decode(&input[pos..], &mut out[..size]) {
            Ok(p) => {
                assert!(p.consumed <= input.len() - pos && p.written <= size);
                pos += p.consumed;
                idle_rounds = if p.consumed == 0 && p.event.is_none() {
                    idle_rounds + 1
                } else {
                    0
                };
            }
            Err(e) => {
                assert_eq!(dec.decode(&input[pos..], &mut out), Err(e));
                return;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn prop_raw_streams_decode_exactly(
        msgs in prop::collection::vec(msg_spec(), 0..6),
        close in close_spec(),
        seed in any::<u64>(),
        points in prop::collection::vec(any::<Index>(), 0..12),
        sizes in prop::collection::vec(0usize..300, 1..8),
    ) {
        let (wire, data, events) = build_stream(&msgs, close.clone(), seed, false);
        let mut d = raw();
        let o = feed_chunks(&mut d, &split(&wire, &points), &sizes);
        prop_assert_eq!(o.error, None);
        prop_assert_eq!(o.consumed, wire.len());
        prop_assert!(o.data == data, "data differs");
        prop_assert_eq!(o.events, events);
        prop_assert_eq!(d.close_received(), close.is_some());
        prop_assert!(close.is_some() || d.is_idle());
    }

    #[test]
    fn prop_byte_at_a_time_equals_one_shot(
        msgs in prop::collection::vec(msg_spec(), 0..3),
        close in close_spec(),
        seed in any::<u64>(),
    ) {
        let (wire, data, events) = build_stream(&msgs, close, seed, false);
        let one = decode_all(&mut raw(), &wire);
        let chunks: Vec<&[u8]> = wire.chunks(1).collect();
        let bytewise = feed_chunks(&mut raw(), &chunks, &[1]);
        prop_assert_eq!(one.error, None);
        prop_assert_eq!(bytewise.error, None);
        prop_assert!(one.data == data && bytewise.data == data);
        prop_assert_eq!(&one.events, &events);
        prop_assert_eq!(&bytewise.events, &events);
    }

    #[test]
    fn prop_base64_streams_decode_exactly(
        msgs in prop::collection::vec(msg_spec(), 0..5),
        close in close_spec(),
        seed in any::<u64>(),
        points in prop::collection::vec(any::<Index>(), 0..12),
        sizes in prop::collection::vec(0usize..300, 1..8),
    ) {
        let (wire, data, events) = build_stream(&msgs, close, seed, true);
        let o = feed_chunks(&mut b64(), &split(&wire, &points), &sizes);
        prop_assert_eq!(o.error, None);
        prop_assert!(o.data == data, "data differs");
        prop_assert_eq!(o.events, events);
    }

    #[test]
    fn prop_raw_roomy_output_consumes_everything(
        msgs in prop::collection::vec(msg_spec(), 0..4),
        seed in any::<u64>(),
        points in prop::collection::vec(any::<Index>(), 0..6),
    ) {
        let (wire, _, _) = build_stream(&msgs, None, seed, false);
        let mut d = raw();
        let mut out = vec![0u8; wire.len()];
        for chunk in split(&wire, &points) {
            let mut pos = 0;
            loop {
                let p = d.decode(&chunk[pos..], &mut out[..chunk.len() - pos]).unwrap();
                pos += p.consumed;
                if p.event.is_none() {
                    prop_assert_eq!(pos, chunk.len());
                    break;
                }
            }
        }
    }

    #[test]
    fn prop_arbitrary_bytes_never_panic(
        input in arb_bytes(),
        base64_mode in any::<bool>(),
        max_frame in 0u64..5000,
        sizes in prop::collection::vec(0usize..64, 1..6),
    ) {
        let mode = if base64_mode { PayloadMode::Base64 } else { PayloadMode::Raw };
        let mut d = Decoder::new(mode, DecoderLimits { max_frame_bytes: max_frame });
        drive(&mut d, &input, &sizes);
    }

    #[test]
    fn prop_mutated_streams_never_panic(
        msgs in prop::collection::vec(msg_spec(), 1..3),
        seed in any::<u64>(),
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 1..6),
        base64_mode in any::<bool>(),
        sizes in prop::collection::vec(0usize..64, 1..6),
    ) {
        let (mut wire, _, _) = build_stream(&msgs, None, seed, base64_mode);
        for (i, x) in flips {
            let at = i.index(wire.len());
            wire[at] ^= x;
        }
        let mode = if base64_mode { PayloadMode::Base64 } else { PayloadMode::Raw };
        let mut d = Decoder::new(mode, LIMITS);
        drive(&mut d, &wire, &sizes);
    }

    #[test]
    fn prop_apply_mask_matches_naive(
        data in prop::collection::vec(any::<u8>(), 0..300),
        mask in any::<[u8; 4]>(),
        offset in 0usize..16,
    ) {
        let naive: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ mask[(i + offset) % 4]).collect();
        let mut fast = data.clone();
        apply_mask(&mut fast, mask, offset);
        prop_assert_eq!(&fast, &naive);
        apply_mask(&mut fast, mask, offset);
        prop_assert_eq!(fast, data);
    }

    #[test]
    fn prop_server_header_round_trip(len in any::<u64>().prop_map(|l| l >> 1), fin in any::<bool>()) {
        let mut h = [0u8; MAX_SERVER_HEADER_LEN];
        let n = write_server_header(&mut h, fin, Opcode::Binary, len);
        prop_assert_eq!(n, server_header_len(len));
        prop_assert_eq!(parse_server_header(&h), (fin, 2, len, n));
    }
}
