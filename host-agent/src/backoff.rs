//! Exponential backoff with jitter, for retrying while the server or the
//! TPM is unavailable. The jitter spreads a fleet of agents that lost the
//! server at the same moment, so they do not all return at once.

use rand::Rng;
use std::time::Duration;

/// Delay ceiling = `base * 2^failures`, capped at `max`; each delay is drawn
/// uniformly from the upper half of the ceiling ("equal jitter"), so it
/// always grows with the failures and never exceeds `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base: base.min(max),
            max,
            failures: 0,
        }
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        // 2^20 × any sane base is far beyond any cap; stop doubling there.
        let factor = 1u32 << self.failures.min(20);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Record a failure and return how long to wait before retrying.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        half.saturating_add(Duration::from_nanos(rng.gen_range(0..=spread)))
    }

    /// Forget the failures after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let mut rng = StdRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_secs());
            b.next_delay(&mut rng);
        }
        assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        // Far more failures than bits: still capped, no overflow.
        for _ in 0..100 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(60));
    }

    #[test]
    fn delays_are_jittered_within_the_upper_half() {
        let mut rng = StdRng::seed_from_u64(42);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
            for _ in 0..8 {
                let ceiling = b.ceiling();
                let d = b.next_delay(&mut rng);
                assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} vs {ceiling:?}");
                assert!(d <= Duration::from_secs(60));
            }
            seen.insert(b.clone().next_delay(&mut rng));
        }
        // Jitter actually varies the delays.
        assert!(seen.len() > 100, "only {} distinct delays", seen.len());
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(30));
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..5 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.failures(), 5);
        assert_eq!(b.ceiling(), Duration::from_secs(30));
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.ceiling(), Duration::from_secs(2));
        let d = b.next_delay(&mut rng);
        assert!(d >= Duration::from_secs(1) && d <= Duration::from_secs(2));
    }

    #[test]
    fn base_above_cap_is_capped() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(3));
        let d = b.next_delay(&mut StdRng::seed_from_u64(3));
        assert!(d <= Duration::from_secs(3));
    }
}
