//! Fuzzes `protocol::vmware::ClientFilter`, which follows a wmks.js
//! browser's RFB client messages on the way to a plain VNC server:
//! standard messages pass, VMware's (type 127) are translated into
//! KeyEvents and PointerEvents or dropped, an unknown type turns the rest
//! into a raw pass-through.
//!
//! Checks, besides "no panic, no hang":
//! - bounded: the output is never longer than the input (a translation
//!   only shrinks a message), and at most `MAX_MESSAGE_BYTES` are held
//!   back after any call;
//! - nothing is lost: the bytes neither output nor held back are
//!   accounted for by the VMware messages counted (4 to 65 535 bytes each;
//!   a dropped one gives nothing, a translated one at least 2 bytes less);
//! - chunking-independent: the output, the bytes held back and the
//!   counters are the same when the stream comes in arbitrary chunks
//!   (empty ones included) as in one call;
//! - the output holds only what a plain server understands: filtered
//!   again, it comes out unchanged, with nothing translated or dropped.
//!
//! Input layout: 8 chunk lengths (0xFF: the rest), then the browser's
//! bytes after ClientInit.
#![no_main]

use consolegate::protocol::vmware::{ClientFilter, FilterStats, MAX_MESSAGE_BYTES};
use libfuzzer_sys::fuzz_target;

const CHUNK_SLOTS: usize = 8;
const CHUNK_REST: u8 = 0xFF;
/// Smallest VMware message (type, subtype, u16 length).
const MIN_VMWARE_MESSAGE_BYTES: u64 = 4;
/// Largest VMware message (its u16 length field).
const MAX_VMWARE_MESSAGE_BYTES: u64 = 65_535;

struct Filtered {
    out: Vec<u8>,
    held: usize,
    stats: FilterStats,
}

fn filter(stream: &[u8], chunks: &[u8]) -> Filtered {
    let mut filter = ClientFilter::new();
    let mut out = Vec::new();
    let mut at = 0;
    let mut previous_empty = false;
    for call in 0.. {
        if at == stream.len() && call > 0 {
            break;
        }
        // An empty read now and then, never two in a row.
        let len = match chunks[call % CHUNK_SLOTS] {
            CHUNK_REST => stream.len() - at,
            0 if previous_empty => 1.min(stream.len() - at),
            n => usize::from(n).min(stream.len() - at),
        };
        previous_empty = len == 0;
        let before = out.len();
        filter.feed(&stream[at..at + len], &mut out);
        at += len;
        assert!(
            out.len() - before <= len + MAX_MESSAGE_BYTES,
            "one call wrote too much"
        );
        assert!(out.len() <= at, "more out than in");
        assert!(
            filter.buffered_bytes() <= MAX_MESSAGE_BYTES,
            "held too much"
        );
        assert!(call <= 2 * stream.len() + CHUNK_SLOTS, "no progress");
    }
    Filtered {
        out,
        held: filter.buffered_bytes(),
        stats: filter.stats(),
    }
}

fuzz_target!(|bytes: &[u8]| {
    let Some((chunks, stream)) = bytes.split_at_checked(CHUNK_SLOTS) else {
        return;
    };
    let chunked = filter(stream, chunks);
    let whole = filter(stream, &[CHUNK_REST; CHUNK_SLOTS]);
    assert_eq!(chunked.out, whole.out, "the output depends on the chunking");
    assert_eq!(
        chunked.held, whole.held,
        "what is held depends on the chunking"
    );
    assert_eq!(
        chunked.stats, whole.stats,
        "the counters depend on the chunking"
    );

    // Each VMware message is 4 to 65 535 bytes; a dropped one gives
    // nothing, a translated one at least 2 bytes less (10 → 8, 19 → ≤ 12).
    let stats = whole.stats;
    let missing = (stream.len() - whole.out.len() - whole.held) as u64;
    assert!(
        MIN_VMWARE_MESSAGE_BYTES * stats.dropped + 2 * stats.translated <= missing,
        "{missing} bytes short for {stats:?}"
    );
    assert!(
        missing <= MAX_VMWARE_MESSAGE_BYTES * (stats.dropped + stats.translated),
        "{missing} bytes vanished for {stats:?}"
    );

    let again = filter(&whole.out, &[CHUNK_REST; CHUNK_SLOTS]);
    assert_eq!(
        again.stats,
        FilterStats::default(),
        "the output had VMware messages"
    );
    assert_eq!(
        again.out, whole.out,
        "the output changed when filtered again"
    );
    assert_eq!(again.held, 0, "the output ends in a partial message");
});
