//! Sans-IO protocol code: bytes in, bytes and decisions out. No sockets, no
//! clocks, no runtime, no panics on input. Shared by both IO backends.

pub mod http_upgrade;
pub mod proxy_protocol;
pub mod rfb;
pub mod vmware;
pub mod websocket;

/// The party a protocol error is blamed on: every error of this module
/// says which side failed (`side()`), so that logs, metrics and close codes
/// can tell a broken browser from a broken backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The browser (the downstream leg, where we are the server).
    Browser,
    /// The console server behind us: a VNC server or a WebMKS host (the
    /// upstream leg, where a WebMKS relay is the client).
    Backend,
    /// The description of the target: a WebSocket URL from an API caller or
    /// a hypervisor's ticket.
    Target,
    /// The appliance itself: its configuration or its operating system.
    Internal,
}

impl Side {
    /// A stable lowercase name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Browser => "browser",
            Side::Backend => "backend",
            Side::Target => "target",
            Side::Internal => "internal",
        }
    }
}
