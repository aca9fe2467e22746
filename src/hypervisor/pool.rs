//! A pool of API sessions to one hypervisor, generic over how a session is
//! made ([`Connector`]): created lazily, at most `pool_size`, checked on
//! every checkout (age first, then a cheap validation call), replaced when
//! stale, kept alive below the host's idle timeout, and logged out on every
//! path — a replaced, broken or surplus session is closed, and
//! [`Pool::shutdown`] closes them all. Sessions never logged out are what
//! exhaust a host (ESXi allows 500).
//!
//! A checked-out session ([`Pooled`]) is never closed while it is out: the
//! caller reads a console ticket while it holds its session; dropping the
//! guard returns it. A checkout that waits longer than `acquire_timeout_ms`
//! fails with [`HypervisorError::Busy`].
//!
//! Runs on the control plane's tokio runtime; every future is `Send`. It
//! does not queue by priority or cache results (the control plane does),
//! and depends on nothing in the crate but the hypervisor model.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::model::{HvResult, HypervisorError};

/// Sessions per hypervisor unless configured.
pub const DEFAULT_POOL_SIZE: usize = 5;
/// Largest `pool_size` accepted: a tenth of ESXi's default session cap.
pub const MAX_POOL_SIZE: usize = 50;
/// A session older than this is logged out and replaced at checkout.
pub const DEFAULT_SESSION_TTL_MS: u64 = 300_000;
/// How long a checkout waits for a free session before `Busy`.
pub const DEFAULT_ACQUIRE_TIMEOUT_MS: u64 = 2_000;
/// An idle session unused this long is validated (which keeps it alive):
/// 10 minutes, as govmomi does, well below ESXi's and vCenter's 30-minute
/// idle timeout.
pub const DEFAULT_KEEPALIVE_INTERVAL_MS: u64 = 600_000;
/// The host's idle timeout the keep-alive interval must stay below.
pub const HOST_IDLE_TIMEOUT_MS: u64 = 30 * 60 * 1000;

/// Sizes and times of a pool; units in the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub pool_size: usize,
    pub session_ttl_ms: u64,
    pub acquire_timeout_ms: u64,
    pub keepalive_interval_ms: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            pool_size: DEFAULT_POOL_SIZE,
            session_ttl_ms: DEFAULT_SESSION_TTL_MS,
            acquire_timeout_ms: DEFAULT_ACQUIRE_TIMEOUT_MS,
            keepalive_interval_ms: DEFAULT_KEEPALIVE_INTERVAL_MS,
        }
    }
}

impl PoolConfig {
    /// Refuses sizes and times that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.pool_size == 0 || self.pool_size > MAX_POOL_SIZE {
            return Err(format!(
                "pool_size {} must be 1..={MAX_POOL_SIZE}",
                self.pool_size
            ));
        }
        if self.session_ttl_ms == 0 || self.acquire_timeout_ms == 0 {
            return Err("session_ttl_ms and acquire_timeout_ms must be above 0".into());
        }
        if self.keepalive_interval_ms == 0 || self.keepalive_interval_ms >= HOST_IDLE_TIMEOUT_MS {
            return Err(format!(
                "keepalive_interval_ms {} must be above 0 and below the hosts' idle timeout ({HOST_IDLE_TIMEOUT_MS} ms)",
                self.keepalive_interval_ms
            ));
        }
        Ok(())
    }
}

/// How sessions are made, checked and ended (vSphere: Login, CurrentTime,
/// Logout).
pub trait Connector: Send + Sync + 'static {
    type Connection: Send + Sync + 'static;
    /// Opens a new session (logs in).
    fn connect(&self) -> impl Future<Output = HvResult<Self::Connection>> + Send;
    /// A cheap call proving the session still works.
    fn validate(&self, connection: &Self::Connection) -> impl Future<Output = HvResult<()>> + Send;
    /// Ends a session (logs out); best effort, bounded in time by the
    /// implementation.
    fn close(&self, connection: Self::Connection) -> impl Future<Output = ()> + Send;
}

/// What a pool reports (`GET /api/v1/hypervisors`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    pub pool_size: usize,
    /// Sessions open on the host (idle + checked out + being checked).
    pub total_connections: usize,
    /// Idle sessions ready for a checkout.
    pub available_connections: usize,
    /// Sessions checked out by callers now.
    pub active_connections: usize,
    /// Sessions replaced because they were stale (too old, or failed
    /// validation).
    pub reconnects: u64,
    /// Failed logins and validations.
    pub errors: u64,
    /// Whether the last contact with the hypervisor worked; `None` before
    /// the first (the pool is lazy).
    pub reachable: Option<bool>,
    pub logins: u64,
    pub logouts: u64,
    /// Checkouts that found every session in use and had to wait (the
    /// `hypervisor_pool_exhausted` alert watches these and the next).
    #[serde(default)]
    pub waited_checkouts: u64,
    /// Checkouts refused (`Busy`) after `acquire_timeout_ms` of waiting.
    #[serde(default)]
    pub refused_checkouts: u64,
}

struct Idle<T> {
    connection: T,
    created: Instant,
    last_used: Instant,
}

struct State<T> {
    /// Most recently used last: checkouts take from the end, keep-alive
    /// from the front.
    idle: Vec<Idle<T>>,
    total: usize,
}

#[derive(Default)]
struct Counters {
    reconnects: AtomicU64,
    errors: AtomicU64,
    logins: AtomicU64,
    logouts: AtomicU64,
    waited: AtomicU64,
    refused: AtomicU64,
    active: AtomicUsize,
    /// 0 unknown, 1 reachable, 2 unreachable.
    reachable: std::sync::atomic::AtomicU8,
}

struct Inner<C: Connector> {
    connector: C,
    config: PoolConfig,
    permits: Arc<Semaphore>,
    state: Mutex<State<C::Connection>>,
    counters: Counters,
    closed: AtomicBool,
    /// The runtime that closes sessions dropped outside an async context.
    runtime: OnceLock<tokio::runtime::Handle>,
}

/// A pool of sessions; cheap to clone (shared).
pub struct Pool<C: Connector> {
    inner: Arc<Inner<C>>,
}

impl<C: Connector> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
        }
    }
}

impl<C: Connector> Pool<C> {
    /// A pool that connects nothing until the first checkout.
    pub fn new(connector: C, config: PoolConfig) -> Result<Pool<C>, String> {
        config.validate()?;
        Ok(Pool {
            inner: Arc::new(Inner {
                connector,
                config,
                permits: Arc::new(Semaphore::new(config.pool_size)),
                state: Mutex::new(State {
                    idle: Vec::with_capacity(config.pool_size),
                    total: 0,
                }),
                counters: Counters::default(),
                closed: AtomicBool::new(false),
                runtime: OnceLock::new(),
            }),
        })
    }

    pub fn config(&self) -> &PoolConfig {
        &self.inner.config
    }

    pub fn connector(&self) -> &C {
        &self.inner.connector
    }

    /// A session for the caller's exclusive use until the guard drops:
    /// an idle one that is young enough and passes validation, else a new
    /// one. `Busy` after `acquire_timeout_ms` without a free slot.
    pub async fn acquire(&self) -> HvResult<Pooled<C>> {
        let inner = &self.inner;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let _ = inner.runtime.set(handle);
        }
        if inner.closed.load(Ordering::Acquire) {
            return Err(shut_down());
        }
        let permit = match inner.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(shut_down()),
            Err(tokio::sync::TryAcquireError::NoPermits) => self.wait_for_permit().await?,
        };
        if let Some(taken) = self.take_idle() {
            if let Some(entry) = self.check(taken).await? {
                return Ok(self.lend(entry, permit));
            }
            inner.counters.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        let entry = self.connect().await?;
        Ok(self.lend(entry, permit))
    }

    /// Every session is in use: wait up to `acquire_timeout_ms` for one
    /// (counted as a waited checkout, and as refused when it times out).
    async fn wait_for_permit(&self) -> HvResult<OwnedSemaphorePermit> {
        let inner = &self.inner;
        inner.counters.waited.fetch_add(1, Ordering::Relaxed);
        let wait = Duration::from_millis(inner.config.acquire_timeout_ms);
        match tokio::time::timeout(wait, inner.permits.clone().acquire_owned()).await {
            Err(_) => {
                inner.counters.refused.fetch_add(1, Ordering::Relaxed);
                Err(HypervisorError::Busy(format!(
                    "all {} sessions in use for {} ms",
                    inner.config.pool_size, inner.config.acquire_timeout_ms
                )))
            }
            Ok(Err(_)) => Err(shut_down()),
            Ok(Ok(permit)) => Ok(permit),
        }
    }

    /// Pops the most recently used idle session, held by a guard that puts
    /// it back if the checkout is cancelled while checking it.
    fn take_idle(&self) -> Option<Taken<C>> {
        let entry = self.inner.lock_state().idle.pop()?;
        Some(Taken {
            entry: Some(entry),
            inner: self.inner.clone(),
        })
    }

    /// TTL first, then validation: `Some` when the session is usable,
    /// `None` when it was retired (and must be replaced).
    async fn check(&self, mut taken: Taken<C>) -> HvResult<Option<Idle<C::Connection>>> {
        let inner = &self.inner;
        let ttl = Duration::from_millis(inner.config.session_ttl_ms);
        let expired = taken.entry().created.elapsed() >= ttl;
        if expired {
            tracing::debug!(
                "pooled session older than {} ms: logging it out",
                ttl.as_millis()
            );
            inner.retire(taken.release());
            return Ok(None);
        }
        match inner.connector.validate(&taken.entry().connection).await {
            Ok(()) => {
                inner.note_reachable(true);
                Ok(Some(taken.release()))
            }
            Err(error) => {
                tracing::info!(
                    code = error.code(),
                    "pooled session failed validation: {error}"
                );
                inner.counters.errors.fetch_add(1, Ordering::Relaxed);
                if is_unreachable(&error) {
                    inner.note_reachable(false);
                }
                inner.retire(taken.release());
                Ok(None)
            }
        }
    }

    async fn connect(&self) -> HvResult<Idle<C::Connection>> {
        let inner = &self.inner;
        match inner.connector.connect().await {
            Ok(connection) => {
                inner.counters.logins.fetch_add(1, Ordering::Relaxed);
                inner.note_reachable(true);
                let now = Instant::now();
                let mut state = inner.lock_state();
                state.total += 1;
                debug_assert!(state.total <= inner.config.pool_size, "pool over its size");
                Ok(Idle {
                    connection,
                    created: now,
                    last_used: now,
                })
            }
            Err(error) => {
                inner.counters.errors.fetch_add(1, Ordering::Relaxed);
                if is_unreachable(&error) {
                    inner.note_reachable(false);
                }
                Err(error)
            }
        }
    }

    fn lend(&self, entry: Idle<C::Connection>, permit: OwnedSemaphorePermit) -> Pooled<C> {
        self.inner.counters.active.fetch_add(1, Ordering::Relaxed);
        Pooled {
            entry: Some(entry),
            inner: self.inner.clone(),
            broken: false,
            _permit: permit,
        }
    }

    /// One keep-alive pass: each idle session unused for
    /// `keepalive_interval_ms` is validated (which resets the host's idle
    /// timer) and put back, or logged out when too old or invalid. Skips a
    /// session when every slot is checked out (those are in use anyway).
    pub async fn keepalive(&self) {
        let inner = &self.inner;
        let interval = Duration::from_millis(inner.config.keepalive_interval_ms);
        let rounds = inner.lock_state().idle.len();
        for _ in 0..rounds {
            let Ok(_permit) = inner.permits.clone().try_acquire_owned() else {
                return;
            };
            let taken = {
                let mut state = inner.lock_state();
                let due = state
                    .idle
                    .first()
                    .is_some_and(|e| e.last_used.elapsed() >= interval);
                if !due {
                    return; // the front is the least recently used
                }
                state.idle.remove(0)
            };
            let taken = Taken {
                entry: Some(taken),
                inner: inner.clone(),
            };
            if let Some(mut entry) = self.check(taken).await.ok().flatten() {
                entry.last_used = Instant::now();
                inner.lock_state().idle.push(entry);
            }
        }
    }

    /// Runs [`Pool::keepalive`] every `keepalive_interval_ms` / 2 until the
    /// pool shuts down (so no idle session goes unvalidated longer than
    /// 1.5 intervals).
    pub fn spawn_keepalive(&self) -> tokio::task::JoinHandle<()> {
        let pool = self.clone();
        let period = Duration::from_millis((self.inner.config.keepalive_interval_ms / 2).max(1));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            while !pool.inner.closed.load(Ordering::Acquire) {
                ticker.tick().await;
                pool.keepalive().await;
            }
        })
    }

    /// Logs every session out: refuses new checkouts at once, waits up to
    /// `grace` for checked-out sessions to come back, then closes all idle
    /// ones. A session still out after `grace` is logged out when its
    /// guard drops.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Release);
        let size = u32::try_from(inner.config.pool_size).unwrap_or(u32::MAX);
        let _all = tokio::time::timeout(grace, inner.permits.acquire_many(size)).await;
        inner.permits.close();
        let idle: Vec<_> = {
            let mut state = inner.lock_state();
            state.total -= state.idle.len();
            std::mem::take(&mut state.idle)
        };
        for entry in idle {
            inner.connector.close(entry.connection).await;
            inner.counters.logouts.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> PoolStats {
        let inner = &self.inner;
        let (total, available) = {
            let state = inner.lock_state();
            (state.total, state.idle.len())
        };
        let c = &inner.counters;
        PoolStats {
            pool_size: inner.config.pool_size,
            total_connections: total,
            available_connections: available,
            active_connections: c.active.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            reachable: match c.reachable.load(Ordering::Relaxed) {
                1 => Some(true),
                2 => Some(false),
                _ => None,
            },
            logins: c.logins.load(Ordering::Relaxed),
            logouts: c.logouts.load(Ordering::Relaxed),
            waited_checkouts: c.waited.load(Ordering::Relaxed),
            refused_checkouts: c.refused.load(Ordering::Relaxed),
        }
    }
}

fn shut_down() -> HypervisorError {
    HypervisorError::Unreachable("the hypervisor's session pool is shut down".into())
}

/// Errors that say the hypervisor cannot be reached (as opposed to a
/// refused login or a fault).
fn is_unreachable(error: &HypervisorError) -> bool {
    matches!(
        error,
        HypervisorError::Unreachable(_) | HypervisorError::Timeout(_)
    )
}

impl<C: Connector> Inner<C> {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, State<C::Connection>> {
        // A panic while holding the lock leaves the state consistent (each
        // critical section is a push, pop or counter change), so a
        // poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note_reachable(&self, reachable: bool) {
        let value = if reachable { 1 } else { 2 };
        self.counters.reachable.store(value, Ordering::Relaxed);
    }

    /// Forgets a session and logs it out in the background (a checkout
    /// does not wait for the logout of the session it replaces).
    fn retire(self: &Arc<Self>, entry: Idle<C::Connection>) {
        {
            let mut state = self.lock_state();
            debug_assert!(
                state.total > 0,
                "retiring a session the pool does not count"
            );
            state.total = state.total.saturating_sub(1);
        }
        let handle = tokio::runtime::Handle::try_current()
            .ok()
            .or_else(|| self.runtime.get().cloned());
        let Some(handle) = handle else {
            tracing::warn!("no runtime to log a hypervisor session out; it is dropped");
            return;
        };
        let inner = self.clone();
        handle.spawn(async move {
            inner.connector.close(entry.connection).await;
            inner.counters.logouts.fetch_add(1, Ordering::Relaxed);
        });
    }
}

/// An idle session taken out for checking; put back if the checkout is
/// cancelled (the caller went away) before it is released.
struct Taken<C: Connector> {
    entry: Option<Idle<C::Connection>>,
    inner: Arc<Inner<C>>,
}

impl<C: Connector> Taken<C> {
    fn entry(&mut self) -> &Idle<C::Connection> {
        self.entry
            .as_ref()
            .expect("taken entry present until released")
    }

    fn release(mut self) -> Idle<C::Connection> {
        self.entry.take().expect("taken entry released once")
    }
}

impl<C: Connector> Drop for Taken<C> {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            self.inner.lock_state().idle.push(entry);
        }
    }
}

/// A checked-out session. Dropping it returns the session to the pool (or
/// logs it out, when [`Pooled::discard`] was called or the pool is shut
/// down).
pub struct Pooled<C: Connector> {
    entry: Option<Idle<C::Connection>>,
    inner: Arc<Inner<C>>,
    broken: bool,
    // Dropped after `drop` below put the session back, so a waiter that
    // gets this permit finds the session idle.
    _permit: OwnedSemaphorePermit,
}

impl<C: Connector> Pooled<C> {
    /// The session is no good (the host said NotAuthenticated): log it out
    /// instead of returning it.
    pub fn discard(&mut self) {
        self.broken = true;
    }
}

impl<C: Connector> std::ops::Deref for Pooled<C> {
    type Target = C::Connection;
    fn deref(&self) -> &C::Connection {
        &self
            .entry
            .as_ref()
            .expect("a pooled session is present until dropped")
            .connection
    }
}

impl<C: Connector> Drop for Pooled<C> {
    fn drop(&mut self) {
        self.inner.counters.active.fetch_sub(1, Ordering::Relaxed);
        let Some(mut entry) = self.entry.take() else {
            return;
        };
        if self.broken || self.inner.closed.load(Ordering::Acquire) {
            self.inner.retire(entry);
            return;
        }
        entry.last_used = Instant::now();
        self.inner.lock_state().idle.push(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// A fake host: hands out numbered sessions, forgets them on logout or
    /// when told to expire them, and can be "down".
    #[derive(Default)]
    struct HostState {
        next_id: u64,
        live: HashSet<u64>,
        logins: u64,
        logouts: u64,
        validations: u64,
        down: bool,
        validate_delay: Option<Duration>,
    }

    #[derive(Clone, Default)]
    struct Host(Arc<Mutex<HostState>>);

    impl Host {
        fn with<T>(&self, f: impl FnOnce(&mut HostState) -> T) -> T {
            f(&mut self.0.lock().unwrap())
        }
        fn expire_all(&self) {
            self.with(|h| h.live.clear());
        }
    }

    struct Fake(Host);

    impl Connector for Fake {
        type Connection = u64;

        fn connect(&self) -> impl Future<Output = HvResult<u64>> + Send {
            let host = self.0.clone();
            async move {
                host.with(|h| {
                    if h.down {
                        return Err(HypervisorError::Unreachable("connection refused".into()));
                    }
                    h.next_id += 1;
                    h.logins += 1;
                    h.live.insert(h.next_id);
                    Ok(h.next_id)
                })
            }
        }

        fn validate(&self, connection: &u64) -> impl Future<Output = HvResult<()>> + Send {
            let (host, id) = (self.0.clone(), *connection);
            async move {
                if let Some(delay) = host.with(|h| h.validate_delay) {
                    tokio::time::sleep(delay).await;
                }
                host.with(|h| {
                    h.validations += 1;
                    if h.down {
                        Err(HypervisorError::Unreachable("connection refused".into()))
                    } else if h.live.contains(&id) {
                        Ok(())
                    } else {
                        Err(HypervisorError::SessionExpired)
                    }
                })
            }
        }

        fn close(&self, connection: u64) -> impl Future<Output = ()> + Send {
            let host = self.0.clone();
            async move {
                host.with(|h| {
                    if h.live.remove(&connection) {
                        h.logouts += 1;
                    }
                })
            }
        }
    }

    fn config(pool_size: usize) -> PoolConfig {
        PoolConfig {
            pool_size,
            session_ttl_ms: 60_000,
            acquire_timeout_ms: 500,
            keepalive_interval_ms: 10_000,
        }
    }

    fn pool(size: usize) -> (Host, Pool<Fake>) {
        let host = Host::default();
        (host.clone(), Pool::new(Fake(host), config(size)).unwrap())
    }

    /// Lets spawned logouts run (bounded).
    async fn settle(until: impl Fn() -> bool) {
        for _ in 0..1000 {
            if until() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("background logouts did not finish");
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_are_made_lazily_and_reused() {
        let (host, pool) = pool(3);
        assert_eq!(pool.stats().total_connections, 0);
        assert_eq!(pool.stats().reachable, None);
        let first = pool.acquire().await.unwrap();
        let id = *first;
        assert_eq!(pool.stats().active_connections, 1);
        drop(first);
        let again = pool.acquire().await.unwrap();
        assert_eq!(*again, id, "the idle session is reused");
        assert_eq!(host.with(|h| (h.logins, h.validations)), (1, 1));
        let s = pool.stats();
        assert_eq!(
            (
                s.total_connections,
                s.available_connections,
                s.active_connections
            ),
            (1, 0, 1)
        );
        assert_eq!((s.logins, s.reachable), (1, Some(true)));
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_pool_size_and_busy_after_the_timeout() {
        let (host, pool) = pool(2);
        let a = pool.acquire().await.unwrap();
        let b = pool.acquire().await.unwrap();
        assert_ne!(*a, *b);
        let started = Instant::now();
        let err = pool
            .acquire()
            .await
            .err()
            .expect("a third checkout is refused");
        assert!(matches!(err, HypervisorError::Busy(_)), "{err}");
        assert_eq!(err.status(), 503);
        assert!(started.elapsed() >= Duration::from_millis(500));
        assert_eq!(host.with(|h| h.logins), 2);
        // A waiter gets a session as soon as one comes back, with no login.
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire().await.map(|s| *s) })
        };
        tokio::task::yield_now().await;
        let returned = *a;
        drop(a);
        assert_eq!(waiter.await.unwrap().unwrap(), returned);
        assert_eq!(host.with(|h| h.logins), 2);
        drop(b);
        assert_eq!(pool.stats().total_connections, 2);
        assert_eq!(pool.stats().available_connections, 2);
        // The refused third checkout and the waiter both had to wait.
        let s = pool.stats();
        assert_eq!((s.waited_checkouts, s.refused_checkouts), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_session_is_logged_out_and_replaced() {
        let (host, pool) = pool(2);
        let old = *pool.acquire().await.unwrap();
        tokio::time::advance(Duration::from_millis(60_001)).await;
        let fresh = pool.acquire().await.unwrap();
        assert_ne!(*fresh, old);
        settle(|| host.with(|h| h.logouts) == 1).await;
        assert!(!host.with(|h| h.live.contains(&old)));
        // TTL comes first: the expired one was not even validated.
        assert_eq!(host.with(|h| h.validations), 0);
        let s = pool.stats();
        assert_eq!(
            (s.reconnects, s.logins, s.logouts, s.total_connections),
            (1, 2, 1, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_the_host_forgot_is_replaced_at_checkout() {
        let (host, pool) = pool(2);
        let old = *pool.acquire().await.unwrap();
        host.expire_all();
        let fresh = pool.acquire().await.unwrap();
        assert_ne!(*fresh, old);
        let s = pool.stats();
        assert_eq!(
            (s.reconnects, s.errors, s.logins, s.total_connections),
            (1, 1, 2, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_discarded_session_is_logged_out_not_reused() {
        let (host, pool) = pool(2);
        let mut s = pool.acquire().await.unwrap();
        let id = *s;
        s.discard();
        drop(s);
        settle(|| host.with(|h| h.logouts) == 1).await;
        assert_ne!(*pool.acquire().await.unwrap(), id);
        assert_eq!(pool.stats().total_connections, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_host_is_reported_and_recovered_from() {
        let (host, pool) = pool(2);
        drop(pool.acquire().await.unwrap());
        host.with(|h| h.down = true);
        let err = pool.acquire().await.err().unwrap();
        assert!(matches!(err, HypervisorError::Unreachable(_)), "{err}");
        assert_eq!(pool.stats().reachable, Some(false));
        assert_eq!(pool.stats().total_connections, 0);
        host.with(|h| {
            h.down = false;
            h.live.clear(); // a restarted host knows no session
        });
        let s = pool.acquire().await.unwrap();
        assert_eq!(*s, 2);
        assert_eq!(pool.stats().reachable, Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_logs_every_session_out() {
        let (host, pool) = pool(3);
        let a = pool.acquire().await.unwrap();
        let b = pool.acquire().await.unwrap();
        let held = pool.acquire().await.unwrap();
        drop((a, b));
        // The held session is not logged out while it is out.
        pool.shutdown(Duration::from_millis(100)).await;
        assert_eq!(host.with(|h| h.logouts), 2);
        assert!(host.with(|h| h.live.contains(&*held)));
        assert!(matches!(
            pool.acquire().await.err().unwrap(),
            HypervisorError::Unreachable(_)
        ));
        drop(held);
        settle(|| host.with(|h| h.logouts) == 3).await;
        assert_eq!(host.with(|h| h.live.len()), 0);
        assert_eq!(pool.stats().total_connections, 0);
        assert_eq!(pool.stats().logouts, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_validates_idle_sessions_and_drops_dead_ones() {
        let (host, pool) = pool(3);
        let a = pool.acquire().await.unwrap();
        let b = pool.acquire().await.unwrap();
        let (kept, dead) = (*a, *b);
        drop((a, b));
        pool.keepalive().await;
        assert_eq!(host.with(|h| h.validations), 0, "nothing is due yet");
        tokio::time::advance(Duration::from_millis(10_000)).await;
        host.with(|h| h.live.remove(&dead));
        pool.keepalive().await;
        assert_eq!(host.with(|h| h.validations), 2);
        let s = pool.stats();
        assert_eq!((s.total_connections, s.available_connections), (1, 1));
        assert_eq!(*pool.acquire().await.unwrap(), kept);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_checkout_puts_the_session_back() {
        let (host, pool) = pool(1);
        drop(pool.acquire().await.unwrap());
        host.with(|h| h.validate_delay = Some(Duration::from_secs(5)));
        let cancelled = tokio::time::timeout(Duration::from_millis(10), pool.acquire()).await;
        assert!(cancelled.is_err());
        let s = pool.stats();
        assert_eq!(
            (
                s.total_connections,
                s.available_connections,
                s.active_connections
            ),
            (1, 1, 0)
        );
        host.with(|h| h.validate_delay = None);
        assert_eq!(*pool.acquire().await.unwrap(), 1);
    }

    #[test]
    fn configs_that_cannot_work_are_refused() {
        assert!(PoolConfig::default().validate().is_ok());
        for bad in [
            PoolConfig {
                pool_size: 0,
                ..PoolConfig::default()
            },
            PoolConfig {
                pool_size: MAX_POOL_SIZE + 1,
                ..PoolConfig::default()
            },
            PoolConfig {
                session_ttl_ms: 0,
                ..PoolConfig::default()
            },
            PoolConfig {
                keepalive_interval_ms: HOST_IDLE_TIMEOUT_MS,
                ..PoolConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let stats = serde_json::to_value(PoolStats {
            pool_size: 5,
            total_connections: 1,
            available_connections: 1,
            active_connections: 0,
            reconnects: 0,
            errors: 0,
            reachable: Some(true),
            logins: 1,
            logouts: 0,
            waited_checkouts: 0,
            refused_checkouts: 0,
        })
        .unwrap();
        assert_eq!(stats["available_connections"], 1);
        assert_eq!(stats["reachable"], true);
    }
}
