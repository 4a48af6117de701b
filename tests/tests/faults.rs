//! Faults a test can inject by itself (issue 9; the rest are scripts in
//! tests/faults/): the SQLite database locked by another process. Writes
//! are answered `503 storage_unavailable` with a clear message after the
//! busy timeout, nothing is changed, and the server recovers by itself
//! once the lock is gone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use e2e_tests::Pool;
use proto::client::ClientError;
use proto::wire::HostDetail;
use sqlx::{Connection, Executor};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_sqlite_database_is_503_then_recovers() -> anyhow::Result<()> {
    let pool = Pool::start(&[("node1", "device:/dev/null".to_string())], 30, |_| {}).await?;
    let admin = pool.client("admin")?;
    let _: HostDetail = admin
        .post("/v1/hosts", &serde_json::json!({"host": "before"}))
        .await?;

    // Another process takes the write lock and holds it.
    let url = format!("sqlite://{}", pool.path("attest.db").display());
    let mut other = sqlx::SqliteConnection::connect(&url).await?;
    other.execute("BEGIN EXCLUSIVE").await?;
    let started = std::time::Instant::now();
    let refused = admin
        .post::<_, HostDetail>("/v1/hosts", &serde_json::json!({"host": "during"}))
        .await
        .unwrap_err();
    let ClientError::Api {
        status,
        code,
        message,
    } = refused
    else {
        panic!("expected an API error, got {refused}")
    };
    assert_eq!((status, code.as_str()), (503, "storage_unavailable"));
    assert!(message.contains("try again"), "{message}");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(4),
        "the server waited for the lock (busy timeout) before giving up"
    );

    // The lock is released: the server recovers with no restart, and the
    // refused write did not happen.
    other.execute("ROLLBACK").await?;
    other.close().await?;
    let after: HostDetail = admin
        .post("/v1/hosts", &serde_json::json!({"host": "after"}))
        .await?;
    assert_eq!(after.host, "after");
    let gone = admin
        .get::<HostDetail>("/v1/hosts/during")
        .await
        .unwrap_err();
    assert!(
        matches!(gone, ClientError::Api { status: 404, .. }),
        "{gone}"
    );
    pool.stop().await;
    Ok(())
}
