//! The control port's connections: a listener for `axum::serve` whose
//! connections share their socket ([`ControlStream`]), and the connection
//! info every request carries ([`ControlPeer`]: the peer's address and a
//! handle on the socket).
//!
//! Why shared: after an event endpoint's upgrade the socket is written
//! straight from the event fan-out ([`crate::events::sink`]), while hyper
//! still owns the connection's reading side; a plain `TcpStream` cannot be
//! had back from hyper's upgrade.
//!
//! Must not depend on `crate::events` or `crate::hypervisor`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// SO_SNDBUF of each control connection (the kernel doubles it). Why this
/// much: a REST answer (a thumbnail, a long list) still leaves in one go on
/// a LAN, while a stalled `/ws/*` subscriber holds at most this in the
/// kernel (then its events queue, are dropped and counted, and it is let
/// go), instead of tcp_wmem's maximum (4 MiB by default).
pub const CONTROL_SEND_BUFFER_BYTES: usize = 256 * 1024;
/// After an accept error that is about this process or machine (out of
/// file descriptors or memory), how long to wait before accepting again:
/// retrying at once would spin.
const ACCEPT_BACKOFF_MS: u64 = 1_000;

/// The control port's listener (see the module doc).
#[derive(Debug)]
pub struct ControlListener {
    inner: TcpListener,
}

impl ControlListener {
    pub fn new(inner: TcpListener) -> ControlListener {
        ControlListener { inner }
    }
}

impl Listener for ControlListener {
    type Io = ControlStream;
    type Addr = ControlPeer;

    async fn accept(&mut self) -> (ControlStream, ControlPeer) {
        loop {
            match self.inner.accept().await {
                Ok((tcp, addr)) => {
                    // No Nagle: an event written while the subscriber's
                    // delayed ACK of the previous one is pending would
                    // otherwise wait for that ACK (up to 40 ms); every
                    // write here is a whole message.
                    let _ = tcp.set_nodelay(true);
                    let _ = socket2::SockRef::from(&tcp)
                        .set_send_buffer_size(CONTROL_SEND_BUFFER_BYTES);
                    let stream = Arc::new(tcp);
                    let peer = ControlPeer {
                        addr,
                        stream: Arc::downgrade(&stream),
                    };
                    return (ControlStream(stream), peer);
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    tracing::error!(error = %e, backoff_ms = ACCEPT_BACKOFF_MS, "control port: accept failed");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_BACKOFF_MS)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<ControlPeer> {
        Ok(ControlPeer {
            addr: self.inner.local_addr()?,
            stream: Weak::new(),
        })
    }
}

/// Errors about one connection (it went away before it was accepted):
/// accept the next at once.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// A control connection's socket, shared (see the module doc).
#[derive(Debug)]
pub struct ControlStream(Arc<TcpStream>);

impl AsyncRead for ControlStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match self.0.try_read(unfilled) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // Readiness was stale; poll again (which registers the waker).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for ControlStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(bytes) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// What every request on the control port knows of its connection (the
/// listener's address type, handed to each request as connect info).
#[derive(Debug, Clone)]
pub struct ControlPeer {
    pub addr: SocketAddr,
    stream: Weak<TcpStream>,
}

impl ControlPeer {
    /// The connection's socket, while the connection lives.
    pub fn stream(&self) -> Option<Arc<TcpStream>> {
        self.stream.upgrade()
    }
}

impl Connected<IncomingStream<'_, ControlListener>> for ControlPeer {
    fn connect_info(stream: IncomingStream<'_, ControlListener>) -> Self {
        stream.remote_addr().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_control_stream_reads_writes_and_shares_its_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = ControlListener::new(listener);
        let client = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(b"ping").await.unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
            got
        });
        let (mut stream, peer) = listener.accept().await;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        stream.write_all(b"pong ").await.unwrap();
        // The shared handle writes to the same socket.
        let shared = peer.stream().expect("alive while the stream is");
        shared.writable().await.unwrap();
        assert_eq!(shared.try_write(b"direct").unwrap(), 6);
        drop(shared);
        stream.shutdown().await.unwrap();
        assert_eq!(client.await.unwrap(), b"pong direct");
        drop(stream);
        assert!(
            peer.stream().is_none(),
            "the socket is gone with its stream"
        );
    }
}
