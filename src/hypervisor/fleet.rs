//! The appliance's hypervisors as one service: every call to a hypervisor
//! goes through its priority queue ([`queue`](super::queue)); VM lists and
//! thumbnails through the shared caches ([`cache`](super::cache)); power
//! actions become operations ([`operations`](super::operations)); and VM
//! ids are made unique across hypervisors (`hypervisor:native`, e.g.
//! `esx1:vm-57`; the native id alone works when only one hypervisor has
//! it).
//!
//! Placement: all of this runs on the control plane's runtime; the data
//! plane never waits on a hypervisor (it gets a resolved target in an
//! admission). Nothing here depends on the data plane or the control
//! plane's HTTP layer.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::backend::{Backend, BackendError, HypervisorConfig, StartContext};
use super::cache::{CacheLimits, CacheStats, Entry, TtlCache, Weigh};
use super::model::{
    Console, HvResult, Hypervisor, HypervisorError, PowerAction, PowerState, Side, Thumbnail,
    ThumbnailSize, VmInfo, VmStatusChange,
};
use super::operations::{OperationView, Operations, OperationsConfig};
use super::pool::PoolStats;
use super::queue::{Lane, PriorityQueue, QueueConfig, QueueStats};
use crate::events::protocol::{ProgressData, VmStatusData};
use crate::events::{Event, EventBus};

/// Status changes buffered for slow subscribers (the event bus).
pub const STATUS_CHANGES_CAPACITY: usize = 1024;
/// VMs whose last power state is remembered to report changes
/// (`vm_status_changed`); VMs beyond are listed but not compared.
pub const MAX_KNOWN_VMS: usize = 200_000;
/// Longest VM id accepted in a request, in bytes.
pub const MAX_VM_ID_BYTES: usize = 300;

/// `[queue]`: what every hypervisor's queue shares (`max_concurrent` is
/// per hypervisor); units in the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    pub critical_reserve: usize,
    pub max_queue_depth: usize,
    pub queue_timeout_ms: u64,
}

impl Default for QueueSettings {
    fn default() -> Self {
        let d = QueueConfig::default();
        QueueSettings {
            critical_reserve: d.critical_reserve,
            max_queue_depth: d.max_queue_depth,
            queue_timeout_ms: d.queue_timeout_ms,
        }
    }
}

impl QueueSettings {
    /// The queue of a hypervisor allowed `max_concurrent` calls (the
    /// reserve shrinks to fit one that allows a single call).
    pub fn for_hypervisor(&self, max_concurrent: usize) -> QueueConfig {
        QueueConfig {
            max_concurrent,
            critical_reserve: self.critical_reserve.min(max_concurrent.saturating_sub(1)),
            max_queue_depth: self.max_queue_depth,
            queue_timeout_ms: self.queue_timeout_ms,
        }
    }
}

/// `[cache]`; units in the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    pub vm_list_ttl_ms: u64,
    pub thumbnail_ttl_ms: u64,
    /// How long "not found / not running / unsupported" answers are kept.
    pub negative_ttl_ms: u64,
    pub max_thumbnails: u64,
    pub max_thumbnail_bytes: u64,
    /// Bound of the VM-list cache (one entry per hypervisor).
    pub max_vm_list_bytes: u64,
    /// The thumbnail size when a request names none, and the largest one
    /// a request may ask for.
    pub thumbnail_width: u32,
    pub thumbnail_height: u32,
    pub max_thumbnail_width: u32,
    pub max_thumbnail_height: u32,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            vm_list_ttl_ms: 30_000,
            thumbnail_ttl_ms: 120_000,
            negative_ttl_ms: super::cache::DEFAULT_NEGATIVE_TTL_MS,
            max_thumbnails: 4096,
            max_thumbnail_bytes: 256 * 1024 * 1024,
            max_vm_list_bytes: 64 * 1024 * 1024,
            thumbnail_width: 320,
            thumbnail_height: 240,
            max_thumbnail_width: 1280,
            max_thumbnail_height: 1024,
        }
    }
}

impl CacheConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.vm_list_limits().validate("cache (VM lists)")?;
        self.thumbnail_limits().validate("cache (thumbnails)")?;
        if self.thumbnail_width == 0
            || self.thumbnail_height == 0
            || self.thumbnail_width > self.max_thumbnail_width
            || self.thumbnail_height > self.max_thumbnail_height
        {
            return Err(
                "cache.thumbnail_width/height must be 1..=max_thumbnail_width/height".into(),
            );
        }
        if self.max_thumbnail_width > super::thumbnail::MAX_SOURCE_SIDE_PIXELS
            || self.max_thumbnail_height > super::thumbnail::MAX_SOURCE_SIDE_PIXELS
        {
            return Err(format!(
                "cache.max_thumbnail_width/height must be at most {}",
                super::thumbnail::MAX_SOURCE_SIDE_PIXELS
            ));
        }
        Ok(())
    }

    fn vm_list_limits(&self) -> CacheLimits {
        CacheLimits {
            ttl_ms: self.vm_list_ttl_ms,
            negative_ttl_ms: 0,
            max_entries: super::backend::MAX_HYPERVISORS as u64,
            max_bytes: self.max_vm_list_bytes,
        }
    }

    fn thumbnail_limits(&self) -> CacheLimits {
        CacheLimits {
            ttl_ms: self.thumbnail_ttl_ms,
            negative_ttl_ms: self.negative_ttl_ms,
            max_entries: self.max_thumbnails,
            max_bytes: self.max_thumbnail_bytes,
        }
    }
}

/// Everything the fleet is configured with besides the hypervisors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetSettings {
    pub queue: QueueSettings,
    pub cache: CacheConfig,
    pub operations: OperationsConfig,
}

/// A thumbnail as cached: the PNG and its entity tag.
#[derive(Debug)]
pub struct CachedThumbnail {
    pub thumbnail: Thumbnail,
    /// A strong ETag of the PNG bytes (quoted, as the header wants it).
    pub etag: String,
}

impl Weigh for CachedThumbnail {
    fn weight_bytes(&self) -> usize {
        self.thumbnail.png.len() + self.etag.len()
    }
}

fn etag_of(png: &[u8]) -> String {
    // Not a security property, only change detection: a 64-bit hash of
    // the bytes and their length.
    let mut h = DefaultHasher::new();
    png.hash(&mut h);
    format!("\"{:016x}-{:x}\"", h.finish(), png.len())
}

const HEALTH_UNKNOWN: u8 = 0;
const HEALTH_UP: u8 = 1;
const HEALTH_DOWN: u8 = 2;

/// One configured hypervisor with its queue and health.
#[derive(Debug)]
pub struct Member {
    pub id: String,
    pub kind: &'static str,
    pub backend: Backend,
    pub queue: PriorityQueue,
    health: AtomicU8,
    last_error: Mutex<Option<String>>,
    /// The event bus, once attached (shared with the fleet).
    events: Arc<OnceLock<EventBus>>,
}

fn health_name(health: u8) -> &'static str {
    match health {
        HEALTH_UP => "up",
        HEALTH_DOWN => "down",
        _ => "unknown",
    }
}

impl Member {
    /// Run `call` in `lane`, noting whether the hypervisor answered.
    async fn call<T, F>(&self, lane: Lane, call: F) -> HvResult<T>
    where
        F: std::future::Future<Output = HvResult<T>>,
    {
        let result = self.queue.run(lane, call).await;
        self.note(&result);
        result
    }

    fn note<T>(&self, result: &HvResult<T>) {
        match result {
            Ok(_) => self.set_health(HEALTH_UP),
            Err(e) if e.side() == Side::Hypervisor => {
                *self
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
                self.set_health(HEALTH_DOWN);
            }
            // The caller's mistakes and our own queue say nothing about
            // the hypervisor.
            Err(_) => {}
        }
    }

    /// Record the hypervisor's health; a change is an event
    /// (`server_status_changed`). The `hypervisor_down` alert and its
    /// clearing come from the control plane's alert detectors, which read
    /// [`reachable`](Self::reachable) and `last_error`.
    fn set_health(&self, health: u8) {
        let old = self.health.swap(health, Ordering::Relaxed);
        if old == health {
            return;
        }
        let Some(bus) = self.events.get() else { return };
        let data = serde_json::json!({
            "server_id": self.id,
            "old_status": health_name(old),
            "new_status": health_name(health),
            "pool": self.backend.pool_stats(),
        });
        bus.publish(&Event::server_status(&self.id, data));
    }

    /// Whether the last call reached the hypervisor (None before any).
    pub fn reachable(&self) -> Option<bool> {
        match self.health.load(Ordering::Relaxed) {
            HEALTH_UP => Some(true),
            HEALTH_DOWN => Some(false),
            _ => None,
        }
    }
}

/// `GET /api/v1/hypervisors`.
#[derive(Debug, Clone, Serialize)]
pub struct HypervisorView {
    pub id: String,
    pub kind: &'static str,
    /// Whether the last call reached it (null before the first).
    pub reachable: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// API-session pool (vSphere).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolStats>,
    /// The `WaitForUpdatesEx` follower (vSphere with `follow_updates`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updates: Option<crate::hypervisor::vsphere::updates::UpdatesStats>,
    pub queue: QueueStats,
}

/// `GET /api/v1/queue/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct FleetStats {
    pub hypervisors: Vec<HypervisorView>,
    pub vm_list_cache: CacheStats,
    pub thumbnail_cache: CacheStats,
    pub operations: usize,
}

/// A hypervisor that could not list its VMs (the others still do).
#[derive(Debug, Clone, Serialize)]
pub struct Unavailable {
    pub hypervisor: String,
    pub code: &'static str,
    pub message: String,
}

/// `GET /api/v1/vms`.
#[derive(Debug, Clone, Serialize)]
pub struct VmList {
    pub vms: Vec<VmInfo>,
    /// Hypervisors that did not answer.
    pub unavailable: Vec<Unavailable>,
}

/// A VM found: which hypervisor, its native id and its unique id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRef {
    pub member: usize,
    pub native: String,
    pub id: String,
}

type ThumbKey = (usize, String, u32, u32);

/// The hypervisors, their queues, caches and operations.
pub struct Fleet {
    members: Vec<Arc<Member>>,
    vm_lists: TtlCache<usize, Vec<VmInfo>>,
    thumbnails: TtlCache<ThumbKey, CachedThumbnail>,
    operations: Arc<Operations>,
    settings: FleetSettings,
    changes: broadcast::Sender<VmStatusChange>,
    /// The event bus, once attached (shared with the members).
    events: Arc<OnceLock<EventBus>>,
    /// Each VM's name and power state as last listed or pushed (unique id
    /// → …), to report changes; at most [`MAX_KNOWN_VMS`].
    known: Mutex<HashMap<String, (String, PowerState)>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field(
                "members",
                &self.members.iter().map(|m| &m.id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Fleet {
    /// Starts every configured hypervisor. Runs inside the control
    /// plane's runtime (backends start tasks on it).
    pub fn start(
        configs: &[HypervisorConfig],
        settings: FleetSettings,
        cx: &StartContext<'_>,
    ) -> Result<Arc<Fleet>, BackendError> {
        let mut members = Vec::with_capacity(configs.len());
        let events = Arc::new(OnceLock::new());
        for config in configs {
            let queue = PriorityQueue::new(settings.queue.for_hypervisor(config.max_concurrent()))
                .map_err(|problem| BackendError::Start {
                    id: config.id().to_string(),
                    problem,
                })?;
            members.push(Arc::new(Member {
                id: config.id().to_string(),
                kind: config.kind(),
                backend: Backend::start(config, cx)?,
                queue,
                health: AtomicU8::new(HEALTH_UNKNOWN),
                last_error: Mutex::new(None),
                events: events.clone(),
            }));
        }
        let (changes, _) = broadcast::channel(STATUS_CHANGES_CAPACITY);
        let fleet = Arc::new(Fleet {
            members,
            vm_lists: TtlCache::new(settings.cache.vm_list_limits()),
            thumbnails: TtlCache::new(settings.cache.thumbnail_limits()),
            operations: Arc::new(Operations::new(settings.operations)),
            settings,
            changes,
            events,
            known: Mutex::new(HashMap::new()),
        });
        fleet.follow_status_changes();
        Ok(fleet)
    }

    /// Publish what the hypervisors do (operations' progress, health, VM
    /// power states) on `bus` from now on. Once; later calls are ignored.
    pub fn set_events(&self, bus: EventBus) {
        let _ = self.events.set(bus);
    }

    /// Remember `vm`'s state; when it was known in another state, publish
    /// the change. `pushed_old` is what a pushing hypervisor (QMP) said the
    /// old state was, used when the VM was not known yet.
    fn note_vm_state(
        &self,
        server: &str,
        vm_id: &str,
        name: Option<&str>,
        new: PowerState,
        pushed_old: Option<PowerState>,
    ) {
        let previous = {
            let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
            let full = known.len() >= MAX_KNOWN_VMS;
            match known.get_mut(vm_id) {
                Some((known_name, state)) => {
                    if let Some(n) = name {
                        if known_name != n {
                            *known_name = n.to_string();
                        }
                    }
                    let old = *state;
                    *state = new;
                    Some((Some(old), known_name.clone()))
                }
                None if full => None,
                None => {
                    known.insert(
                        vm_id.to_string(),
                        (name.unwrap_or_default().to_string(), new),
                    );
                    Some((None, name.unwrap_or_default().to_string()))
                }
            }
        };
        let Some((old, vm_name)) = previous else {
            return;
        };
        let Some(old) = old.or(pushed_old) else {
            return;
        };
        if old == new {
            return;
        }
        if let Some(bus) = self.events.get() {
            bus.publish(&Event::vm_status(&VmStatusData {
                vm_id: vm_id.to_string(),
                vm_name: (!vm_name.is_empty()).then_some(vm_name),
                server_id: server.to_string(),
                old_status: power_name(old),
                new_status: power_name(new),
            }));
        }
    }

    /// A hypervisor's fresh VM list: report what changed since the last.
    fn compare_list(&self, server: &str, vms: &[VmInfo]) {
        if self.events.get().is_none() {
            return;
        }
        for vm in vms {
            self.note_vm_state(server, &vm.id, Some(&vm.name), vm.power, None);
        }
    }

    /// Fetch every hypervisor's VM list afresh (LOW lane), so changes no
    /// hypervisor pushes are reported; the API's cache is refreshed too.
    pub async fn refresh_lists(&self) {
        for index in 0..self.members.len() {
            self.vm_lists.invalidate(&index).await;
        }
        let lists = (0..self.members.len()).map(|i| self.list_of(i, Lane::Low));
        let _ = join_all(lists).await;
    }

    fn publish_progress(&self, server: &str, data: ProgressData) {
        if let Some(bus) = self.events.get() {
            bus.publish(&Event::progress(server, &data));
        }
    }

    pub fn members(&self) -> &[Arc<Member>] {
        &self.members
    }

    pub fn settings(&self) -> &FleetSettings {
        &self.settings
    }

    /// Power-state changes of every VM (ids unique across hypervisors).
    pub fn subscribe(&self) -> broadcast::Receiver<VmStatusChange> {
        self.changes.subscribe()
    }

    /// Hypervisors that push state changes (QEMU): forward them with
    /// unique ids, and forget what the caches knew about the VM.
    fn follow_status_changes(self: &Arc<Self>) {
        for (index, member) in self.members.iter().enumerate() {
            let Some(mut rx) = member.backend.subscribe() else {
                continue;
            };
            let fleet = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    let change = match rx.recv().await {
                        Ok(change) => change,
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    let Some(fleet) = fleet.upgrade() else { return };
                    fleet.vm_changed(index, &change.vm_id).await;
                    let member = &fleet.members[index];
                    fleet.note_vm_state(
                        &member.id,
                        &unique_id(&member.id, &change.vm_id),
                        None,
                        change.new,
                        Some(change.old),
                    );
                    let _ = fleet.changes.send(VmStatusChange {
                        vm_id: unique_id(&member.id, &change.vm_id),
                        hypervisor: member.id.clone(),
                        ..change
                    });
                }
            });
        }
    }

    /// A VM changed: its hypervisor's list and its thumbnails are stale.
    async fn vm_changed(&self, member: usize, native: &str) {
        self.vm_lists.invalidate(&member).await;
        self.thumbnails
            .invalidate_where(|(m, vm, _, _)| *m == member && vm == native)
            .await;
    }

    fn member_index(&self, id: &str) -> HvResult<usize> {
        self.members
            .iter()
            .position(|m| m.id == id)
            .ok_or_else(|| HypervisorError::HypervisorNotFound(id.to_string()))
    }

    /// One hypervisor's VM list, from the cache or fetched in `lane`.
    async fn list_of(&self, index: usize, lane: Lane) -> HvResult<Arc<Vec<VmInfo>>> {
        let member = self.members[index].clone();
        let entry = self
            .vm_lists
            .get_or_fetch(index, async move {
                let mut vms = member.call(lane, member.backend.list_vms()).await?;
                for vm in &mut vms {
                    vm.id = unique_id(&member.id, &vm.native_id);
                    vm.hypervisor = member.id.clone();
                }
                self.compare_list(&member.id, &vms);
                Ok(vms)
            })
            .await?;
        entry.value
    }

    /// Every VM of every hypervisor (or of one); a hypervisor that does
    /// not answer is reported beside the others' VMs. With a filter, its
    /// failure is the answer.
    pub async fn list(&self, hypervisor: Option<&str>) -> HvResult<VmList> {
        let indices: Vec<usize> = match hypervisor {
            Some(id) => vec![self.member_index(id)?],
            None => (0..self.members.len()).collect(),
        };
        let lists = join_all(indices.iter().map(|i| self.list_of(*i, Lane::Normal))).await;
        let mut out = VmList {
            vms: Vec::new(),
            unavailable: Vec::new(),
        };
        for (index, result) in indices.into_iter().zip(lists) {
            match result {
                Ok(vms) => out.vms.extend(vms.iter().cloned()),
                Err(e) if hypervisor.is_some() => return Err(e),
                Err(e) => out.unavailable.push(Unavailable {
                    hypervisor: self.members[index].id.clone(),
                    code: e.code(),
                    message: e.to_string(),
                }),
            }
        }
        Ok(out)
    }

    /// Which hypervisor has `vm`: `hypervisor:native` directly, or a bare
    /// native id looked up in the VM lists (cached ones first, even stale
    /// ones: which hypervisor has a VM rarely changes).
    pub async fn resolve(&self, vm: &str, lane: Lane) -> HvResult<VmRef> {
        if vm.is_empty() || vm.len() > MAX_VM_ID_BYTES {
            return Err(HypervisorError::VmNotFound(clip_id(vm)));
        }
        if let Some((hv, native)) = vm.split_once(':') {
            if let Ok(member) = self.member_index(hv) {
                return Ok(VmRef {
                    member,
                    native: native.to_string(),
                    id: vm.to_string(),
                });
            }
        }
        let mut found = Vec::new();
        let mut unknown = Vec::new();
        for index in 0..self.members.len() {
            match self.vm_lists.peek(&index).await.and_then(|e| e.value.ok()) {
                Some(list) if list.iter().any(|v| v.native_id == vm) => found.push(index),
                Some(_) => {}
                None => unknown.push(index),
            }
        }
        if found.is_empty() && !unknown.is_empty() {
            let lists = join_all(unknown.iter().map(|i| self.list_of(*i, lane))).await;
            for (index, list) in unknown.into_iter().zip(lists) {
                if list.is_ok_and(|l| l.iter().any(|v| v.native_id == vm)) {
                    found.push(index);
                }
            }
        }
        match found.as_slice() {
            [] => Err(HypervisorError::VmNotFound(clip_id(vm))),
            [member] => Ok(VmRef {
                member: *member,
                native: vm.to_string(),
                id: unique_id(&self.members[*member].id, vm),
            }),
            many => Err(HypervisorError::Ambiguous(format!(
                "VM id {vm:?} exists on {}: say which, e.g. {:?}",
                many.iter()
                    .map(|i| self.members[*i].id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                unique_id(&self.members[many[0]].id, vm)
            ))),
        }
    }

    pub fn member(&self, vm: &VmRef) -> &Arc<Member> {
        &self.members[vm.member]
    }

    /// One VM as listed (from its hypervisor's cached list).
    pub async fn describe(&self, vm: &str) -> HvResult<VmInfo> {
        let found = self.resolve(vm, Lane::Normal).await?;
        let list = self.list_of(found.member, Lane::Normal).await?;
        list.iter()
            .find(|v| v.native_id == found.native)
            .cloned()
            .ok_or_else(|| HypervisorError::VmNotFound(clip_id(vm)))
    }

    /// A console target for one new connection, on the CRITICAL lane.
    pub async fn console(&self, vm: &str) -> HvResult<(VmRef, Console)> {
        let found = self.resolve(vm, Lane::Critical).await?;
        let member = self.member(&found).clone();
        let console = member
            .call(Lane::Critical, member.backend.console(&found.native))
            .await?;
        Ok((found, console))
    }

    /// A one-time console credential was used (or will never be): make
    /// it unusable.
    pub async fn console_used(&self, vm: &VmRef) -> HvResult<()> {
        let member = self.member(vm).clone();
        member
            .call(Lane::Critical, member.backend.console_used(&vm.native))
            .await
    }

    /// The thumbnail size a request asked for, within the bounds.
    pub fn thumbnail_size(
        &self,
        width: Option<u32>,
        height: Option<u32>,
    ) -> HvResult<ThumbnailSize> {
        let c = &self.settings.cache;
        let w = width.unwrap_or(c.thumbnail_width);
        let h = height.unwrap_or(c.thumbnail_height);
        if w == 0 || h == 0 || w > c.max_thumbnail_width || h > c.max_thumbnail_height {
            return Err(HypervisorError::InvalidState(format!(
                "thumbnail size {w}x{h} must be within 1x1..{}x{}",
                c.max_thumbnail_width, c.max_thumbnail_height
            )));
        }
        Ok(ThumbnailSize {
            max_width: w,
            max_height: h,
        })
    }

    /// A VM's thumbnail, from the cache or fetched on the LOW lane (one
    /// fetch per VM and size however many ask).
    pub async fn thumbnail(
        &self,
        vm: &str,
        size: ThumbnailSize,
    ) -> HvResult<(VmRef, Entry<CachedThumbnail>)> {
        let found = self.resolve(vm, Lane::Low).await?;
        let member = self.member(&found).clone();
        let key = (
            found.member,
            found.native.clone(),
            size.max_width,
            size.max_height,
        );
        let native = found.native.clone();
        let entry = self
            .thumbnails
            .get_or_fetch(key, async move {
                let thumbnail = member
                    .call(Lane::Low, member.backend.thumbnail(&native, size))
                    .await?;
                let etag = etag_of(&thumbnail.png);
                Ok(CachedThumbnail { thumbnail, etag })
            })
            .await?;
        Ok((found, entry))
    }

    /// Start a power action: recorded as an operation and run on the HIGH
    /// lane in the background; the caller gets the operation at once.
    pub async fn power(self: &Arc<Self>, vm: &str, action: PowerAction) -> HvResult<OperationView> {
        let found = self.resolve(vm, Lane::High).await?;
        let member = self.member(&found).clone();
        if !member.backend.has_power_control() {
            // Known before any call: refused now rather than as a failed
            // operation (an unknown VM still answers not found).
            self.describe(&found.id).await?;
            return Err(HypervisorError::Unsupported(format!(
                "hypervisor {} ({}) has no power control",
                member.id, member.kind
            )));
        }
        let op = self.operations.create(&found.id, &member.id, action)?;
        self.publish_progress(&member.id, progress_data(&op));
        let fleet = self.clone();
        let id = op.id.clone();
        tokio::spawn(async move {
            let sink_ops = fleet.operations.clone();
            let sink_id = id.clone();
            let sink_fleet = Arc::downgrade(&fleet);
            let sink_server = member.id.clone();
            let sink: super::model::ProgressSink = Box::new(move |p| {
                sink_ops.progress(&sink_id, &p);
                if let (Some(fleet), Some(view)) = (sink_fleet.upgrade(), sink_ops.get(&sink_id)) {
                    fleet.publish_progress(&sink_server, progress_data(&view));
                }
            });
            let result = member
                .call(
                    Lane::High,
                    member.backend.power(&found.native, action, sink),
                )
                .await;
            if let Err(e) = &result {
                tracing::warn!(vm = %found.id, ?action, error = %e, "power action failed");
            } else {
                tracing::info!(vm = %found.id, ?action, "power action done");
            }
            fleet.operations.finish(&id, &result);
            if let Some(view) = fleet.operations.get(&id) {
                fleet.publish_progress(&member.id, progress_data(&view));
            }
            fleet.vm_changed(found.member, &found.native).await;
            if fleet.events.get().is_some() {
                // List it again now, so the power state's change is
                // reported at once (QMP may report it too; the first to
                // come does).
                let _ = fleet.list_of(found.member, Lane::Low).await;
            }
        });
        Ok(op)
    }

    pub fn operation(&self, id: &str) -> Option<OperationView> {
        self.operations.get(id)
    }

    pub fn hypervisors(&self) -> Vec<HypervisorView> {
        self.members
            .iter()
            .map(|m| HypervisorView {
                id: m.id.clone(),
                kind: m.kind,
                reachable: m
                    .backend
                    .pool_stats()
                    .and_then(|p| p.reachable)
                    .or(m.reachable()),
                last_error: m
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
                pool: m.backend.pool_stats(),
                updates: m.backend.updates_stats(),
                queue: m.queue.stats(),
            })
            .collect()
    }

    pub async fn stats(&self) -> FleetStats {
        FleetStats {
            hypervisors: self.hypervisors(),
            vm_list_cache: self.vm_lists.stats().await,
            thumbnail_cache: self.thumbnails.stats().await,
            operations: self.operations.len(),
        }
    }

    /// Log out of every hypervisor (on the way out).
    pub async fn shutdown(&self) {
        for m in &self.members {
            m.backend.shutdown().await;
        }
    }
}

/// A power state as events name it (`on`, `off`, `suspended`, `unknown`:
/// as `GET /api/v1/vms` does).
fn power_name(state: PowerState) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// An operation as a `progress` event.
fn progress_data(view: &OperationView) -> ProgressData {
    let status = serde_json::to_value(view.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let operation_type = serde_json::to_value(view.action)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    ProgressData {
        operation_id: view.id.clone(),
        operation_type,
        vm_id: view.vm.clone(),
        progress_percent: view.progress_percent,
        status,
        message: view
            .error
            .as_ref()
            .map(|e| e.message.clone())
            .or_else(|| view.message.clone()),
    }
}

/// `hypervisor:native`.
pub fn unique_id(hypervisor: &str, native: &str) -> String {
    format!("{hypervisor}:{native}")
}

/// An id for an error message, never longer than the limit.
fn clip_id(vm: &str) -> String {
    let mut end = vm.len().min(MAX_VM_ID_BYTES);
    while !vm.is_char_boundary(end) {
        end -= 1;
    }
    vm[..end].to_string()
}
