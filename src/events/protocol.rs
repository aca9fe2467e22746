//! The events and the WebSocket protocol around them, as plain data.
//!
//! Server → client, every message: `{"type": …, "data": {…}, "timestamp":
//! unix ms}`. Client → server: `subscribe` / `unsubscribe` with `{"events",
//! "vm_ids", "server_ids"}` (each optional) and `ping`. A message that is
//! not JSON, has an unknown `type` or malformed `data` is a
//! [`ProtocolError`] naming what was wrong; the connection stays.
//!
//! The filter: each of the three dimensions is either open (everything) or
//! a set. A new connection has all three open (its room still limits it);
//! `subscribe` turns an open dimension into the given set or adds to its
//! set; `unsubscribe` removes from a set (an emptied set matches nothing in
//! that dimension, it does not reopen it). An event matches when it
//! matches all three: its kind is in `events`, its VM in `vm_ids` (by
//! unique id `hypervisor:native` or by native id), its hypervisor in
//! `server_ids`; an event without a VM (or hypervisor) matches only an open
//! `vm_ids` (or `server_ids`).
//!
//! No IO, clock or runtime here (timestamps are passed in).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::auth::{Principal, VmGrant};

/// Most ids (or event names) in one dimension of a subscription: each is
/// compared per event.
pub const MAX_FILTER_ENTRIES: usize = 1024;
/// Longest id accepted in a subscription, in bytes.
pub const MAX_FILTER_ID_BYTES: usize = 300;
/// Longest text of a client's message, in bytes (larger ones are refused
/// by the WebSocket layer).
pub const MAX_CLIENT_MESSAGE_BYTES: usize = 64 * 1024;
/// Longest part of a client's text echoed in an error message, in bytes.
const MAX_ECHO_BYTES: usize = 64;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    SessionOpened,
    SessionClosed,
    Progress,
    ServerStatusChanged,
    VmStatusChanged,
    Alert,
    VmMetricsUpdate,
    /// The end of an alert's condition (same `alert_id` as the `alert`).
    AlertCleared,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::SessionOpened,
        EventKind::SessionClosed,
        EventKind::Progress,
        EventKind::ServerStatusChanged,
        EventKind::VmStatusChanged,
        EventKind::Alert,
        EventKind::VmMetricsUpdate,
        EventKind::AlertCleared,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::SessionOpened => "session_opened",
            Self::SessionClosed => "session_closed",
            Self::Progress => "progress",
            Self::ServerStatusChanged => "server_status_changed",
            Self::VmStatusChanged => "vm_status_changed",
            Self::Alert => "alert",
            Self::VmMetricsUpdate => "vm_metrics_update",
            Self::AlertCleared => "alert_cleared",
        }
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Seen by anonymous clients (when `[events] allow_anonymous`): the
    /// state of VMs and hypervisors, never users' sessions, operations or
    /// alerts.
    pub fn is_public(self) -> bool {
        matches!(self, Self::VmStatusChanged | Self::ServerStatusChanged)
    }
}

/// One event, with what routing and visibility need beside its data.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    /// The VM it concerns (unique id `hypervisor:native`), if any.
    pub vm_id: Option<String>,
    /// The hypervisor it concerns, if any.
    pub server_id: Option<String>,
    /// The user whose session it is (session events only).
    pub owner: Option<String>,
    pub data: Value,
}

/// `session_opened` / `session_closed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionData {
    pub session_id: String,
    pub user: String,
    pub vm_id: Option<String>,
    /// Opened: `opened`. Closed: the close reason (`idle timeout`,
    /// `evicted: …`, `revoked through the API`, `ticket not used within its
    /// TTL`, the relay's close reason…).
    pub reason: String,
    /// Bytes relayed both ways, as known when the event was sent.
    pub bytes: u64,
    /// Bytes from the browser to the backend (part of `bytes`).
    pub bytes_browser_to_backend: u64,
    /// Bytes from the backend to the browser (part of `bytes`).
    pub bytes_backend_to_browser: u64,
    /// The byte counts are the worker's final figures. False when a
    /// session that a worker held was closed by the control plane and the
    /// worker's close report did not arrive within
    /// `[events] session_close_report_wait_ms` (the counts are then what
    /// was known: 0 or the last figures).
    pub bytes_final: bool,
    /// Time since the session was created, in ms.
    pub duration_ms: u64,
}

/// `progress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProgressData {
    pub operation_id: String,
    /// The power action (`on`, `off`, `shutdown`, `reset`, `suspend`).
    pub operation_type: String,
    pub vm_id: String,
    pub progress_percent: u8,
    /// `queued`, `running`, `succeeded`, `failed`.
    pub status: String,
    pub message: Option<String>,
}

/// `vm_status_changed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmStatusData {
    pub vm_id: String,
    pub vm_name: Option<String>,
    pub server_id: String,
    pub old_status: String,
    pub new_status: String,
}

/// What a `vm_metrics_update`'s `memory_used_mb` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemorySource {
    /// The guest's own figure from its virtio-balloon driver's statistics
    /// (QEMU): total less available memory, of the guest's total.
    Balloon,
    /// The QEMU process's resident memory: what the VM costs the host,
    /// QEMU's own overhead included (a guest without a balloon driver).
    Process,
    /// vSphere's `summary.quickStats.guestMemoryUsage` (the host's
    /// estimate of the guest's active memory).
    QuickStats,
}

/// `vm_metrics_update`: a VM's figures from its hypervisor's own counters;
/// a figure the hypervisor cannot give is left out, never invented.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VmMetricsData {
    pub vm_id: String,
    pub server_id: String,
    /// CPU used over the last interval, in percent of the VM's vCPUs
    /// (QEMU: from two samples of the vCPU threads' CPU time; vSphere:
    /// `overallCpuUsage` of `maxCpuUsage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_usage_percent: Option<f64>,
    /// CPU time the vCPUs used since they started, in ns (QEMU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_time_ns: Option<u64>,
    /// `memory_used_mb` of `memory_size_mb`, in percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_usage_percent: Option<f64>,
    /// Memory in use, in MiB (QEMU: what the guest's balloon driver
    /// reports, or else the QEMU process's resident memory; vSphere:
    /// `guestMemoryUsage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_used_mb: Option<u64>,
    /// Where `memory_used_mb` comes from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_source: Option<MemorySource>,
    /// The VM's configured memory, in MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_size_mb: Option<u64>,
    /// Bytes the guest received / sent since its NICs started (QEMU: its
    /// tap devices' counters, seen from the guest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_rx_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_tx_bytes: Option<u64>,
    /// Bytes per second the guest received / sent, averaged over the
    /// hypervisor's last sample (vSphere: `net.bytesRx` / `net.bytesTx`
    /// over 20 s), for backends with rates rather than counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_rx_bytes_per_s: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_tx_bytes_per_s: Option<u64>,
}

/// `alert`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AlertData {
    pub alert_id: String,
    pub alert_type: String,
    /// `warning` or `critical`.
    pub severity: String,
    pub title: String,
    pub message: String,
    /// `hypervisor`, `port_pool`, `worker` or `rate_limits`.
    pub entity_type: String,
    pub entity_id: String,
}

fn to_value<T: Serialize>(data: &T) -> Value {
    // These structs hold only strings and numbers: serialising them cannot
    // fail; a failure would still give a valid (null) payload.
    serde_json::to_value(data).unwrap_or(Value::Null)
}

/// The hypervisor part of a unique VM id (`esx1` of `esx1:vm-57`).
pub fn server_of(vm_id: &str) -> Option<&str> {
    vm_id.split_once(':').map(|(server, _)| server)
}

impl Event {
    pub fn session(kind: EventKind, data: &SessionData) -> Event {
        Event {
            kind,
            vm_id: data.vm_id.clone(),
            server_id: data
                .vm_id
                .as_deref()
                .and_then(server_of)
                .map(str::to_string),
            owner: Some(data.user.clone()),
            data: to_value(data),
        }
    }

    pub fn progress(server_id: &str, data: &ProgressData) -> Event {
        Event {
            kind: EventKind::Progress,
            vm_id: Some(data.vm_id.clone()),
            server_id: Some(server_id.to_string()),
            owner: None,
            data: to_value(data),
        }
    }

    pub fn vm_status(data: &VmStatusData) -> Event {
        Event {
            kind: EventKind::VmStatusChanged,
            vm_id: Some(data.vm_id.clone()),
            server_id: Some(data.server_id.clone()),
            owner: None,
            data: to_value(data),
        }
    }

    pub fn vm_metrics(data: &VmMetricsData) -> Event {
        Event {
            kind: EventKind::VmMetricsUpdate,
            vm_id: Some(data.vm_id.clone()),
            server_id: Some(data.server_id.clone()),
            owner: None,
            data: to_value(data),
        }
    }

    /// `server_status_changed`: `data` holds `server_id`, `old_status`,
    /// `new_status` and the API-session pool's figures where there is one.
    pub fn server_status(server_id: &str, data: Value) -> Event {
        Event {
            kind: EventKind::ServerStatusChanged,
            vm_id: None,
            server_id: Some(server_id.to_string()),
            owner: None,
            data,
        }
    }

    pub fn alert(data: &AlertData) -> Event {
        Event {
            kind: EventKind::Alert,
            vm_id: None,
            server_id: (data.entity_type == "hypervisor").then(|| data.entity_id.clone()),
            owner: None,
            data: to_value(data),
        }
    }

    /// `alert_cleared`: the alert's data (its `message` saying why it
    /// ended) and how long it was in force.
    pub fn alert_cleared(data: &AlertData, duration_ms: u64) -> Event {
        let mut event = Event::alert(data);
        event.kind = EventKind::AlertCleared;
        if let Value::Object(map) = &mut event.data {
            map.insert("duration_ms".into(), Value::from(duration_ms));
        }
        event
    }

    /// The wire form.
    pub fn encode(&self, timestamp_ms: u64) -> String {
        message(self.kind.name(), &self.data, timestamp_ms)
    }
}

/// Any server → client message.
pub fn message(kind: &str, data: &Value, timestamp_ms: u64) -> String {
    json!({"type": kind, "data": data, "timestamp": timestamp_ms}).to_string()
}

/// The fixed part of what a connection receives: its endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Room {
    /// `/ws/monitor`: everything the caller may see.
    Monitor,
    /// `/ws/vm/{vm_id}`: one VM (its unique id).
    Vm(String),
    /// `/ws/server/{hypervisor_id}`: one hypervisor and its VMs.
    Server(String),
    /// `/ws/stats`: the bus's own figures, no events.
    Stats,
}

impl Room {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Monitor => "monitor",
            Self::Vm(_) => "vm",
            Self::Server(_) => "server",
            Self::Stats => "stats",
        }
    }

    pub fn admits(&self, event: &Event) -> bool {
        match self {
            Self::Monitor => true,
            Self::Vm(id) => event.vm_id.as_deref() == Some(id.as_str()),
            Self::Server(id) => event.server_id.as_deref() == Some(id.as_str()),
            Self::Stats => false,
        }
    }
}

/// What a connection's principal may see, fixed at the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    /// Operators, admins, read tokens: every event.
    All,
    /// A viewer: events of the VMs its token allows, its own sessions, and
    /// the public events.
    Viewer { user: Option<String>, vms: VmGrant },
    /// No token (`[events] allow_anonymous`): public events only.
    Anonymous,
}

impl Visibility {
    pub fn of(principal: &Principal) -> Visibility {
        if principal.sees_all() {
            Visibility::All
        } else {
            Visibility::Viewer {
                user: principal.user.clone(),
                vms: principal.vms.clone(),
            }
        }
    }

    /// Whether events of `kind` can ever reach this principal (a
    /// subscription to others is refused with an error).
    pub fn may_subscribe(&self, kind: EventKind) -> bool {
        match self {
            Self::All => true,
            Self::Anonymous => kind.is_public(),
            Self::Viewer { .. } => !matches!(kind, EventKind::Alert | EventKind::AlertCleared),
        }
    }

    pub fn may_see(&self, event: &Event) -> bool {
        match self {
            Self::All => true,
            Self::Anonymous => event.kind.is_public(),
            Self::Viewer { user, vms } => match event.kind {
                EventKind::SessionOpened | EventKind::SessionClosed => {
                    user.is_some() && event.owner == *user
                }
                EventKind::Progress | EventKind::VmStatusChanged | EventKind::VmMetricsUpdate => {
                    event.vm_id.as_deref().is_some_and(|id| {
                        let native = id.split_once(':').map_or(id, |(_, n)| n);
                        vms.allows(&[id, native])
                    })
                }
                EventKind::ServerStatusChanged => true,
                EventKind::Alert | EventKind::AlertCleared => false,
            },
        }
    }
}

/// One dimension of a subscription: open, or a set.
pub type Dimension<T> = Option<BTreeSet<T>>;

/// A connection's subscription (see the module doc for the rules).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub events: Dimension<EventKind>,
    pub vm_ids: Dimension<String>,
    pub server_ids: Dimension<String>,
}

/// What a `subscribe` or `unsubscribe` names, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FilterChange {
    pub events: Option<Vec<EventKind>>,
    pub vm_ids: Option<Vec<String>>,
    pub server_ids: Option<Vec<String>>,
}

fn add<T: Ord + Clone>(dimension: &mut Dimension<T>, items: &Option<Vec<T>>) {
    if let Some(items) = items {
        dimension
            .get_or_insert_with(BTreeSet::new)
            .extend(items.iter().cloned());
    }
}

fn remove<T: Ord>(dimension: &mut Dimension<T>, items: &Option<Vec<T>>) {
    if let (Some(set), Some(items)) = (dimension.as_mut(), items) {
        for item in items {
            set.remove(item);
        }
    }
}

fn too_big<T>(dimension: &Dimension<T>) -> bool {
    dimension
        .as_ref()
        .is_some_and(|s| s.len() > MAX_FILTER_ENTRIES)
}

impl Filter {
    /// Add to the subscription; refused (unchanged) when a dimension
    /// would hold more than [`MAX_FILTER_ENTRIES`].
    pub fn subscribe(&mut self, change: &FilterChange) -> Result<(), ProtocolError> {
        let mut next = self.clone();
        add(&mut next.events, &change.events);
        add(&mut next.vm_ids, &change.vm_ids);
        add(&mut next.server_ids, &change.server_ids);
        if too_big(&next.events) || too_big(&next.vm_ids) || too_big(&next.server_ids) {
            return Err(ProtocolError::TooManyEntries);
        }
        *self = next;
        Ok(())
    }

    pub fn unsubscribe(&mut self, change: &FilterChange) {
        remove(&mut self.events, &change.events);
        remove(&mut self.vm_ids, &change.vm_ids);
        remove(&mut self.server_ids, &change.server_ids);
    }

    pub fn matches(&self, event: &Event) -> bool {
        let kind_ok = self.events.as_ref().is_none_or(|s| s.contains(&event.kind));
        let vm_ok = self.vm_ids.as_ref().is_none_or(|s| {
            event.vm_id.as_deref().is_some_and(|id| {
                let native = id.split_once(':').map_or(id, |(_, n)| n);
                s.contains(id) || s.contains(native)
            })
        });
        let server_ok = self
            .server_ids
            .as_ref()
            .is_none_or(|s| event.server_id.as_deref().is_some_and(|id| s.contains(id)));
        kind_ok && vm_ok && server_ok
    }

    /// The subscription as the `subscribed` / `unsubscribed` answers show
    /// it (`null`: open).
    pub fn to_json(&self) -> Value {
        json!({
            "events": self.events.as_ref().map(|s| s.iter().map(|k| k.name()).collect::<Vec<_>>()),
            "vm_ids": self.vm_ids,
            "server_ids": self.server_ids,
        })
    }
}

/// A client's message, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Subscribe(FilterChange),
    Unsubscribe(FilterChange),
    /// `data` is echoed in the `pong`.
    Ping(Value),
}

/// Why a client's message was refused; each has a stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("not valid JSON: {0}")]
    InvalidJson(String),
    #[error("a message is a JSON object with a string \"type\"")]
    NoType,
    #[error("unknown message type {0:?} (subscribe, unsubscribe, ping)")]
    UnknownType(String),
    #[error("invalid {kind} data: {problem}")]
    InvalidData { kind: &'static str, problem: String },
    #[error("unknown event {0:?}")]
    UnknownEvent(String),
    #[error("event {0:?} is not visible to this connection")]
    EventNotAllowed(&'static str),
    #[error("a subscription holds at most {MAX_FILTER_ENTRIES} entries per list, ids of at most {MAX_FILTER_ID_BYTES} bytes")]
    TooManyEntries,
    #[error("binary messages are not part of the protocol; send JSON text")]
    Binary,
}

impl ProtocolError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::NoType => "missing_type",
            Self::UnknownType(_) => "unknown_type",
            Self::InvalidData { .. } => "invalid_data",
            Self::UnknownEvent(_) => "unknown_event",
            Self::EventNotAllowed(_) => "event_not_allowed",
            Self::TooManyEntries => "too_many_entries",
            Self::Binary => "binary_not_supported",
        }
    }
}

/// A piece of the client's text, for an error message.
fn echo(text: &str) -> String {
    let mut end = text.len().min(MAX_ECHO_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChange {
    events: Option<Vec<String>>,
    vm_ids: Option<Vec<String>>,
    server_ids: Option<Vec<String>>,
}

fn check_ids(ids: &Option<Vec<String>>) -> Result<(), ProtocolError> {
    match ids {
        Some(v) if v.len() > MAX_FILTER_ENTRIES => Err(ProtocolError::TooManyEntries),
        Some(v) if v.iter().any(|id| id.len() > MAX_FILTER_ID_BYTES) => {
            Err(ProtocolError::TooManyEntries)
        }
        _ => Ok(()),
    }
}

fn parse_change(kind: &'static str, data: Option<Value>) -> Result<FilterChange, ProtocolError> {
    let raw: RawChange =
        serde_json::from_value(data.unwrap_or_else(|| json!({}))).map_err(|e| {
            ProtocolError::InvalidData {
                kind,
                problem: echo(&e.to_string()),
            }
        })?;
    check_ids(&raw.events)?;
    check_ids(&raw.vm_ids)?;
    check_ids(&raw.server_ids)?;
    let events = match raw.events {
        Some(names) => Some(
            names
                .iter()
                .map(|n| EventKind::parse(n).ok_or_else(|| ProtocolError::UnknownEvent(echo(n))))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };
    Ok(FilterChange {
        events,
        vm_ids: raw.vm_ids,
        server_ids: raw.server_ids,
    })
}

/// Parse a client's text message.
pub fn parse_client(text: &str) -> Result<ClientMessage, ProtocolError> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| ProtocolError::InvalidJson(echo(&e.to_string())))?;
    let Value::Object(mut object) = value else {
        return Err(ProtocolError::NoType);
    };
    let kind = match object.remove("type") {
        Some(Value::String(kind)) => kind,
        _ => return Err(ProtocolError::NoType),
    };
    let data = object.remove("data");
    match kind.as_str() {
        "subscribe" => Ok(ClientMessage::Subscribe(parse_change("subscribe", data)?)),
        "unsubscribe" => Ok(ClientMessage::Unsubscribe(parse_change(
            "unsubscribe",
            data,
        )?)),
        "ping" => Ok(ClientMessage::Ping(data.unwrap_or(Value::Null))),
        other => Err(ProtocolError::UnknownType(echo(other))),
    }
}

/// The `error` message's data.
pub fn error_data(e: &ProtocolError) -> Value {
    json!({"code": e.code(), "message": e.to_string()})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::appliance::Role;
    use proptest::prelude::*;

    fn vm_event(kind: EventKind, vm: &str) -> Event {
        Event {
            kind,
            vm_id: Some(vm.to_string()),
            server_id: server_of(vm).map(str::to_string),
            owner: None,
            data: Value::Null,
        }
    }

    #[test]
    fn client_messages_parse_or_name_what_is_wrong() {
        let m = parse_client(
            r#"{"type":"subscribe","data":{"events":["progress"],"vm_ids":["kvm:a"]}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ClientMessage::Subscribe(FilterChange {
                events: Some(vec![EventKind::Progress]),
                vm_ids: Some(vec!["kvm:a".into()]),
                server_ids: None,
            })
        );
        assert_eq!(
            parse_client(r#"{"type":"ping","data":{"timestamp":5}}"#).unwrap(),
            ClientMessage::Ping(json!({"timestamp": 5}))
        );
        assert_eq!(parse_client("{nope").unwrap_err().code(), "invalid_json");
        assert_eq!(parse_client("[1]").unwrap_err().code(), "missing_type");
        let e = parse_client(r#"{"type":"dance"}"#).unwrap_err();
        assert_eq!(e.code(), "unknown_type");
        assert!(e.to_string().contains("dance"));
        let e = parse_client(r#"{"type":"subscribe","data":{"events":["nope"]}}"#).unwrap_err();
        assert_eq!(e, ProtocolError::UnknownEvent("nope".into()));
        let e = parse_client(r#"{"type":"subscribe","data":{"colour":[]}}"#).unwrap_err();
        assert_eq!(e.code(), "invalid_data");
        let many: Vec<String> = (0..=MAX_FILTER_ENTRIES).map(|i| i.to_string()).collect();
        let text = json!({"type":"subscribe","data":{"vm_ids": many}}).to_string();
        assert_eq!(
            parse_client(&text).unwrap_err(),
            ProtocolError::TooManyEntries
        );
    }

    #[test]
    fn an_emptied_dimension_matches_nothing_rather_than_everything() {
        let mut f = Filter::default();
        let e = vm_event(EventKind::Progress, "kvm:a");
        assert!(f.matches(&e));
        let change = FilterChange {
            vm_ids: Some(vec!["a".into()]),
            ..FilterChange::default()
        };
        f.subscribe(&change).unwrap();
        assert!(f.matches(&e), "a native id matches the unique one");
        assert!(!f.matches(&vm_event(EventKind::Progress, "kvm:b")));
        f.unsubscribe(&change);
        assert!(!f.matches(&e));
    }

    #[test]
    fn visibility_follows_the_role_and_the_vms_claim() {
        let viewer = Visibility::of(&Principal {
            role: Role::Viewer,
            user: Some("alice".into()),
            vms: VmGrant::Patterns(vec!["web-*".into()]),
        });
        assert!(viewer.may_see(&vm_event(EventKind::VmStatusChanged, "kvm:web-1")));
        assert!(!viewer.may_see(&vm_event(EventKind::VmStatusChanged, "kvm:db-1")));
        assert!(viewer.may_see(&vm_event(EventKind::VmMetricsUpdate, "kvm:web-1")));
        assert!(!viewer.may_see(&vm_event(EventKind::VmMetricsUpdate, "kvm:db-1")));
        let session = |user: &str| {
            Event::session(
                EventKind::SessionOpened,
                &SessionData {
                    session_id: "1".into(),
                    user: user.into(),
                    vm_id: None,
                    reason: "opened".into(),
                    bytes: 0,
                    bytes_browser_to_backend: 0,
                    bytes_backend_to_browser: 0,
                    bytes_final: true,
                    duration_ms: 0,
                },
            )
        };
        assert!(viewer.may_see(&session("alice")) && !viewer.may_see(&session("bob")));
        assert!(!viewer.may_subscribe(EventKind::Alert));
        assert!(!viewer.may_subscribe(EventKind::AlertCleared));
        let cleared = Event::alert_cleared(
            &AlertData {
                alert_id: "a".into(),
                alert_type: "worker_unhealthy".into(),
                severity: "critical".into(),
                title: "t".into(),
                message: "m".into(),
                entity_type: "worker".into(),
                entity_id: "0".into(),
            },
            42,
        );
        assert_eq!(cleared.data["duration_ms"], 42);
        assert!(!viewer.may_see(&cleared) && !Visibility::Anonymous.may_see(&cleared));
        assert!(Visibility::All.may_see(&cleared));
        assert!(Visibility::All.may_see(&session("bob")));
        assert!(!Visibility::Anonymous.may_see(&session("bob")));
        assert!(Visibility::Anonymous.may_see(&vm_event(EventKind::VmStatusChanged, "k:x")));
        assert!(!Visibility::Anonymous.may_see(&vm_event(EventKind::VmMetricsUpdate, "k:x")));
        assert!(!Visibility::Anonymous.may_subscribe(EventKind::Progress));
        let service = Visibility::of(&Principal::service(Role::Operator));
        assert_eq!(service, Visibility::All);
    }

    const VMS: [&str; 4] = ["h1:a", "h1:b", "h2:a", "h2:c"];
    const SERVERS: [&str; 3] = ["h1", "h2", "h3"];

    /// A filter as sets of (kind, vm) pairs: the model the property test
    /// compares [`Filter`] with.
    #[derive(Clone, Debug, Default)]
    struct Model {
        events: Option<BTreeSet<usize>>,
        vms: Option<BTreeSet<String>>,
        servers: Option<BTreeSet<String>>,
    }

    fn change_strategy() -> impl Strategy<Value = (bool, FilterChange)> {
        let kinds = prop::option::of(prop::collection::vec(0..EventKind::ALL.len(), 0..3));
        let vms = prop::option::of(prop::collection::vec(
            prop::sample::select(vec!["h1:a", "h1:b", "h2:a", "h2:c", "a", "c"]),
            0..3,
        ));
        let servers = prop::option::of(prop::collection::vec(
            prop::sample::select(SERVERS.to_vec()),
            0..3,
        ));
        (any::<bool>(), kinds, vms, servers).prop_map(|(sub, k, v, s)| {
            (
                sub,
                FilterChange {
                    events: k.map(|k| k.into_iter().map(|i| EventKind::ALL[i]).collect()),
                    vm_ids: v.map(|v| v.into_iter().map(str::to_string).collect()),
                    server_ids: s.map(|s| s.into_iter().map(str::to_string).collect()),
                },
            )
        })
    }

    fn model_apply(m: &mut Model, sub: bool, c: &FilterChange) {
        fn step<T: Ord + Clone>(d: &mut Option<BTreeSet<T>>, items: Option<Vec<T>>, sub: bool) {
            let Some(items) = items else { return };
            if sub {
                let set = d.get_or_insert_with(BTreeSet::new);
                set.extend(items);
            } else if let Some(set) = d {
                for i in items {
                    set.remove(&i);
                }
            }
        }
        let kinds = c.events.as_ref().map(|v| {
            v.iter()
                .map(|k| EventKind::ALL.iter().position(|x| x == k).unwrap_or(0))
                .collect()
        });
        step(&mut m.events, kinds, sub);
        step(&mut m.vms, c.vm_ids.clone(), sub);
        step(&mut m.servers, c.server_ids.clone(), sub);
    }

    fn model_matches(m: &Model, kind: usize, vm: &str) -> bool {
        let native = vm.split_once(':').map_or(vm, |(_, n)| n);
        let server = server_of(vm).unwrap_or("");
        m.events.as_ref().is_none_or(|s| s.contains(&kind))
            && m.vms
                .as_ref()
                .is_none_or(|s| s.contains(vm) || s.contains(native))
            && m.servers.as_ref().is_none_or(|s| s.contains(server))
    }

    proptest! {
        /// Over random subscribe / unsubscribe sequences, exactly the
        /// events the model says match are delivered by the filter.
        #[test]
        fn filters_deliver_exactly_the_matching_events(
            steps in prop::collection::vec(change_strategy(), 0..12)
        ) {
            let mut filter = Filter::default();
            let mut model = Model::default();
            for (sub, change) in &steps {
                if *sub {
                    filter.subscribe(change).unwrap();
                } else {
                    filter.unsubscribe(change);
                }
                model_apply(&mut model, *sub, change);
                for (k, kind) in EventKind::ALL.iter().enumerate() {
                    for vm in VMS {
                        let e = vm_event(*kind, vm);
                        prop_assert_eq!(filter.matches(&e), model_matches(&model, k, vm));
                    }
                }
            }
        }
    }
}
