//! The bitmap plus the OS: claim a port, bind its listener, remember owners.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

use super::bitmap::{Health, PortBitmap, PortRange, PortStats};
use super::store::Allocation;
use super::PortError;

/// Settings of a [`PortPool`]; each limit carries its unit and cost.
#[derive(Debug, Clone, PartialEq)]
pub struct PortPoolConfig {
    /// Ports handed out to dedicated listeners. Cost: 24 bytes of pool
    /// state per port (bit, owner, timestamps).
    pub range: PortRange,
    /// Address the dedicated listeners bind to (browsers must reach it).
    pub bind_ip: IpAddr,
    /// `listen()` backlog of each dedicated listener. One session needs
    /// only a few pending connections (a reconnect or two); kernel memory
    /// per queued connection is the cost.
    pub listen_backlog: u32,
    /// Binds tried per allocation before giving up with `Exhausted`
    /// (each failed bind is one syscall on the control-plane thread).
    pub max_bind_attempts: usize,
    /// After a bind finds a port held by another process, skip that port
    /// for this long before trying it again (0 = retry on the next pass).
    pub external_retry_ms: u64,
    /// `Retry-After` seconds sent with the 503 when the pool is exhausted.
    pub exhausted_retry_after_secs: u64,
}

/// Upper bound for `max_bind_attempts`: beyond this an allocation could spend
/// noticeable time in syscalls while the control plane waits.
const MAX_BIND_ATTEMPTS_LIMIT: usize = 1024;
/// Upper bound for `external_retry_ms` (one day).
const MAX_EXTERNAL_RETRY_MS: u64 = 24 * 60 * 60 * 1000;
/// Upper bound for `exhausted_retry_after_secs` (one hour).
const MAX_RETRY_AFTER_SECS: u64 = 3600;
/// Upper bound for `listen_backlog` (the kernel clamps to somaxconn anyway).
const MAX_LISTEN_BACKLOG: u32 = 65_535;

impl Default for PortPoolConfig {
    fn default() -> Self {
        Self {
            range: PortRange::DEFAULT,
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            listen_backlog: 16,
            max_bind_attempts: 16,
            external_retry_ms: 60_000,
            exhausted_retry_after_secs: 5,
        }
    }
}

impl PortPoolConfig {
    /// Check every bound; the error names the key.
    pub fn validate(&self) -> Result<(), PortError> {
        let bad =
            |key: &'static str, message: String| Err(PortError::InvalidConfig { key, message });
        if self.listen_backlog == 0 || self.listen_backlog > MAX_LISTEN_BACKLOG {
            return bad(
                "listen_backlog",
                format!(
                    "must be between 1 and {MAX_LISTEN_BACKLOG}, got {}",
                    self.listen_backlog
                ),
            );
        }
        if self.max_bind_attempts == 0 || self.max_bind_attempts > MAX_BIND_ATTEMPTS_LIMIT {
            return bad(
                "max_bind_attempts",
                format!(
                    "must be between 1 and {MAX_BIND_ATTEMPTS_LIMIT}, got {}",
                    self.max_bind_attempts
                ),
            );
        }
        if self.external_retry_ms > MAX_EXTERNAL_RETRY_MS {
            return bad(
                "external_retry_ms",
                format!(
                    "must be at most {MAX_EXTERNAL_RETRY_MS} (one day), got {}",
                    self.external_retry_ms
                ),
            );
        }
        if self.exhausted_retry_after_secs == 0
            || self.exhausted_retry_after_secs > MAX_RETRY_AFTER_SECS
        {
            return bad(
                "exhausted_retry_after_secs",
                format!(
                    "must be between 1 and {MAX_RETRY_AFTER_SECS}, got {}",
                    self.exhausted_retry_after_secs
                ),
            );
        }
        Ok(())
    }
}

/// The pool's numbers: the five fields of `GET /api/v1/ports`
/// (`total_ports, allocated_ports, free_ports, utilization_percent, health`,
/// as in [`PortStats`]) plus the pool's own counters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PoolStats {
    pub total_ports: usize,
    pub allocated_ports: usize,
    pub free_ports: usize,
    /// Rounded to two decimals; see [`PortStats::utilization_percent`].
    pub utilization_percent: f64,
    pub health: Health,
    /// Ports currently skipped because another process held them at the
    /// last bind (not counted as allocated).
    pub externally_taken: usize,
    /// Binds that failed because the port was taken, since start.
    pub bind_failures_total: u64,
    /// Allocations refused with `port_pool_exhausted`, since start.
    pub exhausted_total: u64,
}

impl PoolStats {
    /// Just the five API fields.
    pub fn ports(&self) -> PortStats {
        PortStats {
            total_ports: self.total_ports,
            allocated_ports: self.allocated_ports,
            free_ports: self.free_ports,
            utilization_percent: self.utilization_percent,
            health: self.health,
        }
    }
}

/// The port pool of dedicated-port mode. `Sync`: any thread may allocate or
/// release; nothing here takes a lock.
///
/// Owner bookkeeping: each port has an owner slot (session id, 0 = none).
/// The slot is written only *after* the listener is bound and listening, and
/// cleared before the bit is released. So a slot of 0 on a claimed port means
/// "allocation in flight", which [`cleanup`](super::cleanup) leaves alone,
/// and a non-zero slot whose session is gone can be reclaimed once nothing
/// listens on the port.
#[derive(Debug)]
pub struct PortPool {
    config: PortPoolConfig,
    bitmap: PortBitmap,
    /// Session id per port index; 0 = no owner recorded.
    owners: Box<[AtomicU64]>,
    /// Unix ms at which the current owner got the port.
    allocated_at: Box<[AtomicU64]>,
    /// Per port index: ms since `epoch` until which the port is skipped
    /// because another process held it. A per-port slot (not a set) keeps
    /// this lock-free and bounded by the range size.
    skip_until_ms: Box<[AtomicU64]>,
    epoch: Instant,
    bind_failures: AtomicU64,
    exhausted: AtomicU64,
}

/// What a probe bind found.
pub(super) enum Probe {
    /// Nothing listens on the port.
    Free,
    /// Something listens on it (or we may not bind it).
    InUse,
}

impl PortPool {
    pub fn new(config: PortPoolConfig) -> Result<Self, PortError> {
        config.validate()?;
        let len = config.range.len();
        let slots = || (0..len).map(|_| AtomicU64::new(0)).collect::<Box<[_]>>();
        Ok(Self {
            bitmap: PortBitmap::new(config.range),
            owners: slots(),
            allocated_at: slots(),
            skip_until_ms: slots(),
            config,
            epoch: Instant::now(),
            bind_failures: AtomicU64::new(0),
            exhausted: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> &PortPoolConfig {
        &self.config
    }

    pub fn range(&self) -> PortRange {
        self.config.range
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn exhausted(&self, reason: &'static str) -> PortError {
        self.exhausted.fetch_add(1, Ordering::Relaxed);
        let stats = self.stats();
        PortError::Exhausted {
            range: self.config.range,
            total: stats.total_ports,
            allocated: stats.allocated_ports,
            externally_taken: stats.externally_taken,
            reason,
            retry_after_secs: self.config.exhausted_retry_after_secs,
        }
    }

    /// Claim a port for session `owner` and return it with its listener:
    /// bound on `(bind_ip, port)` with SO_REUSEADDR (so a previous session's
    /// TIME_WAIT does not block it) but not SO_REUSEPORT (two owners must
    /// never share a port), non-blocking, listening.
    ///
    /// A port another process holds (bind or listen fails with
    /// `EADDRINUSE`/`EACCES`) is skipped for `external_retry_ms`, counted,
    /// and the next port is tried, up to `max_bind_attempts` binds. Other
    /// OS errors (address not local, out of descriptors) end the attempt
    /// with [`PortError::Io`]. On every error no bit stays claimed.
    pub fn allocate(&self, owner: u64) -> Result<(u16, TcpListener), PortError> {
        if owner == 0 {
            return Err(PortError::InvalidOwner);
        }
        // Ports we pass over stay claimed until we are done, so claim_next
        // cannot return them again: each turn of the search sees a new port.
        let mut passed_over: Vec<u16> = Vec::new();
        let outcome = self.search(owner, &mut passed_over);
        for port in passed_over {
            self.bitmap.release(port);
        }
        // The error is built after the passed-over bits are back, so its
        // counts are what the pool really holds.
        outcome.map_err(|failure| match failure {
            Failure::Exhausted(reason) => self.exhausted(reason),
            Failure::Other(e) => e,
        })
    }

    /// The loop of [`allocate`](Self::allocate); ends within `range.len()`
    /// turns because each turn claims a port not seen before.
    fn search(
        &self,
        owner: u64,
        passed_over: &mut Vec<u16>,
    ) -> Result<(u16, TcpListener), Failure> {
        let now = self.now_ms();
        let mut binds = 0usize;
        for _ in 0..self.config.range.len() {
            let Some(port) = self.bitmap.claim_next() else {
                return Err(Failure::Exhausted(if passed_over.is_empty() {
                    "no free port left in the range"
                } else {
                    "the free ports left are held by other processes"
                }));
            };
            let Some(i) = self.config.range.index_of(port) else {
                // claim_next only returns ports of the range; never reached.
                passed_over.push(port);
                continue;
            };
            if self.skip_until_ms[i].load(Ordering::Relaxed) > now {
                passed_over.push(port);
                continue;
            }
            binds += 1;
            match bind_listener(self.config.bind_ip, port, self.config.listen_backlog) {
                Ok(listener) => {
                    self.skip_until_ms[i].store(0, Ordering::Relaxed);
                    self.allocated_at[i].store(unix_ms(), Ordering::Relaxed);
                    // Release: whoever sees the owner also sees the timestamp.
                    self.owners[i].store(owner, Ordering::Release);
                    tracing::debug!(port, owner, "dedicated port allocated");
                    return Ok((port, listener));
                }
                Err((op, e)) if is_taken(&e) => {
                    self.bind_failures.fetch_add(1, Ordering::Relaxed);
                    let until = now.saturating_add(self.config.external_retry_ms);
                    self.skip_until_ms[i].store(until, Ordering::Relaxed);
                    tracing::warn!(
                        port,
                        op,
                        error = %e,
                        skip_ms = self.config.external_retry_ms,
                        "dedicated port taken by another process (or not permitted); skipping it"
                    );
                    passed_over.push(port);
                    if binds >= self.config.max_bind_attempts {
                        return Err(Failure::Exhausted(
                            "max_bind_attempts binds failed in a row",
                        ));
                    }
                }
                Err((op, e)) => {
                    self.bitmap.release(port);
                    return Err(Failure::Other(PortError::Io {
                        op,
                        target: SocketAddr::new(self.config.bind_ip, port).to_string(),
                        source: e,
                    }));
                }
            }
        }
        Err(Failure::Exhausted(
            "the free ports left are held by other processes",
        ))
    }

    /// Give back `port` held by session `owner`. Returns false (and changes
    /// nothing) when the port is not held by that owner, so a late or
    /// duplicate release can never free a port a newer session now owns.
    /// Drop the listener first (the worker does), then call this.
    pub fn release(&self, port: u16, owner: u64) -> bool {
        let Some(i) = self.config.range.index_of(port) else {
            return false;
        };
        if owner == 0
            || self.owners[i]
                .compare_exchange(owner, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            tracing::debug!(
                port,
                owner,
                "release of a port this owner does not hold; ignored"
            );
            return false;
        }
        self.allocated_at[i].store(0, Ordering::Relaxed);
        // The owner slot is cleared before the bit: a new allocation can
        // only start after this and finds a clean slot.
        self.bitmap.release(port)
    }

    /// Session holding `port`, if any (None also while an allocation is
    /// between claiming and binding).
    pub fn owner_of(&self, port: u16) -> Option<u64> {
        let i = self.config.range.index_of(port)?;
        if !self.bitmap.is_claimed(port) {
            return None;
        }
        match self.owners[i].load(Ordering::Acquire) {
            0 => None,
            o => Some(o),
        }
    }

    pub fn is_claimed(&self, port: u16) -> bool {
        self.bitmap.is_claimed(port)
    }

    /// `(port, owner)` of every claimed port with a recorded owner.
    pub fn owned(&self) -> Vec<(u16, u64)> {
        self.allocations()
            .into_iter()
            .map(|a| (a.port, a.owner))
            .collect()
    }

    /// What to persist: every claimed port with a recorded owner, ascending.
    /// A snapshot: an entry may lag a concurrent change by one step, which
    /// the next (coalesced) save corrects.
    pub fn allocations(&self) -> Vec<Allocation> {
        self.bitmap
            .claimed()
            .into_iter()
            .filter_map(|port| {
                let i = self.config.range.index_of(port)?;
                let owner = self.owners[i].load(Ordering::Acquire);
                (owner != 0).then(|| Allocation {
                    port,
                    owner,
                    allocated_at_unix_ms: self.allocated_at[i].load(Ordering::Relaxed),
                })
            })
            .collect()
    }

    pub fn stats(&self) -> PoolStats {
        let now = self.now_ms();
        let externally_taken = self
            .skip_until_ms
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) > now)
            .count();
        let ports = self.bitmap.stats();
        PoolStats {
            total_ports: ports.total_ports,
            allocated_ports: ports.allocated_ports,
            free_ports: ports.free_ports,
            utilization_percent: ports.utilization_percent,
            health: ports.health,
            externally_taken,
            bind_failures_total: self.bind_failures.load(Ordering::Relaxed),
            exhausted_total: self.exhausted.load(Ordering::Relaxed),
        }
    }

    /// Mark a persisted allocation claimed for `owner` without binding
    /// anything: used by [`restore_and_reclaim`](super::restore_and_reclaim)
    /// at start, and usable to build an offline view of `ports.json` (e.g.
    /// `consolegate ports status` with the appliance stopped). False if the
    /// port is outside the range, `owner` is 0, or it is already claimed.
    /// Not for sessions of a running pool: use [`allocate`](Self::allocate).
    pub fn restore_claim(&self, port: u16, owner: u64, allocated_at_unix_ms: u64) -> bool {
        let Some(i) = self.config.range.index_of(port) else {
            return false;
        };
        if owner == 0 || !self.bitmap.try_claim(port) {
            return false;
        }
        self.allocated_at[i].store(allocated_at_unix_ms, Ordering::Relaxed);
        self.owners[i].store(owner, Ordering::Release);
        true
    }

    /// Does anything listen on `port` at `bind_ip`? Binds a throwaway socket
    /// with the same options as a real listener (so TIME_WAIT does not count
    /// as "in use") and closes it at once. Errors other than "taken" are
    /// returned so the caller can stay on the safe side.
    pub(super) fn probe(&self, port: u16) -> io::Result<Probe> {
        let addr = SocketAddr::new(self.config.bind_ip, port);
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        match socket.bind(&addr.into()) {
            Ok(()) => Ok(Probe::Free),
            Err(e) if is_taken(&e) => Ok(Probe::InUse),
            Err(e) => Err(e),
        }
    }

    #[cfg(test)]
    pub(super) fn bitmap(&self) -> &PortBitmap {
        &self.bitmap
    }
}

/// Why [`PortPool::search`] gave up.
enum Failure {
    Exhausted(&'static str),
    Other(PortError),
}

/// Another process holds the port (or we may not bind it): skip it.
fn is_taken(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied
    )
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Socket, SO_REUSEADDR, non-blocking, bind, listen. The error says which
/// step failed (listen can also report EADDRINUSE on Linux).
fn bind_listener(
    ip: IpAddr,
    port: u16,
    backlog: u32,
) -> Result<TcpListener, (&'static str, io::Error)> {
    let addr = SocketAddr::new(ip, port);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| ("socket", e))?;
    socket
        .set_reuse_address(true)
        .map_err(|e| ("setsockopt SO_REUSEADDR", e))?;
    socket
        .set_nonblocking(true)
        .map_err(|e| ("set non-blocking", e))?;
    socket.bind(&addr.into()).map_err(|e| ("bind", e))?;
    // Validated to be at most 65535, so the conversion cannot fail.
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    socket.listen(backlog).map_err(|e| ("listen", e))?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{config, free_range, LOOPBACK};
    use super::*;
    use std::collections::BTreeSet;
    use std::io::ErrorKind;
    use std::net::TcpStream;
    use std::sync::atomic::AtomicBool;

    fn pool(range: PortRange) -> PortPool {
        PortPool::new(config(range)).unwrap()
    }

    fn exhausted_reason(r: Result<(u16, TcpListener), PortError>) -> &'static str {
        match r {
            Err(PortError::Exhausted { reason, .. }) => reason,
            other => panic!("expected Exhausted, got {other:?}"),
        }
    }

    #[test]
    fn config_validation_names_the_key() {
        assert!(PortPoolConfig::default().validate().is_ok());
        type Breaker = fn(&mut PortPoolConfig);
        let cases: [(&str, Breaker); 6] = [
            ("listen_backlog", |c| c.listen_backlog = 0),
            ("listen_backlog", |c| c.listen_backlog = 70_000),
            ("max_bind_attempts", |c| c.max_bind_attempts = 0),
            ("max_bind_attempts", |c| c.max_bind_attempts = 5000),
            ("external_retry_ms", |c| c.external_retry_ms = u64::MAX),
            ("exhausted_retry_after_secs", |c| {
                c.exhausted_retry_after_secs = 0
            }),
        ];
        for (key, break_it) in cases {
            let mut c = PortPoolConfig::default();
            break_it(&mut c);
            match PortPool::new(c) {
                Err(PortError::InvalidConfig { key: k, .. }) => assert_eq!(k, key),
                other => panic!("expected InvalidConfig for {key}, got {other:?}"),
            }
        }
    }

    /// Dedicated-port mode with 200 concurrent sessions: 200 distinct ports,
    /// each a real non-blocking listener, all free again after release.
    #[test]
    fn two_hundred_concurrent_sessions_get_distinct_listeners() {
        const SESSIONS: u64 = 200;
        const THREADS: u64 = 8;
        // Slack in the range so a port taken meanwhile is simply skipped.
        let range = free_range(240);
        let pool = pool(range);
        let mut sessions: Vec<(u64, u16, TcpListener)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let pool = &pool;
                    s.spawn(move || {
                        (0..SESSIONS / THREADS)
                            .map(|i| {
                                let owner = t * (SESSIONS / THREADS) + i + 1;
                                let (port, l) = pool.allocate(owner).expect("allocate");
                                (owner, port, l)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let ports: BTreeSet<u16> = sessions.iter().map(|s| s.1).collect();
        assert_eq!(ports.len(), SESSIONS as usize, "ports must be distinct");
        assert_eq!(pool.stats().allocated_ports, SESSIONS as usize);
        assert_eq!(pool.allocations().len(), SESSIONS as usize);
        for (owner, port, l) in &sessions {
            assert!(range.contains(*port));
            assert_eq!(pool.owner_of(*port), Some(*owner));
            assert_eq!(l.local_addr().unwrap().port(), *port);
            // Non-blocking: nothing pending → WouldBlock, not a hang.
            assert_eq!(l.accept().unwrap_err().kind(), ErrorKind::WouldBlock);
        }
        // Each listener really accepts (switch to blocking to wait without a sleep).
        for (_, port, l) in sessions.iter().step_by(10) {
            let _client = TcpStream::connect((LOOPBACK, *port)).unwrap();
            l.set_nonblocking(false).unwrap();
            l.accept().unwrap();
        }
        // Session end: the worker drops the listener, then the port is released.
        for (owner, port, l) in sessions.drain(..) {
            drop(l);
            assert!(pool.release(port, owner));
        }
        let stats = pool.stats();
        assert_eq!((stats.allocated_ports, stats.free_ports), (0, range.len()));
        assert!(pool.allocations().is_empty());
        for port in ports {
            TcpListener::bind((LOOPBACK, port)).expect("released port is bindable again");
        }
    }

    /// Many threads allocate and release real listeners over a small range;
    /// no port is ever held by two sessions and all are free at the end.
    #[test]
    fn concurrent_allocate_release_never_shares_a_port() {
        let range = free_range(24);
        let pool = pool(range);
        let held: Vec<AtomicBool> = (0..range.len()).map(|_| AtomicBool::new(false)).collect();
        let next_owner = AtomicU64::new(1);
        std::thread::scope(|s| {
            for _ in 0..12 {
                let (pool, held, next_owner) = (&pool, &held, &next_owner);
                s.spawn(move || {
                    for _ in 0..60 {
                        let owner = next_owner.fetch_add(1, Ordering::Relaxed);
                        match pool.allocate(owner) {
                            Ok((port, l)) => {
                                let i = range.index_of(port).unwrap();
                                assert!(
                                    !held[i].swap(true, Ordering::SeqCst),
                                    "port {port} shared"
                                );
                                drop(l);
                                held[i].store(false, Ordering::SeqCst);
                                assert!(pool.release(port, owner));
                            }
                            // 12 threads on 24 ports rarely fill it, but may.
                            Err(PortError::Exhausted { .. }) => {}
                            Err(e) => panic!("unexpected {e}"),
                        }
                    }
                });
            }
        });
        assert_eq!(pool.stats().allocated_ports, 0);
        assert_eq!(pool.stats().bind_failures_total, 0);
    }

    /// A port another listener already holds is skipped and reported; it is
    /// not bound again until `external_retry_ms` has passed.
    #[test]
    fn port_held_by_another_process_is_skipped_and_reported() {
        let range = free_range(3);
        let first = range.first();
        let squatter = TcpListener::bind((LOOPBACK, first)).unwrap();
        let pool = pool(range);

        let (p1, _l1) = pool.allocate(1).unwrap();
        assert_eq!(p1, first + 1, "the held port is skipped");
        let stats = pool.stats();
        assert_eq!((stats.externally_taken, stats.bind_failures_total), (1, 1));
        assert_eq!(stats.allocated_ports, 1, "the skipped port is not claimed");
        assert!(!pool.is_claimed(first));

        let (p2, _l2) = pool.allocate(2).unwrap();
        assert_eq!(p2, first + 2);
        // Only the squatted port is left; it is skipped without another bind.
        let r = pool.allocate(3);
        assert_eq!(
            exhausted_reason(r),
            "the free ports left are held by other processes"
        );
        assert_eq!(pool.stats().bind_failures_total, 1);
        assert_eq!(pool.stats().allocated_ports, 2);
        assert_eq!(pool.stats().exhausted_total, 1);
        drop(squatter);
    }

    #[test]
    fn externally_taken_port_is_retried_after_the_skip_time() {
        let range = free_range(2);
        let first = range.first();
        let squatter = TcpListener::bind((LOOPBACK, first)).unwrap();
        let pool = PortPool::new(PortPoolConfig {
            external_retry_ms: 0,
            ..config(range)
        })
        .unwrap();
        let (p1, _l1) = pool.allocate(1).unwrap();
        assert_eq!(p1, first + 1);
        assert_eq!(
            pool.stats().externally_taken,
            0,
            "skip time 0 means retry at once"
        );
        // Still squatted: bind fails again, and nothing else is free.
        let r = pool.allocate(2);
        assert!(matches!(r, Err(PortError::Exhausted { .. })), "{r:?}");
        assert_eq!(pool.stats().bind_failures_total, 2);
        drop(squatter);
        let (p2, _l2) = pool.allocate(2).unwrap();
        assert_eq!(p2, first);
    }

    #[test]
    fn gives_up_after_max_bind_attempts() {
        let range = free_range(5);
        let squatters: Vec<TcpListener> = (range.first()..=range.last())
            .map(|p| TcpListener::bind((LOOPBACK, p)).unwrap())
            .collect();
        let pool = PortPool::new(PortPoolConfig {
            max_bind_attempts: 2,
            ..config(range)
        })
        .unwrap();
        let r = pool.allocate(1);
        assert_eq!(
            exhausted_reason(r),
            "max_bind_attempts binds failed in a row"
        );
        let stats = pool.stats();
        assert_eq!((stats.bind_failures_total, stats.externally_taken), (2, 2));
        assert_eq!(stats.allocated_ports, 0, "no bit leaked");
        drop(squatters);
    }

    #[test]
    fn exhaustion_then_release_makes_room() {
        let range = free_range(4);
        let pool = pool(range);
        let mut held: Vec<(u16, TcpListener)> =
            (1..=4).map(|o| pool.allocate(o).unwrap()).collect();
        let err = pool.allocate(5).unwrap_err();
        assert_eq!(err.code(), "port_pool_exhausted");
        assert_eq!(err.retry_after_secs(), Some(5));
        match &err {
            PortError::Exhausted {
                total,
                allocated,
                reason,
                ..
            } => {
                assert_eq!((*total, *allocated), (4, 4));
                assert_eq!(*reason, "no free port left in the range");
            }
            other => panic!("{other:?}"),
        }
        let stats = pool.stats();
        assert_eq!((stats.health, stats.exhausted_total), (Health::Critical, 1));

        let (port, l) = held.remove(2);
        drop(l);
        assert!(pool.release(port, 3));
        let (again, _l) = pool.allocate(5).unwrap();
        assert_eq!(again, port);
        assert_eq!(pool.owner_of(again), Some(5));
    }

    #[test]
    fn release_checks_the_owner() {
        let range = free_range(2);
        let pool = pool(range);
        assert!(matches!(pool.allocate(0), Err(PortError::InvalidOwner)));
        let (port, l) = pool.allocate(7).unwrap();
        assert!(!pool.release(port, 8), "someone else's port");
        assert!(!pool.release(port, 0));
        assert!(!pool.release(0, 7) && !pool.release(range.last().wrapping_add(1), 7));
        assert_eq!(pool.owner_of(port), Some(7));
        drop(l);
        assert!(pool.release(port, 7));
        assert!(!pool.release(port, 7), "double release is refused");
        assert_eq!(pool.owner_of(port), None);
        assert_eq!(pool.stats().allocated_ports, 0);
    }

    #[test]
    fn allocations_snapshot_has_owner_and_time() {
        let range = free_range(3);
        let pool = pool(range);
        let (p, _l) = pool.allocate(42).unwrap();
        // An allocation in flight (claimed, no owner yet) is not persisted.
        let in_flight = pool.bitmap().claim_next().unwrap();
        let allocs = pool.allocations();
        assert_eq!(allocs.len(), 1);
        assert_eq!((allocs[0].port, allocs[0].owner), (p, 42));
        assert!(allocs[0].allocated_at_unix_ms > 1_600_000_000_000);
        assert_eq!(pool.owned(), vec![(p, 42)]);
        assert_eq!(pool.owner_of(in_flight), None);
    }

    #[test]
    fn other_os_errors_are_io_and_leak_nothing() {
        let range = free_range(2);
        // TEST-NET-1 is not a local address: bind fails with EADDRNOTAVAIL.
        let pool = PortPool::new(PortPoolConfig {
            bind_ip: "192.0.2.1".parse().unwrap(),
            ..config(range)
        })
        .unwrap();
        match pool.allocate(1) {
            Err(e @ PortError::Io { op: "bind", .. }) => {
                assert_eq!(e.code(), "port_io_error");
                assert!(e.to_string().contains("192.0.2.1"), "{e}");
            }
            other => panic!("expected Io, got {other:?}"),
        }
        assert_eq!(pool.stats().allocated_ports, 0);
        assert_eq!(pool.stats().bind_failures_total, 0);
    }

    #[test]
    fn restore_claim_builds_an_offline_view() {
        let range = free_range(4);
        let pool = pool(range);
        let f = range.first();
        assert!(pool.restore_claim(f, 9, 123));
        assert!(!pool.restore_claim(f, 10, 0), "already claimed");
        assert!(!pool.restore_claim(f + 1, 0, 0), "owner 0 is reserved");
        assert!(
            !pool.restore_claim(range.last() + 1, 9, 0),
            "outside the range"
        );
        assert_eq!(pool.owner_of(f), Some(9));
        assert_eq!(pool.stats().allocated_ports, 1);
        assert_eq!(pool.allocations()[0].allocated_at_unix_ms, 123);
        // allocate never hands out a restored port.
        let got: Vec<u16> = (1..=3).map(|o| pool.allocate(o).unwrap().0).collect();
        assert!(!got.contains(&f));
        assert!(pool.release(f, 9));
    }

    #[test]
    fn stats_serialize_flat() {
        let pool = pool(free_range(2));
        let json = serde_json::to_value(pool.stats()).unwrap();
        for key in [
            "total_ports",
            "allocated_ports",
            "free_ports",
            "utilization_percent",
            "health",
            "externally_taken",
            "bind_failures_total",
            "exhausted_total",
        ] {
            assert!(json.get(key).is_some(), "missing {key} in {json}");
        }
        assert_eq!(json["health"], "ok");
        assert_eq!(pool.stats().ports(), pool.bitmap().stats());
    }
}
