//! Operations endpoints end to end: the probes answer without a client
//! certificate; `/metrics` needs one (any role) and counts a real swtpm
//! agent's attestations and a refused forgery, with hosts by trust and the
//! audit backlog read from the store; `/v1/status` (behind `attestctl
//! check`) is for admins and auditors.

use e2e_tests::Pool;
use proto::wire::Trust;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::collections::HashMap;
use std::sync::Arc;
use test_support::SwTpm;

/// Trusts the pool CA and offers no client certificate (a kubelet probe).
fn anonymous(pool: &Pool) -> anyhow::Result<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pool.path("ca.pem"))? {
        roots.add(c?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(std::time::Duration::from_secs(10))
        .build()?)
}

async fn get(http: &reqwest::Client, url: String) -> anyhow::Result<(u16, String)> {
    let resp = http.get(url).send().await?;
    Ok((resp.status().as_u16(), resp.text().await?))
}

/// The samples of a text exposition: `name{labels}` -> value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_are_open_and_metrics_count_attestations() -> anyhow::Result<()> {
    test_support::require_tools()?;
    let tpm = SwTpm::start()?;
    let pool = Pool::start(&[("node1", tpm.tcti())], 1, |c| {
        c.ek_ca = tpm.local_ca_certs()
    })
    .await?;
    let anon = anonymous(&pool)?;

    // Probes: no certificate needed.
    assert_eq!(
        get(&anon, format!("{}/healthz", pool.url)).await?,
        (200, r#"{"status":"ok"}"#.to_string())
    );
    assert_eq!(
        get(&anon, format!("{}/readyz", pool.url)).await?,
        (200, r#"{"status":"ready"}"#.to_string())
    );
    // Metrics and status: a certificate is required.
    for path in ["/metrics", "/v1/status"] {
        let (status, body) = get(&anon, format!("{}{path}", pool.url)).await?;
        assert_eq!(status, 401, "{path}: {body}");
        let err: serde_json::Value = serde_json::from_str(&body)?;
        assert_eq!(
            err["error"]["code"], "client_certificate_required",
            "{body}"
        );
    }

    let agent = pool.spawn_agent("node1")?;
    // No whitelist yet: the first genuine quote is judged untrusted.
    pool.wait_for("node1", "a first verdict", |t| t.verified_at.is_some())
        .await?;

    // A forgery from the host's own certificate is refused and counted.
    let forged = pool
        .http("agent-node1")?
        .post(format!("{}/v1/agents/node1/evidence", pool.url))
        .json(&serde_json::json!({
            "nonce": "00".repeat(32),
            "attest": "AAAA",
            "signature": "AAAA",
            "pcrs": {"sha256": {}}
        }))
        .send()
        .await?;
    assert!(forged.status().is_client_error(), "{}", forged.status());
    let refusal: serde_json::Value = forged.json().await?;
    let forged_code = refusal["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!forged_code.is_empty(), "{refusal}");

    // Accept its PCRs; the next quote makes it trusted.
    let admin = pool.client("admin")?;
    let _: proto::wire::HostDetail = admin
        .post("/v1/hosts/node1/whitelist/accept", &serde_json::json!({}))
        .await?;
    pool.wait_for("node1", "trusted", |t| t.trust == Trust::Trusted)
        .await?;
    agent.stop().await?;

    let (status, text) = get(&pool.http("admin")?, format!("{}/metrics", pool.url)).await?;
    assert_eq!(status, 200, "{text}");
    let m = samples(&text);
    let at = |k: &str| m.get(k).copied().unwrap_or(-1.0);
    let trusted = at("attestation_attestations_total{outcome=\"trusted\"}");
    let no_whitelist = at(
        "attestation_attestations_total{outcome=\"untrusted\",step=\"whitelist\",code=\"no_whitelist\"}",
    );
    let forgeries = at(&format!(
        "attestation_attestations_total{{outcome=\"untrusted\",step=\"decode\",code=\"{forged_code}\"}}"
    ));
    assert!(trusted >= 1.0, "{text}");
    assert!(no_whitelist >= 1.0, "{text}");
    assert_eq!(forgeries, 1.0, "{text}");
    // Every counted attestation is in the latency histogram.
    let counted: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("attestation_attestations_total{"))
        .map(|(_, v)| v)
        .sum();
    let hist = "attestation_verification_duration_seconds";
    assert_eq!(at(&format!("{hist}_count")), counted, "{text}");
    assert_eq!(at(&format!("{hist}_bucket{{le=\"+Inf\"}}")), counted);
    assert!(at(&format!("{hist}_bucket{{le=\"0.001\"}}")) <= counted);
    assert!(at(&format!("{hist}_sum")) > 0.0);
    // The pool's shape, from the store.
    assert_eq!(at("attestation_hosts{trust=\"trusted\"}"), 1.0, "{text}");
    assert_eq!(at("attestation_hosts{trust=\"untrusted\"}"), 0.0);
    assert_eq!(at("attestation_hosts{trust=\"unknown\"}"), 0.0);
    assert!(
        at("attestation_audit_backlog_events{sink=\"file\"}") >= 0.0,
        "{text}"
    );
    assert_eq!(at("attestation_database_up"), 1.0);
    assert!(at("attestation_database_query_duration_seconds") > 0.0);
    assert!(text.contains(&format!("# TYPE {hist} histogram\n")));

    // Any role may scrape; only admins and auditors read /v1/status.
    let (status, _) = get(&pool.http("scheduler")?, format!("{}/metrics", pool.url)).await?;
    assert_eq!(status, 200);
    let status: attestation_server::metrics::PoolStatus = admin.get("/v1/status").await?;
    assert_eq!(
        (
            status.hosts.trusted,
            status.hosts.untrusted,
            status.hosts.unknown
        ),
        (1, 0, 0)
    );
    assert_eq!(status.audit.len(), 1, "{status:?}");
    let (code, body) = get(&pool.http("scheduler")?, format!("{}/v1/status", pool.url)).await?;
    assert_eq!(code, 403, "{body}");

    pool.stop_and_dump_cadf("operations").await?;
    Ok(())
}
