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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollOutcome {
    Created,
    /// The same AK was enrolled before.
    Unchanged,
    /// Another AK is pinned to this host.
    Conflict {
        enrolled_name: String,
    },
}

/// A verdict to store together with its audit event.
#[derive(Debug, Clone)]
pub struct AttestationRecord<'a> {
    pub verdict: &'a HostTrust,
    /// Present when the evidence was genuine (its values may become a whitelist).
    pub verified_pcrs: Option<&'a PcrValues>,
    pub event: &'a NewEvent,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Register a host; false if it existed already.
    async fn register_host(&self, host: &str, now: DateTime<Utc>) -> Result<bool, StoreError>;
    async fn host(&self, host: &str) -> Result<Option<HostRecord>, StoreError>;
    /// Pin an AK to a host (registering the host if needed), storing
    /// `on_success` or, when another AK is pinned, `on_conflict`.
    async fn enroll(
        &self,
        host: &str,
        ak_public: &[u8],
        ak_name: &str,
        now: DateTime<Utc>,
        on_success: &NewEvent,
        on_conflict: &NewEvent,
    ) -> Result<EnrollOutcome, StoreError>;
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
    /// Delete challenges that expired before `before`.
    async fn prune_challenges(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
    /// Cheap round trip, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;
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

/// The SQL shared by both backends, instantiated once per pool type.
macro_rules! sql_store {
    ($store:ident, $db:ty) => {
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
                }))
            }

            async fn enroll(
                &self,
                host: &str,
                ak_public: &[u8],
                ak_name: &str,
                now: chrono::DateTime<chrono::Utc>,
                on_success: &$crate::store::NewEvent,
                on_conflict: &$crate::store::NewEvent,
            ) -> Result<$crate::store::EnrollOutcome, $crate::store::StoreError> {
                use sqlx::Row;
                let mut tx = self.pool.begin().await?;
                sqlx::query("INSERT INTO hosts (name, registered_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
                    .bind(host)
                    .bind($crate::store::micros(now))
                    .execute(&mut *tx)
                    .await?;
                // Pin only if no AK is pinned yet; the UPDATE's condition makes
                // two racing first enrollments agree on one winner.
                let pinned = sqlx::query("UPDATE hosts SET ak_public = $1, ak_name = $2 WHERE name = $3 AND ak_name IS NULL")
                    .bind(ak_public)
                    .bind(ak_name)
                    .bind(host)
                    .execute(&mut *tx)
                    .await?;
                let outcome = if pinned.rows_affected() == 1 {
                    $crate::store::EnrollOutcome::Created
                } else {
                    let current: Option<String> = sqlx::query("SELECT ak_name FROM hosts WHERE name = $1")
                        .bind(host)
                        .fetch_one(&mut *tx)
                        .await?
                        .try_get("ak_name")?;
                    match current {
                        Some(c) if c == ak_name => $crate::store::EnrollOutcome::Unchanged,
                        other => $crate::store::EnrollOutcome::Conflict {
                            enrolled_name: other.unwrap_or_default(),
                        },
                    }
                };
                let event = match outcome {
                    $crate::store::EnrollOutcome::Conflict { .. } => on_conflict,
                    _ => on_success,
                };
                insert_event(&mut tx, event).await?;
                tx.commit().await?;
                Ok(outcome)
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
                insert_event(&mut tx, rec.event).await?;
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
                use sqlx::Row;
                let mut out = std::collections::HashMap::with_capacity(hosts.len());
                // Bounded IN lists keep within SQLite's parameter limit.
                for chunk in hosts.chunks(500) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new(
                        "SELECT host, trust, verified_at, expires_at, reasons FROM verdicts WHERE host IN (",
                    );
                    let mut list = qb.separated(", ");
                    for h in chunk {
                        list.push_bind(h.as_str());
                    }
                    qb.push(")");
                    for row in qb.build().fetch_all(&self.pool).await? {
                        let host: String = row.try_get("host")?;
                        let v = $crate::store::verdict_from_parts(
                            &host,
                            &row.try_get::<String, _>("trust")?,
                            row.try_get("verified_at")?,
                            row.try_get("expires_at")?,
                            &row.try_get::<String, _>("reasons")?,
                        )?;
                        out.insert(host, v);
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
                let done = sqlx::query("DELETE FROM challenges WHERE expires_at < $1")
                    .bind($crate::store::micros(before))
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn ping(&self) -> Result<(), $crate::store::StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }
        }

        async fn insert_event(tx: &mut sqlx::Transaction<'_, $db>, event: &$crate::store::NewEvent) -> Result<(), sqlx::Error> {
            sqlx::query("INSERT INTO events (id, event_time, host, body) VALUES ($1, $2, $3, $4)")
                .bind(&event.id)
                .bind($crate::store::micros(event.time))
                .bind(event.host.as_deref())
                .bind(&event.body)
                .execute(&mut **tx)
                .await?;
            Ok(())
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
