//! SQLite backend: one file, zero set-up; the default.
//!
//! Most statements run through sqlx. The attestation path's two hot ones do
//! not: the host-record read and the group-commit writer run on rusqlite
//! connections (the same libsqlite3), called synchronously. sqlx runs each
//! SQLite connection on a thread of its own and hands every statement to it
//! and back; for a point read of a few microseconds those two thread
//! switches, and the eight of every committed batch, cost more than the SQL
//! (docs/benchmarks.md).

use super::writer::{self, sql, Pending, Write, Written, ROWS_PER_STATEMENT};
use super::{sql_store, HostColumns, StoreError};
use rusqlite::types::ToSql;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

pub struct SqliteStore {
    pool: SqlitePool,
    gate: Arc<super::WriteGate>,
    writer: writer::Writer,
    whitelists: super::WhitelistCache,
    policies: super::PolicyCache,
    readers: Readers,
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        // WAL lets readers proceed while one writer commits; NORMAL sync in
        // WAL mode survives a process crash (kill -9) without losing commits.
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let path = options.get_filename().to_path_buf();
        if path.as_os_str().is_empty() || path.to_string_lossy().starts_with("file:sqlx-in-memory")
        {
            // The attestation path's own connections must see the same
            // database as the pool's: a file.
            return Err(StoreError::UnsupportedUrl(format!(
                "{url} (an in-memory database: use sqlite://PATH)"
            )));
        }
        // No liveness ping when a connection is taken from the pool: an
        // in-process SQLite connection cannot have gone away, and sqlx's
        // ping is a round trip to the connection's worker thread.
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        let gate = Arc::new(super::WriteGate::exclusive());
        let (writer, queue) = writer::Writer::channel();
        let conn = open(&path)?;
        let thread_gate = gate.clone();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || write_thread(conn, &thread_gate, queue))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the writer thread: {e}")))?;
        Ok(Self {
            pool,
            gate,
            writer,
            whitelists: super::WhitelistCache::default(),
            policies: super::PolicyCache::default(),
            readers: Readers {
                path,
                idle: Mutex::new(Vec::new()),
            },
        })
    }

    async fn host_columns(&self, host: &str) -> Result<Option<HostColumns>, StoreError> {
        self.readers.with(|conn| read_host(conn, host))
    }
}

sql_store!(
    SqliteStore,
    Sqlite,
    "SELECT json_group_array(json_object('host', host, 'trust', trust, 'verified_at', verified_at, \
     'expires_at', expires_at, 'reasons', json(reasons), 'policy', json(policy))) FROM verdicts WHERE host IN ("
);

/// A connection to the database file that sqlx made and migrated, set up
/// as sqlx sets up its own.
fn open(path: &Path) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // The multi-row statements come in up to ROWS_PER_STATEMENT sizes.
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Most idle read connections kept.
const MAX_READERS: usize = 8;

/// Connections for the attestation path's reads, run on the caller's
/// thread. A reader in WAL mode does not wait for the writer: the statement
/// is a point lookup of microseconds, shorter than the hand-off it saves.
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl Readers {
    fn with<T>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let idle = || {
            self.idle
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        let taken = idle().pop();
        let conn = match taken {
            Some(c) => c,
            None => open(&self.path)?,
        };
        let result = read(&conn);
        let mut idle = idle();
        if idle.len() < MAX_READERS {
            idle.push(conn);
        }
        Ok(result?)
    }
}

fn read_host(conn: &Connection, host: &str) -> Result<Option<HostColumns>, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(HostColumns::QUERY)?;
    stmt.query_row([host], |r| {
        Ok(HostColumns {
            name: r.get(0)?,
            registered_at: r.get(1)?,
            ak_public: r.get(2)?,
            ak_name: r.get(3)?,
            group_name: r.get(4)?,
            last_pcrs: r.get(5)?,
            ek_name: r.get(6)?,
            ek_certified: r.get(7)?,
            ak_activated: r.get(8)?,
            rekey_allowed: r.get(9)?,
            clock: r.get(10)?,
            reset_count: r.get(11)?,
            restart_count: r.get(12)?,
            policy_epoch: r.get(13)?,
            ima_state: r.get(14)?,
            last_uefi_log: r.get(15)?,
            trust: r.get(16)?,
            verified_at: r.get(17)?,
            expires_at: r.get(18)?,
            reasons: r.get(19)?,
            policy: r.get(20)?,
            policy_generation: r.get(21)?,
            challenge_key_generation: r.get(22)?,
        })
    })
    .optional()
}

// ---- group commit (see `store::writer`) ----

/// True when `e` says the database cannot be written now (locked, full,
/// unreadable, read-only) rather than that a write is wrong: such a batch
/// fails whole instead of being retried write by write.
fn is_unavailable(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    match e {
        rusqlite::Error::SqliteFailure(f, _) => matches!(
            f.code,
            DatabaseBusy | DatabaseLocked | ReadOnly | SystemIoFailure | DiskFull | CannotOpen
        ),
        _ => false,
    }
}

/// The writer thread: takes the queued writes in batches until every
/// handle is dropped. A thread, not a task: it runs SQLite synchronously,
/// and waiting for the next batch is all it does besides.
fn write_thread(
    mut conn: Connection,
    gate: &super::WriteGate,
    mut queue: tokio::sync::mpsc::Receiver<Pending>,
) {
    let mut batch = Vec::with_capacity(writer::MAX_BATCH);
    while queue.blocking_recv_many(&mut batch, writer::MAX_BATCH) > 0 {
        let (writes, replies): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
        let _turn = gate.blocking_lock();
        match write_batch(&mut conn, &writes) {
            Ok(done) => writer::answer(replies, done),
            Err(e) if writes.len() > 1 && !is_unavailable(&e) => {
                // One write spoiled the batch: give each its own transaction.
                tracing::debug!(error = %e, writes = writes.len(), "batch failed; writing one by one");
                for (write, reply) in writes.into_iter().zip(replies) {
                    let one = write_batch(&mut conn, std::slice::from_ref(&write));
                    let _ = reply.send(writer::only(one.map_err(StoreError::from)));
                }
            }
            Err(e) => writer::fail(replies, &e),
        }
    }
}

/// `prefix`, then `rows` groups of `columns` placeholders.
fn values(prefix: &str, rows: usize, columns: usize) -> String {
    let group = format!("({})", vec!["?"; columns].join(", "));
    format!("{prefix}VALUES {}", vec![group; rows].join(", "))
}

/// Apply `writes` in one transaction; the answers, in `writes`' order. The
/// same statements as the PostgreSQL writer's; no row locks to order, as
/// a SQLite write locks the whole database.
fn write_batch(conn: &mut Connection, writes: &[Write]) -> Result<Vec<Written>, rusqlite::Error> {
    use std::collections::HashSet;
    let mut done = vec![Written::Done; writes.len()];
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let order = writer::batch_order(writes);

    // Used nonces: an exclusive use of one stored before, by an earlier
    // batch or earlier in this one, stores nothing else.
    for round in writer::nonce_rounds(writes) {
        for chunk in round.chunks(ROWS_PER_STATEMENT) {
            let rows = writer::nonce_uses(writes, chunk);
            let mut params: Vec<&dyn ToSql> = Vec::with_capacity(rows.len() * 6);
            for (_, a, n) in &rows {
                params.extend([
                    &n.nonce as &dyn ToSql,
                    &a.host,
                    &"",
                    &a.verified_at,
                    &n.expires_at,
                    &a.verified_at,
                ]);
            }
            let mut stmt =
                tx.prepare_cached(&(values(sql::USE_NONCES, rows.len(), 6) + sql::USE_NONCES_END))?;
            let stored: HashSet<String> = stmt
                .query_map(params.as_slice(), |r| r.get::<_, String>(0))?
                .collect::<Result<_, _>>()?;
            for &(i, _, n) in &rows {
                if n.exclusive && !stored.contains(&n.nonce) {
                    done[i] = Written::NonceUsed;
                }
            }
        }
    }

    // Host rows: one UPDATE per round of distinct hosts checks each
    // verdict's policy epoch and sets every column that changes.
    let updates = writer::host_updates(writes, &order, &mut done);
    for round in writer::distinct_rounds(&updates, |i| writer::host_of(writes, i)) {
        let rows = writer::attestations(writes, &round);
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let clocks: Vec<_> = chunk.iter().map(|(_, a)| a.clock.unzip3()).collect();
            let mut params: Vec<&dyn ToSql> = Vec::with_capacity(chunk.len() * 8);
            for ((_, a), (clock, reset, restart)) in chunk.iter().zip(&clocks) {
                params.extend([
                    &a.last_pcrs as &dyn ToSql,
                    clock,
                    reset,
                    restart,
                    &a.ima_state,
                    &a.uefi_log,
                    &a.host,
                    &a.epoch,
                ]);
            }
            let mut stmt = tx.prepare_cached(
                &(values(sql::UPDATE_HOSTS, chunk.len(), 8) + sql::UPDATE_HOSTS_END),
            )?;
            let updated: HashSet<String> = stmt
                .query_map(params.as_slice(), |r| r.get::<_, String>(0))?
                .collect::<Result<_, _>>()?;
            for &(i, a) in chunk {
                done[i] = Written::Recorded(a.epoch.is_none() || updated.contains(&a.host));
            }
        }
    }

    let released = writer::released_nonces(writes, &updates, &done);
    for chunk in released.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "{}{})",
            sql::RELEASE_NONCES,
            vec!["?"; chunk.len()].join(", ")
        );
        tx.prepare_cached(&sql)?
            .execute(rusqlite::params_from_iter(chunk.iter()))?;
    }

    let (verdicts, events) = writer::stored(writes, &order, &done);
    for chunk in verdicts.chunks(ROWS_PER_STATEMENT) {
        let mut params: Vec<&dyn ToSql> = Vec::with_capacity(chunk.len() * 6);
        for a in chunk {
            params.extend([
                &a.host as &dyn ToSql,
                &a.trust,
                &a.verified_at,
                &a.expires_at,
                &a.reasons,
                &a.policy,
            ]);
        }
        tx.prepare_cached(&(values(sql::VERDICTS, chunk.len(), 6) + sql::VERDICTS_END))?
            .execute(params.as_slice())?;
    }
    append_batch_events(&tx, &events)?;
    tx.commit()?;
    Ok(done)
}

/// Append events, in order, to the outbox and to their servers' hash
/// chains (see the sqlx `append_events` of `sql_store!`, which the other
/// writes use), then write the heads back.
fn append_batch_events(
    tx: &rusqlite::Transaction<'_>,
    events: &[&super::NewEvent],
) -> Result<(), rusqlite::Error> {
    let metas: Vec<_> = events
        .iter()
        .map(|e| crate::audit::chain::EventMeta::of(&e.body))
        .collect();
    let mut heads = super::ChainHeads::default();
    for server in heads.unread(&metas) {
        let head = tx.prepare_cached(sql::CHAIN_HEAD)?.query_row(
            rusqlite::params![server, crate::audit::chain::GENESIS],
            |r| {
                Ok(super::ChainHead {
                    server: server.to_string(),
                    seq: r.get(0)?,
                    hash: r.get(1)?,
                    count: r.get(2)?,
                })
            },
        )?;
        heads.0.insert(server.to_string(), head);
    }
    let links = heads
        .link(&metas)
        .ok_or_else(|| rusqlite::Error::InvalidQuery)?;
    let rows: Vec<_> = events.iter().zip(metas.iter().zip(&links)).collect();
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let times: Vec<i64> = chunk.iter().map(|(e, _)| super::micros(e.time)).collect();
        let mut params: Vec<&dyn ToSql> = Vec::with_capacity(chunk.len() * 14);
        for ((event, (meta, link)), time) in chunk.iter().zip(&times) {
            params.extend([
                &event.id as &dyn ToSql,
                time,
                &event.host,
                &event.body,
                &meta.server,
                &link.index,
                &link.prev_hash,
                &link.hash,
                &meta.action,
                &meta.outcome,
                &meta.initiator_id,
                &meta.initiator_name,
                &meta.target_id,
                &meta.target_name,
            ]);
        }
        let mut stmt =
            tx.prepare_cached(&(values(sql::EVENTS, chunk.len(), 14) + sql::EVENTS_END))?;
        let mut rows = stmt.query(params.as_slice())?;
        while let Some(r) = rows.next()? {
            heads.saw(&r.get::<_, String>(1)?, r.get(0)?);
        }
    }
    for head in heads.0.values() {
        tx.prepare_cached(sql::SAVE_HEAD)?
            .execute(rusqlite::params![
                head.seq,
                head.hash,
                head.count,
                head.server
            ])?;
    }
    Ok(())
}

/// The three parts of a stored TPM clock, each `None` when there is none.
trait Unzip3 {
    fn unzip3(self) -> (Option<i64>, Option<i64>, Option<i64>);
}

impl Unzip3 for Option<(i64, i64, i64)> {
    fn unzip3(self) -> (Option<i64>, Option<i64>, Option<i64>) {
        match self {
            Some((a, b, c)) => (Some(a), Some(b), Some(c)),
            None => (None, None, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_row_placeholders() {
        assert_eq!(
            values("INSERT INTO t (a, b) ", 1, 2),
            "INSERT INTO t (a, b) VALUES (?, ?)"
        );
        assert_eq!(values("X ", 3, 1), "X VALUES (?), (?), (?)");
    }

    #[test]
    fn unavailable_is_told_from_a_bad_write() {
        let failure = |code| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        for code in [
            rusqlite::ffi::SQLITE_BUSY,
            rusqlite::ffi::SQLITE_LOCKED,
            rusqlite::ffi::SQLITE_FULL,
            rusqlite::ffi::SQLITE_IOERR_WRITE,
            rusqlite::ffi::SQLITE_READONLY,
            rusqlite::ffi::SQLITE_CANTOPEN,
        ] {
            assert!(is_unavailable(&failure(code)), "{code}");
        }
        assert!(!is_unavailable(&failure(
            rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
        )));
        assert!(!is_unavailable(&rusqlite::Error::QueryReturnedNoRows));
    }

    #[tokio::test]
    async fn an_in_memory_database_is_refused() {
        // The pool and the attestation path's own connections would each
        // see a database of their own.
        let e = SqliteStore::connect("sqlite::memory:").await.err();
        assert!(matches!(e, Some(StoreError::UnsupportedUrl(_))), "{e:?}");
    }
}
