//! Group commit for the attestation path.
//!
//! Every verdict stored (with the nonce its evidence used) is a write, and
//! at fleet scale they arrive by the thousand per second. Run one by one,
//! each pays a transaction of its own (BEGIN, COMMIT, the hash-chain head
//! read and written, and on SQLite a turn at the single writer lock). Here
//! one writer task per store takes whatever writes are queued, up to
//! [`MAX_BATCH`], applies them in one transaction and answers each caller
//! only after the commit: nothing is acknowledged that is not durable.
//!
//! A batch that fails on a data error (a constraint, a deadlock) is run
//! again one write per transaction, so one bad write cannot fail its
//! neighbours; a batch that fails because the database is unavailable
//! (down, locked, full) fails as a whole, at once, with
//! [`StoreError::Unavailable`], and the next batch tries again.
//!
//! Writes are owned and already serialized when queued: the writer only
//! binds values, so the one task that everything waits for does no JSON.

use super::{micros, to_json, AttestationRecord, LogRecord, NewEvent, StoreError};
use tokio::sync::{mpsc, oneshot};

/// The most writes one transaction takes. Large enough to amortize the
/// commit, small enough that a batch's locks are held briefly.
pub(crate) const MAX_BATCH: usize = 256;

/// Most rows one multi-row statement of a batch carries (at 14 columns,
/// 896 parameters: far below SQLite's and PostgreSQL's limits). Only the
/// one-row forms are kept prepared: a connection caching a statement for
/// every row count would hold megabytes of them.
pub(crate) const ROWS_PER_STATEMENT: usize = 64;

/// `items` split into rounds in which no key appears twice, keeping the
/// order of items within a key: a multi-row UPDATE applies one row per
/// target, so a host attesting twice in one batch is updated twice, in
/// arrival order.
pub(crate) fn distinct_rounds<'a>(
    items: &[usize],
    key: impl Fn(usize) -> &'a str,
) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for &i in items {
        let n = seen.entry(key(i)).or_insert(0);
        if rounds.len() <= *n {
            rounds.push(Vec::new());
        }
        rounds[*n].push(i);
        *n += 1;
    }
    rounds
}

/// Queued writes before callers wait to queue theirs (back-pressure).
const QUEUE: usize = 4096;

/// One write of the attestation path.
#[derive(Debug, Clone)]
pub(crate) enum Write {
    Attestation(Box<AttestationWrite>),
    Event(NewEvent),
}

/// A verdict with its host-row updates and events, ready to bind.
#[derive(Debug, Clone)]
pub(crate) struct AttestationWrite {
    pub host: String,
    /// The nonce used (see [`super::UsedNonce`]).
    pub nonce: Option<NonceWrite>,
    /// See [`AttestationRecord::policy_epoch`].
    pub epoch: Option<i64>,
    pub last_pcrs: Option<String>,
    /// clock, reset_count, restart_count.
    pub clock: Option<(i64, i64, i64)>,
    pub ima_state: Option<String>,
    pub uefi_log: Option<Vec<u8>>,
    pub trust: &'static str,
    pub verified_at: i64,
    pub expires_at: i64,
    pub reasons: String,
    pub policy: Option<String>,
    pub events: Vec<NewEvent>,
}

/// A [`super::UsedNonce`], ready to bind.
#[derive(Debug, Clone)]
pub(crate) struct NonceWrite {
    pub nonce: String,
    pub expires_at: i64,
    pub exclusive: bool,
}

impl AttestationWrite {
    pub(crate) fn new(host: &str, rec: &AttestationRecord<'_>, logs: &LogRecord<'_>) -> Self {
        let v = rec.verdict;
        AttestationWrite {
            host: host.to_string(),
            nonce: rec.nonce.map(|n| NonceWrite {
                nonce: n.nonce.clone(),
                expires_at: micros(n.expires_at),
                exclusive: n.exclusive,
            }),
            epoch: rec.policy_epoch,
            last_pcrs: rec.verified_pcrs.map(to_json),
            clock: rec.clock.map(|c| {
                (
                    c.clock as i64,
                    i64::from(c.reset_count),
                    i64::from(c.restart_count),
                )
            }),
            ima_state: logs.ima_state.map(to_json),
            uefi_log: logs.uefi_log.map(<[u8]>::to_vec),
            trust: v.trust.as_str(),
            verified_at: micros(v.verified_at.unwrap_or_default()),
            expires_at: micros(v.expires_at.unwrap_or_default()),
            reasons: to_json(&v.reasons),
            policy: v.policy.as_ref().map(to_json),
            events: rec.events.to_vec(),
        }
    }

    /// Whether the host row changes (or its policy epoch is checked).
    pub(crate) fn touches_host(&self) -> bool {
        self.epoch.is_some()
            || self.last_pcrs.is_some()
            || self.clock.is_some()
            || self.ima_state.is_some()
            || self.uefi_log.is_some()
    }
}

impl Write {
    /// Where the write goes in its batch. Every batch takes its row locks
    /// in one order (used nonces by nonce, first of all, see `use_nonces`;
    /// then host rows by name, as policy changes do; then verdicts and the
    /// chain head; on PostgreSQL the rows of a multi-row UPDATE are locked
    /// first, sorted, by `lock_rows`), so two batches, or a batch and a
    /// policy change, cannot deadlock. Events lock nothing but the chain
    /// head: they keep their arrival order.
    fn order(&self) -> (u8, &str) {
        match self {
            Write::Attestation(a) => (1, &a.host),
            Write::Event(_) => (2, ""),
        }
    }
}

/// The indices of `writes` in the order a batch applies them (stable, so
/// two writes for one host keep their arrival order).
pub(crate) fn batch_order(writes: &[Write]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..writes.len()).collect();
    order.sort_by(|&a, &b| writes[a].order().cmp(&writes[b].order()));
    order
}

/// The attestation `writes[i]` is, if it is one.
fn attestation(writes: &[Write], i: usize) -> Option<&AttestationWrite> {
    match &writes[i] {
        Write::Attestation(a) => Some(a),
        Write::Event(_) => None,
    }
}

/// The attestations among `indices`, each with its index.
pub(crate) fn attestations<'w>(
    writes: &'w [Write],
    indices: &[usize],
) -> Vec<(usize, &'w AttestationWrite)> {
    indices
        .iter()
        .filter_map(|&i| Some((i, attestation(writes, i)?)))
        .collect()
}

/// The nonce uses among `indices`: index, attestation, nonce.
pub(crate) fn nonce_uses<'w>(
    writes: &'w [Write],
    indices: &[usize],
) -> Vec<(usize, &'w AttestationWrite, &'w NonceWrite)> {
    attestations(writes, indices)
        .into_iter()
        .filter_map(|(i, a)| Some((i, a, a.nonce.as_ref()?)))
        .collect()
}

/// The writes that use a nonce, sorted by nonce (stable: two uses of one
/// nonce keep their arrival order, and the first wins), in rounds in which
/// no nonce appears twice. Every batch inserts used nonces in this order.
pub(crate) fn nonce_rounds(writes: &[Write]) -> Vec<Vec<usize>> {
    let nonce_of = |i: usize| {
        attestation(writes, i)
            .and_then(|a| a.nonce.as_ref())
            .map(|n| n.nonce.as_str())
    };
    let mut using: Vec<usize> = (0..writes.len())
        .filter(|&i| nonce_of(i).is_some())
        .collect();
    using.sort_by(|&x, &y| nonce_of(x).cmp(&nonce_of(y)));
    distinct_rounds(&using, |i| nonce_of(i).unwrap_or_default())
}

/// Once the used nonces are stored: the attestations (in batch order) whose
/// host-row UPDATE decides whether they are recorded; those that change no
/// host row are marked recorded here.
pub(crate) fn host_updates(writes: &[Write], order: &[usize], done: &mut [Written]) -> Vec<usize> {
    let mut updates = Vec::new();
    for &i in order {
        if done[i] == Written::NonceUsed {
            continue;
        }
        if let Some(a) = attestation(writes, i) {
            if a.touches_host() {
                updates.push(i);
            } else {
                done[i] = Written::Recorded(true);
            }
        }
    }
    updates
}

/// The host a write updates ("" for an event).
pub(crate) fn host_of(writes: &[Write], i: usize) -> &str {
    attestation(writes, i).map_or("", |a| a.host.as_str())
}

/// The exclusive nonces of verdicts not stored for their policy epoch: the
/// evidence is judged again and stored with its nonce, so it is released.
pub(crate) fn released_nonces<'w>(
    writes: &'w [Write],
    updates: &[usize],
    done: &[Written],
) -> Vec<&'w str> {
    updates
        .iter()
        .filter(|&&i| done[i] == Written::Recorded(false))
        .filter_map(|&i| attestation(writes, i)?.nonce.as_ref())
        .filter(|n| n.exclusive)
        .map(|n| n.nonce.as_str())
        .collect()
}

/// What the batch stores besides nonces and host rows: the last recorded
/// verdict of each host (sorted by host, the lock order), and every event
/// in batch order.
pub(crate) fn stored<'w>(
    writes: &'w [Write],
    order: &[usize],
    done: &[Written],
) -> (Vec<&'w AttestationWrite>, Vec<&'w NewEvent>) {
    let mut last: std::collections::HashMap<&str, &AttestationWrite> =
        std::collections::HashMap::new();
    let mut events = Vec::new();
    for &i in order {
        match &writes[i] {
            Write::Attestation(a) if done[i] == Written::Recorded(true) => {
                last.insert(a.host.as_str(), a);
                events.extend(a.events.iter());
            }
            Write::Event(event) => events.push(event),
            Write::Attestation(_) => {}
        }
    }
    let mut verdicts: Vec<_> = last.into_values().collect();
    verdicts.sort_by(|x, y| x.host.cmp(&y.host));
    (verdicts, events)
}

/// Statements (or their fixed parts) both backends' batches run.
pub(crate) mod sql {
    pub const USE_NONCES: &str =
        "INSERT INTO challenges (nonce, host, selection, issued_at, expires_at, used_at) ";
    pub const USE_NONCES_END: &str = " ON CONFLICT (nonce) DO NOTHING RETURNING nonce";
    pub const UPDATE_HOSTS: &str =
        "UPDATE hosts SET last_pcrs = COALESCE(v.column1, last_pcrs), clock = COALESCE(v.column2, clock), \
         reset_count = COALESCE(v.column3, reset_count), restart_count = COALESCE(v.column4, restart_count), \
         ima_state = COALESCE(v.column5, ima_state), last_uefi_log = COALESCE(v.column6, last_uefi_log) FROM (";
    pub const UPDATE_HOSTS_END: &str =
        ") AS v WHERE hosts.name = v.column7 AND (v.column8 IS NULL OR hosts.policy_epoch = v.column8) \
         RETURNING name";
    pub const RELEASE_NONCES: &str = "DELETE FROM challenges WHERE nonce IN (";
    pub const VERDICTS: &str =
        "INSERT INTO verdicts (host, trust, verified_at, expires_at, reasons, policy) ";
    pub const VERDICTS_END: &str =
        " ON CONFLICT (host) DO UPDATE SET trust = excluded.trust, verified_at = excluded.verified_at, \
         expires_at = excluded.expires_at, reasons = excluded.reasons, policy = excluded.policy";
    /// Makes a chain head if it is missing, or takes its row lock, and reads it either way.
    pub const CHAIN_HEAD: &str =
        "INSERT INTO audit_chain_heads (server, seq, hash, count) VALUES ($1, 0, $2, 0) \
         ON CONFLICT (server) DO UPDATE SET count = audit_chain_heads.count RETURNING seq, hash, count";
    pub const SAVE_HEAD: &str =
        "UPDATE audit_chain_heads SET seq = $1, hash = $2, count = $3 WHERE server = $4";
    pub const EVENTS: &str =
        "INSERT INTO events (id, event_time, host, body, server, chain_index, prev_hash, hash, action, outcome, \
         initiator_id, initiator_name, target_id, target_name) ";
    pub const EVENTS_END: &str = " RETURNING seq, server";
}

/// What a write answers once its batch committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Written {
    Done,
    /// False: the policy changed since the verdict's epoch; nothing stored.
    Recorded(bool),
    /// An exclusive use of a nonce that was used before; nothing stored.
    NonceUsed,
}

pub(crate) type Reply = oneshot::Sender<Result<Written, StoreError>>;
pub(crate) type Pending = (Write, Reply);

/// Answer each write of a committed batch.
pub(crate) fn answer(replies: Vec<Reply>, done: Vec<Written>) {
    for (reply, written) in replies.into_iter().zip(done) {
        let _ = reply.send(Ok(written));
    }
}

/// The answer of a batch of one write.
pub(crate) fn only(result: Result<Vec<Written>, StoreError>) -> Result<Written, StoreError> {
    result.and_then(|mut done| {
        done.pop()
            .ok_or_else(|| StoreError::Unavailable("empty batch result".into()))
    })
}

/// Fail every write of a batch that the database could not take now.
pub(crate) fn fail(replies: Vec<Reply>, e: &dyn std::fmt::Display) {
    tracing::warn!(error = %e, writes = replies.len(), "batch of writes failed");
    let message = e.to_string();
    for reply in replies {
        let _ = reply.send(Err(StoreError::Unavailable(message.clone())));
    }
}

/// The handle callers queue writes on; the writer task holds the other end.
#[derive(Clone)]
pub(crate) struct Writer(mpsc::Sender<Pending>);

impl Writer {
    pub(crate) fn channel() -> (Writer, mpsc::Receiver<Pending>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Writer(tx), rx)
    }

    /// Queue a write and wait until its batch committed (or failed).
    pub(crate) async fn submit(&self, write: Write) -> Result<Written, StoreError> {
        let stopped = || StoreError::Unavailable("the store's writer has stopped".into());
        let (reply, answer) = oneshot::channel();
        self.0.send((write, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// True when `e` says the database cannot be written now (gone, locked,
/// full, out of resources) rather than that a write is wrong: such a batch
/// fails whole instead of being retried write by write.
pub(crate) fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            let code = d.code();
            let code = code.as_deref().unwrap_or_default();
            match code.parse::<u32>() {
                // SQLite result codes (primary code in the low byte):
                // BUSY, LOCKED, IOERR, FULL, CANTOPEN, READONLY.
                Ok(n) => matches!(n & 0xff, 5 | 6 | 8 | 10 | 13 | 14),
                // PostgreSQL SQLSTATE classes: connection exception,
                // insufficient resources, operator intervention, system error.
                Err(_) => ["08", "53", "57", "58"]
                    .iter()
                    .any(|class| code.starts_with(class)),
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(host: &str) -> Write {
        Write::Attestation(Box::new(AttestationWrite {
            host: host.into(),
            nonce: None,
            epoch: None,
            last_pcrs: None,
            clock: None,
            ima_state: None,
            uefi_log: None,
            trust: "trusted",
            verified_at: 0,
            expires_at: 0,
            reasons: "[]".into(),
            policy: None,
            events: vec![],
        }))
    }

    #[test]
    fn batches_lock_hosts_in_name_order_then_events() {
        let writes = vec![
            Write::Event(NewEvent {
                id: "e".into(),
                time: chrono::Utc::now(),
                host: None,
                body: "{}".into(),
            }),
            att("node2"),
            att("node1"),
            att("node2"),
        ];
        // Hosts by name (arrival order kept for node2), the event last.
        assert_eq!(batch_order(&writes), vec![2, 1, 3, 0]);
        // Events keep their arrival order, whatever their ids.
        let event = |id: &str| {
            Write::Event(NewEvent {
                id: id.into(),
                time: chrono::Utc::now(),
                host: None,
                body: "{}".into(),
            })
        };
        assert_eq!(batch_order(&[event("b"), event("a")]), vec![0, 1]);
    }

    #[test]
    fn rounds_of_distinct_keys() {
        let hosts = ["a", "b", "a", "c", "a"];
        assert_eq!(
            distinct_rounds(&[0, 1, 2, 3, 4], |i| hosts[i]),
            vec![vec![0, 1, 3], vec![2], vec![4]]
        );
        assert!(distinct_rounds(&[], |i| hosts[i]).is_empty());
    }

    #[test]
    fn unavailable_is_told_from_a_bad_write() {
        assert!(is_unavailable(&sqlx::Error::PoolTimedOut));
        assert!(is_unavailable(&sqlx::Error::Io(std::io::Error::other(
            "connection reset"
        ))));
        assert!(!is_unavailable(&sqlx::Error::RowNotFound));
        assert!(!is_unavailable(&sqlx::Error::ColumnNotFound("x".into())));
    }
}
