//! Tests of the client role (decoding a backend's unmasked frames, encoding
//! masked ones) and of the error vocabulary shared by both roles.

use super::test_support::*;
use super::*;
use proptest::prelude::*;
use proptest::sample::Index;

fn client_decoder() -> Decoder {
    Decoder::with_role(Role::Client, PayloadMode::Raw, LIMITS)
}

/// A server frame as `write_server_header` + payload produce it.
fn server_frame(fin: bool, op: Opcode, payload: &[u8]) -> Vec<u8> {
    let mut h = [0u8; MAX_SERVER_HEADER_LEN];
    let n = write_server_header(&mut h, fin, op, payload.len() as u64);
    let mut v = h[..n].to_vec();
    v.extend_from_slice(payload);
    v
}

#[derive(Debug, Default)]
struct Decoded {
    data: Vec<u8>,
    events: Vec<Event>,
    error: Option<WsError>,
}

/// Feeds `chunks` in order with a roomy output buffer, re-calling after
/// events; stops at the first error.
fn decode_chunks(dec: &mut Decoder, chunks: &[&[u8]]) -> Decoded {
    let mut out = Decoded::default();
    let mut buf = vec![0u8; chunks.iter().map(|c| c.len()).sum::<usize>().max(8)];
    for chunk in chunks {
        let mut at = 0;
        while at < chunk.len() {
            match dec.decode(&chunk[at..], &mut buf) {
                Ok(p) => {
                    out.data.extend_from_slice(&buf[..p.written]);
                    out.events.extend(p.event);
                    at += p.consumed;
                    assert!(p.consumed > 0 || p.event.is_some(), "no progress");
                }
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            }
        }
    }
    out
}

// ---- decoding a backend's frames ----

#[test]
fn client_role_decodes_unmasked_server_frames() {
    let mut wire = server_frame(false, Opcode::Binary, b"RFB 003.008\n");
    wire.extend(ping_frame(b"hb").as_bytes());
    wire.extend(server_frame(true, Opcode::Continuation, &[7; 300]));
    wire.extend(close_frame(close_code::GOING_AWAY, "host").as_bytes());
    let mut d = client_decoder();
    assert_eq!(d.role(), Role::Client);
    let o = decode_chunks(&mut d, &[&wire]);
    assert_eq!(o.error, None);
    let mut expected = b"RFB 003.008\n".to_vec();
    expected.extend_from_slice(&[7; 300]);
    assert_eq!(o.data, expected);
    assert_eq!(
        o.events,
        [
            Event::Ping(cp(b"hb")),
            Event::Close {
                code: Some(1001),
                reason: cp(b"host")
            }
        ]
    );
    assert!(d.close_received());
}

#[test]
fn client_role_refuses_masked_frames() {
    let mut d = client_decoder();
    // Refused from the first two bytes alone.
    let e = d.decode(&[0x82, 0x85], &mut [0; 8]).unwrap_err();
    assert_eq!(e, WsError::Backend(Fault::MaskedFrame));
    assert_eq!(
        (e.close_code(), e.kind(), e.side()),
        (1002, "masked_frame", Side::Backend)
    );
    assert_eq!(
        e.to_string(),
        "backend sent a masked frame (server frames must not be masked)"
    );
    // Poisoned.
    assert_eq!(
        d.decode(&server_frame(true, Opcode::Binary, b"x"), &mut [0; 8]),
        Err(e)
    );
    // A masked control frame too.
    let mut ping = Vec::new();
    encode_client_frame(&mut ping, true, Opcode::Ping, MASK, b"p");
    assert_eq!(
        client_decoder().decode(&ping, &mut []),
        Err(WsError::Backend(Fault::MaskedFrame))
    );
    // And the server role still refuses unmasked ones, blaming the browser.
    let e = Decoder::new(PayloadMode::Raw, LIMITS)
        .decode(&server_frame(true, Opcode::Binary, b"x"), &mut [0; 8])
        .unwrap_err();
    assert_eq!((e, e.side()), (WsError::UnmaskedFrame, Side::Browser));
}

#[test]
fn client_role_applies_every_other_rule_and_blames_the_backend() {
    let limits = DecoderLimits {
        max_frame_bytes: 10,
    };
    let cases: Vec<(Vec<u8>, Fault)> = vec![
        (
            raw_frame(0x82 | 0x40, None, Form::Min, 0, b""),
            Fault::ReservedBits(4),
        ),
        (
            raw_frame(0x83, None, Form::Min, 0, b""),
            Fault::ReservedOpcode(3),
        ),
        (
            raw_frame(0x09, None, Form::Min, 0, b""),
            Fault::FragmentedControl(Opcode::Ping),
        ),
        (
            raw_frame(0x89, None, Form::L16, 126, &[0; 126]),
            Fault::ControlTooLong(126),
        ),
        (
            server_frame(true, Opcode::Continuation, b"x"),
            Fault::UnexpectedContinuation,
        ),
        (
            [
                server_frame(false, Opcode::Binary, b"a"),
                server_frame(true, Opcode::Text, b"b"),
            ]
            .concat(),
            Fault::ExpectedContinuation,
        ),
        (
            raw_frame(0x82, None, Form::L64, 1 << 63, b""),
            Fault::LengthMsbSet,
        ),
        (
            raw_frame(0x82, None, Form::Min, 11, b""),
            Fault::FrameTooBig { len: 11, max: 10 },
        ),
        (
            server_frame(true, Opcode::Text, &[0xFF]),
            Fault::InvalidUtf8,
        ),
        (
            server_frame(true, Opcode::Close, &[3]),
            Fault::BadClosePayload,
        ),
        (
            server_frame(true, Opcode::Close, &1005u16.to_be_bytes()),
            Fault::InvalidCloseCode(1005),
        ),
        (
            server_frame(true, Opcode::Close, &[0x03, 0xE8, 0xC3]),
            Fault::InvalidCloseReason,
        ),
    ];
    for (wire, fault) in cases {
        let mut d = Decoder::with_role(Role::Client, PayloadMode::Raw, limits);
        let o = decode_chunks(&mut d, &[&wire]);
        let e = o.error.unwrap_or_else(|| panic!("no error for {fault:?}"));
        assert_eq!(e, WsError::Backend(fault));
        assert_eq!(e.close_code(), fault.close_code());
        assert!(e.to_string().starts_with("backend "), "{e}");
        assert!(!d.is_idle());
    }
    // Base64 mode works in the client role too (a websockify-style server).
    let mut d = Decoder::with_role(Role::Client, PayloadMode::Base64, LIMITS);
    let o = decode_chunks(&mut d, &[&server_frame(true, Opcode::Text, b"QUJD")]);
    assert_eq!((o.error, o.data), (None, b"ABC".to_vec()));
    let mut d = Decoder::with_role(Role::Client, PayloadMode::Base64, LIMITS);
    let o = decode_chunks(&mut d, &[&server_frame(true, Opcode::Binary, b"QUJD")]);
    assert_eq!(o.error, Some(WsError::Backend(Fault::BinaryInBase64Mode)));
}

// ---- the error vocabulary ----

const ALL_FAULTS: [Fault; 17] = [
    Fault::UnmaskedFrame,
    Fault::MaskedFrame,
    Fault::ReservedBits(1),
    Fault::ReservedOpcode(3),
    Fault::FragmentedControl(Opcode::Ping),
    Fault::ControlTooLong(126),
    Fault::UnexpectedContinuation,
    Fault::ExpectedContinuation,
    Fault::LengthMsbSet,
    Fault::FrameTooBig { len: 2, max: 1 },
    Fault::InvalidUtf8,
    Fault::InvalidBase64,
    Fault::Base64Truncated,
    Fault::BinaryInBase64Mode,
    Fault::BadClosePayload,
    Fault::InvalidCloseCode(5),
    Fault::InvalidCloseReason,
];

#[test]
fn every_fault_has_both_sides_and_round_trips() {
    let mut kinds: Vec<&str> = ALL_FAULTS.iter().map(Fault::kind).collect();
    kinds.sort_unstable();
    kinds.dedup();
    assert_eq!(kinds.len(), ALL_FAULTS.len(), "kinds are distinct");
    for fault in ALL_FAULTS {
        assert!(
            fault
                .kind()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{}",
            fault.kind()
        );
        for (role, side, prefix) in [
            (Role::Server, Side::Browser, "browser "),
            (Role::Client, Side::Backend, "backend "),
        ] {
            let e = WsError::from_fault(role, fault);
            assert_eq!(e.fault(), Some(fault));
            assert_eq!(e.side(), side);
            assert_eq!(role.peer(), side);
            assert_eq!(e.kind(), fault.kind());
            assert_eq!(e.close_code(), fault.close_code());
            assert_eq!(e.to_string(), format!("{prefix}{fault}"));
        }
    }
    // The browser's errors keep the variants and words they always had.
    assert_eq!(
        WsError::from_fault(Role::Server, Fault::UnmaskedFrame),
        WsError::UnmaskedFrame
    );
    assert_eq!(
        WsError::ReservedBits(4).to_string(),
        "browser set reserved header bits 0b100 without a negotiated extension"
    );
    assert_eq!(
        WsError::FrameTooBig { len: 9, max: 8 }.to_string(),
        "browser sent a 9-byte frame, over the 8-byte limit"
    );
}

#[test]
fn random_failure_is_ours() {
    let e = WsError::RandomUnavailable(getrandom::Error::UNSUPPORTED);
    assert_eq!(
        (e.side(), e.close_code(), e.kind(), e.fault()),
        (Side::Internal, 1011, "random_unavailable", None)
    );
    assert!(e.to_string().contains("random number generator"), "{e}");
    assert_eq!(Side::Internal.as_str(), "internal");
}

// ---- encoding for a server ----

#[test]
fn client_header_lengths_and_bytes() {
    let key = [1, 2, 3, 4];
    for (len, hlen) in [(0u64, 6usize), (125, 6), (126, 8), (65535, 8), (65536, 14)] {
        let mut h = [0xAAu8; MAX_CLIENT_HEADER_LEN];
        assert_eq!(client_header_len(len), hlen);
        assert_eq!(
            write_client_header(&mut h, true, Opcode::Binary, len, key),
            hlen
        );
        assert_eq!(h[0], 0x82);
        assert_eq!(h[1] & MASK_BIT, MASK_BIT);
        assert_eq!(&h[hlen - 4..hlen], key);
    }
    // RFC 6455 5.7: a masked "Hello".
    let mut h = [0u8; MAX_CLIENT_HEADER_LEN];
    let n = write_client_header(&mut h, true, Opcode::Text, 5, [0x37, 0xfa, 0x21, 0x3d]);
    let mut payload = *b"Hello";
    apply_mask(&mut payload, [0x37, 0xfa, 0x21, 0x3d], 0);
    let frame = [&h[..n], &payload[..]].concat();
    assert_eq!(
        frame,
        [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
    );
}

#[test]
fn client_control_frames_decode_on_a_server() {
    let key = [9, 8, 7, 6];
    let frames = [
        client_ping_frame(b"are you there", key),
        client_pong_frame(&[0xAB; 200], key),
        client_close_frame(close_code::NORMAL, &"é".repeat(70), key),
    ];
    assert_eq!(frames[0].as_bytes()[..6], [0x89, 0x80 | 13, 9, 8, 7, 6]);
    assert_eq!(frames[1].as_bytes().len(), 6 + 125);
    let wire: Vec<u8> = frames.iter().flat_map(|f| f.as_bytes().to_vec()).collect();
    let mut server = Decoder::new(PayloadMode::Raw, LIMITS);
    let o = decode_chunks(&mut server, &[&wire]);
    assert_eq!(o.error, None);
    assert_eq!(
        o.events,
        [
            Event::Ping(cp(b"are you there")),
            Event::Pong(cp(&[0xAB; 125])),
            Event::Close {
                code: Some(1000),
                reason: cp("é".repeat(61).as_bytes())
            }
        ]
    );
    // Masking is idempotent, and the server forms are unchanged.
    assert_eq!(
        frames[0].masked([0; 4]).as_bytes(),
        frames[0].as_bytes(),
        "an already masked frame is not masked again"
    );
    assert_eq!(ping_frame(b"x").as_bytes(), [0x89, 1, b'x']);
    // A client frame is refused by a client decoder (wrong direction).
    assert_eq!(
        client_decoder().decode(frames[0].as_bytes(), &mut []),
        Err(WsError::Backend(Fault::MaskedFrame))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Client encoding (fresh keys, header into a buffer, payload masked in
    /// place) decodes on a server to the same messages, however split.
    #[test]
    fn prop_client_encode_server_decode(
        payloads in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..2000), 1..6),
        points in prop::collection::vec(any::<Index>(), 0..10),
    ) {
        let mut keys = MaskKeySource::new();
        let mut wire = Vec::new();
        for p in &payloads {
            let key = keys.next_key().unwrap();
            let mut h = [0u8; MAX_CLIENT_HEADER_LEN];
            let n = write_client_header(&mut h, true, Opcode::Binary, p.len() as u64, key);
            let mut masked = p.clone();
            apply_mask(&mut masked, key, 0);
            wire.extend_from_slice(&h[..n]);
            wire.extend_from_slice(&masked);
        }
        let mut server = Decoder::new(PayloadMode::Raw, LIMITS);
        let o = decode_chunks(&mut server, &split(&wire, &points));
        prop_assert_eq!(o.error, None);
        prop_assert_eq!(o.data, payloads.concat());
        prop_assert!(server.is_idle());
    }

    /// Server encoding decodes on a client to the same messages and events,
    /// with fragmentation and interleaved control frames, however split.
    #[test]
    fn prop_server_streams_decode_on_a_client(
        msgs in prop::collection::vec(msg_spec(), 0..5),
        close in close_spec(),
        seed in any::<u64>(),
        points in prop::collection::vec(any::<Index>(), 0..12),
    ) {
        let s = build_role_stream(Role::Client, &msgs, close.clone(), seed, false);
        let mut d = client_decoder();
        let o = decode_chunks(&mut d, &split(&s.wire, &points));
        prop_assert_eq!(o.error, None);
        prop_assert!(o.data == s.data, "data differs");
        prop_assert_eq!(o.events, s.events);
        prop_assert_eq!(d.close_received(), close.is_some());
    }

    /// Our own server encoders, read back by a client decoder.
    #[test]
    fn prop_write_server_header_round_trips_through_a_client(
        payload in prop::collection::vec(any::<u8>(), 0..70_000),
        points in prop::collection::vec(any::<Index>(), 0..6),
    ) {
        let wire = server_frame(true, Opcode::Binary, &payload);
        let o = decode_chunks(&mut client_decoder(), &split(&wire, &points));
        prop_assert_eq!(o.error, None);
        prop_assert!(o.data == payload);
    }

    /// The client role never panics, whatever the backend sends.
    #[test]
    fn prop_client_role_arbitrary_bytes_never_panic(
        input in prop::collection::vec(any::<u8>(), 0..2000),
        base64_mode in any::<bool>(),
        max_frame in 0u64..5000,
        points in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        let mode = if base64_mode { PayloadMode::Base64 } else { PayloadMode::Raw };
        let limits = DecoderLimits { max_frame_bytes: max_frame };
        let mut d = Decoder::with_role(Role::Client, mode, limits);
        let o = decode_chunks(&mut d, &split(&input, &points));
        if let Some(e) = o.error {
            prop_assert_eq!(e.side(), Side::Backend);
        }
    }
}

// ---- interoperability with an independent implementation (tungstenite) ----

/// An in-memory stream: reads `input`, collects writes.
struct Duplex {
    input: std::io::Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl std::io::Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl std::io::Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn tungstenite_socket(
    role: tungstenite::protocol::Role,
    input: Vec<u8>,
) -> tungstenite::WebSocket<Duplex> {
    let stream = Duplex {
        input: std::io::Cursor::new(input),
        output: Vec::new(),
    };
    tungstenite::WebSocket::from_raw_socket(stream, role, None)
}

#[test]
fn tungstenite_server_reads_our_client_frames() {
    use tungstenite::Message;
    let mut keys = MaskKeySource::new();
    let mut wire = Vec::new();
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
    for (op, body) in [
        (Opcode::Binary, &payload[..]),
        (Opcode::Text, "héllo".as_bytes()),
    ] {
        let key = keys.next_key().unwrap();
        let mut h = [0u8; MAX_CLIENT_HEADER_LEN];
        let n = write_client_header(&mut h, true, op, body.len() as u64, key);
        let mut masked = body.to_vec();
        apply_mask(&mut masked, key, 0);
        wire.extend_from_slice(&h[..n]);
        wire.extend_from_slice(&masked);
    }
    wire.extend(client_ping_frame(b"hb", keys.next_key().unwrap()).as_bytes());
    wire.extend(client_close_frame(4001, "done", keys.next_key().unwrap()).as_bytes());
    let mut server = tungstenite_socket(tungstenite::protocol::Role::Server, wire);
    assert_eq!(server.read().unwrap(), Message::binary(payload));
    assert_eq!(server.read().unwrap(), Message::text("héllo"));
    assert_eq!(server.read().unwrap(), Message::Ping(b"hb".to_vec().into()));
    let Message::Close(Some(close)) = server.read().unwrap() else {
        panic!("expected a close");
    };
    assert_eq!(
        (u16::from(close.code), close.reason.as_str()),
        (4001, "done")
    );
}

#[test]
fn our_client_decoder_and_tracker_read_tungstenite_server_frames() {
    use tungstenite::Message;
    let mut server = tungstenite_socket(tungstenite::protocol::Role::Server, Vec::new());
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    for message in [
        Message::binary(big.clone()),
        Message::Ping(b"p".to_vec().into()),
        Message::text("wmks"),
        Message::Close(None),
    ] {
        server.send(message).unwrap();
    }
    let wire = server.get_ref().output.clone();
    let o = decode_chunks(&mut client_decoder(), &[&wire]);
    assert_eq!(o.error, None);
    assert_eq!(o.data, [&big[..], b"wmks"].concat());
    assert_eq!(
        o.events,
        [
            Event::Ping(cp(b"p")),
            Event::Close {
                code: None,
                reason: cp(b"")
            }
        ]
    );
    // The tracker passes the same frames through unchanged.
    let mut tracker = FrameTracker::new(Role::Client, LIMITS);
    let mut forwarded = Vec::new();
    let mut at = 0;
    while at < wire.len() {
        let scan = tracker.scan(&wire[at..]).unwrap();
        if let Scan::Forward(n) = scan {
            forwarded.extend_from_slice(&wire[at..at + n]);
        }
        at += scan.consumed();
    }
    assert!(tracker.close_received());
    // Forwarded = the wire without the ping (2 + 1 bytes) and close (2).
    let ping_at = wire.len() - 2 - 6 - 3;
    let expected = [&wire[..ping_at], &wire[ping_at + 3..wire.len() - 2]].concat();
    assert_eq!(forwarded, expected);
}

#[test]
fn our_tracker_passes_tungstenite_client_frames_through_masked() {
    use tungstenite::Message;
    let mut client = tungstenite_socket(tungstenite::protocol::Role::Client, Vec::new());
    client.send(Message::binary(vec![1u8; 300])).unwrap();
    client.send(Message::Pong(b"q".to_vec().into())).unwrap();
    let wire = client.get_ref().output.clone();
    let mut tracker = FrameTracker::new(Role::Server, LIMITS);
    let data_len = 2 + 2 + 4 + 300;
    assert_eq!(tracker.scan(&wire), Ok(Scan::Forward(data_len)));
    assert_eq!(
        tracker.scan(&wire[data_len..]),
        Ok(Scan::Control {
            consumed: wire.len() - data_len,
            event: Event::Pong(cp(b"q"))
        })
    );
    // What was forwarded still decodes on a server: the mask was kept.
    let o = decode_chunks(
        &mut Decoder::new(PayloadMode::Raw, LIMITS),
        &[&wire[..data_len]],
    );
    assert_eq!((o.error, o.data), (None, vec![1u8; 300]));
}
