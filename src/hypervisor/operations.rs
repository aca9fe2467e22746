//! Long operations (power actions) the API started: their state, progress
//! and outcome, kept for `GET /api/v1/operations/{id}`.
//!
//! Bounded: at most `max_operations` are remembered; a finished one is
//! forgotten after `retention_ms`, or sooner (oldest first) when the table
//! is full; when every remembered operation is still running, a new one is
//! refused (503 busy) rather than forgetting a running one.
//!
//! Runs on the control plane; depends on nothing but the hypervisor model.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::model::{HypervisorError, OperationState, PowerAction, Progress};

/// Operations remembered unless configured.
pub const DEFAULT_MAX_OPERATIONS: usize = 10_000;
/// Time a finished operation stays readable unless configured.
pub const DEFAULT_RETENTION_MS: u64 = 3_600_000;
/// Longest progress message kept, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// `[operations]`; units in the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OperationsConfig {
    pub max_operations: usize,
    pub retention_ms: u64,
}

impl Default for OperationsConfig {
    fn default() -> Self {
        OperationsConfig {
            max_operations: DEFAULT_MAX_OPERATIONS,
            retention_ms: DEFAULT_RETENTION_MS,
        }
    }
}

impl OperationsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_operations == 0 || self.retention_ms == 0 {
            return Err("operations.max_operations and retention_ms must be above 0".into());
        }
        Ok(())
    }
}

/// An error as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationError {
    pub code: String,
    pub message: String,
}

/// One operation as `GET /api/v1/operations/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationView {
    pub id: String,
    pub vm: String,
    pub hypervisor: String,
    pub action: PowerAction,
    pub state: OperationState,
    /// 0..=100.
    pub progress_percent: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<OperationError>,
    pub created_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
}

#[derive(Debug)]
struct Slot {
    view: OperationView,
    finished: Option<Instant>,
}

#[derive(Debug, Default)]
struct Table {
    slots: HashMap<String, Slot>,
    /// Ids in creation order, for eviction.
    order: VecDeque<String>,
}

/// The table of operations.
#[derive(Debug)]
pub struct Operations {
    config: OperationsConfig,
    table: Mutex<Table>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn new_id() -> Result<String, HypervisorError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes)
        .map_err(|e| HypervisorError::Busy(format!("no random operation id: {e}")))?;
    Ok(format!("op-{}", u64::from_le_bytes(bytes) >> 1))
}

fn clip(message: &str) -> String {
    let mut end = message.len().min(MAX_MESSAGE_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_string()
}

impl Operations {
    pub fn new(config: OperationsConfig) -> Operations {
        Operations {
            config,
            table: Mutex::new(Table::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a new, queued operation and returns its view.
    pub fn create(
        &self,
        vm: &str,
        hypervisor: &str,
        action: PowerAction,
    ) -> Result<OperationView, HypervisorError> {
        let mut table = self.lock();
        self.prune(&mut table);
        if table.slots.len() >= self.config.max_operations && !evict_oldest_finished(&mut table) {
            return Err(HypervisorError::Busy(format!(
                "{} operations are running",
                table.slots.len()
            )));
        }
        let view = OperationView {
            id: new_id()?,
            vm: vm.to_string(),
            hypervisor: hypervisor.to_string(),
            action,
            state: OperationState::Queued,
            progress_percent: 0,
            message: None,
            error: None,
            created_at_ms: unix_ms(SystemTime::now()),
            finished_at_ms: None,
        };
        table.order.push_back(view.id.clone());
        table.slots.insert(
            view.id.clone(),
            Slot {
                view: view.clone(),
                finished: None,
            },
        );
        Ok(view)
    }

    /// A progress report from the hypervisor. Reports after the end are
    /// ignored; the percentage never goes back.
    pub fn progress(&self, id: &str, progress: &Progress) {
        let mut table = self.lock();
        let Some(slot) = table.slots.get_mut(id) else {
            return;
        };
        if slot.finished.is_some() {
            return;
        }
        match progress.state {
            OperationState::Queued | OperationState::Running => {
                slot.view.state = progress.state;
                slot.view.progress_percent =
                    slot.view.progress_percent.max(progress.percent.min(99));
            }
            // The outcome is recorded by `finish`, with the call's result.
            OperationState::Succeeded | OperationState::Failed => {}
        }
        if let Some(m) = &progress.message {
            slot.view.message = Some(clip(m));
        }
    }

    /// The operation ended.
    pub fn finish(&self, id: &str, outcome: &Result<(), HypervisorError>) {
        let mut table = self.lock();
        let Some(slot) = table.slots.get_mut(id) else {
            return;
        };
        slot.finished = Some(Instant::now());
        slot.view.finished_at_ms = Some(unix_ms(SystemTime::now()));
        match outcome {
            Ok(()) => {
                slot.view.state = OperationState::Succeeded;
                slot.view.progress_percent = 100;
            }
            Err(e) => {
                slot.view.state = OperationState::Failed;
                slot.view.error = Some(OperationError {
                    code: e.code().to_string(),
                    message: clip(&e.to_string()),
                });
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<OperationView> {
        let mut table = self.lock();
        self.prune(&mut table);
        table.slots.get(id).map(|s| s.view.clone())
    }

    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forget finished operations past their retention.
    fn prune(&self, table: &mut Table) {
        let retention = Duration::from_millis(self.config.retention_ms);
        let Table { slots, order } = table;
        slots.retain(|_, s| s.finished.is_none_or(|at| at.elapsed() < retention));
        order.retain(|id| slots.contains_key(id));
    }
}

/// Forget the oldest finished operation; false when all are running.
fn evict_oldest_finished(table: &mut Table) -> bool {
    let Table { slots, order } = table;
    let Some(pos) = order
        .iter()
        .position(|id| slots.get(id).is_some_and(|s| s.finished.is_some()))
    else {
        return false;
    };
    if let Some(id) = order.remove(pos) {
        slots.remove(&id);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(max: usize, retention_ms: u64) -> Operations {
        Operations::new(OperationsConfig {
            max_operations: max,
            retention_ms,
        })
    }

    #[test]
    fn an_operation_goes_from_queued_through_progress_to_its_outcome() {
        let t = ops(10, 60_000);
        let op = t.create("kvm1:web01", "kvm1", PowerAction::Reset).unwrap();
        assert_eq!((op.state, op.progress_percent), (OperationState::Queued, 0));
        t.progress(
            &op.id,
            &Progress {
                state: OperationState::Running,
                percent: 40,
                message: Some("resetting".into()),
            },
        );
        t.progress(
            &op.id,
            &Progress {
                state: OperationState::Running,
                percent: 10,
                message: None,
            },
        );
        let mid = t.get(&op.id).unwrap();
        assert_eq!(
            (mid.state, mid.progress_percent),
            (OperationState::Running, 40)
        );
        t.finish(&op.id, &Ok(()));
        let done = t.get(&op.id).unwrap();
        assert_eq!(
            (done.state, done.progress_percent),
            (OperationState::Succeeded, 100)
        );
        assert!(done.finished_at_ms.is_some());
        let failed = t.create("kvm1:web01", "kvm1", PowerAction::On).unwrap();
        t.finish(&failed.id, &Err(HypervisorError::VmNotFound("x".into())));
        let f = t.get(&failed.id).unwrap();
        assert_eq!(f.state, OperationState::Failed);
        assert_eq!(f.error.unwrap().code, "vm_not_found");
    }

    #[test]
    fn the_table_is_bounded_and_never_forgets_a_running_operation() {
        let t = ops(2, 60_000);
        let a = t.create("v", "h", PowerAction::On).unwrap();
        let b = t.create("v", "h", PowerAction::On).unwrap();
        assert_eq!(
            t.create("v", "h", PowerAction::On).unwrap_err().code(),
            "hypervisor_busy"
        );
        t.finish(&a.id, &Ok(()));
        let c = t.create("v", "h", PowerAction::On).unwrap();
        assert!(t.get(&a.id).is_none(), "the finished one made room");
        assert!(t.get(&b.id).is_some() && t.get(&c.id).is_some());
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn finished_operations_are_forgotten_after_their_retention() {
        let t = ops(10, 30);
        let a = t.create("v", "h", PowerAction::On).unwrap();
        let running = t.create("v", "h", PowerAction::On).unwrap();
        t.finish(&a.id, &Ok(()));
        std::thread::sleep(Duration::from_millis(60));
        assert!(t.get(&a.id).is_none());
        assert!(t.get(&running.id).is_some());
    }

    #[test]
    fn messages_are_clipped_on_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let c = clip(&long);
        assert!(c.len() <= MAX_MESSAGE_BYTES && c.chars().all(|ch| ch == 'é'));
    }
}
