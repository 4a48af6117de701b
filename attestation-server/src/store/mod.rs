//! Storage: one trait, one implementation per backend.
//!
//! SQLite is the zero-set-up default; PostgreSQL is the shared state of
//! several servers. Both run the same runtime SQL (numbered `$n` parameters,
//! `RETURNING`, `ON CONFLICT`), so the query code is written once in
//! [`sql_store!`] and instantiated for each pool type; schemas and
//! migrations are per backend.

mod postgres;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use crate::verify::IssuedChallenge;
use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use proto::tpm::ClockInfo;
use proto::wire::{HostTrust, PcrSelectionMap, PcrValues, Trust, Whitelist};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stored {what} of host {host} is unreadable: {detail}")]
    Corrupt {
        host: String,
        what: &'static str,
        detail: String,
    },
    #[error("unsupported database URL {0:?}: use sqlite://PATH or postgres://…")]
    UnsupportedUrl(String),
}

/// Everything stored about one host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRecord {
    pub name: String,
    pub registered_at: DateTime<Utc>,
    pub ak_public: Option<Vec<u8>>,
    pub ak_name: Option<String>,
    pub whitelist: Option<Whitelist>,
    /// PCR values of the last evidence that passed the integrity steps.
    pub last_pcrs: Option<PcrValues>,
    pub verdict: Option<HostTrust>,
    /// hex name of the EK pinned to this host.
    pub ek_name: Option<String>,
    pub ek_certified: bool,
    /// True once the AK's credential was activated: only then are quotes accepted.
    pub ak_activated: bool,
    /// An operator approved enrolling this host with another EK.
    pub rekey_allowed: bool,
    /// The TPM clock of the last genuine quote.
    pub clock: Option<ClockInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewChallenge {
    pub nonce: String,
    pub host: String,
    pub selection: PcrSelectionMap,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// An audit event ready to be stored (the outbox row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub id: String,
    pub time: DateTime<Utc>,
    pub host: Option<String>,
    pub body: String,
}

/// An enrollment waiting for its credential to be activated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrollment {
    pub id: String,
    pub host: String,
    pub ek_public: Vec<u8>,
    pub ek_name: String,
    /// False when the host enrolled without an EK certificate (operator-allowed).
    pub ek_certified: bool,
    pub ak_public: Vec<u8>,
    pub ak_name: String,
    /// hex HMAC-SHA256(secret, host): what the agent's proof must equal.
    pub proof: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// An enrollment as `take_enrollment` found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenEnrollment {
    pub enrollment: Enrollment,
    /// True when an earlier activation attempt already used it.
    pub used_before: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActivateOutcome {
    Activated,
    /// The EK is pinned to another host.
    EkInUse {
        host: String,
    },
}

/// A verdict to store together with its audit event.
#[derive(Debug, Clone)]
pub struct AttestationRecord<'a> {
    pub verdict: &'a HostTrust,
    /// Present when the evidence was genuine (its values may become a whitelist).
    pub verified_pcrs: Option<&'a PcrValues>,
    /// The quote's clock, when the evidence was genuine.
    pub clock: Option<ClockInfo>,
    /// Events to store with the verdict (the attestation, maybe a reboot).
    pub events: &'a [NewEvent],
}

// ---- audit trail (issue 5): types ----

/// A stored event with its place in the server's hash chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: i64,
    pub id: String,
    pub time: DateTime<Utc>,
    /// The server whose chain holds the event (the CADF observer's name).
    pub server: String,
    /// Position in that chain, from 1.
    pub chain_index: i64,
    pub prev_hash: String,
    pub hash: String,
    pub body: String,
}

/// Filters of the event query API; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Matches the target's id or name.
    pub target: Option<String>,
    /// Matches the initiator's id or name.
    pub initiator: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// A signed statement "the chain of `server` had `count` events ending in `hash` at `seq`".
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    pub server: String,
    pub seq: i64,
    pub count: i64,
    pub hash: String,
    pub signed_at: DateTime<Utc>,
    /// hex of the uncompressed P-256 public key.
    pub public_key: String,
    /// hex of the ASN.1 ECDSA-SHA256 signature.
    pub signature: String,
}

/// The newest link of one server's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub server: String,
    pub seq: i64,
    pub hash: String,
    pub count: i64,
}

/// Events not yet delivered to one sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backlog {
    pub count: i64,
    pub oldest: Option<DateTime<Utc>>,
    pub newest_seq: i64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Register a host; false if it existed already.
    async fn register_host(&self, host: &str, now: DateTime<Utc>) -> Result<bool, StoreError>;
    async fn host(&self, host: &str) -> Result<Option<HostRecord>, StoreError>;
    /// The host an EK is pinned to, if any.
    async fn host_for_ek(&self, ek_name: &str) -> Result<Option<String>, StoreError>;
    /// Store a pending enrollment with its event.
    async fn create_enrollment(&self, e: &Enrollment, event: &NewEvent) -> Result<(), StoreError>;
    /// Atomically mark the enrollment used if it belongs to `host` and is
    /// unused; otherwise report what is stored without changing it.
    async fn take_enrollment(
        &self,
        id: &str,
        host: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<TakenEnrollment>, StoreError>;
    /// Pin the enrollment's EK and activate its AK (registering the host if
    /// needed), with the event; refuses an EK pinned to another host.
    async fn activate(
        &self,
        e: &Enrollment,
        event: &NewEvent,
    ) -> Result<ActivateOutcome, StoreError>;
    /// Let the host enroll once with another EK (an operator's re-key).
    async fn allow_rekey(&self, host: &str, event: &NewEvent) -> Result<bool, StoreError>;
    async fn insert_challenge(&self, ch: &NewChallenge) -> Result<(), StoreError>;
    /// Atomically consume the nonce if it was issued to `host` and is unused;
    /// otherwise report what is stored under it without changing it.
    async fn take_challenge(
        &self,
        nonce: &str,
        host: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<IssuedChallenge>, StoreError>;
    /// Store a verdict and its event in one transaction.
    async fn record_attestation(
        &self,
        host: &str,
        rec: AttestationRecord<'_>,
    ) -> Result<(), StoreError>;
    /// Store an event that changes no other state.
    async fn record_event(&self, event: &NewEvent) -> Result<(), StoreError>;
    /// Replace a host's whitelist and, when there is evidence to judge, its
    /// verdict, with the change's event, in one transaction.
    async fn set_whitelist(
        &self,
        host: &str,
        whitelist: &Whitelist,
        rejudged: Option<&HostTrust>,
        event: &NewEvent,
    ) -> Result<(), StoreError>;
    /// Stored verdicts of the named hosts (hosts without one are absent).
    async fn verdicts(&self, hosts: &[String]) -> Result<HashMap<String, HostTrust>, StoreError>;
    /// Events after `seq`, oldest first: `(seq, body)`.
    async fn events_after(&self, seq: i64, limit: i64) -> Result<Vec<(i64, String)>, StoreError>;
    /// The newest events about one host, oldest first.
    async fn host_events(&self, host: &str, limit: i64) -> Result<Vec<String>, StoreError>;
    async fn sink_cursor(&self, sink: &str) -> Result<i64, StoreError>;
    async fn set_sink_cursor(&self, sink: &str, seq: i64) -> Result<(), StoreError>;
    /// Delete challenges and enrollments that expired before `before`.
    async fn prune_challenges(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
    /// Cheap round trip, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    // ---- audit trail (issue 5) ----
    /// Events after `seq` with their chain links, oldest first.
    async fn stored_events_after(
        &self,
        seq: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError>;
    /// Events matching `filter` after `seq`, oldest first.
    async fn query_events(
        &self,
        filter: &EventFilter,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, StoreError>;
    /// How many events follow `seq`, and the time of the oldest of them.
    async fn event_backlog(&self, after_seq: i64) -> Result<Backlog, StoreError>;
    async fn chain_head(&self, server: &str) -> Result<Option<ChainHead>, StoreError>;
    async fn last_checkpoint(&self, server: &str) -> Result<Option<Checkpoint>, StoreError>;
    async fn insert_checkpoint(&self, c: &Checkpoint) -> Result<(), StoreError>;
    /// Every checkpoint, oldest first.
    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError>;
    /// The trust state last reported per host by the trust scanner.
    async fn trust_states(&self) -> Result<HashMap<String, String>, StoreError>;
    /// Every stored verdict.
    async fn all_verdicts(&self) -> Result<Vec<HostTrust>, StoreError>;
    /// Remember a host's reported trust state, with the event reporting the change.
    async fn record_trust_change(
        &self,
        host: &str,
        state: &str,
        event: &NewEvent,
    ) -> Result<(), StoreError>;
    /// Delete events older than `before` with `seq <= delivered` (delivered everywhere).
    async fn prune_events(&self, before: DateTime<Utc>, delivered: i64) -> Result<u64, StoreError>;

    // --- Scheduler integration (issue 6): trust-change subscribers and the
    // expiry scan that turns lapsing verdicts into notifications.
    async fn add_subscriber(&self, s: &Subscriber) -> Result<(), StoreError>;
    async fn subscribers(&self) -> Result<Vec<Subscriber>, StoreError>;
    /// False when there was no such subscriber.
    async fn delete_subscriber(&self, id: &str) -> Result<bool, StoreError>;
    /// Verdicts whose expiry falls in `(after, until]`.
    async fn verdicts_expiring(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<HostTrust>, StoreError>;

    // --- Operations (issue 8): the pool's shape for metrics and `attestctl check`.
    /// Registered hosts by current trust: a verdict past its expiry, or
    /// none at all, counts as unknown (as readers are told).
    async fn trust_counts(&self, now: DateTime<Utc>) -> Result<TrustCounts, StoreError>;
}

/// How many registered hosts are trusted, untrusted and unknown right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrustCounts {
    pub trusted: i64,
    pub untrusted: i64,
    pub unknown: i64,
}

/// A webhook that receives signed trust-change notifications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    pub id: String,
    pub url: String,
    pub secret: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Open the store named by a database URL and run its migrations.
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(
            url.split('@').next_back().unwrap_or_default().to_string(),
        ))
    }
}

pub(crate) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(crate) fn from_micros(v: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(v).single().unwrap_or_default()
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Our own wire types always serialize.
    serde_json::to_string(v).unwrap_or_default()
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    host: &str,
    what: &'static str,
    s: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
        host: host.to_string(),
        what,
        detail: e.to_string(),
    })
}

pub(crate) fn verdict_from_parts(
    host: &str,
    trust: &str,
    verified_at: i64,
    expires_at: i64,
    reasons: &str,
) -> Result<HostTrust, StoreError> {
    Ok(HostTrust {
        host: host.to_string(),
        trust: Trust::parse(trust).ok_or_else(|| StoreError::Corrupt {
            host: host.to_string(),
            what: "verdict",
            detail: format!("trust {trust:?}"),
        })?,
        verified_at: Some(from_micros(verified_at)),
        expires_at: Some(from_micros(expires_at)),
        reasons: from_json(host, "verdict reasons", reasons)?,
    })
}

/// A verdict as the aggregated verdict query returns it.
#[derive(serde::Deserialize)]
struct VerdictJson {
    host: String,
    trust: String,
    verified_at: i64,
    expires_at: i64,
    reasons: Vec<proto::wire::Reason>,
}

pub(crate) fn verdicts_from_json(json: &str) -> Result<Vec<HostTrust>, StoreError> {
    let rows: Vec<VerdictJson> = from_json("(several)", "verdicts", json)?;
    rows.into_iter()
        .map(|r| {
            Ok(HostTrust {
                trust: Trust::parse(&r.trust).ok_or_else(|| StoreError::Corrupt {
                    host: r.host.clone(),
                    what: "verdict",
                    detail: format!("trust {:?}", r.trust),
                })?,
                verified_at: Some(from_micros(r.verified_at)),
                expires_at: Some(from_micros(r.expires_at)),
                reasons: r.reasons,
                host: r.host,
            })
        })
        .collect()
}

/// The SQL shared by both backends, instantiated once per pool type.
macro_rules! sql_store {
    ($store:ident, $db:ty, $verdicts_json:expr) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            async fn register_host(&self, host: &str, now: chrono::DateTime<chrono::Utc>) -> Result<bool, $crate::store::StoreError> {
                let done = sqlx::query("INSERT INTO hosts (name, registered_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
                    .bind(host)
                    .bind($crate::store::micros(now))
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn host(&self, host: &str) -> Result<Option<$crate::store::HostRecord>, $crate::store::StoreError> {
                use sqlx::Row;
                let row = sqlx::query(
                    "SELECT h.name, h.registered_at, h.ak_public, h.ak_name, h.whitelist, h.last_pcrs, \
                     h.ek_name, h.ek_certified, h.ak_activated, h.rekey_allowed, h.clock, h.reset_count, h.restart_count, \
                     v.trust, v.verified_at, v.expires_at, v.reasons \
                     FROM hosts h LEFT JOIN verdicts v ON v.host = h.name WHERE h.name = $1",
                )
                .bind(host)
                .fetch_optional(&self.pool)
                .await?;
                let Some(row) = row else { return Ok(None) };
                let whitelist: Option<String> = row.try_get("whitelist")?;
                let last_pcrs: Option<String> = row.try_get("last_pcrs")?;
                let trust: Option<String> = row.try_get("trust")?;
                let verdict = match trust {
                    Some(t) => Some($crate::store::verdict_from_parts(
                        host,
                        &t,
                        row.try_get("verified_at")?,
                        row.try_get("expires_at")?,
                        &row.try_get::<String, _>("reasons")?,
                    )?),
                    None => None,
                };
                Ok(Some($crate::store::HostRecord {
                    name: row.try_get("name")?,
                    registered_at: $crate::store::from_micros(row.try_get("registered_at")?),
                    ak_public: row.try_get("ak_public")?,
                    ak_name: row.try_get("ak_name")?,
                    whitelist: whitelist.map(|w| $crate::store::from_json(host, "whitelist", &w)).transpose()?,
                    last_pcrs: last_pcrs.map(|p| $crate::store::from_json(host, "PCR values", &p)).transpose()?,
                    verdict,
                    ek_name: row.try_get("ek_name")?,
                    ek_certified: row.try_get("ek_certified")?,
                    ak_activated: row.try_get("ak_activated")?,
                    rekey_allowed: row.try_get("rekey_allowed")?,
                    clock: match (
                        row.try_get::<Option<i64>, _>("clock")?,
                        row.try_get::<Option<i64>, _>("reset_count")?,
                        row.try_get::<Option<i64>, _>("restart_count")?,
                    ) {
                        (Some(c), Some(r), Some(s)) => Some(proto::tpm::ClockInfo {
                            clock: c as u64,
                            reset_count: r as u32,
                            restart_count: s as u32,
                            safe: true,
                        }),
                        _ => None,
                    },
                }))
            }

            async fn host_for_ek(&self, ek_name: &str) -> Result<Option<String>, $crate::store::StoreError> {
                use sqlx::Row;
                let row = sqlx::query("SELECT name FROM hosts WHERE ek_name = $1")
                    .bind(ek_name)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(match row {
                    Some(r) => Some(r.try_get("name")?),
                    None => None,
                })
            }

            async fn create_enrollment(
                &self,
                e: &$crate::store::Enrollment,
                event: &$crate::store::NewEvent,
            ) -> Result<(), $crate::store::StoreError> {
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO enrollments (id, host, ek_public, ek_name, ek_certified, ak_public, ak_name, proof, created_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(&e.id)
                .bind(&e.host)
                .bind(&e.ek_public)
                .bind(&e.ek_name)
                .bind(e.ek_certified)
                .bind(&e.ak_public)
                .bind(&e.ak_name)
                .bind(&e.proof)
                .bind($crate::store::micros(e.created_at))
                .bind($crate::store::micros(e.expires_at))
                .execute(&mut *tx)
                .await?;
                insert_event(&mut tx, event).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn take_enrollment(
                &self,
                id: &str,
                host: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<Option<$crate::store::TakenEnrollment>, $crate::store::StoreError> {
                use sqlx::Row;
                const COLUMNS: &str = "id, host, ek_public, ek_name, ek_certified, ak_public, ak_name, proof, created_at, expires_at";
                let taken = sqlx::query(&format!(
                    "UPDATE enrollments SET used_at = $1 WHERE id = $2 AND host = $3 AND used_at IS NULL \
                     RETURNING {COLUMNS}, CAST(NULL AS BIGINT) AS used_at"
                ))
                .bind($crate::store::micros(now))
                .bind(id)
                .bind(host)
                .fetch_optional(&self.pool)
                .await?;
                let row = match taken {
                    Some(r) => Some(r),
                    None => {
                        sqlx::query(&format!("SELECT {COLUMNS}, used_at FROM enrollments WHERE id = $1"))
                            .bind(id)
                            .fetch_optional(&self.pool)
                            .await?
                    }
                };
                let Some(r) = row else { return Ok(None) };
                Ok(Some($crate::store::TakenEnrollment {
                    enrollment: $crate::store::Enrollment {
                        id: r.try_get("id")?,
                        host: r.try_get("host")?,
                        ek_public: r.try_get("ek_public")?,
                        ek_name: r.try_get("ek_name")?,
                        ek_certified: r.try_get("ek_certified")?,
                        ak_public: r.try_get("ak_public")?,
                        ak_name: r.try_get("ak_name")?,
                        proof: r.try_get("proof")?,
                        created_at: $crate::store::from_micros(r.try_get("created_at")?),
                        expires_at: $crate::store::from_micros(r.try_get("expires_at")?),
                    },
                    used_before: r.try_get::<Option<i64>, _>("used_at")?.is_some(),
                }))
            }

            async fn activate(
                &self,
                e: &$crate::store::Enrollment,
                event: &$crate::store::NewEvent,
            ) -> Result<$crate::store::ActivateOutcome, $crate::store::StoreError> {
                use sqlx::Row;
                let mut tx = self.pool.begin().await?;
                let other = sqlx::query("SELECT name FROM hosts WHERE ek_name = $1 AND name <> $2")
                    .bind(&e.ek_name)
                    .bind(&e.host)
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some(r) = other {
                    return Ok($crate::store::ActivateOutcome::EkInUse { host: r.try_get("name")? });
                }
                sqlx::query("INSERT INTO hosts (name, registered_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
                    .bind(&e.host)
                    .bind($crate::store::micros(event.time))
                    .execute(&mut *tx)
                    .await?;
                // A new AK starts a new clock history.
                sqlx::query(
                    "UPDATE hosts SET ek_public = $1, ek_name = $2, ek_certified = $3, ak_public = $4, ak_name = $5, \
                     ak_activated = TRUE, rekey_allowed = FALSE, clock = NULL, reset_count = NULL, restart_count = NULL \
                     WHERE name = $6",
                )
                .bind(&e.ek_public)
                .bind(&e.ek_name)
                .bind(e.ek_certified)
                .bind(&e.ak_public)
                .bind(&e.ak_name)
                .bind(&e.host)
                .execute(&mut *tx)
                .await?;
                insert_event(&mut tx, event).await?;
                // The unique index on ek_name settles a race with another host.
                match tx.commit().await {
                    Ok(()) => Ok($crate::store::ActivateOutcome::Activated),
                    Err(err) => Err(err.into()),
                }
            }

            async fn allow_rekey(&self, host: &str, event: &$crate::store::NewEvent) -> Result<bool, $crate::store::StoreError> {
                let mut tx = self.pool.begin().await?;
                let done = sqlx::query("UPDATE hosts SET rekey_allowed = TRUE WHERE name = $1")
                    .bind(host)
                    .execute(&mut *tx)
                    .await?;
                if done.rows_affected() == 0 {
                    return Ok(false);
                }
                insert_event(&mut tx, event).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn insert_challenge(&self, ch: &$crate::store::NewChallenge) -> Result<(), $crate::store::StoreError> {
                sqlx::query("INSERT INTO challenges (nonce, host, selection, issued_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
                    .bind(&ch.nonce)
                    .bind(&ch.host)
                    .bind($crate::store::to_json(&ch.selection))
                    .bind($crate::store::micros(ch.issued_at))
                    .bind($crate::store::micros(ch.expires_at))
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn take_challenge(
                &self,
                nonce: &str,
                host: &str,
                now: chrono::DateTime<chrono::Utc>,
            ) -> Result<Option<$crate::verify::IssuedChallenge>, $crate::store::StoreError> {
                use sqlx::Row;
                let taken = sqlx::query(
                    "UPDATE challenges SET used_at = $1 WHERE nonce = $2 AND host = $3 AND used_at IS NULL \
                     RETURNING host, selection, expires_at, CAST(NULL AS BIGINT) AS used_at",
                )
                .bind($crate::store::micros(now))
                .bind(nonce)
                .bind(host)
                .fetch_optional(&self.pool)
                .await?;
                let row = match taken {
                    Some(r) => Some(r),
                    None => {
                        sqlx::query("SELECT host, selection, expires_at, used_at FROM challenges WHERE nonce = $1")
                            .bind(nonce)
                            .fetch_optional(&self.pool)
                            .await?
                    }
                };
                let Some(row) = row else { return Ok(None) };
                let issued_to: String = row.try_get("host")?;
                let selection: $crate::store::PcrSelectionMap =
                    $crate::store::from_json(&issued_to, "challenge selection", &row.try_get::<String, _>("selection")?)?;
                Ok(Some($crate::verify::IssuedChallenge {
                    host: issued_to,
                    selection: proto::wire::selection_from_map(&selection),
                    expires_at: $crate::store::from_micros(row.try_get("expires_at")?),
                    used_before: row.try_get::<Option<i64>, _>("used_at")?.is_some(),
                }))
            }

            async fn record_attestation(&self, host: &str, rec: $crate::store::AttestationRecord<'_>) -> Result<(), $crate::store::StoreError> {
                let mut tx = self.pool.begin().await?;
                upsert_verdict(&mut tx, host, rec.verdict).await?;
                if let Some(pcrs) = rec.verified_pcrs {
                    sqlx::query("UPDATE hosts SET last_pcrs = $1 WHERE name = $2")
                        .bind($crate::store::to_json(pcrs))
                        .bind(host)
                        .execute(&mut *tx)
                        .await?;
                }
                if let Some(c) = rec.clock {
                    sqlx::query("UPDATE hosts SET clock = $1, reset_count = $2, restart_count = $3 WHERE name = $4")
                        .bind(c.clock as i64)
                        .bind(i64::from(c.reset_count))
                        .bind(i64::from(c.restart_count))
                        .bind(host)
                        .execute(&mut *tx)
                        .await?;
                }
                for event in rec.events {
                    insert_event(&mut tx, event).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn record_event(&self, event: &$crate::store::NewEvent) -> Result<(), $crate::store::StoreError> {
                let mut tx = self.pool.begin().await?;
                insert_event(&mut tx, event).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn set_whitelist(
                &self,
                host: &str,
                whitelist: &$crate::store::Whitelist,
                rejudged: Option<&$crate::store::HostTrust>,
                event: &$crate::store::NewEvent,
            ) -> Result<(), $crate::store::StoreError> {
                let mut tx = self.pool.begin().await?;
                sqlx::query("UPDATE hosts SET whitelist = $1 WHERE name = $2")
                    .bind($crate::store::to_json(whitelist))
                    .bind(host)
                    .execute(&mut *tx)
                    .await?;
                if let Some(v) = rejudged {
                    upsert_verdict(&mut tx, host, v).await?;
                }
                insert_event(&mut tx, event).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn verdicts(&self, hosts: &[String]) -> Result<std::collections::HashMap<String, $crate::store::HostTrust>, $crate::store::StoreError> {
                let mut out = std::collections::HashMap::with_capacity(hosts.len());
                // Bounded IN lists keep within SQLite's parameter limit.
                for chunk in hosts.chunks(500) {
                    // One row holding a JSON array: streaming a thousand
                    // rows one by one costs more than the lookups themselves.
                    let mut qb = sqlx::QueryBuilder::<$db>::new($verdicts_json);
                    let mut list = qb.separated(", ");
                    for h in chunk {
                        list.push_bind(h.as_str());
                    }
                    qb.push(")");
                    let json: String = sqlx::Row::try_get(&qb.build().fetch_one(&self.pool).await?, 0)?;
                    for v in $crate::store::verdicts_from_json(&json)? {
                        out.insert(v.host.clone(), v);
                    }
                }
                Ok(out)
            }

            async fn events_after(&self, seq: i64, limit: i64) -> Result<Vec<(i64, String)>, $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query("SELECT seq, body FROM events WHERE seq > $1 ORDER BY seq LIMIT $2")
                    .bind(seq)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|r| Ok((r.try_get("seq")?, r.try_get("body")?)))
                    .collect()
            }

            async fn host_events(&self, host: &str, limit: i64) -> Result<Vec<String>, $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query("SELECT body FROM events WHERE host = $1 ORDER BY seq DESC LIMIT $2")
                    .bind(host)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?;
                let mut out = rows
                    .iter()
                    .map(|r| r.try_get("body"))
                    .collect::<Result<Vec<String>, _>>()?;
                out.reverse();
                Ok(out)
            }

            async fn sink_cursor(&self, sink: &str) -> Result<i64, $crate::store::StoreError> {
                use sqlx::Row;
                let row = sqlx::query("SELECT delivered_seq FROM sink_cursors WHERE sink = $1")
                    .bind(sink)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(match row {
                    Some(r) => r.try_get("delivered_seq")?,
                    None => 0,
                })
            }

            async fn set_sink_cursor(&self, sink: &str, seq: i64) -> Result<(), $crate::store::StoreError> {
                sqlx::query(
                    "INSERT INTO sink_cursors (sink, delivered_seq) VALUES ($1, $2) \
                     ON CONFLICT (sink) DO UPDATE SET delivered_seq = excluded.delivered_seq",
                )
                .bind(sink)
                .bind(seq)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn prune_challenges(&self, before: chrono::DateTime<chrono::Utc>) -> Result<u64, $crate::store::StoreError> {
                let mut n = 0;
                for table in ["challenges", "enrollments"] {
                    let done = sqlx::query(&format!("DELETE FROM {table} WHERE expires_at < $1"))
                        .bind($crate::store::micros(before))
                        .execute(&self.pool)
                        .await?;
                    n += done.rows_affected();
                }
                Ok(n)
            }

            async fn ping(&self) -> Result<(), $crate::store::StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            // ---- audit trail (issue 5) ----
            async fn stored_events_after(&self, seq: i64, limit: i64) -> Result<Vec<$crate::store::StoredEvent>, $crate::store::StoreError> {
                let rows = sqlx::query(&format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2"))
                    .bind(seq)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows.iter().map(stored_event).collect::<Result<Vec<_>, _>>()?)
            }

            async fn query_events(
                &self,
                f: &$crate::store::EventFilter,
                after_seq: i64,
                limit: i64,
            ) -> Result<Vec<$crate::store::StoredEvent>, $crate::store::StoreError> {
                let mut qb = sqlx::QueryBuilder::<$db>::new(format!("SELECT {EVENT_COLUMNS} FROM events WHERE seq > "));
                qb.push_bind(after_seq);
                if let Some(t) = &f.target {
                    qb.push(" AND (target_id = ").push_bind(t.clone()).push(" OR target_name = ").push_bind(t.clone()).push(")");
                }
                if let Some(i) = &f.initiator {
                    qb.push(" AND (initiator_id = ").push_bind(i.clone()).push(" OR initiator_name = ").push_bind(i.clone()).push(")");
                }
                if let Some(a) = &f.action {
                    qb.push(" AND action = ").push_bind(a.clone());
                }
                if let Some(o) = &f.outcome {
                    qb.push(" AND outcome = ").push_bind(o.clone());
                }
                if let Some(s) = f.since {
                    qb.push(" AND event_time >= ").push_bind($crate::store::micros(s));
                }
                if let Some(u) = f.until {
                    qb.push(" AND event_time < ").push_bind($crate::store::micros(u));
                }
                qb.push(" ORDER BY seq LIMIT ").push_bind(limit);
                let rows = qb.build().fetch_all(&self.pool).await?;
                Ok(rows.iter().map(stored_event).collect::<Result<Vec<_>, _>>()?)
            }

            async fn event_backlog(&self, after_seq: i64) -> Result<$crate::store::Backlog, $crate::store::StoreError> {
                use sqlx::Row;
                let row = sqlx::query(
                    "SELECT COUNT(*) AS n, MIN(event_time) AS oldest, COALESCE(MAX(seq), $1) AS newest FROM events WHERE seq > $1",
                )
                .bind(after_seq)
                .fetch_one(&self.pool)
                .await?;
                Ok($crate::store::Backlog {
                    count: row.try_get("n")?,
                    oldest: row.try_get::<Option<i64>, _>("oldest")?.map($crate::store::from_micros),
                    newest_seq: row.try_get("newest")?,
                })
            }

            async fn chain_head(&self, server: &str) -> Result<Option<$crate::store::ChainHead>, $crate::store::StoreError> {
                use sqlx::Row;
                let row = sqlx::query("SELECT server, seq, hash, count FROM audit_chain_heads WHERE server = $1")
                    .bind(server)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(match row {
                    Some(r) => Some($crate::store::ChainHead {
                        server: r.try_get("server")?,
                        seq: r.try_get("seq")?,
                        hash: r.try_get("hash")?,
                        count: r.try_get("count")?,
                    }),
                    None => None,
                })
            }

            async fn last_checkpoint(&self, server: &str) -> Result<Option<$crate::store::Checkpoint>, $crate::store::StoreError> {
                let row = sqlx::query(&format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints WHERE server = $1 ORDER BY seq DESC, id DESC LIMIT 1"))
                    .bind(server)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(match row {
                    Some(r) => Some(checkpoint(&r)?),
                    None => None,
                })
            }

            async fn insert_checkpoint(&self, c: &$crate::store::Checkpoint) -> Result<(), $crate::store::StoreError> {
                sqlx::query(
                    "INSERT INTO audit_checkpoints (server, seq, count, hash, signed_at, public_key, signature) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&c.server)
                .bind(c.seq)
                .bind(c.count)
                .bind(&c.hash)
                .bind($crate::store::micros(c.signed_at))
                .bind(&c.public_key)
                .bind(&c.signature)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn checkpoints(&self) -> Result<Vec<$crate::store::Checkpoint>, $crate::store::StoreError> {
                let rows = sqlx::query(&format!("SELECT {CHECKPOINT_COLUMNS} FROM audit_checkpoints ORDER BY id"))
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows.iter().map(checkpoint).collect::<Result<Vec<_>, _>>()?)
            }

            async fn trust_states(&self) -> Result<std::collections::HashMap<String, String>, $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query("SELECT host, state FROM audit_trust_state").fetch_all(&self.pool).await?;
                rows.iter()
                    .map(|r| Ok((r.try_get("host")?, r.try_get("state")?)))
                    .collect()
            }

            async fn all_verdicts(&self) -> Result<Vec<$crate::store::HostTrust>, $crate::store::StoreError> {
                let rows = sqlx::query("SELECT host, trust, verified_at, expires_at, reasons FROM verdicts ORDER BY host")
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(verdict_row).collect()
            }

            async fn record_trust_change(
                &self,
                host: &str,
                state: &str,
                event: &$crate::store::NewEvent,
            ) -> Result<(), $crate::store::StoreError> {
                let mut tx = self.pool.begin().await?;
                sqlx::query(
                    "INSERT INTO audit_trust_state (host, state) VALUES ($1, $2) \
                     ON CONFLICT (host) DO UPDATE SET state = excluded.state",
                )
                .bind(host)
                .bind(state)
                .execute(&mut *tx)
                .await?;
                insert_event(&mut tx, event).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn prune_events(&self, before: chrono::DateTime<chrono::Utc>, delivered: i64) -> Result<u64, $crate::store::StoreError> {
                let done = sqlx::query("DELETE FROM events WHERE event_time < $1 AND seq <= $2")
                    .bind($crate::store::micros(before))
                    .bind(delivered)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            // --- Scheduler integration (issue 6).
            async fn add_subscriber(&self, s: &$crate::store::Subscriber) -> Result<(), $crate::store::StoreError> {
                sqlx::query("INSERT INTO subscribers (id, url, secret, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(&s.id)
                    .bind(&s.url)
                    .bind(s.secret.as_deref())
                    .bind($crate::store::micros(s.created_at))
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn subscribers(&self) -> Result<Vec<$crate::store::Subscriber>, $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query("SELECT id, url, secret, created_at FROM subscribers ORDER BY created_at, id")
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|r| {
                        Ok($crate::store::Subscriber {
                            id: r.try_get("id")?,
                            url: r.try_get("url")?,
                            secret: r.try_get("secret")?,
                            created_at: $crate::store::from_micros(r.try_get("created_at")?),
                        })
                    })
                    .collect()
            }

            async fn delete_subscriber(&self, id: &str) -> Result<bool, $crate::store::StoreError> {
                let done = sqlx::query("DELETE FROM subscribers WHERE id = $1")
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() > 0)
            }

            async fn verdicts_expiring(
                &self,
                after: chrono::DateTime<chrono::Utc>,
                until: chrono::DateTime<chrono::Utc>,
            ) -> Result<Vec<$crate::store::HostTrust>, $crate::store::StoreError> {
                let rows = sqlx::query(
                    "SELECT host, trust, verified_at, expires_at, reasons FROM verdicts \
                     WHERE expires_at > $1 AND expires_at <= $2 ORDER BY expires_at",
                )
                .bind($crate::store::micros(after))
                .bind($crate::store::micros(until))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(verdict_row).collect()
            }

            // --- Operations (issue 8).
            async fn trust_counts(&self, now: chrono::DateTime<chrono::Utc>) -> Result<$crate::store::TrustCounts, $crate::store::StoreError> {
                use sqlx::Row;
                // One pass over hosts; CAST keeps the sums BIGINT on PostgreSQL.
                let row = sqlx::query(
                    "SELECT \
                     CAST(COALESCE(SUM(CASE WHEN v.expires_at > $1 AND v.trust = 'trusted' THEN 1 ELSE 0 END), 0) AS BIGINT), \
                     CAST(COALESCE(SUM(CASE WHEN v.expires_at > $1 AND v.trust = 'untrusted' THEN 1 ELSE 0 END), 0) AS BIGINT), \
                     CAST(COUNT(*) AS BIGINT) \
                     FROM hosts h LEFT JOIN verdicts v ON v.host = h.name",
                )
                .bind($crate::store::micros(now))
                .fetch_one(&self.pool)
                .await?;
                let (trusted, untrusted, total): (i64, i64, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
                Ok($crate::store::TrustCounts {
                    trusted,
                    untrusted,
                    unknown: (total - trusted - untrusted).max(0),
                })
            }
        }

        const EVENT_COLUMNS: &str = "seq, id, event_time, server, chain_index, prev_hash, hash, body";
        const CHECKPOINT_COLUMNS: &str = "server, seq, count, hash, signed_at, public_key, signature";

        fn stored_event(r: &<$db as sqlx::Database>::Row) -> Result<$crate::store::StoredEvent, sqlx::Error> {
            use sqlx::Row;
            Ok($crate::store::StoredEvent {
                seq: r.try_get("seq")?,
                id: r.try_get("id")?,
                time: $crate::store::from_micros(r.try_get("event_time")?),
                server: r.try_get("server")?,
                chain_index: r.try_get("chain_index")?,
                prev_hash: r.try_get("prev_hash")?,
                hash: r.try_get("hash")?,
                body: r.try_get("body")?,
            })
        }

        fn checkpoint(r: &<$db as sqlx::Database>::Row) -> Result<$crate::store::Checkpoint, sqlx::Error> {
            use sqlx::Row;
            Ok($crate::store::Checkpoint {
                server: r.try_get("server")?,
                seq: r.try_get("seq")?,
                count: r.try_get("count")?,
                hash: r.try_get("hash")?,
                signed_at: $crate::store::from_micros(r.try_get("signed_at")?),
                public_key: r.try_get("public_key")?,
                signature: r.try_get("signature")?,
            })
        }

        /// Append an event to the outbox and to its server's hash chain, in
        /// the caller's transaction. Updating the chain head first takes its
        /// row lock, so concurrent appends of one server queue up instead of
        /// forking the chain.
        async fn insert_event(tx: &mut sqlx::Transaction<'_, $db>, event: &$crate::store::NewEvent) -> Result<(), sqlx::Error> {
            use sqlx::Row;
            let meta = $crate::audit::chain::EventMeta::of(&event.body);
            sqlx::query("INSERT INTO audit_chain_heads (server, seq, hash, count) VALUES ($1, 0, $2, 0) ON CONFLICT (server) DO NOTHING")
                .bind(&meta.server)
                .bind($crate::audit::chain::GENESIS)
                .execute(&mut **tx)
                .await?;
            let head = sqlx::query("UPDATE audit_chain_heads SET count = count + 1 WHERE server = $1 RETURNING hash, count")
                .bind(&meta.server)
                .fetch_one(&mut **tx)
                .await?;
            let prev_hash: String = head.try_get("hash")?;
            let index: i64 = head.try_get("count")?;
            let hash = $crate::audit::chain::link(&prev_hash, &meta.canonical);
            let row = sqlx::query(
                "INSERT INTO events (id, event_time, host, body, server, chain_index, prev_hash, hash, action, outcome, \
                 initiator_id, initiator_name, target_id, target_name) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING seq",
            )
            .bind(&event.id)
            .bind($crate::store::micros(event.time))
            .bind(event.host.as_deref())
            .bind(&event.body)
            .bind(&meta.server)
            .bind(index)
            .bind(&prev_hash)
            .bind(&hash)
            .bind(&meta.action)
            .bind(&meta.outcome)
            .bind(&meta.initiator_id)
            .bind(&meta.initiator_name)
            .bind(&meta.target_id)
            .bind(&meta.target_name)
            .fetch_one(&mut **tx)
            .await?;
            let seq: i64 = row.try_get("seq")?;
            sqlx::query("UPDATE audit_chain_heads SET seq = $1, hash = $2 WHERE server = $3")
                .bind(seq)
                .bind(&hash)
                .bind(&meta.server)
                .execute(&mut **tx)
                .await?;
            Ok(())
        }

        /// A `verdicts` row (host, trust, verified_at, expires_at, reasons).
        fn verdict_row(row: &<$db as sqlx::Database>::Row) -> Result<$crate::store::HostTrust, $crate::store::StoreError> {
            use sqlx::Row;
            let host: String = row.try_get("host")?;
            $crate::store::verdict_from_parts(
                &host,
                &row.try_get::<String, _>("trust")?,
                row.try_get("verified_at")?,
                row.try_get("expires_at")?,
                &row.try_get::<String, _>("reasons")?,
            )
        }

        async fn upsert_verdict(tx: &mut sqlx::Transaction<'_, $db>, host: &str, v: &$crate::store::HostTrust) -> Result<(), sqlx::Error> {
            sqlx::query(
                "INSERT INTO verdicts (host, trust, verified_at, expires_at, reasons) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (host) DO UPDATE SET trust = excluded.trust, verified_at = excluded.verified_at, \
                 expires_at = excluded.expires_at, reasons = excluded.reasons",
            )
            .bind(host)
            .bind(v.trust.as_str())
            .bind($crate::store::micros(v.verified_at.unwrap_or_default()))
            .bind($crate::store::micros(v.expires_at.unwrap_or_default()))
            .bind($crate::store::to_json(&v.reasons))
            .execute(&mut **tx)
            .await?;
            Ok(())
        }
    };
}
pub(crate) use sql_store;
