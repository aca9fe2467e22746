//! Per-worker counters. A worker owns its [`WorkerMetrics`] outright (no
//! atomics, no locks on the hot path); a snapshot is published for whoever
//! merges them (today: the exit summary; with the control plane: `/metrics`).
//!
//! Must not depend on the IO backends or the control plane.

use hdrhistogram::Histogram;

use crate::cause::{Cause, CauseCounts};

/// A latency histogram in microseconds, 1 µs to 60 s, 2 significant
/// digits (a few KiB per histogram).
#[derive(Debug, Clone)]
pub struct LatencyUs(pub Histogram<u64>);

impl Default for LatencyUs {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(1, 60_000_000, 2).expect("static bounds are valid"))
    }
}

impl LatencyUs {
    pub fn record(&mut self, us: u64) {
        self.0.saturating_record(us.clamp(1, 60_000_000));
    }

    pub fn merge(&mut self, other: &LatencyUs) {
        // Same bounds on both sides: add cannot fail.
        let _ = self.0.add(&other.0);
    }
}

/// Counters of one worker. Error counts are keyed by the stable `kind()`
/// name of the error, so the set is bounded by the error enums.
#[derive(Debug, Default, Clone)]
pub struct WorkerMetrics {
    pub accepted: u64,
    /// Accepts closed at once because the worker was at `max_sessions_per_worker`.
    pub refused_over_limit: u64,
    /// Accepted here, handed to a less-loaded worker before any byte was read.
    pub handed_over: u64,
    /// Handed over by another worker and served here.
    pub adopted: u64,
    pub handshakes_ok: u64,
    pub sessions_closed: u64,
    pub bytes_browser_to_backend: u64,
    pub bytes_backend_to_browser: u64,
    pub static_responses: u64,
    /// VMware client messages (wmks.js on a plain VNC server) rewritten
    /// into standard RFB, and dropped.
    pub vmware_messages_translated: u64,
    pub vmware_messages_dropped: u64,
    /// Relay latency: from bytes arriving from the backend until the
    /// browser socket took them all (queueing + send), per burst.
    pub relay_down_us: LatencyUs,
    /// The same from the browser to the backend.
    pub relay_up_us: LatencyUs,
    errors: CauseCounts,
}

/// Counts by error kind (stable snake_case names, so the set is bounded by
/// the error enums). Shared by the workers and the control plane.
#[derive(Debug, Default, Clone)]
pub struct ErrorCounts(Vec<(&'static str, u64)>);

impl ErrorCounts {
    pub fn add(&mut self, kind: &'static str, n: u64) {
        if let Some(e) = self.0.iter_mut().find(|(k, _)| *k == kind) {
            e.1 += n;
        } else {
            self.0.push((kind, n));
        }
    }

    pub fn as_slice(&self) -> &[(&'static str, u64)] {
        &self.0
    }

    pub fn get(&self, kind: &str) -> u64 {
        self.0.iter().find(|(k, _)| *k == kind).map_or(0, |e| e.1)
    }
}

impl WorkerMetrics {
    /// Count one refusal, error or end of this cause (an array add).
    pub fn count(&mut self, cause: Cause) {
        self.errors.add(cause, 1);
    }

    /// What was counted so far, by cause (non-zero only).
    pub fn causes(&self) -> impl Iterator<Item = (Cause, u64)> + '_ {
        self.errors.nonzero()
    }

    /// Error counts by stable name (non-zero only; normal ends left out).
    pub fn errors(&self) -> Vec<(&'static str, u64)> {
        self.causes()
            .filter(|(c, _)| c.is_error())
            .map(|(c, n)| (c.kind(), n))
            .collect()
    }

    pub fn error_count(&self, cause: Cause) -> u64 {
        self.errors.get(cause)
    }

    /// Add another worker's counters into this one.
    pub fn merge(&mut self, other: &WorkerMetrics) {
        self.accepted += other.accepted;
        self.refused_over_limit += other.refused_over_limit;
        self.handed_over += other.handed_over;
        self.adopted += other.adopted;
        self.handshakes_ok += other.handshakes_ok;
        self.sessions_closed += other.sessions_closed;
        self.bytes_browser_to_backend += other.bytes_browser_to_backend;
        self.bytes_backend_to_browser += other.bytes_backend_to_browser;
        self.static_responses += other.static_responses;
        self.vmware_messages_translated += other.vmware_messages_translated;
        self.vmware_messages_dropped += other.vmware_messages_dropped;
        self.relay_down_us.merge(&other.relay_down_us);
        self.relay_up_us.merge(&other.relay_up_us);
        self.errors.merge(&other.errors);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_count_and_merge() {
        let mut a = WorkerMetrics::default();
        a.count(Cause::BadKey);
        a.count(Cause::BadKey);
        a.accepted = 2;
        let mut b = WorkerMetrics::default();
        b.count(Cause::BadKey);
        b.count(Cause::UnknownToken);
        b.count(Cause::BackendClosed);
        b.accepted = 1;
        a.merge(&b);
        assert_eq!(a.error_count(Cause::BadKey), 3);
        assert_eq!(a.error_count(Cause::UnknownToken), 1);
        assert_eq!(a.error_count(Cause::Revoked), 0);
        assert_eq!(a.accepted, 3);
        // Normal ends are counted, but are not errors.
        assert_eq!(a.errors(), vec![("bad_key", 3), ("unknown_token", 1)]);
    }

    #[test]
    fn latency_histograms_record_and_merge() {
        let mut a = WorkerMetrics::default();
        let mut b = WorkerMetrics::default();
        a.relay_down_us.record(100);
        b.relay_down_us.record(300);
        b.relay_down_us.record(0);
        a.merge(&b);
        assert_eq!(a.relay_down_us.0.len(), 3);
        assert!(a.relay_down_us.0.value_at_quantile(1.0) >= 299);
    }
}
