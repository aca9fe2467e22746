//! Hypervisor backends: where console targets come from, behind one
//! vocabulary ([`model`]): vSphere (ESXi/vCenter over SOAP, [`vsphere`]),
//! QEMU/KVM over QMP ([`qemu`]), static VNC targets ([`static_targets`])
//! and the built-in demo VNC server ([`demo`], so the appliance works with
//! no hypervisor). Around them: the API-session pool ([`pool`]), thumbnails
//! of any VNC server through the appliance's own short RFB connection
//! ([`snapshot`]) and PNG scaling ([`thumbnail`]).
//!
//! Nothing here runs on a data-plane worker, and nothing here depends on
//! the data plane.

pub mod backend;
pub mod cache;
pub mod demo;
pub mod fleet;
pub mod metrics;
pub mod model;
pub mod operations;
pub mod pool;
pub mod qemu;
pub mod queue;
pub mod snapshot;
pub mod static_targets;
pub mod thumbnail;
pub mod vsphere;
