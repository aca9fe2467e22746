//! The upgrade hand-off's connection: a unix stream socket carrying
//! length-prefixed JSON messages and, beside them, file descriptors
//! (`SCM_RIGHTS`, through rustix's safe wrappers: no `unsafe` here).
//!
//! A message is a 4-byte big-endian length and that many bytes of JSON, at
//! most [`MAX_MESSAGE_BYTES`]. Descriptors travel after a message in
//! batches of at most [`FDS_PER_BATCH`], each batch attached to a single
//! marker byte, so a plain read of a message never consumes (and the kernel
//! never discards) a batch. Every read and write has a deadline (socket
//! timeouts). Depends on nothing of the appliance.

use std::io::{IoSlice, IoSliceMut, Read as _, Write as _};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Largest message: a commit carries every pending session (a few hundred
/// bytes each, at most `viewers.max_sessions` = 10 000 000).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Descriptors per `SCM_RIGHTS` batch (the kernel's limit is 253).
pub const FDS_PER_BATCH: usize = 128;
/// Most descriptors one hand-off passes: a listener per worker (at most
/// 4096, `dataplane.workers`) and the control listener.
pub const MAX_FDS: usize = 4097;
/// The byte each descriptor batch is attached to.
const FD_MARKER: u8 = b'F';

/// Errors of the connection; which side is at fault is the caller's to say.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("message of {0} bytes is larger than {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("bad message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("expected a descriptor batch, got byte {0:#04x}")]
    NoBatch(u8),
    #[error("{0} descriptors is more than {MAX_FDS}")]
    TooManyFds(usize),
    #[error("the peer closed the connection")]
    Closed,
    #[error("timed out")]
    Timeout,
}

impl WireError {
    fn from_io(e: std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => WireError::Timeout,
            std::io::ErrorKind::UnexpectedEof => WireError::Closed,
            _ => WireError::Io(e),
        }
    }
}

/// One end of the hand-off connection.
#[derive(Debug)]
pub struct Wire {
    stream: UnixStream,
}

impl Wire {
    pub fn new(stream: UnixStream) -> Self {
        Self { stream }
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Send one message, within `timeout`.
    pub fn send<T: serde::Serialize>(
        &mut self,
        msg: &T,
        timeout: Duration,
    ) -> Result<(), WireError> {
        let body = serde_json::to_vec(msg)?;
        if body.len() > MAX_MESSAGE_BYTES {
            return Err(WireError::TooLarge(body.len()));
        }
        self.stream.set_write_timeout(Some(nonzero(timeout)))?;
        let len = u32::try_from(body.len()).map_err(|_| WireError::TooLarge(body.len()))?;
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&body);
        self.stream.write_all(&frame).map_err(WireError::from_io)
    }

    /// Receive one message, within `timeout`.
    pub fn recv<T: serde::de::DeserializeOwned>(
        &mut self,
        timeout: Duration,
    ) -> Result<T, WireError> {
        self.stream.set_read_timeout(Some(nonzero(timeout)))?;
        let mut len = [0u8; 4];
        self.stream
            .read_exact(&mut len)
            .map_err(WireError::from_io)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_MESSAGE_BYTES {
            return Err(WireError::TooLarge(len));
        }
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .map_err(WireError::from_io)?;
        Ok(serde_json::from_slice(&body)?)
    }

    /// Pass descriptors (duplicates arrive at the peer; ours stay open).
    pub fn send_fds(&mut self, fds: &[BorrowedFd<'_>], timeout: Duration) -> Result<(), WireError> {
        if fds.len() > MAX_FDS {
            return Err(WireError::TooManyFds(fds.len()));
        }
        self.stream.set_write_timeout(Some(nonzero(timeout)))?;
        for batch in fds.chunks(FDS_PER_BATCH) {
            let mut space =
                vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_BATCH))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(batch)) {
                return Err(WireError::TooManyFds(batch.len()));
            }
            let sent = rustix::net::sendmsg(
                self.stream.as_fd(),
                &[IoSlice::new(&[FD_MARKER])],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(|e| WireError::from_io(e.into()))?;
            if sent != 1 {
                return Err(WireError::Closed);
            }
        }
        Ok(())
    }

    /// Receive exactly `count` descriptors (close-on-exec), within `timeout`.
    pub fn recv_fds(&mut self, count: usize, timeout: Duration) -> Result<Vec<OwnedFd>, WireError> {
        if count > MAX_FDS {
            return Err(WireError::TooManyFds(count));
        }
        self.stream.set_read_timeout(Some(nonzero(timeout)))?;
        let mut fds = Vec::with_capacity(count);
        while fds.len() < count {
            let mut space =
                vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_BATCH))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut byte = [0u8; 1];
            let got = rustix::net::recvmsg(
                self.stream.as_fd(),
                &mut [IoSliceMut::new(&mut byte)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(|e| WireError::from_io(e.into()))?;
            if got.bytes == 0 {
                return Err(WireError::Closed);
            }
            if byte[0] != FD_MARKER {
                return Err(WireError::NoBatch(byte[0]));
            }
            for msg in control.drain() {
                if let RecvAncillaryMessage::ScmRights(batch) = msg {
                    fds.extend(batch);
                }
            }
            if fds.len() > count {
                return Err(WireError::TooManyFds(fds.len()));
            }
        }
        Ok(fds)
    }
}

/// Socket timeouts of zero mean "forever": never pass one.
fn nonzero(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Hello {
        n: u32,
        text: String,
    }

    #[test]
    fn messages_and_listeners_cross() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Wire::new(a), Wire::new(b));
        let t = Duration::from_secs(5);
        let listeners: Vec<TcpListener> = (0..FDS_PER_BATCH + 3)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|l| l.as_fd()).collect();
        let sender = std::thread::scope(|s| {
            let h = s.spawn(|| {
                a.send(
                    &Hello {
                        n: 7,
                        text: "offer".into(),
                    },
                    t,
                )
                .unwrap();
                a.send_fds(&fds, t).unwrap();
                a.send(
                    &Hello {
                        n: 8,
                        text: "after".into(),
                    },
                    t,
                )
                .unwrap();
            });
            let first: Hello = b.recv(t).unwrap();
            assert_eq!(
                first,
                Hello {
                    n: 7,
                    text: "offer".into()
                }
            );
            let got = b.recv_fds(listeners.len(), t).unwrap();
            let after: Hello = b.recv(t).unwrap();
            assert_eq!(after.n, 8);
            h.join().unwrap();
            got
        });
        // The same sockets: same local addresses, in order.
        for (l, fd) in listeners.iter().zip(sender) {
            let received = TcpListener::from(fd);
            assert_eq!(received.local_addr().unwrap(), l.local_addr().unwrap());
        }
    }

    #[test]
    fn oversized_garbage_and_silence_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut raw = a.try_clone().unwrap();
        let mut b = Wire::new(b);
        raw.write_all(&u32::MAX.to_be_bytes()).unwrap();
        assert!(matches!(
            b.recv::<Hello>(Duration::from_secs(1)),
            Err(WireError::TooLarge(_))
        ));
        raw.write_all(&3u32.to_be_bytes()).unwrap();
        raw.write_all(b"{x}").unwrap();
        assert!(matches!(
            b.recv::<Hello>(Duration::from_secs(1)),
            Err(WireError::Json(_))
        ));
        assert!(matches!(
            b.recv::<Hello>(Duration::from_millis(50)),
            Err(WireError::Timeout)
        ));
        raw.write_all(b"X").unwrap();
        assert!(matches!(
            b.recv_fds(1, Duration::from_secs(1)),
            Err(WireError::NoBatch(b'X'))
        ));
        drop(raw);
        drop(a);
        assert!(matches!(
            b.recv::<Hello>(Duration::from_secs(1)),
            Err(WireError::Closed)
        ));
    }
}
