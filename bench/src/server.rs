//! A small blocking thread-per-connection TCP server on 127.0.0.1 with a clean
//! stop: the bench's echo backend and its plain relay are both built on it.
//!
//! Stopping wakes the accept loop, shuts down every tracked socket (so blocked
//! reads and writes return at once) and joins every thread, so nothing is left
//! running between proxies or after the run. It is not meant to be fast at
//! accepting; only the per-connection byte path matters to the measurements.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Sockets that must be shut down when the server stops.
#[derive(Clone, Default)]
pub struct Tracker {
    inner: Arc<Mutex<TrackerInner>>,
}

#[derive(Default)]
struct TrackerInner {
    next_id: u64,
    closed: bool,
    streams: HashMap<u64, TcpStream>,
}

/// Removes its socket from the tracker when dropped.
pub struct Tracked {
    tracker: Tracker,
    id: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.tracker.lock().streams.remove(&self.id);
    }
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, TrackerInner> {
        // A panicking handler must not stop the others from cleaning up.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks `stream` until the returned guard drops. Fails (and shuts the
    /// stream down) when the server is already stopping.
    pub fn track(&self, stream: &TcpStream) -> io::Result<Tracked> {
        let clone = stream.try_clone()?;
        let mut inner = self.lock();
        if inner.closed {
            let _ = stream.shutdown(Shutdown::Both);
            return Err(io::Error::other("server stopping"));
        }
        inner.next_id += 1;
        let id = inner.next_id;
        inner.streams.insert(id, clone);
        Ok(Tracked {
            tracker: self.clone(),
            id,
        })
    }

    fn shutdown_all(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        for s in inner.streams.values() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

pub struct ThreadServer {
    name: String,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    tracker: Tracker,
    accept: Option<JoinHandle<Vec<JoinHandle<()>>>>,
}

impl ThreadServer {
    /// Binds 127.0.0.1 on an ephemeral port and serves each connection with
    /// `handler` on its own thread, at most `max_conns` at a time (extra
    /// connections are closed at once).
    pub fn start<H>(name: &str, max_conns: usize, handler: H) -> io::Result<ThreadServer>
    where
        H: Fn(TcpStream, &Tracker) -> io::Result<()> + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let tracker = Tracker::default();
        let handler = Arc::new(handler);
        let active = Arc::new(AtomicUsize::new(0));
        let (stop2, tracker2, name2) = (stop.clone(), tracker.clone(), name.to_string());
        let accept = std::thread::Builder::new()
            .name(format!("{name}-accept"))
            .spawn(move || {
                let mut workers: Vec<JoinHandle<()>> = Vec::new();
                for conn in listener.incoming() {
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = conn else { continue };
                    workers.retain(|w| !w.is_finished());
                    if active.load(Ordering::SeqCst) >= max_conns {
                        continue; // dropped: closed
                    }
                    let Ok(guard) = tracker2.track(&stream) else {
                        continue;
                    };
                    active.fetch_add(1, Ordering::SeqCst);
                    let (h, t, a) = (handler.clone(), tracker2.clone(), active.clone());
                    let spawned = std::thread::Builder::new()
                        .name(format!("{name2}-conn"))
                        .spawn(move || {
                            let _ = h(stream, &t);
                            drop(guard);
                            a.fetch_sub(1, Ordering::SeqCst);
                        });
                    if let Ok(w) = spawned {
                        workers.push(w);
                    } else {
                        active.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                workers
            })?;
        Ok(ThreadServer {
            name: name.to_string(),
            addr,
            stop,
            tracker,
            accept: Some(accept),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes every connection and joins every thread.
    pub fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept; it sees the flag and returns.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let workers = accept.join().unwrap_or_default();
        self.tracker.shutdown_all();
        for w in workers {
            if w.join().is_err() {
                eprintln!("{}: a connection thread panicked", self.name);
            }
        }
    }
}

impl Drop for ThreadServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Copies `from` → `to` until EOF or error, then half-closes `to` so the far
/// side sees the EOF too.
pub fn pump(mut from: &TcpStream, mut to: &TcpStream, buf: &mut [u8]) -> io::Result<u64> {
    let mut total = 0u64;
    let result = loop {
        match from.read(buf) {
            Ok(0) => break Ok(total),
            Ok(n) => {
                if let Err(e) = to.write_all(&buf[..n]) {
                    break Err(e);
                }
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        }
    };
    let _ = to.shutdown(Shutdown::Write);
    result
}
