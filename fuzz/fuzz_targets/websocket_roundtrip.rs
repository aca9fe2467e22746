//! Round trip through the WebSocket codec: frames built with the crate's own
//! encoders (`encode_client_frame`, `write_server_header`, `ping_frame`,
//! `pong_frame`, `close_frame`) from fuzzer-chosen payloads, fragmented at
//! fuzzer-chosen points and fed in fuzzer-chosen chunks, must decode back to
//! exactly the same data and events, in both payload modes and for every
//! [`Role`] the codec implements (server: masked browser frames; client:
//! unmasked backend frames, errors blamed on the backend); a frame sent in
//! the wrong direction must be
//! refused with that role's error.
//!
//! Input layout: a 21-byte header (`flags`: bit 0 Base64 mode; a 4-byte mask
//! seed; 8 chunk lengths; 8 output sizes), then records of `kind: u8`,
//! `len: u16` (little-endian), `len` payload bytes. See `Record`.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine as _;
use consolegate::protocol::websocket::{
    close_frame, encode_client_frame, is_valid_close_code, ping_frame, pong_frame,
    write_server_header, ControlPayload, DecoderLimits, Event, Fault, Opcode, PayloadMode, WsError,
    MAX_CONTROL_PAYLOAD, MAX_SERVER_HEADER_LEN,
};
use consolegate_fuzz::{drive, Plan, Role, PLAN_SLOTS};
use libfuzzer_sys::fuzz_target;

/// Records per input: bounds the work of one run.
const MAX_RECORDS: usize = 64;
/// Longest close reason `close_frame` keeps (125 minus the 2-byte code).
const MAX_CLOSE_REASON: usize = MAX_CONTROL_PAYLOAD - 2;

#[derive(Arbitrary, Debug)]
struct Header {
    flags: u8,
    mask_seed: [u8; 4],
    chunk_lengths: [u8; PLAN_SLOTS],
    out_sizes: [u8; PLAN_SLOTS],
}

/// What one record asks for (`kind % 8`).
#[derive(Debug, Clone, Copy)]
enum Record {
    /// A data message in one frame from `encode_client_frame`.
    Message,
    /// A data message in one frame from `write_server_header` + payload.
    ServerHeaderMessage,
    /// A text message (Raw mode: the payload made valid UTF-8).
    TextMessage,
    /// A message cut into fragments (cut points and an interleaved ping
    /// taken from the payload's first bytes).
    Fragmented,
    Ping,
    Pong,
    /// Code from the first two bytes, reason from the rest.
    Close,
    /// A ping in the wrong direction: unmasked to a server decoder, masked
    /// to a client decoder.
    WrongDirection,
}

impl Record {
    fn from_kind(kind: u8) -> Self {
        match kind % 8 {
            0 => Record::Message,
            1 => Record::ServerHeaderMessage,
            2 => Record::TextMessage,
            3 => Record::Fragmented,
            4 => Record::Ping,
            5 => Record::Pong,
            6 => Record::Close,
            _ => Record::WrongDirection,
        }
    }
}

/// The wire bytes built so far and what decoding them must give.
struct Script {
    role: Role,
    mode: PayloadMode,
    mask_seed: [u8; 4],
    frames: usize,
    wire: Vec<u8>,
    data: Vec<u8>,
    events: Vec<Event>,
    error: Option<WsError>,
    /// A close or an error ended the stream: later frames are ignored.
    ended: bool,
}

fuzz_target!(|bytes: &[u8]| {
    let mut u = Unstructured::new(bytes);
    let Ok(header) = Header::arbitrary(&mut u) else {
        return;
    };
    let mode = if header.flags & 1 == 0 {
        PayloadMode::Raw
    } else {
        PayloadMode::Base64
    };
    let records = read_records(&mut u);
    let plan = Plan {
        chunk_lengths: header.chunk_lengths,
        out_sizes: header.out_sizes,
    };
    let limits = DecoderLimits {
        max_frame_bytes: u64::MAX >> 1,
    };
    for role in Role::ALL {
        let mut script = Script::new(role, mode, header.mask_seed);
        for (record, payload) in &records {
            script.add(*record, payload);
        }
        let mut decoder = role.decoder(mode, limits);
        let outcome = drive(&mut decoder, mode, &script.wire, &plan);
        assert_eq!(outcome.events, script.events, "events differ");
        assert_eq!(outcome.error, script.error, "errors differ");
        if script.error.is_none() {
            assert_eq!(outcome.data, script.data, "data differs");
        } else {
            // The call that fails drops what it wrote in that call.
            assert!(script.data.starts_with(&outcome.data), "data differs");
        }
        if !script.ended {
            assert!(decoder.is_idle(), "decoder not idle after whole messages");
        }
    }
});

fn read_records<'a>(u: &mut Unstructured<'a>) -> Vec<(Record, &'a [u8])> {
    let mut records = Vec::new();
    while records.len() < MAX_RECORDS {
        let (Ok(kind), Ok(len)) = (u.arbitrary::<u8>(), u.bytes(2)) else {
            break;
        };
        let len = usize::from(u16::from_le_bytes([len[0], len[1]])).min(u.len());
        let Ok(payload) = u.bytes(len) else {
            break;
        };
        records.push((Record::from_kind(kind), payload));
    }
    records
}

impl Script {
    fn new(role: Role, mode: PayloadMode, mask_seed: [u8; 4]) -> Self {
        Script {
            role,
            mode,
            mask_seed,
            frames: 0,
            wire: Vec::new(),
            data: Vec::new(),
            events: Vec::new(),
            error: None,
            ended: false,
        }
    }

    /// A different mask for every frame.
    fn next_mask(&mut self) -> [u8; 4] {
        self.frames += 1;
        let k = self.frames as u8;
        self.mask_seed.map(|b| b.wrapping_mul(31).wrapping_add(k))
    }

    fn add(&mut self, record: Record, payload: &[u8]) {
        match record {
            Record::Message => self.message(payload, false),
            Record::ServerHeaderMessage => self.message(payload, true),
            Record::TextMessage => self.text_message(payload),
            Record::Fragmented => self.fragmented(payload),
            Record::Ping => self.ping_or_pong(payload, true),
            Record::Pong => self.ping_or_pong(payload, false),
            Record::Close => self.close(payload),
            Record::WrongDirection => self.wrong_direction(payload),
        }
    }

    /// Data payload → (opcode, frame payload, expected output). Base64 mode
    /// carries base64 text and outputs the decoded bytes.
    fn encode_data(&self, payload: &[u8], text: bool) -> (Opcode, Vec<u8>, Vec<u8>) {
        match self.mode {
            PayloadMode::Base64 => {
                let b64 = base64::engine::general_purpose::STANDARD.encode(payload);
                (Opcode::Text, b64.into_bytes(), payload.to_vec())
            }
            PayloadMode::Raw if text => {
                let s = String::from_utf8_lossy(payload).into_owned().into_bytes();
                (Opcode::Text, s.clone(), s)
            }
            PayloadMode::Raw => (Opcode::Binary, payload.to_vec(), payload.to_vec()),
        }
    }

    fn message(&mut self, payload: &[u8], with_server_header: bool) {
        let (opcode, body, expected) = self.encode_data(payload, false);
        self.push_data_frame(true, opcode, &body, with_server_header);
        self.expect_data(&expected);
    }

    fn text_message(&mut self, payload: &[u8]) {
        let (opcode, body, expected) = self.encode_data(payload, true);
        self.push_data_frame(true, opcode, &body, false);
        self.expect_data(&expected);
    }

    /// First payload byte: number of cuts (low 3 bits), whether a ping goes
    /// between fragments (bit 3), text (bit 4); the next bytes: where to cut.
    fn fragmented(&mut self, payload: &[u8]) {
        let Some((&shape, rest)) = payload.split_first() else {
            return;
        };
        let cut_count = usize::from(shape & 7).min(rest.len());
        let (cut_bytes, message) = rest.split_at(cut_count);
        let (opcode, body, expected) = self.encode_data(message, shape & 0x10 != 0);
        let mut bounds: Vec<usize> = cut_bytes
            .iter()
            .map(|&c| usize::from(c) * body.len() / 256)
            .collect();
        bounds.sort_unstable();
        bounds.push(body.len());
        let last = bounds.len() - 1;
        let mut start = 0;
        for (index, &end) in bounds.iter().enumerate() {
            let op = if index == 0 {
                opcode
            } else {
                Opcode::Continuation
            };
            self.push_data_frame(index == last, op, &body[start..end], index % 2 == 1);
            if shape & 8 != 0 && index != last {
                // Control frames may come between fragments (RFC 6455 5.4).
                self.ping_or_pong(&body[start..end.min(start + 4)], true);
            }
            start = end;
        }
        self.expect_data(&expected);
    }

    fn ping_or_pong(&mut self, payload: &[u8], ping: bool) {
        let frame = if ping {
            ping_frame(payload)
        } else {
            pong_frame(payload)
        };
        let mask = self.next_mask();
        let wire = self.role.to_wire(frame.as_bytes(), mask);
        self.wire.extend_from_slice(&wire);
        if self.ended {
            return;
        }
        let kept = ControlPayload::new(&payload[..payload.len().min(MAX_CONTROL_PAYLOAD)])
            .expect("at most 125 bytes");
        self.events.push(if ping {
            Event::Ping(kept)
        } else {
            Event::Pong(kept)
        });
    }

    fn close(&mut self, payload: &[u8]) {
        let code = match payload {
            [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
            _ => 1000,
        };
        let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned();
        let frame = close_frame(code, &reason);
        let mask = self.next_mask();
        let wire = self.role.to_wire(frame.as_bytes(), mask);
        self.wire.extend_from_slice(&wire);
        if self.ended {
            return;
        }
        self.ended = true;
        if !is_valid_close_code(code) {
            let fault = Fault::InvalidCloseCode(code);
            self.error = Some(WsError::from_fault(self.role.codec(), fault));
            return;
        }
        // close_frame keeps the longest prefix that fits on a char boundary.
        let mut end = reason.len().min(MAX_CLOSE_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let reason = ControlPayload::new(&reason.as_bytes()[..end]).expect("at most 123 bytes");
        self.events.push(Event::Close {
            code: Some(code),
            reason,
        });
    }

    /// A frame as the other role would send it must be refused.
    fn wrong_direction(&mut self, payload: &[u8]) {
        let frame = ping_frame(payload);
        let mask = self.next_mask();
        let wire = self.role.wrong_direction(frame.as_bytes(), mask);
        self.wire.extend_from_slice(&wire);
        if !self.ended {
            self.ended = true;
            self.error = Some(self.role.refused());
        }
    }

    fn push_data_frame(
        &mut self,
        fin: bool,
        opcode: Opcode,
        body: &[u8],
        with_server_header: bool,
    ) {
        let mask = self.next_mask();
        // A server's frames come only from `write_server_header`.
        if with_server_header || self.role == Role::Client {
            let mut frame = vec![0u8; MAX_SERVER_HEADER_LEN];
            let n = write_server_header(&mut frame, fin, opcode, body.len() as u64);
            frame.truncate(n);
            frame.extend_from_slice(body);
            let wire = self.role.to_wire(&frame, mask);
            self.wire.extend_from_slice(&wire);
        } else {
            encode_client_frame(&mut self.wire, fin, opcode, mask, body);
        }
    }

    fn expect_data(&mut self, expected: &[u8]) {
        if !self.ended {
            self.data.extend_from_slice(expected);
        }
    }
}
