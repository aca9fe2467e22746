//! One-time VNC passwords: generation, and the one slot per VNC display.
//!
//! A QEMU VNC display has one password. Giving out a new one replaces the
//! last, so two consoles opened at once would each break the other, and a
//! snapshot's own password would break a console that has not logged in
//! yet. So each VM has a [`PasswordSlot`]: a console holds it from
//! `set_password` until `console_used` (or until its password's TTL
//! passes, the appliance having never reported it used), and a snapshot
//! holds it for its short connection. Others wait, bounded.
//!
//! What it does not do: talk to QEMU (the backend does).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// VNC authentication uses at most 8 bytes of a password.
pub const PASSWORD_LEN: usize = 8;
/// 64 symbols, so one random byte's low 6 bits pick one without bias:
/// 8 × 6 = 48 bits per password, which only has to survive its TTL.
const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A fresh password from the operating system's CSPRNG.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; PASSWORD_LEN];
    getrandom::fill(&mut bytes)?;
    Ok(bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 63)]))
        .collect())
}

/// The right to set a VM's VNC password; see the module doc.
#[derive(Debug)]
pub struct PasswordSlot {
    semaphore: Arc<Semaphore>,
    /// The permit of a console awaiting `console_used`, and when its
    /// password expires.
    held: Mutex<Option<(OwnedSemaphorePermit, Instant)>>,
}

impl Default for PasswordSlot {
    fn default() -> Self {
        PasswordSlot {
            semaphore: Arc::new(Semaphore::new(1)),
            held: Mutex::new(None),
        }
    }
}

impl PasswordSlot {
    fn held(&self) -> MutexGuard<'_, Option<(OwnedSemaphorePermit, Instant)>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits up to `wait` for the slot. A console's hold whose password
    /// has expired is taken back on the way. `None` when the wait ran out.
    pub async fn acquire(&self, wait: Duration) -> Option<OwnedSemaphorePermit> {
        let deadline = Instant::now() + wait;
        // Each turn ends at the deadline or at a hold's expiry, which the
        // next turn reclaims; so at most two turns per hold.
        loop {
            let expiry = self.reclaim_expired();
            let until = expiry.map_or(deadline, |at| at.min(deadline));
            let acquire = Arc::clone(&self.semaphore).acquire_owned();
            match tokio::time::timeout_at(until, acquire).await {
                Ok(permit) => return permit.ok(),
                Err(_) if Instant::now() >= deadline => return None,
                Err(_) => continue,
            }
        }
    }

    /// Drops a console's hold whose password has expired; returns the
    /// expiry of the hold still in place.
    fn reclaim_expired(&self) -> Option<Instant> {
        let mut held = self.held();
        match held.as_ref() {
            Some((_, expires)) if *expires <= Instant::now() => {
                *held = None;
                None
            }
            Some((_, expires)) => Some(*expires),
            None => None,
        }
    }

    /// Keeps the slot for a console until [`PasswordSlot::release`] or `ttl`.
    pub fn hold(&self, permit: OwnedSemaphorePermit, ttl: Duration) {
        *self.held() = Some((permit, Instant::now() + ttl));
    }

    /// The console's password was used (or expired): free the slot.
    pub fn release(&self) {
        *self.held() = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_eight_url_safe_characters_and_differ() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.len(), PASSWORD_LEN);
        assert!(a.bytes().all(|c| ALPHABET.contains(&c)));
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn a_held_slot_waits_until_released_or_expired() {
        let slot = PasswordSlot::default();
        let permit = slot.acquire(Duration::from_secs(1)).await.unwrap();
        slot.hold(permit, Duration::from_secs(30));
        // Held: a short wait runs out.
        assert!(slot.acquire(Duration::from_millis(50)).await.is_none());
        // Released: free at once.
        slot.release();
        let permit = slot.acquire(Duration::from_millis(1)).await.unwrap();
        let ttl = Duration::from_millis(300);
        slot.hold(permit, ttl);
        // Held, but its password expires within the wait: taken back then.
        let started = Instant::now();
        let permit = slot.acquire(Duration::from_secs(10)).await.unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        // A snapshot's permit frees the slot when dropped.
        assert!(slot.acquire(Duration::from_millis(1)).await.is_none());
        drop(permit);
        assert!(slot.acquire(Duration::from_millis(1)).await.is_some());
    }
}
