//! PostgreSQL backend: the shared state when several servers serve one pool.

use super::{sql_store, HostColumns, StoreError};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};
use std::time::Duration;

pub struct PgStore {
    pool: PgPool,
    gate: std::sync::Arc<super::WriteGate>,
    writer: super::writer::Writer,
    whitelists: super::WhitelistCache,
    policies: super::PolicyCache,
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        // The migrator takes an advisory lock, so servers starting together
        // against one database migrate it once.
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        let gate = std::sync::Arc::new(super::WriteGate::none());
        let (writer, queue) = super::writer::Writer::channel();
        tokio::spawn(write_loop(pool.clone(), queue));
        Ok(Self {
            pool,
            gate,
            writer,
            whitelists: super::WhitelistCache::default(),
            policies: super::PolicyCache::default(),
        })
    }

    async fn host_columns(&self, host: &str) -> Result<Option<HostColumns>, StoreError> {
        use sqlx::Row;
        let Some(r) = sqlx::query(HostColumns::QUERY)
            .bind(host)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        Ok(Some(HostColumns {
            name: r.try_get(0)?,
            registered_at: r.try_get(1)?,
            ak_public: r.try_get(2)?,
            ak_name: r.try_get(3)?,
            group_name: r.try_get(4)?,
            last_pcrs: r.try_get(5)?,
            ek_name: r.try_get(6)?,
            ek_certified: r.try_get(7)?,
            ak_activated: r.try_get(8)?,
            rekey_allowed: r.try_get(9)?,
            clock: r.try_get(10)?,
            reset_count: r.try_get(11)?,
            restart_count: r.try_get(12)?,
            policy_epoch: r.try_get(13)?,
            ima_state: r.try_get(14)?,
            last_uefi_log: r.try_get(15)?,
            trust: r.try_get(16)?,
            verified_at: r.try_get(17)?,
            expires_at: r.try_get(18)?,
            reasons: r.try_get(19)?,
            policy: r.try_get(20)?,
            policy_generation: r.try_get(21)?,
            challenge_key_generation: r.try_get(22)?,
        }))
    }
}

sql_store!(
    PgStore,
    Postgres,
    "SELECT COALESCE(json_agg(json_build_object('host', host, 'trust', trust, 'verified_at', verified_at, \
     'expires_at', expires_at, 'reasons', reasons::json, 'policy', policy::json)), '[]'::json)::text FROM verdicts WHERE host IN ("
);

// ---- group commit (see `store::writer`) ----

use super::writer::{self, sql, Pending, Write, Written, ROWS_PER_STATEMENT};

/// The writer task: takes the queued writes in batches until every handle
/// is dropped.
async fn write_loop(pool: PgPool, mut queue: tokio::sync::mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(writer::MAX_BATCH);
    while queue.recv_many(&mut batch, writer::MAX_BATCH).await > 0 {
        let (writes, replies): (Vec<_>, Vec<_>) = batch.drain(..).unzip();
        match write_batch(&pool, &writes).await {
            Ok(done) => writer::answer(replies, done),
            Err(e) if writes.len() > 1 && !writer::is_unavailable(&e) => {
                // One write spoiled the batch: give each its own transaction.
                tracing::debug!(error = %e, writes = writes.len(), "batch failed; writing one by one");
                for (write, reply) in writes.into_iter().zip(replies) {
                    let one = write_batch(&pool, std::slice::from_ref(&write)).await;
                    let _ = reply.send(writer::only(one.map_err(StoreError::from)));
                }
            }
            Err(e) => writer::fail(replies, &e),
        }
    }
}

/// Lock the rows of `table` whose `column` is one of `keys`, in key order:
/// a multi-row UPDATE locks rows in whatever order its plan visits them,
/// and two transactions that lock the same rows in different orders can
/// deadlock. Every batch and every policy change lock rows sorted, so none
/// waits on another in a cycle.
async fn lock_rows<'k>(
    conn: &mut sqlx::PgConnection,
    table: &str,
    column: &str,
    keys: impl Iterator<Item = &'k str>,
) -> Result<(), sqlx::Error> {
    let mut keys: Vec<&str> = keys.collect();
    keys.sort_unstable();
    keys.dedup();
    if keys.len() < 2 {
        return Ok(()); // one row: its UPDATE locks it
    }
    for chunk in keys.chunks(ROWS_PER_STATEMENT) {
        let mut qb = sqlx::QueryBuilder::<Postgres>::new(format!(
            "SELECT {column} FROM {table} WHERE {column} IN ("
        ));
        let mut list = qb.separated(", ");
        for key in chunk {
            list.push_bind(*key);
        }
        qb.push(format!(") ORDER BY {column} FOR UPDATE"));
        qb.build().persistent(false).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Apply `writes` in one transaction; the answers, in `writes`' order.
///
/// One multi-row statement per kind of write (chunked at
/// [`ROWS_PER_STATEMENT`]), not one per write: every statement is a round
/// trip to PostgreSQL, and those round trips, not the SQL, were most of
/// the attestation path's cost (docs/benchmarks.md).
async fn write_batch(pool: &PgPool, writes: &[Write]) -> Result<Vec<Written>, sqlx::Error> {
    use sqlx::Row;
    use std::collections::HashSet;
    let mut done = vec![Written::Done; writes.len()];
    let mut tx = pool.begin().await?;
    // Locks are taken in one order (used nonces by nonce, host rows by
    // name, then verdicts and the chain head): see `writer::batch_order`.
    let order = writer::batch_order(writes);

    // Used nonces: an exclusive use of one stored before, by an earlier
    // batch or earlier in this one, stores nothing else.
    for round in writer::nonce_rounds(writes) {
        for chunk in round.chunks(ROWS_PER_STATEMENT) {
            let rows = writer::nonce_uses(writes, chunk);
            let mut qb = sqlx::QueryBuilder::<Postgres>::new(sql::USE_NONCES);
            qb.push_values(&rows, |mut row, &(_, a, n)| {
                row.push_bind(n.nonce.as_str())
                    .push_bind(a.host.as_str())
                    .push_bind("")
                    .push_bind(a.verified_at)
                    .push_bind(n.expires_at)
                    .push_bind(a.verified_at);
            });
            qb.push(sql::USE_NONCES_END);
            let stored: HashSet<String> = qb
                .build()
                .persistent(rows.len() == 1)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>("nonce"))
                .collect::<Result<_, _>>()?;
            for &(i, _, n) in &rows {
                if n.exclusive && !stored.contains(&n.nonce) {
                    done[i] = Written::NonceUsed;
                }
            }
        }
    }

    // Host rows: one UPDATE per round of distinct hosts checks each
    // verdict's policy epoch (which locks the row) and sets every column
    // that changes; a host twice in the batch is updated in a second
    // round, in arrival order.
    let updates = writer::host_updates(writes, &order, &mut done);
    let host_of = |i: usize| writer::host_of(writes, i);
    lock_rows(
        &mut tx,
        "hosts",
        "name",
        updates.iter().map(|&i| host_of(i)),
    )
    .await?;
    for round in writer::distinct_rounds(&updates, host_of) {
        let rows = writer::attestations(writes, &round);
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut qb = sqlx::QueryBuilder::<Postgres>::new(sql::UPDATE_HOSTS);
            qb.push_values(chunk, |mut row, &(_, a)| {
                row.push_bind(a.last_pcrs.as_deref())
                    .push_bind(a.clock.map(|c| c.0))
                    .push_bind(a.clock.map(|c| c.1))
                    .push_bind(a.clock.map(|c| c.2))
                    .push_bind(a.ima_state.as_deref())
                    .push_bind(a.uefi_log.as_deref())
                    .push_bind(a.host.as_str())
                    .push_bind(a.epoch);
            });
            qb.push(sql::UPDATE_HOSTS_END);
            let updated: HashSet<String> = qb
                .build()
                .persistent(chunk.len() == 1)
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>("name"))
                .collect::<Result<_, _>>()?;
            for &(i, a) in chunk {
                done[i] = Written::Recorded(a.epoch.is_none() || updated.contains(&a.host));
            }
        }
    }

    let released = writer::released_nonces(writes, &updates, &done);
    for chunk in released.chunks(ROWS_PER_STATEMENT) {
        let mut qb = sqlx::QueryBuilder::<Postgres>::new(sql::RELEASE_NONCES);
        let mut list = qb.separated(", ");
        for nonce in chunk {
            list.push_bind(*nonce);
        }
        qb.push(")");
        qb.build().persistent(false).execute(&mut *tx).await?;
    }

    let (verdicts, events) = writer::stored(writes, &order, &done);
    for chunk in verdicts.chunks(ROWS_PER_STATEMENT) {
        let mut qb = sqlx::QueryBuilder::<Postgres>::new(sql::VERDICTS);
        qb.push_values(chunk, |mut row, a| {
            row.push_bind(a.host.as_str())
                .push_bind(a.trust)
                .push_bind(a.verified_at)
                .push_bind(a.expires_at)
                .push_bind(a.reasons.as_str())
                .push_bind(a.policy.as_deref());
        });
        qb.push(sql::VERDICTS_END);
        qb.build()
            .persistent(chunk.len() == 1)
            .execute(&mut *tx)
            .await?;
    }
    let mut heads = super::ChainHeads::default();
    append_events(&mut tx, &mut heads, &events).await?;
    save_heads(&mut tx, &heads).await?;
    tx.commit().await?;
    Ok(done)
}
