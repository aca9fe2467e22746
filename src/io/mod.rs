//! The IO backends: io_uring (primary) and epoll via mio (fallback). The
//! only home of syscall `unsafe` in the crate.
//!
//! A backend owns one worker's sockets and moves bytes between them and the
//! sans-IO [`crate::dataplane::session::Session`]s; it makes no protocol
//! decision of its own. Both backends implement the same contract (see the
//! session module) and pass the same end-to-end tests.

pub mod epoll;
pub mod splice;
pub mod sys;
pub mod uring;

use crate::config::IoChoice;

/// The backend actually in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    Uring,
    Epoll,
}

impl IoBackend {
    pub fn name(self) -> &'static str {
        match self {
            Self::Uring => "uring",
            Self::Epoll => "epoll",
        }
    }
}

/// Pick the backend: `auto` probes io_uring and falls back to epoll when
/// the kernel or a seccomp profile refuses it (EPERM, ENOSYS, EINVAL …).
pub fn select(choice: IoChoice) -> Result<IoBackend, std::io::Error> {
    match choice {
        IoChoice::Epoll => Ok(IoBackend::Epoll),
        IoChoice::Uring => uring::probe().map(|_| IoBackend::Uring),
        IoChoice::Auto => match uring::probe() {
            Ok(()) => Ok(IoBackend::Uring),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable, falling back to epoll");
                Ok(IoBackend::Epoll)
            }
        },
    }
}
