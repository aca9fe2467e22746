//! Rate limits of the control plane (`[rate_limits]`, the `governor`
//! crate's GCRA): console creation per user per minute, hour and day. A
//! limit of n per window allows a burst of n, then one more every
//! window / n; 0 turns it off.
//!
//! Lives on the control thread only; must not depend on the data plane.
//! Per-user state is dropped once it is back to full capacity (the
//! sweeper calls [`UserRates::retain_recent`]), so memory follows the users
//! active within the longest window, not every user ever seen.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::config::users::RateLimitsConfig;

type Keyed = RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>;

/// A refusal: its cause (counted in `/metrics`) and when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub cause: &'static str,
    pub retry_after_s: u64,
}

/// Console creations per user, in up to three windows.
pub struct UserRates {
    windows: Vec<(&'static str, Keyed)>,
}

impl std::fmt::Debug for UserRates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.windows.iter().map(|(n, _)| *n).collect();
        f.debug_struct("UserRates")
            .field("windows", &names)
            .finish()
    }
}

impl UserRates {
    pub fn new(cfg: &RateLimitsConfig) -> Self {
        let mut windows = Vec::new();
        for (cause, per_window, window_s) in [
            (
                "rate_limited_sessions_per_minute",
                cfg.sessions_per_user_per_minute,
                60u64,
            ),
            (
                "rate_limited_sessions_per_hour",
                cfg.sessions_per_user_per_hour,
                3_600,
            ),
            (
                "rate_limited_sessions_per_day",
                cfg.sessions_per_user_per_day,
                86_400,
            ),
        ] {
            let Some(burst) = NonZeroU32::new(per_window) else {
                continue;
            };
            let period = Duration::from_secs(window_s) / per_window;
            if let Some(quota) = Quota::with_period(period) {
                windows.push((cause, RateLimiter::keyed(quota.allow_burst(burst))));
            }
        }
        Self { windows }
    }

    /// Take one console creation of `user` from every window, or say which
    /// window refuses and for how long. A refusal by a later window still
    /// spends a cell of the earlier ones (a refused attempt is an attempt).
    pub fn check(&self, user: &str) -> Result<(), Limited> {
        if self.windows.is_empty() {
            return Ok(());
        }
        let key = user.to_string();
        for (cause, limiter) in &self.windows {
            if let Err(not_until) = limiter.check_key(&key) {
                let wait = not_until.wait_time_from(limiter.clock().now());
                return Err(Limited {
                    cause,
                    retry_after_s: wait.as_secs_f64().ceil().max(1.0) as u64,
                });
            }
        }
        Ok(())
    }

    /// Forget users whose windows are full again.
    pub fn retain_recent(&self) {
        for (_, limiter) in &self.windows {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Users with state in any window.
    pub fn tracked(&self) -> usize {
        self.windows.iter().map(|(_, l)| l.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_window_refuses_with_its_cause_and_a_retry_time() {
        let rates = UserRates::new(&RateLimitsConfig {
            sessions_per_user_per_minute: 3,
            sessions_per_user_per_hour: 4,
            sessions_per_user_per_day: 0,
            ..RateLimitsConfig::default()
        });
        for _ in 0..3 {
            rates.check("alice").unwrap();
        }
        let e = rates.check("alice").unwrap_err();
        assert_eq!(e.cause, "rate_limited_sessions_per_minute");
        // One cell back every 20 s.
        assert!((1..=20).contains(&e.retry_after_s), "{e:?}");
        // Another user has their own budget.
        rates.check("bob").unwrap();
        assert_eq!(rates.tracked(), 4);
        let off = UserRates::new(&RateLimitsConfig::default());
        for _ in 0..1000 {
            off.check("alice").unwrap();
        }
        // The hour window: 4 per hour, the minute one allows 3 at once.
        let hourly = UserRates::new(&RateLimitsConfig {
            sessions_per_user_per_minute: 0,
            sessions_per_user_per_hour: 2,
            sessions_per_user_per_day: 0,
            ..RateLimitsConfig::default()
        });
        hourly.check("c").unwrap();
        hourly.check("c").unwrap();
        let e = hourly.check("c").unwrap_err();
        assert_eq!(e.cause, "rate_limited_sessions_per_hour");
        assert!(e.retry_after_s > 60 && e.retry_after_s <= 1800, "{e:?}");
    }
}
