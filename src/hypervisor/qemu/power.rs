//! Power actions over QMP, run to completion with progress.
//!
//! The mapping (QEMU has no "power on" for a process that has exited, and
//! the appliance does not start QEMU processes):
//!
//! | action     | QMP                                  | done when                         |
//! |------------|--------------------------------------|-----------------------------------|
//! | `on`       | `cont` (from paused); `system_reset` + `cont` (from off: `-S` prelaunch, `-no-shutdown` shutdown) | RESUME (power on) |
//! | `suspend`  | `stop` (vCPUs paused, memory kept)   | STOP (power suspended)            |
//! | `reset`    | `system_reset`                       | RESET                             |
//! | `shutdown` | `system_powerdown` (ACPI power button; the guest decides) | POWERDOWN      |
//! | `off`      | `quit`: a real power-off, the QEMU process exits and its QMP socket with it | SHUTDOWN or the connection closing (power off) |
//!
//! After `off` the VM stays listed as off, and `on` answers `invalid_state`:
//! only whatever started QEMU (systemd, libvirt, a script) can start it
//! again; the backend reconnects by itself once it is back. An action
//! already in effect (`on` when running, `suspend` when paused, `off` when
//! QEMU has exited) succeeds at once. Completion is confirmed by the
//! matching event; if none comes within the command timeout, by one
//! `query-status`.
//!
//! Progress: 0 (sending), 50 (QEMU accepted the command), 100 (confirmed),
//! or `failed` with the reason.

use std::time::Duration;

use super::backend::Vm;
use super::qmp::QmpError;
use super::state::{power_from_status, VmState};
use crate::hypervisor::model::{
    HvResult, HypervisorError, OperationState, PowerAction, PowerState, Progress, ProgressSink,
};

/// What proves an action done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Confirm {
    Power(PowerState),
    /// More RESET events than this.
    ResetsAbove(u64),
    /// More POWERDOWN events than this.
    PowerdownsAbove(u64),
    /// QEMU has exited: its QMP connection closed.
    Gone,
}

impl Confirm {
    fn met(self, state: &VmState) -> bool {
        match self {
            Confirm::Power(power) => state.power == power,
            Confirm::ResetsAbove(n) => state.resets > n,
            Confirm::PowerdownsAbove(n) => state.powerdowns > n,
            // Not SHUTDOWN alone: QEMU is still exiting then, and a
            // command sent meanwhile would meet a closing socket.
            Confirm::Gone => !state.connected,
        }
    }

    /// Whether `query-status`'s status confirms it, when the event is late.
    /// A reset or a power-button press leaves no trace there; that QEMU
    /// answers at all after accepting the command is what is left.
    fn met_by_status(self, status: &str) -> bool {
        match self {
            Confirm::Power(power) => power_from_status(status) == power,
            Confirm::ResetsAbove(_) | Confirm::PowerdownsAbove(_) => true,
            // QEMU still answering is QEMU not gone.
            Confirm::Gone => false,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Confirm::Power(PowerState::On) => "the RESUME event",
            Confirm::Power(_) => "the STOP event",
            Confirm::ResetsAbove(_) => "the RESET event",
            Confirm::PowerdownsAbove(_) => "the POWERDOWN event",
            Confirm::Gone => "QEMU to exit",
        }
    }
}

/// What to do for an action in a state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Plan {
    /// Nothing: the action is in effect already.
    Already(&'static str),
    Run {
        commands: &'static [&'static str],
        confirm: Confirm,
        done: &'static str,
    },
}

/// The plan for `action` given the VM's state (see the module doc).
pub(super) fn plan(vm: &str, action: PowerAction, state: &VmState) -> HvResult<Plan> {
    let off = state.power == PowerState::Off;
    if !state.connected {
        return match (action, off) {
            (PowerAction::Off, true) => Ok(Plan::Already("QEMU has exited already")),
            (PowerAction::On, true) => Err(HypervisorError::InvalidState(format!(
                "VM {vm} is off: its QEMU process has exited, and the appliance does not start \
                 QEMU; start it where it is managed (systemd, libvirt), and the appliance \
                 reconnects by itself"
            ))),
            (_, true) => Err(HypervisorError::InvalidState(format!("VM {vm} is off"))),
            (_, false) => Err(HypervisorError::Unreachable(format!(
                "VM {vm}: QMP is not connected ({})",
                state.last_error.as_deref().unwrap_or("not tried yet")
            ))),
        };
    }
    let run = |commands, confirm, done| {
        Ok(Plan::Run {
            commands,
            confirm,
            done,
        })
    };
    match (action, state.power) {
        (PowerAction::On, PowerState::On) => Ok(Plan::Already("running already")),
        (PowerAction::On, PowerState::Off) => run(
            &["system_reset", "cont"],
            Confirm::Power(PowerState::On),
            "running",
        ),
        (PowerAction::On, _) => run(&["cont"], Confirm::Power(PowerState::On), "running"),
        (PowerAction::Suspend, PowerState::Suspended) => Ok(Plan::Already("paused already")),
        (PowerAction::Off, _) => run(&["quit"], Confirm::Gone, "QEMU has exited"),
        (_, PowerState::Off) => Err(HypervisorError::InvalidState(format!(
            "VM {vm} is off; power it on first"
        ))),
        (PowerAction::Suspend, _) => {
            run(&["stop"], Confirm::Power(PowerState::Suspended), "paused")
        }
        (PowerAction::Reset, _) => run(
            &["system_reset"],
            Confirm::ResetsAbove(state.resets),
            "reset",
        ),
        (PowerAction::Shutdown, _) => run(
            &["system_powerdown"],
            Confirm::PowerdownsAbove(state.powerdowns),
            "the guest was sent an ACPI power-button press; shutting down is up to it",
        ),
    }
}

fn report(progress: &ProgressSink, state: OperationState, percent: u8, message: String) {
    progress(Progress {
        state,
        percent,
        message: Some(message),
    });
}

/// Runs `action` on `vm` to completion, reporting progress.
pub(super) async fn run(
    vm: &Vm,
    action: PowerAction,
    timeout: Duration,
    progress: &ProgressSink,
) -> HvResult<()> {
    let result = execute(vm, action, timeout, progress).await;
    match &result {
        Ok(done) => report(progress, OperationState::Succeeded, 100, (*done).to_owned()),
        Err(e) => report(progress, OperationState::Failed, 100, e.to_string()),
    }
    result.map(|_| ())
}

async fn execute(
    vm: &Vm,
    action: PowerAction,
    timeout: Duration,
    progress: &ProgressSink,
) -> HvResult<&'static str> {
    // Watch from before the command: its event may arrive before its answer.
    let mut watch = vm.state.clone();
    let before = watch.borrow_and_update().clone();
    let (commands, confirm, done) = match plan(&vm.id, action, &before)? {
        Plan::Already(done) => return Ok(done),
        Plan::Run {
            commands,
            confirm,
            done,
        } => (commands, confirm, done),
    };
    let sending = format!("sending {}", commands.join(" then "));
    report(progress, OperationState::Running, 0, sending);
    for command in commands {
        match vm.client.execute(command, None).await {
            Ok(_) => {}
            // QEMU may exit before its answer to `quit` is read.
            Err(QmpError::Unreachable { .. }) if confirm == Confirm::Gone => {}
            // The connection was closing (QEMU exiting after a shutdown):
            // the fresh state may explain better why this cannot be done.
            Err(e @ QmpError::Unreachable { .. }) => {
                plan(&vm.id, action, &vm.state())?;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
    }
    let waiting = format!("QEMU accepted; waiting for {}", confirm.describe());
    report(progress, OperationState::Running, 50, waiting);
    let confirmed = tokio::time::timeout(timeout, watch.wait_for(|s| confirm.met(s)))
        .await
        .map(|waited| waited.is_ok());
    match confirmed {
        Ok(true) => Ok(done),
        Ok(false) => Err(HypervisorError::Unreachable(
            "the backend is stopping".into(),
        )),
        Err(_) => confirm_by_status(vm, confirm, timeout, done).await,
    }
}

/// The event did not come in time: one `query-status` decides.
async fn confirm_by_status(
    vm: &Vm,
    confirm: Confirm,
    timeout: Duration,
    done: &'static str,
) -> HvResult<&'static str> {
    if confirm == Confirm::Gone && !vm.state().connected {
        return Ok(done);
    }
    let answer = vm.client.execute("query-status", None).await;
    let status = match answer {
        Ok(answer) => answer
            .get("status")
            .and_then(|s| s.as_str())
            .unwrap_or_default()
            .to_owned(),
        Err(QmpError::Unreachable { .. }) if confirm == Confirm::Gone => return Ok(done),
        Err(e) => return Err(e.into()),
    };
    if confirm.met_by_status(&status) {
        Ok(done)
    } else {
        tracing::warn!(vm = %vm.id, %status, "power action not confirmed");
        Err(HypervisorError::Timeout(timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(power: PowerState, connected: bool) -> VmState {
        VmState {
            power,
            connected,
            resets: 3,
            powerdowns: 1,
            ..VmState::default()
        }
    }

    fn commands(plan: HvResult<Plan>) -> Vec<&'static str> {
        match plan.unwrap() {
            Plan::Run { commands, .. } => commands.to_vec(),
            Plan::Already(_) => vec![],
        }
    }

    #[test]
    fn actions_map_to_qmp_commands_by_state() {
        use PowerAction::*;
        use PowerState::{Off as Down, On as Up, Suspended as Paused};
        assert_eq!(commands(plan("v", On, &state(Paused, true))), ["cont"]);
        assert_eq!(
            commands(plan("v", On, &state(Down, true))),
            ["system_reset", "cont"]
        );
        assert_eq!(
            commands(plan("v", On, &state(Up, true))),
            Vec::<&str>::new()
        );
        assert_eq!(commands(plan("v", Suspend, &state(Up, true))), ["stop"]);
        assert_eq!(
            commands(plan("v", Suspend, &state(Paused, true))),
            Vec::<&str>::new()
        );
        assert_eq!(
            commands(plan("v", Reset, &state(Up, true))),
            ["system_reset"]
        );
        assert_eq!(
            commands(plan("v", Shutdown, &state(Up, true))),
            ["system_powerdown"]
        );
        assert_eq!(commands(plan("v", Off, &state(Up, true))), ["quit"]);
        assert_eq!(
            commands(plan("v", Off, &state(Down, false))),
            Vec::<&str>::new()
        );
        match plan("v", Reset, &state(Up, true)).unwrap() {
            Plan::Run { confirm, .. } => assert_eq!(confirm, Confirm::ResetsAbove(3)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn impossible_actions_say_why() {
        let e = plan("web01", PowerAction::On, &state(PowerState::Off, false)).unwrap_err();
        assert!(
            matches!(&e, HypervisorError::InvalidState(m) if m.contains("does not start QEMU")),
            "{e}"
        );
        assert_eq!(e.status(), 409);
        let e = plan("web01", PowerAction::Reset, &state(PowerState::Off, true)).unwrap_err();
        assert!(matches!(e, HypervisorError::InvalidState(_)), "{e}");
        let e = plan(
            "web01",
            PowerAction::Suspend,
            &state(PowerState::Unknown, false),
        )
        .unwrap_err();
        assert!(matches!(e, HypervisorError::Unreachable(_)), "{e}");
    }

    #[test]
    fn confirmations_read_events_and_statuses() {
        let mut s = state(PowerState::On, true);
        assert!(Confirm::Power(PowerState::On).met(&s));
        assert!(!Confirm::ResetsAbove(3).met(&s));
        s.resets = 4;
        assert!(Confirm::ResetsAbove(3).met(&s));
        assert!(!Confirm::Gone.met(&s));
        s.power = PowerState::Off;
        assert!(!Confirm::Gone.met(&s), "exiting is not exited");
        s.connected = false;
        assert!(Confirm::Gone.met(&s));
        assert!(Confirm::Power(PowerState::Suspended).met_by_status("paused"));
        assert!(!Confirm::Power(PowerState::On).met_by_status("paused"));
    }
}
