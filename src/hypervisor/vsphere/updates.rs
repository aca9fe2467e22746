//! Following a vSphere inventory's changes as they happen: the
//! PropertyCollector's `WaitForUpdatesEx` over a filter on a ContainerView
//! of every VirtualMachine, reading `name` and `runtime.powerState`, on an
//! API session of its own (a one-session [`Pool`], so a long poll never
//! holds a session the console and list calls need).
//!
//! The answers become [`VmStatusChange`]s on the backend's broadcast
//! channel (the fleet turns them into `vm_status_changed`): a power-state
//! change with the state before it, a renamed VM or a VM that appeared as
//! a change to the same state (the fleet drops the VM's cached list), a VM
//! that left the inventory as a change to `Unknown`.
//!
//! When the session or the filter is lost (an expired session, a host
//! restart, a broken answer), the session is discarded (its logout ends
//! the filter and the view on the host) and following starts again on a
//! fresh one after a pause that doubles from [`RECONNECT_FIRST_MS`] up to
//! `updates_reconnect_max_ms`; the first answer of the new filter (the
//! whole inventory) is compared with what was known, so a change made
//! while following was down is still reported. The periodic list refresh
//! stays the fallback.
//!
//! What the follower did is counted ([`FollowerCounters`]) and shown with
//! its session's pool figures ([`UpdatesStats`]) in `GET
//! /api/v1/hypervisors` and `/metrics`.
//!
//! Request building and answer parsing are plain functions (no IO); it
//! depends on the vSphere client and the hypervisor model only.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

use super::client::SoapClient;
use super::soap::{self, Element, MoRef, Request, ServiceContent};
use super::{Call, VsphereConnector};
use crate::hypervisor::model::{HvResult, HypervisorError, PowerState, VmStatusChange};
use crate::hypervisor::pool::{Pool, PoolStats};

/// The first pause before following again after a loss, in ms.
pub const RECONNECT_FIRST_MS: u64 = 100;
/// VMs whose name and state are remembered; VMs beyond are not followed.
pub const MAX_FOLLOWED_VMS: usize = super::MAX_LIST_OBJECTS;
/// The properties followed.
pub const FOLLOWED_PATHS: [&str; 2] = ["name", "runtime.powerState"];

/// How one `WaitForUpdatesEx` is bounded, and how long to pause at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowLimits {
    /// `maxWaitSeconds`.
    pub wait_s: u64,
    /// `maxObjectUpdates`.
    pub max_objects: u64,
    pub reconnect_max_ms: u64,
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// `CreateContainerView` of every VirtualMachine under the root folder.
pub fn create_vm_view(content: &ServiceContent) -> Vec<u8> {
    Request::new("CreateContainerView", &content.view_manager)
        .moref("container", &content.root_folder)
        .text("type", "VirtualMachine")
        .text("recursive", "true")
        .finish()
}

/// `CreateFilter`: [`FOLLOWED_PATHS`] of every VM the view holds.
pub fn create_filter(collector: &MoRef, view: &MoRef) -> Vec<u8> {
    let mut request = Request::new("CreateFilter", collector)
        .start("spec", None)
        .start("propSet", None)
        .text("type", "VirtualMachine");
    for path in FOLLOWED_PATHS {
        request = request.text("pathSet", path);
    }
    request
        .end("propSet")
        .view_object_set(view)
        .end("spec")
        .text("partialUpdates", "false")
        .finish()
}

/// `WaitForUpdatesEx` from `version` ("" for the whole inventory first).
pub fn wait_for_updates(collector: &MoRef, version: &str, limits: &FollowLimits) -> Vec<u8> {
    let mut request = Request::new("WaitForUpdatesEx", collector);
    if !version.is_empty() {
        request = request.text("version", version);
    }
    request
        .start("options", None)
        .text("maxWaitSeconds", &limits.wait_s.to_string())
        .text("maxObjectUpdates", &limits.max_objects.to_string())
        .end("options")
        .finish()
}

// ---------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------

/// What happened to one object (`ObjectUpdate.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateKind {
    Enter,
    Modify,
    Leave,
}

/// One `ObjectUpdate`: the VM and its changed properties (name → value;
/// `None` for a removed value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUpdate {
    pub kind: UpdateKind,
    pub vm: String,
    pub changes: Vec<(String, Option<String>)>,
}

/// An `UpdateSet`: its version, whether the host cut it short (the next
/// call continues at once), and the VMs' updates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateSet {
    pub version: String,
    pub truncated: bool,
    pub objects: Vec<ObjectUpdate>,
}

fn protocol(message: String) -> HypervisorError {
    HypervisorError::Protocol(message)
}

/// Reads a `WaitForUpdatesExResponse`; `None` when the wait ended with no
/// change (the host answers no `returnval`).
pub fn update_set(result: &Element) -> HvResult<Option<UpdateSet>> {
    let Some(set) = result.child("returnval") else {
        return Ok(None);
    };
    let version = set
        .child_text("version")
        .ok_or_else(|| protocol("an UpdateSet has no version".into()))?
        .to_string();
    let mut objects = Vec::new();
    for filter in set.children_named("filterSet") {
        for object in filter.children_named("objectSet") {
            if let Some(update) = object_update(object)? {
                objects.push(update);
            }
        }
    }
    Ok(Some(UpdateSet {
        version,
        truncated: set.child_text("truncated") == Some("true"),
        objects,
    }))
}

/// One `objectSet`; `None` for an object that is not a VM.
fn object_update(object: &Element) -> HvResult<Option<ObjectUpdate>> {
    let kind = match object.child_text("kind") {
        Some("enter") => UpdateKind::Enter,
        Some("modify") => UpdateKind::Modify,
        Some("leave") => UpdateKind::Leave,
        other => return Err(protocol(format!("an ObjectUpdate of kind {other:?}"))),
    };
    let obj = object
        .child("obj")
        .ok_or_else(|| protocol("an ObjectUpdate has no obj".into()))?;
    if obj.attr("type") != Some("VirtualMachine") {
        return Ok(None);
    }
    for missing in object.children_named("missingSet") {
        let fault = missing
            .path(&["fault", "fault"])
            .and_then(Element::xsi_type);
        if fault == Some("NotAuthenticated") {
            return Err(HypervisorError::SessionExpired);
        }
    }
    let changes = object
        .children_named("changeSet")
        .filter_map(|change| {
            let name = change.child_text("name")?.to_string();
            let removed = matches!(change.child_text("op"), Some("remove" | "indirectRemove"));
            let value = match change.child("val") {
                Some(val) if !removed => Some(val.text.trim().to_string()),
                _ => None,
            };
            Some((name, value))
        })
        .collect();
    Ok(Some(ObjectUpdate {
        kind,
        vm: obj.text.trim().to_string(),
        changes,
    }))
}

// ---------------------------------------------------------------------------
// What is known, and what changed
// ---------------------------------------------------------------------------

/// Each followed VM's name and power state, kept across reconnections.
#[derive(Debug, Default)]
pub struct Inventory {
    vms: HashMap<String, (String, PowerState)>,
    /// During the first answers of a new filter (the whole inventory, in
    /// one or more truncated parts): the VMs seen so far.
    syncing: Option<HashSet<String>>,
    /// Whether the inventory was ever read whole (before that, nothing is
    /// reported: there is no "before").
    synced_once: bool,
}

impl Inventory {
    /// VMs followed.
    pub fn len(&self) -> usize {
        self.vms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }

    /// A new filter's first answer is coming: what it lists is compared
    /// with what is known.
    pub fn start_sync(&mut self) {
        self.syncing = Some(HashSet::new());
    }

    /// Applies one answer of `hypervisor`; returns the changes to report.
    pub fn apply(&mut self, hypervisor: &str, set: &UpdateSet) -> Vec<VmStatusChange> {
        let mut changes = Vec::new();
        for object in &set.objects {
            if let Some(seen) = &mut self.syncing {
                if seen.len() < MAX_FOLLOWED_VMS {
                    seen.insert(object.vm.clone());
                }
            }
            let change = match object.kind {
                UpdateKind::Leave => self.leave(&object.vm),
                UpdateKind::Enter | UpdateKind::Modify => self.modify(object),
            };
            changes.extend(change);
        }
        if !set.truncated {
            if let Some(seen) = self.syncing.take() {
                let gone: Vec<String> = self
                    .vms
                    .keys()
                    .filter(|vm| !seen.contains(*vm))
                    .cloned()
                    .collect();
                for vm in gone {
                    changes.extend(self.leave(&vm));
                }
                let report = self.synced_once;
                self.synced_once = true;
                if !report {
                    return Vec::new();
                }
            }
        }
        if !self.synced_once {
            return Vec::new();
        }
        for change in &mut changes {
            change.hypervisor = hypervisor.to_string();
        }
        changes
    }

    fn leave(&mut self, vm: &str) -> Option<VmStatusChange> {
        let (_, old) = self.vms.remove(vm)?;
        Some(change(vm, old, PowerState::Unknown))
    }

    fn modify(&mut self, object: &ObjectUpdate) -> Option<VmStatusChange> {
        let known = self.vms.get(&object.vm).cloned();
        if known.is_none() && self.vms.len() >= MAX_FOLLOWED_VMS {
            return None;
        }
        let (mut name, old) = known
            .clone()
            .unwrap_or_else(|| (String::new(), PowerState::Unknown));
        let mut power = old;
        for (path, value) in &object.changes {
            match (path.as_str(), value) {
                ("name", Some(value)) => name = value.clone(),
                ("runtime.powerState", Some(value)) => power = soap::power_state(value),
                ("runtime.powerState", None) => power = PowerState::Unknown,
                _ => {}
            }
        }
        self.vms.insert(object.vm.clone(), (name.clone(), power));
        match known {
            // New to us: the list must be read again; no "before" state.
            None => Some(change(&object.vm, power, power)),
            Some((old_name, _)) if old != power || old_name != name => {
                Some(change(&object.vm, old, power))
            }
            Some(_) => None,
        }
    }
}

fn change(vm: &str, old: PowerState, new: PowerState) -> VmStatusChange {
    VmStatusChange {
        hypervisor: String::new(),
        vm_id: vm.to_string(),
        old,
        new,
    }
}

// ---------------------------------------------------------------------------
// The follower
// ---------------------------------------------------------------------------

/// Longest `last_error` kept, in bytes (a SOAP fault's text can be long).
pub const MAX_LAST_ERROR_BYTES: usize = 512;

/// What the follower did since start; written by its task, read by the
/// control plane (relaxed atomics: each figure stands alone).
#[derive(Debug, Default)]
pub struct FollowerCounters {
    following: AtomicBool,
    updates_received: AtomicU64,
    changes_reported: AtomicU64,
    /// 0: never.
    last_update_unix_ms: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl FollowerCounters {
    /// The filter is in place: updates flow from now on.
    pub fn started(&self) {
        self.following.store(true, Ordering::Relaxed);
    }

    /// An `UpdateSet` arrived at `unix_ms`, giving `changes` reported changes.
    pub fn update(&self, changes: usize, unix_ms: u64) {
        self.updates_received.fetch_add(1, Ordering::Relaxed);
        self.changes_reported
            .fetch_add(changes as u64, Ordering::Relaxed);
        self.last_update_unix_ms.store(unix_ms, Ordering::Relaxed);
    }

    /// Following was lost (or could not start) for `error`.
    pub fn lost(&self, error: &HypervisorError) {
        self.following.store(false, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut text = error.to_string();
        if text.len() > MAX_LAST_ERROR_BYTES {
            let mut end = MAX_LAST_ERROR_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(text);
    }

    /// The figures, with the follower's session pool.
    pub fn stats(&self, session: PoolStats) -> UpdatesStats {
        let last = self.last_update_unix_ms.load(Ordering::Relaxed);
        UpdatesStats {
            following: self.following.load(Ordering::Relaxed),
            session,
            updates_received: self.updates_received.load(Ordering::Relaxed),
            changes_reported: self.changes_reported.load(Ordering::Relaxed),
            last_update_unix_ms: (last > 0).then_some(last),
            errors: self.errors.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// `GET /api/v1/hypervisors` `updates` (a vSphere hypervisor that
/// follows updates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpdatesStats {
    /// Whether a `WaitForUpdatesEx` filter is in place now.
    pub following: bool,
    /// The follower's own one-session pool (its `logins` count how often
    /// it had to start over on a new session).
    pub session: PoolStats,
    /// `WaitForUpdatesEx` answers that carried an `UpdateSet`, since start.
    pub updates_received: u64,
    /// VM changes they gave (`vm_status_changed` and list refreshes).
    pub changes_reported: u64,
    /// When the last `UpdateSet` arrived (Unix ms); absent before any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_update_unix_ms: Option<u64>,
    /// Times following was lost or could not start, since start.
    pub errors: u64,
    /// Why it was last lost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Follows one hypervisor's VMs on a session of its own.
pub struct Follower {
    pub(super) id: String,
    pub(super) client: Arc<SoapClient>,
    pub(super) pool: Pool<VsphereConnector>,
    pub(super) changes: broadcast::Sender<VmStatusChange>,
    pub(super) limits: FollowLimits,
    pub(super) counters: FollowerCounters,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("id", &self.id)
            .field("limits", &self.limits)
            .finish()
    }
}

impl Follower {
    /// What it did, with its session pool's figures.
    pub fn stats(&self) -> UpdatesStats {
        self.counters.stats(self.pool.stats())
    }

    /// Follows until the task is aborted (the backend's shutdown), coming
    /// back after every loss.
    pub async fn run(self: Arc<Self>) {
        let mut inventory = Inventory::default();
        let first = Duration::from_millis(RECONNECT_FIRST_MS);
        let most = Duration::from_millis(self.limits.reconnect_max_ms.max(RECONNECT_FIRST_MS));
        let mut pause = first;
        loop {
            let error = self.follow(&mut inventory, &mut pause).await;
            self.counters.lost(&error);
            tracing::warn!(
                hypervisor = %self.id,
                code = error.code(),
                "vSphere updates lost: {error}; following again in {} ms",
                pause.as_millis()
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(most);
        }
    }

    /// One session's worth of following; returns why it ended. The
    /// session is discarded whatever happened (its logout ends the filter
    /// and the view on the host).
    async fn follow(&self, inventory: &mut Inventory, pause: &mut Duration) -> HypervisorError {
        let mut pooled = match self.pool.acquire().await {
            Ok(pooled) => pooled,
            Err(e) => return e,
        };
        let call = Call {
            client: self.client.clone(),
            session: (*pooled).clone(),
        };
        let error = match self.follow_on(&call, inventory, pause).await {
            Ok(never) => match never {},
            Err(e) => e,
        };
        pooled.discard();
        error
    }

    async fn follow_on(
        &self,
        call: &Call,
        inventory: &mut Inventory,
        pause: &mut Duration,
    ) -> HvResult<std::convert::Infallible> {
        let content = call.session.content.clone();
        let view =
            soap::returned_moref(call.soap(create_vm_view(&content), None).await?.result()?)?;
        let body = create_filter(&content.property_collector, &view);
        soap::returned_moref(call.soap(body, None).await?.result()?)?;
        self.counters.started();
        inventory.start_sync();
        let mut version = String::new();
        let mut announced = false;
        loop {
            let body = wait_for_updates(&content.property_collector, &version, &self.limits);
            let answer = call.soap(body, None).await?;
            let Some(set) = update_set(answer.result()?)? else {
                *pause = Duration::from_millis(RECONNECT_FIRST_MS);
                continue;
            };
            *pause = Duration::from_millis(RECONNECT_FIRST_MS);
            version = set.version.clone();
            let changes = inventory.apply(&self.id, &set);
            self.counters.update(changes.len(), unix_ms_now());
            for change in changes {
                // No receiver (no event bus) is not an error.
                let _ = self.changes.send(change);
            }
            if !announced && !set.truncated {
                announced = true;
                tracing::info!(
                    hypervisor = %self.id,
                    vms = inventory.len(),
                    "following vSphere updates (WaitForUpdatesEx): inventory read"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_follower_counts_updates_and_losses() {
        let counters = FollowerCounters::default();
        let session = PoolStats::default();
        let idle = counters.stats(session);
        assert!(!idle.following);
        assert_eq!((idle.updates_received, idle.errors), (0, 0));
        assert_eq!((idle.last_update_unix_ms, &idle.last_error), (None, &None));
        let json = serde_json::to_value(&idle).unwrap();
        assert!(json.get("last_update_unix_ms").is_none(), "{json}");
        counters.started();
        counters.update(3, 1_000);
        counters.update(0, 2_000);
        let running = counters.stats(session);
        assert!(running.following);
        assert_eq!(running.updates_received, 2);
        assert_eq!(running.changes_reported, 3);
        assert_eq!(running.last_update_unix_ms, Some(2_000));
        counters.lost(&HypervisorError::Unreachable(
            "x".repeat(4 * MAX_LAST_ERROR_BYTES),
        ));
        let lost = counters.stats(session);
        assert!(!lost.following);
        assert_eq!(lost.errors, 1);
        let error = lost.last_error.unwrap();
        assert!(
            error.len() <= MAX_LAST_ERROR_BYTES && error.contains("xxx"),
            "{error}"
        );
        assert_eq!(lost.updates_received, 2, "counts survive a loss");
        assert!(unix_ms_now() > 1_700_000_000_000);
    }

    fn parse_result(xml: &str) -> Element {
        let root = soap::parse(xml.as_bytes()).unwrap();
        soap::body_result(&root).unwrap().clone()
    }

    const INITIAL: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema">
<soapenv:Body><WaitForUpdatesExResponse xmlns="urn:vim25"><returnval>
<version>-</version>
<filterSet><filter type="PropertyFilter">session[1]f1</filter>
<objectSet><kind>enter</kind><obj type="VirtualMachine">vm-1</obj>
<changeSet><name>name</name><op>assign</op><val xsi:type="xsd:string">web &amp; db</val></changeSet>
<changeSet><name>runtime.powerState</name><op>assign</op><val xsi:type="VirtualMachinePowerState">poweredOn</val></changeSet>
</objectSet>
<objectSet><kind>enter</kind><obj type="VirtualMachine">vm-2</obj>
<changeSet><name>name</name><op>assign</op><val xsi:type="xsd:string">two</val></changeSet>
<changeSet><name>runtime.powerState</name><op>assign</op><val xsi:type="VirtualMachinePowerState">poweredOff</val></changeSet>
</objectSet>
<objectSet><kind>enter</kind><obj type="HostSystem">host-9</obj></objectSet>
</filterSet>
</returnval></WaitForUpdatesExResponse></soapenv:Body></soapenv:Envelope>"#;

    fn modify(vm: &str, state: &str) -> UpdateSet {
        UpdateSet {
            version: "2".into(),
            truncated: false,
            objects: vec![ObjectUpdate {
                kind: UpdateKind::Modify,
                vm: vm.into(),
                changes: vec![("runtime.powerState".into(), Some(state.into()))],
            }],
        }
    }

    #[test]
    fn requests_carry_the_spec_version_and_bounds() {
        let collector = MoRef::new("PropertyCollector", "propertyCollector");
        let view = MoRef::new("ContainerView", "session[x]view-1");
        let filter = String::from_utf8(create_filter(&collector, &view)).unwrap();
        assert!(
            filter.contains("<pathSet>runtime.powerState</pathSet>"),
            "{filter}"
        );
        assert!(filter.contains(r#"<obj type="ContainerView">session[x]view-1</obj>"#));
        let limits = FollowLimits {
            wait_s: 7,
            max_objects: 50,
            reconnect_max_ms: 1000,
        };
        let first = String::from_utf8(wait_for_updates(&collector, "", &limits)).unwrap();
        assert!(!first.contains("<version>"), "{first}");
        assert!(first
            .contains("<maxWaitSeconds>7</maxWaitSeconds><maxObjectUpdates>50</maxObjectUpdates>"));
        let next = String::from_utf8(wait_for_updates(&collector, "3<", &limits)).unwrap();
        assert!(next.contains("<version>3&lt;</version>"), "{next}");
    }

    #[test]
    fn answers_are_read_and_hostile_ones_refused() {
        let set = update_set(&parse_result(INITIAL)).unwrap().unwrap();
        assert_eq!(set.version, "-");
        assert!(!set.truncated);
        assert_eq!(set.objects.len(), 2, "the host is not a VM");
        assert_eq!(set.objects[0].vm, "vm-1");
        assert_eq!(
            set.objects[0].changes[0],
            ("name".to_string(), Some("web & db".to_string()))
        );
        let timeout =
            parse_result(r#"<Envelope><Body><WaitForUpdatesExResponse/></Body></Envelope>"#);
        assert_eq!(update_set(&timeout).unwrap(), None);
        let bad = parse_result(
            r#"<Envelope><Body><R><returnval><version>1</version><filterSet><objectSet><kind>dance</kind></objectSet></filterSet></returnval></R></Body></Envelope>"#,
        );
        assert!(matches!(
            update_set(&bad),
            Err(HypervisorError::Protocol(_))
        ));
        let no_version = parse_result(
            r#"<Envelope><Body><R><returnval><filterSet/></returnval></R></Body></Envelope>"#,
        );
        assert!(update_set(&no_version).is_err());
    }

    #[test]
    fn the_inventory_reports_changes_once_and_compares_after_a_reconnect() {
        let mut inventory = Inventory::default();
        inventory.start_sync();
        let initial = update_set(&parse_result(INITIAL)).unwrap().unwrap();
        assert!(inventory.apply("vc", &initial).is_empty(), "no before");
        let changes = inventory.apply("vc", &modify("vm-1", "poweredOff"));
        assert_eq!(
            changes,
            vec![VmStatusChange {
                hypervisor: "vc".into(),
                vm_id: "vm-1".into(),
                old: PowerState::On,
                new: PowerState::Off,
            }]
        );
        assert!(inventory
            .apply("vc", &modify("vm-1", "poweredOff"))
            .is_empty());
        // A new filter after a loss: vm-2 was powered on meanwhile, vm-1
        // was removed.
        inventory.start_sync();
        let mut again = modify("vm-2", "poweredOn");
        again.objects[0].kind = UpdateKind::Enter;
        let changes = inventory.apply("vc", &again);
        let summary: Vec<(String, PowerState, PowerState)> = changes
            .into_iter()
            .map(|c| (c.vm_id, c.old, c.new))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("vm-2".to_string(), PowerState::Off, PowerState::On),
                ("vm-1".to_string(), PowerState::Off, PowerState::Unknown),
            ]
        );
    }
}
