//! Who a REST caller is by address, and how fast each address may call:
//! the client IP (the TCP peer, or `X-Forwarded-For` when the peer is one
//! of `[network] trusted_proxies`) and `[rate_limits] rest_per_ip_per_s`
//! on every `/api/` route (`governor`'s GCRA, a burst of one second's
//! worth). `/healthz`, `/readyz` and `/metrics` are exempt: probes and
//! scrapers often share one address and must keep seeing the truth while
//! someone else is throttled.
//!
//! The per-IP state is bounded by `rate_limits.max_tracked_ips`
//! ([`BoundedIpStore`]): at the bound a new address takes an arbitrary
//! tracked address's place (that address's budget starts afresh, which
//! only ever favours it), and the sweeper drops addresses whose budget is
//! full again ([`ClientIps::retain_recent`]) twice a second.
//!
//! Control thread only; must not depend on the data plane's sessions or
//! the IO backends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;

use super::api::ApiError;
use super::ControlState;
use crate::config::network::NetworkConfig;
use crate::config::users::RateLimitsConfig;
use crate::dataplane::client_limits;

/// The cause of a REST refusal, in `/metrics` and the log.
pub const REST_CAUSE: &str = "rate_limited_rest_per_ip";
/// REST refusal log lines per second at most (the rest are counted).
pub const REST_LOG_LINES_PER_S: u32 = 5;

/// A governor state store with at most `max` keys (see the module doc).
#[derive(Debug)]
pub struct BoundedIpStore {
    map: Mutex<HashMap<u128, Nanos>>,
    max: usize,
}

impl BoundedIpStore {
    pub fn new(max: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            max: max.max(1),
        }
    }
}

impl StateStore for BoundedIpStore {
    type Key = u128;

    fn measure_and_replace<T, F, E>(&self, key: &u128, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let Ok(mut map) = self.map.lock() else {
            // A poisoned map limits nobody rather than everybody.
            return f(None).map(|(t, _)| t);
        };
        let previous = map.get(key).copied();
        let (outcome, next) = f(previous)?;
        if previous.is_none() && map.len() >= self.max {
            if let Some(victim) = map.keys().next().copied() {
                map.remove(&victim);
            }
        }
        map.insert(*key, next);
        Ok(outcome)
    }
}

impl ShrinkableKeyedStateStore<u128> for BoundedIpStore {
    fn retain_recent(&self, drop_below: Nanos) {
        if let Ok(mut map) = self.map.lock() {
            map.retain(|_, tat| *tat > drop_below);
        }
    }

    fn shrink_to_fit(&self) {
        if let Ok(mut map) = self.map.lock() {
            map.shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type IpLimiter = RateLimiter<u128, BoundedIpStore, DefaultClock>;

/// The client address of a request, set by [`limit_rest_per_ip`] as a
/// request extension for the handlers' logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientIp(pub IpAddr);

/// The control port's view of client addresses.
pub struct ClientIps {
    trusted: Vec<IpNet>,
    forwarded_for: bool,
    rest: Option<IpLimiter>,
    log: Mutex<(Option<Instant>, u32, u64)>,
}

impl std::fmt::Debug for ClientIps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIps")
            .field("trusted", &self.trusted)
            .field("forwarded_for", &self.forwarded_for)
            .field("rest_limited", &self.rest.is_some())
            .finish()
    }
}

impl ClientIps {
    pub fn new(rates: &RateLimitsConfig, network: &NetworkConfig) -> Self {
        let rest = NonZeroU32::new(rates.rest_per_ip_per_s).and_then(|per_s| {
            Quota::with_period(Duration::from_secs(1) / per_s.get()).map(|q| {
                RateLimiter::new(
                    q.allow_burst(per_s),
                    BoundedIpStore::new(rates.max_tracked_ips),
                    DefaultClock::default(),
                )
            })
        });
        Self {
            trusted: network.trusted_networks().unwrap_or_default(),
            forwarded_for: network.forwarded_for,
            rest,
            log: Mutex::new((None, 0, 0)),
        }
    }

    /// The client of a request from `peer` with `headers`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.forwarded_for || !client_limits::is_trusted(&self.trusted, peer) {
            return peer;
        }
        // Repeated headers are one list, in order.
        let joined: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if joined.is_empty() {
            return peer;
        }
        client_limits::forwarded_client(&self.trusted, &joined.join(",")).unwrap_or(peer)
    }

    /// Take one REST request of `ip`, or say in how many seconds to retry.
    pub fn check_rest(&self, ip: IpAddr) -> Result<(), u64> {
        let Some(limiter) = &self.rest else {
            return Ok(());
        };
        limiter
            .check_key(&client_limits::ip_key(ip))
            .map_err(|not_until| {
                let wait = not_until.wait_time_from(limiter.clock().now());
                wait.as_secs_f64().ceil().max(1.0) as u64
            })
    }

    /// Forget addresses whose budget is full again (the sweeper's tick).
    pub fn retain_recent(&self) {
        if let Some(l) = &self.rest {
            l.retain_recent();
        }
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.rest.as_ref().map_or(0, |l| l.len())
    }

    /// A refusal may be logged now; how many were not since the last line.
    fn may_log(&self, now: Instant) -> Option<u64> {
        let mut log = self.log.lock().ok()?;
        let (second, lines, suppressed) = &mut *log;
        if second.is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1)) {
            *second = Some(now);
            *lines = 0;
        }
        if *lines < REST_LOG_LINES_PER_S {
            *lines += 1;
            return Some(std::mem::take(suppressed));
        }
        *suppressed += 1;
        None
    }
}

/// Middleware: the client address (a [`ClientIp`] extension) and the
/// per-IP REST limit on `/api/` routes: 429 `rate_limited` with
/// Retry-After, counted as `rate_limited_rest_per_ip`, logged (throttled).
pub async fn limit_rest_per_ip(
    State(state): State<Arc<ControlState>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<super::conn::ControlPeer>>()
        .map(|c| c.0.addr);
    let Some(peer) = peer else {
        // Served without connection info (in-process tests): no address.
        return next.run(req).await;
    };
    let client = state.clients.client_ip(peer.ip(), req.headers());
    req.extensions_mut().insert(ClientIp(client));
    if req.uri().path().starts_with("/api/") {
        if let Err(retry_after_s) = state.clients.check_rest(client) {
            state.count_error(REST_CAUSE);
            if let Some(suppressed) = state.clients.may_log(Instant::now()) {
                tracing::info!(client = %client, %peer, path = %req.uri().path(), retry_after_s, suppressed, "REST request rate-limited");
            }
            let mut err = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "too many requests from {client} ({REST_CAUSE}); retry in {retry_after_s} s"
                ),
            );
            err.retry_after_s = Some(retry_after_s);
            return err.into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn ips(per_s: u32, max: usize, trusted: &[&str]) -> ClientIps {
        ClientIps::new(
            &RateLimitsConfig {
                rest_per_ip_per_s: per_s,
                max_tracked_ips: max,
                ..RateLimitsConfig::default()
            },
            &NetworkConfig {
                trusted_proxies: trusted.iter().map(|s| s.to_string()).collect(),
                ..NetworkConfig::default()
            },
        )
    }

    #[test]
    fn per_ip_budget_refuses_with_a_retry_time_and_stays_bounded() {
        let c = ips(2, 4, &[]);
        c.check_rest(ip("192.0.2.1")).unwrap();
        c.check_rest(ip("192.0.2.1")).unwrap();
        assert_eq!(c.check_rest(ip("192.0.2.1")), Err(1));
        c.check_rest(ip("192.0.2.2")).unwrap();
        for i in 0..100u8 {
            let _ = c.check_rest(IpAddr::from([198, 51, 100, i]));
        }
        assert!(c.tracked() <= 4, "{}", c.tracked());
        let off = ips(0, 4, &[]);
        for _ in 0..100 {
            off.check_rest(ip("192.0.2.1")).unwrap();
        }
    }

    #[test]
    fn forwarded_for_only_from_trusted_peers() {
        let c = ips(0, 64, &["127.0.0.1"]);
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "6.6.6.6, 203.0.113.7".parse().unwrap());
        h.append("x-forwarded-for", "127.0.0.1".parse().unwrap());
        assert_eq!(c.client_ip(ip("127.0.0.1"), &h), ip("203.0.113.7"));
        assert_eq!(c.client_ip(ip("127.0.0.2"), &h), ip("127.0.0.2"));
        assert_eq!(
            c.client_ip(ip("127.0.0.1"), &HeaderMap::new()),
            ip("127.0.0.1")
        );
    }
}
