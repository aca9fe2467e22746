//! The data plane: worker threads (one per core, pinned), each owning its
//! listener, sessions, buffer pool and counters, and the sans-IO session
//! state machine they all run.
//!
//! Nothing here blocks on another thread, takes a lock on the relay path or
//! runs an async runtime. It must not depend on a control plane: the only
//! thing shared between workers is [`worker::WorkerControl`] (atomics).

pub mod buffer;
pub mod router;
pub mod session;
pub mod tls;
pub mod tokens;
pub mod web;
pub mod worker;
