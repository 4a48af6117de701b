//! Back-off for hosts whose evidence keeps being refused. Only a host's own
//! certificate can ask for its challenges and submit its evidence, so a
//! host that sends evidence which is not genuine (bad signature, replayed
//! nonce, malformed structures) is broken or compromised: after a burst of
//! refusals it is answered `429 too_many_failures` before any database or
//! verification work, one more attempt allowed per refill period. Honest
//! hosts never get there (a genuine but untrusted quote is a verdict, not a
//! refusal), and one accepted attestation clears a host's record. Without
//! it, a few hosts sending garbage back to back take the server's capacity
//! from the honest ones (each refusal is a verdict and an audit event).
//!
//! Per server process: behind a load balancer each server throttles on its
//! own, which bounds the flood just the same.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most hosts tracked at once; beyond it, hosts back to a full budget are
/// forgotten, and if that is not enough every record is.
const MAX_TRACKED: usize = 65_536;

#[derive(Debug)]
pub struct FailureThrottle {
    burst: u32,
    refill: Duration,
    hosts: Mutex<HashMap<String, Budget>>,
}

/// Refusals a host may still have, as of `at`.
#[derive(Debug, Clone, Copy)]
struct Budget {
    left: u32,
    at: Instant,
}

impl FailureThrottle {
    /// `burst` refusals in a row, then one per `refill`.
    pub fn new(burst: u32, refill: Duration) -> Self {
        Self {
            burst: burst.max(1),
            refill: refill.max(Duration::from_millis(1)),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Budget>> {
        // Each critical section is a lookup or an update of one entry.
        self.hosts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The budget refilled up to `now`. While not full, `at` is when the
    /// current refill period began.
    fn refilled(&self, b: Budget, now: Instant) -> Budget {
        if b.left >= self.burst {
            return Budget {
                left: self.burst,
                at: now,
            };
        }
        let periods = now.saturating_duration_since(b.at).as_nanos() / self.refill.as_nanos();
        let periods = u32::try_from(periods).unwrap_or(u32::MAX).min(self.burst);
        match b.left.saturating_add(periods) {
            0 => b,
            left if left >= self.burst => Budget {
                left: self.burst,
                at: now,
            },
            left => Budget {
                left,
                at: b.at + self.refill * periods,
            },
        }
    }

    /// `Err(wait)` when the host has used its budget: it may try again
    /// after `wait`.
    pub fn check(&self, host: &str, now: Instant) -> Result<(), Duration> {
        let map = self.map();
        let Some(b) = map.get(host) else {
            return Ok(());
        };
        let b = self.refilled(*b, now);
        if b.left > 0 {
            Ok(())
        } else {
            Err((b.at + self.refill).saturating_duration_since(now))
        }
    }

    /// Count one refused submission. Returns true when this one used the
    /// last of the budget (the host is throttled from now on).
    pub fn refused(&self, host: &str, now: Instant) -> bool {
        let mut map = self.map();
        if map.len() >= MAX_TRACKED && !map.contains_key(host) {
            self.forget_some(&mut map, now);
        }
        let b = map.get(host).map_or(
            Budget {
                left: self.burst,
                at: now,
            },
            |b| self.refilled(*b, now),
        );
        let left = b.left.saturating_sub(1);
        map.insert(host.to_string(), Budget { left, at: b.at });
        left == 0 && b.left > 0
    }

    /// An accepted attestation: the host starts over with a full budget.
    pub fn accepted(&self, host: &str) {
        let mut map = self.map();
        if !map.is_empty() {
            map.remove(host);
        }
    }

    fn forget_some(&self, map: &mut HashMap<String, Budget>, now: Instant) {
        map.retain(|_, b| self.refilled(*b, now).left < self.burst);
        if map.len() >= MAX_TRACKED {
            // More failing hosts than we track: start over rather than scan
            // the map on every refusal (the budgets were a bound, not state
            // anything depends on).
            map.clear();
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.map().len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn burst_then_one_per_period_then_reset_on_success() {
        let t = FailureThrottle::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(t.check("a", t0).is_ok());
        assert!(!t.refused("a", t0));
        assert!(!t.refused("a", t0));
        assert!(t.check("a", t0).is_ok());
        assert!(t.refused("a", t0), "the third refusal uses the budget up");
        let wait = t.check("a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10));
        assert_eq!(
            t.check("a", t0 + Duration::from_secs(4)).unwrap_err(),
            Duration::from_secs(6)
        );
        // Other hosts are not affected.
        assert!(t.check("b", t0).is_ok());
        // One period later: one more attempt, and refused again it is throttled again.
        let t1 = t0 + Duration::from_secs(10);
        assert!(t.check("a", t1).is_ok());
        assert!(t.refused("a", t1));
        assert!(t.check("a", t1 + Duration::from_secs(9)).is_err());
        // After a long quiet spell the full burst is back, never more.
        let t2 = t1 + Duration::from_secs(1000);
        assert!(!t.refused("a", t2));
        assert!(!t.refused("a", t2));
        assert!(t.refused("a", t2));
        // An accepted attestation clears the record.
        t.accepted("a");
        assert!(t.check("a", t2).is_ok());
        assert_eq!(t.tracked(), 0);
    }

    #[test]
    fn tracking_is_bounded() {
        let t = FailureThrottle::new(2, Duration::from_secs(60));
        let now = Instant::now();
        for i in 0..MAX_TRACKED + 10 {
            t.refused(&format!("h{i}"), now);
        }
        assert!(t.tracked() <= MAX_TRACKED);
        assert!(t.tracked() >= 10, "the hosts after the reset are tracked");
        // The newest host is still tracked: its second refusal throttles it.
        assert!(t.refused(&format!("h{}", MAX_TRACKED + 9), now));
    }
}
