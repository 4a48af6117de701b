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

/// A TLS connection to the server with the admin certificate, handshake done.
fn tls_connect(
    addr: &str,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> anyhow::Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    let tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(8)))?;
    tcp.set_write_timeout(Some(std::time::Duration::from_secs(8)))?;
    let ip: std::net::IpAddr = addr.split(':').next().unwrap_or_default().parse()?;
    let conn =
        rustls::ClientConnection::new(config, rustls_pki_types::ServerName::IpAddress(ip.into()))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// Slowloris: a body that never finishes is cut off with `408
/// request_timeout`; at most `max_connections` connections are served at
/// once, the next client waiting until one closes; headers that never end
/// are cut off too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_connections_are_limited() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let pool = Pool::start(&[("node1", "device:/dev/null".to_string())], 30, |c| {
        c.request_timeout_secs = 1;
        c.max_connections = 2;
    })
    .await?;
    let addr = pool.url.trim_start_matches("https://").to_string();
    let config = std::sync::Arc::new(proto::client::rustls_config(&pool.files("admin"))?);

    // 1. Headers promise a 100-byte body; one byte arrives, then nothing.
    let (a, c) = (addr.clone(), config.clone());
    let answer = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let mut s = tls_connect(&a, c)?;
        s.write_all(
            b"POST /v1/hosts HTTP/1.1\r\nhost: attest\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
        )?;
        s.flush()?;
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .await??;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    // 2. Two idle connections take both slots: a third client is not
    //    served; once they close, it is.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let (a, c) = (addr.clone(), config.clone());
    let held = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<_>> {
        Ok(vec![tls_connect(&a, c.clone())?, tls_connect(&a, c)?])
    })
    .await??;
    let quick = proto::client::ApiClient::new(
        &pool.url,
        &pool.files("admin"),
        std::time::Duration::from_millis(1500),
    )?;
    let waiting = quick.get::<serde_json::Value>("/v1/status").await;
    assert!(
        waiting.is_err(),
        "served beyond max_connections: {waiting:?}"
    );
    drop(held);
    let mut served = None;
    for _ in 0..20 {
        if let Ok(v) = quick.get::<serde_json::Value>("/v1/status").await {
            served = Some(v);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        served.is_some(),
        "a slot freed up once the idle connections closed"
    );

    // 3. Headers that never end: the server hangs up by itself (10 s for
    //    the headers), before this client's own 20 s read timeout.
    let (a, c) = (addr.clone(), config.clone());
    let cut = tokio::task::spawn_blocking(move || -> anyhow::Result<std::io::Result<String>> {
        let mut s = tls_connect(&a, c)?;
        s.sock
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
        s.write_all(b"GET /v1/status HTTP/1.1\r\nhost: attest\r\n")?;
        s.flush()?;
        let mut buf = vec![0u8; 4096];
        Ok(s.read(&mut buf)
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned()))
    })
    .await??;
    match cut {
        // Closed, or told why before closing; never served.
        Ok(text) => assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "{text}"
        ),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the server never hung up: {e}"
        ),
    }
    pool.stop().await;
    Ok(())
}

/// Graceful shutdown: a request whose body is still arriving when the
/// server is told to stop is read to the end, served and answered; the
/// server stops only after that, and a new client is not served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_request_in_flight() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let pool = Pool::start(&[("node1", "device:/dev/null".to_string())], 30, |_| {}).await?;
    let addr = pool.url.trim_start_matches("https://").to_string();
    let config = std::sync::Arc::new(proto::client::rustls_config(&pool.files("admin"))?);
    let url = pool.url.clone();
    let admin = pool.files("admin");
    let body = br#"{"host": "registered-during-shutdown"}"#;

    // Headers and the first byte of the body, then the server is stopped.
    let a = addr.clone();
    let mut stream = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let mut s = tls_connect(&a, config)?;
        let head = format!(
            "POST /v1/hosts HTTP/1.1\r\nhost: attest\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(&body[..1])?;
        s.flush()?;
        Ok(s)
    })
    .await??;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let stopping = tokio::spawn(pool.stop());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        !stopping.is_finished(),
        "the server waits for the request in flight"
    );
    let late = proto::client::ApiClient::new(&url, &admin, std::time::Duration::from_secs(1))?;
    assert!(
        late.get::<serde_json::Value>("/v1/status").await.is_err(),
        "a stopping server takes no new request"
    );

    // The rest of the body: the request is served and answered.
    let answer = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        stream.write_all(&body[1..])?;
        stream.flush()?;
        let mut buf = vec![0u8; 8192];
        let n = stream.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
    .await??;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("registered-during-shutdown"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    tokio::time::timeout(std::time::Duration::from_secs(10), stopping).await??;
    Ok(())
}
