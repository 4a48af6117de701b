//! Verdicts remembered between scheduling decisions, so a busy scheduler does
//! not query the server for every placement.

use crate::decision::Lookup;
use chrono::{DateTime, TimeDelta, Utc};
use proto::wire::HostTrust;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Host name -> (verdict, when it was cached).
///
/// The lock is a std mutex taken only for map operations, never across an
/// await, so callers on any runtime can share one cache.
#[derive(Debug)]
pub struct VerdictCache {
    entries: Mutex<HashMap<String, (HostTrust, DateTime<Utc>)>>,
    max_age: TimeDelta,
}

impl VerdictCache {
    /// `max_age` bounds reuse even when a verdict's `expires_at` is later.
    pub fn new(max_age: Duration) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            max_age: TimeDelta::from_std(max_age).unwrap_or(TimeDelta::MAX),
        }
    }

    /// A poisoned lock only means another thread panicked mid-update of a
    /// plain map; the data is still a valid cache, so keep using it.
    fn lock(&self) -> MutexGuard<'_, HashMap<String, (HostTrust, DateTime<Utc>)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_fresh(&self, verdict: &HostTrust, cached_at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        let within_expiry = verdict.expires_at.is_some_and(|t| now < t);
        let within_max_age = now.signed_duration_since(cached_at) < self.max_age;
        within_expiry && within_max_age
    }

    /// Split `hosts` into those with a fresh cached verdict (returned as a
    /// map) and those that must be fetched (returned without duplicates, in
    /// first-seen order).
    pub fn split(
        &self,
        hosts: &[String],
        now: DateTime<Utc>,
    ) -> (HashMap<String, Lookup>, Vec<String>) {
        let entries = self.lock();
        let mut known = HashMap::new();
        let mut to_fetch = Vec::new();
        for host in hosts {
            if known.contains_key(host) || to_fetch.contains(host) {
                continue;
            }
            match entries.get(host) {
                Some((v, at)) if self.is_fresh(v, *at, now) => {
                    known.insert(host.clone(), Lookup::Verdict(v.clone()));
                }
                _ => to_fetch.push(host.clone()),
            }
        }
        (known, to_fetch)
    }

    /// Remember fetched verdicts (keyed by the verdict's own host name) and
    /// drop entries that can no longer be used, so the map stays bounded by
    /// the hosts in recent use.
    pub fn store<'a>(&self, verdicts: impl IntoIterator<Item = &'a HostTrust>, now: DateTime<Utc>) {
        let mut entries = self.lock();
        for v in verdicts {
            if self.is_fresh(v, now, now) {
                entries.insert(v.host.clone(), (v.clone(), now));
            } else {
                entries.remove(&v.host);
            }
        }
        entries.retain(|_, (v, at)| self.is_fresh(v, *at, now));
    }

    /// Forget one host, so its next decision asks the server.
    pub fn invalidate(&self, host: &str) {
        self.lock().remove(host);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::wire::Trust;

    fn verdict(host: &str, expires_at: Option<DateTime<Utc>>) -> HostTrust {
        HostTrust {
            host: host.into(),
            trust: Trust::Trusted,
            verified_at: None,
            expires_at,
            reasons: vec![],
            policy: None,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn fresh_verdicts_are_reused_and_others_fetched_once() {
        let cache = VerdictCache::new(Duration::from_secs(60));
        let t0 = Utc::now();
        cache.store(&[verdict("a", Some(t0 + TimeDelta::seconds(300)))], t0);
        let (known, fetch) = cache.split(&names(&["a", "b", "b", "a"]), t0);
        assert_eq!(fetch, names(&["b"]));
        assert!(matches!(known.get("a"), Some(Lookup::Verdict(v)) if v.host == "a"));
        assert_eq!(known.len(), 1);
    }

    #[test]
    fn verdict_expired_in_the_cache_is_refetched() {
        let cache = VerdictCache::new(Duration::from_secs(600));
        let t0 = Utc::now();
        cache.store(&[verdict("a", Some(t0 + TimeDelta::seconds(30)))], t0);
        let (_, fetch) = cache.split(&names(&["a"]), t0 + TimeDelta::seconds(29));
        assert!(fetch.is_empty());
        let (known, fetch) = cache.split(&names(&["a"]), t0 + TimeDelta::seconds(30));
        assert_eq!(fetch, names(&["a"]));
        assert!(known.is_empty());
    }

    #[test]
    fn max_cache_secs_bounds_a_long_verdict() {
        let cache = VerdictCache::new(Duration::from_secs(60));
        let t0 = Utc::now();
        cache.store(&[verdict("a", Some(t0 + TimeDelta::hours(24)))], t0);
        let (_, fetch) = cache.split(&names(&["a"]), t0 + TimeDelta::seconds(59));
        assert!(fetch.is_empty());
        let (_, fetch) = cache.split(&names(&["a"]), t0 + TimeDelta::seconds(60));
        assert_eq!(fetch, names(&["a"]));
    }

    #[test]
    fn zero_max_age_disables_the_cache_and_unusable_verdicts_are_not_kept() {
        let t0 = Utc::now();
        let off = VerdictCache::new(Duration::ZERO);
        off.store(&[verdict("a", Some(t0 + TimeDelta::seconds(300)))], t0);
        assert!(off.is_empty());

        let cache = VerdictCache::new(Duration::from_secs(60));
        cache.store(
            &[
                verdict("open", None),
                verdict("past", Some(t0 - TimeDelta::seconds(1))),
            ],
            t0,
        );
        assert!(cache.is_empty());
    }

    #[test]
    fn newer_unusable_verdict_replaces_and_invalidate_forgets() {
        let cache = VerdictCache::new(Duration::from_secs(60));
        let t0 = Utc::now();
        cache.store(
            &[
                verdict("a", Some(t0 + TimeDelta::seconds(300))),
                verdict("b", Some(t0 + TimeDelta::seconds(300))),
            ],
            t0,
        );
        assert_eq!(cache.len(), 2);
        // The server now says "a" has no current verdict: the old one must go.
        cache.store(&[verdict("a", None)], t0);
        cache.invalidate("b");
        let (known, fetch) = cache.split(&names(&["a", "b"]), t0);
        assert!(known.is_empty());
        assert_eq!(fetch, names(&["a", "b"]));
    }
}
