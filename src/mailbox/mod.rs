//! Bounded mailboxes between the control plane and the data-plane workers.
//!
//! One queue per worker carries [`ToWorker`] messages; one shared queue
//! carries [`FromWorker`] reports back. Both are `std::sync::mpsc` bounded
//! channels used only with `try_send`, so neither side ever blocks on the
//! other: a full queue is an error the sender handles (the control plane
//! answers 503, a worker counts a dropped report). Each queue has an eventfd
//! wake-up: a worker polls its eventfd in its own loop (epoll or io_uring),
//! and the control plane awaits the reverse one through its async runtime.
//!
//! This module depends on neither plane: the messages are plain data.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::Instant;

pub use crate::io::sys::EventFd;

/// Lifecycle of an admitted session's ticket, shared by every worker that
/// holds the admission: exactly one connect can move it out of `PENDING`.
///
/// `PENDING` → `CLAIMED` (a browser connected) → `CLOSED` (its connection
/// ended); `PENDING` or `CLAIMED` → `REVOKED` (DELETE, expiry) → `CLOSED`
/// once a claimed connection has ended. The control plane reconciles its
/// registry from this state, so a lost or late worker report can neither
/// keep a record open forever nor let the sweeper expire a live console.
pub mod ticket_state {
    pub const PENDING: u8 = 0;
    pub const CLAIMED: u8 = 1;
    pub const REVOKED: u8 = 2;
    pub const CLOSED: u8 = 3;
}

/// Where a session goes: the backend's address (resolved by the control
/// plane, or the proxy's command line, never on a worker) and what kind of
/// backend it is.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub kind: TargetKind,
}

impl Target {
    /// A VNC server, optionally behind VNC authentication.
    pub fn vnc(addr: SocketAddr, password: Option<String>) -> Self {
        Self {
            addr,
            kind: TargetKind::Vnc { password },
        }
    }
}

/// The kinds of backend the data plane relays to.
#[derive(Clone)]
pub enum TargetKind {
    /// Raw RFB over TCP. `password`, when set, is used by the data plane to
    /// authenticate (VNC authentication); never sent to the browser.
    Vnc { password: Option<String> },
    /// A VMware WebMKS endpoint: TLS, then a WebSocket whose frames pass
    /// through unchanged.
    WebMks(Arc<WebMksTarget>),
}

// By hand: `{:?}` (a log line, a panic) must never print a secret.
impl std::fmt::Debug for TargetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetKind::Vnc { password } => f
                .debug_struct("Vnc")
                .field("password", &password.as_ref().map(|_| "<redacted>"))
                .finish(),
            TargetKind::WebMks(w) => w.fmt(f),
        }
    }
}

/// A WebMKS endpoint as the data plane needs it, built by the control
/// plane: the URL (its path carries the ticket), the TLS client config
/// (pinned to the ticket's thumbprint, or roots) and the name to present.
pub struct WebMksTarget {
    pub url: crate::protocol::http_upgrade::WsUrl,
    pub tls: Arc<rustls::ClientConfig>,
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for WebMksTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // WsUrl's own Debug redacts the path (the ticket).
        f.debug_struct("WebMks").field("url", &self.url).finish()
    }
}

impl WebMksTarget {
    /// For `url`, trusted by `tls`. The name presented (SNI, and checked
    /// against the certificate unless pinned) is the URL's host name, or
    /// its IP address.
    pub fn new(
        url: crate::protocol::http_upgrade::WsUrl,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, String> {
        use crate::protocol::http_upgrade::UrlHost;
        let server_name = match &url.host {
            UrlHost::Name(n) => rustls::pki_types::ServerName::try_from(n.clone())
                .map_err(|e| format!("host name not usable for TLS: {e}"))?,
            UrlHost::Ipv4(ip) => rustls::pki_types::ServerName::IpAddress(IpAddr::V4(*ip).into()),
            UrlHost::Ipv6(ip) => rustls::pki_types::ServerName::IpAddress(IpAddr::V6(*ip).into()),
        };
        Ok(Self {
            url,
            tls,
            server_name,
        })
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("id", &format_args!("{:016x}", self.id))
            .field("ticket", &"<redacted>")
            .field("target", &self.target)
            .field("user", &self.user)
            .field("origin", &self.origin)
            .field("client_ip", &self.client_ip)
            .field("port", &self.port)
            .field("state", &self.state())
            .finish()
    }
}

/// A session the control plane created, waiting for its browser.
pub struct Admission {
    pub id: u64,
    /// The single-use ticket (random bytes, compared in constant time).
    pub ticket: Vec<u8>,
    pub target: Target,
    pub user: String,
    /// The ticket is valid until then (first connect only).
    pub expires_at: Instant,
    /// When set, the browser's Origin must equal it.
    pub origin: Option<String>,
    /// When set, the browser's address must equal it.
    pub client_ip: Option<IpAddr>,
    /// Dedicated port, when the session has its own listener.
    pub port: Option<u16>,
    state: AtomicU8,
    /// Last traffic either way, as [`mono_ms`]: the creation time until
    /// the relay is live, then published by its worker at most once per
    /// tick (never per frame). Read by the control plane's pool (LRU
    /// eviction, `GET /api/v1/viewers`).
    last_activity_ms: AtomicU64,
    /// Why it was revoked ([`revoke_cause`]), read by the worker that
    /// closes the relay.
    revoke_cause: AtomicU8,
}

/// Why an admission was revoked: the close code and reason its relay gets.
pub mod revoke_cause {
    /// `DELETE`, expiry, close-sessions: 1008 "session revoked".
    pub const REVOKED: u8 = 0;
    /// Evicted to make room in the viewer pool: 4001 "evicted".
    pub const EVICTED: u8 = 1;
}

/// Milliseconds on the monotonic clock since a process-wide epoch (the
/// first call): comparable across threads, storable in an atomic.
pub fn mono_ms(at: Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    at.saturating_duration_since(epoch).as_millis() as u64
}

impl Admission {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        ticket: Vec<u8>,
        target: Target,
        user: String,
        expires_at: Instant,
        origin: Option<String>,
        client_ip: Option<IpAddr>,
        port: Option<u16>,
    ) -> Self {
        Self {
            id,
            ticket,
            target,
            user,
            expires_at,
            origin,
            client_ip,
            port,
            state: AtomicU8::new(ticket_state::PENDING),
            last_activity_ms: AtomicU64::new(mono_ms(Instant::now())),
            revoke_cause: AtomicU8::new(revoke_cause::REVOKED),
        }
    }

    /// The relay saw traffic at `at_ms` ([`mono_ms`]). One relaxed load,
    /// and a store only when it moved: called once per tick per session.
    pub fn note_activity(&self, at_ms: u64) {
        if self.last_activity_ms.load(Ordering::Relaxed) < at_ms {
            self.last_activity_ms.store(at_ms, Ordering::Relaxed);
        }
    }

    pub fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    /// Revoke to make room in the pool: the relay closes with 4001
    /// "evicted". False when it had ended already.
    pub fn evict(&self) -> bool {
        self.evict_from().is_some()
    }

    /// [`Admission::evict`], returning the state it evicted from (see
    /// [`Admission::revoke_from`]).
    pub fn evict_from(&self) -> Option<u8> {
        self.revoke_cause
            .store(revoke_cause::EVICTED, Ordering::Release);
        self.revoke_from()
    }

    pub fn revoke_cause(&self) -> u8 {
        self.revoke_cause.load(Ordering::Acquire)
    }

    /// Move PENDING → CLAIMED; false when already claimed or revoked.
    pub fn claim(&self) -> bool {
        self.state
            .compare_exchange(
                ticket_state::PENDING,
                ticket_state::CLAIMED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Mark revoked (DELETE or expiry): no connect may use it any more, and
    /// a live connection that claimed it closes on its worker's next tick.
    /// False when it was already revoked or closed.
    pub fn revoke(&self) -> bool {
        self.revoke_from().is_some()
    }

    /// [`Admission::revoke`], returning the state it revoked from
    /// (PENDING or CLAIMED), or None when it was already revoked or
    /// closed. Why: whether a worker holds the session must be read in the
    /// same step as the revoke; read before it, a worker can claim the
    /// admission in between.
    pub fn revoke_from(&self) -> Option<u8> {
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            if !matches!(cur, ticket_state::PENDING | ticket_state::CLAIMED) {
                return None;
            }
            match self.state.compare_exchange_weak(
                cur,
                ticket_state::REVOKED,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(cur),
                Err(now) => cur = now,
            }
        }
    }

    /// The connection that claimed this admission has ended (called by its
    /// worker, once). Final.
    pub fn close(&self) {
        self.state.store(ticket_state::CLOSED, Ordering::Release);
    }

    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }
}

/// Control plane → one worker.
#[derive(Debug)]
pub enum ToWorker {
    /// A shared-port session: every worker gets the same admission, since
    /// the kernel picks which worker accepts the browser.
    Admit(Arc<Admission>),
    /// A dedicated-port session: this worker owns the listener, which the
    /// control plane bound (the bind is the OS check).
    AdmitDedicated(Arc<Admission>, TcpListener),
    /// Close the session now (its relay, or its pending admission).
    Revoke { id: u64 },
    /// A browser connection another worker accepted and handed over, before
    /// reading from it, because this worker holds fewer sessions.
    Adopt {
        stream: std::net::TcpStream,
        peer: std::net::SocketAddr,
    },
    /// The answer to a [`FromWorker::ConsoleRequest`] of this worker.
    ConsoleAnswer(Box<ConsoleAnswer>),
}

/// A browser asked for a VM's console by URL (`/ws/console/{vm}`): the
/// worker parked its connection and asks the control plane to
/// authenticate, authorise and admit it.
pub struct ConsoleRequest {
    pub worker: usize,
    /// The parked connection's session id (unique on its worker).
    pub session: u64,
    /// The VM as the URL names it (percent-decoded).
    pub vm: String,
    /// The bearer token (`?token=` or `Authorization: Bearer`): a JWT or a
    /// static `[[auth.tokens]]` token; None when the request had none.
    pub token: Option<String>,
    /// `?user=`: the user a service token opens the console for.
    pub user: Option<String>,
    pub peer: Option<IpAddr>,
    /// When the worker parked it ([`mono_ms`]), for the latency figures.
    pub parked_at_ms: u64,
}

// By hand: the token must never reach a log line.
impl std::fmt::Debug for ConsoleRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleRequest")
            .field("worker", &self.worker)
            .field("session", &self.session)
            .field("vm", &self.vm)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("user", &self.user)
            .field("peer", &self.peer)
            .finish()
    }
}

/// What the control plane answers a [`ConsoleRequest`].
#[derive(Debug)]
pub struct ConsoleAnswer {
    pub session: u64,
    pub outcome: Result<Arc<Admission>, ConsoleRefusal>,
}

/// A console request refused: the HTTP status, code, message (and
/// Retry-After) the REST call `POST /api/v1/vms/{vm}/console` would have
/// answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleRefusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub retry_after_s: Option<u64>,
}

/// A worker's counters, published periodically.
#[derive(Debug, Clone, Default)]
pub struct WorkerStats {
    pub worker: usize,
    pub live_sessions: usize,
    pub accepted: u64,
    /// Accepted here and handed to a less-loaded worker.
    pub handed_over: u64,
    /// Handed over by another worker and served here.
    pub adopted: u64,
    pub handshakes_ok: u64,
    /// VMware client messages rewritten into standard RFB / dropped.
    pub vmware_translated: u64,
    pub vmware_dropped: u64,
    pub sessions_closed: u64,
    pub bytes_browser_to_backend: u64,
    pub bytes_backend_to_browser: u64,
    pub errors: Vec<(&'static str, u64)>,
    /// Buffer chunks in use / kept free by the worker's pool.
    pub pool_outstanding: usize,
    pub pool_free: usize,
    /// Relay latency histograms (µs) since the worker started.
    pub relay_down_us: crate::metrics::LatencyUs,
    pub relay_up_us: crate::metrics::LatencyUs,
}

/// One worker → control plane.
#[derive(Debug)]
pub enum FromWorker {
    Opened {
        id: u64,
        worker: usize,
        peer: Option<SocketAddr>,
    },
    Closed {
        id: u64,
        worker: usize,
        code: Option<u16>,
        reason: String,
        bytes_up: u64,
        bytes_down: u64,
    },
    /// The appliance's own VNC authentication with the backend succeeded:
    /// a one-time credential (a QEMU password) has been used and can be
    /// expired.
    BackendAuthenticated {
        id: u64,
    },
    /// A dedicated listener was dropped: the port may be released.
    ListenerClosed {
        id: u64,
        port: u16,
    },
    /// A connect was refused for a reason the registry cares about.
    Refused {
        id: u64,
        kind: &'static str,
    },
    /// A browser opened `/ws/console/{vm}`: admit it (or refuse it) with a
    /// [`ToWorker::ConsoleAnswer`].
    ConsoleRequest(Box<ConsoleRequest>),
    Stats(Box<WorkerStats>),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MailboxError {
    #[error("mailbox full")]
    Full,
    #[error("mailbox closed")]
    Closed,
}

/// Sending side of a bounded queue with its wake-up.
#[derive(Debug)]
pub struct Sender<T> {
    tx: SyncSender<T>,
    wake: Arc<EventFd>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            wake: self.wake.clone(),
        }
    }
}

impl<T> Sender<T> {
    /// Queue a message without blocking and wake the receiver.
    pub fn send(&self, msg: T) -> Result<(), MailboxError> {
        match self.tx.try_send(msg) {
            Ok(()) => {
                self.wake.notify();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(MailboxError::Full),
            Err(TrySendError::Disconnected(_)) => Err(MailboxError::Closed),
        }
    }

    /// Same, but a message that could not be queued (full or closed) comes
    /// back to the caller instead of being dropped.
    pub fn send_or_return(&self, msg: T) -> Result<(), T> {
        match self.tx.try_send(msg) {
            Ok(()) => {
                self.wake.notify();
                Ok(())
            }
            Err(TrySendError::Full(m)) | Err(TrySendError::Disconnected(m)) => Err(m),
        }
    }
}

/// Receiving side: drain with [`Receiver::try_recv`] after the eventfd fires.
#[derive(Debug)]
pub struct Inbox<T> {
    rx: Receiver<T>,
    wake: Arc<EventFd>,
    peeked: Option<T>,
}

impl<T> Inbox<T> {
    /// Next message, if any (never blocks).
    pub fn try_recv(&mut self) -> Option<T> {
        if let Some(m) = self.peeked.take() {
            return Some(m);
        }
        match self.rx.try_recv() {
            Ok(m) => Some(m),
            Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => None,
        }
    }

    /// Wait for the next message; `None` once every sender is gone. Only
    /// for a thread that does nothing else (the control plane's report
    /// reader): never on a worker or the control thread.
    pub fn recv_blocking(&mut self) -> Option<T> {
        if let Some(m) = self.peeked.take() {
            return Some(m);
        }
        self.rx.recv().ok()
    }

    /// Whether a message is waiting, without losing it (it is kept for the
    /// next `try_recv`): used to re-wake the owner when it stopped draining
    /// at its per-turn bound.
    pub fn has_pending(&mut self) -> bool {
        if self.peeked.is_none() {
            self.peeked = self.rx.try_recv().ok();
        }
        self.peeked.is_some()
    }

    /// The wake-up fd to poll; call [`Inbox::reset`] before draining.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.raw_fd()
    }

    pub fn wake(&self) -> &Arc<EventFd> {
        &self.wake
    }

    pub fn reset(&self) {
        self.wake.reset();
    }
}

/// A bounded queue of `capacity` messages with an eventfd wake-up.
pub fn channel<T>(capacity: usize) -> io::Result<(Sender<T>, Inbox<T>)> {
    Ok(channel_with_wake(capacity, Arc::new(EventFd::new()?)))
}

/// A bounded queue of `capacity` messages that wakes its receiver through
/// `wake`, which other queues to the same receiver may share.
pub fn channel_with_wake<T>(capacity: usize, wake: Arc<EventFd>) -> (Sender<T>, Inbox<T>) {
    let (tx, rx) = mpsc::sync_channel(capacity);
    (
        Sender {
            tx,
            wake: wake.clone(),
        },
        Inbox {
            rx,
            wake,
            peeked: None,
        },
    )
}

/// A worker's inbox: the control plane's messages and the other workers'
/// connection hand-overs, in two bounded queues behind one wake-up.
///
/// Why two: hand-overs carry connections nobody has authenticated yet, so a
/// connection flood on the console port can fill their queue; it must never
/// crowd out a revoke or an admission. The control queue is always read
/// first.
#[derive(Debug)]
pub struct WorkerInbox {
    control: Option<Inbox<ToWorker>>,
    handoff: Option<Inbox<ToWorker>>,
    wake: Arc<EventFd>,
}

impl WorkerInbox {
    /// `control` (appliance mode) and/or a hand-over queue of
    /// `handoff_capacity` (more than one worker) sharing `control`'s
    /// wake-up; None when there is neither.
    pub fn new(
        control: Option<Inbox<ToWorker>>,
        handoff_capacity: Option<usize>,
    ) -> io::Result<Option<(Self, Option<Sender<ToWorker>>)>> {
        let wake = match (&control, handoff_capacity) {
            (Some(c), _) => c.wake().clone(),
            (None, Some(_)) => Arc::new(EventFd::new()?),
            (None, None) => return Ok(None),
        };
        let (tx, handoff) = match handoff_capacity {
            Some(cap) => {
                let (tx, rx) = channel_with_wake(cap, wake.clone());
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        Ok(Some((
            Self {
                control,
                handoff,
                wake,
            },
            tx,
        )))
    }

    /// The next message: control first, then hand-overs (never blocks).
    pub fn try_recv(&mut self) -> Option<ToWorker> {
        if let Some(m) = self.control.as_mut().and_then(Inbox::try_recv) {
            return Some(m);
        }
        self.handoff.as_mut().and_then(Inbox::try_recv)
    }

    /// Whether either queue holds a message (kept for the next `try_recv`).
    pub fn has_pending(&mut self) -> bool {
        self.control.as_mut().is_some_and(Inbox::has_pending)
            || self.handoff.as_mut().is_some_and(Inbox::has_pending)
    }

    pub fn wake_fd(&self) -> RawFd {
        self.wake.raw_fd()
    }

    pub fn wake(&self) -> &Arc<EventFd> {
        &self.wake
    }

    pub fn reset(&self) {
        self.wake.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission() -> Admission {
        Admission::new(
            7,
            vec![1; 32],
            Target::vnc("127.0.0.1:5900".parse().unwrap(), None),
            "alice".into(),
            Instant::now(),
            None,
            None,
            None,
        )
    }

    #[test]
    fn debug_output_never_shows_a_ticket_or_password() {
        let mut a = admission();
        a.target = Target::vnc(a.target.addr, Some("hunter22".into()));
        let d = format!("{a:?}");
        assert!(!d.contains("hunter22") && !d.contains("[1, 1"), "{d}");
        assert!(d.contains("redacted"), "{d}");
    }

    /// What the registry relies on to know whether a worker holds a
    /// session it ends: a claim racing a revoke either wins (and the
    /// revoke reports CLAIMED) or loses; never a claimed admission whose
    /// revoke reports PENDING.
    #[test]
    fn a_revoke_racing_a_claim_reports_the_state_it_really_revoked() {
        let rounds = 2_000;
        for _ in 0..rounds {
            let a = Arc::new(admission());
            let worker = {
                let a = a.clone();
                std::thread::spawn(move || a.claim())
            };
            let from = a.revoke_from();
            let claimed = worker.join().unwrap();
            assert_eq!(claimed, from == Some(ticket_state::CLAIMED), "{from:?}");
            assert_eq!(a.state(), ticket_state::REVOKED);
        }
        let a = admission();
        assert!(a.claim());
        a.close();
        assert_eq!(a.revoke_from(), None, "a closed admission is not revoked");
        assert_eq!(a.evict_from(), None);
    }

    #[test]
    fn bounded_and_never_blocks() {
        let (tx, mut rx) = channel::<u32>(2).unwrap();
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        assert_eq!(tx.send(3), Err(MailboxError::Full));
        rx.reset();
        assert!(rx.has_pending());
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), None);
        drop(rx);
        assert_eq!(tx.send(4), Err(MailboxError::Closed));
    }

    #[test]
    fn a_ticket_is_claimed_once_across_threads() {
        let a = Arc::new(admission());
        let wins: usize = (0..8)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || a.claim())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| usize::from(h.join().unwrap()))
            .sum();
        assert_eq!(wins, 1);
        assert!(a.revoke());
        assert!(!a.revoke());
        assert!(!a.claim());
        a.close();
        assert_eq!(a.state(), ticket_state::CLOSED);
        assert!(!a.revoke(), "a closed admission stays closed");
    }

    #[test]
    fn hand_overs_never_crowd_out_control_messages() {
        let (ctl_tx, ctl_rx) = channel::<ToWorker>(2).unwrap();
        let (mut inbox, handoff_tx) = WorkerInbox::new(Some(ctl_rx), Some(2)).unwrap().unwrap();
        let handoff_tx = handoff_tx.unwrap();
        let stream = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let peer = s.local_addr().unwrap();
            ToWorker::Adopt { stream: s, peer }
        };
        handoff_tx.send(stream()).unwrap();
        handoff_tx.send(stream()).unwrap();
        // The hand-over queue is full; the control queue still takes a revoke.
        assert_eq!(handoff_tx.send(stream()).unwrap_err(), MailboxError::Full);
        ctl_tx.send(ToWorker::Revoke { id: 9 }).unwrap();
        assert!(inbox.has_pending());
        assert!(matches!(inbox.try_recv(), Some(ToWorker::Revoke { id: 9 })));
        assert!(matches!(inbox.try_recv(), Some(ToWorker::Adopt { .. })));
        assert!(matches!(inbox.try_recv(), Some(ToWorker::Adopt { .. })));
        assert!(inbox.try_recv().is_none());
    }
}
