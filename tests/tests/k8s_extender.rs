//! The Kubernetes scheduler extender end to end: recorded kube-scheduler
//! requests (both ExtenderArgs forms) sent over HTTPS to `scheduler-filter`'s
//! extender running in-process against a real attestation server, with a
//! real swtpm host agent producing the verdicts. Also: the push receiver
//! (a notification signed by the server drops the host from the cache at
//! once; forged or altered ones are refused), offline token verification,
//! and the placement audit events.

use anyhow::Context;
use e2e_tests::Pool;
use proto::token::{Claims, TrustChange, JWT_CONTENT_TYPE, TRUST_CHANGED};
use proto::wire::{HostDetail, Trust, TrustQueryResponse};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use scheduler_filter::config::ExtenderConfig;
use scheduler_filter::server::{self, Extender};
use scheduler_filter::{FilterConfig, TrustFilter};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use test_support::SwTpm;
use tokio::sync::oneshot;

const TRUST_LABEL: &str = "trust.attestation.io/required";

/// The extender, in-process on a port-0 listener.
struct RunningExtender {
    url: String,
    filter: Arc<TrustFilter>,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl RunningExtender {
    /// HTTPS with the pool's server certificate (valid for 127.0.0.1 and
    /// issued by the pool CA, which the server trusts for webhooks) when
    /// `tls`, plain HTTP otherwise.
    async fn start(pool: &Pool, tls: bool, report_placements: bool) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let config = FilterConfig {
            server_url: pool.url.clone(),
            tls: pool.files("scheduler"),
            request_timeout_secs: 5,
            max_cache_secs: 60,
            extender: ExtenderConfig {
                listen: addr,
                tls_cert: tls.then(|| pool.path("server.pem")),
                tls_key: tls.then(|| pool.path("server.key")),
                report_placements,
                ..ExtenderConfig::default()
            },
        };
        let server_tls = match (&config.extender.tls_cert, &config.extender.tls_key) {
            (Some(c), Some(k)) => Some(Arc::new(server::tls_config(c, k)?)),
            _ => None,
        };
        let filter = Arc::new(TrustFilter::new(&config)?);
        let ext = Arc::new(Extender {
            filter: filter.clone(),
            report_placements,
        });
        let app = server::router(ext, config.extender.max_body_bytes);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(listener, app, server_tls, async {
            let _ = stopped.await;
        }));
        // The client trusts the pool CA only, as kube-scheduler would be
        // configured with `tlsConfig.caData`.
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(proto::client::rustls_config(&pool.files("scheduler"))?)
            .timeout(Duration::from_secs(20))
            .build()?;
        let scheme = if tls { "https" } else { "http" };
        Ok(Self {
            url: format!("{scheme}://127.0.0.1:{}", addr.port()),
            filter,
            http,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// POST a body as kube-scheduler does; the status and the JSON answer.
    async fn post(&self, verb: &str, body: &[u8]) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .http
            .post(format!("{}/{verb}", self.url))
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let json = serde_json::from_str(&text).with_context(|| format!("answer {text:?}"))?;
        Ok((status, json))
    }

    async fn notify(&self, content_type: &str, token: &str) -> anyhow::Result<(u16, Value)> {
        let resp = self
            .http
            .post(format!("{}/notify", self.url))
            .header("content-type", content_type)
            .body(token.to_string())
            .send()
            .await?;
        Ok((resp.status().as_u16(), resp.json().await?))
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

fn fixture(name: &str) -> anyhow::Result<Vec<u8>> {
    let path = format!(
        "{}/../scheduler-filter/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).with_context(|| path)
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Audit events of placements of `workload`, as (action, host) pairs.
fn placements(events: &[Value], workload: &str) -> Vec<(String, String)> {
    let tag = format!("workload?value={workload}");
    events
        .iter()
        .filter(|e| {
            e["tags"].as_array().is_some_and(|t| {
                t.iter().any(|t| t == "placement") && t.iter().any(|t| *t == tag.as_str())
            })
        })
        .map(|e| {
            (
                e["action"].as_str().unwrap_or_default().to_string(),
                e["target"]["name"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_requests_push_on_tamper_and_placement_audit() -> anyhow::Result<()> {
    test_support::require_tools()?;
    let tpm = SwTpm::start()?;
    let pool = Pool::start(&[("node1", tpm.tcti())], 1, |c| {
        c.ek_ca = tpm.local_ca_certs();
        // Verdicts outlive the test, so only a push can empty the cache early.
        c.freshness_secs = 120;
    })
    .await?;
    let agent = pool.spawn_agent("node1")?;
    pool.wait_for("node1", "a first verdict", |t| t.verified_at.is_some())
        .await?;
    let admin = pool.client("admin")?;
    let detail: HostDetail = admin
        .post("/v1/hosts/node1/whitelist/accept", &json!({}))
        .await?;
    assert_eq!(detail.verdict.trust, Trust::Trusted, "{detail:?}");
    // node2 is registered but never attested; ghost-7 is unknown to the server.
    let _: HostDetail = admin.post("/v1/hosts", &json!({"host": "node2"})).await?;

    let ext = RunningExtender::start(&pool, true, true).await?;
    let _: Value = admin
        .post(
            "/v1/subscriptions",
            &json!({"url": format!("{}/notify", ext.url)}),
        )
        .await?;
    // What the server itself says about the two hosts that must fail.
    let view: TrustQueryResponse = pool
        .client("scheduler")?
        .post("/v1/trust/query", &json!({"hosts": ["node2", "ghost-7"]}))
        .await?;
    let code_of = |i: usize| view.hosts[i].reasons[0].code.clone();

    // Full-node form, pod with the label: only node1, passed back verbatim.
    let request = fixture("filter-nodes.json")?;
    let sent: Value = serde_json::from_slice(&request)?;
    let (status, answer) = ext.post("filter", &request).await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["Error"], "");
    let items = answer["Nodes"]["items"].as_array().context("Nodes.items")?;
    assert_eq!(items.len(), 1, "{answer}");
    assert_eq!(items[0], sent["Nodes"]["items"][0]);
    assert!(answer["NodeNames"].is_null());
    let failed = &answer["FailedNodes"];
    assert_eq!(failed.as_object().map(|m| m.len()), Some(2), "{answer}");
    for (host, i) in [("node2", 0), ("ghost-7", 1)] {
        let reason = failed[host].as_str().context("a reason")?;
        assert!(reason.starts_with("unknown: "), "{reason}");
        assert!(reason.contains(&code_of(i)), "{reason}");
    }

    // Node-name form (nodeCacheCapable), pod with the annotation.
    let (status, answer) = ext
        .post("filter", &fixture("filter-nodenames.json")?)
        .await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(names(&answer["NodeNames"]), vec!["node1"]);
    assert!(answer["Nodes"].is_null());
    assert_eq!(
        failed_hosts(&answer),
        vec!["ghost-7".to_string(), "node2".to_string()]
    );

    // A pod that asks for nothing passes through untouched.
    let (status, answer) = ext
        .post("filter", &fixture("filter-untagged-nodenames.json")?)
        .await?;
    assert_eq!(status, 200);
    assert_eq!(
        names(&answer["NodeNames"]),
        vec!["node1", "node2", "ghost-7"]
    );
    assert_eq!(answer["FailedNodes"], json!({}));

    // prioritize: the trusted node scores, the others do not.
    let (status, answer) = ext
        .post("prioritize", &fixture("filter-nodenames.json")?)
        .await?;
    assert_eq!(status, 200, "{answer}");
    let scores: Vec<(String, i64)> = answer
        .as_array()
        .context("HostPriorityList")?
        .iter()
        .map(|h| {
            (
                h["Host"].as_str().unwrap_or_default().to_string(),
                h["Score"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(scores.len(), 3);
    assert_eq!(scores[0].0, "node1");
    assert!((1..=10).contains(&scores[0].1), "{scores:?}");
    assert_eq!(&scores[1..], &[("node2".into(), 0), ("ghost-7".into(), 0)]);

    // Malformed ExtenderArgs: 400 with the reason in `Error`.
    for bad in [
        &b"{\"Pod\": 5, \"NodeNames\": []}"[..],
        b"not json",
        b"{\"Pod\": {}}",
        b"{\"Pod\": {}, \"Nodes\": {\"items\": [{\"metadata\": {}}]}}",
    ] {
        let (status, answer) = ext.post("filter", bad).await?;
        assert_eq!(status, 400, "{answer}");
        let error = answer["Error"].as_str().unwrap_or_default();
        assert!(error.starts_with("malformed ExtenderArgs"), "{answer}");
    }

    // Each filter decision of the trust-requiring pods became an audit event.
    let events = pool.audit_events().await?;
    let mut placed = placements(&events, "payments/payments-api-0");
    placed.sort();
    assert_eq!(
        placed,
        vec![
            ("allow".to_string(), "node1".to_string()),
            ("deny".into(), "ghost-7".into()),
            ("deny".into(), "node2".into()),
        ]
    );
    assert_eq!(placements(&events, "finance/ledger-0").len(), 3);
    assert!(placements(&events, "web/cache-0").is_empty());

    // Push: the cached trusted verdict is dropped as soon as the server
    // announces the tamper, long before the cache would let it go.
    assert!(ext.filter.is_cached("node1"));
    tpm.pcr_extend(7, "sha256", &"5a".repeat(32))?;
    let tampered_at = std::time::Instant::now();
    while ext.filter.is_cached("node1") {
        anyhow::ensure!(
            tampered_at.elapsed() < Duration::from_secs(20),
            "the cached verdict of node1 was never invalidated"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Without the push the cache would have kept it for max_cache_secs (60 s).
    assert!(tampered_at.elapsed() < Duration::from_secs(20));
    let (status, answer) = ext
        .post("filter", &fixture("filter-nodenames.json")?)
        .await?;
    assert_eq!(status, 200);
    assert_eq!(names(&answer["NodeNames"]), Vec::<String>::new());
    let reason = answer["FailedNodes"]["node1"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("untrusted: pcr_not_whitelisted"),
        "{answer}"
    );

    agent.stop().await?;
    ext.stop().await;
    pool.stop_and_dump_cadf("k8s-1").await?;
    Ok(())
}

fn failed_hosts(answer: &Value) -> Vec<String> {
    let mut v: Vec<String> = answer["FailedNodes"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// A signing key that is not the server's.
fn foreign_signer() -> anyhow::Result<attestation_server::token::Signer> {
    let pem = attestation_server::token::generate_key_pem()?;
    let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())?;
    attestation_server::token::Signer::from_pkcs8(der.secret_pkcs8_der())
        .map_err(anyhow::Error::msg)
}

fn trust_changed(host: &str) -> TrustChange {
    TrustChange {
        iss: "attestation-server".into(),
        sub: host.into(),
        event: TRUST_CHANGED.into(),
        from: "trusted".into(),
        to: "untrusted".into(),
        at: chrono::Utc::now().timestamp(),
        jti: uuid_like(),
    }
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
    )
}

/// Replace the claims of a signed token, keeping its header and signature.
fn altered(token: &str, claims: &Value) -> anyhow::Result<String> {
    let parts: Vec<&str> = token.split('.').collect();
    anyhow::ensure!(parts.len() == 3, "not a JWT: {token}");
    let body = proto::token::b64url(serde_json::to_string(claims)?.as_bytes());
    Ok(format!("{}.{body}.{}", parts[0], parts[2]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_and_tokens_are_verified_with_the_servers_keys() -> anyhow::Result<()> {
    let pool = Pool::start(&[("node9", "unused".into())], 30, |c| {
        // No TPM here: any certificate will do as the EK trust anchor.
        c.ek_ca = vec![c.tls.client_ca.clone()];
    })
    .await?;
    let now = chrono::Utc::now();
    pool.store_verdict(
        "node9",
        Trust::Trusted,
        now,
        now + chrono::Duration::seconds(600),
    )
    .await?;
    let ext = RunningExtender::start(&pool, false, false).await?;
    let pod = json!({
        "Pod": {"metadata": {"name": "p", "namespace": "n", "labels": {TRUST_LABEL: "trusted"}}},
        "Nodes": null,
        "NodeNames": ["node9"]
    });
    let pod = serde_json::to_vec(&pod)?;
    let (_, answer) = ext.post("filter", &pod).await?;
    assert_eq!(names(&answer["NodeNames"]), vec!["node9"], "{answer}");
    assert!(ext.filter.is_cached("node9"));

    let server_key = pool.state.token.clone().context("the pool signs tokens")?;
    let genuine = server_key.sign(&trust_changed("node9"))?;

    // Refused, and the cache is untouched: another key, an altered claim,
    // the wrong event, the wrong content type, garbage.
    let forged = foreign_signer()?.sign(&trust_changed("node9"))?;
    let (status, body) = ext.notify(JWT_CONTENT_TYPE, &forged).await?;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_notification");
    let mut other = trust_changed("node9");
    other.sub = "node8".into();
    let (status, _) = ext
        .notify(
            JWT_CONTENT_TYPE,
            &altered(&genuine, &serde_json::to_value(&other)?)?,
        )
        .await?;
    assert_eq!(status, 401);
    let mut hello = trust_changed("node9");
    hello.event = "hello".into();
    let (status, _) = ext
        .notify(JWT_CONTENT_TYPE, &server_key.sign(&hello)?)
        .await?;
    assert_eq!(status, 401);
    let (status, _) = ext.notify("application/json", &genuine).await?;
    assert_eq!(status, 415);
    let (status, _) = ext.notify(JWT_CONTENT_TYPE, "not-a-jwt").await?;
    assert_eq!(status, 401);
    assert!(
        ext.filter.is_cached("node9"),
        "a refused notification changed the cache"
    );

    // The genuine one drops the host at once.
    let (status, body) = ext.notify(JWT_CONTENT_TYPE, &genuine).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["invalidated"], "node9");
    assert!(!ext.filter.is_cached("node9"));

    // Tokens verify offline with the keys fetched once.
    let sched = pool.client("scheduler")?;
    let t: attestation_server::token::TokenResponse = sched.get("/v1/hosts/node9/token").await?;
    let claims = ext.filter.verify_token(&t.token).await?;
    assert_eq!(
        (claims.sub.as_str(), claims.trust.as_str()),
        ("node9", "trusted")
    );
    assert!(claims.exp > chrono::Utc::now().timestamp());

    let mut lie: Claims = claims.clone();
    lie.sub = "node8".into();
    let err = ext
        .filter
        .verify_token(&altered(&t.token, &serde_json::to_value(&lie)?)?)
        .await
        .expect_err("altered claim");
    assert!(err.to_string().contains("signature"), "{err}");

    let mut stale = claims.clone();
    stale.exp = chrono::Utc::now().timestamp() - 1;
    let err = ext
        .filter
        .verify_token(&server_key.sign(&stale)?)
        .await
        .expect_err("expired");
    assert!(err.to_string().contains("expired"), "{err}");

    let err = ext
        .filter
        .verify_token(&foreign_signer()?.sign(&claims)?)
        .await
        .expect_err("foreign key");
    assert!(err.to_string().contains("no key with kid"), "{err}");

    ext.stop().await;
    pool.stop_and_dump_cadf("k8s-2").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_fails_every_node_of_a_trust_requiring_pod() -> anyhow::Result<()> {
    let pool = Pool::start(&[("node9", "unused".into())], 30, |c| {
        // No TPM here: any certificate will do as the EK trust anchor.
        c.ek_ca = vec![c.tls.client_ca.clone()];
    })
    .await?;
    let ext = RunningExtender::start(&pool, false, false).await?;
    let server_url = pool.url.clone();
    pool.stop().await;

    let (status, answer) = ext.post("filter", &fixture("filter-nodes.json")?).await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["Nodes"]["items"], json!([]));
    assert_eq!(failed_hosts(&answer).len(), 3);
    for (_, reason) in answer["FailedNodes"].as_object().context("FailedNodes")? {
        let reason = reason.as_str().unwrap_or_default();
        assert!(
            reason.contains("did not answer the trust query"),
            "{reason}"
        );
        assert!(reason.contains(&server_url), "{reason}");
    }
    // Pods that ask for nothing are not held up by the outage.
    let (_, answer) = ext
        .post("filter", &fixture("filter-untagged-nodenames.json")?)
        .await?;
    assert_eq!(names(&answer["NodeNames"]).len(), 3);
    ext.stop().await;
    Ok(())
}
