//! `plain-relay`: the floor every WebSocket proxy is compared against. A
//! minimal blocking TCP relay with no protocol at all: per connection, connect
//! to the backend and copy each direction on its own thread, TCP_NODELAY on
//! both legs. Whatever a real proxy adds on top of this is its own cost.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::server::{pump, ThreadServer};

const MAX_RELAY_CONNS: usize = 4096;
const RELAY_BUF_BYTES: usize = 16 * 1024;

pub fn start(backend: SocketAddr, connect_timeout: Duration) -> io::Result<ThreadServer> {
    ThreadServer::start("relay", MAX_RELAY_CONNS, move |client, tracker| {
        client.set_nodelay(true)?;
        let upstream = TcpStream::connect_timeout(&backend, connect_timeout)?;
        upstream.set_nodelay(true)?;
        let _tracked = tracker.track(&upstream)?;
        let (c2, u2) = (client.try_clone()?, upstream.try_clone()?);
        let back = std::thread::Builder::new()
            .name("relay-back".into())
            .spawn(move || {
                let mut buf = vec![0u8; RELAY_BUF_BYTES];
                let _ = pump(&u2, &c2, &mut buf);
            })?;
        let mut buf = vec![0u8; RELAY_BUF_BYTES];
        let _ = pump(&client, &upstream, &mut buf);
        let _ = back.join();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    #[test]
    fn relays_to_echo() {
        let mut echo = crate::echo::start().unwrap();
        let mut relay = super::start(echo.addr(), Duration::from_secs(2)).unwrap();
        let mut c = TcpStream::connect(relay.addr()).unwrap();
        c.write_all(b"0123456789").unwrap();
        let mut buf = [0u8; 10];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"0123456789");
        relay.stop();
        echo.stop();
    }
}
