//! Sessions admitted but not yet connected, carried across an upgrade
//! hand-off: taken from the previous process's registry
//! ([`take_pending`]: each admission is claimed there first, so no
//! connection in the old process can use its ticket once it is handed
//! over), and admitted again in the new one ([`admit_pending`]: the
//! registry record, every worker's admission table, and for a
//! dedicated-port session its port, bound again).
//!
//! Which sessions cannot be carried: those whose target is a WebMKS
//! endpoint (its TLS trust is built from the hypervisor's answer and is
//! not kept beside the admission), counted and logged; they stay in the
//! old process, where nothing reaches them, and expire.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::registry::{self, PortMode, Record, State, TargetView};
use crate::control::ControlState;
use crate::mailbox::{Admission, Target, TargetKind, ToWorker};

/// One pending session as it crosses to the new process.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PendingSession {
    pub id: u64,
    /// The single-use ticket, hex.
    pub ticket_hex: String,
    pub user: String,
    pub vm_id: Option<String>,
    /// The resolved backend.
    pub backend: SocketAddr,
    /// The backend's VNC password (the appliance answers VNC
    /// authentication itself).
    pub password: Option<String>,
    pub view_kind: String,
    pub view_host: String,
    pub view_port: u16,
    pub origin: Option<String>,
    pub client_ip: Option<IpAddr>,
    pub port: Option<u16>,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// Time left on the ticket when it was handed over.
    pub ttl_left_ms: u64,
}

// By hand: neither the ticket nor the password may reach a log line.
impl std::fmt::Debug for PendingSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSession")
            .field("id", &registry::id_hex(self.id))
            .field("ticket", &"<redacted>")
            .field("user", &self.user)
            .field("backend", &self.backend)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("port", &self.port)
            .field("ttl_left_ms", &self.ttl_left_ms)
            .finish()
    }
}

/// Take every pending session out of this process's registry: claim its
/// admission (so a connection still reaching this process cannot use the
/// ticket), then close it. Returns them and how many could not be carried.
pub fn take_pending(state: &ControlState, now: Instant) -> (Vec<PendingSession>, usize) {
    let records = match state.registry.lock() {
        Ok(r) => r.list(now),
        Err(_) => return (Vec::new(), 0),
    };
    let mut taken = Vec::new();
    let mut left = 0;
    for r in records {
        if r.state != State::Pending {
            continue;
        }
        let Some(a) = r.admission.as_ref() else {
            continue;
        };
        let TargetKind::Vnc { password } = &a.target.kind else {
            left += 1;
            continue;
        };
        // Claimed by a browser a moment ago: it stays here, live.
        if !a.claim() {
            continue;
        }
        a.close();
        taken.push(PendingSession {
            id: a.id,
            ticket_hex: hex(&a.ticket),
            user: a.user.clone(),
            vm_id: r.vm_id.clone(),
            backend: a.target.addr,
            password: password.clone(),
            view_kind: r.target.kind.clone(),
            view_host: r.target.host.clone(),
            view_port: r.target.port,
            origin: a.origin.clone(),
            client_ip: a.client_ip,
            port: a.port,
            created_at_ms: r.created_at_ms,
            expires_at_ms: r.expires_at_ms,
            ttl_left_ms: a.expires_at.saturating_duration_since(now).as_millis() as u64,
        });
    }
    (taken, left)
}

/// Admit handed-over sessions in this (the new) process. `demo` maps the
/// previous process's demo console address to this one's. Returns how many
/// were admitted; the others are logged.
pub fn admit_pending(
    state: &ControlState,
    sessions: Vec<PendingSession>,
    demo: Option<(SocketAddr, SocketAddr)>,
    now: Instant,
) -> usize {
    let mut admitted = 0;
    for s in sessions {
        let id = s.id;
        match admit_one(state, s, demo, now) {
            Ok(()) => admitted += 1,
            Err(why) => {
                tracing::warn!(session = %registry::id_hex(id), reason = %why, "handed-over session dropped")
            }
        }
    }
    admitted
}

fn admit_one(
    state: &ControlState,
    s: PendingSession,
    demo: Option<(SocketAddr, SocketAddr)>,
    now: Instant,
) -> Result<(), String> {
    if s.ttl_left_ms == 0 {
        return Err("ticket expired during the hand-off".into());
    }
    let ticket = unhex(&s.ticket_hex).ok_or("ticket is not hex")?;
    let backend = match demo {
        Some((old, new)) if s.backend == old => new,
        _ => s.backend,
    };
    let expires = now + Duration::from_millis(s.ttl_left_ms);
    let dedicated = match s.port {
        Some(port) => Some(rebind(state, port, s.id)?),
        None => None,
    };
    let admission = Arc::new(Admission::new(
        s.id,
        ticket,
        Target::vnc(backend, s.password.clone()),
        s.user.clone(),
        expires,
        s.origin.clone(),
        s.client_ip,
        s.port,
    ));
    let view = TargetView {
        kind: s.view_kind.clone(),
        host: s.view_host.clone(),
        port: s.view_port,
        has_password: s.password.is_some(),
    };
    let mode = if s.port.is_some() {
        PortMode::Dedicated
    } else {
        PortMode::Shared
    };
    let record = Record::pending(
        s.id,
        s.user,
        s.vm_id,
        view,
        mode,
        s.port,
        s.created_at_ms,
        s.expires_at_ms,
        now,
        expires,
        Some(admission.clone()),
    );
    state
        .registry
        .lock()
        .map_err(|_| "registry unavailable")?
        .insert(record);
    let sent = match dedicated {
        Some(listener) => {
            let w = state.pick_worker();
            state.workers[w]
                .send(ToWorker::AdmitDedicated(admission.clone(), listener))
                .map_err(|e| e.to_string())
        }
        None => state.workers.iter().try_for_each(|w| {
            w.send(ToWorker::Admit(admission.clone()))
                .map_err(|e| e.to_string())
        }),
    };
    if let Err(e) = sent {
        admission.revoke();
        state.send_revoke(s.id);
        if let (Some(pool), Some(port)) = (&state.ports, s.port) {
            pool.release(port, s.id);
        }
        if let Ok(mut r) = state.registry.lock() {
            r.rollback(s.id);
        }
        return Err(format!("a worker mailbox refused it: {e}"));
    }
    if s.port.is_some() {
        crate::control::mark_ports_dirty(state);
    }
    Ok(())
}

/// Bind a dedicated session's port again (the previous process closed
/// its listener when it stopped accepting) and record it in the pool.
fn rebind(state: &ControlState, port: u16, owner: u64) -> Result<TcpListener, String> {
    let pool = state
        .ports
        .as_ref()
        .ok_or("dedicated ports are not configured")?;
    match pool.owner_of(port) {
        Some(o) if o == owner => {}
        Some(_) => return Err(format!("port {port} belongs to another session")),
        None => {
            if !pool.restore_claim(port, owner, registry::unix_ms(std::time::SystemTime::now())) {
                return Err(format!("port {port} is outside the range"));
            }
        }
    }
    let addr = SocketAddr::new(state.cfg.dedicated_listen_ip(), port);
    let bound = (|| {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok::<TcpListener, std::io::Error>(socket.into())
    })();
    bound.map_err(|e| {
        pool.release(port, owner);
        format!("port {port}: {e}")
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_round_trip_as_hex() {
        let t = vec![0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&t), "0001abff");
        assert_eq!(unhex("0001abff").unwrap(), t);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }

    #[test]
    fn debug_redacts_secrets() {
        let s = PendingSession {
            id: 1,
            ticket_hex: "deadbeefdeadbeef".into(),
            user: "u".into(),
            vm_id: None,
            backend: "127.0.0.1:5900".parse().unwrap(),
            password: Some("sekrit".into()),
            view_kind: "vnc".into(),
            view_host: "127.0.0.1".into(),
            view_port: 5900,
            origin: None,
            client_ip: None,
            port: None,
            created_at_ms: 0,
            expires_at_ms: 0,
            ttl_left_ms: 10,
        };
        let d = format!("{s:?}");
        assert!(!d.contains("deadbeef") && !d.contains("sekrit"), "{d}");
    }
}
