//! Trust-change push: subscribers (a scheduler, an orchestrator) register an
//! HTTPS webhook; whenever a host's effective trust changes they receive a
//! notification whose body is an ES256 JWT (`application/jwt`, claims
//! [`proto::token::TrustChange`]) signed with the token key.
//!
//! Attestation must never wait for a subscriber: the request path only
//! queues the change in a bounded queue (dropping the oldest, with a
//! warning, when full); a deliverer task signs and posts, each delivery
//! with a per-attempt timeout and a few retries with backoff, then gives up.
//! A scanner notices verdicts passing their expiry (they read `unknown`).

use crate::api::Caller;
use crate::audit;
use crate::error::Error;
use crate::store::Subscriber;
use crate::tls::Role;
use crate::AppState;
use axum::extract::{Path, State};
use axum::Json;
use chrono::{DateTime, Utc};
use proto::token::{TrustChange, JWT_CONTENT_TYPE, TRUST_CHANGED};
use proto::wire::Trust;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

/// Changes waiting for the deliverer; beyond this the oldest are dropped.
pub const QUEUE_CAPACITY: usize = 1024;
/// Attempts per delivery (the first and its retries).
pub const MAX_ATTEMPTS: u32 = 4;
/// Time allowed for one attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Backoff before the first retry; doubled for each further one.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Deliveries in flight at once, across subscribers.
const MAX_IN_FLIGHT: usize = 64;
/// How often the scanner looks for verdicts that passed their expiry.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest accepted subscriber URL and secret.
const MAX_URL_LEN: usize = 2048;
const MAX_SECRET_LEN: usize = 1024;

/// One change of a host's effective trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub host: String,
    pub from: Trust,
    pub to: Trust,
    pub at: DateTime<Utc>,
}

/// The bounded queue between the request handlers and the deliverer.
pub struct Push {
    queue: Mutex<VecDeque<Change>>,
    wake: Notify,
    capacity: usize,
}

impl Default for Push {
    fn default() -> Self {
        Self::new(QUEUE_CAPACITY)
    }
}

impl Push {
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            capacity: capacity.max(1),
        }
    }

    /// Report a host's effective trust before and after a stored verdict;
    /// queues a notification when it changed. Never blocks.
    pub fn report(&self, host: &str, from: Trust, to: Trust, at: DateTime<Utc>) {
        if from == to {
            return;
        }
        let change = Change {
            host: host.to_string(),
            from,
            to,
            at,
        };
        let dropped = match self.queue.lock() {
            Ok(mut q) => {
                let dropped = if q.len() >= self.capacity {
                    q.pop_front()
                } else {
                    None
                };
                q.push_back(change);
                dropped
            }
            // A panicked holder cannot leave the queue inconsistent (push/pop only).
            Err(poisoned) => {
                poisoned.into_inner().push_back(change);
                None
            }
        };
        if let Some(d) = dropped {
            tracing::warn!(
                host = d.host,
                from = d.from.as_str(),
                to = d.to.as_str(),
                "trust-change queue full: dropped the oldest notification"
            );
        }
        self.wake.notify_one();
    }

    fn take_all(&self) -> Vec<Change> {
        match self.queue.lock() {
            Ok(mut q) => q.drain(..).collect(),
            Err(poisoned) => poisoned.into_inner().drain(..).collect(),
        }
    }

    /// Changes waiting (for tests and metrics).
    pub fn pending(&self) -> usize {
        self.queue.lock().map(|q| q.len()).unwrap_or_default()
    }
}

/// The HTTPS client for subscribers: TLS verified against `push_ca` (or the
/// pool CA); no way to switch verification off.
pub fn client(st: &AppState) -> Result<reqwest::Client, Error> {
    let ca = st
        .config
        .push_ca
        .clone()
        .unwrap_or_else(|| st.config.tls.client_ca.clone());
    let bad = |problem: String| Error::Config {
        key: "push_ca".into(),
        problem: format!("{}: {problem}", ca.display()),
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&ca).map_err(|e| bad(e.to_string()))? {
        roots
            .add(cert.map_err(|e| bad(e.to_string()))?)
            .map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::TlsSetup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .https_only(true)
        .timeout(ATTEMPT_TIMEOUT)
        .connect_timeout(ATTEMPT_TIMEOUT)
        .build()
        .map_err(|e| Error::TlsSetup(format!("push client: {e}")))
}

/// Deliver queued changes until `shutdown`. Without a token key nothing can
/// be signed, so changes are only drained (and logged at debug level).
pub async fn deliver(st: Arc<AppState>, http: reqwest::Client, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut inflight = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = st.push.wake.notified() => {}
            Some(_) = inflight.join_next(), if !inflight.is_empty() => continue,
        }
        for change in st.push.take_all() {
            let Some(signer) = st.token.as_deref() else {
                tracing::debug!(host = change.host, "no token_key: trust change not pushed");
                continue;
            };
            let subscribers = match st.store.subscribers().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, host = change.host, "cannot read subscribers: trust change not pushed");
                    continue;
                }
            };
            if subscribers.is_empty() {
                continue;
            }
            let claims = TrustChange {
                iss: st.config.name.clone(),
                sub: change.host.clone(),
                event: TRUST_CHANGED.into(),
                from: change.from.as_str().into(),
                to: change.to.as_str().into(),
                at: change.at.timestamp(),
                jti: uuid::Uuid::new_v4().to_string(),
            };
            let jwt = match signer.sign(&claims) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(error = %e, "cannot sign a trust-change notification");
                    continue;
                }
            };
            for sub in subscribers {
                // Waits only when MAX_IN_FLIGHT deliveries are stuck; the
                // queue in front absorbs (and bounds) what arrives meanwhile.
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (http, jwt, host) = (http.clone(), jwt.clone(), change.host.clone());
                inflight.spawn(async move {
                    post_with_retries(&http, &sub, &jwt, &host).await;
                    drop(permit);
                });
            }
        }
    }
    // Deliveries in flight get a short grace period, then are dropped.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while inflight.join_next().await.is_some() {}
    })
    .await;
}

/// POST one notification; true once a subscriber accepted it.
pub async fn post_with_retries(
    http: &reqwest::Client,
    sub: &Subscriber,
    jwt: &str,
    host: &str,
) -> bool {
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=MAX_ATTEMPTS {
        let mut req = http
            .post(&sub.url)
            .header(reqwest::header::CONTENT_TYPE, JWT_CONTENT_TYPE)
            .body(jwt.to_string());
        if let Some(secret) = &sub.secret {
            req = req.bearer_auth(secret);
        }
        let permanent = match req.send().await {
            Ok(resp) if resp.status().is_success() => {
                tracing::debug!(subscriber = sub.id, host, attempt, "trust change delivered");
                return true;
            }
            Ok(resp) => {
                let s = resp.status();
                tracing::info!(
                    subscriber = sub.id,
                    host,
                    attempt,
                    status = s.as_u16(),
                    "subscriber refused a trust change"
                );
                // A client error other than timeout/rate limit will not heal by retrying.
                s.is_client_error()
                    && s != reqwest::StatusCode::REQUEST_TIMEOUT
                    && s != reqwest::StatusCode::TOO_MANY_REQUESTS
            }
            Err(e) => {
                tracing::info!(subscriber = sub.id, host, attempt, error = %e, "trust change delivery failed");
                false
            }
        };
        if permanent || attempt == MAX_ATTEMPTS {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
    tracing::warn!(
        subscriber = sub.id,
        url = sub.url,
        host,
        "gave up delivering a trust change"
    );
    false
}

/// Every second, report verdicts that passed their expiry since the last
/// look: they now read `unknown`.
pub async fn scan_expiries(st: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut last = Utc::now();
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(SCAN_INTERVAL) => {}
        }
        let now = Utc::now();
        match st.store.verdicts_expiring(last, now).await {
            Ok(lapsed) => {
                for v in lapsed {
                    let at = v.expires_at.unwrap_or(now);
                    st.push.report(&v.host, v.trust, Trust::Unknown, at);
                }
                last = now;
            }
            // Keep `last`: the next scan covers this window too.
            Err(e) => tracing::warn!(error = %e, "expiry scan failed"),
        }
    }
}

/// `POST /v1/subscriptions` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSubscription {
    pub url: String,
    #[serde(default)]
    pub secret: Option<String>,
}

/// A subscription as the API shows it (the secret is never shown again).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubscriptionView {
    pub id: String,
    pub url: String,
    pub has_secret: bool,
    pub created_at: DateTime<Utc>,
}

impl From<&Subscriber> for SubscriptionView {
    fn from(s: &Subscriber) -> Self {
        Self {
            id: s.id.clone(),
            url: s.url.clone(),
            has_secret: s.secret.is_some(),
            created_at: s.created_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SubscriptionList {
    pub subscriptions: Vec<SubscriptionView>,
}

/// An absolute https:// URL with a host, of bounded length.
pub fn validate_url(url: &str) -> Result<(), Error> {
    if url.len() > MAX_URL_LEN {
        return Err(Error::BadSubscription(format!(
            "url is longer than {MAX_URL_LEN} bytes"
        )));
    }
    let parsed =
        reqwest::Url::parse(url).map_err(|e| Error::BadSubscription(format!("url: {e}")))?;
    if parsed.scheme() != "https" {
        return Err(Error::BadSubscription(
            "url must be https:// (notifications are only sent over verified TLS)".into(),
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(Error::BadSubscription("url has no host".into()));
    }
    Ok(())
}

pub async fn subscribe(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    crate::api::Body(req): crate::api::Body<NewSubscription>,
) -> Result<Json<SubscriptionView>, Error> {
    caller.require(&[Role::Admin], "manage subscriptions")?;
    validate_url(&req.url)?;
    if req.secret.as_ref().is_some_and(|s| {
        s.is_empty() || s.len() > MAX_SECRET_LEN || s.chars().any(char::is_control)
    }) {
        return Err(Error::BadSubscription(format!(
            "secret must be 1-{MAX_SECRET_LEN} printable characters"
        )));
    }
    let now = Utc::now();
    let sub = Subscriber {
        id: uuid::Uuid::new_v4().to_string(),
        url: req.url,
        secret: req.secret,
        created_at: now,
    };
    st.store.add_subscriber(&sub).await?;
    record(&st, &caller, "create", &sub.id, now).await?;
    tracing::info!(id = sub.id, url = sub.url, "trust-change subscriber added");
    Ok(Json(SubscriptionView::from(&sub)))
}

pub async fn list(
    State(st): State<Arc<AppState>>,
    caller: Caller,
) -> Result<Json<SubscriptionList>, Error> {
    caller.require(&[Role::Admin], "manage subscriptions")?;
    let subs = st.store.subscribers().await?;
    Ok(Json(SubscriptionList {
        subscriptions: subs.iter().map(SubscriptionView::from).collect(),
    }))
}

pub async fn unsubscribe(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, Error> {
    caller.require(&[Role::Admin], "manage subscriptions")?;
    if !st.store.delete_subscriber(&id).await? {
        return Err(Error::SubscriptionUnknown(id));
    }
    record(&st, &caller, "delete", &id, Utc::now()).await?;
    Ok(Json(serde_json::json!({ "deleted": id })))
}

/// Audit a subscription change.
async fn record(
    st: &AppState,
    caller: &Caller,
    action: &str,
    id: &str,
    now: DateTime<Utc>,
) -> Result<(), Error> {
    let target = proto::cadf::Resource {
        type_uri: "service/subscription".into(),
        id: proto::cadf::resource_id("subscription", id),
        name: Some(id.to_string()),
    };
    let ev = audit::event(
        &st.config.name,
        audit::client(caller.0.role.as_str(), &caller.0.name),
        target,
        action,
        "success",
        None,
        now,
        None,
    );
    st.store.record_event(&ev).await?;
    st.audit_wake.notify_one();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_drops_the_oldest_when_full_and_ignores_non_changes() {
        let p = Push::new(2);
        let t = Utc::now();
        p.report("a", Trust::Trusted, Trust::Trusted, t);
        assert_eq!(p.pending(), 0);
        p.report("a", Trust::Trusted, Trust::Untrusted, t);
        p.report("b", Trust::Trusted, Trust::Unknown, t);
        p.report("c", Trust::Unknown, Trust::Trusted, t);
        let hosts: Vec<String> = p.take_all().into_iter().map(|c| c.host).collect();
        assert_eq!(hosts, ["b", "c"]);
        assert_eq!(p.pending(), 0);
    }

    #[test]
    fn only_https_urls_are_accepted() {
        validate_url("https://sched.example:8443/hook").unwrap();
        for bad in ["http://sched/hook", "not a url", "https://", "ftp://x/"] {
            assert!(
                matches!(validate_url(bad), Err(Error::BadSubscription(_))),
                "{bad}"
            );
        }
    }
}
