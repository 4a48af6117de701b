//! Authorization attacks against a running server: each is refused with its
//! code and leaves an `access_denied` audit event; TLS 1.2 cannot be
//! negotiated on the mutual-TLS listener; a certificate from the pool's own
//! CA with an unknown role is refused.

use e2e_tests::Pool;
use proto::client::{ApiClient, ClientError};
use rustls_pki_types::pem::PemObject;
use std::sync::Arc;
use std::time::Duration;

fn code(r: Result<serde_json::Value, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, code, .. }) => (status, code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn roots(pool: &Pool) -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(pool.path("ca.pem")).unwrap() {
        store.add(c.unwrap()).unwrap();
    }
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_hosts_and_protocol_versions_are_enforced() -> anyhow::Result<()> {
    let pool = Pool::start(
        &[("node1", "unused".into()), ("node2", "unused".into())],
        30,
        |c| {
            c.ek_ca = vec![c.tls.client_ca.clone()];
        },
    )
    .await?;
    let now = chrono::Utc::now();
    pool.store_verdict(
        "node2",
        proto::wire::Trust::Trusted,
        now,
        now + chrono::Duration::seconds(60),
    )
    .await?;
    let empty = serde_json::json!({});

    // A scheduler certificate calling admin APIs.
    let sched = pool.client("scheduler")?;
    assert_eq!(
        code(
            sched
                .post("/v1/hosts", &serde_json::json!({"host": "evil"}))
                .await
        ),
        (403, "forbidden".into())
    );
    assert_eq!(
        code(
            sched
                .put(
                    "/v1/hosts/node2/whitelist",
                    &serde_json::json!({"pcrs": {}})
                )
                .await
        ),
        (403, "forbidden".into())
    );
    assert_eq!(
        code(sched.post("/v1/hosts/node2/whitelist/accept", &empty).await),
        (403, "forbidden".into())
    );
    assert_eq!(
        code(sched.post("/v1/hosts/node2/rekey", &empty).await),
        (403, "forbidden".into())
    );
    assert_eq!(
        code(sched.get("/v1/hosts/node2").await),
        (403, "forbidden".into())
    );
    // ...nor act as an agent.
    assert_eq!(
        code(sched.post("/v1/agents/node2/challenge", &empty).await),
        (403, "forbidden".into())
    );

    // An agent certificate querying other hosts.
    let agent = pool.client("agent-node1")?;
    assert_eq!(
        code(agent.get("/v1/hosts/node2/trust").await),
        (403, "host_mismatch".into())
    );
    assert_eq!(
        code(agent.get("/v1/hosts/node2").await),
        (403, "forbidden".into())
    );
    assert_eq!(
        code(
            agent
                .post("/v1/trust/query", &serde_json::json!({"hosts": ["node2"]}))
                .await
        ),
        (403, "forbidden".into())
    );
    assert_eq!(code(agent.get("/v1/hosts/node2/token").await).0, 403);
    assert_eq!(
        code(agent.post("/v1/agents/node2/challenge", &empty).await),
        (403, "host_mismatch".into())
    );
    // Its own host it may read.
    let own: serde_json::Value = agent.get("/v1/hosts/node1/trust").await?;
    assert_eq!(own["trust"], "unknown");

    // A certificate from the pool's own CA whose role is unknown.
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(pool.path("ca.key"))?)?;
    let ca_params =
        rcgen::CertificateParams::from_ca_cert_pem(&std::fs::read_to_string(pool.path("ca.pem"))?)?;
    let ca = ca_params.self_signed(&ca_key)?;
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "node1");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationalUnitName, "root");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    std::fs::write(pool.path("odd.pem"), cert.pem())?;
    std::fs::write(pool.path("odd.key"), key.serialize_pem())?;
    let odd = ApiClient::new(&pool.url, &pool.files("odd"), Duration::from_secs(5))?;
    assert_eq!(
        code(odd.get("/v1/hosts/node2/trust").await),
        (403, "client_certificate_invalid".into())
    );

    // TLS 1.2 cannot be negotiated on the mutual-TLS listener.
    let tls12 = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])?
    .with_root_certificates(roots(&pool))
    .with_no_client_auth();
    let old = reqwest::Client::builder()
        .use_preconfigured_tls(tls12)
        .build()?;
    let r = old
        .get(format!("{}/v1/hosts/node2/trust", pool.url))
        .send()
        .await;
    assert!(r.is_err(), "a TLS 1.2 handshake must fail: {r:?}");

    // Every refusal above was audited.
    let events = pool.audit_events().await?;
    let denied = events
        .iter()
        .filter(|e| e["action"].is_string() && e["reason"]["reasonType"] == "authorization")
        .count();
    assert_eq!(denied, 12, "one access_denied event per refusal above");
    let by_agent = events
        .iter()
        .filter(|e| {
            e["reason"]["reasonType"] == "authorization" && e["initiator"]["name"] == "node1"
        })
        .count();
    assert_eq!(by_agent, 5);
    pool.stop_and_dump_cadf("authorization").await?;
    Ok(())
}
