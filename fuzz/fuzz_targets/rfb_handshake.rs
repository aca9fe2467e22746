//! Fuzzes the RFB security-handshake terminator (`protocol::rfb::Handshake`),
//! with and without a VNC password, driven by an arbitrary interleaving of
//! backend and browser byte chunks.
//!
//! Checks, besides "no panic": each call consumes at most its input, all of
//! it before the handshake is done and nothing after; an error sticks; the
//! output queues stay within what the protocol and the limits allow; nothing
//! but our own handshake bytes (version, security choice, DES response)
//! reaches the backend before it accepted us; done implies authenticated.
//!
//! Input layout: `flags` (bit 0: password configured; bits 1-3 and 4-6:
//! which `max_reason_bytes` / `max_early_bytes`), `password_len` (mod 13),
//! 12 password bytes, then steps of `side: u8` (bit 0: 0 backend, 1
//! browser), `len: u8`, `len` bytes.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use consolegate::protocol::rfb::{Handshake, RfbLimits, CHALLENGE_LEN};
use libfuzzer_sys::fuzz_target;

/// Limits to try for both `max_reason_bytes` and `max_early_bytes`.
const LIMITS: [usize; 8] = [0, 1, 2, 16, 255, 1024, 4096, 65_536];
/// Steps per input: bounds the work of one run.
const MAX_STEPS: usize = 512;
/// RFB ProtocolVersion message length.
const VERSION_LEN: usize = 12;
/// What we may send a backend before it accepted us: our version, our
/// security type choice, the DES response.
const MAX_PRE_AUTH_TO_BACKEND: usize = VERSION_LEN + 1 + CHALLENGE_LEN;
/// Fixed parts of what a browser can receive besides held bytes and the
/// failure reason: version, security types, result, the failure message's
/// framing and wording (a list of up to 255 offered types included).
const FIXED_TO_BROWSER: usize = 4096;

#[derive(Arbitrary, Debug)]
struct Header {
    flags: u8,
    password_len: u8,
    password: [u8; 12],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Backend,
    Browser,
}

fuzz_target!(|bytes: &[u8]| {
    let mut u = Unstructured::new(bytes);
    let Ok(header) = Header::arbitrary(&mut u) else {
        return;
    };
    let limits = RfbLimits {
        max_reason_bytes: LIMITS[usize::from((header.flags >> 1) & 7)],
        max_early_bytes: LIMITS[usize::from((header.flags >> 4) & 7)],
    };
    let password_len = usize::from(header.password_len) % (header.password.len() + 1);
    let password = (header.flags & 1 != 0).then(|| &header.password[..password_len]);
    let mut run = Run::new(Handshake::new(password, limits), limits);
    for _ in 0..MAX_STEPS {
        let (Ok(side), Ok(len)) = (u.arbitrary::<u8>(), u.arbitrary::<u8>()) else {
            break;
        };
        let len = usize::from(len).min(u.len());
        let Ok(chunk) = u.bytes(len) else {
            break;
        };
        let side = if side & 1 == 0 {
            Side::Backend
        } else {
            Side::Browser
        };
        if !run.step(side, chunk) {
            break;
        }
    }
});

/// One handshake and what it has sent so far.
struct Run {
    handshake: Handshake,
    limits: RfbLimits,
    to_backend: usize,
    to_browser: usize,
}

impl Run {
    fn new(handshake: Handshake, limits: RfbLimits) -> Self {
        let mut run = Run {
            handshake,
            limits,
            to_backend: 0,
            to_browser: 0,
        };
        run.drain();
        run
    }

    /// Feed one chunk; false once the handshake failed (it is not used
    /// again after the error was checked to stick).
    fn step(&mut self, side: Side, chunk: &[u8]) -> bool {
        let was_done = self.handshake.is_done();
        let result = match side {
            Side::Backend => self.handshake.on_backend(chunk),
            Side::Browser => self.handshake.on_browser(chunk),
        };
        self.drain();
        let consumed = match result {
            Ok(n) => n,
            Err(e) => {
                assert!(!was_done, "an error after the handshake was done");
                assert_eq!(self.handshake.on_backend(b"RFB 003.008\n"), Err(e.clone()));
                assert_eq!(self.handshake.on_browser(b"\x01"), Err(e));
                self.drain();
                return false;
            }
        };
        assert!(consumed <= chunk.len(), "consumed past the input");
        if was_done {
            assert_eq!(consumed, 0, "consumed relay bytes after the handshake");
        } else if !self.handshake.is_done() {
            assert_eq!(
                consumed,
                chunk.len(),
                "left bytes before the handshake was done"
            );
        }
        if self.handshake.is_done() {
            assert!(
                self.handshake.backend_authenticated(),
                "done but not authenticated"
            );
        }
        true
    }

    /// Take both output queues and check the totals against their bounds.
    fn drain(&mut self) {
        self.to_backend += self.handshake.take_to_backend().len();
        self.to_browser += self.handshake.take_to_browser().len();
        assert!(!self.handshake.has_output(), "output left after taking it");
        if !self.handshake.backend_authenticated() {
            assert!(
                self.to_backend <= MAX_PRE_AUTH_TO_BACKEND,
                "{} bytes reached an unauthenticated backend",
                self.to_backend
            );
        }
        // Plus ClientInit (1 byte) and the browser's bytes held until then.
        let max_to_backend = MAX_PRE_AUTH_TO_BACKEND + 1 + self.limits.max_early_bytes;
        assert!(
            self.to_backend <= max_to_backend,
            "to_backend grew to {}",
            self.to_backend
        );
        // A reason read from the backend can triple as lossy UTF-8.
        let max_to_browser =
            FIXED_TO_BROWSER + 3 * self.limits.max_reason_bytes + self.limits.max_early_bytes;
        assert!(
            self.to_browser <= max_to_browser,
            "to_browser grew to {}",
            self.to_browser
        );
    }
}
