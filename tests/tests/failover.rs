//! Several servers, one PostgreSQL, no coordinator (issue 8): a real agent
//! given both servers' URLs attests through the first; the first is killed
//! mid-run; the agent fails over to the second by itself, which accepts its
//! nonces, verdicts and events in the same database; the audit trail holds
//! both servers' events, each server's chain intact. A scheduler filter
//! given both URLs fails over the same way.
//!
//! Needs PostgreSQL on 127.0.0.1:5432 (ATTEST_TEST_PG_URL overrides); fails
//! under CI=true without it, skips loudly elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use attestation_server::config::{Secret, ServerConfig};
use attestation_server::AppState;
use e2e_tests::{Agent, Pool};
use proto::client::ApiClient;
use proto::wire::{HostTrust, Trust};
use sqlx::Connection;
use std::time::Duration;
use test_support::SwTpm;

async fn fresh_database() -> anyhow::Result<Option<(String, String, String)>> {
    let base = std::env::var("ATTEST_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut admin = match sqlx::PgConnection::connect(&base).await {
        Ok(c) => c,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("\n!!! SKIPPING the failover test: cannot connect to {base}: {e}\n");
            return Ok(None);
        }
        Err(e) => panic!("PostgreSQL is required under CI=true: {base}: {e}"),
    };
    let db = format!("attest_failover_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await?;
    let (server, _) = base.rsplit_once('/').expect("a database path");
    Ok(Some((format!("{server}/{db}"), base, db)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_fails_over_between_servers_sharing_postgresql() -> anyhow::Result<()> {
    test_support::require_tools()?;
    let Some((url, admin_url, db)) = fresh_database().await? else {
        return Ok(());
    };
    let tpm = SwTpm::start()?;
    let pg = url.clone();
    let mut pool = Pool::start(&[("node1", tpm.tcti())], 1, |c| {
        c.ek_ca = tpm.local_ca_certs();
        c.database_url = Secret(pg);
        c.name = "server-a".into();
        c.audit.trust_scan_secs = 1;
    })
    .await?;
    // Server B: the same pool (CA, certificates), its own listener, name and
    // audit file, the same database.
    let mut config_b = ServerConfig::load(Some(&pool.path("server.toml")))?;
    config_b.ek_ca = tpm.local_ca_certs();
    config_b.database_url = Secret(url.clone());
    config_b.name = "server-b".into();
    config_b.audit.trust_scan_secs = 1;
    config_b.audit_file = Some(pool.path("audit-b.jsonl"));
    config_b.audit.file = None;
    let listener_b = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url_b = format!("https://127.0.0.1:{}", listener_b.local_addr()?.port());
    config_b.listen = listener_b.local_addr()?;
    let state_b = AppState::new(config_b).await?;
    let (stop_b, stopped_b) = tokio::sync::oneshot::channel::<()>();
    let server_b = tokio::spawn(attestation_server::serve(
        listener_b,
        state_b.clone(),
        async {
            let _ = stopped_b.await;
        },
    ));

    let mut agent_config = pool.agent_config("node1")?;
    agent_config.server_url = format!("{},{}", pool.url, url_b);
    let agent = Agent::spawn(agent_config);

    pool.wait_for("node1", "a first verdict", |t| t.verified_at.is_some())
        .await?;
    let admin_b = ApiClient::new(&url_b, &pool.files("admin"), Duration::from_secs(10))?;
    // An admin change made on B is seen on A at once (one database).
    let _: serde_json::Value = admin_b
        .post("/v1/hosts/node1/whitelist/accept", &serde_json::json!({}))
        .await?;
    let on_a = pool
        .wait_for("node1", "trusted, read on server A", |t| {
            t.trust == Trust::Trusted
        })
        .await?;

    // Attack: evidence for a nonce server A issued, accepted once at B,
    // then replayed at A: refused there as a replay (one nonce table).
    let agent_cfg = pool.agent_config("node1")?;
    let worker = host_agent::tpm::Tpm::start(&tpm.tcti(), agent_cfg.ak_type, &agent_cfg.state_dir)?;
    let agent_a = pool.client("agent-node1")?;
    let agent_b = ApiClient::new(&url_b, &pool.files("agent-node1"), Duration::from_secs(10))?;
    let ch: proto::wire::Challenge = agent_a
        .post("/v1/agents/node1/challenge", &serde_json::json!({}))
        .await?;
    let q = worker
        .quote(&hex::decode(&ch.nonce)?, &ch.pcr_selection)
        .await?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let evidence = proto::wire::Evidence {
        nonce: ch.nonce.clone(),
        attest: base64::Engine::encode(&b64, &q.attest),
        signature: base64::Engine::encode(&b64, &q.signature),
        pcrs: q.pcrs,
        uefi_log: None,
        ima: None,
    };
    let at_b: HostTrust = agent_b.post("/v1/agents/node1/evidence", &evidence).await?;
    assert_eq!(at_b.trust, Trust::Trusted, "B accepts A's nonce: {at_b:?}");
    let replay = agent_a
        .post::<_, HostTrust>("/v1/agents/node1/evidence", &evidence)
        .await
        .unwrap_err();
    assert!(
        matches!(&replay, proto::client::ClientError::Api { status: 422, code, .. } if code == "nonce_replayed"),
        "{replay}"
    );
    worker.shutdown().await;

    // Kill A mid-run. The agent's next attestation finds A unreachable and
    // goes to B by itself.
    pool.kill_server().await;
    let killed_at = chrono::Utc::now();
    let mut after = None;
    for _ in 0..300 {
        let t: HostTrust = admin_b.get("/v1/hosts/node1/trust").await?;
        if t.verified_at.is_some_and(|v| v > killed_at) {
            after = Some(t);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = after.expect("the agent attested through server B after A died");
    assert_eq!(after.trust, Trust::Trusted, "{after:?}");
    assert!(after.verified_at > on_a.verified_at);

    // A scheduler filter given both URLs, A first, gets its answer from B;
    // one given only A cannot reach a server and lets no host through.
    let filter_for = |server_url: String| {
        scheduler_filter::TrustFilter::new(&scheduler_filter::FilterConfig {
            server_url,
            tls: pool.files("scheduler"),
            request_timeout_secs: 5,
            max_cache_secs: 0,
            extender: Default::default(),
        })
    };
    let candidates = vec!["node1".to_string()];
    let both = filter_for(format!("{},{}", pool.url, url_b))?;
    let decided = both.decide(&candidates, Trust::Trusted).await;
    assert!(decided.iter().all(|d| d.allowed), "{decided:?}");
    assert_eq!(decided.len(), 1);
    let only_a = filter_for(pool.url.clone())?;
    let refused = only_a.decide(&candidates, Trust::Trusted).await;
    assert!(refused.iter().all(|d| !d.allowed), "{refused:?}");

    // Both servers' trust scanners watched node1; B's (A is gone) reports
    // it trusted within a scan or two.
    let node1_changes = |events: &[attestation_server::store::StoredEvent]| -> Vec<String> {
        events
            .iter()
            .filter(|e| attestation_server::audit::kind_of(&e.body) == "trust_change")
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(&e.body).ok())
            .filter(|e| e["target"]["name"] == "node1")
            .filter_map(|e| e["reason"]["reasonCode"].as_str().map(String::from))
            .collect()
    };
    let mut events = Vec::new();
    for _ in 0..100 {
        events = state_b.store.stored_events_after(0, 100_000).await?;
        if node1_changes(&events)
            .iter()
            .any(|c| c.ends_with("_to_trusted"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Both servers' events are in the one database, each chain intact.
    let observers: std::collections::BTreeSet<&str> =
        events.iter().map(|e| e.server.as_str()).collect();
    assert!(
        observers.contains("server-a") && observers.contains("server-b"),
        "{observers:?}"
    );
    let evaluated_by_b = events
        .iter()
        .filter(|e| e.server == "server-b" && e.body.contains("\"action\":\"evaluate\""))
        .count();
    assert!(evaluated_by_b >= 1, "server B judged the agent's evidence");
    for server in ["server-a", "server-b"] {
        let chain: Vec<_> = events.iter().filter(|e| e.server == server).collect();
        for pair in chain.windows(2) {
            assert_eq!(
                pair[1].prev_hash, pair[0].hash,
                "{server}'s chain is unbroken"
            );
            assert_eq!(pair[1].chain_index, pair[0].chain_index + 1);
        }
    }
    // Each trust change was reported once, so the changes, in database
    // order, follow on from each other.
    let changes = node1_changes(&events);
    assert!(
        changes
            .first()
            .is_some_and(|c| c.starts_with("unknown_to_")),
        "{changes:?}"
    );
    assert!(
        changes.iter().any(|c| c.ends_with("_to_trusted")),
        "{changes:?}"
    );
    for pair in changes.windows(2) {
        let (_, to) = pair[0].split_once("_to_").unwrap_or_default();
        let (from, _) = pair[1].split_once("_to_").unwrap_or_default();
        assert_eq!(
            from, to,
            "trust changes reported twice or out of order: {changes:?}"
        );
    }

    agent.stop().await?;
    let _ = stop_b.send(());
    server_b.await??;
    drop(state_b);
    pool.stop().await;
    let mut admin = sqlx::PgConnection::connect(&admin_url).await?;
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    Ok(())
}
