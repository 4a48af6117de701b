//! SQLite backend: one file, zero set-up; the default.

use super::{sql_store, StoreError};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool};
use std::str::FromStr;
use std::time::Duration;

pub struct SqliteStore {
    pool: SqlitePool,
    gate: std::sync::Arc<super::WriteGate>,
    writer: super::writer::Writer,
    whitelists: super::WhitelistCache,
    policies: super::PolicyCache,
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
            .busy_timeout(Duration::from_secs(5));
        // No liveness ping when a connection is taken from the pool: an
        // in-process SQLite connection cannot have gone away, and sqlx's
        // ping is a round trip to the connection's worker thread (two
        // context switches, on every read of the attestation path).
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        let gate = std::sync::Arc::new(super::WriteGate::exclusive());
        let (writer, queue) = super::writer::Writer::channel();
        tokio::spawn(write_loop(pool.clone(), gate.clone(), queue));
        Ok(Self {
            pool,
            gate,
            writer,
            whitelists: super::WhitelistCache::default(),
            policies: super::PolicyCache::default(),
        })
    }
}

sql_store!(
    SqliteStore,
    Sqlite,
    "SELECT json_group_array(json_object('host', host, 'trust', trust, 'verified_at', verified_at, \
     'expires_at', expires_at, 'reasons', json(reasons), 'policy', json(policy))) FROM verdicts WHERE host IN ("
);
