//! HTTP handlers (documented in `docs/api.md`). They authorize the caller,
//! look up the expected state, call the verifier and store what it returns.

use crate::audit;
use crate::error::Error;
use crate::store::{AttestationRecord, HostRecord, LogRecord, Recorded, UsedNonce};
use crate::tls::{ClientIdentity, Peer, Role};
use crate::verify::{self, Expected, Failure, Policy};
use crate::AppState;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Duration, SubsecRound, Utc};
use proto::tpm::Public;
use proto::wire::{
    Challenge, Evidence, HostDetail, HostTrust, Reason, RegisterHost, Trust, TrustQuery,
    TrustQueryResponse,
};
use rand::RngCore;
use serde::de::DeserializeOwned;
use std::sync::Arc;

/// Most hosts one trust query may name.
pub const MAX_QUERY_HOSTS: usize = 10_000;

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route("/v1/agents/{host}/enroll", post(crate::enroll::enroll))
        .route("/v1/agents/{host}/activate", post(crate::enroll::activate))
        .route("/v1/agents/{host}/challenge", post(challenge))
        .route(
            "/v1/agents/{host}/evidence",
            post(evidence).layer(DefaultBodyLimit::max(state.config.max_evidence_bytes)),
        )
        .route("/v1/hosts", post(register_host))
        .route("/v1/hosts/{host}", get(host_detail))
        .route("/v1/hosts/{host}/trust", get(host_trust))
        .route("/v1/hosts/{host}/events", get(host_events))
        .route("/v1/hosts/{host}/rekey", post(crate::enroll::rekey))
        .route("/v1/trust/query", post(trust_query))
        .route("/v1/events", get(crate::audit::query::list_events))
        .route("/v1/audit/status", get(crate::audit::query::audit_status))
        .route("/v1/hosts/{host}/token", get(crate::token::host_token))
        .route("/.well-known/jwks.json", get(crate::token::jwks))
        .route(
            "/v1/subscriptions",
            post(crate::push::subscribe).get(crate::push::list),
        )
        .route(
            "/v1/subscriptions/{id}",
            axum::routing::delete(crate::push::unsubscribe),
        )
        .route("/v1/placements", post(crate::placement::report))
        // Operations: probes need no certificate; metrics and status do.
        .route("/healthz", get(crate::metrics::healthz))
        .route("/readyz", get(crate::metrics::readyz))
        .route("/metrics", get(crate::metrics::metrics))
        .route("/v1/status", get(crate::metrics::status))
        .merge(crate::whitelist::routes())
        .fallback(|| async { Error::NotFound })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// The authenticated caller, from the connection's client certificate.
pub struct Caller(pub ClientIdentity);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Error;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Error> {
        match parts.extensions.get::<Peer>() {
            Some(Some(Ok(id))) => Ok(Caller(id.clone())),
            Some(Some(Err(why))) => Err(Error::BadClientCertificate(why.clone())),
            _ => Err(Error::Unauthenticated),
        }
    }
}

impl Caller {
    pub(crate) fn require(&self, roles: &[Role], action: &'static str) -> Result<(), Error> {
        if roles.contains(&self.0.role) {
            Ok(())
        } else {
            Err(Error::Forbidden {
                role: self.0.role.as_str(),
                action,
            })
        }
    }

    /// Agents act only for the host named in their own certificate.
    pub(crate) fn require_agent_for(&self, host: &str) -> Result<(), Error> {
        self.require(&[Role::Agent], "act as a host agent")?;
        if self.0.name != host {
            return Err(Error::HostMismatch {
                cert_host: self.0.name.clone(),
                path_host: host.to_string(),
            });
        }
        Ok(())
    }
}

/// The challenge request body: `{}` (no options yet; unknown fields refused).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRequest {}

/// A JSON body that refuses unknown fields and oversized input with our
/// error codes rather than the framework's plain-text rejections.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for Body<T> {
    type Rejection = Error;
    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, Error> {
        let limit = if req.uri().path().ends_with("/evidence") {
            state.config.max_evidence_bytes
        } else {
            state.config.max_body_bytes
        };
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    Error::BodyTooLarge { limit }
                } else {
                    Error::BadBody(e.body_text())
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| Error::BadBody(e.to_string()))
    }
}

pub(crate) fn valid_host(host: &str) -> Result<(), Error> {
    if proto::wire::valid_host_name(host) {
        Ok(())
    } else {
        Err(Error::InvalidHostName(host.to_string()))
    }
}

/// `429 too_many_failures` for a host whose evidence keeps being refused
/// (see [`crate::throttle`]): answered before any database or verifier
/// work, and only after a delay (at most [`THROTTLE_DELAY`]), so a client
/// that retries at once instead of honouring Retry-After makes a new TLS
/// handshake every second, not hundreds of times a second (measured in
/// docs/benchmarks.md). The delay costs a connection slot, not CPU.
async fn not_throttled(st: &AppState, host: &str) -> Result<(), Error> {
    let Err(wait) = st.throttle.check(host, std::time::Instant::now()) else {
        return Ok(());
    };
    st.metrics.observe_throttled();
    let delay = wait.min(THROTTLE_DELAY);
    tokio::time::sleep(delay).await;
    Err(Error::TooManyFailures {
        host: host.to_string(),
        retry_after_secs: wait.saturating_sub(delay).as_secs().max(1),
    })
}

/// Longest a throttled request is held before its 429.
const THROTTLE_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

async fn challenge(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(host): Path<String>,
    Body(_): Body<ChallengeRequest>,
) -> Result<Json<Challenge>, Error> {
    valid_host(&host)?;
    caller.require_agent_for(&host)?;
    not_throttled(&st, &host).await?;
    let (record, _) = enrolled(st.store.host(&host).await?, &host)?;
    // Ask for the logs the host's policy judges, and the PCRs they extend.
    let needs = verify::LogNeeds::of(
        &*st.store
            .host_policy_at(&host, record.policy_generation)
            .await?,
    );
    // Nothing is stored: the nonce itself says what the evidence needs to
    // be checked against (see `challenge`).
    let mut random = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut random);
    let expires_at =
        (Utc::now() + Duration::seconds(st.config.challenge_ttl_secs as i64)).trunc_subsecs(0);
    let selection = needs.selection(&st.config.pcr_selection);
    let nonce = challenge_keys(&st, record.challenge_key_generation)
        .await?
        .issue(
            &host,
            expires_at,
            &proto::wire::selection_from_map(&selection),
            random,
        );
    Ok(Json(Challenge {
        nonce: hex::encode(nonce),
        pcr_selection: selection,
        expires_at,
        uefi_log: needs.uefi_log(),
        ima_from: needs.ima_from(
            record.ima_state.as_ref(),
            record.clock.map(|c| c.reset_count),
        ),
    }))
}

/// IMA text from this length on (a whole list, as at a host's first
/// attestation after boot) takes the verifier milliseconds to tens of them.
const LONG_IMA_LIST: usize = 64 * 1024;

/// On a multi-threaded runtime, whose workers can hand their other tasks
/// over while one blocks (`block_in_place` is refused elsewhere).
fn on_workers() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

async fn evidence(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(host): Path<String>,
    body: Result<Body<Evidence>, Error>,
) -> Result<Json<HostTrust>, Error> {
    valid_host(&host)?;
    let now = Utc::now();
    if let Err(e) = caller.require_agent_for(&host) {
        // Someone tried to speak for this host: audit it, change nothing.
        if caller.0.role == Role::Agent {
            let reason = Reason {
                step: "authorization".into(),
                code: e.code().into(),
                message: e.to_string(),
                pcr: None,
            };
            let ev = audit::attestation_event(&audit::Attestation {
                observer: &st.config.name,
                host: &host,
                initiator: &caller.0.name,
                now,
                verdict: None,
                reason: Some(&reason),
                pcrs: None,
                correlation_id: &uuid::Uuid::new_v4().to_string(),
            });
            st.store.record_event(&ev).await?;
            st.audit_wake.notify_one();
        }
        return Err(e);
    }
    not_throttled(&st, &host).await?;
    let started = std::time::Instant::now();
    let (record, ak) = enrolled(st.store.host(&host).await?, &host)?;
    let trust_before = current_trust(&host, record.verdict.clone(), now).trust;
    // The nonce, once the pool's key shows it was issued to this host; it
    // is stored as used with whatever verdict this evidence gets.
    let mut used: Option<UsedNonce> = None;
    // IMA list lines the evidence carried (for the metrics).
    let mut ima_received = 0u64;
    let result = match body {
        Ok(Body(ev)) => {
            ima_received = ev.ima.as_ref().map_or(0, |i| {
                i.entries.lines().filter(|l| !l.is_empty()).count() as u64
            });
            let nonce = ev.nonce.to_ascii_lowercase();
            let claims = challenge_keys(&st, record.challenge_key_generation)
                .await?
                .open(&host, &nonce);
            let host_policy = st
                .store
                .host_policy_at(&host, record.policy_generation)
                .await?;
            let issued = claims.map(|c| {
                // What this server would ask for now; if that is what the
                // challenge asked for, the quote must cover exactly it.
                let needs = verify::LogNeeds::of(&host_policy);
                let now_asked =
                    proto::wire::selection_from_map(&needs.selection(&st.config.pcr_selection));
                verify::IssuedChallenge {
                    selection: c.asked_for(&now_asked).then_some(now_asked),
                    expires_at: c.expires_at,
                }
            });
            used = claims.map(|c| UsedNonce {
                nonce,
                expires_at: c.expires_at,
                exclusive: true,
            });
            let expected = Expected {
                host: &host,
                ak: &ak,
                challenge: issued.as_ref(),
                last_clock: record.clock,
            };
            let policy = Policy {
                host_policy: &host_policy,
                freshness: Duration::seconds(st.config.freshness_secs as i64),
            };
            let stored = verify::StoredLogs {
                ima_state: record.ima_state.as_ref(),
                uefi_log: record.last_uefi_log.as_deref(),
            };
            let run = || verify::verify_with_state(&ev, &expected, stored, &policy, now);
            if ev
                .ima
                .as_ref()
                .is_some_and(|i| i.entries.len() >= LONG_IMA_LIST)
                && on_workers()
            {
                // Tens of milliseconds of CPU: let the runtime move this
                // worker's other connections to another thread meanwhile.
                tokio::task::block_in_place(run)
            } else {
                run()
            }
            .map_err(|failure| Error::Verification { failure })
        }
        Err(e) => Err(e),
    };
    let correlation_id = uuid::Uuid::new_v4().to_string();
    let refusal = Refusal {
        host: &host,
        caller: &caller,
        now,
        trust_before,
        started,
        used: used.as_ref(),
    };
    match result {
        Ok(mut verified) => {
            let mut epoch = record.policy_epoch;
            let mut attempts = 0;
            loop {
                let events =
                    attestation_events(&st, &host, &caller, now, &verified, &correlation_id);
                let rec = AttestationRecord {
                    verdict: &verified.verdict,
                    verified_pcrs: Some(&verified.pcrs),
                    clock: Some(verified.attest.clock_info),
                    events: &events,
                    policy_epoch: Some(epoch),
                    nonce: used.as_ref(),
                };
                let logs = LogRecord {
                    ima_state: verified.ima_state.as_ref(),
                    uefi_log: verified.logs.uefi.as_ref().map(|(b, _)| b.as_slice()),
                };
                match st
                    .store
                    .record_attestation_with_logs(&host, rec, logs)
                    .await?
                {
                    Recorded::Stored => break,
                    Recorded::PolicyChanged => {}
                    Recorded::NonceUsed => {
                        // Genuine, but earlier evidence used this nonce: a replay.
                        let err = Error::Verification {
                            failure: Failure::Nonce(verify::NonceFailure::Replayed),
                        };
                        return refuse(&st, refusal, &correlation_id, err).await;
                    }
                }
                // A policy change affected the host meanwhile: judge the same
                // genuine evidence again against the policy as it is now.
                attempts += 1;
                if attempts > 5 {
                    return Err(Error::PolicyChanging { host: host.clone() });
                }
                epoch = known_host(&st, &host).await?.policy_epoch;
                let host_policy = st.store.host_policy(&host).await?;
                verified.rejudge(&host_policy);
            }
            st.metrics
                .observe_attestation(&verified.verdict, started.elapsed());
            st.metrics.observe_ima(
                ima_received,
                verified
                    .logs
                    .ima
                    .as_ref()
                    .map_or(0, |i| i.replayed.len() as u64),
            );
            st.throttle.accepted(&host);
            st.audit_wake.notify_one();
            st.push
                .report(&host, trust_before, verified.verdict.trust, now);
            tracing::info!(
                host,
                trust = verified.verdict.trust.as_str(),
                "attestation verified"
            );
            Ok(Json(verified.verdict))
        }
        Err(err) => refuse(&st, refusal, &correlation_id, err).await,
    }
}

/// The pool's challenge keys as of `generation` (read with the host's
/// record): reloaded once after a rotation made on any server.
async fn challenge_keys(
    st: &AppState,
    generation: i64,
) -> Result<Arc<crate::challenge::KeyRing>, Error> {
    let held = st.challenge_keys.get();
    if held.generation >= generation {
        return Ok(held);
    }
    let ring = Arc::new(crate::challenge::KeyRing::new(
        &st.store.challenge_keys().await?,
        Duration::seconds(st.config.challenge_ttl_secs as i64),
    ));
    st.challenge_keys.offer(ring.clone());
    Ok(ring)
}

/// Evidence being refused, and what its verdict is stored with.
struct Refusal<'a> {
    host: &'a str,
    caller: &'a Caller,
    now: DateTime<Utc>,
    trust_before: Trust,
    started: std::time::Instant,
    /// Stored as used, whether or not earlier evidence used it.
    used: Option<&'a UsedNonce>,
}

/// Store the untrusted verdict and event of refused evidence and answer
/// with the refusal. Evidence that is not genuine makes its host untrusted:
/// only the host's own certificate can submit it, so something is wrong there.
async fn refuse(
    st: &AppState,
    r: Refusal<'_>,
    correlation_id: &str,
    err: Error,
) -> Result<Json<HostTrust>, Error> {
    let Refusal {
        host,
        caller,
        now,
        trust_before,
        started,
        used,
    } = r;
    let reason = match &err {
        Error::Verification { failure } => failure.reason(),
        other => Reason {
            step: verify::Step::Decode.name().into(),
            code: other.code().into(),
            message: other.to_string(),
            pcr: None,
        },
    };
    let verdict = verify::verdict(
        host,
        vec![reason.clone()],
        now,
        Duration::seconds(st.config.freshness_secs as i64),
    );
    let ev = audit::attestation_event(&audit::Attestation {
        observer: &st.config.name,
        host,
        initiator: &caller.0.name,
        now,
        verdict: Some(&verdict),
        reason: Some(&reason),
        pcrs: None,
        correlation_id,
    });
    let not_exclusive = used.map(|u| UsedNonce {
        exclusive: false,
        ..u.clone()
    });
    let rec = AttestationRecord {
        verdict: &verdict,
        verified_pcrs: None,
        clock: None,
        events: std::slice::from_ref(&ev),
        policy_epoch: None,
        nonce: not_exclusive.as_ref(),
    };
    st.store.record_attestation(host, rec).await?;
    st.metrics.observe_attestation(&verdict, started.elapsed());
    if st.throttle.refused(host, std::time::Instant::now()) {
        tracing::warn!(
            host,
            burst = st.config.failure_burst,
            refill_secs = st.config.failure_refill_secs,
            "host throttled: its evidence was refused too often in a row"
        );
    }
    st.audit_wake.notify_one();
    st.push.report(host, trust_before, verdict.trust, now);
    tracing::warn!(host, code = err.code(), error = %err, "evidence refused");
    Err(err)
}

/// The events of one genuine attestation: the attestation itself, and a
/// reboot when the TPM's counters say the host restarted since its last quote.
fn attestation_events(
    st: &AppState,
    host: &str,
    caller: &Caller,
    now: DateTime<Utc>,
    verified: &verify::Verified,
    correlation_id: &str,
) -> Vec<crate::store::NewEvent> {
    let ev = audit::attestation_event(&audit::Attestation {
        observer: &st.config.name,
        host,
        initiator: &caller.0.name,
        now,
        verdict: Some(&verified.verdict),
        reason: None,
        pcrs: Some(&verified.pcrs),
        correlation_id,
    });
    let mut events = vec![ev];
    if verified.rebooted {
        // The host rebooted since its last quote; this quote is its fresh attestation.
        events.push(audit::event(
            &st.config.name,
            audit::client("agent", host),
            proto::cadf::Resource::host(host),
            "monitor",
            "success",
            Some(("tpm/clock", "reboot")),
            now,
            Some(host),
        ));
        tracing::info!(host, "reboot detected from the TPM reset/restart count");
    }
    events
}

/// The host's record and decoded AK, once its AK completed activation.
fn enrolled(record: Option<HostRecord>, host: &str) -> Result<(HostRecord, Public), Error> {
    let record = record.ok_or_else(|| Error::NotEnrolled {
        host: host.to_string(),
    })?;
    let bytes = record
        .ak_public
        .as_deref()
        .ok_or_else(|| Error::NotEnrolled {
            host: host.to_string(),
        })?;
    if !record.ak_activated {
        return Err(Error::NotActivated {
            host: host.to_string(),
        });
    }
    let ak = Public::decode(bytes).map_err(|e| Error::Verification {
        failure: Failure::Decode(verify::DecodeFailure::Ak(e)),
    })?;
    Ok((record, ak))
}

/// What a reader is told now: a verdict past its expiry is `unknown`.
pub fn current_trust(host: &str, stored: Option<HostTrust>, now: DateTime<Utc>) -> HostTrust {
    let Some(v) = stored else {
        return HostTrust::unknown(
            host,
            Reason {
                step: "freshness".into(),
                code: "no_verdict".into(),
                message: "the host is not registered or has never attested".into(),
                pcr: None,
            },
        );
    };
    match v.expires_at {
        Some(exp) if now < exp => v,
        exp => {
            let mut reasons = vec![Reason {
                step: "freshness".into(),
                code: "verdict_expired".into(),
                message: format!(
                    "last verdict ({}) expired at {}",
                    v.trust.as_str(),
                    exp.map(|e| e.to_rfc3339()).unwrap_or_default()
                ),
                pcr: None,
            }];
            reasons.extend(v.reasons);
            HostTrust {
                trust: Trust::Unknown,
                reasons,
                ..v
            }
        }
    }
}

async fn host_trust(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(host): Path<String>,
) -> Result<Json<HostTrust>, Error> {
    valid_host(&host)?;
    if caller.0.role == Role::Agent {
        caller.require_agent_for(&host)?;
    }
    let mut found = st.store.verdicts(std::slice::from_ref(&host)).await?;
    Ok(Json(current_trust(&host, found.remove(&host), Utc::now())))
}

async fn trust_query(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Body(q): Body<TrustQuery>,
) -> Result<Json<TrustQueryResponse>, Error> {
    caller.require(&[Role::Scheduler, Role::Admin], "query the trust of hosts")?;
    if q.hosts.len() > MAX_QUERY_HOSTS {
        return Err(Error::BadBody(format!(
            "{} hosts requested; at most {MAX_QUERY_HOSTS} per query",
            q.hosts.len()
        )));
    }
    for h in &q.hosts {
        valid_host(h)?;
    }
    let mut found = st.store.verdicts(&q.hosts).await?;
    let now = Utc::now();
    let hosts = q
        .hosts
        .iter()
        .map(|h| current_trust(h, found.get(h).cloned(), now))
        .collect();
    found.clear();
    Ok(Json(TrustQueryResponse { hosts }))
}

async fn register_host(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Body(req): Body<RegisterHost>,
) -> Result<Json<HostDetail>, Error> {
    caller.require(&[Role::Admin], "register hosts")?;
    valid_host(&req.host)?;
    let now = Utc::now();
    if st.store.register_host(&req.host, now).await? {
        let ev = audit::event(
            &st.config.name,
            audit::client("admin", &caller.0.name),
            proto::cadf::Resource::host(&req.host),
            "create",
            "success",
            None,
            now,
            Some(&req.host),
        );
        st.store.record_event(&ev).await?;
        st.audit_wake.notify_one();
    }
    detail(&st, &req.host).await.map(Json)
}

/// The host's record, or `unknown_host`.
async fn known_host(st: &AppState, host: &str) -> Result<HostRecord, Error> {
    st.store
        .host(host)
        .await?
        .ok_or_else(|| Error::UnknownHost(host.to_string()))
}

pub(crate) async fn detail(st: &AppState, host: &str) -> Result<HostDetail, Error> {
    let r = known_host(st, host).await?;
    Ok(HostDetail {
        verdict: current_trust(host, r.verdict, Utc::now()),
        host: r.name,
        registered_at: r.registered_at,
        ak_name: r.ak_name,
        whitelist: crate::whitelist::own(st, host).await?,
        group: r.group,
        last_pcrs: r.last_pcrs,
    })
}

async fn host_detail(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(host): Path<String>,
) -> Result<Json<HostDetail>, Error> {
    caller.require(&[Role::Admin], "read host details")?;
    valid_host(&host)?;
    detail(&st, &host).await.map(Json)
}

async fn host_events(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(host): Path<String>,
) -> Result<Json<Vec<serde_json::Value>>, Error> {
    caller.require(&[Role::Admin], "read audit events")?;
    valid_host(&host)?;
    let events = st.store.host_events(&host, 1000).await?;
    Ok(Json(
        events
            .iter()
            .filter_map(|e| serde_json::from_str(e).ok())
            .collect(),
    ))
}
