//! Spreading sessions evenly over the workers.
//!
//! Every worker accepts on its own SO_REUSEPORT listener, and the kernel
//! picks the listener by a hash of the connection's addresses. With
//! thousands of sessions the hash is even; with a handful it is lumpy: four
//! sessions on two workers all land on one worker one time in eight, and
//! three on one half of the time. A lumped worker serialises its sessions on
//! one core while another core's worker idles.
//!
//! So a worker that accepts a connection while it holds more sessions than
//! the least-loaded worker (plus `balance_slack_sessions`) hands the socket,
//! before reading a byte of it, to that worker's mailbox. Loads are published
//! per worker as plain atomics: the live session count, stored once per loop
//! turn by its owner, plus the hand-overs on their way to it, counted by the
//! senders. Placement reads them without a lock; a stale read costs at most
//! one session of imbalance, never correctness.
//!
//! Depends on the mailbox only; no socket is touched here.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::mailbox::{Sender, ToWorker};

/// Per-worker load, shared by the workers and read by the control plane.
#[derive(Debug)]
pub struct WorkerLoads {
    live: Box<[AtomicUsize]>,
    incoming: Box<[AtomicUsize]>,
}

impl WorkerLoads {
    pub fn new(workers: usize) -> Self {
        let zeros = || (0..workers).map(|_| AtomicUsize::new(0)).collect();
        Self {
            live: zeros(),
            incoming: zeros(),
        }
    }

    pub fn workers(&self) -> usize {
        self.live.len()
    }

    /// Sessions on worker `w`, including hand-overs on their way to it.
    pub fn load(&self, w: usize) -> usize {
        self.live[w]
            .load(Ordering::Relaxed)
            .saturating_add(self.incoming[w].load(Ordering::Relaxed))
    }

    /// The owner's live session count, stored once per loop turn.
    pub fn publish(&self, w: usize, live: usize) {
        self.live[w].store(live, Ordering::Relaxed);
    }

    /// The least-loaded worker; ties go to the first at or after `start`
    /// (callers rotate `start` so equal workers share new work).
    pub fn least_loaded(&self, start: usize) -> usize {
        let n = self.workers();
        if n == 0 {
            return 0;
        }
        (0..n)
            .map(|i| (start + i) % n)
            .min_by_key(|&w| self.load(w))
            .unwrap_or(0)
    }
}

/// Where a connection accepted by worker `me`, which holds `own` sessions,
/// should live: `None` to keep it, `Some(w)` to hand it to worker `w`.
/// `loads` yields every worker's load in worker order (`me`'s is ignored:
/// `own` is exact). A worker keeps the connection unless it holds more than
/// `slack` sessions above the least-loaded other worker.
pub fn placement(
    me: usize,
    own: usize,
    loads: impl Iterator<Item = usize>,
    slack: usize,
) -> Option<usize> {
    let (w, least) = loads
        .enumerate()
        .filter(|&(w, _)| w != me)
        .min_by_key(|&(_, l)| l)?;
    (own > least.saturating_add(slack)).then_some(w)
}

/// One worker's view: the shared loads and a sender to every worker.
pub struct Balancer {
    me: usize,
    loads: Arc<WorkerLoads>,
    peers: Vec<Sender<ToWorker>>,
    slack: usize,
}

impl Balancer {
    pub fn new(
        me: usize,
        loads: Arc<WorkerLoads>,
        peers: Vec<Sender<ToWorker>>,
        slack: usize,
    ) -> Self {
        Self {
            me,
            loads,
            peers,
            slack,
        }
    }

    /// Store this worker's live session count (once per loop turn).
    pub fn publish(&self, live: usize) {
        self.loads.publish(self.me, live);
    }

    /// A hand-over sent to this worker arrived (it is live here now).
    pub fn adopted(&self) {
        let c = &self.loads.incoming[self.me];
        // Never below zero, whatever the interleaving.
        let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
    }

    /// Hand a just-accepted connection to a less-loaded worker when this one
    /// holds `own` sessions and is over its share. Returns the stream when it
    /// stays here (balanced, or the other mailbox is full). The returned
    /// worker index is where it went.
    pub fn offload(
        &self,
        own: usize,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Result<usize, TcpStream> {
        let n = self.loads.workers();
        let Some(to) = placement(self.me, own, (0..n).map(|w| self.loads.load(w)), self.slack)
        else {
            return Err(stream);
        };
        let Some(tx) = self.peers.get(to) else {
            return Err(stream);
        };
        self.loads.incoming[to].fetch_add(1, Ordering::Relaxed);
        match tx.send_or_return(ToWorker::Adopt { stream, peer }) {
            Ok(()) => Ok(to),
            Err(msg) => {
                let _ = self.loads.incoming[to].fetch_update(
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                    |v| v.checked_sub(1),
                );
                match msg {
                    ToWorker::Adopt { stream, .. } => Err(stream),
                    // Not reached: send_or_return gives back the hand-over
                    // it was given. Were it, the stream is gone (closed).
                    _ => Ok(to),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_when_balanced_hands_over_when_ahead() {
        // Two workers, both empty: the first connection stays.
        assert_eq!(placement(0, 0, [0, 0].into_iter(), 0), None);
        // One here, none there: the next goes over.
        assert_eq!(placement(0, 1, [1, 0].into_iter(), 0), Some(1));
        // Equal: stays.
        assert_eq!(placement(0, 1, [1, 1].into_iter(), 0), None);
        // Slack 1 tolerates one session of difference.
        assert_eq!(placement(0, 1, [1, 0].into_iter(), 1), None);
        assert_eq!(placement(0, 2, [2, 0].into_iter(), 1), Some(1));
        // Picks the least-loaded of several, never itself.
        assert_eq!(placement(1, 5, [4, 9, 2, 3].into_iter(), 0), Some(2));
        // A single worker has nobody to hand to.
        assert_eq!(placement(0, 100, [100].into_iter(), 0), None);
    }

    #[test]
    fn four_connections_hashed_to_one_worker_end_up_two_and_two() {
        let mut live = [0usize, 0];
        for _ in 0..4 {
            match placement(0, live[0], live.iter().copied(), 0) {
                None => live[0] += 1,
                Some(w) => live[w] += 1,
            }
        }
        assert_eq!(live, [2, 2]);
    }

    #[test]
    fn loads_count_hand_overs_on_their_way_and_the_least_loaded_rotates() {
        let l = WorkerLoads::new(3);
        l.publish(0, 4);
        l.publish(1, 2);
        l.publish(2, 2);
        assert_eq!(l.least_loaded(0), 1);
        assert_eq!(l.least_loaded(2), 2);
        l.incoming[1].fetch_add(1, Ordering::Relaxed);
        assert_eq!(l.load(1), 3);
        assert_eq!(l.least_loaded(0), 2);
    }

    #[test]
    fn offload_sends_to_the_least_loaded_and_gives_back_when_its_mailbox_is_full() {
        let loads = Arc::new(WorkerLoads::new(2));
        let (tx0, _rx0) = crate::mailbox::channel::<ToWorker>(1).unwrap();
        let (tx1, mut rx1) = crate::mailbox::channel::<ToWorker>(1).unwrap();
        let b = Balancer::new(0, loads.clone(), vec![tx0, tx1], 0);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let s1 = TcpStream::connect(addr).unwrap();
        let s2 = TcpStream::connect(addr).unwrap();
        // Balanced: stays.
        let s1 = b.offload(0, s1, addr).unwrap_err();
        // Ahead by one: goes to worker 1, counted as incoming there.
        assert_eq!(b.offload(1, s1, addr).unwrap(), 1);
        assert_eq!(loads.load(1), 1);
        // Worker 1's mailbox (capacity 1) is full: the stream comes back.
        loads.publish(1, 0);
        let _s2 = b.offload(3, s2, addr).unwrap_err();
        assert_eq!(loads.load(1), 1, "the failed hand-over is not counted");
        assert!(matches!(rx1.try_recv(), Some(ToWorker::Adopt { .. })));
        let b1 = Balancer::new(1, loads.clone(), Vec::new(), 0);
        b1.adopted();
        assert_eq!(loads.load(1), 0);
        b1.adopted();
        assert_eq!(loads.load(1), 0, "never below zero");
    }
}
