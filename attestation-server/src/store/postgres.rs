//! PostgreSQL backend: the shared state when several servers serve one pool.

use super::{sql_store, StoreError};
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
    PgStore,
    Postgres,
    "SELECT COALESCE(json_agg(json_build_object('host', host, 'trust', trust, 'verified_at', verified_at, \
     'expires_at', expires_at, 'reasons', reasons::json, 'policy', policy::json)), '[]'::json)::text FROM verdicts WHERE host IN ("
);
