//! `/metrics` (Prometheus text exposition 0.0.4) and `/api/v1/stats` (JSON).
//!
//! Why by hand rather than a metrics crate: every figure here is a snapshot
//! the workers already own (plain counters sent once a second through the
//! mailbox), so there is nothing to register or increment on this side; the
//! text format for a few dozen gauges and counters is a handful of lines.

use std::fmt::Write as _;
use std::time::Instant;

use serde_json::json;

use super::registry::State;
use super::ControlState;
use crate::hypervisor::cache::CacheStats;
use crate::hypervisor::fleet::FleetStats;
use crate::hypervisor::vsphere::updates::UpdatesStats;

/// Reads one figure of a worker's report.
type StatFn = fn(&crate::mailbox::WorkerStats) -> u64;

struct Out(String);

impl Out {
    fn help(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn line(&mut self, name: &str, labels: &[(&str, &str)], v: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let esc = val
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{esc}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {v}");
    }
    /// One series without labels.
    fn single(&mut self, name: &str, kind: &str, help: &str, v: impl std::fmt::Display) {
        self.help(name, kind, help);
        self.line(name, &[], v);
    }
    /// Two series per worker, labelled `worker` and `key` = each part's name.
    fn per_worker_split(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        stats: &[crate::mailbox::WorkerStats],
        key: &str,
        parts: [(&str, StatFn); 2],
    ) {
        self.help(name, kind, help);
        for s in stats {
            let w = s.worker.to_string();
            for (label, value) in parts {
                self.line(name, &[("worker", &w), (key, label)], value(s));
            }
        }
    }
    /// One series per worker, labelled `worker`.
    fn per_worker(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        stats: &[crate::mailbox::WorkerStats],
        value: impl Fn(&crate::mailbox::WorkerStats) -> u64,
    ) {
        self.help(name, kind, help);
        for s in stats {
            self.line(name, &[("worker", &s.worker.to_string())], value(s));
        }
    }
}

/// Histogram bucket bounds for `/metrics`, in microseconds.
const RELAY_BUCKETS_US: &[u64] = &[
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000,
];

pub fn render(state: &ControlState, fleet: &FleetStats) -> String {
    let mut o = Out(String::with_capacity(4096));
    let now = Instant::now();
    let stats = state
        .worker_stats
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();

    o.help(
        "consolegate_sessions",
        "gauge",
        "Sessions by state (live and recently ended).",
    );
    if let Ok(r) = state.registry.lock() {
        for (name, st) in [
            ("pending", State::Pending),
            ("open", State::Open),
            ("closed", State::Closed),
            ("expired", State::Expired),
            ("revoked", State::Revoked),
        ] {
            o.line("consolegate_sessions", &[("state", name)], r.count_in(st));
        }
    }

    // Supervision: read live from the workers' heartbeats, not from their
    // (periodic) reports, so a dead or stuck worker shows at once.
    let health = state.data_plane.health(now);
    o.help(
        "consolegate_worker_alive",
        "gauge",
        "1 while the worker thread runs.",
    );
    for h in &health {
        o.line(
            "consolegate_worker_alive",
            &[("worker", &h.worker.to_string())],
            u8::from(h.alive),
        );
    }
    o.help(
        "consolegate_worker_last_turn_age_seconds",
        "gauge",
        "Time since the worker's event loop last turned.",
    );
    for h in &health {
        o.line(
            "consolegate_worker_last_turn_age_seconds",
            &[("worker", &h.worker.to_string())],
            format!("{:.3}", h.last_turn_age_ms as f64 / 1000.0),
        );
    }
    o.per_worker(
        "consolegate_worker_live_sessions",
        "gauge",
        "Connections a worker holds.",
        &stats,
        |s| s.live_sessions as u64,
    );
    o.per_worker(
        "consolegate_accepted_total",
        "counter",
        "Browser connections accepted.",
        &stats,
        |s| s.accepted,
    );
    o.per_worker(
        "consolegate_handed_over_total",
        "counter",
        "Connections a worker accepted and handed to a less-loaded worker.",
        &stats,
        |s| s.handed_over,
    );
    o.per_worker(
        "consolegate_adopted_total",
        "counter",
        "Connections a worker took over from another (session balancing).",
        &stats,
        |s| s.adopted,
    );
    o.per_worker(
        "consolegate_handshakes_total",
        "counter",
        "WebSocket upgrades accepted.",
        &stats,
        |s| s.handshakes_ok,
    );
    o.per_worker_split(
        "consolegate_vmware_client_messages_total",
        "counter",
        "VMware client messages (wmks.js on a plain VNC server), by what became of them.",
        &stats,
        "outcome",
        [
            ("translated", |s| s.vmware_translated),
            ("dropped", |s| s.vmware_dropped),
        ],
    );
    o.per_worker_split(
        "consolegate_relay_bytes_total",
        "counter",
        "Payload bytes relayed, by direction.",
        &stats,
        "direction",
        [
            ("browser_to_backend", |s| s.bytes_browser_to_backend),
            ("backend_to_browser", |s| s.bytes_backend_to_browser),
        ],
    );
    o.help(
        "consolegate_errors_total",
        "counter",
        "Errors by cause (data plane and control plane).",
    );
    for s in &stats {
        let w = s.worker.to_string();
        for (k, v) in &s.errors {
            o.line(
                "consolegate_errors_total",
                &[("worker", &w), ("cause", k)],
                v,
            );
        }
    }
    if let Ok(c) = state.counters.lock() {
        for (k, v) in c.errors.as_slice() {
            o.line(
                "consolegate_errors_total",
                &[("worker", "control"), ("cause", k)],
                v,
            );
        }
        o.single(
            "consolegate_sessions_created_total",
            "counter",
            "Sessions created through the API.",
            c.sessions_created,
        );
        o.single(
            "consolegate_sessions_expired_total",
            "counter",
            "Tickets not used within their TTL.",
            c.sessions_expired,
        );
        o.single(
            "consolegate_sessions_revoked_total",
            "counter",
            "Sessions deleted through the API.",
            c.sessions_revoked,
        );
    }
    o.per_worker_split(
        "consolegate_buffer_chunks",
        "gauge",
        "Worker buffer-pool chunks in use and kept free.",
        &stats,
        "state",
        [
            ("in_use", |s| s.pool_outstanding as u64),
            ("free", |s| s.pool_free as u64),
        ],
    );
    alert_lines(&mut o, state);
    if let Some(p) = &state.ports {
        let ps = p.stats();
        o.help("consolegate_ports", "gauge", "Dedicated-port pool.");
        o.line("consolegate_ports", &[("state", "total")], ps.total_ports);
        o.line(
            "consolegate_ports",
            &[("state", "allocated")],
            ps.allocated_ports,
        );
        o.line("consolegate_ports", &[("state", "free")], ps.free_ports);
        o.single(
            "consolegate_port_utilization_percent",
            "gauge",
            "Dedicated-port pool utilization.",
            format!("{:.2}", ps.utilization_percent),
        );
    }
    // Relay latency, merged from the workers' HdrHistograms.
    let mut down = crate::metrics::LatencyUs::default();
    let mut up = crate::metrics::LatencyUs::default();
    for s in &stats {
        down.merge(&s.relay_down_us);
        up.merge(&s.relay_up_us);
    }
    o.help(
        "consolegate_relay_latency_seconds",
        "histogram",
        "Time relayed bytes spend in the proxy until the other socket took them, by direction.",
    );
    for (dir, h) in [
        ("backend_to_browser", &down.0),
        ("browser_to_backend", &up.0),
    ] {
        for le_us in RELAY_BUCKETS_US {
            let n = h.count_between(0, *le_us);
            let le = format!("{}", *le_us as f64 / 1e6);
            o.line(
                "consolegate_relay_latency_seconds_bucket",
                &[("direction", dir), ("le", &le)],
                n,
            );
        }
        o.line(
            "consolegate_relay_latency_seconds_bucket",
            &[("direction", dir), ("le", "+Inf")],
            h.len(),
        );
        let sum = h.mean() * h.len() as f64 / 1e6;
        o.line(
            "consolegate_relay_latency_seconds_sum",
            &[("direction", dir)],
            format!("{sum:.6}"),
        );
        o.line(
            "consolegate_relay_latency_seconds_count",
            &[("direction", dir)],
            h.len(),
        );
    }
    render_fleet(&mut o, fleet);
    o.single(
        "consolegate_uptime_seconds",
        "gauge",
        "Seconds since start.",
        now.duration_since(state.started).as_secs(),
    );
    o.0
}

/// The hypervisor layer: each hypervisor's reachability, API-session pool
/// and call queue by lane, then the two caches.
fn render_fleet(o: &mut Out, fleet: &FleetStats) {
    o.help(
        "consolegate_hypervisor_up",
        "gauge",
        "1 when the last call reached the hypervisor, 0 when it failed (absent before the first).",
    );
    for h in &fleet.hypervisors {
        if let Some(up) = h.reachable {
            o.line(
                "consolegate_hypervisor_up",
                &[("hypervisor", &h.id)],
                u8::from(up),
            );
        }
    }
    o.help(
        "consolegate_hypervisor_pool_connections",
        "gauge",
        "API sessions of a hypervisor's pool, by state.",
    );
    for h in &fleet.hypervisors {
        let Some(p) = &h.pool else { continue };
        for (state, n) in [
            ("total", p.total_connections),
            ("available", p.available_connections),
            ("active", p.active_connections),
            ("max", p.pool_size),
        ] {
            o.line(
                "consolegate_hypervisor_pool_connections",
                &[("hypervisor", &h.id), ("state", state)],
                n,
            );
        }
    }
    o.help(
        "consolegate_hypervisor_pool_events_total",
        "counter",
        "API sessions replaced as stale (reconnect) and failed logins or validations (error).",
    );
    for h in &fleet.hypervisors {
        let Some(p) = &h.pool else { continue };
        for (event, n) in [("reconnect", p.reconnects), ("error", p.errors)] {
            o.line(
                "consolegate_hypervisor_pool_events_total",
                &[("hypervisor", &h.id), ("event", event)],
                n,
            );
        }
    }
    o.help(
        "consolegate_hypervisor_calls_running",
        "gauge",
        "Calls to a hypervisor in flight (bounded by max_concurrent).",
    );
    for h in &fleet.hypervisors {
        o.line(
            "consolegate_hypervisor_calls_running",
            &[("hypervisor", &h.id)],
            h.queue.running,
        );
    }
    render_updates(o, fleet);
    render_lanes(o, fleet);
    render_cache(o, "vm_list", &fleet.vm_list_cache);
    render_cache(o, "thumbnail", &fleet.thumbnail_cache);
    o.single(
        "consolegate_operations",
        "gauge",
        "Power operations remembered (running and finished).",
        fleet.operations,
    );
}

/// The vSphere update followers (`WaitForUpdatesEx`), per hypervisor.
fn render_updates(o: &mut Out, fleet: &FleetStats) {
    let followers: Vec<(&str, &UpdatesStats)> = fleet
        .hypervisors
        .iter()
        .filter_map(|h| Some((h.id.as_str(), h.updates.as_ref()?)))
        .collect();
    render_followers(o, &followers);
}

fn render_followers(o: &mut Out, followers: &[(&str, &UpdatesStats)]) {
    type Figure = fn(&UpdatesStats) -> Option<u64>;
    let series: [(&str, &str, &str, Figure); 6] = [
        (
            "consolegate_vsphere_updates_following",
            "gauge",
            "1 while the vSphere update follower has its WaitForUpdatesEx filter in place.",
            |u| Some(u64::from(u.following)),
        ),
        (
            "consolegate_vsphere_updates_received_total",
            "counter",
            "WaitForUpdatesEx answers that carried an UpdateSet.",
            |u| Some(u.updates_received),
        ),
        (
            "consolegate_vsphere_updates_changes_total",
            "counter",
            "VM changes the update follower reported.",
            |u| Some(u.changes_reported),
        ),
        (
            "consolegate_vsphere_updates_errors_total",
            "counter",
            "Times the update follower lost its session or filter, or could not start.",
            |u| Some(u.errors),
        ),
        (
            "consolegate_vsphere_updates_session_logins_total",
            "counter",
            "Logins of the update follower's own API session (each start over is one).",
            |u| Some(u.session.logins),
        ),
        (
            "consolegate_vsphere_updates_last_update_timestamp_seconds",
            "gauge",
            "When the last UpdateSet arrived (Unix time; absent before any).",
            |u| u.last_update_unix_ms.map(|ms| ms / 1000),
        ),
    ];
    for (name, kind, help, figure) in series {
        o.help(name, kind, help);
        for (id, updates) in followers {
            if let Some(value) = figure(updates) {
                o.line(name, &[("hypervisor", id)], value);
            }
        }
    }
}

/// Per hypervisor and lane: waiting callers, outcomes, wait quantiles.
fn render_lanes(o: &mut Out, fleet: &FleetStats) {
    o.help(
        "consolegate_queue_waiting",
        "gauge",
        "Callers waiting for a call slot, by hypervisor and lane.",
    );
    for h in &fleet.hypervisors {
        for l in &h.queue.lanes {
            o.line(
                "consolegate_queue_waiting",
                &[("hypervisor", &h.id), ("lane", l.lane.name())],
                l.in_queue,
            );
        }
    }
    o.help(
        "consolegate_queue_requests_total",
        "counter",
        "Callers by hypervisor, lane and outcome (requested, rejected when the lane was full, timed_out, abandoned).",
    );
    for h in &fleet.hypervisors {
        for l in &h.queue.lanes {
            for (outcome, n) in [
                ("requested", l.total_requests),
                ("rejected", l.rejected),
                ("timed_out", l.timed_out),
                ("abandoned", l.abandoned),
            ] {
                o.line(
                    "consolegate_queue_requests_total",
                    &[
                        ("hypervisor", &h.id),
                        ("lane", l.lane.name()),
                        ("outcome", outcome),
                    ],
                    n,
                );
            }
        }
    }
    o.help(
        "consolegate_queue_wait_seconds",
        "gauge",
        "Wait for a call slot over the lane's recent callers (mean and p99).",
    );
    for h in &fleet.hypervisors {
        for l in &h.queue.lanes {
            for (stat, ms) in [("mean", l.avg_wait_ms), ("p99", l.p99_wait_ms)] {
                o.line(
                    "consolegate_queue_wait_seconds",
                    &[
                        ("hypervisor", &h.id),
                        ("lane", l.lane.name()),
                        ("stat", stat),
                    ],
                    format!("{:.6}", ms / 1000.0),
                );
            }
        }
    }
}

fn render_cache(o: &mut Out, cache: &str, c: &CacheStats) {
    let name = format!("consolegate_cache_{cache}");
    o.help(&format!("{name}_entries"), "gauge", "Entries kept.");
    o.line(&format!("{name}_entries"), &[], c.entries);
    o.help(&format!("{name}_bytes"), "gauge", "Bytes kept (weight).");
    o.line(&format!("{name}_bytes"), &[], c.weight_bytes);
    o.help(
        &format!("{name}_lookups_total"),
        "counter",
        "Lookups by result: hit (answered from memory or a fetch in flight), fetch, fetch_error.",
    );
    for (result, n) in [
        ("hit", c.hits),
        ("fetch", c.fetches),
        ("fetch_error", c.fetch_errors),
    ] {
        o.line(&format!("{name}_lookups_total"), &[("result", result)], n);
    }
}

fn quantiles(h: &crate::metrics::LatencyUs) -> serde_json::Value {
    let h = &h.0;
    json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.5),
        "p90": h.value_at_quantile(0.9),
        "p99": h.value_at_quantile(0.99),
        "max": h.max(),
    })
}

pub fn stats_json(state: &ControlState) -> serde_json::Value {
    let stats = state
        .worker_stats
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let workers: Vec<serde_json::Value> = stats
        .iter()
        .map(|s| {
            json!({
                "worker": s.worker,
                "live_sessions": s.live_sessions,
                "accepted": s.accepted,
                "handed_over": s.handed_over,
                "adopted": s.adopted,
                "handshakes": s.handshakes_ok,
                "sessions_closed": s.sessions_closed,
                "bytes_browser_to_backend": s.bytes_browser_to_backend,
                "bytes_backend_to_browser": s.bytes_backend_to_browser,
                "errors": s.errors.iter().map(|(k, v)| (k.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
                "buffer_chunks_in_use": s.pool_outstanding,
                "buffer_chunks_free": s.pool_free,
                "relay_latency_us": {
                    "backend_to_browser": quantiles(&s.relay_down_us),
                    "browser_to_backend": quantiles(&s.relay_up_us),
                },
            })
        })
        .collect();
    let (sessions, by_state) = match state.registry.lock() {
        Ok(r) => (
            r.live_count(),
            json!({
                "pending": r.count_in(State::Pending),
                "open": r.count_in(State::Open),
                "closed": r.count_in(State::Closed),
                "expired": r.count_in(State::Expired),
                "revoked": r.count_in(State::Revoked),
            }),
        ),
        Err(_) => (0, json!({})),
    };
    let control = state
        .counters
        .lock()
        .map(|c| {
            json!({
                "sessions_created": c.sessions_created,
                "sessions_expired": c.sessions_expired,
                "sessions_revoked": c.sessions_revoked,
                "reports_received": c.reports_received,
                "errors": c.errors.as_slice().iter().map(|(k, v)| (k.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
            })
        })
        .unwrap_or_default();
    json!({
        "uptime_s": state.started.elapsed().as_secs(),
        "io": state.io_backend,
        "workers": workers,
        "live_sessions": sessions,
        "sessions_by_state": by_state,
        "ports": state.ports.as_ref().map(|p| serde_json::to_value(p.stats()).unwrap_or_default()),
        "control": control,
    })
}

/// Alerts raised and cleared by type since start, and those in force.
fn alert_lines(o: &mut Out, state: &ControlState) {
    let Ok(counts) = state.alerts.lock().map(|a| a.counts()) else {
        return;
    };
    for (name, kind, help, map) in [
        (
            "consolegate_alerts_raised_total",
            "counter",
            "Alerts raised, by type.",
            &counts.raised,
        ),
        (
            "consolegate_alerts_cleared_total",
            "counter",
            "Alerts cleared, by type.",
            &counts.cleared,
        ),
        (
            "consolegate_alerts_active",
            "gauge",
            "Alerts in force now, by type.",
            &counts.active,
        ),
    ] {
        o.help(name, kind, help);
        for alert_type in crate::events::alerts::ALERT_TYPES {
            o.line(
                name,
                &[("type", alert_type)],
                map.get(alert_type).copied().unwrap_or(0),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::pool::PoolStats;

    #[test]
    fn update_followers_are_rendered_per_hypervisor() {
        let following = UpdatesStats {
            following: true,
            session: PoolStats {
                logins: 2,
                ..PoolStats::default()
            },
            updates_received: 7,
            changes_reported: 3,
            last_update_unix_ms: Some(1_796_000_000_999),
            errors: 1,
            last_error: Some("gone".into()),
        };
        let lost = UpdatesStats {
            following: false,
            last_update_unix_ms: None,
            ..following.clone()
        };
        let mut o = Out(String::new());
        render_followers(&mut o, &[("esx1", &following), ("esx\"2", &lost)]);
        let text = o.0;
        for line in [
            "# TYPE consolegate_vsphere_updates_following gauge",
            "consolegate_vsphere_updates_following{hypervisor=\"esx1\"} 1",
            "consolegate_vsphere_updates_following{hypervisor=\"esx\\\"2\"} 0",
            "consolegate_vsphere_updates_received_total{hypervisor=\"esx1\"} 7",
            "consolegate_vsphere_updates_changes_total{hypervisor=\"esx1\"} 3",
            "consolegate_vsphere_updates_errors_total{hypervisor=\"esx1\"} 1",
            "consolegate_vsphere_updates_session_logins_total{hypervisor=\"esx1\"} 2",
            "consolegate_vsphere_updates_last_update_timestamp_seconds{hypervisor=\"esx1\"} 1796000000",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(
            !text.contains("last_update_timestamp_seconds{hypervisor=\"esx\\\"2\"}"),
            "no timestamp before any update:\n{text}"
        );
    }
}
