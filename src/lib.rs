//! consolegate: a console proxy appliance. Browsers (noVNC, VMware WebMKS)
//! open WebSockets to it; it relays each to a VM console. See
//! `docs/ARCHITECTURE.md` for the map.

pub mod auth;
pub mod cause;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod events;
pub mod hypervisor;
pub mod io;
pub mod mailbox;
pub mod metrics;
pub mod pki;
pub mod plane;
pub mod ports;
pub mod protocol;
pub mod service;
