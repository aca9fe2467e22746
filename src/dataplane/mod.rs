//! The data plane: worker threads (one per core, pinned), each owning its
//! listener, sessions, buffer pool and counters, and the sans-IO session
//! state machine they all run.
//!
//! Nothing here blocks on another thread, takes a lock on the relay path or
//! runs an async runtime. It must not depend on a control plane: the only
//! things shared between workers are [`worker::WorkerControl`] and
//! [`balance::WorkerLoads`] (atomics), and their mailboxes for hand-overs.

pub mod balance;
pub mod buffer;
pub mod client_limits;
pub mod router;
pub mod session;
#[cfg(test)]
mod sim;
pub mod tls;
pub mod tokens;
pub mod turn;
pub mod web;
pub mod worker;
