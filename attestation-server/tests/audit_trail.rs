//! The audit trail end to end, in-process over mutual TLS (no TPM needed):
//! one event of every kind the API and the background tasks emit (dumped to
//! target/cadf-samples/ for the pycadf check), the query API, the audit
//! status, refused requests, sinks that fail or hang, a restart in the
//! middle of a delivery, RabbitMQ, and tamper detection on an export.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use attestation_server::audit::{self, chain};
use attestation_server::config::{Secret, ServerConfig};
use attestation_server::ctl::{self, InitArgs};
use attestation_server::store::{AttestationRecord, StoredEvent};
use attestation_server::AppState;
use chrono::Utc;
use proto::client::{ApiClient, ClientError, TlsFiles};
use proto::wire::{HostTrust, Reason, Trust};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Server {
    url: String,
    state: Arc<AppState>,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(dir: &Path, tune: impl FnOnce(&mut ServerConfig)) -> Server {
        let mut config = ServerConfig::load(Some(&dir.join("server.toml"))).unwrap();
        // Any certificate will do: these tests enroll no TPM.
        config.ek_ca = vec![dir.join("ca.pem")];
        config.audit.trust_scan_secs = 1;
        config.audit.checkpoint_secs = 1;
        config.audit.min_backoff_ms = 50;
        config.audit.max_backoff_secs = 1;
        tune(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        config.listen = listener.local_addr().unwrap();
        let url = format!("https://127.0.0.1:{}", config.listen.port());
        let state = AppState::new(config).await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let handle = tokio::spawn(async move {
            attestation_server::serve(listener, st, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Server {
            url,
            state,
            stop,
            handle,
        }
    }

    fn client(&self, dir: &Path, name: &str) -> ApiClient {
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        ApiClient::new(&self.url, &files, Duration::from_secs(10)).unwrap()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.await.unwrap();
    }

    async fn stored(&self) -> Vec<StoredEvent> {
        self.state
            .store
            .stored_events_after(0, 100_000)
            .await
            .unwrap()
    }
}

fn pool() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ctl::init(&InitArgs {
        out: dir.path().to_path_buf(),
        server_port: 1,
        hosts: vec!["n1".into(), "n2".into()],
        tctis: vec![],
        interval: 5,
        force: false,
        ek_cas: vec![],
    })
    .unwrap();
    dir
}

fn code_of(e: ClientError) -> (u16, String, String) {
    match e {
        ClientError::Api {
            status,
            code,
            message,
        } => (status, code, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn kinds(events: &[StoredEvent]) -> Vec<String> {
    events.iter().map(|e| audit::kind_of(&e.body)).collect()
}

fn json(e: &StoredEvent) -> serde_json::Value {
    serde_json::from_str(&e.body).unwrap()
}

fn samples_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("cadf-samples");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Store an attestation the way the evidence handler does.
async fn attest(s: &Server, host: &str, trusted: bool, ttl: chrono::Duration) {
    let now = Utc::now();
    let reasons = if trusted {
        vec![]
    } else {
        vec![Reason {
            step: "whitelist".into(),
            code: "pcr_not_whitelisted".into(),
            message: "PCR 7 differs".into(),
            pcr: None,
        }]
    };
    let verdict = HostTrust {
        host: host.into(),
        trust: if trusted {
            Trust::Trusted
        } else {
            Trust::Untrusted
        },
        verified_at: Some(now),
        expires_at: Some(now + ttl),
        reasons,
        policy: None,
    };
    let pcrs: proto::wire::PcrValues = serde_json::from_value(serde_json::json!({
        "sha256": {"0": "11".repeat(32), "7": "22".repeat(32)}
    }))
    .unwrap();
    let ev = audit::attestation_event(&audit::Attestation {
        observer: &s.state.config.name,
        host,
        initiator: host,
        now,
        verdict: Some(&verdict),
        reason: None,
        pcrs: Some(&pcrs),
        correlation_id: &uuid::Uuid::new_v4().to_string(),
    });
    s.state
        .store
        .record_attestation(
            host,
            AttestationRecord {
                verdict: &verdict,
                verified_pcrs: Some(&pcrs),
                clock: None,
                events: std::slice::from_ref(&ev),
                policy_epoch: None,
                nonce: None,
            },
        )
        .await
        .unwrap();
    s.state.audit_wake.notify_one();
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_kind_is_emitted_queryable_and_cadf() {
    let dir = pool();
    let d = dir.path();
    let s = Server::start(d, |_| {}).await;
    let admin = s.client(d, "admin");
    let auditor = s.client(d, "auditor");
    let sched = s.client(d, "scheduler");

    // Admin changes.
    for h in ["n1", "n2"] {
        let _: serde_json::Value = admin
            .post("/v1/hosts", &serde_json::json!({"host": h}))
            .await
            .unwrap();
    }
    let wl = serde_json::json!({"pcrs": {"sha256": {"7": ["22".repeat(32)]}}});
    let _: serde_json::Value = admin.put("/v1/hosts/n1/whitelist", &wl).await.unwrap();
    let _: serde_json::Value = admin
        .post("/v1/hosts/n1/rekey", &serde_json::json!({}))
        .await
        .unwrap();
    // Refused: a scheduler reading host details, an auditor changing a whitelist.
    let (st, code, _) = code_of(
        sched
            .get::<serde_json::Value>("/v1/hosts/n1")
            .await
            .unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (403, "forbidden"));
    let (st, _, _) = code_of(
        auditor
            .put::<_, serde_json::Value>("/v1/hosts/n1/whitelist", &wl)
            .await
            .unwrap_err(),
    );
    assert_eq!(st, 403);
    // Refused: no client certificate at all.
    let anon = anonymous_client(d);
    let resp = anon
        .get(format!("{}/v1/events", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    // Enrollment refused: an activation of an enrollment that does not exist,
    // and an enrollment with an AK that is not a TPM key.
    let agent = s.client(d, "agent-n1");
    let (st, code, _) = code_of(
        agent
            .post::<_, serde_json::Value>(
                "/v1/agents/n1/activate",
                &serde_json::json!({"enrollment_id": "nope", "proof": "00"}),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((st, code.as_str()), (404, "enrollment_unknown"));
    let (st, _, _) = code_of(
        agent
            .post::<_, serde_json::Value>(
                "/v1/agents/n1/enroll",
                &serde_json::json!({"ak_public": "AAAA"}),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(st, 400);

    // Attestations: a pass that expires soon, a failure.
    attest(&s, "n1", true, chrono::Duration::seconds(2)).await;
    attest(&s, "n2", false, chrono::Duration::seconds(600)).await;

    // The trust scanner reports n1 trusted, then stale once its verdict expires.
    wait_until("n1 to go stale", || async {
        s.stored().await.iter().any(|e| {
            audit::kind_of(&e.body) == "trust_change"
                && e.body.contains("trusted_to_stale")
                && json(e)["target"]["name"] == "n1"
        })
    })
    .await;

    let events = s.stored().await;
    let ks = kinds(&events);
    for k in [
        "host.create",
        "host.authenticate",
        "whitelist.create",
        "host.update",
        "access_denied",
        "attestation",
        "trust_change",
    ] {
        assert!(ks.iter().any(|x| x == k), "no {k} event in {ks:?}");
    }
    let denied: Vec<_> = events
        .iter()
        .filter(|e| audit::kind_of(&e.body) == "access_denied")
        .map(json)
        .collect();
    assert!(denied
        .iter()
        .any(|e| e["action"] == "authenticate" && e["outcome"] == "failure"));
    assert!(denied.iter().any(|e| e["action"] == "read"
        && e["initiator"]["name"] == "scheduler"
        && e["reason"]["reasonCode"] == "forbidden"));
    assert!(denied
        .iter()
        .any(|e| e["action"] == "update" && e["initiator"]["name"] == "auditor"));
    let n2_change = events
        .iter()
        .map(json)
        .find(|e| e["tags"].to_string().contains("trust_change") && e["target"]["name"] == "n2")
        .unwrap();
    assert_eq!(n2_change["reason"]["reasonCode"], "unknown_to_untrusted");

    // Chain links are consistent in the database.
    let mut prev = chain::GENESIS.to_string();
    for e in &events {
        assert_eq!(e.prev_hash, prev, "event {} does not link", e.seq);
        assert_eq!(e.hash, chain::link(&prev, &chain::canonical_json(&json(e))));
        prev = e.hash.clone();
    }

    // Query API: filters.
    let failures: serde_json::Value = auditor.get("/v1/events?outcome=failure").await.unwrap();
    let failures = failures["events"].as_array().unwrap().clone();
    assert!(!failures.is_empty());
    assert!(failures.iter().all(|e| e["outcome"] == "failure"));
    let n1: serde_json::Value = auditor
        .get("/v1/events?target=n1&action=evaluate")
        .await
        .unwrap();
    let n1 = n1["events"].as_array().unwrap().clone();
    assert_eq!(n1.len(), 1);
    assert_eq!(n1[0]["target"]["name"], "n1");
    let by_admin: serde_json::Value = auditor.get("/v1/events?initiator=admin").await.unwrap();
    assert!(by_admin["events"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["initiator"]["name"] == "admin"));
    let future = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let none: serde_json::Value = auditor
        .get(&format!("/v1/events?since={}", future.replace('+', "%2B")))
        .await
        .unwrap();
    assert_eq!(none["events"].as_array().unwrap().len(), 0);

    // Pagination: pages of 2 add up to the full list, in order, without repeats.
    let all = s.stored().await;
    let mut paged = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/events?limit=2&cursor={c}"),
            None => "/v1/events?limit=2".into(),
        };
        let page: serde_json::Value = auditor.get(&path).await.unwrap();
        for e in page["events"].as_array().unwrap() {
            paged.push(e["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let stored_ids: Vec<String> = all.iter().map(|e| e.id.clone()).collect();
    assert_eq!(paged[..], stored_ids[..paged.len()]);
    assert!(
        paged.len() >= stored_ids.len() - 2,
        "{} of {}",
        paged.len(),
        stored_ids.len()
    );

    // JSON lines, by Accept header and by format=jsonl.
    let http = admin_http(d);
    let text = http
        .get(format!("{}/v1/events?limit=3", s.url))
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(text.headers()["content-type"], "application/x-ndjson");
    assert!(text.headers().contains_key("x-next-cursor"));
    let body = text.text().await.unwrap();
    assert_eq!(body.lines().count(), 3);
    for l in body.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["id"].is_string());
    }
    let text = http
        .get(format!("{}/v1/events?format=jsonl&limit=1", s.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text.lines().count(), 1);

    // Bad filters and cursors: 400 naming the parameter.
    for (q, name) in [
        ("limit=0", "limit"),
        ("cursor=bm9wZQ", "cursor"),
        ("since=yesterday", "since"),
        ("outcome=maybe", "outcome"),
        ("bogus=1", "bogus"),
    ] {
        let (st, code, msg) = code_of(
            auditor
                .get::<serde_json::Value>(&format!("/v1/events?{q}"))
                .await
                .unwrap_err(),
        );
        assert_eq!((st, code.as_str()), (400, "invalid_parameter"), "{q}");
        assert!(msg.contains(name), "{q}: {msg}");
    }
    // Only admin and auditor read events.
    let (st, _, _) = code_of(
        sched
            .get::<serde_json::Value>("/v1/events")
            .await
            .unwrap_err(),
    );
    assert_eq!(st, 403);

    // Status: the file sink caught up, a checkpoint was signed.
    wait_until("the file sink to catch up and a checkpoint", || async {
        let st: serde_json::Value = auditor.get("/v1/audit/status").await.unwrap();
        st["sinks"][0]["backlog"] == 0 && st["last_checkpoint"]["seq"].as_i64().is_some()
    })
    .await;
    let st: serde_json::Value = auditor.get("/v1/audit/status").await.unwrap();
    assert_eq!(st["sinks"][0]["name"], "file");
    assert_eq!(st["sinks"][0]["lag_secs"], 0.0);

    s.stop().await;
    // Every kind, for scripts/check-cadf.py.
    let out = samples_dir().join("api.jsonl");
    let store = attestation_server::store::open(
        &ServerConfig::load(Some(&d.join("server.toml")))
            .unwrap()
            .database_url
            .0,
    )
    .await
    .unwrap();
    audit::ctl::export(store.as_ref(), &out).await.unwrap();
    assert!(std::fs::read_to_string(&out).unwrap().lines().count() >= events.len());
}

fn anonymous_client(dir: &Path) -> reqwest::Client {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap() {
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
        .build()
        .unwrap()
}

fn admin_http(dir: &Path) -> reqwest::Client {
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("admin.pem"),
        key: dir.join("admin.key"),
    };
    reqwest::Client::builder()
        .use_preconfigured_tls(proto::client::rustls_config(&files).unwrap())
        .build()
        .unwrap()
}

/// A scan of a pool with more changes than one page (1,000) reports each
/// host's change once, across pages, and a scan after it finds none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_scan_pages_through_every_change_once() {
    let dir = pool();
    let d = dir.path();
    // The background scanner runs at start, then not for an hour.
    let s = Server::start(d, |c| c.audit.trust_scan_secs = 3600).await;
    const HOSTS: usize = 2_100;
    let hosts: Vec<String> = (0..HOSTS).map(|i| format!("p{i:05}")).collect();
    let writers: Vec<_> = hosts
        .chunks(HOSTS / 4 + 1)
        .map(|chunk| {
            let (state, chunk) = (s.state.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for h in chunk {
                    state.store.register_host(&h, Utc::now()).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    for (i, h) in hosts.iter().enumerate() {
        attest(&s, h, i % 3 != 0, chrono::Duration::seconds(600)).await;
    }
    // One scan goes through every page; the next finds nothing left.
    let recorded = audit::tasks::scan_trust(&s.state).await.unwrap();
    assert_eq!(audit::tasks::scan_trust(&s.state).await.unwrap(), 0);
    let mut per_host: HashMap<String, Vec<String>> = HashMap::new();
    for e in s.stored().await {
        if audit::kind_of(&e.body) == "trust_change" {
            let j = json(&e);
            per_host
                .entry(j["target"]["name"].as_str().unwrap_or_default().to_string())
                .or_default()
                .push(
                    j["reason"]["reasonCode"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
        }
    }
    // The background scan at start may have reported some hosts; together
    // every host is reported exactly once, with its state.
    assert!(recorded <= HOSTS && recorded > 0, "{recorded}");
    assert_eq!(per_host.len(), HOSTS);
    for (i, h) in hosts.iter().enumerate() {
        let want = if i % 3 != 0 {
            "unknown_to_trusted"
        } else {
            "unknown_to_untrusted"
        };
        assert_eq!(per_host[h], vec![want.to_string()], "{h}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_verify_names_the_event_altered_removed_or_reordered() {
    let dir = pool();
    let d = dir.path();
    let s = Server::start(d, |c| c.audit.checkpoint_every = 4).await;
    let admin = s.client(d, "admin");
    for i in 0..8 {
        let _: serde_json::Value = admin
            .post("/v1/hosts", &serde_json::json!({"host": format!("h{i}")}))
            .await
            .unwrap();
    }
    wait_until("a checkpoint over all 8 events", || async {
        s.state
            .store
            .last_checkpoint("attestation-server")
            .await
            .unwrap()
            .is_some_and(|c| c.count >= 8)
    })
    .await;
    s.stop().await;

    let ctl = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_attestctl"))
            .args(args)
            .output()
            .unwrap()
    };
    let export = d.join("export.jsonl");
    let out = ctl(&[
        "audit",
        "export",
        "--server-config",
        d.join("server.toml").to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = d.join("token-signing.key");
    let verify = |file: &Path| {
        ctl(&[
            "audit",
            "verify",
            file.to_str().unwrap(),
            "--public-key",
            key.to_str().unwrap(),
        ])
    };
    let ok = verify(&export);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(report["events"], 8);
    assert!(report["checkpoints_with_trusted_key"].as_u64().unwrap() >= 1);

    let lines: Vec<String> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let id_at = |i: usize| {
        let v: serde_json::Value = serde_json::from_str(&lines[i]).unwrap();
        v["event"]["id"].as_str().unwrap().to_string()
    };
    let check = |name: &str, edited: Vec<String>, expect: &[&str]| {
        let f = d.join(format!("{name}.jsonl"));
        std::fs::write(&f, edited.join("\n") + "\n").unwrap();
        let out = verify(&f);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        for e in expect {
            assert!(err.contains(e), "{name}: expected {e:?} in {err}");
        }
    };
    // Altered: an outcome changed in line 3.
    let mut altered = lines.clone();
    altered[2] = altered[2].replace("\"success\"", "\"failure\"");
    assert_ne!(altered[2], lines[2]);
    check("altered", altered, &[&id_at(2), "altered"]);
    // Removed: line 4 deleted; the next event is named, with the gap.
    let mut removed = lines.clone();
    removed.remove(3);
    check("removed", removed, &[&id_at(4), "removed"]);
    // Reordered: lines 5 and 6 swapped.
    let mut reordered = lines.clone();
    reordered.swap(4, 5);
    // The first line out of place is named: line 5, now holding the sixth event.
    check("reordered", reordered, &[&id_at(5), "out of order"]);
    // Removed at the end: the signed checkpoint still counts them.
    let events_only: Vec<String> = lines
        .iter()
        .filter(|l| l.contains("\"record\":\"event\""))
        .cloned()
        .collect();
    let cps: Vec<String> = lines
        .iter()
        .filter(|l| l.contains("\"record\":\"checkpoint\""))
        .cloned()
        .collect();
    let mut truncated = events_only[..7].to_vec();
    truncated.extend(cps);
    check("truncated", truncated, &["removed at the end"]);
    // A rewritten chain (every hash recomputed) fails the signed checkpoint.
    let mut prev = chain::GENESIS.to_string();
    let mut rewritten = Vec::new();
    for l in &lines {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        if v["record"] == "event" {
            if v["event"]["target"]["name"] == "h2" {
                v["event"]["outcome"] = "failure".into();
            }
            v["prev_hash"] = prev.clone().into();
            let h = chain::link(&prev, &chain::canonical_json(&v["event"]));
            v["hash"] = h.clone().into();
            prev = h;
        }
        rewritten.push(v.to_string());
    }
    check("rewritten", rewritten, &["checkpoint"]);
}

/// One POST the collector accepted: its body and Authorization header.
type Received = (String, Option<String>);

/// A minimal HTTPS collector: answers each POST per `mode` (0: 500,
/// 1: hang, 2: close the connection, 3: 200 and record the body).
struct Collector {
    url: String,
    mode: Arc<AtomicU8>,
    received: Arc<Mutex<Vec<Received>>>,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
}

async fn collector(dir: &Path) -> Collector {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}/audit",
        listener.local_addr().unwrap().port()
    );
    let mode = Arc::new(AtomicU8::new(3));
    let received = Arc::new(Mutex::new(Vec::new()));
    let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (m, r, dl) = (mode.clone(), received.clone(), delay_ms.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, m, r, dl) = (acceptor.clone(), m.clone(), r.clone(), dl.clone());
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::new();
                loop {
                    // Read one request: headers, then Content-Length bytes.
                    let head_end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    let auth = head
                        .lines()
                        .find_map(|l| l.strip_prefix("authorization:"))
                        .map(|v| v.trim().to_string());
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
                    buf.drain(..head_end + len);
                    match m.load(Ordering::SeqCst) {
                        0 => {
                            let _ = s
                                .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n")
                                .await;
                        }
                        1 => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                        2 => return,
                        _ => {
                            let d = dl.load(Ordering::SeqCst);
                            if d > 0 {
                                tokio::time::sleep(Duration::from_millis(d)).await;
                            }
                            r.lock().unwrap().push((body, auth));
                            let _ = s
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                                .await;
                        }
                    }
                }
            });
        }
    });
    Collector {
        url,
        mode,
        received,
        delay_ms,
    }
}

fn webhook(c: &Collector, dir: &Path) -> audit::settings::WebhookSinkConfig {
    audit::settings::WebhookSinkConfig {
        url: c.url.clone(),
        ca: dir.join("ca.pem"),
        bearer_token: Some(Secret("s3cret".into())),
        timeout_secs: 1,
    }
}

async fn webhook_status(client: &ApiClient) -> serde_json::Value {
    let st: serde_json::Value = client.get("/v1/audit/status").await.unwrap();
    st["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "webhook")
        .cloned()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_keeps_the_backlog_and_delivers_it_when_back() {
    let dir = pool();
    let d = dir.path();
    let c = collector(d).await;
    // Failing from the start: the deliverer polls every second, and on a
    // busy machine a poll can fall between recording the old events below
    // and the first mode change, which would deliver them early.
    c.mode.store(0, Ordering::SeqCst);
    let s = Server::start(d, |cfg| {
        cfg.audit.webhook = Some(webhook(&c, d));
        cfg.audit.retention_days = 1;
    })
    .await;
    let admin = s.client(d, "admin");
    // Two events past retention.
    for h in ["old1", "old2"] {
        let ev = audit::event(
            "attestation-server",
            audit::client("admin", "admin"),
            proto::cadf::Resource::host(h),
            "create",
            "success",
            None,
            Utc::now() - chrono::Duration::days(3),
            None,
        );
        s.state.store.record_event(&ev).await.unwrap();
    }
    let mut n = 2;
    for (mode, expect) in [(0u8, "500"), (1, "timed out"), (2, "")] {
        c.mode.store(mode, Ordering::SeqCst);
        for _ in 0..3 {
            let t = Instant::now();
            let _: serde_json::Value = admin
                .post("/v1/hosts", &serde_json::json!({"host": format!("h{n}")}))
                .await
                .unwrap();
            n += 1;
            // The API does not wait for the sink.
            assert!(
                t.elapsed() < Duration::from_millis(900),
                "{:?}",
                t.elapsed()
            );
        }
        wait_until(&format!("the webhook error of mode {mode}"), || async {
            let w = webhook_status(&admin).await;
            w["backlog"].as_i64().unwrap() >= n
                && w["last_error"].as_str().is_some_and(|e| e.contains(expect))
        })
        .await;
    }
    // Retention keeps what the webhook has not received yet.
    assert_eq!(audit::tasks::prune(&s.state).await.unwrap(), 0);
    let w = webhook_status(&admin).await;
    assert!(w["consecutive_failures"].as_u64().unwrap() >= 1);
    assert!(w["lag_secs"].as_f64().unwrap() > 0.0);
    assert!(c.received.lock().unwrap().is_empty());

    // The collector is back: everything arrives, in order.
    c.mode.store(3, Ordering::SeqCst);
    let stored = s.stored().await;
    wait_until("the backlog to drain", || async {
        webhook_status(&admin).await["backlog"] == 0
    })
    .await;
    let got = c.received.lock().unwrap().clone();
    let ids: Vec<String> = got
        .iter()
        .map(|(b, _)| {
            serde_json::from_str::<serde_json::Value>(b).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let want: Vec<String> = stored.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids[..want.len()], want[..]);
    assert!(got
        .iter()
        .all(|(_, a)| a.as_deref() == Some("bearer s3cret")));
    // Delivered everywhere now: the two old events go, the rest stay.
    wait_until("every sink to catch up", || async {
        let st: serde_json::Value = admin.get("/v1/audit/status").await.unwrap();
        st["sinks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["backlog"] == 0)
    })
    .await;
    assert_eq!(audit::tasks::prune(&s.state).await.unwrap(), 2);
    assert_eq!(s.stored().await.len(), stored.len() - 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_delivery_loses_nothing_and_duplicates_keep_their_id() {
    let dir = pool();
    let d = dir.path();
    let c = collector(d).await;
    c.delay_ms.store(250, Ordering::SeqCst);
    let s = Server::start(d, |cfg| cfg.audit.webhook = Some(webhook(&c, d))).await;
    let admin = s.client(d, "admin");
    for i in 0..30 {
        let _: serde_json::Value = admin
            .post("/v1/hosts", &serde_json::json!({"host": format!("h{i}")}))
            .await
            .unwrap();
    }
    wait_until("delivery to start", || async {
        !c.received.lock().unwrap().is_empty()
    })
    .await;
    let stored = s.stored().await;
    s.stop().await;
    let before_restart = c.received.lock().unwrap().len();
    assert!(
        before_restart < stored.len(),
        "delivery finished before the restart"
    );

    // A new server on the same database resumes from the sink's cursor.
    c.delay_ms.store(0, Ordering::SeqCst);
    let s2 = Server::start(d, |cfg| cfg.audit.webhook = Some(webhook(&c, d))).await;
    let want: Vec<String> = stored.iter().map(|e| e.id.clone()).collect();
    wait_until("every event after the restart", || async {
        let got = c.received.lock().unwrap().clone();
        let ids: std::collections::HashSet<String> = got
            .iter()
            .map(|(b, _)| {
                serde_json::from_str::<serde_json::Value>(b).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        want.iter().all(|w| ids.contains(w))
    })
    .await;
    let got = c.received.lock().unwrap().clone();
    let mut first_seen: Vec<String> = Vec::new();
    let mut bodies: HashMap<String, String> = HashMap::new();
    for (b, _) in &got {
        let id = serde_json::from_str::<serde_json::Value>(b).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        // A duplicate is the same event: same id, same content.
        if let Some(prev) = bodies.insert(id.clone(), b.clone()) {
            assert_eq!(&prev, b);
        } else {
            first_seen.push(id);
        }
    }
    // First deliveries are in stored order.
    assert_eq!(first_seen[..want.len()], want[..]);
    s2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_receives_oslo_notifications_with_the_cadf_payload() {
    use lapin::options::*;
    use lapin::types::FieldTable;
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let exchange = "openstack";
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (see scripts/setup.sh)");
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    // A routing key of our own keeps parallel runs apart.
    let routing_key = format!("notifications.info.test{}", std::process::id());
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        q.name().as_str().into(),
        exchange.into(),
        routing_key.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let dir = pool();
    let d = dir.path();
    let rk = routing_key.clone();
    let s = Server::start(d, |cfg| {
        cfg.audit.amqp = Some(audit::settings::AmqpSinkConfig {
            url: Secret(url.clone()),
            exchange: exchange.into(),
            routing_key: rk,
            publisher_id: None,
        })
    })
    .await;
    let admin = s.client(d, "admin");
    let _: serde_json::Value = admin
        .post("/v1/hosts", &serde_json::json!({"host": "rabbit1"}))
        .await
        .unwrap();
    let stored = s.stored().await;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.is_empty() && Instant::now() < deadline {
        match ch
            .basic_get(q.name().as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(m) => got.push(m.delivery.data.clone()),
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert!(!got.is_empty(), "no notification arrived");
    let envelope: serde_json::Value = serde_json::from_slice(&got[0]).unwrap();
    assert_eq!(envelope["oslo.version"], "2.0");
    let msg: serde_json::Value =
        serde_json::from_str(envelope["oslo.message"].as_str().unwrap()).unwrap();
    assert_eq!(msg["event_type"], "audit.host.create");
    assert_eq!(msg["priority"], "INFO");
    assert_eq!(msg["publisher_id"], "attestation.attestation-server");
    assert_eq!(msg["payload"]["id"], stored[0].id);
    assert_eq!(msg["message_id"], stored[0].id);
    assert_eq!(
        msg["payload"]["typeURI"],
        "http://schemas.dmtf.org/cloud/audit/1.0/event"
    );
    assert_eq!(msg["payload"]["target"]["name"], "rabbit1");
    assert!(msg["timestamp"].as_str().unwrap().len() >= 19);
    s.stop().await;
}

#[test]
fn init_with_amqp_url_switches_the_amqp_sink_on() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_attestctl"))
        .args([
            "init",
            "--out",
            dir.path().to_str().unwrap(),
            "--server-port",
            "9443",
            "--host",
            "n1",
            "--amqp-url",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = ServerConfig::load(Some(&dir.path().join("server.toml"))).unwrap();
    let amqp = c.audit.amqp.expect("the amqp sink");
    assert_eq!(amqp.url.0, "amqp://guest:guest@127.0.0.1:5672/%2f");
    assert_eq!(
        (amqp.exchange.as_str(), amqp.routing_key.as_str()),
        ("openstack", "notifications.info")
    );
    // Without the flag there is no AMQP sink, and a bad URL is refused by name.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_attestctl"))
        .args([
            "init",
            "--out",
            dir.path().join("x").to_str().unwrap(),
            "--server-port",
            "9443",
            "--host",
            "n1",
            "--amqp-url",
            "http://nope",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--amqp-url"));
}
