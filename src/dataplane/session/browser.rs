//! The browser leg of a session, whatever its stage: the bytes queued for
//! the browser (`to_browser`), the TLS state when the console port speaks
//! wss (rustls as a state machine: plaintext in, records out), and the
//! latency bookkeeping of the downstream queue.
//!
//! Everything a session sends the browser goes through [`BrowserLeg::push`]
//! (or a framing helper on top of it), so TLS is handled in one place.

use std::io::{self, Read, Write};
use std::time::Instant;

use base64::Engine as _;

use super::ctx::WorkerCtx;
use crate::cause::Cause;
use crate::dataplane::buffer::{BufPool, ByteQueue};
use crate::protocol::websocket::{self, Opcode, PayloadMode};

/// `io::Write` into a ByteQueue (rustls writes its records through it).
struct QueueWriter<'a> {
    q: &'a mut ByteQueue,
    pool: &'a mut BufPool,
}

impl Write for QueueWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.q.push(self.pool, buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Encrypt all of `data` on `conn` into `q`; returns how many bytes could
/// not be sent (0 unless the connection is closing). rustls takes
/// plaintext only while its unsent output is under its buffer limit (64
/// KiB by default) and says so by taking less — a frame larger than that
/// was once cut short here, corrupting the stream — so: write what it
/// takes, move its records into `q`, go on until all is in.
pub(super) fn seal_all<D>(
    conn: &mut rustls::ConnectionCommon<D>,
    mut data: &[u8],
    q: &mut ByteQueue,
    pool: &mut BufPool,
) -> usize {
    while !data.is_empty() {
        let taken = conn.writer().write(data).unwrap_or(0);
        data = &data[taken..];
        flush_sealed(conn, q, pool);
        if taken == 0 {
            // With its output just flushed rustls always takes bytes,
            // unless the connection is closing: the rest cannot be sent.
            return data.len();
        }
    }
    0
}

/// Move the TLS records `conn` has ready into `q`.
pub(super) fn flush_sealed<D>(
    conn: &mut rustls::ConnectionCommon<D>,
    q: &mut ByteQueue,
    pool: &mut BufPool,
) {
    let mut w = QueueWriter { q, pool };
    while conn.wants_write() {
        if conn.write_tls(&mut w).is_err() {
            break;
        }
    }
}

/// What came out of the browser's TLS records.
pub(super) enum TlsInput {
    /// Plaintext handed to the callback; more may follow later.
    Ok,
    /// close_notify: the browser is done sending.
    Closed,
    /// The records were unreadable or the TLS protocol failed; the alert
    /// rustls queued is in `to_browser`.
    Failed(Cause, String),
}

/// The browser leg: its output queue and its TLS.
pub(super) struct BrowserLeg {
    pub(super) tls: Option<Box<rustls::ServerConnection>>,
    pub(super) to_browser: ByteQueue,
    /// Bytes at the front of `to_browser` that an io_uring send holds; they
    /// must stay put until it completes (always 0 on epoll).
    pub(super) inflight: usize,
    /// Since when relayed bytes wait for the browser (latency histogram).
    pub(super) down_since: Option<Instant>,
}

impl BrowserLeg {
    pub(super) fn new() -> Self {
        Self {
            tls: None,
            to_browser: ByteQueue::new(),
            inflight: 0,
            down_since: None,
        }
    }

    pub(super) fn queued(&self) -> usize {
        self.to_browser.len()
    }

    /// Queue plaintext for the browser, through TLS when it is on.
    pub(super) fn push(&mut self, ctx: &mut WorkerCtx, parts: &[&[u8]]) {
        if self.tls.is_some() {
            // One write per frame so rustls makes one record, not two; the
            // assembly buffer is the worker's, reused.
            let mut buf = std::mem::take(&mut ctx.tls_frame);
            buf.clear();
            for p in parts {
                buf.extend_from_slice(p);
            }
            self.write_tls_plaintext(ctx, &buf);
            ctx.tls_frame = buf;
            return;
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        // Keep a frame in one chunk when it fits, so one send carries it.
        let spare = self.to_browser.spare(&mut ctx.pool, total);
        if spare.len() >= total {
            let mut at = 0;
            for p in parts {
                spare[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            self.to_browser.commit(total);
        } else {
            self.to_browser.commit(0);
            for p in parts {
                self.to_browser.push(&mut ctx.pool, p);
            }
        }
    }

    /// Encrypt `data` for the browser, all of it. rustls takes plaintext
    /// only while its unsent output is under its buffer limit (64 KiB by
    /// default) and says so by taking less: a frame larger than that was
    /// once cut short here (the rest silently dropped, the stream corrupt).
    /// So: write what it takes, move its records into `to_browser` (whose
    /// bound the read limits already keep), and go on until all is in.
    fn write_tls_plaintext(&mut self, ctx: &mut WorkerCtx, data: &[u8]) {
        let Some(tls) = self.tls.as_mut() else { return };
        let unsent = seal_all(tls, data, &mut self.to_browser, &mut ctx.pool);
        if unsent > 0 {
            ctx.metrics.count(Cause::TlsWrite);
            tracing::debug!(unsent, "TLS connection takes no more plaintext");
        }
    }

    /// Move the TLS records rustls has ready into `to_browser`.
    pub(super) fn flush_tls(&mut self, ctx: &mut WorkerCtx) {
        if let Some(tls) = self.tls.as_mut() {
            flush_sealed(tls, &mut self.to_browser, &mut ctx.pool);
        }
    }

    /// TLS close_notify after our close frame.
    pub(super) fn close_notify(&mut self, ctx: &mut WorkerCtx) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            self.flush_tls(ctx);
        }
    }

    /// Feed the browser's TLS records in; each run of plaintext goes to
    /// `plain` as it comes out (so a session can react between records).
    pub(super) fn tls_input(
        &mut self,
        ctx: &mut WorkerCtx,
        mut data: &[u8],
        mut plain: impl FnMut(&mut WorkerCtx, &mut Self, &[u8]) -> bool,
    ) -> TlsInput {
        while !data.is_empty() {
            let Some(tls) = self.tls.as_mut() else {
                return TlsInput::Ok;
            };
            match tls.read_tls(&mut data) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return TlsInput::Failed(Cause::TlsRead, e.to_string()),
            }
            if let Err(e) = tls.process_new_packets() {
                // Send the alert rustls queued, then close.
                self.flush_tls(ctx);
                return TlsInput::Failed(Cause::TlsError, e.to_string());
            }
            match self.drain_plaintext(ctx, &mut plain) {
                TlsInput::Ok => {}
                other => return other,
            }
        }
        self.flush_tls(ctx);
        TlsInput::Ok
    }

    /// Hand every plaintext byte rustls decrypted to `plain`; stops early
    /// when `plain` says the session no longer takes input.
    fn drain_plaintext(
        &mut self,
        ctx: &mut WorkerCtx,
        plain: &mut impl FnMut(&mut WorkerCtx, &mut Self, &[u8]) -> bool,
    ) -> TlsInput {
        loop {
            let Some(tls) = self.tls.as_mut() else {
                return TlsInput::Ok;
            };
            let mut scratch = std::mem::take(&mut ctx.tls_plain);
            let r = tls.reader().read(&mut scratch);
            let outcome = match r {
                Ok(0) => Some(TlsInput::Closed),
                Ok(n) => {
                    let go_on = plain(ctx, self, &scratch[..n]);
                    (!go_on).then_some(TlsInput::Ok)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(TlsInput::Ok),
                Err(e) => Some(TlsInput::Failed(Cause::TlsError, e.to_string())),
            };
            ctx.tls_plain = scratch;
            if let Some(o) = outcome {
                return o;
            }
        }
    }

    /// Frame `payload` and queue it.
    pub(super) fn send_frame(&mut self, ctx: &mut WorkerCtx, op: Opcode, payload: &[u8]) {
        let mut hdr = [0u8; websocket::MAX_SERVER_HEADER_LEN];
        let n = websocket::write_server_header(&mut hdr, true, op, payload.len() as u64);
        self.push(ctx, &[&hdr[..n], payload]);
    }

    /// Frame bytes for the browser (binary, or base64 text), uncounted.
    pub(super) fn frame_down(&mut self, ctx: &mut WorkerCtx, mode: PayloadMode, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        match mode {
            PayloadMode::Raw => self.send_frame(ctx, Opcode::Binary, data),
            PayloadMode::Base64 => {
                // Encode chunk by chunk: each chunk is its own text frame,
                // whole base64 groups, so the browser decodes each frame.
                let step = ctx.scratch.len() / 4 * 3;
                for part in data.chunks(step.max(3)) {
                    let mut scratch = std::mem::take(&mut ctx.scratch);
                    let n = base64::engine::general_purpose::STANDARD
                        .encode_slice(part, &mut scratch)
                        .unwrap_or(0);
                    self.send_frame(ctx, Opcode::Text, &scratch[..n]);
                    ctx.scratch = scratch;
                }
            }
        }
    }

    /// `n` bytes at the front were written.
    pub(super) fn sent(&mut self, ctx: &mut WorkerCtx, n: usize) {
        self.inflight = 0;
        self.to_browser.consume(&mut ctx.pool, n);
    }

    /// Downstream fully written (nothing else waiting, `pending_elsewhere`
    /// bytes in a pipe): record how long its bytes waited.
    pub(super) fn note_drained(
        &mut self,
        ctx: &mut WorkerCtx,
        pending_elsewhere: usize,
        now: Instant,
    ) {
        if self.to_browser.is_empty() && pending_elsewhere == 0 {
            if let Some(t) = self.down_since.take() {
                ctx.metrics
                    .relay_down_us
                    .record(now.saturating_duration_since(t).as_micros() as u64);
            }
        }
    }

    /// The browser is gone: drop what it will never read (bytes an io_uring
    /// send holds stay until it completes).
    pub(super) fn drop_unsent(&mut self, ctx: &mut WorkerCtx) {
        self.to_browser.truncate_to(&mut ctx.pool, self.inflight);
    }

    pub(super) fn release(&mut self, ctx: &mut WorkerCtx) {
        self.inflight = 0;
        self.to_browser.clear(&mut ctx.pool);
    }
}
