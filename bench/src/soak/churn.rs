//! The soak's churn: short session lives through the REST API at a bounded
//! rate, so every lifecycle path of the appliance runs all the time.
//!
//! A pacer hands out numbered slots, slot i due at `i / rate` seconds; a
//! few threads take the next slot, wait for its time and run the operation
//! [`PATTERN`] gives it. A slow operation delays only its thread (the
//! others take the following slots), so the rate holds while the machine
//! keeps up and the concurrency never exceeds the thread count.
//!
//! The operations, and what each expects (anything else is an unexpected
//! error):
//!
//! - `demo-shared`, `demo-dedicated`: create a demo-console session, open
//!   it, read the relayed RFB greeting, close (`session_start::sample`);
//! - `echo-shared`, `echo-dedicated`: create an echo session, open it, a few
//!   verified round trips, close; a shared one's ticket is kept for replays;
//! - `revoke-live`: create, open, a round trip, `DELETE` it → 200, then the
//!   server's close frame with code 1008;
//! - `expire-shared`, `expire-dedicated`: create with `ttl_s = 1` and never
//!   connect;
//! - `probe-expired`: a session left to expire, once past its TTL: on the
//!   shared port its ticket is refused with 410; a dedicated one's record
//!   says `expired`. With none due, an unknown session id → 404;
//! - `bad-ticket`: a recent session's id with a wrong ticket → 403;
//! - `replay`: a used ticket again → 403.

use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::Scope;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{sleep_until, Shared, SoakConfig};
use crate::client::{self, ClientError, Session, Transport};
use crate::rest::{self, CreatedSession, RestClient};
use crate::session_start::{self, PortMode};

/// Verified round trips of an echo session before it closes.
const ECHO_ROUND_TRIPS: usize = 3;
/// How long a deleted session may take to close its relay.
const REVOKE_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Ticket lifetime of the sessions left to expire, s (the API's minimum).
const EXPIRING_TTL_S: u64 = 1;
/// When a session left to expire is probed: its TTL, the sweeper's 500 ms
/// period, and a margin.
const EXPIRY_PROBE_AFTER: Duration = Duration::from_millis(2_500);
/// Sessions left to expire waiting for their probe, at most (the oldest
/// are dropped unprobed beyond).
const MAX_EXPIRING: usize = 1024;
/// Used tickets kept for replays and bad tickets, at most, and how old
/// they may be: a worker answers for a finished admission for two minutes
/// (`TOMBSTONE_MS`), so well inside that the answer must be 403.
const MAX_USED: usize = 64;
const USED_MAX_AGE: Duration = Duration::from_secs(30);
/// Stack of a churn thread.
const STACK_BYTES: usize = 256 * 1024;
/// The user the churned sessions belong to.
const USER: &str = "soak-churn";

/// A churn operation (see the module doc); `--churn-kinds` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    DemoShared,
    DemoDedicated,
    EchoShared,
    EchoDedicated,
    RevokeLive,
    ExpireShared,
    ExpireDedicated,
    ProbeExpired,
    BadTicket,
    Replay,
}

/// Every kind, in the order of the counters.
pub const KINDS: [Kind; 10] = [
    Kind::DemoShared,
    Kind::DemoDedicated,
    Kind::EchoShared,
    Kind::EchoDedicated,
    Kind::RevokeLive,
    Kind::ExpireShared,
    Kind::ExpireDedicated,
    Kind::ProbeExpired,
    Kind::BadTicket,
    Kind::Replay,
];

/// The operation of slot i is `PATTERN[i % 12]`: eight session lives
/// (three on dedicated ports, two left to expire) and four refused
/// connects per twelve slots; two probes per two expiries, so the probes
/// keep up.
pub const PATTERN: [Kind; 12] = [
    Kind::DemoShared,
    Kind::EchoShared,
    Kind::ExpireShared,
    Kind::DemoDedicated,
    Kind::RevokeLive,
    Kind::BadTicket,
    Kind::EchoShared,
    Kind::ExpireDedicated,
    Kind::Replay,
    Kind::ProbeExpired,
    Kind::EchoDedicated,
    Kind::ProbeExpired,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::DemoShared => "demo-shared",
            Kind::DemoDedicated => "demo-dedicated",
            Kind::EchoShared => "echo-shared",
            Kind::EchoDedicated => "echo-dedicated",
            Kind::RevokeLive => "revoke-live",
            Kind::ExpireShared => "expire-shared",
            Kind::ExpireDedicated => "expire-dedicated",
            Kind::ProbeExpired => "probe-expired",
            Kind::BadTicket => "bad-ticket",
            Kind::Replay => "replay",
        }
    }

    fn index(self) -> usize {
        KINDS.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// A session left to expire.
pub(super) struct Expiring {
    id: String,
    ws_url: String,
    dedicated: bool,
    created: Instant,
}

/// What a successful operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Closed,
    Revoked,
    LeftToExpire,
    Refused(u16),
    /// A session left to expire was found expired (and its connect refused
    /// with this status, on the shared port).
    ExpiryConfirmed(Option<u16>),
}

/// `POST /api/v1/sessions` → 201 with its body parsed; counted.
pub(super) fn create(
    shared: &Shared,
    rest: &mut RestClient,
    body: &str,
) -> Result<CreatedSession, String> {
    let resp = rest
        .post_json("/api/v1/sessions", body)
        .map_err(|e| format!("api: {e}"))?;
    if resp.status != 201 {
        let what = rest::error_code(&resp.body).unwrap_or_else(|| resp.body_excerpt());
        return Err(format!("api: HTTP {} {what}", resp.status));
    }
    shared.created.fetch_add(1, Ordering::Relaxed);
    serde_json::from_slice(&resp.body).map_err(|e| format!("api: bad 201 body: {e}"))
}

/// The creation body of a session to the echo backend.
pub(super) fn echo_body(
    shared: &Shared,
    user: &str,
    dedicated: bool,
    ttl_s: Option<u64>,
) -> String {
    let mut body = format!(
        r#"{{"target":{{"kind":"vnc","host":"{}","port":{}}},"user":"{user}""#,
        shared.echo.ip(),
        shared.echo.port()
    );
    if dedicated {
        body.push_str(r#","port_mode":"dedicated""#);
    }
    if let Some(t) = ttl_s {
        body.push_str(&format!(r#","ttl_s":{t}"#));
    }
    body.push('}');
    body
}

/// The HTTP status of a refused upgrade.
pub(super) fn refused_status(e: &ClientError) -> Option<u16> {
    let ClientError::Handshake(m) = e else {
        return None;
    };
    m.strip_prefix("upgrade refused: HTTP ")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `ws_url` with its ticket changed (one character: same length, same
/// alphabet).
pub(super) fn tampered(ws_url: &str) -> Option<String> {
    let at = ws_url.find("token=")? + "token=".len();
    let last = ws_url.len().checked_sub(1).filter(|l| *l >= at)?;
    let swapped = if ws_url.as_bytes()[last] == b'A' {
        'B'
    } else {
        'A'
    };
    Some(format!("{}{swapped}", &ws_url[..last]))
}

fn websocket(path: String) -> Transport {
    Transport::WebSocket {
        path,
        subprotocol: None,
    }
}

/// Connects to `ws_url` and expects the upgrade refused with `status`.
fn expect_refusal(shared: &Shared, ws_url: &str, status: u16, salt: u64) -> Result<u16, String> {
    let (addr, path) = rest::parse_ws_url(ws_url)?;
    match client::open_stream(addr, &websocket(path), shared.io_timeout, salt) {
        Ok(_) => Err(format!("upgraded (101) where HTTP {status} was expected")),
        Err(e) if refused_status(&e) == Some(status) => Ok(status),
        Err(e) => Err(format!("expected HTTP {status}, got: {e}")),
    }
}

/// The newest used ticket young enough to be answered 403, taken out of
/// the list or left in it.
fn used_ticket(shared: &Shared, take: bool) -> Option<String> {
    let mut used = shared.used.lock().unwrap_or_else(|p| p.into_inner());
    while used
        .front()
        .is_some_and(|(at, _)| at.elapsed() > USED_MAX_AGE)
    {
        used.pop_front();
    }
    if take {
        used.pop_back().map(|(_, u)| u)
    } else {
        used.back().map(|(_, u)| u.clone())
    }
}

fn demo(
    shared: &Shared,
    rest: &mut RestClient,
    mode: PortMode,
    slot: u64,
) -> Result<Outcome, String> {
    let mask = client::mask_source(slot)();
    match session_start::sample(rest, shared.console, mode, shared.io_timeout, slot, mask) {
        Ok((timings, _greeting)) => {
            shared.created.fetch_add(1, Ordering::Relaxed);
            Shared::record(&shared.open, timings.total);
            Ok(Outcome::Closed)
        }
        Err(e) => {
            if !e.starts_with("api:") {
                shared.created.fetch_add(1, Ordering::Relaxed);
            }
            Err(e)
        }
    }
}

/// Creates an echo session and connects to it (checking the port mode).
fn open_echo(
    shared: &Shared,
    rest: &mut RestClient,
    dedicated: bool,
    slot: u64,
) -> Result<(CreatedSession, Session), String> {
    let created = create(shared, rest, &echo_body(shared, USER, dedicated, None))?;
    let (addr, path) = rest::parse_ws_url(&created.ws_url)?;
    if dedicated != created.port.is_some() || (!dedicated && addr != shared.console) {
        return Err(format!(
            "api: session {} came back with port {:?}, ws_url {addr}",
            created.session_id, created.port
        ));
    }
    let s = Session::connect(
        addr,
        &websocket(path),
        shared.message_bytes,
        slot as u16,
        shared.io_timeout,
    )
    .map_err(|e| format!("connect: {e}"))?;
    Ok((created, s))
}

fn echo(
    shared: &Shared,
    rest: &mut RestClient,
    dedicated: bool,
    slot: u64,
) -> Result<Outcome, String> {
    let (created, mut s) = open_echo(shared, rest, dedicated, slot)?;
    for _ in 0..ECHO_ROUND_TRIPS {
        s.round_trip().map_err(|e| format!("round trip: {e}"))?;
    }
    s.send_close(1000).map_err(|e| format!("close: {e}"))?;
    drop(s);
    if !dedicated {
        let mut used = shared.used.lock().unwrap_or_else(|p| p.into_inner());
        if used.len() >= MAX_USED {
            used.pop_front();
        }
        used.push_back((Instant::now(), created.ws_url));
    }
    Ok(Outcome::Closed)
}

fn revoke(shared: &Shared, rest: &mut RestClient, slot: u64) -> Result<Outcome, String> {
    let (created, mut s) = open_echo(shared, rest, false, slot)?;
    s.round_trip().map_err(|e| format!("round trip: {e}"))?;
    let resp = rest
        .delete(&format!("/api/v1/sessions/{}", created.session_id))
        .map_err(|e| format!("delete: {e}"))?;
    if resp.status != 200 {
        return Err(format!(
            "delete: HTTP {} {}",
            resp.status,
            rest::error_code(&resp.body).unwrap_or_default()
        ));
    }
    match s.await_close(REVOKE_CLOSE_TIMEOUT) {
        Ok(1008) => Ok(Outcome::Revoked),
        Ok(code) => Err(format!("deleted session closed with {code}, not 1008")),
        Err(e) => Err(format!("deleted session: {e}")),
    }
}

fn expire(shared: &Shared, rest: &mut RestClient, dedicated: bool) -> Result<Outcome, String> {
    let body = echo_body(shared, USER, dedicated, Some(EXPIRING_TTL_S));
    let created = create(shared, rest, &body)?;
    let mut q = shared.expiring.lock().unwrap_or_else(|p| p.into_inner());
    if q.len() >= MAX_EXPIRING {
        q.pop_front();
    }
    q.push_back(Expiring {
        id: created.session_id,
        ws_url: created.ws_url,
        dedicated,
        created: Instant::now(),
    });
    Ok(Outcome::LeftToExpire)
}

/// A made-up session id: the appliance answers 404.
fn unknown(shared: &Shared, slot: u64) -> Result<Outcome, String> {
    let id = slot.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let url = format!("ws://{}/proxy/{id:016x}?token=soak", shared.console);
    expect_refusal(shared, &url, 404, slot).map(Outcome::Refused)
}

fn probe_expired(shared: &Shared, rest: &mut RestClient, slot: u64) -> Result<Outcome, String> {
    let due = {
        let mut q = shared.expiring.lock().unwrap_or_else(|p| p.into_inner());
        match q.front() {
            Some(e) if e.created.elapsed() >= EXPIRY_PROBE_AFTER => q.pop_front(),
            _ => None,
        }
    };
    let Some(e) = due else {
        return unknown(shared, slot);
    };
    if !e.dedicated {
        return expect_refusal(shared, &e.ws_url, 410, slot)
            .map(|s| Outcome::ExpiryConfirmed(Some(s)));
    }
    let resp = rest
        .get(&format!("/api/v1/sessions/{}", e.id))
        .map_err(|err| format!("get: {err}"))?;
    let state = serde_json::from_slice::<serde_json::Value>(&resp.body)
        .ok()
        .and_then(|v| v.get("state").and_then(|s| s.as_str()).map(str::to_string));
    match (resp.status, state.as_deref()) {
        (200, Some("expired")) => Ok(Outcome::ExpiryConfirmed(None)),
        (status, state) => Err(format!(
            "dedicated session {} {:.1} s after creation: HTTP {status}, state {state:?}",
            e.id,
            e.created.elapsed().as_secs_f64()
        )),
    }
}

fn run_op(
    shared: &Shared,
    rest: &mut RestClient,
    kind: Kind,
    slot: u64,
) -> Result<Outcome, String> {
    match kind {
        Kind::DemoShared => demo(shared, rest, PortMode::Shared, slot),
        Kind::DemoDedicated => demo(shared, rest, PortMode::Dedicated, slot),
        Kind::EchoShared => echo(shared, rest, false, slot),
        Kind::EchoDedicated => echo(shared, rest, true, slot),
        Kind::RevokeLive => revoke(shared, rest, slot),
        Kind::ExpireShared => expire(shared, rest, false),
        Kind::ExpireDedicated => expire(shared, rest, true),
        Kind::ProbeExpired => probe_expired(shared, rest, slot),
        Kind::BadTicket => match used_ticket(shared, false).and_then(|u| tampered(&u)) {
            Some(url) => expect_refusal(shared, &url, 403, slot).map(Outcome::Refused),
            None => unknown(shared, slot),
        },
        Kind::Replay => match used_ticket(shared, true) {
            Some(url) => expect_refusal(shared, &url, 403, slot).map(Outcome::Refused),
            None => unknown(shared, slot),
        },
    }
}

fn account(shared: &Shared, kind: Kind, result: Result<Outcome, String>) {
    let counts = &shared.by_kind[kind.index()];
    let refused = |status: u16| match status {
        403 => shared.refused_403.fetch_add(1, Ordering::Relaxed),
        404 => shared.refused_404.fetch_add(1, Ordering::Relaxed),
        _ => shared.refused_410.fetch_add(1, Ordering::Relaxed),
    };
    match result {
        Ok(o) => {
            counts.ok.fetch_add(1, Ordering::Relaxed);
            match o {
                Outcome::Closed => shared.closed.fetch_add(1, Ordering::Relaxed),
                Outcome::Revoked => shared.revoked.fetch_add(1, Ordering::Relaxed),
                Outcome::LeftToExpire => shared.expiring_created.fetch_add(1, Ordering::Relaxed),
                Outcome::Refused(status) => refused(status),
                Outcome::ExpiryConfirmed(status) => {
                    if let Some(s) = status {
                        refused(s);
                    }
                    shared.expired_confirmed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        Err(e) => {
            counts.failed.fetch_add(1, Ordering::Relaxed);
            shared.error(&format!("{}: {e}", kind.name()));
        }
    }
    shared.churn_ops.fetch_add(1, Ordering::Relaxed);
}

/// Hands out the slots.
pub(super) struct Pacer {
    next: AtomicU64,
    start: Instant,
    per_s: f64,
    max_slots: u64,
    /// [`PATTERN`] without the kinds left out (never empty).
    pattern: Vec<Kind>,
}

/// [`PATTERN`] keeping only `kinds`, in its order.
pub fn pattern_of(kinds: &[Kind]) -> Vec<Kind> {
    PATTERN
        .iter()
        .copied()
        .filter(|k| kinds.contains(k))
        .collect()
}

impl Pacer {
    /// Slots from `start` at the configured rate, as many as the run holds.
    pub(super) fn new(start: Instant, cfg: &SoakConfig) -> Pacer {
        let mut pattern = pattern_of(&cfg.churn_kinds);
        if pattern.is_empty() {
            pattern = PATTERN.to_vec();
        }
        Pacer {
            next: AtomicU64::new(0),
            start,
            per_s: cfg.churn_per_s,
            max_slots: (cfg.duration_s as f64 * cfg.churn_per_s).ceil() as u64,
            pattern,
        }
    }

    /// The next slot, its due time and its operation; `None` when the run
    /// has no more.
    fn take(&self) -> Option<(u64, Instant, Kind)> {
        let slot = self.next.fetch_add(1, Ordering::Relaxed);
        let kind = self.pattern[(slot % self.pattern.len() as u64) as usize];
        (slot < self.max_slots).then(|| {
            (
                slot,
                self.start + Duration::from_secs_f64(slot as f64 / self.per_s),
                kind,
            )
        })
    }
}

fn run_thread(shared: &Shared, pacer: &Pacer) {
    let mut rest = shared.rest();
    while let Some((slot, due, kind)) = pacer.take() {
        if !sleep_until(shared, due) {
            break;
        }
        let result = run_op(shared, &mut rest, kind, slot);
        // An operation cut short by the end of the run is not an error.
        if result.is_err() && shared.ended() {
            break;
        }
        account(shared, kind, result);
    }
}

/// Starts the churn threads in `scope`.
pub(super) fn spawn<'scope>(
    scope: &'scope Scope<'scope, '_>,
    shared: &'scope Shared,
    pacer: &'scope Pacer,
    threads: usize,
) -> Result<()> {
    for index in 0..threads {
        std::thread::Builder::new()
            .name(format!("soak-churn-{index}"))
            .stack_size(STACK_BYTES)
            .spawn_scoped(scope, move || run_thread(shared, pacer))
            .with_context(|| format!("spawning churn thread {index}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_covers_every_kind_and_probes_keep_up() {
        for k in KINDS {
            assert!(PATTERN.contains(&k), "{} never runs", k.name());
        }
        let count = |k: Kind| PATTERN.iter().filter(|p| **p == k).count();
        assert_eq!(
            count(Kind::ProbeExpired),
            count(Kind::ExpireShared) + count(Kind::ExpireDedicated)
        );
        let names: std::collections::HashSet<&str> = KINDS.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), KINDS.len());
        assert_eq!(Kind::Replay.index(), KINDS.len() - 1);
    }

    #[test]
    fn refusals_are_read_from_the_upgrade_error() {
        let e = ClientError::Handshake("upgrade refused: HTTP 410 Gone".into());
        assert_eq!(refused_status(&e), Some(410));
        let e = ClientError::Handshake("wrong Sec-WebSocket-Accept".into());
        assert_eq!(refused_status(&e), None);
        assert_eq!(refused_status(&ClientError::Closed("x".into())), None);
    }

    #[test]
    fn tampering_changes_one_ticket_character() {
        let url = "ws://127.0.0.1:1/proxy/00ab?token=xyzA";
        assert_eq!(
            tampered(url).unwrap(),
            "ws://127.0.0.1:1/proxy/00ab?token=xyzB"
        );
        assert_eq!(
            tampered("ws://h/proxy/1?token=q").unwrap(),
            "ws://h/proxy/1?token=A"
        );
        assert_eq!(tampered("ws://h/proxy/1?token="), None);
        assert_eq!(tampered("ws://h/proxy/1"), None);
    }

    #[test]
    fn pacer_spaces_slots_follows_its_pattern_and_stops_at_its_count() {
        let start = Instant::now();
        let p = Pacer {
            next: AtomicU64::new(0),
            start,
            per_s: 20.0,
            max_slots: 3,
            pattern: pattern_of(&[Kind::Replay, Kind::DemoShared]),
        };
        let due: Vec<(Duration, Kind)> = std::iter::from_fn(|| p.take())
            .map(|(_, at, kind)| (at - start, kind))
            .collect();
        assert_eq!(
            due,
            vec![
                (Duration::ZERO, Kind::DemoShared),
                (Duration::from_millis(50), Kind::Replay),
                (Duration::from_millis(100), Kind::DemoShared)
            ]
        );
        assert!(p.take().is_none());
        assert_eq!(pattern_of(&KINDS), PATTERN.to_vec());
        assert!(pattern_of(&[]).is_empty());
    }
}
