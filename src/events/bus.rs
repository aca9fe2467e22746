//! The fan-out: [`EventBus::publish`] encodes an event once, as a
//! WebSocket text frame, then offers it to each subscriber whose room,
//! visibility and filter admit it: the frame is written straight to the
//! subscriber's socket without waiting, or queued in its bounded
//! [`Sink`] when the socket does not take it at once (see
//! [`super::sink`]). Subscribers are indexed by room (the monitor room,
//! one map per VM, one per hypervisor), so an event is only offered to
//! the rooms that can admit it: a VM's event costs nothing to the
//! subscribers of the other VMs' rooms. A full queue drops the event for
//! that subscriber only (counted per subscriber and in total): publishing
//! never waits, so a slow or dead subscriber cannot delay the publisher
//! or the others.
//!
//! Bounded: at most `max_subscribers` subscribers, each holding at most
//! `subscriber_queue_events` events (shared, reference-counted frames).
//! Registration and publishing take one mutex that only the control
//! thread uses (uncontended).
//!
//! Must not depend on `crate::control` or `crate::hypervisor`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::protocol::{server_of, Event, EventKind, Filter, Room, Visibility};
use super::sink::{text_frame, Offer, Sink, Wire};

/// The bus's bounds (from `[events]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusLimits {
    pub max_subscribers: usize,
    pub subscriber_queue_events: usize,
}

/// Why a subscriber was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("{max} event subscribers are connected already")]
    Full { max: usize },
}

struct Slot {
    sink: Arc<Sink>,
    visibility: Visibility,
    filter: Filter,
}

#[derive(Default)]
struct Counters {
    published: u64,
    delivered: u64,
    dropped: u64,
}

/// Subscribers by id, in the room they joined.
type Slots = HashMap<u64, Slot>;

/// The subscribers, indexed by room. Bounded: `by_id` has one entry per
/// subscriber (at most `max_subscribers`), and a VM's or hypervisor's map
/// is removed with its last subscriber.
#[derive(Default)]
struct Rooms {
    /// Each subscriber's room, to find its slot.
    by_id: HashMap<u64, Room>,
    monitor: Slots,
    vms: HashMap<String, Slots>,
    servers: HashMap<String, Slots>,
    stats: Slots,
}

impl Rooms {
    fn len(&self) -> usize {
        self.by_id.len()
    }

    fn insert(&mut self, id: u64, room: Room, slot: Slot) {
        match &room {
            Room::Monitor => self.monitor.insert(id, slot),
            Room::Vm(vm) => self.vms.entry(vm.clone()).or_default().insert(id, slot),
            Room::Server(s) => self.servers.entry(s.clone()).or_default().insert(id, slot),
            Room::Stats => self.stats.insert(id, slot),
        };
        self.by_id.insert(id, room);
    }

    fn get_mut(&mut self, id: u64) -> Option<&mut Slot> {
        match self.by_id.get(&id)? {
            Room::Monitor => self.monitor.get_mut(&id),
            Room::Vm(vm) => self.vms.get_mut(vm)?.get_mut(&id),
            Room::Server(s) => self.servers.get_mut(s)?.get_mut(&id),
            Room::Stats => self.stats.get_mut(&id),
        }
    }

    fn remove(&mut self, id: u64) {
        fn from_keyed(map: &mut HashMap<String, Slots>, key: &str, id: u64) {
            if let Some(slots) = map.get_mut(key) {
                slots.remove(&id);
                if slots.is_empty() {
                    map.remove(key);
                }
            }
        }
        match self.by_id.remove(&id) {
            Some(Room::Monitor) => {
                self.monitor.remove(&id);
            }
            Some(Room::Vm(vm)) => from_keyed(&mut self.vms, &vm, id),
            Some(Room::Server(s)) => from_keyed(&mut self.servers, &s, id),
            Some(Room::Stats) => {
                self.stats.remove(&id);
            }
            None => {}
        }
    }

    /// The rooms that admit `event` (see [`Room::admits`]): the monitor
    /// room, its VM's and its hypervisor's.
    fn admitting<'a>(&'a self, event: &Event) -> impl Iterator<Item = &'a Slot> + 'a {
        let vm = event.vm_id.as_deref().and_then(|v| self.vms.get(v));
        let server = event.server_id.as_deref().and_then(|s| self.servers.get(s));
        self.monitor
            .values()
            .chain(vm.into_iter().flat_map(HashMap::values))
            .chain(server.into_iter().flat_map(HashMap::values))
    }

    /// Every subscriber with its room's label.
    fn all(&self) -> impl Iterator<Item = (&'static str, &Slot)> + '_ {
        self.monitor
            .values()
            .map(|slot| ("monitor", slot))
            .chain(keyed_slots("vm", &self.vms))
            .chain(keyed_slots("server", &self.servers))
            .chain(self.stats.values().map(|slot| ("stats", slot)))
    }
}

/// The slots of every VM (or hypervisor) room, with `label`.
fn keyed_slots<'a>(
    label: &'static str,
    rooms: &'a HashMap<String, Slots>,
) -> impl Iterator<Item = (&'static str, &'a Slot)> + 'a {
    rooms
        .values()
        .flat_map(HashMap::values)
        .map(move |slot| (label, slot))
}

struct State {
    subscribers: Rooms,
    next_id: u64,
    counters: Counters,
}

struct Inner {
    limits: BusLimits,
    state: Mutex<State>,
}

/// The event bus; cheap to clone (one shared inner).
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("limits", &self.inner.limits)
            .finish()
    }
}

/// `/ws/stats`: the bus's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BusStats {
    pub subscribers: usize,
    pub max_subscribers: usize,
    /// Subscribers by room: monitor, vm, server, stats.
    pub connections_by_room: std::collections::BTreeMap<&'static str, usize>,
    /// Events published since start.
    pub events_published_total: u64,
    /// Events queued to subscribers since start (one per subscriber).
    pub events_delivered_total: u64,
    /// Events dropped because a subscriber's queue was full.
    pub events_dropped_total: u64,
    /// The fullest subscriber queue, in events (of `queue_capacity`).
    pub max_subscriber_lag_events: usize,
    /// Events waiting in all queues.
    pub queued_events: usize,
    pub queue_capacity: usize,
}

/// Unix time in ms, the events' `timestamp`.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl EventBus {
    pub fn new(limits: BusLimits) -> EventBus {
        EventBus {
            inner: Arc::new(Inner {
                limits,
                state: Mutex::new(State {
                    subscribers: Rooms::default(),
                    next_id: 1,
                    counters: Counters::default(),
                }),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn limits(&self) -> BusLimits {
        self.inner.limits
    }

    /// Whether another subscriber would be refused.
    pub fn is_full(&self) -> bool {
        self.lock().subscribers.len() >= self.inner.limits.max_subscribers
    }

    /// Register a subscriber whose frames go to `wire`; it is
    /// unregistered when the returned [`Subscription`] is dropped.
    pub fn subscribe_on(
        &self,
        room: Room,
        visibility: Visibility,
        wire: Arc<dyn Wire>,
    ) -> Result<Subscription, BusError> {
        let mut state = self.lock();
        if state.subscribers.len() >= self.inner.limits.max_subscribers {
            return Err(BusError::Full {
                max: self.inner.limits.max_subscribers,
            });
        }
        let sink = Arc::new(Sink::new(wire, self.inner.limits.subscriber_queue_events));
        let id = state.next_id;
        state.next_id += 1;
        state.subscribers.insert(
            id,
            room,
            Slot {
                sink: sink.clone(),
                visibility,
                filter: Filter::default(),
            },
        );
        Ok(Subscription {
            id,
            bus: self.clone(),
            sink,
            #[cfg(test)]
            memory: None,
        })
    }

    /// A subscriber whose frames are kept in memory ([`Subscription::try_recv`]).
    #[cfg(test)]
    pub fn subscribe(&self, room: Room, visibility: Visibility) -> Result<Subscription, BusError> {
        let wire = super::sink::memory::MemoryWire::unlimited();
        let mut sub = self.subscribe_on(room, visibility, wire.clone())?;
        sub.memory = Some(wire);
        Ok(sub)
    }

    /// Offer `event` to every subscriber that may see it and asked for it;
    /// never waits. Returns to how many it was written or queued.
    pub fn publish(&self, event: &Event) -> usize {
        let frame = text_frame(event.encode(now_ms()).as_bytes());
        let mut state = self.lock();
        state.counters.published += 1;
        let (mut delivered, mut dropped) = (0u64, 0u64);
        for slot in state.subscribers.admitting(event) {
            if !(slot.visibility.may_see(event) && slot.filter.matches(event)) {
                continue;
            }
            match slot.sink.offer_event(&frame) {
                Offer::Written | Offer::Queued => delivered += 1,
                Offer::Dropped => dropped += 1,
                // Its connection is ending; its Subscription's drop
                // removes the slot.
                Offer::Gone => {}
            }
        }
        state.counters.delivered += delivered;
        state.counters.dropped += dropped;
        usize::try_from(delivered).unwrap_or(usize::MAX)
    }

    pub fn stats(&self) -> BusStats {
        let state = self.lock();
        let capacity = self.inner.limits.subscriber_queue_events;
        let mut stats = BusStats {
            subscribers: state.subscribers.len(),
            max_subscribers: self.inner.limits.max_subscribers,
            events_published_total: state.counters.published,
            events_delivered_total: state.counters.delivered,
            events_dropped_total: state.counters.dropped,
            queue_capacity: capacity,
            ..BusStats::default()
        };
        for (label, slot) in state.subscribers.all() {
            *stats.connections_by_room.entry(label).or_insert(0) += 1;
            let queued = slot.sink.queued_events();
            stats.max_subscriber_lag_events = stats.max_subscriber_lag_events.max(queued);
            stats.queued_events += queued;
        }
        stats
    }

    /// The VMs (unique ids, sorted, at most `max`) whose `/ws/vm/{vm_id}`
    /// room has a subscriber that would receive an event of `kind` about
    /// its VM (its visibility and filter admit it): the only VMs whose
    /// figures are worth fetching (`vm_metrics_update`).
    pub fn watched_vms(&self, kind: EventKind, max: usize) -> Vec<String> {
        let state = self.lock();
        let mut watched = std::collections::BTreeSet::new();
        for (vm_id, slots) in &state.subscribers.vms {
            let probe = Event {
                kind,
                vm_id: Some(vm_id.clone()),
                server_id: server_of(vm_id).map(str::to_string),
                owner: None,
                data: serde_json::Value::Null,
            };
            let admitted = slots
                .values()
                .any(|slot| slot.visibility.may_see(&probe) && slot.filter.matches(&probe));
            if admitted {
                watched.insert(vm_id.clone());
            }
        }
        watched.into_iter().take(max).collect()
    }

    fn update_filter(&self, id: u64, change: impl FnOnce(&mut Filter)) -> Option<Filter> {
        let mut state = self.lock();
        let slot = state.subscribers.get_mut(id)?;
        change(&mut slot.filter);
        Some(slot.filter.clone())
    }

    fn unregister(&self, id: u64) {
        self.lock().subscribers.remove(id);
    }
}

/// One subscriber's end: its sink and its filter.
pub struct Subscription {
    id: u64,
    bus: EventBus,
    sink: Arc<Sink>,
    /// Where a test subscriber's frames went.
    #[cfg(test)]
    memory: Option<Arc<super::sink::memory::MemoryWire>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish()
    }
}

impl Subscription {
    /// Where this subscriber's frames go.
    pub fn sink(&self) -> &Arc<Sink> {
        &self.sink
    }

    /// Change the filter; returns it as it now is.
    pub fn update_filter(&self, change: impl FnOnce(&mut Filter)) -> Filter {
        self.bus.update_filter(self.id, change).unwrap_or_default()
    }

    pub fn bus(&self) -> &EventBus {
        &self.bus
    }

    /// The next message a test subscriber got ([`EventBus::subscribe`]).
    #[cfg(test)]
    pub fn try_recv(&mut self) -> Option<String> {
        self.memory.as_ref()?.next_text()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.bus.unregister(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::protocol::FilterChange;
    use crate::events::sink::memory::MemoryWire;
    use serde_json::Value;

    fn bus(max: usize, queue: usize) -> EventBus {
        EventBus::new(BusLimits {
            max_subscribers: max,
            subscriber_queue_events: queue,
        })
    }

    fn event(kind: EventKind, vm: &str) -> Event {
        Event {
            kind,
            vm_id: Some(vm.into()),
            server_id: vm.split_once(':').map(|(s, _)| s.to_string()),
            owner: None,
            data: Value::Null,
        }
    }

    #[test]
    fn a_full_queue_drops_for_that_subscriber_only() {
        let b = bus(10, 2);
        // A socket that takes nothing: every event waits in the queue.
        let blocked = MemoryWire::with_room(0);
        let slow = b
            .subscribe_on(Room::Monitor, Visibility::All, blocked.clone())
            .unwrap();
        let mut fast = b.subscribe(Room::Monitor, Visibility::All).unwrap();
        for _ in 0..5 {
            b.publish(&event(EventKind::Progress, "h:a"));
            assert!(fast.try_recv().is_some());
        }
        assert_eq!(slow.sink().take_dropped(), 3);
        assert_eq!(slow.sink().take_dropped(), 0);
        assert_eq!(b.stats().max_subscriber_lag_events, 2);
        blocked.set_room(None);
        assert!(slow.sink().write_queued().unwrap().1);
        let got: Vec<String> = std::iter::from_fn(|| blocked.next_text()).collect();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|m| m.contains("\"progress\"")), "{got:?}");
        let s = b.stats();
        assert_eq!(
            (
                s.events_published_total,
                s.events_delivered_total,
                s.events_dropped_total
            ),
            (5, 7, 3)
        );
    }

    #[test]
    fn the_room_index_offers_exactly_what_the_rooms_admit() {
        let b = bus(16, 8);
        let rooms = [
            Room::Monitor,
            Room::Vm("h:a".into()),
            Room::Vm("h:b".into()),
            Room::Vm("h:a".into()),
            Room::Server("h".into()),
            Room::Server("g".into()),
            Room::Stats,
        ];
        let mut subs: Vec<(Room, Subscription)> = rooms
            .iter()
            .map(|r| (r.clone(), b.subscribe(r.clone(), Visibility::All).unwrap()))
            .collect();
        for vm in ["h:a", "h:b", "g:a", "x"] {
            let e = event(EventKind::Progress, vm);
            let delivered = b.publish(&e);
            let mut received = 0;
            for (room, sub) in &mut subs {
                let got = sub.try_recv().is_some();
                assert_eq!(got, room.admits(&e), "{room:?} and an event of {vm}");
                received += usize::from(got);
            }
            assert_eq!(delivered, received, "an event of {vm}");
        }
        let by_room = b.stats().connections_by_room;
        assert_eq!(
            (
                by_room["monitor"],
                by_room["vm"],
                by_room["server"],
                by_room["stats"]
            ),
            (1, 3, 2, 1)
        );
        drop(subs);
        assert_eq!(b.stats().subscribers, 0);
        let state = b.lock();
        assert!(state.subscribers.vms.is_empty() && state.subscribers.servers.is_empty());
    }

    #[test]
    fn rooms_filters_and_bounds() {
        let b = bus(2, 8);
        let mut vm = b
            .subscribe(Room::Vm("h:a".into()), Visibility::All)
            .unwrap();
        let mut anon = b.subscribe(Room::Monitor, Visibility::Anonymous).unwrap();
        assert_eq!(
            b.subscribe(Room::Monitor, Visibility::All).unwrap_err(),
            BusError::Full { max: 2 }
        );
        anon.update_filter(|f| {
            f.subscribe(&FilterChange {
                server_ids: Some(vec!["h".into()]),
                ..FilterChange::default()
            })
            .unwrap()
        });
        b.publish(&event(EventKind::Progress, "h:b"));
        b.publish(&event(EventKind::Progress, "h:a"));
        b.publish(&event(EventKind::VmStatusChanged, "h:b"));
        b.publish(&event(EventKind::VmStatusChanged, "g:b"));
        let text = Option::unwrap_or_default;
        assert!(text(vm.try_recv()).contains("\"progress\""));
        assert!(vm.try_recv().is_none());
        assert!(text(anon.try_recv()).contains("vm_status_changed"));
        assert!(
            anon.try_recv().is_none(),
            "g is filtered out, progress is not public"
        );
        assert_eq!(
            b.watched_vms(EventKind::VmMetricsUpdate, 10),
            vec!["h:a".to_string()]
        );
        vm.update_filter(|f| {
            f.subscribe(&FilterChange {
                events: Some(vec![EventKind::Progress]),
                ..FilterChange::default()
            })
            .unwrap()
        });
        assert!(
            b.watched_vms(EventKind::VmMetricsUpdate, 10).is_empty(),
            "a room whose filter refuses the kind does not count"
        );
        drop(vm);
        assert_eq!(b.stats().subscribers, 1);
        assert!(b.subscribe(Room::Stats, Visibility::All).is_ok());
    }
}
