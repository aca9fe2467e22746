//! What the backend knows of one VM, kept current by QMP notices alone
//! (no polling): the power state from `query-status` at connect, then from
//! events.
//!
//! What it does not do: IO. Pure functions and data, unit-tested here.

use super::qmp::QmpNotice;
use crate::hypervisor::model::PowerState;

/// `query-status`'s `status` as a power state. "Off" is what needs a power
/// on to run again: `shutdown` (with `-no-shutdown`), `prelaunch` (`-S`),
/// and the states QEMU leaves only through a reset. "Suspended" is paused
/// with the guest's memory intact.
pub fn power_from_status(status: &str) -> PowerState {
    match status {
        "running" => PowerState::On,
        "paused" | "suspended" | "debug" | "io-error" | "watchdog" | "inmigrate"
        | "postmigrate" | "finish-migrate" | "save-vm" | "restore-vm" | "colo" => {
            PowerState::Suspended
        }
        "shutdown" | "prelaunch" | "guest-panicked" | "internal-error" => PowerState::Off,
        _ => PowerState::Unknown,
    }
}

/// One VM as the backend sees it; published on a `watch` channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmState {
    pub power: PowerState,
    /// A QMP connection is up.
    pub connected: bool,
    /// Connection attempts finished so far (0: not tried yet).
    pub attempts: u64,
    /// RESET events seen (a reset keeps the power state; power actions
    /// wait for this to move).
    pub resets: u64,
    /// POWERDOWN events seen (the ACPI power button was pressed).
    pub powerdowns: u64,
    /// Why the last connection ended or attempt failed.
    pub last_error: Option<String>,
}

impl Default for VmState {
    /// Before the first connection attempt: nothing known.
    fn default() -> Self {
        VmState {
            power: PowerState::Unknown,
            connected: false,
            attempts: 0,
            resets: 0,
            powerdowns: 0,
            last_error: None,
        }
    }
}

impl VmState {
    /// Applies one notice; returns `(old, new)` when the power state
    /// changed.
    pub fn apply(&mut self, notice: &QmpNotice) -> Option<(PowerState, PowerState)> {
        let old = self.power;
        match notice {
            QmpNotice::Connected { status } => {
                self.connected = true;
                self.attempts += 1;
                self.last_error = None;
                self.power = power_from_status(status);
            }
            QmpNotice::ConnectFailed { reason } => {
                self.attempts += 1;
                self.last_error = Some(reason.clone());
                self.power = lost(self.power);
            }
            QmpNotice::Disconnected { reason } => {
                self.connected = false;
                self.last_error = Some(reason.clone());
                self.power = lost(self.power);
            }
            QmpNotice::Event { name, .. } => self.on_event(name),
        }
        (old != self.power).then_some((old, self.power))
    }

    fn on_event(&mut self, name: &str) {
        match name {
            // With -no-shutdown a guest shutdown is SHUTDOWN then STOP: the
            // VM stays off, not paused.
            "STOP" if self.power != PowerState::Off => self.power = PowerState::Suspended,
            "RESUME" | "WAKEUP" => self.power = PowerState::On,
            "SUSPEND" => self.power = PowerState::Suspended,
            "SHUTDOWN" => self.power = PowerState::Off,
            "RESET" => self.resets += 1,
            "POWERDOWN" => self.powerdowns += 1,
            _ => {}
        }
    }
}

/// The power state once QMP is gone: off stays off (QEMU said it shut
/// down, so its exit is expected); anything else is unknown, since QEMU
/// may still run (killed QMP peer, another client holding the socket).
fn lost(power: PowerState) -> PowerState {
    match power {
        PowerState::Off => PowerState::Off,
        _ => PowerState::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn event(name: &str) -> QmpNotice {
        QmpNotice::Event {
            name: name.into(),
            data: Value::Null,
        }
    }

    #[test]
    fn statuses_map_to_power_states() {
        assert_eq!(power_from_status("running"), PowerState::On);
        assert_eq!(power_from_status("paused"), PowerState::Suspended);
        assert_eq!(power_from_status("shutdown"), PowerState::Off);
        assert_eq!(power_from_status("prelaunch"), PowerState::Off);
        assert_eq!(power_from_status("something-new"), PowerState::Unknown);
    }

    #[test]
    fn events_drive_the_power_state_and_report_changes() {
        let mut vm = VmState::default();
        assert_eq!(vm.power, PowerState::Unknown);
        let connected = QmpNotice::Connected {
            status: "running".into(),
        };
        assert_eq!(
            vm.apply(&connected),
            Some((PowerState::Unknown, PowerState::On))
        );
        assert!(vm.connected && vm.attempts == 1);
        assert_eq!(
            vm.apply(&event("STOP")),
            Some((PowerState::On, PowerState::Suspended))
        );
        assert_eq!(vm.apply(&event("STOP")), None);
        assert_eq!(
            vm.apply(&event("RESUME")),
            Some((PowerState::Suspended, PowerState::On))
        );
        assert_eq!(vm.apply(&event("RESET")), None);
        assert_eq!(vm.apply(&event("POWERDOWN")), None);
        assert_eq!((vm.resets, vm.powerdowns), (1, 1));
        // A guest shutdown under -no-shutdown: SHUTDOWN, then STOP.
        assert_eq!(
            vm.apply(&event("SHUTDOWN")),
            Some((PowerState::On, PowerState::Off))
        );
        assert_eq!(vm.apply(&event("STOP")), None);
        // Losing QMP after a shutdown keeps it off...
        let lost_it = QmpNotice::Disconnected {
            reason: "closed".into(),
        };
        assert_eq!(vm.apply(&lost_it), None);
        assert!(!vm.connected && vm.power == PowerState::Off);
        // ...but losing it while running makes it unknown.
        vm.apply(&connected);
        assert_eq!(
            vm.apply(&lost_it),
            Some((PowerState::On, PowerState::Unknown))
        );
        assert_eq!(vm.last_error.as_deref(), Some("closed"));
        assert_eq!(
            vm.apply(&QmpNotice::ConnectFailed {
                reason: "refused".into()
            }),
            None
        );
        assert_eq!(vm.attempts, 3);
    }
}
