//! Hypervisor backends: where console targets come from. Today the built-in
//! demo VNC server (so the appliance works with no hypervisor) and the
//! shared vocabulary ([`model`]) that the vSphere, QEMU and static backends
//! implement.
//!
//! Nothing here runs on a data-plane worker.

pub mod demo;
pub mod model;
pub mod pool;
pub mod thumbnail;
pub mod vsphere;
