//! Readiness follows the database: a server on PostgreSQL answers
//! `/readyz` 200 while its database is there and 503 `storage_unavailable`
//! once it is gone, while `/healthz` (the process) stays 200, both without a
//! client certificate; `/metrics` keeps its counters and reports the
//! database down. PostgreSQL is expected on 127.0.0.1:5432 (see storage.rs;
//! skipped loudly when absent, except under CI=true).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use attestation_server::config::{Secret, ServerConfig};
use attestation_server::ctl::{self, InitArgs};
use attestation_server::AppState;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use sqlx::Connection;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Trusts the pool CA and offers no client certificate (a kubelet probe).
fn anonymous_client(dir: &Path) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

fn admin_client(dir: &Path) -> reqwest::Client {
    let files = proto::client::TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("admin.pem"),
        key: dir.join("admin.key"),
    };
    reqwest::Client::builder()
        .use_preconfigured_tls(proto::client::rustls_config(&files).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, String) {
    let resp = http.get(url).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_when_the_database_goes_away() {
    let base = std::env::var("ATTEST_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut pg = match sqlx::PgConnection::connect(&base).await {
        Ok(c) => c,
        Err(e) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("\n!!! SKIPPING the readiness test: cannot connect to {base}: {e}\n");
            return;
        }
        Err(e) => panic!("PostgreSQL is required under CI=true: {base}: {e}"),
    };
    let db = format!("attest_ready_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut pg)
        .await
        .unwrap();
    let (server, _) = base.rsplit_once('/').unwrap();
    let db_url = format!("{server}/{db}");

    let dir = tempfile::tempdir().unwrap();
    ctl::init(&InitArgs {
        out: dir.path().to_path_buf(),
        server_port: 1,
        hosts: vec!["node1".into()],
        tctis: vec!["unused".into()],
        interval: 30,
        force: false,
        ek_cas: vec![],
    })
    .unwrap();
    let mut config = ServerConfig::load(Some(&dir.path().join("server.toml"))).unwrap();
    config.database_url = Secret(db_url);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    config.listen = listener.local_addr().unwrap();
    let url = format!("https://127.0.0.1:{}", config.listen.port());
    let state = AppState::new(config).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(attestation_server::serve(listener, state, async {
        let _ = stopped.await;
    }));

    let anon = anonymous_client(dir.path());
    let admin = admin_client(dir.path());
    assert_eq!(
        get(&anon, &format!("{url}/readyz")).await,
        (200, r#"{"status":"ready"}"#.to_string())
    );
    let (status, body) = get(&admin, &format!("{url}/metrics")).await;
    assert_eq!(status, 200);
    assert!(body.contains("\nattestation_database_up 1\n"), "{body}");

    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut pg)
        .await
        .unwrap();

    let (status, body) = get(&anon, &format!("{url}/readyz")).await;
    assert_eq!(status, 503, "{body}");
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["code"], "storage_unavailable", "{body}");
    assert_eq!(
        get(&anon, &format!("{url}/healthz")).await,
        (200, r#"{"status":"ok"}"#.to_string())
    );
    let (status, body) = get(&admin, &format!("{url}/metrics")).await;
    assert_eq!(status, 200);
    assert!(body.contains("\nattestation_database_up 0\n"), "{body}");
    assert!(body.contains("attestation_verification_duration_seconds_count 0\n"));
    assert!(!body.contains("attestation_hosts{"), "{body}");

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
