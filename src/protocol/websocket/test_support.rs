//! Test helpers shared by the codec's test modules: hostile-header frame
//! builders, a tiny deterministic generator, and a generator of whole
//! streams (fragmented messages with interleaved control frames, a close)
//! together with what decoding or tracking them must yield, for either
//! role's peer.

use super::*;
use base64::Engine as _;
use proptest::prelude::*;
use proptest::sample::Index;
use std::ops::Range;

pub(super) const LIMITS: DecoderLimits = DecoderLimits {
    max_frame_bytes: 1 << 20,
};
pub(super) const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Length field encodings, to build non-minimal and hostile headers.
#[derive(Debug, Clone, Copy)]
pub(super) enum Form {
    Min,
    L16,
    L64,
}

/// A frame with full control over the header: `b0` verbatim, `declared`
/// length in the given form, optional mask, and `payload` appended.
pub(super) fn raw_frame(
    b0: u8,
    mask: Option<[u8; 4]>,
    form: Form,
    declared: u64,
    payload: &[u8],
) -> Vec<u8> {
    let m = if mask.is_some() { MASK_BIT } else { 0 };
    let mut v = vec![b0];
    match form {
        Form::Min if declared < 126 => v.push(m | declared as u8),
        Form::Min | Form::L16 if declared <= 0xFFFF => {
            v.push(m | 126);
            v.extend_from_slice(&(declared as u16).to_be_bytes());
        }
        _ => {
            v.push(m | 127);
            v.extend_from_slice(&declared.to_be_bytes());
        }
    }
    if let Some(k) = mask {
        v.extend_from_slice(&k);
    }
    let p0 = v.len();
    v.extend_from_slice(payload);
    if let Some(k) = mask {
        apply_mask(&mut v[p0..], k, 0);
    }
    v
}

pub(super) fn cp(b: &[u8]) -> ControlPayload {
    ControlPayload::new(b).unwrap()
}

pub(super) fn b64enc(b: &[u8]) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .encode(b)
        .into_bytes()
}

/// Tiny deterministic generator for masks and length forms.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(super) fn mask(&mut self) -> [u8; 4] {
        (self.next() as u32).to_ne_bytes()
    }
    pub(super) fn form(&mut self) -> Form {
        match self.next() % 8 {
            0 => Form::L16,
            1 => Form::L64,
            _ => Form::Min,
        }
    }
}

/// One data message (with control frames between its fragments).
#[derive(Debug, Clone)]
pub(super) struct MsgSpec {
    pub(super) text: bool,
    pub(super) bytes: Vec<u8>,
    pub(super) cuts: Vec<Index>,
    pub(super) ctrls: Vec<Option<(bool, Vec<u8>)>>,
}

pub(super) fn msg_spec() -> impl Strategy<Value = MsgSpec> {
    (
        any::<bool>(),
        prop_oneof![
            8 => prop::collection::vec(any::<u8>(), 0..300),
            // Straddles the 16/64-bit length boundary (65535/65536).
            // Filled from a seed: a value tree per byte would be slow.
            1 => (65_530usize..65_540, any::<u64>()).prop_map(|(n, seed)| {
                let mut rng = Rng(seed | 1);
                (0..n).map(|_| rng.next() as u8).collect()
            }),
        ],
        any::<String>(),
        prop::collection::vec(any::<Index>(), 0..4),
        prop::collection::vec(
            prop::option::weighted(
                0.3,
                (any::<bool>(), prop::collection::vec(any::<u8>(), 0..=125)),
            ),
            0..5,
        ),
    )
        .prop_map(|(text, bin, s, cuts, ctrls)| MsgSpec {
            text,
            bytes: if text { s.into_bytes() } else { bin },
            cuts,
            ctrls,
        })
}

pub(super) fn close_spec() -> impl Strategy<Value = Option<(u16, String)>> {
    prop::option::of((
        prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999],
        any::<String>(),
    ))
}

/// One frame of a built stream, by its place on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Item {
    /// A data frame (header and payload) at this range.
    Data(Range<usize>),
    /// A control frame at this range, and the event it must give.
    Control(Range<usize>, Event),
}

/// A built stream and what it must decode or track to.
#[derive(Debug, Default)]
pub(super) struct Stream {
    /// The bytes on the wire (with trailing garbage after a close).
    pub(super) wire: Vec<u8>,
    /// The messages' bytes, concatenated (what a decoder outputs).
    pub(super) data: Vec<u8>,
    /// The control events, in order.
    pub(super) events: Vec<Event>,
    /// Every frame in order (not the garbage after a close).
    pub(super) items: Vec<Item>,
}

impl Stream {
    fn push_frame(&mut self, rng: &mut Rng, role: Role, fin: bool, op: Opcode, payload: &[u8]) {
        let b0 = if fin { FIN_BIT } else { 0 } | op.as_u8();
        let form = rng.form();
        let mask = role.peer_masks().then(|| rng.mask());
        let start = self.wire.len();
        self.wire
            .extend(raw_frame(b0, mask, form, payload.len() as u64, payload));
        let range = start..self.wire.len();
        if op.is_control() {
            let event = header::control_event(op, payload).expect("valid control frame");
            self.events.push(event);
            self.items.push(Item::Control(range, event));
        } else {
            self.items.push(Item::Data(range));
        }
    }
}

/// Builds the wire stream the peer of `role` sends for `msgs` (fragmented
/// at their cuts, control frames between fragments), then `close` and some
/// garbage. In base64 mode messages travel base64-encoded as text.
pub(super) fn build_role_stream(
    role: Role,
    msgs: &[MsgSpec],
    close: Option<(u16, String)>,
    seed: u64,
    base64_mode: bool,
) -> Stream {
    let mut rng = Rng(seed | 1);
    let mut stream = Stream::default();
    for m in msgs {
        let payload = if base64_mode {
            b64enc(&m.bytes)
        } else {
            m.bytes.clone()
        };
        stream.data.extend_from_slice(&m.bytes);
        let mut cuts: Vec<usize> = m.cuts.iter().map(|i| i.index(payload.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.push(payload.len());
        let mut start = 0;
        for (n, &end) in cuts.iter().enumerate() {
            let op = match (n, m.text || base64_mode) {
                (0, true) => Opcode::Text,
                (0, false) => Opcode::Binary,
                _ => Opcode::Continuation,
            };
            let fin = n + 1 == cuts.len();
            stream.push_frame(&mut rng, role, fin, op, &payload[start..end]);
            start = end;
            if let Some(Some((ping, p))) = m.ctrls.get(n) {
                let op = if *ping { Opcode::Ping } else { Opcode::Pong };
                stream.push_frame(&mut rng, role, true, op, p);
            }
        }
    }
    if let Some((code, reason)) = close {
        let f = close_frame(code, &reason);
        stream.push_frame(&mut rng, role, true, Opcode::Close, &f.as_bytes()[2..]);
        stream
            .wire
            .extend_from_slice(b"\xff\xfftrailing garbage is ignored");
    }
    stream
}

/// The browser's (server role's) stream: wire, data and events.
pub(super) fn build_stream(
    msgs: &[MsgSpec],
    close: Option<(u16, String)>,
    seed: u64,
    base64_mode: bool,
) -> (Vec<u8>, Vec<u8>, Vec<Event>) {
    let s = build_role_stream(Role::Server, msgs, close, seed, base64_mode);
    (s.wire, s.data, s.events)
}

/// `wire` cut at the given points (sorted; empty pieces allowed).
pub(super) fn split<'a>(wire: &'a [u8], points: &[Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = points.iter().map(|i| i.index(wire.len() + 1)).collect();
    at.sort_unstable();
    at.push(wire.len());
    let mut start = 0;
    at.into_iter()
        .map(|end| {
            let c = &wire[start..end];
            start = end;
            c
        })
        .collect()
}
