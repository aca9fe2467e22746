//! The vSphere backend (ESXi or vCenter, over the SOAP API): VM list,
//! one VM, WebMKS console tickets, screenshots and power actions, each on
//! an API session checked out of the hypervisor's [`Pool`].
//!
//! - Sessions: `RetrieveServiceContent` + `SessionManager.Login` (cookie
//!   `vmware_soap_session`), validated with `CurrentTime`, ended with
//!   `Logout` (see [`VsphereConnector`]). A call that meets
//!   `NotAuthenticated` discards its session and is retried once on
//!   another.
//! - VM list: one `ContainerView` over VirtualMachine and HostSystem, read
//!   with `RetrievePropertiesEx` (paged), then destroyed.
//! - Console: `AcquireTicket("webmks")` while the session is checked out,
//!   only for a powered-on VM → `wss://host:port/ticket/{ticket}` pinned to
//!   the ticket's `sslThumbprint` (no host → the API's host; port 0 → 443;
//!   `host_map` rewrites ESXi host names the appliance cannot resolve).
//! - Power: the `…_Task` methods followed to completion by polling the
//!   task's `info` (bounded interval and overall timeout); `ShutdownGuest`
//!   (no task) by polling the VM's power state.
//! - Thumbnails: `GET /screen?id=vm-N` with the session cookie.
//! - Changes as they happen: `WaitForUpdatesEx` on a session of its own
//!   (see [`updates`]), published on a broadcast channel
//!   ([`VsphereBackend::subscribe`]).
//! - Figures (`vm_metrics_update`): the VM's `summary.quickStats` with its
//!   CPU and memory sizes, and its network rates from the
//!   PerformanceManager ([`perf`]; [`VsphereBackend::counters`]).
//!
//! What it does not do: queue or cache (the control plane does), or touch
//! the data plane. It depends on the hypervisor model, pool, thumbnails
//! and `pki`.

pub mod client;
pub mod config;
pub mod perf;
pub mod soap;
pub mod updates;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use self::client::SoapClient;
use self::soap::{MoRef, Request, ServiceContent, TaskState, Ticket};
use super::metrics::VmCounters;
use super::model::{
    Console, ConsoleTarget, HvResult, Hypervisor, HypervisorError, OperationState, PowerAction,
    PowerState, Progress, ProgressSink, Thumbnail, ThumbnailSize, VmInfo, VmStatusChange,
};
use super::pool::{Connector, Pool, PoolConfig, PoolStats};
use super::thumbnail;
use crate::events::protocol::MemorySource;
use crate::pki::{self, PkiError, Thumbprint, Trust};

pub use self::config::{Secret, VsphereConfig};

/// VMs read per `RetrievePropertiesEx` page.
pub const LIST_PAGE_OBJECTS: usize = 1000;
/// Most objects (VMs and hosts) one list may hold.
pub const MAX_LIST_OBJECTS: usize = 100_000;
/// First interval between two polls of a task; it doubles up to
/// [`TASK_POLL_MAX_MS`].
pub const TASK_POLL_FIRST_MS: u64 = 100;
pub const TASK_POLL_MAX_MS: u64 = 1000;
/// The WebMKS port when a ticket says 0 or nothing.
pub const WEBMKS_DEFAULT_PORT: u16 = 443;
/// How long shutdown waits for checked-out sessions before logging out
/// the rest as they come back.
pub const SHUTDOWN_GRACE_MS: u64 = 5_000;
/// Power-state changes kept for slow subscribers of [`VsphereBackend::subscribe`].
pub const STATUS_CHANGES_CAPACITY: usize = 256;
/// The properties read for a VM's figures.
const COUNTER_PATHS: [&str; 4] = [
    "summary.quickStats.overallCpuUsage",
    "summary.quickStats.guestMemoryUsage",
    "summary.runtime.maxCpuUsage",
    "summary.config.memorySizeMB",
];

/// Why a backend could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VsphereError {
    #[error("vsphere hypervisor config: {0}")]
    Config(String),
    #[error("vsphere hypervisor password: {0}")]
    Password(String),
    #[error("vsphere hypervisor TLS trust ({code}): {0}", code = .0.code())]
    Tls(#[from] PkiError),
}

/// One API session: its cookie and the service content it was made with.
#[derive(Clone)]
pub struct Session {
    cookie: Arc<str>,
    content: Arc<ServiceContent>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("cookie", &"<redacted>")
            .finish()
    }
}

/// Makes, checks and ends API sessions for the pool.
pub struct VsphereConnector {
    client: Arc<SoapClient>,
    username: String,
    password: Secret,
}

impl VsphereConnector {
    async fn login(&self) -> HvResult<Session> {
        let this = MoRef::new("ServiceInstance", "ServiceInstance");
        let answer = self
            .client
            .call(
                Request::new("RetrieveServiceContent", &this).finish(),
                None,
                None,
            )
            .await?;
        let content = soap::service_content(answer.result()?)?;
        let login = Request::new("Login", &content.session_manager)
            .text("userName", &self.username)
            .text("password", self.password.expose())
            .finish();
        let answer = self.client.call(login, None, None).await?;
        let cookie = answer.session_cookie.ok_or_else(|| {
            HypervisorError::Protocol("Login answered without a session cookie".into())
        })?;
        Ok(Session {
            cookie: cookie.into(),
            content: Arc::new(content),
        })
    }
}

impl Connector for VsphereConnector {
    type Connection = Session;

    fn connect(&self) -> impl Future<Output = HvResult<Session>> + Send {
        self.login()
    }

    fn validate(&self, session: &Session) -> impl Future<Output = HvResult<()>> + Send {
        let body = Request::new(
            "CurrentTime",
            &MoRef::new("ServiceInstance", "ServiceInstance"),
        )
        .finish();
        let cookie = session.cookie.clone();
        async move {
            self.client.call(body, Some(&cookie), None).await?;
            Ok(())
        }
    }

    async fn close(&self, session: Session) {
        let body = Request::new("Logout", &session.content.session_manager).finish();
        if let Err(e) = self.client.call(body, Some(&session.cookie), None).await {
            // An expired session cannot log out; the host has dropped it.
            tracing::debug!(code = e.code(), "vSphere logout failed: {e}");
        }
    }
}

/// One call's means: the client and a checked-out session.
struct Call {
    client: Arc<SoapClient>,
    session: Session,
}

impl Call {
    async fn soap(&self, body: Vec<u8>, vm: Option<&str>) -> HvResult<client::Answer> {
        self.client.call(body, Some(&self.session.cookie), vm).await
    }

    fn collector(&self) -> &MoRef {
        &self.session.content.property_collector
    }
}

/// A vSphere hypervisor behind its session pool.
pub struct VsphereBackend {
    id: String,
    client: Arc<SoapClient>,
    pool: Pool<VsphereConnector>,
    host_map: BTreeMap<String, String>,
    task_timeout: Duration,
    max_concurrent: usize,
    changes: broadcast::Sender<VmStatusChange>,
    /// Follows changes with WaitForUpdatesEx (`follow_updates`), once
    /// started by [`VsphereBackend::spawn_updates`].
    follower: Option<Arc<updates::Follower>>,
    follower_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The ids of `net.bytesRx` / `net.bytesTx` on this server, once
    /// looked up (`Some(None)`: it has not both).
    net_counters: std::sync::Mutex<Option<Option<perf::NetCounterIds>>>,
}

impl std::fmt::Debug for VsphereBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsphereBackend")
            .field("id", &self.id)
            .field("client", &self.client)
            .finish()
    }
}

impl VsphereBackend {
    /// Reads the password file and builds the client and the (empty) pool;
    /// nothing connects until the first call.
    pub fn new(config: &VsphereConfig) -> Result<VsphereBackend, VsphereError> {
        config.validate().map_err(VsphereError::Config)?;
        let password = config.read_password().map_err(VsphereError::Password)?;
        let trust = Trust::from_config(config.thumbprint.as_deref(), config.ca_file.as_deref())?;
        let tls = pki::client_config(&trust)?;
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let client =
            Arc::new(SoapClient::new(&config.url, tls, timeout).map_err(VsphereError::Config)?);
        let connector = VsphereConnector {
            client: client.clone(),
            username: config.username.clone(),
            password: password.clone(),
        };
        let pool = Pool::new(connector, config.pool_config()).map_err(VsphereError::Config)?;
        let (changes, _) = broadcast::channel(STATUS_CHANGES_CAPACITY);
        let follower = if config.follow_updates {
            Some(Arc::new(Self::follower(
                config, &client, &password, &changes,
            )?))
        } else {
            None
        };
        Ok(VsphereBackend {
            id: config.id.clone(),
            client,
            pool,
            host_map: config.host_map.clone(),
            task_timeout: Duration::from_millis(config.task_timeout_ms),
            max_concurrent: config.max_concurrent,
            changes,
            follower,
            follower_task: std::sync::Mutex::new(None),
            net_counters: std::sync::Mutex::new(None),
        })
    }

    /// The follower of changes, with its own one-session pool.
    fn follower(
        config: &VsphereConfig,
        client: &Arc<SoapClient>,
        password: &Secret,
        changes: &broadcast::Sender<VmStatusChange>,
    ) -> Result<updates::Follower, VsphereError> {
        let connector = VsphereConnector {
            client: client.clone(),
            username: config.username.clone(),
            password: password.clone(),
        };
        let pool_config = PoolConfig {
            pool_size: 1,
            ..config.pool_config()
        };
        Ok(updates::Follower {
            id: config.id.clone(),
            client: client.clone(),
            pool: Pool::new(connector, pool_config).map_err(VsphereError::Config)?,
            changes: changes.clone(),
            limits: updates::FollowLimits {
                wait_s: config.updates_wait_s(),
                max_objects: config.updates_max_objects,
                reconnect_max_ms: config.updates_reconnect_max_ms,
            },
            counters: updates::FollowerCounters::default(),
        })
    }

    /// Power-state (and name, and inventory) changes as WaitForUpdatesEx
    /// reports them; None when `follow_updates` is off.
    pub fn subscribe(&self) -> Option<broadcast::Receiver<VmStatusChange>> {
        self.follower.as_ref().map(|_| self.changes.subscribe())
    }

    /// Starts following changes (when `follow_updates`), on the current
    /// tokio runtime; it ends when the backend shuts down. Once.
    pub fn spawn_updates(&self) {
        let Some(follower) = &self.follower else {
            return;
        };
        let mut task = self
            .follower_task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if task.is_none() {
            *task = Some(tokio::spawn(follower.clone().run()));
        }
    }

    /// The follower's figures and its session pool (its logins count
    /// reconnections); None when it does not follow updates.
    pub fn updates_stats(&self) -> Option<updates::UpdatesStats> {
        self.follower.as_ref().map(|f| f.stats())
    }

    /// A VM's figures from `summary.quickStats`: CPU in use of the most it
    /// may use, guest memory in use of its configured size.
    pub async fn counters(&self, vm: &str) -> HvResult<VmCounters> {
        let object = MoRef::new("VirtualMachine", vm);
        let found = self
            .with_session(|call| {
                let object = object.clone();
                async move {
                    let body = soap::retrieve_object(call.collector(), &object, &COUNTER_PATHS);
                    let answer = call.soap(body, Some(&object.value)).await?;
                    let (objects, _) = soap::retrieve_result(answer.result()?)?;
                    objects
                        .into_iter()
                        .find(|o| o.obj == object)
                        .ok_or_else(|| HypervisorError::VmNotFound(object.value.clone()))
                }
            })
            .await?;
        let rates = self.net_rates(&object).await;
        Ok(VmCounters {
            network_rx_bytes_per_s: rates.rx_bytes_per_s,
            network_tx_bytes_per_s: rates.tx_bytes_per_s,
            ..quick_stats(&found)
        })
    }

    /// The VM's network rates; none when the server has no PerformanceManager
    /// or no such counters, or the query failed (logged at debug level: the
    /// other figures still go out).
    async fn net_rates(&self, vm: &MoRef) -> perf::NetRates {
        let cached = *self
            .net_counters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let found = self
            .with_session(|call| {
                let vm = vm.clone();
                async move {
                    let Some(perf_manager) = call.session.content.perf_manager.clone() else {
                        return Ok((None, perf::NetRates::default()));
                    };
                    let ids = match cached {
                        Some(ids) => ids,
                        None => {
                            let body = perf::counters_request(call.collector(), &perf_manager);
                            let answer = call.soap(body, None).await?;
                            let (objects, _) = soap::retrieve_result(answer.result()?)?;
                            match objects.first().and_then(|o| o.prop("perfCounter")) {
                                Some(list) => perf::net_counter_ids(list)?,
                                None => None,
                            }
                        }
                    };
                    let Some(ids) = ids else {
                        return Ok((Some(None), perf::NetRates::default()));
                    };
                    let body = perf::query_request(&perf_manager, &vm, ids);
                    let answer = call.soap(body, Some(&vm.value)).await?;
                    Ok((Some(Some(ids)), perf::rates(answer.result()?, ids)?))
                }
            })
            .await;
        match found {
            Ok((ids, rates)) => {
                if let Some(ids) = ids {
                    *self
                        .net_counters
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(ids);
                }
                rates
            }
            Err(e) => {
                tracing::debug!(hypervisor = %self.id, vm = %vm.value, code = e.code(), "no network rates: {e}");
                perf::NetRates::default()
            }
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Calls in flight at once that the control plane's queue allows.
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    pub fn pool(&self) -> &Pool<VsphereConnector> {
        &self.pool
    }

    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Starts the keep-alive of idle sessions (see
    /// [`Pool::spawn_keepalive`]); it ends when the backend shuts down.
    pub fn spawn_keepalive(&self) -> tokio::task::JoinHandle<()> {
        self.pool.spawn_keepalive()
    }

    /// Stops following changes and logs every session out (see
    /// [`Pool::shutdown`]).
    pub async fn shutdown(&self) {
        let task = self
            .follower_task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        let grace = Duration::from_millis(SHUTDOWN_GRACE_MS);
        if let Some(follower) = &self.follower {
            follower.pool.shutdown(grace).await;
        }
        self.pool.shutdown(grace).await;
    }

    /// Runs `op` on a checked-out session; on `NotAuthenticated` the
    /// session is discarded and `op` runs once more on another.
    async fn with_session<T, F, Fut>(&self, op: F) -> HvResult<T>
    where
        F: Fn(Call) -> Fut + Send + Sync,
        Fut: Future<Output = HvResult<T>> + Send,
        T: Send,
    {
        let mut pooled = self.pool.acquire().await?;
        let call = Call {
            client: self.client.clone(),
            session: (*pooled).clone(),
        };
        match op(call).await {
            Err(HypervisorError::SessionExpired) => {
                tracing::info!(hypervisor = %self.id, "vSphere session expired mid-call: retrying on a new one");
                pooled.discard();
                drop(pooled);
                let mut pooled = self.pool.acquire().await?;
                let call = Call {
                    client: self.client.clone(),
                    session: (*pooled).clone(),
                };
                let result = op(call).await;
                if matches!(result, Err(HypervisorError::SessionExpired)) {
                    pooled.discard();
                }
                result
            }
            other => other,
        }
    }

    fn vm_info(&self, raw: RawVm) -> VmInfo {
        VmInfo {
            id: format!("{}:{}", self.id, raw.native_id),
            native_id: raw.native_id,
            name: raw.name,
            power: raw.power,
            host: raw.host,
            hypervisor: self.id.clone(),
        }
    }

    /// Follows a task until it ends, reporting progress on the way.
    async fn follow_task(&self, task: MoRef, vm: &str, progress: &Reporter) -> HvResult<()> {
        let deadline = Instant::now() + self.task_timeout;
        let mut interval = Duration::from_millis(TASK_POLL_FIRST_MS);
        loop {
            let state = self
                .with_session(|call| task_info(call, task.clone()))
                .await?;
            match state {
                TaskState::Queued => progress.report(OperationState::Queued, 0),
                TaskState::Running { percent } => {
                    progress.report(OperationState::Running, percent.unwrap_or(0).min(99))
                }
                TaskState::Success => {
                    progress.report(OperationState::Succeeded, 100);
                    return Ok(());
                }
                TaskState::Error(fault) => {
                    progress.fail(&fault.message);
                    return Err(soap::map_fault(&fault, Some(vm)));
                }
            }
            if Instant::now() + interval > deadline {
                progress.fail("timed out");
                return Err(HypervisorError::Timeout(self.task_timeout));
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(TASK_POLL_MAX_MS));
        }
    }

    /// Polls a VM's power state until it is `want` (ShutdownGuest has no
    /// task to follow).
    async fn wait_power(&self, vm: &str, want: PowerState, progress: &Reporter) -> HvResult<()> {
        let deadline = Instant::now() + self.task_timeout;
        let mut interval = Duration::from_millis(TASK_POLL_FIRST_MS);
        loop {
            let raw = self
                .with_session(|call| describe(call, vm.to_string()))
                .await?;
            if raw.power == want {
                progress.report(OperationState::Succeeded, 100);
                return Ok(());
            }
            progress.report(OperationState::Running, 0);
            if Instant::now() + interval > deadline {
                progress.fail("timed out waiting for the guest");
                return Err(HypervisorError::Timeout(self.task_timeout));
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(TASK_POLL_MAX_MS));
        }
    }
}

impl Hypervisor for VsphereBackend {
    async fn list_vms(&self) -> HvResult<Vec<VmInfo>> {
        let raws = self.with_session(list).await?;
        let mut vms: Vec<VmInfo> = raws.into_iter().map(|r| self.vm_info(r)).collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name).then(a.native_id.cmp(&b.native_id)));
        Ok(vms)
    }

    async fn vm(&self, vm: &str) -> HvResult<VmInfo> {
        let raw = self
            .with_session(|call| describe(call, vm.to_string()))
            .await?;
        Ok(self.vm_info(raw))
    }

    async fn console(&self, vm: &str) -> HvResult<Console> {
        let ticket = self
            .with_session(|call| console_ticket(call, vm.to_string()))
            .await?;
        let target = webmks_target(&ticket, self.client.host(), &self.host_map)?;
        Ok(Console {
            target,
            one_time: false, // the host makes the ticket single-use itself
        })
    }

    async fn console_used(&self, _vm: &str) -> HvResult<()> {
        Ok(())
    }

    async fn thumbnail(&self, vm: &str, size: ThumbnailSize) -> HvResult<Thumbnail> {
        let png = self
            .with_session(|call| screen(call, vm.to_string()))
            .await?;
        thumbnail::from_png(&png, size)
    }

    async fn power(&self, vm: &str, action: PowerAction, progress: ProgressSink) -> HvResult<()> {
        let progress = Reporter::new(progress);
        progress.report(OperationState::Queued, 0);
        let task = self
            .with_session(|call| start_power(call, vm.to_string(), action))
            .await;
        match task {
            Ok(Some(task)) => self.follow_task(task, vm, &progress).await,
            Ok(None) => self.wait_power(vm, PowerState::Off, &progress).await,
            Err(e) => {
                progress.fail(&e.to_string());
                Err(e)
            }
        }
    }

    async fn validate(&self) -> HvResult<()> {
        self.with_session(|call| async move {
            let body = Request::new(
                "CurrentTime",
                &MoRef::new("ServiceInstance", "ServiceInstance"),
            )
            .finish();
            call.soap(body, None).await.map(|_| ())
        })
        .await
    }
}

/// Reports progress to the sink when it changes.
struct Reporter {
    sink: ProgressSink,
    last: std::sync::Mutex<Option<(OperationState, u8)>>,
}

impl Reporter {
    fn new(sink: ProgressSink) -> Reporter {
        Reporter {
            sink,
            last: std::sync::Mutex::new(None),
        }
    }

    fn report(&self, state: OperationState, percent: u8) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if *last == Some((state, percent)) {
            return;
        }
        *last = Some((state, percent));
        (self.sink)(Progress {
            state,
            percent,
            message: None,
        });
    }

    fn fail(&self, message: &str) {
        (self.sink)(Progress {
            state: OperationState::Failed,
            percent: 0,
            message: Some(message.to_string()),
        });
    }
}

/// A number property (`xsd:int`, `xsd:long`) of a retrieval.
fn number(object: &soap::ObjectContent, path: &str) -> Option<u64> {
    object.prop_text(path)?.parse::<i64>().ok()?.try_into().ok()
}

/// The figures of `summary.quickStats` (MHz and MB), as shares where the
/// whole is known; a share of an unknown or zero whole is left out.
fn quick_stats(object: &soap::ObjectContent) -> VmCounters {
    let cpu_used_mhz = number(object, "summary.quickStats.overallCpuUsage");
    let cpu_most_mhz = number(object, "summary.runtime.maxCpuUsage").filter(|m| *m > 0);
    let memory_used_mb = number(object, "summary.quickStats.guestMemoryUsage");
    let memory_size_mb = number(object, "summary.config.memorySizeMB");
    VmCounters {
        cpu_usage_percent: cpu_used_mhz
            .zip(cpu_most_mhz)
            .map(|(used, most)| used as f64 * 100.0 / most as f64),
        memory_used_bytes: memory_used_mb.map(|mb| mb.saturating_mul(1024 * 1024)),
        memory_size_bytes: memory_size_mb.map(|mb| mb.saturating_mul(1024 * 1024)),
        memory_source: Some(MemorySource::QuickStats),
        ..VmCounters::default()
    }
}

/// A VM as read, before it gets the appliance-wide id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RawVm {
    native_id: String,
    name: String,
    power: PowerState,
    host: Option<String>,
}

const VM_PATHS: [&str; 3] = ["name", "runtime.powerState", "runtime.host"];

/// Every VM through a ContainerView, with its host's name.
async fn list(call: Call) -> HvResult<Vec<RawVm>> {
    let content = call.session.content.clone();
    let create = Request::new("CreateContainerView", &content.view_manager)
        .moref("container", &content.root_folder)
        .text("type", "VirtualMachine")
        .text("type", "HostSystem")
        .text("recursive", "true")
        .finish();
    let view = soap::returned_moref(call.soap(create, None).await?.result()?)?;
    let objects = collect_view(&call, &view).await;
    // Destroy the view whatever happened: views live as long as the session.
    let destroy = Request::new("DestroyView", &view).finish();
    if let Err(e) = call.soap(destroy, None).await {
        tracing::debug!(code = e.code(), "DestroyView failed: {e}");
    }
    let objects = objects?;
    let hosts: HashMap<&str, &str> = objects
        .iter()
        .filter(|o| o.obj.kind == "HostSystem")
        .filter_map(|o| Some((o.obj.value.as_str(), o.prop_text("name")?)))
        .collect();
    Ok(objects
        .iter()
        .filter(|o| o.obj.kind == "VirtualMachine")
        .map(|o| raw_vm(o, |host| hosts.get(host).map(|h| h.to_string())))
        .collect())
}

/// All pages of a view retrieval, bounded by [`MAX_LIST_OBJECTS`].
async fn collect_view(call: &Call, view: &MoRef) -> HvResult<Vec<soap::ObjectContent>> {
    let props: [(&str, &[&str]); 2] = [("VirtualMachine", &VM_PATHS), ("HostSystem", &["name"])];
    let first = soap::retrieve_view(call.collector(), view, &props, LIST_PAGE_OBJECTS);
    let (mut objects, mut token) = soap::retrieve_result(call.soap(first, None).await?.result()?)?;
    let max_pages = MAX_LIST_OBJECTS / LIST_PAGE_OBJECTS + 1;
    for _ in 0..max_pages {
        let Some(t) = token.take() else {
            return Ok(objects);
        };
        if objects.len() > MAX_LIST_OBJECTS {
            break;
        }
        let next = Request::new("ContinueRetrievePropertiesEx", call.collector())
            .text("token", &t)
            .finish();
        let (more, next_token) = soap::retrieve_result(call.soap(next, None).await?.result()?)?;
        objects.extend(more);
        token = next_token;
    }
    Err(HypervisorError::Protocol(format!(
        "the inventory holds more than {MAX_LIST_OBJECTS} objects"
    )))
}

fn raw_vm(object: &soap::ObjectContent, host_name: impl Fn(&str) -> Option<String>) -> RawVm {
    RawVm {
        native_id: object.obj.value.clone(),
        name: object.prop_text("name").unwrap_or_default().to_string(),
        power: object
            .prop_text("runtime.powerState")
            .map(soap::power_state)
            .unwrap_or(PowerState::Unknown),
        host: object.prop_text("runtime.host").and_then(host_name),
    }
}

/// One VM's name, power state and host.
async fn describe(call: Call, vm: String) -> HvResult<RawVm> {
    let object = MoRef::new("VirtualMachine", &vm);
    let body = soap::retrieve_object(call.collector(), &object, &VM_PATHS);
    let (objects, _) = soap::retrieve_result(call.soap(body, Some(&vm)).await?.result()?)?;
    let found = objects
        .into_iter()
        .find(|o| o.obj == object)
        .ok_or_else(|| HypervisorError::VmNotFound(vm.clone()))?;
    let host_ref = found
        .prop("runtime.host")
        .map(|h| h.text.trim().to_string());
    let host_name = match host_ref {
        Some(host) => {
            let host = MoRef::new("HostSystem", &host);
            let body = soap::retrieve_object(call.collector(), &host, &["name"]);
            let answer = call.soap(body, None).await?;
            let (hosts, _) = soap::retrieve_result(answer.result()?)?;
            hosts
                .first()
                .and_then(|h| h.prop_text("name"))
                .map(str::to_string)
        }
        None => None,
    };
    Ok(raw_vm(&found, |_| host_name.clone()))
}

/// A fresh webmks ticket, for a powered-on VM only.
async fn console_ticket(call: Call, vm: String) -> HvResult<Ticket> {
    let object = MoRef::new("VirtualMachine", &vm);
    let body = soap::retrieve_object(call.collector(), &object, &["runtime.powerState"]);
    let (objects, _) = soap::retrieve_result(call.soap(body, Some(&vm)).await?.result()?)?;
    let power = objects
        .iter()
        .find(|o| o.obj == object)
        .ok_or_else(|| HypervisorError::VmNotFound(vm.clone()))?
        .prop_text("runtime.powerState")
        .map(soap::power_state);
    if power != Some(PowerState::On) {
        return Err(HypervisorError::VmNotRunning(vm));
    }
    let body = Request::new("AcquireTicket", &object)
        .text("ticketType", "webmks")
        .finish();
    match call.soap(body, Some(&vm)).await {
        Ok(answer) => soap::ticket(answer.result()?),
        // Powered off between the two calls.
        Err(HypervisorError::InvalidState(_)) => Err(HypervisorError::VmNotRunning(vm)),
        Err(e) => Err(e),
    }
}

/// Turns a ticket into the data plane's target.
fn webmks_target(
    ticket: &Ticket,
    api_host: &str,
    host_map: &BTreeMap<String, String>,
) -> HvResult<ConsoleTarget> {
    let bad = |what: &str| HypervisorError::Protocol(format!("the console ticket has {what}"));
    if !ticket
        .ticket
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
    {
        return Err(bad("characters not allowed in a URL path"));
    }
    let named = ticket.host.as_deref().unwrap_or(api_host);
    let host = host_map.get(named).map(String::as_str).unwrap_or(named);
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
    {
        return Err(bad("a host that is not a name or an address"));
    }
    let port = match ticket.port {
        None | Some(0) => WEBMKS_DEFAULT_PORT,
        Some(p) => p,
    };
    let thumbprint = match &ticket.ssl_thumbprint {
        Some(t) => Some(
            Thumbprint::parse(t)
                .map_err(|_| bad("an sslThumbprint that is not SHA-1 or SHA-256"))?
                .to_string(),
        ),
        None => None,
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    Ok(ConsoleTarget::WebMks {
        url: format!("wss://{host}:{port}/ticket/{}", ticket.ticket),
        thumbprint,
    })
}

/// A screenshot PNG; a refusal is explained by the VM's state.
async fn screen(call: Call, vm: String) -> HvResult<Vec<u8>> {
    let (status, body) = call.client.screen(&vm, &call.session.cookie).await?;
    match status.as_u16() {
        200 => return Ok(body),
        401 | 403 => return Err(HypervisorError::SessionExpired),
        _ => {}
    }
    let raw = describe(call, vm.clone()).await?;
    if raw.power != PowerState::On {
        return Err(HypervisorError::VmNotRunning(vm));
    }
    Err(HypervisorError::Protocol(format!(
        "the host's screenshot of {vm} answered HTTP {status}"
    )))
}

/// Starts a power action: the task to follow, or `None` for ShutdownGuest.
async fn start_power(call: Call, vm: String, action: PowerAction) -> HvResult<Option<MoRef>> {
    let method = match action {
        PowerAction::On => "PowerOnVM_Task",
        PowerAction::Off => "PowerOffVM_Task",
        PowerAction::Reset => "ResetVM_Task",
        PowerAction::Suspend => "SuspendVM_Task",
        PowerAction::Shutdown => "ShutdownGuest",
    };
    let body = Request::new(method, &MoRef::new("VirtualMachine", &vm)).finish();
    let answer = call.soap(body, Some(&vm)).await?;
    if action == PowerAction::Shutdown {
        answer.result()?;
        return Ok(None);
    }
    Ok(Some(soap::returned_moref(answer.result()?)?))
}

async fn task_info(call: Call, task: MoRef) -> HvResult<TaskState> {
    let body = soap::retrieve_object(call.collector(), &task, &["info"]);
    let (objects, _) = soap::retrieve_result(call.soap(body, None).await?.result()?)?;
    let info = objects
        .first()
        .and_then(|o| o.prop("info"))
        .ok_or_else(|| HypervisorError::Protocol(format!("task {} has no info", task.value)))?;
    soap::task_state(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(host: Option<&str>, port: Option<u16>) -> Ticket {
        Ticket {
            ticket: "abc-123".into(),
            host: host.map(str::to_string),
            port,
            ssl_thumbprint: Some(
                "ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89:ab:cd:ef:01".into(),
            ),
        }
    }

    fn url_of(target: ConsoleTarget) -> (String, Option<String>) {
        match target {
            ConsoleTarget::WebMks { url, thumbprint } => (url, thumbprint),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tickets_become_wss_urls_with_defaults_and_the_host_map() {
        let none = BTreeMap::new();
        let (url, pin) =
            url_of(webmks_target(&ticket(Some("esx7"), Some(8443)), "vc", &none).unwrap());
        assert_eq!(url, "wss://esx7:8443/ticket/abc-123");
        assert_eq!(
            pin.as_deref(),
            Some("AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01")
        );
        // No host: the API's. Port 0: 443.
        let (url, _) = url_of(webmks_target(&ticket(None, Some(0)), "esx1.lab", &none).unwrap());
        assert_eq!(url, "wss://esx1.lab:443/ticket/abc-123");
        let (url, _) = url_of(webmks_target(&ticket(None, None), "::1", &none).unwrap());
        assert_eq!(url, "wss://[::1]:443/ticket/abc-123");
        let map = BTreeMap::from([("esx7".to_string(), "10.1.2.7".to_string())]);
        let (url, _) = url_of(webmks_target(&ticket(Some("esx7"), Some(443)), "vc", &map).unwrap());
        assert_eq!(url, "wss://10.1.2.7:443/ticket/abc-123");
    }

    #[test]
    fn quick_stats_become_shares_and_missing_wholes_are_left_out() {
        let val = |text: &str| soap::Element {
            name: "val".into(),
            text: text.into(),
            ..soap::Element::default()
        };
        let mut object = soap::ObjectContent {
            obj: MoRef::new("VirtualMachine", "vm-1"),
            props: vec![
                ("summary.quickStats.overallCpuUsage".into(), val("500")),
                ("summary.runtime.maxCpuUsage".into(), val("2000")),
                ("summary.quickStats.guestMemoryUsage".into(), val("256")),
                ("summary.config.memorySizeMB".into(), val("1024")),
            ],
        };
        let c = quick_stats(&object);
        assert_eq!(c.cpu_usage_percent, Some(25.0));
        assert_eq!(c.memory_used_bytes, Some(256 << 20));
        assert_eq!(c.memory_size_bytes, Some(1024 << 20));
        assert_eq!(c.cpu_time_ns, None);
        object.props[1].1 = val("0");
        object.props[2].1 = val("-3");
        let c = quick_stats(&object);
        assert_eq!(c.cpu_usage_percent, None, "no share of a zero whole");
        assert_eq!(c.memory_used_bytes, None, "a negative size is no size");
    }

    #[test]
    fn hostile_tickets_are_refused() {
        let none = BTreeMap::new();
        let mut t = ticket(Some("esx7"), Some(443));
        t.ticket = "../../x?y".into();
        assert!(webmks_target(&t, "vc", &none).is_err());
        let t = ticket(Some("evil/host@x"), Some(443));
        assert!(webmks_target(&t, "vc", &none).is_err());
        let mut t = ticket(Some("esx7"), Some(443));
        t.ssl_thumbprint = Some("nope".into());
        assert!(webmks_target(&t, "vc", &none).is_err());
        let mut t = ticket(Some("esx7"), Some(443));
        t.ssl_thumbprint = None;
        let (_, pin) = url_of(webmks_target(&t, "vc", &none).unwrap());
        assert_eq!(pin, None);
    }

    #[test]
    fn a_backend_needs_a_readable_password_and_valid_trust() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        let mut config = VsphereConfig::new("esx1", "https://127.0.0.1:1/sdk", "u", &pw);
        assert!(matches!(
            VsphereBackend::new(&config),
            Err(VsphereError::Password(_))
        ));
        std::fs::write(&pw, "secret\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        config.thumbprint = Some("zz".into());
        let err = VsphereBackend::new(&config).unwrap_err();
        assert!(
            matches!(err, VsphereError::Tls(PkiError::BadThumbprint(_))),
            "{err}"
        );
        config.thumbprint = Some("00".repeat(20));
        let backend = VsphereBackend::new(&config).unwrap();
        assert_eq!(
            backend.stats().total_connections,
            0,
            "nothing connects at start"
        );
        assert!(!format!("{backend:?}").contains("secret"));
    }
}
