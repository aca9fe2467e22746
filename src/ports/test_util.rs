//! Test helpers: loopback port ranges that are free right now.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use super::{PortPoolConfig, PortRange};

/// Lowest and highest port the tests use: above the common service ports and
/// below Linux's ephemeral range (32768+), so outgoing connections do not
/// land in it.
const LOW: u32 = 20_000;
const HIGH: u32 = 32_000;

pub(super) const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Process-wide cursor so tests running in parallel get disjoint ranges. It
/// starts at a pid-dependent offset so two test processes (this crate's and
/// another checkout's) are unlikely to probe the same ports.
fn cursor() -> &'static AtomicU32 {
    static CURSOR: OnceLock<AtomicU32> = OnceLock::new();
    CURSOR.get_or_init(|| AtomicU32::new(LOW + (std::process::id() % 40) * 250))
}

/// `n` consecutive ports on 127.0.0.1 that could all be bound a moment ago.
/// A range with a taken port is skipped and the next one tried; bounded by
/// the window size.
pub(super) fn free_range(n: u16) -> PortRange {
    let span = u32::from(n) + 4;
    for _ in 0..(HIGH - LOW) / span + 1 {
        let mut first = cursor().fetch_add(span, Ordering::Relaxed);
        if first + span > HIGH {
            // Wrap the window; another thread may wrap too, which is fine.
            first = LOW + (first - LOW) % (HIGH - LOW - span);
        }
        let first = first as u16;
        let last = first + n - 1;
        // Hold them all while probing so we test the whole range at once.
        let held: Result<Vec<TcpListener>, _> = (first..=last)
            .map(|p| TcpListener::bind((LOOPBACK, p)))
            .collect();
        if held.is_ok() {
            return PortRange::new(first, last).expect("valid test range");
        }
    }
    panic!("no {n} consecutive free loopback ports between {LOW} and {HIGH}");
}

/// A pool config on loopback for `range`, with defaults otherwise.
pub(super) fn config(range: PortRange) -> PortPoolConfig {
    PortPoolConfig {
        range,
        bind_ip: LOOPBACK,
        ..PortPoolConfig::default()
    }
}
