//! The session registry: every session the control plane created, its state
//! as reported by the workers, and the bounds (total, per user).
//!
//! `session_closed` of a session the control plane ends while a worker
//! holds it (revoked, evicted, or closed by reconcile before the worker's
//! report) waits for the worker's close report, which brings the byte
//! counts, at most `[events] session_close_report_wait_ms` (checked by the
//! sweeper); past it, it is sent with what is known and `bytes_final:
//! false`.
//!
//! Plain data owned by the control thread; no IO.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::mailbox::{ticket_state, Admission, FromWorker};

/// Closed sessions kept for `GET` after they end (oldest dropped first).
pub const CLOSED_RECORDS_KEPT: usize = 1024;
/// `session_closed` events held back for a worker's report at most; beyond,
/// the oldest is sent at once (as at its deadline).
pub const MAX_AWAITING_REPORTS: usize = CLOSED_RECORDS_KEPT;
/// How long a `session_closed` waits for the worker's figures unless set.
pub const DEFAULT_CLOSE_REPORT_WAIT_MS: u64 = 2_000;

/// A `session_closed` held back until the worker's close report (its byte
/// counts) arrives or `deadline` passes.
#[derive(Debug)]
struct AwaitingReport {
    id: u64,
    data: crate::events::protocol::SessionData,
    deadline: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Created; waiting for the browser to connect with the ticket.
    Pending,
    /// A browser connected; the relay is live.
    Open,
    Closed,
    /// The ticket was not used within its TTL.
    Expired,
    /// Deleted through the API.
    Revoked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PortMode {
    Shared,
    Dedicated,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetView {
    pub kind: String,
    pub host: String,
    pub port: u16,
    pub has_password: bool,
}

/// One session as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub session_id: String,
    #[serde(skip)]
    pub id: u64,
    pub user: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    pub target: TargetView,
    pub state: State,
    pub port_mode: PortMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    pub bytes_browser_to_backend: u64,
    pub bytes_backend_to_browser: u64,
    pub age_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub close_reason: Option<String>,
    /// Connects refused for this session (e.g. ticket replays).
    pub refused_connects: u64,
    #[serde(skip)]
    pub created: Instant,
    #[serde(skip)]
    pub expires: Instant,
    #[serde(skip)]
    pub admission: Option<Arc<Admission>>,
    /// A dedicated listener is still open (its port is held).
    #[serde(skip)]
    pub listener_open: bool,
    /// Last traffic either way (unix ms; creation until the relay is
    /// live), as the workers last published it (once per tick). Live
    /// sessions only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_activity_ms: Option<u64>,
    /// Time since then, in ms. Live sessions only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
}

impl Record {
    /// A freshly created session, waiting for its browser.
    #[allow(clippy::too_many_arguments)]
    pub fn pending(
        id: u64,
        user: String,
        vm_id: Option<String>,
        target: TargetView,
        port_mode: PortMode,
        port: Option<u16>,
        created_at_ms: u64,
        expires_at_ms: u64,
        created: Instant,
        expires: Instant,
        admission: Option<Arc<Admission>>,
    ) -> Self {
        Record {
            session_id: id_hex(id),
            id,
            user,
            vm_id,
            target,
            state: State::Pending,
            port_mode,
            port,
            created_at_ms,
            expires_at_ms,
            worker: None,
            peer: None,
            bytes_browser_to_backend: 0,
            bytes_backend_to_browser: 0,
            age_ms: 0,
            close_code: None,
            close_reason: None,
            refused_connects: 0,
            created,
            expires,
            admission,
            listener_open: port.is_some(),
            last_activity_ms: None,
            idle_ms: None,
        }
    }
}

pub fn id_hex(id: u64) -> String {
    format!("{id:016x}")
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("too many sessions ({max})")]
    TooMany { max: usize },
    #[error("user {user:?} has too many sessions ({max})")]
    TooManyForUser { user: String, max: usize },
}

impl RegistryError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooMany { .. } => "too_many_sessions",
            Self::TooManyForUser { .. } => "too_many_sessions_for_user",
        }
    }
}

#[derive(Debug)]
pub struct Registry {
    live: HashMap<u64, Record>,
    closed: VecDeque<Record>,
    max_sessions: usize,
    max_per_user: usize,
    per_user: HashMap<String, usize>,
    /// Where session lifecycle events go (`session_opened` /
    /// `session_closed`), once the control plane attached the bus.
    events: Option<crate::events::EventBus>,
    /// `session_closed` events waiting for their worker's report, oldest
    /// (earliest deadline) first; at most [`MAX_AWAITING_REPORTS`].
    awaiting: VecDeque<AwaitingReport>,
    close_report_wait: std::time::Duration,
}

impl Registry {
    /// Publish sessions' lifecycle (opened, and every way of ending) on
    /// `bus` from now on.
    pub fn set_events(&mut self, bus: crate::events::EventBus) {
        self.events = Some(bus);
    }

    /// How long `session_closed` waits for a worker's close report.
    pub fn set_close_report_wait_ms(&mut self, wait_ms: u64) {
        self.close_report_wait = std::time::Duration::from_millis(wait_ms);
    }

    fn session_data(r: &Record, reason: &str) -> crate::events::protocol::SessionData {
        crate::events::protocol::SessionData {
            session_id: r.session_id.clone(),
            user: r.user.clone(),
            vm_id: r.vm_id.clone(),
            reason: reason.to_string(),
            bytes: r
                .bytes_browser_to_backend
                .saturating_add(r.bytes_backend_to_browser),
            bytes_browser_to_backend: r.bytes_browser_to_backend,
            bytes_backend_to_browser: r.bytes_backend_to_browser,
            bytes_final: true,
            duration_ms: u64::try_from(r.created.elapsed().as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn publish_session(
        &self,
        kind: crate::events::EventKind,
        data: &crate::events::protocol::SessionData,
    ) {
        if let Some(bus) = &self.events {
            bus.publish(&crate::events::Event::session(kind, data));
        }
    }

    fn publish_lifecycle(&self, kind: crate::events::EventKind, r: &Record, reason: &str) {
        if self.events.is_some() {
            self.publish_session(kind, &Self::session_data(r, reason));
        }
    }

    /// Hold `session_closed` of `r` back until its worker's report.
    fn await_report(&mut self, r: &Record, reason: &str, now: Instant) {
        if self.events.is_none() {
            return;
        }
        if self.awaiting.len() >= MAX_AWAITING_REPORTS {
            if let Some(oldest) = self.awaiting.pop_front() {
                self.publish_session(crate::events::EventKind::SessionClosed, &oldest.data);
            }
        }
        let mut data = Self::session_data(r, reason);
        data.bytes_final = false;
        self.awaiting.push_back(AwaitingReport {
            id: r.id,
            data,
            deadline: now + self.close_report_wait,
        });
    }

    /// The worker's figures of an awaited `session_closed` arrived: send
    /// it with them.
    fn report_arrived(
        &mut self,
        id: u64,
        (bytes_up, bytes_down): (u64, u64),
        reason: Option<String>,
    ) {
        let Some(at) = self.awaiting.iter().position(|a| a.id == id) else {
            return;
        };
        if let Some(mut awaited) = self.awaiting.remove(at) {
            awaited.data.bytes_browser_to_backend = bytes_up;
            awaited.data.bytes_backend_to_browser = bytes_down;
            awaited.data.bytes = bytes_up.saturating_add(bytes_down);
            awaited.data.bytes_final = true;
            if let Some(reason) = reason {
                awaited.data.reason = reason;
            }
            self.publish_session(crate::events::EventKind::SessionClosed, &awaited.data);
        }
    }

    /// Send the `session_closed` events whose worker's report did not come
    /// within the wait, with what is known (`bytes_final: false`). Returns
    /// how many.
    pub fn flush_overdue_reports(&mut self, now: Instant) -> usize {
        let mut sent = 0;
        while self.awaiting.front().is_some_and(|a| now >= a.deadline) {
            if let Some(overdue) = self.awaiting.pop_front() {
                self.publish_session(crate::events::EventKind::SessionClosed, &overdue.data);
                sent += 1;
            }
        }
        sent
    }

    /// `session_closed` events waiting for a worker's report.
    pub fn awaiting_reports(&self) -> usize {
        self.awaiting.len()
    }

    pub fn new(max_sessions: usize, max_per_user: usize) -> Self {
        Self {
            live: HashMap::new(),
            closed: VecDeque::new(),
            max_sessions,
            max_per_user,
            per_user: HashMap::new(),
            events: None,
            awaiting: VecDeque::new(),
            close_report_wait: std::time::Duration::from_millis(DEFAULT_CLOSE_REPORT_WAIT_MS),
        }
    }

    /// Room for one more session of `user`, made by evicting (with
    /// `evict`) the least recently active console: the user's own when the
    /// user is at their cap, anyone's when the pool is full. Returns the
    /// evicted records (their admissions revoked as evicted); without
    /// `evict`, or with nothing to evict, why there is no room.
    pub fn make_room(&mut self, user: &str, evict: bool) -> Result<Vec<Record>, RegistryError> {
        let mut evicted = Vec::new();
        let at_user_cap = self.per_user.get(user).copied().unwrap_or(0) >= self.max_per_user;
        if at_user_cap && evict {
            if let Some(id) = self.least_recently_active(|r| r.user == user) {
                evicted.extend(self.evict(id));
            }
        }
        if self.live.len() >= self.max_sessions && evict {
            if let Some(id) = self.least_recently_active(|_| true) {
                evicted.extend(self.evict(id));
            }
        }
        self.check_capacity(user)?;
        Ok(evicted)
    }

    fn least_recently_active(&self, pick: impl Fn(&Record) -> bool) -> Option<u64> {
        self.live
            .values()
            .filter(|r| pick(r))
            .min_by_key(|r| (activity_ms(r), r.id))
            .map(|r| r.id)
    }

    /// Close a live session to make room in the pool.
    fn evict(&mut self, id: u64) -> Option<Record> {
        let mut r = self.live.remove(&id)?;
        self.dec_user(&r.user);
        let held = held_by_a_worker(&r, r.admission.as_ref().map(|a| a.evict_from()));
        r.state = State::Revoked;
        r.close_reason = Some("evicted: the least recently active console, to make room".into());
        let out = r.clone();
        self.push_closed_after_report(r, held);
        Some(out)
    }

    /// The live (pending or open) sessions of `user`.
    pub fn sessions_of(&self, user: &str) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .live
            .values()
            .filter(|r| r.user == user)
            .map(|r| r.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The pool as `GET /api/v1/viewers` shows it: per user, how many
    /// consoles and when the most recent saw traffic.
    pub fn viewers(&self, now: Instant, unix_now_ms: u64) -> Viewers {
        let now_ms = crate::mailbox::mono_ms(now);
        let mut users: HashMap<&str, (usize, u64)> = HashMap::new();
        for r in self.live.values() {
            let e = users.entry(r.user.as_str()).or_insert((0, 0));
            e.0 += 1;
            e.1 = e.1.max(activity_ms(r));
        }
        let mut users: Vec<ViewerUser> = users
            .into_iter()
            .map(|(user, (sessions, last))| {
                let idle_ms = now_ms.saturating_sub(last);
                ViewerUser {
                    user: user.to_string(),
                    sessions,
                    last_activity_ms: unix_now_ms.saturating_sub(idle_ms),
                    idle_ms,
                }
            })
            .collect();
        users.sort_by(|a, b| a.user.cmp(&b.user));
        Viewers {
            active_sessions: self.live.len(),
            max_sessions: self.max_sessions,
            max_sessions_per_user: self.max_per_user,
            users,
        }
    }

    /// Room for one more session of `user`?
    pub fn check_capacity(&self, user: &str) -> Result<(), RegistryError> {
        if self.live.len() >= self.max_sessions {
            return Err(RegistryError::TooMany {
                max: self.max_sessions,
            });
        }
        if self.per_user.get(user).copied().unwrap_or(0) >= self.max_per_user {
            return Err(RegistryError::TooManyForUser {
                user: user.to_string(),
                max: self.max_per_user,
            });
        }
        Ok(())
    }

    pub fn insert(&mut self, r: Record) {
        *self.per_user.entry(r.user.clone()).or_insert(0) += 1;
        self.live.insert(r.id, r);
    }

    /// Remove a record that was never handed out (rollback).
    pub fn rollback(&mut self, id: u64) {
        if let Some(r) = self.live.remove(&id) {
            self.dec_user(&r.user);
        }
    }

    fn dec_user(&mut self, user: &str) {
        if let Some(n) = self.per_user.get_mut(user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_user.remove(user);
            }
        }
    }

    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    pub fn count_in(&self, state: State) -> usize {
        self.live.values().filter(|r| r.state == state).count()
            + self.closed.iter().filter(|r| r.state == state).count()
    }

    pub fn get(&self, id: u64, now: Instant) -> Option<Record> {
        self.live
            .get(&id)
            .or_else(|| self.closed.iter().find(|r| r.id == id))
            .map(|r| with_age(r, now))
    }

    pub fn list(&self, now: Instant) -> Vec<Record> {
        let mut v: Vec<Record> = self
            .live
            .values()
            .chain(self.closed.iter())
            .map(|r| with_age(r, now))
            .collect();
        v.sort_by_key(|r| r.created_at_ms);
        v
    }

    /// Whether the session owning a port still needs it.
    pub fn holds_port(&self, id: u64) -> bool {
        self.live.get(&id).is_some_and(|r| r.listener_open)
            || self.closed.iter().any(|r| r.id == id && r.listener_open)
    }

    pub fn listener_closed(&mut self, id: u64) {
        if let Some(r) = self.live.get_mut(&id) {
            r.listener_open = false;
        }
        if let Some(r) = self.closed.iter_mut().find(|r| r.id == id) {
            r.listener_open = false;
        }
    }

    /// The user of a live (pending or open) session.
    pub fn owner_of(&self, id: u64) -> Option<&str> {
        self.live.get(&id).map(|r| r.user.as_str())
    }

    /// End a session through the API; returns the record as it was.
    pub fn revoke(&mut self, id: u64) -> Option<Record> {
        let mut r = self.live.remove(&id)?;
        self.dec_user(&r.user);
        let held = held_by_a_worker(&r, r.admission.as_ref().map(|a| a.revoke_from()));
        r.state = State::Revoked;
        if r.close_reason.is_none() {
            r.close_reason = Some("revoked through the API".into());
        }
        let out = r.clone();
        self.push_closed_after_report(r, held);
        Some(out)
    }

    /// Bring records in line with their admissions' shared state, whatever
    /// reports were lost or are late: a claimed admission is an open
    /// session (its Opened report may not have arrived), a closed one is a
    /// closed session (its Closed report may never arrive). Returns how many
    /// records changed.
    pub fn reconcile(&mut self) -> usize {
        let mut opened = 0;
        let mut ended = Vec::new();
        let mut newly_open = Vec::new();
        for r in self.live.values_mut() {
            let Some(a) = &r.admission else { continue };
            match a.state() {
                ticket_state::CLAIMED if r.state == State::Pending => {
                    r.state = State::Open;
                    opened += 1;
                    newly_open.push(r.id);
                }
                ticket_state::CLOSED => ended.push(r.id),
                _ => {}
            }
        }
        for id in &newly_open {
            if let Some(r) = self.live.get(id) {
                self.publish_lifecycle(crate::events::EventKind::SessionOpened, r, "opened");
            }
        }
        for id in &ended {
            if let Some(mut r) = self.live.remove(id) {
                self.dec_user(&r.user);
                r.state = State::Closed;
                r.close_reason = Some("closed (the worker's report has not arrived)".into());
                // Its worker closed it: the report is on its way.
                self.push_closed_after_report(r, true);
            }
        }
        opened + ended.len()
    }

    /// Pending sessions whose ticket expired unused: marked expired; their
    /// ids. One whose admission was claimed is open, not expired, even when
    /// its Opened report has not arrived.
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        let ids: Vec<u64> = self
            .live
            .values()
            .filter(|r| r.state == State::Pending && now >= r.expires)
            .filter(|r| {
                r.admission
                    .as_ref()
                    .is_none_or(|a| a.state() == ticket_state::PENDING)
            })
            .map(|r| r.id)
            .collect();
        for id in &ids {
            if let Some(mut r) = self.live.remove(id) {
                self.dec_user(&r.user);
                if let Some(a) = &r.admission {
                    a.revoke();
                }
                r.state = State::Expired;
                r.close_reason = Some("ticket not used within its TTL".into());
                self.push_closed(r);
            }
        }
        ids
    }

    fn push_closed(&mut self, r: Record) {
        self.push_closed_after_report(r, false);
    }

    /// Keep `r` as closed and send its `session_closed`: now, or once its
    /// worker's report came when `awaits_report` (a worker held it).
    fn push_closed_after_report(&mut self, mut r: Record, awaits_report: bool) {
        let reason = r.close_reason.clone().unwrap_or_else(|| "closed".into());
        if awaits_report {
            self.await_report(&r, &reason, Instant::now());
        } else {
            self.publish_lifecycle(crate::events::EventKind::SessionClosed, &r, &reason);
        }
        r.admission = None;
        self.closed.push_back(r);
        while self.closed.len() > CLOSED_RECORDS_KEPT {
            self.closed.pop_front();
        }
    }

    /// A worker's report about a session.
    pub fn apply(&mut self, msg: FromWorker, _now: Instant) {
        match msg {
            FromWorker::Opened { id, worker, peer } => {
                let mut newly_open = false;
                if let Some(r) = self.live.get_mut(&id) {
                    // Reconcile may have seen it open first (its event
                    // was sent then).
                    newly_open = r.state == State::Pending;
                    r.state = State::Open;
                    r.worker = Some(worker);
                    r.peer = peer.map(|p: SocketAddr| p.to_string());
                }
                if let Some(r) = self.live.get(&id).filter(|_| newly_open) {
                    self.publish_lifecycle(crate::events::EventKind::SessionOpened, r, "opened");
                }
            }
            FromWorker::Closed {
                id,
                worker,
                code,
                reason,
                bytes_up,
                bytes_down,
            } => {
                let rec = match self.live.remove(&id) {
                    Some(r) => {
                        self.dec_user(&r.user);
                        Some(r)
                    }
                    None => None,
                };
                if let Some(mut r) = rec {
                    r.state = State::Closed;
                    r.worker = Some(worker);
                    r.close_code = code;
                    r.close_reason = Some(reason);
                    r.bytes_browser_to_backend = bytes_up;
                    r.bytes_backend_to_browser = bytes_down;
                    self.push_closed(r);
                } else {
                    // The relay's own reason replaces reconcile's guess.
                    let mut relay_reason = None;
                    if let Some(r) = self.closed.iter_mut().find(|r| r.id == id) {
                        // Revoked while live (keep the revoke state), or
                        // closed by reconcile before this report came: add
                        // figures.
                        r.close_code = code;
                        r.worker = Some(worker);
                        r.bytes_browser_to_backend = bytes_up;
                        r.bytes_backend_to_browser = bytes_down;
                        if r.state == State::Closed {
                            r.close_reason = Some(reason.clone());
                            relay_reason = Some(reason);
                        }
                    }
                    self.report_arrived(id, (bytes_up, bytes_down), relay_reason);
                }
            }
            FromWorker::Refused { id, .. } => {
                if let Some(r) = self.live.get_mut(&id) {
                    r.refused_connects += 1;
                } else if let Some(r) = self.closed.iter_mut().find(|r| r.id == id) {
                    r.refused_connects += 1;
                }
            }
            FromWorker::ListenerClosed { id, .. } => self.listener_closed(id),
            // Handled by the control plane before the registry.
            FromWorker::Stats(_)
            | FromWorker::BackendAuthenticated { .. }
            | FromWorker::ConsoleRequest(_) => {}
        }
    }
}

/// Whether a worker holds (or held and is reporting on) the session: its
/// close report, with the byte counts, is still to come.
/// Whether a worker holds (or held) `r`'s session, so its close report
/// with the byte counts will come: from what revoking its admission found
/// (`revoked_from`: `Some(state revoked from)`, or `Some(None)` when it
/// was revoked or closed already; `None` without an admission).
fn held_by_a_worker(r: &Record, revoked_from: Option<Option<u8>>) -> bool {
    if r.state == State::Open {
        return true;
    }
    match revoked_from {
        Some(Some(before)) => before == ticket_state::CLAIMED,
        Some(None) => r
            .admission
            .as_ref()
            .is_some_and(|a| a.state() == ticket_state::CLOSED),
        None => false,
    }
}

fn with_age(r: &Record, now: Instant) -> Record {
    let mut c = r.clone();
    c.age_ms = now.saturating_duration_since(r.created).as_millis() as u64;
    if r.admission.is_some() {
        let idle_ms = crate::mailbox::mono_ms(now).saturating_sub(activity_ms(r));
        c.idle_ms = Some(idle_ms);
        c.last_activity_ms = Some(unix_ms(SystemTime::now()).saturating_sub(idle_ms));
    }
    c
}

/// A live record's last activity ([`crate::mailbox::mono_ms`]): what its
/// admission says (creation time until the relay is live).
fn activity_ms(r: &Record) -> u64 {
    r.admission.as_ref().map_or_else(
        || crate::mailbox::mono_ms(r.created),
        |a| a.last_activity_ms(),
    )
}

/// `GET /api/v1/viewers`.
#[derive(Debug, Clone, Serialize)]
pub struct Viewers {
    pub active_sessions: usize,
    pub max_sessions: usize,
    pub max_sessions_per_user: usize,
    pub users: Vec<ViewerUser>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ViewerUser {
    pub user: String,
    /// Consoles open or pending.
    pub sessions: usize,
    /// The most recent traffic of any of them (unix ms).
    pub last_activity_ms: u64,
    pub idle_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rec(id: u64, user: &str, now: Instant) -> Record {
        Record::pending(
            id,
            user.into(),
            None,
            TargetView {
                kind: "vnc".into(),
                host: "127.0.0.1".into(),
                port: 5900,
                has_password: false,
            },
            PortMode::Shared,
            None,
            id,
            0,
            now,
            now + Duration::from_secs(60),
            None,
        )
    }

    #[test]
    fn limits_per_user_and_total() {
        let now = Instant::now();
        let mut r = Registry::new(3, 2);
        r.insert(rec(1, "a", now));
        r.insert(rec(2, "a", now));
        assert_eq!(
            r.check_capacity("a").unwrap_err().code(),
            "too_many_sessions_for_user"
        );
        r.check_capacity("b").unwrap();
        r.insert(rec(3, "b", now));
        assert_eq!(
            r.check_capacity("c").unwrap_err().code(),
            "too_many_sessions"
        );
        r.rollback(3);
        r.check_capacity("c").unwrap();
    }

    #[test]
    fn make_room_evicts_the_least_recently_active() {
        let now = Instant::now();
        let mut r = Registry::new(3, 2);
        let mut admissions = Vec::new();
        for (id, user) in [(1, "a"), (2, "a"), (3, "b")] {
            let (mut record, a) = admitted(id, now);
            record.user = user.into();
            a.note_activity(1_000 + id * 10);
            r.insert(record);
            admissions.push(a);
        }
        // Session 1 was active last.
        admissions[0].note_activity(5_000);
        // Refuse: nothing changes (the pool is full and a at the cap; the
        // pool is checked first).
        assert_eq!(
            r.make_room("a", false).unwrap_err().code(),
            "too_many_sessions"
        );
        assert_eq!(r.live_count(), 3);
        // Evict, user at cap: a's least recent (2) goes.
        let evicted: Vec<u64> = r
            .make_room("a", true)
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(evicted, vec![2]);
        assert_eq!(admissions[1].state(), ticket_state::REVOKED);
        assert_eq!(
            admissions[1].revoke_cause(),
            crate::mailbox::revoke_cause::EVICTED
        );
        assert_eq!(admissions[0].state(), ticket_state::PENDING);
        let g = r.get(2, now).unwrap();
        assert_eq!(g.state, State::Revoked);
        assert!(g.close_reason.unwrap().contains("evicted"));
        let (record, a4) = admitted(4, now);
        a4.note_activity(6_000);
        r.insert(record);
        // The pool is full: the least recent of anyone's (3, b's) goes.
        let evicted: Vec<u64> = r
            .make_room("c", true)
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(evicted, vec![3]);
        assert_eq!(r.sessions_of("a"), vec![1, 4]);
        // Viewers: one user left with two consoles.
        let v = r.viewers(now, 10_000_000);
        assert_eq!((v.active_sessions, v.users.len()), (2, 1));
        assert_eq!((v.users[0].user.as_str(), v.users[0].sessions), ("a", 2));
    }

    #[test]
    fn lifecycle_from_reports() {
        let now = Instant::now();
        let mut r = Registry::new(10, 10);
        r.insert(rec(1, "a", now));
        r.apply(
            FromWorker::Opened {
                id: 1,
                worker: 1,
                peer: None,
            },
            now,
        );
        assert_eq!(r.get(1, now).unwrap().state, State::Open);
        r.apply(
            FromWorker::Closed {
                id: 1,
                worker: 1,
                code: Some(1000),
                reason: "backend closed".into(),
                bytes_up: 5,
                bytes_down: 7,
            },
            now,
        );
        let g = r.get(1, now).unwrap();
        assert_eq!(g.state, State::Closed);
        assert_eq!(g.bytes_backend_to_browser, 7);
        assert_eq!(r.live_count(), 0);
        r.check_capacity("a").unwrap();
    }

    #[test]
    fn expiry_and_revoke() {
        let now = Instant::now();
        let mut r = Registry::new(10, 10);
        r.insert(rec(1, "a", now));
        r.insert(rec(2, "a", now));
        assert!(r.expire(now).is_empty());
        let revoked = r.revoke(2).unwrap();
        assert_eq!(revoked.state, State::Revoked);
        assert_eq!(r.expire(now + Duration::from_secs(61)), vec![1]);
        assert_eq!(r.get(1, now).unwrap().state, State::Expired);
        assert_eq!(r.get(2, now).unwrap().state, State::Revoked);
        assert_eq!(r.live_count(), 0);
        assert!(r.revoke(2).is_none());
    }

    fn admitted(id: u64, now: Instant) -> (Record, Arc<Admission>) {
        let a = Arc::new(Admission::new(
            id,
            vec![1; 16],
            crate::mailbox::Target::vnc("127.0.0.1:5900".parse().unwrap(), None),
            "a".into(),
            now + Duration::from_secs(60),
            None,
            None,
            None,
        ));
        let mut r = rec(id, "a", now);
        r.admission = Some(a.clone());
        (r, a)
    }

    #[test]
    fn lost_reports_are_reconciled_from_the_admission() {
        let now = Instant::now();
        let mut r = Registry::new(10, 1);
        let (record, a) = admitted(1, now);
        r.insert(record);
        // The browser connected but the Opened report was lost: after the
        // TTL the session must be open, not expired (nor revoked).
        assert!(a.claim());
        assert!(r.expire(now + Duration::from_secs(61)).is_empty());
        assert_eq!(
            a.state(),
            ticket_state::CLAIMED,
            "a live console was revoked"
        );
        assert_eq!(r.reconcile(), 1);
        assert_eq!(r.get(1, now).unwrap().state, State::Open);
        // The relay ended but the Closed report was lost: the user's slot
        // must come back.
        assert!(r.check_capacity("a").is_err());
        a.close();
        assert_eq!(r.reconcile(), 1);
        assert_eq!(r.get(1, now).unwrap().state, State::Closed);
        r.check_capacity("a").unwrap();
        // The late report still adds its figures.
        r.apply(
            FromWorker::Closed {
                id: 1,
                worker: 0,
                code: Some(1000),
                reason: "backend closed".into(),
                bytes_up: 3,
                bytes_down: 4,
            },
            now,
        );
        let g = r.get(1, now).unwrap();
        assert_eq!((g.close_code, g.bytes_backend_to_browser), (Some(1000), 4));
        assert_eq!(g.close_reason.as_deref(), Some("backend closed"));
    }

    fn closed_events(sub: &mut crate::events::Subscription) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| sub.try_recv())
            .map(|m| serde_json::from_str::<serde_json::Value>(m.as_str()).unwrap())
            .filter(|v| v["type"] == "session_closed")
            .map(|v| v["data"].clone())
            .collect()
    }

    #[test]
    fn session_closed_of_a_revoked_live_session_waits_for_the_worker_figures() {
        let now = Instant::now();
        let bus = crate::events::EventBus::new(crate::events::bus::BusLimits {
            max_subscribers: 2,
            subscriber_queue_events: 64,
        });
        let mut sub = bus
            .subscribe(crate::events::Room::Monitor, crate::events::Visibility::All)
            .unwrap();
        let mut r = Registry::new(10, 10);
        r.set_events(bus);
        r.set_close_report_wait_ms(0);
        let closed = |id: u64, up: u64, down: u64| FromWorker::Closed {
            id,
            worker: 0,
            code: Some(1000),
            reason: "revoked".into(),
            bytes_up: up,
            bytes_down: down,
        };
        // Live on a worker, revoked: nothing until the report.
        for id in [1, 2] {
            let (record, a) = admitted(id, now);
            r.insert(record);
            assert!(a.claim());
        }
        r.reconcile();
        r.revoke(1).unwrap();
        r.revoke(2).unwrap();
        assert!(closed_events(&mut sub).is_empty());
        assert_eq!(r.awaiting_reports(), 2);
        r.apply(closed(1, 300, 4000), now);
        let got = closed_events(&mut sub);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["reason"], "revoked through the API");
        assert_eq!(
            (
                &got[0]["bytes"],
                &got[0]["bytes_browser_to_backend"],
                &got[0]["bytes_backend_to_browser"],
                &got[0]["bytes_final"]
            ),
            (
                &serde_json::json!(4300),
                &serde_json::json!(300),
                &serde_json::json!(4000),
                &serde_json::json!(true)
            )
        );
        // Session 2's report never comes: sent at the deadline, flagged.
        assert_eq!(r.flush_overdue_reports(Instant::now()), 1);
        let got = closed_events(&mut sub);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["bytes_final"], false);
        assert_eq!(r.awaiting_reports(), 0);
        // A late report after the flush sends nothing more.
        r.apply(closed(2, 1, 1), now);
        assert!(closed_events(&mut sub).is_empty());
        // A pending session (no worker) is reported at once, final.
        r.insert(rec(3, "a", now));
        r.revoke(3).unwrap();
        let got = closed_events(&mut sub);
        assert_eq!(
            (got.len(), &got[0]["bytes_final"]),
            (1, &serde_json::json!(true))
        );
    }
}
