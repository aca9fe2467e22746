//! Servers the bench runs as *child processes* of itself
//! (`consolegate-bench relay-server | sink-server`), so that what they cost
//! can be read from /proc like any other proxy, and so that their sockets
//! count against their own open-file limit rather than the bench's.
//!
//! - `relay-server`: the plain TCP relay (`relay.rs`, two copying threads per
//!   connection), the floor the WebSocket proxies are compared against.
//! - `sink-server`: the silent backend of the memory and handshake
//!   benchmarks, one thread on mio. It accepts and holds connections, never
//!   speaks first, and echoes whatever a client sends (the memory benchmark's
//!   liveness probe goes through the proxy and back). Each connection's
//!   pending echo is bounded; a peer that sends more than that without
//!   reading is disconnected.
//!
//! Both print `listening on <addr>` on stdout when ready, run until SIGTERM
//! or SIGINT, until their parent dies (PR_SET_PDEATHSIG), or until
//! `--max-lifetime-s`, whichever comes first.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

/// Largest echo a sink connection buffers while its peer is not reading.
const MAX_PENDING_ECHO: usize = 1 << 20;
/// Accepted connections held at most (above any fd limit we expect).
const MAX_SINK_CONNS: usize = 1 << 20;
const LISTENER: Token = Token(usize::MAX - 1);
const TICK: Duration = Duration::from_millis(100);

/// Dies with the bench: a crashed or killed bench leaves no server behind.
fn die_with_parent() {
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM));
}

fn stop_flag() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(SIGINT, stop.clone())?;
    signal_hook::flag::register(SIGTERM, stop.clone())?;
    Ok(stop)
}

fn announce(addr: SocketAddr) -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "listening on {addr}")?;
    out.flush()?;
    Ok(())
}

pub fn relay_server(backend: SocketAddr, max_lifetime: Duration) -> Result<()> {
    die_with_parent();
    let stop = stop_flag()?;
    let mut relay =
        crate::relay::start(backend, Duration::from_secs(5)).context("starting the relay")?;
    announce(relay.addr())?;
    let deadline = Instant::now() + max_lifetime;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(TICK);
    }
    relay.stop();
    Ok(())
}

struct Conn {
    stream: TcpStream,
    pending: Vec<u8>,
}

pub fn sink_server(max_lifetime: Duration) -> Result<()> {
    die_with_parent();
    let stop = stop_flag()?;
    let mut poll = Poll::new()?;
    let mut listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    announce(listener.local_addr()?)?;

    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + max_lifetime;
    let mut accept_errors = 0u64;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        match poll.poll(&mut events, Some(TICK)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                // Edge-triggered: accept until the queue is empty.
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            if conns.len() - free.len() >= MAX_SINK_CONNS {
                                continue; // dropped: closed
                            }
                            let idx = free.pop().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            if poll
                                .registry()
                                .register(&mut stream, Token(idx), Interest::READABLE)
                                .is_ok()
                            {
                                conns[idx] = Some(Conn {
                                    stream,
                                    pending: Vec::new(),
                                });
                            } else {
                                free.push(idx);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            // EMFILE and friends: report once in a while, and
                            // leave the rest of the queue for the next turn.
                            accept_errors += 1;
                            if accept_errors.is_power_of_two() {
                                eprintln!("sink-server: accept: {e} ({accept_errors} errors)");
                            }
                            break;
                        }
                    }
                }
                continue;
            }
            let idx = ev.token().0;
            let Some(Some(conn)) = conns.get_mut(idx) else {
                continue;
            };
            if serve(conn, &mut buf).is_err() {
                if let Some(mut c) = conns[idx].take() {
                    let _ = poll.registry().deregister(&mut c.stream);
                }
                free.push(idx);
            } else {
                let interest = if conn.pending.is_empty() {
                    Interest::READABLE
                } else {
                    Interest::READABLE | Interest::WRITABLE
                };
                let _ = poll
                    .registry()
                    .reregister(&mut conn.stream, Token(idx), interest);
            }
        }
    }
    Ok(())
}

/// Reads what is there and echoes it. `Err` means: close this connection.
fn serve(conn: &mut Conn, buf: &mut [u8]) -> io::Result<()> {
    flush(conn)?;
    // Bounded: each read either fills the pending echo or drains the socket.
    loop {
        match conn.stream.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                if conn.pending.len() + n > MAX_PENDING_ECHO {
                    return Err(io::Error::other("peer does not read its echo"));
                }
                conn.pending.extend_from_slice(&buf[..n]);
                flush(conn)?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn flush(conn: &mut Conn) -> io::Result<()> {
    while !conn.pending.is_empty() {
        match conn.stream.write(&conn.pending) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                conn.pending.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    if conn.pending.capacity() > 4096 {
        conn.pending = Vec::new();
    }
    Ok(())
}
