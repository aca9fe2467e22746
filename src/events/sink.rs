//! One event subscriber's outgoing side. Whoever has a frame for the
//! subscriber (the bus fanning an event out, the subscriber's connection
//! answering a message) writes it straight to the socket, without waiting,
//! while nothing is queued before it; what the socket does not take at once
//! waits in a bounded queue that the subscriber's connection writes out
//! when the socket is writable again ([`Sink::write_queued`]).
//!
//! Why direct writes: a fan-out that queued each event and woke one task
//! per subscriber spent about 40 % of its CPU in waking, polling and
//! re-framing (perf over `consolegate-bench events`, docs/BENCHMARKS.md
//! "Event fan-out"); a write per subscriber is what remains.
//!
//! Bounded: at most `queue_events` events wait (more are dropped and
//! counted, for the connection's `lagged` notice), and at most
//! [`MAX_OWN_QUEUED_BYTES`] of the connection's own messages (a client
//! that sends but does not read fails the sink).
//!
//! One mutex per sink keeps the order of frames from both writers; both
//! run on the control thread, so it is never contended.
//!
//! Must not depend on `crate::control`, `crate::hypervisor`,
//! `crate::dataplane`, `crate::io` or `crate::plane`.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::protocol::websocket::{write_server_header, Opcode, MAX_SERVER_HEADER_LEN};

/// Most bytes of the connection's own messages (welcome, answers, stats,
/// notices, close) waiting behind a socket that does not take them. Why
/// 64 KiB: an answer is well under 1 KiB and a client gets at most
/// `messages_per_s` of them per second; one that sends and never reads
/// fills this and is dropped rather than held forever.
pub const MAX_OWN_QUEUED_BYTES: usize = 64 * 1024;

/// Where a sink's bytes go: a socket written without waiting.
pub trait Wire: Send + Sync {
    /// Write as much of `bytes` as fits now; `WouldBlock` when nothing does.
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize>;
}

impl Wire for tokio::net::TcpStream {
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        tokio::net::TcpStream::try_write(self, bytes)
    }
}

/// What became of an event offered to a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// The socket took all of it.
    Written,
    /// It waits in the queue (or its rest does).
    Queued,
    /// The queue was full: dropped, and counted for the `lagged` notice.
    Dropped,
    /// The socket failed earlier; the connection is ending.
    Gone,
}

/// Why a sink refused the connection's own message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    #[error("the subscriber's socket failed")]
    Failed,
    #[error("more than {MAX_OWN_QUEUED_BYTES} bytes of answers wait for a subscriber that does not read")]
    Overflow,
}

/// A server→client WebSocket text frame holding `payload`: encoded once,
/// written to every subscriber as is (server frames are not masked).
pub fn text_frame(payload: &[u8]) -> Bytes {
    let mut header = [0u8; MAX_SERVER_HEADER_LEN];
    let len = write_server_header(&mut header, true, Opcode::Text, payload.len() as u64);
    let mut frame = Vec::with_capacity(len + payload.len());
    frame.extend_from_slice(&header[..len]);
    frame.extend_from_slice(payload);
    Bytes::from(frame)
}

struct Pending {
    frame: Bytes,
    /// An event (counted against `queue_events`) or an own message.
    event: bool,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Pending>,
    /// Bytes of the first queued frame already written.
    head_written: usize,
    queued_events: usize,
    queued_own_bytes: usize,
    dropped: u64,
    failed: bool,
}

impl State {
    fn push(&mut self, frame: Bytes, event: bool, written: usize) {
        if self.queue.is_empty() {
            self.head_written = written;
        }
        if event {
            self.queued_events += 1;
        } else {
            self.queued_own_bytes += frame.len();
        }
        self.queue.push_back(Pending { frame, event });
    }

    fn pop(&mut self) {
        if let Some(done) = self.queue.pop_front() {
            if done.event {
                self.queued_events -= 1;
            } else {
                self.queued_own_bytes -= done.frame.len();
            }
        }
        self.head_written = 0;
    }
}

/// One subscriber's outgoing frames (see the module doc).
pub struct Sink {
    wire: Arc<dyn Wire>,
    queue_events: usize,
    state: Mutex<State>,
    /// Told when the queue gains its first frame or the socket fails: the
    /// connection then waits for the socket to be writable.
    wake: Notify,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("Sink")
            .field("queued_events", &state.queued_events)
            .field("queued_own_bytes", &state.queued_own_bytes)
            .field("failed", &state.failed)
            .finish_non_exhaustive()
    }
}

impl Sink {
    pub fn new(wire: Arc<dyn Wire>, queue_events: usize) -> Sink {
        Sink {
            wire,
            queue_events,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Offer an event's frame: written at once when nothing waits before
    /// it, else queued, or dropped when `queue_events` wait already.
    pub fn offer_event(&self, frame: &Bytes) -> Offer {
        let mut state = self.lock();
        if state.failed {
            return Offer::Gone;
        }
        if !state.queue.is_empty() {
            if state.queued_events >= self.queue_events {
                state.dropped += 1;
                return Offer::Dropped;
            }
            state.push(frame.clone(), true, 0);
            return Offer::Queued;
        }
        self.write_or_queue(&mut state, frame, true)
    }

    /// Send one of the connection's own frames, in order behind what waits.
    pub fn send_own(&self, frame: Bytes) -> Result<(), SinkError> {
        let mut state = self.lock();
        if state.failed {
            return Err(SinkError::Failed);
        }
        if !state.queue.is_empty() {
            if state.queued_own_bytes + frame.len() > MAX_OWN_QUEUED_BYTES {
                return Err(SinkError::Overflow);
            }
            state.push(frame, false, 0);
            return Ok(());
        }
        match self.write_or_queue(&mut state, &frame, false) {
            Offer::Gone => Err(SinkError::Failed),
            _ => Ok(()),
        }
    }

    fn write_or_queue(&self, state: &mut State, frame: &Bytes, event: bool) -> Offer {
        let written = match self.wire.try_write(frame) {
            Ok(n) if n == frame.len() => return Offer::Written,
            // A socket that takes nothing without saying it would block
            // is closed.
            Ok(0) if !frame.is_empty() => return self.fail(state),
            Ok(n) => n,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                0
            }
            Err(_) => return self.fail(state),
        };
        state.push(frame.clone(), event, written);
        self.wake.notify_one();
        Offer::Queued
    }

    fn fail(&self, state: &mut State) -> Offer {
        // Nothing queued can be sent any more: let it go.
        *state = State {
            failed: true,
            dropped: state.dropped,
            ..State::default()
        };
        self.wake.notify_one();
        Offer::Gone
    }

    /// Write what waits until the socket would block. Returns the bytes
    /// written and whether the queue is now empty.
    pub fn write_queued(&self) -> Result<(usize, bool), SinkError> {
        let mut state = self.lock();
        let mut total = 0;
        loop {
            if state.failed {
                return Err(SinkError::Failed);
            }
            let Some(front) = state.queue.front() else {
                return Ok((total, true));
            };
            let rest = front.frame.slice(state.head_written..);
            match self.wire.try_write(&rest) {
                Ok(0) if !rest.is_empty() => {
                    self.fail(&mut state);
                }
                Ok(n) => {
                    total += n;
                    state.head_written += n;
                    if n == rest.len() {
                        state.pop();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((total, false)),
                Err(_) => {
                    self.fail(&mut state);
                }
            }
        }
    }

    /// Wait until the queue gains its first frame or the socket fails
    /// (returns at once if that happened since the last wait).
    pub async fn notified(&self) {
        self.wake.notified().await;
    }

    /// Frames wait for the socket.
    pub fn has_queued(&self) -> bool {
        !self.lock().queue.is_empty()
    }

    /// Events waiting for the socket.
    pub fn queued_events(&self) -> usize {
        self.lock().queued_events
    }

    /// Events dropped since the last call (the queue was full).
    pub fn take_dropped(&self) -> u64 {
        std::mem::take(&mut self.lock().dropped)
    }

    /// The socket failed: nothing more can be sent.
    pub fn is_failed(&self) -> bool {
        self.lock().failed
    }
}

/// A wire in memory for tests: takes up to `room` bytes (then would
/// block), or fails when told to.
#[cfg(test)]
pub mod memory {
    use super::*;

    #[derive(Default)]
    struct Inner {
        written: Vec<u8>,
        /// Bytes it still takes; `None`: any.
        room: Option<usize>,
        broken: bool,
    }

    #[derive(Default)]
    pub struct MemoryWire {
        inner: Mutex<Inner>,
    }

    impl MemoryWire {
        pub fn unlimited() -> Arc<MemoryWire> {
            Arc::new(MemoryWire::default())
        }

        pub fn with_room(room: usize) -> Arc<MemoryWire> {
            let wire = MemoryWire::default();
            wire.set_room(Some(room));
            Arc::new(wire)
        }

        fn lock(&self) -> MutexGuard<'_, Inner> {
            self.inner.lock().unwrap_or_else(PoisonError::into_inner)
        }

        pub fn set_room(&self, room: Option<usize>) {
            self.lock().room = room;
        }

        pub fn break_it(&self) {
            self.lock().broken = true;
        }

        /// Everything written so far.
        pub fn bytes(&self) -> Vec<u8> {
            self.lock().written.clone()
        }

        /// The next whole text frame's payload, removed from what was
        /// written (frames this wire got are server frames: unmasked).
        pub fn next_text(&self) -> Option<String> {
            let mut inner = self.lock();
            let (header, len) = parse_server_header(&inner.written)?;
            if inner.written.len() < header + len {
                return None;
            }
            let payload = inner.written[header..header + len].to_vec();
            inner.written.drain(..header + len);
            String::from_utf8(payload).ok()
        }
    }

    fn parse_server_header(bytes: &[u8]) -> Option<(usize, usize)> {
        let short = usize::from(*bytes.get(1)? & 0x7f);
        match short {
            126 => Some((
                4,
                usize::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?])),
            )),
            127 => {
                let len: [u8; 8] = bytes.get(2..10)?.try_into().ok()?;
                Some((10, usize::try_from(u64::from_be_bytes(len)).ok()?))
            }
            n => Some((2, n)),
        }
    }

    impl Wire for MemoryWire {
        fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
            let mut inner = self.lock();
            if inner.broken {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let n = inner.room.map_or(bytes.len(), |room| room.min(bytes.len()));
            if n == 0 && !bytes.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if let Some(room) = &mut inner.room {
                *room -= n;
            }
            inner.written.extend_from_slice(&bytes[..n]);
            Ok(n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemoryWire;
    use super::*;

    fn frame(text: &str) -> Bytes {
        text_frame(text.as_bytes())
    }

    #[test]
    fn frames_are_text_frames_of_the_minimal_length_encoding() {
        assert_eq!(&frame("hi")[..], b"\x81\x02hi");
        let long = "x".repeat(300);
        let f = frame(&long);
        assert_eq!(&f[..4], &[0x81, 126, 1, 44]);
        assert_eq!(f.len(), 304);
        let wire = MemoryWire::unlimited();
        let sink = Sink::new(wire.clone(), 4);
        assert_eq!(sink.offer_event(&f), Offer::Written);
        assert_eq!(wire.next_text().as_deref(), Some(long.as_str()));
    }

    #[test]
    fn a_blocked_socket_queues_then_drops_and_keeps_the_order() {
        // 3 of the first frame's 5 bytes fit, then the socket blocks.
        let wire = MemoryWire::with_room(3);
        // The partly written frame counts among the 3 queued events.
        let sink = Sink::new(wire.clone(), 3);
        assert_eq!(sink.offer_event(&frame("ab0")), Offer::Queued);
        assert_eq!(sink.offer_event(&frame("ab1")), Offer::Queued);
        sink.send_own(frame("own")).unwrap();
        assert_eq!(sink.offer_event(&frame("ab2")), Offer::Queued);
        assert_eq!(sink.offer_event(&frame("ab3")), Offer::Dropped);
        assert_eq!(sink.queued_events(), 3);
        assert_eq!(sink.take_dropped(), 1);
        assert_eq!(sink.take_dropped(), 0);
        assert_eq!(sink.write_queued().unwrap(), (0, false));
        wire.set_room(None);
        assert_eq!(sink.write_queued().unwrap(), (17, true));
        let got: Vec<String> = std::iter::from_fn(|| wire.next_text()).collect();
        assert_eq!(got, ["ab0", "ab1", "own", "ab2"]);
        assert!(!sink.has_queued() && sink.queued_events() == 0);
        assert_eq!(sink.offer_event(&frame("ab4")), Offer::Written);
    }

    #[test]
    fn own_messages_are_bounded_and_a_failed_socket_refuses_everything() {
        let wire = MemoryWire::with_room(0);
        let sink = Sink::new(wire.clone(), 8);
        let big = Bytes::from(vec![0u8; MAX_OWN_QUEUED_BYTES / 2]);
        sink.send_own(big.clone()).unwrap();
        sink.send_own(big.clone()).unwrap();
        assert_eq!(
            sink.send_own(Bytes::from_static(b"x")),
            Err(SinkError::Overflow)
        );
        wire.break_it();
        assert_eq!(sink.write_queued(), Err(SinkError::Failed));
        assert!(sink.is_failed() && !sink.has_queued());
        assert_eq!(sink.offer_event(&frame("e")), Offer::Gone);
        assert_eq!(sink.send_own(frame("o")), Err(SinkError::Failed));
    }

    #[tokio::test]
    async fn the_connection_is_told_when_the_queue_starts_and_when_the_socket_fails() {
        let wire = MemoryWire::with_room(0);
        let sink = Sink::new(wire.clone(), 8);
        assert_eq!(sink.offer_event(&frame("a")), Offer::Queued);
        tokio::time::timeout(std::time::Duration::from_secs(5), sink.notified())
            .await
            .expect("told of the first queued frame");
        wire.break_it();
        assert_eq!(sink.write_queued(), Err(SinkError::Failed));
        tokio::time::timeout(std::time::Duration::from_secs(5), sink.notified())
            .await
            .expect("told of the failure");
    }
}
