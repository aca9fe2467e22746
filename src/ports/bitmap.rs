//! The range type and the lock-free bitmap itself (no sockets, no files).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use super::PortError;

/// Utilization (percent of the range allocated) from which health is
/// `warning`: an operator should widen the range before sessions are refused.
pub const HEALTH_WARNING_PERCENT: f64 = 80.0;
/// Utilization from which health is `critical`: a burst of new sessions can
/// exhaust the pool and get 503s.
pub const HEALTH_CRITICAL_PERCENT: f64 = 95.0;

/// Attempts to claim a bit within one word during one scan before moving on.
/// Each failed attempt means another thread claimed that very bit (progress
/// for the system), so this only bounds one caller's work under heavy churn;
/// it is two words' worth so a plain race for the same word never gives up.
const CLAIM_ATTEMPTS_PER_WORD: usize = 128;

const BITS: usize = 64;

/// An inclusive range of TCP ports, never empty and never containing port 0
/// (0 asks the OS for "any port", which a dedicated listener must not get).
///
/// The fields are private so an invalid range cannot be built; parse one from
/// `"6100-6999"` (or a single `"6100"`) or use [`PortRange::new`]. In serde
/// it is the same string, so it reads naturally from TOML config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    first: u16,
    last: u16,
}

impl PortRange {
    /// The default range of the issue: 6100–6999 (900 ports).
    pub const DEFAULT: PortRange = PortRange {
        first: 6100,
        last: 6999,
    };

    /// A validated range; the error names what is wrong.
    pub fn new(first: u16, last: u16) -> Result<Self, PortError> {
        let bad = |reason: String| PortError::InvalidRange {
            input: format!("{first}-{last}"),
            reason,
        };
        if first == 0 {
            return Err(bad(
                "port 0 means \"any port\" and cannot be in a range".into()
            ));
        }
        if first > last {
            return Err(bad(format!(
                "first port {first} is greater than last port {last}"
            )));
        }
        Ok(Self { first, last })
    }

    pub fn first(&self) -> u16 {
        self.first
    }

    pub fn last(&self) -> u16 {
        self.last
    }

    /// Number of ports in the range (at least 1, at most 65535).
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Always false: an empty range cannot be built. Present because a
    /// `len` without it draws a lint, and callers may find it clearer.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Index of `port` within the range, if it is inside.
    pub(super) fn index_of(&self, port: u16) -> Option<usize> {
        self.contains(port).then(|| usize::from(port - self.first))
    }

    /// Port at `index`; only called with indices below `len()`.
    pub(super) fn port_at(&self, index: usize) -> u16 {
        // `index < len() <= 65535` and `first + index <= last`, so this
        // neither truncates nor overflows; saturate anyway rather than panic.
        self.first.saturating_add(index as u16)
    }
}

impl Default for PortRange {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = PortError;

    /// `"6100-6999"` (inclusive), or `"6100"` for a single port; spaces
    /// around the numbers are allowed.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: String| PortError::InvalidRange {
            input: s.to_string(),
            reason,
        };
        let parse = |part: &str, which: &str| {
            let part = part.trim();
            if part.is_empty() {
                return Err(bad(format!(
                    "{which} port is missing (expected FIRST-LAST)"
                )));
            }
            part.parse::<u16>().map_err(|_| {
                bad(format!(
                    "{which} port {part:?} is not a number between 1 and 65535"
                ))
            })
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse(a, "first")?, parse(b, "last")?),
            None => {
                let p = parse(s, "first")?;
                (p, p)
            }
        };
        PortRange::new(first, last).map_err(|e| match e {
            PortError::InvalidRange { reason, .. } => bad(reason),
            other => other,
        })
    }
}

impl TryFrom<String> for PortRange {
    type Error = PortError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> String {
        r.to_string()
    }
}

/// Pool health from utilization; thresholds are [`HEALTH_WARNING_PERCENT`]
/// and [`HEALTH_CRITICAL_PERCENT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Below 80 % allocated.
    Ok,
    /// From 80 % up to (not including) 95 %.
    Warning,
    /// 95 % or more.
    Critical,
}

impl Health {
    pub fn from_utilization(percent: f64) -> Health {
        if percent < HEALTH_WARNING_PERCENT {
            Health::Ok
        } else if percent < HEALTH_CRITICAL_PERCENT {
            Health::Warning
        } else {
            Health::Critical
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

/// The body of `GET /api/v1/ports`:
/// `{total_ports, allocated_ports, free_ports, utilization_percent, health}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PortStats {
    pub total_ports: usize,
    pub allocated_ports: usize,
    pub free_ports: usize,
    /// `allocated / total × 100`, rounded to two decimals for display (health
    /// is computed before rounding).
    pub utilization_percent: f64,
    pub health: Health,
}

impl PortStats {
    pub fn from_counts(total: usize, allocated: usize) -> PortStats {
        let allocated = allocated.min(total);
        let percent = if total == 0 {
            0.0
        } else {
            allocated as f64 * 100.0 / total as f64
        };
        PortStats {
            total_ports: total,
            allocated_ports: allocated,
            free_ports: total - allocated,
            utilization_percent: (percent * 100.0).round() / 100.0,
            health: Health::from_utilization(percent),
        }
    }
}

/// One bit per port of a [`PortRange`]; set = claimed.
///
/// Lock-free: claim and release are single atomic RMW operations on one
/// word. Bits past the end of the range in the last word are never touched,
/// so counting set bits counts claimed ports.
///
/// Allocation is next-fit from a rotating hint: after handing out port `p`
/// the next scan starts at `p + 1`. That spreads allocations over the range
/// and means a just-released port is reused only after the scan has gone
/// round the whole range, which gives the OS time to clear its TIME_WAIT
/// state and a late browser reconnect time to fail cleanly.
#[derive(Debug)]
pub struct PortBitmap {
    range: PortRange,
    words: Box<[AtomicU64]>,
    /// Index (not port) at which the next `claim_next` starts scanning.
    /// Only a hint: races on it cost spreading quality, never correctness.
    hint: AtomicUsize,
}

impl PortBitmap {
    pub fn new(range: PortRange) -> Self {
        let words = range.len().div_ceil(BITS);
        Self {
            range,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            hint: AtomicUsize::new(0),
        }
    }

    pub fn range(&self) -> PortRange {
        self.range
    }

    /// Bits of word `w` that belong to the range.
    fn valid_mask(&self, w: usize) -> u64 {
        let len = self.range.len();
        let start = w * BITS;
        let bits = len.saturating_sub(start).min(BITS);
        if bits == BITS {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }

    /// Claim `port` if it is free. False if it is already claimed or not in
    /// the range.
    pub fn try_claim(&self, port: u16) -> bool {
        let Some(i) = self.range.index_of(port) else {
            return false;
        };
        let bit = 1u64 << (i % BITS);
        // fetch_or is the single-bit compare-and-swap: it sets the bit and
        // tells us whether it was already set, atomically. Unlike a CAS on
        // the whole word it cannot fail because a *neighbouring* bit changed.
        let prev = self.words[i / BITS].fetch_or(bit, Ordering::AcqRel);
        prev & bit == 0
    }

    /// Claim some free port, scanning from the hint and wrapping once.
    /// `None` when every port is claimed. Lock-free, and bounded: at most
    /// `words + 1` word visits with at most `CLAIM_ATTEMPTS_PER_WORD` (128)
    /// atomic operations each.
    pub fn claim_next(&self) -> Option<u16> {
        let len = self.range.len();
        let nwords = self.words.len();
        let start = self.hint.load(Ordering::Relaxed) % len;
        let (start_word, start_bit) = (start / BITS, start % BITS);
        // Visit the start word's upper part first, every other word, and
        // finally the start word's lower part, so each bit is looked at once.
        for step in 0..=nwords {
            let w = (start_word + step) % nwords;
            let mut mask = self.valid_mask(w);
            if step == 0 {
                mask &= u64::MAX << start_bit;
            } else if step == nwords {
                mask &= (1u64 << start_bit) - 1;
            }
            let word = &self.words[w];
            let mut seen = word.load(Ordering::Acquire);
            for _ in 0..CLAIM_ATTEMPTS_PER_WORD {
                let free = !seen & mask;
                if free == 0 {
                    break;
                }
                let b = free.trailing_zeros() as usize;
                let bit = 1u64 << b;
                let prev = word.fetch_or(bit, Ordering::AcqRel);
                if prev & bit == 0 {
                    let index = w * BITS + b;
                    self.hint.store((index + 1) % len, Ordering::Relaxed);
                    return Some(self.range.port_at(index));
                }
                // Someone else took that bit first; look again with what the
                // word holds now.
                seen = prev;
            }
        }
        None
    }

    /// Release `port`. True if it was claimed (false: it was already free or
    /// is outside the range — a double release, which callers may log).
    pub fn release(&self, port: u16) -> bool {
        let Some(i) = self.range.index_of(port) else {
            return false;
        };
        let bit = 1u64 << (i % BITS);
        let prev = self.words[i / BITS].fetch_and(!bit, Ordering::AcqRel);
        prev & bit != 0
    }

    pub fn is_claimed(&self, port: u16) -> bool {
        let Some(i) = self.range.index_of(port) else {
            return false;
        };
        self.words[i / BITS].load(Ordering::Acquire) & (1u64 << (i % BITS)) != 0
    }

    /// Claimed ports in ascending order (a snapshot; concurrent changes may
    /// or may not be included).
    pub fn claimed(&self) -> Vec<u16> {
        let mut out = Vec::new();
        for (w, word) in self.words.iter().enumerate() {
            let mut bits = word.load(Ordering::Acquire) & self.valid_mask(w);
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                out.push(self.range.port_at(w * BITS + b));
                bits &= bits - 1;
            }
        }
        out
    }

    /// Number of claimed ports (snapshot).
    pub fn claimed_count(&self) -> usize {
        self.words
            .iter()
            .enumerate()
            .map(|(w, word)| {
                (word.load(Ordering::Acquire) & self.valid_mask(w)).count_ones() as usize
            })
            .sum()
    }

    pub fn stats(&self) -> PortStats {
        PortStats::from_counts(self.range.len(), self.claimed_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::sync::atomic::AtomicBool;

    fn range(first: u16, last: u16) -> PortRange {
        PortRange::new(first, last).unwrap()
    }

    fn reason(e: PortError) -> String {
        match e {
            PortError::InvalidRange { reason, .. } => reason,
            other => panic!("expected InvalidRange, got {other:?}"),
        }
    }

    #[test]
    fn range_parses_and_displays() {
        let r: PortRange = "6100-6999".parse().unwrap();
        assert_eq!((r.first(), r.last(), r.len()), (6100, 6999, 900));
        assert_eq!(r.to_string(), "6100-6999");
        assert_eq!(r, PortRange::default());
        let r: PortRange = " 7000 - 7000 ".parse().unwrap();
        assert_eq!(r.len(), 1);
        let r: PortRange = "7000".parse().unwrap();
        assert_eq!((r.first(), r.last()), (7000, 7000));
        let r: PortRange = "1-65535".parse().unwrap();
        assert_eq!(r.len(), 65535);
        assert!(r.contains(65535) && !r.contains(0));
    }

    #[test]
    fn range_errors_name_the_problem() {
        let e = reason("6999-6100".parse::<PortRange>().unwrap_err());
        assert!(e.contains("greater than"), "{e}");
        let e = reason("0-10".parse::<PortRange>().unwrap_err());
        assert!(e.contains("port 0"), "{e}");
        let e = reason("6100-70000".parse::<PortRange>().unwrap_err());
        assert!(e.contains("last port") && e.contains("70000"), "{e}");
        let e = reason("abc-6100".parse::<PortRange>().unwrap_err());
        assert!(e.contains("first port"), "{e}");
        let e = reason("6100-".parse::<PortRange>().unwrap_err());
        assert!(e.contains("missing"), "{e}");
        let e = reason("".parse::<PortRange>().unwrap_err());
        assert!(e.contains("missing"), "{e}");
        let e = reason("-5-6".parse::<PortRange>().unwrap_err());
        assert!(e.contains("missing"), "{e}");
        let e = "6100-6000".parse::<PortRange>().unwrap_err();
        assert_eq!(e.code(), "invalid_port_range");
        assert!(e.to_string().contains("\"6100-6000\""), "{e}");
        assert!(PortRange::new(10, 9).is_err());
    }

    #[test]
    fn range_serde_is_a_string() {
        let r = range(6100, 6199);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, "\"6100-6199\"");
        assert_eq!(serde_json::from_str::<PortRange>(&json).unwrap(), r);
        assert!(serde_json::from_str::<PortRange>("\"9-1\"").is_err());
    }

    #[test]
    fn try_claim_and_release_are_exact() {
        let b = PortBitmap::new(range(100, 229));
        assert!(b.try_claim(100));
        assert!(!b.try_claim(100), "a claimed bit cannot be claimed again");
        assert!(b.try_claim(229));
        assert!(b.is_claimed(100) && b.is_claimed(229) && !b.is_claimed(101));
        assert_eq!(b.claimed(), vec![100, 229]);
        assert!(b.release(100));
        assert!(!b.release(100), "double release reports false");
        assert!(!b.try_claim(99) && !b.try_claim(230) && !b.release(230));
        assert!(!b.is_claimed(0));
        assert_eq!(b.claimed(), vec![229]);
    }

    #[test]
    fn claim_next_fills_every_port_once_then_none() {
        for len in [1usize, 2, 63, 64, 65, 128, 129, 900] {
            let b = PortBitmap::new(range(10_000, 10_000 + len as u16 - 1));
            let mut got = BTreeSet::new();
            for _ in 0..len {
                let p = b.claim_next().expect("free port");
                assert!(got.insert(p), "port {p} handed out twice (len {len})");
            }
            assert_eq!(b.claim_next(), None, "len {len}");
            assert_eq!(got.len(), len);
            assert_eq!(b.claimed_count(), len);
            let stats = b.stats();
            assert_eq!((stats.free_ports, stats.health), (0, Health::Critical));
        }
    }

    #[test]
    fn claim_next_rotates_so_a_freed_port_is_not_reused_at_once() {
        let b = PortBitmap::new(range(5000, 5009));
        let p1 = b.claim_next().unwrap();
        assert_eq!(p1, 5000);
        assert!(b.release(p1));
        // The hint moved past 5000: the next nine claims use the other ports.
        let next: Vec<u16> = (0..9).map(|_| b.claim_next().unwrap()).collect();
        assert_eq!(next, (5001..=5009).collect::<Vec<_>>());
        // Only after going round does 5000 come back.
        assert_eq!(b.claim_next(), Some(5000));
        assert_eq!(b.claim_next(), None);
        // Wrapping scan finds a hole behind the hint.
        assert!(b.release(5003));
        assert_eq!(b.claim_next(), Some(5003));
    }

    #[test]
    fn stats_and_health_thresholds() {
        let b = PortBitmap::new(range(1000, 1099));
        assert_eq!(
            b.stats(),
            PortStats {
                total_ports: 100,
                allocated_ports: 0,
                free_ports: 100,
                utilization_percent: 0.0,
                health: Health::Ok
            }
        );
        let claim_to = |n: usize| {
            while b.claimed_count() < n {
                b.claim_next().unwrap();
            }
            b.stats()
        };
        assert_eq!(claim_to(79).health, Health::Ok);
        let s = claim_to(80);
        assert_eq!((s.health, s.utilization_percent), (Health::Warning, 80.0));
        assert_eq!(claim_to(94).health, Health::Warning);
        assert_eq!(claim_to(95).health, Health::Critical);
        let s = claim_to(100);
        assert_eq!((s.free_ports, s.health), (0, Health::Critical));

        let s = PortStats::from_counts(3, 1);
        assert_eq!(s.utilization_percent, 33.33);
        let json = serde_json::to_value(s).unwrap();
        assert_eq!(json["health"], "ok");
        for key in [
            "total_ports",
            "allocated_ports",
            "free_ports",
            "utilization_percent",
            "health",
        ] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(Health::Critical.as_str(), "critical");
    }

    /// 16 threads claim (via both entry points) and release thousands of
    /// times; a shared owner flag per port proves no port is ever held by
    /// two threads at once, and everything is free at the end.
    #[test]
    fn stress_no_port_is_ever_held_twice() {
        const THREADS: usize = 16;
        const ROUNDS: usize = 4_000;
        let r = range(20_000, 20_099);
        let b = PortBitmap::new(r);
        let held: Vec<AtomicBool> = (0..r.len()).map(|_| AtomicBool::new(false)).collect();
        let claims = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (b, held, claims) = (&b, &held, &claims);
                s.spawn(move || {
                    let mut mine: Vec<u16> = Vec::with_capacity(8);
                    for i in 0..ROUNDS {
                        // Hold up to 8 ports so the range runs full at times.
                        let got = if i % 3 == 0 {
                            let p = r.port_at((t * 7 + i) % r.len());
                            b.try_claim(p).then_some(p)
                        } else {
                            b.claim_next()
                        };
                        if let Some(p) = got {
                            let was = held[r.index_of(p).unwrap()].swap(true, Ordering::SeqCst);
                            assert!(!was, "port {p} handed to two threads");
                            claims.fetch_add(1, Ordering::Relaxed);
                            mine.push(p);
                        }
                        if mine.len() >= 8 || (got.is_none() && !mine.is_empty()) || i % 5 == 0 {
                            if let Some(p) = mine.pop() {
                                held[r.index_of(p).unwrap()].store(false, Ordering::SeqCst);
                                assert!(b.release(p), "release of a held port must report true");
                            }
                        }
                    }
                    for p in mine {
                        held[r.index_of(p).unwrap()].store(false, Ordering::SeqCst);
                        assert!(b.release(p));
                    }
                });
            }
        });
        assert!(claims.load(Ordering::Relaxed) > THREADS * ROUNDS / 4);
        assert_eq!(b.claimed_count(), 0);
        assert!(b.claimed().is_empty());
        assert_eq!(b.stats().free_ports, r.len());
    }

    /// Many threads race to fill a range exactly: every port is handed out
    /// exactly once, and nobody gets a port after it is full.
    #[test]
    fn stress_concurrent_fill_hands_out_each_port_once() {
        let r = range(30_000, 30_999);
        let b = PortBitmap::new(r);
        let all: Vec<Vec<u16>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..12)
                .map(|_| {
                    let b = &b;
                    s.spawn(move || {
                        let mut got = Vec::new();
                        // Bounded: the range has 1000 ports.
                        for _ in 0..=r.len() {
                            match b.claim_next() {
                                Some(p) => got.push(p),
                                None => break,
                            }
                        }
                        got
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut every: Vec<u16> = all.into_iter().flatten().collect();
        every.sort_unstable();
        assert_eq!(every, (30_000..=30_999).collect::<Vec<_>>());
        assert_eq!(b.claim_next(), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Next,
        Claim(usize),
        Release(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Next),
            1 => (0usize..300).prop_map(Op::Claim),
            2 => (0usize..300).prop_map(Op::Release),
        ]
    }

    proptest! {
        /// The bitmap behaves like a set of ports for any sequence of
        /// operations and any range length (including partial last words).
        #[test]
        fn bitmap_matches_a_set_model(len in 1usize..200, ops in prop::collection::vec(op(), 0..400)) {
            let r = range(40_000, 40_000 + len as u16 - 1);
            let b = PortBitmap::new(r);
            let mut model = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Next => match b.claim_next() {
                        Some(p) => {
                            prop_assert!(r.contains(p));
                            prop_assert!(model.insert(p), "claimed twice");
                        }
                        None => prop_assert_eq!(model.len(), len),
                    },
                    Op::Claim(i) => {
                        // Indices past the range test out-of-range ports too.
                        let p = 40_000u16.wrapping_add(i as u16);
                        let expect = r.contains(p) && !model.contains(&p);
                        prop_assert_eq!(b.try_claim(p), expect);
                        if expect { model.insert(p); }
                    }
                    Op::Release(i) => {
                        let p = 40_000u16.wrapping_add(i as u16);
                        prop_assert_eq!(b.release(p), model.remove(&p));
                    }
                }
                prop_assert_eq!(b.claimed_count(), model.len());
            }
            prop_assert_eq!(b.claimed(), model.into_iter().collect::<Vec<_>>());
        }
    }
}
