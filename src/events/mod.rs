//! Live events: what happened in the appliance (sessions opened and
//! closed, power actions' progress, hypervisors and VMs changing state,
//! alerts), fanned out to WebSocket subscribers on the control port.
//!
//! - [`protocol`]: the events, their wire format (`{"type","data",
//!   "timestamp"}`), the client's messages (subscribe, unsubscribe, ping)
//!   and the subscription filter;
//! - [`alerts`]: alerts raised when a condition starts and cleared when
//!   it ends (pool exhausted, worker unhealthy, sustained rate limiting),
//!   with hysteresis;
//! - [`bus`]: the fan-out: who may see what, rooms, and the counters
//!   `/ws/stats` shows;
//! - [`sink`]: one subscriber's outgoing frames, written straight to its
//!   socket, with a bounded queue for what the socket does not take.
//!
//! Publishing never waits: a subscriber whose queue is full loses the
//! event (counted, and told with a `lagged` message), so a slow or dead
//! subscriber cannot delay the publisher or the other subscribers. The
//! WebSocket endpoints live in `crate::control::events_ws`; the sources
//! are the session registry, the fleet (operations, hypervisor health, VM
//! lists and QMP events) and the control plane's port pool check.
//!
//! Must not depend on `crate::control`, `crate::hypervisor`,
//! `crate::dataplane`, `crate::io` or `crate::plane`: the sources call in,
//! never the other way.

pub mod alerts;
pub mod bus;
pub mod protocol;
pub mod sink;

pub use bus::{BusStats, EventBus, Subscription};
pub use protocol::{Event, EventKind, Filter, Room, Visibility};
pub use sink::{Sink, Wire};
