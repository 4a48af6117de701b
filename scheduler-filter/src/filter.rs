//! `TrustFilter`: the cache, one trust query for whatever is not cached, and
//! the pure decision.

use crate::cache::VerdictCache;
use crate::config::FilterConfig;
use crate::decision::{decide_from, Decision, Lookup};
use crate::error::Error;
use crate::placement::{self, PlacementRecorded, PLACEMENTS_PATH};
use crate::tokens::TokenVerifier;
use chrono::{DateTime, Utc};
use proto::client::ApiClient;
use proto::token::{Claims, TrustChange};
use proto::wire::{valid_host_name, HostTrust, Trust, TrustQuery, TrustQueryResponse};
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

const TRUST_QUERY_PATH: &str = "/v1/trust/query";

/// Asks the attestation server which hosts are trusted, caching verdicts.
///
/// Cheap to share: wrap it in an `Arc` and call it from many tasks.
pub struct TrustFilter {
    client: ApiClient,
    cache: VerdictCache,
    /// The server's signing keys, fetched at the first token checked.
    tokens: TokenVerifier,
}

impl TrustFilter {
    /// Build the mutual-TLS client from the configured certificate files.
    pub fn new(config: &FilterConfig) -> Result<Self, Error> {
        let client = ApiClient::new(
            &config.server_url,
            &config.tls,
            Duration::from_secs(config.request_timeout_secs),
        )
        .map_err(|source| Error::Client {
            server_url: config.server_url.clone(),
            source,
        })?;
        Ok(Self {
            tokens: TokenVerifier::from_server(client.clone()),
            client,
            cache: VerdictCache::new(Duration::from_secs(config.max_cache_secs)),
        })
    }

    pub fn server_url(&self) -> &str {
        self.client.base_url()
    }

    /// The candidates that pass, in input order. Fails closed: a host the
    /// server could not vouch for is left out.
    pub async fn filter(&self, candidates: &[String], required: Trust) -> Vec<String> {
        self.decide(candidates, required)
            .await
            .into_iter()
            .filter(|d| d.allowed)
            .map(|d| d.host)
            .collect()
    }

    /// One decision per candidate, in input order, each with its reason.
    pub async fn decide(&self, candidates: &[String], required: Trust) -> Vec<Decision> {
        decide_via(&self.cache, candidates, required, Utc::now, |hosts| {
            self.query(hosts)
        })
        .await
    }

    /// Forget the cached verdict of `host` (e.g. when the server announces a
    /// trust change), so the next decision asks the server.
    pub fn invalidate(&self, host: &str) {
        self.cache.invalidate(host);
    }

    /// Verify a host-trust token offline: after the key set was fetched
    /// once, no server call (unless the token names a key we do not hold).
    pub async fn verify_token(&self, token: &str) -> Result<Claims, Error> {
        self.tokens.verify_token(token).await
    }

    /// Act on a pushed notification: if it is a genuine `trust_changed`
    /// event, forget that host's cached verdict at once.
    pub async fn apply_notification(&self, token: &str) -> Result<TrustChange, Error> {
        let change = self.tokens.verify_notification(token).await?;
        self.invalidate(&change.sub);
        tracing::info!(host = %change.sub, from = %change.from, to = %change.to, "trust changed; cached verdict dropped");
        Ok(change)
    }

    /// Whether a verdict for `host` is cached right now.
    pub fn is_cached(&self, host: &str) -> bool {
        let (known, _) = self.cache.split(&[host.to_string()], Utc::now());
        !known.is_empty()
    }

    /// Record the decisions made for `workload` on the server, as audit
    /// evidence of where it was allowed to run. Returns how many the server
    /// recorded.
    pub async fn report_placement(
        &self,
        workload: &str,
        decisions: &[Decision],
    ) -> Result<usize, Error> {
        let body = placement::report(workload, decisions, Utc::now());
        let answer: PlacementRecorded =
            self.client
                .post(PLACEMENTS_PATH, &body)
                .await
                .map_err(|source| Error::Placement {
                    server_url: self.client.base_url().to_string(),
                    source,
                })?;
        Ok(answer.recorded)
    }

    async fn query(&self, hosts: Vec<String>) -> Result<TrustQueryResponse, Error> {
        self.client
            .post(TRUST_QUERY_PATH, &TrustQuery { hosts })
            .await
            .map_err(|source| Error::Query {
                server_url: self.client.base_url().to_string(),
                source,
            })
    }
}

/// The whole decision with the clock and the server query supplied by the
/// caller, so tests can drive it without a network.
pub(crate) async fn decide_via<C, F, Fut>(
    cache: &VerdictCache,
    candidates: &[String],
    required: Trust,
    clock: C,
    fetch: F,
) -> Vec<Decision>
where
    C: Fn() -> DateTime<Utc>,
    F: FnOnce(Vec<String>) -> Fut,
    Fut: Future<Output = Result<TrustQueryResponse, Error>>,
{
    // Invalid names are never sent; decide_from denies them.
    let valid: Vec<String> = candidates
        .iter()
        .filter(|h| valid_host_name(h))
        .cloned()
        .collect();
    let (mut known, to_fetch) = cache.split(&valid, clock());
    if !to_fetch.is_empty() {
        let answer = fetch(to_fetch.clone()).await;
        let (fetched, usable) = merge_answer(&to_fetch, answer);
        cache.store(&usable, clock());
        known.extend(fetched);
    }
    // Read the clock again: a verdict that expired while the query ran fails.
    decide_from(&known, candidates, required, clock())
}

/// Match the server's answer to the requested hosts. Returns what is known
/// per host and the verdicts fit for the cache. Hosts the server did not
/// echo get no entry (decide_from denies them); hosts it answered twice are
/// ambiguous and denied; hosts it was not asked about are ignored.
fn merge_answer(
    requested: &[String],
    answer: Result<TrustQueryResponse, Error>,
) -> (HashMap<String, Lookup>, Vec<HostTrust>) {
    let response = match answer {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "trust query failed; denying {} host(s)", requested.len());
            let why = e.to_string();
            let failed = requested
                .iter()
                .map(|h| (h.clone(), Lookup::Failed(why.clone())))
                .collect();
            return (failed, Vec::new());
        }
    };
    let mut by_host: HashMap<String, Vec<HostTrust>> = HashMap::new();
    for verdict in response.hosts {
        if requested.contains(&verdict.host) {
            by_host
                .entry(verdict.host.clone())
                .or_default()
                .push(verdict);
        } else {
            tracing::warn!(host = %verdict.host, "trust server answered for a host not asked about");
        }
    }
    let mut known = HashMap::new();
    let mut usable = Vec::new();
    for (host, mut verdicts) in by_host {
        match (verdicts.pop(), verdicts.is_empty()) {
            (Some(v), true) => {
                usable.push(v.clone());
                known.insert(host, Lookup::Verdict(v));
            }
            _ => {
                known.insert(
                    host,
                    Lookup::Failed("the trust server answered more than once for this host".into()),
                );
            }
        }
    }
    (known, usable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use proto::client::ClientError;
    use std::cell::RefCell;

    fn verdict(host: &str, trust: Trust, expires_in: i64) -> HostTrust {
        let now = Utc::now();
        HostTrust {
            host: host.into(),
            trust,
            verified_at: Some(now),
            expires_at: Some(now + TimeDelta::seconds(expires_in)),
            reasons: vec![],
            policy: None,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// A stand-in for the server: records each query, answers from a list.
    struct FakeServer {
        queries: RefCell<Vec<Vec<String>>>,
        answer: RefCell<Result<Vec<HostTrust>, ()>>,
    }

    impl FakeServer {
        fn new(verdicts: Vec<HostTrust>) -> Self {
            Self {
                queries: RefCell::new(Vec::new()),
                answer: RefCell::new(Ok(verdicts)),
            }
        }
        async fn run(
            &self,
            cache: &VerdictCache,
            hosts: &[&str],
            required: Trust,
        ) -> Vec<Decision> {
            decide_via(
                cache,
                &names(hosts),
                required,
                Utc::now,
                |asked| async move {
                    self.queries.borrow_mut().push(asked);
                    match &*self.answer.borrow() {
                        Ok(v) => Ok(TrustQueryResponse { hosts: v.clone() }),
                        Err(()) => Err(Error::Query {
                            server_url: "https://attest.test:8443".into(),
                            source: ClientError::Transport {
                                url: "https://attest.test:8443/v1/trust/query".into(),
                                detail: "connection refused".into(),
                            },
                        }),
                    }
                },
            )
            .await
        }
        fn allowed(d: &[Decision]) -> Vec<&str> {
            d.iter()
                .filter(|d| d.allowed)
                .map(|d| d.host.as_str())
                .collect()
        }
    }

    #[tokio::test]
    async fn one_query_for_the_uncached_valid_hosts_then_cache_hits() {
        let server = FakeServer::new(vec![
            verdict("b", Trust::Untrusted, 300),
            verdict("a", Trust::Trusted, 300),
            verdict("stranger", Trust::Trusted, 300),
        ]);
        let cache = VerdictCache::new(Duration::from_secs(60));
        let d = server
            .run(&cache, &["a", "b", "bad/name", "a"], Trust::Trusted)
            .await;
        assert_eq!(*server.queries.borrow(), vec![names(&["a", "b"])]);
        assert_eq!(FakeServer::allowed(&d), vec!["a", "a"]);
        assert_eq!(d.len(), 4);
        // The unrequested "stranger" was not cached.
        assert_eq!(cache.len(), 2);

        let d = server.run(&cache, &["b", "a"], Trust::Trusted).await;
        assert_eq!(server.queries.borrow().len(), 1, "answered from the cache");
        assert_eq!(FakeServer::allowed(&d), vec!["a"]);

        cache.invalidate("a");
        server.run(&cache, &["a", "b"], Trust::Trusted).await;
        assert_eq!(server.queries.borrow()[1], names(&["a"]));
    }

    #[tokio::test]
    async fn query_failure_denies_every_fetched_host_and_names_the_server() {
        let server = FakeServer::new(vec![]);
        *server.answer.borrow_mut() = Err(());
        let cache = VerdictCache::new(Duration::from_secs(60));
        let d = server.run(&cache, &["a", "b"], Trust::Trusted).await;
        assert!(FakeServer::allowed(&d).is_empty());
        for decision in &d {
            assert!(
                decision
                    .reason
                    .contains("trust server https://attest.test:8443"),
                "{}",
                decision.reason
            );
            assert!(
                decision.reason.contains("connection refused"),
                "{}",
                decision.reason
            );
        }
        // Untrusted hosts are not listed either: nothing is known about them.
        let d = server.run(&cache, &["a"], Trust::Untrusted).await;
        assert!(FakeServer::allowed(&d).is_empty());
        assert!(cache.is_empty());
    }

    #[tokio::test]
    async fn missing_duplicated_and_expired_answers_fail_closed() {
        let server = FakeServer::new(vec![
            verdict("dup", Trust::Trusted, 300),
            verdict("dup", Trust::Trusted, 300),
            verdict("old", Trust::Trusted, -1),
            verdict("ok", Trust::Trusted, 300),
        ]);
        let cache = VerdictCache::new(Duration::from_secs(60));
        let d = server
            .run(&cache, &["dup", "old", "gone", "ok"], Trust::Trusted)
            .await;
        assert_eq!(FakeServer::allowed(&d), vec!["ok"]);
        assert!(d[0].reason.contains("more than once"), "{}", d[0].reason);
        assert!(d[1].reason.contains("expired"), "{}", d[1].reason);
        assert!(d[2].reason.contains("no verdict"), "{}", d[2].reason);
        // Only the usable verdict is cached; the others are asked again.
        assert_eq!(cache.len(), 1);
        server
            .run(&cache, &["dup", "old", "gone", "ok"], Trust::Trusted)
            .await;
        assert_eq!(server.queries.borrow()[1], names(&["dup", "old", "gone"]));
    }

    #[tokio::test]
    async fn nothing_to_ask_means_no_query() {
        let server = FakeServer::new(vec![]);
        let cache = VerdictCache::new(Duration::from_secs(60));
        let d = server.run(&cache, &["", "-x", "a b"], Trust::Trusted).await;
        assert!(server.queries.borrow().is_empty());
        assert!(d.iter().all(|d| !d.allowed));
        let d = server.run(&cache, &[], Trust::Trusted).await;
        assert!(d.is_empty() && server.queries.borrow().is_empty());
    }
}
