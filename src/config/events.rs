//! `[events]`: the live event endpoints on the control port (`/ws/monitor`,
//! `/ws/vm/{vm_id}`, `/ws/server/{hypervisor_id}`, `/ws/stats`) and their
//! bounds. Values and validation only.

use serde::{Deserialize, Serialize};

use super::appliance::ConfigFileError;

/// `[events]`; units in the names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Clients without a token may connect to the public rooms (monitor,
    /// vm, server; not stats) and see public events only (VM and
    /// hypervisor status). Off: every connection needs a token (401).
    pub allow_anonymous: bool,
    /// How often `/ws/stats` sends the bus's figures, in ms.
    pub stats_interval_ms: u64,
    /// Events queued per subscriber; beyond, events are dropped for that
    /// subscriber (it gets a `lagged` message with the count) and a
    /// subscriber that stays behind is closed (1008). Cost: one pointer per
    /// queued event (the event's text is shared by all subscribers).
    pub subscriber_queue_events: usize,
    /// Messages a client may send per second (burst of as many); over it
    /// the connection is closed (1008).
    pub messages_per_s: u32,
    /// Subscribers connected at once; beyond, 503 before the upgrade.
    /// Cost: measured 11–12 KiB of RSS per idle subscriber (socket, task,
    /// read buffer, queue), plus a file descriptor each.
    pub max_subscribers: usize,
    /// How often the VM lists of every hypervisor are fetched afresh (LOW
    /// lane) and compared with the previous ones, for `vm_status_changed`
    /// of backends that push nothing; 0 = never (power actions and QMP
    /// events still report). Cost: one list call per hypervisor per
    /// interval.
    pub vm_refresh_interval_ms: u64,
    /// How often `vm_metrics_update` is sent for each VM that has a
    /// subscriber in its `/ws/vm/{vm_id}` room (and only those: an
    /// unwatched VM is never asked), in ms; 0 = never. Cost: one
    /// counters call per watched VM per interval (QEMU: two QMP commands
    /// and two small /proc reads; vSphere: one property read).
    pub metrics_interval_ms: u64,
    /// Most VMs whose figures are fetched in one round; the watched VMs
    /// beyond wait (the round takes the first ones by id).
    pub vm_metrics_max_vms_per_round: usize,
    /// How often the alert detectors sample the hypervisor pools, the
    /// workers' heartbeats and the rate-limit refusals, in ms. Cost: one
    /// read of a few counters per hypervisor and worker per interval.
    pub alert_check_interval_ms: u64,
    /// How long an alert's condition must be gone before `alert_cleared`
    /// (the hysteresis that keeps a flickering condition from flooding).
    pub alert_clear_after_ms: u64,
    /// Refusals per second by the per-IP limits (REST, console
    /// handshakes, connections in their handshake) that count as
    /// sustained rate limiting; cleared under half of it. 0 = no alert.
    pub rate_limit_alert_refusals_per_s: u32,
    /// How long that rate must hold before the alert, in ms.
    pub rate_limit_alert_after_ms: u64,
    /// How long `session_closed` of a session the control plane ended
    /// while a worker held it (revoked, evicted) waits for the worker's
    /// close report and its byte counts, in ms; then it is sent with what
    /// is known and `bytes_final: false`. Cost: one small entry per such
    /// session for at most this long.
    pub session_close_report_wait_ms: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            allow_anonymous: false,
            stats_interval_ms: 5_000,
            subscriber_queue_events: 256,
            messages_per_s: 20,
            max_subscribers: 10_000,
            vm_refresh_interval_ms: 30_000,
            metrics_interval_ms: 5_000,
            vm_metrics_max_vms_per_round: 64,
            alert_check_interval_ms: 1_000,
            alert_clear_after_ms: 10_000,
            rate_limit_alert_refusals_per_s: 10,
            rate_limit_alert_after_ms: 10_000,
            session_close_report_wait_ms: 2_000,
        }
    }
}

/// Largest `[events] max_subscribers`.
pub const MAX_SUBSCRIBERS: usize = 1_000_000;
/// Largest `[events] vm_metrics_max_vms_per_round`.
pub const MAX_VM_METRICS_VMS_PER_ROUND: usize = 10_000;
/// Largest `[events] subscriber_queue_events`.
pub const MAX_SUBSCRIBER_QUEUE_EVENTS: usize = 65_536;

fn range(key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigFileError> {
    if value < min || value > max {
        return Err(ConfigFileError::Invalid {
            key: format!("events.{key}"),
            message: format!("{value} is out of range: must be between {min} and {max}"),
        });
    }
    Ok(())
}

impl EventsConfig {
    pub fn validate(&self) -> Result<(), ConfigFileError> {
        range("stats_interval_ms", self.stats_interval_ms, 100, 3_600_000)?;
        range(
            "subscriber_queue_events",
            self.subscriber_queue_events as u64,
            1,
            MAX_SUBSCRIBER_QUEUE_EVENTS as u64,
        )?;
        range("messages_per_s", u64::from(self.messages_per_s), 1, 10_000)?;
        range(
            "max_subscribers",
            self.max_subscribers as u64,
            1,
            MAX_SUBSCRIBERS as u64,
        )?;
        range(
            "alert_check_interval_ms",
            self.alert_check_interval_ms,
            50,
            3_600_000,
        )?;
        range(
            "alert_clear_after_ms",
            self.alert_clear_after_ms,
            0,
            86_400_000,
        )?;
        range(
            "rate_limit_alert_after_ms",
            self.rate_limit_alert_after_ms,
            0,
            86_400_000,
        )?;
        range(
            "session_close_report_wait_ms",
            self.session_close_report_wait_ms,
            0,
            60_000,
        )?;
        if self.vm_refresh_interval_ms != 0 {
            range(
                "vm_refresh_interval_ms",
                self.vm_refresh_interval_ms,
                1_000,
                86_400_000,
            )?;
        }
        if self.metrics_interval_ms != 0 {
            range(
                "metrics_interval_ms",
                self.metrics_interval_ms,
                500,
                3_600_000,
            )?;
        }
        range(
            "vm_metrics_max_vms_per_round",
            self.vm_metrics_max_vms_per_round as u64,
            1,
            MAX_VM_METRICS_VMS_PER_ROUND as u64,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_each_bound_is_checked() {
        assert!(EventsConfig::default().validate().is_ok());
        type Breaker = fn(&mut EventsConfig);
        let cases: [(&str, Breaker); 9] = [
            ("events.stats_interval_ms", |c| c.stats_interval_ms = 1),
            ("events.subscriber_queue_events", |c| {
                c.subscriber_queue_events = 0
            }),
            ("events.messages_per_s", |c| c.messages_per_s = 0),
            ("events.max_subscribers", |c| c.max_subscribers = 0),
            ("events.vm_refresh_interval_ms", |c| {
                c.vm_refresh_interval_ms = 10
            }),
            ("events.metrics_interval_ms", |c| c.metrics_interval_ms = 10),
            ("events.vm_metrics_max_vms_per_round", |c| {
                c.vm_metrics_max_vms_per_round = 0
            }),
            ("events.alert_check_interval_ms", |c| {
                c.alert_check_interval_ms = 1
            }),
            ("events.session_close_report_wait_ms", |c| {
                c.session_close_report_wait_ms = 60_001
            }),
        ];
        for (key, break_it) in cases {
            let mut c = EventsConfig::default();
            break_it(&mut c);
            match c.validate() {
                Err(ConfigFileError::Invalid { key: k, .. }) => assert_eq!(k, key),
                other => panic!("{key}: {other:?}"),
            }
        }
    }
}
