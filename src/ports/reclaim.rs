//! Restore at start and reclaim stale claims (start-up and periodic).
//!
//! A claim is stale when its session is gone *and* nothing listens on the
//! port. Both conditions are needed: a session that is still live keeps its
//! port even if its listener is not up yet, and a port something still
//! listens on (our worker has not dropped the listener yet, or another
//! process took it) stays claimed so it is never handed out twice. A later
//! pass reclaims it once it is really free.

use serde::{Deserialize, Serialize};

use super::pool::{PortPool, Probe};
use super::store::PortStore;
use super::PortError;

/// What a restore or cleanup pass did: counts (for logs, metrics and the
/// CLI) and the ports an operator may want to look at (ascending, each list
/// bounded by the range size).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReclaimReport {
    /// Restore only: persisted entries claimed again in the pool
    /// (`kept_live + reclaimed + still_in_use` of those).
    pub restored: usize,
    /// Owner still live: left claimed.
    pub kept_live: usize,
    /// Owner gone and nothing listens: released.
    pub reclaimed: usize,
    /// Owner gone but something still listens (or the probe failed): left
    /// claimed, so never handed out twice; a later pass retries.
    pub still_in_use: usize,
    /// Restore only: persisted ports outside the configured range (the
    /// range changed); dropped from the state file.
    pub out_of_range: usize,
    /// Restore only: persisted ports the pool had already claimed (restore
    /// ran on a pool in use); left to their current holder.
    pub already_claimed: usize,
    pub reclaimed_ports: Vec<u16>,
    pub still_in_use_ports: Vec<u16>,
}

impl ReclaimReport {
    fn sort(&mut self) {
        self.reclaimed_ports.sort_unstable();
        self.still_in_use_ports.sort_unstable();
    }
}

/// At start, before any allocation: mark every persisted port claimed for
/// its owner, then reclaim the stale ones (owner not `is_live` and the port
/// bindable). Writes the resulting state back to `store`, so the file never
/// lists reclaimed or out-of-range ports. Errors: an unreadable or corrupt
/// state file (nothing is claimed then), or a failed save (the pool is
/// restored; the caller may retry the save).
pub fn restore_and_reclaim(
    pool: &PortPool,
    store: &PortStore,
    is_live: impl Fn(u64) -> bool,
) -> Result<ReclaimReport, PortError> {
    let allocs = store.load()?;
    let mut report = ReclaimReport::default();
    let mut restored = Vec::with_capacity(allocs.len());
    for a in allocs {
        if !pool.range().contains(a.port) {
            tracing::warn!(port = a.port, owner = a.owner, range = %pool.range(), "persisted port outside the range; dropped");
            report.out_of_range += 1;
        } else if pool.restore_claim(a.port, a.owner, a.allocated_at_unix_ms) {
            restored.push((a.port, a.owner));
        } else {
            report.already_claimed += 1;
        }
    }
    report.restored = restored.len();
    judge(pool, &restored, &is_live, &mut report);
    report.sort();
    store.save(&pool.allocations())?;
    tracing::info!(
        restored = report.restored,
        kept_live = report.kept_live,
        reclaimed = report.reclaimed,
        still_in_use = report.still_in_use,
        out_of_range = report.out_of_range,
        "dedicated port allocations restored"
    );
    Ok(report)
}

/// One cleanup pass over the pool's current claims (for `consolegate ports
/// cleanup` and the periodic task): same rules as at start. Claims still
/// being allocated (no owner recorded yet) are not looked at. Does not
/// persist; the caller saves `pool.allocations()` if anything was reclaimed.
pub fn cleanup(pool: &PortPool, is_live: impl Fn(u64) -> bool) -> ReclaimReport {
    let mut report = ReclaimReport::default();
    judge(pool, &pool.owned(), &is_live, &mut report);
    report.sort();
    if report.reclaimed > 0 || report.still_in_use > 0 {
        tracing::info!(
            reclaimed = report.reclaimed,
            still_in_use = report.still_in_use,
            "stale dedicated ports cleaned up"
        );
    }
    report
}

fn judge(
    pool: &PortPool,
    claims: &[(u16, u64)],
    is_live: &impl Fn(u64) -> bool,
    report: &mut ReclaimReport,
) {
    for &(port, owner) in claims {
        if is_live(owner) {
            report.kept_live += 1;
            continue;
        }
        match pool.probe(port) {
            Ok(Probe::Free) => {
                // Fails only if the claim changed hands since the snapshot
                // (released and re-allocated): then it is not stale.
                if pool.release(port, owner) {
                    tracing::debug!(port, owner, "stale dedicated port reclaimed");
                    report.reclaimed += 1;
                    report.reclaimed_ports.push(port);
                }
            }
            Ok(Probe::InUse) => {
                report.still_in_use += 1;
                report.still_in_use_ports.push(port);
            }
            Err(e) => {
                tracing::warn!(port, owner, error = %e, "cannot probe dedicated port; keeping it claimed");
                report.still_in_use += 1;
                report.still_in_use_ports.push(port);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::store::Allocation;
    use super::super::test_util::{config, free_range, LOOPBACK};
    use super::*;
    use std::collections::BTreeSet;
    use std::net::TcpListener;

    fn alloc(port: u16, owner: u64) -> Allocation {
        Allocation {
            port,
            owner,
            allocated_at_unix_ms: 1_700_000_000_000,
        }
    }

    /// Allocate until exhausted and return every port handed out.
    fn drain(pool: &PortPool, first_owner: u64) -> (BTreeSet<u16>, Vec<TcpListener>) {
        let mut ports = BTreeSet::new();
        let mut listeners = Vec::new();
        for owner in first_owner..first_owner + pool.range().len() as u64 + 1 {
            match pool.allocate(owner) {
                Ok((p, l)) => {
                    assert!(ports.insert(p));
                    listeners.push(l);
                }
                Err(PortError::Exhausted { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        (ports, listeners)
    }

    #[test]
    fn restore_reclaims_stale_keeps_live_and_externally_held() {
        let range = free_range(6);
        let f = range.first();
        let (live, stale, held) = (f, f + 1, f + 2);
        let dir = tempfile::tempdir().unwrap();
        let store = PortStore::new(dir.path());
        store
            .save(&[
                alloc(live, 10),
                alloc(stale, 11),
                alloc(held, 12),
                alloc(range.last() + 1, 13),
            ])
            .unwrap();
        // Another process still listens on `held` although session 12 is gone.
        let squatter = TcpListener::bind((LOOPBACK, held)).unwrap();

        let pool = PortPool::new(config(range)).unwrap();
        let report = restore_and_reclaim(&pool, &store, |owner| owner == 10).unwrap();
        assert_eq!(
            report,
            ReclaimReport {
                restored: 3,
                kept_live: 1,
                reclaimed: 1,
                still_in_use: 1,
                out_of_range: 1,
                already_claimed: 0,
                reclaimed_ports: vec![stale],
                still_in_use_ports: vec![held],
            }
        );
        assert_eq!(pool.owner_of(live), Some(10));
        assert_eq!(pool.owner_of(held), Some(12));
        assert!(!pool.is_claimed(stale));
        // The file was rewritten to what the pool holds.
        let persisted: Vec<(u16, u64)> = store
            .load()
            .unwrap()
            .iter()
            .map(|a| (a.port, a.owner))
            .collect();
        assert_eq!(persisted, vec![(live, 10), (held, 12)]);

        // No double allocation: the kept ports are never handed out.
        let (ports, _listeners) = drain(&pool, 100);
        assert!(!ports.contains(&live) && !ports.contains(&held));
        assert!(ports.contains(&stale));
        assert_eq!(ports.len(), range.len() - 2);

        // Once the other process lets go, a cleanup pass reclaims it.
        drop(squatter);
        let report = cleanup(&pool, |owner| owner == 10 || owner >= 100);
        assert_eq!((report.reclaimed, report.reclaimed_ports), (1, vec![held]));
        assert_eq!(report.restored, 0, "cleanup restores nothing");
        assert!(!pool.is_claimed(held));
    }

    /// A restart: the first pool's allocations are persisted, the process
    /// "dies" (its listeners close), a second pool restores from the file.
    #[test]
    fn restart_restores_without_double_allocation() {
        let range = free_range(10);
        let dir = tempfile::tempdir().unwrap();
        let store = PortStore::new(dir.path());
        let before: Vec<(u16, u64)> = {
            let pool = PortPool::new(config(range)).unwrap();
            let got: Vec<(u16, u64)> = (1..=5)
                .map(|o| (pool.allocate(o).unwrap().0, o)) // listener dropped: process gone
                .collect();
            store.save(&pool.allocations()).unwrap();
            got
        };
        // Sessions 1 and 2 survived the restart (say, in shared state).
        let pool = PortPool::new(config(range)).unwrap();
        let report = restore_and_reclaim(&pool, &store, |o| o <= 2).unwrap();
        let live: Vec<u16> = before
            .iter()
            .filter(|(_, o)| *o <= 2)
            .map(|(p, _)| *p)
            .collect();
        let dead: Vec<u16> = before
            .iter()
            .filter(|(_, o)| *o > 2)
            .map(|(p, _)| *p)
            .collect();
        assert_eq!((report.restored, report.kept_live), (5, live.len()));
        assert_eq!(report.reclaimed_ports, dead);
        assert_eq!(report.still_in_use, 0);
        let (ports, _l) = drain(&pool, 100);
        assert!(
            live.iter().all(|p| !ports.contains(p)),
            "live ports handed out again"
        );
        assert_eq!(ports.len(), range.len() - live.len());
        // Restoring into a pool that already holds them changes nothing.
        let again = restore_and_reclaim(&pool, &store, |_| true).unwrap();
        assert_eq!((again.already_claimed, again.restored), (live.len(), 0));
    }

    #[test]
    fn restore_with_no_file_is_empty_and_corrupt_file_claims_nothing() {
        let range = free_range(3);
        let dir = tempfile::tempdir().unwrap();
        let store = PortStore::new(dir.path());
        let pool = PortPool::new(config(range)).unwrap();
        assert_eq!(
            restore_and_reclaim(&pool, &store, |_| true).unwrap(),
            ReclaimReport::default()
        );
        std::fs::write(store.path(), "garbage").unwrap();
        let err = restore_and_reclaim(&pool, &store, |_| true).unwrap_err();
        assert_eq!(err.code(), "port_state_corrupt");
        assert_eq!(pool.stats().allocated_ports, 0);
        assert_eq!(
            std::fs::read_to_string(store.path()).unwrap(),
            "garbage",
            "left for inspection"
        );
    }

    /// Periodic cleanup: an ended session whose listener is closed is
    /// reclaimed; one whose worker still holds the listener is not (yet);
    /// a live one is kept; an allocation in flight is not touched.
    #[test]
    fn cleanup_follows_the_same_rules() {
        let range = free_range(6);
        let pool = PortPool::new(config(range)).unwrap();
        let (p1, l1) = pool.allocate(1).unwrap();
        let (p2, l2) = pool.allocate(2).unwrap();
        let (p3, _l3) = pool.allocate(3).unwrap();
        let in_flight = pool.bitmap().claim_next().unwrap();
        drop(l1);
        let live = |o: u64| o == 3;
        let report = cleanup(&pool, live);
        assert_eq!(report.reclaimed_ports, vec![p1]);
        assert_eq!(report.still_in_use_ports, vec![p2]);
        assert_eq!(
            (report.kept_live, report.reclaimed, report.still_in_use),
            (1, 1, 1)
        );
        assert_eq!(pool.owner_of(p3), Some(3));
        assert!(pool.is_claimed(in_flight) && pool.is_claimed(p2) && !pool.is_claimed(p1));
        // The worker finally drops the listener: the next pass reclaims it.
        drop(l2);
        let report = cleanup(&pool, live);
        assert_eq!(
            (report.reclaimed_ports, report.still_in_use_ports),
            (vec![p2], vec![])
        );
        // The session's own late release is then a no-op, not a double free.
        assert!(!pool.release(p2, 2));
        assert_eq!(
            pool.bitmap().claimed().into_iter().collect::<BTreeSet<_>>(),
            vec![p3, in_flight].into_iter().collect::<BTreeSet<_>>()
        );
    }
}
