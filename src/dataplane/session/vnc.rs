//! The VNC relay kind: raw RFB over TCP. Two things set it apart:
//!
//! - the appliance's own RFB security handshake, when the target has a VNC
//!   password (it authenticates to the server itself and offers the browser
//!   security type None; the password never reaches the browser);
//! - the downstream fast paths, for plain-ws binary sessions: splice
//!   (epoll: backend → pipe → browser), bulk receives straight into frame
//!   chunks (io_uring), and zero-copy framing (a read into a fresh chunk
//!   behind room for the frame header). Each keeps the order of frames: a
//!   frame of our own (pong, ping, close) never lands inside a relayed one.

use std::time::Instant;

use super::ctx::WorkerCtx;
use super::relay::RelayPhase;
use super::relay::{Relay, RelayKind};
use super::Session;
use crate::cause::Cause;
use crate::dataplane::buffer::Lent;
use crate::protocol::rfb::{self, RfbError};
use crate::protocol::vmware::ClientFilter;
use crate::protocol::websocket::{self, close_code, Decoder, Opcode, PayloadMode};

/// One downstream frame whose payload the IO layer spliced into a pipe:
/// the first `before` bytes of `to_browser` (the rest of its header) go to
/// the browser first, then the `in_pipe` bytes from the pipe, then whatever
/// was queued after the header (pings, pongs, the close frame): nothing can
/// land inside the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SpliceOut {
    pub(super) before: usize,
    pub(super) in_pipe: usize,
}

pub(super) struct VncRelay {
    /// The browser's frames, decoded: their payload is the RFB stream.
    pub(super) decoder: Decoder,
    /// The RFB security handshake the appliance performs itself when the
    /// target has a VNC password (the browser is offered security None).
    rfb: Option<Box<rfb::Handshake>>,
    /// A spliced frame under way (epoll): its payload waits in the IO
    /// layer's pipe, not in `to_browser`.
    splice: Option<SpliceOut>,
    /// The last backend read brought at least `splice_min_bytes`: bulk
    /// transfer, so the IO layer may try a splice or a bulk receive next.
    bulk_hint: bool,
    /// The pool chunk an io_uring bulk receive is filling (see
    /// [`Session::backend_bulk_buf`]): outside `to_browser`, so frames
    /// queued meanwhile never land in the bytes the kernel writes, nor
    /// inside the frame.
    bulk_in: Option<Lent>,
    /// The last bulk read was short: one more ends bulk mode.
    bulk_short: bool,
    /// The browser is VMware's client (wmks.js): once the RFB handshake
    /// is done its client messages go through a [`ClientFilter`] (a plain
    /// VNC server closes on VMware's message 127).
    vmware_client: bool,
    filter: Option<Box<ClientFilter>>,
    /// The filter's output, reused.
    filtered: Vec<u8>,
}

impl VncRelay {
    pub(super) fn new(
        decoder: Decoder,
        rfb: Option<Box<rfb::Handshake>>,
        vmware_client: bool,
    ) -> Self {
        Self {
            decoder,
            vmware_client,
            filter: None,
            filtered: Vec::new(),
            rfb,
            splice: None,
            bulk_hint: false,
            bulk_in: None,
            bulk_short: false,
        }
    }

    pub(super) fn in_rfb_handshake(&self) -> bool {
        self.rfb.is_some()
    }

    pub(super) fn splice(&self) -> Option<SpliceOut> {
        self.splice
    }

    pub(super) fn bulk_receiving(&self) -> bool {
        self.bulk_in.is_some()
    }

    /// Remember whether a plain backend read of `n` bytes was bulk.
    fn note_read(&mut self, min: usize, n: usize) {
        self.bulk_hint = min > 0 && n >= min;
        self.bulk_short = false;
    }

    /// Only reached once no receive is in flight (the IO layer's rule).
    pub(super) fn release(&mut self, ctx: &mut WorkerCtx) {
        self.splice = None;
        if let Some(lent) = self.bulk_in.take() {
            ctx.pool.give_back(lent);
        }
    }
}

impl Session {
    fn vnc(&self) -> Option<&VncRelay> {
        self.relay().and_then(Relay::vnc)
    }

    fn vnc_mut(&mut self) -> Option<&mut VncRelay> {
        self.relay_mut().and_then(Relay::vnc_mut)
    }

    /// WebSocket frames from the browser: payload to the backend queue (or
    /// to the appliance's own RFB handshake), control frames answered here.
    pub(super) fn vnc_browser_frames(
        &mut self,
        ctx: &mut WorkerCtx,
        mut data: &[u8],
        now: Instant,
    ) {
        while !data.is_empty() {
            let Some(Relay {
                kind: RelayKind::Vnc(v),
                to_backend,
                phase,
                ..
            }) = self.relay_mut()
            else {
                return;
            };
            if v.decoder.close_received() {
                return;
            }
            let discard = matches!(phase, RelayPhase::Closing { .. });
            let via_rfb = !discard && v.in_rfb_handshake();
            let via_filter = !discard && !via_rfb && v.filter.is_some();
            let result = if discard || via_rfb || via_filter {
                // After our close frame, data is read and dropped while we
                // wait for the browser's close; during the RFB handshake the
                // appliance reads the browser's answers itself.
                let mut out = std::mem::take(&mut ctx.decoded);
                let res = v.decoder.decode(data, &mut out);
                ctx.decoded = out;
                res
            } else {
                // Base64 decoding needs room for a whole group (3 bytes) to progress.
                let spare = to_backend.spare(&mut ctx.pool, 64);
                let res = v.decoder.decode(data, spare);
                to_backend.commit(res.as_ref().map_or(0, |p| p.written));
                res
            };
            match result {
                Ok(p) => {
                    data = &data[p.consumed..];
                    if via_rfb && p.written > 0 {
                        let out = std::mem::take(&mut ctx.decoded);
                        self.rfb_browser_input(ctx, &out[..p.written], now);
                        ctx.decoded = out;
                    } else if via_filter && p.written > 0 {
                        let out = std::mem::take(&mut ctx.decoded);
                        self.vmware_client_input(ctx, &out[..p.written], now);
                        ctx.decoded = out;
                    } else if !discard && p.written > 0 {
                        if let Some(r) = self.relay_mut() {
                            r.up_since.get_or_insert(now);
                        }
                        self.bytes_up += p.written as u64;
                        ctx.metrics.bytes_browser_to_backend += p.written as u64;
                    }
                    if let Some(ev) = p.event {
                        self.on_ws_event(ctx, ev, now);
                    }
                    if p.consumed == 0 && p.written == 0 && p.event.is_none() {
                        // No progress possible (cannot happen with a non-empty
                        // output buffer, but never spin).
                        break;
                    }
                }
                Err(e) => {
                    if discard {
                        self.set_close_received();
                    } else {
                        ctx.metrics.count(Cause::from(&e));
                        tracing::info!(session = self.id, error = %e, "protocol error from browser");
                        self.start_close(ctx, e.close_code(), &e.to_string(), now);
                        // The browser broke the protocol: do not wait for its close.
                        self.set_close_received();
                    }
                    break;
                }
            }
        }
        // Release an uncommitted spare chunk.
        if let Some(r) = self.relay_mut() {
            r.to_backend.consume(&mut ctx.pool, 0);
        }
    }

    pub(super) fn splice_out(&self) -> Option<SpliceOut> {
        self.vnc().and_then(VncRelay::splice)
    }

    /// Bytes of a spliced frame still in the pipe (0: the pipe is empty and
    /// may go back to the worker's pool).
    pub fn pipe_bytes(&self) -> usize {
        self.splice_out().map_or(0, |s| s.in_pipe)
    }

    pub(super) fn splice_header_sent(&mut self, n: usize) {
        if let Some(sp) = self.vnc_mut().and_then(|v| v.splice.as_mut()) {
            sp.before = sp.before.saturating_sub(n);
        }
    }

    /// The browser is gone: the IO layer drops a pipe that still holds
    /// bytes with the session.
    pub(super) fn drop_splice(&mut self) {
        if let Some(v) = self.vnc_mut() {
            v.splice = None;
        }
    }

    // ---- the appliance's own RFB handshake -----------------------------------

    /// Our RFB greeting to the browser, when we speak RFB for the backend's
    /// security phase.
    pub(super) fn vnc_greeting(&mut self, ctx: &mut WorkerCtx) {
        let hello = match self.vnc_mut().and_then(|v| v.rfb.as_mut()) {
            Some(h) => h.take_to_browser(),
            None => return,
        };
        self.relay_down(ctx, &hello);
    }

    /// Browser payload during the RFB security phase.
    pub(super) fn rfb_browser_input(&mut self, ctx: &mut WorkerCtx, data: &[u8], now: Instant) {
        let Some(h) = self.vnc_mut().and_then(|v| v.rfb.as_mut()) else {
            return;
        };
        let r = h.on_browser(data);
        if let Some(n) = self.rfb_flush(ctx, r, now) {
            let open = self.relay().is_some_and(|r| r.phase == RelayPhase::Open);
            if n < data.len() && open {
                // Handshake done: the rest is relay data.
                self.vmware_client_input(ctx, &data[n..], now);
            }
        }
    }

    /// Relay bytes from the browser after the RFB handshake: through the
    /// VMware message filter when it is on, else as they are.
    fn vmware_client_input(&mut self, ctx: &mut WorkerCtx, data: &[u8], now: Instant) {
        let Some(Relay {
            kind: RelayKind::Vnc(v),
            to_backend,
            up_since,
            ..
        }) = self.relay_mut()
        else {
            return;
        };
        up_since.get_or_insert(now);
        let n = match v.filter.as_mut() {
            Some(f) => {
                let before = f.stats();
                v.filtered.clear();
                f.feed(data, &mut v.filtered);
                to_backend.push(&mut ctx.pool, &v.filtered);
                let after = f.stats();
                if after.dropped > before.dropped && before.dropped == 0 {
                    tracing::info!(
                        session = self.id,
                        "VMware client messages dropped for a plain VNC server"
                    );
                }
                ctx.metrics.vmware_messages_translated += after.translated - before.translated;
                ctx.metrics.vmware_messages_dropped += after.dropped - before.dropped;
                data.len()
            }
            None => {
                to_backend.push(&mut ctx.pool, data);
                data.len()
            }
        };
        self.bytes_up += n as u64;
        ctx.metrics.bytes_browser_to_backend += n as u64;
    }

    /// Send what the RFB handshake produced both ways, end it when done,
    /// and turn its errors into a close. Returns the bytes it consumed.
    fn rfb_flush(
        &mut self,
        ctx: &mut WorkerCtx,
        r: Result<usize, RfbError>,
        now: Instant,
    ) -> Option<usize> {
        let relay = self.relay_mut()?;
        let admission_id = relay.admission.as_ref().map(|a| a.id);
        let h = relay.vnc_mut()?.rfb.as_mut()?;
        let (to_backend, to_browser, done) =
            (h.take_to_backend(), h.take_to_browser(), h.is_done());
        // Only admissions care (a one-time credential to expire).
        let authenticated = admission_id.filter(|_| h.backend_authenticated());
        if !to_backend.is_empty() {
            relay.to_backend.push(&mut ctx.pool, &to_backend);
        }
        let mode = relay.mode;
        // RFB messages of our own are not relayed payload: not counted.
        self.browser.frame_down(ctx, mode, &to_browser);
        match r {
            Ok(n) => {
                if done {
                    if let Some(id) = authenticated {
                        ctx.report(crate::mailbox::FromWorker::BackendAuthenticated { id });
                    }
                    if let Some(v) = self.vnc_mut() {
                        v.rfb = None;
                        if v.vmware_client {
                            v.filter = Some(Box::new(ClientFilter::new()));
                        }
                    }
                    self.deadline = None;
                    tracing::debug!(session = self.id, "VNC security handshake done");
                }
                Some(n)
            }
            Err(e) => {
                let cause = Cause::from(&e);
                ctx.metrics.count(cause);
                let (code, who) = match e.side() {
                    rfb::Side::Backend => (close_code::INTERNAL_ERROR, "backend"),
                    rfb::Side::Browser => (close_code::PROTOCOL_ERROR, "browser"),
                };
                tracing::warn!(session = self.id, side = who, error = %e, "VNC handshake failed");
                if let Some(v) = self.vnc_mut() {
                    v.rfb = None;
                }
                self.start_close(ctx, code, &e.to_string(), now);
                None
            }
        }
    }

    // ---- backend reads -------------------------------------------------------

    /// Read from the backend now? Never while a spliced frame's payload
    /// waits in the pipe: the pipe is the downstream buffer then, and a full
    /// browser socket must stop the backend (backpressure).
    pub fn want_backend_read(&self, ctx: &WorkerCtx) -> bool {
        let Some(r) = self.relay() else { return false };
        r.phase == RelayPhase::Open
            && r.backend.is_open()
            && r.vnc().is_none_or(|v| v.splice.is_none())
            && self.browser.queued() < ctx.cfg.limits.buffer_bytes
    }

    /// Most bytes to read from the backend in one go (one frame's payload).
    pub fn backend_read_limit(&self, ctx: &WorkerCtx) -> usize {
        let l = &ctx.cfg.limits;
        let room = l.buffer_bytes.saturating_sub(self.browser.queued());
        let room = match self.relay().map(|r| r.mode) {
            Some(PayloadMode::Base64) => room / 4 * 3,
            _ => room,
        };
        room.clamp(1, l.recv_buffer_bytes)
    }

    /// Bytes arrived from the backend.
    pub fn on_backend_data(&mut self, ctx: &mut WorkerCtx, data: &[u8], now: Instant) {
        let min = ctx.cfg.limits.splice_min_bytes;
        let Some(r) = self.relay_mut() else { return };
        if data.is_empty() || r.phase != RelayPhase::Open {
            return;
        }
        r.last_activity = now;
        let Some(v) = r.vnc_mut() else {
            self.webmks_backend_data(ctx, data, now);
            self.settle(ctx, now);
            return;
        };
        v.note_read(min, data.len());
        let data = match v.rfb.as_mut() {
            None => data,
            Some(h) => {
                let res = h.on_backend(data);
                let n = self.rfb_flush(ctx, res, now);
                let open = self.relay().is_some_and(|r| r.phase == RelayPhase::Open);
                match n {
                    Some(n) if n < data.len() && open => &data[n..],
                    _ => {
                        self.settle(ctx, now);
                        return;
                    }
                }
            }
        };
        self.browser.down_since.get_or_insert(now);
        self.relay_down(ctx, data);
        self.settle(ctx, now);
    }

    /// io_uring multishot: backend bytes whose size is set by provided
    /// buffer boundaries as much as by the stream (measured: 64 KiB writes
    /// arrive as 779 + 64757 bytes, the second filling the buffer), relayed
    /// like any; but in bulk mode one short read alone does not end it
    /// (two in a row do, as for bulk receives), or a batch of completions
    /// that ends on a fragment would never switch to bulk receives.
    pub fn on_backend_data_fragment(&mut self, ctx: &mut WorkerCtx, data: &[u8], now: Instant) {
        let (hint, short_before) = self
            .vnc()
            .map_or((false, false), |v| (v.bulk_hint, v.bulk_short));
        self.on_backend_data(ctx, data, now);
        let short = data.len() < ctx.cfg.limits.splice_min_bytes;
        let open = self.relay().is_some_and(|r| r.phase == RelayPhase::Open);
        if short && hint && !short_before && open {
            if let Some(v) = self.vnc_mut() {
                v.bulk_hint = true;
                v.bulk_short = true;
            }
        }
    }

    /// Backend bytes go to the browser as is, in binary frames: plain ws
    /// (no TLS), binary or no subprotocol (not base64), no RFB handshake of
    /// our own under way.
    fn raw_frames(&self) -> bool {
        self.browser.tls.is_none()
            && self.relay().is_some_and(|r| {
                r.mode == PayloadMode::Raw && r.vnc().is_some_and(|v| !v.in_rfb_handshake())
            })
    }

    /// Bulk downstream: a raw-frames session wanting backend bytes whose
    /// last backend read brought at least `splice_min_bytes` (the hint; 0
    /// turns it off).
    fn bulk_downstream(&self, ctx: &WorkerCtx) -> bool {
        self.vnc().is_some_and(|v| v.bulk_hint)
            && ctx.cfg.limits.splice_min_bytes > 0
            && self.raw_frames()
            && self.want_backend_read(ctx)
    }

    // ---- splice (epoll) --------------------------------------------------------

    /// Splicing (epoll): how many backend bytes may be moved into a pipe
    /// now, or None when this session must take the copying path: a
    /// bulk-downstream session with nothing queued for the browser (the
    /// frame header goes first, then the pipe). Follow with
    /// [`Session::splice_in_done`].
    pub fn splice_in_limit(&self, ctx: &WorkerCtx) -> Option<usize> {
        let l = &ctx.cfg.limits;
        if !self.bulk_downstream(ctx) || self.browser.queued() > 0 {
            return None;
        }
        Some(l.buffer_bytes.min(l.splice_pipe_bytes).max(1))
    }

    /// `n` backend bytes now wait in the pipe: queue the header of a binary
    /// frame of exactly `n` bytes (server frames are unmasked); the pipe's
    /// bytes follow it. A splice that brought less than `splice_min_bytes`
    /// sends the session back to plain reads.
    pub fn splice_in_done(&mut self, ctx: &mut WorkerCtx, n: usize, now: Instant) {
        let min = ctx.cfg.limits.splice_min_bytes;
        let Some(r) = self.relay_mut() else { return };
        let Some(v) = r.vnc_mut() else { return };
        v.bulk_hint = min > 0 && n >= min;
        // One spliced frame at a time: `splice_in_limit` says None while one
        // is under way, so the IO layer never splices a second one in.
        debug_assert!(v.splice.is_none(), "a second spliced frame");
        if n == 0 || v.splice.is_some() {
            return;
        }
        r.last_activity = now;
        let mut hdr = [0u8; websocket::MAX_SERVER_HEADER_LEN];
        let hl = websocket::write_server_header(&mut hdr, true, Opcode::Binary, n as u64);
        self.browser.to_browser.push(&mut ctx.pool, &hdr[..hl]);
        // Whatever was queued before goes first too (nothing, when the IO
        // layer asked `splice_in_limit`).
        let before = self.browser.queued();
        if let Some(v) = self.vnc_mut() {
            v.splice = Some(SpliceOut { before, in_pipe: n });
        }
        self.browser.down_since.get_or_insert(now);
        self.bytes_down += n as u64;
        self.bytes_spliced += n as u64;
        ctx.metrics.bytes_backend_to_browser += n as u64;
        self.check_invariants(ctx);
    }

    /// Pipe bytes that may be spliced to the browser now: the spliced
    /// frame's payload once its header is out, else 0.
    pub fn splice_out_ready(&self) -> usize {
        match self.splice_out() {
            Some(sp) if sp.before == 0 => sp.in_pipe,
            _ => 0,
        }
    }

    /// `n` pipe bytes went to the browser.
    pub fn splice_out_done(&mut self, ctx: &mut WorkerCtx, n: usize, now: Instant) {
        let Some(v) = self.vnc_mut() else { return };
        let Some(sp) = v.splice.as_mut() else { return };
        sp.in_pipe = sp.in_pipe.saturating_sub(n);
        if sp.in_pipe == 0 {
            v.splice = None;
        }
        let pipe = self.pipe_bytes();
        self.browser.note_drained(ctx, pipe, now);
        self.settle(ctx, now);
    }

    // ---- bulk receive (io_uring) ------------------------------------------------

    /// io_uring: may the next backend read be a bulk receive straight into
    /// a frame chunk ([`Session::backend_bulk_buf`])? The splicing
    /// conditions, except that frames may be queued (the chunk is queued
    /// after them), and no bulk receive is under way already.
    pub fn bulk_recv_wanted(&self, ctx: &WorkerCtx) -> bool {
        self.vnc().is_some_and(|v| v.bulk_in.is_none()) && self.bulk_downstream(ctx)
    }

    /// io_uring bulk receive: lend a pool chunk, kept by the session until
    /// [`Session::backend_bulk_done`], and return the room after its header
    /// space, at most one read's worth (`backend_read_limit`, so the
    /// `buffer_bytes` bound holds). The bytes stay put while lent, so the
    /// kernel may write them asynchronously. None unless
    /// [`Session::bulk_recv_wanted`].
    pub fn backend_bulk_buf(&mut self, ctx: &mut WorkerCtx) -> Option<&mut [u8]> {
        if !self.bulk_recv_wanted(ctx) {
            return None;
        }
        let limit = self.backend_read_limit(ctx);
        let lent = ctx.pool.lend(websocket::MAX_SERVER_HEADER_LEN)?;
        let v = self.vnc_mut()?;
        let room = v.bulk_in.insert(lent).room();
        let n = room.len().min(limit);
        Some(&mut room[..n])
    }

    /// The bulk receive into [`Session::backend_bulk_buf`] completed with
    /// `n` bytes: queue them as one binary frame after whatever is queued
    /// (the header goes into the chunk's headroom, the payload does not
    /// move), and count them. `n == 0` (nothing came: no data yet, EOF,
    /// error, teardown) returns the chunk and leaves the hint alone. Two
    /// short reads in a row (under `splice_min_bytes`) end bulk mode: one
    /// alone is often the first segment of a bulk write that woke the
    /// poll, and leaving bulk mode costs a multishot episode (measured:
    /// ~12 copied 64 KiB reads before its cancel lands). Bytes arriving
    /// after the relay ended are dropped, as
    /// [`Session::on_backend_data`] does.
    pub fn backend_bulk_done(&mut self, ctx: &mut WorkerCtx, n: usize, now: Instant) {
        let min = ctx.cfg.limits.splice_min_bytes;
        // A finished session's chunk is still its own until released.
        let lent = match &mut self.stage {
            super::Stage::Relay(r) | super::Stage::Done(Some(r)) => {
                r.vnc_mut().and_then(|v| v.bulk_in.take())
            }
            _ => None,
        };
        let Some(lent) = lent else { return };
        let open = self.relay().is_some_and(|r| r.phase == RelayPhase::Open);
        if n == 0 || !open {
            ctx.pool.give_back(lent);
            self.check_invariants(ctx);
            return;
        }
        let mut hdr = [0u8; websocket::MAX_SERVER_HEADER_LEN];
        let hl = websocket::write_server_header(&mut hdr, true, Opcode::Binary, n as u64);
        self.browser
            .to_browser
            .append_with_header(&mut ctx.pool, lent, &hdr[..hl], n);
        if let Some(r) = self.relay_mut() {
            r.last_activity = now;
            if let Some(v) = r.vnc_mut() {
                let short = n < min;
                if !short || v.bulk_short {
                    v.note_read(min, n);
                }
                v.bulk_short = short;
            }
        }
        self.browser.down_since.get_or_insert(now);
        self.bytes_down += n as u64;
        self.bytes_bulk_recv += n as u64;
        ctx.metrics.bytes_backend_to_browser += n as u64;
        self.check_invariants(ctx);
    }

    // ---- zero-copy framing (epoll) ------------------------------------------------

    /// Zero-copy downstream: when the payload goes out as is (plain ws,
    /// binary, relaying), the IO layer may read backend bytes straight into
    /// a fresh chunk, behind room for the header. Follow with
    /// [`Session::backend_frame_done`].
    pub fn backend_frame_buf(&mut self, ctx: &mut WorkerCtx) -> Option<&mut [u8]> {
        if !self.raw_frames() || !self.want_backend_read(ctx) {
            return None;
        }
        let limit = self.backend_read_limit(ctx);
        self.browser
            .to_browser
            .fresh_with_headroom(&mut ctx.pool, websocket::MAX_SERVER_HEADER_LEN)
            .map(move |b| {
                let n = b.len().min(limit);
                &mut b[..n]
            })
    }

    /// `n` backend bytes were read into [`Session::backend_frame_buf`].
    pub fn backend_frame_done(&mut self, ctx: &mut WorkerCtx, n: usize, now: Instant) {
        let min = ctx.cfg.limits.splice_min_bytes;
        let mut hdr = [0u8; websocket::MAX_SERVER_HEADER_LEN];
        let hl = websocket::write_server_header(&mut hdr, true, Opcode::Binary, n as u64);
        self.browser
            .to_browser
            .commit_with_header(&mut ctx.pool, &hdr[..hl], n);
        if n > 0 {
            if let Some(r) = self.relay_mut() {
                if let Some(v) = r.vnc_mut() {
                    v.note_read(min, n);
                }
                r.last_activity = now;
            }
            self.browser.down_since.get_or_insert(now);
            self.bytes_down += n as u64;
            ctx.metrics.bytes_backend_to_browser += n as u64;
        }
        self.check_invariants(ctx);
    }
}
