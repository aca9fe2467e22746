//! The QEMU/KVM backend: the VMs of one `[[hypervisors]] kind = "qemu"`
//! entry, each reached over its own QMP unix socket.
//!
//! What it does: [`QemuBackend`] implements [`crate::hypervisor::model::Hypervisor`]
//! on one persistent [`qmp::QmpClient`] per VM (commands and events on the
//! same connection, reconnected with a bounded backoff). Power states come
//! from `query-status` at connect, then from QMP's events alone
//! ([`state`]); consoles are one-time VNC passwords ([`password`]);
//! thumbnails are `screendump` PNGs, or the appliance's own RFB snapshot
//! when screendump fails; power actions map to QMP as [`power`] documents.
//!
//! Files: `config.rs` (the TOML entry), `qmp.rs` (the QMP client),
//! `state.rs` (notices → power state), `password.rs` (one-time passwords
//! and the one password slot per display), `power.rs` (actions),
//! `counters.rs` (CPU and memory figures from QMP and /proc),
//! `backend.rs` (the `Hypervisor` implementation).
//!
//! What it must not depend on: the data plane, the control plane's REST
//! API. It runs on the control plane's tokio runtime.

mod backend;
pub mod config;
pub mod counters;
pub mod password;
pub mod power;
pub mod qmp;
pub mod state;

pub use backend::{QemuBackend, STATUS_CHANGES_CAPACITY};
pub use config::{QemuConfig, QemuError, QemuVmConfig};
