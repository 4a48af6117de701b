//! Faults a test can inject by itself (issue 9; the rest are scripts in
//! tests/faults/): the SQLite database locked by another process. Writes
//! are answered `503 storage_unavailable` with a clear message after the
//! busy timeout, nothing is changed, and the server recovers by itself
//! once the lock is gone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use e2e_tests::{Agent, Pool};
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

/// What one read of `s` returns, as text (empty when the peer closed).
fn read_text(s: &mut impl std::io::Read) -> std::io::Result<String> {
    let mut buf = vec![0u8; 8192];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Slowloris: a body that never finishes is cut off with `408
/// request_timeout`; at most `max_connections` connections are served at
/// once, the next client waiting until one closes; headers that never end
/// are cut off too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_and_connections_are_limited() -> anyhow::Result<()> {
    use std::io::Write;
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
        Ok(read_text(&mut s)?)
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
        Ok(read_text(&mut s))
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

/// A TCP relay in front of the server that can cut the link: accepted
/// connections are dropped and new ones refused at once while cut (what an
/// agent sees when its network is partitioned from the server).
struct Link {
    port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Link {
    async fn start(target: std::net::SocketAddr) -> anyhow::Result<Link> {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (u, g) = (up.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !u.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let (u, g) = (u.clone(), g.clone());
                let born = g.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let relay = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    let cut = async {
                        while u.load(Ordering::SeqCst) && g.load(Ordering::SeqCst) == born {
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    };
                    tokio::select! { _ = relay => {}, _ = cut => {} }
                });
            }
        });
        Ok(Link {
            port,
            up,
            generation,
        })
    }

    fn set(&self, up: bool) {
        use std::sync::atomic::Ordering;
        self.up.store(up, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// An agent cut off from the server for longer than the freshness window:
/// the host reads `unknown` (its verdict expired, never still `trusted`),
/// and when the link returns the agent attests again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_host_turns_unknown_and_recovers_by_itself() -> anyhow::Result<()> {
    use proto::wire::Trust;
    test_support::require_tools()?;
    let tpm = test_support::SwTpm::start()?;
    let pool = Pool::start(&[("node1", tpm.tcti())], 1, |c| {
        c.ek_ca = tpm.local_ca_certs();
        c.freshness_secs = 3;
    })
    .await?;
    let server: std::net::SocketAddr = pool.url.trim_start_matches("https://").parse()?;
    let link = Link::start(server).await?;
    let mut config = pool.agent_config("node1")?;
    config.server_url = format!("https://127.0.0.1:{}", link.port);
    config.backoff_max_secs = 2;
    let agent = Agent::spawn(config);
    pool.wait_for("node1", "a first verdict", |t| t.verified_at.is_some())
        .await?;
    let _: serde_json::Value = pool
        .client("admin")?
        .post("/v1/hosts/node1/whitelist/accept", &serde_json::json!({}))
        .await?;
    pool.wait_for("node1", "trusted", |t| t.trust == Trust::Trusted)
        .await?;

    // Partition: longer than the freshness window.
    link.set(false);
    let cut_at = chrono::Utc::now();
    let stale = pool
        .wait_for("node1", "unknown once the verdict expired", |t| {
            t.trust == Trust::Unknown
        })
        .await?;
    assert_eq!(stale.reasons[0].code, "verdict_expired", "{stale:?}");
    assert!(stale.verified_at.is_some_and(|v| v <= cut_at));
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let still = pool.trust("node1").await?;
    assert_eq!(still.trust, Trust::Unknown, "no verdict while cut off");

    // The link returns: no manual step, the agent attests again.
    link.set(true);
    let back = pool
        .wait_for("node1", "trusted again after the partition", |t| {
            t.trust == Trust::Trusted && t.verified_at > Some(cut_at)
        })
        .await?;
    assert!(back.reasons.is_empty());
    agent.stop().await?;
    pool.stop().await;
    Ok(())
}

/// The host's clock jumps: the TPM clock (what the verifier checks, never
/// the host's wall clock) is set ten days ahead with TPM2_ClockSet. Forward
/// time is not a replay: the host stays trusted, with no reboot or
/// rollback reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_clock_jumping_forward_is_not_a_replay() -> anyhow::Result<()> {
    use proto::wire::Trust;
    test_support::require_tools()?;
    let tpm = test_support::SwTpm::start()?;
    let pool = Pool::start(&[("node1", tpm.tcti())], 1, |c| {
        c.ek_ca = tpm.local_ca_certs();
    })
    .await?;
    let agent = pool.spawn_agent("node1")?;
    pool.wait_for("node1", "a first verdict", |t| t.verified_at.is_some())
        .await?;
    let _: serde_json::Value = pool
        .client("admin")?
        .post("/v1/hosts/node1/whitelist/accept", &serde_json::json!({}))
        .await?;
    let before = pool
        .wait_for("node1", "trusted", |t| t.trust == Trust::Trusted)
        .await?;

    let out = tpm.run_tool("tpm2_readclock", Vec::<&str>::new())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let clock: u64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("clock: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("tpm2_readclock prints the clock");
    let ten_days_ms = 10 * 24 * 3600 * 1000;
    let set = tpm.run_tool("tpm2_setclock", [(clock + ten_days_ms).to_string()])?;
    assert!(set.status.success(), "{set:?}");
    let jumped_at = chrono::Utc::now();
    assert!(before.verified_at < Some(jumped_at));

    let after = pool
        .wait_for("node1", "a verdict after the jump", |t| {
            t.verified_at > Some(jumped_at)
        })
        .await?;
    let later = pool
        .wait_for("node1", "another verdict", |t| {
            t.verified_at > after.verified_at
        })
        .await?;
    for v in [&after, &later] {
        assert_eq!(v.trust, Trust::Trusted, "{v:?}");
    }
    let events = pool.audit_events().await?;
    assert!(
        !events.iter().any(|e| e["action"] == "monitor"),
        "a clock jump is not a reboot"
    );
    agent.stop().await?;
    pool.stop().await;
    Ok(())
}

/// Graceful shutdown: a request whose body is still arriving when the
/// server is told to stop is read to the end, served and answered; the
/// server stops only after that, and a new client is not served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_request_in_flight() -> anyhow::Result<()> {
    use std::io::Write;
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
        Ok(read_text(&mut stream)?)
    })
    .await??;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("registered-during-shutdown"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    tokio::time::timeout(std::time::Duration::from_secs(10), stopping).await??;
    Ok(())
}
