//! OpenStack Nova's TrustedFilter talks to us as to an OpenAttestation
//! server: `POST /OpenAttestationWebServices/V1.0/PollHosts` over HTTPS
//! without a client certificate, authenticated by `x-auth-blob`. Verdicts
//! are stored through the Store trait (a TPM adds nothing to this API).

use chrono::{DateTime, Duration, Utc};
use e2e_tests::{free_port, Pool};
use proto::wire::Trust;
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const BLOB: &str = "nova-shared-secret";
const PATH: &str = "/OpenAttestationWebServices/V1.0/PollHosts";

/// Counts the servers that asked for a client certificate (and offers none).
#[derive(Debug, Default)]
struct AskedForCertificate(AtomicUsize);

impl ResolvesClientCert for AskedForCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        None
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// A client like Nova's: trusts the pool CA, has no client certificate.
fn nova_client(pool: &Pool, asked: Arc<AskedForCertificate>) -> anyhow::Result<reqwest::Client> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pool.path("ca.pem"))? {
        roots.add(c?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_cert_resolver(asked);
    Ok(reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()?)
}

async fn poll(
    http: &reqwest::Client,
    url: &str,
    blob: Option<&str>,
    body: String,
) -> anyhow::Result<(u16, Value)> {
    let mut req = http
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(b) = blob {
        req = req.header("x-auth-blob", b);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await?))
}

fn vtime(entry: &Value) -> DateTime<chrono::FixedOffset> {
    let s = entry["vtime"].as_str().expect("vtime is a string");
    // oslo's parse_isotime needs the offset: no naive times.
    assert!(s.ends_with("+00:00"), "{s}");
    DateTime::parse_from_rfc3339(s).expect("vtime is ISO 8601")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_hosts_answers_like_open_attestation() -> anyhow::Result<()> {
    let port = free_port()?;
    let pool = Pool::start(&[("node1", "unused".into())], 30, |c| {
        c.oat.listen = Some(([127, 0, 0, 1], port).into());
        c.oat.auth_blob.0 = BLOB.into();
        c.oat.max_hosts = 50;
        // No TPM here: any certificate will do as the EK trust anchor.
        c.ek_ca = vec![c.tls.client_ca.clone()];
    })
    .await?;
    let now = Utc::now();
    let good_at = now - Duration::seconds(3);
    pool.store_verdict(
        "good1",
        Trust::Trusted,
        good_at,
        now + Duration::seconds(60),
    )
    .await?;
    pool.store_verdict("bad1", Trust::Untrusted, now, now + Duration::seconds(60))
        .await?;
    pool.store_verdict(
        "stale1",
        Trust::Trusted,
        now - Duration::seconds(120),
        now - Duration::seconds(1),
    )
    .await?;

    let asked = Arc::new(AskedForCertificate::default());
    let http = nova_client(&pool, asked.clone())?;
    let url = format!("https://127.0.0.1:{port}{PATH}");

    // The list form, exactly as the filter sends it, in order, with an unknown host.
    let body = json!({"count": 4, "hosts": ["bad1", "good1", "ghost", "stale1"]}).to_string();
    let (status, answer) = poll(&http, &url, Some(BLOB), body).await?;
    assert_eq!(status, 200, "{answer}");
    let hosts = answer["hosts"].as_array().expect("hosts list");
    let names: Vec<&str> = hosts
        .iter()
        .filter_map(|h| h["host_name"].as_str())
        .collect();
    assert_eq!(names, ["bad1", "good1", "ghost", "stale1"]);
    let levels: Vec<&str> = hosts
        .iter()
        .filter_map(|h| h["trust_lvl"].as_str())
        .collect();
    // Lower case exactly; an expired verdict reads unknown.
    assert_eq!(levels, ["untrusted", "trusted", "unknown", "unknown"]);
    // vtime: the verdict's time for known hosts; now for hosts without one.
    assert_eq!(vtime(&hosts[1]).timestamp(), good_at.timestamp());
    let ghost = vtime(&hosts[2]).with_timezone(&Utc);
    assert!((ghost - Utc::now()).num_seconds().abs() <= 5, "{ghost}");

    // The bare-string form.
    let (status, answer) = poll(
        &http,
        &url,
        Some(BLOB),
        json!({"count": 1, "hosts": "good1"}).to_string(),
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(answer["hosts"].as_array().map(Vec::len), Some(1));
    assert_eq!(answer["hosts"][0]["host_name"], "good1");
    assert_eq!(answer["hosts"][0]["trust_lvl"], "trusted");

    // Authentication: missing or wrong blob.
    let ok_body = json!({"hosts": ["good1"]}).to_string();
    for blob in [None, Some("wrong"), Some("nova-shared-secreT"), Some("")] {
        let (status, answer) = poll(&http, &url, blob, ok_body.clone()).await?;
        assert_eq!(status, 401, "{blob:?}");
        assert_eq!(answer["error"]["code"], "oat_auth_failed");
    }

    // Bad input.
    let (status, answer) = poll(&http, &url, Some(BLOB), "hosts=node1".into()).await?;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    for wrong in [
        json!({"hosts": 7}),
        json!({"hosts": [1, 2]}),
        json!({"count": 1}),
    ] {
        let (status, answer) = poll(&http, &url, Some(BLOB), wrong.to_string()).await?;
        assert_eq!(status, 400, "{wrong}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_body");
    }
    let many: Vec<String> = (0..51).map(|i| format!("n{i}")).collect();
    let (status, answer) = poll(
        &http,
        &url,
        Some(BLOB),
        json!({"count": 51, "hosts": many}).to_string(),
    )
    .await?;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["error"]["code"], "too_many");

    // The OAT listener never asked for a client certificate; the mutual-TLS
    // API on the other port does (the same client proves the check works).
    assert_eq!(asked.0.load(Ordering::SeqCst), 0);
    let api = http
        .get(format!("{}/v1/hosts/good1/trust", pool.url))
        .send()
        .await?;
    assert_eq!(api.status().as_u16(), 401);
    assert!(asked.0.load(Ordering::SeqCst) > 0);

    pool.stop_and_dump_cadf("oat").await?;
    Ok(())
}

#[tokio::test]
async fn attestctl_init_switches_the_listener_on() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let args = attestation_server::ctl::InitArgs {
        out: dir.path().to_path_buf(),
        server_port: 18443,
        hosts: vec!["node1".into()],
        tctis: vec![],
        interval: 5,
        force: false,
        ek_cas: vec![],
    };
    let extras = attestation_server::ctl::InitExtras {
        oat_port: Some(18444),
        oat_blob: Some(BLOB.into()),
    };
    let s = attestation_server::ctl::init_with(&args, &extras)?;
    let c = attestation_server::config::ServerConfig::load(Some(&s.server_config))?;
    assert_eq!(c.oat.listen, Some(([127, 0, 0, 1], 18444).into()));
    assert_eq!(c.oat.auth_blob.0, BLOB);
    assert_eq!(c.oat.api_url, "/OpenAttestationWebServices/V1.0");
    assert!(!format!("{c:?}").contains(BLOB), "the blob is redacted");
    assert_eq!(c.token_key, Some(dir.path().join("token-signing.key")));

    // Without the flags the listener stays off.
    let plain = tempfile::tempdir()?;
    let s = attestation_server::ctl::init(&attestation_server::ctl::InitArgs {
        out: plain.path().to_path_buf(),
        ..args
    })?;
    let c = attestation_server::config::ServerConfig::load(Some(&s.server_config))?;
    assert_eq!(c.oat.listen, None);
    Ok(())
}
