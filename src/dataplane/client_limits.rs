//! Per-client-IP limits on the console port, and who the client is behind
//! a load balancer: `[rate_limits] handshakes_per_ip_per_s`,
//! `handshaking_per_ip`, `handshaking_total`, and `[network]`'s trusted
//! proxies, PROXY protocol mode and `X-Forwarded-For`.
//!
//! Lock-free: the workers share one fixed-size table of client slots
//! ([`IpTable`], `max_tracked_ips` slots of 24 bytes, allocated once) and
//! one atomic count of connections in their handshake. A slot holds an
//! IP's tag, its GCRA "theoretical arrival time" and its count of
//! connections in the handshake, each an atomic. That is why the per-IP
//! rate stays right across workers: every worker spends from the same
//! slot with a compare-and-swap, so n connections of one IP cost n cells
//! whichever workers accept them (no per-worker share to tune, no
//! message between workers). An IP is found by a keyed hash (SipHash with
//! a per-process key, so a client cannot aim at a slot) and at most
//! [`PROBE_SLOTS`] neighbouring slots; a slot is taken over once its IP is
//! idle (nothing in the handshake, rate budget full again), so the table
//! never grows and needs no sweeper. When all candidate slots of a new IP
//! are busy, that IP goes unlimited for this connection (counted as
//! `client_table_full`): refusing it instead would let whoever fills the
//! table lock everyone else out. `handshaking_total` still bounds it.
//!
//! Two connections of an IP never seen before, accepted at the same
//! instant on two workers, may claim two slots; the second becomes idle
//! and is reused. The budget of that IP is then split for that moment:
//! approximate by at most one burst, never unbounded.
//!
//! Must not depend on the IO backends, the control plane or a runtime;
//! the sessions (`session::edge`) call it with the time passed in.

use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::cause::Cause;
use crate::config::network::{NetworkConfig, ProxyProtocolMode};
use crate::config::users::RateLimitsConfig;

/// Slots looked at for one IP (a cache line and a half of neighbours).
pub const PROBE_SLOTS: usize = 8;
/// Most `X-Forwarded-For` entries looked at, from the right.
pub const MAX_FORWARDED_ENTRIES: usize = 64;
/// Retry-After of a refusal for a count (in the handshake) rather than a
/// rate: a handshake takes well under a second.
pub const COUNT_RETRY_AFTER_S: u64 = 1;
/// Refusal log lines per worker per second at most; the rest are counted
/// (in `/metrics` anyway) and summed into the next line.
pub const REFUSAL_LOG_LINES_PER_S: u32 = 5;

/// The console port's client policy, from the appliance config.
#[derive(Debug, Clone, Default)]
pub struct ClientPolicy {
    /// 0 = off.
    pub handshakes_per_ip_per_s: u32,
    /// 0 = off.
    pub handshaking_per_ip: u32,
    /// 0 = off.
    pub handshaking_total: u32,
    /// Slots of the shared table (rounded up to a power of two).
    pub max_tracked_ips: usize,
    pub trusted_proxies: Vec<IpNet>,
    pub proxy_protocol: Option<ProxyProtocolMode>,
    pub forwarded_for: bool,
}

impl ClientPolicy {
    /// From `[rate_limits]` and `[network]` (validated already: an invalid
    /// trusted-proxy entry is left out here).
    pub fn from_config(rates: &RateLimitsConfig, network: &NetworkConfig) -> Self {
        Self {
            handshakes_per_ip_per_s: rates.handshakes_per_ip_per_s,
            handshaking_per_ip: rates.handshaking_per_ip,
            handshaking_total: rates.handshaking_total,
            max_tracked_ips: rates.max_tracked_ips,
            trusted_proxies: network.trusted_networks().unwrap_or_default(),
            proxy_protocol: Some(network.console_proxy_protocol),
            forwarded_for: network.forwarded_for,
        }
    }

    fn per_ip_on(&self) -> bool {
        self.handshakes_per_ip_per_s > 0 || self.handshaking_per_ip > 0
    }

    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        is_trusted(&self.trusted_proxies, ip)
    }
}

/// `ip` is one of `trusted` (IPv4-mapped IPv6 counts as IPv4).
pub fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    trusted.iter().any(|net| net.contains(&ip))
}

/// The client named by an `X-Forwarded-For` value that a trusted proxy
/// `peer` passed on: the right-most address that is not itself a trusted
/// proxy (anything left of it was written by the client and proves
/// nothing). All trusted: the left-most. None when an entry that must be
/// read is not an address (a forged or broken header: the peer stands).
pub fn forwarded_client(trusted: &[IpNet], header: &str) -> Option<IpAddr> {
    let mut last = None;
    for entry in header.rsplit(',').take(MAX_FORWARDED_ENTRIES) {
        let ip = parse_forwarded_entry(entry.trim())?;
        if !is_trusted(trusted, ip) {
            return Some(ip.to_canonical());
        }
        last = Some(ip.to_canonical());
    }
    last
}

/// One `X-Forwarded-For` entry: an address, maybe with a port
/// (`192.0.2.1:5000`, `[2001:db8::1]:5000`).
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

/// What a client is keyed by: an IPv4 address, or an IPv6 client's /64
/// (one host usually owns a whole /64 and may pick any address in it).
pub fn ip_key(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => (u128::from(v6) >> 64) | (1u128 << 127),
    }
}

/// One tracked IP.
#[derive(Debug, Default)]
struct Slot {
    /// Hash of the IP's key, never 0; 0 = free.
    tag: AtomicU64,
    /// GCRA theoretical arrival time, µs since the table's epoch.
    tat_us: AtomicU64,
    /// Connections of this IP in their handshake.
    handshaking: AtomicU32,
}

/// The shared table of client IPs (see the module doc).
#[derive(Debug)]
pub struct IpTable {
    slots: Box<[Slot]>,
    mask: usize,
    hasher: std::hash::RandomState,
    epoch: Instant,
}

impl IpTable {
    pub fn new(max_tracked_ips: usize, epoch: Instant) -> Self {
        let n = max_tracked_ips.max(PROBE_SLOTS).next_power_of_two();
        Self {
            slots: (0..n).map(|_| Slot::default()).collect(),
            mask: n - 1,
            hasher: std::hash::RandomState::new(),
            epoch,
        }
    }

    fn micros(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_micros() as u64
    }

    /// The slot of `ip`: its own, or a free or idle one taken over; None
    /// when every candidate is busy with another IP.
    fn slot_of(&self, ip: IpAddr, now_us: u64) -> Option<usize> {
        let tag = self.hasher.hash_one(ip_key(ip)) | 1;
        let start = tag as usize & self.mask;
        let candidates = (0..PROBE_SLOTS).map(|i| (start + i) & self.mask);
        for i in candidates.clone() {
            if self.slots[i].tag.load(Ordering::Acquire) == tag {
                return Some(i);
            }
        }
        for i in candidates {
            let s = &self.slots[i];
            let old = s.tag.load(Ordering::Acquire);
            // Idle: its IP has nothing in the handshake and a full budget
            // (a fresh slot would be the same), so nobody loses anything.
            let idle = old == 0
                || (s.handshaking.load(Ordering::Acquire) == 0
                    && s.tat_us.load(Ordering::Acquire) <= now_us);
            if idle
                && s.tag
                    .compare_exchange(old, tag, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Some(i);
            }
        }
        None
    }

    /// Spend one cell of `slot`'s GCRA budget (`per_s` a second, a burst
    /// of `per_s`), or say how long until one is free.
    fn take_cell(&self, slot: usize, per_s: u32, now_us: u64) -> Result<(), Duration> {
        let interval = (1_000_000 / u64::from(per_s.max(1))).max(1);
        let tolerance = interval * u64::from(per_s.max(1) - 1);
        let tat = &self.slots[slot].tat_us;
        let mut current = tat.load(Ordering::Acquire);
        loop {
            let base = current.max(now_us);
            if base - now_us > tolerance {
                return Err(Duration::from_micros(base - now_us - tolerance));
            }
            match tat.compare_exchange_weak(
                current,
                base + interval,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }

    /// One more connection of `slot` in the handshake, unless `max` are.
    fn enter(&self, slot: usize, max: u32) -> bool {
        let count = &self.slots[slot].handshaking;
        let before = count.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            count.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn leave(&self, slot: usize) {
        let count = &self.slots[slot].handshaking;
        let before = count.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "a leave without its enter");
    }

    /// Connections in the handshake of `ip`'s slot (tests, diagnostics).
    pub fn handshaking_of(&self, ip: IpAddr) -> u32 {
        let tag = self.hasher.hash_one(ip_key(ip)) | 1;
        let start = tag as usize & self.mask;
        (0..PROBE_SLOTS)
            .map(|i| &self.slots[(start + i) & self.mask])
            .find(|s| s.tag.load(Ordering::Acquire) == tag)
            .map_or(0, |s| s.handshaking.load(Ordering::Acquire))
    }
}

/// What all workers share: the policy, the table (when a per-IP limit is
/// on) and the count of connections in their handshake (when
/// `handshaking_total` is on).
#[derive(Debug)]
pub struct ClientLimits {
    pub policy: ClientPolicy,
    table: Option<IpTable>,
    handshaking: AtomicU32,
}

impl ClientLimits {
    pub fn new(policy: ClientPolicy, epoch: Instant) -> Arc<Self> {
        let table = policy
            .per_ip_on()
            .then(|| IpTable::new(policy.max_tracked_ips, epoch));
        Arc::new(Self {
            policy,
            table,
            handshaking: AtomicU32::new(0),
        })
    }

    /// Connections counted in the handshake now (`handshaking_total`).
    pub fn handshaking(&self) -> u32 {
        self.handshaking.load(Ordering::Acquire)
    }

    pub fn table(&self) -> Option<&IpTable> {
        self.table.as_ref()
    }
}

/// A limit said no: the cause (counted, logged, the JSON code) and when to
/// come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub cause: Cause,
    pub retry_after_s: u64,
}

/// A connection's places in the handshake counts (total and its IP's),
/// given back on drop: when the handshake ends, however it ends.
#[derive(Debug, Default)]
pub struct ClientPass {
    total: Option<Arc<ClientLimits>>,
    ip: Option<(Arc<ClientLimits>, usize)>,
}

impl Drop for ClientPass {
    fn drop(&mut self) {
        if let Some(limits) = self.total.take() {
            limits.handshaking.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some((limits, slot)) = self.ip.take() {
            if let Some(t) = &limits.table {
                t.leave(slot);
            }
        }
    }
}

impl ClientPass {
    /// Holds a place in `handshaking_total`.
    pub fn counts_total(&self) -> bool {
        self.total.is_some()
    }
}

/// How a new connection's client is to be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientSource {
    /// The TCP peer is the client: check it now.
    Peer,
    /// A trusted proxy that sends (or may send) a PROXY header.
    ProxyHeader { required: bool },
    /// A trusted proxy whose `X-Forwarded-For` names the client: checked
    /// once the request head is read.
    Forwarded,
}

/// One worker's side: the shared limits plus its own refusal-log throttle.
#[derive(Debug)]
pub struct ClientGate {
    pub shared: Arc<ClientLimits>,
    log_second: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl ClientGate {
    pub fn new(shared: Arc<ClientLimits>) -> Self {
        Self {
            shared,
            log_second: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// How the client of a connection from `peer` is to be known.
    pub fn source_of(&self, peer: Option<SocketAddr>) -> ClientSource {
        let p = &self.shared.policy;
        let trusted = peer.is_some_and(|a| p.is_trusted(a.ip()));
        match (trusted, p.proxy_protocol) {
            (false, _) => ClientSource::Peer,
            (true, Some(ProxyProtocolMode::Required)) => {
                ClientSource::ProxyHeader { required: true }
            }
            (true, Some(ProxyProtocolMode::Optional)) => {
                ClientSource::ProxyHeader { required: false }
            }
            (true, _) if p.forwarded_for => ClientSource::Forwarded,
            (true, _) => ClientSource::Peer,
        }
    }

    /// A connection was accepted: its place in `handshaking_total`. The
    /// pass it fills is the connection's until its handshake ends.
    pub fn enter_total(&self, pass: &mut ClientPass) -> Result<(), Refusal> {
        let max = self.shared.policy.handshaking_total;
        if max == 0 || pass.total.is_some() {
            return Ok(());
        }
        let before = self.shared.handshaking.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            self.shared.handshaking.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal {
                cause: Cause::HandshakingTotalOverLimit,
                retry_after_s: COUNT_RETRY_AFTER_S,
            });
        }
        pass.total = Some(self.shared.clone());
        Ok(())
    }

    /// The client is known: spend a cell of its rate and take its place
    /// among its connections in the handshake. `Ok(false)`: the table had
    /// no room for it (not limited; the caller counts it).
    pub fn enter_ip(
        &self,
        pass: &mut ClientPass,
        ip: IpAddr,
        now: Instant,
    ) -> Result<bool, Refusal> {
        let (Some(table), true) = (&self.shared.table, pass.ip.is_none()) else {
            return Ok(true);
        };
        let p = &self.shared.policy;
        let now_us = table.micros(now);
        let Some(slot) = table.slot_of(ip, now_us) else {
            return Ok(false);
        };
        if p.handshakes_per_ip_per_s > 0 {
            if let Err(wait) = table.take_cell(slot, p.handshakes_per_ip_per_s, now_us) {
                return Err(Refusal {
                    cause: Cause::RateLimitedHandshakes,
                    retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
        }
        if p.handshaking_per_ip > 0 {
            if !table.enter(slot, p.handshaking_per_ip) {
                return Err(Refusal {
                    cause: Cause::HandshakingPerIpOverLimit,
                    retry_after_s: COUNT_RETRY_AFTER_S,
                });
            }
            pass.ip = Some((self.shared.clone(), slot));
        }
        Ok(true)
    }

    /// Whether a refusal may be logged now (at most
    /// [`REFUSAL_LOG_LINES_PER_S`] a second per worker), and how many were
    /// left unlogged since the last line.
    pub fn may_log(&mut self, now: Instant) -> Option<u64> {
        let new_second = self
            .log_second
            .is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1));
        if new_second {
            self.log_second = Some(now);
            self.logged = 0;
        }
        if self.logged < REFUSAL_LOG_LINES_PER_S {
            self.logged += 1;
            return Some(std::mem::take(&mut self.suppressed));
        }
        self.suppressed += 1;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn gate(policy: ClientPolicy) -> ClientGate {
        ClientGate::new(ClientLimits::new(policy, Instant::now()))
    }

    #[test]
    fn rate_per_ip_refuses_past_the_burst_and_recovers() {
        let g = gate(ClientPolicy {
            handshakes_per_ip_per_s: 3,
            max_tracked_ips: 64,
            ..ClientPolicy::default()
        });
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(g.enter_ip(&mut ClientPass::default(), a, t0), Ok(true));
        }
        let r = g.enter_ip(&mut ClientPass::default(), a, t0).unwrap_err();
        assert_eq!(r.cause, Cause::RateLimitedHandshakes);
        assert_eq!(r.retry_after_s, 1);
        // Another IP has its own budget.
        assert_eq!(
            g.enter_ip(&mut ClientPass::default(), ip("192.0.2.2"), t0),
            Ok(true)
        );
        // One cell back every 1/3 s.
        let later = t0 + Duration::from_millis(340);
        assert_eq!(g.enter_ip(&mut ClientPass::default(), a, later), Ok(true));
        assert!(g.enter_ip(&mut ClientPass::default(), a, later).is_err());
    }

    #[test]
    fn handshaking_per_ip_and_total_are_given_back_on_drop() {
        let g = gate(ClientPolicy {
            handshaking_per_ip: 2,
            handshaking_total: 3,
            max_tracked_ips: 64,
            ..ClientPolicy::default()
        });
        let now = Instant::now();
        let a = ip("2001:db8::1");
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut p = ClientPass::default();
            g.enter_total(&mut p).unwrap();
            g.enter_ip(&mut p, a, now).unwrap();
            held.push(p);
        }
        // Same /64: the same client.
        let mut p = ClientPass::default();
        g.enter_total(&mut p).unwrap();
        let r = g.enter_ip(&mut p, ip("2001:db8::2"), now).unwrap_err();
        assert_eq!(r.cause, Cause::HandshakingPerIpOverLimit);
        assert_eq!(g.shared.table().unwrap().handshaking_of(a), 2);
        // The third total place is `p`'s; a fourth is refused.
        let r = g.enter_total(&mut ClientPass::default()).unwrap_err();
        assert_eq!(r.cause, Cause::HandshakingTotalOverLimit);
        drop(p);
        held.pop();
        assert_eq!(g.shared.handshaking(), 1);
        assert_eq!(g.shared.table().unwrap().handshaking_of(a), 1);
        let mut p = ClientPass::default();
        g.enter_total(&mut p).unwrap();
        g.enter_ip(&mut p, ip("2001:db8::3"), now).unwrap();
        drop((p, held));
        assert_eq!(g.shared.handshaking(), 0);
        assert_eq!(g.shared.table().unwrap().handshaking_of(a), 0);
    }

    #[test]
    fn a_full_table_reuses_idle_slots_and_never_grows() {
        let g = gate(ClientPolicy {
            handshaking_per_ip: 1,
            max_tracked_ips: 8,
            ..ClientPolicy::default()
        });
        let now = Instant::now();
        let mut held = Vec::new();
        let mut unlimited = 0;
        for i in 0..32u8 {
            let mut p = ClientPass::default();
            match g.enter_ip(&mut p, IpAddr::from([10, 0, 0, i]), now) {
                Ok(true) => held.push(p),
                Ok(false) => unlimited += 1,
                Err(r) => panic!("{r:?}"),
            }
        }
        // 8 slots, all busy: 8 tracked, the rest unlimited (counted).
        assert_eq!((held.len(), unlimited), (8, 24));
        held.clear();
        // Idle again: new IPs take the slots over.
        for i in 100..108u8 {
            let mut p = ClientPass::default();
            assert_eq!(
                g.enter_ip(&mut p, IpAddr::from([10, 0, 0, i]), now),
                Ok(true)
            );
            held.push(p);
        }
        assert_eq!(g.shared.table().unwrap().slots.len(), 8);
    }

    #[test]
    fn trusted_and_forwarded_for() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(is_trusted(&trusted, ip("10.9.9.9")));
        assert!(is_trusted(&trusted, ip("::ffff:10.1.1.1")));
        assert!(!is_trusted(&trusted, ip("11.0.0.1")));
        let f = |h: &str| forwarded_client(&trusted, h);
        assert_eq!(f("203.0.113.5"), Some(ip("203.0.113.5")));
        // The client may write anything on the left: the right-most
        // untrusted entry counts.
        assert_eq!(f("1.1.1.1, 203.0.113.5, 10.0.0.2"), Some(ip("203.0.113.5")));
        assert_eq!(f("garbage, 203.0.113.5"), Some(ip("203.0.113.5")));
        assert_eq!(f("10.0.0.3,10.0.0.2"), Some(ip("10.0.0.3")));
        assert_eq!(f("[2001:db8::7]:443"), Some(ip("2001:db8::7")));
        assert_eq!(f("198.51.100.1:8080"), Some(ip("198.51.100.1")));
        assert_eq!(f("203.0.113.5, bogus"), None);
        assert_eq!(f(""), None);
    }

    #[test]
    fn sources_by_peer_and_mode() {
        let policy = |mode| ClientPolicy {
            trusted_proxies: vec!["127.0.0.1/32".parse().unwrap()],
            proxy_protocol: Some(mode),
            forwarded_for: true,
            ..ClientPolicy::default()
        };
        let lb = Some("127.0.0.1:5000".parse().unwrap());
        let other = Some("127.0.0.2:5000".parse().unwrap());
        let g = gate(policy(ProxyProtocolMode::Required));
        assert_eq!(
            g.source_of(lb),
            ClientSource::ProxyHeader { required: true }
        );
        assert_eq!(g.source_of(other), ClientSource::Peer);
        let g = gate(policy(ProxyProtocolMode::Off));
        assert_eq!(g.source_of(lb), ClientSource::Forwarded);
        assert_eq!(g.source_of(None), ClientSource::Peer);
    }

    #[test]
    fn refusal_logging_is_throttled_per_second() {
        let mut g = gate(ClientPolicy::default());
        let t0 = Instant::now();
        let logged = (0..20).filter(|_| g.may_log(t0).is_some()).count();
        assert_eq!(logged, REFUSAL_LOG_LINES_PER_S as usize);
        assert_eq!(g.may_log(t0 + Duration::from_secs(1)), Some(15));
    }
}
