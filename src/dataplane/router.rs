//! Where a browser's upgrade request is relayed to: one fixed backend,
//! websockify's token file (`?token=`), or — in appliance mode — a session
//! the control plane admitted (`/proxy/{session_id}?token=<ticket>`).
//!
//! Each worker owns its router (no shared state beyond the admissions'
//! atomic ticket state). Must not depend on the IO backends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use subtle::ConstantTimeEq;

use crate::cause::Cause;
use crate::dataplane::tokens::SharedTokens;
use crate::mailbox::{ticket_state, Admission, Target};
use crate::protocol::http_upgrade::{query_param, Upgrade};

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("the URL has no ?token= parameter")]
    MissingToken,
    #[error("unknown token")]
    UnknownToken,
    #[error("the token's target {0} does not resolve")]
    Unresolvable(String),
    #[error("expected a /proxy/{{session_id}} path")]
    BadPath,
    #[error("unknown session")]
    UnknownSession,
    #[error("invalid ticket")]
    BadTicket,
    #[error("this ticket was already used")]
    TicketUsed,
    #[error("this ticket has expired")]
    TicketExpired,
    #[error("the session was revoked")]
    Revoked,
    #[error("this ticket is bound to another origin")]
    OriginMismatch,
    #[error("this ticket is bound to another client address")]
    ClientIpMismatch,
}

impl RouteError {
    pub fn status(&self) -> u16 {
        match self {
            Self::MissingToken | Self::BadPath => 400,
            Self::UnknownToken | Self::UnknownSession => 404,
            Self::Unresolvable(_) => 502,
            Self::BadTicket
            | Self::TicketUsed
            | Self::OriginMismatch
            | Self::ClientIpMismatch
            | Self::Revoked => 403,
            Self::TicketExpired => 410,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::UnknownToken => "unknown_token",
            Self::Unresolvable(_) => "target_unresolvable",
            Self::BadPath => "bad_path",
            Self::UnknownSession => "unknown_session",
            Self::BadTicket => "bad_ticket",
            Self::TicketUsed => "ticket_replay",
            Self::TicketExpired => "ticket_expired",
            Self::Revoked => "session_revoked",
            Self::OriginMismatch => "origin_mismatch",
            Self::ClientIpMismatch => "client_ip_mismatch",
        }
    }
}

impl From<&RouteError> for Cause {
    fn from(e: &RouteError) -> Self {
        match e {
            RouteError::MissingToken => Cause::MissingToken,
            RouteError::UnknownToken => Cause::UnknownToken,
            RouteError::Unresolvable(_) => Cause::TargetUnresolvable,
            RouteError::BadPath => Cause::BadPath,
            RouteError::UnknownSession => Cause::UnknownSession,
            RouteError::BadTicket => Cause::BadTicket,
            RouteError::TicketUsed => Cause::TicketReplay,
            RouteError::TicketExpired => Cause::TicketExpired,
            RouteError::Revoked => Cause::SessionRevokedBeforeConnect,
            RouteError::OriginMismatch => Cause::OriginMismatch,
            RouteError::ClientIpMismatch => Cause::ClientIpMismatch,
        }
    }
}

/// The outcome of routing: where to connect and, in appliance mode, the
/// admitted session (password for the RFB handshake, id for reports).
#[derive(Debug, Clone)]
pub struct Route {
    pub target: Target,
    pub admission: Option<Arc<Admission>>,
}

/// How long an admission is kept after it stopped being usable (expired,
/// revoked, or claimed and past its TTL), so a late or replayed connect
/// gets the documented answer (410 expired, 403 revoked or used) instead of
/// 404. Cost: one small entry per session created in this window, bounded
/// by [`MAX_TOMBSTONES`].
pub const TOMBSTONE_MS: u64 = 120_000;
/// Most finished admissions a worker keeps for those answers; beyond, the
/// oldest are forgotten (and answer 404). About 200 bytes each.
pub const MAX_TOMBSTONES: usize = 65_536;

/// Admitted appliance sessions known to this worker, by id, and for a
/// while those that can no longer be used.
#[derive(Debug, Default)]
pub struct AdmissionTable {
    map: HashMap<u64, Arc<Admission>>,
    /// Finished admissions still in `map`, oldest first, with when each
    /// goes.
    tombstones: std::collections::VecDeque<(u64, Instant)>,
    /// Ids already in `tombstones`.
    buried: std::collections::HashSet<u64>,
}

impl AdmissionTable {
    pub fn insert(&mut self, a: Arc<Admission>) {
        self.map.insert(a.id, a);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.map.contains_key(&id)
    }

    /// Move admissions that can no longer be used (revoked, closed, or
    /// past their ticket's lifetime) to the tombstones, and forget the
    /// tombstones that are old enough, or the oldest beyond
    /// [`MAX_TOMBSTONES`]. A claimed admission is kept until its TTL, so a
    /// replayed ticket gets a clear 403 ("already used") and is counted.
    /// Returns how many were forgotten.
    pub fn purge(&mut self, now: Instant) -> usize {
        let tomb = std::time::Duration::from_millis(TOMBSTONE_MS);
        for (id, a) in &self.map {
            let finished = matches!(a.state(), ticket_state::REVOKED | ticket_state::CLOSED)
                || now >= a.expires_at;
            if finished && self.buried.insert(*id) {
                self.tombstones.push_back((*id, now + tomb));
            }
        }
        let mut forgotten = 0;
        while let Some(&(id, at)) = self.tombstones.front() {
            if at > now && self.tombstones.len() <= MAX_TOMBSTONES {
                break;
            }
            self.tombstones.pop_front();
            self.buried.remove(&id);
            self.map.remove(&id);
            forgotten += 1;
        }
        debug_assert_eq!(self.tombstones.len(), self.buried.len());
        forgotten
    }
}

pub enum Router {
    /// One backend for every connection (proxy mode's target argument).
    Fixed(Target),
    Tokens(SharedTokens),
    Appliance(AdmissionTable),
}

/// What the router needs to know about the connection besides the request.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnInfo<'a> {
    pub peer: Option<IpAddr>,
    /// The admission bound to the listener that accepted (dedicated port).
    pub bound: Option<&'a Arc<Admission>>,
}

impl Router {
    /// The backend for this upgrade request.
    pub fn route(
        &mut self,
        up: &Upgrade,
        conn: ConnInfo<'_>,
        now: Instant,
    ) -> Result<Route, RouteError> {
        if let Some(bound) = conn.bound {
            return check_admission(bound, up, conn.peer, now);
        }
        match self {
            Self::Fixed(target) => Ok(Route {
                target: target.clone(),
                admission: None,
            }),
            Self::Tokens(tokens) => {
                let token = up
                    .query
                    .as_deref()
                    .and_then(|q| query_param(q, "token"))
                    .ok_or(RouteError::MissingToken)?;
                // Resolved by the loader thread: no DNS on the worker.
                let table = tokens.load();
                match table.get(&token) {
                    None => Err(RouteError::UnknownToken),
                    Some(Err(why)) => Err(RouteError::Unresolvable(why.clone())),
                    Some(Ok(addr)) => Ok(Route {
                        target: Target::vnc(*addr, None),
                        admission: None,
                    }),
                }
            }
            Self::Appliance(table) => {
                let id = session_id_from_path(&up.path).ok_or(RouteError::BadPath)?;
                let a = table
                    .map
                    .get(&id)
                    .cloned()
                    .ok_or(RouteError::UnknownSession)?;
                check_admission(&a, up, conn.peer, now)
            }
        }
    }
}

impl Router {
    /// Whether `id` is a session the control plane admitted to this worker
    /// (refusals are reported for those only).
    pub fn knows(&self, id: u64) -> bool {
        matches!(self, Self::Appliance(t) if t.contains(id))
    }
}

/// `/proxy/{id}` (hex) → id.
pub fn session_id_from_path(path: &str) -> Option<u64> {
    let rest = path.strip_prefix("/proxy/")?;
    let id = rest.trim_end_matches('/');
    if id.is_empty() || id.len() > 16 {
        return None;
    }
    u64::from_str_radix(id, 16).ok()
}

/// Ticket checks in an order that leaks nothing: the ticket is compared in
/// constant time first, and only a holder of the right ticket learns that
/// it was used, expired or bound elsewhere.
fn check_admission(
    a: &Arc<Admission>,
    up: &Upgrade,
    peer: Option<IpAddr>,
    now: Instant,
) -> Result<Route, RouteError> {
    if let Some(id) = session_id_from_path(&up.path) {
        if id != a.id {
            return Err(RouteError::UnknownSession);
        }
    } else {
        return Err(RouteError::BadPath);
    }
    let given = up
        .query
        .as_deref()
        .and_then(|q| query_param(q, "token"))
        .ok_or(RouteError::MissingToken)?;
    let expected = base64_url(&a.ticket);
    if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        return Err(RouteError::BadTicket);
    }
    // Used first (a replay is a replay, whenever), then expired (the
    // sweeper also revokes what expires: that is still an expiry), then
    // revoked.
    match a.state() {
        ticket_state::CLAIMED | ticket_state::CLOSED => return Err(RouteError::TicketUsed),
        _ if now >= a.expires_at => return Err(RouteError::TicketExpired),
        ticket_state::REVOKED => return Err(RouteError::Revoked),
        _ => {}
    }
    if let Some(o) = &a.origin {
        if !up.origin.as_deref().is_some_and(|u| same_origin(u, o)) {
            return Err(RouteError::OriginMismatch);
        }
    }
    if let Some(ip) = a.client_ip {
        // An IPv4 client on a `[::]` listener shows as ::ffff:a.b.c.d.
        if peer.map(|p| p.to_canonical()) != Some(ip.to_canonical()) {
            return Err(RouteError::ClientIpMismatch);
        }
    }
    // The single use: exactly one connect on any worker wins.
    if !a.claim() {
        return Err(if a.state() == ticket_state::REVOKED {
            RouteError::Revoked
        } else {
            RouteError::TicketUsed
        });
    }
    Ok(Route {
        target: a.target.clone(),
        admission: Some(a.clone()),
    })
}

/// Origins are `scheme://host[:port]`, all of it case-insensitive (RFC 6454
/// serialises them lower-case, but a portal may record `https://Portal`).
fn same_origin(sent: &str, bound: &str) -> bool {
    sent.trim_end_matches('/')
        .eq_ignore_ascii_case(bound.trim_end_matches('/'))
}

/// The ticket as it appears in URLs (base64url, no padding).
pub fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn route_errors_agree_with_their_causes() {
        for e in [
            RouteError::TicketExpired,
            RouteError::BadTicket,
            RouteError::UnknownToken,
            RouteError::Revoked,
        ] {
            assert_eq!(Cause::from(&e).status(), Some(e.status()), "{e}");
            assert_eq!(Cause::from(&e).kind(), e.kind());
        }
    }

    #[test]
    fn route_errors_map_to_statuses() {
        assert_eq!(RouteError::UnknownToken.status(), 404);
        assert_eq!(RouteError::MissingToken.status(), 400);
        assert_eq!(RouteError::TicketUsed.status(), 403);
        assert_eq!(RouteError::TicketExpired.status(), 410);
        assert_eq!(RouteError::UnknownToken.kind(), "unknown_token");
    }

    fn upgrade(path: &str, query: Option<&str>, origin: Option<&str>) -> Upgrade {
        Upgrade {
            path: path.into(),
            query: query.map(Into::into),
            host: Some("x".into()),
            origin: origin.map(Into::into),
            key: "dGhlIHNhbXBsZSBub25jZQ==".into(),
            protocols: vec![],
            forwarded_for: None,
            bearer: None,
        }
    }

    fn admission(now: Instant, origin: Option<&str>, ip: Option<IpAddr>) -> Arc<Admission> {
        Arc::new(Admission::new(
            0xabc,
            vec![7u8; 32],
            Target::vnc("127.0.0.1:5900".parse().unwrap(), None),
            "alice".into(),
            now + Duration::from_secs(60),
            origin.map(Into::into),
            ip,
            None,
        ))
    }

    #[test]
    fn appliance_ticket_is_single_use_and_checked() {
        let now = Instant::now();
        let mut table = AdmissionTable::default();
        table.insert(admission(now, Some("https://portal"), None));
        let mut r = Router::Appliance(table);
        let good = format!("token={}", base64_url(&[7u8; 32]));
        let info = ConnInfo::default();
        let err = |r: &mut Router, u: Upgrade, t: Instant| r.route(&u, info, t).unwrap_err().kind();
        assert_eq!(
            err(&mut r, upgrade("/nope", Some(&good), None), now),
            "bad_path"
        );
        assert_eq!(
            err(&mut r, upgrade("/proxy/abd", Some(&good), None), now),
            "unknown_session"
        );
        assert_eq!(
            err(&mut r, upgrade("/proxy/abc", Some("token=AAAA"), None), now),
            "bad_ticket"
        );
        assert_eq!(
            err(&mut r, upgrade("/proxy/abc", None, None), now),
            "missing_token"
        );
        assert_eq!(
            err(
                &mut r,
                upgrade("/proxy/abc", Some(&good), Some("https://evil")),
                now
            ),
            "origin_mismatch"
        );
        assert_eq!(
            err(
                &mut r,
                upgrade("/proxy/abc", Some(&good), Some("https://portal")),
                now + Duration::from_secs(61)
            ),
            "ticket_expired"
        );
        // Origins compare case-insensitively.
        let ok = r
            .route(
                &upgrade("/proxy/abc", Some(&good), Some("HTTPS://Portal")),
                info,
                now,
            )
            .unwrap();
        assert_eq!(ok.target.addr.port(), 5900);
        assert_eq!(
            err(
                &mut r,
                upgrade("/proxy/abc", Some(&good), Some("https://portal")),
                now
            ),
            "ticket_replay"
        );
    }

    #[test]
    fn client_ip_binding_and_purge() {
        let now = Instant::now();
        let a = admission(now, None, Some("10.0.0.1".parse().unwrap()));
        let good = format!("token={}", base64_url(&[7u8; 32]));
        let mut r = Router::Fixed(Target::vnc("127.0.0.1:1".parse().unwrap(), None));
        let info = ConnInfo {
            peer: Some("10.0.0.2".parse().unwrap()),
            bound: Some(&a),
        };
        let e = r
            .route(&upgrade("/proxy/abc", Some(&good), None), info, now)
            .unwrap_err();
        assert_eq!(e.kind(), "client_ip_mismatch");
        // The right client, seen through a dual-stack listener.
        let mapped = ConnInfo {
            peer: Some("::ffff:10.0.0.1".parse().unwrap()),
            bound: Some(&a),
        };
        r.route(&upgrade("/proxy/abc", Some(&good), None), mapped, now)
            .unwrap();
        let mut t = AdmissionTable::default();
        t.insert(a.clone());
        let mut other = admission(now, None, None);
        Arc::get_mut(&mut other).unwrap().id = 0xdef;
        t.insert(other);
        assert_eq!(t.purge(now), 0);
        // Expired: kept as tombstones for a while (the 410), then forgotten.
        let later = now + Duration::from_secs(61);
        assert_eq!(t.purge(later), 0);
        assert_eq!(t.len(), 2);
        let gone = later + Duration::from_millis(TOMBSTONE_MS);
        assert_eq!(t.purge(gone), 2);
        assert!(t.is_empty());
    }
}
