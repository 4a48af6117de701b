//! `attestctl check`, the built binary, against an in-process server over
//! mutual TLS: the plugin exit codes 0/1/2 follow the untrusted-host
//! thresholds, and 3 (UNKNOWN) when the server is down or the call is wrong.
//! Verdicts are stored through the Store trait (no TPM is needed to count).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use attestation_server::config::ServerConfig;
use attestation_server::ctl::{self, InitArgs};
use attestation_server::store::AttestationRecord;
use attestation_server::AppState;
use chrono::{Duration, Utc};
use proto::wire::{HostTrust, Trust};
use std::path::Path;
use std::sync::Arc;

struct Server {
    url: String,
    state: Arc<AppState>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(dir: &Path) -> Server {
    ctl::init(&InitArgs {
        out: dir.to_path_buf(),
        server_port: 1,
        hosts: vec!["node1".into()],
        tctis: vec!["unused".into()],
        interval: 30,
        force: false,
        ek_cas: vec![],
    })
    .unwrap();
    let mut config = ServerConfig::load(Some(&dir.join("server.toml"))).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    config.listen = listener.local_addr().unwrap();
    let url = format!("https://127.0.0.1:{}", config.listen.port());
    let state = AppState::new(config).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    let task = tokio::spawn(async move {
        let _ = attestation_server::serve(listener, st, async {
            let _ = stopped.await;
        })
        .await;
    });
    Server {
        url,
        state,
        stop,
        task,
    }
}

async fn store_verdict(state: &AppState, host: &str, trust: Trust) {
    let now = Utc::now();
    state.store.register_host(host, now).await.unwrap();
    let v = HostTrust {
        host: host.into(),
        trust,
        verified_at: Some(now),
        expires_at: Some(now + Duration::minutes(10)),
        reasons: vec![],
        policy: None,
    };
    let rec = AttestationRecord::verdict_only(&v);
    state.store.record_attestation(host, rec).await.unwrap();
}

/// Run `attestctl --config admin.toml check ARGS` against `url`:
/// (exit code, stdout).
async fn check(dir: &Path, url: &str, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_attestctl"))
        .arg("--config")
        .arg(dir.join("admin.toml"))
        .arg("check")
        .args(args)
        .env("ATTESTCTL_SERVER_URL", url)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    (out.status.code().unwrap(), stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exit_codes_follow_the_thresholds_and_unknown_when_down() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let d = dir.path();
    store_verdict(&server.state, "node1", Trust::Trusted).await;
    store_verdict(&server.state, "node2", Trust::Trusted).await;
    server
        .state
        .store
        .register_host("node3", Utc::now())
        .await
        .unwrap();

    let (code, line) = check(d, &server.url, &[]).await;
    assert_eq!(code, 0, "{line}");
    assert!(
        line.starts_with("ATTESTATION OK - 2 trusted, 0 untrusted, 1 unknown hosts on "),
        "{line}"
    );
    assert!(line.contains(" | trusted=2;;;0 untrusted=0;0;;0 unknown=1;;;0 backlog="));
    assert_eq!(line.lines().count(), 1);

    store_verdict(&server.state, "node4", Trust::Untrusted).await;
    let (code, line) = check(d, &server.url, &["--critical-untrusted", "2"]).await;
    assert_eq!(code, 1, "{line}");
    assert!(
        line.starts_with("ATTESTATION WARNING - 1 untrusted hosts;"),
        "{line}"
    );
    assert!(line.contains("untrusted=1;0;2;0"), "{line}");
    // A higher warning threshold tolerates it.
    let (code, line) = check(d, &server.url, &["--warning-untrusted", "1"]).await;
    assert_eq!(code, 0, "{line}");

    store_verdict(&server.state, "node5", Trust::Untrusted).await;
    store_verdict(&server.state, "node6", Trust::Untrusted).await;
    let (code, line) = check(d, &server.url, &["--critical-untrusted", "2"]).await;
    assert_eq!(code, 2, "{line}");
    assert!(
        line.starts_with("ATTESTATION CRITICAL - 3 untrusted hosts;"),
        "{line}"
    );

    // Bad arguments are UNKNOWN too, not clap's usual 2 (= CRITICAL).
    let (code, _) = check(d, &server.url, &["--warning-untrusted", "many"]).await;
    assert_eq!(code, 3);

    let Server {
        url, stop, task, ..
    } = server;
    let _ = stop.send(());
    task.await.unwrap();
    let (code, line) = check(d, &url, &[]).await;
    assert_eq!(code, 3, "{line}");
    assert!(
        line.starts_with("ATTESTATION UNKNOWN - cannot read the pool status"),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1);
}
