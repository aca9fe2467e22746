//! The echo backend every proxy under test forwards to: an in-process,
//! thread-per-connection TCP server on 127.0.0.1 that writes back whatever it
//! reads. It stands in for a VNC server; it does not speak RFB.

use std::io;

use crate::server::{pump, ThreadServer};

/// Most concurrent backend connections; above the largest concurrency the
/// bench will run (1000) plus the proxies' probes.
const MAX_ECHO_CONNS: usize = 4096;

/// Per-connection read buffer.
const ECHO_BUF_BYTES: usize = 64 * 1024;

pub fn start() -> io::Result<ThreadServer> {
    ThreadServer::start("echo", MAX_ECHO_CONNS, |stream, _tracker| {
        stream.set_nodelay(true)?;
        let mut buf = vec![0u8; ECHO_BUF_BYTES];
        pump(&stream, &stream, &mut buf).map(|_| ())
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    #[test]
    fn echoes_and_stops_cleanly() {
        let mut server = super::start().unwrap();
        let mut c = TcpStream::connect(server.addr()).unwrap();
        c.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        // Stopping with a client still connected must not hang.
        server.stop();
        assert_eq!(c.read(&mut buf).unwrap_or(0), 0);
    }
}
