//! Per-worker counters. A worker owns its [`WorkerMetrics`] outright (no
//! atomics, no locks on the hot path); a snapshot is published for whoever
//! merges them (today: the exit summary; with the control plane: `/metrics`).
//!
//! Must not depend on the IO backends or the control plane.

/// Counters of one worker. Error counts are keyed by the stable `kind()`
/// name of the error, so the set is bounded by the error enums.
#[derive(Debug, Default, Clone)]
pub struct WorkerMetrics {
    pub accepted: u64,
    /// Accepts closed at once because the worker was at `max_sessions_per_worker`.
    pub refused_over_limit: u64,
    pub handshakes_ok: u64,
    pub sessions_closed: u64,
    pub bytes_browser_to_backend: u64,
    pub bytes_backend_to_browser: u64,
    pub static_responses: u64,
    errors: Vec<(&'static str, u64)>,
}

impl WorkerMetrics {
    /// Count one error of `kind` (a stable snake_case name).
    pub fn error(&mut self, kind: &'static str) {
        if let Some(e) = self.errors.iter_mut().find(|(k, _)| *k == kind) {
            e.1 += 1;
        } else {
            self.errors.push((kind, 1));
        }
    }

    /// Errors counted so far, by kind.
    pub fn errors(&self) -> &[(&'static str, u64)] {
        &self.errors
    }

    pub fn error_count(&self, kind: &str) -> u64 {
        self.errors
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |e| e.1)
    }

    /// Add another worker's counters into this one.
    pub fn merge(&mut self, other: &WorkerMetrics) {
        self.accepted += other.accepted;
        self.refused_over_limit += other.refused_over_limit;
        self.handshakes_ok += other.handshakes_ok;
        self.sessions_closed += other.sessions_closed;
        self.bytes_browser_to_backend += other.bytes_browser_to_backend;
        self.bytes_backend_to_browser += other.bytes_backend_to_browser;
        self.static_responses += other.static_responses;
        for (k, v) in &other.errors {
            if let Some(e) = self.errors.iter_mut().find(|(kk, _)| kk == k) {
                e.1 += v;
            } else {
                self.errors.push((k, *v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_count_and_merge() {
        let mut a = WorkerMetrics::default();
        a.error("bad_key");
        a.error("bad_key");
        a.accepted = 2;
        let mut b = WorkerMetrics::default();
        b.error("bad_key");
        b.error("unknown_token");
        b.accepted = 1;
        a.merge(&b);
        assert_eq!(a.error_count("bad_key"), 3);
        assert_eq!(a.error_count("unknown_token"), 1);
        assert_eq!(a.error_count("other"), 0);
        assert_eq!(a.accepted, 3);
    }
}
