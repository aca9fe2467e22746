//! Tests of the frame-boundary tracker: unit cases for each result and
//! error, and the frame-boundary properties (arbitrary interleavings of
//! data and control frames, split at arbitrary bytes, come out whole and in
//! order, on both legs), plus a differential check against the decoder.

use super::super::test_support::*;
use super::*;
use proptest::prelude::*;
use proptest::sample::Index;

fn tracker(role: Role) -> FrameTracker {
    FrameTracker::new(role, LIMITS)
}

/// A frame as the peer of `role` sends it (masked from a browser).
fn peer_frame(role: Role, fin: bool, op: Opcode, payload: &[u8]) -> Vec<u8> {
    let b0 = if fin { FIN_BIT } else { 0 } | op.as_u8();
    let mask = role.peer_masks().then_some(MASK);
    raw_frame(b0, mask, Form::Min, payload.len() as u64, payload)
}

/// What came out of a tracker, in order: runs of forwarded bytes and the
/// control events between them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Out {
    Data(Vec<u8>),
    Control(Event),
}

fn push_data(out: &mut Vec<Out>, bytes: &[u8]) {
    if let Some(Out::Data(run)) = out.last_mut() {
        run.extend_from_slice(bytes);
    } else if !bytes.is_empty() {
        out.push(Out::Data(bytes.to_vec()));
    }
}

/// What a stream must come out as.
fn expected(stream: &Stream) -> Vec<Out> {
    let mut out = Vec::new();
    for item in &stream.items {
        match item {
            Item::Data(range) => push_data(&mut out, &stream.wire[range.clone()]),
            Item::Control(_, event) => out.push(Out::Control(*event)),
        }
    }
    out
}

/// Forwarded-byte offsets at which a data frame ends (0 included).
fn data_boundaries(stream: &Stream) -> Vec<usize> {
    let mut at = vec![0];
    for item in &stream.items {
        if let Item::Data(range) = item {
            at.push(at[at.len() - 1] + range.len());
        }
    }
    at
}

#[derive(Debug, Default)]
struct Run {
    out: Vec<Out>,
    forwarded: usize,
    error: Option<WsError>,
    after_close: usize,
}

impl Run {
    fn forward(&mut self, bytes: &[u8]) {
        push_data(&mut self.out, bytes);
        self.forwarded += bytes.len();
    }

    /// After a forward: the tracker's idea of the boundary matches the
    /// stream's (when the stream's boundaries are known).
    fn check_boundary(&self, t: &FrameTracker, boundaries: Option<&[usize]>) {
        let Some(boundaries) = boundaries else {
            return;
        };
        let next = boundaries
            .iter()
            .find(|&&b| b >= self.forwarded)
            .copied()
            .unwrap_or(self.forwarded);
        assert_eq!(
            t.at_frame_boundary(),
            next == self.forwarded,
            "boundary at {}",
            self.forwarded
        );
        assert_eq!(t.remaining_in_frame(), (next - self.forwarded) as u64);
    }
}

/// Drives `scan` over `chunks`, each consumed completely.
fn scan_chunks(t: &mut FrameTracker, chunks: &[&[u8]], boundaries: Option<&[usize]>) -> Run {
    let mut run = Run::default();
    for chunk in chunks {
        let mut at = 0;
        loop {
            let result = t.scan(&chunk[at..]);
            let scan = match result {
                Ok(scan) => scan,
                Err(e) => {
                    assert_eq!(t.scan(b"more"), Err(e), "poisoned");
                    run.error = Some(e);
                    return run;
                }
            };
            let consumed = scan.consumed();
            assert!(consumed <= chunk.len() - at);
            match scan {
                Scan::Forward(n) => run.forward(&chunk[at..at + n]),
                Scan::Header { raw, .. } => run.forward(raw.as_bytes()),
                Scan::Control { event, .. } => {
                    assert!(t.at_frame_boundary());
                    run.out.push(Out::Control(event));
                }
                Scan::NeedMore { .. } => {}
                Scan::AfterClose { consumed } => run.after_close += consumed,
            }
            run.check_boundary(t, boundaries);
            at += consumed;
            if at == chunk.len() {
                break;
            }
            assert!(consumed > 0, "no progress on a non-empty input: {scan:?}");
        }
    }
    run
}

/// Drives `step` over `chunks`, checking each data frame's header against
/// `frames` (the expected data frames' wire bytes, in order), if given.
fn step_chunks(t: &mut FrameTracker, chunks: &[&[u8]], frames: Option<&[&[u8]]>) -> Run {
    let mut run = Run::default();
    let (mut frame_index, mut ended) = (0usize, 0usize);
    for chunk in chunks {
        let mut at = 0;
        while at < chunk.len() {
            let step = match t.step(&chunk[at..]) {
                Ok(step) => step,
                Err(e) => {
                    run.error = Some(e);
                    return run;
                }
            };
            let consumed = step.consumed();
            assert!(consumed > 0, "no progress: {step:?}");
            match step {
                Step::DataStart {
                    consumed,
                    header,
                    raw,
                    split,
                } => {
                    if let Some(frames) = frames {
                        let frame = frames[frame_index];
                        assert_eq!(raw.as_bytes(), &frame[..raw.as_bytes().len()]);
                        assert_eq!(
                            header.payload_len as usize,
                            frame.len() - raw.as_bytes().len()
                        );
                    }
                    frame_index += 1;
                    assert_eq!(header.mask.is_some(), t.role() == Role::Server);
                    assert_eq!(split, consumed < raw.as_bytes().len());
                    if split {
                        run.forward(raw.as_bytes());
                    } else {
                        run.forward(&chunk[at..at + consumed]);
                    }
                    if header.payload_len == 0 {
                        ended += 1;
                        assert!(t.at_frame_boundary());
                    } else {
                        assert_eq!(t.remaining_in_frame(), header.payload_len);
                    }
                }
                Step::Payload { len, frame_end } => {
                    run.forward(&chunk[at..at + len]);
                    assert_eq!(frame_end, t.at_frame_boundary());
                    ended += usize::from(frame_end);
                }
                Step::Control { event, .. } => run.out.push(Out::Control(event)),
                Step::NeedMore { .. } => {}
                Step::AfterClose { consumed } => run.after_close += consumed,
            }
            at += consumed;
        }
    }
    if run.error.is_none() && frames.is_some() {
        assert_eq!(ended, frame_index, "every started frame ended");
    }
    run
}

// ---- unit cases ----

#[test]
fn scan_forwards_whole_data_frames_and_stops_at_control_frames() {
    for role in [Role::Server, Role::Client] {
        let a = peer_frame(role, true, Opcode::Binary, b"first");
        let b = peer_frame(role, false, Opcode::Binary, &[1; 300]);
        let ping = peer_frame(role, true, Opcode::Ping, b"hb");
        let c = peer_frame(role, true, Opcode::Continuation, b"");
        let wire = [&a[..], &b, &ping, &c].concat();
        let mut t = tracker(role);
        // Both data frames, headers included, in one result: forwarded as
        // they came (a browser's mask is kept).
        assert_eq!(t.scan(&wire), Ok(Scan::Forward(a.len() + b.len())));
        assert!(t.at_frame_boundary() && t.message_open());
        let rest = &wire[a.len() + b.len()..];
        assert_eq!(
            t.scan(rest),
            Ok(Scan::Control {
                consumed: ping.len(),
                event: Event::Ping(cp(b"hb"))
            })
        );
        assert_eq!(t.scan(&rest[ping.len()..]), Ok(Scan::Forward(c.len())));
        assert!(t.is_idle());
        assert_eq!(t.scan(b""), Ok(Scan::NeedMore { consumed: 0 }));
    }
}

#[test]
fn scan_stops_inside_a_payload_and_says_how_much_is_left() {
    let frame = peer_frame(Role::Client, true, Opcode::Binary, &[5; 1000]);
    let mut t = tracker(Role::Client);
    assert_eq!(t.scan(&frame[..100]), Ok(Scan::Forward(100)));
    assert!(!t.at_frame_boundary());
    assert_eq!(t.remaining_in_frame(), 1000 - (100 - 4));
    // A read that holds the end of this frame and the start of the next
    // one's header: the run stops before the incomplete header.
    let next = peer_frame(Role::Client, true, Opcode::Binary, b"xyz");
    let input = [&frame[100..], &next[..1]].concat();
    assert_eq!(t.scan(&input), Ok(Scan::Forward(frame.len() - 100)));
    assert!(t.at_frame_boundary());
    assert_eq!(t.scan(&next[..1]), Ok(Scan::NeedMore { consumed: 1 }));
    let Ok(Scan::Header { consumed: 1, raw }) = t.scan(&next[1..]) else {
        panic!("expected the held header");
    };
    assert_eq!(raw.as_bytes(), &next[..2]);
    assert_eq!(t.scan(&next[2..]), Ok(Scan::Forward(3)));
    // A whole header in the input joins the run.
    let mut t = tracker(Role::Client);
    assert_eq!(t.scan(&next[..3]), Ok(Scan::Forward(3)));
    assert_eq!(t.remaining_in_frame(), 2);
}

#[test]
fn a_header_split_across_reads_is_handed_back_whole() {
    for role in [Role::Server, Role::Client] {
        let frame = peer_frame(role, true, Opcode::Binary, &[9; 200]);
        let header_len = if role == Role::Server { 8 } else { 4 };
        let mut t = tracker(role);
        for i in 0..header_len - 1 {
            assert_eq!(
                t.scan(&frame[i..=i]),
                Ok(Scan::NeedMore { consumed: 1 }),
                "{role:?} byte {i}"
            );
            assert!(t.at_frame_boundary() && !t.is_idle());
        }
        let Ok(Scan::Header { consumed, raw }) = t.scan(&frame[header_len - 1..]) else {
            panic!("expected the held header");
        };
        assert_eq!((consumed, raw.as_bytes()), (1, &frame[..header_len]));
        assert_eq!(t.scan(&frame[header_len..]), Ok(Scan::Forward(200)));
        assert!(t.is_idle());
    }
}

#[test]
fn step_reports_starts_payloads_and_ends() {
    let frame = peer_frame(Role::Server, false, Opcode::Text, b"hello");
    let mut t = tracker(Role::Server);
    let Ok(Step::DataStart {
        consumed,
        header,
        raw,
        split,
    }) = t.step(&frame)
    else {
        panic!("expected a frame start");
    };
    assert_eq!(
        header,
        FrameHeader {
            fin: false,
            opcode: Opcode::Text,
            mask: Some(MASK),
            payload_len: 5
        }
    );
    assert_eq!((consumed, raw.as_bytes(), split), (6, &frame[..6], false));
    assert_eq!(format!("{raw:?}"), "RawHeader([01, 85, 37, fa, 21, 3d])");
    assert_eq!(
        t.step(&frame[6..8]),
        Ok(Step::Payload {
            len: 2,
            frame_end: false
        })
    );
    assert_eq!(t.remaining_in_frame(), 3);
    assert_eq!(t.step(b""), Ok(Step::NeedMore { consumed: 0 }));
    assert_eq!(
        t.step(&frame[8..]),
        Ok(Step::Payload {
            len: 3,
            frame_end: true
        })
    );
    // The payload was not unmasked: the forwarded bytes are the input's.
    assert!(t.at_frame_boundary() && t.message_open() && !t.is_idle());
    let end = peer_frame(Role::Server, true, Opcode::Continuation, b"");
    assert!(matches!(
        t.step(&end),
        Ok(Step::DataStart {
            consumed: 6,
            header: FrameHeader {
                fin: true,
                payload_len: 0,
                ..
            },
            ..
        })
    ));
    assert!(t.is_idle());
}

#[test]
fn control_payloads_are_unmasked_and_close_ends_the_stream() {
    let mut close_payload = 4000u16.to_be_bytes().to_vec();
    close_payload.extend_from_slice(b"bye");
    for role in [Role::Server, Role::Client] {
        let ping = peer_frame(role, true, Opcode::Ping, &[0x55; 125]);
        let close = peer_frame(role, true, Opcode::Close, &close_payload);
        let after = peer_frame(role, true, Opcode::Binary, b"ignored");
        let wire = [&ping[..], &close, &after, b"\xff\xff"].concat();
        let mut t = tracker(role);
        // A control frame split across reads: held, then handed over.
        assert_eq!(t.step(&wire[..50]), Ok(Step::NeedMore { consumed: 50 }));
        assert!(t.at_frame_boundary());
        assert_eq!(
            t.step(&wire[50..]),
            Ok(Step::Control {
                consumed: ping.len() - 50,
                event: Event::Ping(cp(&[0x55; 125]))
            })
        );
        let rest = &wire[ping.len()..];
        assert_eq!(
            t.scan(rest),
            Ok(Scan::Control {
                consumed: close.len(),
                event: Event::Close {
                    code: Some(4000),
                    reason: cp(b"bye")
                }
            })
        );
        assert!(t.close_received());
        let rest = &rest[close.len()..];
        assert_eq!(
            t.scan(rest),
            Ok(Scan::AfterClose {
                consumed: rest.len()
            })
        );
    }
}

#[test]
fn errors_blame_the_peer_with_its_close_code() {
    let limits = DecoderLimits {
        max_frame_bytes: 100,
    };
    let mask = |role: Role| role.peer_masks().then_some(MASK);
    for role in [Role::Server, Role::Client] {
        let wrong_mask = if role == Role::Server {
            None
        } else {
            Some(MASK)
        };
        let cases: Vec<(Vec<u8>, Fault)> = vec![
            (
                raw_frame(0x82, wrong_mask, Form::Min, 1, b"x"),
                if role == Role::Server {
                    Fault::UnmaskedFrame
                } else {
                    Fault::MaskedFrame
                },
            ),
            (
                raw_frame(0xA2, mask(role), Form::Min, 0, b""),
                Fault::ReservedBits(2),
            ),
            (
                raw_frame(0x8B, mask(role), Form::Min, 0, b""),
                Fault::ReservedOpcode(0xB),
            ),
            (
                raw_frame(0x0A, mask(role), Form::Min, 0, b""),
                Fault::FragmentedControl(Opcode::Pong),
            ),
            (
                raw_frame(0x89, mask(role), Form::L16, 126, b""),
                Fault::ControlTooLong(126),
            ),
            (
                peer_frame(role, true, Opcode::Continuation, b""),
                Fault::UnexpectedContinuation,
            ),
            (
                [
                    peer_frame(role, false, Opcode::Text, b"a"),
                    peer_frame(role, true, Opcode::Ping, b""),
                    peer_frame(role, true, Opcode::Binary, b"b"),
                ]
                .concat(),
                Fault::ExpectedContinuation,
            ),
            (
                raw_frame(0x82, mask(role), Form::L64, u64::MAX, b""),
                Fault::LengthMsbSet,
            ),
            (
                raw_frame(0x82, mask(role), Form::L16, 101, b""),
                Fault::FrameTooBig { len: 101, max: 100 },
            ),
            (
                peer_frame(role, true, Opcode::Close, &[3]),
                Fault::BadClosePayload,
            ),
            (
                peer_frame(role, true, Opcode::Close, &1006u16.to_be_bytes()),
                Fault::InvalidCloseCode(1006),
            ),
            (
                peer_frame(role, true, Opcode::Close, &[0x03, 0xE8, 0xFF]),
                Fault::InvalidCloseReason,
            ),
        ];
        for (wire, fault) in cases {
            let expected = WsError::from_fault(role, fault);
            for use_scan in [false, true] {
                let mut t = FrameTracker::new(role, limits);
                let run = if use_scan {
                    scan_chunks(&mut t, &[&wire], None)
                } else {
                    let chunks: Vec<&[u8]> = wire.chunks(1).collect();
                    step_chunks(&mut t, &chunks, None)
                };
                assert_eq!(run.error, Some(expected), "{role:?} {fault:?}");
                assert_eq!(expected.side(), role.peer());
                assert_eq!(t.step(b""), Err(expected), "poisoned");
                assert!(!t.is_idle());
            }
        }
    }
}

#[test]
fn valid_frames_before_an_error_are_forwarded_first() {
    let good = peer_frame(Role::Client, true, Opcode::Binary, b"good");
    let bad = raw_frame(0x82 | 0x10, None, Form::Min, 0, b"");
    let wire = [&good[..], &bad].concat();
    let mut t = tracker(Role::Client);
    assert_eq!(t.scan(&wire), Ok(Scan::Forward(good.len())));
    // The forwarded stream ends on a boundary: the relay may close now.
    assert!(t.at_frame_boundary());
    let e = WsError::Backend(Fault::ReservedBits(1));
    assert_eq!(t.scan(&bad), Err(e));
    assert_eq!(t.scan(&bad), Err(e));
    assert_eq!((e.close_code(), e.kind()), (1002, "reserved_bits"));
}

#[test]
fn max_frame_bytes_applies_to_data_frames_only() {
    let limits = DecoderLimits { max_frame_bytes: 3 };
    let mut t = FrameTracker::new(Role::Server, limits);
    let ok = peer_frame(Role::Server, true, Opcode::Binary, b"abc");
    let ping = peer_frame(Role::Server, true, Opcode::Ping, &[1; 125]);
    assert_eq!(t.scan(&ok), Ok(Scan::Forward(ok.len())));
    assert!(matches!(t.scan(&ping), Ok(Scan::Control { .. })));
    let big = peer_frame(Role::Server, true, Opcode::Binary, b"abcd");
    let e = t.scan(&big).unwrap_err();
    assert_eq!(e, WsError::FrameTooBig { len: 4, max: 3 });
    assert_eq!((e.close_code(), e.side()), (1009, Side::Browser));
}

// ---- properties ----

fn roles() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Server), Just(Role::Client)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary interleavings of data and control frames, split at
    /// arbitrary bytes, come out whole and in order through `scan`: the
    /// forwarded bytes are exactly the data frames' wire bytes, each
    /// control event comes between the right frames, and the tracker's
    /// boundary matches the stream's after every result.
    #[test]
    fn prop_scan_streams_come_out_whole_and_in_order(
        role in roles(),
        msgs in prop::collection::vec(msg_spec(), 0..6),
        close in close_spec(),
        seed in any::<u64>(),
        points in prop::collection::vec(any::<Index>(), 0..16),
    ) {
        let stream = build_role_stream(role, &msgs, close.clone(), seed, false);
        let mut t = tracker(role);
        let run = scan_chunks(&mut t, &split(&stream.wire, &points), Some(&data_boundaries(&stream)));
        prop_assert_eq!(run.error, None);
        prop_assert!(run.out == expected(&stream), "output differs");
        prop_assert_eq!(t.close_received(), close.is_some());
        let end = stream.items.last().map_or(0, |item| match item {
            Item::Data(r) | Item::Control(r, _) => r.end,
        });
        prop_assert_eq!(run.after_close, stream.wire.len() - end);
        prop_assert!(close.is_some() || t.is_idle());
    }

    /// The same through `step`, one event at a time, with every data
    /// frame's start checked against its header and every start ended.
    #[test]
    fn prop_step_streams_come_out_whole_and_in_order(
        role in roles(),
        msgs in prop::collection::vec(msg_spec(), 0..5),
        close in close_spec(),
        seed in any::<u64>(),
        points in prop::collection::vec(any::<Index>(), 0..16),
    ) {
        let stream = build_role_stream(role, &msgs, close, seed, false);
        let frames: Vec<&[u8]> = stream
            .items
            .iter()
            .filter_map(|item| match item {
                Item::Data(r) => Some(&stream.wire[r.clone()]),
                Item::Control(..) => None,
            })
            .collect();
        let mut t = tracker(role);
        let run = step_chunks(&mut t, &split(&stream.wire, &points), Some(&frames));
        prop_assert_eq!(run.error, None);
        prop_assert!(run.out == expected(&stream), "output differs");
    }

    /// Byte at a time gives the same as one read.
    #[test]
    fn prop_byte_at_a_time_equals_one_read(
        role in roles(),
        msgs in prop::collection::vec(msg_spec(), 0..3),
        close in close_spec(),
        seed in any::<u64>(),
    ) {
        let stream = build_role_stream(role, &msgs, close, seed, false);
        let boundaries = data_boundaries(&stream);
        let one = scan_chunks(&mut tracker(role), &[&stream.wire], Some(&boundaries));
        let chunks: Vec<&[u8]> = stream.wire.chunks(1).collect();
        let bytewise = scan_chunks(&mut tracker(role), &chunks, Some(&boundaries));
        prop_assert!(one.out == bytewise.out);
        prop_assert!(one.out == expected(&stream));
    }

    /// On any input, the tracker agrees with the decoder of the same role:
    /// both accept, or both refuse with the same error — except that the
    /// tracker does not read data payloads, so a text message's bad UTF-8
    /// is the decoder's alone. Never panics.
    #[test]
    fn prop_tracker_agrees_with_the_decoder(
        role in roles(),
        msgs in prop::collection::vec(msg_spec(), 0..3),
        seed in any::<u64>(),
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 0..4),
        noise in prop::collection::vec(any::<u8>(), 0..64),
        max_frame in prop_oneof![Just(1u64 << 20), 0u64..300],
        points in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        let mut wire = build_role_stream(role, &msgs, None, seed, false).wire;
        wire.extend_from_slice(&noise);
        for (i, x) in flips {
            if !wire.is_empty() {
                let at = i.index(wire.len());
                wire[at] ^= x;
            }
        }
        let limits = DecoderLimits { max_frame_bytes: max_frame };
        let chunks = split(&wire, &points);
        let tracked = scan_chunks(&mut FrameTracker::new(role, limits), &chunks, None);
        let mut decoder = Decoder::with_role(role, PayloadMode::Raw, limits);
        let mut sink = vec![0u8; wire.len()];
        let mut decoded = None;
        let mut at = 0;
        while at < wire.len() {
            match decoder.decode(&wire[at..], &mut sink) {
                Ok(p) => at += p.consumed,
                Err(e) => {
                    decoded = Some(e);
                    break;
                }
            }
        }
        match decoded {
            Some(e) if e.fault() == Some(Fault::InvalidUtf8) => {}
            _ => prop_assert_eq!(tracked.error, decoded),
        }
    }
}
