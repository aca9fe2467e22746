//! Caches shared by every user: the VM lists and the thumbnails. An entry
//! lives for its TTL; the cache is bounded in entries and in bytes; and
//! one fetch is in flight per key — a hundred callers asking for the same
//! thumbnail cause one hypervisor call, and all hundred get its answer.
//!
//! Built on `moka` (its future cache coalesces concurrent fetches of a key;
//! if the caller whose fetch runs goes away, another waiting caller's fetch
//! takes over). Both bounds come from one weight: an entry weighs its bytes
//! but never less than `max_bytes / max_entries`, so the total weight
//! (≤ `max_bytes`) bounds the bytes and the count together.
//!
//! Answers that will not change soon (VM not found, not running, no such
//! capability) are kept too, for `negative_ttl_ms`, so a storm of requests
//! for a powered-off VM's thumbnail does not become a storm of calls.
//! Transient failures (unreachable, busy, timeouts) are never kept.
//!
//! Runs on the control plane; depends on nothing but the hypervisor model.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::model::{HvResult, HypervisorError, VmInfo};

/// Time a "will not change soon" answer is kept unless configured.
pub const DEFAULT_NEGATIVE_TTL_MS: u64 = 5_000;

/// How a cached value counts against the byte bound.
pub trait Weigh {
    /// Bytes the value holds (an estimate for structured values).
    fn weight_bytes(&self) -> usize;
}

impl Weigh for Vec<VmInfo> {
    fn weight_bytes(&self) -> usize {
        self.iter()
            .map(|vm| {
                std::mem::size_of::<VmInfo>()
                    + vm.id.len()
                    + vm.native_id.len()
                    + vm.name.len()
                    + vm.hypervisor.len()
                    + vm.host.as_ref().map_or(0, String::len)
            })
            .sum()
    }
}

/// Limits of one cache; units in the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    pub ttl_ms: u64,
    pub negative_ttl_ms: u64,
    pub max_entries: u64,
    pub max_bytes: u64,
}

impl CacheLimits {
    pub fn validate(&self, what: &str) -> Result<(), String> {
        if self.ttl_ms == 0 || self.max_entries == 0 || self.max_bytes == 0 {
            return Err(format!(
                "{what}: the TTL, entry and byte bounds must be above 0"
            ));
        }
        if self.max_bytes < self.max_entries {
            return Err(format!(
                "{what}: max_bytes {} is below max_entries {}",
                self.max_bytes, self.max_entries
            ));
        }
        Ok(())
    }

    /// The least an entry weighs (see the module doc).
    fn min_weight(&self) -> u64 {
        (self.max_bytes / self.max_entries).max(1)
    }
}

/// A cached answer: the value, or an error that will not change soon.
#[derive(Debug)]
pub struct Entry<V> {
    pub value: Result<Arc<V>, HypervisorError>,
    /// When the hypervisor was asked.
    pub fetched_at: SystemTime,
    fetched_instant: Instant,
    ttl: Duration,
    weight: u32,
}

// By hand: cloning shares the value (an `Arc`), whatever `V` is.
impl<V> Clone for Entry<V> {
    fn clone(&self) -> Self {
        Entry {
            value: self.value.clone(),
            fetched_at: self.fetched_at,
            fetched_instant: self.fetched_instant,
            ttl: self.ttl,
            weight: self.weight,
        }
    }
}

impl<V> Entry<V> {
    /// Time left before the entry expires.
    pub fn remaining(&self) -> Duration {
        self.ttl.saturating_sub(self.fetched_instant.elapsed())
    }

    pub fn age(&self) -> Duration {
        self.fetched_instant.elapsed()
    }
}

struct PerEntryTtl;

impl<K, V> moka::Expiry<K, Entry<V>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &K,
        value: &Entry<V>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// What a cache reports (`GET /api/v1/queue/stats`, `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    pub entries: u64,
    /// The weight in use (bytes, with the per-entry floor).
    pub weight_bytes: u64,
    pub max_entries: u64,
    pub max_bytes: u64,
    pub ttl_ms: u64,
    /// Answered from the cache (including callers who joined a fetch in
    /// flight).
    pub hits: u64,
    /// Fetches from the hypervisor.
    pub fetches: u64,
    /// Fetches that failed (not kept).
    pub fetch_errors: u64,
}

/// A TTL cache with single-flight fetches. Cheap to clone (shared).
pub struct TtlCache<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    cache: moka::future::Cache<K, Entry<V>>,
    limits: CacheLimits,
    counters: Arc<Counters>,
}

impl<K, V> Clone for TtlCache<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    fn clone(&self) -> Self {
        TtlCache {
            cache: self.cache.clone(),
            limits: self.limits,
            counters: self.counters.clone(),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    fetches: AtomicU64,
    fetch_errors: AtomicU64,
}

impl<K, V> TtlCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Weigh + Send + Sync + 'static,
{
    pub fn new(limits: CacheLimits) -> TtlCache<K, V> {
        let cache = moka::future::Cache::builder()
            .max_capacity(limits.max_bytes)
            .weigher(|_key: &K, entry: &Entry<V>| entry.weight)
            .expire_after(PerEntryTtl)
            .build();
        TtlCache {
            cache,
            limits,
            counters: Arc::new(Counters::default()),
        }
    }

    /// The cached answer for `key`, or the one `fetch` gives (which is
    /// awaited by one caller; the others wait for its answer).
    pub async fn get_or_fetch<F>(&self, key: K, fetch: F) -> HvResult<Entry<V>>
    where
        F: std::future::Future<Output = HvResult<V>>,
    {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let limits = self.limits;
        let counters = self.counters.clone();
        let entry = self
            .cache
            .try_get_with(key, async move {
                counters.fetches.fetch_add(1, Ordering::Relaxed);
                match fetch.await {
                    Ok(value) => {
                        let bytes = value.weight_bytes() as u64;
                        Ok(make_entry(
                            Ok(Arc::new(value)),
                            bytes,
                            limits.ttl_ms,
                            &limits,
                        ))
                    }
                    Err(e) if e.is_stable() && limits.negative_ttl_ms > 0 => {
                        Ok(make_entry(Err(e), 0, limits.negative_ttl_ms, &limits))
                    }
                    Err(e) => {
                        counters.fetch_errors.fetch_add(1, Ordering::Relaxed);
                        Err(e)
                    }
                }
            })
            .await
            .map_err(|e| (*e).clone())?;
        Ok(entry)
    }

    /// The cached answer, fresh or not there at all; never fetches.
    pub async fn peek(&self, key: &K) -> Option<Entry<V>> {
        self.cache.get(key).await
    }

    /// Forget `key` (the VM changed): the next caller fetches.
    pub async fn invalidate(&self, key: &K) {
        self.cache.invalidate(key).await;
    }

    /// Forget every entry matching `doomed` (a VM's thumbnails of every
    /// size). Scans the cache: bounded by `max_entries`.
    pub async fn invalidate_where(&self, doomed: impl Fn(&K) -> bool) {
        let keys: Vec<K> = self
            .cache
            .iter()
            .filter(|(k, _)| doomed(k))
            .map(|(k, _)| (*k).clone())
            .collect();
        for k in keys {
            self.cache.invalidate(&k).await;
        }
    }

    pub async fn stats(&self) -> CacheStats {
        // Pending inserts and evictions are applied lazily; settle them so
        // the figures are current.
        self.cache.run_pending_tasks().await;
        let calls = self.counters.calls.load(Ordering::Relaxed);
        let fetches = self.counters.fetches.load(Ordering::Relaxed);
        CacheStats {
            entries: self.cache.entry_count(),
            weight_bytes: self.cache.weighted_size(),
            max_entries: self.limits.max_entries,
            max_bytes: self.limits.max_bytes,
            ttl_ms: self.limits.ttl_ms,
            hits: calls.saturating_sub(fetches),
            fetches,
            fetch_errors: self.counters.fetch_errors.load(Ordering::Relaxed),
        }
    }
}

fn make_entry<V>(
    value: Result<Arc<V>, HypervisorError>,
    bytes: u64,
    ttl_ms: u64,
    limits: &CacheLimits,
) -> Entry<V> {
    let weight = bytes.max(limits.min_weight()).min(u64::from(u32::MAX));
    Entry {
        value,
        fetched_at: SystemTime::now(),
        fetched_instant: Instant::now(),
        ttl: Duration::from_millis(ttl_ms),
        weight: weight as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Debug)]
    struct Blob(usize);
    impl Weigh for Blob {
        fn weight_bytes(&self) -> usize {
            self.0
        }
    }

    fn limits(max_entries: u64, max_bytes: u64) -> CacheLimits {
        CacheLimits {
            ttl_ms: 60_000,
            negative_ttl_ms: 60_000,
            max_entries,
            max_bytes,
        }
    }

    #[tokio::test]
    async fn a_hundred_callers_of_one_key_cause_one_fetch() {
        let cache: TtlCache<String, Blob> = TtlCache::new(limits(100, 1 << 20));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (cache, calls) = (cache.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch("vm-1".to_string(), async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(Blob(10))
                    })
                    .await
                    .map(|e| e.value.unwrap().0)
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 10);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let stats = cache.stats().await;
        assert_eq!((stats.fetches, stats.hits, stats.entries), (1, 99, 1));
    }

    #[tokio::test]
    async fn entries_and_bytes_are_both_bounded() {
        // 10 entries of at most 1000 bytes: each weighs at least 100.
        let cache: TtlCache<u32, Blob> = TtlCache::new(limits(10, 1000));
        for k in 0..50u32 {
            cache.get_or_fetch(k, async { Ok(Blob(1)) }).await.unwrap();
        }
        let small = cache.stats().await;
        assert!(small.entries <= 10, "{small:?}");
        assert!(small.weight_bytes <= 1000, "{small:?}");
        let big: TtlCache<u32, Blob> = TtlCache::new(limits(10, 1000));
        for k in 0..50u32 {
            big.get_or_fetch(k, async { Ok(Blob(400)) }).await.unwrap();
        }
        let stats = big.stats().await;
        assert!(stats.entries <= 2, "{stats:?}");
        assert!(stats.weight_bytes <= 1000, "{stats:?}");
    }

    #[tokio::test]
    async fn stable_errors_are_kept_and_transient_ones_are_not() {
        let cache: TtlCache<u32, Blob> = TtlCache::new(limits(10, 1000));
        let calls = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let calls = calls.clone();
            let e = cache
                .get_or_fetch(1, async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(HypervisorError::VmNotRunning("off".into()))
                })
                .await
                .unwrap();
            assert_eq!(e.value.unwrap_err().code(), "vm_not_running");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        for _ in 0..3 {
            let calls = calls.clone();
            let e = cache
                .get_or_fetch(2, async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err::<Blob, _>(HypervisorError::Unreachable("down".into()))
                })
                .await
                .unwrap_err();
            assert_eq!(e.code(), "hypervisor_unavailable");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(cache.stats().await.fetch_errors, 3);
    }

    #[tokio::test]
    async fn entries_expire_after_their_ttl_and_can_be_invalidated() {
        let cache: TtlCache<u32, Blob> = TtlCache::new(CacheLimits {
            ttl_ms: 50,
            ..limits(10, 1000)
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = |calls: Arc<AtomicUsize>| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(Blob(1))
        };
        cache.get_or_fetch(1, fetch(calls.clone())).await.unwrap();
        cache.get_or_fetch(1, fetch(calls.clone())).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(120)).await;
        let e = cache.get_or_fetch(1, fetch(calls.clone())).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert!(e.remaining() <= Duration::from_millis(50));
        cache.invalidate(&1).await;
        cache.get_or_fetch(1, fetch(calls.clone())).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        cache.invalidate_where(|k| *k == 1).await;
        assert!(cache.peek(&1).await.is_none());
    }

    #[tokio::test]
    async fn a_fetch_whose_caller_leaves_is_taken_over_by_another() {
        let cache: TtlCache<u32, Blob> = TtlCache::new(limits(10, 1000));
        let first = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .get_or_fetch(7, async {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        Ok(Blob(1))
                    })
                    .await
                    .map(|_| ())
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = tokio::spawn({
            let cache = cache.clone();
            async move {
                cache
                    .get_or_fetch(7, async { Ok(Blob(2)) })
                    .await
                    .map(|e| e.value.unwrap().0)
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        first.abort();
        let got = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the waiting caller took over")
            .unwrap()
            .unwrap();
        assert_eq!(got, 2);
    }

    #[test]
    fn limits_are_checked() {
        assert!(limits(10, 1000).validate("t").is_ok());
        assert!(limits(0, 1000).validate("t").is_err());
        assert!(limits(10, 5).validate("t").is_err());
    }
}
