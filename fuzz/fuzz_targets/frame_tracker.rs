//! Fuzzes `protocol::websocket::FrameTracker`, which follows the frame
//! boundaries of a pass-through WebSocket stream (the WebMKS relay), in
//! both roles, driven by `step` and `scan` calls mixed as the fuzzer
//! chooses over input cut into arbitrary chunks.
//!
//! Checks, besides "no panic, no hang":
//! - every call consumes at most its input, and something unless the input
//!   is empty; a split header is handed back whole (`raw` ends with the
//!   bytes consumed), an unsplit one is exactly the bytes consumed;
//! - where it says data frames end (`Payload { frame_end }`, an empty
//!   `DataStart`), where control frames end, what it forwards (data frame
//!   headers and payloads as they came, nothing of control frames) and
//!   `at_frame_boundary` / `remaining_in_frame` after every call match a
//!   reference framing of the whole stream written here, up to the first
//!   error or close;
//! - on an error, the forwarded bytes end on a frame boundary and the
//!   tracker stays poisoned;
//! - the cut and the mix of `step` / `scan` change nothing: the same
//!   forwarded bytes, control events (at the same offsets) and error as one
//!   `step` run over the whole stream;
//! - the control events and error agree with the decoder
//!   (`Decoder::with_role`, Raw mode) on the same stream, except where the
//!   decoder stops at a text payload that is not UTF-8, which the tracker
//!   does not check (the peers do).
//!
//! Input layout (18 bytes, then the stream): `flags` (bit 0 the client
//! role, bits 1-3 the frame size limit), a byte whose bit i says whether
//! call i (mod 8) uses `scan`, 8 chunk lengths (0xFF: the rest).
#![no_main]

use consolegate::protocol::websocket::{
    DecoderLimits, Event, Fault, FrameTracker, PayloadMode, Role, Scan, Step, WsError,
    MAX_CLIENT_HEADER_LEN, MAX_CONTROL_PAYLOAD,
};
use consolegate_fuzz::{drive, Plan, PLAN_SLOTS};
use libfuzzer_sys::fuzz_target;

const HEADER_BYTES: usize = 2 + PLAN_SLOTS;
/// As in `websocket_decoder`: the edges of the length forms, 1 MiB, none.
const FRAME_LIMITS: [u64; 8] = [0, 1, 125, 126, 65_535, 65_536, 1 << 20, u64::MAX >> 1];
const CHUNK_REST: u8 = 0xFF;

/// What one run of the tracker saw.
#[derive(Debug, Default, PartialEq)]
struct Run {
    /// Bytes to forward, in order.
    forwarded: Vec<u8>,
    /// Control events and the stream offset where each frame ended.
    controls: Vec<(usize, Event)>,
    /// Stream offsets where `step` said a data frame ended.
    data_ends: Vec<usize>,
    /// Stream bytes consumed.
    position: usize,
    error: Option<WsError>,
}

/// One frame of the reference framing.
#[derive(Debug, Clone, Copy)]
struct RefFrame {
    start: usize,
    header_end: usize,
    /// May lie past the stream (a frame cut short).
    end: u128,
    control: bool,
    close: bool,
}

fuzz_target!(|bytes: &[u8]| {
    let Some((header, stream)) = bytes.split_at_checked(HEADER_BYTES) else {
        return;
    };
    let role = if header[0] & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    let limits = DecoderLimits {
        max_frame_bytes: FRAME_LIMITS[usize::from((header[0] >> 1) & 7)],
    };
    let scan_calls = header[1];
    let chunks: [u8; PLAN_SLOTS] = header[2..].try_into().expect("8 bytes");
    let frames = reference_frames(stream);
    let mixed = run_tracker(role, limits, stream, &chunks, scan_calls, &frames);
    let whole = run_tracker(role, limits, stream, &[CHUNK_REST; PLAN_SLOTS], 0, &frames);
    assert_eq!(
        mixed.forwarded, whole.forwarded,
        "forwarded bytes depend on the cut"
    );
    assert_eq!(
        mixed.controls, whole.controls,
        "control events depend on the cut"
    );
    assert_eq!(mixed.error, whole.error, "the error depends on the cut");
    if whole.error.is_none() {
        assert_eq!(mixed.position, whole.position);
    } else {
        // Bytes of the bad frame (a header, a control payload) may have
        // been held before the error.
        let held_at_most = MAX_CLIENT_HEADER_LEN + MAX_CONTROL_PAYLOAD;
        assert!(mixed.position.abs_diff(whole.position) <= held_at_most);
    }
    if scan_calls == 0 {
        assert_eq!(mixed.data_ends, whole.data_ends);
    }
    check_against_reference(&whole, &frames, stream);
    check_against_decoder(&whole, role, limits, stream);
});

/// The frames of `stream` by their headers alone (no validation): where
/// each starts, where its header and payload end.
fn reference_frames(stream: &[u8]) -> Vec<RefFrame> {
    let mut frames = Vec::new();
    let mut at = 0usize;
    while at + 2 <= stream.len() {
        let (b0, b1) = (stream[at], stream[at + 1]);
        let length_bytes = match b1 & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header_len = 2 + length_bytes + if b1 & 0x80 != 0 { 4 } else { 0 };
        if at + header_len > stream.len() {
            break;
        }
        let payload_len = match length_bytes {
            0 => u64::from(b1 & 0x7F),
            n => stream[at + 2..at + 2 + n]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        };
        let header_end = at + header_len;
        let end = header_end as u128 + u128::from(payload_len);
        frames.push(RefFrame {
            start: at,
            header_end,
            end,
            control: b0 & 0x08 != 0,
            close: b0 & 0x0F == 0x8,
        });
        if end >= stream.len() as u128 {
            break;
        }
        at = end as usize;
    }
    frames
}

fn run_tracker(
    role: Role,
    limits: DecoderLimits,
    stream: &[u8],
    chunks: &[u8; PLAN_SLOTS],
    scan_calls: u8,
    frames: &[RefFrame],
) -> Run {
    let mut tracker = FrameTracker::new(role, limits);
    let mut run = Run::default();
    let mut received = 0usize;
    // Each call consumes a byte unless its input is empty, and an empty
    // input is followed by a chunk: a stalled tracker trips this bound.
    let max_calls = 2 * stream.len() + 16;
    for call in 0..=max_calls {
        if run.position == stream.len() {
            return run;
        }
        assert!(call < max_calls, "the tracker made no progress");
        let chunk = match chunks[call % PLAN_SLOTS] {
            CHUNK_REST => stream.len() - received,
            0 if received == run.position => 1,
            n => usize::from(n),
        };
        received = (received + chunk).min(stream.len());
        let input = &stream[run.position..received];
        let use_scan = scan_calls & (1 << (call % 8)) != 0;
        let result = if use_scan {
            tracker
                .scan(input)
                .map(|scan| on_scan(&mut run, input, scan))
        } else {
            tracker
                .step(input)
                .map(|step| on_step(&mut run, input, step))
        };
        let consumed = match result {
            Ok(consumed) => consumed,
            Err(e) => {
                assert_eq!(tracker.step(input), Err(e), "not poisoned");
                assert_eq!(tracker.scan(&[]), Err(e), "not poisoned");
                assert!(tracker.at_frame_boundary(), "an error inside a frame");
                run.error = Some(e);
                return run;
            }
        };
        assert!(consumed <= input.len(), "consumed past the input");
        assert!(consumed > 0 || input.is_empty(), "consumed nothing");
        run.position += consumed;
        check_boundary(&tracker, run.position, frames);
    }
    unreachable!("the loop returns")
}

/// Records one `step` result; returns the bytes it consumed.
fn on_step(run: &mut Run, input: &[u8], step: Step) -> usize {
    let consumed = step.consumed();
    match step {
        Step::DataStart {
            consumed,
            header,
            raw,
            split,
        } => {
            check_header(input, consumed, raw.as_bytes(), split);
            run.forwarded.extend_from_slice(raw.as_bytes());
            if header.payload_len == 0 {
                run.data_ends.push(run.position + consumed);
            }
        }
        Step::Payload { len, frame_end } => {
            run.forwarded.extend_from_slice(&input[..len]);
            if frame_end {
                run.data_ends.push(run.position + len);
            }
        }
        Step::Control { consumed, event } => {
            run.controls.push((run.position + consumed, event));
        }
        Step::NeedMore { .. } => {}
        Step::AfterClose { consumed } => assert_eq!(consumed, input.len()),
    }
    consumed
}

/// Records one `scan` result; returns the bytes it consumed.
fn on_scan(run: &mut Run, input: &[u8], scan: Scan) -> usize {
    match scan {
        Scan::Forward(n) => {
            assert!(n > 0, "an empty Forward");
            run.forwarded.extend_from_slice(&input[..n]);
        }
        Scan::Header { consumed, raw } => {
            check_header(input, consumed, raw.as_bytes(), true);
            run.forwarded.extend_from_slice(raw.as_bytes());
        }
        Scan::Control { consumed, event } => {
            run.controls.push((run.position + consumed, event));
        }
        Scan::NeedMore { .. } => {}
        Scan::AfterClose { consumed } => assert_eq!(consumed, input.len()),
    }
    scan.consumed()
}

fn check_header(input: &[u8], consumed: usize, raw: &[u8], split: bool) {
    assert!(
        (2..=14).contains(&raw.len()),
        "a header of {} bytes",
        raw.len()
    );
    if split {
        assert!(consumed < raw.len() && raw.ends_with(&input[..consumed]));
    } else {
        assert_eq!(
            raw,
            &input[..consumed],
            "the header is not the bytes consumed"
        );
    }
}

/// After a call at stream offset `position`: inside a data frame's payload
/// exactly when the reference says so, with the right distance to its end.
fn check_boundary(tracker: &FrameTracker, position: usize, frames: &[RefFrame]) {
    // Frames are in stream order and do not overlap: only the last one
    // whose header ended by `position` can hold it (a binary search, so a
    // long stream of tiny frames stays fast).
    let last = frames.partition_point(|f| f.header_end <= position);
    let inside = last
        .checked_sub(1)
        .map(|i| &frames[i])
        .filter(|f| !f.control && (position as u128) < f.end);
    match inside {
        Some(frame) if !tracker.close_received() => {
            assert!(!tracker.at_frame_boundary(), "a boundary inside a payload");
            let remaining = u128::from(tracker.remaining_in_frame());
            assert_eq!(
                position as u128 + remaining,
                frame.end,
                "wrong remaining_in_frame"
            );
        }
        _ => {
            assert!(tracker.at_frame_boundary(), "no boundary between frames");
            assert_eq!(tracker.remaining_in_frame(), 0);
        }
    }
}

/// The tracker's view of the stream must match the reference framing.
fn check_against_reference(run: &Run, frames: &[RefFrame], stream: &[u8]) {
    let position = run.position;
    // Frames up to the first close (nothing after it is read).
    let close_at = frames.iter().position(|f| f.close);
    let read = &frames[..close_at.map_or(frames.len(), |i| i + 1)];
    let data_ends: Vec<usize> = read
        .iter()
        .filter(|f| !f.control && f.end <= position as u128)
        .map(|f| f.end as usize)
        .collect();
    assert_eq!(run.data_ends, data_ends, "data frames end elsewhere");
    let control_ends: Vec<usize> = read
        .iter()
        .filter(|f| f.control && f.end <= position as u128)
        .map(|f| f.end as usize)
        .collect();
    let seen: Vec<usize> = run.controls.iter().map(|(at, _)| *at).collect();
    assert_eq!(seen, control_ends, "control frames end elsewhere");
    let mut forwarded = Vec::new();
    for frame in read
        .iter()
        .filter(|f| !f.control && f.header_end <= position)
    {
        let end = frame.end.min(position as u128) as usize;
        forwarded.extend_from_slice(&stream[frame.start..end]);
    }
    assert_eq!(run.forwarded, forwarded, "forwarded bytes differ");
    if run.error.is_some() {
        assert!(
            data_ends.last().copied().unwrap_or(0) <= position,
            "an error inside a forwarded frame"
        );
    }
}

/// Control events and errors as the decoder sees them.
fn check_against_decoder(run: &Run, role: Role, limits: DecoderLimits, stream: &[u8]) {
    let mode = PayloadMode::Raw;
    let mut decoder = consolegate::protocol::websocket::Decoder::with_role(role, mode, limits);
    let decoded = drive(&mut decoder, mode, stream, &Plan::whole());
    let events: Vec<Event> = run.controls.iter().map(|(_, e)| *e).collect();
    if decoded.error.and_then(|e| e.fault()) == Some(Fault::InvalidUtf8) {
        assert!(
            events.starts_with(&decoded.events),
            "control events differ before a UTF-8 error"
        );
        return;
    }
    assert_eq!(
        events, decoded.events,
        "control events differ from the decoder's"
    );
    assert_eq!(
        run.error, decoded.error,
        "the error differs from the decoder's"
    );
}
