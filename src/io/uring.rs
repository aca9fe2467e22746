//! The io_uring backend: one ring per worker, a completion loop written
//! directly on the `io-uring` crate.
//!
//! - Multishot accept on the worker's SO_REUSEPORT listener.
//! - Multishot recv on both legs of every session, with buffers picked by
//!   the kernel from a provided buffer ring: an idle session holds no receive
//!   buffer at all. A buffer is handed back to the ring as soon as its bytes
//!   were given to the session.
//! - Bulk downstream (`Session::bulk_recv_wanted`: a plain binary session
//!   whose last backend read brought at least `splice_min_bytes`), unless
//!   it splices (below): the
//!   multishot recv is cancelled and the backend is read by single-shot
//!   recvs straight into a frame chunk the session lends
//!   (`Session::backend_bulk_buf`), behind room for the frame header, so
//!   the browser send goes from the received bytes without a copy. These
//!   recvs carry MSG_DONTWAIT: they complete at once, with bytes or
//!   EAGAIN, and never wait in the kernel holding the chunk; on EAGAIN a
//!   one-shot poll (which holds nothing) waits for the next bytes. So an
//!   idle session holds no chunk. A short read goes back to multishot.
//! - Splice (`uring_splice`, on by default; the same bulk sessions, while
//!   the worker's [`PipePool`] lends a pipe): instead of bulk recvs, the worker
//!   splices backend → pipe → browser itself with non-blocking `splice(2)`
//!   calls through the session's splice steps, as the epoll backend does,
//!   and waits for readiness with one-shot `POLL_ADD`s (POLLIN on the
//!   backend, POLLOUT on the browser), which hold no buffer. No payload
//!   byte is copied (a bulk recv copies each byte out of the kernel and
//!   back in). `IORING_OP_SPLICE` is not used: the kernel punts every one
//!   to an io-wq thread. See [`splice_pump`].
//! - One send in flight per leg, straight from the session's queue (whose
//!   bytes never move while queued, see `dataplane::buffer`).
//! - Backpressure: when the session stops wanting a leg's bytes, the
//!   multishot recv is cancelled; it is re-armed when the session drains.
//! - Teardown: a finished session's sockets are shut down, which completes
//!   every pending operation; the slot is freed (and the fds closed) only
//!   when no operation of it is in flight, so the kernel never writes to or
//!   reads from memory that was given back.
//!
//! Timers: the loop waits at most one timer tick (`submit_with_args` with a
//! timeout) and scans the sessions each tick.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring, Probe};

use crate::cause::Cause;
use crate::dataplane::session::{Session, WorkerCtx};
use crate::dataplane::turn::{Turn, WorkerIo};
use crate::dataplane::worker::{self, AcceptBackoff, WorkerControl};
use crate::io::splice::{self, Pipe, PipePool};
use crate::mailbox::{Admission, WorkerInbox};
use crate::metrics::WorkerMetrics;

/// `IOU_PBUF_RING_INC` from the kernel's io_uring.h (the crate does not
/// re-export its `sys` constants).
const IOU_PBUF_RING_INC: u16 = 2;

/// Buffer group id of the provided buffer ring (one ring per io_uring).
const BGID: u16 = 0;

// Operation kinds, the low byte of user_data.
const OP_ACCEPT: u64 = 1;
const OP_BROWSER_RECV: u64 = 2;
const OP_BROWSER_SEND: u64 = 3;
const OP_CONNECT: u64 = 4;
const OP_BACKEND_RECV: u64 = 5;
const OP_BACKEND_SEND: u64 = 6;
const OP_CANCEL: u64 = 7;
const OP_WAKE: u64 = 8;
/// Single-shot MSG_DONTWAIT recv into the session's lent frame chunk.
const OP_BACKEND_BULK: u64 = 9;
/// One-shot POLLIN on the backend while in bulk mode with nothing to read.
const OP_BACKEND_POLL: u64 = 10;
/// One-shot POLLOUT on the browser while a spliced frame cannot go out.
const OP_BROWSER_POLL: u64 = 11;
const LISTENER_SLOT: u64 = 0xffff_ffff;
const WAKE_SLOT: u64 = 0xffff_fffe;
/// Dedicated listeners' slots start here (session slots are far below).
const DEDICATED_BASE: u64 = 1 << 40;
/// Splice rounds (backend → pipe, header, pipe → browser) per `sync` of a
/// session before the others get their turn; a session with more to move
/// then waits for a poll, which completes at once when the socket is ready.
const SPLICE_ROUNDS_PER_SYNC: usize = 32;

fn ud(slot: u64, op: u64) -> u64 {
    (slot << 8) | op
}

/// Check that io_uring is usable here with every opcode this backend needs.
/// Docker's default seccomp profile makes `io_uring_setup` fail with EPERM;
/// `kernel.io_uring_disabled` with EPERM or ENOSYS; old kernels lack ops.
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(8)?;
    let mut p = Probe::new();
    ring.submitter().register_probe(&mut p)?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::Recv::CODE, "recv (single-shot)"),
        (opcode::PollAdd::CODE, "poll_add"),
        (opcode::Connect::CODE, "connect"),
        (opcode::AsyncCancel::CODE, "async_cancel"),
    ] {
        if !p.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring lacks the {name} opcode"),
            ));
        }
    }
    // Provided buffer rings arrived in 5.19; multishot recv in 6.0.
    let bufs = ProvidedBufs::new(&ring, 16, 4096)?;
    bufs.unregister(&ring);
    Ok(())
}

/// A provided buffer ring: `entries` buffers of `buf_bytes`, both regions
/// mapped anonymously (page aligned, as the kernel requires of the ring).
struct ProvidedBufs {
    ring: *mut BufRingEntry,
    ring_bytes: usize,
    storage: *mut u8,
    storage_bytes: usize,
    buf_bytes: usize,
    mask: u16,
    tail: u16,
    /// Incremental consumption (IOU_PBUF_RING_INC, Linux 6.12+): a receive
    /// takes only the bytes it fills, so a 10-byte VNC message does not hold
    /// a whole 64 KiB buffer, and a few buffers serve thousands of sessions.
    /// Without it a burst of small receives from many sessions exhausts the
    /// ring (ENOBUFS) and some sessions wait for seconds (measured: p99.9
    /// 3 s at 1 000 sessions with 128 buffers).
    incremental: bool,
    /// Per buffer: bytes the kernel already filled (incremental mode).
    offsets: Vec<u32>,
}

fn mmap_anon(len: usize) -> io::Result<*mut u8> {
    // SAFETY: an anonymous private mapping with no address hint has no
    // preconditions; failure is reported as MAP_FAILED and checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.cast())
    }
}

impl ProvidedBufs {
    fn new(ring: &IoUring, entries: u16, buf_bytes: usize) -> io::Result<Self> {
        if !entries.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "entries must be a power of two",
            ));
        }
        let ring_bytes = entries as usize * std::mem::size_of::<BufRingEntry>();
        let storage_bytes = entries as usize * buf_bytes;
        let ring_mem = mmap_anon(ring_bytes)?;
        let storage = match mmap_anon(storage_bytes) {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: ring_mem was mapped above with this length.
                unsafe { libc::munmap(ring_mem.cast(), ring_bytes) };
                return Err(e);
            }
        };
        let mut bufs = Self {
            ring: ring_mem.cast(),
            ring_bytes,
            storage,
            storage_bytes,
            buf_bytes,
            mask: entries - 1,
            tail: 0,
            incremental: true,
            offsets: vec![0; entries as usize],
        };
        // SAFETY: the ring memory is page aligned (mmap), zeroed, sized for
        // `entries` entries and stays mapped until `Drop`, after the caller
        // unregisters it (see `unregister`).
        let inc = unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufs.ring as u64,
                entries,
                BGID,
                IOU_PBUF_RING_INC,
            )
        };
        if inc.is_err() {
            // Older kernels reject the flag: whole-buffer consumption.
            bufs.incremental = false;
            // SAFETY: as above.
            unsafe {
                ring.submitter().register_buf_ring_with_flags(
                    bufs.ring as u64,
                    entries,
                    BGID,
                    0,
                )?;
            }
        }
        for bid in 0..entries {
            bufs.push(bid);
        }
        bufs.publish();
        Ok(bufs)
    }

    /// Give buffer `bid` (back) to the kernel; visible after `publish`.
    fn push(&mut self, bid: u16) {
        let idx = (self.tail & self.mask) as usize;
        // SAFETY: idx ≤ mask < entries, so the entry lies inside the ring
        // mapping; the kernel only reads entries between its head and our
        // published tail, and this one is past the published tail.
        let e = unsafe { &mut *self.ring.add(idx) };
        // SAFETY: bid < entries, so the buffer lies inside `storage`.
        let addr = unsafe { self.storage.add(bid as usize * self.buf_bytes) };
        e.set_addr(addr as u64);
        e.set_len(self.buf_bytes as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field lives in the first entry of our mapping; the
        // kernel reads it concurrently, so it is written atomically with
        // release ordering after the entries it covers.
        unsafe {
            let tail = BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Account for a completion that filled `len` bytes of buffer `bid`:
    /// returns where those bytes start in the buffer and whether the buffer
    /// is finished (to be pushed back after its bytes are used).
    fn take(&mut self, bid: u16, len: usize, flags: u32) -> (usize, bool) {
        let b = (bid & self.mask) as usize;
        if !self.incremental {
            return (0, true);
        }
        let start = self.offsets[b] as usize;
        if cqueue::buffer_more(flags) {
            self.offsets[b] = (start + len).min(self.buf_bytes) as u32;
            (start, false)
        } else {
            self.offsets[b] = 0;
            (start, true)
        }
    }

    /// The `len` bytes at `start` of buffer `bid`.
    fn get(&self, bid: u16, start: usize, len: usize) -> &[u8] {
        let bid = (bid & self.mask) as usize;
        let start = start.min(self.buf_bytes);
        let len = len.min(self.buf_bytes - start);
        // SAFETY: the kernel handed these bytes of buffer `bid` to us in a
        // completion and does not write them again before the buffer is
        // pushed back (in incremental mode it only writes past them); the
        // range lies inside `storage`.
        unsafe { std::slice::from_raw_parts(self.storage.add(bid * self.buf_bytes + start), len) }
    }

    fn unregister(&self, ring: &IoUring) {
        let _ = ring.submitter().unregister_buf_ring(BGID);
    }
}

impl Drop for ProvidedBufs {
    fn drop(&mut self) {
        // SAFETY: both regions were mapped in `new` with these lengths and the
        // ring is unregistered (or the io_uring is gone) before this runs.
        unsafe {
            libc::munmap(self.ring.cast(), self.ring_bytes);
            libc::munmap(self.storage.cast(), self.storage_bytes);
        }
    }
}

/// One session's sockets and the operations it has in flight.
struct Conn {
    s: Session,
    browser: TcpStream,
    backend: Option<TcpStream>,
    /// Connect target, kept here because the kernel reads it asynchronously
    /// (the Conn is boxed, so the address is stable).
    addr: Option<socket2::SockAddr>,
    /// Operations whose final completion has not arrived.
    inflight: u32,
    browser_recv: Multishot,
    /// A send to the browser is in flight.
    browser_send: bool,
    /// No more reads from the browser (EOF or error seen).
    browser_eof: bool,
    backend_read: BackendRead,
    /// Bulk mode: the last bulk recv found nothing (EAGAIN); poll before
    /// the next one.
    backend_drained: bool,
    /// A send to the backend is in flight.
    backend_send: bool,
    /// The splice pipe lent to this session while a spliced frame's payload
    /// waits in it (splice calls are synchronous: no operation uses it).
    pipe: Option<Pipe>,
    /// A POLLOUT poll on the browser is in flight (a spliced frame is
    /// blocked on a full socket).
    browser_poll: bool,
    /// Both sockets were made O_NONBLOCK (for splice; io_uring's own
    /// operations ignore the flag).
    nonblocking: bool,
    connect: Connect,
    backend_eof: bool,
    /// The session is done; waiting for `inflight` to reach zero.
    teardown: bool,
}

/// A leg's multishot receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Multishot {
    Idle,
    Armed,
    /// Cancelled (backpressure); its last completion has not come yet.
    Cancelling,
}

/// What reads the backend right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BackendRead {
    Idle,
    /// A multishot recv into the provided-buffer ring.
    Multi,
    /// That recv, cancelled; its last completion has not come yet.
    MultiCancelling,
    /// A single-shot MSG_DONTWAIT recv into the session's lent chunk.
    Bulk,
    /// Bulk mode with nothing to read: a POLLIN poll (holds no buffer).
    Poll,
}

/// The backend connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connect {
    Idle,
    InFlight,
    /// Cancelled (the session ended first); its completion is ignored.
    Cancelling,
}

/// A per-session listener (dedicated-port mode) and the session it serves.
struct Dedicated {
    l: TcpListener,
    a: Arc<Admission>,
    port: u16,
    armed: bool,
    /// Closing: the accept was cancelled; dropped when its last CQE arrives.
    closing: bool,
}

impl Conn {
    /// A leg reached EOF (`error` None) or failed: mark it and, unless the
    /// session is already being torn down, tell the session.
    fn leg_ended(
        &mut self,
        ctx: &mut WorkerCtx,
        browser: bool,
        error: Option<&io::Error>,
        now: Instant,
    ) {
        if browser {
            self.browser_eof = true;
            if !self.teardown {
                self.s.on_browser_gone(ctx, error, now);
            }
        } else {
            self.backend_eof = true;
            if !self.teardown {
                self.s.on_backend_gone(ctx, error, now);
            }
        }
    }
}

struct Worker {
    ring: IoUring,
    bufs: ProvidedBufs,
    conns: slab::Slab<Box<Conn>>,
    listener: Option<TcpListener>,
    accept_armed: bool,
    accept_cancel: bool,
    next_id: u64,
    /// The mailbox's eventfd, read by an io_uring operation.
    wake_fd: Option<RawFd>,
    /// Target of the eventfd read; boxed so its address is stable while the
    /// read is in flight.
    wake_buf: Box<u64>,
    wake_armed: bool,
    dedicated: slab::Slab<Dedicated>,
    /// Failed accepts pause accepting (EMFILE must not busy-loop).
    accept_backoff: AcceptBackoff,
    /// Reused storage of [`Batch`].
    batch: Vec<squeue::Entry>,
    pipes: PipePool,
}

impl Worker {
    /// Queue an SQE, submitting first when the queue is full.
    fn push(&mut self, e: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry built in this module points only at memory
            // that outlives the operation: session queue bytes that stay put
            // until the send completes, the chunk a session lends a bulk recv
            // (heap bytes that do not move, returned to the pool only on that
            // recv's completion; the slot, and so the session, is freed only
            // with nothing in flight), the boxed Conn's sockaddr, or nothing.
            let pushed = unsafe { self.ring.submission().push(&e) };
            if pushed.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        if let Some(fd) = self.wake_fd {
            let buf: *mut u64 = &mut *self.wake_buf;
            let e = opcode::Read::new(Fd(fd), buf.cast(), 8)
                .build()
                .user_data(ud(WAKE_SLOT, OP_WAKE));
            self.push(e)?;
            self.wake_armed = true;
        }
        Ok(())
    }

    fn arm_dedicated(&mut self, idx: usize) -> io::Result<()> {
        let Some(d) = self.dedicated.get_mut(idx) else {
            return Ok(());
        };
        if d.armed || d.closing {
            return Ok(());
        }
        d.armed = true;
        let e = opcode::AcceptMulti::new(Fd(d.l.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(ud(DEDICATED_BASE + idx as u64, OP_ACCEPT));
        self.push(e)
    }

    /// Close the dedicated listeners `pred` selects: cancel their accept and
    /// drop them once it completes (at once if none is in flight).
    fn close_dedicated_where(
        &mut self,
        ctx: &mut WorkerCtx,
        mut pred: impl FnMut(&Dedicated) -> bool,
    ) -> io::Result<()> {
        let hit: Vec<usize> = self
            .dedicated
            .iter()
            .filter(|(_, d)| !d.closing && pred(d))
            .map(|(i, _)| i)
            .collect();
        for idx in hit {
            let armed = {
                let d = &mut self.dedicated[idx];
                d.closing = true;
                d.armed
            };
            if armed {
                let slot = DEDICATED_BASE + idx as u64;
                let e = opcode::AsyncCancel::new(ud(slot, OP_ACCEPT))
                    .build()
                    .user_data(ud(slot, OP_CANCEL));
                self.push(e)?;
            } else {
                self.drop_dedicated(ctx, idx);
            }
        }
        Ok(())
    }

    fn drop_dedicated(&mut self, ctx: &mut WorkerCtx, idx: usize) {
        if !self.dedicated.contains(idx) {
            return;
        }
        let d = self.dedicated.remove(idx);
        worker::report_listener_closed(ctx, &d.a, d.port);
    }

    /// After an accept pause: arm every listener whose accept is not armed.
    fn rearm_accepts(&mut self) -> io::Result<()> {
        if !self.accept_armed && !self.accept_cancel {
            self.arm_accept()?;
        }
        let idle: Vec<usize> = self
            .dedicated
            .iter()
            .filter(|(_, d)| !d.armed && !d.closing)
            .map(|(i, _)| i)
            .collect();
        for idx in idle {
            self.arm_dedicated(idx)?;
        }
        Ok(())
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        if let Some(l) = self.listener.as_ref() {
            let e = opcode::AcceptMulti::new(Fd(l.as_raw_fd()))
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(ud(LISTENER_SLOT, OP_ACCEPT));
            self.push(e)?;
            self.accept_armed = true;
        }
        Ok(())
    }
}

/// Run one worker until drained. Returns its counters.
pub fn run(
    mut ctx: WorkerCtx,
    listener: TcpListener,
    mut inbox: Option<WorkerInbox>,
    ctl: Arc<WorkerControl>,
) -> io::Result<WorkerMetrics> {
    let l = &ctx.cfg.limits;
    // DEFER_TASKRUN (6.1+): completion work runs when this thread waits,
    // instead of interrupting it; fallbacks for older kernels.
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(l.uring_entries)
        .or_else(|_| {
            IoUring::builder()
                .setup_single_issuer()
                .setup_coop_taskrun()
                .build(l.uring_entries)
        })
        .or_else(|_| IoUring::new(l.uring_entries))?;
    let bufs = ProvidedBufs::new(&ring, l.uring_provided_buffers, l.recv_buffer_bytes)?;
    let mut w = Worker {
        ring,
        bufs,
        conns: slab::Slab::new(),
        listener: Some(listener),
        accept_armed: false,
        accept_cancel: false,
        next_id: (ctx.worker_id as u64) << 48,
        wake_fd: inbox.as_ref().map(WorkerInbox::wake_fd),
        wake_buf: Box::new(0),
        wake_armed: false,
        dedicated: slab::Slab::new(),
        accept_backoff: AcceptBackoff::default(),
        batch: Vec::with_capacity(8),
        // No pipes (bulk receives instead) unless `uring_splice` is on.
        pipes: PipePool::new(
            if l.splice_min_bytes > 0 && l.uring_splice {
                l.splice_pipes_per_worker
            } else {
                0
            },
            l.splice_pipe_bytes,
        ),
    };
    w.arm_accept()?;
    w.arm_wake()?;
    let mut turn = Turn::new(&ctx, Instant::now());
    let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(ctx.cfg.limits.uring_entries as usize);
    let mut touched: Vec<usize> = Vec::new();

    let busy_poll = Duration::from_micros(ctx.cfg.limits.busy_poll_us);
    let mut last_work = Instant::now();
    let result = loop {
        let now = Instant::now();
        let spinning = now.saturating_duration_since(last_work) < busy_poll;
        let wait = if spinning {
            Duration::ZERO
        } else {
            turn.wait(now)
        };
        let ts = Timespec::new()
            .sec(wait.as_secs())
            .nsec(wait.subsec_nanos());
        let args = SubmitArgs::new().timespec(&ts);
        let want = usize::from(!spinning);
        match w.ring.submitter().submit_with_args(want, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => break Err(e),
        }
        cqes.clear();
        for cqe in w.ring.completion() {
            cqes.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
        let now = Instant::now();
        if !cqes.is_empty() {
            last_work = now;
        }
        if let Err(e) = turn.begin(&ctx, &ctl, now) {
            break Err(e);
        }
        touched.clear();
        for &(user_data, res, flags) in &cqes {
            complete(&mut w, &mut ctx, user_data, res, flags, now, &mut touched)?;
        }
        w.bufs.publish();
        touched.sort_unstable();
        touched.dedup();
        for &slot in &touched {
            sync(&mut w, &mut ctx, slot, now)?;
        }
        if let Some(ib) = inbox.as_mut() {
            turn.messages(&mut w, &mut ctx, ib, now)?;
            if !w.wake_armed && !turn.draining() {
                w.arm_wake()?;
            }
        }
        if !turn.draining() && w.accept_backoff.retry_due(now) {
            w.rearm_accepts()?;
        }
        if turn.end(&mut w, &mut ctx, &ctl, Instant::now())? {
            break Ok(());
        }
        if turn.draining() && !w.accept_armed && w.listener.is_some() {
            w.listener = None;
        }
    };
    w.bufs.unregister(&w.ring);
    result.map(|()| ctx.metrics)
}

impl WorkerIo for Worker {
    fn add_dedicated(
        &mut self,
        _ctx: &mut WorkerCtx,
        a: Arc<Admission>,
        l: TcpListener,
    ) -> io::Result<()> {
        let port = l.local_addr().map(|x| x.port()).unwrap_or(0);
        let idx = self.dedicated.insert(Dedicated {
            l,
            a,
            port,
            armed: false,
            closing: false,
        });
        self.arm_dedicated(idx)
    }

    fn adopt(
        &mut self,
        ctx: &mut WorkerCtx,
        stream: TcpStream,
        peer: std::net::SocketAddr,
        now: Instant,
    ) -> io::Result<()> {
        let mut touched = Vec::new();
        add_conn(self, ctx, stream, Some(peer), None, now, &mut touched);
        for slot in touched {
            sync(self, ctx, slot, now)?;
        }
        Ok(())
    }

    fn session_slots(&self, out: &mut Vec<usize>) {
        out.extend(
            self.conns
                .iter()
                .filter(|(_, c)| !c.teardown)
                .map(|(i, _)| i),
        );
    }

    fn session_mut(&mut self, slot: usize) -> Option<&mut Session> {
        self.conns
            .get_mut(slot)
            .filter(|c| !c.teardown)
            .map(|c| &mut c.s)
    }

    fn touched(&mut self, ctx: &mut WorkerCtx, slot: usize, now: Instant) -> io::Result<()> {
        sync(self, ctx, slot, now)
    }

    fn close_dedicated(
        &mut self,
        ctx: &mut WorkerCtx,
        pred: &mut dyn FnMut(&Admission) -> bool,
    ) -> io::Result<()> {
        self.close_dedicated_where(ctx, |d| pred(&d.a))
    }

    /// The listener is dropped once its multishot accept ended (cancelled).
    fn accepting(&self) -> bool {
        self.listener.is_some()
    }

    /// Cancel the multishot accept, and the eventfd read that targets
    /// `wake_buf` (it must end before the worker returns).
    fn stop_accepting(&mut self, _ctx: &mut WorkerCtx) -> io::Result<()> {
        if self.accept_armed && !self.accept_cancel {
            let e = opcode::AsyncCancel::new(ud(LISTENER_SLOT, OP_ACCEPT))
                .build()
                .user_data(ud(LISTENER_SLOT, OP_CANCEL));
            self.push(e)?;
            self.accept_cancel = true;
        }
        if self.wake_armed {
            let e = opcode::AsyncCancel::new(ud(WAKE_SLOT, OP_WAKE))
                .build()
                .user_data(ud(WAKE_SLOT, OP_CANCEL));
            self.push(e)?;
        }
        Ok(())
    }

    fn live_sessions(&self) -> usize {
        self.conns.len()
    }

    fn quiescent(&self) -> bool {
        self.conns.is_empty() && !self.accept_armed && self.dedicated.is_empty() && !self.wake_armed
    }
}

fn errno_err(res: i32) -> io::Error {
    io::Error::from_raw_os_error(-res)
}

/// Apply one completion to its session (or the listener).
fn complete(
    w: &mut Worker,
    ctx: &mut WorkerCtx,
    user_data: u64,
    res: i32,
    flags: u32,
    now: Instant,
    touched: &mut Vec<usize>,
) -> io::Result<()> {
    let op = user_data & 0xff;
    let slot = user_data >> 8;
    let more = cqueue::more(flags);
    if slot == WAKE_SLOT {
        // Messages are taken after this batch of completions.
        if op == OP_WAKE {
            w.wake_armed = false;
        }
        return Ok(());
    }
    if slot >= DEDICATED_BASE && slot != LISTENER_SLOT {
        let idx = (slot - DEDICATED_BASE) as usize;
        if op == OP_ACCEPT {
            let bound = w.dedicated.get_mut(idx).map(|d| {
                if !more {
                    d.armed = false;
                }
                d.a.clone()
            });
            if res >= 0 {
                w.accept_backoff.succeeded();
                // SAFETY: a successful accept completion returns a new
                // file descriptor that nothing else owns.
                let stream = unsafe { TcpStream::from_raw_fd(res as RawFd) };
                if bound.is_some() {
                    accept(w, ctx, stream, bound, now, touched);
                }
            } else if res != -libc::ECANCELED {
                w.accept_backoff.failed(ctx, &errno_err(res), now);
            }
            let (armed, closing) = w
                .dedicated
                .get(idx)
                .map_or((false, false), |d| (d.armed, d.closing));
            if closing && !armed {
                w.drop_dedicated(ctx, idx);
            } else if !armed && !closing && !w.accept_backoff.paused(now) {
                // While paused it is re-armed when the pause ends.
                w.arm_dedicated(idx)?;
            }
        }
        return Ok(());
    }
    if slot == LISTENER_SLOT {
        match op {
            OP_ACCEPT => {
                if !more {
                    w.accept_armed = false;
                }
                if res >= 0 {
                    w.accept_backoff.succeeded();
                    // SAFETY: a successful accept completion returns a new
                    // file descriptor that nothing else owns.
                    let stream = unsafe { TcpStream::from_raw_fd(res as RawFd) };
                    accept(w, ctx, stream, None, now, touched);
                } else if res != -libc::ECANCELED {
                    // The kernel ended the multishot accept; re-arming at
                    // once would fail again at once (EMFILE): pause.
                    w.accept_backoff.failed(ctx, &errno_err(res), now);
                }
                if !w.accept_armed && !w.accept_cancel && !w.accept_backoff.paused(now) {
                    w.arm_accept()?;
                }
            }
            OP_CANCEL => {}
            _ => {}
        }
        return Ok(());
    }
    let slot = slot as usize;
    let buf_id = cqueue::buffer_select(flags);
    let Some(c) = w.conns.get_mut(slot) else {
        // Cannot happen: slots are freed only with nothing in flight. Keep
        // the buffer accounting right regardless.
        if let Some(bid) = buf_id {
            let (_, done) = w.bufs.take(bid, res.max(0) as usize, flags);
            if done {
                w.bufs.push(bid);
            }
        }
        return Ok(());
    };
    touched.push(slot);
    match op {
        OP_BROWSER_RECV | OP_BACKEND_RECV => {
            let browser = op == OP_BROWSER_RECV;
            if !more {
                c.inflight -= 1;
                if browser {
                    c.browser_recv = Multishot::Idle;
                } else {
                    c.backend_read = BackendRead::Idle;
                }
            }
            if res > 0 {
                let bid = buf_id.unwrap_or(0);
                let (start, done) = w.bufs.take(bid, res as usize, flags);
                if !c.teardown {
                    let data = w.bufs.get(bid, start, res as usize);
                    if browser {
                        c.s.on_browser_data(ctx, data, now);
                    } else {
                        c.s.on_backend_data_fragment(ctx, data, now);
                    }
                }
                if done {
                    w.bufs.push(bid);
                }
            } else if res == -libc::ENOBUFS || res == -libc::ECANCELED {
                // Out of provided buffers for a moment, or cancelled for
                // backpressure: re-armed by `sync` when wanted.
                if res == -libc::ENOBUFS {
                    ctx.metrics.count(Cause::UringNoBuffers);
                }
            } else {
                // EOF (0) or an error.
                let e = (res < 0).then(|| errno_err(res));
                c.leg_ended(ctx, browser, e.as_ref(), now);
            }
        }
        OP_BACKEND_BULK => {
            c.inflight -= 1;
            c.backend_read = BackendRead::Idle;
            if res > 0 && !c.teardown {
                c.s.backend_bulk_done(ctx, res as usize, now);
            } else {
                // Nothing to queue: the chunk goes back to the pool (the
                // kernel is done with it: this was its completion).
                c.s.backend_bulk_done(ctx, 0, now);
                if res == -libc::EAGAIN {
                    c.backend_drained = true;
                } else {
                    // EOF (0) or an error (a positive count lands here
                    // only during teardown, and then ends nothing).
                    let e = (res < 0).then(|| errno_err(res));
                    if res <= 0 {
                        c.leg_ended(ctx, false, e.as_ref(), now);
                    }
                }
            }
        }
        OP_BACKEND_POLL => {
            // Readable, hung up, failed or cancelled: the next recv tells.
            c.inflight -= 1;
            c.backend_read = BackendRead::Idle;
            c.backend_drained = false;
        }
        OP_BROWSER_POLL => {
            // Writable, hung up, failed or cancelled: the next splice tells.
            c.inflight -= 1;
            c.browser_poll = false;
        }
        OP_BROWSER_SEND | OP_BACKEND_SEND => {
            c.inflight -= 1;
            let browser = op == OP_BROWSER_SEND;
            if browser {
                c.browser_send = false;
            } else {
                c.backend_send = false;
            }
            if res >= 0 {
                if browser {
                    c.s.browser_sent(ctx, res as usize, now);
                } else {
                    c.s.backend_sent(ctx, res as usize, now);
                }
            } else {
                // Nothing was sent; the bytes are no longer held.
                if browser {
                    c.s.browser_send_started(0);
                } else {
                    c.s.backend_send_started(0);
                }
                if !c.teardown {
                    let e = errno_err(res);
                    if browser {
                        c.s.on_browser_gone(ctx, Some(&e), now);
                    } else {
                        c.s.on_backend_gone(ctx, Some(&e), now);
                    }
                }
            }
        }
        OP_CONNECT => {
            c.inflight -= 1;
            let cancelled = c.connect == Connect::Cancelling;
            c.connect = Connect::Idle;
            if c.teardown || cancelled {
                return Ok(());
            }
            if res == 0 {
                c.s.on_backend_connected(ctx, now);
            } else {
                let e = errno_err(res);
                c.s.on_backend_connect_failed(ctx, &e, now);
            }
        }
        OP_CANCEL => {
            c.inflight -= 1;
        }
        _ => {}
    }
    Ok(())
}

fn accept(
    w: &mut Worker,
    ctx: &mut WorkerCtx,
    stream: TcpStream,
    bound: Option<Arc<Admission>>,
    now: Instant,
    touched: &mut Vec<usize>,
) {
    ctx.metrics.accepted += 1;
    let peer = stream.peer_addr().ok();
    // Shared-port connections may go to a less-loaded worker; a dedicated
    // port's session stays with its listener's worker.
    let stream = match (&bound, peer) {
        (None, Some(p)) => match worker::place_accepted(ctx, w.conns.len(), stream, p) {
            Some(s) => s,
            None => return,
        },
        _ => stream,
    };
    add_conn(w, ctx, stream, peer, bound, now, touched);
}

/// Serve one browser connection on this worker (accepted here or handed
/// over): start its session, unless the worker is full.
fn add_conn(
    w: &mut Worker,
    ctx: &mut WorkerCtx,
    stream: TcpStream,
    peer: Option<std::net::SocketAddr>,
    bound: Option<Arc<Admission>>,
    now: Instant,
    touched: &mut Vec<usize>,
) {
    let Some(session) = ctx.new_session(w.conns.len(), w.next_id + 1, now, peer, bound) else {
        return;
    };
    let _ = stream.set_nodelay(true);
    w.next_id += 1;
    let slot = w.conns.insert(Box::new(Conn {
        s: session,
        browser: stream,
        backend: None,
        addr: None,
        inflight: 0,
        browser_recv: Multishot::Idle,
        browser_send: false,
        browser_eof: false,
        backend_read: BackendRead::Idle,
        backend_drained: false,
        backend_send: false,
        pipe: None,
        browser_poll: false,
        nonblocking: false,
        connect: Connect::Idle,
        backend_eof: false,
        teardown: false,
    }));
    tracing::debug!(worker = ctx.worker_id, session = w.next_id, "accepted");
    touched.push(slot);
}

/// The SQEs one `sync` produces (at most one per kind of operation). Its
/// storage is the worker's, reused: `sync` runs per completion, and a
/// fresh array of entries would be zeroed every time.
struct Batch(Vec<squeue::Entry>);

impl Batch {
    fn add(&mut self, e: squeue::Entry) {
        self.0.push(e);
    }
}

fn new_backend_socket(addr: std::net::SocketAddr) -> io::Result<TcpStream> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(
        domain,
        socket2::Type::STREAM.cloexec(),
        Some(socket2::Protocol::TCP),
    )?;
    s.set_tcp_nodelay(true)?;
    Ok(s.into())
}

/// Bring one session's operations in line with what it wants: connect,
/// sends, recvs (armed or cancelled), teardown. Frees the slot when done.
fn sync(w: &mut Worker, ctx: &mut WorkerCtx, slot: usize, now: Instant) -> io::Result<()> {
    let mut batch = Batch(std::mem::take(&mut w.batch));
    {
        let Some(c) = w.conns.get_mut(slot) else {
            w.batch = batch.0;
            return Ok(());
        };
        let s64 = slot as u64;
        if !c.teardown {
            if let Some(addr) = c.s.take_connect() {
                match new_backend_socket(addr) {
                    Ok(sock) => {
                        let sa = socket2::SockAddr::from(addr);
                        c.addr = Some(sa);
                        let sa = c.addr.as_ref().expect("just set");
                        let e = opcode::Connect::new(
                            Fd(sock.as_raw_fd()),
                            sa.as_ptr().cast(),
                            sa.len(),
                        )
                        .build()
                        .user_data(ud(s64, OP_CONNECT));
                        c.backend = Some(sock);
                        c.connect = Connect::InFlight;
                        c.inflight += 1;
                        batch.add(e);
                    }
                    Err(e) => c.s.on_backend_connect_failed(ctx, &e, now),
                }
            }
            if c.s.backend_should_close() {
                end_backend(c, s64, &mut batch);
            }
            splice_pump(c, &mut w.pipes, ctx, now, s64, &mut batch);
            // Sends (a spliced frame goes out in `splice_pump`).
            if !c.browser_send && c.s.browser_pending_len() > 0 && c.s.pipe_bytes() == 0 {
                let p = c.s.browser_pending();
                let e = opcode::Send::new(Fd(c.browser.as_raw_fd()), p.as_ptr(), p.len() as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(ud(s64, OP_BROWSER_SEND));
                c.s.browser_send_started(p.len());
                c.browser_send = true;
                c.inflight += 1;
                batch.add(e);
            }
            let connecting = c.connect != Connect::Idle;
            if !c.backend_send && !connecting && !c.s.backend_pending().is_empty() {
                if let Some(k) = c.backend.as_ref() {
                    let p = c.s.backend_pending();
                    let e = opcode::Send::new(Fd(k.as_raw_fd()), p.as_ptr(), p.len() as u32)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                        .user_data(ud(s64, OP_BACKEND_SEND));
                    c.s.backend_send_started(p.len());
                    c.backend_send = true;
                    c.inflight += 1;
                    batch.add(e);
                }
            }
            // Receives: arm when wanted, cancel when not (backpressure).
            let want_b = c.s.want_browser_read(ctx) && !c.browser_eof;
            if want_b && c.browser_recv == Multishot::Idle {
                let e = opcode::RecvMulti::new(Fd(c.browser.as_raw_fd()), BGID)
                    .build()
                    .user_data(ud(s64, OP_BROWSER_RECV));
                c.browser_recv = Multishot::Armed;
                c.inflight += 1;
                batch.add(e);
            } else if !want_b && c.browser_recv == Multishot::Armed {
                let e = opcode::AsyncCancel::new(ud(s64, OP_BROWSER_RECV))
                    .build()
                    .user_data(ud(s64, OP_CANCEL));
                c.browser_recv = Multishot::Cancelling;
                c.inflight += 1;
                batch.add(e);
            }
            let want_k =
                c.s.want_backend_read(ctx) && !c.backend_eof && !connecting && c.backend.is_some();
            let bulk = want_k && c.s.bulk_recv_wanted(ctx);
            // Splicing (the pool lends pipes) but bytes are still queued for
            // the browser: a send is in flight and the next frame header
            // must not overtake them; its completion brings the splice.
            let drain_first = bulk && w.pipes.can_lend() && c.s.splice_in_limit(ctx).is_none();
            if want_k && c.backend_read == BackendRead::Idle {
                if let Some(k) = c.backend.as_ref() {
                    let fd = Fd(k.as_raw_fd());
                    if bulk && c.backend_drained {
                        // Nothing to read: wait for bytes holding no buffer.
                        let e = opcode::PollAdd::new(fd, libc::POLLIN as u32)
                            .build()
                            .user_data(ud(s64, OP_BACKEND_POLL));
                        c.backend_read = BackendRead::Poll;
                        c.inflight += 1;
                        batch.add(e);
                    } else if drain_first {
                    } else if let Some(buf) = bulk.then(|| c.s.backend_bulk_buf(ctx)).flatten() {
                        // MSG_DONTWAIT: completes at once (bytes or EAGAIN),
                        // so the lent chunk is never parked in the kernel.
                        let e = opcode::Recv::new(fd, buf.as_mut_ptr(), buf.len() as u32)
                            .flags(libc::MSG_DONTWAIT)
                            .build()
                            .user_data(ud(s64, OP_BACKEND_BULK));
                        c.backend_read = BackendRead::Bulk;
                        c.inflight += 1;
                        batch.add(e);
                    } else {
                        let e = opcode::RecvMulti::new(fd, BGID)
                            .build()
                            .user_data(ud(s64, OP_BACKEND_RECV));
                        c.backend_read = BackendRead::Multi;
                        c.inflight += 1;
                        batch.add(e);
                    }
                }
            } else if bulk && c.backend_read == BackendRead::Multi {
                // Bulk bytes are flowing: end the multishot recv; the bulk
                // recvs start once its last completion arrived (bytes that
                // complete on it meanwhile take the copying path).
                let e = opcode::AsyncCancel::new(ud(s64, OP_BACKEND_RECV))
                    .build()
                    .user_data(ud(s64, OP_CANCEL));
                c.backend_read = BackendRead::MultiCancelling;
                c.inflight += 1;
                batch.add(e);
            } else if !want_k && c.backend_read == BackendRead::Multi {
                // (A bulk recv completes at once; a poll consumes nothing
                // and is left to fire: neither needs cancelling here.)
                let e = opcode::AsyncCancel::new(ud(s64, OP_BACKEND_RECV))
                    .build()
                    .user_data(ud(s64, OP_CANCEL));
                c.backend_read = BackendRead::MultiCancelling;
                c.inflight += 1;
                batch.add(e);
            }
            if c.s.is_done() {
                c.teardown = true;
                // Ends every pending recv and send on these sockets; their
                // completions bring `inflight` to zero.
                let _ = c.browser.shutdown(Shutdown::Both);
                end_backend(c, s64, &mut batch);
            }
        }
    }
    for e in batch.0.drain(..) {
        w.push(e)?;
    }
    w.batch = batch.0;
    let done = w
        .conns
        .get(slot)
        .is_some_and(|c| c.teardown && c.inflight == 0);
    if done {
        let mut c = w.conns.remove(slot);
        if let Some(p) = c.pipe.take() {
            // Closed, not reused, if bytes of this session are still in it.
            w.pipes.give(p);
        }
        c.s.release(ctx);
        // Dropping the streams closes both fds.
    }
    Ok(())
}

/// Stop using the backend: cancel a pending connect, or shut the socket
/// down so its recv/send complete.
fn end_backend(c: &mut Conn, slot: u64, batch: &mut Batch) {
    if c.connect == Connect::InFlight {
        c.connect = Connect::Cancelling;
        c.inflight += 1;
        batch.add(
            opcode::AsyncCancel::new(ud(slot, OP_CONNECT))
                .build()
                .user_data(ud(slot, OP_CANCEL)),
        );
    } else if let Some(k) = c.backend.as_ref() {
        let _ = k.shutdown(Shutdown::Both);
    }
    c.backend_eof = true;
    c.s.backend_closed();
}

/// Splice mode: move bulk backend bytes to the browser through a pipe,
/// with synchronous non-blocking splice calls from this thread (the epoll
/// backend's path, see `io/epoll.rs`): the spliced frame's header (MSG_MORE)
/// and payload out first, then the next splice in, until a socket would
/// block (a one-shot poll then waits for it: POLLOUT here, POLLIN in `sync`
/// through `backend_drained`) or `SPLICE_ROUNDS_PER_SYNC` is spent.
///
/// It reads the backend only when no receive or poll of it is in flight
/// (`BackendRead::Idle`) and splices in only when nothing is queued for the
/// browser (`Session::splice_in_limit`), so bytes keep their order. A pipe
/// goes back to the pool as soon as it is empty.
fn splice_pump(
    c: &mut Conn,
    pipes: &mut PipePool,
    ctx: &mut WorkerCtx,
    now: Instant,
    slot: u64,
    batch: &mut Batch,
) {
    if c.teardown {
        return;
    }
    for _ in 0..SPLICE_ROUNDS_PER_SYNC {
        let mut progress = false;
        if c.s.pipe_bytes() > 0 {
            progress |= splice_out(c, ctx, now, slot, batch);
        }
        if c.s.pipe_bytes() == 0 {
            if let Some(p) = c.pipe.take() {
                pipes.give(p);
            }
        }
        if c.s.is_done() {
            return;
        }
        progress |= splice_in(c, pipes, ctx, now);
        if !progress {
            return;
        }
    }
    // Budget spent: wait for readiness like any other session.
    if c.s.pipe_bytes() > 0 {
        arm_browser_poll(c, slot, batch);
    } else {
        c.backend_drained = true;
    }
}

/// POLLOUT on the browser, once: the spliced frame continues when the
/// socket takes bytes again.
fn arm_browser_poll(c: &mut Conn, slot: u64, batch: &mut Batch) {
    if c.browser_poll || c.browser_eof {
        return;
    }
    let e = opcode::PollAdd::new(Fd(c.browser.as_raw_fd()), libc::POLLOUT as u32)
        .build()
        .user_data(ud(slot, OP_BROWSER_POLL));
    c.browser_poll = true;
    c.inflight += 1;
    batch.add(e);
}

/// One step of the spliced frame towards the browser: its header, else its
/// payload from the pipe. Returns whether it made progress.
fn splice_out(
    c: &mut Conn,
    ctx: &mut WorkerCtx,
    now: Instant,
    slot: u64,
    batch: &mut Batch,
) -> bool {
    // (No send is in flight while a frame is spliced: the queue was empty
    // when it was spliced in, and `sync` sends nothing while it lasts.)
    if c.browser_send || c.browser_poll || c.browser_eof {
        return false;
    }
    let fd = c.browser.as_raw_fd();
    let header = c.s.browser_pending();
    let r = if !header.is_empty() {
        // The pipe's bytes follow at once: one segment, not a tiny one first.
        splice::send(fd, header, true).map(|n| (n, false))
    } else {
        let ready = c.s.splice_out_ready();
        match c.pipe.as_mut() {
            Some(p) if ready > 0 => p.drain_to(fd, ready).map(|n| (n, true)),
            // Cannot happen: spliced bytes are always in this session's
            // pipe. End the session rather than spin.
            _ => Err(io::Error::other("spliced bytes without a pipe")),
        }
    };
    match r {
        Ok((0, _)) => {
            arm_browser_poll(c, slot, batch);
            false
        }
        Ok((n, false)) => {
            c.s.browser_sent(ctx, n, now);
            true
        }
        Ok((n, true)) => {
            c.s.splice_out_done(ctx, n, now);
            true
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            arm_browser_poll(c, slot, batch);
            false
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
        Err(e) => {
            c.s.on_browser_gone(ctx, Some(&e), now);
            true
        }
    }
}

/// Splice the next backend bytes into this session's pipe (taken from the
/// pool) when the session allows it and nothing else reads the backend.
/// Returns whether it made progress; EAGAIN sets `backend_drained`, so
/// `sync` polls before the next read.
fn splice_in(c: &mut Conn, pipes: &mut PipePool, ctx: &mut WorkerCtx, now: Instant) -> bool {
    if c.backend_read != BackendRead::Idle
        || c.backend_drained
        || c.backend_eof
        || c.connect != Connect::Idle
    {
        return false;
    }
    let (Some(k), Some(limit)) = (c.backend.as_ref(), c.s.splice_in_limit(ctx)) else {
        return false;
    };
    if !c.nonblocking {
        // splice(2) blocks on a blocking socket whatever its flags say.
        if let Err(e) = c
            .browser
            .set_nonblocking(true)
            .and_then(|()| k.set_nonblocking(true))
        {
            tracing::debug!(error = %e, "no splice: O_NONBLOCK refused");
            return false;
        }
        c.nonblocking = true;
    }
    if c.pipe.is_none() {
        c.pipe = pipes.take();
    }
    let Some(p) = c.pipe.as_mut() else {
        return false;
    };
    let r = p.fill_from(k.as_raw_fd(), limit.min(p.capacity()));
    let progress = match r {
        Ok(0) => {
            c.leg_ended(ctx, false, None, now);
            true
        }
        Ok(n) => {
            c.s.splice_in_done(ctx, n, now);
            true
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            c.backend_drained = true;
            false
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
        Err(e) if splice::is_unsupported(&e) => {
            // Nothing moved; bulk recvs from now on.
            ctx.metrics.count(Cause::SpliceUnsupported);
            tracing::warn!(worker = ctx.worker_id, error = %e, "splice refused, receiving instead");
            pipes.disable();
            false
        }
        Err(e) => {
            c.leg_ended(ctx, false, Some(&e), now);
            true
        }
    };
    if c.s.pipe_bytes() == 0 {
        if let Some(p) = c.pipe.take() {
            pipes.give(p);
        }
    }
    progress
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bulk recv relies on io_uring honouring MSG_DONTWAIT: with nothing
    /// to read it must complete with EAGAIN at once, never wait in the
    /// kernel holding the buffer (an idle session holds no chunk).
    #[test]
    fn dontwait_recv_completes_at_once() {
        use std::io::Write;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let mut ring = IoUring::new(8).unwrap();
        let mut buf = vec![0u8; 4096];
        let recv = |ring: &mut IoUring, buf: &mut [u8]| -> i32 {
            let e = opcode::Recv::new(Fd(b.as_raw_fd()), buf.as_mut_ptr(), buf.len() as u32)
                .flags(libc::MSG_DONTWAIT)
                .build()
                .user_data(42);
            // SAFETY: `buf` outlives the operation: we wait for its
            // completion before returning.
            unsafe { ring.submission().push(&e).unwrap() };
            ring.submit_and_wait(1).unwrap();
            let cqe = ring.completion().next().expect("a completion");
            assert_eq!(cqe.user_data(), 42);
            cqe.result()
        };
        assert_eq!(recv(&mut ring, &mut buf), -libc::EAGAIN, "nothing to read");
        a.write_all(b"hello").unwrap();
        // The bytes may take a moment to reach the receive queue.
        let deadline = Instant::now() + Duration::from_secs(5);
        let n = loop {
            let r = recv(&mut ring, &mut buf);
            if r != -libc::EAGAIN || Instant::now() > deadline {
                break r;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(n, 5);
        assert_eq!(&buf[..5], b"hello");
        // A POLLIN poll completes once bytes are there.
        a.write_all(b"!").unwrap();
        let e = opcode::PollAdd::new(Fd(b.as_raw_fd()), libc::POLLIN as u32)
            .build()
            .user_data(7);
        // SAFETY: a poll points at no memory.
        unsafe { ring.submission().push(&e).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let cqe = ring.completion().next().expect("a completion");
        assert_eq!(cqe.user_data(), 7);
        assert!(cqe.result() & libc::POLLIN as i32 != 0);
    }

    #[test]
    fn provided_buffers_register_and_account_incremental_use() {
        let ring = IoUring::new(8).unwrap();
        let mut bufs = ProvidedBufs::new(&ring, 16, 4096).unwrap();
        // Linux 6.12+ (this project's machines run 6.18) takes the flag.
        assert!(bufs.incremental, "IOU_PBUF_RING_INC refused by this kernel");
        let more = io_uring::cqueue::buffer_more(u32::MAX);
        assert!(more);
        // Two small receives into buffer 3, then its last one.
        assert_eq!(bufs.take(3, 10, 1 << 4), (0, false));
        assert_eq!(bufs.take(3, 20, 1 << 4), (10, false));
        assert_eq!(bufs.take(3, 5, 0), (30, true));
        assert_eq!(bufs.take(3, 7, 0), (0, true));
        assert_eq!(bufs.get(3, 4090, 100).len(), 6);
        bufs.unregister(&ring);
        // Whole-buffer mode always starts at 0 and finishes the buffer.
        bufs.incremental = false;
        assert_eq!(bufs.take(1, 10, 1 << 4), (0, true));
    }
}
