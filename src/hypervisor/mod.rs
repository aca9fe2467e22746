//! Hypervisor backends: where console targets come from. Today the built-in
//! demo VNC server (so the appliance works with no hypervisor); vSphere,
//! QMP and static targets come with their issues.
//!
//! Nothing here runs on a data-plane worker.

pub mod demo;
