//! splice(2) plumbing for both backends: a per-worker pool of pipes and
//! the three syscalls of a spliced downstream frame (socket → pipe, the
//! frame header with MSG_MORE, pipe → socket). The epoll backend calls them
//! on readiness events, the io_uring backend on `POLL_ADD` completions
//! (an `IORING_OP_SPLICE` is always punted to an io-wq thread); both on
//! non-blocking sockets, from the worker thread.
//!
//! What it does not do: decide when to splice or what a frame is (that is
//! the session's job, see `Session::splice_in_limit`); it only moves bytes
//! and keeps pipes bounded. A pipe is lent to one session only while bytes
//! of that session wait in it; a pipe that still holds bytes is never given
//! to another session (it is closed instead), so bytes cannot leak across
//! sessions.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One pipe: read end, write end, capacity, and the bytes it holds.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
    held: usize,
}

impl Pipe {
    /// A non-blocking pipe with (when the kernel allows) `want` bytes of
    /// capacity.
    fn new(want: usize) -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the 2-element array it is
        // given; on success we own both.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and nothing else owns them.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own, with an integer argument.
        // Refusal (EPERM over the user's pipe-user-pages-soft, EBUSY) keeps
        // the pipe's current size, read back below.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int) };
        // SAFETY: as above, F_GETPIPE_SZ takes no argument.
        let cap = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if cap <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe {
            r,
            w,
            cap: cap as usize,
            held: 0,
        })
    }

    /// Bytes the pipe can take.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Bytes in the pipe.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Move up to `len` bytes from socket `from` into the pipe.
    pub fn fill_from(&mut self, from: RawFd, len: usize) -> io::Result<usize> {
        let len = len.min(self.cap.saturating_sub(self.held));
        // SAFETY: splice between two descriptors (a socket the caller owns
        // and our pipe's write end) with no offsets; no memory is passed.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                self.w.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.held += n as usize;
        Ok(n as usize)
    }

    /// Move up to `len` held bytes from the pipe to socket `to`.
    pub fn drain_to(&mut self, to: RawFd, len: usize) -> io::Result<usize> {
        let len = len.min(self.held);
        // SAFETY: splice between our pipe's read end and a socket the caller
        // owns, no offsets; no memory is passed.
        let n = unsafe {
            libc::splice(
                self.r.as_raw_fd(),
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.held -= (n as usize).min(self.held);
        Ok(n as usize)
    }
}

/// Send `buf` on socket `fd` with MSG_MORE when `more` (the pipe's bytes
/// follow at once: the header and the payload leave in one segment rather
/// than a tiny one first), MSG_NOSIGNAL and MSG_DONTWAIT (never block the
/// worker, whatever the socket's own mode).
pub fn send(fd: RawFd, buf: &[u8], more: bool) -> io::Result<usize> {
    let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT | if more { libc::MSG_MORE } else { 0 };
    // SAFETY: buf is valid for buf.len() bytes for the duration of the call.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// splice(2) refused for these descriptors (no bytes moved): the kernel
/// or the socket type does not support it, so the worker stops splicing.
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
    )
}

/// A worker's pipes: at most `max` in all (lent plus free). Free pipes are
/// empty. Creating one costs two syscalls, so they are kept for reuse.
#[derive(Debug)]
pub struct PipePool {
    free: Vec<Pipe>,
    lent: usize,
    max: usize,
    want_bytes: usize,
    /// splice proved unusable here (e.g. a kernel that refuses it for these
    /// descriptors): every session takes the copying path.
    disabled: bool,
}

impl PipePool {
    /// `want_bytes` is clamped to /proc/sys/fs/pipe-max-size (unprivileged
    /// processes cannot go beyond it).
    pub fn new(max: usize, want_bytes: usize) -> PipePool {
        let limit = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(1024 * 1024);
        PipePool {
            free: Vec::new(),
            lent: 0,
            max,
            want_bytes: want_bytes.min(limit),
            disabled: max == 0,
        }
    }

    /// A pipe to splice into, or None when all are lent (or splicing is off):
    /// the caller takes the copying path.
    pub fn take(&mut self) -> Option<Pipe> {
        if self.disabled {
            return None;
        }
        let p = match self.free.pop() {
            Some(p) => p,
            None if self.lent < self.max => match Pipe::new(self.want_bytes) {
                Ok(p) => p,
                Err(e) => {
                    // EMFILE / ENFILE: copy for now, try again later.
                    tracing::debug!(error = %e, "no splice pipe");
                    return None;
                }
            },
            None => return None,
        };
        self.lent += 1;
        Some(p)
    }

    /// Return a lent pipe: kept when empty, closed when it still holds
    /// bytes (they belong to a session that is gone).
    pub fn give(&mut self, p: Pipe) {
        self.lent = self.lent.saturating_sub(1);
        if p.held == 0 && !self.disabled && self.free.len() + self.lent < self.max {
            self.free.push(p);
        }
    }

    /// Would [`PipePool::take`] give a pipe now (unless creating one fails)?
    /// The io_uring backend waits for a session's queue to drain, rather
    /// than copy, only when it would.
    pub fn can_lend(&self) -> bool {
        !self.disabled && (!self.free.is_empty() || self.lent < self.max)
    }

    /// Stop splicing on this worker (splice refused by the kernel).
    pub fn disable(&mut self) {
        self.disabled = true;
        self.free.clear();
    }

    pub fn lent(&self) -> usize {
        self.lent
    }

    pub fn free_len(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn pool_is_bounded_and_never_reuses_a_pipe_with_bytes() {
        let mut pool = PipePool::new(2, 256 * 1024);
        let a = pool.take().expect("first pipe");
        assert!(a.capacity() >= 4096);
        let mut b = pool.take().expect("second pipe");
        assert!(pool.take().is_none(), "bounded by max");
        assert!(!pool.can_lend());
        assert_eq!(pool.lent(), 2);
        pool.give(a);
        assert_eq!((pool.lent(), pool.free_len()), (1, 1));
        assert!(pool.can_lend());
        // A pipe that still holds bytes is closed, not kept.
        b.held = 10;
        pool.give(b);
        assert_eq!((pool.lent(), pool.free_len()), (0, 1));
        let _c = pool.take().unwrap();
        let _d = pool.take().unwrap();
        assert!(pool.take().is_none());
        pool.disable();
        assert!(!pool.can_lend());
        assert!(pool.take().is_none());
        assert!(PipePool::new(0, 4096).take().is_none(), "0 pipes: off");
    }

    #[test]
    fn capacity_is_asked_and_clamped() {
        let max: usize = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut pool = PipePool::new(1, 64 * 1024 * 1024);
        let p = pool.take().unwrap();
        assert!(
            p.capacity() <= max,
            "{} > pipe-max-size {max}",
            p.capacity()
        );
        let mut pool = PipePool::new(1, 256 * 1024);
        let p = pool.take().unwrap();
        // Root or an ample pipe-user-pages-soft here: the size is granted.
        assert_eq!(p.capacity(), (256 * 1024).min(max));
    }

    #[test]
    fn splice_socket_to_pipe_to_socket() {
        let (mut src_peer, src) = pair();
        let (dst, mut dst_peer) = pair();
        src.set_nonblocking(true).unwrap();
        dst.set_nonblocking(true).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        src_peer.write_all(&data).unwrap();
        src_peer.shutdown(std::net::Shutdown::Write).unwrap();
        let mut pool = PipePool::new(1, 64 * 1024);
        let mut p = pool.take().unwrap();
        let mut got = Vec::new();
        dst_peer
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        for _ in 0..10_000 {
            if got.len() == data.len() {
                break;
            }
            match p.fill_from(src.as_raw_fd(), 64 * 1024) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("splice in: {e}"),
            }
            assert!(p.held() <= p.capacity());
            let held = p.held();
            if held > 0 {
                let hdr = (held as u32).to_be_bytes();
                assert_eq!(send(dst.as_raw_fd(), &hdr, true).unwrap(), 4);
                let mut left = held;
                while left > 0 {
                    match p.drain_to(dst.as_raw_fd(), left) {
                        Ok(n) => left -= n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => panic!("splice out: {e}"),
                    }
                }
                let mut framed = vec![0u8; 4 + held];
                dst_peer.read_exact(&mut framed).unwrap();
                assert_eq!(&framed[..4], &hdr);
                got.extend_from_slice(&framed[4..]);
            }
        }
        assert_eq!(got, data);
        assert_eq!(p.held(), 0);
        // End of stream: splice returns 0.
        assert_eq!(p.fill_from(src.as_raw_fd(), 4096).unwrap(), 0);
        pool.give(p);
        assert_eq!(pool.free_len(), 1);
    }
}
