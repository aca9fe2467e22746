//! Simulated TCP legs: a bounded byte stream each way between a session's
//! IO layer and its peer (browser or backend), with FIN and reset. No
//! sockets, no clock: the world moves bytes when it decides to.

use std::collections::VecDeque;
use std::io;

/// What a read by the session's IO layer found.
#[derive(Debug)]
pub enum SockRead {
    Data(usize),
    Eof,
    WouldBlock,
    Failed(io::Error),
}

/// What a write by the session's IO layer did.
#[derive(Debug)]
pub enum SockWrite {
    Wrote(usize),
    WouldBlock,
    Failed(io::Error),
}

/// One leg of a connection as its two ends see it.
#[derive(Debug)]
pub struct Link {
    /// Peer → session bytes, not yet read by the session's IO layer.
    to_session: VecDeque<u8>,
    /// Session → peer bytes, not yet read by the peer (the send buffer and
    /// the peer's receive buffer together).
    to_peer: VecDeque<u8>,
    cap_to_session: usize,
    cap_to_peer: usize,
    /// The peer shut its sending side: EOF after `to_session`'s bytes.
    pub peer_fin: bool,
    /// The peer reset the connection: the session's reads and writes fail,
    /// whatever was buffered is lost.
    pub peer_reset: bool,
    /// The session's side was closed: the peer reads EOF after `to_peer`.
    pub session_closed: bool,
}

impl Link {
    pub fn new(cap_to_session: usize, cap_to_peer: usize) -> Self {
        Self {
            to_session: VecDeque::new(),
            to_peer: VecDeque::new(),
            cap_to_session: cap_to_session.max(1),
            cap_to_peer: cap_to_peer.max(1),
            peer_fin: false,
            peer_reset: false,
            session_closed: false,
        }
    }

    // ---- the session's IO layer -------------------------------------------

    /// Would a read return something other than WouldBlock?
    pub fn session_readable(&self) -> bool {
        self.peer_reset || !self.to_session.is_empty() || self.peer_fin
    }

    /// Bytes the peer sent that the session has not read yet.
    pub fn session_available(&self) -> usize {
        self.to_session.len()
    }

    /// Read into `out` (its length is the read's size).
    pub fn session_read(&mut self, out: &mut [u8]) -> SockRead {
        if self.peer_reset {
            return SockRead::Failed(io::Error::from(io::ErrorKind::ConnectionReset));
        }
        if self.to_session.is_empty() {
            return if self.peer_fin || self.session_closed {
                SockRead::Eof
            } else {
                SockRead::WouldBlock
            };
        }
        let n = out.len().min(self.to_session.len());
        for (slot, b) in out.iter_mut().zip(self.to_session.drain(..n)) {
            *slot = b;
        }
        SockRead::Data(n)
    }

    /// Room for the session's writes now.
    pub fn session_room(&self) -> usize {
        self.cap_to_peer.saturating_sub(self.to_peer.len())
    }

    /// Write at most `max` bytes of `data` (a short write when the buffer
    /// is nearly full or `max` says so).
    pub fn session_write(&mut self, data: &[u8], max: usize) -> SockWrite {
        if self.peer_reset || self.session_closed {
            return SockWrite::Failed(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        let n = data.len().min(max).min(self.session_room());
        if n == 0 {
            return SockWrite::WouldBlock;
        }
        self.to_peer.extend(&data[..n]);
        SockWrite::Wrote(n)
    }

    /// The session's IO layer closed the socket.
    pub fn session_close(&mut self) {
        self.session_closed = true;
    }

    // ---- the peer -----------------------------------------------------------

    pub fn peer_room(&self) -> usize {
        self.cap_to_session.saturating_sub(self.to_session.len())
    }

    /// Write what fits of `data`; returns how much was taken. Bytes written
    /// to a closed connection vanish (the peer's kernel would reset).
    pub fn peer_write(&mut self, data: &[u8]) -> usize {
        if self.session_closed || self.peer_reset || self.peer_fin {
            return data.len();
        }
        let n = data.len().min(self.peer_room());
        self.to_session.extend(&data[..n]);
        n
    }

    /// Take up to `max` bytes the session wrote.
    pub fn peer_read(&mut self, max: usize) -> Vec<u8> {
        let n = max.min(self.to_peer.len());
        self.to_peer.drain(..n).collect()
    }

    /// The session closed and the peer read everything it wrote.
    pub fn peer_sees_eof(&self) -> bool {
        self.session_closed && self.to_peer.is_empty()
    }

    /// Bytes in flight either way (for the world's progress mark).
    pub fn buffered(&self) -> usize {
        self.to_session.len() + self.to_peer.len()
    }

    /// Flip the last byte the session wrote (the self-test's corruption).
    pub fn corrupt_last_byte(&mut self) {
        if let Some(b) = self.to_peer.back_mut() {
            *b ^= 0x5a;
        }
    }

    /// The peer resets the connection: buffered bytes both ways are lost.
    pub fn peer_resets(&mut self) {
        self.peer_reset = true;
        self.to_session.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_flow_in_order_with_short_writes_fin_and_reset() {
        let mut l = Link::new(8, 4);
        assert_eq!(l.peer_write(b"0123456789"), 8);
        let mut buf = [0u8; 5];
        assert!(matches!(l.session_read(&mut buf), SockRead::Data(5)));
        assert_eq!(&buf, b"01234");
        assert!(matches!(
            l.session_write(b"abcdef", 99),
            SockWrite::Wrote(4)
        ));
        assert!(matches!(l.session_write(b"x", 99), SockWrite::WouldBlock));
        assert_eq!(l.peer_read(2), b"ab");
        l.peer_fin = true;
        assert!(matches!(l.session_read(&mut buf), SockRead::Data(3)));
        assert!(matches!(l.session_read(&mut buf), SockRead::Eof));
        l.peer_resets();
        assert!(matches!(l.session_read(&mut buf), SockRead::Failed(_)));
        assert!(matches!(l.session_write(b"y", 1), SockWrite::Failed(_)));
    }
}
