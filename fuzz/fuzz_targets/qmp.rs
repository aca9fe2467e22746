//! Fuzzes the QMP reader (`hypervisor::qemu::qmp`): the line framing of
//! QEMU's byte stream with its size bound (`LineFramer`, what the client's
//! reader runs on every read), then each line as the connection task reads
//! it: `parse_line` (JSON, blank lines skipped), the greeting check
//! (`is_greeting`), `classify` (event, answer by id, ignored) and
//! `parse_answer` (`return` / `error`).
//!
//! Checks, besides "no panic, no hang":
//! - the lines are exactly the stream split at newlines (a reference
//!   split), each at most `max_line_bytes`; the framer fails exactly when
//!   a line (or the unfinished last one) is longer, and then ends;
//! - bounded: after the framer asks for more, it holds at most
//!   `max_line_bytes`; so one read later, at most that plus the read;
//! - chunking-independent: the same lines and error however the stream
//!   is cut into reads;
//! - an event has its name and data (`null` when absent); an answer's id
//!   is the message's; `parse_answer` returns exactly the `return` value,
//!   or a command error with the error's class and description.
//!
//! Input layout: 1 byte choosing `max_line_bytes`, 8 read sizes (0xFF:
//! the rest), then the bytes QEMU sends.
#![no_main]

use consolegate::hypervisor::qemu::qmp::{
    classify, is_greeting, parse_answer, parse_line, Incoming, LineFramer, QmpError, MAX_LINE_BYTES,
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

const CHUNK_SLOTS: usize = 8;
const CHUNK_REST: u8 = 0xFF;
/// Line limits to try: tiny ones reach the bound, the default does not.
const LINE_LIMITS: [usize; 8] = [0, 1, 2, 16, 64, 256, 4096, MAX_LINE_BYTES];

#[derive(Debug, PartialEq)]
struct Framed {
    lines: Vec<Vec<u8>>,
    error: Option<String>,
}

fuzz_target!(|bytes: &[u8]| {
    let Some((header, stream)) = bytes.split_at_checked(1 + CHUNK_SLOTS) else {
        return;
    };
    let max_line_bytes = LINE_LIMITS[usize::from(header[0] & 7)];
    let chunked = frame(stream, &header[1..], max_line_bytes);
    let whole = frame(stream, &[CHUNK_REST; CHUNK_SLOTS], max_line_bytes);
    assert_eq!(
        chunked, whole,
        "the lines depend on how the stream was read"
    );
    check_against_split(&whole, stream, max_line_bytes);
    for (index, line) in whole.lines.iter().enumerate() {
        read_line(line, index == 0);
    }
});

/// Feeds `stream` as the client's reader does: take lines until the framer
/// asks for more, then push the next read.
fn frame(stream: &[u8], chunks: &[u8], max_line_bytes: usize) -> Framed {
    let mut framer = LineFramer::new(max_line_bytes);
    let mut framed = Framed {
        lines: Vec::new(),
        error: None,
    };
    let mut at = 0;
    let mut read = 0;
    loop {
        match framer.next_line() {
            Ok(Some(line)) => {
                assert!(line.len() <= max_line_bytes, "a line over the limit");
                assert!(!line.contains(&b'\n'));
                framed.lines.push(line);
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                assert!(e.contains("longer than"), "{e}");
                framed.error = Some(e);
                return framed;
            }
        }
        assert!(
            framer.buffered_bytes() <= max_line_bytes,
            "held past the bound"
        );
        if at == stream.len() {
            return framed;
        }
        let len = match chunks[read % CHUNK_SLOTS] {
            CHUNK_REST | 0 => stream.len() - at,
            n => usize::from(n).min(stream.len() - at),
        };
        read += 1;
        framer.push(&stream[at..at + len]);
        at += len;
        assert!(framer.buffered_bytes() <= max_line_bytes + len);
    }
}

/// The lines must be the stream split at newlines, up to the first one
/// over the limit.
fn check_against_split(framed: &Framed, stream: &[u8], max_line_bytes: usize) {
    let mut pieces: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    // The piece after the last newline is unfinished.
    let unfinished = pieces.pop().unwrap_or_default();
    let mut expected = Vec::new();
    let mut too_long = false;
    for piece in pieces {
        if piece.len() > max_line_bytes {
            too_long = true;
            break;
        }
        expected.push(piece.to_vec());
    }
    too_long |= !too_long && unfinished.len() > max_line_bytes;
    assert_eq!(framed.lines, expected, "lines differ from the stream's");
    assert_eq!(framed.error.is_some(), too_long, "the size bound misfired");
}

/// One line as the connection task reads it.
fn read_line(line: &[u8], first: bool) {
    let message = match parse_line(line) {
        Ok(Some(message)) => message,
        Ok(None) => {
            assert!(line.iter().all(u8::is_ascii_whitespace));
            return;
        }
        Err(e) => {
            assert!(e.contains("not JSON"), "{e}");
            return;
        }
    };
    if first {
        assert_eq!(is_greeting(&message), message.get("QMP").is_some());
    }
    match classify(&message) {
        Incoming::Event { name, data } => {
            assert_eq!(message["event"].as_str(), Some(name.as_str()));
            assert_eq!(&data, message.get("data").unwrap_or(&Value::Null));
        }
        Incoming::Answer { id } => {
            assert!(message.get("event").and_then(Value::as_str).is_none());
            assert_eq!(message["id"].as_u64(), Some(id));
            check_answer(message);
        }
        Incoming::Ignored => {
            assert!(message.get("event").and_then(Value::as_str).is_none());
            assert!(message.get("id").and_then(Value::as_u64).is_none());
        }
    }
}

fn check_answer(message: Value) {
    let returned = message.get("return").cloned();
    let error = message.get("error").cloned();
    match (parse_answer("query-status", message), returned) {
        (Ok(value), Some(expected)) => assert_eq!(value, expected),
        (Err(QmpError::Command { class, desc, .. }), None) => {
            let field = |name: &str| {
                error
                    .as_ref()
                    .and_then(|e| e.get(name))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned()
            };
            assert_eq!(class, field("class"));
            if error.is_some() {
                assert_eq!(desc, field("desc"));
            } else {
                assert!(!desc.is_empty(), "an error without a description");
            }
        }
        (answer, returned) => panic!("{answer:?} for a return of {returned:?}"),
    }
}
