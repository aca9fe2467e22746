//! Sans-IO protocol code: bytes in, bytes and decisions out. No sockets, no
//! clocks, no runtime, no panics on input. Shared by both IO backends.

pub mod http_upgrade;
pub mod rfb;
pub mod websocket;
