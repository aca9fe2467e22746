//! The soak's steady relays: each on its own thread, a session to the echo
//! backend created through the REST API, then one round trip every
//! `1 / rate` seconds until the deadline, each timed into the interval's
//! histogram. A failed session is an unexpected error; the thread opens a
//! new one after a pause. Starts are spread over one period so the round
//! trips do not all fall on the same instant.

use std::sync::atomic::Ordering;
use std::thread::Scope;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{churn, sleep_until, Shared, SoakConfig};
use crate::client::{Session, Transport};
use crate::rest::{self, RestClient};

/// Pause before reopening a failed steady session.
const REOPEN_PAUSE: Duration = Duration::from_secs(1);
/// Stack of a steady thread.
const STACK_BYTES: usize = 256 * 1024;
/// The user the steady sessions belong to.
const USER: &str = "soak-steady";

/// Starts one thread per steady session in `scope`.
pub(super) fn spawn<'scope>(
    scope: &'scope Scope<'scope, '_>,
    shared: &'scope Shared,
    cfg: &SoakConfig,
) -> Result<()> {
    let period = Duration::from_secs_f64(1.0 / cfg.steady_round_trips_per_s);
    // Round trips a thread may make, at most: its share of the run.
    let max_ticks = (cfg.duration_s as f64 * cfg.steady_round_trips_per_s).ceil() as u64 + 1;
    let n = cfg.steady_sessions.max(1) as u32;
    for index in 0..cfg.steady_sessions {
        let offset = period * index as u32 / n;
        std::thread::Builder::new()
            .name(format!("soak-steady-{index}"))
            .stack_size(STACK_BYTES)
            .spawn_scoped(scope, move || {
                run(shared, index as u16, period, offset, max_ticks)
            })
            .with_context(|| format!("spawning steady session thread {index}"))?;
    }
    Ok(())
}

/// Creates an echo session and connects to it.
fn open(shared: &Shared, rest: &mut RestClient, id: u16) -> Result<Session, String> {
    let created = churn::create(shared, rest, &churn::echo_body(shared, USER, false, None))?;
    let (addr, path) = rest::parse_ws_url(&created.ws_url)?;
    let transport = Transport::WebSocket {
        path,
        subprotocol: None,
    };
    Session::connect(
        addr,
        &transport,
        shared.message_bytes,
        id,
        shared.io_timeout,
    )
    .map_err(|e| format!("connect: {e}"))
}

fn run(shared: &Shared, id: u16, period: Duration, offset: Duration, max_ticks: u64) {
    let mut rest = shared.rest();
    let mut session: Option<Session> = None;
    let mut next = Instant::now() + offset;
    for _ in 0..max_ticks {
        if !sleep_until(shared, next) {
            break;
        }
        // A late tick is not made up for: the rate stays bounded.
        next = (next + period).max(Instant::now());
        let s = match session.as_mut() {
            Some(s) => s,
            None => match open(shared, &mut rest, id) {
                Ok(s) => {
                    shared.steady_opens.fetch_add(1, Ordering::Relaxed);
                    session.insert(s)
                }
                Err(e) => {
                    shared.error(&format!("steady open: {e}"));
                    next = Instant::now() + REOPEN_PAUSE;
                    continue;
                }
            },
        };
        match s.round_trip() {
            Ok(rtt) => {
                Shared::record(&shared.relay, rtt);
                shared.steady_round_trips.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                shared.error(&format!("steady round trip: {e}"));
                session = None;
                next = Instant::now() + REOPEN_PAUSE;
            }
        }
    }
    if let Some(mut s) = session {
        let _ = s.send_close(1000);
    }
}
