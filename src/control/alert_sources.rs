//! What the alert detectors (`crate::events::alerts`) watch, read every
//! `[events] alert_check_interval_ms` on the control thread: each
//! hypervisor's reachability (as its last call found it) and API-session
//! pool (checkouts that had to wait, which include those refused), the
//! dedicated port pool's use, the workers' heartbeats (the same ones
//! `/readyz` reads), and the refusals of the per-IP limits (REST on the
//! control plane, console handshakes on the workers, as counted for
//! `consolegate_errors_total`).
//!
//! Reads counters only: it adds nothing to a request's or a relay's path,
//! and must not depend on `crate::io` or the data plane's sessions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cause::Cause;
use crate::events::alerts::{AlertThresholds, WorkerBeat};

use super::client_ip::REST_CAUSE;
use super::ControlState;

/// The refusals that make `rate_limit_sustained`: the per-IP limits and
/// the bound on connections in their handshake (all of them answer 429).
pub fn rate_limit_causes() -> [&'static str; 4] {
    [
        REST_CAUSE,
        Cause::RateLimitedHandshakes.kind(),
        Cause::HandshakingPerIpOverLimit.kind(),
        Cause::HandshakingTotalOverLimit.kind(),
    ]
}

/// The detectors' thresholds from the config.
pub fn thresholds(cfg: &crate::config::appliance::ApplianceConfig) -> AlertThresholds {
    AlertThresholds {
        clear_after_ms: cfg.events.alert_clear_after_ms,
        worker_stall_ms: cfg.control.worker_stall_ms,
        rate_limit_refusals_per_s: cfg.events.rate_limit_alert_refusals_per_s,
        rate_limit_after_ms: cfg.events.rate_limit_alert_after_ms,
    }
}

/// Sample every `alert_check_interval_ms`, for as long as the control
/// plane runs.
pub async fn run(state: Arc<ControlState>) {
    let every = Duration::from_millis(state.cfg.events.alert_check_interval_ms.max(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sample(&state, Instant::now());
    }
}

/// Refusals by the per-IP limits since start, workers and control plane.
fn refusals_total(state: &ControlState) -> u64 {
    let causes = rate_limit_causes();
    let mut total = 0u64;
    if let Ok(stats) = state.worker_stats.lock() {
        for worker in stats.iter() {
            for (cause, count) in &worker.errors {
                if causes.contains(cause) {
                    total = total.saturating_add(*count);
                }
            }
        }
    }
    if let Ok(counters) = state.counters.lock() {
        total = total.saturating_add(counters.errors.get(REST_CAUSE));
    }
    total
}

fn sample(state: &ControlState, now: Instant) {
    let now_ms =
        u64::try_from(now.saturating_duration_since(state.started).as_millis()).unwrap_or(u64::MAX);
    let hypervisors = state.fleet.hypervisors();
    let ports = state.ports.as_ref().map(|pool| pool.stats());
    let beats: Vec<WorkerBeat> = state
        .data_plane
        .health(now)
        .into_iter()
        .map(|h| WorkerBeat {
            worker: h.worker,
            alive: h.alive,
            last_turn_age_ms: h.last_turn_age_ms,
        })
        .collect();
    let refusals = refusals_total(state);
    let Ok(mut alerts) = state.alerts.lock() else {
        return;
    };
    for h in &hypervisors {
        alerts.observe_hypervisor(&h.id, h.reachable, h.last_error.as_deref(), now_ms);
        if let Some(pool) = &h.pool {
            alerts.observe_pool(&h.id, pool.waited_checkouts, now_ms);
        }
    }
    if let Some(ports) = &ports {
        alerts.observe_ports(ports.allocated_ports, ports.total_ports, now_ms);
    }
    // Workers that stop while the appliance drains are not unhealthy.
    if !state.data_plane.is_draining() {
        alerts.observe_workers(&beats, now_ms);
    }
    alerts.observe_refusals(refusals, now_ms);
}
