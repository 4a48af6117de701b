//! Storage: one trait, one implementation per backend.
//!
//! SQLite is the zero-set-up default; PostgreSQL is the shared state of
//! several servers. Both run the same runtime SQL (numbered `$n` parameters,
//! `RETURNING`, `ON CONFLICT`), so the query code is written once in
//! [`sql_store!`] and instantiated for each pool type; schemas and
//! migrations are per backend.

mod postgres;
mod sqlite;
mod writer;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use proto::policy::{AppliedPolicy, Group, WhitelistSummary, WhitelistVersion};
use proto::tpm::ClockInfo;
use proto::wire::{HostTrust, PcrValues, Trust};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
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
    /// A group-committed batch failed because the database cannot be
    /// written now; every write of the batch gets this.
    #[error("database unavailable: {0}")]
    Unavailable(String),
}

/// Everything stored about one host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRecord {
    pub name: String,
    pub registered_at: DateTime<Utc>,
    pub ak_public: Option<Vec<u8>>,
    pub ak_name: Option<String>,
    /// The host group whose whitelists judge this host.
    pub group: Option<String>,
    /// Changes with every policy change that affects the host (see
    /// [`AttestationRecord::policy_epoch`]).
    pub policy_epoch: i64,
    /// The pool-wide policy generation, read in the same statement as the
    /// rest of the record (see [`PolicyCache`]).
    pub policy_generation: i64,
    /// The generation of the pool's challenge keys, read in the same
    /// statement (see [`ChallengeKeys::generation`]).
    pub challenge_key_generation: i64,
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
    /// Incremental IMA verification state (see `verify::HostImaState`).
    pub ima_state: Option<crate::verify::HostImaState>,
    /// The UEFI event log of the last genuine evidence that carried one,
    /// kept so that a policy change can judge boot policies again.
    pub last_uefi_log: Option<Vec<u8>>,
}

/// The nonce an attestation used (see `crate::challenge`). It is stored
/// with the verdict, in the same transaction; that row is what makes a
/// nonce single-use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedNonce {
    pub nonce: String,
    pub expires_at: DateTime<Utc>,
    /// True: store the verdict only if no earlier evidence used the nonce
    /// (else [`Recorded::NonceUsed`]); false: store it either way (the
    /// verdict refuses the evidence already).
    pub exclusive: bool,
}

/// The pool's challenge keys (see `crate::challenge`).
#[derive(Clone, PartialEq, Eq)]
pub struct ChallengeKeys {
    /// Grows by one with every rotation; every host record read carries it,
    /// so each server notices a rotation on its next request.
    pub generation: i64,
    /// Issues nonces, and opens them.
    pub current: Vec<u8>,
    /// The key before the last rotation: still opens the nonces issued
    /// under it, until they expire.
    pub previous: Option<Vec<u8>>,
    /// When the last rotation was made.
    pub rotated_at: Option<DateTime<Utc>>,
}

impl std::fmt::Debug for ChallengeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChallengeKeys")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// What `record_attestation` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Stored,
    /// A policy change affected the host since `policy_epoch`: nothing
    /// stored, judge the evidence again.
    PolicyChanged,
    /// Earlier evidence used the nonce: nothing stored, the evidence is a replay.
    NonceUsed,
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
    /// The host's `policy_epoch` read before its policy was loaded: if a
    /// policy change affected the host since, nothing is stored and
    /// `record_attestation` answers [`Recorded::PolicyChanged`], so the
    /// verdict is judged again.
    pub policy_epoch: Option<i64>,
    /// The challenge nonce the evidence used, consumed in the same transaction.
    pub nonce: Option<&'a UsedNonce>,
}

impl<'a> AttestationRecord<'a> {
    /// A verdict alone: no PCR values, clock, events, epoch check or nonce
    /// (an operator's import, a test's fixture).
    pub fn verdict_only(verdict: &'a HostTrust) -> Self {
        AttestationRecord {
            verdict,
            verified_pcrs: None,
            clock: None,
            events: &[],
            policy_epoch: None,
            nonce: None,
        }
    }
}

/// The event-log state to store with a genuine attestation (same
/// transaction); `None` fields leave the stored value as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogRecord<'a> {
    pub ima_state: Option<&'a crate::verify::HostImaState>,
    pub uefi_log: Option<&'a [u8]>,
}

// ---- whitelist policy (issue 4): types ----

/// A change to whitelists or groups, applied with its event and the
/// re-judged verdicts in one transaction. Each carries the version the
/// admin's edit started from; the store refuses the change if another
/// admin got there first (optimistic concurrency).
#[derive(Debug, Clone)]
pub enum PolicyChange {
    /// A new version (or the first) of a whitelist; `deleted` versions delete it.
    PutWhitelist {
        version: WhitelistVersion,
        /// The head version the change was made from; `None`: no head exists.
        expected_head: Option<u32>,
    },
    /// Create (`expected_version: None`) or update a group.
    PutGroup {
        group: Group,
        expected_version: Option<u32>,
    },
    DeleteGroup {
        name: String,
    },
    /// Move hosts into a group (from wherever they were), or out of it.
    Members {
        group: String,
        add: Vec<String>,
        remove: Vec<String>,
    },
}

/// A verdict judged again after a policy change; stored only if the host
/// has not attested since (`verified_at` unchanged).
#[derive(Debug, Clone)]
pub struct Rejudged {
    pub host: String,
    pub verdict: HostTrust,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    Applied,
    /// Someone changed the whitelist or group first; `current` is its version now.
    Conflict {
        current: Option<u32>,
    },
    /// The whitelist is used by these groups, or the group has these hosts.
    InUse {
        by: Vec<String>,
    },
    /// A host attested while the change was being judged: judge again.
    Stale {
        host: String,
    },
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

/// The chain heads one transaction has read and advanced, by server.
#[derive(Debug, Default)]
pub(crate) struct ChainHeads(pub(crate) HashMap<String, ChainHead>);

/// Where one event goes in its server's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChainLink {
    pub index: i64,
    pub prev_hash: String,
    pub hash: String,
}

impl ChainHeads {
    /// The servers whose chains `metas` extend and whose heads this
    /// transaction has not read yet, each once, in order of first use.
    pub(crate) fn unread<'m>(&self, metas: &'m [crate::audit::chain::EventMeta]) -> Vec<&'m str> {
        let mut servers: Vec<&str> = Vec::new();
        for m in metas {
            if !self.0.contains_key(&m.server) && !servers.contains(&m.server.as_str()) {
                servers.push(&m.server);
            }
        }
        servers
    }

    /// Link the events, in order, to their chains, advancing the heads;
    /// `None` if a head was not read first (see [`Self::unread`]).
    pub(crate) fn link(
        &mut self,
        metas: &[crate::audit::chain::EventMeta],
    ) -> Option<Vec<ChainLink>> {
        metas
            .iter()
            .map(|meta| {
                let head = self.0.get_mut(&meta.server)?;
                let index = head.count + 1;
                let hash = crate::audit::chain::link(&head.hash, &meta.canonical);
                let prev_hash = std::mem::replace(&mut head.hash, hash.clone());
                head.count = index;
                Some(ChainLink {
                    index,
                    prev_hash,
                    hash,
                })
            })
            .collect()
    }

    /// Sequence numbers grow with the rows of one INSERT: a head's seq is
    /// the largest its server's events got.
    pub(crate) fn saw(&mut self, server: &str, seq: i64) {
        if let Some(head) = self.0.get_mut(server) {
            head.seq = head.seq.max(seq);
        }
    }
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
    /// The pool's challenge key (see `crate::challenge`): made by the first
    /// server to ask, the same for every server of the pool after that.
    async fn challenge_keys(&self) -> Result<ChallengeKeys, StoreError>;
    /// Make a new challenge key current, keeping the current one as the
    /// previous (see [`ChallengeKeys`]), with the event.
    async fn rotate_challenge_key(&self, event: &NewEvent) -> Result<ChallengeKeys, StoreError>;
    /// Store a verdict and its event in one transaction (see [`Recorded`]
    /// for when nothing is stored).
    async fn record_attestation(
        &self,
        host: &str,
        rec: AttestationRecord<'_>,
    ) -> Result<Recorded, StoreError> {
        self.record_attestation_with_logs(host, rec, LogRecord::default())
            .await
    }
    /// [`record_attestation`](Self::record_attestation), also storing the
    /// host's event-log state in the same transaction.
    async fn record_attestation_with_logs(
        &self,
        host: &str,
        rec: AttestationRecord<'_>,
        logs: LogRecord<'_>,
    ) -> Result<Recorded, StoreError>;
    /// Store an event that changes no other state.
    async fn record_event(&self, event: &NewEvent) -> Result<(), StoreError>;

    // ---- whitelist policy (issue 4)
    /// The newest version of the named whitelist (`version: None`) or the
    /// given one; deleted whitelists are returned with `deleted` set.
    async fn whitelist(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<WhitelistVersion>, StoreError>;
    /// Every version of a whitelist, oldest first.
    async fn whitelist_history(&self, name: &str) -> Result<Vec<WhitelistVersion>, StoreError>;
    /// The newest version of every whitelist, by name.
    async fn whitelists(&self) -> Result<Vec<WhitelistSummary>, StoreError>;
    /// A group with its member hosts.
    async fn group(&self, name: &str) -> Result<Option<Group>, StoreError>;
    /// Every group (members not filled in).
    async fn groups(&self) -> Result<Vec<Group>, StoreError>;
    /// The groups that use a whitelist.
    async fn groups_using(&self, whitelist: &str) -> Result<Vec<String>, StoreError>;
    /// What judges one host: its group and the newest version of every
    /// whitelist that applies to it (the group's and the host's own).
    async fn host_policy(&self, host: &str) -> Result<crate::verify::HostPolicy, StoreError>;
    /// [`Store::host_policy`] through this server's [`PolicyCache`]:
    /// `generation` is [`HostRecord::policy_generation`] of a record read
    /// before this call.
    async fn host_policy_at(
        &self,
        host: &str,
        generation: i64,
    ) -> Result<Arc<crate::verify::HostPolicy>, StoreError>;
    /// Apply a policy change with its event and re-judged verdicts in one
    /// transaction, bumping the `policy_epoch` of every `affected` host.
    async fn apply_policy_change(
        &self,
        change: &PolicyChange,
        affected: &[String],
        rejudged: &[Rejudged],
        event: &NewEvent,
    ) -> Result<ApplyOutcome, StoreError>;
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
    /// Up to `limit` hosts named after `after`, by name, whose trust state
    /// at `now` (the verdict's trust, or `stale` once it expired without
    /// new evidence) differs from the one last reported. The database
    /// compares: a pool whose states did not change costs one join in the
    /// database, not every verdict sent to the server.
    async fn trust_changes(
        &self,
        now: DateTime<Utc>,
        after: &str,
        limit: i64,
    ) -> Result<Vec<TrustChange>, StoreError>;
    /// Remember the reported trust states of `changes`, each with the event
    /// reporting it, in one transaction. A change is recorded only if the
    /// host's reported state is still its `before` (compare and set: a
    /// state another server recorded in between wins, and the change is
    /// skipped with its event). Returns the hosts recorded.
    async fn record_trust_changes(
        &self,
        changes: &[(TrustChange, NewEvent)],
    ) -> Result<Vec<String>, StoreError>;
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

/// 32 random bytes for a new challenge key.
pub(crate) fn fresh_challenge_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut key);
    key
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
    policy: Option<&str>,
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
        policy: policy
            .map(|p| from_json(host, "verdict policy", p))
            .transpose()?,
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
    #[serde(default)]
    policy: Option<AppliedPolicy>,
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
                policy: r.policy,
                host: r.host,
            })
        })
        .collect()
}

/// The whitelist that holds a host's own values (`PUT /v1/hosts/{host}/whitelist`).
pub fn own_whitelist(host: &str) -> String {
    format!("host:{host}")
}

/// The stored body of a whitelist version (everything but the row's columns).
#[derive(serde::Serialize, serde::Deserialize)]
struct WhitelistBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(default)]
    parts: proto::policy::Parts,
}

pub(crate) fn whitelist_body(v: &WhitelistVersion) -> String {
    to_json(&WhitelistBody {
        description: v.description.clone(),
        parts: v.parts.clone(),
    })
}

pub(crate) fn whitelist_from_parts(
    name: String,
    version: i64,
    body: &str,
    deleted: bool,
    created_at: i64,
    created_by: String,
) -> Result<WhitelistVersion, StoreError> {
    let b: WhitelistBody = from_json(&name, "whitelist", body)?;
    Ok(WhitelistVersion {
        version: u32::try_from(version).unwrap_or_default(),
        description: b.description,
        parts: b.parts,
        deleted,
        created_at: from_micros(created_at),
        created_by,
        name,
    })
}

#[derive(serde::Serialize, serde::Deserialize)]
struct GroupBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(default)]
    whitelists: Vec<String>,
    #[serde(default)]
    match_policy: std::collections::BTreeMap<String, proto::policy::MatchPolicy>,
}

pub(crate) fn group_body(g: &Group) -> String {
    to_json(&GroupBody {
        description: g.description.clone(),
        whitelists: g.whitelists.clone(),
        match_policy: g.match_policy.clone(),
    })
}

pub(crate) fn group_from_parts(
    name: String,
    version: i64,
    body: &str,
    updated_at: i64,
) -> Result<Group, StoreError> {
    let b: GroupBody = from_json(&name, "group", body)?;
    Ok(Group {
        version: u32::try_from(version).unwrap_or_default(),
        description: b.description,
        whitelists: b.whitelists,
        match_policy: b.match_policy,
        updated_at: from_micros(updated_at),
        hosts: Vec::new(),
        name,
    })
}

/// Whitelist bodies at least this long (bytes of JSON) are parsed once and
/// kept in the [`WhitelistCache`]; shorter ones are parsed where read.
pub(crate) const LARGE_WHITELIST_BYTES: i64 = 64 * 1024;
/// Most large whitelist versions kept; a full cache starts over.
const WHITELIST_CACHE_MAX: usize = 64;

/// Parsed large whitelist versions (runtime policies of many paths, boot
/// policies with long dbx lists) by name and version. Versions are
/// immutable rows, so an entry never goes stale, across servers too; a
/// clone shares the compiled runtime policy, so the challenge and evidence
/// paths neither parse nor compile a 100,000-path policy per attestation.
#[derive(Default)]
pub(crate) struct WhitelistCache(std::sync::Mutex<HashMap<(String, i64), WhitelistVersion>>);

impl WhitelistCache {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i64), WhitelistVersion>> {
        // Every critical section is a lookup or an insert: a panic inside
        // one cannot leave the map half-changed.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    pub(crate) fn get(&self, name: &str, version: i64) -> Option<WhitelistVersion> {
        self.map().get(&(name.to_string(), version)).cloned()
    }
    pub(crate) fn put(&self, w: &WhitelistVersion) {
        let mut map = self.map();
        if map.len() >= WHITELIST_CACHE_MAX {
            map.clear();
        }
        map.insert((w.name.clone(), i64::from(w.version)), w.clone());
    }
}

/// Bytes of policies the [`PolicyCache`] keeps. A host with its own
/// 11-PCR whitelist takes ~1.1 KB packed: a pool of 100,000 such hosts
/// fits. A full cache drops an eighth of its entries, arbitrary ones; a
/// larger pool pays two queries per attestation for some of its hosts.
pub(crate) const POLICY_CACHE_BYTES: usize = 128 * 1024 * 1024;

/// What a cache entry is counted at besides its packed bytes (its key, the
/// map's slot, the allocation's header).
const POLICY_ENTRY_OVERHEAD: usize = 96;

/// What a parsed entry with a runtime policy is counted at: its runtime
/// policies are shared with the [`WhitelistCache`], the rest is a parsed
/// whitelist or two.
const POLICY_PARSED_BYTES: usize = 4096;

/// Longest JSON kept packed: a longer policy (a boot policy with a long
/// dbx list) would cost more to parse at each use than it saves.
const POLICY_PACKED_MAX: usize = 16 * 1024;

/// Each host's policy as this server last loaded it, under the pool-wide
/// policy generation read (with the host's record) before loading it.
///
/// Every policy change increments the generation in its own transaction,
/// so an entry of the current generation is exactly what the database
/// would answer now, whichever server made the last change: the challenge
/// and evidence paths skip two queries per request. The policy read after
/// the generation can only be as new or newer, never older; an entry of an
/// older generation is never used, and the first load under a newer one
/// drops them all, so memory holds one generation's entries at most.
///
/// Policies are kept packed (see [`Kept`]): parsed, a host's own 11-PCR
/// whitelist took ~2.8 KB (nested maps of hex strings), so the cache held
/// a quarter of a 100,000-host pool, and the misses made each attestation
/// cost 1.5x the CPU it costs in a small pool (docs/benchmarks.md).
#[derive(Default)]
pub(crate) struct PolicyCache(std::sync::Mutex<PolicyEntries>);

#[derive(Default)]
struct PolicyEntries {
    generation: i64,
    by_host: HashMap<String, Kept>,
    /// What the entries are counted at, in bytes.
    bytes: usize,
}

/// A cached policy.
enum Kept {
    /// Its JSON (group, whitelists), parsed again at each use (a few
    /// microseconds for a host's own whitelist, against two queries).
    Packed(Box<[u8]>),
    /// A policy with a runtime (IMA) policy (its compiled form is what
    /// makes a 100,000-path policy cheap to use), or a long one, kept
    /// parsed; with the bytes it is counted at.
    Parsed(Arc<crate::verify::HostPolicy>, usize),
}

impl Kept {
    fn of(policy: &Arc<crate::verify::HostPolicy>) -> Self {
        let has_runtime = policy
            .whitelists
            .iter()
            .any(|w| w.parts.values().any(|p| p.runtime.is_some()));
        if has_runtime {
            return Kept::Parsed(policy.clone(), POLICY_PARSED_BYTES);
        }
        match serde_json::to_vec(&(&policy.group, &policy.whitelists)) {
            Ok(json) if json.len() <= POLICY_PACKED_MAX => Kept::Packed(json.into_boxed_slice()),
            // Parsed, the 11-PCR whitelist took 2.5x its JSON.
            Ok(json) => Kept::Parsed(policy.clone(), json.len().saturating_mul(3)),
            Err(_) => Kept::Parsed(policy.clone(), POLICY_PARSED_BYTES),
        }
    }

    /// What the entry of `host` is counted at.
    fn cost(&self, host: &str) -> usize {
        POLICY_ENTRY_OVERHEAD
            + host.len()
            + match self {
                Kept::Packed(json) => json.len(),
                Kept::Parsed(_, bytes) => *bytes,
            }
    }
}

/// A [`Kept::Packed`] policy parsed again. Our own serialization: a
/// failure would be a bug, and a miss (the store answers) is the safe way
/// out of it.
fn unpack(json: &[u8]) -> Option<Arc<crate::verify::HostPolicy>> {
    let (group, whitelists) = serde_json::from_slice(json).ok()?;
    Some(Arc::new(crate::verify::HostPolicy { group, whitelists }))
}

impl PolicyCache {
    fn entries(&self) -> std::sync::MutexGuard<'_, PolicyEntries> {
        // Lookups and inserts only: a panic cannot leave it half-changed.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    pub(crate) fn get(
        &self,
        host: &str,
        generation: i64,
    ) -> Option<Arc<crate::verify::HostPolicy>> {
        let packed = {
            let entries = self.entries();
            if entries.generation != generation {
                return None;
            }
            match entries.by_host.get(host)? {
                Kept::Parsed(p, _) => return Some(p.clone()),
                Kept::Packed(json) => json.clone(),
            }
        };
        // Parsed outside the lock.
        unpack(&packed)
    }
    pub(crate) fn put(&self, host: &str, generation: i64, policy: Arc<crate::verify::HostPolicy>) {
        let kept = Kept::of(&policy);
        self.put_kept(host, generation, kept, POLICY_CACHE_BYTES);
    }
    fn put_kept(&self, host: &str, generation: i64, kept: Kept, budget: usize) {
        let mut entries = self.entries();
        if generation < entries.generation {
            return; // loaded under a generation already superseded
        }
        if generation > entries.generation {
            entries.by_host.clear();
            entries.bytes = 0;
            entries.generation = generation;
        }
        if let Some(old) = entries.by_host.remove(host) {
            entries.bytes = entries.bytes.saturating_sub(old.cost(host));
        }
        let cost = kept.cost(host);
        if entries.bytes + cost > budget {
            let mut n = 0u32;
            entries.by_host.retain(|_, _| {
                n += 1;
                !n.is_multiple_of(8)
            });
            entries.bytes = entries.by_host.iter().map(|(h, k)| k.cost(h)).sum();
            if entries.bytes + cost > budget {
                entries.by_host.clear();
                entries.bytes = 0;
            }
        }
        entries.bytes += cost;
        entries.by_host.insert(host.to_string(), kept);
    }
}

/// A host whose trust state changed since it was last reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustChange {
    pub host: String,
    /// The state last reported; `None` if none was.
    pub before: Option<String>,
    pub state: String,
}

/// Serializes this process's writes to SQLite, which admits one writer at
/// a time: waiting here costs nothing, while SQLite's own busy handler
/// sleeps in steps of milliseconds when two connections collide. PostgreSQL
/// needs no gate (row locks).
pub(crate) struct WriteGate(Option<tokio::sync::Mutex<()>>);

impl WriteGate {
    pub(crate) fn exclusive() -> Self {
        WriteGate(Some(tokio::sync::Mutex::new(())))
    }
    pub(crate) fn none() -> Self {
        WriteGate(None)
    }
    /// [`Self::lock`] from a thread outside the runtime (the SQLite writer).
    pub(crate) fn blocking_lock(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.0.as_ref().map(|m| m.blocking_lock())
    }
    pub(crate) async fn lock(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.0 {
            Some(m) => Some(m.lock().await),
            None => None,
        }
    }
}

/// One host's row with its verdict and the pool's policy generation
/// ([`HostColumns::QUERY`], one parameter: the name), as stored; each
/// backend reads it its own way, [`HostColumns::into_record`] decodes it.
#[derive(Debug, Default)]
pub(crate) struct HostColumns {
    pub name: String,
    pub registered_at: i64,
    pub ak_public: Option<Vec<u8>>,
    pub ak_name: Option<String>,
    pub group_name: Option<String>,
    pub last_pcrs: Option<String>,
    pub ek_name: Option<String>,
    pub ek_certified: bool,
    pub ak_activated: bool,
    pub rekey_allowed: bool,
    pub clock: Option<i64>,
    pub reset_count: Option<i64>,
    pub restart_count: Option<i64>,
    pub policy_epoch: i64,
    pub ima_state: Option<String>,
    pub last_uefi_log: Option<Vec<u8>>,
    pub trust: Option<String>,
    pub verified_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub reasons: Option<String>,
    pub policy: Option<String>,
    pub policy_generation: i64,
    pub challenge_key_generation: i64,
}

impl HostColumns {
    /// Columns in the order of the fields above.
    pub(crate) const QUERY: &'static str =
        "SELECT h.name, h.registered_at, h.ak_public, h.ak_name, h.group_name, h.last_pcrs, \
         h.ek_name, h.ek_certified, h.ak_activated, h.rekey_allowed, h.clock, h.reset_count, h.restart_count, \
         h.policy_epoch, h.ima_state, h.last_uefi_log, v.trust, v.verified_at, v.expires_at, v.reasons, v.policy, \
         (SELECT generation FROM policy_generation WHERE id = 1) AS policy_generation, \
         COALESCE((SELECT generation FROM challenge_key WHERE id = 1), 0) AS challenge_key_generation \
         FROM hosts h LEFT JOIN verdicts v ON v.host = h.name WHERE h.name = $1";

    pub(crate) fn into_record(self, host: &str) -> Result<HostRecord, StoreError> {
        let verdict = match &self.trust {
            Some(t) => Some(verdict_from_parts(
                host,
                t,
                self.verified_at.unwrap_or_default(),
                self.expires_at.unwrap_or_default(),
                self.reasons.as_deref().unwrap_or("[]"),
                self.policy.as_deref(),
            )?),
            None => None,
        };
        let clock = match (self.clock, self.reset_count, self.restart_count) {
            (Some(c), Some(r), Some(s)) => Some(ClockInfo {
                clock: c as u64,
                reset_count: r as u32,
                restart_count: s as u32,
                safe: true,
            }),
            _ => None,
        };
        Ok(HostRecord {
            name: self.name,
            registered_at: from_micros(self.registered_at),
            ak_public: self.ak_public,
            ak_name: self.ak_name,
            group: self.group_name,
            policy_epoch: self.policy_epoch,
            policy_generation: self.policy_generation,
            challenge_key_generation: self.challenge_key_generation,
            last_pcrs: self
                .last_pcrs
                .map(|p| from_json(host, "PCR values", &p))
                .transpose()?,
            verdict,
            ek_name: self.ek_name,
            ek_certified: self.ek_certified,
            ak_activated: self.ak_activated,
            rekey_allowed: self.rekey_allowed,
            clock,
            ima_state: self
                .ima_state
                .map(|s| from_json(host, "IMA state", &s))
                .transpose()?,
            last_uefi_log: self.last_uefi_log,
        })
    }
}

/// The SQL shared by both backends, instantiated once per pool type.
macro_rules! sql_store {
    ($store:ident, $db:ty, $verdicts_json:expr) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            async fn register_host(&self, host: &str, now: chrono::DateTime<chrono::Utc>) -> Result<bool, $crate::store::StoreError> {
                let _gate = self.gate.lock().await;
                let done = sqlx::query("INSERT INTO hosts (name, registered_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
                    .bind(host)
                    .bind($crate::store::micros(now))
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn host(&self, host: &str) -> Result<Option<$crate::store::HostRecord>, $crate::store::StoreError> {
                self.host_columns(host).await?.map(|c| c.into_record(host)).transpose()
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
                let _gate = self.gate.lock().await;
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
                let _gate = self.gate.lock().await;
                let mut tx = self.pool.begin().await?;
                // Write first: a SQLite transaction that reads and then writes
                // fails at once (SQLITE_BUSY) if another writer committed in
                // between; one that starts with a write waits its turn.
                sqlx::query("INSERT INTO hosts (name, registered_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
                    .bind(&e.host)
                    .bind($crate::store::micros(event.time))
                    .execute(&mut *tx)
                    .await?;
                let other = sqlx::query("SELECT name FROM hosts WHERE ek_name = $1 AND name <> $2")
                    .bind(&e.ek_name)
                    .bind(&e.host)
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some(r) = other {
                    return Ok($crate::store::ActivateOutcome::EkInUse { host: r.try_get("name")? });
                }
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
                let _gate = self.gate.lock().await;
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

            async fn challenge_keys(&self) -> Result<$crate::store::ChallengeKeys, $crate::store::StoreError> {
                use sqlx::Row;
                // Whoever inserts first sets the key; everyone reads that one.
                sqlx::query("INSERT INTO challenge_key (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING")
                    .bind($crate::store::fresh_challenge_key().as_slice())
                    .execute(&self.pool)
                    .await?;
                let row = sqlx::query("SELECT generation, secret, previous, rotated_at FROM challenge_key WHERE id = 1")
                    .fetch_one(&self.pool)
                    .await?;
                Ok($crate::store::ChallengeKeys {
                    generation: row.try_get("generation")?,
                    current: row.try_get("secret")?,
                    previous: row.try_get("previous")?,
                    rotated_at: row.try_get::<Option<i64>, _>("rotated_at")?.map($crate::store::from_micros),
                })
            }

            async fn rotate_challenge_key(&self, event: &$crate::store::NewEvent) -> Result<$crate::store::ChallengeKeys, $crate::store::StoreError> {
                use sqlx::Row;
                let _gate = self.gate.lock().await;
                let mut tx = self.pool.begin().await?;
                // A pool whose servers never started has no key yet: the
                // first becomes the previous one at once, which harms nothing.
                sqlx::query("INSERT INTO challenge_key (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING")
                    .bind($crate::store::fresh_challenge_key().as_slice())
                    .execute(&mut *tx)
                    .await?;
                let row = sqlx::query(
                    "UPDATE challenge_key SET previous = secret, secret = $1, generation = generation + 1, rotated_at = $2 \
                     WHERE id = 1 RETURNING generation, secret, previous, rotated_at",
                )
                .bind($crate::store::fresh_challenge_key().as_slice())
                .bind($crate::store::micros(event.time))
                .fetch_one(&mut *tx)
                .await?;
                let keys = $crate::store::ChallengeKeys {
                    generation: row.try_get("generation")?,
                    current: row.try_get("secret")?,
                    previous: row.try_get("previous")?,
                    rotated_at: row.try_get::<Option<i64>, _>("rotated_at")?.map($crate::store::from_micros),
                };
                insert_event(&mut tx, event).await?;
                tx.commit().await?;
                Ok(keys)
            }

            async fn record_attestation_with_logs(&self, host: &str, rec: $crate::store::AttestationRecord<'_>, logs: $crate::store::LogRecord<'_>) -> Result<$crate::store::Recorded, $crate::store::StoreError> {
                use $crate::store::writer::{AttestationWrite, Write, Written};
                use $crate::store::Recorded;
                let write = Write::Attestation(Box::new(AttestationWrite::new(host, &rec, &logs)));
                Ok(match self.writer.submit(write).await? {
                    Written::Recorded(true) => Recorded::Stored,
                    Written::NonceUsed => Recorded::NonceUsed,
                    _ => Recorded::PolicyChanged,
                })
            }

            async fn record_event(&self, event: &$crate::store::NewEvent) -> Result<(), $crate::store::StoreError> {
                self.writer.submit($crate::store::writer::Write::Event(event.clone())).await?;
                Ok(())
            }

            // ---- whitelist policy (issue 4)
            async fn whitelist(&self, name: &str, version: Option<u32>) -> Result<Option<proto::policy::WhitelistVersion>, $crate::store::StoreError> {
                let row = match version {
                    None => sqlx::query("SELECT name, version, body, deleted, created_at, created_by FROM whitelist_heads WHERE name = $1")
                        .bind(name)
                        .fetch_optional(&self.pool)
                        .await?,
                    Some(v) => sqlx::query("SELECT name, version, body, deleted, created_at, created_by FROM whitelist_versions WHERE name = $1 AND version = $2")
                        .bind(name)
                        .bind(i64::from(v))
                        .fetch_optional(&self.pool)
                        .await?,
                };
                row.as_ref().map(whitelist_row).transpose()
            }

            async fn whitelist_history(&self, name: &str) -> Result<Vec<proto::policy::WhitelistVersion>, $crate::store::StoreError> {
                let rows = sqlx::query("SELECT name, version, body, deleted, created_at, created_by FROM whitelist_versions WHERE name = $1 ORDER BY version")
                    .bind(name)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(whitelist_row).collect()
            }

            async fn whitelists(&self) -> Result<Vec<proto::policy::WhitelistSummary>, $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query("SELECT name, version, body, deleted, created_at, created_by FROM whitelist_heads ORDER BY name")
                    .fetch_all(&self.pool)
                    .await?;
                let users = sqlx::query("SELECT whitelist, group_name FROM group_whitelists ORDER BY group_name")
                    .fetch_all(&self.pool)
                    .await?;
                let mut by_whitelist: std::collections::HashMap<String, Vec<String>> = std::collections::HashMap::new();
                for u in &users {
                    by_whitelist.entry(u.try_get("whitelist")?).or_default().push(u.try_get("group_name")?);
                }
                rows.iter()
                    .map(|r| {
                        let w = whitelist_row(r)?;
                        Ok(proto::policy::WhitelistSummary {
                            groups: by_whitelist.remove(&w.name).unwrap_or_default(),
                            parts: w.parts.keys().cloned().collect(),
                            name: w.name,
                            version: w.version,
                            deleted: w.deleted,
                        })
                    })
                    .collect()
            }

            async fn group(&self, name: &str) -> Result<Option<proto::policy::Group>, $crate::store::StoreError> {
                use sqlx::Row;
                let row = sqlx::query("SELECT name, version, body, updated_at FROM host_groups WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await?;
                let Some(row) = row else { return Ok(None) };
                let mut g = group_row(&row)?;
                let hosts = sqlx::query("SELECT name FROM hosts WHERE group_name = $1 ORDER BY name")
                    .bind(name)
                    .fetch_all(&self.pool)
                    .await?;
                g.hosts = hosts.iter().map(|h| h.try_get("name")).collect::<Result<_, _>>()?;
                Ok(Some(g))
            }

            async fn groups(&self) -> Result<Vec<proto::policy::Group>, $crate::store::StoreError> {
                let rows = sqlx::query("SELECT name, version, body, updated_at FROM host_groups ORDER BY name")
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(group_row).collect()
            }

            async fn groups_using(&self, whitelist: &str) -> Result<Vec<String>, $crate::store::StoreError> {
                use sqlx::Row;
                let rows = sqlx::query("SELECT group_name FROM group_whitelists WHERE whitelist = $1 ORDER BY group_name")
                    .bind(whitelist)
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows.iter().map(|r| r.try_get("group_name")).collect::<Result<_, _>>()?)
            }

            async fn host_policy(&self, host: &str) -> Result<$crate::verify::HostPolicy, $crate::store::StoreError> {
                let group = sqlx::query(
                    "SELECT g.name, g.version, g.body, g.updated_at FROM hosts h JOIN host_groups g ON g.name = h.group_name WHERE h.name = $1",
                )
                .bind(host)
                .fetch_optional(&self.pool)
                .await?;
                // Large bodies are not read here (octet_length reads no
                // content): they come parsed from the cache, or once from
                // their immutable version row.
                // Two index lookups, not one `name = $1 OR name IN (...)`:
                // PostgreSQL plans that as a scan of every whitelist, which
                // at 100,000 hosts (each with its own) is the pool's slowest
                // query.
                let rows = sqlx::query(
                    "SELECT name, version, deleted, created_at, created_by, \
                     CASE WHEN octet_length(body) < $3 THEN body END AS body FROM whitelist_heads WHERE NOT deleted AND name = $1 \
                     UNION ALL SELECT w.name, w.version, w.deleted, w.created_at, w.created_by, \
                     CASE WHEN octet_length(w.body) < $3 THEN w.body END AS body FROM hosts h \
                     JOIN group_whitelists gw ON gw.group_name = h.group_name JOIN whitelist_heads w ON w.name = gw.whitelist \
                     WHERE h.name = $2 AND NOT w.deleted AND w.name <> $1 \
                     ORDER BY name",
                )
                .bind($crate::store::own_whitelist(host))
                .bind(host)
                .bind($crate::store::LARGE_WHITELIST_BYTES)
                .fetch_all(&self.pool)
                .await?;
                let mut whitelists = Vec::with_capacity(rows.len());
                for row in &rows {
                    use sqlx::Row;
                    if row.try_get::<Option<String>, _>("body")?.is_some() {
                        whitelists.push(whitelist_row(row)?);
                        continue;
                    }
                    let name: String = row.try_get("name")?;
                    let version: i64 = row.try_get("version")?;
                    if let Some(w) = self.whitelists.get(&name, version) {
                        whitelists.push(w);
                        continue;
                    }
                    let full = sqlx::query(
                        "SELECT name, version, body, deleted, created_at, created_by FROM whitelist_versions WHERE name = $1 AND version = $2",
                    )
                    .bind(&name)
                    .bind(version)
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or_else(|| $crate::store::StoreError::Corrupt {
                        host: host.to_string(),
                        what: "whitelist",
                        detail: format!("whitelist {name} has no row for its head version {version}"),
                    })?;
                    let w = whitelist_row(&full)?;
                    self.whitelists.put(&w);
                    whitelists.push(w);
                }
                Ok($crate::verify::HostPolicy {
                    group: group.as_ref().map(group_row).transpose()?,
                    whitelists,
                })
            }

            async fn host_policy_at(
                &self,
                host: &str,
                generation: i64,
            ) -> Result<std::sync::Arc<$crate::verify::HostPolicy>, $crate::store::StoreError> {
                if let Some(p) = self.policies.get(host, generation) {
                    return Ok(p);
                }
                let p = std::sync::Arc::new(self.host_policy(host).await?);
                self.policies.put(host, generation, p.clone());
                Ok(p)
            }

            async fn apply_policy_change(
                &self,
                change: &$crate::store::PolicyChange,
                affected: &[String],
                rejudged: &[$crate::store::Rejudged],
                event: &$crate::store::NewEvent,
            ) -> Result<$crate::store::ApplyOutcome, $crate::store::StoreError> {
                use $crate::store::{ApplyOutcome, PolicyChange};
                use sqlx::Row;
                // Returning early drops the transaction: nothing is stored.
                let _gate = self.gate.lock().await;
                let mut tx = self.pool.begin().await?;
                // Host rows first (the lock order of record_attestation).
                let mut sorted: Vec<&String> = affected.iter().collect();
                sorted.sort();
                sorted.dedup();
                for h in sorted {
                    sqlx::query("UPDATE hosts SET policy_epoch = policy_epoch + 1 WHERE name = $1")
                        .bind(h)
                        .execute(&mut *tx)
                        .await?;
                }
                // Every server's cached policies are stale from this commit on.
                sqlx::query("UPDATE policy_generation SET generation = generation + 1 WHERE id = 1")
                    .execute(&mut *tx)
                    .await?;
                match change {
                    PolicyChange::PutWhitelist { version: v, expected_head } => {
                        if v.deleted {
                            let users = sqlx::query("SELECT group_name FROM group_whitelists WHERE whitelist = $1 ORDER BY group_name")
                                .bind(&v.name)
                                .fetch_all(&mut *tx)
                                .await?;
                            if !users.is_empty() {
                                return Ok(ApplyOutcome::InUse {
                                    by: users.iter().map(|u| u.try_get("group_name")).collect::<Result<_, _>>()?,
                                });
                            }
                        }
                        let body = $crate::store::whitelist_body(v);
                        let done = match expected_head {
                            None => bind_whitelist(sqlx::query(
                                "INSERT INTO whitelist_heads (name, version, body, deleted, created_at, created_by) \
                                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (name) DO NOTHING",
                            ), v, &body)
                            .execute(&mut *tx)
                            .await?,
                            Some(head) => bind_whitelist(sqlx::query(
                                "UPDATE whitelist_heads SET version = $2, body = $3, deleted = $4, created_at = $5, created_by = $6 \
                                 WHERE name = $1 AND version = $7",
                            ), v, &body)
                            .bind(i64::from(*head))
                            .execute(&mut *tx)
                            .await?,
                        };
                        if done.rows_affected() != 1 {
                            let current = version_now(&mut tx, "SELECT version FROM whitelist_heads WHERE name = $1", &v.name).await?;
                            return Ok(ApplyOutcome::Conflict { current });
                        }
                        bind_whitelist(sqlx::query(
                            "INSERT INTO whitelist_versions (name, version, body, deleted, created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6)",
                        ), v, &body)
                        .execute(&mut *tx)
                        .await?;
                    }
                    PolicyChange::PutGroup { group: g, expected_version } => {
                        let body = $crate::store::group_body(g);
                        let done = match expected_version {
                            None => sqlx::query(
                                "INSERT INTO host_groups (name, version, body, updated_at) VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
                            )
                            .bind(&g.name)
                            .bind(i64::from(g.version))
                            .bind(&body)
                            .bind($crate::store::micros(g.updated_at))
                            .execute(&mut *tx)
                            .await?,
                            Some(base) => sqlx::query(
                                "UPDATE host_groups SET version = $2, body = $3, updated_at = $4 WHERE name = $1 AND version = $5",
                            )
                            .bind(&g.name)
                            .bind(i64::from(g.version))
                            .bind(&body)
                            .bind($crate::store::micros(g.updated_at))
                            .bind(i64::from(*base))
                            .execute(&mut *tx)
                            .await?,
                        };
                        if done.rows_affected() != 1 {
                            let current = version_now(&mut tx, "SELECT version FROM host_groups WHERE name = $1", &g.name).await?;
                            return Ok(ApplyOutcome::Conflict { current });
                        }
                        sqlx::query("DELETE FROM group_whitelists WHERE group_name = $1")
                            .bind(&g.name)
                            .execute(&mut *tx)
                            .await?;
                        for w in &g.whitelists {
                            sqlx::query("INSERT INTO group_whitelists (group_name, whitelist) VALUES ($1, $2)")
                                .bind(&g.name)
                                .bind(w)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                    PolicyChange::DeleteGroup { name } => {
                        let members = sqlx::query("SELECT name FROM hosts WHERE group_name = $1 ORDER BY name LIMIT 20")
                            .bind(name)
                            .fetch_all(&mut *tx)
                            .await?;
                        if !members.is_empty() {
                            return Ok(ApplyOutcome::InUse {
                                by: members.iter().map(|m| m.try_get("name")).collect::<Result<_, _>>()?,
                            });
                        }
                        sqlx::query("DELETE FROM group_whitelists WHERE group_name = $1")
                            .bind(name)
                            .execute(&mut *tx)
                            .await?;
                        let done = sqlx::query("DELETE FROM host_groups WHERE name = $1")
                            .bind(name)
                            .execute(&mut *tx)
                            .await?;
                        if done.rows_affected() != 1 {
                            return Ok(ApplyOutcome::Conflict { current: None });
                        }
                    }
                    PolicyChange::Members { group, add, remove } => {
                        for h in add {
                            sqlx::query("UPDATE hosts SET group_name = $1 WHERE name = $2")
                                .bind(group)
                                .bind(h)
                                .execute(&mut *tx)
                                .await?;
                        }
                        for h in remove {
                            sqlx::query("UPDATE hosts SET group_name = NULL WHERE name = $1 AND group_name = $2")
                                .bind(h)
                                .bind(group)
                                .execute(&mut *tx)
                                .await?;
                        }
                    }
                }
                for r in rejudged {
                    // Only if the host has not attested since it was judged
                    // again; if it has, the caller judges that newer evidence.
                    let done = sqlx::query("UPDATE verdicts SET trust = $1, reasons = $2, policy = $3 WHERE host = $4 AND verified_at = $5")
                        .bind(r.verdict.trust.as_str())
                        .bind($crate::store::to_json(&r.verdict.reasons))
                        .bind(r.verdict.policy.as_ref().map($crate::store::to_json))
                        .bind(&r.host)
                        .bind($crate::store::micros(r.verdict.verified_at.unwrap_or_default()))
                        .execute(&mut *tx)
                        .await?;
                    if done.rows_affected() != 1 {
                        return Ok(ApplyOutcome::Stale { host: r.host.clone() });
                    }
                }
                insert_event(&mut tx, event).await?;
                tx.commit().await?;
                Ok(ApplyOutcome::Applied)
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

            async fn trust_changes(
                &self,
                now: chrono::DateTime<chrono::Utc>,
                after: &str,
                limit: i64,
            ) -> Result<Vec<$crate::store::TrustChange>, $crate::store::StoreError> {
                use sqlx::Row;
                // A host's reported state: its verdict's trust until the
                // verdict expires, then `stale`.
                let rows = sqlx::query(
                    "SELECT host, reported, state FROM (\
                       SELECT v.host AS host, s.state AS reported, \
                         CASE WHEN v.expires_at > $1 THEN v.trust ELSE 'stale' END AS state \
                       FROM verdicts v LEFT JOIN audit_trust_state s ON s.host = v.host WHERE v.host > $2) AS t \
                     WHERE reported IS NULL OR reported <> state ORDER BY host LIMIT $3",
                )
                .bind($crate::store::micros(now))
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| {
                        Ok($crate::store::TrustChange {
                            host: r.try_get("host")?,
                            before: r.try_get("reported")?,
                            state: r.try_get("state")?,
                        })
                    })
                    .collect()
            }

            async fn record_trust_changes(
                &self,
                changes: &[($crate::store::TrustChange, $crate::store::NewEvent)],
            ) -> Result<Vec<String>, $crate::store::StoreError> {
                use sqlx::Row;
                if changes.is_empty() {
                    return Ok(Vec::new());
                }
                let _gate = self.gate.lock().await;
                let mut tx = self.pool.begin().await?;
                // Compare and set against the state the scan read: if another
                // server recorded anything for the host since, this change
                // is not recorded (that server reported it, or its own scan
                // will report what follows from what it recorded).
                let mut recorded = std::collections::HashSet::new();
                let (new, known): (Vec<_>, Vec<_>) = changes.iter().partition(|(c, _)| c.before.is_none());
                for chunk in new.chunks($crate::store::writer::ROWS_PER_STATEMENT) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new("INSERT INTO audit_trust_state (host, state) ");
                    qb.push_values(chunk, |mut row, (c, _)| {
                        row.push_bind(c.host.as_str()).push_bind(c.state.as_str());
                    });
                    qb.push(" ON CONFLICT (host) DO NOTHING RETURNING host");
                    for row in qb.build().persistent(false).fetch_all(&mut *tx).await? {
                        recorded.insert(row.try_get::<String, _>("host")?);
                    }
                }
                for chunk in known.chunks($crate::store::writer::ROWS_PER_STATEMENT) {
                    let mut qb = sqlx::QueryBuilder::<$db>::new(
                        "UPDATE audit_trust_state SET state = v.column3 FROM (",
                    );
                    qb.push_values(chunk, |mut row, (c, _)| {
                        row.push_bind(c.host.as_str())
                            .push_bind(c.before.as_deref().unwrap_or_default())
                            .push_bind(c.state.as_str());
                    });
                    qb.push(
                        ") AS v WHERE audit_trust_state.host = v.column1 AND audit_trust_state.state = v.column2 \
                         RETURNING audit_trust_state.host",
                    );
                    for row in qb.build().persistent(false).fetch_all(&mut *tx).await? {
                        recorded.insert(row.try_get::<String, _>("host")?);
                    }
                }
                let applied: Vec<_> = changes.iter().filter(|(c, _)| recorded.contains(&c.host)).collect();
                let events: Vec<&$crate::store::NewEvent> = applied.iter().map(|(_, e)| e).collect();
                if !events.is_empty() {
                    let mut heads = $crate::store::ChainHeads::default();
                    append_events(&mut tx, &mut heads, &events).await?;
                    save_heads(&mut tx, &heads).await?;
                }
                tx.commit().await?;
                Ok(applied.into_iter().map(|(c, _)| c.host.clone()).collect())
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
                    "SELECT host, trust, verified_at, expires_at, reasons, policy FROM verdicts \
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

        /// Append one event to the outbox and to its server's hash chain, in
        /// the caller's transaction.
        async fn insert_event(tx: &mut sqlx::Transaction<'_, $db>, event: &$crate::store::NewEvent) -> Result<(), sqlx::Error> {
            let mut heads = $crate::store::ChainHeads::default();
            append_events(tx, &mut heads, &[event]).await?;
            save_heads(tx, &heads).await
        }

        /// Append events, in order, to the outbox and to their servers' hash
        /// chains, one INSERT per chunk. The first event of a server in a
        /// transaction reads its chain head with an upsert, which takes the
        /// row lock, so concurrent appends queue up instead of forking the
        /// chain; later ones link to the head kept in `heads`, which
        /// [`save_heads`] writes back before commit.
        async fn append_events(
            tx: &mut sqlx::Transaction<'_, $db>,
            heads: &mut $crate::store::ChainHeads,
            events: &[&$crate::store::NewEvent],
        ) -> Result<(), sqlx::Error> {
            use sqlx::Row;
            use $crate::store::writer::sql;
            let metas: Vec<_> = events.iter().map(|e| $crate::audit::chain::EventMeta::of(&e.body)).collect();
            for server in heads.unread(&metas) {
                let row = sqlx::query(sql::CHAIN_HEAD)
                    .bind(server)
                    .bind($crate::audit::chain::GENESIS)
                    .fetch_one(&mut **tx)
                    .await?;
                heads.0.insert(server.to_string(), $crate::store::ChainHead {
                    server: server.to_string(),
                    seq: row.try_get("seq")?,
                    hash: row.try_get("hash")?,
                    count: row.try_get("count")?,
                });
            }
            let links = heads
                .link(&metas)
                .ok_or_else(|| sqlx::Error::Protocol("an audit chain head was not read".into()))?;
            let rows: Vec<_> = events.iter().zip(metas.iter().zip(&links)).collect();
            for chunk in rows.chunks($crate::store::writer::ROWS_PER_STATEMENT) {
                let mut qb = sqlx::QueryBuilder::<$db>::new(sql::EVENTS);
                qb.push_values(chunk, |mut row, (event, (meta, link))| {
                    row.push_bind(event.id.as_str())
                        .push_bind($crate::store::micros(event.time))
                        .push_bind(event.host.as_deref())
                        .push_bind(event.body.as_str())
                        .push_bind(meta.server.as_str())
                        .push_bind(link.index)
                        .push_bind(link.prev_hash.as_str())
                        .push_bind(link.hash.as_str())
                        .push_bind(meta.action.as_str())
                        .push_bind(meta.outcome.as_str())
                        .push_bind(meta.initiator_id.as_str())
                        .push_bind(meta.initiator_name.as_str())
                        .push_bind(meta.target_id.as_str())
                        .push_bind(meta.target_name.as_str());
                });
                qb.push(sql::EVENTS_END);
                for row in qb.build().persistent(chunk.len() == 1).fetch_all(&mut **tx).await? {
                    heads.saw(&row.try_get::<String, _>("server")?, row.try_get("seq")?);
                }
            }
            Ok(())
        }

        /// Write back the chain heads that [`append_events`] advanced.
        async fn save_heads(tx: &mut sqlx::Transaction<'_, $db>, heads: &$crate::store::ChainHeads) -> Result<(), sqlx::Error> {
            for head in heads.0.values() {
                sqlx::query($crate::store::writer::sql::SAVE_HEAD)
                    .bind(head.seq)
                    .bind(&head.hash)
                    .bind(head.count)
                    .bind(&head.server)
                    .execute(&mut **tx)
                    .await?;
            }
            Ok(())
        }

        /// The columns of a whitelist version (name, version, body, deleted,
        /// created_at, created_by), as `$1`–`$6` of `whitelist_heads` and
        /// `whitelist_versions` alike.
        fn bind_whitelist<'q>(
            q: sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>>,
            v: &'q proto::policy::WhitelistVersion,
            body: &'q str,
        ) -> sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>> {
            q.bind(&v.name)
                .bind(i64::from(v.version))
                .bind(body)
                .bind(v.deleted)
                .bind($crate::store::micros(v.created_at))
                .bind(&v.created_by)
        }

        /// The version a conflicting change left behind (`sql` selects it by name).
        async fn version_now(
            tx: &mut sqlx::Transaction<'_, $db>,
            sql: &'static str,
            name: &str,
        ) -> Result<Option<u32>, sqlx::Error> {
            use sqlx::Row;
            let row = sqlx::query(sql).bind(name).fetch_optional(&mut **tx).await?;
            Ok(row
                .map(|r| r.try_get::<i64, _>("version"))
                .transpose()?
                .map(|v| u32::try_from(v).unwrap_or_default()))
        }

        fn whitelist_row(r: &<$db as sqlx::Database>::Row) -> Result<proto::policy::WhitelistVersion, $crate::store::StoreError> {
            use sqlx::Row;
            $crate::store::whitelist_from_parts(
                r.try_get("name")?,
                r.try_get("version")?,
                &r.try_get::<String, _>("body")?,
                r.try_get("deleted")?,
                r.try_get("created_at")?,
                r.try_get("created_by")?,
            )
        }

        fn group_row(r: &<$db as sqlx::Database>::Row) -> Result<proto::policy::Group, $crate::store::StoreError> {
            use sqlx::Row;
            $crate::store::group_from_parts(
                r.try_get("name")?,
                r.try_get("version")?,
                &r.try_get::<String, _>("body")?,
                r.try_get("updated_at")?,
            )
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
                row.try_get::<Option<String>, _>("policy")?.as_deref(),
            )
        }
    };
}
pub(crate) use sql_store;

#[cfg(test)]
mod tests {
    use super::{Kept, PolicyCache};
    use crate::verify::HostPolicy;
    use std::sync::Arc;

    fn policy() -> Arc<HostPolicy> {
        Arc::new(HostPolicy {
            group: None,
            whitelists: Vec::new(),
        })
    }

    /// A group and a host's own whitelist of 11 PCRs with a boot policy.
    fn full_policy() -> Arc<HostPolicy> {
        let pcrs = proto::wire::PcrWhitelist::from([(
            proto::tpm::HashAlg::Sha256,
            (0..11u8).map(|i| (i, vec![hex::encode([i; 32])])).collect(),
        )]);
        let mut part = proto::policy::Part::of_pcrs(pcrs);
        part.boot = Some(Box::new(
            serde_json::from_str(
                r#"{"version": 1, "bank": "sha256", "secure_boot": true, "kernel_cmdline": ["^/vmlinuz "]}"#,
            )
            .unwrap(),
        ));
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-07T10:11:12.123456Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        Arc::new(HostPolicy {
            group: Some(proto::policy::Group {
                name: "rack-1".into(),
                version: 3,
                description: Some("racks".into()),
                whitelists: vec!["bios".into()],
                match_policy: Default::default(),
                updated_at: at,
                hosts: Vec::new(),
            }),
            whitelists: vec![proto::policy::WhitelistVersion {
                name: "host:h1".into(),
                version: 2,
                description: None,
                parts: [(proto::policy::PART_HOST_UNIQUE.to_string(), part)].into(),
                deleted: false,
                created_at: at,
                created_by: "admin".into(),
            }],
        })
    }

    #[test]
    fn policy_cache_serves_only_the_current_generation() {
        let cache = PolicyCache::default();
        let p1 = full_policy();
        cache.put("h1", 3, p1.clone());
        assert_eq!(cache.get("h1", 3).unwrap(), p1, "packed and parsed again");
        assert!(cache.get("h1", 4).is_none(), "newer generation: a miss");
        assert!(cache.get("h1", 2).is_none(), "older generation: a miss");
        // A load under a newer generation drops the older entries ...
        cache.put("h2", 4, policy());
        assert!(cache.get("h1", 3).is_none());
        assert!(cache.get("h2", 4).is_some());
        // ... and one that finished after a newer generation was seen is
        // not kept (it may predate the change).
        cache.put("h1", 3, policy());
        assert!(cache.get("h1", 3).is_none());
        assert!(cache.get("h2", 4).is_some());
    }

    #[test]
    fn policy_cache_packs_small_policies_and_keeps_runtime_ones_parsed() {
        let p = full_policy();
        let Kept::Packed(json) = Kept::of(&p) else {
            panic!("a policy without a runtime policy is packed");
        };
        // Packed, the 11-PCR whitelist takes far less than parsed (~2.8 KB).
        assert!(json.len() < 1500, "{}", json.len());
        let mut with_ima = (*p).clone();
        let runtime = proto::runtime_policy::RuntimePolicy::from_allowlist(
            "0000000000000000000000000000000000000000000000000000000000000000  /usr/bin/true\n",
        )
        .unwrap();
        with_ima.whitelists[0]
            .parts
            .values_mut()
            .for_each(|part| part.runtime = Some(runtime.clone()));
        let with_ima = Arc::new(with_ima);
        let cache = PolicyCache::default();
        cache.put("h1", 1, with_ima.clone());
        let got = cache.get("h1", 1).unwrap();
        assert!(Arc::ptr_eq(&got, &with_ima), "kept parsed, shared");
        // A long policy (here a long kernel command line list) is kept
        // parsed too, counted at more than its JSON.
        let mut long = (*p).clone();
        let boot: proto::bootpolicy::BootPolicy = serde_json::from_value(serde_json::json!({
            "version": 1, "bank": "sha256",
            "kernel_cmdline": vec!["^/vmlinuz quiet splash$"; 1000],
        }))
        .unwrap();
        long.whitelists[0]
            .parts
            .values_mut()
            .for_each(|part| part.boot = Some(Box::new(boot.clone())));
        let long = Arc::new(long);
        let kept = Kept::of(&long);
        assert!(
            matches!(kept, Kept::Parsed(_, n) if n > super::POLICY_PACKED_MAX),
            "long: parsed"
        );
        cache.put("h2", 1, long.clone());
        assert!(Arc::ptr_eq(&cache.get("h2", 1).unwrap(), &long));
    }

    #[test]
    fn policy_cache_stays_within_its_budget() {
        let cache = PolicyCache::default();
        let kept = Kept::of(&full_policy());
        let one = kept.cost("n000");
        let budget = one * 40;
        for i in 0..100 {
            cache.put_kept(&format!("n{i:03}"), 4, Kept::of(&full_policy()), budget);
            let bytes = cache.entries().bytes;
            assert!(bytes <= budget, "{bytes} > {budget} after {i}");
        }
        let kept = (0..100)
            .filter(|i| cache.get(&format!("n{i:03}"), 4).is_some())
            .count();
        // A full cache drops an eighth, so it holds between 7/8 of the
        // budget's entries and all of them.
        assert!((35..=40).contains(&kept), "{kept}");
        assert!(cache.get("n099", 4).is_some(), "the newest entry is kept");
        // Replacing an entry does not count it twice.
        let before = cache.entries().bytes;
        cache.put_kept("n099", 4, Kept::of(&full_policy()), budget);
        assert_eq!(cache.entries().bytes, before);
    }
}
